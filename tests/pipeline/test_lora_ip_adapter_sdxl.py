"""fal-ai/lora IP-Adapters on an SDXL base vs diffusers' StableDiffusionXLPipeline (load_ip_adapter +
set_ip_adapter_scale + ip_adapter_image, IPAdapterMaskProcessor masks) on the tiny SDXL base and tiny SDXL
IP-Adapters laid out as h94/IP-Adapter's sdxl_models (ember.specs.demo_ip_adapter; torch runtime): the plain
adapter (ImageProjection, ViT-bigG encoder) and the Plus one (Resampler, ViT-H encoder from another
subfolder), two images, no CFG with several images, scale_json with a mask, fal's
unconditional_noising_factor; the SDXL UNet's text_embeds / time_ids travel beside the image embeds. The
base UNet stays untouched (a plain request after IP requests is bit-identical), batches keep each result,
an SD1.5 adapter and a wrong image encoder are refused by name."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ember.pipeline.ip_adapter import IPAdapterRequest, IPAdapterUnit, parse_ip_adapter
from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.specs.demo_ip_adapter import (
    SUBFOLDER,
    WEIGHT_NAME,
    XL_PLUS_WEIGHT_NAME,
    XL_SUBFOLDER,
    XL_WEIGHT_NAME,
    build_tiny_ip_adapter,
    build_tiny_ip_adapter_sdxl,
)
from ember.specs.demo_sdxl import build_tiny_sdxl
from tests.pipeline.conftest import tiny_settings

SIZE, STEPS = 64, 3
PROMPT = {"prompt": "a red fox", "negative_prompt": "blurry", "guidance_scale": 5.0}
# weight file -> its image encoder directory (inside the adapter directory), as fal's image_encoder_subfolder
ENCODERS = {
    XL_WEIGHT_NAME: f"{XL_SUBFOLDER}/image_encoder",
    XL_PLUS_WEIGHT_NAME: f"{SUBFOLDER}/image_encoder",
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ip-xl")
    xl = build_tiny_sdxl(root / "tiny-sdxl-base")
    return xl, build_tiny_ip_adapter_sdxl(root / "tiny-ip-adapter", xl)


@pytest.fixture(scope="module")
def pipeline(dirs, tmp_path_factory: pytest.TempPathFactory) -> LoraText2ImagePipeline:
    settings = tiny_settings(
        tmp_path_factory.mktemp("var"), EMBER_RUNTIME="torch", EMBER_LORA_MODEL_ROOT=str(dirs[0].parent)
    )
    return LoraText2ImagePipeline(settings)


@pytest.fixture(scope="module")
def plain(pipeline, dirs) -> np.ndarray:
    """The request without IP-Adapter, run before any IP-Adapter request (seed 7)."""
    return _ours(pipeline, _request(dirs, None))[0]


def _reference(dirs, weight_name: str):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    xl, ip = dirs
    encoder = CLIPVisionModelWithProjection.from_pretrained(ip / ENCODERS[weight_name])
    size = encoder.config.image_size
    pipe = StableDiffusionXLPipeline.from_pretrained(
        xl,
        image_encoder=encoder,
        feature_extractor=CLIPImageProcessor(size=size, crop_size=size),
        add_watermarker=False,
        dtype=torch.float32,
    )
    pipe.load_ip_adapter(str(ip), subfolder=XL_SUBFOLDER, weight_name=weight_name, image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(dirs):
    return _reference(dirs, XL_WEIGHT_NAME)


def _images(seed: int, n: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)  # non-square, so the processor's resize and center crop both act
    return tuple(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(n))


def _mask() -> np.ndarray:
    mask = np.zeros((40, 56), dtype=np.uint8)  # the IP image's size, as fal asks; resized to the output
    mask[:, 28:] = 255  # the image prompt acts on the right half only
    return mask


def _weights(path: Path):
    from safetensors.torch import load_file

    return parse_ip_adapter(load_file(path), hashlib.sha256(path.read_bytes()).hexdigest())


def _ip(dirs, images, weight_name=XL_WEIGHT_NAME, mask=None, scale=1.0, scale_json=None) -> IPAdapterRequest:
    ip = dirs[1]
    unit = IPAdapterUnit(_weights(ip / XL_SUBFOLDER / weight_name), images, mask, scale, scale_json)
    return IPAdapterRequest((unit,), str(ip / ENCODERS[weight_name]))


def _request(dirs, ip: IPAdapterRequest | None, seed: int = 7, **kw) -> LoraRequest:
    return LoraRequest(
        model=ModelRef(str(dirs[0])),
        seed=seed,
        num_inference_steps=STEPS,
        ip_adapter=ip,
        **{"width": SIZE, "height": SIZE, **PROMPT, **kw},
    )


def _ours(pipeline, *requests: LoraRequest) -> list[np.ndarray]:
    results = pipeline(list(requests))
    for r in results:
        assert r.error is None, r.error
    return [r.images.numpy().astype(np.int16) for r in results]


def _theirs(pipe, images, scale=1.0, mask=None, seed: int = 7, width: int = SIZE, **kw) -> np.ndarray:
    from diffusers.image_processor import IPAdapterMaskProcessor

    pipe.set_ip_adapter_scale(scale)
    pil = [Image.fromarray(image) for image in images]
    if mask is not None:
        masks = IPAdapterMaskProcessor().preprocess([Image.fromarray(mask)], height=SIZE, width=width)
        kw["cross_attention_kwargs"] = {"ip_adapter_masks": [masks.expand(1, len(pil), -1, -1)]}
    image = pipe(
        **{**PROMPT, **kw},
        ip_adapter_image=[pil if len(pil) > 1 else pil[0]],
        height=SIZE,
        width=width,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images
    return (image * 255).round().astype(np.int16)


def _close(a: np.ndarray, b: np.ndarray, what: str) -> int:
    """Same weights, same maths: at most 1 uint8 level (float summation order); returns the max."""
    assert a.shape == b.shape
    diff = int(np.abs(a - b).max())
    print(f"sdxl ip-adapter {what}: max pixel difference {diff} (uint8 levels)")  # shown with -s
    assert diff <= 1, f"{what}: max pixel difference {diff}"
    return diff


def test_plain_adapter_matches_diffusers_and_steers(pipeline, reference, dirs, plain):
    one = _images(1, 1)
    (ours,) = _ours(pipeline, _request(dirs, _ip(dirs, one, scale=0.8)))
    _close(ours, _theirs(reference, one, scale=0.8), "plain, CFG")
    assert np.abs(ours - plain).max() > 8, "the image prompt must change the result"
    # no CFG (guidance 1: only the conditional image embeds) with two images per request
    ours_two = _ours(pipeline, _request(dirs, _ip(dirs, one), guidance_scale=1.0, num_images=2))[0]
    _close(ours_two, _theirs(reference, one, guidance_scale=1.0, num_images_per_prompt=2), "plain, no CFG")


def test_plus_adapter_with_its_vit_h_encoder_matches_diffusers(pipeline, dirs, plain):
    """ip-adapter-plus_sdxl_vit-h: the Resampler over the penultimate hidden states of the encoder in
    models/image_encoder (fal: image_encoder_subfolder), two images; unconditional = encoder(zero image)."""
    two = _images(2, 2)
    (ours,) = _ours(pipeline, _request(dirs, _ip(dirs, two, XL_PLUS_WEIGHT_NAME, scale=0.7)))
    _close(ours, _theirs(_reference(dirs, XL_PLUS_WEIGHT_NAME), two, scale=0.7), "plus, two images")
    assert np.abs(ours - plain).max() > 8, "the image prompt must change the result"


def test_scale_json_and_mask_match_diffusers(pipeline, reference, dirs):
    images, wide = _images(3, 1), 96  # a non-square output: the mask is resized to 96 x 64
    # the tiny SDXL UNet's down block 2 (1 attention) and up block 0 (2 attentions) carry the image
    per_block = {"down": {"block_2": [1.0]}, "up": {"block_0": [0.0, 2.0]}}
    ip = _ip(dirs, images, mask=_mask(), scale_json=json.dumps(per_block, sort_keys=True))
    (ours,) = _ours(pipeline, _request(dirs, ip, width=wide))
    _close(ours, _theirs(reference, images, scale=per_block, mask=_mask(), width=wide), "scale_json + mask")
    (unmasked,) = _ours(
        pipeline, _request(dirs, _ip(dirs, images, scale_json=ip.units[0].scale_json), width=wide)
    )
    assert np.abs(ours - unmasked).max() > 0, "the mask must change the result"


def test_unconditional_noising_factor_matches_fals_definition(pipeline, reference, dirs):
    """fal's unconditional_noising_factor f: the unconditional image embeds are the encoder's embeds of
    rand(pixel_values.shape) * f (ember.pipeline.ip_adapter cites fal's code); the noise is drawn from a
    generator seeded with the request's seed. The reference feeds diffusers those embeds directly."""
    from transformers import CLIPImageProcessor

    images, factor, seed = _images(8, 1), 0.5, 7
    ip = _ip(dirs, images)
    noised = dataclasses.replace(
        ip, units=(dataclasses.replace(ip.units[0], unconditional_noising_factor=factor),)
    )
    (ours,) = _ours(pipeline, _request(dirs, noised, seed=seed))
    encoder = reference.image_encoder
    size = encoder.config.image_size
    pixels = CLIPImageProcessor(size=size, crop_size=size)(
        images=[Image.fromarray(images[0])], return_tensors="pt"
    ).pixel_values
    with torch.no_grad():
        cond = encoder(pixels).image_embeds  # (1, P)
        blank = torch.rand(pixels.shape, generator=torch.Generator("cpu").manual_seed(seed)) * factor
        uncond = encoder(blank).image_embeds
    reference.set_ip_adapter_scale(1.0)
    theirs = reference(
        **PROMPT,
        ip_adapter_image_embeds=[torch.stack([uncond, cond])],  # (2, n, P): [uncond; cond] as CFG chunks it
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images
    _close(ours, (theirs * 255).round().astype(np.int16), "unconditional_noising_factor 0.5")
    (zeros,) = _ours(pipeline, _request(dirs, _ip(dirs, images), seed=seed))
    assert np.abs(ours - zeros).max() > 0, "the noised unconditional embeds must change the result"


def test_base_unet_unchanged_and_batches_keep_each_result(pipeline, dirs, plain):
    model = pipeline.model(ModelRef(str(dirs[0])))
    processors = {name: type(p) for name, p in model.unet.module.unet.attn_processors.items()}
    a, b = _ip(dirs, _images(5, 1)), _ip(dirs, _images(6, 1))
    single_a = _ours(pipeline, _request(dirs, a, seed=3))[0]
    single_b = _ours(pipeline, _request(dirs, b, seed=4))[0]
    # One call: two IP requests (one batch, different images), then a plain one (its own batch, run after)
    batch = _ours(pipeline, _request(dirs, a, seed=3), _request(dirs, None), _request(dirs, b, seed=4))
    _close(batch[0], single_a, "batched vs single")
    _close(batch[2], single_b, "batched vs single")
    # The request without IP-Adapter is bit-identical to the one run before any IP-Adapter was loaded
    assert np.array_equal(batch[1], plain)
    assert {name: type(p) for name, p in model.unet.module.unet.attn_processors.items()} == processors
    assert model.unet.module.unet.encoder_hid_proj is None


def test_sd15_adapter_and_wrong_encoder_are_refused_by_name(pipeline, dirs, tmp_path):
    from ember.specs.demo_lora import build_tiny_sd15

    sd15_ip = build_tiny_ip_adapter(tmp_path / "ip15", build_tiny_sd15(tmp_path / "sd15"))
    unit = IPAdapterUnit(_weights(sd15_ip / SUBFOLDER / WEIGHT_NAME), _images(7, 1))
    sd15_on_xl = IPAdapterRequest((unit,), str(sd15_ip / SUBFOLDER / "image_encoder"))
    # the Plus adapter takes ViT-H hidden states; the bigG encoder beside the plain adapter is the wrong one
    plus = _ip(dirs, _images(7, 1), XL_PLUS_WEIGHT_NAME)
    wrong_encoder = IPAdapterRequest(plus.units, str(dirs[1] / XL_SUBFOLDER / "image_encoder"))
    results = pipeline([_request(dirs, sd15_on_xl), _request(dirs, wrong_encoder), _request(dirs, None)])
    first, second, good = (r.error or "" for r in results)
    print(f"refused: {first}\nrefused: {second}")
    assert first.startswith("ip_adapter") and "SD1.5" in first and "SDXL" in first, first
    assert second.startswith("ip_adapter") and "image_encoder" in second, second
    assert good == ""


def test_ip_adapter_with_controlnet_matches_diffusers(tmp_path_factory: pytest.TempPathFactory):
    """IP-Adapter + an SDXL ControlNet in one request: the IP UNet then takes text_embeds / time_ids, the
    ControlNet's 10 SDXL residuals and the image embeds (vs StableDiffusionXLControlNetPipeline with
    load_ip_adapter), on the tiny SDXL with SDXL's real block layout (ControlNets need it)."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from ember.pipeline.lora_controlnets import ControlNetInput, ControlNetRef
    from ember.specs.demo_controlnet_xl import build_tiny_sdxl_controllable, build_tiny_xl_controlnet

    root = tmp_path_factory.mktemp("ip-cn-xl")
    base, cn = build_tiny_sdxl_controllable(root / "base"), build_tiny_xl_controlnet(root / "cn", seed=1)
    dirs = (base, build_tiny_ip_adapter_sdxl(root / "ip", base))
    pipeline = LoraText2ImagePipeline(
        tiny_settings(root / "var", EMBER_RUNTIME="torch", EMBER_LORA_MODEL_ROOT=str(root))
    )
    control = np.random.default_rng(8).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    images = _images(9, 1)
    request = _request(dirs, _ip(dirs, images, scale=0.7))
    unit = ControlNetInput(ControlNetRef(str(cn)), control, conditioning_scale=0.8)
    (ours,) = _ours(pipeline, dataclasses.replace(request, controlnets=(unit,)))
    (ip_only,) = _ours(pipeline, request)

    encoder = CLIPVisionModelWithProjection.from_pretrained(dirs[1] / ENCODERS[XL_WEIGHT_NAME])
    size = encoder.config.image_size
    pipe = StableDiffusionXLControlNetPipeline.from_pretrained(
        base,
        controlnet=ControlNetModel.from_pretrained(cn, dtype=torch.float32),
        image_encoder=encoder,
        feature_extractor=CLIPImageProcessor(size=size, crop_size=size),
        add_watermarker=False,
        dtype=torch.float32,
    )
    pipe.load_ip_adapter(
        str(dirs[1]), subfolder=XL_SUBFOLDER, weight_name=XL_WEIGHT_NAME, image_encoder_folder=None
    )
    pipe.set_progress_bar_config(disable=True)
    theirs = _theirs(
        pipe, images, scale=0.7, image=Image.fromarray(control), controlnet_conditioning_scale=0.8
    )
    _close(ours, theirs, "with an SDXL ControlNet")
    assert np.abs(ours - ip_only).mean() > 1, (
        "the ControlNet hardly changed the image: the test proves nothing"
    )
