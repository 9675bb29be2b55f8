"""ControlNet for Stable Diffusion 1.5, as two exported networks that meet in the residual tensors:

    controlnet  (sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale)
                -> down_residual_0 .. down_residual_11, mid_residual
    unet        (sample, timestep, encoder_hidden_states, down_residual_0 .. 11, mid_residual) -> noise_pred

diffusers' StableDiffusionControlNetPipeline adds the ControlNet's outputs to the UNet's skip connections
(`down_block_additional_residuals`, `mid_block_additional_residual`). Keeping the UNet a separate network
with the residuals as inputs lets several ControlNets be summed outside (ember.pipeline.controlnet) and a
step without control feed zeros: x + 0 is x exactly, so that is the plain UNet's result.

SD1.5's UNet has 4 down blocks of 2 layers: conv_in + 4 x 2 resnets + 3 downsamplers = 12 down residuals
(channels c0 x4, c1 x3, c2 x3, c3 x2 at latent / 1, 2, 4, 8) and one mid residual (c3, latent / 8). The
spec fixes that count; models of another layout are refused with a message (residual_layout).

fal-ai/lcm's controlnet_inpaint runs the LCM UNet the same way, with its guidance embedding as one more
input (CONTROLLED_LCM_UNET: sample, timestep, encoder_hidden_states, timestep_cond, residuals).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

from ember.specs.base import NetworkSpec, TensorSpec
from ember.specs.sd15 import (
    LATENT_SCALE,
    SD15_LCM_NETWORKS,
    TEXT_ENCODER,
    TEXT_LENGTH,
    VAE_DECODER,
    _sample,
)

SD15_BLOCKS, SD15_LAYERS = 4, 2
NUM_DOWN_RESIDUALS = 1 + SD15_BLOCKS * SD15_LAYERS + (SD15_BLOCKS - 1)  # 12
RESIDUAL_NAMES = tuple(f"down_residual_{i}" for i in range(NUM_DOWN_RESIDUALS)) + ("mid_residual",)


def residual_layout(config: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(channels, level) of each residual in RESIDUAL_NAMES order; level k lives at latent / 2^k.

    Raises ValueError for a UNet / ControlNet that is not SD1.5-shaped (the spec has 13 fixed tensors).
    """
    channels = list(config["block_out_channels"])
    layers = config["layers_per_block"]
    if len(channels) != SD15_BLOCKS or layers != SD15_LAYERS:
        raise ValueError(
            f"ControlNet residuals are declared for SD1.5's {SD15_BLOCKS} blocks x {SD15_LAYERS} layers, "
            f"not {len(channels)} blocks x {layers} layers: use an SD1.5 model (SDXL: ember.specs.controlnet_xl)"
        )
    return skip_layout(channels, layers)


def skip_layout(channels: list[int], layers: int) -> list[tuple[int, int]]:
    """(channels, level) of a UNet encoder's skip connections and mid block, in the order diffusers'
    ControlNetModel returns its residuals: conv_in, `layers` resnets per block, a downsampler after every
    block but the last (at the next level), then the mid block (at the deepest level)."""
    layout = [(channels[0], 0)]  # conv_in
    for block, width in enumerate(channels):
        layout += [(width, block)] * layers  # the block's resnets
        if block < len(channels) - 1:
            layout.append((width, block + 1))  # its downsampler, at the next level
    layout.append((channels[-1], len(channels) - 1))  # mid block
    return layout


def _level_axes(level: int) -> tuple[str, str]:
    if level == 0:
        return ("latent_height", "latent_width")
    return (f"latent_height_{2**level}", f"latent_width_{2**level}")


def _residual_tensors() -> tuple[TensorSpec, ...]:
    # Channels are static (read from the config by _dims); the levels are SD1.5's (residual_layout).
    levels = [level for _, level in residual_layout({"block_out_channels": [1] * 4, "layers_per_block": 2})]
    return tuple(
        TensorSpec(name, torch.float32, ("batch", f"{name}_channels", *_level_axes(level)))
        for name, level in zip(RESIDUAL_NAMES, levels, strict=True)
    )


