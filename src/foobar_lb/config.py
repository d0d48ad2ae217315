"""Configuration: TOML (or a plain dict) in, frozen typed objects out.

Rule of this module: nothing here touches a socket. Every mistake raises ConfigError naming the
key path, the bad value and what was expected, in one line; unknown keys are mistakes too.
Values left out come from `[defaults]`, then from the built-in defaults below (which follow
HAProxy's documented defaults where it has them, and are stated in the README).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import string
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .units import DURATION_EXPECTED, SIZE_EXPECTED, parse_duration, parse_size

__all__ = [
    "Address",
    "AlertsConfig",
    "BackendConfig",
    "CheckConfig",
    "Config",
    "ConfigError",
    "ForwardFor",
    "FrontendConfig",
    "GlobalConfig",
    "HeaderRules",
    "Limits",
    "LogConfig",
    "MetricsConfig",
    "RateLimit",
    "Rule",
    "ServerConfig",
    "ServerTls",
    "Timeouts",
    "TlsCert",
    "TlsConfig",
    "load_config",
    "parse_address",
    "parse_config",
    "quick_config",
]

MODES = ("http", "tcp")
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_WEIGHT = 256


class ConfigError(ValueError):
    """A configuration mistake: `path` is the key path, the message says what was expected."""

    def __init__(self, path: str, message: str, source: str | None = None):
        self.path = path
        self.message = message
        self.source = source
        super().__init__(self.line())

    def line(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.path}{self.message}" if self.path else f"{where}{self.message}"


def _bad(path: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(path, f" = {_show(value)}: expected {expected}")


def _bad_key(path: str, expected: str) -> ConfigError:
    """A bad key name (the last part of `path`): the key is not a value, so it is not repeated."""
    return ConfigError(path, f": invalid name; expected {expected}")


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------------------------
# The typed objects


@dataclass(frozen=True, slots=True)
class Address:
    host: str  # "" means every interface (bind only)
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else (self.host or "*")
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; 0 disables a timeout."""

    connect: float = 5.0
    client: float = 30.0
    server: float = 30.0
    http_request: float = 10.0
    http_keep_alive: float = 10.0
    queue: float = 5.0
    tunnel: float = 3600.0


FRONTEND_TIMEOUTS = ("client", "http_request", "http_keep_alive")
BACKEND_TIMEOUTS = ("connect", "server", "queue", "tunnel")


@dataclass(frozen=True, slots=True)
class Limits:
    max_request_body: int = 0  # 0: no limit
    max_uri: int = 8192
    max_header_size: int = 16384  # request line and headers together
    max_headers: int = 101
    # a request body slower than this (bytes a second, over each 5 s window) gets 408; 0: off
    min_body_rate: int = 1024


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A frontend's token bucket per client: `requests` per `per` seconds, `burst` at most."""

    requests: int
    per: float
    burst: int


@dataclass(frozen=True, slots=True)
class HeaderRules:
    """Applied in the order delete, set, add (names compared case-insensitively)."""

    delete: tuple[str, ...] = ()
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.delete or self.set or self.add)


@dataclass(frozen=True, slots=True)
class ForwardFor:
    enabled: bool = True
    header: str = "X-Forwarded-For"
    except_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    backend: str
    host: str | None = None  # lower case; may start with "*." for any subdomain
    path_prefix: str | None = None


@dataclass(frozen=True, slots=True)
class CheckConfig:
    """An active health check, with every default already resolved."""

    type: str = "tcp"  # "tcp": the connection is made; "http": and the answer has an expected status
    method: str = "GET"
    path: str = "/"
    host: str | None = None  # Host header of http checks (default: the server's address)
    expect: tuple[tuple[int, int], ...] = ((200, 399),)  # inclusive status ranges
    inter: float = 2.0  # between checks of a server that is up and steady
    fastinter: float = 2.0  # while it is changing state (up but failing, down but passing)
    downinter: float = 2.0  # while it is down
    rise: int = 2
    fall: int = 3
    timeout: float = 2.0  # for the whole check, connect included
    port: int | None = None  # check another port than the traffic port
    jitter: float = 0.1  # each interval is stretched or shrunk by up to this fraction


@dataclass(frozen=True, slots=True)
class TlsCert:
    """A certificate chain and its key (PEM files); `path`: its key path, for messages."""

    cert: str
    key: str
    path: str = ""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """HTTPS on a frontend: the first certificate is the default, the others chosen by SNI."""

    certificates: tuple[TlsCert, ...]
    min_version: str = "1.2"  # "1.2" or "1.3"
    client_ca: str | None = None  # mutual TLS: CA file client certificates are checked against
    verify_client: str = "none"  # "none", "optional" or "required" ("required" with client_ca)
    path: str = ""  # its key path, for messages


@dataclass(frozen=True, slots=True)
class ServerTls:
    """TLS to a server (a backend's, or one server's own)."""

    verify: bool = True
    ca: str | None = None  # None: the system's CAs
    sni: str | None = None  # None: the server's host (if it is a name)
    cert: str | None = None  # a client certificate to present
    key: str | None = None
    path: str = ""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    name: str
    address: Address
    weight: int = 1
    backup: bool = False
    maxconn: int = 0  # 0: no limit
    check: CheckConfig | None = None  # None: no active check (the server counts as up)
    command: tuple[str, ...] = ()  # a managed server: the command line that runs it
    env: tuple[tuple[str, str], ...] = ()  # extra environment for the command
    send_proxy: str | None = None  # "v1" or "v2": a PROXY header first on each connection
    tls: ServerTls | None = None  # TLS to this server (its own, else its backend's)


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    name: str
    bind: tuple[Address, ...]
    mode: str = "http"
    default_backend: str | None = None
    rules: tuple[Rule, ...] = ()
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    forwardfor: ForwardFor = field(default_factory=ForwardFor)
    forwarded_proto: bool = True
    request_headers: HeaderRules = field(default_factory=HeaderRules)
    response_headers: HeaderRules = field(default_factory=HeaderRules)
    reject_underscore_headers: bool = False  # refuse any field name with "_" (400)
    # client addresses (clientaddr.py): firewall rules at accept, trusted X-Forwarded-For,
    # PROXY protocol in (None: off; else the sources that may, and must, send a header)
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    accept_proxy: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None = None
    rate_limit: RateLimit | None = None  # requests per client address (whole group)
    max_client_connections: int = 0  # connections at once per client address; 0: no limit
    tls: TlsConfig | None = None  # HTTPS termination
    hsts: str | None = None  # Strict-Transport-Security value added to responses
    redirect_https: int | None = None  # plain HTTP: 301 every request to https on this port


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    servers: tuple[ServerConfig, ...]
    mode: str = "http"
    balance: str = "roundrobin"
    timeouts: Timeouts = field(default_factory=Timeouts)
    retries: int = 3
    redispatch: bool = True
    # an idempotent request with no answer within timeout.server goes again (HAProxy's
    # `retry-on response-timeout`); off by default: a slow, costly request would run everywhere
    retry_on_timeout: bool = False
    request_headers: HeaderRules = field(default_factory=HeaderRules)
    response_headers: HeaderRules = field(default_factory=HeaderRules)
    observe: str = "none"  # passive observation: "none", "layer4" or "layer7"
    error_limit: int = 10  # consecutive observed errors that mark a server down
    allbackups: bool = False
    maxqueue: int = 1024  # requests waiting for a free server before 503s start
    http_reuse: str = "safe"  # "safe" or "never"
    pool_max_idle: int = 1024  # idle kept-alive connections per server
    pool_idle_timeout: float = 5.0
    tls: ServerTls | None = None  # TLS to the servers (a server's own `tls` wins)
    check: CheckConfig | None = None  # the backend's own `check` (servers added at run time)


