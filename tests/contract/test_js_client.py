"""@fal-ai/client 1.10.1 in node, unmodified, through `proxyUrl` (fal-protocol.md §11, §12 b-e): queue
(polling and status-stream modes), SSE stream, storage (single and multipart), realtime with a token
from the proxy, webhooks and cancel, against the real stack. Scenarios live in client/js/protocol.mjs."""

from __future__ import annotations

import io
import json
import os
import shutil
import ssl
import subprocess
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.contract.conftest import JS_DIR
from tests.webhook_receiver import Receiver, verify

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed"),
]


def _node(script: str, client_env: dict[str, str], *args: str) -> Any:
    if not (JS_DIR / "node_modules" / "@fal-ai" / "client").is_dir():
        pytest.fail("client/js/node_modules is missing: run `make node` (make test does)")
    # Node 20 has a global WebSocket only with this flag (22+ has it anyway); realtime needs it.
    proc = subprocess.run(
        ["node", "--experimental-websocket", "--no-warnings", script, *args], cwd=JS_DIR,
        env={**os.environ, **client_env}, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _scenario(client_env: dict[str, str], name: str, **options: Any) -> Any:
    return _node("protocol.mjs", client_env, name, json.dumps(options))


def _get(url: str, client_env: dict[str, str]) -> httpx.Response:
    return httpx.get(url, verify=ssl.create_default_context(cafile=client_env["SSL_CERT_FILE"]), timeout=60)


def test_subscribe_through_proxy(client_env: dict[str, str]) -> None:
    out = _node("subscribe.mjs", client_env, "a black cat with glowing eyes", json.dumps({"seed": 99}))
    result, updates = out["result"], out["updates"]
    assert result["requestId"], "x-fal-request-id must reach the JS client"
    data = result["data"]
    assert data["seed"] == 99
    image = data["images"][0]
    assert (image["width"], image["height"]) == (512, 512)
    assert Image.open(io.BytesIO(_get(image["url"], client_env).content)).size == (512, 512)
    statuses = [u["status"] for u in updates]
    assert statuses[-1] == "COMPLETED"
    logs = [entry["message"] for u in updates for entry in (u.get("logs") or [])]
    assert any("step" in m for m in logs), updates


def test_subscribe_in_streaming_mode_gets_each_log_line_once(client_env: dict[str, str]) -> None:
    out = _scenario(client_env, "streaming", input={"num_inference_steps": 3, "seed": 8})
    assert out["result"]["data"]["seed"] == 8 and out["result"]["requestId"]
    assert out["updates"][-1]["status"] == "COMPLETED"
    # Each event carries only new lines; the client accumulates them, so the last update holds each once.
    steps = [e["message"] for e in out["updates"][-1]["logs"] if e["message"].startswith("step")]
    assert steps == ["step 1/3", "step 2/3", "step 3/3"]


def test_stream(client_env: dict[str, str]) -> None:
    out = _scenario(client_env, "stream", input={"num_inference_steps": 2, "seed": 6})
    progress = [e["progress"]["step"] for e in out["events"] if "progress" in e]
    assert progress == [1, 2]
    assert out["final"] == out["events"][-1] and out["final"]["seed"] == 6


def test_submit_with_options_and_a_signed_webhook(client_env: dict[str, str], receiver: Receiver) -> None:
    out = _scenario(client_env, "submit", webhookUrl=receiver.url, input={"seed": 31})
    assert out["status"]["status"] == "COMPLETED" and out["status"]["error"] is None
    assert any(e["message"].startswith("step") for e in out["status"]["logs"])
    assert out["result"]["data"]["seed"] == 31 and out["result"]["requestId"] == out["requestId"]
    receiver.wait(1, timeout=30)
    headers, body, _ = receiver.seen[0]
    jwks = _get(client_env["EMBER_REST_URL"] + "/.well-known/jwks.json", client_env).json()
    assert verify(jwks, headers, body)
    assert json.loads(body)["payload"] == out["result"]["data"]


def test_cancel_running_request(client_env: dict[str, str]) -> None:
    out = _scenario(client_env, "cancel", input={"num_inference_steps": 12, "image_size": "square"})
    assert out["status"]["status"] == "COMPLETED" and out["status"]["error_type"] == "request_cancelled"
    assert out["error"]["status"] == 400 and out["error"]["body"]["error_type"] == "request_cancelled"
    assert out["error"]["requestId"] == out["requestId"]
    assert out["again"]["status"] == 400 and out["again"]["body"]["status"] == "ALREADY_COMPLETED"


@pytest.mark.parametrize("size", [20_000, 90 * 1024 * 1024 + 1])  # the second is a multipart upload
def test_storage_upload(client_env: dict[str, str], size: int) -> None:
    out = _scenario(client_env, "upload", size=size)
    assert out["url"].startswith(client_env["EMBER_REST_URL"] + "/files/")
    assert (out["status"], out["size"], out["same"]) == (200, size, True)


def test_storage_upload_lifecycle(client_env: dict[str, str]) -> None:
    import time

    out = _scenario(client_env, "upload", size=10, lifecycle={"expiresIn": 1})
    assert out["status"] == 200
    time.sleep(1.2)
    assert _get(out["url"], client_env).status_code == 404


def test_realtime_with_a_token_through_the_proxy(client_env: dict[str, str]) -> None:
    for default_provider in (False, True):  # a tokenProvider, and the client's deprecated default
        out = _scenario(client_env, "realtime", useDefaultToken=default_provider)
        assert [(r["request_id"], r["seed"]) for r in out["results"]] == [("js-1", 11), ("js-2", 12)]
        assert out["results"][0]["images"][0]["url"].startswith("data:image/jpeg;base64,")
        assert len(out["errors"]) == 1 and out["errors"][0]["status"] == 400
        assert out["errors"][0]["message"].startswith("VALIDATION_ERROR:")
