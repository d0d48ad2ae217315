"""A client connection's first deadline (`timeout.http_request` from the accept) is held by its
frontend's sweep, not by a timer of its own (proxy/base.py): a connection that ends, or moves its
deadline earlier, before it is near never makes a timer; one still waiting gets a timer of its
own at the same deadline once it is near. Without sockets (the harness of test_simple_path.py);
the deadline's effect over sockets: test_http.py, test_slow_clients.py."""

from __future__ import annotations

import asyncio

import pytest

from foobar_lb.proxy.base import SWEPT, _sweep
from foobar_lb.proxy.http import HttpSession, UpstreamHttp
from test_simple_path import FakeLb, FakeTransport, _frontend

GET = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _session(fe, loop) -> HttpSession:
    s = HttpSession(FakeLb(loop), fe)
    s.connection_made(FakeTransport())
    return s


async def test_the_sweep_holds_a_first_deadline_until_it_is_near():
    loop = asyncio.get_running_loop()
    fe, _ = _frontend(timeout={"http_request": "8s"})
    assert fe.sweep_every == 1.0  # (a quarter of the timeout, at most a second)
    s = _session(fe, loop)
    assert s.th is SWEPT and fe.swept == {s} and fe.sweep_th is not None
    assert s.th_when == pytest.approx(loop.time() + 8)
    fe.sweep_th.cancel()  # (the sweeps run here by hand)
    _sweep(fe, loop)  # far from it: still held
    assert s.th is SWEPT and fe.sweep_th is not None
    fe.sweep_th.cancel()
    s.th_when = when = loop.time() + 1.5  # (as if accepted 6.5 s ago): before the sweep after next
    _sweep(fe, loop)
    assert fe.swept == set() and fe.sweep_th is None
    assert s.th not in (None, SWEPT) and s.th_when == when
    assert s.th.when() == pytest.approx(when, abs=1e-3)  # (uvloop: milliseconds)
    s.connection_lost(None)
    assert s.th is None


async def test_a_connection_served_and_closed_never_makes_a_timer_of_its_own():
    loop = asyncio.get_running_loop()
    fe, be = _frontend()
    server = be.servers[0]
    up = UpstreamHttp(be.pool, server, loop)
    up.connection_made(FakeTransport())
    be.pool.release(server.pool_key, up, loop.time())
    s = _session(fe, loop)
    s.data_received(GET)
    up.data_received(OK)
    assert s.transport.closing and s.th is SWEPT  # (answered and closing: no timer made)
    s.connection_lost(None)
    assert s.th is None and fe.swept == set()
    fe.sweep_th.cancel()


async def test_an_earlier_deadline_takes_the_connection_from_the_sweep():
    loop = asyncio.get_running_loop()
    fe, _ = _frontend(timeout={"http_request": "10s", "client": "2s"})
    s = _session(fe, loop)
    s.pause_writing()  # the client does not read: `timeout client` from now, earlier
    assert s.th not in (None, SWEPT) and fe.swept == set()
    s.connection_lost(None)
    fe.sweep_th.cancel()
