"""fal-ai/stable-cascade/sote-diffusion request <-> the `sote_diffusion` Triton model's tensors
(model_repository/sote_diffusion/config.pbtxt).

Order of defaults: the user's value, else the endpoint default written in the schema (every field has one:
1024 x 1536, 25 + 10 steps, guidance 8 and 2, safety checker on), so the Triton model's own defaults matter
only to direct Triton clients.
"""

from __future__ import annotations

import json

import numpy as np

from ember.endpoints.base import Endpoint, ImageSink, Loaded, TritonTensors, bytes_tensor, scalar_tensor
from ember.endpoints.common import InputError, resolve_image_size
from ember.endpoints.sote_diffusion.schema import SoteDiffusionInput, SoteDiffusionOutput

DEFAULT_SIZE = (1024, 1536)  # (width, height), fal's default
# Stable Cascade scales the size by ceil(px / 42.67) for stage C and x10.67 for stage B, then the VQGAN x4:
# only multiples of 128 px come back at the size asked for (576 px would give 596). diffusers renders
# whatever that arithmetic gives; this server refuses other sizes by name instead of returning a size the
# client did not ask for. That includes fal's 16:9 presets (576 px sides). Same rule in
# ember.pipeline.stable_cascade, which the gateway must not import (no torch here).
SIDE_MULTIPLE = 128
MIN_SIDE, MAX_SIDE = 256, 2048


class SoteDiffusionEndpoint(Endpoint[SoteDiffusionInput]):
    endpoint_id = "fal-ai/stable-cascade/sote-diffusion"
    triton_model = "sote_diffusion"
    input_model = SoteDiffusionInput
    output_model = SoteDiffusionOutput
    image_format = "jpeg"  # SimpleImage, content_type "image/jpeg" (fal's example output)

    def size(self, inp: SoteDiffusionInput) -> tuple[int, int]:
        """(width, height), checked against Stable Cascade's size rule; InputError names the field."""
        width, height = resolve_image_size(inp.image_size, DEFAULT_SIZE, multiple_of=SIDE_MULTIPLE)
        for name, side in (("width", width), ("height", height)):
            if side % SIDE_MULTIPLE or not MIN_SIDE <= side <= MAX_SIDE:
                raise InputError(
                    ("body", "image_size")
                    if isinstance(inp.image_size, str)
                    else ("body", "image_size", name),
                    f"{name} must be a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE} for Stable "
                    f"Cascade, got {side} (image_size {inp.image_size!r}); e.g. 1024x1536, 1024x1024, 768x1024",
                )
        return width, height

    def check(self, inp: SoteDiffusionInput) -> None:
        self.size(inp)

    def to_triton(self, inp: SoteDiffusionInput, seed: int, loaded: Loaded | None = None) -> TritonTensors:
        width, height = self.size(inp)
        return {
            "PROMPT": bytes_tensor(inp.prompt),
            "NEGATIVE_PROMPT": bytes_tensor(inp.negative_prompt),
            "SEED": scalar_tensor(seed, np.int64),
            "NUM_IMAGES": scalar_tensor(inp.num_images, np.int32),
            "FIRST_STAGE_STEPS": scalar_tensor(inp.first_stage_steps, np.int32),
            "SECOND_STAGE_STEPS": scalar_tensor(inp.second_stage_steps, np.int32),
            "GUIDANCE_SCALE": scalar_tensor(inp.guidance_scale, np.float32),
            "SECOND_STAGE_GUIDANCE_SCALE": scalar_tensor(inp.second_stage_guidance_scale, np.float32),
            "WIDTH": scalar_tensor(width, np.int32),
            "HEIGHT": scalar_tensor(height, np.int32),
            "ENABLE_SAFETY_CHECKER": scalar_tensor(inp.enable_safety_checker, np.bool_),
        }

    async def to_output(
        self, inp: SoteDiffusionInput, seed: int, outputs: TritonTensors, store: ImageSink
    ) -> SoteDiffusionOutput:
        images = outputs["IMAGES"][0]  # (1, N, H, W, 3) -> (N, H, W, 3)
        nsfw = outputs["NSFW"][0].astype(bool).tolist()
        timings = json.loads(outputs["TIMINGS"].reshape(-1)[0])
        stored = [await store(image, self.image_format) for image in images]
        return SoteDiffusionOutput(
            images=[s.simple() for s in stored],
            timings={k: float(v) for k, v in timings.items()},
            seed=seed,
            has_nsfw_concepts=nsfw,
            prompt=inp.prompt,
        )
