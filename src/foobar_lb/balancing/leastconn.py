"""leastconn: the server with the fewest requests in flight for its weight.

Load is (active + 1) / weight, compared exactly by cross-multiplication; ties go round robin, so
equal idle servers still share the traffic (as HAProxy's leastconn does).
"""

from __future__ import annotations

from ..servers import Server
from . import Algorithm


class Algo(Algorithm):
    name = "leastconn"

    def rebuild(self) -> None:
        self._next = 0

    def pick(self, key: bytes | None = None) -> Server | None:
        up = self.up
        n = len(up)
        best = None
        best_i = 0
        start = self._next % n if n else 0
        for j in range(n):
            i = (start + j) % n
            s = up[i]
            if s.full:
                continue
            if best is None or (s.active + 1) * best.weight < (best.active + 1) * s.weight:
                best = s
                best_i = i
        if best is not None:
            self._next = best_i + 1
        return best
