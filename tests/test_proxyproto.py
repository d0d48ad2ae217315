"""Issue 12: the PROXY protocol's bytes (proxy/proxyproto.py) and the client address rules
(clientaddr.py), as pure functions: no sockets. Expected bytes are written out from HAProxy's
proxy-protocol.txt, not produced by the code under test."""

from __future__ import annotations

import ipaddress

import pytest

from foobar_lb.clientaddr import Networks, client_from_xff
from foobar_lb.proxy.proxyproto import (
    INCOMPLETE,
    NOT_PROXY,
    SIG_V2,
    ProxyError,
    build_v1,
    build_v2,
    header,
    parse,
    starts_like_proxy,
)

V2_TCP4 = (b"\r\n\r\n\x00\r\nQUIT\n"  # signature
           b"\x21"  # version 2, PROXY
           b"\x11"  # AF_INET, STREAM
           b"\x00\x0c"  # 12 bytes of addresses
           b"\xc0\x00\x02\x01"  # 192.0.2.1
           b"\xc6\x33\x64\x02"  # 198.51.100.2
           b"\x15\xb3"  # 5555
           b"\x00\x50")  # 80
V2_TCP6 = (SIG_V2 + b"\x21\x21\x00\x24"
           + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x01"  # 2001:db8::1
           + b"\x00" * 15 + b"\x01"  # ::1
           + b"\x04\xd2\x01\xbb")  # 1234, 443
V2_LOCAL = SIG_V2 + b"\x20\x00\x00\x00"


def test_v1_built_byte_for_byte():
    assert build_v1(("192.0.2.1", 5555), ("198.51.100.2", 80)) == (
        b"PROXY TCP4 192.0.2.1 198.51.100.2 5555 80\r\n")
    assert build_v1(("2001:db8::1", 1234), ("::1", 443)) == b"PROXY TCP6 2001:db8::1 ::1 1234 443\r\n"
    assert build_v1(None, None) == b"PROXY UNKNOWN\r\n"
    # one family per line: an IPv4 address beside an IPv6 one is written IPv4-mapped
    assert build_v1(("192.0.2.1", 1), ("::1", 2)) == b"PROXY TCP6 ::ffff:192.0.2.1 ::1 1 2\r\n"


def test_v2_built_byte_for_byte():
    assert build_v2(("192.0.2.1", 5555), ("198.51.100.2", 80)) == V2_TCP4
    assert build_v2(("2001:db8::1", 1234), ("::1", 443)) == V2_TCP6
    assert build_v2(None, None) == V2_LOCAL
    assert header("v1", None, None) == b"PROXY UNKNOWN\r\n"
    assert header("v2", None, None) == V2_LOCAL


def test_parse_v1_and_v2_with_what_follows():
    h = parse(b"PROXY TCP4 192.0.2.1 198.51.100.2 5555 80\r\nGET / HTTP/1.1\r\n")
    assert (h.version, h.length, h.src, h.dst) == (1, 43, ("192.0.2.1", 5555), ("198.51.100.2", 80))
    h = parse(V2_TCP4 + b"GET")
    assert (h.version, h.length, h.src, h.dst) == (2, 28, ("192.0.2.1", 5555), ("198.51.100.2", 80))
    h = parse(V2_TCP6)
    assert (h.length, h.src, h.dst) == (52, ("2001:db8::1", 1234), ("::1", 443))
    h = parse(V2_LOCAL)
    assert (h.length, h.src, h.dst) == (16, None, None)
    h = parse(b"PROXY UNKNOWN whatever\r\n")
    assert (h.length, h.src) == (24, None)
    # TLVs after the addresses are skipped (their length is in the header's)
    tlv = b"\x04\x00\x03abc"
    h = parse(SIG_V2 + b"\x21\x11\x00\x12" + V2_TCP4[16:] + tlv + b"rest")
    assert (h.length, h.src) == (34, ("192.0.2.1", 5555))


def test_parse_incomplete_and_not_proxy():
    for cut in (1, 5, 11, 15, 20, 27):
        assert parse(V2_TCP4[:cut]) == INCOMPLETE, cut
    assert parse(b"PROX") == INCOMPLETE
    assert parse(b"PROXY TCP4 192.0.2.1") == INCOMPLETE
    assert parse(b"GET / HTTP/1.1\r\n") == NOT_PROXY
    assert parse(b"\r\n\r\nX") == NOT_PROXY
    assert starts_like_proxy(b"PROXY ") is True
    assert starts_like_proxy(b"\r\n\r\n") is None
    assert starts_like_proxy(b"G") is False


@pytest.mark.parametrize("bad", [
    b"PROXY TCP4 192.0.2.1 198.51.100.2 5555\r\n",  # five fields
    b"PROXY TCP4 ::1 198.51.100.2 5555 80\r\n",  # an IPv6 address said to be TCP4
    b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 80\r\n",
    b"PROXY TCP4 192.0.2.1 198.51.100.2 05555 80\r\n",  # leading zero
    b"PROXY UDP4 192.0.2.1 198.51.100.2 5555 80\r\n",
    b"PROXY " + b"x" * 120,  # no CRLF within 107 bytes
    SIG_V2 + b"\x11\x11\x00\x0c" + V2_TCP4[16:],  # version 1 in a v2 signature
    SIG_V2 + b"\x22\x11\x00\x0c" + V2_TCP4[16:],  # command 2
    SIG_V2 + b"\x21\x11\x00\x08" + V2_TCP4[16:24],  # IPv4 addresses cut short
    SIG_V2 + b"\x21\x11\x10\x00",  # longer than we take
])
def test_parse_refuses_malformed_headers(bad: bytes):
    with pytest.raises(ProxyError):
        parse(bad)


def nets(*cidrs: str) -> Networks:
    return Networks(ipaddress.ip_network(c) for c in cidrs)


def test_networks_v4_v6_and_mapped():
    n = nets("10.0.0.0/8", "::1/128")
    assert "10.200.3.4" in n and b"10.0.0.1" in n
    assert "11.0.0.1" not in n and "::2" not in n and "not an address" not in n
    assert "::1" in n
    assert "::ffff:10.1.1.1" in n  # an IPv4-mapped peer on a dual-stack socket is IPv4


def test_client_from_xff_takes_the_rightmost_untrusted():
    trusted = nets("10.0.0.0/8")
    assert client_from_xff([b"203.0.113.9, 10.0.0.2"], trusted) == b"203.0.113.9"
    # a client may write anything left of the first trusted proxy: it is never believed
    assert client_from_xff([b"1.1.1.1, 203.0.113.9, 10.0.0.2"], trusted) == b"203.0.113.9"
    assert client_from_xff([b"1.1.1.1", b"203.0.113.9,10.0.0.7"], trusted) == b"203.0.113.9"
    assert client_from_xff([b"10.0.0.3, 10.0.0.2"], trusted) == b"10.0.0.3"  # all trusted
    assert client_from_xff([b"garbage, 10.0.0.2"], trusted) == b"10.0.0.2"
    assert client_from_xff([b"garbage"], trusted) is None
    assert client_from_xff([b"[2001:db8::5]:443, 10.0.0.2"], trusted) == b"2001:db8::5"
    assert client_from_xff([b"203.0.113.9:5000"], trusted) == b"203.0.113.9"
