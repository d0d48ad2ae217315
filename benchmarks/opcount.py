"""Python work per request, without sockets: bytecodes the event loop's thread runs for N
requests through an `HttpSession` with fake transports and one pooled server connection
(the harness of tests/test_simple_path.py), counted with `sys.settrace` (`f_trace_opcodes`).

    PYTHONPATH=src python -m benchmarks.opcount [--requests 2000] [--access-log PATH]
                                                [--format text|json] [--time N]

Prints the bytecodes per request on the simple path (a plain GET alone in its read) and on
the full path (the same GET with a field the simple path leaves to llhttp). Run it on two
checkouts to see what a change costs. With --access-log, the lines are formatted and handed
to the writer thread (whose own work, off the loop, is not counted): the timer that hands
them over does not run here (a few times a second, not per request). With --time N, N more
requests run untraced and their time per request is printed too (the best of 5 runs; a busy
machine makes it noisy, the bytecode count is exact).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from foobar_lb import config_from_dict, new_event_loop
from foobar_lb.build import build
from foobar_lb.proxy.http import HttpSession, UpstreamHttp
from foobar_lb.shared import Counters, Layout

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SIMPLE = b"GET /index.html HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\n\r\n"
FULL = b"GET /index.html HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\nContent-Length: 0\r\n\r\n"


class FakeTransport:
    def __init__(self) -> None:
        self.closing = False

    def write(self, data) -> None:
        pass

    def writelines(self, chunks) -> None:
        pass

    def get_extra_info(self, key, default=None):
        return ("10.1.2.3", 40000) if key == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class FakeLb:
    def __init__(self, loop) -> None:
        self.loop = loop

    def admit(self, session) -> bool:
        return True

    def leave(self, session) -> None:
        pass

    def spawn(self, coro) -> None:
        coro.close()
        raise AssertionError("a request asked for a new server connection")


async def count(request: bytes, n: int, log: dict | None,
                timed: int = 0) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    cfg = config_from_dict({
        "frontends": {"f": {"bind": "127.0.0.1:0", "default_backend": "b"}},
        "backends": {"b": {"servers": [{"address": "127.0.0.1:9"}], "check": False}},
        **({"log": log} if log else {})})
    built = build(cfg, layout=Layout(), counters=Counters())
    fe, be = built.frontends["f"], built.backends["b"]
    alog = None
    if log:
        from foobar_lb.accesslog import AccessLog

        alog = AccessLog(cfg.log, loop)
        fe.alog = fe.no_route.alog = alog.request
        for route in fe.routes.values():
            route.alog = alog.request
    server = be.servers[0]
    up = UpstreamHttp(be.pool, server, loop)
    up.connection_made(FakeTransport())
    be.pool.release(server.pool_key, up, loop.time())
    s = HttpSession(FakeLb(loop), fe)
    s.connection_made(FakeTransport())

    def one() -> None:
        s.data_received(request)
        up.data_received(RESPONSE)

    for _ in range(50):  # warm up (memos, the pool's state)
        one()
    ops = 0

    def tracer(frame, event, arg):
        frame.f_trace_opcodes = True
        if event == "opcode":
            nonlocal ops
            ops += 1
        return tracer

    sys.settrace(tracer)
    try:
        for _ in range(n):
            one()
    finally:
        sys.settrace(None)
    best = 0.0
    for _ in range(5 if timed else 0):
        t = time.perf_counter()
        for _ in range(timed):
            one()
        took = (time.perf_counter() - t) / timed
        best = took if not best else min(best, took)
    if alog is not None:
        alog.close()
    assert s.served == n + 50 + 5 * timed, s.served
    return ops / n, best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.opcount")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--access-log", default=None)
    p.add_argument("--format", default="text")
    p.add_argument("--time", type=int, default=0, metavar="N",
                   help="also time N requests untraced (best of 5)")
    a = p.parse_args(argv)
    log = {"access": a.access_log, "format": a.format} if a.access_log else None
    loop = new_event_loop()
    for name, req in (("simple", SIMPLE), ("full", FULL)):
        ops, took = loop.run_until_complete(count(req, a.requests, log, a.time))
        print(f"{name}: {ops:.1f} bytecodes per request"
              + (f", {took * 1e6:.2f} us untraced" if took else ""))
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
