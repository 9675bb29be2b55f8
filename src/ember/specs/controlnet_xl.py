"""ControlNet for Stable Diffusion XL, as two networks that meet in the residual tensors (the SD1.5 pair of
ember.specs.controlnet, plus SDXL's "text_time" added conditions on both sides):

    controlnet  (sample, timestep, encoder_hidden_states, text_embeds, time_ids, controlnet_cond,
                 conditioning_scale) -> down_residual_0 .. down_residual_8, mid_residual
    unet        (sample, timestep, encoder_hidden_states, text_embeds, time_ids, down_residual_0 .. 8,
                 mid_residual) -> noise_pred

diffusers' StableDiffusionXLControlNetPipeline gives an SDXL ControlNet (ControlNetModel with
addition_embed_type "text_time") the same added_cond_kwargs as the UNet: the pooled `text_embeds` (B, P)
and the six size/crop `time_ids` (B, 6), row for row (the conditional half only in guess mode).

SDXL's UNet has 3 down blocks of 2 layers: conv_in + 3 x 2 resnets + 2 downsamplers = 9 down residuals
(channels c0 x4, c1 x3, c2 x2 at latent / 1, 2, 4) and one mid residual (c2, latent / 4). The spec fixes
that count (xl_residual_layout refuses other layouts by message). ControlNets with fewer transformer layers
than the UNet (the "small" / "mid" SDXL ControlNets) fit: residuals depend on blocks and layers only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import nn

from ember.specs.base import NetworkSpec, TensorSpec
from ember.specs.controlnet import _controlnet_sample, _grid_dims, _level_axes, skip_layout
from ember.specs.sd15 import TEXT_LENGTH
from ember.specs.sdxl import _UNET_INPUTS, TIME_IDS, _unet_dims

XL_BLOCKS, XL_LAYERS = 3, 2
XL_NUM_DOWN_RESIDUALS = 1 + XL_BLOCKS * XL_LAYERS + (XL_BLOCKS - 1)  # 9
XL_RESIDUAL_NAMES = tuple(f"down_residual_{i}" for i in range(XL_NUM_DOWN_RESIDUALS)) + ("mid_residual",)


def is_xl_controlnet(config: Mapping[str, Any]) -> bool:
    """An SDXL ControlNet (or UNet): conditioned on "text_time" (pooled embeds + size/crop ids)."""
    return config.get("addition_embed_type") == "text_time"


def xl_residual_layout(config: Mapping[str, Any]) -> list[tuple[int, int]]:
    """(channels, level) of each residual in XL_RESIDUAL_NAMES order; level k lives at latent / 2^k.

    Raises ValueError for a UNet / ControlNet that is not SDXL-shaped (the spec has 10 fixed tensors)."""
    channels = list(config["block_out_channels"])
    layers = config["layers_per_block"]
    if not is_xl_controlnet(config):
        raise ValueError(
            f"it is not an SDXL model (addition_embed_type {config.get('addition_embed_type')!r}, not "
            "'text_time')"
        )
    if len(channels) != XL_BLOCKS or layers != XL_LAYERS:
        raise ValueError(
            f"SDXL ControlNet residuals are declared for SDXL's {XL_BLOCKS} blocks x {XL_LAYERS} layers, not "
            f"{len(channels)} blocks x {layers} layers"
        )
    return skip_layout(channels, layers)


def _residual_tensors() -> tuple[TensorSpec, ...]:
    layout = xl_residual_layout(
        {
            "block_out_channels": [1] * XL_BLOCKS,
            "layers_per_block": XL_LAYERS,
            "addition_embed_type": "text_time",
        }
    )
    return tuple(
        TensorSpec(name, torch.float32, ("batch", f"{name}_channels", *_level_axes(level)))
        for name, (_, level) in zip(XL_RESIDUAL_NAMES, layout, strict=True)
    )


XL_RESIDUALS = _residual_tensors()


class XLControlNet(nn.Module):
    """One SDXL ControlNet call; conditioning_scale per sample (B,) as ember.specs.controlnet.SdControlNet
    (diffusers multiplies by a float scale; x * 1 inside then x * scale here gives the same floats)."""

    def __init__(self, controlnet: ControlNetModel):
        super().__init__()
        self.controlnet = controlnet
        self.config = dict(controlnet.config)

    def forward(
        self,
        sample: torch.Tensor,  # (B, 4, h, w), already scaled by the scheduler
        timestep: torch.Tensor,  # (B,)
        encoder_hidden_states: torch.Tensor,  # (B, 77, 2048)
        text_embeds: torch.Tensor,  # (B, 1280)
        time_ids: torch.Tensor,  # (B, 6)
        controlnet_cond: torch.Tensor,  # (B, 3, 8h, 8w) in [0, 1]
        conditioning_scale: torch.Tensor,  # (B,)
    ) -> tuple[torch.Tensor, ...]:
        down, mid = self.controlnet(
            sample,
            timestep,
            encoder_hidden_states,
            controlnet_cond,
            conditioning_scale=1.0,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            return_dict=False,
        )
        scale = conditioning_scale.to(sample.dtype)[:, None, None, None]
        return tuple(r * scale for r in (*down, mid))


class XLControlledUNet(nn.Module):
    """The plain SDXL UNet with ControlNet residuals added to its skip connections; inputs in
    XL_CONTROLLED_UNET order: sample, timestep, encoder_hidden_states, text_embeds, time_ids, 9 down
    residuals, mid residual."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        self.config = dict(unet.config)

    def forward(
        self,
        sample: torch.Tensor,  # (B, 4, h, w)
        timestep: torch.Tensor,  # (B,)
        encoder_hidden_states: torch.Tensor,  # (B, 77, 2048)
        text_embeds: torch.Tensor,  # (B, 1280)
        time_ids: torch.Tensor,  # (B, 6)
        *residuals: torch.Tensor,  # XL_RESIDUALS' shapes
    ) -> torch.Tensor:
        return self.unet(
            sample,
            timestep,
            encoder_hidden_states,
            added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


def _load_xl_controlnet(
    source: str, revision: str | None, dtype: torch.dtype, variant: str | None = None
) -> nn.Module:
    """An SDXL ControlNet directory (config.json at its root), e.g. diffusers/controlnet-canny-sdxl-1.0."""
    controlnet = ControlNetModel.from_pretrained(source, revision=revision, dtype=dtype, variant=variant)
    xl_residual_layout(controlnet.config)
    return XLControlNet(controlnet.eval())


def _load_xl_controlled_unet(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", revision=revision, dtype=dtype)
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError(f"{source}'s UNet is LCM-distilled (time_cond_proj_dim set): use a plain SDXL base")
    xl_residual_layout(unet.config)
    return XLControlledUNet(unet.eval())


def _xl_dims(config: Mapping[str, Any]) -> dict[str, int]:
    """Fixed sizes from a ControlNet's or UNet's config (both carry the same "text_time" fields)."""
    dims = {
        **_unet_dims({**config, "time_cond_proj_dim": config.get("time_cond_proj_dim")}),
        "sequence": TEXT_LENGTH,
        "time_ids": TIME_IDS,
        "rgb": config.get("conditioning_channels", 3),
    }
    for name, (channels, _) in zip(XL_RESIDUAL_NAMES, xl_residual_layout(config), strict=True):
        dims[f"{name}_channels"] = channels
    return dims


F32 = torch.float32
_LATENT = ("batch", "latent_channels", "latent_height", "latent_width")

XL_CONTROLNET = NetworkSpec(
    name="controlnet_xl",
    subfolder="",  # a ControlNet is its own repository: config.json at the root
    version=1,
    inputs=(
        *_UNET_INPUTS,
        TensorSpec("controlnet_cond", F32, ("batch", "rgb", "image_height", "image_width")),
        TensorSpec("conditioning_scale", F32, ("batch",)),
    ),
    outputs=XL_RESIDUALS,
    load=_load_xl_controlnet,
    static_dims=_xl_dims,
    image_dims=_grid_dims,
    sample=_controlnet_sample,
)

XL_CONTROLLED_UNET = NetworkSpec(
    name="unet",
    subfolder="unet",
    version=1,
    inputs=(*_UNET_INPUTS, *XL_RESIDUALS),
    outputs=(TensorSpec("noise_pred", F32, _LATENT),),
    load=_load_xl_controlled_unet,
    static_dims=_xl_dims,
    image_dims=_grid_dims,
    sample=_controlnet_sample,
)
