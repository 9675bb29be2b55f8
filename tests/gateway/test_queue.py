"""The queue host's protocol shapes (fal-protocol.md §5): submit, status in its three states, result,
cancel. Job states are advanced through the job store's own transitions, as the worker does."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from ember.gateway.app import GatewayApps
from ember.gateway.jobs import Job, Status
from ember.gateway.state import GatewayState
from tests.gateway.conftest import QUEUE_BASE, client

URL_KEYS = ("response_url", "status_url", "cancel_url")


async def submit(c: httpx.AsyncClient, payload: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    r = await c.post("/fal-ai/lcm", json=payload or {"prompt": "a cat", "seed": 42}, **kw)
    assert r.status_code == 200, r.text
    assert r.headers["x-fal-request-id"] == r.json()["request_id"]
    body: dict[str, Any] = r.json()
    return body


async def test_submit_answers_fal_shape_with_absolute_app_level_urls(queue_client: httpx.AsyncClient) -> None:
    body = await submit(queue_client)
    rid = body["request_id"]
    assert body["status"] == "IN_QUEUE"
    assert body["queue_position"] == 0
    base = f"{QUEUE_BASE}/fal-ai/lcm/requests/{rid}"
    assert body["response_url"] == base
    assert body["status_url"] == f"{base}/status"
    assert body["cancel_url"] == f"{base}/cancel"


async def test_submit_is_durable_before_answering(state: GatewayState, queue_client: httpx.AsyncClient) -> None:
    body = await submit(queue_client, {"prompt": "a cat", "seed": 5, "num_images": 2},
                        headers={"x-fal-queue-priority": "low", "x-fal-request-timeout": "30.0",
                                 "x-fal-runner-hint": "gpu-a"},
                        params={"fal_webhook": "https://example.com/hook"})
    rows = await state.jobs._db("SELECT * FROM jobs WHERE id = ?", (body["request_id"],))
    assert len(rows) == 1
    row = rows[0]
    assert row["status"] == "IN_QUEUE" and row["mode"] == "queue" and row["endpoint"] == "fal-ai/lcm"
    assert json.loads(row["input"]) == {"prompt": "a cat", "seed": 5, "num_images": 2}
    assert row["seed"] == 5
    assert (row["priority"], row["start_timeout"], row["runner_hint"], row["webhook_url"]) == (
        "low", 30.0, "gpu-a", "https://example.com/hook")


async def test_random_seed_is_fixed_at_submit(state: GatewayState, queue_client: httpx.AsyncClient) -> None:
    seeds = set()
    for _ in range(3):
        job = await state.jobs.get((await submit(queue_client, {"prompt": "a cat"}))["request_id"])
        assert job is not None and 0 <= job.seed < 2**32
        seeds.add(job.seed)
    assert len(seeds) > 1


async def test_queue_positions_follow_order_and_priority(queue_client: httpx.AsyncClient) -> None:
    a = await submit(queue_client)
    b = await submit(queue_client)
    low = await submit(queue_client, headers={"x-fal-queue-priority": "low"})
    c = await submit(queue_client)
    assert [a["queue_position"], b["queue_position"], low["queue_position"], c["queue_position"]] == [0, 1, 2, 2]

    async def position(rid: str) -> int:
        r = await queue_client.get(f"/fal-ai/lcm/requests/{rid}/status")
        assert r.status_code == 202
        return int(r.json()["queue_position"])

    # `c` (normal) runs before `low`, whatever the submit order.
    assert [await position(x["request_id"]) for x in (a, b, c, low)] == [0, 1, 2, 3]
    await queue_client.put(f"/fal-ai/lcm/requests/{a['request_id']}/cancel")
    assert [await position(x["request_id"]) for x in (b, c, low)] == [0, 1, 2]


def _common_status(body: dict[str, Any], rid: str) -> None:
    assert body["request_id"] == rid
    for key in URL_KEYS:
        assert body[key].startswith(f"{QUEUE_BASE}/fal-ai/lcm/requests/{rid}")


@pytest.mark.parametrize("flag", ["true", "1", "false", "0", None])
async def test_status_through_the_three_states(
    state: GatewayState, queue_client: httpx.AsyncClient, flag: str | None
) -> None:
    rid = (await submit(queue_client))["request_id"]
    with_logs = flag in ("true", "1")
    params = {"logs": flag} if flag is not None else {}
    status_path = f"/fal-ai/lcm/requests/{rid}/status"

    r = await queue_client.get(status_path, params=params)
    assert r.status_code == 202 and r.headers["x-fal-request-id"] == rid
    assert r.json()["status"] == "IN_QUEUE" and r.json()["queue_position"] == 0
    _common_status(r.json(), rid)

    job = state.jobs.active[rid]
    await state.jobs.start(job)
    state.jobs.log(job, "step 1/4")
    r = await queue_client.get(status_path, params=params)
    body = r.json()
    assert r.status_code == 202 and body["status"] == "IN_PROGRESS"
    assert "logs" in body
    if with_logs:
        assert [e["message"] for e in body["logs"]] == ["step 1/4"]
        entry = body["logs"][0]
        assert set(entry) == {"message", "level", "source", "timestamp"}
        assert (entry["level"], entry["source"]) == ("INFO", "USER")
        assert entry["timestamp"][:4].isdigit() and "T" in entry["timestamp"]
    else:
        assert body["logs"] is None

    output = {"images": [], "seed": 42}
    await state.jobs.finish(job, result=json.dumps(output))
    r = await queue_client.get(status_path, params=params)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "COMPLETED"
    assert body["error"] is None and body["error_type"] is None
    assert isinstance(body["metrics"]["inference_time"], float)
    assert (body["logs"] is not None) == with_logs
    _common_status(body, rid)

    r = await queue_client.get(f"/fal-ai/lcm/requests/{rid}")
    assert r.status_code == 200 and r.json() == output and r.headers["x-fal-request-id"] == rid


async def test_result_before_completion_is_400(queue_client: httpx.AsyncClient) -> None:
    rid = (await submit(queue_client))["request_id"]
    r = await queue_client.get(f"/fal-ai/lcm/requests/{rid}")
    assert r.status_code == 400
    assert "IN_QUEUE" in r.json()["detail"]
    assert r.headers["x-fal-request-id"] == rid


async def test_cancel_queued_job(state: GatewayState, queue_client: httpx.AsyncClient) -> None:
    rid = (await submit(queue_client))["request_id"]
    r = await queue_client.put(f"/fal-ai/lcm/requests/{rid}/cancel")
    assert (r.status_code, r.json()) == (202, {"status": "CANCELLATION_REQUESTED"})
    assert r.headers["x-fal-request-id"] == rid
    assert len(state.worker.queue) == 0  # removed from the queue, not left to run

    r = await queue_client.get(f"/fal-ai/lcm/requests/{rid}/status", params={"logs": "1"})
    body = r.json()
    assert r.status_code == 200 and body["status"] == "COMPLETED"
    assert body["error_type"] == "request_cancelled" and "cancel" in body["error"].lower()

    r = await queue_client.get(f"/fal-ai/lcm/requests/{rid}")
    assert r.status_code == 400
    assert r.json()["error_type"] == "request_cancelled"
    assert r.headers["x-fal-error-type"] == "request_cancelled"

    r = await queue_client.put(f"/fal-ai/lcm/requests/{rid}/cancel")
    assert r.status_code == 400 and r.json()["status"] == "ALREADY_COMPLETED"

    rows = await state.jobs._db("SELECT status, error FROM jobs WHERE id = ?", (rid,))
    assert rows[0]["status"] == "COMPLETED" and "request_cancelled" in rows[0]["error"]


async def test_cancel_unknown_is_404_not_found(queue_client: httpx.AsyncClient) -> None:
    r = await queue_client.put("/fal-ai/lcm/requests/5b1c9d59-0000-4000-8000-000000000000/cancel")
    assert r.status_code == 404 and r.json()["status"] == "NOT_FOUND"
    assert r.headers["x-fal-request-id"]


async def test_status_and_result_of_unknown_request_are_404(queue_client: httpx.AsyncClient) -> None:
    for path in ("/fal-ai/lcm/requests/nope/status", "/fal-ai/lcm/requests/nope"):
        r = await queue_client.get(path)
        assert r.status_code == 404 and r.json()["error_type"] == "not_found"


async def test_request_of_another_app_is_404(queue_client: httpx.AsyncClient) -> None:
    rid = (await submit(queue_client))["request_id"]
    r = await queue_client.get(f"/fal-ai/other/requests/{rid}/status")
    assert r.status_code == 404
    r = await queue_client.get(f"/workflows/fal-ai/lcm/requests/{rid}/status")
    assert r.status_code == 404


async def test_stored_failure_is_answered_with_its_status(
    state: GatewayState, queue_client: httpx.AsyncClient
) -> None:
    from ember.gateway.errors import ApiError, ErrorType

    rid = (await submit(queue_client))["request_id"]
    job: Job = state.jobs.active[rid]
    await state.jobs.start(job)
    await state.jobs.finish(job, error=ApiError(ErrorType.INTERNAL, "the model failed: boom"))
    r = await queue_client.get(f"/fal-ai/lcm/requests/{rid}")
    assert r.status_code == 500
    assert r.json() == {"detail": "the model failed: boom", "error_type": "internal_server_error",
                        "message": "the model failed: boom"}
    assert r.headers["x-fal-request-id"] == rid  # a 5xx with an id: the Python client won't retry it
    status = (await queue_client.get(f"/fal-ai/lcm/requests/{rid}/status")).json()
    assert status["status"] == "COMPLETED" and status["error_type"] == "internal_server_error"


async def test_status_polling_reads_memory_not_disk(state: GatewayState, queue_client: httpx.AsyncClient) -> None:
    rid = (await submit(queue_client))["request_id"]
    calls = 0
    original = state.jobs._db

    async def counting(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return await original(*args)

    state.jobs._db = counting  # type: ignore[method-assign]
    for _ in range(50):
        assert (await queue_client.get(f"/fal-ai/lcm/requests/{rid}/status")).status_code == 202
    assert calls == 0
    assert state.jobs.active[rid].status is Status.IN_QUEUE


async def test_unknown_request_action_is_404(apps: GatewayApps) -> None:
    async with client(apps.queue, QUEUE_BASE) as c:
        r = await c.get("/fal-ai/lcm/requests/x/logs")
    assert r.status_code == 404
