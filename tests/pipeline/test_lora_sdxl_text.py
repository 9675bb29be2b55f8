"""fal-ai/lora's text features on the tiny SDXL base (torch runtime), against diffusers + compel:

- textual inversion (`embeddings`, SDXL files {"clip_l", "clip_g"}) vs StableDiffusionXLPipeline with
  load_textual_inversion on both encoders and tokenizers (as diffusers' docs load SDXL embeddings): a
  multi-vector token in prompt and negative prompt; fal's pivotal <s0>, <s1> with the empty negative
  prompt (zeros) and clip_skip;
- `prompt_weighting` vs diffusers fed compel's SDXL conditioning (CompelForSDXL: prompt_embeds,
  pooled_prompt_embeds and the negative ones) for (word)1.3, .and(), .blend() and a prompt of more than
  77 tokens; with an SDXL embedding; clip_skip;
- the extended encoders vs the plain ones (bit-identical) and CLIPTextModel with a mask;
- SD1.5 embeddings on an SDXL base refused naming embeddings[i]; batch of N == N singles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.pipeline.textual_inversion import load_embedding
from ember.specs.demo_sdxl import TEXT_HIDDEN, TEXT_HIDDEN_2, build_tiny_sdxl
from tests.pipeline.conftest import tiny_settings

SIZE, STEPS = 64, 3
# More than 75 tokens with the weighting syntax: compel splits it into two 77-token windows.
LONG = ", ".join(f"a (red)1.2 fox number {i} in the deep snow" for i in range(12))
WEIGHTED = [
    ("a (red)1.4 fox in the (snow)0.6, blurry-", "ugly, (blurry)1.3"),
    ('("a red fox", "a blue bird").and()', ""),  # empty negative: zeros (force_zeros_for_empty_prompt)
    ('("a red fox", "a blue bird").blend(0.7, 0.3)', "lowres"),
    (LONG, "blurry"),
]


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sdxl(tmp_path_factory.mktemp("lora-xl-text") / "tiny-sdxl-base")


@pytest.fixture(scope="module")
def pipeline(xl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoraText2ImagePipeline:
    settings = tiny_settings(
        tmp_path_factory.mktemp("var"), EMBER_RUNTIME="torch", EMBER_LORA_MODEL_ROOT=str(xl_dir.parent)
    )
    return LoraText2ImagePipeline(settings)


def _reference(xl_dir: Path):
    """A fresh diffusers pipeline (load_textual_inversion changes its tokenizers and text encoders)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(xl_dir, add_watermarker=False, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(xl_dir: Path):
    """A reference without textual inversions, shared by the compel tests."""
    return _reference(xl_dir)


def _request(xl_dir: Path, **kw) -> LoraRequest:
    return LoraRequest(
        model=ModelRef(str(xl_dir)),
        prompt=kw.pop("prompt", "a red fox"),
        seed=kw.pop("seed", 7),
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=kw.pop("guidance_scale", 5.0),
        **kw,
    )


def _ours(pipeline, xl_dir, **kw) -> np.ndarray:
    (result,) = pipeline([_request(xl_dir, **kw)])
    assert result.error is None, result.error
    return result.images.numpy().astype(np.int16)


def _theirs(pipe, **kw) -> np.ndarray:
    image = pipe(
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=kw.pop("guidance_scale", 5.0),
        generator=torch.Generator("cpu").manual_seed(kw.pop("seed", 7)),
        output_type="np",
        **kw,
    ).images
    return (image * 255).round().astype(np.int16)


def _close(a: np.ndarray, b: np.ndarray, what: str) -> int:
    """Same weights, same maths: at most 1 uint8 level; returns (and prints) the max."""
    assert a.shape == b.shape
    worst = int(np.abs(a - b).max())
    print(f"sdxl {what}: max {worst} levels")
    assert worst <= 1, f"{what}: max pixel difference {worst}"
    return worst


def _sdxl_file(path: Path, n: int, seed: int) -> tuple[Path, dict[str, torch.Tensor]]:
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    state = {
        "clip_l": torch.randn(n, TEXT_HIDDEN, generator=generator),
        "clip_g": torch.randn(n, TEXT_HIDDEN_2, generator=generator),
    }
    save_file(state, str(path))
    return path, state


def _load_both(pipe, state: dict[str, torch.Tensor], token) -> None:
    """diffusers' documented way to load an SDXL embedding: each tensor into its own encoder."""
    pipe.load_textual_inversion(
        state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )


def _compel_sdxl(pipe, **kw):
    from compel import CompelForSDXL

    return CompelForSDXL(pipe, **kw)


# -- the extended encoders ----------------------------------------------------------------------------


def test_extended_xl_encoders_are_the_plain_ones_with_extra_rows_and_mask(xl_dir):
    from ember.specs.lora_text import EXTRA_TOKENS
    from ember.specs.lora_xl import _load_text_encoder, _load_text_encoder_2
    from ember.specs.lora_xl_text import ExtendedXLTextEncoder

    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 40] = 49407  # <|endoftext|>: where the second encoder pools
    ones = torch.ones_like(ids)
    with torch.no_grad():
        for load, width in ((_load_text_encoder, TEXT_HIDDEN), (_load_text_encoder_2, TEXT_HIDDEN_2)):
            plain = load(str(xl_dir), None, torch.float32)
            ext = ExtendedXLTextEncoder(plain.text_encoder)
            extra = torch.zeros(EXTRA_TOKENS, width)
            ours, theirs = ext(ids, ones, extra), plain(ids)
            if isinstance(theirs, tuple):  # the second encoder: hidden states and pooled text_embeds
                assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
            else:
                assert torch.equal(ours, theirs)  # the common case: bit-identical
            mask = ones.clone()
            mask[:, 5:9] = 0  # what compel does to a down-weighted fragment
            reference = plain.text_encoder(ids, mask, output_hidden_states=True)
            masked = ext(ids, mask, extra)
            hidden = masked[0] if isinstance(masked, tuple) else masked
            assert torch.equal(hidden[:, 0], reference.hidden_states[-2])
            assert torch.equal(hidden[:, 2], reference.hidden_states[-4])
            if isinstance(masked, tuple):
                assert torch.equal(masked[1], reference.text_embeds)


