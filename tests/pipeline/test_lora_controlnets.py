"""fal-ai/lora `controlnets` / `controlnet_guess_mode` vs diffusers' StableDiffusionControlNetPipeline with a
MultiControlNetModel, on a tiny SD1.5-layout base and two tiny random ControlNets (different weights; one
saved as the "fp16" variant), torch runtime: per-unit scales and windows, guess mode, a mask, batch of N
equals N singles, and the errors that name the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.pipeline.lora_controlnets import ControlNetInput, ControlNetRef, parse_controlnets
from ember.specs.demo_controlnet import build_tiny_controlnet, build_tiny_sd15_base
from tests.pipeline.conftest import tiny_settings

# 104 x 64 px: a 13 x 8 latent, odd at the coarser grids (7, 4, 2), so masks pool onto uneven grids.
WIDTH, HEIGHT, STEPS, GUIDANCE = 104, 64, 3, 5.0
PROMPT, NEGATIVE, SEED = "a castle on a hill", "blurry", 7


def rings(h: int = 80, w: int = 96) -> np.ndarray:
    y, x = np.mgrid[:h, :w]
    r = ((np.hypot(x - w / 2, y - h / 2) // 6) % 2 * 200 + 30).astype(np.uint8)
    return np.stack([r, r, np.full_like(r, 128)], axis=-1)


def stripes(h: int = 72, w: int = 120) -> np.ndarray:
    x = np.broadcast_to(np.arange(w), (h, w))
    s = ((x // 9) % 2 * 220 + 20).astype(np.uint8)
    return np.stack([s, 255 - s, s], axis=-1)


def left_half(h: int = 80, w: int = 96) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[:, : w // 2] = 255
    return mask


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-cn")
    return {
        "base": build_tiny_sd15_base(root / "base"),
        "a": build_tiny_controlnet(root / "cn-a", seed=1),
        "b": build_tiny_controlnet(root / "cn-b", seed=2, variant="fp16"),
        "root": root,
    }


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> LoraText2ImagePipeline:
    return LoraText2ImagePipeline(tiny_settings(tmp_path_factory.mktemp("var"), EMBER_RUNTIME="torch"))


@pytest.fixture(scope="module")
def reference(models):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        models["base"],
        controlnet=[
            ControlNetModel.from_pretrained(models["a"], dtype=torch.float32),
            ControlNetModel.from_pretrained(models["b"], variant="fp16", dtype=torch.float32),
        ],
        safety_checker=None,
        requires_safety_checker=False,
        dtype=torch.float32,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unit(models, name: str, image: np.ndarray, **kw) -> ControlNetInput:
    variant = "fp16" if name == "b" else None
    return ControlNetInput(ControlNetRef(str(models[name]), variant), image, **kw)


def ours(
    models, *controlnets: ControlNetInput, guess: bool = False, seed: int = SEED, steps: int = STEPS
) -> LoraRequest:
    return LoraRequest(
        model=ModelRef(str(models["base"])),
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        seed=seed,
        guidance_scale=GUIDANCE,
        num_inference_steps=steps,
        width=WIDTH,
        height=HEIGHT,
        controlnets=controlnets,
        controlnet_guess_mode=guess,
    )


def run(pipeline, *requests: LoraRequest) -> list[np.ndarray]:
    results = pipeline(list(requests))
    for r in results:
        assert r.error is None, r.error
    return [r.images[0].numpy().astype(np.int16) for r in results]


def theirs(pipe, controlnets: list[ControlNetInput], guess: bool = False) -> np.ndarray:
    """diffusers with both ControlNets loaded; an absent one runs at scale 0 (zero residuals)."""
    by_source = {str(Path(c.ref.source).name): c for c in controlnets}
    images, scales, starts, ends = [], [], [], []
    for name in ("cn-a", "cn-b"):
        c = by_source.get(name)
        images.append(Image.fromarray(c.image if c is not None else rings()))
        scales.append(c.conditioning_scale if c is not None else 0.0)
        starts.append(c.start if c is not None else 0.0)
        ends.append(c.end if c is not None else 1.0)
    image = pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        image=images,
        width=WIDTH,
        height=HEIGHT,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        controlnet_conditioning_scale=scales,
        control_guidance_start=starts,
        control_guidance_end=ends,
        guess_mode=guess,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
    ).images[0]
    return np.round(image * 255).astype(np.int16)


def _diff(a: np.ndarray, b: np.ndarray, what: str) -> int:
    assert a.shape == b.shape == (HEIGHT, WIDTH, 3)
    d = np.abs(a - b)
    print(f"{what}: max {d.max()} mean {d.mean():.4f} levels")
    return int(d.max())


def test_two_controlnets_and_guess_mode_match_diffusers(pipeline, reference, models) -> None:
    """Per-unit scales and start/end windows (different for each unit), with and without guess mode."""
    a = unit(models, "a", rings(), conditioning_scale=0.7, start=0.0, end=0.6)
    b = unit(models, "b", stripes(), conditioning_scale=1.3, start=0.3, end=1.0)
    got, guessed, plain = run(pipeline, ours(models, a, b), ours(models, a, b, guess=True), ours(models))
    assert _diff(got, theirs(reference, [a, b]), "two ControlNets") <= 1
    assert _diff(guessed, theirs(reference, [a, b], guess=True), "two ControlNets, guess mode") <= 1
    assert np.abs(got - plain).max() > 10 and np.abs(got - guessed).max() > 0  # neither is vacuous


def _masked_controlnet(controlnet, mask: np.ndarray):
    """The documented meaning of mask_url, written out independently for the reference: each residual times
    the mask (Lanczos-resized to the output size, in [0, 1]) area-averaged onto the residual's grid."""
    resized = Image.fromarray(mask).resize((WIDTH, HEIGHT), resample=Image.LANCZOS)
    m = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)[None, None]
    forward = controlnet.forward

    def masked_forward(*args, **kwargs):
        down, mid = forward(*args, **kwargs)[:2]
        pooled = lambda r: r * F.adaptive_avg_pool2d(m, r.shape[-2:])
        return [pooled(r) for r in down], pooled(mid)

    return masked_forward


