"""The runtime API and its CLI: drain, maint, ready, weights, servers added and removed live,
what a reload keeps, and the errors; real processes (a master with two workers), scripted
servers, bounded loads that count every failed request.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import sys
import time
from collections import Counter

import pytest

from foobar_lb.balancing import Balancer, algorithm_names
from foobar_lb.servers import Admin, Server, State
from procs import LbProcess, established_to, load, socket_inodes

from support import LOOPBACK, ScriptedServer, free_port, http_response, parse_responses, raw_exchange

pytestmark = pytest.mark.slow

TOKEN = "api-test-token-42"
CHECK = {"inter": "200ms", "fastinter": "100ms", "downinter": "100ms", "rise": 2, "fall": 1,
         "timeout": "300ms"}


def _cfg(port: int, aport: int, servers: list[dict], *, workers: int = 2,
         backend: dict | None = None, admin: dict | None = None) -> dict:
    return {"global": {"workers": workers, "grace": "2s", "hard_stop_after": "10s"},
            "frontends": {"www": {"bind": f"{LOOPBACK}:{port}", "default_backend": "app"}},
            "backends": {"app": {"servers": servers, **(backend or {})}},
            "admin": {"bind": f"{LOOPBACK}:{aport}", **(admin or {})}}


def _srv(name: str, s: ScriptedServer | str, **kw) -> dict:
    return {"name": name, "address": s if isinstance(s, str) else s.address, **kw}


async def api(aport: int, method: str, path: str, body=None, *, raw: bytes | None = None,
              ctype: str | None = "application/json", timeout: float = 30.0
              ) -> tuple[int, dict | str]:
    """One request to the admin listener: (status, JSON answer or text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else b"")
    head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{aport}", "Connection: close",
            f"Authorization: Bearer {TOKEN}"]  # (ignored where no token is configured)
    if method not in ("GET", "HEAD"):
        head.append(f"Content-Length: {len(data)}")
        if ctype:
            head.append(f"Content-Type: {ctype}")
    out = await raw_exchange(LOOPBACK, aport, ("\r\n".join(head) + "\r\n\r\n").encode() + data,
                             timeout=timeout)
    (resp,) = parse_responses(out, [method])
    text = resp.body.decode()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


async def server_entry(aport: int, name: str, backend: str = "app") -> dict | None:
    status, answer = await api(aport, "GET", "/api/backends")
    assert status == 200, answer
    for be in answer["backends"]:
        if be["name"] == backend:
            for s in be["servers"]:
                if s["name"] == name:
                    return s
    return None


