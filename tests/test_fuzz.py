"""Fuzz and properties (hypothesis, bounded): hostile bytes and documents cost nothing.

The rules these tests hold the proxy to:
- the configuration loader raises nothing but ConfigError, whatever the TOML document (keys
  drawn from the real key names, so that the generator reaches the deep checks, and values of
  every TOML type);
- random and mutated request bytes sent to a running `python -m foobar_lb serve` with 2
  workers never crash a worker (the same pids after), never leak a connection or a descriptor
  (`/proc/<pid>/fd` of the master and every worker back to their baseline once settled; RSS
  growth under a bound), never produce a Python traceback in the log, never reach a server as
  anything but valid HTTP, and whatever the client gets back is valid HTTP;
- a valid request split at random byte boundaries is forwarded byte for byte (but the fields
  we add: X-Forwarded-For, X-Forwarded-Proto, X-Request-ID).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import inspect
import json
import math
import re
import socket
import time
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foobar_lb import config as config_module
from foobar_lb.balancing import algorithm_names
from foobar_lb.config import ConfigError, parse_config
from procs import LbProcess, fd_counts, fds_settle, rss_kib

from support import LOOPBACK, HttpParseError, ScriptedServer, free_port, our_ids, parse_cut_responses

# ---------------------------------------------------------------------------------------------
# The configuration loader

# every name the loader knows (keys, and the words some values take): drawn as keys and values
NAMES = sorted(set(re.findall(r'"([a-z][a-z0-9_]{1,23})"', inspect.getsource(config_module))))
GOOD_STRINGS = ["127.0.0.1:8080", "127.0.0.1:0", "[::1]:80", "*:8080", "1s", "250ms", "10m",
                "16k", "1m", "http", "tcp", "roundrobin", "leastconn", "app", "www", "s1",
                "10.0.0.0/8", "::1/128", "/", "example.com", "*.example.com", "auto", "debug",
                "layer7", "safe", "never", "GET", "X-Thing", "max-age=1", "-1s", "1e3s", ""]


def toml_string(s: str) -> str:
    """A TOML basic string (JSON's, but for astral characters, and DEL escaped)."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else toml_string(k)


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(v)


def to_toml(doc: dict) -> str:
    """Top-level scalars first, then a [table] per top-level table, its values inline."""
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in doc.items() if not isinstance(v, dict)]
    for k, v in doc.items():
        if isinstance(v, dict):
            lines.append(f"[{toml_key(k)}]")
            lines += [f"{toml_key(kk)} = {toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


keys = st.one_of(st.sampled_from(NAMES), st.text(max_size=6))
scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, 2, -1, 65535, 65536, 10**9]),
    st.floats(),
    st.text(max_size=12),
    st.sampled_from(GOOD_STRINGS),
    st.sampled_from(NAMES),
    st.datetimes(timezones=st.none() | st.just(dt.UTC)),
    st.dates(),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)),
    max_leaves=6,
)


def valid_base() -> dict:
    """A valid document: every table the loader knows, so that a changed key is checked deep."""
    return {
        "global": {"workers": 2, "maxconn": 100},
        "defaults": {"timeout": {"connect": "1s"}, "limits": {"max_uri": "8k"}},
        "frontends": {"www": {"bind": ["127.0.0.1:8080"], "default_backend": "app",
                              "timeout": {"client": "5s"}, "limits": {"max_headers": 50},
                              "rules": [{"host": "a.example", "backend": "app"}],
                              "rate_limit": {"requests": 10}, "accept_proxy": {"from": ["::1"]},
                              "forwardfor": {"enabled": True}, "request_headers": {"set": {}}}},
        "backends": {"app": {"servers": [{"name": "s1", "address": "127.0.0.1:9001",
                                          "check": {"path": "/health"}},
                                         {"name": "s2", "address": "127.0.0.1:9002"}],
                             "check": True, "timeout": {"server": "5s"},
                             "response_headers": {"add": {"X-A": "1"}}}},
        "admin": {"bind": "127.0.0.1:9000"},
        "alerts": {"webhooks": ["http://127.0.0.1:1/hook"]},
        "log": {"access": "-"},
    }


# where a changed value goes: a table of the valid document, by its path
PLACES = [(), ("global",), ("defaults",), ("defaults", "timeout"), ("defaults", "limits"),
          ("frontends",), ("frontends", "www"), ("frontends", "www", "timeout"),
          ("frontends", "www", "limits"), ("frontends", "www", "rules", 0),
          ("frontends", "www", "rate_limit"), ("frontends", "www", "accept_proxy"),
          ("frontends", "www", "forwardfor"), ("frontends", "www", "request_headers"),
          ("backends",), ("backends", "app"), ("backends", "app", "servers", 0),
          ("backends", "app", "servers", 0, "check"), ("backends", "app", "servers", 1),
          ("backends", "app", "timeout"), ("backends", "app", "response_headers"),
          ("admin",), ("alerts",), ("log",)]


