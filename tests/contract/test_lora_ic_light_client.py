"""fal-client 1.0.3, unmodified, against the real gateway + tritonserver: fal-ai/lora with IC-Light (a tiny
random "fc" offset file and a foreground image, both sent as data URIs) equals the IC-Light project's own
procedure on diffusers (tests/pipeline/test_ic_light_parity.py), also with a LoRA, and incomplete combinations
are 422."""

from __future__ import annotations

import base64
import io
from types import ModuleType

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.contract.test_lora_python_client import ENDPOINT, _lora_data_uri, tiny_model  # noqa: F401 - the fixture
from tests.pipeline.test_ic_light_combined import FG, PROMPT, SIZE, STEPS, _run, _sd_pipeline
from tests.pipeline.test_ic_light_parity import _image, _offsets, _reference, patch_reference

pytestmark = pytest.mark.e2e


def _data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64," + base64.b64encode(data).decode()


def _png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_ic_light_fc_matches_the_reference(fal_client: ModuleType, client_env, tiny_model: str) -> None:  # noqa: F811
    from pathlib import Path

    weights = _offsets(Path(tiny_model), 8, seed=8)
    fg = _image(1, (80, 60))
    args = {
        "model_name": tiny_model,
        "prompt": "a portrait, warm sunlight",
        "negative_prompt": "lowres",
        "image_size": {"width": 80, "height": 64},
        "num_inference_steps": 3,
        "guidance_scale": 4.0,
        "seed": 4,
        "image_format": "png",
        "ic_light_model_url": _data_uri(weights, "application/octet-stream"),
        "ic_light_image_url": _data_uri(_png(fg), "image/png"),
    }
    result = fal_client.run(ENDPOINT, arguments=args)
    response = httpx.get(result["images"][0]["url"], verify=client_env["SSL_CERT_FILE"], timeout=30)
    response.raise_for_status()
    ours = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(np.int16)
    theirs = _reference(
        Path(tiny_model),
        weights,
        fg,
        None,
        None,
        prompt=args["prompt"],
        negative_prompt=args["negative_prompt"],
        guidance_scale=args["guidance_scale"],
        num_images_per_prompt=1,
        seed=args["seed"],
    )[0]
    assert ours.shape == theirs.shape == (64, 80, 3)
    assert np.abs(ours - theirs).max() <= 1, np.abs(ours - theirs).max()

    # An "fc" file with a background image: the model says which field is wrong (422).
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(
            ENDPOINT, arguments={**args, "ic_light_model_background_image_url": args["ic_light_image_url"]}
        )
    assert info.value.status_code == 422
    assert "fc" in str(info.value.response.json()["detail"])


def test_ic_light_with_a_lora_matches_the_reference(
    fal_client: ModuleType,
    client_env,
    tiny_model: str,  # noqa: F811
    tmp_path,
) -> None:
    """IC-Light + `loras` (a UNet LoRA as a data URI): diffusers' load_lora_weights + fuse_lora on IC-Light's
    patched pipeline (tests/pipeline/test_ic_light_combined.py)."""
    from pathlib import Path

    weights = _offsets(Path(tiny_model), 8, seed=9)
    args = {
        "model_name": tiny_model,
        **PROMPT,
        "image_size": {"width": SIZE, "height": SIZE},
        "num_inference_steps": STEPS,
        "seed": 4,
        "image_format": "png",
        "ic_light_model_url": _data_uri(weights, "application/octet-stream"),
        "ic_light_image_url": _data_uri(_png(FG), "image/png"),
        "loras": [{"path": _lora_data_uri(tiny_model, tmp_path), "scale": 1.5}],
    }
    result = fal_client.run(ENDPOINT, arguments=args)
    response = httpx.get(result["images"][0]["url"], verify=client_env["SSL_CERT_FILE"], timeout=30)
    response.raise_for_status()
    ours = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB")).astype(np.int16)
    pipe = _sd_pipeline(Path(tiny_model))
    conds = patch_reference(pipe, weights, FG, None, SIZE, SIZE)
    pipe.load_lora_weights(str(tmp_path))  # where _lora_data_uri saved the file
    pipe.fuse_lora(lora_scale=1.5)
    theirs = _run(pipe, conds)[0]
    assert ours.shape == theirs.shape == (SIZE, SIZE, 3)
    assert np.abs(ours - theirs).max() <= 1, np.abs(ours - theirs).max()


def test_ic_light_image_without_model_is_422(fal_client: ModuleType, tiny_model: str) -> None:  # noqa: F811
    args = {
        "model_name": tiny_model,
        "prompt": "x",
        "image_size": {"width": 64, "height": 64},
        "ic_light_image_url": "https://example.com/fg.png",
    }
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments=args)
    assert info.value.status_code == 422
    assert info.value.response.json()["detail"][0]["loc"][:2] == ["body", "ic_light_model_url"]
