"""The lcm Triton model's tensor contract, without Triton: parsing, defaults, validation, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ember.pipeline import Text2ImageRequest, Text2ImageResult, check_request
from ember.pipeline.lcm_io import LcmDefaults, parse_lcm_request, progress_arrays, result_arrays


def _never() -> bool:
    return False


def _arrays(**values) -> dict[str, np.ndarray]:
    """Inputs as Triton hands them to the model: shape (1, 1), with the batch dimension."""
    types = {
        "PROMPT": np.object_,
        "NEGATIVE_PROMPT": np.object_,
        "SEED": np.int64,
        "GUIDANCE_SCALE": np.float32,
    }
    return {name: np.array([[value]], dtype=types.get(name, np.int32)) for name, value in values.items()}


def test_parse_with_server_defaults() -> None:
    request = parse_lcm_request(_arrays(PROMPT=b"a cat", SEED=7), LcmDefaults(), _never)
    # 512 x 512, 4 steps, guidance 1, 1 image, text-to-image, safety checks on (fal's default)
    assert request == Text2ImageRequest(prompt="a cat", seed=7, enable_safety_checks=True)


def test_parse_every_input() -> None:
    arrays = _arrays(
        PROMPT="un chat é".encode(),
        NEGATIVE_PROMPT=b"blurry",
        SEED=2**40,
        NUM_IMAGES=2,
        NUM_INFERENCE_STEPS=6,
        GUIDANCE_SCALE=7.5,
        WIDTH=768,
        HEIGHT=576,
    )
    request = parse_lcm_request(arrays, LcmDefaults(), _never)
    assert (request.prompt, request.negative_prompt, request.seed) == ("un chat é", "blurry", 2**40)
    assert (request.num_images, request.num_inference_steps, request.guidance_scale) == (2, 6, 7.5)
    assert (request.width, request.height) == (768, 576)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (_arrays(SEED=1), "PROMPT is required"),
        (_arrays(PROMPT=b"x"), "SEED is required"),
        (
            {**_arrays(SEED=1), "PROMPT": np.array([[b"a"], [b"b"]], dtype=np.object_)},
            "one value per request",
        ),
        (_arrays(PROMPT=b"\xff", SEED=1), "PROMPT is not valid UTF-8"),
    ],
)
def test_parse_errors_name_the_input(arrays, message) -> None:
    with pytest.raises(ValueError, match=message):
        parse_lcm_request(arrays, LcmDefaults(), _never)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"width": 60}, "width"),
        ({"height": 2048}, "height"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_images": 9}, "num_images"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
    ],
)
def test_check_request_names_the_field(change, field) -> None:
    problems = check_request(Text2ImageRequest(prompt="x", seed=0, **change))
    assert len(problems) == 1 and problems[0].startswith(field)


def test_pipeline_refuses_invalid_requests(ort_pipeline) -> None:
    with pytest.raises(ValueError, match="width"):
        ort_pipeline([Text2ImageRequest(prompt="x", seed=0, width=100)])


def test_output_arrays_carry_the_batch_dimension() -> None:
    images = torch.zeros(2, 64, 32, 3, dtype=torch.uint8)
    out = result_arrays(Text2ImageResult(images=images, nsfw=[False, False], timings={"total": 0.5}))
    assert out["IMAGES"].shape == (1, 2, 64, 32, 3) and out["IMAGES"].dtype == np.uint8
    assert out["NSFW"].tolist() == [[False, False]]
    assert json.loads(out["TIMINGS"][0, 0]) == {"total": 0.5}
    assert progress_arrays(3, 4)["PROGRESS"].tolist() == [[3, 4]]


def test_parse_image_modes() -> None:
    image = np.zeros((1, 40, 56, 3), np.uint8)
    mask = np.full((1, 40, 56), 255, np.uint8)
    arrays = {
        **_arrays(PROMPT=b"x", SEED=1),
        "IMAGE": image,
        "MASK": mask,
        "STRENGTH": np.array([[0.5]], np.float32),
        "INPAINT_MASK_ONLY": np.array([[True]]),
        "CONTROLNET_INPAINT": np.array([[True]]),
        "ENABLE_SAFETY_CHECKS": np.array([[False]]),
        "MODEL": np.array([[b"sdv1-5"]], dtype=np.object_),
    }
    request = parse_lcm_request(arrays, LcmDefaults(), _never)
    assert request.mode == "inpaint" and request.strength == 0.5 and request.inpaint_mask_only
    assert request.controlnet_inpaint
    assert not parse_lcm_request(_arrays(PROMPT=b"x", SEED=1), LcmDefaults(), _never).controlnet_inpaint
    assert not request.enable_safety_checks and request.model == "sdv1-5"
    assert (request.width, request.height) == (None, None)  # the image's size, resolved by the pipeline
    assert request.image.shape == (40, 56, 3) and request.mask.shape == (40, 56)
    sized = parse_lcm_request({**arrays, **_arrays(WIDTH=64, HEIGHT=64)}, LcmDefaults(), _never)
    assert (sized.width, sized.height) == (64, 64)
    with pytest.raises(ValueError, match="IMAGE must be uint8"):
        parse_lcm_request({**arrays, "IMAGE": image[0]}, LcmDefaults(), _never)
