"""fal-ai/illusion-diffusion request <-> the `illusion_diffusion` Triton model's tensors
(model_repository/illusion_diffusion/config.pbtxt).

Order of defaults: the user's value, else the endpoint default written in the schema (every field has
one; image_size "square_hd" = 1024 x 1024). The control image is fetched when the job starts and sent
as decoded pixels; the model resizes it to the output size (as diffusers' control image processor).
"""

from __future__ import annotations

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
from ember.endpoints.illusion_diffusion.schema import IllusionDiffusionInput, IllusionDiffusionOutput

DEFAULT_SIZE = (1024, 1024)


class IllusionDiffusionEndpoint(Endpoint[IllusionDiffusionInput]):
    endpoint_id = "fal-ai/illusion-diffusion"
    triton_model = "illusion_diffusion"
    input_model = IllusionDiffusionInput
    output_model = IllusionDiffusionOutput
    image_format = "png"  # fal's example output is image/png

    def check(self, inp: IllusionDiffusionInput) -> None:
        check_url(inp.image_url, ("body", "image_url"))
        if inp.control_guidance_start >= inp.control_guidance_end:
            # diffusers refuses it too ("control guidance start ... cannot be larger or equal to ... end")
            raise InputError(
                ("body", "control_guidance_start"),
                f"control_guidance_start ({inp.control_guidance_start}) must be below control_guidance_end "
                f"({inp.control_guidance_end})",
                "value_error",
            )
        resolve_image_size(inp.image_size, DEFAULT_SIZE)

    async def load(self, inp: IllusionDiffusionInput, media: MediaLoader) -> Loaded:
        """image_url -> "image" (H, W, 3) uint8, the control pattern."""
        return {"image": await media.image(inp.image_url, ("body", "image_url"))}

    def notes(self, inp: IllusionDiffusionInput) -> list[str]:
        if inp.num_inference_steps == 0:
            return ["num_inference_steps=0: no denoising step runs; the image is the decoded initial noise"]
        return []

    def to_triton(self, inp: IllusionDiffusionInput, seed: int, loaded: Loaded | None = None) -> TritonTensors:
        if not loaded or "image" not in loaded:
            raise InputError(("body", "image_url"), "the control image was not loaded", "missing")
        width, height = resolve_image_size(inp.image_size, DEFAULT_SIZE)
        return {
            "PROMPT": bytes_tensor(inp.prompt),
            "NEGATIVE_PROMPT": bytes_tensor(inp.negative_prompt),
            "SEED": scalar_tensor(seed, np.int64),
            "CONTROL_IMAGE": np.ascontiguousarray(loaded["image"][None]),  # (1, H, W, 3) uint8
            "GUIDANCE_SCALE": scalar_tensor(inp.guidance_scale, np.float32),
            "CONTROLNET_CONDITIONING_SCALE": scalar_tensor(inp.controlnet_conditioning_scale, np.float32),
            "CONTROL_GUIDANCE_START": scalar_tensor(inp.control_guidance_start, np.float32),
            "CONTROL_GUIDANCE_END": scalar_tensor(inp.control_guidance_end, np.float32),
            "SCHEDULER": bytes_tensor(inp.scheduler),
            "NUM_INFERENCE_STEPS": scalar_tensor(inp.num_inference_steps, np.int32),
            "WIDTH": scalar_tensor(width, np.int32),
            "HEIGHT": scalar_tensor(height, np.int32),
        }

    async def to_output(
        self, inp: IllusionDiffusionInput, seed: int, outputs: TritonTensors, store: ImageSink
    ) -> IllusionDiffusionOutput:
        image = outputs["IMAGES"][0][0]  # (1, 1, H, W, 3) -> (H, W, 3)
        stored = await store(image, self.image_format)
        return IllusionDiffusionOutput(image=stored.image(), seed=seed)