RESIDUALS = _residual_tensors()


class SdControlNet(nn.Module):
    """One ControlNet call. conditioning_scale is per sample (B,) so one batch may mix requests with
    different scales, or with control switched off (scale 0, outside control_guidance_start/end). diffusers
    multiplies every residual by a float scale; multiplying by 1 inside and by the per-sample scale here
    gives the same floats."""

    def __init__(self, controlnet: ControlNetModel):
        super().__init__()
        self.controlnet = controlnet
        self.config = dict(controlnet.config)

    def forward(
        self,
        sample: torch.Tensor,  # (B, 4, h, w), already scaled by the scheduler
        timestep: torch.Tensor,  # (B,)
        encoder_hidden_states: torch.Tensor,  # (B, 77, D)
        controlnet_cond: torch.Tensor,  # (B, 3, 8h, 8w) in [0, 1]
        conditioning_scale: torch.Tensor,  # (B,)
    ) -> tuple[torch.Tensor, ...]:
        down, mid = self.controlnet(
            sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale=1.0, return_dict=False
        )
        scale = conditioning_scale.to(sample.dtype)[:, None, None, None]
        return tuple(r * scale for r in (*down, mid))


class ControlledUNet(nn.Module):
    """The plain SD1.5 UNet with ControlNet residuals added to its skip connections; inputs in
    ControlledUNet spec order: sample, timestep, encoder_hidden_states, 12 down residuals, mid residual."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self.config = dict(unet.config)

    def forward(
        self,
        sample: torch.Tensor,  # (B, 4, h, w)
        timestep: torch.Tensor,  # (B,)
        encoder_hidden_states: torch.Tensor,  # (B, 77, D)
        *residuals: torch.Tensor,  # RESIDUALS' shapes
    ) -> torch.Tensor:
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


class ControlledLcmUNet(nn.Module):
    """The LCM UNet with ControlNet residuals added to its skip connections; inputs in CONTROLLED_LCM_UNET
    order: sample, timestep, encoder_hidden_states, timestep_cond, 12 down residuals, mid residual.

    timestep_cond is the guidance embedding (B, time_cond_proj_dim), as diffusers'
    StableDiffusionControlNetPipeline passes it to an LCM UNet; the ControlNet itself takes none (SD1.5
    ControlNets have no time_cond_proj_dim)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self.config = dict(unet.config)

    def forward(
        self,
        sample: torch.Tensor,  # (B, 4, h, w)
        timestep: torch.Tensor,  # (B,)
        encoder_hidden_states: torch.Tensor,  # (B, 77, D)
        timestep_cond: torch.Tensor,  # (B, time_cond_proj_dim)
        *residuals: torch.Tensor,  # RESIDUALS' shapes
    ) -> torch.Tensor:
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            timestep_cond=timestep_cond,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


