"""IC-Light through the fal-ai/lora pipeline vs the IC-Light project's own procedure (lllyasviel/IC-Light
gradio_demo.py "fc", gradio_demo_bg.py "fbc"), rebuilt here on diffusers' StableDiffusionPipeline: conv_in
widened with zeros, offsets added to every weight, the VAE-encoded foreground (+ background) concatenated
to the latents by a hooked UNet forward. Tiny random SD1.5 base and tiny random IC-Light offset files."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ember.pipeline.ic_light import IcLightInput
from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.specs.demo_lora import build_tiny_sd15
from tests.pipeline.conftest import tiny_settings

W, H, STEPS = 80, 64, 3


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("ic-light") / "tiny-sd15")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> LoraText2ImagePipeline:
    return LoraText2ImagePipeline(tiny_settings(tmp_path_factory.mktemp("var"), EMBER_RUNTIME="torch"))


def _offsets(sd15_dir: Path, channels: int, seed: int) -> bytes:
    """A tiny random IC-Light offset file in diffusers' UNet key names (as lllyasviel's files are)."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save

    unet = UNet2DConditionModel.from_pretrained(sd15_dir, subfolder="unet")
    generator = torch.Generator().manual_seed(seed)
    offsets = {}
    for key, value in unet.state_dict().items():
        shape = list(value.shape)
        if key == "conv_in.weight":
            shape[1] = channels
        offsets[key] = torch.randn(shape, generator=generator) * 0.05
    return save(offsets)


