"""fal-client 1.0.3, unmodified, against the real gateway + tritonserver (fal-ai/lora): `model_name` as an
http URL of a single-file .safetensors checkpoint (the tiny SD1.5 written in the original LDM layout, the
tiny SDXL base in the SGM layout), served by a local HTTP server the gateway may fetch from (EMBER_FETCH_ALLOW=127.0.0.1/32 in the stack)."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ember.pipeline.base_models import CONFIGS_SUBDIR
from ember.settings import Settings
from tests.contract.conftest import static_server
from tests.contract.status_logs import log_messages
from tests.single_file_checkpoint import to_single_file, to_single_file_xl

pytestmark = pytest.mark.e2e

ENDPOINT = "fal-ai/lora"


@pytest.fixture(scope="module")
def served(stack_settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(URL of the tiny SD1.5 as one .safetensors, the same model's directory under the model root); the
    tiny SDXL base is served as `tiny-sdxl.safetensors` too, its directory at `tiny-sdxl-single-file`."""
    from ember.specs.demo_lora import build_tiny_sd15
    from ember.specs.demo_sdxl import TEXT_HIDDEN, build_tiny_sdxl

    root = stack_settings.lora_models_dir
    # A directory of its own: other tests' first requests on tiny-sd15 must still be the ones that load it.
    model = root / "tiny-sd15-single-file"
    if not (model / "model_index.json").is_file():
        build_tiny_sd15(model)
    configs = root / CONFIGS_SUBDIR / "tiny-sd15-single-file"  # how the server learns the tiny architecture
    if not configs.is_dir():
        shutil.copytree(model, configs, ignore=shutil.ignore_patterns("*.safetensors"))
    files = tmp_path_factory.mktemp("http")
    to_single_file(model, files / "tiny-sd15.safetensors")
    xl = root / "tiny-sdxl-single-file"
    if not (xl / "model_index.json").is_file():
        # diffusers tells SDXL's two encoders apart by width: the stand-in's differ (as 768 vs 1280)
        build_tiny_sdxl(xl, text_hidden_2=TEXT_HIDDEN + 16)
    if not (root / CONFIGS_SUBDIR / xl.name).is_dir():
        shutil.copytree(xl, root / CONFIGS_SUBDIR / xl.name, ignore=shutil.ignore_patterns("*.safetensors"))
    to_single_file_xl(xl, files / "tiny-sdxl.safetensors")
    sd2_names = (
        "model.diffusion_model.input_blocks.0.0.weight",
        "first_stage_model.encoder.conv_in.weight",
        "cond_stage_model.model.ln_final.weight",
    )
    save_file({name: torch.zeros(2) for name in sd2_names}, str(files / "sd2.safetensors"))
    with static_server(files) as url:
        yield url, str(model.resolve())


def _pixels(result: dict, cafile: str) -> np.ndarray:
    response = httpx.get(result["images"][0]["url"], verify=cafile, timeout=30)
    response.raise_for_status()
    return np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"))


def test_single_file_checkpoint_url(fal_client: ModuleType, client_env, served: tuple[str, str]) -> None:
    base_url, directory = served
    args = {
        "prompt": "a red fox",
        "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 3,
        "seed": 5,
        "image_format": "png",
    }
    updates: list = []
    from_url = fal_client.subscribe(
        ENDPOINT,
        arguments={**args, "model_name": f"{base_url}/tiny-sd15.safetensors"},
        with_logs=True,
        on_queue_update=updates.append,
    )
    messages = log_messages(fal_client, updates)
    # The first request on this checkpoint converted it; its status logs said so.
    assert any(m.startswith(("loading base model", "converting single-file")) for m in messages), messages
    from_dir = fal_client.run(ENDPOINT, arguments={**args, "model_name": directory})
    cafile = client_env["SSL_CERT_FILE"]
    assert np.array_equal(_pixels(from_url, cafile), _pixels(from_dir, cafile))


def test_sdxl_single_file_checkpoint_url(
    fal_client: ModuleType, client_env, stack_settings: Settings, served: tuple[str, str]
) -> None:
    """An SDXL single file (SGM layout) is converted once and served as the SDXL directory is: same pixels."""
    args = {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "image_size": {"width": 64, "height": 64},
        "num_inference_steps": 3,
        "seed": 5,
        "image_format": "png",
    }
    from_url = fal_client.run(
        ENDPOINT, arguments={**args, "model_name": f"{served[0]}/tiny-sdxl.safetensors"}
    )
    directory = str((stack_settings.lora_models_dir / "tiny-sdxl-single-file").resolve())
    from_dir = fal_client.run(ENDPOINT, arguments={**args, "model_name": directory})
    cafile = client_env["SSL_CERT_FILE"]
    assert np.array_equal(_pixels(from_url, cafile), _pixels(from_dir, cafile))


@pytest.mark.parametrize(
    ("name", "message"),
    [("sd2.safetensors", "2.x"), ("missing.safetensors", "HTTP 404")],
)
def test_refused_checkpoints_are_422_naming_model_name(
    fal_client: ModuleType, served: tuple[str, str], name: str, message: str
) -> None:
    arguments = {
        "model_name": f"{served[0]}/{name}",
        "prompt": "x",
        "image_size": {"width": 64, "height": 64},
    }
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments=arguments)
    assert info.value.status_code == 422
    detail = info.value.response.json()["detail"]
    assert any(d["loc"] == ["body", "model_name"] and message in d["msg"] for d in detail), detail


def test_checkpoints_are_stored_by_content(stack_settings: Settings, served: tuple[str, str]) -> None:
    stored = list((stack_settings.lora_models_dir / "checkpoints").glob("*.safetensors"))
    assert stored and all(len(p.stem) == 64 for p in stored), stored
    assert not list(Path(stored[0].parent).glob(".partial-*"))
