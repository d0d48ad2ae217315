"""Edges of the outbox (proxy/outbox.py): the first write of a loop turn goes at once, later small
ones wait for the turn's end, big ones go at once after what waits; a close sends what waits
first, an abort drops it, a tunnel's EOF (and an EOF that closes) sends what waits first.

Black-box tests over real loopback sockets against the in-process load balancer (running_lb):
raw client bytes in, exact bytes out, read with an independent parser (h11, through
support.parse_responses / complete_responses) where the proxy's own bytes are not known in
advance. Each test bounds its loops in count and time and stops what it starts.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time

import pytest

from foobar_lb.proxy.http.head import ERR_CLOSE, ERR_KEEP

from support import (
    LOOPBACK,
    RawClient,
    ScriptedServer,
    complete_responses,
    free_port,
    http_response,
    lb_config,
    parse_responses,
    running_lb,
)

KiB = 1024
MiB = 1024 * KiB


# ---------------------------------------------------------------------------------------------
# helpers


def ok(name: str, method: str, path: str) -> bytes:
    """What a client that stays gets for a ScriptedServer's default answer, byte for byte."""
    body = f"{name} {method} {path}\n".encode()
    return b"HTTP/1.1 200 OK\r\nX-Server: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        name.encode(), len(body), body)


def get(path: str, close: bool = False) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: t\r\n" + ("Connection: close\r\n" if close else "")
            + "\r\n").encode()


def pattern(n: int, seed: int = 0) -> bytes:
    """n bytes that show any loss, duplication or reordering (no two 8-byte blocks alike)."""
    out = bytearray()
    i = 0
    while len(out) < n:
        out += b"%07x|" % ((seed << 20) + i)
        i += 1
    return bytes(out[:n])


