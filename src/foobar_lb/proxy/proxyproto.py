"""The PROXY protocol (HAProxy's proxy-protocol.txt), versions 1 and 2: parse and build.

Rule of this module: pure functions over bytes and address tuples; it never touches a socket,
never decides who may send a header (that is `clientaddr`) and never keeps state. `parse`
reads one header at the start of a buffer: it says "need more bytes", "not a header", or gives
the header's length and addresses, and raises `ProxyError` for a header that is malformed.
Addresses are (ip, port) tuples with the ip as text, as the socket module gives them.
"""

from __future__ import annotations

import socket
import struct

__all__ = [
    "INCOMPLETE",
    "NOT_PROXY",
    "SIG_V2",
    "ProxyError",
    "ProxyHeader",
    "build_v1",
    "build_v2",
    "header",
    "parse",
    "starts_like_proxy",
]

SIG_V2 = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the longest v1 line, CRLF included
V2_MAX = 16 + 536  # what we accept: the addresses plus a reasonable room for TLVs
INCOMPLETE = 0  # parse: more bytes are needed
NOT_PROXY = -1  # parse: the buffer does not start with a PROXY header

Addr = tuple[str, int]


class ProxyError(ValueError):
    """A PROXY header that is malformed (or too long)."""


class ProxyHeader:
    """A parsed header: `length` bytes at the start of the buffer; `src`/`dst` are None for a
    v2 LOCAL command, a v1 UNKNOWN line or an address family we do not carry (the connection's
    own addresses stand then)."""

    __slots__ = ("dst", "length", "src", "version")

    def __init__(self, version: int, length: int, src: Addr | None, dst: Addr | None):
        self.version = version
        self.length = length
        self.src = src
        self.dst = dst

    def __repr__(self) -> str:
        return f"<ProxyHeader v{self.version} {self.src} -> {self.dst} ({self.length} bytes)>"


def starts_like_proxy(data: bytes) -> bool | None:
    """Whether `data` (a connection's first bytes) starts a PROXY header: True, False, or None
    while it is too short to tell (a strict prefix of a signature)."""
    if data[:6] == b"PROXY " or data[:12] == SIG_V2:
        return True
    n = len(data)
    if n < 12 and (SIG_V2.startswith(data) or (n < 6 and b"PROXY ".startswith(data))):
        return None
    return False


def _ip(text: bytes, family: int) -> str:
    s = text.decode("ascii")
    try:
        socket.inet_pton(family, s)
    except (OSError, ValueError):
        raise ProxyError(f"bad address {text!r}") from None
    return s


def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise ProxyError(f"bad port {text!r}")
    n = int(text)
    if n > 65535:
        raise ProxyError(f"bad port {text!r}")
    return n


def parse(buf: bytes) -> ProxyHeader | int:
    """The header at the start of `buf`, or INCOMPLETE, or NOT_PROXY; ProxyError if broken."""
    like = starts_like_proxy(buf)
    if like is None:
        return INCOMPLETE
    if not like:
        return NOT_PROXY
    if buf[:1] == b"P":
        return _parse_v1(buf)
    return _parse_v2(buf)


def _parse_v1(buf: bytes) -> ProxyHeader | int:
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX:
            raise ProxyError("v1 line longer than 107 bytes")
        return INCOMPLETE
    parts = buf[:end].split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return ProxyHeader(1, end + 2, None, None)
    if len(parts) != 6:
        raise ProxyError("v1 line without its six fields")
    proto = parts[1]
    if proto == b"TCP4":
        family = socket.AF_INET
    elif proto == b"TCP6":
        family = socket.AF_INET6
    else:
        raise ProxyError(f"v1 protocol {proto!r}")
    src = (_ip(parts[2], family), _port(parts[4]))
    dst = (_ip(parts[3], family), _port(parts[5]))
    return ProxyHeader(1, end + 2, src, dst)