def changed(changes: list) -> dict:
    doc = valid_base()
    for place, key, value in changes:
        table = doc
        try:
            for step in place:
                table = table[step]
            table[key] = value
        except (TypeError, KeyError, IndexError):  # (an earlier change replaced the table)
            continue
    return doc


documents = st.lists(st.tuples(st.sampled_from(PLACES), keys, values), min_size=1,
                     max_size=4).map(changed)
ALGORITHMS = algorithm_names()


def test_the_valid_base_document_is_valid():
    parse_config(to_toml(valid_base()), None, ALGORITHMS)


@settings(max_examples=500, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(documents)
def test_the_configuration_loader_raises_nothing_but_config_error(doc):
    text = to_toml(doc)
    with contextlib.suppress(ConfigError):
        parse_config(text, None, ALGORITHMS)


# ---------------------------------------------------------------------------------------------
# Request bytes to a running group: `python -m foobar_lb serve` with 2 workers

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
                min_size=1, max_size=10)
# fields the proxy adds, removes or rewrites (hop-by-hop, framing, Host, Expect): not generated
TOUCHED = {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade",
           "proxy-connection", "host", "content-length", "expect", "x-forwarded-for",
           "x-forwarded-proto", "x-request-id"}
# visible bytes, obs-text (0x80-0xFF) too, with spaces and tabs inside (never at the edges)
FIELD_VALUE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0xFF,
                                             blacklist_characters="\x7f"),
                      min_size=0, max_size=20).flatmap(
    lambda v: st.sampled_from([v, f"{v} {v}" if v else "x", f"{v}\t{v}" if v else "y"]))
PATH = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-._~/?=&%+", max_size=30)


@st.composite
def valid_requests(draw) -> bytes:
    """A request as a client writes it canonically: HTTP/1.1, `Name: value` fields."""
    method = draw(st.sampled_from(["GET", "GET", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]))
    lines = [f"{method} /{draw(PATH)} HTTP/1.1", "Host: fuzz.example"]
    names = draw(st.lists(TOKEN.filter(lambda n: n.lower() not in TOUCHED), max_size=6))
    lines += [f"{n}: {draw(FIELD_VALUE)}" for n in names]
    body = b""
    if method in ("POST", "PUT", "PATCH"):
        body = draw(st.binary(max_size=300))
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@st.composite
def chunked_requests(draw) -> bytes:
    chunks = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=4))
    body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    return (b"POST /c HTTP/1.1\r\nHost: fuzz.example\r\nTransfer-Encoding: chunked\r\n\r\n"
            + body)


