"""The gateway's one SQLite database (var/jobs.sqlite3): jobs, webhook deliveries and file records.

One connection on one dedicated thread, so statements never block the event loop and never race each
other. WAL with synchronous=NORMAL: a committed transaction survives a crash of the process (it may
be lost only with the machine's power, which is the trade-off every job queue on SQLite makes).
"""

from __future__ import annotations

import asyncio
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

Statement = tuple[str, tuple[Any, ...]]


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


class Database:
    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._conn = conn
        self._executor = executor
        self._closed = False

    @classmethod
    async def open(cls, path: Path) -> Database:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        conn = await asyncio.get_running_loop().run_in_executor(executor, _connect, path)
        return cls(conn, executor)

    async def _run(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return await self._run(lambda: self._conn.execute(sql, params).fetchall())  # type: ignore[no-any-return]

    async def transaction(self, statements: list[Statement]) -> list[int]:
        """Runs the statements in one transaction; returns each one's row count."""

        def run() -> list[int]:
            counts = []
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    counts.append(self._conn.execute(sql, params).rowcount)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return counts

        return await self._run(run)  # type: ignore[no-any-return]

    async def migrate(self, schema: str, columns: dict[str, dict[str, str]] | None = None) -> None:
        """Creates the tables of `schema`, then adds the `columns` ({table: {name: declaration}}) that
        a database made by an older version lacks."""

        def run() -> None:
            self._conn.executescript(schema)
            for table, wanted in (columns or {}).items():
                have = {row["name"] for row in self._conn.execute(f"PRAGMA table_info({table})")}
                for name, declaration in wanted.items():
                    if name not in have:
                        self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {declaration}")

        await self._run(run)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._run(self._conn.close)
        self._executor.shutdown(wait=True)
