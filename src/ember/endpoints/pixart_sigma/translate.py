"""fal-ai/pixart-sigma request <-> the `pixart_sigma` Triton model's tensors
(model_repository/pixart_sigma/config.pbtxt).

Order of defaults: the user's value, else the endpoint default written in the schema (every field of this
endpoint has one, so the Triton model's own defaults matter only to direct Triton clients).
"""

from __future__ import annotations

import json

import numpy as np

from ember.endpoints.base import Endpoint, ImageSink, Loaded, TritonTensors, bytes_tensor, scalar_tensor
from ember.endpoints.common import IMAGE_SIZE_PRESETS, InputError, resolve_image_size
from ember.endpoints.pixart_sigma.schema import PixArtSigmaInput, PixArtSigmaOutput

DEFAULT_SIZE = IMAGE_SIZE_PRESETS["square_hd"]
# The DiT patchifies 2 x 2 latent pixels of 8 x 8 image pixels: sides must be multiples of 16. fal's schema
# says nothing about it; diffusers would bin the size to a trained aspect ratio and resize, which this
# server does not do, so it refuses such sizes by name instead (ember.pipeline.pixart_sigma).
SIDE_MULTIPLE = 16
MIN_SIDE, MAX_SIDE = 64, 2048


class PixArtSigmaEndpoint(Endpoint[PixArtSigmaInput]):
    endpoint_id = "fal-ai/pixart-sigma"
    triton_model = "pixart_sigma"
    input_model = PixArtSigmaInput
    output_model = PixArtSigmaOutput
    image_format = "png"  # fal's example output: "content_type": "image/png"

    def check(self, inp: PixArtSigmaInput) -> None:
        width, height = resolve_image_size(inp.image_size, DEFAULT_SIZE, multiple_of=SIDE_MULTIPLE)
        for name, side in (("width", width), ("height", height)):
            if not MIN_SIDE <= side <= MAX_SIDE:
                raise InputError(
                    ("body", "image_size", name), f"{name} must be from {MIN_SIDE} to {MAX_SIDE}, got {side}"
                )

    def to_triton(self, inp: PixArtSigmaInput, seed: int, loaded: Loaded | None = None) -> TritonTensors:
        width, height = resolve_image_size(inp.image_size, DEFAULT_SIZE, multiple_of=SIDE_MULTIPLE)
        return {
            "PROMPT": bytes_tensor(inp.prompt),
            "NEGATIVE_PROMPT": bytes_tensor(inp.negative_prompt),
            "SEED": scalar_tensor(seed, np.int64),
            "NUM_IMAGES": scalar_tensor(inp.num_images, np.int32),
            "NUM_INFERENCE_STEPS": scalar_tensor(inp.num_inference_steps, np.int32),
            "GUIDANCE_SCALE": scalar_tensor(inp.guidance_scale, np.float32),
            "WIDTH": scalar_tensor(width, np.int32),
            "HEIGHT": scalar_tensor(height, np.int32),
            "STYLE": bytes_tensor(inp.style),
            "SCHEDULER": bytes_tensor(inp.scheduler),
            "ENABLE_SAFETY_CHECKER": scalar_tensor(inp.enable_safety_checker, np.bool_),
        }

    async def to_output(
        self, inp: PixArtSigmaInput, seed: int, outputs: TritonTensors, store: ImageSink
    ) -> PixArtSigmaOutput:
        images = outputs["IMAGES"][0]  # (1, N, H, W, 3) -> (N, H, W, 3)
        nsfw = outputs["NSFW"][0].astype(bool).tolist()
        timings = json.loads(outputs["TIMINGS"].reshape(-1)[0])
        stored = [await store(image, self.image_format) for image in images]
        return PixArtSigmaOutput(
            images=[s.image() for s in stored],
            timings={k: float(v) for k, v in timings.items()},
            seed=seed,
            has_nsfw_concepts=nsfw,
            # The user's prompt as sent; the style template is applied inside the model.
            prompt=inp.prompt,
        )
