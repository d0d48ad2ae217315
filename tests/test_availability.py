"""Availability: health checks, passive observation, backups, retries, reuse, timeouts, queues.

Real servers on loopback; short intervals with slack for a noisy machine. Nothing here asserts a
duration tighter than "well before the next check" or "at the timeout, give or take a second".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from foobar_lb import State

from support import (
    LOOPBACK,
    RawClient,
    Request,
    ScriptedServer,
    free_port,
    http_get,
    http_response,
    lb_config,
    parse_responses,
    raw_exchange,
    running_lb,
)

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


async def wait_for(predicate, timeout: float = 10.0, step: float = 0.02) -> None:
    """Poll `predicate` until true; fail after `timeout` (a bounded loop)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not true after {timeout}s: {predicate}")
        await asyncio.sleep(step)


def health_handler(state: dict):
    """/health answers 200 or 503 as `state["ok"]` says and counts the checks it saw."""

    async def handler(req: Request) -> bytes:
        if req.url == "/health":
            state["checks"] = state.get("checks", 0) + 1
            return http_response(200 if state["ok"] else 503, b"health\n")
        return http_response(200, b"app\n", [("X-Server", state["name"])])

    return handler


# -- active checks ------------------------------------------------------------------------------


async def test_down_after_exactly_fall_failed_checks_and_up_after_rise_passing_ones():
    st = {"ok": True, "name": "s1"}
    async with ScriptedServer("s1", health_handler(st)) as s1:
        cfg = lb_config([s1.address], backend={
            "check": {"path": "/health", "inter": "100ms", "rise": 2, "fall": 3, "jitter": 0}})
        async with running_lb(cfg) as lb:
            server = lb.server("app", "s1")
            await wait_for(lambda: st.get("checks", 0) >= 2)
            assert server.state is State.UP
            # failing checks: the server goes down on exactly the third failed one
            st["ok"] = False
            before = st["checks"]
            await wait_for(lambda: server.state is State.DOWN)
            assert st["checks"] - before == 3
            down = lb.events[-1]
            assert (down.server, down.old, down.new) == ("s1", State.UP, State.DOWN)
            assert down.reason.startswith("layer7 wrong status: 503 (check took ")
            # passing checks: up again on exactly the second one
            st["ok"] = True
            before = st["checks"]
            await wait_for(lambda: server.state is State.UP)
            assert st["checks"] - before == 2
            assert lb.events[-1].new is State.UP
            assert lb.events[-1].reason.startswith("layer7 check passed: 200")


async def test_a_stopped_server_goes_down_and_its_return_is_seen(caplog):
    caplog.set_level(logging.INFO, logger="foobar_lb")
    s1 = await ScriptedServer("s1").start()
    port = s1.port
    s2 = await ScriptedServer("s2").start()
    cfg = lb_config([s1.address, s2.address], backend={
        "check": {"inter": "100ms", "rise": 2, "fall": 3, "jitter": 0}})
    try:
        async with running_lb(cfg) as lb:
            server = lb.server("app", "s1")
            # servers start UP: what is observable is that checks ran and passed, and kept it up
            # with no state change (a layer4 check is a connection; rise 2 + fall 3 - 1 = 4)
            await wait_for(lambda: s1.connections >= 2)
            assert (server.state, server.check_status, server.health) == \
                (State.UP, "layer4 check passed", 4)
            assert list(lb.events) == []
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await s1.stop()
            await wait_for(lambda: server.state is State.DOWN)
            took = loop.time() - t0
            # three failed checks 100ms apart: not before 0.2s, and well before 3s
            assert 0.15 < took < 3.0
            fails = [r.getMessage() for r in caplog.records
                     if "s1 check failed" in r.getMessage()]
            assert len(fails) == 2  # fall - 1 failures logged before the one that puts it down
            line = next(r.getMessage() for r in caplog.records if "is DOWN" in r.getMessage())
            assert line.startswith("server app/s1 is DOWN: layer4 connection refused (check took ")
            assert line.endswith("ms), 1 active and 0 backup servers left")
            # while it is down, traffic goes to s2 only
            for _ in range(4):
                assert (await http_get(*lb.address)).header("x-server") == "s2"
            s1 = await ScriptedServer("s1").start(port)
            await wait_for(lambda: server.state is State.UP)
            assert any("is UP: layer4 check passed" in r.getMessage() and
                       "2 active and 0 backup servers online" in r.getMessage()
                       for r in caplog.records)
            got = {(await http_get(*lb.address)).header("x-server") for _ in range(4)}
            assert got == {"s1", "s2"}
            # the two transitions, each seen once: down when stopped, up when back
            assert [(e.server, e.old, e.new) for e in lb.events] == [
                ("s1", State.UP, State.DOWN), ("s1", State.DOWN, State.UP)]
    finally:
        await s1.stop()
        await s2.stop()


