"""fal-ai/stable-cascade/sote-diffusion: Stable Cascade text-to-image, as diffusers' StableCascadePriorPipeline
followed by StableCascadeDecoderPipeline (what StableCascadeCombinedPipeline runs) with one generator.

A list of requests goes in (what Triton's dynamic batcher handed to one execute); compatible ones (same
size and both step counts) run as one network batch per stage, each with its own schedulers, generator and
guidance scales, so every request gets exactly the image it would get alone and the one diffusers gives.
Progress counts both stages on one bar: total = first_stage_steps + second_stage_steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ember.pipeline.batching import batch_key, group_compatible
from ember.pipeline.cascade_denoise import CascadeSlot, cascade_denoise
from ember.pipeline.decode import unit_to_uint8
from ember.pipeline.encode import encode_prompts_pooled
from ember.pipeline.finish import check_safety, collect_results, split_per_request
from ember.pipeline.latents import initial_latents
from ember.pipeline.requests import StepCallback, Text2ImageRequest, Text2ImageResult
from ember.pipeline.safety import SafetyChecker
from ember.pipeline.schedulers import load_scheduler_config, new_scheduler
from ember.runtime import Runner, create_runner
from ember.settings import Settings
from ember.specs.artifacts import Artifacts, family_spec, read_artifacts
from ember.specs.base import MAX_BATCH_IMAGES
from ember.specs.stable_cascade import SIZE_MULTIPLE, stage_sizes

FAMILY, VARIANT = "sote_diffusion", "wuerstchen3"
# What the model accepts (the gateway applies fal's ranges first: 4-50 and 4-24 steps, 1-4 images).
MIN_SIDE, MAX_SIDE = 256, 2048  # px, multiples of SIZE_MULTIPLE (128): see ember.specs.stable_cascade
MAX_FIRST_STEPS, MAX_SECOND_STEPS = 50, 50
MAX_IMAGES = 4
MAX_GUIDANCE = 20.0


@dataclass(frozen=True)
class CascadeRequest(Text2ImageRequest):
    """fal-ai/stable-cascade/sote-diffusion's fields and defaults. `num_inference_steps` and
    `guidance_scale` are the first stage's (prior, stage C); the second stage (decoder, stage B) has its own."""

    num_inference_steps: int = 25
    guidance_scale: float = 8.0
    second_stage_steps: int = 10
    second_stage_guidance_scale: float = 2.0
    width: int = 1024
    height: int = 1536
    enable_safety_checker: bool = True


def cascade_batch_key(request: Text2ImageRequest) -> Hashable:
    """Same size and first-stage steps (batch_key), and the same second-stage steps: both loops in lock-step.
    Guidance scales are per request, so they are not part of the key."""
    return (*batch_key(request), getattr(request, "second_stage_steps", None))


def check_request(request: CascadeRequest) -> list[str]:
    """Problems with a request, as messages naming the field; empty when it can run."""
    problems = []
    for name, side in (("width", request.width), ("height", request.height)):
        if not (MIN_SIDE <= side <= MAX_SIDE) or side % SIZE_MULTIPLE:
            problems.append(
                f"{name} must be a multiple of {SIZE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}, not {side} "
                "(Stable Cascade's stages scale the size by 3/128 and 32/128)"
            )
    for name, steps, most in (
        ("first_stage_steps", request.num_inference_steps, MAX_FIRST_STEPS),
        ("second_stage_steps", request.second_stage_steps, MAX_SECOND_STEPS),
    ):
        if not 1 <= steps <= most:
            problems.append(f"{name} must be from 1 to {most}, not {steps}")
    if not 1 <= request.num_images <= MAX_IMAGES:
        problems.append(f"num_images must be from 1 to {MAX_IMAGES}, not {request.num_images}")
    for name, scale in (
        ("guidance_scale", request.guidance_scale),
        ("second_stage_guidance_scale", request.second_stage_guidance_scale),
    ):
        if not (math.isfinite(scale) and 0.0 <= scale <= MAX_GUIDANCE):
            problems.append(f"{name} must be from 0 to {MAX_GUIDANCE}, not {scale}")
    if not -(2**63) <= request.seed < 2**63:
        problems.append("seed must fit in 64 bits")
    return problems


