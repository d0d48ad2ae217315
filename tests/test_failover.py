"""Failures of database nodes, and the commands that move the primary role.

Each test has a cluster of its own, real app server processes (or one in this process where
the test needs to sit between the app and the primary), a bounded load, and exact assertions on
what every request got. Node processes are frozen (SIGSTOP), killed (SIGKILL) and restarted
(`cluster start`) by their recorded pids.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time

import aiohttp
import pytest
from aiohttp import web

from dbstack import (
    Load,
    app_servers,
    cli,
    count_items,
    freeze,
    load_balancer,
    mixed_load,
    names_on,
    node,
    own_cluster,
    reload,
    sql,
    thaw,
    until,
)
from foobar_app import make_app, open_router
from foobar_app.app import SCHEMA
from foobar_app.db.cluster import ClusterError, cluster_failover
from foobar_app.db.mysql import parse_mysql_dsn

from support import LOOPBACK

pytestmark = pytest.mark.mariadb

QUERY_TIMEOUT = 2.0
APP_ARGS = ("--query-timeout", f"{QUERY_TIMEOUT:g}s")


async def _health(url: str) -> dict:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/health") as r:
        body = await r.json()
        body["http_status"] = r.status
        return body


async def _poll_health(url: str, predicate, timeout: float = 20.0, what: str = "") -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        body = await _health(url)
        if predicate(body):
            return body
        if loop.time() > deadline:
            raise AssertionError(f"not true after {timeout}s: {what}: {body}")
        await asyncio.sleep(0.05)


async def _post(url: str, name: str) -> tuple[int, dict, dict]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http, \
            http.post(f"{url}/items", json={"name": name}) as r:
        return r.status, await r.json(), dict(r.headers)


async def _until_writes(url: str, name: str, timeout: float = 20.0) -> dict:
    """Poll with writes until one is acknowledged; its headers."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    i = 0
    while True:
        i += 1
        status, body, headers = await _post(url, f"{name}-{i}")
        if status == 201:
            return headers
        assert status == 503 and body["error"]["code"] == "primary_unavailable", body
        if loop.time() > deadline:
            raise AssertionError(f"writes still refused after {timeout}s: {body}")
        await asyncio.sleep(0.05)


def _write_503s_are_primary_unavailable(load: Load) -> None:
    for o in load.failed("write"):
        assert o.status == 503, (o.status, o.body, o.error)
        assert o.headers["Retry-After"] == "1"
        assert o.body["error"]["code"] == "primary_unavailable", o.body
        assert o.body["error"]["committed"] in (False, "unknown"), o.body


# -- a replica dies, the primary dies ---------------------------------------------------------------


@pytest.mark.slow
async def test_a_replica_killed_under_load_fails_no_request_and_comes_back(tmp_path):
    with own_cluster(tmp_path) as data:
        async with app_servers(data, tmp_path, *APP_ARGS, count=1) as (server,):
            await _poll_health(server.url, lambda b: b["replicas"] == {"replica-1": "up"})
            load, stop = Load(), asyncio.Event()
            task = asyncio.ensure_future(mixed_load(server.url, load, stop, limit=2000))
            await until(lambda: len(load.of("read")) >= 50)
            killed_at = asyncio.get_running_loop().time()
            os.kill(data["nodes"]["replica-1"]["pid"], signal.SIGKILL)
            await until(lambda: len(load.of("read", since=killed_at + 1.0)) >= 50)
            stop.set()
            await task
            print(f"\nreplica killed: {load.summary()}")
            assert load.failed("read") == [] and load.failed("write") == []
            after = load.of("read", since=killed_at + 1.0)
            assert after and all(o.headers["X-DB-Role"] == "primary" for o in after)
            # started again, it is used again once it passed its checks
            assert cli("start", "--dir", str(data["dir"])).returncode == 0
            body = await _poll_health(server.url, lambda b: b["replicas"] == {"replica-1": "up"})
            assert body["nodes"]["replica-1"]["role"] == "replica"
            async with aiohttp.ClientSession() as http, \
                    http.get(f"{server.url}/items?limit=1") as r:
                assert r.status == 200 and r.headers["X-DB-Role"] == "replica"


