"""fal-ai/pixart-sigma: PixArt-Σ text-to-image, as diffusers' PixArtSigmaPipeline, built from shared stages.

A list of requests goes in (what Triton's dynamic batcher handed to one execute); compatible ones (same
size, step count and scheduler) run as one network batch, each with its own scheduler, generator, guidance
scale and prompts, so every request gets exactly the image it would get alone and the image diffusers gives
for the same seed.

Choices against diffusers' PixArtSigmaPipeline defaults, all stated here once:
- max_sequence_length=300 (diffusers' default and Σ's training length), attention mask honoured.
- clean_caption is off: diffusers' default (True) needs bs4 + ftfy, which this stack does not carry (and
  diffusers itself falls back to False without them); prompts are tokenized as given.
- use_resolution_binning is off: the image has exactly the requested size (fal returns the size asked
  for), which must be a multiple of 16 (8 px per latent x the DiT's 2 x 2 patches).
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
from ember.pipeline.decode import decode_latents, to_uint8
from ember.pipeline.dit_denoise import GuidedSlot, cfg_denoise, guided_rows
from ember.pipeline.finish import check_safety, collect_results, split_per_request
from ember.pipeline.guidance import uses_cfg
from ember.pipeline.latents import initial_latents
from ember.pipeline.pixart_styles import NO_STYLE, STYLES, apply_style
from ember.pipeline.requests import StepCallback, Text2ImageRequest, Text2ImageResult
from ember.pipeline.safety import SafetyChecker
from ember.pipeline.schedulers import load_scheduler_config, new_scheduler
from ember.pipeline.t5_encode import MAX_SEQUENCE_LENGTH, encode_t5
from ember.runtime import Runner, create_runner
from ember.settings import Settings
from ember.specs.artifacts import Artifacts, family_spec, read_artifacts
from ember.specs.base import MAX_BATCH_IMAGES

FAMILY, VARIANT = "pixart_sigma", "xl-2-1024-ms"

# fal's `scheduler` values -> overrides of the model's own scheduler config (a DPMSolverMultistepScheduler).
# SA-SOLVER as the PixArt-Σ demo builds it: SASolverScheduler.from_config(the model's config,
# algorithm_type="data_prediction", predictor_order=2, corrector_order=2, tau_func=1 on t in [200, 800]),
# where that tau_func is SASolverScheduler's own default.
SCHEDULERS: dict[str, dict[str, Any]] = {
    "DPM-SOLVER": {},
    "SA-SOLVER": {
        "_class_name": "SASolverScheduler",
        "algorithm_type": "data_prediction",
        "predictor_order": 2,
        "corrector_order": 2,
    },
}

# What the model accepts (the gateway applies fal's narrower ranges first: steps 5-50, guidance 1-10).
MIN_SIDE, MAX_SIDE, SIDE_MULTIPLE = 64, 2048, 16
MAX_STEPS = 100
MAX_IMAGES = 8
MAX_GUIDANCE = 20.0


@dataclass(frozen=True)
class PixArtRequest(Text2ImageRequest):
    """A text-to-image request with fal-ai/pixart-sigma's own defaults and fields."""

    num_inference_steps: int = 35
    guidance_scale: float = 4.5
    width: int = 1024
    height: int = 1024
    style: str = NO_STYLE
    scheduler: str = "DPM-SOLVER"
    enable_safety_checker: bool = False


def pixart_batch_key(request: Text2ImageRequest) -> Hashable:
    """Same size and step count (batch_key), and the same scheduler class so the step counts line up."""
    return (*batch_key(request), getattr(request, "scheduler", None))


