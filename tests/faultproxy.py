"""A fault-injecting TCP proxy for tests (Toxiproxy in spirit, on asyncio).

A test starts a `FaultProxy` on a free loopback port in front of a real server and points the
load balancer at the proxy instead of the server. Every toxic is a plain attribute, read when
it matters (at accept for the connection-level ones, at each chunk for the others), so a test
can break a server in the middle of a load and heal it again.

Toxics (what a connection through the proxy gets):
- `latency = s`: every chunk, both ways, delayed by `s` seconds (order kept);
- `bandwidth = n`: the server's bytes trickle to the client at `n` bytes a second;
- `reset_after = n`: after `n` bytes of the server's answer were forwarded (0: when its first
  byte comes), both sides are reset (SO_LINGER 0, then close: an RST, not a FIN);
- `never_answer = True`: accepted, the client's bytes read and dropped, nothing written, no
  server connection made; on a connection open already, bytes both ways are dropped from then
  on (the server is not told);
- `close_now = True`: accepted and closed at once (a FIN, before any byte is read);
- `slow_close = s`: when the server closes, the client's side is closed `s` seconds later;
- `stall_after = n`: `n` bytes of the server's answer are forwarded, then nothing more (both
  sides stay open until a toxic changes or the client goes);
- `half_open = True`: the client's bytes reach the server, the server's answer is read and
  dropped: the server did the work, the client never hears of it.
`close_now` applies to connections accepted after the change; the others to the next chunk of
every open connection too.

Rules of this module: it parses nothing (it is below HTTP); it only ever ends connections it
accepted or opened itself; `stop()` ends all of them and the listener; counters (`accepted`,
`resets`, `open`) let a test assert what happened without sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

__all__ = ["FaultProxy", "rst_close"]

LOOPBACK = "127.0.0.1"
TOXICS = {"latency": 0.0, "bandwidth": 0, "reset_after": None, "never_answer": False,
          "close_now": False, "slow_close": 0.0, "stall_after": None, "half_open": False}


def rst_close(writer: asyncio.StreamWriter | asyncio.Transport) -> None:
    """Close with an RST: SO_LINGER on with a zero timeout, then close."""
    transport = writer.transport if isinstance(writer, asyncio.StreamWriter) else writer
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class FaultProxy:
    """A TCP proxy on loopback in front of `upstream` ("host:port" or (host, port))."""

    def __init__(self, upstream: str | tuple[str, int], host: str = LOOPBACK, **toxics):
        if isinstance(upstream, str):
            h, _, p = upstream.rpartition(":")
            upstream = (h, int(p))
        self.upstream = upstream
        self.host = host
        self.port = 0
        self.latency = 0.0
        self.bandwidth = 0
        self.reset_after: int | None = None
        self.never_answer = False
        self.close_now = False
        self.slow_close = 0.0
        self.stall_after: int | None = None
        self.half_open = False
        self.set(**toxics)
        self.accepted = 0  # client connections accepted
        self.resets = 0  # connections ended with an RST by `reset_after`
        self.open = 0  # client connections open now
        self.server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task] = set()
        self._changed = asyncio.Event()  # set whenever a toxic changes (a stall may end)

    # -- control -------------------------------------------------------------------------------
    def set(self, **toxics) -> FaultProxy:
        """Change toxics (by name, see the module's table); the others stay as they are."""
        for name, value in toxics.items():
            if name not in TOXICS:
                raise TypeError(f"no toxic {name!r}")
            setattr(self, name, value)
        if hasattr(self, "_changed"):
            self._changed.set()
            self._changed = asyncio.Event()
        return self

    def heal(self) -> FaultProxy:
        """Every toxic off: a plain proxy again (stalled connections forward again)."""
        return self.set(**TOXICS)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, port: int = 0) -> FaultProxy:
        self.server = await asyncio.start_server(self._accept, self.host, port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for w in list(self._writers):
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def abort_all(self) -> None:
        """Reset every connection open now (both sides)."""
        for w in list(self._writers):
            rst_close(w)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- connections ---------------------------------------------------------------------------
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.accepted += 1
        self.open += 1
        self._writers.add(writer)
        up_w = None
        try:
            if self.close_now:
                writer.close()
                return
            if self.never_answer:
                with contextlib.suppress(OSError):
                    while await reader.read(65536):  # read and dropped until the client goes
                        pass
                return
            try:
                up_r, up_w = await asyncio.open_connection(*self.upstream)
            except OSError:
                rst_close(writer)
                return
            self._writers.add(up_w)
            conn = _Conn()
            conn.down = asyncio.ensure_future(self._down(up_r, writer, up_w, conn))
            await asyncio.gather(self._up(reader, up_w, conn), conn.down, return_exceptions=True)
        finally:
            self.open -= 1
            self._writers.discard(writer)
            if up_w is not None:
                self._writers.discard(up_w)
                up_w.transport.abort()
            writer.transport.abort()
            self._tasks.discard(task)

    async def _up(self, reader: asyncio.StreamReader, up_w: asyncio.StreamWriter,
                  conn: _Conn) -> None:
        """Client to server: latency only."""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    # the client closed: passed on; a server whose answer goes nowhere (stalled,
                    # dropped) is let go, as a real server would be by its peer's close
                    if conn.stalled or self.half_open or self.never_answer:
                        conn.down.cancel()
                    elif not up_w.transport.is_closing() and up_w.can_write_eof():
                        up_w.write_eof()
                    return
                if self.latency:
                    await asyncio.sleep(self.latency)
                if conn.done:
                    return
                if self.never_answer:
                    continue  # dropped
                up_w.write(data)
                await up_w.drain()
        except (OSError, ConnectionError):
            return

    async def _down(self, up_r: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    up_w: asyncio.StreamWriter, conn: _Conn) -> None:
        """Server to client: every toxic."""
        try:
            while True:
                data = await up_r.read(65536)
                if not data:
                    if self.slow_close:
                        await asyncio.sleep(self.slow_close)
                    conn.done = True
                    writer.close()
                    return
                if self.latency:
                    await asyncio.sleep(self.latency)
                while data:
                    if self.half_open or self.never_answer:
                        break  # read and dropped
                    limit = self.reset_after
                    if limit is not None and conn.sent + len(data) > limit:
                        keep = max(0, limit - conn.sent)
                        if keep:
                            writer.write(data[:keep])
                            await writer.drain()
                        self.resets += 1
                        conn.done = True
                        rst_close(writer)
                        rst_close(up_w)
                        return
                    stall = self.stall_after
                    if stall is not None and conn.sent + len(data) > stall:
                        keep = max(0, stall - conn.sent)
                        if keep:
                            writer.write(data[:keep])
                            conn.sent += keep
                            data = data[keep:]
                            await writer.drain()
                        conn.stalled = True
                        await self._changed.wait()  # until a toxic changes
                        conn.stalled = False
                        continue
                    piece = data
                    if self.bandwidth:
                        # each piece waits its own time first: n bytes take n / bandwidth
                        # seconds to arrive, the last one included
                        piece = data[:max(1, self.bandwidth // 20)]
                        await asyncio.sleep(len(piece) / self.bandwidth)
                    writer.write(piece)
                    conn.sent += len(piece)
                    data = data[len(piece):]
                    await writer.drain()
        except (OSError, ConnectionError):
            return


class _Conn:
    __slots__ = ("done", "down", "sent", "stalled")

    def __init__(self):
        self.sent = 0  # bytes of the server's answer forwarded to the client
        self.done = False
        self.stalled = False
        self.down: asyncio.Future | None = None
