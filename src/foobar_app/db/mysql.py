"""MariaDB/MySQL through aiomysql: a primary and replicas, with lag measured by a heartbeat.

Rules of this module:
- every node is an aiomysql pool; every statement is bounded by `query_timeout` (aiomysql has
  none): a statement that overruns is abandoned and its connection closed, never reused; a
  connection that failed is never handed out again;
- replication lag is measured as pt-heartbeat does: a row on the primary updated every
  `heartbeat_interval`, read back on each replica, the difference with the replica's clock is
  the lag; it is cross-checked with the replica's own view (`SHOW SLAVE STATUS`): an IO or SQL
  thread that is not running is broken replication whatever `Seconds_Behind_Master` says;
- a replica that lags more than `max_replication_lag`, or whose replication is broken, or that
  cannot be reached, is skipped at once and taken back only after `replica_rise` good checks
  in a row (no flapping); the primary is marked down when it cannot be reached and up again
  when it can. While the primary is down, a replica whose SQL thread still runs keeps serving
  reads: nothing fresher exists, and no heartbeat can arrive (MaxScale's fail_on_write).
The router decides what runs where; this module only says which nodes are usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiomysql
import pymysql

from .base import DatabaseError, DatabaseUnavailable, IntegrityError, QueryTimeout, Result

__all__ = ["MysqlDatabase", "MysqlOptions", "dsn_from_cluster", "parse_mysql_dsn"]

# CREATE TABLE IF NOT EXISTS and the like raise server notes as Python warnings: not ours to print
warnings.filterwarnings("ignore", category=pymysql.Warning)

log = logging.getLogger("foobar_app.db")

HEARTBEAT_TABLE = "foobar_heartbeat"
_NO_BEAT = "no heartbeat replicated yet"
_CONNECTION_ERRORS = {2003, 2006, 2013, 2055, 1927, 1053}  # lost, gone, refused, shutdown


@dataclass(frozen=True)
class MysqlOptions:
    pool_size: int = 10
    connect_timeout: float = 2.0
    query_timeout: float = 5.0
    heartbeat_interval: float = 0.5
    max_replication_lag: float = 5.0
    replica_rise: int = 3  # good checks in a row before a skipped replica is used again


def parse_mysql_dsn(dsn: str) -> dict[str, Any]:
    """mysql://user:password@host:port/database -> aiomysql connect arguments."""
    u = urlsplit(dsn)
    if u.scheme not in ("mysql", "mariadb") or not u.hostname:
        raise ValueError(f"not a mysql DSN: {dsn!r} (expected mysql://user:password@host:port/db)")
    db = u.path.lstrip("/")
    if not db:
        raise ValueError(f"no database in {dsn!r} (expected mysql://user:password@host:port/db)")
    args: dict[str, Any] = {
        "host": u.hostname,
        "port": u.port or 3306,
        "user": unquote(u.username or "root"),
        "password": unquote(u.password or ""),
        "db": db,
    }
    for key, values in parse_qs(u.query).items():
        if key == "unix_socket":
            args["unix_socket"] = values[-1]
    return args


def dsn_from_cluster(path: str | Path) -> tuple[str, list[str]]:
    """The primary and replica DSNs written by `cluster up` into cluster.json."""
    try:
        data = json.loads(Path(path).read_text())
        return data["primary"], list(data.get("replicas", []))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"--cluster {path}: cannot read a cluster description: {e}") from None


class _Conn:
    """A pooled aiomysql connection with the statement timeout enforced."""

    __slots__ = ("broken", "node", "raw")

    def __init__(self, node: MysqlNode, raw: aiomysql.Connection):
        self.node = node
        self.raw = raw
        self.broken = False

    async def _run(self, sql: str, params: Sequence[Any], fetch: bool):
        raw = self.raw
        try:
            async with asyncio.timeout(self.node.options.query_timeout or None):
                async with raw.cursor(aiomysql.DictCursor) as cur:
                    await cur.execute(sql, tuple(params) if params else None)
                    if fetch:
                        return await cur.fetchall()
                    return Result(cur.rowcount, cur.lastrowid)
        except TimeoutError:
            self._break()
            raise QueryTimeout(f"{self.node.name}: statement took over "
                               f"{self.node.options.query_timeout:g}s", self.node.role) from None
        except pymysql.err.IntegrityError as e:
            raise IntegrityError(str(e)) from None
        except (pymysql.err.OperationalError, pymysql.err.InterfaceError, OSError) as e:
            code = e.args[0] if e.args and isinstance(e.args[0], int) else 0
            if isinstance(e, OSError) or code in _CONNECTION_ERRORS or code >= 2000:
                self._break()
                self.node.failed(str(e))
                raise DatabaseUnavailable(f"{self.node.name}: {e}", self.node.role) from None
            raise DatabaseError(f"{self.node.name}: {e}") from None
        except pymysql.err.MySQLError as e:
            raise DatabaseError(f"{self.node.name}: {e}") from None

    def _break(self) -> None:
        self.broken = True
        self.raw.close()  # aiomysql closes the socket at once; the pool drops it on release

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        return await self._run(sql, params, False)

    async def fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        rows = await self._run(sql, params, True)
        return list(rows)

    async def begin(self, read_only: bool = False) -> None:
        await self.execute("START TRANSACTION READ ONLY" if read_only else "START TRANSACTION")

    async def commit(self) -> None:
        await self.execute("COMMIT")

    async def rollback(self) -> None:
        if not self.broken:
            with contextlib.suppress(DatabaseError, DatabaseUnavailable):
                await self.execute("ROLLBACK")


