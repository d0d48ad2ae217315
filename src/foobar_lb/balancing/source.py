"""source: the client address picks the server, the same one every time.

Weighted rendezvous hashing: each usable server scores the client address with its own seed and
the highest weight / -ln(hash) wins. The same address keeps its server while that server is up;
when a server goes down only its own clients move, spread over the rest in proportion to weight.
Hashes are stable across processes and restarts (crc32 + splitmix64, not Python's salted hash).
"""

from __future__ import annotations

import zlib
from math import log

from ..servers import Server
from . import Algorithm

_M64 = (1 << 64) - 1


def _mix(x: int) -> int:
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class Algo(Algorithm):
    name = "source"

    def pick(self, key: bytes | None = None) -> Server | None:
        base = zlib.crc32(key or b"") << 32
        best = None
        best_score = 0.0
        for s in self.up:
            if s.full:
                continue
            u = ((_mix(base | s.hash_seed) >> 11) + 0.5) / 9007199254740992.0  # (0, 1)
            score = s.weight / -log(u)
            if best is None or score > best_score:
                best = s
                best_score = score
        return best
