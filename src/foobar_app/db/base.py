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
    "DatabaseError",
    "DatabaseUnavailable",
    "IntegrityError",
    "Node",
    "QueryTimeout",
    "Result",
]


class DatabaseError(Exception):
    """A statement failed for a reason of the database's (not a connection problem)."""


class IntegrityError(DatabaseError):
    """A constraint said no (duplicate key, foreign key, NOT NULL)."""


class DatabaseUnavailable(Exception):
    """No node can run this now (primary down for a write, every node down for a read)."""

    def __init__(self, message: str, role: str = ""):
        super().__init__(message)
        self.role = role


class QueryTimeout(DatabaseUnavailable):
    """A statement ran past `query_timeout`; its connection was closed, not reused."""


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


class Node(Protocol):
    name: str
    role: str  # "primary" or "replica"

    @property
    def usable(self) -> bool: ...

    def status(self) -> str: ...  # "up", "down", "lagging", ...

    async def acquire(self) -> Conn: ...

    def release(self, conn: Conn, broken: bool = False) -> None: ...

    async def close(self) -> None: ...
