"""Durations and sizes as people write them in configuration files.

Rule of this module: a duration is a string with a unit ("500ms", "2s", "1m", "1h"), a size is
a plain number of bytes or a string with a binary suffix ("16k", "1m"). Anything else is a
ValueError whose message says what was expected; the caller adds the key path.
"""

from __future__ import annotations

import re

__all__ = ["format_duration", "format_size", "parse_duration", "parse_size"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE = re.compile(r"^\s*(\d+)\s*(?:([kmg])(?:i?b)?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}

DURATION_EXPECTED = 'a duration string with a unit, like "500ms", "2s", "1m" or "1h"'
SIZE_EXPECTED = 'a size in bytes or a string with a unit, like 16384, "16k" or "10m"'


def parse_duration(value: object) -> float:
    """Return seconds as a float; raise ValueError for anything but a unit-bearing string."""
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    raise ValueError(DURATION_EXPECTED)


def parse_size(value: object) -> int:
    """Return a byte count; plain non-negative integers are bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()]
    raise ValueError(SIZE_EXPECTED)


def format_duration(seconds: float) -> str:
    """The shortest exact spelling of a duration, for help texts and logs."""
    if seconds == 0:
        return "0s"
    for unit, scale in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3)):
        n = seconds / scale
        if n >= 1 and abs(n - round(n)) < 1e-9:
            return f"{round(n)}{unit}"
    return f"{seconds * 1000:g}ms"


def format_size(n: int) -> str:
    for unit, scale in (("g", 1024**3), ("m", 1024**2), ("k", 1024)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)
