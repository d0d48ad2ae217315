"""Accepting: how one listening socket's connections are taken in this process.

Rule of this module: while the process has descriptors to spare, uvloop's server accepts (in C,
every connection waiting at once); near the open-file budget (`Admission.near`), the socket is
read by our own loop instead, one connection at a time, which stops at the budget
(`Admission.cap`) or at EMFILE/ENFILE and leaves the connections waiting in the kernel's accept
queue (where another worker may take them) until a descriptor frees up: a connection that ends
here, or a bounded retry. Switching never closes the listening socket (uvloop is handed a
duplicate), so no waiting connection is lost. uvloop's server alone would, at the limit, accept
and close every waiting connection (libuv's "EMFILE trick"), and serve what it holds. It
never reads a byte of a connection.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from functools import partial
from typing import Any

__all__ = ["Acceptor"]

log = logging.getLogger("foobar_lb.accept")

ACCEPT_BATCH = 64  # connections taken per readiness event in our own loop
RETRY_FIRST = 0.05  # after EMFILE: look again this soon, doubling up to RETRY_MAX
RETRY_MAX = 1.0
_OUT_OF = frozenset((errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM))

FAST, OWN, FULL, OFF = "fast", "own", "full", "off"


class Acceptor:
    """One listening socket of one Serving: `mode` is FAST (uvloop's server), OWN (our loop
    reads it), FULL (nobody reads it: at the budget, or out of descriptors) or OFF."""

    __slots__ = ("adm", "backlog", "factory", "fd", "gen", "loop", "mode", "retry_in", "server",
                 "sock", "task", "timer", "tls")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 factory: Callable[[], asyncio.Protocol], tls: dict[str, Any], backlog: int,
                 admission: Any):
        self.loop = loop
        self.sock = sock  # ours: closed by close()
        self.fd = sock.fileno()
        self.factory = factory
        self.tls = tls
        self.backlog = backlog
        self.adm = admission
        self.mode = OFF
        self.server: asyncio.AbstractServer | None = None
        self.gen = 0  # which switch to FAST a server being made belongs to
        self.task: asyncio.Task | None = None  # (that server being made, kept referenced)
        self.timer: asyncio.TimerHandle | None = None
        self.retry_in = RETRY_FIRST

    async def start(self) -> None:
        self.sock.setblocking(False)
        if self.adm.careful:
            self.own()
        else:
            self.mode = FAST
            await self._serve_fast(self.gen)

    # -- the two ways of reading the socket ----------------------------------------------------
    async def _serve_fast(self, gen: int) -> None:
        dup = self.sock.dup()
        try:
            server = await self.loop.create_server(self.factory, sock=dup, backlog=self.backlog,
                                                   **self.tls)
        except BaseException:
            dup.close()
            raise
        if self.mode != FAST or gen != self.gen:  # switched meanwhile
            server.close()
            return
        self.server = server

    def fast(self) -> None:
        """Far from the budget again: uvloop's server accepts."""
        if self.mode == FAST:
            return
        log.debug("fd %d: far below the open-file budget: accepting all at once", self.fd)
        self._stop_reading()
        self.mode = FAST
        self.gen += 1
        self.task = self.loop.create_task(self._serve_fast(self.gen))
        self.task.add_done_callback(_report)

    def own(self) -> None:
        """Near the budget: our loop accepts, one connection at a time."""
        if self.mode == OWN:
            return
        log.debug("fd %d: near the open-file budget: accepting one by one", self.fd)
        self._stop_reading()
        self.mode = OWN
        self.loop.add_reader(self.fd, self._readable)

    def room(self, load: int) -> None:
        """`load` connections held now: reading resumes below the budget."""
        if self.mode == FULL and load < self.adm.cap:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.retry_in = RETRY_FIRST
            self.mode = OWN
            self.loop.add_reader(self.fd, self._readable)

    def close(self) -> None:
        self._stop_reading()
        self.mode = OFF
        self.sock.close()

    def _stop_reading(self) -> None:
        if self.server is not None:
            self.server.close()  # (its duplicate of the socket: ours stays open)
            self.server = None
        if self.mode == OWN:
            self.loop.remove_reader(self.fd)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # -- our own accept loop -------------------------------------------------------------------
    def _readable(self) -> None:
        adm = self.adm
        for _ in range(ACCEPT_BATCH):
            if adm.load() >= adm.cap:
                self._full(False)
                return
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in _OUT_OF:
                    self._full(True)
                    return
                continue  # (ECONNABORTED and the like: that one connection is gone)
            conn.setblocking(False)
            self.retry_in = RETRY_FIRST
            session = self.factory()
            adm.pending.add(session)  # (counted until it begins: admission.admit)
            coro = self.loop.connect_accepted_socket(lambda s=session: s, conn, **self.tls)
            try:
                fut = coro.send(None)
            except StopIteration:  # (done at once: not uvloop's way, but fine)
                adm.pending.discard(session)
                continue
            except BaseException:  # pragma: no cover - the socket could not be wrapped
                adm.pending.discard(session)
                conn.close()
                continue
            fut.add_done_callback(partial(self._made, coro, session))

    def _made(self, coro: Any, session: Any, _: Any) -> None:
        """The session has its connection (or its TLS handshake failed)."""
        self.adm.pending.discard(session)
        try:
            coro.send(None)
        except StopIteration:
            pass
        except BaseException:  # a TLS handshake that failed (counted and logged by tls.py)
            pass
        self.adm.room()

    def _full(self, out_of_descriptors: bool) -> None:
        """Stop reading: the connections wait in the kernel's queue. At the budget, a connection
        that ends here resumes it; out of descriptors, a bounded retry does too."""
        self.loop.remove_reader(self.fd)
        self.mode = FULL
        self.adm.said_full(out_of_descriptors)
        if out_of_descriptors:
            self.timer = self.loop.call_later(self.retry_in, self._retry)
            self.retry_in = min(self.retry_in * 2, RETRY_MAX)

    def _retry(self) -> None:
        self.timer = None
        if self.mode == FULL:
            self.mode = OWN
            self.loop.add_reader(self.fd, self._readable)


def _report(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("could not accept again: %s", task.exception())
