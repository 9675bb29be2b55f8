"""A test-only endpoint with every kind of URL input (image, mask, weights), registered into ENDPOINTS
by the `echo_endpoint` fixture: it drives the shared MediaLoader path exactly as a real endpoint's
translate code does, and remembers what it loaded."""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from ember.endpoints.base import (
    Endpoint,
    ImageSink,
    Loaded,
    MediaLoader,
    TritonTensors,
    bytes_tensor,
    scalar_tensor,
)
from ember.endpoints.common import SimpleImage, check_url


class EchoInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    prompt: str
    image_url: str | None = None
    mask_url: str | None = None
    lora_url: str | None = None
    seed: int | None = None


class EchoOutput(BaseModel):
    images: list[SimpleImage]
    seed: int


class EchoEndpoint(Endpoint[EchoInput]):
    endpoint_id = "ember-test/echo"
    triton_model = "lcm"
    input_model = EchoInput
    output_model = EchoOutput

    def __init__(self) -> None:
        self.loaded: list[dict[str, Any]] = []

    def check(self, inp: EchoInput) -> None:
        for name in ("image_url", "mask_url", "lora_url"):
            check_url(getattr(inp, name), ("body", name))

    async def load(self, inp: EchoInput, media: MediaLoader) -> Loaded:
        loaded: dict[str, Any] = {}
        if inp.image_url:
            loaded["image"] = await media.image(inp.image_url, ("body", "image_url"))
        if inp.mask_url:
            loaded["mask"] = await media.image(inp.mask_url, ("body", "mask_url"), mode="L")
        if inp.lora_url:
            loaded["lora"] = await media.weights(inp.lora_url, ("body", "lora_url"))
        self.loaded.append(loaded)
        return loaded

    def to_triton(self, inp: EchoInput, seed: int, loaded: Loaded | None = None) -> TritonTensors:
        return {"PROMPT": bytes_tensor(inp.prompt), "SEED": scalar_tensor(seed, np.int64),
                "NUM_IMAGES": scalar_tensor(1, np.int32), "NUM_INFERENCE_STEPS": scalar_tensor(1, np.int32),
                "WIDTH": scalar_tensor(8, np.int32), "HEIGHT": scalar_tensor(8, np.int32)}

    async def to_output(self, inp: EchoInput, seed: int, outputs: TritonTensors, store: ImageSink) -> EchoOutput:
        stored = [await store(image, "png") for image in outputs["IMAGES"][0]]
        return EchoOutput(images=[s.simple() for s in stored], seed=seed)
