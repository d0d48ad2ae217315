"""A bounded load for the lab tests, run in the client host's namespace:

    ip netns exec P-client python tests/lab_load.py --url http://10.213.0.100:80/ --duration 20

Rule of this module: it only measures. N clients each send GET requests one after another, each
on a new connection (`Connection: close`), with a per-request deadline; it stops after
`--duration` seconds or on SIGTERM/SIGINT and prints one JSON object: counts of ok and failed
requests, failures by kind, the longest time without a successful answer (and when it began),
and the wall-clock times of the first and last failure, so a test can put them beside what it
did. It never retries: a failed request is counted, the client pauses 20 ms and goes on.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from urllib.parse import urlsplit


class Load:
    def __init__(self, host: str, port: int, path: str, timeout: float):
        self.host, self.port, self.path, self.timeout = host, port, path, timeout
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
                        "Connection: close\r\n\r\n").encode()
        self.ok = 0
        self.failed = 0
        self.kinds: dict[str, int] = {}
        self.servers: dict[str, int] = {}
        self.failures: list[tuple[float, str]] = []
        self.last_ok = time.time()
        self.longest_gap = 0.0
        self.gap_start = None
        self.started = self.last_ok

    async def one(self) -> None:
        try:
            status, served = await asyncio.wait_for(self._get(), self.timeout)
        except TimeoutError:
            self._fail("timeout")
            return
        except ConnectionRefusedError:
            self._fail("refused")
            return
        except ConnectionResetError:
            self._fail("reset")
            return
        except OSError as e:
            self._fail(type(e).__name__ + (f" errno {e.errno}" if e.errno else ""))
            return
        if status is None:
            self._fail("no answer")
        elif status != 200:
            self._fail(f"status {status}")
        else:
            now = time.time()
            gap = now - self.last_ok
            if gap > self.longest_gap:
                self.longest_gap, self.gap_start = gap, self.last_ok
            self.last_ok = now
            self.ok += 1
            self.servers[served] = self.servers.get(served, 0) + 1

    async def _get(self) -> tuple[int | None, str]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        try:
            writer.write(self.request)
            data = await reader.read()
        finally:
            writer.close()
        head, _, _ = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 "):
            return None, ""
        served = ""
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"x-served-by":
                served = value.strip().decode()
        return int(lines[0][9:12]), served

    def _fail(self, kind: str) -> None:
        self.failed += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.failures.append((time.time(), kind))

    def report(self) -> dict:
        now = time.time()
        gap = now - self.last_ok
        if gap > self.longest_gap:
            self.longest_gap, self.gap_start = gap, self.last_ok
        return {
            "ok": self.ok, "failed": self.failed, "kinds": self.kinds, "servers": self.servers,
            "longest_gap": round(self.longest_gap, 3), "gap_start": self.gap_start,
            "first_failure": self.failures[0][0] if self.failures else None,
            "last_failure": self.failures[-1][0] if self.failures else None,
            "failures": [(round(t, 3), k) for t, k in self.failures[:200]],
            "started": self.started, "ended": now,
        }


async def main(args: argparse.Namespace) -> dict:
    u = urlsplit(args.url)
    load = Load(u.hostname, u.port or 80, u.path or "/", args.timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def client() -> None:
        while not stop.is_set():
            before = load.failed
            await load.one()
            if load.failed != before:
                await asyncio.sleep(0.02)
            elif args.pause:
                await asyncio.sleep(args.pause)

    tasks = [asyncio.create_task(client()) for _ in range(args.concurrency)]
    print("started", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), args.duration)
    except TimeoutError:
        stop.set()
    await asyncio.wait(tasks, timeout=args.timeout + 1)
    return load.report()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--duration", type=float, default=30.0, help="at most this long (seconds)")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=2.0, help="per request (seconds)")
    p.add_argument("--pause", type=float, default=0.0, help="between two requests of a client")
    report = asyncio.run(main(p.parse_args()))
    print(json.dumps(report), flush=True)
    sys.exit(0)
