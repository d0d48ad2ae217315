"""Per-client limits (`rate_limit`, `max_client_connections`): the bucket's arithmetic and the
table without sockets; then real processes and sockets, counted, not timed: a group of 2
workers shares one bucket and one connection count per client, and a reload keeps them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import socket
import time

import pytest

from foobar_lb.config import ConfigError, config_from_dict
from foobar_lb.limits import (
    REFUSED,
    UNTRACKED,
    ClientTable,
    bucket,
    pack_address,
    retry_after,
    too_many_requests,
)
from foobar_lb.shared import F_RATE_LIMITED, Region
from procs import LbProcess, established_to, socket_inodes

from support import (
    LOOPBACK,
    RawClient,
    ScriptedServer,
    complete_responses,
    free_port,
    http_response,
    lb_config,
    parse_responses,
    running_lb,
)

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
LIMIT = {"requests": 1, "per": "1m", "burst": 5}
MASK64 = ((1 << 128) - 1) >> 64 << 64


# -- the bucket, pure -------------------------------------------------------------------------


def test_a_new_client_has_a_full_bucket_and_takes_one():
    assert bucket(0.0, 0.0, 100.0, rate=1 / 60, burst=5) == (4.0, 0.0)


def test_an_empty_bucket_says_how_long_until_a_token():
    tokens, wait = bucket(0.0, 100.0, 100.0, rate=1 / 60, burst=5)
    assert tokens == 0.0 and wait == pytest.approx(60.0)
    tokens, wait = bucket(0.5, 100.0, 100.0, rate=0.1, burst=5)  # half a token: 5 s more
    assert tokens == 0.5 and wait == pytest.approx(5.0)


def test_refill_is_rate_times_elapsed_and_capped_at_burst():
    assert bucket(0.0, 100.0, 130.0, rate=0.1, burst=5) == pytest.approx((2.0, 0.0))
    assert bucket(1.0, 100.0, 10_000.0, rate=0.1, burst=5) == pytest.approx((4.0, 0.0))
    # a clock read earlier than the stamp (another process wrote last) refills nothing
    assert bucket(2.0, 100.0, 99.0, rate=0.1, burst=5) == pytest.approx((1.0, 0.0))


def test_burst_then_steady_rate():
    rate, burst, tokens, stamp = 1.0, 3, 0.0, 0.0
    passed = []
    for i in range(10):  # 10 requests 0.5 s apart at 1/s, burst 3: the first 5 pass (3
        # from the bucket, 2 refilled meanwhile), then one a second
        now = 1000.0 + i * 0.5
        tokens, wait = bucket(tokens, stamp, now, rate, burst)
        stamp = now
        passed.append(wait == 0.0)
    assert passed == [True, True, True, True, True, False, True, False, True, False]


def test_retry_after_is_whole_seconds_and_at_least_one():
    assert retry_after(0.001) == 1
    assert retry_after(1.0) == 1
    assert retry_after(1.2) == 2
    assert retry_after(59.95) == 60


def test_the_429_answer():
    raw = too_many_requests(59.5, keep_alive=True)
    (resp,) = parse_responses(raw)
    assert resp.status == 429
    assert resp.header("retry-after") == "60"
    assert resp.header("connection") == "keep-alive"
    assert b"429 Too Many Requests" in resp.body


def test_ipv6_clients_are_keyed_by_their_prefix():
    a = pack_address(b"2001:db8:1:2:aaaa::1", MASK64)
    assert a == pack_address(b"2001:db8:1:2:ffff:1:2:3", MASK64)
    assert a != pack_address(b"2001:db8:1:3::1", MASK64)
    assert pack_address(b"::ffff:10.1.2.3", MASK64) == pack_address(b"10.1.2.3", MASK64)
    assert pack_address(b"fe80::1%eth0", MASK64) == pack_address(b"fe80::2", MASK64)
    t = ClientTable(64, ipv6_prefix=128, private=True)
    assert t.key(0, b"2001:db8::1")[0] != t.key(0, b"2001:db8::2")[0]


def test_config_keys_and_defaults():
    base = {"backends": {"a": {"servers": [{"address": "127.0.0.1:2"}]}}}
    cfg = config_from_dict({**base, "frontends": {"w": {
        "bind": "127.0.0.1:1", "default_backend": "a", "rate_limit": {"requests": 100, "per": "10s"},
        "max_client_connections": 3}}})
    fe = cfg.frontends["w"]
    assert (fe.rate_limit.requests, fe.rate_limit.per, fe.rate_limit.burst) == (100, 10.0, 100)
    assert fe.max_client_connections == 3
    assert (cfg.settings.limit_table_size, cfg.settings.ipv6_prefix) == (100000, 64)
    with pytest.raises(ConfigError, match=r"rate_limit\.per = \"0s\": expected a duration above"):
        config_from_dict({**base, "frontends": {"w": {
            "bind": "127.0.0.1:1", "default_backend": "a", "rate_limit": {"requests": 1,
                                                                          "per": "0s"}}}})
    with pytest.raises(ConfigError, match=r"frontends\.w\.rate_limit: .*needs mode \"http\""):
        config_from_dict({"backends": {"a": {"mode": "tcp", "servers": [
            {"address": "127.0.0.1:2"}]}}, "frontends": {"w": {
                "bind": "127.0.0.1:1", "mode": "tcp", "default_backend": "a",
                "rate_limit": {"requests": 1}}}})


# -- the table, without sockets ------------------------------------------------------------------


def test_table_five_pass_then_a_wait_of_a_minute():
    t = ClientTable(1000, private=True)
    now = time.monotonic()
    waits = [t.take(7, b"10.0.0.1", 1 / 60, 5, now) for _ in range(6)]
    assert waits[:5] == [0.0] * 5
    assert retry_after(waits[5]) == 60
    assert t.take(8, b"10.0.0.1", 1 / 60, 5, now) == 0.0  # another frontend: its own bucket
    assert t.take(7, b"10.0.0.2", 1 / 60, 5, now) == 0.0  # another client too


def test_table_counts_connections_per_client():
    t = ClientTable(1000, private=True)
    now = time.monotonic()
    a = t.connect(0, b"10.0.0.1", 2, now)
    b = t.connect(0, b"10.0.0.1", 2, now)
    assert a >= 0 and b == a
    assert t.connect(0, b"10.0.0.1", 2, now) == REFUSED
    assert t.connect(0, b"10.0.0.9", 2, now) >= 0
    t.disconnect(a)
    assert t.connect(0, b"10.0.0.1", 2, now) == a


def test_a_flood_of_200000_distinct_clients_keeps_the_table_at_its_bound():
    t = ClientTable(10_000, private=True)
    now = time.monotonic()
    held = t.connect(0, b"192.168.0.1", 5, now)  # a client with an open connection
    limited = [t.take(0, b"192.168.0.2", 1 / 60, 2, now) for _ in range(3)]
    assert limited[-1] > 0
    for i in range(200_000):
        t.take(0, b"10.%d.%d.%d" % (i >> 16, (i >> 8) & 255, i & 255), 1 / 60, 2, now + 1e-6 * i)
    assert t.used() == t.capacity == 10_000
    assert len(t.cache) <= 4096  # the per-process key cache is bounded too
    # an entry with an open connection is never given away; idle ones are
    assert t.lookup(0, b"192.168.0.1")[2] == 1
    t.disconnect(held)
    assert t.lookup(0, b"192.168.0.1")[2] == 0


def test_a_set_whose_ways_all_hold_connections_serves_new_clients_untracked():
    t = ClientTable(8, private=True)  # one set of 8 ways
    now = time.monotonic()
    for i in range(8):
        assert t.connect(0, b"10.0.0.%d" % i, 1, now) >= 0
    assert t.connect(0, b"10.0.1.1", 1, now) == UNTRACKED
    assert t.take(0, b"10.0.1.1", 1 / 60, 1, now) == 0.0  # served, not limited


def test_an_idle_client_is_replaced_before_a_recent_one():
    t = ClientTable(8, private=True)
    now = 1000.0
    for i in range(8):  # 8 clients; client 3 is idle (bucket full again) by now + 100
        t.take(0, b"10.0.0.%d" % i, 1.0 if i == 3 else 1 / 3600, 5, now)
    t.take(0, b"10.0.9.9", 1.0, 5, now + 100)
    assert t.lookup(0, b"10.0.0.3") is None
    assert all(t.lookup(0, b"10.0.0.%d" % i) is not None for i in range(8) if i != 3)


def test_two_mappings_of_one_table_share_it_and_a_dead_lock_holder_does_not_wedge_it():
    master = ClientTable(1000)  # a memfd, as the master makes it
    worker = ClientTable(1000, fd=os.dup(master.region.fd))  # mapped by descriptor
    now = time.monotonic()
    for _ in range(3):
        assert master.take(0, b"10.0.0.1", 1 / 60, 5, now) == 0.0
    for _ in range(2):
        assert worker.take(0, b"10.0.0.1", 1 / 60, 5, now) == 0.0
    assert master.take(0, b"10.0.0.1", 1 / 60, 5, now) > 0
    # a process that dies holding the client's lock (SIGKILL mid-update): the next taker goes on
    _, _, stripe = worker.key(0, b"10.0.0.1")
    pid = os.fork()
    if pid == 0:
        worker._lock(stripe)
        os._exit(0)
    os.waitpid(pid, 0)
    assert worker.take(0, b"10.0.0.1", 1 / 60, 5, now) > 0
    assert master.take(0, b"10.0.0.7", 1 / 60, 5, now) == 0.0
    worker.close()
    master.close()


def test_the_connections_of_a_worker_that_died_are_taken_off_the_table():
    master = ClientTable(1000)
    held = Region(master.held_bytes())
    worker = ClientTable(1000, fd=os.dup(master.region.fd), held_fd=os.dup(held.fd))
    now = time.monotonic()
    kept = master.connect(0, b"10.0.0.1", 3, now)  # another worker's connection: it stays
    for _ in range(2):
        assert worker.connect(0, b"10.0.0.1", 3, now) >= 0
    off = worker.connect(0, b"10.0.0.2", 3, now)
    worker.disconnect(off)  # given back already: not taken off twice
    assert master.connect(0, b"10.0.0.1", 3, now) == REFUSED
    worker.close()  # the worker is gone without giving its two back
    assert master.forget(held) == 2
    assert master.lookup(0, b"10.0.0.1")[2] == 1
    assert master.lookup(0, b"10.0.0.2")[2] == 0
    assert master.forget(held) == 0
    master.disconnect(kept)
    held.close()
    master.close()


# -- in one process (the library) -------------------------------------------------------------


async def test_429_keeps_the_connection_and_tells_when_to_retry():
    async with ScriptedServer("a") as a:
        cfg = lb_config([a.address], frontend={"rate_limit": LIMIT})
        async with running_lb(cfg) as lb, RawClient(*lb.address) as c:
            statuses = []
            for _ in range(7):
                await c.send(GET)
                (resp,) = await c.read_responses(1)
                c.buf = b""
                statuses.append(resp.status)
                if resp.status == 429:
                    assert resp.header("retry-after") in ("59", "60")
                    assert resp.header("connection") is None or (
                        resp.header("connection") == "keep-alive")
            assert statuses == [200] * 5 + [429, 429]
            assert len(a.requests) == 5
            fe = lb.frontends["www"]
            assert fe.ctr[fe.cbase + F_RATE_LIMITED] == 2


async def test_library_max_client_connections():
    async with ScriptedServer("a") as a:
        cfg = lb_config([a.address], frontend={"max_client_connections": 2})
        async with running_lb(cfg) as lb, RawClient(*lb.address) as c1, \
                RawClient(*lb.address) as c2:
            for c in (c1, c2):
                await c.send(GET)
                assert (await c.read_responses(1))[0].status == 200
            async with RawClient(*lb.address) as c3:
                await c3.send(GET)
                assert await c3.closed()
                assert c3.buf == b""
            c1.writer.close()
            await _until(lambda: len(lb.sessions) == 1)
            async with RawClient(*lb.address) as c4:
                await c4.send(GET)
                assert (await c4.read_responses(1))[0].status == 200


async def test_max_client_connections_in_tcp_mode_and_per_address():
    async with ScriptedServer("a") as a:
        cfg = lb_config([a.address], mode="tcp", frontend={"max_client_connections": 1})
        async with running_lb(cfg) as lb:
            port = lb.address[1]
            r1, w1 = await _open(port)
            assert (await _ask(r1, w1)).status == 200
            r2, w2 = await _open(port)
            assert await _refused(r2, w2)
            r3, w3 = await _open(port, "127.0.0.3")  # another client address: its own count
            assert (await _ask(r3, w3)).status == 200
            for w in (w1, w2, w3):
                w.close()


async def _until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- a group of workers ---------------------------------------------------------------------


def _cfg(port: int, server: ScriptedServer, workers: int, frontend: dict) -> dict:
    return {
        "global": {"workers": workers},
        "frontends": {"www": {"bind": [f"{LOOPBACK}:{port}"], "default_backend": "app",
                              **frontend}},
        "backends": {"app": {"servers": [{"name": "a", "address": server.address}]}},
    }


async def _open(port: int, source: str = LOOPBACK) -> tuple[asyncio.StreamReader,
                                                             asyncio.StreamWriter]:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (LOOPBACK, port))
    return await asyncio.open_connection(sock=sock)


def _owner(port: int, writer: asyncio.StreamWriter, workers: list[int]) -> int | None:
    """The worker holding the proxy's side of this client connection."""
    cport = writer.get_extra_info("sockname")[1]
    inodes = {i for i, (remote, _) in established_to(port).items()
              if int(remote.split(":")[1], 16) == cport}
    for pid in workers:
        if socket_inodes(pid) & inodes:
            return pid
    return None


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
    writer.write(GET)
    data = b""
    while True:
        got = complete_responses(data)
        if got:
            return got[0]
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        assert chunk, f"closed: {data!r}"
        data += chunk


