"""The master process: configuration, listening sockets, server states, workers, reload, stop.

Rules of this module:
- the master binds every listening socket (one socket per address, shared by all workers, kept
  open for as long as its address is configured, so no connection waiting in an accept queue
  is ever dropped by a reload or a change in the number of workers) and never proxies;
- it runs the health checks, the managed servers and the one state machine, and pushes every
  state change to every worker at once (workers never poll); what workers observe on live
  traffic comes back to it as events;
- group-wide limits (server and global `maxconn`) are semaphores in memory it shares with the
  workers; counters are per-worker memory it sums when read and folds in when a worker ends;
- the runtime API's changes (admin states, weights, servers added and removed: `adminapi.py`
  asks, the methods under "run-time changes" decide) are pushed to every worker like state
  changes, and new workers are built from the master's current view, so a crash replacement
  or a reload's workers start with them; a reload keeps servers added at run time that the
  file does not name, and every admin state;
- reload (SIGHUP or the control socket): validate the file, bind what is new, start new
  workers and wait until they serve, then tell the old ones to drain; a bad file or a failed
  start changes nothing. A worker that dies is replaced at once. Stop (SIGTERM, SIGINT): every
  worker stops accepting and finishes its requests within `grace`; a second signal cuts them;
  managed servers stop last.
It holds no balancing or protocol logic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .alerts import Alerts
from .alerts import unrunnable as alerts_unrunnable
from .balancing import algorithm_names
from .build import Built, build, prepare_server
from .channel import Channel, encode
from .checks import Checks
from .config import (
    Address,
    BackendConfig,
    CheckConfig,
    Config,
    ConfigError,
    ServerConfig,
    load_config,
)
from .limits import ClientTable
from .listeners import ListenError, bind_config, check_managed_ports, key_of
from .managed import Supervisor, expand_command, unrunnable, uses_data_dir
from .metrics import CheckInfo, RateMeter, fill_stats
from .servers import Admin, Server, State
from .shared import (
    COUNTER_BYTES,
    F_1XX,
    F_CLIENT_REFUSED,
    F_CONNECTIONS,
    F_DENIED,
    F_LOG_DROPPED,
    F_RATE_LIMITED,
    S_FAILURES,
    S_REQUESTS,
    Counters,
    Layout,
    Region,
    SemTable,
)
from .state import StateMachine
from .tls import check_config as check_tls

if TYPE_CHECKING:
    from .admin import AdminServer

__all__ = ["ChangeError", "Master", "StartError", "control_path", "say"]

log = logging.getLogger("foobar_lb")
PROG = "foobar-lb"
READY_TIMEOUT = 30.0  # new workers must say "ready" within this


class StartError(Exception):
    """A mistake found at start-up (exit status 2, one message)."""


class ChangeError(Exception):
    """A run-time change that cannot be made: `kind` is "unknown" (no such backend or
    server), "conflict" (the name is taken, or being removed) or "invalid"."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message


def say(text: str) -> None:
    """Print to stdout; a closed stdout (a pipe whose reader left) loses the line, nothing else."""
    try:
        print(text, flush=True)
    except (OSError, ValueError):
        with contextlib.suppress(OSError):  # and Python's exit does not trip over it again
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115


def control_path(pid_file: str | os.PathLike[str]) -> Path:
    """The control socket lives beside the pid file: the same name with `.sock`."""
    p = Path(pid_file)
    return p.with_name(p.stem + ".sock") if p.suffix else p.with_name(p.name + ".sock")


class WorkerProc:
    __slots__ = ("channel", "counters", "gen", "held", "id", "pid", "proc", "ready", "started",
                 "status")

    def __init__(self, wid: int, gen: int):
        self.id = wid
        self.gen = gen
        self.proc: asyncio.subprocess.Process | None = None
        self.pid = 0
        self.channel: Channel | None = None
        self.counters: Counters | None = None
        self.held: Region | None = None  # its connections per client (limits.ClientTable)
        self.ready: asyncio.Future | None = None
        self.status = "starting"  # starting, serving, draining, stopping
        self.started = time.monotonic()


