"""fal-ai/lora IC-Light fields: which combinations the gateway accepts (fal's doc: model + image, plus a
background for 'fbc' models), OPTIONS / LORA_FILES / MEDIA as to_triton sends them, and the Triton side's
parse_ic_light reading them back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ember.endpoints.common import InputError
from ember.endpoints.lora.schema import LoraInput
from ember.endpoints.lora.translate import LoraEndpoint
from ember.pipeline.ic_light import parse_ic_light
from ember.pipeline.lora_io import media_array

MODEL, IMAGE, BG = "https://h/iclight_sd15_fc.safetensors", "https://h/fg.png", "https://h/bg.png"


def _input(**kw) -> LoraInput:
    return LoraInput(model_name="a/b", prompt="p", image_size={"width": 64, "height": 64}, **kw)


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"ic_light_image_url": IMAGE}, "ic_light_model_url"),
        ({"ic_light_model_background_image_url": BG}, "ic_light_model_url"),
        ({"ic_light_model_url": MODEL}, "ic_light_image_url"),
        ({"ic_light_model_url": MODEL, "ic_light_model_background_image_url": BG}, "ic_light_image_url"),
        ({"ic_light_model_url": "ftp://h/x", "ic_light_image_url": IMAGE}, "ic_light_model_url"),
        (
            {
                "ic_light_model_url": MODEL,
                "ic_light_image_url": IMAGE,
                "loras": [{"path": "https://h/l.safetensors"}],
            },
            "loras",
        ),
    ],
)
def test_incomplete_or_unsupported_combinations_are_422(fields: dict, loc: str) -> None:
    with pytest.raises(InputError) as info:
        LoraEndpoint().check(_input(**fields))
    assert info.value.loc[:2] == ("body", loc), info.value.detail()


@pytest.mark.parametrize("background", [False, True])
def test_to_triton_and_back(background: bool) -> None:
    fields = {"ic_light_model_url": MODEL, "ic_light_image_url": IMAGE}
    if background:
        fields["ic_light_model_background_image_url"] = BG
    inp = _input(**fields)
    LoraEndpoint().check(inp)
    fg = np.full((8, 6, 3), 7, np.uint8)
    bg = np.full((5, 9, 3), 9, np.uint8)
    media = [fg, bg] if background else [fg]
    loaded = {
        "ic_light": {"weights": b"offsets", "image": 0, "background": 1 if background else None},
        "media": media,
    }
    tensors = LoraEndpoint().to_triton(inp, seed=1, loaded=loaded)
    options = json.loads(tensors["OPTIONS"][0, 0])
    blobs = list(tensors["LORA_FILES"].reshape(-1))
    assert blobs[options["ic_light"]["file"]] == b"offsets"
    parsed = parse_ic_light(options["ic_light"], blobs, lambda i, what: media_array(tensors, i, what))
    assert parsed.weights == b"offsets" and np.array_equal(parsed.image, fg)
    assert (parsed.background is not None) == background
    if background:
        assert np.array_equal(parsed.background, bg)
    with pytest.raises(ValueError, match="Endpoint.load"):
        LoraEndpoint().to_triton(inp, seed=1, loaded={})


def test_plain_requests_carry_no_ic_light() -> None:
    options = json.loads(LoraEndpoint().to_triton(_input(), seed=1)["OPTIONS"][0, 0])
    assert options["ic_light"] is None
    assert parse_ic_light(None, [], lambda i, what: None) is None


def test_parse_names_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="LORA_FILES holds 0"):
        parse_ic_light({"file": 0, "image": 0}, [], lambda i, what: None)
    gray = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        parse_ic_light({"file": 0, "image": 0}, [b"x"], lambda i, what: gray)
