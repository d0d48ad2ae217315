"""The access log ([log] access/format/buffer): one line per request, failed ones included
with their termination state; X-Request-ID kept, replaced or generated, seen by the server and
logged; rotation with SIGUSR1 under load loses no line; a stalled destination with a tiny
buffer drops lines, counts them, and never slows traffic. Also the logs that say what happened
(item 6 of issue 13): a retry names the failed server, why, and the next one; a stop whose grace
ran out says how many requests it cut.

Real sockets throughout; the load balancer as processes (`python -m foobar_lb serve`, 2
workers) where the process model matters (rotation, drops in the master's stats), in-process
(`LoadBalancer`) for the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import struct
import time
from pathlib import Path

import pytest

from procs import LbProcess, load

from support import (
    LOOPBACK,
    ScriptedServer,
    free_port,
    http_get,
    http_response,
    lb_config,
    running_lb,
)

TEXT_LINE = re.compile(
    r"(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<client>\S+) (?P<frontend>\S+) "
    r"(?P<backend>\S+)/(?P<server>\S+) (?P<queue>-1|\d+\.\d{3})/(?P<connect>-1|\d+\.\d{3})/"
    r"(?P<response>-1|\d+\.\d{3})/(?P<total>\d+\.\d{3}) (?P<status>\d{3}|-) (?P<bytes_in>\d+) "
    r"(?P<bytes_out>\d+) (?P<retries>\d+) (?P<term>[-A-Za-z]{2}) (?P<rid>\S+) "
    r'"(?P<method>\S+) (?P<url>\S+) (?P<version>HTTP/1\.[01])"$')
JSON_FIELDS = {"time", "client", "frontend", "backend", "server", "queue_ms", "connect_ms",
               "response_ms", "total_ms", "status", "bytes_in", "bytes_out", "retries", "term",
               "request_id", "method", "url", "version"}
OUR_ID = re.compile(r"[0-9a-f]{12}-[0-9a-f]+")


async def lines_of(*paths: Path, expect: int, timeout: float = 10.0) -> list[str]:
    """The lines of the files, once there are `expect` of them (or the timeout: what is
    there); a few more ms to catch any extra line."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [ln for p in paths if p.exists() for ln in p.read_text().splitlines()]
        if len(lines) >= expect or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.2)
    return [ln for p in paths if p.exists() for ln in p.read_text().splitlines()]


class Closer:
    """A server that reads a request and closes the connection without a byte of answer."""

    async def __aenter__(self) -> Closer:
        async def handle(reader, writer):
            with contextlib.suppress(OSError):
                await reader.read(65536)
            writer.close()

        self.server = await asyncio.start_server(handle, LOOPBACK, 0)
        self.address = f"{LOOPBACK}:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()


def failing_config(ok: str, closer: str, silent: str, log: dict) -> dict:
    """Frontend `www`: / to a working server, /close to one that closes without an answer
    (502), /refused to a port nobody listens on (503), /slow to one that never answers (504
    after 300ms)."""
    return {
        "log": log,
        "frontends": {"www": {"bind": [f"{LOOPBACK}:0"], "default_backend": "app", "rules": [
            {"path_prefix": "/close", "backend": "closer"},
            {"path_prefix": "/refused", "backend": "refused"},
            {"path_prefix": "/slow", "backend": "slow"}]}},
        "backends": {
            "app": {"servers": [{"name": "s1", "address": ok}], "check": False},
            "closer": {"servers": [{"name": "c1", "address": closer}], "check": False},
            "refused": {"servers": [{"name": "r1", "address": f"{LOOPBACK}:{free_port()}"}],
                        "check": False, "timeout": {"connect": "1s"}},
            "slow": {"servers": [{"name": "w1", "address": silent}], "check": False,
                     "timeout": {"server": "300ms"}, "retries": 0},
        },
    }


# -- one line per request, failures included (2 workers, real processes) ---------------------------


