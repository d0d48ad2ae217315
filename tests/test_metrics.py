"""Issue 13, metrics: `GET /metrics` of the admin listener, read by prometheus_client's parser
(an independent reader of the text format), and the counters behind it and `Master.stats()`.

Real processes (a master with two workers), real servers that count the bytes they get and
send, raw clients that count theirs: after exactly N requests the request counters say N, the
histograms count N, the byte counters say what went over the wires; killing a worker loses
nothing. Unit tests cover the exposition itself (escaping, cumulative buckets, +Inf = count).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import time
from collections import Counter
from types import SimpleNamespace

import h11
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from foobar_lb import config_from_dict
from foobar_lb.build import build
from foobar_lb.metrics import RateMeter, View, _Out, escape, percentile, prometheus_text
from foobar_lb.shared import (
    B_QUEUED,
    F_CURRENT,
    S_ECON,
    S_ERESP,
    S_REDISPATCHES,
    S_RELEASED,
    S_REQUESTS,
    S_RETRIES,
    S_TIMEOUT_SERVER,
    Counters,
    Layout,
)
from procs import LbProcess

from support import (
    LOOPBACK,
    ScriptedServer,
    _ServerConn,
    free_port,
    http_get,
    http_response,
    lb_config,
    running_lb,
)

# ---------------------------------------------------------------------------------------------
# Reading /metrics


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams: dict, sample_name: str, **labels: str) -> list[tuple[dict, float]]:
    """(labels, value) of every sample named `sample_name` whose labels include `labels`."""
    out = []
    for f in fams.values():
        for s in f.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                out.append((s.labels, s.value))
    return out


def total(fams: dict, sample_name: str, **labels: str) -> float:
    return sum(v for _, v in samples(fams, sample_name, **labels))


# ---------------------------------------------------------------------------------------------
# Unit: the exposition


def test_label_values_are_escaped_and_parse_back() -> None:
    assert escape('a\\b"c\nd') == 'a\\\\b\\"c\\nd'
    o = _Out()
    o.family("foobar_lb_x_total", "counter", "a help text with \\ and\na newline")
    weird = 'back\\slash "quoted"\nnew line'
    o.sample("foobar_lb_x_total", {"frontend": weird}, 3)
    (fam,) = text_string_to_metric_families("\n".join(o.lines) + "\n")
    assert fam.name == "foobar_lb_x"
    assert fam.documentation == "a help text with \\ and\na newline"
    (s,) = fam.samples
    assert s.labels == {"frontend": weird} and s.value == 3


def _view_master(buckets: list[str] | None = None):
    """A master-like object over one build's private counters (no processes)."""
    raw = {"frontends": {"www": {"bind": "127.0.0.1:0", "default_backend": "app"},
                         "raw": {"bind": "127.0.0.1:0", "default_backend": "tcpb",
                                 "mode": "tcp"}},
           "backends": {"app": {"servers": [{"name": "s1", "address": "127.0.0.1:9"},
                                            {"name": "s2", "address": "127.0.0.1:10"}],
                                "check": False},
                        "tcpb": {"mode": "tcp", "servers": [{"name": "t", "address": "127.0.0.1:11"}],
                                 "check": False}}}
    if buckets is not None:
        raw["metrics"] = {"buckets": buckets}
    cfg = config_from_dict(raw)
    layout, counters = Layout(), Counters()
    built = build(cfg, layout=layout, counters=counters)
    master = SimpleNamespace(
        built=built, layout=layout, workers=[], next_id=3, reloads=1, started_at=time.time() - 5,
        check_info={}, totals=lambda: counters.cells[:layout.cells].tolist())
    return master, built, counters.cells


