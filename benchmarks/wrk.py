"""Running wrk once and reading what it printed.

Rule: a wrk run counts only when wrk exits 0 and prints a request total and Requests/sec; its
socket errors and non-2xx/3xx count are kept with the run (and reported), never dropped.
Latencies are stored in milliseconds, whatever unit wrk printed them in.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import asdict, dataclass, field

from .tools import BenchError

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h)\s*$")
_PERCENTILE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+(\S+)\s*$", re.M)
_TOTAL = re.compile(r"^\s*(\d+) requests in (\S+),\s*(\S+) read", re.M)
_RPS = re.compile(r"^Requests/sec:\s*([\d.]+)", re.M)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


def parse_duration_ms(text: str) -> float:
    """'512.00us' -> 0.512, '2.10ms' -> 2.1, '1.02s' -> 1020.0."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


@dataclass
class WrkResult:
    requests: int
    seconds: float  # as wrk reports it ("in 10.00s")
    rps: float
    latency_ms: dict[str, float]  # "p50", "p75", "p90", "p99"
    errors: dict[str, int] = field(default_factory=dict)  # connect/read/write/timeout/non2xx
    read: str = ""

    @property
    def error_total(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict:
        return asdict(self)


def parse(output: str) -> WrkResult:
    total = _TOTAL.search(output)
    rps = _RPS.search(output)
    if not total or not rps:
        raise ValueError("no request total or Requests/sec in wrk's output")
    latency = {f"p{p}": parse_duration_ms(v) for p, v in _PERCENTILE.findall(output)}
    if "p50" not in latency or "p99" not in latency:
        raise ValueError("no latency distribution (50% and 99%) in wrk's output")
    errors = {}
    if m := _SOCKET_ERRORS.search(output):
        errors.update(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))
    if m := _NON2XX.search(output):
        errors["non2xx"] = int(m.group(1))
    return WrkResult(
        requests=int(total.group(1)),
        seconds=parse_duration_ms(total.group(2)) / 1000.0,
        rps=float(rps.group(1)),
        latency_ms=latency,
        errors={k: v for k, v in errors.items() if v},
        read=total.group(3),
    )


def command(wrk: str, url: str, connections: int, duration: float, threads: int = 1,
            headers: tuple[str, ...] = ()) -> list[str]:
    """wrk's argv; each of `headers` ("Name: value") is sent with every request (-H), so
    "Connection: close" makes wrk open a new connection for each request."""
    secs = max(1, round(duration))
    extra = [a for h in headers for a in ("-H", h)]
    return [wrk, f"-t{threads}", f"-c{connections}", f"-d{secs}s", *extra, "--latency", url]


def run(argv: list[str], duration: float, label: str) -> tuple[WrkResult, str]:
    """Run wrk (argv from `command`, maybe behind taskset); return the parsed result and its output."""
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{label}: wrk did not finish within {duration + 60:.0f}s") from None
    except OSError as exc:
        raise BenchError(f"{label}: cannot run wrk: {exc}") from None
    text = out.stdout + ("\n" + out.stderr if out.stderr.strip() else "")
    if out.returncode != 0:
        raise BenchError(f"{label}: wrk exited with status {out.returncode}\n  command: {' '.join(argv)}\n"
                         + "\n".join("    " + line for line in text.strip().splitlines()[-15:]))
    try:
        result = parse(out.stdout)
    except ValueError as exc:
        raise BenchError(f"{label}: cannot read wrk's output ({exc}):\n"
                         + "\n".join("    " + line for line in text.strip().splitlines()[-15:])) from None
    if result.requests == 0:
        raise BenchError(f"{label}: wrk completed no request:\n"
                         + "\n".join("    " + line for line in text.strip().splitlines()[-15:]))
    return result, text
