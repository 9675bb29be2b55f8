"""The worker against a real tritonserver: the stand-in model in standin_lcm/ serves the real `lcm`
config (same tensors, decoupled, one PROGRESS response per step), so these tests cover the whole job
path (to_triton -> gRPC stream -> progress logs -> to_output -> stored files / data URIs), cancel of
a running job, Triton's error codes, and drain, in seconds and without the diffusion pipeline."""

from __future__ import annotations

import asyncio
import base64
import io
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from ember.endpoints.registry import ENDPOINTS
from ember.gateway.app import GatewayApps, build_apps
from ember.gateway.backend import TritonBackend
from ember.gateway.jobs import Status
from ember.gateway.state import GatewayState
from ember.settings import Settings
from tests.gateway.conftest import QUEUE_BASE, RUN_BASE, client, dead_port, make_settings
from tests.stacks import standin_repository

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SMALL = {"prompt": "a cat", "image_size": {"width": 64, "height": 48}}


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    try:
        from ember.triton import find_triton, start_triton
    except ImportError as exc:
        pytest.skip(f"ember.triton is not importable: {exc}")
    root = tmp_path_factory.mktemp("triton")
    repo = standin_repository(root)
    http, grpc, metrics = dead_port(), dead_port(), dead_port()
    settings = make_settings(root / "var", EMBER_MODEL_REPOSITORY=str(repo), EMBER_TRITON_HTTP_PORT=str(http),
                             EMBER_TRITON_GRPC_PORT=str(grpc), EMBER_TRITON_METRICS_PORT=str(metrics),
                             EMBER_TRITON_GRPC_URL=f"127.0.0.1:{grpc}")
    try:
        find_triton(settings)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    log = root / "triton.log"
    proc: subprocess.Popen[bytes] = start_triton(settings, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tritonserver did not start:\n{log.read_text()[-3000:]}") from None
                time.sleep(0.2)
        yield settings
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def live(triton: Settings, tmp_path: Path) -> AsyncIterator[tuple[GatewayState, GatewayApps]]:
    settings = make_settings(tmp_path / "var", EMBER_TRITON_GRPC_URL=triton.triton_grpc_url)
    state = await GatewayState.open(settings, TritonBackend(settings.triton_grpc_url), retry_delay=0.05)
    try:
        yield state, build_apps(state)
    finally:
        await state.close(drain_timeout=5.0)


async def _wait_completed(c: httpx.AsyncClient, rid: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = await c.get(f"/fal-ai/lcm/requests/{rid}/status", params={"logs": "true"})
        if r.json()["status"] == "COMPLETED":
            assert r.status_code == 200
            body: dict[str, Any] = r.json()
            return body
        assert r.status_code == 202
        await asyncio.sleep(0.05)
    raise AssertionError(f"{rid} did not complete in {timeout}s")


async def test_ready_when_triton_serves_the_models(live: tuple[GatewayState, GatewayApps]) -> None:
    _, apps = live
    async with client(apps.run, RUN_BASE, auth=False) as c:
        r = await c.get("/ready")
    assert r.status_code == 200
    assert r.json()["models"] == sorted({e.triton_model for e in ENDPOINTS.values()})


async def test_queued_job_runs_with_step_logs_and_stored_images(live: tuple[GatewayState, GatewayApps]) -> None:
    state, apps = live
    async with client(apps.queue, QUEUE_BASE) as c:
        r = await c.post("/fal-ai/lcm", json={**SMALL, "seed": 0x123456, "num_inference_steps": 3,
                                               "num_images": 2, "request_id": "mine", "negative_prompt": "fog"})
        rid = r.json()["request_id"]
        status = await _wait_completed(c, rid)
        result = (await c.get(f"/fal-ai/lcm/requests/{rid}")).json()
    assert status["error"] is None and status["metrics"]["inference_time"] > 0
    messages = [e["message"] for e in status["logs"]]
    assert messages[-3:] == ["step 1/3", "step 2/3", "step 3/3"]
    assert any("negative_prompt" in m for m in messages[:-3])  # the endpoint's notes come first
    assert set(result) == {"images", "timings", "seed", "num_inference_steps", "request_id",
                           "nsfw_content_detected"}
    assert (result["seed"], result["num_inference_steps"], result["request_id"]) == (0x123456, 3, "mine")
    assert result["nsfw_content_detected"] == [False, False]
    assert result["timings"] == {"inference": 0.1}
    assert len(result["images"]) == 2
    for image in result["images"]:
        assert set(image) == {"url", "width", "height", "content_type"}
        assert (image["width"], image["height"], image["content_type"]) == (64, 48, "image/jpeg")
        assert image["url"].startswith(f"{state.run_base}/files/") and image["url"].endswith(".jpg")
        async with client(apps.run, RUN_BASE, auth=False) as files:
            data = (await files.get(image["url"].removeprefix(state.run_base))).content
        pixels = np.asarray(Image.open(io.BytesIO(data)))
        assert np.abs(pixels.astype(int) - [0x56, 0x34, 0x12]).max() <= 3  # the seed's colour, via JPEG


async def test_sync_run_with_sync_mode_returns_data_uris(live: tuple[GatewayState, GatewayApps]) -> None:
    state, apps = live
    async with client(apps.run, RUN_BASE) as c:
        r = await c.post("/fal-ai/lcm", json={**SMALL, "seed": 7, "sync_mode": True})
    assert r.status_code == 200, r.text
    rid = r.headers["x-fal-request-id"]
    image = r.json()["images"][0]
    assert image["url"].startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(image["url"].split(",", 1)[1]))).size == (64, 48)
    job = await state.jobs.get(rid)
    assert job is not None and job.mode == "run" and job.status is Status.COMPLETED
    assert not any(state.settings.files_dir.iterdir())