def test_histograms_are_cumulative_and_inf_equals_count() -> None:
    master, built, cells = _view_master(["1ms", "10ms", "100ms"])
    s1 = built.backends["app"].by_name["s1"]
    assert s1.hb == (0.001, 0.01, 0.1)
    from bisect import bisect_left

    for t in (0.0005, 0.001, 0.002, 0.05, 0.05, 3.0):  # le is inclusive: 0.001 is in le=0.001
        cells[s1.hrt + bisect_left(s1.hb, t)] += 1
        cells[s1.hrt + s1.hn] += int(t * 1e6)
    fe = built.frontends["www"]
    cells[s1.fcls[fe.routes["app"].fi] + 2] += 5  # five 2xx
    cells[s1.fcls[fe.routes["app"].fi] + 5] += 1  # one 5xx
    cells[fe.routes["app"].ocls + 5] += 2  # two 503s of the proxy's own
    text = prometheus_text(master)
    fams = families(text)
    lab = {"backend": "app", "server": "s1"}
    buckets = {s["le"]: v for s, v in samples(fams, "foobar_lb_response_time_seconds_bucket", **lab)}
    assert buckets == {"0.001": 2, "0.01": 3, "0.1": 5, "+Inf": 6}
    assert total(fams, "foobar_lb_response_time_seconds_count", **lab) == 6
    assert total(fams, "foobar_lb_response_time_seconds_sum", **lab) == pytest.approx(3.1035)
    # every histogram: cumulative, +Inf = _count
    for name in ("response", "connect", "queue"):
        fam = fams[f"foobar_lb_{name}_time_seconds"]
        assert fam.type == "histogram"
        series: dict = {}
        for s in fam.samples:
            key = (s.labels["backend"], s.labels["server"])
            series.setdefault(key, {})[s.name.rsplit("_", 1)[1] if "le" not in s.labels else
                                       s.labels["le"]] = s.value
        for vals in series.values():
            les = [vals[k] for k in ("0.001", "0.01", "0.1", "+Inf")]
            assert les == sorted(les) and vals["+Inf"] == vals["count"]
    req = {(s["backend"], s["server"], s["code"]): v
           for s, v in samples(fams, "foobar_lb_requests_total", frontend="www")}
    assert req[("app", "s1", "2xx")] == 5 and req[("app", "s1", "5xx")] == 1
    assert req[("app", "<NOSRV>", "5xx")] == 2 and req[("<NOSRV>", "<NOSRV>", "5xx")] == 0
    assert total(fams, "foobar_lb_requests_total") == 8
    assert not samples(fams, "foobar_lb_requests_total", frontend="raw")  # tcp: no requests
    # HELP and TYPE for every family, every name prefixed
    lines = text.splitlines()
    for f in fams.values():
        assert f.name.startswith("foobar_lb_")
        assert any(line.startswith(f"# HELP {f.name}") for line in lines), f.name
    assert fams["foobar_lb_requests"].type == "counter"
    assert fams["foobar_lb_server_up"].type == "gauge"
    assert total(fams, "foobar_lb_reloads_total") == 1


def test_percentiles_from_a_histogram() -> None:
    bounds = (0.001, 0.01, 0.1)
    assert percentile(bounds, [0, 0, 0, 0], 0.5) is None
    assert percentile(bounds, [10, 0, 0, 0], 0.5) == pytest.approx(0.0005)
    assert percentile(bounds, [0, 10, 0, 0], 0.9) == pytest.approx(0.001 + 0.009 * 0.9)
    assert percentile(bounds, [0, 0, 0, 10], 0.99) == 0.1  # in +Inf: the highest bound


def test_rates_over_the_last_ten_seconds_of_readings() -> None:
    m = RateMeter(window=10.0)
    assert m.rates({"a": 5}, now=100.0) == {"a": 0.0}  # the first reading: nothing to compare
    assert m.rates({"a": 25}, now=104.0) == {"a": 5.0}  # since the oldest, while younger than 10s
    assert m.rates({"a": 45}, now=108.0) == {"a": 5.0}
    # from now on, against the newest reading at least 10s old
    assert m.rates({"a": 125}, now=114.0) == {"a": 10.0}  # (125 - 25) / (114 - 104)
    assert m.rates({"a": 125, "b": 7}, now=130.0) == {"a": 0.0, "b": 0.438}  # (rounded)
    assert len(m.samples) <= 3


# ---------------------------------------------------------------------------------------------
# Processes: exactly N requests through two workers


