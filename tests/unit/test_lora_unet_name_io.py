"""fal-ai/lora `unet_name` as a URL of a single-file UNet, gateway side: accepted by check (it was refused
as not supported), streamed by Endpoint.load into the content-addressed checkpoint directory with the UNet
check (kind "unet"), sent to Triton as that path in UNET_NAME; a full checkpoint or a LoRA is refused at
unet_name; the Triton side's resolve_model accepts the stored file."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save as save_numpy

from ember.endpoints.common import InputError
from ember.endpoints.lora.schema import LoraInput
from ember.endpoints.lora.translate import LoraEndpoint
from ember.gateway.checkpoints import SUBDIR, CheckpointCache
from ember.gateway.fetcher import Fetcher, FetchPolicy
from ember.gateway.inputs import GatewayMedia
from ember.pipeline.lora_io import resolve_model


def _uri(tensors: dict[str, np.ndarray]) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(save_numpy(tensors)).decode()


async def test_unet_name_url_streams_to_a_stored_path(tmp_path: Path) -> None:
    fetcher = Fetcher(FetchPolicy())
    checkpoints = CheckpointCache(fetcher, None, tmp_path / SUBDIR, max_bytes=1 << 20, timeout_s=10)
    media = GatewayMedia(
        fetcher, None, (), max_image_bytes=1 << 20, max_weights_bytes=64, checkpoints=checkpoints
    )
    unet = {"model.diffusion_model.input_blocks.0.0.weight": np.ones((4, 4, 3, 3), np.float32)}
    inp = LoraInput(model_name="a/b", prompt="p", unet_name=_uri(unet))
    LoraEndpoint().check(inp)  # no longer "not supported yet"
    loaded = await LoraEndpoint().load(inp, media)
    tensors = LoraEndpoint().to_triton(inp, seed=1, loaded=loaded)
    path = Path(tensors["UNET_NAME"][0, 0].decode())
    assert path.parent == tmp_path / SUBDIR and path.read_bytes() == save_numpy(unet)
    assert path.name == f"{hashlib.sha256(save_numpy(unet)).hexdigest()}.safetensors"
    assert "LORA_FILES" not in tensors
    assert resolve_model(str(path), tmp_path, "config.json", "unet_name", single_file=True) == str(path)
    for bad, message in (
        ({"cond_stage_model.transformer.x": np.ones(2, np.float32)}, "not a UNet weight file"),
        ({"lora_unet_x.lora_down.weight": np.ones(2, np.float32)}, "not a UNet weight file"),
    ):
        with pytest.raises(InputError, match=message) as info:
            await LoraEndpoint().load(LoraInput(model_name="a/b", prompt="p", unet_name=_uri(bad)), media)
        assert info.value.loc == ("body", "unet_name")
    # An SDXL UNet file passes the gateway: whether it fits the base model (its family, its architecture) is
    # checked on the Triton side against the base (tests/pipeline/test_lora_sdxl_unet.py).
    xl_unet = {"model.diffusion_model.label_emb.0.0.weight": np.ones((2, 2), np.float32)}
    loaded = await LoraEndpoint().load(LoraInput(model_name="a/b", prompt="p", unet_name=_uri(xl_unet)), media)
    assert Path(loaded["unet_name"]).read_bytes() == save_numpy(xl_unet)
