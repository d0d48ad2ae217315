"""A local MariaDB primary and replicas with real GTID replication, from the machine's binaries.

    python -m foobar_app cluster up --dir DIR [--replicas N] [--semisync]
    python -m foobar_app cluster up --dir DIR --host NAME=ADDR[:PORT][@NETNS] ... \
                                   [--control-netns NAME]
    python -m foobar_app cluster status --dir DIR
    python -m foobar_app cluster down --dir DIR
    python -m foobar_app cluster start --dir DIR
    python -m foobar_app cluster switchover --dir DIR [--to NAME]
    python -m foobar_app cluster failover --dir DIR
    python -m foobar_app cluster rejoin --dir DIR NAME

Rules of this module:
- everything lives under DIR: one data directory, socket, pid file and logs per node; nodes
  listen on 127.0.0.1 only, on free ports (kept for good: a node comes back on its port);
  nothing reads the machine's option files (`--no-defaults`) and no other MariaDB instance is
  touched;
- across hosts (`hosts=[{"name", "address", "netns"}]`, the first the primary) each node is
  started in its host's network namespace (`ip netns exec NETNS mariadbd ...`) and listens on
  ADDRESS:3306; every command reaches it over TCP at that address with an admin account
  (created at '%' by the node's first start, never written to a binary log; its password in
  cluster.json, mode 0600), never through the unix socket that the shared filesystem would
  still reach across a cut link; a node's liveness is still its recorded pid;
- with `control_netns` every command runs its connections from that namespace (the calling
  thread enters it with setns(2) for the command and leaves it after; the CLI re-executes
  itself there), so the commands work from the root namespace too; `down` needs no network
  (it stops nodes by pid) and runs anywhere, even once the namespaces are gone;
- every node writes a binary log (`log_slave_updates`), so any replica can be promoted; each
  replica replicates with `MASTER_USE_GTID=slave_pos` and runs `read_only=1`, and is verified
  replicating before a command returns; `--semisync` turns on semi-synchronous replication on
  every node (`AFTER_SYNC`): a commit is acknowledged once a replica has it;
- the application user has privileges on its database (and SLAVE MONITOR, to read replica
  status) but neither SUPER nor READ_ONLY ADMIN, so `read_only` binds it on every non-primary;
- DIR/cluster.json is the one record of the topology: {"primary": DSN, "replicas": [DSN, ...],
  "nodes": {name: {"role": "primary" | "replica" | "fenced", "port", "pid", "address",
  "netns", ...}}, "epoch": N, and across hosts "admin_user", "admin_password",
  "control_netns"}; every command that changes roles rewrites it (atomically, mode 0600) after
  the change is made;
- no split brain: `switchover` fences the old primary (read_only=1, application sessions
  killed) before it promotes anyone; `failover` (the primary unreachable) marks the old one
  `fenced`, and `start` keeps a fenced node read-only, not replicating, until `rejoin` checks
  it has no transaction the new primary lacks;
- the epoch fence, for an old primary that could not be told (its host cut off, still
  read_only=0 when it comes back): `up` writes epoch 1 into the replicated one-row table
  `foobar.cluster_epoch` (epoch, server_id, name), and `switchover` and `failover` write the
  next epoch on the new primary before it turns writable. The app servers read it with every
  check (mysql.py): a writable node whose epoch is lower than one seen is stale and used for
  nothing; `cluster status` shows it; `rejoin` makes it a replica;
- `down` stops every node by the pid it recorded (SIGTERM, then SIGKILL) and leaves nothing
  running or listening; `start` (or `up` on a stopped cluster) brings the same nodes back on
  their data.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pymysql

from .gtid import Position, covers, parse_position

__all__ = ["ClusterError", "MariaDBMissing", "cluster_down", "cluster_failover", "cluster_rejoin",
           "cluster_start", "cluster_status", "cluster_switchover", "cluster_up",
           "find_binaries"]

PACKAGE = "mariadb-server"
SEARCH_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")
DATABASE = "foobar"
APP_USER = "foobar"
REPL_USER = "repl"
ADMIN_USER = "foobar_admin"  # across hosts: the commands' account (root stays socket-only)
LOOPBACK = "127.0.0.1"
MYSQL_PORT = 3306
EPOCH_TABLE = "cluster_epoch"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
CLONE_NEWNET = 0x40000000

# small and quick to start: a development and test cluster, not a tuned production one
SERVER_OPTIONS = (
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=16M",
    "--innodb-flush-log-at-trx-commit=2",
    "--skip-name-resolve",
    "--loose-performance-schema=OFF",
    "--loose-skip-feedback",
    "--binlog-format=ROW",
    "--gtid-strict-mode=1",
    "--log-slave-updates=1",
    "--slave-net-timeout=10",
)
# semi-synchronous replication (`up --semisync`), on every node so that any can be promoted: the
# primary acknowledges a commit once a replica has it in its relay log (AFTER_SYNC: not visible
# to others before either); with no replica answering for SEMISYNC_TIMEOUT_MS it falls back to
# asynchronous replication (logged by the app servers, shown by `cluster status`)
SEMISYNC_TIMEOUT_MS = 2000
SEMISYNC_OPTIONS = (
    "--rpl-semi-sync-slave-enabled=ON",
    "--rpl-semi-sync-master-wait-point=AFTER_SYNC",
    f"--rpl-semi-sync-master-timeout={SEMISYNC_TIMEOUT_MS}",
)


class ClusterError(RuntimeError):
    """The cluster could not be created, started, inspected or stopped (the message says why)."""


class MariaDBMissing(ClusterError):
    """The MariaDB server binaries are not installed."""


def _which(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        for d in SEARCH_DIRS:
            p = Path(d, name)
            if p.is_file() and os.access(p, os.X_OK):
                return str(p)
    return None


def find_binaries() -> tuple[str, str]:
    """(mariadbd, mariadb-install-db), or MariaDBMissing naming the package to install."""
    server = _which("mariadbd", "mysqld")
    install = _which("mariadb-install-db", "mysql_install_db")
    if server is None or install is None:
        missing = " and ".join(n for n, p in (("mariadbd", server), ("mariadb-install-db", install))
                               if p is None)
        raise MariaDBMissing(f"{missing} not found: install the {PACKAGE} package "
                             f"(apt-get install -y {PACKAGE})")
    return server, install


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class Node:
    name: str
    role: str  # "primary" or "replica"
    server_id: int
    port: int
    dir: str
    pid: int = 0
    address: str = ""  # across hosts: where it listens (and is reached); "" = loopback, socket
    netns: str = ""  # across hosts: the network namespace it runs in ("" = this one)
    secret: str = field(default="", repr=False)  # the admin password (not in its record)

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def host(self) -> str:
        return self.address or LOOPBACK

    @property
    def socket(self) -> str:
        return str(self.path / "mysql.sock")

    @property
    def error_log(self) -> Path:
        return self.path / "error.log"

    @property
    def general_log(self) -> Path:
        return self.path / "general.log"

    def admin(self, timeout: float = 5.0, read_timeout: float | None = None
              ) -> pymysql.connections.Connection:
        """root over the node's own socket (root has no password and no TCP access); across
        hosts the admin account over TCP at the node's address (a cut link cuts it off)."""
        rt = timeout + 25 if read_timeout is None else read_timeout
        where: dict[str, Any] = {"unix_socket": self.socket, "user": "root"}
        if self.address:
            where = {"host": self.address, "port": self.port, "user": ADMIN_USER,
                     "password": self.secret}
        return pymysql.connect(**where, connect_timeout=timeout, read_timeout=rt,
                               write_timeout=rt, autocommit=True,
                               cursorclass=pymysql.cursors.DictCursor)

    def sql(self, *statements: str, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Run statements as root; the rows of the last one."""
        with contextlib.closing(self.admin(timeout)) as db, db.cursor() as c:
            rows: list[dict[str, Any]] = []
            for st in statements:
                c.execute(st)
                rows = list(c.fetchall())
            return rows

    def reachable(self, timeout: float = 2.0) -> bool:
        """Running and answering within `timeout` (a hung server counts as unreachable)."""
        if not self.alive():
            return False
        try:
            with contextlib.closing(self.admin(timeout, read_timeout=timeout)) as db, \
                    db.cursor() as c:
                c.execute("SELECT 1")
            return True
        except (pymysql.err.MySQLError, OSError):
            return False

    def alive(self) -> bool:
        if not self.pid:
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a zombie or another program reusing the pid is not our server
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return True
        return self.dir.encode() in cmdline


def _load(dir: Path) -> dict[str, Any]:
    path = dir / "cluster.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ClusterError(f"{path}: no cluster here (run `cluster up --dir {dir}` first)") from None
    except (OSError, ValueError) as e:
        raise ClusterError(f"{path}: unreadable: {e}") from None


def _nodes(data: dict[str, Any]) -> list[Node]:
    secret = data.get("admin_password") or ""
    return [Node(**{k: v for k, v in n.items() if k in Node.__dataclass_fields__ and k != "secret"},
                 secret=secret)
            for n in data["nodes"].values()]


# -- the control namespace -------------------------------------------------------------------


def netns_inode(name: str) -> int:
    """The inode of a named network namespace (/run/netns/NAME), ClusterError if none."""
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        raise ClusterError(f"network namespace {name!r} not found (no /run/netns/{name}); "
                           "create it first (ip netns add)") from None


def in_netns(name: str) -> bool:
    """Does this thread run in the network namespace `name`?"""
    return os.stat("/proc/thread-self/ns/net").st_ino == netns_inode(name)


@contextlib.contextmanager
def entered(netns: str | None):
    """Run the block's connections from `netns` (this thread only, setns(2)); a no-op without
    one or when already there."""
    if not netns or in_netns(netns):
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise ClusterError(f"cannot enter network namespace {netns!r}: "
                                   f"{os.strerror(err)} (needs root)")
        finally:
            os.close(target)
        try:
            yield
        finally:
            if libc.setns(back, CLONE_NEWNET) != 0:  # never leave a thread in the wrong place
                raise OSError(ctypes.get_errno(), "cannot return to the caller's namespace")
    finally:
        os.close(back)


def control_netns_of(dir: str | Path) -> str | None:
    """The namespace the commands of the cluster under `dir` run from (None: anywhere)."""
    path = Path(dir).resolve() / "cluster.json"
    try:
        return json.loads(path.read_text()).get("control_netns") or None
    except (OSError, ValueError, AttributeError):
        return None


def _controlled(fn):
    """Run a command from the cluster's control namespace (when it has one)."""
    @functools.wraps(fn)
    def run(dir: str | Path, *args: Any, **kw: Any) -> Any:
        with entered(control_netns_of(dir)):
            return fn(dir, *args, **kw)
    return run


# -- up ---------------------------------------------------------------------------------------


def check_hosts(hosts: list[dict[str, Any]], control: str | None = None) -> list[dict[str, Any]]:
    """Validated copies of `hosts` ({"name", "address", "netns"?, "port"?}); ClusterError
    naming the bad entry and value."""
    out: list[dict[str, Any]] = []
    for i, h in enumerate(hosts):
        if not isinstance(h, dict):
            raise ClusterError(f"hosts[{i}]: {h!r}: expected {{'name', 'address', 'netns'}}")
        name, address = h.get("name"), h.get("address")
        netns, port = h.get("netns") or "", h.get("port", MYSQL_PORT)
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ClusterError(f"hosts[{i}].name {name!r}: expected letters, digits, '_.-'")
        if name in {o["name"] for o in out}:
            raise ClusterError(f"hosts[{i}].name {name!r}: named twice")
        try:
            address = str(ipaddress.ip_address(str(address)))
        except ValueError:
            raise ClusterError(f"hosts[{i}].address {address!r} ({name}): expected an IP "
                               "address") from None
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ClusterError(f"hosts[{i}].port {port!r} ({name}): expected 1-65535")
        if (address, port) in {(o["address"], o["port"]) for o in out}:
            raise ClusterError(f"hosts[{i}].address {address}:{port} ({name}): used twice")
        if netns:
            netns_inode(str(netns))
        out.append({"name": name, "address": address, "netns": str(netns), "port": port})
    if not out:
        raise ClusterError("hosts: expected at least one host (the primary)")
    if control:
        netns_inode(control)
    return out


def cluster_up(dir: str | Path, replicas: int = 1, general_log: bool = False,
               semisync: bool = False, timeout: float = 60.0,
               hosts: list[dict[str, Any]] | None = None,
               control_netns: str | None = None) -> dict[str, Any]:
    """Create and start a primary and `replicas` replicas under `dir`; return cluster.json.
    On a directory that holds a stopped cluster, start it again with its data instead.

    With `hosts` (the first the primary, the others its replicas; `replicas` is ignored) each
    node runs in its host's namespace on ADDRESS:3306 (or the host's "port"), and with
    `control_netns` every command, this one included, reaches them from that namespace."""
    dir = Path(dir).resolve()
    if hosts is not None:
        hosts = check_hosts(hosts, control_netns)
    elif control_netns and not (dir / "cluster.json").exists():
        raise ClusterError(f"control_netns {control_netns!r}: only with hosts (nodes on "
                           "127.0.0.1 are reached from where the command runs)")
    with entered(control_netns or control_netns_of(dir)):
        return _up(dir, replicas, general_log, semisync, timeout, hosts, control_netns)


def _up(dir: Path, replicas: int, general_log: bool, semisync: bool, timeout: float,
        hosts: list[dict[str, Any]] | None, control: str | None) -> dict[str, Any]:
    server_bin, install_bin = find_binaries()
    if (dir / "cluster.json").exists():
        data = _load(dir)
        nodes = _nodes(data)
        if all(n.alive() for n in nodes):
            raise ClusterError(f"{dir}: a cluster is already up here "
                               f"({', '.join(n.name for n in nodes)}); "
                               f"run `cluster down --dir {dir}` first")
        cluster_start(dir, timeout=timeout)
        return _load(dir)
    dir.mkdir(parents=True, exist_ok=True)
    names = [h["name"] for h in hosts] if hosts else ["primary", *(f"replica-{i}" for i in
                                                                   range(1, replicas + 1))]
    for name in names:  # what a failed `up` left (its logs)
        if (dir / name).is_dir():
            shutil.rmtree(dir / name)
    password = secrets.token_urlsafe(18)
    repl_password = secrets.token_urlsafe(18)
    admin_password = secrets.token_urlsafe(18) if hosts else ""
    if hosts:
        nodes = [Node(h["name"], "primary" if i == 0 else "replica", i + 1, h["port"],
                      str(dir / h["name"]), address=h["address"], netns=h["netns"],
                      secret=admin_password) for i, h in enumerate(hosts)]
    else:
        nodes = [Node(name, "primary" if i == 0 else "replica", i + 1, _free_port(),
                      str(dir / name)) for i, name in enumerate(names)]
    data: dict[str, Any] = {
        "primary": _dsn(password, nodes[0]),
        "replicas": [_dsn(password, n) for n in nodes[1:]],
        "nodes": {},
        "database": DATABASE,
        "user": APP_USER,
        "general_log": general_log,
        "semisync": semisync,
        "repl_user": REPL_USER,
        "repl_password": repl_password,
        "epoch": 1,
    }
    if hosts:
        data.update(admin_user=ADMIN_USER, admin_password=admin_password,
                    control_netns=control or None)
    try:
        for node in nodes:
            _install(install_bin, node, timeout)
            _start(server_bin, node, general_log, timeout, semisync, semisync_master=False,
                   first=True)
            data["nodes"][node.name] = _describe(node, password)
            _save(dir, data)  # so that `down` can stop what already runs, whatever happens next
        _setup_primary(nodes[0], password, repl_password, "%" if hosts else LOOPBACK)
        for node in nodes[1:]:
            _setup_replica(node, nodes[0], repl_password, timeout)
        if semisync:
            for node in nodes:
                node.sql("SET GLOBAL rpl_semi_sync_master_enabled = ON")
    except BaseException:
        with contextlib.suppress(Exception):
            cluster_down(dir)
        # no cluster.json: the next `up` starts afresh; the nodes' logs stay for a look
        (dir / "cluster.json").unlink(missing_ok=True)
        raise
    _save(dir, data)
    return data


def _dsn(password: str, node: Node) -> str:
    return f"mysql://{APP_USER}:{password}@{node.host}:{node.port}/{DATABASE}"


def _describe(node: Node, password: str) -> dict[str, Any]:
    record = asdict(node)
    del record["secret"]
    return {**record, "dsn": _dsn(password, node), "socket": node.socket,
            "error_log": str(node.error_log), "general_log": str(node.general_log)}


def _save(dir: Path, data: dict[str, Any]) -> None:
    path = dir / "cluster.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.chmod(tmp, 0o600)  # it holds passwords
    tmp.replace(path)


def _run_as_root_args() -> list[str]:
    return ["--user=root"] if os.geteuid() == 0 else []


def _install(install_bin: str, node: Node, timeout: float) -> None:
    node.path.mkdir(parents=True, exist_ok=True)
    cmd = [install_bin, "--no-defaults", f"--datadir={node.path / 'data'}",
           *_run_as_root_args(), "--auth-root-authentication-method=normal", "--skip-test-db",
           "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=16M",
           f"--tmpdir={node.path}"]  # its own: installs running side by side never collide
    log = node.path / "install.log"
    with log.open("wb") as out:
        try:
            rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                timeout=timeout, cwd=node.path).returncode
        except subprocess.TimeoutExpired:
            raise ClusterError(f"{node.name}: mariadb-install-db took over {timeout:.0f}s "
                               f"(see {log})\n{_tail(log)}") from None
    if rc != 0:
        raise ClusterError(f"{node.name}: mariadb-install-db failed with exit status {rc} "
                           f"(see {log})\n{_tail(log)}")