class _CountingConn(_ServerConn):
    def data_received(self, data):
        self.srv.rx += len(data)
        super().data_received(data)


class ByteServer(ScriptedServer):
    """A ScriptedServer that counts the bytes it receives (`rx`) and sends (`tx`); answers 404
    on /missing, 500 on /broken, else 200."""

    def __init__(self, name: str):
        super().__init__(name, self._answer)
        self.rx = 0
        self.tx = 0

    async def _answer(self, req) -> bytes:
        if req.url == "/hang":
            await asyncio.sleep(60)
        status = {"/missing": 404, "/broken": 500}.get(req.url, 200)
        out = http_response(status, f"{self.name} {req.url}\n".encode() * (1 + len(req.url) % 3),
                            [("X-Server", self.name)])
        self.tx += len(out)
        return out

    async def start(self, port: int = 0) -> ByteServer:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _CountingConn(self), self.host, port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self


async def _requests(port: int, paths: list[str], host: str = LOOPBACK,
                    extra: str = "") -> tuple[int, int, list[int]]:
    """Send `paths` one after another on one keep-alive connection: (bytes sent, bytes
    received, statuses)."""
    reader, writer = await asyncio.open_connection(host, port)
    conn = h11.Connection(h11.CLIENT)
    sent = got = 0
    statuses = []
    try:
        for path in paths:
            data = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: t\r\n{extra}"
                    "\r\n").encode()
            writer.write(data)
            sent += len(data)
            conn.send(h11.Request(method="GET", target=path, headers=[("Host", "x")]))
            conn.send(h11.EndOfMessage())
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    chunk = await asyncio.wait_for(reader.read(65536), 10)
                    got += len(chunk)
                    conn.receive_data(chunk)
                    continue
                if isinstance(ev, h11.Response):
                    statuses.append(ev.status_code)
                if isinstance(ev, h11.EndOfMessage):
                    break
            conn.start_next_cycle()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return sent, got, statuses


async def _admin_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
                 .encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        out, rest = b"", body
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if not n:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        body = out
    return int(lines[0].split()[1]), headers, body


