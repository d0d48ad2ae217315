"""The read/write split every handler goes through.

Rules of this module:
- a handler declares its intent: `read()`, `write()` or `transaction()`;
- writes run on the primary, each statement committed on its own; a transaction runs wholly on
  the primary, from BEGIN to COMMIT (or ROLLBACK when the block raises);
- reads run on a replica chosen round robin among the usable ones, and on the primary when none
  is usable; a read-only transaction (`transaction(read_only=True)`) is a read;
- the safety net: a statement issued under `read()` that is not a plain SELECT/SHOW (or is a
  SELECT ... FOR UPDATE, or calls a locking function) runs on the primary instead;
- the roles a request touched are recorded (see `track_roles`), so the app can say which served.

The same interface serves SQLite (one writer, a pool of readers) and MariaDB (a primary and any
number of replicas): backends give nodes, the router picks them.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

from .base import Conn, DatabaseUnavailable, Node, Result
from .classify import is_read_only

__all__ = ["Router", "Session", "track_roles"]

_roles: ContextVar[set[str] | None] = ContextVar("foobar_db_roles", default=None)


def track_roles() -> set[str]:
    """Start recording, for the current task, the roles of the nodes statements run on."""
    roles: set[str] = set()
    _roles.set(roles)
    return roles


def _note(role: str) -> None:
    roles = _roles.get()
    if roles is not None:
        roles.add(role)


class Session:
    """What a handler uses inside `async with db.read() as s:` (or write, transaction)."""

    def __init__(self, router: Router, intent: str, read_only: bool = False):
        self.router = router
        self.intent = intent  # "read", "write" or "transaction"
        self.read_only = read_only
        self.roles: set[str] = set()
        self._primary: tuple[Node, Conn] | None = None
        self._replica: tuple[Node, Conn] | None = None
        self._broken: set[int] = set()

    # -- statements ------------------------------------------------------------------------
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        node, conn = await self._conn_for(sql)
        return await self._call(node, conn, conn.execute, sql, params)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        node, conn = await self._conn_for(sql)
        return await self._call(node, conn, conn.fetchall, sql, params)

    async def fetchone(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = await self.fetchall(sql, params)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, params: Sequence[Any] = ()) -> Any:
        row = await self.fetchone(sql, params)
        return next(iter(row.values())) if row else None

    @property
    def role(self) -> str:
        """"primary" if any statement of this session ran there, else "replica"."""
        if "primary" in self.roles or (not self.roles and self.intent != "read"):
            return "primary"
        return "replica"

    async def _call(self, node: Node, conn: Conn, fn, *args):
        try:
            result = await fn(*args)
        except DatabaseUnavailable:
            self._broken.add(id(conn))
            raise
        self.roles.add(node.role)
        _note(node.role)
        return result

    async def _conn_for(self, sql: str) -> tuple[Node, Conn]:
        if self.read_only:
            # a read-only transaction stays where it began; a write there is refused by the node
            return self._replica
        if self.intent == "read" and is_read_only(sql):
            if self._replica is None:
                self._replica = await self.router._acquire_read()
            return self._replica
        if self._primary is None:  # writes, transactions and the read safety net
            self._primary = await self.router._acquire_primary()
        return self._primary

    # -- life cycle ------------------------------------------------------------------------
    async def __aenter__(self) -> Session:
        if self.intent == "transaction":
            self._primary = await self.router._acquire_primary()
            node, conn = self._primary
            await self._call(node, conn, conn.begin)
        elif self.read_only:
            self._replica = await self.router._acquire_read()
            node, conn = self._replica
            await self._call(node, conn, conn.begin, True)
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            if self.intent == "transaction" or self.read_only:
                pair = self._primary if self.intent == "transaction" else self._replica
                if pair is not None:
                    node, conn = pair
                    if exc_type is None:
                        await self._call(node, conn, conn.commit)
                    elif id(conn) not in self._broken:
                        await conn.rollback()
        finally:
            for pair in (self._primary, self._replica):
                if pair is not None:
                    node, conn = pair
                    node.release(conn, broken=id(conn) in self._broken)
            self._primary = self._replica = None


class Router:
    """One primary and any number of replicas behind the three intents."""

    def __init__(self, primary: Node, replicas: Sequence[Node], dialect: str, database: Any = None):
        self.primary = primary
        self.replicas = list(replicas)
        self.dialect = dialect  # "sqlite" or "mysql": the SQL the app writes may differ
        self.database = database  # the backend object that owns the nodes (closed with us)
        self._next = 0

    def read(self) -> Session:
        """Plain reads: a replica (round robin), the primary when no replica is usable."""
        return Session(self, "read")

    def write(self) -> Session:
        """Writes, each statement committed on its own, on the primary."""
        return Session(self, "write")

    def transaction(self, read_only: bool = False) -> Session:
        """BEGIN ... COMMIT on the primary (ROLLBACK if the block raises); `read_only=True`
        makes it a read-only transaction on a replica instead."""
        if read_only:
            return Session(self, "read", read_only=True)
        return Session(self, "transaction")

    def pick_replica(self) -> Node | None:
        usable = [r for r in self.replicas if r.usable]
        if not usable:
            return None
        node = usable[self._next % len(usable)]
        self._next += 1
        return node

    async def _acquire_read(self) -> tuple[Node, Conn]:
        tried = 0
        while tried < len(self.replicas):
            node = self.pick_replica()
            if node is None:
                break
            tried += 1
            try:
                return node, await node.acquire()
            except DatabaseUnavailable:
                continue
        return await self._acquire_primary()

    async def _acquire_primary(self) -> tuple[Node, Conn]:
        node = self.primary
        if not node.usable:
            raise DatabaseUnavailable(f"the primary ({node.name}) is {node.status()}", "primary")
        return node, await node.acquire()

    def health(self) -> dict[str, Any]:
        return {
            "primary": self.primary.status(),
            "replicas": {r.name: r.status() for r in self.replicas},
        }

    def can_read(self) -> bool:
        return self.primary.usable or any(r.usable for r in self.replicas)

    async def close(self) -> None:
        if self.database is not None:
            await self.database.close()
