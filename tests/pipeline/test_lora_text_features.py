"""fal-ai/lora's text features on the tiny SD1.5 model (torch runtime), against diffusers + compel:

- textual inversion (`embeddings`) vs StableDiffusionPipeline.load_textual_inversion: a multi-vector
  kohya/A1111 file whose token appears in the prompt and the negative prompt, and diffusers' format with
  fal's default pivotal tokens <s0>, <s1>;
- `prompt_weighting` vs diffusers fed compel's embeddings (prompt_embeds / negative_prompt_embeds) for
  (word)1.3, word-, .and(), .blend() and a prompt of more than 77 tokens, with and without embeddings;
- the extended text encoder vs CLIPTextModel, and its ONNX export run by ONNX Runtime;
- batch of N == N singles when requests of different sequence lengths share a batch.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.pipeline.textual_inversion import load_embedding
from ember.specs.demo_lora import build_tiny_sd15
from tests.pipeline.conftest import tiny_settings

SIZE, STEPS = 64, 3
HIDDEN = 32  # the tiny text encoder's width (ember.specs.demo_models.TEXT_HIDDEN)
# More than 75 tokens with the weighting syntax: compel splits it into two 77-token windows.
LONG = ", ".join(f"a (red)1.2 fox number {i} in the deep snow" for i in range(12))
WEIGHTED = [
    ("a (red)1.4 fox in the (snow)0.6, blurry-", "ugly, (blurry)1.3"),
    ('("a red fox", "a blue bird").and()', ""),
    ('("a red fox", "a blue bird").blend(0.7, 0.3)', "lowres"),
    (LONG, "blurry"),
]


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd15(tmp_path_factory.mktemp("lora-text") / "tiny-sd15")


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> LoraText2ImagePipeline:
    return LoraText2ImagePipeline(tiny_settings(tmp_path_factory.mktemp("var"), EMBER_RUNTIME="torch"))


def _reference(sd15_dir: Path):
    """A fresh diffusers pipeline (load_textual_inversion changes its tokenizer and text encoder)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        sd15_dir, safety_checker=None, requires_safety_checker=False, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def reference(sd15_dir: Path):
    """A reference without textual inversions, shared by the compel tests."""
    return _reference(sd15_dir)


def _request(sd15_dir: Path, **kw) -> LoraRequest:
    return LoraRequest(
        model=ModelRef(str(sd15_dir)),
        prompt=kw.pop("prompt", "a red fox"),
        seed=kw.pop("seed", 7),
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=kw.pop("guidance_scale", 5.0),
        **kw,
    )


def _ours(pipeline, sd15_dir, **kw) -> np.ndarray:
    (result,) = pipeline([_request(sd15_dir, **kw)])
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


def _close(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1, f"max pixel difference {np.abs(a - b).max()}"


def _compel(pipe, **kw):
    from compel import Compel

    return Compel(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, truncate_long_prompts=False, **kw)


def _safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    save_file(tensors, str(path))
    return path


# -- the extended text encoder ------------------------------------------------------------------------


def test_extended_encoder_is_clip_with_extra_rows_and_mask(sd15_dir):
    from ember.specs.lora import _load_text_encoder
    from ember.specs.lora_text import EXTRA_TOKENS, ExtendedTextEncoder

    plain = _load_text_encoder(str(sd15_dir), None, torch.float32)
    clip = plain.text_encoder
    ext = ExtendedTextEncoder(clip)
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(0))
    ones, extra = torch.ones_like(ids), torch.zeros(EXTRA_TOKENS, HIDDEN)
    with torch.no_grad():
        assert torch.equal(ext(ids, ones, extra), plain(ids))  # the common case: bit-identical
        mask = ones.clone()
        mask[:, 5:9] = 0  # what compel does to a down-weighted fragment
        reference = clip(ids, mask, output_hidden_states=True)
        ours = ext(ids, mask, extra)
        assert torch.equal(ours[:, 0], reference.last_hidden_state)
        assert torch.equal(ours[:, 1], clip.final_layer_norm(reference.hidden_states[-2]))
        # id vocab + 3 picks extra row 3: the same as that vector written into the table.
        extra[3] = torch.randn(HIDDEN)
        with_extra = ids.clone()
        with_extra[:, 4] = clip.config.vocab_size + 3
        ours = ext(with_extra, ones, extra)
        table = clip.embeddings.token_embedding.weight
        saved = table[7].clone()
        table[7] = extra[3]
        try:
            with_extra[:, 4] = 7
            assert torch.equal(ours, plain(with_extra))
        finally:
            table[7] = saved