def test_mask_confines_the_controlnet(pipeline, reference, models) -> None:
    a = unit(models, "a", rings(), conditioning_scale=1.5, mask=left_half())
    b = unit(models, "b", stripes(), conditioning_scale=0.9, end=0.8)
    unmasked_a = dataclasses.replace(a, mask=None)
    white = dataclasses.replace(a, mask=np.full((80, 96), 255, np.uint8))
    black = [dataclasses.replace(c, mask=np.zeros(c.image.shape[:2], np.uint8)) for c in (a, b)]
    got, with_white, unmasked, with_black, plain = run(
        pipeline,
        ours(models, a, b),
        ours(models, white, b),
        ours(models, unmasked_a, b),
        ours(models, *black),
        ours(models),
    )
    cn_a = reference.controlnet.nets[0]
    cn_a.forward = _masked_controlnet(cn_a, left_half())
    try:
        want = theirs(reference, [a, b])
    finally:
        del cn_a.forward  # back to the class's forward
    assert _diff(got, want, "masked ControlNet") <= 1
    # An all-white mask is no mask; all-black masks are no ControlNet (x * 0 = 0 residuals; rows of one
    # torch CPU batch may round differently: <= 1 level).
    assert _diff(with_white, unmasked, "white mask vs none") <= 1
    assert _diff(with_black, plain, "black masks vs no ControlNet") <= 1
    assert np.abs(got - unmasked).max() > 0  # the mask took part of ControlNet a's control away


def test_batch_of_n_equals_n_singles(pipeline, models) -> None:
    """Requests with two ControlNets (one masked), one in guess mode, and none share one UNet batch (the
    last on zero residuals); each gets its single-run pixels (2 steps: batching is per step)."""
    requests = [
        ours(
            models,
            unit(models, "a", rings(), conditioning_scale=0.6, mask=left_half()),
            unit(models, "b", stripes(), start=0.5),
            steps=2,
        ),
        ours(models, unit(models, "b", rings(), conditioning_scale=1.7), guess=True, seed=8, steps=2),
        ours(models, seed=9, steps=2),
    ]
    batched = run(pipeline, *requests)
    for i, (request, together) in enumerate(zip(requests, batched, strict=True)):
        (alone,) = run(pipeline, request)
        assert _diff(together, alone, f"batched vs single {i}") <= 1