@pytest.mark.slow
async def test_one_text_line_per_request_of_a_bounded_load_failed_ones_included(tmp_path):
    log = tmp_path / "access.log"

    async def never(req):
        await asyncio.sleep(3600)

    async with ScriptedServer("ok") as ok, Closer() as closer, ScriptedServer("silent", never) as silent:
        cfg = failing_config(ok.address, closer.address, silent.address,
                             {"access": str(log)})
        async with LbProcess(tmp_path, cfg, "--workers", "2") as lb:
            port = int(re.search(r":(\d+)/", await lb.wait_out("ready: http://")).group(1))
            res = await load(port, connections=12, requests=240)
            assert res.ok == 240, res.failed
            statuses = []
            for path in ["/close", "/refused", "/slow"] * 20:
                statuses.append((await http_get(LOOPBACK, port, path)).status)
            assert statuses == [502, 503, 504] * 20
            lines = await lines_of(log, expect=300)
            stats = await lb.stats()
    assert len(lines) == 300, lines[-5:]
    parsed = [TEXT_LINE.match(ln) for ln in lines]
    assert all(parsed), [ln for ln, m in zip(lines, parsed, strict=True) if not m][:3]
    by_url: dict[str, list[re.Match]] = {}
    for m in parsed:
        by_url.setdefault(m["url"], []).append(m)
    good = by_url["/"]
    assert len(good) == 240
    assert {(m["frontend"], m["backend"], m["server"], m["status"], m["term"]) for m in good} == {
        ("www", "app", "s1", "200", "--")}
    assert all(int(m["bytes_out"]) > 0 and int(m["bytes_in"]) > 0 for m in good)
    assert all(float(m["response"]) >= 0 and float(m["total"]) >= float(m["response"])
               for m in good)
    assert len({m["rid"] for m in parsed}) == 300  # every request its own id
    assert all(OUR_ID.fullmatch(m["rid"]) for m in parsed)
    # the failures: what the client got and why, HAProxy style
    assert {(m["backend"], m["server"], m["status"], m["term"], m["retries"])
            for m in by_url["/close"]} == {("closer", "c1", "502", "SH", "3")}
    assert {(m["backend"], m["server"], m["status"], m["term"], m["retries"])
            for m in by_url["/refused"]} == {("refused", "r1", "503", "SC", "3")}
    assert {(m["backend"], m["server"], m["status"], m["term"])
            for m in by_url["/slow"]} == {("slow", "w1", "504", "sH")}
    assert all(280 <= float(m["total"]) < 2000 for m in by_url["/slow"])
    assert stats["frontends"]["www"]["log_dropped"] == 0


# -- JSON, and the request id ------------------------------------------------------------------


async def test_json_lines_parse_and_carry_every_field_and_the_request_id(tmp_path):
    log = tmp_path / "access.json"
    async with ScriptedServer("s") as srv:
        cfg = lb_config([srv.address], backend={"check": False})
        cfg["log"] = {"access": str(log), "format": "json"}
        async with running_lb(cfg) as lb:
            host, port = lb.address
            kept = await http_get(host, port, "/a?x=1", {"X-Request-ID": "client-id_1.2:3"})
            replaced = await http_get(host, port, "/b", {"X-Request-ID": "bad id"})
            long = await http_get(host, port, "/c", {"X-Request-ID": "x" * 129})
            absent = await http_get(host, port, "/d")
            twice = await raw_twice(host, port)
            assert [r.status for r in (kept, replaced, long, absent)] == [200] * 4
            assert twice.startswith(b"HTTP/1.1 200")
            recs = [json.loads(ln) for ln in await lines_of(log, expect=5)]
    assert len(recs) == 5
    assert all(set(r) == JSON_FIELDS for r in recs)
    seen = {req.url: req.header("x-request-id") for req in srv.requests}
    logged = {r["url"]: r["request_id"] for r in recs}
    assert seen == logged  # the server got what the log says
    assert seen["/a?x=1"] == "client-id_1.2:3"  # valid: kept
    for url in ("/b", "/c", "/d", "/e"):  # invalid, too long, absent, repeated: ours
        assert OUR_ID.fullmatch(seen[url]), (url, seen[url])
    assert len(set(seen.values())) == 5
    assert all(len([v for n, v in req.headers if n.lower() == "x-request-id"]) == 1
               for req in srv.requests)
    r = recs[0]
    assert (r["frontend"], r["backend"], r["server"], r["status"], r["term"], r["method"],
            r["version"], r["retries"]) == ("www", "app", "s1", 200, "--", "GET", "HTTP/1.1", 0)
    assert r["client"].startswith("127.0.0.1:")
    assert r["bytes_out"] > 0 and r["bytes_in"] > 0
    assert 0 <= r["response_ms"] <= r["total_ms"] and r["queue_ms"] == 0


