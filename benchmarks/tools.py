"""Finding the tools and running the processes of a benchmark.

Rule: every process the runner starts goes through :class:`Processes`, which knows it by its own
pid and stops it (SIGTERM, then SIGKILL) when the run ends, however it ends; nothing is ever
stopped by name. Each child also gets a parent-death signal, so none outlives a runner that is
killed outright. A child that fails to start, or dies, is reported with the tail of its output.
A process's CPU and memory are those of its whole tree (the pid and every descendant, found
through /proc/PID/task/*/children), as /proc shows it at the moment of reading. The connections
the backends accepted are read from their own counters: nginx's stub_status `accepts`, and
the one benchmarks.app_launch keeps in each foobar_app server (/proc/net/tcp would miss the
connections a proxy closes with a reset, which leave no TIME_WAIT behind: HAProxy does so).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import platform
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent

# tool -> how to install it when missing
INSTALL_HINTS = {
    "wrk": "apt-get install -y wrk haproxy nginx",
    "haproxy": "apt-get install -y wrk haproxy nginx",
    "nginx": "apt-get install -y wrk haproxy nginx",
    "taskset": "apt-get install -y util-linux",
    "openssl": "apt-get install -y openssl",
    "pproxy": "pip install pproxy==2.7.9",
    "matplotlib": "pip install matplotlib",
}


class BenchError(Exception):
    """A failure the runner reports in a few lines (no traceback) before stopping cleanly."""


def find_executable(name: str) -> str | None:
    """`name` on PATH, else in /usr/sbin or /sbin (where Debian puts nginx and haproxy)."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def check_tools(need_pproxy: bool = True) -> tuple[dict[str, str], list[str]]:
    """Return ({tool: path or module}, [one message per missing tool])."""
    found: dict[str, str] = {}
    missing: list[str] = []
    for name in ("wrk", "haproxy", "nginx", "taskset", "openssl"):
        path = find_executable(name)
        if path:
            found[name] = path
        else:
            missing.append(f"missing tool: {name} (install it with: {INSTALL_HINTS[name]})")
    modules = ["matplotlib"] + (["pproxy"] if need_pproxy else [])
    for mod in modules:
        if importlib.util.find_spec(mod) is None:
            missing.append(f"missing Python module: {mod} (install it with: {INSTALL_HINTS[mod]})")
        else:
            found[mod] = mod
    return found, missing


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; return (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# -- pinning ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pinning:
    """Which cores the load generator side and the proxy under test run on.

    The client side (wrk, nginx, app servers) gets the first core; the proxy gets the next
    `workers` cores, its own, when there are that many. When there are not (workers >= cores),
    the proxy is not pinned: it shares every core, the client's included, and its figures are
    reported with no target (`proxy_has_own_cores` is False).
    """

    taskset: str | None
    client_cpus: str | None  # wrk, nginx, app servers; None: not pinned
    proxy_cpus: str | None  # the proxy being measured; None: not pinned (it shares every core)
    cores: int = 1  # cores this runner may run on
    workers: int = 1  # foobar_lb worker processes, HAProxy threads

    @classmethod
    def for_machine(cls, taskset: str | None, workers: int = 1) -> Pinning:
        """Core 0 for the client side, cores 1..workers for the proxy (the first ones this process
        may run on); the proxy unpinned when that many cores are not there."""
        try:
            cores = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = list(range(os.cpu_count() or 1))
        if len(cores) < 2 or not taskset:
            return cls(None, None, None, len(cores), workers)
        proxy = ",".join(map(str, cores[1:1 + workers])) if workers < len(cores) else None
        return cls(taskset, str(cores[0]), proxy, len(cores), workers)

    @property
    def enabled(self) -> bool:
        return self.taskset is not None

    @property
    def proxy_has_own_cores(self) -> bool:
        """The proxy runs on cores nothing else of the benchmark runs on: its figures are judged."""
        return self.taskset is not None and self.proxy_cpus is not None

    @property
    def proxy_core_list(self) -> list[int]:
        return [int(c) for c in self.proxy_cpus.split(",")] if self.proxy_cpus else []

    def client(self, argv: list[str]) -> list[str]:
        return [self.taskset, "-c", self.client_cpus, *argv] if self.taskset and self.client_cpus else argv

    def proxy(self, argv: list[str]) -> list[str]:
        return [self.taskset, "-c", self.proxy_cpus, *argv] if self.taskset and self.proxy_cpus else argv

    def describe(self) -> str:
        if not self.enabled:
            return "no pinning (fewer than 2 cores): client, backends and proxies share the CPU"
        client = (f"wrk, nginx and the app servers on core {self.client_cpus} "
                  f"(taskset -c {self.client_cpus})")
        if self.proxy_has_own_cores:
            many = "s" if "," in (self.proxy_cpus or "") else ""
            return (f"{client}, each proxy alone on core{many} {self.proxy_cpus} "
                    f"(taskset -c {self.proxy_cpus})")
        return (f"{client}; the proxies are not pinned: with {self.workers} workers (threads) on "
                f"{self.cores} cores they cannot have cores of their own and share every core, "
                f"core {self.client_cpus} with the load generator")


# -- processes ----------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


@dataclass
class Proc:
    """One started process: its name in reports, command line, pid and output log."""

    name: str
    argv: list[str]
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no output)"
        rows = [r for r in text.splitlines() if r.strip()]
        return "\n".join(rows[-lines:]) if rows else "(no output)"

    def describe_exit(self) -> str:
        rc = self.popen.poll()
        if rc is None:
            return "still running"
        if rc < 0:
            return f"killed by {signal.Signals(-rc).name}"
        return f"exited with status {rc}"

    def failure(self, what: str) -> BenchError:
        return BenchError(f"{self.name} (pid {self.pid}): {what}\n"
                          f"  command: {' '.join(self.argv)}\n"
                          f"  output tail ({self.log}):\n" + _indent(self.tail(), "    "))

    def stop(self, timeout: float = 5.0) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(5)


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