def test_controlnet_errors_name_the_field(pipeline, models, tmp_path: Path) -> None:
    from diffusers import ControlNetModel

    from ember.specs.demo_lora import build_tiny_sd15

    # The weights variant that is not there; a ControlNet of another shape than the base's UNet.
    missing_variant = unit(models, "a", rings())
    missing_variant = dataclasses.replace(missing_variant, ref=ControlNetRef(str(models["a"]), "fp16"))
    other = tmp_path / "other-cn"
    torch.manual_seed(0)
    ControlNetModel(
        block_out_channels=(8, 8, 16, 16),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        conditioning_embedding_out_channels=(8, 8, 8, 8),
        layers_per_block=2,
        attention_head_dim=2,
        norm_num_groups=4,
        cross_attention_dim=32,
    ).save_pretrained(other, safe_serialization=True)
    misfit = dataclasses.replace(missing_variant, ref=ControlNetRef(str(other)))
    good = unit(models, "a", rings())
    results = pipeline([ours(models, good, missing_variant), ours(models, misfit), ours(models, good)])
    assert results[0].error is not None and results[0].error.startswith("controlnets[1].path:"), results[
        0
    ].error
    assert results[1].error is not None and results[1].error.startswith("controlnets[0].path:"), results[
        1
    ].error
    assert "does not fit" in results[1].error
    assert results[2].error is None and results[2].images is not None  # the batch's good request runs
    # A base whose UNet is not SD1.5-shaped (the 3-block tiny LoRA base) cannot take ControlNets.
    small = build_tiny_sd15(tmp_path / "small-base")
    (result,) = pipeline([dataclasses.replace(ours(models, good, steps=1), model=ModelRef(str(small)))])
    assert result.error is not None and result.error.startswith("controlnets:"), result.error


def test_parse_refuses_paths_outside_the_root(models) -> None:
    from ember.endpoints.common import media_tensor

    arrays = {"MEDIA": media_tensor([rings(), left_half()])}
    entry = {
        "path": str(models["a"]),
        "image": 0,
        "mask": 1,
        "conditioning_scale": 0.5,
        "end_percentage": 0.7,
    }
    (parsed,) = parse_controlnets({"controlnets": [entry]}, arrays, models["root"])
    assert parsed.ref == ControlNetRef(str(models["a"].resolve()))
    assert parsed.mask is not None and parsed.mask.shape == (80, 96) and parsed.end == 0.7
    for path in ("/etc", str(models["root"] / ".." / "elsewhere"), "https://example.com/cn.safetensors"):
        with pytest.raises(ValueError, match=r"^controlnets\[0\]\.path: "):
            parse_controlnets({"controlnets": [{**entry, "path": path}]}, arrays, models["root"])
    with pytest.raises(ValueError, match=r"controlnets\[0\]\.mask"):
        parse_controlnets({"controlnets": [{**entry, "mask": 5}]}, arrays, models["root"])


def test_global_pool_conditions_forces_guess_mode_as_diffusers(pipeline, models, tmp_path: Path) -> None:
    """A first ControlNet whose config sets global_pool_conditions (shuffle-like ControlNets: residuals
    pooled to 1 x 1) puts the request in guess mode even with controlnet_guess_mode false, as diffusers'
    pipeline does; vs StableDiffusionControlNetPipeline with that ControlNet and guess_mode=False."""
    import json
    import shutil

    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    pooled = shutil.copytree(models["a"], tmp_path / "cn-pooled")
    config = json.loads((pooled / "config.json").read_text())
    (pooled / "config.json").write_text(json.dumps({**config, "global_pool_conditions": True}))
    c = ControlNetInput(ControlNetRef(str(pooled)), rings(), conditioning_scale=0.9)
    got, guessed = run(pipeline, ours(models, c), ours(models, c, guess=True))
    assert np.array_equal(got, guessed), "global_pool_conditions did not force guess mode"

    # next to a spatial ControlNet: pooled (1 x 1) and full residuals summed by broadcasting. diffusers'
    # MultiControlNetModel sums in place, which broadcasts only with the pooled one second (and then guess
    # mode comes from the request): compared in that order, guess mode on.
    b = unit(models, "b", stripes(), conditioning_scale=1.1)
    (both,) = run(pipeline, ours(models, b, c, guess=True))
    nets = {
        "alone": [ControlNetModel.from_pretrained(pooled, dtype=torch.float32)],
        "with a spatial one": [
            ControlNetModel.from_pretrained(models["b"], variant="fp16", dtype=torch.float32),
            ControlNetModel.from_pretrained(pooled, dtype=torch.float32),
        ],
    }
    cases = (
        ("alone", got, [rings()], [0.9], False),
        ("with a spatial one", both, [stripes(), rings()], [1.1, 0.9], True),
    )
    for what, mine, images, scales, guess in cases:
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            models["base"],
            controlnet=nets[what] if len(nets[what]) > 1 else nets[what][0],
            safety_checker=None,
            requires_safety_checker=False,
            dtype=torch.float32,
        )
        pipe.set_progress_bar_config(disable=True)
        image = pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            image=[Image.fromarray(i) for i in images] if len(images) > 1 else Image.fromarray(images[0]),
            width=WIDTH,
            height=HEIGHT,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            controlnet_conditioning_scale=scales if len(scales) > 1 else scales[0],
            guess_mode=guess,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="np",
        ).images[0]
        assert _diff(mine, np.round(image * 255).astype(np.int16), f"global_pool_conditions, {what}") <= 1
