"""The five endpoint models as Triton serves them, built by name: what each `model.py` loads at initialize.

`model_repository/<name>/1/model.py` is `endpoint_model(name, settings)` plus the shared execute loop
(ember.pipeline.triton_serving). Anything that wants exactly what Triton runs, without Triton (the benchmark's
in-process path, tests), builds it here too: same parse, same checks, same pipeline, same defaults.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from ember.pipeline.triton_serving import EndpointModel
from ember.settings import Settings


def _lcm(settings: Settings) -> EndpointModel:
    from ember.pipeline import load_lcm_pipeline
    from ember.pipeline.lcm_io import (
        INPUT_NAMES,
        LcmDefaults,
        parse_lcm_request,
        progress_arrays,
        result_arrays,
    )
    from ember.pipeline.lcm_models import LcmModels
    from ember.pipeline.lora_io import LoraFiles

    variant = "sdv1-5"
    pipeline = load_lcm_pipeline(settings, variant=variant)
    width, height = settings.model_entry("lcm", variant).get("default_size", (512, 512))
    defaults = LcmDefaults(width=int(width), height=int(height))
    # The realtime path (512 x 512, 4 steps) must not pay first-call set-up: run it once now.
    pipeline.warmup(defaults.width, defaults.height, defaults.num_inference_steps)
    # MODEL "sdxl": loaded on its first request, then resident; sdv1-5 requests never wait for it
    models = LcmModels.with_lazy_sdxl(settings, pipeline)
    return EndpointModel(
        name="lcm",
        input_names=INPUT_NAMES,
        # lora_url files are parsed once per distinct content (LoraFiles)
        parse=functools.partial(parse_lcm_request, lora_files=LoraFiles()),
        check=models.problems,
        pipeline=models,
        progress_arrays=progress_arrays,
        result_arrays=result_arrays,
        defaults=defaults,
        result_note=_lcm_note,
    )


def _lcm_note(result: Any) -> str | None:
    # Logged, not sent: Triton 2.51's Python stub cannot attach response parameters, and the gateway
    # knows the same fact from its own input (LCM never uses a negative_prompt).
    if result.negative_prompt_ignored:
        return "negative_prompt ignored (LCM distils guidance; diffusers ignores it too)"
    return None


def _lora(settings: Settings) -> EndpointModel:
    from ember.pipeline.lora import LoraText2ImagePipeline, check_request
    from ember.pipeline.lora_io import INPUT_NAMES, LoraFiles, log_arrays, progress_arrays, result_arrays

    # Nothing is loaded here: base models are named per request and load on first use.
    return EndpointModel(
        name="lora",
        input_names=INPUT_NAMES,
        # LoRA files are parsed once per distinct content (LoraFiles)
        parse=functools.partial(_parse_lora, model_root=settings.lora_models_dir, lora_files=LoraFiles()),
        check=check_request,
        pipeline=LoraText2ImagePipeline(settings),
        progress_arrays=progress_arrays,
        result_arrays=result_arrays,
        defaults=None,
        log_arrays=log_arrays,
    )


def _parse_lora(
    arrays: dict, defaults: None, is_cancelled: Callable[[], bool], *, model_root, lora_files
) -> Any:
    from ember.pipeline.lora_io import parse_lora_request

    return parse_lora_request(arrays, model_root, lora_files, is_cancelled)


def _pixart_sigma(settings: Settings) -> EndpointModel:
    from ember.pipeline.pixart_io import (
        INPUT_NAMES,
        PixArtDefaults,
        parse_pixart_request,
        progress_arrays,
        result_arrays,
    )
    from ember.pipeline.pixart_sigma import FAMILY, VARIANT, check_request, load_pixart_sigma_pipeline

    width, height = settings.model_entry(FAMILY, VARIANT).get("default_size", (1024, 1024))
    return EndpointModel(
        name="pixart_sigma",
        input_names=INPUT_NAMES,
        parse=parse_pixart_request,
        check=check_request,
        pipeline=load_pixart_sigma_pipeline(settings),
        progress_arrays=progress_arrays,
        result_arrays=result_arrays,
        defaults=PixArtDefaults(width=int(width), height=int(height)),
    )


def _sote_diffusion(settings: Settings) -> EndpointModel:
    from ember.pipeline.sote_io import INPUT_NAMES, parse_sote_request, progress_arrays, result_arrays
    from ember.pipeline.stable_cascade import (
        FAMILY,
        VARIANT,
        CascadeRequest,
        check_request,
        load_stable_cascade_pipeline,
    )

    width, height = settings.model_entry(FAMILY, VARIANT).get("default_size", (1024, 1536))
    return EndpointModel(
        name="sote_diffusion",
        input_names=INPUT_NAMES,
        parse=parse_sote_request,
        check=check_request,
        pipeline=load_stable_cascade_pipeline(settings),
        progress_arrays=progress_arrays,
        result_arrays=result_arrays,
        defaults=dataclasses.replace(CascadeRequest(prompt="", seed=0), width=int(width), height=int(height)),
    )


def _illusion_diffusion(settings: Settings) -> EndpointModel:
    from ember.pipeline.illusion_diffusion import check_request, load_illusion_pipeline
    from ember.pipeline.illusion_io import (
        INPUT_NAMES,
        IllusionDefaults,
        parse_illusion_request,
        result_arrays,
    )
    from ember.pipeline.lcm_io import progress_arrays

    width, height = settings.model_entry("illusion_diffusion", "sdv1-5").get("default_size", (1024, 1024))
    return EndpointModel(
        name="illusion_diffusion",
        input_names=INPUT_NAMES,
        parse=parse_illusion_request,
        check=check_request,
        pipeline=load_illusion_pipeline(settings),
        progress_arrays=progress_arrays,
        result_arrays=result_arrays,
        defaults=IllusionDefaults(width=int(width), height=int(height)),
    )


BUILDERS: dict[str, Callable[[Settings], EndpointModel]] = {
    "lcm": _lcm,
    "lora": _lora,
    "pixart_sigma": _pixart_sigma,
    "sote_diffusion": _sote_diffusion,
    "illusion_diffusion": _illusion_diffusion,
}


def endpoint_model(name: str, settings: Settings) -> EndpointModel:
    """The Triton model `name` (model_repository/<name>) as its model.py builds it: loads its pipeline."""
    try:
        build = BUILDERS[name]
    except KeyError:
        raise ValueError(f"no endpoint model {name!r}; known: {sorted(BUILDERS)}") from None
    return dataclasses.replace(build(settings), progress_every_s=settings.progress_interval_ms / 1000)
