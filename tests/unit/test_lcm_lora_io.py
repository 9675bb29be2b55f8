"""fal-ai/lcm lora_url + lora_scale at the seams: the gateway's checks and tensors, the model's parsing."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch
from safetensors.torch import save

from ember.endpoints.common import InputError, WeightsFile
from ember.endpoints.lcm.schema import LcmInput
from ember.endpoints.lcm.translate import LcmEndpoint
from ember.pipeline.lcm_io import LcmDefaults, parse_lcm_request
from ember.pipeline.lora_io import LoraFiles

Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
LORA = save({f"{Q}.lora_A.weight": torch.ones(2, 8), f"{Q}.lora_B.weight": torch.ones(8, 2)})


class _Media:
    async def weights(self, url: str, loc: tuple) -> WeightsFile:
        assert loc == ("body", "lora_url")
        return WeightsFile(data=LORA, tensors={})


def test_gateway_fetches_the_file_and_sends_bytes_and_scale() -> None:
    endpoint = LcmEndpoint()
    inp = LcmInput(prompt="a cat", lora_url="data:application/octet-stream;base64,AAAA", lora_scale=0.5)
    endpoint.check(inp)
    loaded = asyncio.run(endpoint.load(inp, _Media()))
    tensors = endpoint.to_triton(inp, seed=1, loaded=loaded)
    assert tensors["LORA"].shape == (1, 1) and tensors["LORA"][0, 0] == LORA
    assert tensors["LORA_SCALE"].dtype == np.float32 and tensors["LORA_SCALE"][0, 0] == 0.5
    assert "LORA" not in endpoint.to_triton(LcmInput(prompt="a cat"), seed=1)


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"lora_url": "file:///etc/passwd"}, ("body", "lora_url")),
        (
            {"lora_url": "https://example.com/l.safetensors", "lora_scale": float("inf")},
            ("body", "lora_scale"),
        ),
    ],
    ids=["not-http", "infinite-scale"],
)
def test_gateway_refuses_by_field(fields: dict, loc: tuple) -> None:
    with pytest.raises(InputError) as info:
        LcmEndpoint().check(LcmInput(prompt="a cat", **fields))
    assert info.value.loc == loc


def test_lora_with_controlnet_inpaint_is_accepted() -> None:
    """Served since the LoRA is fused into the ControlNet-steered UNet too (tests/pipeline/test_lcm_controlnet_lora)."""
    urls = {"image_url": "https://example.com/i.png", "mask_url": "https://example.com/m.png"}
    inp = LcmInput(prompt="a cat", lora_url="https://example.com/l.safetensors", controlnet_inpaint=True, **urls)
    LcmEndpoint().check(inp)


def test_model_parses_the_file_once_per_content() -> None:
    files = LoraFiles()
    arrays = {
        "PROMPT": np.array([[b"a cat"]], dtype=object),
        "SEED": np.array([[1]], dtype=np.int64),
        "LORA": np.array([[LORA]], dtype=object),
        "LORA_SCALE": np.array([[0.25]], dtype=np.float32),
    }
    first = parse_lcm_request(arrays, LcmDefaults(), lambda: False, files)
    second = parse_lcm_request(arrays, LcmDefaults(), lambda: False, files)
    [(lora, scale)] = first.loras
    assert scale == 0.25 and second.loras[0][0] is lora  # the cache by content digest
    assert first.lora_key == ((lora.digest, 0.25),)
    assert set(lora.factors["unet"]) == {Q.removeprefix("unet.") + ".weight"}
    no_scale = {k: v for k, v in arrays.items() if k != "LORA_SCALE"}
    assert (
        parse_lcm_request(no_scale, LcmDefaults(), lambda: False, files).loras[0][1] == 1.0
    )  # fal's default
    with pytest.raises(ValueError, match="not a LoRA"):
        parse_lcm_request(
            {**arrays, "LORA": np.array([[b"junk"]], dtype=object)}, LcmDefaults(), lambda: False, files
        )
    with pytest.raises(ValueError, match="without LoRA support"):
        parse_lcm_request(arrays, LcmDefaults(), lambda: False)
