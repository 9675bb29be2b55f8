"""fal-client 1.0.3, unmodified, against the real gateway + tritonserver: fal-ai/lora's debug_latents and
debug_per_pass_latents come back as File objects (safetensors files on the gateway's file host) whose
tensors match diffusers' StableDiffusionPipeline(output_type="latent") and callback_on_step_end."""

from __future__ import annotations

from types import ModuleType

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_safetensors

from tests.contract.test_lora_python_client import ENDPOINT, tiny_model  # noqa: F401 - the fixture

pytestmark = pytest.mark.e2e

ARGS = {
    "prompt": "a red fox",
    "negative_prompt": "blurry",
    "image_size": {"width": 64, "height": 64},
    "num_inference_steps": 3,
    "guidance_scale": 5.0,
    "scheduler": "Euler",
    "num_images": 2,
    "seed": 3,
}
# Triton's stub and this process run the same float32 torch CPU kernels, possibly with other thread
# counts (summation order): allow float rounding, no more.
ATOL = 1e-5


def _reference(model: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import diffusers

    from ember.pipeline.schedulers import fal_scheduler_config

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, requires_safety_checker=False, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    config = fal_scheduler_config(
        {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}, "Euler"
    )
    pipe.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    passes, timesteps = [], []

    def on_step_end(pipe, i, t, kwargs):
        passes.append(kwargs["latents"].clone())
        timesteps.append(float(t))
        return kwargs

    latents = pipe(
        prompt=ARGS["prompt"],
        negative_prompt=ARGS["negative_prompt"],
        height=64,
        width=64,
        num_inference_steps=ARGS["num_inference_steps"],
        guidance_scale=ARGS["guidance_scale"],
        num_images_per_prompt=ARGS["num_images"],
        generator=torch.Generator("cpu").manual_seed(ARGS["seed"]),
        output_type="latent",
        callback_on_step_end=on_step_end,
    ).images
    return latents.numpy(), torch.stack(passes).numpy(), np.array(timesteps, dtype=np.float32)


def _fetch(url: str, cafile: str) -> bytes:
    response = httpx.get(url, verify=cafile, timeout=30)
    response.raise_for_status()
    return response.content


def test_debug_latents_files_match_diffusers(fal_client: ModuleType, client_env, tiny_model: str) -> None:  # noqa: F811
    cafile = client_env["SSL_CERT_FILE"]
    result = fal_client.subscribe(
        ENDPOINT,
        arguments={**ARGS, "model_name": tiny_model, "debug_latents": True, "debug_per_pass_latents": True},
    )
    assert len(result["images"]) == 2
    files = {}
    for field in ("debug_latents", "debug_per_pass_latents"):
        f = result[field]
        assert f["content_type"] == "application/octet-stream" and f["file_name"].endswith(".safetensors")
        assert f["url"].startswith("https://") and "width" not in f
        data = _fetch(f["url"], cafile)
        assert len(data) == f["file_size"]
        files[field] = load_safetensors(data)
    latents, passes, timesteps = _reference(tiny_model)
    final = files["debug_latents"]["latents"]
    per_pass = files["debug_per_pass_latents"]
    assert final.shape == (2, 4, 8, 8) and per_pass["latents"].shape == (3, 2, 4, 8, 8)
    errors = (np.abs(final - latents).max(), np.abs(per_pass["latents"] - passes).max())
    print(f"debug latents vs diffusers: max |final| error {errors[0]:.3g}, per-pass {errors[1]:.3g}")
    assert max(errors) <= ATOL, errors
    assert np.array_equal(per_pass["timesteps"], timesteps)
    assert np.array_equal(per_pass["latents"][-1], final)

    # Only debug_latents: the other field is null, and the same seed gives the same latents.
    again = fal_client.run(ENDPOINT, arguments={**ARGS, "model_name": tiny_model, "debug_latents": True})
    assert again["debug_per_pass_latents"] is None
    assert np.array_equal(load_safetensors(_fetch(again["debug_latents"]["url"], cafile))["latents"], final)
