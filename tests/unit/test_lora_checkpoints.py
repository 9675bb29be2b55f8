"""fal-ai/lora single-file checkpoints on the gateway side: the model_name rule for URLs and files, the
streaming download into the content-addressed directory (real fetcher, real sockets on 127.0.0.1),
header-only safetensors checks, family detection by tensor names, and the built-in SD1.5 configs."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from safetensors.numpy import save as save_numpy

from ember.endpoints.common import InputError
from ember.endpoints.lora.translate import check_model_name
from ember.gateway.checkpoints import CheckpointCache
from ember.gateway.fetcher import Fetcher, FetchPolicy
from ember.gateway.weights import check_safetensors, check_safetensors_file
from ember.specs.checkpoint_keys import checkpoint_family, refusal

LOC = ("body", "model_name")
SD15_NAMES = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "first_stage_model.encoder.conv_in.weight",
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
)
SD2_NAMES = (*SD15_NAMES[:2], "cond_stage_model.model.ln_final.weight")
SDXL_NAMES = (
    "model.diffusion_model.input_blocks.0.0.weight",
    "model.diffusion_model.label_emb.0.0.weight",
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",
    "conditioner.embedders.1.model.token_embedding.weight",
)


def _checkpoint(names: tuple[str, ...], fill: float = 0.0) -> bytes:
    return save_numpy({name: np.full((2, 3), fill, np.float32) for name in names})


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, bytes]] = {}
    bodies_sent: ClassVar[dict[str, int]] = {}  # path -> full answers (200 with the body)

    def do_GET(self) -> None:
        body = self.routes.get(self.path)
        # paths under /validated/ answer with an ETag and honour If-None-Match, as CDNs and the HF hub do
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"' if body is not None else None
        if self.path.startswith("/validated/") and etag and self.headers.get("If-None-Match") == etag:
            self.send_response(304)
            self.send_header("ETag", etag)
            self.end_headers()
            return
        self.send_response(200 if body is not None else 404)
        if self.path.startswith("/validated/") and etag:
            self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")
        if body is not None:
            self.bodies_sent[self.path] = self.bodies_sent.get(self.path, 0) + 1

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _cache(directory: Path, max_bytes: int = 1 << 20) -> CheckpointCache:
    fetcher = Fetcher(FetchPolicy(allow=("127.0.0.1/32",)))
    return CheckpointCache(fetcher, None, directory, max_bytes=max_bytes, timeout_s=10)


def test_model_name_accepts_checkpoint_urls_and_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "m.safetensors").write_bytes(_checkpoint(SD15_NAMES))
    for ok in (
        "https://example.com/m.safetensors",
        "data:application/octet-stream;base64,AAAA",
        str(root / "checkpoints" / "m.safetensors"),
    ):
        check_model_name(ok, LOC, root, single_file=True)
    # unet_name (single_file=False) keeps refusing URLs; files outside the root stay refused.
    with pytest.raises(InputError, match="not supported yet"):
        check_model_name("https://example.com/m.safetensors", ("body", "unet_name"), root)
    with pytest.raises(InputError, match="under"):
        check_model_name(str(tmp_path / "elsewhere.safetensors"), LOC, root, single_file=True)
    # An SDXL directory is served (ember.pipeline.lora_xl); what it does not serve yet is refused by field.
    (root / "xl").mkdir()
    (root / "xl" / "model_index.json").write_text(json.dumps({"text_encoder_2": ["transformers", "X"]}))
    check_model_name(str(root / "xl"), LOC, root, single_file=True)
    from ember.endpoints.lora.schema import LoraInput
    from ember.endpoints.lora.translate import check_sdxl_fields

    check_sdxl_fields(LoraInput(prompt="x", model_name=str(root / "xl")), root)
    for field, value in (("ic_light_model_url", "https://example.com/iclight.safetensors"),):
        with pytest.raises(InputError, match="SDXL") as info:
            check_sdxl_fields(LoraInput(prompt="x", model_name=str(root / "xl"), **{field: value}), root)
        assert info.value.loc == ("body", field)


def test_family_from_tensor_names() -> None:
    assert checkpoint_family(SD15_NAMES) == "sd15"
    assert checkpoint_family(SDXL_NAMES) == "sdxl"
    refiner = (*SDXL_NAMES[:2], "conditioner.embedders.0.model.ln_final.weight")
    assert checkpoint_family(refiner) == "sdxl_refiner"
    assert "refiner" in refusal("sdxl_refiner", "it") and refusal("sdxl", "it") is None
    assert checkpoint_family([*SD15_NAMES[:2], "cond_stage_model.model.ln_final.weight"]) == "sd2"
    with pytest.raises(ValueError, match="not a Stable Diffusion"):
        checkpoint_family(["lora_unet_down_blocks_0_attentions_0.lora_down.weight"])


def test_header_only_check_agrees_with_the_in_memory_one(tmp_path: Path) -> None:
    good = _checkpoint(SD15_NAMES)
    (tmp_path / "good").write_bytes(good)
    assert check_safetensors_file(tmp_path / "good", LOC).tensors == check_safetensors(good, LOC).tensors
    for bad in (good[:-4], pickle.dumps({"a": 1}), b"PK\x03\x04zip", good[:8] + b"{not json" + good[17:]):
        (tmp_path / "bad").write_bytes(bad)
        with pytest.raises(InputError):
            check_safetensors(bad, LOC)
        with pytest.raises(InputError):
            check_safetensors_file(tmp_path / "bad", LOC)


async def test_streamed_into_the_content_addressed_directory(server: str, tmp_path: Path) -> None:
    sd15, other = _checkpoint(SD15_NAMES), _checkpoint(SD15_NAMES, 1.0)
    _Handler.routes.update(
        {
            "/a.safetensors": sd15,
            "/same-content": sd15,
            "/b.safetensors": other,
            "/xl.safetensors": _checkpoint(SDXL_NAMES),
            "/sd2.safetensors": _checkpoint(SD2_NAMES),
            "/model.ckpt": pickle.dumps([1]),
            "/lora.safetensors": _checkpoint(("lora_unet_x.lora_down.weight",)),
        }
    )
    cache = _cache(tmp_path)
    a = await cache.fetch(f"{server}/a.safetensors", LOC)
    assert a.parent == tmp_path and a.read_bytes() == sd15
    import hashlib

    assert a.name == f"{hashlib.sha256(sd15).hexdigest()}.safetensors"
    assert await cache.fetch(f"{server}/same-content", LOC) == a  # stored once per content
    assert await cache.fetch(f"{server}/b.safetensors", LOC) != a
    xl = await cache.fetch(f"{server}/xl.safetensors", LOC)  # SDXL single files are served too
    assert xl.read_bytes() == _checkpoint(SDXL_NAMES)
    refused = {
        "/sd2.safetensors": "Stable Diffusion 2.x",
        "/model.ckpt": "only .safetensors",
        "/lora.safetensors": "not a Stable Diffusion",
        "/missing": "HTTP 404",
    }
    for path, message in refused.items():
        with pytest.raises(InputError, match=message) as info:
            await cache.fetch(f"{server}{path}", LOC)
        assert info.value.loc == LOC
    with pytest.raises(InputError, match="larger than"):
        await _cache(tmp_path, max_bytes=100).fetch(f"{server}/b.safetensors", LOC)
    # data: URIs take the same path; nothing half-written is left behind.
    import base64

    uri = "data:application/octet-stream;base64," + base64.b64encode(other).decode()
    assert (await cache.fetch(uri, LOC)).read_bytes() == other
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {a.name, xl.name, f"{hashlib.sha256(other).hexdigest()}.safetensors"}
    )


def test_builtin_sd15_config_is_the_real_architecture() -> None:
    """The committed configs build SD1.5's networks: known parameter counts (meta device, no weights)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ember.pipeline.base_models import BUILTIN_CONFIGS

    root = BUILTIN_CONFIGS / "sd15"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert (count(unet), count(vae), count(text)) == (859_520_964, 83_653_863, 123_060_480)


