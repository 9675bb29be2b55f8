"""fal-ai/illusion-diffusion: schema defaults, translation to the Triton tensors and back (no Triton)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from ember.endpoints.common import InputError
from ember.endpoints.illusion_diffusion.schema import IllusionDiffusionInput
from ember.endpoints.illusion_diffusion.translate import IllusionDiffusionEndpoint
from ember.pipeline.illusion_io import IllusionDefaults, parse_illusion_request

PATTERN = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)


def test_defaults_are_fals() -> None:
    inp = IllusionDiffusionInput(image_url="https://example.com/p.png", prompt="x")
    assert (inp.guidance_scale, inp.controlnet_conditioning_scale) == (7.5, 1)
    assert (inp.control_guidance_start, inp.control_guidance_end) == (0, 1)
    assert (inp.scheduler, inp.num_inference_steps, inp.image_size, inp.seed) == ("Euler", 40, "square_hd", None)


@pytest.mark.parametrize(
    "change",
    [{"image_url": None}, {"scheduler": "euler"}, {"num_inference_steps": -1}, {"num_inference_steps": 81},
     {"guidance_scale": 50.5}, {"control_guidance_start": -0.1}, {"controlnet_conditioning_scale": float("nan")}],
)
def test_schema_refuses(change: dict) -> None:
    body = {"image_url": "https://example.com/p.png", "prompt": "x", **change}
    with pytest.raises(ValidationError):
        IllusionDiffusionInput.model_validate({k: v for k, v in body.items() if v is not None})


def test_start_after_end_is_refused_at_the_field() -> None:
    inp = IllusionDiffusionInput(image_url="https://e.com/p.png", prompt="x", control_guidance_start=0.5,
                                 control_guidance_end=0.5)
    with pytest.raises(InputError) as info:
        IllusionDiffusionEndpoint().check(inp)
    assert info.value.loc == ("body", "control_guidance_start")


def test_round_trip_to_the_pipeline_request() -> None:
    inp = IllusionDiffusionInput(
        image_url="https://e.com/p.png", prompt="castle", negative_prompt="blurry", guidance_scale=3,
        controlnet_conditioning_scale=1.3, control_guidance_start=0.1, control_guidance_end=0.9,
        scheduler="DPM++ Karras SDE", num_inference_steps=0, image_size="landscape_16_9",
    )
    tensors = IllusionDiffusionEndpoint().to_triton(inp, 42, {"image": PATTERN})
    request = parse_illusion_request(tensors, IllusionDefaults(), lambda: False)
    assert (request.prompt, request.negative_prompt, request.seed) == ("castle", "blurry", 42)
    assert (request.width, request.height) == (1024, 576)
    assert request.scheduler == "DPM++ Karras SDE" and request.num_inference_steps == 0
    assert request.guidance_scale == 3 and request.controlnet_conditioning_scale == pytest.approx(1.3)
    assert (request.control_guidance_start, request.control_guidance_end) == pytest.approx((0.1, 0.9))
    assert np.array_equal(request.control_image, PATTERN)


def test_direct_triton_clients_get_the_defaults() -> None:
    arrays = {"PROMPT": np.array([[b"x"]], dtype=object), "SEED": np.array([[1]], np.int64),
              "CONTROL_IMAGE": PATTERN[None]}
    request = parse_illusion_request(arrays, IllusionDefaults(), lambda: False)
    assert (request.scheduler, request.num_inference_steps, request.width, request.guidance_scale) == (
        "Euler", 40, 1024, 7.5)
    with pytest.raises(ValueError, match="CONTROL_IMAGE"):
        parse_illusion_request({**arrays, "CONTROL_IMAGE": None}, IllusionDefaults(), lambda: False)
