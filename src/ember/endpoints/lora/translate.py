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
from ember.endpoints.common import InputError, check_url, media_tensor, resolve_image_size
from ember.endpoints.lora.controlnets import check_controlnets, load_controlnets
from ember.endpoints.lora.debug_latents import check_debug_latents, debug_options, store_debug_latents
from ember.endpoints.lora.embeddings import check_embeddings, embedding_options, load_embeddings
from ember.endpoints.lora.ic_light import SD15_ONLY, check_ic_light, ic_light_option, load_ic_light
from ember.endpoints.lora.ip_adapter import check_ip_adapter, load_ip_adapter
from ember.endpoints.lora.schema import LoraInput, LoraOutput

DEFAULT_SIZE = (1024, 1024)  # square_hd
_NOT_YET = "is not supported yet by this server"
# An HF repo id: "owner/name" (letters, digits, - _ .), nothing path-like.
_HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _model_root() -> Path:
    from ember.settings import get_settings

    return get_settings().lora_models_dir.resolve()


def check_model_name(value: str, loc: tuple[str, ...], root: Path, single_file: bool = False) -> None:
    """model_name / unet_name: an HF id, or a local directory under the allowed root (EMBER_LORA_MODEL_ROOT)
    and nowhere else. `single_file`: also an http(s)/data: URL of a single-file .safetensors checkpoint
    (model_name) or UNet (unet_name), fetched by Endpoint.load, or such a file under the root. SDXL
    directories are served (ember.pipeline.lora_xl); check_sdxl_fields refuses what they do not serve yet."""
    if value.startswith(("http://", "https://", "data:")):
        if not single_file:
            raise InputError(
                loc, f"single-file checkpoint URLs {_NOT_YET} here; use a Hugging Face id", "not_supported"
            )
        check_url(value, loc)
        return
    if value.startswith(("/", "~", ".")) or "\\" in value:
        path = Path(value).expanduser().resolve()
        if not path.is_relative_to(root):
            raise InputError(loc, f"local models must be directories under {root}", "path_not_allowed")
        if single_file and path.suffix == ".safetensors" and path.is_file():
            return
        if not path.is_dir():
            raise InputError(loc, f"{value} is not a model directory under {root}", "path_not_found")
        return
    if not _HF_ID.match(value) or ".." in value:
        raise InputError(loc, "must be a Hugging Face id (owner/name) or a directory under the model root")


