"""The client side of an HTTP connection: parsing, the pipeline, client deadlines.

Rules of this module:
- httptools (llhttp) does all the framing; `head.request_head` decides what a request becomes
  (or that it is refused) before any byte of it can reach a server; nothing pipelined after a
  refused request is parsed;
- requests are answered in order: pipelined ones are parsed as they come but sent to a server
  one at a time, the next when the one before it has its full response;
- bodies stream and are never held whole: a destination's `pause_writing` pauses the source's
  reading; what waits for a server connection is bounded and pauses the client when full;
- a request may be retried on another server while no byte of its response has arrived: an
  idempotent one whose body fitted in one buffer, any other one only if none of its bytes left;
- nothing is formatted or logged per request on the hot path; the one timer is a lazy deadline.
"""

from __future__ import annotations

import asyncio
import logging
import re
from bisect import bisect_left
from collections import deque
from typing import TYPE_CHECKING

import httptools

from ...accesslog import PREFIX, RID_LINE, ids
from ...backend import ASSIGNED, QUEUED
from ...clientaddr import client_from_xff, send_proxy_header
from ...frontend import Frontend, Route
from ...limits import too_many_requests
from ...shared import (
    F_TIMEOUT_CLIENT,
    F_TIMEOUT_HTTP_REQUEST,
    F_TIMEOUT_TUNNEL,
    S_ECON,
    S_ERESP,
    S_TIMEOUT_CONNECT,
)
from ...tls import client_subject_line
from ..base import OUT_OF_FDS, ClientSide
from ..upstream import Pool
from .exchange import (
    BLOCK_PARKED,
    BLOCK_PENDING,
    BLOCK_PIPELINE,
    BLOCK_STOP,
    BLOCK_UPSTREAM,
    BUFSIZE,
    MODE_HTTP,
    MODE_TUNNEL,
    PIPELINE_LIMIT,
    Exchange,
)
from .head import (
    _GOOD_HOSTS,
    CHUNK_END,
    CRLF,
    ERR_CLOSE,
    ERR_KEEP,
    IDEMPOTENT,
    TOKEN,
    HeadError,
    error_response,
    good_host,
    request_head,
    request_target,
)
from .server import UpstreamHttp

if TYPE_CHECKING:
    from ...backend import Waiter
    from ...servers import Server

__all__ = ["HttpSession"]

log = logging.getLogger("foobar_lb.http")


FD_WAIT = 0.05  # a server connection that found no descriptor is tried again this soon
HELD = 3  # Exchange.buffering: a refusal (429) waits for the end of its request, then answers
RATE_WINDOW = 5.0  # limits.min_body_rate is judged over each window of this many seconds
# what pauses reading a client for our own reasons (a server or a queue not taking its bytes):
# while it holds, the client is not the slow one, and none of its deadlines for a body runs
_FLOW = BLOCK_UPSTREAM | BLOCK_PENDING | BLOCK_PIPELINE
# the access log's termination state of the proxy's own answers, by status (see _send_error)
_TERMS = {408: "cR", 500: "IR", 502: "SH", 503: "SC", 504: "sH"}


class _Stop(Exception):
    """Raised in a callback: stop parsing (nothing after a refused or last request)."""


_UNMADE = True  # HttpSession.parser before the full path first needs it


# the simple path's request (see HttpSession._simple): a subset of what llhttp and request_head
# accept, in the syntax they would forward unchanged
_SIMPLE_REQUEST = re.compile(
    rb"(GET|HEAD) (/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*) HTTP/1\.1\r\n"
    rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+: (?:[!-~](?:[\t !-~]*[!-~])?)?\r\n)*)\r\n")
_EXT_ABUSE = re.compile(rb"(?:\A|\r\n)[0-9A-Fa-f]+[ \t]*;[^\r\n]{4096}")
_LOOSE_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+(?:  | [^ \r\n]+  )")
_TOKEN_METHOD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ \S+ HTTP/")
_WELL_FORMED_VERSION = re.compile(rb"[^ ]+ [^ ]+ HTTP/[0-9]\.[0-9]\r\n")


def _status(r: Exchange) -> int:
    """The status of a response cut short (for the access log): 0 when none went out."""
    if not r.responded:
        return 0
    conn = r.conn
    return conn.status if conn is not None else getattr(r, "status", 0)


def _llhttp_status(e: httptools.HttpParserError, r: Exchange | None, data: bytes) -> int:
    """The status for a request llhttp refused: 400, but 501 for a well-formed method it does
    not know or a transfer coding it does not implement, and 505 for a well-formed version."""
    if r is None or not r.head_done:
        # the refused request's first bytes: after the last complete head in this read
        start = data.rfind(b"\r\n\r\n")
        rest = data[start + 4:] if start >= 0 and start + 4 < len(data) else data
        rest = rest.lstrip(b"\r\n")
        if isinstance(e, httptools.HttpParserInvalidMethodError):
            return 501 if _TOKEN_METHOD.match(rest) else 400
        if "version" in str(e).lower() and _WELL_FORMED_VERSION.match(rest):
            return 505
        if r is not None:
            te = [v for n, v in r.headers if n.lower() == b"transfer-encoding"]
            codings = [t.strip().lower() for t in b",".join(te).split(b",")]
            if len(te) == 1 and len(codings) == 1 and codings[0] != b"chunked" and (
                    TOKEN.fullmatch(codings[0])):
                return 501
    return 400


