"""Test support for the consistency and failover tests: a real MariaDB cluster per test, real
app server processes, the load balancer in front (its public `LoadBalancer` only), a bounded
load and what it saw.

Rules: every process started here is stopped by its pid in a finalizer (`down`/`stop`);
waits are bounded polls on a condition, never sleeps that order events; loads are bounded in
count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from foobar_app.db import cluster as cluster_mod
from foobar_app.db.cluster import MariaDBMissing, cluster_down, cluster_up
from foobar_lb import LoadBalancer

from support import LOOPBACK, free_port


def need_mariadb() -> None:
    try:
        cluster_mod.find_binaries()
    except MariaDBMissing as e:
        pytest.fail(f"{e} (the README's test command installs it)")


@contextlib.contextmanager
def own_cluster(tmp_path: Path, replicas: int = 1, semisync: bool = False):
    """A cluster of its own under tmp_path; every node stopped by pid at the end."""
    need_mariadb()
    d = tmp_path / "cluster"
    data = cluster_up(d, replicas=replicas, semisync=semisync)
    data["dir"] = d
    try:
        yield data
    finally:
        cluster_down(d)


def reload(data: dict) -> dict:
    """cluster.json as the cluster commands left it."""
    fresh = json.loads((data["dir"] / "cluster.json").read_text())
    fresh["dir"] = data["dir"]
    return fresh


def node(data: dict, name: str) -> cluster_mod.Node:
    n = data["nodes"][name]
    return cluster_mod.Node(n["name"], n["role"], n["server_id"], n["port"], n["dir"], n["pid"])


def sql(data: dict, name: str, *statements: str) -> list[dict]:
    return node(data, name).sql(*statements)


def count_items(data: dict, name: str, where: str = "1") -> int:
    return sql(data, name, f"SELECT COUNT(*) AS n FROM foobar.items WHERE {where}")[0]["n"]


def names_on(data: dict, name: str) -> set[str]:
    return {r["name"] for r in sql(data, name, "SELECT name FROM foobar.items")}


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "foobar_app", "cluster", *args],
                          capture_output=True, text=True, timeout=timeout)


def freeze(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)


def thaw(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGCONT)


async def until(predicate: Callable[[], Any], timeout: float = 15.0, step: float = 0.05,
                what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not true after {timeout}s{': ' + what if what else ''}")
        await asyncio.sleep(step)


# -- app servers as processes ------------------------------------------------------------------


class AppServer:
    """`python -m foobar_app serve --cluster DIR/cluster.json` in a subprocess."""

    def __init__(self, name: str, cluster_dir: Path, workdir: Path, *args: str):
        self.name = name
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.args = ["--name", name, "--bind", f"{LOOPBACK}:{self.port}",
                     "--cluster", str(cluster_dir / "cluster.json"), *args]
        self.out = workdir / f"{name}.out"
        self.err = workdir / f"{name}.err"
        self.proc: subprocess.Popen | None = None

    def start(self) -> AppServer:
        self.proc = subprocess.Popen([sys.executable, "-m", "foobar_app", "serve", *self.args],
                                     stdout=self.out.open("w"), stderr=self.err.open("w"),
                                     stdin=subprocess.DEVNULL)
        return self

    async def ready(self, timeout: float = 30.0) -> None:
        await until(lambda: "listening on" in self.out.read_text() or self.proc.poll() is not None,
                    timeout, what=f"{self.name} listening")
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited {self.proc.returncode}: {self.log()}")

    def log(self) -> str:
        return self.err.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen | None, grace: float = 15.0) -> None:
    """SIGTERM a process we started (if it still runs), SIGKILL it after `grace` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.asynccontextmanager
async def app_servers(data: dict, workdir: Path, *args: str, count: int = 2):
    servers = [AppServer(f"server-{i}", data["dir"], workdir, *args) for i in range(1, count + 1)]
    try:
        for s in servers:
            s.start()
        for s in servers:
            await s.ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