class Master:
    def __init__(self, config: Config, *, data_dir: str | None = None,
                 pid_file: str | None = None, workers: int | None = None):
        self.config = config
        self.data_dir = data_dir
        self.pid_file = Path(pid_file) if pid_file else None
        self.workers_override = workers
        self.loop: asyncio.AbstractEventLoop | None = None
        self.socks: dict[tuple, socket.socket] = {}
        self.sems = SemTable()
        # per-client limits: one table for the master's lifetime, so reloads keep the state
        self.clients = ClientTable(config.settings.limit_table_size, config.settings.ipv6_prefix)
        self.layout = Layout()
        self.own = Counters()  # the master's Server objects count nothing; cells for its build
        self.retired: list[int] = []  # counters of workers that ended, summed (gauges left out)
        self.check_info: dict[tuple[str, str], CheckInfo] = {}  # checks' results, by server
        self.rate_meter = RateMeter()  # request rates for stats()
        self.workers: list[WorkerProc] = []
        self.next_id = 1
        self.gen = 0
        self.reloads = 0
        self.sm = StateMachine()
        self.sm.hooks.append(self._on_change)
        self.checks = Checks(self._on_check)
        self.alerts = Alerts(config.alerts)  # events to webhooks / a command (alerts.py)
        self.alerts.attach(self.sm, self.checks)
        self.built: Built | None = None
        self.supervisors: dict[str, Supervisor] = {}
        self.tasks: set[asyncio.Task] = set()
        self.stopping: asyncio.Event | None = None
        self.signals = 0
        self.fatal: str | None = None
        self.ready_said = False
        self.started_at = time.time()
        self._reload_lock: asyncio.Lock | None = None
        self._control: asyncio.AbstractServer | None = None
        self.admin: AdminServer | None = None  # the admin listener ([admin] bind)
        self.ids: tuple[int, int] | None = None  # (uid, gid) the workers switch to
        self.young_deaths = 0  # workers in a row that died within a second of their start
        self._init_runtime_changes()

    # -- start --------------------------------------------------------------------------------
    async def run(self) -> int:
        """The master's whole life: start, serve until a stop signal, stop. Raises StartError
        or ListenError for mistakes found at start-up (before anything is left running)."""
        self.loop = loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        cfg = self.config
        self._check_programs(cfg)
        check_managed_ports(cfg, self._managed_running)
        self.socks = bind_config(cfg, cfg.settings.listen_backlog)
        try:
            self.alerts.start()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_stop_signal, sig)
            loop.add_signal_handler(signal.SIGHUP, self._on_hup)
            loop.add_signal_handler(signal.SIGUSR1, self._on_usr1)
            if self.pid_file is not None:
                self.pid_file.write_text(f"{os.getpid()}\n")
                await self._start_control()
            self.ids = _resolve_ids(cfg)  # workers run as global.user/group
            self.built = self._build(cfg, None)
            await self._start_admin(cfg)  # (/ready says "starting" until the workers serve)
            for be in self.built.backends.values():
                self.checks.start(be, self.spawn)
            self._start_managed(self.built)
            if self.supervisors:
                await self._wait_managed(cfg.settings.startup_timeout)
            if self.fatal is not None:
                raise StartError(self.fatal)
            if not self.stopping.is_set():
                await self._start_generation(cfg)
        except BaseException:
            await self._cleanup(grace=0)
            raise
        if not self.stopping.is_set():
            self._banner()
            await self.stopping.wait()
        await self._stop()
        return 0

    def _check_programs(self, cfg: Config) -> None:
        why = unrunnable(cfg) or check_tls(cfg) or alerts_unrunnable(cfg)  # (on every reload)
        if why:
            raise StartError(why)

    def _managed_running(self, backend: str, server: str) -> bool:
        sup = self.supervisors.get(f"{backend}/{server}")
        return sup is not None and not sup.stopping

    def _build(self, cfg: Config, previous: Built | None) -> Built:
        sems = self.sems
        sems.slots(("maxconn",), cfg.settings.maxconn)
        cfg = self._with_runtime_servers(cfg)
        built = build(cfg, previous, layout=self.layout, counters=self.own, observer=self.sm)
        for be in built.backends.values():
            for s in be.servers:
                if s.maxconn:
                    sems.slots((be.name, s.name), s.maxconn)
        return built

    def spawn(self, coro) -> asyncio.Task:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- managed servers ----------------------------------------------------------------------
    def _start_managed(self, built: Built) -> None:
        cfg = built.config
        data_dir = Path(self.data_dir or cfg.settings.data_dir).resolve()
        for be in built.backends.values():
            for server, scfg in zip(be.servers, be.cfg.servers, strict=True):
                if not scfg.command:
                    continue
                key = f"{be.name}/{server.name}"
                argv = expand_command(scfg.command, be.name, server, data_dir)
                sup = self.supervisors.get(key)
                if sup is not None and not sup.stopping and sup.argv == argv \
                        and sup.env_extra == dict(scfg.env):
                    sup.backend, sup.server = be, server  # kept running across the reload
                    continue
                if sup is not None:
                    self.spawn(sup.stop())
                if uses_data_dir(scfg.command):
                    data_dir.mkdir(parents=True, exist_ok=True)
                sup = Supervisor(be, server, argv, dict(scfg.env), on_exit=self.sm.process_exited,
                                 on_fatal=self._managed_fatal)
                self.supervisors[key] = sup
                sup.start(self.spawn)

    def _managed_fatal(self, sup: Supervisor, why: str) -> None:
        tail = "\n".join(f"  {line}" for line in sup.stderr_tail)
        msg = (f"managed server {sup.backend.name}/{sup.server.name} exited 3 times before its "
               f"first passing check (last: {why})")
        msg += f"; the last lines of its stderr:\n{tail}" if tail else "; it wrote nothing to stderr"
        if self.gen == 0:  # still starting: a fatal start-up error
            self.fatal = msg
        else:
            log.error("%s; restarting it anyway", msg)
            sup.early_exits = -10**9  # no further fatal reports
            sup.start(self.spawn)

    async def _wait_managed(self, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        waiting = [sup.server for sup in self.supervisors.values()]
        while any(s.state is not State.UP for s in waiting):
            if self.fatal is not None or self.stopping.is_set():
                return
            if self.loop.time() > deadline:
                return
            await asyncio.sleep(0.05)

    # -- workers ------------------------------------------------------------------------------
    def _worker_count(self, cfg: Config) -> int:
        return self.workers_override or cfg.settings.worker_count

    async def _start_generation(self, cfg: Config) -> list[WorkerProc]:
        """Start the workers of a new generation and wait until each serves."""
        self.gen += 1
        new = []
        try:
            for _ in range(self._worker_count(cfg)):
                new.append(await self._spawn_worker(cfg, self.gen))
        except OSError as e:
            for w in new:
                self._kill(w)
            self.gen -= 1
            raise StartError(f"cannot start a worker: {e.strerror or e}") from None
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                for w in new:
                    await w.ready
        except BaseException as e:
            for w in new:
                self._kill(w)
            self.gen -= 1
            if isinstance(e, TimeoutError):
                raise StartError(f"workers did not start within {READY_TIMEOUT:g}s") from None
            if isinstance(e, EOFError):
                raise StartError(f"a worker failed to start: {e}") from None
            raise
        for w in new:
            w.status = "serving"
        return new

    async def _spawn_worker(self, cfg: Config, gen: int) -> WorkerProc:
        w = WorkerProc(self.next_id, gen)
        self.next_id += 1
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        w.counters = Counters(Region(COUNTER_BYTES))
        w.held = Region(self.clients.held_bytes())
        # only the sockets of its configuration: a socket a worker held on to would stay open
        socks = {key_of(name, i, a): self.socks[key_of(name, i, a)]
                 for name, f in cfg.frontends.items() for i, a in enumerate(f.bind)}
        fds = [child.fileno(), self.sems.region.fd, w.counters.region.fd, self.clients.region.fd,
               w.held.fd,
               *(s.fileno() for s in socks.values())]
        try:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "foobar_lb.worker", str(child.fileno()), pass_fds=fds,
                stdin=asyncio.subprocess.DEVNULL)
        finally:
            child.close()
        w.pid = w.proc.pid
        w.ready = self.loop.create_future()
        w.channel = Channel(lambda msg, w=w: self._on_worker_message(w, msg),
                            lambda w=w: w.ready.done() or w.ready.set_exception(
                                EOFError(f"worker {w.id} (pid {w.pid}) exited")))
        await self.loop.create_unix_connection(lambda: w.channel, sock=parent)
        # from here on no await until it is in self.workers: its first message is the state
        # of now (servers, states, admin states, weights), every later change is broadcast
        states = {(be.name, s.name): (s.state.value, s.health, s.admin.value)
                  for be in self.built.backends.values() for s in be.servers}
        init = {
            "id": w.id,
            "master_pid": os.getpid(),
            "log_level": logging.getLevelName(logging.getLogger().level),
            "config": self._worker_config(cfg),
            "sems_fd": self.sems.region.fd,
            "sems": self.sems.index,
            "counters_fd": w.counters.region.fd,
            "clients_fd": self.clients.region.fd,
            "held_fd": w.held.fd,
            "layout": self.layout.offsets,
            "cells": self.layout.cells,
            "states": states,
            "sockets": {key: s.fileno() for key, s in socks.items()},
            "backlog": cfg.settings.listen_backlog,
            "ids": self.ids,
        }
        w.channel.send(init)
        self.workers.append(w)
        self.spawn(self._watch(w))
        log.debug("started worker %d (pid %d)", w.id, w.pid)
        return w

    def _on_worker_message(self, w: WorkerProc, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            if not w.ready.done():
                w.ready.set_result(True)
            return
        if kind == "removed":
            self._removed_by(w, msg)
            return
        be = self.built.backends.get(msg[1])
        server = be.by_name.get(msg[2]) if be is not None else None
        if server is None:
            return  # a server that a reload removed meanwhile
        if kind == "error":
            server.failures += 1
            self.sm.observed_error(be, server, msg[3], msg[4])
        elif kind == "ok":
            self.sm.observed_ok(be, server)

    async def _watch(self, w: WorkerProc) -> None:
        rc = await w.proc.wait()
        self._fold(w)
        if w.held is not None:  # connections it never gave back (killed): off the table
            self.clients.forget(w.held)
            w.held.close()
            w.held = None
        if w in self.workers:
            self.workers.remove(w)
        if w.channel is not None:
            w.channel.close()
        if w.status == "serving" and not self.stopping.is_set():
            from .managed import describe_exit

            log.error("worker %d (pid %d) died (%s); starting a new one", w.id, w.pid,
                      describe_exit(rc))
            if time.monotonic() - w.started < 1.0:
                # it died young: replace it at once the first time, then back off (0.5s, 1s,
                # 2s, ... 30s) so that a worker that cannot live does not spin
                self.young_deaths += 1
                if self.young_deaths > 1:
                    await asyncio.sleep(min(0.5 * 2 ** (self.young_deaths - 2), 30.0))
            else:
                self.young_deaths = 0
            if self.stopping.is_set() or w.gen != self.gen:
                return
            try:
                nw = await self._spawn_worker(self.config, self.gen)
                async with asyncio.timeout(READY_TIMEOUT):
                    await nw.ready
                nw.status = "serving"
                log.info("worker %d (pid %d) replaces worker %d", nw.id, nw.pid, w.id)
            except (TimeoutError, EOFError, OSError) as e:
                log.error("could not replace worker %d: %s", w.id, e)
        else:
            log.debug("worker %d (pid %d) finished (%s)", w.id, w.pid, rc)

    def _fold(self, w: WorkerProc) -> None:
        """A worker ended: its counters join the totals of the ended ones."""
        if w.counters is None:
            return
        n = self.layout.cells
        cells = w.counters.cells[:n].tolist()
        for g in self.layout.gauges:  # what was open in it is gone with it
            if g < n:
                cells[g] = 0
        for taken, given in self.layout.pairs:
            if given < n:
                cells[given] = cells[taken]
        retired = self.retired + [0] * (n - len(self.retired))
        self.retired = [a + b for a, b in zip(retired, cells, strict=True)]
        w.counters.close()
        w.counters = None

    def _kill(self, w: WorkerProc) -> None:
        if w.proc is not None and w.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                w.proc.kill()

    def _broadcast(self, msg: tuple) -> None:
        data = encode(msg)
        for w in self.workers:
            if w.channel is not None and w.channel.transport is not None:
                w.channel.transport.write(data)

    # -- server states ------------------------------------------------------------------------
    def _on_check(self, be, server, ok: bool, detail: str, took: float) -> None:
        self._record_check(be.name, server.name, ok, took)
        self.sm.check_result(be, server, ok, detail, took)

    def _record_check(self, backend: str, server: str, ok: bool, took: float) -> None:
        """A check's result and duration, for the stats and /metrics (kept across reloads)."""
        info = self.check_info.get((backend, server))
        if info is None:
            info = self.check_info[(backend, server)] = CheckInfo()
        info.record(ok, took)

    def _on_change(self, be, server, change) -> None:
        self.checks.wake(server)
        self._broadcast(("state", be.name, server.name, change.new.value, server.health))
        if change.new is State.UP:
            sup = self.supervisors.get(f"{be.name}/{server.name}")
            if sup is not None:
                sup.ever_up = True
            if self.gen and not self.ready_said and not self.stopping.is_set() and (
                    not self._not_ready()):
                self._say_ready()

    def _not_ready(self) -> list[str]:
        """Why a frontend cannot serve yet: its default backend has no server up."""
        out = []
        for fe in self.built.frontends.values():
            be = fe.default
            if be is not None and not be.balancer.any_up():
                why = "; ".join(f"{s.name}: {_not_usable(s)}" for s in be.servers[:5])
                out.append(f"frontend {fe.name}: backend {be.name} has no server up ({why})")
        return out

    def _on_usr1(self) -> None:
        """Log rotation: every worker opens its access log file again (by its name)."""
        log.info("SIGUSR1: reopening the access log")
        self._broadcast(("reopen",))

    # -- reload ---------------------------------------------------------------------------------
    def _on_hup(self) -> None:
        self.spawn(self.reload())

    async def reload(self) -> tuple[bool, str]:
        async with self._reload_lock:
            if self.stopping.is_set():
                return False, "stopping"
            try:
                ok, msg = await self._reload()
            except Exception as e:  # a bug, not a user's mistake: keep serving, say it
                log.exception("reload failed")
                ok, msg = False, f"reload failed: {e}"
            if ok:
                log.info("reload: %s", msg)
            else:
                log.error("reload failed, still serving the previous configuration: %s", msg)
            return ok, msg

    async def _reload(self) -> tuple[bool, str]:
        old = self.config
        if old.source is None:
            new = old  # the quick form: nothing to re-read, fresh workers all the same
        else:
            try:
                new = load_config(old.source, algorithm_names())
            except ConfigError as e:
                return False, str(e)
        for key in ("user", "group", "limit_table_size"):
            if getattr(new.settings, key) != getattr(old.settings, key):
                return False, (f"{new.source}: global.{key}: cannot change on a reload "
                               f"(restart to change it)")
        try:
            self._check_programs(new)
            socks = bind_config(new, new.settings.listen_backlog, keep=self.socks)
        except (StartError, ListenError) as e:
            return False, (f"{new.source}: {e}" if isinstance(e, ListenError) else str(e))
        fresh = [s for k, s in socks.items() if self.socks.get(k) is not s]
        old_socks, self.socks = self.socks, {**self.socks, **socks}
        new_built = self._build(new, self.built)
        old_built, self.built = self.built, new_built
        try:
            started = await self._start_generation(new)
        except (StartError, OSError) as e:
            self.built = old_built
            self.socks = old_socks
            for s in fresh:
                s.close()
            return False, str(e)
        self.config = new
        self.socks = socks
        self.alerts.configure(new.alerts)
        old_workers = [w for w in self.workers if w.gen < self.gen and w.status != "draining"]
        for w in old_workers:
            w.status = "draining"
            w.channel.send(("drain", new.settings.hard_stop_after))
        for key, s in old_socks.items():
            if key not in socks:
                s.close()
        self.checks.stop()
        for be in new_built.backends.values():
            self.checks.start(be, self.spawn)
        kept = {f"{b.name}/{s.name}" for b in new_built.backends.values() for s, c in
                zip(b.servers, b.cfg.servers, strict=True) if c.command}
        self._start_managed(new_built)
        gone = [sup for key, sup in self.supervisors.items() if key not in kept]
        for sup in gone:
            del self.supervisors[f"{sup.backend.name}/{sup.server.name}"]
        if gone:  # removed managed servers stop once the old workers are done with them
            self.spawn(self._stop_after(old_workers, gone))
        self.reloads += 1
        why = await self._reload_admin(new)
        if why:
            log.error("reload: the admin listener: %s", why)
        return True, (f"serving {new.source or 'the command line configuration'} with "
                      f"{len(started)} workers (pids {', '.join(str(w.pid) for w in started)})")

    async def _stop_after(self, workers: list[WorkerProc], sups: list[Supervisor]) -> None:
        await asyncio.gather(*(w.proc.wait() for w in workers if w.proc is not None))
        await asyncio.gather(*(sup.stop() for sup in sups))

    # -- stop -----------------------------------------------------------------------------------
    def _on_stop_signal(self, signum: int) -> None:
        self.signals += 1
        if self.signals == 1:
            self.stopping.set()
            say(f"{PROG}: {signal.Signals(signum).name}: stopping, letting requests in flight "
                f"finish (up to {self.config.settings.grace:g}s; signal again to stop now)")
        else:
            self._broadcast(("abort",))
            for sup in self.supervisors.values():
                sup.stopping = True

    async def _stop(self) -> None:
        grace = self.config.settings.grace
        self.alerts.pause()  # servers stopped on purpose are no news
        self._broadcast(("stop", grace))
        for w in self.workers:
            w.status = "stopping"
        # our copies of the listening sockets go now: once the workers have taken what waits
        # in the accept queues and closed theirs, new connections are refused
        for s in self.socks.values():
            s.close()
        self.socks.clear()
        deadline = self.loop.time() + grace + 2.0
        while self.workers and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        await self._cleanup(grace)
        say(f"{PROG}: stopped")

    async def _cleanup(self, grace: float) -> None:
        if grace == 0:
            for w in list(self.workers):
                self._kill(w)
        for w in list(self.workers):
            if w.proc is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(2.0):
                        await w.proc.wait()
                self._kill(w)
        self.checks.stop()
        if self.admin is not None:
            await self.admin.close()
            self.admin = None
        # the servers we run go last, once nothing is sent to them any more
        await asyncio.gather(*(sup.stop() for sup in self.supervisors.values()))
        await self.alerts.close()
        for task in list(self.tasks):
            task.cancel()
        for s in self.socks.values():
            s.close()
        self.socks.clear()
        if self._control is not None:
            self._control.close()
            with contextlib.suppress(OSError):
                control_path(self.pid_file).unlink()
        if self.pid_file is not None:
            with contextlib.suppress(OSError):
                self.pid_file.unlink()
        await asyncio.sleep(0)

    # -- what the group has done ------------------------------------------------------------------
    def totals(self) -> list[int]:
        """Every counter of the group: the workers' cells summed (read without a lock: each
        cell is one aligned 64-bit word), plus those of workers that ended."""
        n = self.layout.cells
        out = self.retired + [0] * (n - len(self.retired))
        for w in self.workers:
            if w.counters is not None:
                out = [a + b for a, b in zip(out, w.counters.cells[:n].tolist(), strict=True)]
        return out

    def stats(self) -> dict[str, Any]:
        t = self.totals()
        lay = self.layout
        frontends = {}
        for name, fe in self.built.frontends.items():
            off = lay.frontend(name)
            frontends[name] = {
                "mode": fe.mode,
                "connections": t[off + F_CONNECTIONS],
                "denied": t[off + F_DENIED],
                "requests": sum(t[off + F_1XX + c] for c in range(5)),
                "responses": {f"{c}xx": t[off + F_1XX + c - 1] for c in range(1, 6)},
                "rate_limited": t[off + F_RATE_LIMITED],
                "client_refused": t[off + F_CLIENT_REFUSED],
                "log_dropped": t[off + F_LOG_DROPPED],
            }
        backends = {}
        for be in self.built.backends.values():
            servers = {}
            for s in be.servers:
                off = lay.server(be.name, s.name)
                entry = {"address": s.address, "state": s.state.value,
                         "requests": t[off + S_REQUESTS], "failures": t[off + S_FAILURES],
                         "check": {"status": s.check_status or None}, "weight": s.weight,
                         "backup": s.backup}
                if s.maxconn:
                    entry["maxconn"] = s.maxconn
                entry["admin"] = s.admin.value  # the operator's say (runtime API), apart from health
                servers[s.name] = entry
            backends[be.name] = {"servers": servers}
        out = {
            "pid": os.getpid(),
            "uptime": round(time.time() - self.started_at, 3),
            "reloads": self.reloads,
            "workers": [{"id": w.id, "pid": w.pid, "generation": w.gen, "status": w.status}
                        for w in self.workers],
            "frontends": frontends,
            "backends": backends,
            "alerts": self.alerts.stats(),
        }
        fill_stats(self, out, t)  # (metrics.py: the counters of issue 13, by the same names)
        return out

    # -- run-time changes (the runtime API: adminapi.py asks, these decide) ------------------
    # Rules: every change goes to this process's objects (the state machine's home) and to
    # every worker at once (messages "admin", "weight", "add", "remove"); new workers are
    # built from this view (`_worker_config`, admin states in their `states`); `added` holds
    # the servers added at run time, by backend, which every reload keeps (`_with_runtime_servers`)
    # unless the file names them; a restart starts from the file alone. Changes and reloads
    # take turns (the reload lock).
    def _init_runtime_changes(self) -> None:
        self.added: dict[str, dict[str, ServerConfig]] = {}
        self.removing: dict[tuple[str, str], set[int]] = {}  # -> ids of workers not done yet
        self.removed_left: dict[tuple[str, str], int] = {}  # requests still in flight when done
        self.sm.admin_hooks.append(self._on_admin_change)

    def find(self, backend: str, server: str | None = None) -> tuple[Any, Server | None]:
        """(backend, server) by name, or ChangeError("unknown") naming what is not there."""
        be = self.built.backends.get(backend) if self.built is not None else None
        if be is None:
            known = ", ".join(self.built.backends) if self.built is not None else ""
            raise ChangeError("unknown", f"no backend {backend!r} (backends: {known})")
        if server is None:
            return be, None
        srv = be.by_name.get(server)
        if srv is None:
            if (backend, server) in self.removing:
                raise ChangeError("unknown", f"server {backend}/{server} is being removed")
            known = ", ".join(be.by_name) or "none"
            raise ChangeError("unknown", f"backend {backend} has no server {server!r} "
                                         f"(servers: {known})")
        return be, srv

    def runtime_server(self, backend: str, server: str) -> bool:
        """Whether the server was added at run time (not named by the file)."""
        return server in self.added.get(backend, {})

    def _worker_config(self, cfg: Config) -> Config:
        """What a new worker is built from: the file's configuration with the backends as they
        are now (servers added or removed at run time, weights set)."""
        return replace(cfg, backends=MappingProxyType(
            {name: be.cfg for name, be in self.built.backends.items()}))

    def _with_runtime_servers(self, cfg: Config) -> Config:
        """`cfg` with the servers added at run time: the file wins for every server it names
        (the run-time one is dropped, with a log line), and the run-time ones follow its
        backend's check and TLS settings."""
        backends = dict(cfg.backends)
        for bname in list(self.added):
            b = backends.get(bname)
            added = self.added[bname]
            if b is None:
                log.warning("backend %s is gone from the configuration, and with it the servers "
                            "added at run time: %s", bname, ", ".join(added))
                del self.added[bname]
                continue
            named = {s.name: s for s in b.servers}
            for name in list(added):
                if name in named:
                    log.warning("server %s/%s: the configuration file names it now (%s): the "
                                "file's server replaces the one added at run time (%s)", bname,
                                name, named[name].address, added[name].address)
                    del added[name]
                else:
                    added[name] = replace(added[name], check=_runtime_check(b), tls=b.tls)
            if added:
                backends[bname] = replace(b, servers=(*b.servers, *added.values()))
            else:
                del self.added[bname]
        return replace(cfg, backends=MappingProxyType(backends))

    def _on_admin_change(self, be: Any, server: Server, old: Admin) -> None:
        self._broadcast(("admin", be.name, server.name, server.admin.value))

    async def set_admin(self, backend: str, server: str, admin: Admin,
                        why: str = "set by the admin API") -> Server:
        """ready, drain or maint. Maintenance pauses the server's checks; leaving it, the
        server is at the edge of up (one failed check puts it down, as HAProxy does) and is
        checked at once, before it goes back into rotation."""
        async with self._reload_lock:
            be, srv = self.find(backend, server)
            old = srv.admin
            if old is admin:
                return srv
            if admin is Admin.MAINT:
                self.checks.stop([srv])
            elif old is Admin.MAINT and srv.check is not None:
                if srv.state is State.UP:
                    srv.health = min(srv.health, srv.check.rise)
                await self._check_now(be, srv)
            if self.built.server(backend, server) is not srv:
                return srv  # removed meanwhile (by a reload)
            self.sm.set_admin(be, srv, admin, why)
            if old is Admin.MAINT:
                self.checks.start_one(be, srv, self.spawn)
            return srv

    async def set_weight(self, backend: str, server: str, weight: int) -> Server:
        async with self._reload_lock:
            be, srv = self.find(backend, server)
            old = srv.weight
            if old == weight:
                return srv
            be.apply_weight(srv, weight)
            added = self.added.get(backend, {})
            if server in added:
                added[server] = replace(added[server], weight=weight)
            log.warning("server %s/%s: weight %d -> %d (set by the admin API)", backend, server,
                        old, weight)
            self._broadcast(("weight", backend, server, weight))
            return srv

    async def add_server(self, backend: str, name: str, address: Address, weight: int = 1,
                         backup: bool = False) -> Server:
        """A new server, in every worker at once. When its backend has checks it starts down
        and its first check runs now: it takes traffic once `rise` checks have passed."""
        async with self._reload_lock:
            be, _ = self.find(backend)
            if (backend, name) in self.removing:
                raise ChangeError("conflict", f"server {backend}/{name} is being removed; add "
                                              "it again once it is gone")
            have = be.by_name.get(name)
            if have is not None:
                raise ChangeError("conflict", f"backend {backend} has a server {name!r} already "
                                              f"({have.address})")
            check = _runtime_check(be.cfg)
            cfg = ServerConfig(name=name, address=address, weight=weight, backup=backup,
                               check=check, tls=be.cfg.tls)
            srv = Server.from_config(cfg, backend=backend)
            prepare_server(srv, config=self.config, layout=self.layout, counters=self.own)
            if check is not None:
                srv.state = State.DOWN
                srv.health = 0
                srv.check_status = "not checked yet"
            srv.last_change = time.monotonic()
            be.add_server(srv, cfg)
            self.added.setdefault(backend, {})[name] = cfg
            # the layout goes with it: the worker finds this server's offsets there
            self._broadcast(("add", backend, cfg, dict(self.layout.offsets), self.layout.cells,
                             srv.state.value, srv.health, srv.admin.value))
            self.checks.start_one(be, srv, self.spawn, first=0.0)
            log.warning("server %s/%s added by the admin API: %s, weight %d%s; %s", backend, name,
                        srv.address, weight, " (backup)" if backup else "",
                        f"down until {check.rise} checks pass" if check is not None else
                        "up (its backend has no checks)")
            return srv

    async def remove_server(self, backend: str, name: str) -> tuple[int, int]:
        """Out of rotation in every worker at once; each worker forgets it once the requests
        it has in flight there are done (at most `hard_stop_after`). Returns when every worker
        is done: (workers that had to wait, requests still in flight at the end)."""
        async with self._reload_lock:
            be, srv = self.find(backend, name)
            be.remove_server(srv)
            self.checks.stop([srv])
            added = self.added.get(backend, {})
            added.pop(name, None)
            if not added:
                self.added.pop(backend, None)
            key = (backend, name)
            within = self.config.settings.hard_stop_after
            waiting = self.removing[key] = {w.id for w in self.workers if w.channel is not None}
            self.removed_left[key] = 0
            self._broadcast(("remove", backend, name, within))
            sup = self.supervisors.pop(f"{backend}/{name}", None)
            log.warning("server %s/%s removed by the admin API: out of rotation, gone once its "
                        "requests in flight are done", backend, name)
        n = len(waiting)
        deadline = self.loop.time() + within + 2.0
        try:
            while waiting and self.loop.time() < deadline:
                waiting &= {w.id for w in self.workers if w.proc is not None
                            and w.proc.returncode is None}
                await asyncio.sleep(0.02)
        finally:
            del self.removing[key]
            left = self.removed_left.pop(key, 0)
        if sup is not None:
            await sup.stop()
        log.info("server %s/%s is gone from every worker%s", backend, name,
                 f" ({left} requests were still in flight)" if left else "")
        return n, left

    def _removed_by(self, w: WorkerProc, msg: tuple) -> None:
        _, backend, name, left = msg
        key = (backend, name)
        waiting = self.removing.get(key)
        if waiting is not None:
            waiting.discard(w.id)
            self.removed_left[key] += left

    async def check_server(self, backend: str, name: str) -> tuple[bool, str, float, bool]:
        """One check of the server now: (passed, what it saw, seconds, counted). Its result
        counts like any check's; a server without a check gets a TCP connect that changes
        nothing (counted False)."""
        be, srv = self.find(backend, name)
        if srv.check is None:
            probe = Server(srv.name, srv.host, srv.port, check=CheckConfig(timeout=2.0))
            probe.ssl, probe.sni, probe.send_proxy = srv.ssl, srv.sni, srv.send_proxy
            t0 = self.loop.time()
            ok, detail = await self.checks.probe(probe)
            return ok, detail, self.loop.time() - t0, False
        ok, detail, took = await self._check_now(be, srv)
        return ok, detail, took, True

    async def _check_now(self, be: Any, srv: Server) -> tuple[bool, str, float]:
        t0 = self.loop.time()
        ok, detail = await self.checks.probe(srv)
        took = self.loop.time() - t0
        if self.built.server(be.name, srv.name) is srv:
            self._on_check(be, srv, ok, detail, took)
        return ok, detail, took

    # -- the control socket ---------------------------------------------------------------------
    async def _start_control(self) -> None:
        path = control_path(self.pid_file)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale one: our pid file is ours now
        self._control = await self.loop.create_unix_server(
            lambda: _Control(self), str(path))

    # -- the admin listener ---------------------------------------------------------------------
    async def _start_admin(self, cfg: Config) -> None:
        if cfg.admin is None:
            return
        from .admin import AdminServer  # (aiohttp: imported only when there is one)

        admin = AdminServer(self, cfg.admin)
        try:
            await admin.start()
        except OSError as e:
            raise StartError(f"{cfg.source or 'command line'}: {cfg.admin.path}.bind = "
                             f"\"{cfg.admin.bind}\": cannot listen: {e.strerror or e}") from None
        self.admin = admin

    async def _reload_admin(self, new: Config) -> str | None:
        """A reload's admin listener: kept when unchanged, else rebound (None: done; else why
        the new one could not listen, and the old one stays)."""
        old = self.admin
        if old is not None and new.admin is not None and new.admin.bind == old.cfg.bind:
            old.cfg = new.admin
            old.token = new.admin.token.encode() if new.admin.token else None
            return None
        if old is not None:
            await old.close()
            self.admin = None
        try:
            await self._start_admin(new)
        except StartError as e:
            if old is not None:  # back to the old one, if its address is still ours
                with contextlib.suppress(OSError, StartError):
                    await self._start_admin(replace(new, admin=old.cfg))
            return str(e)
        return None

    def not_ready_reasons(self) -> list[str]:
        """Why the group cannot serve now ([] when it can): `GET /ready`."""
        if self.stopping is not None and self.stopping.is_set():
            return ["stopping"]
        if self.built is None or not self.gen:
            return ["starting"]
        out = []
        current = [w for w in self.workers if w.gen == self.gen]
        if len(current) < self._worker_count(self.config):
            out.append(f"{len(current)} of {self._worker_count(self.config)} workers running")
        for w in current:
            if w.status != "serving":
                out.append(f"worker {w.id} (pid {w.pid}) is {w.status}")
        for name, f in self.config.frontends.items():
            for i, a in enumerate(f.bind):
                sock = self.socks.get(key_of(name, i, a))
                if sock is None or sock.fileno() < 0:
                    out.append(f"frontend {name}: not listening on {a}")
        return out + self._not_ready()

    # -- output -----------------------------------------------------------------------------------
    def _banner(self) -> None:
        out = []
        built = self.built
        for name, fe in built.frontends.items():
            where = ", ".join(_fmt(self.socks[key_of(name, i, a)].getsockname())
                              for i, a in enumerate(fe.cfg.bind))
            out.append(f"{PROG}: frontend {name} ({fe.mode}) listening on {where}")
        for name, be in built.backends.items():
            shown = [f"{s.name} {s.address}" + (" (backup)" if s.backup else "")
                     for s in be.servers]
            if len(shown) > 6:
                shown = [*shown[:4], f"and {len(shown) - 4} more"]
            out.append(f"{PROG}: backend {name} ({be.cfg.balance}, {len(be.servers)} servers): "
                       + ", ".join(shown))
        for key, sup in self.supervisors.items():
            out.append(f"{PROG}: app server {key} on http://{sup.server.address}/ "
                       f"(pid {sup.pid}, {sup.server.state}): {' '.join(sup.argv)}")
        if self.admin is not None:
            out.append(f"{PROG}: admin listener on {self.admin.url()} (stats page {self.admin.url()}"
                       f"stats, metrics {self.admin.url()}metrics)")
        if any(uses_data_dir(c.command) for b in built.config.backends.values()
               for c in b.servers):
            data_dir = Path(self.data_dir or built.config.settings.data_dir).resolve()
            out.append(f"{PROG}: data directory {data_dir}")
        n = len([w for w in self.workers if w.gen == self.gen])
        out.append(f"{PROG}: master pid {os.getpid()}, {n} worker{'s' if n != 1 else ''} "
                   f"(pids {', '.join(str(w.pid) for w in self.workers)})")
        say("\n".join(out))
        why = self._not_ready()
        if why:
            for line in why:
                log.warning("not ready: %s", line)
        else:
            self._say_ready()
        say(f"{PROG}: press Ctrl-C (or send SIGTERM) to stop; SIGHUP reloads the configuration")

    def _say_ready(self) -> None:
        self.ready_said = True
        lines = []
        for name, fe in self.built.frontends.items():
            scheme = ("https" if fe.cfg.tls is not None else "http") if fe.mode == "http" else (
                "tls" if fe.cfg.tls is not None else "tcp")
            for i, a in enumerate(fe.cfg.bind):
                host, port = self.socks[key_of(name, i, a)].getsockname()[:2]
                shown = f"[{host}]" if ":" in host else host
                lines.append(f"{PROG}: ready: {scheme}://{shown}:{port}/")
        say("\n".join(lines))


class _Control(asyncio.Protocol):
    """One client of the control socket: a JSON line in ({"cmd": "reload" | "stats" |
    "ping"}), a JSON line out."""

    def __init__(self, master: Master):
        self.master = master
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\n" not in self.buf:
            if len(self.buf) > 65536:
                self.transport.close()
            return
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            cmd = json.loads(line).get("cmd")
        except (ValueError, AttributeError):
            cmd = None
        self.master.spawn(self._answer(cmd))

    async def _answer(self, cmd: Any) -> None:
        m = self.master
        if cmd == "reload":
            ok, msg = await m.reload()
            reply = {"ok": ok, "message": msg}
        elif cmd == "stats":
            reply = {"ok": True, "stats": m.stats()}
        elif cmd == "ping":
            reply = {"ok": True, "message": "pong"}
        else:
            reply = {"ok": False, "message": f"unknown command {cmd!r}"}
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(json.dumps(reply).encode() + b"\n")
            self.transport.close()


def _not_usable(s: Server) -> str:
    """Why a server takes no traffic, in a word or a check's result."""
    if s.admin is not Admin.READY:
        return f"{s.admin.value} (set by the operator)"
    if s.weight == 0 and s.state is State.UP:
        return "weight 0"
    return s.check_status or str(s.state)


def _runtime_check(b: BackendConfig) -> CheckConfig | None:
    """The check of a server added at run time: its backend's `check`, else (checks set per
    server) the first checked server's, on the traffic port; None: no checks here."""
    if b.check is not None:
        return b.check
    for s in b.servers:
        if s.check is not None and not s.command:
            return replace(s.check, port=None)
    return None


def _resolve_ids(cfg: Config) -> tuple[int, int] | None:
    """The (uid, gid) of global.user/group, checked at start-up. The master itself keeps its
    privileges, as HAProxy's does, so that a reload can bind a new port below 1024; the
    workers, which face the clients, drop them once they have their sockets."""
    user, group = cfg.settings.user, cfg.settings.group
    if not user and not group:
        return None
    import grp
    import pwd

    src = cfg.source or "command line"
    try:
        pw = pwd.getpwnam(user) if user else pwd.getpwuid(os.geteuid())
    except KeyError:
        raise StartError(f"{src}: global.user = \"{user}\": no such user") from None
    try:
        gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    except KeyError:
        raise StartError(f"{src}: global.group = \"{group}\": no such group") from None
    if os.geteuid() != 0 and (pw.pw_uid, gid) != (os.geteuid(), os.getegid()):
        raise StartError(f"{src}: global.user/group: switching user needs root")
    return pw.pw_uid, gid


def _fmt(addr: tuple) -> str:
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def ask(pid_file: str, cmd: str, timeout: float = 35.0) -> dict[str, Any]:
    """Send one command to a running master's control socket (for the CLI)."""
    path = control_path(pid_file)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)

