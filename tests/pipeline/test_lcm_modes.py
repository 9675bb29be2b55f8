"""fal-ai/lcm image-to-image and inpainting vs the diffusers pipelines that define them, same tiny weights
and seed; fal's options (default size, inpaint_mask_only); mixed-mode batches; refused inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from ember.pipeline import Text2ImageRequest
from ember.pipeline.images import default_size
from ember.pipeline.lcm import lcm_batch_key


def picture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8: smooth gradients plus a few flat rectangles, so resizing and encoding matter."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    image = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height)], -1)
    for _ in range(4):
        y, x = rng.integers(0, height - 8), rng.integers(0, width - 8)
        image[y : y + height // 4, x : x + width // 4] = rng.integers(0, 256, 3)
    return image.astype(np.uint8)


def square_mask(height: int, width: int) -> np.ndarray:
    """(H, W) uint8: white (fill) in the middle half, black elsewhere."""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return mask


def _as_uint8(pil_images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in pil_images])


def _maxdiff(ours: torch.Tensor, theirs: np.ndarray) -> int:
    assert tuple(ours.shape) == theirs.shape and ours.dtype == torch.uint8
    return int(np.abs(ours.numpy().astype(np.int16) - theirs.astype(np.int16)).max())


IMAGE = picture(96, 128)
MASK = square_mask(96, 128)


def test_preprocessing_is_diffusers(torch_pipeline, diffusers_lcm_img2img, diffusers_lcm_inpaint) -> None:
    """Our input tensors are exactly what diffusers' processors make of the same PIL images."""
    ours = torch_pipeline.preprocess
    want = diffusers_lcm_img2img.image_processor.preprocess(Image.fromarray(IMAGE))
    assert torch.equal(ours.image_tensor(IMAGE, 128, 96), want)
    want_mask = diffusers_lcm_inpaint.mask_processor.preprocess(Image.fromarray(MASK), height=96, width=128)
    assert torch.equal(ours.mask_tensor(MASK, 128, 96), want_mask)


def _reference_image(pipeline) -> torch.Tensor:
    """What the references get as `image`: the same preprocessed tensor, contiguous NCHW. Given the PIL
    image, diffusers makes a channels-last view (numpy_to_pt) and its convolutions then sum in another
    order: ~1e-6, 1 uint8 level at most, which would hide a real divergence behind a tolerance."""
    return pipeline.preprocess.image_tensor(IMAGE, 128, 96)


@pytest.mark.parametrize(("strength", "steps", "n"), [(0.8, 4, 1), (0.5, 3, 2)])
def test_img2img_torch_matches_diffusers_exactly(torch_pipeline, diffusers_lcm_img2img, strength, steps, n):
    """LatentConsistencyModelImg2ImgPipeline: its preprocessing, LCM strength timesteps, the encoder sample
    and the noise from the same generator; bit-identical with the torch runtime."""
    [result] = torch_pipeline(
        [
            Text2ImageRequest(
                prompt="a watercolor landscape", seed=5, width=None, height=None, image=IMAGE,
                strength=strength, num_inference_steps=steps, guidance_scale=3.0, num_images=n,
            )
        ]
    )
    want = diffusers_lcm_img2img(
        "a watercolor landscape", image=_reference_image(torch_pipeline), strength=strength, num_inference_steps=steps,
        guidance_scale=3.0, num_images_per_prompt=n, generator=torch.Generator("cpu").manual_seed(5),
    ).images
    assert _maxdiff(result.images, _as_uint8(want)) == 0
    assert result.images.shape == (n, 96, 128, 3)  # default size: the input image's


@pytest.mark.parametrize("strength", [0.8, 1.0])
def test_inpaint_torch_matches_diffusers_exactly(torch_pipeline, diffusers_lcm_inpaint, strength):
    """StableDiffusionInpaintPipeline + LCMScheduler + LCM UNet: strength-cut timesteps, known region
    re-imposed after every step, the extra masked-image draw from the generator; bit-identical."""
    [result] = torch_pipeline(
        [
            Text2ImageRequest(
                prompt="a red door", seed=9, width=128, height=96, image=IMAGE, mask=MASK,
                strength=strength, num_inference_steps=4, guidance_scale=2.0,
            )
        ]
    )
    want = diffusers_lcm_inpaint(
        "a red door", image=_reference_image(torch_pipeline), mask_image=Image.fromarray(MASK), height=96,
        width=128,
        strength=strength, num_inference_steps=4, guidance_scale=2.0,
        generator=torch.Generator("cpu").manual_seed(9),
    ).images
    assert _maxdiff(result.images, _as_uint8(want)) == 0


