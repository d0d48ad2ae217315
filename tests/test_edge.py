"""Issue 12, the edge: firewall rules at accept, trusted proxies' X-Forwarded-For, and the PROXY
protocol in and out, through a real load balancer on loopback sockets.

A recording backend keeps every byte each of its connections received, so what the proxy sent
(a PROXY header included) is checked byte for byte; it answers each request head with a fixed
response. Clients bound to 127.0.0.2 stand for a second machine.
"""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from foobar_lb import ConfigError
from foobar_lb.config import quick_config
from foobar_lb.proxy.proxyproto import SIG_V2, build_v1, build_v2
from foobar_lb.shared import F_CONNECTIONS, F_DENIED

from support import LOOPBACK, lb_config, our_ids, running_lb

XFP = b"X-Request-ID: (ours)\r\nx-forwarded-proto: http\r\n"  # (ids: support.our_ids)
OK = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"
GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


class Recorder(asyncio.Protocol):
    def __init__(self, srv: RecordingServer):
        self.srv = srv
        self.raw = b""
        self.answered = 0
        self.ended = False  # the proxy closed its side
        srv.conns.append(self)

    def eof_received(self):
        self.ended = True
        self.srv.changed.set()

    def connection_lost(self, exc):
        self.ended = True
        self.srv.changed.set()

    def connection_made(self, transport):
        self.transport = transport
        self.srv.changed.set()

    @property
    def data(self) -> bytes:
        """Every byte received, our request ids as `(ours)` (support.our_ids)."""
        return our_ids(self.raw)

    def data_received(self, data: bytes) -> None:
        self.raw += data
        if self.srv.http:
            # one answer per request head (after any PROXY header; bodies are not used here)
            while self.raw.count(b"\r\n\r\n") > self.answered:
                self.answered += 1
                self.transport.write(OK)
        else:
            self.transport.write(b"echo:" + data)
        self.srv.changed.set()


class RecordingServer:
    def __init__(self, http: bool = True, host: str = LOOPBACK):
        self.http = http
        self.host = host
        self.conns: list[Recorder] = []
        self.changed = asyncio.Event()

    async def __aenter__(self) -> RecordingServer:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Recorder(self), self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for c in self.conns:
            c.transport.abort()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def wait(self, pred, timeout: float = 3.0) -> None:
        async with asyncio.timeout(timeout):
            while not pred():
                self.changed.clear()
                await self.changed.wait()


async def talk(port: int, data: bytes, *, local: str | None = None, host: str = LOOPBACK,
               until: bytes | None = OK, timeout: float = 3.0) -> tuple[bytes, bool]:
    """Send `data` from `local` (an address to bind to), read until `until` has been seen
    or the connection closes. Returns (bytes read, closed by the other side)."""
    reader, writer = await asyncio.open_connection(
        host, port, local_addr=(local, 0) if local else None)
    got = b""
    closed = False
    try:
        writer.write(data)
        async with asyncio.timeout(timeout):
            while until is None or until not in got:
                try:
                    chunk = await reader.read(65536)
                except ConnectionResetError:
                    chunk = b""
                if not chunk:
                    closed = True
                    break
                got += chunk
    finally:
        writer.close()
    return got, closed


def denied(lb, name: str = "www") -> int:
    fe = lb.frontends[name]
    return fe.ctr[fe.cbase + F_DENIED]


# -- firewall rules ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["http", "tcp"])
async def test_a_client_outside_allow_is_refused_before_any_byte(mode):
    async with RecordingServer(http=mode == "http") as be:
        cfg = lb_config([be.address], mode=mode, frontend={"allow": ["127.0.0.1/32"]})
        async with running_lb(cfg) as lb:
            port = lb.address[1]
            got, closed = await talk(port, GET, local="127.0.0.2", until=None)
            assert (got, closed) == (b"", True)
            assert denied(lb) == 1
            fe = lb.frontends["www"]
            assert fe.ctr[fe.cbase + F_CONNECTIONS] == 0  # refused ones are not admitted
            assert be.conns == []  # no server was engaged
            got, closed = await talk(port, GET, local="127.0.0.1",
                                     until=OK if mode == "http" else b"echo:" + GET)
            assert got.endswith(OK if mode == "http" else b"echo:" + GET)
            assert denied(lb) == 1


