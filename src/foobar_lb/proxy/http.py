"""HTTP/1.x proxying: one Protocol per client connection, one per server connection.

Rules of this module:
- httptools does all the framing; we add strictness on top of its callbacks (one Host, only the
  "chunked" transfer coding, bounded URI, head and body) and never hand-parse HTTP ourselves.
- Requests are answered in order. Pipelined requests are parsed as they come but sent to a
  server one at a time; a request is dispatched when the one before it has its full response.
- Bodies stream both ways and are never held whole: a destination's `pause_writing` pauses the
  source's reading; what waits for a connection is bounded and pauses the client when full.
- Messages are re-framed per hop: hop-by-hop fields go, our own Connection and Transfer-Encoding
  are written, chunked bodies are re-chunked (or de-chunked for HTTP/1.0 clients).
- A request may be retried on another server while no byte of its response has arrived: an
  idempotent one whose body fitted in one buffer, any other one only if none of its bytes left.
- Nothing is formatted or logged per request on the hot path; timers are lazy deadlines checked
  when they fire, not one timer per read.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import deque
from functools import partial
from http import HTTPStatus
from typing import TYPE_CHECKING

import httptools

from ..frontend import Frontend
from ..shared import F_1XX, F_REQUESTS
from .base import ClientSide, LazyTimer, pass_eof
from .upstream import Pool

if TYPE_CHECKING:
    from ..backend import Backend, Waiter
    from ..servers import Server

__all__ = ["HttpSession", "UpstreamHttp", "error_response"]

log = logging.getLogger("foobar_lb.http")

BUFSIZE = 16384  # HAProxy's tune.bufsize: requests with bodies up to this can be replayed
PENDING_LIMIT = 65536  # bytes held for a server not yet writable before the client is paused
PIPELINE_LIMIT = 16  # parsed requests waiting their turn before the client is paused
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

_ERROR_TEXT = {
    400: "Your browser sent an invalid request.",
    408: "Your browser didn't send a complete request in time.",
    413: "The request body is larger than this server accepts.",
    414: "The request URI is too long.",
    417: "The expectation given in the Expect header cannot be met.",
    431: "The request header fields are too large.",
    500: "An internal error occurred.",
    501: "The request uses a method or transfer coding this server does not implement.",
    502: "The server returned an invalid or incomplete response.",
    503: "No server is available to handle this request.",
    504: "The server didn't respond in time.",
    505: "Only HTTP/1.0 and HTTP/1.1 are served here.",
}


def error_response(status: int, keep_alive: bool = False) -> bytes:
    """The proxy's own short answer, HAProxy style."""
    phrase = HTTPStatus(status).phrase
    body = (f"<html><body><h1>{status} {phrase}</h1>\n{_ERROR_TEXT.get(status, phrase)}\n"
            "</body></html>\n").encode()
    conn = b"keep-alive" if keep_alive else b"close"
    return (
        b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\ncache-control: no-cache\r\n"
        b"content-type: text/html\r\nconnection: %s\r\n\r\n%s"
        % (status, phrase.encode(), len(body), conn, body)
    )


_ERR_CLOSE = {s: error_response(s) for s in _ERROR_TEXT}
_ERR_KEEP = {s: error_response(s, True) for s in (502, 503, 504)}
_STATUS_LINES = {
    int(s): b"HTTP/1.1 %d %s\r\n" % (int(s), s.phrase.encode()) for s in HTTPStatus
}
_CHUNK_END = b"0\r\n\r\n"
_PLAIN_CONNECTION = frozenset({b"keep-alive", b"Keep-Alive", b"close", b"Close"})
_CRLF = b"\r\n"

# what a request header means to us (looked up by lower-case name)
_H_HOST, _H_CONNECTION, _H_TE, _H_EXPECT, _H_UPGRADE, _H_XFF, _H_XFP, _H_CL = range(8)
_REQ_SPECIAL = {
    b"host": _H_HOST,
    b"connection": _H_CONNECTION,
    b"transfer-encoding": _H_TE,
    b"expect": _H_EXPECT,
    b"upgrade": _H_UPGRADE,
    b"content-length": _H_CL,
}

# client-side phases (for the lazy deadline)
_MODE_HTTP, _MODE_TUNNEL = 0, 1

# response framing towards the client: no body; the body as it comes (content-length); chunked
# by us (the server's close ends it); as it comes, ended by our close (HTTP/1.0 clients); the
# server's chunked encoding relayed byte for byte (trailers included)
_NO_BODY, _PASS, _CHUNK, _UNTIL_CLOSE, _RAW = range(5)
_MAX_RESPONSE_HEAD = 65536


def _field_lines(names: list[bytes]) -> re.Pattern[bytes]:
    """A pattern matching whole field lines ("Name: value" CRLF) for any of `names`."""
    alt = b"|".join(re.escape(n) for n in names)
    return re.compile(rb"^(" + alt + rb")[ \t]*:([^\r\n]*)\r\n", re.IGNORECASE | re.MULTILINE)

# client read-blocking reasons (bit mask)
_BLOCK_UPSTREAM = 1  # the server connection's write buffer is full
_BLOCK_PENDING = 2  # too much waiting for a server connection
_BLOCK_PIPELINE = 4  # too many pipelined requests waiting
_BLOCK_STOP = 8  # no more requests will be read on this connection
_BLOCK_PARKED = 16  # beyond global maxconn: not served yet


class _Reject(Exception):
    def __init__(self, status: int):
        self.status = status


class _HeadDone(Exception):
    pass


class _Stop(Exception):
    pass


def _tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


_NO_BYTES: list[bytes] = []  # shared and never appended to: replaced by a new list when needed


