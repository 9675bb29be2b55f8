"""IP-Adapter FaceID on fal-ai/lora: the ONNX Runtime face analysis (ember.pipeline.face_analysis) on a tiny
InsightFace-signature pack with hand-set detector weights (exact SCRFD decoding, NMS, letterbox scale, the
largest face, the alignment transform and warp, the ArcFace embedding), then FaceID / FaceID Plus v2 / v1
requests vs diffusers' StableDiffusionPipeline.load_ip_adapter + ip_adapter_image_embeds (diffusers' FaceID
recipe) fed the face embedding and aligned crop our stage computed, on the tiny SD1.5 model and (FaceID,
Plus v2) on the tiny SDXL base."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ember.pipeline.face_analysis import (
    ARCFACE_TEMPLATE,
    FaceAnalysis,
    NoFaceError,
    estimate_norm,
    norm_crop,
    similarity_transform,
    warp_affine,
)
from ember.pipeline.ip_adapter import IPAdapterRequest, IPAdapterUnit, parse_ip_adapter
from ember.pipeline.lora import LoraRequest, LoraText2ImagePipeline, ModelRef
from ember.specs.demo_face_id import (
    DISTANCE,
    FACEID_PLUS_WEIGHT_NAME,
    FACEID_WEIGHT_NAME,
    KPS,
    TinyArcFace,
    build_tiny_faceid,
    build_tiny_insightface,
    face_image,
)
from ember.specs.demo_lora import build_tiny_sd15
from tests.pipeline.conftest import tiny_settings

SIZE, STEPS = 64, 3
PROMPT = {"prompt": "a portrait", "negative_prompt": "blurry", "guidance_scale": 5.0}
WHITE = (255, 255, 255)
NORMALISED_255 = (255 - 127.5) / 128  # a saturated pixel in SCRFD's input


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("faceid")
    sd15 = build_tiny_sd15(root / "tiny-sd15")
    return sd15, build_tiny_faceid(root / "faceid", sd15), build_tiny_insightface(root / "buffalo_tiny")


@pytest.fixture(scope="module")
def analysis(dirs) -> FaceAnalysis:
    return FaceAnalysis(dirs[2])


def _expected_box(cx: int, cy: int, mean_g: float, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """The tiny detector's stride-32 anchor at cell (cx, cy): box and keypoints in image pixels."""
    centre = np.array([cx * 32, cy * 32], np.float64)  # SCRFD anchor centres: cell corners
    d = (np.array(DISTANCE) + mean_g) * 32
    box = np.array([centre[0] - d[0], centre[1] - d[1], centre[0] + d[2], centre[1] + d[3]]) / scale
    kps = (np.tile(centre, 5) + np.array(KPS) * 32).reshape(5, 2) / scale
    return box, kps


def test_scrfd_decoding_nms_and_largest_face(analysis):
    # a white cell (10, 6) and a magenta cell (2, 14) (green 0: a smaller box), each exactly one stride-32
    # cell; each cell's 2 anchors fire (scores ~0.98 / ~0.96), NMS keeps the better one per face
    image = face_image(640, 640, [(320, 192, 32, WHITE), (64, 448, 32, (255, 0, 255))])
    faces = analysis.detect(image)
    assert len(faces) == 2
    expected = [_expected_box(6, 10, NORMALISED_255, 1.0), _expected_box(14, 2, -NORMALISED_255, 1.0)]
    found = sorted(faces, key=lambda f: f.bbox[0])
    for face, (box, kps) in zip(found, expected, strict=True):
        np.testing.assert_allclose(face.bbox, box, atol=1e-4)
        np.testing.assert_allclose(face.kps, kps, atol=1e-4)
        assert face.score == pytest.approx(1 / (1 + np.exp(-40 * (NORMALISED_255 - 0.9))), abs=1e-5)
    np.testing.assert_allclose(analysis.largest(image).bbox, expected[0][0], atol=1e-4)
    # Letterbox: 1280 x 960 -> 640 x 480 (scale 0.5 exactly); the 64 px block lands on cell (6, 10)
    wide = face_image(960, 1280, [(640, 384, 64, WHITE)])
    (face,) = analysis.detect(wide)
    box, kps = _expected_box(6, 10, NORMALISED_255, 0.5)
    np.testing.assert_allclose(face.bbox, box, atol=1e-3)
    np.testing.assert_allclose(face.kps, kps, atol=1e-3)
    with pytest.raises(NoFaceError, match="no face"):
        analysis.largest(np.zeros((200, 300, 3), np.uint8))


