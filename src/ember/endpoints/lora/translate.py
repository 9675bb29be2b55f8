"""fal-ai/lora request <-> the `lora` Triton model's tensors (model_repository/lora/config.pbtxt).

Order of defaults: the user's value, else the endpoint default written in the schema (every field has
one, so the gateway always sends all typed inputs). What this server cannot serve yet is refused by
field name with a 422, never silently ignored.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from ember.endpoints.base import (
    Endpoint,
    ImageSink,
    Loaded,
    MediaLoader,
    TritonTensors,
    bytes_tensor,
    scalar_tensor,
)
from ember.endpoints.common import InputError, check_url, resolve_image_size
from ember.endpoints.lora.schema import LoraInput, LoraOutput

DEFAULT_SIZE = (1024, 1024)  # square_hd
_NOT_YET = "is not supported yet by this server"
# Characters that carry meaning in compel's prompt-weighting syntax.
_WEIGHTING_SYNTAX = re.compile(r"[()\[\]+]|\w-(?=\s|,|$)|\.(and|blend|swap)\(")
# An HF repo id: "owner/name" (letters, digits, - _ .), nothing path-like.
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _model_root() -> Path:
    from ember.settings import get_settings

    return get_settings().lora_models_dir.resolve()


def check_model_name(value: str, loc: tuple[str, ...], root: Path) -> None:
    """model_name / unet_name: an HF id, or a local directory under the allowed root (EMBER_LORA_MODEL_ROOT)
    and nowhere else. URLs to single-file checkpoints are not served yet."""
    if value.startswith(("http://", "https://", "data:")):
        raise InputError(
            loc, f"single-file checkpoint URLs {_NOT_YET}; use a Hugging Face id", "not_supported"
        )
    if value.startswith(("/", "~", ".")) or "\\" in value:
        path = Path(value).expanduser().resolve()
        if not path.is_relative_to(root):
            raise InputError(loc, f"local models must be directories under {root}", "path_not_allowed")
        if not path.is_dir():
            raise InputError(loc, f"{value} is not a model directory under {root}", "path_not_found")
        return
    if not _HF_ID.match(value) or ".." in value:
        raise InputError(loc, "must be a Hugging Face id (owner/name) or a directory under the model root")


class LoraEndpoint(Endpoint[LoraInput]):
    endpoint_id = "fal-ai/lora"
    triton_model = "lora"
    input_model = LoraInput
    output_model = LoraOutput

    def check(self, inp: LoraInput) -> None:
        root = _model_root()
        check_model_name(inp.model_name, ("body", "model_name"), root)
        if inp.unet_name is not None:
            check_model_name(inp.unet_name, ("body", "unet_name"), root)
        for i, lora in enumerate(inp.loras):
            loc = ("body", "loras", i, "path")
            if not lora.path.startswith(("http://", "https://", "data:")):
                raise InputError(
                    loc,
                    "LoRA weights must be an http(s) URL or a data: URI of a .safetensors "
                    "file (Hugging Face ids and server paths are not supported)",
                    "url_not_allowed",
                )
            check_url(lora.path, loc)
        # Features whose stages are not wired yet: refused by name.
        unsupported: list[tuple[str, Any]] = [
            ("embeddings", inp.embeddings),
            ("controlnets", inp.controlnets),
            ("controlnet_guess_mode", inp.controlnet_guess_mode),
            ("ip_adapter", inp.ip_adapter),
            ("image_encoder_path", inp.image_encoder_path),
            ("image_encoder_subfolder", inp.image_encoder_subfolder),
            ("ic_light_model_url", inp.ic_light_model_url),
            ("ic_light_model_background_image_url", inp.ic_light_model_background_image_url),
            ("ic_light_image_url", inp.ic_light_image_url),
            ("debug_latents", inp.debug_latents),
            ("debug_per_pass_latents", inp.debug_per_pass_latents),
        ]
        for name, value in unsupported:
            if value:
                raise InputError(("body", name), f"{name} {_NOT_YET}", "not_supported")
        if inp.prompt_weighting:
            for name in ("prompt", "negative_prompt"):
                if _WEIGHTING_SYNTAX.search(getattr(inp, name)):
                    raise InputError(
                        ("body", name),
                        "prompt_weighting: the weighting syntax ((word)1.2, word+, word-, .and(), .blend()) "
                        f"{_NOT_YET}; remove it or set prompt_weighting to false",
                        "not_supported",
                    )
        timesteps = inp.timesteps is not None and inp.timesteps.method == "array"
        sigmas = inp.sigmas is not None and inp.sigmas.method == "array"
        if timesteps and sigmas:
            raise InputError(("body", "sigmas"), "timesteps and sigmas cannot both be set")
        for name, on, override in (("timesteps", timesteps, inp.timesteps), ("sigmas", sigmas, inp.sigmas)):
            if on and override is not None and not override.array:
                raise InputError(("body", name, "array"), f"method 'array' needs a non-empty {name}.array")
        if inp.tile_stride_width > inp.tile_width or inp.tile_stride_height > inp.tile_height:
            raise InputError(("body", "tile_stride_width"), "tile strides must not exceed the tile size")
        resolve_image_size(inp.image_size, DEFAULT_SIZE)

    async def load(self, inp: LoraInput, media: MediaLoader) -> Loaded:
        """Each LoRA file, fetched and checked as safetensors (pickles refused) by the gateway."""
        files = [
            await media.weights(lora.path, ("body", "loras", i, "path")) for i, lora in enumerate(inp.loras)
        ]
        return {"lora_files": [f.data for f in files]}

    def to_triton(self, inp: LoraInput, seed: int, loaded: Loaded | None = None) -> TritonTensors:
        width, height = resolve_image_size(inp.image_size, DEFAULT_SIZE)
        blobs = list((loaded or {}).get("lora_files", []))
        options = {
            "loras": [{"file": i, "scale": lora.scale} for i, lora in enumerate(inp.loras)],
            "timesteps": inp.timesteps.array if inp.timesteps and inp.timesteps.method == "array" else None,
            "sigmas": inp.sigmas.array if inp.sigmas and inp.sigmas.method == "array" else None,
        }
        tensors = {
            "MODEL_NAME": bytes_tensor(inp.model_name),
            "VARIANT": bytes_tensor(inp.variant or ""),
            "UNET_NAME": bytes_tensor(inp.unet_name or ""),
            "PROMPT": bytes_tensor(inp.prompt),
            "NEGATIVE_PROMPT": bytes_tensor(inp.negative_prompt),
            "SEED": scalar_tensor(seed, np.int64),
            "NUM_IMAGES": scalar_tensor(inp.num_images, np.int32),
            "NUM_INFERENCE_STEPS": scalar_tensor(inp.num_inference_steps, np.int32),
            "GUIDANCE_SCALE": scalar_tensor(inp.guidance_scale, np.float32),
            "WIDTH": scalar_tensor(width, np.int32),
            "HEIGHT": scalar_tensor(height, np.int32),
            "PROMPT_WEIGHTING": scalar_tensor(inp.prompt_weighting, np.bool_),
            "ENABLE_SAFETY_CHECKER": scalar_tensor(inp.enable_safety_checker, np.bool_),
            "CLIP_SKIP": scalar_tensor(inp.clip_skip, np.int32),
            "SCHEDULER": bytes_tensor(inp.scheduler or ""),
            "PREDICTION_TYPE": bytes_tensor(inp.prediction_type),
            "RESCALE_BETAS_SNR_ZERO": scalar_tensor(inp.rescale_betas_snr_zero, np.bool_),
            "ETA": scalar_tensor(inp.eta, np.float32),
            "TILE_WIDTH": scalar_tensor(inp.tile_width, np.int32),
            "TILE_HEIGHT": scalar_tensor(inp.tile_height, np.int32),
            "TILE_STRIDE_WIDTH": scalar_tensor(inp.tile_stride_width, np.int32),
            "TILE_STRIDE_HEIGHT": scalar_tensor(inp.tile_stride_height, np.int32),
            "OPTIONS": bytes_tensor(json.dumps(options)),
        }
        if blobs:
            tensors["LORA_FILES"] = np.array([blobs], dtype=np.object_)  # (1, n) safetensors bytes
        return tensors

    async def to_output(
        self, inp: LoraInput, seed: int, outputs: TritonTensors, store: ImageSink
    ) -> LoraOutput:
        images = outputs["IMAGES"][0]  # (1, N, H, W, 3) -> (N, H, W, 3)
        nsfw = outputs["NSFW"][0].astype(bool).tolist()
        stored = [await store(image, inp.image_format) for image in images]
        return LoraOutput(
            images=[s.image() for s in stored],
            seed=seed,
            has_nsfw_concepts=nsfw,
            debug_latents=None,
            debug_per_pass_latents=None,
        )
