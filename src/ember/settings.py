"""All configuration, read once from the environment (then `.env`, then the default), typed.

Every setting is an `EMBER_*` variable; the README lists them all. A value that does not parse
fails at start-up with the variable's name, never later in a request.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, get_type_hints

PACKAGE_DIR = Path(__file__).resolve().parent


class SettingsError(ValueError):
    """A setting is missing or does not parse; the message names the variable."""


def _read_dotenv(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def _parse(name: str, raw: str, kind: Any) -> Any:
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        if kind is Path:
            return Path(raw).expanduser()
        if kind == tuple[str, ...]:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
        return kind(raw)
    except ValueError as exc:
        raise SettingsError(f"{name}={raw!r} is not a valid {getattr(kind, '__name__', kind)}") from exc


@dataclass(frozen=True)
class Settings:
    # Where all state lives: jobs database, stored files, keys, certificates, models, exports.
    var_dir: Path = Path("var")
    # demo: the tiny random-weight models built offline; real: the `source` of models.toml.
    weights: str = "demo"
    # The models configuration (which weights each endpoint uses).
    models_file: Path = PACKAGE_DIR / "models.toml"
    # Engine runtime inside Triton: onnxruntime | torch | tensorrt.
    runtime: str = "onnxruntime"
    # torch runtime device and precision (cuda / cpu; float16 / bfloat16 / float32).
    device: str = "cpu"
    dtype: str = "float32"

    # Gateway listeners. The run and queue hosts must differ by port (fal-protocol.md §1.1).
    host: str = "127.0.0.1"
    run_port: int = 8443
    queue_port: int = 8444
    # Plain-http listener for the JS `proxyUrl` endpoint (/api/fal/proxy) and file downloads.
    http_port: int = 8445
    # The host name clients use in URLs we hand out (certificate SAN).
    public_host: str = "127.0.0.1"

    # Triton (internal service, loopback only).
    triton_grpc_url: str = "127.0.0.1:8001"
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    model_repository: Path = Path("model_repository")

    # API key: when unset, a dev key is generated on first start into var/keys.
    api_key: str = ""
    # Concurrent jobs the queue worker sends to Triton (Triton batches them).
    worker_concurrency: int = 8
    # Largest accepted request body, bytes.
    max_body_bytes: int = 32 * 1024 * 1024
    log_level: str = "info"

    models: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def db_path(self) -> Path:
        return self.var_dir / "jobs.sqlite3"

    @property
    def files_dir(self) -> Path:
        return self.var_dir / "files"

    @property
    def models_dir(self) -> Path:
        return self.var_dir / "models"

    @property
    def export_dir(self) -> Path:
        return self.var_dir / "export"

    def model_entry(self, family: str, variant: str) -> dict[str, Any]:
        try:
            return dict(self.models[family][variant])
        except KeyError as exc:
            raise SettingsError(f"{self.models_file} has no [{family}.{variant}] entry") from exc

    def model_source(self, family: str, variant: str) -> str:
        """What `from_pretrained` loads for this model: an HF id, a directory or a URL."""
        entry = self.model_entry(family, variant)
        if self.weights == "demo":
            return str((self.models_dir / entry["demo"]).resolve())
        return str(entry["source"])


def load_settings(environ: dict[str, str] | None = None, dotenv: Path = Path(".env")) -> Settings:
    env = {**_read_dotenv(dotenv), **(os.environ if environ is None else environ)}
    hints = get_type_hints(Settings)
    values: dict[str, Any] = {}
    for f in fields(Settings):
        if f.name == "models":
            continue
        name = f"EMBER_{f.name.upper()}"
        if name in env:
            values[f.name] = _parse(name, env[name], hints[f.name])
    settings = Settings(**values)
    if settings.weights not in ("demo", "real"):
        raise SettingsError(f"EMBER_WEIGHTS must be 'demo' or 'real', not {settings.weights!r}")
    if settings.runtime not in ("onnxruntime", "torch", "tensorrt"):
        raise SettingsError(f"EMBER_RUNTIME must be onnxruntime, torch or tensorrt, not {settings.runtime!r}")
    if settings.run_port == settings.queue_port:
        raise SettingsError("EMBER_RUN_PORT and EMBER_QUEUE_PORT must differ (fal clients tell them apart)")
    try:
        models = tomllib.loads(settings.models_file.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"EMBER_MODELS_FILE={settings.models_file}: {exc}") from exc
    object.__setattr__(settings, "models", models)
    return settings


@cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
