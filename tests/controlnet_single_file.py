"""Test-side writer of single-file ControlNets: a diffusers ControlNet directory -> one .safetensors file,
in diffusers' own key names (as HF repos publish `diffusion_pytorch_model.safetensors`, fetched by URL with
its config.json as config_url) or in the original layout (lllyasviel's ControlNet: `control_model.` +
the LDM UNet encoder names, `input_hint_block.*`, `zero_convs.*`, `middle_block_out.*`, SDXL's `label_emb.*`).

The original names are diffusers' conversion run backwards: its fixed tables (DIFFUSERS_TO_LDM_MAPPING
["controlnet"]) inverted, the encoder blocks renumbered as tests/single_file_checkpoint.py does for UNets.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.single_file_checkpoint import _unet_key

PREFIX = "control_model."


def _controlnet_key(key: str, layers: int, fixed: dict[str, str]) -> str:
    if m := re.match(r"controlnet_down_blocks\.(\d+)\.(weight|bias)", key):
        return f"zero_convs.{m[1]}.0.{m[2]}"
    if m := re.match(r"controlnet_mid_block\.(weight|bias)", key):
        return f"middle_block_out.0.{m[1]}"
    if m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(weight|bias)", key):
        return f"input_hint_block.{2 * (int(m[1]) + 1)}.{m[2]}"  # convs between SiLUs: 2, 4, ..., 12
    return _unet_key(key, layers, set(), fixed)


def controlnet_to_single_file(directory: Path, out: Path, original: bool) -> Path:
    """Write the ControlNet in `directory` (config.json + diffusion_pytorch_model.safetensors) to `out`."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    tensors = load_file(str(Path(directory) / "diffusion_pytorch_model.safetensors"))
    if original:
        config = json.loads((Path(directory) / "config.json").read_text())
        tables = DIFFUSERS_TO_LDM_MAPPING["controlnet"]
        fixed = {**tables["layers"], **tables["addition_embed_type"]}
        layers = int(config["layers_per_block"])
        tensors = {PREFIX + _controlnet_key(k, layers, fixed): v for k, v in tensors.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out))
    return out


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
