"""The embedded default: one SQLite file in WAL mode, one writer and a pool of readers.

Rule of this module: the writer connection is the primary (writes serialized by one lock per
process; `BEGIN IMMEDIATE` and a busy timeout between processes), the reader connections are the
replica (`PRAGMA query_only`, so a write sent there fails instead of silently working). WAL lets
readers read while the writer writes, so the read/write split is real even on one file. Every
connection lives on its own thread; the event loop never blocks on SQLite.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from .base import DatabaseError, DatabaseUnavailable, IntegrityError, Result

__all__ = ["SqliteDatabase", "sqlite_path"]

T = TypeVar("T")
_PLACEHOLDER = re.compile(r"%s")


def sqlite_path(dsn: str) -> Path:
    """`sqlite:///relative/file.db` or `sqlite:////absolute/file.db` (SQLAlchemy's rule)."""
    if not dsn.startswith("sqlite:///"):
        raise ValueError(f"not a sqlite DSN: {dsn!r} (expected sqlite:///path/to/file.db)")
    rest = dsn[len("sqlite:///"):]
    if not rest or rest.endswith("/"):
        raise ValueError(f"no file name in {dsn!r} (expected sqlite:///path/to/file.db)")
    return Path(rest)


class _Conn:
    """One sqlite3 connection and the one thread that uses it."""

    def __init__(self, path: Path, read_only: bool, busy_timeout: float):
        self.path = path
        self.read_only = read_only
        self.busy_timeout = busy_timeout
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, fn, *args)
        except sqlite3.IntegrityError as e:
            raise IntegrityError(str(e)) from None
        except sqlite3.OperationalError as e:
            msg = str(e)
            if "locked" in msg or "busy" in msg or "unable to open" in msg or "disk" in msg:
                raise DatabaseUnavailable(f"sqlite: {msg}", "primary" if not self.read_only
                                          else "replica") from None
            raise DatabaseError(f"sqlite: {msg}") from None
        except sqlite3.Error as e:
            raise DatabaseError(f"sqlite: {e}") from None

    async def open(self) -> None:
        await self._run(self._open)

    def _open(self) -> None:
        db = sqlite3.connect(self.path, isolation_level=None, timeout=self.busy_timeout)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA foreign_keys=ON")
        if self.read_only:
            db.execute("PRAGMA query_only=ON")
        self._db = db

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        return await self._run(self._execute, sql, params)

    def _execute(self, sql: str, params: Sequence[Any]) -> Result:
        cur = self._db.execute(_PLACEHOLDER.sub("?", sql), tuple(params))
        return Result(cur.rowcount, cur.lastrowid)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return await self._run(self._fetchall, sql, params)

    def _fetchall(self, sql: str, params: Sequence[Any]) -> list[dict[str, Any]]:
        cur = self._db.execute(_PLACEHOLDER.sub("?", sql), tuple(params))
        return [dict(row) for row in cur.fetchall()]

    async def begin(self, read_only: bool = False) -> None:
        # IMMEDIATE takes the write lock now, so two processes never deadlock upgrading
        await self._run(self._db.execute, "BEGIN" if read_only else "BEGIN IMMEDIATE")

    async def commit(self) -> None:
        await self._run(self._db.execute, "COMMIT")

    async def rollback(self) -> None:
        await self._run(self._rollback)

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")

    async def position(self) -> str | None:
        """A causal token for the last write. One file has no replication lag: every reader
        sees every committed write, so any token is satisfied at once; this one only counts."""
        return f"0-0-{self._db.total_changes}"

    async def wait_for(self, position: str, timeout: float) -> bool:
        return True

    async def close(self) -> None:
        if self._db is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._db.close)
            self._db = None
        self._pool.shutdown(wait=False)


class _Node:
    """On one local file a node is always there: usable and up."""

    name = ""
    role = ""

    @property
    def usable(self) -> bool:
        return True

    def status(self) -> str:
        return "up"

    def has(self, position: dict[int, int]) -> bool:
        return True  # one file: a committed write is visible to every reader


class _Writer(_Node):
    """The primary: one connection, one writer at a time."""

    name = "primary"
    role = "primary"

    def __init__(self, conn: _Conn):
        self.conn = conn
        self.lock = asyncio.Lock()

    async def acquire(self) -> _Conn:
        await self.lock.acquire()
        return self.conn

    def release(self, conn: _Conn, broken: bool = False) -> None:
        self.lock.release()

    def pool_use(self) -> tuple[int, int, int]:
        """(in use, idle, most): one connection."""
        busy = int(self.lock.locked())
        return busy, 1 - busy, 1

    async def close(self) -> None:
        await self.conn.close()


class _Readers(_Node):
    """The replica: a pool of read-only connections on the same file."""

    name = "replica-1"
    role = "replica"

    def __init__(self, conns: list[_Conn]):
        self.free: asyncio.Queue[_Conn] = asyncio.Queue()
        self.conns = conns
        for c in conns:
            self.free.put_nowait(c)

    async def acquire(self) -> _Conn:
        return await self.free.get()

    def release(self, conn: _Conn, broken: bool = False) -> None:
        self.free.put_nowait(conn)

    def pool_use(self) -> tuple[int, int, int]:
        """(in use, idle, most)."""
        idle = self.free.qsize()
        return len(self.conns) - idle, idle, len(self.conns)

    async def close(self) -> None:
        for c in self.conns:
            await c.close()


class SqliteDatabase:
    """Opens the file (and its directory) and gives the router its nodes."""

    dialect = "sqlite"

    def __init__(self, dsn: str, readers: int = 4, busy_timeout: float = 10.0):
        self.path = sqlite_path(dsn)
        self.readers = readers
        self.busy_timeout = busy_timeout
        self.primary: _Writer | None = None
        self.replicas: list[_Readers] = []

    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DatabaseUnavailable(f"sqlite: cannot create {self.path.parent}: {e.strerror}",
                                      "primary") from None
        writer = _Conn(self.path, read_only=False, busy_timeout=self.busy_timeout)
        await writer.open()
        conns = [_Conn(self.path, read_only=True, busy_timeout=self.busy_timeout)
                 for _ in range(self.readers)]
        for c in conns:
            await c.open()
        self.primary = _Writer(writer)
        self.replicas = [_Readers(conns)]

    def describe(self) -> str:
        return f"sqlite {self.path} (WAL, 1 writer, {self.readers} readers)"

    async def close(self) -> None:
        if self.primary is not None:
            await self.primary.close()
        for r in self.replicas:
            await r.close()
