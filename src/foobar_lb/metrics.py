"""Metrics: the group's counters as the master reads them, for `GET /metrics` (Prometheus text
exposition format 0.0.4) and for `Master.stats()`.

Rules of this module:
- it only reads: the workers record on their hot path into their own shared cells (shared.py
  says where, `build.attach_counters` gives each object its offsets) and the master sums them
  on read (`Master.totals()`, a dead worker's cells kept in `retired`, its gauges left out); the
  master adds what it knows itself (server states, checks, workers, reloads, uptime);
- one reading (`View`) serves one answer, so every number in it is from the same moment;
- histograms are stored one cell per bucket (no cumulative sums on the hot path: one increment
  per observation), a +Inf cell and a sum in microseconds; they are made cumulative here, and
  their count is the buckets' sum, so `+Inf` always equals `_count`.
It never runs on a worker, never writes a cell and never blocks on one.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .servers import State
from .shared import (
    B_QUEUED,
    B_TIMEOUT_QUEUE,
    CLASSES,
    F_1XX,
    F_BYTES_IN,
    F_BYTES_OUT,
    F_CLIENT_REFUSED,
    F_CONNECTIONS,
    F_CURRENT,
    F_DENIED,
    F_LOG_DROPPED,
    F_RATE_LIMITED,
    F_TIMEOUT_CLIENT,
    F_TIMEOUT_HTTP_REQUEST,
    F_TIMEOUT_TUNNEL,
    F_TLS_FAILURES,
    F_TLS_HANDSHAKES,
    S_BYTES_IN,
    S_BYTES_OUT,
    S_ECON,
    S_ERESP,
    S_FAILURES,
    S_REDISPATCHES,
    S_RELEASED,
    S_REQUESTS,
    S_RETRIES,
    S_TIMEOUT_CONNECT,
    S_TIMEOUT_SERVER,
    bounds_key,
)

if TYPE_CHECKING:
    from .master import Master

__all__ = ["NOSRV", "CheckInfo", "RateMeter", "View", "escape", "fill_stats", "percentile",
           "prometheus_text"]

CLASS_NAMES = ("1xx", "2xx", "3xx", "4xx", "5xx")
NOSRV = "<NOSRV>"  # the server (and backend) label of the proxy's own answers
RATE_WINDOW = 10.0  # seconds a rate is taken over (when readings that far apart exist)


# ---------------------------------------------------------------------------------------------
# One reading of the counters


class View:
    """The group's totals at one moment, by name."""

    def __init__(self, totals: list[int], offsets: dict[tuple[str, ...], int]):
        self.t = totals
        self.offsets = offsets
        # (frontend, backend, server) -> offset of its 5 class cells (server "": own answers)
        self.class_blocks = {k[1:]: off for k, off in offsets.items() if k[0] == "responses"}

    @classmethod
    def of(cls, master: Master) -> View:
        return cls(master.totals(), master.layout.offsets)

    def _cell(self, key: tuple[str, ...], i: int) -> int:
        off = self.offsets.get(key)
        if off is None or off + i >= len(self.t):
            return 0
        return self.t[off + i]

    def frontend(self, name: str, i: int) -> int:
        return self._cell(("frontend", name), i)

    def server(self, backend: str, name: str, i: int) -> int:
        return self._cell(("server", backend, name), i)

    def backend(self, name: str, i: int) -> int:
        return self._cell(("backend", name), i)

    def classes_at(self, off: int) -> list[int]:
        return self.t[off:off + CLASSES]

    def own_unrouted(self, frontend: str) -> list[int]:
        """The proxy's own answers to requests of `frontend` routed to no backend."""
        off = self.offsets.get(("frontend", frontend))
        return self.t[off + F_1XX:off + F_1XX + CLASSES] if off is not None else [0] * CLASSES

    def responses(self, frontend: str | None = None, backend: str | None = None,
                  server: str | None = None) -> list[int]:
        """Responses by class (1xx..5xx), summed over the class blocks that match (None: any;
        server "": the proxy's own answers); with only `frontend` given, its own answers to
        requests routed nowhere are included."""
        out = [0] * CLASSES
        for (f, b, s), off in self.class_blocks.items():
            if (frontend is None or f == frontend) and (backend is None or b == backend) and (
                    server is None or s == server):
                for i, v in enumerate(self.t[off:off + CLASSES]):
                    out[i] += v
        if frontend is not None and backend is None and server is None:
            for i, v in enumerate(self.own_unrouted(frontend)):
                out[i] += v
        return out

    def histogram(self, kind: str, backend: str, server: str,
                  bounds: tuple[float, ...]) -> tuple[list[int], float]:
        """(counts per bucket, the last one +Inf, not cumulative; sum in seconds)."""
        off = self.offsets.get(("histogram", kind, backend, server, bounds_key(bounds)))
        n = len(bounds) + 1
        if off is None or off + n >= len(self.t):
            return [0] * n, 0.0
        return self.t[off:off + n], self.t[off + n] / 1e6


