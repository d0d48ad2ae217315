"""first: fill the first server, then the next (HAProxy's `balance first`).

The first usable server in configuration order that is below its `maxconn` gets the traffic,
so servers beyond the ones needed stay idle (and can be powered down). Without maxconn the first
usable server gets everything.
"""

from __future__ import annotations

from ..servers import Server
from . import Algorithm


class Algo(Algorithm):
    name = "first"

    def pick(self, key: bytes | None = None) -> Server | None:
        for s in self.up:
            if not s.full:
                return s
        return None
