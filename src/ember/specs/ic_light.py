"""The IC-Light UNet (ember.pipeline.ic_light): an SD1.5 UNet whose conv_in takes the latents plus IC-Light's
concat_conds (4 channels "fc", 8 channels "fbc"), concatenated inside the wrapper exactly where IC-Light's
hooked_unet_forward does it (after the scheduler scaled the latents; conds repeated over the batch rows).

Built from a base model's UNet plus an IC-Light offset file (`ember.pipeline.ic_light.patch_unet`), never
loaded by name: `load` says so. With ControlNets or IP-Adapters the patched UNet runs inside their wrappers
instead, behind the same concat (ConcatConds, `with_concat_conds`): torch runtime only, not exported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ember.specs.base import NetworkSpec, TensorSpec
from ember.specs.lora import UNET, _unet_dims
from ember.specs.sd15 import _image_dims, _sample


class IcLightUNet(nn.Module):
    """sample (B, 4, h, w), timestep (B,), encoder_hidden_states (B, 77, D), concat_conds (B, 4 | 8, h, w)
    -> noise_pred (B, 4, h, w) of the patched UNet on cat([sample, concat_conds], dim=1)."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet
        latent = int(unet.config.in_channels)
        self.config = {**dict(unet.config), "concat_channels": int(unet.conv_in.in_channels) - latent}

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        concat_conds: torch.Tensor,
    ) -> torch.Tensor:
        wide = torch.cat([sample, concat_conds.to(sample)], dim=1)
        return self.unet(wide, timestep, encoder_hidden_states, return_dict=False)[0]


class ConcatConds(nn.Module):
    """IC-Light's concat in front of another UNet wrapper whose diffusers UNet is a patched one (the
    ControlNet-residual one of ember.specs.controlnet, the IP-Adapter one of ember.pipeline.ip_adapter):
    inputs are the inner wrapper's, then concat_conds (B, 4 | 8, h, w) last; the inner wrapper gets
    cat([sample, concat_conds], dim=1) as its sample. ControlNets run outside it, on the 4-channel sample,
    as diffusers' ControlNet pipeline feeds them the latents while IC-Light's hook widens only the UNet's."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.config = getattr(inner, "config", None)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        *rest: torch.Tensor,
    ) -> torch.Tensor:
        *inner, concat_conds = rest
        wide = torch.cat([sample, concat_conds.to(sample)], dim=1)
        return self.inner(wide, timestep, encoder_hidden_states, *inner)


def with_concat_conds(spec: NetworkSpec) -> NetworkSpec:
    """`spec` (a UNet wrapper's) plus concat_conds as its last input: the spec of ConcatConds(wrapper)."""
    return dataclasses.replace(spec, name=f"ic_light_{spec.name}", inputs=(*spec.inputs, CONCAT_CONDS))


def _load(source: str, revision: str | None, dtype: torch.dtype) -> nn.Module:
    raise ValueError(
        "the IC-Light UNet is built from a base UNet and an IC-Light offset file "
        "(ember.pipeline.ic_light.patch_unet), not loaded from a model directory"
    )


CONCAT_CONDS = TensorSpec(
    "concat_conds", torch.float32, ("batch", "concat_channels", "latent_height", "latent_width")
)


def _dims(config: Mapping[str, Any]) -> dict[str, int]:
    return {**_unet_dims(config), "concat_channels": int(config.get("concat_channels", 4))}


IC_LIGHT_UNET = NetworkSpec(
    name="ic_light_unet",
    subfolder="unet",
    version=1,
    inputs=(*UNET.inputs, CONCAT_CONDS),
    outputs=UNET.outputs,
    load=_load,
    static_dims=_dims,
    image_dims=_image_dims,
    sample=_sample,
)
