"""GTID positions: the causal token's text and the one comparison routing needs.

Rule of this module: pure functions on MariaDB GTID position strings ("0-1-42" or several
domains, "0-1-42,1-3-7"), no I/O. A position is a map domain -> sequence number; within a domain
sequence numbers only grow (the cluster runs `gtid_strict_mode`), so a node has applied a
position when, for every domain of it, its own sequence number is at least as high. Text that is
not a position parses to None: a client's token is never trusted to be well formed.
"""

from __future__ import annotations

import re

__all__ = ["Position", "covers", "parse_position"]

Position = dict[int, int]  # domain id -> sequence number

_GTID = re.compile(r"(\d{1,10})-(\d{1,10})-(\d{1,20})")
_MAX_DOMAINS = 64
_U32 = 2**32 - 1
_U64 = 2**64 - 1


def parse_position(text: str | None) -> Position | None:
    """"0-1-42,1-2-7" -> {0: 42, 1: 7}; None for empty or malformed text (never raises)."""
    if not text or len(text) > 2000:
        return None
    parts = text.strip().split(",")
    if len(parts) > _MAX_DOMAINS:
        return None
    pos: Position = {}
    for part in parts:
        m = _GTID.fullmatch(part.strip())
        if m is None:
            return None
        domain, server, seq = (int(g) for g in m.groups())
        if domain > _U32 or server > _U32 or seq > _U64 or domain in pos:
            return None
        pos[domain] = seq
    return pos


def covers(have: Position | None, want: Position) -> bool:
    """True when a node at `have` has applied everything up to `want`."""
    if have is None:
        return False
    return all(have.get(domain, -1) >= seq for domain, seq in want.items())

