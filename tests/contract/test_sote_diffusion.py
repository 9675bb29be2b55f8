"""fal-client 1.0.3, unmodified, against the real gateway + tritonserver: fal-ai/stable-cascade/sote-diffusion.

The first test sends the seed document's example payload as is (1024 x 1536, 25 + 10 steps, safety checker
on): with the tiny models it takes ~8 s on 2 busy cores (measured 06:35 UTC: prior 2.7 s, decoder 3.0 s,
VQGAN 1.9 s, safety 0.2 s).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
from types import ModuleType

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from PIL import Image
from tritonclient.utils import np_to_triton_dtype

from tests.contract.status_logs import log_messages

pytestmark = pytest.mark.e2e

ENDPOINT = "fal-ai/stable-cascade/sote-diffusion"

# fal's "Full Example" input (../shared/seeds, SoteDiffusion; fal-schemas.md §2), unchanged.
EXAMPLE = {
    "prompt": "newest, extremely aesthetic, best quality, 1girl, solo, pink hair, blue eyes, long hair, "
    'looking at viewer, smile, black background, holding a sign, the text on the sign says "Hello"',
    "negative_prompt": "very displeasing, worst quality, monochrome, realistic, oldest",
    "first_stage_steps": 25,
    "second_stage_steps": 10,
    "guidance_scale": 8,
    "second_stage_guidance_scale": 2,
    "image_size": {"height": 1536, "width": 1024},
    "enable_safety_checker": True,
    "num_images": 1,
}


def test_seed_document_example_payload(fal_client: ModuleType, client_env) -> None:
    updates = []
    result = fal_client.subscribe(ENDPOINT, arguments=EXAMPLE, with_logs=True, on_queue_update=updates.append)
    assert set(result) == {"images", "timings", "seed", "has_nsfw_concepts", "prompt"}
    [image] = result["images"]
    assert (image["width"], image["height"]) == (1024, 1536)
    assert image["content_type"] == "image/jpeg" and image["url"].startswith("https://")
    response = httpx.get(image["url"], verify=client_env["SSL_CERT_FILE"], timeout=30)
    response.raise_for_status()
    downloaded = Image.open(io.BytesIO(response.content))
    assert downloaded.format == "JPEG" and downloaded.size == (1024, 1536)
    assert isinstance(result["seed"], int)  # random, returned
    assert result["prompt"] == EXAMPLE["prompt"]
    assert result["has_nsfw_concepts"] == [False]  # the checker ran (tiny random weights flag nothing)
    assert {"prior", "decoder", "decode", "safety", "total"} <= set(result["timings"])
    # Progress counts both stages: 25 + 10 = 35 steps.
    messages = log_messages(fal_client, updates)
    assert any("35/35" in m for m in messages), messages


def test_sync_mode_seed_and_num_images(fal_client: ModuleType) -> None:
    args = {
        "prompt": "a red fox",
        "image_size": "square_hd",
        "first_stage_steps": 4,
        "second_stage_steps": 4,
        "num_images": 2,
        "seed": 7,
        "sync_mode": True,
        "enable_safety_checker": False,
    }
    first = fal_client.run(ENDPOINT, arguments=args)
    assert first["seed"] == 7 and first["has_nsfw_concepts"] == [False, False]
    urls = [image["url"] for image in first["images"]]
    assert all(u.startswith("data:image/jpeg;base64,") for u in urls)
    decoded = Image.open(io.BytesIO(base64.b64decode(urls[0].split(",", 1)[1])))
    assert decoded.size == (1024, 1024)
    assert urls[0] != urls[1]  # two images of one request differ
    again = fal_client.run(ENDPOINT, arguments=args)
    assert [image["url"] for image in again["images"]] == urls  # same seed, same JPEG bytes


@pytest.mark.parametrize(
    "arguments, loc",
    [
        ({"prompt": "x", "first_stage_steps": 3}, ["body", "first_stage_steps"]),
        ({"prompt": "x", "second_stage_steps": 25}, ["body", "second_stage_steps"]),
        ({"prompt": "x", "num_images": 5}, ["body", "num_images"]),
        ({"prompt": "x", "guidance_scale": 21}, ["body", "guidance_scale"]),
        ({"negative_prompt": "no prompt"}, ["body", "prompt"]),
        ({"prompt": "x", "image_size": {"width": 1000, "height": 1536}}, ["body", "image_size", "width"]),
        ({"prompt": "x", "image_size": "landscape_16_9"}, ["body", "image_size"]),
    ],
)
def test_schema_errors_are_422(fal_client: ModuleType, arguments: dict, loc: list) -> None:
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.submit(ENDPOINT, arguments=arguments)
    assert info.value.status_code == 422
    detail = info.value.response.json()["detail"]
    assert detail[0]["loc"] == loc and detail[0]["msg"] and detail[0]["type"]


async def _triton_generate(url: str, seed: int, **inputs: int) -> dict:
    """Stream one request to the `sote_diffusion` Triton model over gRPC (no gateway): progress, then images."""
    client = grpcclient.InferenceServerClient(url=url)
    arrays = {"PROMPT": np.array([[b"a boat"]], dtype=np.object_), "SEED": np.array([[seed]], dtype=np.int64)}
    arrays.update({name: np.array([[value]], dtype=np.int32) for name, value in inputs.items()})
    tensors = []
    for name, value in arrays.items():
        tensor = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        tensor.set_data_from_numpy(value)
        tensors.append(tensor)

    async def requests():
        yield {"model_name": "sote_diffusion", "inputs": tensors, "request_id": f"sote-{seed}"}

    out: dict = {"progress": []}
    try:
        async for result, error in client.stream_infer(inputs_iterator=requests()):
            if error is not None:
                raise RuntimeError(error.message())
            progress = result.as_numpy("PROGRESS")
            if progress is not None:
                out["progress"].append(progress.reshape(-1).tolist())
                continue
            out["images"] = result.as_numpy("IMAGES")[0]
            out["nsfw"] = result.as_numpy("NSFW")[0].tolist()
            out["timings"] = json.loads(result.as_numpy("TIMINGS").reshape(-1)[0])
            break
    finally:
        await client.close()
    return out


def test_triton_direct_progress_and_batching(stack) -> None:
    """Typed inputs with server defaults for the rest (safety checker on); concurrent requests that Triton's
    dynamic batcher groups give each its single result (at most 1 level, batch-size-dependent summation)."""
    url = stack.settings.triton_grpc_url
    small = {"WIDTH": 256, "HEIGHT": 384, "FIRST_STAGE_STEPS": 4, "SECOND_STAGE_STEPS": 4}
    seeds = [21, 22, 23]

    async def many():
        return await asyncio.gather(*(_triton_generate(url, seed, **small) for seed in seeds))

    together = asyncio.run(many())
    for seed, out in zip(seeds, together, strict=True):
        assert out["progress"] == [[step, 8] for step in range(1, 9)]
        assert out["images"].shape == (1, 384, 256, 3) and out["nsfw"] == [False]
        single = asyncio.run(_triton_generate(url, seed, **small))
        assert np.abs(out["images"].astype(int) - single["images"].astype(int)).max() <= 1
