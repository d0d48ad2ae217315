"""The database across hosts: a MariaDB primary and replica in network namespaces of their own,
an app server in a third, the cluster commands run from a control namespace (and from the root
namespace, which re-executes them there), and a cut link.

Rules: the test builds its own small topology (namespaces with a unique prefix: a switch with a
bridge, db1, db2, app, ops; every host's veth created in the host, its peer on the bridge;
nothing in the root namespace) and tears it down in a finalizer: every process it started
stopped by pid, then whatever still runs in its namespaces, then the namespaces. Waits are
bounded polls on a condition. Needs root and `ip netns` (skipped otherwise, but under CI=true
a missing `ip netns` fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pymysql
import pytest

import dbstack
import foobar_app
from foobar_app.db import cluster as cluster_mod
from foobar_app.db.cluster import cluster_down, cluster_up, entered

SUBNET = "10.214.9"
ADDRESSES = {"ops": f"{SUBNET}.5", "app": f"{SUBNET}.21", "db1": f"{SUBNET}.31",
             "db2": f"{SUBNET}.32"}
APP_PORT = 8081
SRC = str(Path(foobar_app.__file__).resolve().parents[1])


def need_netns() -> None:
    why = None
    if os.geteuid() != 0:
        why = "needs root (network namespaces)"
    elif shutil.which("ip") is None:
        why = "needs `ip` (iproute2) for network namespaces"
    else:
        r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            why = f"`ip netns` does not work here: {r.stderr.strip()}"
    if why is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} (CI=true: required)")
    pytest.skip(why)


def need_mariadb() -> None:
    try:
        cluster_mod.find_binaries()
    except cluster_mod.MariaDBMissing as e:
        pytest.fail(f"{e} (the README's test command installs it)")


def until(predicate: Callable[[], Any], timeout: float, what: str, step: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        time.sleep(step)


class Topology:
    """Namespaces PREFIX-{sw,db1,db2,app,ops} on one bridge; torn down by `down`."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.hosts = list(ADDRESSES)
        self.made: list[str] = []

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    @staticmethod
    def ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, f"ip {' '.join(args)}: {r.stderr.strip()}"

    def up(self) -> None:
        sw = self.ns("sw")
        self.ip("netns", "add", sw)
        self.made.append(sw)
        self.ip("-n", sw, "link", "add", "br0", "type", "bridge")
        self.ip("-n", sw, "link", "set", "br0", "up")
        for host, address in ADDRESSES.items():
            ns = self.ns(host)
            self.ip("netns", "add", ns)
            self.made.append(ns)
            self.ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"v-{host}",
                    "netns", sw)
            self.ip("-n", sw, "link", "set", f"v-{host}", "master", "br0", "up")
            self.ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            self.ip("-n", ns, "link", "set", "eth0", "up")
            self.ip("-n", ns, "link", "set", "lo", "up")

    def link(self, host: str, state: str) -> None:
        """The cable: the host's veth peer on the switch down or up."""
        self.ip("-n", self.ns("sw"), "link", "set", f"v-{host}", state)

    def down(self) -> None:
        for ns in reversed(self.made):  # what still runs in them (we started it all), then them
            r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                               timeout=10)
            for pid in r.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        self.made.clear()