def default_backlog() -> int:
    """The kernel's somaxconn (what listen() is capped at), and at least 4096 (HAProxy's)."""
    try:
        with open("/proc/sys/net/core/somaxconn") as f:
            return max(int(f.read().strip()), 4096)
    except (OSError, ValueError):
        return 4096


@dataclass(frozen=True, slots=True)
class GlobalConfig:
    grace: float = 10.0  # SIGTERM: how long requests in flight get to finish
    log_level: str = "info"
    maxconn: int = 20000  # client connections served at once (whole group); more wait unread
    data_dir: str = "foobar-data"  # {data_dir} in managed servers' commands
    startup_timeout: float = 30.0  # how long managed servers get to come up before we serve
    workers: int | str = 1  # worker processes; "auto": the CPUs this process may use
    hard_stop_after: float = 30.0  # reload: old workers are stopped this long after it
    backlog: int = 0  # listen backlog; 0: default_backlog()
    user: str | None = None  # drop root to this user after binding
    group: str | None = None
    limit_table_size: int = 100000  # clients the per-client limits remember (whole group)
    ipv6_prefix: int = 64  # IPv6 clients are one client per prefix of this length
    max_open_files: int = 0  # each process's RLIMIT_NOFILE (HAProxy's ulimit-n); 0: fit maxconn

    @property
    def worker_count(self) -> int:
        if self.workers == "auto":
            import os

            return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
                os.cpu_count() or 1)
        return int(self.workers)

    @property
    def listen_backlog(self) -> int:
        return self.backlog or default_backlog()


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """[admin]: the master's admin listener (stats page, metrics, runtime API)."""

    bind: Address
    token: str | None = None  # required when `bind` is not a loopback address
    path: str = "admin"


# the response, connect and queue time histograms' bucket bounds (seconds), by default:
# Prometheus's default buckets with finer ones below 5ms (a load balancer's times are short)
DEFAULT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """[metrics]: what the counters shared by the workers record (always on)."""

    buckets: tuple[float, ...] = DEFAULT_BUCKETS  # histogram bounds in seconds, increasing


@dataclass(frozen=True, slots=True)
class AlertsConfig:
    """Where events about server, backend and database states go (alerts.py); off when there
    is neither a webhook nor a command."""

    webhooks: tuple[str, ...] = ()  # http:// or https:// URLs, each POSTed the event's JSON
    command: tuple[str, ...] = ()  # argv run once per event, the event's JSON on its stdin
    flap_window: float = 60.0  # at most 3 events per server per window, then one summary
    timeout: float = 5.0  # one attempt (a POST, a run of the command)
    retries: int = 3  # further attempts after a failed one
    backoff: float = 1.0  # before the first retry, doubling after each (at most 30s)
    queue: int = 1000  # events waiting per target; more are dropped and counted

    @property
    def enabled(self) -> bool:
        return bool(self.webhooks or self.command)


@dataclass(frozen=True, slots=True)
class LogConfig:
    """`[log]`: the access log (accesslog.py). `access`: None (off), "stdout", "stderr", a
    file path, or "syslog:host:port" (then `syslog_host`/`syslog_port` are set)."""

    access: str | None = None
    format: str = "text"  # "text" or "json"
    buffer: int = 1 << 20  # bytes of lines a worker holds for its writer; beyond: dropped, counted
    syslog_format: str = "rfc5424"  # or "rfc3164"
    syslog_host: str | None = None
    syslog_port: int = 0


@dataclass(frozen=True, slots=True)
class Config:
    frontends: Mapping[str, FrontendConfig]
    backends: Mapping[str, BackendConfig]
    settings: GlobalConfig = field(default_factory=GlobalConfig)
    source: str | None = None  # the file it came from, for messages
    admin: AdminConfig | None = None  # None: no admin listener
    alerts: AlertsConfig = field(default_factory=AlertsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def __reduce__(self):  # a mapping proxy does not pickle: workers get a Config this way
        return (_rebuild_config, (dict(self.frontends), dict(self.backends), self.settings,
                                  self.source, self.admin, self.alerts, self.log, self.metrics))


def _rebuild_config(frontends, backends, settings, source, admin=None, alerts=None,
                    log=None, metrics=None) -> Config:
    return Config(MappingProxyType(frontends), MappingProxyType(backends), settings, source,
                  admin, alerts or AlertsConfig(), log or LogConfig(), metrics or MetricsConfig())


# ---------------------------------------------------------------------------------------------
# Reading: one small checked view per TOML table


class _Table:
    """A TOML table being read: knows its key path and refuses keys it was not told about."""

    __slots__ = ("data", "path")

    def __init__(self, data: Any, path: str, allowed: tuple[str, ...], what: str = "a table"):
        if not isinstance(data, dict):
            raise _bad(path, data, what)
        for key in data:
            if key not in allowed:
                raise ConfigError(
                    self._join(path, key), f": unknown key; expected one of {', '.join(allowed)}"
                )
        self.data = data
        self.path = path

    @staticmethod
    def _join(path: str, key: str) -> str:
        shown = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)
        return f"{path}.{shown}" if path else shown

    def key(self, key: str) -> str:
        return self._join(self.path, key)

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, conv: Callable[[Any, str], Any], default: Any) -> Any:
        if key not in self.data:
            return default
        return conv(self.data[key], self.key(key))

    def need(self, key: str, conv: Callable[[Any, str], Any], expected: str) -> Any:
        if key not in self.data:
            raise ConfigError(self.key(key), f": missing; expected {expected}")
        return conv(self.data[key], self.key(key))


