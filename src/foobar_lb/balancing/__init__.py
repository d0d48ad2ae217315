"""Balancing: which server gets the next request (HTTP) or connection (TCP).

Rule of this package: an algorithm is one module behind one small interface (HAProxy's lb_ops):
`pick`, told when a server goes up or down, when a connection is taken or dropped, when a weight
changes. Algorithms never poll server state, never touch sockets and never run health checks.

A user algorithm is one subclass and one call:

    from foobar_lb import Algorithm, register_algorithm

    class Newest(Algorithm):
        def pick(self, key):
            return self.up[-1] if self.up else None

    register_algorithm("newest", Newest)

`Balancer` holds the algorithms of one backend: one over the active servers and, with
`allbackups`, one over the backup servers, which only get traffic when no active server is up.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from ..servers import Server, State

__all__ = ["Algorithm", "Balancer", "algorithm_names", "get_algorithm", "register_algorithm"]


class Algorithm:
    """Base class. `self.servers` is every server given (config order, down ones included);
    `self.up` the ones that may get traffic now (up, weight above zero), in config order.

    Subclasses implement `pick` and, when they keep derived state, `rebuild` (called after
    every change to `self.up` or to a weight). `pick` must return a server from `self.up`
    that is not `full`, or None.
    """

    name = ""

    def __init__(self, servers: Sequence[Server], rng: random.Random | None = None):
        self.servers: list[Server] = list(servers)
        self.rng = rng or random.Random()
        self.up: list[Server] = [s for s in self.servers if s.usable]
        self.rebuild()

    # -- the interface -------------------------------------------------------------------
    def pick(self, key: bytes | None = None) -> Server | None:
        """Choose a server for a request or connection; `key` is the client address."""
        raise NotImplementedError

    def server_up(self, server: Server) -> None:
        self._refresh()

    def server_down(self, server: Server) -> None:
        self._refresh()

    def weight_changed(self, server: Server) -> None:
        self._refresh()

    def server_added(self, server: Server) -> None:
        """A server joined at run time (the runtime API): it comes last in `self.servers`."""
        self.servers.append(server)
        self._refresh()

    def server_removed(self, server: Server) -> None:
        """A server left at run time; requests it still has end with `dropped` as usual."""
        if server in self.servers:
            self.servers.remove(server)
        self._refresh()

    def taken(self, server: Server) -> None:
        """A request or connection was given to `server` (its `active` already counts it)."""

    def dropped(self, server: Server) -> None:
        """A request or connection of `server` ended (its `active` no longer counts it)."""

    # -- for subclasses -------------------------------------------------------------------
    def rebuild(self) -> None:
        """Recompute derived state after `self.up` or a weight changed."""

    def _refresh(self) -> None:
        self.up = [s for s in self.servers if s.usable]
        self.rebuild()


_REGISTRY: dict[str, type[Algorithm]] = {}


def register_algorithm(name: str, cls: type[Algorithm]) -> type[Algorithm]:
    """Make `cls` available as `balance = "<name>"` (returns cls, so it works as a decorator
    through functools.partial too)."""
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        raise TypeError(f"{cls!r} is not a subclass of foobar_lb.Algorithm")
    if not name or not isinstance(name, str):
        raise ValueError("an algorithm needs a non-empty name")
    _REGISTRY[name] = cls
    if not cls.name:
        cls.name = name
    return cls


def get_algorithm(name: str) -> type[Algorithm]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown balancing algorithm {name!r}; known: "
                       f"{', '.join(algorithm_names())}") from None


def algorithm_names() -> list[str]:
    return list(_REGISTRY)


class Balancer:
    """The servers of one backend and the algorithms that choose among them."""

    __slots__ = ("algorithm", "allbackups", "backup_algorithm", "backups", "servers", "wants_counts")

    def __init__(
        self,
        servers: Sequence[Server],
        algorithm: str = "roundrobin",
        *,
        allbackups: bool = False,
        rng: random.Random | None = None,
    ):
        cls = get_algorithm(algorithm)
        self.servers = list(servers)
        self.backups = [s for s in self.servers if s.backup]
        self.allbackups = allbackups
        self.algorithm = cls([s for s in self.servers if not s.backup], rng=rng)
        self.backup_algorithm = cls(self.backups, rng=rng) if allbackups and self.backups else None
        # whether the algorithm overrides taken/dropped (most read server.active when they pick)
        self.wants_counts = cls.taken is not Algorithm.taken or cls.dropped is not Algorithm.dropped

    def pick(self, key: bytes | None = None, avoid: Server | None = None) -> Server | None:
        """A server for new traffic, or None when every usable one is full or none is up.

        `avoid` (the server a retry failed on) is passed over while another one is usable.
        Backups are used only while no active server is up.
        """
        algo = self.algorithm
        if algo.up:
            return self._pick(algo, key, avoid)
        if self.backup_algorithm is not None:
            return self._pick(self.backup_algorithm, key, avoid)
        fallback = None
        for s in self.backups:
            if s.usable and not s.full:
                if s is not avoid:
                    return s
                fallback = s
        return fallback

    @staticmethod
    def _pick(algo: Algorithm, key: bytes | None, avoid: Server | None) -> Server | None:
        s = algo.pick(key)
        if s is None or s is not avoid:
            return s
        for _ in range(len(algo.up)):
            other = algo.pick(key)
            if other is not None and other is not avoid:
                return other
        for other in algo.up:
            if other is not avoid and not other.full:
                return other
        return s

    def any_up(self) -> bool:
        return any(s.usable for s in self.servers)

    def take(self, server: Server) -> None:
        server.active += 1
        server.total += 1
        self.notify_taken(server)

    def drop(self, server: Server) -> None:
        server.active -= 1
        self.notify_dropped(server)

    def notify_taken(self, server: Server) -> None:
        algo = self._algo_of(server)
        if algo is not None:
            algo.taken(server)

    def notify_dropped(self, server: Server) -> None:
        algo = self._algo_of(server)
        if algo is not None:
            algo.dropped(server)

    def _algo_of(self, server: Server) -> Algorithm | None:
        if not server.backup:
            return self.algorithm
        return self.backup_algorithm

    def set_state(self, server: Server, state: State, reason: str = "") -> None:
        """Change a server's state and tell its algorithm (`reason` is for the caller's log)."""
        if server.state is state:
            return
        was_usable = server.usable
        server.state = state
        self._rotation(server, was_usable)

    def _rotation(self, server: Server, was_usable: bool) -> None:
        """Tell the server's algorithm when a change took it out of rotation or put it back."""
        algo = self._algo_of(server)
        if algo is not None and was_usable != server.usable:
            if server.usable:
                algo.server_up(server)
            else:
                algo.server_down(server)

    def set_weight(self, server: Server, weight: int) -> None:
        server.weight = weight
        algo = self._algo_of(server)
        if algo is not None:
            algo.weight_changed(server)

    def set_admin(self, server: Server, admin) -> None:
        """The operator's drain, maintenance or ready (`servers.Admin`): tell its algorithm
        when that takes it out of rotation or puts it back."""
        was_usable = server.usable
        server.admin = admin
        self._rotation(server, was_usable)

    def add(self, server: Server) -> None:
        """A server added at run time, after the others."""
        self.servers.append(server)
        if not server.backup:
            self.algorithm.server_added(server)
            return
        self.backups.append(server)
        if self.allbackups:
            if self.backup_algorithm is None:
                self.backup_algorithm = type(self.algorithm)(self.backups,
                                                             rng=self.algorithm.rng)
            else:
                self.backup_algorithm.server_added(server)

    def remove(self, server: Server) -> None:
        """A server removed at run time: no algorithm picks it any more."""
        algo = self._algo_of(server)
        if server in self.servers:
            self.servers.remove(server)
        if server in self.backups:
            self.backups.remove(server)
        if algo is not None:
            algo.server_removed(server)


def _register_builtins() -> None:
    from . import first, leastconn, random_two, roundrobin, source, static_rr

    for mod in (roundrobin, static_rr, leastconn, random_two, source, first):
        register_algorithm(mod.Algo.name, mod.Algo)


_register_builtins()
