"""HTTP mode, end to end on loopback: raw client bytes in, assertions on what comes out."""

from __future__ import annotations

import asyncio

import pytest

from support import (
    LOOPBACK,
    RawClient,
    Request,
    ScriptedServer,
    http_get,
    http_response,
    lb_config,
    parse_responses,
    raw_exchange,
    running_lb,
)


def get(path: str = "/", host: str = "www.foobar.test", extra: str = "", version: str = "1.1") -> bytes:
    return f"GET {path} HTTP/{version}\r\nHost: {host}\r\n{extra}\r\n".encode()


# -- keep-alive, pipelining, reuse --------------------------------------------------------------


async def test_keep_alive_client_gets_every_request_on_one_connection():
    async with ScriptedServer("a") as a, ScriptedServer("b") as b:
        async with running_lb(lb_config([a.address, b.address])) as lb:
            async with RawClient(*lb.address) as c:
                for i in range(6):
                    await c.send(get(f"/{i}"))
                    (resp,) = await c.read_responses(1)
                    c.buf = b""
                    assert resp.status == 200
                    assert resp.body == f"{'ab'[i % 2]} GET /{i}\n".encode()
                    assert resp.header("connection") is None
            # one connection per server was enough: later requests reused the pooled ones
            assert a.connections <= 2 and b.connections <= 2
            assert len(a.requests) == len(b.requests) == 3


