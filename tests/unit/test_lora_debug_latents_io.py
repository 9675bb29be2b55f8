"""fal-ai/lora debug latents, gateway side: the safetensors writer (read back by the safetensors library), the
OPTIONS flags sent to the model, the size limit, and to_output storing the model's latents as fal File
objects through a real FileStore (stored files, or data URIs with sync_mode)."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load as load_safetensors

from ember.endpoints.common import InputError
from ember.endpoints.lora.schema import LoraInput
from ember.endpoints.lora.translate import LoraEndpoint
from ember.endpoints.tensor_files import safetensors_bytes
from ember.gateway.files import FileStore


def test_safetensors_writer_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "latents": rng.standard_normal((3, 2, 4, 5, 7)).astype(np.float32),
        "timesteps": np.array([999.0, 500.5, 1.0], dtype=np.float32),
        "half": rng.standard_normal((1, 3)).astype(np.float16),
        "ids": np.arange(5, dtype=np.int64),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }
    data = safetensors_bytes(tensors, {"ember": "test"})
    loaded = load_safetensors(data)
    assert sorted(loaded) == sorted(tensors)
    for name, array in tensors.items():
        assert loaded[name].dtype == array.dtype and np.array_equal(loaded[name], array), name
    (tmp_path / "x.safetensors").write_bytes(data)
    with safe_open(tmp_path / "x.safetensors", framework="np") as f:
        assert f.metadata() == {"ember": "test"}
    with pytest.raises(ValueError, match="dtype"):
        safetensors_bytes({"x": np.zeros(2, dtype=np.float64)})


def _input(**kw) -> LoraInput:
    return LoraInput(model_name="a/b", prompt="p", image_size={"width": 64, "height": 64}, **kw)


def test_flags_reach_the_model_and_are_no_longer_refused() -> None:
    endpoint = LoraEndpoint()
    inp = _input(debug_latents=True, debug_per_pass_latents=True)
    endpoint.check(inp)
    options = json.loads(endpoint.to_triton(inp, seed=1)["OPTIONS"][0, 0])
    assert options["debug_latents"] is True and options["debug_per_pass_latents"] is True
    plain = json.loads(endpoint.to_triton(_input(), seed=1)["OPTIONS"][0, 0])
    assert plain["debug_latents"] is False and plain["debug_per_pass_latents"] is False


def test_per_pass_size_limit_names_the_field() -> None:
    endpoint = LoraEndpoint()
    # fal's defaults at 1024 x 1024 with 8 images (~62 MiB) are served ...
    endpoint.check(LoraInput(model_name="a/b", prompt="p", num_images=8, debug_per_pass_latents=True))
    # ... 150 steps x 8 images at 2048 x 2048 (~1.2 GiB) are not, and the message says what to lower.
    big = LoraInput(
        model_name="a/b",
        prompt="p",
        num_images=8,
        num_inference_steps=150,
        image_size={"width": 2048, "height": 2048},
        debug_per_pass_latents=True,
    )
    with pytest.raises(InputError) as info:
        endpoint.check(big)
    assert info.value.loc == ("body", "debug_per_pass_latents") and "num_images" in info.value.msg
    endpoint.check(big.model_copy(update={"debug_per_pass_latents": False, "debug_latents": True}))


def _outputs(passes: int = 3, k: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    per_pass = rng.standard_normal((1, passes, k, 4, 8, 8)).astype(np.float32)
    return {
        "IMAGES": np.zeros((1, k, 64, 64, 3), dtype=np.uint8),
        "NSFW": np.zeros((1, k), dtype=bool),
        "LATENTS": per_pass[:, -1].copy(),
        "PASS_LATENTS": per_pass,
        "PASS_TIMESTEPS": np.array([[999.0, 500.0, 1.0][:passes]], dtype=np.float32),
    }


@pytest.mark.parametrize("sync_mode", [False, True])
def test_to_output_stores_safetensors_files(tmp_path: Path, sync_mode: bool) -> None:
    store = FileStore(tmp_path / "files", "https://gw.example")
    outputs = _outputs()
    # fal-ai/lora has no sync_mode field; the sink's mode is the one other endpoints' sync_mode picks.
    inp = _input(debug_latents=True, debug_per_pass_latents=True, num_images=2)

    async def run():
        return await LoraEndpoint().to_output(inp, 5, outputs, store.sink(sync_mode))

    try:
        out = asyncio.run(run())
    finally:
        store.close()
    files = {}
    for field in ("debug_latents", "debug_per_pass_latents"):
        f = getattr(out, field)
        assert f is not None and f.content_type == "application/octet-stream"
        assert f.file_name.endswith(".safetensors")
        if sync_mode:
            prefix = "data:application/octet-stream;base64,"
            assert f.url.startswith(prefix)
            data = base64.b64decode(f.url[len(prefix) :])
        else:
            assert f.url == f"https://gw.example/files/{f.file_name}"
            data = (tmp_path / "files" / f.file_name).read_bytes()
            assert store.info(f.file_name).content_type == "application/octet-stream"
        assert len(data) == f.file_size
        files[field] = load_safetensors(data)
    assert np.array_equal(files["debug_latents"]["latents"], outputs["LATENTS"][0])
    assert np.array_equal(files["debug_per_pass_latents"]["latents"], outputs["PASS_LATENTS"][0])
    assert np.array_equal(files["debug_per_pass_latents"]["timesteps"], outputs["PASS_TIMESTEPS"][0])
    if sync_mode:
        assert [p.name for p in (tmp_path / "files").iterdir() if not p.name.startswith(".")] == []
    # Always serialized: the field names are in the JSON whatever was asked.
    dumped = json.loads(out.model_dump_json())
    assert dumped["debug_latents"]["file_name"] == out.debug_latents.file_name


def test_to_output_without_flags_emits_null(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "files", "https://gw.example")
    outputs = {k: v for k, v in _outputs().items() if k in ("IMAGES", "NSFW")}
    try:
        out = asyncio.run(LoraEndpoint().to_output(_input(num_images=2), 5, outputs, store.sink(False)))
    finally:
        store.close()
    dumped = json.loads(out.model_dump_json())
    assert dumped["debug_latents"] is None and dumped["debug_per_pass_latents"] is None
    assert len(dumped["images"]) == 2


def test_a_response_without_the_asked_latents_is_an_error(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "files", "https://gw.example")
    outputs = {k: v for k, v in _outputs().items() if k != "PASS_TIMESTEPS"}
    inp = _input(debug_per_pass_latents=True, num_images=2)
    try:
        with pytest.raises(ValueError, match="PASS_TIMESTEPS"):
            asyncio.run(LoraEndpoint().to_output(inp, 5, outputs, store.sink(False)))
    finally:
        store.close()