async def until(cond, timeout: float = 10.0, step: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s")
        await asyncio.sleep(step)


async def wait_entry(aport: int, name: str, timeout: float = 10.0, **want) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = await server_entry(aport, name)
        if s is not None and all(s.get(k) == v for k, v in want.items()):
            return s
        if time.monotonic() > deadline:
            raise AssertionError(f"server {name} never had {want}: {s}")
        await asyncio.sleep(0.05)


async def held_connections(port: int, n: int) -> list[tuple[asyncio.StreamReader,
                                                            asyncio.StreamWriter, bytes]]:
    """`n` connections opened at once, one request each, kept open: (reader, writer, body)."""

    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
        r, w = await asyncio.open_connection(LOOPBACK, port)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        return r, w, await r.readexactly(length)

    return list(await asyncio.gather(*(one() for _ in range(n))))


def owners(lb: LbProcess, port: int) -> dict[int, int]:
    """How many of the client connections to `port` each worker holds."""
    conns = set(established_to(port))
    return {pid: len(socket_inodes(pid) & conns) for pid in lb.workers()}


async def through_both_workers(lb: LbProcess, port: int, n: int = 60) -> Counter:
    """Rounds of `n` connections held open at once, one request each, until two workers have
    taken some in one round (the kernel wakes whichever worker it likes; checked): which
    server answered, counted by body, over all rounds."""
    seen: Counter = Counter()
    for _ in range(10):
        clients = await held_connections(port, n)
        try:
            held = owners(lb, port)
            seen.update(body for _, _, body in clients)
        finally:
            for _, w, _ in clients:
                w.close()
            await asyncio.gather(*(w.wait_closed() for _, w, _ in clients),
                                 return_exceptions=True)
        if sum(held.values()) >= n and sum(v > 0 for v in held.values()) >= 2:
            return seen
    raise AssertionError(f"one worker took every connection, ten times: {held}")


async def one_connection(port: int, n: int) -> Counter:
    """`n` requests in a row on one keep-alive connection (one worker): bodies counted."""
    r, w = await asyncio.open_connection(LOOPBACK, port)
    seen: Counter = Counter()
    try:
        for _ in range(n):
            w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length:")))
            seen[(await r.readexactly(length)).split()[0].decode()] += 1
    finally:
        w.close()
    return seen


class Loader:
    """A bounded load in the background, in rounds, until stopped: every failure counted."""

    def __init__(self, port: int):
        self.port = port
        self.stop = asyncio.Event()
        self.ok = 0
        self.failed: Counter = Counter()
        self.task: asyncio.Task | None = None

    async def _run(self) -> None:
        rounds = 0
        while not self.stop.is_set() and rounds < 400:
            rounds += 1
            res = await load(self.port, connections=8, requests=80, seconds=30, fresh_every=2)
            self.ok += res.ok
            self.failed.update(res.failed)

    def __enter__(self) -> Loader:
        self.task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 60)


# ---------------------------------------------------------------------------------------------
# The algorithms: servers added and removed at run time


@pytest.mark.parametrize("algo", [a for a in algorithm_names() if a != "first"])
def test_every_algorithm_takes_an_added_server_and_forgets_a_removed_one(algo: str) -> None:
    servers = [Server(f"s{i}", "127.0.0.1", 9000 + i) for i in range(3)]
    bal = Balancer(servers, algo, rng=random.Random(7))
    new = Server("new", "127.0.0.1", 9100)
    bal.add(new)
    picked = Counter(bal.pick(f"10.0.0.{i}".encode()).name for i in range(300))
    assert set(picked) == {"s0", "s1", "s2", "new"}, picked
    bal.remove(servers[1])
    bal.set_admin(servers[0], Admin.DRAIN)
    picked = Counter(bal.pick(f"10.0.0.{i}".encode()).name for i in range(300))
    assert set(picked) == {"s2", "new"}, picked
    bal.set_admin(servers[0], Admin.READY)
    servers[2].state = State.DOWN
    bal.set_state(servers[2], State.DOWN)  # (already set: nothing to tell)
    picked = Counter(bal.pick(f"10.0.0.{i}".encode()).name for i in range(300))
    assert "s1" not in picked and "s0" in picked


def test_an_added_backup_is_used_only_when_no_active_server_is_up() -> None:
    a = Server("a", "127.0.0.1", 9001)
    bal = Balancer([a], "roundrobin", allbackups=True)
    spare = Server("spare", "127.0.0.1", 9002, backup=True)
    bal.add(spare)
    assert bal.pick() is a
    bal.set_admin(a, Admin.MAINT)
    assert bal.pick() is spare
    bal.remove(spare)
    assert bal.pick() is None


# ---------------------------------------------------------------------------------------------
# drain, maint, ready