async def _refused(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    """The connection was closed without an answer."""
    writer.write(GET)
    try:
        return await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        return True


async def _connections_on_both(port: int, workers: list[int], n: int = 400):
    """Open connections (one request each, kept) until both workers hold one: {pid: (r, w)}.
    (The spread over workers of a shared socket is uneven under light load.)"""
    owners: dict[int, tuple] = {}
    spare = []
    for _ in range(n):
        r, w = await _open(port)
        pid = None
        for _ in range(100):
            pid = _owner(port, w, workers)
            if pid is not None:
                break
            await asyncio.sleep(0.01)
        if pid is not None and pid not in owners:
            owners[pid] = (r, w)
            if len(owners) == len(workers):
                break
        else:
            spare.append(w)
    for w in spare:
        w.close()
    assert len(owners) == len(workers), "the kernel gave every connection to one worker"
    return owners


@pytest.mark.slow
async def test_rate_limit_is_one_bucket_for_two_workers_and_survives_a_reload(tmp_path):
    async with ScriptedServer("a") as a:
        port = free_port()
        async with LbProcess(tmp_path, _cfg(port, a, 2, {"rate_limit": LIMIT})) as lb:
            workers = lb.workers()
            assert len(workers) == 2
            conns = await _connections_on_both(port, workers)
            (r1, w1), (r2, w2) = conns.values()
            # 3 requests through one worker, 2 through the other: all 5 pass
            for r, w in ((r1, w1), (r2, w2), (r1, w1), (r2, w2), (r1, w1)):
                assert (await _ask(r, w)).status == 200
            # the 6th, through either worker, is over the group's limit
            for r, w in ((r2, w2), (r1, w1)):
                resp = await _ask(r, w)
                assert resp.status == 429
                assert resp.header("retry-after") in ("59", "60")
            assert len(a.requests) == 5
            stats = await lb.stats()
            fe = stats["frontends"]["www"]
            assert fe["rate_limited"] == 2 and fe["responses"]["4xx"] == 2
            for _, w in conns.values():
                w.close()

            # a reload: new workers, the same buckets
            rc, _, err = await lb.reload()
            assert rc == 0, err
            new_workers = [p for p in lb.workers() if p not in workers]
            assert len(new_workers) == 2
            r, w = await _open(port)
            resp = await _ask(r, w)
            assert resp.status == 429, "a reload gave the client a fresh bucket"
            assert _owner(port, w, new_workers) is not None
            # another client has its own bucket, held across the reload as well
            r9, w9 = await _open(port, "127.0.0.9")
            for _ in range(5):
                assert (await _ask(r9, w9)).status == 200
            assert (await _ask(r9, w9)).status == 429
            w.close()
            w9.close()


@pytest.mark.slow
async def test_rate_limit_counts_requests_from_before_a_reload(tmp_path):
    async with ScriptedServer("a") as a:
        port = free_port()
        async with LbProcess(tmp_path, _cfg(port, a, 1, {"rate_limit": LIMIT})) as lb:
            r, w = await _open(port)
            for _ in range(3):
                assert (await _ask(r, w)).status == 200
            w.close()
            rc, _, err = await lb.reload()
            assert rc == 0, err
            r, w = await _open(port)
            assert [(await _ask(r, w)).status for _ in range(3)] == [200, 200, 429]
            w.close()


@pytest.mark.slow
async def test_a_killed_worker_does_not_leave_its_clients_at_their_limit(tmp_path):
    async with ScriptedServer("a") as a:
        port = free_port()
        async with LbProcess(tmp_path, _cfg(port, a, 1, {"max_client_connections": 2})) as lb:
            (worker,) = lb.workers()
            held = []
            for _ in range(2):
                r, w = await _open(port)
                assert (await _ask(r, w)).status == 200
                held.append(w)
            r, w = await _open(port)
            assert await _refused(r, w)
            os.kill(worker, signal.SIGKILL)
            await lb.wait_err(r"worker \d+ \(pid \d+\) replaces worker", 20)
            for w in held:
                w.close()
            r, w = await _open(port)
            assert (await _ask(r, w)).status == 200
            r2, w2 = await _open(port)
            assert (await _ask(r2, w2)).status == 200
            w.close()
            w2.close()


@pytest.mark.slow
async def test_max_client_connections_holds_across_two_workers(tmp_path):
    async with ScriptedServer("a") as a:
        port = free_port()
        cfg = _cfg(port, a, 2, {"max_client_connections": 2})
        async with LbProcess(tmp_path, cfg) as lb:
            workers = lb.workers()
            spread = 0
            # each attempt is a new client address (127.0.0.x): two connections that are
            # served, a third that is refused; until the two served ones sat on both workers
            for x in range(2, 60):
                source = f"127.0.0.{x}"
                held = []
                for _ in range(2):
                    r, w = await _open(port, source)
                    assert (await _ask(r, w)).status == 200
                    held.append(w)
                r3, w3 = await _open(port, source)
                assert await _refused(r3, w3)
                w3.close()
                owners = {_owner(port, w, workers) for w in held}
                for w in held:
                    w.close()
                if owners == set(workers):
                    spread += 1
                    if spread == 2:
                        break
            assert spread == 2, "the kernel gave every connection to one worker"
            stats = await lb.stats()
            assert stats["frontends"]["www"]["client_refused"] == x - 1


@pytest.mark.slow
async def test_limit_table_size_cannot_change_on_a_reload(tmp_path):
    async with ScriptedServer("a") as a:
        port = free_port()
        async with LbProcess(tmp_path, _cfg(port, a, 1, {"rate_limit": LIMIT})) as lb:
            lb.config.write_text(lb.config.read_text().replace(
                "[global]\n", "[global]\nlimit_table_size = 500\n"))
            rc, _, err = await lb.reload()
            assert rc == 2
            assert err == (f"foobar-lb: error: {lb.config}: global.limit_table_size: cannot "
                           "change on a reload (restart to change it)\n")


@pytest.mark.slow
async def test_a_flood_of_200000_proxy_v2_addresses_keeps_the_table_at_its_bound(tmp_path):
    """The issue's flood, end to end: 200,000 connections, each with a PROXY v2 header naming
    another client address, against the default `limit_table_size` (100,000). The first
    client's exhausted bucket must have been evicted meanwhile (it is served again), so the
    table did not grow past its bound; and the process is still serving."""
    from foobar_lb.proxy.proxyproto import build_v2

    flood = 200_000
    async with ScriptedServer("a") as a:
        port = free_port()
        frontend = {"accept_proxy": {"from": ["127.0.0.1/32"]},
                    "rate_limit": {"requests": 1, "per": "1h", "burst": 1}}
        async with LbProcess(tmp_path, _cfg(port, a, 1, frontend)) as lb:

            async def once(src: str) -> bytes:
                r, w = await asyncio.open_connection(LOOPBACK, port)
                w.write(build_v2((src, 1000), (LOOPBACK, port))
                        + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                try:
                    return await asyncio.wait_for(r.read(), 10)
                finally:
                    w.close()

            first = "192.0.2.1"
            assert (await once(first)).startswith(b"HTTP/1.1 200 ")
            assert (await once(first)).startswith(b"HTTP/1.1 429 ")
            statuses: dict[bytes, int] = {}

            async def worker(k: int) -> None:
                for i in range(k, flood, 32):
                    got = await once(str(ipaddress.IPv4Address(0x0A000000 + i)))  # distinct clients
                    statuses[got[9:12]] = statuses.get(got[9:12], 0) + 1

            deadline = time.monotonic() + 300
            await asyncio.wait_for(asyncio.gather(*(worker(k) for k in range(32))),
                                   deadline - time.monotonic())
            assert statuses == {b"200": flood}, statuses  # each a new client: a full bucket
            assert (await once(first)).startswith(b"HTTP/1.1 200 "), "the first entry was kept"
            assert lb.proc.returncode is None


async def test_thousands_of_pipelined_requests_answered_429_one_after_another(tmp_path):
    """20,000 GETs in one write behind a slow first one: each later one is a 429 answered at
    once when its turn comes; they are started in a loop, not by recursion (which once hit
    Python's recursion limit and left the connection stuck)."""
    port = free_port()

    async def slow(req):
        await asyncio.sleep(0.3)  # the rest is parsed and queued meanwhile
        return http_response(200, b"ok")

    async with ScriptedServer("a", handler=slow) as a, LbProcess(
            tmp_path, _cfg(port, a, 1, {"rate_limit": {"requests": 1, "per": "1m"}})) as lb:
        reader, writer = await _open(port)
        n = 20_000
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * n)
        got = b""
        async with asyncio.timeout(30):
            while got.count(b"HTTP/1.1 ") < n:
                data = await reader.read(1 << 20)
                assert data, f"closed after {got.count(b'HTTP/1.1 ')} responses"
                got += data
        writer.close()
        assert got.startswith(b"HTTP/1.1 200 ")
        assert got.count(b"HTTP/1.1 429 ") == n - 1
        assert not [ln for ln in lb.err if "Traceback" in ln or "Error" in ln]
