"""Backends at run time: the servers of a [backends.NAME] section, its balancer and its pool.

Rule of this module: a Backend is the meeting point the proxies use (pick, take, drop, pool) and
holds no per-request state; server state changes go through `Balancer.set_state` so that the
algorithms hear of them.
"""

from __future__ import annotations

import logging

from .balancing import Balancer
from .config import BackendConfig
from .proxy.upstream import Pool
from .servers import Server, State

__all__ = ["Backend"]

log = logging.getLogger("foobar_lb")


class Backend:
    __slots__ = (
        "balancer",
        "by_name",
        "cfg",
        "mode",
        "name",
        "pool",
        "retries",
        "servers",
        "timeouts",
    )

    def __init__(self, cfg: BackendConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.mode = cfg.mode
        self.timeouts = cfg.timeouts
        self.retries = cfg.retries
        self.servers = [Server.from_config(s, backend=cfg.name) for s in cfg.servers]
        self.by_name = {s.name: s for s in self.servers}
        self.balancer = Balancer(self.servers, cfg.balance)
        self.balancer.on_change.append(self._log_change)
        self.pool = Pool()

    def pick(self, key: bytes | None, avoid: Server | None = None) -> Server | None:
        return self.balancer.pick(key, avoid if self.cfg.redispatch else None)

    def set_state(self, server: Server, state: State, reason: str = "") -> None:
        self.balancer.set_state(server, state, reason)

    def _log_change(self, server: Server, old: State, reason: str) -> None:
        active = sum(1 for s in self.servers if s.usable and not s.backup)
        backup = sum(1 for s in self.servers if s.usable and s.backup)
        why = f": {reason}" if reason else ""
        log.warning(
            "server %s/%s is %s%s, %d active and %d backup servers left",
            self.name, server.name, server.state, why, active, backup,
        )

    def close(self) -> None:
        self.pool.close_all()
