"""fal-ai/lora on an SDXL base model, as diffusers' StableDiffusionXLPipeline runs text-to-image: both CLIP
text encoders (clip_skip on each, the second's pooled embedding), classifier-free guidance with the
negative prompt (or zeros where the model sets force_zeros_for_empty_prompt), the "text_time" added
conditions (original size = target size = the output size, crop (0, 0)), fal's schedulers, LoRAs fused
into the UNet and both encoders, and the VAE decoded tiled (in float32 when its config says
force_upcast).

The model plugs into ember.pipeline.lora's batch loop: `XLBaseModel.slot` builds the request's GuidedSlot
(embeddings, pooled text_embeds and time_ids as unet_feeds) and the shared guided_denoise, tiled decode,
safety and debug-latents stages run as for SD1.5. The networks come from ember.pipeline.base_models on
the lora model's runtime (torch, or onnxruntime: exported on first use, LoRAs by initializer override), a
custom UNet (`unet_name`) included. ControlNets run as for SD1.5 (ember.pipeline.lora_controlnets: SDXL
ControlNets get the UNet's text_embeds / time_ids rows, as StableDiffusionXLControlNetPipeline gives them).
What is not wired for SDXL yet is refused by field.

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
from ember.pipeline.sdxl import XLTextEncoders, add_time_ids, check_added_conditions, penultimate_inert
from ember.pipeline.xl_text_conditioning import XLTextConditioner
from ember.runtime import Runner
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
    """The fields of a LoraRequest this SDXL path cannot serve, each named (fal's field names)."""
    from ember.pipeline.ic_light import SD15_ONLY

    problems = []
    if request.ic_light is not None:  # not a gap: IC-Light files are offsets for the SD1.5 UNet
        problems.append(SD15_ONLY)
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
    """One resident SDXL base model: four runners (torch or onnxruntime), two tokenizers, configs and its
    LoRA state."""

    def __init__(self, settings: Settings, ref: Any, on_log: Callable[[str], None] | None = None):
        from ember.pipeline import base_models
        from ember.specs.lora_xl import bind_xl_loaders

        log = on_log or base_models._nothing
        # SD1.5's path: single files (model_name, unet_name) converted to cached directories, a custom UNet
        # of another family refused naming unet_name; then the runners on the lora model's runtime (torch
        # loads the directory, onnxruntime exports the four networks once into the artifact cache).
        ref = base_models.prepare(settings, ref, log)
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
        index, vae_config = read("model_index.json"), read("vae", "config.json")
        unet_dir = Path(ref.unet or root / "unet")  # unet_name: a UNet directory (prepare checked it fits)
        unet_config = json.loads((unet_dir / "config.json").read_text(encoding="utf-8"))
        if vae_config.get("latents_mean") is not None:  # diffusers then de-normalizes per channel too
            raise ValueError(f"model_name {ref.source!r}: a VAE with latents_mean/std {_NOT_YET}")
        # diffusers upcasts a VAE whose config sets force_upcast to float32 when the pipeline runs in fp16
        networks = bind_xl_loaders(ref.variant, ref.unet, vae_fp32=vae_config.get("force_upcast", True))
        self.text_encoder: Runner
        self.text_encoder_2: Runner
        self.unet: Runner
        self.vae_decoder: Runner
        self.text_encoder, self.text_encoder_2, self.unet, self.vae_decoder = base_models.runners(
            settings, ref, log, networks, base_models.LORA_XL_FAMILY
        )
        self.tokenizer = AutoTokenizer.from_pretrained(ref.source, subfolder="tokenizer")
        self.tokenizer_2 = AutoTokenizer.from_pretrained(ref.source, subfolder="tokenizer_2")
        self.scheduler_config: dict[str, Any] = read("scheduler", "scheduler_config.json")
        # StableDiffusionXLPipeline registers force_zeros_for_empty_prompt=True unless the model says otherwise
        self.force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        # Prompt conditioning: the plain encoders, or for embeddings / prompt_weighting the extended ones
        # (built on first use: over the same weights on torch, an export of their own on onnxruntime, which
        # LoRA refits reach through self.text.text[i])
        self.text = XLTextConditioner(
            self.encoders,
            (self.text_encoder, self.text_encoder_2),
            (self.tokenizer, self.tokenizer_2),
            self.force_zeros,
            settings,
            ref,
        )
        pooled_dim = int(read("text_encoder_2", "config.json")["projection_dim"])
        check_added_conditions(unet_config, pooled_dim)
        self.latent_channels = int(unet_config["in_channels"])
        self.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        self.vae_scaling_factor = float(vae_config["scaling_factor"])
        text_layers = int(read("text_encoder", "config.json")["num_hidden_layers"])
        self.loras = LoraState(
            {"unet": self.unet, "text_encoder": self.text.text[0], "text_encoder_2": self.text.text[1]},
            {
                name: base_models.LazyWeights(runner)
                for name, runner in (
                    ("unet", self.unet),
                    ("text_encoder", self.text_encoder),
                    ("text_encoder_2", self.text_encoder_2),
                )
            },
            # the first encoder is read at hidden_states[-2..-4]: its last layer reaches no output (and the
            # ONNX export prunes it), so a LoRA's deltas there are skipped rather than refused
            inert={"text_encoder": penultimate_inert(text_layers)},
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
        # (R, S, D1 + D2) and (R, P), R = 2 [negative; prompt] with CFG else 1; S = 77, or 77 * windows for
        # long weighted prompts. clip_skip on the prompt only, as diffusers (ember.pipeline.xl_text_conditioning)
        conditioning = self.text.encode(
            r.prompt,
            r.negative_prompt,
            r.clip_skip,
            uses_cfg(r.guidance_scale),
            r.prompt_weighting,
            r.embeddings,
        )
        embeds, pooled = conditioning.embeddings, conditioning.pooled
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