async def test_deny_wins_over_allow():
    async with RecordingServer() as be:
        cfg = lb_config([be.address], frontend={"allow": ["127.0.0.0/8"],
                                                "deny": ["127.0.0.2/32"]})
        async with running_lb(cfg) as lb:
            port = lb.address[1]
            assert await talk(port, GET, local="127.0.0.2", until=None) == (b"", True)
            got, _ = await talk(port, GET, local="127.0.0.3")
            assert got.endswith(OK)
            assert denied(lb) == 1


async def test_an_ipv6_rule_on_loopback():
    async with RecordingServer() as be:
        cfg = lb_config([be.address], frontend={"bind": ["[::1]:0"], "deny": ["::1/128"]})
        async with running_lb(cfg) as lb:
            assert await talk(lb.address[1], GET, host="::1", until=None) == (b"", True)
            assert denied(lb) == 1
            assert be.conns == []
        cfg = lb_config([be.address], frontend={"bind": ["[::1]:0"], "allow": ["::1/128"]})
        async with running_lb(cfg) as lb:
            got, _ = await talk(lb.address[1], GET, host="::1")
            assert got.endswith(OK)
            assert be.conns[0].data == GET[:-2] + b"X-Forwarded-For: ::1\r\n" + XFP + b"\r\n"
            assert denied(lb) == 0


def test_quick_form_allow_and_deny():
    cfg = quick_config(["127.0.0.1:0"], ["127.0.0.1:9001"], allow=["10.0.0.0/8", "::1/128"],
                       deny=["10.1.0.0/16"])
    fe = cfg.frontends["main"]
    assert fe.allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert fe.deny == (ipaddress.ip_network("10.1.0.0/16"),)
    with pytest.raises(ConfigError) as info:
        quick_config(["127.0.0.1:0"], ["127.0.0.1:9001"], deny=["10.1.0.0/8"])
    assert info.value.line() == ('command line: --deny "10.1.0.0/8": expected a network like '
                                 '"10.0.0.0/8" or "::1/128" (no host bits set)')


# -- trusted proxies ----------------------------------------------------------------------------

def client_keys(lb) -> list[bytes]:
    return [s.client_key for s in lb.sessions]


async def test_a_spoofed_forwarded_for_from_an_untrusted_client_changes_nothing():
    async with RecordingServer() as be:
        cfg = lb_config([be.address], frontend={"trusted_proxies": ["10.0.0.0/8"]})
        async with running_lb(cfg) as lb:
            _, writer = await asyncio.open_connection(*lb.address)
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n")
                await be.wait(lambda: be.conns and be.conns[0].answered)
                # the client address stays the peer's, and the field is only appended to
                assert client_keys(lb) == [b"127.0.0.1"]
                assert be.conns[0].data == (b"GET / HTTP/1.1\r\nHost: x\r\n"
                                            b"X-Forwarded-For: 203.0.113.9, 127.0.0.1\r\n"
                                            + XFP + b"\r\n")
            finally:
                writer.close()


async def test_a_trusted_proxy_gives_the_rightmost_untrusted_address_per_request():
    async with RecordingServer() as be:
        cfg = lb_config([be.address], frontend={"trusted_proxies": ["127.0.0.0/8"]})
        async with running_lb(cfg) as lb:
            reader, writer = await asyncio.open_connection(*lb.address)
            try:
                writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n"
                             b"X-Forwarded-For: 1.1.1.1, 203.0.113.9, 127.0.0.5\r\n\r\n")
                await be.wait(lambda: be.conns and be.conns[0].answered == 1)
                assert client_keys(lb) == [b"203.0.113.9"]
                # what goes on is the usual append of the peer's address
                assert be.conns[0].data == (
                    b"GET / HTTP/1.1\r\nHost: x\r\n"
                    b"X-Forwarded-For: 1.1.1.1, 203.0.113.9, 127.0.0.5, 127.0.0.1\r\n" + XFP
                    + b"\r\n")
                await reader.readexactly(len(OK))
                # the next request on the connection without the field: the peer again (it
                # would take the simple path on a frontend without trusted proxies)
                writer.write(GET)
                await be.wait(lambda: be.conns[0].answered == 2)
                assert client_keys(lb) == [b"127.0.0.1"]
            finally:
                writer.close()


# -- PROXY protocol -------------------------------------------------------------------------------

