"""fal-ai/lora `controlnets` on an SDXL base vs diffusers' StableDiffusionXLControlNetPipeline with a
MultiControlNetModel, on a tiny SDXL base with SDXL's UNet layout and two tiny random SDXL ControlNets
(one saved as the "fp16" variant), torch runtime: one unit, two units with per-unit scales and windows,
guess mode, a mask, batch of N equals N singles; single-file ControlNets (diffusers' and the original key
names, with config_url's config) give the directory's pixels; the other family's ControlNet is refused
naming controlnets[i].path."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.pipeline.lora_controlnets import ControlNetInput, ControlNetRef, parse_controlnets
from ember.specs.demo_controlnet_xl import build_tiny_sdxl_controllable, build_tiny_xl_controlnet
from tests.controlnet_single_file import controlnet_to_single_file
from tests.pipeline.conftest import tiny_settings
from tests.pipeline.test_lora_controlnets import _masked_controlnet, left_half, rings, stripes

# 104 x 64 px: a 13 x 8 latent, odd at the coarser grids (7 x 4, 4 x 2), so masks pool onto uneven grids.
WIDTH, HEIGHT, STEPS, GUIDANCE = 104, 64, 3, 5.0
PROMPT, NEGATIVE, SEED = "a castle on a hill", "blurry", 7


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-cn-xl")
    return {
        "base": build_tiny_sdxl_controllable(root / "base"),
        "a": build_tiny_xl_controlnet(root / "cn-a", seed=1),
        "b": build_tiny_xl_controlnet(root / "cn-b", seed=2, variant="fp16"),
        "root": root,
    }


@pytest.fixture(scope="module")
def pipeline(models, tmp_path_factory: pytest.TempPathFactory) -> LoraText2ImagePipeline:
    settings = tiny_settings(
        tmp_path_factory.mktemp("var"), EMBER_RUNTIME="torch", EMBER_LORA_MODEL_ROOT=str(models["root"])
    )
    return LoraText2ImagePipeline(settings)


@pytest.fixture(scope="module")
def reference(models):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        models["base"],
        controlnet=[
            ControlNetModel.from_pretrained(models["a"], dtype=torch.float32),
            ControlNetModel.from_pretrained(models["b"], variant="fp16", dtype=torch.float32),
        ],
        add_watermarker=False,
        dtype=torch.float32,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unit(models, name: str, image: np.ndarray, **kw) -> ControlNetInput:
    variant = "fp16" if name == "b" else None
    return ControlNetInput(ControlNetRef(str(models[name]), variant), image, **kw)


def ours(models, *controlnets: ControlNetInput, guess: bool = False, seed: int = SEED, steps: int = STEPS):
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
    """diffusers with both ControlNets loaded; an absent one runs at scale 0 (zero residuals: x + 0 = x)."""
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


def test_one_and_two_controlnets_and_guess_mode_match_diffusers(pipeline, reference, models) -> None:
    """One unit; two with their own scales and start/end windows, with and without guess mode (one batch)."""
    a = unit(models, "a", rings(), conditioning_scale=0.7, start=0.0, end=0.6)
    b = unit(models, "b", stripes(), conditioning_scale=1.3, start=0.3, end=1.0)
    single = unit(models, "a", stripes(), conditioning_scale=0.9)
    one, got, guessed, plain = run(
        pipeline, ours(models, single), ours(models, a, b), ours(models, a, b, guess=True), ours(models)
    )
    assert _diff(one, theirs(reference, [single]), "SDXL, one ControlNet") <= 1
    assert _diff(got, theirs(reference, [a, b]), "SDXL, two ControlNets") <= 1
    assert _diff(guessed, theirs(reference, [a, b], guess=True), "SDXL, two ControlNets, guess mode") <= 1
    assert np.abs(got - plain).max() > 10 and np.abs(got - guessed).max() > 0  # neither is vacuous
    assert np.abs(one - plain).max() > 10


def test_mask_and_batch_of_n_equals_n_singles(pipeline, reference, models) -> None:
    """mask_url has the SD1.5 path's meaning; requests with units (one masked), in guess mode and without
    any share one UNet batch and each gets its single-run pixels."""
    a = unit(models, "a", rings(), conditioning_scale=1.5, mask=left_half())
    b = unit(models, "b", stripes(), conditioning_scale=0.9, end=0.8)
    requests = [
        ours(models, a, b),
        ours(models, unit(models, "b", rings(), conditioning_scale=1.7), guess=True, seed=8),
        ours(models, seed=9),
    ]
    batched = run(pipeline, *requests)
    cn_a = reference.controlnet.nets[0]
    cn_a.forward = _masked_controlnet(cn_a, left_half())
    try:
        want = theirs(reference, [a, b])
    finally:
        del cn_a.forward  # back to the class's forward
    assert _diff(batched[0], want, "SDXL, masked ControlNet") <= 1
    assert np.abs(batched[0] - run(pipeline, ours(models, dataclasses.replace(a, mask=None), b))[0]).max() > 0
    for i, (request, together) in enumerate(zip(requests, batched, strict=True)):
        (alone,) = run(pipeline, request)
        assert _diff(together, alone, f"SDXL batched vs single {i}") <= 1


def test_single_file_controlnets_give_the_directory_pixels(pipeline, models, tmp_path: Path) -> None:
    """`path` a .safetensors file (diffusers' names, or the original control_model.* names) with its
    config.json as config_url (OPTIONS "config") = the directory form, exactly; without config_url the
    built-in full-size SDXL config is tried, and the tiny weights are refused asking for config_url."""
    from ember.endpoints.common import media_tensor

    root = models["root"]
    config = json.loads((models["a"] / "config.json").read_text())
    files = {
        layout: controlnet_to_single_file(
            models["a"], root / f"cn-a-{layout}.safetensors", layout == "original"
        )
        for layout in ("diffusers", "original")
    }
    arrays = {"MEDIA": media_tensor([rings()])}
    entry = {"image": 0, "mask": None, "conditioning_scale": 0.8, "end_percentage": 0.7}
    units = [
        parse_controlnets(
            {"controlnets": [{**entry, "path": str(files[layout]), "config": config}]}, arrays, root
        )[0]
        for layout in ("diffusers", "original")
    ]
    directory = dataclasses.replace(units[0], ref=ControlNetRef(str(models["a"])))
    # one request per call: in a shared batch, torch's intra-op threads may sum rows in another order
    want, *got = (run(pipeline, ours(models, u))[0] for u in (directory, *units))
    for layout, image in zip(("diffusers", "original"), got, strict=True):
        assert np.array_equal(image, want), f"single file ({layout} names) vs directory"
    (builtin,) = parse_controlnets({"controlnets": [{**entry, "path": str(files["original"])}]}, arrays, root)
    (result,) = pipeline([ours(models, builtin)])
    assert result.error is not None and result.error.startswith("controlnets[0].path:"), result.error
    assert "controlnet-sdxl" in result.error and "config_url" in result.error, result.error
    with pytest.raises(ValueError, match=r"controlnets\[0\]\.config_url"):  # a directory has its own config
        parse_controlnets(
            {"controlnets": [{**entry, "path": str(models["a"]), "config": config}]}, arrays, root
        )


def test_controlnet_of_the_other_family_is_refused(pipeline, models, tmp_path: Path) -> None:
    from ember.specs.demo_controlnet import build_tiny_controlnet, build_tiny_sd15_base
    from ember.specs.demo_sdxl import build_tiny_sdxl

    sd15_cn = ControlNetRef(str(build_tiny_controlnet(tmp_path / "sd15-cn")))
    good = unit(models, "a", rings())
    on_xl = dataclasses.replace(good, ref=sd15_cn)
    sd15_base = ModelRef(str(build_tiny_sd15_base(tmp_path / "sd15-base")))
    one_layer_xl = ModelRef(str(build_tiny_sdxl(tmp_path / "xl-1-layer")))  # SDXL blocks of 1 layer
    results = pipeline(
        [
            ours(models, good, on_xl, steps=1),
            dataclasses.replace(ours(models, good, steps=1), model=sd15_base),
            dataclasses.replace(ours(models, good, steps=1), model=one_layer_xl),
        ]
    )
    first, second, third = (r.error or "" for r in results)
    assert first.startswith("controlnets[1].path: an SD1.5 ControlNet cannot condition an SDXL base"), first
    assert second.startswith("controlnets[0].path: an SDXL ControlNet cannot condition an SD1.5 base"), second
    assert third.startswith("controlnets: the base model cannot take ControlNets") and "2 layers" in third, (
        third
    )


def test_sd15_original_layout_loads_the_directory_weights(tmp_path: Path) -> None:
    """An SD1.5 ControlNet in lllyasviel's original names (control_model.*) -> every tensor of the
    directory form, through diffusers' conversion; the built-in full-size config refuses the tiny file."""
    from diffusers import ControlNetModel

    from ember.pipeline.lora_controlnets import BUILTIN_CONFIGS, load_single_file_controlnet
    from ember.specs.demo_controlnet import build_tiny_controlnet
    from tests.controlnet_single_file import same_weights

    directory = build_tiny_controlnet(tmp_path / "cn")
    file = controlnet_to_single_file(directory, tmp_path / "cn.safetensors", original=True)
    loaded = load_single_file_controlnet(str(file), directory, torch.float32)
    assert same_weights(loaded, ControlNetModel.from_pretrained(directory))
    with pytest.raises(ValueError, match="size mismatch"):
        load_single_file_controlnet(str(file), BUILTIN_CONFIGS / "controlnet-sd15", torch.float32)