def lb_config(servers: list[AppServer], by_host: bool = False) -> dict:
    """One frontend; backend "app" over every server, checked on /health as the example
    stack does; with `by_host`, Host "server-N" reaches server-N alone (to alternate servers
    on purpose)."""
    check = {"path": "/health", "inter": "1s", "fastinter": "250ms", "downinter": "250ms",
             "rise": 2, "fall": 2}  # as examples/mysql-stack.toml
    entries = [{"name": s.name, "address": f"{LOOPBACK}:{s.port}"} for s in servers]
    backends: dict[str, Any] = {"app": {"balance": "roundrobin", "check": check,
                                        "servers": entries}}
    fe: dict[str, Any] = {"bind": [f"{LOOPBACK}:0"], "default_backend": "app"}
    if by_host:
        fe["rules"] = []
        for s, e in zip(servers, entries, strict=True):
            backends[s.name] = {"check": check, "servers": [dict(e)]}
            fe["rules"].append({"host": s.name, "backend": s.name})
    return {"frontends": {"www": fe}, "backends": backends}


@contextlib.asynccontextmanager
async def load_balancer(servers: list[AppServer], **kw):
    lb = LoadBalancer(lb_config(servers, **kw))
    await lb.start()
    try:
        await until(lambda: all(lb.server("app", s.name).state == "up" for s in servers),
                    timeout=20, what="app servers up in the load balancer")
        yield lb
    finally:
        await lb.stop(grace=1.0)


# -- a bounded load ------------------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # "read" or "write"
    status: int  # 0: no HTTP answer at all
    started: float
    seconds: float
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    error: str = ""


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)

    def of(self, kind: str, since: float = 0.0) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == kind and o.started >= since]

    def failed(self, kind: str, since: float = 0.0) -> list[Outcome]:
        return [o for o in self.of(kind, since) if not 200 <= o.status < 300]

    def acked_names(self) -> set[str]:
        return {o.body["name"] for o in self.of("write") if o.status == 201}

    def summary(self) -> str:
        by: dict[tuple[str, int], int] = {}
        for o in self.outcomes:
            by[o.kind, o.status] = by.get((o.kind, o.status), 0) + 1
        return ", ".join(f"{k} {s}: {n}" for (k, s), n in sorted(by.items()))


async def request(http: aiohttp.ClientSession, kind: str, method: str, url: str,
                  **kw) -> Outcome:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    try:
        async with http.request(method, url, **kw) as r:
            try:
                body = await r.json()
            except (aiohttp.ContentTypeError, ValueError):
                body = await r.text()
            return Outcome(kind, r.status, t0, loop.time() - t0, body, dict(r.headers))
    except (TimeoutError, aiohttp.ClientError) as e:
        return Outcome(kind, 0, t0, loop.time() - t0, error=repr(e))


async def mixed_load(url: str, load: Load, stop: asyncio.Event, workers: int = 6,
                     write_every: int = 3, limit: int = 3000, prefix: str = "w",
                     pause: float = 0.01) -> None:
    """`workers` clients until `stop` (or `limit` requests in all): each request a read
    (`GET /items?limit=5`), every `write_every`th a write (`POST /items`, a unique name)."""
    count = 0
    timeout = aiohttp.ClientTimeout(total=30)

    async def client(i: int) -> None:
        nonlocal count
        async with aiohttp.ClientSession(timeout=timeout,
                                         cookie_jar=aiohttp.DummyCookieJar()) as http:
            n = 0
            while not stop.is_set() and count < limit:
                count += 1
                n += 1
                if write_every and n % write_every == 0:
                    o = await request(http, "write", "POST", f"{url}/items",
                                      json={"name": f"{prefix}-{i}-{n}"})
                else:
                    o = await request(http, "read", "GET", f"{url}/items?limit=5")
                load.outcomes.append(o)
                await asyncio.sleep(pause)

    await asyncio.gather(*(client(i) for i in range(workers)))