def _str(value: Any, path: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(path, value, "a non-empty string")
    return value


def _bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _bad(path, value, "true or false")
    return value


def _int(lo: int, hi: int | None = None) -> Callable[[Any, str], int]:
    def conv(value: Any, path: str) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if ok and value >= lo and (hi is None or value <= hi):
            return value
        span = f"from {lo} to {hi}" if hi is not None else f"of at least {lo}"
        raise _bad(path, value, f"an integer {span}")

    return conv


def _choice(choices: tuple[str, ...]) -> Callable[[Any, str], str]:
    def conv(value: Any, path: str) -> str:
        if isinstance(value, str) and value in choices:
            return value
        raise _bad(path, value, "one of " + ", ".join(f'"{c}"' for c in choices))

    return conv


def _duration(value: Any, path: str) -> float:
    try:
        return parse_duration(value)
    except ValueError:
        raise _bad(path, value, DURATION_EXPECTED) from None


def _size(value: Any, path: str) -> int:
    try:
        return parse_size(value)
    except ValueError:
        raise _bad(path, value, SIZE_EXPECTED) from None


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_NAME_EXPECTED = "a name of letters, digits, '-', '_', '.' or ':' (at most 64)"


def _name(value: Any, path: str) -> str:
    if isinstance(value, str) and _NAME.fullmatch(value):
        return value
    raise _bad(path, value, _NAME_EXPECTED)


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


_HEADER_NAME_EXPECTED = "an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"


def _header_name(value: Any, path: str) -> str:
    if isinstance(value, str) and _TOKEN.fullmatch(value):
        return value
    raise _bad(path, value, _HEADER_NAME_EXPECTED)


def _header_value(value: Any, path: str) -> str:
    if isinstance(value, str) and _FIELD_VALUE.fullmatch(value) and value == value.strip():
        return value
    raise _bad(path, value, "a header value without control characters or edge spaces")


_ADDR = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]\s]*)):(?P<port>\d{1,5})$")


def parse_address(text: str, *, allow_any_host: bool, allow_port_zero: bool) -> Address:
    """Parse "host:port", "[v6]:port" and, for binds, "*:port" / ":port" (every interface)."""
    m = _ADDR.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError("not host:port")
    port = int(m.group("port"))
    if port > 65535 or (port == 0 and not allow_port_zero):
        raise ValueError("bad port")
    if m.group("v6") is not None:
        host = str(ipaddress.IPv6Address(m.group("v6")))
    else:
        host = m.group("host")
        if host == "*":
            host = ""
        if not host and not allow_any_host:
            raise ValueError("no host")
    return Address(host, port)


def _bind_address(value: Any, path: str) -> Address:
    try:
        return parse_address(value, allow_any_host=True, allow_port_zero=True)
    except ValueError:
        raise _bad(
            path, value, 'an address "host:port" with a port from 0 to 65535, like "127.0.0.1:8080", '
                         '"[::1]:8080" or "*:8080"'
        ) from None


def _server_address(value: Any, path: str) -> Address:
    try:
        return parse_address(value, allow_any_host=False, allow_port_zero=False)
    except ValueError:
        raise _bad(path, value, 'a server address "host:port" with a port from 1 to 65535') from None


def _list_of(conv: Callable[[Any, str], Any], what: str, *, single_ok: bool = False):
    def read(value: Any, path: str) -> tuple:
        if single_ok and isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not value:
            raise _bad(path, value, f"a non-empty list of {what}")
        return tuple(conv(item, f"{path}[{i}]") for i, item in enumerate(value))

    return read


# ---------------------------------------------------------------------------------------------
# Sections

_TIMEOUT_KEYS = tuple(Timeouts.__dataclass_fields__)
_LIMIT_KEYS = ("max_request_body", "max_uri", "max_header_size", "max_headers", "min_body_rate")


def _timeouts(value: Any, path: str, base: Timeouts, allowed: tuple[str, ...]) -> Timeouts:
    t = _Table(value, path, allowed, "a table of durations")
    return replace(base, **{k: _duration(v, t.key(k)) for k, v in t.data.items()})


def _limits(value: Any, path: str, base: Limits) -> Limits:
    t = _Table(value, path, _LIMIT_KEYS)
    out = {}
    for key, raw in t.data.items():
        if key == "max_headers":
            out[key] = _int(1, 10000)(raw, t.key(key))
        else:
            n = _size(raw, t.key(key))
            if key not in ("max_request_body", "min_body_rate") and n < 64:
                raise _bad(t.key(key), raw, "a size of at least 64 bytes")
            out[key] = n
    return replace(base, **out)


def _header_rules(value: Any, path: str) -> HeaderRules:
    t = _Table(value, path, ("delete", "set", "add"))

    def pairs(raw: Any, p: str) -> tuple[tuple[str, str], ...]:
        tt = _Table(raw, p, tuple(raw) if isinstance(raw, dict) else (), "a table of name = value")
        out = []
        for name, v in tt.data.items():
            if not _TOKEN.fullmatch(name):
                raise _bad_key(tt.key(name), _HEADER_NAME_EXPECTED)
            values = v if isinstance(v, list) else [v]
            for i, one in enumerate(values):
                out.append((name, _header_value(one, tt.key(name) + (f"[{i}]" if v is values else ""))))
        return tuple(out)

    return HeaderRules(
        delete=t.get("delete", _list_of(_header_name, "header names"), ()),
        set=t.get("set", pairs, ()),
        add=t.get("add", pairs, ()),
    )


def _forwardfor(value: Any, path: str) -> ForwardFor:
    if isinstance(value, bool):
        return ForwardFor(enabled=value)
    t = _Table(value, path, ("enabled", "header", "except"), "true, false or a table")

    def network(raw: Any, p: str):
        try:
            return ipaddress.ip_network(raw, strict=False)
        except (TypeError, ValueError):
            raise _bad(p, raw, 'a network like "10.0.0.0/8" or "::1"') from None

    return ForwardFor(
        enabled=t.get("enabled", _bool, True),
        header=t.get("header", _header_name, "X-Forwarded-For"),
        except_networks=t.get("except", _list_of(network, "networks"), ()),
    )


