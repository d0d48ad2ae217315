"""Issue 11, forwarding: the exact bytes a server receives and the exact bytes a client receives.

Every difference between what the client sent and what the server received (and back) is
explained where it is asserted. Responses are read with h11, an independent parser.

Then a differential property test: hypothesis generates request heads, valid and subtly invalid,
and our accept/reject decision is compared with h11's (server side). A head h11 rejects must never
reach a server; a head h11 accepts and we reject must be on the ALLOWED list below, with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading

import h11
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foobar_lb import new_event_loop
from test_strict import RawConn, RawServer, Received, h11_read

from support import LOOPBACK, lb_config, running_lb

# what the proxy adds by default (request ids as `(ours)`: support.our_ids)
XF = b"X-Forwarded-For: 127.0.0.1\r\nX-Request-ID: (ours)\r\nx-forwarded-proto: http\r\n"


async def exchange(port: int, data: bytes, methods: list[bytes], *, wait_close: bool = False
                   ) -> tuple[bytes, bool]:
    """Send `data`, read until h11 has the len(methods) responses complete (or the close), then
    0.2 s more to catch anything extra. Returns (all bytes read, closed)."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    buf = b""
    closed = False
    try:
        writer.write(data)
        async with asyncio.timeout(3):
            while True:
                got, _, _ = h11_read(buf, methods, closed=False)
                if len(got) == len(methods) and got[-1].complete and not wait_close:
                    break
                chunk = await reader.read(65536)
                if not chunk:
                    closed = True
                    break
                buf += chunk
        if not closed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    while chunk := await reader.read(65536):
                        buf += chunk
                    closed = True
    finally:
        writer.close()
    return buf, closed


def canned(response: bytes):
    async def handler(conn: RawConn, rec: Received) -> None:
        conn.write(response)
    return handler