# -- textual inversion --------------------------------------------------------------------------------


def test_multi_vector_sdxl_embedding_matches_load_textual_inversion(pipeline, xl_dir, tmp_path):
    path, state = _sdxl_file(tmp_path / "style.safetensors", 3, seed=3)
    embedding = load_embedding(path.read_bytes(), ["<fox-style>"])
    prompt, negative = "a <fox-style> fox, <fox-style> in snow", "<fox-style>, blurry"
    ours = _ours(pipeline, xl_dir, prompt=prompt, negative_prompt=negative, embeddings=(embedding,))
    pipe = _reference(xl_dir)
    _load_both(pipe, state, "<fox-style>")
    _close(ours, _theirs(pipe, prompt=prompt, negative_prompt=negative), "multi-vector embedding")
    plain = _ours(pipeline, xl_dir, prompt=prompt, negative_prompt=negative)
    assert np.abs(ours - plain).max() > 0, "the embedding changed nothing"


def test_pivotal_tokens_with_zeros_negative_and_clip_skip(pipeline, xl_dir, tmp_path):
    """fal's default tokens <s0>, <s1> on a 2-vector file (one vector each, in each encoder); the empty
    negative prompt is zeros; clip_skip 1 on the prompt."""
    path, state = _sdxl_file(tmp_path / "pivotal.safetensors", 2, seed=4)
    embedding = load_embedding(path.read_bytes(), ["<s0>", "<s1>"])
    prompt = "a photo of <s0> <s1> on a beach"
    ours = _ours(pipeline, xl_dir, prompt=prompt, clip_skip=1, embeddings=(embedding,))
    pipe = _reference(xl_dir)
    _load_both(pipe, state, ["<s0>", "<s1>"])
    _close(ours, _theirs(pipe, prompt=prompt, clip_skip=1), "pivotal embedding, clip_skip 1")


def test_embedding_families_are_refused_by_index(pipeline, xl_dir, tmp_path):
    from safetensors.torch import save

    sd15 = load_embedding(save({"emb_params": torch.randn(2, TEXT_HIDDEN)}), ["<x>"])
    path, _ = _sdxl_file(tmp_path / "ok.safetensors", 1, seed=5)
    ok = load_embedding(path.read_bytes(), ["<ok>"])
    good, bad = pipeline(
        [
            _request(xl_dir, guidance_scale=1.0, embeddings=(ok,), prompt="<ok>"),
            _request(xl_dir, embeddings=(ok, sd15)),
        ]
    )
    assert good.error is None and good.images is not None
    assert bad.images is None and bad.error.startswith("embeddings[1]: an SD1.5 embedding"), bad.error
    assert "SDXL base model" in bad.error