def _cidr(raw: Any, path: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(raw, strict=True)
    except (TypeError, ValueError):
        raise _bad(path, raw, 'a network like "10.0.0.0/8" or "::1/128" (no host bits set)'
                   ) from None


_CIDRS = _list_of(_cidr, 'networks like ["10.0.0.0/8"]', single_ok=True)


def _accept_proxy(value: Any, path: str):
    t = _Table(value, path, ("from",), 'a table { from = ["127.0.0.1/32"] }')
    return t.need("from", _CIDRS, 'a list of networks like ["127.0.0.1/32"]')


def _rule(value: Any, path: str) -> Rule:
    t = _Table(value, path, ("host", "path_prefix", "backend"), "a table {host, path_prefix, backend}")

    def host(raw: Any, p: str) -> str:
        ok = isinstance(raw, str) and re.fullmatch(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", raw)
        if not ok:
            raise _bad(p, raw, 'a host name like "api.foobar.test" or "*.foobar.test"')
        return raw.lower()

    def prefix(raw: Any, p: str) -> str:
        if isinstance(raw, str) and raw.startswith("/") and raw.isprintable() and " " not in raw:
            return raw
        raise _bad(p, raw, 'a path prefix starting with "/"')

    rule = Rule(
        backend=t.need("backend", _str, "the name of a backend"),
        host=t.get("host", host, None),
        path_prefix=t.get("path_prefix", prefix, None),
    )
    if rule.host is None and rule.path_prefix is None:
        raise ConfigError(path, ": a rule needs host, path_prefix or both")
    return rule


PLACEHOLDERS = ("python", "data_dir", "name", "address", "host", "port", "backend")


def _command(value: Any, path: str) -> tuple[str, ...]:
    expected = 'a command line: a list of strings like ["{python}", "-m", "foobar_app", "serve"]'
    if isinstance(value, str):
        try:
            value = shlex.split(value)
        except ValueError:
            raise _bad(path, value, expected) from None
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise _bad(path, value, expected)
    for i, arg in enumerate(value):
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(arg) if f is not None]
        except ValueError:
            raise _bad(f"{path}[{i}]", arg, "balanced {placeholders} ({{ and }} for braces)") from None
        for f in fields:
            if f not in PLACEHOLDERS:
                raise _bad(f"{path}[{i}]", arg, "placeholders among "
                           + ", ".join("{" + p + "}" for p in PLACEHOLDERS))
    return tuple(value)


def _env(value: Any, path: str) -> tuple[tuple[str, str], ...]:
    t = _Table(value, path, tuple(value) if isinstance(value, dict) else (), "a table of NAME = value")
    out = []
    for k, v in t.data.items():
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k):
            raise _bad_key(t.key(k), "an environment variable name")
        if not isinstance(v, str):
            raise _bad(t.key(k), v, "a string")
        out.append((k, v))
    return tuple(out)


def _server(value: Any, path: str, index: int, check: CheckConfig | None,
            check_raw: dict | None) -> ServerConfig:
    t = _Table(value, path, ("name", "address", "weight", "backup", "maxconn", "check", "command",
                             "env", "send_proxy", "tls"),
               "a table {name, address, weight, backup, maxconn, check, command, env, send_proxy, tls}")
    if t.has("check"):
        raw = t.data["check"]
        if isinstance(raw, bool):
            check = (check or _check({}, t.key("check"))) if raw else None
        else:  # this server's keys over the backend's
            _check(raw, t.key("check"))  # errors name the server's own keys
            check = _check({**(check_raw or {}), **raw}, t.key("check"))
    command = t.get("command", _command, ())
    if command and check is None and not t.has("check"):
        check = _check({"inter": "1s"}, t.key("check"))  # a managed server needs a way back up
    return ServerConfig(
        name=t.get("name", _name, f"server-{index + 1}"),
        address=t.need("address", _server_address, 'a server address "host:port"'),
        weight=t.get("weight", _int(0, MAX_WEIGHT), 1),
        backup=t.get("backup", _bool, False),
        maxconn=t.get("maxconn", _int(0), 0),
        check=check,
        command=command,
        tls=t.get("tls", _server_tls, None),
        env=t.get("env", _env, ()),
        send_proxy=t.get("send_proxy", _choice(("v1", "v2")), None),
    )


_CHECK_KEYS = ("type", "method", "path", "host", "expect", "inter", "fastinter", "downinter",
               "rise", "fall", "timeout", "port", "jitter")


def _statuses(value: Any, path: str) -> tuple[tuple[int, int], ...]:
    expected = 'a status like 200, a range like "200-399", or a list of them'
    items = value if isinstance(value, list) and value else [value]
    out = []
    for item in items:
        lo = hi = None
        if isinstance(item, int) and not isinstance(item, bool):
            lo = hi = item
        elif isinstance(item, str):
            m = re.fullmatch(r"\s*(\d{3})\s*(?:-\s*(\d{3})\s*)?", item)
            if m:
                lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo is None or not (100 <= lo <= hi <= 599):
            raise _bad(path, value, expected)
        out.append((lo, hi))
    return tuple(out)


def _check(value: Any, path: str) -> CheckConfig:
    t = _Table(value, path, _CHECK_KEYS, "true, false or a table of check settings")
    inter = t.get("inter", _duration, 2.0)
    if inter <= 0:
        raise _bad(t.key("inter"), t.data["inter"], "a duration above zero")

    def positive(raw: Any, p: str) -> float:
        d = _duration(raw, p)
        if d <= 0:
            raise _bad(p, raw, "a duration above zero")
        return d

    def path_value(raw: Any, p: str) -> str:
        if isinstance(raw, str) and raw.startswith("/") and raw.isprintable() and " " not in raw:
            return raw
        raise _bad(p, raw, 'a request path starting with "/"')

    def jitter(raw: Any, p: str) -> float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool) and 0 <= raw <= 0.5:
            return float(raw)
        raise _bad(p, raw, "a fraction from 0 to 0.5")

    return CheckConfig(
        type=t.get("type", _choice(("tcp", "http")), "http" if t.has("path") else "tcp"),
        method=t.get("method", _choice(("GET", "HEAD", "OPTIONS")), "GET"),
        path=t.get("path", path_value, "/"),
        host=t.get("host", _header_value, None),
        expect=t.get("expect", _statuses, ((200, 399),)),
        inter=inter,
        fastinter=t.get("fastinter", positive, inter),
        downinter=t.get("downinter", positive, inter),
        rise=t.get("rise", _int(1, 1000), 2),
        fall=t.get("fall", _int(1, 1000), 3),
        timeout=t.get("timeout", positive, min(inter, 2.0)),
        port=t.get("port", _int(1, 65535), None),
        jitter=t.get("jitter", jitter, 0.1),
    )


