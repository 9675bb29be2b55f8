"""fal-ai/lora pipeline vs diffusers' StableDiffusionPipeline on a tiny SD1.5 base model (torch runtime):
each fal scheduler, clip_skip, negative prompt + CFG, LoRAs (load_lora_weights + fuse_lora) with scales
and the exact restore A -> B -> A, and tiled decode vs vae.enable_tiling."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch

from ember.endpoints.lora.schema import SchedulerName
from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.pipeline.loras import parse_lora
from ember.pipeline.schedulers import fal_scheduler_config
from ember.specs.demo_lora import build_tiny_sd15
from tests.pipeline.conftest import tiny_settings

SIZE, STEPS = 64, 3
# Same weights, same maths; only float summation order differs (batched UNet calls): uint8 pixels agree
# to within 1 level, and the float images to this tolerance.
ATOL = 2e-3


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("lora") / "tiny-sd15")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> LoraText2ImagePipeline:
    settings = tiny_settings(tmp_path_factory.mktemp("var"), EMBER_RUNTIME="torch")
    return LoraText2ImagePipeline(settings)


@pytest.fixture(scope="module")
def reference(sd15_dir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        sd15_dir, safety_checker=None, requires_safety_checker=False, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _ours(pipeline, sd15_dir, **kw) -> np.ndarray:
    request = LoraRequest(
        model=ModelRef(str(sd15_dir)),
        prompt=kw.pop("prompt", "a red fox"),
        seed=kw.pop("seed", 7),
        width=SIZE,
        height=SIZE,
        num_inference_steps=kw.pop("num_inference_steps", STEPS),
        **kw,
    )
    (result,) = pipeline([request])
    return result.images.numpy().astype(np.int16)


def _theirs(pipe, **kw) -> np.ndarray:
    image = pipe(
        prompt=kw.pop("prompt", "a red fox"),
        height=SIZE,
        width=SIZE,
        num_inference_steps=kw.pop("num_inference_steps", STEPS),
        generator=torch.Generator("cpu").manual_seed(kw.pop("seed", 7)),
        output_type="np",
        **kw,
    ).images
    return (image * 255).round().astype(np.int16)


def _close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1, f"max pixel difference {np.abs(a - b).max()}"


@pytest.mark.parametrize("name", [None, *get_args(SchedulerName)])
def test_scheduler_parity(pipeline, reference, sd15_dir, name):
    from diffusers import DiffusionPipeline  # noqa: F401 - the reference swaps schedulers with from_config

    base = dict(reference.scheduler.config)
    config = fal_scheduler_config({**base, "_class_name": type(reference.scheduler).__name__}, name)
    original = reference.scheduler
    import diffusers

    reference.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    try:
        eta = 0.3 if name in ("DDIM", "TCD") else 0.0
        ours = _ours(
            pipeline, sd15_dir, scheduler=name, guidance_scale=5.0, negative_prompt="blurry", eta=eta
        )
        theirs = _theirs(reference, guidance_scale=5.0, negative_prompt="blurry", eta=eta)
    finally:
        reference.scheduler = original
    _close(ours, theirs)


def _skipped_embeddings(pipe, prompt: str, clip_skip: int) -> torch.Tensor:
    """diffusers' encode_prompt clip_skip definition (hidden_states[-(skip + 1)] through the final layer
    norm). Its own code path reaches for `text_encoder.text_model`, which transformers 5 removed."""
    ids = pipe.tokenizer(
        prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        hidden = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return pipe.text_encoder.final_layer_norm(hidden)


def test_clip_skip_and_no_cfg(pipeline, reference, sd15_dir):
    for clip_skip in (1, 2):
        theirs = _theirs(
            reference,
            prompt=None,
            prompt_embeds=_skipped_embeddings(reference, "a red fox", clip_skip),
            negative_prompt_embeds=_skipped_embeddings(reference, "", clip_skip),
        )
        _close(_ours(pipeline, sd15_dir, clip_skip=clip_skip), theirs)
    _close(_ours(pipeline, sd15_dir, guidance_scale=1.0), _theirs(reference, guidance_scale=1.0))
    assert np.abs(_ours(pipeline, sd15_dir, clip_skip=1) - _ours(pipeline, sd15_dir)).max() > 0


def _make_lora(sd15_dir: Path, out: Path, seed: int, rank: int = 4) -> bytes:
    """A random LoRA on the tiny UNet's attention and the text encoder, saved as diffusers saves one."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(
        sd15_dir, safety_checker=None, requires_safety_checker=False
    )
    torch.manual_seed(seed)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    pipe.unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=targets, init_lora_weights=False)
    )
    pipe.text_encoder.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        safe_serialization=True,
    )
    return (out / "pytorch_lora_weights.safetensors").read_bytes()


