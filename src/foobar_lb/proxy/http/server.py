"""The server side of an HTTP connection: the response, relayed and re-framed; one decision
whether the connection may be reused.

Rules of this module:
- responses are parsed by httptools without per-header callbacks: once llhttp has accepted a
  head, its raw bytes are edited by `head.response_head` (hop-by-hop lines cut, framing and the
  route's lines written) rather than rebuilt field by field; llhttp decides every boundary;
- it knows its request only as an `Exchange` and reaches the client only through it;
- a response with broken framing is a 502 while nothing was sent to the client, else a visibly
  truncated response; such a connection, and one that sent bytes after its response, is closed,
  never pooled: `unlink` is the one place that decides;
- between requests a connection waits in its backend's pool; bytes or a close while idle mark it
  closed, and it is skipped at the next checkout;
- the commonest response (a whole `Content-Length` response in one read, for an HTTP/1.1
  client's GET) whose head is byte for byte one llhttp accepted lately on this route skips
  llhttp and `response_head`: the route's memo (`Route.resp_memo`, or `resp_memo_close` for a
  client that closes after it) holds what the client got for that head, which is all the full
  path would compute again from the same bytes.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from typing import TYPE_CHECKING

import httptools

from ...shared import S_TIMEOUT_SERVER
from ..base import LazyTimer
from ..outbox import Outbox
from ..upstream import Pool
from .exchange import Exchange
from .head import (
    CHUNK,
    CHUNK_END,
    CRLF,
    PASS,
    RAW,
    UNTIL_CLOSE,
    HeadError,
    response_head,
)

if TYPE_CHECKING:
    from ...servers import Server

__all__ = ["UpstreamHttp"]

log = logging.getLogger("foobar_lb.http")


def _chunked_end(buf: bytes, off: int) -> int:
    """Where a chunked body starting at `off` in `buf` ends (after its final empty line), or -1.
    Only for the rare response followed by more bytes in the same read: llhttp has accepted the
    body, so its framing is known to be valid; -1 when it does not start at `off`."""
    pos = off
    try:
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return -1
            size = int(buf[pos:eol].split(b";", 1)[0].strip(b" \t"), 16)
            pos = eol + 2
            if size == 0:
                while True:  # trailer fields, then the empty line
                    eol = buf.find(b"\r\n", pos)
                    if eol < 0:
                        return -1
                    if eol == pos:
                        return eol + 2
                    pos = eol + 2
            pos += size + 2
    except ValueError:
        return -1


class _HeadDone(Exception):
    pass


class _Stop(Exception):
    pass


class UpstreamHttp(LazyTimer):
    """The server side of one connection in HTTP mode; pooled between requests."""

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
        "memo_head",
        "memo_keep",
        "memo_key",
        "mode",
        "ob",
        "out",
        "parser",
        "paused",
        "pool",
        "req",
        "resp_close",
        "reused",
        "rx",
        "server",
        "status",
        "th",
        "th_when",
        "transport",
        "tunnel",
    )

    def __init__(self, pool: Pool, server: Server, loop: asyncio.AbstractEventLoop,
                 ob: Outbox | None = None):
        self.pool = pool
        # every write to the server goes through `ob`, the outbox of the session that made the
        # connection (or its own)
        self.ob = ob if ob is not None else Outbox(loop)
        self.server = server
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.req: Exchange | None = None
        self.closed = False
        self.reused = False  # taken from the pool at least once
        self.idle_since = 0.0
        self.last_rx = 0.0
        self.paused = False
        self.tunnel = False
        self.eof_in = False
        self.status = 0
        self.mode = PASS
        self.done = 0  # 1: the response is complete and the connection reusable; 2: not reusable
        self.eof_ends = False  # the response body ends when the server closes
        self.resp_close = False
        self.out: list[bytes] = []  # what this read gives the client
        self.rx = b""  # the bytes being parsed (with the start of a head from earlier reads)
        self.hb: bytes | None = None  # the start of a head that did not end in its read
        self.head_start = 0  # where the message being parsed starts in rx
        self.in_head = False
        self.body_off = -1  # where raw body bytes to relay start in rx (-1: none in this read)
        self.th: asyncio.TimerHandle | None = None
        self.th_when = 0.0
        self.memo_key: bytes | None = None  # a head to remember once its response proves whole
        self.memo_head = b""
        self.memo_keep = True  # whether the client stayed (which of the route's two memos)

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    # -- the exchange's calls --------------------------------------------------------------------
    def take(self, r: Exchange, now: float) -> None:
        """Serve `r` (its head is written next): the server timer runs from now."""
        self.req = r
        self.done = 0
        self.status = 0  # no response begun: the memo may take the next read
        self.eof_ends = False
        self.last_rx = now
        timeout = r.route.timeouts.server
        if timeout and (self.th is None or self.th_when > now + timeout):
            self._arm(now + timeout)

    def pause(self) -> None:
        self.paused = True
        self.transport.pause_reading()

    def resume(self, now: float) -> None:
        self.paused = False
        self.last_rx = now
        self.transport.resume_reading()

    def unlink(self, keep: bool = False) -> None:
        """The one way a server connection leaves its request, and the one reuse decision:
        back to the pool when `keep` and the response is complete and clean (nothing after it,
        no close asked for), the request was whole and no upgrade, and the connection is open;
        closed otherwise."""
        r = self.req
        self.req = None
        if keep and self.done == 1 and r is not None and r.complete and not r.upgrade and (
                not self.resp_close and not self.closed and not self.tunnel):
            if self.paused:
                self.paused = False
                self.transport.resume_reading()
            self.pool.release(self.server.pool_key, self, self.last_rx)
        else:
            self.close()

    def close(self) -> None:
        self.closed = True
        self._disarm()
        t = self.transport
        if t is not None and not t.is_closing():
            self.ob.close(t)

    # -- bytes from the server ----------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        r = self.req
        if r is None:
            # bytes from an idle connection: it is out of step, never reuse it
            self.close()
            return
        self.last_rx = now = self.loop.time()
        server = self.server
        server.ctr[server.o_bout] += len(data)
        if self.tunnel:
            r.to_client([data])
            return
        r.got_response = True
        hb = self.hb
        if hb is None and not self.status and r.plain:
            # a response begins with this read: one whose head was seen lately, whole in it?
            # (the memo: what the full path gave the client for the same bytes; a client that
            # stays and one that closes after it get different heads, each with its memo)
            stays = r.keep_alive and not r.s.closing
            end = data.find(b"\r\n\r\n") + 4  # (not found: 3, and no head is 3 bytes long)
            route = r.route
            hit = (route.resp_memo if stays else route.resp_memo_close).get(data[:end])
            if hit is not None and len(data) - end == hit[1]:
                # as on_headers_complete and on_message_complete would: counted, sent, and
                # the connection freed
                head, _, status = hit
                r.t_head = now
                self._count_head(r, status)
                self.status = status
                self.mode = PASS
                self.resp_close = False
                r.responded = True
                if not stays:
                    r.close_client_after()
                r.send_client(head, data, end)
                self.done = 1
                self.unlink(True)
                r.end(self)
                return
        responded = r.responded  # whether any byte went to the client before this read
        if hb is None:
            self.rx = data
        else:
            self.rx = hb + data
            self.hb = None
        self.head_start = 0
        self.body_off = 0 if self.mode == RAW and self.status else -1
        self.out = out = []
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            if out:
                r.to_client(out)
            self.tunnel = True
            self._disarm()
            r.tunnel(data[e.args[0]:])
            return
        except (httptools.HttpParserCallbackError, httptools.HttpParserError) as e:
            broken = self._parse_error(e)
        else:
            broken = None
        if self.in_head or self.body_off >= 0:
            broken = self._partial(broken, out)
        if broken is not None and not responded:
            # nothing reached the client yet: it gets a 502, not the start of a broken answer
            out.clear()
            if r.responded:  # (its head was counted: the 502 is counted instead)
                server = self.server
                server.ctr[server.fcls[r.route.fi] + self.status // 100] -= 1
            r.responded = False
        self.rx = b""
        if self.memo_key is not None:
            key, self.memo_key = self.memo_key, None
            if broken is None and self.done == 1 and hb is None and self.mode == PASS:
                # (the response was this whole read: its length)
                memo = r.route.resp_memo if self.memo_keep else r.route.resp_memo_close
                if len(memo) >= 64:
                    memo.clear()
                memo[key] = (self.memo_head, len(data) - len(key), self.status)
        if out:
            r.to_client(out)
        if broken is not None:
            log.info("server %s/%s: %s", self.server.backend, self.server.name, broken)
            self.unlink()
            r.fail(self, broken)
        elif self.done:
            # the response is complete (and flushed): free the connection, then the exchange;
            # the server timer stays armed: when it fires it finds no request and stops, which
            # is cheaper than cancelling and re-creating a timer for every request
            self.unlink(True)
            r.end(self)

    def _count_head(self, r: Exchange, status: int) -> None:
        """A final response head, counted (both paths): its class, and the time since the
        request went out (the server's response time: HAProxy's Tr, to `r.t_head`, the loop
        time of this read) in its histogram; a 5xx, or any answer from a server with errors,
        observed."""
        server = self.server
        ctr = server.ctr
        ctr[server.fcls[r.route.fi] + status // 100] += 1
        t = r.t_head - r.t_connect
        ctr[server.hrt + bisect_left(server.hb, t)] += 1
        ctr[server.hrs] += int(t * 1e6)
        srv = r.server
        if srv is not None and (status >= 500 or srv.errors):
            r.backend.observe_status(srv, status)

    def _parse_error(self, e: Exception) -> str | None:
        """What a parsing exception means: None, or why the response is broken."""
        ctx = e.__context__
        if isinstance(e, httptools.HttpParserCallbackError) and isinstance(ctx, _HeadDone):
            # a HEAD response ends with its head; the connection is clean only if the head
            # ended exactly where this read did
            self.parser = httptools.HttpResponseParser(self)
            clean = self.rx.find(b"\r\n\r\n", self.head_start) + 4 == len(self.rx)
            self.done = 1 if clean and not self.resp_close else 2
            self.body_off = -1
            return None
        if isinstance(e, httptools.HttpParserCallbackError) and isinstance(ctx, _Stop):
            # bytes after a complete response: out of step, the connection is closed;
            # relayed raw (chunked), the response is cut where its last chunk ends
            self.done = 2
            if self.mode == RAW and self.body_off >= 0:
                end = _chunked_end(self.rx, self.body_off)
                if end < 0:
                    return "bytes after the end of a chunked response"
                self.rx = self.rx[:end]
            return None
        if isinstance(e, httptools.HttpParserCallbackError):
            if isinstance(ctx, HeadError):
                return ctx.why
            log.error("internal error while relaying a response", exc_info=ctx or e)
            return "internal error"
        if self.done:
            self.done = 2
            return None
        return f"invalid response ({e})"

    def _partial(self, broken: str | None, out: list) -> str | None:
        """After a read that left a head unfinished (kept for the next read) or relayed a
        chunked body as it came (appended to `out` without a copy)."""
        if self.in_head:
            rest = self.rx[self.head_start:]
            if len(rest) > self.req.route.max_header_size:
                return "response head too large"
            self.hb = rest
        if broken is None and self.body_off >= 0:
            off = self.body_off
            out.append(memoryview(self.rx)[off:] if off else self.rx)  # no copy
        return broken

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
        r = self.req
        rx = self.rx
        start = self.head_start
        end = rx.find(b"\r\n\r\n", start)  # llhttp accepted this head: its first empty line
        if status < 200 and status != 101:
            # 100 Continue and friends: relayed to HTTP/1.1 clients, then the real response
            if r.http11:
                self.out.append(response_head(rx, start, end, status, r.route, False, True,
                                              None)[0])
            self.head_start = end + 4
            self.body_off = -1
            return
        self.status = status
        r.t_head = self.last_rx
        if status == 101 and not r.upgrade:
            raise HeadError(502, "unexpected 101 response")
        self._count_head(r, status)
        self.resp_close = not parser.should_keep_alive()
        keep_client = r.client_stays()
        head, mode, self.eof_ends = response_head(rx, start, end, status, r.route, r.is_head,
                                                  r.http11, keep_client)
        self.mode = mode
        if mode == PASS and not start and r.plain and not self.resp_close:
            self.memo_key = rx[:end + 4]  # remembered if the response proves whole in this read
            self.memo_head = head
            self.memo_keep = keep_client
        if not keep_client or mode == UNTIL_CLOSE:
            r.close_client_after()
        r.responded = True
        self.out.append(head)
        self.body_off = end + 4 if mode == RAW else -1
        if r.is_head:
            raise _HeadDone

    def on_body(self, data: bytes) -> None:
        mode = self.mode
        if mode in (PASS, UNTIL_CLOSE):
            self.out.append(data)
        elif mode == CHUNK:
            self.out += (b"%x\r\n" % len(data), data, CRLF)
        # RAW: the received bytes are relayed as they are; NO_BODY: nothing

    def on_message_complete(self) -> None:
        if not self.status or self.status == 101:
            return  # an interim response ended (the real one follows), or a tunnel starts
        if self.mode == CHUNK:
            self.out.append(CHUNK_END)
        self.done = 1

    # -- end of the server connection -----------------------------------------------------------
    def eof_received(self) -> bool:
        r = self.req
        keep = False
        if self.tunnel and r is not None:
            self.eof_in = True
            keep = r.tunnel_eof(from_server=True)
        if not keep:  # the transport closes itself on False: what waits for it goes first
            self.ob.send_now(self.transport)
        return keep

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._disarm()
        r = self.req
        if r is None:
            return  # idle in a pool: it is skipped at the next checkout
        if self.tunnel:
            self.unlink()
            r.tunnel_closed(exc)
            return
        if self.eof_ends and self.status and exc is None:
            # a response delimited by the server's close is complete now
            if self.mode == CHUNK:
                r.to_client([CHUNK_END])
            self.done = 2
            self.unlink()
            r.end(self)
            return
        self.unlink()
        r.fail(self, "connection reset" if exc is not None else "connection closed")

    def pause_writing(self) -> None:
        r = self.req
        if r is not None:
            r.pause_client()

    def resume_writing(self) -> None:
        r = self.req
        if r is not None:
            r.resume_client()

    # -- server timeout --------------------------------------------------------------------------
    def _on_timer(self) -> None:
        self.th = None
        r = self.req
        if r is None or self.tunnel:
            return
        timeout = r.route.timeouts.server
        now = self.loop.time()
        when = self.last_rx + timeout
        if self.paused or now < when:
            # the client is slow to read (its own timeout applies) or the server spoke lately
            self.th_when = now + timeout if self.paused else when
            self.th = self.loop.call_at(self.th_when, self._on_timer)
            return
        server = self.server
        server.ctr[server.cbase + S_TIMEOUT_SERVER] += 1
        self.unlink()
        r.fail(self, "server timeout", timeout=True)