# -- prompt weighting ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "negative"), WEIGHTED, ids=["weights", "and-zeros", "blend", "long"])
def test_prompt_weighting_matches_compel_sdxl(pipeline, reference, xl_dir, prompt, negative):
    with torch.no_grad():
        out = _compel_sdxl(reference)(prompt, negative_prompt=negative or None)
    feeds = {"prompt_embeds": out.embeds, "pooled_prompt_embeds": out.pooled_embeds}
    if negative:  # fal's "" is diffusers' None: zeros on this model (force_zeros_for_empty_prompt)
        feeds.update(
            negative_prompt_embeds=out.negative_embeds,
            negative_pooled_prompt_embeds=out.negative_pooled_embeds,
        )
    if prompt == LONG:
        assert out.embeds.shape[1] == 2 * 77  # two windows; the negative prompt padded to the same length
        assert out.negative_embeds.shape == out.embeds.shape
    ours = _ours(pipeline, xl_dir, prompt=prompt, negative_prompt=negative, prompt_weighting=True)
    _close(ours, _theirs(reference, **feeds), f"prompt_weighting {prompt[:24]!r}")


def test_weighting_with_sdxl_embedding_matches_compel(pipeline, xl_dir, tmp_path):
    """compel + diffusers' textual inversion manager on both encoders; compared on the conditioning
    tensors (embeddings and pooled, prompt and negative: the images follow)."""
    from compel import DiffusersTextualInversionManager

    path, state = _sdxl_file(tmp_path / "e.safetensors", 2, seed=6)
    embedding = load_embedding(path.read_bytes(), ["<tok>"])
    pipe = _reference(xl_dir)
    _load_both(pipe, state, "<tok>")
    prompt, negative = f"a (<tok>)1.3 fox, {LONG}", "(<tok>)0.5 blurry"
    compel = _compel_sdxl(pipe, textual_inversion_manager=DiffusersTextualInversionManager(pipe))
    with torch.no_grad():
        theirs = compel(prompt, negative_prompt=negative)
    model = pipeline.model(ModelRef(str(xl_dir)))
    ours = model.text.encode(prompt, negative, 0, True, True, (embedding,))
    embeds = torch.cat([theirs.negative_embeds, theirs.embeds])
    pooled = torch.cat([theirs.negative_pooled_embeds, theirs.pooled_embeds])
    assert ours.embeddings.shape == embeds.shape and embeds.shape[1] == 2 * 77
    assert torch.allclose(ours.embeddings, embeds, atol=1e-5), (ours.embeddings - embeds).abs().max()
    assert torch.allclose(ours.pooled, pooled, atol=1e-5), (ours.pooled - pooled).abs().max()


def test_clip_skip_reads_diffusers_layer_in_the_weighted_path(pipeline, xl_dir):
    """compel has no clip_skip: the weighted path reads diffusers' hidden_states[-(clip_skip + 2)], so a
    prompt without weighting syntax conditions exactly as without prompt_weighting, negative included."""
    model = pipeline.model(ModelRef(str(xl_dir)))
    for clip_skip in (0, 2):
        for negative in ("", "blurry"):
            plain = model.text.encode("a red fox in the snow", negative, clip_skip, True)
            weighted = model.text.encode("a red fox in the snow", negative, clip_skip, True, True)
            assert torch.equal(plain.embeddings, weighted.embeddings)
            assert torch.equal(plain.pooled, weighted.pooled)
    skipped = model.text.encode("a (red)1.3 fox", "", 1, False, True)
    assert not torch.equal(
        skipped.embeddings, model.text.encode("a (red)1.3 fox", "", 0, False, True).embeddings
    )


def test_batch_equals_singles_across_sequence_lengths(pipeline, xl_dir):
    requests = [
        _request(xl_dir, prompt=LONG, negative_prompt="blurry", prompt_weighting=True, num_images=2, seed=1),
        _request(
            xl_dir, prompt="a (red)1.2 fox", prompt_weighting=True, seed=2
        ),  # (2, 77, D): zeros negative
        _request(xl_dir, prompt="a red fox", seed=4),
    ]
    batched = pipeline(requests)
    for request, together in zip(requests, batched, strict=True):
        (alone,) = pipeline([request])
        assert together.error is None and alone.error is None
        diff = np.abs(together.images.numpy().astype(int) - alone.images.numpy().astype(int)).max()
        assert diff <= 1, diff


