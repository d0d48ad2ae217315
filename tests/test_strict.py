"""Issue 11, strictness: exact bytes in, the exact answer out, and nothing of a bad message passed on.

Requests (item 2 of the issue): every rejected request gets its status line, the connection is
closed after that one answer, the recording server behind the proxy receives not one byte (on any
connection), and a valid request pipelined after the bad one is neither answered nor forwarded.
Responses (item 3): a server answering with broken framing gives the client a 502 while nothing
was sent yet, else a visibly truncated response; that server connection is closed, never reused.
The body and framing rows run again with an idle server connection in the pool, where a proxy
that writes a head before its body is checked would let it through (a race: ten attempts each).
ACCEPTED lists near misses that must pass. Item 5: absolute-form targets, unknown methods, a server
connection opened for a body that turns out bad, and the retry log line.

Responses are read with h11, an independent parser; the servers here are raw asyncio servers that
count every byte they receive, so nothing depends on the proxy's own parser.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import h11
import pytest

from support import LOOPBACK, lb_config, our_ids, running_lb

# ---------------------------------------------------------------------------------------------
# A raw recording server: every byte counted per connection; requests delimited with h11 only
# to know when to answer (a request h11 cannot parse is still recorded, byte for byte).


@dataclass
class Received:
    conn: RawConn
    request: h11.Request
    body: bytes
    trailers: list[tuple[bytes, bytes]]


class RawConn(asyncio.Protocol):
    def __init__(self, srv: RawServer):
        self.srv = srv
        self.id = len(srv.conns) + 1
        srv.conns.append(self)
        self.data = bytearray()
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.Event()  # the proxy closed (or reset) this connection
        self.eof = False
        self.parse_error: str | None = None
        self.h11 = h11.Connection(h11.SERVER)
        self.tunnel: Callable[[bytes], None] | None = None  # after a 101: raw bytes go here
        self.queue: asyncio.Queue[Received] = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self._req: h11.Request | None = None
        self._body = bytearray()
        self.held: bytearray | None = None  # bytes after an upgrade request, until it is answered

    def connection_made(self, transport):
        self.transport = transport
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.tunnel is not None:
            self.tunnel(data)
            return
        if self.held is not None:
            self.held += data
            return
        if self.parse_error is not None:
            return
        self.h11.receive_data(data)
        self._pump()

    def _pump(self) -> None:
        while True:
            try:
                ev = self.h11.next_event()
            except h11.RemoteProtocolError as e:
                # what the proxy sent is not HTTP to h11: recorded; answered so no one waits
                self.parse_error = str(e)
                self.write(b"HTTP/1.1 400 Unparsable\r\nX-From: server\r\nContent-Length: 0\r\n"
                           b"Connection: close\r\n\r\n")
                self.close()
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                return
            if isinstance(ev, h11.Request):
                self._req, self._body = ev, bytearray()
                if self.srv.on_head is not None:
                    self.srv.on_head(self, ev)
            elif isinstance(ev, h11.Data):
                self._body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                rec = Received(self, self._req, bytes(self._body), list(ev.headers.raw_items()))
                self.srv.received.append(rec)
                self.queue.put_nowait(rec)
                # a new h11 connection for the next request on this one (we answer raw bytes)
                rest, _ = self.h11.trailing_data
                self.h11 = h11.Connection(h11.SERVER)
                if any(n.lower() == b"upgrade" for n, _ in self._req.headers.raw_items()):
                    self.held = bytearray(rest)  # the handler decides: a 101 and a tunnel, or not
                    return
                if rest:  # (h11 takes b"" for the end of the stream)
                    self.h11.receive_data(rest)

    async def _serve(self) -> None:
        while True:
            rec = await self.queue.get()
            await self.srv.handler(self, rec)
            if self.held is not None and self.queue.empty():
                held, self.held = bytes(self.held), None
                if self.tunnel is not None:
                    if held:
                        self.tunnel(held)
                elif held:
                    self.h11.receive_data(held)
                    self._pump()

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def close(self) -> None:
        self.transport.close()

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0), which a proxy cannot mistake for the end of a body."""
        sock = self.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def eof_received(self):
        self.eof = True
        self.lost.set()  # the proxy closed its side: the connection cannot carry a request again
        return True

    def connection_lost(self, exc):
        self.lost.set()
        if self.task is not None:
            self.task.cancel()


Handler = Callable[[RawConn, Received], Awaitable[None]]


async def answer_ok(conn: RawConn, rec: Received) -> None:
    """The default answer: 200 with the request target as the body, marked as the server's."""
    body = rec.request.target
    conn.write(b"HTTP/1.1 200 OK\r\nX-From: server\r\nContent-Length: %d\r\n\r\n%s"
               % (len(body), b"" if rec.request.method == b"HEAD" else body))


