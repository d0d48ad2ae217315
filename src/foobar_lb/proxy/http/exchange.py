"""Exchanges: one request and its response on a client connection; the one link between the
client side (`client.HttpSession`) and the server side (`server.UpstreamHttp`).

Rules of this module:
- an `Exchange` holds what one request/response owns: its client session and, while one is
  engaged, its server connection (`conn`); the chosen server and backend, attempts, the replay
  buffer, body bytes waiting for a server connection, how far the response got;
- the two Protocols never touch each other: each calls the exchange's methods, and the
  exchange moves bytes between them (`attach`, `send_body`, `to_client`), passes flow control
  on (`pause_*`/`resume_*`) and reports the end (`end`, `fail`) to the client session, which
  answers, retries or goes on with its next request;
- it parses nothing, decides no framing (that is `head.py`) and picks no server (that is the
  backend's `assign`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..base import pass_eof
from ..outbox import SMALL

if TYPE_CHECKING:
    from ...backend import Backend
    from ...frontend import Route
    from ...servers import Server
    from .client import HttpSession
    from .server import UpstreamHttp

__all__ = ["BUFSIZE", "PENDING_LIMIT", "PIPELINE_LIMIT", "Exchange"]

BUFSIZE = 16384  # HAProxy's tune.bufsize: requests with bodies up to this can be replayed
PENDING_LIMIT = 65536  # bytes held for a server not yet writable before the client is paused
PIPELINE_LIMIT = 16  # parsed requests waiting their turn before the client is paused

# client read-blocking reasons (bit mask)
BLOCK_UPSTREAM = 1  # the server connection's write buffer is full
BLOCK_PENDING = 2  # too much waiting for a server connection
BLOCK_PIPELINE = 4  # too many pipelined requests waiting
BLOCK_STOP = 8  # no more requests will be read on this connection
BLOCK_PARKED = 16  # beyond global maxconn: not served yet

# client-side phases (for the lazy deadline)
MODE_HTTP, MODE_TUNNEL = 0, 1

NO_BYTES: list[bytes] = []  # shared and never appended to: replaced by a new list when needed


class Exchange:
    """One request on a client connection, from its first byte to the end of its response."""

    __slots__ = (
        "attempts",
        "backend",
        "body_size",
        "buffering",
        "bytes_out",
        "chunked",
        "complete",
        "conn",
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
        "plain",  # HTTP/1.1, not HEAD, no upgrade: its response may come from the route's memo
        "replay",
        "replay_size",
        "responded",
        "retry_after",  # a 429's seconds to wait: set only with it (no cost per request)
        "route",
        "s",
        "server",
        # (these are set where they happen, not in __init__: the access log reads them with getattr)
        "status",  # a response cut short: the status that went out
        "t0",
        "t_connect",  # the server connection was ready (attach)
        "t_head",  # the response head arrived
        "t_queue",  # a server was assigned (the last attempt's)
        "t_wait",  # the request began waiting in a backend queue
        "term",  # the access log's termination state, once logged
        "trailers",
        "tried",  # the last server whose slot was given back
        "upgrade",
        "url",
    )

    def __init__(self, s: HttpSession, t0: float, route: Route | None = None,
                 method: bytes = b"", url: bytes = b"", keep_alive: bool = True,
                 head: bytes = b""):
        # the full path (`route` None): llhttp parses the head into `headers`, and its own
        # fields (method and the like) are set when it is complete; the simple path has them at
        # once (a whole GET or HEAD in HTTP/1.1, `head` what the server gets), each set once
        self.s = s
        self.t0 = t0
        self.url = url
        self.route = route
        if route is None:
            self.headers: list[tuple[bytes, bytes]] | None = []
            self.head_done = False
            self.is_head = False
            self.plain = False
            self.backend: Backend | None = None
        else:
            self.headers = None
            self.head_done = True
            self.head = head
            self.method = method
            self.http11 = True
            self.keep_alive = keep_alive
            self.plain = method != b"HEAD"
            self.is_head = not self.plain
            self.idempotent = True
            self.backend = route.backend
        # (`trailers` is set with `chunked`, and read only then)
        self.complete = False
        self.error = 0
        self.upgrade = False
        self.chunked = False
        self.needs_host = False
        self.server: Server | None = None
        self.conn: UpstreamHttp | None = None
        self.pending: list[bytes] = NO_BYTES  # framed body bytes not yet sent to the server
        self.pending_size = 0
        self.replay: list[bytes] | None = NO_BYTES  # every framed body byte so far, if small
        self.replay_size = 0
        self.body_size = 0
        self.attempts = 0
        self.buffering = 0  # 1: a body to buffer before a server is engaged; 2: and 100 to send
        self.got_response = False  # a byte of the response arrived from the server
        self.responded = False  # a byte of the response went to the client
        self.bytes_out = 0  # bytes of the response that went to the client

    # -- the client side's calls ----------------------------------------------------------------
    def attach(self, conn: UpstreamHttp, now: float) -> None:
        """A connected server connection takes this request: the head (and any body held for
        it) goes out now."""
        self.conn = conn
        self.t_connect = now
        conn.take(self, now)
        if self.s.wblocked_at:  # the client does not take our bytes: the server waits from the start
            conn.pause()
        head = self.head
        if self.needs_host:
            head = head[:-2] + b"host: " + self.server.address.encode() + b"\r\n\r\n"
        t = conn.transport
        server = conn.server
        if self.pending:
            server.ctr[server.o_bin] += len(head) + sum(map(len, self.pending))
            conn.ob.writelines(t, [head, *self.pending])
            self.pending = []
            self.pending_size = 0
            self.s.sent_pending()
        else:  # (counted before the write: a reader never sees bytes a server has uncounted)
            server.ctr[server.o_bin] += len(head)
            conn.ob.write(t, head)

    def send_body(self, chunks: tuple[bytes, ...], n: int) -> bool:
        """Body bytes (already framed for the server): to the server connection if one is
        attached, else held (True: as much as the pending limit allows, or more)."""
        replay = self.replay
        if replay is not None:
            self.replay_size += n
            if self.replay_size > BUFSIZE:
                self.replay = None
            elif replay is NO_BYTES:
                self.replay = list(chunks)
            else:
                replay += chunks
        conn = self.conn
        if conn is not None:
            conn.last_rx = self.s.last_rx  # the server is taking our bytes: it is alive
            server = conn.server
            if len(chunks) == 1:
                server.ctr[server.o_bin] += len(chunks[0])
                conn.ob.write(conn.transport, chunks[0])
            else:
                server.ctr[server.o_bin] += sum(map(len, chunks))
                conn.ob.writelines(conn.transport, chunks)
            return False
        if self.pending is NO_BYTES:
            self.pending = list(chunks)
        else:
            self.pending += chunks
        self.pending_size += n
        return self.pending_size > PENDING_LIMIT

    def send_raw(self, data: bytes) -> bool:
        """Tunnel bytes from the client: to the server connection, or held until it is
        attached (True: more than the pending limit is held)."""
        conn = self.conn
        if conn is not None and conn.transport is not None:
            server = conn.server
            server.ctr[server.o_bin] += len(data)
            conn.ob.write(conn.transport, data)
            return False
        if self.pending is NO_BYTES:
            self.pending = []
        self.pending.append(data)
        self.pending_size += len(data)
        return self.pending_size > PENDING_LIMIT

    def replay_body(self) -> None:
        """The request goes again: its whole body is pending again."""
        self.pending = list(self.replay)
        self.pending_size = self.replay_size

    def detach(self) -> None:
        """The client side lets go of the server connection (it went away, or refused or timed
        out): the connection is closed, never reused."""
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.unlink()

    def release_server(self) -> None:
        """The server's slot is given back (the attempt or the exchange is over)."""
        server = self.server
        if server is not None:
            self.server = None
            self.tried = server
            self.backend.release(server)

    def pause_server(self) -> None:
        """The client does not take our bytes: stop reading the server."""
        conn = self.conn
        if conn is not None:
            conn.pause()

    def resume_server(self, now: float) -> None:
        conn = self.conn
        if conn is not None:
            conn.resume(now)

    def server_rx(self) -> float:
        """When the server connection last sent something (0: none attached)."""
        conn = self.conn
        return conn.last_rx if conn is not None else 0.0

    # -- the server side's calls ----------------------------------------------------------------
    def client_stays(self) -> bool:
        """Whether the client connection stays open after this response."""
        return self.keep_alive and not self.upgrade and not self.s.closing

    def to_client(self, out: list[bytes]) -> None:
        """Response bytes for the client (one write; big bodies are not copied again)."""
        s = self.s
        t = s.transport
        if t is None or t.is_closing():
            return
        if len(out) == 1:
            data = out[0]
            n = len(data)
            s.ob.write(t, data)
        elif len(out[-1]) < 8192:
            data = b"".join(out)
            n = len(data)
            s.ob.write(t, data)
        else:
            n = sum(map(len, out))
            s.ob.writelines(t, out)
        self.bytes_out += n
        fe = s.fe
        fe.ctr[fe.o_bout] += n

    def send_client(self, head: bytes, data: bytes, start: int) -> None:
        """A whole response for the client (the response memo's): `head`, then `data` from
        `start` on (a big body is not copied)."""
        s = self.s
        t = s.transport
        if t is None or t.is_closing():
            return
        if len(data) - start > SMALL:
            s.ob.writelines(t, [head, memoryview(data)[start:]])
        else:
            s.ob.write(t, head + data[start:])
        n = len(head) + len(data) - start
        self.bytes_out += n
        fe = s.fe
        fe.ctr[fe.o_bout] += n

    def close_client_after(self) -> None:
        """The client connection closes after this response (it says `Connection: close`)."""
        self.s.closing = True

    def end(self, conn: UpstreamHttp) -> None:
        """The whole response went to the client; `conn` has unlinked itself."""
        if self.conn is conn:
            self.conn = None
        if self.route.alog is not None:  # (the access log: off, this is all it costs)
            self.route.alog(self, conn.status, "--")
        self.s.response_done(self, conn.last_rx)

    def fail(self, conn: UpstreamHttp, reason: str, timeout: bool = False) -> None:
        """The server attempt failed (a broken, late or cut response, or none); `conn` has
        unlinked itself. The client session retries or answers."""
        if self.conn is conn:
            self.conn = None
        if self.responded:
            self.status = conn.status  # (for the access log)
        self.s.attempt_failed(self, conn.reused, reason, connected=True, timeout=timeout)

    def pause_client(self) -> None:
        """The server does not take our bytes: stop reading the client."""
        self.s.server_full()

    def resume_client(self) -> None:
        self.s.server_ready()

    def tunnel(self, rest: bytes) -> None:
        """The server switched protocols (101): raw bytes both ways from now on."""
        s = self.s
        held = self.pending
        conn = self.conn
        if held and conn is not None:
            conn.ob.writelines(conn.transport, held)
            server = conn.server
            server.ctr[server.o_bin] += sum(map(len, held))
        self.pending = []
        self.pending_size = 0
        s.tunnel_started(self.backend.timeouts.tunnel)
        if rest:
            self.to_client([rest])

    def tunnel_eof(self, from_server: bool) -> bool:
        """A FIN on one leg of a tunnel; the return value is eof_received's on that leg."""
        conn = self.conn
        s = self.s
        if from_server:
            s.ob.send_now(s.transport)  # (its bytes before its EOF)
            return pass_eof(s.eof_in, s.transport)
        if conn is not None:
            conn.ob.send_now(conn.transport)
        return pass_eof(conn is None or conn.eof_in, conn.transport if conn is not None else None)

    def tunnel_closed(self, exc: Exception | None) -> None:
        """The server side of a tunnel closed: so does the client side."""
        self.conn = None
        self.s.end_tunnel(exc)

