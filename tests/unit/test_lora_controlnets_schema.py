"""fal-ai/lora `controlnets` at the gateway: what is refused (422 naming the field), and the OPTIONS + MEDIA
the gateway sends read back by the Triton model as the same ControlNet inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ember.endpoints.common import InputError
from ember.endpoints.lora.controlnets import check_controlnets
from ember.endpoints.lora.schema import LoraInput
from ember.endpoints.lora.translate import LoraEndpoint, check_model_name


@pytest.fixture()
def root(tmp_path: Path) -> Path:
    (tmp_path / "models" / "cn").mkdir(parents=True)
    (tmp_path / "models" / "cn" / "config.json").write_text("{}")
    (tmp_path / "models" / "m").mkdir()
    (tmp_path / "models" / "m" / "model_index.json").write_text("{}")
    return (tmp_path / "models").resolve()


def _input(root: Path, **controlnet) -> LoraInput:
    unit = {"path": str(root / "cn"), "image_url": "https://x/i.png", **controlnet}
    return LoraInput.model_validate({"model_name": str(root / "m"), "prompt": "p", "controlnets": [unit]})


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"path": "/etc"}, "path"),
        ({"path": "../../etc"}, "path"),
        ({"path": "ftp://example.com/cn.safetensors"}, "path"),
        ({"path": "not an id"}, "path"),
        ({"config_url": "https://example.com/config.json"}, "config_url"),  # a directory has its own
        ({"path": "https://x/cn.safetensors", "config_url": "file:///etc/passwd"}, "config_url"),
        ({"path": "https://x/cn.safetensors", "variant": "fp16"}, "variant"),  # a file inside a directory
        ({"variant": "../fp16"}, "variant"),
        ({"ip_adapter_index": 0}, "ip_adapter_index"),  # no ip_adapter to index
        ({"image_url": "file:///etc/passwd"}, "image_url"),
        ({"mask_url": "ftp://x/m.png"}, "mask_url"),
        ({"start_percentage": 0.6, "end_percentage": 0.6}, "end_percentage"),
    ],
)
def test_refusals_name_the_field(root: Path, change: dict, field: str) -> None:
    with pytest.raises(InputError) as info:
        check_controlnets(_input(root, **change), root, check_model_name)
    assert info.value.loc == ("body", "controlnets", 0, field), info.value.msg


def test_served_inputs_pass(root: Path) -> None:
    check_controlnets(_input(root), root, check_model_name)
    check_controlnets(
        _input(root, path="lllyasviel/sd-controlnet-canny", variant="fp16"), root, check_model_name
    )
    check_controlnets(
        _input(root, mask_url="data:image/png;base64,AAAA", end_percentage=0.5), root, check_model_name
    )
    check_controlnets(  # single-file weights by URL, with or without their config.json
        _input(root, path="https://x/cn.safetensors", config_url="https://x/config.json"),
        root,
        check_model_name,
    )
    check_controlnets(_input(root, path="data:application/octet-stream;base64,AAAA"), root, check_model_name)


def test_ip_adapter_index_must_index_ip_adapter(root: Path) -> None:
    """InstantID: controlnets[i].ip_adapter_index names one of the request's IP-Adapters."""
    adapter = {
        "path": "InstantX/InstantID",
        "weight_name": "ip-adapter.safetensors",
        "ip_adapter_image_url": "https://x/f.png",
    }

    def body(index: int) -> LoraInput:
        unit = {"path": str(root / "cn"), "image_url": "https://x/k.png", "ip_adapter_index": index}
        return LoraInput.model_validate(
            {"model_name": str(root / "m"), "prompt": "p", "controlnets": [unit], "ip_adapter": [adapter]}
        )

    check_controlnets(body(0), root, check_model_name)
    for bad in (1, -1):
        with pytest.raises(InputError) as info:
            check_controlnets(body(bad), root, check_model_name)
        assert info.value.loc == ("body", "controlnets", 0, "ip_adapter_index"), info.value.msg
        assert "ip_adapter list (1 adapter(s))" in info.value.msg


def test_translate_then_parse_round_trip(root: Path) -> None:
    """OPTIONS entries and MEDIA arrays as Endpoint.load leaves them -> the Triton model's ControlNetInputs."""
    from ember.endpoints.lora.schema import LoraInput
    from ember.pipeline.lora_controlnets import ControlNetRef
    from ember.pipeline.lora_io import LoraFiles, parse_lora_request

    inp = LoraInput.model_validate(
        {
            "model_name": str(root / "m"),
            "prompt": "p",
            "controlnet_guess_mode": True,
            "controlnets": [
                {"path": str(root / "cn"), "image_url": "https://x/a.png", "conditioning_scale": 0.5},
                {
                    "path": str(root / "cn"),
                    "variant": "fp16",
                    "image_url": "https://x/b.png",
                    "mask_url": "https://x/m.png",
                    "start_percentage": 0.25,
                    "end_percentage": 0.75,
                },
            ],
        }
    )
    image_a = np.zeros((8, 16, 3), np.uint8)
    image_b = np.full((24, 32, 3), 7, np.uint8)
    mask = np.full((24, 32), 255, np.uint8)
    loaded = {
        "media": [image_a, image_b, mask],
        "controlnets": [
            {
                "path": str(root / "cn"),
                "variant": None,
                "image": 0,
                "mask": None,
                "conditioning_scale": 0.5,
                "start_percentage": 0.0,
                "end_percentage": 1.0,
            },
            {
                "path": str(root / "cn"),
                "variant": "fp16",
                "image": 1,
                "mask": 2,
                "conditioning_scale": 1.0,
                "start_percentage": 0.25,
                "end_percentage": 0.75,
                "ip_adapter_index": 0,
            },
        ],
    }
    tensors = LoraEndpoint().to_triton(inp, 3, loaded)
    assert tensors["MEDIA"].shape == (1, 3)
    request = parse_lora_request(tensors, root, LoraFiles(), lambda: False)
    a, b = request.controlnets
    assert request.controlnet_guess_mode
    assert a.ref == ControlNetRef(str(root / "cn")) and b.ref == ControlNetRef(str(root / "cn"), "fp16")
    assert np.array_equal(a.image, image_a) and a.mask is None and a.conditioning_scale == 0.5
    assert (
        np.array_equal(b.image, image_b) and np.array_equal(b.mask, mask) and (b.start, b.end) == (0.25, 0.75)
    )
    assert a.ip_adapter_index is None and b.ip_adapter_index == 0
    with pytest.raises(ValueError, match="Endpoint.load"):
        LoraEndpoint().to_triton(inp, 3, {})  # ControlNets never silently dropped
