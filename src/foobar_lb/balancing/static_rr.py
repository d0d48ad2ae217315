"""static-rr: a fixed weighted rotation, computed once per change of the server set.

The schedule is one full cycle of smooth weighted round robin over the usable servers (weights
divided by their common divisor), walked in order; a full server is skipped for that turn. Like
HAProxy's static-rr, the cost of a pick does not depend on the number of servers.
"""

from __future__ import annotations

from functools import reduce
from math import gcd

from ..servers import Server
from . import Algorithm


class Algo(Algorithm):
    name = "static-rr"

    def rebuild(self) -> None:
        servers = self.up
        schedule: list[Server] = []
        if servers:
            g = reduce(gcd, (s.weight for s in servers))
            weights = [s.weight // g for s in servers]
            total = sum(weights)
            score = [0] * len(servers)
            for _ in range(total):
                best = 0
                for i, w in enumerate(weights):
                    score[i] += w
                    if score[i] > score[best]:
                        best = i
                score[best] -= total
                schedule.append(servers[best])
        self._schedule = schedule
        self._pos = getattr(self, "_pos", 0) % len(schedule) if schedule else 0

    def pick(self, key: bytes | None = None) -> Server | None:
        schedule = self._schedule
        n = len(schedule)
        for _ in range(n):
            s = schedule[self._pos]
            self._pos = (self._pos + 1) % n
            if not s.full:
                return s
        return None
