"""Short-lived signed tokens the gateway hands out and later accepts (JWT, HS256, RFC 7519):

- realtime tokens (`POST /tokens/`, then `?fal_jwt_token=` on the websocket): purpose "realtime",
  the apps they are good for;
- CDN upload tokens (`POST /storage/auth/token`, then `Authorization: Bearer` on /files/upload);
- signed upload URLs and multipart upload ids: purpose "upload", the file name, type and lifetime,
  so that the PUT needs no key and no server-side state.

The secret is 256 random bits in var/keys/signing-secret (0600), made on first start; deleting it
revokes every token. A token names its purpose, so one kind can never be used as another.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

_HEADER = {"alg": "HS256", "typ": "JWT"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _load_secret(path: Path) -> bytes:
    if path.is_file():
        secret = bytes.fromhex(path.read_text().strip())
        if len(secret) >= 32:
            return secret
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_bytes(32)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret.hex() + "\n")
    os.replace(tmp, path)
    return secret


class Signer:
    def __init__(self, secret: bytes) -> None:
        self._secret = secret
        self._header = _b64(json.dumps(_HEADER, separators=(",", ":")).encode())

    @classmethod
    def from_file(cls, path: Path) -> Signer:
        return cls(_load_secret(path))

    def _mac(self, signing_input: str) -> str:
        return _b64(hmac.new(self._secret, signing_input.encode("ascii"), hashlib.sha256).digest())

    def issue(self, purpose: str, lifetime: float, **claims: Any) -> str:
        """A token of `purpose`, valid for `lifetime` seconds, carrying `claims`."""
        now = int(time.time())
        payload = {"pur": purpose, "iat": now, "exp": now + max(1, int(lifetime)), **claims}
        signing_input = f"{self._header}.{_b64(json.dumps(payload, separators=(',', ':')).encode())}"
        return f"{signing_input}.{self._mac(signing_input)}"

    def verify(self, token: str, purpose: str) -> dict[str, Any] | None:
        """The token's claims if it is ours, unexpired and of this purpose; else None."""
        parts = token.split(".")
        if len(parts) != 3 or len(token) > 8192:
            return None
        header, payload, mac = parts
        if header != self._header or not hmac.compare_digest(mac, self._mac(f"{header}.{payload}")):
            return None
        try:
            claims = json.loads(_unb64(payload))
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(claims, dict) or claims.get("pur") != purpose:
            return None
        exp = claims.get("exp")
        if not isinstance(exp, int) or exp <= time.time():
            return None
        return claims
