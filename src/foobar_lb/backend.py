"""Backends at run time: the servers of a [backends.NAME] section, its balancer, pool and queue.

Rule of this module: a Backend is the meeting point the proxies use (pick, take, release, wait,
observe) and holds no per-request state beyond its queue of waiting requests. It does not
decide server states: `apply_state` is how the state machine's decisions (in this process, or
pushed by the master) reach the algorithms, the pool and the queue, and what live traffic
observes goes to the `observer` (the state machine, or the link to the master in a worker).
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from .balancing import Balancer
from .config import BackendConfig, ServerConfig
from .proxy.upstream import Pool
from .servers import Admin, Server, State
from .shared import B_QUEUED, B_SIZE, B_TIMEOUT_QUEUE, S_REDISPATCHES, S_REQUESTS, S_RETRIES

__all__ = ["ASSIGNED", "FULL", "NO_SERVER", "QUEUED", "Backend", "Waiter"]

# what `Backend.assign` did (HAProxy's SRV_STATUS_*)
ASSIGNED = 0  # a server's slot is taken for the caller
QUEUED = 1  # every usable server is full: the caller waits in the queue (its Waiter returned)
NO_SERVER = 2  # no server is up
FULL = 3  # the queue is full too, or queueing is off

log = logging.getLogger("foobar_lb")

QUEUE_POLL = 0.01  # a queue waiting on group-wide slots looks again this often


class Waiter:
    """A request (HTTP) or connection (TCP) waiting for a server with a free slot.

    `who.granted(arg, server)` is called once: with a server whose slot is taken for it (it gives it
    back with `Backend.release` if its client is gone), or with None when `timeout queue`
    expires or no server is left up (the caller answers 503).
    """

    __slots__ = ("arg", "be", "cancelled", "deadline", "key", "since", "who")

    def __init__(self, key: bytes | None, deadline: float,
                 who: Any, arg: Any = None, be: Backend | None = None, since: float = 0.0):
        self.key = key
        self.deadline = deadline
        self.who = who  # has granted(arg, server): a session
        self.arg = arg
        self.cancelled = False
        self.be = be  # whose `queued` gauge counts it
        self.since = since  # loop time it began to wait

    def done(self, server: Server | None) -> None:
        self.who.granted(self.arg, server)

    def cancel(self) -> None:
        """Its client is gone: it leaves the queue (lazily) and the `queued` gauge (now)."""
        if not self.cancelled:
            self.cancelled = True
            be = self.be
            if be is not None:
                be.ctr[be.bbase + B_QUEUED] -= 1


class Backend:
    __slots__ = (
        "_qpoll",
        "_qtimer",
        "algorithm",
        "balancer",
        "bbase",
        "by_name",
        "cfg",
        "ctr",
        "mode",
        "name",
        "notify",
        "observer",
        "pool",
        "queue",
        "retries",
        "servers",
        "timeouts",
    )

    def __init__(self, cfg: BackendConfig, observer: Any = None,
                 prepare: Callable[[Server], None] | None = None):
        """`prepare(server)` is called on each new server before the algorithms see it (to
        carry a state over, give it its counters and slots)."""
        self.cfg = cfg
        # counters (shared.B_*): cells of this process's counter block, from `bbase` on
        self.ctr = memoryview(bytearray(B_SIZE * 8)).cast("q")
        self.bbase = 0
        self.name = cfg.name
        self.mode = cfg.mode
        self.timeouts = cfg.timeouts
        self.retries = cfg.retries
        self.servers = [Server.from_config(s, backend=cfg.name) for s in cfg.servers]
        for server, scfg in zip(self.servers, cfg.servers, strict=True):
            if scfg.command:  # a managed server is down until its process answers its check
                server.state = State.DOWN
                server.health = max(0, scfg.check.rise - 1)
            if prepare is not None:
                prepare(server)
        self.by_name = {s.name: s for s in self.servers}
        self.balancer = Balancer(self.servers, cfg.balance, allbackups=cfg.allbackups)
        self.algorithm = self.balancer.algorithm
        self.notify = self.balancer.wants_counts  # tell algorithms of take/drop only if they care
        self.pool = Pool(cfg.pool_max_idle, cfg.pool_idle_timeout)
        self.queue: deque[Waiter] = deque()
        self._qtimer: asyncio.TimerHandle | None = None
        self._qpoll: asyncio.TimerHandle | None = None
        # observed_error(backend, server, what, layer7) and observed_ok(backend, server)
        self.observer = observer

    # -- assignment: the one place a server's slot is taken ---------------------------------
    def assign(self, key: bytes | None, who: Any, arg: Any,
               now: float, avoid: Server | None = None, retry: bool = False,
               prefer: Server | None = None) -> tuple[int, Any]:
        """HAProxy's assign_server_and_queue: pick a server (not `avoid`, when another is
        usable; `prefer` first when it is usable and has room) and take its slot: (ASSIGNED,
        server); else queue the caller, whose `done(server)` is called later with the slot
        taken (or with None: timeout, nothing left up), as `who.granted(arg, server)`: (QUEUED,
        waiter); else (NO_SERVER or
        FULL, None). A new request does not jump the queue; a retry may."""
        if prefer is not None and prefer.usable and not prefer.full and self.take(prefer):
            return ASSIGNED, prefer
        algo = self.algorithm
        if avoid is None and algo.up and (retry or not self.queue):
            server = algo.pick(key)  # the common case, without the detours
        else:
            server = self.pick(key, avoid, retry)
        if server is not None:
            slots = server.slots  # (take, inlined)
            if slots is None or slots.take():
                server.active += 1
                server.ctr[server.cbase + S_REQUESTS] += 1
                if self.notify:
                    self.balancer.notify_taken(server)
                return ASSIGNED, server
        if not self.balancer.any_up():
            return NO_SERVER, None
        w = self.wait(key, who, now, arg)
        return (QUEUED, w) if w is not None else (FULL, None)

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

    def take(self, server: Server) -> bool:
        """Take a slot of `server` for a request or connection; False when a group-wide
        limit was reached meanwhile by another worker (the caller waits in the queue)."""
        slots = server.slots
        if slots is not None and not slots.take():
            return False
        server.active += 1
        server.ctr[server.cbase + S_REQUESTS] += 1
        if self.notify:
            self.balancer.notify_taken(server)
        return True

    def release(self, server: Server) -> None:
        server.active -= 1
        server.ctr[server.o_end] += 1  # (open now: S_REQUESTS - S_RELEASED)
        slots = server.slots
        if slots is not None:
            slots.give()
        if self.notify:
            self.balancer.notify_dropped(server)
        if self.queue:
            self._serve_queue()

    # -- the queue (HAProxy's backend queue with timeout queue and maxqueue) ---------------
    def wait(self, key: bytes | None, who: Any, now: float, arg: Any = None) -> Waiter | None:
        """Queue a request for the next free slot; None when it cannot wait (nothing up,
        queue full, or queueing off) and the caller answers 503 now."""
        if len(self.queue) >= self.cfg.maxqueue or not self.balancer.any_up():
            return None
        w = Waiter(key, now + (self.timeouts.queue or 86400.0), who, arg, self, now)
        self.queue.append(w)
        self.ctr[self.bbase + B_QUEUED] += 1
        loop = asyncio.get_running_loop()
        if self._qtimer is None:
            self._qtimer = loop.call_at(w.deadline, self._expire)
        if len(self.queue) == 1:
            # a slot may be free already (entries ahead of it gave up): look on the next turn
            loop.call_soon(self._serve_queue)
        return w

    def _serve_queue(self) -> None:
        q = self.queue
        now = 0.0
        while q:
            w = q[0]
            if w.cancelled:
                q.popleft()
                continue
            server = self.balancer.pick(w.key)
            if server is None or not self.take(server):
                break
            q.popleft()
            if not now:
                now = asyncio.get_running_loop().time()
            self._dequeued(server, now - w.since)
            w.done(server)  # with the slot taken
        if q and self._qpoll is None and any(s.slots is not None for s in self.servers):
            # slots given back by other workers wake nobody here: look again shortly
            self._qpoll = asyncio.get_running_loop().call_later(QUEUE_POLL, self._poll_queue)

    def _poll_queue(self) -> None:
        self._qpoll = None
        if self.queue:
            self._serve_queue()

    def _expire(self) -> None:
        self._qtimer = None
        q = self.queue
        loop = asyncio.get_running_loop()
        now = loop.time()
        while q and (q[0].cancelled or q[0].deadline <= now):
            w = q.popleft()
            if not w.cancelled:
                self._dequeued(None, 0.0)
                self.ctr[self.bbase + B_TIMEOUT_QUEUE] += 1
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
                self._dequeued(None, 0.0)
                w.done(None)

    def _dequeued(self, server: Server | None, waited: float) -> None:
        """A waiter leaves the queue: the gauge, and its queue time when it got `server`."""
        self.ctr[self.bbase + B_QUEUED] -= 1
        if server is not None:
            ctr = server.ctr
            h = server.hqt
            ctr[h + bisect_left(server.hb, waited)] += 1
            ctr[h + server.hn] += int(waited * 1e6)

    def retried(self, server: Server, other: Server | None) -> None:
        """An attempt on `server` failed and goes again (`other`: the server it went to)."""
        ctr = server.ctr
        ctr[server.cbase + S_RETRIES] += 1
        if other is not None and other is not server:
            ctr[server.cbase + S_REDISPATCHES] += 1

    # -- state (decided by the state machine) ------------------------------------------------
    def apply_state(self, server: Server, state: State) -> None:
        """`server` is now in `state`: tell the algorithms, empty its pool if it may not take
        traffic, and serve (or, with nothing left up, fail) the queue."""
        if server.state is state:
            return
        self.balancer.set_state(server, state)
        self._after_change(server)

    def _after_change(self, server: Server) -> None:
        """After a state or admin change: a server out of rotation keeps no idle connection;
        the queue is served by what is left, or failed when nothing is."""
        if not server.usable:
            self.pool.drop(server)
        if not self.balancer.any_up():
            self._fail_queue()
        elif self.queue:
            self._serve_queue()

    # -- run-time changes (the runtime API, decided by the master) ----------------------------
    def apply_admin(self, server: Server, admin: Admin) -> None:
        """The operator's ready, drain or maint: in or out of rotation. Requests in flight
        and open connections are left to finish."""
        if server.admin is admin:
            return
        self.balancer.set_admin(server, admin)
        self._after_change(server)

    def apply_weight(self, server: Server, weight: int) -> None:
        if server.weight == weight:
            return
        self.balancer.set_weight(server, weight)
        self.cfg = replace(self.cfg, servers=tuple(
            replace(c, weight=weight) if c.name == server.name else c for c in self.cfg.servers))
        self._after_change(server)

    def add_server(self, server: Server, cfg: ServerConfig) -> None:
        """A server added at run time (its counters, state and admin state already set)."""
        self.servers.append(server)
        self.by_name[server.name] = server
        self.cfg = replace(self.cfg, servers=(*self.cfg.servers, cfg))
        self.balancer.add(server)
        if self.queue and server.usable:
            self._serve_queue()

    def remove_server(self, server: Server) -> None:
        """Out of this backend at once: no new traffic. What it has in flight keeps its
        reference and ends as usual (`release`)."""
        if self.by_name.get(server.name) is not server:
            return
        del self.by_name[server.name]
        self.servers.remove(server)
        self.cfg = replace(self.cfg, servers=tuple(
            c for c in self.cfg.servers if c.name != server.name))
        self.balancer.remove(server)
        self.pool.drop(server)  # (again once its requests in flight are done)
        if not self.balancer.any_up():
            self._fail_queue()

    # -- passive observation ----------------------------------------------------------------
    def observe_error(self, server: Server, what: str, layer7: bool = False) -> None:
        server.failures += 1
        if self.observer is not None:
            self.observer.observed_error(self, server, what, layer7)

    def observe_status(self, server: Server, status: int) -> None:
        """A response status from `server`: 5xx (but 501 and 505) count as layer7 errors."""
        if status >= 500 and status not in (501, 505):
            if self.cfg.observe == "layer7" and self.observer is not None:
                self.observer.observed_error(self, server, f"status {status}", True)
        elif server.errors:
            server.errors = 0
            if self.observer is not None:
                self.observer.observed_ok(self, server)

    def close(self) -> None:
        if self._qpoll is not None:
            self._qpoll.cancel()
            self._qpoll = None
        if self._qtimer is not None:
            self._qtimer.cancel()
            self._qtimer = None
        self._fail_queue()
        self.pool.close_all()
