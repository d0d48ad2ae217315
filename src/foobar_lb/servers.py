"""Servers: where a server is, how much it weighs, which role it has and how it is doing.

Rule of this module: a Server object is the one home of a server's state and live counters.
It never picks servers (that is `balancing/`) and never probes them (that is `health.py`):
they change its state through `Balancer.set_state`, which tells the algorithms.
"""

from __future__ import annotations

import enum
import zlib

from .config import DEFAULT_BUCKETS, CheckConfig, ServerConfig, ServerTls
from .shared import CLASSES, S_BYTES_IN, S_BYTES_OUT, S_FAILURES, S_RELEASED, S_REQUESTS, S_SIZE
from .tls import server_context

__all__ = ["Admin", "Server", "State"]


class State(enum.StrEnum):
    """A server's state; compares equal to its value ("up", "down", ...) too."""

    UP = "up"
    DOWN = "down"
    # (not given by the state machine: an operator's drain and maintenance are `Admin`,
    # a dimension apart from health; kept so that old names still parse)
    DRAIN = "drain"
    MAINT = "maint"

    def __str__(self) -> str:
        return self.value.upper()


class Admin(enum.StrEnum):
    """What the operator asked of a server (the runtime API), a dimension apart from its
    health: a drained server that fails its checks is down AND still drained."""

    READY = "ready"  # in rotation whenever it is up
    DRAIN = "drain"  # no new requests or connections; the open ones finish; checks go on
    MAINT = "maint"  # out of rotation and its checks paused

    def __str__(self) -> str:
        return self.value.upper()


_PRIVATE = S_SIZE + CLASSES + 3 * (len(DEFAULT_BUCKETS) + 2)  # a server's own cells


class _Same:
    """`fcls` of a server made on its own: one block of classes for every frontend."""

    __slots__ = ("off",)

    def __init__(self, off: int):
        self.off = off

    def __getitem__(self, i: int) -> int:
        return self.off


class Server:
    __slots__ = (
        "active",
        "address",
        "admin",
        "backend",
        "backup",
        "cbase",
        "check",
        "check_status",
        "ctr",
        "errors",
        "fcls",
        "hash_seed",
        "hb",
        "hct",
        "health",
        "hn",
        "host",
        "hqt",
        "hrs",
        "hrt",
        "last_change",
        "maxconn",
        "name",
        "o_bin",
        "o_bout",
        "o_end",
        "pool_key",
        "port",
        "send_proxy",
        "slots",
        "sni",
        "ssl",
        "state",
        "weight",
    )

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        *,
        weight: int = 1,
        backup: bool = False,
        maxconn: int = 0,
        backend: str = "",
        state: State = State.UP,
        check: CheckConfig | None = None,
        send_proxy: str | None = None,
    ):
        self.name = name
        self.backend = backend
        self.host = host
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.weight = weight
        self.backup = backup
        self.maxconn = maxconn
        self.state = state  # health: what checks, observation and process exits decided
        self.admin = Admin.READY  # the operator's say (runtime API); kept across reloads
        self.active = 0  # requests (http) or connections (tcp) in flight right now (this process)
        # group-wide slots when maxconn is shared by worker processes (shared.SemSlots); None:
        # `active` against `maxconn` is the limit (one process)
        self.slots = None
        # counters (shared.S_*): cells of this process's counter block, from `cbase` on; a
        # server made on its own gets private ones (build.py gives it its shared ones)
        self.ctr = memoryview(bytearray(_PRIVATE * 8)).cast("q")
        self.cbase = 0
        self.o_bin = S_BYTES_IN  # (absolute offsets of the hot path's cells)
        self.o_bout = S_BYTES_OUT
        self.o_end = S_RELEASED
        # responses by class to requests of the frontend of index i (Route.fi): the cells
        # ctr[fcls[i] + status // 100]
        self.fcls: tuple[int, ...] | _Same = _Same(S_SIZE - 1)
        # histograms (shared.Layout.histogram): response, connect and queue times; their
        # bucket bounds `hb` (seconds), the bucket of t at ctr[h + bisect_left(hb, t)], the
        # sum (us) at ctr[h + hn]
        self.hb = DEFAULT_BUCKETS
        self.hn = len(DEFAULT_BUCKETS) + 1
        self.hrt = S_SIZE + CLASSES
        self.hrs = self.hrt + self.hn  # (the response times' sum, for the hot path)
        self.hct = self.hrt + self.hn + 1
        self.hqt = self.hct + self.hn + 1
        self.errors = 0  # consecutive errors seen by passive observation
        # active checks: HAProxy's hysteresis, one counter from 0 (down) to rise+fall-1 (fully up);
        # servers start fully up, so it takes `fall` failed checks to put one down
        self.check = check
        self.health = check.rise + check.fall - 1 if check else 0
        self.check_status = ""  # what the last check said, e.g. "layer4 connection refused"
        self.last_change = 0.0  # loop time of the last state change
        # a stable per-server seed for hashing algorithms; Python's hash() is salted per process
        self.hash_seed = zlib.crc32(f"{backend}/{name}".encode())
        # idle connections are pooled by (server, its TLS settings): a TLS connection is never
        # handed out for a plain one (plain: None; see `use_tls`)
        self.pool_key = (self, None)
        # "v1"/"v2": a PROXY header first on each connection (clientaddr.py); such a
        # connection carries one client's address, so it is never pooled
        self.send_proxy = send_proxy
        self.ssl = None  # TLS to this server: its client SSLContext, and the name to ask for
        self.sni: str | None = None

    def use_tls(self, tls: ServerTls) -> None:
        """Connect to this server over TLS (connections, pooled ones and checks alike)."""
        self.ssl = server_context(tls)
        self.sni = tls.sni or self.host
        self.pool_key = (self, tls)

    @classmethod
    def from_config(cls, cfg: ServerConfig, backend: str = "") -> Server:
        server = cls(
            cfg.name,
            cfg.address.host,
            cfg.address.port,
            weight=cfg.weight,
            backup=cfg.backup,
            maxconn=cfg.maxconn,
            backend=backend,
            check=cfg.check,
            send_proxy=cfg.send_proxy,
        )
        if cfg.tls is not None:
            server.use_tls(cfg.tls)
        return server

    @property
    def total(self) -> int:
        """Requests or connections ever given to it (by this process)."""
        return self.ctr[self.cbase + S_REQUESTS]

    @total.setter
    def total(self, value: int) -> None:
        self.ctr[self.cbase + S_REQUESTS] = value

    @property
    def failures(self) -> int:
        """Failed attempts (connect errors, broken responses)."""
        return self.ctr[self.cbase + S_FAILURES]

    @failures.setter
    def failures(self, value: int) -> None:
        self.ctr[self.cbase + S_FAILURES] = value

    @property
    def usable(self) -> bool:
        """May receive new traffic: up, ready (not drained or in maintenance) and with a
        weight above zero."""
        return self.state is State.UP and self.admin is Admin.READY and self.weight > 0

    @property
    def full(self) -> bool:
        """Has reached its maxconn (0 means no limit), in this process or the whole group."""
        if self.slots is not None:
            return self.slots.free() <= 0
        return 0 < self.maxconn <= self.active

    def __repr__(self) -> str:
        return (f"<Server {self.backend}/{self.name} {self.address} {self.state} "
                f"w={self.weight} active={self.active}>")
