"""Health: active checks and passive observation decide whether a server is up.

Rules of this module (HAProxy's checks.c in spirit):
- checks only flip server state, through `Backend.set_state`; they never relay traffic;
- hysteresis is one counter per server from 0 (down) to rise+fall-1 (fully up): a failure takes
  one off while it is above `rise`, else the server goes down and the counter to 0; a success
  adds one, and reaching `rise` puts the server up with the counter at the top;
- intervals: `inter` while fully up, `fastinter` while changing, `downinter` while down, each
  stretched or shrunk at random by `jitter` so checks of many servers do not fire in step;
- passive observation counts consecutive errors seen on real traffic (connection failures;
  with layer7 also 5xx answers and server timeouts): `error_limit` of them put a server down at
  once, and only its checks bring it back.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import TYPE_CHECKING

import httptools

from .servers import Server, State

if TYPE_CHECKING:
    from .backend import Backend

__all__ = ["Health"]

log = logging.getLogger("foobar_lb.health")

_MAX_RESPONSE_HEAD = 16384


class _Status:
    """httptools callbacks for a check response: only the status line matters."""

    __slots__ = ("parser", "status")

    def __init__(self) -> None:
        self.status = 0
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()


class Health:
    """Active checks and passive observation for the servers of one backend."""

    def __init__(self, backend: Backend, rng: random.Random | None = None):
        self.backend = backend
        self.rng = rng or random.Random()
        self.tasks: list[asyncio.Task] = []
        self.wakeups: dict[Server, asyncio.Event] = {}
        self.observe = backend.cfg.observe
        self.error_limit = backend.cfg.error_limit

    # -- active checks -------------------------------------------------------------------
    def start(self, spawn) -> None:
        for server in self.backend.servers:
            if server.check is not None:
                self.tasks.append(spawn(self._run(server)))

    def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.tasks.clear()

    async def _run(self, server: Server) -> None:
        loop = asyncio.get_running_loop()
        wake = self.wakeups[server] = asyncio.Event()
        # the first check of each server at a random point of the first interval
        await self._sleep(wake, self.rng.uniform(0, self._interval(server, jitter=False)), server)
        while True:
            t0 = loop.time()
            ok, detail = await self.probe(server)
            took = loop.time() - t0
            self.report(server, ok, detail, took)
            await self._sleep(wake, self._interval(server), server)

    async def _sleep(self, wake: asyncio.Event, delay: float, server: Server) -> None:
        """Sleep `delay`; when the server's state changes meanwhile (passive observation, its
        process exited), sleep the interval of its new state from then on instead."""
        wake.clear()
        try:
            await asyncio.wait_for(wake.wait(), delay)
        except TimeoutError:
            return
        wake.clear()
        await asyncio.sleep(self._interval(server))

    def wake(self, server: Server) -> None:
        """The server's state changed by other means than its checks: reschedule them."""
        ev = self.wakeups.get(server)
        if ev is not None:
            ev.set()

    def _interval(self, server: Server, jitter: bool = True) -> float:
        c = server.check
        top = c.rise + c.fall - 1
        if server.health == 0:
            base = c.downinter
        elif server.health >= top:
            base = c.inter
        else:
            base = c.fastinter
        if c.jitter and jitter:
            base *= 1.0 + self.rng.uniform(-c.jitter, c.jitter)
        return base

    async def probe(self, server: Server) -> tuple[bool, str]:
        """Run one check; returns (passed, what it saw)."""
        c = server.check
        port = c.port or server.port
        layer = "layer4"
        writer = None
        try:
            async with asyncio.timeout(c.timeout):
                reader, writer = await asyncio.open_connection(server.host, port)
                if c.type == "tcp":
                    return True, "layer4 check passed"
                layer = "layer7"
                host = c.host or server.address
                writer.write(f"{c.method} {c.path} HTTP/1.1\r\nHost: {host}\r\n"
                             "User-Agent: foobar_lb-check\r\nConnection: close\r\n\r\n".encode())
                status = _Status()
                seen = 0
                while not status.status:
                    data = await reader.read(4096)
                    if not data:
                        return False, "layer7 invalid response: connection closed"
                    seen += len(data)
                    if seen > _MAX_RESPONSE_HEAD:
                        return False, "layer7 invalid response: head too large"
                    try:
                        status.parser.feed_data(data)
                    except httptools.HttpParserUpgrade:
                        pass
                    except httptools.HttpParserError as e:
                        return False, f"layer7 invalid response: {e}"
            code = status.status
            if any(lo <= code <= hi for lo, hi in c.expect):
                return True, f"layer7 check passed: {code}"
            return False, f"layer7 wrong status: {code}"
        except TimeoutError:
            return False, f"{layer} timeout"
        except ConnectionRefusedError:
            return False, "layer4 connection refused"
        except OSError as e:
            return False, f"{layer} {(e.strerror or str(e)).lower()}"
        finally:
            if writer is not None:
                writer.close()

    def report(self, server: Server, ok: bool, detail: str, took: float) -> None:
        """Apply one check result to the server's health counter and state."""
        c = server.check
        top = c.rise + c.fall - 1
        server.check_status = detail
        reason = f"{detail} (check took {took * 1000:.0f}ms)"
        if ok:
            if server.health < top:
                server.health += 1
                if server.health >= c.rise:
                    server.health = top
                    if server.state is State.DOWN:
                        server.errors = 0
                        self.backend.set_state(server, State.UP, reason)
                elif server.state is State.DOWN:
                    log.info("server %s/%s check passed (%d more to go up): %s", self.backend.name,
                             server.name, c.rise - server.health, reason)
        elif server.health > c.rise:
            server.health -= 1
            log.info("server %s/%s check failed (%d more to go down): %s", self.backend.name,
                     server.name, server.health - c.rise + 1, reason)
        else:
            server.health = 0
            if server.state is State.UP:
                self.backend.set_state(server, State.DOWN, reason)

    # -- passive observation --------------------------------------------------------------
    def error(self, server: Server, what: str, layer7: bool = False) -> None:
        """Real traffic saw `server` fail (a connection error, or with layer7 a 5xx/timeout)."""
        if self.observe == "none" or (layer7 and self.observe != "layer7"):
            return
        server.errors += 1
        if server.errors >= self.error_limit and server.state is State.UP and server.check:
            n = server.errors
            server.errors = 0
            server.health = 0
            self.backend.set_state(
                server, State.DOWN, f"{n} consecutive errors on live traffic (last: {what})")
