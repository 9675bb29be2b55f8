"""The official clients, unmodified, pointed at the test stack by host settings only
(fal-protocol.md §13)."""

from __future__ import annotations

import contextlib
import functools
import http.server
import importlib
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
JS_DIR = REPO / "client" / "js"


@pytest.fixture(scope="session")
def fal_client(client_env: dict[str, str]) -> Iterator[ModuleType]:
    """`import fal_client` after setting FAL_RUN_HOST & co: the client reads them at import."""
    saved = {k: os.environ.get(k) for k in client_env}
    os.environ.update(client_env)
    for name in [m for m in sys.modules if m == "fal_client" or m.startswith("fal_client.")]:
        del sys.modules[name]
    try:
        yield importlib.import_module("fal_client")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def static_server(directory: Path) -> Iterator[str]:
    """An HTTP server for the files under `directory` (checkpoint URLs the gateway fetches): its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:  # the test output stays readable
            return None

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(directory))
    )
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
