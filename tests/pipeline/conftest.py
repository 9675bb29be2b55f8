"""Tiny-model fixtures for pipeline tests, built once per session.

The demo model and its exports go into the session's shared `var_dir` (tests/conftest.py), so the e2e
stack reuses them instead of building its own. Everything is loaded back through from_pretrained and the
artifact cache, exactly as in serving.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ember.pipeline import LcmText2ImagePipeline
from ember.settings import Settings, load_settings
from ember.specs import Artifacts, ensure_artifacts, read_artifacts


def tiny_settings(var_dir: Path, **env: str) -> Settings:
    """Settings from an explicit environment only (the caller's EMBER_* variables must not leak in)."""
    return load_settings(
        {"EMBER_VAR_DIR": str(var_dir), "EMBER_WEIGHTS": "demo", **env}, dotenv=Path("/nonexistent")
    )


@pytest.fixture(scope="session")
def lcm_settings(var_dir: Path) -> Settings:
    return tiny_settings(var_dir)


@pytest.fixture(scope="session")
def lcm_artifacts(lcm_settings: Settings) -> Artifacts:
    return read_artifacts(ensure_artifacts(lcm_settings, "lcm", "sdv1-5", progress=False))


@pytest.fixture(scope="session")
def ort_pipeline(lcm_settings: Settings, lcm_artifacts: Artifacts) -> LcmText2ImagePipeline:
    return LcmText2ImagePipeline.from_artifacts(lcm_settings, lcm_artifacts)


@pytest.fixture(scope="session")
def torch_pipeline(var_dir: Path, lcm_artifacts: Artifacts) -> LcmText2ImagePipeline:
    settings = tiny_settings(var_dir, EMBER_RUNTIME="torch", EMBER_DEVICE="cpu", EMBER_DTYPE="float32")
    return LcmText2ImagePipeline.from_artifacts(settings, lcm_artifacts)


@pytest.fixture(scope="session")
def diffusers_lcm(lcm_artifacts: Artifacts):
    """The reference: diffusers' own LatentConsistencyModelPipeline on the same tiny weights, in torch."""
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(
        lcm_artifacts.source, safety_checker=None, requires_safety_checker=False, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def safety_checker(lcm_settings: Settings):
    """The shared safety checker stage over the tiny demo checker, on onnxruntime."""
    from ember.pipeline.safety import load_safety_checker

    return load_safety_checker(lcm_settings)


@pytest.fixture(scope="session")
def checked_pipeline(lcm_settings: Settings, lcm_artifacts: Artifacts, safety_checker) -> LcmText2ImagePipeline:
    """The onnxruntime pipeline with the safety checker, as served (load_lcm_pipeline)."""
    return LcmText2ImagePipeline.from_artifacts(lcm_settings, lcm_artifacts, safety_checker=safety_checker)


def _diffusers_components(source: str) -> dict:
    from diffusers import LatentConsistencyModelPipeline

    pipe = LatentConsistencyModelPipeline.from_pretrained(
        source, safety_checker=None, requires_safety_checker=False, dtype=torch.float32
    )
    return dict(pipe.components)


@pytest.fixture(scope="session")
def diffusers_lcm_img2img(lcm_artifacts: Artifacts):
    """diffusers' LatentConsistencyModelImg2ImgPipeline on the same tiny weights."""
    from diffusers import LatentConsistencyModelImg2ImgPipeline

    pipe = LatentConsistencyModelImg2ImgPipeline(
        **_diffusers_components(lcm_artifacts.source) | {"requires_safety_checker": False}
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def diffusers_lcm_inpaint(lcm_artifacts: Artifacts):
    """The inpainting reference: StableDiffusionInpaintPipeline with the LCM scheduler and LCM UNet (it passes
    the guidance embedding as timestep_cond because the UNet has time_cond_proj_dim)."""
    from diffusers import StableDiffusionInpaintPipeline

    components = _diffusers_components(lcm_artifacts.source)
    pipe = StableDiffusionInpaintPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
