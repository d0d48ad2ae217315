"""Test support for foobar_lb as processes: a master with its workers, a load that counts.

- `LbProcess`: `python -m foobar_lb serve ...` with a configuration file and a pid file in a
  temporary directory; its output lines are collected as they come; `stop()` ends it by pid.
- `load()`: a bounded HTTP/1.1 load on loopback, keep-alive and new connections mixed, whose
  responses are read by h11 (an independent parser, not the proxy's); every request that does
  not get a complete 200 is counted with why (reset, closed, status).
- `/proc` helpers: a process's children, and which processes own a TCP connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11

from support import LOOPBACK


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(v)


def to_toml(cfg: dict[str, Any]) -> str:
    """A configuration dict (two levels of tables at most) as TOML text."""
    out = []
    for top, body in cfg.items():
        if top in ("frontends", "backends"):
            for name, table in body.items():
                out.append(f"[{top}.{name}]")
                out += [f"{k} = {toml_value(v)}" for k, v in table.items()]
        else:
            out.append(f"[{top}]")
            out += [f"{k} = {toml_value(v)}" for k, v in body.items()]
    return "\n".join(out) + "\n"


class LbProcess:
    """A running `foobar_lb serve` (a master and its workers)."""

    def __init__(self, tmp: Path, cfg: dict[str, Any] | None = None, *args: str):
        self.tmp = tmp
        self.config = tmp / "lb.toml"
        self.pid_file = tmp / "lb.pid"
        if cfg is not None:
            self.config.write_text(to_toml(cfg))
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers: list[asyncio.Task] = []

    async def start(self, wait_ready: bool = True, timeout: float = 20.0) -> LbProcess:
        argv = [sys.executable, "-m", "foobar_lb", "serve"]
        if self.config.exists():
            argv += ["--config", str(self.config)]
        argv += ["--pid-file", str(self.pid_file), *self.args]
        self.proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            cwd=str(self.tmp))
        self._readers = [asyncio.ensure_future(self._read(self.proc.stdout, self.out)),
                         asyncio.ensure_future(self._read(self.proc.stderr, self.err))]
        if wait_ready:
            await self.wait_out(r"ready: |press Ctrl-C", timeout)
        return self

    @staticmethod
    async def _read(stream: asyncio.StreamReader, into: list[str]) -> None:
        while line := await stream.readline():
            into.append(line.decode(errors="replace").rstrip("\n"))

    async def wait_line(self, lines: list[str], pattern: str, timeout: float = 10.0,
                        start: int = 0) -> str:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in lines[start:]:
                if rx.search(line):
                    return line
            if self.proc.returncode is not None and all(t.done() for t in self._readers):
                break
            await asyncio.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} within {timeout}s; stdout: "
                             f"{self.out[-20:]}; stderr: {self.err[-20:]}")

    async def wait_out(self, pattern: str, timeout: float = 10.0) -> str:
        return await self.wait_line(self.out, pattern, timeout)

    async def wait_err(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        return await self.wait_line(self.err, pattern, timeout, start)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def workers(self) -> list[int]:
        return children(self.pid, "foobar_lb.worker")

    async def ctl(self, *args: str, timeout: float = 40.0) -> tuple[int, str, str]:
        p = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "foobar_lb", *args, "--pid-file", str(self.pid_file),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(p.communicate(), timeout)
        return p.returncode, out.decode(), err.decode()

    async def stats(self) -> dict[str, Any]:
        rc, out, err = await self.ctl("stats")
        assert rc == 0, err
        return json.loads(out)

    async def reload(self) -> tuple[int, str, str]:
        return await self.ctl("reload")

    async def stop(self, timeout: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.kill_all()
                await self.proc.wait()
        await asyncio.gather(*self._readers, return_exceptions=True)
        return self.proc.returncode

    def kill_all(self) -> None:
        """SIGKILL the master and every child it has (by pid)."""
        if self.proc is None:
            return
        for pid in [*all_children(self.pid), self.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    async def __aenter__(self) -> LbProcess:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        left = all_children(self.pid) if self.proc and self.proc.returncode is None else []
        await self.stop()
        for pid in left:  # nothing may outlive the test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------
# /proc


def children(pid: int, marker: str = "") -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid != pid:
                continue
            if marker and marker not in (d / "cmdline").read_bytes().decode(errors="replace"):
                continue
        except (OSError, ValueError, IndexError):
            continue
        out.append(int(d.name))
    return sorted(out)


def all_children(pid: int) -> list[int]:
    out = []
    todo = [pid]
    while todo:
        for c in children(todo.pop()):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def socket_inodes(pid: int) -> set[int]:
    out = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    out.add(int(target[8:-1]))
    return out


def established_to(port: int) -> dict[int, tuple[str, int]]:
    """inode -> remote address of the established TCP (IPv4) sockets whose local port is
    `port` (the proxy's side of client connections)."""
    out = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote, st, inode = parts[1], parts[2], parts[3], int(parts[9])
        if st == "01" and int(local.split(":")[1], 16) == port:
            out[inode] = (remote, 0)
    return out


# ---------------------------------------------------------------------------------------------
# A load that counts


@dataclass
class LoadResult:
    ok: int = 0
    failed: Counter = field(default_factory=Counter)
    statuses: Counter = field(default_factory=Counter)
    connections: int = 0
    bodies: Counter = field(default_factory=Counter)

    @property
    def errors(self) -> int:
        return sum(self.failed.values())


async def _one_connection(host: str, port: int, n: int, path: str, keep: bool,
                          res: LoadResult, deadline: float) -> None:
    """Send up to `n` requests, one at a time, on as few connections as the server allows
    (`keep`) or on one connection each."""
    done = 0
    while done < n and time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError as e:
            res.failed[f"connect: {type(e).__name__}"] += 1
            done += 1
            continue
        res.connections += 1
        conn = h11.Connection(h11.CLIENT)
        try:
            while done < n and time.monotonic() < deadline:
                headers = [("Host", f"{host}:{port}")]
                if not keep:
                    headers.append(("Connection", "close"))
                writer.write(conn.send(h11.Request(method="GET", target=path, headers=headers)))
                writer.write(conn.send(h11.EndOfMessage()))
                done += 1
                status, body = 0, b""
                while True:
                    ev = conn.next_event()
                    if ev is h11.NEED_DATA:
                        data = await asyncio.wait_for(reader.read(65536), 30)
                        conn.receive_data(data)
                        if not data and conn.their_state is not h11.DONE:
                            raise ConnectionError("closed before a complete response")
                        continue
                    if isinstance(ev, h11.Response):
                        status = ev.status_code
                    elif isinstance(ev, h11.Data):
                        body += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        break
                res.statuses[status] += 1
                if status == 200:
                    res.ok += 1
                    res.bodies[body] += 1
                else:
                    res.failed[f"status {status}"] += 1
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                    break
                conn.start_next_cycle()
        except ConnectionResetError:
            res.failed["reset"] += 1
        except (ConnectionError, h11.RemoteProtocolError, TimeoutError) as e:
            res.failed[f"{type(e).__name__}: {e}"] += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def load(port: int, *, connections: int = 20, requests: int = 2000, path: str = "/",
               host: str = LOOPBACK, seconds: float = 60.0, fresh_every: int = 2) -> LoadResult:
    """`requests` in all over `connections` concurrent clients; every `fresh_every`-th client
    opens a new connection per request, the others keep theirs alive. Bounded by `seconds`."""
    res = LoadResult()
    deadline = time.monotonic() + seconds
    per = max(1, requests // connections)
    await asyncio.gather(*(
        _one_connection(host, port, per, path, keep=(i % fresh_every != 0), res=res,
                        deadline=deadline)
        for i in range(connections)))
    return res


def fd_count(pid: int) -> int:
    """Descriptors open in process `pid` (-1 when it is gone)."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def rss_kib(pid: int) -> int:
    """Resident memory of process `pid` in KiB (VmRSS; 0 when it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """User and system CPU time process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def cpu_share(pid: int, seconds: float) -> float:
    """The share of one CPU process `pid` used over the next `seconds` (wall clock)."""
    c0, t0 = cpu_seconds(pid), time.monotonic()
    await asyncio.sleep(seconds)
    return (cpu_seconds(pid) - c0) / (time.monotonic() - t0)


def fd_counts(pids: list[int]) -> dict[int, int]:
    return {pid: fd_count(pid) for pid in pids}


async def fds_settle(pids: list[int], baseline: dict[int, int], timeout: float = 10.0
                     ) -> dict[int, int]:
    """Wait (bounded) until every process of `pids` has its `baseline` descriptor count again
    (connections closing take a moment); the counts at the end, for the test to assert."""
    deadline = time.monotonic() + timeout
    while True:
        now = fd_counts(pids)
        if now == baseline or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.05)