async def raw_twice(host: str, port: int) -> bytes:
    """GET /e with two X-Request-ID fields (not one valid value: replaced)."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /e HTTP/1.1\r\nHost: a\r\nX-Request-ID: one\r\nX-Request-ID: two\r\n"
                 b"Connection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


async def test_the_request_id_is_there_without_an_access_log_on_both_paths():
    async with ScriptedServer("s") as srv:
        async with running_lb(lb_config([srv.address], backend={"check": False})) as lb:
            host, port = lb.address
            await http_get(host, port, "/simple")  # a plain GET: the simple path
            await http_get(host, port, "/full", method="DELETE")  # the full path
            await http_get(host, port, "/kept", {"x-request-id": "abc"})
    ids = [req.header("X-Request-ID") for req in srv.requests]
    assert OUR_ID.fullmatch(ids[0]) and OUR_ID.fullmatch(ids[1]) and ids[2] == "abc"
    assert ids[0] != ids[1]


async def test_requests_the_proxy_refuses_are_logged_too(tmp_path):
    log = tmp_path / "access.log"
    async with ScriptedServer("s") as srv:
        cfg = lb_config([srv.address], backend={"check": False})
        cfg["log"] = {"access": str(log)}
        async with running_lb(cfg) as lb:
            host, port = lb.address
            bad = await http_get(host, port, "/x", {"Host": "a b"})  # an invalid Host
            huge = await http_get(host, port, "/" + "a" * 9000)
            assert (bad.status, huge.status) == (400, 414)
            lines = await lines_of(log, expect=2)
    assert len(lines) == 2
    m = [TEXT_LINE.match(ln) for ln in lines]
    assert all(m), lines
    assert [(x["status"], x["term"], x["backend"], x["server"]) for x in m] == [
        ("400", "PR", "app", "-"), ("414", "PR", "-", "-")]


async def test_a_client_that_goes_away_is_logged_with_its_state(tmp_path):
    log = tmp_path / "access.log"
    arrived = asyncio.Event()

    async def slow(req):
        arrived.set()
        await asyncio.sleep(3600)

    async with ScriptedServer("s", slow) as srv:
        cfg = lb_config([srv.address], backend={"check": False})
        cfg["log"] = {"access": str(log)}
        async with running_lb(cfg) as lb:
            _, writer = await asyncio.open_connection(*lb.address)
            writer.write(b"GET /wait HTTP/1.1\r\nHost: a\r\n\r\n")
            await asyncio.wait_for(arrived.wait(), 5)
            sock = writer.get_extra_info("socket")  # a reset (a FIN is only a half-close)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            lines = await lines_of(log, expect=1)
    m = TEXT_LINE.match(lines[0])
    assert len(lines) == 1 and m, lines
    assert (m["status"], m["term"], m["server"]) == ("-", "CH", "s1")


async def test_time_in_the_queue_is_logged(tmp_path):
    log = tmp_path / "access.log"

    async def slowish(req):
        await asyncio.sleep(0.3)
        return http_response(200, b"ok")

    async with ScriptedServer("s", slowish) as srv:
        cfg = lb_config([{"name": "s1", "address": srv.address, "maxconn": 1}],
                        backend={"check": False})
        cfg["log"] = {"access": str(log)}
        async with running_lb(cfg) as lb:
            got = await asyncio.gather(*(http_get(*lb.address, f"/{i}") for i in range(2)))
            assert [r.status for r in got] == [200, 200]
            lines = await lines_of(log, expect=2)
    m = sorted((TEXT_LINE.match(ln) for ln in lines), key=lambda m: float(m["queue"]))
    assert [x["term"] for x in m] == ["--", "--"]
    assert float(m[0]["queue"]) < 100 <= float(m[1]["queue"]) < 1000  # waited for the first
    assert float(m[1]["total"]) >= 500


async def test_an_upgrade_is_logged_once_when_its_tunnel_closes(tmp_path):
    log = tmp_path / "access.log"

    async def switch(req):
        return (b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                b"Upgrade: websocket\r\n\r\n")

    async with ScriptedServer("s", switch) as srv:
        cfg = lb_config([srv.address], backend={"check": False})
        cfg["log"] = {"access": str(log)}
        async with running_lb(cfg) as lb:
            reader, writer = await asyncio.open_connection(*lb.address)
            writer.write(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                         b"Upgrade: websocket\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert head.startswith(b"HTTP/1.1 101")
            assert not log.exists() or log.read_text() == ""  # not before the tunnel ends
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            lines = await lines_of(log, expect=1)
    m = TEXT_LINE.match(lines[0])
    assert len(lines) == 1 and m, lines
    assert (m["status"], m["term"], m["url"]) == ("101", "--", "/ws")


# -- the logs that say what happened (item 6) --------------------------------------------------


async def test_a_retry_names_the_failed_server_why_and_the_next(caplog):
    dead = f"{LOOPBACK}:{free_port()}"
    async with ScriptedServer("s2") as srv:
        cfg = lb_config([dead, srv.address], backend={"check": False})
        with caplog.at_level(logging.INFO, logger="foobar_lb.http"):
            async with running_lb(cfg) as lb:
                got = await http_get(*lb.address, "/r")
    assert got.status == 200
    assert "retrying GET /r: server app/s1 failed (connection refused), trying app/s2" in (
        caplog.text)


async def test_a_stop_whose_grace_runs_out_logs_the_requests_cut(tmp_path, caplog):
    log = tmp_path / "access.log"
    arrived = asyncio.Event()

    async def slow(req):
        arrived.set()
        await asyncio.sleep(3600)

    async with ScriptedServer("s", slow) as srv:
        cfg = lb_config([srv.address], backend={"check": False})
        cfg["log"] = {"access": str(log)}
        from foobar_lb import LoadBalancer

        lb = LoadBalancer(cfg)
        await lb.start()
        clients = []
        for _ in range(2):
            clients.append(await asyncio.open_connection(*lb.address))
        for _, w in clients:
            w.write(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\n")
        # the second is pipelined behind the first on one connection
        clients[0][1].write(b"GET /behind HTTP/1.1\r\nHost: a\r\n\r\n")
        await asyncio.wait_for(arrived.wait(), 5)
        await asyncio.sleep(0.2)
        with caplog.at_level(logging.WARNING, logger="foobar_lb"):
            await lb.stop(grace=0.3)
        for _, w in clients:
            w.close()
        lines = await lines_of(log, expect=3)
    assert "the grace period ended: cut 3 requests in flight and 2 connections" in caplog.text
    terms = sorted(TEXT_LINE.match(ln)["term"] for ln in lines)
    assert terms == ["KH", "KH", "KR"], lines


@pytest.mark.slow
async def test_a_worker_says_how_many_requests_the_end_of_grace_cut(tmp_path):
    log = tmp_path / "access.log"
    arrived = asyncio.Event()

    async def slow(req):
        arrived.set()
        await asyncio.sleep(3600)

    async with ScriptedServer("s", slow) as srv:
        cfg = lb_config([srv.address], backend={"check": False})
        cfg["global"] = {"grace": "300ms"}
        cfg["log"] = {"access": str(log)}
        lb = LbProcess(tmp_path, cfg, "--workers", "1")
        async with lb:
            port = int(re.search(r":(\d+)/", await lb.wait_out("ready: http://")).group(1))
            _, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.write(b"GET /hang HTTP/1.1\r\nHost: a\r\n\r\nGET /next HTTP/1.1\r\nHost: a\r\n\r\n")
            await asyncio.wait_for(arrived.wait(), 5)
            assert await lb.stop() == 0
            writer.close()
    assert any("the grace period ended: cut 2 requests in flight and 1 connection" in line
               for line in lb.err), lb.err[-5:]
    lines = await lines_of(log, expect=2)
    assert sorted(TEXT_LINE.match(ln)["term"] for ln in lines) == ["KH", "KR"], lines


# -- rotation under load (2 workers) -----------------------------------------------------------


@pytest.mark.slow
async def test_sigusr1_rotation_under_load_loses_no_line(tmp_path):
    log = tmp_path / "access.log"
    async with ScriptedServer("s") as srv:
        cfg = lb_config([srv.address], backend={"check": False})
        cfg["log"] = {"access": str(log), "format": "json"}
        async with LbProcess(tmp_path, cfg, "--workers", "2") as lb:
            port = int(re.search(r":(\d+)/", await lb.wait_out("ready: http://")).group(1))
            n = 3000
            loading = asyncio.ensure_future(load(port, connections=20, requests=n))
            rotated = []
            while not loading.done():  # rename, then SIGUSR1, while the load runs
                await asyncio.sleep(0.1)
                old = tmp_path / f"access.log.{len(rotated)}"
                log.rename(old)
                rotated.append(old)
                os.kill(lb.pid, signal.SIGUSR1)
            res = await loading
            assert res.ok == n, res.failed
            lines = await lines_of(log, *rotated, expect=n)
    assert len(lines) == n
    assert len({json.loads(ln)["request_id"] for ln in lines}) == n
    assert len(rotated) >= 3, "the load ended too soon"
    assert sum(1 for p in rotated if p.stat().st_size) >= 3  # the lines went to each file


# -- a stalled destination: drops, counted; traffic untouched (2 workers) ---------------------------


@pytest.mark.slow
async def test_a_stalled_log_with_a_tiny_buffer_drops_and_counts_and_never_slows_traffic(
        tmp_path):
    fifo = tmp_path / "nobody-reads.fifo"
    os.mkfifo(fifo)  # opening it for writing blocks until a reader comes: none does
    async with ScriptedServer("s") as srv:
        cfg = lb_config([srv.address], backend={"check": False})
        cfg["log"] = {"access": str(fifo), "buffer": 256}
        async with LbProcess(tmp_path, cfg, "--workers", "2") as lb:
            port = int(re.search(r":(\d+)/", await lb.wait_out("ready: http://")).group(1))
            t = time.monotonic()
            res = await load(port, connections=10, requests=300)
            took = time.monotonic() - t
            assert res.ok == 300, res.failed
            assert took < 15, took  # (about a second on a loaded machine: nothing waits)
            stats = await lb.stats()
            dropped = stats["frontends"]["www"]["log_dropped"]
            # each worker holds at most 256 bytes of lines (one or two), the rest is dropped
            # and counted
            assert 300 - 6 <= dropped <= 300, dropped
            # a reader comes: what was held is written, the writers stay stuck no longer
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            try:
                await asyncio.sleep(0.5)
                res = await load(port, connections=2, requests=10)
                assert res.ok == 10
                # every line is either written or counted as dropped
                dropped = (await lb.stats())["frontends"]["www"]["log_dropped"]
                data = b""
                deadline = time.monotonic() + 5
                while data.count(b"\n") < 310 - dropped and time.monotonic() < deadline:
                    with contextlib.suppress(BlockingIOError):
                        data += os.read(fd, 65536)
                    await asyncio.sleep(0.05)
                await asyncio.sleep(0.2)
                with contextlib.suppress(BlockingIOError):
                    data += os.read(fd, 65536)
                assert data.count(b"\n") == 310 - dropped
            finally:
                os.close(fd)


# -- syslog ---------------------------------------------------------------------------------------


async def test_syslog_gets_one_rfc5424_datagram_per_request():
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((LOOPBACK, 0))
    sock.setblocking(False)
    try:
        async with ScriptedServer("s") as srv:
            cfg = lb_config([srv.address], backend={"check": False})
            cfg["log"] = {"access": f"syslog:{LOOPBACK}:{sock.getsockname()[1]}"}
            async with running_lb(cfg) as lb:
                for i in range(3):
                    await http_get(*lb.address, f"/{i}")
                got = []
                deadline = time.monotonic() + 5
                while len(got) < 3 and time.monotonic() < deadline:
                    with contextlib.suppress(BlockingIOError):
                        got.append(sock.recv(65536).decode())
                        continue
                    await asyncio.sleep(0.02)
    finally:
        sock.close()
    assert len(got) == 3
    for i, msg in enumerate(got):
        m = re.match(r"<134>1 \S+Z \S+ foobar_lb \d+ - - (.*)$", msg)
        assert m, msg
        line = TEXT_LINE.match(m.group(1))
        assert line and line["url"] == f"/{i}", msg