def cumulative(counts: Iterable[int]) -> list[int]:
    out, acc = [], 0
    for c in counts:
        acc += c
        out.append(acc)
    return out


def percentile(bounds: tuple[float, ...], counts: list[int], q: float) -> float | None:
    """The q-quantile (0 < q < 1) estimated from a histogram's per-bucket counts (the last one
    +Inf) as Prometheus's histogram_quantile does: linear within the bucket it falls in; in
    the +Inf bucket, the highest bound. None without observations."""
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    acc = 0
    for i, c in enumerate(counts):
        if c and acc + c >= rank:
            if i >= len(bounds):
                return bounds[-1]
            lo = bounds[i - 1] if i else 0.0
            return lo + (bounds[i] - lo) * (rank - acc) / c
        acc += c
    return bounds[-1]


def percentiles(bounds: tuple[float, ...], counts: list[int]) -> dict[str, float | None]:
    return {name: (None if (v := percentile(bounds, counts, q)) is None else round(v, 6))
            for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99))}


class RateMeter:
    """Rates per second of counters read now and then (each `Master.stats()`): over the last
    ~RATE_WINDOW seconds when readings that old are kept, else since the oldest one (0 at the
    first reading)."""

    def __init__(self, window: float = RATE_WINDOW):
        self.window = window
        self.samples: deque[tuple[float, dict[Any, int]]] = deque()

    def rates(self, counts: dict[Any, int], now: float | None = None) -> dict[Any, float]:
        now = time.monotonic() if now is None else now
        samples = self.samples
        ref = None
        for t, c in samples:  # the newest reading at least `window` old, else the oldest
            if now - t >= self.window or ref is None:
                ref = (t, c)
            if now - t < self.window:
                break
        if not samples or now - samples[-1][0] >= 1.0:
            samples.append((now, dict(counts)))
        while len(samples) > 2 and now - samples[1][0] >= self.window:
            samples.popleft()  # (keep one reading older than the window)
        if ref is None or now - ref[0] < 0.5:
            return dict.fromkeys(counts, 0.0)
        dt = now - ref[0]
        return {k: round(max(0, v - ref[1].get(k, 0)) / dt, 3) for k, v in counts.items()}


# ---------------------------------------------------------------------------------------------
# What Master.stats() adds


class CheckInfo:
    """What the master knows of a server's active checks: results so far, the last one."""

    __slots__ = ("at", "failed", "ok", "passed", "took")

    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0
        self.ok = False  # the last one passed
        self.took = 0.0  # seconds the last one took
        self.at = 0.0  # when it ended (time.time())

    def record(self, ok: bool, took: float) -> None:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        self.ok = ok
        self.took = took
        self.at = time.time()


def admin_state(server: Any) -> str:
    """"ready", "drain" or "maint": what an operator set (the runtime API), else "ready"."""
    admin = getattr(server, "admin", None)  # (servers.Admin, a str enum)
    if isinstance(admin, str):
        return str(getattr(admin, "value", admin))
    if server.state is State.DRAIN:
        return "drain"
    if server.state is State.MAINT:
        return "maint"
    return "ready"


def since(master: Master, server: Any) -> float:
    """Seconds since the server's last state change (since the master started: none yet)."""
    if server.last_change:
        return round(time.monotonic() - server.last_change, 3)
    return round(time.time() - master.started_at, 3)


def _classes(values: list[int]) -> dict[str, int]:
    return dict(zip(CLASS_NAMES, values, strict=True))


