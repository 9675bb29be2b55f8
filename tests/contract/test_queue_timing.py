"""Queue behaviour that needs a busy queue, with both official clients against a dedicated stack (one
worker slot, a slow stand-in model), each client in its own process with only its host settings
changed: a start timeout that passes before the job starts is a 504 with
`x-fal-request-timeout-type: user` (fal's e2e expectation: PY raises it from subscribe, JS sets
ApiError.isUserTimeout), and low-priority jobs wait for normal ones."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.contract.conftest import JS_DIR
from tests.stacks import KEY, TestStack, dedicated_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def busy_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestStack]:
    with dedicated_stack(tmp_path_factory.mktemp("busy"), step_seconds=0.3, EMBER_WORKER_CONCURRENCY="1") as stack:
        yield stack


def _env(stack: TestStack) -> dict[str, str]:
    s = stack.settings
    return {**os.environ, "FAL_KEY": KEY, "FAL_RUN_HOST": f"127.0.0.1:{s.run_port}",
            "FAL_QUEUE_RUN_HOST": f"127.0.0.1:{s.queue_port}", "SSL_CERT_FILE": str(stack.cafile),
            "NODE_EXTRA_CA_CERTS": str(stack.cafile),
            "EMBER_PROXY_URL": f"http://127.0.0.1:{s.http_port}/api/fal/proxy"}


def _occupy(stack: TestStack, seconds_of_steps: int = 12) -> str:
    """Fill the only worker slot with a job of 12 x 0.3 s."""
    with stack.client() as c:
        r = c.post("/fal-ai/lcm", json={"prompt": "busy", "num_inference_steps": seconds_of_steps,
                                        "image_size": {"width": 64, "height": 64}})
        rid = str(r.json()["request_id"])
        for _ in range(100):
            if c.get(f"/fal-ai/lcm/requests/{rid}/status").json()["status"] == "IN_PROGRESS":
                return rid
            time.sleep(0.05)
    raise AssertionError("the blocking job did not start")


def _python(stack: TestStack, code: str) -> Any:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=_env(stack), capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_python_subscribe_raises_504_user_when_the_start_timeout_passes(busy_stack: TestStack) -> None:
    _occupy(busy_stack)
    out = _python(busy_stack, """
        import json, time, fal_client
        started = time.monotonic()
        try:
            fal_client.subscribe("fal-ai/lcm", arguments={"prompt": "late"}, start_timeout=1.5)
            print(json.dumps({"raised": None}))
        except fal_client.client.FalClientHTTPError as e:
            print(json.dumps({"raised": e.status_code, "type": e.response_headers.get("x-fal-request-timeout-type"),
                              "error_type": e.error_type, "seconds": time.monotonic() - started}))
    """)
    assert out["raised"] == 504 and out["type"] == "user" and out["error_type"] == "request_timeout"
    assert out["seconds"] < 3.5  # not retried: the client raised at once


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_js_subscribe_gets_is_user_timeout(busy_stack: TestStack) -> None:
    _occupy(busy_stack)
    proc = subprocess.run(["node", "--experimental-websocket", "--no-warnings", "protocol.mjs", "start-timeout",
                           json.dumps({"startTimeout": 1.5})], cwd=JS_DIR, env=_env(busy_stack),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    error = json.loads(proc.stdout.strip().splitlines()[-1])["error"]
    assert error["status"] == 504 and error["isUserTimeout"] is True


def test_python_priorities_normal_before_low(busy_stack: TestStack) -> None:
    _occupy(busy_stack, 4)
    out = _python(busy_stack, """
        import json, fal_client
        args = {"prompt": "p", "num_inference_steps": 1, "image_size": {"width": 64, "height": 64}}
        low = fal_client.submit("fal-ai/lcm", arguments=args, priority="low")
        normal = fal_client.submit("fal-ai/lcm", arguments=args, priority="normal", hint="any")
        positions = [low.status().position, normal.status().position]
        low.get(); normal.get()
        print(json.dumps({"positions": positions, "ids": [low.request_id, normal.request_id]}))
    """)
    assert out["positions"] == [1, 0]  # the normal job, submitted second, is next
