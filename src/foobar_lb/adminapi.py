"""The runtime API: JSON over the admin listener to see servers and change them live.

Rules of this module:
- it only reads and validates: what a request asks is checked here (unknown backend or server
  404, a bad body 400 naming the field and its value, a name already taken 409), and the
  change itself is the master's (`Master.set_admin`, `set_weight`, `add_server`,
  `remove_server`, `check_server`, `reload`), which pushes it to every worker;
- answers are JSON, errors too: `{"error": "..."}` with the status;
- the admin listener's guard (admin.py) has already checked the token, Host, Origin and the
  `Content-Type: application/json` of every state-changing request.
Routes:
  GET    /api/backends                                   every backend and server, with counters
  POST   /api/backends/{backend}/servers/{server}        {"state": "ready"|"drain"|"maint"}
                                                         and/or {"weight": N}
  PUT    /api/backends/{backend}/servers/{server}        {"address": "host:port", "weight": N,
                                                         "backup": false}: add a server
  DELETE /api/backends/{backend}/servers/{server}        drain it, then remove it
  POST   /api/backends/{backend}/servers/{server}/check  run a check now
  POST   /api/reload                                     re-read the configuration file
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .config import _NAME, _NAME_EXPECTED, MAX_WEIGHT, parse_address
from .master import ChangeError
from .servers import Admin

if TYPE_CHECKING:
    from .master import Master

__all__ = ["routes", "server_view"]

_STATUS = {"unknown": 404, "conflict": 409, "invalid": 400}


class _Bad(Exception):
    """A request that cannot be done as asked: its status and message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _answer(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(data, indent=1) + "\n",
                        content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _answer({"error": message}, status)


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


async def _body(request: web.Request, known: tuple[str, ...], *, empty_ok: bool = False
                ) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        if empty_ok:
            return {}
        raise _Bad(400, f"the body is empty: expected a JSON object with {_fields(known)}")
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise _Bad(400, f"the body is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise _Bad(400, f"the body = {_show(data)}: expected a JSON object with "
                        f"{_fields(known)}")
    for key in data:
        if key not in known:
            raise _Bad(400, f"{key}: unknown field; expected {_fields(known)}")
    return data


def _fields(known: tuple[str, ...]) -> str:
    return ", ".join(known[:-1]) + f" or {known[-1]}" if len(known) > 1 else known[0]


def _weight(data: dict[str, Any]) -> int:
    w = data["weight"]
    if isinstance(w, bool) or not isinstance(w, int) or not 0 <= w <= MAX_WEIGHT:
        raise _Bad(400, f"weight = {_show(w)}: expected a whole number from 0 to {MAX_WEIGHT}")
    return w


def _name(request: web.Request) -> tuple[str, str]:
    backend, server = request.match_info["backend"], request.match_info["server"]
    return backend, server


def server_view(master: Master, be: Any, srv: Any, counters: dict[str, Any] | None) -> dict:
    """One server as the API shows it: the counters of `master.stats()` and what the runtime
    API knows (`state` is its health, `admin` the operator's say)."""
    out: dict[str, Any] = {"name": srv.name}
    out.update(counters or {})
    out.update({
        "address": srv.address,
        "state": srv.state.value,
        "admin": srv.admin.value,
        "weight": srv.weight,
        "backup": srv.backup,
        "runtime": master.runtime_server(be.name, srv.name),
        "checks": ("none" if srv.check is None else
                   "paused" if srv.admin is Admin.MAINT else "on"),
    })
    if "check" not in out or not out["check"]:
        out["check"] = {"status": srv.check_status} if srv.check is not None else None
    return out


def backends_view(master: Master) -> dict[str, Any]:
    stats = master.stats()
    counted = stats.get("backends", {})
    out = []
    for name, be in master.built.backends.items():
        agg = dict(counted.get(name, {}))
        per_server = agg.pop("servers", {}) or {}
        entry: dict[str, Any] = {"name": name, **agg}
        entry["balance"] = be.cfg.balance
        entry["servers"] = [server_view(master, be, s, per_server.get(s.name))
                            for s in be.servers]
        out.append(entry)
    return {"backends": out}


def routes(master: Master) -> list[web.RouteDef]:
    """The runtime API's routes, mounted by the admin listener (admin.py)."""

    def handled(fn):
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                return await fn(request)
            except _Bad as e:
                return _error(e.status, e.message)
            except ChangeError as e:
                return _error(_STATUS.get(e.kind, 400), e.message)

        return handler

    async def list_backends(request: web.Request) -> web.Response:
        return _answer(backends_view(master))

    def one(backend: str, name: str) -> dict[str, Any]:
        be, srv = master.find(backend, name)
        counters = master.stats().get("backends", {}).get(backend, {}).get("servers", {})
        return server_view(master, be, srv, counters.get(name))

    async def change(request: web.Request) -> web.Response:
        backend, name = _name(request)
        master.find(backend, name)  # 404 before 400: what is asked of what does not exist
        data = await _body(request, ("state", "weight"))
        admin = weight = None
        if "state" in data:
            v = data["state"]
            if v not in ("ready", "drain", "maint"):
                raise _Bad(400, f'state = {_show(v)}: expected "ready", "drain" or "maint"')
            admin = Admin(v)
        if "weight" in data:
            weight = _weight(data)
        if admin is None and weight is None:
            raise _Bad(400, "the body = {}: expected a JSON object with state or weight")
        if weight is not None:
            await master.set_weight(backend, name, weight)
        if admin is not None:
            await master.set_admin(backend, name, admin)
        return _answer(one(backend, name))

    async def add(request: web.Request) -> web.Response:
        backend, name = _name(request)
        master.find(backend)
        if not _NAME.fullmatch(name):
            raise _Bad(400, f"server name {_show(name)}: expected {_NAME_EXPECTED}")
        data = await _body(request, ("address", "weight", "backup"))
        if "address" not in data:
            raise _Bad(400, 'address: missing; expected a server address "host:port"')
        addr = data["address"]
        try:
            address = parse_address(addr, allow_any_host=False, allow_port_zero=False)
        except ValueError:
            raise _Bad(400, f'address = {_show(addr)}: expected a server address "host:port" '
                            "with a port from 1 to 65535") from None
        weight = _weight(data) if "weight" in data else 1
        backup = data.get("backup", False)
        if not isinstance(backup, bool):
            raise _Bad(400, f"backup = {_show(backup)}: expected true or false")
        await master.add_server(backend, name, address, weight, backup)
        return _answer(one(backend, name), 201)

    async def remove(request: web.Request) -> web.Response:
        backend, name = _name(request)
        master.find(backend, name)
        workers, left = await master.remove_server(backend, name)
        msg = f"server {backend}/{name} removed"
        if left:
            msg += f" ({left} requests still in flight after the wait; they were left to end)"
        return _answer({"ok": True, "message": msg, "workers": workers, "in_flight_left": left})

    async def check(request: web.Request) -> web.Response:
        backend, name = _name(request)
        ok, detail, took, counted = await master.check_server(backend, name)
        view = one(backend, name)
        return _answer({"ok": ok, "status": detail, "duration": round(took, 6),
                        "counted": counted, "server": view})

    async def reload(request: web.Request) -> web.Response:
        ok, msg = await master.reload()
        return _answer({"ok": ok, "message": msg}, 200 if ok else 400)

    async def elsewhere(request: web.Request) -> web.Response:
        """Any other /api/ request: 405 naming the methods a known path takes, else 404 with
        the list of endpoints."""
        path = request.path
        for rx, methods in _ENDPOINTS:
            if rx.fullmatch(path):
                resp = _error(405, f"{request.method} {path}: expected {' or '.join(methods)}")
                resp.headers["Allow"] = ", ".join(methods)
                return resp
        return _error(404, f"no endpoint {path}; the runtime API has GET /api/backends, "
                           "POST, PUT and DELETE /api/backends/BACKEND/servers/SERVER, POST "
                           "/api/backends/BACKEND/servers/SERVER/check and POST /api/reload")

    base = "/api/backends/{backend}/servers/{server}"
    return [
        web.get("/api/backends", handled(list_backends)),
        web.post(base, handled(change)),
        web.put(base, handled(add)),
        web.delete(base, handled(remove)),
        web.post(base + "/check", handled(check)),
        web.post("/api/reload", handled(reload)),
        web.route("*", "/api/{tail:.*}", elsewhere),  # (last: after every other /api/ route)
    ]


_ENDPOINTS = [
    (re.compile(r"/api/backends"), ("GET",)),
    (re.compile(r"/api/backends/[^/]+/servers/[^/]+"), ("POST", "PUT", "DELETE")),
    (re.compile(r"/api/backends/[^/]+/servers/[^/]+/check"), ("POST",)),
    (re.compile(r"/api/reload"), ("POST",)),
    (re.compile(r"/api/stats"), ("GET",)),
]