def fill_stats(master: Master, out: dict[str, Any], totals: list[int] | None = None) -> None:
    """Add the counters of issue 13 (current, sessions, rate, responses, errors, retries,
    redispatches, queue, checks, bytes, response-time percentiles, since, admin state) to the
    per frontend, backend and server entries of `Master.stats()`'s answer `out` (`totals`:
    `master.totals()`, if read already)."""
    v = View(totals, master.layout.offsets) if totals is not None else View.of(master)
    built = master.built
    bounds = built.config.metrics.buckets
    rate_keys: dict[Any, int] = {}
    for name, fe in built.frontends.items():
        entry = out["frontends"][name]
        responses = v.responses(frontend=name)
        own = v.responses(frontend=name, server="")
        own4 = own[3] + v.own_unrouted(name)[3]
        entry.update({
            "connections": v.frontend(name, F_CONNECTIONS),
            "current": v.frontend(name, F_CURRENT),
            "requests": sum(responses),
            "responses": _classes(responses),
            "errors": max(0, own4 - v.frontend(name, F_RATE_LIMITED)),  # requests refused 4xx
            "bytes_in": v.frontend(name, F_BYTES_IN),
            "bytes_out": v.frontend(name, F_BYTES_OUT),
            "timeouts": {"client": v.frontend(name, F_TIMEOUT_CLIENT),
                         "http_request": v.frontend(name, F_TIMEOUT_HTTP_REQUEST),
                         "tunnel": v.frontend(name, F_TIMEOUT_TUNNEL)},
        })
        if fe.cfg.tls is not None:
            entry["tls_handshakes"] = v.frontend(name, F_TLS_HANDSHAKES)
            entry["tls_failures"] = v.frontend(name, F_TLS_FAILURES)
        rate_keys[("f", name)] = entry["requests"] if fe.mode == "http" else entry["connections"]
    for bname, be in built.backends.items():
        bentry = out["backends"][bname]
        agg_hist = [0] * (len(bounds) + 1)
        totals = dict.fromkeys(("current", "sessions", "errors", "failures", "retries",
                                "redispatches", "bytes_in", "bytes_out"), 0)
        responses = v.responses(backend=bname)  # (its servers' and the proxy's own answers)
        for s in be.servers:
            e = bentry["servers"][s.name]
            sv = lambda i, s=s, b=bname: v.server(b, s.name, i)  # noqa: E731
            counts, _ = v.histogram("response", bname, s.name, bounds)
            for i, c in enumerate(counts):
                agg_hist[i] += c
            info = getattr(master, "check_info", {}).get((bname, s.name))
            e.update({
                "admin": admin_state(s),
                "since": since(master, s),
                "current": sv(S_REQUESTS) - sv(S_RELEASED),
                "sessions": sv(S_REQUESTS),
                "responses": _classes(v.responses(backend=bname, server=s.name)),
                "errors": sv(S_ECON) + sv(S_ERESP),
                "errors_connect": sv(S_ECON),
                "errors_response": sv(S_ERESP),
                "failures": sv(S_FAILURES),
                "retries": sv(S_RETRIES),
                "redispatches": sv(S_REDISPATCHES),
                "bytes_in": sv(S_BYTES_IN),
                "bytes_out": sv(S_BYTES_OUT),
                "timeouts": {"connect": sv(S_TIMEOUT_CONNECT), "server": sv(S_TIMEOUT_SERVER)},
                "response_time": percentiles(bounds, counts),
                "check": {"status": s.check_status or None,
                          "duration": round(info.took, 6) if info is not None else None,
                          "passed": info.ok if info is not None else None,
                          "enabled": s.check is not None},
            })
            for k in totals:
                totals[k] += e[k]
            rate_keys[("s", bname, s.name)] = e["sessions"]
        up = sum(1 for s in be.servers if s.usable)
        bentry.update({
            "mode": be.mode,
            "algorithm": be.cfg.balance,
            "up": up,
            "total": len(be.servers),
            "queue": v.backend(bname, B_QUEUED),
            "responses": _classes(responses),
            "requests": sum(responses),
            "timeouts": {"queue": v.backend(bname, B_TIMEOUT_QUEUE),
                         "connect": sum(bentry["servers"][s.name]["timeouts"]["connect"]
                                        for s in be.servers),
                         "server": sum(bentry["servers"][s.name]["timeouts"]["server"]
                                       for s in be.servers)},
            "response_time": percentiles(bounds, agg_hist),
            **totals,
        })
        rate_keys[("b", bname)] = totals["sessions"]
    meter = getattr(master, "rate_meter", None)
    if meter is None:
        meter = master.rate_meter = RateMeter()
    rates = meter.rates(rate_keys)
    for name in built.frontends:
        out["frontends"][name]["rate"] = rates[("f", name)]
    for bname, be in built.backends.items():
        out["backends"][bname]["rate"] = rates[("b", bname)]
        for s in be.servers:
            out["backends"][bname]["servers"][s.name]["rate"] = rates[("s", bname, s.name)]


