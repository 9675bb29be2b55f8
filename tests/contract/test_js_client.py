"""@fal-ai/client 1.10.1 in node, unmodified, through `proxyUrl` (fal-protocol.md §11, §12 b)."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess

import httpx
import pytest
from PIL import Image

from tests.contract.conftest import JS_DIR

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed"),
]


def _node(script: str, client_env: dict[str, str], *args: str) -> dict:
    if not (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir():
        pytest.fail("client/js/node_modules is missing: run `make node` (make test does)")
    proc = subprocess.run(
        ["node", script, *args], cwd=JS_DIR, env={**os.environ, **client_env},
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_subscribe_through_proxy(client_env: dict[str, str]) -> None:
    out = _node("subscribe.mjs", client_env, "a black cat with glowing eyes", json.dumps({"seed": 99}))
    result, updates = out["result"], out["updates"]
    assert result["requestId"], "x-fal-request-id must reach the JS client"
    data = result["data"]
    assert data["seed"] == 99
    image = data["images"][0]
    assert (image["width"], image["height"]) == (512, 512)
    response = httpx.get(image["url"], verify=client_env["SSL_CERT_FILE"], timeout=30)
    assert Image.open(io.BytesIO(response.content)).size == (512, 512)
    statuses = [u["status"] for u in updates]
    assert statuses[-1] == "COMPLETED"
    logs = [entry["message"] for u in updates for entry in (u.get("logs") or [])]
    assert any("step" in m for m in logs), updates
