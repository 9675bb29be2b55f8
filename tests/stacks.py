"""Dedicated stacks for tests that kill, restart or load a gateway: real tritonserver + the real
`python -m ember.gateway` (ember.serve.Stack) on free loopback ports, in their own var/.

They serve the stand-in `lcm` model (tests/gateway/standin_lcm: the real model's config, one PROGRESS
response per step, a flat image) so that they start in seconds and a job's length is set by the test
(`step_seconds`); what they test is the gateway, not the pipeline.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from ember.serve import Stack
from ember.settings import load_settings
from ember.triton import start_triton

REPO = Path(__file__).resolve().parent.parent
STANDIN = REPO / "tests" / "gateway" / "standin_lcm" / "model.py"
KEY = "stack-key-id:stack-key-secret"
AUTH = {"Authorization": f"Key {KEY}"}


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def standin_repository(root: Path, step_seconds: float = 0.05) -> Path:
    """A model repository with every real model's config (so /ready sees each endpoint's model) and the
    stand-in behind each; the tests send jobs to `lcm`, whose outputs the stand-in produces."""
    repo = root / "model_repository"
    for config_path in sorted((REPO / "model_repository").glob("*/config.pbtxt")):
        name = config_path.parent.name
        (repo / name / "1").mkdir(parents=True, exist_ok=True)
        config = config_path.read_text()
        if name == "lcm":  # several instances: a long job does not hold up the short ones behind it
            config = re.sub(r"instance_group \[[^\]]*\]", "instance_group [ { count: 3, kind: KIND_CPU } ]", config)
        config += f'\nparameters {{ key: "step_seconds" value: {{ string_value: "{step_seconds}" }} }}\n'
        (repo / name / "config.pbtxt").write_text(config)
        shutil.copy(STANDIN, repo / name / "1" / "model.py")
    return repo


class TestStack(Stack):
    """Stack plus what kill/restart tests need: SIGKILL and restart of either process."""

    __test__ = False  # not a pytest class

    @property
    def queue(self) -> str:
        return f"https://127.0.0.1:{self.settings.queue_port}"

    @property
    def run(self) -> str:
        return f"https://127.0.0.1:{self.settings.run_port}"

    @property
    def rest(self) -> str:
        return f"https://127.0.0.1:{self.settings.rest_port}"

    def client(self, base: str | None = None, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=base or self.queue, headers=AUTH, verify=self.ssl_context(), timeout=30, **kw)

    def async_client(self, base: str | None = None, **kw: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=base or self.queue, headers=AUTH, verify=self.ssl_context(), timeout=60,
                                 **kw)

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cafile))

    def kill_gateway(self) -> None:
        assert self.gateway is not None
        self.gateway.send_signal(signal.SIGKILL)
        self.gateway.wait(10)

    def start_gateway(self, timeout: float = 60) -> None:
        with open(self.gateway_log, "ab") as out:
            self.gateway = subprocess.Popen([sys.executable, "-m", "ember.gateway"], env=self.env, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_http(f"{self.run}/health", timeout)

    def kill_triton(self) -> None:
        assert self.triton is not None
        # The whole process group (Triton runs in its own session): a crash of the server's container. A
        # SIGKILL of the server alone leaves its Python backend stubs running, orphaned.
        os.killpg(self.triton.pid, signal.SIGKILL)
        self.triton.wait(10)

    def start_triton(self, timeout: float = 60) -> None:
        self.triton = start_triton(self.settings, self.triton_log)
        self.wait_http(f"http://127.0.0.1:{self.settings.triton_http_port}/v2/health/ready", timeout)

    def wait_http(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(url, verify=self.ssl_context(), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{url} not up in {timeout}s; gateway log:\n{self.gateway_log.read_text()[-3000:]}")

    def ready(self) -> int:
        return httpx.get(f"{self.run}/ready", verify=self.ssl_context(), timeout=10).status_code

    def rss_kib(self) -> int:
        """The gateway process's resident memory."""
        assert self.gateway is not None
        for line in Path(f"/proc/{self.gateway.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")


@contextmanager
def dedicated_stack(root: Path, step_seconds: float = 0.05, **env: str) -> Iterator[TestStack]:
    """A started TestStack over the stand-in model; `env` adds EMBER_* settings."""
    run, queue, rest, http, t_http, t_grpc, t_metrics = free_ports(7)
    values = {
        **os.environ,
        "EMBER_VAR_DIR": str(root / "var"),
        "EMBER_RUN_PORT": str(run), "EMBER_QUEUE_PORT": str(queue), "EMBER_REST_PORT": str(rest),
        "EMBER_HTTP_PORT": str(http), "EMBER_TRITON_HTTP_PORT": str(t_http), "EMBER_TRITON_GRPC_PORT": str(t_grpc),
        "EMBER_TRITON_METRICS_PORT": str(t_metrics), "EMBER_TRITON_GRPC_URL": f"127.0.0.1:{t_grpc}",
        "EMBER_MODEL_REPOSITORY": str(standin_repository(root, step_seconds)),
        "EMBER_API_KEY": KEY, "EMBER_FETCH_ALLOW": "127.0.0.1/32",
        **env,
    }
    stack = TestStack(load_settings(values, dotenv=Path("/nonexistent")), env=values)
    stack.start(timeout=120)
    try:
        yield stack
    finally:
        stack.stop(timeout=20)
