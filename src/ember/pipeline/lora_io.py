"""The `lora` Triton model's tensor contract (model_repository/lora/config.pbtxt) as plain numpy arrays.

Every input arrives with the batch dimension of 1 that max_batch_size > 0 adds: scalars are (1, 1).
Structured fields travel as one JSON string, OPTIONS:
    {"loras": [{"file": 0, "scale": 0.7}, ...], "timesteps": [999, 500] | null, "sigmas": [...] | null,
     "controlnets": [{"path", "variant", "config": {config_url's config.json} | null, "image": 0,
                      "mask": 1 | null, "conditioning_scale", "start_percentage", "end_percentage"}, ...],
     "controlnet_guess_mode": false}
where "file" indexes LORA_FILES, (1, n) TYPE_STRING safetensors blobs the gateway fetched and checked.
Textual-inversion files travel in LORA_FILES too, after the LoRAs: OPTIONS "embeddings":
[{"file": 2, "tokens": ["<s0>", "<s1>"]}, ...] (ember.pipeline.textual_inversion).
Fetched images and other arrays travel in MEDIA, (1, m) TYPE_STRING .npy blobs, indexed from OPTIONS
(`media_array`; the gateway side is ember.endpoints.common.media_tensor).
OPTIONS "ip_adapter" (null without IP-Adapters) indexes MEDIA for adapter images, masks and URL weights:
see ember.pipeline.ip_adapter.parse_ip_adapter_options.
Outputs: IMAGES (1, N, H, W, 3) uint8, NSFW (1, N), PROGRESS (1, 2), TIMINGS (1, 1) JSON, and LOG (1, 1)
on responses that carry a status line (model loading) instead of progress. With OPTIONS "debug_latents" /
"debug_per_pass_latents" true, the final response also carries LATENTS (1, N, C, h, w), PASS_LATENTS
(1, S, N, C, h, w) and PASS_TIMESTEPS (1, S), float32 (ember.pipeline.debug_latents).
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ember.pipeline.debug_latents import OUTPUT_NAMES as DEBUG_OUTPUT_NAMES
from ember.pipeline.debug_latents import debug_arrays
from ember.pipeline.ic_light import parse_ic_light
from ember.pipeline.ip_adapter import parse_ip_adapter_options
from ember.pipeline.lora import LoraRequest, LoraResult, ModelRef
from ember.pipeline.lora_controlnets import parse_controlnets
from ember.pipeline.loras import LoraFile, parse_lora
from ember.pipeline.textual_inversion import embeddings_from_options

INPUT_NAMES = (
    "MODEL_NAME",
    "VARIANT",
    "UNET_NAME",
    "PROMPT",
    "NEGATIVE_PROMPT",
    "SEED",
    "NUM_IMAGES",
    "NUM_INFERENCE_STEPS",
    "GUIDANCE_SCALE",
    "WIDTH",
    "HEIGHT",
    "CLIP_SKIP",
    "SCHEDULER",
    "PREDICTION_TYPE",
    "RESCALE_BETAS_SNR_ZERO",
    "ETA",
    "TILE_WIDTH",
    "TILE_HEIGHT",
    "TILE_STRIDE_WIDTH",
    "TILE_STRIDE_HEIGHT",
    "OPTIONS",
    "LORA_FILES",
    "PROMPT_WEIGHTING",
    "ENABLE_SAFETY_CHECKER",
    "MEDIA",
)
OUTPUT_NAMES = ("IMAGES", "NSFW", "PROGRESS", "TIMINGS", "LOG", *DEBUG_OUTPUT_NAMES)
DEFAULTS: dict[str, Any] = {
    "VARIANT": "",
    "UNET_NAME": "",
    "NEGATIVE_PROMPT": "",
    "NUM_IMAGES": 1,
    "NUM_INFERENCE_STEPS": 30,
    "GUIDANCE_SCALE": 7.5,
    "WIDTH": 1024,
    "HEIGHT": 1024,
    "CLIP_SKIP": 0,
    "SCHEDULER": "",
    "PREDICTION_TYPE": "",
    "RESCALE_BETAS_SNR_ZERO": False,
    "ETA": 0.0,
    "TILE_WIDTH": 4096,
    "TILE_HEIGHT": 4096,
    "TILE_STRIDE_WIDTH": 2048,
    "TILE_STRIDE_HEIGHT": 2048,
    "OPTIONS": "{}",
    "PROMPT_WEIGHTING": False,
    "ENABLE_SAFETY_CHECKER": False,
}


def _scalar(arrays: Mapping[str, np.ndarray | None], name: str) -> Any:
    value = arrays.get(name)
    if value is None:
        if name not in DEFAULTS:
            raise ValueError(f"{name} is required")
        return DEFAULTS[name]
    if value.size != 1:
        raise ValueError(
            f"{name} must hold one value per request (shape [1, 1]), got shape {list(value.shape)}"
        )
    item = value.reshape(-1)[0]
    if isinstance(item, bytes):
        try:
            return item.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{name} is not valid UTF-8") from exc
    return item


def resolve_model(
    name: str,
    root: Path,
    marker: str = "model_index.json",
    field: str = "model_name",
    single_file: bool = False,
) -> str:
    """What from_pretrained may load for `model_name`: a directory under `root` (the only local paths
    allowed), or an HF id resolved through the HF cache (never a path relative to the server's cwd).
    `single_file`: a .safetensors checkpoint under `root` is accepted too (the gateway streams URLs into
    <root>/checkpoints/; ember.pipeline.base_models converts them).
    ValueError says why a name is refused, starting with `field` (the request field that named it)."""
    if name.startswith(("http://", "https://", "data:")):
        raise ValueError(
            f"{field}: URLs are fetched by the gateway, which sends the checkpoint's path under the model "
            "root; Triton clients name an HF id, or a directory or .safetensors file under that root"
        )
    if name.startswith(("/", ".", "~")):
        path = Path(name).expanduser().resolve()
        allowed = root.resolve()
        if not path.is_relative_to(allowed):
            raise ValueError(
                f"{field}: local models must be directories under {allowed} (EMBER_LORA_MODEL_ROOT)"
            )
        if single_file and path.suffix == ".safetensors" and path.is_file():
            return str(path)
        if not (path / marker).is_file():
            raise ValueError(f"{field}: {name} is not a diffusers model directory (no {marker})")
        return str(path)
    from huggingface_hub import snapshot_download

    try:
        # Component folders only: many SD repos also hold multi-GB single-file checkpoints at the root.
        patterns = ["*.json", "*.txt"] + (["*/*.safetensors"] if marker == "model_index.json" else ["*.safetensors"])
        return snapshot_download(name, allow_patterns=patterns)
    except Exception as exc:
        raise ValueError(f"{field}: cannot fetch {name!r} from the Hugging Face hub: {exc}") from exc


class LoraFiles:
    """Parsed LoRA files by content digest (the same file sent twice is parsed once)."""

    def __init__(self, capacity: int = 16):
        self._cache: OrderedDict[str, LoraFile] = OrderedDict()
        self._capacity = capacity

    def get(self, blob: bytes) -> LoraFile:
        from safetensors.torch import load

        digest = hashlib.sha256(blob).hexdigest()
        lora = self._cache.get(digest)
        if lora is None:
            lora = self._cache[digest] = parse_lora(load(blob), digest)
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        self._cache.move_to_end(digest)
        return lora


def media_array(arrays: Mapping[str, np.ndarray | None], index: Any, what: str) -> np.ndarray:
    """MEDIA[index] as the array the gateway sent (.npy, never pickled); ValueError names `what`."""
    import io

    blobs = [] if arrays.get("MEDIA") is None else list(arrays["MEDIA"].reshape(-1))
    if not isinstance(index, int) or not 0 <= index < len(blobs):
        raise ValueError(f"{what} = {index!r}, but MEDIA holds {len(blobs)} item(s)")
    try:
        return np.load(io.BytesIO(bytes(blobs[index])), allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{what}: MEDIA[{index}] is not a .npy array: {exc}") from exc


def parse_lora_request(
    arrays: Mapping[str, np.ndarray | None],
    model_root: Path,
    lora_files: LoraFiles,
    is_cancelled: Callable[[], bool],
) -> LoraRequest:
    """A LoraRequest from the model's input arrays; ValueError names the bad input."""
    get = lambda name: _scalar(arrays, name)
    try:
        options = json.loads(get("OPTIONS"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"OPTIONS is not JSON: {exc}") from exc
    blobs = [] if arrays.get("LORA_FILES") is None else list(arrays["LORA_FILES"].reshape(-1))
    loras = []
    for i, entry in enumerate(options.get("loras", [])):
        index = int(entry["file"])
        if not 0 <= index < len(blobs):
            raise ValueError(f"OPTIONS.loras[{i}].file = {index}, but LORA_FILES holds {len(blobs)} file(s)")
        try:
            loras.append((lora_files.get(bytes(blobs[index])), float(entry.get("scale", 1.0))))
        except Exception as exc:
            raise ValueError(f"loras[{i}]: not a usable LoRA file: {exc}") from exc
    timesteps, sigmas = options.get("timesteps"), options.get("sigmas")
    return LoraRequest(
        model=ModelRef(
            resolve_model(get("MODEL_NAME"), model_root, single_file=True),
            get("VARIANT") or None,
            resolve_model(get("UNET_NAME"), model_root, "config.json", "unet_name", single_file=True)
            if get("UNET_NAME")
            else None,
        ),
        prompt=get("PROMPT"),
        negative_prompt=get("NEGATIVE_PROMPT"),
        seed=int(get("SEED")),
        num_images=int(get("NUM_IMAGES")),
        num_inference_steps=int(get("NUM_INFERENCE_STEPS")),
        guidance_scale=float(get("GUIDANCE_SCALE")),
        width=int(get("WIDTH")),
        height=int(get("HEIGHT")),
        clip_skip=int(get("CLIP_SKIP")),
        scheduler=get("SCHEDULER") or None,
        timesteps=tuple(int(t) for t in timesteps) if timesteps else None,
        sigmas=tuple(float(s) for s in sigmas) if sigmas else None,
        prediction_type=get("PREDICTION_TYPE") or None,
        rescale_betas_zero_snr=bool(get("RESCALE_BETAS_SNR_ZERO")),
        eta=float(get("ETA")),
        tile=(int(get("TILE_HEIGHT")), int(get("TILE_WIDTH"))),
        tile_stride=(int(get("TILE_STRIDE_HEIGHT")), int(get("TILE_STRIDE_WIDTH"))),
        loras=tuple(loras),
        prompt_weighting=bool(get("PROMPT_WEIGHTING")),
        embeddings=embeddings_from_options(options.get("embeddings") or [], blobs),
        enable_safety_checker=bool(get("ENABLE_SAFETY_CHECKER")),
        controlnets=parse_controlnets(options, arrays, model_root),
        controlnet_guess_mode=options.get("controlnet_guess_mode") is True,
        ip_adapter=parse_ip_adapter_options(
            options.get("ip_adapter"), lambda i, what: media_array(arrays, i, what), model_root
        ),
        ic_light=parse_ic_light(options.get("ic_light"), model_root, lambda i, what: media_array(arrays, i, what)),
        debug_latents=options.get("debug_latents") is True,
        debug_per_pass_latents=options.get("debug_per_pass_latents") is True,
        is_cancelled=is_cancelled,
    )


def progress_arrays(step: int, total: int) -> dict[str, np.ndarray]:
    return {"PROGRESS": np.array([[step, total]], dtype=np.int32)}


def log_arrays(message: str) -> dict[str, np.ndarray]:
    return {"LOG": np.array([[message.encode("utf-8")]], dtype=np.object_)}


def result_arrays(result: LoraResult) -> dict[str, np.ndarray]:
    if result.images is None:
        raise ValueError("a cancelled request has no images")
    return {
        "IMAGES": np.ascontiguousarray(result.images.numpy()[None]),
        "NSFW": np.array([result.nsfw], dtype=np.bool_),
        "TIMINGS": np.array([[json.dumps(result.timings).encode()]], dtype=np.object_),
        **debug_arrays(result.debug),
    }
