"""Webhooks: fal's body, signed deliveries checked by an independent verifier (cryptography's Ed25519,
from the published JWKS), retries with back-off, at-least-once across a restart, and the SSRF rules.
The receiver is a plain HTTP server on 127.0.0.1, allowed through EMBER_FETCH_ALLOW."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from ember.gateway.app import build_apps
from ember.gateway.state import GatewayState
from ember.gateway.webhooks import webhook_body
from tests.gateway.conftest import QUEUE_BASE, FakeBackend, client, down_backend, make_settings
from tests.webhook_receiver import Receiver, verify

SMALL = {"prompt": "a cat", "image_size": {"width": 64, "height": 48}, "seed": 3}


async def _open(tmp_path: Path, backend: Any = None, **env: str) -> GatewayState:
    settings = make_settings(tmp_path / "var", EMBER_FETCH_ALLOW="127.0.0.1/32", EMBER_WEBHOOK_RETRY_DELAY="0.05",
                             **env)
    return await GatewayState.open(settings, backend or FakeBackend())


async def _submit(state: GatewayState, url: str, payload: dict[str, Any] | None = None) -> str:
    async with client(build_apps(state).queue, QUEUE_BASE) as c:
        r = await c.post("/fal-ai/lcm", params={"fal_webhook": url}, json=payload or SMALL)
        assert r.status_code == 200, r.text
        return str(r.json()["request_id"])


async def test_success_delivery_is_fals_body_signed_and_verifiable(tmp_path: Path, receiver: Receiver) -> None:
    state = await _open(tmp_path)
    try:
        rid = await _submit(state, receiver.url)
        await asyncio.to_thread(receiver.wait, 1)
        apps = build_apps(state)
        async with client(apps.rest, "https://127.0.0.1:8446", auth=False) as c:
            jwks = (await c.get("/.well-known/jwks.json")).json()
        async with client(apps.queue, QUEUE_BASE) as c:
            result = (await c.get(f"/fal-ai/lcm/requests/{rid}")).json()
    finally:
        await state.close(1.0)
    headers, body, _ = receiver.seen[0]
    payload = json.loads(body)
    assert payload == {"request_id": rid, "gateway_request_id": rid, "status": "OK", "payload": result}
    assert headers["content-type"] == "application/json"
    assert headers["x-fal-webhook-request-id"] == rid
    assert headers["x-fal-webhook-user-id"]  # the submitting key's id, never the key
    assert verify(jwks, headers, body)
    assert not verify(jwks, headers, body + b" ")  # the signature covers the exact bytes
    assert not verify(jwks, {**headers, "x-fal-webhook-user-id": "someone-else"}, body)
    assert not verify(jwks, headers, body, now=time.time() + 400)  # stale timestamps are refused
    rows = await _rows(tmp_path)
    assert rows == [("delivered", 1)]


async def _rows(tmp_path: Path) -> list[tuple[str, int]]:
    import sqlite3

    with sqlite3.connect(tmp_path / "var" / "jobs.sqlite3") as conn:
        return [(s, a) for s, a in conn.execute("SELECT state, attempts FROM webhook_deliveries")]


async def test_error_delivery_and_retries_with_back_off(tmp_path: Path, receiver: Receiver) -> None:
    receiver.answers = [500, 503]  # two failures, then 200
    state = await _open(tmp_path)
    try:
        rid = await _submit(state, receiver.url, {**SMALL, "prompt": "fail invalid"})
        await asyncio.to_thread(receiver.wait, 3)
    finally:
        await state.close(1.0)
    bodies = [json.loads(b) for _, b, _ in receiver.seen]
    assert all(b == bodies[0] for b in bodies)
    assert bodies[0]["status"] == "ERROR" and bodies[0]["error"] == "Invalid status code: 422"
    assert bodies[0]["payload"]["detail"][0]["loc"] == ["body"] and bodies[0]["request_id"] == rid
    times = [t for _, _, t in receiver.seen]
    # The back-off doubles: a retry is sent at least 0.05 s, then 0.1 s, after the failure was answered.
    assert times[1] - times[0] >= 0.045 and times[2] - times[1] >= 0.095
    assert await _rows(tmp_path) == [("delivered", 3)]


async def test_delivery_gives_up_after_the_attempts(tmp_path: Path, receiver: Receiver) -> None:
    receiver.answers = [500] * 10
    state = await _open(tmp_path, EMBER_WEBHOOK_ATTEMPTS="3")
    try:
        await _submit(state, receiver.url)
        await asyncio.to_thread(receiver.wait, 3)
        await asyncio.sleep(0.5)
    finally:
        await state.close(1.0)
    assert len(receiver.seen) == 3
    assert await _rows(tmp_path) == [("failed", 3)]


async def test_pending_delivery_survives_a_restart(tmp_path: Path, receiver: Receiver) -> None:
    state = await _open(tmp_path, down_backend())
    # The job completes while the receiver is down: nothing listens on the URL's port yet.
    rid = await _submit(state, receiver.url.replace(receiver.url.split(":")[2].split("/")[0], "9"))
    job = state.jobs.active[rid]
    state.worker.queue.remove(rid)
    await state.jobs.start(job)
    # Finish the job the way the worker does, but crash before any delivery is attempted.
    state.worker.on_finished.clear()
    await state.worker._finish(job, result=json.dumps({"images": []}))
    await state.webhooks.close()
    await state.jobs.close()
    await state.db.close()
    # The delivery row was written with the result, in one transaction.
    assert await _rows(tmp_path) == [("pending", 0)]
    import sqlite3

    with sqlite3.connect(tmp_path / "var" / "jobs.sqlite3") as conn:
        conn.execute("UPDATE webhook_deliveries SET url = ?", (receiver.url,))
    state = await _open(tmp_path, down_backend())
    try:
        await asyncio.to_thread(receiver.wait, 1)
    finally:
        await state.close(1.0)
    assert json.loads(receiver.seen[0][1])["request_id"] == rid
    assert await _rows(tmp_path) == [("delivered", 1)]


async def test_delivery_to_an_address_not_allowed_fails_at_once(tmp_path: Path, receiver: Receiver) -> None:
    # Without the allow-list, 127.0.0.1 is refused at delivery too (a DNS name could resolve to it later).
    state = await GatewayState.open(make_settings(tmp_path / "var", EMBER_WEBHOOK_RETRY_DELAY="0.05"), FakeBackend())
    try:
        job_id = "x"
        await state.db.execute(
            "INSERT INTO webhook_deliveries (job_id, url, state, attempts, next_at) VALUES (?, ?, 'pending', 0, 0)",
            (job_id, receiver.url))
        from ember.gateway.jobs import Job

        job = Job(id=job_id, endpoint_id="fal-ai/lcm", subpath="", mode="queue", input={}, seed=0)
        await state.jobs.add(job)
        await state.jobs.finish(job, result="{}")
        await state.webhooks._attempt(job_id)
    finally:
        await state.close(1.0)
    assert receiver.seen == []
    assert await _rows(tmp_path) == [("failed", 1)]


def test_body_of_an_unserializable_output() -> None:
    from ember.gateway.jobs import Job

    job = Job(id="r", endpoint_id="fal-ai/lcm", subpath="", mode="queue", input={}, seed=0, result="{not json")
    body = json.loads(webhook_body(job))
    assert body["status"] == "OK" and body["payload"] is None and "payload_error" in body