@pytest.mark.slow
async def test_the_primary_killed_writes_503_reads_go_on_and_it_comes_back(tmp_path):
    with own_cluster(tmp_path) as data:
        async with app_servers(data, tmp_path, *APP_ARGS, count=1) as (server,):
            await _poll_health(server.url, lambda b: b["replicas"] == {"replica-1": "up"})
            pid = server.proc.pid
            load, stop = Load(), asyncio.Event()
            task = asyncio.ensure_future(mixed_load(server.url, load, stop, limit=2000))
            await until(lambda: len(load.of("write")) >= 20)
            killed_at = asyncio.get_running_loop().time()
            os.kill(data["nodes"]["primary"]["pid"], signal.SIGKILL)
            await until(lambda: len(load.failed("write", since=killed_at)) >= 20)
            stop.set()
            await task
            print(f"\nprimary killed: {load.summary()}")
            assert load.failed("read") == []
            refused = load.failed("write")
            assert len(refused) >= 20
            _write_503s_are_primary_unavailable(load)
            assert max(o.seconds for o in refused) < QUERY_TIMEOUT + 0.5
            body = await _health(server.url)
            assert body["http_status"] == 200 and body["primary"] == "down"
            assert body["nodes"]["primary"]["state"] == "down"
            assert body["nodes"]["primary"]["role"] == "primary"
            assert re.fullmatch(r"0-1-\d+", body["nodes"]["replica-1"]["gtid"])
            assert server.log().count("primary primary is down") == 1  # once per change
            # started again: writes succeed, the same app server process (no restart)
            assert cli("start", "--dir", str(data["dir"])).returncode == 0
            headers = await _until_writes(server.url, "back")
            assert headers["X-DB-Role"] == "primary" and server.proc.pid == pid
            assert server.proc.poll() is None


# -- hung nodes, through the load balancer -----------------------------------------------------------


@pytest.mark.slow
async def test_a_frozen_primary_or_replica_does_not_take_the_site_down(tmp_path):
    with own_cluster(tmp_path) as data:
        async with app_servers(data, tmp_path, *APP_ARGS) as servers:
            for s in servers:
                await _poll_health(s.url, lambda b: b["replicas"] == {"replica-1": "up"})
            async with load_balancer(servers) as lb:
                downs = []
                lb.on_state_change(lambda ch: downs.append(ch) if ch.new != "up" else None)
                url = lb.url()
                loop = asyncio.get_running_loop()

                # the primary frozen: writes 503 within the query timeout, reads all succeed
                load, stop = Load(), asyncio.Event()
                task = asyncio.ensure_future(mixed_load(url, load, stop, limit=3000))
                await until(lambda: len(load.of("write")) >= 20)
                pid = data["nodes"]["primary"]["pid"]
                frozen_at = loop.time()
                freeze(pid)
                try:
                    await until(lambda: len(load.failed("write", since=frozen_at)) >= 20,
                                timeout=20)
                    await until(lambda: len(load.of("read", since=frozen_at)) >= 200, timeout=20)
                finally:
                    thaw(pid)
                stop.set()
                await task
                print(f"\nprimary frozen: {load.summary()}")
                assert load.failed("read") == []
                _write_503s_are_primary_unavailable(load)
                slowest = max(o.seconds for o in load.of("write", since=frozen_at))
                assert slowest < QUERY_TIMEOUT + 0.5, slowest
                await _until_writes(url, "thawed")

                # a replica frozen: not one request fails
                load, stop = Load(), asyncio.Event()
                task = asyncio.ensure_future(mixed_load(url, load, stop, limit=3000))
                await until(lambda: len(load.of("read")) >= 50)
                pid = data["nodes"]["replica-1"]["pid"]
                frozen_at = loop.time()
                freeze(pid)
                try:
                    await until(lambda: len(load.of("read", since=frozen_at)) >= 200, timeout=20)
                finally:
                    thaw(pid)
                stop.set()
                await task
                print(f"replica frozen: {load.summary()}")
                assert load.failed("read") == [] and load.failed("write") == []
                slowest = max(o.seconds for o in load.of("read", since=frozen_at))
                print(f"slowest read with the replica frozen: {slowest:.2f}s")
                assert slowest < QUERY_TIMEOUT
                assert downs == []  # both app servers stayed up in the load balancer
                assert all(lb.server("app", s.name).state == "up" for s in servers)


