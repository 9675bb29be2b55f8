"""fal-ai/lora on an SDXL base model, as diffusers' StableDiffusionXLPipeline runs text-to-image: both CLIP
text encoders (clip_skip on each, the second's pooled embedding), classifier-free guidance with the
negative prompt (or zeros where the model sets force_zeros_for_empty_prompt), the "text_time" added
conditions (original size = target size = the output size, crop (0, 0)), fal's schedulers, LoRAs fused
into the UNet and both encoders, and the VAE decoded tiled (in float32 when its config says
force_upcast).

The model plugs into ember.pipeline.lora's batch loop: `XLBaseModel.slot` builds the request's GuidedSlot
(embeddings, pooled text_embeds and time_ids as unet_feeds) and the shared guided_denoise, tiled decode,
safety and debug-latents stages run as for SD1.5. What is not wired for SDXL yet is refused by field.

fal's negative_prompt defaults to "": an empty negative prompt is read as no negative prompt (diffusers'
negative_prompt=None), so an SDXL base with force_zeros_for_empty_prompt (SDXL 1.0: true) conditions the
unconditional branch on zeros, as diffusers does when no negative prompt is given.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from ember.pipeline.debug_latents import recorder
from ember.pipeline.guidance import uses_cfg
from ember.pipeline.guided_denoise import GuidedSlot, step_kwargs
from ember.pipeline.latents import initial_latents
from ember.pipeline.loras import LoraState
from ember.pipeline.schedulers import fal_scheduler_config, new_scheduler_with
from ember.pipeline.sdxl import XLTextEncoders, add_time_ids, check_added_conditions
from ember.runtime import Runner, torch_dtype
from ember.settings import Settings

_NOT_YET = "is not supported yet with SDXL base models (served for SD1.5 bases)"


def is_xl_directory(source: str) -> bool:
    """A diffusers directory describing an SDXL pipeline (a second text encoder, or a "text_time" UNet)."""
    from ember.pipeline.base_models import directory_family

    root = Path(source)
    return root.is_dir() and (root / "model_index.json").is_file() and directory_family(source) == "sdxl"


def is_xl_source(source: str) -> bool:
    """An SDXL diffusers directory, or an SDXL single-file checkpoint (converted by XLBaseModel)."""
    from ember.pipeline.base_models import single_file_family

    return is_xl_directory(source) or single_file_family(source) == "sdxl"


def xl_problems(request: Any) -> list[str]:
    """The fields of a LoraRequest this SDXL path does not serve yet, each named (fal's field names)."""
    problems = []
    for field, used in (
        ("unet_name", bool(request.model.unet)),
        ("controlnets", bool(request.controlnets)),
        ("ip_adapter", request.ip_adapter is not None),
        ("ic_light_model_url", request.ic_light is not None),
        ("embeddings", bool(request.embeddings)),
        ("prompt_weighting", request.prompt_weighting),
    ):
        if used:
            problems.append(f"{field} {_NOT_YET}")
    return problems


class _Skip:
    """One clip_skip's view of a clip-skip encoder runner (ember.specs.lora_xl): the outputs
    XLTextEncoders reads, text_embeddings (B, 77, D) and, from the second encoder, text_embeds (B, P)."""

    def __init__(self, runner: Runner, skip: int):
        self.runner, self.skip = runner, skip

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self.runner.run(feeds)
        picked = {"text_embeddings": out["hidden_states"][:, self.skip]}
        if "text_embeds" in out:
            picked["text_embeds"] = out["text_embeds"]
        return picked


class XLBaseModel:
    """One resident SDXL base model: four runners (torch), two tokenizers, configs and its LoRA state."""

    def __init__(self, settings: Settings, ref: Any, on_log: Callable[[str], None] | None = None):
        import dataclasses

        from ember.pipeline.base_models import LazyWeights, _nothing, convert_single_file, lora_runtime
        from ember.runtime.torch_runner import TorchRunner
        from ember.specs.lora_xl import bind_xl_loaders

        runtime = lora_runtime(settings)
        if runtime != "torch":
            raise ValueError(
                f"{ref.source} is an SDXL base model, which fal-ai/lora serves on the torch runtime only "
                f'(models.toml [lora.sdv1-5] runtime = {runtime!r}; set runtime = "torch")'
            )
        if ref.unet:
            raise ValueError(f"unet_name: a custom UNet {_NOT_YET}")
        if Path(ref.source).is_file():  # an SDXL single-file checkpoint: a cached diffusers directory
            ref = dataclasses.replace(
                ref, source=str(convert_single_file(settings, Path(ref.source), on_log or _nothing))
            )
        self.source = ref.source
        root = Path(ref.source)
        parts = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler")
        missing = [d for d in parts if not (root / d).is_dir()]
        if missing:
            raise ValueError(
                f"{ref.source} describes an SDXL model but lacks {', '.join(f'{d}/' for d in missing)} (an "
                "incomplete diffusers directory: save the whole StableDiffusionXLPipeline)"
            )
        read = lambda *parts: json.loads(root.joinpath(*parts).read_text(encoding="utf-8"))
        index, vae_config, unet_config = (
            read("model_index.json"),
            read("vae", "config.json"),
            read("unet", "config.json"),
        )
        dtype = torch_dtype(settings.dtype)
        # diffusers upcasts a VAE whose config sets force_upcast to float32 when the pipeline runs in fp16
        vae_dtype = torch.float32 if vae_config.get("force_upcast", True) else dtype
        text, text_2, unet, vae = bind_xl_loaders(ref.variant)
        self.text_encoder = TorchRunner(text, ref.source, None, settings.device, dtype)
        self.text_encoder_2 = TorchRunner(text_2, ref.source, None, settings.device, dtype)
        self.unet: Runner = TorchRunner(unet, ref.source, None, settings.device, dtype)
        self.vae_decoder: Runner = TorchRunner(vae, ref.source, None, settings.device, vae_dtype)
        self.tokenizer = AutoTokenizer.from_pretrained(ref.source, subfolder="tokenizer")
        self.tokenizer_2 = AutoTokenizer.from_pretrained(ref.source, subfolder="tokenizer_2")
        self.scheduler_config: dict[str, Any] = read("scheduler", "scheduler_config.json")
        # StableDiffusionXLPipeline registers force_zeros_for_empty_prompt=True unless the model says otherwise
        self.force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        pooled_dim = int(read("text_encoder_2", "config.json")["projection_dim"])
        check_added_conditions(unet_config, pooled_dim)
        self.latent_channels = int(unet_config["in_channels"])
        self.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        self.vae_scaling_factor = float(vae_config["scaling_factor"])
        if vae_config.get("latents_mean") is not None:  # diffusers then de-normalizes per channel too
            raise ValueError(f"model_name {ref.source!r}: a VAE with latents_mean/std {_NOT_YET}")
        self.loras = LoraState(
            {"unet": self.unet, "text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2},
            {
                "unet": LazyWeights(self.unet),
                "text_encoder": LazyWeights(self.text_encoder),
                "text_encoder_2": LazyWeights(self.text_encoder_2),
            },
        )

    def encoders(self, clip_skip: int) -> XLTextEncoders:
        return XLTextEncoders(
            _Skip(self.text_encoder, clip_skip),  # type: ignore[arg-type]
            self.tokenizer,
            _Skip(self.text_encoder_2, clip_skip),  # type: ignore[arg-type]
            self.tokenizer_2,
        )

    def slot(self, index: int, r: Any, h: int, w: int) -> GuidedSlot:
        """One request's conditioning, scheduler, generator and initial noise (k, C, h, w): embeddings
        (2k, 77, D1 + D2) [negative x k; prompt x k] with CFG, else (k, ...); unet_feeds text_embeds
        (rows, P) and time_ids (rows, 6) in the same row order. ValueError names an unserved field."""
        problems = xl_problems(r)
        if problems:
            raise ValueError("; ".join(problems))
        device = self.unet.device
        positive = self.encoders(r.clip_skip).encode([r.prompt])
        embeds, pooled = positive.embeddings, positive.pooled  # (1, 77, D), (1, P)
        if uses_cfg(r.guidance_scale):
            # diffusers' SDXL encode_prompt applies clip_skip to the prompt only: the negative prompt is
            # always read at hidden_states[-2] (skip 0)
            negative = self.encoders(0).encode_negative(
                [r.negative_prompt or None], positive, self.force_zeros
            )
            embeds = torch.cat([negative.embeddings, embeds])
            pooled = torch.cat([negative.pooled, pooled])
        k = r.num_images
        size = (r.height, r.width)
        rows = embeds.shape[0] * k
        config = fal_scheduler_config(
            self.scheduler_config, r.scheduler, r.prediction_type, r.rescale_betas_zero_snr
        )
        scheduler = new_scheduler_with(
            config,
            r.num_inference_steps,
            list(r.timesteps) if r.timesteps else None,
            list(r.sigmas) if r.sigmas else None,
        )
        generator = torch.Generator("cpu").manual_seed(r.seed)
        latents = initial_latents(generator, k, self.latent_channels, h, w, scheduler.init_noise_sigma)
        return GuidedSlot(
            index=index,
            scheduler=scheduler,
            latents=latents.to(device),
            embeddings=embeds.repeat_interleave(k, dim=0).to(device),
            guidance_scale=r.guidance_scale,
            step_kwargs=step_kwargs(scheduler, generator, r.eta),
            is_cancelled=r.is_cancelled,
            passes=recorder(r.debug_per_pass_latents),
            unet_feeds={
                "text_embeds": pooled.repeat_interleave(k, dim=0).to(device),
                "time_ids": add_time_ids(size, size).expand(rows, -1).to(device),
            },
        )