async def read_to_eof(reader: asyncio.StreamReader, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Everything until the peer closes: (bytes, whether EOF came within `timeout`)."""
    chunks = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return b"".join(chunks), True
                chunks.append(chunk)
    except TimeoutError:
        return b"".join(chunks), False
    except ConnectionResetError:
        return b"".join(chunks), False


async def exchange_to_eof(address: tuple[str, int], data: bytes) -> tuple[bytes, bool]:
    """A new connection to `address`: `data` sent, then everything until the peer closes
    (read_to_eof's answer)."""
    r, w = await asyncio.open_connection(*address)
    try:
        w.write(data)
        return await read_to_eof(r)
    finally:
        w.close()


async def read_until(reader: asyncio.StreamReader, buf: bytearray, n: int,
                     timeout: float = 10.0) -> None:
    """Read into `buf` until it holds at least `n` bytes (fails on EOF or time)."""
    async with asyncio.timeout(timeout):
        while len(buf) < n:
            chunk = await reader.read(65536)
            assert chunk, f"EOF after {len(buf)} of {n} bytes: {bytes(buf[-200:])!r}"
            buf += chunk


async def wait_for(cond, timeout: float = 5.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what or cond}"
        await asyncio.sleep(0.005)


def no_internal_errors(caplog) -> None:
    bad = [r for r in caplog.records
           if r.levelno >= logging.ERROR or "internal error" in r.getMessage()
           or r.exc_info is not None]
    assert not bad, "\n".join(f"{r.name} {r.levelname} {r.getMessage()}" for r in bad)


# ---------------------------------------------------------------------------------------------
# 1. pipelines with answers of the proxy's own between proxied ones


async def test_pipeline_with_503_of_ours_between_proxied_responses_in_order():
    dead = f"{LOOPBACK}:{free_port()}"  # nothing listens: 503 after the retries
    async with ScriptedServer("a") as a:
        cfg = lb_config({"app": [a.address], "down": [dead]},
                        frontend={"rules": [{"path_prefix": "/down", "backend": "down"}]})
        async with running_lb(cfg) as lb:
            r, w = await asyncio.open_connection(*lb.address)
            try:
                w.write(get("/a1") + get("/down/x") + get("/a2") + get("/down/y") + get("/a3"))
                expected = (ok("a", "GET", "/a1") + ERR_KEEP[503] + ok("a", "GET", "/a2")
                            + ERR_KEEP[503] + ok("a", "GET", "/a3"))
                buf = bytearray()
                await read_until(r, buf, len(expected))
                assert bytes(buf) == expected
                # the last one closes: its answer whole, then EOF
                w.write(get("/down/z", close=True))
                rest, eof = await read_to_eof(r)
                assert eof and rest == ERR_CLOSE[503]
            finally:
                w.close()
        assert [q.url for q in a.requests] == ["/a1", "/a2", "/a3"]


async def test_pipeline_refused_midway_answers_what_came_before_then_400_then_eof():
    async with ScriptedServer("a") as a, running_lb(lb_config([a.address])) as lb:
        data, eof = await exchange_to_eof(
            lb.address, get("/p1") + get("/p2") + b"GET /p3 HTTP/1.1\r\nHost: t\r\nBad Name: x\r\n\r\n"
            + get("/never"))
        assert eof
        assert data == ok("a", "GET", "/p1") + ok("a", "GET", "/p2") + ERR_CLOSE[400]
        assert [q.url for q in a.requests] == ["/p1", "/p2"]


async def test_pipeline_429_of_ours_between_proxied_ones_keeps_every_byte_in_order():
    async with ScriptedServer("a") as a:
        cfg = lb_config([a.address], frontend={"rate_limit": {"requests": 2, "per": "60s"}})
        async with running_lb(cfg) as lb:
            data, eof = await exchange_to_eof(
                lb.address, get("/r1") + get("/r2") + get("/r3") + get("/r4", close=True))
        assert eof
        got = parse_responses(data)  # (every byte: nothing may trail the last response)
        assert [x.status for x in got] == [200, 200, 429, 429]
        assert [x.body for x in got[:2]] == [b"a GET /r1\n", b"a GET /r2\n"]
        assert data.startswith(ok("a", "GET", "/r1") + ok("a", "GET", "/r2"))
        assert [q.url for q in a.requests] == ["/r1", "/r2"]


async def test_one_read_of_many_requests_mixing_ours_and_proxied_in_one_turn():
    """Pipelined requests that the proxy answers itself (keep-alive 503s from a backend
    without a server) among proxied ones, thirty of them in one read."""
    dead = f"{LOOPBACK}:{free_port()}"
    async with ScriptedServer("a") as a:
        cfg = lb_config({"app": [a.address], "down": [dead]},
                        frontend={"rules": [{"path_prefix": "/down", "backend": "down"}]},
                        backend={"retries": 0})
        async with running_lb(cfg) as lb:
            reqs, expected = [], []
            for i in range(30):
                if i % 3 == 1:
                    reqs.append(get(f"/down/{i}"))
                    expected.append(ERR_KEEP[503])
                else:
                    reqs.append(get(f"/x{i}"))
                    expected.append(ok("a", "GET", f"/x{i}"))
            async with RawClient(*lb.address) as c:
                await c.send(b"".join(reqs))
                want = b"".join(expected)
                buf = bytearray()
                await read_until(c.reader, buf, len(want), timeout=15)
                assert bytes(buf) == want


# ---------------------------------------------------------------------------------------------
# 2. Connection: close: the whole response, then EOF


def _chunked(parts: list[bytes], trailers: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n" + trailers + b"\r\n"


@pytest.mark.parametrize("size", [5, 8192, 8193, 20 * KiB, 100 * KiB])
@pytest.mark.parametrize("server_closes", [False, True])
async def test_connection_close_gets_the_whole_response_before_eof(size, server_closes):
    body = pattern(size, size)
    resp = http_response(200, body, close=server_closes)
    async with ScriptedServer("a", lambda req: resp) as a, \
            running_lb(lb_config([a.address])) as lb:
        for attempt in range(3):  # (again: the response memo may take the later ones)
            data, eof = await exchange_to_eof(lb.address, get(f"/c{attempt}", close=True))
            assert eof, f"no EOF after {len(data)} bytes"
            got = parse_responses(data)
            assert len(got) == 1 and got[0].status == 200
            assert got[0].body == body, (len(got[0].body), size)
            assert data.endswith(b"\r\n\r\n" + body)


@pytest.mark.parametrize("chunk", [100, 8000, 20000])
async def test_connection_close_chunked_with_trailers_whole_before_eof(chunk):
    body = pattern(150 * KiB, chunk)
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)]
    wire = _chunked(parts, b"X-Sum: 1234\r\nX-Other: yes\r\n")
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
    async with ScriptedServer("a", lambda req: head + wire) as a, \
            running_lb(lb_config([a.address])) as lb:
        for attempt in range(2):
            data, eof = await exchange_to_eof(lb.address, get(f"/t{attempt}", close=True))
            assert eof
            got = parse_responses(data)
            assert len(got) == 1 and got[0].body == body
            assert got[0].trailers == [("X-Sum", "1234"), ("X-Other", "yes")]
            # relayed as it came: the chunks and the trailer section, byte for byte, last
            assert data.endswith(b"\r\n\r\n" + wire)


async def test_keep_alive_then_close_pipelined_big_and_small_in_order():
    big = pattern(200 * KiB, 7)

    def handler(req):
        if req.url == "/big":
            return http_response(200, big)
        return http_response(200, req.url.encode())

    async with ScriptedServer("a", handler) as a, running_lb(lb_config([a.address])) as lb:
        data, eof = await exchange_to_eof(
            lb.address, get("/s1") + get("/big") + get("/s2") + get("/big") + get("/s3", close=True))
        assert eof
        got = parse_responses(data)
        assert [x.body for x in got] == [b"/s1", big, b"/s2", big, b"/s3"]


# ---------------------------------------------------------------------------------------------
# 3. Expect: 100-continue


@pytest.mark.parametrize("size", [5, 40 * KiB])
async def test_expect_100_continue_then_the_final_response_exact_bytes(size):
    body = pattern(size, 3)

    def handler(req):
        if req.method == "GET":
            return ok("a", "GET", req.url)
        return http_response(200, b"got %d" % len(req.body) if req.body == body else b"bad body")

    async with ScriptedServer("a", handler) as a, running_lb(lb_config([a.address])) as lb:
        r, w = await asyncio.open_connection(*lb.address)
        try:
            w.write(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n"
                    b"Expect: 100-continue\r\n\r\n" % size)
            buf = bytearray()
            cont = b"HTTP/1.1 100 Continue\r\n\r\n"
            await read_until(r, buf, len(cont), timeout=5)
            assert bytes(buf) == cont  # nothing else before the body is sent
            w.write(body)
            final = http_response(200, b"got %d" % size)
            await read_until(r, buf, len(cont) + len(final), timeout=10)
            # (a second 100 Continue, the server's own, is allowed by HTTP but is not what we see)
            got = complete_responses(bytes(buf))
            assert [x.status for x in got][-1] == 200 and got[-1].body == b"got %d" % size
            assert bytes(buf).startswith(cont) and bytes(buf).endswith(final)
            # the connection still serves, in order
            w.write(get("/after"))
            more = bytearray()
            await read_until(r, more, len(ok("a", "GET", "/after")))
            assert bytes(more) == ok("a", "GET", "/after")
        finally:
            w.close()


# ---------------------------------------------------------------------------------------------
# 4. Upgrade tunnels


class _TunnelConn(asyncio.Protocol):
    def __init__(self, owner: TunnelServer):
        self.owner = owner
        self.buf = bytearray()
        self.upgraded = False
        self.got = bytearray()
        self.eof = False
        self.got_at_eof = -1
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport):
        self.transport = transport
        self.owner.conns.append(self)

    def data_received(self, data):
        if not self.upgraded:
            self.buf += data
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self.upgraded = True
            self.owner.heads.append(bytes(self.buf[:end + 4]))
            rest = bytes(self.buf[end + 4:])
            self.transport.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Connection: Upgrade\r\n\r\n" + self.owner.first)
            if self.owner.close_after_first:
                self.transport.close()
            data = rest
        self.got += data
        if self.owner.echo and data:
            self.transport.write(b"echo:" + data)
        self.owner.changed.set()

    def eof_received(self):
        self.eof = True
        self.got_at_eof = len(self.got)
        self.owner.changed.set()
        return True  # (we may still write)


