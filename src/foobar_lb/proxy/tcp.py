"""TCP proxying: bytes relayed both ways, one server per connection.

Rules of this module: the server may speak first, so nothing waits for client bytes; what the
client sends before the server connection is up is held (bounded, then the client is paused);
a destination's `pause_writing` pauses the source's reading; a half-close (FIN) is passed on with
`write_eof` and the connection ends when both ways are done, a reset is passed on as a reset.
A connection that cannot be made is retried on another server (`retries`, redispatch).
A relayed read costs one addition to the connection's own byte count; the counts go to the
frontend's and the server's counters each second (one timer per frontend, over its relaying
connections) and when the connection ends, so the metrics are at most a second behind.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from typing import TYPE_CHECKING

from ..backend import ASSIGNED, QUEUED
from ..clientaddr import send_proxy_header
from ..shared import F_TIMEOUT_TUNNEL, S_ECON, S_TIMEOUT_CONNECT
from .base import OUT_OF_FDS, ClientSide, pass_eof

if TYPE_CHECKING:
    from ..backend import Backend, Waiter
    from ..frontend import Frontend
    from ..servers import Server

__all__ = ["TcpSession", "TcpUpstream"]

log = logging.getLogger("foobar_lb.tcp")

PENDING_LIMIT = 65536
COUNT_EVERY = 1.0  # relayed bytes reach the counters this often (and at the connection's end)


class TcpSession(ClientSide):
    """The client side of one TCP-mode connection."""

    __slots__ = (
        "attempts",
        "be",
        "client_key",
        "closing",
        "eof_in",
        "fe",
        "last_rx",
        "lb",
        "loop",
        "nin",
        "nout",
        "paused",
        "peer_ip",
        "peer_key",
        "pending",
        "pending_size",
        "proxied",
        "server",
        "th",
        "th_when",
        "transport",
        "up",
        "waiter",
    )

    def __init__(self, lb, fe: Frontend):
        self.lb = lb
        self.fe = fe
        self.be: Backend = fe.default
        self.loop = lb.loop
        self.transport: asyncio.Transport | None = None
        self.up: TcpUpstream | None = None
        self.waiter: Waiter | None = None
        self.server: Server | None = None
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.eof_in = False
        self.closing = False
        self.paused = False
        self.attempts = 0
        self.peer_ip = ""
        self.peer_key = b""
        self.client_key = b""  # the client's address as bytes (see clientaddr.py)
        self.proxied = None  # ((src ip, port), (dst ip, port)) from a PROXY header
        self.last_rx = 0.0
        self.th: asyncio.TimerHandle | None = None
        self.th_when = 0.0
        # bytes relayed from the client to the server and back, not counted yet (_count)
        self.nin = 0
        self.nout = 0

    def accepted(self) -> None:
        """The client address is established and allowed (at accept, or after the PROXY
        header)."""
        if self.lb.admit(self):  # else parked, unread, until global maxconn has room
            self.admitted()

    def admitted(self) -> None:
        self.last_rx = self.loop.time()
        self._dispatch(None)

    def _dispatch(self, avoid: Server | None) -> None:
        be = self.be
        outcome, got = be.assign(self.peer_key, self, None, self.loop.time(),
                                 avoid=avoid, retry=avoid is not None)
        if avoid is not None and outcome in (ASSIGNED, QUEUED):
            be.retried(avoid, got if outcome == ASSIGNED else None)
        if outcome == ASSIGNED:
            self._use(got)
        elif outcome == QUEUED:  # every usable server is full: wait in the backend's queue
            self.waiter = got
        else:
            self._close()

    def granted(self, _: None, server: Server | None) -> None:
        """The queue's answer: a server whose slot is ours, or None."""
        self.waiter = None
        if self.transport.is_closing():
            if server is not None:
                self.be.release(server)
            return
        if server is None:
            self._close()
        else:
            self._use(server)

    def _use(self, server: Server) -> None:
        self.server = server
        self.attempts += 1
        self.lb.spawn(self._connect(server))

    async def _connect(self, server: Server) -> None:
        be = self.be
        t = self.loop.time()
        try:
            async with asyncio.timeout(be.timeouts.connect or None):
                _, up = await self.loop.create_connection(
                    lambda: TcpUpstream(self), server.host, server.port, ssl=server.ssl,
                    server_hostname=server.sni)
        except (OSError, TimeoutError) as e:
            late = isinstance(e, TimeoutError)
            what = "connection timeout" if late else (e.strerror or str(e)).lower()
            out_of_fds = getattr(e, "errno", None) in OUT_OF_FDS  # ours, not the server's
            if out_of_fds:
                self.lb.admission.short_of_fds()
            else:
                ctr = server.ctr
                ctr[server.cbase + S_ECON] += 1
                if late:
                    ctr[server.cbase + S_TIMEOUT_CONNECT] += 1
                be.observe_error(server, what)
            self._drop_server()
            if self.transport.is_closing():
                return
            if self.attempts <= be.retries and not out_of_fds:
                log.debug("tcp: retrying after %r on %s/%s", e, be.name, server.name)
                self._dispatch(server)
            else:
                self._close()
            return
        took = self.loop.time() - t
        ctr = server.ctr
        h = server.hct
        ctr[h + bisect_left(server.hb, took)] += 1
        ctr[h + server.hn] += int(took * 1e6)
        if self.transport.is_closing():
            up.transport.close()
            self._drop_server()
            return
        self.up = up
        server.errors = 0
        fe = self.fe
        fe.relays.add(self)
        if fe.relay_timer is None:
            fe.relay_timer = self.loop.call_later(COUNT_EVERY, _count_relays, fe, self.loop)
        if server.send_proxy is not None:
            send_proxy_header(up.transport, server.send_proxy, self)
        if self.pending:
            if self.paused:
                # resume before writing: if the held bytes fill the server's buffer, the
                # pause_writing that writelines triggers must leave the client paused
                self.paused = False
                self.transport.resume_reading()
            up.transport.writelines(self.pending)
            ctr[server.o_bin] += self.pending_size
            self.pending = []
            self.pending_size = 0
        if self.eof_in and up.transport.can_write_eof():
            up.transport.write_eof()
        self._arm(self.loop.time() + (be.timeouts.tunnel or 86400.0))

    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        up = self.up
        if up is not None:
            up.transport.write(data)
            self.nin += len(data)  # (counted by _count)
            return
        fe = self.fe
        fe.ctr[fe.o_bin] += len(data)  # (and the server's when it is sent)
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > PENDING_LIMIT and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof_in = True
        up = self.up
        if up is None:
            return True  # passed on once the server connection is up
        # (a TLS client's close_notify closes its side whatever we say: asyncio warns on True)
        return pass_eof(up.eof_in, up.transport) and (
            self.transport.get_extra_info("sslcontext") is None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._count()
        self.fe.relays.discard(self)
        self._ended()
        up = self.up
        self.up = None
        if up is not None and not up.transport.is_closing():
            if exc is not None:
                up.transport.abort()
            else:
                up.transport.close()
        self._drop_server()

    def pause_writing(self) -> None:
        up = self.up
        if up is not None:
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.up
        if up is not None:
            up.transport.resume_reading()

    def _count(self) -> None:
        """The bytes relayed since the last call go to the frontend's and the server's
        counters."""
        nin = self.nin
        nout = self.nout
        if nin or nout:
            self.nin = self.nout = 0
            fe = self.fe
            ctr = fe.ctr
            ctr[fe.o_bin] += nin
            ctr[fe.o_bout] += nout
            server = self.server
            if server is not None:
                ctr = server.ctr
                ctr[server.o_bin] += nin
                ctr[server.o_bout] += nout

    def _drop_server(self) -> None:
        server = self.server
        if server is not None:
            self.server = None
            self.be.release(server)

    def _close(self) -> None:
        self.closing = True
        if not self.transport.is_closing():
            self.transport.close()

    def trust_xff(self, trusted) -> None:
        """No X-Forwarded-For in TCP mode: `trusted_proxies` changes nothing here."""

    def drain(self) -> None:
        """Reload: a TCP connection is left to finish (until hard_stop_after)."""

    def shutdown(self) -> None:
        """Graceful stop: a TCP connection is left to finish (until the grace period ends)."""

    # -- inactivity (timeout tunnel) ---------------------------------------------------------
    def _on_timer(self) -> None:
        self.th = None
        if self.transport.is_closing():
            return
        timeout = self.be.timeouts.tunnel
        if not timeout:
            return
        up = self.up
        last = max(self.last_rx, up.last_rx if up is not None else 0.0)
        when = last + timeout
        if self.loop.time() < when:
            self._arm(when)
            return
        fe = self.fe
        fe.ctr[fe.cbase + F_TIMEOUT_TUNNEL] += 1
        self.transport.close()
        if up is not None:
            up.transport.close()


class TcpUpstream(asyncio.Protocol):
    """The server side of one TCP-mode connection."""

    __slots__ = ("eof_in", "last_rx", "session", "transport")

    def __init__(self, session: TcpSession):
        self.session = session
        self.transport: asyncio.Transport | None = None
        self.eof_in = False
        self.last_rx = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        s = self.session
        self.last_rx = s.loop.time()
        s.transport.write(data)
        s.nout += len(data)  # (counted by the session's _count)

    def eof_received(self) -> bool:
        self.eof_in = True
        s = self.session
        return pass_eof(s.eof_in, s.transport)

    def connection_lost(self, exc: Exception | None) -> None:
        s = self.session
        s._count()
        t = s.transport
        if t is not None and not t.is_closing():
            if exc is not None:
                t.abort()
            else:
                t.close()

    def pause_writing(self) -> None:
        self.session.transport.pause_reading()

    def resume_writing(self) -> None:
        s = self.session
        if not s.paused:
            s.transport.resume_reading()


def _count_relays(fe: Frontend, loop: asyncio.AbstractEventLoop) -> None:
    """Each second while a connection of `fe` relays: their byte counts to the counters."""
    for s in fe.relays:
        s._count()
    fe.relay_timer = loop.call_later(COUNT_EVERY, _count_relays, fe, loop) if fe.relays else None
