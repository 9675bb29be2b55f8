"""fal-ai/lora `ip_adapter` and `image_encoder_*` at the gateway: submit-time checks, fetching each adapter
image, mask and (URL) weights file through the MediaLoader (SSRF-safe, size-checked; weights must be
safetensors) into MEDIA, and the OPTIONS "ip_adapter" entry that indexes them (read back by
ember.pipeline.ip_adapter.parse_ip_adapter_options).

- `path`: an http(s)/data: URL of a .safetensors IP-Adapter file (model_subfolder / weight_name then play no
  part, as in fal), or, like model_name, a Hugging Face id or a directory under EMBER_LORA_MODEL_ROOT, with
  `weight_name` naming the .safetensors file inside `model_subfolder`.
- The image encoder: image_encoder_path (+ _subfolder) as an HF id or a directory under the model root;
  without it, the adapter repo's `<model_subfolder>/image_encoder` (diffusers' load_ip_adapter default).
  image_encoder_weight_name: fal's default "pytorch_model.bin" (a pickle) is read from its model.safetensors
  twin; any other name must be a .safetensors file.
- unconditional_noising_factor: passed on; the Triton side encodes noise scaled by it as the unconditional
  image, as fal's text-to-image app does (ember.pipeline.ip_adapter says where that is defined).
- insight_face_model_path (FaceID adapters): an InsightFace model pack (buffalo_l, antelopev2: a SCRFD
  det_*.onnx and an ArcFace w600k_r50.onnx / glintr100.onnx), run by ember.pipeline.face_analysis on ONNX
  Runtime: an http(s)/data: URL of the pack's .zip (streamed by the MediaLoader to the shared checkpoint
  directory, size-limited like checkpoints, unpacked once per content on the Triton side) or a directory
  under EMBER_LORA_MODEL_ROOT. Refused by name: bare pack names such as "buffalo_l" (insightface would download
  them; no model download here).
  image_projection_shortcut: passed on; it only acts on FaceID Plus projections (v1: False, v2: True).
  h94's FaceID adapters are .bin pickles, refused by name: serve the same weights saved as .safetensors.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ember.endpoints.base import MediaLoader
from ember.endpoints.common import InputError, check_url
from ember.endpoints.lora.schema import LoraInput

_URL = ("http://", "https://", "data:")
MAX_ADAPTERS = 4
MAX_IMAGES = 8  # per adapter: each one is a CLIP image-encoder call and 4+ extra attention tokens
DEFAULT_ENCODER_WEIGHTS = "pytorch_model.bin"
_SCALE_BLOCKS = {"down", "mid", "up"}  # diffusers' set_ip_adapter_scale per-block config keys


def _relative(value: str | None, loc: tuple[Any, ...]) -> None:
    """A subfolder / file name inside a model directory: relative, never climbing out of it."""
    if value is None:
        return
    parts = value.replace("\\", "/").split("/")
    if value.startswith(("/", "~")) or ".." in parts:
        raise InputError(loc, "must be a relative path inside the model directory (no '..', not absolute)")


def _file_name(value: str, loc: tuple[Any, ...]) -> None:
    if "/" in value or "\\" in value or not value.endswith(".safetensors"):
        raise InputError(
            loc,
            "must name a .safetensors file (pickled .bin / .pt weights are refused; for h94's FaceID .bin "
            "adapters, save the same state dict as .safetensors with keys image_proj.* and ip_adapter.*)",
            "not_supported",
        )


def _insight_face(value: str, loc: tuple[Any, ...], root: Path) -> None:
    """insight_face_model_path: a .zip URL or an InsightFace model pack directory under the model root."""
    if value.startswith(_URL):
        check_url(value, loc)
        return
    if not value.startswith(("/", "~", ".")):
        raise InputError(
            loc,
            f"give the URL of an InsightFace model pack .zip (e.g. buffalo_l.zip) or the path of a pack "
            f"directory under {root} (e.g. {root}/buffalo_l holding det_10g.onnx and w600k_r50.onnx); pack "
            "names are not downloaded here",
            "not_supported",
        )
    path = Path(value).expanduser().resolve()
    if not path.is_relative_to(root):
        raise InputError(loc, f"InsightFace model packs must be directories under {root}", "path_not_allowed")
    if not path.is_dir() or not any(path.rglob("*.onnx")):
        raise InputError(
            loc, f"{value} is not an InsightFace model pack directory (no .onnx files)", "path_not_found"
        )


def check_ip_adapter(
    inp: LoraInput, root: Path, check_path: Callable[[str, tuple[Any, ...], Path], None]
) -> None:
    """Raise InputError at the first ip_adapter / image_encoder field this server cannot serve as asked."""
    if len(inp.ip_adapter) > MAX_ADAPTERS:
        raise InputError(("body", "ip_adapter"), f"at most {MAX_ADAPTERS} IP-Adapters per request")
    for i, a in enumerate(inp.ip_adapter):
        loc = ("body", "ip_adapter", i)
        if a.insight_face_model_path is not None:
            _insight_face(a.insight_face_model_path, (*loc, "insight_face_model_path"), root)
        images = (
            [a.ip_adapter_image_url] if isinstance(a.ip_adapter_image_url, str) else a.ip_adapter_image_url
        )
        if not 1 <= len(images) <= MAX_IMAGES:
            raise InputError((*loc, "ip_adapter_image_url"), f"give 1 to {MAX_IMAGES} images")
        for j, url in enumerate(images):
            check_url(url, (*loc, "ip_adapter_image_url", *((j,) if len(images) > 1 else ())))
        check_url(a.ip_adapter_mask_url, (*loc, "ip_adapter_mask_url"))
        if a.path.startswith(_URL):
            check_url(a.path, (*loc, "path"))
        else:
            check_path(a.path, (*loc, "path"), root)
            _relative(a.model_subfolder, (*loc, "model_subfolder"))
            if a.weight_name is None:
                raise InputError(
                    (*loc, "weight_name"),
                    "weight_name is required with a model path: the .safetensors file inside model_subfolder "
                    "(e.g. ip-adapter_sd15.safetensors)",
                )
            _file_name(a.weight_name, (*loc, "weight_name"))
        if a.scale_json is not None and not set(a.scale_json) <= _SCALE_BLOCKS:
            raise InputError(
                (*loc, "scale_json"),
                'must be a per-block scale such as {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": '
                '[0.0, 1.0, 0.0]}} (keys "down", "mid", "up")',
            )
    if inp.image_encoder_path is not None:
        if inp.image_encoder_path.startswith(_URL):
            raise InputError(
                ("body", "image_encoder_path"),
                "image encoder URLs are not supported (a weights file lacks its config.json); give a Hugging "
                "Face id or a directory under the model root",
                "not_supported",
            )
        check_path(inp.image_encoder_path, ("body", "image_encoder_path"), root)
    _relative(inp.image_encoder_subfolder, ("body", "image_encoder_subfolder"))
    if inp.image_encoder_weight_name != DEFAULT_ENCODER_WEIGHTS:
        _file_name(inp.image_encoder_weight_name, ("body", "image_encoder_weight_name"))
    if (
        inp.ip_adapter
        and inp.image_encoder_path is None
        and inp.ip_adapter[0].path.startswith(_URL)
        and inp.ip_adapter[0].insight_face_model_path is None  # plain FaceID needs no image encoder
    ):
        raise InputError(
            ("body", "image_encoder_path"),
            "image_encoder_path is required when ip_adapter[0].path is a URL (a weights file has no "
            "image_encoder folder beside it)",
        )


async def _insight_face_source(
    value: str | None, media: MediaLoader, loc: tuple[Any, ...]
) -> dict[str, Any] | None:
    """The OPTIONS entry of insight_face_model_path: {"path": directory} or, for a URL, {"zip": path} of the
    .zip streamed to the shared checkpoint directory (never sent through a Triton tensor)."""
    if value is None:
        return None
    if not value.startswith(_URL):
        return {"path": value}
    return {"zip": await media.model_pack(value, (*loc, "insight_face_model_path"))}


async def load_ip_adapter(
    inp: LoraInput, media: MediaLoader, arrays: list[np.ndarray]
) -> dict[str, Any] | None:
    """Fetch each adapter's images ((H, W, 3) uint8), mask ((H, W) uint8 grey) and URL weights (bytes as a
    (n,) uint8 array), append them to `arrays` (the request's MEDIA), and return the OPTIONS entry."""
    if not inp.ip_adapter:
        return None
    adapters = []
    for i, a in enumerate(inp.ip_adapter):
        loc = ("body", "ip_adapter", i)
        urls = [a.ip_adapter_image_url] if isinstance(a.ip_adapter_image_url, str) else a.ip_adapter_image_url
        indices = []
        shapes = []
        for j, url in enumerate(urls):
            image = await media.image(url, (*loc, "ip_adapter_image_url", *((j,) if len(urls) > 1 else ())))
            arrays.append(image)
            indices.append(len(arrays) - 1)
            shapes.append(image.shape[:2])
        mask_index = None
        if a.ip_adapter_mask_url is not None:
            mask = await media.image(a.ip_adapter_mask_url, (*loc, "ip_adapter_mask_url"), mode="L")
            if any(mask.shape != shape for shape in shapes):
                raise InputError(
                    (*loc, "ip_adapter_mask_url"),
                    f"the mask ({mask.shape[1]}x{mask.shape[0]}) must have the IP-Adapter image's size "
                    f"({', '.join(f'{w}x{h}' for h, w in shapes)})",
                )
            arrays.append(mask)
            mask_index = len(arrays) - 1
        if a.path.startswith(_URL):
            weights = await media.weights(a.path, (*loc, "path"))
            arrays.append(np.frombuffer(weights.data, dtype=np.uint8))
            source: dict[str, Any] = {"media": len(arrays) - 1}
        else:
            source = {"path": a.path, "subfolder": a.model_subfolder, "weight_name": a.weight_name}
        adapters.append(
            {
                "weights": source,
                "images": indices,
                "mask": mask_index,
                "scale": a.scale,
                "scale_json": a.scale_json,
                "unconditional_noising_factor": a.unconditional_noising_factor,
                "insight_face": await _insight_face_source(a.insight_face_model_path, media, loc),
                "shortcut": a.image_projection_shortcut,
            }
        )
    encoder = {
        "path": inp.image_encoder_path,
        "subfolder": inp.image_encoder_subfolder,
        "weight_name": inp.image_encoder_weight_name,
    }
    return {"adapters": adapters, "image_encoder": encoder}
