"""The outbox: what the HTTP proxy writes during one turn of the event loop leaves together,
once that turn's reads are handled.

Rules of this module:
- every write to a client or server connection of the HTTP proxy goes through its event loop's
  outbox (`write`, `writelines`), which keeps each connection's bytes in order: a small write
  (a head, a small response) is handed to the transport after the reads of this turn (a
  `call_soon` made by the first write of the turn), with the connection's other small writes
  of the turn; a big one, or several chunks, go at once, after what the connection has
  waiting; a close or EOF of a connection with bytes waiting sends them first
  (`close`, `send_now`), an abort drops them (`abort`);
- so the peers (a server, a client) are woken once for what several reads of the same turn
  produced, not once each: on a busy proxy that is most of the system time a request costs
  beyond the bytes themselves (a sleeping reader's wake-up, an inter-processor interrupt on a
  virtual machine); a quiet proxy pays one `call_soon` and writes as before, in the same turn;
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

    __slots__ = ("ctx", "loop", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: dict[Any, Any] = {}
        # the flush runs in this context, made once: a call_soon that copies the current one
        # costs about twice as much (uvloop), and a flush reads no context variable
        self.ctx = contextvars.copy_context()

    def write(self, t: asyncio.WriteTransport, data: bytes | memoryview) -> None:
        if len(data) > SMALL:
            self.send_now(t)
            t.write(data)
            return
        p = self.pending
        if not p:
            self.loop.call_soon(self.flush, context=self.ctx)
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
