"""fal-ai/lcm model="sdxl": SDXL with the LCM-distilled UNet (latent-consistency/lcm-sdxl), each mode as the
diffusers pipeline that defines it, with LCMScheduler and the LCM UNet:

    text-to-image   StableDiffusionXLPipeline
    image-to-image  StableDiffusionXLImg2ImgPipeline (timesteps cut by strength, get_timesteps; not the
                    SD1.5 LCM img2img's strength-spaced schedule)
    inpainting      StableDiffusionXLInpaintPipeline (4-channel UNet: known region re-imposed every step)

The XL pipelines see time_cond_proj_dim on the UNet, so they pass the guidance embedding as timestep_cond
and skip classifier-free guidance: negative_prompt is unused, as in the SD1.5 LCM pipeline.

Everything else is LcmPipeline's: the batching, the shared denoising loop, image encoding, decoding, fal's
options (inpaint_mask_only, safety checks). This class only supplies the SDXL hooks: both text encoders
and the pooled embedding (ember.pipeline.sdxl), the time ids of the output size, and the strength rule.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from transformers import AutoTokenizer

from ember.pipeline.lcm import LcmPipeline
from ember.pipeline.lcm_lora import LcmLoras
from ember.pipeline.requests import Text2ImageRequest
from ember.pipeline.safety import SafetyChecker
from ember.pipeline.schedulers import load_scheduler_config, strength_timesteps
from ember.pipeline.sdxl import XLTextEncoders, add_time_ids, check_added_conditions, penultimate_inert
from ember.runtime import Runner, create_runner
from ember.settings import Settings
from ember.specs.artifacts import Artifacts, family_spec


def xl_steps_walked(request: Text2ImageRequest) -> int:
    """Denoising steps an XL request runs: image modes cut the schedule to its last int(n * strength)
    steps (get_timesteps, both img2img and inpainting); text-to-image runs all n."""
    if request.mode == "text":
        return request.num_inference_steps
    return min(int(request.num_inference_steps * request.strength), request.num_inference_steps)


class LcmXLPipeline(LcmPipeline):
    model = "sdxl"

    def __init__(
        self,
        *,
        text_encoder_2: Runner,
        tokenizer_2: Any,
        pooled_dim: int,
        text_encoder_layers: int,
        **components: Any,
    ):
        super().__init__(**components)
        self.encoders = XLTextEncoders(self.text_encoder, self.tokenizer, text_encoder_2, tokenizer_2)
        # lora_url: SDXL LoRAs carry both encoders' weights and the UNet's (ember.pipeline.lcm_lora)
        self.loras = LcmLoras(
            self.text_encoder,
            self.unet,
            self.model,
            text_encoder_2=text_encoder_2,
            inert={"text_encoder": penultimate_inert(text_encoder_layers)},
        )
        check_added_conditions(components["unet_config"], pooled_dim)
        self._time_ids: dict[tuple[int, int], torch.Tensor] = {}  # (height, width) -> (1, 6)

    @classmethod
    def from_artifacts(
        cls, settings: Settings, artifacts: Artifacts, safety_checker: SafetyChecker | None = None
    ) -> LcmXLPipeline:
        key = artifacts.manifest["key"]
        specs = {s.name: s for s in family_spec(key["family"], key["variant"]).load_networks()}
        # refittable: lora_url fuses LoRAs into the two text encoders and the UNet (ember.pipeline.lcm_lora)
        refit = {"text_encoder", "text_encoder_2", "unet"}
        runners = {
            name: create_runner(settings, artifacts, spec, refittable=name in refit) for name, spec in specs.items()
        }
        return cls(
            **runners,
            tokenizer=AutoTokenizer.from_pretrained(artifacts.tokenizer_dir),
            tokenizer_2=AutoTokenizer.from_pretrained(artifacts.path / "tokenizer_2"),
            pooled_dim=int(artifacts.config("text_encoder_2")["projection_dim"]),
            text_encoder_layers=int(artifacts.config("text_encoder")["num_hidden_layers"]),
            scheduler_config=load_scheduler_config(artifacts.scheduler_dir),
            unet_config=artifacts.config("unet"),
            vae_config=artifacts.config("vae"),
            safety_checker=safety_checker,
        )

    def strength_problems(self, request: Text2ImageRequest) -> list[str]:
        if request.mode != "text" and xl_steps_walked(request) < 1:
            steps = f"strength {request.strength} x num_inference_steps {request.num_inference_steps}"
            return [f"{steps} leaves no denoising step: raise strength or the steps"]
        return []

    def batch_key(self, request: Text2ImageRequest) -> Hashable:
        # The SD1.5 key (model, mode, size, options such as the LoRA set) plus the steps XL walks
        return (*super().batch_key(request), xl_steps_walked(request))

    def schedule(self, request: Text2ImageRequest) -> tuple[Any, torch.Tensor]:
        scheduler = self.new_scheduler(request.num_inference_steps)
        if request.mode == "text":
            return scheduler, scheduler.timesteps
        return scheduler, strength_timesteps(scheduler, request.num_inference_steps, request.strength)

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds = self.encoders.encode(prompts)
        return {"text_embeddings": embeds.embeddings, "text_embeds": embeds.pooled}  # (P, 77, D), (P, P2)

    def image_conditions(self, request: Text2ImageRequest, k: int) -> dict[str, torch.Tensor]:
        """time_ids (k, 6): original and target size = the output size, no crop, as the XL pipelines
        default them (the base's img2img / inpainting configs need no aesthetic score)."""
        assert request.width is not None and request.height is not None  # resolve_size ran
        size = (request.height, request.width)
        ids = self._time_ids.get(size)
        if ids is None:
            ids = self._time_ids.setdefault(size, add_time_ids(size, size).to(self.unet.device))
        return {"time_ids": ids.expand(k, -1)}
