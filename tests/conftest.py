"""Session fixtures shared by every test tier.

`stack`: a real tritonserver + gateway (ember.serve.Stack) on free loopback ports, over the demo
models built into a session temp dir. Started once, on first use; e2e and contract tests share it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.serve import Stack, build_artifacts
from ember.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
# Every stack the tests start streams a progress response per denoising step, so tests can name the steps
# they expect; the coalescing default (50 ms) is tested on its own stack (tests/benchmarks).
os.environ.setdefault("EMBER_PROGRESS_INTERVAL_MS", "0")
# The `receiver` fixture (a webhook receiver on 127.0.0.1).
pytest_plugins = ["tests.webhook_receiver"]


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="session")
def var_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One var/ for the test session: demo models, exports, jobs, files, keys, certificates."""
    return tmp_path_factory.mktemp("var")


@pytest.fixture(scope="session")
def stack_env(var_dir: Path) -> dict[str, str]:
    run, queue, http, rest, t_http, t_grpc, t_metrics = _free_ports(7)
    env = {
        **os.environ,
        "EMBER_VAR_DIR": str(var_dir),
        "EMBER_RUN_PORT": str(run),
        "EMBER_QUEUE_PORT": str(queue),
        "EMBER_HTTP_PORT": str(http),
        "EMBER_REST_PORT": str(rest),
        # Webhook receivers in the contract tests listen on 127.0.0.1.
        "EMBER_FETCH_ALLOW": "127.0.0.1/32",
        "EMBER_WEBHOOK_RETRY_DELAY": "0.2",
        "EMBER_TRITON_HTTP_PORT": str(t_http),
        "EMBER_TRITON_GRPC_PORT": str(t_grpc),
        "EMBER_TRITON_METRICS_PORT": str(t_metrics),
        "EMBER_TRITON_GRPC_URL": f"127.0.0.1:{t_grpc}",
        "EMBER_MODEL_REPOSITORY": str(REPO / "model_repository"),
        "EMBER_WEIGHTS": "demo",
        "EMBER_API_KEY": "",
    }
    return env


@pytest.fixture(scope="session")
def stack_settings(stack_env: dict[str, str]) -> Settings:
    return load_settings(stack_env, dotenv=Path("/nonexistent"))


@pytest.fixture(scope="session")
def stack(stack_env: dict[str, str], stack_settings: Settings) -> Iterator[Stack]:
    build_artifacts(stack_settings, progress=False)
    s = Stack(stack_settings, env=stack_env)
    s.start(timeout=300)
    try:
        yield s
    finally:
        s.stop(timeout=15)


@pytest.fixture(scope="session")
def client_env(stack: Stack) -> dict[str, str]:
    return stack.client_env()
