"""Test-side converter: a diffusers SD1.5 pipeline directory -> one single-file checkpoint in the original
(CompVis LDM / A1111) layout, as civitai-style checkpoints are published.

It is diffusers' own single-file conversion run backwards: the fixed key tables
(`DIFFUSERS_TO_LDM_MAPPING`) are inverted, and the block renumbering of `convert_ldm_unet_checkpoint` /
`convert_ldm_vae_checkpoint` is undone (UNet: `down_blocks.b.resnets.j` <- `input_blocks.{1 + b(L+1) + j}.0`;
VAE: decoder `up_blocks.i` <- `up.{n-1-i}`, attention 1x1 convs). The tests prove it right by loading the
result back with `from_single_file` and comparing every tensor with the directory's.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX, VAE_PREFIX, TEXT_PREFIX = (
    "model.diffusion_model.",
    "first_stage_model.",
    "cond_stage_model.transformer.",
)
_UNET_RESNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTENTION = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def _rename(rest: str, table: tuple[tuple[str, str], ...]) -> str:
    head, _, tail = rest.partition(".")
    for new, old in table:
        if rest.startswith(new + "."):
            return old + rest[len(new) :]
    return f"{head}.{tail}" if tail else head


def _unet_key(key: str, layers: int, attention_blocks: set[int], fixed: dict[str, str]) -> str:
    if key in fixed:
        return fixed[key]
    per = layers + 1  # LDM input/output blocks per diffusers block
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        b, j = int(m[1]), int(m[2])
        return f"input_blocks.{1 + b * per + j}.0.{_rename(m[3], _UNET_RESNET)}"
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"input_blocks.{1 + int(m[1]) * per + int(m[2])}.1.{m[3]}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{(int(m[1]) + 1) * per}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename(m[2], _UNET_RESNET)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.0.{_rename(m[3], _UNET_RESNET)}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", key):
        return f"output_blocks.{int(m[1]) * per + int(m[2])}.1.{m[3]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        b = int(m[1])
        return f"output_blocks.{b * per + layers}.{2 if b in attention_blocks else 1}.conv.{m[2]}"
    raise KeyError(f"no LDM name for UNet key {key!r}")


def _vae_key(key: str, up_blocks: int, fixed: dict[str, str]) -> str:
    if key in fixed:
        return fixed[key]
    if m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
        return f"{m[1]}.mid.attn_1.{_rename(m[2], _VAE_ATTENTION)}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
        up = up_blocks - 1 - int(m[1])
        return f"decoder.up.{up}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
        return f"decoder.up.{up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    raise KeyError(f"no LDM name for VAE key {key!r}")


def _weights(directory: Path, variant: str | None) -> dict[str, torch.Tensor]:
    (file,) = [
        p
        for p in directory.glob("*.safetensors")
        if (variant is None and len(p.suffixes) == 1) or (variant and p.suffixes[-2:-1] == [f".{variant}"])
    ]
    return load_file(file)


def to_single_file(model_dir: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """Write `model_dir` (a diffusers SD1.5 pipeline) as one LDM-layout .safetensors checkpoint at `out`."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    model_dir = Path(model_dir)
    unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((model_dir / "vae" / "config.json").read_text())
    layers = int(unet_config["layers_per_block"])
    attention_blocks = {i for i, t in enumerate(unet_config["up_block_types"]) if "CrossAttn" in t}
    unet_fixed = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    vae_fixed = DIFFUSERS_TO_LDM_MAPPING["vae"]
    checkpoint: dict[str, torch.Tensor] = {}
    for key, value in _weights(model_dir / "unet", None).items():
        checkpoint[UNET_PREFIX + _unet_key(key, layers, attention_blocks, unet_fixed)] = value
    for key, value in _weights(model_dir / "vae", None).items():
        if ".mid_block.attentions.0." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention projections are 1x1 convolutions
        checkpoint[VAE_PREFIX + _vae_key(key, len(vae_config["up_block_types"]), vae_fixed)] = value
    for key, value in _weights(model_dir / "text_encoder", None).items():
        # transformers 5 dropped CLIPTextModel's `text_model.` level; original checkpoints carry it.
        name = key if key.startswith("text_model.") else f"text_model.{key}"
        checkpoint[TEXT_PREFIX + name] = value
    if dtype is not None:
        checkpoint = {k: v.to(dtype) for k, v in checkpoint.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(out))
    return out
