"""A local MariaDB primary and replicas with real GTID replication, from the machine's binaries.

    python -m foobar_app cluster up --dir DIR [--replicas N]
    python -m foobar_app cluster status --dir DIR
    python -m foobar_app cluster down --dir DIR

Rules of this module:
- everything lives under DIR: one data directory, socket, pid file and logs per node; nodes
  listen on 127.0.0.1 only, on free ports; nothing reads the machine's option files
  (`--no-defaults`) and no other MariaDB instance is touched;
- the primary writes a binary log; each replica replicates from it with
  `MASTER_USE_GTID=slave_pos`, runs `read_only=1`, and is verified replicating (both threads
  running, the primary's users and database arrived) before `up` returns;
- the application user has privileges on its database (and SLAVE MONITOR, to read replica
  status) but neither SUPER nor READ_ONLY ADMIN, so `read_only` binds it on the replicas;
- `up` writes DIR/cluster.json: {"primary": DSN, "replicas": [DSN, ...], "nodes": {...}};
  `down` stops every node by the pid it recorded (SIGTERM, then SIGKILL) and leaves nothing
  running or listening.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pymysql

__all__ = ["ClusterError", "MariaDBMissing", "cluster_down", "cluster_status", "cluster_up",
           "find_binaries"]

PACKAGE = "mariadb-server"
SEARCH_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")
DATABASE = "foobar"
APP_USER = "foobar"
REPL_USER = "repl"
LOOPBACK = "127.0.0.1"

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

    @property
    def path(self) -> Path:
        return Path(self.dir)

    @property
    def socket(self) -> str:
        return str(self.path / "mysql.sock")

    @property
    def error_log(self) -> Path:
        return self.path / "error.log"

    @property
    def general_log(self) -> Path:
        return self.path / "general.log"

    def admin(self, timeout: float = 5.0) -> pymysql.connections.Connection:
        """root over the node's own socket (root has no password and no TCP access)."""
        return pymysql.connect(unix_socket=self.socket, user="root", connect_timeout=timeout,
                               read_timeout=timeout + 25, write_timeout=timeout + 25,
                               autocommit=True, cursorclass=pymysql.cursors.DictCursor)

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
    return [Node(**{k: v for k, v in n.items() if k in Node.__dataclass_fields__})
            for n in data["nodes"].values()]


# -- up ---------------------------------------------------------------------------------------


def cluster_up(dir: str | Path, replicas: int = 1, general_log: bool = False,
               timeout: float = 60.0) -> dict[str, Any]:
    """Create and start a primary and `replicas` replicas under `dir`; return cluster.json."""
    dir = Path(dir).resolve()
    server_bin, install_bin = find_binaries()
    if (dir / "cluster.json").exists():
        data = _load(dir)
        running = [n.name for n in _nodes(data) if n.alive()]
        if running:
            raise ClusterError(f"{dir}: a cluster is already up here ({', '.join(running)}); "
                               f"run `cluster down --dir {dir}` first")
        raise ClusterError(f"{dir}: holds a stopped cluster; remove the directory to start afresh")
    dir.mkdir(parents=True, exist_ok=True)
    for old in [dir / "primary", *dir.glob("replica-*")]:  # what a failed `up` left (its logs)
        if old.is_dir():
            shutil.rmtree(old)
    password = secrets.token_urlsafe(18)
    repl_password = secrets.token_urlsafe(18)
    nodes = [Node("primary", "primary", 1, _free_port(), str(dir / "primary"))]
    nodes += [Node(f"replica-{i}", "replica", 1 + i, _free_port(), str(dir / f"replica-{i}"))
              for i in range(1, replicas + 1)]
    data: dict[str, Any] = {
        "primary": f"mysql://{APP_USER}:{password}@{LOOPBACK}:{nodes[0].port}/{DATABASE}",
        "replicas": [f"mysql://{APP_USER}:{password}@{LOOPBACK}:{n.port}/{DATABASE}"
                     for n in nodes[1:]],
        "nodes": {},
        "database": DATABASE,
        "user": APP_USER,
        "general_log": general_log,
    }
    try:
        for node in nodes:
            _install(install_bin, node, timeout)
            _start(server_bin, node, general_log, timeout)
            data["nodes"][node.name] = _describe(node)
            _save(dir, data)  # so that `down` can stop what already runs, whatever happens next
        _setup_primary(nodes[0], password, repl_password)
        for node in nodes[1:]:
            _setup_replica(node, nodes[0], repl_password, timeout)
    except BaseException:
        with contextlib.suppress(Exception):
            cluster_down(dir)
        # no cluster.json: the next `up` starts afresh; the nodes' logs stay for a look
        (dir / "cluster.json").unlink(missing_ok=True)
        raise
    _save(dir, data)
    return data


def _describe(node: Node) -> dict[str, Any]:
    return {**asdict(node), "socket": node.socket, "error_log": str(node.error_log),
            "general_log": str(node.general_log)}


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
           "--innodb-buffer-pool-size=32M", "--innodb-log-file-size=16M"]
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


