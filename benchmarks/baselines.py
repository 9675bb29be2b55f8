"""The baseline of every benchmark run: diffusers' own pipeline for the endpoint, eager torch, on the same weights
and with the same resolved request (size, steps, guidance, scheduler) as ember's pipeline got.

`baseline(endpoint_id, settings, item)` -> (pipeline, call): `item` is the request exactly as the Triton model
parsed it (ember.pipeline.serving_models), so both sides do the same work; `call(seed)` runs one request.
The safety checker is off on both sides (presets turn it off: diffusers' Stable Cascade has none).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ember.settings import Settings

Call = Callable[[int], Any]


def _generator(seed: int) -> Any:
    import torch

    return torch.Generator("cpu").manual_seed(seed % 2**63)


def _common(item: Any, seed: int) -> dict[str, Any]:
    """The call arguments every text-to-image pipeline of diffusers shares, from the resolved request."""
    return {
        "num_inference_steps": item.num_inference_steps,
        "guidance_scale": item.guidance_scale,
        "width": item.width,
        "height": item.height,
        "generator": _generator(seed),
        "output_type": "np",
    }


def _dtype(settings: Settings) -> Any:
    import torch

    return torch.float16 if settings.device.startswith("cuda") else torch.float32


def _placed(pipe: Any, settings: Settings) -> Any:
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(settings.device) if settings.device.startswith("cuda") else pipe


def lcm(settings: Settings, item: Any) -> tuple[Any, Call]:
    from diffusers import LatentConsistencyModelPipeline

    if item.model != "sdv1-5" or item.mode != "text":
        raise ValueError("the lcm baseline is SD1.5 text-to-image (LatentConsistencyModelPipeline)")

    pipe = _placed(
        LatentConsistencyModelPipeline.from_pretrained(
            settings.model_source("lcm", item.model),
            safety_checker=None,
            requires_safety_checker=False,
            dtype=_dtype(settings),
        ),
        settings,
    )

    def call(seed: int) -> Any:
        return pipe(item.prompt, num_images_per_prompt=item.num_images, **_common(item, seed))

    return pipe, call


def lora(settings: Settings, item: Any) -> tuple[Any, Call]:
    """StableDiffusion(XL)Pipeline on the request's base model, with the scheduler fal's name picks."""
    import diffusers

    from ember.pipeline.schedulers import fal_scheduler_config

    source = item.model.source
    if item.model.unet is not None:
        raise ValueError("the lora baseline loads a base model whole: leave unet_name out of the preset")
    index = Path(source, "model_index.json")
    xl = index.is_file() and "XL" in index.read_text()
    cls = diffusers.StableDiffusionXLPipeline if xl else diffusers.StableDiffusionPipeline
    extra = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
    pipe = _placed(cls.from_pretrained(source, dtype=_dtype(settings), **extra), settings)
    config = fal_scheduler_config(
        dict(pipe.scheduler.config), item.scheduler, item.prediction_type, item.rescale_betas_zero_snr
    )
    pipe.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)

    def call(seed: int) -> Any:
        return pipe(
            item.prompt,
            negative_prompt=item.negative_prompt or None,
            num_images_per_prompt=item.num_images,
            clip_skip=item.clip_skip or None,
            eta=item.eta,
            **_common(item, seed),
        )

    return pipe, call


def pixart_sigma(settings: Settings, item: Any) -> tuple[Any, Call]:
    import diffusers

    from ember.pipeline.pixart_sigma import FAMILY, SCHEDULERS, VARIANT
    from ember.pipeline.pixart_styles import apply_style

    pipe = _placed(
        diffusers.PixArtSigmaPipeline.from_pretrained(
            settings.model_source(FAMILY, VARIANT), dtype=_dtype(settings)
        ),
        settings,
    )
    config = {**pipe.scheduler.config, **SCHEDULERS[item.scheduler]}
    pipe.scheduler = getattr(diffusers, config.get("_class_name", type(pipe.scheduler).__name__)).from_config(
        config
    )

    prompt, negative = apply_style(item.style, item.prompt, item.negative_prompt)

    def call(seed: int) -> Any:
        # ember's fixed choices (ember.pipeline.pixart_sigma): no binning, no caption cleaning, 300 tokens
        return pipe(
            prompt,
            negative_prompt=negative,
            num_images_per_prompt=item.num_images,
            clean_caption=False,
            use_resolution_binning=False,
            max_sequence_length=300,
            **_common(item, seed),
        )

    return pipe, call


def sote_diffusion(settings: Settings, item: Any) -> tuple[Any, Call]:
    """StableCascadePriorPipeline + StableCascadeDecoderPipeline sharing text encoder and scheduler, as
    StableCascadeCombinedPipeline runs them (built from components: see tests/pipeline/test_sote_parity.py)."""
    from diffusers import (
        DDPMWuerstchenScheduler,
        StableCascadeDecoderPipeline,
        StableCascadePriorPipeline,
        StableCascadeUNet,
    )
    from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    from ember.pipeline.stable_cascade import FAMILY, VARIANT

    source, dtype = settings.model_source(FAMILY, VARIANT), _dtype(settings)
    text_encoder = CLIPTextModelWithProjection.from_pretrained(source, subfolder="text_encoder", dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    scheduler = DDPMWuerstchenScheduler.from_pretrained(source, subfolder="scheduler")
    prior = _placed(
        StableCascadePriorPipeline(
            prior=StableCascadeUNet.from_pretrained(source, subfolder="prior", dtype=dtype),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
        ),
        settings,
    )
    decoder = _placed(
        StableCascadeDecoderPipeline(
            decoder=StableCascadeUNet.from_pretrained(source, subfolder="decoder", dtype=dtype),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler=scheduler,
            vqgan=PaellaVQModel.from_pretrained(source, subfolder="vqgan", dtype=dtype),
        ),
        settings,
    )

    def call(seed: int) -> Any:
        generator = _generator(seed)
        out = prior(
            item.prompt,
            negative_prompt=item.negative_prompt,
            height=item.height,
            width=item.width,
            num_inference_steps=item.num_inference_steps,
            guidance_scale=item.guidance_scale,
            num_images_per_prompt=item.num_images,
            generator=generator,
        )
        return decoder(
            image_embeddings=out.image_embeddings,
            prompt_embeds=out.prompt_embeds,
            prompt_embeds_pooled=out.prompt_embeds_pooled,
            negative_prompt_embeds=out.negative_prompt_embeds,
            negative_prompt_embeds_pooled=out.negative_prompt_embeds_pooled,
            num_inference_steps=item.second_stage_steps,
            guidance_scale=item.second_stage_guidance_scale,
            generator=generator,
            output_type="np",
        )

    return (prior, decoder), call


def illusion_diffusion(settings: Settings, item: Any) -> tuple[Any, Call]:
    """StableDiffusionControlNetPipeline (SD1.5 + QR-monster ControlNet) with fal's sampler."""
    from diffusers import (
        ControlNetModel,
        DPMSolverSDEScheduler,
        EulerDiscreteScheduler,
        StableDiffusionControlNetPipeline,
    )
    from PIL import Image

    dtype = _dtype(settings)
    pipe = _placed(
        StableDiffusionControlNetPipeline.from_pretrained(
            settings.model_source("illusion_diffusion", "sdv1-5"),
            controlnet=ControlNetModel.from_pretrained(
                settings.model_source("controlnet", "qrcode-monster-sd15"), dtype=dtype
            ),
            safety_checker=None,
            requires_safety_checker=False,
            dtype=dtype,
        ),
        settings,
    )
    base = dict(pipe.scheduler.config)
    control_image = Image.fromarray(item.control_image)

    def call(seed: int) -> Any:
        if item.scheduler == "Euler":
            pipe.scheduler = EulerDiscreteScheduler.from_config(base)
        else:  # fal's "DPM++ Karras SDE"; its Brownian tree seeded by the request's seed, as ember does
            pipe.scheduler = DPMSolverSDEScheduler.from_config(
                base, use_karras_sigmas=True, noise_sampler_seed=seed
            )
        return pipe(
            prompt=item.prompt,
            negative_prompt=item.negative_prompt,
            image=control_image,
            controlnet_conditioning_scale=item.controlnet_conditioning_scale,
            control_guidance_start=item.control_guidance_start,
            control_guidance_end=item.control_guidance_end,
            **_common(item, seed),
        )

    return pipe, call


BASELINES: dict[str, Callable[[Settings, Any], tuple[Any, Call]]] = {
    "fal-ai/lcm": lcm,
    "fal-ai/lora": lora,
    "fal-ai/pixart-sigma": pixart_sigma,
    "fal-ai/stable-cascade/sote-diffusion": sote_diffusion,
    "fal-ai/illusion-diffusion": illusion_diffusion,
}


def baseline(endpoint_id: str, settings: Settings, item: Any) -> tuple[Any, Call]:
    """diffusers' pipeline(s) for `endpoint_id` on the same weights, and one request's call."""
    return BASELINES[endpoint_id](settings, item)
