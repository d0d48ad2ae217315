"""Channel: messages between the master and a worker over a Unix socket pair.

Rule of this module: a message is a tuple, pickled, behind its 4-byte length; `Decoder` turns
bytes into messages without I/O, `Channel` is the asyncio Protocol around it, and `recv_one`
reads the first message (the worker's set-up) before any event loop runs. Messages are about
state changes, observations and commands, never about single requests (nothing on the hot path
goes through here). The two ends trust each other: they are one program.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
import struct
from collections.abc import Callable
from typing import Any

__all__ = ["Channel", "Decoder", "encode", "recv_one"]

_LEN = struct.Struct("!I")


def encode(msg: Any) -> bytes:
    body = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


class Decoder:
    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        self.buf += data
        out = []
        while len(self.buf) >= 4:
            (n,) = _LEN.unpack_from(self.buf)
            if len(self.buf) < 4 + n:
                break
            out.append(pickle.loads(bytes(self.buf[4:4 + n])))
            del self.buf[:4 + n]
        return out


def recv_one(sock: socket.socket) -> Any:
    """Read one message, blocking (before the event loop starts)."""
    head = _recv_exactly(sock, 4)
    (n,) = _LEN.unpack(head)
    return pickle.loads(_recv_exactly(sock, n))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts = []
    while n:
        data = sock.recv(min(n, 1 << 20))
        if not data:
            raise EOFError("the other end of the channel closed")
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


class Channel(asyncio.Protocol):
    """`on_message(msg)` for each message, `on_closed()` once when the other end is gone."""

    def __init__(self, on_message: Callable[[Any], None], on_closed: Callable[[], None]):
        self.on_message = on_message
        self.on_closed = on_closed
        self.decoder = Decoder()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        for msg in self.decoder.feed(data):
            self.on_message(msg)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.on_closed()

    def send(self, msg: Any) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(encode(msg))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
