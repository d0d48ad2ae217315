"""The load balancer as a library: everything in one process, for tests and embedding.

Rule of this module: `LoadBalancer` wires the same pieces the master and its workers use
(build, listeners, admission, the state machine, checks, managed servers, `worker.Serving`)
into one process and one event loop; it adds no behaviour of its own. Worker processes,
reload and signals belong to `master.py`.

    lb = LoadBalancer("foobar.toml")        # or a Config, or a dict shaped like the file
    await lb.start()                        # inside a running loop; binds every frontend
    host, port = lb.address                 # port 0 in the config: the kernel's choice
    ...
    await lb.stop()                         # stop accepting, let requests finish, close
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from .admission import Admission, fit_fd_limit
from .alerts import Alerts
from .backend import Backend
from .balancing import algorithm_names
from .build import build
from .checks import Checks
from .config import Config, config_from_dict, load_config
from .frontend import Frontend
from .limits import ClientTable
from .listeners import ListenError, bind_config, check_managed_ports
from .managed import Supervisor, expand_command, uses_data_dir
from .servers import Server, State
from .serving import Serving
from .shared import Counters, Layout, LocalSlots
from .state import StateChange, StateMachine

__all__ = ["ListenError", "LoadBalancer", "StateChange", "new_event_loop"]

log = logging.getLogger("foobar_lb")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed, asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoadBalancer:
    """foobar_lb as a library: build it from a configuration, start it inside a running loop."""

    def __init__(self, config: Config | Mapping[str, Any] | str | os.PathLike[str],
                 data_dir: str | os.PathLike[str] | None = None):
        if isinstance(config, Config):
            self.config = config
        elif isinstance(config, Mapping):
            self.config = config_from_dict(config, None, algorithm_names())
        elif isinstance(config, (str, Path, os.PathLike)):
            self.config = load_config(config, algorithm_names())
        else:
            raise TypeError("LoadBalancer() takes a Config, a dict or a path to a TOML file")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.backends: dict[str, Backend] = {}
        self.frontends: dict[str, Frontend] = {}
        self.addresses: dict[str, list[tuple[str, int]]] = {}
        self.machine = StateMachine()
        self.events: deque[StateChange] = self.machine.events  # state changes, newest last
        self.checks = Checks(self.machine.check_result)
        self.alerts = Alerts(self.config.alerts)  # [alerts]: events to webhooks / a command
        self.alerts.attach(self.machine, self.checks)
        self.machine.hooks.append(lambda be, server, change: self.checks.wake(server))
        self.serving: Serving | None = None
        self.tasks: set[asyncio.Task] = set()  # checks and managed servers (kept referenced)
        self.started = False
        self.data_dir = data_dir  # overrides global.data_dir ({data_dir} in managed commands)
        self.supervisors: dict[str, Supervisor] = {}  # "backend/server" -> its process
        self.counters = Counters()
        self.layout = Layout()

    # -- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        if self.started:
            raise RuntimeError("this LoadBalancer is already started")
        self.loop = loop = asyncio.get_running_loop()
        cfg = self.config
        # bind first: a port that is taken is reported before anything else starts
        socks = bind_config(cfg, cfg.settings.listen_backlog)
        try:
            check_managed_ports(cfg)
        except BaseException:
            for sock in socks.values():
                sock.close()
            raise
        built = build(cfg, layout=self.layout, counters=self.counters, observer=self.machine)
        self.backends = built.backends
        self.frontends = built.frontends
        clients = ClientTable(cfg.settings.limit_table_size, cfg.settings.ipv6_prefix,
                              private=True)  # per-client limits: the same table, private
        self.serving = Serving(loop, built, Admission(loop, LocalSlots(cfg.settings.maxconn),
                                                      clients))
        self.started = True
        self.alerts.start()
        fd_limit = fit_fd_limit(cfg.settings.maxconn, cfg.settings.max_open_files)
        for be in self.backends.values():
            self.checks.start(be, self.spawn)
        self._start_managed()
        if self.supervisors:
            try:
                await self._wait_managed(cfg.settings.startup_timeout)
            except asyncio.CancelledError:
                for sock in socks.values():
                    sock.close()
                await self.stop(grace=0)
                raise
        # accept only now: clients that connected meanwhile waited in the listen backlog
        try:
            await self.serving.listen(socks, cfg.settings.listen_backlog, fd_limit)
        except BaseException:
            await self.stop(grace=0)
            raise
        self.addresses = self.serving.addresses
        for name, fe in self.frontends.items():
            log.debug("frontend %s (%s) listening on %s", name, fe.mode,
                      ", ".join(_fmt(a) for a in self.addresses[name]))

    def _start_managed(self) -> None:
        data_dir = Path(self.data_dir or self.config.settings.data_dir).resolve()
        for be in self.backends.values():
            for server, scfg in zip(be.servers, be.cfg.servers, strict=True):
                if not scfg.command:
                    continue
                if uses_data_dir(scfg.command):
                    data_dir.mkdir(parents=True, exist_ok=True)
                argv = expand_command(scfg.command, be.name, server, data_dir)
                sup = Supervisor(be, server, argv, dict(scfg.env),
                                 on_exit=self.machine.process_exited)
                self.supervisors[f"{be.name}/{server.name}"] = sup
                sup.start(self.spawn)

    async def _wait_managed(self, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        waiting = [sup.server for sup in self.supervisors.values()]
        while any(s.state is not State.UP for s in waiting):
            if self.loop.time() > deadline:
                late = ", ".join(f"{s.backend}/{s.name} ({s.check_status or 'no answer'})"
                                 for s in waiting if s.state is not State.UP)
                log.warning("not ready: not up after %gs: %s", timeout, late)
                return
            await asyncio.sleep(0.05)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        """Run a background task (a check, a managed server) and keep it referenced."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    @property
    def sessions(self) -> set[Any]:
        """Client connections being served."""
        return self.serving.sessions if self.serving is not None else set()

    @property
    def parked(self) -> deque[Any]:
        """Client connections accepted beyond global maxconn, not read yet."""
        return self.serving.admission.parked if self.serving is not None else deque()

    def on_state_change(self, callback: Callable[[StateChange], None]) -> None:
        """Call `callback(change)` after every server state change (see `events`)."""
        self.machine.listeners.append(callback)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let requests in flight finish (up to `grace` seconds), close."""
        if not self.started:
            return
        self.started = False
        if grace is None:
            grace = self.config.settings.grace
        serving = self.serving
        self.alerts.pause()  # servers stopped on purpose are no news
        await serving.stop()
        self.checks.stop()
        cut, requests = await serving.finish(self.loop.time() + grace)
        if cut:
            log.warning("the grace period ended: cut %d request%s in flight and %d connection%s",
                        requests, "" if requests == 1 else "s", cut, "" if cut == 1 else "s")
        # the servers we run go last, once nothing is sent to them any more
        await asyncio.gather(*(sup.stop() for sup in self.supervisors.values()))
        await self.alerts.close()
        for task in list(self.tasks):
            task.cancel()
        serving.close()
        await asyncio.sleep(0)

    async def __aenter__(self) -> LoadBalancer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- looking around ---------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        """The first bound address of the first frontend."""
        for bound in self.addresses.values():
            if bound:
                return bound[0]
        raise RuntimeError("the load balancer is not started")

    def url(self, frontend: str | None = None) -> str:
        host, port = self.addresses[frontend][0] if frontend else self.address
        return f"http://{_fmt((host, port))}"

    def server(self, backend: str, name: str) -> Server:
        return self.backends[backend].by_name[name]


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