def _start(server_bin: str, node: Node, general_log: bool, timeout: float,
           semisync: bool = False, semisync_master: bool = True, first: bool = False) -> None:
    p = node.path
    cmd = [server_bin, "--no-defaults", *_run_as_root_args(), f"--datadir={p / 'data'}",
           f"--socket={node.socket}", f"--port={node.port}", f"--bind-address={node.host}",
           f"--pid-file={p / 'mariadbd.pid'}", f"--log-error={node.error_log}", f"--tmpdir={p}",
           f"--server-id={node.server_id}", f"--log-bin={p / 'binlog'}", *SERVER_OPTIONS]
    if node.role != "primary":  # replicas, and fenced nodes until they rejoin
        cmd += ["--read-only=1", "--skip-slave-start"]
    if semisync:
        cmd += SEMISYNC_OPTIONS
        # (`up` turns the primary's side on once the replicas run: its own setup statements
        # would otherwise each wait for an acknowledgement no replica can give yet)
        cmd.append(f"--rpl-semi-sync-master-enabled={'ON' if semisync_master else 'OFF'}")
    if general_log:
        cmd += ["--general-log=1", f"--general-log-file={node.general_log}"]
    init = p / "init.sql"
    if first and node.address:
        # the admin account the commands use over TCP, made by the node itself at its first
        # start and kept out of its binary log (each node has its own; none replicates)
        fd = os.open(init, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"SET SQL_LOG_BIN = 0;\n"
                    f"CREATE USER IF NOT EXISTS '{ADMIN_USER}'@'%' IDENTIFIED BY '{node.secret}';\n"
                    f"GRANT ALL PRIVILEGES ON *.* TO '{ADMIN_USER}'@'%' WITH GRANT OPTION;\n")
        cmd.append(f"--init-file={init}")
    if node.netns:  # `ip netns exec` execs the server: the pid is mariadbd's own
        cmd = ["ip", "netns", "exec", node.netns, *cmd]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=p, start_new_session=True)
    node.pid = proc.pid
    deadline = time.monotonic() + timeout
    try:
        while True:
            rc = proc.poll()
            if rc is not None:
                raise ClusterError(f"{node.name}: mariadbd exited with status {rc} while "
                                   f"starting (see {node.error_log})\n{_tail(node.error_log)}")
            try:
                with contextlib.closing(node.admin(timeout=1.0)):
                    return
            except pymysql.err.MySQLError:
                pass
            if time.monotonic() > deadline:
                raise ClusterError(f"{node.name}: mariadbd not ready after {timeout:.0f}s at "
                                   f"{node.host}:{node.port} (see {node.error_log})\n"
                                   f"{_tail(node.error_log)}")
            time.sleep(0.05)
    finally:
        init.unlink(missing_ok=True)


