"""Frontends at run time: routing rules and, per frontend/backend pair, a precomputed route.

Rule of this module: everything a request needs from the configuration is computed here ahead
of time (lower-case byte strings, ready-made header lines, limits, timeouts, the retry policy)
into one `Route` per frontend/backend pair, so the hot path reads one object and never walks
chains of attributes.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from .backend import Backend
from .clientaddr import Edge
from .config import FrontendConfig, HeaderRules
from .shared import F_1XX, F_BYTES_IN, F_BYTES_OUT, F_SIZE

__all__ = ["Frontend", "HeaderPlan", "Route"]

# Hop-by-hop fields (RFC 9110 7.6.1), plus framing we redo ourselves; any Proxy-* goes too.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)


@dataclass(frozen=True, slots=True)
class HeaderPlan:
    """For one frontend/backend pair: request and response fields to drop (lower case, the
    hop-by-hop ones included) and lines to add (ready bytes; the request's end with the empty
    line that ends the head)."""

    req_drop: frozenset[bytes]
    req_add: bytes
    resp_drop: frozenset[bytes]
    resp_add: bytes
    resp_scan: re.Pattern[bytes]  # response field names to cut, or to read for framing


class Route:
    """What a request of one frontend routed to one backend needs, computed once."""

    __slots__ = (
        "alog",
        "backend",
        "fe",
        "fi",
        "max_body",
        "max_header_size",
        "max_headers",
        "ocls",
        "redispatch",
        "reject_underscore",
        "req_add",
        "req_drop",
        "req_memo",
        "req_scan",
        "resp_add",
        "resp_drop",
        "resp_memo",
        "resp_memo_close",
        "resp_scan",
        "retries",
        "timeouts",
        "xff",
        "xff_low",
    )

    def __init__(self, fe: Frontend, be: Backend | None, plan: HeaderPlan):
        self.fe = fe
        # counters (build.py): the frontend's index, for a server's responses by class
        # (`server.fcls[fi]`), and the cells of the proxy's own answers, ctr[ocls + status // 100]
        self.fi = 0
        self.ocls = F_1XX - 1
        self.alog = None  # AccessLog.request when an access log is configured (serving.py)
        self.backend = be
        self.req_drop = plan.req_drop
        self.req_add = plan.req_add
        self.resp_drop = plan.resp_drop
        self.resp_add = plan.resp_add
        self.resp_scan = plan.resp_scan
        limits = fe.cfg.limits
        self.max_body = limits.max_request_body
        self.max_header_size = limits.max_header_size
        self.max_headers = limits.max_headers
        self.reject_underscore = fe.cfg.reject_underscore_headers
        self.xff = fe.xff
        self.xff_low = fe.xff_low
        self.timeouts = be.timeouts if be is not None else None
        self.retries = be.retries if be is not None else 0
        self.redispatch = be.cfg.redispatch if be is not None else False
        self.req_scan = _request_scan(plan.req_drop, self.xff_low)
        # requests the simple path took lately, by their bytes (client.py `_simple`)
        self.req_memo: dict[bytes, tuple[bytes, bytes, bool, bytes]] = {}
        # response heads seen lately, whole, and what the client got for each (server.py)
        self.resp_memo: dict[bytes, tuple[bytes, int, int]] = {}
        # the same for clients that close after the response (another head: Connection: close)
        self.resp_memo_close: dict[bytes, tuple[bytes, int, int]] = {}


def _request_scan(drop: frozenset[bytes], xff_low: bytes | None) -> re.Pattern[bytes]:
    """The request field lines the simple path (`client.HttpSession._simple`) must look at,
    matched against b"\n" + the lower-cased field lines: Host and Connection, which it handles,
    and every name it leaves to the full path (framing, hop-by-hop, dropped or rewritten by the
    plan, X-Forwarded-For, Proxy-*, names with `_`, a client's X-Request-ID). Group 1 is the
    name, group 2 the value."""
    names = {*drop, *HOP_BY_HOP, b"host", b"content-length", b"expect", b"http2-settings",
             b"x-request-id"}
    if xff_low is not None:
        names.add(xff_low)
    alt = b"|".join([re.escape(n) for n in sorted(names, key=len, reverse=True)]
                    + [rb"proxy-[^:\n]*", rb"[^:\n]*_[^:\n]*"])
    return re.compile(rb"\n(" + alt + rb"): ([^\r\n]*)")


def _scan_pattern(drop: frozenset[bytes]) -> re.Pattern[bytes]:
    """Whole response field lines ("Name: value" CRLF) to cut (`drop`, any Proxy-*) or to read
    for framing (Content-Length, which is kept)."""
    names = sorted({*drop, b"content-length"}, key=len, reverse=True)
    alt = b"|".join([re.escape(n) for n in names] + [rb"proxy-[!#$%&'*+.^_`|~0-9a-z-]*"])
    # matched against b"\n" + the lower-cased field lines: case-sensitive, and a literal
    # newline to start from is much cheaper to scan for than a multi-line `^`; findall gives
    # (the line, lower-cased, without its CRLF; the name) for each; the LF is left for the
    # next line's match to start with
    return re.compile(rb"\n((" + alt + rb")[ \t]*:[^\r\n]*)\r")


def _rules(*rule_sets: HeaderRules) -> tuple[frozenset[bytes], bytes]:
    drop: set[bytes] = set()
    lines: list[bytes] = []
    for rules in rule_sets:
        for name in rules.delete:
            low = name.lower().encode("latin-1")
            drop.add(low)
            lines = [ln for ln in lines if not ln.lower().startswith(low + b":")]
        for name, value in rules.set:
            low = name.lower().encode("latin-1")
            drop.add(low)
            lines = [ln for ln in lines if not ln.lower().startswith(low + b":")]
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        for name, value in rules.add:
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
    return frozenset(drop), b"".join(lines)


class Frontend:
    __slots__ = (
        "alog",
        "cbase",
        "cfg",
        "client_timeout",
        "climits",
        "cls0",
        "ctr",
        "default",
        "edge",
        "fi",
        "forwarded_proto",
        "http_keep_alive",
        "http_request",
        "limits",
        "max_header_size",
        "max_headers",
        "max_uri",
        "mode",
        "name",
        "no_route",
        "o_bin",
        "o_bout",
        "plans",
        "reject_underscore",
        "relay_timer",
        "relays",
        "routes",
        "rules",
        "simple",
        "sweep_every",
        "sweep_th",
        "swept",
        "timeouts",
        "xff",
        "xff_except",
        "xff_low",
        "xff_start",
    )

    def __init__(self, cfg: FrontendConfig, backends: dict[str, Backend]):
        self.cfg = cfg
        self.name = cfg.name
        self.mode = cfg.mode
        self.alog = None  # AccessLog.request when an access log is configured (serving.py)
        # counters (shared.F_*): cells of this process's counter block, from `cbase` on
        self.ctr = memoryview(bytearray(F_SIZE * 8)).cast("q")
        self.cbase = 0
        self.climits = None  # limits.Limiter when per-client limits are set (limits.attach)
        self.cls0 = F_1XX - 1  # ctr[cls0 + status // 100]: own answers routed nowhere
        self.o_bin = F_BYTES_IN  # (absolute offsets of the hot path's cells)
        self.o_bout = F_BYTES_OUT
        self.fi = 0  # its index among the configuration's frontends
        self.timeouts = cfg.timeouts
        self.limits = cfg.limits
        # flat copies for the hot path (0 timeouts mean none: a day stands for never)
        self.max_uri = cfg.limits.max_uri
        self.max_headers = cfg.limits.max_headers
        self.max_header_size = cfg.limits.max_header_size
        self.http_request = cfg.timeouts.http_request or 86400.0
        self.client_timeout = cfg.timeouts.client or 86400.0
        self.http_keep_alive = cfg.timeouts.http_keep_alive or 86400.0
        self.default = backends[cfg.default_backend] if cfg.default_backend else None
        self.rules: list[tuple[bytes | None, bool, bytes | None, Backend]] = []
        for r in cfg.rules:
            host = r.host.encode() if r.host else None
            wildcard = bool(host and host.startswith(b"*."))
            if wildcard:
                host = host[1:]  # ".foobar.test": any subdomain
            prefix = r.path_prefix.encode() if r.path_prefix else None
            self.rules.append((host, wildcard, prefix, backends[r.backend]))
        ff = cfg.forwardfor
        self.xff = ff.header.encode("latin-1") if ff.enabled else None
        self.xff_except = ff.except_networks
        self.forwarded_proto = cfg.forwarded_proto
        self.xff_low = self.xff.lower() if self.xff is not None else None
        self.xff_start = self.xff + b": " if self.xff is not None else b""  # (its line's start)
        self.reject_underscore = cfg.reject_underscore_headers
        self.plans: dict[str, HeaderPlan] = {}
        for be in {b.name: b for b in [*(r[3] for r in self.rules), self.default] if b}.values():
            self.plans[be.name] = self._plan(be)
        self.routes = {name: Route(self, be, self.plans[name])
                       for name, be in ((b.name, b) for b in self._backends())}
        # for a request no rule routes (it gets 503): its head is still checked
        drop = HOP_BY_HOP | {b"x-forwarded-proto"}
        self.no_route = Route(self, None, HeaderPlan(drop, b"\r\n", HOP_BY_HOP, b"\r\n",
                                                     _scan_pattern(HOP_BY_HOP)))
        # the route of every request when there are no rules: the simple path needs no routing
        self.simple = self.routes[self.default.name] if self.default and not self.rules else None
        # accept-time rules and client addresses (clientaddr.py); None: nothing to check
        self.edge = Edge.from_config(cfg)
        # TCP mode: the connections relaying now, whose byte counts go to the counters each
        # second and at their end (proxy/tcp.py), and the timer that does it
        self.relays: set[Any] = set()
        self.relay_timer: Any = None
        # HTTP mode: the client connections whose first deadline (set at accept) the sweep holds,
        # the sweep's timer and period (proxy/base.py, ClientSide._arm_first)
        self.swept: set[Any] = set()
        self.sweep_th: Any = None
        self.sweep_every = min(1.0, self.http_request / 4)

    def _backends(self) -> list[Backend]:
        return list({b.name: b for b in [*(r[3] for r in self.rules), self.default] if b}.values())

    def _plan(self, be: Backend) -> HeaderPlan:
        req_drop, req_add = _rules(self.cfg.request_headers, be.cfg.request_headers)
        tls = self.cfg.tls
        if self.cfg.forwarded_proto:  # ours replaces whatever the client claimed
            req_drop |= {b"x-forwarded-proto"}
            req_add = (b"x-forwarded-proto: https\r\n" if tls is not None
                       else b"x-forwarded-proto: http\r\n") + req_add
        if tls is not None and tls.client_ca is not None:
            # mutual TLS: only we say who the client is (the value: per connection, client.py)
            req_drop |= {b"x-client-cert-subject"}
        resp_drop, resp_add = _rules(be.cfg.response_headers, self.cfg.response_headers)
        if self.cfg.hsts is not None:  # ours replaces the server's
            resp_drop |= {b"strict-transport-security"}
            resp_add += b"strict-transport-security: %s\r\n" % self.cfg.hsts.encode("latin-1")
        resp_drop = HOP_BY_HOP | resp_drop
        return HeaderPlan(HOP_BY_HOP | req_drop, req_add + b"\r\n", resp_drop,
                          resp_add + b"\r\n", _scan_pattern(resp_drop))

    def plan(self, be: Backend) -> HeaderPlan:
        return self.plans[be.name]

    def route(self, host: bytes | None, path: bytes) -> Backend | None:
        """The first rule whose host and path prefix both match, else the default backend.
        `host` is the lower-case host without its port."""
        for rhost, wildcard, prefix, be in self.rules:
            if rhost is not None:
                if host is None:
                    continue
                if wildcard:
                    if not host.endswith(rhost):
                        continue
                elif host != rhost:
                    continue
            if prefix is not None and not path.startswith(prefix):
                continue
            return be
        return self.default

    def forward_for(self, ip: str) -> bool:
        """Whether to add the forwarded-for header for a client at `ip`."""
        if self.xff is None:
            return False
        if self.xff_except:
            try:
                addr = ipaddress.ip_address(ip)
            except ValueError:
                return True
            return not any(addr in net for net in self.xff_except)
        return True
