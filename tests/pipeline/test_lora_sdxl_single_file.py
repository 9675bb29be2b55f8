"""fal-ai/lora `model_name` as an SDXL single-file checkpoint (SGM layout, as sd_xl_base_1.0.safetensors):
the tiny SDXL base written in that layout (tests/single_file_checkpoint.py, diffusers' own key tables run
backwards) is told apart by its tensor names, matched to its config directory by shapes, converted once
with StableDiffusionXLPipeline.from_single_file into a cached diffusers directory and served by
XLBaseModel: images bit-identical to the same model loaded as a directory."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.pipeline.base_models import CONFIGS_SUBDIR, checkpoint_shapes, match_config
from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.pipeline.lora_xl import XLBaseModel
from ember.specs.checkpoint_keys import checkpoint_family
from ember.specs.demo_sdxl import TEXT_HIDDEN, build_tiny_sdxl
from tests.pipeline.conftest import tiny_settings
from tests.single_file_checkpoint import to_single_file_xl

SIZE, STEPS = 64, 3
# diffusers' from_single_file tells SDXL's encoders apart by width (768 vs 1280): the stand-in's differ too.
TEXT_HIDDEN_2 = TEXT_HIDDEN + 16


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """EMBER_LORA_MODEL_ROOT: the tiny SDXL base, its single file, and its configs (no weights, no
    tokenizers: those are written from open_clip's BPE as for the built-in configs) under
    single-file-configs/ so conversion finds the tiny architecture."""
    root = tmp_path_factory.mktemp("lora-xl-root")
    model = build_tiny_sdxl(root / "tiny-sdxl", text_hidden_2=TEXT_HIDDEN_2)
    shutil.copytree(
        model,
        root / CONFIGS_SUBDIR / "tiny-sdxl",
        ignore=shutil.ignore_patterns("*.safetensors", "tokenizer", "tokenizer_2"),
    )
    to_single_file_xl(model, root / "checkpoints" / "tiny-sdxl.safetensors")
    return root


def _images(pipeline, ref: ModelRef, logs: list[str]) -> np.ndarray:
    request = LoraRequest(
        model=ref,
        prompt="a red fox",
        negative_prompt="blurry",
        seed=7,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
    )
    (result,) = pipeline([request], on_log=lambda i, m: logs.append(m))
    assert result.error is None, result.error
    return result.images.numpy()


def test_sdxl_single_file_serves_the_same_images_as_the_directory(root, tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline

    settings = tiny_settings(
        tmp_path_factory.mktemp("var"), EMBER_RUNTIME="torch", EMBER_LORA_MODEL_ROOT=str(root)
    )
    checkpoint = root / "checkpoints" / "tiny-sdxl.safetensors"
    shapes = checkpoint_shapes(checkpoint)
    assert checkpoint_family(shapes) == "sdxl"
    assert match_config(settings, shapes).name == "tiny-sdxl"
    # The converter is right: diffusers' from_single_file reads back every tensor of the directory.
    loaded = StableDiffusionXLPipeline.from_single_file(
        str(checkpoint), config=str(root / "tiny-sdxl"), local_files_only=True
    )
    original = StableDiffusionXLPipeline.from_pretrained(root / "tiny-sdxl")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(loaded, name).state_dict(), getattr(original, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name

    pipeline = LoraText2ImagePipeline(settings)
    logs: list[str] = []
    from_file = _images(pipeline, ModelRef(str(checkpoint)), logs)
    assert any(m.startswith("converting single-file checkpoint") for m in logs), logs
    assert isinstance(pipeline.model(ModelRef(str(checkpoint))), XLBaseModel)
    from_dir = _images(pipeline, ModelRef(str(root / "tiny-sdxl")), [])
    # The same weights, tokenizers and configs through the same code: bit-identical images.
    assert np.array_equal(from_file, from_dir)
    # Converted once: a new pipeline (a restarted server) serves the cached directory without converting.
    logs.clear()
    assert np.array_equal(
        _images(LoraText2ImagePipeline(settings), ModelRef(str(checkpoint)), logs), from_dir
    )
    assert not any(m.startswith("converting") for m in logs), logs
    # SDXL's text features serve single files too: a prompt without weighting syntax conditions exactly as
    # without prompt_weighting (ember.pipeline.xl_text_conditioning).
    request = LoraRequest(
        model=ModelRef(str(checkpoint)),
        prompt="a red fox",
        negative_prompt="blurry",
        seed=7,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
    )
    (result,) = pipeline([dataclasses.replace(request, prompt_weighting=True)])
    assert result.error is None and np.array_equal(result.images.numpy(), from_dir), result.error
