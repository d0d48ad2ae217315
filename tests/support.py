"""Test support: real loopback servers, raw clients and a running load balancer.

In the spirit of HAProxy's reg-tests: scripted servers, inline configuration, raw client bytes
and assertions on what comes back (status, headers, body, close).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import h11

from foobar_lb import LoadBalancer

LOOPBACK = "127.0.0.1"


_OUR_ID = re.compile(rb"X-Request-ID: [0-9a-f]{12}-[0-9a-f]+\r\n")


def our_ids(data: bytes) -> bytes:
    """What a server got, with the request ids the proxy made (a per-process prefix and a
    counter: different in every run) written as `X-Request-ID: (ours)`, for byte-for-byte
    comparisons; an id a client sent and the proxy kept stays as it is."""
    return _OUR_ID.sub(b"X-Request-ID: (ours)\r\n", data)


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


class HttpParseError(AssertionError):
    """What the proxy sent is not valid HTTP/1.1: the test fails, with the bytes."""


Methods = str | list[str] | None


def _field_lines(block: bytes, where: str, data: bytes) -> list[tuple[str, str]]:
    """The field lines of a head or trailer section exactly as sent: the name as spelled and the
    value after the colon and its leading whitespace, every other byte kept (trailing spaces
    included). Only CRLF ends a line; a bare CR or LF or an obs-fold is an error."""
    fields = []
    for line in block.split(b"\r\n") if block else []:
        if b"\r" in line or b"\n" in line:
            raise HttpParseError(f"bare CR or LF in the {where}: {line!r} in {data[:2000]!r}")
        if line[:1] in (b" ", b"\t"):
            raise HttpParseError(f"obs-fold in the {where}: {line!r} in {data[:2000]!r}")
        name, colon, value = line.partition(b":")
        if not colon:
            raise HttpParseError(f"no colon in the {where}: {line!r} in {data[:2000]!r}")
        fields.append((name.decode("latin-1"), value.lstrip(b" \t").decode("latin-1")))
    return fields


def _cross_check(fields: list[tuple[str, str]], h11_headers: Any, where: str, data: bytes) -> None:
    """Our exact split of the field lines says what h11 says, but for the edge whitespace that
    is not part of a field value (RFC 9110 5.5)."""
    ours = [(n.encode("latin-1"), v.encode("latin-1").rstrip(b" \t")) for n, v in fields]
    theirs = [(bytes(n), bytes(v)) for n, v in h11_headers.raw_items()]
    if ours != theirs:
        raise HttpParseError(f"{where}: h11 read {theirs!r}, the bytes say {ours!r}: {data[:2000]!r}")


def _trailer_fields(seg: bytes, h11_headers: Any, data: bytes) -> list[tuple[str, str]]:
    """The trailer fields, exactly as sent, of the bytes h11 read with its EndOfMessage: the end
    of the last chunk's data, the last chunk, the trailer fields, an empty line."""
    last, _, rest = seg.removeprefix(b"\r\n").partition(b"\r\n")
    if not last.startswith(b"0") or not rest.endswith(b"\r\n\r\n"):
        raise HttpParseError(f"a trailer section not made of CRLF lines: {seg!r} in {data[:2000]!r}")
    fields = _field_lines(rest[:-4], "trailer section", data)
    _cross_check(fields, h11_headers, "trailer section", data)
    return fields


def _head_fields(seg: bytes, data: bytes) -> tuple[bytes, list[tuple[str, str]]]:
    """(start line, fields exactly as sent) of the bytes of a head h11 read as one event."""
    if not seg.endswith(b"\r\n\r\n"):
        raise HttpParseError(f"a head not made of CRLF lines: {seg!r} in {data[:2000]!r}")
    start, _, block = seg[:-4].partition(b"\r\n")
    return start, _field_lines(block, "head", data)