class TunnelServer:
    """A server that answers any request with a 101 (then `first`), records the tunnel's
    bytes and its EOF, and echoes when told."""

    def __init__(self, first: bytes = b"", echo: bool = False, close_after_first: bool = False):
        self.first = first
        self.echo = echo
        self.close_after_first = close_after_first
        self.conns: list[_TunnelConn] = []
        self.heads: list[bytes] = []
        self.changed = asyncio.Event()
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self):
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _TunnelConn(self), LOOPBACK, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        for c in self.conns:
            if c.transport is not None:
                c.transport.abort()

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"


UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")


async def _upgraded(r: asyncio.StreamReader, w: asyncio.StreamWriter, ts: TunnelServer):
    """Upgrade the client connection (r, w): what followed the 101 and the server's tunnel."""
    w.write(UPGRADE)
    buf = bytearray()
    await _read_101(r, buf)
    await wait_for(lambda: ts.conns and ts.conns[0].upgraded, what="the upgrade")
    return buf, ts.conns[0]


async def _read_101(r: asyncio.StreamReader, buf: bytearray) -> bytes:
    """The 101's head (checked), and what followed it in `buf`."""
    async with asyncio.timeout(5):
        while b"\r\n\r\n" not in buf:
            chunk = await r.read(65536)
            assert chunk, f"EOF before the 101's head: {bytes(buf)!r}"
            buf += chunk
    end = buf.index(b"\r\n\r\n") + 4
    head = bytes(buf[:end])
    assert head.startswith(b"HTTP/1.1 101 "), head
    del buf[:end]
    return head


