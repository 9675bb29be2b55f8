"""fal-ai/lora text-to-image on any Stable Diffusion 1.5 base model, as diffusers' StableDiffusionPipeline
(classifier-free guidance, any of fal's 11 schedulers, clip_skip, LoRAs fused by weight refit, tiled decode),
and on SDXL base directories as StableDiffusionXLPipeline (ember.pipeline.lora_xl: same loop and stages).

Base models are named per request (HF id, a local directory, or a single-file checkpoint the gateway
fetched; ember.pipeline.base_models) and loaded on first use; at most
`max_models` stay resident (least recently used leaves). Requests on the same model, LoRA set, size and
step count run as one network batch, each with its own scheduler and generator.
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from ember.pipeline.debug_latents import DebugLatents, collect, recorder
from ember.pipeline.decode import to_uint8
from ember.pipeline.guidance import uses_cfg
from ember.pipeline.guided_denoise import GuidedSlot, guided_denoise, step_kwargs
from ember.pipeline.ic_light import IcLightInput, IcLightStage
from ember.pipeline.instantid import attach as attach_instantid
from ember.pipeline.ip_adapter import IPAdapterRequest, IPAdapterStage
from ember.pipeline.latents import initial_latents
from ember.pipeline.lora_controlnets import ControlNetInput, ControlNets, check_controlnets
from ember.pipeline.lora_xl import XLBaseModel, is_xl_source
from ember.pipeline.loras import LoraFile, LoraState
from ember.pipeline.requests import StepCallback
from ember.pipeline.schedulers import fal_scheduler_config, new_scheduler_with
from ember.pipeline.text_conditioning import TextConditioner, by_sequence_length, extended_text_encoder
from ember.pipeline.textual_inversion import Embedding
from ember.pipeline.tiled_decode import tiled_decode
from ember.runtime import Runner
from ember.settings import Settings

MIN_SIDE, MAX_SIDE = 64, 2048
MAX_STEPS = 150
# on_log(request index, message): progress lines that are not denoising steps (model loading).
LogCallback = Callable[[int, str], None]


def _never() -> bool:
    return False


@dataclass(frozen=True)
class ModelRef:
    """Which base model: `source` is a local diffusers directory (an HF id already resolved to its snapshot
    in the HF cache, a local path already checked against the allowed root); `unet` likewise a directory."""

    source: str
    variant: str | None = None
    unet: str | None = None


@dataclass(frozen=True)
class LoraRequest:
    model: ModelRef
    prompt: str
    seed: int
    negative_prompt: str = ""
    num_images: int = 1
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    clip_skip: int = 0
    scheduler: str | None = None
    timesteps: tuple[int, ...] | None = None
    sigmas: tuple[float, ...] | None = None
    prediction_type: str | None = None
    rescale_betas_zero_snr: bool = False
    eta: float = 0.0
    tile: tuple[int, int] = (4096, 4096)  # (height, width) pixels
    tile_stride: tuple[int, int] = (2048, 2048)
    loras: tuple[tuple[LoraFile, float], ...] = ()
    # fal's prompt_weighting (compel's syntax, prompts over 75 tokens in windows) and embeddings
    # (textual inversion): ember.pipeline.text_conditioning
    prompt_weighting: bool = False
    embeddings: tuple[Embedding, ...] = ()
    enable_safety_checker: bool = False
    # fal's debug_latents / debug_per_pass_latents (ember.pipeline.debug_latents)
    debug_latents: bool = False
    debug_per_pass_latents: bool = False
    # fal's controlnets / controlnet_guess_mode (ember.pipeline.lora_controlnets)
    controlnets: tuple[ControlNetInput, ...] = ()
    controlnet_guess_mode: bool = False
    # fal's ip_adapter + image_encoder_* (ember.pipeline.ip_adapter)
    ip_adapter: IPAdapterRequest | None = None
    # fal's ic_light_* (ember.pipeline.ic_light): the offset file, foreground and background images
    ic_light: IcLightInput | None = None
    is_cancelled: Callable[[], bool] = field(default=_never, compare=False)

    @property
    def lora_key(self) -> tuple[tuple[str, float], ...]:
        return tuple((lora.digest, scale) for lora, scale in self.loras)


@dataclass
class LoraResult:
    images: torch.Tensor | None  # (num_images, H, W, 3) uint8; None when cancelled
    nsfw: list[bool]
    timings: dict[str, float]
    cancelled: bool = False
    # Why this request could not run (bad model_name, a schedule its scheduler does not take): the
    # caller answers it as invalid input; the other requests of the batch are unaffected.
    error: str | None = None
    debug: DebugLatents | None = None  # the latents asked for by debug_latents / debug_per_pass_latents


def check_request(request: LoraRequest) -> list[str]:
    """Problems with a request, as messages naming the field; empty when it can run."""
    problems = []
    for name, side in (("width", request.width), ("height", request.height)):
        if not (MIN_SIDE <= side <= MAX_SIDE) or side % 8:
            problems.append(f"{name} must be a multiple of 8 from {MIN_SIDE} to {MAX_SIDE}, not {side}")
    if not 1 <= request.num_inference_steps <= MAX_STEPS:
        problems.append(
            f"num_inference_steps must be from 1 to {MAX_STEPS}, not {request.num_inference_steps}"
        )
    if not 1 <= request.num_images <= 8:
        problems.append(f"num_images must be from 1 to 8, not {request.num_images}")
    if not 0 <= request.clip_skip <= 2:
        problems.append(f"clip_skip must be from 0 to 2, not {request.clip_skip}")
    if request.timesteps is not None and request.sigmas is not None:
        problems.append("timesteps and sigmas cannot both be set")
    if request.tile_stride[0] > request.tile[0] or request.tile_stride[1] > request.tile[1]:
        problems.append("tile_stride_width/height must not exceed tile_width/height")
    problems += check_controlnets(request.controlnets)
    return problems


def is_sdxl(source: str) -> bool:
    """SDXL told apart from SD1.5 by the weights' own description: a second text encoder in
    model_index.json, or a UNet conditioned on "text_time" (SDXL's size/crop micro-conditioning)."""
    root = Path(source)
    if not (root / "model_index.json").is_file():
        raise ValueError(f"{source} is not a diffusers model directory (no model_index.json)")
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    unet = json.loads((root / "unet" / "config.json").read_text(encoding="utf-8"))
    return "text_encoder_2" in index or unet.get("addition_embed_type") == "text_time"


class BaseModel:
    """One resident SD1.5 base model: its three runners, tokenizer, scheduler config and LoRA state."""

    def __init__(self, settings: Settings, ref: ModelRef, on_log: Callable[[str], None] | None = None):
        from ember.pipeline import base_models

        # Single-file checkpoints become (cached) diffusers directories; SD2 is refused (SDXL: XLBaseModel)
        # The runners run on the lora model's runtime (models.toml [lora.sdv1-5]): torch loads the
        # directory, onnxruntime exports it once into the artifact cache. `on_log`: the request's status.
        ref = base_models.prepare(settings, ref, on_log or base_models._nothing)
        self.source = ref.source
        self.text_encoder: Runner
        self.unet: Runner
        self.vae_decoder: Runner
        self.text_encoder, self.unet, self.vae_decoder = base_models.runners(
            settings, ref, on_log or base_models._nothing
        )
        self.tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
            ref.source, subfolder="tokenizer"
        )
        root = Path(ref.source)
        scheduler_file = root / "scheduler" / "scheduler_config.json"
        self.scheduler_config: dict[str, Any] = json.loads(scheduler_file.read_text(encoding="utf-8"))
        unet_config = json.loads(
            (Path(ref.unet or root / "unet") / "config.json").read_text(encoding="utf-8")
        )
        vae_config = json.loads((root / "vae" / "config.json").read_text(encoding="utf-8"))
        self.latent_channels = int(unet_config["in_channels"])
        self.vae_scale_factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
        self.vae_scaling_factor = float(vae_config["scaling_factor"])
        # Prompt embeddings: the plain text encoder, or for embeddings / prompt_weighting the extended one
        # (built on first use, over the same weights on torch). LoRAs refit the text encoder through it.
        self.text = TextConditioner(
            self.text_encoder,
            self.tokenizer,
            root / "text_encoder",
            lambda plain: extended_text_encoder(plain, settings, ref),
        )
        self.loras = LoraState(
            {"unet": self.unet, "text_encoder": self.text},
            # read on the first LoRA (a runtime without weight access then refuses that request only)
            {
                "unet": base_models.LazyWeights(self.unet),
                "text_encoder": base_models.LazyWeights(self.text_encoder),
            },
        )


