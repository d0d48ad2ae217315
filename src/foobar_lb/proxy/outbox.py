"""The outbox: what the HTTP proxy writes during one turn of the event loop leaves in two goes:
the turn's first write at once, the rest together once the turn's reads are handled.

Rules of this module:
- every write to a client or server connection of the HTTP proxy goes through its event loop's
  outbox (`write`, `writelines`), which keeps each connection's bytes in order: the first write
  of a turn goes to its transport at once (and marks the turn's end with a `call_soon`); later
  small writes of the turn (a head, a small response) wait, each connection's together, and are
  handed to their transports at the turn's end (`flush`); a big write or several chunks go at
  once, after what their connection has waiting; a close, or an EOF that closes, sends what
  waits first (`close`, `send_now`), an abort drops it (`abort`);
- so on a busy proxy (a turn with many reads) the peers (nginx, the clients) are woken about
  twice a turn, not once a read: most of the system time a request cost beyond the bytes was a
  sleeping reader's wake-up (an inter-processor interrupt on a virtual machine); on a quiet one
  (a read or two a turn) the first write still goes at once, so the peer starts on it while
  the turn goes on and the proxy does not sleep waiting for it (holding every write made a
  proxy at 4 connections sleep and wake 4 times as often: 30% more CPU a request);
- it holds bytes for one turn only and never decides anything about them: no framing, no
  flow control (that stays the transports' and their protocols'), no reading.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

__all__ = ["SMALL", "Outbox"]

# A write longer than this is sent at once (after what its transport has waiting): a big body
# costs its copies, not a wake-up, and holding it would only hold the socket buffers back.
SMALL = 8192

log = logging.getLogger("foobar_lb.proxy")


class Outbox:
    """One event loop's writes of this turn: transport -> bytes (one write) or a list."""

    __slots__ = ("armed", "ctx", "loop", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: dict[Any, Any] = {}
        self.armed = False  # a write was made this turn: the flush is scheduled (nothing
        # waits while it is not)
        # the flush runs in this context, made once: a call_soon that copies the current one
        # costs about twice as much (uvloop), and a flush reads no context variable
        self.ctx = contextvars.copy_context()

    def write(self, t: asyncio.WriteTransport, data: bytes | memoryview) -> None:
        if not self.armed:
            # the turn's first write goes at once: its reader starts on it while this turn
            # goes on (a quiet proxy writes as it always did); the turn's end is marked
            self.armed = True
            self.loop.call_soon(self.flush, context=self.ctx)
            t.write(data)
            return
        if len(data) > SMALL:
            self.send_now(t)
            t.write(data)
            return
        p = self.pending
        old = p.get(t)
        if old is None:
            p[t] = data
        elif type(old) is list:
            old.append(data)
        else:
            p[t] = [old, data]

    def writelines(self, t: asyncio.WriteTransport, chunks: list) -> None:
        """Several chunks (a body, bytes held for a server): sent now, after what `t` has
        waiting."""
        self.send_now(t)
        t.writelines(chunks)

    def flush(self) -> None:
        """Hand every waiting write to its transport (the turn's reads are done)."""
        self.armed = False
        p = self.pending
        if not p:
            return
        self.pending = {}
        for t, data in p.items():
            if t.is_closing():
                continue  # (closed by the peer meanwhile: nothing can go out)
            try:
                if type(data) is list:
                    t.writelines(data)
                else:
                    t.write(data)
            except Exception:  # (one connection's failure must not keep the others' bytes)
                log.exception("internal error while writing")

    def send_now(self, t: asyncio.WriteTransport | None) -> None:
        """What `t` has waiting goes to it now (before its close or its EOF)."""
        if t is None:
            return
        data = self.pending.pop(t, None)
        if data is not None and not t.is_closing():
            if type(data) is list:
                t.writelines(data)
            else:
                t.write(data)

    def close(self, t: asyncio.BaseTransport) -> None:
        """Close `t` after what it has waiting."""
        self.send_now(t)
        t.close()

    def abort(self, t: asyncio.BaseTransport) -> None:
        """Reset `t`: what it has waiting is dropped."""
        self.pending.pop(t, None)
        t.abort()
