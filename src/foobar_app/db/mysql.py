"""MariaDB/MySQL through aiomysql: nodes whose roles, lag and GTID positions a heartbeat keeps.

Rules of this module:
- every node is an aiomysql pool; every statement is bounded by `query_timeout` (aiomysql has
  none): a statement that overruns is abandoned and its connection closed, never reused; a
  connection that failed is never handed out again. Every connection is made with
  SO_LINGER 0, so closing it is a reset: what the kernel still holds for it is dropped, and a
  statement sent into a cut link and abandoned is not delivered, and run, when the link comes
  back (aiomysql closes a cancelled connection itself: the option must be there before);
- roles are discovered, never configured: each node's monitor reads `@@read_only` (and its
  replication status) every `heartbeat_interval`; the one writable node is the primary, the
  others are replicas, so routing follows a switchover or failover without a restart. No
  writable node, or two, means no primary (writes answer 503 until one is fenced);
- the epoch fence: each check also reads the node's row of the replicated table
  `cluster_epoch` (the epoch `cluster up`, `switchover` and `failover` write on the primary
  they make; no table = epoch 0). A writable node whose epoch is lower than the highest epoch
  seen on any node is `stale` (an old primary back from a cut link, never told): it counts
  for nothing in the election above and serves neither writes nor reads, logged once, shown
  in `health()`, until it is read-only again (`cluster rejoin`). So after a failover the new
  primary keeps the writes when the old one returns; two writable nodes at the same epoch
  are still no primary (the row's server_id and name are for operators; the epoch decides);
- each node has its own monitor on its own connection, so a hung node never delays the others'
  checks; a node that has not answered within twice the heartbeat interval is `hung`: it is
  skipped, and every statement or connect in flight on it is cut short at once (reads are then
  retried elsewhere by the router, writes report an unknown outcome);
- replication lag is measured as pt-heartbeat does: a row on the primary updated every
  `heartbeat_interval` (by a task of its own, never holding up the node's check), read back on
  each replica; it is cross-checked with `SHOW SLAVE STATUS`: an IO or SQL thread that is not
  running is broken replication whatever `Seconds_Behind_Master` says. The monitor also reads
  each replica's `@@gtid_slave_pos`, which says what a causal read may find there;
- a replica that lags more than `max_replication_lag`, whose replication is broken, or that
  cannot be reached is skipped at once and taken back only after `replica_rise` good checks
  in a row (no flapping). While the primary is down or hung, a replica whose SQL thread still
  runs keeps serving reads: nothing fresher exists (MaxScale's fail_on_write);
- a statement naming a table, database or column the node lacks (1146, 1049, 1054, ...) is a
  `SchemaMissing`: on a replica, behind the schema or broken (the router retries the read);
- every change of a node's state, of the primary, and of semi-sync replication is logged once.
The router decides what runs where; this module only says which nodes are usable and where.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import aiomysql
import pymysql

from .base import (
    ConnectionLost,
    DatabaseError,
    DatabaseUnavailable,
    IntegrityError,
    QueryTimeout,
    ReadOnlyRefused,
    Result,
    SchemaMissing,
)
from .gtid import Position, covers, parse_position

__all__ = ["MysqlDatabase", "MysqlOptions", "cluster_nodes", "dsn_from_cluster",
           "parse_mysql_dsn"]

# CREATE TABLE IF NOT EXISTS and the like raise server notes as Python warnings: not ours to print
warnings.filterwarnings("ignore", category=pymysql.Warning)

log = logging.getLogger("foobar_app.db")

HEARTBEAT_TABLE = "foobar_heartbeat"
_NO_BEAT = "no heartbeat replicated yet"
_CONNECTION_ERRORS = {2003, 2006, 2013, 2055, 1927, 1053}  # lost, gone, refused, shutdown
_NOT_SENT = {2003, 2006}  # refused, or the write of the statement itself failed
_READ_ONLY = 1290  # "The MariaDB server is running with the --read-only option"
# the node lacks what the statement names: on a replica, behind the schema or broken
_SCHEMA_MISSING = {
    1146,  # ER_NO_SUCH_TABLE: Table 'db.t' doesn't exist
    1049,  # ER_BAD_DB_ERROR: Unknown database
    1054,  # ER_BAD_FIELD_ERROR: Unknown column (an ALTER not applied yet)
    1176,  # ER_KEY_DOES_NOT_EXISTS: an index hint names an index not made yet
    1305,  # ER_SP_DOES_NOT_EXIST: a stored function not made yet
    1356,  # ER_VIEW_INVALID: a view whose tables are not there yet
}
_DOWN = ("down", "hung")

EPOCH_TABLE = "cluster_epoch"  # written by cluster.py: row id 1 -> epoch, server_id, name
_PROBE = ("SELECT @@read_only AS ro, @@gtid_slave_pos AS slave_pos, "
          "@@gtid_binlog_pos AS binlog_pos, @@rpl_semi_sync_master_enabled AS ss_enabled, "
          "(SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS "
          " WHERE VARIABLE_NAME = 'RPL_SEMI_SYNC_MASTER_STATUS') AS ss_status")


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


def _read_cluster(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
        if not isinstance(data.get("primary"), str):
            raise ValueError("no primary DSN")
        return data
    except FileNotFoundError:
        raise ValueError(
            f"--cluster {path}: no such file; start a cluster first: python -m foobar_app "
            f"cluster up --dir {Path(path).parent} (or `cluster start` for a stopped one)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--cluster {path}: cannot read a cluster description: {e}") from None


def dsn_from_cluster(path: str | Path) -> tuple[str, list[str]]:
    """The primary and replica DSNs written by `cluster up` into cluster.json."""
    data = _read_cluster(path)
    return data["primary"], list(data.get("replicas", []))


def cluster_nodes(path: str | Path) -> list[tuple[str, str]]:
    """Every node of a cluster.json as (name, DSN), whatever its role today (fenced included):
    the app discovers roles itself."""
    data = _read_cluster(path)
    nodes = data.get("nodes") or {}
    if not nodes:
        return [("primary", data["primary"]),
                *((f"replica-{i}", d) for i, d in enumerate(data.get("replicas", []), 1))]
    u = urlsplit(data["primary"])
    out = []
    for name, n in nodes.items():
        dsn = n.get("dsn") or u._replace(netloc=f"{u.netloc.rpartition('@')[0]}@"
                                                f"{u.hostname}:{n['port']}").geturl()
        out.append((name, dsn))
    return out


_LINGER_0 = struct.pack("ii", 1, 0)


def _reset_on_close(raw: aiomysql.Connection) -> aiomysql.Connection:
    """SO_LINGER 0 on the connection's socket (once): its close is then a reset, and the kernel
    drops what it has not delivered yet. A statement retransmitted into a cut link would
    otherwise run on the node once the link returns: on an old primary, a write nobody fenced
    (aiomysql closes a connection cancelled mid-statement itself, gracefully)."""
    if getattr(raw, "_foobar_linger", False):
        return raw
    writer = getattr(raw, "_writer", None)
    sock = writer.transport.get_extra_info("socket") if writer is not None else None
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):  # (a transport without one)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_0)
    raw._foobar_linger = True
    return raw


class _Conn:
    """A pooled aiomysql connection with the statement timeout enforced."""

    __slots__ = ("broken", "node", "raw")

    def __init__(self, node: MysqlNode, raw: aiomysql.Connection):
        self.node = node
        self.raw = raw
        self.broken = False

    async def _run(self, sql: str, params: Sequence[Any], fetch: bool,
                   timeout: float | None = None):
        raw, node = self.raw, self.node
        epoch = node.epoch
        try:
            async with node.guard(timeout or node.options.query_timeout), \
                    raw.cursor(aiomysql.DictCursor) as cur:
                await cur.execute(sql, tuple(params) if params else None)
                if fetch:
                    return await cur.fetchall()
                return Result(cur.rowcount, cur.lastrowid)
        except TimeoutError:
            self._break()
            if node.epoch != epoch:  # cut short: the node was found hung or dead meanwhile
                raise ConnectionLost(f"{node.name} is {node.state}: {node.detail}",
                                     node.role) from None
            raise QueryTimeout(f"{node.name}: statement took over "
                               f"{timeout or node.options.query_timeout:g}s", node.role) from None
        except pymysql.err.IntegrityError as e:
            raise IntegrityError(str(e)) from None
        except (pymysql.err.OperationalError, pymysql.err.InternalError,
                pymysql.err.InterfaceError, OSError) as e:
            code = e.args[0] if e.args and isinstance(e.args[0], int) else 0
            if code in _SCHEMA_MISSING and not isinstance(e, OSError):
                raise SchemaMissing(f"{node.name}: {e}") from None
            if code == _READ_ONLY:
                node.refused_write()
                raise ReadOnlyRefused(f"{node.name} is read-only: {e}", node.role) from None
            if isinstance(e, OSError) or code in _CONNECTION_ERRORS or code >= 2000:
                self._break()
                node.failed(str(e))
                raise ConnectionLost(f"{node.name}: {e}", node.role,
                                     sent=code not in _NOT_SENT) from None
            raise DatabaseError(f"{node.name}: {e}") from None
        except pymysql.err.MySQLError as e:
            if e.args and e.args[0] in _SCHEMA_MISSING:
                raise SchemaMissing(f"{node.name}: {e}") from None
            raise DatabaseError(f"{node.name}: {e}") from None

    def _break(self) -> None:
        self.broken = True
        self.raw.close()  # a reset (SO_LINGER 0); the pool drops it on release

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

    async def position(self) -> str | None:
        """The GTID of this connection's last write (the primary's whole position if none)."""
        rows = await self._run("SELECT @@last_gtid AS g, @@gtid_binlog_pos AS b", (), True)
        return (rows[0]["g"] or rows[0]["b"] or None) if rows else None

    async def wait_for(self, position: str, timeout: float) -> bool:
        """MASTER_GTID_WAIT on this (replica) connection: True once it applied `position`."""
        rows = await self._run("SELECT MASTER_GTID_WAIT(%s, %s) AS w", (position, timeout), True,
                               timeout=timeout + self.node.options.connect_timeout)
        return bool(rows) and rows[0]["w"] == 0


class MysqlNode:
    """One server: its pool, its monitor's findings, and whether the router may use it."""

    def __init__(self, name: str, role: str, dsn: str, options: MysqlOptions):
        self.name = name
        self.role = role  # as discovered: "primary" (writable) or "replica"
        self.dsn = dsn
        self.args = parse_mysql_dsn(dsn)
        self.options = options
        self.pool: aiomysql.Pool | None = None
        self.state = "down"  # up / down / hung; replicas also lagging / broken
        self.detail = "not checked yet"
        self.lag: float | None = None
        self.read_only: bool | None = None
        self.gtid = ""  # its position as it says: gtid_slave_pos (replica), gtid_binlog_pos
        self.position: Position | None = None
        self.semi_sync: str | None = None  # primary: "ON"/"OFF" while enabled, None if not
        self.good = 0  # good checks in a row (replicas come back after replica_rise)
        self.used = False  # the router may send reads here (replicas, with hysteresis)
        self.checked_once = False
        self.can_see_status = True  # SHOW SLAVE STATUS needs the SLAVE MONITOR privilege
        self.epoch = 0  # bumped each time the node is found hung or dead
        self.cluster_epoch = 0  # the epoch in its cluster_epoch row (0: no table)
        self.waits: set[asyncio.Timeout] = set()  # bounded waits in flight (cut short on loss)
        self.monitor: aiomysql.Connection | None = None
        self.probing: asyncio.Future | None = None  # the monitor's check in flight
        self.on_change: Any = None  # the database's re-election hook

    @property
    def usable(self) -> bool:
        if self.role == "primary":
            return self.state == "up" and self.read_only is False
        return self.used

    def status(self) -> str:
        """"up" only when the router may use it: a replica that is fine again but still on
        probation (fewer than replica_rise good checks) is "recovering"."""
        if self.role == "replica" and self.state == "up" and not self.used:
            return "recovering"
        return self.state

    def has(self, position: Position) -> bool:
        return self.state not in _DOWN and covers(self.position, position)

    def describe(self) -> dict[str, Any]:
        return {"role": self.role, "state": self.status(), "lag": self.lag,
                "gtid": self.gtid or None, "detail": self.detail, "epoch": self.cluster_epoch}

    @contextlib.asynccontextmanager
    async def guard(self, seconds: float | None):
        """A wait on this node bounded by `seconds`, and cut short when the node is lost."""
        async with asyncio.timeout(seconds or None) as cm:
            self.waits.add(cm)
            try:
                yield
            finally:
                self.waits.discard(cm)

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
        epoch = self.epoch
        try:
            async with self.guard(self.options.connect_timeout + 1.0):
                raw = await self.pool.acquire()
        except (pymysql.err.MySQLError, OSError, TimeoutError) as e:
            if self.epoch == epoch:
                self.failed(str(e) or "connect timeout")
            raise DatabaseUnavailable(f"{self.name}: cannot connect: {e or self.detail}",
                                      self.role) from None
        return _Conn(self, _reset_on_close(raw))

    def release(self, conn: _Conn, broken: bool = False) -> None:
        if broken or conn.broken:
            conn.raw.close()
        self.pool.release(conn.raw)

    def pool_use(self) -> tuple[int, int, int]:
        """(in use, idle, most) of the node's pool (connections are opened as needed)."""
        pool = self.pool
        if pool is None:
            return 0, 0, self.options.pool_size
        return pool.size - pool.freesize, pool.freesize, pool.maxsize

    def failed(self, why: str) -> None:
        """A connection to this node failed: stop using it until its next good check."""
        self.lost("down", why)

    def lost(self, state: str, why: str) -> None:
        """Down or hung: skip it, and cut short every wait in flight on it."""
        if self.state != state:
            log.warning("%s %s is %s: %s", self.role, self.name, state, why)
        self.state = state
        self.detail = why
        self.lag = None
        self.good = 0
        self.used = False
        self.epoch += 1
        now = asyncio.get_running_loop().time()
        for cm in list(self.waits):
            with contextlib.suppress(RuntimeError):  # (one already expiring)
                cm.reschedule(now)
        if self.on_change is not None:
            self.on_change()

    def refused_write(self) -> None:
        """A write met error 1290: this node is read-only now, whatever the last check said."""
        if self.read_only is not True:
            log.warning("%s %s refused a write: it is read-only now", self.role, self.name)
            self.read_only = True
            if self.on_change is not None:
                self.on_change()

    async def close_monitor(self) -> None:
        m, self.monitor = self.monitor, None
        if m is not None:
            m.close()

    async def close(self) -> None:
        if self.probing is not None:
            self.probing.cancel()
            with contextlib.suppress(BaseException):
                await self.probing
            self.probing = None
        await self.close_monitor()
        if self.pool is not None:
            self.pool.close()
            await self.pool.wait_closed()
            self.pool = None