V1_IN = b"PROXY TCP4 192.0.2.1 198.51.100.2 5555 80\r\n"
V2_IN = build_v2(("192.0.2.1", 5555), ("198.51.100.2", 80))
V2_IN6 = build_v2(("2001:db8::7", 4000), ("2001:db8::1", 443))


@pytest.mark.parametrize(("incoming", "send", "expected", "client"), [
    (V1_IN, "v1", V1_IN, b"192.0.2.1"),
    (V2_IN, "v2", V2_IN, b"192.0.2.1"),
    (V1_IN, "v2", V2_IN, b"192.0.2.1"),
    (V2_IN6, "v1", b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n", b"2001:db8::7"),
])
async def test_proxy_in_and_out_http_byte_for_byte(incoming, send, expected, client):
    async with RecordingServer() as be:
        cfg = lb_config([{"name": "s1", "address": be.address, "send_proxy": send}],
                        frontend={"accept_proxy": {"from": ["127.0.0.1/32"]}})
        async with running_lb(cfg) as lb:
            # the header and the request in one write, and split across writes
            got, _ = await talk(lb.address[1], incoming + GET)
            assert got == OK
            assert be.conns[0].data == (expected + GET[:-2] + b"X-Forwarded-For: "
                                        + client + b"\r\n" + XFP + b"\r\n")
            reader, writer = await asyncio.open_connection(*lb.address)
            try:
                for piece in (incoming[:7], incoming[7:], GET):
                    writer.write(piece)
                    await asyncio.sleep(0.02)
                assert await reader.readexactly(len(OK)) == OK
                assert set(client_keys(lb)) == {client}
            finally:
                writer.close()
            assert be.conns[1].data == be.conns[0].data


async def test_proxy_in_and_out_tcp_byte_for_byte():
    async with RecordingServer(http=False) as be:
        cfg = lb_config([{"name": "s1", "address": be.address, "send_proxy": "v1"}], mode="tcp",
                        frontend={"accept_proxy": {"from": ["127.0.0.1/32"]}})
        async with running_lb(cfg) as lb:
            await talk(lb.address[1], V2_IN + b"hello", until=b"hello")
            assert be.conns[0].data == V1_IN + b"hello"


async def test_send_proxy_without_proxy_in_carries_the_peer():
    async with RecordingServer() as be:
        cfg = lb_config([{"name": "s1", "address": be.address, "send_proxy": "v2"}])
        async with running_lb(cfg) as lb:
            reader, writer = await asyncio.open_connection(*lb.address)
            try:
                writer.write(GET)
                assert await reader.readexactly(len(OK)) == OK
                src = writer.get_extra_info("sockname")
                expected = build_v2((src[0], src[1]), lb.address)
                assert be.conns[0].data == (expected + GET[:-2] + b"X-Forwarded-For: 127.0.0.1\r\n"
                                            + XFP + b"\r\n")
            finally:
                writer.close()


async def test_a_proxy_header_from_an_untrusted_source_is_refused():
    async with RecordingServer() as be:
        cfg = lb_config([be.address], frontend={"accept_proxy": {"from": ["127.0.0.1/32"]}})
        async with running_lb(cfg) as lb:
            port = lb.address[1]
            for header in (V1_IN, V2_IN):
                got = await talk(port, header + GET, local="127.0.0.2", until=None)
                assert got == (b"", True), header
            # split so the first read is only a prefix of the signature
            reader, writer = await asyncio.open_connection(LOOPBACK, port,
                                                           local_addr=("127.0.0.2", 0))
            try:
                writer.write(b"PRO")
                await asyncio.sleep(0.05)
                writer.write(b"XY TCP4 192.0.2.1 198.51.100.2 5555 80\r\n" + GET)
                async with asyncio.timeout(3):
                    assert await reader.read() == b""
            finally:
                writer.close()
            assert denied(lb) == 3
            assert be.conns == []
            # the same source without a header is served as usual
            got, _ = await talk(port, GET, local="127.0.0.2")
            assert got == OK
            # a trusted source must send one
            assert await talk(port, GET, until=None) == (b"", True)
            assert denied(lb) == 4
            assert len(be.conns) == 1


async def test_allow_and_deny_apply_to_the_proxy_address():
    async with RecordingServer() as be:
        cfg = lb_config([be.address], frontend={"accept_proxy": {"from": ["127.0.0.1/32"]},
                                                "deny": ["192.0.2.0/24"]})
        async with running_lb(cfg) as lb:
            assert await talk(lb.address[1], V1_IN + GET, until=None) == (b"", True)
            assert denied(lb) == 1
            other = b"PROXY TCP4 198.51.100.7 198.51.100.2 5555 80\r\n"
            got, _ = await talk(lb.address[1], other + GET)
            assert got == OK
            assert b"X-Forwarded-For: 198.51.100.7\r\n" in be.conns[0].data


async def test_a_send_proxy_server_connection_is_not_reused_for_another_client():
    async with RecordingServer() as be:
        for send in (None, "v1"):
            be.conns.clear()
            server = {"name": "s1", "address": be.address}
            if send:
                server["send_proxy"] = send
            async with running_lb(lb_config([server])) as lb:
                ports = []
                for _ in range(2):  # one client after the other: the first one's idle server
                    reader, writer = await asyncio.open_connection(*lb.address)  # connection
                    try:  # would be pooled and handed to the second
                        for _ in range(2):  # the same client's requests share its own one
                            writer.write(GET)
                            assert await reader.readexactly(len(OK)) == OK
                        ports.append(writer.get_extra_info("sockname")[1])
                    finally:
                        writer.close()
                        await writer.wait_closed()
                if not send:
                    assert len(be.conns) == 1
                    continue
                assert len(be.conns) == 2
                for c, p in zip(be.conns, ports, strict=True):
                    assert c.data == (b"PROXY TCP4 127.0.0.1 127.0.0.1 %d %d\r\n" % (p, lb.address[1])
                                      + 2 * (GET[:-2] + b"X-Forwarded-For: 127.0.0.1\r\n" + XFP
                                             + b"\r\n"))
                # the first client's connection closed with it
                await be.wait(lambda: be.conns[0].ended)


@pytest.mark.parametrize(("send", "expected"), [("v1", b"PROXY UNKNOWN\r\n"),
                                                ("v2", SIG_V2 + b"\x20\x00\x00\x00")])
async def test_checks_to_a_send_proxy_server_send_a_header(send, expected):
    async with RecordingServer() as be:
        server = {"name": "s1", "address": be.address, "send_proxy": send,
                  "check": {"type": "http", "inter": "100ms", "jitter": 0}}
        async with running_lb(lb_config([server])):
            await be.wait(lambda: any(c.answered for c in be.conns))
            c = next(c for c in be.conns if c.answered)
            assert c.data.startswith(expected + b"GET / HTTP/1.1\r\n")


def test_build_v1_matches_incoming_example():
    assert build_v1(("192.0.2.1", 5555), ("198.51.100.2", 80)) == V1_IN



async def test_tcp_a_proxy_header_from_an_untrusted_source_reaches_no_server():
    async with RecordingServer(http=False) as be:
        cfg = lb_config([be.address], mode="tcp",
                        frontend={"accept_proxy": {"from": ["127.0.0.1/32"]}})
        async with running_lb(cfg) as lb:
            # (a tcp server may speak first, so its connection is made at accept: it gets
            # nothing from this client, and is closed with it)
            got = await talk(lb.address[1], V1_IN + b"hello", local="127.0.0.2", until=None)
            assert got == (b"", True)
            assert denied(lb) == 1
            assert all(c.data == b"" for c in be.conns)
            got, _ = await talk(lb.address[1], b"hello", local="127.0.0.2", until=b"echo:hello")
            assert got == b"echo:hello"


async def test_a_local_or_unknown_header_leaves_the_peer_address():
    async with RecordingServer() as be:
        cfg = lb_config([{"name": "s1", "address": be.address, "send_proxy": "v1"}],
                        frontend={"accept_proxy": {"from": ["127.0.0.1/32"]}})
        async with running_lb(cfg) as lb:
            for incoming in (SIG_V2 + b"\x20\x00\x00\x00", b"PROXY UNKNOWN\r\n"):
                reader, writer = await asyncio.open_connection(*lb.address)
                try:
                    writer.write(incoming + GET)
                    assert await reader.readexactly(len(OK)) == OK
                    assert set(client_keys(lb)) == {b"127.0.0.1"}
                    src = writer.get_extra_info("sockname")
                    assert be.conns[-1].data.startswith(build_v1(src, lb.address) + GET[:-2]
                                                        + b"X-Forwarded-For: 127.0.0.1\r\n")
                finally:
                    writer.close()
                    await writer.wait_closed()