def test_builtin_sdxl_config_is_the_real_architecture() -> None:
    """The committed SDXL configs build stable-diffusion-xl-base-1.0's networks (meta device, no weights):
    known parameter counts, and the architecture signature a real SDXL single file is matched by."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ember.pipeline.base_models import BUILTIN_CONFIGS, _signature_of_config

    root = BUILTIN_CONFIGS / "sdxl"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))
        text_2 = CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(root / "text_encoder_2"))
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert (count(unet), count(vae), count(text), count(text_2)) == (
        2_567_463_684,
        83_653_863,
        123_060_480,
        694_659_840,
    )
    # sd_xl_base_1.0.safetensors: 70 UNet transformer blocks (1, 2, 10 per block), 2816 added conditions
    transformer_blocks = sum(
        1 for name, _ in unet.named_modules() if re.fullmatch(r".*transformer_blocks\.\d+", name)
    )
    signature = _signature_of_config(root)
    assert signature["unet_transformer_blocks"] == transformer_blocks == 70
    assert signature["added_cond_dim"] == 2816 and signature["cross_attention_dim"] == 2048


async def test_model_pack_zips_are_streamed_to_the_store(server: str, tmp_path: Path) -> None:
    """InsightFace model pack URLs (kind "pack") take the checkpoint path: streamed to `<sha256>.zip`, the
    central directory checked (ONNX members required), never held whole in memory."""
    import hashlib
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("buffalo_l/det_10g.onnx", b"det")
        archive.writestr("buffalo_l/w600k_r50.onnx", b"rec")
    pack = buffer.getvalue()
    _Handler.routes.update({"/buffalo_l.zip": pack, "/not-a-zip.zip": b"PK but not really"})
    cache = _cache(tmp_path)
    stored = await cache.fetch(f"{server}/buffalo_l.zip", LOC, kind="pack")
    assert stored == tmp_path / f"{hashlib.sha256(pack).hexdigest()}.zip" and stored.read_bytes() == pack
    with pytest.raises(InputError, match="does not hold a .zip"):
        await cache.fetch(f"{server}/not-a-zip.zip", LOC, kind="pack")
    assert sorted(p.name for p in tmp_path.iterdir()) == [stored.name]  # nothing half-written left


async def test_unchanged_urls_are_not_downloaded_again(server: str, tmp_path: Path) -> None:
    """A URL whose last answer carried an ETag is asked for conditionally: a 304 reuses the stored file (no
    byte moves); changed content is downloaded and stored under its new digest; a stored copy that was
    removed is fetched in full again; a server without validators is downloaded every time."""
    sd15, other = _checkpoint(SD15_NAMES), _checkpoint(SD15_NAMES, 2.0)
    _Handler.routes.update({"/validated/model.safetensors": sd15, "/plain/model.safetensors": sd15})
    _Handler.bodies_sent.clear()
    cache = _cache(tmp_path)
    url = f"{server}/validated/model.safetensors"
    first = await cache.fetch(url, LOC)
    assert await cache.fetch(url, LOC) == first
    assert _Handler.bodies_sent["/validated/model.safetensors"] == 1  # the second answer was a 304
    _Handler.routes["/validated/model.safetensors"] = other  # the content behind the URL changes
    changed = await cache.fetch(url, LOC)
    assert changed != first and changed.read_bytes() == other
    assert _Handler.bodies_sent["/validated/model.safetensors"] == 2
    changed.unlink()
    assert (await cache.fetch(url, LOC)).read_bytes() == other  # re-fetched in full
    assert _Handler.bodies_sent["/validated/model.safetensors"] == 3
    for _ in range(2):
        await cache.fetch(f"{server}/plain/model.safetensors", LOC)
    assert _Handler.bodies_sent["/plain/model.safetensors"] == 2
    assert not list(tmp_path.glob(".partial-*"))
