"""roundrobin: smooth weighted round robin (nginx's), the default.

Each pick adds every server's weight to its running score, takes the highest (the first one on a
tie) and takes the total weight off the winner. Equal weights give the exact rotation s1, s2, s3,
...; weights 5, 1, 1 give a, a, b, a, c, a, a: the heavy server is spread out, not bunched.
A change of the server set (one going down or up, a new weight) restarts the rotation from the
first usable server, so what happens next stays predictable.
"""

from __future__ import annotations

from ..servers import Server
from . import Algorithm


class Algo(Algorithm):
    name = "roundrobin"

    def rebuild(self) -> None:
        self._score: dict[Server, int] = dict.fromkeys(self.up, 0)
        # equal weights: the smooth rotation is a plain rotation, kept by an index while no
        # server is full (a full one sends that pick through the scores)
        up = self.up
        self._plain = bool(up) and len({s.weight for s in up}) == 1
        self._i = 0

    def pick(self, key: bytes | None = None) -> Server | None:
        if self._plain:
            up = self.up
            i = self._i
            s = up[i]
            if not s.maxconn or not s.full:
                self._i = i + 1 if i + 1 < len(up) else 0
                return s
        score = self._score
        best = None
        best_score = 0
        total = 0
        for s in self.up:
            if s.full:
                continue
            v = score[s] + s.weight
            score[s] = v
            total += s.weight
            if best is None or v > best_score:
                best = s
                best_score = v
        if best is not None:
            score[best] = best_score - total
        return best