def _setup_primary(node: Node, password: str, repl_password: str, at: str = LOOPBACK) -> None:
    """The database, the application and replication users (from `at`: 127.0.0.1, or '%'
    across hosts), and epoch 1 (replicated to every replica from here)."""
    with contextlib.closing(node.admin()) as db, db.cursor() as c:
        for sql in (
            f"CREATE DATABASE `{DATABASE}` CHARACTER SET utf8mb4",
            f"CREATE USER '{APP_USER}'@'{at}' IDENTIFIED BY '{password}'",
            f"GRANT ALL PRIVILEGES ON `{DATABASE}`.* TO '{APP_USER}'@'{at}'",
            f"GRANT SLAVE MONITOR ON *.* TO '{APP_USER}'@'{at}'",
            f"CREATE USER '{REPL_USER}'@'{at}' IDENTIFIED BY '{repl_password}'",
            f"GRANT REPLICATION SLAVE ON *.* TO '{REPL_USER}'@'{at}'",
        ):
            c.execute(sql)
    _write_epoch(node, 1)


def _write_epoch(node: Node, epoch: int) -> None:
    """Record on `node` (the primary, or the replica about to become it: an admin writes
    through read_only) that it holds the primary role since `epoch`."""
    node.sql(f"CREATE TABLE IF NOT EXISTS `{DATABASE}`.{EPOCH_TABLE} (id TINYINT PRIMARY KEY, "
             "epoch BIGINT UNSIGNED NOT NULL, server_id INT UNSIGNED NOT NULL, "
             "name VARCHAR(64) NOT NULL, since DATETIME(6) NOT NULL) ENGINE=InnoDB",
             f"REPLACE INTO `{DATABASE}`.{EPOCH_TABLE} (id, epoch, server_id, name, since) "
             f"VALUES (1, {int(epoch)}, @@server_id, {pymysql.converters.escape_string(node.name)!r}, "
             "NOW(6))")