async def test_upgrade_bytes_both_ways_at_once_after_the_101():
    async with TunnelServer(first=b"hello-from-server", echo=True) as ts, \
            running_lb(lb_config([ts.address])) as lb:
        r, w = await asyncio.open_connection(*lb.address)
        try:
            # the client's first frame goes in the same write as its upgrade request
            w.write(UPGRADE + b"early")
            buf = bytearray()
            await _read_101(r, buf)
            await read_until(r, buf, len(b"hello-from-server" + b"echo:early"), timeout=5)
            assert bytes(buf) == b"hello-from-server" + b"echo:early"
            for i in range(20):  # bounded ping-pong: each answer at once, in order
                msg = b"ping%d" % i
                w.write(msg)
                got = bytearray()
                await read_until(r, got, len(b"echo:" + msg), timeout=5)
                assert bytes(got) == b"echo:" + msg
            assert bytes(ts.conns[0].got) == b"early" + b"".join(b"ping%d" % i for i in range(20))
        finally:
            w.close()


@pytest.mark.parametrize("size", [10, 8192, 100 * KiB])
async def test_upgrade_half_close_passes_eof_after_all_data_both_ways(size):
    async with TunnelServer() as ts, running_lb(lb_config([ts.address])) as lb:
        r, w = await asyncio.open_connection(*lb.address)
        try:
            buf, conn = await _upgraded(r, w, ts)
            data = pattern(size, 11)
            w.write(b"first-")
            w.write(data)
            w.write_eof()  # in the same turn as its last bytes
            await wait_for(lambda: conn.eof, timeout=10, what="the EOF at the server")
            assert conn.got_at_eof == len(conn.got) == len(b"first-") + size
            assert bytes(conn.got) == b"first-" + data
            # the server may still talk; then it closes: all of it before the client's EOF
            back = pattern(size, 12)
            conn.transport.write(back)
            conn.transport.write(b"-last")
            conn.transport.close()
            rest, eof = await read_to_eof(r)
            assert eof
            assert bytes(buf) + rest == back + b"-last"
        finally:
            w.close()


@pytest.mark.parametrize("size", [10, 8193, 300 * KiB])
async def test_upgrade_server_sends_then_closes_client_gets_all_before_eof(size):
    data = pattern(size, 13)
    async with TunnelServer(first=data + b"<end>", close_after_first=True) as ts, \
            running_lb(lb_config([ts.address])) as lb:
        r, w = await asyncio.open_connection(*lb.address)
        try:
            w.write(UPGRADE)
            buf = bytearray()
            await _read_101(r, buf)
            rest, eof = await read_to_eof(r)
            assert eof
            assert bytes(buf) + rest == data + b"<end>"
        finally:
            w.close()