# -- a write whose connection is cut after it was sent -------------------------------------------------


class CutProxy:
    """A TCP proxy in front of the primary that, when armed with a statement's text, forwards
    that statement to the server and then cuts the client's connection: the app never hears
    whether it ran."""

    def __init__(self, port: int):
        self.target = port
        self.arm: bytes | None = None
        self.cuts = 0
        self.server: asyncio.AbstractServer | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer) -> None:
        up_r, up_w = await asyncio.open_connection(LOOPBACK, self.target)

        async def pipe(src, dst, client_side: bool) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    if client_side and self.arm is not None and self.arm in data:
                        self.arm = None
                        self.cuts += 1
                        await dst.drain()
                        writer.transport.abort()  # sent; the answer never comes back
                        break
            for w in (writer, up_w):
                w.close()

        await asyncio.gather(pipe(reader, up_w, True), pipe(up_r, writer, False))

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def test_a_write_cut_after_it_was_sent_is_503_committed_unknown_never_retried(tmp_path):
    with own_cluster(tmp_path) as data:
        args = parse_mysql_dsn(data["primary"])
        proxy = CutProxy(args["port"])
        port = await proxy.start()
        through = data["primary"].replace(f":{args['port']}/", f":{port}/")
        db = await open_router(through, data["replicas"], heartbeat_interval=0.2,
                               query_timeout=QUERY_TIMEOUT)
        runner = web.AppRunner(make_app("server-cut", db))
        await runner.setup()
        await web.TCPSite(runner, LOOPBACK, 0).start()
        url = f"http://{LOOPBACK}:{runner.addresses[0][1]}"
        try:
            # an autocommit INSERT (POST /items), the commonest case
            proxy.arm = b"INSERT INTO items"
            status, body, headers = await _post(url, "cut-insert")
            assert proxy.cuts == 1
            assert status == 503 and headers["Retry-After"] == "1"
            assert body["error"]["code"] == "primary_unavailable"
            assert body["error"]["committed"] == "unknown"
            assert "read it back" in body["error"]["message"]
            assert count_items(data, "primary", "name = 'cut-insert'") <= 1  # never retried
            headers = await _until_writes(url, "after-cut")
            assert headers["X-DB-Role"] == "primary"
            # a transaction cut at its COMMIT (PUT /items/ID): unknown too
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{url}/items", json={"name": "to-rename"}) as r:
                    item = await r.json()
                proxy.arm = b"COMMIT"
                async with http.put(f"{url}/items/{item['id']}", json={"name": "renamed"}) as r:
                    body = await r.json()
                    assert r.status == 503 and body["error"]["committed"] == "unknown", body
                await _until_writes(url, "after-commit-cut")
                # cut before its COMMIT was sent: known not committed
                proxy.arm = b"UPDATE items"
                async with http.put(f"{url}/items/{item['id']}", json={"name": "never"}) as r:
                    body = await r.json()
                    assert r.status == 503 and body["error"]["committed"] is False, body
            assert proxy.cuts == 3
            assert count_items(data, "primary", "name = 'never'") == 0
            ran = count_items(data, "primary", "name = 'cut-insert'")
            print(f"\nthe cut INSERT ran {ran} time(s) on the primary")
        finally:
            await runner.cleanup()
            await proxy.close()


# -- roles: fenced, two writable ---------------------------------------------------------------------


