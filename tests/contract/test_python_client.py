"""fal-client 1.0.3, unmodified, against the real gateway + tritonserver (fal-ai/lcm)."""

from __future__ import annotations

import io
from types import ModuleType

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.contract.status_logs import log_messages

pytestmark = pytest.mark.e2e

ENDPOINT = "fal-ai/lcm"


def _download(url: str, cafile: str) -> Image.Image:
    response = httpx.get(url, verify=cafile, timeout=30)
    response.raise_for_status()
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def test_subscribe_with_logs_returns_a_downloadable_512_image(fal_client: ModuleType, client_env) -> None:
    updates = []
    result = fal_client.subscribe(
        ENDPOINT,
        arguments={"prompt": "a black cat with glowing eyes"},
        with_logs=True,
        on_queue_update=updates.append,
    )
    assert len(result["images"]) == 1
    image = result["images"][0]
    assert (image["width"], image["height"]) == (512, 512)
    assert image["content_type"] == "image/jpeg"
    assert image["url"].startswith("https://")
    downloaded = _download(image["url"], client_env["SSL_CERT_FILE"])
    assert downloaded.size == (512, 512) and downloaded.format == "JPEG"
    assert isinstance(result["seed"], int)
    assert result["num_inference_steps"] == 4
    assert result["nsfw_content_detected"] == [False]
    assert result["timings"] and all(isinstance(v, float) for v in result["timings"].values())
    # Per-step progress reached the client as logs.
    messages = log_messages(fal_client, updates)
    assert any("4/4" in m for m in messages), messages


def test_run_same_seed_gives_same_pixels_and_custom_size(fal_client: ModuleType, client_env) -> None:
    args = {"prompt": "a lighthouse at dusk", "seed": 1234, "image_size": {"width": 256, "height": 192}}
    first = fal_client.run(ENDPOINT, arguments=args)
    second = fal_client.run(ENDPOINT, arguments=args)
    assert first["seed"] == second["seed"] == 1234
    a = np.asarray(_download(first["images"][0]["url"], client_env["SSL_CERT_FILE"]))
    b = np.asarray(_download(second["images"][0]["url"], client_env["SSL_CERT_FILE"]))
    assert a.shape == (192, 256, 3)
    assert np.array_equal(a, b)
    other = fal_client.run(ENDPOINT, arguments={**args, "seed": 1235})
    c = np.asarray(_download(other["images"][0]["url"], client_env["SSL_CERT_FILE"]))
    assert not np.array_equal(a, c)


def test_submit_status_result(fal_client: ModuleType, client_env) -> None:
    handle = fal_client.submit(
        ENDPOINT,
        arguments={"prompt": "a red fox", "num_images": 2, "image_size": "square", "seed": 7,
                   "request_id": "my-request", "sync_mode": True},
    )
    assert handle.request_id
    status = handle.status(with_logs=True)
    assert isinstance(status, (fal_client.Queued, fal_client.InProgress, fal_client.Completed))
    result = handle.get()
    final = handle.status(with_logs=True)
    assert isinstance(final, fal_client.Completed)
    assert final.logs and any("step" in log["message"] for log in final.logs)
    assert result["request_id"] == "my-request"
    assert len(result["images"]) == 2
    # sync_mode: data URIs, not hosted files.
    for image in result["images"]:
        assert image["url"].startswith("data:image/jpeg;base64,")
    # Both images of one request differ (different noise), as fal documents for num_images.
    assert result["images"][0]["url"] != result["images"][1]["url"]
    # The top-level helpers build the same URLs themselves (fal-protocol.md §1.1).
    assert fal_client.result(ENDPOINT, handle.request_id) == result


def test_cancel_a_finished_request_answers_already_completed(fal_client: ModuleType) -> None:
    handle = fal_client.submit(ENDPOINT, arguments={"prompt": "a tree", "image_size": {"width": 64, "height": 64}})
    handle.get()
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        handle.cancel()
    assert info.value.status_code == 400


def test_schema_errors_are_422_with_detail(fal_client: ModuleType) -> None:
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments={"prompt": "x", "num_inference_steps": 13})
    assert info.value.status_code == 422
    detail = info.value.response.json()["detail"]
    assert detail[0]["loc"] == ["body", "num_inference_steps"]
    assert detail[0]["type"] and detail[0]["msg"]

    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.submit(ENDPOINT, arguments={"negative_prompt": "no prompt"})
    assert info.value.status_code == 422
    assert info.value.response.json()["detail"][0]["loc"] == ["body", "prompt"]

    # A URL input the server must never fetch (a local file) is refused at its field before the job runs.
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        fal_client.run(ENDPOINT, arguments={"prompt": "x", "model": "sdxl", "lora_url": "file:///etc/passwd"})
    assert info.value.status_code == 422
    assert info.value.response.json()["detail"][0]["loc"] == ["body", "lora_url"]


def test_wrong_key_is_401(fal_client: ModuleType, client_env) -> None:
    client = fal_client.SyncClient(key="wrong:key")
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        client.run(ENDPOINT, arguments={"prompt": "x"})
    assert info.value.status_code == 401
    assert isinstance(info.value.response.json()["detail"], str)
