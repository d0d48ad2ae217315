"""Exchanges: one request and its response on a client connection, and the vocabulary the
client and server Protocols share.

Rule of this module: an `Exchange` holds what one request/response owns (the chosen server and
backend, attempts, the replay buffer, body bytes waiting for a server connection, how far the
response got); it does no I/O and parses nothing. The Protocols (`client.py`, `server.py`) move
it along.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ...backend import Backend
    from ...servers import Server

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
        "replay",
        "replay_size",
        "responded",
        "route",
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
        self.pending: list[bytes] = NO_BYTES  # framed body bytes not yet sent to the server
        self.pending_size = 0
        self.replay: list[bytes] | None = NO_BYTES  # every framed body byte so far, if small
        self.replay_size = 0
        self.body_size = 0
        self.attempts = 0
        self.is_head = False
        self.buffering = 0  # 1: a body to buffer before a server is engaged; 2: and 100 to send
        self.got_response = False  # a byte of the response arrived from the server
        self.responded = False  # a byte of the response went to the client
