"""foobar_app on its own: the items API, its errors, and the database router under it.

A real aiohttp server on a loopback port, a real SQLite file in a temporary directory.
"""

from __future__ import annotations

import json

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from foobar_app import make_app, open_router
from foobar_app.db import DatabaseError, DatabaseUnavailable
from foobar_app.db.classify import is_read_only
from foobar_app.db.sqlite import sqlite_path

from support import LOOPBACK


@pytest_asyncio.fixture
async def router(tmp_path):
    db = await open_router(f"sqlite:///{tmp_path}/app.db")
    yield db
    await db.close()


@pytest_asyncio.fixture
async def app_url(tmp_path):
    db = await open_router(f"sqlite:///{tmp_path}/app.db")
    runner = web.AppRunner(make_app("server-9", db))
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    port = runner.addresses[0][1]
    yield f"http://{LOOPBACK}:{port}"
    await runner.cleanup()


@pytest_asyncio.fixture
async def http():
    async with aiohttp.ClientSession() as s:
        yield s


async def create(http, url, name="widget", note="blue"):
    async with http.post(f"{url}/items", json={"name": name, "note": note}) as r:
        assert r.status == 201, await r.text()
        return await r.json()


# -- the API ----------------------------------------------------------------------------------------


async def test_items_crud_with_roles_and_server_name(app_url, http):
    async with http.post(f"{app_url}/items", json={"name": "widget", "note": "blue"}) as r:
        assert r.status == 201
        assert r.headers["X-Served-By"] == "server-9"
        assert r.headers["X-DB-Role"] == "primary"
        item = await r.json()
        assert r.headers["Location"] == f"/items/{item['id']}"
    assert item["name"] == "widget" and item["note"] == "blue" and item["id"] >= 1
    async with http.get(f"{app_url}/items/{item['id']}") as r:
        assert r.status == 200 and r.headers["X-DB-Role"] == "replica"
        assert await r.json() == item
    async with http.put(f"{app_url}/items/{item['id']}", json={"name": "gadget"}) as r:
        assert r.status == 200 and r.headers["X-DB-Role"] == "primary"  # a transaction
        changed = await r.json()
    assert changed["name"] == "gadget" and changed["note"] == ""
    assert changed["created_at"] == item["created_at"]
    async with http.get(f"{app_url}/items") as r:
        assert r.headers["X-DB-Role"] == "replica"
        assert (await r.json())["items"] == [changed]
    async with http.delete(f"{app_url}/items/{item['id']}") as r:
        assert r.status == 204 and r.headers["X-DB-Role"] == "primary"
    async with http.get(f"{app_url}/items/{item['id']}") as r:
        assert r.status == 404


async def test_list_pages_with_limit_and_after(app_url, http):
    ids = [(await create(http, app_url, f"n{i}"))["id"] for i in range(5)]
    async with http.get(f"{app_url}/items", params={"limit": "2"}) as r:
        page = await r.json()
    assert [i["id"] for i in page["items"]] == ids[:2] and page["next_after"] == ids[1]
    async with http.get(f"{app_url}/items", params={"limit": "2", "after": str(ids[3])}) as r:
        page = await r.json()
    assert [i["id"] for i in page["items"]] == ids[4:] and page["next_after"] is None


