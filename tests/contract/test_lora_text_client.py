"""fal-client 1.0.3, unmodified, against the real gateway + tritonserver (fal-ai/lora): a textual-inversion
embedding sent as a data URI with a weighted prompt longer than 77 tokens, and a bad embedding file
answered 422 at its field."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save

from ember.settings import Settings

pytestmark = pytest.mark.e2e

ENDPOINT = "fal-ai/lora"
PROMPT = "a photo of (<s0> <s1>)1.3 in the (snow)0.7, " + ", ".join(
    f"a red fox number {i}" for i in range(20)
)


@pytest.fixture(scope="module")
def tiny_model(stack_settings: Settings) -> str:
    from ember.specs.demo_lora import build_tiny_sd15

    directory = stack_settings.lora_models_dir / "tiny-sd15"
    if not (directory / "model_index.json").is_file():
        build_tiny_sd15(directory)
    return str(directory.resolve())


def _data_uri(tensors: dict[str, torch.Tensor]) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(save(tensors)).decode()


def _pixels(url: str, cafile: str) -> np.ndarray:
    response = httpx.get(url, verify=cafile, timeout=30)
    response.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(np.int16)


def test_embedding_data_uri_and_weighted_long_prompt(
    fal_client: ModuleType, client_env, tiny_model: str, tmp_path: Path
) -> None:
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(11))  # the tiny CLIP's width
    args = {
        "model_name": tiny_model,
        "prompt": PROMPT,
        "negative_prompt": "(blurry)1.2, <s1>",
        "prompt_weighting": True,
        "embeddings": [{"path": _data_uri({"emb_params": vectors})}],  # tokens: fal's default <s0>, <s1>
        "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 3,
        "seed": 21,
        "image_format": "png",
    }
    result = fal_client.run(ENDPOINT, arguments=args)
    served = _pixels(result["images"][0]["url"], client_env["SSL_CERT_FILE"])

    # The same request in-process: what the wire carried (the file, its tokens, the flag) arrived intact.
    from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
    from ember.pipeline.textual_inversion import load_embedding
    from tests.pipeline.conftest import tiny_settings

    pipeline = LoraText2ImagePipeline(tiny_settings(tmp_path / "var", EMBER_RUNTIME="torch"))
    request = LoraRequest(
        model=ModelRef(tiny_model),
        prompt=PROMPT,
        negative_prompt=args["negative_prompt"],
        seed=21,
        width=64,
        height=64,
        num_inference_steps=3,
        prompt_weighting=True,
        embeddings=(load_embedding(save({"emb_params": vectors}), ["<s0>", "<s1>"]),),
    )
    (expected,) = pipeline([request])
    assert np.abs(served - expected.images[0].numpy().astype(np.int16)).max() <= 1

    without = fal_client.run(ENDPOINT, arguments={**args, "embeddings": []})
    assert np.abs(served - _pixels(without["images"][0]["url"], client_env["SSL_CERT_FILE"])).max() > 0


def test_sdxl_embedding_is_422_at_its_path(fal_client: ModuleType, tiny_model: str) -> None:
    sdxl = _data_uri({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)})
    args = {
        "model_name": tiny_model,
        "prompt": "a <s0> fox",
        "embeddings": [{"path": sdxl}],
        "image_size": {"width": 64, "height": 64},
    }
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments=args)
    assert info.value.status_code == 422
    detail = info.value.response.json()["detail"]
    assert any(d["loc"] == ["body", "embeddings", 0, "path"] and "SDXL" in d["msg"] for d in detail), detail