class MysqlNode:
    """One server: its pool, and whether the router may use it."""

    def __init__(self, name: str, role: str, dsn: str, options: MysqlOptions):
        self.name = name
        self.role = role
        self.dsn = dsn
        self.args = parse_mysql_dsn(dsn)
        self.options = options
        self.pool: aiomysql.Pool | None = None
        self.state = "down"  # primary: up/down; replica: up/lagging/broken/down
        self.detail = "not checked yet"
        self.lag: float | None = None
        self.good = 0  # good checks in a row (replicas come back after replica_rise)
        self.used = False  # the router may send reads here (replicas, with hysteresis)
        self.checked_once = False
        self.can_see_status = True  # SHOW SLAVE STATUS needs the SLAVE MONITOR privilege

    @property
    def usable(self) -> bool:
        return self.used if self.role == "replica" else self.state == "up"

    def status(self) -> str:
        """"up" only when the router may use it: a replica that is fine again but still on
        probation (fewer than replica_rise good checks) is "recovering"."""
        if self.role == "replica" and self.state == "up" and not self.used:
            return "recovering"
        return self.state

    async def open(self) -> None:
        try:
            self.pool = await aiomysql.create_pool(
                minsize=0, maxsize=self.options.pool_size, autocommit=True,
                connect_timeout=self.options.connect_timeout, pool_recycle=3600,
                charset="utf8mb4", **self.args)
        except (pymysql.err.MySQLError, OSError) as e:
            raise DatabaseUnavailable(f"{self.name} ({self.args['host']}:{self.args['port']}): {e}",
                                      self.role) from None

    async def acquire(self) -> _Conn:
        if self.pool is None:
            raise DatabaseUnavailable(f"{self.name} is not open", self.role)
        try:
            async with asyncio.timeout(self.options.connect_timeout + 1.0):
                raw = await self.pool.acquire()
        except (pymysql.err.MySQLError, OSError, TimeoutError) as e:
            self.failed(str(e) or "connect timeout")
            raise DatabaseUnavailable(f"{self.name}: cannot connect: {e or 'timeout'}",
                                      self.role) from None
        return _Conn(self, raw)

    def release(self, conn: _Conn, broken: bool = False) -> None:
        if broken or conn.broken:
            conn.raw.close()
        self.pool.release(conn.raw)

    def failed(self, why: str) -> None:
        """A connection to this node failed: stop using it until its next good check."""
        if self.state != "down":
            log.warning("%s %s is down: %s", self.role, self.name, why)
        self.state = "down"
        self.detail = why
        self.good = 0
        self.used = False

    async def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            await self.pool.wait_closed()
            self.pool = None


def _replication_problem(status: list[dict[str, Any]] | None) -> str | None:
    """What is wrong with a replica's replication threads, from SHOW SLAVE STATUS (None: they
    run, or the status cannot be read and the heartbeat alone decides)."""
    if status is None:
        return None
    if not status:
        return "not replicating (no replica status)"
    st = status[0]
    if st.get("Slave_SQL_Running") != "Yes":
        err = st.get("Last_SQL_Error") or ""
        return f"SQL thread not running{': ' + err if err else ''}"
    if st.get("Slave_IO_Running") != "Yes":
        err = st.get("Last_IO_Error") or ""
        return f"IO thread {st.get('Slave_IO_Running') or 'stopped'}{': ' + err if err else ''}"
    return None