def _load_controlnet(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    """A ControlNet repository or directory with config.json at its root (e.g. the QR-code monster)."""
    controlnet = ControlNetModel.from_pretrained(source, revision=revision, dtype=dtype)
    residual_layout(controlnet.config)
    return SdControlNet(controlnet.eval())


def _load_controlled_unet(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=revision, dtype=dtype)
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError(f"{source}'s UNet is LCM-distilled (time_cond_proj_dim set): use a plain SD1.5 base")
    residual_layout(unet.config)
    return ControlledUNet(unet.eval())


def _load_controlled_lcm_unet(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=revision, dtype=dtype)
    if unet.config.time_cond_proj_dim is None:
        raise ValueError(f"{source} has no LCM UNet: unet/config.json sets no time_cond_proj_dim")
    try:
        residual_layout(unet.config)
    except ValueError as exc:  # the one way a served LCM SD1.5 gets here: a demo from before demo_version 2
        raise ValueError(
            f"{source}: {exc}. A tiny-lcm-sd15 demo built before it had 2 layers per block: rebuild it with "
            "`python -m export.demo_models --force`"
        ) from exc
    return ControlledLcmUNet(unet.eval())


def _grid_dims(batch: int, height: int, width: int) -> dict[str, int]:
    """Dynamic sizes: each downsampler (3x3 conv, stride 2, padding 1) maps n to ceil(n / 2)."""
    dims = {"batch": batch, "image_height": height, "image_width": width}
    h, w = height // LATENT_SCALE, width // LATENT_SCALE
    for level in range(SD15_BLOCKS):
        dims.update(zip(_level_axes(level), (h, w), strict=True))
        h, w = -(-h // 2), -(-w // 2)
    return dims


def _dims(config: Mapping[str, Any]) -> dict[str, int]:
    dims = {
        "latent_channels": config["in_channels"],
        "sequence": TEXT_LENGTH,
        "hidden": config["cross_attention_dim"],
        "rgb": config.get("conditioning_channels", 3),
    }
    for name, (channels, _) in zip(RESIDUAL_NAMES, residual_layout(config), strict=True):
        dims[f"{name}_channels"] = channels
    return dims


def _lcm_dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {**_dims(config), "time_cond": config["time_cond_proj_dim"]}


def _controlnet_sample(spec: TensorSpec, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if spec.name == "controlnet_cond":
        return torch.rand(shape, generator=generator)  # a control image in [0, 1]
    if spec.name == "conditioning_scale":
        return torch.rand(shape, generator=generator) * 2  # 0..2, one per sample
    return _sample(spec, shape, generator)


F32 = torch.float32
_LATENT = ("batch", "latent_channels", "latent_height", "latent_width")
_UNET_INPUTS = (
    TensorSpec("sample", F32, _LATENT),
    TensorSpec("timestep", F32, ("batch",)),
    TensorSpec("encoder_hidden_states", F32, ("batch", "sequence", "hidden")),
)

CONTROLNET = NetworkSpec(
    name="controlnet",
    subfolder="",  # a ControlNet is its own repository: config.json at the root
    version=1,
    inputs=(
        *_UNET_INPUTS,
        TensorSpec("controlnet_cond", F32, ("batch", "rgb", "image_height", "image_width")),
        TensorSpec("conditioning_scale", F32, ("batch",)),
    ),
    outputs=RESIDUALS,
    load=_load_controlnet,
    static_dims=_dims,
    image_dims=_grid_dims,
    sample=_controlnet_sample,
)

CONTROLLED_UNET = NetworkSpec(
    name="unet",
    subfolder="unet",
    version=1,
    inputs=(*_UNET_INPUTS, *RESIDUALS),
    outputs=(TensorSpec("noise_pred", F32, _LATENT),),
    load=_load_controlled_unet,
    static_dims=_dims,
    image_dims=_grid_dims,
    sample=_controlnet_sample,
)

CONTROLLED_LCM_UNET = NetworkSpec(
    name="controlled_unet",
    subfolder="unet",
    version=1,
    inputs=(*_UNET_INPUTS, TensorSpec("timestep_cond", F32, ("batch", "time_cond")), *RESIDUALS),
    outputs=(TensorSpec("noise_pred", F32, _LATENT),),
    load=_load_controlled_lcm_unet,
    static_dims=_lcm_dims,
    image_dims=_grid_dims,
    sample=_controlnet_sample,
)

# An SD1.5 base whose UNet takes ControlNet residuals (fal-ai/illusion-diffusion), in the order they run;
# the ControlNet itself is its own family (its own repository): CONTROLNET_NETWORKS.
SD15_CONTROLLED_NETWORKS = (TEXT_ENCODER, CONTROLLED_UNET, VAE_DECODER)
CONTROLNET_NETWORKS = (CONTROLNET,)
# fal-ai/lcm SD1.5: the LCM networks, plus the same UNet taking ControlNet residuals for controlnet_inpaint
# (a second export of the one UNet, so requests without it keep the plain UNet; its runner is created on
# first use, ember.pipeline.lcm_controlnet). The inpaint ControlNet is a family of its own.
SD15_LCM_CONTROLLABLE_NETWORKS = (*SD15_LCM_NETWORKS, CONTROLLED_LCM_UNET)
