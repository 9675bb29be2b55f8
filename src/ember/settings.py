"""All configuration, read once from the environment (then `.env`, then the default), typed.

Every setting is an `EMBER_*` variable; the README lists them all. A value that does not parse
fails at start-up with the variable's name, never later in a request.
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field, fields
from functools import cache
from pathlib import Path
from typing import Any, get_type_hints

PACKAGE_DIR = Path(__file__).resolve().parent
RUNTIMES = ("onnxruntime", "torch", "tensorrt")


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
        if kind is float:
            value = float(raw)
            if not math.isfinite(value):
                raise ValueError(raw)
            return value
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
    # torch runtime on CUDA: none | reduce-overhead (torch.compile + its CUDA graphs) | max-autotune
    # (max-autotune-no-cudagraphs + one manual CUDA graph per shape). Ignored on CPU.
    torch_compile: str = "none"
    # onnxruntime execution providers, in preference order: cpu | cuda | tensorrt ("tensorrt,cuda,cpu").
    ort_providers: tuple[str, ...] = ("cpu",)

    # Gateway listeners. The run and queue hosts must differ by port (fal-protocol.md §1.1).
    host: str = "127.0.0.1"
    run_port: int = 8443
    queue_port: int = 8444
    # Plain-http listener for the JS `proxyUrl` endpoint (/api/fal/proxy) and file downloads.
    http_port: int = 8445
    # https listener standing in for fal's REST and CDN hosts (rest.fal.ai: realtime tokens, storage,
    # the webhook JWKS; v3.fal.media: uploads). Python clients patch REST_URL / CDN_URL to it.
    rest_port: int = 8446
    # The host name clients use in URLs we hand out (certificate SAN).
    public_host: str = "127.0.0.1"
    # More names for the self-signed certificate's SAN, e.g. "rest.fal.ai,v3.fal.media" when DNS maps
    # fal's hard-coded hosts here.
    tls_hosts: tuple[str, ...] = ()

    # Triton (internal service, loopback only).
    triton_grpc_url: str = "127.0.0.1:8001"
    triton_http_port: int = 8000
    triton_grpc_port: int = 8001
    triton_metrics_port: int = 8002
    model_repository: Path = Path("model_repository")
    # Progress responses of one request (log lines "step i/n", SSE progress events): its first and last
    # denoising steps, and the others at most one per this many ms (0: every step). Each costs the Triton
    # stub, server and client a message: ~1.7 ms per step on the 2-core CPU demo (benchmarks/NOTES.md).
    progress_interval_ms: int = 50

    # API key: when unset, a dev key is generated on first start into var/keys.
    api_key: str = ""
    # Concurrent jobs the queue worker sends to Triton (Triton batches them).
    worker_concurrency: int = 8
    # Largest accepted request body, bytes.
    max_body_bytes: int = 32 * 1024 * 1024
    log_level: str = "info"

    # Reliability. Attempts per job when the inference server is unavailable or the gateway stops
    # while the job runs; the first retry waits `retry_delay` seconds, doubling after each.
    max_attempts: int = 3
    retry_delay: float = 1.0
    # On SIGTERM: readiness drops at once, running jobs get this long to finish, then are re-queued.
    drain_timeout: float = 30.0

    # URL inputs and webhooks (the SSRF-safe fetcher): hosts or networks exempt from the
    # public-address rule ("10.0.0.0/8,files.internal"; tests use "127.0.0.1/32"), and limits.
    fetch_allow: tuple[str, ...] = ()
    fetch_max_bytes: int = 20 * 1024 * 1024
    fetch_timeout: float = 20.0
    # User weight files (LoRA, embeddings, ControlNet): safetensors only, at most this large.
    weights_max_bytes: int = 512 * 1024 * 1024

    # Webhooks: attempts per delivery, seconds per attempt, and the first back-off (doubling:
    # 15 s gives 10 attempts over about 2 h, as fal documents).
    webhook_attempts: int = 10
    webhook_timeout: float = 15.0
    webhook_retry_delay: float = 15.0

    # Storage: largest uploaded file, and how long a signed upload URL stays valid (seconds).
    max_upload_bytes: int = 1024 * 1024 * 1024
    upload_url_ttl: float = 3600.0

    # Realtime: a session with no input for this long gets fal's TIMEOUT message and is closed.
    realtime_idle_timeout: float = 60.0

    # fal-ai/lora: base models resident at once in the Triton model (least recently used leaves), and
    # the one directory under which `model_name` may name a local model ("" = <var_dir>/lora-models).
    # Any other local path is refused: a request must never make the server read arbitrary paths.
    lora_max_models: int = 2
    lora_model_root: str = ""
    # fal-ai/lora `model_name` (also `unet_name`, `ic_light_model_url`) as a URL to a single-file .safetensors
    # checkpoint: the gateway streams it into
    # <lora model root>/checkpoints/<sha256>.safetensors (shared with Triton), at most this large and long.
    checkpoint_max_bytes: int = 16 * 1024**3
    checkpoint_timeout: float = 3600.0
    # fal-ai/lora ControlNets resident at once (`controlnets[].path`, loaded on first use; LRU as base models).
    lora_max_controlnets: int = 4

    models: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def db_path(self) -> Path:
        return self.var_dir / "jobs.sqlite3"

    @property
    def files_dir(self) -> Path:
        return self.var_dir / "files"

    @property
    def keys_dir(self) -> Path:
        return self.var_dir / "keys"

    @property
    def models_dir(self) -> Path:
        return self.var_dir / "models"

    @property
    def export_dir(self) -> Path:
        return self.var_dir / "export"

    @property
    def lora_models_dir(self) -> Path:
        return Path(self.lora_model_root) if self.lora_model_root else self.var_dir / "lora-models"

    def model_entry(self, family: str, variant: str) -> dict[str, Any]:
        try:
            return dict(self.models[family][variant])
        except KeyError as exc:
            raise SettingsError(f"{self.models_file} has no [{family}.{variant}] entry") from exc

    def model_runtime(self, family: str, variant: str) -> str:
        """The engine runtime of one model: its models.toml `runtime`, else EMBER_RUNTIME."""
        runtime = str(self.model_entry(family, variant).get("runtime", self.runtime))
        if runtime not in RUNTIMES:
            raise SettingsError(f"{self.models_file} [{family}.{variant}] runtime must be one of {RUNTIMES}")
        return runtime

    def model_source(self, family: str, variant: str) -> str:
        """What `from_pretrained` loads for this model: an HF id, a directory or a URL."""
        entry = self.model_entry(family, variant)
        if self.weights == "demo":
            return str((self.models_dir / entry["demo"]).resolve())
        if entry.get("components"):  # assembled from several repositories (ember.specs.composite)
            return str((self.models_dir / "composite" / f"{family}-{variant}").resolve())
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
    if settings.torch_compile not in ("none", "reduce-overhead", "max-autotune"):
        raise SettingsError("EMBER_TORCH_COMPILE must be none, reduce-overhead or max-autotune")
    unknown = sorted(set(settings.ort_providers) - {"cpu", "cuda", "tensorrt"})
    if unknown or not settings.ort_providers:
        raise SettingsError(f"EMBER_ORT_PROVIDERS lists cpu, cuda and/or tensorrt, not {unknown or '(none)'}")
    if settings.runtime not in RUNTIMES:
        raise SettingsError(f"EMBER_RUNTIME must be onnxruntime, torch or tensorrt, not {settings.runtime!r}")
    ports = (settings.run_port, settings.queue_port, settings.http_port, settings.rest_port)
    if settings.run_port == settings.queue_port:
        raise SettingsError("EMBER_RUN_PORT and EMBER_QUEUE_PORT must differ (fal clients tell them apart)")
    if len(set(ports)) != len(ports):
        raise SettingsError("EMBER_RUN_PORT, EMBER_QUEUE_PORT, EMBER_HTTP_PORT and EMBER_REST_PORT must differ")
    for name in ("max_attempts", "webhook_attempts", "lora_max_controlnets"):
        if getattr(settings, name) < 1:
            raise SettingsError(f"EMBER_{name.upper()} must be at least 1")
    for name in ("retry_delay", "drain_timeout", "fetch_timeout", "webhook_timeout", "webhook_retry_delay",
                 "checkpoint_timeout",
                 "upload_url_ttl", "realtime_idle_timeout"):
        if not getattr(settings, name) >= 0:
            raise SettingsError(f"EMBER_{name.upper()} must be a number of seconds >= 0")
    try:
        models = tomllib.loads(settings.models_file.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingsError(f"EMBER_MODELS_FILE={settings.models_file}: {exc}") from exc
    object.__setattr__(settings, "models", models)
    return settings


@cache
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
