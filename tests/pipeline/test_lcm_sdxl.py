"""fal-ai/lcm model="sdxl" vs the diffusers XL pipelines with LCMScheduler and the LCM UNet, on the tiny
SDXL stand-in (two CLIP encoders, "text_time" UNet with time_cond_proj_dim, SDXL-scaled VAE); the shared
SDXL stages (prompt encoding, negative / zero handling, time ids) vs diffusers' own; batching invariants;
the composite source assembly."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ember.pipeline import Text2ImageRequest
from ember.pipeline.lcm_xl import LcmXLPipeline
from ember.pipeline.sdxl import add_time_ids, check_added_conditions
from ember.settings import Settings
from ember.specs import Artifacts, ensure_artifacts, read_artifacts
from tests.pipeline.conftest import tiny_settings
from tests.pipeline.test_lcm_modes import picture, square_mask

IMAGE = picture(96, 128)  # (H, W, 3): multiples of 8, so diffusers keeps the size
MASK = square_mask(96, 128)


@pytest.fixture(scope="module")
def xl_artifacts(lcm_settings: Settings) -> Artifacts:
    return read_artifacts(ensure_artifacts(lcm_settings, "lcm", "sdxl", progress=False))


@pytest.fixture(scope="module")
def ort_xl(lcm_settings: Settings, xl_artifacts: Artifacts) -> LcmXLPipeline:
    return LcmXLPipeline.from_artifacts(lcm_settings, xl_artifacts)


@pytest.fixture(scope="module")
def torch_xl(var_dir: Path, xl_artifacts: Artifacts) -> LcmXLPipeline:
    settings = tiny_settings(var_dir, EMBER_RUNTIME="torch", EMBER_DEVICE="cpu", EMBER_DTYPE="float32")
    return LcmXLPipeline.from_artifacts(settings, xl_artifacts)


@pytest.fixture(scope="module")
def xl_components(xl_artifacts: Artifacts) -> dict:
    """The base pipeline's components with the LCM scheduler made from its config, as lcm-sdxl's model
    card does (`LCMScheduler.from_config(pipe.scheduler.config)`)."""
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(
        xl_artifacts.source, add_watermarker=False, dtype=torch.float32
    )
    return {**pipe.components, "scheduler": LCMScheduler.from_config(pipe.scheduler.config)}


def _reference(cls_name: str, components: dict):
    import diffusers

    pipe = getattr(diffusers, cls_name)(**components, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def diffusers_xl(xl_components):
    return _reference("StableDiffusionXLPipeline", xl_components)


@pytest.fixture(scope="module")
def diffusers_xl_img2img(xl_components):
    return _reference("StableDiffusionXLImg2ImgPipeline", xl_components)


@pytest.fixture(scope="module")
def diffusers_xl_inpaint(xl_components):
    return _reference("StableDiffusionXLInpaintPipeline", xl_components)


def _uint8(pil_images) -> np.ndarray:
    return np.stack([np.asarray(image) for image in pil_images])


def _diff(ours: torch.Tensor, theirs: np.ndarray) -> np.ndarray:
    assert tuple(ours.shape) == theirs.shape and ours.dtype == torch.uint8
    return np.abs(ours.numpy().astype(np.int16) - theirs.astype(np.int16))


def _seed(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def test_text_to_image_torch_matches_diffusers_exactly(torch_xl, diffusers_xl) -> None:
    """StableDiffusionXLPipeline + LCMScheduler + LCM UNet: both encoders' penultimate states, the pooled
    embedding, time ids, the guidance embedding as timestep_cond, no CFG; bit-identical (2 images)."""
    [result] = torch_xl(
        [
            Text2ImageRequest(
                prompt="an astronaut riding a horse",
                seed=7,
                width=128,
                height=96,
                guidance_scale=6.0,
                num_images=2,
                model="sdxl",
            )
        ]
    )
    want = diffusers_xl(
        "an astronaut riding a horse",
        width=128,
        height=96,
        num_inference_steps=4,
        guidance_scale=6.0,
        num_images_per_prompt=2,
        generator=_seed(7),
    ).images
    assert _diff(result.images, _uint8(want)).max() == 0
    assert not np.array_equal(_uint8(want)[0], _uint8(want)[1])


@pytest.mark.parametrize(("strength", "steps"), [(0.6, 4), (1.0, 3)])
def test_img2img_torch_matches_diffusers_exactly(torch_xl, diffusers_xl_img2img, strength, steps) -> None:
    """StableDiffusionXLImg2ImgPipeline: timesteps cut by strength (get_timesteps: int(4 x 0.6) = 2 steps),
    the encoder sample and noise from the same generator, time ids of the image size; bit-identical."""
    [result] = torch_xl(
        [
            Text2ImageRequest(
                prompt="a watercolor landscape",
                seed=5,
                width=None,
                height=None,
                image=IMAGE,
                strength=strength,
                num_inference_steps=steps,
                guidance_scale=3.0,
                model="sdxl",
            )
        ]
    )
    want = diffusers_xl_img2img(
        "a watercolor landscape",
        image=torch_xl.preprocess.image_tensor(IMAGE, 128, 96),
        strength=strength,
        num_inference_steps=steps,
        guidance_scale=3.0,
        generator=_seed(5),
    ).images
    assert _diff(result.images, _uint8(want)).max() == 0
    assert result.images.shape == (1, 96, 128, 3)


@pytest.mark.parametrize("strength", [0.8, 1.0])
def test_inpaint_torch_matches_diffusers_exactly(torch_xl, diffusers_xl_inpaint, strength) -> None:
    """StableDiffusionXLInpaintPipeline with the 4-channel LCM UNet: known region re-imposed every step,
    the masked-image draw, pure noise at strength 1; bit-identical."""
    [result] = torch_xl(
        [
            Text2ImageRequest(
                prompt="a red door",
                seed=9,
                width=128,
                height=96,
                image=IMAGE,
                mask=MASK,
                strength=strength,
                num_inference_steps=4,
                guidance_scale=2.0,
                model="sdxl",
            )
        ]
    )
    want = diffusers_xl_inpaint(
        "a red door",
        image=torch_xl.preprocess.image_tensor(IMAGE, 128, 96),
        mask_image=Image.fromarray(MASK),
        height=96,
        width=128,
        strength=strength,
        num_inference_steps=4,
        guidance_scale=2.0,
        generator=_seed(9),
    ).images
    assert _diff(result.images, _uint8(want)).max() == 0


def test_onnxruntime_matches_diffusers_in_every_mode(
    ort_xl, diffusers_xl, diffusers_xl_img2img, diffusers_xl_inpaint
) -> None:
    """ONNX Runtime vs diffusers in torch, all three modes in one call: within 2 levels and < 1 % of values
    off (exported networks differ from torch by ~1e-6; a pixel near a rounding boundary flips by 1).
    Measured: at most 1 level."""
    text = Text2ImageRequest(prompt="a hut", seed=3, width=128, height=128, guidance_scale=4.0, model="sdxl")
    image = dataclasses.replace(text, width=None, height=None, image=IMAGE, strength=0.7)
    inpaint = dataclasses.replace(image, mask=MASK)
    ours = ort_xl([text, image, inpaint])
    wants = [
        diffusers_xl(
            "a hut", width=128, height=128, num_inference_steps=4, guidance_scale=4.0, generator=_seed(3)
        ).images,
        diffusers_xl_img2img(
            "a hut",
            image=Image.fromarray(IMAGE),
            strength=0.7,
            num_inference_steps=4,
            guidance_scale=4.0,
            generator=_seed(3),
        ).images,
        diffusers_xl_inpaint(
            "a hut",
            image=Image.fromarray(IMAGE),
            mask_image=Image.fromarray(MASK),
            height=96,
            width=128,
            strength=0.7,
            num_inference_steps=4,
            guidance_scale=4.0,
            generator=_seed(3),
        ).images,
    ]
    for result, want in zip(ours, wants, strict=True):
        diff = _diff(result.images, _uint8(want))
        assert diff.max() <= 2 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_batch_of_n_equals_n_singles(ort_xl) -> None:
    """Mixed prompts, guidance, sizes and modes through one call give each request its single result."""
    requests = [
        Text2ImageRequest(prompt="a boat", seed=1, width=128, height=96, guidance_scale=1.0, model="sdxl"),
        Text2ImageRequest(
            prompt="a hill", seed=2, width=128, height=96, guidance_scale=7.0, num_images=2, model="sdxl"
        ),
        Text2ImageRequest(prompt="a boat", seed=3, width=64, height=64, model="sdxl"),  # another size
        Text2ImageRequest(
            prompt="a boat", seed=4, width=128, height=96, image=IMAGE, strength=0.5, model="sdxl"
        ),
        Text2ImageRequest(
            prompt="a hill",
            seed=5,
            width=128,
            height=96,
            image=IMAGE,
            mask=MASK,
            strength=0.5,
            inpaint_mask_only=True,
            model="sdxl",
        ),
    ]
    # text 128x96 (x2) | text 64 | image + inpaint both walk int(4 x 0.5) = 2 steps, but differ in mode
    assert len({ort_xl.batch_key(r) for r in requests}) == 4
    batched = ort_xl(requests)
    for req, together in zip(requests, batched, strict=True):
        [alone] = ort_xl([req])
        assert together.images.shape == alone.images.shape
        assert (together.images.int() - alone.images.int()).abs().max().item() <= 1


def test_prompt_stages_match_diffusers_encode_prompt(torch_xl, diffusers_xl) -> None:
    """XLTextEncoders vs diffusers' encode_prompt with CFG on: prompt embeddings and pooled, a given
    negative prompt encoded, and a None negative prompt zeroed by force_zeros_for_empty_prompt."""
    encoders = torch_xl.encoders
    ours = encoders.encode(["a photo of a cat"])
    for negative in ("blurry, low resolution", None):
        embeds, neg, pooled, neg_pooled = diffusers_xl.encode_prompt(
            "a photo of a cat",
            device=torch.device("cpu"),
            do_classifier_free_guidance=True,
            negative_prompt=negative,
        )
        ours_neg = encoders.encode_negative([negative], ours, force_zeros_for_empty_prompt=True)
        assert torch.equal(ours.embeddings, embeds) and torch.equal(ours.pooled, pooled)
        assert torch.equal(ours_neg.embeddings, neg) and torch.equal(ours_neg.pooled, neg_pooled)
    assert not neg.any()  # the None case: zeros
    # Without force_zeros a None negative prompt is the empty prompt, encoded.
    empty = encoders.encode_negative([None], ours, force_zeros_for_empty_prompt=False)
    assert torch.equal(empty.embeddings, encoders.encode([""]).embeddings)


def test_time_ids_match_diffusers(diffusers_xl, xl_artifacts) -> None:
    pooled_dim = xl_artifacts.config("text_encoder_2")["projection_dim"]
    want = diffusers_xl._get_add_time_ids((96, 128), (0, 0), (96, 128), torch.float32, pooled_dim)
    assert torch.equal(add_time_ids((96, 128), (96, 128)), want)
    assert add_time_ids((1024, 1024), (1024, 1024), aesthetic_score=6.0).tolist() == [[1024, 1024, 0, 0, 6.0]]
    with pytest.raises(ValueError, match="do not belong together"):
        check_added_conditions(xl_artifacts.config("unet"), pooled_dim + 1)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strength": 0.2}, "leaves no denoising step"),
        ({"mask": None, "strength": 0.2}, "leaves no denoising step"),
        ({"model": "sdv1-5"}, "is not loaded here"),
        ({"enable_safety_checks": True}, "no safety checker is loaded"),
    ],
)
def test_bad_inputs_are_refused_with_a_reason(ort_xl, changes, message) -> None:
    req = dataclasses.replace(
        Text2ImageRequest(prompt="x", seed=0, width=None, height=None, image=IMAGE, mask=MASK, model="sdxl"),
        **changes,
    )
    assert any(message in p for p in ort_xl.problems(req)), ort_xl.problems(req)


def test_composite_source_is_assembled_from_component_repositories(tmp_path: Path, xl_artifacts) -> None:
    """models.toml `components` (real weights): the base's entries linked, the named components taken
    from their own repositories' roots; a changed entry re-assembles. Local directories stand in for hub
    repositories (same code path after the snapshot download)."""
    from ember.settings import load_settings

    base = Path(xl_artifacts.source)
    unet_repo, vae_repo = base / "unet", base / "vae"  # component repositories: config.json at the root
    models = tmp_path / "models.toml"
    models.write_text(
        f'[lcm.sdxl]\nsource = "{base}"\ndemo = "unused"\n'
        f'components = {{ unet = "{unet_repo}", vae = "{vae_repo}" }}\n'
    )
    settings = load_settings(
        {"EMBER_VAR_DIR": str(tmp_path / "var"), "EMBER_WEIGHTS": "real", "EMBER_MODELS_FILE": str(models)},
        dotenv=Path("/nonexistent"),
    )
    from ember.specs.composite import assemble, is_assembled

    entry = settings.model_entry("lcm", "sdxl")
    directory = Path(settings.model_source("lcm", "sdxl"))
    assert directory == (tmp_path / "var" / "models" / "composite" / "lcm-sdxl").resolve()
    assert not is_assembled(directory, entry)
    assemble(directory, entry)
    assert is_assembled(directory, entry)
    assert (directory / "unet").resolve() == unet_repo.resolve()
    assert (directory / "text_encoder_2").resolve() == (base / "text_encoder_2").resolve()
    assert (
        json.loads((directory / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    )
    from diffusers import UNet2DConditionModel

    assert UNet2DConditionModel.from_pretrained(directory, subfolder="unet").config.time_cond_proj_dim == 256
    with pytest.raises(ValueError, match="not components of"):
        assemble(directory, {**entry, "components": {"controlnet": str(unet_repo)}})


def test_lcm_models_route_by_model_and_load_sdxl_on_first_use(ort_pipeline, ort_xl) -> None:
    """The Triton model's router: SD1.5 resident, SDXL loaded by its first request (once), a mixed list
    answered in order with each model's own result; unknown and failing models answer with a reason."""
    from ember.pipeline.lcm_models import LcmModels

    loads: list[str] = []

    def load_sdxl():
        loads.append("sdxl")
        return ort_xl

    models = LcmModels(ort_pipeline, {"sdxl": load_sdxl})
    sd15 = Text2ImageRequest(prompt="a boat", seed=1, width=64, height=64)
    xl = dataclasses.replace(sd15, model="sdxl")
    assert models.problems(sd15) == [] and loads == []  # SD1.5 never touches SDXL
    assert models.problems(xl) == [] and loads == ["sdxl"]
    steps: list[tuple[int, int, int]] = []
    mixed = models([xl, sd15, dataclasses.replace(xl, seed=2)], lambda i, s, n: steps.append((i, s, n)))
    assert loads == ["sdxl"]
    singles = [*ort_xl([xl]), *ort_pipeline([sd15]), *ort_xl([dataclasses.replace(xl, seed=2)])]
    for got, want in zip(mixed, singles, strict=True):
        assert torch.equal(got.images, want.images)
    assert sorted(steps) == sorted((i, s, 4) for i in range(3) for s in range(1, 5))
    assert "is not served here" in models.problems(dataclasses.replace(sd15, model="sd3"))[-1]

    def broken():
        raise FileNotFoundError("no unet")

    failing = LcmModels(ort_pipeline, {"sdxl": broken})
    assert failing.problems(xl) == [
        "model 'sdxl' could not be loaded on this server: FileNotFoundError: no unet"
    ]
    assert failing.safety_checker is ort_pipeline.safety_checker  # the resident's attributes pass through