class HttpSession(ClientSide):
    """The client side of one connection in HTTP mode."""

    __slots__ = (
        "block",
        "cert_line",
        "client_key",
        "closing",
        "eof_in",
        "fe",
        "head_bytes",
        "held",
        "hl",
        "idle_since",
        "last_rx",
        "lb",
        "log_client",  # the access log's client address (set by it, when it is on)
        "loop",
        "mode",
        "next_again",
        "ob",
        "own_pool",
        "parser",
        "parsing",
        "peer_ip",
        "peer_key",
        "proxied",
        "q",
        "rate_n",
        "rate_t",
        "rid_post",
        "rid_pre",
        "rx",
        "served",
        "simple",
        "th",
        "th_when",
        "transport",
        "waiter",
        "wblocked_at",
        "xff_ip",
        "xff_line",
        "xff_trust",
    )

    def __init__(self, lb, fe: Frontend):
        self.lb = lb
        self.fe = fe
        self.loop = lb.loop
        self.ob = lb.outbox  # (every write to the client goes through it: outbox.py)
        self.transport: asyncio.Transport | None = None
        # llhttp's parser, made by the first read the full path parses (a connection whose
        # requests all take the simple path never needs one); None: nothing more is parsed
        self.parser: httptools.HttpRequestParser | bool | None = _UNMADE
        self.parsing: Exchange | None = None
        self.rx = b""  # the read being parsed (for checks llhttp leaves to us)
        self.q: deque[Exchange] = deque()  # the active exchange first, then pipelined ones
        self.mode = MODE_HTTP
        self.block = 0
        self.closing = False
        self.eof_in = False
        self.served = 0
        # response_done is starting the next pipelined request (None: it is not): a request
        # answered at once (a 429, a 503) ends inside that start; it sets this to True, and the
        # loop there starts the one after it, instead of recursing once per request
        self.next_again: bool | None = None
        self.head_bytes = 0
        # (`hl`, where on_header puts fields, is set by on_message_begin, before any field)
        self.peer_ip = ""
        self.peer_key = b""
        # the client's address as bytes, for per-client rules and limits: the peer's, or the
        # PROXY header's, or per request a trusted proxy's X-Forwarded-For's (clientaddr.py)
        self.client_key = b""
        self.proxied = None  # ((src ip, port), (dst ip, port)) from a PROXY header
        self.xff_trust = None  # the trusted proxies' networks, when the peer is one of them
        self.simple = fe.simple  # the simple path's route (None: every request the full path)
        self.own_pool: Pool | None = None  # idle connections private to this client (send_proxy)
        self.xff_ip: bytes | None = None  # what X-Forwarded-For gets for this client, if anything
        self.xff_line = b""  # its whole line, for the simple path
        self.cert_line = b""  # mutual TLS: the X-Client-Cert-Subject line (tls.py)
        self.rid_pre = self.rid_post = b""  # (set in accepted: see _simple_go)
        self.held: list[bytes] | None = None  # bytes read while parked
        self.waiter: Waiter | None = None
        self.th: asyncio.TimerHandle | None = None
        self.th_when = 0.0
        self.last_rx = 0.0
        self.idle_since = 0.0
        self.wblocked_at = 0.0
        # limits.min_body_rate: the start of the body's current window (0.0: no body arriving)
        # and its byte count then
        self.rate_t = 0.0
        self.rate_n = 0

    # -- connection events ---------------------------------------------------------------
    def accepted(self) -> None:
        """The client address is established and allowed (at accept, or after the PROXY
        header): admission, then the first request."""
        fe = self.fe
        if fe.xff is not None and (not fe.xff_except or fe.forward_for(self.peer_ip)):
            self.xff_ip = self.peer_key
            self.xff_line = fe.xff_start + self.peer_key + CRLF
        if fe.cfg.tls is not None and fe.cfg.tls.client_ca is not None:
            self.cert_line = client_subject_line(self.transport)
        if self.simple is not None:  # this connection's lines around the simple path's id
            self.rid_pre = self.xff_line + RID_LINE
            self.rid_post = CRLF + self.cert_line + self.simple.req_add
        if self.lb.admit(self):
            self.admitted()
        else:  # parked, unread, until global maxconn has room
            self.block |= BLOCK_PARKED

    def admitted(self) -> None:
        now = self.loop.time()
        self.last_rx = self.idle_since = now
        # the first request gets `http_request` from the accept on (HAProxy does the same)
        self._arm_first(now + self.fe.http_request)
        if self.block & BLOCK_PARKED:
            self._unblock(BLOCK_PARKED)
            held, self.held = self.held, None
            for data in held or ():
                self.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended()
        if self.own_pool is not None:
            self.own_pool.close_all()
        if self.fe.alog is not None and (self.q or self.parsing is not None):
            self._log_unfinished()
        for r in self.q:
            r.detach()
            r.release_server()
        self.q.clear()
        self.parsing = None
        self.parser = None

    def _log_unfinished(self) -> None:
        """The connection ends with requests unanswered (or a tunnel): one access log line
        each (a request logged already is not logged again)."""
        alog = self.fe.alog
        killed = getattr(self.lb, "cutting", False)  # the stop's grace period ran out
        who = "K" if killed else "C"
        for i, r in enumerate(self.q):
            if i == 0 and self.mode == MODE_TUNNEL and r.responded:
                alog(r, 101, who + "D" if killed else "--")
                continue
            conn = r.conn
            status = _status(r)
            if i or not r.complete:
                phase = "R"
            elif self.waiter is not None:
                phase = "Q"
            elif r.server is not None and conn is None:
                phase = "C"
            elif not r.responded:
                phase = "H"
            else:
                phase = "D"
            alog(r, status, who + phase)
        r = self.parsing
        if r is not None and r not in self.q and (r.url or r.head_done):
            alog(r, 0, who + "R")

    def eof_received(self) -> bool:
        # a client may half-close after its request and still read the response
        if self.mode == MODE_TUNNEL:
            self.eof_in = True
            keep = self.q[0].tunnel_eof(from_server=False) if self.q else False
        else:
            self.closing = True
            self._block(BLOCK_STOP)
            # keep the connection open while a response is owed (a TLS client's close_notify
            # closes it whatever we say: asyncio warns on True)
            keep = bool(self.q) and self.transport.get_extra_info("sslcontext") is None
        if not keep:  # the transport closes itself on False: what waits for it goes first
            self.ob.send_now(self.transport)
        return keep

    def pause_writing(self) -> None:
        # the client does not read: what we hold for it stays within the buffers, so the server
        # is paused (and the next request's server from the start: Exchange.attach)
        self.wblocked_at = self.loop.time()
        self._arm(self.wblocked_at + (self.fe.timeouts.client or 86400.0))
        if self.q:
            self.q[0].pause_server()

    def resume_writing(self) -> None:
        self.wblocked_at = 0.0
        if self.q:
            self.q[0].resume_server(self.loop.time())

    # -- the exchange's calls ----------------------------------------------------------------
    def server_full(self) -> None:
        """The server connection does not take more bytes: stop reading the client."""
        self._block(BLOCK_UPSTREAM)

    def server_ready(self) -> None:
        self._unblock(BLOCK_UPSTREAM)

    def sent_pending(self) -> None:
        """What waited for a server connection went to it."""
        self._unblock(BLOCK_PENDING)

    def tunnel_started(self, timeout: float) -> None:
        """The server switched protocols: the client's bytes go to it as they are."""
        self.mode = MODE_TUNNEL
        self.parser = None
        self._unblock(BLOCK_STOP | BLOCK_PENDING)
        if timeout:
            self._arm(self.loop.time() + timeout)

    def end_tunnel(self, exc: Exception | None) -> None:
        self._close() if exc is None else self._abort()

    # -- reading requests --------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        self.last_rx = now = self.loop.time()
        fe = self.fe
        fe.ctr[fe.o_bin] += len(data)
        if self.parsing is None and not self.q and not self.block and data[-4:] == b"\r\n\r\n":
            # between requests, and this read ends like a head: the commonest request, a GET
            # or HEAD without a body, alone in its read, takes the simple path if it can
            route = self.simple
            if route is not None and self.mode == MODE_HTTP:
                hit = route.req_memo.get(data)  # the same bytes took it lately
                if hit is None:
                    m = _SIMPLE_REQUEST.fullmatch(data)
                    hit = self._simple(route, m, data) if m is not None else None
                if hit is not None:
                    # `line`: its request line and fields as the server gets them, before this
                    # connection's lines (`rid_pre`: X-Forwarded-For and the start of
                    # X-Request-ID; `rid_post`: the end of it, the client certificate's line and
                    # the route's lines)
                    method, url, keep_alive, line = hit
                    r = Exchange(self, now, route, method, url, keep_alive,
                                 b"".join((line, self.rid_pre, b"%x" % next(ids), self.rid_post)))
                    self.q.append(r)
                    self._start(r, now)
                    # (complete only now, as on the full path: an answer of ours given at once
                    # closes)
                    r.complete = True
                    if not keep_alive:
                        self._block(BLOCK_STOP)
                    return
        if self.mode == MODE_TUNNEL:
            self._tunnel_to_server(data)
            return
        parser = self.parser
        if parser is _UNMADE:  # (between requests: as a new one would be after them)
            parser = self.parser = httptools.HttpRequestParser(self)
        if parser is None or self.block & (BLOCK_STOP | BLOCK_PARKED):
            if self.block & BLOCK_PARKED and not self.block & BLOCK_STOP:
                self.held = [*(self.held or ()), data]  # held until admitted
                fe.ctr[fe.o_bin] -= len(data)  # (counted when it is read again)
            return  # a request was refused or this is the last one: nothing more is read
        before = self.parsing
        if before is None and _LOOSE_LINE.match(data):
            # llhttp lets "GET  / HTTP/1.1" through; a request line has single spaces
            self._reject(400)
            return
        self.rx = data
        if before is not None and before.chunked and before.head_done and (
                _EXT_ABUSE.search(data) is not None):
            self._reject(400)  # (a head read is checked in on_headers_complete)
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgrade_data(data[e.args[0]:])
        except httptools.HttpParserCallbackError as e:
            ctx = e.__context__
            if isinstance(ctx, HeadError):
                self._reject(ctx.status)
            elif isinstance(ctx, _Stop):
                pass
            else:
                log.error("internal error while parsing a request", exc_info=ctx or e)
                self._reject(500)
        except httptools.HttpParserError as e:
            self._reject(_llhttp_status(e, self.parsing, data))
        else:
            r = self.parsing
            if r is not None and not r.head_done and r is before:
                # a head still incomplete after a whole read: bound what httptools holds for it
                self.head_bytes += len(data)
                if self.head_bytes > self.fe.limits.max_header_size + self.fe.limits.max_uri:
                    self._reject(431)

    def _simple(self, route: Route, m: re.Match[bytes], data: bytes
                ) -> tuple[bytes, bytes, bool, bytes] | None:
        """The simple path: a request `_SIMPLE_REQUEST` matched whole (a GET or HEAD in origin
        form, HTTP/1.1, each field line `name: value` with nothing llhttp or `request_head`
        would refuse or rewrite in its syntax) on a frontend without routing rules. It sends the
        same head the full path would, byte for byte, and refuses nothing itself: anything it
        does not handle (a field to drop or check, a Host not seen before, a size near a limit)
        returns None, and the full path parses the same bytes. What it decides, (method, url,
        keep_alive, line) with `line` the request line and fields the server gets, is a
        function of the bytes alone (and the route): the route remembers it by them
        (`Route.req_memo`), for the same request on any connection; data_received sends it."""
        method, url, fields = m.group(1, 2, 3)
        n = len(fields)
        if n + len(url) > route.max_header_size - 64 or len(url) > self.fe.max_uri or (
                n > 4 * route.max_headers and fields.count(b"\n") > route.max_headers):
            return None
        low = b"\n" + fields.lower()
        found = route.req_scan.findall(low)
        keep_alive = True
        if len(found) == 1:
            name, host = found[0]
            if name != b"host":
                return None
        elif len(found) == 2:
            (name, host), (name2, value) = found
            if name != b"host":
                name, host, name2, value = name2, value, name, host
            if name != b"host" or name2 != b"connection":
                return None
            if value == b"close":
                keep_alive = False
            elif value != b"keep-alive":
                return None
            a = low.find(b"\nconnection:")  # the line to cut, in `fields` from a on
            fields = fields[:a] + fields[fields.find(b"\r\n", a) + 2:]
        else:
            return None
        if host not in _GOOD_HOSTS and not good_host(host):
            return None  # the full path answers it
        line = b"".join((method, b" ", url, b" HTTP/1.1\r\n", fields))
        hit = (method, url, keep_alive, line)
        if len(data) <= 2048:  # (at most 256 of them: half a megabyte a route)
            memo = route.req_memo
            if len(memo) >= 256:
                memo.clear()
            memo[data] = hit
        return hit

    def on_message_begin(self) -> None:
        # a request starts (its first byte): llhttp is inside a message until it completes,
        # so `parsing` is None exactly when the parser stands between requests
        if self.block & BLOCK_STOP:
            raise _Stop
        r = self.parsing = Exchange(self, self.last_rx)
        self.hl = r.headers
        self.head_bytes = 0
        if not self.q:
            when = r.t0 + self.fe.http_request
            if self.th is None or self.th_when > when:
                self._arm(when)

    def on_url(self, url: bytes) -> None:
        # (a URL split across reads comes in pieces)
        r = self.parsing
        r.url += url
        if len(r.url) > self.fe.max_uri:
            raise HeadError(414)

    def on_header(self, name: bytes, value: bytes) -> None:
        # a header field, or a trailer field of a chunked body (limits: on_headers_complete)
        self.hl.append((name, value))

    def on_headers_complete(self) -> None:
        r = self.parsing
        r.head_done = True
        parser = self.parser
        fe = self.fe
        fields = r.headers
        method = parser.get_method()
        r.method = method
        version = parser.get_http_version()
        r.http11 = http11 = version == "1.1"
        if not http11 and version != "1.0":  # HTTP/0.9 or a major version of 2 and up
            # a request line without a version ("GET /") is malformed, not HTTP/0.9
            raise HeadError(400 if version == "0.9" and b" HTTP/0.9" not in self.rx else 505)
        r.keep_alive = parser.should_keep_alive()
        r.is_head = method == b"HEAD"
        r.idempotent = method in IDEMPOTENT
        if method == b"CONNECT":  # not a forward proxy
            raise HeadError(501)
        # route first, on the target's authority (absolute form) or Host, and the path
        url = r.url
        authority = None
        if url[:1] != b"/" or fe.rules:
            host = None
            for n, v in fields:
                if n.lower() == b"host":
                    host = v.strip()
                    break
            rhost, path, authority = request_target(url, host)
            be = fe.route(rhost, path) if fe.rules else fe.default
        else:
            be = fe.default
        r.backend = be
        route = fe.routes[be.name] if be is not None else fe.no_route
        r.route = route
        if self.xff_trust is not None:  # the peer is a trusted proxy: the client is in XFF
            self._trusted_client(fields)
        r.head, chunked, body, r.upgrade, r.needs_host, expect = request_head(
            method, url, http11, fields, parser.should_upgrade(), route, authority, self.xff_ip,
            b"%s%x" % (PREFIX, next(ids)))
        if self.cert_line:  # (where the simple path puts it: before the route's lines)
            n = len(route.req_add)
            r.head = r.head[:-n] + self.cert_line + r.head[-n:]
        r.chunked = chunked
        r.plain = http11 and not r.is_head and not r.upgrade
        r.headers = None  # not needed any more
        if chunked:
            r.trailers = self.hl = []  # trailer fields, if any, come after the body
            # chunk-size lines with over 4 KiB of extensions (llhttp reads them without a
            # limit, and they carry nothing we forward); later reads: data_received
            start = self.rx.find(b"\r\n\r\n")
            if start >= 0 and _EXT_ABUSE.search(self.rx, start + 2) is not None:
                raise HeadError(400)
        if be is None:
            r.error = 503
        elif fe.climits is not None and fe.climits.rate:
            wait = fe.climits.request(self.client_key)  # (the simple path is off: limits.attach)
            if wait:
                r.error = 429
                r.retry_after = wait
                r.buffering = HELD  # answered once the request is whole: the connection stays
        if body:
            # a body follows: from now on the client may be silent for `timeout client` at most
            when = self.last_rx + fe.client_timeout
            if fe.limits.min_body_rate:  # and it must come at that rate at least, over a window
                self.rate_t = self.last_rx
                self.rate_n = 0
                when = min(when, self.last_rx + RATE_WINDOW)
            if self.th is None or self.th_when > when:
                self._arm(when)
            # HAProxy's http-buffer-request: no server is engaged before the body's first buffer
            # (or all of it) is here, so a slow or broken upload never reaches or pins a server
            r.buffering = 2 if expect else 1
        q = self.q
        q.append(r)
        if len(q) == 1:
            self._start(r, self.last_rx)
        elif len(q) > PIPELINE_LIMIT:
            self._block(BLOCK_PIPELINE)

    def trust_xff(self, trusted) -> None:
        """The peer is a trusted proxy (clientaddr.Edge): each request's client address comes
        from its X-Forwarded-For, so no request takes the simple path."""
        self.xff_trust = trusted
        self.simple = None

    def _trusted_client(self, fields: list[tuple[bytes, bytes]]) -> None:
        name = self.fe.xff_low or b"x-forwarded-for"
        values = [v for n, v in fields if n.lower() == name]
        got = client_from_xff(values, self.xff_trust) if values else None
        self.client_key = got if got is not None else self.peer_key

    def on_body(self, data: bytes) -> None:
        r = self.parsing
        n = len(data)
        r.body_size += n
        limit = self.fe.limits.max_request_body
        if limit and r.body_size > limit:
            raise HeadError(413)
        if r.error:
            return
        if r.chunked:
            self._send_body(r, (b"%x\r\n" % n, data, CRLF), n + 12)
        else:
            self._send_body(r, (data,), n)

    def on_message_complete(self) -> None:
        r = self.parsing
        self.parsing = None
        self.rate_t = 0.0
        if r.error:
            if r.buffering == HELD:  # a 429, answered now that its request is whole
                r.complete = True
                self._buffered(r)
            return
        r.complete = True
        if r.chunked:
            if r.trailers:
                block = b"".join(b"%s: %s\r\n" % (n, v) for n, v in r.trailers)
                self._send_body(r, (b"0\r\n", block, CRLF), 5 + len(block))
            else:
                self._send_body(r, (CHUNK_END,), 5)
        if not r.keep_alive or r.upgrade:
            self._block(BLOCK_STOP)
        if r.buffering:
            self._buffered(r)

    def _buffered(self, r: Exchange) -> None:
        """The body's first buffer, or all of it, is here: `r` may go to a server."""
        r.buffering = 0
        q = self.q
        if q and q[0] is r and r.server is None and self.waiter is None:
            self._start(r)

    # -- dispatching ---------------------------------------------------------------------------
    def _queue(self, r: Exchange) -> None:
        q = self.q
        q.append(r)
        if len(q) == 1:
            self._start(r)
        elif len(q) > PIPELINE_LIMIT:
            self._block(BLOCK_PIPELINE)

    def _start(self, r: Exchange, now: float = 0.0) -> None:
        """Send `r` on its way (`now`: the loop time, when the caller has it fresh)."""
        if r.error and r.buffering != HELD:
            self._send_error(r, r.error)
            return
        if r.buffering:  # its body is not buffered yet (see _buffered)
            if r.buffering == 2 and self.transport is not None:
                r.buffering = 1
                self.ob.write(self.transport, b"HTTP/1.1 100 Continue\r\n\r\n")
                fe = self.fe
                fe.ctr[fe.o_bout] += 25
            return
        be = r.backend
        outcome, got = be.assign(self.peer_key, self, r, now or self.last_rx)
        if outcome:  # not assigned: queued, or nothing up, or the queue is full too
            if outcome == QUEUED:
                self.waiter = got
                r.t_wait = now or self.last_rx
            else:
                self._send_error(r, 503, "SC")
            return
        server = got
        if r.idempotent and not r.upgrade:
            # the usual case, inline: an idle pooled connection to the server, head sent now
            if not now:
                now = self.loop.time()
            conn = be.pool.acquire(server.pool_key, now)
            if conn is not None:
                r.server = server
                r.t_queue = now
                r.attempts += 1
                conn.reused = True
                r.attach(conn, now)
                return
        self._use(r, server, now=now)

    def granted(self, r: Exchange, server: Server | None) -> None:
        """The backend queue's answer: a server whose slot is ours, or None (503)."""
        self.waiter = None
        if self.transport.is_closing() or not self.q or self.q[0] is not r:
            if server is not None:  # gone meanwhile: the slot goes to the next one
                r.backend.release(server)
            return
        if server is None:
            self._send_error(r, 503, "sQ")  # the queue timed out
        else:
            self._use(r, server)

    def _use(self, r: Exchange, server: Server, fresh: bool = False, now: float = 0.0) -> None:
        """Send `r` to `server`, whose slot `r` holds: on a pooled connection or a new one."""
        be = r.backend
        if not now:
            now = self.loop.time()
        r.server = server
        r.t_queue = now
        r.attempts += 1
        conn = None
        # http-reuse safe: a request that is not idempotent gets a fresh server connection; an
        # idempotent one (a client connection's first too) may take a pooled connection, which
        # has served a response already; if the server closed it meanwhile, the request goes
        # again on a fresh one (see _attempt_failed: not counted as a retry)
        if not fresh and r.idempotent and not r.upgrade:
            pool = be.pool if server.send_proxy is None else self._private(be)
            conn = pool.acquire(server.pool_key, now)
        if conn is not None:
            conn.reused = True
            r.attach(conn, now)
        else:
            self.lb.spawn(self._connect(r, server))

    def _private(self, be) -> Pool:
        """The pool of this client's own server connections: one that began with a PROXY
        header carries this client's address, so it is reused by this client only (HAProxy
        makes such connections private)."""
        pool = self.own_pool
        if pool is None:
            pool = self.own_pool = Pool(max_idle=min(be.pool.max_idle, 1),
                                        idle_timeout=be.pool.idle_timeout)
        return pool

    def _again(self, r: Exchange, avoid: Server | None = None, prefer: Server | None = None,
               fresh: bool = False, why: str = "") -> bool:
        """Assign `r` again (a retry); False when no server can take it now or later."""
        be = r.backend
        outcome, got = be.assign(self.peer_key, self, r, self.loop.time(),
                                 avoid=avoid, retry=True, prefer=prefer)
        if avoid is not None and outcome in (ASSIGNED, QUEUED):
            be.retried(avoid, got if outcome == ASSIGNED else None)
        if outcome == ASSIGNED:
            if why:
                be = r.backend
                log.info("retrying %s %s: server %s/%s failed (%s), trying %s/%s",
                         r.method.decode("latin-1"), r.url.decode("latin-1")[:200], be.name,
                         avoid.name if avoid is not None else "?", why, be.name, got.name)
            self._use(r, got, fresh=fresh)
            return True
        if outcome == QUEUED:
            self.waiter = got
            r.t_wait = self.loop.time()
            if why:
                log.info("retrying %s %s: server %s/%s failed (%s), waiting for a free server",
                         r.method.decode("latin-1"), r.url.decode("latin-1")[:200],
                         r.backend.name, avoid.name if avoid is not None else "?", why)
            return True
        if why:
            log.info("not retrying %s %s: server %s/%s failed (%s), no other server to try",
                     r.method.decode("latin-1"), r.url.decode("latin-1")[:200], r.backend.name,
                     avoid.name if avoid is not None else "?", why)
        return False

    async def _connect(self, r: Exchange, server: Server, wait: float = 0.0) -> None:
        be = r.backend
        timeout = be.timeouts.connect or None
        if wait:  # (no descriptor for it a moment ago: see OUT_OF_FDS below)
            await asyncio.sleep(wait)
            if self.transport.is_closing() or not self.q or self.q[0] is not r:
                r.release_server()
                return
        t = self.loop.time()
        try:
            async with asyncio.timeout(timeout):
                pool = be.pool if server.send_proxy is None else self._private(be)
                # (a PROXY header goes first, before any TLS handshake)
                tls_now = server.send_proxy is None
                _, conn = await self.loop.create_connection(
                    lambda: UpstreamHttp(pool, server, self.loop, self.ob), server.host, server.port,
                    ssl=server.ssl if tls_now else None,
                    server_hostname=server.sni if tls_now else None)
                if not tls_now:
                    send_proxy_header(conn.transport, server.send_proxy, self)
                    if server.ssl is not None:
                        conn.transport = await self.loop.start_tls(
                            conn.transport, conn, server.ssl, server_hostname=server.sni)
        except (OSError, TimeoutError) as e:
            late = isinstance(e, TimeoutError)
            reason = "connection timeout" if late else (e.strerror or str(e)).lower()
            if late:
                server.ctr[server.cbase + S_TIMEOUT_CONNECT] += 1
            if self.transport.is_closing() or not self.q or self.q[0] is not r:
                r.release_server()
                return
            if getattr(e, "errno", None) in OUT_OF_FDS:
                # this process's limit, not the server's fault: idle server connections give
                # some back (tried again at once); else fewer clients are accepted from now on,
                # and the request waits for a descriptor (50 ms, doubling to 1 s) within
                # timeout.connect, unless this process holds more clients than it can serve
                if be.pool.shrink():
                    self.lb.spawn(self._connect(r, server))
                    return
                adm = self.lb.admission
                adm.short_of_fds()
                if adm.load() <= adm.cap and self.loop.time() + wait < r.t_queue + (timeout or 5.0):
                    self.lb.spawn(self._connect(r, server, min(2 * wait or FD_WAIT, 1.0)))
                    return
                r.release_server()
                self._send_error(r, 503, "PC")
                return
            self.attempt_failed(r, False, reason, connected=False)
            return
        now = self.loop.time()
        ctr = server.ctr
        h = server.hct
        ctr[h + bisect_left(server.hb, now - t)] += 1
        ctr[h + server.hn] += int((now - t) * 1e6)
        if self.transport.is_closing() or not self.q or self.q[0] is not r:
            # the client went away, or its request was refused, meanwhile: a connection that
            # never carried a request is not kept (only connections that served are pooled)
            r.release_server()
            conn.close()
            return
        r.attach(conn, now)

    def _send_body(self, r: Exchange, chunks: tuple[bytes, ...], n: int) -> None:
        if r.send_body(chunks, n):
            self._block(BLOCK_PENDING)
        if r.buffering and r.pending_size >= BUFSIZE:
            self._buffered(r)

    def attempt_failed(self, r: Exchange, reused: bool, reason: str, connected: bool,
                       timeout: bool = False) -> None:
        """The server attempt of the active request `r` failed: before any response byte came
        (`r.got_response` false), or with a broken or late response. `reused`: on a pooled
        connection; `connected`: the request (or part of it) went out."""
        server = r.server
        be = r.backend
        replayable = r.idempotent and r.replay is not None and not r.upgrade
        stale = reused and connected and not timeout and not r.got_response
        if server is not None and not stale:
            server.ctr[server.cbase + (S_ERESP if connected else S_ECON)] += 1
            be.observe_error(server, reason, layer7=timeout or r.got_response)
        r.release_server()
        if r.responded:
            alog = self.fe.alog
            if alog is not None:
                alog(r, _status(r), "sD" if timeout else "SD")
            self._abort()  # part of the response went out: the client must see it broke
            return
        if timeout:  # no response head within timeout.server (part of one may have come)
            if (be.cfg.retry_on_timeout and replayable and not r.got_response
                    and r.attempts <= be.retries):  # HAProxy's `retry-on response-timeout`
                r.replay_body()
                if self._again(r, avoid=server, why=reason):
                    return
            self._send_error(r, 504, "sH")
            return
        if r.got_response:
            self._send_error(r, 502, "PH" if "invalid" in reason or "too large" in reason
                             else "SH")
            return
        if stale and replayable and server is not None:
            # a pooled connection the server had closed meanwhile: not the server's fault and
            # not a retry; the same server again on a fresh connection
            r.replay_body()
            r.attempts -= 1
            if self._again(r, prefer=server, fresh=True):
                return
            self._send_error(r, 503, "SC")
            return
        # may it go again? no request byte reached a server, or it is idempotent and whole
        if (not connected or replayable) and r.attempts <= be.retries:
            if connected:
                r.replay_body()
            if self._again(r, avoid=server, why=reason):
                return
        if connected:
            self._send_error(r, 502, "SH")
        else:
            self._send_error(r, 503, "sC" if reason == "connection timeout" else "SC")

    # -- responses ------------------------------------------------------------------------------
    def response_done(self, r: Exchange, now: float) -> None:
        """The whole response of the active request went to the client (`now`: the loop
        time)."""
        server = r.server
        if server is not None:
            r.server = None
            r.backend.release(server)
        self.served += 1
        q = self.q
        if q and q[0] is r:
            q.popleft()
        if self.closing or not r.complete:
            self._close()
            return
        if self.block & BLOCK_PIPELINE:
            self._unblock(BLOCK_PIPELINE)
        if q:
            if self.next_again is not None:  # inside the loop below: it starts the next one
                self.next_again = True
                return
            self.next_again = True
            try:
                while self.next_again and q:
                    self.next_again = False
                    self._start(q[0])
            finally:
                self.next_again = None
        else:
            self.idle_since = now
            if self.parsing is None:
                when = now + self.fe.http_keep_alive
            else:
                when = self.parsing.t0 + self.fe.http_request
            if self.th is None or self.th_when > when:
                self._arm(when)

    def _send_error(self, r: Exchange, status: int, term: str = "") -> None:
        """Answer `r` ourselves (it must be the active request, with no response sent).
        `term`: the access log's termination state (default: from the status)."""
        r.release_server()
        r.detach()
        transport = self.transport
        alog = self.fe.alog
        if transport is None or transport.is_closing():
            if alog is not None:  # the client is gone: nothing to answer
                alog(r, 0, "CR" if not r.complete else "CQ")
            return
        r.responded = True
        fe = self.fe
        fe.ctr[(r.route or fe.no_route).ocls + status // 100] += 1
        keep = ((status in ERR_KEEP or status == 429) and r.complete and r.keep_alive and not self.closing
                and not r.upgrade and not (self.block & BLOCK_STOP))
        if status == 429:
            answer = too_many_requests(r.retry_after, keep)
        else:
            answer = ERR_KEEP[status] if keep else (ERR_CLOSE.get(status) or error_response(status))
        if r.is_head:  # the same head, without the body a HEAD response never has
            answer = answer[:answer.index(b"\r\n\r\n") + 4]
        self.ob.write(transport, answer)
        fe.ctr[fe.o_bout] += len(answer)
        if alog is not None:
            r.bytes_out += len(answer)
            alog(r, status, term or _TERMS.get(status, "PR"))
        if keep:
            self.response_done(r, self.loop.time())
        else:
            self._close()

    def _reject(self, status: int) -> None:
        """The request being parsed is refused: answer it in its turn, then close."""
        self._block(BLOCK_STOP)
        self.parser = None
        r = self.parsing
        self.parsing = None
        if r is None:
            r = Exchange(self, self.loop.time())
        q = self.q
        if q and q[0] is r:  # the active request went wrong in its body
            if r.responded:
                if self.fe.alog is not None:
                    self.fe.alog(r, _status(r), "PD")
                self._abort()
            else:
                self._send_error(r, status)
            return
        r.error = status
        if r not in q:
            self._queue(r)

    def _close(self) -> None:
        self.closing = True
        self.block |= BLOCK_STOP
        t = self.transport
        if t is not None and not t.is_closing():
            self.ob.close(t)

    def _abort(self) -> None:
        self.closing = True
        t = self.transport
        if t is not None:
            self.ob.abort(t)

    # -- upgrades (WebSocket and others): raw bytes both ways after a 101 -----------------------
    def _upgrade_data(self, rest: bytes) -> None:
        # httptools stopped after the head of an upgrade request: from here the client's bytes
        # go to the server as they are, whatever its answer turns out to be
        self.mode = MODE_TUNNEL
        self.parser = None
        if rest:
            self._tunnel_to_server(rest)

    def _tunnel_to_server(self, data: bytes) -> None:
        if self.q and self.q[0].send_raw(data):
            self._block(BLOCK_PENDING)

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
                r = self.parsing
                if why & _FLOW and r is not None and r.head_done:
                    # a body we stopped reading: its client's deadlines start again from now
                    self.last_rx = now = self.loop.time()
                    if self.rate_t:
                        self.rate_t = now
                        self.rate_n = r.body_size
                    self._arm(now + (RATE_WINDOW if self.rate_t else self.fe.client_timeout))

    def _deadline(self) -> tuple[float, int] | None:
        """The earliest client-side deadline in force and what happens then."""
        t = self.fe.timeouts
        best = None
        if self.wblocked_at and t.client:
            best = (self.wblocked_at + t.client, 3)
        if self.mode == MODE_TUNNEL:
            r = self.q[0] if self.q else None
            last = max(self.last_rx, r.server_rx() if r is not None else 0.0)
            tun = r.backend.timeouts.tunnel if r is not None and r.backend else 0.0
            d = (last + tun, 4) if tun else None
        elif self.parsing is not None:
            r = self.parsing
            if not r.head_done:  # (a pipelined head gets its time once the ones before are done)
                # a connection's first request has it from the accept on, a later one from its
                # first byte (its wait before that was http_keep_alive's)
                start = r.t0 if self.served else self.idle_since
                d = (start + t.http_request, 1) if t.http_request and not self.q else None
            elif self.block & _FLOW:
                d = None  # we are not reading its body: the server's timeout applies meanwhile
            else:
                d = (self.last_rx + t.client, 2) if t.client else None
                if self.rate_t and (d is None or self.rate_t + RATE_WINDOW < d[0]):
                    d = (self.rate_t + RATE_WINDOW, 5)  # the body's rate window ends
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
        now = self.loop.time()
        if what == 5 and now >= when:
            # limits.min_body_rate: did the window bring enough of the body? then the next one
            r = self.parsing
            if r.body_size - self.rate_n >= self.fe.limits.min_body_rate * RATE_WINDOW:
                self.rate_t = now
                self.rate_n = r.body_size
                when, what = self._deadline()
        if now < when:
            self.th_when = when
            self.th = self.loop.call_at(when, self._on_timer)
            return
        fe = self.fe
        if what == 0:  # idle keep-alive, or a connection that never sent a byte
            self._close()
        elif what in (1, 2, 5):  # the head was late, the body stalled or came too slowly
            fe.ctr[fe.cbase + (F_TIMEOUT_HTTP_REQUEST if what == 1 else F_TIMEOUT_CLIENT)] += 1
            r = self.parsing
            if r is not None and r.responded:  # (its server answered early): it is cut
                if fe.alog is not None:
                    fe.alog(r, _status(r), "cD")
                self._abort()
                return
            self._reject(408)
        else:  # the client stopped reading, or the tunnel went quiet
            fe.ctr[fe.cbase + (F_TIMEOUT_CLIENT if what == 3 else F_TIMEOUT_TUNNEL)] += 1
            if self.q and self.fe.alog is not None:
                r = self.q[0]
                self.fe.alog(r, 101 if what == 4 else _status(r), "cD")
            self._abort()
            if self.q:
                self.q[0].detach()

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
