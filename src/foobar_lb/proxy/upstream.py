"""Keep-alive pools of idle server connections (aiohttp connector's shape).

Rule of this module: a pool keeps, per key, a deque of idle connections with the time each
went idle; the key is a server's `pool_key`, (server, TLS settings or None), so that a TLS
connection is never handed out for a plain one, nor one TLS setting's for another's; a
checkout takes the newest one that is still open and not too old, so connections a server may
have closed meanwhile are the ones left to expire. It never picks servers and never
reads or writes: a connection that receives bytes or closes while idle marks itself `closed`
and is skipped (and dropped by the next purge).
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Protocol

__all__ = ["Pool", "Pooled"]


class Pooled(Protocol):
    closed: bool
    idle_since: float

    def close(self) -> None: ...


class Pool:
    __slots__ = ("_timer", "idle", "idle_timeout", "max_idle")

    def __init__(self, max_idle: int = 64, idle_timeout: float = 5.0):
        self.idle: dict[Any, deque[Pooled]] = {}
        self.max_idle = max_idle  # per server
        self.idle_timeout = idle_timeout
        self._timer: asyncio.TimerHandle | None = None

    def acquire(self, key: Any, now: float) -> Pooled | None:
        dq = self.idle.get(key)
        if not dq:
            return None
        limit = now - self.idle_timeout
        while dq:
            conn = dq.pop()
            if conn.closed:
                continue
            if conn.idle_since < limit:
                conn.close()
                continue
            return conn
        return None

    def release(self, key: Any, conn: Pooled, now: float) -> None:
        if self.max_idle <= 0:
            conn.close()
            return
        dq = self.idle.get(key)
        if dq is None:
            dq = self.idle[key] = deque()
        conn.idle_since = now
        dq.append(conn)
        if len(dq) > self.max_idle:
            dq.popleft().close()
        if self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(self.idle_timeout / 2, 0.05), self._purge)

    def drop(self, server: Any) -> None:
        """Close every idle connection to `server` (it went down or out of rotation)."""
        for key in [k for k in self.idle if k[0] is server]:
            dq = self.idle.pop(key)
            while dq:
                dq.pop().close()

    def count(self, server: Any) -> int:
        """Idle connections to `server` (any key of it) that are still open."""
        return sum(1 for key, dq in self.idle.items() if key[0] is server
                   for c in dq if not c.closed)

    def _purge(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        limit = loop.time() - self.idle_timeout
        left = 0
        for dq in self.idle.values():
            # oldest on the left: expired and closed ones go, the rest stays in order
            kept = [c for c in dq if not c.closed and c.idle_since >= limit]
            for c in dq:
                if not c.closed and c.idle_since < limit:
                    c.close()
            dq.clear()
            dq.extend(kept)
            left += len(kept)
        if left:
            self._timer = loop.call_later(max(self.idle_timeout / 2, 0.05), self._purge)

    def shrink(self) -> int:
        """Close every idle connection (this process is out of descriptors): how many."""
        n = 0
        for dq in self.idle.values():
            while dq:
                conn = dq.pop()
                if not conn.closed:
                    conn.close()
                    n += 1
        return n

    def close_all(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for dq in self.idle.values():
            while dq:
                dq.pop().close()
