"""Faulty servers: each failure has one outcome the client can see, and the server connection
it happened on is never used again.

Every test runs `python -m foobar_lb serve` as a real process (one worker, so round robin's
order is the test's), with real scripted servers (tests/support.py) behind the fault proxy
(tests/faultproxy.py); what the client gets is read by h11 (support.py's parse helpers), not
by the proxy's own parser. Outcomes:
- reset before any response byte: an idempotent request goes to another server (200), a POST
  is answered 502 and delivered once;
- reset in the middle of a response: the client gets the response cut short with its framing
  left incomplete (Content-Length short, or chunked without its last chunk), and its connection
  is closed;
- accepted and never answered: 504 at `timeout.server`, counted as the server's failure
  (`observe = "layer7"`);
- slower than the client's patience: when the client leaves, the server connection is closed
  and its slot given back (a maxconn=1 server serves the next request at once).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from faultproxy import FaultProxy, rst_close
from procs import LbProcess

from support import (
    LOOPBACK,
    RawClient,
    Request,
    ScriptedServer,
    free_port,
    http_response,
    parse_cut_responses,
    parse_responses,
    raw_exchange,
)

pytestmark = pytest.mark.slow


def config(port: int, servers: list[dict], **backend) -> dict:
    return {
        "global": {"workers": 1},
        "frontends": {"www": {"bind": [f"{LOOPBACK}:{port}"], "default_backend": "app"}},
        "backends": {"app": {"servers": servers, **backend}},
    }


async def until(pred, timeout: float = 5.0, what: str = "") -> None:
    """Wait for `pred()` (polled: it reads another process's or the kernel's state)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.02)


def get(path: str = "/", close: bool = False) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n%s\r\n" % (
        path.encode(), b"Connection: close\r\n" if close else b"")


def no_traceback(lb: LbProcess) -> None:
    assert not [ln for ln in lb.out + lb.err if "Traceback" in ln]


# -- reset before any response byte ---------------------------------------------------------------


async def test_reset_before_any_response_byte_get_retried_post_502(tmp_path):
    async with ScriptedServer("a") as a, ScriptedServer("b") as b, \
            FaultProxy(a.address) as pa, FaultProxy(b.address) as pb:
        port = free_port()
        cfg = config(port, [{"name": "a", "address": pa.address},
                            {"name": "b", "address": pb.address}])
        async with LbProcess(tmp_path, cfg) as lb:
            pa.set(reset_after=0)  # a reads the request, its connection is reset as it answers
            for i in range(4):
                async with RawClient(LOOPBACK, port) as c:
                    await c.send(get(f"/get{i}"))
                    (resp,) = await c.read_responses(1)
                    assert resp.status == 200 and resp.header("x-server") == "b"
                    await c.send(get(f"/again{i}", close=True))  # the client connection stays
                    (_, resp) = await c.read_responses(2)
                    assert resp.status == 200 and resp.header("x-server") == "b"
                    assert await c.closed()
            # round robin offered a some of them: each reached it once and went again to b
            hit_a = [r.url for r in a.requests]
            assert hit_a and len(set(hit_a)) == len(hit_a) == pa.resets
            assert sorted(r.url for r in b.requests) == sorted(
                [f"/get{i}" for i in range(4)] + [f"/again{i}" for i in range(4)])
            # a POST: delivered once, never replayed; its client gets 502
            pb.set(reset_after=0)
            raw = await raw_exchange(LOOPBACK, port, b"POST /pay HTTP/1.1\r\nHost: x\r\n"
                                                     b"Content-Length: 5\r\n\r\nhello")
            (resp,) = parse_responses(raw)
            assert resp.status == 502
            posts = [r for s in (a, b) for r in s.requests if r.method == "POST"]
            assert [(r.url, r.body) for r in posts] == [("/pay", b"hello")]
            # healed, both serve again on fresh connections (a reset one is gone for good)
            pa.heal()
            pb.heal()
            seen = set()
            for _ in range(4):
                raw = await raw_exchange(LOOPBACK, port, get(close=True))
                (resp,) = parse_responses(raw)
                assert resp.status == 200
                seen.add(resp.header("x-server"))
            assert seen == {"a", "b"}
            no_traceback(lb)


