"""fal-client, unmodified, against the real gateway + tritonserver: fal-ai/lora's ip_adapter with a FaceID
adapter (.safetensors, under the model root) and insight_face_model_path naming a tiny InsightFace-signature
pack directory there (ember.specs.demo_face_id): the Triton model detects and embeds the face on ONNX
Runtime, and the served image matches diffusers' FaceID recipe fed the same embedding."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from ember.settings import Settings
from tests.contract.test_lora_ip_adapter_client import ARGS, _data_uri, _pixels
from tests.contract.test_lora_python_client import ENDPOINT, tiny_model  # noqa: F401 - the fixture

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def faceid_dirs(stack_settings: Settings, tiny_model: str) -> tuple[Path, Path]:  # noqa: F811
    from ember.specs.demo_face_id import FACEID_WEIGHT_NAME, build_tiny_faceid, build_tiny_insightface

    adapter = stack_settings.lora_models_dir / "tiny-faceid"
    pack = stack_settings.lora_models_dir / "tiny-buffalo"
    if not (adapter / FACEID_WEIGHT_NAME).is_file():
        build_tiny_faceid(adapter, Path(tiny_model))
    if not (pack / "w600k_r50.onnx").is_file():
        build_tiny_insightface(pack)
    return adapter.resolve(), pack.resolve()


def _face() -> np.ndarray:
    """One tiny-detector face (a saturated stride-32 cell) in dark noise, green texture around it."""
    rng = np.random.default_rng(11)
    image = rng.integers(0, 60, (640, 640, 3), dtype=np.uint8)
    image[320:352, 192:224] = 255
    image[300:372, 150:260, 1] = rng.integers(0, 256, (72, 110))
    return image


def _reference(model: str, adapter: Path, pack: Path, image: np.ndarray) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    from ember.pipeline.face_analysis import FaceAnalysis
    from ember.specs.demo_face_id import FACEID_WEIGHT_NAME

    analysis = FaceAnalysis(pack)
    embedding = torch.from_numpy(analysis.embed(image, analysis.largest(image)))[None, None, None]
    pipe = StableDiffusionPipeline.from_pretrained(
        model, safety_checker=None, requires_safety_checker=False, dtype=torch.float32
    )
    pipe.load_ip_adapter(
        str(adapter), subfolder="", weight_name=FACEID_WEIGHT_NAME, image_encoder_folder=None
    )
    pipe.set_ip_adapter_scale(0.8)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=ARGS["prompt"],
        negative_prompt=ARGS["negative_prompt"],
        ip_adapter_image_embeds=[torch.cat([torch.zeros_like(embedding), embedding])],  # (2, 1, 1, 512)
        height=64,
        width=64,
        num_inference_steps=ARGS["num_inference_steps"],
        guidance_scale=ARGS["guidance_scale"],
        generator=torch.Generator("cpu").manual_seed(ARGS["seed"]),
        output_type="np",
    ).images[0]
    return (out * 255).round().astype(np.int16)


def test_faceid_served_matches_diffusers(
    fal_client: ModuleType,
    tiny_model: str,  # noqa: F811 - the imported fixture
    client_env,
    faceid_dirs: tuple[Path, Path],
) -> None:
    from ember.specs.demo_face_id import FACEID_WEIGHT_NAME

    cafile = client_env["SSL_CERT_FILE"]
    adapter, pack = faceid_dirs
    image = _face()
    entry = {
        "ip_adapter_image_url": _data_uri(image),
        "path": str(adapter),
        "weight_name": FACEID_WEIGHT_NAME,
        "insight_face_model_path": str(pack),
        "scale": 0.8,
    }
    args = {**ARGS, "model_name": tiny_model}
    before = _pixels(fal_client.run(ENDPOINT, arguments=args), cafile)
    served = _pixels(fal_client.run(ENDPOINT, arguments={**args, "ip_adapter": [entry]}), cafile)
    diff = int(np.abs(served - _reference(tiny_model, adapter, pack, image)).max())
    print(f"FaceID served vs diffusers: max {diff} uint8 levels")
    # Same float32 CPU kernels in Triton's stub and here, other thread counts: at most 1 level apart.
    assert diff <= 1
    assert np.abs(served - before).max() > 8, "the face must change the image"
    # The same pack as a .zip URL (a data: URI here; http(s) and storage URLs take the same path): streamed
    # to the checkpoint store and unpacked on the Triton side, the same image.
    import base64
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for onnx in sorted(pack.glob("*.onnx")):
            archive.write(onnx, f"tiny-buffalo/{onnx.name}")
    zipped = "data:application/zip;base64," + base64.b64encode(buffer.getvalue()).decode()
    from_zip = fal_client.run(
        ENDPOINT, arguments={**args, "ip_adapter": [{**entry, "insight_face_model_path": zipped}]}
    )
    assert np.array_equal(_pixels(from_zip, cafile), served)
