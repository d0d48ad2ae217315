"""foobar_app's database layer: one router, several backends.

    db = await open_router("sqlite:///foobar-data/foobar.db")
    async with db.read() as s:
        rows = await s.fetchall("SELECT id, name FROM items WHERE id > %s", (0,))
    async with db.transaction() as tx:
        await tx.execute("UPDATE items SET note = %s WHERE id = %s", ("x", 1))
"""

from __future__ import annotations

from .base import (
    ConnectionLost,
    DatabaseError,
    DatabaseUnavailable,
    IntegrityError,
    PrimaryUnavailable,
    QueryTimeout,
    ReadOnlyRefused,
    Result,
    SchemaMissing,
)
from .router import CAUSAL_MODES, Router, Session, Trace, current_trace, track, track_roles

__all__ = [
    "CAUSAL_MODES",
    "ConnectionLost",
    "DatabaseError",
    "DatabaseUnavailable",
    "IntegrityError",
    "PrimaryUnavailable",
    "QueryTimeout",
    "ReadOnlyRefused",
    "Result",
    "Router",
    "SchemaMissing",
    "Session",
    "Trace",
    "current_trace",
    "open_router",
    "track",
    "track_roles",
]


async def open_router(dsn: str, replicas: tuple[str, ...] | list[str] = (), *,
                      causal_reads: str = "session", causal_timeout: float = 1.0,
                      names: list[str] | None = None, **options) -> Router:
    """A Router for `dsn` (the primary) and `replicas`.

    sqlite:/// DSNs give the embedded backend (its reader pool is the replica; replica DSNs
    make no sense there; option: readers). mysql:// DSNs give aiomysql pools, a primary and
    any number of replicas (options: those of MysqlOptions; `names`: the nodes' names, in the
    order primary, replicas); which is the primary is then discovered, `dsn` is only the first
    guess. `causal_reads` ("session", "fast", "none") and `causal_timeout`: see the router."""
    if causal_reads not in CAUSAL_MODES:
        raise ValueError(f"causal reads {causal_reads!r}: expected one of {', '.join(CAUSAL_MODES)}")
    causal = {"causal_reads": causal_reads, "causal_timeout": causal_timeout}
    if dsn.startswith("sqlite:"):
        if replicas:
            raise ValueError("--replica needs a mysql:// primary: an SQLite file's replica is "
                             "its own pool of read-only connections")
        from .sqlite import SqliteDatabase

        db = SqliteDatabase(dsn, **options)
        await db.open()
        return Router(db.primary, db.replicas, db.dialect, db, **causal)
    if dsn.startswith(("mysql:", "mariadb:")):
        from .mysql import MysqlDatabase, MysqlOptions, parse_mysql_dsn

        for d in (dsn, *replicas):
            parse_mysql_dsn(d)  # a bad DSN is a ValueError naming it, before anything opens
        mdb = MysqlDatabase(dsn, replicas, MysqlOptions(**options), names=names)
        try:
            await mdb.open()
        except BaseException:
            await mdb.close()
            raise
        return Router(mdb.primary, mdb.replicas, mdb.dialect, mdb, **causal)
    raise ValueError(f"unsupported database DSN {dsn!r}: expected sqlite:///path/to/file.db or "
                     "mysql://user:password@host:port/database")