# ---------------------------------------------------------------------------------------------
# Prometheus text exposition format 0.0.4


def escape(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape(str(v))}"' for k, v in labels.items()) + "}"


def _num(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_num(value)}")

    def histogram(self, name: str, labels: dict[str, str], bounds: tuple[float, ...],
                  counts: list[int], total: float) -> None:
        acc = cumulative(counts)
        for b, c in zip(bounds, acc, strict=False):
            self.sample(f"{name}_bucket", {**labels, "le": _num(float(b))}, c)
        self.sample(f"{name}_bucket", {**labels, "le": "+Inf"}, acc[-1])
        self.sample(f"{name}_sum", labels, round(total, 6))
        self.sample(f"{name}_count", labels, acc[-1])


P = "foobar_lb_"


def prometheus_text(master: Master) -> str:
    """Every metric of the group, in the Prometheus text exposition format 0.0.4."""
    v = View.of(master)
    built = master.built
    cfg = built.config
    bounds = cfg.metrics.buckets
    o = _Out()
    fes = list(built.frontends.items())
    bes = list(built.backends.items())
    servers = [(bname, s) for bname, be in bes for s in be.servers]

    # -- requests, by frontend, backend, server and class
    o.family(P + "requests_total", "counter",
             "HTTP requests answered, by frontend, backend, server and status class (the "
             f"proxy's own answers: server \"{NOSRV}\"; routed to no backend: backend "
             f"\"{NOSRV}\" too)")
    current = {(f, b, s.name) for b, be in bes for s in be.servers for f in built.frontends}
    for (f, b, s), off in sorted(v.class_blocks.items()):
        vals = v.classes_at(off)
        fe = built.frontends.get(f)
        if fe is not None and fe.mode != "http":
            continue  # (tcp: connections, no requests)
        if s and (f, b, s) not in current and not any(vals):
            continue  # a server a reload removed, that never answered
        for name, val in zip(CLASS_NAMES, vals, strict=True):
            o.sample(P + "requests_total", {"frontend": f, "backend": b, "server": s or NOSRV,
                                            "code": name}, val)
    for f, fe in fes:
        if fe.mode != "http":
            continue
        for name, val in zip(CLASS_NAMES, v.own_unrouted(f), strict=True):
            o.sample(P + "requests_total", {"frontend": f, "backend": NOSRV, "server": NOSRV,
                                            "code": name}, val)

    # -- histograms
    for kind, what in (("response", "Time from a request sent to its server to the response "
                                    "head received (HAProxy's Tr), in seconds"),
                       ("connect", "Time to connect to a server (new connections only; "
                                   "pooled ones take none), in seconds"),
                       ("queue", "Time requests (tcp: connections) waited in the backend's "
                                 "queue for this server (only those that waited), in seconds")):
        name = f"{P}{kind}_time_seconds"
        o.family(name, "histogram", what)
        for bname, s in servers:
            if kind == "response" and built.backends[bname].mode != "http":
                continue
            counts, total = v.histogram(kind, bname, s.name, bounds)
            o.histogram(name, {"backend": bname, "server": s.name}, bounds, counts, total)

    # -- frontends
    def per_frontend(name: str, kind: str, help_text: str, cell: int,
                     only_tls: bool = False) -> None:
        o.family(P + name, kind, help_text)
        for f, fe in fes:
            if only_tls and fe.cfg.tls is None:
                continue
            o.sample(P + name, {"frontend": f}, v.frontend(f, cell))

    per_frontend("frontend_connections_total", "counter", "Client connections accepted",
                 F_CONNECTIONS)
    per_frontend("frontend_current_connections", "gauge", "Client connections open now",
                 F_CURRENT)
    per_frontend("frontend_bytes_in_total", "counter",
                 "Bytes received from clients (after TLS decryption)", F_BYTES_IN)
    per_frontend("frontend_bytes_out_total", "counter",
                 "Bytes sent to clients (before TLS encryption)", F_BYTES_OUT)
    per_frontend("denied_connections_total", "counter",
                 "Connections refused at accept by the frontend's allow/deny rules (or a PROXY "
                 "header from a peer not allowed to send one)", F_DENIED)
    per_frontend("rate_limited_requests_total", "counter",
                 "Requests answered 429 by the frontend's rate_limit", F_RATE_LIMITED)
    per_frontend("client_refused_connections_total", "counter",
                 "Connections closed at accept by max_client_connections", F_CLIENT_REFUSED)
    per_frontend("access_log_dropped_total", "counter",
                 "Access log lines dropped: the worker's log buffer was full", F_LOG_DROPPED)
    per_frontend("tls_handshakes_total", "counter", "TLS handshakes completed",
                 F_TLS_HANDSHAKES, only_tls=True)
    per_frontend("tls_handshake_failures_total", "counter",
                 "TLS handshakes refused (no common version or cipher, bad client certificate, "
                 "not TLS)", F_TLS_FAILURES, only_tls=True)

    # -- servers
    def per_server(name: str, kind: str, help_text: str, cell: int) -> None:
        o.family(P + name, kind, help_text)
        for bname, s in servers:
            o.sample(P + name, {"backend": bname, "server": s.name}, v.server(bname, s.name, cell))

    per_server("server_sessions_total", "counter",
               "Requests (http) or connections (tcp) given to the server, retries included",
               S_REQUESTS)
    o.family(P + "server_current_sessions", "gauge",
             "Requests (http) or connections (tcp) the server has now")
    for bname, s in servers:
        o.sample(P + "server_current_sessions", {"backend": bname, "server": s.name},
                 v.server(bname, s.name, S_REQUESTS) - v.server(bname, s.name, S_RELEASED))
    per_server("server_bytes_in_total", "counter",
               "Bytes sent to the server (requests; tcp: the client's bytes)", S_BYTES_IN)
    per_server("server_bytes_out_total", "counter",
               "Bytes received from the server (responses; tcp: the server's bytes)",
               S_BYTES_OUT)
    o.family(P + "server_errors_total", "counter",
             "Failed attempts on the server: connect (refused, unreachable, timed out) or "
             "response (broken, cut, late)")
    for bname, s in servers:
        for kind, cell in (("connect", S_ECON), ("response", S_ERESP)):
            o.sample(P + "server_errors_total", {"backend": bname, "server": s.name,
                                                 "kind": kind}, v.server(bname, s.name, cell))
    per_server("retries_total", "counter",
               "Failed attempts on the server that were tried again", S_RETRIES)
    per_server("redispatches_total", "counter",
               "Failed attempts on the server that were tried again on another server",
               S_REDISPATCHES)

    # -- timeouts, by kind
    o.family(P + "timeouts_total", "counter",
             "Timeouts by kind: client, http_request, tunnel (per frontend); connect, server "
             "(per server); queue (per backend)")
    for f, _ in fes:
        for kind, cell in (("client", F_TIMEOUT_CLIENT), ("http_request", F_TIMEOUT_HTTP_REQUEST),
                           ("tunnel", F_TIMEOUT_TUNNEL)):
            o.sample(P + "timeouts_total", {"frontend": f, "kind": kind}, v.frontend(f, cell))
    for bname, s in servers:
        for kind, cell in (("connect", S_TIMEOUT_CONNECT), ("server", S_TIMEOUT_SERVER)):
            o.sample(P + "timeouts_total", {"backend": bname, "server": s.name, "kind": kind},
                     v.server(bname, s.name, cell))
    for bname, _ in bes:
        o.sample(P + "timeouts_total", {"backend": bname, "kind": "queue"},
                 v.backend(bname, B_TIMEOUT_QUEUE))

    # -- backends
    o.family(P + "backend_queue_length", "gauge",
             "Requests (tcp: connections) waiting in the backend's queue now")
    for bname, _ in bes:
        o.sample(P + "backend_queue_length", {"backend": bname}, v.backend(bname, B_QUEUED))
    o.family(P + "backend_servers_up", "gauge", "Servers of the backend that take traffic")
    for bname, be in bes:
        o.sample(P + "backend_servers_up", {"backend": bname},
                 sum(1 for s in be.servers if s.usable))
    o.family(P + "backend_servers", "gauge", "Servers of the backend")
    for bname, be in bes:
        o.sample(P + "backend_servers", {"backend": bname}, len(be.servers))

    # -- server states and checks (the master's own knowledge)
    o.family(P + "server_up", "gauge", "1 when the server is up (takes traffic if ready), else 0")
    for bname, s in servers:
        o.sample(P + "server_up", {"backend": bname, "server": s.name},
                 1 if s.state is State.UP else 0)
    o.family(P + "server_state", "gauge", "The server's state: 1 for the one it is in")
    for bname, s in servers:
        for st in State:
            o.sample(P + "server_state", {"backend": bname, "server": s.name, "state": st.value},
                     1 if s.state is st else 0)
    o.family(P + "server_admin_state", "gauge",
             "The state an operator set: 1 for ready, drain or maint")
    for bname, s in servers:
        admin = admin_state(s)
        for st in ("ready", "drain", "maint"):
            o.sample(P + "server_admin_state", {"backend": bname, "server": s.name, "state": st},
                     1 if admin == st else 0)
    o.family(P + "server_weight", "gauge", "The server's weight")
    for bname, s in servers:
        o.sample(P + "server_weight", {"backend": bname, "server": s.name}, s.weight)
    o.family(P + "server_state_since_seconds", "gauge",
             "Seconds since the server's last state change (or the master's start)")
    for bname, s in servers:
        o.sample(P + "server_state_since_seconds", {"backend": bname, "server": s.name},
                 since(master, s))
    checks = getattr(master, "check_info", {})
    checked = [(bname, s, checks.get((bname, s.name))) for bname, s in servers
               if s.check is not None]
    o.family(P + "server_checks_total", "counter", "Active health checks run, by result")
    for bname, s, info in checked:
        for result in ("passed", "failed"):
            n = (info.passed if result == "passed" else info.failed) if info else 0
            o.sample(P + "server_checks_total", {"backend": bname, "server": s.name,
                                                 "result": result}, n)
    o.family(P + "server_check_passed", "gauge", "1 when the last check passed, else 0")
    o_dur: list[tuple[str, Any, Any]] = []
    for bname, s, info in checked:
        if info is not None:
            o.sample(P + "server_check_passed", {"backend": bname, "server": s.name},
                     1 if info.ok else 0)
            o_dur.append((bname, s, info))
    o.family(P + "server_check_duration_seconds", "gauge", "How long the last check took")
    for bname, s, info in o_dur:
        o.sample(P + "server_check_duration_seconds", {"backend": bname, "server": s.name},
                 round(info.took, 6))

    # -- the process group
    o.family(P + "workers", "gauge", "Worker processes, by status")
    by_status: dict[str, int] = dict.fromkeys(("starting", "serving", "draining", "stopping"), 0)
    for w in master.workers:
        by_status[w.status] = by_status.get(w.status, 0) + 1
    for status, n in by_status.items():
        o.sample(P + "workers", {"status": status}, n)
    o.family(P + "workers_started_total", "counter",
             "Worker processes started (the first ones, reloads and replacements of dead ones)")
    o.sample(P + "workers_started_total", {}, master.next_id - 1)
    o.family(P + "reloads_total", "counter", "Successful reloads of the configuration")
    o.sample(P + "reloads_total", {}, master.reloads)
    o.family(P + "uptime_seconds", "gauge", "Seconds since the master started")
    o.sample(P + "uptime_seconds", {}, round(time.time() - master.started_at, 3))
    o.family(P + "start_time_seconds", "gauge", "When the master started (Unix time)")
    o.sample(P + "start_time_seconds", {}, round(master.started_at, 3))
    return "\n".join(o.lines) + "\n"