def test_extended_xl_encoders_export_to_onnx(xl_dir, tmp_path):
    """Both specs export (the first encoder's unused last layer pruned) and run on ONNX Runtime, an added
    token included, within 1e-4 of torch."""
    from ember.runtime.onnxruntime_runner import OnnxRuntimeRunner
    from ember.runtime.torch_runner import TorchRunner
    from ember.specs.lora_xl_text import TEXT_ENCODER_2_XL_EXT, TEXT_ENCODER_XL_EXT
    from ember.specs.onnx_export import export_onnx

    for spec in (TEXT_ENCODER_XL_EXT, TEXT_ENCODER_2_XL_EXT):
        module = spec.load(str(xl_dir), None, torch.float32)
        report = export_onnx(spec, module, module.config, tmp_path / f"{spec.name}.onnx")
        assert report.max_abs_diff < 1e-4  # export_onnx's own check at a second shape
        ort = OnnxRuntimeRunner(spec, report.path, intra_op_threads=1)
        ref = TorchRunner(spec, "", None, "cpu", torch.float32, module=module)
        feeds = spec.sample_inputs(module.config, 2, 512, 512, seed=1)
        feeds["input_ids"][:, 3] = module.config["vocab_size"] + 5  # an added token, on both runtimes
        ours, theirs = ort.run(feeds), ref.run(feeds)
        assert all((ours[k] - theirs[k]).abs().max() < 1e-4 for k in theirs), spec.name


def test_onnxruntime_sdxl_base_with_lora_embedding_and_weighting(pipeline, xl_dir, tmp_path):
    """models.toml [lora.sdv1-5] runtime = "onnxruntime": the extended encoders are exports of their own
    (added to the base model's artifacts on first use) with weights of their own, so LoRA refits of both
    text encoders are forwarded to them, also those made before they were built. Within 1 level of torch.
    The exported UNet's text axis is dynamic: a 2-window weighted prompt with a LoRA (refit) runs as on
    torch; over 8 windows is refused by name."""
    import dataclasses
    import hashlib

    from safetensors.torch import load as load_safetensors

    from ember.pipeline.loras import parse_lora
    from tests.pipeline.tiny_lora import make_xl_lora

    settings = tiny_settings(
        tmp_path / "var", EMBER_RUNTIME="torch", EMBER_LORA_MODEL_ROOT=str(xl_dir.parent)
    )
    models = {family: dict(variants) for family, variants in settings.models.items()}
    models["lora"] = {**models["lora"], "sdv1-5": {**models["lora"]["sdv1-5"], "runtime": "onnxruntime"}}
    ort = LoraText2ImagePipeline(dataclasses.replace(settings, models=models))
    data = make_xl_lora(xl_dir, tmp_path / "lora", seed=1).read_bytes()  # UNet and both text encoders
    lora = ((parse_lora(load_safetensors(data), hashlib.sha256(data).hexdigest()), 0.8),)
    path, _ = _sdxl_file(tmp_path / "e.safetensors", 2, seed=7)
    embedding = load_embedding(path.read_bytes(), ["<e>"])
    ort([_request(xl_dir, loras=lora)])  # refits the plain encoders before the extended ones exist
    assert type(ort.model(ModelRef(str(xl_dir))).text_encoder_2).__name__ == "OnnxRuntimeRunner"
    (too_long,) = ort([_request(xl_dir, prompt=", ".join([LONG] * 5), prompt_weighting=True)])
    assert too_long.images is None and "prompt_weighting: a prompt of" in too_long.error
    assert "at most 600 (8 windows of 75)" in too_long.error
    for kw in (  # LONG: 2 windows
        {"loras": lora, "prompt": LONG, "negative_prompt": "(blurry)1.3", "prompt_weighting": True},
        {"loras": lora, "embeddings": (embedding,), "prompt": "a (<e>)1.2 fox-", "prompt_weighting": True},
        {"embeddings": (embedding,), "prompt": "a <e> fox", "negative_prompt": "<e>"},  # back to the base
    ):
        ours, reference = _ours(ort, xl_dir, **kw), _ours(pipeline, xl_dir, **kw)
        _close(ours, reference, f"onnxruntime vs torch {sorted(kw)}")
    # LoRA refit by name still covers the UNet: every attention projection (to_k / to_v read the text) mapped.
    from diffusers import UNet2DConditionModel

    from ember.runtime.refit_map import read_refit_map

    (unet_onnx,) = (tmp_path / "var").rglob("lora-sdxl/*/unet.onnx")
    mapped = read_refit_map(unet_onnx)
    state = UNet2DConditionModel.from_pretrained(xl_dir, subfolder="unet").state_dict()
    projections = [k for k in state if any(f".{p}.weight" in k for p in ("to_q", "to_k", "to_v", "to_out.0"))]
    assert mapped is not None and projections and not set(projections) - set(mapped)
