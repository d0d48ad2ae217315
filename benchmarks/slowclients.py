"""Slow clients beside a benchmark: `python -m benchmarks.slowclients PORT KIND COUNT`.

Rule: a measuring instrument, not a product, and a light one (it shares a core with wrk and
nginx): COUNT slow connections to PORT on loopback for as long as it runs, each one a Protocol
with no task of its own; one ticker sends every connection its next bytes once a second and
opens a new connection for each one the proxy closed.
- `slowloris`: a request head sent one byte a second, never finished;
- `trickle`: a POST with `Content-Length: 1048576` whose body comes at 10 bytes a second.
On SIGTERM it stops, closes everything and prints one JSON line: connections opened, closed by
the proxy, and how many of those were answered 408 first.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys

HEAD = b"GET / HTTP/1.1\r\nHost: slow.test\r\nUser-Agent: slowloris\r\nX-Pad: " + b"a" * 4000
UPLOAD = (b"POST /upload HTTP/1.1\r\nHost: slow.test\r\nContent-Type: application/octet-stream\r\n"
          b"Content-Length: 1048576\r\n\r\n")
BODY_STEP = b"x" * 10


class Counts:
    opened = 0
    closed = 0
    answered_408 = 0
    failed = 0


class Slow(asyncio.Protocol):
    def __init__(self, kind: str, counts: Counts):
        self.kind = kind
        self.counts = counts
        self.transport: asyncio.Transport | None = None
        self.pos = 0
        self.first = b""
        self.closed = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.counts.opened += 1
        if self.kind == "trickle":
            transport.write(UPLOAD)

    def tick(self) -> None:
        if self.closed or self.transport.is_closing():
            return  # (the ticker counts it and opens another)
        if self.kind == "slowloris":
            if self.pos < len(HEAD):
                self.transport.write(HEAD[self.pos:self.pos + 1])
                self.pos += 1
        else:
            self.transport.write(BODY_STEP)

    def data_received(self, data: bytes) -> None:
        if not self.first:
            self.first = data[:16]
        self.transport.close()  # an answer: this connection is over

    def connection_lost(self, exc) -> None:
        self.closed = True


async def main(port: int, kind: str, count: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    counts = Counts()
    conns: list[Slow] = []

    async def open_one() -> None:
        try:
            _, p = await loop.create_connection(lambda: Slow(kind, counts), "127.0.0.1", port)
            conns.append(p)
        except OSError:
            counts.failed += 1

    for _ in range(count):  # spread the opening over a second
        await open_one()
        await asyncio.sleep(1.0 / count)
    print(json.dumps({"ready": True}), flush=True)
    while not stop.is_set():
        for c in [c for c in conns if c.closed]:
            conns.remove(c)
            counts.closed += 1
            if c.first.startswith(b"HTTP/1.1 408"):
                counts.answered_408 += 1
            await open_one()
        for c in conns:
            c.tick()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    for c in conns:
        c.transport.close()
    print(json.dumps({"kind": kind, "count": count, "opened": counts.opened,
                      "closed_by_proxy": counts.closed, "answered_408": counts.answered_408,
                      "connect_failures": counts.failed}), flush=True)


if __name__ == "__main__":
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover
        run = asyncio.run
    run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
