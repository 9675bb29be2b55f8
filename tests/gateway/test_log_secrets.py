"""No secret and no data-URI body in the logs: the real `python -m ember.gateway` process at debug level
(uvicorn's access log on) is sent an API key, a wrong key, data URIs, a realtime token in the query
string and a webhook URL with a token in its query; none of them may appear in its log."""

from __future__ import annotations

import base64
import io
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image
from websockets.sync.client import connect

from tests.gateway.conftest import API_KEY, dead_port


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 8, 7)).save(buf, "PNG")
    return buf.getvalue()


def test_keys_tokens_and_data_uris_never_reach_the_log(tmp_path: Path) -> None:
    var = tmp_path / "var"
    run, queue, rest, http = (dead_port() for _ in range(4))
    env = {**os.environ, "EMBER_VAR_DIR": str(var), "EMBER_API_KEY": API_KEY, "EMBER_RUN_PORT": str(run),
           "EMBER_QUEUE_PORT": str(queue), "EMBER_REST_PORT": str(rest), "EMBER_HTTP_PORT": str(http),
           "EMBER_TRITON_GRPC_URL": f"127.0.0.1:{dead_port()}", "EMBER_LOG_LEVEL": "debug",
           "EMBER_MAX_ATTEMPTS": "1", "EMBER_REALTIME_IDLE_TIMEOUT": "1"}
    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ember.gateway"], env=env, stdout=out, stderr=subprocess.STDOUT)
    wrong_key = "wrong-key-id:wrong-key-secret-0123456789"
    payload = base64.b64encode(_png()).decode()
    corrupt = base64.b64encode(b"definitely not an image, but secret-looking 42").decode()
    try:
        bundle = var / "tls" / "bundle.pem"
        for _ in range(200):
            if bundle.is_file():
                try:
                    httpx.get(f"https://127.0.0.1:{run}/health", verify=ssl.create_default_context(cafile=bundle))
                    break
                except httpx.HTTPError:
                    pass
            time.sleep(0.05)
        context = ssl.create_default_context(cafile=bundle)
        auth = {"Authorization": f"Key {API_KEY}"}
        with httpx.Client(verify=context, timeout=30) as c:
            q = f"https://127.0.0.1:{queue}"
            r = c.post(f"{q}/fal-ai/lcm", headers=auth, json={
                "prompt": "x", "image_url": f"data:image/png;base64,{payload}",
                "mask_url": f"data:image/png;base64,{corrupt}"})
            assert r.status_code == 200
            rid = r.json()["request_id"]
            r = c.post(f"{q}/fal-ai/lcm", headers={"Authorization": f"Key {wrong_key}"}, json={"prompt": "x"})
            assert r.status_code == 401
            r = c.post(f"{q}/fal-ai/lcm", headers=auth, json={"prompt": "x"},
                             params={"fal_webhook": "https://hooks.example.invalid/h?token=webhook-secret-77"})
            assert r.status_code == 200
            token = (c.post(f"https://127.0.0.1:{rest}/tokens/", headers=auth,
                                  json={"allowed_apps": ["lcm"], "token_expiration": 60})).json()
            for _ in range(100):
                s = (c.get(f"{q}/fal-ai/lcm/requests/{rid}/status", headers=auth)).json()
                if s["status"] == "COMPLETED":
                    break
                time.sleep(0.05)
            assert s["status"] == "COMPLETED"
        with connect(f"wss://127.0.0.1:{run}/fal-ai/lcm/realtime?fal_jwt_token={token}", ssl=context) as ws:
            ws.recv()  # the idle TIMEOUT frame, after 1 s
    finally:
        proc.terminate()
        proc.wait(30)
    log = log_path.read_text()
    assert "GET /fal-ai/lcm/requests/" in log  # the access log is on: it is what we checked
    assert "WebSocket /fal-ai/lcm/realtime" in log
    for secret in (API_KEY, API_KEY.split(":")[1], wrong_key, wrong_key.split(":")[1], token, token.split(".")[2],
                   payload[:40], corrupt[:40], "webhook-secret-77"):
        assert secret not in log, f"{secret[:12]}... is in the log"
