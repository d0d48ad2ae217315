"""Holding many idle keep-alive client connections open against a proxy, from the runner itself.

Rule: a connection counts as idle and built only after its one small request got a complete
200 answer over it; it then stays open, sending nothing, until the measurement is taken. The
whole opening is bounded in time, and every socket is closed (with a reset, so no TIME_WAIT
is left behind) before the function returns, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from .tools import LOOPBACK


class _Conn(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, request: bytes) -> None:
        self.request = request
        self.buf = bytearray()
        self.answered: asyncio.Future[None] = loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.answered.done():
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        if not head[0].startswith("HTTP/1.1 200"):
            self.answered.set_exception(ConnectionError(f"answer: {head[0]!r}"))
            return
        length = 0
        for line in head[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if len(self.buf) >= end + 4 + length:
            self.answered.set_result(None)
            self.buf = bytearray()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.answered.done():
            self.answered.set_exception(ConnectionError(f"closed before the answer ({exc or 'EOF'})"))

    def abort(self) -> None:
        if self.transport is not None and not self.closed:
            sock = self.transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.transport.abort()


@dataclass
class IdleResult:
    wanted: int
    opened: int  # answered and still open when measured
    failed: int
    first_error: str
    open_seconds: float
    rss_before_kib: int
    rss_after_kib: int

    @property
    def kib_per_conn(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) / self.opened if self.opened else float("nan")


async def _open_one(loop: asyncio.AbstractEventLoop, port: int, request: bytes, timeout: float) -> _Conn:
    _, conn = await asyncio.wait_for(
        loop.create_connection(lambda: _Conn(loop, request), LOOPBACK, port), timeout)
    try:
        await asyncio.wait_for(asyncio.shield(conn.answered), timeout)
    except BaseException:
        conn.abort()
        raise
    return conn


async def _hold(port: int, count: int, batch: int, time_limit: float, rss: Callable[[], int],
                settle: float) -> IdleResult:
    loop = asyncio.get_running_loop()
    request = f"GET / HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n\r\n".encode()
    # warm-up: a few connections opened, answered and closed, so the baseline includes the code
    # paths and buffers any first request builds
    warm = await asyncio.gather(*(_open_one(loop, port, request, 10.0) for _ in range(20)),
                                return_exceptions=True)
    for c in warm:
        if isinstance(c, _Conn):
            c.transport.close()  # type: ignore[union-attr]
    await asyncio.sleep(settle)
    before = rss()
    conns: list[_Conn] = []
    failed = 0
    first_error = ""
    start = time.monotonic()
    try:
        while len(conns) + failed < count and time.monotonic() - start < time_limit:
            n = min(batch, count - len(conns) - failed)
            results = await asyncio.gather(*(_open_one(loop, port, request, 10.0) for _ in range(n)),
                                           return_exceptions=True)
            for r in results:
                if isinstance(r, _Conn):
                    conns.append(r)
                else:
                    failed += 1
                    first_error = first_error or f"{type(r).__name__}: {r}"
            if failed > max(50, count // 20):
                break  # the proxy refuses: stop piling on
        elapsed = time.monotonic() - start
        await asyncio.sleep(settle)
        still_open = sum(1 for c in conns if not c.closed)
        after = rss()
        if still_open < len(conns):
            failed += len(conns) - still_open
            first_error = first_error or "connections closed by the proxy while idle"
        return IdleResult(count, still_open, failed, first_error, elapsed, before, after)
    finally:
        for c in conns:
            c.abort()
        await asyncio.sleep(0.2)


def hold_idle(port: int, count: int, rss: Callable[[], int], batch: int = 250,
              time_limit: float = 120.0, settle: float = 1.0) -> IdleResult:
    """Open `count` idle keep-alive connections to `port` (each after one answered GET /) and
    measure `rss()` before and after; all of them are closed again before this returns."""
    return asyncio.run(_hold(port, count, batch, time_limit, rss, settle))
