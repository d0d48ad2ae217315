"""The app server's own metrics, `GET /metrics` in Prometheus' text format (version 0.0.4).

Rules of this module:
- counting a request is a few dict and list updates in the event loop: no lock, no system call,
  no new dependency (the exposition is written here);
- names are prefixed `foobar_app_`; label sets are bounded: methods outside the usual ones are
  `OTHER`, routes are the app's route patterns (`/items/{id}`), `unmatched` for the rest, and
  status codes are classes (`2xx`);
- the database's numbers (queries by role, pool use, replication lag, node states) are read
  from the router and its nodes when scraped, never waited on (they come from the monitors).
"""

from __future__ import annotations

import math
import time
from typing import Any

__all__ = ["BUCKETS", "CONTENT_TYPE", "Metrics", "render"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"))
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")


class _Histogram:
    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * len(BUCKETS)  # not cumulative; summed when rendered
        self.count = 0
        self.sum = 0.0


class Metrics:
    """What the app server counts itself (the database's numbers live in the router)."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}  # (method, route, class) -> count
        self.durations: dict[str, _Histogram] = {}  # route -> its response times
        self.in_flight = 0
        self.started = time.time()

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        if method not in METHODS:
            method = "OTHER"
        key = (method, route, CLASSES[min(max(status // 100, 1), 5) - 1])
        self.requests[key] = self.requests.get(key, 0) + 1
        h = self.durations.get(route)
        if h is None:
            h = self.durations[route] = _Histogram()
        h.count += 1
        h.sum += seconds
        for i, le in enumerate(BUCKETS):
            if seconds <= le:
                h.buckets[i] += 1
                break


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: Any) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


def _num(v: float) -> str:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")
    return repr(float(v)) if isinstance(v, float) else str(v)


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str) -> None:
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: Any) -> None:
        self.lines.append(f"{name}{_labels(**labels) if labels else ''} {_num(value)}")


def _nodes(db: Any) -> list[Any]:
    nodes = getattr(db.database, "nodes", None)
    if nodes is not None:
        return list(nodes)
    return [n for n in (db.primary, *db.replicas) if getattr(n, "name", "none") != "none"]


def render(metrics: Metrics, db: Any, server: str) -> str:
    """The exposition: this server's requests, then its database as the router sees it."""
    o = _Out()
    p = "foobar_app_"
    o.family(p + "info", "gauge", "This app server (always 1), with its name and database.")
    o.sample(p + "info", 1, server=server, dialect=db.dialect)
    o.family(p + "start_time_seconds", "gauge", "When this app server started (Unix time).")
    o.sample(p + "start_time_seconds", round(metrics.started, 3))

    o.family(p + "requests_total", "counter",
             "Requests answered, by method, route pattern and status class.")
    for (method, route, code), n in sorted(metrics.requests.items()):
        o.sample(p + "requests_total", n, method=method, route=route, code=code)
    o.family(p + "requests_in_flight", "gauge", "Requests being handled now (this one included).")
    o.sample(p + "requests_in_flight", metrics.in_flight)
    name = p + "request_duration_seconds"
    o.family(name, "histogram", "Time to answer a request, by route pattern.")
    for route, h in sorted(metrics.durations.items()):
        total = 0
        for le, n in zip(BUCKETS, h.buckets, strict=True):
            total += n
            o.sample(name + "_bucket", total, route=route, le=_num(le))
        o.sample(name + "_bucket", h.count, route=route, le="+Inf")
        o.sample(name + "_sum", round(h.sum, 6), route=route)
        o.sample(name + "_count", h.count, route=route)

    o.family(p + "db_queries_total", "counter",
             "Statements run (the schema's at start included), by the role and name of the "
             "node that ran them.")
    for (role, node), n in sorted(db.queries.items()):
        o.sample(p + "db_queries_total", n, role=role, node=node)

    nodes = _nodes(db)
    pools = [(n, n.pool_use()) for n in nodes if hasattr(n, "pool_use")]
    o.family(p + "db_pool_connections", "gauge",
             "Connections of each node's pool, in use (lent to a request) or idle.")
    for n, (in_use, idle, _) in pools:
        o.sample(p + "db_pool_connections", in_use, node=n.name, role=n.role, state="in_use")
        o.sample(p + "db_pool_connections", idle, node=n.name, role=n.role, state="idle")
    o.family(p + "db_pool_max_connections", "gauge", "The most connections each node's pool opens.")
    for n, (_, _, most) in pools:
        o.sample(p + "db_pool_max_connections", most, node=n.name, role=n.role)

    o.family(p + "db_replication_lag_seconds", "gauge",
             "How far each replica is behind the primary, as this app server measures it "
             "(heartbeat); absent while unknown (no heartbeat yet, node down).")
    for n in nodes:
        if n.role == "replica":
            lag = getattr(n, "lag", 0.0)  # SQLite: one file, no lag
            if lag is not None:
                o.sample(p + "db_replication_lag_seconds", round(float(lag), 6), node=n.name)
    o.family(p + "db_node_usable", "gauge",
             "1 when the router may use the node (the primary for writes, a replica for reads).")
    for n in nodes:
        o.sample(p + "db_node_usable", int(bool(n.usable)), node=n.name, role=n.role)
    o.family(p + "db_node_state", "gauge", "Each node's state as the monitor saw it last "
                                           "(up, down, hung, lagging, broken, recovering, stale): 1.")
    for n in nodes:
        o.sample(p + "db_node_state", 1, node=n.name, role=n.role, state=n.status())
    primary = db.primary
    o.family(p + "db_primary_up", "gauge", "1 when there is a usable primary (writes can run).")
    o.sample(p + "db_primary_up", int(bool(primary.usable)))
    return "\n".join(o.lines) + "\n"
