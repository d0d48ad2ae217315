"""Managed servers: processes foobar_lb starts, watches and restarts.

Rules of this module:
- a server with a `command` is started by the load balancer, in its own session (a Ctrl-C in a
  terminal reaches the load balancer only, which stops its servers in order) and with a parent
  death signal, so no server outlives a load balancer that dies;
- a server that exits is marked down at once (not after `fall` checks) and restarted after a
  backoff that doubles from 0.5s to 30s and starts over once a run lasted 10s; its checks bring
  it back into rotation;
- stopping sends SIGTERM, waits, then SIGKILL: nothing is left running.
It never imports the servers it runs: they are command lines.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .servers import Server, State

if TYPE_CHECKING:
    from .backend import Backend

__all__ = ["Supervisor", "expand_command"]

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


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


class Supervisor:
    """Runs one managed server's process for as long as the load balancer runs."""

    def __init__(self, backend: Backend, server: Server, argv: list[str],
                 env: dict[str, str] | None = None):
        self.backend = backend
        self.server = server
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        self.proc: asyncio.subprocess.Process | None = None
        self.task: asyncio.Task | None = None
        self.stopping = False
        self.starts = 0

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
                    start_new_session=True, preexec_fn=_die_with_parent)
            except OSError as e:
                log.error("cannot start %s: %s: %s", name, self.argv[0], e.strerror or e)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
                continue
            self.starts += 1
            log.info("started %s (pid %d): %s", name, self.proc.pid, " ".join(self.argv))
            rc = await self.proc.wait()
            if self.stopping:
                return
            ran = loop.time() - t0
            if ran >= STABLE_AFTER:
                backoff = BACKOFF_FIRST
            self.server.health = 0
            self.backend.set_state(self.server, State.DOWN,
                                   f"process {self.proc.pid} exited ({describe_exit(rc)})")
            log.warning("restarting %s in %.1fs", name, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

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
