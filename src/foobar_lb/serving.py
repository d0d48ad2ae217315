"""Serving: one generation of accepting and proxying in one process.

Rule of this module: a `Serving` holds the built frontends and backends, the asyncio servers on
the listening sockets it is handed, admission, and the sessions; it is what the proxy
Protocols see as their context (`loop`, `admit`, `leave`, `spawn`). It stops accepting, drains
(reload: each connection closes after its next response, or once idle for
`timeout http_keep_alive`) or shuts down (stop: idle connections close at once), and aborts
what is left at a deadline. It applies server states it is told, and the runtime API's
changes (admin states, weights, servers added and removed); it never binds a socket, runs a
check or decides a state. A worker process runs one; so does the library, in-process.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from .accepting import Acceptor
from .accesslog import AccessLog
from .admission import Admission, open_fds
from .build import Built
from .clientaddr import read_header_before_tls
from .limits import attach
from .listeners import key_of
from .proxy.http import HttpSession
from .proxy.outbox import Outbox
from .proxy.tcp import TcpSession
from .servers import Admin, Server, State
from .shared import F_DENIED, F_TLS_FAILURES, F_TLS_HANDSHAKES
from .tls import RedirectSession, Refusals, frontend_context

__all__ = ["Serving"]


class Serving:
    """One generation of serving in this process."""

    def __init__(self, loop: asyncio.AbstractEventLoop, built: Built, admission: Admission):
        self.loop = loop
        self.outbox = Outbox(loop)  # the HTTP sessions' writes of each turn (proxy/outbox.py)
        self.built = built
        self.frontends = built.frontends
        self.backends = built.backends
        self.admission = admission
        attach(self.frontends, admission.clients)  # per-client limits, where configured
        self.admit = admission.admit
        self.leave = admission.leave
        self.tasks: set[asyncio.Task] = set()  # connects (kept referenced until they end)
        self.acceptors: list[Acceptor] = admission.acceptors  # one per listening socket
        self.proxied_loops: list[asyncio.Task] = []  # accept loops of PROXY-before-TLS ones
        # (fd, session class, frontend, its SSL context or None)
        self.listening: list[tuple[int, type, Any, Any]] = []
        self.addresses: dict[str, list[tuple[str, int]]] = {}
        # TLS handshakes completed and refused, by frontend (counted in the shared counters)
        self.tls_refusals: dict[str, Refusals] = {}
        self.cutting = False  # the deadline of a stop or drain passed: what is left is cut
        # the access log ([log] access): its writer thread starts now; the HTTP frontends'
        # routes get its entry point (None on them: no access log, nothing done per request)
        self.alog: AccessLog | None = None
        if built.config.log.access is not None:
            self.alog = AccessLog(built.config.log, loop)
            for fe in self.frontends.values():
                if fe.mode == "http":
                    fe.alog = fe.no_route.alog = self.alog.request
                    for route in fe.routes.values():
                        route.alog = self.alog.request

    @property
    def sessions(self) -> set[Any]:
        return self.admission.sessions

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task:
        """Run a background step (a server connect) and keep it referenced until it ends."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def listen(self, socks: dict[tuple, socket.socket], backlog: int,
                     fd_limit: int | None = None) -> None:
        """Accept on the frontends' sockets (keyed like `listeners.key_of`; they are this
        Serving's to close), within the open-file budget of `fd_limit` descriptors (the
        process's soft RLIMIT_NOFILE when None)."""
        for name, fe in self.frontends.items():
            cls = HttpSession if fe.mode == "http" else TcpSession
            if fe.mode == "http" and fe.cfg.redirect_https:
                cls = RedirectSession
            # built here, in each generation: a reload re-reads the certificate files
            ctx = None
            if fe.cfg.tls is not None:
                refusals = self.tls_refusals[name] = Refusals(
                    name, fe.ctr, fe.cbase + F_TLS_HANDSHAKES, fe.cbase + F_TLS_FAILURES)
                ctx = frontend_context(fe.cfg.tls, refusals)
            tls = {"ssl": ctx, "ssl_handshake_timeout": fe.cfg.timeouts.http_request or None
                   } if ctx is not None else {}
            for i, addr in enumerate(fe.cfg.bind):
                sock = socks[key_of(name, i, addr)]
                if _header_before_tls(fe, ctx):
                    # a PROXY header comes before the TLS handshake: accepted here, its header
                    # read from the socket, then the socket handed over with TLS
                    sock.setblocking(False)
                    self.proxied_loops.append(self.loop.create_task(
                        self._accept_proxied(sock, cls, fe, ctx)))
                else:
                    self.acceptors.append(Acceptor(self.loop, sock, _factory(self, cls, fe), tls,
                                                   backlog, self.admission))
                self.listening.append((sock.fileno(), cls, fe, ctx))
                host, port = sock.getsockname()[:2]
                self.addresses.setdefault(name, []).append((host, port))
        if fd_limit is None:
            import resource

            fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        # (uvloop's servers hold a duplicate of each socket: counted in now)
        self.admission.budget(fd_limit, open_fds() + len(self.acceptors), backlog)
        for acceptor in self.acceptors:
            await acceptor.start()

    def stop_accepting(self) -> None:
        for acceptor in self.acceptors:
            acceptor.close()
        self.acceptors.clear()
        for task in self.proxied_loops:
            task.cancel()
        self.proxied_loops.clear()

    async def _accept_proxied(self, sock: socket.socket, cls: type, fe: Any, ctx: Any) -> None:
        while True:
            try:
                conn, _ = await self.loop.sock_accept(sock)
            except OSError:  # out of descriptors, say: the connection waits in the backlog
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            self.spawn(self._proxied(conn, _factory(self, cls, fe), fe, ctx))

    async def _proxied(self, conn: socket.socket, make: Callable[[], Any], fe: Any,
                       ctx: Any) -> None:
        """Read a connection's PROXY header, then serve it over TLS with that address."""
        proxied = await read_header_before_tls(self.loop, conn, fe.edge)
        if proxied is None:
            fe.ctr[fe.cbase + F_DENIED] += 1
            conn.close()
            return

        def session() -> Any:
            s = make()
            s.proxied = proxied
            return s

        try:
            await self.loop.connect_accepted_socket(
                session, conn, ssl=ctx, ssl_handshake_timeout=fe.cfg.timeouts.http_request or None)
        except (OSError, TimeoutError, ssl.SSLError):
            conn.close()  # (a failed handshake: counted and logged by tls.py's context)

    def drain(self) -> None:
        """Reload: accept no more; each connection ends after its next response."""
        self.stop_accepting()
        self.admission.close()
        for s in list(self.sessions):
            s.drain()

    async def stop(self) -> None:
        """Stop: accept no more; idle connections close now, busy ones after their request.
        Connections the kernel had already accepted for us (in the listen backlog) are taken
        and served too (one request each), rather than reset when the socket closes."""
        queued = []
        for fd, cls, fe, ctx in self.listening:
            try:
                queued.append((socket.socket(fileno=os.dup(fd)), cls, fe, ctx))
            except OSError:
                continue
        self.shutdown()
        for sock, cls, fe, ctx in queued:
            with sock:
                sock.setblocking(False)
                while True:
                    try:
                        conn, _ = sock.accept()
                    except OSError:  # nothing more waiting (or the socket is gone)
                        break
                    conn.setblocking(False)
                    if _header_before_tls(fe, ctx):
                        await self._proxied(conn, _last_call(self, cls, fe), fe, ctx)
                        continue
                    await self.loop.connect_accepted_socket(_last_call(self, cls, fe), conn,
                                                            ssl=ctx)

    def shutdown(self) -> None:
        """Accept no more; idle connections close now, busy ones after their request."""
        self.stop_accepting()
        self.admission.close()
        for s in list(self.sessions):
            s.shutdown()

    async def finish(self, deadline: float) -> tuple[int, int]:
        """Wait until every session has ended or `deadline` (loop time); abort the rest and
        return what was cut: (connections, HTTP requests in flight on them)."""
        while self.sessions and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        return self.abort()

    def abort(self) -> tuple[int, int]:
        """Cut every connection left: (connections, HTTP requests in flight on them, those
        begun and not answered: the active one and pipelined ones; each gets an access log
        line with a K termination state)."""
        cut = requests = 0
        self.cutting = True
        for s in list(self.sessions):
            if s.transport is not None and not s.transport.is_closing():
                cut += 1
                q = getattr(s, "q", None)  # (HTTP sessions: their requests)
                if q is not None:
                    requests += len(q)
                    if s.parsing is not None and s.parsing not in q:
                        requests += 1
                    if self.alog is not None and (q or s.parsing is not None):
                        s._log_unfinished()  # now: the log closes before connection_lost
                s.transport.abort()
        self.sessions.clear()
        self.admission.release_clients()
        return cut, requests

    def reopen_log(self) -> None:
        """SIGUSR1 (log rotation): the access log file is opened again by its name."""
        if self.alog is not None:
            self.alog.reopen()

    def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        for be in self.backends.values():
            be.close()
        if self.alog is not None:
            self.alog.close()

    def apply(self, backend: str, server: str, state: str, health: int) -> None:
        """A state change decided by the master."""
        be = self.backends.get(backend)
        srv = be.by_name.get(server) if be is not None else None
        if srv is not None:
            srv.health = health
            be.apply_state(srv, State(state))

    # -- run-time changes decided by the master (the runtime API) ------------------------------
    def set_admin(self, backend: str, server: str, admin: str) -> None:
        be = self.backends.get(backend)
        srv = be.by_name.get(server) if be is not None else None
        if srv is not None:
            be.apply_admin(srv, Admin(admin))

    def set_weight(self, backend: str, server: str, weight: int) -> None:
        be = self.backends.get(backend)
        srv = be.by_name.get(server) if be is not None else None
        if srv is not None:
            be.apply_weight(srv, weight)

    def add_server(self, backend: str, server: Server, cfg: Any) -> None:
        be = self.backends.get(backend)
        if be is not None and server.name not in be.by_name:
            be.add_server(server, cfg)

    def remove_server(self, backend: str, server: str, within: float,
                      done: Callable[[int], None]) -> None:
        """Take `server` out at once (no new traffic), let what it has in flight finish (up to
        `within` seconds), then forget it: `done(requests still in flight)`."""
        be = self.backends.get(backend)
        srv = be.by_name.get(server) if be is not None else None
        if srv is None:
            done(0)
            return
        be.remove_server(srv)
        self.spawn(self._forget(be, srv, within, done))

    async def _forget(self, be: Any, srv: Server, within: float,
                      done: Callable[[int], None]) -> None:
        deadline = self.loop.time() + within
        while srv.active > 0 and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        be.pool.drop(srv)  # the connections its last requests gave back
        done(srv.active)


def _header_before_tls(fe: Any, ctx: Any) -> bool:
    """A TLS frontend whose clients (some of them) start with a PROXY header."""
    return ctx is not None and fe.edge is not None and fe.edge.proxy_from is not None


def _factory(serving: Serving, cls: type, fe: Any) -> Callable[[], asyncio.Protocol]:
    return lambda: cls(serving, fe)


def _last_call(serving: Serving, cls: type, fe: Any) -> Callable[[], asyncio.Protocol]:
    """A session that serves one request and closes (`Connection: close`)."""

    def make() -> asyncio.Protocol:
        session = cls(serving, fe)
        session.drain()
        return session

    return make
