"""MariaDB: a real primary and replicas with GTID replication, and the router on top of them.

One cluster (a primary and a replica, general logs on) is shared by the tests that only read
and write; tests that stop threads or delay replication start their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from foobar_app import make_app, open_router
from foobar_app.db import DatabaseUnavailable
from foobar_app.db import cluster as cluster_mod
from foobar_app.db.cluster import MariaDBMissing, cluster_down, cluster_up

from support import LOOPBACK, free_port

pytestmark = pytest.mark.mariadb

FAST = {"heartbeat_interval": 0.2, "max_replication_lag": 1.0, "query_timeout": 5.0,
        "replica_rise": 3}


def _need_mariadb() -> None:
    try:
        cluster_mod.find_binaries()
    except MariaDBMissing as e:
        pytest.fail(f"{e} (the README's test command installs it)")


@pytest.fixture(scope="session")
def shared_cluster(tmp_path_factory):
    _need_mariadb()
    d = tmp_path_factory.mktemp("cluster")
    data = cluster_up(d, replicas=1, general_log=True)
    data["dir"] = d
    yield data
    cluster_down(d)


@contextlib.contextmanager
def own_cluster(tmp_path: Path, replicas: int = 1):
    _need_mariadb()
    d = tmp_path / "own"
    data = cluster_up(d, replicas=replicas)
    data["dir"] = d
    try:
        yield data
    finally:
        cluster_down(d)


def admin(data: dict, node: str):
    n = data["nodes"][node]
    return cluster_mod.Node(n["name"], n["role"], n["server_id"], n["port"], n["dir"], n["pid"]).admin()


def sql(data: dict, node: str, *statements: str) -> list[dict]:
    with contextlib.closing(admin(data, node)) as db, db.cursor() as c:
        rows: list[dict] = []
        for s in statements:
            c.execute(s)
            rows = list(c.fetchall())
        return rows


def general_log(data: dict, node: str) -> str:
    return Path(data["nodes"][node]["general_log"]).read_text(errors="replace")


async def until(predicate, timeout: float = 15.0, step: float = 0.05) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not true after {timeout}s")
        await asyncio.sleep(step)


async def wait_logged(data: dict, node: str, marker: str, timeout: float = 10.0) -> None:
    await until(lambda: marker in general_log(data, node), timeout)


@pytest_asyncio.fixture
async def router(shared_cluster):
    db = await open_router(shared_cluster["primary"], shared_cluster["replicas"], **FAST)
    yield db
    await db.close()


# -- the cluster ------------------------------------------------------------------------------------


def test_cluster_replicates_with_gtid_and_binds_the_app_user_with_read_only(shared_cluster):
    data = shared_cluster
    assert json.loads((data["dir"] / "cluster.json").read_text())["primary"] == data["primary"]
    st = sql(data, "replica-1", "SHOW SLAVE STATUS")[0]
    assert st["Slave_IO_Running"] == "Yes" and st["Slave_SQL_Running"] == "Yes"
    assert st["Using_Gtid"] == "Slave_Pos"
    assert sql(data, "replica-1", "SELECT @@read_only AS ro")[0]["ro"] == 1
    grants = " ".join(r[next(iter(r))] for r in sql(data, "primary", "SHOW GRANTS FOR "
                                                    "'foobar'@'127.0.0.1'"))
    assert "SUPER" not in grants and "READ_ONLY ADMIN" not in grants
    # the app user cannot write on a replica: read_only binds it
    import pymysql

    from foobar_app.db.mysql import parse_mysql_dsn

    args = parse_mysql_dsn(data["replicas"][0])
    with contextlib.closing(pymysql.connect(host=args["host"], port=args["port"], user=args["user"],
                                            password=args["password"], database=args["db"])) as db:
        with db.cursor() as c, pytest.raises(pymysql.err.OperationalError, match=r"read-only|1290"):
            c.execute("CREATE TABLE should_fail (a INT)")


def test_cluster_commands_up_status_down_leave_nothing_behind(tmp_path):
    _need_mariadb()
    d = tmp_path / "c"
    run = [sys.executable, "-m", "foobar_app", "cluster"]
    up = subprocess.run([*run, "up", "--dir", str(d), "--replicas", "1"], capture_output=True,
                        text=True, timeout=120)
    assert up.returncode == 0, up.stderr
    data = json.loads(up.stdout)
    assert data == json.loads((d / "cluster.json").read_text())
    assert data["primary"].startswith("mysql://foobar:") and len(data["replicas"]) == 1
    pids = [n["pid"] for n in data["nodes"].values()]
    ports = [n["port"] for n in data["nodes"].values()]
    status = subprocess.run([*run, "status", "--dir", str(d)], capture_output=True, text=True,
                            timeout=30)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0].startswith("primary") and "running" in lines[0]
    assert lines[1].startswith("replica-1") and "IO thread Yes, SQL thread Yes" in lines[1]
    again = subprocess.run([*run, "up", "--dir", str(d)], capture_output=True, text=True, timeout=30)
    assert again.returncode == 2 and "already up" in again.stderr and "Traceback" not in again.stderr
    down = subprocess.run([*run, "down", "--dir", str(d)], capture_output=True, text=True, timeout=60)
    assert down.returncode == 0, down.stderr
    assert "stopped replica-1, primary" in down.stdout
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    for port in ports:
        with socket.socket() as s:
            assert s.connect_ex((LOOPBACK, port)) != 0, f"port {port} still listening"
    status = subprocess.run([*run, "status", "--dir", str(d)], capture_output=True, text=True,
                            timeout=30)
    assert all(line.endswith("stopped") for line in status.stdout.splitlines())


def test_missing_mariadb_is_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setattr(cluster_mod, "SEARCH_DIRS", ())
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(MariaDBMissing, match="install the mariadb-server package"):
        cluster_mod.find_binaries()
    r = subprocess.run([sys.executable, "-c", (
        "import sys; from foobar_app.db import cluster; cluster.SEARCH_DIRS = (); "
        "from foobar_app.cli import main; sys.exit(main(['cluster', 'up', '--dir', 'x']))")],
        capture_output=True, text=True, env={**os.environ, "PATH": str(tmp_path)}, cwd=tmp_path,
        timeout=30)
    assert r.returncode == 2
    assert r.stderr.strip() == ("foobar-app: error: mariadbd and mariadb-install-db not found: install "
                                "the mariadb-server package (apt-get install -y mariadb-server)")


# -- routing, seen on the servers' own general logs ---------------------------------------------------


async def test_routing_as_the_servers_saw_it(router, shared_cluster):
    data = shared_cluster
    m = uuid.uuid4().hex[:10]
    async with router.write() as s:
        await s.execute("CREATE TABLE IF NOT EXISTS route_t (id INT PRIMARY KEY, v VARCHAR(40))")
        await s.execute(f"INSERT INTO route_t VALUES (1, 'w-{m}') ON DUPLICATE KEY UPDATE v = 'w-{m}'")
    await wait_logged(data, "primary", f"w-{m}")
    async with router.read() as s:
        await s.fetchall(f"SELECT v, 'r-{m}' AS marker FROM route_t")
        assert s.role == "replica"
    async with router.transaction() as tx:
        await tx.fetchall(f"SELECT 't1-{m}' AS marker")
        await tx.execute(f"UPDATE route_t SET v = 't2-{m}' WHERE id = 1")
        assert tx.role == "primary"
    async with router.read() as s:
        await s.fetchall(f"SELECT v, 'fu-{m}' AS marker FROM route_t WHERE id = 1 FOR UPDATE")
        assert s.role == "primary"
    await wait_logged(data, "replica-1", f"r-{m}")
    await wait_logged(data, "primary", f"fu-{m}")
    primary, replica = general_log(data, "primary"), general_log(data, "replica-1")
    assert f"r-{m}" in replica and f"r-{m}" not in primary  # the read ran on the replica
    # the write ran on the primary; the replica only applied its row event (not a statement)
    assert f"w-{m}" in primary and f"w-{m}" not in replica
    # the whole transaction on the primary, its read included
    assert f"t1-{m}" in primary and f"t2-{m}" in primary and f"t1-{m}" not in replica
    # a SELECT ... FOR UPDATE under read() went to the primary
    assert f"fu-{m}" in primary and f"fu-{m}" not in replica


async def test_the_app_on_mariadb_splits_reads_and_writes(router, shared_cluster):
    runner = web.AppRunner(make_app("server-m", router))
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    url = f"http://{LOOPBACK}:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/items", json={"name": "on mariadb"}) as r:
                assert r.status == 201 and r.headers["X-DB-Role"] == "primary"
                item = await r.json()
            # the replica catches up quickly; reading our own write may need a moment there
            deadline = time.monotonic() + 10
            while True:
                async with http.get(f"{url}/items/{item['id']}") as r:
                    if r.status == 200:
                        assert r.headers["X-DB-Role"] == "replica"
                        assert (await r.json())["name"] == "on mariadb"
                        break
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            async with http.put(f"{url}/items/{item['id']}", json={"name": "renamed"}) as r:
                assert r.status == 200 and r.headers["X-DB-Role"] == "primary"
            async with http.get(f"{url}/health") as r:
                body = await r.json()
                assert r.status == 200
                assert body["primary"] == "up" and body["replicas"] == {"replica-1": "up"}
    finally:
        await runner.cleanup()


async def test_a_statement_past_query_timeout_is_abandoned_and_its_connection_closed(shared_cluster):
    db = await open_router(shared_cluster["primary"], shared_cluster["replicas"],
                           **{**FAST, "query_timeout": 0.5})
    try:
        from foobar_app.db import PrimaryUnavailable

        t0 = time.monotonic()
        with pytest.raises(PrimaryUnavailable, match=r"statement took over 0\.5s"):
            async with db.write() as s:
                await s.fetchall("SELECT SLEEP(5)")
        assert time.monotonic() - t0 < 3
        async with db.write() as s:  # the pool hands out a working connection afterwards
            assert await s.fetchval("SELECT 1") == 1
    finally:
        await db.close()


# -- lag and broken replication ----------------------------------------------------------------------


@pytest.mark.slow
async def test_delayed_replica_sends_reads_to_the_primary_until_it_catches_up(tmp_path):
    with own_cluster(tmp_path) as data:
        db = await open_router(data["primary"], data["replicas"], **FAST)
        try:
            async def role() -> str:
                async with db.read() as s:
                    await s.fetchval("SELECT 1")
                    return s.role

            replica = db.replicas[0]
            await until(lambda: replica.usable)
            assert await role() == "replica"
            sql(data, "replica-1", "STOP SLAVE", "CHANGE MASTER TO MASTER_DELAY=3", "START SLAVE")
            await until(lambda: replica.state == "lagging", timeout=10)
            assert await role() == "primary"  # no usable replica: reads go to the primary
            assert "behind" in replica.detail
            sql(data, "replica-1", "STOP SLAVE", "CHANGE MASTER TO MASTER_DELAY=0", "START SLAVE")
            # fine again, but on probation: reported "recovering", not "up", while skipped
            await until(lambda: replica.state == "up", timeout=20)
            if not replica.usable:
                assert db.health()["replicas"] == {"replica-1": "recovering"}
                assert await role() == "primary"
            await until(lambda: replica.usable, timeout=20)
            assert db.health()["replicas"] == {"replica-1": "up"}
            assert await role() == "replica"
        finally:
            await db.close()


@pytest.mark.slow
async def test_stopped_or_stalled_io_thread_and_stopped_sql_thread(tmp_path):
    with own_cluster(tmp_path) as data:
        db = await open_router(data["primary"], data["replicas"], **FAST)
        replica = db.replicas[0]
        try:
            await until(lambda: replica.usable)
            # a stalled IO thread because the primary stopped answering (SIGSTOP): the replica's
            # IO thread still says Yes and Seconds_Behind_Master reads 0; the app sees the
            # primary hung, and the replica keeps serving what it has (nothing fresher exists)
            os.kill(data["nodes"]["primary"]["pid"], signal.SIGSTOP)
            try:
                await until(lambda: db.primary.state == "hung", timeout=15)
                await until(lambda: "primary hung" in replica.detail, timeout=5)
                st = sql(data, "replica-1", "SHOW SLAVE STATUS")[0]
                assert st["Slave_IO_Running"] == "Yes"
                assert st["Seconds_Behind_Master"] in (0, None)
                assert replica.usable and db.health()["primary"] == "hung"
            finally:
                os.kill(data["nodes"]["primary"]["pid"], signal.SIGCONT)
            await until(lambda: replica.usable, timeout=20)
            # a stopped IO thread is broken replication
            sql(data, "replica-1", "STOP SLAVE IO_THREAD")
            await until(lambda: replica.state == "broken", timeout=10)
            assert "IO thread" in replica.detail and not replica.usable
            sql(data, "replica-1", "START SLAVE IO_THREAD")
            await until(lambda: replica.usable, timeout=20)
            # a stopped SQL thread is broken replication
            sql(data, "replica-1", "STOP SLAVE SQL_THREAD")
            await until(lambda: replica.state == "broken", timeout=10)
            assert "SQL thread not running" in replica.detail
            assert db.health()["replicas"] == {"replica-1": "broken"}
        finally:
            await db.close()


@pytest.mark.slow
async def test_two_replicas_alternate_and_a_lagging_one_is_left_out(tmp_path):
    with own_cluster(tmp_path, replicas=2) as data:
        db = await open_router(data["primary"], data["replicas"], **FAST)
        try:
            await until(lambda: all(r.usable for r in db.replicas))

            async def server_ids(n: int) -> list[int]:
                out = []
                for _ in range(n):
                    async with db.read() as s:
                        out.append(await s.fetchval("SELECT @@server_id"))
                return out

            ids = await server_ids(6)
            assert set(ids) == {2, 3} and all(a != b for a, b in itertools.pairwise(ids))
            sql(data, "replica-1", "STOP SLAVE", "CHANGE MASTER TO MASTER_DELAY=3", "START SLAVE")
            await until(lambda: db.replicas[0].state == "lagging", timeout=10)
            assert await server_ids(6) == [3] * 6  # all reads on the other replica
        finally:
            await db.close()


async def test_a_dead_primary_makes_writes_503_while_reads_go_on(tmp_path):
    with own_cluster(tmp_path) as data:
        db = await open_router(data["primary"], data["replicas"], **FAST)
        runner = web.AppRunner(make_app("server-p", db))
        await runner.setup()
        site = web.TCPSite(runner, LOOPBACK, 0)
        await site.start()
        url = f"http://{LOOPBACK}:{runner.addresses[0][1]}"
        try:
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{url}/items", json={"name": "before"}) as r:
                    assert r.status == 201
                await until(lambda: db.replicas[0].usable)
                pid = data["nodes"]["primary"]["pid"]
                os.kill(pid, signal.SIGKILL)
                await until(lambda: not db.primary.usable, timeout=10)
                async with http.post(f"{url}/items", json={"name": "after"}) as r:
                    assert r.status == 503
                    assert r.headers["Retry-After"] == "1"
                    assert (await r.json())["error"] == {
                        "code": "primary_unavailable", "field": None, "committed": False,
                        "message": "the primary cannot take this now: the primary (primary) is down"}
                async with http.get(f"{url}/items") as r:
                    assert r.status == 200 and r.headers["X-DB-Role"] == "replica"
                    assert [i["name"] for i in (await r.json())["items"]] == ["before"]
                async with http.get(f"{url}/health") as r:
                    assert r.status == 200 and (await r.json())["primary"] == "down"
        finally:
            await runner.cleanup()


async def test_bad_dsns_are_one_clear_error():
    for dsn, what in (("mysql://u:p@127.0.0.1:1/", "no database"),
                      ("postgres://x/y", "unsupported database DSN")):
        with pytest.raises(ValueError, match=what):
            await open_router(dsn)
    port = free_port()  # nothing listens: the router opens, the primary is simply down
    db = await open_router(f"mysql://u:p@127.0.0.1:{port}/db", **FAST)
    try:
        assert db.primary.status() == "down" and not db.can_read()
        with pytest.raises(DatabaseUnavailable, match="primary"):
            async with db.write() as s:
                await s.execute("SELECT 1")
    finally:
        await db.close()


# -- the whole stack on MariaDB ------------------------------------------------------------------------


def test_the_mysql_stack_example_runs_the_app_on_the_cluster(shared_cluster, tmp_path):
    from test_stack import Stack  # the same process harness as the SQLite stack

    root = Path(__file__).resolve().parent.parent
    ports = (free_port(), free_port(), free_port())
    text = (root / "examples" / "mysql-stack.toml").read_text()
    for old, new in zip(("8080", "8081", "8082"), ports, strict=True):
        text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    cfg = tmp_path / "mysql-stack.toml"
    cfg.write_text(text)
    s = Stack(tmp_path, ["--config", str(cfg), "--data-dir", str(shared_cluster["dir"])]).start()
    try:
        import urllib.error
        import urllib.request

        base = f"http://{LOOPBACK}:{ports[0]}"
        # both app servers' replica monitors see the replica up (3 good checks) before we read
        deadline = time.monotonic() + 15
        up = 0
        while up < 4:  # two in a row from each app server (round robin)
            assert time.monotonic() < deadline, "the replica never came up"
            with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
                up = up + 1 if json.loads(r.read())["replicas"] == {"replica-1": "up"} else 0
            time.sleep(0.05)
        req = urllib.request.Request(f"{base}/items", data=b'{"name": "via the stack"}',
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            assert r.status == 201 and r.headers["X-DB-Role"] == "primary"
            item = json.loads(r.read())
        served = set()
        deadline = time.monotonic() + 10
        while len(served) < 2:
            assert time.monotonic() < deadline
            try:
                with urllib.request.urlopen(f"{base}/items/{item['id']}", timeout=10) as r:
                    assert r.status == 200 and r.headers["X-DB-Role"] == "replica"
                    served.add(r.headers["X-Served-By"])
            except urllib.error.HTTPError as e:  # the replica may be a moment behind
                assert e.code == 404
                time.sleep(0.05)
        with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
            body = json.loads(r.read())
        assert body["primary"] == "up" and body["replicas"] == {"replica-1": "up"}
    finally:
        assert s.stop() == 0