async def test_checks_are_spread_by_jitter():
    seen: list[float] = []

    async def handler(req: Request) -> bytes:
        if req.url == "/health":
            seen.append(asyncio.get_running_loop().time())
        return http_response(200, b"ok")

    async with ScriptedServer("s1", handler) as s1:
        cfg = lb_config([s1.address], backend={
            "check": {"path": "/health", "inter": "50ms", "jitter": 0.5}})
        async with running_lb(cfg):
            await wait_for(lambda: len(seen) >= 12)
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert max(gaps) - min(gaps) > 0.01  # not a fixed beat


# -- passive observation ------------------------------------------------------------------------


async def test_passive_observation_marks_a_server_down_before_its_next_check():
    async def broken_app(req: Request) -> bytes:
        if req.url == "/health":
            return http_response(200, b"fine\n")  # its checks would keep passing
        return http_response(500, b"boom\n")

    async with ScriptedServer("bad", broken_app) as bad, ScriptedServer("good") as good:
        cfg = lb_config([bad.address, good.address], backend={
            "check": {"path": "/health", "inter": "10s"}, "observe": "layer7", "error_limit": 3})
        async with running_lb(cfg) as lb:
            server = lb.server("app", "s1")
            statuses = [(await http_get(*lb.address)).status for _ in range(10)]
            assert server.state is State.DOWN  # within seconds; the next check is 10s away
            assert statuses[:6] == [500, 200, 500, 200, 500, 200]
            assert statuses[6:] == [200] * 4
            assert "3 consecutive errors on live traffic (last: status 500)" in lb.events[-1].reason
            # one change, UP to DOWN, after exactly the three errors: no more traffic reached it
            assert [(e.server, e.old, e.new) for e in lb.events] == [("s1", State.UP, State.DOWN)]
            assert [r.url for r in bad.requests if r.url != "/health"] == ["/"] * 3
            assert len(good.requests) == 7


async def test_after_a_passive_down_checks_run_at_downinter():
    seen: list[float] = []

    async def app(req: Request) -> bytes:
        if req.url == "/health":
            seen.append(asyncio.get_running_loop().time())
            return http_response(200, b"ok")
        return http_response(500, b"boom")

    async with ScriptedServer("s1", app) as s1:
        cfg = lb_config([s1.address], backend={
            "check": {"path": "/health", "inter": "3s", "downinter": "200ms", "jitter": 0},
            "observe": "layer7", "error_limit": 2})
        async with running_lb(cfg) as lb:
            await wait_for(lambda: len(seen) >= 1, timeout=5)
            for _ in range(2):
                await http_get(*lb.address)
            assert lb.server("app", "s1").state is State.DOWN
            down_at = asyncio.get_running_loop().time()
            n = len(seen)
            await wait_for(lambda: len(seen) > n, timeout=2)  # not the 3s inter still pending
            assert seen[n] - down_at < 1.0


