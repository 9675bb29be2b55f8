"""fal-ai/illusion-diffusion: SD1.5 + the QR-code-monster ControlNet, as diffusers'
StableDiffusionControlNetPipeline runs it (classifier-free guidance, the control image resized to the
output size, ControlNet active within control_guidance_start/end), with fal's two samplers:

    "Euler"             EulerDiscreteScheduler
    "DPM++ Karras SDE"  DPMSolverSDEScheduler(use_karras_sigmas=True), Brownian noise seeded by the seed

`num_inference_steps` = 0 (fal's range starts at 0): no denoising step runs and the image is the VAE's
decoding of the seed's initial noise (unit variance; a zero-step schedule has no sigma to scale it by).
That is what a sampler loop of zero iterations returns, keeps fal's schema valid end to end, and costs
one VAE call; it is documented in the README rather than refused, so clients that send 0 get an image.

A list of requests goes in (one Triton execute); requests of the same size, scheduler and step count run
as one network batch (guidance and ControlNet settings are per sample), each with its own scheduler and
generator, so each gets exactly the image it would get alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ember.pipeline.batching import group_compatible
from ember.pipeline.controlnet import ControlNetUnit, control_image
from ember.pipeline.decode import decode_latents, to_uint8
from ember.pipeline.guidance import encode_with_negative
from ember.pipeline.guided_denoise import Controlled, GuidedSlot, guided_denoise, step_kwargs
from ember.pipeline.latents import initial_latents
from ember.pipeline.requests import StepCallback
from ember.pipeline.schedulers import (
    fal_scheduler_config,
    load_scheduler_config,
    new_scheduler,
    sde_noise_config,
)
from ember.runtime import Runner, create_runner
from ember.settings import Settings
from ember.specs.artifacts import Artifacts, family_spec, read_artifacts
from ember.specs.base import MAX_BATCH_IMAGES

SCHEDULERS = ("DPM++ Karras SDE", "Euler")
MIN_SIDE, MAX_SIDE = 64, 2048  # pixels, multiples of 8
MAX_STEPS = 80  # fal's range is 0..80
MAX_GUIDANCE = 50.0
MAX_INPUT_PIXELS = 4096 * 4096


def _never() -> bool:
    return False


@dataclass(frozen=True)
class IllusionRequest:
    prompt: str
    control_image: np.ndarray = field(compare=False, repr=False)  # (H, W, 3) uint8 RGB, any size
    seed: int = 0
    negative_prompt: str = ""
    guidance_scale: float = 7.5
    controlnet_conditioning_scale: float = 1.0
    control_guidance_start: float = 0.0
    control_guidance_end: float = 1.0
    scheduler: str = "Euler"
    num_inference_steps: int = 40
    width: int = 1024
    height: int = 1024
    num_images: int = 1  # fal's endpoint returns one image; kept for group_compatible's image count
    is_cancelled: Callable[[], bool] = field(default=_never, compare=False)


@dataclass
class IllusionResult:
    image: torch.Tensor | None  # (H, W, 3) uint8 RGB; None when cancelled
    timings: dict[str, float]
    cancelled: bool = False


def check_request(request: IllusionRequest) -> list[str]:
    """Problems with a request, as messages naming the fal field; empty when it can run."""
    problems = []
    image = request.control_image
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        problems.append(f"image_url must decode to (H, W, 3) uint8 RGB, not {image.dtype} {list(image.shape)}")
    elif min(image.shape[:2]) < 8 or image.shape[0] * image.shape[1] > MAX_INPUT_PIXELS:
        problems.append(f"image_url: the image must be at least 8 px a side and {MAX_INPUT_PIXELS} pixels at most")
    for name, side in (("width", request.width), ("height", request.height)):
        if not (MIN_SIDE <= side <= MAX_SIDE) or side % 8:
            problems.append(f"image_size.{name} must be a multiple of 8 from {MIN_SIDE} to {MAX_SIDE}, not {side}")
    if not 0 <= request.num_inference_steps <= MAX_STEPS:
        problems.append(f"num_inference_steps must be from 0 to {MAX_STEPS}, not {request.num_inference_steps}")
    if not (math.isfinite(request.guidance_scale) and 0.0 <= request.guidance_scale <= MAX_GUIDANCE):
        problems.append(f"guidance_scale must be from 0 to {MAX_GUIDANCE}, not {request.guidance_scale}")
    if not math.isfinite(request.controlnet_conditioning_scale):
        problems.append("controlnet_conditioning_scale must be a finite number")
    start, end = request.control_guidance_start, request.control_guidance_end
    if not (0.0 <= start <= 1.0 and 0.0 <= end <= 1.0):
        problems.append(f"control_guidance_start and _end must be from 0 to 1, not {start} and {end}")
    elif start >= end:
        problems.append(f"control_guidance_start ({start}) must be below control_guidance_end ({end})")
    if request.scheduler not in SCHEDULERS:
        problems.append(f"scheduler must be one of {list(SCHEDULERS)}, not {request.scheduler!r}")
    if not -(2**63) <= request.seed < 2**63:
        problems.append("seed must fit in 64 bits")
    return problems


def illusion_batch_key(request: IllusionRequest) -> Hashable:
    """Same size, sampler and step count: the same timestep count and tensor shapes every step."""
    return (request.width, request.height, request.scheduler, request.num_inference_steps)


class IllusionPipeline:
    """The networks of an SD1.5 base (controlled UNet) and its ControlNet, through whatever runtime built
    their runners; everything a request does not change is prepared once here."""

    def __init__(
        self,
        text_encoder: Runner,
        unet: Runner,
        controlnet: Runner,
        vae_decoder: Runner,
        tokenizer: PreTrainedTokenizerBase,
        scheduler_config: dict[str, Any],
        unet_config: dict[str, Any],
        vae_config: dict[str, Any],
    ):
        self.text_encoder, self.unet, self.controlnet, self.vae_decoder = text_encoder, unet, controlnet, vae_decoder
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.controlled = Controlled(unet_config)
        self.latent_channels = int(unet_config["in_channels"])
        self.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        self.vae_scaling_factor = float(vae_config["scaling_factor"])

    @classmethod
    def from_artifacts(cls, settings: Settings, base: Artifacts, controlnet: Artifacts) -> IllusionPipeline:
        """Runners over the artifact directories of ("illusion_diffusion", ...) and ("controlnet", ...)."""
        specs = {s.name: s for s in family_spec(*_family(base)).load_networks()}
        (controlnet_spec,) = family_spec(*_family(controlnet)).load_networks()
        return cls(
            text_encoder=create_runner(settings, base, specs["text_encoder"]),
            unet=create_runner(settings, base, specs["unet"]),
            controlnet=create_runner(settings, controlnet, controlnet_spec),
            vae_decoder=create_runner(settings, base, specs["vae_decoder"]),
            tokenizer=AutoTokenizer.from_pretrained(base.tokenizer_dir),
            scheduler_config=load_scheduler_config(base.scheduler_dir),
            unet_config=base.config("unet"),
            vae_config=base.config("vae"),
        )

    def __call__(
        self, requests: Sequence[IllusionRequest], on_step: StepCallback | None = None
    ) -> list[IllusionResult]:
        # 1. Check inputs (callers answering untrusted input run check_request themselves first)
        for i, request in enumerate(requests):
            problems = check_request(request)
            if problems:
                raise ValueError(f"request {i}: " + "; ".join(problems))
        on_step = on_step or (lambda index, step, total: None)

        # 2. Group the requests that can share one network batch, and run each group
        results: dict[int, IllusionResult] = {}
        for group in group_compatible(requests, MAX_BATCH_IMAGES, key=illusion_batch_key):  # type: ignore[arg-type]
            results.update(self._run_batch({i: requests[i] for i in group}, on_step))
        return [results[i] for i in range(len(requests))]

    @torch.inference_mode()
    def _run_batch(self, batch: dict[int, IllusionRequest], on_step: StepCallback) -> dict[int, IllusionResult]:
        start = time.perf_counter()
        first = next(iter(batch.values()))
        width, height = first.width, first.height
        latent_h, latent_w = height // self.vae_scale_factor, width // self.vae_scale_factor
        device = self.unet.device

        # 3-5. Per request: prompt embeddings [negative; prompt], the control image (1, 3, H, W) in [0, 1],
        #      its own scheduler and generator, initial noise (1, C, h, w)
        slots = []
        for index, r in batch.items():
            embeddings = encode_with_negative(
                self.text_encoder, self.tokenizer, r.prompt, r.negative_prompt, r.guidance_scale
            ).to(device)
            unit = ControlNetUnit(
                self.controlnet,
                control_image(r.control_image, width, height),
                r.controlnet_conditioning_scale,
                r.control_guidance_start,
                r.control_guidance_end,
            )
            generator = torch.Generator("cpu").manual_seed(r.seed)
            config = sde_noise_config(fal_scheduler_config(self.scheduler_config, r.scheduler), r.seed)
            steps = max(r.num_inference_steps, 1)  # 0 steps: a scheduler to hold no timesteps (sliced below)
            scheduler = new_scheduler(config, steps)
            sigma = scheduler.init_noise_sigma if r.num_inference_steps else 1.0
            latents = initial_latents(generator, 1, self.latent_channels, latent_h, latent_w, sigma)
            if r.num_inference_steps == 0:
                scheduler.timesteps = scheduler.timesteps[:0]
            slots.append(
                GuidedSlot(index, scheduler, latents.to(device), embeddings, r.guidance_scale,
                           step_kwargs(scheduler, generator), r.is_cancelled, controls=(unit,))
            )
        encoded = time.perf_counter()

        # 6. Denoising loop: per step one ControlNet batch and one UNet batch for every request still running
        if len(slots[0].scheduler.timesteps):
            guided_denoise(self.unet, slots, on_step, self.controlled)
        denoised = time.perf_counter()

        # 7. Decode the finished requests in one VAE batch, then uint8 (H, W, 3) each
        done = [s for s in slots if not s.cancelled]
        images: dict[int, torch.Tensor] = {}
        if done:
            pixels = decode_latents(self.vae_decoder, torch.cat([s.latents for s in done]), self.vae_scaling_factor)
            images = {s.index: image for s, image in zip(done, to_uint8(pixels), strict=True)}
        decoded = time.perf_counter()
        timings = {"encode": encoded - start, "denoise": denoised - encoded, "decode": decoded - denoised,
                   "total": decoded - start}
        return {
            index: IllusionResult(images[index], dict(timings)) if index in images
            else IllusionResult(None, dict(timings), cancelled=True)
            for index in batch
        }


def _family(artifacts: Artifacts) -> tuple[str, str]:
    key = artifacts.manifest["key"]
    return key["family"], key["variant"]


def load_illusion_pipeline(settings: Settings) -> IllusionPipeline:
    """The fal-ai/illusion-diffusion pipeline, building demo weights and exports first if missing."""
    from ember.specs.artifacts import ensure_artifacts

    base = ensure_artifacts(settings, "illusion_diffusion", "sdv1-5", progress=False)
    controlnet = ensure_artifacts(settings, "controlnet", "qrcode-monster-sd15", progress=False)
    return IllusionPipeline.from_artifacts(settings, read_artifacts(base), read_artifacts(controlnet))