class App:
    """`python -m foobar_app serve --cluster ...` in the app namespace."""

    def __init__(self, topo: Topology, cluster_json: Path, workdir: Path):
        self.topo = topo
        self.out = workdir / "app.out"
        self.err = workdir / "app.err"
        self.cmd = ["ip", "netns", "exec", topo.ns("app"), sys.executable, "-m", "foobar_app",
                    "serve", "--name", "app1", "--bind", f"{ADDRESSES['app']}:{APP_PORT}",
                    "--cluster", str(cluster_json), "--heartbeat-interval", "250ms"]
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": SRC}
        self.proc = subprocess.Popen(self.cmd, stdout=self.out.open("w"), stderr=self.err.open("w"),
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        until(lambda: "listening on" in self.out.read_text() or self.proc.poll() is not None,
              30, "the app server listening")
        assert self.proc.poll() is None, f"the app exited: {self.err.read_text()}"

    def stop(self) -> None:
        dbstack.stop_process(self.proc)

    def request(self, method: str, path: str, body: dict | None = None,
                timeout: float = 10.0) -> tuple[int, Any, dict[str, str]]:
        """One HTTP request from the ops host."""
        conn = http.client.HTTPConnection(ADDRESSES["app"], APP_PORT, timeout=timeout)
        try:
            with entered(self.topo.ns("ops")):  # (the connection is made by the first request)
                conn.request(method, path, body=None if body is None else json.dumps(body),
                             headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
        finally:
            conn.close()
        return r.status, json.loads(data) if data else None, dict(r.getheaders())

    def write(self, name: str) -> tuple[int, Any, dict[str, str]]:
        return self.request("POST", "/items", {"name": name})

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/health")[1]


def admin_sql(data: dict, topo: Topology, node: str, statement: str) -> list[dict]:
    """A statement on a node over TCP from the ops host (as the cluster commands reach it)."""
    with entered(topo.ns("ops")):
        db = pymysql.connect(host=data["nodes"][node]["address"], port=3306,
                             user=data["admin_user"], password=data["admin_password"],
                             connect_timeout=3, read_timeout=5, autocommit=True,
                             cursorclass=pymysql.cursors.DictCursor)
    with contextlib.closing(db), db.cursor() as c:
        c.execute(statement)
        return list(c.fetchall())


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """A cluster command run from the root namespace (it re-executes itself in ops)."""
    return subprocess.run([sys.executable, "-m", "foobar_app", "cluster", *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": SRC})


@pytest.fixture
def lab(tmp_path):
    need_netns()
    need_mariadb()
    topo = Topology(f"fbdbh{secrets.token_hex(3)}")
    d = tmp_path / "db"
    try:
        topo.up()
        yield topo, d, tmp_path
    finally:
        with contextlib.suppress(Exception):
            if (d / "cluster.json").exists():
                cluster_down(d)
        topo.down()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert topo.prefix not in left, f"namespaces left behind: {left}"


@pytest.mark.netns
@pytest.mark.mariadb
@pytest.mark.slow
def test_failover_across_hosts_and_the_returning_old_primary_takes_no_writes(lab):
    topo, d, workdir = lab
    t0 = time.monotonic()
    # up on two hosts, from the root namespace: the library enters ops for its connections
    data = cluster_up(d, hosts=[{"name": "db1", "address": ADDRESSES["db1"], "netns": topo.ns("db1")},
                                {"name": "db2", "address": ADDRESSES["db2"], "netns": topo.ns("db2")}],
                      control_netns=topo.ns("ops"))
    assert data["primary"].endswith(f"@{ADDRESSES['db1']}:3306/foobar")
    assert data["replicas"] == [data["primary"].replace(ADDRESSES["db1"], ADDRESSES["db2"])]
    assert {n: (r["address"], r["netns"], r["role"]) for n, r in data["nodes"].items()} == {
        "db1": (ADDRESSES["db1"], topo.ns("db1"), "primary"),
        "db2": (ADDRESSES["db2"], topo.ns("db2"), "replica")}
    assert data["control_netns"] == topo.ns("ops") and data["epoch"] == 1
    assert (d / "cluster.json").stat().st_mode & 0o777 == 0o600
    for name in ("db1", "db2"):  # each listens on its own address, in its own namespace
        assert f"--bind-address={ADDRESSES[name]}" in \
            Path(f"/proc/{data['nodes'][name]['pid']}/cmdline").read_bytes().decode().replace("\0", " ")
        assert os.stat(f"/proc/{data['nodes'][name]['pid']}/ns/net").st_ino == \
            os.stat(f"/run/netns/{topo.ns(name)}").st_ino
    print(f"\ncluster up on two hosts: {time.monotonic() - t0:.1f}s")

    app = App(topo, d / "cluster.json", workdir)
    try:
        app.start()
        # reads and writes through the addresses
        status, item, headers = app.write("before")
        assert status == 201 and headers["X-DB-Role"] == "primary", item
        until(lambda: app.request("GET", f"/items/{item['id']}")[2].get("X-DB-Role") == "replica",
              10, "a read served by the replica on db2")

        # db1's cable cut: writes 503 with the JSON error, reads go on
        topo.link("db1", "down")
        t_cut = time.monotonic()

        def refused():
            s, body, _ = app.write("during-cut")
            return (s, body) if s == 503 else None
        status, body = until(refused, 15, "writes answering 503 with db1 cut off")
        assert body["error"]["code"] == "primary_unavailable", body
        assert set(body["error"]) >= {"code", "message", "committed"}
        status, got, headers = app.request("GET", f"/items/{item['id']}")
        assert status == 200 and got["name"] == "before" and headers["X-DB-Role"] == "replica"
        print(f"writes 503 {time.monotonic() - t_cut:.1f}s after the cut")

        # failover from the root namespace (re-executed in ops): writes move to db2
        t_fo = time.monotonic()
        r = cli("failover", "--dir", str(d))
        assert r.returncode == 0, r.stderr
        assert "db2 is the primary" in r.stdout and "db1 is fenced" in r.stdout, r.stdout
        print(f"cluster failover from the root namespace: {time.monotonic() - t_fo:.1f}s")
        data = json.loads((d / "cluster.json").read_text())
        assert data["nodes"]["db1"]["role"] == "fenced" and data["epoch"] == 2
        status, moved, headers = until(lambda: (w := app.write("after-failover"))[0] == 201 and w,
                                       15, "writes taken by db2")
        assert headers["X-DB-Role"] == "primary"
        assert admin_sql(data, topo, "db2", f"SELECT name FROM foobar.items WHERE id = "
                                            f"{int(moved['id'])}") == [{"name": "after-failover"}]
        assert admin_sql(data, topo, "db2", "SELECT epoch, name FROM foobar.cluster_epoch") == \
            [{"epoch": 2, "name": "db2"}]

        # the cable back: db1 comes back writable (nobody could fence it) at epoch 1: stale
        topo.link("db1", "up")
        until(lambda: app.health()["nodes"]["db1"]["state"] == "stale", 15,
              "the app finding db1 stale")
        assert admin_sql(data, topo, "db1", "SELECT @@read_only AS ro") == [{"ro": 0}]
        before = admin_sql(data, topo, "db1", "SELECT @@gtid_binlog_pos AS g")[0]["g"]
        health = app.health()
        assert health["primary"] == "up" and health["nodes"]["db2"]["role"] == "primary"
        assert health["nodes"]["db1"]["role"] == "stale" and health["nodes"]["db1"]["epoch"] == 1
        names = [f"after-return-{i}" for i in range(10)]
        for name in names:
            status, _, headers = app.write(name)
            assert status == 201 and headers["X-DB-Role"] == "primary"
        for _ in range(10):  # reads never go to db1 (its rows stop at the cut)
            status, _, headers = app.request("GET", f"/items/{item['id']}")
            assert status == 200
        assert admin_sql(data, topo, "db1", "SELECT @@gtid_binlog_pos AS g")[0]["g"] == before
        # the writes sent into the cut link were abandoned with a reset: none ran when it came back
        for name in ("db1", "db2"):
            assert admin_sql(data, topo, name, "SELECT COUNT(*) AS n FROM foobar.items "
                                               "WHERE name = 'during-cut'") == [{"n": 0}]
        quoted = ", ".join(f"'{n}'" for n in names)
        assert admin_sql(data, topo, "db1", f"SELECT COUNT(*) AS n FROM foobar.items "
                                            f"WHERE name IN ({quoted})") == [{"n": 0}]
        assert admin_sql(data, topo, "db2", f"SELECT COUNT(*) AS n FROM foobar.items "
                                            f"WHERE name IN ({quoted})") == [{"n": 10}]
        status_out = cli("status", "--dir", str(d))
        assert status_out.returncode == 0, status_out.stderr
        assert re.search(r"^db1 +fenced +10\.214\.9\.31:3306 .* running, stale \(writable at epoch "
                         r"1 < 2: takes no writes; run `cluster rejoin db1`\), read_only=0",
                         status_out.stdout, re.M), status_out.stdout
        stale_logs = [line for line in app.err.read_text().splitlines() if "db1 is stale" in line]
        assert len(stale_logs) == 1, stale_logs

        # rejoin (from the root namespace): db1 a replica of db2, with every write
        r = cli("rejoin", "--dir", str(d), "db1")
        assert r.returncode == 0, r.stderr
        assert "db1 replicates from db2" in r.stdout
        until(lambda: app.health()["nodes"]["db1"]["role"] == "replica", 10,
              "the app seeing db1 as a replica")
        status, _, _ = app.write("after-rejoin")
        assert status == 201
        until(lambda: admin_sql(data, topo, "db1", f"SELECT COUNT(*) AS n FROM foobar.items WHERE "
                                                   f"name IN ({quoted}, 'after-rejoin')")
              == [{"n": 11}], 10, "db1 replicating db2's writes")
        assert admin_sql(data, topo, "db1", "SELECT @@read_only AS ro") == [{"ro": 1}]
        assert admin_sql(data, topo, "db1", "SELECT epoch FROM foobar.cluster_epoch") == \
            [{"epoch": 2}]

        # switchover back (from the root namespace): epoch 3 on db1, the app follows
        r = cli("switchover", "--dir", str(d), "--to", "db1")
        assert r.returncode == 0 and "db1 is the primary" in r.stdout, r.stderr
        status, back, headers = until(lambda: (w := app.write("after-switchover"))[0] == 201 and w,
                                      10, "writes taken by db1 again")
        assert admin_sql(data, topo, "db1", f"SELECT name FROM foobar.items WHERE id = "
                                            f"{int(back['id'])}") == [{"name": "after-switchover"}]
        assert admin_sql(data, topo, "db2", "SELECT epoch, name FROM foobar.cluster_epoch") == \
            [{"epoch": 3, "name": "db1"}]
        # down and start again, from the root namespace: the same nodes in their namespaces
        app.stop()
        assert cli("down", "--dir", str(d)).stdout.strip() == "foobar-app: stopped db2, db1"
        r = cli("start", "--dir", str(d))
        assert r.returncode == 0 and r.stdout.strip() == "foobar-app: started db1, db2", r.stderr
        lines = cli("status", "--dir", str(d)).stdout.splitlines()
        assert re.match(r"db1 +primary +10\.214\.9\.31:3306 .* running, writable, read_only=0, "
                        r"gtid \S+, epoch 3$", lines[0]), lines
        assert re.match(r"db2 +replica +10\.214\.9\.32:3306 .* running, replicating, read_only=1, "
                        r"gtid \S+, epoch 3, from 10\.214\.9\.31:3306, IO thread Yes, SQL thread Yes",
                        lines[1]), lines
        print(f"whole scenario: {time.monotonic() - t0:.1f}s")
    finally:
        app.stop()


def test_host_flags_are_checked_one_line_exit_2(tmp_path):
    """User mistakes in --host and --control-netns: one line, exit 2 (no root needed)."""
    for args, says in (
        (["--host", "db1"], '--host "db1": expected NAME=ADDR[:PORT][@NETNS]'),
        (["--host", "db1=not-an-ip"], "hosts[0].address 'not-an-ip' (db1): expected an IP address"),
        (["--host", "db1=10.0.0.1", "--host", "db1=10.0.0.2"], "hosts[1].name 'db1': named twice"),
        (["--host", "db1=10.0.0.1@fbdbh-no-such-ns"],
         "network namespace 'fbdbh-no-such-ns' not found"),
        (["--host", "db1=10.0.0.1", "--control-netns", "fbdbh-no-such-ns"],
         "network namespace 'fbdbh-no-such-ns' not found"),
        (["--host", "db1=10.0.0.1:0"], "hosts[0].port 0 (db1): expected 1-65535"),
    ):
        r = cli("up", "--dir", str(tmp_path / "c"), *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert len(r.stderr.splitlines()) == 1 and says in r.stderr, (args, r.stderr)
        assert not (tmp_path / "c").exists()


@pytest.mark.mariadb
@pytest.mark.slow
async def test_a_frozen_old_primary_thawed_after_failover_is_stale_on_loopback(tmp_path):
    """The epoch fence without namespaces: the primary frozen (SIGSTOP) is unreachable,
    `failover` promotes the replica; thawed, the old primary is still writable at epoch 1, and
    the app writes to the new primary only."""
    with dbstack.own_cluster(tmp_path) as data:
        pid = data["nodes"]["primary"]["pid"]
        try:
            async with dbstack.app_servers(data, tmp_path, "--heartbeat-interval", "250ms",
                                           count=1) as (server,), \
                    aiohttp.ClientSession() as session:

                async def write(name: str) -> int:
                    async with session.post(f"{server.url}/items", json={"name": name}) as r:
                        return r.status

                async def health() -> dict:
                    async with session.get(f"{server.url}/health") as r:
                        return await r.json()

                assert await write("before") == 201
                dbstack.freeze(pid)
                seen: list[int] = []

                async def refused() -> bool:
                    seen.append(await write("frozen"))
                    return seen[-1] == 503
                await _async_until(refused, 10, "writes 503 with the primary frozen")
                r = dbstack.cli("failover", "--dir", str(data["dir"]))
                assert r.returncode == 0 and "replica-1 is the primary" in r.stdout, r.stderr
                await _async_until(lambda: write("moved"), 10, "writes on replica-1", want=201)
                dbstack.thaw(pid)
                await _async_until(lambda: _state(health, "primary"), 10, "primary stale",
                                   want="stale")
                h = await health()
                assert h["nodes"]["primary"]["role"] == "stale" and h["primary"] == "up"
                assert h["nodes"]["replica-1"]["role"] == "primary"
                assert h["nodes"]["primary"]["detail"] == (
                    "stale: writable at epoch 1 < 2; takes nothing until `cluster rejoin primary`")
                names = [f"thawed-{i}" for i in range(10)]
                for name in names:
                    assert await write(name) == 201
                quoted = ", ".join(f"'{n}'" for n in names)
                assert dbstack.sql(data, "primary", "SELECT @@read_only AS ro") == [{"ro": 0}]
                assert dbstack.count_items(data, "primary", f"name IN ({quoted})") == 0
                assert dbstack.count_items(data, "replica-1", f"name IN ({quoted})") == 10
                status = dbstack.cli("status", "--dir", str(data["dir"])).stdout
                assert re.search(r"^primary +fenced .* running, stale \(writable at epoch 1 < 2",
                                 status, re.M), status
        finally:
            dbstack.thaw(pid)


async def _state(health: Callable, node: str) -> str:
    return (await health())["nodes"][node]["state"]


async def _async_until(probe: Callable, timeout: float, what: str, want: Any = True) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (await probe()) != want:
        if loop.time() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what}")
        await asyncio.sleep(0.05)
