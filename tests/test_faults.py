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
- slower than the client's patience: when the client leaves (a reset), the server connection is
  closed and its slot given back at once (a maxconn=1 server serves the next request); a FIN is
  taken for a half-close, so the request stands until the server answers or `timeout.server`;
- a server silent in the middle of its head: 504 at `timeout.server`; in the middle of a body:
  the response cut short; slow but steady: never cut; slow to send its FIN: delays nobody;
- one of two server processes SIGKILLed under a bounded wrk load: no socket error, no non-2xx
  (HAProxy 2.6's figure printed beside ours).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from faultproxy import FaultProxy, rst_close
from procs import LbProcess, load

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


def descriptors(lb: LbProcess) -> int:
    """Open descriptors of the proxy's master and every worker (not this test process's)."""
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in [lb.pid, *lb.workers()])


def no_traceback(lb: LbProcess) -> None:
    assert not [ln for ln in lb.out + lb.err if "Traceback" in ln]


# -- reset before any response byte ---------------------------------------------------------------


@pytest.mark.parametrize("toxic", [{"reset_after": 0}, {"close_now": True}])
async def test_reset_before_any_response_byte_get_retried_post_502(tmp_path, toxic):
    """reset_after=0: the server reads the request, its connection is reset as it answers;
    close_now: the server's connection closes (FIN) before it reads anything."""
    async with ScriptedServer("a") as a, ScriptedServer("b") as b, \
            FaultProxy(a.address) as pa, FaultProxy(b.address) as pb:
        port = free_port()
        cfg = config(port, [{"name": "a", "address": pa.address},
                            {"name": "b", "address": pb.address}])
        async with LbProcess(tmp_path, cfg) as lb:
            pa.set(**toxic)
            for i in range(4):
                async with RawClient(LOOPBACK, port) as c:
                    await c.send(get(f"/get{i}"))
                    (resp,) = await c.read_responses(1)
                    assert resp.status == 200 and resp.header("x-server") == "b"
                    await c.send(get(f"/again{i}", close=True))  # the client connection stays
                    (_, resp) = await c.read_responses(2)
                    assert resp.status == 200 and resp.header("x-server") == "b"
                    assert await c.closed()
            # round robin offered a some of them: each reached it once at most, and went
            # again to b
            hit_a = [r.url for r in a.requests]
            if "reset_after" in toxic:
                assert hit_a and len(set(hit_a)) == len(hit_a) == pa.resets
            else:
                assert hit_a == [] and pa.accepted > 0
            assert sorted(r.url for r in b.requests) == sorted(
                [f"/get{i}" for i in range(4)] + [f"/again{i}" for i in range(4)])
            # a POST: delivered once, never replayed; its client gets 502
            pb.set(**toxic)
            raw = await raw_exchange(LOOPBACK, port, b"POST /pay HTTP/1.1\r\nHost: x\r\n"
                                                     b"Content-Length: 5\r\n\r\nhello")
            (resp,) = parse_responses(raw)
            assert resp.status == 502
            posts = [r for s in (a, b) for r in s.requests if r.method == "POST"]
            if "reset_after" in toxic:  # delivered once, its answer lost
                assert [(r.url, r.body) for r in posts] == [("/pay", b"hello")]
            else:  # never delivered (we cannot know that: 502 all the same)
                assert posts == []
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


