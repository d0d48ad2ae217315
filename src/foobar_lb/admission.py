"""Admission: whether a new client connection is served now or waits.

Rule of this module: the global `maxconn` is a limit of the whole worker group (group-wide
slots in shared memory) or of the one process (the library); a connection beyond it is
accepted but parked, unread, until a slot frees (in this process at once; freed by another
worker, found by a short poll while anything is parked). It counts accepted connections. It
never reads or parses a byte (per-client limits will live here too).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Any

from .shared import F_CONNECTIONS, SemSlots

__all__ = ["Admission"]

PARKED_POLL = 0.01


class Admission:
    __slots__ = ("_poll", "loop", "parked", "sessions", "shared", "slots")

    def __init__(self, loop: asyncio.AbstractEventLoop, slots: Any):
        self.loop = loop
        self.slots = slots  # shared.SemSlots (group) or shared.LocalSlots (one process)
        self.sessions: set[Any] = set()  # client connections being served
        self.parked: deque[Any] = deque()  # accepted beyond global maxconn, not read yet
        self._poll: asyncio.TimerHandle | None = None
        self.shared = isinstance(slots, SemSlots)

    def admit(self, session: Any) -> bool:
        """Called by a new session; False means it is parked (its reading is paused)."""
        fe = session.fe
        fe.ctr[fe.cbase + F_CONNECTIONS] += 1
        if not self.parked and self.slots.take():
            self.sessions.add(session)
            return True
        session.transport.pause_reading()
        # uvloop starts reading after connection_made returns: pause again right after it
        self.loop.call_soon(self._pause_if_parked, session)
        self.parked.append(session)
        self._schedule()
        return False

    def leave(self, session: Any) -> None:
        """Called when a session's connection is gone."""
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

    def close(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
            self._poll = None
        while self.parked:
            self.parked.popleft().transport.abort()
