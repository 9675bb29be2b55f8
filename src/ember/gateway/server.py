"""Runs the gateway: four uvicorn listeners on one event loop over one GatewayState.

SIGINT / SIGTERM (or `stop` set by a caller) stop it cleanly, in this order:
1. readiness drops (/ready answers 503; new realtime sessions and sync runs are refused);
2. running jobs get EMBER_DRAIN_TIMEOUT seconds to finish, then go back to the queue; meanwhile the
   listeners keep answering status and result polls, and submits are stored for the next start;
3. the listeners stop and send what is in flight; 4. the stores and the backend close.
A second signal stops without waiting.

Query strings never reach the logs (uvicorn's access and websocket lines): they carry realtime tokens
(`fal_jwt_token`) and webhook URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
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

# Seconds uvicorn gives answers still in flight once the listeners stop (the jobs are drained by then).
LISTENER_GRACE_S = 5
KEEP_ALIVE_S = 75
_QUERY = re.compile(r"\?[^\s\"]*")


class RedactQueries(logging.Filter):
    """Drops the query string from the paths uvicorn logs (`/fal-ai/lcm/realtime?fal_jwt_token=...`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_QUERY.sub("?…", a) if isinstance(a, str) and a.startswith("/") else a
                                for a in record.args)
        return True


def install_log_redaction() -> None:
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactQueries) for f in logger.filters):
            logger.addFilter(RedactQueries())


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


def _config(app: object, settings: Settings, tls: TlsFiles | None) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        lifespan="off",  # the shared state is opened and closed by serve(), not per app
        log_config=None,
        access_log=settings.log_level.lower() == "debug",
        ssl_certfile=str(tls.cert) if tls else None,
        ssl_keyfile=str(tls.key) if tls else None,
        server_header=False,
        timeout_graceful_shutdown=LISTENER_GRACE_S,
        # Idle keep-alive connections stay open this long (uvicorn's default of 5 s races clients that
        # reuse a connection just as the server closes it; 75 s is nginx's default).
        timeout_keep_alive=KEEP_ALIVE_S,
        ws_max_size=32 * 1024 * 1024,
    )


async def serve(
    settings: Settings, backend: Backend | None = None, *, stop: asyncio.Event | None = None,
    drain_timeout: float | None = None,
) -> None:
    """Serve until SIGINT / SIGTERM (or `stop`). The gateway owns `backend` (default: TritonBackend at
    settings.triton_grpc_url, created here on the running loop) and closes it at the end. The
    shutdown order is the module docstring's; `drain_timeout` overrides EMBER_DRAIN_TIMEOUT."""
    drain = settings.drain_timeout if drain_timeout is None else drain_timeout
    install_log_redaction()
    tls = ensure_tls(settings.var_dir, settings.public_host, settings.tls_hosts)
    listeners = [("run", settings.run_port, tls), ("queue", settings.queue_port, tls),
                 ("rest", settings.rest_port, tls), ("http", settings.http_port, None)]
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
    app_of = {"run": apps.run, "queue": apps.queue, "rest": apps.rest, "http": apps.http}
    servers = {name: _Server(_config(app_of[name], settings, t)) for name, _, t in listeners}

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
        state.stopping = True
        log.info("stopping: readiness is down; draining running jobs (up to %.0fs)", drain)
        await state.worker.drain(drain)
        log.info("drained; closing the listeners")
        for server in servers.values():
            server.should_exit = True
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    finally:
        stopper.cancel()
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await state.close(drain)
        for sock in sockets.values():
            sock.close()
    log.info("gateway stopped")