async def test_drain_keeps_the_open_request_and_sends_nothing_new_through_either_worker(tmp_path):
    gate = asyncio.Event()

    def handler(name: str):
        async def h(req):
            if req.url == "/slow":
                await gate.wait()
                return http_response(200, f"{name} slow done".encode())
            return http_response(200, f"{name}\n".encode())
        return h

    async with ScriptedServer("a", handler("a")) as a, ScriptedServer("b", handler("b")) as b:
        port, aport = free_port(), free_port()
        async with LbProcess(tmp_path, _cfg(port, aport, [_srv("a", a), _srv("b", b)])) as lb:
            # a worker's first pick is the first server: this request is held by a
            slow = asyncio.ensure_future(raw_exchange(
                LOOPBACK, port, b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                timeout=30))
            await until(lambda: any(r.url == "/slow" for r in a.requests))
            status, s = await api(aport, "POST", "/api/backends/app/servers/a",
                                  {"state": "drain"})
            assert status == 200, s
            assert (s["name"], s["state"], s["admin"]) == ("a", "up", "drain")
            before = len(a.requests)
            seen = await through_both_workers(lb, port)
            assert set(seen) == {b"b\n"}
            res = await load(port, connections=8, requests=400, fresh_every=2)
            assert res.errors == 0, res.failed
            assert res.bodies == {b"b\n": 400}
            assert len(a.requests) == before  # nothing new, through either worker
            gate.set()
            (resp,) = parse_responses(await slow, ["GET"])
            assert (resp.status, resp.body) == (200, b"a slow done")
            # ready: back in rotation in both workers
            status, s = await api(aport, "POST", "/api/backends/app/servers/a",
                                  {"state": "ready"})
            assert (status, s["admin"]) == (200, "ready")
            seen = await through_both_workers(lb, port)
            assert seen[b"a\n"] > 0 and seen[b"b\n"] > 0, seen
            assert any("server app/a is DRAINING" in line for line in lb.err)


async def test_maint_pauses_checks_and_ready_checks_it_at_once(tmp_path):
    async with ScriptedServer("a") as a, ScriptedServer("b") as b:
        port, aport = free_port(), free_port()
        cfg = _cfg(port, aport, [_srv("a", a), _srv("b", b)], backend={"check": CHECK})
        async with LbProcess(tmp_path, cfg) as lb:
            status, s = await api(aport, "POST", "/api/backends/app/servers/a",
                                  {"state": "maint"})
            assert (status, s["admin"], s["checks"]) == (200, "maint", "paused")
            assert set(await through_both_workers(lb, port)) == {b"b GET /\n"}
            # its checks are paused: the server goes away and nothing notices
            a_port = a.port
            await a.stop()
            await asyncio.sleep(0.6)  # three check intervals
            s = await server_entry(aport, "a")
            assert (s["state"], s["admin"]) == ("up", "maint")
            assert not any("server app/a is DOWN" in line for line in lb.err)
            # ready: checked at once, before it goes back: down, and still out of rotation
            status, s = await api(aport, "POST", "/api/backends/app/servers/a",
                                  {"state": "ready"})
            assert (status, s["state"], s["admin"], s["checks"]) == (200, "down", "ready", "on")
            res = await load(port, connections=8, requests=200, fresh_every=2)
            assert res.errors == 0, res.failed
            assert res.bodies == {b"b GET /\n": 200}
            # its checks bring it back
            await a.start(a_port)
            await wait_entry(aport, "a", state="up", admin="ready")
            seen = await through_both_workers(lb, port)
            assert seen[b"a GET /\n"] > 0 and seen[b"b GET /\n"] > 0, seen


async def test_a_drained_server_that_fails_its_check_stays_drained(tmp_path):
    async with ScriptedServer("a") as a, ScriptedServer("b") as b:
        port, aport = free_port(), free_port()
        cfg = _cfg(port, aport, [_srv("a", a), _srv("b", b)], backend={"check": CHECK})
        async with LbProcess(tmp_path, cfg):
            status, _ = await api(aport, "POST", "/api/backends/app/servers/a",
                                  {"state": "drain"})
            assert status == 200
            a_port = a.port
            await a.stop()
            s = await wait_entry(aport, "a", state="down")
            assert s["admin"] == "drain"
            await a.start(a_port)
            s = await wait_entry(aport, "a", state="up")
            assert s["admin"] == "drain"  # its health came back; the operator's say stays
            res = await load(port, connections=8, requests=200, fresh_every=2)
            assert res.errors == 0, res.failed
            assert res.bodies == {b"b GET /\n": 200}


