"""Test support: real loopback servers, raw clients and a running load balancer.

In the spirit of HAProxy's reg-tests: scripted servers, inline configuration, raw client bytes
and assertions on what comes back (status, headers, body, close).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httptools

from foobar_lb import LoadBalancer

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Messages seen by a scripted server, and responses parsed by a test client


@dataclass
class Request:
    method: str
    url: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""
    chunked: bool = False
    trailers: list[tuple[str, str]] = field(default_factory=list)
    conn_id: int = 0

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(values) if values else None


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    version: str = "1.1"
    trailers: list[tuple[str, str]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return ", ".join(values) if values else None


class _Collect:
    """httptools callbacks gathering whole messages."""

    def __init__(self, request: bool):
        self.request = request
        self.done: list[Any] = []
        self.cur: Any = None
        self.in_body = False
        self.parser: Any = None
        self.on_head: Callable[[dict], None] | None = None

    def on_message_begin(self):
        self.in_body = False
        self.cur = {"url": b"", "headers": [], "body": [], "trailers": []}

    def on_url(self, url):
        self.cur["url"] += url

    def on_header(self, name, value):
        key = "trailers" if self.in_body else "headers"
        self.cur[key].append((name.decode("latin-1"), value.decode("latin-1").strip()))

    def on_headers_complete(self):
        self.in_body = True
        if self.request:
            self.cur["method"] = self.parser.get_method().decode()
            self.cur["version"] = self.parser.get_http_version()
            if self.on_head is not None:
                self.on_head(self.cur)
        else:
            self.cur["status"] = self.parser.get_status_code()

    def on_body(self, body):
        self.cur["body"].append(body)

    def on_message_complete(self):
        self.done.append(self.cur)


def parse_responses(data: bytes) -> list[Response]:
    """Every response in `data`; a last one delimited by the close counts too."""
    c = _Collect(False)
    c.parser = p = httptools.HttpResponseParser(c)
    with contextlib.suppress(httptools.HttpParserError):
        p.feed_data(data)
    msgs = list(c.done)
    if c.cur is not None and "status" in c.cur and (not msgs or msgs[-1] is not c.cur):
        msgs.append(c.cur)
    return [Response(m["status"], m["headers"], b"".join(m["body"]), trailers=m["trailers"])
            for m in msgs]


def complete_responses(data: bytes) -> list[Response]:
    """Only the responses in `data` that are complete."""
    c = _Collect(False)
    c.parser = p = httptools.HttpResponseParser(c)
    with contextlib.suppress(httptools.HttpParserError):
        p.feed_data(data)
    return [Response(m["status"], m["headers"], b"".join(m["body"]), trailers=m["trailers"])
            for m in c.done]


# ---------------------------------------------------------------------------------------------
# A scripted HTTP server on loopback

Handler = Callable[[Request], Awaitable[bytes | None] | bytes | None]


def http_response(status: int = 200, body: bytes = b"", headers: list[tuple[str, str]] | None = None,
                  *, reason: str = "OK", chunked: bool = False, close: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason}"]
    for n, v in headers or []:
        lines.append(f"{n}: {v}")
    if close:
        lines.append("Connection: close")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in [body] if p) + b"0\r\n\r\n"
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


class ScriptedServer:
    """An HTTP/1.1 server whose answers a test writes: `handler(request) -> raw response bytes`.

    The default handler answers 200 with a body naming the server. Every request is recorded in
    `requests`, with the id of the connection it came on (`conn_id`), so tests can see reuse.
    """

    def __init__(self, name: str = "s", handler: Handler | None = None, host: str = LOOPBACK,
                 idle_timeout: float | None = None):
        self.name = name
        self.handler = handler or self._default
        self.host = host
        self.idle_timeout = idle_timeout  # close kept-alive connections idle this long
        self.port = 0
        self.requests: list[Request] = []
        self.connections = 0
        self.open_connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.transports: set[asyncio.Transport] = set()

    async def _default(self, req: Request) -> bytes:
        return http_response(200, f"{self.name} {req.method} {req.url}\n".encode(),
                             [("X-Server", self.name)])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, port: int = 0) -> ScriptedServer:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _ServerConn(self), self.host, port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            for t in list(self.transports):
                t.abort()
            self.server = None

    async def __aenter__(self) -> ScriptedServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class _ServerConn(asyncio.Protocol):
    def __init__(self, srv: ScriptedServer):
        self.srv = srv
        srv.connections += 1
        self.conn_id = srv.connections
        self.collect = _Collect(True)
        self.parser = self.collect.parser = httptools.HttpRequestParser(self.collect)
        self.collect.on_head = self._on_head
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport
        self.srv.transports.add(transport)
        self.srv.open_connections += 1
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def _on_head(self, msg: dict) -> None:
        # like real servers: say 100 Continue to a client that waits for it
        if any(n.lower() == "expect" and v.lower() == "100-continue" for n, v in msg["headers"]):
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            self.transport.close()
            return
        while self.collect.done:
            m = self.collect.done.pop(0)
            req = Request(
                method=m["method"],
                url=m["url"].decode("latin-1"),
                version=m["version"],
                headers=m["headers"],
                body=b"".join(m["body"]),
                chunked=any(n.lower() == "transfer-encoding" for n, _ in m["headers"]),
                trailers=m["trailers"],
                conn_id=self.conn_id,
            )
            self.srv.requests.append(req)
            self.queue.put_nowait(req)

    async def _serve(self):
        while True:
            if self.srv.idle_timeout is not None:
                try:
                    req = await asyncio.wait_for(self.queue.get(), self.srv.idle_timeout)
                except TimeoutError:
                    self.transport.close()  # like a server's keep-alive timeout
                    return
            else:
                req = await self.queue.get()
            out = self.srv.handler(req)
            if asyncio.iscoroutine(out):
                out = await out
            if out is None:
                continue  # the handler took care of it (or wants silence)
            if self.transport.is_closing():
                return
            self.transport.write(out)
            if b"\r\nconnection: close\r\n" in out.split(b"\r\n\r\n", 1)[0].lower() + b"\r\n":
                self.transport.close()
                return

    def connection_lost(self, exc):
        self.srv.transports.discard(self.transport)
        self.srv.open_connections -= 1
        if self.task is not None:
            self.task.cancel()


# ---------------------------------------------------------------------------------------------
# Clients


async def raw_exchange(host: str, port: int, data: bytes | list[bytes], *, timeout: float = 5.0,
                       read_until_close: bool = True, half_close: bool = False,
                       delay: float = 0.0) -> bytes:
    """Send raw bytes (a list is sent piece by piece, `delay` apart) and read until the
    server closes (or `timeout`)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for piece in data if isinstance(data, list) else [data]:
            writer.write(piece)
            await writer.drain()
            if delay:
                await asyncio.sleep(delay)
        if half_close:
            writer.write_eof()
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            async with asyncio.timeout(timeout):
                while True:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
                    if not read_until_close:
                        break
        return b"".join(chunks)
    finally:
        writer.close()


