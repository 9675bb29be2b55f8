"""fal-client, unmodified, through fal-ai/lora with `model_name` pointing at a tiny SDXL base directory under
the allowed model root (ember.pipeline.lora_xl): an image at the asked size, an SDXL LoRA (UNet and both
text encoders) that changes it and is undone for the next request, an SDXL textual-inversion embedding
with a weighted prompt over 77 tokens (equal to the in-process pipeline), and an SD1.5 embedding on the SDXL
base refused with a 422 at its path."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
from PIL import Image

from ember.settings import Settings

pytestmark = pytest.mark.e2e

ENDPOINT = "fal-ai/lora"


@pytest.fixture(scope="module")
def tiny_xl(stack_settings: Settings) -> str:
    from ember.specs.demo_sdxl import build_tiny_sdxl

    directory = stack_settings.lora_models_dir / "tiny-sdxl-base-client"  # this module's own copy
    if not (directory / "model_index.json").is_file():
        build_tiny_sdxl(directory)
    return str(directory.resolve())


def _pixels(result: dict, cafile: str) -> np.ndarray:
    response = httpx.get(result["images"][0]["url"], verify=cafile, timeout=30)
    response.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def test_sdxl_base_with_and_without_lora(fal_client: ModuleType, client_env, tiny_xl: str, tmp_path: Path):
    from tests.pipeline.tiny_lora import make_xl_lora

    args = {
        "model_name": tiny_xl,
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "image_size": {"width": 96, "height": 64},
        "num_inference_steps": 3,
        "guidance_scale": 5.0,
        "clip_skip": 1,
        "seed": 5,
        "scheduler": "DPM++ 2M",
        "image_format": "png",
    }
    plain = fal_client.run(ENDPOINT, arguments=args)
    lora = make_xl_lora(tiny_xl, tmp_path, seed=3).read_bytes()
    uri = "data:application/octet-stream;base64," + base64.b64encode(lora).decode()
    with_lora = fal_client.run(ENDPOINT, arguments={**args, "loras": [{"path": uri, "scale": 0.8}]})
    again = fal_client.run(ENDPOINT, arguments=args)
    a, b, c = (_pixels(r, client_env["SSL_CERT_FILE"]) for r in (plain, with_lora, again))
    assert a.shape == (64, 96, 3) and plain["images"][0]["content_type"] == "image/png"
    assert plain["seed"] == 5 and plain["has_nsfw_concepts"] == [False]
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 1, "the SDXL LoRA changed nothing"
    assert np.array_equal(a, c), "the base weights were not restored after the LoRA request"


def _data_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode()


def test_sdxl_embedding_with_weighted_long_prompt(
    fal_client: ModuleType, client_env, tiny_xl: str, tmp_path: Path
):
    """An SDXL embedding file ({"clip_l", "clip_g"}) as a data URI, fal's default tokens <s0>, <s1>, and a
    weighted prompt of more than 77 tokens: the image equals the same request run in-process (what the
    wire carried arrived intact), and the embedding changes it."""
    import torch
    from safetensors.torch import save

    from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
    from ember.pipeline.textual_inversion import load_embedding
    from ember.specs.demo_sdxl import TEXT_HIDDEN, TEXT_HIDDEN_2
    from tests.pipeline.conftest import tiny_settings

    generator = torch.Generator().manual_seed(12)
    embedding = save(
        {
            "clip_l": torch.randn(2, TEXT_HIDDEN, generator=generator),
            "clip_g": torch.randn(2, TEXT_HIDDEN_2, generator=generator),
        }
    )
    prompt = "a photo of (<s0> <s1>)1.3 in the (snow)0.7, " + ", ".join(
        f"a red fox number {i}" for i in range(20)
    )
    args = {
        "model_name": tiny_xl,
        "prompt": prompt,
        "negative_prompt": "(blurry)1.2, <s1>",
        "prompt_weighting": True,
        "embeddings": [{"path": _data_uri(embedding)}],
        "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 3,
        "guidance_scale": 5.0,
        "seed": 21,
        "image_format": "png",
    }
    served = _pixels(fal_client.run(ENDPOINT, arguments=args), client_env["SSL_CERT_FILE"]).astype(np.int16)
    pipeline = LoraText2ImagePipeline(
        tiny_settings(
            tmp_path / "var", EMBER_RUNTIME="torch", EMBER_LORA_MODEL_ROOT=str(Path(tiny_xl).parent)
        )
    )
    request = LoraRequest(
        model=ModelRef(tiny_xl),
        prompt=prompt,
        negative_prompt=args["negative_prompt"],
        seed=21,
        width=64,
        height=64,
        num_inference_steps=3,
        guidance_scale=5.0,
        prompt_weighting=True,
        embeddings=(load_embedding(embedding, ["<s0>", "<s1>"]),),
    )
    (expected,) = pipeline([request])
    assert expected.error is None, expected.error
    assert np.abs(served - expected.images[0].numpy().astype(np.int16)).max() <= 1
    without = fal_client.run(ENDPOINT, arguments={**args, "embeddings": []})
    assert np.abs(served - _pixels(without, client_env["SSL_CERT_FILE"])).max() > 0


def test_sd15_embedding_on_sdxl_base_is_422_at_its_path(fal_client: ModuleType, tiny_xl: str) -> None:
    import torch
    from safetensors.torch import save

    args = {
        "model_name": tiny_xl,
        "prompt": "a <s0> fox",
        "embeddings": [{"path": _data_uri(save({"emb_params": torch.zeros(2, 32)}))}],
        "image_size": {"width": 64, "height": 64},
    }
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments=args)
    assert info.value.status_code == 422
    detail = info.value.response.json()["detail"]
    assert any(d["loc"] == ["body", "embeddings", 0, "path"] and "SDXL" in d["msg"] for d in detail), detail
