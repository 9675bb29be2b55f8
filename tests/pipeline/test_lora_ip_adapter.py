"""fal-ai/lora IP-Adapters vs diffusers' StableDiffusionPipeline (load_ip_adapter + set_ip_adapter_scale +
ip_adapter_image, IPAdapterMaskProcessor masks) on a tiny SD1.5 model and a tiny random IP-Adapter with its
CLIP vision encoder (torch runtime): one image, two images, scale and scale_json, a mask; the base UNet
stays untouched for requests without IP-Adapter; batching keeps each request's result."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ember.pipeline.ip_adapter import IPAdapterRequest, IPAdapterUnit, parse_ip_adapter
from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.specs.demo_ip_adapter import SUBFOLDER, WEIGHT_NAME, build_tiny_ip_adapter
from ember.specs.demo_lora import build_tiny_sd15
from tests.pipeline.conftest import tiny_settings

SIZE, STEPS = 64, 3
PROMPT = {"prompt": "a red fox", "negative_prompt": "blurry", "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ip")
    sd15 = build_tiny_sd15(root / "tiny-sd15")
    return sd15, build_tiny_ip_adapter(root / "tiny-ip-adapter", sd15)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> LoraText2ImagePipeline:
    return LoraText2ImagePipeline(tiny_settings(tmp_path_factory.mktemp("var"), EMBER_RUNTIME="torch"))


@pytest.fixture(scope="module")
def plain(pipeline, dirs) -> np.ndarray:
    """The request without IP-Adapter, run before any IP-Adapter request (seed 7)."""
    return _ours(pipeline, _request(dirs, None))[0]


@pytest.fixture(scope="module")
def reference(dirs):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    sd15, ip = dirs
    encoder_dir = ip / SUBFOLDER / "image_encoder"
    encoder = CLIPVisionModelWithProjection.from_pretrained(encoder_dir)
    size = encoder.config.image_size
    pipe = StableDiffusionPipeline.from_pretrained(
        sd15,
        image_encoder=encoder,
        feature_extractor=CLIPImageProcessor(size=size, crop_size=size),
        safety_checker=None,
        requires_safety_checker=False,
        dtype=torch.float32,
    )
    pipe.load_ip_adapter(str(ip), subfolder=SUBFOLDER, weight_name=WEIGHT_NAME, image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(seed: int, n: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)  # non-square, so the processor's resize and center crop both act
    return tuple(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(n))


def _mask() -> np.ndarray:
    mask = np.zeros((40, 56), dtype=np.uint8)  # the IP image's size, as fal asks; resized to the output
    mask[:, :28] = 255  # the image prompt acts on the left half only
    return mask


def _ip(dirs, images, mask=None, scale=1.0, scale_json=None) -> IPAdapterRequest:
    from safetensors.torch import load_file

    ip = dirs[1]
    file = ip / SUBFOLDER / WEIGHT_NAME
    weights = parse_ip_adapter(load_file(file), hashlib.sha256(file.read_bytes()).hexdigest())
    unit = IPAdapterUnit(weights, images, mask, scale, scale_json)
    return IPAdapterRequest((unit,), str(ip / SUBFOLDER / "image_encoder"))


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


def _theirs(pipe, images, scale=1.0, mask=None, seed: int = 7, width: int = SIZE) -> np.ndarray:
    from diffusers.image_processor import IPAdapterMaskProcessor

    pipe.set_ip_adapter_scale(scale)
    pil = [Image.fromarray(image) for image in images]
    kwargs = {}
    if mask is not None:
        masks = IPAdapterMaskProcessor().preprocess([Image.fromarray(mask)], height=SIZE, width=width)
        kwargs["cross_attention_kwargs"] = {"ip_adapter_masks": [masks.expand(1, len(pil), -1, -1)]}
    image = pipe(
        **PROMPT,
        ip_adapter_image=[pil if len(pil) > 1 else pil[0]],
        height=SIZE,
        width=width,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **kwargs,
    ).images
    return (image * 255).round().astype(np.int16)


def _close(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    diff = int(np.abs(a - b).max())
    print(f"max pixel difference {diff} (uint8 levels)")  # shown with -s: the measured parity
    assert diff <= 1, f"max pixel difference {diff}"
    return diff


def test_one_and_two_images_and_scale_match_diffusers(pipeline, reference, dirs, plain):
    one, two = _images(1, 1), _images(2, 2)
    (ours_one,) = _ours(pipeline, _request(dirs, _ip(dirs, one)))
    _close(ours_one, _theirs(reference, one))
    assert np.abs(ours_one - plain).max() > 8, "the image prompt must change the result"
    (ours_two,) = _ours(pipeline, _request(dirs, _ip(dirs, two, scale=0.6)))
    _close(ours_two, _theirs(reference, two, scale=0.6))


def test_scale_json_matches_diffusers_per_block_scales(pipeline, reference, dirs):
    images = _images(3, 1)
    # diffusers' InstantStyle config: the tiny UNet's down block 1 (1 layer) and up block 2 (2 layers)
    per_block = {"down": {"block_1": [1.0]}, "up": {"block_2": [0.0, 2.0]}}
    import json

    (ours,) = _ours(
        pipeline, _request(dirs, _ip(dirs, images, scale_json=json.dumps(per_block, sort_keys=True)))
    )
    _close(ours, _theirs(reference, images, scale=per_block))


def test_mask_matches_diffusers(pipeline, reference, dirs):
    images, wide = _images(4, 1), 96  # a non-square output: the mask is resized to 96 x 64
    (ours,) = _ours(pipeline, _request(dirs, _ip(dirs, images, mask=_mask()), width=wide))
    _close(ours, _theirs(reference, images, mask=_mask(), width=wide))
    (unmasked,) = _ours(pipeline, _request(dirs, _ip(dirs, images), width=wide))
    assert np.abs(ours - unmasked).max() > 0, "the mask must change the result"


def test_base_unet_unchanged_and_batches_keep_each_result(pipeline, dirs, plain):
    model = pipeline.model(ModelRef(str(dirs[0])))
    processors = {name: type(p) for name, p in model.unet.module.unet.attn_processors.items()}
    a, b = _ip(dirs, _images(5, 1)), _ip(dirs, _images(6, 1))
    single_a = _ours(pipeline, _request(dirs, a, seed=3))[0]
    single_b = _ours(pipeline, _request(dirs, b, seed=4))[0]
    # One call: two IP requests (one batch, different images), then a plain one (its own batch, run after)
    batch = _ours(pipeline, _request(dirs, a, seed=3), _request(dirs, None), _request(dirs, b, seed=4))
    _close(batch[0], single_a)
    _close(batch[2], single_b)
    # The request without IP-Adapter is bit-identical to the one run before any IP-Adapter was loaded
    assert np.array_equal(batch[1], plain)
    assert {name: type(p) for name, p in model.unet.module.unet.attn_processors.items()} == processors
    assert model.unet.module.unet.encoder_hid_proj is None


def test_faceid_weights_recognised_and_bad_scale_json_fails_only_its_request(pipeline, dirs):
    # FaceID weights parse as FaceID (served: tests/pipeline/test_lora_ip_adapter_faceid.py)
    faceid = {"image_proj.norm.weight": torch.ones(4), "ip_adapter.1.to_k_ip.weight": torch.ones(4, 4)}
    assert parse_ip_adapter(faceid, "x").face == "faceid"
    with pytest.raises(ValueError, match="not an IP-Adapter"):
        parse_ip_adapter({"image_proj.norm.weight": torch.ones(4)}, "y")
    bad = _ip(dirs, _images(7, 1), scale_json='{"sideways": 1.0}')
    good = _request(dirs, None)
    results = pipeline([_request(dirs, bad), good])
    assert results[0].error is not None and "ip_adapter" in results[0].error
    assert results[1].error is None


def test_ip_adapter_with_controlnet_matches_diffusers(pipeline, tmp_path_factory: pytest.TempPathFactory):
    """IP-Adapter + ControlNet in one request: the IP UNet then also takes the ControlNet residuals."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from ember.pipeline.lora_controlnets import ControlNetInput, ControlNetRef
    from ember.specs.demo_controlnet import build_tiny_controlnet, build_tiny_sd15_base

    root = tmp_path_factory.mktemp("ip-cn")
    base, cn = build_tiny_sd15_base(root / "base"), build_tiny_controlnet(root / "cn", seed=1)
    ip_dir = build_tiny_ip_adapter(root / "ip", base)
    dirs = (base, ip_dir)
    control = np.random.default_rng(8).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    images = _images(9, 1)
    request = _request(dirs, _ip(dirs, images, scale=0.7))
    request = dataclasses.replace(request, controlnets=(ControlNetInput(ControlNetRef(str(cn)), control),))
    (ours,) = _ours(pipeline, request)

    encoder = CLIPVisionModelWithProjection.from_pretrained(ip_dir / SUBFOLDER / "image_encoder")
    size = encoder.config.image_size
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        base,
        controlnet=ControlNetModel.from_pretrained(cn, dtype=torch.float32),
        image_encoder=encoder,
        feature_extractor=CLIPImageProcessor(size=size, crop_size=size),
        safety_checker=None,
        requires_safety_checker=False,
        dtype=torch.float32,
    )
    pipe.load_ip_adapter(str(ip_dir), subfolder=SUBFOLDER, weight_name=WEIGHT_NAME, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(0.7)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(
        **PROMPT,
        image=Image.fromarray(control),
        ip_adapter_image=Image.fromarray(images[0]),
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images
    _close(ours, (theirs * 255).round().astype(np.int16))