def _parse(data: bytes, methods: Methods, at_eof: bool) -> tuple[list[Response], Response | None]:
    """Responses in `data` read by h11 as a client that sent `methods` (one method for all, or
    one per response; GET by default), cross-checked against the raw bytes.

    Returns the complete responses (1xx ones included, in order) and the response whose head
    arrived but whose body did not end (None when none). Bytes that are not HTTP raise
    HttpParseError; so does a body cut short by the close when `at_eof` (the caller decides
    whether it tolerates that: see `parse_cut_responses`)."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
    if data:
        conn.receive_data(bytes(data))  # (h11 takes b"" for the close)
    if at_eof:
        conn.receive_data(b"")
    done: list[Response] = []
    cur: Response | None = None
    body: list[bytes] = []
    n = 0

    def send_request() -> None:
        if isinstance(methods, list):
            method = methods[n] if n < len(methods) else "GET"
        else:
            method = methods or "GET"
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "test")]))
        conn.send(h11.EndOfMessage())

    send_request()
    while True:
        pos = len(data) - len(conn.trailing_data[0])
        between = conn.their_state is h11.SEND_RESPONSE and cur is None and pos == len(data)
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as e:
            if at_eof and between and (not done or done[-1].status >= 200):
                return done, None  # closed between responses: no more of them
            if cur is not None and at_eof and conn.trailing_data[0] == b"" and "peer closed" in str(e):
                cur.body = b"".join(body)
                raise _Cut(done, cur) from None
            raise HttpParseError(f"not a valid HTTP/1.1 response at byte {pos}: {e}: "
                                     f"{data[:2000]!r}") from None
        seg = bytes(data[pos:len(data) - len(conn.trailing_data[0])])
        if event is h11.NEED_DATA or type(event) is h11.ConnectionClosed:
            if cur is not None:
                cur.body = b"".join(body)
            return done, cur
        if event is h11.PAUSED:
            raise HttpParseError(f"h11 paused (a protocol switch?) at byte {pos}: {data[:2000]!r}")
        if type(event) in (h11.Response, h11.InformationalResponse):
            status_line, fields = _head_fields(seg, data)
            version, _, rest = status_line.partition(b" ")
            if version != b"HTTP/" + event.http_version or rest[:4] != b"%d " % event.status_code:
                raise HttpParseError(f"status line {status_line!r} in {data[:2000]!r}")
            _cross_check(fields, event.headers, "response head", data)
            resp = Response(event.status_code, fields, version=event.http_version.decode())
            if type(event) is h11.InformationalResponse:
                done.append(resp)
            else:
                cur, body = resp, []
        elif type(event) is h11.Data:
            body.append(bytes(event.data))
        elif type(event) is h11.EndOfMessage:
            assert cur is not None
            if event.headers:
                cur.trailers = _trailer_fields(seg, event.headers, data)
            cur.body = b"".join(body)
            done.append(cur)
            cur, body = None, []
            if conn.their_state is h11.MUST_CLOSE:
                if conn.trailing_data[0]:
                    raise HttpParseError(
                        f"bytes after a response that closes the connection: "
                        f"{conn.trailing_data[0][:200]!r} in {data[:2000]!r}")
                return done, None
            n += 1
            conn.start_next_cycle()
            send_request()


class _Cut(Exception):
    def __init__(self, done: list[Response], cut: Response):
        self.done, self.cut = done, cut


def parse_responses(data: bytes, methods: Methods = None) -> list[Response]:
    """Every response in `data`, all the bytes there are (a last one delimited by the close
    counts too), read by h11. Anything that is not valid HTTP, and a body cut short, fails
    (HttpParseError). `methods`: the request methods (HEAD's responses have no body)."""
    try:
        got, _ = _parse(data, methods, at_eof=True)
    except _Cut as cut:
        raise HttpParseError(f"response {len(cut.done) + 1} was cut short by the close "
                                 f"(body {len(cut.cut.body)} bytes): {data[:2000]!r}") from None
    return got


def complete_responses(data: bytes, methods: Methods = None) -> list[Response]:
    """The complete responses in `data`, which may end in the middle of one (more may come);
    anything that is not valid HTTP fails (HttpParseError)."""
    return _parse(data, methods, at_eof=False)[0]


def parse_cut_responses(data: bytes, methods: Methods = None) -> tuple[list[Response], Response | None]:
    """For a test that expects a response cut short: the complete responses in `data` (all the
    bytes there are, closed), and the one whose head arrived but whose body the close cut
    short (its `body` what arrived), or None. Bytes that are not HTTP still fail."""
    try:
        return _parse(data, methods, at_eof=True)
    except _Cut as cut:
        return cut.done, cut.cut


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
                 idle_timeout: float | None = None, expect_garbage: bool = False):
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
        # requests that were not valid HTTP (the test fails when the server stops, unless
        # it expects garbage from the proxy)
        self.parse_errors: list[str] = []
        self.expect_garbage = expect_garbage

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
        if self.parse_errors and not self.expect_garbage:
            errors, self.parse_errors = self.parse_errors, []
            raise HttpParseError(f"server {self.name} received bytes that are not HTTP: {errors}")

    async def __aenter__(self) -> ScriptedServer:
        return await self.start()

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if exc is not None and self.parse_errors and not self.expect_garbage:
            # the test failed already: keep its error, and say what the server could not parse
            exc.add_note(f"server {self.name} received bytes that are not HTTP: {self.parse_errors}")
            self.parse_errors = []
        await self.stop()


