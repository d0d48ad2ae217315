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
from .shared import F_1XX, Counters, Layout

__all__ = ["Built", "build", "prepare_server"]


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
        prepare_server(server, layout=layout, counters=counters, slots=slots, previous=previous,
                       states=states)

    backends = {name: Backend(b, observer, prepare) for name, b in config.backends.items()}
    frontends = {}
    for name, f in config.frontends.items():
        fe = frontends[name] = Frontend(f, backends)
        fe.ctr = cells
        fe.cbase = layout.frontend(name)
        fe.cls0 = fe.cbase + F_1XX - 1
    return Built(config, frontends, backends)


def prepare_server(server: Server, *, layout: Layout, counters: Counters,
                   slots: Callable[[str, Server], Any] | None = None,
                   previous: Built | None = None,
                   states: dict[tuple[str, str], tuple] | None = None) -> None:
    """Make `server` ready for its backend: its counters (offsets by name from `layout`), its
    group-wide slots, and what survives from `previous` or is known in `states`. A server
    added at run time goes through here too, in the master and in each worker (with the
    master's layout), so its counters are where the master reads them."""
    server.ctr = counters.cells
    server.cbase = layout.server(server.backend, server.name)
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
