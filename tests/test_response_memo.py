"""The response memo (`UpstreamHttp.data_received`) against the full path, without sockets.

A response whose head llhttp accepted lately on a route, whole in one read with its body, may
skip llhttp and `response_head`; what the client gets (and what is counted) must be exactly
what the full path gives the same bytes. Each sequence of exchanges goes through two sessions:
one whose routes remember nothing (every response takes the full path) and one with the memo.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foobar_lb.proxy.http import HttpSession, UpstreamHttp
from foobar_lb.shared import F_1XX
from test_simple_path import FakeLb, FakeTransport, _frontend

GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
HEAD = b"HEAD / HTTP/1.1\r\nHost: a\r\n\r\n"
GET10 = b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n"
GET_CLOSE = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"


class _Forgetful(dict):
    def __setitem__(self, key, value):  # remembers nothing: the full path every time
        pass


class CountingUpstream(UpstreamHttp):
    """Counts the responses llhttp began: the ones the full path parsed."""

    __slots__ = ("full",)

    def on_message_begin(self):
        self.full += 1
        super().on_message_begin()


def _run(exchanges: list[tuple[bytes, list[bytes]]], memo: bool, **frontend):
    """Each (request, reads of its response) through one session (a new one after a client
    connection the proxy closed) and one pooled server connection: (what the client got for
    each, responses by class, responses llhttp began, whether the server connection is still
    open)."""
    loop = asyncio.get_running_loop()
    fe, be = _frontend(**frontend)
    if not memo:
        for rt in fe.routes.values():
            rt.resp_memo = _Forgetful()
            rt.resp_memo_close = _Forgetful()
    server = be.servers[0]
    lb = FakeLb(loop)
    up = CountingUpstream(be.pool, server, loop, lb.outbox)
    up.full = 0
    ut = FakeTransport()
    up.connection_made(ut)
    be.pool.release(server.pool_key, up, loop.time())
    s = HttpSession(lb, fe)
    ct = FakeTransport()
    s.connection_made(ct)
    got = []
    for req, reads in exchanges:
        s.data_received(req)
        for data in reads:
            up.data_received(data)
        lb.outbox.flush()
        got.append(b"".join(ct.out))
        ct.out.clear()
        if up.closed:
            break
        if ct.closing:  # the client's next request comes on a new connection
            s.connection_lost(None)
            s = HttpSession(lb, fe)
            ct = FakeTransport()
            s.connection_made(ct)
    # the frontend's responses by class: the server's (its cells for this frontend), the
    # proxy's own to requests routed to the backend, and those routed nowhere
    route = fe.routes[be.name]
    blocks = (server.fcls[route.fi] + 1, route.ocls + 1, fe.cbase + F_1XX)
    classes = [sum(fe.ctr[b + c] for b in blocks) for c in range(5)]
    return got, classes, up.full, not up.closed


async def same(exchanges, **frontend):
    full = _run(exchanges, False, **frontend)
    memo = _run(exchanges, True, **frontend)
    assert memo[:2] == full[:2], (exchanges, full, memo)
    assert memo[3] == full[3]
    assert full[2] >= len(full[0])  # (without the memo, llhttp parsed every response)
    return memo


def resp(status=200, body=b"hello\n", extra=b"", date=b"Mon, 30 Nov 2026 06:00:00 GMT"):
    reason = {200: b"OK", 404: b"Not Found", 500: b"Internal Server Error"}.get(status, b"X")
    return (b"HTTP/1.1 %d %s\r\nServer: nginx\r\nDate: %s\r\nContent-Length: %d\r\n%s"
            b"Connection: keep-alive\r\n\r\n%s" % (status, reason, date, len(body), extra, body))


async def test_a_repeated_head_skips_llhttp_and_gives_the_same_bytes():
    r = resp()
    got, classes, full, open_ = await same([(GET, [r])] * 5)
    assert full == 1  # the first parsed, the four others from the memo
    assert got == [b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 30 Nov 2026 06:00:00 GMT\r\n"
                   b"Content-Length: 6\r\n\r\nhello\n"] * 5
    assert classes == [0, 5, 0, 0, 0] and open_


async def test_the_memo_needs_the_same_head_and_length_and_a_whole_read():
    other_date = resp(date=b"Mon, 30 Nov 2026 06:00:01 GMT")
    longer = resp(body=b"hello!\n")  # another head (its length) : parsed
    ex = [(GET, [resp()]), (GET, [resp()]), (GET, [other_date]), (GET, [resp()[:-2], resp()[-2:]]),
          (GET, [resp(404, b"nope")]), (GET, [resp(404, b"nope")]), (GET, [longer])]
    _, classes, full, open_ = await same(ex)
    assert full == 5 and classes == [0, 5, 0, 2, 0] and open_


@pytest.mark.parametrize("req", [HEAD, GET10])
async def test_heads_and_gets_of_http10_take_the_full_path(req):
    _, _, full, _ = await same([(GET, [resp()]), (req, [resp(body=b"") if req == HEAD else resp()])])
    assert full == 2


async def test_closing_clients_have_a_memo_of_their_own():
    # a client that closes after the response gets `Connection: close`: another head, from
    # another memo (each client a new connection, as `wrk -H "Connection: close"`)
    got, classes, full, open_ = await same([(GET_CLOSE, [resp()])] * 3 + [(GET, [resp()])] * 3)
    assert full == 2 and classes == [0, 6, 0, 0, 0] and open_
    assert got[:3] == [b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 30 Nov 2026 06:00:00 "
                       b"GMT\r\nContent-Length: 6\r\nconnection: close\r\n\r\nhello\n"] * 3
    assert got[3:] == [got[0].replace(b"connection: close\r\n", b"")] * 3


async def test_a_server_asking_to_close_or_bytes_after_the_response_are_never_remembered():
    closing = resp().replace(b"Connection: keep-alive", b"Connection: close")
    got, _, full, open_ = await same([(GET, [closing]), (GET, [closing])])
    # (the server's Connection is its own: the client stays)
    assert got == [b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 30 Nov 2026 06:00:00 GMT\r\n"
                   b"Content-Length: 6\r\n\r\nhello\n"]
    assert full == 1 and not open_  # (closed after the first)
    trailing = resp() + b"HTTP/1.1 200 OK\r\n"
    _, _, full, open_ = await same([(GET, [trailing]), (GET, [trailing])])
    assert full == 2 and not open_  # (the response, and the start of the bytes after it)
    _, _, full, _ = await same([(GET, [resp()]), (GET, [resp() + b"x"])])
    assert full == 3  # a longer read than remembered: parsed (and the byte after it), closed


async def test_a_5xx_from_the_memo_is_observed_like_the_full_path():
    ex = [(GET, [resp(500, b"e")])] * 3
    _, classes, full, _ = await same(ex)
    assert full == 1 and classes == [0, 0, 0, 0, 3]


async def test_an_interim_response_before_a_remembered_head():
    cont = b"HTTP/1.1 100 Continue\r\n\r\n"
    _, _, full, _ = await same([(GET, [resp()]), (GET, [cont, resp()]), (GET, [cont + resp()])])
    # an interim head is parsed; a final head in a read of its own after it may come from the
    # memo (llhttp is between messages), in the same read as the interim one it may not
    assert full == 1 + 1 + 2


FIELD = st.sampled_from([b"X-A: 1\r\n", b"Set-Cookie: a=b\r\n", b"Keep-Alive: timeout=5\r\n",
                         b"Connection: keep-alive, x-a\r\n", b"Transfer-Encoding: chunked\r\n",
                         b"Vary: *\r\n", b"Content-Length: 3\r\n", b""])


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from([GET, GET, HEAD, GET10, GET_CLOSE]),
                          st.sampled_from([200, 204, 304, 404, 500]),
                          st.binary(max_size=12), FIELD, st.integers(0, 3)),
                min_size=1, max_size=6))
def test_differential(steps):
    async def go():
        ex = []
        for req, status, body, extra, split in steps:
            r = resp(status, body, extra)
            reads = [r] if not split else [r[:len(r) * split // 4], r[len(r) * split // 4:]]
            ex.append((req, [x for x in reads if x]))
        await same(ex)

    from foobar_lb import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(go())