async def test_a_server_broken_and_healed_under_load_fails_no_get(tmp_path):
    """The fault switched at run time in the middle of a bounded load: while a resets every
    answer, its GETs go again to b; healed, a serves again. No descriptor is left behind."""
    async with ScriptedServer("a") as a, ScriptedServer("b") as b, \
            FaultProxy(a.address) as pa:
        port = free_port()
        cfg = config(port, [{"name": "a", "address": pa.address},
                            {"name": "b", "address": b.address}], pool_idle_timeout="300ms")
        async with LbProcess(tmp_path, cfg) as lb:
            await until(lambda: len(lb.workers()) == 1, what="the worker")
            baseline = descriptors(lb)
            running = asyncio.ensure_future(load(port, connections=10, requests=3000,
                                                 seconds=60))
            await until(lambda: len(a.requests) > 300, timeout=30, what="a serving")
            pa.set(reset_after=0)
            await until(lambda: pa.resets >= 100, timeout=30, what="a breaking")
            broken_at = len(a.requests)
            pa.heal()
            res = await running
            assert (res.ok, res.errors) == (3000, 0), dict(res.failed)
            assert len(a.requests) > broken_at  # a serves again once healed
            # every client and server connection closed (idle pooled ones after 300 ms)
            await until(lambda: descriptors(lb) == baseline and pa.open == 0
                        and a.open_connections == b.open_connections == 0, timeout=5,
                        what=f"descriptors back to {baseline}, server connections closed")
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
                # counted as a's failure: layer7 observation, error_limit 1, so a is down (the
                # master decides: awaited there, then its workers know)
                srv = {}
                deadline = time.monotonic() + 5
                while srv.get("state") != "down" and time.monotonic() < deadline:
                    srv = (await lb.stats())["backends"]["app"]["servers"]["a"]
                assert (srv["state"], srv["requests"], srv["failures"]) == ("down", 3, 1)
                # the client connection goes on: with nothing up, 503 at once
                await c.send(get("/after"))
                (_, resp) = await c.read_responses(2)
                assert resp.status == 503
            await until(lambda: pa.open == 0, what="the silent server connection closed")
            assert "/slow" not in [r.url for r in a.requests]  # it never reached a
            no_traceback(lb)


async def test_a_post_whose_answer_is_lost_is_504_and_delivered_once(tmp_path):
    """half-open: the server gets the POST and answers, the answer never comes back; the POST
    is not sent again (to it or to another server)."""
    async with ScriptedServer("a") as a, ScriptedServer("b") as b, \
            FaultProxy(a.address, half_open=True) as pa:
        port = free_port()
        cfg = config(port, [{"name": "a", "address": pa.address},
                            {"name": "b", "address": b.address, "backup": True}],
                     timeout={"server": "1s"})
        async with LbProcess(tmp_path, cfg) as lb:
            raw = await raw_exchange(LOOPBACK, port, b"POST /pay HTTP/1.1\r\nHost: x\r\n"
                                                     b"Content-Length: 5\r\n\r\nhello")
            (resp,) = parse_responses(raw)
            assert resp.status == 504
            assert [(r.url, r.body) for r in a.requests] == [("/pay", b"hello")]
            assert b.requests == []
            await until(lambda: pa.open == 0, what="the server connection closed")
            no_traceback(lb)


async def test_retry_on_timeout_sends_an_unanswered_get_to_another_server_never_a_post(tmp_path):
    """`retry_on_timeout = true` (HAProxy's `retry-on response-timeout`): a GET whose server
    says nothing for timeout.server goes to the other server (200 from b, after about 1 s); a
    POST is still 504 and delivered once (it may have run); without the key a GET is 504 (the
    test above). `first` sends every new request to a first."""
    async with ScriptedServer("a") as a, ScriptedServer("b") as b, \
            FaultProxy(a.address, half_open=True) as pa:
        port = free_port()
        cfg = config(port, [{"name": "a", "address": pa.address},
                            {"name": "b", "address": b.address}],
                     balance="first", timeout={"server": "1s"}, retry_on_timeout=True)
        async with LbProcess(tmp_path, cfg) as lb:
            t0 = time.monotonic()
            raw = await raw_exchange(LOOPBACK, port, get("/page", close=True))
            took = time.monotonic() - t0
            (resp,) = parse_responses(raw)
            assert resp.status == 200 and resp.header("x-server") == "b"
            assert 0.9 <= took < 3.0
            assert [r.url for r in a.requests] == ["/page"]  # it reached a, which never answered
            assert [r.url for r in b.requests] == ["/page"]
            raw = await raw_exchange(LOOPBACK, port, b"POST /pay HTTP/1.1\r\nHost: x\r\n"
                                                     b"Content-Length: 5\r\n\r\nhello")
            (resp,) = parse_responses(raw)
            assert resp.status == 504
            assert [(r.url, r.body) for r in a.requests] == [("/page", b""), ("/pay", b"hello")]
            assert [r.url for r in b.requests] == ["/page"]
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


# -- one of two servers killed under load (the numbered test) ----------------------------

SERVER_SCRIPT = str(Path(__file__).with_name("support.py"))  # the default answer, one write