async def test_a_read_only_primary_and_two_writable_nodes_are_503_never_500(tmp_path, caplog):
    with own_cluster(tmp_path) as data:
        # a heartbeat so slow that the write meets read_only itself (error 1290) first
        db = await open_router(data["primary"], data["replicas"], heartbeat_interval=30)
        runner = web.AppRunner(make_app("server-ro", db))
        await runner.setup()
        await web.TCPSite(runner, LOOPBACK, 0).start()
        url = f"http://{LOOPBACK}:{runner.addresses[0][1]}"
        try:
            assert (await _post(url, "before"))[0] == 201
            sql(data, "primary", "SET GLOBAL read_only = 1")
            status, body, _ = await _post(url, "fenced")
            assert status == 503 and body["error"]["code"] == "primary_unavailable", body
            assert body["error"]["committed"] is False and "read-only" in body["error"]["message"]
            assert db.primary.status() == "no writable node (every node is read-only or " \
                                          "unreachable)"
            await db.database.check()
            # two writable nodes: no primary, writes refused until one is fenced
            sql(data, "primary", "SET GLOBAL read_only = 0")
            sql(data, "replica-1", "SET GLOBAL read_only = 0")
            await db.database.check()
            await db.database.check()
            status, body, _ = await _post(url, "split")
            assert status == 503 and body["error"]["code"] == "primary_unavailable"
            assert "two writable nodes (primary, replica-1)" in body["error"]["message"]
            assert (await _health(url))["http_status"] == 200
            # logged once per change, not once per check
            said = [r.getMessage() for r in caplog.records if "two writable" in r.getMessage()]
            assert said == ["no primary: two writable nodes (primary, replica-1): writes refused "
                            "until one is fenced (read_only=1)"]
            sql(data, "replica-1", "SET GLOBAL read_only = 1")
            await db.database.check()
            assert (await _post(url, "resolved"))[0] == 201
            assert count_items(data, "primary", "name IN ('fenced', 'split')") == 0
        finally:
            await runner.cleanup()


# -- the cluster commands ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_down_then_start_keeps_the_rows_and_replication_resumes(tmp_path):
    with own_cluster(tmp_path) as data:
        _items(data)
        names = [f"kept-{i}" for i in range(20)]
        sql(data, "primary", *(f"INSERT INTO foobar.items (name, created_at, updated_at) "
                               f"VALUES ('{n}', 'x', 'x')" for n in names))
        assert names_on(data, "primary") == set(names)
        pids = {k: v["pid"] for k, v in data["nodes"].items()}
        down = cli("down", "--dir", str(data["dir"]))
        assert down.returncode == 0 and "stopped replica-1, primary" in down.stdout
        start = cli("start", "--dir", str(data["dir"]))
        assert start.returncode == 0, start.stderr
        assert start.stdout.strip() == "foobar-app: started primary, replica-1"
        data = reload(data)
        assert {k: v["pid"] for k, v in data["nodes"].items()} != pids
        assert names_on(data, "primary") == set(names)
        assert names_on(data, "replica-1") == set(names)
        st = sql(data, "replica-1", "SHOW SLAVE STATUS")[0]
        assert (st["Slave_IO_Running"], st["Slave_SQL_Running"]) == ("Yes", "Yes")
        sql(data, "primary", "INSERT INTO foobar.items (name, created_at, updated_at) "
                             "VALUES ('after-start', 'x', 'x')")
        await until(lambda: "after-start" in names_on(data, "replica-1"))
        # `up` on a stopped cluster starts it too (its data kept), on a running one refuses
        assert cli("down", "--dir", str(data["dir"])).returncode == 0
        up = cli("up", "--dir", str(data["dir"]))
        assert up.returncode == 0, up.stderr
        assert names_on(reload(data), "replica-1") == {*names, "after-start"}
        again = cli("up", "--dir", str(data["dir"]))
        assert again.returncode == 2 and "already up" in again.stderr
        assert "Traceback" not in again.stderr
        status = cli("status", "--dir", str(data["dir"]))
        lines = status.stdout.splitlines()
        assert re.match(r"primary +primary .* running, writable, read_only=0, gtid 0-1-\d+",
                        lines[0]), lines[0]
        assert "running, replicating, read_only=1, gtid 0-1-" in lines[1]
        assert "IO thread Yes, SQL thread Yes" in lines[1]


