"""The admin listener's guard and readiness: real processes, raw HTTP from the test.

Who may talk to it (token, Host, Origin, Content-Type), that it is a configuration error to
expose it without a token, that it never shares a public frontend's address, and `/ready`.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from foobar_lb.admin import host_allowed
from foobar_lb.config import ConfigError, parse_config
from procs import LbProcess

from support import LOOPBACK, ScriptedServer, free_port, parse_responses, raw_exchange

TOKEN = "s3cret-admin-token"


def _cfg(port: int, servers: list[str], admin: dict, check: bool = False) -> dict:
    srv = [{"name": f"s{i}", "address": a} for i, a in enumerate(servers, 1)]
    be: dict = {"servers": srv}
    if check:
        be["check"] = {"inter": "200ms", "fastinter": "100ms", "downinter": "100ms", "rise": 1,
                       "fall": 1, "timeout": "300ms"}
    return {"global": {"workers": 2, "grace": "1s"},
            "frontends": {"www": {"bind": f"{LOOPBACK}:{port}", "default_backend": "app"}},
            "backends": {"app": be}, "admin": admin}


async def _ask(port: int, method: str = "GET", path: str = "/ready", headers=(), body=b""):
    host = [] if any(h.lower().startswith("host:") for h in headers) else [
        f"Host: 127.0.0.1:{port}"]
    head = [f"{method} {path} HTTP/1.1", *host, "Connection: close", *headers]
    if body or method not in ("GET", "HEAD"):
        head.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    data = await raw_exchange(LOOPBACK, port, raw, timeout=5.0)
    (resp,) = parse_responses(data, [method])
    return resp


def _base(admin: str) -> str:
    return ('[frontends.f]\nbind = "127.0.0.1:18080"\ndefault_backend = "b"\n[backends.b]\n'
            'servers = [{name = "a", address = "127.0.0.1:1"}]\n[admin]\n' + admin)


@pytest.mark.parametrize(("admin", "message"), [
    ('bind = "0.0.0.0:8404"\n', "admin.token: the admin listener on 0.0.0.0:8404 is not on a "
                                "loopback address, so it needs a token"),
    ('bind = "*:8404"\n', "admin.token: the admin listener on *:8404 is not on a loopback"),
    ('bind = "10.0.0.1:8404"\ntoken = "short"\n', "admin.token: a token of at least 8"),
    ('bind = "127.0.0.1:18080"\n', 'admin.bind = "127.0.0.1:18080": expected an address no '
                                   "frontend uses (frontends.f binds 127.0.0.1:18080)"),
    ('bind = "127.0.0.1:8404"\ntoken = "abcdefghij"\ntoken_file = "t"\n',
     "admin.token_file: give token or token_file, not both"),
    ('bind = "127.0.0.1:8404"\npath = "/x"\n', "admin.path: unknown key; expected one of bind, "
                                               "token, token_file"),
])
def test_admin_config_errors(admin: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(_base(admin), "lb.toml")
    assert str(e.value).startswith("lb.toml: " + message)


def test_admin_token_file_and_loopback(tmp_path) -> None:
    (tmp_path / "tok").write_text("from-a-file-123\n")
    cfg = parse_config(_base('bind = "10.0.0.1:8404"\ntoken_file = "tok"\n'),
                       str(tmp_path / "lb.toml"))
    assert cfg.admin.token == "from-a-file-123"
    assert parse_config(_base('bind = "[::1]:8404"\n')).admin.token is None
    assert parse_config(_base('bind = "localhost:8404"\n')).admin.token is None


@pytest.mark.parametrize(("host", "ok"), [
    ("127.0.0.1:8404", True), ("127.0.0.1", True), ("localhost:8404", True), ("[::1]:8404", True),
    ("10.1.2.3:8404", True), ("127.0.0.1:8405", False), ("evil.example:8404", False),
    ("evil.example", False), ("127.0.0.1.nip.io:8404", False), ("[::1", False), ("a:b", False),
])
def test_host_allowed(host: str, ok: bool) -> None:
    assert host_allowed(host, 8404) is ok


async def test_serve_admin_non_loopback_without_token_is_an_error(tmp_path) -> None:
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "foobar_lb", "serve", "--bind", "127.0.0.1:0", "--backend",
        "127.0.0.1:9", "--admin", "0.0.0.0:0", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(p.communicate(), 20)
    assert p.returncode == 2
    assert err.decode().strip() == (
        "foobar-lb: error: command line: --admin: the admin listener on 0.0.0.0:0 is not on a "
        'loopback address, so it needs a token ([admin] token = "..." or token_file = "...")')


async def test_guard_token_host_origin_content_type(tmp_path) -> None:
    port, aport = free_port(), free_port()
    async with ScriptedServer("s1") as s1, LbProcess(
            tmp_path, _cfg(port, [s1.address], {"bind": f"{LOOPBACK}:{aport}", "token": TOKEN})
    ) as lb:
        auth = f"Authorization: Bearer {TOKEN}"
        assert (await _ask(aport)).status == 401
        r = await _ask(aport, headers=["Authorization: Bearer wrong-token-xyz"])
        assert r.status == 401
        assert r.header("WWW-Authenticate") == 'Bearer realm="foobar_lb admin"'
        assert (await _ask(aport, headers=[f"Authorization: Basic {TOKEN}"])).status == 401
        r = await _ask(aport, headers=[auth])
        assert (r.status, r.body) == (200, b"ready\n")
        assert (await _ask(aport, headers=[auth, "Host: evil.example"])).status == 403
        assert (await _ask(aport, headers=[auth, "Origin: http://evil.example"])).status == 403
        assert (await _ask(aport, headers=[auth, "Origin: null"])).status == 403
        ok = await _ask(aport, headers=[auth, f"Origin: http://127.0.0.1:{aport}"])
        assert ok.status == 200
        r = await _ask(aport, "POST", "/api/reload", [auth, "Content-Type: text/plain"])
        assert r.status == 415
        r = await _ask(aport, "POST", "/api/reload",
                       [auth, "Content-Type: application/x-www-form-urlencoded"], b"a=1")
        assert r.status == 415
        # the public frontend knows nothing of these paths: they go to the server
        for path in ("/ready", "/stats", "/metrics", "/api/backends"):
            r = await _ask(port, path=path)
            assert (r.status, r.body) == (200, f"s1 GET {path}\n".encode())
        assert [q.url for q in s1.requests] == ["/ready", "/stats", "/metrics", "/api/backends"]
        assert any(f"admin listener on http://127.0.0.1:{aport}/" in line for line in lb.out)


async def test_ready_follows_the_default_backend(tmp_path) -> None:
    port, aport, sport = free_port(), free_port(), free_port()
    s1 = ScriptedServer("s1")
    await s1.start(sport)
    try:
        async with LbProcess(tmp_path, _cfg(port, [s1.address], {"bind": f"{LOOPBACK}:{aport}"},
                                            check=True)):
            r = await _ask(aport)
            assert (r.status, r.body) == (200, b"ready\n")
            await s1.stop()
            for _ in range(100):
                r = await _ask(aport)
                if r.status == 503:
                    break
                await asyncio.sleep(0.05)
            assert r.status == 503
            lines = r.body.decode().splitlines()
            assert lines[0] == "not ready"
            assert lines[1].startswith("frontend www: backend app has no server up (s1: ")
            await s1.start(sport)
            for _ in range(100):
                r = await _ask(aport)
                if r.status == 200:
                    break
                await asyncio.sleep(0.05)
            assert (r.status, r.body) == (200, b"ready\n")
    finally:
        await s1.stop()
