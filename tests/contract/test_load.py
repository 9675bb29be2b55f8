"""200 concurrent submits, each then polled at the Python client's 10 polls/s until COMPLETED, against a
dedicated stack (benchmarks/queue_load.py does the measuring). Invariants only: no errors, every job
completed, status answers within a generous sanity bound, the gateway's memory bounded. The numbers
themselves are printed (pytest -s) and reported in the README, not asserted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks.queue_load import run_load
from tests.stacks import KEY, dedicated_stack

pytestmark = pytest.mark.e2e

CLIENTS = 200


def test_200_concurrent_clients_polling_at_10_per_second(tmp_path: Path) -> None:
    with dedicated_stack(tmp_path, step_seconds=0.05, EMBER_WORKER_CONCURRENCY="8") as stack:
        assert stack.gateway is not None
        report = asyncio.run(run_load(stack.queue, KEY, str(stack.cafile), clients=CLIENTS,
                                      gateway_pid=stack.gateway.pid, timeout_s=240))
        print("\n" + report.summary())
        assert report.errors == []
        assert report.completed == CLIENTS
        assert report.status_calls >= CLIENTS
        assert report.status_p99_ms < 5000  # a sanity bound on a 2-core machine, not a target
        assert report.rss_start_mib is not None and report.rss_peak_mib is not None
        assert report.rss_peak_mib - report.rss_start_mib < 300
        # A second wave does not grow the gateway further (nothing accumulates per request beyond the
        # bounded recent-jobs cache).
        again = asyncio.run(run_load(stack.queue, KEY, str(stack.cafile), clients=CLIENTS,
                                     gateway_pid=stack.gateway.pid, timeout_s=240))
        print(again.summary())
        assert again.errors == [] and again.completed == CLIENTS
        assert again.rss_peak_mib is not None and again.rss_peak_mib - report.rss_peak_mib < 100