def test_extended_encoder_onnx_export_runs_on_onnxruntime(sd15_dir, tmp_path):
    from ember.runtime.onnxruntime_runner import OnnxRuntimeRunner
    from ember.runtime.torch_runner import TorchRunner
    from ember.specs.lora_text import TEXT_ENCODER_EXT
    from ember.specs.onnx_export import export_onnx

    module = TEXT_ENCODER_EXT.load(str(sd15_dir), None, torch.float32)
    report = export_onnx(TEXT_ENCODER_EXT, module, module.config, tmp_path / "text_encoder_ext.onnx")
    assert report.max_abs_diff < 1e-4  # export_onnx's own check at a second shape
    ort = OnnxRuntimeRunner(TEXT_ENCODER_EXT, report.path, intra_op_threads=1)
    ref = TorchRunner(TEXT_ENCODER_EXT, "", None, "cpu", torch.float32, module=module)
    feeds = TEXT_ENCODER_EXT.sample_inputs(module.config, 3, 512, 512, seed=1)
    feeds["input_ids"][:, 3] = module.config["vocab_size"] + 5  # an added token, on both runtimes
    diff = (ort.run(feeds)["hidden_states"] - ref.run(feeds)["hidden_states"]).abs().max()
    assert diff < 1e-4, diff


# -- textual inversion --------------------------------------------------------------------------------


def test_multi_vector_embedding_matches_load_textual_inversion(pipeline, sd15_dir, tmp_path):
    """kohya / A1111's {"emb_params": (3, D)} with one token, repeated in prompt and negative prompt."""
    vectors = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(3))
    path = _safetensors(tmp_path / "style.safetensors", {"emb_params": vectors})
    embedding = load_embedding(path.read_bytes(), ["<fox-style>"])
    prompt, negative = "a <fox-style> fox, <fox-style> in snow", "<fox-style>, blurry"
    ours = _ours(pipeline, sd15_dir, prompt=prompt, negative_prompt=negative, embeddings=(embedding,))
    pipe = _reference(sd15_dir)
    pipe.load_textual_inversion(str(path), token="<fox-style>")
    _close(ours, _theirs(pipe, prompt=prompt, negative_prompt=negative))
    plain = _ours(pipeline, sd15_dir, prompt=prompt, negative_prompt=negative)
    assert np.abs(ours - plain).max() > 0, "the embedding changed nothing"


def test_pivotal_tokens_and_diffusers_format(pipeline, sd15_dir, tmp_path):
    """diffusers' {token: (2, D)} with fal's default tokens: <s0> -> vector 0, <s1> -> vector 1, as
    load_textual_inversion maps a 2-vector tensor given two tokens."""
    vectors = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(4))
    path = _safetensors(tmp_path / "pivotal.safetensors", {"<concept>": vectors})
    embedding = load_embedding(path.read_bytes(), ["<s0>", "<s1>"])
    prompt = "a photo of <s0> <s1> on a beach"
    ours = _ours(pipeline, sd15_dir, prompt=prompt, negative_prompt="<s1>", embeddings=(embedding,))
    pipe = _reference(sd15_dir)
    pipe.load_textual_inversion(
        vectors, token=["<s0>", "<s1>"], tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder
    )
    _close(ours, _theirs(pipe, prompt=prompt, negative_prompt="<s1>"))


def test_embedding_errors_fail_only_their_request(pipeline, sd15_dir):
    wrong_width = load_embedding(_bytes({"emb_params": torch.randn(2, HIDDEN * 2)}), ["<x>"])
    taken = load_embedding(_bytes({"emb_params": torch.randn(1, HIDDEN)}), ["<|endoftext|>"])
    ok, bad_width, bad_token = pipeline(
        [
            _request(sd15_dir, guidance_scale=1.0),
            _request(sd15_dir, embeddings=(wrong_width,)),
            _request(sd15_dir, embeddings=(taken,)),
        ]
    )
    assert ok.error is None and ok.images is not None
    assert bad_width.images is None and bad_width.error.startswith("embeddings[0]: vectors of width 64")
    assert bad_token.images is None and "embeddings[0].tokens" in bad_token.error