def _cert_pair(value: Any, path: str) -> TlsCert:
    t = _Table(value, path, ("cert", "key"), 'a table { cert = "site.pem", key = "site.key" }')
    return TlsCert(cert=t.need("cert", _str, "a PEM certificate file"),
                   key=t.need("key", _str, "a PEM private key file"), path=path)


def _frontend_tls(value: Any, path: str) -> TlsConfig:
    t = _Table(value, path, ("cert", "key", "certificates", "min_version", "client_ca",
                             "verify_client"),
               'a table { cert = "site.pem", key = "site.key" }')
    if t.has("certificates"):
        if t.has("cert") or t.has("key"):
            raise ConfigError(t.key("certificates"), ": give either cert/key or certificates")
        certs = t.get("certificates", _list_of(_cert_pair, "tables {cert, key}"), ())
    else:
        certs = (TlsCert(cert=t.need("cert", _str, "a PEM certificate file"),
                         key=t.need("key", _str, "a PEM private key file"), path=path),)
    client_ca = t.get("client_ca", _str, None)
    verify = t.get("verify_client", _choice(("none", "optional", "required")),
                   "required" if client_ca else "none")
    if verify != "none" and client_ca is None:
        raise ConfigError(t.key("client_ca"), f': missing; expected a PEM CA file (verify_client '
                                              f'is "{verify}")')
    return TlsConfig(certificates=certs,
                     min_version=t.get("min_version", _choice(("1.2", "1.3")), "1.2"),
                     client_ca=client_ca, verify_client=verify, path=path)


def _server_tls(value: Any, path: str) -> ServerTls:
    if value is True:
        value = {}
    t = _Table(value, path, ("verify", "ca", "sni", "cert", "key"),
               'true or a table { verify = true, ca = "ca.pem", sni = "name" }')
    out = ServerTls(verify=t.get("verify", _bool, True), ca=t.get("ca", _str, None),
                    sni=t.get("sni", _str, None), cert=t.get("cert", _str, None),
                    key=t.get("key", _str, None), path=path)
    if (out.cert is None) != (out.key is None):
        missing = "key" if out.key is None else "cert"
        raise ConfigError(t.key(missing), ": missing; cert and key go together")
    return out


def _redirect_port(value: Any, path: str) -> int | None:
    if value is True:
        return 443
    if value is False:
        return None
    return _int(1, 65535)(value, path)


@dataclass(frozen=True, slots=True)
class _Defaults:
    mode: str = "http"
    balance: str = "roundrobin"
    retries: int = 3
    redispatch: bool = True
    forwardfor: ForwardFor = field(default_factory=ForwardFor)
    forwarded_proto: bool = True
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)


# The algorithm names a configuration may use: the caller passes the registry's list in
# (`config_from_dict(..., algorithms=...)`), so this module never imports run-time code.
BUILTIN_ALGORITHMS = ("roundrobin", "static-rr", "leastconn", "random", "source", "first")


def _balance(names: tuple[str, ...]) -> Callable[[Any, str], str]:
    def conv(value: Any, path: str) -> str:
        if isinstance(value, str) and value in names:
            return value
        raise _bad(path, value, "one of " + ", ".join(f'"{n}"' for n in names))

    return conv


def _defaults(value: Any, path: str, algos: tuple[str, ...]) -> _Defaults:
    t = _Table(value, path, ("mode", "balance", "retries", "redispatch", "forwardfor",
                             "forwarded_proto", "timeout", "limits"))
    base = _Defaults()
    return _Defaults(
        mode=t.get("mode", _choice(MODES), base.mode),
        balance=t.get("balance", _balance(algos), base.balance),
        retries=t.get("retries", _int(0, 100), base.retries),
        redispatch=t.get("redispatch", _bool, base.redispatch),
        forwardfor=t.get("forwardfor", _forwardfor, base.forwardfor),
        forwarded_proto=t.get("forwarded_proto", _bool, base.forwarded_proto),
        timeouts=t.get("timeout", lambda v, p: _timeouts(v, p, base.timeouts, _TIMEOUT_KEYS),
                       base.timeouts),
        limits=t.get("limits", lambda v, p: _limits(v, p, base.limits), base.limits),
    )


def _frontend(name: str, value: Any, path: str, d: _Defaults) -> FrontendConfig:
    t = _Table(value, path, ("bind", "mode", "default_backend", "rules", "timeout", "limits",
                             "forwardfor", "forwarded_proto", "request_headers", "response_headers",
                             "reject_underscore_headers", "allow", "deny", "trusted_proxies",
                             "accept_proxy", "rate_limit", "max_client_connections", "tls",
                             "hsts", "redirect_https"))
    tls = t.get("tls", _frontend_tls, None)
    if tls is not None and t.has("redirect_https"):
        raise ConfigError(t.key("redirect_https"), ": only on a plain HTTP frontend (this one has tls)")
    if t.has("hsts") and tls is None:
        raise ConfigError(t.key("hsts"), ": only on a frontend with tls")
    for key in ("hsts", "redirect_https"):
        if t.has(key) and t.data.get("mode", d.mode) == "tcp":
            raise ConfigError(t.key(key), ': only in mode "http"')
    return FrontendConfig(
        name=name,
        bind=t.need("bind", _list_of(_bind_address, "addresses", single_ok=True),
                    'a list of addresses like ["127.0.0.1:8080"]'),
        mode=t.get("mode", _choice(MODES), d.mode),
        default_backend=t.get("default_backend", _str, None),
        rules=t.get("rules", _list_of(_rule, "rules"), ()),
        timeouts=t.get("timeout", lambda v, p: _timeouts(v, p, d.timeouts, FRONTEND_TIMEOUTS),
                       d.timeouts),
        limits=t.get("limits", lambda v, p: _limits(v, p, d.limits), d.limits),
        forwardfor=t.get("forwardfor", _forwardfor, d.forwardfor),
        forwarded_proto=t.get("forwarded_proto", _bool, d.forwarded_proto),
        request_headers=t.get("request_headers", _header_rules, HeaderRules()),
        response_headers=t.get("response_headers", _header_rules, HeaderRules()),
        reject_underscore_headers=t.get("reject_underscore_headers", _bool, False),
        allow=t.get("allow", _CIDRS, ()),
        deny=t.get("deny", _CIDRS, ()),
        trusted_proxies=t.get("trusted_proxies", _CIDRS, ()),
        accept_proxy=t.get("accept_proxy", _accept_proxy, None),
        rate_limit=t.get("rate_limit", _rate_limit, None),
        max_client_connections=t.get("max_client_connections", _int(0, 1_000_000), 0),
        tls=tls,
        hsts=t.get("hsts", _header_value, None),
        redirect_https=t.get("redirect_https", _redirect_port, None),
    )


