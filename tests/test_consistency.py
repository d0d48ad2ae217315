"""Read-your-writes across app servers: the causal token, made observable on purpose.

A replica delayed by `MASTER_DELAY=2` (and `--max-replication-lag` high, so it stays in use)
makes every read that ignores the token stale: the test proves it can fail (`none`) before it
proves that `session` and `fast` never are. Writes and reads go through the load balancer, to
alternate app servers (its Host rules pin each request to one of them). Each test has its own
cluster and app servers; loads are 40 write-then-read pairs, 10 at a time.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from dbstack import app_servers, count_items, load_balancer, own_cluster, sql, until

pytestmark = pytest.mark.mariadb

PAIRS = 40
AT_ONCE = 10


async def _ready_replicas(servers, data: dict | None = None) -> None:
    """Both app servers see the replica usable (it starts `lagging` until a beat arrives), and
    the replica has the items table (a delayed replica gets it 2 s after the app made it)."""
    if data is not None:
        await until(lambda: sql(data, "replica-1", "SHOW TABLES IN foobar LIKE 'items'"),
                    timeout=15, what="the items table on the replica")
    async with aiohttp.ClientSession() as http:
        for s in servers:
            async def up(s=s) -> bool:
                async with http.get(f"{s.url}/health") as r:
                    return (await r.json())["replicas"] == {"replica-1": "up"}
            ok = False
            for _ in range(200):
                if ok := await up():
                    break
                await asyncio.sleep(0.05)
            assert ok, f"{s.name}: replica never usable"


async def _pairs(url: str, delay_read: float = 0.0, send_token: bool = True) -> list[dict]:
    """PAIRS writes, each followed by a read of the written item through the other server."""
    sem = asyncio.Semaphore(AT_ONCE)
    out: list[dict] = []

    async def pair(http: aiohttp.ClientSession, i: int) -> None:
        writer, reader = ("server-1", "server-2") if i % 2 == 0 else ("server-2", "server-1")
        async with sem:
            async with http.post(f"{url}/items", json={"name": f"causal-{i}"},
                                 headers={"Host": writer}) as r:
                assert r.status == 201, await r.text()
                assert r.headers["X-Served-By"] == writer
                token = r.headers["X-Causal-Token"]
                item = await r.json()
            if delay_read:
                await asyncio.sleep(delay_read)  # the scenario itself: a read 1 s after
            headers = {"Host": reader}
            if send_token:
                headers["X-Causal-Token"] = token
            async with http.get(f"{url}/items/{item['id']}", headers=headers) as r:
                assert r.status in (200, 404), await r.text()
                assert r.headers["X-Served-By"] == reader
                out.append({"stale": r.status == 404, "role": r.headers["X-DB-Role"],
                            "token": token})

    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
        await asyncio.gather(*(pair(http, i) for i in range(PAIRS)))
    assert len(out) == PAIRS
    return out


CASES = {
    "none": ("none", "1s"),
    "session-3s": ("session", "3s"),
    "session-200ms": ("session", "200ms"),
    "fast": ("fast", "1s"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
async def test_causal_reads_with_a_delayed_replica(tmp_path, case):
    mode, timeout = CASES[case]
    with own_cluster(tmp_path) as data:
        sql(data, "replica-1", "STOP SLAVE", "CHANGE MASTER TO MASTER_DELAY=2", "START SLAVE")
        async with app_servers(data, tmp_path, "--causal-reads", mode, "--causal-timeout", timeout,
                               "--max-replication-lag", "30s") as servers:
            await _ready_replicas(servers, data)
            async with load_balancer(servers, by_host=True) as lb:
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                results = await _pairs(lb.url())
                took = loop.time() - t0
                stale = sum(r["stale"] for r in results)
                on_replica = sum(r["role"] == "replica" for r in results)
                print(f"\n{case}: {stale} stale of {PAIRS}, {on_replica} on the replica, "
                      f"{took:.1f}s")
                assert all(r["token"].startswith("0-1-") for r in results)
                if mode == "none":
                    assert stale >= 1  # the token ignored: the delayed replica answers 404
                elif mode == "session" and timeout == "3s":
                    assert stale == 0
                    assert on_replica >= 0.9 * PAIRS  # waited there, under 3 s
                else:  # session 200ms: too short to wait out the delay; fast: never waits
                    assert stale == 0
                    assert on_replica == 0
                if case == "session-3s":
                    await _the_page_carries_its_token_in_a_cookie(lb.url())


async def _the_page_carries_its_token_in_a_cookie(url: str) -> None:
    jar = aiohttp.CookieJar(unsafe=True)  # (a cookie for 127.0.0.1)
    async with aiohttp.ClientSession(cookie_jar=jar) as http:
        async with http.post(f"{url}/items", data={"name": "from the form"},
                             headers={"Host": "server-1"}, allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/"
            token = r.cookies["foobar_causal"].value
            assert token == r.headers["X-Causal-Token"] and token.startswith("0-1-")
        async with http.get(f"{url}/", headers={"Host": "server-2"}) as r:
            page = await r.text()
            assert r.status == 200 and r.headers["X-Served-By"] == "server-2"
            assert "from the form" in page  # the delayed replica alone would not have it


@pytest.mark.slow
async def test_fast_reads_a_second_after_the_write_are_served_by_replicas(tmp_path):
    with own_cluster(tmp_path) as data:
        async with app_servers(data, tmp_path, "--causal-reads", "fast") as servers:
            await _ready_replicas(servers)
            async with load_balancer(servers, by_host=True) as lb:
                results = await _pairs(lb.url(), delay_read=1.0)
                on_replica = sum(r["role"] == "replica" for r in results)
                print(f"\nfast, reads 1 s after: {on_replica} of {PAIRS} on the replica")
                assert sum(r["stale"] for r in results) == 0
                assert on_replica >= 0.9 * PAIRS


async def test_bad_or_unreachable_tokens_never_fail_a_read(tmp_path):
    with own_cluster(tmp_path) as data:
        async with app_servers(data, tmp_path, "--causal-timeout", "300ms",
                               count=1) as (server,):
            await _ready_replicas([server])
            async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
                async with http.post(f"{server.url}/items", json={"name": "t"}) as r:
                    assert r.status == 201
                    token = r.headers["X-Causal-Token"]
                for bad in ("garbage", "0-1-", "1-2-3-4", "0-1-99999999999999999999999",
                            "0-1-5,0-1-6", "-1-1-1", "0-1-1;DROP TABLE items", ""):
                    for how in ("header", "cookie"):
                        kw = ({"headers": {"X-Causal-Token": bad}} if how == "header" else
                              {"headers": {"Cookie": f"foobar_causal={bad}"}})
                        async with http.get(f"{server.url}/items?limit=1", **kw) as r:
                            assert r.status == 200, (bad, how, await r.text())
                            assert r.headers["X-DB-Role"] == "replica"  # ignored: a plain read
                # a well-formed position no replica will reach: waited for, then the primary
                async with http.get(f"{server.url}/items?limit=1",
                                    headers={"X-Causal-Token": "0-1-999999"}) as r:
                    assert r.status == 200 and r.headers["X-DB-Role"] == "primary"
                # spaces after commas, a domain the replica never saw: waited for, the primary
                async with http.get(f"{server.url}/items?limit=1",
                                    headers={"X-Causal-Token": f"{token}, 7-1-5"}) as r:
                    assert r.status == 200 and r.headers["X-DB-Role"] == "primary"
                # a real one: served, and the item is there
                async with http.get(f"{server.url}/items?limit=1",
                                    headers={"X-Causal-Token": token}) as r:
                    assert r.status == 200 and (await r.json())["items"][0]["name"] == "t"


async def test_a_replica_behind_the_schema_answers_no_read_with_500(tmp_path):
    """A replica that lacks the table (delayed behind the app's CREATE TABLE, or broken) says
    1146: the read is retried on the primary, never a 500 `db_error`."""
    with own_cluster(tmp_path) as data:
        sql(data, "replica-1", "STOP SLAVE", "CHANGE MASTER TO MASTER_DELAY=2", "START SLAVE")
        async with app_servers(data, tmp_path, "--max-replication-lag", "60s",
                               count=1) as (server,):
            # the app made the items table at start; the replica is in use (its heartbeat came)
            # two seconds before the table reaches it
            await _ready_replicas([server])
            async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as http:
                async with http.post(f"{server.url}/items", json={"name": "behind"}) as r:
                    assert r.status == 201
                    item = await r.json()
                reads = []
                for path in (f"/items/{item['id']}", "/items?limit=5", "/items/999", "/"):
                    async with http.get(f"{server.url}{path}") as r:
                        reads.append((path, r.status, r.headers.get("X-DB-Role"),
                                      await r.text()))
                # (the replica still lacks the table: every read above met error 1146 there)
                assert sql(data, "replica-1", "SHOW TABLES IN foobar LIKE 'items'") == []
                print(f"\nreads while the replica lacks the table: "
                      f"{[(p, s, role) for p, s, role, _ in reads]}")
                assert [(p, s, role) for p, s, role, _ in reads] == [
                    (f"/items/{item['id']}", 200, "primary"), ("/items?limit=5", 200, "primary"),
                    ("/items/999", 404, "primary"), ("/", 200, "primary")]
                assert '"name": "behind"' in reads[0][3] and "behind" in reads[3][3]

                # caught up, the replica serves again (it was never taken out of use)
                await until(lambda: sql(data, "replica-1", "SELECT COUNT(*) AS n FROM "
                                        "information_schema.TABLES WHERE TABLE_SCHEMA = "
                                        "'foobar' AND TABLE_NAME = 'items'")[0]["n"] == 1,
                            timeout=15, what="the items table on the replica")
                await until(lambda: count_items(data, "replica-1") == 1, timeout=15)
                async with http.get(f"{server.url}/items/{item['id']}") as r:
                    assert r.status == 200 and r.headers["X-DB-Role"] == "replica"

                # a replica that lost the table (broken): the same, for as long as it lacks it
                sql(data, "replica-1", "SET SESSION sql_log_bin = 0", "DROP TABLE foobar.items")
                for _ in range(3):
                    async with http.get(f"{server.url}/items/{item['id']}") as r:
                        assert r.status == 200 and r.headers["X-DB-Role"] == "primary"
                        assert (await r.json())["name"] == "behind"
            assert "db_error" not in server.log() and "database error" not in server.log()
