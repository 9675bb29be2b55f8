"""Reliability, on dedicated stacks (real tritonserver + the real `python -m ember.gateway` process, the
stand-in model so that a job's length is known): the gateway SIGKILLed with jobs queued and running,
tritonserver killed mid-run, and a graceful shutdown. Each test counts: every accepted job reaches a
terminal state, none is lost or stuck, finished results and files are still served and never
rewritten."""

from __future__ import annotations

import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.stacks import TestStack, dedicated_stack

pytestmark = pytest.mark.e2e

APP = "fal-ai/lcm"


def _submit(c: httpx.Client, steps: int, seed: int, **extra: Any) -> str:
    r = c.post(f"/{APP}", json={"prompt": "a cat", "seed": seed, "num_inference_steps": steps,
                                 "image_size": {"width": 64, "height": 64}, **extra})
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def _status(c: httpx.Client, rid: str) -> dict[str, Any]:
    r = c.get(f"/{APP}/requests/{rid}/status", params={"logs": "1"})
    assert r.status_code in (200, 202), r.text
    body: dict[str, Any] = r.json()
    return body


def _wait_all(c: httpx.Client, ids: list[str], timeout: float = 90) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + timeout
    done: dict[str, dict[str, Any]] = {}
    while len(done) < len(ids):
        if time.monotonic() > deadline:
            stuck = {i: _status(c, i)["status"] for i in ids if i not in done}
            raise AssertionError(f"not COMPLETED in {timeout}s: {stuck}")
        for rid in ids:
            if rid not in done:
                status = _status(c, rid)
                if status["status"] == "COMPLETED":
                    done[rid] = status
        time.sleep(0.1)
    return done


