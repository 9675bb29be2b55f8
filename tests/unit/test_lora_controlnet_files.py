"""fal-ai/lora single-file ControlNets, gateway side: `path` as a URL is streamed by Endpoint.load into the
content-addressed checkpoint directory with the ControlNet check (kind "controlnet": safetensors with
ControlNet tensor names, diffusers' or the original ones), `config_url` fetched as a JSON object into
OPTIONS "config"; the Triton side reads both back as a ControlNetRef. Non-ControlNet weights, pickles and
a config that is no JSON object are 422 at their field."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save as save_numpy

from ember.endpoints.common import InputError
from ember.endpoints.lora.schema import LoraInput
from ember.endpoints.lora.translate import LoraEndpoint
from ember.gateway.checkpoints import SUBDIR, CheckpointCache
from ember.gateway.fetcher import Fetcher, FetchPolicy
from ember.gateway.inputs import GatewayMedia
from ember.pipeline.lora_controlnets import parse_controlnets
from ember.specs.checkpoint_keys import controlnet_file_family


def _png() -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


IMAGE = _png()
CONFIG = {"_class_name": "ControlNetModel", "block_out_channels": [32, 32, 64], "layers_per_block": 2}


def _uri(data: bytes, kind: str = "application/octet-stream") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def _weights(*names: str) -> bytes:
    return save_numpy({name: np.ones((2, 2), np.float32) for name in names})


@pytest.fixture()
def media(tmp_path: Path) -> GatewayMedia:
    fetcher = Fetcher(FetchPolicy())
    checkpoints = CheckpointCache(fetcher, None, tmp_path / SUBDIR, max_bytes=1 << 20, timeout_s=10)
    return GatewayMedia(
        fetcher, None, (), max_image_bytes=1 << 20, max_weights_bytes=64, checkpoints=checkpoints
    )


def _input(**unit) -> LoraInput:
    return LoraInput(model_name="a/b", prompt="p", controlnets=[{"image_url": IMAGE, **unit}])


async def test_single_file_controlnet_with_config_url(media: GatewayMedia, tmp_path: Path) -> None:
    weights = _weights("controlnet_cond_embedding.conv_in.weight", "add_embedding.linear_1.weight")
    inp = _input(path=_uri(weights), config_url=_uri(json.dumps(CONFIG).encode(), "application/json"))
    LoraEndpoint().check(inp)  # no longer "not supported"
    loaded = await LoraEndpoint().load(inp, media)
    tensors = LoraEndpoint().to_triton(inp, seed=1, loaded=loaded)
    (unit,) = parse_controlnets(json.loads(tensors["OPTIONS"][0, 0]), tensors, tmp_path)  # Triton side
    path = Path(unit.ref.source)
    assert path.parent == tmp_path / SUBDIR and path.read_bytes() == weights and unit.ref.single_file
    assert unit.ref.config is not None and json.loads(unit.ref.config) == CONFIG and unit.ref.variant is None
    assert unit.image.shape == (8, 8, 3)
    # Without config_url: the Triton side picks the built-in config by the weights' family.
    loaded = await LoraEndpoint().load(_input(path=_uri(weights)), media)
    assert loaded["controlnets"][0]["config"] is None and loaded["controlnets"][0]["path"] == str(path)


async def test_refusals_name_the_field(media: GatewayMedia) -> None:
    original = _weights("control_model.input_hint_block.0.weight", "control_model.zero_convs.0.0.weight")
    good = _uri(original)
    for unit, field, says in (
        (
            {"path": _uri(_weights("model.diffusion_model.input_blocks.0.0.weight"))},
            "path",
            "not a ControlNet",
        ),
        ({"path": _uri(b"\x80\x04pickle")}, "path", "safetensors"),
        ({"path": good, "config_url": _uri(b"[1, 2]")}, "config_url", "JSON object"),
        ({"path": good, "config_url": _uri(b"not json")}, "config_url", "JSON"),
        ({"path": good, "config_url": _uri(b" " * (64 * 1024 + 1))}, "config_url", "bytes|large"),
    ):
        with pytest.raises(InputError, match=says) as info:
            await LoraEndpoint().load(_input(**unit), media)
        assert info.value.loc == ("body", "controlnets", 0, field), info.value.msg


def test_family_from_tensor_names() -> None:
    assert controlnet_file_family(["controlnet_cond_embedding.conv_in.weight"]) == "sd15"
    assert controlnet_file_family(["control_model.input_hint_block.0.weight"]) == "sd15"
    assert controlnet_file_family(["input_hint_block.0.weight", "label_emb.0.0.weight"]) == "sdxl"
    assert (
        controlnet_file_family(["controlnet_cond_embedding.conv_in.weight", "add_embedding.linear_1.weight"])
        == "sdxl"
    )
    with pytest.raises(ValueError, match="not a ControlNet"):
        controlnet_file_family(["lora_unet_x.lora_down.weight"])


def test_builtin_configs_are_the_full_size_controlnets() -> None:
    """The configs a single file without config_url is loaded against: lllyasviel's SD1.5 ControlNet
    (361.3 M parameters) and diffusers/controlnet-canny-sdxl-1.0 (1251.0 M), counted on the meta device,
    each with its family's residual layout."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    from ember.pipeline.lora_controlnets import BUILTIN_CONFIGS
    from ember.specs.controlnet import residual_layout
    from ember.specs.controlnet_xl import xl_residual_layout

    for family, millions, layout in (("sd15", 361.3, residual_layout), ("sdxl", 1251.0, xl_residual_layout)):
        config = json.loads((BUILTIN_CONFIGS / f"controlnet-{family}" / "config.json").read_text())
        with init_empty_weights():
            model = ControlNetModel.from_config(config)
        assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions, family
        assert len(layout(model.config)) == (13 if family == "sd15" else 10)