class StableCascadePipeline:
    """Runs the four networks of a Stable Cascade model through whatever runtime built their runners."""

    def __init__(
        self,
        text_encoder: Runner,
        prior: Runner,
        decoder: Runner,
        vqgan_decoder: Runner,
        tokenizer: PreTrainedTokenizerBase,
        scheduler_config: dict[str, Any],
        prior_config: dict[str, Any],
        decoder_config: dict[str, Any],
        vqgan_config: dict[str, Any],
        safety_checker: SafetyChecker | None = None,
    ):
        self.text_encoder, self.prior, self.decoder = text_encoder, prior, decoder
        self.vqgan_decoder = vqgan_decoder
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.prior_channels = int(prior_config["in_channels"])  # 16
        self.decoder_channels = int(decoder_config["in_channels"])  # 4
        self.vqgan_scale = float(vqgan_config["scale_factor"])
        self.safety_checker = safety_checker

    @classmethod
    def from_artifacts(
        cls, settings: Settings, artifacts: Artifacts, safety_checker: SafetyChecker | None = None
    ) -> StableCascadePipeline:
        """Runners for the model's runtime over an artifact directory built by ember.specs.ensure_artifacts."""
        key = artifacts.manifest["key"]
        text_spec, prior_spec, decoder_spec, vqgan_spec = family_spec(
            key["family"], key["variant"]
        ).load_networks()
        return cls(
            text_encoder=create_runner(settings, artifacts, text_spec),
            prior=create_runner(settings, artifacts, prior_spec),
            decoder=create_runner(settings, artifacts, decoder_spec),
            vqgan_decoder=create_runner(settings, artifacts, vqgan_spec),
            tokenizer=AutoTokenizer.from_pretrained(artifacts.tokenizer_dir),
            scheduler_config=load_scheduler_config(artifacts.scheduler_dir),
            prior_config=artifacts.config("prior"),
            decoder_config=artifacts.config("decoder"),
            vqgan_config=artifacts.config("vqgan"),
            safety_checker=safety_checker,
        )

    def __call__(
        self, requests: Sequence[CascadeRequest], on_step: StepCallback | None = None
    ) -> list[Text2ImageResult]:
        # 1. Check inputs (callers answering untrusted input run check_request themselves first)
        for i, request in enumerate(requests):
            problems = check_request(request)
            if problems:
                raise ValueError(f"request {i}: " + "; ".join(problems))
            if request.enable_safety_checker and self.safety_checker is None:
                raise ValueError(f"request {i}: enable_safety_checker, but no safety checker is loaded")
        on_step = on_step or (lambda index, step, total: None)

        # 2. Group the requests that can share one network batch, and run each group
        results: dict[int, Text2ImageResult] = {}
        for group in group_compatible(requests, MAX_BATCH_IMAGES, key=cascade_batch_key):
            results.update(self._run_batch({i: requests[i] for i in group}, on_step))
        return [results[i] for i in range(len(requests))]

    @torch.inference_mode()
    def _run_batch(
        self, batch: dict[int, CascadeRequest], on_step: StepCallback
    ) -> dict[int, Text2ImageResult]:
        """One group of compatible requests, keyed by request index."""
        start = time.perf_counter()
        first = next(iter(batch.values()))
        (hc, wc), (hb, wb) = stage_sizes(first.height, first.width)  # stage C and stage B latent sizes
        total = first.num_inference_steps + first.second_stage_steps
        device = self.prior.device

        # 3. Encode each distinct prompt once, and each negative prompt a guided stage needs:
        #    (P, 77, D) hidden states and (P, 1, P') pooled. diffusers encodes "" when no negative is given.
        def guided(r: CascadeRequest) -> bool:
            return r.guidance_scale > 1 or r.second_stage_guidance_scale > 1

        texts = [r.prompt for r in batch.values()]
        texts += [r.negative_prompt for r in batch.values() if guided(r)]
        texts = list(dict.fromkeys(texts))
        hidden, pooled = encode_prompts_pooled(self.text_encoder, self.tokenizer, texts)
        hidden, pooled = hidden.to(device), pooled.to(device)
        row = {text: i for i, text in enumerate(texts)}
        encoded = time.perf_counter()

        def rows(text: str, k: int) -> dict[str, torch.Tensor]:
            i = row[text]
            return {"clip_text": hidden[i].expand(k, -1, -1), "clip_text_pooled": pooled[i].expand(k, -1, -1)}

        # 4. Stage C (prior): per request its generator (used by both stages, in diffusers' order), its
        #    scheduler, initial noise (k, 16, hc, wc), text conditioning, and the negative's under guidance
        generators = {index: torch.Generator("cpu").manual_seed(r.seed) for index, r in batch.items()}
        prior_slots = []
        for index, request in batch.items():
            k = request.num_images
            scheduler = new_scheduler(self.scheduler_config, request.num_inference_steps)
            noise = initial_latents(
                generators[index], k, self.prior_channels, hc, wc, scheduler.init_noise_sigma
            )
            prior_slots.append(
                CascadeSlot(
                    index=index,
                    scheduler=scheduler,
                    generator=generators[index],
                    latents=noise.to(device),
                    cond=rows(request.prompt, k),
                    uncond=rows(request.negative_prompt, k) if request.guidance_scale > 1 else None,
                    guidance_scale=request.guidance_scale,
                    is_cancelled=request.is_cancelled,
                )
            )
        cascade_denoise(self.prior, prior_slots, on_step, step_offset=0, total=total)
        prior_done = time.perf_counter()

        # 5. Stage B (decoder): conditioned on stage C's result (effnet, (k, 16, hc, wc); zeros for the
        #    unguided half) and the pooled text; initial noise (k, 4, hb, wb) from the same generator
        decoder_slots = []
        for slot in (s for s in prior_slots if not s.cancelled):
            request = batch[slot.index]
            k = request.num_images
            scheduler = new_scheduler(self.scheduler_config, request.second_stage_steps)
            noise = initial_latents(
                generators[slot.index], k, self.decoder_channels, hb, wb, scheduler.init_noise_sigma
            )
            text, negative = rows(request.prompt, k), None
            if request.second_stage_guidance_scale > 1:
                negative = rows(request.negative_prompt, k)
            decoder_slots.append(
                CascadeSlot(
                    index=slot.index,
                    scheduler=scheduler,
                    generator=generators[slot.index],
                    latents=noise.to(device),
                    cond={"clip_text_pooled": text["clip_text_pooled"], "effnet": slot.latents},
                    uncond=None
                    if negative is None
                    else {
                        "clip_text_pooled": negative["clip_text_pooled"],
                        "effnet": torch.zeros_like(slot.latents),
                    },
                    guidance_scale=request.second_stage_guidance_scale,
                    is_cancelled=request.is_cancelled,
                )
            )
        if decoder_slots:
            cascade_denoise(
                self.decoder, decoder_slots, on_step, step_offset=first.num_inference_steps, total=total
            )
        decoder_done = time.perf_counter()

        # 6. Stage A (VQGAN) on the finished requests in one batch: (B, 3, 4hb, 4wb) in [0, 1] -> uint8
        done = [s for s in decoder_slots if not s.cancelled]
        pixels: dict[int, torch.Tensor] = {}
        if done:
            latents = torch.cat([s.latents for s in done]) * self.vqgan_scale
            images = self.vqgan_decoder.run({"latent": latents})["images"]
            pixels = split_per_request(done, unit_to_uint8(images))
        decoded = time.perf_counter()

        # 7. The safety checker on the requests that asked for it (flagged images come back black)
        nsfw = check_safety(pixels, lambda i: batch[i].enable_safety_checker, self.safety_checker)
        checked = time.perf_counter()

        # 8. Results, each with the stage timings of the batch it ran in
        timings = {
            "encode": encoded - start,
            "prior": prior_done - encoded,
            "decoder": decoder_done - prior_done,
            "decode": decoded - decoder_done,
            "safety": checked - decoded,
            "total": checked - start,
        }
        return collect_results(batch, pixels, nsfw, timings)


def load_stable_cascade_pipeline(settings: Settings, safety_checker: bool = True) -> StableCascadePipeline:
    """The fal-ai/stable-cascade/sote-diffusion pipeline (and the shared safety checker), building demo
    weights and exports first if they are missing."""
    from ember.pipeline.safety import load_safety_checker
    from ember.specs.artifacts import ensure_artifacts

    path = ensure_artifacts(settings, family=FAMILY, variant=VARIANT, progress=False)
    checker = load_safety_checker(settings) if safety_checker else None
    return StableCascadePipeline.from_artifacts(settings, read_artifacts(path), safety_checker=checker)