def _rate_limit(value: Any, path: str) -> RateLimit:
    t = _Table(value, path, ("requests", "per", "burst"),
               'a table like { requests = 100, per = "10s", burst = 20 }')
    requests = t.need("requests", _int(1, 1_000_000_000), "an integer of at least 1")
    per = t.get("per", _duration, 1.0)
    if per <= 0:
        raise _bad(t.key("per"), t.data["per"], "a duration above 0")
    return RateLimit(requests, per, t.get("burst", _int(1, 1_000_000_000), requests))


def _backend(name: str, value: Any, path: str, d: _Defaults,
             algos: tuple[str, ...]) -> BackendConfig:
    t = _Table(value, path, ("servers", "mode", "balance", "timeout", "retries", "redispatch",
                             "retry_on_timeout", "request_headers", "response_headers", "check", "observe",
                             "error_limit", "allbackups", "maxqueue", "http_reuse", "pool_max_idle",
                             "pool_idle_timeout", "tls"))
    be_tls = t.get("tls", _server_tls, None)
    check_raw = t.data.get("check")
    if isinstance(check_raw, bool):
        check = _check({}, t.key("check")) if check_raw else None
        check_raw = {}
    else:
        check = t.get("check", _check, None)

    def servers(raw: Any, p: str) -> tuple[ServerConfig, ...]:
        if not isinstance(raw, list) or not raw:
            raise _bad(p, raw, 'a non-empty list of servers like [{ address = "127.0.0.1:8081" }]')
        out = tuple(_server(item, f"{p}[{i}]", i, check, check_raw) for i, item in enumerate(raw))
        if be_tls is not None:  # a server's own tls wins over its backend's
            out = tuple(s if s.tls is not None else replace(s, tls=be_tls) for s in out)
        seen: dict[str, int] = {}
        for i, s in enumerate(out):
            if s.name in seen:
                raise _bad(f"{p}[{i}].name", s.name,
                           f"a server name not already used by {p}[{seen[s.name]}]")
            seen[s.name] = i
        return out

    be = BackendConfig(
        name=name,
        servers=t.need("servers", servers, 'a list of servers like [{ address = "127.0.0.1:8081" }]'),
        mode=t.get("mode", _choice(MODES), d.mode),
        balance=t.get("balance", _balance(algos), d.balance),
        timeouts=t.get("timeout", lambda v, p: _timeouts(v, p, d.timeouts, BACKEND_TIMEOUTS),
                       d.timeouts),
        retries=t.get("retries", _int(0, 100), d.retries),
        redispatch=t.get("redispatch", _bool, d.redispatch),
        retry_on_timeout=t.get("retry_on_timeout", _bool, False),
        request_headers=t.get("request_headers", _header_rules, HeaderRules()),
        response_headers=t.get("response_headers", _header_rules, HeaderRules()),
    )
    mode = be.mode
    checked = any(s.check for s in be.servers)
    observe = t.get("observe", _choice(("none", "layer4", "layer7")), "layer4" if checked else "none")
    if observe != "none" and not checked:
        raise _bad(t.key("observe"), observe,
                   '"none" without a check: a server marked down by observation comes back only '
                   "through its checks (add check = { ... })")
    if observe == "layer7" and mode == "tcp":
        raise _bad(t.key("observe"), observe, '"layer4" or "none" in tcp mode')
    reuse = t.get("http_reuse", _choice(("safe", "never")), "safe")
    return replace(
        be,
        observe=observe,
        error_limit=t.get("error_limit", _int(1, 10000), 10),
        allbackups=t.get("allbackups", _bool, False),
        maxqueue=t.get("maxqueue", _int(0), 1024),
        http_reuse=reuse,
        pool_max_idle=0 if reuse == "never" else t.get("pool_max_idle", _int(0, 100000), 1024),
        pool_idle_timeout=t.get("pool_idle_timeout", _duration, 5.0),
        tls=be_tls,
        check=check,
    )


def _workers(value: Any, path: str) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 256:
        return value
    raise _bad(path, value, 'a number of worker processes from 1 to 256, or "auto"')


def _global(value: Any, path: str) -> GlobalConfig:
    t = _Table(value, path, ("grace", "log_level", "maxconn", "data_dir", "startup_timeout",
                             "workers", "hard_stop_after", "backlog", "user", "group",
                             "limit_table_size", "ipv6_prefix", "max_open_files"))
    d = GlobalConfig()
    return GlobalConfig(
        grace=t.get("grace", _duration, d.grace),
        log_level=t.get("log_level", _choice(LOG_LEVELS), d.log_level),
        maxconn=t.get("maxconn", _int(1, 10_000_000), d.maxconn),
        data_dir=t.get("data_dir", _str, d.data_dir),
        startup_timeout=t.get("startup_timeout", _duration, d.startup_timeout),
        workers=t.get("workers", _workers, d.workers),
        hard_stop_after=t.get("hard_stop_after", _duration, d.hard_stop_after),
        backlog=t.get("backlog", _int(1, 1 << 20), d.backlog),
        user=t.get("user", _str, None),
        group=t.get("group", _str, None),
        limit_table_size=t.get("limit_table_size", _int(8, 100_000_000), d.limit_table_size),
        ipv6_prefix=t.get("ipv6_prefix", _int(1, 128), d.ipv6_prefix),
        max_open_files=t.get("max_open_files", _int(64, 1 << 24), d.max_open_files),
    )


def _webhook(value: Any, path: str) -> str:
    from urllib.parse import urlsplit

    expected = 'an http:// or https:// URL like "http://127.0.0.1:9000/hook"'
    if not isinstance(value, str) or any(c.isspace() for c in value):
        raise _bad(path, value, expected)
    try:
        u = urlsplit(value)
        ok = u.scheme in ("http", "https") and bool(u.hostname)
        u.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        ok = False
    if not ok:
        raise _bad(path, value, expected)
    return value


