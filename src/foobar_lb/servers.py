"""Servers: where a server is, how much it weighs, which role it has and how it is doing.

Rule of this module: a Server object is the one home of a server's state and live counters.
It never picks servers (that is `balancing/`) and never probes them (that is `health.py`):
they change its state through `Balancer.set_state`, which tells the algorithms.
"""

from __future__ import annotations

import enum
import zlib

from .config import CheckConfig, ServerConfig

__all__ = ["Server", "State"]


class State(enum.StrEnum):
    """A server's state; compares equal to its value ("up", "down", ...) too."""

    UP = "up"
    DOWN = "down"
    DRAIN = "drain"  # keeps the connections it has, gets no new ones
    MAINT = "maint"  # taken out by an operator

    def __str__(self) -> str:
        return self.value.upper()


class Server:
    __slots__ = (
        "active",
        "address",
        "backend",
        "backup",
        "check",
        "check_status",
        "errors",
        "failures",
        "hash_seed",
        "health",
        "host",
        "last_change",
        "maxconn",
        "name",
        "port",
        "state",
        "total",
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
    ):
        self.name = name
        self.backend = backend
        self.host = host
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.weight = weight
        self.backup = backup
        self.maxconn = maxconn
        self.state = state
        self.active = 0  # requests (http) or connections (tcp) in flight right now
        self.total = 0  # requests or connections ever given to it
        self.failures = 0  # failed attempts (connect errors, broken responses)
        self.errors = 0  # consecutive errors seen by passive observation
        # active checks: HAProxy's hysteresis, one counter from 0 (down) to rise+fall-1 (fully up);
        # servers start fully up, so it takes `fall` failed checks to put one down
        self.check = check
        self.health = check.rise + check.fall - 1 if check else 0
        self.check_status = ""  # what the last check said, e.g. "layer4 connection refused"
        self.last_change = 0.0  # loop time of the last state change
        # a stable per-server seed for hashing algorithms; Python's hash() is salted per process
        self.hash_seed = zlib.crc32(f"{backend}/{name}".encode())

    @classmethod
    def from_config(cls, cfg: ServerConfig, backend: str = "") -> Server:
        return cls(
            cfg.name,
            cfg.address.host,
            cfg.address.port,
            weight=cfg.weight,
            backup=cfg.backup,
            maxconn=cfg.maxconn,
            backend=backend,
            check=cfg.check,
        )

    @property
    def usable(self) -> bool:
        """May receive new traffic: up and with a weight above zero."""
        return self.state is State.UP and self.weight > 0

    @property
    def full(self) -> bool:
        """Has reached its maxconn (0 means no limit)."""
        return 0 < self.maxconn <= self.active

    def __repr__(self) -> str:
        return (f"<Server {self.backend}/{self.name} {self.address} {self.state} "
                f"w={self.weight} active={self.active}>")
