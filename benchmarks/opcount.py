"""Python work per request, without sockets: bytecodes the event loop's thread runs for N
requests through an `HttpSession` with fake transports and one pooled server connection
(the harness of tests/test_simple_path.py), counted with `sys.settrace` (`f_trace_opcodes`).

    PYTHONPATH=src python -m benchmarks.opcount [--requests 2000] [--access-log PATH]
                                                [--format text|json] [--time N]
                                                [--paths simple,full,close,tcp] [--untraced N]

Prints the bytecodes per request on each path: `simple` (a plain GET alone in its read),
`full` (the same GET with a field the simple path leaves to llhttp), `close` (a new client
connection per request, `Connection: close`, as `wrk -H "Connection: close"`: the session made,
admitted by a real `Admission` over a worker's group-wide slots (a semaphore in shared memory),
the request, the response, the close) and
`tcp` (a TCP-mode relay: one read from the client and one from the server per request, on a
connected session). Run it on two checkouts to see what a change costs. With --access-log, the
lines are formatted and handed to the writer thread (whose own work, off the loop, is not
counted): the timer that hands them over does not run here (a few times a second, not per
request). With --time N, N more requests run untraced and their time per request is printed
too (the best of 5 runs; a busy machine makes it noisy, the bytecode count is exact). With
--untraced N, nothing is traced or printed: N requests of each path run after the warm-up, for
`valgrind --tool=callgrind` (instructions per request: the difference of two runs with
different N, divided by the difference of N).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from foobar_lb import config_from_dict, new_event_loop
from foobar_lb.admission import Admission
from foobar_lb.build import build
from foobar_lb.proxy.http import HttpSession, UpstreamHttp
from foobar_lb.proxy.outbox import Outbox
from foobar_lb.proxy.tcp import TcpSession, TcpUpstream
from foobar_lb.shared import F_CURRENT, Counters, Layout, SemSlots, SemTable

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
SIMPLE = b"GET /index.html HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\n\r\n"
FULL = b"GET /index.html HTTP/1.1\r\nHost: example.test\r\nAccept: */*\r\nContent-Length: 0\r\n\r\n"
CLOSE = b"GET /index.html HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n"
PATHS = ("simple", "full", "close", "tcp")


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
    """What the Protocols see of `serving.Serving`: admission is a real one, over the global
    maxconn's semaphore as in a worker (`close` counts it per connection)."""

    def __init__(self, loop) -> None:
        self.loop = loop
        self.outbox = Outbox(loop)  # (flushed after each request: a turn of the loop each)
        table = self.sems = SemTable()  # (kept: the slots are at an address in its region)
        slots = SemSlots(table.region, table.slots(("maxconn",), 1 << 20), 1 << 20)
        self.admission = Admission(loop, slots)
        self.admit = self.admission.admit
        self.leave = self.admission.leave

    def spawn(self, coro) -> None:
        coro.close()
        raise AssertionError("a request asked for a new server connection")


def _setup(loop, path: str, log: dict | None):
    mode = "tcp" if path == "tcp" else "http"
    cfg = config_from_dict({
        "frontends": {"f": {"bind": "127.0.0.1:0", "default_backend": "b", "mode": mode}},
        "backends": {"b": {"servers": [{"address": "127.0.0.1:9"}], "check": False,
                           "mode": mode}},
        **({"log": log} if log and mode == "http" else {})})
    built = build(cfg, layout=Layout(), counters=Counters())
    fe, be = built.frontends["f"], built.backends["b"]
    alog = None
    if log and mode == "http":
        from foobar_lb.accesslog import AccessLog

        alog = AccessLog(cfg.log, loop)
        fe.alog = fe.no_route.alog = alog.request
        for route in fe.routes.values():
            route.alog = alog.request
    return fe, be, alog


async def count(path: str, n: int, log: dict | None, timed: int = 0,
                untraced: int = 0) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    fe, be, alog = _setup(loop, path, log)
    lb = FakeLb(loop)
    server = be.servers[0]
    if path == "tcp":
        s = TcpSession(lb, fe)
        # connected as _connect leaves it (its server assigned, its upstream up)
        _, got = be.assign(b"10.1.2.3", s, None, loop.time())
        assert got is server
        s.server = server
        s.up = TcpUpstream(s)
        s.up.connection_made(FakeTransport())
        s.transport = FakeTransport()
        up = s.up

        def one() -> None:
            s.data_received(SIMPLE)
            up.data_received(RESPONSE)
    else:
        up = UpstreamHttp(be.pool, server, loop, lb.outbox)
        flush = lb.outbox.flush
        up.connection_made(FakeTransport())
        be.pool.release(server.pool_key, up, loop.time())
        if path == "close":
            served = [0]

            def make():  # (serving._factory's)
                return HttpSession(lb, fe)

            def one() -> None:
                s = make()
                s.connection_made(FakeTransport())
                s.data_received(CLOSE)
                flush()
                up.data_received(RESPONSE)
                assert s.transport.closing
                s.connection_lost(None)
                served[0] += s.served
        else:
            s = HttpSession(lb, fe)
            s.connection_made(FakeTransport())
            request = SIMPLE if path == "simple" else FULL

            def one() -> None:
                s.data_received(request)
                flush()
                up.data_received(RESPONSE)
                flush()

    for _ in range(50):  # warm up (memos, the pool's state)
        one()
    if untraced:
        for _ in range(untraced):
            one()
        return 0.0, 0.0
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
    want = n + 50 + 5 * timed
    if path == "tcp":
        assert up.transport is not None and not s.transport.closing
    elif path == "close":
        assert served[0] == want, served
        assert not lb.admission.sessions and fe.ctr[fe.cbase + F_CURRENT] == 0
    else:
        assert s.served == want, s.served
    return ops / n, best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.opcount")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--access-log", default=None)
    p.add_argument("--format", default="text")
    p.add_argument("--time", type=int, default=0, metavar="N",
                   help="also time N requests untraced (best of 5)")
    p.add_argument("--paths", default=",".join(PATHS),
                   help=f"which of {', '.join(PATHS)} (comma-separated)")
    p.add_argument("--untraced", type=int, default=0, metavar="N",
                   help="run N requests of each path untraced, print nothing (for callgrind)")
    a = p.parse_args(argv)
    log = {"access": a.access_log, "format": a.format} if a.access_log else None
    paths = [x for x in a.paths.split(",") if x]
    for x in paths:
        if x not in PATHS:
            p.error(f"unknown path {x!r}")
    loop = new_event_loop()
    for name in paths:
        ops, took = loop.run_until_complete(count(name, a.requests, log, a.time, a.untraced))
        if not a.untraced:
            print(f"{name}: {ops:.1f} bytecodes per request"
                  + (f", {took * 1e6:.2f} us untraced" if took else ""))
    loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
