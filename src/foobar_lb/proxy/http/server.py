"""The server side of an HTTP connection: the response, relayed and re-framed; one decision
whether the connection may be reused.

Rules of this module:
- responses are parsed by httptools without per-header callbacks: once llhttp has accepted a
  head, its raw bytes are edited (hop-by-hop lines cut by the frontend/backend plan's pattern)
  rather than rebuilt field by field; llhttp decides every boundary;
- a response with broken framing is a 502 while nothing was sent to the client, else a visibly
  truncated response; such a connection, and one that sent bytes after its response, is closed,
  never pooled;
- between requests a connection waits in its backend's pool; bytes or a close while idle mark it
  closed, and it is skipped at the next checkout.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING

import httptools

from ..base import LazyTimer, pass_eof
from ..upstream import Pool
from .exchange import BLOCK_PENDING, BLOCK_STOP, BLOCK_UPSTREAM, MODE_TUNNEL, Exchange
from .head import (
    CHUNK,
    CHUNK_END,
    CRLF,
    NO_BODY,
    PASS,
    RAW,
    STATUS_LINES,
    UNTIL_CLOSE,
    HeadError,
    tokens,
)

if TYPE_CHECKING:
    from ...servers import Server
    from .client import HttpSession

__all__ = ["UpstreamHttp"]

log = logging.getLogger("foobar_lb.http")

_PLAIN_CONNECTION = frozenset({b"keep-alive", b"Keep-Alive", b"close", b"Close"})


def _field_lines(names: list[bytes]) -> re.Pattern[bytes]:
    """A pattern matching whole field lines ("Name: value" CRLF) for any of `names`."""
    alt = b"|".join(re.escape(n) for n in names)
    return re.compile(rb"^(" + alt + rb")[ \t]*:([^\r\n]*)\r\n", re.IGNORECASE | re.MULTILINE)


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

    def unlink(self, keep: bool = False) -> None:
        """The one way a server connection leaves its request: the client side forgets it, it
        forgets the client side, and then the one reuse decision: back to the pool when `keep`
        and the response is complete and clean (nothing after it, no close asked for), the
        request was whole and no upgrade, and the connection is open; closed otherwise."""
        s = self.session
        if s is not None and s.up is self:
            s.up = None
        r = self.req
        self.session = None
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
        responded = r.responded  # whether any byte went to the client before this read
        hb = self.hb
        if hb is None:
            self.rx = data
        else:
            self.rx = hb + data
            self.hb = None
        self.head_start = 0
        self.body_off = 0 if self.mode == RAW and self.status else -1
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
                # bytes after a complete response: out of step, the connection is closed;
                # relayed raw (chunked), the response is cut where its last chunk ends
                self.done = 2
                if self.mode == RAW and self.body_off >= 0:
                    end = _chunked_end(self.rx, self.body_off)
                    if end < 0:
                        broken = "bytes after the end of a chunked response"
                    else:
                        self.rx = self.rx[:end]
            elif isinstance(ctx, HeadError):
                broken = ctx.why
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
            if len(rest) > r.route.max_header_size:
                broken = "response head too large"
            else:
                self.hb = rest
        if broken is None and self.body_off >= 0:  # chunked relayed as received
            off = self.body_off
            wbuf.append(memoryview(self.rx)[off:] if off else self.rx)  # no copy
        elif broken is not None and not responded:
            # nothing reached the client yet: it gets a 502, not the start of a broken answer
            wbuf.clear()
            r.responded = False
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
            self.unlink(keep=True)
            s.response_done(r, not s.closing)

    @staticmethod
    def _flush(s: HttpSession, wbuf: list[bytes]) -> None:
        if wbuf and s.transport is not None and not s.transport.is_closing():
            if len(wbuf) == 1:
                s.transport.write(wbuf[0])
            else:
                s.transport.writelines(wbuf)

    def _fail(self, s: HttpSession, r: Exchange, reason: str, timeout: bool = False) -> None:
        self.unlink()
        s._attempt_failed(r, self, reason, connected=True, timeout=timeout)

    def _finish(self, s: HttpSession, r: Exchange) -> None:
        """The response ended with the server's close (data_received inlines the usual end)."""
        self.unlink()
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
            raise HeadError(502, "unexpected 101 response")
        fe = s.fe
        fe.ctr[fe.cls0 + status // 100] += 1
        srv = r.server
        if srv is not None and (status >= 500 or srv.errors):
            r.backend.observe_status(srv, status)
        self.resp_close = not parser.should_keep_alive()
        keep_client = r.keep_alive and not s.closing and not r.upgrade
        head = self._head(r, status, rx, start, end, keep_client)
        if not keep_client or self.mode == UNTIL_CLOSE:
            s.closing = True
        r.responded = True
        s.wbuf.append(head)
        if self.mode != RAW:
            self.body_off = -1
        if r.is_head and status >= 200:
            raise _HeadDone

    def _head(self, r: Exchange, status: int, rx: bytes, start: int, end: int,
              keep_client: bool | None) -> bytes:
        """The response head for the client: our status line, the server's fields minus the
        hop-by-hop ones and the plan's deletions, the framing and the plan's additions. Sets
        `mode` (how the body goes to the client) for final responses."""
        plan = r.route
        line = rx.find(b"\r\n", start) + 2  # the fields start after the status line
        fields = rx[line:end + 2]  # each field line ends with CRLF
        n = len(fields)
        # (a field line takes at least 4 bytes: only a long head may have too many of them)
        if n + line - start > plan.max_header_size or (
                n > 4 * plan.max_headers and fields.count(b"\n") > plan.max_headers):
            raise HeadError(502, "response head too large")
        parts = [STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status]
        pos = 0
        cl = te = False
        extra = None
        upgrade = b""
        # the lines to cut or read, found in the lower-cased fields after a leading newline:
        # a match at `a` there is the line starting at `a` here, its colon at m.end() - 1
        for m in plan.resp_scan.finditer(b"\n" + fields.lower()):
            name = m.group(1)
            if name == b"content-length":
                cl = True
                continue
            a = m.start()
            b = fields.find(b"\r\n", a) + 2
            if name == b"transfer-encoding":
                te = fields[m.end() - 1:b - 2].rstrip().lower().endswith(b"chunked")
            elif name == b"connection":
                value = fields[m.end() - 1:b - 2].strip()
                if value not in _PLAIN_CONNECTION:
                    more = [t for t in tokens(value)
                            if t not in (b"close", b"keep-alive", b"upgrade")]
                    if more:
                        extra = (extra or []) + more
            elif name == b"upgrade":
                upgrade = fields[m.end() - 1:b - 2].strip()
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
            parts += (b"connection: upgrade\r\nupgrade: ", upgrade or b"websocket", CRLF)
        elif keep_client is not None:
            if r.is_head or status == 204 or status == 304:
                mode = NO_BODY
            elif te:
                mode = RAW if r.http11 else UNTIL_CLOSE
            elif cl:
                mode = PASS
            elif r.http11:
                mode = CHUNK  # delimited by the server's close: chunked for the client
                self.eof_ends = True
            else:
                mode = UNTIL_CLOSE
                self.eof_ends = True
            self.mode = mode
            if mode in (CHUNK, RAW):
                parts.append(b"transfer-encoding: chunked\r\n")
            if not keep_client or mode == UNTIL_CLOSE:
                parts.append(b"connection: close\r\n")
            elif not r.http11:
                parts.append(b"connection: keep-alive\r\n")
        parts.append(plan.resp_add)
        return b"".join(parts)

    def on_body(self, data: bytes) -> None:
        mode = self.mode
        if mode in (PASS, UNTIL_CLOSE):
            self.session.wbuf.append(data)
        elif mode == CHUNK:
            self.session.wbuf += (b"%x\r\n" % len(data), data, CRLF)
        # RAW: the received bytes are relayed as they are; NO_BODY: nothing

    def on_message_complete(self) -> None:
        if not self.status or self.status == 101:
            return  # an interim response ended (the real one follows), or a tunnel starts
        if self.mode == CHUNK:
            self.session.wbuf.append(CHUNK_END)
        self.done = 1

    def _start_tunnel(self, s: HttpSession, r: Exchange, rest: bytes) -> None:
        self.tunnel = True
        self._disarm()
        s.mode = MODE_TUNNEL
        s.parser = None
        s._unblock(BLOCK_STOP | BLOCK_PENDING)
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
            self.unlink()
            s._close() if exc is None else s._abort()
            return
        if r is None:
            return
        if self.eof_ends and self.status and exc is None:
            # a response delimited by the server's close is complete now
            if self.mode == CHUNK:
                self._flush(s, [CHUNK_END])
            self.done = 2
            self._finish(s, r)
            return
        self._fail(s, r, "connection reset" if exc is not None else "connection closed")

    def pause_writing(self) -> None:
        s = self.session
        if s is not None:
            s._block(BLOCK_UPSTREAM)

    def resume_writing(self) -> None:
        s = self.session
        if s is not None:
            s._unblock(BLOCK_UPSTREAM)

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
        self._fail(s, r, "server timeout", timeout=True)
