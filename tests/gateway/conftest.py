"""Gateway tests: the real apps over a real GatewayState (SQLite, files, keys) in a temp var/.

No model runs here. The backend is either a real TritonBackend pointed at a loopback port where
nothing listens, i.e. an inference server that is down, or `FakeBackend`, which streams progress and
flat images the way the `lcm` model does. Tests that need jobs to stay queued open the state without
its workers (`start_worker=False`), which is how a job looks before a worker takes it. `live_gateway`
runs the real listeners (ember.gateway.server.serve) in the test's event loop, on free ports.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from ember.gateway.app import GatewayApps, build_apps
from ember.gateway.backend import BackendError, Final, Progress, TritonBackend
from ember.gateway.server import serve
from ember.gateway.state import GatewayState
from ember.settings import Settings, load_settings

API_KEY = "test-key-id:test-key-secret"
AUTH = {"Authorization": f"Key {API_KEY}"}
RUN_BASE = "https://127.0.0.1:8443"
QUEUE_BASE = "https://127.0.0.1:8444"
HTTP_BASE = "http://127.0.0.1:8445"


def dead_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_settings(var_dir: Path, **env: str) -> Settings:
    values = {"EMBER_VAR_DIR": str(var_dir), "EMBER_API_KEY": API_KEY, "EMBER_REST_PORT": str(dead_port()),
              "EMBER_MAX_BODY_BYTES": str(64 * 1024), "EMBER_WORKER_CONCURRENCY": "2", **env}
    return load_settings(values, dotenv=Path("/nonexistent"))


def down_backend() -> TritonBackend:
    return TritonBackend(f"127.0.0.1:{dead_port()}")


class FakeBackend:
    """A Backend (ember.gateway.backend) without Triton: `steps` progress events `step_s` apart, then a
    flat image per requested image whose colour is the seed's. Prompts steer it like the stand-in
    model: "fail invalid" / "fail internal" / "fail unavailable". Records the requests it saw."""

    def __init__(self, step_s: float = 0.01) -> None:
        self.step_s = step_s
        self.requests: list[dict[str, np.ndarray]] = []
        self.cancelled = 0
        self.available = True

    async def generate(self, model: str, inputs: dict[str, np.ndarray], request_id: str
                       ) -> AsyncGenerator[Progress | Final, None]:
        self.requests.append(inputs)
        if not self.available:
            raise BackendError("unavailable", "inference server: connection refused")
        prompt = inputs["PROMPT"].reshape(-1)[0].decode()
        if prompt.startswith("fail "):
            kind = prompt.removeprefix("fail ")
            raise BackendError(kind, f"fake: {prompt}")
        steps = int(inputs["NUM_INFERENCE_STEPS"].reshape(-1)[0])
        seed = int(inputs["SEED"].reshape(-1)[0])
        n = int(inputs["NUM_IMAGES"].reshape(-1)[0])
        width, height = int(inputs["WIDTH"].reshape(-1)[0]), int(inputs["HEIGHT"].reshape(-1)[0])
        finished = False
        try:
            for step in range(1, steps + 1):
                await asyncio.sleep(self.step_s)
                yield Progress(step, steps)
            colour = np.array([seed % 256, (seed >> 8) % 256, (seed >> 16) % 256], dtype=np.uint8)
            images = np.broadcast_to(colour, (1, n, height, width, 3)).copy()
            finished = True
            yield Final({"IMAGES": images, "NSFW": np.zeros((1, n), dtype=bool),
                         "TIMINGS": np.array([[json.dumps({"inference": 0.01}).encode()]], dtype=np.object_)})
        finally:
            if not finished:
                self.cancelled += 1

    async def ready(self, models: list[str]) -> bool:
        return self.available

    async def close(self) -> None:
        pass


@dataclass
class Live:
    settings: Settings
    backend: FakeBackend
    run: str
    queue: str
    rest: str
    http: str
    ssl: ssl.SSLContext

    def client(self, base: str, **kw: object) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=base, verify=self.ssl, headers=AUTH, timeout=30, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def live_gateway(var_dir: Path, backend: FakeBackend | None = None, **env: str) -> AsyncIterator[Live]:
    """The real listeners over a FakeBackend, in this event loop, on free ports."""
    run, queue, rest, http = (dead_port() for _ in range(4))
    settings = make_settings(var_dir, EMBER_RUN_PORT=str(run), EMBER_QUEUE_PORT=str(queue),
                             EMBER_REST_PORT=str(rest), EMBER_HTTP_PORT=str(http), **env)
    fake = backend or FakeBackend()
    stop = asyncio.Event()
    task = asyncio.create_task(serve(settings, fake, stop=stop, drain_timeout=2.0))
    bundle = settings.var_dir / "tls" / "bundle.pem"
    try:
        for _ in range(200):
            if task.done():
                task.result()
            if bundle.is_file():
                context = ssl.create_default_context(cafile=str(bundle))
                try:
                    async with httpx.AsyncClient(verify=context) as c:
                        if (await c.get(f"https://127.0.0.1:{rest}/health")).status_code == 200:
                            break
                except httpx.HTTPError:
                    pass
            await asyncio.sleep(0.05)
        yield Live(settings, fake, f"https://127.0.0.1:{run}", f"https://127.0.0.1:{queue}",
                   f"https://127.0.0.1:{rest}", f"http://127.0.0.1:{http}", context)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "var")


@pytest.fixture
async def state(settings: Settings) -> AsyncIterator[GatewayState]:
    s = await GatewayState.open(settings, down_backend(), start_worker=False)
    try:
        yield s
    finally:
        await s.close(drain_timeout=1.0)


@pytest.fixture
def apps(state: GatewayState) -> GatewayApps:
    return build_apps(state)


def client(app: object, base_url: str, auth: bool = True) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=base_url,  # type: ignore[arg-type]
                             headers=AUTH if auth else None)


@pytest.fixture
async def run_client(apps: GatewayApps) -> AsyncIterator[httpx.AsyncClient]:
    async with client(apps.run, RUN_BASE) as c:
        yield c


@pytest.fixture
async def queue_client(apps: GatewayApps) -> AsyncIterator[httpx.AsyncClient]:
    async with client(apps.queue, QUEUE_BASE) as c:
        yield c


@pytest.fixture
async def http_client(apps: GatewayApps) -> AsyncIterator[httpx.AsyncClient]:
    async with client(apps.http, HTTP_BASE, auth=False) as c:
        yield c