# -- reset in the middle of a response ---------------------------------------------------------


BODY = bytes(range(256)) * 64  # 16 KiB


async def answer_cl(req: Request) -> bytes:
    return http_response(200, BODY, [("X-Server", "a")])


async def answer_chunked(req: Request) -> bytes:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Server: a\r\n\r\n"
    return head + b"".join(b"%x\r\n%s\r\n" % (1024, BODY[i:i + 1024])
                           for i in range(0, len(BODY), 1024)) + b"0\r\n\r\n"


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_reset_mid_response_is_a_visibly_truncated_response_and_a_closed_client(
        tmp_path, framing):
    handler = answer_cl if framing == "content-length" else answer_chunked
    async with ScriptedServer("a", handler) as a, ScriptedServer("b") as b, \
            FaultProxy(a.address, reset_after=5000) as pa:
        port = free_port()
        # b is a backup: every request goes to a first, and is never replayed on b
        cfg = config(port, [{"name": "a", "address": pa.address},
                            {"name": "b", "address": b.address, "backup": True}])
        async with LbProcess(tmp_path, cfg) as lb:
            async with RawClient(LOOPBACK, port) as c:
                await c.send(get("/big"))
                assert await c.closed(timeout=5)  # the client connection is closed
                done, cut = parse_cut_responses(c.buf)
            assert done == [] and cut is not None
            assert cut.status == 200 and cut.header("x-server") == "a"
            if framing == "content-length":
                assert cut.header("content-length") == str(len(BODY))
            else:
                assert cut.header("transfer-encoding") == "chunked"
                assert not c.buf.endswith(b"0\r\n\r\n")
            assert 0 < len(cut.body) < len(BODY)
            assert BODY.startswith(cut.body)  # what came is right, only the end is missing
            assert b.requests == []  # a response begun is never replayed
            await until(lambda: pa.open == 0, what="the server connection closed")
            # healed: a new connection serves it whole (the broken one was not pooled)
            pa.heal()
            raw = await raw_exchange(LOOPBACK, port, get(close=True))
            (resp,) = parse_responses(raw)
            assert resp.status == 200 and resp.body == BODY
            assert [r.conn_id for r in a.requests] == [1, 2]
            no_traceback(lb)


async def test_a_stall_mid_body_is_cut_at_timeout_server_and_the_connection_dropped(tmp_path):
    async with ScriptedServer("a", answer_cl) as a, FaultProxy(a.address, stall_after=3000) as pa:
        port = free_port()
        cfg = config(port, [{"name": "a", "address": pa.address}], timeout={"server": "1s"})
        async with LbProcess(tmp_path, cfg) as lb:
            t0 = time.monotonic()
            async with RawClient(LOOPBACK, port) as c:
                await c.send(get("/big"))
                assert await c.closed(timeout=5)
                took = time.monotonic() - t0
                done, cut = parse_cut_responses(c.buf)
            assert done == [] and cut is not None and cut.status == 200
            assert 0 < len(cut.body) < len(BODY)
            assert 0.9 <= took < 3.0
            await until(lambda: pa.open == 0 and a.open_connections == 0,
                        what="the stalled server connection closed")
            pa.heal()
            raw = await raw_exchange(LOOPBACK, port, get(close=True))
            assert parse_responses(raw)[0].body == BODY
            assert [r.conn_id for r in a.requests] == [1, 2]  # never reused
            no_traceback(lb)


# -- accepted and never answered -----------------------------------------------------------------