def test_sdxl_embedding_on_sd15_base_is_refused_by_index(pipeline, sd15_dir):
    sd15 = load_embedding(_bytes({"emb_params": torch.randn(1, HIDDEN)}), ["<a>"])
    sdxl = load_embedding(_bytes({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}), ["<b>"])
    (result,) = pipeline([_request(sd15_dir, embeddings=(sd15, sdxl))])
    assert result.images is None
    assert result.error.startswith("embeddings[1]: an SDXL embedding") and "SD1.5 base" in result.error


def _bytes(tensors: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save(tensors)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)}, "each token needs one of each"),
        ({"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)}, "not a textual-inversion embedding"),
        ({"emb_params": torch.zeros(2, 3, 4)}, "expected (D,) or (vectors, D)"),
        ({"emb_params": torch.zeros(2, 4, dtype=torch.int32)}, "not floating-point"),
    ],
)
def test_bad_embedding_files_are_refused(tensors, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_embedding(_bytes(tensors), ["<x>"])


# -- prompt weighting ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("prompt", "negative"), WEIGHTED, ids=["weights", "and", "blend", "long"])
def test_prompt_weighting_matches_compel(pipeline, reference, sd15_dir, prompt, negative):
    pipe = reference
    compel = _compel(pipe)
    with torch.no_grad():
        cond, uncond = compel.pad_conditioning_tensors_to_same_length([compel(prompt), compel(negative)])
    if prompt == LONG:
        assert cond.shape[1] == 2 * 77  # two windows; the negative prompt padded to the same length
    ours = _ours(pipeline, sd15_dir, prompt=prompt, negative_prompt=negative, prompt_weighting=True)
    _close(ours, _theirs(pipe, prompt_embeds=cond, negative_prompt_embeds=uncond))


def test_weighting_with_embedding_and_clip_skip(pipeline, sd15_dir, tmp_path):
    """compel + diffusers' textual inversion manager on the reference; clip_skip 1 is compel's
    PENULTIMATE_HIDDEN_STATES_NORMALIZED. Compared on the conditioning tensors (the images follow)."""
    from compel import DiffusersTextualInversionManager, ReturnedEmbeddingsType

    vectors = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(5))
    path = _safetensors(tmp_path / "e.safetensors", {"emb_params": vectors})
    embedding = load_embedding(path.read_bytes(), ["<tok>"])
    pipe = _reference(sd15_dir)
    pipe.load_textual_inversion(str(path), token="<tok>")
    # compel reads the final layer norm from `.text_model`, which transformers 5 folded into the model.
    pipe.text_encoder.text_model = SimpleNamespace(final_layer_norm=pipe.text_encoder.final_layer_norm)
    prompt, negative = f"a (<tok>)1.3 fox, {LONG}", "(<tok>)0.5 blurry"
    model = pipeline.model(ModelRef(str(sd15_dir)))
    for clip_skip, kind in (
        (0, "LAST_HIDDEN_STATES_NORMALIZED"),
        (1, "PENULTIMATE_HIDDEN_STATES_NORMALIZED"),
    ):
        compel = _compel(
            pipe,
            textual_inversion_manager=DiffusersTextualInversionManager(pipe),
            returned_embeddings_type=getattr(ReturnedEmbeddingsType, kind),
        )
        with torch.no_grad():
            theirs = torch.cat(
                compel.pad_conditioning_tensors_to_same_length([compel(negative), compel(prompt)])
            )
        ours = model.text.encode([negative, prompt], clip_skip, True, (embedding,))
        assert ours.shape == theirs.shape and theirs.shape[1] == 2 * 77
        assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()


def test_without_weighting_prompts_truncate_at_77(pipeline, sd15_dir):
    model = pipeline.model(ModelRef(str(sd15_dir)))
    long = model.text.encode([LONG], 0)
    ids = model.tokenizer(LONG, truncation=True, max_length=77, padding="max_length", return_tensors="pt")
    assert long.shape == (1, 77, HIDDEN)
    assert torch.equal(long, model.text_encoder.run({"input_ids": ids.input_ids})["hidden_states"][:, 0])