async def test_drain_in_tcp_mode_keeps_open_connections_and_takes_no_new_ones(tmp_path):
    async with ScriptedServer("a") as a, ScriptedServer("b") as b:
        port, aport = free_port(), free_port()
        cfg = _cfg(port, aport, [_srv("a", a), _srv("b", b)], workers=1,
                   backend={"mode": "tcp"})
        cfg["frontends"]["www"]["mode"] = "tcp"
        async with LbProcess(tmp_path, cfg):
            r, w = await asyncio.open_connection(LOOPBACK, port)  # the first goes to a
            request = b"GET /one HTTP/1.1\r\nHost: x\r\n\r\n"
            w.write(request)
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            assert b"X-Server: a" in head
            await r.readexactly(len(b"a GET /one\n"))
            status, s = await api(aport, "POST", "/api/backends/app/servers/a",
                                  {"state": "drain"})
            assert (status, s["admin"]) == (200, "drain")
            res = await load(port, connections=8, requests=80, fresh_every=1)
            assert res.errors == 0, res.failed
            assert res.bodies == {b"b GET /\n": 80}  # no new connection to a
            w.write(b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n")  # the open one goes on
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200 OK") and b"X-Server: a" in head
            assert await r.readexactly(len(b"a GET /two\n")) == b"a GET /two\n"
            w.close()
            assert [q.url for q in a.requests] == ["/one", "/two"]


# ---------------------------------------------------------------------------------------------
# weights


async def test_a_weight_shifts_the_share_exactly(tmp_path):
    async with ScriptedServer("a") as a, ScriptedServer("b") as b:
        port, aport = free_port(), free_port()
        cfg = _cfg(port, aport, [_srv("a", a), _srv("b", b)], backend={"balance": "static-rr"})
        async with LbProcess(tmp_path, cfg):
            assert await one_connection(port, 30) == {"a": 15, "b": 15}
            status, s = await api(aport, "POST", "/api/backends/app/servers/b", {"weight": 2})
            assert (status, s["weight"]) == (200, 2)
            assert await one_connection(port, 30) == {"a": 10, "b": 20}
            status, s = await api(aport, "POST", "/api/backends/app/servers/a", {"weight": 0})
            assert (status, s["weight"]) == (200, 0)
            assert await one_connection(port, 30) == {"b": 30}


# ---------------------------------------------------------------------------------------------
# servers added and removed under load


async def test_add_under_load_takes_traffic_once_checked_then_remove_lets_requests_finish(
        tmp_path):
    inflight = [0]

    async def slowish(req):
        inflight[0] += 1
        await asyncio.sleep(0.05)
        inflight[0] -= 1
        return http_response(200, b"c\n")

    async with ScriptedServer("a") as a:
        port, aport, c_port = free_port(), free_port(), free_port()
        c = ScriptedServer("c", slowish)
        cfg = _cfg(port, aport, [_srv("a", a)], backend={"check": CHECK})
        async with LbProcess(tmp_path, cfg) as lb:
            loader = Loader(port)
            with loader:
                await asyncio.sleep(0.3)
                status, s = await api(aport, "PUT", "/api/backends/app/servers/c",
                                      {"address": f"{LOOPBACK}:{c_port}", "weight": 1})
                assert status == 201, s
                assert (s["name"], s["state"], s["admin"], s["runtime"]) == (
                    "c", "down", "ready", True)
                # nothing listens there yet: its checks fail, and no request is sent to it
                await asyncio.sleep(0.6)
                s = await server_entry(aport, "c")
                assert (s["state"], s["requests"], s["failures"]) == ("down", 0, 0), s
                await c.start(c_port)
                await wait_entry(aport, "c", state="up")
                await until(lambda: len(c.requests) >= 20)  # it takes its share now
                assert any("server app/c is UP" in line for line in lb.err)
                # remove it under load: it has requests in flight (each takes 50 ms)
                await until(lambda: inflight[0] > 0, step=0.005)
                status, answer = await api(aport, "DELETE", "/api/backends/app/servers/c")
                assert status == 200, answer
                assert inflight[0] == 0  # what it had in flight was done before it was gone
                assert answer["ok"] is True and answer["in_flight_left"] == 0, answer
                assert answer["message"] == "server app/c removed"
                served = len(c.requests)
                await asyncio.sleep(0.5)
                assert len(c.requests) == served  # gone from every worker
                assert await server_entry(aport, "c") is None
            await loader.finish()
            assert loader.failed == Counter(), loader.failed
            assert loader.ok > 0
            await c.stop()


async def test_a_worker_that_replaces_a_dead_one_has_the_runtime_changes(tmp_path):
    async with ScriptedServer("a") as a, ScriptedServer("b") as b, ScriptedServer("c") as c:
        port, aport = free_port(), free_port()
        cfg = _cfg(port, aport, [_srv("a", a), _srv("b", b)], workers=1,
                   backend={"balance": "static-rr"})
        async with LbProcess(tmp_path, cfg) as lb:
            for method, path, body in (
                    ("PUT", "/api/backends/app/servers/c", {"address": c.address, "weight": 2}),
                    ("POST", "/api/backends/app/servers/a", {"state": "drain"}),
                    ("POST", "/api/backends/app/servers/b", {"weight": 2})):
                status, answer = await api(aport, method, path, body)
                assert status in (200, 201), answer
            assert await one_connection(port, 20) == {"b": 10, "c": 10}
            # the run-time server's counters are where the master reads them
            assert (await server_entry(aport, "c"))["requests"] == 10
            (old,) = lb.workers()
            os.kill(old, signal.SIGKILL)
            await lb.wait_err(r"replaces worker", 10)
            assert await one_connection(port, 20) == {"b": 10, "c": 10}
            s = await server_entry(aport, "c")  # (the dead worker's count kept)
            assert (s["requests"], s["admin"], s["weight"], s["runtime"]) == (20, "ready", 2, True)
            s = await server_entry(aport, "a")
            assert (s["admin"], s["requests"]) == ("drain", 0)


# ---------------------------------------------------------------------------------------------
# reload


async def test_a_reload_keeps_admin_states_and_runtime_servers_and_the_file_wins(tmp_path):
    async with ScriptedServer("a") as a, ScriptedServer("b") as b, ScriptedServer("c") as c, \
            ScriptedServer("d") as d:
        port, aport = free_port(), free_port()
        cfg = _cfg(port, aport, [_srv("a", a), _srv("b", b)], backend={"balance": "static-rr"})
        async with LbProcess(tmp_path, cfg) as lb:
            assert (await api(aport, "PUT", "/api/backends/app/servers/c",
                              {"address": c.address}))[0] == 201
            assert (await api(aport, "POST", "/api/backends/app/servers/a",
                              {"state": "drain"}))[0] == 200
            assert (await api(aport, "POST", "/api/backends/app/servers/b",
                              {"weight": 3}))[0] == 200
            status, answer = await api(aport, "POST", "/api/reload", {})
            assert status == 200 and answer["ok"] is True, answer
            assert answer["message"].startswith("serving ")
            s = await server_entry(aport, "a")
            assert (s["admin"], s["runtime"]) == ("drain", False)  # the admin state is kept
            s = await server_entry(aport, "b")
            assert s["weight"] == 1  # the file wins for the weight
            s = await server_entry(aport, "c")
            assert (s["address"], s["runtime"]) == (c.address, True)  # kept until removed
            seen = await through_both_workers(lb, port)
            assert set(seen) == {b"b GET /\n", b"c GET /\n"}, seen
            # the file names a server "c" now: the file's replaces the run-time one
            lb.config.write_text(lb.config.read_text().replace(
                f'{{ name = "b", address = "{b.address}" }}',
                f'{{ name = "b", address = "{b.address}" }}, '
                f'{{ name = "c", address = "{d.address}" }}'))
            mark = len(lb.err)
            status, answer = await api(aport, "POST", "/api/reload", {})
            assert status == 200 and answer["ok"] is True, answer
            line = await lb.wait_err(r"server app/c: the configuration file names it", 5,
                                     start=mark)
            assert line.endswith(f"server app/c: the configuration file names it now "
                                 f"({d.address}): the file's server replaces the one added at "
                                 f"run time ({c.address})")
            s = await server_entry(aport, "c")
            assert (s["address"], s["runtime"]) == (d.address, False)
            seen = await through_both_workers(lb, port)
            assert set(seen) == {b"b GET /\n", b"d GET /\n"}, seen
            # a file server removed at run time: the next reload brings it back (the file wins)
            status, answer = await api(aport, "DELETE", "/api/backends/app/servers/b")
            assert (status, answer["message"]) == (200, "server app/b removed"), answer
            assert await server_entry(aport, "b") is None
            assert (await api(aport, "POST", "/api/reload", {}))[0] == 200
            s = await server_entry(aport, "b")
            assert (s["address"], s["admin"], s["runtime"]) == (b.address, "ready", False)
            # a reload of a broken file: 400 with the reason, nothing changes
            lb.config.write_text(lb.config.read_text() + "\n[bogus]\n")
            status, answer = await api(aport, "POST", "/api/reload", {})
            assert status == 400 and answer["ok"] is False, answer
            assert "bogus" in answer["message"]


# ---------------------------------------------------------------------------------------------
# errors


async def test_api_errors_are_exact(tmp_path):
    async with ScriptedServer("a") as a:
        port, aport = free_port(), free_port()
        async with LbProcess(tmp_path, _cfg(port, aport, [_srv("a", a)], workers=1)):
            srv = "/api/backends/app/servers"
            cases = [
                ("POST", "/api/backends/nope/servers/a", {"state": "drain"}, 404,
                 "no backend 'nope' (backends: app)"),
                ("POST", f"{srv}/zz", {"state": "drain"}, 404,
                 "backend app has no server 'zz' (servers: a)"),
                ("DELETE", f"{srv}/zz", None, 404, "backend app has no server 'zz' (servers: a)"),
                ("POST", f"{srv}/zz/check", None, 404,
                 "backend app has no server 'zz' (servers: a)"),
                ("PUT", "/api/backends/nope/servers/x", {"address": "127.0.0.1:1"}, 404,
                 "no backend 'nope' (backends: app)"),
                ("POST", f"{srv}/a", {"state": "off"}, 400,
                 'state = "off": expected "ready", "drain" or "maint"'),
                ("POST", f"{srv}/a", {"weight": 300}, 400,
                 "weight = 300: expected a whole number from 0 to 256"),
                ("POST", f"{srv}/a", {"weight": True}, 400,
                 "weight = true: expected a whole number from 0 to 256"),
                ("POST", f"{srv}/a", {"weight": "2"}, 400,
                 'weight = "2": expected a whole number from 0 to 256'),
                ("POST", f"{srv}/a", {"colour": "red"}, 400,
                 "colour: unknown field; expected state or weight"),
                ("POST", f"{srv}/a", {}, 400,
                 "the body = {}: expected a JSON object with state or weight"),
                ("POST", f"{srv}/a", [1], 400,
                 "the body = [1]: expected a JSON object with state or weight"),
                ("POST", f"{srv}/a", None, 400,
                 "the body is empty: expected a JSON object with state or weight"),
                ("PUT", f"{srv}/a", {"address": "127.0.0.1:2"}, 409,
                 f"backend app has a server 'a' already ({a.address})"),
                ("PUT", f"{srv}/x", {"weight": 1}, 400,
                 'address: missing; expected a server address "host:port"'),
                ("PUT", f"{srv}/x", {"address": "nowhere"}, 400,
                 'address = "nowhere": expected a server address "host:port" with a port from 1 '
                 "to 65535"),
                ("PUT", f"{srv}/x", {"address": "127.0.0.1:0"}, 400,
                 'address = "127.0.0.1:0": expected a server address "host:port" with a port '
                 "from 1 to 65535"),
                ("PUT", f"{srv}/x", {"address": "127.0.0.1:1", "backup": "no"}, 400,
                 'backup = "no": expected true or false'),
                ("PUT", f"{srv}/x", {"address": "127.0.0.1:1", "check": True}, 400,
                 "check: unknown field; expected address, weight or backup"),
                ("PUT", f"{srv}/x%20y", {"address": "127.0.0.1:1"}, 400,
                 "server name \"x y\": expected a name of letters, digits, '-', '_', '.' or ':' "
                 "(at most 64)"),
            ]
            for method, path, body, want_status, want in cases:
                status, answer = await api(aport, method, path, body)
                assert (status, answer) == (want_status, {"error": want}), (method, path, body)
            status, answer = await api(aport, "POST", f"{srv}/a", raw=b"{nope")
            assert status == 400 and answer["error"].startswith("the body is not JSON: "), answer
            status, answer = await api(aport, "GET", f"{srv}/a")
            assert (status, answer) == (405, {"error": f"GET {srv}/a: expected POST or PUT or "
                                                       "DELETE"})
            status, answer = await api(aport, "POST", "/api/servers", {})
            assert status == 404 and answer["error"].startswith(
                "no endpoint /api/servers; the runtime API has GET /api/backends, "), answer
            assert (await api(aport, "GET", "/api/stats"))[0] == 200  # (the admin listener's)
            # the guard: a state change without JSON's Content-Type never gets here
            status, answer = await api(aport, "DELETE", f"{srv}/a", ctype=None)
            assert status == 415
            # nothing changed
            s = await server_entry(aport, "a")
            assert (s["state"], s["admin"], s["weight"]) == ("up", "ready", 1)
            # /ready says why when the operator took every server out
            assert (await api(aport, "POST", f"{srv}/a", {"state": "maint"}))[0] == 200
            assert await api(aport, "GET", "/ready") == (503, (
                "not ready\nfrontend www: backend app has no server up (a: maint (set by the "
                "operator))\n"))
            assert (await api(aport, "POST", f"{srv}/a", {"state": "ready"}))[0] == 200
            assert await api(aport, "GET", "/ready") == (200, "ready\n")


# ---------------------------------------------------------------------------------------------
# the CLI


async def _cli(aport: int, *args: str, token: str | None = TOKEN) -> tuple[int, str, str]:
    env = dict(os.environ)
    env.pop("FOOBAR_ADMIN_TOKEN", None)
    if token is not None:
        env["FOOBAR_ADMIN_TOKEN"] = token
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "foobar_lb", "admin", "--url", f"http://127.0.0.1:{aport}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(p.communicate(), 60)
    return p.returncode, out.decode(), err.decode()


async def test_the_admin_cli_end_to_end(tmp_path):
    async with ScriptedServer("a") as a, ScriptedServer("b") as b:
        port, aport = free_port(), free_port()
        c_port = free_port()
        cfg = _cfg(port, aport, [_srv("a", a), _srv("b", b)], backend={"check": CHECK},
                   admin={"token": TOKEN})
        async with LbProcess(tmp_path, cfg):
            rc, out, err = await _cli(aport, "servers")
            assert (rc, err) == (0, "")
            lines = out.splitlines()
            assert lines[0].split() == ["BACKEND", "SERVER", "ADDRESS", "STATE", "ADMIN",
                                        "WEIGHT", "CURRENT", "REQUESTS", "CHECK"]
            assert lines[1].split()[:6] == ["app", "a", a.address, "up", "ready", "1"]
            assert lines[2].split()[:6] == ["app", "b", b.address, "up", "ready", "1"]
            rc, out, err = await _cli(aport, "servers", "--json")
            assert rc == 0
            assert [s["name"] for s in json.loads(out)["backends"][0]["servers"]] == ["a", "b"]
            rc, out, err = await _cli(aport, "set", "app", "a", "--state", "drain")
            assert (rc, out, err) == (0, f"app/a {a.address}: state up, admin drain, weight 1\n",
                                      "")
            rc, out, _ = await _cli(aport, "set", "app", "b", "--weight", "3")
            assert (rc, out) == (0, f"app/b {b.address}: state up, admin ready, weight 3\n")
            rc, out, _ = await _cli(aport, "add", "app", "c", f"127.0.0.1:{c_port}", "--weight",
                                    "2")
            assert (rc, out) == (0, f"added app/c 127.0.0.1:{c_port}: state down, admin ready, "
                                    "weight 2 (added at run time)\n")
            rc, out, err = await _cli(aport, "check", "app", "c")
            assert rc == 1
            assert re.fullmatch(r"app/c: layer4 connection refused \(\d+ms\); state down, admin "
                                r"ready\n", out), out
            c = ScriptedServer("c")
            await c.start(c_port)
            try:
                rc, out, _ = await _cli(aport, "check", "app", "c")
                assert rc == 0 and out.startswith("app/c: layer4 check passed ("), out
                await wait_entry(aport, "c", state="up")
                rc, out, _ = await _cli(aport, "servers")
                assert any(line.split()[:6] == ["app", "c*", f"127.0.0.1:{c_port}", "up",
                                                "ready", "2"] for line in out.splitlines()), out
                assert out.splitlines()[-1] == ("* added at run time (kept by a reload, lost by "
                                                "a restart)")
                rc, out, _ = await _cli(aport, "remove", "app", "c")
                assert (rc, out) == (0, "server app/c removed\n")
            finally:
                await c.stop()
            rc, out, _ = await _cli(aport, "reload")
            assert rc == 0 and out.startswith("foobar-lb: serving "), out
            # errors: one line, exit 2, no traceback
            for args, want in (
                    (("set", "app", "zz", "--state", "maint"),
                     "foobar-lb: error: backend app has no server 'zz' (servers: a, b)\n"),
                    (("add", "app", "a", "127.0.0.1:1"),
                     f"foobar-lb: error: backend app has a server 'a' already ({a.address})\n"),
                    (("set", "app", "a"),
                     "foobar-lb: error: admin set: give --state ready|drain|maint and/or "
                     "--weight N\n"),
                    (("set", "app", "a", "--weight", "999"),
                     "foobar-lb: error: weight = 999: expected a whole number from 0 to 256\n"),
            ):
                rc, out, err = await _cli(aport, *args)
                assert (rc, out, err) == (2, "", want), args
            rc, out, err = await _cli(aport, "servers", token="wrong-token-123")
            assert (rc, out) == (2, "")
            assert err == ("foobar-lb: error: 401 Unauthorized: send Authorization: Bearer "
                           "<token>\n")
            rc, out, err = await _cli(aport, "servers", token=None)
            assert rc == 2 and err.startswith("foobar-lb: error: 401 Unauthorized"), err
            rc, out, err = await _cli(aport, "servers", "--json", "--token", TOKEN, token=None)
            assert rc == 0 and json.loads(out)["backends"][0]["name"] == "app", err
            free = free_port()
            p = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "foobar_lb", "admin", "--url", f"127.0.0.1:{free}",
                "--token", TOKEN, "servers", stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(p.communicate(), 30)
            assert (p.returncode, out) == (2, b"")
            assert err.decode() == (f"foobar-lb: error: http://127.0.0.1:{free}: cannot reach "
                                    "the admin listener: connection refused\n")
