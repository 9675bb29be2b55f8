"""Prometheus metrics of the gateway, served at GET /metrics on every listener (no key, like /health).

Triton publishes its own (inference counts and latencies per model, queue time, GPU use) at
http://127.0.0.1:{EMBER_TRITON_METRICS_PORT}/metrics; scrape both.

Each GatewayState has its own registry, so tests can run several gateways in one process.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

# Job latencies run from tens of milliseconds (tiny demo models) to minutes (large images on a busy GPU).
_JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300, 600)
_HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.queue_depth = Gauge("ember_queue_depth", "Jobs waiting to start, by priority", ["priority"], registry=r)
        self.jobs_running = Gauge("ember_jobs_running", "Jobs being run by the worker pool", registry=r)
        self.queue_wait = Histogram("ember_queue_wait_seconds", "Time from accepted to first started",
                                    ["endpoint"], buckets=_JOB_BUCKETS, registry=r)
        self.job_latency = Histogram("ember_job_duration_seconds",
                                     "Time from accepted to COMPLETED, by endpoint, mode and HTTP status of the answer",
                                     ["endpoint", "mode", "status"], buckets=_JOB_BUCKETS, registry=r)
        self.job_retries = Counter("ember_job_retries_total", "Job attempts repeated, by reason",
                                   ["endpoint", "reason"], registry=r)
        self.http_latency = Histogram("ember_http_request_duration_seconds",
                                      "HTTP answers, by listener, method and status code",
                                      ["listener", "method", "status"], buckets=_HTTP_BUCKETS, registry=r)
        self.webhook_deliveries = Counter("ember_webhook_deliveries_total",
                                          "Webhook delivery attempts, by outcome (delivered, retry, failed)",
                                          ["outcome"], registry=r)
        self.webhooks_pending = Gauge("ember_webhooks_pending", "Webhook deliveries not yet delivered", registry=r)
        self.realtime_sessions = Gauge("ember_realtime_sessions", "Open realtime websocket sessions", registry=r)
        self.realtime_frames = Counter("ember_realtime_frames_total",
                                       "Realtime inputs, by outcome (answered, dropped, error)", ["outcome"], registry=r)

    def track_queue(self, depth_of: Callable[[str], int], priorities: tuple[str, ...]) -> None:
        for priority in priorities:
            self.queue_depth.labels(priority).set_function(lambda p=priority: depth_of(p))  # type: ignore[misc]

    def render(self) -> bytes:
        return generate_latest(self.registry)
