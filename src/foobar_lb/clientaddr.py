"""Who the client is, and whether it may come in: a frontend's accept-time firewall rules
(`allow`/`deny`), PROXY protocol in (`accept_proxy`), trusted proxies' X-Forwarded-For
(`trusted_proxies`), and the PROXY header sent to a `send_proxy` server.

Rules of this module:
- `allow`/`deny` are checked on the peer address at accept, before any byte is read, and with
  `accept_proxy` on the PROXY address right after the header; deny wins, and with `allow` set
  anything not allowed is refused; a refused connection is closed and counted (F_DENIED);
- a session's client address lives in the session (`peer_ip`, and `client_key`: the address as
  bytes, what per-client limits key on); it is set at accept to the peer's, replaced by the
  PROXY header's source, and, per request, by the right-most untrusted X-Forwarded-For address
  when (and only when) the peer is a trusted proxy;
- nothing here costs a frontend without these keys anything: `Frontend.edge` is None then;
- it parses no HTTP and picks no server; the PROXY bytes themselves are `proxy.proxyproto`'s.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

from .proxy.proxyproto import INCOMPLETE, NOT_PROXY, ProxyError, header, parse, starts_like_proxy
from .shared import F_DENIED

__all__ = ["Edge", "Networks", "client_from_xff", "proxy_header", "read_header_before_tls",
           "send_proxy_header"]

PROXY_HEADER_TIMEOUT = 5.0  # a trusted source that does not finish its header within this
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(ip: str | bytes) -> tuple[int, int] | None:
    """(4 or 6, the address as an int), an IPv4-mapped IPv6 address as IPv4; None if not one."""
    if isinstance(ip, bytes):
        try:
            ip = ip.decode("ascii")
        except UnicodeDecodeError:
            return None
    try:
        if ":" in ip:
            n = int.from_bytes(socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0]))
            if n >> 32 == 0xFFFF:
                return 4, n & 0xFFFFFFFF
            return 6, n
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip))
    except (OSError, ValueError):
        return None


class Networks:
    """A set of CIDR networks, IPv4 and IPv6, tested with `ip in networks`."""

    __slots__ = ("v4", "v6")

    def __init__(self, nets: Iterable[Net]):
        self.v4: list[tuple[int, int]] = []
        self.v6: list[tuple[int, int]] = []
        for net in nets:
            mask = int(net.netmask)
            (self.v4 if net.version == 4 else self.v6).append((int(net.network_address), mask))

    def __contains__(self, ip: str | bytes) -> bool:
        a = _address(ip)
        if a is None:
            return False
        version, n = a
        return any(n & mask == net for net, mask in (self.v4 if version == 4 else self.v6))


def client_from_xff(values: Iterable[bytes], trusted: Networks) -> bytes | None:
    """The client address a trusted proxy's X-Forwarded-For gives: walking the addresses from
    the right, the first that is not a trusted proxy's; if all are trusted, the left-most. An
    entry that is not an address stops the walk (what is left of it cannot be trusted): the
    address right of it wins then, None if there is none."""
    items = [v.strip() for value in values for v in value.split(b",")]
    found = None
    for item in reversed(items):
        if item[:1] == b"[":  # "[v6]:port" or "[v6]"
            item = item[1:item.find(b"]")] if b"]" in item else item
        elif item.count(b":") == 1:  # "v4:port"
            item = item.split(b":", 1)[0]
        if _address(item) is None:
            return found
        found = item
        if item not in trusted:
            return item
    return found


def proxy_header(version: str, session) -> bytes:
    """The PROXY header for a `send_proxy` server: the client's address as the session knows it
    (from a PROXY header it received, else its connection's), and the address it reached."""
    p = session.proxied
    if not p:  # (None: no header; (): a header without addresses)
        t = session.transport
        src = t.get_extra_info("peername")
        dst = t.get_extra_info("sockname")
        if not isinstance(src, tuple) or not isinstance(dst, tuple):
            return header(version, None, None)
        return header(version, src[:2], dst[:2])
    return header(version, p[0], p[1])


def send_proxy_header(transport: asyncio.BaseTransport, version: str | None, session) -> None:
    """Write the PROXY header first on a new server connection, if the server wants one."""
    if version:
        transport.write(proxy_header(version, session))


class Edge:
    """A frontend's accept-time rules; None on a frontend without any (see `from_config`)."""

    __slots__ = ("allow", "deny", "proxy_from", "trusted")

    def __init__(self, allow: Networks | None, deny: Networks | None,
                 trusted: Networks | None, proxy_from: Networks | None):
        self.allow = allow
        self.deny = deny
        self.trusted = trusted
        self.proxy_from = proxy_from

    @classmethod
    def from_config(cls, cfg) -> Edge | None:
        allow, deny = cfg.allow, cfg.deny
        trusted, proxy = cfg.trusted_proxies, cfg.accept_proxy
        if not (allow or deny or trusted or proxy is not None):
            return None
        return cls(Networks(allow) if allow else None, Networks(deny) if deny else None,
                   Networks(trusted) if trusted else None,
                   Networks(proxy) if proxy is not None else None)

    def permits(self, ip: str) -> bool:
        if self.deny is not None and ip in self.deny:
            return False
        return self.allow is None or ip in self.allow

    def accept(self, session) -> bool:
        """At accept (the session's `peer_ip`, `peer_key`, `client_key` are the peer's): True
        to go on now; False when the connection was refused, or waits for its PROXY header
        (`session.accepted()` is called once it is read and allowed)."""
        ip = session.peer_ip
        if self.proxy_from is not None and session.proxied is None:
            if ip in self.proxy_from:
                _ProxyReader(self, session)
                return False
            _Sniffer(self, session)  # anyone else sending a PROXY header is refused
        return self.admit(session)

    def admit(self, session) -> bool:
        """The client address is known: the firewall rules, then trust for X-Forwarded-For."""
        if (self.allow is not None or self.deny is not None) and not self.permits(
                session.peer_ip):
            self.refuse(session)
            return False
        if self.trusted is not None and session.peer_ip in self.trusted:
            session.trust_xff(self.trusted)
        return True

    @staticmethod
    def refuse(session) -> None:
        fe = session.fe
        fe.ctr[fe.cbase + F_DENIED] += 1
        session.closing = True
        t = session.transport
        t.pause_reading()
        t.close()


class _Relay(asyncio.Protocol):
    """Stands in front of a session for its first bytes, forwarding everything else."""

    __slots__ = ("buf", "edge", "session", "transport")

    def __init__(self, edge: Edge, session) -> None:
        self.edge = edge
        self.session = session
        self.buf = b""
        self.transport = session.transport
        self.transport.set_protocol(self)

    def _hand_back(self, rest: bytes) -> None:
        s = self.session
        self.transport.set_protocol(s)
        if rest and not self.transport.is_closing():
            s.data_received(rest)

    def eof_received(self) -> bool | None:
        self.transport.set_protocol(self.session)
        return self.session.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.connection_lost(exc)

    def pause_writing(self) -> None:
        self.session.pause_writing()

    def resume_writing(self) -> None:
        self.session.resume_writing()


class _Sniffer(_Relay):
    """A source not allowed to send PROXY headers: its connection is refused if it starts with
    one (or with the start of one); any other first bytes go to the session as they are."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        like = starts_like_proxy(buf)
        if like is None:
            self.buf = buf
            return
        if like:
            Edge.refuse(self.session)
            return
        self._hand_back(buf)


class _ProxyReader(_Relay):
    """A source allowed (and bound) to send a PROXY header: it is read, the client address
    taken from it and checked, and only then is the session admitted."""

    __slots__ = ("timer",)

    def __init__(self, edge: Edge, session) -> None:
        super().__init__(edge, session)
        self.timer = asyncio.get_running_loop().call_later(PROXY_HEADER_TIMEOUT, self._late)

    def _late(self) -> None:
        self.timer = None
        Edge.refuse(self.session)

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        try:
            got = parse(buf)
        except ProxyError:
            got = NOT_PROXY
        if got == INCOMPLETE:
            self.buf = buf
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if got == NOT_PROXY:  # a trusted source must send one
            Edge.refuse(self.session)
            return
        s = self.session
        if got.src is not None:
            s.proxied = (got.src, got.dst)
            s.peer_ip = got.src[0]
            s.peer_key = s.client_key = got.src[0].encode()
        if not self.edge.admit(s):
            return
        self.transport.set_protocol(s)
        s.accepted()
        rest = buf[got.length:]
        if rest and not self.transport.is_closing():
            s.data_received(rest)

    def eof_received(self) -> bool:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        return False  # closed before its header was complete

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.session.connection_lost(exc)


async def read_header_before_tls(loop: asyncio.AbstractEventLoop, conn: socket.socket,
                                 edge: Edge) -> tuple | None:
    """For a TLS frontend with `accept_proxy`: read the PROXY header of a just-accepted socket
    and nothing after it (the TLS handshake that follows is the TLS layer's), before the socket
    is handed to the event loop with TLS. Returns what a session's `proxied` becomes: ((src,
    port), (dst, port)), or () for a header without addresses (LOCAL, UNKNOWN); None when the
    connection is to be closed (no header from a source that must send one, a malformed one,
    or none within PROXY_HEADER_TIMEOUT). A source not in `accept_proxy.from` sends no header:
    () as well, and its first bytes are left for TLS (a PROXY header there fails the
    handshake, so it is refused all the same)."""
    peer = conn.getpeername()
    if not isinstance(peer, tuple) or peer[0] not in edge.proxy_from:
        return ()
    deadline = loop.time() + PROXY_HEADER_TIMEOUT
    while True:
        try:
            buf = conn.recv(256, socket.MSG_PEEK)
        except BlockingIOError:
            buf = None
        except OSError:
            return None
        if buf == b"":
            return None  # closed before its header
        if buf:
            try:
                got = parse(buf)
            except ProxyError:
                return None
            if got == NOT_PROXY:
                return None
            if got != INCOMPLETE:
                try:
                    conn.recv(got.length)  # exactly the header: it is there already
                except OSError:
                    return None
                return (got.src, got.dst) if got.src is not None else ()
        left = deadline - loop.time()
        if left <= 0:
            return None
        if buf:
            # (a peek leaves the bytes unread, so readiness would fire at once again: wait a
            # little for the rest of a header split across segments, which is rare)
            await asyncio.sleep(0.005)
            continue
        ready = loop.create_future()
        loop.add_reader(conn.fileno(), _wake, ready)
        try:
            await asyncio.wait_for(ready, left)
        except TimeoutError:
            return None
        finally:
            loop.remove_reader(conn.fileno())


def _wake(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)
