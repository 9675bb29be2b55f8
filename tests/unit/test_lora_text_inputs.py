"""fal-ai/lora `embeddings` and `prompt_weighting` at the gateway: 422s naming the field, the embedding
formats read from the safetensors header, and the OPTIONS / LORA_FILES layout sent to Triton."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
from safetensors.numpy import save

from ember.endpoints.common import InputError, WeightsFile
from ember.endpoints.lora.embeddings import embedding_layout, token_vectors
from ember.endpoints.lora.schema import LoraInput
from ember.endpoints.lora.translate import LoraEndpoint
from ember.gateway.weights import check_safetensors


def _uri(tensors: dict[str, np.ndarray]) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(save(tensors)).decode()


class DataUriWeights:
    """The gateway's weight checks (check_safetensors) on data: URIs, without the network fetcher."""

    async def weights(self, url: str, loc) -> WeightsFile:
        return check_safetensors(base64.b64decode(url.split(",", 1)[1]), loc)


def _input(**fields) -> LoraInput:
    return LoraInput.model_validate({"model_name": "a/b", "prompt": "a <s0> fox", **fields})


def test_formats_and_token_mapping() -> None:
    assert embedding_layout({"emb_params": ("F32", (3, 768))}).vectors == 3
    assert embedding_layout({"string_to_param.*": ("F16", (2, 768))}).key == "string_to_param.*"
    one = embedding_layout({"<cat-toy>": ("F32", (768,))})
    assert (one.key, one.vectors, one.width) == ("<cat-toy>", 1, 768)
    # As many tokens as vectors: one each (fal's default <s0>, <s1>); else the first token takes them all.
    assert token_vectors(["<s0>", "<s1>"], 2) == [("<s0>", [0]), ("<s1>", [1])]
    assert token_vectors(["<s0>", "<s1>"], 3) == [("<s0>", [0, 1, 2])]
    assert token_vectors(["<x>"], 1) == [("<x>", [0])]
    xl = embedding_layout({"clip_l": ("F16", (2, 768)), "clip_g": ("F16", (2, 1280))})
    assert xl.is_sdxl and (xl.key, xl.vectors, xl.width, xl.key_2, xl.width_2) == (
        "clip_l",
        2,
        768,
        "clip_g",
        1280,
    )


def test_embedding_family_is_checked_for_local_base_models(tmp_path) -> None:
    """A local directory's family is known at the gateway: an SD1.5 embedding on an SDXL base (and back) is
    a 422 at its path before anything is queued; HF ids are checked on the Triton side."""
    sd15 = _uri({"emb_params": np.zeros((2, 768), np.float32)})
    sdxl = _uri({"clip_l": np.zeros((2, 768), np.float32), "clip_g": np.zeros((2, 1280), np.float32)})
    for name, index, good, bad, message in (
        ("xl", {"text_encoder": [], "text_encoder_2": []}, sdxl, sd15, "an SD1.5 embedding"),
        ("sd15", {"text_encoder": []}, sd15, sdxl, "an SDXL embedding"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps(index))
        model = str(tmp_path / name)
        ok = _input(model_name=model, embeddings=[{"path": good}])
        assert len(asyncio.run(LoraEndpoint().load(ok, DataUriWeights()))["embedding_files"]) == 1  # type: ignore[arg-type]
        inp = _input(model_name=model, embeddings=[{"path": good}, {"path": bad, "tokens": ["<t>"]}])
        with pytest.raises(InputError) as info:
            asyncio.run(LoraEndpoint().load(inp, DataUriWeights()))  # type: ignore[arg-type]
        assert info.value.loc == ("body", "embeddings", 1, "path") and message in info.value.msg


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"clip_l": np.zeros((2, 768), np.float32), "clip_g": np.zeros((3, 1280), np.float32)}, "SDXL"),
        ({"clip_l": np.zeros((2, 768), np.float32), "x": np.zeros((2, 1280), np.float32)}, "SDXL"),
        ({"a": np.zeros(4, np.float32), "b": np.zeros(4, np.float32)}, "not a textual-inversion"),
        ({"emb_params": np.zeros((80, 768), np.float32)}, "expected 1 to 75"),
        ({"emb_params": np.zeros((2, 768), np.int8)}, "not floating-point"),
    ],
)
def test_bad_embedding_files_are_422_at_their_path(tensors, message) -> None:
    ok = _uri({"emb_params": np.zeros((2, 768), np.float32)})
    inp = _input(embeddings=[{"path": ok}, {"path": _uri(tensors), "tokens": ["<t>"]}])
    with pytest.raises(InputError) as info:
        asyncio.run(LoraEndpoint().load(inp, DataUriWeights()))  # type: ignore[arg-type]
    assert info.value.loc == ("body", "embeddings", 1, "path")
    assert message in info.value.msg


def test_pickles_are_refused_before_parsing() -> None:
    pickle = "data:application/octet-stream;base64," + base64.b64encode(b"\x80\x04K\x01.").decode()
    inp = _input(embeddings=[{"path": pickle}])
    with pytest.raises(InputError) as info:
        asyncio.run(LoraEndpoint().load(inp, DataUriWeights()))  # type: ignore[arg-type]
    assert info.value.loc == ("body", "embeddings", 0, "path") and "pickle" in info.value.msg


@pytest.mark.parametrize(
    ("embeddings", "loc"),
    [
        ([{"path": "/etc/passwd"}], ("body", "embeddings", 0, "path")),
        ([{"path": "https://x/e.safetensors", "tokens": []}], ("body", "embeddings", 0, "tokens")),
        ([{"path": "https://x/e.safetensors", "tokens": ["two words"]}], ("body", "embeddings", 0, "tokens")),
        (
            [{"path": "https://x/a.safetensors"}, {"path": "https://x/b.safetensors", "tokens": ["<s1>"]}],
            ("body", "embeddings", 1, "tokens"),
        ),
    ],
)
def test_bad_paths_and_tokens_are_422(embeddings, loc) -> None:
    with pytest.raises(InputError) as info:
        LoraEndpoint().check(_input(embeddings=embeddings))
    assert info.value.loc == loc


def test_embedding_files_follow_the_loras_in_lora_files() -> None:
    lora = _uri({"unet.x.lora_A.weight": np.zeros((2, 4), np.float32)})
    emb = _uri({"emb_params": np.zeros((2, 768), np.float32)})
    inp = _input(
        prompt="a (<s0>)1.2 fox, <s1>-",
        prompt_weighting=True,
        loras=[{"path": lora, "scale": 0.5}],
        embeddings=[{"path": emb}],
    )
    endpoint = LoraEndpoint()
    endpoint.check(inp)  # the weighting syntax is served
    loaded = asyncio.run(endpoint.load(inp, DataUriWeights()))  # type: ignore[arg-type]
    tensors = endpoint.to_triton(inp, 3, loaded)
    options = json.loads(tensors["OPTIONS"][0, 0])
    assert options["loras"] == [{"file": 0, "scale": 0.5}]
    assert options["embeddings"] == [{"file": 1, "tokens": ["<s0>", "<s1>"]}]
    assert tensors["LORA_FILES"].shape == (1, 2)
    assert bool(tensors["PROMPT_WEIGHTING"][0, 0])
