"""random: power of two random choices (HAProxy's `random(2)`).

Two servers are drawn at random in proportion to their weights and the less loaded one, by
active / weight, wins; on a tie the first draw wins, so an idle backend gets traffic in
proportion to the weights. (No "+ 1" as in leastconn: with it the heavier of two idle servers
would always win, skewing an idle backend towards the heaviest server; HAProxy's random(2)
compares served * weight the same way.) The generator can be seeded (`Algo(servers, rng=Random(1))`).
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate

from ..servers import Server
from . import Algorithm


class Algo(Algorithm):
    name = "random"

    def rebuild(self) -> None:
        self._cum = list(accumulate(s.weight for s in self.up))

    def _draw(self, servers: list[Server], cum: list[int]) -> Server:
        return servers[bisect_right(cum, self.rng.random() * cum[-1])]

    def pick(self, key: bytes | None = None) -> Server | None:
        servers, cum = self.up, self._cum
        if any(s.full for s in servers):
            servers = [s for s in servers if not s.full]
            cum = list(accumulate(s.weight for s in servers))
        if not servers:
            return None
        a = self._draw(servers, cum)
        if len(servers) == 1:
            return a
        b = self._draw(servers, cum)
        if b.active * a.weight < a.active * b.weight:
            return b
        return a
