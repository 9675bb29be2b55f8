"""Webhooks: `?fal_webhook=<url>` on a queue submit gets fal's callback when the job completes.

Body (fal-protocol.md §5.7):
    {"request_id", "gateway_request_id", "status": "OK", "payload": <output>}
    {"request_id", "gateway_request_id", "status": "ERROR", "error": "Invalid status code: 422",
     "payload": <the error body>}
and `"payload": null, "payload_error": "<why>"` when the output is not JSON.

Delivery is at least once, and survives restarts: the job's completion and its delivery row are one
SQLite transaction (jobs.py); this sender works through the pending rows, also those a previous
process left. Each attempt has EMBER_WEBHOOK_TIMEOUT seconds; any answer but 2xx, or no answer, is
retried after EMBER_WEBHOOK_RETRY_DELAY x 2^(n-1) seconds, up to EMBER_WEBHOOK_ATTEMPTS attempts
(defaults 15 s, 10 attempts: about 2 h, as fal documents). A URL whose host is not public (and not
in EMBER_FETCH_ALLOW) fails at once: deliveries go through the SSRF-safe fetcher's address checks.
Receivers should de-duplicate on X-Fal-Webhook-Request-Id.

Signing, compatible with fal's (docs.fal.ai "Verifying Your Webhook"): headers
    X-Fal-Webhook-Request-Id   the request id
    X-Fal-Webhook-User-Id      the id of the API key that submitted the request
    X-Fal-Webhook-Timestamp    Unix seconds when this attempt was signed
    X-Fal-Webhook-Signature    hex Ed25519 signature of
                               "{request_id}\\n{user_id}\\n{timestamp}\\n{sha256_hex(raw body)}"
and the public key as a JWKS (OKP / Ed25519) at GET /.well-known/jwks.json. The key is made on first
start in var/keys/webhook-ed25519.pem (0600); each attempt is signed afresh, so its timestamp is current.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import heapq
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ember.gateway.db import Database
from ember.gateway.fetcher import Fetcher, FetchError, shown
from ember.gateway.jobs import Job, JobStore
from ember.gateway.metrics import Metrics

log = logging.getLogger(__name__)

USER_AGENT = "ember-webhook/1"
CONCURRENT_DELIVERIES = 8


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class WebhookKey:
    """The Ed25519 key that signs deliveries, and its public JWKS."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        raw = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.x = _b64url(raw)
        # RFC 7638 thumbprint: SHA-256 of the required members in lexicographic order, no spaces.
        thumbprint = json.dumps({"crv": "Ed25519", "kty": "OKP", "x": self.x}, separators=(",", ":"))
        self.kid = _b64url(hashlib.sha256(thumbprint.encode()).digest())

    @classmethod
    def from_file(cls, path: Path) -> WebhookKey:
        if path.is_file():
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if isinstance(key, Ed25519PrivateKey):
                return cls(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        os.replace(tmp, path)
        log.info("generated the webhook signing key in %s", path)
        return cls(key)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": self.x, "kid": self.kid, "use": "sig",
                          "alg": "EdDSA"}]}

    def headers(self, request_id: str, user_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
        ts = str(int(time.time()) if timestamp is None else timestamp)
        message = "\n".join((request_id, user_id, ts, hashlib.sha256(body).hexdigest())).encode()
        return {
            "X-Fal-Webhook-Request-Id": request_id,
            "X-Fal-Webhook-User-Id": user_id,
            "X-Fal-Webhook-Timestamp": ts,
            "X-Fal-Webhook-Signature": self._key.sign(message).hex(),
        }


def webhook_body(job: Job) -> bytes:
    body: dict[str, Any] = {"request_id": job.id, "gateway_request_id": job.id}
    if job.error is None:
        body["status"] = "OK"
        try:
            body["payload"] = json.loads(job.result or "null")
        except ValueError as exc:
            body["payload"], body["payload_error"] = None, f"the output is not valid JSON: {exc}"
    else:
        body["status"] = "ERROR"
        body["error"] = f"Invalid status code: {job.error.status_code}"
        body["payload"] = job.error.body()
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class WebhookSender:
    def __init__(
        self, db: Database, jobs: JobStore, fetcher: Fetcher, key: WebhookKey, metrics: Metrics, *,
        attempts: int, timeout: float, retry_delay: float,
    ) -> None:
        self.db = db
        self.jobs = jobs
        self.fetcher = fetcher
        self.key = key
        self.metrics = metrics
        self.attempts = attempts
        self.timeout = timeout
        self.retry_delay = retry_delay
        self._due: list[tuple[float, str]] = []  # heap of (next_at, job_id)
        self._queued: set[str] = set()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(CONCURRENT_DELIVERIES)
        self._inflight: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Picks up the deliveries still pending (a previous process's too), then runs."""
        rows = await self.db.execute("SELECT job_id, next_at FROM webhook_deliveries WHERE state = 'pending'")
        for row in rows:
            self._schedule(row["job_id"], row["next_at"])
        if rows:
            log.info("%d webhook delivery(ies) pending", len(rows))
        self._loop_task = asyncio.create_task(self._run(), name="ember-webhooks")

    def wake(self, job: Job) -> None:
        """A job completed (Worker.on_finished): deliver its webhook now, if it has one."""
        if job.webhook_url and job.mode == "queue":
            self._schedule(job.id, time.time())

    def _schedule(self, job_id: str, at: float) -> None:
        if job_id in self._queued:
            return
        self._queued.add(job_id)
        heapq.heappush(self._due, (at, job_id))
        self.metrics.webhooks_pending.set(len(self._queued))
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            now = time.time()
            while self._due and self._due[0][0] <= now:
                _, job_id = heapq.heappop(self._due)
                await self._slots.acquire()
                task = asyncio.create_task(self._deliver(job_id))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
            timeout = self._due[0][0] - now if self._due else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def _deliver(self, job_id: str) -> None:
        try:
            await self._attempt(job_id)
        except Exception:
            log.exception("webhook delivery for %s failed unexpectedly", job_id)
        finally:
            self._slots.release()

    async def _attempt(self, job_id: str) -> None:
        rows = await self.db.execute(
            "SELECT url, state, attempts FROM webhook_deliveries WHERE job_id = ?", (job_id,))
        job = await self.jobs.get(job_id)
        if not rows or rows[0]["state"] != "pending" or job is None:
            self._queued.discard(job_id)
            return
        url, attempt = rows[0]["url"], rows[0]["attempts"] + 1
        body = webhook_body(job)
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   **self.key.headers(job.id, job.owner or "ember", body)}
        final, error = False, None
        try:
            status = await self.fetcher.post(url, body, headers, self.timeout)
            ok = 200 <= status < 300
            error = None if ok else f"HTTP {status}"
        except FetchError as exc:
            ok, error = False, exc.msg
            final = exc.kind == "url_not_allowed"  # retrying cannot make a private address public
        if ok:
            state, next_at = "delivered", time.time()
        elif final or attempt >= self.attempts:
            state, next_at = "failed", time.time()
        else:
            state, next_at = "pending", time.time() + self.retry_delay * 2 ** (attempt - 1)
        await self.db.execute(
            "UPDATE webhook_deliveries SET state = ?, attempts = ?, next_at = ?, last_error = ? WHERE job_id = ?",
            (state, attempt, next_at, error, job_id))
        self._queued.discard(job_id)
        outcome = {"delivered": "delivered", "failed": "failed"}.get(state, "retry")
        self.metrics.webhook_deliveries.labels(outcome).inc()
        if state == "pending":
            log.info("webhook for %s to %s: attempt %d failed (%s); next in %.0fs", job_id, shown(url), attempt,
                     error, next_at - time.time())
            self._schedule(job_id, next_at)
        elif state == "failed":
            log.warning("webhook for %s to %s failed after %d attempt(s): %s", job_id, shown(url), attempt, error)
        else:
            log.info("webhook for %s delivered (attempt %d)", job_id, attempt)
        self.metrics.webhooks_pending.set(len(self._queued))

    async def close(self, timeout: float = 5.0) -> None:
        """Stops scheduling; attempts in flight get `timeout` seconds (unfinished ones stay pending in
        the database and are retried by the next start)."""
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._inflight:
            _, pending = await asyncio.wait(list(self._inflight), timeout=timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