async def test_idempotent_requests_reuse_pooled_connections_and_others_get_fresh_ones():
    async with ScriptedServer("a") as a, running_lb(lb_config([a.address])) as lb:
        for _ in range(3):
            async with RawClient(*lb.address) as c:
                await c.send(get("/1"))
                await c.read_responses(1)
                c.buf = b""
                await c.send(get("/2"))
                await c.read_responses(1)
        # http-reuse safe as HAProxy 2.x: a pooled connection has served a response already, so
        # an idempotent request takes it, a client connection's first request too
        assert [r.conn_id for r in a.requests] == [1, 1, 1, 1, 1, 1]
        assert a.connections == 1
        # a request that is not idempotent always gets a fresh server connection
        async with RawClient(*lb.address) as c:
            await c.send(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
            (resp,) = await c.read_responses(1)
            assert resp.status == 200
        assert (a.requests[-1].method, a.requests[-1].conn_id) == ("POST", 2)
        assert a.connections == 2


async def test_pipelined_requests_are_answered_in_order():
    async def slow_first(req: Request) -> bytes:
        if req.url == "/slow":
            await asyncio.sleep(0.2)
        return http_response(200, f"{req.url}\n".encode())

    async with ScriptedServer("a", slow_first) as a, ScriptedServer("b", slow_first) as b:
        async with running_lb(lb_config([a.address, b.address])) as lb:
            async with RawClient(*lb.address) as c:
                await c.send(get("/slow") + get("/2") + get("/3") + get("/4", extra="Connection: close\r\n"))
                got = await c.read_responses(4)
                assert [r.body for r in got] == [b"/slow\n", b"/2\n", b"/3\n", b"/4\n"]
                assert got[3].header("connection") == "close"
                assert await c.closed()


async def test_http10_client_keep_alive_and_close():
    async with ScriptedServer("a") as a, running_lb(lb_config([a.address])) as lb:
        raw = await raw_exchange(*lb.address, b"GET /x HTTP/1.0\r\n\r\n")
        (resp,) = parse_responses(raw)
        assert resp.status == 200 and resp.body == b"a GET /x\n"
        assert resp.header("connection") == "close"
        # the upstream request is HTTP/1.1 and carries a Host (the server's address)
        assert a.requests[-1].version == "1.1"
        assert a.requests[-1].header("host") == a.address
        async with RawClient(*lb.address) as c:
            await c.send(b"GET /k HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            (resp,) = await c.read_responses(1)
            assert resp.header("connection") == "keep-alive"
            c.buf = b""
            await c.send(b"GET /k2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            (resp,) = await c.read_responses(1)
            assert resp.body == b"a GET /k2\n"


# -- bodies -------------------------------------------------------------------------------------


async def test_chunked_request_and_response_with_trailers():
    async def echo(req: Request) -> bytes:
        trailer = "".join(f"{n}: {v}\r\n" for n, v in req.trailers)
        return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
                b"5\r\nhello\r\n" + b"%x\r\n%s\r\n" % (len(req.body), req.body)
                + b"0\r\nX-Sum: 42\r\n" + trailer.encode() + b"\r\n")

    async with ScriptedServer("a", echo) as a, running_lb(lb_config([a.address])) as lb:
        async with RawClient(*lb.address) as c:
            await c.send(b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\nX-Check: yes\r\n\r\n")
            (resp,) = await c.read_responses(1)
        req = a.requests[0]
        assert req.chunked and req.body == b"abcdefg"
        assert ("X-Check", "yes") in req.trailers
        assert resp.status == 200
        assert resp.header("transfer-encoding") == "chunked"
        assert resp.body == b"helloabcdefg"
        assert ("X-Sum", "42") in resp.trailers
        assert resp.header("trailer") is None  # hop-by-hop per the issue


async def test_chunked_response_is_dechunked_for_http10_clients():
    async def chunky(req: Request) -> bytes:
        return http_response(200, b"0123456789", chunked=True)

    async with ScriptedServer("a", chunky) as a, running_lb(lb_config([a.address])) as lb:
        raw = await raw_exchange(*lb.address, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        assert b"transfer-encoding" not in head.lower()
        assert b"connection: close" in head.lower()
        assert body == b"0123456789"


async def test_close_delimited_response_is_chunked_for_http11_clients():
    async def until_close(req: Request) -> bytes:
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it until the end"

    async with ScriptedServer("a", until_close) as a, running_lb(lb_config([a.address])) as lb:
        async with RawClient(*lb.address) as c:
            await c.send(get("/1"))
            (resp,) = await c.read_responses(1)
            assert resp.body == b"all of it until the end"
            assert resp.header("transfer-encoding") == "chunked"
            c.buf = b""
            await c.send(get("/2"))  # the client connection stayed usable
            (resp,) = await c.read_responses(1)
            assert resp.status == 200


async def test_content_length_body_both_ways():
    async def echo(req: Request) -> bytes:
        return http_response(200, req.body[::-1])

    async with ScriptedServer("a", echo) as a, running_lb(lb_config([a.address])) as lb:
        body = bytes(range(256)) * 1000
        async with RawClient(*lb.address) as c:
            await c.send(b"PUT /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            (resp,) = await c.read_responses(1)
        assert a.requests[0].body == body
        assert resp.body == body[::-1]


async def test_head_204_304_have_no_body_and_keep_the_connection():
    async def handler(req: Request) -> bytes:
        if req.url == "/204":
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        if req.url == "/304":
            return b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n"
        # HEAD: the length of the body a GET would get, no body
        body = b"" if req.method == "HEAD" else b"x" * 1000
        return b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + body

    async with ScriptedServer("a", handler) as a, running_lb(lb_config([a.address])) as lb:
        async with RawClient(*lb.address) as c:
            await c.send(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0.2)
            async with asyncio.timeout(2):
                while b"\r\n\r\n" not in c.buf:
                    c.buf += await c.reader.read(65536)
            head, _, rest = c.buf.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert b"content-length: 1000" in head.lower()
            assert rest == b""
            c.buf = b""
            await c.send(get("/204") + get("/304") + get("/after"))
            got = await c.read_responses(3)
            assert [r.status for r in got] == [204, 304, 200]
            assert got[0].body == b"" and got[1].body == b""
            assert len(got[2].body) == 1000
        # HEAD's connection went back to the pool and was reused
        assert a.connections == 1


async def test_expect_100_continue():
    async with ScriptedServer("a", lambda req: http_response(201, req.body)) as a:
        async with running_lb(lb_config([a.address])) as lb:
            async with RawClient(*lb.address) as c:
                await c.send(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                             b"Expect: 100-continue\r\n\r\n")
                async with asyncio.timeout(3):
                    while b"\r\n\r\n" not in c.buf:
                        c.buf += await c.reader.read(65536)
                assert c.buf.startswith(b"HTTP/1.1 100 Continue\r\n")
                await c.send(b"hello")
                got = await c.read_responses(2)
                assert [r.status for r in got] == [100, 201]
                assert got[1].body == b"hello"
            # the proxy sent the 100 itself, before any server was engaged; the server got the
            # whole request without Expect (the body buffered first, HAProxy's
            # http-buffer-request)
            assert a.requests[0].header("expect") is None
            assert a.requests[0].body == b"hello"


async def test_max_request_body_gives_413():
    async with ScriptedServer("a") as a:
        cfg = lb_config([a.address], frontend={"limits": {"max_request_body": "1k"}})
        async with running_lb(cfg) as lb:
            raw = await raw_exchange(*lb.address,
                                     b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n")
            (resp,) = parse_responses(raw)
            assert resp.status == 413 and resp.header("connection") == "close"
            # a chunked body that grows past the limit
            raw = await raw_exchange(*lb.address, [
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"400\r\n" + b"a" * 1024 + b"\r\n", b"10\r\n" + b"b" * 16 + b"\r\n0\r\n\r\n"])
            assert parse_responses(raw)[0].status == 413
            # within the limit it goes through
            resp = await http_get(*lb.address, "/ok")
            assert resp.status == 200


# -- headers ------------------------------------------------------------------------------------


async def test_hop_by_hop_headers_are_removed_both_ways():
    async def handler(req: Request) -> bytes:
        return http_response(200, b"ok", [("Connection", "X-Secret-Resp"), ("X-Secret-Resp", "1"),
                                          ("Keep-Alive", "timeout=5"), ("Proxy-Authenticate", "Basic"),
                                          ("Upgrade", "h2c"), ("X-End", "kept")])

    async with ScriptedServer("a", handler) as a, running_lb(lb_config([a.address])) as lb:
        async with RawClient(*lb.address) as c:
            await c.send(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Private\r\n"
                         b"X-Private: 1\r\nKeep-Alive: timeout=9\r\nProxy-Authorization: Basic Zm9v\r\n"
                         b"Proxy-Connection: keep-alive\r\nTE: trailers\r\nTrailer: X-T\r\n"
                         b"Upgrade: websocket\r\nX-End: kept\r\n\r\n")
            (resp,) = await c.read_responses(1)
        sent = {n.lower() for n, _ in a.requests[0].headers}
        for gone in ("connection", "x-private", "keep-alive", "proxy-authorization",
                     "proxy-connection", "te", "trailer", "upgrade"):
            assert gone not in sent, gone
        assert a.requests[0].header("x-end") == "kept"
        got = {n.lower() for n, _ in resp.headers}
        for gone in ("x-secret-resp", "keep-alive", "proxy-authenticate", "upgrade"):
            assert gone not in got, gone
        assert resp.header("x-end") == "kept"


async def test_forwarded_headers():
    async with ScriptedServer("a") as a:
        async with running_lb(lb_config([a.address])) as lb:
            await http_get(*lb.address, "/1")
            await http_get(*lb.address, "/2", headers={"X-Forwarded-For": "203.0.113.9",
                                                       "X-Forwarded-Proto": "https"})
        req1, req2 = a.requests
        assert req1.header("x-forwarded-for") == "127.0.0.1"
        assert req1.header("x-forwarded-proto") == "http"
        assert req2.header("x-forwarded-for") == "203.0.113.9, 127.0.0.1"
        assert req2.header("x-forwarded-proto") == "http"  # a client cannot claim https
    async with ScriptedServer("b") as b:
        cfg = lb_config([b.address], frontend={"forwardfor": {"header": "X-Real-Client"},
                                               "forwarded_proto": False})
        async with running_lb(cfg) as lb:
            await http_get(*lb.address)
        assert b.requests[0].header("x-real-client") == "127.0.0.1"
        assert b.requests[0].header("x-forwarded-for") is None
        assert b.requests[0].header("x-forwarded-proto") is None
    async with ScriptedServer("c") as c:
        cfg = lb_config([c.address], frontend={"forwardfor": {"except": ["127.0.0.0/8"]}})
        async with running_lb(cfg) as lb:
            await http_get(*lb.address)
        assert c.requests[0].header("x-forwarded-for") is None


async def test_header_rules_add_set_delete():
    async with ScriptedServer("a", lambda req: http_response(
            200, b"ok", [("Server", "backend/1.0"), ("X-Powered-By", "php"), ("X-Keep", "1")])) as a:
        cfg = lb_config([a.address],
                        frontend={"request_headers": {"set": {"X-Env": "prod"}, "delete": ["Cookie"],
                                                      "add": {"X-Tag": ["one", "two"]}},
                                  "response_headers": {"delete": ["X-Powered-By"],
                                                       "set": {"Server": "foobar"}}},
                        backend={"request_headers": {"add": {"X-Backend": "app"}},
                                 "response_headers": {"add": {"X-Served-Via": "foobar_lb"}}})
        async with running_lb(cfg) as lb:
            resp = await http_get(*lb.address, headers={"Cookie": "a=1", "X-Env": "dev"})
        req = a.requests[0]
        assert req.header("cookie") is None
        assert req.header("x-env") == "prod"
        assert [v for n, v in req.headers if n.lower() == "x-tag"] == ["one", "two"]
        assert req.header("x-backend") == "app"
        assert resp.header("x-powered-by") is None
        assert resp.header("server") == "foobar"
        assert resp.header("x-served-via") == "foobar_lb"
        assert resp.header("x-keep") == "1"


# -- routing ------------------------------------------------------------------------------------


async def test_host_and_path_rules_pick_the_backend():
    async with ScriptedServer("web") as web, ScriptedServer("api") as api, \
            ScriptedServer("static") as static, ScriptedServer("admin") as admin:
        cfg = lb_config(
            {"web": [web.address], "api": [api.address], "static": [static.address],
             "admin": [admin.address]},
            frontend={"rules": [
                {"host": "api.foobar.test", "backend": "api"},
                {"host": "*.cdn.foobar.test", "path_prefix": "/assets", "backend": "static"},
                {"path_prefix": "/admin", "backend": "admin"},
            ]},
        )
        async with running_lb(cfg) as lb:
            async def who(host: str, path: str) -> str:
                return (await http_get(*lb.address, path, headers={"Host": host})).header("x-server")

            assert await who("www.foobar.test", "/") == "web"
            assert await who("API.foobar.test:8080", "/v1") == "api"
            assert await who("eu.cdn.foobar.test", "/assets/x.css") == "static"
            assert await who("eu.cdn.foobar.test", "/other") == "web"
            assert await who("cdn.foobar.test", "/assets/x.css") == "web"
            assert await who("www.foobar.test", "/admin/users") == "admin"
            assert await who("api.foobar.test", "/admin") == "api"  # first matching rule wins
            # absolute-form request target: its authority is the host (RFC 9112 3.2.2), and a
            # Host field that says otherwise is refused
            raw = await raw_exchange(*lb.address, b"GET http://api.foobar.test/v2 HTTP/1.1\r\n"
                                                  b"Host: api.foobar.test\r\nConnection: close\r\n\r\n")
            assert parse_responses(raw)[0].header("x-server") == "api"
            raw = await raw_exchange(*lb.address, b"GET http://api.foobar.test/v2 HTTP/1.1\r\n"
                                                  b"Host: www.foobar.test\r\nConnection: close\r\n\r\n")
            assert raw.startswith(b"HTTP/1.1 400 Bad Request\r\n")


async def test_no_matching_rule_and_no_default_backend_is_503():
    async with ScriptedServer("api") as api:
        cfg = lb_config({"api": [api.address]},
                        frontend={"rules": [{"host": "api.foobar.test", "backend": "api"}]})
        del cfg["frontends"]["www"]["default_backend"]
        async with running_lb(cfg) as lb:
            assert (await http_get(*lb.address, headers={"Host": "nope.test"})).status == 503
            assert (await http_get(*lb.address, headers={"Host": "api.foobar.test"})).status == 200


# -- the proxy's own answers ----------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "status"), [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc", 400),
    (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 17000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(120)) + b"\r\n", 431),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
    (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 501),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
])
async def test_bad_requests_get_the_right_status_and_close(raw, status):
    async with ScriptedServer("a") as a, running_lb(lb_config([a.address])) as lb:
        out = await raw_exchange(*lb.address, raw)
        (resp,) = parse_responses(out)
        assert resp.status == status
        assert resp.header("connection") == "close"
        assert resp.body  # a short explanation
        assert a.requests == []  # nothing reached the server


async def test_408_when_the_head_does_not_complete_in_time():
    async with ScriptedServer("a") as a:
        cfg = lb_config([a.address], frontend={"timeout": {"http_request": "300ms"}})
        async with running_lb(cfg) as lb:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            out = await raw_exchange(*lb.address, b"GET / HTTP/1.1\r\nHost: a\r\n", timeout=3)
            took = loop.time() - t0
            assert parse_responses(out)[0].status == 408
            assert 0.25 < took < 2.5
            # a connection that never sends a byte is closed without a 408
            out = await raw_exchange(*lb.address, b"", timeout=3)
            assert out == b""


async def test_408_when_the_client_stalls_in_its_body_for_timeout_client():
    async with ScriptedServer("a") as a:
        cfg = lb_config([a.address], frontend={"timeout": {"client": "300ms"}})  # http_request 10s
        async with running_lb(cfg) as lb:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            out = await raw_exchange(*lb.address, b"POST /stall HTTP/1.1\r\nHost: a\r\n"
                                                  b"Content-Length: 1000\r\n\r\n" + b"x" * 100,
                                     timeout=5)
            assert parse_responses(out)[0].status == 408
            assert 0.25 < loop.time() - t0 < 2.5  # timeout client, not http_request


async def test_502_on_an_invalid_response_and_503_when_no_server_answers():
    async def garbage(req: Request) -> bytes:
        return b"NOT HTTP AT ALL\r\n\r\n"

    async with ScriptedServer("a", garbage) as a, running_lb(lb_config([a.address])) as lb:
        resp = await http_get(*lb.address)
        assert resp.status == 502
    from support import free_port
    dead = f"{LOOPBACK}:{free_port()}"
    async with running_lb(lb_config([dead])) as lb:
        resp = await http_get(*lb.address)
        assert resp.status == 503


async def test_504_when_the_server_does_not_answer_in_time():
    async def silent(req: Request) -> None:
        return None

    async with ScriptedServer("a", silent) as a:
        cfg = lb_config([a.address], backend={"timeout": {"server": "300ms"}})
        async with running_lb(cfg) as lb:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            resp = await http_get(*lb.address)
            assert resp.status == 504
            assert 0.25 < loop.time() - t0 < 2.5


# -- upgrades -----------------------------------------------------------------------------------


async def test_websocket_echo_through_upgrade():
    pytest.importorskip("websockets")
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve

    seen: list[tuple[str, str | None, int | None]] = []  # (path, Upgrade, close code) per session

    async def echo(ws):
        async for msg in ws:
            await ws.send(msg)
        seen.append((ws.request.path, ws.request.headers.get("Upgrade"), ws.close_code))

    async with serve(echo, LOOPBACK, 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with running_lb(lb_config([f"{LOOPBACK}:{port}"])) as lb:
            host, lport = lb.address
            async with connect(f"ws://{host}:{lport}/chat") as ws:
                for msg in ["hello", "x" * 100_000, b"\x00\x01binary"]:
                    await ws.send(msg)
                    assert await ws.recv() == msg
            # the closing handshake went through the tunnel both ways
            assert ws.close_code == 1000
            async with asyncio.timeout(5):
                while not seen:
                    await asyncio.sleep(0.01)
    # one session, on the path asked, upgraded through the proxy and closed normally at the server
    assert seen == [("/chat", "websocket", 1000)]


async def test_client_half_close_after_its_request_still_gets_the_response():
    async with ScriptedServer("a") as a:
        async with running_lb(lb_config([a.address])) as lb:
            raw = await raw_exchange(*lb.address, get("/half"), half_close=True, timeout=3)
            (resp,) = parse_responses(raw)
            assert resp.status == 200 and resp.body == b"a GET /half\n"


async def test_request_body_sent_before_the_server_connection_is_up_is_not_lost():
    async def echo(req: Request) -> bytes:
        return http_response(200, b"%d" % len(req.body))

    async with ScriptedServer("a", echo) as a:
        async with running_lb(lb_config([a.address])) as lb:
            body = b"y" * 300_000  # more than the proxy holds before pausing the client
            raw = await raw_exchange(*lb.address, b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert parse_responses(raw)[0].body == b"300000"


async def test_responses_split_across_reads_are_relayed_exactly():
    """Heads and chunked bodies cut at awkward places, on a reused server connection."""
    pieces = [
        [b"HTTP/1.1 200 OK\r\nTransfer-Enc", b"oding: chunked\r\nX-A: 1\r\n", b"\r\n5\r\nhel",
         b"lo\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"],
        [b"HTTP/1.1 200 OK\r\nContent-Le", b"ngth: 4\r\nConnection: keep-alive\r\n\r", b"\nab",
         b"cd"],
        [b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 20", b"1 Created\r\nContent-Length: 2\r\n\r\nok"],
    ]
    srv = ScriptedServer("split")

    async def handler(req: Request) -> None:
        (t,) = list(srv.transports)
        for piece in pieces[int(req.url[1:])]:
            t.write(piece)
            await asyncio.sleep(0.02)

    srv.handler = handler
    async with srv:
        async with running_lb(lb_config([srv.address])) as lb:
            async with RawClient(*lb.address) as c:
                got = []
                for i in range(3):
                    await c.send(get(f"/{i}"))
                    got += await c.read_responses(2 if i == 2 else 1)
                    c.buf = b""
            assert got[0].body == b"hello world" and ("X-Trailer", "t") in got[0].trailers
            assert got[0].header("x-a") == "1" and got[0].header("transfer-encoding") == "chunked"
            assert got[1].body == b"abcd" and got[1].header("connection") is None
            assert [got[2].status, got[3].status, got[3].body] == [100, 201, b"ok"]
        assert srv.connections == 1  # one server connection, reused for every request
