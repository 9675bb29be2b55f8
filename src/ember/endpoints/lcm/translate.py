"""fal-ai/lcm request <-> the `lcm` Triton model's tensors (model_repository/lcm/config.pbtxt).

Order of defaults: the user's value, else the endpoint default written in the schema, else the
server's (the size of text-to-image when `image_size` is absent: 512x512).
"""

from __future__ import annotations

import json
import math
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
from ember.endpoints.lcm.schema import LcmInput, LcmOutput

DEFAULT_SIZE = (512, 512)

# lora_url together with controlnet_inpaint is served: the LoRA's UNet part is fused into the
# ControlNet-steered UNet export too (ember.pipeline.lcm_lora.LcmLoras.apply_controlled).


class LcmEndpoint(Endpoint[LcmInput]):
    endpoint_id = "fal-ai/lcm"
    triton_model = "lcm"
    input_model = LcmInput
    output_model = LcmOutput
    image_format = "jpeg"

    def check(self, inp: LcmInput) -> None:
        if inp.lora_url is not None:
            check_url(inp.lora_url, ("body", "lora_url"))
        if not math.isfinite(inp.lora_scale):
            raise InputError(("body", "lora_scale"), "lora_scale must be a finite number")
        if inp.mask_url is not None and inp.image_url is None:
            raise InputError(
                ("body", "mask_url"),
                "mask_url needs image_url: the mask marks the area of that image to fill",
                "value_error",
            )
        if inp.controlnet_inpaint and inp.mask_url is not None and inp.model != "sdv1-5":
            raise InputError(
                ("body", "controlnet_inpaint"),
                f"controlnet_inpaint is served for model='sdv1-5' only, not {inp.model!r}: its ControlNet "
                "(lllyasviel/control_v11p_sd15_inpaint) is an SD1.5 network",
                "not_supported",
            )
        resolve_image_size(inp.image_size, DEFAULT_SIZE)

    async def load(self, inp: LcmInput, media: MediaLoader) -> Loaded:
        """image_url -> "image" (H, W, 3) uint8; mask_url -> "mask" (H, W) uint8, which must match it;
        lora_url -> "lora", the bytes of a checked .safetensors file (pickles refused)."""
        loaded: dict[str, Any] = {}
        if inp.lora_url is not None:
            loaded["lora"] = (await media.weights(inp.lora_url, ("body", "lora_url"))).data
        if inp.image_url is not None:
            loaded["image"] = await media.image(inp.image_url, ("body", "image_url"))
        if inp.mask_url is not None:
            mask = await media.image(inp.mask_url, ("body", "mask_url"), mode="L")
            if mask.shape != loaded["image"].shape[:2]:
                raise InputError(
                    ("body", "mask_url"),
                    f"the mask is {mask.shape[1]}x{mask.shape[0]} but the image is "
                    f"{loaded['image'].shape[1]}x{loaded['image'].shape[0]}: they must have the same size",
                )
            loaded["mask"] = mask
        return loaded

    def notes(self, inp: LcmInput) -> list[str]:
        notes = []
        if inp.image_url is None and (inp.inpaint_mask_only or inp.controlnet_inpaint):
            notes.append("inpaint_mask_only / controlnet_inpaint only take effect with image_url + mask_url")
        elif inp.mask_url is None and inp.inpaint_mask_only:
            notes.append("inpaint_mask_only only takes effect for inpainting (with mask_url)")
        if inp.negative_prompt:
            notes.append(
                "negative_prompt is not used by a distilled LCM UNet (guidance is embedded, as in "
                "diffusers' LatentConsistencyModelPipeline)"
            )
        return notes

    def to_triton(self, inp: LcmInput, seed: int, loaded: Loaded | None = None) -> TritonTensors:
        loaded = loaded or {}
        tensors = {
            "PROMPT": bytes_tensor(inp.prompt),
            "NEGATIVE_PROMPT": bytes_tensor(inp.negative_prompt),
            "SEED": scalar_tensor(seed, np.int64),
            "NUM_IMAGES": scalar_tensor(inp.num_images, np.int32),
            "NUM_INFERENCE_STEPS": scalar_tensor(inp.num_inference_steps, np.int32),
            "GUIDANCE_SCALE": scalar_tensor(inp.guidance_scale, np.float32),
            "MODEL": bytes_tensor(inp.model),
            "ENABLE_SAFETY_CHECKS": scalar_tensor(inp.enable_safety_checks, np.bool_),
        }
        # Without image_size: text-to-image is 512 x 512, image modes take the input image's size
        # (the model fits it within 1024 px), so no WIDTH / HEIGHT is sent for them.
        if inp.image_size is not None or "image" not in loaded:
            width, height = resolve_image_size(inp.image_size, DEFAULT_SIZE)
            tensors["WIDTH"] = scalar_tensor(width, np.int32)
            tensors["HEIGHT"] = scalar_tensor(height, np.int32)
        if "image" in loaded:
            tensors["IMAGE"] = np.ascontiguousarray(loaded["image"][None])  # (1, H, W, 3) uint8
            tensors["STRENGTH"] = scalar_tensor(inp.strength, np.float32)
        if "mask" in loaded:
            tensors["MASK"] = np.ascontiguousarray(loaded["mask"][None])  # (1, H, W) uint8
            tensors["INPAINT_MASK_ONLY"] = scalar_tensor(inp.inpaint_mask_only, np.bool_)
            tensors["CONTROLNET_INPAINT"] = scalar_tensor(inp.controlnet_inpaint, np.bool_)
        if "lora" in loaded:
            tensors["LORA"] = np.array([[loaded["lora"]]], dtype=np.object_)  # (1, 1) safetensors bytes
            tensors["LORA_SCALE"] = scalar_tensor(inp.lora_scale, np.float32)
        return tensors

    async def to_output(
        self, inp: LcmInput, seed: int, outputs: TritonTensors, store: ImageSink
    ) -> LcmOutput:
        images = outputs["IMAGES"][0]  # (1, N, H, W, 3) -> (N, H, W, 3)
        nsfw = outputs["NSFW"][0].astype(bool).tolist()
        timings = json.loads(outputs["TIMINGS"].reshape(-1)[0])
        stored = [await store(image, self.image_format) for image in images]
        return LcmOutput(
            images=[s.simple() for s in stored],
            timings={k: float(v) for k, v in timings.items()},
            seed=seed,
            num_inference_steps=inp.num_inference_steps,
            request_id=inp.request_id,
            nsfw_content_detected=nsfw,
        )
