"""fal-ai/pixart-sigma's pipeline on the tiny PixArt-Σ: parity with diffusers' PixArtSigmaPipeline (both
schedulers, both runtimes), batching, styles, the T5 attention mask, cancellation and the exports.

Fixtures build the tiny model and its exports into the session's shared var_dir (tests/conftest.py), so the
e2e stack reuses them.
"""

from __future__ import annotations

import dataclasses

import diffusers
import numpy as np
import onnx
import pytest
import torch

from ember.pipeline.pixart_sigma import SCHEDULERS, PixArtRequest, PixArtSigmaPipeline, check_request
from ember.pipeline.pixart_styles import STYLES, apply_style
from ember.pipeline.t5_encode import encode_t5, tokenize_t5
from ember.runtime import create_runner
from ember.specs import ensure_artifacts, read_artifacts
from ember.specs.onnx_export import VERIFY_ATOL, verify_onnx
from ember.specs.pixart_sigma import PIXART_SIGMA_NETWORKS, PIXART_TRANSFORMER, T5_TEXT_ENCODER
from tests.pipeline.conftest import tiny_settings

FAMILY, VARIANT = "pixart_sigma", "xl-2-1024-ms"


@pytest.fixture(scope="module")
def artifacts(var_dir):
    return read_artifacts(ensure_artifacts(tiny_settings(var_dir), FAMILY, VARIANT, progress=False))


@pytest.fixture(scope="module")
def ort_pipe(var_dir, artifacts) -> PixArtSigmaPipeline:
    return PixArtSigmaPipeline.from_artifacts(tiny_settings(var_dir), artifacts)


@pytest.fixture(scope="module")
def torch_pipe(var_dir, artifacts) -> PixArtSigmaPipeline:
    settings = tiny_settings(var_dir, EMBER_RUNTIME="torch", EMBER_DEVICE="cpu", EMBER_DTYPE="float32")
    return PixArtSigmaPipeline.from_artifacts(settings, artifacts)


