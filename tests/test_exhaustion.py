"""Exhaustion: at the open-file limit and at global maxconn, new connections wait and the ones
held are served; silent connections are cut at `timeout.http_request` without costing others.

The rule these tests hold the proxy to: running out of descriptors or of connection slots
never crashes a process, never spins (a worker waiting at its limit uses under 20% of a CPU,
measured from /proc over a bounded window), never blames a server, and every connection either
waits its turn (in the kernel's listen queue or parked) and is served, or is refused at once.
Descriptors of the master and every worker are counted from /proc before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from procs import LbProcess, cpu_share, fd_count, fd_counts, fds_settle, load

from support import (
    LOOPBACK,
    ScriptedServer,
    free_port,
    http_response,
    lb_config,
    parse_responses,
    running_lb,
)

LIMIT = 256  # the workers' max_open_files in these tests


class Held:
    """A handler that holds every request until `release` is set; counts what it holds."""

    def __init__(self):
        self.release = asyncio.Event()
        self.inflight = 0
        self.peak = 0
        self.changed = asyncio.Event()

    async def __call__(self, req):
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        self.changed.set()
        await self.release.wait()
        self.inflight -= 1
        return http_response(200, b"ok")

    async def settle(self, quiet: float = 0.5, timeout: float = 20.0) -> int:
        """Wait for the first request (when none is held yet: a loaded machine may take longer
        than `quiet` to deliver it), then until no new request arrived for `quiet` seconds: how
        many are held."""
        deadline = time.monotonic() + timeout
        if not self.inflight:
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), timeout)
        while time.monotonic() < deadline:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), quiet)
            except TimeoutError:
                return self.inflight
        raise AssertionError(f"requests kept arriving for {timeout}s")


def cfg_for(port: int, server: ScriptedServer, glob: dict, frontend: dict | None = None) -> dict:
    return {
        "frontends": {"www": {"bind": [f"{LOOPBACK}:{port}"], "default_backend": "app",
                              **(frontend or {})}},
        "backends": {"app": {"servers": [{"name": "s", "address": server.address}],
                             "timeout": {"queue": "30s"},
                             "pool_idle_timeout": "500ms"}},  # (descriptors settle sooner)
        "global": glob,
    }


async def one_request(port: int, out: list, timeout: float = 60.0) -> None:
    """A GET on its own connection (Connection: close): its status, or what went wrong."""
    try:
        r, w = await asyncio.open_connection(LOOPBACK, port)
    except OSError as e:
        out.append(f"connect: {e}")
        return
    try:
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(r.read(), timeout)
        got = parse_responses(data)
        out.append(got[0].status if got else "closed without a response")
    except (OSError, TimeoutError) as e:
        out.append(f"{type(e).__name__}: {e}")
    finally:
        w.close()


def no_traceback(lb: LbProcess) -> None:
    bad = [line for line in lb.err if "Traceback" in line or " died " in line]
    assert not bad, lb.err[-40:]


@pytest.mark.slow
async def test_at_the_open_file_limit_new_connections_wait_and_every_one_is_served(tmp_path):
    held = Held()
    async with ScriptedServer("s", held) as s:
        port = free_port()
        cfg = cfg_for(port, s, {"workers": 1, "max_open_files": LIMIT})
        async with LbProcess(tmp_path, cfg) as lb:
            (worker,) = lb.workers()
            limits = Path(f"/proc/{worker}/limits").read_text()
            assert any(line.startswith("Max open files") and line.split()[3] == str(LIMIT)
                       for line in limits.splitlines()), limits
            pids = [lb.pid, worker]
            base = fd_counts(pids)
            out: list = []
            clients = [asyncio.ensure_future(one_request(port, out)) for _ in range(400)]
            taken = await held.settle()
            # the worker took what its descriptors allow (a client's and a server's each), the
            # rest wait in the listen queue: nothing refused, nothing answered yet
            assert 64 <= taken < LIMIT // 2, taken
            assert out == []
            assert fd_count(worker) <= LIMIT
            await lb.wait_err(r"open-file budget reached: \d+ client connections held "
                              rf"\(budget \d+, open file limit {LIMIT}\)")
            cpu = await cpu_share(worker, 1.5)
            assert cpu < 0.2, cpu
            print(f"\nopen-file limit {LIMIT}: {taken} of 400 held; the worker's CPU while "
                  f"the others waited: {cpu:.1%}")
            held.release.set()
            await asyncio.wait_for(asyncio.gather(*clients), 60)
            assert out == [200] * 400
            assert len(s.requests) == 400
            assert lb.workers() == [worker]  # the same worker throughout
            no_traceback(lb)
            # one log line for the episode, not one per attempt
            assert sum("open-file budget reached" in line for line in lb.err) == 1, lb.err[-20:]
            after = await fds_settle(pids, base)
            print(f"descriptors before {base}, after {after}")
            assert after == base


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs prlimit (util-linux)")
async def test_out_of_descriptors_below_the_budget_accepting_pauses_and_retries_without_spinning(
        tmp_path):
    """The limit lowered under a running worker (prlimit), below what its budget assumed:
    `accept` and server connections fail with EMFILE. The worker pauses accepting and looks
    again (50 ms, doubling to 1 s); a request whose server connection found no descriptor
    waits for one the same way (within `timeout.connect`); all are served once descriptors
    come back."""
    held = Held()
    async with ScriptedServer("s", held) as s:
        port = free_port()
        cfg = cfg_for(port, s, {"workers": 1, "max_open_files": LIMIT})
        cfg["backends"]["app"]["timeout"]["connect"] = "20s"  # (the wait for a descriptor)
        async with LbProcess(tmp_path, cfg) as lb:
            (worker,) = lb.workers()
            subprocess.run(["prlimit", f"--pid={worker}", f"--nofile=120:{LIMIT}"], check=True)
            out: list = []
            clients = [asyncio.ensure_future(one_request(port, out)) for _ in range(200)]
            await lb.wait_err(r"out of descriptors: \d+ client connections held")
            taken = await held.settle()
            assert 0 < taken < 120, taken
            cpu = await cpu_share(worker, 1.5)
            assert cpu < 0.2, cpu
            refused = len(out)
            assert set(out) <= {503}, out
            print(f"\nlimit lowered to 120 under a budget for {LIMIT}: {taken} held, {refused} "
                  f"refused (503), the others waiting; CPU meanwhile: {cpu:.1%}")
            held.release.set()
            await asyncio.wait_for(asyncio.gather(*clients), 60)
            assert sorted(out, key=str) == sorted([503] * refused + [200] * (200 - refused))
            assert 200 - refused >= 100
            assert lb.workers() == [worker]
            no_traceback(lb)
            assert sum("out of descriptors" in line for line in lb.err) == 1, lb.err[-20:]


@pytest.mark.slow
async def test_global_maxconn_ten_over_two_workers_admits_ten_and_then_the_rest(tmp_path):
    held = Held()
    async with ScriptedServer("s", held) as s:
        port = free_port()
        cfg = cfg_for(port, s, {"workers": 2, "maxconn": 10})
        async with LbProcess(tmp_path, cfg) as lb:
            workers = lb.workers()
            assert len(workers) == 2
            out: list = []
            clients = [asyncio.ensure_future(one_request(port, out)) for _ in range(40)]
            assert await held.settle() == 10
            assert out == []
            shares = [await cpu_share(pid, 1.0) for pid in workers]
            assert all(c < 0.2 for c in shares), shares
            print(f"\nmaxconn 10 over 2 workers: 10 of 40 admitted; the workers' CPU while "
                  f"30 waited: {', '.join(f'{c:.1%}' for c in shares)}")
            held.release.set()
            await asyncio.wait_for(asyncio.gather(*clients), 60)
            assert out == [200] * 40
            assert held.peak == 10
            assert lb.workers() == workers
            no_traceback(lb)


@pytest.mark.slow
async def test_a_flood_of_silent_connections_is_cut_at_http_request_and_costs_nothing(tmp_path):
    async with ScriptedServer("s") as s:
        port = free_port()
        cfg = cfg_for(port, s, {"workers": 2}, frontend={"timeout": {"http_request": "1s"}})
        async with LbProcess(tmp_path, cfg) as lb:
            pids = [lb.pid, *lb.workers()]
            base = fd_counts(pids)

            async def silent() -> float:
                t0 = time.monotonic()
                r, w = await asyncio.open_connection(LOOPBACK, port)
                try:
                    got = await asyncio.wait_for(r.read(), 5)
                finally:
                    w.close()
                assert got == b""  # closed without a byte: nothing of a request came
                return time.monotonic() - t0

            flood = [asyncio.ensure_future(silent()) for _ in range(300)]
            res = await load(port, connections=10, requests=1000, fresh_every=2, seconds=30)
            took = await asyncio.gather(*flood)
            assert res.errors == 0, res.failed
            assert res.ok == 1000
            assert all(0.9 <= t <= 3.0 for t in took), (min(took), max(took))
            print(f"\n300 silent connections cut after {min(took):.2f}-{max(took):.2f}s; "
                  f"beside them 1000 requests, all 200")
            after = await fds_settle(pids, base)  # (pooled server connections expire first)
            assert after == base
            no_traceback(lb)


@pytest.mark.slow
async def test_five_thousand_connections_without_a_byte_leave_nothing_behind(tmp_path):
    async with ScriptedServer("s") as s:
        port = free_port()
        cfg = cfg_for(port, s, {"workers": 2})
        async with LbProcess(tmp_path, cfg) as lb:
            pids = [lb.pid, *lb.workers()]
            base = fd_counts(pids)

            async def open_close(n: int) -> None:
                for _ in range(n):
                    _, w = await asyncio.open_connection(LOOPBACK, port)
                    w.close()
                    with contextlib.suppress(OSError):
                        await w.wait_closed()

            serving = asyncio.ensure_future(load(port, connections=4, requests=2000,
                                                 fresh_every=2, seconds=60))
            t0 = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*(open_close(125) for _ in range(40))), 60)
            took = time.monotonic() - t0
            res = await serving
            assert res.errors == 0, res.failed
            assert res.ok == 2000
            stats = await lb.stats()
            assert stats["frontends"]["www"]["connections"] == 5000 + res.connections
            after = await fds_settle(pids, base)
            print(f"\n5000 empty connections in {took:.1f}s beside 2000 requests (all 200); "
                  f"descriptors before {base}, after {after}")
            assert after == base
            no_traceback(lb)


def test_max_open_files_is_checked_like_any_key():
    from foobar_lb.config import ConfigError, parse_config

    base = '[frontends.www]\nbind = "127.0.0.1:0"\ndefault_backend = "app"\n' \
           '[backends.app]\nservers = [{ name = "s", address = "127.0.0.1:1" }]\n'
    assert parse_config(base).settings.max_open_files == 0
    assert parse_config(base + "[global]\nmax_open_files = 256\n").settings.max_open_files == 256
    with pytest.raises(ConfigError, match=r"global.max_open_files = 10: expected an integer "
                                          r"from 64 to 16777216"):
        parse_config(base + "[global]\nmax_open_files = 10\n")


# ---------------------------------------------------------------------------------------------
# Out of descriptors at a server connection (the library, in this process: the test takes the
# descriptors itself): the proxy's problem, never the server's


@contextlib.asynccontextmanager
async def descriptors_used_up():
    """Open /dev/null until this process has no descriptor left, and take any that frees up
    meanwhile (every 5 ms); close them all after."""
    taken: list[int] = []

    def grab() -> None:
        while True:
            try:
                taken.append(os.open(os.devnull, os.O_RDONLY))
            except OSError:
                return

    async def keep() -> None:
        while True:
            await asyncio.sleep(0.005)
            grab()

    grab()
    keeper = asyncio.ensure_future(keep())
    try:
        yield
    finally:
        keeper.cancel()
        for fd in taken:
            os.close(fd)


@contextlib.asynccontextmanager
async def server_process():
    """`python tests/support.py s 0` (the default answers), in its own process: its
    descriptors are not this one's, which a test is about to use up. Yields its address."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).with_name("support.py")), "s", "0",
        stdout=asyncio.subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 10)
        yield f"{LOOPBACK}:{int(line.split()[1])}"
    finally:
        proc.kill()
        await proc.wait()


