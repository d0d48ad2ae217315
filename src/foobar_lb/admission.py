"""Admission: whether a new client connection is served now or waits.

Rule of this module: the global `maxconn` is a limit of the whole worker group (group-wide
slots in shared memory) or of the one process (the library); a connection beyond it is
accepted but parked, unread, until a slot frees (in this process at once; freed by another
worker, found by a short poll while anything is parked). It counts accepted connections.
A frontend's `max_client_connections` (group-wide, in `limits.ClientTable`) is checked first:
a client address over it is closed at once, counted, and takes no maxconn slot. It never
reads or parses a byte.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

from .limits import REFUSED
from .shared import F_CONNECTIONS, SemSlots

__all__ = ["Admission"]

PARKED_POLL = 0.01


class Admission:
    __slots__ = ("_poll", "clients", "counted", "loop", "parked", "sessions", "shared", "slots")

    def __init__(self, loop: asyncio.AbstractEventLoop, slots: Any, clients: Any = None):
        self.loop = loop
        self.slots = slots  # shared.SemSlots (group) or shared.LocalSlots (one process)
        self.sessions: set[Any] = set()  # client connections being served
        self.parked: deque[Any] = deque()  # accepted beyond global maxconn, not read yet
        self._poll: asyncio.TimerHandle | None = None
        self.shared = isinstance(slots, SemSlots)
        self.clients = clients  # limits.ClientTable (per-client limits), or None
        self.counted: dict[Any, int] = {}  # session -> its entry in `clients`

    def admit(self, session: Any) -> bool:
        """Called by a new session; False means it is parked (its reading is paused)."""
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
            self._unpark()
        else:
            with contextlib.suppress(ValueError):
                self.parked.remove(session)

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