def split_at(data: bytes, cuts: list[float]) -> list[bytes]:
    points = sorted({int(c * len(data)) for c in cuts} - {0, len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


SPECIAL = st.sampled_from([b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b"\x7f", b"\xff",
                           b";", b",", b"0", b"-1", b"\r\n\r\n", b"Transfer-Encoding: chunked\r\n",
                           b"Content-Length: 5\r\n"])


@st.composite
def mutated_requests(draw) -> bytes:
    """Valid requests (one, or two pipelined, maybe chunked), then flipped, with CR, LF, NUL
    and other bytes inserted, ranges cut out or doubled, truncated."""
    data = draw(st.one_of(valid_requests(), chunked_requests()))
    if draw(st.booleans()):
        data += draw(st.one_of(valid_requests(), chunked_requests()))
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        op = draw(st.sampled_from(["flip", "insert", "insert", "delete", "double", "truncate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.one_of(SPECIAL, st.binary(min_size=1, max_size=4)))
        elif op == "delete":
            del data[at:at + draw(st.integers(1, 8))]
        elif op == "double":
            data[at:at] = data[at:at + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[at:]
    return bytes(data)


def send(port: int, pieces: list[bytes], ending: str, timeout: float = 3.0) -> bytes:
    """Send `pieces` (each its own segment, 1 ms apart), then end: "half" (FIN, then read until
    the proxy closes), "close" (at once, unread) or "reset" (RST)."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as c:
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for i, piece in enumerate(pieces):
                if i:
                    time.sleep(0.001)
                c.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            return b""  # (the proxy refused and closed before the rest went)
        if ending == "reset":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            return b""
        if ending == "close":
            return b""
        with contextlib.suppress(OSError):  # (the proxy may have answered and closed already)
            c.shutdown(socket.SHUT_WR)
        data = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := c.recv(65536):
                data += chunk
        return data


def group(lb: LbProcess) -> list[int]:
    return [lb.pid, *lb.workers()]


def rss_total(pids: list[int]) -> int:
    return sum(rss_kib(pid) for pid in pids)


def fuzz_cfg(port: int, server: ScriptedServer | str) -> dict:
    address = server if isinstance(server, str) else server.address
    return {
        "global": {"workers": 2},
        "frontends": {"www": {"bind": [f"{LOOPBACK}:{port}"], "default_backend": "app",
                              "timeout": {"http_request": "500ms", "client": "1s"}}},
        "backends": {"app": {"servers": [{"name": "s", "address": address}],
                             "pool_idle_timeout": "300ms"}},  # (descriptors settle sooner)
    }


async def fuzz_group(tmp_path, examples: int) -> tuple[dict, dict, int, int]:
    """Send `examples` mutated requests to a group; assert what must hold each time and after.
    Returns (descriptors before, after, RSS before, after) for the caller to print."""
    async with ScriptedServer("s") as s:  # (fails when it stops if it got anything but HTTP)
        port = free_port()
        async with LbProcess(tmp_path, fuzz_cfg(port, s)) as lb:
            pids = group(lb)
            assert len(pids) == 3
            # warm up: both workers have served and pooled (their steady state)
            for _ in range(20):
                await asyncio.to_thread(send, port, [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"], "half")
            await asyncio.sleep(0.5)
            base = await fds_settle(pids, fd_counts(pids), timeout=2)
            rss0 = rss_total(pids)

            @settings(max_examples=examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(data=mutated_requests(), cuts=st.lists(st.floats(0, 1), max_size=5),
                   ending=st.sampled_from(["half", "half", "close", "reset"]))
            def one(data, cuts, ending):
                got = send(port, split_at(data, cuts), ending)
                try:
                    done, _ = parse_cut_responses(got)
                except HttpParseError as e:
                    raise AssertionError(f"sent {data!r}, got {got!r}: {e}") from None
                seen[ending if ending != "half" else tuple(r.status for r in done)] += 1

            seen: Counter = Counter()
            await asyncio.to_thread(one)
            print(f"\nwhat came back: {dict(seen.most_common(12))}")
            assert group(lb) == pids  # no worker died (and none was replaced)
            after = await fds_settle(pids, base)
            rss1 = rss_total(pids)
            bad = [line for line in lb.err if "Traceback" in line or "Error" in line]
            assert not bad, lb.err[-40:]
            assert after == base
            return base, after, rss0, rss1


async def test_mutated_requests_never_crash_leak_or_trace(tmp_path):
    base, after, rss0, rss1 = await fuzz_group(tmp_path, 250)
    print(f"\n250 fuzzed connections: descriptors {base} -> {after}; RSS {rss0} -> {rss1} KiB")
    assert rss1 - rss0 < 16 * 1024


@pytest.mark.slow
async def test_two_thousand_fuzzed_connections_no_crash_no_traceback_no_leak(tmp_path):
    base, after, rss0, rss1 = await fuzz_group(tmp_path, 2000)
    print(f"\n2000 fuzzed connections: descriptors {base} -> {after}; RSS {rss0} -> {rss1} KiB")
    assert rss1 - rss0 < 24 * 1024


class Recorder(asyncio.Protocol):
    """A server that keeps every request's bytes exactly as they came (`got`), framed by
    Content-Length, and answers each with a small 200."""

    def __init__(self, got: list[bytes]):
        self.got = got
        self.buf = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = self.buf[:end + 4]
            m = re.search(rb"\r\ncontent-length: *(\d+)\r\n", head, re.IGNORECASE)
            size = len(head) + (int(m.group(1)) if m else 0)
            if len(self.buf) < size:
                return
            self.got.append(self.buf[:size])
            self.buf = self.buf[size:]
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


ADDED = b"X-Forwarded-For: 127.0.0.1\r\nX-Request-ID: (ours)\r\nx-forwarded-proto: http\r\n\r\n"


async def test_a_valid_request_split_anywhere_is_forwarded_byte_for_byte(tmp_path):
    got: list[bytes] = []
    loop = asyncio.get_running_loop()
    recorder = await loop.create_server(lambda: Recorder(got), LOOPBACK, 0)
    try:
        port = free_port()
        address = f"{LOOPBACK}:{recorder.sockets[0].getsockname()[1]}"
        async with LbProcess(tmp_path, fuzz_cfg(port, address)) as lb:
            pids = group(lb)

            @settings(max_examples=150, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(data=valid_requests(), cuts=st.lists(st.floats(0, 1), max_size=8))
            def one(data, cuts):
                before = len(got)
                answer = send(port, split_at(data, cuts), "half")
                assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer
                assert len(got) == before + 1
                head, _, body = data.partition(b"\r\n\r\n")
                # the same bytes, and after the client's fields the three we add
                assert our_ids(got[-1]) == head + b"\r\n" + ADDED + body

            await asyncio.to_thread(one)
            assert group(lb) == pids
            assert not [line for line in lb.err if "Traceback" in line], lb.err[-40:]
    finally:
        recorder.close()