def _read_epoch(node: Node) -> tuple[int, int | None]:
    """(epoch, server_id named) on a node: (0, None) without the table (an older cluster)."""
    with contextlib.closing(node.admin(2.0, read_timeout=2.0)) as db, db.cursor() as c:
        return _epoch_of(c)


def _epoch_of(c) -> tuple[int, int | None]:
    try:
        c.execute(f"SELECT epoch, server_id FROM `{DATABASE}`.{EPOCH_TABLE} WHERE id = 1")
    except pymysql.err.ProgrammingError:
        return 0, None
    row = c.fetchone()
    return (int(row["epoch"]), int(row["server_id"])) if row else (0, None)


def _next_epoch(data: dict[str, Any], nodes: list[Node]) -> int:
    """One more than any epoch recorded or found on a reachable node."""
    seen = [int(data.get("epoch") or 0)]
    for n in nodes:
        if n.alive():
            with contextlib.suppress(pymysql.err.MySQLError, OSError):
                seen.append(_read_epoch(n)[0])
    return max(seen) + 1


def _setup_replica(node: Node, primary: Node, repl_password: str, timeout: float) -> None:
    with contextlib.closing(node.admin()) as db, db.cursor() as c:
        c.execute(_change_master(primary, repl_password))
        c.execute("START SLAVE")
        deadline = time.monotonic() + timeout
        while True:
            c.execute("SHOW SLAVE STATUS")
            st = c.fetchone() or {}
            running = st.get("Slave_IO_Running") == "Yes" and st.get("Slave_SQL_Running") == "Yes"
            if running:
                c.execute("SELECT COUNT(*) AS n FROM mysql.user WHERE user = %s", (APP_USER,))
                if c.fetchone()["n"]:
                    return  # replicating, and caught up with the primary's setup
            if time.monotonic() > deadline:
                raise _not_replicating(node, st, timeout, "not caught up")
            time.sleep(0.05)


