"""A webhook receiver for tests (a plain HTTP server on 127.0.0.1 recording each delivery), and fal's
documented signature check written independently of the gateway's code (cryptography's Ed25519)."""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


@dataclass
class Receiver:
    url: str
    # Status codes to answer, in order; 200 once they run out.
    answers: list[int] = field(default_factory=list)
    seen: list[tuple[dict[str, str], bytes, float]] = field(default_factory=list)

    def wait(self, n: int, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while len(self.seen) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.seen)} of {n} deliveries in {timeout}s")
            time.sleep(0.02)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            state.seen.append(({k.lower(): v for k, v in self.headers.items()}, body, time.time()))
            status = state.answers.pop(0) if state.answers else 200
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/hook?token=s3cret"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()


def verify(jwks: dict[str, Any], headers: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """fal's documented check, written independently of the gateway's code."""
    ts = headers["x-fal-webhook-timestamp"]
    if abs((now or time.time()) - int(ts)) > 300:
        return False
    message = "\n".join([headers["x-fal-webhook-request-id"], headers["x-fal-webhook-user-id"], ts,
                         hashlib.sha256(body).hexdigest()]).encode()
    for jwk in jwks["keys"]:
        assert (jwk["kty"], jwk["crv"]) == ("OKP", "Ed25519")
        key = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(jwk["x"] + "=" * (-len(jwk["x"]) % 4)))
        try:
            key.verify(bytes.fromhex(headers["x-fal-webhook-signature"]), message)
            return True
        except InvalidSignature:
            continue
    return False
