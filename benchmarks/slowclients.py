"""Slow clients beside a benchmark: `python -m benchmarks.slowclients PORT KIND COUNT`.

Rule: a measuring instrument, not a product. It keeps COUNT slow connections open to PORT on
loopback for as long as it runs, opening a new one whenever the proxy closes one:
- `slowloris`: a request head sent one byte a second, never finished;
- `trickle`: a POST with `Content-Length: 1048576` whose body comes at 10 bytes a second.
On SIGTERM it stops, closes everything and prints one JSON line: connections opened, closed by
the proxy, and how many of those were answered 408 first.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

HEAD = b"GET / HTTP/1.1\r\nHost: slow.test\r\nUser-Agent: slowloris\r\nX-Pad: " + b"a" * 4000
UPLOAD = (b"POST /upload HTTP/1.1\r\nHost: slow.test\r\nContent-Type: application/octet-stream\r\n"
          b"Content-Length: 1048576\r\n\r\n")


class Counts:
    opened = 0
    closed = 0
    answered_408 = 0
    failed = 0


async def one(port: int, kind: str, counts: Counts, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            counts.failed += 1
            await asyncio.sleep(0.1)
            continue
        counts.opened += 1
        first = b""
        try:
            if kind == "trickle":
                writer.write(UPLOAD)
            data, step = (HEAD, 1) if kind == "slowloris" else (b"x" * (1 << 20), 10)
            pos = 0
            while not stop.is_set() and pos < len(data):
                writer.write(data[pos:pos + step])
                pos += step
                try:
                    first = await asyncio.wait_for(reader.read(64), 1.0)
                except TimeoutError:
                    continue
                break  # an answer (or the close): this connection is over
        except OSError:
            pass
        finally:
            if not stop.is_set():
                counts.closed += 1
                if first.startswith(b"HTTP/1.1 408"):
                    counts.answered_408 += 1
            writer.close()


async def main(port: int, kind: str, count: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    counts = Counts()
    tasks = []
    for _ in range(count):  # spread the opening over a second
        tasks.append(asyncio.create_task(one(port, kind, counts, stop)))
        await asyncio.sleep(1.0 / count)
    print(json.dumps({"ready": True}), flush=True)
    await stop.wait()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps({"kind": kind, "count": count, "opened": counts.opened,
                      "closed_by_proxy": counts.closed, "answered_408": counts.answered_408,
                      "connect_failures": counts.failed}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