async def server_process(name: str) -> tuple[asyncio.subprocess.Process, int]:
    """A scripted server as its own process (its answers are under 100 bytes, one write)."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(sys.executable, SERVER_SCRIPT, name, str(port),
                                                stdout=asyncio.subprocess.PIPE)
    line = await asyncio.wait_for(proc.stdout.readline(), 20)
    assert line.startswith(b"listening"), line
    return proc, port


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    await proc.wait()


@dataclass
class Figure:
    requests: int = 0
    socket_errors: int = 0
    non_2xx: int = 0
    p99: str = ""
    detail: str = ""

    def __str__(self) -> str:
        return (f"{self.requests} requests, {self.socket_errors} socket errors, "
                f"{self.non_2xx} non-2xx, p99 {self.p99 or '?'} ({self.detail})")


async def bounded_load(port: int, seconds: float = 8.0, conns: int = 20) -> Figure:
    """wrk (keep-alive, `--latency`) when installed, else procs.load: the exact counts of
    socket errors and non-2xx responses."""
    if shutil.which("wrk"):
        p = await asyncio.create_subprocess_exec(
            "wrk", "-t2", f"-c{conns}", f"-d{round(seconds)}s", "--latency", "--timeout", "5s",
            f"http://{LOOPBACK}:{port}/", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(p.communicate(), seconds + 30)
        text = out.decode()
        fig = Figure(detail="wrk")
        m = re.search(r"(\d+) requests in", text)
        assert m is not None, f"wrk said: {text} {err.decode()}"
        fig.requests = int(m.group(1))
        m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
        fig.socket_errors = sum(map(int, m.groups())) if m else 0
        if m:
            fig.detail += ": " + m.group(0)
        m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        fig.non_2xx = int(m.group(1)) if m else 0  # (the servers answer nothing but 200)
        m = re.search(r"^\s*99%\s+(\S+)", text, re.M)
        fig.p99 = m.group(1) if m else ""
        return fig
    res = await load(port, connections=conns, requests=10**9, seconds=seconds,
                     fresh_every=10**9)  # every connection but the first kept alive
    non_2xx = sum(n for s, n in res.statuses.items() if not 200 <= s < 300)
    return Figure(res.ok + res.errors, res.errors - non_2xx, non_2xx, "",
                  f"procs.load: {dict(res.failed)}")


async def kill_one_under_load(port: int, victim: asyncio.subprocess.Process) -> Figure:
    running = asyncio.ensure_future(bounded_load(port))
    await asyncio.sleep(3.0)  # (into the load: this times the fault, it orders no event)
    victim.send_signal(signal.SIGKILL)
    return await running


async def test_sigkill_of_one_of_two_servers_under_load_loses_no_request(tmp_path):
    procs = [await server_process("p0"), await server_process("p1")]
    check = {"inter": "200ms", "fall": 2, "rise": 2}
    try:
        port = free_port()
        cfg = config(port, [{"name": f"s{i}", "address": f"{LOOPBACK}:{p}"}
                            for i, (_, p) in enumerate(procs)], check=check)
        cfg["global"]["workers"] = 2
        async with LbProcess(tmp_path, cfg) as lb:
            ours = await kill_one_under_load(port, procs[0][0])
            stats = await lb.stats()
            s0 = stats["backends"]["app"]["servers"]["s0"]
            no_traceback(lb)
        print(f"\nSIGKILL of one of two servers, c=20 8s keep-alive: foobar_lb {ours}; "
              f"s0 {s0['failures']} failed attempts")
        assert ours.requests > 1000
        assert (ours.socket_errors, ours.non_2xx) == (0, 0), str(ours)
        # the kill hit traffic: attempts on s0 failed (and went again to s1)
        assert s0["state"] == "down" and s0["requests"] > 0 and s0["failures"] > 0, s0
    finally:
        for proc, _ in procs:
            await stop_process(proc)
    if shutil.which("haproxy"):
        print(f"SIGKILL of one of two servers, c=20 8s keep-alive: HAProxy "
              f"{await haproxy_kill_figure(tmp_path)}")


async def haproxy_kill_figure(tmp_path: Path) -> Figure:
    """The same scenario against HAProxy (retries 3, option redispatch, retry-on
    all-retryable-errors, the same checks); its figure is printed, not asserted."""
    procs = [await server_process("p0"), await server_process("p1")]
    port = free_port()
    conf = tmp_path / "haproxy-kill.cfg"
    conf.write_text(f"""
global
    nbthread 2
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 10s
    retries 3
    option redispatch
    retry-on all-retryable-errors
frontend www
    bind {LOOPBACK}:{port}
    default_backend app
backend app
    balance roundrobin
    server s0 {LOOPBACK}:{procs[0][1]} check inter 200ms fall 2 rise 2
    server s1 {LOOPBACK}:{procs[1][1]} check inter 200ms fall 2 rise 2