class RawServer:
    def __init__(self, handler: Handler = answer_ok,
                 on_head: Callable[[RawConn, h11.Request], None] | None = None):
        self.handler = handler
        self.on_head = on_head
        self.conns: list[RawConn] = []
        self.received: list[Received] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def nbytes(self) -> int:
        return sum(len(c.data) for c in self.conns)

    @property
    def data(self) -> bytes:
        """Every byte received, our request ids as `(ours)` (support.our_ids)."""
        return our_ids(b"".join(bytes(c.data) for c in self.conns))

    async def __aenter__(self) -> RawServer:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: RawConn(self), LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for c in self.conns:
            if c.transport is not None:
                c.transport.abort()


# ---------------------------------------------------------------------------------------------
# A raw client, and h11 reading what it got


async def talk(port: int, data: bytes | list[bytes], *, timeout: float = 3.0,
               delay: float = 0.0) -> tuple[bytes, bool]:
    """Send `data` (a list: piece by piece, `delay` apart); read until the proxy closes.
    Returns (bytes read, closed): closed is False when the connection was still open at `timeout`."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    got = bytearray()
    closed = False
    try:
        with contextlib.suppress(ConnectionError):
            for piece in data if isinstance(data, list) else [data]:
                writer.write(piece)
                await writer.drain()
                if delay:
                    await asyncio.sleep(delay)
        try:
            async with asyncio.timeout(timeout):
                while chunk := await reader.read(65536):
                    got += chunk
            closed = True
        except TimeoutError:
            pass
        except ConnectionError:
            closed = True  # a reset: what was read before it is all the client saw
    finally:
        writer.close()
    return bytes(got), closed


async def read_responses(reader: asyncio.StreamReader, buf: bytes, methods: list[bytes],
                         timeout: float = 3.0) -> tuple[bytes, list[Parsed]]:
    """Read on until h11 has len(methods) complete responses in `buf`; fails on the close."""
    async with asyncio.timeout(timeout):
        while True:
            got, _, err = h11_read(buf, methods, closed=False)
            if len(got) == len(methods) and got[-1].complete:
                return buf, got
            chunk = await reader.read(65536)
            assert chunk, f"closed before {len(methods)} whole responses: {buf[:300]!r} ({err})"
            buf += chunk


@dataclass
class Parsed:
    status: int
    reason: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]  # names as sent
    body: bytes = b""
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    complete: bool = False
    informational: list[int] = field(default_factory=list)

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


def h11_read(raw: bytes, methods: list[bytes], *, closed: bool = True,
             upgrade: bool = False) -> tuple[list[Parsed], bytes, str | None]:
    """Parse `raw` with h11 as the responses to requests made with `methods`, in order.

    Returns (responses, bytes left after the last response h11 could delimit, h11's error or
    None). A response cut short by the close is returned with complete=False and the error."""
    conn = h11.Connection(h11.CLIENT)
    conn.receive_data(raw)
    if closed:
        conn.receive_data(b"")
    out: list[Parsed] = []
    error: str | None = None
    for method in methods:
        headers = [("Host", "x")]
        if upgrade:
            headers += [("Connection", "upgrade"), ("Upgrade", "websocket")]
        conn.send(h11.Request(method=method, target="/", headers=headers))
        conn.send(h11.EndOfMessage())
        cur: Parsed | None = None
        info: list[int] = []
        try:
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA or ev is h11.PAUSED or isinstance(ev, h11.ConnectionClosed):
                    break
                if isinstance(ev, h11.InformationalResponse):
                    info.append(ev.status_code)
                    if ev.status_code == 101:
                        cur = Parsed(101, ev.reason, ev.http_version, list(ev.headers.raw_items()),
                                     complete=True)
                        break
                elif isinstance(ev, h11.Response):
                    cur = Parsed(ev.status_code, ev.reason, ev.http_version,
                                 list(ev.headers.raw_items()), informational=info)
                elif isinstance(ev, h11.Data):
                    cur.body += bytes(ev.data)
                elif isinstance(ev, h11.EndOfMessage):
                    cur.trailers = list(ev.headers.raw_items())
                    cur.complete = True
                    break
        except h11.RemoteProtocolError as e:
            error = str(e)
        if cur is not None:
            out.append(cur)
        if cur is None or not cur.complete or error is not None:
            break
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            break
    return out, bytes(conn.trailing_data[0]), error


# ---------------------------------------------------------------------------------------------
# The request table

H = b"Host: a\r\n"
AFTER = b"GET /after HTTP/1.1\r\nHost: a\r\n\r\n"  # pipelined after every bad request
AFTER_CLOSE = b"GET /after HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
BODY_LIMIT = "1k"  # limits.max_request_body for every case below

STATUS_LINE = {
    400: b"HTTP/1.1 400 Bad Request",
    413: b"HTTP/1.1 413 Request Entity Too Large",
    414: b"HTTP/1.1 414 Request-URI Too Long",
    431: b"HTTP/1.1 431 Request Header Fields Too Large",
    501: b"HTTP/1.1 501 Not Implemented",
    505: b"HTTP/1.1 505 HTTP Version Not Supported",
}


def post(headers: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    return b"POST / HTTP/" + version + b"\r\n" + headers + b"\r\n" + body


def get(headers: bytes, target: bytes = b"/") -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\n" + headers + b"\r\n"


CHUNKED = H + b"Transfer-Encoding: chunked\r\n"
SETTINGS = b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"

# (id, exact bytes sent, exact status answered). AFTER is appended to each when sent.
REJECTED: list[tuple[str, bytes, int]] = [
    # -- Content-Length together with Transfer-Encoding, any order or spelling
    ("cl-te", post(H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-cl", post(H + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n", b"0\r\n\r\n"), 400),
    ("cl-te-lowercase", post(H + b"content-length: 5\r\ntransfer-encoding: chunked\r\n", b"0\r\n\r\n"), 400),
    ("cl-te-uppercase", post(H + b"CONTENT-LENGTH: 5\r\nTRANSFER-ENCODING: CHUNKED\r\n", b"0\r\n\r\n"), 400),
    ("cl0-te", post(H + b"Content-Length: 0\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n"), 400),
    ("cl-other-te", post(H + b"Content-Length: 5\r\nX-A: 1\r\nTransfer-Encoding: chunked\r\n",
                         b"0\r\n\r\n"), 400),
    ("cl-te-http10", post(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n", b"1.0"), 400),
    # -- Content-Length values
    ("cl-dup-differ", post(H + b"Content-Length: 3\r\nContent-Length: 4\r\n", b"abcd"), 400),
    ("cl-list-differ", post(H + b"Content-Length: 3, 4\r\n", b"abcd"), 400),
    ("cl-non-digit", post(H + b"Content-Length: abc\r\n", b"abc"), 400),
    ("cl-digits-then-letters", post(H + b"Content-Length: 3x\r\n", b"abc"), 400),
    ("cl-plus", post(H + b"Content-Length: +3\r\n", b"abc"), 400),
    ("cl-minus", post(H + b"Content-Length: -3\r\n", b"abc"), 400),
    ("cl-hex", post(H + b"Content-Length: 0x3\r\n", b"abc"), 400),
    ("cl-decimal-point", post(H + b"Content-Length: 3.0\r\n", b"abc"), 400),
    ("cl-inner-space", post(H + b"Content-Length: 1 2\r\n", b"abcdefghijkl"), 400),
    ("cl-empty", post(H + b"Content-Length: \r\n"), 400),
    ("cl-overflow-2^64", post(H + b"Content-Length: 18446744073709551616\r\n", b"abc"), 400),
    ("cl-overflow-huge", post(H + b"Content-Length: 99999999999999999999999999999\r\n", b"abc"), 400),
    # -- Transfer-Encoding other than one final `chunked`, or in HTTP/1.0
    ("te-chunked-chunked", post(H + b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-comma-chunked", post(H + b"Transfer-Encoding: ,chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-two-fields", post(CHUNKED + b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-chunked-not-final", post(H + b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n"), 400),
    ("te-obs-folded", post(H + b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n"), 400),
    ("te-obs-folded-tab", post(H + b"Transfer-Encoding: gzip,\r\n\tchunked\r\n", b"0\r\n\r\n"), 400),
    ("te-vtab", post(H + b"Transfer-Encoding: \x0bchunked\r\n", b"0\r\n\r\n"), 400),
    ("te-formfeed", post(H + b"Transfer-Encoding: chunked\x0c\r\n", b"0\r\n\r\n"), 400),
    ("te-inner-space", post(H + b"Transfer-Encoding: chun ked\r\n", b"0\r\n\r\n"), 400),
    ("te-quoted", post(H + b'Transfer-Encoding: "chunked"\r\n', b"0\r\n\r\n"), 400),
    ("te-empty", post(H + b"Transfer-Encoding: \r\n", b"0\r\n\r\n"), 400),
    ("te-http10", post(b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n", b"1.0"), 400),
    ("te-http10-with-host", post(H + b"Transfer-Encoding: chunked\r\n", b"0\r\n\r\n", b"1.0"), 400),
    # -- an unknown transfer coding alone
    ("te-gzip", post(H + b"Transfer-Encoding: gzip\r\n"), 501),
    # -- chunks
    ("chunk-size-not-hex", post(CHUNKED, b"zz\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-negative", post(CHUNKED, b"-5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-plus", post(CHUNKED, b"+5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-0x", post(CHUNKED, b"0x5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-leading-space", post(CHUNKED, b" 5\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-empty", post(CHUNKED, b"\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-overflow", post(CHUNKED, b"1ffffffffffffffff\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-size-bare-lf", post(CHUNKED, b"5\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext-huge", post(CHUNKED, b"5;" + b"x" * 65536 + b"\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext-many", post(CHUNKED, b"5" + b";a=b" * 8192 + b"\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext-ctl", post(CHUNKED, b"5;a=\x01\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext-bare-lf", post(CHUNKED, b"5;a\nb\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext-bare-cr", post(CHUNKED, b"5;a\rb\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-ext-open-quote", post(CHUNKED, b'5;a="b\r\nhello\r\n0\r\n\r\n'), 400),
    ("chunk-data-no-crlf", post(CHUNKED, b"5\r\nhelloXX0\r\n\r\n"), 400),
    ("chunk-data-bare-lf", post(CHUNKED, b"5\r\nhello\n0\r\n\r\n"), 400),
    ("chunk-data-too-long", post(CHUNKED, b"3\r\nhello\r\n0\r\n\r\n"), 400),
    ("chunk-last-bare-lf", post(CHUNKED, b"5\r\nhello\r\n0\n\r\n"), 400),
    # a GET with a body (the commonest method may take a faster path: the same strictness)
    ("chunk-size-not-hex-get", get(CHUNKED) + b"zz\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-size-leading-space-get", get(CHUNKED) + b" 5\r\nhello\r\n0\r\n\r\n", 400),
    ("chunk-data-no-crlf-get", get(CHUNKED) + b"5\r\nhelloXX0\r\n\r\n", 400),
    # -- the bytes of the head
    ("bare-cr-in-value", get(H + b"X-A: a\rb\r\n"), 400),
    ("bare-cr-line-end", get(H + b"X-A: a\rX-B: b\r\n"), 400),
    ("bare-cr-request-line", b"GET / HTTP/1.1\rHost: a\r\n\r\n", 400),
    ("bare-lf-everywhere", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    ("bare-lf-one-field", get(H + b"X-A: a\nX-B: b\r\n"), 400),
    ("bare-lf-request-line", b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    ("bare-lf-head-end", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n\n", 400),
    ("nul-in-value", get(H + b"X-A: a\x00b\r\n"), 400),
    ("nul-in-name", get(H + b"X-\x00A: a\r\n"), 400),
    ("nul-in-target", b"GET /a\x00b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("ctl-0x01-in-value", get(H + b"X-A: a\x01b\r\n"), 400),
    ("ctl-esc-in-value", get(H + b"X-A: a\x1bb\r\n"), 400),
    ("ctl-del-in-value", get(H + b"X-A: a\x7fb\r\n"), 400),
    ("ctl-vtab-in-value", get(H + b"X-A: a\x0bb\r\n"), 400),
    ("space-before-colon", get(b"Host : a\r\n"), 400),
    ("tab-before-colon", get(H + b"X-A\t: a\r\n"), 400),
    ("space-before-colon-cl", post(H + b"Content-Length : 3\r\n", b"abc"), 400),
    ("space-before-colon-te", post(H + b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"), 400),
    ("missing-colon", get(H + b"X-No-Colon\r\n"), 400),
    ("missing-colon-with-value", get(H + b"X-A value\r\n"), 400),
    ("empty-name", get(H + b": value\r\n"), 400),
    ("name-space-inside", get(H + b"X A: 1\r\n"), 400),
    ("name-paren", get(H + b"X(A): 1\r\n"), 400),
    ("name-at", get(H + b"X@A: 1\r\n"), 400),
    ("name-slash", get(H + b"X/A: 1\r\n"), 400),
    ("name-quote", get(H + b'"X-A": 1\r\n'), 400),
    ("name-brace", get(H + b"X{A}: 1\r\n"), 400),
    ("name-8bit", get(H + b"X-\xe9: 1\r\n"), 400),
    ("obs-fold-space", get(H + b"X-A: a\r\n b\r\n"), 400),
    ("obs-fold-tab", get(H + b"X-A: a\r\n\tb\r\n"), 400),
    ("obs-fold-first-field", b"GET / HTTP/1.1\r\n Host: a\r\n\r\n", 400),
    # -- `_` in a name that would normalise to a framing or hop-by-hop field
    ("underscore-transfer-encoding", post(H + b"Transfer_Encoding: chunked\r\n", b"0\r\n\r\n"), 400),
    ("underscore-transfer-encoding-lower", post(H + b"transfer_encoding: chunked\r\n", b"0\r\n\r\n"), 400),
    ("underscore-content-length", post(H + b"Content_Length: 3\r\n", b"abc"), 400),
    ("underscore-content-length-upper", post(H + b"CONTENT_LENGTH: 3\r\n", b"abc"), 400),
    ("underscore-keep-alive", get(H + b"Keep_Alive: timeout=5\r\n"), 400),
    ("underscore-proxy-connection", get(H + b"Proxy_Connection: close\r\n"), 400),
    # -- Host
    ("host-missing-http11", b"GET / HTTP/1.1\r\nX-A: 1\r\n\r\n", 400),
    ("host-duplicate-same", get(H + H), 400),
    ("host-duplicate-differ", get(H + b"Host: b\r\n"), 400),
    ("host-empty", get(b"Host: \r\n"), 400),
    ("host-list", get(b"Host: a, b\r\n"), 400),
    ("host-differs-from-absolute-target", get(b"Host: other\r\n", b"http://api.test/x"), 400),
    ("host-port-differs-from-absolute-target", get(b"Host: api.test\r\n", b"http://api.test:8080/x"), 400),
    ("host-missing-absolute-target-http11", b"GET http://api.test/x HTTP/1.1\r\n\r\n", 400),
    # -- request line and version
    ("line-garbage", b"GARBAGE\r\n\r\n", 400),
    ("line-no-version", b"GET /\r\n" + H + b"\r\n", 400),
    ("line-double-space", b"GET  / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("line-trailing-space", b"GET / HTTP/1.1 \r\n" + H + b"\r\n", 400),
    ("line-space-in-target", b"GET /a b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("line-tabs", b"GET\t/\tHTTP/1.1\r\n" + H + b"\r\n", 400),
    ("line-empty-method", b" / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("line-method-non-token", b"G(T / HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("line-ctl-in-target", b"GET /a\x01b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("line-del-in-target", b"GET /a\x7fb HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("line-relative-target", b"GET a/b HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("version-lowercase", b"GET / http/1.1\r\n" + H + b"\r\n", 400),
    ("version-no-minor", b"GET / HTTP/1\r\n" + H + b"\r\n", 400),
    ("version-letters", b"GET / HTTP/1.x\r\n" + H + b"\r\n", 400),
    ("version-three-parts", b"GET / HTTP/1.1.1\r\n" + H + b"\r\n", 400),
    ("version-two-digit-major", b"GET / HTTP/01.1\r\n" + H + b"\r\n", 400),
    ("version-space", b"GET / HTTP/ 1.1\r\n" + H + b"\r\n", 400),
    ("version-https", b"GET / HTTPS/1.1\r\n" + H + b"\r\n", 400),
    ("version-2.0", b"GET / HTTP/2.0\r\n" + H + b"\r\n", 505),
    ("version-3.1", b"GET / HTTP/3.1\r\n" + H + b"\r\n", 505),
    ("version-0.9", b"GET / HTTP/0.9\r\n" + H + b"\r\n", 505),
    ("version-9.9", b"GET / HTTP/9.9\r\n" + H + b"\r\n", 505),
    # -- limits (max_uri 8k, max_header_size 16k, max_headers 101, max_request_body 1k)
    ("uri-too-long-path", get(H, b"/" + b"a" * 9000), 414),
    ("uri-too-long-query", get(H, b"/q?" + b"a=b&" * 2500), 414),
    ("head-too-large-one-field", get(H + b"X-Big: " + b"b" * 17000 + b"\r\n"), 431),
    ("head-too-large-many-fields", get(H + b"".join(b"X-%03d: %s\r\n" % (i, b"v" * 200) for i in
                                                    range(90))), 431),
    ("fields-102", get(H + b"".join(b"X-%d: v\r\n" % i for i in range(101))), 431),
    ("body-cl-too-large", post(H + b"Content-Length: 2000\r\n", b"x" * 2000), 413),
    ("body-chunked-too-large", post(CHUNKED, b"400\r\n" + b"a" * 1024 + b"\r\n10\r\n" + b"b" * 16
                                    + b"\r\n0\r\n\r\n"), 413),
    # -- h2c upgrade, a smuggling path through proxies
    ("h2c-upgrade", get(H + b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n" + SETTINGS), 400),
    ("h2c-upgrade-no-connection", get(H + b"Upgrade: h2c\r\n" + SETTINGS), 400),
    ("h2c-upgrade-uppercase", get(H + b"Connection: upgrade, http2-settings\r\nUpgrade: H2C\r\n"
                                  + SETTINGS), 400),
    # -- methods and targets
    ("connect", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501),
    ("asterisk-get", b"GET * HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("asterisk-head", b"HEAD * HTTP/1.1\r\n" + H + b"\r\n", 400),
    ("asterisk-post", b"POST * HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n", 400),
    ("unknown-method", b"FOO / HTTP/1.1\r\n" + H + b"\r\n", 501),
    ("unknown-method-long", b"XYZZY /x HTTP/1.1\r\n" + H + b"\r\n", 501),
]

# Near misses that must pass: (id, exact bytes sent, the target the server must receive).
ACCEPTED: list[tuple[str, bytes, bytes | None]] = [
    ("underscore-x-custom", get(H + b"X_Custom: 1\r\n"), b"/"),
    ("options-asterisk", b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n", b"*"),
    ("te-chunked-any-case", post(H + b"Transfer-Encoding: Chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), b"/"),
    ("chunk-ext-short", post(CHUNKED, b"5;name=value\r\nhello\r\n0\r\n\r\n"), b"/"),
    ("fields-101", get(H + b"".join(b"X-%d: v\r\n" % i for i in range(100))), b"/"),
    ("body-at-limit", post(H + b"Content-Length: 1024\r\n", b"x" * 1024), b"/"),
    ("http10-no-host", b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", b"/old"),
    ("absolute-target-matching-host", get(b"Host: api.test\r\n", b"http://api.test/x"), None),
]


@pytest.fixture
async def proxy():
    async with RawServer() as srv:
        cfg = lb_config([srv.address], frontend={
            "limits": {"max_request_body": BODY_LIMIT},
            "timeout": {"http_request": "2s", "client": "2s"}})
        async with running_lb(cfg) as lb:
            yield lb.address[1], srv


@pytest.mark.parametrize(("raw", "status"), [pytest.param(r, s, id=i) for i, r, s in REJECTED])
async def test_rejected_request(proxy, raw, status):
    port, srv = proxy
    out, closed = await talk(port, raw + AFTER, timeout=1.5)
    assert out.startswith(STATUS_LINE[status] + b"\r\n"), out[:200]
    (resp,), rest, err = h11_read(out, [b"HEAD" if raw.startswith(b"HEAD ") else b"GET", b"GET"])
    assert err is None and resp.complete
    assert resp.header(b"connection") == [b"close"]
    assert rest == b""  # one answer: the pipelined GET /after is not answered
    assert closed  # and the connection is closed after it
    await asyncio.sleep(0.05)  # anything the proxy had sent would be here by now
    assert srv.nbytes == 0, srv.data[:300]  # not one byte of either request reached a server
    assert srv.received == []


@pytest.mark.parametrize(("raw", "status"), [pytest.param(r, s, id=i) for i, r, s in REJECTED
                                             if i.startswith(("chunk-", "body-", "cl-", "te-"))])
async def test_rejected_request_with_a_server_connection_at_hand(proxy, raw, status):
    """The same with an idle server connection in the pool (a good request on another client
    connection just went through), so the proxy could write to a server at once: still not one
    byte of the bad request reaches it. Ten times, as a race is what this looks for."""
    port, srv = proxy
    good = b"GET /good HTTP/1.1\r\nHost: a\r\n\r\n"
    for attempt in range(10):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            writer.write(good)
            await read_responses(reader, b"", [b"GET"])
        finally:
            writer.close()
        await asyncio.sleep(0.01)  # its server connection is back in the pool
        forwarded = srv.nbytes
        out, closed = await talk(port, raw + AFTER, timeout=1.5)
        assert out.startswith(STATUS_LINE[status] + b"\r\n") and closed, (attempt, out[:300])
        await asyncio.sleep(0.02)
        assert srv.nbytes == forwarded, (attempt, srv.data[forwarded:][:300])
    assert {r.request.target for r in srv.received} == {b"/good"}


@pytest.mark.parametrize(("raw", "target"), [pytest.param(r, t, id=i) for i, r, t in ACCEPTED])
async def test_near_miss_is_forwarded(proxy, raw, target):
    port, srv = proxy
    out, _ = await talk(port, raw + AFTER_CLOSE)
    got, _, _ = h11_read(out, [b"OPTIONS" if raw.startswith(b"OPTIONS") else b"GET", b"GET"],
                           closed=False)
    assert [(r.status, r.header(b"x-from")) for r in got] == [(200, [b"server"])] * 2, out[:300]
    assert len(srv.received) == 2
    first = srv.received[0].request
    if target is not None:
        assert first.target == target
    assert srv.received[1].request.target == b"/after"
    if b"X_Custom" in raw:  # an `_` name that normalises to nothing special passes, unchanged
        assert b"\r\nX_Custom: 1\r\n" in srv.data


async def test_underscore_names_rejected_when_configured():
    """`reject_underscore_headers = true` (a frontend key) turns every `_` name into a 400."""
    async with RawServer() as srv:
        cfg = lb_config([srv.address], frontend={"reject_underscore_headers": True})
        async with running_lb(cfg) as lb:
            out, closed = await talk(lb.address[1], get(H + b"X_Custom: 1\r\n") + AFTER)
    assert out.startswith(STATUS_LINE[400] + b"\r\n") and closed
    assert srv.nbytes == 0


async def test_chunked_body_turning_bad_later_sends_nothing_more_and_closes():
    """A chunked body whose bad chunk comes after good ones sent a moment before: the answer is
    400 and the connection closes; the server connection is not left in the pool (item 5): the
    next request gets a fresh server connection, and an unused one is closed at once."""
    async with RawServer() as srv:
        cfg = lb_config([srv.address])
        async with running_lb(cfg) as lb:
            port = lb.address[1]
            out, closed = await talk(port, [post(CHUNKED), b"5\r\nhello\r\n", b"zz\r\n" + AFTER],
                                     delay=0.1)
            assert out.startswith(STATUS_LINE[400] + b"\r\n") and closed, out[:200]
            assert srv.received == []
            await asyncio.sleep(0.1)
            # any server connection opened for it is closed, not pooled
            assert all(c.lost.is_set() for c in srv.conns), [len(c.data) for c in srv.conns]
            out, _ = await talk(port, get(H), timeout=1.0)
            (resp,), _, _ = h11_read(out, [b"GET"], closed=False)
            assert resp.status == 200 and resp.header(b"x-from") == [b"server"]


# ---------------------------------------------------------------------------------------------
# Responses: a scripted raw server answers the first request with exact bytes (a list: pieces
# written `0.2 s` apart; then "close", "reset" or nothing); every later request gets a good 200.

GOOD_GET = b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
NEXT_GET = b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"


def scripted(first: list[bytes | str]) -> Handler:
    async def handler(conn: RawConn, rec: Received) -> None:
        if len(conn.srv.received) > 1 or rec.request.target != b"/1":
            await answer_ok(conn, rec)
            return
        for i, piece in enumerate(first):
            if i:
                await asyncio.sleep(0.2)
            if piece == "close":
                conn.close()
            elif piece == "reset":
                conn.reset()
            else:
                conn.write(piece)
    return handler


OK_HEAD = b"HTTP/1.1 200 OK\r\n"
CH = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"

# (id, what the server sends for the first request): the client gets exactly a 502
BAD_BEFORE_ANY_BYTE: list[tuple[str, list[bytes | str]]] = [
    ("cl-te", [OK_HEAD + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"]),
    ("te-cl", [OK_HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n5\r\nhello\r\n0\r\n\r\n"]),
    ("cl-dup-differ", [OK_HEAD + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"]),
    ("cl-list-differ", [OK_HEAD + b"Content-Length: 5, 6\r\n\r\nhello!"]),
    ("cl-non-digit", [OK_HEAD + b"Content-Length: 5x\r\n\r\nhello"]),
    # the head and the bad chunk size come in one write: nothing is forwarded before it is read
    ("chunk-size-invalid", [CH + b"zz\r\nhello\r\n0\r\n\r\n"]),
    ("not-http-text", [b"NOT HTTP AT ALL\r\n\r\n"]),
    ("not-http-binary", [b"\x00\x01\x02\x03\xff\xfe garbage\r\n\r\n"]),
    ("bad-status-code", [b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n"]),
    ("head-over-16k", [OK_HEAD + b"X-Big: " + b"b" * 17000 + b"\r\nContent-Length: 0\r\n\r\n"]),
    ("fields-over-101", [OK_HEAD + b"".join(b"X-%d: v\r\n" % i for i in range(101))
                         + b"Content-Length: 0\r\n\r\n"]),
]


@pytest.mark.parametrize("script", [pytest.param(s, id=i) for i, s in BAD_BEFORE_ANY_BYTE])
async def test_bad_response_before_any_byte_is_502(script):
    async with RawServer(scripted(script)) as srv:
        async with running_lb(lb_config([srv.address])) as lb:
            async with asyncio.timeout(5):
                reader, writer = await asyncio.open_connection(*lb.address)
                writer.write(GOOD_GET)
                buf = b""
                while True:  # read one whole response (the client connection may stay open)
                    got, _, err = h11_read(buf, [b"GET"], closed=False)
                    if got and got[0].complete:
                        break
                    chunk = await reader.read(65536)
                    if not chunk:
                        got, _, err = h11_read(buf, [b"GET"])
                        break
                    buf += chunk
                writer.close()
            assert buf.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), buf[:300]
            assert got[0].complete and err is None
            # that server connection is closed, never reused: the next request opens a new one
            async with asyncio.timeout(2):
                await srv.conns[0].lost.wait()
            out, _ = await talk(lb.address[1], NEXT_GET, timeout=1.0)
            (resp,), _, _ = h11_read(out, [b"GET"], closed=False)
            assert resp.status == 200 and resp.body == b"/2"
            assert srv.received[-1].conn is not srv.conns[0]


# (id, what the server sends, the body bytes the client may have received before the cut)
TRUNCATED: list[tuple[str, list[bytes | str], set[bytes]]] = [
    ("chunk-size-invalid-after-data", [CH + b"5\r\nhello\r\n", b"zz\r\nmore\r\n0\r\n\r\n"], {b"hello"}),
    ("chunk-data-no-crlf-after-data", [CH + b"5\r\nhello\r\n", b"3\r\nabcXY0\r\n\r\n"],
     {b"hello", b"helloabc"}),
    ("chunk-size-bare-lf-after-data", [CH + b"5\r\nhello\r\n", b"3\nabc\r\n0\r\n\r\n"], {b"hello"}),
    ("trailer-bare-cr-after-data", [CH + b"5\r\nhello\r\n", b"0\r\nX: a\rb\r\n\r\n"],
     {b"hello"}),
    ("content-length-cut-by-close", [OK_HEAD + b"Content-Length: 10\r\n\r\nhello", "close"], {b"hello"}),
    ("chunked-cut-by-close", [CH + b"5\r\nhello\r\n", "close"], {b"hello"}),
    ("chunked-cut-by-reset", [CH + b"5\r\nhello\r\n", "reset"], {b"hello"}),
    # close-delimited, cut by a reset: re-framed as chunked, so the missing end stays visible
    ("close-delimited-cut-by-reset", [OK_HEAD + b"\r\nhello", "reset"], {b"hello"}),
]


@pytest.mark.parametrize(("script", "bodies"), [pytest.param(s, b, id=i) for i, s, b in TRUNCATED])
async def test_broken_response_after_bytes_went_out_is_visibly_truncated(script, bodies):
    async with RawServer(scripted(script)) as srv:
        async with running_lb(lb_config([srv.address])) as lb:
            out, closed = await talk(lb.address[1], GOOD_GET, timeout=3.0)
            assert out.startswith(b"HTTP/1.1 200 OK\r\n"), out[:300]
            (resp,), _, err = h11_read(out, [b"GET"])
            assert closed  # the client connection is closed ...
            assert not resp.complete and err is not None, (out, err)  # ... with framing incomplete
            assert not out.endswith(b"0\r\n\r\n")
            assert resp.body in bodies
            async with asyncio.timeout(2):  # the server connection is closed too
                await srv.conns[0].lost.wait()


async def test_server_timeout_in_a_close_delimited_body_stays_visibly_truncated():
    async with RawServer(scripted([OK_HEAD + b"\r\nhello"])) as srv:
        cfg = lb_config([srv.address], backend={"timeout": {"server": "300ms"}})
        async with running_lb(cfg) as lb:
            out, closed = await talk(lb.address[1], GOOD_GET, timeout=3.0)
    (resp,), _, err = h11_read(out, [b"GET"])
    assert resp.status == 200 and closed
    assert resp.header(b"transfer-encoding") == [b"chunked"]
    assert not resp.complete and err is not None and resp.body == b"hello"


@pytest.mark.parametrize("extra", [
    pytest.param([OK_HEAD + b"Content-Length: 2\r\n\r\nokEXTRA"], id="same-write"),
    pytest.param([OK_HEAD + b"Content-Length: 2\r\n\r\nok", b"EXTRA"], id="later"),
    pytest.param([OK_HEAD + b"Content-Length: 2\r\n\r\nok" + OK_HEAD + b"Content-Length: 6\r\n\r\nsmuggl"],
                 id="a-whole-second-response"),
    pytest.param([OK_HEAD + b"Content-Length: 2\r\n\r\nok", OK_HEAD + b"Content-Length: 6\r\n\r\nsmuggl"],
                 id="a-second-response-later"),
    pytest.param([CH + b"2\r\nok\r\n0\r\n\r\nEXTRA"], id="after-chunked"),
])
async def test_bytes_after_a_complete_response_are_dropped_and_the_connection_closed(extra):
    async with RawServer(scripted(extra)) as srv:
        async with running_lb(lb_config([srv.address])) as lb:
            reader, writer = await asyncio.open_connection(*lb.address)
            try:
                writer.write(GOOD_GET)
                buf, got = await read_responses(reader, b"", [b"GET"])
                assert got[0].status == 200 and got[0].body == b"ok"
                await asyncio.sleep(0.4)  # the extra bytes have come
                async with asyncio.timeout(2):
                    await srv.conns[0].lost.wait()  # that server connection is closed
                writer.write(NEXT_GET)
                buf, got = await read_responses(reader, buf, [b"GET", b"GET"])
            finally:
                writer.close()
    second = got[1]
    assert b"EXTRA" not in buf and b"smuggl" not in buf
    assert second.status == 200 and second.body == b"/2"
    assert len(srv.conns) == 2 and srv.received[1].conn is srv.conns[1]  # a new server connection


async def test_close_delimited_response_is_rechunked_for_http11_clients():
    async with RawServer(scripted([OK_HEAD + b"X-A: 1\r\n\r\nall of it", "close"])) as srv:
        async with running_lb(lb_config([srv.address])) as lb:
            out, _ = await talk(lb.address[1], GOOD_GET, timeout=1.0)
    (resp,), rest, err = h11_read(out, [b"GET"], closed=False)
    assert resp.header(b"transfer-encoding") == [b"chunked"]
    assert resp.complete and resp.body == b"all of it" and err is None and rest == b""
    assert out.endswith(b"\r\n0\r\n\r\n")


# ---------------------------------------------------------------------------------------------
# Item 5: absolute-form targets and unknown methods


async def test_absolute_form_is_forwarded_with_the_targets_authority_as_host():
    async with RawServer() as srv:
        async with running_lb(lb_config([srv.address])) as lb:
            out, _ = await talk(lb.address[1], b"GET http://api.test/x HTTP/1.0\r\n\r\n")
            (resp,), _, _ = h11_read(out, [b"GET"])
            assert resp.status == 200
            out, _ = await talk(lb.address[1], b"GET http://api.test:81/y HTTP/1.1\r\n"
                                               b"Host: api.test:81\r\nConnection: close\r\n\r\n")
            (resp,), _, _ = h11_read(out, [b"GET"])
            assert resp.status == 200
    hosts = [[v for n, v in r.request.headers if n == b"host"] for r in srv.received]
    assert hosts == [[b"api.test"], [b"api.test:81"]]


async def test_retry_log_line_names_the_failed_server_in_text(caplog):
    """Item 5: the retry line printed `retrying b'GET' ...` and named the server retried on."""
    async def hang_up(conn: RawConn, rec: Received) -> None:
        conn.reset()

    caplog.set_level("INFO", logger="foobar_lb")
    async with RawServer(hang_up) as bad, RawServer() as good:
        cfg = lb_config({"app": [{"name": "bad", "address": bad.address},
                                 {"name": "good", "address": good.address}]})
        async with running_lb(cfg) as lb:
            out, _ = await talk(lb.address[1], b"GET /r HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert retries == ["retrying GET /r: server app/bad failed (connection reset), trying app/good"]