async def test_upgrade_server_half_closes_then_client_still_sends():
    async with TunnelServer() as ts, running_lb(lb_config([ts.address])) as lb:
        r, w = await asyncio.open_connection(*lb.address)
        try:
            buf, conn = await _upgraded(r, w, ts)
            conn.transport.write(b"server-says-bye")
            conn.transport.write_eof()
            rest, eof = await read_to_eof(r)
            assert eof and bytes(buf) + rest == b"server-says-bye"
            # the other way is still open: the client's bytes reach the server, then its EOF
            w.write(b"client-still-here")
            w.write_eof()
            await wait_for(lambda: conn.eof, what="the client's EOF at the server")
            assert bytes(conn.got) == b"client-still-here" and conn.got_at_eof == 17
        finally:
            w.close()


# ---------------------------------------------------------------------------------------------
# 5. a close-delimited body, re-framed as chunked for an HTTP/1.1 client


@pytest.mark.parametrize("size", [1, 100, 8192, 100 * KiB])
async def test_close_delimited_response_reframed_as_chunked_whole_then_last_chunk(size):
    body = pattern(size, 21)

    async def handler(req):
        return b"HTTP/1.1 200 OK\r\nX-Path: " + req.url.encode() + b"\r\nConnection: close\r\n\r\n" + body

    async with ScriptedServer("a", handler) as a, running_lb(lb_config([a.address])) as lb:
        r, w = await asyncio.open_connection(*lb.address)
        try:
            for i in range(3):  # the client connection stays: three in a row
                w.write(get(f"/cd{i}"))
                buf = bytearray()
                async with asyncio.timeout(10):
                    while True:
                        got = complete_responses(bytes(buf))
                        if got:
                            break
                        chunk = await r.read(65536)
                        assert chunk, f"EOF in response {i}: {bytes(buf[-300:])!r}"
                        buf += chunk
                assert len(got) == 1 and got[0].body == body
                assert got[0].header("X-Path") == f"/cd{i}"
                assert got[0].header("Transfer-Encoding") == "chunked"
                assert bytes(buf).endswith(b"\r\n0\r\n\r\n")  # the terminating chunk, last
                # re-framed: the chunk data put together is the body, byte for byte
                head_end = buf.index(b"\r\n\r\n") + 4
                wire, out = bytes(buf[head_end:]), bytearray()
                pos = 0
                for _ in range(10000):
                    eol = wire.index(b"\r\n", pos)
                    n = int(wire[pos:eol], 16)
                    if n == 0:
                        assert wire[eol:] == b"\r\n\r\n"
                        break
                    out += wire[eol + 2:eol + 2 + n]
                    assert wire[eol + 2 + n:eol + 4 + n] == b"\r\n"
                    pos = eol + 4 + n
                assert bytes(out) == body
        finally:
            w.close()


# ---------------------------------------------------------------------------------------------
# 6. many clients at once, each with its own responses in order


async def test_many_concurrent_keep_alive_clients_get_exactly_their_own_responses():
    n_clients, n_reqs = 50, 20

    async with ScriptedServer("a") as a, ScriptedServer("b") as b, \
            running_lb(lb_config([a.address, b.address])) as lb:

        async def client(i: int) -> list[tuple[int, bytes]]:
            r, w = await asyncio.open_connection(*lb.address)
            out = []
            try:
                j = 0
                while j < n_reqs:
                    # one alone, or two pipelined: both kinds of turns
                    batch = [j] if (i + j) % 3 else [j, j + 1][: n_reqs - j]
                    w.write(b"".join(get(f"/c{i}/r{k}") for k in batch))
                    buf = bytearray()
                    while True:
                        got = complete_responses(bytes(buf))
                        if len(got) >= len(batch):
                            break
                        chunk = await r.read(65536)
                        assert chunk, f"client {i}: EOF at request {j}"
                        buf += chunk
                    assert len(got) == len(batch), f"client {i}: extra bytes {bytes(buf)!r}"
                    for k, resp in zip(batch, got, strict=True):
                        out.append((k, resp.body))
                    j += len(batch)
            finally:
                w.close()
            return out

        async with asyncio.timeout(60):
            results = await asyncio.gather(*(client(i) for i in range(n_clients)))
    for i, res in enumerate(results):
        assert [k for k, _ in res] == list(range(n_reqs))
        for k, body in res:
            assert body in (f"a GET /c{i}/r{k}\n".encode(), f"b GET /c{i}/r{k}\n".encode()), \
                (i, k, body)
    assert len(a.requests) + len(b.requests) == n_clients * n_reqs
    assert a.requests and b.requests