@dataclass
class Processes:
    """Starts processes, remembers them, stops them all (newest first) in `stop_all`."""

    workdir: Path
    started: list[Proc] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        log = self.workdir / f"{safe}-{len(self.started)}.log"
        with open(log, "wb") as out:
            try:
                popen = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    cwd=self.workdir, env=env, start_new_session=True, preexec_fn=_child_setup,
                )
            except OSError as exc:
                raise BenchError(f"{name}: cannot start {' '.join(argv)}: {exc}") from None
        proc = Proc(name, argv, popen, log)
        self.started.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        while self.started:
            proc = self.started.pop()
            with contextlib.suppress(Exception):
                proc.stop()


def wait_port(proc: Proc, port: int, timeout: float = 15.0) -> None:
    """Wait until `port` accepts connections; fail (with the output tail) if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise proc.failure(f"failed to start: {proc.describe_exit()} before listening on port {port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            try:
                s.connect((LOOPBACK, port))
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise proc.failure(f"failed to start: port {port} not listening after {timeout:.0f}s")
        time.sleep(0.05)


def http_request(port: int, method: str = "GET", path: str = "/", body: bytes | None = None,
                 headers: dict[str, str] | None = None, timeout: float = 5.0,
                 tls: bool = False) -> tuple[int, bytes]:
    """One HTTP/1.1 request on its own connection (Connection: close); return (status, body).
    `tls`: over TLS, the certificate not verified (the benchmark's own throwaway one)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {LOOPBACK}:{port}", "Connection: close"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")
    with contextlib.ExitStack() as stack:
        s = stack.enter_context(socket.create_connection((LOOPBACK, port), timeout=timeout))
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            s = stack.enter_context(ctx.wrap_socket(s, server_hostname="localhost"))
        s.sendall(raw)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    resp = b"".join(chunks)
    head, _, rest = resp.partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise OSError(f"not an HTTP response: {resp[:80]!r}") from None
    return status, rest


def probe(proc: Proc, port: int, path: str = "/", timeout: float = 10.0, tls: bool = False) -> None:
    """A GET through `proc` must answer 200 (retried until `timeout`): the whole chain works."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise proc.failure(f"died during its first request: {proc.describe_exit()}")
        try:
            status, _ = http_request(port, path=path, timeout=2.0, tls=tls)
            if status == 200:
                return
            last = f"status {status}"
        except OSError as exc:
            last = str(exc) or type(exc).__name__
        time.sleep(0.1)
    raise proc.failure(f"GET {path} through it did not answer 200 within {timeout:.0f}s (last: {last})")


# -- connections accepted by the backends ---------------------------------------------------------


def nginx_accepts(port: int) -> int:
    """nginx's `accepts` counter (stub_status on `port`): every connection it has accepted since
    it started, this reading's own included."""
    status, body = http_request(port, path="/stub_status", timeout=5.0)
    lines = body.decode("ascii", "replace").splitlines()
    # "Active connections: 1", "server accepts handled requests", " 12 12 34", "Reading: ..."
    try:
        i = next(n for n, line in enumerate(lines) if line.split() == ["server", "accepts", "handled",
                                                                        "requests"])
        return int(lines[i + 1].split()[0])
    except (StopIteration, IndexError, ValueError):
        raise BenchError(f"nginx stub_status on port {port} answered {status} without an accepts "
                         f"counter: {body[:200]!r}") from None


def app_accepts(port: int) -> int:
    """A foobar_app server's count of accepted connections, this reading's own included (the app
    servers are started through benchmarks.app_launch, which keeps the count)."""
    from .app_launch import ACCEPTS_PATH

    status, body = http_request(port, path=ACCEPTS_PATH, timeout=5.0)
    try:
        if status != 200:
            raise ValueError
        return int(body.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise BenchError(f"foobar_app on port {port}: {ACCEPTS_PATH} answered {status}: "
                         f"{body[:200]!r}") from None


# -- /proc readings -----------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat from field 3 on (comm, field 2, may hold spaces and parentheses)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of a process in clock ticks: fields 14 and 15 of /proc/PID/stat."""
    rest = _stat_fields(pid)
    return int(rest[14 - 3]), int(rest[15 - 3])


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of these processes, in seconds (a process that is gone counts 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            u, s = cpu_ticks(pid)
            total += u + s
    return total / CLK_TCK


def children(pid: int) -> list[int]:
    """Direct children of a process (e.g. nginx's worker under its master)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                out += [int(c) for c in (task / "children").read_text().split()]
    return out


def process_tree(pid: int) -> list[int]:
    """The pid and all its descendants (children of every thread, recursively), the pid first;
    a process that is gone by the time it is read simply has no children."""
    tree: list[int] = [pid]
    seen = {pid}
    i = 0
    while i < len(tree):
        for c in children(tree[i]):
            if c not in seen:
                seen.add(c)
                tree.append(c)
        i += 1
    return tree


@dataclass(frozen=True)
class TreeCpu:
    """CPU of a process tree at one moment, in clock ticks, and the pids it was read from.

    user (system) = utime + cutime (stime + cstime) summed over the tree: a descendant that
    ended and was waited for by its parent in the tree still counts, through the parent's
    cutime/cstime; one that started meanwhile counts from 0. The difference of two readings is
    the CPU the tree used between them, as /proc shows it.
    """

    user: int
    system: int
    pids: tuple[int, ...]

    @property
    def seconds(self) -> float:
        return (self.user + self.system) / CLK_TCK


def tree_cpu(pid: int) -> TreeCpu:
    """Read the CPU of `pid` and all its descendants (a process that is gone counts 0)."""
    user = system = 0
    pids = process_tree(pid)
    for p in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            rest = _stat_fields(p)
            user += int(rest[14 - 3]) + int(rest[16 - 3])
            system += int(rest[15 - 3]) + int(rest[17 - 3])
    return TreeCpu(user, system, tuple(pids))


def core_busy_seconds() -> dict[int, float]:
    """Busy time (all but idle and iowait) of each core since boot, from /proc/stat, in seconds."""
    busy: dict[int, float] = {}
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *vals = line.split()
            v = [int(x) for x in vals]
            busy[int(name[3:])] = (sum(v[:8]) - v[3] - v[4]) / CLK_TCK  # user..steal minus idle, iowait
    return busy


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"pid {pid}: no VmRSS in /proc/{pid}/status")


def tree_rss_kib(pid: int) -> int:
    """VmRSS summed over `pid` and all its descendants, in KiB (pages shared between them, such as
    the interpreter's, count once per process). A descendant that is gone (or a zombie, without
    VmRSS) counts 0; the root itself must be there."""
    total = rss_kib(pid)
    for p in process_tree(pid)[1:]:
        with contextlib.suppress(OSError, ValueError, BenchError):
            total += rss_kib(p)
    return total


# -- the machine --------------------------------------------------------------------------------


def _first_line(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0].strip() if text else "unknown"


def machine_description(tools: dict[str, str], pinning: Pinning) -> dict:
    cpu_model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    pproxy_version = "not installed"
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        pproxy_version = version("pproxy")
    uvloop_version = "not installed"
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        uvloop_version = version("uvloop")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
        "uvloop": uvloop_version,
        "haproxy": _first_line([tools["haproxy"], "-v"]) if "haproxy" in tools else "missing",
        "nginx": _first_line([tools["nginx"], "-v"]) if "nginx" in tools else "missing",
        "wrk": _first_line([tools["wrk"], "-v"]) if "wrk" in tools else "missing",
        "pproxy": pproxy_version,
        "nofile_limit": {"soft": soft, "hard": hard},
        "pinning": pinning.describe(),
        "workers": pinning.workers,
        "proxy_has_own_cores": pinning.proxy_has_own_cores,
    }


def throwaway_certificate(workdir: Path) -> tuple[Path, Path, Path]:
    """A self-signed ECDSA P-256 certificate for localhost and 127.0.0.1, made with the openssl
    command: (certificate, key, both in one file for HAProxy)."""
    cert, key, both = workdir / "bench-cert.pem", workdir / "bench-key.pem", workdir / "bench-both.pem"
    if not both.exists():
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                        "-nodes", "-days", "2", "-subj", "/CN=localhost", "-addext",
                        "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                       check=True, capture_output=True)
        both.write_bytes(cert.read_bytes() + key.read_bytes())
    return cert, key, both