def _items(data: dict) -> None:
    """Make the items table as the app does."""
    sql(data, "primary", "USE foobar", SCHEMA["mysql"])


@pytest.mark.slow
async def test_switchover_under_write_load_loses_no_acknowledged_write(tmp_path):
    with own_cluster(tmp_path) as data:
        async with app_servers(data, tmp_path, *APP_ARGS) as servers:
            for s in servers:
                await _poll_health(s.url, lambda b: b["replicas"] == {"replica-1": "up"})
            pids = [s.proc.pid for s in servers]
            loads = [Load() for _ in servers]
            stop = asyncio.Event()
            tasks = [asyncio.ensure_future(mixed_load(s.url, ld, stop, workers=3, write_every=1,
                                                      limit=1500, prefix=s.name))
                     for s, ld in zip(servers, loads, strict=True)]
            await until(lambda: all(len(ld.of("write")) >= 20 for ld in loads))
            switched = await asyncio.to_thread(cli, "switchover", "--dir", str(data["dir"]))
            done_at = asyncio.get_running_loop().time()
            assert switched.returncode == 0, switched.stderr
            assert "replica-1 is the primary" in switched.stdout
            # each app server writes to the new primary within 5 s, without a restart
            # replica-1's server_id is 2: the GTIDs it writes are 0-2-N
            for ld in loads:
                await until(lambda ld=ld: any(
                    o.status == 201 and o.headers["X-Causal-Token"].startswith("0-2-")
                    for o in ld.of("write", since=done_at)), timeout=5,
                    what="writes on the new primary")
            moved = asyncio.get_running_loop().time() - done_at
            stop.set()
            await asyncio.gather(*tasks)
            data = reload(data)
            acked = set().union(*(ld.acked_names() for ld in loads))
            print(f"\nswitchover: {switched.stdout.strip()}; both app servers wrote to the new "
                  f"primary {moved:.2f}s after it returned\n"
                  + "\n".join(f"{s.name}: {ld.summary()}" for s, ld in zip(servers, loads,
                                                                            strict=True)))
            for ld in loads:
                _write_503s_are_primary_unavailable(ld)
                assert ld.failed("read") == []
            on_new = names_on(data, "replica-1")
            assert acked - on_new == set()  # every acknowledged write is on the new primary
            assert data["nodes"]["replica-1"]["role"] == "primary"
            assert data["nodes"]["primary"]["role"] == "replica"
            assert data["primary"] == data["nodes"]["replica-1"]["dsn"]
            st = sql(data, "primary", "SHOW SLAVE STATUS")[0]
            assert st["Master_Port"] == data["nodes"]["replica-1"]["port"]
            assert (st["Slave_IO_Running"], st["Slave_SQL_Running"]) == ("Yes", "Yes")
            assert sql(data, "primary", "SELECT @@read_only AS ro")[0]["ro"] == 1
            await until(lambda: acked <= names_on(data, "primary"))
            assert [s.proc.pid for s in servers] == pids
            body = await _health(servers[0].url)
            assert body["nodes"]["replica-1"]["role"] == "primary"
            assert body["nodes"]["primary"]["role"] == "replica"


