"""fal-ai/lcm controlnet_inpaint vs diffusers' StableDiffusionControlNetInpaintPipeline (LCM UNet, LCMScheduler,
the tiny inpaint ControlNet), same weights and seed; batching, inpaint_mask_only, laziness, refusals.

The reference never gives an LCM UNet its guidance embedding (see ember.pipeline.lcm_controlnet); it gets
the one diffusers' LCM pipelines compute (get_guidance_scale_embedding(guidance_scale - 1)) through a UNet
forward hook, and runs without CFG (guidance_scale=1 there), as every other lcm mode does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from PIL import Image

from ember.pipeline import Text2ImageRequest
from ember.pipeline.lcm import LcmPipeline, lcm_batch_key
from ember.pipeline.lcm_controlnet import INPAINT_CONTROLNET, inpaint_condition
from ember.specs import ensure_artifacts, read_artifacts
from tests.pipeline.conftest import tiny_settings
from tests.pipeline.test_lcm_modes import _as_uint8, picture, square_mask

IMAGE = picture(96, 128, seed=3)  # at the output size (128 x 96): no resize on either side
MASK = square_mask(96, 128)
WIDTH, HEIGHT = 128, 96


def make_inpaint_condition(image: Image.Image, image_mask: Image.Image) -> torch.Tensor:
    """diffusers' documented control image for the inpaint ControlNet (docs: ControlNet, inpainting)."""
    pixels = np.array(image.convert("RGB")).astype(np.float32) / 255.0
    mask = np.array(image_mask.convert("L")).astype(np.float32) / 255.0
    pixels[mask > 0.5] = -1.0  # set as masked pixel
    return torch.from_numpy(np.expand_dims(pixels, 0).transpose(0, 3, 1, 2))


@pytest.fixture(scope="module")
def controlnet_source(lcm_settings) -> str:
    return read_artifacts(ensure_artifacts(lcm_settings, *INPAINT_CONTROLNET, progress=False)).source


@pytest.fixture(scope="module")
def cn_ort(lcm_settings, lcm_artifacts, controlnet_source) -> LcmPipeline:
    return LcmPipeline.from_artifacts(lcm_settings, lcm_artifacts, controlnet_inpaint=True)


@pytest.fixture(scope="module")
def cn_torch(var_dir, lcm_artifacts, controlnet_source) -> LcmPipeline:
    settings = tiny_settings(var_dir, EMBER_RUNTIME="torch", EMBER_DEVICE="cpu", EMBER_DTYPE="float32")
    return LcmPipeline.from_artifacts(settings, lcm_artifacts, controlnet_inpaint=True)