@pytest.fixture(scope="module")
def reference(artifacts):
    """diffusers' own PixArtSigmaPipeline on the same tiny weights, in torch."""
    pipe = diffusers.PixArtSigmaPipeline.from_pretrained(artifacts.source, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.model_scheduler_config = dict(pipe.scheduler.config)  # the DPM-Solver config the model ships
    return pipe


def _diffusers_uint8(pipe, request: PixArtRequest) -> np.ndarray:
    """diffusers' PIL output as (N, H, W, 3) uint8, with the scheduler fal's name stands for, swapped in
    with from_config as the PixArt-Σ demo does; styles applied with the demo's apply_style."""
    config = {**pipe.model_scheduler_config, **SCHEDULERS[request.scheduler]}
    pipe.scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    expected = {"DPM-SOLVER": "DPMSolverMultistepScheduler", "SA-SOLVER": "SASolverScheduler"}
    assert type(pipe.scheduler).__name__ == expected[request.scheduler]
    prompt, negative = apply_style(request.style, request.prompt, request.negative_prompt)
    out = pipe(
        prompt,
        negative_prompt=negative,
        width=request.width,
        height=request.height,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        num_images_per_prompt=request.num_images,
        generator=torch.Generator("cpu").manual_seed(request.seed),
        clean_caption=False,
        use_resolution_binning=False,
        max_sequence_length=300,
        output_type="pil",
    )
    return np.stack([np.asarray(image) for image in out.images])


def _diff(ours: torch.Tensor, theirs: np.ndarray) -> np.ndarray:
    assert tuple(ours.shape) == theirs.shape and ours.dtype == torch.uint8
    return np.abs(ours.numpy().astype(np.int16) - theirs.astype(np.int16))


CASES = [
    PixArtRequest(
        prompt="a photo of a cat",
        negative_prompt="blurry",
        seed=42,
        width=128,
        height=96,
        num_inference_steps=6,
        guidance_scale=4.5,
        scheduler=scheduler,
    )
    for scheduler in SCHEDULERS
] + [
    # no guidance (diffusers skips the negative branch at guidance_scale <= 1), two images, a style
    PixArtRequest(
        prompt="a red boat",
        seed=3,
        width=64,
        height=128,
        num_inference_steps=5,
        guidance_scale=1.0,
        num_images=2,
        style="Pixel art",
        scheduler="SA-SOLVER",
    ),
]
IDS = ["dpm-solver-guided", "sa-solver-guided", "sa-solver-unguided-2images-style"]


@pytest.mark.parametrize("request_", CASES, ids=IDS)
def test_torch_runtime_matches_diffusers_exactly(torch_pipe, reference, request_) -> None:
    """torch runtime vs diffusers: bit-identical images. Same weights and the same torch ops in the same
    order (T5 with its mask, noise from the request's generator, [negative, prompt] rows, guidance, the
    scheduler's step with the generator SA-Solver draws from), so any difference means our stages diverged."""
    [result] = torch_pipe([request_])
    assert _diff(result.images, _diffusers_uint8(reference, request_)).max() == 0


@pytest.mark.parametrize("request_", CASES, ids=IDS)
def test_onnxruntime_matches_diffusers(ort_pipe, reference, request_) -> None:
    """ONNX Runtime vs diffusers in torch: max |diff| <= 2 levels and < 1 % of values differ.

    Each exported network differs from torch by ~1e-6 (export verification); those differences pass
    through the steps and the VAE and flip a uint8 value by one level where the float lies that close to a
    rounding boundary (measured: at most 1 level, on < 0.02 % of values). A wrong scheduler, mask, guidance
    or seed convention moves most values by tens.
    """
    [result] = ort_pipe([request_])
    diff = _diff(result.images, _diffusers_uint8(reference, request_))
    assert diff.max() <= 2
    assert (diff > 0).mean() < 0.01
    assert result.nsfw == [False] * request_.num_images


BATCH = [
    PixArtRequest(prompt="a boat", seed=11, width=64, height=64, num_inference_steps=5),
    PixArtRequest(
        prompt="a house on a hill",
        negative_prompt="fog",
        seed=12,
        width=64,
        height=64,
        num_inference_steps=5,
        guidance_scale=7.0,
        num_images=2,
        style="Cinematic",
    ),
    PixArtRequest(prompt="a boat", seed=13, width=64, height=64, num_inference_steps=5, guidance_scale=1.0),
    PixArtRequest(
        prompt="a boat", seed=14, width=64, height=64, num_inference_steps=5, scheduler="SA-SOLVER"
    ),
    PixArtRequest(prompt="a boat", seed=15, width=128, height=64, num_inference_steps=5),  # other size
]


@pytest.mark.parametrize("runtime", ["ort_pipe", "torch_pipe"])
def test_batch_of_n_equals_n_singles(runtime, request) -> None:
    """Mixed guidance (with and without the negative branch), styles, images per request and schedulers in
    one call: each request equals its single run up to the kernels' batch-size-dependent summation order
    (<= 1 level; measured 0 with onnxruntime)."""
    pipeline = request.getfixturevalue(runtime)
    steps: list[tuple[int, int, int]] = []
    batched = pipeline(BATCH, on_step=lambda i, step, total: steps.append((i, step, total)))
    for i, (req, together) in enumerate(zip(BATCH, batched, strict=True)):
        [alone] = pipeline([req])
        assert together.images.shape == (req.num_images, req.height, req.width, 3)
        diff = (together.images.int() - alone.images.int()).abs().max().item()
        assert diff <= 1, f"seed {req.seed}: batched differs from single by {diff}"
        assert [s for s in steps if s[0] == i] == [(i, n, 5) for n in range(1, 6)]  # progress per step
    assert not torch.equal(batched[1].images[0], batched[1].images[1])  # two images of one request differ


def test_style_is_the_demo_template(ort_pipe) -> None:
    """A style equals "(No style)" with the demo's templated prompt and negative prompt, and changes the image."""
    styled = PixArtRequest(
        prompt="a lighthouse",
        negative_prompt="rain",
        seed=5,
        width=64,
        height=64,
        num_inference_steps=5,
        style="Neonpunk",
    )
    prompt, negative = apply_style("Neonpunk", "a lighthouse", "rain")
    assert prompt.startswith("neonpunk style a lighthouse . cyberpunk") and negative.endswith(
        "disfigured" + "rain"
    )
    manual = dataclasses.replace(styled, style="(No style)", prompt=prompt, negative_prompt=negative)
    plain = dataclasses.replace(styled, style="(No style)")
    a, b, c = ort_pipe([styled, manual, plain])
    assert torch.equal(a.images, b.images)
    assert not torch.equal(a.images, c.images)
    assert apply_style("(No style)", "x", "y") == ("x", "y")
    assert len(STYLES) == 10


def test_tokenizer_pads_to_300_with_a_mask_and_truncates_keeping_eos(artifacts) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(artifacts.tokenizer_dir)
    ids, mask = tokenize_t5(tokenizer, ["a cat", "", "word " * 400])
    assert ids.shape == mask.shape == (3, 300)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)  # T5's ids
    n = int(mask[0].sum())
    assert ids[0, n - 1] == 1 and (ids[0, n:] == 0).all() and (mask[0, n:] == 0).all()
    assert ids[1, 0] == 1 and mask[1].sum() == 1  # "" is just </s>
    assert mask[2].all() and ids[2, -1] == 1  # truncated, still closed by </s>


