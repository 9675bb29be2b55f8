"""Runs the gateway: three uvicorn listeners on one event loop over one GatewayState.

SIGINT / SIGTERM (or `stop` set by a caller) stop it cleanly: the listeners stop accepting, running
jobs get `drain_timeout` seconds to finish and are re-queued otherwise, answers in flight are sent,
then the stores and the backend are closed. A second signal stops without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Generator

import uvicorn

from ember.gateway.app import build_apps
from ember.gateway.backend import Backend, TritonBackend
from ember.gateway.state import GatewayState
from ember.gateway.tls import TlsFiles, ensure_tls
from ember.settings import Settings

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 30.0


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signals to `serve` (three servers share one process)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


def _config(app: object, settings: Settings, tls: TlsFiles | None, drain_timeout: float) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        lifespan="off",  # the shared state is opened and closed by serve(), not per app
        log_config=None,
        access_log=settings.log_level.lower() == "debug",
        ssl_certfile=str(tls.cert) if tls else None,
        ssl_keyfile=str(tls.key) if tls else None,
        server_header=False,
        timeout_graceful_shutdown=int(drain_timeout) + 10,
    )


async def serve(
    settings: Settings, backend: Backend | None = None, *, stop: asyncio.Event | None = None,
    drain_timeout: float = DRAIN_TIMEOUT_S,
) -> None:
    """Serve until SIGINT / SIGTERM (or `stop`). The gateway owns `backend` (default: TritonBackend at
    settings.triton_grpc_url, created here on the running loop) and closes it at the end.

    Shutdown order: stop accepting connections; drain the workers (sync runs still waiting get their
    answer); let the listeners send what is in flight; then close the stores and the backend."""
    tls = ensure_tls(settings.var_dir, settings.public_host)
    listeners = [("run", settings.run_port, tls), ("queue", settings.queue_port, tls),
                 ("http", settings.http_port, None)]
    sockets: dict[str, socket.socket] = {}
    try:
        for name, port, _ in listeners:
            sockets[name] = _bind(settings.host, port)
        state = await GatewayState.open(settings, backend or TritonBackend(settings.triton_grpc_url))
    except BaseException:
        for sock in sockets.values():
            sock.close()
        raise
    apps = build_apps(state)
    app_of = {"run": apps.run, "queue": apps.queue, "http": apps.http}
    servers = {name: _Server(_config(app_of[name], settings, t, drain_timeout)) for name, _, t in listeners}

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)

    def on_signal() -> None:
        if stop.is_set():
            log.warning("second signal: stopping without waiting")
            for server in servers.values():
                server.force_exit = True
        stop.set()

    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(sig, on_signal)
    tasks = {name: asyncio.create_task(servers[name].serve(sockets=[sockets[name]]), name=f"listener-{name}")
             for name in servers}
    for name, port, t in listeners:
        log.info("%s listener on %s://%s:%d", name, "https" if t else "http", settings.host, port)
    log.info("gateway ready: run %s, queue %s (TLS bundle for clients: %s)", state.run_base, state.queue_base,
             tls.bundle)
    stopper = asyncio.create_task(stop.wait())
    try:
        await asyncio.wait([stopper, *tasks.values()], return_when=asyncio.FIRST_COMPLETED)
        for name, task in tasks.items():
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("%s listener failed: %s", name, task.exception())
        log.info("stopping: no new connections; draining jobs")
        for server in servers.values():
            server.should_exit = True
        await state.worker.drain(drain_timeout)
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    finally:
        stopper.cancel()
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await state.close(drain_timeout)
        for sock in sockets.values():
            sock.close()
    log.info("gateway stopped")
