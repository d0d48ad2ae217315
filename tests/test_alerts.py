"""Alerts: JSON events about server and backend states (and the app servers' database views)
POSTed to webhooks or piped to a command, by the master, off the traffic path.

Every test runs `python -m foobar_lb serve` as a real process, real backend servers in the
test's loop and a webhook receiver on a free loopback port; waits are bounded polls.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from procs import LbProcess, load

from support import LOOPBACK, ScriptedServer, free_port, http_response

pytestmark = pytest.mark.slow

FAST = {"inter": "100ms", "fastinter": "100ms", "downinter": "100ms", "rise": 2, "fall": 2,
        "timeout": "300ms", "jitter": 0}


class Receiver:
    """A webhook on a free loopback port: records every event it is POSTed (with the time it
    came), answers `status` after `delay` seconds."""

    def __init__(self, status: int = 200, delay: float = 0.0):
        self.status = status
        self.delay = delay
        self.events: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.posts = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/hook"

    async def _hook(self, request: web.Request) -> web.Response:
        self.posts += 1
        assert request.content_type == "application/json"
        event = await request.json()
        if self.delay:
            await asyncio.sleep(self.delay)
        if 200 <= self.status < 300:
            self.events.append(event)
            self.times.append(time.monotonic())
        return web.Response(status=self.status)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, LOOPBACK, self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    def of(self, kind: str, server: str | None = "*") -> list[dict[str, Any]]:
        return [e for e in self.events if e["kind"] == kind and (server == "*" or
                                                                  e["server"] == server)]


async def until(predicate, timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        await asyncio.sleep(0.02)


def config(port: int, servers: list[tuple[str, ScriptedServer]], alerts: dict[str, Any],
           check: dict | None = None) -> dict:
    return {
        "frontends": {"www": {"bind": [f"{LOOPBACK}:{port}"], "default_backend": "app"}},
        "backends": {"app": {"check": check or FAST,
                             "servers": [{"name": n, "address": s.address} for n, s in servers]}},
        "alerts": alerts,
    }


async def test_one_event_per_server_state_change(tmp_path: Path):
    async with Receiver() as rx, ScriptedServer("a") as a, ScriptedServer("b") as b:
        port = free_port()
        cfg = config(port, [("a", a), ("b", b)], {"webhooks": [rx.url]})
        async with LbProcess(tmp_path, cfg):
            await asyncio.sleep(0.5)  # several checks pass: nothing changes, nothing is sent
            assert rx.events == []
            a_port = a.port
            await a.stop()  # killed
            await until(lambda: rx.of("server"), what="a down event")
            await asyncio.sleep(0.6)  # a few more failed checks: still one event
            [down] = rx.events
            assert {k: down[k] for k in ("kind", "backend", "server", "old", "new")} == {
                "kind": "server", "backend": "app", "server": "a", "old": "up", "new": "down"}
            assert "connection refused" in down["reason"]
            assert down["time"].endswith("Z") and down["id"] and down["active_left"] == 1
            await a.start(a_port)  # back
            await until(lambda: len(rx.events) == 2, what="a up event")
            await asyncio.sleep(0.6)
            assert len(rx.events) == 2, rx.events
            up = rx.events[1]
            assert (up["kind"], up["server"], up["old"], up["new"]) == ("server", "a", "down", "up")
            assert "check passed" in up["reason"]
            assert not rx.of("backend_down")  # b stayed up throughout


async def test_one_event_when_a_backend_loses_its_last_server(tmp_path: Path):
    async with Receiver() as rx, ScriptedServer("a") as a:
        port = free_port()
        async with LbProcess(tmp_path, config(port, [("a", a)], {"webhooks": rx.url})):
            a_port = a.port
            await a.stop()
            await until(lambda: len(rx.events) == 2, what="server and backend events")
            await asyncio.sleep(0.5)
            kinds = [(e["kind"], e["server"], e["new"]) for e in rx.events]
            assert kinds == [("server", "a", "down"), ("backend_down", None, "down")]
            assert "no server left up" in rx.events[1]["reason"]
            await a.start(a_port)
            await until(lambda: len(rx.events) == 4, what="server and backend back up")
            await asyncio.sleep(0.5)
            kinds = [(e["kind"], e["server"], e["new"]) for e in rx.events[2:]]
            assert kinds == [("server", "a", "up"), ("backend_up", None, "up")]


def _set_admin(aport: int, server: str, state: str) -> int:
    import urllib.request

    req = urllib.request.Request(f"http://{LOOPBACK}:{aport}/api/backends/app/servers/{server}",
                                 data=json.dumps({"state": state}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status


async def test_an_operators_drain_maint_and_ready_are_events_too(tmp_path: Path):
    async with Receiver() as rx, ScriptedServer("a") as a, ScriptedServer("b") as b:
        port, aport = free_port(), free_port()
        cfg = config(port, [("a", a), ("b", b)], {"webhooks": [rx.url]})
        cfg["admin"] = {"bind": f"{LOOPBACK}:{aport}"}
        async with LbProcess(tmp_path, cfg):
            await asyncio.sleep(0.3)
            steps = [("a", "drain", "up", "drain"), ("a", "maint", "drain", "maint"),
                     ("b", "drain", "up", "drain")]
            for server, state, _, _ in steps:
                n = len(rx.events)
                assert await asyncio.to_thread(_set_admin, aport, server, state) == 200
                await until(lambda n=n: len(rx.events) > n, what=f"{server} {state} event")
            await asyncio.sleep(0.3)
            kinds = [(e["kind"], e["server"], e["old"], e["new"]) for e in rx.events]
            assert kinds == [("server", s, o, n) for s, _, o, n in steps] + [
                ("backend_down", None, "up", "down")]
            assert rx.events[0]["reason"] == "set drain by an operator"
            n = len(rx.events)
            assert await asyncio.to_thread(_set_admin, aport, "b", "ready") == 200
            await until(lambda: len(rx.events) == n + 2, what="b ready and backend up")
            kinds = [(e["kind"], e["server"], e["old"], e["new"]) for e in rx.events[n:]]
            assert kinds == [("server", "b", "drain", "up"), ("backend_up", None, "down", "up")]


async def test_a_flapping_server_gives_three_events_then_one_summary(tmp_path: Path):
    """20 state changes within the window: 3 events, then one summary when it ends."""
    answers = {"n": 0}

    async def flappy(req) -> bytes:
        answers["n"] += 1
        n = answers["n"]
        if n <= 20 and n % 2 == 1:  # 503, 200, 503, ... then steadily 200 (up)
            return http_response(503, b"no\n")
        return http_response(200, b"ok\n")

    check = {**FAST, "inter": "50ms", "fastinter": "50ms", "downinter": "50ms",
             "rise": 1, "fall": 1, "path": "/health"}
    async with Receiver() as rx, ScriptedServer("f", flappy) as f, ScriptedServer("b") as b:
        port = free_port()
        cfg = config(port, [("f", f), ("b", b)], {"webhooks": [rx.url], "flap_window": "3s"},
                     check)
        async with LbProcess(tmp_path, cfg):
            await until(lambda: answers["n"] >= 20, what="20 flaps")
            t_flapped = time.monotonic()
            await until(lambda: rx.of("flapping"), timeout=6.0, what="the summary")
            await asyncio.sleep(0.5)
            server_events = rx.of("server", "f")
            assert [e["new"] for e in server_events] == ["down", "up", "down"]
            [summary] = rx.of("flapping")
            assert summary["server"] == "f" and summary["of"] == "server"
            assert summary["suppressed"] == 17
            assert (summary["old"], summary["new"]) == ("down", "up")  # last sent, now
            assert "17 more server events" in summary["reason"]
            # the summary comes when the window ends, after the flapping
            assert rx.times[-1] >= t_flapped - 0.2
            assert len(rx.events) == 4 and not rx.of("backend_down")


async def test_a_dead_or_slow_webhook_slows_neither_traffic_nor_checks(tmp_path: Path):
    dead = f"http://{LOOPBACK}:{free_port()}/hook"  # nothing listens: refused at once
    async with Receiver() as rx, Receiver(delay=30.0) as slow, Receiver(status=500) as bad, \
            ScriptedServer("a") as a, ScriptedServer("b") as b, ScriptedServer("c") as c:
        port = free_port()
        alerts = {"webhooks": [dead, slow.url, bad.url, rx.url], "timeout": "1s",
                  "retries": 2, "backoff": "50ms", "queue": 1}
        cfg = config(port, [("a", a), ("b", b), ("c", c)], alerts)
        async with LbProcess(tmp_path, cfg) as lb:
            loading = asyncio.ensure_future(load(port, connections=10, requests=3000,
                                                 seconds=30))
            for s in (a, b):  # each killed, then back: 4 events, one after the other
                t0 = time.monotonic()
                n = len(rx.events)
                s_port = s.port
                await s.stop()
                await until(lambda n=n: len(rx.events) == n + 1, what=f"{s.name} down")
                # fall (2) checks 100ms apart: the checks were not held up by the slow webhook
                assert time.monotonic() - t0 < 1.5
                await s.start(s_port)
                await until(lambda n=n: len(rx.events) == n + 2, what=f"{s.name} up")
                assert time.monotonic() - t0 < 3.0
            res = await loading
            # traffic went on: nothing failed (retries took the killed servers' requests)
            assert res.errors == 0, res.failed
            assert res.ok == 3000
            assert [(e["server"], e["new"]) for e in rx.events] == [
                ("a", "down"), ("a", "up"), ("b", "down"), ("b", "up")]
            # the dead and failing webhooks were tried 1 + retries times, then given up; the
            # slow one's queue (1) overflowed: dropped and counted
            deadline = time.monotonic() + 10
            while True:
                stats = (await lb.stats())["alerts"]
                if (stats["failed"] >= 2 and stats["dropped"] >= 1) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            assert stats["failed"] >= 2 and stats["dropped"] >= 1, stats
            assert bad.posts >= 3 and bad.events == []
            assert any("not delivered to webhook" in line and "after 3 attempts" in line
                       for line in lb.err)
            t_stop = time.monotonic()
        # stopping is not held up by the slow webhook (at most 2s to flush)
        assert time.monotonic() - t_stop < 6.0
    assert slow.events == []


async def test_a_reload_changes_the_webhooks_and_sends_nothing_itself(tmp_path: Path):
    async with Receiver() as one, Receiver() as two, ScriptedServer("a") as a, \
            ScriptedServer("b") as b:
        port = free_port()
        lb = LbProcess(tmp_path, config(port, [("a", a), ("b", b)], {"webhooks": [one.url]}))
        async with lb:
            a_port = a.port
            await a.stop()
            await until(lambda: len(one.events) == 1, what="a down, to the first webhook")
            lb.config.write_text(lb.config.read_text().replace(
                f'webhooks = ["{one.url}"]', f'webhooks = ["{two.url}"]'))
            rc, _, err = await lb.reload()
            assert rc == 0, err
            await asyncio.sleep(0.5)  # the new workers took the states over: no event
            assert len(one.events) == 1 and two.events == []
            await a.start(a_port)
            await until(lambda: len(two.events) == 1, what="a up, to the second webhook")
            assert (two.events[0]["server"], two.events[0]["new"]) == ("a", "up")
            assert len(one.events) == 1


async def test_the_library_sends_alerts_too(tmp_path: Path):
    """`LoadBalancer` (one process) runs the same alerts in its own loop."""
    from foobar_lb import LoadBalancer

    async with Receiver() as rx, ScriptedServer("a") as a, ScriptedServer("b") as b:
        cfg = config(0, [("a", a), ("b", b)], {"webhooks": [rx.url]})
        async with LoadBalancer(cfg):
            await a.stop()
            await until(lambda: rx.events, what="a down")
            await asyncio.sleep(0.4)
            assert [(e["kind"], e["server"], e["new"]) for e in rx.events] == [
                ("server", "a", "down")]


async def test_the_command_gets_the_event_json_on_stdin(tmp_path: Path):
    out = tmp_path / "events.jsonl"
    runs = tmp_path / "runs"
    script = tmp_path / "hook.py"
    script.write_text(
        "import sys\n"
        f"open({str(runs)!r}, 'a').write('run\\n')\n"
        "data = sys.stdin.read()\n"
        f"open({str(out)!r}, 'a').write(data)\n")
    async with ScriptedServer("a") as a, ScriptedServer("b") as b:
        port = free_port()
        cfg = config(port, [("a", a), ("b", b)],
                     {"command": [sys.executable, str(script)], "retries": 0})
        async with LbProcess(tmp_path, cfg):
            await a.stop()
            await until(lambda: out.exists() and out.read_text().endswith("\n"),
                        what="the command ran")
            await asyncio.sleep(0.4)
            [line] = out.read_text().splitlines()
            event = json.loads(line)
            assert (event["kind"], event["server"], event["old"], event["new"]) == (
                "server", "a", "up", "down")
            assert runs.read_text() == "run\n"


async def test_a_failing_command_is_retried_with_backoff(tmp_path: Path):
    runs = tmp_path / "runs"
    script = tmp_path / "hook.py"
    script.write_text(f"import sys, time\nopen({str(runs)!r}, 'a').write(f'{{time.time()}}\\n')\n"
                      "sys.stdin.read()\nsys.exit(3)\n")
    async with ScriptedServer("a") as a, ScriptedServer("b") as b:
        port = free_port()
        cfg = config(port, [("a", a), ("b", b)],
                     {"command": [sys.executable, str(script)], "retries": 2,
                      "backoff": "200ms"})
        async with LbProcess(tmp_path, cfg) as lb:
            await a.stop()
            await until(lambda: runs.exists() and len(runs.read_text().split()) == 3,
                        what="three runs")
            await asyncio.sleep(0.5)
            times = [float(t) for t in runs.read_text().split()]
            assert len(times) == 3
            assert times[1] - times[0] >= 0.2 and times[2] - times[1] >= 0.4  # doubling
            await until(lambda: any("not delivered" in line for line in lb.err),
                        what="the give-up line")


async def test_a_command_that_does_not_exist_is_a_start_error(tmp_path: Path):
    async with ScriptedServer("a") as a:
        port = free_port()
        cfg = config(port, [("a", a)], {"command": ["/nonexistent/page-me"]})
        lb = LbProcess(tmp_path, cfg)
        await lb.start(wait_ready=False)
        rc = await asyncio.wait_for(lb.proc.wait(), 20)
        await lb.stop()
        assert rc == 2
        assert any('alerts.command[0] = "/nonexistent/page-me": no such program' in line
                   for line in lb.err), lb.err


# -- the app servers' view of their database, read from /health by the http checks -----------


def health(primary: str = "up", replicas: dict[str, str] | None = None,
           details: dict[str, str] | None = None) -> bytes:
    replicas = {"replica-1": "up"} if replicas is None else replicas
    nodes = {"primary": {"role": "primary", "state": primary,
                         "detail": (details or {}).get("primary", "writable")}}
    for name, state in replicas.items():
        nodes[name] = {"role": "replica", "state": state,
                       "detail": (details or {}).get(name, "heartbeat 0.01s behind")}
    code = 200
    return http_response(code, json.dumps({"status": "ok", "server": "x", "primary": primary,
                                           "replicas": replicas, "nodes": nodes}).encode(),
                         [("Content-Type", "application/json")])


async def test_app_server_database_events_come_from_its_health(tmp_path: Path):
    """An app server whose /health says a replica broke, lags, and its primary went away: one
    event per change (kind "replication" or "primary"), "recovering" is no change."""
    view = {"body": health()}

    async def app(req) -> bytes:
        return view["body"]

    check = {**FAST, "path": "/health"}
    async with Receiver() as rx, ScriptedServer("app", app) as s:
        port = free_port()
        cfg = config(port, [("server-1", s)], {"webhooks": [rx.url]}, check)
        async with LbProcess(tmp_path, cfg):
            await asyncio.sleep(0.4)
            assert rx.events == []  # a healthy first view is no news
            view["body"] = health(replicas={"replica-1": "broken"},
                                  details={"replica-1": "SQL thread not running"})
            await until(lambda: len(rx.events) == 1, what="replication broken")
            e = rx.events[0]
            assert (e["kind"], e["backend"], e["server"], e["node"], e["old"], e["new"]) == (
                "replication", "app", "server-1", "replica-1", "up", "broken")
            assert "SQL thread not running" in e["reason"]
            view["body"] = health(replicas={"replica-1": "recovering"})
            await asyncio.sleep(0.4)
            assert len(rx.events) == 1  # on probation: not settled, no event
            view["body"] = health(replicas={"replica-1": "lagging"},
                                  details={"replica-1": "heartbeat 7.2s behind"})
            await until(lambda: len(rx.events) == 2, what="lagging")
            assert (rx.events[1]["old"], rx.events[1]["new"]) == ("broken", "lagging")
            view["body"] = health(primary="down", replicas={"replica-1": "up"},
                                  details={"primary": "connection refused"})
            await until(lambda: len(rx.events) == 4, what="primary down, replica up")
            got = sorted((e["kind"], e["old"], e["new"]) for e in rx.events[2:])
            assert got == [("primary", "up", "down"), ("replication", "lagging", "up")]
            [p] = [e for e in rx.events if e["kind"] == "primary"]
            assert p["node"] == "primary" and "connection refused" in p["reason"]
            await asyncio.sleep(0.4)
            assert len(rx.events) == 4
            # the LB's own view of the app server never changed: it stayed up
            assert not rx.of("server")


@pytest.mark.mariadb
async def test_on_mariadb_replication_and_primary_events_reach_the_webhook(tmp_path: Path):
    """A real cluster and app server behind the load balancer (http checks on /health):
    replication broken and back, then the primary killed: one event each."""
    import os
    import signal

    from dbstack import AppServer, own_cluster, sql

    with own_cluster(tmp_path, replicas=1) as data:
        app = AppServer("server-1", data["dir"], tmp_path).start()
        try:
            await app.ready()
            async with Receiver() as rx:
                port = free_port()
                cfg = {
                    "frontends": {"www": {"bind": [f"{LOOPBACK}:{port}"],
                                          "default_backend": "app"}},
                    "backends": {"app": {
                        "check": {"path": "/health", "inter": "250ms", "rise": 2,
                                  "fall": 3, "timeout": "1s"},
                        "servers": [{"name": "server-1", "address": f"{LOOPBACK}:{app.port}"}]}},
                    "alerts": {"webhooks": [rx.url]},
                }
                async with LbProcess(tmp_path, cfg):
                    await asyncio.sleep(1.0)
                    assert rx.events == []
                    sql(data, "replica-1", "STOP SLAVE SQL_THREAD")
                    await until(lambda: rx.events, what="replication broken")
                    e = rx.events[0]
                    assert (e["kind"], e["server"], e["node"], e["old"], e["new"]) == (
                        "replication", "server-1", "replica-1", "up", "broken")
                    assert "SQL thread not running" in e["reason"]
                    sql(data, "replica-1", "START SLAVE SQL_THREAD")
                    await until(lambda: len(rx.events) == 2, what="replication back")
                    assert (rx.events[1]["old"], rx.events[1]["new"]) == ("broken", "up")
                    os.kill(data["nodes"]["primary"]["pid"], signal.SIGKILL)
                    await until(lambda: rx.of("primary"), what="primary unreachable")
                    await asyncio.sleep(1.0)
                    [p] = rx.of("primary")
                    assert (p["server"], p["old"], p["new"]) in {
                        ("server-1", "up", "down"), ("server-1", "up", "hung")}
                    # reads go on from the replica: the app server itself stayed up
                    assert not rx.of("server") and not rx.of("backend_down"), (rx.events, app.log()[-3000:])
        finally:
            app.stop()