def _parse_v2(buf: bytes) -> ProxyHeader | int:
    if len(buf) < 16:
        return INCOMPLETE
    ver_cmd, fam, n = buf[12], buf[13], int.from_bytes(buf[14:16])
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"v2 version {ver_cmd >> 4}")
    cmd = ver_cmd & 0xF
    if cmd > 1:
        raise ProxyError(f"v2 command {cmd}")
    if 16 + n > V2_MAX:
        raise ProxyError("v2 header too long")
    if len(buf) < 16 + n:
        return INCOMPLETE
    length = 16 + n
    if cmd == 0:  # LOCAL: the sender's own connection (a health check); addresses ignored
        return ProxyHeader(2, length, None, None)
    family, transport = fam >> 4, fam & 0xF
    if transport not in (1, 2) and family != 0:
        raise ProxyError(f"v2 transport {transport}")
    body = buf[16:length]
    if family == 1:  # AF_INET
        if n < 12:
            raise ProxyError("v2 IPv4 addresses cut short")
        s, d, sp, dp = struct.unpack_from("!4s4sHH", body)
        return ProxyHeader(2, length, (socket.inet_ntop(socket.AF_INET, s), sp),
                           (socket.inet_ntop(socket.AF_INET, d), dp))
    if family == 2:  # AF_INET6
        if n < 36:
            raise ProxyError("v2 IPv6 addresses cut short")
        s, d, sp, dp = struct.unpack_from("!16s16sHH", body)
        return ProxyHeader(2, length, (socket.inet_ntop(socket.AF_INET6, s), sp),
                           (socket.inet_ntop(socket.AF_INET6, d), dp))
    if family in (0, 3):  # UNSPEC, or AF_UNIX: no address to carry
        return ProxyHeader(2, length, None, None)
    raise ProxyError(f"v2 address family {family}")


def _same_family(src: Addr, dst: Addr) -> tuple[Addr, Addr, bool]:
    """Both addresses in one family (an IPv4 one mapped into IPv6 when they differ); True:
    IPv6."""
    v6s, v6d = ":" in src[0], ":" in dst[0]
    if v6s == v6d:
        return src, dst, v6s
    if not v6s:
        src = ("::ffff:" + src[0], src[1])
    else:
        dst = ("::ffff:" + dst[0], dst[1])
    return src, dst, True


def build_v1(src: Addr | None, dst: Addr | None) -> bytes:
    """A v1 line carrying `src` -> `dst`; `PROXY UNKNOWN` without addresses."""
    if src is None or dst is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst, v6 = _same_family(src, dst)
    return b"PROXY %s %s %s %d %d\r\n" % (b"TCP6" if v6 else b"TCP4", src[0].encode(),
                                         dst[0].encode(), src[1], dst[1])


def build_v2(src: Addr | None, dst: Addr | None) -> bytes:
    """A v2 header carrying `src` -> `dst` over TCP (PROXY command); LOCAL without addresses."""
    if src is None or dst is None:
        return SIG_V2 + b"\x20\x00\x00\x00"
    src, dst, v6 = _same_family(src, dst)
    if v6:
        body = struct.pack("!16s16sHH", socket.inet_pton(socket.AF_INET6, src[0]),
                           socket.inet_pton(socket.AF_INET6, dst[0]), src[1], dst[1])
        return SIG_V2 + b"\x21\x21" + len(body).to_bytes(2) + body
    body = struct.pack("!4s4sHH", socket.inet_pton(socket.AF_INET, src[0]),
                       socket.inet_pton(socket.AF_INET, dst[0]), src[1], dst[1])
    return SIG_V2 + b"\x21\x11" + len(body).to_bytes(2) + body


def header(version: str, src: Addr | None, dst: Addr | None) -> bytes:
    """The header of `version` ("v1" or "v2") for `src` -> `dst` (None: a health check's)."""
    return build_v1(src, dst) if version == "v1" else build_v2(src, dst)
