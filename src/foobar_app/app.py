"""The app: a small real service behind the load balancer.

Rules of this module:
- every handler reaches the database through the router and says its intent (read, write,
  transaction); nothing here knows which node runs what;
- every response says which server made it (`X-Served-By`) and, when it touched the database,
  which role served it (`X-DB-Role: primary|replica`);
- causal tokens: a request's token (header `X-Causal-Token`, else cookie `foobar_causal`) is
  handed to the router, which makes its reads see that position (a malformed one is ignored);
  every response to a write carries the write's position in `X-Causal-Token`, and the HTML
  page's own form post puts it in the `foobar_causal` cookie;
- every error is JSON `{"error": {"code", "message", "field"}}`; bad input is a 4xx, never a 500
  or a traceback; a database that cannot serve is a 503: `primary_unavailable` (with
  `"committed": false | "unknown"` for writes) when it needed the primary, `db_unavailable`
  otherwise;
- `/health` answers at once from the state the database monitor keeps; it never waits on a node;
- `/metrics` (Prometheus text, metrics.py): every request is counted by the middleware once its
  answer is made (by method, route pattern and status class, with its time).

Routes: POST/GET /items, GET/PUT/DELETE /items/{id}, GET / (HTML), GET /health, GET /metrics.
"""

from __future__ import annotations

import html
import json
import logging
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from .db import DatabaseError, DatabaseUnavailable, PrimaryUnavailable, Router, current_trace, track
from .metrics import CONTENT_TYPE, Metrics, render

__all__ = ["DB", "METRICS", "NAME", "make_app"]

log = logging.getLogger("foobar_app")

DB = web.AppKey("db", Router)
NAME = web.AppKey("name", str)
METRICS = web.AppKey("metrics", Metrics)

MAX_BODY = 64 * 1024
MAX_NAME = 200
MAX_NOTE = 2000
MAX_LIMIT = 500
DEFAULT_LIMIT = 50
MAX_ID = 2**63 - 1
TOKEN_HEADER = "X-Causal-Token"
TOKEN_COOKIE = "foobar_causal"

SCHEMA = {
    "sqlite": """
        CREATE TABLE IF NOT EXISTS items (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            note TEXT NOT NULL DEFAULT '',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )""",
    "mysql": """
        CREATE TABLE IF NOT EXISTS items (
            id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
            name VARCHAR(200) NOT NULL,
            note VARCHAR(2000) NOT NULL DEFAULT '',
            created_at VARCHAR(32) NOT NULL,
            updated_at VARCHAR(32) NOT NULL
        ) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4""",
}
COLUMNS = "id, name, note, created_at, updated_at"


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


def error_body(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message, "field": field}},
                             status=status)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- input ----------------------------------------------------------------------------------------


def _item_id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isascii() or not raw.isdigit() or int(raw) > MAX_ID:
        raise ApiError(400, "invalid_parameter", f"item id must be a positive integer, not {raw!r}",
                       "id")
    return int(raw)


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or not (lo <= int(raw) <= hi):
        raise ApiError(400, "invalid_parameter",
                       f"{name} must be an integer from {lo} to {hi}, not {raw!r}", name)
    return int(raw)


async def _json_object(request: web.Request) -> dict[str, Any]:
    ctype = request.content_type
    if ctype != "application/json":
        raise ApiError(415, "unsupported_media_type",
                       f"send JSON with Content-Type: application/json, not {ctype or 'nothing'}")
    raw = await request.read()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, "invalid_json", f"the body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "invalid_json", "the body is not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object like "
                                            '{"name": "...", "note": "..."}')
    return data


def _fields(data: dict[str, Any]) -> tuple[str, str]:
    """Validate {"name": str, "note": str}: name required, note optional."""
    for key in data:
        if key not in ("name", "note"):
            raise ApiError(400, "unknown_field", f"unknown field {key!r}; expected name and note",
                           key)
    if "name" not in data:
        raise ApiError(400, "missing_field", "name is required", "name")
    name = data["name"]
    note = data.get("note", "")
    for field, value, limit in (("name", name, MAX_NAME), ("note", note, MAX_NOTE)):
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            raise ApiError(400, "invalid_type", f"{field} must be a string, not {kind}", field)
        if len(value) > limit:
            raise ApiError(400, "too_long", f"{field} is {len(value)} characters; at most {limit}",
                           field)
        if "\x00" in value:
            raise ApiError(400, "invalid_value", f"{field} must not contain NUL characters", field)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate such as "\ud800": not storable text
            raise ApiError(400, "invalid_value", f"{field} must be valid Unicode text "
                                                 "(no lone surrogates)", field) from None
    if not name.strip():
        raise ApiError(400, "invalid_value", "name must not be empty", "name")
    return name, note