# ---------------------------------------------------------------------------------------------
# 7. a client that does not read for a while


@pytest.mark.parametrize("chunked", [False, True])
async def test_slow_reader_gets_one_mib_then_the_next_responses_intact(chunked):
    big = pattern(MiB, 31)

    def handler(req):
        if req.url == "/big":
            if chunked:  # many small chunks: the proxy relays them as they come
                parts = [big[i:i + 1000] for i in range(0, len(big), 1000)]
                return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + _chunked(parts)
            return http_response(200, big)
        return http_response(200, req.url.encode())

    async with ScriptedServer("a", handler) as a, running_lb(lb_config([a.address])) as lb:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * KiB)  # (a small window)
        sock.connect(lb.address)
        r, w = await asyncio.open_connection(sock=sock)
        try:
            w.write(get("/s0") + get("/big") + get("/s1") + get("/big") + get("/s2"))
            await asyncio.sleep(1.0)  # not reading
            assert a.requests, "nothing reached the server"
            buf = bytearray()
            async with asyncio.timeout(20):
                while True:
                    got = complete_responses(bytes(buf))
                    if len(got) >= 5:
                        break
                    chunk = await r.read(256 * KiB)
                    assert chunk, f"EOF after {len(buf)} bytes"
                    buf += chunk
            assert [x.body for x in got] == [b"/s0", big, b"/s1", big, b"/s2"]
            assert len(got) == 5 and len(complete_responses(bytes(buf))) == 5
        finally:
            w.close()


# ---------------------------------------------------------------------------------------------
# 8. clients that go away while their response is pending


def _rst(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_client_reset_while_its_response_is_pending_others_still_served(caplog):
    caplog.set_level(logging.DEBUG)
    release = asyncio.Event()
    big = pattern(512 * KiB, 41)

    async def handler(req):
        if req.url.startswith("/slow"):
            await asyncio.wait_for(release.wait(), 10)
            return http_response(200, b"late " + req.url.encode())
        if req.url.startswith("/big"):
            return http_response(200, big)
        return http_response(200, req.url.encode())

    async with ScriptedServer("a", handler) as a, running_lb(lb_config([a.address])) as lb:
        gone = []
        for i in range(5):  # waiting for a slow answer, then reset
            s = socket.create_connection(lb.address)
            s.sendall(get(f"/slow{i}") + get(f"/after{i}"))
            gone.append(s)
        for i in range(3):  # a big answer the client never reads, then reset
            s = socket.create_connection(lb.address)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * KiB)
            s.sendall(get(f"/big{i}") + get(f"/x{i}"))
            gone.append(s)
        await wait_for(lambda: sum(q.url.startswith(("/slow", "/big")) for q in a.requests) == 8,
                       what="the requests at the server")
        await asyncio.sleep(0.2)
        for s in gone:
            _rst(s)
        await asyncio.sleep(0.05)
        release.set()  # the slow answers come for clients that are gone
        # others are served, byte for byte, meanwhile and after
        async with asyncio.timeout(20):
            for round_ in range(3):
                async with RawClient(*lb.address) as c:
                    await c.send(b"".join(get(f"/ok{round_}-{k}") for k in range(10)))
                    want = b"".join(http_response(200, f"/ok{round_}-{k}".encode())
                                    for k in range(10))
                    buf = bytearray()
                    await read_until(c.reader, buf, len(want))
                    assert bytes(buf) == want
                await asyncio.sleep(0.05)
        # and the server connections the dead clients held are not handed to anyone half-read
        async with RawClient(*lb.address) as c:
            for k in range(10):
                await c.send(get(f"/z{k}"))
                buf = bytearray()
                want = http_response(200, f"/z{k}".encode())
                await read_until(c.reader, buf, len(want))
                assert bytes(buf) == want
    no_internal_errors(caplog)


