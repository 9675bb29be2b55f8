"""fal-ai/lora ip_adapter / image_encoder_* at the gateway (submit-time checks, refusals by name) and the
OPTIONS + MEDIA round trip into the Triton model's IPAdapterRequest (ember.pipeline.ip_adapter)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save, save_file

from ember.endpoints.common import InputError, media_tensor
from ember.endpoints.lora.ip_adapter import check_ip_adapter
from ember.endpoints.lora.schema import LoraInput
from ember.endpoints.lora.translate import check_model_name
from ember.pipeline.ip_adapter import parse_ip_adapter_options
from ember.pipeline.lora_io import media_array

WEIGHTS = {"image_proj.proj.weight": torch.ones(8, 4), "ip_adapter.1.to_k_ip.weight": torch.ones(4, 2)}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    models = root / "ipa" / "models"
    (models / "image_encoder").mkdir(parents=True)
    (models / "image_encoder" / "config.json").write_text("{}")
    save_file(WEIGHTS, models / "ip.safetensors")
    return root


def _check(root: Path, adapter: dict, **top) -> None:
    base = {
        "ip_adapter_image_url": "https://x/i.png",
        "path": str(root / "ipa"),
        "model_subfolder": "models",
        "weight_name": "ip.safetensors",
    }
    inp = LoraInput.model_validate(
        {"model_name": "a/b", "prompt": "p", "ip_adapter": [{**base, **adapter}], **top}
    )
    check_ip_adapter(inp, root.resolve(), check_model_name)


def test_served_forms_pass(root: Path) -> None:
    _check(root, {})
    _check(root, {"ip_adapter_image_url": ["https://x/1.png", "data:image/png;base64,AA=="], "scale": 0.5})
    _check(root, {"path": "h94/IP-Adapter", "scale_json": {"up": {"block_0": [0.0, 1.0, 0.0]}}})
    _check(
        root,
        {"path": "https://x/ip.safetensors"},
        image_encoder_path="h94/IP-Adapter",
        image_encoder_subfolder="models/image_encoder",
    )
    _check(root, {}, image_encoder_weight_name="model.safetensors")
    _check(root, {"unconditional_noising_factor": 0.3})  # served (ember.pipeline.ip_adapter)


@pytest.mark.parametrize(
    ("adapter", "top", "loc"),
    [
        ({"insight_face_model_path": "buffalo_l"}, {}, ("insight_face_model_path",)),
        ({"weight_name": None}, {}, ("weight_name",)),
        ({"weight_name": "ip.bin"}, {}, ("weight_name",)),
        ({"path": "/etc"}, {}, ("path",)),
        ({"model_subfolder": "../.."}, {}, ("model_subfolder",)),
        ({"ip_adapter_image_url": []}, {}, ("ip_adapter_image_url",)),
        ({"ip_adapter_image_url": "file:///etc/passwd"}, {}, ("ip_adapter_image_url",)),
        ({"scale_json": {"sideways": 1}}, {}, ("scale_json",)),
        ({"path": "https://x/ip.safetensors"}, {}, None),  # no image encoder beside a URL
        ({}, {"image_encoder_path": "https://x/enc.safetensors"}, None),
        ({}, {"image_encoder_weight_name": "pytorch_model.pt"}, None),
    ],
)
def test_refusals_name_the_field(root: Path, adapter: dict, top: dict, loc: tuple | None) -> None:
    with pytest.raises(InputError) as info:
        _check(root, adapter, **top)
    if loc is not None:
        assert info.value.loc == ("body", "ip_adapter", 0, *loc)
    else:
        assert info.value.loc[:2] == ("body", next(iter(top), "image_encoder_path"))


def test_options_round_trip_into_the_request(root: Path) -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    mask = np.full((8, 8), 255, np.uint8)
    blob = np.frombuffer(save(WEIGHTS), np.uint8)
    arrays = {"MEDIA": media_tensor([image, mask, blob])}
    options = {
        "adapters": [
            {
                "weights": {
                    "path": str(root / "ipa"),
                    "subfolder": "models",
                    "weight_name": "ip.safetensors",
                },
                "images": [0],
                "mask": 1,
                "scale": 0.7,
                "scale_json": None,
                "unconditional_noising_factor": 0.25,
            },
            {
                "weights": {"media": 2},
                "images": [0, 0],
                "mask": None,
                "scale": 1.0,
                "scale_json": {"up": {"block_0": [0.0, 1.0, 0.0]}},
            },
        ],
        "image_encoder": {"path": None, "subfolder": None, "weight_name": "pytorch_model.bin"},
    }
    request = parse_ip_adapter_options(
        json.loads(json.dumps(options)), lambda i, w: media_array(arrays, i, w), root
    )
    assert request is not None and len(request.units) == 2
    first, second = request.units
    assert first.weights.digest == second.weights.digest and first.weights.plain  # same bytes, parsed once
    assert first.scale == 0.7 and first.mask is not None and len(second.images) == 2
    assert first.unconditional_noising_factor == 0.25 and second.unconditional_noising_factor == 0.0
    assert second.scale_config == {"up": {"block_0": [0.0, 1.0, 0.0]}}
    assert request.image_encoder == str((root / "ipa" / "models" / "image_encoder").resolve())
    with pytest.raises(ValueError, match="EMBER_LORA_MODEL_ROOT"):
        outside = {**options, "image_encoder": {"path": str(root / ".." / ".."), "weight_name": "x"}}
        parse_ip_adapter_options(outside, lambda i, w: media_array(arrays, i, w), root)
