"""A model whose components come from several repositories, assembled into one diffusers directory.

models.toml names the base as `source` and the replaced components in `components`, each a repository
(HF id or local directory) holding that one component at its root (config.json + weights), e.g.

    [lcm.sdxl]
    source = "stabilityai/stable-diffusion-xl-base-1.0"
    components = { unet = "latent-consistency/lcm-sdxl", vae = "madebyollin/sdxl-vae-fp16-fix" }

With EMBER_WEIGHTS=real, `Settings.model_source` then names `<models_dir>/composite/<family>-<variant>`,
and `ensure_artifacts` assembles it (like a demo model, when absent or when `components` changed): one
symlink per top-level entry of the base, the replaced components linked to their repositories' roots.
Everything downstream (the exporter, the torch runtime's from_pretrained, the tokenizer and scheduler
copies) reads one ordinary pipeline directory. Hub repositories come through the HF cache
(snapshot_download, only the files used).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

MARKER = "composite.json"
# From a component repository, only its diffusers config and weights (lcm-sdxl also ships fp16 variants,
# sdxl-vae-fp16-fix a single-file checkpoint: neither is needed).
COMPONENT_FILES = ["config.json", "diffusion_pytorch_model.safetensors"]


def _component(source: str) -> Path:
    """A directory holding a component repository: itself when local, else its HF snapshot."""
    if Path(source).is_dir():
        return Path(source).resolve()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, allow_patterns=COMPONENT_FILES))


def wanted(entry: dict[str, Any]) -> dict[str, Any]:
    """What an assembled directory is made of; its marker records it, a change re-assembles."""
    return {"source": entry["source"], "revision": entry.get("revision"), "components": entry["components"]}


def is_assembled(directory: Path, entry: dict[str, Any]) -> bool:
    marker = directory / MARKER
    return marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == wanted(entry)


def assemble(directory: Path, entry: dict[str, Any]) -> Path:
    """Build `directory` from the base and component repositories of a models.toml `entry`."""
    components: dict[str, str] = dict(entry["components"])
    revision = entry.get("revision")
    # The base without the components it loses (an SDXL base UNet alone is 10 GB in fp32).
    skip = [f"{name}/*" for name in components]
    if Path(entry["source"]).is_dir():
        base = Path(entry["source"]).resolve()
    else:
        from huggingface_hub import snapshot_download

        base = Path(
            snapshot_download(
                str(entry["source"]),
                revision=revision,
                ignore_patterns=[*skip, "*.bin", "*.ckpt", "*.onnx*", "*.msgpack", "*.fp16.safetensors"],
            )
        )
    index = json.loads((base / "model_index.json").read_text(encoding="utf-8"))
    unknown = sorted(set(components) - set(index))
    if unknown:
        raise ValueError(
            f"models.toml components {unknown} are not components of {entry['source']} "
            f"(its model_index.json lists {sorted(k for k in index if not k.startswith('_'))})"
        )

    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        for item in base.iterdir():
            if item.name not in components and not item.name.startswith("."):
                os.symlink(item.resolve(), staging / item.name)
        for name, source in components.items():
            root = _component(source)
            if not (root / "config.json").is_file():
                raise ValueError(f"models.toml components.{name} = {source!r} has no config.json at its root")
            os.symlink(root, staging / name)
        (staging / MARKER).write_text(json.dumps(wanted(entry), indent=2) + "\n", encoding="utf-8")
        if directory.is_symlink() or directory.is_file():
            directory.unlink()
        elif directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