async def _metrics(aport: int) -> dict:
    status, headers, body = await _admin_get(aport, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return families(body.decode())


async def _echo_server() -> asyncio.AbstractServer:
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    return await asyncio.start_server(echo, LOOPBACK, 0)


async def test_metrics_after_exactly_n_requests_through_two_workers(tmp_path) -> None:
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    cert, key = tmp_path / "site.pem", tmp_path / "site.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    port, tport, dport, lport, sport, aport = (free_port() for _ in range(6))
    echo = await _echo_server()
    eport = echo.sockets[0].getsockname()[1]
    async with ByteServer("s1") as s1, ByteServer("s2") as s2:
        cfg = {
            "global": {"workers": 2, "grace": "1s"},
            "frontends": {
                "www": {"bind": f"{LOOPBACK}:{port}", "default_backend": "app"},
                "raw": {"bind": f"{LOOPBACK}:{tport}", "mode": "tcp", "default_backend": "echo"},
                "closed": {"bind": f"{LOOPBACK}:{dport}", "default_backend": "app",
                           "deny": ["127.0.0.0/8"]},
                "limited": {"bind": f"{LOOPBACK}:{lport}", "default_backend": "app",
                            "rate_limit": {"requests": 1, "per": "1h", "burst": 1}},
                "secure": {"bind": f"{LOOPBACK}:{sport}", "default_backend": "app",
                           "tls": {"cert": str(cert), "key": str(key)}},
            },
            "backends": {
                "app": {"servers": [{"name": "s1", "address": s1.address},
                                    {"name": "s2", "address": s2.address}]},
                "echo": {"mode": "tcp", "servers": [{"name": "e1",
                                                     "address": f"{LOOPBACK}:{eport}"}]},
            },
            "admin": {"bind": f"{LOOPBACK}:{aport}"},
            "metrics": {"buckets": ["1ms", "5ms", "25ms", "100ms", "1s"]},
        }
        async with LbProcess(tmp_path, cfg) as lb:
            # -- exactly N requests, some 404 and 500, on 6 connections (both workers serve)
            plan = [["/", "/a", "/missing", "/b", "/broken", "/c", "/", "/d"] for _ in range(5)]
            plan.append(["/", "/missing", "/broken", "/e"])
            n = sum(len(p) for p in plan)
            results = await asyncio.gather(*(_requests(port, p) for p in plan))
            sent = sum(r[0] for r in results)
            got = sum(r[1] for r in results)
            statuses = Counter(s for r in results for s in r[2])
            assert statuses == {200: 32, 404: 6, 500: 6} and n == 44
            fams = await _metrics(aport)

            # requests by frontend, backend, server and class: N in all, as the servers saw
            www = samples(fams, "foobar_lb_requests_total", frontend="www")
            assert sum(v for _, v in www) == n
            for srv in (s1, s2):
                seen = Counter(f"{({'/missing': 404, '/broken': 500}.get(r.url, 200)) // 100}xx"
                               for r in srv.requests)
                got_cls = {s["code"]: v for s, v in www if s["server"] == srv.name and v}
                assert got_cls == dict(seen), srv.name
                lab = {"backend": "app", "server": srv.name}
                count = total(fams, "foobar_lb_response_time_seconds_count", **lab)
                assert count == len(srv.requests) > 0
                inf = total(fams, "foobar_lb_response_time_seconds_bucket", le="+Inf", **lab)
                assert inf == count
                s = total(fams, "foobar_lb_response_time_seconds_sum", **lab)
                assert 0 < s < count * 1.0  # loopback: well under a second each
                assert total(fams, "foobar_lb_server_bytes_in_total", **lab) == srv.rx
                assert total(fams, "foobar_lb_server_bytes_out_total", **lab) == srv.tx
                assert total(fams, "foobar_lb_server_sessions_total", **lab) == len(srv.requests)
            assert all(v == 0 for s, v in www if s["server"] == "<NOSRV>")
            # bytes: exactly what the clients sent and received
            assert total(fams, "foobar_lb_frontend_bytes_in_total", frontend="www") == sent
            assert total(fams, "foobar_lb_frontend_bytes_out_total", frontend="www") == got
            assert total(fams, "foobar_lb_frontend_connections_total", frontend="www") == 6

            # -- a tcp frontend: connections, bytes, connect times
            for size in (100, 5000):
                r, w = await asyncio.open_connection(LOOPBACK, tport)
                w.write(b"x" * size)
                assert await asyncio.wait_for(r.readexactly(size), 5) == b"x" * size
                w.close()
            # -- a denied connection, a 429, TLS handshakes (one completed, one refused)
            r, w = await asyncio.open_connection(LOOPBACK, dport)
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
            _, _, st = await _requests(lport, ["/", "/"])
            assert st == [200, 429]
            ctx = ssl.create_default_context()
            ca.configure_trust(ctx)
            r, w = await asyncio.open_connection(LOOPBACK, sport, ssl=ctx,
                                                 server_hostname="localhost")
            w.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            assert (await asyncio.wait_for(r.read(), 5)).startswith(b"HTTP/1.1 200 OK")
            w.close()
            r, w = await asyncio.open_connection(LOOPBACK, sport)  # plain HTTP to TLS
            w.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(r.read(), 5)
            w.close()

            for _ in range(100):  # (a refusal is counted as the worker sees it)
                fams = await _metrics(aport)
                if total(fams, "foobar_lb_tls_handshake_failures_total") and total(
                        fams, "foobar_lb_frontend_current_connections") == 0:
                    break
                await asyncio.sleep(0.05)
            raw = {"frontend": "raw"}
            assert total(fams, "foobar_lb_frontend_connections_total", **raw) == 2
            assert total(fams, "foobar_lb_frontend_bytes_in_total", **raw) == 5100
            assert total(fams, "foobar_lb_frontend_bytes_out_total", **raw) == 5100
            e1 = {"backend": "echo", "server": "e1"}
            assert total(fams, "foobar_lb_server_sessions_total", **e1) == 2
            assert total(fams, "foobar_lb_server_bytes_in_total", **e1) == 5100
            assert total(fams, "foobar_lb_server_bytes_out_total", **e1) == 5100
            assert total(fams, "foobar_lb_connect_time_seconds_count", **e1) == 2
            assert total(fams, "foobar_lb_denied_connections_total", frontend="closed") == 1
            assert total(fams, "foobar_lb_rate_limited_requests_total", frontend="limited") == 1
            lim = samples(fams, "foobar_lb_requests_total", frontend="limited", code="4xx",
                          backend="app", server="<NOSRV>")
            assert [v for _, v in lim] == [1]
            assert total(fams, "foobar_lb_tls_handshakes_total", frontend="secure") == 1
            assert total(fams, "foobar_lb_tls_handshake_failures_total", frontend="secure") == 1
            assert total(fams, "foobar_lb_frontend_current_connections") == 0
            assert total(fams, "foobar_lb_server_current_sessions") == 0
            assert total(fams, "foobar_lb_workers", status="serving") == 2
            assert total(fams, "foobar_lb_server_up", backend="app") == 2

            # -- the stats view of the same numbers
            status, _, body = await _admin_get(aport, "/api/stats")
            assert status == 200
            stats = json.loads(body)
            fe = stats["frontends"]["www"]
            assert fe["requests"] == n and fe["responses"]["4xx"] == 6 and fe["bytes_in"] == sent
            srv = stats["backends"]["app"]["servers"]["s1"]
            assert srv["responses"]["2xx"] + srv["responses"]["4xx"] + srv["responses"][
                "5xx"] == len(s1.requests)
            assert srv["admin"] == "ready" and srv["state"] == "up" and srv["since"] >= 0
            assert 0 < srv["response_time"]["p50"] <= srv["response_time"]["p99"] <= 1.0
            assert srv["check"]["status"] is None or isinstance(srv["check"]["status"], str)
            be = stats["backends"]["app"]
            assert be["up"] == 2 and be["total"] == 2 and be["queue"] == 0
            assert be["sessions"] == len(s1.requests) + len(s2.requests)

            # -- a worker killed: its counters stay in the totals, what was open in it goes
            hang = [await asyncio.open_connection(LOOPBACK, port) for _ in range(6)]
            for _, w in hang:
                w.write(b"GET /hang HTTP/1.1\r\nHost: x\r\n\r\n")
            for _ in range(200):  # (a session is counted when taken, its head's bytes once
                # written, after the connect: the servers must have the six heads too)
                hung = sum(r.url == "/hang" for r in s1.requests + s2.requests)
                fams = await _metrics(aport)  # (read after the servers had them)
                if hung == 6 and total(fams, "foobar_lb_server_current_sessions",
                                       backend="app") == 6:
                    break
                await asyncio.sleep(0.02)
            assert total(fams, "foobar_lb_frontend_current_connections", frontend="www") == 6
            before = fams
            workers = lb.workers()
            assert len(workers) == 2
            os.kill(workers[0], signal.SIGKILL)
            for _ in range(400):
                after = await _metrics(aport)
                if total(after, "foobar_lb_workers_started_total") == 3 and total(
                        after, "foobar_lb_workers", status="serving") == 2:
                    break  # (the master has seen it die, folded its cells, replaced it)
                await asyncio.sleep(0.05)
            for name in ("foobar_lb_requests_total", "foobar_lb_frontend_bytes_in_total",
                         "foobar_lb_frontend_bytes_out_total", "foobar_lb_server_bytes_in_total",
                         "foobar_lb_server_bytes_out_total",
                         "foobar_lb_response_time_seconds_count",
                         "foobar_lb_frontend_connections_total", "foobar_lb_tls_handshakes_total",
                         "foobar_lb_tls_handshake_failures_total",
                         "foobar_lb_denied_connections_total", "foobar_lb_server_sessions_total",
                         "foobar_lb_connect_time_seconds_count"):
                for labels, value in samples(before, name):
                    again = samples(after, name, **labels)
                    assert [v for _, v in again] == [value], (name, labels)
            assert total(after, "foobar_lb_workers_started_total") == 3
            alive = 0
            for r, _ in hang:  # the dead worker's were cut; the other's still wait
                try:
                    await asyncio.wait_for(r.read(), 0.2)
                except TimeoutError:
                    alive += 1
                except ConnectionError:
                    pass
            print(f"\n{6 - alive} of 6 hanging requests were on the killed worker")
            assert total(after, "foobar_lb_server_current_sessions") == alive
            assert total(after, "foobar_lb_frontend_current_connections") == alive
            for _, w in hang:
                w.close()
            assert total(after, "foobar_lb_server_sessions_total", backend="app") == total(
                before, "foobar_lb_server_sessions_total", backend="app")
    echo.close()


# ---------------------------------------------------------------------------------------------
# In one process (the library): retries, redispatches, timeouts, the queue, a broken response


def _lb_view(lb) -> View:
    return View(lb.counters.cells[:lb.layout.cells].tolist(), lb.layout.offsets)


async def test_retries_timeouts_queue_and_a_broken_response_are_counted() -> None:
    dead = free_port()  # nothing listens: connection refused

    async def answer(req) -> bytes | None:
        if req.url == "/slow":
            await asyncio.sleep(0.3)
        if req.url == "/silent":
            await asyncio.sleep(5)
            return None
        if req.url == "/bad":  # a head, then a chunked body that is not one
            return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n"
        return http_response(200, b"ok\n")

    async with ScriptedServer("live", answer, expect_garbage=True) as live, \
            ScriptedServer("one", answer) as one:
        cfg = lb_config({"app": [{"name": "dead", "address": f"{LOOPBACK}:{dead}"},
                                 {"name": "live", "address": live.address}],
                         "solo": [{"name": "one", "address": one.address, "maxconn": 1}]},
                        frontend={"rules": [{"path_prefix": "/slow", "backend": "solo"}]},
                        backend={"timeout": {"server": "1s", "queue": "5s"}, "check": False})
        async with running_lb(cfg) as lb:
            port = lb.address[1]
            # the first request goes to `dead` (roundrobin), is refused, and goes to `live`
            assert (await http_get(LOOPBACK, port, "/")).status == 200
            v = _lb_view(lb)
            assert v.server("app", "dead", S_RETRIES) == 1
            assert v.server("app", "dead", S_REDISPATCHES) == 1
            assert v.server("app", "dead", S_ECON) == 1
            assert v.responses(frontend="www", server="live") == [0, 1, 0, 0, 0]
            # maxconn 1: a second request waits in the queue while the first is slow
            got = await asyncio.gather(http_get(LOOPBACK, port, "/slow"),
                                       http_get(LOOPBACK, port, "/slow"),
                                       http_get(LOOPBACK, port, "/slow"))
            assert [r.status for r in got] == [200, 200, 200]
            v = _lb_view(lb)
            counts, waited = v.histogram("queue", "solo", "one", lb.config.metrics.buckets)
            assert sum(counts) == 2 and 0.8 < waited < 3  # 0.3s and 0.6s in the queue
            assert v.backend("solo", B_QUEUED) == 0
            assert v.responses(frontend="www", backend="solo") == [0, 3, 0, 0, 0]
            # a late response: 504 and a server timeout
            assert (await http_get(LOOPBACK, port, "/silent")).status == 504
            # a broken response: 502, counted once (as ours), not as the server's 2xx
            before = v.responses(frontend="www", server="live")[1]
            assert (await http_get(LOOPBACK, port, "/bad")).status == 502
            v = _lb_view(lb)
            assert v.server("app", "live", S_TIMEOUT_SERVER) == 1
            assert v.responses(frontend="www", server="live")[1] == before
            assert v.responses(frontend="www", server="")[4] == 2  # the 504 and the 502
            assert v.server("app", "live", S_ERESP) == 2
            assert v.server("app", "live", S_REQUESTS) == v.server("app", "live", S_RELEASED)
            assert v.frontend("www", F_CURRENT) == 0
            requests = sum(v.responses(frontend="www"))
            assert requests == 1 + 3 + 1 + 1