class RawClient:
    """A kept-alive connection for sending raw requests and reading whole responses."""

    def __init__(self, host: str, port: int):
        self.host = host
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.buf = b""

    async def __aenter__(self) -> RawClient:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_responses(self, n: int = 1, timeout: float = 5.0) -> list[Response]:
        """Read until `n` complete responses arrived (or the connection closed)."""
        async with asyncio.timeout(timeout):
            while True:
                got = complete_responses(self.buf)
                if len(got) >= n:
                    return got[:n]
                chunk = await self.reader.read(65536)
                if not chunk:
                    return parse_responses(self.buf)
                self.buf += chunk

    async def closed(self, timeout: float = 5.0) -> bool:
        """True when the peer closes the connection within `timeout` (remaining bytes kept)."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    chunk = await self.reader.read(65536)
                    if not chunk:
                        return True
                    self.buf += chunk
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True


async def http_get(host: str, port: int, path: str = "/", headers: dict[str, str] | None = None,
                   method: str = "GET", timeout: float = 5.0) -> Response:
    """One request on its own connection (Connection: close)."""
    headers = dict(headers or {})
    lines = [f"{method} {path} HTTP/1.1", "Connection: close"]
    if not any(k.lower() == "host" for k in headers):
        lines.append(f"Host: {host}:{port}")
    lines += [f"{k}: {v}" for k, v in headers.items()]
    raw = await raw_exchange(host, port, ("\r\n".join(lines) + "\r\n\r\n").encode(),
                             timeout=timeout)
    got = parse_responses(raw)
    assert got, f"no response to {method} {path}: {raw[:200]!r}"
    return got[0]


# ---------------------------------------------------------------------------------------------
# The load balancer


def lb_config(servers: list[str] | dict[str, list[Any]], *, mode: str = "http",
              balance: str = "roundrobin", frontend: dict | None = None,
              backend: dict | None = None, defaults: dict | None = None) -> dict:
    """A one-frontend configuration dict on a free loopback port (port 0).

    `servers`: addresses for one backend "app", or {backend_name: [addresses or server tables]}.
    """
    backends: dict[str, Any] = {}
    groups = servers if isinstance(servers, dict) else {"app": servers}
    for name, group in groups.items():
        entries = []
        for i, s in enumerate(group):
            entries.append(s if isinstance(s, dict) else {"name": f"s{i + 1}", "address": s})
        backends[name] = {"mode": mode, "balance": balance, "servers": entries, **(backend or {})}
    fe = {"bind": [f"{LOOPBACK}:0"], "mode": mode, "default_backend": next(iter(groups))}
    fe.update(frontend or {})
    cfg: dict[str, Any] = {"frontends": {"www": fe}, "backends": backends}
    if defaults:
        cfg["defaults"] = defaults
    return cfg


@contextlib.asynccontextmanager
async def running_lb(config: dict):
    lb = LoadBalancer(config)
    await lb.start()
    try:
        yield lb
    finally:
        await lb.stop(grace=1.0)


# ---------------------------------------------------------------------------------------------
# As a process: `python tests/support.py NAME PORT` serves the default answer until killed


async def _serve_forever(name: str, port: int) -> None:
    srv = await ScriptedServer(name).start(port)
    print(f"listening {srv.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    import sys

    asyncio.run(_serve_forever(sys.argv[1], int(sys.argv[2])))
