"""The TensorRT engine cache key and shape buckets: pure Python, no TensorRT or GPU needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.runtime import engine_options
from ember.runtime.engine_cache import (
    EngineOptions,
    GpuIdentity,
    engine_cache_key,
    engine_dir,
    key_hash,
    read_engine_set,
    timing_cache_path,
)
from ember.settings import load_settings
from ember.specs.base import FAL_IMAGE_SIZES, ShapeBucket, fal_buckets

H100 = GpuIdentity("NVIDIA H100 80GB HBM3", (9, 0))
NETWORKS = {"text_encoder": 1, "unet": 1, "vae_decoder": 1}


def _key(**changes: object) -> str:
    base = {
        "model_hash": "b99399ebddee1345",
        "networks": NETWORKS,
        "gpu": H100,
        "trt_version": "10.7.0",
        "options": EngineOptions(),
    }
    return key_hash(engine_cache_key(**{**base, **changes}))


def test_every_field_of_the_key_changes_the_engine_directory() -> None:
    base = _key()
    variants = [
        _key(model_hash="0000000000000000"),
        _key(networks={**NETWORKS, "unet": 2}),
        _key(gpu=GpuIdentity("NVIDIA H200", (9, 0))),
        _key(gpu=GpuIdentity("NVIDIA H100 80GB HBM3", (8, 9))),
        _key(trt_version="10.8.0"),
        _key(options=EngineOptions(precision="bf16")),
        _key(options=EngineOptions(strongly_typed=True)),
        _key(options=EngineOptions(refit="lora")),
        _key(options=EngineOptions(buckets=fal_buckets(dynamic=True))),
        _key(options=EngineOptions(buckets=fal_buckets(max_batch=8))),
        _key(options=EngineOptions(optimization_level=5)),
    ]
    assert len({base, *variants}) == len(variants) + 1
    assert _key() == base  # and it is deterministic


def test_layout_and_timing_cache_name(tmp_path: Path) -> None:
    key = engine_cache_key("abc", NETWORKS, H100, "10.7.0", EngineOptions())
    assert engine_dir(tmp_path, key) == tmp_path / "tensorrt" / key_hash(key)
    assert timing_cache_path(tmp_path, H100, "10.7.0").name == "nvidia-h100-80gb-hbm3-sm90-trt10.7.0.cache"
    with pytest.raises(FileNotFoundError, match="python -m export engines"):
        read_engine_set(tmp_path / "missing")


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="precision"):
        EngineOptions(precision="fp8")
    with pytest.raises(ValueError, match="refit"):
        EngineOptions(refit="always")
    with pytest.raises(ValueError, match="bucket"):
        EngineOptions(buckets=())


def test_fal_buckets_cover_each_preset_and_the_dynamic_range() -> None:
    buckets = fal_buckets(max_batch=8, dynamic=True)
    assert [b.name for b in buckets] == [*FAL_IMAGE_SIZES, "dynamic"]
    portrait = buckets[list(FAL_IMAGE_SIZES).index("portrait_16_9")]
    assert (portrait.height, portrait.width) == (1024, 576)  # presets are (width, height)
    assert portrait.covers(8, 1024, 576) and not portrait.covers(9, 1024, 576)
    assert not portrait.covers(1, 576, 1024)
    dynamic = buckets[-1]
    assert dynamic.covers(3, 264, 1000) and not dynamic.covers(1, 1032, 512)
    assert dynamic.corners() == ((1, 256, 256), (1, 512, 512), (8, 1024, 1024))


def test_bucket_profiles_follow_the_spec_axes() -> None:
    from ember.runtime.tensorrt_build import network_buckets
    from ember.specs.sd15 import TEXT_ENCODER, UNET

    config = {"in_channels": 4, "cross_attention_dim": 768, "time_cond_proj_dim": 256}
    square = ShapeBucket("square", 512, 512, batch_opt=2, batch_max=8)
    profile = UNET.bucket_profile(config, square)
    assert profile["sample"] == ((1, 4, 64, 64), (2, 4, 64, 64), (8, 4, 64, 64))
    assert profile["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (8, 77, 768))
    # The text encoder ignores the image size: one profile serves every bucket.
    assert UNET.size_dependent() and not TEXT_ENCODER.size_dependent()
    (only,) = network_buckets(TEXT_ENCODER, fal_buckets(max_batch=8))
    assert only.covers(8, 1024, 576) and only.covers(1, 64, 64)
    assert len(network_buckets(UNET, fal_buckets())) == len(FAL_IMAGE_SIZES)


def test_engine_options_come_from_models_toml(tmp_path: Path) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        '[lcm.sdv1-5]\nsource = "x"\ndemo = "tiny"\nruntime = "tensorrt"\n'
        '[lcm.sdv1-5.engines]\nprecision = "bf16"\ndynamic = true\nmax_batch = 4\nrefit = "lora"\n'
    )
    settings = load_settings({"EMBER_MODELS_FILE": str(models)}, dotenv=Path("/nonexistent"))
    assert settings.model_runtime("lcm", "sdv1-5") == "tensorrt"  # overrides EMBER_RUNTIME (onnxruntime)
    options = engine_options(settings, "lcm", "sdv1-5")
    assert options.precision == "bf16"
    assert options.refit == "lora" and options.buckets[-1].dynamic and options.buckets[0].batch_max == 4
    models.write_text('[lcm.sdv1-5]\nsource = "x"\ndemo = "tiny"\n[lcm.sdv1-5.engines]\nfp8 = true\n')
    settings = load_settings({"EMBER_MODELS_FILE": str(models)}, dotenv=Path("/nonexistent"))
    with pytest.raises(ValueError, match="unknown keys"):
        engine_options(settings, "lcm", "sdv1-5")


def test_export_cli_settings_force_onnx_and_take_a_model_override(tmp_path: Path) -> None:
    from export.engines import onnx_settings, parser

    models = tmp_path / "models.toml"
    models.write_text('[lcm.sdv1-5]\nsource = "a/b"\ndemo = "tiny"\nruntime = "torch"\n')
    settings = load_settings({"EMBER_MODELS_FILE": str(models)}, dotenv=Path("/nonexistent"))
    forced = onnx_settings(settings, "lcm", "sdv1-5", model="/models/dreamshaper")
    assert forced.model_runtime("lcm", "sdv1-5") == "onnxruntime" and forced.weights == "real"
    assert forced.model_source("lcm", "sdv1-5") == "/models/dreamshaper"
    assert settings.model_runtime("lcm", "sdv1-5") == "torch"  # the original is untouched
    args = parser().parse_args(["engines", "--precision", "bf16", "--refit", "lora", "--dynamic"])
    assert (args.precision, args.refit, args.dynamic, args.max_batch) == ("bf16", "lora", True, 16)
