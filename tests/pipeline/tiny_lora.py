"""Tiny random LoRA files in diffusers' own format, as fal users send them: built with peft on the real
modules of a tiny model and saved with `save_lora_weights` (kohya_ss / diffusers' `pytorch_lora_weights.safetensors`)."""

from __future__ import annotations

from pathlib import Path

import torch


def make_lora(
    source: Path | str, out: Path, seed: int, rank: int = 4, text_encoder: bool = True, strength: float = 4.0
) -> Path:
    """A random rank-`rank` LoRA on the UNet's attention projections (and the text encoder's q/v) of the
    diffusers model at `source`, its up projections scaled by `strength`; returns the .safetensors path
    (`out`/pytorch_lora_weights.safetensors)."""
    from diffusers import LatentConsistencyModelPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = LatentConsistencyModelPipeline.from_pretrained(
        source, safety_checker=None, requires_safety_checker=False
    )
    torch.manual_seed(seed)
    # alpha = rank: diffusers' format stores no alpha (readers assume alpha = r), so the file means this.
    unet_config = LoraConfig(
        r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    pipe.unet.add_adapter(unet_config)
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    if text_encoder:
        pipe.text_encoder.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        layers["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder)
    with torch.no_grad():  # peft's random init moves a tiny model's image by ~3 levels: make it visible
        for state in layers.values():
            for key, value in state.items():
                if "lora_B" in key:
                    value.mul_(strength)
    LatentConsistencyModelPipeline.save_lora_weights(out, safe_serialization=True, **layers)
    return out / "pytorch_lora_weights.safetensors"


def make_xl_lora(source: Path | str, out: Path, seed: int, rank: int = 4, strength: float = 4.0) -> Path:
    """make_lora for an SDXL model: the UNet's attention projections and both text encoders' q/v, saved
    with StableDiffusionXLPipeline.save_lora_weights (unet / text_encoder / text_encoder_2 prefixes, as
    SDXL LoRA files on the hub are once diffusers normalized them)."""
    from diffusers import StableDiffusionXLPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionXLPipeline.from_pretrained(source, add_watermarker=False)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(
        LoraConfig(
            r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
        )
    )
    layers = {"unet_lora_layers": get_peft_model_state_dict(pipe.unet)}
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        module.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        )
        layers[f"{name}_lora_layers"] = get_peft_model_state_dict(module)
    with torch.no_grad():
        for state in layers.values():
            for key, value in state.items():
                if "lora_B" in key:
                    value.mul_(strength)
    StableDiffusionXLPipeline.save_lora_weights(out, safe_serialization=True, **layers)
    return out / "pytorch_lora_weights.safetensors"