def _batch_key(request: LoraRequest) -> Hashable:
    steps = len(request.timesteps or request.sigmas or ()) or request.num_inference_steps
    ip_adapter = request.ip_adapter.key if request.ip_adapter else None
    ic_light = request.ic_light.digest if request.ic_light else None  # one IC-Light UNet per batch
    return (
        request.model,
        request.lora_key,
        request.width,
        request.height,
        steps,
        request.scheduler,
        ip_adapter,
        ic_light,
    )


class LoraText2ImagePipeline:
    def __init__(self, settings: Settings, max_models: int | None = None):
        self.settings = settings
        self.max_models = max_models or settings.lora_max_models
        self._models: OrderedDict[ModelRef, BaseModel] = OrderedDict()
        self._safety: Any = None  # the shared safety checker stage, loaded on the first request asking for it
        self.controlnets = ControlNets(settings)  # loaded per request path on first use (LRU)
        self.ip_adapters = IPAdapterStage(settings)  # image encoders and IP UNets, on first use
        self.ic_light = IcLightStage(settings)  # VAE encoders and patched UNets, on first use

    def safety_checker(self) -> Any:
        if self._safety is None:
            from ember.pipeline.safety import load_safety_checker

            self._safety = load_safety_checker(self.settings)
        return self._safety

    def model(self, ref: ModelRef, on_log: Callable[[str], None] | None = None) -> BaseModel:
        """The resident model for `ref`, loading it first (and evicting the least recently used)."""
        model = self._models.get(ref)
        if model is not None:
            self._models.move_to_end(ref)
            return model
        log = on_log or (lambda message: None)
        log(f"loading base model {ref.source} (first use; later requests are warm)")
        start = time.perf_counter()
        while len(self._models) >= self.max_models:
            evicted, _ = self._models.popitem(last=False)
            log(f"unloading base model {evicted.source} (EMBER_LORA_MAX_MODELS={self.max_models})")
        # SDXL directories and single files run as StableDiffusionXLPipeline (ember.pipeline.lora_xl)
        loader = XLBaseModel if is_xl_source(ref.source) else BaseModel
        model = self._models[ref] = loader(self.settings, ref, log)
        log(f"base model {ref.source} loaded in {time.perf_counter() - start:.1f}s")
        return model

    def __call__(
        self,
        requests: Sequence[LoraRequest],
        on_step: StepCallback | None = None,
        on_log: LogCallback | None = None,
    ) -> list[LoraResult]:
        for i, request in enumerate(requests):
            problems = check_request(request)
            if problems:
                raise ValueError(f"request {i}: " + "; ".join(problems))
        on_step = on_step or (lambda index, step, total: None)
        on_log = on_log or (lambda index, message: None)
        groups: dict[Hashable, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(_batch_key(request), []).append(i)
        results: dict[int, LoraResult] = {}
        for indices in groups.values():
            first = indices[0]
            try:
                model = self.model(requests[first].model, lambda message, i=first: on_log(i, message))
            except (OSError, ValueError) as exc:  # not a loadable SD1.5 model: those requests' error
                why = str(exc) if str(exc).startswith("unet_name:") else f"model_name: {exc}"  # the field
                results.update({i: LoraResult(None, [], {}, error=why) for i in indices})
                continue
            results.update(self._run_batch(model, {i: requests[i] for i in indices}, on_step, on_log))
        return [results[i] for i in range(len(requests))]

    @torch.inference_mode()
    def _run_batch(
        self,
        model: BaseModel,
        batch: dict[int, LoraRequest],
        on_step: StepCallback,
        on_log: LogCallback | None = None,
    ) -> dict[int, LoraResult]:
        start = time.perf_counter()
        first = next(iter(batch.values()))
        # 1. Fuse this group's LoRA set (a no-op when it is already the current one)
        try:
            model.loras.apply(first.loras)
        except (
            ValueError,
            KeyError,
            RuntimeError,
        ) as exc:  # a LoRA for another model; merged before any refit
            return {i: LoraResult(None, [], {}, error=f"loras: {exc}") for i in batch}
        h, w = first.height // model.vae_scale_factor, first.width // model.vae_scale_factor

        # 2-5. Per request: prompt embeddings, its own scheduler and generator, initial noise (k, C, h, w)
        slots, failed = [], {}
        for index, r in batch.items():
            try:
                slots.append(self._slot(model, index, r, h, w))
            except ValueError as exc:  # e.g. a timesteps/sigmas override the scheduler does not take
                failed[index] = LoraResult(None, [], {}, error=str(exc))
        # 5b-d. Per request, each attach stage adds its UNet inputs to the slots and names the requests it
        #      cannot serve (those fail alone): ControlNet units (networks loaded on first use) with
        #      control images and masks at the output size; IP-Adapter image embeds (and masks); IC-Light
        #      concat_conds (foreground, background latents).
        log = on_log or (lambda index, message: None)
        size = (first.width, first.height)
        attach_stages: list[Callable[[list[GuidedSlot]], dict[int, str]]] = [
            lambda live: self.controlnets.attach(model, live, batch, *size, log),
            lambda live: self.ip_adapters.attach(live, batch, *size),
            # InstantID: ControlNets with ip_adapter_index read that adapter's projected face tokens
            lambda live: attach_instantid(self.ip_adapters, self.controlnets, model.unet, live, batch),
            lambda live: self.ic_light.attach(model, live, batch, *size),
        ]
        for attach in attach_stages:
            refused = attach(slots)
            failed.update({i: LoraResult(None, [], {}, error=message) for i, message in refused.items()})
            slots = [s for s in slots if s.index not in refused]
        encoded = time.perf_counter()

        # 6. Denoising loop (on the residual-taking UNet when any request has ControlNets)
        if slots:
            unet, controlled = self.controlnets.denoiser(model, slots)
            try:  # the IP UNet when the batch has IP-Adapters (one set per batch: _batch_key)
                if first.ic_light is None:
                    unet = self.ip_adapters.denoiser(model.unet, unet, controlled, first.ip_adapter)
                else:  # IC-Light (one file per batch): all of it on the patched UNet, the LoRAs fused there too
                    unet = self.ic_light.denoiser(model, first, controlled, self.ip_adapters)
            except ValueError as exc:
                failed.update({s.index: LoraResult(None, [], {}, error=str(exc)) for s in slots})
                slots = []
        for same_length in by_sequence_length(slots):  # long weighted prompts: (2k, 77 * windows, D)
            guided_denoise(unet, same_length, on_step, controlled)
        denoised = time.perf_counter()

        # 7. Decode (tiled per the request's tile settings), uint8 (k, H, W, 3)
        results: dict[int, LoraResult] = dict(failed)
        for slot in slots:
            r = batch[slot.index]
            if slot.cancelled:
                results[slot.index] = LoraResult(None, [], {}, cancelled=True)
                continue
            images = tiled_decode(
                model.vae_decoder,
                slot.latents / model.vae_scaling_factor,
                r.tile,
                r.tile_stride,
                model.vae_scale_factor,
            )
            pixels, nsfw = to_uint8(images), [False] * r.num_images
            if r.enable_safety_checker:  # flagged images come back black, as diffusers' pipelines do
                pixels, nsfw = self.safety_checker()(pixels)
            results[slot.index] = LoraResult(
                pixels, nsfw, {}, debug=collect(slot, r.debug_latents, r.debug_per_pass_latents)
            )
        decoded = time.perf_counter()
        timings = {
            "encode": encoded - start,
            "denoise": denoised - encoded,
            "decode": decoded - denoised,
            "total": decoded - start,
        }
        for result in results.values():
            result.timings = dict(timings)
        return results

    def _slot(self, model: BaseModel, index: int, r: LoraRequest, h: int, w: int) -> GuidedSlot:
        """One request's prompt embeddings, its own scheduler and generator, and initial noise (k, C, h, w)."""
        if isinstance(model, XLBaseModel):  # both encoders, pooled embeds and time ids (ember.pipeline.lora_xl)
            return model.slot(index, r, h, w)
        device = model.unet.device
        do_cfg = uses_cfg(r.guidance_scale)
        prompts = [r.negative_prompt, r.prompt] if do_cfg else [r.prompt]
        emb = model.text.encode(prompts, r.clip_skip, r.prompt_weighting, r.embeddings).to(device)
        k = r.num_images
        embeddings = emb.repeat_interleave(k, dim=0)  # [neg x k; pos x k] or [pos x k]
        config = fal_scheduler_config(
            model.scheduler_config, r.scheduler, r.prediction_type, r.rescale_betas_zero_snr
        )
        scheduler = new_scheduler_with(
            config,
            r.num_inference_steps,
            list(r.timesteps) if r.timesteps else None,
            list(r.sigmas) if r.sigmas else None,
        )
        generator = torch.Generator("cpu").manual_seed(r.seed)
        latents = initial_latents(generator, k, model.latent_channels, h, w, scheduler.init_noise_sigma)
        return GuidedSlot(
            index=index,
            scheduler=scheduler,
            latents=latents.to(device),
            embeddings=embeddings,
            guidance_scale=r.guidance_scale,
            step_kwargs=step_kwargs(scheduler, generator, r.eta),
            is_cancelled=r.is_cancelled,
            passes=recorder(r.debug_per_pass_latents),
        )