def check_sdxl_fields(inp: LoraInput, root: Path) -> None:
    """A local SDXL base model (its model_index.json names a second text encoder) runs as
    StableDiffusionXLPipeline (ember.pipeline.lora_xl), which serves every field but IC-Light (its offset
    files are for the SD1.5 UNet): refused here by name; the Triton side refuses it again (and for HF ids
    resolved there)."""
    value = inp.model_name
    if value.startswith(("http://", "https://", "data:")) or not value.startswith(("/", "~", ".")):
        return  # single files are told apart by the Triton side; HF ids are resolved there
    try:
        index = json.loads((Path(value).expanduser().resolve() / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not a pipeline directory: the Triton side says what is wrong with it
    if "text_encoder_2" not in index:
        return
    if inp.ic_light_model_url is not None:  # not a gap: IC-Light files are offsets for the SD1.5 UNet
        raise InputError(("body", "ic_light_model_url"), f"{SD15_ONLY} ({value} is SDXL)", "not_supported")


class LoraEndpoint(Endpoint[LoraInput]):
    endpoint_id = "fal-ai/lora"
    triton_model = "lora"
    input_model = LoraInput
    output_model = LoraOutput

    def check(self, inp: LoraInput) -> None:
        root = _model_root()
        check_model_name(inp.model_name, ("body", "model_name"), root, single_file=True)
        check_sdxl_fields(inp, root)
        if inp.unet_name is not None:  # a UNet directory / HF id, or a single-file UNet (URL or .safetensors)
            single = inp.unet_name.startswith(("http://", "https://", "data:")) or inp.unet_name.endswith(
                ".safetensors"
            )
            check_model_name(inp.unet_name, ("body", "unet_name"), root, single_file=single)
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
        check_controlnets(inp, root, check_model_name)
        check_embeddings(inp)
        check_ip_adapter(inp, root, check_model_name)
        check_ic_light(inp)
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
        check_debug_latents(inp, DEFAULT_SIZE)

    async def load(self, inp: LoraInput, media: MediaLoader) -> Loaded:
        """Each LoRA file, fetched and checked as safetensors (pickles refused) by the gateway."""
        files = [
            await media.weights(lora.path, ("body", "loras", i, "path")) for i, lora in enumerate(inp.loras)
        ]
        media_arrays: list[np.ndarray] = []  # MEDIA, in the order OPTIONS indexes it
        controlnets = await load_controlnets(inp, media, media_arrays)
        ip_adapter = await load_ip_adapter(inp, media, media_arrays)  # images, masks, URL weights
        ic_light = await load_ic_light(inp, media, media_arrays)  # offset file, foreground, background
        loaded: dict[str, Any] = {}
        if inp.model_name.startswith(("http://", "https://", "data:")):  # streamed to disk, sent as its path
            loaded["model_name"] = await media.checkpoint(inp.model_name, ("body", "model_name"))
        if inp.unet_name is not None and inp.unet_name.startswith(("http://", "https://", "data:")):  # UNet file
            loaded["unet_name"] = await media.checkpoint(inp.unet_name, ("body", "unet_name"), kind="unet")
        return {
            **loaded,
            "lora_files": [f.data for f in files],
            "media": media_arrays,
            "controlnets": controlnets,
            "embedding_files": await load_embeddings(inp, media),
            "ip_adapter": ip_adapter,
            "ic_light": ic_light,
        }

    def to_triton(self, inp: LoraInput, seed: int, loaded: Loaded | None = None) -> TritonTensors:
        width, height = resolve_image_size(inp.image_size, DEFAULT_SIZE)
        blobs = list((loaded or {}).get("lora_files", []))
        controlnets = list((loaded or {}).get("controlnets", []))  # OPTIONS entries, images in MEDIA
        if len(controlnets) != len(inp.controlnets):
            raise ValueError("controlnets were not loaded: Endpoint.load must run before to_triton")
        if inp.ip_adapter and not (loaded or {}).get("ip_adapter"):  # its images and weights ride in MEDIA
            raise ValueError("ip_adapter was not loaded: Endpoint.load must run before to_triton")
        options = {
            "loras": [{"file": i, "scale": lora.scale} for i, lora in enumerate(inp.loras)],
            "timesteps": inp.timesteps.array if inp.timesteps and inp.timesteps.method == "array" else None,
            "sigmas": inp.sigmas.array if inp.sigmas and inp.sigmas.method == "array" else None,
            **debug_options(inp),
            "controlnets": controlnets,
            "controlnet_guess_mode": inp.controlnet_guess_mode,
            "ip_adapter": (loaded or {}).get("ip_adapter"),
        }
        # Textual-inversion files ride in LORA_FILES after the LoRAs.
        embedding_files = list((loaded or {}).get("embedding_files", []))
        if len(embedding_files) != len(inp.embeddings):
            raise ValueError("embeddings were not loaded: Endpoint.load must run before to_triton")
        options["embeddings"] = embedding_options(inp, len(blobs))
        blobs += embedding_files
        if inp.ic_light_model_url and not (loaded or {}).get("ic_light"):
            raise ValueError("ic_light was not loaded: Endpoint.load must run before to_triton")
        options["ic_light"] = ic_light_option((loaded or {}).get("ic_light"))  # a path, never bytes
        tensors = {
            "MODEL_NAME": bytes_tensor((loaded or {}).get("model_name", inp.model_name)),
            "VARIANT": bytes_tensor(inp.variant or ""),
            "UNET_NAME": bytes_tensor((loaded or {}).get("unet_name", inp.unet_name or "")),
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
        media_arrays = list((loaded or {}).get("media", []))
        if media_arrays:
            tensors["MEDIA"] = media_tensor(media_arrays)  # (1, m) .npy blobs
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
            **await store_debug_latents(inp, outputs, store),
        )
