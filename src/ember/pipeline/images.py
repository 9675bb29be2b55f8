"""Input images for image-to-image and inpainting: sizing, preprocessing, VAE encoding, paste-back.

Preprocessing is diffusers' own VaeImageProcessor (the instances are built once per pipeline, not per
request), so an input array gives exactly the tensors diffusers' pipelines build from the same PIL image.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from ember.runtime import Runner

# fal-ai/lcm: "If either width or height of the image is larger than 1024 pixels, the image will be
# resized to 1024 pixels while keeping the aspect ratio."
MAX_INPUT_SIDE = 1024


def default_size(image_hw: tuple[int, int], multiple: int = 8) -> tuple[int, int]:
    """(width, height) of the output when the request names no size: the input image's, scaled down to
    fit MAX_INPUT_SIDE keeping the aspect ratio, then rounded down to a multiple of `multiple` (as
    VaeImageProcessor.get_default_height_width does)."""
    height, width = image_hw
    scale = min(1.0, MAX_INPUT_SIDE / max(height, width))
    width, height = round(width * scale), round(height * scale)
    return max(multiple, width - width % multiple), max(multiple, height - height % multiple)


class ImagePreprocessor:
    """uint8 arrays -> the float tensors the networks take, via diffusers' processors (built once)."""

    def __init__(self, vae_scale_factor: int):
        self.image = VaeImageProcessor(vae_scale_factor=vae_scale_factor)
        # The inpainting pipelines' mask processor: grayscale, no normalization, binarized at 0.5.
        self.mask = VaeImageProcessor(
            vae_scale_factor=vae_scale_factor, do_normalize=False, do_binarize=True, do_convert_grayscale=True
        )

    def image_tensor(self, image: np.ndarray, width: int, height: int) -> torch.Tensor:
        """(H0, W0, 3) uint8 -> (1, 3, height, width) float32 in [-1, 1] (Lanczos resize, as diffusers).

        Made contiguous: diffusers' numpy_to_pt returns a channels-last view of the HWC array, and torch
        convolutions over a channels-last input sum in another order (values move by ~1e-6). Every runner
        here takes plain NCHW.
        """
        return self.image.preprocess(Image.fromarray(image), height=height, width=width).float().contiguous()

    def mask_tensor(self, mask: np.ndarray, width: int, height: int) -> torch.Tensor:
        """(H0, W0) uint8, white = fill -> (1, 1, height, width) float32 in {0, 1}, 1 = fill."""
        return self.mask.preprocess(Image.fromarray(mask, mode="L"), height=height, width=width).float()


def encode_images(
    vae_encoder: Runner, pixels: torch.Tensor, generators: list[torch.Generator], scaling_factor: float
) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1], one generator per row -> (B, 4, H/8, W/8) scaled latents.

    One encoder call for the batch; each row's sample then draws its noise from its own generator, as
    diffusers' `retrieve_latents(vae.encode(image), generator)` does for one image: mean + std * noise.
    """
    out = vae_encoder.run({"images": pixels})
    mean, std = out["latent_mean"].cpu(), out["latent_std"].cpu()
    samples = [
        m[None] + s[None] * randn_tensor((1, *m.shape), generator=g, dtype=m.dtype)
        for m, s, g in zip(mean, std, generators, strict=True)
    ]
    return torch.cat(samples) * scaling_factor


def paste_outside_mask(generated: torch.Tensor, original: np.ndarray, mask: np.ndarray) -> torch.Tensor:
    """inpaint_mask_only: (k, H, W, 3) uint8 generated images with the original pixels restored wherever
    the mask is black. `original` and `mask` are resized to (H, W) first (Lanczos / nearest), the mask
    binarized at half grey as the pipeline's mask processor does."""
    height, width = generated.shape[1:3]
    original_image = Image.fromarray(original)
    mask_image = Image.fromarray(mask, mode="L")
    if original_image.size != (width, height):
        original_image = original_image.resize((width, height), Image.Resampling.LANCZOS)
        mask_image = mask_image.resize((width, height), Image.Resampling.NEAREST)
    keep = torch.from_numpy(np.asarray(mask_image) < 128)[None, :, :, None]  # (1, H, W, 1): not to fill
    return torch.where(keep, torch.from_numpy(np.asarray(original_image).copy())[None], generated)