def _argv(value: Any, path: str) -> tuple[str, ...]:
    expected = ('a non-empty list of strings: the program and its arguments, like '
                '["/usr/local/bin/page", "--team", "ops"]')
    if not isinstance(value, list) or not value:
        raise _bad(path, value, expected)
    for i, arg in enumerate(value):
        if not isinstance(arg, str) or (i == 0 and not arg):
            raise _bad(f"{path}[{i}]", arg, "a string" if i else "a program name or path")
    return tuple(value)


def _positive_duration(hi: float, shown: str) -> Callable[[Any, str], float]:
    def conv(value: Any, path: str) -> float:
        seconds = _duration(value, path)
        if not 0 < seconds <= hi:
            raise _bad(path, value, f"a duration above 0 and at most {shown}")
        return seconds

    return conv


def _alerts(value: Any, path: str) -> AlertsConfig:
    t = _Table(value, path, ("webhooks", "command", "flap_window", "timeout", "retries",
                             "backoff", "queue"))
    d = AlertsConfig()
    return AlertsConfig(
        webhooks=t.get("webhooks", _list_of(_webhook, "http:// or https:// URLs", single_ok=True),
                       ()),
        command=t.get("command", _argv, ()),
        flap_window=t.get("flap_window", _positive_duration(86400.0, '"1d"'), d.flap_window),
        timeout=t.get("timeout", _positive_duration(60.0, '"60s"'), d.timeout),
        retries=t.get("retries", _int(0, 10), d.retries),
        backoff=t.get("backoff", _positive_duration(60.0, '"60s"'), d.backoff),
        queue=t.get("queue", _int(1, 100_000), d.queue),
    )


_LOG_KEYS = ("access", "format", "buffer", "syslog_format")
_ACCESS_EXPECTED = ('"stdout", "stderr", a file path, or "syslog:HOST:PORT" '
                    '(like "syslog:127.0.0.1:514")')


def _access(value: Any, path: str) -> tuple[str, str | None, int]:
    """An access log destination: (access, syslog host, syslog port)."""
    if not isinstance(value, str) or not value.strip() or "\0" in value:
        raise _bad(path, value, _ACCESS_EXPECTED)
    if value in ("stdout", "stderr"):
        return value, None, 0
    if value.startswith("syslog:"):
        try:
            addr = parse_address(value[len("syslog:"):], allow_any_host=False,
                                 allow_port_zero=False)
        except ValueError:
            raise _bad(path, value, _ACCESS_EXPECTED) from None
        return value, addr.host, addr.port
    if value.endswith("/"):
        raise _bad(path, value, "a file path, not a directory (or " + _ACCESS_EXPECTED + ")")
    return value, None, 0


def _log(value: Any, path: str) -> LogConfig:
    t = _Table(value, path, _LOG_KEYS)
    d = LogConfig()
    access, host, port = t.get("access", _access, (None, None, 0))

    def buffer(raw: Any, p: str) -> int:
        n = _size(raw, p)
        if not 256 <= n <= 1 << 30:
            raise _bad(p, raw, "a size from 256 bytes to 1g")
        return n

    return LogConfig(
        access=access,
        format=t.get("format", _choice(("text", "json")), d.format),
        buffer=t.get("buffer", buffer, d.buffer),
        syslog_format=t.get("syslog_format", _choice(("rfc5424", "rfc3164")), d.syslog_format),
        syslog_host=host,
        syslog_port=port,
    )