def test_lora_parity_and_exact_restore(pipeline, reference, sd15_dir, tmp_path):
    from safetensors.torch import load as load_safetensors

    files = {}
    for name, seed in (("a", 1), ("b", 2)):
        data = _make_lora(sd15_dir, tmp_path / name, seed)
        files[name] = (
            tmp_path / name / "pytorch_lora_weights.safetensors",
            parse_lora(load_safetensors(data), hashlib.sha256(data).hexdigest()),
        )
    base = _ours(pipeline, sd15_dir)
    a = _ours(pipeline, sd15_dir, loras=((files["a"][1], 0.7),))
    # The reference: diffusers fuses the LoRA into the weights (load_lora_weights + fuse_lora).
    reference.load_lora_weights(str(files["a"][0].parent), adapter_name="a")
    reference.fuse_lora(lora_scale=0.7)
    try:
        _close(a, _theirs(reference))
    finally:
        reference.unfuse_lora()
        reference.unload_lora_weights()
    assert np.abs(a - base).max() > 0, "the LoRA changed nothing"
    model = pipeline.model(ModelRef(str(sd15_dir)))
    weights_a = {k: v.clone() for k, v in model.unet.weights().items()}  # A is the fused set now
    both = _ours(pipeline, sd15_dir, loras=((files["a"][1], 0.7), (files["b"][1], 1.5)))
    assert np.abs(both - a).max() > 0
    # A -> B -> A: the base weights are restored exactly, so A is bit-identical, and so is no LoRA.
    _ours(pipeline, sd15_dir, loras=((files["b"][1], 1.0),))
    assert np.array_equal(_ours(pipeline, sd15_dir, loras=((files["a"][1], 0.7),)), a)
    assert all(torch.equal(weights_a[k], v) for k, v in model.unet.weights().items())
    assert np.array_equal(_ours(pipeline, sd15_dir), base)


def test_tiled_decode_matches_diffusers(pipeline, reference, sd15_dir):
    from ember.pipeline.tiled_decode import tiled_decode

    model = pipeline.model(ModelRef(str(sd15_dir)))
    latents = torch.randn(1, 4, 40, 24, generator=torch.Generator().manual_seed(0))
    vae = reference.vae
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 128, 16, 0.25
    try:
        with torch.no_grad():
            theirs = vae.decode(latents, return_dict=False)[0]
    finally:
        vae.disable_tiling()
    ours = tiled_decode(model.vae_decoder, latents, (128, 128), (96, 96))
    assert ours.shape == theirs.shape == (1, 3, 320, 192)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_batch_equals_singles_and_errors_stay_per_request(pipeline, sd15_dir):
    ref = ModelRef(str(sd15_dir))
    one = LoraRequest(
        model=ref,
        prompt="a red fox",
        seed=1,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        scheduler="Euler A",
        num_images=2,
    )
    two = LoraRequest(
        model=ref,
        prompt="a blue bird",
        seed=2,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        scheduler="Euler A",
        guidance_scale=3.0,
    )
    # PNDM (the model's own scheduler) takes no custom sigmas: that request alone fails, by name.
    bad = LoraRequest(model=ref, prompt="x", seed=3, width=SIZE, height=SIZE, sigmas=(14.6, 1.0, 0.0))
    batched = pipeline([one, two, bad])
    singles = [pipeline([r])[0] for r in (one, two)]
    for b, s in zip(batched[:2], singles, strict=True):
        assert np.abs(b.images.numpy().astype(int) - s.images.numpy().astype(int)).max() <= 1
    assert batched[0].images.shape == (2, SIZE, SIZE, 3)
    assert batched[2].images is None and "sigmas" in batched[2].error