def _image(seed: int, size: tuple[int, int]) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def patch_reference(
    pipe, weights: bytes, fg: np.ndarray, bg: np.ndarray | None, width: int = W, height: int = H
):
    """IC-Light's gradio_demo.py on a diffusers pipeline (any with .unet and .vae): conv_in widened, the
    UNet's forward hooked to concatenate cross_attention_kwargs["concat_conds"], the offsets added; returns
    those concat_conds (1, 4 | 8, h, w) for `fg` (and `bg`) at width x height."""
    from safetensors.torch import load

    unet, vae = pipe.unet, pipe.vae
    sd_offset = load(weights)
    with torch.no_grad():  # "Change UNet"
        channels = sd_offset["conv_in.weight"].shape[1]
        new_conv_in = torch.nn.Conv2d(
            channels,
            unet.conv_in.out_channels,
            unet.conv_in.kernel_size,
            unet.conv_in.stride,
            unet.conv_in.padding,
        )
        new_conv_in.weight.zero_()
        new_conv_in.weight[:, :4, :, :].copy_(unet.conv_in.weight)
        new_conv_in.bias = unet.conv_in.bias
        unet.conv_in = new_conv_in
    original_forward = unet.forward

    def hooked_unet_forward(sample, timestep, encoder_hidden_states, **kwargs):
        c_concat = kwargs["cross_attention_kwargs"]["concat_conds"].to(sample)
        c_concat = torch.cat([c_concat] * (sample.shape[0] // c_concat.shape[0]), dim=0)
        kwargs["cross_attention_kwargs"] = {}
        return original_forward(
            torch.cat([sample, c_concat], dim=1), timestep, encoder_hidden_states, **kwargs
        )

    unet.forward = hooked_unet_forward
    sd_origin = unet.state_dict()
    unet.load_state_dict({k: sd_origin[k] + sd_offset[k] for k in sd_origin}, strict=True)

    def resize_and_center_crop(image, target_width, target_height):
        pil_image = Image.fromarray(image)
        scale_factor = max(target_width / pil_image.width, target_height / pil_image.height)
        resized = pil_image.resize(
            (round(pil_image.width * scale_factor), round(pil_image.height * scale_factor)), Image.LANCZOS
        )
        left, top = (resized.width - target_width) / 2, (resized.height - target_height) / 2
        return np.array(resized.crop((left, top, left + target_width, top + target_height)))

    def numpy2pytorch(imgs):
        return (torch.from_numpy(np.stack(imgs, axis=0)).float() / 127.0 - 1.0).movedim(-1, 1)

    images = [resize_and_center_crop(fg, width, height)] + (
        [resize_and_center_crop(bg, width, height)] if bg is not None else []
    )
    with torch.no_grad():
        concat_conds = vae.encode(numpy2pytorch(images)).latent_dist.mode() * vae.config.scaling_factor
    return torch.cat([c[None, ...] for c in concat_conds], dim=1)


def _reference(sd15_dir: Path, weights: bytes, fg: np.ndarray, bg: np.ndarray | None, scheduler, **kw):
    """IC-Light's procedure on diffusers (gradio_demo.py): returns the uint8 images (k, H, W, 3)."""
    import diffusers

    from ember.pipeline.schedulers import fal_scheduler_config

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        sd15_dir, safety_checker=None, requires_safety_checker=False, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    config = fal_scheduler_config(
        {**pipe.scheduler.config, "_class_name": type(pipe.scheduler).__name__}, scheduler
    )
    pipe.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    concat_conds = patch_reference(pipe, weights, fg, bg)
    out = pipe(
        height=H,
        width=W,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(kw.pop("seed")),
        output_type="np",
        cross_attention_kwargs={"concat_conds": concat_conds},
        **kw,
    ).images
    return (out * 255).round().astype(np.int16)


@pytest.mark.parametrize(
    ("channels", "scheduler", "num_images"),
    [(8, None, 2), (12, "DPM++ 2M SDE Karras", 1)],
    ids=["fc", "fbc"],
)
def test_ic_light_matches_the_ic_light_procedure(pipeline, sd15_dir, channels, scheduler, num_images) -> None:
    weights = _offsets(sd15_dir, channels, seed=channels)
    fg = _image(1, (80, 60))  # another size and aspect: resized and centre-cropped to W x H
    bg = _image(2, (40, 100)) if channels == 12 else None
    request = LoraRequest(
        model=ModelRef(str(sd15_dir)),
        prompt="a portrait, warm sunlight",
        negative_prompt="lowres",
        seed=4,
        width=W,
        height=H,
        num_inference_steps=STEPS,
        guidance_scale=4.0,
        num_images=num_images,
        scheduler=scheduler,
        ic_light=IcLightInput.of(weights, fg, bg),
    )
    plain = dataclasses.replace(request, ic_light=None)
    ours, base = pipeline([request, plain])
    assert ours.error is None, ours.error
    theirs = _reference(
        sd15_dir,
        weights,
        fg,
        bg,
        scheduler,
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        guidance_scale=request.guidance_scale,
        num_images_per_prompt=num_images,
        seed=request.seed,
    )
    got = ours.images.numpy().astype(np.int16)
    assert got.shape == theirs.shape == (num_images, H, W, 3)
    diff = np.abs(got - theirs).max()
    print(f"IC-Light {channels} channels vs the IC-Light procedure: max pixel difference {diff}")
    assert diff <= 1, f"max pixel difference {diff}"
    # The plain request of the same batch ran on the untouched base UNet.
    assert not np.array_equal(base.images.numpy(), ours.images.numpy())


def test_fc_and_fbc_files_need_the_matching_images(pipeline, sd15_dir) -> None:
    fc = _offsets(sd15_dir, 8, seed=1)
    fbc = _offsets(sd15_dir, 12, seed=2)
    base = {
        "model": ModelRef(str(sd15_dir)),
        "prompt": "x",
        "seed": 1,
        "width": W,
        "height": H,
        "num_inference_steps": 1,
    }
    fg, bg = _image(1, (H, W)), _image(2, (H, W))
    with_bg, without_bg = pipeline(
        [
            LoraRequest(**base, ic_light=IcLightInput.of(fc, fg, bg)),
            LoraRequest(**base, ic_light=IcLightInput.of(fbc, fg)),
        ]
    )
    assert "'fc'" in with_bg.error and "no background" in with_bg.error
    assert "'fbc'" in without_bg.error and "needs a background" in without_bg.error
    bad = io.BytesIO()
    from safetensors.torch import save

    bad.write(save({"conv_in.weight": torch.zeros(4, 5, 3, 3)}))
    (wrong,) = pipeline([LoraRequest(**base, ic_light=IcLightInput.of(bad.getvalue(), fg))])
    assert "8 (fc) or 12 (fbc)" in wrong.error


_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_FIXED_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _ldm_name(key: str, layers: int, up_with_attention: set[int]) -> str:
    """A diffusers UNet key in the original LDM layout (written here from the LDM UNet's structure, to feed
    the conversion an LDM-keyed file as ComfyUI/Forge ship IC-Light)."""
    for name, ldm in _FIXED_TO_LDM.items():
        if key.startswith(name + "."):
            return ldm + key[len(name) :]
    p = key.split(".")
    resnet = lambda rest: ".".join([_RESNET_TO_LDM.get(rest[0], rest[0]), *rest[1:]])
    if p[0] == "mid_block":
        if p[1] == "resnets":
            return f"middle_block.{2 * int(p[2])}." + resnet(p[3:])
        return "middle_block.1." + ".".join(p[3:])
    block, kind = int(p[1]), p[2]
    if p[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{1 + block * (layers + 1) + layers}.0.op." + ".".join(p[5:])
        index = 1 + block * (layers + 1) + int(p[3])
        return (
            f"input_blocks.{index}.0." + resnet(p[4:])
            if kind == "resnets"
            else f"input_blocks.{index}.1." + ".".join(p[4:])
        )
    if kind == "upsamplers":
        slot = 2 if block in up_with_attention else 1
        return f"output_blocks.{block * (layers + 1) + layers}.{slot}.conv." + ".".join(p[5:])
    index = block * (layers + 1) + int(p[3])  # up blocks hold layers + 1 resnets
    return (
        f"output_blocks.{index}.0." + resnet(p[4:])
        if kind == "resnets"
        else f"output_blocks.{index}.1." + ".".join(p[4:])
    )


def test_ldm_keyed_offsets_convert_to_the_same_weights(sd15_dir) -> None:
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load

    from ember.pipeline.ic_light import offsets_in_diffusers_keys

    config = dict(UNet2DConditionModel.load_config(sd15_dir, subfolder="unet"))
    offsets = load(_offsets(sd15_dir, 8, seed=3))
    up_with_attention = {i for i, t in enumerate(config["up_block_types"]) if "CrossAttn" in t}
    layers = config["layers_per_block"]
    ldm = {"diffusion_model." + _ldm_name(k, layers, up_with_attention): v for k, v in offsets.items()}
    assert "diffusion_model.input_blocks.0.0.weight" in ldm
    converted = offsets_in_diffusers_keys(ldm, config)
    assert sorted(converted) == sorted(offsets)
    assert all(torch.equal(converted[k], offsets[k]) for k in offsets)
    assert offsets_in_diffusers_keys(offsets, config) == offsets  # diffusers names: as they are