def check_request(request: PixArtRequest) -> list[str]:
    """Problems with a request, as messages naming the field; empty when it can run."""
    problems = []
    for name, side in (("width", request.width), ("height", request.height)):
        if not (MIN_SIDE <= side <= MAX_SIDE) or side % SIDE_MULTIPLE:
            problems.append(
                f"{name} must be a multiple of {SIDE_MULTIPLE} from {MIN_SIDE} to {MAX_SIDE}, not {side}"
            )
    if not 1 <= request.num_inference_steps <= MAX_STEPS:
        problems.append(
            f"num_inference_steps must be from 1 to {MAX_STEPS}, not {request.num_inference_steps}"
        )
    if not 1 <= request.num_images <= MAX_IMAGES:
        problems.append(f"num_images must be from 1 to {MAX_IMAGES}, not {request.num_images}")
    if not (math.isfinite(request.guidance_scale) and 0.0 <= request.guidance_scale <= MAX_GUIDANCE):
        problems.append(f"guidance_scale must be from 0 to {MAX_GUIDANCE}, not {request.guidance_scale}")
    if request.style not in STYLES:
        problems.append(f"style must be one of {list(STYLES)}, not {request.style!r}")
    if request.scheduler not in SCHEDULERS:
        problems.append(f"scheduler must be one of {list(SCHEDULERS)}, not {request.scheduler!r}")
    if not -(2**63) <= request.seed < 2**63:
        problems.append("seed must fit in 64 bits")
    return problems


