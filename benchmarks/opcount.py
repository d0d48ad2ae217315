"""Python work per request on the hot path, without sockets: opcodes and calls.

`python -m benchmarks.opcount [--requests N] [--simple|--full]` drives one `HttpSession` and one
pooled `UpstreamHttp` on fake transports (as tests/test_simple_path.py does): a keep-alive GET
from the client, its 200 from the server, N times on the same two connections, and counts with
`sys.settrace` (`f_trace_opcodes`) the Python opcodes executed and the Python functions called
per request (C code, the parsers and the event loop's own work, is not counted). It is a
count, not a timing: the same on any machine, so a change's cost can be compared exactly.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from foobar_lb import config_from_dict
from foobar_lb.build import build
from foobar_lb.proxy.http import HttpSession, UpstreamHttp
from foobar_lb.shared import Counters, Layout

REQUEST = b"GET /index.html HTTP/1.1\r\nHost: example.test\r\nUser-Agent: wrk\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: app\r\nContent-Type: text/plain\r\n"
            b"Content-Length: 13\r\n\r\nHello, world!")


class FakeTransport:
    def __init__(self):
        self.out: list[bytes] = []
        self.closing = False

    def write(self, data):
        self.out.append(data)

    def writelines(self, chunks):
        self.out.extend(chunks)

    def get_extra_info(self, key, default=None):
        return ("10.1.2.3", 40000) if key == "peername" else default

    def is_closing(self):
        return self.closing

    def close(self):
        self.closing = True

    def abort(self):
        self.closing = True

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def can_write_eof(self):
        return True


class FakeLb:
    def __init__(self, loop):
        self.loop = loop

    def admit(self, session):
        return True

    def leave(self, session):
        pass

    def spawn(self, coro):
        coro.close()
        raise AssertionError("a request asked for a new server connection")


class _Count:
    def __init__(self):
        self.opcodes = 0
        self.calls = 0

    def trace(self, frame, event, arg):
        if event == "call":
            self.calls += 1
            frame.f_trace_opcodes = True
            frame.f_trace_lines = False
        elif event == "opcode":
            self.opcodes += 1
        return self.trace


async def _run(n: int, full: bool, timed: int = 0) -> tuple[float, float, float]:
    loop = asyncio.get_running_loop()
    fe_cfg = {"bind": "127.0.0.1:0", "default_backend": "b"}
    if full:  # a routing rule: every request takes the full path (llhttp)
        fe_cfg["rules"] = [{"path_prefix": "/", "backend": "b"}]
    cfg = config_from_dict({"frontends": {"f": fe_cfg},
                            "backends": {"b": {"servers": [{"address": "127.0.0.1:9"}],
                                               "check": False}}})
    built = build(cfg, layout=Layout(), counters=Counters())
    fe, be = built.frontends["f"], built.backends["b"]
    server = be.servers[0]
    up = UpstreamHttp(be.pool, server, loop)
    ut = FakeTransport()
    up.connection_made(ut)
    be.pool.release(server.pool_key, up, loop.time())
    s = HttpSession(FakeLb(loop), fe)
    ct = FakeTransport()
    s.connection_made(ct)

    def one() -> None:
        s.data_received(REQUEST)
        up.data_received(RESPONSE)

    for _ in range(50):  # warm up (specialisation, the pool's timer, first-request paths)
        one()
    ct.out.clear()
    ut.out.clear()
    count = _Count()
    sys.settrace(count.trace)
    try:
        for _ in range(n):
            one()
    finally:
        sys.settrace(None)
    assert len(ct.out) == n and all(o.startswith(b"HTTP/1.1 200 OK") for o in ct.out), ct.out[:2]
    assert len(ut.out) == n
    # (`one`'s own few opcodes per request are counted too: a constant)
    best = 0.0
    for _ in range(5 if timed else 0):  # best of 5: the harness's time per request, no trace
        ct.out.clear()
        ut.out.clear()
        t = time.perf_counter()
        for _ in range(timed):
            one()
        took = (time.perf_counter() - t) / timed
        best = took if not best else min(best, took)
    return count.opcodes / n, count.calls / n, best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.opcount", description=__doc__)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--full", action="store_true", help="the full (llhttp) path, not the simple one")
    p.add_argument("--time", type=int, default=0, metavar="N",
                   help="also time N requests untraced (best of 5; noisy on a busy machine)")
    args = p.parse_args(argv)
    ops, calls, took = asyncio.run(_run(args.requests, args.full, args.time))
    path = "full" if args.full else "simple"
    print(f"{path} path: {ops:.1f} Python opcodes and {calls:.1f} Python calls per request"
          + (f"; {took * 1e6:.2f} us per request untraced" if took else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
