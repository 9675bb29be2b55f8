"""Queue load: N clients submit at once, then each polls its status the way the Python client's
`subscribe(with_logs=True)` does (GET status_url?logs=true, 0.1 s apart, so up to 10 polls/s per
waiting client), then fetches its result. Measures status-poll latency (p50 / p99 / max), errors,
and the gateway's resident memory while it runs.

    source var/client.env && python -m benchmarks.queue_load --n 200     # against `make serve`

tests/contract/test_load.py runs it against a dedicated stack and checks its invariants (no errors,
every job completed, memory bounded); the numbers themselves are reported, not asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

POLL_INTERVAL_S = 0.1  # fal_client's DEFAULT_QUEUE_POLL_INTERVAL
DEFAULT_INPUT = {"prompt": "a load test", "image_size": {"width": 64, "height": 64}, "num_inference_steps": 2}


@dataclass
class LoadReport:
    clients: int
    completed: int = 0
    errors: list[str] = field(default_factory=list)
    status_calls: int = 0
    status_p50_ms: float = 0.0
    status_p99_ms: float = 0.0
    status_max_ms: float = 0.0
    submit_p99_ms: float = 0.0
    duration_s: float = 0.0
    polls_per_s: float = 0.0
    rss_start_mib: float | None = None
    rss_peak_mib: float | None = None
    rss_end_mib: float | None = None

    def summary(self) -> str:
        memory = (
            f", gateway RSS {self.rss_start_mib:.0f} -> peak {self.rss_peak_mib:.0f} MiB"
            if self.rss_start_mib is not None
            else ""
        )
        return (
            f"{self.clients} clients: {self.completed} completed, {len(self.errors)} errors in "
            f"{self.duration_s:.1f} s; {self.status_calls} status polls ({self.polls_per_s:.0f}/s), "
            f"p50 {self.status_p50_ms:.1f} ms, p99 {self.status_p99_ms:.1f} ms, max {self.status_max_ms:.1f} ms; "
            f"submit p99 {self.submit_p99_ms:.1f} ms{memory}"
        )


def _rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run_load(
    queue_url: str,
    key: str,
    cafile: str | None,
    *,
    clients: int = 200,
    endpoint: str = "fal-ai/lcm",
    payload: dict[str, Any] | None = None,
    gateway_pid: int | None = None,
    timeout_s: float = 300.0,
) -> LoadReport:
    report = LoadReport(clients=clients)
    status_ms: list[float] = []
    submit_ms: list[float] = []
    context = ssl.create_default_context(cafile=cafile) if cafile else ssl.create_default_context()
    start_gate = asyncio.Event()

    async def one(i: int) -> None:
        # Each simulated client has its own connection, as separate fal_client processes do (one shared
        # pool of 200 connections makes httpcore's pool bookkeeping, not the server, the bottleneck).
        async with httpx.AsyncClient(base_url=queue_url, headers={"Authorization": f"Key {key}"}, verify=context,
                                     timeout=120) as c:
            await start_gate.wait()
            await _client(c, i)

    async def _client(c: httpx.AsyncClient, i: int) -> None:
        t0 = time.perf_counter()
        r = await c.post(f"/{endpoint}", json={**(payload or DEFAULT_INPUT), "seed": i})
        submit_ms.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            report.errors.append(f"submit {r.status_code}: {r.text[:200]}")
            return
        status_url, response_url = r.json()["status_url"], r.json()["response_url"]
        while True:
            t0 = time.perf_counter()
            s = await c.get(status_url, params={"logs": "true"})
            status_ms.append((time.perf_counter() - t0) * 1000)
            if s.status_code not in (200, 202):
                report.errors.append(f"status {s.status_code}: {s.text[:200]}")
                return
            if s.json()["status"] == "COMPLETED":
                break
            await asyncio.sleep(POLL_INTERVAL_S)
        result = await c.get(response_url)
        if result.status_code != 200:
            report.errors.append(f"result {result.status_code}: {result.text[:200]}")
            return
        report.completed += 1

    async def watch_memory(stop: asyncio.Event) -> None:
        while not stop.is_set() and gateway_pid is not None:
            rss = _rss_mib(gateway_pid)
            if rss is not None:
                report.rss_peak_mib = max(report.rss_peak_mib or 0.0, rss)
            await asyncio.sleep(0.2)

    if gateway_pid is not None:
        report.rss_start_mib = _rss_mib(gateway_pid)
    tasks = [asyncio.create_task(one(i)) for i in range(clients)]
    stop = asyncio.Event()
    watcher = asyncio.create_task(watch_memory(stop))
    started = time.perf_counter()
    start_gate.set()
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    report.duration_s = time.perf_counter() - started
    for task in pending:
        task.cancel()
        report.errors.append("timed out")
    for task in done:
        if task.exception() is not None:
            report.errors.append(f"{type(task.exception()).__name__}: {task.exception()}")
    stop.set()
    await watcher
    if gateway_pid is not None:
        report.rss_end_mib = _rss_mib(gateway_pid)
    report.status_calls = len(status_ms)
    report.polls_per_s = len(status_ms) / report.duration_s if report.duration_s else 0.0
    report.status_p50_ms = statistics.median(status_ms) if status_ms else 0.0
    report.status_p99_ms = _percentile(status_ms, 0.99)
    report.status_max_ms = max(status_ms, default=0.0)
    report.submit_p99_ms = _percentile(submit_ms, 0.99)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="concurrent clients")
    parser.add_argument(
        "--queue-url", default=f"https://{os.environ.get('FAL_QUEUE_RUN_HOST', '127.0.0.1:8444')}"
    )
    parser.add_argument("--key", default=os.environ.get("FAL_KEY", ""))
    parser.add_argument("--cafile", default=os.environ.get("SSL_CERT_FILE"))
    parser.add_argument("--gateway-pid", type=int, default=None, help="to sample the gateway's memory")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    report = asyncio.run(
        run_load(args.queue_url, args.key, args.cafile, clients=args.n, gateway_pid=args.gateway_pid)
    )
    print(json.dumps(asdict(report)) if args.json else report.summary())


if __name__ == "__main__":
    main()