async def test_html_page_lists_items_and_its_form_adds_one(app_url, http):
    await create(http, app_url, "<script>x</script>", "n & m")
    async with http.post(f"{app_url}/items", data={"name": "from the form", "note": "hi"},
                         allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/"
    async with http.get(f"{app_url}/") as r:
        assert r.status == 200 and r.content_type == "text/html"
        assert r.headers["X-DB-Role"] == "replica"
        page = await r.text()
    assert "from the form" in page
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>x" not in page
    assert "<form" in page and "server-9" in page


async def test_causal_tokens_on_sqlite_are_accepted_and_trivially_satisfied(app_url, http):
    async with http.post(f"{app_url}/items", json={"name": "t"}) as r:
        assert r.status == 201
        token = r.headers["X-Causal-Token"]
    assert token.startswith("0-0-")
    async with http.put(f"{app_url}/items/1", json={"name": "u"}) as r:
        assert r.status == 200 and "X-Causal-Token" in r.headers  # a transaction is a write
    async with http.get(f"{app_url}/items") as r:
        assert "X-Causal-Token" not in r.headers  # reads hand out none
    for sent in (token, "0-1-999999999", "not a token", "0-0-1,0-0-2"):
        async with http.get(f"{app_url}/items/1", headers={"X-Causal-Token": sent}) as r:
            assert r.status == 200 and r.headers["X-DB-Role"] == "replica"
            assert (await r.json())["name"] == "u"
    # the page's form post hands its token to the page's next request in a cookie
    async with http.post(f"{app_url}/items", data={"name": "form"}, allow_redirects=False) as r:
        assert r.status == 303
        cookie = r.cookies["foobar_causal"]
        assert cookie.value == r.headers["X-Causal-Token"] and cookie["httponly"]
        assert cookie["path"] == "/"


async def test_health_reports_each_node(app_url, http):
    async with http.get(f"{app_url}/health") as r:
        assert r.status == 200
        body = await r.json()
    assert body == {"status": "ok", "server": "server-9", "primary": "up",
                    "replicas": {"replica-1": "up"}}


def _err(code, message, field=None):
    return {"error": {"code": code, "message": message, "field": field}}


BAD_INPUTS = [
    ("post-not-json", "POST", "/items", b"{nope", {"Content-Type": "application/json"}, 400,
     _err("invalid_json", "the body is not valid JSON: Expecting property name enclosed in double "
                          "quotes: line 1 column 2 (char 1)")),
    ("post-array", "POST", "/items", b"[1, 2]", {"Content-Type": "application/json"}, 400,
     _err("invalid_json", 'the body must be a JSON object like {"name": "...", "note": "..."}')),
    ("post-missing-name", "POST", "/items", {"note": "x"}, None, 400,
     _err("missing_field", "name is required", "name")),
    ("post-name-not-string", "POST", "/items", {"name": 42}, None, 400,
     _err("invalid_type", "name must be a string, not int", "name")),
    ("post-note-null", "POST", "/items", {"name": "a", "note": None}, None, 400,
     _err("invalid_type", "note must be a string, not null", "note")),
    ("post-empty-name", "POST", "/items", {"name": "   "}, None, 400,
     _err("invalid_value", "name must not be empty", "name")),
    ("post-name-too-long", "POST", "/items", {"name": "x" * 201}, None, 400,
     _err("too_long", "name is 201 characters; at most 200", "name")),
    ("post-note-too-long", "POST", "/items", {"name": "a", "note": "y" * 2001}, None, 400,
     _err("too_long", "note is 2001 characters; at most 2000", "note")),
    ("post-unknown-field", "POST", "/items", {"name": "a", "colour": "red"}, None, 400,
     _err("unknown_field", "unknown field 'colour'; expected name and note", "colour")),
    ("post-wrong-content-type", "POST", "/items", b"name=a", {"Content-Type": "text/plain"}, 415,
     _err("unsupported_media_type", "send JSON with Content-Type: application/json, not text/plain")),
    ("post-too-big", "POST", "/items", b'{"name": "' + b"z" * 70000 + b'"}',
     {"Content-Type": "application/json"}, 413,
     _err("payload_too_large", "the body is larger than 65536 bytes")),
    ("post-deeply-nested", "POST", "/items", b"[" * 3000 + b"]" * 3000,
     {"Content-Type": "application/json"}, 400,
     _err("invalid_json", "the body is not valid JSON: nested too deeply")),
    ("post-lone-surrogate", "POST", "/items", b'{"name": "bad \\ud800 name"}',
     {"Content-Type": "application/json"}, 400,
     _err("invalid_value", "name must be valid Unicode text (no lone surrogates)", "name")),
    ("get-unknown-id", "GET", "/items/999999", None, None, 404, _err("not_found", "no item 999999", "id")),
    ("get-bad-id", "GET", "/items/abc", None, None, 400,
     _err("invalid_parameter", "item id must be a positive integer, not 'abc'", "id")),
    ("get-huge-id", "GET", "/items/99999999999999999999", None, None, 400,
     _err("invalid_parameter", "item id must be a positive integer, not '99999999999999999999'", "id")),
    ("put-unknown-id", "PUT", "/items/424242", {"name": "a"}, None, 404,
     _err("not_found", "no item 424242", "id")),
    ("delete-unknown-id", "DELETE", "/items/424242", None, None, 404,
     _err("not_found", "no item 424242", "id")),
    ("list-bad-limit", "GET", "/items?limit=0", None, None, 400,
     _err("invalid_parameter", "limit must be an integer from 1 to 500, not '0'", "limit")),
    ("list-bad-after", "GET", "/items?after=-3", None, None, 400,
     _err("invalid_parameter", "after must be an integer from 0 to 9223372036854775807, not '-3'",
          "after")),
    ("unknown-route", "GET", "/nowhere", None, None, 404,
     _err("not_found", "Not Found: GET /nowhere")),
    ("wrong-method", "PATCH", "/items/1", {"name": "a"}, None, 405,
     _err("method_not_allowed", "Method Not Allowed: PATCH /items/1")),
]


@pytest.mark.parametrize(("method", "path", "body", "headers", "status", "expected"),
                         [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS])
async def test_bad_input_gets_a_4xx_with_a_json_error(app_url, http, method, path, body, headers,
                                                      status, expected):
    kwargs = {"json": body} if isinstance(body, dict) else {"data": body}
    async with http.request(method, f"{app_url}{path}", headers=headers, **kwargs) as r:
        assert r.status == status
        assert r.content_type == "application/json"
        assert r.headers["X-Served-By"] == "server-9"
        assert json.loads(await r.text()) == expected


def test_the_bad_input_table_is_broad_enough():
    assert len(BAD_INPUTS) >= 12


# -- the router ----------------------------------------------------------------------------------------


async def test_router_sends_each_intent_to_its_role(router):
    async with router.write() as s:
        await s.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        await s.execute("INSERT INTO t (v) VALUES (%s)", ("a",))
        assert s.role == "primary"
    async with router.read() as s:
        assert await s.fetchval("SELECT v FROM t WHERE id = %s", (1,)) == "a"
        assert s.role == "replica"
    async with router.transaction() as tx:  # reads inside a transaction: the primary
        assert await tx.fetchval("SELECT count(*) FROM t") == 1
        assert tx.role == "primary"
    async with router.transaction(read_only=True) as s:  # a read-only transaction: a replica
        assert await s.fetchval("SELECT count(*) FROM t") == 1
        assert s.role == "replica"


async def test_read_safety_net_sends_non_plain_selects_to_the_primary(router):
    async with router.write() as s:
        await s.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    async with router.read() as s:
        # not a plain SELECT: routed to the primary, where it works
        await s.execute("INSERT INTO t (v) VALUES (%s)", ("from a read",))
        assert s.role == "primary"
    async with router.read() as s:
        await s.fetchall("SELECT v FROM t")
        assert s.roles == {"replica"}


async def test_transaction_rolls_back_when_the_block_raises(router):
    async with router.write() as s:
        await s.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    with pytest.raises(RuntimeError):
        async with router.transaction() as tx:
            await tx.execute("INSERT INTO t (v) VALUES ('x')")
            raise RuntimeError("changed my mind")
    async with router.read() as s:
        assert await s.fetchval("SELECT count(*) FROM t") == 0


async def test_the_replica_refuses_writes(router):
    """The split is real: the reader pool is query_only, a write there fails."""
    async with router.write() as s:
        await s.execute("CREATE TABLE t (id INTEGER PRIMARY KEY)")
    with pytest.raises(DatabaseError, match=r"readonly|read-only|query_only|attempt to write"):
        async with router.transaction(read_only=True) as s:
            await s.execute("INSERT INTO t DEFAULT VALUES")


@pytest.mark.parametrize(("sql", "read_only"), [
    ("SELECT 1", True),
    ("  /* comment */ select * from items where id = %s", True),
    ("SHOW TABLES", True),
    ("WITH x AS (SELECT 1) SELECT * FROM x", True),
    ("SELECT 'update me' AS x", True),
    ("SELECT * FROM items FOR UPDATE", False),
    ("SELECT * FROM items LOCK IN SHARE MODE", False),
    ("SELECT * FROM items FOR SHARE", False),
    ("SELECT GET_LOCK('k', 1)", False),
    ("SELECT LAST_INSERT_ID()", False),
    ("SELECT a INTO @v FROM items", False),
    ("SELECT 1; DELETE FROM items", False),
    ("INSERT INTO items (name) VALUES ('a')", False),
    ("UPDATE items SET name = 'a'", False),
    ("CREATE TABLE x (a INT)", False),
])
def test_statement_classification(sql, read_only):
    assert is_read_only(sql) is read_only


def test_sqlite_dsn_paths(tmp_path):
    assert str(sqlite_path("sqlite:///data/x.db")) == "data/x.db"
    assert sqlite_path(f"sqlite:///{tmp_path}/x.db") == tmp_path / "x.db"
    for bad in ("sqlite://x.db", "sqlite:///", "postgres://h/db"):
        with pytest.raises(ValueError):
            sqlite_path(bad)


async def test_unusable_database_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DatabaseUnavailable, match="cannot create"):
        await open_router(f"sqlite:///{blocker}/sub/x.db")


@pytest.mark.parametrize("text, position", [
    ("0-1-42", {0: 42}),
    ("0-1-42,1-2-7", {0: 42, 1: 7}),
    (" 0-1-42 , 1-2-7 ", {0: 42, 1: 7}),
    ("0-1-18446744073709551615", {0: 2**64 - 1}),
    ("", None), (None, None), ("garbage", None), ("0-1-", None), ("0-1-2-3", None),
    ("0-1-18446744073709551616", None), ("0-1-5,0-2-6", None), ("-1-1-1", None),
    ("0-1-1;DROP TABLE items", None), ("0-1-1," * 65, None),
])
def test_causal_token_parsing(text, position):
    from foobar_app.db.gtid import parse_position

    assert parse_position(text) == position


def test_a_position_covers_another_domain_by_domain():
    from foobar_app.db.gtid import covers

    assert covers({0: 10, 1: 3}, {0: 10}) and covers({0: 11}, {0: 10})
    assert not covers({0: 9}, {0: 10}) and not covers({0: 10}, {0: 10, 1: 1})
    assert not covers(None, {0: 1}) and covers({}, {})