def test_onnxruntime_img2img_and_inpaint_match_diffusers(
    ort_pipeline, diffusers_lcm_img2img, diffusers_lcm_inpaint
) -> None:
    """ONNX Runtime vs diffusers in torch: within 2 levels, < 1 % of values off (why: see
    test_lcm_parity.test_onnxruntime_matches_diffusers)."""
    image_req = Text2ImageRequest(prompt="a hut", seed=3, width=None, height=None, image=IMAGE, strength=0.7)
    inpaint_req = dataclasses.replace(image_req, mask=MASK)
    ours_image, ours_inpaint = ort_pipeline([image_req, inpaint_req])
    generator = torch.Generator("cpu")
    want_image = diffusers_lcm_img2img(
        "a hut", image=Image.fromarray(IMAGE), strength=0.7, num_inference_steps=4, guidance_scale=1.0,
        generator=generator.manual_seed(3),
    ).images
    want_inpaint = diffusers_lcm_inpaint(
        "a hut", image=Image.fromarray(IMAGE), mask_image=Image.fromarray(MASK), height=96, width=128,
        strength=0.7, num_inference_steps=4, guidance_scale=1.0, generator=generator.manual_seed(3),
    ).images
    for ours, want in ((ours_image, want_image), (ours_inpaint, want_inpaint)):
        diff = np.abs(ours.images.numpy().astype(np.int16) - _as_uint8(want).astype(np.int16))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01


def test_inpaint_mask_only_keeps_every_pixel_outside_the_mask(ort_pipeline) -> None:
    req = Text2ImageRequest(
        prompt="a cat", seed=1, width=None, height=None, image=IMAGE, mask=MASK, strength=1.0
    )
    plain, kept = ort_pipeline([req, dataclasses.replace(req, inpaint_mask_only=True)])
    outside = MASK < 128
    assert np.array_equal(kept.images[0].numpy()[outside], IMAGE[outside])
    assert not np.array_equal(plain.images[0].numpy()[outside], IMAGE[outside])  # the VAE alone changes them
    assert np.array_equal(kept.images[0].numpy()[~outside], plain.images[0].numpy()[~outside])


@pytest.mark.parametrize(
    ("image_hw", "size"),
    [((800, 1200), (1024, 680)), ((2000, 1000), (512, 1024)), ((96, 130), (128, 96)), ((1024, 1024), (1024, 1024))],
)
def test_default_size_fits_within_1024_keeping_aspect(image_hw, size) -> None:
    """fal: inputs over 1024 px are resized to 1024 keeping the aspect ratio; then multiples of 8."""
    assert default_size(image_hw) == size


def test_mixed_modes_batch_of_n_equals_n_singles(ort_pipeline) -> None:
    requests = [
        Text2ImageRequest(prompt="a boat", seed=1, width=128, height=96),
        Text2ImageRequest(prompt="a boat", seed=2, width=128, height=96, image=IMAGE, strength=0.6),
        Text2ImageRequest(prompt="a hill", seed=3, width=128, height=96, image=IMAGE, strength=0.9,
                          num_images=2),
        Text2ImageRequest(prompt="a boat", seed=4, width=128, height=96, image=IMAGE, mask=MASK),
        Text2ImageRequest(prompt="a hill", seed=5, width=128, height=96, image=IMAGE, mask=MASK,
                          strength=0.9, inpaint_mask_only=True),
    ]
    # text | image x2 | inpaint (3 steps walked at 0.8 and 0.9): groups of one mode and step count
    assert len({lcm_batch_key(r) for r in requests}) == 3
    batched = ort_pipeline(requests)
    for req, together in zip(requests, batched, strict=True):
        [alone] = ort_pipeline([req])
        assert together.images.shape == alone.images.shape
        assert (together.images.int() - alone.images.int()).abs().max().item() <= 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"image": None, "mask": MASK}, "mask without image"),
        ({"mask": MASK[:50]}, "mask must be (H, W) uint8 with the image's size"),
        ({"mask": None, "strength": 0.05}, "raise strength or lower the steps"),
        ({"strength": 0.1}, "leaves no denoising step"),
        ({"mask": None, "inpaint_mask_only": True}, "inpaint_mask_only needs a mask"),
        ({"enable_safety_checks": True}, "no safety checker is loaded"),
        ({"model": "sdxl"}, "is not loaded here"),
    ],
)
def test_bad_inputs_are_refused_with_a_reason(ort_pipeline, changes, message) -> None:
    req = dataclasses.replace(
        Text2ImageRequest(prompt="x", seed=0, width=None, height=None, image=IMAGE, mask=MASK), **changes
    )
    problems = ort_pipeline.problems(req)
    assert any(message in p for p in problems), problems
    with pytest.raises(ValueError, match="request 0"):
        ort_pipeline([req])
