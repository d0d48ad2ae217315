"""Server states: one state machine applies every event that may change a server's state.

Rules of this module (HAProxy's checks.c and server state handling in spirit):
- events are check results, errors and successes observed on live traffic, a managed process
  exiting, and operator commands; each is applied here and only here, with its cause;
- active checks move one counter per server from 0 (down) to rise+fall-1 (fully up): a failure
  takes one off while it is above `rise`, else the server goes down and the counter to 0; a
  success adds one, and reaching `rise` puts the server up with the counter at the top;
- passive observation counts consecutive errors seen on real traffic (connection failures; with
  layer7 also 5xx answers and server timeouts): `error_limit` of them put a server down at once,
  and only its checks bring it back;
- an operator's admin state (ready, drain, maint: `servers.Admin`) is a dimension apart from
  health: checks keep moving a drained server's health, and it stays drained whatever they
  say; `set_admin` applies it (`Backend.apply_admin`), logs it and hands it to `admin_hooks`;
- a change is applied to the backend (`Backend.apply_state`: algorithms, pool, queue), logged
  once with its reason, recorded, and handed to every hook (the checks' scheduler, the master's
  broadcast to workers, the library's listeners).
It never probes, never relays traffic, and only the master (or the single-process library)
runs it: workers receive its changes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .servers import Admin, Server, State

__all__ = ["StateChange", "StateMachine"]

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


class StateMachine:
    """Applies events to the servers of the backends it is given (any object with `name`,
    `servers`, `cfg.observe`, `cfg.error_limit` and `apply_state(server, state)`)."""

    def __init__(self, events: deque[StateChange] | None = None):
        self.events: deque[StateChange] = events if events is not None else deque(maxlen=1000)
        # called as hook(backend, server, change) after each change
        self.hooks: list[Callable[[Any, Server, StateChange], None]] = []
        self.listeners: list[Callable[[StateChange], None]] = []  # the library's callbacks
        # called as hook(backend, server, old_admin) after each change of an admin state
        self.admin_hooks: list[Callable[[Any, Server, Admin], None]] = []

    # -- events -----------------------------------------------------------------------------
    def check_result(self, be: Any, server: Server, ok: bool, detail: str, took: float) -> None:
        """One active check's result."""
        c = server.check
        if c is None:
            return
        top = c.rise + c.fall - 1
        server.check_status = detail
        reason = f"{detail} (check took {took * 1000:.0f}ms)"
        if ok:
            if server.health < top:
                server.health += 1
                if server.health >= c.rise:
                    server.health = top
                    if server.state is State.DOWN:
                        server.errors = 0
                        self.set_state(be, server, State.UP, reason)
                elif server.state is State.DOWN:
                    log.info("server %s/%s check passed (%d more to go up): %s", be.name,
                             server.name, c.rise - server.health, reason)
        elif server.health > c.rise:
            server.health -= 1
            log.info("server %s/%s check failed (%d more to go down): %s", be.name,
                     server.name, server.health - c.rise + 1, reason)
        else:
            server.health = 0
            if server.state is State.UP:
                self.set_state(be, server, State.DOWN, reason)

    def observed_error(self, be: Any, server: Server, what: str, layer7: bool = False) -> None:
        """Live traffic saw `server` fail (a connection error; with layer7 a 5xx or timeout)."""
        observe = be.cfg.observe
        if observe == "none" or (layer7 and observe != "layer7"):
            return
        server.errors += 1
        if server.errors >= be.cfg.error_limit and server.state is State.UP and server.check:
            n = server.errors
            server.errors = 0
            server.health = 0
            self.set_state(be, server, State.DOWN,
                           f"{n} consecutive errors on live traffic (last: {what})")

    def observed_ok(self, be: Any, server: Server) -> None:
        """Live traffic saw `server` answer well: the run of consecutive errors ends."""
        server.errors = 0

    def process_exited(self, be: Any, server: Server, why: str) -> None:
        """A managed server's process ended: down at once, its checks bring it back."""
        server.health = 0
        self.set_state(be, server, State.DOWN, why)

    # -- the one place a state changes -----------------------------------------------------
    def set_state(self, be: Any, server: Server, state: State, reason: str = "") -> None:
        old = server.state
        if old is state:
            return
        be.apply_state(server, state)
        server.last_change = time.monotonic()
        active = sum(1 for s in be.servers if s.usable and not s.backup)
        backup = sum(1 for s in be.servers if s.usable and s.backup)
        change = StateChange(time.time(), be.name, server.name, old, state, reason, active, backup)
        self.events.append(change)
        why = f": {reason}" if reason else ""
        left = "left" if state is not State.UP else "online"
        log.log(logging.INFO if state is State.UP else logging.WARNING,
                "server %s/%s is %s%s, %d active and %d backup servers %s",
                be.name, server.name, state, why, active, backup, left)
        if active == 0 and backup == 0:
            log.error("backend %s has no server available!", be.name)
        for hook in self.hooks:
            hook(be, server, change)
        for cb in self.listeners:
            cb(change)

    # -- the operator's say (the runtime API) -------------------------------------------------
    def set_admin(self, be: Any, server: Server, admin: Admin, why: str = "") -> bool:
        """Put `server` in `admin` (ready, drain, maint); False when it was already."""
        old = server.admin
        if old is admin:
            return False
        be.apply_admin(server, admin)
        server.last_change = time.monotonic()
        active = sum(1 for s in be.servers if s.usable and not s.backup)
        backup = sum(1 for s in be.servers if s.usable and s.backup)
        what = {Admin.READY: "is READY again (back in rotation when up)",
                Admin.DRAIN: "is DRAINING (no new requests; the open ones finish)",
                Admin.MAINT: "is in MAINTENANCE (out of rotation, checks paused)"}[admin]
        by = f" ({why})" if why else ""
        log.warning("server %s/%s %s%s, %d active and %d backup servers %s", be.name,
                    server.name, what, by, active, backup,
                    "online" if admin is Admin.READY else "left")
        if active == 0 and backup == 0 and admin is not Admin.READY:
            log.error("backend %s has no server available!", be.name)
        for hook in self.admin_hooks:
            hook(be, server, old)
        return True
