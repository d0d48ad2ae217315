"""A throwaway MariaDB server for tests: its own data directory, socket and loopback port.

    server = MariaDBServer()
    server.start()          # MariaDBUnavailable when the binaries are not installed
    ... connect to server.host:server.port as server.user / server.password, db server.database
    server.stop()           # SIGTERM to its own pid (SIGKILL if it lingers), directory removed

Nothing here reads the machine's option files (--no-defaults) or touches another MariaDB
instance: the server gets a fresh data directory under a temporary directory, a free port and
its own socket and pid file. It runs with `--user=root` because the tests may run as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["MariaDBError", "MariaDBServer", "MariaDBUnavailable", "find_binaries"]

PACKAGE = "mariadb-server"
SEARCH_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")

# Small and fast: the tests need a working server, not a durable one.
SERVER_OPTIONS = (
    "--innodb-buffer-pool-size=16M",
    "--innodb-log-file-size=8M",
    "--innodb-flush-log-at-trx-commit=0",
    "--innodb-doublewrite=0",
    "--skip-name-resolve",
    "--skip-log-bin",
    "--loose-performance-schema=OFF",
    "--loose-skip-feedback",
)


class MariaDBUnavailable(RuntimeError):
    """The MariaDB binaries are not installed (install the `mariadb-server` package)."""


class MariaDBError(RuntimeError):
    """The server could not be initialised or started."""


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
    """(mariadbd, mariadb-install-db), or MariaDBUnavailable naming the package to install."""
    server = _which("mariadbd", "mysqld")
    install = _which("mariadb-install-db", "mysql_install_db")
    if server is None or install is None:
        missing = [n for n, p in (("mariadbd", server), ("mariadb-install-db", install)) if p is None]
        raise MariaDBUnavailable(f"{' and '.join(missing)} not found: install the {PACKAGE} package")
    return server, install


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class MariaDBServer:
    """One mariadbd process on 127.0.0.1, a free port, with a user and an empty database."""

    def __init__(self, *, host: str = "127.0.0.1", user: str = "foobar",
                 password: str = "foobar-test-pw", database: str = "foobar_test"):
        self.host = host
        self.port = 0
        self.user = user
        self.password = password
        self.database = database
        self.dir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        assert self.dir is not None
        return self.dir / "mysql.sock"

    @property
    def error_log(self) -> Path:
        assert self.dir is not None
        return self.dir / "error.log"

    # -- life cycle -----------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> MariaDBServer:
        server_bin, install_bin = find_binaries()
        self.dir = Path(tempfile.mkdtemp(prefix="foobar-mariadb-"))
        try:
            self._install(install_bin, timeout)
            self._launch(server_bin, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _install(self, install_bin: str, timeout: float) -> None:
        d = self.dir
        # Grant tables are off during bootstrap; FLUSH PRIVILEGES turns them on so that
        # CREATE USER works in the extra file.
        extra = d / "init.sql"
        extra.write_text(
            "FLUSH PRIVILEGES;\n"
            f"CREATE USER '{self.user}'@'{self.host}' IDENTIFIED BY '{self.password}';\n"
            f"GRANT ALL PRIVILEGES ON *.* TO '{self.user}'@'{self.host}';\n"
            f"CREATE DATABASE `{self.database}`;\n"
        )
        cmd = [
            install_bin,
            "--no-defaults",
            f"--datadir={d / 'data'}",
            "--user=root",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            f"--extra-file={extra}",
            *SERVER_OPTIONS,
        ]
        log = d / "install.log"
        with log.open("wb") as out:
            try:
                rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=timeout, cwd=d).returncode
            except subprocess.TimeoutExpired:
                raise MariaDBError(f"mariadb-install-db took over {timeout:.0f}s:\n{_tail(log)}") from None
        if rc != 0:
            raise MariaDBError(f"mariadb-install-db failed (exit {rc}):\n{_tail(log)}")

    def _launch(self, server_bin: str, timeout: float) -> None:
        d = self.dir
        self.port = _free_port(self.host)
        cmd = [
            server_bin,
            "--no-defaults",
            "--user=root",
            f"--datadir={d / 'data'}",
            f"--socket={self.socket_path}",
            f"--port={self.port}",
            f"--bind-address={self.host}",
            "--skip-networking=0",
            f"--pid-file={d / 'mariadbd.pid'}",
            f"--log-error={self.error_log}",
            f"--tmpdir={d}",
            *SERVER_OPTIONS,
        ]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, cwd=d, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise MariaDBError(f"mariadbd exited with {rc} while starting:\n{_tail(self.error_log)}")
            if self._greets():
                return
            if time.monotonic() > deadline:
                raise MariaDBError(f"mariadbd not ready after {timeout:.0f}s:\n{_tail(self.error_log)}")
            time.sleep(0.05)

    def _greets(self) -> bool:
        """True when a TCP connection gets a protocol-10 handshake packet."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as s:
                head = s.recv(5)
        except OSError:
            return False
        return len(head) == 5 and head[4] == 10

    def stop(self, timeout: float = 15.0) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5.0)
        d, self.dir = self.dir, None
        if d is not None:
            shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> MariaDBServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
