"""Build: a configuration in, the run-time objects out (frontends, backends, servers).

Rule of this module: it turns pure data (`config.Config`) into the objects the proxies use,
and for a reload (`build(new, previous)`) carries over what must survive it: each server's
state, check counters, last check result and the operator's admin state (drain, maint), by
(backend, server name); counters survive by name through the shared `Layout`. It binds no
socket, starts no task and runs no check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .backend import Backend
from .config import Config
from .frontend import Frontend
from .servers import Admin, Server, State
from .shared import (
    F_1XX,
    F_BYTES_IN,
    F_BYTES_OUT,
    S_BYTES_IN,
    S_BYTES_OUT,
    S_RELEASED,
    Counters,
    Layout,
)

__all__ = ["Built", "attach_counters", "build", "prepare_server"]


@dataclass(slots=True)
class Built:
    config: Config
    frontends: dict[str, Frontend]
    backends: dict[str, Backend]

    def server(self, backend: str, name: str) -> Server | None:
        be = self.backends.get(backend)
        return be.by_name.get(name) if be is not None else None


def build(config: Config, previous: Built | None = None, *, layout: Layout, counters: Counters,
          observer: Any = None,
          slots: Callable[[str, Server], Any] | None = None,
          states: dict[tuple[str, str], tuple] | None = None) -> Built:
    """`slots(backend, server)`: the group-wide slots of a server with maxconn (None: counted in
    this process); `states`: (state, health[, admin]) by (backend, server), as the master
    knows them."""
    cells = counters.cells

    def prepare(server: Server) -> None:
        prepare_server(server, config=config, layout=layout, counters=counters, slots=slots,
                       previous=previous, states=states)

    backends = {name: Backend(b, observer, prepare) for name, b in config.backends.items()}
    for name, be in backends.items():
        be.ctr = cells
        be.bbase = layout.backend(name)
    frontends = {}
    for i, (name, f) in enumerate(config.frontends.items()):
        fe = frontends[name] = Frontend(f, backends)
        fe.ctr = cells
        fe.cbase = layout.frontend(name)
        fe.cls0 = fe.cbase + F_1XX - 1
        fe.o_bin = fe.cbase + F_BYTES_IN
        fe.o_bout = fe.cbase + F_BYTES_OUT
        fe.fi = i
        for bname, route in fe.routes.items():
            route.fi = i
            route.ocls = layout.classes(name, bname, "") - 1
        fe.no_route.fi = i
        fe.no_route.ocls = fe.cls0
    return Built(config, frontends, backends)


def _routed(config: Config, backend: str) -> list[int]:
    """The indexes (in `config.frontends`) of the frontends that may route to `backend`."""
    out = []
    for i, f in enumerate(config.frontends.values()):
        if backend == f.default_backend or any(r.backend == backend for r in f.rules):
            out.append(i)
    return out


def attach_counters(server: Server, config: Config, layout: Layout, cells) -> None:
    """Give `server` its cells in `cells` (this process's counters) and the offsets the hot
    path uses: its block, its responses by class per frontend that routes to its backend, its
    histograms with `config`'s buckets. (Also for a server added at run time: the same names
    give the same cells in every process, as long as the master allocated them first.)"""
    be, name = server.backend, server.name
    server.ctr = cells
    server.cbase = base = layout.server(be, name)
    server.o_bin = base + S_BYTES_IN
    server.o_bout = base + S_BYTES_OUT
    server.o_end = base + S_RELEASED
    names = list(config.frontends)
    fcls = [0] * len(names)
    for i in _routed(config, be):
        fcls[i] = layout.classes(names[i], be, name) - 1
    server.fcls = tuple(fcls)
    bounds = config.metrics.buckets
    server.hb = bounds
    server.hn = len(bounds) + 1
    server.hrt = layout.histogram("response", be, name, bounds)
    server.hrs = server.hrt + server.hn
    server.hct = layout.histogram("connect", be, name, bounds)
    server.hqt = layout.histogram("queue", be, name, bounds)


def prepare_server(server: Server, *, config: Config, layout: Layout, counters: Counters,
                   slots: Callable[[str, Server], Any] | None = None,
                   previous: Built | None = None,
                   states: dict[tuple[str, str], tuple] | None = None) -> None:
    """Make `server` ready for its backend: its counters (offsets by name from `layout`), its
    group-wide slots, and what survives from `previous` or is known in `states`. A server
    added at run time goes through here too, in the master and in each worker (with the
    master's layout), so its counters are where the master reads them."""
    attach_counters(server, config, layout, counters.cells)
    if slots is not None and server.maxconn:
        server.slots = slots(server.backend, server)
    old = previous.server(server.backend, server.name) if previous is not None else None
    if old is not None:
        server.state = old.state
        server.health = old.health
        server.check_status = old.check_status
        server.errors = old.errors
        server.last_change = old.last_change
        server.admin = old.admin
        if server.check is None and old.state is State.DOWN:
            server.state = State.UP  # its check was removed: nothing would bring it back
    known = states.get((server.backend, server.name)) if states else None
    if known is not None:
        server.state = State(known[0])
        server.health = known[1]
        if len(known) > 2:
            server.admin = Admin(known[2])