def test_schedule_overrides_and_prediction_type(pipeline, reference, sd15_dir):
    import diffusers

    original = reference.scheduler
    base = {**dict(original.config), "_class_name": type(original).__name__}
    try:
        # Custom timesteps / sigmas (num_inference_steps is then ignored), as diffusers' retrieve_timesteps.
        reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(
            fal_scheduler_config(base, "Euler")
        )
        _close(
            _ours(pipeline, sd15_dir, scheduler="Euler", timesteps=(901, 501, 101)),
            _theirs(reference, timesteps=[901, 501, 101]),
        )
        _close(
            _ours(pipeline, sd15_dir, scheduler="Euler", sigmas=(14.6, 4.0, 1.0)),
            _theirs(reference, sigmas=[14.6, 4.0, 1.0]),
        )
        # v-prediction with zero-terminal-SNR betas (trailing DDIM, as the paper pairs them).
        config = fal_scheduler_config(base, "DDIM", "v_prediction", rescale_betas_zero_snr=True)
        reference.scheduler = diffusers.DDIMScheduler.from_config(config)
        _close(
            _ours(
                pipeline,
                sd15_dir,
                scheduler="DDIM",
                prediction_type="v_prediction",
                rescale_betas_zero_snr=True,
            ),
            _theirs(reference),
        )
    finally:
        reference.scheduler = original


def test_model_cache_lru_and_sdxl_refused(sd15_dir, tmp_path):
    import json
    import shutil

    from ember.pipeline.lora import LoraText2ImagePipeline

    settings = tiny_settings(tmp_path / "var", EMBER_RUNTIME="torch", EMBER_LORA_MAX_MODELS="1")
    pipeline = LoraText2ImagePipeline(settings)
    other = tmp_path / "other"
    shutil.copytree(sd15_dir, other)
    xl = tmp_path / "xl"
    shutil.copytree(sd15_dir, xl)
    index = json.loads((xl / "model_index.json").read_text())
    (xl / "model_index.json").write_text(
        json.dumps({**index, "text_encoder_2": ["transformers", "CLIPTextModel"]})
    )
    logs: list[str] = []

    def run(path: Path):
        request = LoraRequest(
            model=ModelRef(str(path)),
            prompt="p",
            seed=0,
            width=SIZE,
            height=SIZE,
            num_inference_steps=1,
            guidance_scale=1.0,
        )
        return pipeline([request], on_log=lambda index, message: logs.append(message))[0]

    base = run(sd15_dir)
    run(sd15_dir)  # warm: no second load
    assert sum("loading base model" in m for m in logs) == 1
    run(other)  # EMBER_LORA_MAX_MODELS=1: the first one leaves
    assert any(m.startswith("unloading base model") and str(sd15_dir) in m for m in logs)
    result = run(xl)  # says SDXL, lacks SDXL's parts (real SDXL bases: tests/pipeline/test_lora_sdxl.py)
    assert result.images is None and "SDXL" in result.error and "text_encoder_2/" in result.error
    # unet_name: a custom U-Net directory (here the base model's own: the same image).
    custom = LoraRequest(
        model=ModelRef(str(sd15_dir), unet=str(sd15_dir / "unet")),
        prompt="p",
        seed=0,
        width=SIZE,
        height=SIZE,
        num_inference_steps=1,
        guidance_scale=1.0,
    )
    assert torch.equal(pipeline([custom])[0].images, base.images)


def test_lora_for_another_model_fails_only_its_request(pipeline, sd15_dir):
    ref = ModelRef(str(sd15_dir))
    alien = parse_lora(
        {
            "unet.mid_block.nope.lora_A.weight": torch.ones(2, 4),
            "unet.mid_block.nope.lora_B.weight": torch.ones(4, 2),
        },
        "alien",
    )
    ok = LoraRequest(model=ref, prompt="p", seed=0, width=SIZE, height=SIZE, num_inference_steps=1)
    bad = LoraRequest(
        model=ref, prompt="p", seed=0, width=SIZE, height=SIZE, num_inference_steps=1, loras=((alien, 1.0),)
    )
    good, refused = pipeline([ok, bad])
    assert good.images is not None and good.error is None
    assert refused.images is None and "mid_block.nope" in refused.error
