"""fal-ai/lora IC-Light fields: which combinations the gateway accepts (fal's doc: model + image, plus a
background for 'fbc' models), OPTIONS / MEDIA as to_triton sends them (the offset file as a path in the
shared checkpoint directory, never as bytes), the Triton side's parse_ic_light reading them back, and the
gateway streaming a file larger than the in-memory weights cap (real fetcher, real socket on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save as save_numpy

from ember.endpoints.common import InputError
from ember.endpoints.lora.schema import LoraInput
from ember.endpoints.lora.translate import LoraEndpoint
from ember.pipeline.ic_light import parse_ic_light
from ember.pipeline.lora_io import media_array

MODEL, IMAGE, BG = "https://h/iclight_sd15_fc.safetensors", "https://h/fg.png", "https://h/bg.png"


def _input(**kw) -> LoraInput:
    return LoraInput(model_name="a/b", prompt="p", image_size={"width": 64, "height": 64}, **kw)


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"ic_light_image_url": IMAGE}, "ic_light_model_url"),
        ({"ic_light_model_background_image_url": BG}, "ic_light_model_url"),
        ({"ic_light_model_url": MODEL}, "ic_light_image_url"),
        ({"ic_light_model_url": MODEL, "ic_light_model_background_image_url": BG}, "ic_light_image_url"),
        ({"ic_light_model_url": "ftp://h/x", "ic_light_image_url": IMAGE}, "ic_light_model_url"),
    ],
)
def test_incomplete_combinations_are_422(fields: dict, loc: str) -> None:
    with pytest.raises(InputError) as info:
        LoraEndpoint().check(_input(**fields))
    assert info.value.loc[:2] == ("body", loc), info.value.detail()


def test_loras_controlnets_and_ip_adapter_combine_with_ic_light() -> None:
    LoraEndpoint().check(
        _input(
            ic_light_model_url=MODEL,
            ic_light_image_url=IMAGE,
            loras=[{"path": "https://h/l.safetensors"}],
            controlnets=[{"path": "lllyasviel/control_v11p_sd15_canny", "image_url": IMAGE}],
            ip_adapter=[{"path": "https://h/ip.safetensors", "ip_adapter_image_url": IMAGE}],
            image_encoder_path="h94/IP-Adapter",
            image_encoder_subfolder="models/image_encoder",
        )
    )


def _stored(root: Path, content: bytes = b"offsets") -> Path:
    """A file where the gateway stores offset files: <root>/checkpoints/<sha256>.safetensors."""
    path = root / "checkpoints" / f"{hashlib.sha256(content).hexdigest()}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("background", [False, True])
def test_to_triton_and_back(background: bool, tmp_path: Path) -> None:
    fields = {"ic_light_model_url": MODEL, "ic_light_image_url": IMAGE}
    if background:
        fields["ic_light_model_background_image_url"] = BG
    inp = _input(**fields)
    LoraEndpoint().check(inp)
    fg = np.full((8, 6, 3), 7, np.uint8)
    bg = np.full((5, 9, 3), 9, np.uint8)
    media = [fg, bg] if background else [fg]
    stored = _stored(tmp_path)
    loaded = {
        "ic_light": {"path": str(stored), "image": 0, "background": 1 if background else None},
        "media": media,
    }
    tensors = LoraEndpoint().to_triton(inp, seed=1, loaded=loaded)
    options = json.loads(tensors["OPTIONS"][0, 0])
    assert "LORA_FILES" not in tensors and options["ic_light"]["path"] == str(stored)
    parsed = parse_ic_light(options["ic_light"], tmp_path, lambda i, what: media_array(tensors, i, what))
    assert parsed.path == str(stored) and parsed.digest == hashlib.sha256(b"offsets").hexdigest()
    assert np.array_equal(parsed.image, fg)
    assert (parsed.background is not None) == background
    if background:
        assert np.array_equal(parsed.background, bg)
    with pytest.raises(ValueError, match="Endpoint.load"):
        LoraEndpoint().to_triton(inp, seed=1, loaded={})


def test_plain_requests_carry_no_ic_light(tmp_path: Path) -> None:
    options = json.loads(LoraEndpoint().to_triton(_input(), seed=1)["OPTIONS"][0, 0])
    assert options["ic_light"] is None
    assert parse_ic_light(None, tmp_path, lambda i, what: None) is None


def test_parse_names_what_is_wrong(tmp_path: Path) -> None:
    stored = _stored(tmp_path)
    elsewhere = tmp_path / stored.name
    elsewhere.write_bytes(b"offsets")
    renamed = stored.parent / "offsets.safetensors"
    renamed.write_bytes(b"offsets")
    for path, message in (
        (None, "expected the offset file's path"),
        (str(elsewhere), "must be <sha256>.safetensors in"),  # outside <root>/checkpoints
        (str(renamed), "must be <sha256>.safetensors in"),  # not named by its digest
        (str(stored.parent / ("0" * 64 + ".safetensors")), "deleted"),
    ):
        with pytest.raises(ValueError, match=message):
            parse_ic_light({"path": path, "image": 0}, tmp_path, lambda i, what: None)
    gray = np.zeros((4, 4), np.uint8)
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        parse_ic_light({"path": str(stored), "image": 0}, tmp_path, lambda i, what: gray)


class _Handler(BaseHTTPRequestHandler):
    routes: ClassVar[dict[str, bytes]] = {}
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = self.routes.get(self.path)
        self.send_response(200 if body is not None else 404)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


async def test_offset_files_above_the_weights_cap_stream_to_disk_once(tmp_path: Path) -> None:
    """The gateway's real media loader with the in-memory weights cap lowered below the file's size (as a
    1.7 GB IC-Light file is above the 512 MiB one): the file streams into the checkpoint directory by
    content, OPTIONS carries its path, LORA_FILES carries nothing; the same URL again lands on the same
    stored file; non-UNet files are refused at the field."""
    from ember.gateway.checkpoints import SUBDIR, CheckpointCache
    from ember.gateway.fetcher import Fetcher, FetchPolicy
    from ember.gateway.inputs import GatewayMedia
    from ember.settings import Settings

    offsets = save_numpy(
        {"conv_in.weight": np.ones((4, 8, 3, 3), np.float32), "conv_in.bias": np.zeros(4, np.float32)}
    )
    png = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(png, format="PNG")
    _Handler.routes.update(
        {
            "/fc.safetensors": offsets,
            "/fg.png": png.getvalue(),
            "/lora.safetensors": save_numpy({"x": np.ones(2)}),
        }
    )
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        settings = Settings(
            lora_model_root=str(tmp_path), weights_max_bytes=256, checkpoint_max_bytes=1 << 20
        )
        assert len(offsets) > settings.weights_max_bytes  # media.weights would refuse this file
        fetcher = Fetcher(FetchPolicy(allow=("127.0.0.1/32",)))
        checkpoints = CheckpointCache(
            fetcher,
            None,
            settings.lora_models_dir / SUBDIR,
            max_bytes=settings.checkpoint_max_bytes,
            timeout_s=10,
        )
        media = GatewayMedia(
            fetcher,
            None,
            (),
            max_image_bytes=1 << 20,
            max_weights_bytes=settings.weights_max_bytes,
            checkpoints=checkpoints,
        )
        with pytest.raises(InputError, match="larger than 256"):
            await media.weights(f"{base}/fc.safetensors", ("body", "ic_light_model_url"))
        inp = _input(ic_light_model_url=f"{base}/fc.safetensors", ic_light_image_url=f"{base}/fg.png")
        sent = []
        for _ in range(2):
            loaded = await LoraEndpoint().load(inp, media)
            tensors = LoraEndpoint().to_triton(inp, seed=1, loaded=loaded)
            assert "LORA_FILES" not in tensors  # the offsets never travel as bytes
            assert offsets not in [bytes(b) for b in tensors["MEDIA"].reshape(-1)]
            sent.append(json.loads(tensors["OPTIONS"][0, 0])["ic_light"])
        assert sent[0] == sent[1]
        stored = Path(sent[0]["path"])
        assert (
            stored.read_bytes() == offsets
            and stored.name == f"{hashlib.sha256(offsets).hexdigest()}.safetensors"
        )
        assert [p.name for p in stored.parent.iterdir()] == [stored.name]  # stored once, nothing half-written
        parsed = parse_ic_light(sent[0], tmp_path, lambda i, what: media_array(tensors, i, what))
        assert parsed.tensors()["conv_in.weight"].shape == (4, 8, 3, 3)
        bad = _input(ic_light_model_url=f"{base}/lora.safetensors", ic_light_image_url=f"{base}/fg.png")
        with pytest.raises(InputError, match="not a UNet weight file") as info:
            await LoraEndpoint().load(bad, media)
        assert info.value.loc[:2] == ("body", "ic_light_model_url")
    finally:
        httpd.shutdown()


def test_sdxl_bases_refuse_ic_light_as_sd15_only(tmp_path: Path) -> None:
    """IC-Light's offsets fit the SD1.5 UNet only: an SDXL base refuses it (gateway and Triton side alike),
    saying so rather than "not supported yet"."""
    from types import SimpleNamespace

    from ember.endpoints.lora.translate import check_sdxl_fields
    from ember.pipeline.lora_xl import xl_problems

    (tmp_path / "xl").mkdir()
    (tmp_path / "xl" / "model_index.json").write_text(json.dumps({"text_encoder_2": ["transformers", "X"]}))
    inp = LoraInput(
        prompt="x", model_name=str(tmp_path / "xl"), ic_light_model_url=MODEL, ic_light_image_url=IMAGE
    )
    with pytest.raises(InputError, match="offsets for the SD1.5 UNet") as info:
        check_sdxl_fields(inp, tmp_path)
    assert info.value.loc == ("body", "ic_light_model_url")
    (problem,) = xl_problems(SimpleNamespace(ic_light=object()))
    assert problem.startswith("ic_light_model_url:") and "SDXL" in problem and "SD1.5" in problem
    assert xl_problems(SimpleNamespace(ic_light=None)) == []