def _named_tables(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _bad(path, value, "a table of named sections")
    for key in value:
        if not _NAME.fullmatch(key):
            raise _bad_key(_Table._join(path, key), _NAME_EXPECTED)
    return value


def config_from_dict(data: Mapping[str, Any], source: str | None = None,
                     algorithms: tuple[str, ...] | list[str] | None = None) -> Config:
    """Build a Config from a dict shaped like the TOML file; `algorithms`: the balancing
    algorithm names allowed (default: the built-in ones)."""
    algos = tuple(algorithms) if algorithms else BUILTIN_ALGORITHMS
    try:
        top = _Table(dict(data), "", ("global", "defaults", "frontends", "backends", "admin",
                                      "alerts", "log", "metrics"))
        d = top.get("defaults", lambda v, p: _defaults(v, p, algos), _Defaults())
        settings = top.get("global", _global, GlobalConfig())
        log = top.get("log", _log, LogConfig())
        backends = {
            name: _backend(name, raw, f"backends.{name}", d, algos)
            for name, raw in top.need("backends", _named_tables, "a [backends.NAME] section").items()
        }
        frontends = {
            name: _frontend(name, raw, f"frontends.{name}", d)
            for name, raw in top.need("frontends", _named_tables,
                                      "a [frontends.NAME] section").items()
        }
        if not frontends:
            raise ConfigError("frontends", ": empty; expected at least one [frontends.NAME]")
        for fe in frontends.values():
            _check_references(fe, backends)
        _check_binds(frontends)
        admin = top.get("admin", lambda v, p: _admin(v, p, source), None)
        if admin is not None:
            _check_admin_bind(admin, frontends)
        return Config(
            frontends=MappingProxyType(frontends),
            backends=MappingProxyType(backends),
            settings=settings,
            source=source,
            admin=admin,
            alerts=top.get("alerts", _alerts, AlertsConfig()),
            log=log,
            metrics=top.get("metrics", _metrics, MetricsConfig()),
        )
    except ConfigError as e:
        e.source = source
        e.args = (e.line(),)
        raise


_MAX_BUCKETS = 50


def _metrics(value: Any, path: str) -> MetricsConfig:
    t = _Table(value, path, ("buckets",))
    return MetricsConfig(buckets=t.get("buckets", _buckets, DEFAULT_BUCKETS))


def _buckets(value: Any, path: str) -> tuple[float, ...]:
    expected = (f"a list of 1 to {_MAX_BUCKETS} increasing durations, like "
                '["1ms", "5ms", "25ms", "100ms", "500ms", "2s"]')
    if not isinstance(value, list) or not 1 <= len(value) <= _MAX_BUCKETS:
        raise _bad(path, value, expected)
    out: list[float] = []
    for i, v in enumerate(value):
        b = _duration(v, f"{path}[{i}]")
        if b <= 0 or (out and b <= out[-1]):
            raise _bad(f"{path}[{i}]", v, "a duration above 0 and above the one before it"
                       if b > 0 else "a duration above 0")
        out.append(b)
    return tuple(out)


def _admin(value: Any, path: str, source: str | None) -> AdminConfig:
    t = _Table(value, path, ("bind", "token", "token_file"))
    bind = t.need("bind", _bind_address, 'an address like "127.0.0.1:8404"')
    token = t.get("token", _str, None)
    token_file = t.get("token_file", _str, None)
    if token is not None and token_file is not None:
        raise ConfigError(t.key("token_file"), ": give token or token_file, not both")
    if token_file is not None:
        where = Path(token_file)
        if not where.is_absolute() and source:
            where = Path(source).parent / where
        try:
            token = where.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise _bad(t.key("token_file"), token_file,
                       f"a readable file holding the token ({getattr(e, 'strerror', None) or e})"
                       ) from None
        if not token:
            raise _bad(t.key("token_file"), token_file, "a file holding a token (it is empty)")
    if token is not None and (len(token) < 8 or not _FIELD_VALUE.fullmatch(token)
                              or token != token.strip()):
        raise ConfigError(t.key("token" if token_file is None else "token_file"),
                          ": a token of at least 8 printable characters, no edge spaces")
    if token is None and not _is_loopback(bind.host):
        where = t.key("token") if path == "admin" else path
        raise ConfigError(where, f": the admin listener on {bind} is not on a loopback "
                                 "address, so it needs a token ([admin] token = \"...\" or "
                                 "token_file = \"...\")")
    return AdminConfig(bind=bind, token=token, path=path)


def with_admin(cfg: Config, bind: str) -> Config:
    """`serve --admin ADDR`: the admin listener on ADDR (a token from the file is kept)."""
    source = "command line"
    data: dict[str, Any] = {"bind": bind}
    if cfg.admin is not None and cfg.admin.token is not None:
        data["token"] = cfg.admin.token
    try:
        admin = _admin(data, "--admin", source)
        _check_admin_bind(admin, dict(cfg.frontends))
    except ConfigError as e:
        e.source = source
        e.args = (e.line(),)
        raise
    return replace(cfg, admin=admin)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "" (every address) or a name


def _check_admin_bind(admin: AdminConfig, frontends: dict[str, FrontendConfig]) -> None:
    """The admin listener is never a public frontend's address."""
    if admin.bind.port == 0:
        return
    for fe in frontends.values():
        for addr in fe.bind:
            if addr.port == admin.bind.port and (addr.host == admin.bind.host or not addr.host
                                                 or not admin.bind.host):
                raise _bad(f"{admin.path}.bind", str(admin.bind),
                           f"an address no frontend uses (frontends.{fe.name} binds {addr})")


def _check_binds(frontends: dict[str, FrontendConfig]) -> None:
    """Two frontends (or one twice) on one address: the second could never bind."""
    seen: dict[tuple[str, int], str] = {}
    for fe in frontends.values():
        for i, addr in enumerate(fe.bind):
            if addr.port == 0:
                continue
            path = f"frontends.{fe.name}.bind" + (f"[{i}]" if len(fe.bind) > 1 else "")
            for (host, port), other in seen.items():
                if port == addr.port and (host == addr.host or not host or not addr.host):
                    raise _bad(path, str(addr), f"an address not already used by {other}")
            seen[(addr.host, addr.port)] = path


def _check_references(fe: FrontendConfig, backends: dict[str, BackendConfig]) -> None:
    base = f"frontends.{fe.name}"
    if fe.default_backend is None and not fe.rules:
        raise ConfigError(f"{base}.default_backend",
                          ": missing; expected the name of a backend (or some rules)")
    refs = [(f"{base}.default_backend", fe.default_backend)] if fe.default_backend else []
    refs += [(f"{base}.rules[{i}].backend", r.backend) for i, r in enumerate(fe.rules)]
    for path, name in refs:
        be = backends.get(name)
        if be is None:
            known = ", ".join(f'"{n}"' for n in backends) or "none defined"
            raise _bad(path, name, f"the name of a backend ({known})")
        if be.mode != fe.mode:
            raise _bad(path, name, f"a backend in {fe.mode} mode like its frontend "
                                   f"(backends.{name}.mode is \"{be.mode}\")")
    if fe.mode == "tcp" and fe.rules:
        raise ConfigError(f"{base}.rules", ": host and path rules need mode \"http\"")
    if fe.mode == "tcp" and fe.rate_limit is not None:
        raise ConfigError(f"{base}.rate_limit", ": limits requests, so needs mode \"http\" "
                                                "(max_client_connections works in tcp mode)")


def parse_config(text: str, source: str | None = None,
                 algorithms: tuple[str, ...] | list[str] | None = None) -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"invalid TOML: {e}", source) from None
    return config_from_dict(data, source, algorithms)


def load_config(path: str | Path, algorithms: tuple[str, ...] | list[str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", "no such file", str(p)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("", f"cannot read: {getattr(e, 'strerror', None) or e}", str(p)) from None
    return parse_config(text, str(p), algorithms)


def quick_config(bind: list[str], backends: list[str], mode: str = "http",
                 algorithm: str = "roundrobin",
                 algorithms: tuple[str, ...] | list[str] | None = None, *,
                 allow: list[str] | None = None, deny: list[str] | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None) -> Config:
    """The configuration behind `serve --bind A --backend B ...`; mistakes name the option."""
    fe: dict[str, Any] = {"bind": bind, "mode": mode, "default_backend": "main"}
    if allow:
        fe["allow"] = allow
    if deny:
        fe["deny"] = deny
    data = {
        "frontends": {"main": fe},
        "backends": {"main": {
            "mode": mode,
            "balance": algorithm,
            "servers": [{"name": f"server-{i + 1}", "address": a} for i, a in enumerate(backends)],
        }},
    }
    if tls_cert is not None or tls_key is not None:
        data["frontends"]["main"]["tls"] = {k: v for k, v in (("cert", tls_cert), ("key", tls_key))
                                            if v is not None}
    try:
        return config_from_dict(data, None, algorithms)
    except ConfigError as e:
        option = e.path
        for prefix, opt in (("frontends.main.tls.cert", "--tls-cert"),
                            ("frontends.main.tls.key", "--tls-key"),
                            ("frontends.main.bind", "--bind"), ("backends.main.servers", "--backend"),
                            ("backends.main.balance", "--algorithm"), ("frontends.main.mode", "--mode"),
                            ("frontends.main.allow", "--allow"), ("frontends.main.deny", "--deny")):
            if option.startswith(prefix):
                option = opt
                break
        message = e.message.replace(" = ", "", 1) if e.message.startswith(" = ") else e.message
        raise ConfigError(option, " " + message if not message.startswith(":") else message,
                          "command line") from None