async def test_layer4_observation_counts_refused_connections():
    dead = f"{LOOPBACK}:{free_port()}"
    async with ScriptedServer("good") as good:
        cfg = lb_config([dead, good.address], backend={
            "check": {"inter": "10s"}, "error_limit": 2})  # observe defaults to layer4
        async with running_lb(cfg) as lb:
            for _ in range(6):
                resp = await http_get(*lb.address)
                assert resp.status == 200  # each refusal is retried on the good server
            assert lb.server("app", "s1").state is State.DOWN
            assert "connection refused" in lb.events[-1].reason


# -- backups ------------------------------------------------------------------------------------


async def test_backup_servers_take_over_only_when_no_active_server_is_up():
    a_state = {"ok": True, "name": "a"}
    b_state = {"ok": True, "name": "b"}
    async with ScriptedServer("a", health_handler(a_state)) as a, \
            ScriptedServer("b", health_handler(b_state)) as b, \
            ScriptedServer("bk1") as bk1, ScriptedServer("bk2") as bk2:
        check = {"path": "/health", "inter": "50ms", "rise": 1, "fall": 1, "jitter": 0}
        cfg = lb_config({"app": [
            {"name": "a", "address": a.address}, {"name": "b", "address": b.address},
            {"name": "bk1", "address": bk1.address, "backup": True},
            {"name": "bk2", "address": bk2.address, "backup": True}]}, backend={"check": check})
        async with running_lb(cfg) as lb:
            async def who(n: int) -> list[str]:
                return [(await http_get(*lb.address)).header("x-server") for _ in range(n)]

            assert set(await who(6)) == {"a", "b"}
            a_state["ok"] = False
            await wait_for(lambda: lb.server("app", "a").state is State.DOWN)
            assert set(await who(4)) == {"b"}  # one active left: still no backup
            b_state["ok"] = False
            await wait_for(lambda: lb.server("app", "b").state is State.DOWN)
            assert await who(4) == ["bk1"] * 4  # the first backup gets everything
            a_state["ok"] = True
            await wait_for(lambda: lb.server("app", "a").state is State.UP)
            assert await who(4) == ["a"] * 4  # given back on recovery
            assert [r for r in bk2.requests if r.url != "/health"] == []


async def test_allbackups_share_and_an_empty_backend_answers_503_at_once():
    st = {"ok": False, "name": "a"}
    async with ScriptedServer("a", health_handler(st)) as a, ScriptedServer("bk1") as bk1, \
            ScriptedServer("bk2") as bk2:
        check = {"path": "/health", "inter": "50ms", "rise": 1, "fall": 1, "jitter": 0}
        cfg = lb_config({"app": [
            {"name": "a", "address": a.address},
            {"name": "bk1", "address": bk1.address, "backup": True},
            {"name": "bk2", "address": bk2.address, "backup": True}]},
            backend={"check": check, "allbackups": True})
        async with running_lb(cfg) as lb:
            await wait_for(lambda: lb.server("app", "a").state is State.DOWN)
            got = [(await http_get(*lb.address)).header("x-server") for _ in range(4)]
            assert got == ["bk1", "bk2", "bk1", "bk2"]
            await bk1.stop()
            await bk2.stop()
            await wait_for(lambda: not lb.backends["app"].balancer.any_up())
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            resp = await http_get(*lb.address)
            assert resp.status == 503
            assert loop.time() - t0 < 1.0  # at once, no waiting in a queue


# -- retries ------------------------------------------------------------------------------------


async def test_get_is_retried_on_another_server_after_an_empty_response():
    closer = ScriptedServer("closer")

    async def close_now(req: Request) -> None:
        for t in list(closer.transports):
            t.close()

    closer.handler = close_now
    async with closer, ScriptedServer("good") as good:
        async with running_lb(lb_config([closer.address, good.address])) as lb:
            for _ in range(3):
                resp = await http_get(*lb.address)
                assert resp.status == 200 and resp.header("x-server") == "good"
            # round robin offered the closer first every time (a retry moves the turn on): each
            # GET reached it once, got no byte back, and was replayed once on the good server
            assert [r.url for r in closer.requests] == ["/"] * 3
            assert len(good.requests) == 3
            assert lb.server("app", "s1").failures == 3