async def test_client_reset_in_the_same_turn_as_its_response(caplog):
    """The response and the client's RST reach the proxy in one turn of its loop (the loop is
    held while both happen): the write to a gone client is dropped quietly, others unharmed."""
    caplog.set_level(logging.DEBUG)
    async with ScriptedServer("a", lambda req: None) as a, \
            running_lb(lb_config([a.address])) as lb:
        for i in range(5):
            s = socket.create_connection(lb.address)
            s.sendall(get(f"/r{i}"))
            await wait_for(lambda i=i: len(a.requests) == i + 1, what="the request")
            await asyncio.sleep(0.02)
            st = next(t for t in a.transports if not t.is_closing())
            # (the loop is held: both events wait for the proxy's next turn)
            st.write(http_response(200, b"x" * (100 if i % 2 else 20000)))
            _rst(s)
            time.sleep(0.05)
            await asyncio.sleep(0.05)
            for t in list(a.transports):
                t.close()
        a.handler = a._default
        async with RawClient(*lb.address) as c:
            await c.send(get("/fine"))
            buf = bytearray()
            await read_until(c.reader, buf, len(ok("a", "GET", "/fine")))
            assert bytes(buf) == ok("a", "GET", "/fine")
    no_internal_errors(caplog)


# ---------------------------------------------------------------------------------------------
# 9. a client's half-close that reaches the proxy in the same turn as its response


@pytest.mark.parametrize("size", [10, 5000, 20000])
async def test_half_close_in_the_same_turn_as_the_response_still_gets_it(size):
    """A client sends its request, then shuts down its writing side (as `nc -N`, or a client
    that sends its last request and half-closes) at the moment the server's response arrives.
    HTTP says it still gets the response (client.py: "a client may half-close after its
    request and still read the response"). Both events reach the proxy in one turn of its loop
    (the loop is held while they happen, as on a busy proxy).

    Fails since 13b4075: the response waits in the outbox; the same turn's FIN makes
    HttpSession.eof_received return False (no request left in `q`: response_done popped it), so
    the transport closes itself, and Outbox.flush skips a closing transport: the client gets
    EOF and no byte. Responses over 8 KiB go at once and are not lost."""
    body = pattern(size, 51)
    resp = http_response(200, body)
    async with ScriptedServer("a", lambda req: None) as a, \
            running_lb(lb_config([a.address])) as lb:
        loop = asyncio.get_running_loop()
        s = socket.create_connection(lb.address)
        s.setblocking(False)
        try:
            await loop.sock_sendall(s, get("/hc"))
            await wait_for(lambda: len(a.requests) == 1, what="the request at the server")
            await asyncio.sleep(0.05)
            (st,) = [t for t in a.transports]
            # held loop: the response reaches the proxy's server socket, then the client's FIN
            # its client socket; the proxy sees both in its next turn
            st.write(resp)
            s.shutdown(socket.SHUT_WR)
            time.sleep(0.05)
            chunks = []
            async with asyncio.timeout(5):
                while True:
                    chunk = await loop.sock_recv(s, 65536)
                    if not chunk:
                        break
                    chunks.append(chunk)
            data = b"".join(chunks)
            assert data == resp, f"got {len(data)} bytes, want {len(resp)}: {data[:100]!r}"
        finally:
            s.close()


async def test_half_close_after_the_request_gets_the_response_before_eof():
    """The ordinary case (the FIN well before the response): response, then EOF."""
    release = asyncio.Event()

    async def handler(req):
        await asyncio.wait_for(release.wait(), 5)
        return http_response(200, b"late")

    async with ScriptedServer("a", handler) as a, running_lb(lb_config([a.address])) as lb:
        r, w = await asyncio.open_connection(*lb.address)
        try:
            w.write(get("/h1"))
            w.write_eof()
            await wait_for(lambda: len(a.requests) >= 1, what="the request")
            await asyncio.sleep(0.1)
            release.set()
            data, eof = await read_to_eof(r)
        finally:
            w.close()
        assert eof
        got = parse_responses(data)
        assert [(x.status, x.body) for x in got] == [(200, b"late")]
        assert data.endswith(b"\r\n\r\nlate")