def _not_replicating(node: Node, st: dict, timeout: float, default: str) -> ClusterError:
    """The one-line error for a replica whose replication did not run in time."""
    why = st.get("Last_IO_Error") or st.get("Last_SQL_Error") or default
    return ClusterError(f"{node.name}: replication not running after {timeout:.0f}s "
                        f"(IO {st.get('Slave_IO_Running')}, SQL "
                        f"{st.get('Slave_SQL_Running')}): {why}")


def _change_master(primary: Node, repl_password: str) -> str:
    return (f"CHANGE MASTER TO MASTER_HOST='{primary.host}', MASTER_PORT={primary.port}, "
            f"MASTER_USER='{REPL_USER}', MASTER_PASSWORD='{repl_password}', "
            "MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1")


# -- status -------------------------------------------------------------------------------------


@_controlled
def cluster_status(dir: str | Path) -> list[dict[str, Any]]:
    """Each node: its role in cluster.json and as it behaves (read_only, replication), state,
    GTID position, lag (heartbeat and Seconds_Behind_Master), semi-sync on the primary."""
    dir = Path(dir).resolve()
    data = _load(dir)
    out = []
    for node in _nodes(data):
        row: dict[str, Any] = {"node": node.name, "role": node.role, "port": node.port,
                               "pid": node.pid, "running": node.alive()}
        if node.address:
            row.update(address=node.address, netns=node.netns)
        if row["running"]:
            try:
                row.update(_inspect(node, data))
            except (pymysql.err.MySQLError, OSError) as e:
                row["error"] = str(e) or type(e).__name__
        out.append(row)
    # the epoch fence: a writable node behind the newest epoch is an old primary nobody could
    # fence; the app servers use it for nothing
    newest = max([int(data.get("epoch") or 0), *(r.get("epoch", 0) for r in out)])
    for r in out:
        if r.get("read_only") is False and r["epoch"] < newest:
            r["state"] = (f"stale (writable at epoch {r['epoch']} < {newest}: takes no writes; "
                          f"run `cluster rejoin {r['node']}`)")
            r["stale"] = True
    return out


def _inspect(node: Node, data: dict[str, Any] | None = None) -> dict[str, Any]:
    with contextlib.closing(node.admin(2.0, read_timeout=2.0)) as db, db.cursor() as c:
        c.execute("SELECT @@read_only AS ro, @@gtid_current_pos AS gtid, "
                  "@@gtid_binlog_pos AS binlog, @@gtid_slave_pos AS slave, "
                  "@@rpl_semi_sync_master_enabled AS ss")
        row = c.fetchone()
        info: dict[str, Any] = {"read_only": bool(row["ro"]), "gtid": row["gtid"],
                                "binlog_pos": row["binlog"], "slave_pos": row["slave"]}
        info["epoch"] = _epoch_of(c)[0]
        c.execute("SHOW SLAVE STATUS")
        st = c.fetchone()
        if not row["ro"]:
            info["state"] = "writable"
            if row["ss"]:
                c.execute("SHOW GLOBAL STATUS LIKE 'Rpl_semi_sync_master_status'")
                ss = c.fetchone()
                info["semisync"] = ss["Value"] if ss else "OFF"
        elif st is None:
            info["state"] = "fenced" if node.role == "fenced" else "read-only, not replicating"
        if st is None:
            return info
        info.update(io_thread=st.get("Slave_IO_Running"), sql_thread=st.get("Slave_SQL_Running"),
                    master_port=st.get("Master_Port"), master_host=st.get("Master_Host"),
                    seconds_behind_master=st.get("Seconds_Behind_Master"),
                    last_error=st.get("Last_IO_Error") or st.get("Last_SQL_Error") or "")
        running = info["io_thread"] == "Yes" and info["sql_thread"] == "Yes"
        info.setdefault("state", "replicating" if running else "replication broken")
        try:
            c.execute(f"SELECT TIMESTAMPDIFF(MICROSECOND, ts, NOW(6)) / 1000000 AS lag "
                      f"FROM `{DATABASE}`.foobar_heartbeat WHERE id = 1")
            hb = c.fetchone()
            info["heartbeat_lag"] = float(hb["lag"]) if hb else None
        except pymysql.err.MySQLError:
            info["heartbeat_lag"] = None  # no app has written a heartbeat yet
        return info


# -- start ----------------------------------------------------------------------------------------


@_controlled
def cluster_start(dir: str | Path, timeout: float = 60.0) -> list[str]:
    """Start the stopped nodes of the cluster under `dir` on their data and ports: the primary
    writable, replicas read-only and replicating again, fenced nodes read-only and idle."""
    dir = Path(dir).resolve()
    data = _load(dir)
    server_bin, _ = find_binaries()
    nodes = sorted(_nodes(data), key=lambda n: n.role != "primary")
    started = []
    for node in nodes:
        if node.alive():
            continue
        if not (node.path / "data").is_dir():
            raise ClusterError(f"{node.name}: no data directory at {node.path / 'data'}; "
                               "remove the directory and run `cluster up` to start afresh")
        with socket.socket() as probe:
            if not node.address and probe.connect_ex((LOOPBACK, node.port)) == 0:
                raise ClusterError(f"{node.name}: port {node.port} is taken by another program; "
                                   "free it and run `cluster start` again")
        _start(server_bin, node, bool(data.get("general_log")), timeout,
               bool(data.get("semisync")))
        data["nodes"][node.name]["pid"] = node.pid
        _save(dir, data)
        started.append(node)
    for node in started:
        if node.role == "replica":
            node.sql("START SLAVE")
    for node in started:
        if node.role == "replica":
            _wait_replicating(node, timeout)
    return [n.name for n in started]


