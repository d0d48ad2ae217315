"""The running load balancer: event loop, listeners, sessions, graceful stop.

Rule of this module: it wires configuration to listeners and owns the process-level concerns
(which event loop, which sockets, when to stop); it holds no balancing or protocol logic.

    lb = LoadBalancer("foobar.toml")        # or a Config, or a dict shaped like the file
    await lb.start()                        # inside a running loop; binds every frontend
    host, port = lb.address                 # port 0 in the config: the kernel's choice
    ...
    await lb.stop()                         # stop accepting, let requests finish, close
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

from .backend import Backend, StateChange
from .config import Address, Config, config_from_dict, load_config
from .frontend import Frontend
from .managed import Supervisor, expand_command
from .proxy.http import HttpSession
from .proxy.tcp import TcpSession
from .servers import Server, State

__all__ = ["ListenError", "LoadBalancer", "new_event_loop"]

log = logging.getLogger("foobar_lb")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when it is installed, asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class ListenError(Exception):
    """A frontend address could not be bound; `path` is its key path in the configuration."""

    def __init__(self, path: str, address: Address, reason: str):
        self.path = path
        self.address = address
        self.reason = reason
        super().__init__(f"{path} = \"{address}\": cannot listen: {reason}")


def _bind(path: str, addr: Address, listen: bool = True) -> socket.socket:
    try:
        return _listen_socket(addr, backlog=1024, listen=listen)
    except OSError as e:
        reason = (e.strerror or str(e)).lower()
        if e.errno in (errno.EACCES, errno.EPERM):
            reason = "permission denied (ports below 1024 need privileges)"
        elif e.errno == errno.EADDRINUSE:
            reason = "address already in use"
        raise ListenError(path, addr, reason) from None


def _listen_socket(addr: Address, backlog: int, listen: bool = True) -> socket.socket:
    host = addr.host or "0.0.0.0"
    infos = socket.getaddrinfo(host, addr.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, socktype, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, socktype, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(sockaddr)
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class LoadBalancer:
    """foobar_lb as a library: build it from a configuration, start it inside a running loop."""

    def __init__(self, config: Config | Mapping[str, Any] | str | os.PathLike[str],
                 data_dir: str | os.PathLike[str] | None = None):
        if isinstance(config, Config):
            self.config = config
        elif isinstance(config, Mapping):
            self.config = config_from_dict(config)
        elif isinstance(config, (str, Path, os.PathLike)):
            self.config = load_config(config)
        else:
            raise TypeError("LoadBalancer() takes a Config, a dict or a path to a TOML file")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.backends: dict[str, Backend] = {}
        self.frontends: dict[str, Frontend] = {}
        self.addresses: dict[str, list[tuple[str, int]]] = {}
        self.sessions: set[Any] = set()  # client connections being served
        self.parked: deque[Any] = deque()  # accepted beyond global maxconn, not read yet
        self.tasks: set[asyncio.Task] = set()  # connects and checks (kept referenced)
        self.events: deque[StateChange] = deque(maxlen=1000)  # server state changes, newest last
        self._listeners: list[Callable[[StateChange], None]] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._stopping: asyncio.Future | None = None
        self.started = False
        self.data_dir = data_dir  # overrides global.data_dir ({data_dir} in managed commands)
        self.supervisors: dict[str, Supervisor] = {}  # "backend/server" -> its process

    # -- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        if self.started:
            raise RuntimeError("this LoadBalancer is already started")
        self.loop = loop = asyncio.get_running_loop()
        cfg = self.config
        # bind first: a port that is taken is reported before anything else starts
        socks: list[tuple[Frontend | None, str, socket.socket]] = []
        try:
            for name, fcfg in cfg.frontends.items():
                for i, addr in enumerate(fcfg.bind):
                    path = f"frontends.{name}.bind" + (f"[{i}]" if len(fcfg.bind) > 1 else "")
                    socks.append((None, name, _bind(path, addr)))
            self._check_managed_ports()
        except BaseException:
            for _, _, sock in socks:
                sock.close()
            raise
        self.backends = {name: Backend(b, self.events) for name, b in cfg.backends.items()}
        for be in self.backends.values():
            be.listeners = self._listeners
        self.frontends = {name: Frontend(f, self.backends) for name, f in cfg.frontends.items()}
        self.started = True
        _raise_fd_limit(cfg.settings.maxconn)
        for be in self.backends.values():
            be.start(self.spawn)
        self._start_managed()
        if self.supervisors:
            try:
                await self._wait_managed(cfg.settings.startup_timeout)
            except asyncio.CancelledError:
                for _, _, sock in socks:
                    sock.close()
                await self.stop(grace=0)
                raise
        # accept only now: clients that connected meanwhile waited in the listen backlog
        try:
            for _, name, sock in socks:
                fe = self.frontends[name]
                srv = await loop.create_server(self._factory(fe), sock=sock)
                self._servers.append(srv)
                host, port = sock.getsockname()[:2]
                self.addresses.setdefault(name, []).append((host, port))
        except BaseException:
            await self.stop(grace=0)
            raise
        for name, fe in self.frontends.items():
            log.debug("frontend %s (%s) listening on %s", name, fe.mode,
                      ", ".join(_fmt(a) for a in self.addresses[name]))

    def _check_managed_ports(self) -> None:
        """A managed server's port must be free, or its process could never listen there."""
        for bname, bcfg in self.config.backends.items():
            for i, scfg in enumerate(bcfg.servers):
                if scfg.command:
                    path = f"backends.{bname}.servers[{i}].address"
                    _bind(path, scfg.address, listen=False).close()

    def _start_managed(self) -> None:
        data_dir = Path(self.data_dir or self.config.settings.data_dir).resolve()
        for be in self.backends.values():
            for server, scfg in zip(be.servers, be.cfg.servers, strict=True):
                if not scfg.command:
                    continue
                data_dir.mkdir(parents=True, exist_ok=True)
                argv = expand_command(scfg.command, be.name, server, data_dir)
                sup = Supervisor(be, server, argv, dict(scfg.env))
                self.supervisors[f"{be.name}/{server.name}"] = sup
                sup.start(self.spawn)

    async def _wait_managed(self, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        waiting = [sup.server for sup in self.supervisors.values()]
        while any(s.state is not State.UP for s in waiting):
            if self.loop.time() > deadline:
                late = ", ".join(f"{s.backend}/{s.name} ({s.check_status or 'no answer'})"
                                 for s in waiting if s.state is not State.UP)
                log.warning("not up after %gs, serving anyway: %s", timeout, late)
                return
            await asyncio.sleep(0.05)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        """Run a background step (a server connect) and keep it referenced until it ends."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- global maxconn: sessions beyond it are accepted but not read until a slot frees ---------
    def admit(self, session: Any) -> bool:
        """Called by a new session; False means it is parked (its reading is paused)."""
        if len(self.sessions) < self.config.settings.maxconn and not self.parked:
            self.sessions.add(session)
            return True
        session.transport.pause_reading()
        # uvloop starts reading after connection_made returns: pause again right after it
        self.loop.call_soon(_pause_if_parked, self, session)
        self.parked.append(session)
        return False

    def leave(self, session: Any) -> None:
        """Called when a session's connection is gone."""
        if session in self.sessions:
            self.sessions.discard(session)
            limit = self.config.settings.maxconn
            while self.parked and len(self.sessions) < limit:
                nxt = self.parked.popleft()
                if nxt.transport.is_closing():
                    continue
                self.sessions.add(nxt)
                nxt.transport.resume_reading()
                nxt.admitted()
        else:
            with contextlib.suppress(ValueError):
                self.parked.remove(session)

    def on_state_change(self, callback: Callable[[StateChange], None]) -> None:
        """Call `callback(change)` after every server state change (see `events`)."""
        self._listeners.append(callback)

    def _factory(self, fe: Frontend) -> Callable[[], asyncio.Protocol]:
        cls = HttpSession if fe.mode == "http" else TcpSession
        return lambda: cls(self, fe)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let requests in flight finish (up to `grace` seconds), close."""
        if not self.started:
            return
        self.started = False
        if grace is None:
            grace = self.config.settings.grace
        await self._close_listeners()
        while self.parked:
            self.parked.popleft().transport.abort()
        for s in list(self.sessions):
            s.shutdown()
        for be in self.backends.values():
            be.health.stop()
        deadline = self.loop.time() + grace
        while self.sessions and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for s in list(self.sessions):
            if s.transport is not None:
                s.transport.abort()
        self.sessions.clear()
        # the servers we run go last, once nothing is sent to them any more
        await asyncio.gather(*(sup.stop() for sup in self.supervisors.values()))
        for task in list(self.tasks):
            task.cancel()
        for be in self.backends.values():
            be.close()
        await asyncio.sleep(0)

    async def _close_listeners(self) -> None:
        for srv in self._servers:
            srv.close()
        self._servers.clear()

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


def _pause_if_parked(lb: LoadBalancer, session: Any) -> None:
    if session in lb.parked and not session.transport.is_closing():
        session.transport.pause_reading()


def _raise_fd_limit(maxconn: int) -> None:
    """Two descriptors per connection (client and server) and some room: raise the soft limit
    towards the hard one when it is lower (as HAProxy does from maxconn)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * maxconn + 1024
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        if new > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            except (ValueError, OSError) as e:
                log.warning("could not raise the open file limit from %d to %d: %s", soft, new, e)


def _fmt(addr: tuple[str, int]) -> str:
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
