"""Slow clients (issue 14, item 3): each kind is cut by its own deadline with a defined answer, no
server connection stays pinned by it, the memory it holds is bounded by buffers, and the other
clients do not notice.

- a head trickled forever: 408 at `timeout.http_request` (counted from the accept for a first
  request) once any byte of it came; a connection that sent nothing is closed without a byte;
- a body trickled too slowly to ever be idle: 408 when a 5 s window brought less than
  `limits.min_body_rate`; no server is engaged before the body's first 16 KiB (HAProxy's
  http-buffer-request), so such an upload never reaches a server;
- a body that stops: 408 at `timeout.client`, its server connection (if one was engaged) closed;
- a client that does not read its response: cut at `timeout.client`, the server connection
  closed and its slot freed; the proxy's memory for it bounded by its buffers (the server is
  paused), not by the response's size.

Real sockets; the single-behaviour checks run the proxy in-process (`LoadBalancer`, short
timeouts), the ones with numbers (many slow clients beside a load, RSS) run it as processes with
2 workers (`python -m foobar_lb serve`) and count RSS over the master and every worker. Durations
are scaled down with short timeouts (`timeout.client` 2s); the min_body_rate window stays 5 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import time
from pathlib import Path

import pytest

from foobar_lb import ConfigError, parse_config
from procs import LbProcess, LoadResult, load

from support import (
    LOOPBACK,
    ScriptedServer,
    http_get,
    lb_config,
    parse_responses,
    running_lb,
)

BE = '[backends.app]\nservers = [{ address = "127.0.0.1:1" }]\n'
FE = '[frontends.www]\nbind = "127.0.0.1:0"\ndefault_backend = "app"\n'


# -- configuration --------------------------------------------------------------------------------


def test_min_body_rate_is_a_size_a_second_1k_by_default_0_off():
    cfg = parse_config(FE + BE)
    assert cfg.frontends["www"].limits.min_body_rate == 1024
    cfg = parse_config('[defaults.limits]\nmin_body_rate = "2k"\n' + FE + BE)
    assert cfg.frontends["www"].limits.min_body_rate == 2048
    cfg = parse_config('[defaults.limits]\nmin_body_rate = "2k"\n' + FE
                       + "[frontends.www.limits]\nmin_body_rate = 0\n" + BE)
    assert cfg.frontends["www"].limits.min_body_rate == 0
    for bad, shown in (('"fast"', '"fast"'), ("-1", "-1"), ('"1k/s"', '"1k/s"')):
        with pytest.raises(ConfigError) as e:
            parse_config(FE + f"[frontends.www.limits]\nmin_body_rate = {bad}\n" + BE, "lb.toml")
        assert str(e.value) == (f"lb.toml: frontends.www.limits.min_body_rate = {shown}: "
                                'expected a size in bytes or a string with a unit, like 16384, '
                                '"16k" or "10m"')
    with pytest.raises(ConfigError) as e:
        parse_config('[defaults.limits]\nmin_body_rate = true\n' + FE + BE, "lb.toml")
    assert str(e.value).startswith("lb.toml: defaults.limits.min_body_rate = true: expected")


# -- helpers --------------------------------------------------------------------------------------


# how a connection ends that the proxy closed after its answer while the client was still
# sending: a FIN, or a reset when a byte arrived as it closed (the answer was read before it)
ENDED = ("eof", "reset")


async def read_to_end(reader: asyncio.StreamReader, timeout: float) -> tuple[bytes, str]:
    """Everything until the proxy closes: (bytes, "eof" | "reset" | "timeout")."""
    chunks = []
    try:
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except TimeoutError:
        return b"".join(chunks), "timeout"
    except ConnectionResetError:
        return b"".join(chunks), "reset"
    return b"".join(chunks), "eof"


async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float, step: int = 1,
                  stop: asyncio.Event | None = None) -> None:
    """Write `data` `step` bytes at a time, `every` seconds apart, until it is all sent, the
    connection breaks or `stop` is set."""
    with contextlib.suppress(OSError):
        for i in range(0, len(data), step):
            if writer.is_closing() or (stop is not None and stop.is_set()):
                return
            writer.write(data[i:i + step])
            await asyncio.sleep(every)


def access_terms(path: Path) -> list[tuple[str, str]]:
    """(status, termination state) of every access log line."""
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        m = re.search(r" (\d{3}|-) \d+ \d+ \d+ (\S\S) ", line)
        assert m, line
        out.append((m.group(1), m.group(2)))
    return out


async def wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# -- one slow client at a time (in-process, short timeouts) -----------------------------------


async def test_head_trickled_forever_gets_408_at_http_request_from_the_accept(tmp_path):
    """A head whose bytes keep coming (never idle) but never ends, or that stops after `GET`:
    408 at http_request, counted from the accept for a connection's first request; a connection
    that sends nothing is closed at the same deadline without a byte; a later request's head
    gets it from its first byte."""
    alog = tmp_path / "access.log"
    async with ScriptedServer("a") as a:
        cfg = lb_config([a.address], frontend={"timeout": {"http_request": "1s",
                                                           "http_keep_alive": "5s"}})
        cfg["log"] = {"access": str(alog)}
        async with running_lb(cfg) as lb:
            host, port = lb.address
            head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 1000

            async def slow_head(wait_first: float) -> tuple[bytes, str, float]:
                reader, writer = await asyncio.open_connection(host, port)
                t0 = time.monotonic()
                await asyncio.sleep(wait_first)
                task = asyncio.ensure_future(trickle(writer, head, 0.05))
                data, how = await read_to_end(reader, 5.0)
                took = time.monotonic() - t0
                task.cancel()
                writer.close()
                return data, how, took

            async def silent() -> tuple[bytes, str, float]:
                reader, writer = await asyncio.open_connection(host, port)
                t0 = time.monotonic()
                data, how = await read_to_end(reader, 5.0)
                writer.close()
                return data, how, time.monotonic() - t0

            async def second_request_slow() -> tuple[bytes, str, float]:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
                first = await reader.readuntil(b"a GET /first\n")  # its whole response
                await asyncio.sleep(0.6)  # idle (keep-alive), then a second head, trickled
                t0 = time.monotonic()
                task = asyncio.ensure_future(trickle(writer, head, 0.05))
                data, how = await read_to_end(reader, 5.0)
                task.cancel()
                writer.close()
                return first + data, how, time.monotonic() - t0

            async def stalled() -> tuple[bytes, str, float]:
                reader, writer = await asyncio.open_connection(host, port)
                t0 = time.monotonic()
                writer.write(b"GET")
                data, how = await read_to_end(reader, 5.0)
                writer.close()
                return data, how, time.monotonic() - t0

            (d1, h1, t1), (d2, h2, t2), (d3, h3, t3), (d4, h4, t4), (d5, h5, t5) = (
                await asyncio.gather(slow_head(0.0), slow_head(0.7), silent(),
                                     second_request_slow(), stalled()))
    for data, how, took in ((d1, h1, t1), (d2, h2, t2), (d5, h5, t5)):
        (resp,) = parse_responses(data)
        assert (resp.status, resp.header("connection"), how in ENDED) == (408, "close", True)
        assert 0.95 <= took < 1.5, took  # from the accept, even when its first byte came late
    assert (d3, h3) == (b"", "eof") and 0.95 <= t3 < 1.6, (d3, t3)
    ok, cut = parse_responses(d4)
    assert (ok.status, cut.status, h4 in ENDED) == (200, 408, True)
    assert 0.95 <= t4 < 1.6, t4  # from its own first byte: it was idle 0.6 s before
    assert a.connections == 1 and [r.url for r in a.requests] == ["/first"]
    await wait_for(lambda: len(access_terms(alog)) >= 5)
    assert sorted(access_terms(alog)) == [("200", "--"), *[("408", "cR")] * 4]


async def test_body_that_stops_gets_408_at_timeout_client_and_its_server_connection_closed(
        tmp_path):
    """A body that stops: 408 `timeout.client` after its last byte. Before its first 16 KiB no
    server was engaged; after them the server connection that took the start is closed (not
    pooled) and its slot is free again (a request to a maxconn 1 server goes through)."""
    alog = tmp_path / "access.log"
    async with ScriptedServer("a") as a:
        cfg = lb_config([{"name": "s1", "address": a.address, "maxconn": 1}],
                        frontend={"timeout": {"client": "1s"}})
        cfg["log"] = {"access": str(alog)}
        async with running_lb(cfg) as lb:
            host, port = lb.address

            async def stops_after(n: int) -> tuple[bytes, str, float]:
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                             + b"b" * n)
                await writer.drain()
                t0 = time.monotonic()
                data, how = await read_to_end(reader, 5.0)
                writer.close()
                return data, how, time.monotonic() - t0

            data, how, took = await stops_after(1000)
            assert a.connections == 0  # the body never reached its first buffer
            (resp,) = parse_responses(data)
            assert (resp.status, how) == (408, "eof") and 0.95 <= took < 1.6, took
            data, how, took = await stops_after(20000)
            (resp,) = parse_responses(data)
            assert (resp.status, how) == (408, "eof") and 0.95 <= took < 1.6, took
            assert a.connections == 1  # the server had the start of it ...
            await wait_for(lambda: a.open_connections == 0)  # ... and the connection is closed
            assert a.requests == []  # (it never got a whole request)
            assert (await http_get(host, port, "/after")).status == 200  # the slot is free
    await wait_for(lambda: len(access_terms(alog)) >= 3)
    assert access_terms(alog) == [("408", "cR"), ("408", "cR"), ("200", "--")]


async def test_a_body_the_server_does_not_take_is_the_servers_timeout_not_the_clients(tmp_path):
    """A fast client whose body the server stops reading is paused by the proxy: neither
    timeout.client (1s) nor min_body_rate cuts it for that; the server's timeout (2s) does,
    with 504, and the server connection is closed."""
    alog = tmp_path / "access.log"
    reading = asyncio.Event()
    conns = []

    async def never_reads(reader, writer):
        conns.append(reader)
        await reader.readuntil(b"\r\n\r\n")
        reading.set()
        await asyncio.sleep(30)

    server = await asyncio.start_server(never_reads, LOOPBACK, 0)
    address = f"{LOOPBACK}:{server.sockets[0].getsockname()[1]}"
    try:
        cfg = lb_config([address], frontend={"timeout": {"client": "1s"}},
                        backend={"timeout": {"server": "2s"}, "retries": 0})
        cfg["log"] = {"access": str(alog)}
        async with running_lb(cfg) as lb:
            reader, writer = await asyncio.open_connection(*lb.address)
            size = 1 << 30
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
            piece = b"p" * (1 << 20)

            async def send() -> None:
                with contextlib.suppress(OSError):
                    for _ in range(size // len(piece)):
                        writer.write(piece)
                        await writer.drain()

            task = asyncio.ensure_future(send())
            await reading.wait()
            t0 = time.monotonic()
            data, how = await read_to_end(reader, 8.0)
            took = time.monotonic() - t0
            task.cancel()
            writer.close()
        await wait_for(lambda: len(access_terms(alog)) >= 1)
        assert access_terms(alog) == [("504", "sH")]
        assert how in ("eof", "reset") and 1.9 <= took < 3.0, (how, took)
        if data:  # (the close may reset the connection before the client reads its 504)
            assert parse_responses(data)[0].status == 504
        _, end = await read_to_end(conns[0], 5.0)  # what the server left unread, then the close
        assert (len(conns), end in ENDED) == (1, True)
    finally:
        server.close()


async def test_a_body_the_server_takes_late_is_not_blamed_on_the_client():
    """A server that reads nothing for 3 s, then the whole 8 MiB body: the client, paused by
    the proxy meanwhile, is neither timed out (timeout.client 1s) nor judged too slow
    (min_body_rate) for it; its deadlines start again when the proxy reads again: 200."""

    async def late_reader(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(3.0)
        size = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
        await reader.readexactly(size)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(late_reader, LOOPBACK, 0)
    try:
        cfg = lb_config([f"{LOOPBACK}:{server.sockets[0].getsockname()[1]}"],
                        frontend={"timeout": {"client": "1s"}},
                        backend={"timeout": {"server": "10s"}})
        async with running_lb(cfg) as lb:
            reader, writer = await asyncio.open_connection(*lb.address)
            size = 8 << 20
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n" % size)
            piece = b"p" * (1 << 20)

            async def send() -> None:
                for _ in range(size // len(piece)):
                    writer.write(piece)
                    await writer.drain()

            t0 = time.monotonic()
            sent = asyncio.ensure_future(send())
            data, how = await read_to_end(reader, 10.0)
            took = time.monotonic() - t0
            await sent
            writer.close()
        (resp,) = parse_responses(data)
        assert (resp.status, resp.body, how) == (200, b"ok\n", "eof") and took >= 3.0, took
    finally:
        server.close()


async def test_a_body_that_stops_after_its_response_began_is_cut_and_logged_cd(tmp_path):
    """A server that answers while the body is still arriving (its head and part of its body),
    and a client whose body then stops: at timeout.client the client connection is cut (a 408
    cannot follow a response begun) and the access log says `cD`, a client-side timeout in the
    data phase, not `PD` (a body refused by the proxy)."""
    alog = tmp_path / "access.log"

    async def answers_early(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nearly")
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass
        writer.close()

    server = await asyncio.start_server(answers_early, LOOPBACK, 0)
    try:
        cfg = lb_config([f"{LOOPBACK}:{server.sockets[0].getsockname()[1]}"],
                        frontend={"timeout": {"client": "1s"}})
        cfg["log"] = {"access": str(alog)}
        async with running_lb(cfg) as lb:
            reader, writer = await asyncio.open_connection(*lb.address)
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                         + b"b" * 20000)
            t0 = time.monotonic()
            data, how = await read_to_end(reader, 5.0)
            took = time.monotonic() - t0
            writer.close()
        assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"\r\n\r\nearly")
        assert how in ("eof", "reset") and 0.95 <= took < 1.6, (how, took)
        await wait_for(lambda: len(access_terms(alog)) >= 1)
        assert access_terms(alog) == [("200", "cD")]
    finally:
        server.close()


@pytest.mark.slow
async def test_body_below_min_body_rate_gets_408_at_the_end_of_its_window(tmp_path):
    """Bodies that are never idle for `timeout.client` (2s): at 10 bytes a second one gets 408
    when its first 5 s window ends (chunked too, and with `Expect: 100-continue`, answered by
    the proxy at once), and no server ever saw them; at 2 KiB a second (over the 1k default) a body spanning
    two windows goes through whole; with `min_body_rate = 0` the 10 bytes a second one is not
    cut by a rate."""

    async def rate_off() -> None:
        """min_body_rate = 0: no rate; the same trickle is cut only if it goes idle."""
        async with ScriptedServer("a") as a:
            cfg = lb_config([a.address], frontend={"timeout": {"client": "2s"},
                                                   "limits": {"min_body_rate": 0}})
            async with running_lb(cfg) as lb:
                reader, writer = await asyncio.open_connection(*lb.address)
                writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
                stop = asyncio.Event()
                task = asyncio.ensure_future(trickle(writer, b"z" * 100, 0.1, 1, stop))
                data, how = await read_to_end(reader, 6.0)
                assert (data, how) == (b"", "timeout")  # 6 s at 10 B/s: not cut
                stop.set()
                await task
                data, how = await read_to_end(reader, 4.0)  # idle now: timeout.client
                writer.close()
                (resp,) = parse_responses(data)
                assert resp.status == 408

    no_rate = asyncio.ensure_future(rate_off())
    alog = tmp_path / "access.log"
    async with ScriptedServer("a") as a:
        cfg = lb_config([a.address], frontend={"timeout": {"client": "2s"}})
        cfg["log"] = {"access": str(alog)}
        async with running_lb(cfg) as lb:
            host, port = lb.address

            async def upload(path: str, size: int, step: int, every: float,
                             expect: bool = False, chunked: bool = False,
                             ) -> tuple[bytes, str, float]:
                reader, writer = await asyncio.open_connection(host, port)
                head = f"POST {path} HTTP/1.1\r\nHost: x\r\n"
                head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {size}\r\n"
                if expect:
                    head += "Expect: 100-continue\r\n"
                writer.write(head.encode() + b"\r\n")
                t0 = time.monotonic()
                if expect:
                    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
                body = b"3\r\nuuu\r\n" * (size // 3) + b"0\r\n\r\n" if chunked else b"u" * size
                task = asyncio.ensure_future(trickle(writer, body, every, step))
                data, how = await read_to_end(reader, 14.0)
                took = time.monotonic() - t0
                task.cancel()
                writer.close()
                return data, how, took

            slow, slow_expect, slow_chunked, fast = await asyncio.gather(
                upload("/slow", 1 << 20, 1, 0.1),
                upload("/slow-expect", 1 << 20, 1, 0.1, expect=True),
                upload("/slow-chunked", 1 << 20, 1, 0.1, chunked=True),
                upload("/fast", 14000, 512, 0.25))  # 2 KiB/s for 7 s, all in one buffer
            for data, how, took in (slow, slow_expect, slow_chunked):
                (resp,) = parse_responses(data)
                assert (resp.status, resp.header("connection"), how in ENDED) == (408, "close", True)
                assert 4.95 <= took < 5.8, took
            (resp,) = parse_responses(fast[0])
            assert resp.status == 200 and fast[2] > 6.0, fast
            assert [(r.url, len(r.body)) for r in a.requests] == [("/fast", 14000)]
            assert a.connections == 1  # the slow ones never reached a server
    await wait_for(lambda: len(access_terms(alog)) >= 4)
    assert sorted(access_terms(alog)) == [("200", "--"), *[("408", "cR")] * 3]
    await no_rate  # (run beside the rest)


# -- many slow clients beside a load (processes, 2 workers) ----------------------------------------


def rss_kib(lb: LbProcess) -> int:
    """VmRSS of the master and every worker, summed (KiB)."""
    total = 0
    for pid in [lb.pid, *lb.workers()]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


async def lb_port(lb: LbProcess) -> int:
    return int(re.search(r":(\d+)/", await lb.wait_out("ready: http://")).group(1))


class Beside:
    """The normal clients while slow ones are at work: a bounded load (rounds of `load`, 8
    connections, keep-alive and new connections mixed) and a probe timing one request on a new
    connection every 50 ms, until `stop()` or `seconds`."""

    def __init__(self, port: int, seconds: float = 30.0):
        self.port = port
        self.res = LoadResult()
        self.rounds = 0
        self.latencies: list[float] = []
        self.deadline = time.monotonic() + seconds
        self.done = asyncio.Event()
        self.tasks: list[asyncio.Task] = []

    def start(self) -> Beside:
        self.tasks = [asyncio.ensure_future(self._load()), asyncio.ensure_future(self._probe())]
        return self

    def _going(self) -> bool:
        return not self.done.is_set() and time.monotonic() < self.deadline

    async def _load(self) -> None:
        while self._going():
            r = await load(self.port, connections=8, requests=80, seconds=10.0)
            self.rounds += 1
            self.res.ok += r.ok
            self.res.failed += r.failed
            self.res.statuses += r.statuses
            await asyncio.sleep(0.05)

    async def _probe(self) -> None:
        while self._going():
            t0 = time.monotonic()
            resp = await http_get(LOOPBACK, self.port, "/probe", timeout=10.0)
            self.latencies.append(time.monotonic() - t0)
            self.res.statuses[resp.status] += 1
            if resp.status != 200:
                self.res.failed[f"probe status {resp.status}"] += 1
            await asyncio.sleep(0.05)

    async def stop(self) -> LoadResult:
        self.done.set()
        await asyncio.gather(*self.tasks)
        return self.res


def slow_config(app: str, other: dict[str, list], frontend: dict) -> dict:
    """Frontend `www` (with `frontend`'s keys): / to `app`, the paths in `other` ({prefix:
    [addresses or server tables]}) to their own backends; no health checks."""
    groups = {"app": [app], **{p.strip("/"): addrs for p, addrs in other.items()}}
    rules = [{"path_prefix": p, "backend": p.strip("/")} for p in other]
    cfg = lb_config(groups, frontend={**({"rules": rules} if rules else {}), **frontend},
                    backend={"check": False})
    return cfg


@pytest.mark.slow
async def test_200_uploads_at_10_bytes_a_second_all_get_408_and_never_reach_a_server(tmp_path):
    """200 uploads of a 1 MiB body at 10 bytes a second (never idle for timeout.client 2s) beside
    a bounded load: every one gets 408 when its first 5 s window ends; the uploads' backend saw
    no connection at all; the load gets 200 every time."""
    async with ScriptedServer("app") as app, ScriptedServer("up") as up:
        cfg = slow_config(app.address, {"/up": [up.address]}, {"timeout": {"client": "2s"}})
        async with LbProcess(tmp_path, cfg, "--workers", "2") as lb:
            port = await lb_port(lb)
            assert len(lb.workers()) == 2
            beside = Beside(port).start()
            body = b"u" * (1 << 20)  # (one for all: each is sent 10 bytes at a time)

            async def upload(i: int) -> tuple[int, str, float]:
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
                writer.write(b"POST /up/%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                             % (i, 1 << 20))
                t0 = time.monotonic()
                task = asyncio.ensure_future(trickle(writer, body, 1.0, 10))
                data, how = await read_to_end(reader, 15.0)
                took = time.monotonic() - t0
                task.cancel()
                writer.close()
                got = parse_responses(data) if data else []
                return (got[0].status if len(got) == 1 else -1), how, took

            t_start = time.monotonic()
            outcomes = await asyncio.gather(*(upload(i) for i in range(200)))
            t_all = time.monotonic() - t_start
            res = await beside.stop()
    cuts = sorted(took for _, _, took in outcomes)
    print(f"\n200 uploads at 10 B/s: cut after {cuts[0]:.2f}s to {cuts[-1]:.2f}s (all within "
          f"{t_all:.2f}s); beside them {res.ok} requests of the load, probe max "
          f"{max(beside.latencies) * 1000:.0f} ms over {len(beside.latencies)}")
    assert {(status, how in ENDED) for status, how, _ in outcomes} == {(408, True)}, outcomes
    assert cuts[0] >= 4.95 and cuts[-1] < 7.0, cuts
    assert up.connections == 0 and up.requests == []  # no upload ever engaged a server
    assert res.errors == 0 and res.ok > 0, (res.failed, res.statuses)
    assert max(beside.latencies) < 2.0  # none waited for a slow client's deadline


@pytest.mark.slow
async def test_500_slowloris_connections_are_closed_at_http_request_beside_a_load(tmp_path):
    """500 slowloris connections beside a bounded load: 400 send a head one byte a second, 100
    send nothing; with timeout.http_request 3s each of the 400 gets 408 and is closed 3 s after
    its accept, each of the 100 is closed then without a byte; the load gets 200 every time."""
    async with ScriptedServer("app") as app:
        cfg = slow_config(app.address, {}, {"timeout": {"http_request": "3s"}})
        async with LbProcess(tmp_path, cfg, "--workers", "2") as lb:
            port = await lb_port(lb)
            beside = Beside(port).start()
            head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 100

            async def slowloris(sends: bool) -> tuple[bytes, str, float]:
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
                t0 = time.monotonic()
                task = asyncio.ensure_future(trickle(writer, head, 1.0)) if sends else None
                data, how = await read_to_end(reader, 10.0)
                took = time.monotonic() - t0
                if task is not None:
                    task.cancel()
                writer.close()
                return data, how, took

            outcomes = await asyncio.gather(*(slowloris(i % 5 != 0) for i in range(500)))
            res = await beside.stop()
    sent, silent = [o for i, o in enumerate(outcomes) if i % 5], outcomes[::5]
    cuts = sorted(took for _, _, took in outcomes)
    print(f"\n500 slowloris: closed after {cuts[0]:.2f}s to {cuts[-1]:.2f}s; beside them "
          f"{res.ok} requests of the load, probe max {max(beside.latencies) * 1000:.0f} ms "
          f"over {len(beside.latencies)}")
    assert len(sent) == 400 and len(silent) == 100
    assert {(parse_responses(d)[0].status, how in ENDED) for d, how, _ in sent} == {(408, True)}
    assert {(d, how) for d, how, _ in silent} == {(b"", "eof")}
    assert cuts[0] >= 2.5 and cuts[-1] < 4.5, cuts  # (t0: once the busy test loop saw the connect)
    assert app.requests and all(r.url == "/" or r.url == "/probe" for r in app.requests)
    assert not any(r.header("x-slow") for r in app.requests)
    assert res.errors == 0 and res.ok > 0, (res.failed, res.statuses)
    assert max(beside.latencies) < 2.0  # none waited for a slow client's deadline


class BigServer:
    """Answers `GET /big` with a 10 MiB body, `GET /big/mid` with 64 KiB (written with flow
    control: what it holds is a view of one shared buffer) and anything else with a small body;
    records when each of its connections opened and closed."""

    SIZE = 10 << 20
    MID = 64 << 10

    def __init__(self):
        self.body = b"x" * self.SIZE
        self.opened: dict[int, float] = {}
        self.closed: dict[int, float] = {}
        self.big = 0  # big responses begun
        self.mid = 0  # 64 KiB responses begun

    async def __aenter__(self) -> BigServer:
        self.server = await asyncio.start_server(self._handle, LOOPBACK, 0)
        self.address = f"{LOOPBACK}:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    @property
    def open_now(self) -> int:
        return len(self.opened) - len(self.closed)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n = len(self.opened)
        self.opened[n] = time.monotonic()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if head.startswith(b"GET /big/mid "):
                    self.mid += 1
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.MID)
                    writer.write(memoryview(self.body)[:self.MID])
                    await writer.drain()
                elif head.startswith(b"GET /big "):
                    self.big += 1
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.SIZE)
                    view = memoryview(self.body)
                    for i in range(0, self.SIZE, 1 << 18):
                        writer.write(view[i:i + (1 << 18)])
                        await writer.drain()
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsmall\n")
                    await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed[n] = time.monotonic()
            writer.close()


async def drain(s: socket.socket, timeout: float = 10.0) -> tuple[int, str]:
    """Read a non-blocking socket to its end: (bytes, "eof" | "reset" | "timeout")."""
    loop = asyncio.get_running_loop()
    n, how = 0, "eof"
    try:
        async with asyncio.timeout(timeout):
            while chunk := await loop.sock_recv(s, 1 << 20):
                n += len(chunk)
    except ConnectionResetError:
        how = "reset"
    except TimeoutError:
        how = "timeout"
    s.close()
    return n, how


def fds(lb: LbProcess) -> int:
    """Open descriptors of the master and every worker."""
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in [lb.pid, *lb.workers()])


@pytest.mark.slow
async def test_100_clients_not_reading_a_10_mib_response_are_cut_at_timeout_client(tmp_path):
    """100 clients ask for a 10 MiB response and never read it, beside a bounded load: each is
    cut `timeout.client` (2s) after the proxy's buffer for it filled; each server connection is
    closed then and its slot freed (the big server's maxconn is 100: a request after them goes
    through); the proxy's RSS (master and workers) grows by less than 64 MiB for the 100, as the
    server is paused once the client's buffer is full; the load gets 200 every time."""
    async with ScriptedServer("app") as app, BigServer() as big:
        cfg = slow_config(app.address, {"/big": [{"name": "big", "address": big.address,
                                                  "maxconn": 100}]},
                          {"timeout": {"client": "2s"}})
        async with LbProcess(tmp_path, cfg, "--workers", "2") as lb:
            port = await lb_port(lb)
            warm = await load(port, connections=8, requests=400)
            assert warm.errors == 0, warm.failed
            base, fds_before = rss_kib(lb), fds(lb)
            beside = Beside(port).start()
            socks = []
            t0 = time.monotonic()
            for _ in range(100):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
                s.setblocking(False)
                await asyncio.get_running_loop().sock_connect(s, (LOOPBACK, port))
                s.send(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
                socks.append(s)
            peak = base
            deadline = time.monotonic() + 15.0
            while (big.big < 100 or big.open_now) and time.monotonic() < deadline:
                peak = max(peak, rss_kib(lb))
                await asyncio.sleep(0.05)
            t_all = time.monotonic() - t0
            held = [big.closed[i] - big.opened[i] for i in big.closed]
            assert (big.big, big.open_now) == (100, 0), (big.big, big.open_now)
            after = await http_get(LOOPBACK, port, "/big/small")  # the slots are free
            res = await beside.stop()
            rss_after = rss_kib(lb)
            # (give or take the pooled server connections of the load beside: 9 a worker at most)
            await wait_for(lambda: fds(lb) <= fds_before + 18)
    got = await asyncio.gather(*(drain(s) for s in socks))
    growth = (peak - base) / 1024
    print(f"\n100 non-readers of 10 MiB: proxy RSS {base / 1024:.1f} MiB before, peak +"
          f"{growth:.1f} MiB, {rss_after / 1024:.1f} MiB after; server connections held "
          f"{min(held):.2f}s to {max(held):.2f}s, all cut within {t_all:.2f}s; each client got "
          f"{min(n for n, _ in got) / 1024:.0f} to {max(n for n, _ in got) / 1024:.0f} KiB; "
          f"beside them {res.ok} requests of the load, probe max "
          f"{max(beside.latencies) * 1000:.0f} ms over {len(beside.latencies)}")
    assert after.status == 200 and after.body == b"small\n"
    assert {how for _, how in got} <= {"reset", "eof"} and all(n < BigServer.SIZE for n, _ in got)
    assert len(held) == 100 and min(held) >= 2.0 and max(held) < 5.0, sorted(held)
    assert growth < 64, growth
    assert res.errors == 0 and res.ok > 0, (res.failed, res.statuses)
    assert max(beside.latencies) < 2.0  # none waited for a slow client's deadline


@pytest.mark.slow
async def test_non_readers_that_pipeline_hold_no_more_than_the_buffers(tmp_path):
    """20 clients each pipeline 200 requests for a 64 KiB response and never read: once a
    client's buffer is full, the server connection of its next request is paused from the start
    (not only the one in flight when the buffer filled), so the proxy takes from the servers no
    more than the kernel and its buffers hold for them (main took all 4000, 250 MiB, and grew by
    179 MiB); each is cut at timeout.client; RSS growth reported and bounded."""
    async with ScriptedServer("app") as app, BigServer() as big:
        cfg = slow_config(app.address, {"/big": [big.address]}, {"timeout": {"client": "2s"}})
        async with LbProcess(tmp_path, cfg, "--workers", "2") as lb:
            port = await lb_port(lb)
            warm = await load(port, connections=8, requests=400)
            assert warm.errors == 0, warm.failed
            base = rss_kib(lb)
            socks = []
            loop = asyncio.get_running_loop()
            for _ in range(20):
                s = socket.socket()
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
                s.setblocking(False)
                await loop.sock_connect(s, (LOOPBACK, port))
                await loop.sock_sendall(s, b"GET /big/mid HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
                socks.append(s)
            peak = base
            deadline = time.monotonic() + 15.0
            while (not big.mid or big.open_now) and time.monotonic() < deadline:
                peak = max(peak, rss_kib(lb))
                await asyncio.sleep(0.05)
            assert big.open_now == 0
    got = await asyncio.gather(*(drain(s) for s in socks))
    growth = (peak - base) / 1024
    held = big.mid * BigServer.MID - sum(n for n, _ in got)  # taken from servers, not delivered
    print(f"\n20 pipelining non-readers: {big.mid} responses of 64 KiB begun for them (of "
          f"4000 asked), {held / 1024:.0f} KiB more than they got; proxy RSS peak "
          f"+{growth:.1f} MiB; each client got {min(n for n, _ in got) / 1024:.0f} to "
          f"{max(n for n, _ in got) / 1024:.0f} KiB")
    assert {how for _, how in got} <= {"reset", "eof"}
    assert big.mid < 4000 and held < 20 * (512 << 10), (big.mid, held)
    assert growth < 16, growth
