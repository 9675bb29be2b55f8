"""Tiny random-weight stand-ins for SDXL ControlNets on fal-ai/lora: an SDXL base whose UNet has SDXL's
real layout (3 down blocks x 2 layers, so the 9 + 1 residuals of ember.specs.controlnet_xl; the tiny SDXL
of ember.specs.demo_sdxl has 1 layer per block), and ControlNetModels that fit it (diffusers/controlnet-
canny-sdxl-1.0's classes: ControlNetModel.from_unet of the SDXL UNet, "text_time" added conditions).

As for the SD1.5 stand-ins (ember.specs.demo_controlnet), the zero convolutions get small random weights:
zeros would make every residual zero and every ControlNet test vacuous.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from ember.specs.demo_controlnet import _build_atomically, _unzero
from ember.specs.demo_sdxl import _unet, build_tiny_sdxl

SEED = 0
CONTROLNET_SEED = 1


def _xl_unet() -> UNet2DConditionModel:
    """The tiny SDXL base UNet with SDXL's 2 layers per block (real: the same), narrow as the demo's."""
    return UNet2DConditionModel.from_config(
        {**dict(_unet(time_cond_proj_dim=None).config), "layers_per_block": 2}
    )


def build_tiny_sdxl_controllable(directory: Path) -> Path:
    """The tiny SDXL base (ember.specs.demo_sdxl.build_tiny_sdxl) with an SDXL-layout UNet, into `directory`."""

    def write(staging: Path) -> None:
        build_tiny_sdxl(staging / "model")
        torch.manual_seed(SEED)
        _xl_unet().save_pretrained(staging / "model" / "unet", safe_serialization=True)

    return _build_atomically(directory, write)


def tiny_xl_controlnet(seed: int = CONTROLNET_SEED) -> ControlNetModel:
    """A ControlNetModel fitting build_tiny_sdxl_controllable's UNet (random weights from `seed`)."""
    torch.manual_seed(SEED)
    unet = _xl_unet()
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(8, 16, 16, 32), load_weights_from_unet=False
    )
    return _unzero(controlnet)  # real: (16, 32, 96, 256)


def build_tiny_xl_controlnet(
    directory: Path, seed: int = CONTROLNET_SEED, variant: str | None = None
) -> Path:
    """tiny_xl_controlnet saved with config.json at the root of `directory`; `variant` saves the weights
    as diffusion_pytorch_model.<variant>.safetensors."""

    def write(staging: Path) -> None:
        tiny_xl_controlnet(seed).save_pretrained(staging / "model", safe_serialization=True, variant=variant)

    return _build_atomically(directory, write)