async def echo_target(conn: RawConn, rec: Received) -> None:
    body = rec.request.target
    conn.write(b"HTTP/1.1 200 OK\r\nX-From: server\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


async def forward(client: bytes, handler=echo_target, methods=(b"GET",), **kw):
    async with RawServer(handler) as srv:
        async with running_lb(lb_config([srv.address])) as lb:
            out, closed = await exchange(lb.address[1], client, list(methods), **kw)
    return srv, out, closed


# -- requests and responses, byte for byte ------------------------------------------------------


async def test_plain_get():
    srv, out, closed = await forward(b"GET /x HTTP/1.1\r\nHost: a\r\nUser-Agent: t/1\r\nAccept: */*\r\n\r\n")
    # the head as sent, then X-Forwarded-For (the client's address) and X-Forwarded-Proto (http:
    # no TLS on this listener), both on by default (forwardfor, forwarded_proto)
    assert srv.data == b"GET /x HTTP/1.1\r\nHost: a\r\nUser-Agent: t/1\r\nAccept: */*\r\n" + XF + b"\r\n"
    # the response as the server sent it: nothing hop-by-hop in it, nothing to change
    assert out == b"HTTP/1.1 200 OK\r\nX-From: server\r\nContent-Length: 2\r\n\r\n/x"
    assert not closed


async def test_hop_by_hop_fields_and_forwarded_fields_are_rewritten():
    srv, out, _ = await forward(
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Private\r\nX-Private: 1\r\n"
        b"Keep-Alive: timeout=9\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\nX-Forwarded-Proto: https\r\nX-End: kept\r\n\r\n",
        canned(b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: timeout=5\r\n"
               b"X-End: kept\r\nContent-Length: 2\r\n\r\nok"))
    # Connection, the field it names (X-Private), Keep-Alive, Proxy-Connection and TE are
    # hop-by-hop (RFC 9110 7.6.1): dropped. The client's X-Forwarded-For gets the client address
    # appended (one field, at the end); X-Forwarded-Proto is replaced: a client cannot claim https.
    assert srv.data == (b"GET / HTTP/1.1\r\nHost: x\r\nX-End: kept\r\n"
                        b"X-Forwarded-For: 203.0.113.9, 127.0.0.1\r\nX-Request-ID: (ours)\r\n"
                        b"x-forwarded-proto: http\r\n\r\n")
    # the same rule on the way back: Connection, X-Secret (named by it) and Keep-Alive dropped
    assert out == b"HTTP/1.1 200 OK\r\nX-End: kept\r\nContent-Length: 2\r\n\r\nok"


async def test_chunked_with_trailers_both_ways():
    srv, out, _ = await forward(
        b"POST /up HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n",
        canned(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
               b"3\r\nabc\r\n0\r\nX-T: v\r\n\r\n"))
    # Transfer-Encoding is hop-by-hop: the proxy decides the framing of its own hop and writes
    # its own field (chunked again, as the body's length is still unknown); Trailer is dropped
    # like the project's other hop-by-hop fields (the trailer fields themselves are passed on);
    # the chunks and the trailer section are forwarded as they came.
    assert srv.data == (b"POST /up HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\n" + XF
                        + b"\r\n5\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n")
    assert out == b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: v\r\n\r\n"
    (resp,), rest, err = h11_read(out, [b"POST"], closed=False)
    assert resp.body == b"abc" and resp.trailers == [(b"X-T", b"v")] and rest == b"" and err is None


CREATED = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"


async def test_expect_100_continue():
    def say_continue(conn: RawConn, req: h11.Request) -> None:
        if (b"expect", b"100-continue") in [(n.lower(), v) for n, v in req.headers.raw_items()]:
            conn.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    async with RawServer(canned(CREATED), on_head=say_continue) as srv:
        async with running_lb(lb_config([srv.address])) as lb:
            reader, writer = await asyncio.open_connection(*lb.address)
            try:
                writer.write(b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                             b"Expect: 100-continue\r\n\r\n")
                async with asyncio.timeout(3):
                    interim = await reader.readuntil(b"\r\n\r\n")
                    writer.write(b"hello")  # the body only after the 100
                    final = b""
                    while len(final) < len(CREATED):
                        chunk = await reader.read(65536)
                        assert chunk
                        final += chunk
            finally:
                writer.close()
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert final == CREATED
    # the proxy answers 100 Continue itself and buffers the body before it engages a server
    # (HAProxy's http-buffer-request): the server gets the whole request, without Expect
    assert srv.data == (b"POST /c HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                        + XF + b"\r\nhello")


async def test_pipelined_requests_in_one_write():
    srv, out, _ = await forward(
        b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\nPOST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /3 HTTP/1.1\r\nHost: a\r\n\r\n", methods=(b"GET", b"POST", b"GET"))
    # each request is forwarded on its own, after the previous answer (a server connection or
    # another: the pool decides), with the same two fields added to each
    assert srv.data == (b"GET /1 HTTP/1.1\r\nHost: a\r\n" + XF + b"\r\n"
                        b"POST /2 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n" + XF + b"\r\nabc"
                        b"GET /3 HTTP/1.1\r\nHost: a\r\n" + XF + b"\r\n")
    # the answers in order, unchanged
    assert out == b"".join(b"HTTP/1.1 200 OK\r\nX-From: server\r\nContent-Length: 2\r\n\r\n/%d" % i
                           for i in (1, 2, 3))


async def test_http10_client():
    srv, out, closed = await forward(b"GET /old HTTP/1.0\r\nUser-Agent: t\r\n\r\n", wait_close=True)
    # the proxy speaks HTTP/1.1 to the server (an intermediary sends its own version, RFC 9110
    # 2.5) and so must send a Host: the server's address, as none came from the client
    assert srv.data == (b"GET /old HTTP/1.1\r\nUser-Agent: t\r\n" + XF
                        + b"host: %s\r\n\r\n" % srv.address.encode())
    # the answer in the proxy's version, with the close an HTTP/1.0 client without keep-alive
    # expects said explicitly, and the connection closed after it
    assert out == b"HTTP/1.1 200 OK\r\nX-From: server\r\nContent-Length: 4\r\nconnection: close\r\n\r\n/old"
    assert closed


async def test_http10_keep_alive_client():
    srv, out, closed = await forward(b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    # Connection is hop-by-hop: dropped; the server's hop is HTTP/1.1 (keep-alive by default)
    assert srv.data == (b"GET /old HTTP/1.1\r\n" + XF + b"host: %s\r\n\r\n" % srv.address.encode())
    # an HTTP/1.0 client keeps the connection only when told so
    assert out == (b"HTTP/1.1 200 OK\r\nX-From: server\r\nContent-Length: 4\r\n"
                   b"connection: keep-alive\r\n\r\n/old")
    assert not closed


async def close_delimited(conn: RawConn, rec: Received) -> None:
    conn.write(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nall of it")
    conn.close()


async def test_close_delimited_response_to_http11_client_is_rechunked():
    _, out, _ = await forward(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", close_delimited)
    # no length known: chunked, so the client sees where it ends (and can keep its connection)
    assert out == (b"HTTP/1.1 200 OK\r\nX-A: 1\r\ntransfer-encoding: chunked\r\n\r\n"
                   b"9\r\nall of it\r\n0\r\n\r\n")


async def test_close_delimited_response_to_http10_client_stays_close_delimited():
    _, out, closed = await forward(b"GET /x HTTP/1.0\r\n\r\n", close_delimited, wait_close=True)
    # an HTTP/1.0 client cannot read chunked: the end is the close, as from the server
    assert out == b"HTTP/1.1 200 OK\r\nX-A: 1\r\nconnection: close\r\n\r\nall of it"
    assert closed


async def test_no_body_responses_204_304_and_head():
    async def special(conn: RawConn, rec: Received) -> None:
        conn.write({b"/204": b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n",
                    b"/304": b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n',
                    b"/h": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"}[rec.request.target])

    srv, out, _ = await forward(b"GET /204 HTTP/1.1\r\nHost: a\r\n\r\nGET /304 HTTP/1.1\r\nHost: a\r\n\r\n"
                                b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n", special,
                                methods=(b"GET", b"GET", b"HEAD"))
    assert srv.data == b"".join(b"%s HTTP/1.1\r\nHost: a\r\n%s\r\n" % (line, XF)
                                for line in (b"GET /204", b"GET /304", b"HEAD /h"))
    # unchanged: none of them has a body, whatever its fields say
    assert out == (b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\nHTTP/1.1 304 Not Modified\r\n"
                   b'ETag: "x"\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n')


async def test_websocket_style_upgrade():
    async def switch(conn: RawConn, rec: Received) -> None:
        conn.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
        conn.tunnel = lambda data: conn.write(b"echo:" + data)

    async with RawServer(switch) as srv:
        async with running_lb(lb_config([srv.address])) as lb:
            reader, writer = await asyncio.open_connection(*lb.address)
            try:
                writer.write(b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                             b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                             b"Sec-WebSocket-Version: 13\r\n\r\n")
                async with asyncio.timeout(3):
                    head = await reader.readuntil(b"\r\n\r\n")
                    writer.write(b"\x81\x05hello")
                    echoed = await reader.readexactly(12)
            finally:
                writer.close()
    # Connection and Upgrade are hop-by-hop, but an upgrade is passed on: the proxy writes them
    # again for the server's hop (its own spelling, after the end-to-end fields); then the
    # tunnel: bytes as they are
    assert srv.data == (b"GET /chat HTTP/1.1\r\nHost: a\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                        b"Sec-WebSocket-Version: 13\r\nconnection: upgrade\r\nupgrade: websocket\r\n"
                        + XF + b"\r\n\x81\x05hello")
    # the same for the 101 on its way back
    assert head == (b"HTTP/1.1 101 Switching Protocols\r\n"
                    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
                    b"connection: upgrade\r\nupgrade: websocket\r\n\r\n")
    assert echoed == b"echo:\x81\x05hello"


async def test_absolute_form_target_carries_its_authority_as_host():
    srv, out, _ = await forward(b"GET http://api.test/x?q=1 HTTP/1.1\r\nHost: api.test\r\n\r\n")
    # RFC 9112 3.2.2: the Host the server gets is the target's authority (the proxy writes it)
    assert srv.data == b"GET http://api.test/x?q=1 HTTP/1.1\r\nhost: api.test\r\n" + XF + b"\r\n"
    assert out == b"HTTP/1.1 200 OK\r\nX-From: server\r\nContent-Length: 21\r\n\r\nhttp://api.test/x?q=1"
    srv, out, _ = await forward(b"GET http://api.test/x HTTP/1.0\r\n\r\n", wait_close=True)
    # an HTTP/1.0 request without Host: the authority too, not the server's address
    assert srv.data == b"GET http://api.test/x HTTP/1.1\r\nhost: api.test\r\n" + XF + b"\r\n"


# -- differential: our decision against h11's -------------------------------------------------
#
# One load balancer and one recording server for every example, on an event loop of their own in
# a thread; the examples are plain blocking sockets.


class Rig:
    def __init__(self):
        self.loop = new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.srv = RawServer()
        self.lb_cm = None
        self.port = 0

    def run(self, coro, timeout=10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> Rig:
        self.thread.start()

        async def up():
            await self.srv.__aenter__()
            cfg = lb_config([self.srv.address],
                            frontend={"timeout": {"http_request": "1s", "client": "1s"}},
                            backend={"timeout": {"server": "1s"}})
            self.lb_cm = running_lb(cfg)
            lb = await self.lb_cm.__aenter__()
            self.port = lb.address[1]

        self.run(up())
        return self

    def stop(self) -> None:
        async def down():
            await self.lb_cm.__aexit__(None, None, None)
            await self.srv.__aexit__(None, None, None)

        with contextlib.suppress(Exception):
            self.run(down())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def rig():
    r = Rig().start()
    yield r
    r.stop()


def h11_decision(raw: bytes) -> str:
    """'accept', 'reject' or 'incomplete', as an h11 server sees these bytes."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    try:
        while True:
            ev = conn.next_event()
            if isinstance(ev, h11.EndOfMessage):
                return "accept"
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return "incomplete"
    except h11.RemoteProtocolError:
        return "reject"


TOKEN = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
ODD = [b" ", b"\t", b"\r", b"\n", b"\x00", b":", b"_", b"\x01", b"\x7f", b"\x0b", b"\xe9", b"\r\n "]


def mostly(common: list, rare: list):
    """A choice that is one of `common` about nine times in ten (so most heads are near-valid)."""
    return st.sampled_from(common * (9 * max(1, len(rare)) // len(common) + 1) + rare)


token = st.text(alphabet=TOKEN.decode(), min_size=1, max_size=8).map(str.encode)
odd_bits = st.lists(st.one_of(token, st.sampled_from(ODD)), min_size=1, max_size=4).map(b"".join)
special_names = st.sampled_from([
    b"Transfer_Encoding", b"Content_Length", b"X_Custom", b"Host", b"Content-Length", b"Keep_Alive",
    b"Transfer-Encoding", b"Connection", b"Upgrade", b"Transfer-Encoding ", b" Transfer-Encoding"])
names = st.one_of(*[token] * 10, odd_bits, special_names)
values = st.one_of(*[token] * 8, st.text(alphabet="abc 019;=,\t\"", max_size=10).map(str.encode),
                   odd_bits)
cl_values = mostly([b"0", b"5", b"3"], [b"05", b"+5", b"-5", b"5x", b"0x5", b"", b" 5", b"5, 5", b"5, 3",
                                         b"99999999999999999999999"])
te_values = mostly([b"chunked"], [b"Chunked", b"chunked, chunked", b",chunked", b"chunked,", b"gzip",
                                  b"gzip, chunked", b"chunked, gzip", b"identity", b" chunked",
                                  b"chunked\x0b", b"\tchunked", b"chunk", b"", b"chunked\r\n chunked"])


@st.composite
def request_heads(draw) -> bytes:
    method = draw(mostly([b"GET", b"POST", b"PUT", b"DELETE", b"OPTIONS"], [b"CONNECT", b"FOO", b"G_T"]))
    target = draw(mostly([b"/", b"/a?b=c", b"/%20"], [b"*", b"http://a/x", b"/a\x01b"]))
    version = draw(mostly([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"],
                          [b"HTTP/2.0", b"HTTP/1.x", b"http/1.1", b"HTTP/1.1 "]))
    fields: list[tuple[bytes, bytes]] = []
    hosts = draw(mostly([[b"a"]], [[], [b"a", b"a"], [b"a", b"b"], [b""], [b"a b"]]))
    fields += [(b"Host", h) for h in hosts]
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        fields.append((b"Content-Length", draw(cl_values)))
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        fields.append((b"Transfer-Encoding", draw(te_values)))
    fields += draw(st.lists(st.tuples(names, values), max_size=3))
    fields = draw(st.permutations(fields))
    sep = draw(mostly([b": "], [b":", b" : ", b":\t"]))
    eol = draw(mostly([b"\r\n"], [b"\n", b"\r"]))
    head = method + b" " + target + b" " + version + eol
    head += b"".join(n + sep + v + b"\r\n" for n, v in fields) + b"\r\n"
    # a body that fits the framing the fields declare, so that h11 sees a whole request
    tes = [v for n, v in fields if n.lower() == b"transfer-encoding"]
    cls = [v for n, v in fields if n.lower() == b"content-length"]
    if tes:
        head += b"5\r\nhello\r\n0\r\n\r\n"
    elif cls and cls[0].strip().isdigit() and int(cls[0]) < 100:
        head += b"x" * int(cls[0])
    return head


def _names(raw: bytes) -> list[bytes]:
    lines = re.split(rb"\r?\n", raw.split(b"\r\n\r\n", 1)[0])[1:]
    return [line.split(b":", 1)[0].strip().lower() for line in lines if b":" in line]


def _request_line(raw: bytes) -> list[bytes]:
    return re.split(rb"\r\n|\n|\r", raw, maxsplit=1)[0].split(b" ")


def _head(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0]


KNOWN_METHODS = {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"TRACE", b"PATCH"}

# Heads h11 accepts and we may reject, each with its reason (the table, item 2).
ALLOWED = [
    ("a `_` name normalising to a framing or hop-by-hop field",
     lambda raw, req: any(n.replace(b"_", b"-") in (b"transfer-encoding", b"content-length", b"keep-alive",
                                                     b"proxy-connection", b"connection", b"host")
                          for n in _names(raw) if b"_" in n)),
    ("Content-Length with Transfer-Encoding (h11 lets chunked win; smuggling: 400)",
     lambda raw, req: {b"content-length", b"transfer-encoding"} <= set(_names(raw))),
    ("Transfer-Encoding in HTTP/1.0", lambda raw, req: req.http_version == b"1.0"
     and b"transfer-encoding" in _names(raw)),
    ("a duplicate Content-Length, even with equal values (RFC 9112 6.3 lets a recipient reject it)",
     lambda raw, req: _names(raw).count(b"content-length") > 1
     or any(line.lower().startswith(b"content-length") and b"," in line  # h11 folds "5, 5" to "5"
            for line in re.split(rb"\r?\n", _head(raw)))),
    ("a version other than 1.0 and 1.1: 505", lambda raw, req: req.http_version not in (b"1.0", b"1.1")),
    ("CONNECT: not a forward proxy (501)", lambda raw, req: req.method == b"CONNECT"),
    ("an unknown method: 501", lambda raw, req: req.method not in KNOWN_METHODS),
    ("asterisk-form with a method other than OPTIONS",
     lambda raw, req: req.target == b"*" and req.method != b"OPTIONS"),
    ("obs-fold (h11 unfolds it)", lambda raw, req: re.search(rb"\n[ \t]", _head(raw)) is not None),
    ("a bare LF line end (h11 takes it as CRLF)", lambda raw, req: re.search(rb"(?<!\r)\n", _head(raw))
     is not None),
    ("control bytes other than HTAB in a field (h11 passes them)",
     lambda raw, req: any(re.search(rb"[\x00-\x08\x0a-\x1f\x7f]", v) for _, v in req.headers)),
    ("an empty or invalid Host, or one differing from an absolute-form target",
     lambda raw, req: any(n == b"host" and (v == b"" or re.search(rb"[^A-Za-z0-9.:\-\[\]]", v)
                                            or (req.target.startswith(b"http://")
                                                and v != req.target.split(b"/")[2]))
                          for n, v in req.headers)),
    ("Transfer-Encoding other than one field `chunked` (whitespace or odd bytes in it, a list)",
     lambda raw, req: _names(raw).count(b"transfer-encoding") > 1
     or any(re.fullmatch(rb"(?i): ?chunked", line[len(b"transfer-encoding"):]) is None
            for line in re.split(rb"\r?\n", _head(raw)) if line.lower().startswith(b"transfer-encoding"))),
    ("an `Upgrade: h2c`",
     lambda raw, req: any(n == b"upgrade" and b"h2c" in v.lower() for n, v in req.headers)),
    ("a target with control bytes", lambda raw, req: re.search(rb"[\x00-\x20\x7f]", req.target) is not None),
]


def allowed_reason(raw: bytes) -> str | None:
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    req = conn.next_event()
    for reason, pred in ALLOWED:
        if pred(raw, req):
            return reason
    return None


def send_one(port: int, raw: bytes) -> tuple[bytes, bool]:
    """One request on its own connection: (bytes read until the first whole response or the
    close, whether that response came from the server)."""
    with socket.create_connection((LOOPBACK, port), timeout=2) as s:
        s.sendall(raw)
        buf = b""
        while True:
            got, _, _ = h11_read(buf, [b"GET"], closed=False)
            if got and got[0].complete:
                return buf, bool(got[0].header(b"x-from"))
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionError):
                chunk = b""
            if not chunk:
                got, _, _ = h11_read(buf, [b"GET"])
                return buf, bool(got and got[0].header(b"x-from"))
            buf += chunk


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=request_heads())
def test_differential_against_h11(rig, raw):
    # A FlakyFailure from hypothesis here is still a failure: a head that reaches the server only
    # some of the time (a race between writing it and checking its body) reaches it.
    decision = h11_decision(raw)
    if decision == "incomplete":
        return  # the generator aims for whole requests; h11 still waits on a few (none to judge)
    before = rig.srv.nbytes
    out, from_server = send_one(rig.port, raw)
    reached = rig.srv.nbytes > before or from_server
    if decision == "reject":
        assert not reached, f"h11 rejects this head, and the server received it: {raw!r} -> {out[:80]!r}"
    elif not reached:
        reason = allowed_reason(raw)
        assert reason is not None, f"h11 accepts this head, we did not forward it: {raw!r} -> {out[:80]!r}"
