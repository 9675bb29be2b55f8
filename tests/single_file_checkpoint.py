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


XL_TEXT_PREFIX, XL_OPEN_CLIP_PREFIX = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."


def _open_clip_weights(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection weights -> OpenCLIP names (SDXL's second encoder), undoing diffusers'
    convert_open_clip_checkpoint: its fixed `openclip.layers` table inverted (text_projection stored as
    (hidden, projection), the transpose of the Linear weight), the `openclip.transformer` renames undone,
    and q/k/v stacked back into `attn.in_proj_weight` / `in_proj_bias`
    ((3 * hidden, hidden) / (3 * hidden,))."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    fixed = DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"]
    renames = [(new, old) for new, old in DIFFUSERS_TO_LDM_MAPPING["openclip"]["transformer"].items()]
    weights = {
        (k if k.startswith(("text_model.", "text_projection")) else f"text_model.{k}"): v
        for k, v in weights.items()
    }
    out: dict[str, torch.Tensor] = {}
    for key, value in weights.items():
        if key in fixed:
            out[fixed[key]] = value.T.contiguous() if key == "text_projection.weight" else value
            continue
        if not key.startswith("text_model.encoder.layers."):
            raise KeyError(f"no OpenCLIP name for text encoder key {key!r}")
        if m := re.match(r"(.+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", key):
            if m[2] != "q":
                continue
            base = f"{m[1]}.self_attn"
            value = torch.cat([weights[f"{base}.{p}_proj.{m[3]}"] for p in "qkv"])
            key = f"{base}.in_proj_{m[3]}"
        name = key
        for new, old in renames:
            name = name.replace(new, old)
        out["transformer." + name] = value
    return out


def to_single_file_xl(model_dir: Path, out: Path) -> Path:
    """Write `model_dir` (a diffusers SDXL pipeline) as one SGM-layout checkpoint (as
    sd_xl_base_1.0.safetensors): UNet and VAE as for SD1.5 plus the UNet's `label_emb` (add_embedding),
    CLIP ViT-L under conditioner.embedders.0.transformer., OpenCLIP under conditioner.embedders.1.model."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    model_dir = Path(model_dir)
    unet_config = json.loads((model_dir / "unet" / "config.json").read_text())
    vae_config = json.loads((model_dir / "vae" / "config.json").read_text())
    layers = int(unet_config["layers_per_block"])
    attention_blocks = {i for i, t in enumerate(unet_config["up_block_types"]) if "CrossAttn" in t}
    unet_fixed = {
        **DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"],
        **DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"],
    }
    checkpoint: dict[str, torch.Tensor] = {}
    for key, value in _weights(model_dir / "unet", None).items():
        checkpoint[UNET_PREFIX + _unet_key(key, layers, attention_blocks, unet_fixed)] = value
    for key, value in _weights(model_dir / "vae", None).items():
        if ".mid_block.attentions.0." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]
        checkpoint[
            VAE_PREFIX + _vae_key(key, len(vae_config["up_block_types"]), DIFFUSERS_TO_LDM_MAPPING["vae"])
        ] = value
    for key, value in _weights(model_dir / "text_encoder", None).items():
        checkpoint[XL_TEXT_PREFIX + (key if key.startswith("text_model.") else f"text_model.{key}")] = value
    for key, value in _open_clip_weights(_weights(model_dir / "text_encoder_2", None)).items():
        checkpoint[XL_OPEN_CLIP_PREFIX + key] = value
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in checkpoint.items()}, str(out))
    return out