@pytest.mark.slow
async def test_failover_promotes_the_most_advanced_replica_and_rejoin_refuses_errant(tmp_path):
    with own_cluster(tmp_path, replicas=2) as data:
        _items(data)

        def insert(*names: str) -> None:
            sql(data, "primary", *(f"INSERT INTO foobar.items (name, created_at, updated_at) "
                                   f"VALUES ('{n}', 'x', 'x')" for n in names))

        insert("everywhere")
        await until(lambda: all("everywhere" in names_on(data, r)
                                for r in ("replica-1", "replica-2")))
        sql(data, "replica-2", "STOP SLAVE")
        insert("on-1", "on-1b")
        await until(lambda: {"on-1", "on-1b"} <= names_on(data, "replica-1"))
        sql(data, "replica-1", "STOP SLAVE")
        insert("primary-only-1", "primary-only-2", "primary-only-3")
        os.kill(data["nodes"]["primary"]["pid"], signal.SIGKILL)
        await until(lambda: not node(data, "primary").alive())
        sql(data, "replica-1", "START SLAVE")
        sql(data, "replica-2", "START SLAVE")
        r = cli("failover", "--dir", str(data["dir"]))
        assert r.returncode == 0, r.stderr
        print(f"\nfailover: {r.stdout.strip()}")
        assert "replica-1 is the primary" in r.stdout and "replica-2 repointed" in r.stdout
        assert "3 transaction(s) committed there are not on replica-1 and are lost" in r.stdout
        data = reload(data)
        assert data["nodes"]["replica-1"]["role"] == "primary"
        assert data["nodes"]["primary"]["role"] == "fenced"
        assert data["nodes"]["primary"]["fenced"] is True
        assert sql(data, "replica-1", "SELECT @@read_only AS ro")[0]["ro"] == 0
        st = sql(data, "replica-2", "SHOW SLAVE STATUS")[0]
        assert st["Master_Port"] == data["nodes"]["replica-1"]["port"]
        await until(lambda: {"on-1", "on-1b"} <= names_on(data, "replica-2"))
        # the old primary comes back fenced: read-only, not replicating
        assert cli("start", "--dir", str(data["dir"])).returncode == 0
        data = reload(data)
        assert sql(data, "primary", "SELECT @@read_only AS ro")[0]["ro"] == 1
        assert sql(data, "primary", "SHOW SLAVE STATUS") == []
        status = cli("status", "--dir", str(data["dir"])).stdout
        assert re.search(r"^primary +fenced .* running, fenced, read_only=1", status, re.M), status
        rejoin = cli("rejoin", "--dir", str(data["dir"]), "primary")
        assert rejoin.returncode == 2 and "Traceback" not in rejoin.stderr
        assert rejoin.stderr.startswith("foobar-app: error: rejoin refused: primary has 3 "
                                        "transaction(s) the primary replica-1 lacks")
        assert reload(data)["nodes"]["primary"]["role"] == "fenced"


@pytest.mark.slow
async def test_failover_then_rejoin_of_a_clean_old_primary(tmp_path):
    with own_cluster(tmp_path) as data:
        _items(data)
        sql(data, "primary", "INSERT INTO foobar.items (name, created_at, updated_at) "
                             "VALUES ('one', 'x', 'x')")
        await until(lambda: "one" in names_on(data, "replica-1"))
        refused = cli("failover", "--dir", str(data["dir"]))
        assert refused.returncode == 2 and "use `cluster switchover" in refused.stderr
        os.kill(data["nodes"]["primary"]["pid"], signal.SIGKILL)
        await until(lambda: not node(data, "primary").alive())
        r = cli("failover", "--dir", str(data["dir"]))
        assert r.returncode == 0, r.stderr
        assert "nothing is lost" in r.stdout
        rejoin = cli("rejoin", "--dir", str(data["dir"]), "primary")  # starts it, then rejoins
        assert rejoin.returncode == 0, rejoin.stderr
        assert rejoin.stdout.startswith("foobar-app: primary replicates from replica-1")
        data = reload(data)
        assert data["nodes"]["primary"]["role"] == "replica"
        assert data["replicas"] == [data["nodes"]["primary"]["dsn"]]
        sql(data, "replica-1", "INSERT INTO foobar.items (name, created_at, updated_at) "
                               "VALUES ('two', 'x', 'x')")
        await until(lambda: names_on(data, "primary") == {"one", "two"})
        # and back by a planned switchover to a named node
        bad = cli("switchover", "--dir", str(data["dir"]), "--to", "nosuch")
        assert bad.returncode == 2 and bad.stderr == ("foobar-app: error: --to nosuch: no such node "
                                                      "(nodes: primary, replica-1)\n")
        back = cli("switchover", "--dir", str(data["dir"]), "--to", "primary")
        assert back.returncode == 0, back.stderr
        data = reload(data)
        assert data["nodes"]["primary"]["role"] == "primary"
        assert data["nodes"]["replica-1"]["role"] == "replica"
        assert sql(data, "primary", "SELECT @@read_only AS ro")[0]["ro"] == 0
        st = sql(data, "replica-1", "SHOW SLAVE STATUS")[0]
        assert st["Master_Port"] == data["nodes"]["primary"]["port"]


