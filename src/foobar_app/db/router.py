"""The read/write split every handler goes through, with causal reads and the read safety net.

Rules of this module:
- a handler declares its intent: `read()`, `write()` or `transaction()`;
- writes run on the primary, each statement committed on its own; a transaction runs wholly on
  the primary, from BEGIN to COMMIT (or ROLLBACK when the block raises). A write that cannot be
  made is a `PrimaryUnavailable` saying whether it committed: False when nothing was sent (no
  primary, a read-only node refused it, the transaction was cut before COMMIT), "unknown" when
  the connection was lost after a write or the COMMIT was sent. A write is never retried here;
- after a write (or a transaction's COMMIT) the session asks its connection for the write's GTID
  position: the causal token, recorded for the request (see `track`);
- reads run on a replica chosen round robin among the usable ones, and on the primary when none
  is usable; a read-only transaction (`transaction(read_only=True)`) is a read. A read whose
  connection is lost (the node died, or was found hung) is retried at once on another replica,
  then on the primary: reads are idempotent. So is a read that a replica answers with "no such
  table" (or database, column: `SchemaMissing`): that replica is behind the schema or broken,
  not the statement wrong; on the primary the same error is the statement's own;
- causal reads: when the request carries a token (`track(token)`) and the mode is not "none",
  a read goes to a replica known (from the heartbeat) to have applied the token's position; in
  "session" mode, failing that, to a replica that applies it within `causal_timeout`
  (MASTER_GTID_WAIT); failing that (and at once in "fast" mode) to the primary;
- the safety net: a statement issued under `read()` that is not a plain SELECT/SHOW (or is a
  SELECT ... FOR UPDATE, or calls a locking function) runs on the primary instead;
- the roles a request touched are recorded, so the app can say which served.

The same interface serves SQLite (one writer, a pool of readers) and MariaDB (a primary and any
number of replicas): backends give nodes, the router picks them. The router never blocks on a
node's health: it reads the state the backend's monitor keeps.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

from .base import (
    Conn,
    ConnectionLost,
    DatabaseError,
    DatabaseUnavailable,
    Node,
    PrimaryUnavailable,
    QueryTimeout,
    ReadOnlyRefused,
    Result,
    SchemaMissing,
)
from .classify import is_read_only
from .gtid import Position, parse_position

__all__ = ["CAUSAL_MODES", "Router", "Session", "Trace", "current_trace", "track", "track_roles"]

log = logging.getLogger("foobar_app.db")

CAUSAL_MODES = ("session", "fast", "none")


class Trace:
    """What one request did and must see: the roles it touched, the position it must read
    (from the client's token), the position of its own last write (the token to hand back)."""

    __slots__ = ("roles", "token", "want", "want_text")

    def __init__(self, token: str | None = None):
        self.roles: set[str] = set()
        self.want: Position | None = parse_position(token)  # unparsable: ignored
        # as MASTER_GTID_WAIT wants it: no spaces
        self.want_text = ",".join(p.strip() for p in token.split(",")) if self.want else None
        self.token: str | None = None


_trace: ContextVar[Trace | None] = ContextVar("foobar_db_trace", default=None)


def track(token: str | None = None) -> Trace:
    """Start recording, for the current task, what the request does; `token` (a client's
    causal token, possibly malformed) is the position its reads must see."""
    t = Trace(token)
    _trace.set(t)
    return t


def current_trace() -> Trace | None:
    return _trace.get()


def track_roles() -> set[str]:
    """Start recording the roles of the nodes statements run on (no causal token)."""
    return track().roles


class Session:
    """What a handler uses inside `async with db.read() as s:` (or write, transaction)."""

    def __init__(self, router: Router, intent: str, read_only: bool = False):
        self.router = router
        self.intent = intent  # "read", "write" or "transaction"
        self.read_only = read_only
        self.roles: set[str] = set()
        self.trace = _trace.get()
        self._primary: tuple[Node, Conn] | None = None
        self._replica: tuple[Node, Conn] | None = None
        self._broken: set[int] = set()
        self._sent_write = False  # a write statement was sent on the primary
        self._wrote = False  # ... and succeeded

    # -- statements ------------------------------------------------------------------------
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        return await self._statement("execute", sql, params)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return await self._statement("fetchall", sql, params)

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

    def _ran(self, node: Node, statement: bool = True) -> None:
        if statement:  # counted by role and node (the app's /metrics)
            key = (node.role, node.name)
            queries = self.router.queries
            queries[key] = queries.get(key, 0) + 1
        self.roles.add(node.role)
        if self.trace is not None:
            self.trace.roles.add(node.role)

    async def _statement(self, method: str, sql: str, params: Sequence[Any]):
        if self.read_only:
            # a read-only transaction stays where it began; a write there is refused by the node
            node, conn = self._replica
            try:
                result = await getattr(conn, method)(sql, params)
            except DatabaseUnavailable:
                self._broken.add(id(conn))
                raise
            self._ran(node)
            return result
        if self.intent == "read" and is_read_only(sql):
            return await self._read(method, sql, params)
        return await self._on_primary(method, sql, params, not is_read_only(sql))

    async def _read(self, method: str, sql: str, params: Sequence[Any]):
        avoid: set[int] = set()
        while True:
            if self._replica is None:
                self._replica = await self.router._acquire_read(self._want(), avoid)
            node, conn = self._replica
            try:
                result = await getattr(conn, method)(sql, params)
            except ConnectionLost as e:
                node.release(conn, broken=True)
                self._replica = None
                if isinstance(e, QueryTimeout) and node.state not in ("down", "hung"):
                    raise  # a slow statement, not a lost node: running it again would not help
                if node is self.router.primary:
                    raise PrimaryUnavailable(str(e), None) from None
                avoid.add(id(node))
                log.info("read on %s lost (%s): retried elsewhere", node.name, e)
                continue
            except SchemaMissing as e:
                node.release(conn)
                self._replica = None
                if node is self.router.primary:
                    raise  # the primary has the schema: the statement itself is wrong
                avoid.add(id(node))
                log.info("read on %s: %s (the replica is behind the schema or broken): "
                         "retried elsewhere", node.name, e)
                continue
            self._ran(node)
            return result

    def _want(self) -> tuple[Position, str] | None:
        t = self.trace
        if t is None or t.want is None or self.router.causal_reads == "none":
            return None
        return t.want, t.want_text

    async def _on_primary(self, method: str, sql: str, params: Sequence[Any], write: bool):
        if self._primary is None:  # writes, transactions and the read safety net
            self._primary = await self.router._acquire_primary(self._committed(False))
        node, conn = self._primary
        if write:
            self._sent_write = True
        try:
            result = await getattr(conn, method)(sql, params)
        except ReadOnlyRefused as e:
            raise PrimaryUnavailable(f"{e} (it is no longer the primary)",
                                     self._committed(False)) from None
        except ConnectionLost as e:
            self._broken.add(id(conn))
            outcome = "unknown" if self.intent == "write" and (self._sent_write and e.sent) \
                else False
            raise PrimaryUnavailable(f"connection to the primary lost: {e}",
                                     self._committed(outcome)) from None
        except DatabaseUnavailable as e:
            self._broken.add(id(conn))
            raise PrimaryUnavailable(str(e), self._committed(False)) from None
        if write:
            self._wrote = True
        self._ran(node)
        return result

    def _committed(self, outcome: bool | str) -> bool | str | None:
        if self.intent == "read" and not self._sent_write:
            return None  # a read that needed the primary: nothing to commit
        if outcome is False and self.intent == "write" and self._wrote:
            return "unknown"  # an earlier statement of this write committed
        return outcome

    # -- life cycle ------------------------------------------------------------------------
    async def __aenter__(self) -> Session:
        if self.intent == "transaction":
            self._primary = await self.router._acquire_primary(self._committed(False))
            node, conn = self._primary
            try:
                await conn.begin()
            except DatabaseUnavailable as e:
                self._broken.add(id(conn))
                self._release()
                raise PrimaryUnavailable(str(e), False) from None
            self._ran(node, False)
        elif self.read_only:
            self._replica = await self.router._acquire_read(self._want(), set())
            node, conn = self._replica
            try:
                await conn.begin(True)
            except DatabaseUnavailable:
                self._broken.add(id(conn))
                self._release()
                raise
            self._ran(node, False)
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        try:
            if self.intent == "transaction" and self._primary is not None:
                _, conn = self._primary
                if exc_type is None:
                    try:
                        await conn.commit()
                    except ReadOnlyRefused as e:
                        raise PrimaryUnavailable(str(e), False) from None
                    except ConnectionLost as e:
                        self._broken.add(id(conn))
                        raise PrimaryUnavailable(f"connection lost at COMMIT: {e}",
                                                 "unknown") from None
                    except DatabaseUnavailable as e:
                        self._broken.add(id(conn))
                        raise PrimaryUnavailable(str(e), False) from None
                    self._wrote = True
                elif id(conn) not in self._broken:
                    await conn.rollback()
            elif self.read_only and self._replica is not None:
                _, conn = self._replica
                if exc_type is None:
                    await conn.commit()
                elif id(conn) not in self._broken:
                    await conn.rollback()
            if self._wrote and exc_type is None and self.trace is not None:
                await self._token()
        finally:
            self._release()

    async def _token(self) -> None:
        node, conn = self._primary
        try:
            self.trace.token = await conn.position()
        except DatabaseUnavailable as e:  # the write stands; only its token is missing
            self._broken.add(id(conn))
            log.warning("no causal token for a write on %s: %s", node.name, e)

    def _release(self) -> None:
        for pair in (self._primary, self._replica):
            if pair is not None:
                node, conn = pair
                node.release(conn, broken=id(conn) in self._broken)
        self._primary = self._replica = None


class Router:
    """A primary and any number of replicas behind the three intents.

    The nodes come from the backend (`database.primary`, `database.replicas`), asked afresh for
    every session, so a change of roles found by the backend's monitor applies at once."""

    def __init__(self, primary: Node, replicas: Sequence[Node], dialect: str, database: Any = None,
                 causal_reads: str = "session", causal_timeout: float = 1.0):
        if causal_reads not in CAUSAL_MODES:
            raise ValueError(f"causal reads {causal_reads!r}: expected one of "
                             f"{', '.join(CAUSAL_MODES)}")
        self._static = (primary, list(replicas))
        self.dialect = dialect  # "sqlite" or "mysql": the SQL the app writes may differ
        self.database = database  # the backend object that owns the nodes (closed with us)
        self.causal_reads = causal_reads
        self.causal_timeout = causal_timeout
        self._next = 0
        self.queries: dict[tuple[str, str], int] = {}  # (role, node) -> statements run there

    @property
    def primary(self) -> Node:
        return getattr(self.database, "primary", None) or self._static[0]

    @property
    def replicas(self) -> list[Node]:
        found = getattr(self.database, "replicas", None)
        return list(found) if found is not None else self._static[1]

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

    def pick_replica(self, avoid: set[int] | frozenset[int] = frozenset(),
                     want: Position | None = None) -> Node | None:
        usable = [r for r in self.replicas if r.usable and id(r) not in avoid
                  and (want is None or r.has(want))]
        if not usable:
            return None
        node = usable[self._next % len(usable)]
        self._next += 1
        return node

    async def _acquire_read(self, want: tuple[Position, str] | None,
                            avoid: set[int]) -> tuple[Node, Conn]:
        if want is not None:
            return await self._acquire_causal(want[0], want[1], avoid)
        while True:
            node = self.pick_replica(avoid)
            if node is None:
                break
            avoid.add(id(node))
            try:
                return node, await node.acquire()
            except DatabaseUnavailable:
                continue
        return await self._acquire_primary(None)

    async def _acquire_causal(self, want: Position, text: str,
                              avoid: set[int]) -> tuple[Node, Conn]:
        # a replica known to have the position serves at once (MaxScale's "fast")
        while (node := self.pick_replica(avoid, want)) is not None:
            avoid.add(id(node))
            try:
                return node, await node.acquire()
            except DatabaseUnavailable:
                continue
        if self.causal_reads == "session":
            # one that may have it soon: wait there, at most causal_timeout
            while (node := self.pick_replica(avoid)) is not None:
                avoid.add(id(node))
                try:
                    conn = await node.acquire()
                except DatabaseUnavailable:
                    continue
                try:
                    if await conn.wait_for(text, self.causal_timeout):
                        return node, conn
                except DatabaseUnavailable:
                    node.release(conn, broken=True)
                    continue
                except DatabaseError as e:  # the server would not wait on it: the primary has it
                    log.warning("MASTER_GTID_WAIT on %s refused %r: %s", node.name, text, e)
                    node.release(conn)
                    break
                node.release(conn)
                break  # it did not catch up in time: the primary has it
        return await self._acquire_primary(None)

    async def _acquire_primary(self, committed: bool | str | None) -> tuple[Node, Conn]:
        node = self.primary
        if not node.usable:
            raise PrimaryUnavailable(f"the primary ({node.name}) is {node.status()}", committed)
        try:
            return node, await node.acquire()
        except DatabaseUnavailable as e:
            raise PrimaryUnavailable(str(e), committed) from None

    def health(self) -> dict[str, Any]:
        """Each node's state as the monitor last saw it (never waits on a node)."""
        out: dict[str, Any] = {
            "primary": self.primary.status(),
            "replicas": {r.name: r.status() for r in self.replicas},
        }
        nodes = getattr(self.database, "health", None)
        if nodes is not None:
            out["nodes"] = nodes()
        return out

    def can_read(self) -> bool:
        return self.primary.usable or any(r.usable for r in self.replicas)

    async def close(self) -> None:
        if self.database is not None:
            await self.database.close()