def _wait_for(predicate: Any, timeout: float = 30, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _db_rows(stack: TestStack) -> dict[str, tuple[str, float | None, str | None]]:
    with sqlite3.connect(stack.settings.db_path) as conn:
        return {r[0]: (r[1], r[2], r[3]) for r in conn.execute("SELECT id, status, finished_at, result FROM jobs")}


def test_sigkill_of_the_gateway_loses_nothing(tmp_path: Path) -> None:
    with dedicated_stack(tmp_path, step_seconds=0.2, EMBER_MAX_ATTEMPTS="2", EMBER_WORKER_CONCURRENCY="3") as stack:
        with stack.client() as c:
            long_job = _submit(c, 12, 0)  # ~2.4 s: running at each kill
            short = [_submit(c, 2, i) for i in range(1, 13)]
            _wait_for(lambda: sum(_status(c, r)["status"] == "COMPLETED" for r in short) >= 2, what="2 done")
            before = {r: c.get(f"/{APP}/requests/{r}").json() for r in short if _status(c, r)["status"] == "COMPLETED"}
            rows_before = _db_rows(stack)
            assert _status(c, long_job)["status"] == "IN_PROGRESS"

        stack.kill_gateway()  # 1st SIGKILL: jobs queued and running
        stack.start_gateway()
        with stack.client() as c:
            _wait_for(lambda: any(line["message"] == "attempt 2" for line in _status(c, long_job)["logs"])
                      and _status(c, long_job)["status"] == "IN_PROGRESS", what="the long job's 2nd attempt")
        stack.kill_gateway()  # 2nd SIGKILL, while the long job runs its last allowed attempt
        stack.start_gateway()

        with stack.client() as c:
            final = _wait_all(c, [long_job, *short])
            # Each job completed, or (the long one, and any short one that was running at both kills)
            # failed clearly after its 2 attempts.
            for rid, status in final.items():
                assert status["error"] is None or (
                    status["error_type"] == "runner_disconnected" and "each of 2 attempts" in status["error"]), status
            assert final[long_job]["error_type"] == "runner_disconnected"
            assert sum(final[r]["error"] is None for r in short) >= len(short) - 3
            r = c.get(f"/{APP}/requests/{long_job}")
            assert r.status_code == 503 and r.headers["x-fal-request-id"] == long_job
            # Results finished before the kills are served unchanged, and so are their files.
            for rid, result in before.items():
                assert c.get(f"/{APP}/requests/{rid}").json() == result
                assert httpx.get(result["images"][0]["url"], verify=stack.ssl_context()).status_code == 200
            for rid in (r for r in short if final[r]["error"] is None):
                image = c.get(f"/{APP}/requests/{rid}").json()["images"][0]
                assert httpx.get(image["url"], verify=stack.ssl_context()).status_code == 200
        rows_after = _db_rows(stack)
        assert set(rows_after) == {long_job, *short}  # 0 lost
        assert all(status == "COMPLETED" for status, _, _ in rows_after.values())  # 0 stuck
        for rid, (status, finished_at, result) in rows_before.items():
            if status == "COMPLETED":  # never written twice: same time, same bytes
                assert rows_after[rid] == (status, finished_at, result)
        log = stack.gateway_log.read_text()
        assert "a second result was dropped" not in log and "already COMPLETED in the database" not in log


def test_tritonserver_killed_mid_run(tmp_path: Path) -> None:
    with (dedicated_stack(tmp_path, step_seconds=0.1, EMBER_MAX_ATTEMPTS="4", EMBER_RETRY_DELAY="1.0") as stack,
          stack.client() as c):
        assert stack.ready() == 200
        ids = [_submit(c, 8, i) for i in range(3)]
        _wait_for(lambda: _status(c, ids[0])["status"] == "IN_PROGRESS", what="a running job")
        stack.kill_triton()
        # The gateway stays up and says it is not ready.
        assert httpx.get(f"{stack.run}/health", verify=stack.ssl_context()).status_code == 200
        _wait_for(lambda: stack.ready() == 503, what="/ready 503")
        stack.start_triton()  # back within the retry window (1 + 2 + 4 s)
        _wait_for(lambda: stack.ready() == 200, what="/ready 200")
        final = _wait_all(c, ids)
        assert all(s["error"] is None for s in final.values()), {r: (s["error"], s["logs"]) for r, s in final.items()}
        retried = [s for s in final.values() if any("retrying" in line["message"] for line in s["logs"])]
        assert retried, "the job that was running when Triton died must have been retried"

        # Down for good: bounded retries, then a clear 503.
        stack.kill_triton()
        rid = _submit(c, 2, 9)
        (status,) = _wait_all(c, [rid], timeout=30).values()
        assert status["error_type"] == "runner_scheduling_failure"
        assert "tried 4 time(s)" in status["error"]
        assert sum("retrying" in line["message"] for line in status["logs"]) == 3
        r = c.get(f"/{APP}/requests/{rid}")
        assert r.status_code == 503 and r.headers["x-fal-request-id"] == rid  # PY won't retry it
        assert stack.gateway is not None and stack.gateway.poll() is None


def test_graceful_shutdown_drains_then_exits(tmp_path: Path) -> None:
    with dedicated_stack(tmp_path, step_seconds=0.2, EMBER_DRAIN_TIMEOUT="10") as stack:
        assert stack.gateway is not None
        with stack.client() as c:
            running = _submit(c, 8, 1)  # ~1.6 s
            _wait_for(lambda: _status(c, running)["status"] == "IN_PROGRESS", what="running")
            stack.gateway.send_signal(signal.SIGTERM)
            _wait_for(lambda: stack.ready() == 503, timeout=5, what="readiness down first")
            assert httpx.get(f"{stack.run}/health", verify=stack.ssl_context()).status_code == 200
            # While draining, status is still answered and a submit is stored for the next start.
            assert _status(c, running)["status"] in ("IN_PROGRESS", "COMPLETED")
            kept = _submit(c, 1, 2)
        assert stack.gateway.wait(20) == 0
        assert "gateway stopped" in stack.gateway_log.read_text()
        stack.start_gateway()
        with stack.client() as c:
            final = _wait_all(c, [running, kept])
        assert final[running]["error"] is None  # finished during the drain, not re-run
        assert not any(line["message"] == "attempt 2" for line in final[running]["logs"])
        assert final[kept]["error"] is None


def test_drain_timeout_puts_a_long_job_back(tmp_path: Path) -> None:
    with dedicated_stack(tmp_path, step_seconds=0.2, EMBER_DRAIN_TIMEOUT="0.5") as stack:
        assert stack.gateway is not None
        with stack.client() as c:
            rid = _submit(c, 12, 1)  # 2.4 s, longer than the drain
            _wait_for(lambda: _status(c, rid)["status"] == "IN_PROGRESS", what="running")
        stack.gateway.send_signal(signal.SIGTERM)
        assert stack.gateway.wait(20) == 0
        status, _, _ = _db_rows(stack)[rid]
        assert status == "IN_QUEUE"
        stack.start_gateway()
        with stack.client() as c:
            (final,) = _wait_all(c, [rid]).values()
        assert final["error"] is None