@pytest.mark.slow
async def test_failover_applies_what_the_replica_received_even_with_its_sql_thread_stopped(
        tmp_path):
    with own_cluster(tmp_path) as data:
        _items(data)
        sql(data, "primary", "INSERT INTO foobar.items (name, created_at, updated_at) "
                             "VALUES ('applied', 'x', 'x')")  # id 1
        await until(lambda: "applied" in names_on(data, "replica-1"))
        sql(data, "replica-1", "STOP SLAVE SQL_THREAD")
        base = int(sql(data, "primary", "SELECT @@gtid_binlog_pos AS p")[0]["p"].split("-")[2])
        relayed = [f"relayed-{i}" for i in range(2, 7)]  # ids 2..6, one transaction each
        sql(data, "primary", *(f"INSERT INTO foobar.items (name, created_at, updated_at) "
                               f"VALUES ('{n}', 'x', 'x')" for n in relayed))
        end = f"0-1-{base + 5}"
        assert sql(data, "primary", "SELECT @@gtid_binlog_pos AS p")[0]["p"] == end
        # the IO thread received all five, the SQL thread applied none
        await until(lambda: sql(data, "replica-1", "SHOW SLAVE STATUS")[0]["Gtid_IO_Pos"] == end)
        assert sql(data, "replica-1", "SELECT @@gtid_slave_pos AS p")[0]["p"] == f"0-1-{base}"
        assert names_on(data, "replica-1") == {"applied"}
        # the 3rd relayed row (id 4) conflicts with one written on the replica alone
        sql(data, "replica-1", "SET SESSION sql_log_bin = 0",
            "INSERT INTO foobar.items (id, name, created_at, updated_at) "
            "VALUES (4, 'conflict', 'x', 'x')")
        os.kill(data["nodes"]["primary"]["pid"], signal.SIGKILL)
        await until(lambda: not node(data, "primary").alive())
        before = (data["dir"] / "cluster.json").read_text()

        # the relay log not applied in time (a session holds the table): bounded, one message
        with contextlib.closing(node(data, "replica-1").admin()) as lock, lock.cursor() as c:
            c.execute("LOCK TABLES foobar.items WRITE")
            t0 = time.monotonic()
            with pytest.raises(ClusterError) as e:
                cluster_failover(data["dir"], timeout=1)
            assert time.monotonic() - t0 < 5
        assert str(e.value) == (f"failover abandoned, nothing promoted: replica-1 still has 5 "
                                f"received transaction(s) to apply after 1s (applied 0-1-{base}, "
                                f"received {end}); run failover again to wait longer")
        assert (data["dir"] / "cluster.json").read_text() == before

        # the SQL thread stops on an error: said in one line, at once, nothing promoted
        t0 = time.monotonic()
        broken = cli("failover", "--dir", str(data["dir"]))
        took = time.monotonic() - t0
        assert broken.returncode == 2 and broken.stdout == "", broken
        assert broken.stderr.count("\n") == 1 and "Traceback" not in broken.stderr
        assert broken.stderr.startswith("foobar-app: error: failover abandoned, nothing promoted: "
                                        "replica-1's SQL thread stopped on error 1062: ")
        assert "Duplicate entry '4'" in broken.stderr
        assert broken.stderr.endswith(
            f"with 3 received transaction(s) not applied (applied 0-1-{base + 2}, received "
            f"{end}); repair its replication, or stop that node to leave it out, and run "
            f"failover again\n")
        assert took < 10
        assert (data["dir"] / "cluster.json").read_text() == before
        assert sql(data, "replica-1", "SELECT @@read_only AS ro")[0]["ro"] == 1

        # repaired: every transaction it received is applied before it is promoted
        sql(data, "replica-1", "SET SESSION sql_log_bin = 0",
            "DELETE FROM foobar.items WHERE id = 4")
        r = cli("failover", "--dir", str(data["dir"]))
        assert r.returncode == 0, r.stderr
        print(f"\nfailover: {r.stdout.strip()}")
        assert f"replica-1 is the primary (at {end})" in r.stdout
        assert f"primary: its binary log ends at {end}, all on replica-1: nothing is lost" \
            in r.stdout
        data = reload(data)
        assert data["nodes"]["replica-1"]["role"] == "primary"
        assert names_on(data, "replica-1") == {"applied", *relayed}
        assert sql(data, "replica-1", "SELECT @@read_only AS ro, @@gtid_slave_pos AS p")[0] == \
            {"ro": 0, "p": end}