async def test_never_answered_is_504_at_timeout_server_and_counted_as_the_servers_failure(
        tmp_path):
    async with ScriptedServer("a") as a, FaultProxy(a.address) as pa:
        port = free_port()
        cfg = config(port, [{"name": "a", "address": pa.address}],
                     timeout={"server": "1s"}, observe="layer7", error_limit=1,
                     check={"inter": "30s"})  # a tcp check: connects (passes), sends nothing
        async with LbProcess(tmp_path, cfg) as lb:
            raw = await raw_exchange(LOOPBACK, port, get(close=True))
            assert parse_responses(raw)[0].status == 200
            raw = await raw_exchange(LOOPBACK, port, get())  # its server connection is pooled
            assert parse_responses(raw)[0].status == 200
            pa.set(never_answer=True)  # from now on a hears nothing, says nothing
            t0 = time.monotonic()
            async with RawClient(LOOPBACK, port) as c:
                await c.send(get("/slow"))
                (resp,) = await c.read_responses(1, timeout=5)
                took = time.monotonic() - t0
                assert resp.status == 504
                assert 0.9 <= took < 2.5
                # the client connection goes on; a is down (layer7, error_limit 1): 503 at once
                await c.send(get("/after"))
                (_, resp) = await c.read_responses(2)
                assert resp.status == 503
            stats = await lb.stats()
            srv = stats["backends"]["app"]["servers"]["a"]
            assert (srv["requests"], srv["failures"]) == (3, 1)
            assert srv["state"] == "down"  # layer7 observation: one late answer, error_limit 1
            await until(lambda: pa.open == 0, what="the silent server connection closed")
            assert "/slow" not in [r.url for r in a.requests]  # it never reached a
            no_traceback(lb)


# -- slower than the client's patience ------------------------------------------------------------


async def slow_server(release: asyncio.Event) -> ScriptedServer:
    async def slow(req: Request) -> bytes:
        if req.url == "/slow":
            await release.wait()
        return http_response(200, f"a {req.url}".encode(), [("X-Server", "a")])

    return ScriptedServer("a", slow)


async def test_a_client_that_resets_frees_the_server_connection_and_its_slot_at_once(tmp_path):
    release = asyncio.Event()
    async with await slow_server(release) as a, FaultProxy(a.address) as pa:
        port = free_port()
        cfg = config(port, [{"name": "a", "address": pa.address, "maxconn": 1}],
                     timeout={"server": "20s", "queue": "10s"})
        try:
            async with LbProcess(tmp_path, cfg) as lb:
                _, w = await asyncio.open_connection(LOOPBACK, port)
                w.write(get("/slow"))
                await until(lambda: len(a.requests) == 1, what="the slow request at a")
                rst_close(w)  # the client gives up: an RST
                await until(lambda: a.open_connections == 0 and pa.open == 0, timeout=3,
                            what="the server connection closed after the client left")
                # the slot is free: the maxconn=1 server serves the next request now
                t0 = time.monotonic()
                raw = await raw_exchange(LOOPBACK, port, get("/next", close=True))
                (resp,) = parse_responses(raw)
                assert resp.status == 200 and resp.body == b"a /next"
                assert time.monotonic() - t0 < 1.0
                assert [r.conn_id for r in a.requests] == [1, 2]  # a new server connection
                no_traceback(lb)
        finally:
            release.set()


async def test_a_client_that_closes_is_taken_for_a_half_close_bounded_by_timeout_server(
        tmp_path):
    """A FIN after the request may be a half-close (the client still reads: see test_http's
    half-close test), so the request stands; the server connection and its slot are held until
    the server answers or `timeout.server`, never longer."""
    release = asyncio.Event()
    async with await slow_server(release) as a, FaultProxy(a.address) as pa:
        port = free_port()
        cfg = config(port, [{"name": "a", "address": pa.address, "maxconn": 1}],
                     timeout={"server": "1s", "queue": "10s"})
        try:
            async with LbProcess(tmp_path, cfg) as lb:
                _, w = await asyncio.open_connection(LOOPBACK, port)
                w.write(get("/slow"))
                await until(lambda: len(a.requests) == 1, what="the slow request at a")
                t0 = time.monotonic()
                w.close()  # a FIN
                await until(lambda: a.open_connections == 0 and pa.open == 0, timeout=3,
                            what="the server connection closed at timeout.server")
                assert time.monotonic() - t0 >= 0.8
                raw = await raw_exchange(LOOPBACK, port, get("/next", close=True))
                (resp,) = parse_responses(raw)
                assert resp.status == 200 and resp.body == b"a /next"
                assert [r.conn_id for r in a.requests] == [1, 2]
                no_traceback(lb)
        finally:
            release.set()
