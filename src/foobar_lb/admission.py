"""Admission: whether a new client connection is served now or waits.

Rule of this module: the global `maxconn` is a limit of the whole worker group (group-wide
slots in shared memory) or of the one process (the library); a connection beyond it is
accepted but parked, unread, until a slot frees (in this process at once; freed by another
worker, found by a short poll while anything is parked). It counts accepted connections.
The process's open-file budget is its other limit: `cap` client connections (two descriptors
each: the client's and a server's), from the open-file limit and what is open at start; near
it the acceptors (accepting.py) take connections one by one and stop at it, and `leave` tells
them when there is room again. A frontend's `max_client_connections` (group-wide, in
`limits.ClientTable`) is checked first: a client address over it is closed at once, counted,
and takes no maxconn slot. It never reads or parses a byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import deque
from typing import Any

from .limits import REFUSED
from .shared import F_CONNECTIONS, SemSlots

__all__ = ["Admission", "fit_fd_limit", "open_fds"]

log = logging.getLogger("foobar_lb.admission")

PARKED_POLL = 0.01
FD_RESERVE = 32  # descriptors kept aside: log files reopened, a stop's duplicates, a DNS lookup
FULL_LOG_EVERY = 60.0  # the budget's log line: once, then at most once a minute


class Admission:
    __slots__ = ("_poll", "acceptors", "cap", "careful", "clients", "counted", "far",
                 "full_said", "fulls", "limit", "loop", "near", "parked", "pending", "sessions",
                 "shared", "slots")

    def __init__(self, loop: asyncio.AbstractEventLoop, slots: Any, clients: Any = None):
        self.loop = loop
        self.slots = slots  # shared.SemSlots (group) or shared.LocalSlots (one process)
        self.sessions: set[Any] = set()  # client connections being served
        self.parked: deque[Any] = deque()  # accepted beyond global maxconn, not read yet
        self._poll: asyncio.TimerHandle | None = None
        self.shared = isinstance(slots, SemSlots)
        self.clients = clients  # limits.ClientTable (per-client limits), or None
        self.counted: dict[Any, int] = {}  # session -> its entry in `clients`
        # the open-file budget (see budget()): none until the listeners are open
        self.acceptors: list[Any] = []  # accepting.Acceptor, one per listening socket
        self.pending: set[Any] = set()  # sessions our acceptors made, not begun yet (TLS)
        self.limit = 0  # RLIMIT_NOFILE (soft)
        self.cap = self.near = 1 << 62  # client connections held: at most / careful from
        self.far = 0  # below it, careful no more
        self.careful = False  # the acceptors take connections one by one
        # when each kind of line was last logged (at the budget, out of descriptors, shrunk)
        self.full_said = {False: -FULL_LOG_EVERY, True: -FULL_LOG_EVERY, None: -FULL_LOG_EVERY}
        self.fulls = 0  # times accepting stopped at the budget since the last log line

    def budget(self, limit: int, open_now: int, backlog: int) -> None:
        """The open-file budget, once the listening sockets are open: `limit` descriptors,
        `open_now` of them taken. Careful within a listen backlog's worth of the cap (uvloop
        takes every waiting connection at once), careless again below two of them."""
        self.limit = limit
        self.cap = max(1, (limit - open_now - FD_RESERVE) // 2)
        self.near = self.cap - backlog
        self.far = self.cap - 2 * backlog
        self.careful = self.near <= 0

    def load(self) -> int:
        """Client connections this process holds (each a descriptor, most of them two)."""
        return len(self.sessions) + len(self.parked) + len(self.pending)

    def admit(self, session: Any) -> bool:
        """Called by a new session; False means it is parked (its reading is paused)."""
        if self.pending:
            self.pending.discard(session)
        if not self.careful and len(self.sessions) + len(self.parked) >= self.near:
            self._near()
        fe = session.fe
        fe.ctr[fe.cbase + F_CONNECTIONS] += 1
        lim = fe.climits
        if lim is not None and lim.max_conns and not self.limit_client(session):
            return False
        if not self.parked and self.slots.take():
            self.sessions.add(session)
            return True
        session.transport.pause_reading()
        # uvloop starts reading after connection_made returns: pause again right after it
        self.loop.call_soon(self._pause_if_parked, session)
        self.parked.append(session)
        self._schedule()
        return False

    def limit_client(self, session: Any) -> bool:
        """`max_client_connections` for `session.client_key`: False when over it (the
        connection is closed, counted). Called at accept; a session whose client address is
        known only later (a PROXY header) calls it then."""
        got = session.fe.climits.connect(session.client_key)
        if got >= 0:
            self.counted[session] = got
        elif got == REFUSED:
            session.transport.close()
            return False
        return True

    def leave(self, session: Any) -> None:
        """Called when a session's connection is gone."""
        if self.counted:
            off = self.counted.pop(session, None)
            if off is not None:
                self.clients.disconnect(off)
        if session in self.sessions:
            self.sessions.discard(session)
            self.slots.give()
            if self.parked:
                self._unpark()
        else:
            with contextlib.suppress(ValueError):
                self.parked.remove(session)
        if self.careful:
            self.room()

    def _near(self) -> None:
        self.careful = True
        for a in self.acceptors:
            a.own()

    def room(self) -> None:
        """A connection ended (or began): acceptors stopped at the budget may read again; far
        below it, uvloop's server accepts again."""
        load = self.load()
        if load < self.far:
            self.careful = False
            for a in self.acceptors:
                a.fast()
            return
        for a in self.acceptors:
            a.room(load)

    def short_of_fds(self) -> None:
        """A server connection found no descriptor even with no idle one left to close: the
        budget was too generous (the limit lowered under us, descriptors held elsewhere). It
        shrinks to half the connections held, for this process's life, so that accepting
        leaves descriptors for server connections; accepting goes one by one."""
        new = max(1, (len(self.sessions) + len(self.parked)) // 2)
        if new < self.cap:
            now = self.loop.time()
            if now - self.full_said[None] >= FULL_LOG_EVERY:
                log.warning("a server connection found no descriptor: the open-file budget "
                            "shrinks from %d to %d client connections (open file limit %d at "
                            "start)", self.cap, new, self.limit)
                self.full_said[None] = now
            self.cap = new
            self.far = min(self.far, new // 2)
        if not self.careful:
            self._near()

    def said_full(self, out_of_descriptors: bool) -> None:
        """An acceptor stopped reading: one log line, then at most one a minute (of each kind:
        at the budget, out of descriptors below it)."""
        self.fulls += 1
        now = self.loop.time()
        if now - self.full_said[out_of_descriptors] >= FULL_LOG_EVERY:
            log.warning("%s: %d client connections held (budget %d, open file limit %d); new "
                        "connections wait in the listen queue until some end (%d pause%s "
                        "since the last such line)",
                        "out of descriptors" if out_of_descriptors else "open-file budget reached",
                        self.load(), self.cap, self.limit, self.fulls,
                        "" if self.fulls == 1 else "s")
            self.full_said[out_of_descriptors] = now
            self.fulls = 0

    def _unpark(self) -> None:
        parked = self.parked
        while parked:
            nxt = parked[0]
            if nxt.transport.is_closing():
                parked.popleft()
                continue
            if not self.slots.take():
                break
            parked.popleft()
            self.sessions.add(nxt)
            nxt.transport.resume_reading()
            nxt.admitted()
        self._schedule()

    def _schedule(self) -> None:
        # slots given back by other workers wake nobody here: look again shortly
        if self.parked and self._poll is None and self.shared:
            self._poll = self.loop.call_later(PARKED_POLL, self._polled)

    def _polled(self) -> None:
        self._poll = None
        self._unpark()

    def _pause_if_parked(self, session: Any) -> None:
        if session in self.parked and not session.transport.is_closing():
            session.transport.pause_reading()

    def release_clients(self) -> None:
        """Give back every connection counted per client (the sessions are being cut)."""
        counted, self.counted = self.counted, {}
        for off in counted.values():
            self.clients.disconnect(off)

    def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        while self.parked:
            self.parked.popleft().transport.abort()


def open_fds() -> int:
    """Descriptors open in this process now."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # (less the one listdir used)
    except OSError:  # pragma: no cover - no /proc
        return 64


def fit_fd_limit(maxconn: int, wanted: int = 0) -> int:
    """Set this process's open-file limit (soft, up to the hard one): `wanted` when given
    (`global.max_open_files`, HAProxy's `ulimit-n`), else raised, never lowered, to fit
    `maxconn` (two descriptors a connection and some room, as HAProxy does). Returns the limit
    in force."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux
        return 1 << 20
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = wanted or 2 * maxconn + 1024
    if soft == resource.RLIM_INFINITY and not wanted:
        return 1 << 30
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if new > soft or (wanted and new != soft):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError) as e:
            log.warning("could not set the open file limit from %d to %d: %s", soft, new, e)
    return soft