def test_alignment_is_the_least_squares_similarity_and_warp_is_bilinear():
    rng = np.random.default_rng(0)
    kps = ARCFACE_TEMPLATE * 1.7 + rng.normal(0, 3, (5, 2)) + [40, 25]
    for size in (112, 224):
        matrix = estimate_norm(kps, size)
        # least squares over (a, b, tx, ty): x' = a x - b y + tx, y' = b x + a y + ty
        rows = []
        for x, y in kps:
            rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        target = (ARCFACE_TEMPLATE * size / 112).reshape(-1)
        a, b, tx, ty = np.linalg.lstsq(np.array(rows), target, rcond=None)[0]
        np.testing.assert_allclose(matrix, [[a, -b, tx], [b, a, ty]], atol=1e-9)
    np.testing.assert_allclose(similarity_transform(kps, kps)[:, :2], np.eye(2), atol=1e-12)
    # The warp: cv2.warpAffine's INTER_LINEAR / BORDER_CONSTANT 0 maths; vs torch grid_sample (bilinear,
    # zeros padding, align_corners=True: the same pixel-centre convention) before our uint8 rounding.
    image = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    matrix = estimate_norm(kps, 112)
    ours = warp_affine(image, matrix, 112).astype(np.float64)
    inverse = np.linalg.inv(np.vstack([matrix, [0, 0, 1]]))[:2]
    gx, gy = np.meshgrid(np.arange(112.0), np.arange(112.0))
    xs = inverse[0, 0] * gx + inverse[0, 1] * gy + inverse[0, 2]
    ys = inverse[1, 0] * gx + inverse[1, 1] * gy + inverse[1, 2]
    grid = torch.from_numpy(np.stack([xs / (120 - 1) * 2 - 1, ys / (90 - 1) * 2 - 1], -1))[None]
    source = torch.from_numpy(image).permute(2, 0, 1)[None].double()
    theirs = torch.nn.functional.grid_sample(source, grid, "bilinear", "zeros", align_corners=True)
    theirs = theirs[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - theirs).max() <= 0.5 + 1e-9
    shifted = warp_affine(image, np.array([[1.0, 0, -5], [0, 1, -7]]), 60)  # integer shift: exact copy
    assert np.array_equal(shifted, image[7:67, 5:65])


def test_arcface_embedding_is_the_recognizer_on_the_aligned_crop(analysis):
    image = face_image(640, 640, [(320, 192, 32, WHITE)])
    image[250:420, 120:300, 1] = np.random.default_rng(1).integers(0, 256, (170, 180))  # texture in G
    face = analysis.largest(image)
    crop = norm_crop(image, face.kps, 112)
    with torch.inference_mode():  # the exported torch module, ArcFace's (x - 127.5) / 127.5 on RGB
        x = (torch.from_numpy(crop).permute(2, 0, 1)[None].float() - 127.5) / 127.5
        expected = torch.nn.functional.normalize(TinyArcFace(0)(x), dim=-1)[0].numpy()
    embedding = analysis.embed(image, face)
    assert embedding.shape == (512,)
    np.testing.assert_allclose(embedding, expected, atol=1e-5)