async def test_out_of_descriptors_a_request_waits_then_503_and_it_is_not_the_servers_fault():
    async with server_process() as address:
        cfg = lb_config([{"name": "s", "address": address, "check": {"inter": "1h"}}],
                        backend={"observe": "layer4", "error_limit": 1,
                                 "timeout": {"connect": "300ms"}})
        async with running_lb(cfg) as lb:
            r, w = await asyncio.open_connection(*lb.address)
            try:
                await asyncio.sleep(0)
                async with descriptors_used_up():
                    w.write(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
                assert head.startswith(b"HTTP/1.1 503 "), head
                server = lb.server("app", "s")
                assert server.state.value == "up"
                assert server.failures == 0
            finally:
                w.close()
            # a descriptor comes back while the request waits for one: it is served
            r2, w2 = await asyncio.open_connection(*lb.address)
            await asyncio.sleep(0)
            async with descriptors_used_up():
                w2.write(b"GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                await asyncio.sleep(0.1)
            got = await asyncio.wait_for(r2.read(), 5)
            assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"s GET /b\n"), got
            w2.close()


async def test_out_of_descriptors_idle_server_connections_are_given_back_and_it_is_served():
    async with server_process() as address:
        cfg = lb_config([address])
        async with running_lb(cfg) as lb:
            # idle connections to the server in the pool (one at least)
            conns = [await asyncio.open_connection(*lb.address) for _ in range(4)]
            for _, w in conns:
                w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            for r, _ in conns:
                assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")
                await r.readexactly(len(b"s GET /\n"))
            pool = lb.backends["app"].pool
            assert pool.count(lb.server("app", "s1")) >= 1
            r, w = conns[0]
            async with descriptors_used_up():
                # not idempotent: a fresh server connection, for which pooled ones are closed
                w.write(b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 200 OK"), head
            assert await r.readexactly(len(b"s POST /p\n")) == b"s POST /p\n"
            assert lb.server("app", "s1").failures == 0
            for _, w in conns:
                w.close()


@pytest.mark.slow
async def test_near_the_budget_accepting_goes_one_by_one_and_back(tmp_path):
    """uvloop's server takes every waiting connection at once; within a listen backlog of the
    budget the worker's own loop takes them one by one (and stops at it); far below it again,
    uvloop's server accepts once more. Every connection is served throughout."""
    held = Held()
    async with ScriptedServer("s", held) as s:
        port = free_port()
        # a budget of (256 - what is open - 32) / 2, about 96 connections: one by one from
        # about 64 (a backlog of 32 below it), all at once again below about 32
        cfg = cfg_for(port, s, {"workers": 1, "max_open_files": LIMIT, "backlog": 32,
                                "log_level": "debug"})
        async with LbProcess(tmp_path, cfg) as lb:
            out: list = []
            clients: list = []
            # in batches smaller than the backlog (a full accept queue drops SYNs: retried later)
            for n in (20, 40, 60, 80):
                clients += [asyncio.ensure_future(one_request(port, out)) for _ in range(20)]
                assert await held.settle(0.3) == n
                if n <= 40:
                    assert not any("one by one" in line for line in lb.err)
            await lb.wait_err(r"near the open-file budget: accepting one by one")
            for _ in range(2):  # 40 more: the budget (about 96) stops the worker short of them
                clients += [asyncio.ensure_future(one_request(port, out)) for _ in range(20)]
                taken = await held.settle(0.3)
            assert 80 < taken < 120, taken
            await lb.wait_err(r"open-file budget reached")
            held.release.set()
            await asyncio.wait_for(asyncio.gather(*clients), 30)
            assert out == [200] * 120
            await lb.wait_err(r"far below the open-file budget: accepting all at once")
            res = await load(port, connections=8, requests=400, fresh_every=2, seconds=30)
            assert res.errors == 0, res.failed
            assert res.ok == 400
            no_traceback(lb)


@pytest.mark.slow
async def test_at_the_open_file_limit_tls_connections_wait_too_and_bad_handshakes_cost_nothing(
        tmp_path):
    trustme = pytest.importorskip("trustme")
    import ssl

    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    cert, key = tmp_path / "site.pem", tmp_path / "site.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    held = Held()
    async with ScriptedServer("s", held) as s:
        port = free_port()
        cfg = cfg_for(port, s, {"workers": 1, "max_open_files": LIMIT},
                      frontend={"tls": {"cert": str(cert), "key": str(key)}})
        async with LbProcess(tmp_path, cfg) as lb:
            (worker,) = lb.workers()
            out: list = []

            async def https() -> None:
                try:
                    r, w = await asyncio.open_connection(LOOPBACK, port, ssl=ctx,
                                                         server_hostname="localhost")
                    w.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                    data = await asyncio.wait_for(r.read(), 60)
                    w.close()
                    got = parse_responses(data)
                    out.append(got[0].status if got else "closed without a response")
                except (OSError, TimeoutError, ssl.SSLError) as e:
                    out.append(f"{type(e).__name__}: {e}")

            clients = [asyncio.ensure_future(https()) for _ in range(150)]
            # plain text to the TLS port: handshakes that fail, waiting among the others
            bad = [asyncio.ensure_future(raw_plain(port)) for _ in range(3)]
            taken = await held.settle()
            assert 64 <= taken < LIMIT // 2, taken
            assert out == []
            await lb.wait_err(r"open-file budget reached")
            held.release.set()
            await asyncio.wait_for(asyncio.gather(*clients), 60)
            assert out == [200] * 150
            assert await asyncio.wait_for(asyncio.gather(*bad), 30) == [b""] * 3
            assert lb.workers() == [worker]
            no_traceback(lb)


async def raw_plain(port: int) -> bytes:
    r, w = await asyncio.open_connection(LOOPBACK, port)
    w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        return await asyncio.wait_for(r.read(), 20)
    except (OSError, TimeoutError):
        return b""
    finally:
        w.close()
