"""Managed servers: processes foobar_lb starts, watches and restarts.

Rules of this module:
- a server with a `command` is started by the load balancer, in its own session (a Ctrl-C in a
  terminal reaches the load balancer only, which stops its servers in order) and with a parent
  death signal, so no server outlives a load balancer that dies;
- a server that exits is marked down at once (not after `fall` checks) and restarted after a
  backoff that doubles from 0.5s to 30s and starts over once a run lasted 10s; its checks bring
  it back into rotation;
- its output goes through the load balancer (so a closed terminal or pipe cannot crash it), and
  the last lines of its stderr are kept: a server that exits 3 times before its first passing
  check is a fatal start-up error that shows them;
- stopping sends SIGTERM, waits, then SIGKILL: nothing is left running.
It never imports the servers it runs (they are command lines) and never decides a state: an
exit is reported (`on_exit`) to the state machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .servers import Server, State

__all__ = ["Supervisor", "expand_command", "missing_program", "unrunnable", "uses_data_dir"]

log = logging.getLogger("foobar_lb.managed")

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no parent death signal
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def expand_command(command: tuple[str, ...], backend: str, server: Server,
                   data_dir: Path) -> list[str]:
    values = {
        "python": sys.executable,
        "data_dir": str(data_dir),
        "name": server.name,
        "address": server.address,
        "host": server.host,
        "port": str(server.port),
        "backend": backend,
    }
    return [arg.format(**values) for arg in command]


def uses_data_dir(command: tuple[str, ...]) -> bool:
    return any("{data_dir}" in arg for arg in command)


def missing_program(argv0: str) -> str | None:
    """Why the program `argv0` cannot be run, or None when it can."""
    if os.sep in argv0:
        if not os.path.isfile(argv0):
            return "no such file"
        if not os.access(argv0, os.X_OK):
            return "not executable"
        return None
    return None if shutil.which(argv0) else "not found on PATH"


def unrunnable(config) -> str | None:
    """The first managed server whose program cannot be run, as a one-line error naming its
    key path, or None."""
    for bname, bcfg in config.backends.items():
        for i, scfg in enumerate(bcfg.servers):
            if scfg.command:
                argv0 = scfg.command[0].replace("{python}", sys.executable)
                why = missing_program(argv0)
                if why:
                    return (f"{config.source or 'command line'}: backends.{bname}.servers[{i}]"
                            f".command: cannot run \"{argv0}\": {why}")
    return None


def _write(stream, line: bytes) -> None:
    """Pass a line of a managed server's output on; a closed stream drops it."""
    with contextlib.suppress(OSError, ValueError):
        stream.buffer.write(line)
        stream.buffer.flush()


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


class Supervisor:
    """Runs one managed server's process for as long as the load balancer runs."""

    def __init__(self, backend: Any, server: Server, argv: list[str],
                 env: dict[str, str] | None = None,
                 on_exit: Callable[[Any, Server, str], None] | None = None,
                 on_fatal: Callable[[Supervisor, str], None] | None = None):
        self.backend = backend
        self.server = server
        self.argv = argv
        self.env_extra = dict(env or {})
        self.env = {**os.environ, **self.env_extra}
        self.proc: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task | None = None
        self.stopping = False
        self.starts = 0
        self.on_exit = on_exit  # (backend, server, why): the state machine's process_exited
        self.on_fatal = on_fatal  # (supervisor, why): exited 3 times before it was ever up
        self.early_exits = 0  # exits before its first passing check
        self.ever_up = False
        self.stderr_tail: deque[str] = deque(maxlen=10)
        self.pipes: list[asyncio.Task] = []

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    def start(self, spawn) -> None:
        self.task = spawn(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        backoff = BACKOFF_FIRST
        name = f"{self.backend.name}/{self.server.name}"
        while not self.stopping:
            t0 = loop.time()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.argv, env=self.env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    start_new_session=True, preexec_fn=_die_with_parent)
            except OSError as e:
                log.error("cannot start %s: %s: %s", name, self.argv[0], e.strerror or e)
                self._early_exit(f"cannot start {self.argv[0]}: {e.strerror or e}")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self.starts += 1
            log.info("started %s (pid %d): %s", name, self.proc.pid, " ".join(self.argv))
            self.pipes = [asyncio.ensure_future(self._pipe(self.proc.stdout, sys.stdout, False)),
                          asyncio.ensure_future(self._pipe(self.proc.stderr, sys.stderr, True))]
            rc = await self.proc.wait()
            if self.stopping:
                return
            ran = loop.time() - t0
            if ran >= STABLE_AFTER:
                backoff = BACKOFF_FIRST
            why = f"process {self.proc.pid} exited ({describe_exit(rc)})"
            self.ever_up = self.ever_up or self.server.state is State.UP
            if self.on_exit is not None:  # down at once
                self.on_exit(self.backend, self.server, why)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # the last lines it wrote, for a fatal report
                    await asyncio.gather(*self.pipes, return_exceptions=True)
            if self._early_exit(why):
                return
            log.warning("restarting %s in %.1fs", name, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    def _early_exit(self, why: str) -> bool:
        """Count an exit before the server was ever up; True when that was the third."""
        self.ever_up = self.ever_up or self.server.state is State.UP
        if self.ever_up:
            return False
        self.early_exits += 1
        if self.early_exits >= 3 and self.on_fatal is not None:
            self.on_fatal(self, why)
            return True
        return False

    async def _pipe(self, src: asyncio.StreamReader, dst, keep: bool) -> None:
        while True:
            try:
                line = await src.readline()
            except (ValueError, asyncio.LimitOverrunError):
                line = await src.read(65536)
            if not line:
                return
            if keep:
                self.stderr_tail.append(line.decode("utf-8", "replace").rstrip())
            _write(dst, line)

    async def stop(self, timeout: float = 5.0) -> None:
        self.stopping = True
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        proc = self.proc  # started while we were stopping
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