def test_batch_equals_singles_across_sequence_lengths(pipeline, sd15_dir):
    embedding = load_embedding(_bytes({"emb_params": torch.randn(2, HIDDEN)}), ["<e>"])
    requests = [
        _request(sd15_dir, prompt=LONG, prompt_weighting=True, num_images=2, seed=1),  # (4, 154, D)
        _request(sd15_dir, prompt="a (red)1.2 fox", prompt_weighting=True, seed=2),  # (2, 77, D)
        _request(sd15_dir, prompt="a <e> fox", embeddings=(embedding,), seed=3),
        _request(sd15_dir, prompt="a red fox", seed=4),
    ]
    batched = pipeline(requests)
    for request, together in zip(requests, batched, strict=True):
        (alone,) = pipeline([request])
        assert together.error is None and alone.error is None
        diff = np.abs(together.images.numpy().astype(int) - alone.images.numpy().astype(int)).max()
        assert diff <= 1, diff


def test_onnxruntime_base_model_with_lora_and_embedding(pipeline, sd15_dir, tmp_path):
    """models.toml [lora.sdv1-5] runtime = "onnxruntime": the extended text encoder is its own export
    (added to the base model's artifacts on first use) with weights of its own, so LoRA refits of the
    text encoder are forwarded to it, also those made before it was built. Within 1 level of torch. The
    exported UNet's text axis is dynamic: a 2-window weighted prompt with a LoRA (refit) runs as on torch,
    in a batch with a 1-window request; over 8 windows is refused alone, by name."""
    import dataclasses
    import hashlib

    from safetensors.torch import load as load_safetensors

    from ember.pipeline.loras import parse_lora
    from tests.pipeline.test_lora_parity import _make_lora

    settings = tiny_settings(tmp_path / "var", EMBER_RUNTIME="torch")
    models = {family: dict(variants) for family, variants in settings.models.items()}
    models["lora"] = {"sdv1-5": {**models["lora"]["sdv1-5"], "runtime": "onnxruntime"}}
    ort = LoraText2ImagePipeline(dataclasses.replace(settings, models=models))
    data = _make_lora(sd15_dir, tmp_path / "lora", seed=1)  # on the UNet and the text encoder
    lora = ((parse_lora(load_safetensors(data), hashlib.sha256(data).hexdigest()), 0.8),)
    embedding = load_embedding(_bytes({"emb_params": torch.randn(2, HIDDEN)}), ["<e>"])
    ort([_request(sd15_dir, loras=lora)])  # refits the plain encoder before the extended one exists
    assert type(ort.model(ModelRef(str(sd15_dir))).text_encoder).__name__ == "OnnxRuntimeRunner"
    nine_windows = _request(sd15_dir, prompt=", ".join([LONG] * 5), prompt_weighting=True)
    too_long, short = ort([nine_windows, _request(sd15_dir)])
    assert too_long.images is None and too_long.error.startswith("prompt_weighting: a prompt of")
    assert "at most 600 (8 windows of 75)" in too_long.error and short.error is None
    weighted = {"loras": lora, "prompt": LONG, "negative_prompt": "(blurry)1.3", "prompt_weighting": True}
    long, short = ort([_request(sd15_dir, **weighted), _request(sd15_dir, loras=lora)])  # 2 windows, 1 window
    assert long.error is None and short.error is None, (long.error, short.error)
    for ours, kw in ((long, weighted), (short, {"loras": lora})):
        ours, reference = ours.images.numpy().astype(np.int16), _ours(pipeline, sd15_dir, **kw)
        print(f"sd15 onnxruntime vs torch {sorted(kw)}: max {np.abs(ours - reference).max()} levels")
        assert np.abs(ours - reference).max() <= 1, np.abs(ours - reference).max()
    # LoRA refit by name still covers the UNet: every attention projection (to_k / to_v read the text) mapped.
    from ember.runtime.refit_map import read_refit_map

    (unet_onnx,) = (tmp_path / "var").rglob("lora-sdv1-5/*/unet.onnx")
    mapped = read_refit_map(unet_onnx)
    assert mapped is not None
    from diffusers import UNet2DConditionModel

    state = UNet2DConditionModel.from_pretrained(sd15_dir, subfolder="unet").state_dict()
    projections = [k for k in state if any(f".{p}.weight" in k for p in ("to_q", "to_k", "to_v", "to_out.0"))]
    assert projections and not set(projections) - set(mapped)
    for kw in (
        {"loras": lora, "embeddings": (embedding,), "prompt": "a (<e>)1.2 fox", "prompt_weighting": True},
        {"embeddings": (embedding,), "prompt": "a <e> fox"},  # back to the base weights
    ):
        ours, reference = _ours(ort, sd15_dir, **kw), _ours(pipeline, sd15_dir, **kw)
        assert np.abs(ours - reference).max() <= 1, np.abs(ours - reference).max()
