"""fal-ai/lora's debug_latents / debug_per_pass_latents vs diffusers' StableDiffusionPipeline on a tiny SD1.5
base (torch runtime): the final latents equal output_type="latent", the per-pass latents equal what
callback_on_step_end sees, and the Triton outputs carry them with their batch dimension."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from ember.pipeline.debug_latents import OUTPUT_NAMES
from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.pipeline.lora_io import result_arrays
from ember.specs.demo_lora import build_tiny_sd15
from tests.pipeline.conftest import tiny_settings

SIZE, STEPS = 64, 3


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("lora-debug") / "tiny-sd15")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> LoraText2ImagePipeline:
    settings = tiny_settings(tmp_path_factory.mktemp("var"), EMBER_RUNTIME="torch")
    return LoraText2ImagePipeline(settings)


def _theirs(sd15_dir: Path, scheduler: str | None, **kw):
    """diffusers' final latents (k, C, h, w), and the latents and timestep of every step."""
    import diffusers

    from ember.pipeline.schedulers import fal_scheduler_config

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        sd15_dir, safety_checker=None, requires_safety_checker=False, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    base = {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}
    config = fal_scheduler_config(base, scheduler)
    pipe.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    passes, timesteps = [], []

    def on_step_end(pipe, i, t, callback_kwargs):
        passes.append(callback_kwargs["latents"].clone())
        timesteps.append(float(t))
        return callback_kwargs

    latents = pipe(
        prompt="a red fox",
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="latent",
        callback_on_step_end=on_step_end,
        **kw,
    ).images
    return latents, torch.stack(passes), torch.tensor(timesteps)


@pytest.mark.parametrize(
    ("scheduler", "kw"),
    [
        (None, {"guidance_scale": 5.0, "negative_prompt": "blurry", "num_images_per_prompt": 2}),
        ("Euler A", {"guidance_scale": 1.0}),
    ],
)
def test_debug_latents_equal_diffusers(pipeline, sd15_dir, scheduler, kw) -> None:
    request = LoraRequest(
        model=ModelRef(str(sd15_dir)),
        prompt="a red fox",
        seed=7,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        scheduler=scheduler,
        guidance_scale=kw["guidance_scale"],
        negative_prompt=kw.get("negative_prompt", ""),
        num_images=kw.get("num_images_per_prompt", 1),
        debug_latents=True,
        debug_per_pass_latents=True,
    )
    (result,) = pipeline([request])
    latents, passes, timesteps = _theirs(sd15_dir, scheduler, **kw)
    debug = result.debug
    assert debug is not None and debug.latents is not None and debug.passes is not None
    k = request.num_images
    assert debug.latents.shape == (k, 4, SIZE // 8, SIZE // 8) == latents.shape
    # One pass per scheduler timestep: PNDM (the tiny model's own scheduler) walks steps + 1 of them.
    assert debug.passes.shape == (len(timesteps), k, 4, SIZE // 8, SIZE // 8) == passes.shape
    # Same weights, same ops in the same order: bit-identical in float32 torch.
    assert torch.equal(debug.latents, latents), (debug.latents - latents).abs().max()
    assert torch.equal(debug.passes, passes), (debug.passes - passes).abs().max()
    assert torch.equal(debug.timesteps, timesteps)
    assert torch.equal(debug.passes[-1], debug.latents)

    arrays = result_arrays(result)
    assert arrays["LATENTS"].shape == (1, *latents.shape) and arrays["LATENTS"].dtype == np.float32
    assert arrays["PASS_LATENTS"].shape == (1, *passes.shape)
    assert arrays["PASS_TIMESTEPS"].shape == (1, len(timesteps))


def test_no_debug_outputs_unless_asked(pipeline, sd15_dir) -> None:
    base = LoraRequest(
        ModelRef(str(sd15_dir)), "a red fox", 7, width=SIZE, height=SIZE, num_inference_steps=2
    )
    plain, final_only = pipeline([base, dataclasses.replace(base, debug_latents=True)])
    assert plain.debug is None and not set(OUTPUT_NAMES) & set(result_arrays(plain))
    assert sorted(set(OUTPUT_NAMES) & set(result_arrays(final_only))) == ["LATENTS"]
    # Batched with a plain request, the flags change nothing about the images.
    assert torch.equal(plain.images, final_only.images)