class MysqlDatabase:
    """The nodes of a primary/replica set and the monitor that keeps their state."""

    dialect = "mysql"
    _beat_sql = (f"INSERT INTO {HEARTBEAT_TABLE} (id, ts) VALUES (1, NOW(6)) "
                 "ON DUPLICATE KEY UPDATE ts = NOW(6)")

    def __init__(self, primary: str, replicas: Sequence[str], options: MysqlOptions | None = None):
        self.options = options or MysqlOptions()
        self.primary = MysqlNode("primary", "primary", primary, self.options)
        self.replicas = [MysqlNode(f"replica-{i + 1}", "replica", dsn, self.options)
                         for i, dsn in enumerate(replicas)]
        self._task: asyncio.Task | None = None

    def describe(self) -> str:
        p = self.primary.args
        return (f"mariadb primary {p['host']}:{p['port']}/{p['db']} and "
                f"{len(self.replicas)} replica(s)")

    async def open(self) -> None:
        for node in (self.primary, *self.replicas):
            await node.open()  # pools connect lazily: a node that is down does not stop us
        await self.check()  # know every node's state before serving
        # a replica that replicates but has not seen a heartbeat yet (the first one was just
        # written) is not lagging: give the first beats a moment to arrive
        for _ in range(10):
            if not any(r.detail == _NO_BEAT for r in self.replicas):
                break
            await asyncio.sleep(self.options.heartbeat_interval / 2)
            await asyncio.gather(*(self._look(r, self.primary.state == "down")
                                   for r in self.replicas if r.detail == _NO_BEAT))
        self._task = asyncio.get_running_loop().create_task(self._monitor())

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(self.options.heartbeat_interval)
            try:
                await self.check()
            except Exception:  # a monitor that dies would freeze every state: log and go on
                log.exception("database monitor")

    async def check(self) -> None:
        """One round: beat on the primary, then look at every replica."""
        await self._beat()
        primary_down = self.primary.state == "down"
        await asyncio.gather(*(self._look(r, primary_down) for r in self.replicas))

    async def _beat(self) -> None:
        p = self.primary
        try:
            conn = await p.acquire()
        except DatabaseUnavailable as e:
            p.detail = str(e)
            return
        try:
            try:
                await conn.execute(self._beat_sql)
            except DatabaseError as e:
                if "1146" not in str(e):  # the table is missing: make it, then beat
                    raise
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {HEARTBEAT_TABLE} (id INT PRIMARY KEY, "
                    "ts DATETIME(6) NOT NULL) ENGINE=InnoDB")
                await conn.execute(self._beat_sql)
        except (DatabaseUnavailable, DatabaseError) as e:
            p.detail = str(e)
            return
        finally:
            p.release(conn)
        if p.state != "up":
            log.info("primary %s is up", p.name)
        p.state = "up"
        p.detail = "heartbeat written"

    async def _look(self, r: MysqlNode, primary_down: bool = False) -> None:
        opts = self.options
        try:
            conn = await r.acquire()
        except DatabaseUnavailable as e:
            r.lag = None
            r.detail = str(e)
            return
        try:
            status = None
            if r.can_see_status:
                try:
                    status = await conn.fetchall("SHOW SLAVE STATUS")
                except DatabaseError as e:
                    if "1227" not in str(e):  # access denied: lag from the heartbeat alone
                        raise
                    r.can_see_status = False
                    log.warning("%s: cannot read replica status (grant SLAVE MONITOR); "
                                "lag from the heartbeat only", r.name)
            beat = await conn.fetchall(
                f"SELECT TIMESTAMPDIFF(MICROSECOND, ts, NOW(6)) / 1000000 AS lag "
                f"FROM {HEARTBEAT_TABLE} WHERE id = 1")
        except (DatabaseUnavailable, DatabaseError) as e:
            r.lag = None
            self._set(r, "down", str(e))
            return
        finally:
            r.release(conn)
        lag = float(beat[0]["lag"]) if beat and beat[0]["lag"] is not None else None
        r.lag = lag
        problem = _replication_problem(status)
        if primary_down and (problem is None or not problem.startswith("SQL")):
            # with the primary gone no replica can be fresher than it is, and none gets a
            # heartbeat: a replica that applied everything it received serves reads as it is
            self._set(r, "up", f"primary down; serving what it has ({problem or 'replicating'})")
        elif problem is not None:
            self._set(r, "broken", problem)
        elif lag is None:
            self._set(r, "lagging", _NO_BEAT)
        elif lag > opts.max_replication_lag:
            sbm = status[0].get("Seconds_Behind_Master") if status else "unknown"
            self._set(r, "lagging", f"heartbeat {lag:.1f}s behind (Seconds_Behind_Master {sbm})")
        else:
            self._set(r, "up", f"heartbeat {lag:.2f}s behind")

    def _set(self, r: MysqlNode, state: str, detail: str) -> None:
        old_used = r.used
        first = not r.checked_once
        r.state = state
        r.detail = detail
        if state != "up":
            r.good = 0
            r.used = False
        else:
            r.good += 1
            # the first check after start counts as enough: nothing to flap from yet
            if r.good >= self.options.replica_rise or not r.checked_once:
                r.used = True
        if state != "lagging" or detail != _NO_BEAT:
            r.checked_once = True  # (no heartbeat yet at start-up is no history to flap from)
        if r.used != old_used:
            what = ("in use" if first else "back in use") if r.used else "skipped"
            log.log(logging.INFO if r.used else logging.WARNING, "replica %s %s: %s", r.name, what,
                    detail)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for node in (self.primary, *self.replicas):
            await node.close()

