"""fal-ai/lora schema and translation: fal's fields and defaults, refusals by field name, the tensors sent
to the `lora` Triton model, and the local-path rule for model_name."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from ember.endpoints.common import InputError
from ember.endpoints.lora.schema import LoraInput, LoraOutput
from ember.endpoints.lora.translate import LoraEndpoint, check_model_name
from ember.pipeline.schedulers import FAL_SCHEDULERS


def test_defaults_are_fals() -> None:
    inp = LoraInput(model_name="runwayml/stable-diffusion-v1-5", prompt="p")
    assert (inp.image_size, inp.num_inference_steps, inp.guidance_scale, inp.clip_skip) == (
        "square_hd",
        30,
        7.5,
        0,
    )
    assert (inp.image_format, inp.num_images, inp.enable_safety_checker, inp.prediction_type) == (
        "png",
        1,
        False,
        "epsilon",
    )
    assert (inp.tile_width, inp.tile_height, inp.tile_stride_width, inp.tile_stride_height) == (
        4096,
        4096,
        2048,
        2048,
    )
    assert inp.image_encoder_weight_name == "pytorch_model.bin" and inp.scheduler is None
    assert inp.model_dump()["loras"] == [] and inp.timesteps is None
    schema = LoraInput.model_json_schema()
    assert schema["required"] == ["model_name", "prompt"]
    assert LoraInput.model_validate(
        {"model_name": "a/b", "prompt": "p", "embeddings": [{"path": "https://x/e.safetensors"}]}
    ).embeddings[0].tokens == ["<s0>", "<s1>"]


def test_scheduler_enum_matches_the_mapping() -> None:
    enum = LoraInput.model_json_schema()["properties"]["scheduler"]["anyOf"][0]["enum"]
    # Every fal-ai/lora name has a diffusers mapping (other endpoints add their own names there too).
    assert len(enum) == 11 and set(enum) <= set(FAL_SCHEDULERS)


@pytest.mark.parametrize(
    "bad",
    [
        {"num_inference_steps": 0},
        {"guidance_scale": 21},
        {"clip_skip": 3},
        {"tile_width": 64},
        {"num_images": 9},
        {"eta": 1.5},
        {"loras": [{"path": "u", "scale": 5}]},
        {"scheduler": "Heun"},
    ],
)
def test_ranges(bad: dict) -> None:
    with pytest.raises(ValidationError):
        LoraInput.model_validate({"model_name": "a/b", "prompt": "p", **bad})


def test_output_always_serializes_debug_files() -> None:
    out = LoraOutput(images=[], seed=1, has_nsfw_concepts=[]).model_dump(mode="json")
    assert out["debug_latents"] is None and out["debug_per_pass_latents"] is None


def test_model_name_rule(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "m").mkdir(parents=True)
    check_model_name(str(root / "m"), ("body", "model_name"), root)
    check_model_name("runwayml/stable-diffusion-v1-5", ("body", "model_name"), root)
    for bad in (
        "/etc",
        str(root / ".." / "root2"),
        "../x",
        "~/.ssh",
        "a/b/c",
        "https://h/m.safetensors",
        "a\\b",
    ):
        with pytest.raises(InputError) as info:
            check_model_name(bad, ("body", "model_name"), root)
        assert info.value.loc == ("body", "model_name")


def test_unsupported_fields_are_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    endpoint = LoraEndpoint()
    base = {"model_name": "a/b", "prompt": "p"}
    # ic_light_* are served (tests/unit/test_lora_ic_light_io.py)
    # debug_latents / debug_per_pass_latents are served (tests/unit/test_lora_debug_latents_io.py)
    endpoint.check(LoraInput.model_validate({**base, "debug_latents": True, "debug_per_pass_latents": True}))
    # controlnets are served (tests/unit/test_lora_controlnets_schema.py)
    # ip_adapter / image_encoder_* are served (tests/unit/test_lora_ip_adapter_schema.py)
    # prompt_weighting's syntax and embeddings are served (tests/unit/test_lora_text_inputs.py)
    endpoint.check(LoraInput.model_validate({**base, "prompt_weighting": True, "prompt": "a (cat)1.3"}))
    endpoint.check(
        LoraInput.model_validate({**base, "prompt_weighting": True, "prompt": "a cat, silver hair"})
    )
    with pytest.raises(InputError):
        endpoint.check(
            LoraInput.model_validate(
                {
                    **base,
                    "timesteps": {"method": "array", "array": [999]},
                    "sigmas": {"method": "array", "array": [1.0]},
                }
            )
        )
    with pytest.raises(InputError):
        endpoint.check(LoraInput.model_validate({**base, "loras": [{"path": "/etc/passwd"}]}))


def test_to_triton_tensors() -> None:
    inp = LoraInput.model_validate(
        {
            "model_name": "a/b",
            "prompt": "p",
            "image_size": "landscape_4_3",
            "scheduler": "DDIM",
            "eta": 0.5,
            "loras": [{"path": "https://x/l.safetensors", "scale": 0.7}],
            "timesteps": {"method": "array", "array": [999, 500]},
            "sigmas": {"method": "default", "array": []},
        }
    )
    tensors = LoraEndpoint().to_triton(inp, 42, {"lora_files": [b"abc"]})
    assert tensors["WIDTH"].tolist() == [[1024]] and tensors["HEIGHT"].tolist() == [[768]]
    assert tensors["SCHEDULER"][0, 0] == b"DDIM" and tensors["SEED"].dtype == np.int64
    assert tensors["LORA_FILES"].shape == (1, 1)
    options = json.loads(tensors["OPTIONS"][0, 0])
    # Each feature adds its own OPTIONS keys (their own tests check them): these are the base ones.
    assert {name: options[name] for name in ("loras", "timesteps", "sigmas")} == {
        "loras": [{"file": 0, "scale": 0.7}],
        "timesteps": [999, 500],
        "sigmas": None,
    }
    assert options["controlnets"] == [] and options["controlnet_guess_mode"] is False
    assert all(t.shape[0] == 1 for t in tensors.values())


def test_translate_then_parse_round_trip(tmp_path: Path) -> None:
    """What the gateway sends is what the Triton model reads (every field; guards name drift)."""
    from ember.pipeline.lora_io import LoraFiles, parse_lora_request

    root = tmp_path / "models"
    (root / "m").mkdir(parents=True)
    (root / "m" / "model_index.json").write_text("{}")
    inp = LoraInput.model_validate(
        {
            "model_name": str(root / "m"),
            "variant": "fp16",
            "prompt": "p",
            "negative_prompt": "n",
            "prompt_weighting": True,
            "enable_safety_checker": True,
            "clip_skip": 2,
            "scheduler": "TCD",
            "eta": 0.25,
            "prediction_type": "v_prediction",
            "rescale_betas_snr_zero": True,
            "num_images": 3,
            "image_size": {"width": 640, "height": 384},
            "tile_width": 512,
            "tile_stride_height": 256,
            "sigmas": {"method": "array", "array": [3.0, 1.0]},
        }
    )
    tensors = LoraEndpoint().to_triton(inp, 99)
    request = parse_lora_request(tensors, root, LoraFiles(), lambda: False)
    assert (request.model.source, request.model.variant, request.model.unet) == (
        str(root / "m"),
        "fp16",
        None,
    )
    assert (request.prompt, request.negative_prompt, request.seed, request.num_images) == ("p", "n", 99, 3)
    assert request.prompt_weighting and request.enable_safety_checker and request.rescale_betas_zero_snr
    assert (request.clip_skip, request.scheduler, request.prediction_type) == (2, "TCD", "v_prediction")
    assert abs(request.eta - 0.25) < 1e-7 and (request.width, request.height) == (640, 384)
    assert (request.tile, request.tile_stride) == ((4096, 512), (256, 2048))
    assert request.sigmas == (3.0, 1.0) and request.timesteps is None and request.loras == ()
    outside = dict(tensors, MODEL_NAME=np.array([[b"/etc"]], dtype=np.object_))
    with pytest.raises(ValueError, match="EMBER_LORA_MODEL_ROOT"):
        parse_lora_request(outside, root, LoraFiles(), lambda: False)
