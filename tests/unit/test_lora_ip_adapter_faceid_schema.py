"""fal-ai/lora FaceID fields at the gateway (insight_face_model_path as a directory or a .zip URL,
image_projection_shortcut; .bin FaceID weights refused by name) and their OPTIONS + MEDIA round trip (gateway
load_ip_adapter -> Triton side parse_ip_adapter_options) into IPAdapterUnit.face_pack / shortcut."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ember.endpoints.common import InputError, media_tensor
from ember.endpoints.lora.ip_adapter import check_ip_adapter, load_ip_adapter
from ember.endpoints.lora.schema import LoraInput
from ember.endpoints.lora.translate import check_model_name
from ember.gateway.weights import check_model_pack
from ember.pipeline.ip_adapter import parse_ip_adapter_options
from ember.pipeline.lora_io import media_array

# A FaceID image_proj (MLPProjModel: proj.0 / proj.2 / norm) with its IP attention weights
FACEID = {
    "image_proj.proj.0.weight": torch.ones(16, 8),
    "image_proj.norm.weight": torch.ones(4),
    "ip_adapter.1.to_k_ip.weight": torch.ones(4, 4),
}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    (root / "faceid").mkdir(parents=True)
    save_file(FACEID, root / "faceid" / "ip-adapter-faceid_sd15.safetensors")
    (root / "buffalo_l").mkdir()
    (root / "buffalo_l" / "det_10g.onnx").write_bytes(b"")  # the gateway only checks a pack is there
    (root / "empty").mkdir()
    return root


def _input(root: Path, **adapter) -> LoraInput:
    base = {
        "ip_adapter_image_url": "https://x/face.png",
        "path": str(root / "faceid"),
        "weight_name": "ip-adapter-faceid_sd15.safetensors",
        "insight_face_model_path": str(root / "buffalo_l"),
    }
    return LoraInput.model_validate({"model_name": "a/b", "prompt": "p", "ip_adapter": [{**base, **adapter}]})


def test_faceid_forms_pass(root: Path) -> None:
    check_ip_adapter(_input(root), root.resolve(), check_model_name)
    check_ip_adapter(_input(root, image_projection_shortcut=False), root.resolve(), check_model_name)
    # a URL FaceID adapter needs no image_encoder_path at the gateway (plain FaceID runs no CLIP encoder)
    check_ip_adapter(_input(root, path="https://x/faceid.safetensors"), root.resolve(), check_model_name)
    pack_url = "https://x/buffalo_l.zip"  # fetched by Endpoint.load (MediaLoader.model_pack)
    check_ip_adapter(_input(root, insight_face_model_path=pack_url), root.resolve(), check_model_name)


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"insight_face_model_path": "ftp://x/buffalo_l.zip"}, "insight_face_model_path", "not downloaded"),
        ({"insight_face_model_path": "buffalo_l"}, "insight_face_model_path", "not downloaded"),
        ({"insight_face_model_path": "/etc"}, "insight_face_model_path", "under"),
        ({"insight_face_model_path": "EMPTY"}, "insight_face_model_path", "no .onnx"),
        ({"weight_name": "ip-adapter-faceid_sd15.bin"}, "weight_name", "FaceID .bin"),
    ],
)
def test_refusals_name_the_field(root: Path, change: dict, field: str, words: str) -> None:
    if change.get("insight_face_model_path") == "EMPTY":
        change = {"insight_face_model_path": str(root / "empty")}
    with pytest.raises(InputError) as info:
        check_ip_adapter(_input(root, **change), root.resolve(), check_model_name)
    assert info.value.loc == ("body", "ip_adapter", 0, field)
    assert words in info.value.msg


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


PACK = _zip({"buffalo_l/det_10g.onnx": b"det", "buffalo_l/w600k_r50.onnx": b"rec", "../evil.txt": b"x"})


class _Media:
    """The MediaLoader calls load_ip_adapter makes for a local adapter: the image, the pack .zip (checked as
    the gateway's GatewayMedia.model_pack checks it)."""

    async def image(self, url: str, loc, *, mode: str = "RGB") -> np.ndarray:
        return np.zeros((8, 8, 3), np.uint8)

    def __init__(self, store: Path):
        self.store = store  # the checkpoint directory under the model root

    async def model_pack(self, url: str, loc) -> str:
        check_model_pack(PACK, loc, 1 << 20)
        self.store.mkdir(parents=True, exist_ok=True)
        path = self.store / f"{hashlib.sha256(PACK).hexdigest()}.zip"
        path.write_bytes(PACK)
        return str(path)


def test_model_pack_zips_are_checked() -> None:
    check_model_pack(PACK, ("x",), 1 << 20)
    for bad, words in [(b"not a zip", "does not hold a .zip"), (_zip({"a.txt": b"a"}), "no .onnx")]:
        with pytest.raises(InputError, match=words):
            check_model_pack(bad, ("x",), 1 << 20)
    with pytest.raises(InputError, match="unpack to more than"):
        check_model_pack(_zip({"big.onnx": bytes(4096)}), ("x",), 1024)


def test_pack_url_round_trip_unpacks_only_the_onnx_files(root: Path) -> None:
    """A pack URL is streamed to the checkpoint store (never sent in MEDIA); the Triton side unpacks the
    stored .zip once per content under the model root, .onnx files only, flattened."""
    from ember.pipeline.ip_adapter import PACK_CACHE

    arrays: list[np.ndarray] = []
    inp = _input(root, insight_face_model_path="https://x/buffalo_l.zip")
    options = asyncio.run(load_ip_adapter(inp, _Media(root / "checkpoints"), arrays))
    stored = root / "checkpoints" / f"{hashlib.sha256(PACK).hexdigest()}.zip"
    assert options["adapters"][0]["insight_face"] == {"zip": str(stored)}
    assert len(arrays) == 1  # the image alone: the pack travels as a path
    tensors = {"MEDIA": media_tensor(arrays)}
    request = parse_ip_adapter_options(options, lambda i, w: media_array(tensors, i, w), root)
    pack = Path(request.units[0].face_pack)
    assert pack.parent == root / PACK_CACHE
    assert sorted(p.name for p in pack.iterdir()) == ["det_10g.onnx", "w600k_r50.onnx"]  # flattened
    again = parse_ip_adapter_options(options, lambda i, w: media_array(tensors, i, w), root)
    assert again.units[0].face_pack == str(pack)  # unpacked once per content


def test_options_round_trip_into_the_request(root: Path) -> None:
    inp = _input(root, image_projection_shortcut=False)
    arrays: list[np.ndarray] = []
    options = asyncio.run(load_ip_adapter(inp, _Media(root / "checkpoints"), arrays))
    tensors = {"MEDIA": media_tensor(arrays)}
    request = parse_ip_adapter_options(
        json.loads(json.dumps(options)), lambda i, w: media_array(tensors, i, w), root
    )
    assert request is not None
    (unit,) = request.units
    assert unit.weights.face == "faceid" and not unit.weights.uses_encoder
    assert unit.face_pack == str((root / "buffalo_l").resolve()) and unit.shortcut is False
    assert request.image_encoder == ""  # plain FaceID: no CLIP image encoder
    # FaceID weights without an InsightFace pack are refused by name on the Triton side too
    options["adapters"][0]["insight_face"] = None
    with pytest.raises(ValueError, match=r"ip_adapter\[0\].insight_face_model_path is required"):
        parse_ip_adapter_options(options, lambda i, w: media_array(tensors, i, w), root)