async def test_cancel_running_job_closes_its_stream(live: tuple[GatewayState, GatewayApps]) -> None:
    state, apps = live
    async with client(apps.queue, QUEUE_BASE) as c:
        rid = (await c.post("/fal-ai/lcm", json={**SMALL, "num_inference_steps": 12})).json()["request_id"]
        for _ in range(200):
            body = (await c.get(f"/fal-ai/lcm/requests/{rid}/status", params={"logs": 1})).json()
            if body["status"] == "IN_PROGRESS" and any(e["message"].startswith("step") for e in body["logs"]):
                break
            await asyncio.sleep(0.02)
        assert body["status"] == "IN_PROGRESS"
        r = await c.put(f"/fal-ai/lcm/requests/{rid}/cancel")
        assert r.status_code == 202
        status = await _wait_completed(c, rid)
        assert status["error_type"] == "request_cancelled"
        steps = [e for e in status["logs"] if e["message"].startswith("step")]
        assert len(steps) < 12
        assert state.worker.running == 0  # the job's task ended with its stream
        assert (await c.get(f"/fal-ai/lcm/requests/{rid}")).status_code == 400
        # Triton is free again: the next job runs to the end.
        nxt = (await c.post("/fal-ai/lcm", json={**SMALL, "num_inference_steps": 1})).json()["request_id"]
        assert (await _wait_completed(c, nxt))["error"] is None


@pytest.mark.parametrize(("prompt", "status", "error_type"), [
    ("fail invalid", 422, "validation_error"),
    ("fail internal", 500, "internal_server_error"),
])
async def test_triton_errors_map_to_the_error_table(
    live: tuple[GatewayState, GatewayApps], prompt: str, status: int, error_type: str
) -> None:
    _, apps = live
    async with client(apps.run, RUN_BASE) as c:
        r = await c.post("/fal-ai/lcm", json={**SMALL, "prompt": prompt})
    assert r.status_code == status
    assert r.headers["x-fal-error-type"] == error_type
    assert r.headers["x-fal-request-id"]
    assert "stand-in" in r.text


async def test_drain_requeues_a_running_job_and_the_next_start_finishes_it(
    triton: Settings, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path / "var", EMBER_TRITON_GRPC_URL=triton.triton_grpc_url)
    state = await GatewayState.open(settings, TritonBackend(settings.triton_grpc_url))
    async with client(build_apps(state).queue, QUEUE_BASE) as c:
        rid = (await c.post("/fal-ai/lcm", json={**SMALL, "num_inference_steps": 12})).json()["request_id"]
    job = state.jobs.active[rid]
    for _ in range(200):
        if job.status is Status.IN_PROGRESS:
            break
        await asyncio.sleep(0.01)
    await state.close(drain_timeout=0.05)  # shorter than the job: it is put back, not lost
    assert (job.status, job.attempts) == (Status.IN_QUEUE, 0)

    state = await GatewayState.open(settings, TritonBackend(settings.triton_grpc_url))
    try:
        done = await asyncio.wait_for(state.jobs.wait(state.jobs.active[rid]), 20)
        assert done.error is None and done.attempts == 1
    finally:
        await state.close(5.0)
