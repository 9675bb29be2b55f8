"""Which Stable Diffusion family a single-file checkpoint (original CompVis / A1111 layout) holds, from its
tensor names alone: the gateway reads them from the safetensors header it checked, the pipeline from the
cached file. No torch here (the gateway imports it).

SD1.x: CLIP ViT-L under `cond_stage_model.transformer.`; SD 2.x: OpenCLIP under `cond_stage_model.model.`;
SDXL: two text encoders under `conditioner.embedders.{0,1}.` and a UNet with the size/crop ("text_time")
embedding `label_emb` (the refiner: that UNet with one OpenCLIP encoder at `conditioner.embedders.0.model.`).
Names as diffusers' single_file_utils reads them (CHECKPOINT_KEY_NAMES).
"""

from __future__ import annotations

from collections.abc import Iterable

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_TEXT = "cond_stage_model.transformer."
SD2_TEXT = "cond_stage_model.model."
SDXL_TEXT = "conditioner.embedders.1."
SDXL_TEXT_0 = "conditioner.embedders.0.transformer."  # CLIP ViT-L, transformers names under it
SDXL_OPEN_CLIP = "conditioner.embedders.1.model."  # OpenCLIP ViT-bigG, open_clip names under it
SDXL_LABEL_EMB = f"{UNET}label_emb.0.0.weight"
SERVED = ("sd15", "sdxl")


def checkpoint_family(names: Iterable[str]) -> str:
    """The family ("sd15", "sdxl", "sdxl_refiner" or "sd2"); ValueError for a file that is no Stable
    Diffusion checkpoint."""
    keys = set(names)
    if any(k.startswith(SDXL_TEXT) for k in keys):
        return "sdxl"
    if SDXL_LABEL_EMB in keys:  # the refiner: "text_time" UNet, one OpenCLIP encoder at embedders.0.model.
        return "sdxl_refiner" if any(k.startswith("conditioner.embedders.0.model.") for k in keys) else "sdxl"
    if any(k.startswith(SD2_TEXT) for k in keys):
        return "sd2"
    if any(k.startswith(UNET) for k in keys) and any(k.startswith(SD1_TEXT) for k in keys):
        return "sd15"
    raise ValueError(
        "this is not a Stable Diffusion single-file checkpoint (no model.diffusion_model.* UNet and "
        "cond_stage_model.* / conditioner.embedders.* text encoder tensors); send a full SD1.5 or SDXL "
        ".safetensors checkpoint"
    )


def refusal(family: str, what: str) -> str | None:
    """Why `family` cannot be served yet (None when it can); `what` names the weights in the message."""
    if family == "sdxl_refiner":
        return f"{what} is an SDXL refiner; fal-ai/lora serves SDXL base models (two text encoders)"
    if family == "sd2":
        return f"{what} is a Stable Diffusion 2.x model; fal-ai/lora serves SD1.5 and SDXL base models"
    return None


LDM_UNET_PREFIXES = (UNET, "diffusion_model.")  # full-checkpoint and UNet-only LDM files (ComfyUI/Forge)


def unet_file_layout(names: Iterable[str]) -> str:
    """How a UNet-only weight file (a single-file UNet for `unet_name`, an IC-Light offset file) names its
    tensors: "diffusers" (UNet2DConditionModel.state_dict() keys, `conv_in.weight`) or "ldm" (original
    names under `model.diffusion_model.` / `diffusion_model.`). ValueError for anything else."""
    keys = set(names)
    if "conv_in.weight" in keys:
        return "diffusers"
    if any(k.startswith(LDM_UNET_PREFIXES) for k in keys):
        return "ldm"
    raise ValueError(
        "this is not a UNet weight file: no diffusers UNet keys (conv_in.weight) and no "
        "model.diffusion_model.* / diffusion_model.* tensors"
    )


def unet_file_family(names: Iterable[str]) -> str:
    """"sdxl" when a UNet-only weight file (either layout) has SDXL's size/crop ("text_time") embedding
    (LDM `label_emb.*`, diffusers `add_embedding.*`), else "sd15": what the base model it replaces must be."""
    xl = ("label_emb.", "add_embedding.")
    return "sdxl" if any(k.split("diffusion_model.")[-1].startswith(xl) for k in names) else "sd15"


CONTROLNET_LDM = "control_model."  # original ControlNet files (lllyasviel's .pth layout) name tensors so


def controlnet_file_family(names: Iterable[str]) -> str:
    """The family ("sd15" or "sdxl") of a single-file ControlNet, from its tensor names: diffusers' own
    names (ControlNetModel.state_dict(), `controlnet_cond_embedding.*`) or the original ones
    (`input_hint_block.*`, `zero_convs.*`, under `control_model.` or bare); SDXL's carries the "text_time"
    embedding (`add_embedding.*` / `label_emb.*`). ValueError for a file that is no ControlNet."""
    keys = set(names)
    diffusers = "controlnet_cond_embedding.conv_in.weight" in keys
    original = any(k.startswith(CONTROLNET_LDM) for k in keys) or "input_hint_block.0.weight" in keys
    if not (diffusers or original):
        raise ValueError(
            "this is not a ControlNet weight file: no controlnet_cond_embedding.* (diffusers) or "
            "input_hint_block.* / control_model.* (original) tensors"
        )
    xl = {"add_embedding.linear_1.weight", "label_emb.0.0.weight", f"{CONTROLNET_LDM}label_emb.0.0.weight"}
    return "sdxl" if keys & xl else "sd15"