@pytest.mark.slow
@pytest.mark.parametrize("semisync", [True, False], ids=["semisync", "async"])
async def test_failover_after_the_primary_is_killed_under_write_load(tmp_path, semisync):
    with own_cluster(tmp_path, semisync=semisync) as data:
        async with app_servers(data, tmp_path, *APP_ARGS, count=1) as (server,):
            await _poll_health(server.url, lambda b: b["replicas"] == {"replica-1": "up"})
            load, stop = Load(), asyncio.Event()
            task = asyncio.ensure_future(mixed_load(server.url, load, stop, workers=8,
                                                    write_every=1, limit=3000, pause=0))
            await until(lambda: len(load.of("write")) >= 200, timeout=30)
            os.kill(data["nodes"]["primary"]["pid"], signal.SIGKILL)
            killed_at = asyncio.get_running_loop().time()
            await until(lambda: len(load.failed("write", since=killed_at)) >= 8)
            stop.set()
            await task
            t0 = time.monotonic()
            r = cli("failover", "--dir", str(data["dir"]))
            took = time.monotonic() - t0
            assert r.returncode == 0, r.stderr
            data = reload(data)
            acked = load.acked_names()
            missing = acked - names_on(data, "replica-1")
            print(f"\n{'semi-sync' if semisync else 'asynchronous'}: {len(acked)} writes "
                  f"acknowledged, {len(missing)} missing on the promoted replica; failover "
                  f"{took:.2f}s\n{r.stdout.strip()}")
            _write_503s_are_primary_unavailable(load)
            if semisync:
                assert missing == set()
            # the app finds the new primary by itself
            headers = await _until_writes(server.url, "after-failover")
            assert headers["X-Causal-Token"].startswith("0-2-")


async def test_a_semisync_fallback_is_logged_once_and_shown_by_status(tmp_path, caplog):
    with own_cluster(tmp_path, semisync=True) as data:
        db = await open_router(data["primary"], data["replicas"], heartbeat_interval=0.2)
        try:
            async with db.write() as s:
                await s.execute("CREATE TABLE t (id INT PRIMARY KEY)")
            await until(lambda: db.primary.semi_sync == "ON", what="semi-sync on")
            assert "semi-sync ON" in cli("status", "--dir", str(data["dir"])).stdout
            sql(data, "replica-1", "STOP SLAVE")
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            async with db.write() as s:  # no replica acknowledges: waits, then falls back
                await s.execute("INSERT INTO t VALUES (1)")
            assert loop.time() - t0 >= 1.5  # the semi-sync timeout (2 s) was waited out
            await until(lambda: db.primary.semi_sync == "OFF", what="fallback seen")
            assert "semi-sync OFF (asynchronous)" in cli("status", "--dir", str(data["dir"])).stdout
            for _ in range(3):
                await db.database.check()
            said = [r.getMessage() for r in caplog.records if "fell back" in r.getMessage()]
            assert said == ["primary primary: semi-synchronous replication fell back to "
                            "asynchronous (no replica acknowledged in time)"]
            sql(data, "replica-1", "START SLAVE")
            await until(lambda: db.primary.semi_sync == "ON", what="semi-sync back on")
        finally:
            await db.close()