@pytest.fixture(scope="module")
def reference(lcm_artifacts, controlnet_source):
    from diffusers import (
        ControlNetModel,
        LatentConsistencyModelPipeline,
        StableDiffusionControlNetInpaintPipeline,
    )

    lcm = LatentConsistencyModelPipeline.from_pretrained(
        lcm_artifacts.source, safety_checker=None, requires_safety_checker=False, dtype=torch.float32
    )
    pipe = StableDiffusionControlNetInpaintPipeline(
        **dict(lcm.components),
        controlnet=ControlNetModel.from_pretrained(controlnet_source, dtype=torch.float32),
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def lcm_guidance(unet: torch.nn.Module, guidance_scale: float) -> Iterator[None]:
    """Hands the UNet the guidance embedding diffusers' LCM pipelines compute (timestep_cond)."""
    from diffusers import LatentConsistencyModelPipeline

    def hook(module, args, kwargs):
        w = torch.tensor(guidance_scale - 1).repeat(args[0].shape[0])
        emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(
            None, w, embedding_dim=module.config.time_cond_proj_dim
        )
        return args, {**kwargs, "timestep_cond": emb}

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def run_reference(pipe, pipeline: LcmPipeline, request: Text2ImageRequest) -> np.ndarray:
    with lcm_guidance(pipe.unet, request.guidance_scale):
        images = pipe(
            request.prompt,
            # the preprocessed tensor, contiguous NCHW (why: test_lcm_modes._reference_image)
            image=pipeline.preprocess.image_tensor(IMAGE, WIDTH, HEIGHT),
            mask_image=Image.fromarray(MASK),
            # contiguous NCHW too: the docs' transpose leaves a channels-last view, whose convolutions
            # sum in another order (~1e-6), as with `image` above
            control_image=make_inpaint_condition(Image.fromarray(IMAGE), Image.fromarray(MASK)).contiguous(),
            height=HEIGHT,
            width=WIDTH,
            strength=request.strength,
            num_inference_steps=request.num_inference_steps,
            guidance_scale=1.0,  # no CFG: guidance travels as the embedding above
            num_images_per_prompt=request.num_images,
            generator=torch.Generator("cpu").manual_seed(request.seed),
        ).images
    return _as_uint8(images)


def request(**changes) -> Text2ImageRequest:
    base = Text2ImageRequest(
        prompt="a red door",
        seed=9,
        width=WIDTH,
        height=HEIGHT,
        image=IMAGE,
        mask=MASK,
        strength=0.8,
        guidance_scale=2.0,
        controlnet_inpaint=True,
    )
    return dataclasses.replace(base, **changes)


def _diff(ours: torch.Tensor, theirs: np.ndarray) -> np.ndarray:
    assert tuple(ours.shape) == theirs.shape and ours.dtype == torch.uint8
    return np.abs(ours.numpy().astype(np.int16) - theirs.astype(np.int16))


def test_control_image_is_make_inpaint_condition(cn_ort) -> None:
    fill = cn_ort.preprocess.mask_tensor(MASK, WIDTH, HEIGHT)
    want = make_inpaint_condition(Image.fromarray(IMAGE), Image.fromarray(MASK))
    assert torch.equal(inpaint_condition(IMAGE, fill), want)
    assert (want == -1).any() and (want >= 0).any()


def test_networks_load_on_first_use(lcm_settings, lcm_artifacts) -> None:
    pipeline = LcmPipeline.from_artifacts(lcm_settings, lcm_artifacts, controlnet_inpaint=True)
    pipeline([request(controlnet_inpaint=False, num_inference_steps=1, strength=1.0)])
    assert pipeline.inpaint_control._loaded is None  # the plain path never touched them
    control = pipeline.inpaint_control()
    assert control is pipeline.inpaint_control()  # created once


# strength < 1 (image + noise, the schedule's tail) with two images and guidance 2; strength 1 (pure noise)
CASES = {"tail": request(num_images=2), "full": request(strength=1.0, guidance_scale=1.0, seed=2)}


@pytest.fixture(scope="module")
def references(reference, cn_ort) -> dict[str, np.ndarray]:
    return {name: run_reference(reference, cn_ort, req) for name, req in CASES.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_torch_matches_diffusers(cn_torch, references, case) -> None:
    """Same latents, generator draws, strength cut, blend and ControlNet residuals: <= 1 level. Measured:
    0 for "tail", 1 for "full" (one value of 36,864). The ControlNet's inputs are bit-identical, yet its
    residuals already differ from diffusers' by <= 5e-7 at the first step (not yet traced; plain lcm
    inpainting, the same UNet without residuals, is bit-identical: test_lcm_modes)."""
    [result] = cn_torch([CASES[case]])
    assert _diff(result.images, references[case]).max() <= 1


def test_onnxruntime_matches_diffusers(cn_ort, references) -> None:
    """ONNX Runtime vs diffusers in torch: <= 2 levels, < 1 % of values off (test_lcm_parity says why).
    Measured: max 1 level, on 0.003 % of the values."""
    [result] = cn_ort([CASES["tail"]])
    diff = _diff(result.images, references["tail"])
    assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_the_controlnet_steers_the_fill(cn_ort) -> None:
    plain, steered = cn_ort([request(controlnet_inpaint=False), request()])
    inside = np.broadcast_to((MASK >= 128)[None, :, :, None], plain.images.shape)
    assert np.abs(plain.images.numpy()[inside].astype(int) - steered.images.numpy()[inside]).max() > 8


def test_inpaint_mask_only_keeps_every_pixel_outside_the_mask(cn_ort) -> None:
    plain, kept = cn_ort([request(), request(inpaint_mask_only=True)])
    outside = MASK < 128
    assert np.array_equal(kept.images[0].numpy()[outside], IMAGE[outside])
    assert np.array_equal(kept.images[0].numpy()[~outside], plain.images[0].numpy()[~outside])


BATCH = [
    request(num_images=2),
    request(seed=4, prompt="a window", guidance_scale=4.0, inpaint_mask_only=True),
    request(seed=5, controlnet_inpaint=False),  # plain inpainting: its own group (another UNet)
    request(seed=6),
    Text2ImageRequest(prompt="a boat", seed=7, width=WIDTH, height=HEIGHT),  # text-to-image
]


def test_batch_of_n_equals_n_singles(cn_ort) -> None:
    """ControlNet rows and plain rows never share a UNet call; within a call, batching is exact."""
    assert len({lcm_batch_key(r) for r in BATCH}) == 3
    batched = cn_ort(BATCH)
    for req, together in zip(BATCH, batched, strict=True):
        [alone] = cn_ort([req])
        assert torch.equal(together.images, alone.images), f"seed {req.seed}"


def test_refusals(ort_pipeline, cn_ort) -> None:
    no_mask = request(mask=None)
    assert any("controlnet_inpaint needs a mask" in p for p in cn_ort.problems(no_mask))
    assert any("without the inpaint ControlNet" in p for p in ort_pipeline.problems(request()))
    with pytest.raises(ValueError, match="controlnet_inpaint needs a mask"):
        cn_ort([no_mask])
