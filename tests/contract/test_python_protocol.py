"""fal-client 1.0.3, unmodified, through the rest of fal's protocol against the real stack (Triton +
the real `lcm` model + the gateway): SSE stream, realtime (with and without a JWT), storage (CDN
path, multipart, the `fal` fallback, lifecycles), webhooks, and a cancel that stops the model.

Storage and realtime tokens live on fal's hard-coded REST / CDN hosts; the only change made to the
client is the one fal-protocol.md §1.1 (i) describes: `fal_client.client.REST_URL` and `CDN_URL`
point at the gateway's REST listener."""

from __future__ import annotations

import io
import json
import ssl
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from PIL import Image

from tests.webhook_receiver import Receiver, verify

pytestmark = pytest.mark.e2e

ENDPOINT = "fal-ai/lcm"
SMALL = {"prompt": "a lighthouse", "image_size": {"width": 64, "height": 64}}


@pytest.fixture(scope="session")
def fal_rest(fal_client: ModuleType, client_env: dict[str, str]) -> ModuleType:
    """fal_client with REST_URL / CDN_URL at the gateway (read at call time; patched before first use)."""
    fal_client.client.REST_URL = client_env["EMBER_REST_URL"]
    fal_client.client.CDN_URL = client_env["EMBER_REST_URL"]
    return fal_client


def _get(url: str, client_env: dict[str, str]) -> httpx.Response:
    return httpx.get(url, verify=ssl.create_default_context(cafile=client_env["SSL_CERT_FILE"]), timeout=60)


def test_stream_yields_progress_then_the_output(fal_client: ModuleType) -> None:
    events = list(fal_client.stream(ENDPOINT, arguments={**SMALL, "num_inference_steps": 3, "seed": 4},
                                    path="/stream"))
    progress = [e["progress"]["step"] for e in events if e.get("status") == "IN_PROGRESS" and "progress" in e]
    assert progress == [1, 2, 3]
    final = events[-1]
    assert final["seed"] == 4 and len(final["images"]) == 1 and final["num_inference_steps"] == 3


def test_realtime_without_jwt(fal_client: ModuleType) -> None:
    with fal_client.realtime(ENDPOINT, use_jwt=False) as connection:
        for i in range(3):
            connection.send({**SMALL, "seed": i, "request_id": f"py-{i}"})
        results = [connection.recv() for _ in range(3)]
        connection.send({**SMALL, "num_inference_steps": 0})
        with pytest.raises(fal_client.client.RealtimeError) as info:
            connection.recv()
    assert [r["request_id"] for r in results] == ["py-0", "py-1", "py-2"]  # in order, echoed
    assert [r["seed"] for r in results] == [0, 1, 2]
    image = results[0]["images"][0]
    assert image["url"].startswith("data:image/jpeg;base64,") and (image["width"], image["height"]) == (64, 64)
    assert info.value.error == "VALIDATION_ERROR" and "num_inference_steps" in info.value.reason


def test_realtime_with_a_jwt_from_the_rest_host(fal_rest: ModuleType) -> None:
    with fal_rest.realtime(ENDPOINT, max_buffering=4) as connection:  # use_jwt=True: POST {REST_URL}/tokens/
        connection.send({**SMALL, "seed": 21, "request_id": "jwt"})
        result = connection.recv()
    assert (result["seed"], result["request_id"]) == (21, "jwt")


def test_upload_file_through_the_cdn_path(fal_rest: ModuleType, tmp_path: Path, client_env: dict[str, str]) -> None:
    path = tmp_path / "cat.png"
    Image.new("RGB", (20, 10), (200, 100, 50)).save(path)
    url = fal_rest.upload_file(path)
    assert url.startswith(client_env["EMBER_REST_URL"] + "/files/") and url.endswith(".png")
    r = _get(url, client_env)
    assert r.status_code == 200 and r.content == path.read_bytes() and r.headers["content-type"] == "image/png"
    image_url = fal_rest.upload_image(Image.new("RGB", (8, 8)), format="png")
    assert Image.open(io.BytesIO(_get(image_url, client_env).content)).size == (8, 8)


def test_upload_fallback_repository_fal(fal_rest: ModuleType, client_env: dict[str, str]) -> None:
    # repository="fal": initiate?storage_type=gcs, then PUT to the signed upload_url.
    url = fal_rest.upload(b"plain bytes", "text/plain", file_name="notes.txt", repository="fal")
    r = _get(url, client_env)
    assert r.content == b"plain bytes" and r.headers["content-type"].startswith("text/plain")


