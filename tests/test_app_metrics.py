"""The app server's own `GET /metrics`: Prometheus text read by prometheus_client's parser (an
independent reader), from a real `python -m foobar_app serve` process on a loopback port.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import LOOPBACK, free_port


def families(text: str) -> dict[str, list]:
    """{family name: [samples]} (a counter family is named without its _total)."""
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples, name: str, **labels) -> float:
    """The sum of the samples called `name` whose labels include `labels`."""
    return sum(s.value for s in samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture
def app_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    out = tmp_path / "app.out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "foobar_app", "serve", "--name", "server-7", "--bind",
         f"{LOOPBACK}:{port}", "--db", f"sqlite:///{tmp_path}/app.db", "--readers", "3"],
        stdout=out.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        for _ in range(300):
            if "listening on" in out.read_text() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert proc.poll() is None, out.read_text()
        yield f"http://{LOOPBACK}:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_requests_and_queries_by_role_are_counted_exactly(app_server: str):
    async with aiohttp.ClientSession() as http:
        ids = []
        for i in range(5):  # 5 writes (primary)
            async with http.post(f"{app_server}/items", json={"name": f"n{i}"}) as r:
                assert r.status == 201
                ids.append((await r.json())["id"])
        for i in range(20):  # 20 reads (replica)
            async with http.get(f"{app_server}/items/{ids[i % 5]}") as r:
                assert r.status == 200
        for _ in range(3):  # 3 not found (one read each)
            async with http.get(f"{app_server}/items/999999") as r:
                assert r.status == 404
        async with http.get(f"{app_server}/no/such/route") as r:  # no route: no query
            assert r.status == 404
        async with http.post(f"{app_server}/items", json={"nope": 1}) as r:  # refused: none
            assert r.status == 400
        n = 5 + 20 + 3 + 1 + 1
        async with http.get(f"{app_server}/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await r.text()
        fam = families(text)
        req = fam["foobar_app_requests"]
        assert value(req, "foobar_app_requests_total") == n  # the scrape counts after it
        assert value(req, "foobar_app_requests_total", method="POST", route="/items",
                     code="2xx") == 5
        assert value(req, "foobar_app_requests_total", method="POST", route="/items",
                     code="4xx") == 1
        assert value(req, "foobar_app_requests_total", method="GET", route="/items/{id}",
                     code="2xx") == 20
        assert value(req, "foobar_app_requests_total", method="GET", route="/items/{id}",
                     code="4xx") == 3
        assert value(req, "foobar_app_requests_total", route="unmatched", code="4xx") == 1
        hist = fam["foobar_app_request_duration_seconds"]
        assert value(hist, "foobar_app_request_duration_seconds_count") == n
        assert value(hist, "foobar_app_request_duration_seconds_bucket", route="/items/{id}",
                     le="+Inf") == 23
        assert value(fam["foobar_app_requests_in_flight"], "foobar_app_requests_in_flight") == 1
        q = fam["foobar_app_db_queries"]
        # the primary: the schema's CREATE TABLE at start, then the 5 inserts; the replica:
        # the 23 reads (the 404s looked too)
        assert value(q, "foobar_app_db_queries_total", role="primary", node="primary") == 1 + 5
        assert value(q, "foobar_app_db_queries_total", role="replica", node="replica-1") == 23
        pool = fam["foobar_app_db_pool_connections"]
        assert value(pool, "foobar_app_db_pool_connections", node="replica-1", state="idle") == 3
        assert value(pool, "foobar_app_db_pool_connections", state="in_use") == 0
        most = fam["foobar_app_db_pool_max_connections"]
        assert value(most, "foobar_app_db_pool_max_connections", node="replica-1") == 3
        assert value(most, "foobar_app_db_pool_max_connections", node="primary") == 1
        lag = fam["foobar_app_db_replication_lag_seconds"]
        assert [(s.labels, s.value) for s in lag] == [({"node": "replica-1"}, 0.0)]
        assert value(fam["foobar_app_db_primary_up"], "foobar_app_db_primary_up") == 1
        assert value(fam["foobar_app_info"], "foobar_app_info", server="server-7",
                     dialect="sqlite") == 1
        # the scrape itself is counted once answered
        async with http.get(f"{app_server}/metrics") as r:
            again = families(await r.text())
        assert value(again["foobar_app_requests"], "foobar_app_requests_total",
                     route="/metrics") == 1


async def test_pool_use_shows_connections_lent_to_requests_in_flight(app_server: str):
    """Readers busy with slow requests appear as in use while the requests run."""
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{app_server}/items", json={"name": "x"}) as r:
            assert r.status == 201
        # 200 concurrent list reads over 3 readers: sample the pool while they run
        seen = 0

        async def read() -> None:
            async with http.get(f"{app_server}/items?limit=500") as r:
                assert r.status == 200

        async def scrape() -> None:
            nonlocal seen
            for _ in range(50):
                async with http.get(f"{app_server}/metrics") as r:
                    fam = families(await r.text())
                used = value(fam["foobar_app_db_pool_connections"],
                             "foobar_app_db_pool_connections", node="replica-1", state="in_use")
                seen = max(seen, int(used))
                if seen:
                    return

        await asyncio.gather(scrape(), *(read() for _ in range(200)))
        assert 1 <= seen <= 3


@pytest.mark.mariadb
async def test_on_mariadb_lag_per_replica_queries_by_node_and_pools(tmp_path: Path):
    """A primary and two replicas; replica-2 delayed 3s (`MASTER_DELAY`) against a 1s limit:
    the app's /metrics shows each replica's lag as it measures it, replica-2 lagging."""
    from dbstack import AppServer, own_cluster, sql

    with own_cluster(tmp_path, replicas=2) as data:
        app = AppServer("server-1", data["dir"], tmp_path, "--max-replication-lag", "1s",
                        "--pool-size", "4").start()
        try:
            await app.ready()
            async with aiohttp.ClientSession() as http:

                async def scrape() -> dict[str, list]:
                    async with http.get(f"{app.url}/metrics") as r:
                        assert r.status == 200
                        return families(await r.text())

                fam = await scrape()
                lag = {s.labels["node"]: s.value for s in fam["foobar_app_db_replication_lag_seconds"]}
                assert set(lag) == {"replica-1", "replica-2"}
                assert all(0 <= v < 1 for v in lag.values()), lag
                assert value(fam["foobar_app_db_primary_up"], "foobar_app_db_primary_up") == 1
                most = fam["foobar_app_db_pool_max_connections"]
                assert {s.labels["node"]: s.value for s in most} == {
                    "primary": 4, "replica-1": 4, "replica-2": 4}
                async with http.post(f"{app.url}/items", json={"name": "a"}) as r:
                    assert r.status == 201
                    item = (await r.json())["id"]
                for _ in range(10):
                    async with http.get(f"{app.url}/items/{item}") as r:
                        assert r.status == 200
                q = (await scrape())["foobar_app_db_queries"]
                # reads on the replicas (round robin over the usable ones), by node; the write
                # (and the schema) on the primary
                assert value(q, "foobar_app_db_queries_total", role="replica") == 10
                assert {s.labels["node"] for s in q if s.labels["role"] == "replica"} <= {
                    "replica-1", "replica-2"}
                assert value(q, "foobar_app_db_queries_total", role="primary") >= 2

                sql(data, "replica-2", "STOP SLAVE", "CHANGE MASTER TO MASTER_DELAY=3",
                    "START SLAVE")
                seen: dict = {}

                async def lagging() -> bool:
                    fam = await scrape()
                    seen["lag"] = {s.labels["node"]: s.value
                                   for s in fam["foobar_app_db_replication_lag_seconds"]}
                    seen["state"] = {s.labels["node"]: s.labels["state"]
                                     for s in fam["foobar_app_db_node_state"]}
                    return seen["lag"].get("replica-2", 0) > 1.5

                deadline = asyncio.get_running_loop().time() + 15
                while not await lagging():
                    assert asyncio.get_running_loop().time() < deadline, seen
                    await asyncio.sleep(0.2)
                assert seen["state"]["replica-2"] == "lagging", seen
                assert seen["lag"]["replica-1"] < 1, seen
                usable = {s.labels["node"]: s.value
                          for s in (await scrape())["foobar_app_db_node_usable"]}
                assert usable["replica-2"] == 0 and usable["replica-1"] == 1
        finally:
            app.stop()