""")
    proc = await asyncio.create_subprocess_exec(
        "haproxy", "-db", "-f", str(conf), stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                await raw_exchange(LOOPBACK, port, get(close=True), timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline, "haproxy did not start"
                await asyncio.sleep(0.05)
        return await kill_one_under_load(port, procs[0][0])
    finally:
        await stop_process(proc)
        for p, _ in procs:
            await stop_process(p)


# -- slow but alive, and silent in the middle of a head -------------------------------------------


async def test_a_slow_but_steady_server_is_not_cut_by_timeout_server(tmp_path):
    """`timeout.server` is for silence: a response trickling at 4 KiB a second for 4 s (and
    100 ms of latency each way) arrives whole with a 1 s timeout."""
    async with ScriptedServer("a", answer_cl) as a, \
            FaultProxy(a.address, bandwidth=4096, latency=0.1) as pa:
        port = free_port()
        cfg = config(port, [{"name": "a", "address": pa.address}], timeout={"server": "1s"})
        async with LbProcess(tmp_path, cfg) as lb:
            raw = await raw_exchange(LOOPBACK, port, get("/big", close=True), timeout=15)
            (resp,) = parse_responses(raw)
            assert resp.status == 200 and resp.body == BODY
            no_traceback(lb)


async def test_a_server_silent_in_the_middle_of_its_head_is_504_at_timeout_server(tmp_path):
    async with ScriptedServer("a", answer_cl) as a, FaultProxy(a.address, stall_after=20) as pa:
        port = free_port()
        cfg = config(port, [{"name": "a", "address": pa.address}], timeout={"server": "1s"})
        async with LbProcess(tmp_path, cfg) as lb:
            t0 = time.monotonic()
            raw = await raw_exchange(LOOPBACK, port, get("/big", close=True), timeout=5)
            (resp,) = parse_responses(raw)
            assert resp.status == 504  # a late answer, as when no byte came
            assert 0.9 <= time.monotonic() - t0 < 2.5
            await until(lambda: pa.open == 0, what="the silent server connection closed")
            no_traceback(lb)


async def test_a_server_slow_to_close_after_its_answer_delays_nobody(tmp_path):
    """`Connection: close` and a FIN held back 3 s: the response is complete at its length, the
    client gets it at once and its connection goes on; the server connection is not reused."""
    async def closing(req: Request) -> bytes:
        return http_response(200, b"bye " + req.url.encode(), [("X-Server", "a")], close=True)

    async with ScriptedServer("a", closing) as a, FaultProxy(a.address, slow_close=3.0) as pa:
        port = free_port()
        cfg = config(port, [{"name": "a", "address": pa.address}])
        async with LbProcess(tmp_path, cfg) as lb:
            t0 = time.monotonic()
            async with RawClient(LOOPBACK, port) as c:
                await c.send(get("/1"))
                await c.read_responses(1)
                await c.send(get("/2"))
                (r1, r2) = await c.read_responses(2)
            assert (r1.body, r2.body) == (b"bye /1", b"bye /2")
            assert time.monotonic() - t0 < 1.5
            assert [r.conn_id for r in a.requests] == [1, 2]
            no_traceback(lb)


async def test_a_client_that_leaves_in_the_middle_of_a_stalled_body_frees_the_server_at_once(
        tmp_path):
    async with ScriptedServer("a", answer_cl) as a, FaultProxy(a.address, stall_after=3000) as pa:
        port = free_port()
        cfg = config(port, [{"name": "a", "address": pa.address, "maxconn": 1}],
                     timeout={"server": "30s"})
        async with LbProcess(tmp_path, cfg) as lb:
            r, w = await asyncio.open_connection(LOOPBACK, port)
            w.write(get("/big"))
            async with asyncio.timeout(5):
                got = await r.readuntil(b"\r\n\r\n")
                assert got.startswith(b"HTTP/1.1 200 ")
                await r.read(1)  # body bytes came, then the server stalled
            rst_close(w)
            await until(lambda: pa.open == 0 and a.open_connections == 0, timeout=3,
                        what="the stalled server connection closed when the client left")
            pa.heal()
            raw = await raw_exchange(LOOPBACK, port, get(close=True))
            assert parse_responses(raw)[0].body == BODY  # the maxconn=1 slot was given back
            no_traceback(lb)