def test_upload_over_100mb_is_multipart(fal_rest: ModuleType, client_env: dict[str, str]) -> None:
    size = fal_rest.client.MULTIPART_THRESHOLD + 1  # 11 parts of 10 MB
    data = bytes(range(256)) * (size // 256) + b"\x01" * (size % 256)
    url = fal_rest.upload(data, "application/octet-stream", file_name="big.bin")
    with httpx.stream("GET", url, verify=ssl.create_default_context(cafile=client_env["SSL_CERT_FILE"]),
                      timeout=120) as r:
        assert r.status_code == 200 and int(r.headers["content-length"]) == size
        head = next(r.iter_bytes(4096))
    assert head == data[:len(head)]


def test_upload_lifecycle_expires_the_file(fal_rest: ModuleType, client_env: dict[str, str]) -> None:
    import time

    url = fal_rest.upload(b"short-lived", "text/plain", lifecycle=fal_rest.client.StorageSettings(expires_in=1))
    assert _get(url, client_env).status_code == 200
    time.sleep(1.2)
    assert _get(url, client_env).status_code == 404


def test_submit_with_webhook_priority_hint_and_start_timeout(fal_client: ModuleType, receiver: Receiver,
                                                              client_env: dict[str, str]) -> None:
    handle = fal_client.submit(ENDPOINT, arguments={**SMALL, "seed": 77}, webhook_url=receiver.url,
                               priority="low", hint="cpu-pool", start_timeout=60)
    result = handle.get()
    receiver.wait(1, timeout=30)
    headers, body, _ = receiver.seen[0]
    jwks = _get(client_env["EMBER_REST_URL"] + "/.well-known/jwks.json", client_env).json()
    assert verify(jwks, headers, body)
    assert json.loads(body) == {"request_id": handle.request_id, "gateway_request_id": handle.request_id,
                                "status": "OK", "payload": result}


def test_cancel_stops_the_model_within_steps(fal_client: ModuleType) -> None:
    # The most steps fal allows, cancelled once the first step is logged: the model checks
    # is_cancelled() at most every 50 ms (steps here take longer), so at most a step or two more run.
    handle = fal_client.submit(ENDPOINT, arguments={"prompt": "a forest", "num_inference_steps": 12,
                                                    "image_size": {"width": 512, "height": 512}})
    for _ in range(600):
        status = handle.status(with_logs=True)
        if isinstance(status, fal_client.InProgress) and any(
                log["message"].startswith("step") for log in status.logs or []):
            break
    handle.cancel()
    final = None
    for _ in range(600):
        final = handle.status(with_logs=True)
        if isinstance(final, fal_client.Completed):
            break
    assert isinstance(final, fal_client.Completed)
    steps = [log["message"] for log in final.logs if log["message"].startswith("step ")]
    assert 1 <= len(steps) <= 3, steps
    with pytest.raises(fal_client.client.FalClientHTTPError) as info:
        handle.get()
    assert info.value.status_code == 400 and info.value.error_type == "request_cancelled"
    # The model is free again: the next request runs to the end.
    assert fal_client.run(ENDPOINT, arguments={**SMALL, "num_inference_steps": 1})["images"]


def test_an_uploaded_file_is_an_input(fal_rest: ModuleType, tmp_path: Path) -> None:
    # The upload's URL is on the gateway's own (loopback) address: it is read from the file store, not
    # refused by the public-address rule that applies to every other URL input.
    path = tmp_path / "start.png"
    Image.new("RGB", (128, 96), (30, 120, 200)).save(path)
    url = fal_rest.upload_file(path)
    result = fal_rest.run(ENDPOINT, arguments={"prompt": "a lake", "image_url": url, "strength": 0.5,
                                               "num_inference_steps": 2, "seed": 1})
    assert len(result["images"]) == 1
    with pytest.raises(fal_rest.client.FalClientHTTPError) as info:
        fal_rest.run(ENDPOINT, arguments={"prompt": "a lake", "image_url": "http://10.0.0.1/private.png"})
    assert info.value.status_code == 422
    assert info.value.response.json()["detail"][0]["loc"] == ["body", "image_url"]