class PixArtSigmaPipeline:
    """Runs PixArt-Σ's three networks through whatever runtime built their runners."""

    def __init__(
        self,
        text_encoder: Runner,
        transformer: Runner,
        vae_decoder: Runner,
        tokenizer: PreTrainedTokenizerBase,
        scheduler_config: dict[str, Any],
        transformer_config: dict[str, Any],
        vae_config: dict[str, Any],
        safety_checker: SafetyChecker | None = None,
    ):
        self.text_encoder, self.transformer, self.vae_decoder = text_encoder, transformer, vae_decoder
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.latent_channels = int(transformer_config["in_channels"])
        self.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        self.vae_scaling_factor = float(vae_config["scaling_factor"])
        self.safety_checker = safety_checker

    @classmethod
    def from_artifacts(
        cls, settings: Settings, artifacts: Artifacts, safety_checker: SafetyChecker | None = None
    ) -> PixArtSigmaPipeline:
        """Runners for settings.runtime over an artifact directory built by ember.specs.ensure_artifacts."""
        key = artifacts.manifest["key"]
        text_spec, transformer_spec, vae_spec = family_spec(key["family"], key["variant"]).load_networks()
        return cls(
            text_encoder=create_runner(settings, artifacts, text_spec),
            transformer=create_runner(settings, artifacts, transformer_spec),
            vae_decoder=create_runner(settings, artifacts, vae_spec),
            tokenizer=AutoTokenizer.from_pretrained(artifacts.tokenizer_dir),
            scheduler_config=load_scheduler_config(artifacts.scheduler_dir),
            transformer_config=artifacts.config("transformer"),
            vae_config=artifacts.config("vae"),
            safety_checker=safety_checker,
        )

    def scheduler_config_for(self, name: str) -> dict[str, Any]:
        return {**self.scheduler_config, **SCHEDULERS[name]}

    def __call__(
        self, requests: Sequence[PixArtRequest], on_step: StepCallback | None = None
    ) -> list[Text2ImageResult]:
        # 1. Check inputs (callers answering untrusted input run check_request themselves first)
        for i, request in enumerate(requests):
            problems = check_request(request)
            if problems:
                raise ValueError(f"request {i}: " + "; ".join(problems))
            if request.enable_safety_checker and self.safety_checker is None:
                raise ValueError(f"request {i}: enable_safety_checker, but no safety checker is loaded")
        on_step = on_step or (lambda index, step, total: None)

        # 2. Group the requests that can share one network batch (guidance doubles the rows: the cap
        #    counts images, so half the engine's batch), and run each group
        results: dict[int, Text2ImageResult] = {}
        for group in group_compatible(requests, MAX_BATCH_IMAGES // 2, key=pixart_batch_key):
            results.update(self._run_batch({i: requests[i] for i in group}, on_step))
        return [results[i] for i in range(len(requests))]

    @torch.inference_mode()
    def _run_batch(
        self, batch: dict[int, PixArtRequest], on_step: StepCallback
    ) -> dict[int, Text2ImageResult]:
        """One group of compatible requests, keyed by request index."""
        start = time.perf_counter()
        first = next(iter(batch.values()))
        latent_h, latent_w = first.height // self.vae_scale_factor, first.width // self.vae_scale_factor
        device = self.transformer.device

        # 3. Styles, then each distinct text encoded once: (P, 300, D) and its (P, 300) mask. The negative
        #    prompt is encoded only for requests that guide (diffusers: guidance_scale > 1).
        styled = {i: apply_style(r.style, r.prompt, r.negative_prompt) for i, r in batch.items()}
        guided = {i: uses_cfg(r.guidance_scale) for i, r in batch.items()}
        texts = list(
            dict.fromkeys(t for i, (p, n) in styled.items() for t in ((p, n) if guided[i] else (p,)))
        )
        embeddings, mask = encode_t5(self.text_encoder, self.tokenizer, texts, MAX_SEQUENCE_LENGTH)
        embeddings, mask = embeddings.to(device), mask.to(device)
        row = {text: (embeddings[j : j + 1], mask[j : j + 1]) for j, text in enumerate(texts)}
        encoded = time.perf_counter()

        # 4-6. Per request: its own scheduler and generator, initial noise (k, C, h, w) and its conditioning
        #      rows ([negative x k, prompt x k] under guidance)
        slots = []
        for index, request in batch.items():
            scheduler = new_scheduler(
                self.scheduler_config_for(request.scheduler), request.num_inference_steps
            )
            generator = torch.Generator("cpu").manual_seed(request.seed)
            k = request.num_images
            noise = initial_latents(
                generator, k, self.latent_channels, latent_h, latent_w, scheduler.init_noise_sigma
            )
            prompt, negative = styled[index]
            rows, rows_mask = guided_rows(row[prompt], row[negative] if guided[index] else None, k)
            slots.append(
                GuidedSlot(
                    index=index,
                    scheduler=scheduler,
                    generator=generator,
                    latents=noise.to(device),
                    embeddings=rows,
                    mask=rows_mask,
                    guidance_scale=request.guidance_scale,
                    is_cancelled=request.is_cancelled,
                )
            )

        # 7. Denoising loop: one transformer batch per step for every request still running
        cfg_denoise(self.transformer, slots, on_step)
        denoised_at = time.perf_counter()

        # 8. Decode the finished requests in one VAE batch, then uint8 (k, H, W, 3) per request
        done = [s for s in slots if not s.cancelled]
        pixels: dict[int, torch.Tensor] = {}
        if done:
            images = decode_latents(
                self.vae_decoder, torch.cat([s.latents for s in done]), self.vae_scaling_factor
            )
            pixels = split_per_request(done, to_uint8(images))
        decoded = time.perf_counter()

        # 9. The safety checker on the requests that asked for it (flagged images come back black)
        nsfw = check_safety(pixels, lambda i: batch[i].enable_safety_checker, self.safety_checker)
        checked = time.perf_counter()

        # 10. Results, each with the stage timings of the batch it ran in
        timings = {
            "encode": encoded - start,
            "denoise": denoised_at - encoded,
            "decode": decoded - denoised_at,
            "safety": checked - decoded,
            "total": checked - start,
        }
        return collect_results(batch, pixels, nsfw, timings)


def load_pixart_sigma_pipeline(settings: Settings, safety_checker: bool = True) -> PixArtSigmaPipeline:
    """The fal-ai/pixart-sigma pipeline (and the shared safety checker), building demo weights and exports
    first if they are missing."""
    from ember.pipeline.safety import load_safety_checker
    from ember.specs.artifacts import ensure_artifacts

    path = ensure_artifacts(settings, family=FAMILY, variant=VARIANT, progress=False)
    checker = load_safety_checker(settings) if safety_checker else None
    return PixArtSigmaPipeline.from_artifacts(settings, read_artifacts(path), checker)
