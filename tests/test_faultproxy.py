"""The fault proxy itself (tests/faultproxy.py): each toxic does what it says, seen with raw
sockets on both sides (a line server behind it, a plain socket client in front)."""

from __future__ import annotations

import asyncio
import time

import pytest

from faultproxy import FaultProxy

from support import LOOPBACK

ANSWER = b"0123456789" * 10  # what the server writes for each line it reads


class LineServer:
    """Reads lines; answers each with ANSWER (and closes after it when `close_after`)."""

    def __init__(self, close_after: bool = False):
        self.close_after = close_after
        self.got: list[bytes] = []
        self.connections = 0
        self.line = asyncio.Event()  # set at each line received
        self.resets = 0
        self.closed = asyncio.Event()

    async def start(self) -> LineServer:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        self.address = f"{LOOPBACK}:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while line := await r.readline():
                self.got.append(line)
                self.line.set()
                w.write(ANSWER)
                await w.drain()
                if self.close_after:
                    break
        except ConnectionResetError:
            self.resets += 1
        finally:
            w.close()
            self.closed.set()

    async def stop(self) -> None:
        self.server.close()


@pytest.fixture
async def backend():
    srv = await LineServer().start()
    yield srv
    await srv.stop()


async def read_all(r: asyncio.StreamReader, timeout: float = 3.0) -> tuple[bytes, str]:
    """What arrives until the end, and how it ended: "eof", "reset" or "timeout"."""
    got = b""
    try:
        async with asyncio.timeout(timeout):
            while chunk := await r.read(65536):
                got += chunk
        return got, "eof"
    except ConnectionResetError:
        return got, "reset"
    except TimeoutError:
        return got, "timeout"


async def read_n(r: asyncio.StreamReader, n: int, timeout: float = 3.0) -> bytes:
    async with asyncio.timeout(timeout):
        return await r.readexactly(n)


async def test_without_toxics_it_forwards_both_ways(backend):
    async with FaultProxy(backend.address) as fp:
        r, w = await asyncio.open_connection(LOOPBACK, fp.port)
        for i in range(3):
            w.write(b"line %d\n" % i)
            assert await read_n(r, len(ANSWER)) == ANSWER
        w.close()
    assert backend.got == [b"line 0\n", b"line 1\n", b"line 2\n"]
    assert fp.accepted == 1


async def test_latency_delays_each_way(backend):
    async with FaultProxy(backend.address, latency=0.2) as fp:
        r, w = await asyncio.open_connection(LOOPBACK, fp.port)
        t0 = time.monotonic()
        w.write(b"hi\n")
        assert await read_n(r, len(ANSWER)) == ANSWER
        assert time.monotonic() - t0 >= 0.38  # 0.2 there, 0.2 back (timers are ms-coarse)
        w.close()


async def test_bandwidth_trickles_the_answer(backend):
    async with FaultProxy(backend.address, bandwidth=400) as fp:
        r, w = await asyncio.open_connection(LOOPBACK, fp.port)
        t0 = time.monotonic()
        w.write(b"hi\n")
        assert await read_n(r, len(ANSWER)) == ANSWER
        assert time.monotonic() - t0 >= 0.2  # 100 bytes at 400 a second: 0.25 s at least
        w.close()


async def test_reset_after_n_bytes_resets_both_sides(backend):
    async with FaultProxy(backend.address, reset_after=7) as fp:
        r, w = await asyncio.open_connection(LOOPBACK, fp.port)
        w.write(b"hi\n")
        got, how = await read_all(r)
        assert (got, how) == (ANSWER[:7], "reset")
        assert fp.resets == 1
        w.close()
        async with asyncio.timeout(3):
            await backend.closed.wait()


async def test_reset_after_zero_resets_when_the_answer_starts(backend):
    async with FaultProxy(backend.address, reset_after=0) as fp:
        r, w = await asyncio.open_connection(LOOPBACK, fp.port)
        w.write(b"hi\n")
        assert await read_all(r) == (b"", "reset")
        assert backend.got == [b"hi\n"]  # the server had the request
        w.close()


async def test_never_answer_accepts_and_stays_silent(backend):
    async with FaultProxy(backend.address, never_answer=True) as fp:
        r, w = await asyncio.open_connection(LOOPBACK, fp.port)
        w.write(b"hi\n")
        assert await read_all(r, timeout=0.5) == (b"", "timeout")
        assert backend.connections == 0 and fp.open == 1
        w.close()


async def test_close_now_closes_before_reading(backend):
    async with FaultProxy(backend.address, close_now=True) as fp:
        r, w = await asyncio.open_connection(LOOPBACK, fp.port)
        assert await read_all(r) == (b"", "eof")
        assert backend.connections == 0
        w.close()


async def test_slow_close_holds_the_fin_back():
    srv = await LineServer(close_after=True).start()
    try:
        async with FaultProxy(srv.address, slow_close=0.4) as fp:
            r, w = await asyncio.open_connection(LOOPBACK, fp.port)
            w.write(b"hi\n")
            assert await read_n(r, len(ANSWER)) == ANSWER
            t0 = time.monotonic()
            assert await read_all(r) == (b"", "eof")
            assert time.monotonic() - t0 >= 0.3
            w.close()
    finally:
        await srv.stop()


async def test_stall_after_n_bytes_until_healed(backend):
    async with FaultProxy(backend.address, stall_after=30) as fp:
        r, w = await asyncio.open_connection(LOOPBACK, fp.port)
        w.write(b"hi\n")
        assert await read_n(r, 30) == ANSWER[:30]
        assert await read_all(r, timeout=0.4) == (b"", "timeout")
        fp.heal()  # switched at run time: the rest flows
        assert await read_n(r, len(ANSWER) - 30) == ANSWER[30:]
        w.close()


async def test_half_open_reaches_the_server_and_drops_its_answer(backend):
    async with FaultProxy(backend.address, half_open=True) as fp:
        r, w = await asyncio.open_connection(LOOPBACK, fp.port)
        w.write(b"pay\n")
        async with asyncio.timeout(3):
            await backend.line.wait()
        assert backend.got == [b"pay\n"]
        assert await read_all(r, timeout=0.4) == (b"", "timeout")
        w.close()
        async with asyncio.timeout(3):  # the client's close lets the server connection go
            await backend.closed.wait()


async def test_toxics_switch_at_run_time_for_new_and_open_connections(backend):
    async with FaultProxy(backend.address) as fp:
        r, w = await asyncio.open_connection(LOOPBACK, fp.port)
        w.write(b"1\n")
        assert await read_n(r, len(ANSWER)) == ANSWER
        fp.set(reset_after=0)  # the open connection breaks at its next answer
        w.write(b"2\n")
        assert await read_all(r) == (b"", "reset")
        fp.set(close_now=True)
        r, w = await asyncio.open_connection(LOOPBACK, fp.port)
        assert await read_all(r) == (b"", "eof")
        fp.heal()
        r, w = await asyncio.open_connection(LOOPBACK, fp.port)
        w.write(b"3\n")
        assert await read_n(r, len(ANSWER)) == ANSWER
        w.close()
        with pytest.raises(TypeError):
            fp.set(nonsense=1)
