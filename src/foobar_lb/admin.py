"""The admin listener: the master's own HTTP server for people and tools (stats page,
Prometheus metrics, readiness, the JSON runtime API).

Rules of this module:
- it runs in the master only, on its own address (`[admin] bind`), never on a public frontend,
  and reads the group's numbers from `Master.stats()` / `Master.totals()` (the workers' shared
  counters summed on read), so every answer is the same whatever worker served the traffic;
- every request passes one guard before any handler: the Bearer token when one is configured
  (compared in constant time; 401), a `Host` or `Origin` naming another site (403: a web page
  in a browser on this machine cannot drive the API, DNS rebinding included), and a
  state-changing method without `Content-Type: application/json` (415: a form post cannot);
- it changes nothing itself: the runtime API's handlers (`adminapi.py`) ask the master.
It knows no HTTP proxying and never touches a worker's memory but through the master.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from .config import AdminConfig
    from .master import Master

__all__ = ["AdminServer", "host_allowed"]

log = logging.getLogger("foobar_lb.admin")

_SAFE = frozenset(("GET", "HEAD", "OPTIONS"))


def _host_part(value: str) -> tuple[str, int | None] | None:
    """("host", port or None) of a Host header value, or None if it is malformed."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        host, rest = value[1:end], value[end + 1:]
    else:
        host, _, port_text = value.partition(":")
        rest = f":{port_text}" if _ else ""
    if rest:
        if not rest.startswith(":") or not rest[1:].isdigit():
            return None
        return host.lower(), int(rest[1:])
    return host.lower(), None


def host_allowed(value: str, port: int) -> bool:
    """A Host (or an Origin's host) this listener answers to: an IP address literal or
    `localhost`, with no port or this listener's port. A name that merely resolves here (DNS
    rebinding) is another site."""
    hp = _host_part(value)
    if hp is None:
        return False
    host, p = hp
    if p is not None and p != port:
        return False
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _origin_allowed(origin: str, port: int) -> bool:
    scheme, sep, rest = origin.partition("://")
    if not sep or scheme.lower() != "http" or "/" in rest:
        return False
    hp = _host_part(rest)
    if hp is None:
        return False
    return host_allowed(rest, port) and (hp[1] or 80) == port


def text_response(status: int, text: str, **headers: str) -> web.Response:
    return web.Response(status=status, text=text if text.endswith("\n") else text + "\n",
                        content_type="text/plain", headers=headers or None)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data, indent=1) + "\n",
                        content_type="application/json")


class AdminServer:
    """The listener and its guard; `start()` binds it (an OSError says why it could not)."""

    def __init__(self, master: Master, cfg: AdminConfig):
        self.master = master
        self.cfg = cfg
        self.token = cfg.token.encode() if cfg.token else None
        self.port = cfg.bind.port
        self.runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=1 << 20)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/stats", self.stats_page)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/api/stats", self.stats_json)
        try:
            from . import adminapi
        except ImportError:  # pragma: no cover - the runtime API is a separate module
            adminapi = None
        if adminapi is not None:
            app.router.add_routes(adminapi.routes(self.master))
        return app

    async def start(self) -> None:
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        host = self.cfg.bind.host or None  # "": every interface
        site = web.TCPSite(self.runner, host, self.cfg.bind.port, reuse_address=True,
                           backlog=128)
        try:
            await site.start()
        except OSError:
            await self.runner.cleanup()
            self.runner = None
            raise
        server = site._server  # the asyncio server: its bound address (port 0 resolved)
        sock = server.sockets[0] if server is not None and server.sockets else None
        if sock is not None:
            self.address = sock.getsockname()[:2]
            self.port = self.address[1]

    async def close(self) -> None:
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()

    def url(self) -> str:
        host, port = self.address or (self.cfg.bind.host, self.cfg.bind.port)
        if not host or host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    # -- the guard --------------------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        if self.token is not None:
            got = request.headers.get("Authorization", "")
            scheme, _, cred = got.partition(" ")
            if not hmac.compare_digest(cred.strip().encode(), self.token) or (
                    scheme.lower() != "bearer"):
                return text_response(401, "401 Unauthorized: send Authorization: Bearer <token>",
                                     **{"WWW-Authenticate": 'Bearer realm="foobar_lb admin"'})
        host = request.headers.get("Host")
        if host is not None and not host_allowed(host, self.port):
            return text_response(403, f"403 Forbidden: Host {host!r} is not this admin listener "
                                      "(use its IP address or localhost)")
        origin = request.headers.get("Origin")
        if origin is not None and not _origin_allowed(origin, self.port):
            return text_response(403, f"403 Forbidden: requests from origin {origin!r} are "
                                      "not accepted")
        if request.method not in _SAFE and request.content_type != "application/json":
            return text_response(415, "415 Unsupported Media Type: state-changing requests "
                                      "need Content-Type: application/json")
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception:  # a bug: say so to the caller and in the log, keep serving
            log.exception("admin: %s %s failed", request.method, request.path)
            return text_response(500, "500 Internal Server Error (see the load balancer's log)")

    # -- views ------------------------------------------------------------------------------------
    async def ready(self, request: web.Request) -> web.Response:
        why = self.master.not_ready_reasons()
        if why:
            return text_response(503, "not ready\n" + "\n".join(why))
        return text_response(200, "ready")

    async def stats_page(self, request: web.Request) -> web.Response:
        if "json" in request.query:
            return json_response(self.master.stats())
        from .statspage import html

        return web.Response(text=html(self.master.stats()), content_type="text/html",
                            charset="utf-8", headers={"Cache-Control": "no-store"})

    async def stats_json(self, request: web.Request) -> web.Response:
        return json_response(self.master.stats())

    async def metrics(self, request: web.Request) -> web.Response:
        from .metrics import prometheus_text

        return web.Response(body=prometheus_text(self.master).encode(),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