class Req:
    """One request on a client connection, from its first byte to the end of its response."""

    __slots__ = (
        "attempts",
        "backend",
        "body_size",
        "chunked",
        "complete",
        "error",
        "got_response",
        "head",
        "head_done",
        "headers",
        "http11",
        "idempotent",
        "is_head",
        "keep_alive",
        "method",
        "needs_host",
        "pending",
        "pending_size",
        "plan",
        "replay",
        "replay_size",
        "responded",
        "server",
        "t0",
        "trailers",
        "upgrade",
        "url",
    )

    def __init__(self, t0: float):
        # (the head's own fields, method and the like, are set by on_headers_complete)
        self.t0 = t0
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.trailers: list[tuple[bytes, bytes]] | None = None
        self.head_done = False
        self.complete = False
        self.error = 0
        self.upgrade = False
        self.chunked = False
        self.needs_host = False
        self.backend: Backend | None = None
        self.server: Server | None = None
        self.pending: list[bytes] = _NO_BYTES  # framed body bytes not yet sent to the server
        self.pending_size = 0
        self.replay: list[bytes] | None = _NO_BYTES  # every framed body byte so far, if small
        self.replay_size = 0
        self.body_size = 0
        self.attempts = 0
        self.got_response = False  # a byte of the response arrived from the server
        self.responded = False  # a byte of the response went to the client