def _wait_replicating(node: Node, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        st = (node.sql("SHOW SLAVE STATUS") or [{}])[0]
        if st.get("Slave_IO_Running") == "Yes" and st.get("Slave_SQL_Running") == "Yes":
            return
        if time.monotonic() > deadline:
            raise _not_replicating(node, st, timeout, "not connected")
        time.sleep(0.05)


# -- switchover, failover, rejoin -------------------------------------------------------------------


def _primary_of(data: dict[str, Any], nodes: list[Node]) -> Node:
    for n in nodes:
        if n.role == "primary":
            return n
    raise ClusterError("cluster.json names no primary")


def _repl_password(data: dict[str, Any], nodes: list[Node]) -> str:
    if data.get("repl_password"):
        return data["repl_password"]
    for n in nodes:  # a cluster made before cluster.json kept it: a replica's master.info has it
        with contextlib.suppress(OSError, IndexError):
            return (n.path / "data" / "master.info").read_text().splitlines()[5]
    raise ClusterError("cannot find the replication password (no repl_password in cluster.json)")


def _pos(text: str | None) -> Position:
    return parse_position(text) or {}


def _ahead(a: Position, b: Position) -> int:
    """How many transactions `a` has that `b` lacks (per-domain sequence numbers)."""
    return sum(max(0, seq - b.get(d, 0)) for d, seq in a.items())


def _retopology(data: dict[str, Any], primary: Node, nodes: list[Node],
                fenced: tuple[str, ...] = ()) -> None:
    """Write the new roles into `data` (saved by the caller)."""
    password = data["primary"].rpartition("@")[0].rpartition(":")[2]
    for n in nodes:
        role = "primary" if n is primary else "fenced" if n.name in fenced else "replica"
        n.role = role
        data["nodes"][n.name]["role"] = role
        data["nodes"][n.name]["fenced"] = role == "fenced"
    data["primary"] = _dsn(password, primary)
    data["replicas"] = [_dsn(password, n) for n in nodes if n.role == "replica"]
    data["primary_node"] = primary.name


def _repoint(node: Node, primary: Node, repl_password: str, own_binlog: bool = False) -> None:
    statements = ["STOP SLAVE", "SET GLOBAL read_only = 1"]
    if own_binlog:  # an old primary: what it has is its own binary log
        statements.append("SET GLOBAL gtid_slave_pos = @@gtid_binlog_pos")
    node.sql(*statements, _change_master(primary, repl_password), "START SLAVE")


def _kill_sessions(c) -> int:
    """Kill every application session (anything but root, replication and system threads)."""
    c.execute("SELECT ID FROM information_schema.PROCESSLIST WHERE ID <> CONNECTION_ID() "
              f"AND USER NOT IN ('root', 'system user', 'event_scheduler', '{REPL_USER}', "
              f"'{ADMIN_USER}', '')")
    killed = 0
    for row in c.fetchall():
        with contextlib.suppress(pymysql.err.MySQLError):
            c.execute(f"KILL CONNECTION {int(row['ID'])}")
            killed += 1
    return killed


@_controlled
def cluster_switchover(dir: str | Path, to: str | None = None,
                       timeout: float = 30.0) -> dict[str, Any]:
    """Move the primary role to a replica with the old primary reachable: zero acknowledged
    writes lost (the old one is fenced before anything is promoted)."""
    dir = Path(dir).resolve()
    data = _load(dir)
    nodes = _nodes(data)
    old = _primary_of(data, nodes)
    if not old.reachable():
        raise ClusterError(f"the primary {old.name} does not answer: use `cluster failover "
                           f"--dir {dir}` instead")
    by_name = {n.name: n for n in nodes}
    if to is not None:
        if to not in by_name:
            raise ClusterError(f"--to {to}: no such node (nodes: {', '.join(by_name)})")
        cand = by_name[to]
        if cand is old:
            raise ClusterError(f"--to {to}: it is already the primary")
        if cand.role != "replica":
            raise ClusterError(f"--to {to}: it is {cand.role}; rejoin it first")
    else:
        live = [n for n in nodes if n.role == "replica" and n.reachable()]
        if not live:
            raise ClusterError("no running replica to promote")
        cand = max(live, key=lambda n: sum(_pos(n.sql("SELECT @@gtid_slave_pos AS p")[0]["p"])
                                           .values()))
    if not cand.reachable():
        raise ClusterError(f"{cand.name} does not answer; start it first")
    st = (cand.sql("SHOW SLAVE STATUS") or [{}])[0]
    if st.get("Slave_SQL_Running") != "Yes":
        raise ClusterError(f"{cand.name}: its replication is not running "
                           f"({st.get('Last_SQL_Error') or 'SQL thread stopped'})")
    repl_password = _repl_password(data, nodes)
    t0 = time.monotonic()
    # 1. fence the old primary: no write can commit there any more
    with contextlib.closing(old.admin()) as db, db.cursor() as c:
        c.execute("SET GLOBAL read_only = 1")
        killed = _kill_sessions(c)
        c.execute("SELECT @@gtid_binlog_pos AS p")
        target = c.fetchone()["p"]
    # 2. the candidate applies everything the old primary wrote
    try:
        waited = cand.sql(f"SELECT MASTER_GTID_WAIT('{target}', {timeout}) AS w",
                          timeout=timeout + 5)[0]["w"]
        if waited != 0:
            raise ClusterError(f"{cand.name} did not apply {target} within {timeout:g}s; "
                               f"switchover abandoned, {old.name} is the primary again")
    except BaseException:
        with contextlib.suppress(Exception):
            old.sql("SET GLOBAL read_only = 0")
        raise
    # 3. promote it (its epoch first, then writable), 4. repoint the others (the old primary
    # included) to it
    epoch = _next_epoch(data, nodes)
    cand.sql("STOP SLAVE", "RESET SLAVE ALL")
    _write_epoch(cand, epoch)
    cand.sql("SET GLOBAL read_only = 0")
    data["epoch"] = epoch
    others = [n for n in nodes if n is not cand and (n is old or n.role == "replica")]
    for n in others:
        if n.reachable():
            _repoint(n, cand, repl_password, own_binlog=n is old)
    _retopology(data, cand, nodes,
                fenced=tuple(n.name for n in nodes if n.role == "fenced"))
    _save(dir, data)
    for n in others:
        if n.reachable():
            _wait_replicating(n, timeout)
    return {"primary": cand.name, "previous": old.name, "position": target,
            "sessions_killed": killed, "seconds": round(time.monotonic() - t0, 3), "epoch": epoch,
            "replicas": [n.name for n in others]}


def _binlog_position(node: Node) -> str | None:
    """The last GTID in a stopped or unreachable node's binary log, read from its files."""
    tool = _which("mariadb-binlog", "mysqlbinlog")
    index = node.path / "binlog.index"
    if tool is None or not index.is_file():
        return None
    files = [line.strip() for line in index.read_text().splitlines() if line.strip()]
    last: dict[int, str] = {}
    for f in files[-2:]:
        path = Path(f) if Path(f).is_absolute() else node.path / "data" / f
        try:
            out = subprocess.run([tool, "--no-defaults", str(path)], capture_output=True,
                                 text=True, timeout=30, errors="replace").stdout
        except (OSError, subprocess.TimeoutExpired):
            continue
        for m in re.finditer(r"Gtid list \[([0-9,\- ]*)\]|\bGTID (\d+-\d+-\d+)", out):
            for g in re.findall(r"\d+-\d+-\d+", m.group(m.lastindex)):
                d, _, seq = (int(x) for x in g.split("-"))
                if d not in last or seq >= int(last[d].split("-")[2]):
                    last[d] = g
    return ",".join(last[d] for d in sorted(last)) or None


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _run_sql_thread_alone(node: Node) -> str:
    """Leave `node` with its IO thread stopped (the primary is gone) and its SQL thread running
    on the relay log it has; what its IO thread received (Gtid_IO_Pos).

    In GTID mode MariaDB throws the relay log away when a thread starts while both are stopped
    (the IO thread would fetch it again from a primary that is gone): so a stopped SQL thread is
    started while the IO thread still runs (retrying its connection), and when both are already
    stopped the node is first switched to file/position replication at the SQL thread's own
    relay log coordinates (`MASTER_USE_GTID=no, RELAY_LOG_FILE, RELAY_LOG_POS`), which keeps the
    relay log; promotion or repointing sets GTID replication again."""
    st = (node.sql("SHOW SLAVE STATUS") or [{}])[0]
    if not st:
        return ""  # not replicating: nothing received, nothing to apply
    received = st.get("Gtid_IO_Pos") or ""
    if st.get("Slave_SQL_Running") != "Yes":
        if st.get("Slave_IO_Running") in (None, "No") and st.get("Using_Gtid", "No") != "No":
            node.sql(f"CHANGE MASTER TO MASTER_USE_GTID=no, "
                     f"RELAY_LOG_FILE='{st['Relay_Log_File']}', "
                     f"RELAY_LOG_POS={int(st['Relay_Log_Pos'])}")
        node.sql("START SLAVE SQL_THREAD")
    node.sql("STOP SLAVE IO_THREAD")
    return received


def _apply_relay_log(node: Node, received: str, deadline: float, timeout: float) -> str:
    """Wait until `node` has applied everything its IO thread received (@@gtid_slave_pos covers
    `received`, its Gtid_IO_Pos); its @@gtid_slave_pos then. A SQL thread that stops (on an
    error) or a relay log not applied by `deadline` is a ClusterError of one line."""
    while True:
        st = (node.sql("SHOW SLAVE STATUS") or [{}])[0]
        applied = node.sql("SELECT @@gtid_slave_pos AS p")[0]["p"] or ""
        if covers(_pos(applied), _pos(received)):
            return applied
        missing = _ahead(_pos(received), _pos(applied))
        if st.get("Slave_SQL_Running") != "Yes":  # it was started: it stopped, on an error
            errno = st.get("Last_SQL_Errno") or 0
            why = (f"on error {errno}: {_one_line(st.get('Last_SQL_Error'))}" if errno
                   else "without an error")
            raise ClusterError(
                f"failover abandoned, nothing promoted: {node.name}'s SQL thread stopped {why}, "
                f"with {missing} received transaction(s) not applied (applied {applied or '-'}, "
                f"received {received}); repair its replication, or stop that node to leave it "
                f"out, and run failover again")
        if time.monotonic() > deadline:
            raise ClusterError(
                f"failover abandoned, nothing promoted: {node.name} still has {missing} "
                f"received transaction(s) to apply after {timeout:g}s (applied {applied or '-'}, "
                f"received {received}); run failover again to wait longer")
        time.sleep(0.05)


@_controlled
def cluster_failover(dir: str | Path, timeout: float = 30.0) -> dict[str, Any]:
    """Promote the most advanced replica when the primary is unreachable; the old primary is
    marked fenced. Says how many transactions the old primary has that the new one lacks."""
    dir = Path(dir).resolve()
    data = _load(dir)
    nodes = _nodes(data)
    old = _primary_of(data, nodes)
    if old.reachable():
        raise ClusterError(f"the primary {old.name} answers: use `cluster switchover --dir "
                           f"{dir}` (it loses nothing)")
    live = [n for n in nodes if n.role == "replica" and n.reachable()]
    if not live:
        raise ClusterError("no running replica to promote")
    t0 = time.monotonic()
    # stop fetching (the primary is gone), then let every replica apply its relay log in full
    # (its SQL thread started if it was stopped): the choice is made on what is applied, and
    # nothing a replica received is thrown away by promoting it or repointing it
    received = {n.name: _run_sql_thread_alone(n) for n in live}
    deadline = time.monotonic() + timeout
    positions = {n.name: _apply_relay_log(n, received[n.name], deadline, timeout) for n in live}
    for n in live:
        n.sql("STOP SLAVE")
    best = max(live, key=lambda n: (all(covers(_pos(positions[n.name]), _pos(positions[m.name]))
                                        for m in live), sum(_pos(positions[n.name]).values())))
    # the next epoch before it turns writable: an old primary that comes back writable (its
    # host was cut off, nobody could fence it) is stale to the app servers from then on
    epoch = _next_epoch(data, [n for n in nodes if n is not old])
    best.sql("RESET SLAVE ALL")
    _write_epoch(best, epoch)
    best.sql("SET GLOBAL read_only = 0")
    data["epoch"] = epoch
    repl_password = _repl_password(data, nodes)
    others = [n for n in live if n is not best]
    for n in others:
        _repoint(n, best, repl_password)
    _retopology(data, best, nodes, fenced=(old.name, *(n.name for n in nodes
                                                        if n.role == "fenced")))
    # where the new primary's history left the old one's: what the old primary has past it is
    # errant (the new primary's own transactions, its epoch first, raise the sequence numbers,
    # so comparing with its position today would hide them)
    data["nodes"][old.name]["fork"] = positions[best.name]
    _save(dir, data)
    for n in others:
        _wait_replicating(n, timeout)
    old_pos = None if old.alive() else _binlog_position(old)
    lost = None if old_pos is None else _ahead(_pos(old_pos), _pos(positions[best.name]))
    return {"primary": best.name, "previous": old.name, "position": positions[best.name],
            "previous_position": old_pos, "lost": lost, "semisync": bool(data.get("semisync")),
            "epoch": epoch,
            "seconds": round(time.monotonic() - t0, 3), "replicas": [n.name for n in others]}


@_controlled
def cluster_rejoin(dir: str | Path, name: str, timeout: float = 30.0) -> dict[str, Any]:
    """Make `name` (an old primary, or any node) a replica of the current primary, refused when
    it has transactions the primary lacks (they would be lost, or break replication)."""
    dir = Path(dir).resolve()
    data = _load(dir)
    nodes = _nodes(data)
    by_name = {n.name: n for n in nodes}
    if name not in by_name:
        raise ClusterError(f"{name}: no such node (nodes: {', '.join(by_name)})")
    node, primary = by_name[name], _primary_of(data, nodes)
    if node is primary:
        raise ClusterError(f"{name} is the primary")
    if not primary.reachable():
        raise ClusterError(f"the primary {primary.name} does not answer")
    if not node.alive():
        server_bin, _ = find_binaries()
        if node.role == "primary":
            node.role = "fenced"
        _start(server_bin, node, bool(data.get("general_log")), timeout,
               bool(data.get("semisync")))
        data["nodes"][name]["pid"] = node.pid
        _save(dir, data)
    with contextlib.closing(node.admin()) as db, db.cursor() as c:
        c.execute("SET GLOBAL read_only = 1")  # fenced first, whatever comes next
        _kill_sessions(c)
        c.execute("STOP SLAVE")
        c.execute("SELECT @@gtid_binlog_pos AS b, @@gtid_current_pos AS cur")
        mine = c.fetchone()
    theirs = primary.sql("SELECT @@gtid_binlog_pos AS b")[0]["b"]
    fork = data["nodes"][name].get("fork")  # (an old primary fenced by failover)
    extra = _ahead(_pos(mine["b"]), _pos(theirs if fork is None else fork))
    if extra:
        _fence_record(dir, data, name)
        raise ClusterError(f"rejoin refused: {name} has {extra} transaction(s) the primary "
                           f"{primary.name} lacks (its binlog at {mine['b']}, the primary at "
                           f"{theirs}); they were never replicated. Save what you need from it, "
                           f"then rebuild it; it stays fenced (read-only)")
    repl_password = _repl_password(data, nodes)
    node.sql("RESET SLAVE ALL", f"SET GLOBAL gtid_slave_pos = '{mine['cur']}'",
             _change_master(primary, repl_password), "START SLAVE")
    deadline = time.monotonic() + timeout
    while True:
        st = (node.sql("SHOW SLAVE STATUS") or [{}])[0]
        if st.get("Last_IO_Errno") or st.get("Last_SQL_Errno"):
            why = st.get("Last_IO_Error") or st.get("Last_SQL_Error")
            node.sql("STOP SLAVE", "RESET SLAVE ALL")
            _fence_record(dir, data, name)
            raise ClusterError(f"rejoin refused: {name} diverged from {primary.name}: {why}; "
                               "it stays fenced (read-only)")
        running = st.get("Slave_IO_Running") == "Yes" and st.get("Slave_SQL_Running") == "Yes"
        if running and node.sql(f"SELECT MASTER_GTID_WAIT('{theirs}', 0.2) AS w")[0]["w"] == 0:
            break
        if time.monotonic() > deadline:
            raise ClusterError(f"{name}: not caught up with {primary.name} after {timeout:g}s")
        time.sleep(0.05)
    node.role = "replica"
    data["nodes"][name].pop("fork", None)
    _retopology(data, primary, nodes, fenced=tuple(n.name for n in nodes
                                                    if n.role == "fenced" and n is not node))
    _save(dir, data)
    return {"node": name, "primary": primary.name, "position": theirs}


def _fence_record(dir: Path, data: dict[str, Any], name: str) -> None:
    data["nodes"][name]["role"] = "fenced"
    data["nodes"][name]["fenced"] = True
    _save(dir, data)


# -- down ---------------------------------------------------------------------------------------


def cluster_down(dir: str | Path, timeout: float = 30.0) -> list[str]:
    """Stop every node of the cluster under `dir` by its recorded pid; return what was stopped."""
    dir = Path(dir).resolve()
    data = _load(dir)
    stopped = []
    nodes = _nodes(data)
    # replicas first, so that none logs errors about a vanished primary while it stops
    for node in sorted(nodes, key=lambda n: n.role == "primary"):
        if not node.alive():
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while node.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
            _reap(node.pid)
        if node.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(node.pid, signal.SIGKILL)
            while node.alive():
                time.sleep(0.05)
                _reap(node.pid)
        stopped.append(node.name)
    return stopped


def _reap(pid: int) -> None:
    """Collect a child that has exited (when the same process started it)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
