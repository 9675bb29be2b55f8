"""fal-ai/lcm: SD1.5 with a latent-consistency UNet in its three modes, each as the diffusers pipeline
that defines it:

    text-to-image   LatentConsistencyModelPipeline
    image-to-image  LatentConsistencyModelImg2ImgPipeline (LCM strength timesteps, noised image latents)
    inpainting      StableDiffusionInpaintPipeline with LCMScheduler and the LCM UNet (4 channels: the
                    known region is re-imposed after every step; timesteps cut by strength)

then, per request, fal's options: `controlnet_inpaint` (inpainting steered by the inpaint ControlNet,
ember.pipeline.lcm_controlnet), `inpaint_mask_only` (original pixels pasted back outside the mask),
`enable_safety_checks` (ember.pipeline.safety, shared with the other endpoints) and `lora_url` +
`lora_scale` (a LoRA fused into the text encoder and UNet for that request's batch, ember.pipeline.lcm_lora).

A list of requests goes in (what Triton's dynamic batcher handed to one execute); compatible ones run as
one network batch, each with its own scheduler and generator, so every request gets exactly the image it
would get alone and the image diffusers gives for the same seed.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ember.pipeline.batching import batch_key, group_compatible
from ember.pipeline.controlnet import ControlNetUnit
from ember.pipeline.decode import decode_latents, to_uint8
from ember.pipeline.denoise import DenoiseSlot, InpaintBlend, lcm_denoise
from ember.pipeline.encode import encode_prompts
from ember.pipeline.images import ImagePreprocessor, default_size, encode_images, paste_outside_mask
from ember.pipeline.latents import guidance_embedding, initial_latents
from ember.pipeline.lcm_controlnet import InpaintControl, InpaintControlLoader
from ember.pipeline.lcm_lora import LcmLoras
from ember.pipeline.requests import (
    NEGATIVE_PROMPT_IGNORED,
    StepCallback,
    Text2ImageRequest,
    Text2ImageResult,
)
from ember.pipeline.safety import SafetyChecker
from ember.pipeline.schedulers import SchedulerFactory, load_scheduler_config, strength_timesteps
from ember.runtime import Runner, create_runner
from ember.settings import Settings
from ember.specs.artifacts import Artifacts, family_spec, read_artifacts
from ember.specs.base import MAX_BATCH_IMAGES

# What the model accepts (the gateway applies fal's narrower ranges first: steps <= 12, guidance <= 8).
MIN_SIDE, MAX_SIDE = 64, 1024  # pixels, multiples of 8; 1024 is the largest fal preset and engine profile
MAX_STEPS = 50  # LCMScheduler allows at most original_inference_steps (50 for LCM_Dreamshaper_v7)
MAX_IMAGES = 8
MAX_GUIDANCE = 20.0
MAX_INPUT_PIXELS = 4096 * 4096  # input images beyond this are refused rather than resized


def resolve_size(request: Text2ImageRequest) -> Text2ImageRequest:
    """The request with its output size filled in: a size left None is the input image's (fal-ai/lcm's
    default for image-to-image and inpainting), fitted within 1024 px keeping the aspect ratio."""
    if request.width is not None and request.height is not None:
        return request
    if request.image is None:
        raise ValueError("width and height are required for text-to-image")
    width, height = default_size(request.image.shape[:2])
    return dataclasses.replace(request, width=width, height=height)


def check_request(request: Text2ImageRequest) -> list[str]:
    """Problems with a request, as messages naming the field; empty when it can run."""
    problems = []
    if request.image is not None:
        image = request.image
        if image.dtype.name != "uint8" or image.ndim != 3 or image.shape[2] != 3:
            problems.append(f"image must be (H, W, 3) uint8 RGB, not {image.dtype.name} {list(image.shape)}")
        elif not (8 <= min(image.shape[:2]) and image.shape[0] * image.shape[1] <= MAX_INPUT_PIXELS):
            problems.append(f"image must be at least 8 px a side and {MAX_INPUT_PIXELS} pixels at most")
    if request.mask is not None:
        if request.image is None:
            problems.append("mask needs an image to inpaint (mask without image)")
        elif request.mask.dtype.name != "uint8" or request.mask.shape != request.image.shape[:2]:
            problems.append(
                f"mask must be (H, W) uint8 with the image's size {list(request.image.shape[:2])}, "
                f"not {request.mask.dtype.name} {list(request.mask.shape)}"
            )
    if request.inpaint_mask_only and request.mask is None:
        problems.append("inpaint_mask_only needs a mask")
    if request.controlnet_inpaint and request.mask is None:
        problems.append("controlnet_inpaint needs a mask (it steers inpainting)")
    if problems:
        return problems
    if request.image is not None and (request.width is None or request.height is None):
        request = resolve_size(request)
    for name, side in (("width", request.width), ("height", request.height)):
        if side is None or not (MIN_SIDE <= side <= MAX_SIDE) or side % 8:
            problems.append(f"{name} must be a multiple of 8 from {MIN_SIDE} to {MAX_SIDE}, not {side}")
    if not 1 <= request.num_inference_steps <= MAX_STEPS:
        problems.append(
            f"num_inference_steps must be from 1 to {MAX_STEPS}, not {request.num_inference_steps}"
        )
    if not 1 <= request.num_images <= MAX_IMAGES:
        problems.append(f"num_images must be from 1 to {MAX_IMAGES}, not {request.num_images}")
    if not (math.isfinite(request.guidance_scale) and 0.0 <= request.guidance_scale <= MAX_GUIDANCE):
        problems.append(f"guidance_scale must be from 0 to {MAX_GUIDANCE}, not {request.guidance_scale}")
    if not (math.isfinite(request.strength) and 0.0 < request.strength <= 1.0):
        problems.append(f"strength must be above 0 and at most 1, not {request.strength}")
    if not -(2**63) <= request.seed < 2**63:
        problems.append("seed must fit in 64 bits")
    return problems


def steps_walked(request: Text2ImageRequest) -> int:
    """Denoising steps a request runs: inpainting cuts the schedule to its last int(n * strength) steps
    (diffusers' get_timesteps); text- and image-to-image run all n (LCM spaces n steps within strength)."""
    if request.mode == "inpaint":
        return min(int(request.num_inference_steps * request.strength), request.num_inference_steps)
    return request.num_inference_steps


def lcm_batch_key(request: Text2ImageRequest) -> Hashable:
    """Same model, mode, UNet (plain or ControlNet-steered), size and steps walked: one set of networks,
    one preparation, lock-step loop."""
    return (
        request.model,
        request.mode,
        request.controlnet_inpaint,
        *batch_key(request),
        steps_walked(request),
        request.lora_key,  # one fused LoRA set per network batch
    )


class LcmPipeline:
    """Runs the networks of an LCM SD1.5 model through whatever runtime built their runners.

    Everything a request does not change is prepared here once (tokenizer, scheduler config, image
    processors, runners with warm sessions); a request costs only its own tensors.
    """

    model = "sdv1-5"

    def __init__(
        self,
        text_encoder: Runner,
        unet: Runner,
        vae_decoder: Runner,
        tokenizer: PreTrainedTokenizerBase,
        scheduler_config: dict[str, Any],
        unet_config: dict[str, Any],
        vae_config: dict[str, Any],
        vae_encoder: Runner | None = None,
        safety_checker: SafetyChecker | None = None,
        inpaint_control: Callable[[], InpaintControl] | None = None,
    ):
        self.text_encoder, self.unet, self.vae_decoder = text_encoder, unet, vae_decoder
        self.vae_encoder, self.safety_checker = vae_encoder, safety_checker
        # controlnet_inpaint's networks, created on first use (InpaintControlLoader); None: not served
        self.inpaint_control = inpaint_control
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.new_scheduler = SchedulerFactory(scheduler_config)
        self.original_steps = int(scheduler_config.get("original_inference_steps", MAX_STEPS))
        self.latent_channels = int(unet_config["in_channels"])
        self.time_cond_dim = int(unet_config["time_cond_proj_dim"])
        self.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        self.vae_scaling_factor = float(vae_config["scaling_factor"])
        self.preprocess = ImagePreprocessor(self.vae_scale_factor)
        self._w_embeddings: dict[float, torch.Tensor] = {}  # guidance scale -> (1, time_cond_proj_dim)
        self.loras = LcmLoras(text_encoder, unet, self.model)  # lora_url: fused per batch, base restored

    def _guidance(self, guidance_scale: float, k: int) -> torch.Tensor:
        """(k, time_cond_proj_dim) guidance embedding, computed once per guidance value (fal's 0..8 range
        holds few distinct values in practice; bounded anyway) and expanded per request."""
        w = self._w_embeddings.get(guidance_scale)
        if w is None:
            w = guidance_embedding(guidance_scale, 1, self.time_cond_dim).to(self.unet.device)
            if len(self._w_embeddings) < 256:
                self._w_embeddings[guidance_scale] = w
        return w.expand(k, -1)

    @classmethod
    def from_artifacts(
        cls,
        settings: Settings,
        artifacts: Artifacts,
        safety_checker: SafetyChecker | None = None,
        controlnet_inpaint: bool = False,
    ) -> LcmPipeline:
        """Runners for settings.runtime over an artifact directory built by ember.specs.ensure_artifacts;
        with `controlnet_inpaint`, a loader of that option's networks (nothing is loaded before its first
        request)."""
        key = artifacts.manifest["key"]
        specs = {s.name: s for s in family_spec(key["family"], key["variant"]).load_networks()}
        return cls(
            # refittable: lora_url fuses LoRAs into these two (ember.pipeline.lcm_lora)
            text_encoder=create_runner(settings, artifacts, specs["text_encoder"], refittable=True),
            unet=create_runner(settings, artifacts, specs["unet"], refittable=True),
            vae_decoder=create_runner(settings, artifacts, specs["vae_decoder"]),
            vae_encoder=create_runner(settings, artifacts, specs["vae_encoder"]),
            tokenizer=AutoTokenizer.from_pretrained(artifacts.tokenizer_dir),
            scheduler_config=load_scheduler_config(artifacts.scheduler_dir),
            unet_config=artifacts.config("unet"),
            vae_config=artifacts.config("vae"),
            safety_checker=safety_checker,
            inpaint_control=InpaintControlLoader(settings, artifacts) if controlnet_inpaint else None,
        )

    def warmup(self, width: int = 512, height: int = 512, steps: int = 4) -> None:
        """One throw-away text-to-image request at the serving size, so the first real request finds
        every runner's session initialised (onnxruntime / TensorRT allocate and pick kernels on their
        first call) and the scheduler template for `steps` built."""
        self([Text2ImageRequest(
            prompt="", seed=0, width=width, height=height, num_inference_steps=steps, model=self.model
        )])

    def problems(self, request: Text2ImageRequest) -> list[str]:
        """check_request plus what depends on this model: its variant, scheduler and loaded networks."""
        problems = check_request(request)
        if request.model != self.model:
            problems.append(f"model {request.model!r} is not loaded here (this pipeline serves {self.model!r})")
        problems.extend(self.strength_problems(request))
        if request.image is not None and self.vae_encoder is None:
            problems.append("this pipeline was built without a VAE encoder: image inputs are not served")
        if request.enable_safety_checks and self.safety_checker is None:
            problems.append("enable_safety_checks: no safety checker is loaded on this server")
        if request.controlnet_inpaint and self.inpaint_control is None:
            problems.append("controlnet_inpaint: this pipeline was built without the inpaint ControlNet")
        problems.extend(self.loras.problems(request))
        return problems

    # Hooks a model family overrides (ember.pipeline.lcm_xl): strength semantics, batch key, prompt
    # conditioning, extra UNet inputs. The steps below call them; the loop and stages stay shared.

    def strength_problems(self, request: Text2ImageRequest) -> list[str]:
        problems = []
        if request.mode == "image" and int(self.original_steps * request.strength) < request.num_inference_steps:
            problems.append(
                f"strength {request.strength} leaves int({self.original_steps} x strength) = "
                f"{int(self.original_steps * request.strength)} distillation steps, fewer than "
                f"num_inference_steps={request.num_inference_steps}: raise strength or lower the steps"
            )
        if request.mode == "inpaint" and steps_walked(request) < 1:
            problems.append(
                f"strength {request.strength} x num_inference_steps {request.num_inference_steps} leaves no "
                "denoising step: raise strength or the steps"
            )
        return problems

    def batch_key(self, request: Text2ImageRequest) -> Hashable:
        return lcm_batch_key(request)

    def schedule(self, request: Text2ImageRequest) -> tuple[Any, torch.Tensor]:
        """A fresh scheduler for the request and the timesteps it walks: image-to-image spaces n steps
        within strength (LatentConsistencyModelImg2ImgPipeline), inpainting cuts the tail (get_timesteps)."""
        scheduler = self.new_scheduler(
            request.num_inference_steps, request.strength if request.mode == "image" else None
        )
        if request.mode == "inpaint":
            return scheduler, strength_timesteps(scheduler, request.num_inference_steps, request.strength)
        return scheduler, scheduler.timesteps

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Conditioning per distinct prompt, one row each: text_embeddings (P, 77, D) for the UNet's
        encoder_hidden_states; any other entry is an added UNet input of the same name (P, ...)."""
        return {"text_embeddings": encode_prompts(self.text_encoder, self.tokenizer, prompts)}

    def image_conditions(self, request: Text2ImageRequest, k: int) -> dict[str, torch.Tensor]:
        """UNet inputs that depend on the request's image size, not its prompt (k, ...): none for SD1.5."""
        return {}

    def __call__(
        self, requests: Sequence[Text2ImageRequest], on_step: StepCallback | None = None
    ) -> list[Text2ImageResult]:
        # 1. Check inputs (callers answering untrusted input run problems() themselves first)
        for i, request in enumerate(requests):
            problems = self.problems(request)
            if problems:
                raise ValueError(f"request {i}: " + "; ".join(problems))
        requests = [resolve_size(r) for r in requests]
        on_step = on_step or (lambda index, step, total: None)

        # 2. Group the requests that can share one network batch, and run each group
        results: dict[int, Text2ImageResult] = {}
        for group in group_compatible(requests, MAX_BATCH_IMAGES, key=self.batch_key):
            results.update(self._run_batch({i: requests[i] for i in group}, on_step))
        return [results[i] for i in range(len(requests))]

    @torch.inference_mode()
    def _run_batch(
        self, batch: dict[int, Text2ImageRequest], on_step: StepCallback
    ) -> dict[int, Text2ImageResult]:
        """One group of compatible requests (same lcm_batch_key), keyed by request index."""
        start = time.perf_counter()
        first = next(iter(batch.values()))
        assert first.width is not None and first.height is not None  # resolve_size ran
        width, height = first.width, first.height
        latent_h, latent_w = height // self.vae_scale_factor, width // self.vae_scale_factor
        device = self.unet.device
        # The group's LoRA set fused into the text encoder and UNet (lcm_batch_key: one set per group; the
        # empty set restores the base weights exactly)
        self.loras.apply(first.loras)

        # 3. Encode each distinct prompt once: (P, 77, D). LCM has no unconditional branch, so
        #    negative_prompt is not used (diffusers' LCM pipeline ignores it too; the result notes it).
        prompts = list(dict.fromkeys(r.prompt for r in batch.values()))
        encoded_prompts = {name: t.to(device) for name, t in self.encode(prompts).items()}
        embeddings = encoded_prompts.pop("text_embeddings")
        row = {prompt: i for i, prompt in enumerate(prompts)}

        # 4. Per request: its own scheduler and generator. Image modes: the input image (1, 3, H, W) in
        #    [-1, 1] through one VAE encoder call for the whole batch, each sample from its own generator.
        schedulers, generators, timesteps = {}, {}, {}
        for index, request in batch.items():
            schedulers[index], timesteps[index] = self.schedule(request)
            generators[index] = torch.Generator("cpu").manual_seed(request.seed)
        image_latents: dict[int, torch.Tensor] = {}
        if first.mode != "text":
            assert self.vae_encoder is not None  # problems() refused image requests otherwise
            pixels = {i: self.preprocess.image_tensor(r.image, width, height) for i, r in batch.items()}
            encoded_images = encode_images(
                self.vae_encoder,
                torch.cat(list(pixels.values())).to(self.vae_encoder.device),
                [generators[i] for i in pixels],
                self.vae_scaling_factor,
            )
            image_latents = dict(zip(pixels, encoded_images.split(1), strict=True))  # (1, C, h, w) each
        encoded = time.perf_counter()

        # 5. Initial latents (k, C, h, w), the text embedding per image (k, 77, D), the guidance
        #    embedding (k, time_cond_proj_dim); with controlnet_inpaint, each request's control image
        control = self.inpaint_control() if first.controlnet_inpaint and self.inpaint_control else None
        if control is not None:  # the group's LoRA set (or the base) in the ControlNet-steered UNet too
            self.loras.apply_controlled(control.unet, first.loras)
        slots = []
        for index, request in batch.items():
            scheduler, generator, k = schedulers[index], generators[index], request.num_images
            inpaint = None
            if request.mode == "text":
                latents = initial_latents(
                    generator, k, self.latent_channels, latent_h, latent_w, scheduler.init_noise_sigma
                )
            else:
                known = image_latents[index].repeat(k, 1, 1, 1)
                noise = randn_tensor(known.shape, generator=generator, dtype=known.dtype)
                t0 = timesteps[index][:1]
                if request.mode == "image" or request.strength < 1.0:
                    latents = scheduler.add_noise(known, noise, t0.repeat(k))
                else:  # inpainting at strength 1 starts from pure noise, as diffusers' is_strength_max
                    latents = noise * scheduler.init_noise_sigma
                if request.mode == "inpaint":
                    inpaint = self._inpaint_blend(request, known, noise, generator, latent_h, latent_w)
            slots.append(
                DenoiseSlot(
                    index=index,
                    scheduler=scheduler,
                    generator=generator,
                    latents=latents.to(device),
                    text_embeddings=embeddings[row[request.prompt]].expand(k, -1, -1),
                    added_cond={
                        **{n: t[row[request.prompt]].expand(k, *t.shape[1:]) for n, t in encoded_prompts.items()},
                        **self.image_conditions(request, k),
                    },
                    timestep_cond=self._guidance(request.guidance_scale, k),
                    is_cancelled=request.is_cancelled,
                    timesteps=timesteps[index],
                    inpaint=inpaint,
                    controls=self._controls(control, request, width, height) if control else (),
                )
            )

        # 6. Denoising loop: one UNet batch per step for every request still running (with
        #    controlnet_inpaint: the ControlNet, then the UNet taking its residuals)
        if control is None:
            lcm_denoise(self.unet, slots, on_step)
        else:
            lcm_denoise(control.unet, slots, on_step, control.controlled)
        denoised_at = time.perf_counter()

        # 7. Decode the finished requests in one VAE batch, (B, 3, H, W), then uint8 (k, H, W, 3) per request
        done = [s for s in slots if not s.cancelled]
        pixels_out: dict[int, torch.Tensor] = {}
        if done:
            images = decode_latents(
                self.vae_decoder, torch.cat([s.denoised for s in done]), self.vae_scaling_factor
            )
            per_request = to_uint8(images).split([s.latents.shape[0] for s in done])
            pixels_out = {s.index: p for s, p in zip(done, per_request, strict=True)}
        decoded = time.perf_counter()

        # 8. fal's per-request options on the finished images: paste-back outside the mask, then the
        #    safety check (of what the user will get), flagged images black
        nsfw: dict[int, list[bool]] = {}
        for index, images in pixels_out.items():
            request = batch[index]
            if request.inpaint_mask_only:
                assert request.image is not None and request.mask is not None
                pixels_out[index] = paste_outside_mask(images, request.image, request.mask)
            nsfw[index] = [False] * request.num_images
        checked = [i for i in pixels_out if batch[i].enable_safety_checks]
        if checked:
            assert self.safety_checker is not None  # problems() refused the request otherwise
            images, flags = self.safety_checker(torch.cat([pixels_out[i] for i in checked]))
            sizes = [batch[i].num_images for i in checked]
            for i, part, part_flags in zip(checked, images.split(sizes), _split(flags, sizes), strict=True):
                pixels_out[i], nsfw[i] = part, part_flags
        finished = time.perf_counter()

        # 9. Results, each with the stage timings of the batch it ran in
        timings = {
            "encode": encoded - start,
            "denoise": denoised_at - encoded,
            "decode": decoded - denoised_at,
            "safety": finished - decoded,
            "total": finished - start,
        }
        results = {}
        for index, request in batch.items():
            notes = [NEGATIVE_PROMPT_IGNORED] if request.negative_prompt else []
            if index not in pixels_out:
                results[index] = Text2ImageResult(None, [], dict(timings), cancelled=True, notes=notes)
                continue
            results[index] = Text2ImageResult(pixels_out[index], nsfw[index], dict(timings), notes=notes)
        return results

    def _controls(
        self, control: InpaintControl, request: Text2ImageRequest, width: int, height: int
    ) -> tuple[ControlNetUnit, ...]:
        """controlnet_inpaint's unit: the control image from the image and the mask at the output size."""
        assert request.image is not None and request.mask is not None  # check_request: it needs a mask
        return control.units(request.image, self.preprocess.mask_tensor(request.mask, width, height))

    def _inpaint_blend(
        self,
        request: Text2ImageRequest,
        known: torch.Tensor,
        noise: torch.Tensor,
        generator: torch.Generator,
        latent_h: int,
        latent_w: int,
    ) -> InpaintBlend:
        """The mask on the latent grid (k, 1, h, w), nearest-resized as diffusers' prepare_mask_latents."""
        assert request.mask is not None and request.width is not None and request.height is not None
        mask = self.preprocess.mask_tensor(request.mask, request.width, request.height)  # (1, 1, H, W)
        mask = torch.nn.functional.interpolate(mask, size=(latent_h, latent_w))
        # diffusers encodes the masked image too (for 9-channel inpainting UNets) and so draws one more
        # latent sample from the generator; a 4-channel UNet never uses it, but drawing it keeps every
        # later draw (the scheduler's per-step noise) equal to diffusers' for the same seed.
        randn_tensor((1, *known.shape[1:]), generator=generator, dtype=known.dtype)
        return InpaintBlend(image_latents=known, noise=noise, mask=mask.repeat(known.shape[0], 1, 1, 1))


def _split(flags: list[bool], sizes: list[int]) -> list[list[bool]]:
    out, start = [], 0
    for size in sizes:
        out.append(flags[start : start + size])
        start += size
    return out


# The name the text-to-image skeleton exported; the pipeline now serves every mode.
LcmText2ImagePipeline = LcmPipeline


def load_lcm_pipeline(
    settings: Settings,
    variant: str = "sdv1-5",
    safety: bool = True,
    safety_checker: SafetyChecker | None = None,
) -> LcmPipeline:
    """The fal-ai/lcm pipeline for `variant` (with the shared safety checker unless `safety` is False;
    `safety_checker` reuses one already loaded), building demo weights and exports first if missing."""
    from ember.pipeline.safety import load_safety_checker
    from ember.specs.artifacts import ensure_artifacts

    path = ensure_artifacts(settings, family="lcm", variant=variant, progress=False)
    checker = (safety_checker or load_safety_checker(settings)) if safety else None
    cls = LcmPipeline
    if variant == "sdxl":  # SDXL: two text encoders and added conditions (its hooks)
        from ember.pipeline.lcm_xl import LcmXLPipeline

        cls = LcmXLPipeline
    if "controlled_unet" in family_spec("lcm", variant).spec_versions:
        # controlnet_inpaint (SD1.5): its networks load on its first request, so every other request's
        # path stays as it was
        return cls.from_artifacts(settings, read_artifacts(path), safety_checker=checker, controlnet_inpaint=True)
    return cls.from_artifacts(settings, read_artifacts(path), safety_checker=checker)