# -- handlers -------------------------------------------------------------------------------------


async def create_item(request: web.Request) -> web.Response:
    form = request.content_type == "application/x-www-form-urlencoded"
    if form:  # the HTML page's form
        try:
            posted = await request.post()
        except (UnicodeDecodeError, ValueError):
            raise ApiError(400, "invalid_form", "the form is not valid UTF-8 text") from None
        data = {k: v for k, v in posted.items() if k in ("name", "note")}
    else:
        data = await _json_object(request)
    name, note = _fields(data)
    now = _now()
    async with request.app[DB].write() as s:
        # one statement: a lost connection after it leaves one unknown outcome, not two
        res = await s.execute(
            "INSERT INTO items (name, note, created_at, updated_at) VALUES (%s, %s, %s, %s)",
            (name, note, now, now))
    item = {"id": res.lastrowid, "name": name, "note": note, "created_at": now, "updated_at": now}
    if form:
        resp = web.Response(status=303, headers={"Location": "/"})
        trace = current_trace()
        if trace is not None and trace.token:  # the page's next request reads this write
            resp.set_cookie(TOKEN_COOKIE, trace.token, max_age=3600, httponly=True,
                            samesite="Lax", path="/")
        return resp
    return web.json_response(item, status=201, headers={"Location": f"/items/{item['id']}"})


async def get_item(request: web.Request) -> web.Response:
    item_id = _item_id(request)
    async with request.app[DB].read() as s:
        item = await s.fetchone(f"SELECT {COLUMNS} FROM items WHERE id = %s", (item_id,))
    if item is None:
        raise ApiError(404, "not_found", f"no item {item_id}", "id")
    return web.json_response(item)