class HttpSession(ClientSide):
    """The client side of one connection in HTTP mode."""

    __slots__ = (
        "block",
        "closing",
        "eof_in",
        "fe",
        "head_bytes",
        "hl",
        "idle_since",
        "last_rx",
        "lb",
        "loop",
        "mode",
        "parser",
        "parsing",
        "peer_ip",
        "peer_key",
        "q",
        "served",
        "th",
        "th_when",
        "transport",
        "tunnel_buf",
        "up",
        "waiter",
        "wblocked_at",
        "wbuf",
        "xff_ip",
    )

    def __init__(self, lb, fe: Frontend):
        self.lb = lb
        self.fe = fe
        self.loop = lb.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.parsing: Req | None = None
        self.q: deque[Req] = deque()
        self.up: UpstreamHttp | None = None
        self.mode = _MODE_HTTP
        self.block = 0
        self.closing = False
        self.eof_in = False
        self.served = 0
        self.head_bytes = 0
        self.hl: list[tuple[bytes, bytes]] = []  # where on_header puts fields
        self.peer_ip = ""
        self.peer_key = b""
        self.xff_ip: bytes | None = None  # what X-Forwarded-For gets for this client, if anything
        self.wbuf: list[bytes] | None = None
        self.tunnel_buf: list[bytes] | None = None
        self.waiter: Waiter | None = None
        self.th: asyncio.TimerHandle | None = None
        self.th_when = 0.0
        self.last_rx = 0.0
        self.idle_since = 0.0
        self.wblocked_at = 0.0

    # -- connection events ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_ip = peer[0]
            self.peer_key = peer[0].encode()
        if self.fe.forward_for(self.peer_ip):
            self.xff_ip = self.peer_key
        if self.lb.admit(self):
            self.admitted()
        else:  # parked, unread, until global maxconn has room
            self.block |= _BLOCK_PARKED

    def admitted(self) -> None:
        now = self.loop.time()
        self.last_rx = self.idle_since = now
        # the first request gets `http_request` from the accept on (HAProxy does the same)
        self._arm(now + (self.fe.timeouts.http_request or 86400.0))
        if self.block & _BLOCK_PARKED:
            self._unblock(_BLOCK_PARKED)
            held, self.tunnel_buf = self.tunnel_buf, None
            for data in held or ():
                self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()
        up = self.up
        if up is not None:
            self.up = None
            up.detach(reusable=False)
        for r in self.q:
            self._finish_server(r)
        self.q.clear()
        self.parsing = None
        self.parser = None

    def eof_received(self) -> bool:
        # a client may half-close after its request and still read the response
        if self.mode == _MODE_TUNNEL:
            self.eof_in = True
            up = self.up
            return pass_eof(up is None or up.eof_in, up.transport if up is not None else None)
        self.closing = True
        self._block(_BLOCK_STOP)
        return bool(self.q)  # keep the connection open while a response is owed

    def pause_writing(self) -> None:
        self.wblocked_at = self.loop.time()
        self._arm(self.wblocked_at + (self.fe.timeouts.client or 86400.0))
        up = self.up
        if up is not None and up.transport is not None:
            up.paused = True
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        self.wblocked_at = 0.0
        up = self.up
        if up is not None and up.transport is not None:
            up.paused = False
            up.last_rx = self.loop.time()
            up.transport.resume_reading()

    # -- reading requests --------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.last_rx = self.loop.time()
        if self.mode == _MODE_TUNNEL:
            self._tunnel_to_server(data)
            return
        parser = self.parser
        if parser is None or self.block & (_BLOCK_STOP | _BLOCK_PARKED):
            if self.block & _BLOCK_PARKED and not self.block & _BLOCK_STOP:
                self.tunnel_buf = [*(self.tunnel_buf or ()), data]  # held until admitted
            return  # a request was refused or this is the last one: nothing more is read
        before = self.parsing
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgrade_data(data[e.args[0]:])
        except httptools.HttpParserCallbackError as e:
            ctx = e.__context__
            if isinstance(ctx, _Reject):
                self._reject(ctx.status)
            elif isinstance(ctx, _Stop):
                pass
            else:
                log.error("internal error while parsing a request", exc_info=ctx or e)
                self._reject(500)
        except httptools.HttpParserError:
            r = self.parsing
            status = 400
            if r is not None and not r.head_done:
                te = [v for n, v in r.headers if n.lower() == b"transfer-encoding"]
                if te and _tokens(b",".join(te)) != [b"chunked"]:
                    status = 501
            self._reject(status)
        else:
            r = self.parsing
            if r is not None and not r.head_done and r is before:
                # a head still incomplete after a whole read: bound what httptools holds for it
                self.head_bytes += len(data)
                if self.head_bytes > self.fe.limits.max_header_size + self.fe.limits.max_uri:
                    self._reject(431)

    def on_url(self, url: bytes) -> None:
        # (no on_message_begin: the URL is the first thing of every request, so a request
        # starts here; a URL split across reads comes in pieces)
        r = self.parsing
        if r is None:
            if self.block & _BLOCK_STOP:
                raise _Stop
            r = self.parsing = Req(self.last_rx)
            self.hl = r.headers
            self.head_bytes = 0
            if not self.q:
                when = r.t0 + self.fe.http_request
                if self.th is None or self.th_when > when:
                    self._arm(when)
            r.url = url
        else:
            r.url += url
        if len(r.url) > self.fe.max_uri:
            raise _Reject(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        # a header field, or a trailer field of a chunked body (limits: on_headers_complete)
        self.hl.append((name, value))

    def on_headers_complete(self) -> None:
        r = self.parsing
        r.head_done = True
        parser = self.parser
        fe = self.fe
        if len(r.headers) > fe.max_headers:
            raise _Reject(431)
        method = parser.get_method()
        r.method = method
        version = parser.get_http_version()
        r.http11 = version == "1.1"
        if not r.http11 and version != "1.0":  # HTTP/0.9 or a major version of 2 and up
            raise _Reject(505)
        r.keep_alive = parser.should_keep_alive()
        r.upgrade = parser.should_upgrade()
        r.is_head = method == b"HEAD"
        r.idempotent = method in IDEMPOTENT
        if method == b"CONNECT":
            raise _Reject(501)

        # route first (on the authority of an absolute-form target, or Host, and the path)
        url = r.url
        be = self._route(r, url) if fe.rules else fe.default
        r.backend = be
        if be is None:
            r.error = 503
            self._queue(r)
            return
        plan = fe.plans[be.name]
        r.plan = plan

        # one pass over the fields: keep what is end-to-end, note what matters to us
        drop = plan.req_drop
        nhost = 0
        conn_tokens = None
        te = None
        expect = None
        upgrade = None
        xff = None
        cl = None
        parts = [method, b" ", url, b" HTTP/1.1\r\n"]
        special = _REQ_SPECIAL
        xff_low = fe.xff_low
        size = len(url)
        for name, value in r.headers:
            size += len(name) + len(value)
            low = name.lower()
            kind = special.get(low)
            if kind is not None:
                if kind == _H_HOST:
                    nhost += 1
                elif kind == _H_CONNECTION:
                    conn_tokens = _tokens(value) + (conn_tokens or [])
                    continue
                elif kind == _H_TE:
                    te = value if te is None else te + b"," + value
                    continue
                elif kind == _H_EXPECT:
                    expect = value.strip().lower()
                    continue
                elif kind == _H_UPGRADE:
                    upgrade = value.strip()
                    continue
                else:  # content-length: llhttp refused duplicates and CL with TE already
                    cl = value
            elif low == xff_low:
                v = value.strip()
                xff = v if xff is None else xff + b", " + v
                continue
            elif low in drop or low[:6] == b"proxy-":
                continue
            parts += (name, b": ", value, _CRLF)

        if size + 4 * len(r.headers) > fe.max_header_size:
            raise _Reject(431)
        if nhost > 1 or (r.http11 and nhost == 0):
            raise _Reject(400)
        if te is not None:
            if _tokens(te) != [b"chunked"]:
                raise _Reject(501)
            r.chunked = True
            r.trailers = self.hl = []  # trailer fields, if any, come after the body
        if cl is not None:
            limit = fe.limits.max_request_body
            if limit and int(cl) > limit:
                raise _Reject(413)
        if conn_tokens:
            extra = [t for t in conn_tokens if t not in (b"close", b"keep-alive", b"upgrade")]
            if extra:  # rare: Connection names more fields to drop; start over without them
                del parts[4:]
                for name, value in r.headers:
                    low = name.lower()
                    if (low in special and special[low] != _H_HOST and special[low] != _H_CL) or (
                            low == xff_low or low in drop or low[:6] == b"proxy-" or low in extra):
                        continue
                    parts += (name, b": ", value, _CRLF)
        if expect is not None:
            if not r.http11:
                expect = None  # HTTP/1.0 clients do not wait for 100 Continue
            elif expect != b"100-continue":
                raise _Reject(417)
            else:
                parts.append(b"expect: 100-continue\r\n")
        if nhost == 0:
            r.needs_host = True
        if r.chunked:
            parts.append(b"transfer-encoding: chunked\r\n")
        if r.upgrade and upgrade is not None and conn_tokens and b"upgrade" in conn_tokens:
            parts += (b"connection: upgrade\r\nupgrade: ", upgrade, _CRLF)
        else:
            r.upgrade = False
        ip = self.xff_ip
        if ip is not None:
            parts += (fe.xff, b": ", ip if xff is None else xff + b", " + ip, _CRLF)
        elif xff is not None:
            parts += (fe.xff, b": ", xff, _CRLF)
        parts.append(plan.req_add)  # x-forwarded-proto and the header rules' lines, then CRLF
        r.head = b"".join(parts)
        r.headers = None  # not needed any more
        if r.chunked or (cl is not None and cl.strip() != b"0"):
            # a body follows: from now on the client may be silent for `timeout client` at most
            when = self.last_rx + fe.client_timeout
            if self.th is None or self.th_when > when:
                self._arm(when)
        q = self.q
        q.append(r)
        if len(q) == 1:
            self._start(r, self.last_rx)
        elif len(q) > PIPELINE_LIMIT:
            self._block(_BLOCK_PIPELINE)

    def _route(self, r: Req, url: bytes) -> Backend | None:
        """The backend for `r` by the frontend's rules (Host and path prefix)."""
        if url[:1] == b"/":
            q = url.find(b"?")
            path = url if q < 0 else url[:q]
            host = next((v.strip() for n, v in r.headers if n.lower() == b"host"), None)
        elif url == b"*":
            path = url
            host = next((v.strip() for n, v in r.headers if n.lower() == b"host"), None)
        else:
            try:
                parsed = httptools.parse_url(url)
            except httptools.HttpParserInvalidURLError:
                raise _Reject(400) from None
            path = parsed.path or b"/"
            host = parsed.host or next(
                (v.strip() for n, v in r.headers if n.lower() == b"host"), None)
        if host is not None:
            host = host.lower()
            if host[:1] == b"[":
                host = host[: host.find(b"]") + 1]
            else:
                colon = host.rfind(b":")
                if colon >= 0:
                    host = host[:colon]
        return self.fe.route(host, path)

    def on_body(self, data: bytes) -> None:
        r = self.parsing
        n = len(data)
        r.body_size += n
        limit = self.fe.limits.max_request_body
        if limit and r.body_size > limit:
            raise _Reject(413)
        if r.error:
            return
        if r.chunked:
            self._send_body(r, (b"%x\r\n" % n, data, _CRLF), n + 12)
        else:
            self._send_body(r, (data,), n)

    def on_message_complete(self) -> None:
        r = self.parsing
        self.parsing = None
        if r.error:
            return
        r.complete = True
        if r.chunked:
            if r.trailers:
                block = b"".join(b"%s: %s\r\n" % (n, v) for n, v in r.trailers)
                self._send_body(r, (b"0\r\n", block, _CRLF), 5 + len(block))
            else:
                self._send_body(r, (_CHUNK_END,), 5)
        if not r.keep_alive or r.upgrade:
            self._block(_BLOCK_STOP)

    # -- dispatching ---------------------------------------------------------------------------
    def _queue(self, r: Req) -> None:
        q = self.q
        q.append(r)
        if len(q) == 1:
            self._start(r)
        elif len(q) > PIPELINE_LIMIT:
            self._block(_BLOCK_PIPELINE)

    def _start(self, r: Req, now: float = 0.0) -> None:
        """Send `r` on its way (`now`: the loop time, when the caller has it fresh)."""
        if r.error:
            self._send_error(r, r.error)
            return
        be = r.backend
        server = be.pick(self.peer_key)
        if server is None or not be.take(server):
            self._wait_slot(r)
            return
        if self.served and r.idempotent and not r.upgrade:
            # the usual case, inline: an idle pooled connection to the server, head sent now
            if not now:
                now = self.loop.time()
            conn = be.pool.acquire(server, now)
            if conn is not None:
                r.server = server
                r.attempts += 1
                conn.reused = True
                self._attach(conn, r, now)
                return
        self._use(r, server, now=now, taken=True)

    def _wait_slot(self, r: Req) -> None:
        """Every usable server is full (maxconn): wait in the backend's queue, in order."""
        self.waiter = r.backend.wait(self.peer_key, partial(self._granted, r), self.loop.time())
        if self.waiter is None:  # nothing up, queue full or queueing off
            self._send_error(r, 503)

    def _granted(self, r: Req, server: Server | None) -> None:
        """The backend queue's answer: a server with a free slot, or None (503)."""
        self.waiter = None
        if self.transport.is_closing() or not self.q or self.q[0] is not r:
            return  # gone meanwhile: the slot stays free for the next one
        if server is None:
            self._send_error(r, 503)
        else:
            self._use(r, server)

    def _use(self, r: Req, server: Server, fresh: bool = False, now: float = 0.0,
             taken: bool = False) -> None:
        be = r.backend
        if not taken and not be.take(server):
            self._wait_slot(r)  # another worker took the last group-wide slot meanwhile
            return
        if not now:
            now = self.loop.time()
        r.server = server
        r.attempts += 1
        conn = None
        # http-reuse safe: a connection's first request, and any request that is not
        # idempotent, gets a fresh server connection; later idempotent ones may reuse.
        if not fresh and self.served and r.idempotent and not r.upgrade:
            conn = be.pool.acquire(server, now)
        if conn is not None:
            conn.reused = True
            self._attach(conn, r, now)
        else:
            self.lb.spawn(self._connect(r, server))

    async def _connect(self, r: Req, server: Server) -> None:
        be = r.backend
        timeout = be.timeouts.connect or None
        try:
            async with asyncio.timeout(timeout):
                _, conn = await self.loop.create_connection(
                    lambda: UpstreamHttp(be.pool, server, self.loop), server.host, server.port
                )
        except (OSError, TimeoutError) as e:
            reason = "connection timeout" if isinstance(e, TimeoutError) else (
                e.strerror or str(e)).lower()
            if self.transport.is_closing() or not self.q or self.q[0] is not r:
                self._finish_server(r)
                return
            self._attempt_failed(r, None, reason, connected=False)
            return
        if self.transport.is_closing() or not self.q or self.q[0] is not r:
            # the client went away meanwhile: keep the fresh connection for someone else
            self._finish_server(r)
            conn.release()
            return
        self._attach(conn, r)

    def _attach(self, conn: UpstreamHttp, r: Req, now: float = 0.0) -> None:
        """Hand `r` to a connected server connection and send its head (and held body)."""
        self.up = conn
        conn.session = self
        conn.req = r
        conn.done = 0
        conn.eof_ends = False
        if not now:
            now = self.loop.time()
        conn.last_rx = now  # the server timer runs from now
        timeout = r.backend.timeouts.server
        if timeout and (conn.th is None or conn.th_when > now + timeout):
            conn._arm(now + timeout)
        head = r.head
        if r.needs_host:
            head = head[:-2] + b"host: " + r.server.address.encode() + b"\r\n\r\n"
        if r.pending:
            conn.transport.writelines([head, *r.pending])
            r.pending = []
            r.pending_size = 0
            self._unblock(_BLOCK_PENDING)
        else:
            conn.transport.write(head)
        if self.mode == _MODE_TUNNEL and self.tunnel_buf:
            conn.transport.writelines(self.tunnel_buf)
            self.tunnel_buf = None

    def _send_body(self, r: Req, chunks: tuple[bytes, ...], n: int) -> None:
        replay = r.replay
        if replay is not None:
            r.replay_size += n
            if r.replay_size > BUFSIZE:
                r.replay = None
            elif replay is _NO_BYTES:
                r.replay = list(chunks)
            else:
                replay += chunks
        up = self.up
        if up is not None and up.req is r:
            up.last_rx = self.last_rx  # the server is taking our bytes: it is alive
            if len(chunks) == 1:
                up.transport.write(chunks[0])
            else:
                up.transport.writelines(chunks)
            return
        if r.pending is _NO_BYTES:
            r.pending = list(chunks)
        else:
            r.pending += chunks
        r.pending_size += n
        if r.pending_size > PENDING_LIMIT:
            self._block(_BLOCK_PENDING)

    def _attempt_failed(self, r: Req, conn: UpstreamHttp | None, reason: str,
                        connected: bool, timeout: bool = False) -> None:
        """The server attempt of the active request `r` failed: before any response byte came
        (`r.got_response` false), or with a broken or late response."""
        server = r.server
        be = r.backend
        if conn is not None and self.up is conn:
            self.up = None
        replayable = r.idempotent and r.replay is not None and not r.upgrade
        stale = (conn is not None and conn.reused and connected and not timeout
                 and not r.got_response)
        if server is not None and not stale:
            be.observe_error(server, reason, layer7=timeout or r.got_response)
        self._finish_server(r)
        if r.responded:
            self._abort()  # part of the response went out: the client must see it broke
            return
        if r.got_response:
            self._send_error(r, 502)
            return
        if timeout:
            self._send_error(r, 504)
            return
        if stale and replayable and server is not None:
            # a pooled connection the server had closed meanwhile: not the server's fault and
            # not a retry; the same server again on a fresh connection
            r.pending = list(r.replay)
            r.pending_size = r.replay_size
            r.attempts -= 1
            self._use(r, server, fresh=True)
            return
        # may it go again? no request byte reached a server, or it is idempotent and whole
        if (not connected or replayable) and r.attempts <= be.retries:
            if connected:
                r.pending = list(r.replay)
                r.pending_size = r.replay_size
            nxt = be.pick(self.peer_key, avoid=server, retry=True)
            if nxt is not None:
                log.debug("retrying %s on %s/%s after %s", r.method, be.name, nxt.name, reason)
                self._use(r, nxt)
                return
        self._send_error(r, 503 if not connected else 502)

    def _finish_server(self, r: Req) -> None:
        server = r.server
        if server is not None:
            r.server = None
            r.backend.release(server)

    # -- responses ------------------------------------------------------------------------------
    def response_done(self, r: Req, keep_client: bool) -> None:
        """The whole response of the active request went to the client."""
        self.up = None
        server = r.server
        if server is not None:
            r.server = None
            r.backend.release(server)
        self.served += 1
        q = self.q
        if q and q[0] is r:
            q.popleft()
        if not keep_client or not r.complete:
            self._close()
            return
        if self.block & _BLOCK_PIPELINE:
            self._unblock(_BLOCK_PIPELINE)
        if q:
            self._start(q[0])
        elif self.closing:
            self._close()
        else:
            now = self.idle_since = self.loop.time()
            if self.parsing is None:
                when = now + self.fe.http_keep_alive
            else:
                when = self.parsing.t0 + self.fe.http_request
            if self.th is None or self.th_when > when:
                self._arm(when)

    def _send_error(self, r: Req, status: int) -> None:
        """Answer `r` ourselves (it must be the active request, with no response sent)."""
        self._finish_server(r)
        up = self.up
        if up is not None:
            self.up = None
            up.detach(reusable=False)
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        r.responded = True
        fe = self.fe
        fe.ctr[fe.cbase + F_REQUESTS] += 1
        fe.ctr[fe.cbase + F_1XX - 1 + status // 100] += 1
        keep = (status in _ERR_KEEP and r.complete and r.keep_alive and not self.closing
                and not r.upgrade and not (self.block & _BLOCK_STOP))
        if keep:
            transport.write(_ERR_KEEP[status])
            self.response_done(r, True)
        else:
            transport.write(_ERR_CLOSE.get(status) or error_response(status))
            self._close()

    def _reject(self, status: int) -> None:
        """The request being parsed is refused: answer it in its turn, then close."""
        self._block(_BLOCK_STOP)
        self.parser = None
        r = self.parsing
        self.parsing = None
        if r is None:
            r = Req(self.loop.time())
        q = self.q
        if q and q[0] is r:  # the active request went wrong in its body
            if r.responded:
                self._abort()
            else:
                self._send_error(r, status)
            return
        r.error = status
        if r not in q:
            self._queue(r)

    def _close(self) -> None:
        self.closing = True
        self.block |= _BLOCK_STOP
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()

    def _abort(self) -> None:
        self.closing = True
        t = self.transport
        if t is not None:
            t.abort()

    # -- upgrades (WebSocket and others): raw bytes both ways after a 101 -----------------------
    def _upgrade_data(self, rest: bytes) -> None:
        # httptools stopped after the head of an upgrade request: from here the client's bytes
        # go to the server as they are, whatever its answer turns out to be
        self.mode = _MODE_TUNNEL
        self.parser = None
        if rest:
            self._tunnel_to_server(rest)

    def _tunnel_to_server(self, data: bytes) -> None:
        up = self.up
        if up is not None and up.transport is not None:
            up.transport.write(data)
        else:
            if self.tunnel_buf is None:
                self.tunnel_buf = []
            self.tunnel_buf.append(data)
            if sum(map(len, self.tunnel_buf)) > PENDING_LIMIT:
                self._block(_BLOCK_PENDING)

    # -- flow control and timers -----------------------------------------------------------------
    def _block(self, why: int) -> None:
        if not self.block and self.transport is not None:
            self.transport.pause_reading()
        self.block |= why

    def _unblock(self, why: int) -> None:
        if self.block & why:
            self.block &= ~why
            if not self.block and self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

    def _deadline(self) -> tuple[float, int] | None:
        """The earliest client-side deadline in force and what happens then."""
        t = self.fe.timeouts
        best = None
        if self.wblocked_at and t.client:
            best = (self.wblocked_at + t.client, 3)
        if self.mode == _MODE_TUNNEL:
            up = self.up
            last = max(self.last_rx, up.last_rx if up is not None else 0.0)
            tun = self.q[0].backend.timeouts.tunnel if self.q and self.q[0].backend else 0.0
            d = (last + tun, 4) if tun else None
        elif self.parsing is not None and not self.q:
            r = self.parsing
            if not r.head_done:
                d = (r.t0 + t.http_request, 1) if t.http_request else None
            else:
                d = (self.last_rx + t.client, 2) if t.client else None
        elif self.parsing is not None:
            r = self.parsing
            d = (self.last_rx + t.client, 2) if r.head_done and t.client else None
        elif not self.q:
            if self.served:
                d = (self.idle_since + t.http_keep_alive, 0) if t.http_keep_alive else None
            else:
                d = (self.idle_since + t.http_request, 0) if t.http_request else None
        else:
            d = None
        if d is not None and (best is None or d[0] < best[0]):
            best = d
        return best

    def _on_timer(self) -> None:
        self.th = None
        if self.transport is None or self.transport.is_closing():
            return
        d = self._deadline()
        if d is None:
            return
        when, what = d
        if self.loop.time() < when:
            self.th_when = when
            self.th = self.loop.call_at(when, self._on_timer)
            return
        if what == 0:  # idle keep-alive, or a connection that never sent a byte
            self._close()
        elif what in (1, 2):  # the head did not complete in time, or the body stalled
            self._reject(408)
        else:  # the client stopped reading, or the tunnel went quiet
            self._abort()
            up = self.up
            if up is not None:
                self.up = None
                up.detach(reusable=False)

    # -- shutdown ---------------------------------------------------------------------------------
    def drain(self) -> None:
        """Stop after the next response (reload): it says `Connection: close`; an idle
        connection closes only once it has been idle for `timeout http_keep_alive`, so a
        client never races a close with its next request."""
        self.closing = True

    def shutdown(self) -> None:
        """Stop after the request in flight (graceful stop): idle connections close now."""
        self.closing = True
        if not self.q and (self.parsing is None or not self.parsing.head_done):
            self._close()


class UpstreamHttp(LazyTimer):
    """The server side of one connection in HTTP mode; pooled between requests.

    Responses are parsed by httptools without per-header callbacks: once llhttp has accepted a
    head, its raw bytes are edited (hop-by-hop lines cut by the frontend/backend plan's pattern)
    rather than rebuilt field by field. llhttp still decides every boundary: where the head ends
    (the first empty line of a head it accepted, CRLF line ends being strict), how long the body
    is, when the message is complete.
    """

    __slots__ = (
        "body_off",
        "closed",
        "done",
        "eof_ends",
        "eof_in",
        "hb",
        "head_start",
        "idle_since",
        "in_head",
        "last_rx",
        "loop",
        "mode",
        "parser",
        "paused",
        "pool",
        "req",
        "resp_close",
        "reused",
        "rx",
        "server",
        "session",
        "status",
        "th",
        "th_when",
        "transport",
        "tunnel",
        "upgrade_to",
    )

    def __init__(self, pool: Pool, server: Server, loop: asyncio.AbstractEventLoop):
        self.pool = pool
        self.server = server
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.session: HttpSession | None = None
        self.req: Req | None = None
        self.closed = False
        self.reused = False  # taken from the pool at least once
        self.idle_since = 0.0
        self.last_rx = 0.0
        self.paused = False
        self.tunnel = False
        self.eof_in = False
        self.status = 0
        self.mode = _PASS
        self.done = 0  # 1: the response is complete and the connection reusable; 2: not reusable
        self.eof_ends = False  # the response body ends when the server closes
        self.resp_close = False
        self.rx = b""  # the bytes being parsed (with the start of a head from earlier reads)
        self.hb: bytes | None = None  # the start of a head that did not end in its read
        self.head_start = 0  # where the message being parsed starts in rx
        self.in_head = False
        self.body_off = -1  # where raw body bytes to relay start in rx (-1: none in this read)
        self.upgrade_to = b""
        self.th: asyncio.TimerHandle | None = None
        self.th_when = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def detach(self, reusable: bool) -> None:
        """The request is over for this connection: back to the pool, or closed."""
        self.session = None
        self.req = None
        if reusable and not self.closed and not self.tunnel:
            self.release()
        else:
            self.close()

    def release(self) -> None:
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        self.pool.release(self.server, self, self.loop.time())

    def close(self) -> None:
        self.closed = True
        self._disarm()
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()

    # -- bytes from the server ----------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        s = self.session
        if s is None:
            # bytes from an idle connection: it is out of step, never reuse it
            self.close()
            return
        self.last_rx = self.loop.time()
        if self.tunnel:
            s.transport.write(data)
            return
        r = self.req
        r.got_response = True
        hb = self.hb
        if hb is None:
            self.rx = data
        else:
            self.rx = hb + data
            self.hb = None
        self.head_start = 0
        self.body_off = 0 if self.mode == _RAW and self.status else -1
        s.wbuf = wbuf = []
        broken = None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            s.wbuf = None
            self._flush(s, wbuf)
            self._start_tunnel(s, r, data[e.args[0]:])
            return
        except httptools.HttpParserCallbackError as e:
            ctx = e.__context__
            if isinstance(ctx, _HeadDone):
                # a HEAD response ends with its head; the connection is clean only if the head
                # ended exactly where this read did
                self.parser = httptools.HttpResponseParser(self)
                clean = self.rx.find(b"\r\n\r\n", self.head_start) + 4 == len(self.rx)
                self.done = 1 if clean and not self.resp_close else 2
                self.body_off = -1
            elif isinstance(ctx, _Stop):
                # bytes after a complete response: out of step; raw bytes cannot be cut here
                self.done = 2
                if self.mode == _RAW:
                    broken = "bytes after the end of a chunked response"
            elif isinstance(ctx, _Reject):
                broken = "unexpected 101 response" if ctx.status == 502 else "response head too large"
            else:
                log.error("internal error while relaying a response", exc_info=ctx or e)
                broken = "internal error"
        except httptools.HttpParserError as e:
            if self.done:
                self.done = 2
            else:
                broken = f"invalid response ({e})"
        if self.in_head:  # a head that goes on in the next read
            rest = self.rx[self.head_start:]
            if len(rest) > _MAX_RESPONSE_HEAD:
                broken = "response head too large"
            else:
                self.hb = rest
        if broken is None and self.body_off >= 0:  # chunked relayed as received
            off = self.body_off
            wbuf.append(memoryview(self.rx)[off:] if off else self.rx)  # no copy
        self.rx = b""
        s.wbuf = None
        if wbuf:
            t = s.transport
            if not t.is_closing():
                if len(wbuf) == 1:
                    t.write(wbuf[0])
                elif len(wbuf[-1]) < 8192:
                    t.write(b"".join(wbuf))  # small: one copy into one write
                else:
                    t.writelines(wbuf)  # big bodies are not copied again: one writev
        if broken is not None:
            log.info("server %s/%s: %s", self.server.backend, self.server.name, broken)
            self._fail(s, r, broken)
        elif self.done:
            # the response is complete (and flushed): free the connection, then the session;
            # the server timer stays armed: when it fires it finds no request and stops, which
            # is cheaper than cancelling and re-creating a timer for every request
            self.session = None
            self.req = None
            if s.up is self:
                s.up = None
            if self.done == 1 and r.complete and not r.upgrade and not self.resp_close and (
                    not self.closed):
                if self.paused:
                    self.paused = False
                    self.transport.resume_reading()
                self.pool.release(self.server, self, self.last_rx)
            else:
                self.close()
            s.response_done(r, not s.closing)

    @staticmethod
    def _flush(s: HttpSession, wbuf: list[bytes]) -> None:
        if wbuf and s.transport is not None and not s.transport.is_closing():
            if len(wbuf) == 1:
                s.transport.write(wbuf[0])
            else:
                s.transport.writelines(wbuf)

    def _fail(self, s: HttpSession, r: Req, reason: str) -> None:
        self.session = None
        self.req = None
        self.close()
        if s.up is self:
            s.up = None
        s._attempt_failed(r, self, reason, connected=True)

    def _finish(self, s: HttpSession, r: Req) -> None:
        """The response ended with the server's close (data_received inlines the usual end)."""
        self.session = None
        self.req = None
        if s.up is self:
            s.up = None
        self.close()
        s.response_done(r, not s.closing)

    def on_message_begin(self) -> None:
        if self.done:
            raise _Stop
        self.status = 0
        self.in_head = True
        self.body_off = -1

    def on_headers_complete(self) -> None:
        self.in_head = False
        parser = self.parser
        status = parser.get_status_code()
        s = self.session
        r = self.req
        rx = self.rx
        start = self.head_start
        end = rx.find(b"\r\n\r\n", start)  # llhttp accepted this head: its first empty line
        self.body_off = end + 4
        if status < 200 and status != 101:
            # 100 Continue and friends: relayed to HTTP/1.1 clients, then the real response
            if r.http11:
                s.wbuf.append(self._head(r, status, rx, start, end, None))
            self.head_start = end + 4
            self.body_off = -1
            return
        self.status = status
        if status == 101 and not r.upgrade:
            raise _Reject(502)
        fe = s.fe
        cells = fe.ctr
        cells[fe.cbase + F_REQUESTS] += 1
        cells[fe.cbase + F_1XX - 1 + status // 100] += 1
        srv = r.server
        if srv is not None and (status >= 500 or srv.errors):
            r.backend.observe_status(srv, status)
        self.resp_close = not parser.should_keep_alive()
        keep_client = r.keep_alive and not s.closing and not r.upgrade
        head = self._head(r, status, rx, start, end, keep_client)
        if not keep_client or self.mode == _UNTIL_CLOSE:
            s.closing = True
        r.responded = True
        s.wbuf.append(head)
        if self.mode != _RAW:
            self.body_off = -1
        if r.is_head and status >= 200:
            raise _HeadDone

    def _head(self, r: Req, status: int, rx: bytes, start: int, end: int,
              keep_client: bool | None) -> bytes:
        """The response head for the client: our status line, the server's fields minus the
        hop-by-hop ones and the plan's deletions, the framing and the plan's additions. Sets
        `mode` (how the body goes to the client) for final responses."""
        plan = r.plan
        line = rx.find(b"\r\n", start) + 2  # the fields start after the status line
        fields = rx[line:end + 2]  # each field line ends with CRLF
        parts = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status]
        pos = 0
        cl = te = False
        extra = None
        upgrade = b""
        for m in plan.resp_scan.finditer(fields):
            name = m.group(1).lower()
            if name == b"content-length":
                cl = True
                continue
            if name == b"transfer-encoding":
                te = m.group(2).rstrip().lower().endswith(b"chunked")
            elif name == b"connection":
                value = m.group(2).strip()
                if value not in _PLAIN_CONNECTION:
                    more = [t for t in _tokens(value)
                            if t not in (b"close", b"keep-alive", b"upgrade")]
                    if more:
                        extra = (extra or []) + more
            elif name == b"upgrade":
                upgrade = m.group(2).strip()
            a, b = m.span()
            if a > pos:
                parts.append(fields[pos:a])
            pos = b
        parts.append(fields[pos:])
        if extra:  # rare: Connection names more fields to drop; cut those lines too
            kept = b"".join(parts[1:])
            parts = [parts[0]]
            pos = 0
            for m in _field_lines(extra).finditer(kept):
                parts.append(kept[pos:m.start()])
                pos = m.end()
            parts.append(kept[pos:])
        if status == 101:
            parts += (b"connection: upgrade\r\nupgrade: ", upgrade or b"websocket", _CRLF)
        elif keep_client is not None:
            if r.is_head or status == 204 or status == 304:
                mode = _NO_BODY
            elif te:
                mode = _RAW if r.http11 else _UNTIL_CLOSE
            elif cl:
                mode = _PASS
            elif r.http11:
                mode = _CHUNK  # delimited by the server's close: chunked for the client
                self.eof_ends = True
            else:
                mode = _UNTIL_CLOSE
                self.eof_ends = True
            self.mode = mode
            if mode in (_CHUNK, _RAW):
                parts.append(b"transfer-encoding: chunked\r\n")
            if not keep_client or mode == _UNTIL_CLOSE:
                parts.append(b"connection: close\r\n")
            elif not r.http11:
                parts.append(b"connection: keep-alive\r\n")
        parts.append(plan.resp_add)
        return b"".join(parts)

    def on_body(self, data: bytes) -> None:
        mode = self.mode
        if mode in (_PASS, _UNTIL_CLOSE):
            self.session.wbuf.append(data)
        elif mode == _CHUNK:
            self.session.wbuf += (b"%x\r\n" % len(data), data, _CRLF)
        # _RAW: the received bytes are relayed as they are; _NO_BODY: nothing

    def on_message_complete(self) -> None:
        if not self.status or self.status == 101:
            return  # an interim response ended (the real one follows), or a tunnel starts
        if self.mode == _CHUNK:
            self.session.wbuf.append(_CHUNK_END)
        self.done = 1

    def _start_tunnel(self, s: HttpSession, r: Req, rest: bytes) -> None:
        self.tunnel = True
        self._disarm()
        s.mode = _MODE_TUNNEL
        s.parser = None
        s._unblock(_BLOCK_STOP | _BLOCK_PENDING)
        if s.tunnel_buf:
            self.transport.writelines(s.tunnel_buf)
            s.tunnel_buf = None
        if rest:
            s.transport.write(rest)
        tun = r.backend.timeouts.tunnel
        if tun:
            s._arm(self.loop.time() + tun)

    # -- end of the server connection -----------------------------------------------------------
    def eof_received(self) -> bool:
        s = self.session
        if self.tunnel and s is not None:
            self.eof_in = True
            return pass_eof(s.eof_in, s.transport)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        s = self.session
        if s is None:
            return  # idle in a pool: it is skipped at the next checkout
        r = self.req
        if self.tunnel:
            self.session = None
            self.req = None
            if s.up is self:
                s.up = None
            s._close() if exc is None else s._abort()
            return
        if r is None:
            return
        if self.eof_ends and self.status and exc is None:
            # a response delimited by the server's close is complete now
            if self.mode == _CHUNK:
                self._flush(s, [_CHUNK_END])
            self.done = 2
            self._finish(s, r)
            return
        self._fail(s, r, "connection reset" if exc is not None else "connection closed")

    def pause_writing(self) -> None:
        s = self.session
        if s is not None:
            s._block(_BLOCK_UPSTREAM)

    def resume_writing(self) -> None:
        s = self.session
        if s is not None:
            s._unblock(_BLOCK_UPSTREAM)

    # -- server timeout --------------------------------------------------------------------------
    def _on_timer(self) -> None:
        self.th = None
        s = self.session
        r = self.req
        if s is None or r is None or self.tunnel:
            return
        timeout = r.backend.timeouts.server
        now = self.loop.time()
        when = self.last_rx + timeout
        if self.paused or now < when:
            # the client is slow to read (its own timeout applies) or the server spoke lately
            self.th_when = now + timeout if self.paused else when
            self.th = self.loop.call_at(self.th_when, self._on_timer)
            return
        self.session = None
        self.req = None
        self.close()
        if s.up is self:
            s.up = None
        s._attempt_failed(r, self, "server timeout", connected=True, timeout=True)
