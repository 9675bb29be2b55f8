"""InstantID on fal-ai/lora (`controlnets[i].ip_adapter_index`, ember.pipeline.instantid): a tiny SDXL base
with SDXL's block layout, a tiny SDXL ControlNet as IdentityNet, a tiny InstantID-style adapter (IP-Adapter
Plus's Resampler with a 512-wide proj_in, fed the face embedding) and the tiny InsightFace pack, vs a
hand-written denoising loop with diffusers' modules: the UNet with the adapter loaded by load_ip_adapter,
the ControlNetModel called with encoder_hidden_states = the adapter's projected face tokens (InstantID's
pipeline: zeros then the face embedding, projected), StableDiffusionXLPipeline.encode_prompt for the text,
the same scheduler and seed. Also: the prompt-conditioned ControlNet gives another image, and a bad index
fails that request naming controlnets[i].ip_adapter_index."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ember.pipeline.face_analysis import FaceAnalysis
from ember.pipeline.ip_adapter import IPAdapterRequest, IPAdapterUnit, parse_ip_adapter
from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.pipeline.lora_controlnets import ControlNetInput, ControlNetRef
from ember.specs.demo_controlnet_xl import build_tiny_sdxl_controllable, build_tiny_xl_controlnet
from ember.specs.demo_face_id import build_tiny_insightface
from ember.specs.demo_ip_adapter import ip_adapter_plus_state_dict
from tests.pipeline.conftest import tiny_settings
from tests.pipeline.test_lora_controlnets import rings
from tests.pipeline.test_lora_ip_adapter_faceid import _face

WIDTH, HEIGHT, STEPS, GUIDANCE, SEED = 64, 64, 3, 5.0, 7
PROMPT, NEGATIVE = "a portrait", "blurry"
SCALE, CN_SCALE = 0.8, 0.9
WEIGHT_NAME = "ip-adapter.safetensors"  # InstantX/InstantID's ip-adapter.bin, as safetensors


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("instantid")
    base = build_tiny_sdxl_controllable(root / "base")
    unet_config = json.loads((base / "unet" / "config.json").read_text(encoding="utf-8"))
    adapter = root / "instantid"
    adapter.mkdir()
    # InstantID's layout: the Plus Resampler over one 512-d face token (real: 1280 wide, 16 queries)
    state = ip_adapter_plus_state_dict(unet_config, 512, torch.Generator().manual_seed(5))
    save_file(state, adapter / WEIGHT_NAME)
    return {
        "base": base,
        "identitynet": build_tiny_xl_controlnet(root / "identitynet", seed=3),
        "adapter": adapter / WEIGHT_NAME,
        "pack": build_tiny_insightface(root / "antelope_tiny"),
        "root": root,
    }


@pytest.fixture(scope="module")
def pipeline(models, tmp_path_factory: pytest.TempPathFactory) -> LoraText2ImagePipeline:
    settings = tiny_settings(
        tmp_path_factory.mktemp("var"), EMBER_RUNTIME="torch", EMBER_LORA_MODEL_ROOT=str(models["root"])
    )
    return LoraText2ImagePipeline(settings)


def _adapter(models, face: np.ndarray) -> IPAdapterRequest:
    from safetensors.torch import load_file

    file = models["adapter"]
    weights = parse_ip_adapter(load_file(file), hashlib.sha256(file.read_bytes()).hexdigest())
    unit = IPAdapterUnit(weights, (face,), scale=SCALE, face_pack=str(models["pack"]))
    assert unit.instantid and not unit.uses_encoder
    return IPAdapterRequest((unit,), "")  # no CLIP image encoder runs for it


def _request(
    models, face: np.ndarray | None, index: int | None = 0, adapter: bool = True, guess: bool = False
) -> LoraRequest:
    control = ControlNetInput(
        ControlNetRef(str(models["identitynet"])),
        rings(),
        conditioning_scale=CN_SCALE,
        ip_adapter_index=index,
    )
    return LoraRequest(
        model=ModelRef(str(models["base"])),
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        seed=SEED,
        guidance_scale=GUIDANCE,
        num_inference_steps=STEPS,
        width=WIDTH,
        height=HEIGHT,
        controlnets=(control,),
        controlnet_guess_mode=guess,
        ip_adapter=_adapter(models, face) if adapter else None,
    )


def _ours(pipeline, *requests: LoraRequest) -> list[np.ndarray]:
    results = pipeline(list(requests))
    for r in results:
        assert r.error is None, r.error
    return [r.images[0].numpy().astype(np.int16) for r in results]


@torch.inference_mode()
def _theirs(models, face: np.ndarray, on_face: bool = True, guess: bool = False) -> np.ndarray:
    """InstantID's maths, written out with diffusers' modules (module docstring); `on_face` False: the
    ControlNet reads the prompt embeddings instead (the plain SDXL ControlNet path, as a control); `guess`:
    guess mode, the ControlNet on the conditional rows only (InstantID: tokens.chunk(2)[1]), zeros for the
    unconditional ones, its residuals weighted by ControlNetModel's guess_mode."""
    from diffusers import ControlNetModel, StableDiffusionXLPipeline
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.utils.torch_utils import randn_tensor

    pipe = StableDiffusionXLPipeline.from_pretrained(
        models["base"], add_watermarker=False, dtype=torch.float32
    )
    pipe.load_ip_adapter(
        str(models["adapter"].parent), subfolder="", weight_name=WEIGHT_NAME, image_encoder_folder=None
    )
    pipe.set_ip_adapter_scale(SCALE)
    controlnet = ControlNetModel.from_pretrained(models["identitynet"], dtype=torch.float32)
    # text: [negative; prompt] rows
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=True, negative_prompt=NEGATIVE
    )
    prompt_embeds = torch.cat([negative, embeds])
    time_ids = pipe._get_add_time_ids(
        (HEIGHT, WIDTH),
        (0, 0),
        (HEIGHT, WIDTH),
        torch.float32,
        text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
    )
    added = {"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": time_ids.repeat(2, 1)}
    # the face: antelopev2's largest face -> normed embedding; InstantID: cat([zeros, emb]) then projected
    analysis = FaceAnalysis(models["pack"])
    embedding = torch.from_numpy(analysis.embed(face, analysis.largest(face))).reshape(1, 1, 1, 512)
    image_embeds = torch.cat([torch.zeros_like(embedding), embedding])  # (2, 1 image, 1 token, 512)
    layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    tokens = layer(image_embeds.reshape(2, 1, 512))  # (2, Q, 2048): IdentityNet's encoder_hidden_states
    control = VaeImageProcessor(
        vae_scale_factor=pipe.vae_scale_factor, do_convert_rgb=True, do_normalize=False
    )
    cond = control.preprocess(Image.fromarray(rings()), height=HEIGHT, width=WIDTH).repeat(2, 1, 1, 1)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    generator = torch.Generator("cpu").manual_seed(SEED)
    shape = (1, pipe.unet.config.in_channels, HEIGHT // pipe.vae_scale_factor, WIDTH // pipe.vae_scale_factor)
    latents = randn_tensor(shape, generator=generator, dtype=torch.float32) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        rows = slice(1, 2) if guess else slice(0, 2)
        down, mid = controlnet(
            x[rows],
            t,
            encoder_hidden_states=(tokens if on_face else prompt_embeds)[rows],
            controlnet_cond=cond[rows],
            conditioning_scale=CN_SCALE,
            added_cond_kwargs={name: value[rows] for name, value in added.items()},
            guess_mode=guess,
            return_dict=False,
        )
        if guess:
            down = [torch.cat([torch.zeros_like(d), d]) for d in down]
            mid = torch.cat([torch.zeros_like(mid), mid])
        noise = pipe.unet(
            x,
            t,
            encoder_hidden_states=prompt_embeds,
            added_cond_kwargs={**added, "image_embeds": [image_embeds]},
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
        uncond, text = noise.chunk(2)
        latents = scheduler.step(uncond + GUIDANCE * (text - uncond), t, latents, return_dict=False)[0]
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    image = pipe.image_processor.postprocess(image, output_type="np")[0]
    return np.round(image * 255).astype(np.int16)


def test_identitynet_reads_the_adapter_face_tokens_as_diffusers(pipeline, models) -> None:
    face = _face(1)
    # one request per call: in a shared batch, torch may sum rows in another order (1-level differences)
    (ours,) = _ours(pipeline, _request(models, face))
    (prompted,) = _ours(pipeline, _request(models, face, index=None))
    (guessed,) = _ours(pipeline, _request(models, face, guess=True))
    for what, got, want in (
        ("InstantID (face tokens)", ours, _theirs(models, face)),
        ("InstantID, guess mode", guessed, _theirs(models, face, guess=True)),
        ("same ControlNet on the prompt", prompted, _theirs(models, face, on_face=False)),
    ):
        diff = int(np.abs(got - want).max())
        print(
            f"{what} vs hand-written diffusers loop: max {diff} mean {np.abs(got - want).mean():.4f} levels"
        )
        assert got.shape == want.shape == (HEIGHT, WIDTH, 3)
        assert diff <= 1
    # not vacuous: the same ControlNet on the prompt embeddings, and another face, give other images
    assert np.abs(ours - prompted).max() > 4 and np.abs(ours - guessed).max() > 0
    (other,) = _ours(pipeline, _request(models, _face(2)))
    assert np.abs(ours - other).max() > 0


def test_a_bad_index_fails_that_request_by_name(pipeline, models) -> None:
    face = _face(1)
    past, missing, fine = pipeline(
        [_request(models, face, index=1), _request(models, face, adapter=False), _request(models, face)]
    )
    assert past.error is not None and past.error.startswith("controlnets[0].ip_adapter_index:"), past.error
    assert "past the end of ip_adapter" in past.error
    assert missing.error is not None and "controlnets[0].ip_adapter_index" in missing.error
    assert "no ip_adapter" in missing.error
    assert fine.error is None


def test_batch_of_n_equals_n_singles(pipeline, models) -> None:
    """Two faces and the same ControlNet on the prompt share one UNet batch (one IP-Adapter set): the face
    units run as one ControlNet call on their own tokens, the prompt unit as another; each request gets its
    single-run pixels (within 1 level: torch may sum a larger batch's rows in another order)."""
    requests = [
        _request(models, _face(1)),
        _request(models, _face(2)),
        _request(models, _face(1), index=None),
    ]
    batched = _ours(pipeline, *requests)
    for i, (request, together) in enumerate(zip(requests, batched, strict=True)):
        (alone,) = _ours(pipeline, request)
        diff = int(np.abs(together - alone).max())
        print(f"batched vs single {i}: max {diff} levels")
        assert diff <= 1


def test_the_512_wide_resampler_needs_an_insightface_pack(models) -> None:
    """OPTIONS -> the request: with insight_face_model_path the adapter runs on the face (no CLIP encoder);
    without it, it is refused by name (no CLIP image encoder gives 512-wide hidden states)."""
    from ember.pipeline.ip_adapter import parse_ip_adapter_options

    face = _face(1)
    adapter = {
        "weights": {"path": str(models["adapter"].parent), "weight_name": WEIGHT_NAME},
        "images": [0],
        "insight_face": {"path": str(models["pack"])},
    }
    request = parse_ip_adapter_options({"adapters": [adapter]}, lambda i, what: face, models["root"])
    assert request is not None and request.units[0].instantid and request.image_encoder == ""
    with pytest.raises(ValueError, match=r"ip_adapter\[0\]\.insight_face_model_path is required"):
        parse_ip_adapter_options(
            {"adapters": [{**adapter, "insight_face": None}]}, lambda i, what: face, models["root"]
        )