class _ServerConn(asyncio.Protocol):
    """One connection of a ScriptedServer. Requests (the proxy's output) are read with h11, one
    h11 connection per request as the answers are raw bytes, and their fields kept exactly as
    sent. Bytes that are not a valid request are recorded in `srv.parse_errors` (the server
    closes the connection, and the test fails when the server stops, unless it said
    `expect_garbage`); after an upgrade request the rest is a tunnel, not parsed."""

    def __init__(self, srv: ScriptedServer):
        self.srv = srv
        srv.connections += 1
        self.conn_id = srv.connections
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
        self.fed = bytearray()  # what the current h11 connection was given
        self.cur: dict | None = None
        self.tunnel = False
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport
        self.srv.transports.add(transport)
        self.srv.open_connections += 1
        self.task = asyncio.get_running_loop().create_task(self._serve())

    def data_received(self, data):
        if self.tunnel or self.transport.is_closing():
            return
        self.fed += data
        self.h11.receive_data(data)
        try:
            self._pump()
        except (h11.RemoteProtocolError, HttpParseError) as e:
            self.srv.parse_errors.append(f"connection {self.conn_id}: {e}: {bytes(self.fed[:2000])!r}")
            self.transport.close()

    def _pump(self) -> None:
        while True:
            pos = len(self.fed) - len(self.h11.trailing_data[0])
            event = self.h11.next_event()
            seg = bytes(self.fed[pos:len(self.fed) - len(self.h11.trailing_data[0])])
            if event is h11.NEED_DATA:
                return
            if type(event) is h11.Request:
                request_line, fields = _head_fields(seg, bytes(self.fed))
                _cross_check(fields, event.headers, "request head", bytes(self.fed))
                if request_line != b"%s %s HTTP/%s" % (event.method, event.target, event.http_version):
                    raise HttpParseError(f"request line {request_line!r}")
                self.cur = {"method": event.method.decode("latin-1"),
                            "url": event.target.decode("latin-1"),
                            "version": event.http_version.decode("latin-1"),
                            "headers": fields, "body": [], "trailers": []}
                # like real servers: say 100 Continue to a client that waits for it
                if any(n.lower() == "expect" and v.lower() == "100-continue" for n, v in fields):
                    self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            elif type(event) is h11.Data:
                self.cur["body"].append(bytes(event.data))
            elif type(event) is h11.EndOfMessage:
                m = self.cur
                if event.headers:
                    m["trailers"] = _trailer_fields(seg, event.headers, bytes(self.fed))
                req = Request(
                    method=m["method"],
                    url=m["url"],
                    version=m["version"],
                    headers=m["headers"],
                    body=b"".join(m["body"]),
                    chunked=any(n.lower() == "transfer-encoding" for n, _ in m["headers"]),
                    trailers=m["trailers"],
                    conn_id=self.conn_id,
                )
                self.srv.requests.append(req)
                self.queue.put_nowait(req)
                # the next request on this connection goes to a new h11 connection
                rest = bytes(self.h11.trailing_data[0])
                if any(n.lower() == "upgrade" for n, _ in m["headers"]):
                    self.tunnel = True  # what follows is not HTTP any more
                    return
                if self.h11.their_state is h11.MUST_CLOSE:
                    if rest:
                        raise HttpParseError(f"bytes after a request that closes: {rest[:200]!r}")
                    return
                self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=1 << 20)
                self.fed = bytearray(rest)
                if not rest:
                    return
                self.h11.receive_data(rest)
            else:  # PAUSED, ConnectionClosed: nothing more to read here
                return

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

    async def read_responses(self, n: int = 1, timeout: float = 5.0,
                             methods: Methods = None) -> list[Response]:
        """Read until `n` complete responses arrived (or the connection closed: then every
        response there is, and a cut-short one fails). Bytes that are not HTTP fail."""
        async with asyncio.timeout(timeout):
            while True:
                got = complete_responses(self.buf, methods)
                if len(got) >= n:
                    return got[:n]
                chunk = await self.reader.read(65536)
                if not chunk:
                    return parse_responses(self.buf, methods)
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
    got = parse_responses(raw, method)
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