def test_padding_tokens_change_nothing(var_dir, artifacts) -> None:
    """The attention mask is honoured end to end: T5's states for the real tokens do not depend on how far
    the prompt is padded, and the DiT ignores whatever sits at masked positions."""
    settings = tiny_settings(var_dir)
    text = create_runner(settings, artifacts, T5_TEXT_ENCODER)
    dit = create_runner(settings, artifacts, PIXART_TRANSFORMER)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(artifacts.tokenizer_dir)
    ids, long_mask = tokenize_t5(tokenizer, ["a small cactus in the desert"])  # (1, 300), padded with <pad>
    n = int(long_mask.sum())
    assert 3 < n < 20
    long = text.run({"input_ids": ids, "attention_mask": long_mask})["text_embeddings"]
    other = ids.clone()
    other[:, n:] = torch.randint(
        3, 100, (1, 300 - n), generator=torch.Generator().manual_seed(1)
    )  # not <pad>
    other_states = text.run({"input_ids": other, "attention_mask": long_mask})["text_embeddings"]
    torch.testing.assert_close(long[:, :n], other_states[:, :n], atol=1e-5, rtol=1e-5)
    assert torch.equal(encode_t5(text, tokenizer, ["a small cactus in the desert"])[0], long)

    garbage = long.clone()
    garbage[:, n:] = torch.randn_like(garbage[:, n:]) * 10  # anything at the padded positions
    feeds = {
        "sample": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
        "timestep": torch.tensor([500.0]),
        "encoder_attention_mask": long_mask,
    }
    a = dit.run({**feeds, "encoder_hidden_states": long})["noise_pred"]
    b = dit.run({**feeds, "encoder_hidden_states": garbage})["noise_pred"]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    unmasked = dit.run(
        {**feeds, "encoder_hidden_states": garbage, "encoder_attention_mask": torch.ones_like(long_mask)}
    )["noise_pred"]
    assert (unmasked - a).abs().max() > 1e-3  # the mask is what made the difference