async def list_items(request: web.Request) -> web.Response:
    limit = _int_param(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    after = _int_param(request, "after", 0, 0, MAX_ID)
    async with request.app[DB].read() as s:
        items = await s.fetchall(
            f"SELECT {COLUMNS} FROM items WHERE id > %s ORDER BY id LIMIT %s", (after, limit))
    nxt = items[-1]["id"] if len(items) == limit else None
    return web.json_response({"items": items, "next_after": nxt})


async def replace_item(request: web.Request) -> web.Response:
    item_id = _item_id(request)
    name, note = _fields(await _json_object(request))
    async with request.app[DB].transaction() as tx:
        old = await tx.fetchone(f"SELECT {COLUMNS} FROM items WHERE id = %s", (item_id,))
        if old is None:
            raise ApiError(404, "not_found", f"no item {item_id}", "id")
        await tx.execute("UPDATE items SET name = %s, note = %s, updated_at = %s WHERE id = %s",
                         (name, note, _now(), item_id))
        item = await tx.fetchone(f"SELECT {COLUMNS} FROM items WHERE id = %s", (item_id,))
    return web.json_response(item)


async def delete_item(request: web.Request) -> web.Response:
    item_id = _item_id(request)
    async with request.app[DB].write() as s:
        res = await s.execute("DELETE FROM items WHERE id = %s", (item_id,))
    if res.rowcount == 0:
        raise ApiError(404, "not_found", f"no item {item_id}", "id")
    return web.Response(status=204)


async def health(request: web.Request) -> web.Response:
    """200 while some node can serve reads, from the monitor's state: a hung node never makes
    this wait (the load balancer's check would time out and take the server out)."""
    db = request.app[DB]
    nodes = db.health()
    ok = db.can_read()
    body = {"status": "ok" if ok else "unavailable", "server": request.app[NAME], **nodes}
    return web.json_response(body, status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text: this server's requests, its database as the router sees it."""
    app = request.app
    text = render(app[METRICS], app[DB], app[NAME])
    return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE})


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>foobar</title>
<style>body{{font-family:sans-serif;max-width:48rem;margin:2rem auto}}td,th{{padding:.2rem .6rem}}
th{{text-align:left}}</style></head>
<body><h1>foobar items</h1>
<p>Served by <b>{server}</b>, read from the <b>{role}</b>.</p>
<form method="post" action="/items">
<input name="name" placeholder="name" required maxlength="200">
<input name="note" placeholder="note" maxlength="2000">
<button>Add</button></form>
<table><tr><th>id</th><th>name</th><th>note</th><th>created</th></tr>
{rows}
</table></body></html>
"""


async def index(request: web.Request) -> web.Response:
    async with request.app[DB].read() as s:
        items = await s.fetchall(f"SELECT {COLUMNS} FROM items ORDER BY id DESC LIMIT %s",
                                 (DEFAULT_LIMIT,))
        role = s.role
    rows = "\n".join(
        f"<tr><td>{i['id']}</td><td>{html.escape(i['name'])}</td><td>{html.escape(i['note'])}</td>"
        f"<td>{html.escape(str(i['created_at']))}</td></tr>" for i in items)
    page = PAGE.format(server=html.escape(request.app[NAME]), role=role, rows=rows)
    return web.Response(text=page, content_type="text/html")


# -- the application --------------------------------------------------------------------------------


@web.middleware
async def _frame(request: web.Request, handler) -> web.StreamResponse:
    """Errors as JSON, the X-Served-By / X-DB-Role headers on every response, and causal
    tokens in and out."""
    trace = track(request.headers.get(TOKEN_HEADER) or request.cookies.get(TOKEN_COOKIE))
    roles = trace.roles
    counts = request.app[METRICS]
    counts.in_flight += 1
    t0 = time.perf_counter()
    try:
        resp = await handler(request)
    except ApiError as e:
        resp = error_body(e.status, e.code, e.message, e.field)
    except web.HTTPException as e:
        if isinstance(e, web.HTTPRequestEntityTooLarge):
            resp = error_body(413, "payload_too_large", f"the body is larger than {MAX_BODY} bytes")
        else:
            code = e.reason.lower().replace(" ", "_")
            resp = error_body(e.status, code, f"{e.reason}: {request.method} {request.path}")
            if e.status == 405:
                resp.headers["Allow"] = e.headers.get("Allow", "")
    except PrimaryUnavailable as e:
        body: dict[str, Any] = {"code": "primary_unavailable", "field": None}
        if e.committed == "unknown":
            body["message"] = (f"the connection to the primary was lost after the write was "
                               f"sent: it may or may not have been applied ({e}); read it back "
                               f"before sending it again")
        else:
            body["message"] = f"the primary cannot take this now: {e}"
        if e.committed is not None:
            body["committed"] = e.committed
        resp = web.json_response({"error": body}, status=503)
        resp.headers["Retry-After"] = "1"
    except DatabaseUnavailable as e:
        resp = error_body(503, "db_unavailable", f"the database cannot serve this now: {e}")
        resp.headers["Retry-After"] = "1"
    except DatabaseError:
        log.exception("database error on %s %s", request.method, request.path)
        resp = error_body(500, "db_error", "the database refused the statement")
    except Exception:
        log.exception("internal error on %s %s", request.method, request.path)
        resp = error_body(500, "internal", "internal error")
    except BaseException:  # cancelled (the client went away): not answered, not counted
        counts.in_flight -= 1
        raise
    resp.headers["X-Served-By"] = request.app[NAME]
    if trace.token:
        resp.headers[TOKEN_HEADER] = trace.token
    if roles:
        resp.headers["X-DB-Role"] = "primary" if "primary" in roles else "replica"
    counts.in_flight -= 1
    resource = request.match_info.route.resource
    counts.observe(request.method, resource.canonical if resource is not None else "unmatched",
                   resp.status, time.perf_counter() - t0)
    return resp


async def _schema(app: web.Application) -> None:
    db = app[DB]
    try:
        async with db.write() as s:
            await s.execute(SCHEMA[db.dialect])
    except DatabaseUnavailable as e:  # reads may still work; another worker or a restart makes it
        log.warning("cannot create the schema now: %s", e)


async def _close(app: web.Application) -> None:
    await app[DB].close()


def make_app(name: str, db: Router) -> web.Application:
    """The aiohttp application of one app server named `name`."""
    app = web.Application(middlewares=[_frame], client_max_size=MAX_BODY)
    app[DB] = db
    app[NAME] = name
    app[METRICS] = Metrics()
    app.router.add_get("/", index)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/items", create_item)
    app.router.add_get("/items", list_items)
    app.router.add_get("/items/{id}", get_item)
    app.router.add_put("/items/{id}", replace_item)
    app.router.add_delete("/items/{id}", delete_item)
    app.on_startup.append(_schema)
    app.on_cleanup.append(_close)
    return app