async def test_post_whose_server_dies_after_receiving_it_is_not_replayed():
    victim = ScriptedServer("victim")
    other = ScriptedServer("other")

    async def die(req: Request) -> None:
        for t in list(victim.transports):
            t.abort()

    victim.handler = die
    async with victim, other:
        async with running_lb(lb_config([victim.address, other.address])) as lb:
            raw = await raw_exchange(*lb.address, b"POST /pay HTTP/1.1\r\nHost: x\r\nConnection: close"
                                                  b"\r\nContent-Length: 5\r\n\r\nhello")
            (resp,) = parse_responses(raw)
            assert resp.status == 502
    assert [r.url for r in victim.requests] == ["/pay"]  # exactly one attempt
    assert other.requests == []


async def test_idempotent_request_with_a_big_body_is_not_replayed():
    victim = ScriptedServer("victim")

    async def die(req: Request) -> None:
        for t in list(victim.transports):
            t.abort()

    victim.handler = die
    async with victim, ScriptedServer("other") as other:
        async with running_lb(lb_config([victim.address, other.address])) as lb:
            body = b"x" * 40000  # more than one 16 KiB buffer
            raw = await raw_exchange(*lb.address, b"PUT /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert parse_responses(raw)[0].status == 502
        assert other.requests == []
        # a small one is replayed on the other server
        async with running_lb(lb_config([victim.address, other.address])) as lb:
            raw = await raw_exchange(*lb.address, b"PUT /small HTTP/1.1\r\nHost: x\r\n"
                                                  b"Content-Length: 5\r\nConnection: close\r\n\r\nhello")
            assert parse_responses(raw)[0].status == 200
        assert [r.body for r in other.requests] == [b"hello"]


async def test_no_retry_once_response_bytes_reached_the_client():
    async def half(req: Request) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part"

    srv = ScriptedServer("half", half)

    async def half_then_die(req: Request) -> None:
        for t in list(srv.transports):
            t.write(await half(req))
            t.close()

    srv.handler = half_then_die
    async with srv, ScriptedServer("other") as other:
        async with running_lb(lb_config([srv.address, other.address])) as lb:
            raw = await raw_exchange(*lb.address, GET)
            assert raw.startswith(b"HTTP/1.1 200 OK")
            assert raw.endswith(b"only part")  # cut short, as the server did
        assert other.requests == []


SERVER_SCRIPT = str(Path(__file__).with_name("support.py"))


def _start_server_process(name: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, SERVER_SCRIPT, name, str(port)],
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.startswith("listening"), line
    return proc


@pytest.mark.slow
async def test_sigkill_of_one_server_under_load_fails_no_request():
    ports = [free_port(), free_port()]
    procs = [await asyncio.to_thread(_start_server_process, f"p{i}", p) for i, p in enumerate(ports)]
    cfg = lb_config([f"{LOOPBACK}:{p}" for p in ports], backend={
        "check": {"inter": "200ms", "fall": 2, "rise": 2}})
    results: dict[str, int] = {}
    failures: list[str] = []
    total = 4000
    try:
        async with running_lb(cfg) as lb:
            sent = 0

            async def client() -> None:
                nonlocal sent
                async with RawClient(*lb.address) as c:
                    while sent < total:
                        sent += 1
                        await c.send(GET)
                        got = await c.read_responses(1, timeout=10)
                        c.buf = b""
                        if not got or got[0].status != 200:
                            failures.append(repr(got[:1]))
                            return
                        who = got[0].header("x-server")
                        results[who] = results.get(who, 0) + 1

            async def killer() -> None:
                await wait_for(lambda: sent > total // 3, timeout=30)
                procs[0].send_signal(signal.SIGKILL)

            async with asyncio.timeout(120):
                await asyncio.gather(killer(), *(client() for _ in range(24)))
            assert failures == []
            assert sum(results.values()) >= total
            assert results.get("p0", 0) > 0 and results.get("p1", 0) > total // 2
            await wait_for(lambda: lb.server("app", "s1").state is State.DOWN)
            # the kill did hit traffic: attempts on p0 failed and were retried on p1
            assert lb.server("app", "s1").failures > 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()


# -- connection reuse -----------------------------------------------------------------------------


async def test_server_closing_idle_pooled_connections_causes_no_client_error():
    async with ScriptedServer("a", idle_timeout=0.05) as a, \
            ScriptedServer("b", idle_timeout=0.05) as b:
        async with running_lb(lb_config([a.address, b.address])) as lb:
            statuses = []
            async with RawClient(*lb.address) as c:
                for i in range(60):
                    await c.send(GET)
                    (resp,) = await c.read_responses(1)
                    c.buf = b""
                    statuses.append(resp.status)
                    # around the servers' keep-alive timeout, so some pooled ones die as we pick them
                    await asyncio.sleep(0.03 + (i % 5) * 0.01)
            assert statuses == [200] * 60
            assert a.connections + b.connections > 4  # servers did close idle connections


async def test_pool_keeps_at_most_max_idle_and_drops_them_after_the_idle_timeout():
    all_in = asyncio.Event()

    async def held(req):  # six requests in flight at once: each needs a connection of its own
        if len(a.requests) == 6:
            all_in.set()
        await all_in.wait()
        return http_response(200, b"ok")

    async with ScriptedServer("a", held) as a:
        cfg = lb_config([a.address], backend={"pool_max_idle": 2, "pool_idle_timeout": "200ms"})
        async with running_lb(cfg) as lb:
            async def one():
                await http_get(*lb.address)

            await asyncio.gather(*(one() for _ in range(6)))
            pool = lb.backends["app"].pool
            server = lb.server("app", "s1")
            # six requests at once: six server connections, all reusable when their responses
            # ended; the pool kept exactly max_idle of them and closed the rest
            assert a.connections == 6
            assert pool.count(server) == 2
            await wait_for(lambda: a.open_connections == 2, timeout=1)
            await wait_for(lambda: pool.count(server) == 0, timeout=3)
            await wait_for(lambda: a.open_connections == 0, timeout=3)


# -- timeouts -------------------------------------------------------------------------------------


async def test_connect_timeout_is_retried_elsewhere():
    import socket

    # a listener that never accepts, its backlog filled: connects to it hang
    hole = socket.socket()
    hole.bind((LOOPBACK, 0))
    hole.listen(0)
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            f.connect(hole.getsockname())
        fillers.append(f)
    try:
        async with ScriptedServer("good") as good:
            cfg = lb_config([f"{LOOPBACK}:{hole.getsockname()[1]}", good.address],
                            backend={"timeout": {"connect": "200ms"}})
            async with running_lb(cfg) as lb:
                for _ in range(2):
                    resp = await http_get(*lb.address)
                    assert resp.status == 200 and resp.header("x-server") == "good"
    finally:
        for f in fillers:
            f.close()
        hole.close()


async def test_keep_alive_timeout_closes_an_idle_client_connection():
    async with ScriptedServer("a") as a:
        cfg = lb_config([a.address], frontend={"timeout": {"http_keep_alive": "200ms"}})
        async with running_lb(cfg) as lb:
            async with RawClient(*lb.address) as c:
                await c.send(GET)
                await c.read_responses(1)
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                assert await c.closed(timeout=3)
                assert 0.15 < loop.time() - t0 < 2.5


async def test_tunnel_timeout_closes_a_quiet_websocket():
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosed

    async def quiet(ws):
        await ws.wait_closed()

    async with serve(quiet, LOOPBACK, 0, ping_interval=None) as server:
        port = server.sockets[0].getsockname()[1]
        cfg = lb_config([f"{LOOPBACK}:{port}"], backend={"timeout": {"tunnel": "300ms"}})
        async with running_lb(cfg) as lb:
            host, lport = lb.address
            async with connect(f"ws://{host}:{lport}/", ping_interval=None) as ws:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                with pytest.raises(ConnectionClosed):
                    async with asyncio.timeout(5):
                        await ws.recv()
                assert 0.25 < loop.time() - t0 < 3


# -- limits and queues ----------------------------------------------------------------------------


def slow_server(name: str, delay: float, log: list[str], concurrent: list[int]):
    async def handler(req: Request) -> bytes:
        concurrent[0] += 1
        concurrent[1] = max(concurrent[1], concurrent[0])
        log.append(req.url)
        await asyncio.sleep(delay)
        concurrent[0] -= 1
        return http_response(200, req.url.encode())

    return ScriptedServer(name, handler)


async def test_maxconn_one_serves_requests_one_at_a_time_in_arrival_order():
    order: list[str] = []
    conc = [0, 0]
    async with slow_server("slow", 0.1, order, conc) as s:
        cfg = lb_config([{"name": "slow", "address": s.address, "maxconn": 1}])
        async with running_lb(cfg) as lb:
            async def one(i: int) -> tuple[int, bytes]:
                await asyncio.sleep(i * 0.02)  # arrival order 0, 1, 2, ...
                r = await http_get(*lb.address, f"/{i}")
                return r.status, r.body

            got = await asyncio.gather(*(one(i) for i in range(6)))
    assert [g[0] for g in got] == [200] * 6
    assert order == [f"/{i}" for i in range(6)]
    assert conc[1] == 1  # never two at once on the server


async def test_full_queue_and_queue_timeout_answer_503():
    order: list[str] = []
    conc = [0, 0]
    async with slow_server("slow", 0.6, order, conc) as s:
        cfg = lb_config([{"name": "slow", "address": s.address, "maxconn": 1}],
                        backend={"maxqueue": 2, "timeout": {"queue": "5s"}})
        async with running_lb(cfg) as lb:
            async def one(i: int) -> int:
                await asyncio.sleep(i * 0.03)
                return (await http_get(*lb.address, f"/{i}")).status

            # one in service, two queued, the fourth finds the queue full
            got = await asyncio.gather(*(one(i) for i in range(4)))
            assert got == [200, 200, 200, 503]
        cfg = lb_config([{"name": "slow", "address": s.address, "maxconn": 1}],
                        backend={"timeout": {"queue": "200ms"}})
        async with running_lb(cfg) as lb:
            loop = asyncio.get_running_loop()

            async def timed(i: int) -> tuple[int, float]:
                await asyncio.sleep(i * 0.03)
                t0 = loop.time()
                status = (await http_get(*lb.address, f"/t{i}")).status
                return status, loop.time() - t0

            (s0, _), (s1, waited) = await asyncio.gather(timed(0), timed(1))
            assert s0 == 200 and s1 == 503
            assert 0.15 < waited < 0.55  # at timeout queue, before the server was free


async def test_global_maxconn_parks_extra_connections_until_a_slot_frees():
    async with ScriptedServer("a") as a:
        cfg = lb_config([a.address])
        cfg["global"] = {"maxconn": 1}
        async with running_lb(cfg) as lb:
            first = await RawClient(*lb.address).__aenter__()
            await first.send(GET)
            await first.read_responses(1)
            second = await RawClient(*lb.address).__aenter__()
            await second.send(GET)
            with pytest.raises(TimeoutError):
                await second.read_responses(1, timeout=0.3)  # accepted, not served yet
            await first.__aexit__(None, None, None)
            (resp,) = await second.read_responses(1, timeout=3)
            assert resp.status == 200
            await second.__aexit__(None, None, None)
