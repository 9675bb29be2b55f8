"""API keys: `Authorization: Key <key_id>:<key_secret>` (fal-protocol.md §2).

The gateway keeps only SHA-256 digests of the keys it accepts. Keys are 256-bit random strings (or
the operator's EMBER_API_KEY), so a plain digest is enough: there is nothing to brute-force. With no
EMBER_API_KEY, a dev key is generated on first start into `var/keys/dev-key` (mode 0600), where the
launcher reads it to write the clients' environment; later starts reuse it.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import uuid
from collections.abc import Iterable
from pathlib import Path

from ember.settings import Settings

log = logging.getLogger(__name__)


def dev_key_path(settings: Settings) -> Path:
    return settings.var_dir / "keys" / "dev-key"


def hash_key(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def generate_key() -> str:
    """A key in fal's `<key_id>:<key_secret>` form."""
    return f"{uuid.uuid4()}:{secrets.token_hex(32)}"


def ensure_dev_key(path: Path) -> str:
    """The dev key stored at `path`, created (0600, atomically) when absent."""
    if path.is_file():
        key = path.read_text().strip()
        if key:
            return key
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    key = generate_key()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.replace(tmp, path)
    log.info("generated a dev API key in %s (set EMBER_API_KEY to use your own)", path)
    return key


class KeyStore:
    """The accepted keys, as digests."""

    def __init__(self, digests: Iterable[bytes]) -> None:
        self._digests = tuple(digests)
        if not self._digests:
            raise ValueError("KeyStore needs at least one key")

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyStore:
        """EMBER_API_KEY (comma-separated for several), else the dev key."""
        keys = [k.strip() for k in settings.api_key.split(",") if k.strip()]
        if not keys:
            keys = [ensure_dev_key(dev_key_path(settings))]
        return cls(hash_key(k) for k in keys)

    def owner_of(self, authorization: str | None) -> str | None:
        """For `Key <a known key>`: a stable, non-secret id of that key (16 hex digits of a digest of
        its digest), used as the webhook's user id and to scope tokens. None otherwise. Compares every
        digest in constant time."""
        if not authorization:
            return None
        scheme, _, key = authorization.strip().partition(" ")
        if scheme.lower() != "key" or not key.strip():
            return None
        presented = hash_key(key.strip())
        match = b""
        for digest in self._digests:
            if hmac.compare_digest(presented, digest):
                match = digest
        return hashlib.sha256(b"ember-owner:" + match).hexdigest()[:16] if match else None

    def verify(self, authorization: str | None) -> bool:
        """True for `Key <a known key>`."""
        return self.owner_of(authorization) is not None
