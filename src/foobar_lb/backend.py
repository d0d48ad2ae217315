"""Backends at run time: the servers of a [backends.NAME] section, its balancer, pool and queue.

Rule of this module: a Backend is the meeting point the proxies use (pick, take, release, wait,
observe) and holds no per-request state beyond its queue of waiting requests. Server state
changes go through `set_state`, which tells the algorithms, logs the change once with the
reason, empties the pool of a server that went down and serves the queue when one comes up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from .balancing import Balancer
from .config import BackendConfig
from .health import Health
from .proxy.upstream import Pool
from .servers import Server, State

__all__ = ["Backend", "StateChange", "Waiter"]

log = logging.getLogger("foobar_lb")


@dataclass(frozen=True, slots=True)
class StateChange:
    """One server state change, as logged (kept in `LoadBalancer.events`)."""

    time: float  # time.time()
    backend: str
    server: str
    old: State
    new: State
    reason: str
    active_left: int
    backup_left: int


class Waiter:
    """A request (HTTP) or connection (TCP) waiting for a server with a free slot.

    `done(server)` is called once: with a server when one has a free slot (the callee takes it
    with `Backend.take`, or leaves it if its client is gone), or with None when `timeout queue`
    expires or no server is left up (the caller answers 503).
    """

    __slots__ = ("cancelled", "deadline", "done", "key")

    def __init__(self, key: bytes | None, deadline: float, done: Callable[[Server | None], None]):
        self.key = key
        self.deadline = deadline
        self.done = done
        self.cancelled = False


class Backend:
    __slots__ = (
        "_qtimer",
        "algorithm",
        "balancer",
        "by_name",
        "cfg",
        "events",
        "health",
        "listeners",
        "mode",
        "name",
        "notify",
        "pool",
        "queue",
        "retries",
        "servers",
        "timeouts",
    )

    def __init__(self, cfg: BackendConfig, events: deque[StateChange] | None = None):
        self.cfg = cfg
        self.name = cfg.name
        self.mode = cfg.mode
        self.timeouts = cfg.timeouts
        self.retries = cfg.retries
        self.servers = [Server.from_config(s, backend=cfg.name) for s in cfg.servers]
        for server, scfg in zip(self.servers, cfg.servers, strict=True):
            if scfg.command:  # a managed server is down until its process answers its check
                server.state = State.DOWN
                server.health = max(0, scfg.check.rise - 1)
        self.by_name = {s.name: s for s in self.servers}
        self.balancer = Balancer(self.servers, cfg.balance, allbackups=cfg.allbackups)
        self.algorithm = self.balancer.algorithm
        self.notify = self.balancer.wants_counts  # tell algorithms of take/drop only if they care
        self.pool = Pool(cfg.pool_max_idle, cfg.pool_idle_timeout)
        self.queue: deque[Waiter] = deque()
        self._qtimer: asyncio.TimerHandle | None = None
        self.events = events if events is not None else deque(maxlen=1000)
        self.listeners: list[Callable[[StateChange], None]] = []
        self.health = Health(self)

    # -- picking and counting --------------------------------------------------------------
    def pick(self, key: bytes | None, avoid: Server | None = None,
             retry: bool = False) -> Server | None:
        """A usable server with a free slot, or None (then `wait`, or answer 503). A new
        request does not jump the queue; a retry of an admitted one may."""
        if self.queue and not retry:
            return None
        algo = self.algorithm
        if avoid is None and algo.up:  # the common case, without the detours
            return algo.pick(key)
        return self.balancer.pick(key, avoid if self.cfg.redispatch else None)

    def take(self, server: Server) -> None:
        server.active += 1
        server.total += 1
        if self.notify:
            self.balancer.notify_taken(server)

    def release(self, server: Server) -> None:
        server.active -= 1
        if self.notify:
            self.balancer.notify_dropped(server)
        if self.queue:
            self._serve_queue()

    # -- the queue (HAProxy's backend queue with timeout queue and maxqueue) ---------------
    def wait(self, key: bytes | None, done: Callable[[Server | None], None],
             now: float) -> Waiter | None:
        """Queue a request for the next free slot; None when it cannot wait (nothing up,
        queue full, or queueing off) and the caller answers 503 now."""
        if len(self.queue) >= self.cfg.maxqueue or not self.balancer.any_up():
            return None
        w = Waiter(key, now + (self.timeouts.queue or 86400.0), done)
        self.queue.append(w)
        loop = asyncio.get_running_loop()
        if self._qtimer is None:
            self._qtimer = loop.call_at(w.deadline, self._expire)
        if len(self.queue) == 1:
            # a slot may be free already (entries ahead of it gave up): look on the next turn
            loop.call_soon(self._serve_queue)
        return w

    def _serve_queue(self) -> None:
        q = self.queue
        while q:
            w = q[0]
            if w.cancelled:
                q.popleft()
                continue
            server = self.balancer.pick(w.key)
            if server is None:
                break
            q.popleft()
            w.done(server)

    def _expire(self) -> None:
        self._qtimer = None
        q = self.queue
        loop = asyncio.get_running_loop()
        now = loop.time()
        while q and (q[0].cancelled or q[0].deadline <= now):
            w = q.popleft()
            if not w.cancelled:
                w.done(None)
        while q and q[0].cancelled:
            q.popleft()
        if q:
            self._qtimer = loop.call_at(q[0].deadline, self._expire)

    def _fail_queue(self) -> None:
        q = self.queue
        while q:
            w = q.popleft()
            if not w.cancelled:
                w.done(None)

    # -- state ------------------------------------------------------------------------------
    def set_state(self, server: Server, state: State, reason: str = "") -> None:
        old = server.state
        if old is state:
            return
        self.balancer.set_state(server, state, reason)
        server.last_change = time.monotonic()
        active = sum(1 for s in self.servers if s.usable and not s.backup)
        backup = sum(1 for s in self.servers if s.usable and s.backup)
        change = StateChange(time.time(), self.name, server.name, old, state, reason, active, backup)
        self.events.append(change)
        why = f": {reason}" if reason else ""
        left = "left" if state is not State.UP else "online"
        log.log(logging.INFO if state is State.UP else logging.WARNING,
                "server %s/%s is %s%s, %d active and %d backup servers %s",
                self.name, server.name, state, why, active, backup, left)
        if not server.usable:
            self.pool.drop(server)
        self.health.wake(server)  # its checks now run at the interval of its new state
        if active == 0 and backup == 0:
            log.error("backend %s has no server available!", self.name)
            self._fail_queue()
        elif self.queue:
            self._serve_queue()
        for cb in self.listeners:
            cb(change)

    # -- passive observation ----------------------------------------------------------------
    def observe_error(self, server: Server, what: str, layer7: bool = False) -> None:
        server.failures += 1
        self.health.error(server, what, layer7)

    def observe_status(self, server: Server, status: int) -> None:
        """A response status from `server`: 5xx (but 501 and 505) count as layer7 errors."""
        if status >= 500 and status not in (501, 505) and self.health.observe == "layer7":
            self.health.error(server, f"status {status}", layer7=True)
        else:
            server.errors = 0

    def start(self, spawn) -> None:
        self.health.start(spawn)

    def close(self) -> None:
        self.health.stop()
        if self._qtimer is not None:
            self._qtimer.cancel()
            self._qtimer = None
        self._fail_queue()
        self.pool.close_all()