class _NoPrimary:
    """What the router gets as the primary while there is none (or two): never usable."""

    name = "none"
    role = "primary"
    state = "none"
    lag = None

    def __init__(self, why: str):
        self.detail = why

    @property
    def usable(self) -> bool:
        return False

    def status(self) -> str:
        return self.detail

    def has(self, position: Position) -> bool:
        return False

    async def acquire(self):
        raise DatabaseUnavailable(f"no primary: {self.detail}", "primary")


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
    """The nodes of a primary/replica set and the monitors that keep their state."""

    dialect = "mysql"
    _beat_sql = (f"INSERT INTO {HEARTBEAT_TABLE} (id, ts) VALUES (1, NOW(6)) "
                 "ON DUPLICATE KEY UPDATE ts = NOW(6)")

    def __init__(self, primary: str, replicas: Sequence[str], options: MysqlOptions | None = None,
                 names: Sequence[str] | None = None):
        self.options = options or MysqlOptions()
        dsns = [primary, *replicas]
        names = list(names or ["primary", *(f"replica-{i + 1}" for i in range(len(replicas)))])
        self.nodes = [MysqlNode(name, "primary" if i == 0 else "replica", dsn, self.options)
                      for i, (name, dsn) in enumerate(zip(names, dsns, strict=True))]
        for n in self.nodes:
            n.on_change = self._elect
        self._primary: MysqlNode | None = self.nodes[0]
        self._none = _NoPrimary("no node checked yet")
        self._problem = ""  # why there is no primary (logged once per change)
        self._tasks: list[asyncio.Task] = []
        self._beating = False
        self.epoch_seen = 0  # the highest cluster epoch any node has shown

    # -- what the router sees -----------------------------------------------------------------
    @property
    def primary(self) -> MysqlNode | _NoPrimary:
        return self._primary if self._primary is not None else self._none

    @property
    def replicas(self) -> list[MysqlNode]:
        return [n for n in self.nodes if n is not self._primary]

    def describe(self) -> str:
        where = ", ".join(f"{n.name} {n.args['host']}:{n.args['port']}" for n in self.nodes)
        return f"mariadb: {len(self.nodes)} node(s) ({where}), roles from @@read_only"

    # -- life cycle ------------------------------------------------------------------------------
    async def open(self) -> None:
        for node in self.nodes:
            await node.open()  # pools connect lazily: a node that is down does not stop us
        await self.check()  # know every node's state before serving
        # a replica that replicates but has not seen a heartbeat yet (the first one was just
        # written) is not lagging: give the first beats a moment to arrive
        for _ in range(10):
            if not any(r.detail == _NO_BEAT for r in self.replicas):
                break
            await asyncio.sleep(self.options.heartbeat_interval / 2)
            await asyncio.gather(*(self._check_node(r) for r in self.replicas
                                   if r.detail == _NO_BEAT))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._watch(n)) for n in self.nodes]
        self._tasks.append(loop.create_task(self._heartbeat()))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for node in self.nodes:
            await node.close()

    async def check(self) -> None:
        """One round: every node checked (at once), then one heartbeat on the primary."""
        await asyncio.gather(*(self._check_node(n) for n in self.nodes))
        await self._beat()
        await asyncio.gather(*(self._check_node(n) for n in self.replicas))

    # -- monitors ----------------------------------------------------------------------------
    async def _watch(self, node: MysqlNode) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t0 = loop.time()
            try:
                await self._check_node(node)
            except Exception:  # a monitor that dies would freeze the node's state: log, go on
                log.exception("database monitor of %s", node.name)
            await asyncio.sleep(max(0.0, self.options.heartbeat_interval - (loop.time() - t0)))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.options.heartbeat_interval)
            try:
                await self._beat()
            except Exception:
                log.exception("database heartbeat")

    async def _check_node(self, node: MysqlNode) -> None:
        """Wait for the node's answer at most twice the heartbeat interval: past that it is hung.
        The probe itself goes on (bounded by connect + query timeout), so a hung node is not
        flooded with new connections, and its answer, once it comes, counts at once."""
        limit = 2 * self.options.heartbeat_interval
        if node.probing is None:
            node.probing = asyncio.ensure_future(self._bounded_probe(node))
        done, _ = await asyncio.wait({node.probing}, timeout=limit)
        for _ in range(3):  # an answer already read but not yet handed over (a busy loop)
            if done or node.probing.done():
                break
            await asyncio.sleep(0)
        else:
            node.lost("hung", f"no answer within {limit:g}s (twice the heartbeat interval)")
            return
        task, node.probing = node.probing, None
        try:
            info = task.result()
        except TimeoutError:
            await node.close_monitor()
            node.lost("hung", "no answer within the connect and query timeouts")
            return
        except (pymysql.err.MySQLError, OSError) as e:
            await node.close_monitor()
            node.failed(str(e) or type(e).__name__)
            return
        self._apply(node, info)

    async def _bounded_probe(self, node: MysqlNode) -> dict[str, Any]:
        async with asyncio.timeout(self.options.connect_timeout + self.options.query_timeout):
            return await self._probe(node)

    async def _probe(self, node: MysqlNode) -> dict[str, Any]:
        if node.monitor is None or node.monitor.closed:
            node.monitor = await aiomysql.connect(
                autocommit=True, charset="utf8mb4",
                connect_timeout=min(self.options.connect_timeout,
                                    2 * self.options.heartbeat_interval), **node.args)
            _reset_on_close(node.monitor)
        async with node.monitor.cursor(aiomysql.DictCursor) as c:
            await c.execute(_PROBE)
            info: dict[str, Any] = dict(await c.fetchone())
            info["status"] = None
            if node.can_see_status:
                try:
                    await c.execute("SHOW SLAVE STATUS")
                    info["status"] = list(await c.fetchall())
                except pymysql.err.OperationalError as e:
                    if e.args[0] != 1227:  # access denied: lag from the heartbeat alone
                        raise
                    node.can_see_status = False
                    log.warning("%s: cannot read replica status (grant SLAVE MONITOR); "
                                "lag from the heartbeat only", node.name)
            info["epoch"] = 0
            try:
                await c.execute(f"SELECT epoch FROM {EPOCH_TABLE} WHERE id = 1")
                row = await c.fetchone()
                if row:
                    info["epoch"] = int(row["epoch"])
            except pymysql.err.ProgrammingError:
                pass  # no epoch table: a cluster made before it, or not by `cluster up`
            info["lag"] = None
            if info["ro"]:
                try:
                    await c.execute(f"SELECT TIMESTAMPDIFF(MICROSECOND, ts, NOW(6)) / 1000000 "
                                    f"AS lag FROM {HEARTBEAT_TABLE} WHERE id = 1")
                    row = await c.fetchone()
                    info["lag"] = float(row["lag"]) if row and row["lag"] is not None else None
                except pymysql.err.ProgrammingError:
                    pass  # no heartbeat table yet
        return info

    def _apply(self, node: MysqlNode, info: dict[str, Any]) -> None:
        read_only = bool(info["ro"])
        was_writable = node.read_only is False
        node.read_only = read_only
        node.checked_once = node.checked_once or not read_only
        node.cluster_epoch = info.get("epoch", 0)
        if node.cluster_epoch > self.epoch_seen:
            self.epoch_seen = node.cluster_epoch
        if not read_only and node.cluster_epoch < self.epoch_seen:
            node.gtid = info["binlog_pos"] or ""
            node.position = parse_position(node.gtid) or {}
            node.semi_sync = None
            self._fence_stale(node)
            self._elect()
            return
        if not read_only:
            node.gtid = info["binlog_pos"] or ""
            node.position = parse_position(node.gtid) or {}
            node.lag = 0.0
            semi = (info["ss_status"] or "OFF").upper() if info["ss_enabled"] else None
            if node.semi_sync not in (None, semi) and node is self._primary:
                if semi == "OFF":
                    log.warning("primary %s: semi-synchronous replication fell back to "
                                "asynchronous (no replica acknowledged in time)", node.name)
                elif semi == "ON" and node.semi_sync is not None:
                    log.info("primary %s: semi-synchronous replication is on again", node.name)
            node.semi_sync = semi
            if node.state != "up":
                log.info("%s is up (writable)", node.name)
            node.state, node.detail, node.used, node.good = "up", "writable (read_only=0)", False, 0
            self._elect()
            return
        node.gtid = info["slave_pos"] or ""
        node.position = parse_position(node.gtid) or {}
        node.semi_sync = None
        if was_writable or node is self._primary or node.role == "primary":
            self._elect()
        lag = info["lag"]
        node.lag = lag
        status = info["status"]
        problem = _replication_problem(status)
        primary = self.primary
        primary_down = not primary.usable and (primary.state in _DOWN)
        if primary_down and (problem is None or not problem.startswith("SQL")) and status != []:
            # with the primary gone no replica can be fresher than it is, and none gets a
            # heartbeat: a replica that applied everything it received serves reads as it is
            self._set(node, "up", f"primary {primary.state}; serving what it has "
                                  f"({problem or 'replicating'})")
        elif problem is not None:
            self._set(node, "broken", problem)
        elif lag is None:
            self._set(node, "lagging", _NO_BEAT)
        elif lag > self.options.max_replication_lag:
            sbm = status[0].get("Seconds_Behind_Master") if status else "unknown"
            self._set(node, "lagging", f"heartbeat {lag:.1f}s behind (Seconds_Behind_Master {sbm})")
        else:
            self._set(node, "up", f"heartbeat {lag:.2f}s behind")

    def _set(self, r: MysqlNode, state: str, detail: str) -> None:
        old_used, old_state = r.used, r.state
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
        elif state != old_state and state in ("broken", "lagging") and detail != _NO_BEAT:
            log.warning("replica %s is %s: %s", r.name, state, detail)

    def _fence_stale(self, node: MysqlNode) -> None:
        """A writable node behind the newest epoch: used for nothing (logged once)."""
        if node.state != "stale":
            log.warning("%s is stale: writable at epoch %d but epoch %d exists (an old primary "
                        "never fenced): no writes or reads go there until `cluster rejoin %s`",
                        node.name, node.cluster_epoch, self.epoch_seen, node.name)
        node.state, node.used, node.good, node.lag = "stale", False, 0, None
        node.detail = (f"stale: writable at epoch {node.cluster_epoch} < {self.epoch_seen}; "
                       f"takes nothing until `cluster rejoin {node.name}`")

    def _elect(self) -> None:
        """The one writable node that answers, at the newest epoch, is the primary; none or
        two: no primary. A writable node at an older epoch is stale."""
        for n in self.nodes:
            if (n.read_only is False and n.state not in _DOWN and n.state != "stale"
                    and n.cluster_epoch < self.epoch_seen):
                self._fence_stale(n)
        writable = [n for n in self.nodes if n.read_only is False and n.state not in _DOWN
                    and n.state != "stale"]
        old = self._primary
        if len(writable) == 1:
            new, problem = writable[0], ""
        elif len(writable) > 1:
            new = None
            problem = (f"two writable nodes ({', '.join(n.name for n in writable)}): writes "
                       "refused until one is fenced (read_only=1)")
        elif old is not None and old.read_only is not True and old.state in _DOWN:
            new, problem = old, ""  # the primary is down or hung: still the one, unusable
        else:
            new, problem = None, "no writable node (every node is read-only or unreachable)"
        for n in self.nodes:
            n.role = ("primary" if (n is new or n in writable) else
                      "stale" if n.state == "stale" and n.read_only is False else "replica")
        self._primary = new
        if problem:
            self._none = _NoPrimary(problem)
        if problem != self._problem:
            if problem:
                log.warning("no primary: %s", problem)
            self._problem = problem
        if new is not old and new is not None:
            log.warning("primary is now %s (%s:%s)", new.name, new.args["host"], new.args["port"])

    async def _beat(self) -> None:
        """Write the heartbeat row on the primary (one write in flight at most)."""
        p = self._primary
        if self._beating or p is None or not p.usable:
            return
        self._beating = True
        try:
            conn = await p.acquire()
        except DatabaseUnavailable:
            self._beating = False
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
            log.debug("heartbeat on %s: %s", p.name, e)
        finally:
            p.release(conn)
            self._beating = False

    def health(self) -> dict[str, Any]:
        return {n.name: n.describe() for n in self.nodes}
