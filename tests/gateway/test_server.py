"""`python -m ember.gateway` as the launcher runs it: first start writes var/tls and var/keys/dev-key,
the three listeners answer, and SIGTERM stops the process cleanly with exit code 0."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.gateway.conftest import dead_port


def _get(url: str, context: ssl.SSLContext | None = None, headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_gateway_process_starts_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    var = tmp_path / "var"
    run, queue, http = dead_port(), dead_port(), dead_port()
    env = {**os.environ, "EMBER_VAR_DIR": str(var), "EMBER_API_KEY": "", "EMBER_RUN_PORT": str(run),
           "EMBER_QUEUE_PORT": str(queue), "EMBER_HTTP_PORT": str(http),
           "EMBER_TRITON_GRPC_URL": f"127.0.0.1:{dead_port()}"}
    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "ember.gateway"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        bundle = var / "tls" / "bundle.pem"
        deadline = time.monotonic() + 30
        status = 0
        while time.monotonic() < deadline and proc.poll() is None:
            if bundle.is_file():
                try:
                    status = _get(f"https://127.0.0.1:{run}/health", ssl.create_default_context(cafile=bundle))
                    break
                except OSError:
                    pass
            time.sleep(0.1)
        assert status == 200, log_path.read_text()
        context = ssl.create_default_context(cafile=bundle)
        key = (var / "keys" / "dev-key").read_text().strip()
        assert _get(f"https://127.0.0.1:{queue}/health", context) == 200
        assert _get(f"http://127.0.0.1:{http}/health") == 200
        assert _get(f"https://127.0.0.1:{run}/ready", context) == 503  # Triton is not running
        status_url = f"https://127.0.0.1:{queue}/fal-ai/lcm/requests/x/status"
        assert _get(status_url, context) == 401
        assert _get(status_url, context, {"Authorization": f"Key {key}"}) == 404
        for name in ("cert.pem", "key.pem", "bundle.pem"):
            assert (var / "tls" / name).is_file()
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
    output = log_path.read_text()
    assert code == 0, output
    assert "gateway stopped" in output
    assert key not in output  # the key is never logged
