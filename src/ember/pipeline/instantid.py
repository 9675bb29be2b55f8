"""InstantID's IdentityNet on fal-ai/lora: `controlnets[i].ip_adapter_index = k` conditions ControlNet i on
the image-prompt tokens of ip_adapter[k] instead of the prompt embeddings.

InstantID (InstantX/InstantID, SDXL) pairs an IP-Adapter whose projection is IP-Adapter Plus's Resampler fed
the 512-d ArcFace face embedding (ember.pipeline.ip_adapter: such an adapter with insight_face_model_path
runs on the face, image embeds (rows, n, 1, 512), zeros for the unconditional rows) with "IdentityNet", an
SDXL ControlNet on face keypoints whose cross-attention reads the adapter's projected face tokens
(B, 16, 2048): InstantID's pipeline projects cat([zeros, embedding]) once and passes the result as the
ControlNet's encoder_hidden_states for the whole CFG batch (guess mode: its conditional half), while the
UNet still reads the prompt (and the same tokens through its IP attention layers).

Here the tokens are computed once per request, after the IP-Adapter stage has put the request's image
embeds in the slot's unet_feeds: the IP UNet's own encoder_hid_proj.image_projection_layers[k] (the module
the UNet applies, so both see the same tokens) on image_embeds_k (rows, n, ...), as diffusers'
MultiIPAdapterImageProjection runs it (rows * n through the layer), the n images' tokens side by side:
(rows, n * T, D). With one face image (InstantID's use) that is InstantID's (rows, 16, 2048) exactly; with
several, InstantID's own pipeline would run its Resampler over all faces at once instead (16 tokens). The
ControlNet units then carry those rows (ember.pipeline.controlnet.ControlNetUnit.tokens).

Refused by name (controlnets[i].ip_adapter_index): an index without ip_adapter or past its end, and a
ControlNet whose cross-attention width is not the tokens' width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ember.pipeline.guided_denoise import GuidedSlot
from ember.pipeline.ip_adapter import IPAdapterRequest, IPAdapterStage
from ember.runtime import Runner

if TYPE_CHECKING:
    from ember.pipeline.lora_controlnets import ControlNets


@torch.inference_mode()
def project_tokens(layer: torch.nn.Module, embeds: torch.Tensor) -> torch.Tensor:
    """One adapter's image embeds (rows, n, ...) -> its projected tokens (rows, n * T, D), through the IP
    UNet's projection layer as MultiIPAdapterImageProjection calls it (one image per row of the layer)."""
    rows, n = embeds.shape[:2]
    parameter = next(layer.parameters())
    out = layer(embeds.reshape(rows * n, *embeds.shape[2:]).to(parameter.device, parameter.dtype))
    return out.reshape(rows, n * out.shape[-2], out.shape[-1])  # (rows * n, T, D) -> (rows, n * T, D)


def _projection(stage: IPAdapterStage, base: Runner, request: IPAdapterRequest, k: int) -> torch.nn.Module:
    """ip_adapter[k]'s image projection inside the request's IP UNet (loaded on first use, shared with the
    denoising loop); FaceID Plus's layer gets its clip_embeds / shortcut set by the caller."""
    ip_unet = stage.unet(base, request, controlled=False).module.unet
    return ip_unet.encoder_hid_proj.image_projection_layers[k]


def attach(
    stage: IPAdapterStage,
    controlnets: ControlNets,
    base: Runner,
    slots: Sequence[GuidedSlot],
    requests: Mapping[int, Any],
) -> dict[int, str]:
    """Give each ControlNet unit with an ip_adapter_index its adapter's projected token rows; run after the
    ControlNet and IP-Adapter attach stages (units and image embeds in place). Returns the errors of the
    requests that cannot run, by slot index, naming controlnets[i].ip_adapter_index."""
    errors: dict[int, str] = {}
    for slot in slots:
        r = requests[slot.index]
        wanted = [(i, c) for i, c in enumerate(r.controlnets) if c.ip_adapter_index is not None]
        if not wanted:
            continue
        units = list(slot.controls)  # one per controlnets[i], in order (ControlNets.attach)
        projected: dict[int, torch.Tensor] = {}
        for i, c in wanted:
            at, k = f"controlnets[{i}].ip_adapter_index", c.ip_adapter_index
            ip = r.ip_adapter
            if ip is None:
                errors[slot.index] = (
                    f"{at}: {k} names ip_adapter[{k}], but the request has no ip_adapter; InstantID's "
                    "ControlNet reads the face tokens of its IP-Adapter: send that adapter in ip_adapter"
                )
                break
            if not 0 <= k < len(ip.units):
                errors[slot.index] = (
                    f"{at}: {k} is past the end of ip_adapter ({len(ip.units)} adapter(s): indices 0 to "
                    f"{len(ip.units) - 1})"
                )
                break
            if k not in projected:
                try:
                    layer = _projection(stage, base, ip, k)
                    if ip.units[k].weights.face == "faceid_plus":  # as IPAdapterUNet sets it per call
                        layer.clip_embeds = slot.unet_feeds[f"clip_embeds_{k}"]
                        layer.shortcut = ip.units[k].shortcut
                    projected[k] = project_tokens(layer, slot.unet_feeds[f"image_embeds_{k}"])
                except ValueError as exc:
                    errors[slot.index] = f"{at}: ip_adapter: {exc}"
                    break
            tokens = projected[k]  # (rows, T, D): rows as the slot's prompt rows
            width = controlnets.config_of(c.ref)[0].get("cross_attention_dim")
            if isinstance(width, list | tuple):  # per-block widths: all must take the tokens
                width = width[0] if len(set(width)) == 1 else width
            if width != tokens.shape[-1]:
                errors[slot.index] = (
                    f"{at}: ip_adapter[{k}]'s image tokens are {tokens.shape[-1]} wide, but the ControlNet "
                    f"{c.ref.source} cross-attends over width {width}: use the ControlNet trained with that "
                    "adapter (InstantID: its IdentityNet with its ip-adapter)"
                )
                break
            units[i] = dataclasses.replace(units[i], tokens=tokens.to(units[i].image.device))
        else:
            slot.controls = tuple(units)
    return errors
