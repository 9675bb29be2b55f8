"""The `sote_diffusion` Triton model's tensor contract, without Triton: typed inputs -> CascadeRequest."""

from __future__ import annotations

import numpy as np
import pytest

from ember.pipeline.sote_io import parse_sote_request
from ember.pipeline.stable_cascade import CascadeRequest

DEFAULTS = CascadeRequest(prompt="", seed=0)


def _never() -> bool:
    return False


def test_absent_optional_inputs_take_fals_defaults() -> None:
    arrays = {"PROMPT": np.array([[b"a cat"]], dtype=np.object_), "SEED": np.array([[5]], dtype=np.int64)}
    req = parse_sote_request(arrays, DEFAULTS, _never)
    assert (req.prompt, req.seed, req.negative_prompt) == ("a cat", 5, "")
    assert (req.width, req.height) == (1024, 1536)
    assert (req.num_inference_steps, req.second_stage_steps) == (25, 10)
    assert (req.guidance_scale, req.second_stage_guidance_scale) == (8.0, 2.0)
    assert req.enable_safety_checker is True and req.num_images == 1


def test_every_typed_input_is_read() -> None:
    arrays = {
        "PROMPT": np.array([["ü".encode()]], dtype=np.object_),
        "NEGATIVE_PROMPT": np.array([[b"fog"]], dtype=np.object_),
        "SEED": np.array([[2**62]], dtype=np.int64),
        "NUM_IMAGES": np.array([[3]], dtype=np.int32),
        "FIRST_STAGE_STEPS": np.array([[7]], dtype=np.int32),
        "SECOND_STAGE_STEPS": np.array([[6]], dtype=np.int32),
        "GUIDANCE_SCALE": np.array([[4.5]], dtype=np.float32),
        "SECOND_STAGE_GUIDANCE_SCALE": np.array([[1.5]], dtype=np.float32),
        "WIDTH": np.array([[768]], dtype=np.int32),
        "HEIGHT": np.array([[512]], dtype=np.int32),
        "ENABLE_SAFETY_CHECKER": np.array([[False]], dtype=np.bool_),
    }
    req = parse_sote_request(arrays, DEFAULTS, _never)
    assert (req.prompt, req.negative_prompt, req.seed, req.num_images) == ("ü", "fog", 2**62, 3)
    assert (req.num_inference_steps, req.second_stage_steps, req.width, req.height) == (7, 6, 768, 512)
    assert (req.guidance_scale, req.second_stage_guidance_scale) == (4.5, 1.5)
    assert req.enable_safety_checker is False


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"SEED": np.array([[1]], dtype=np.int64)}, "PROMPT is required"),
        ({"PROMPT": np.array([[b"x"]], dtype=np.object_)}, "SEED is required"),
        (
            {"PROMPT": np.array([[b"x"], [b"y"]], dtype=np.object_), "SEED": np.array([[1]], dtype=np.int64)},
            "one value per request",
        ),
    ],
)
def test_bad_inputs_name_themselves(arrays: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sote_request(arrays, DEFAULTS, _never)
