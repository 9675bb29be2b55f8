"""Gateway tests: the real apps over a real GatewayState (SQLite, files, keys) in a temp var/.

No model runs here. The backend is a real TritonBackend pointed at a loopback port where nothing
listens, i.e. an inference server that is down; tests that need jobs to stay queued open the state
without its workers (`start_worker=False`), which is how a job looks before a worker takes it.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from ember.gateway.app import GatewayApps, build_apps
from ember.gateway.backend import TritonBackend
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
    values = {"EMBER_VAR_DIR": str(var_dir), "EMBER_API_KEY": API_KEY,
              "EMBER_MAX_BODY_BYTES": str(64 * 1024), "EMBER_WORKER_CONCURRENCY": "2", **env}
    return load_settings(values, dotenv=Path("/nonexistent"))


def down_backend() -> TritonBackend:
    return TritonBackend(f"127.0.0.1:{dead_port()}")


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
