"""ONNX exports: verified against torch, dynamic where they must be, cached under a key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import onnx
import pytest
import torch

from ember.specs import ensure_artifacts, read_artifacts
from ember.specs.artifacts import cache_key, family_spec
from ember.specs.controlnet import SD15_LCM_CONTROLLABLE_NETWORKS
from ember.specs.onnx_export import VERIFY_ATOL, verify_onnx
from ember.specs.safety import SAFETY_NETWORKS
from ember.specs.sd15 import SD15_LCM_NETWORKS
from tests.pipeline.conftest import tiny_settings


@pytest.mark.parametrize("spec", SD15_LCM_CONTROLLABLE_NETWORKS, ids=lambda s: s.name)
def test_export_matches_torch(spec, lcm_artifacts) -> None:
    """onnxruntime vs torch on a fresh sample at a shape other than the traced one (batch 1, 192x320 px):
    max |diff| <= 1e-3 (fp32, kernels differ; measured ~1e-6 to 2e-5)."""
    module = spec.load(lcm_artifacts.source, None, torch.float32)
    worst = verify_onnx(
        spec, module, lcm_artifacts.config(spec.subfolder), lcm_artifacts.onnx_path(spec.name)
    )
    assert worst <= VERIFY_ATOL
    assert lcm_artifacts.manifest["networks"][spec.name]["verified_max_abs_diff"] <= VERIFY_ATOL


@pytest.mark.parametrize("spec", SD15_LCM_CONTROLLABLE_NETWORKS, ids=lambda s: s.name)
def test_export_io_follows_the_spec(spec, lcm_artifacts) -> None:
    graph = onnx.load(str(lcm_artifacts.onnx_path(spec.name)), load_external_data=False).graph
    assert [i.name for i in graph.input] == spec.input_names
    assert [o.name for o in graph.output] == spec.output_names
    for tensor, value in zip(spec.inputs, graph.input, strict=True):
        dims = value.type.tensor_type.shape.dim
        dynamic = {i for i, d in enumerate(dims) if d.dim_param}
        assert dynamic == set(tensor.dynamic_axes()), tensor.name


def test_second_call_rebuilds_nothing_and_same_dir(lcm_settings, lcm_artifacts) -> None:
    def written() -> dict[str, int]:
        return {str(p): p.stat().st_mtime_ns for p in lcm_artifacts.path.rglob("*")}

    before = written()
    path = ensure_artifacts(lcm_settings, "lcm", "sdv1-5", progress=False)
    assert path == lcm_artifacts.path
    assert written() == before  # found complete: nothing exported or written again
    assert {"tokenizer", "scheduler", "manifest.json", "unet.onnx"} <= {p.name for p in path.iterdir()}


def test_cache_key_names_what_an_export_depends_on(lcm_settings) -> None:
    key = cache_key(lcm_settings, "lcm", "sdv1-5")
    assert {"source", "revision", "precision", "opset", "torch", "onnx", "specs"} <= set(key)
    assert key["specs"] == {"text_encoder": 1, "unet": 1, "vae_decoder": 1, "vae_encoder": 1, "controlled_unet": 1}
    real = dataclasses.replace(lcm_settings, weights="real", models=lcm_settings.models)
    assert cache_key(real, "lcm", "sdv1-5")["source"] == "SimianLuo/LCM_Dreamshaper_v7"


def test_profiles_cover_fal_presets(lcm_artifacts) -> None:
    unet = SD15_LCM_NETWORKS[1]
    profile = unet.profile(lcm_artifacts.config("unet"))
    low, opt, high = profile["sample"]
    assert opt == (1, 4, 64, 64)  # fal-ai/lcm's 512 x 512 default
    assert low[2:] == (32, 32) and high[2:] == (128, 128) and high[0] == 16


def test_second_call_in_a_fresh_process_imports_no_torch(lcm_settings, lcm_artifacts) -> None:
    """The launcher calls ensure_artifacts on every start: with everything built it must stay cheap."""
    code = (
        "import sys; from ember.specs import ensure_artifacts; from ember.settings import load_settings; "
        f"s = load_settings({{'EMBER_VAR_DIR': {str(lcm_settings.var_dir)!r}}}, dotenv=__import__('pathlib').Path('/x')); "
        "print(ensure_artifacts(s, progress=False)); "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'onnx') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[0] == str(lcm_artifacts.path) and out[1] == "[]"


def test_torch_runtime_needs_no_onnx_and_onnx_is_added_later(tmp_path) -> None:
    torch_first = tiny_settings(tmp_path, EMBER_RUNTIME="torch")
    path = ensure_artifacts(torch_first, "lcm", "sdv1-5", progress=False)
    assert read_artifacts(path).manifest["networks"] == {} and not list(path.glob("*.onnx"))
    assert read_artifacts(path).config("unet")["time_cond_proj_dim"] == 256
    again = ensure_artifacts(tiny_settings(tmp_path), "lcm", "sdv1-5", progress=False)
    assert again == path and {p.name for p in path.glob("*.onnx")} == {
        f"{n}.onnx" for n in ("text_encoder", "unet", "vae_decoder", "vae_encoder", "controlled_unet")
    }


def test_registry_versions_match_the_specs() -> None:
    assert family_spec("lcm", "sdv1-5").load_networks() == SD15_LCM_CONTROLLABLE_NETWORKS
    assert family_spec("safety_checker", "sd").load_networks() == SAFETY_NETWORKS


def test_safety_checker_exports_verified_with_its_feature_extractor(lcm_settings) -> None:
    """The shared checker is its own family: no tokenizer or scheduler, its CLIPImageProcessor instead."""
    path = ensure_artifacts(lcm_settings, "safety_checker", "sd", progress=False)
    artifacts = read_artifacts(path)
    assert (artifacts.feature_extractor_dir / "preprocessor_config.json").is_file()
    assert not artifacts.tokenizer_dir.exists() and not artifacts.scheduler_dir.exists()
    entry = artifacts.manifest["networks"]["safety_checker"]
    assert entry["verified_max_abs_diff"] < 1e-3
    assert set(entry["outputs"]) == {"special_scores", "concept_scores"}
