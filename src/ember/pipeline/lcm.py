"""fal-ai/lcm text-to-image: SD1.5 with a latent-consistency UNet, as diffusers' LatentConsistencyModelPipeline.

A list of requests goes in (what Triton's dynamic batcher handed to one execute); compatible ones run as
one network batch, each with its own scheduler and generator, so every request gets exactly the image it
would get alone and the image diffusers gives for the same seed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ember.pipeline.batching import group_compatible
from ember.pipeline.decode import decode_latents, to_uint8
from ember.pipeline.denoise import DenoiseSlot, lcm_denoise
from ember.pipeline.encode import encode_prompts
from ember.pipeline.latents import guidance_embedding, initial_latents
from ember.pipeline.requests import (
    NEGATIVE_PROMPT_IGNORED,
    StepCallback,
    Text2ImageRequest,
    Text2ImageResult,
)
from ember.pipeline.schedulers import load_scheduler_config, new_scheduler
from ember.runtime import Runner, create_runner
from ember.settings import Settings
from ember.specs.artifacts import Artifacts, family_spec, read_artifacts
from ember.specs.base import MAX_BATCH_IMAGES

# What the model accepts (the gateway applies fal's narrower ranges first: steps <= 12, guidance <= 8).
MIN_SIDE, MAX_SIDE = 64, 1024  # pixels, multiples of 8; 1024 is the largest fal preset and engine profile
MAX_STEPS = 50  # LCMScheduler allows at most original_inference_steps (50 for LCM_Dreamshaper_v7)
MAX_IMAGES = 8
MAX_GUIDANCE = 20.0


def check_request(request: Text2ImageRequest) -> list[str]:
    """Problems with a request, as messages naming the field; empty when it can run."""
    problems = []
    for name, side in (("width", request.width), ("height", request.height)):
        if not (MIN_SIDE <= side <= MAX_SIDE) or side % 8:
            problems.append(f"{name} must be a multiple of 8 from {MIN_SIDE} to {MAX_SIDE}, not {side}")
    if not 1 <= request.num_inference_steps <= MAX_STEPS:
        problems.append(
            f"num_inference_steps must be from 1 to {MAX_STEPS}, not {request.num_inference_steps}"
        )
    if not 1 <= request.num_images <= MAX_IMAGES:
        problems.append(f"num_images must be from 1 to {MAX_IMAGES}, not {request.num_images}")
    if not (math.isfinite(request.guidance_scale) and 0.0 <= request.guidance_scale <= MAX_GUIDANCE):
        problems.append(f"guidance_scale must be from 0 to {MAX_GUIDANCE}, not {request.guidance_scale}")
    if not -(2**63) <= request.seed < 2**63:
        problems.append("seed must fit in 64 bits")
    return problems


class LcmText2ImagePipeline:
    """Runs the three networks of an LCM SD1.5 model through whatever runtime built their runners."""

    def __init__(
        self,
        text_encoder: Runner,
        unet: Runner,
        vae_decoder: Runner,
        tokenizer: PreTrainedTokenizerBase,
        scheduler_config: dict[str, Any],
        unet_config: dict[str, Any],
        vae_config: dict[str, Any],
    ):
        self.text_encoder, self.unet, self.vae_decoder = text_encoder, unet, vae_decoder
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.latent_channels = int(unet_config["in_channels"])
        self.time_cond_dim = int(unet_config["time_cond_proj_dim"])
        self.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        self.vae_scaling_factor = float(vae_config["scaling_factor"])

    @classmethod
    def from_artifacts(cls, settings: Settings, artifacts: Artifacts) -> LcmText2ImagePipeline:
        """Runners for settings.runtime over an artifact directory built by ember.specs.ensure_artifacts."""
        key = artifacts.manifest["key"]
        text_spec, unet_spec, vae_spec = family_spec(key["family"], key["variant"]).load_networks()
        return cls(
            text_encoder=create_runner(settings, artifacts, text_spec),
            unet=create_runner(settings, artifacts, unet_spec),
            vae_decoder=create_runner(settings, artifacts, vae_spec),
            tokenizer=AutoTokenizer.from_pretrained(artifacts.tokenizer_dir),
            scheduler_config=load_scheduler_config(artifacts.scheduler_dir),
            unet_config=artifacts.config("unet"),
            vae_config=artifacts.config("vae"),
        )

    def __call__(
        self, requests: Sequence[Text2ImageRequest], on_step: StepCallback | None = None
    ) -> list[Text2ImageResult]:
        # 1. Check inputs (callers answering untrusted input run check_request themselves first)
        for i, request in enumerate(requests):
            problems = check_request(request)
            if problems:
                raise ValueError(f"request {i}: " + "; ".join(problems))
        on_step = on_step or (lambda index, step, total: None)

        # 2. Group the requests that can share one network batch, and run each group
        results: dict[int, Text2ImageResult] = {}
        for group in group_compatible(requests, MAX_BATCH_IMAGES):
            results.update(self._run_batch({i: requests[i] for i in group}, on_step))
        return [results[i] for i in range(len(requests))]

    @torch.inference_mode()
    def _run_batch(
        self, batch: dict[int, Text2ImageRequest], on_step: StepCallback
    ) -> dict[int, Text2ImageResult]:
        """One group of compatible requests (same size and step count), keyed by request index."""
        start = time.perf_counter()
        first = next(iter(batch.values()))
        latent_h, latent_w = first.height // self.vae_scale_factor, first.width // self.vae_scale_factor
        device = self.unet.device

        # 3. Encode each distinct prompt once: (P, 77, D). LCM has no unconditional branch, so
        #    negative_prompt is not used (diffusers' LCM pipeline ignores it too; the result notes it).
        prompts = list(dict.fromkeys(r.prompt for r in batch.values()))
        embeddings = encode_prompts(self.text_encoder, self.tokenizer, prompts).to(device)
        row = {prompt: i for i, prompt in enumerate(prompts)}
        encoded = time.perf_counter()

        # 4-6. Per request: its own scheduler and generator, initial noise (k, C, h, w), the text embedding
        #      repeated per image (k, 77, D) and the guidance embedding (k, time_cond_proj_dim)
        slots = []
        for index, request in batch.items():
            scheduler = new_scheduler(self.scheduler_config, request.num_inference_steps)
            generator = torch.Generator("cpu").manual_seed(request.seed)
            k = request.num_images
            noise = initial_latents(
                generator, k, self.latent_channels, latent_h, latent_w, scheduler.init_noise_sigma
            )
            w_embedding = guidance_embedding(request.guidance_scale, k, self.time_cond_dim)
            slots.append(
                DenoiseSlot(
                    index=index,
                    scheduler=scheduler,
                    generator=generator,
                    latents=noise.to(device),
                    text_embeddings=embeddings[row[request.prompt]].expand(k, -1, -1),
                    timestep_cond=w_embedding.to(device),
                    is_cancelled=request.is_cancelled,
                )
            )

        # 7. Denoising loop: one UNet batch per step for every request still running
        lcm_denoise(self.unet, slots, on_step)
        denoised_at = time.perf_counter()

        # 8. Decode the finished requests in one VAE batch, (B, 3, H, W), then uint8 (k, H, W, 3) per request
        done = [s for s in slots if not s.cancelled]
        pixels: dict[int, torch.Tensor] = {}
        if done:
            images = decode_latents(
                self.vae_decoder, torch.cat([s.denoised for s in done]), self.vae_scaling_factor
            )
            per_request = to_uint8(images).split([s.latents.shape[0] for s in done])
            pixels = {s.index: p for s, p in zip(done, per_request, strict=True)}
        decoded = time.perf_counter()

        # 9. Results, each with the stage timings of the batch it ran in
        timings = {
            "encode": encoded - start,
            "denoise": denoised_at - encoded,
            "decode": decoded - denoised_at,
            "total": decoded - start,
        }
        results = {}
        for index, request in batch.items():
            notes = [NEGATIVE_PROMPT_IGNORED] if request.negative_prompt else []
            if index not in pixels:
                results[index] = Text2ImageResult(None, [], dict(timings), cancelled=True, notes=notes)
                continue
            # No safety checker yet (a later issue): every flag is False, as fal reports with checks off.
            nsfw = [False] * request.num_images
            results[index] = Text2ImageResult(pixels[index], nsfw, dict(timings), notes=notes)
        return results


def load_lcm_pipeline(settings: Settings, variant: str = "sdv1-5") -> LcmText2ImagePipeline:
    """The fal-ai/lcm pipeline for `variant`, building demo weights and exports first if they are missing."""
    from ember.specs.artifacts import ensure_artifacts

    path = ensure_artifacts(settings, family="lcm", variant=variant, progress=False)
    return LcmText2ImagePipeline.from_artifacts(settings, read_artifacts(path))