def test_cancel_leaves_the_batch_within_one_step(ort_pipe) -> None:
    flag = {"cancel": False}

    def on_step(index: int, step: int, total: int) -> None:
        if index == 0 and step == 1:
            flag["cancel"] = True

    doomed = PixArtRequest(
        prompt="a cat",
        seed=1,
        width=64,
        height=64,
        num_inference_steps=5,
        is_cancelled=lambda: flag["cancel"],
    )
    survivor = PixArtRequest(prompt="a dog", seed=2, width=64, height=64, num_inference_steps=5)
    steps: list[tuple[int, int]] = []
    gone, done = ort_pipe(
        [doomed, survivor], on_step=lambda i, s, t: (steps.append((i, s)), on_step(i, s, t))
    )
    assert gone.cancelled and gone.images is None
    assert [s for i, s in steps if i == 0] == [1] and [s for i, s in steps if i == 1] == [1, 2, 3, 4, 5]
    assert done.images is not None and set(done.timings) == {"encode", "denoise", "decode", "safety", "total"}


def test_check_request_names_the_field() -> None:
    bad = PixArtRequest(prompt="x", seed=0, width=100, scheduler="EULER", style="Noir", num_images=9)
    problems = " ".join(check_request(bad))
    for word in ("width must be a multiple of 16", "scheduler", "style", "num_images"):
        assert word in problems
    assert check_request(PixArtRequest(prompt="x", seed=0)) == []


@pytest.mark.parametrize("spec", PIXART_SIGMA_NETWORKS, ids=lambda s: s.name)
def test_export_matches_torch_and_follows_the_spec(spec, artifacts) -> None:
    """onnxruntime vs torch at a shape other than the traced one (max |diff| <= 1e-3; measured <= 1.1e-5),
    and the graph's names and dynamic axes are the spec's."""
    module = spec.load(artifacts.source, None, torch.float32)
    assert (
        verify_onnx(spec, module, artifacts.config(spec.subfolder), artifacts.onnx_path(spec.name))
        <= VERIFY_ATOL
    )
    graph = onnx.load(str(artifacts.onnx_path(spec.name)), load_external_data=False).graph
    assert [i.name for i in graph.input] == spec.input_names
    assert [o.name for o in graph.output] == spec.output_names
    for tensor, value in zip(spec.inputs, graph.input, strict=True):
        dynamic = {i for i, d in enumerate(value.type.tensor_type.shape.dim) if d.dim_param}
        assert dynamic == set(tensor.dynamic_axes()), tensor.name


def test_demo_model_has_the_sigma_shape(artifacts) -> None:
    transformer, text = artifacts.config("transformer"), artifacts.config("text_encoder")
    assert transformer["_class_name"] == "PixArtTransformer2DModel"
    assert (transformer["sample_size"], transformer["patch_size"], transformer["out_channels"]) == (128, 2, 8)
    assert transformer["use_additional_conditions"] is False
    assert transformer["caption_channels"] == text["d_model"]
    assert text["architectures"] == ["T5EncoderModel"]
    assert artifacts.config("vae")["scaling_factor"] == 0.13025
    scheduler = read_artifacts(artifacts.path)  # the scheduler config travels with the exports
    assert (scheduler.scheduler_dir / "scheduler_config.json").is_file()


def test_safety_checker_runs_only_when_asked(var_dir, artifacts) -> None:
    """enable_safety_checker runs the shared safety stage (ember.pipeline.safety) on that request's images:
    its flags are the checker's own verdict on the unchecked images; other requests are not checked."""
    from ember.pipeline.safety import load_safety_checker

    settings = tiny_settings(var_dir)
    checker = load_safety_checker(settings)
    pipe = PixArtSigmaPipeline.from_artifacts(settings, artifacts, checker)
    base = PixArtRequest(prompt="a cat", seed=4, width=64, height=64, num_inference_steps=5, num_images=2)
    checked, unchecked = pipe([dataclasses.replace(base, enable_safety_checker=True), base])
    want_images, want_flags = checker(unchecked.images)
    assert checked.nsfw == want_flags and len(checked.nsfw) == 2
    assert torch.equal(checked.images, want_images)
    assert unchecked.nsfw == [False, False]
    with pytest.raises(ValueError, match="no safety checker"):
        PixArtSigmaPipeline.from_artifacts(settings, artifacts)(
            [dataclasses.replace(base, enable_safety_checker=True)]
        )