def test_packs_without_a_detector_or_with_broken_files_are_refused(tmp_path: Path, dirs):
    with pytest.raises(ValueError, match="not an InsightFace model pack"):
        FaceAnalysis(tmp_path)  # no .onnx at all
    (tmp_path / "w600k_r50.onnx").write_bytes((dirs[2] / "w600k_r50.onnx").read_bytes())
    with pytest.raises(ValueError, match="SCRFD detector"):
        FaceAnalysis(tmp_path)  # a recognizer only
    (tmp_path / "det_10g.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match="det_10g.onnx .* not a loadable ONNX model"):
        FaceAnalysis(tmp_path)


# ---- FaceID adapters in the lora pipeline vs diffusers -------------------------------------------------


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> LoraText2ImagePipeline:
    return LoraText2ImagePipeline(tiny_settings(tmp_path_factory.mktemp("var"), EMBER_RUNTIME="torch"))


def _face(seed: int) -> np.ndarray:
    """A 640 x 640 picture with one tiny-detector face at cell (6, 10), textured by `seed`."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (640, 640, 3), dtype=np.uint8)  # dark noise: no other cell fires
    image[320:352, 192:224] = WHITE
    image[300:372, 150:260, 1] = rng.integers(0, 256, (72, 110))  # green texture: in the crop
    return image


def _unit(dirs, name: str, images, scale: float = 1.0, shortcut: bool = True) -> IPAdapterUnit:
    from safetensors.torch import load_file

    file = dirs[1] / name
    weights = parse_ip_adapter(load_file(file), hashlib.sha256(file.read_bytes()).hexdigest())
    return IPAdapterUnit(weights, tuple(images), scale=scale, face_pack=str(dirs[2]), shortcut=shortcut)


def _request(dirs, unit: IPAdapterUnit | None, seed: int = 7) -> LoraRequest:
    ip = None
    if unit is not None:
        encoder = str(dirs[1] / "image_encoder") if unit.weights.uses_encoder else ""
        ip = IPAdapterRequest((unit,), encoder)
    return LoraRequest(
        model=ModelRef(str(dirs[0])),
        seed=seed,
        num_inference_steps=STEPS,
        ip_adapter=ip,
        width=SIZE,
        height=SIZE,
        **PROMPT,
    )


def _ours(pipeline, *requests: LoraRequest) -> list[np.ndarray]:
    results = pipeline(list(requests))
    for r in results:
        assert r.error is None, r.error
    return [r.images.numpy().astype(np.int16) for r in results]


def _reference(dirs, name: str):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    encoder = CLIPVisionModelWithProjection.from_pretrained(dirs[1] / "image_encoder")
    size = encoder.config.image_size
    pipe = StableDiffusionPipeline.from_pretrained(
        dirs[0],
        image_encoder=encoder,
        feature_extractor=CLIPImageProcessor(size=size, crop_size=size),
        safety_checker=None,
        requires_safety_checker=False,
        dtype=torch.float32,
    )
    pipe.load_ip_adapter(str(dirs[1]), subfolder="", weight_name=name, image_encoder_folder=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _theirs(pipe, analysis: FaceAnalysis, images, scale=1.0, shortcut=None, seed: int = 7) -> np.ndarray:
    """diffusers' FaceID recipe: faces[0].normed_embedding per image -> ip_adapter_image_embeds (zeros as
    the negative); Plus: the 224 norm_crop through prepare_ip_adapter_image_embeds -> clip_embeds."""
    faces = [analysis.largest(image) for image in images]
    embeds = torch.stack(
        [torch.from_numpy(analysis.embed(image, f))[None] for image, f in zip(images, faces, strict=True)]
    )[None]  # (1, n, 1, 512) as the recipe builds it
    id_embeds = torch.cat([torch.zeros_like(embeds), embeds])
    if shortcut is not None:
        crops = [
            Image.fromarray(norm_crop(image, f.kps, 224)) for image, f in zip(images, faces, strict=True)
        ]
        clip = pipe.prepare_ip_adapter_image_embeds([crops], None, torch.device("cpu"), 1, True)[0]
        layer = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        layer.clip_embeds, layer.shortcut = clip, shortcut
    pipe.set_ip_adapter_scale(scale)
    image = pipe(
        **PROMPT,
        ip_adapter_image_embeds=[id_embeds],
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
    ).images
    return (image * 255).round().astype(np.int16)


def _close(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape
    diff = int(np.abs(a - b).max())
    print(f"max pixel difference {diff} (uint8 levels)")  # shown with -s: the measured parity
    assert diff <= 1, f"max pixel difference {diff}"
    return diff


def test_faceid_matches_diffusers_and_leaves_the_base_unet_alone(pipeline, dirs, analysis):
    model_before = _ours(pipeline, _request(dirs, None))[0]
    images = [_face(1)]
    (ours,) = _ours(pipeline, _request(dirs, _unit(dirs, FACEID_WEIGHT_NAME, images, scale=0.8)))
    _close(ours, _theirs(_reference(dirs, FACEID_WEIGHT_NAME), analysis, images, scale=0.8))
    assert np.abs(ours - model_before).max() > 8, "the face must change the result"
    (other,) = _ours(pipeline, _request(dirs, _unit(dirs, FACEID_WEIGHT_NAME, [_face(2)], scale=0.8)))
    assert np.abs(ours - other).max() > 0, "another face must give another result"
    after = _ours(pipeline, _request(dirs, None))[0]
    assert np.array_equal(model_before, after), "a request without IP-Adapter changed after a FaceID one"
    base = pipeline.model(ModelRef(str(dirs[0]))).unet
    assert base.module.unet.encoder_hid_proj is None and not hasattr(base.module.unet, "peft_config")
    # the checkpoint's attention LoRA went into the IP UNet copy only (as diffusers' faceid_0 adapter)
    (copy,) = pipeline.ip_adapters._unets[base].values()
    assert list(copy.peft_config) == ["faceid_0"]


@pytest.mark.parametrize("shortcut", [True, False], ids=["plus-v2", "plus-v1"])
def test_faceid_plus_matches_diffusers(pipeline, dirs, analysis, shortcut):
    images = [_face(3), _face(4)]
    unit = _unit(dirs, FACEID_PLUS_WEIGHT_NAME, images, shortcut=shortcut)
    (ours,) = _ours(pipeline, _request(dirs, unit))
    _close(ours, _theirs(_reference(dirs, FACEID_PLUS_WEIGHT_NAME), analysis, images, shortcut=shortcut))


def test_no_face_fails_only_that_request_naming_the_image(pipeline, dirs):
    blank = _request(dirs, _unit(dirs, FACEID_WEIGHT_NAME, [np.zeros((64, 64, 3), np.uint8)]))
    results = pipeline([blank, _request(dirs, None)])
    assert results[0].error is not None and "ip_adapter[0].ip_adapter_image_url" in results[0].error
    assert "no face" in results[0].error
    assert results[1].error is None


def test_sdxl_faceid_and_plus_match_diffusers(tmp_path_factory: pytest.TempPathFactory, dirs, analysis):
    """The same stage on an SDXL base (ip-adapter-faceid_sdxl / faceid-plusv2_sdxl layouts: the UNet's
    2048-wide cross-attention there, its text_time conditions beside the face embeds)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from ember.specs.demo_sdxl import build_tiny_sdxl

    root = tmp_path_factory.mktemp("faceid-xl")
    xl = build_tiny_sdxl(root / "tiny-sdxl-base")
    xl_dirs = (xl, build_tiny_faceid(root / "faceid-xl", xl), dirs[2])
    settings = tiny_settings(root / "var", EMBER_RUNTIME="torch", EMBER_LORA_MODEL_ROOT=str(root))
    pipeline = LoraText2ImagePipeline(settings)
    images = [_face(5)]
    for name, shortcut in ((FACEID_WEIGHT_NAME, None), (FACEID_PLUS_WEIGHT_NAME, True)):
        unit = _unit(xl_dirs, name, images, shortcut=bool(shortcut))
        (ours,) = _ours(pipeline, _request(xl_dirs, unit))
        encoder = CLIPVisionModelWithProjection.from_pretrained(xl_dirs[1] / "image_encoder")
        size = encoder.config.image_size
        pipe = StableDiffusionXLPipeline.from_pretrained(
            xl,
            image_encoder=encoder,
            feature_extractor=CLIPImageProcessor(size=size, crop_size=size),
            add_watermarker=False,
            dtype=torch.float32,
        )
        pipe.load_ip_adapter(str(xl_dirs[1]), subfolder="", weight_name=name, image_encoder_folder=None)
        pipe.set_progress_bar_config(disable=True)
        _close(ours, _theirs(pipe, analysis, images, shortcut=shortcut))
