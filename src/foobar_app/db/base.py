"""What every database backend gives the router: nodes that lend connections.

Rule of this module: a backend (SQLite, MariaDB) is a set of nodes, one primary and any number
of replicas; a node lends connections (`acquire`/`release`) and says whether it is usable. The
router decides which node runs what; a backend never routes.

Statements use `%s` placeholders whatever the backend (the SQLite one translates).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = [
    "Conn",
    "ConnectionLost",
    "DatabaseError",
    "DatabaseUnavailable",
    "IntegrityError",
    "Node",
    "PrimaryUnavailable",
    "QueryTimeout",
    "ReadOnlyRefused",
    "Result",
    "SchemaMissing",
]


class DatabaseError(Exception):
    """A statement failed for a reason of the database's (not a connection problem)."""


class IntegrityError(DatabaseError):
    """A constraint said no (duplicate key, foreign key, NOT NULL)."""


class SchemaMissing(DatabaseError):
    """A statement named a database, table or column (or index, view, function) the node does
    not have (MariaDB 1146, 1049, 1054, ...). On a replica it means the replica is behind the
    schema (delayed, lagging) or broken, not that the statement is wrong: a read is retried on
    another node; on the primary it is the statement's own error."""


class DatabaseUnavailable(Exception):
    """No node can run this now (primary down for a write, every node down for a read)."""

    def __init__(self, message: str, role: str = ""):
        super().__init__(message)
        self.role = role


class ConnectionLost(DatabaseUnavailable):
    """The connection broke while a statement was out: the server may have run it (`sent`), so
    a write's outcome is unknown. Also raised when the node is found hung or dead while the
    statement waits (the wait is cut short at once, not at the query timeout)."""

    def __init__(self, message: str, role: str = "", sent: bool = True):
        super().__init__(message, role)
        self.sent = sent


class QueryTimeout(ConnectionLost):
    """A statement ran past `query_timeout`; its connection was closed, not reused (the server
    may still finish it)."""


class ReadOnlyRefused(DatabaseUnavailable):
    """A write reached a read-only node (MariaDB error 1290): it was fenced or demoted; the
    statement did not run."""


class PrimaryUnavailable(DatabaseUnavailable):
    """No primary can take this now (none, two writable ones, down, hung, or lost mid-write).

    `committed`: None for a read that needed the primary, False when nothing was written,
    "unknown" when the connection was lost after a write was sent (never retried blindly)."""

    def __init__(self, message: str, committed: bool | str | None = False):
        super().__init__(message, "primary")
        self.committed = committed


@dataclass(frozen=True, slots=True)
class Result:
    rowcount: int
    lastrowid: int | None


class Conn(Protocol):
    """A connection lent by a node."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Result: ...

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]: ...

    async def begin(self, read_only: bool = False) -> None: ...

    async def commit(self) -> None: ...

    async def rollback(self) -> None: ...

    async def position(self) -> str | None: ...  # the position of this connection's last write

    async def wait_for(self, position: str, timeout: float) -> bool: ...  # applied within timeout?


class Node(Protocol):
    name: str
    role: str  # "primary" or "replica"

    @property
    def usable(self) -> bool: ...

    def status(self) -> str: ...  # "up", "down", "hung", "lagging", ...

    def has(self, position: dict[int, int]) -> bool: ...  # known to have applied it

    async def acquire(self) -> Conn: ...

    def release(self, conn: Conn, broken: bool = False) -> None: ...

    async def close(self) -> None: ...