def _start(server_bin: str, node: Node, general_log: bool, timeout: float) -> None:
    p = node.path
    cmd = [server_bin, "--no-defaults", *_run_as_root_args(), f"--datadir={p / 'data'}",
           f"--socket={node.socket}", f"--port={node.port}", f"--bind-address={LOOPBACK}",
           f"--pid-file={p / 'mariadbd.pid'}", f"--log-error={node.error_log}", f"--tmpdir={p}",
           f"--server-id={node.server_id}", f"--log-bin={p / 'binlog'}", *SERVER_OPTIONS]
    if node.role == "replica":
        cmd += ["--read-only=1", "--skip-slave-start"]
    if general_log:
        cmd += ["--general-log=1", f"--general-log-file={node.general_log}"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=p, start_new_session=True)
    node.pid = proc.pid
    deadline = time.monotonic() + timeout
    while True:
        rc = proc.poll()
        if rc is not None:
            raise ClusterError(f"{node.name}: mariadbd exited with status {rc} while starting "
                               f"(see {node.error_log})\n{_tail(node.error_log)}")
        try:
            with contextlib.closing(node.admin(timeout=1.0)):
                return
        except pymysql.err.MySQLError:
            pass
        if time.monotonic() > deadline:
            raise ClusterError(f"{node.name}: mariadbd not ready after {timeout:.0f}s "
                               f"(see {node.error_log})\n{_tail(node.error_log)}")
        time.sleep(0.05)


def _setup_primary(node: Node, password: str, repl_password: str) -> None:
    with contextlib.closing(node.admin()) as db, db.cursor() as c:
        for sql in (
            f"CREATE DATABASE `{DATABASE}` CHARACTER SET utf8mb4",
            f"CREATE USER '{APP_USER}'@'{LOOPBACK}' IDENTIFIED BY '{password}'",
            f"GRANT ALL PRIVILEGES ON `{DATABASE}`.* TO '{APP_USER}'@'{LOOPBACK}'",
            f"GRANT SLAVE MONITOR ON *.* TO '{APP_USER}'@'{LOOPBACK}'",
            f"CREATE USER '{REPL_USER}'@'{LOOPBACK}' IDENTIFIED BY '{repl_password}'",
            f"GRANT REPLICATION SLAVE ON *.* TO '{REPL_USER}'@'{LOOPBACK}'",
        ):
            c.execute(sql)


def _setup_replica(node: Node, primary: Node, repl_password: str, timeout: float) -> None:
    with contextlib.closing(node.admin()) as db, db.cursor() as c:
        c.execute(f"CHANGE MASTER TO MASTER_HOST='{LOOPBACK}', MASTER_PORT={primary.port}, "
                  f"MASTER_USER='{REPL_USER}', MASTER_PASSWORD='{repl_password}', "
                  "MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1")
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
                why = st.get("Last_IO_Error") or st.get("Last_SQL_Error") or "not caught up"
                raise ClusterError(f"{node.name}: replication not running after {timeout:.0f}s "
                                   f"(IO {st.get('Slave_IO_Running')}, SQL "
                                   f"{st.get('Slave_SQL_Running')}): {why}")
            time.sleep(0.05)


# -- status -------------------------------------------------------------------------------------


def cluster_status(dir: str | Path) -> list[dict[str, Any]]:
    """Each node: role, running, replication threads, Seconds_Behind_Master, heartbeat lag."""
    dir = Path(dir).resolve()
    data = _load(dir)
    out = []
    for node in _nodes(data):
        row: dict[str, Any] = {"node": node.name, "role": node.role, "port": node.port,
                               "pid": node.pid, "running": node.alive()}
        if row["running"]:
            try:
                row.update(_inspect(node))
            except pymysql.err.MySQLError as e:
                row["error"] = str(e)
        out.append(row)
    return out


def _inspect(node: Node) -> dict[str, Any]:
    with contextlib.closing(node.admin()) as db, db.cursor() as c:
        c.execute("SELECT @@read_only AS ro, @@gtid_current_pos AS gtid")
        row = c.fetchone()
        info: dict[str, Any] = {"read_only": bool(row["ro"]), "gtid": row["gtid"]}
        if node.role != "replica":
            return info
        c.execute("SHOW SLAVE STATUS")
        st = c.fetchone() or {}
        info.update(io_thread=st.get("Slave_IO_Running"), sql_thread=st.get("Slave_SQL_Running"),
                    seconds_behind_master=st.get("Seconds_Behind_Master"),
                    last_error=st.get("Last_IO_Error") or st.get("Last_SQL_Error") or "")
        try:
            c.execute(f"SELECT TIMESTAMPDIFF(MICROSECOND, ts, NOW(6)) / 1000000 AS lag "
                      f"FROM `{DATABASE}`.foobar_heartbeat WHERE id = 1")
            hb = c.fetchone()
            info["heartbeat_lag"] = float(hb["lag"]) if hb else None
        except pymysql.err.MySQLError:
            info["heartbeat_lag"] = None  # no app has written a heartbeat yet
        return info


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
