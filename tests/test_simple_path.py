"""The simple path (`HttpSession._simple`) against the full one, without sockets.

A GET or HEAD alone in its read may skip llhttp and `request_head`; whatever it does must be
exactly what the full path does with the same bytes. Each head below goes to two sessions: to
one in a single read (the simple path may take it) and to the other split in two reads (the
full path always parses it). The bytes the server connection gets and the bytes the client
gets must be the same; and the heads the simple path is for must really take it.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foobar_lb import config_from_dict, new_event_loop
from foobar_lb.build import build
from foobar_lb.proxy.http import HttpSession, UpstreamHttp
from foobar_lb.proxy.outbox import Outbox
from foobar_lb.shared import Counters, Layout

from support import our_ids


class FakeTransport:
    def __init__(self):
        self.out: list[bytes] = []
        self.closing = False

    def write(self, data):
        self.out.append(bytes(data))

    def writelines(self, chunks):
        self.out.extend(bytes(c) for c in chunks)

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
    def __init__(self, loop, outbox: Outbox | None = None):
        self.loop = loop
        # (the writes of a turn wait in it: a test flushes it before it reads what went out)
        self.outbox = outbox or Outbox(loop)

    def admit(self, session):
        return True

    def leave(self, session):
        pass

    def spawn(self, coro):
        coro.close()  # no new server connection here: the pooled one must be taken
        raise AssertionError("a request asked for a new server connection")


class CountingSession(HttpSession):
    """Counts the requests llhttp began: the ones the full path parsed."""

    __slots__ = ("full",)

    def on_message_begin(self):
        self.full = getattr(self, "full", 0) + 1
        super().on_message_begin()


def _frontend(**frontend):
    cfg = config_from_dict({
        "frontends": {"f": {"bind": "127.0.0.1:0", "default_backend": "b", **frontend}},
        "backends": {"b": {"servers": [{"address": "127.0.0.1:9"}], "check": False}}})
    built = build(cfg, layout=Layout(), counters=Counters())
    return built.frontends["f"], built.backends["b"]


def _run(reads: list[bytes], **frontend) -> tuple[bytes, bytes, int]:
    """Feed `reads` to a new session with one idle pooled server connection: (what the server
    connection got, what the client got, requests the full path parsed)."""
    loop = asyncio.get_running_loop()
    fe, be = _frontend(**frontend)
    server = be.servers[0]
    lb = FakeLb(loop)
    up = UpstreamHttp(be.pool, server, loop, lb.outbox)
    ut = FakeTransport()
    up.connection_made(ut)
    be.pool.release(server.pool_key, up, loop.time())
    s = CountingSession(lb, fe)
    s.full = 0
    ct = FakeTransport()
    s.connection_made(ct)
    for data in reads:
        s.data_received(data)
    lb.outbox.flush()
    return our_ids(b"".join(ut.out)), b"".join(ct.out), s.full


async def both(data: bytes, **frontend) -> tuple[bytes, bytes, int]:
    whole = _run([data], **frontend)
    split = _run([data[:-1], data[-1:]], **frontend)
    assert whole[:2] == split[:2], (data, whole, split)
    return whole


SIMPLE = [
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET /x?y=1&z=%20 HTTP/1.1\r\nHost: example.test:8080\r\nAccept: */*\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nUser-Agent: t/1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    b"GET / HTTP/1.1\r\nX-Empty: \r\nHost: a\r\nX-Sp: a  b\tc\r\n\r\n",
]


@pytest.mark.parametrize("data", SIMPLE)
async def test_the_commonest_requests_take_the_simple_path_and_send_the_same_bytes(data):
    sent, answered, full = await both(data)
    assert full == 0, "the full path parsed it"
    assert sent.startswith(data.split(b"\r\n", 1)[0] + b"\r\n")
    assert sent.endswith(b"X-Forwarded-For: 10.1.2.3\r\nX-Request-ID: (ours)\r\n"
                         b"x-forwarded-proto: http\r\n\r\n")
    assert b"onnection" not in sent and answered == b""


NOT_SIMPLE = [
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",  # repeated Host: 400
    b"GET / HTTP/1.1\r\nAccept: */*\r\n\r\n",  # no Host: 400
    b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n",  # invalid Host: 400
    b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX_Forwarded_For: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nTransfer_Encoding: chunked\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-A\r\nX-A: 1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nProxy-Authorization: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nKeep-Alive: 5\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost:a\r\n\r\n",  # not the `name: value` spelling: the full path
    b"GET / HTTP/1.1\r\nHost: a \r\n\r\n",
    b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.0\r\nHost: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",  # pipelined
    b"GET / HTTP/1.1\r\nHost: a\r\nX-Request-ID: abc-1\r\n\r\n",  # a client's id: checked
]


@pytest.mark.parametrize("data", NOT_SIMPLE)
async def test_anything_else_goes_the_full_way(data):
    whole = _run([data])
    assert whole[2] >= 1 or whole[1].startswith(b"HTTP/1.1 400"), whole
    await both(data)


async def test_an_over_long_target_is_refused_the_same_way():
    data = b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    sent, answered, _ = await both(data)
    assert sent == b"" and answered.startswith(b"HTTP/1.1 414 ")


async def test_the_frontend_rules_route_on_the_full_path():
    cfg = {"rules": [{"path_prefix": "/api", "backend": "b"}]}
    sent, _, full = await both(b"GET /api HTTP/1.1\r\nHost: a\r\n\r\n", **cfg)
    assert full == 1 and sent.startswith(b"GET /api HTTP/1.1\r\nHost: a\r\n")


_NAMES = st.sampled_from([
    "Host", "host", "HOST", "Accept", "Connection", "connection", "Keep-Alive", "TE", "Trailer",
    "Transfer-Encoding", "Content-Length", "Upgrade", "Expect", "X-Forwarded-For",
    "X-Forwarded-Proto", "Proxy-Foo", "X_Foo", "Content_Length", "Cookie", "X-A", "Te-X",
    "Hostname", "Connection-X", "X-Request-ID", "x-request-id"])
_VALUES = st.sampled_from([
    "a", "a:80", "", " a", "a ", "close", "keep-alive", "Close", "chunked", "0", "5", "x, y",
    "[::1]:80", "a b", "\tv", "v\t", "keep-alive, X-A", "gzip", "r-1.2:3_x", "x" * 129])


@pytest.fixture(scope="module")
def loop():
    loop = new_event_loop()
    yield loop
    loop.close()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=st.sampled_from(["GET", "HEAD"]),
       target=st.sampled_from(["/", "/a/b?c=d", "/%41", "/x;y"]),
       fields=st.lists(st.tuples(_NAMES, st.sampled_from([": ", ":", " : "]), _VALUES),
                       max_size=5))
def test_differential_simple_and_full_paths(loop, method, target, fields):
    data = (f"{method} {target} HTTP/1.1\r\n"
            + "".join(f"{n}{sep}{v}\r\n" for n, sep, v in fields) + "\r\n").encode()
    loop.run_until_complete(both(data))


class _OtherPeer(FakeTransport):
    def get_extra_info(self, key, default=None):
        return ("10.9.9.9", 50000) if key == "peername" else default


@pytest.mark.parametrize("data", [d for d in SIMPLE if b"close" not in d])
async def test_the_route_remembers_a_request_by_its_bytes(data):
    """The second time the same bytes come (on this connection or another one), the route's
    memo gives what `_simple` decided: the server gets the same head, with each connection's
    own X-Forwarded-For."""
    loop = asyncio.get_running_loop()
    fe, be = _frontend()
    server = be.servers[0]
    ob = Outbox(loop)
    up = UpstreamHttp(be.pool, server, loop, ob)
    ut = FakeTransport()
    up.connection_made(ut)
    be.pool.release(server.pool_key, up, loop.time())
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    heads = []
    for transport in (FakeTransport(), FakeTransport(), _OtherPeer()):
        s = CountingSession(FakeLb(loop, ob), fe)
        s.full = 0
        s.connection_made(transport)
        s.data_received(data)
        ob.flush()
        heads.append(our_ids(b"".join(ut.out)))
        ut.out.clear()
        up.data_received(ok if not data.startswith(b"HEAD") else ok[:-2])
        assert s.full == 0
        assert fe.simple.req_memo[data][3].startswith(data.split(b"\r\n", 1)[0])
    assert heads[0] == heads[1]
    assert heads[2] == heads[0].replace(b"X-Forwarded-For: 10.1.2.3", b"X-Forwarded-For: 10.9.9.9")
    assert heads[2] != heads[0]
