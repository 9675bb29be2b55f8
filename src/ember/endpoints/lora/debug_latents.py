"""fal-ai/lora's `debug_latents` / `debug_per_pass_latents`, gateway side: what the request asks the model for
(OPTIONS), a size limit checked at submit, and the model's LATENTS / PASS_LATENTS / PASS_TIMESTEPS outputs
(ember.pipeline.debug_latents) returned as fal File objects.

Each is one safetensors file (ember.endpoints.tensor_files; content_type application/octet-stream, name
`<random>.safetensors`), float32:
- debug_latents: tensor "latents" (num_images, 4, H/8, W/8), the denoised latents before the VAE, not divided
  by its scaling factor (what diffusers' StableDiffusionPipeline(output_type="latent") returns);
- debug_per_pass_latents: "latents" (passes, num_images, 4, H/8, W/8), the latents after every scheduler step
  (what diffusers' callback_on_step_end sees), and "timesteps" (passes,), the timestep of each pass.
Stored like the images, through the endpoint's sink: a URL on the gateway's file host (fal-ai/lora has
no sync_mode field; a sink in sync mode would inline it as a data URI).
"""

from __future__ import annotations

from ember.endpoints.base import ImageSink, TritonTensors
from ember.endpoints.common import File, InputError, resolve_image_size
from ember.endpoints.lora.schema import LoraInput
from ember.endpoints.tensor_files import SAFETENSORS_CONTENT_TYPE, SAFETENSORS_EXTENSION, safetensors_bytes

# The per-pass file grows with passes x images x pixels (1024 x 1024, 30 steps, 8 images: 62 MiB); it
# travels from Triton, is written, and with sync_mode inlined as base64 in the JSON. Past this, refuse.
MAX_PASS_LATENTS_BYTES = 256 * 1024 * 1024
LATENT_CHANNELS = 4  # SD1.5 and SDXL latents; the bound below is checked before the model is known
_LAYOUT = "latents before the VAE (not divided by vae.config.scaling_factor), float32"


def check_debug_latents(inp: LoraInput, default_size: tuple[int, int]) -> None:
    """422 at debug_per_pass_latents when its file would pass MAX_PASS_LATENTS_BYTES, saying what to lower."""
    if not inp.debug_per_pass_latents:
        return
    width, height = resolve_image_size(inp.image_size, default_size)
    override = inp.timesteps if inp.timesteps is not None and inp.timesteps.method == "array" else inp.sigmas
    steps = (
        len(override.array)
        if override is not None and override.method == "array"
        else inp.num_inference_steps
    )
    passes = steps + 1  # at most: PNDM, some base models' own scheduler, walks one timestep more
    size = passes * inp.num_images * LATENT_CHANNELS * (height // 8) * (width // 8) * 4
    if size > MAX_PASS_LATENTS_BYTES:
        raise InputError(
            ("body", "debug_per_pass_latents"),
            f"the per-pass latents would be {size / 2**20:.0f} MiB, more than this server returns "
            f"({MAX_PASS_LATENTS_BYTES // 2**20} MiB); lower num_images, num_inference_steps or image_size",
            "too_large",
        )


def debug_options(inp: LoraInput) -> dict[str, bool]:
    """The OPTIONS entries that make the lora model return the debug outputs."""
    return {"debug_latents": inp.debug_latents, "debug_per_pass_latents": inp.debug_per_pass_latents}


async def store_debug_latents(
    inp: LoraInput, outputs: TritonTensors, store: ImageSink
) -> dict[str, File | None]:
    """{"debug_latents": File | None, "debug_per_pass_latents": File | None} from the final response."""
    files: dict[str, File | None] = {"debug_latents": None, "debug_per_pass_latents": None}
    wanted = {
        "debug_latents": (inp.debug_latents, {"latents": "LATENTS"}),
        "debug_per_pass_latents": (
            inp.debug_per_pass_latents,
            {"latents": "PASS_LATENTS", "timesteps": "PASS_TIMESTEPS"},
        ),
    }
    for field, (asked, names) in wanted.items():
        if not asked:
            continue
        missing = [name for name in names.values() if name not in outputs]
        if missing:
            raise ValueError(f"{field} was asked for, but the lora model's response has no {missing}")
        tensors = {key: outputs[name][0] for key, name in names.items()}  # drop the batch dimension of 1
        data = safetensors_bytes(tensors, {"ember": field, "layout": _LAYOUT})
        stored = await store.file(data, SAFETENSORS_CONTENT_TYPE, SAFETENSORS_EXTENSION)
        files[field] = stored.file()
    return files
