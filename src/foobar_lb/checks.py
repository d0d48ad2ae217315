"""Checks: probing servers and scheduling the probes (HAProxy's check.c in spirit).

Rules of this module:
- a probe (tcp: the connection is made; http: and the answer has an expected status) only
  reports its result, with what it saw, through `report(backend, server, ok, detail, took)`;
  the state machine (`state.py`) decides what the result means;
- intervals: `inter` while fully up, `fastinter` while changing, `downinter` while down, each
  stretched or shrunk at random by `jitter` so checks of many servers do not fire in step; a
  server whose state changed by other means (observation, its process exited) is rescheduled
  at the interval of its new state (`wake`);
- when told to (`on_body`, set by the alerts), an http GET check also reads the answer's body
  (at most 64 KiB, within the check's timeout) and hands it over after the result: how the
  alerts learn what an app server's `/health` says. The body never changes the check's result.
- a server in maintenance (`Admin.MAINT`) is not checked: its checks are paused until it is
  ready again.
It never imports the backend, never changes a state itself and never relays traffic.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable
from typing import Any

import httptools

from .proxy import proxyproto
from .servers import Server

__all__ = ["Checks"]

log = logging.getLogger("foobar_lb.checks")

_MAX_RESPONSE_HEAD = 16384
_MAX_BODY = 65536


class _Status:
    """httptools callbacks for a check response: the status line, and the body when wanted."""

    __slots__ = ("body", "done", "parser", "status")

    def __init__(self) -> None:
        self.status = 0
        self.body = bytearray()
        self.done = False
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, data: bytes) -> None:
        if len(self.body) <= _MAX_BODY:
            self.body += data

    def on_message_complete(self) -> None:
        self.done = True


Report = Callable[[Any, Server, bool, str, float], None]


class Checks:
    """Active checks of the servers of some backends (anything with `servers`)."""

    def __init__(self, report: Report, rng: random.Random | None = None):
        self.report = report
        self.rng = rng or random.Random()
        self.tasks: dict[Server, asyncio.Task] = {}
        self.wakeups: dict[Server, asyncio.Event] = {}
        # (backend, server, body): the body of each http GET check's answer, when set
        self.on_body: Callable[[Any, Server, bytes], None] | None = None

    def start(self, backend: Any, spawn) -> None:
        for server in backend.servers:
            self.start_one(backend, server, spawn)

    def start_one(self, backend: Any, server: Server, spawn, first: float | None = None) -> None:
        """Check `server` from now on (unless it has no check, is checked already or is in
        maintenance); `first`: seconds to its first check (default: a random point of the
        first interval)."""
        if server.check is not None and server not in self.tasks and server.admin != "maint":
            self.tasks[server] = spawn(self._run(backend, server, first))

    def stop(self, servers=None) -> None:
        """Stop the checks of `servers` (default: all)."""
        for server in list(self.tasks) if servers is None else servers:
            task = self.tasks.pop(server, None)
            if task is not None:
                task.cancel()
            self.wakeups.pop(server, None)

    async def _run(self, backend: Any, server: Server, first: float | None = None) -> None:
        loop = asyncio.get_running_loop()
        wake = self.wakeups[server] = asyncio.Event()
        # the first check of each server at a random point of the first interval
        if first is None:
            first = self.rng.uniform(0, self._interval(server, jitter=False))
        if first > 0:
            await self._sleep(wake, first, server)
        while True:
            t0 = loop.time()
            on_body = self.on_body
            ok, detail, body = await self._probe(server, on_body is not None)
            took = loop.time() - t0
            self.report(backend, server, ok, detail, took)
            if body is not None and on_body is not None:
                on_body(backend, server, body)
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
        ok, detail, _ = await self._probe(server, False)
        return ok, detail

    async def _probe(self, server: Server, want_body: bool) -> tuple[bool, str, bytes | None]:
        """One check: (passed, what it saw, the answer's body when wanted and read)."""
        c = server.check
        port = c.port or server.port
        layer = "layer4"
        writer = None
        deadline = asyncio.get_running_loop().time() + c.timeout
        try:
            async with asyncio.timeout_at(deadline):
                tls_now = not server.send_proxy  # (a PROXY header goes before TLS)
                reader, writer = await asyncio.open_connection(
                    server.host, port, ssl=server.ssl if tls_now else None,
                    server_hostname=server.sni if tls_now else None)
                if server.send_proxy:  # a server that wants one gets one: LOCAL / UNKNOWN
                    writer.write(proxyproto.header(server.send_proxy, None, None))
                    if server.ssl is not None:
                        await writer.start_tls(server.ssl, server_hostname=server.sni)
                if c.type == "tcp":
                    return True, "layer4 check passed", None
                layer = "layer7"
                host = c.host or server.address
                writer.write(f"{c.method} {c.path} HTTP/1.1\r\nHost: {host}\r\n"
                             "User-Agent: foobar_lb-check\r\nConnection: close\r\n\r\n".encode())
                status = _Status()
                seen = 0
                while not status.status:
                    data = await reader.read(4096)
                    if not data:
                        return False, "layer7 invalid response: connection closed", None
                    seen += len(data)
                    if seen > _MAX_RESPONSE_HEAD:
                        return False, "layer7 invalid response: head too large", None
                    try:
                        status.parser.feed_data(data)
                    except httptools.HttpParserUpgrade:
                        pass
                    except httptools.HttpParserError as e:
                        return False, f"layer7 invalid response: {e}", None
            code = status.status
            if any(lo <= code <= hi for lo, hi in c.expect):
                ok, detail = True, f"layer7 check passed: {code}"
            else:
                ok, detail = False, f"layer7 wrong status: {code}"
            body = None
            if want_body and c.method == "GET":
                body = await self._body(status, reader, deadline)
            return ok, detail, body
        except TimeoutError:
            return False, f"{layer} timeout", None
        except ConnectionRefusedError:
            return False, "layer4 connection refused", None
        except OSError as e:
            return False, f"{layer} {(e.strerror or str(e)).lower()}", None
        finally:
            if writer is not None:
                writer.close()

    @staticmethod
    async def _body(status: _Status, reader: asyncio.StreamReader,
                    deadline: float) -> bytes | None:
        """The rest of a check's answer (it asked for Connection: close), bounded in size and
        by what is left of the check's timeout; None when it does not fit or arrive. It never
        changes the check's result."""
        try:
            async with asyncio.timeout_at(deadline):
                while not status.done and len(status.body) <= _MAX_BODY:
                    data = await reader.read(4096)
                    if not data:
                        break
                    status.parser.feed_data(data)
        except (TimeoutError, OSError, httptools.HttpParserError):
            return None
        return bytes(status.body) if len(status.body) <= _MAX_BODY else None
