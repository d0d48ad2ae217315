"""`admin --peers`: one server change applied to several load balancers at once, and the stats
of all read in one call; real load balancers (processes, each with its admin listener and a
token) on loopback ports, real backends; every change asserted through each one's own
`GET /api/backends`. Also: `lab` is handed its command line untouched.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

import pytest

from foobar_lb import cli
from procs import LbProcess

from support import LOOPBACK, ScriptedServer, free_port, parse_responses, raw_exchange

TOKEN = "peers-test-token-42"
CHECK = {"inter": "200ms", "fastinter": "100ms", "downinter": "100ms", "rise": 1, "fall": 1,
         "timeout": "300ms"}


def _cfg(aport: int, servers: list[ScriptedServer], token: str) -> dict:
    return {"global": {"workers": 1, "grace": "1s", "hard_stop_after": "5s"},
            "frontends": {"www": {"bind": f"{LOOPBACK}:{free_port()}", "default_backend": "app"}},
            "backends": {"app": {"servers": [{"name": s.name, "address": s.address}
                                             for s in servers], "check": CHECK}},
            "admin": {"bind": f"{LOOPBACK}:{aport}", "token": token}}


class Peer:
    """A load balancer process with its admin listener."""

    def __init__(self, tmp: Path, servers: list[ScriptedServer], token: str = TOKEN):
        tmp.mkdir()
        self.aport = free_port()
        self.url = f"http://{LOOPBACK}:{self.aport}"
        self.token = token
        self.lb = LbProcess(tmp, _cfg(self.aport, servers, token))

    async def servers(self) -> dict[str, dict]:
        """name -> entry of backend app, read through this load balancer's own API."""
        req = (f"GET /api/backends HTTP/1.1\r\nHost: {LOOPBACK}:{self.aport}\r\n"
               f"Authorization: Bearer {self.token}\r\nConnection: close\r\n\r\n").encode()
        (resp,) = parse_responses(await raw_exchange(LOOPBACK, self.aport, req, timeout=10), ["GET"])
        assert resp.status == 200, resp.body
        (be,) = json.loads(resp.body)["backends"]
        return {s["name"]: s for s in be["servers"]}

    async def wait_state(self, name: str, state: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while (got := (await self.servers()).get(name, {}).get("state")) != state:
            assert time.monotonic() < deadline, f"{self.url}: {name} is {got}, never {state}"
            await asyncio.sleep(0.05)


class Peers:
    """Two (or more) load balancers started at once, stopped (by pid) whatever happens."""

    def __init__(self, *peers: Peer):
        self.peers = peers

    async def __aenter__(self) -> tuple[Peer, ...]:
        try:
            await asyncio.gather(*(p.lb.start() for p in self.peers))
        except BaseException:
            await self.__aexit__()
            raise
        return self.peers

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.gather(*(p.lb.__aexit__() for p in self.peers if p.lb.proc is not None),
                             return_exceptions=True)


async def admin(*args: str, token: str | None = TOKEN, timeout: float = 60.0
                ) -> tuple[int, str, str, float]:
    """`python -m foobar_lb admin ARGS`: (exit status, stdout, stderr, seconds it took)."""
    env = dict(os.environ)
    env.pop("FOOBAR_ADMIN_TOKEN", None)
    if token is not None:
        env["FOOBAR_ADMIN_TOKEN"] = token
    t0 = time.monotonic()
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "foobar_lb", "admin", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), timeout)
    return p.returncode, out.decode(), err.decode(), time.monotonic() - t0


def _entry(s: dict) -> tuple:
    return s["address"], s["state"], s["admin"], s["weight"], s["runtime"]


# ---------------------------------------------------------------------------------------------


async def test_one_command_changes_every_load_balancer_and_reads_them_all(tmp_path):
    async with ScriptedServer("a") as a, ScriptedServer("b") as b, ScriptedServer("c") as c, \
            Peers(Peer(tmp_path / "1", [a, b]), Peer(tmp_path / "2", [a, b])) as (p1, p2):
        urls = f"{p1.url},{p2.url}"
        # the servers of both, each under its URL
        rc, out, err, _ = await admin("--peers", urls, "servers")
        assert (rc, err) == (0, "")
        blocks = out.split("\n\n")
        assert [blk.splitlines()[0] for blk in blocks] == [f"== {p1.url}", f"== {p2.url}"]
        for blk in blocks:
            lines = blk.splitlines()
            assert lines[1].split() == ["BACKEND", "SERVER", "ADDRESS", "STATE", "ADMIN", "WEIGHT",
                                        "CURRENT", "REQUESTS", "CHECK"]
            assert [ln.split()[:6] for ln in lines[2:]] == [
                ["app", "a", a.address, "up", "ready", "1"], ["app", "b", b.address, "up", "ready", "1"]]
        rc, out, err, _ = await admin("servers", "--json", "--peers", urls)
        assert (rc, err) == (0, "")
        answer = json.loads(out)
        assert list(answer) == [p1.url, p2.url]
        assert [[s["name"] for s in v["backends"][0]["servers"]] for v in answer.values()] == [
            ["a", "b"], ["a", "b"]]

        # drain: both, said for each
        rc, out, err, _ = await admin("--peers", urls, "set", "app", "a", "--state", "drain")
        assert (rc, out, err) == (0, f"{p1.url}: app/a {a.address}: state up, admin drain, weight 1\n"
                                     f"{p2.url}: app/a {a.address}: state up, admin drain, weight 1\n",
                                  "")
        for p in (p1, p2):
            got = await p.servers()
            assert {n: _entry(s) for n, s in got.items()} == {
                "a": (a.address, "up", "drain", 1, False), "b": (b.address, "up", "ready", 1, False)}

        # back to ready with a weight, --peers repeated and after the action (no scheme: http)
        rc, out, err, _ = await admin("set", "app", "a", "--state", "ready", "--weight", "3",
                                      "--peers", p1.url, "--peers", f"{LOOPBACK}:{p2.aport}")
        assert (rc, out, err) == (0, f"{p1.url}: app/a {a.address}: state up, admin ready, weight 3\n"
                                     f"{p2.url}: app/a {a.address}: state up, admin ready, weight 3\n",
                                  "")
        for p in (p1, p2):
            got = await p.servers()
            assert {n: _entry(s) for n, s in got.items()} == {
                "a": (a.address, "up", "ready", 3, False), "b": (b.address, "up", "ready", 1, False)}

        # add: on both, checked before it takes traffic
        rc, out, err, _ = await admin("--peers", urls, "add", "app", "c", c.address, "--weight", "2")
        assert (rc, out, err) == (0, "".join(f"{u}: added app/c {c.address}: state down, admin ready, "
                                             "weight 2 (added at run time)\n" for u in (p1.url, p2.url)),
                                  "")
        for p in (p1, p2):
            await p.wait_state("c", "up")
            got = await p.servers()
            assert list(got) == ["a", "b", "c"]
            assert _entry(got["c"]) == (c.address, "up", "ready", 2, True)
        rc, out, err, _ = await admin("--peers", urls, "check", "app", "c")
        assert (rc, err) == (0, "")
        assert [re.sub(r"\(\d+ms\)", "(Nms)", ln) for ln in out.splitlines()] == [
            f"{u}: app/c: layer4 check passed (Nms); state up, admin ready" for u in (p1.url, p2.url)]

        # remove: from both
        rc, out, err, _ = await admin("--peers", urls, "remove", "app", "c")
        assert (rc, out, err) == (0, f"{p1.url}: server app/c removed\n{p2.url}: server app/c removed\n",
                                  "")
        for p in (p1, p2):
            assert list(await p.servers()) == ["a", "b"]

        # reload: both re-read their file (which wins for the weight)
        rc, out, err, _ = await admin("--peers", urls, "reload")
        assert (rc, err) == (0, "")
        assert [ln.split(": ", 1)[0] for ln in out.splitlines()] == [p1.url, p2.url], out
        for p in (p1, p2):
            assert {n: s["weight"] for n, s in (await p.servers()).items()} == {"a": 1, "b": 1}


async def test_a_peer_down_is_named_and_exit_1_while_the_other_is_changed(tmp_path):
    down = f"http://{LOOPBACK}:{free_port()}"  # nothing listens there
    async with ScriptedServer("a") as a, ScriptedServer("c") as c, \
            Peers(Peer(tmp_path / "1", [a])) as (p1,):
        refused = f"{down}: cannot reach the admin listener: connection refused"
        rc, out, err, _ = await admin("--peers", f"{p1.url},{down}", "set", "app", "a", "--state",
                                      "drain")
        assert (rc, out, err) == (1, f"{p1.url}: app/a {a.address}: state up, admin drain, weight 1\n",
                                  f"foobar-lb: error: {refused}\n")
        assert _entry((await p1.servers())["a"]) == (a.address, "up", "drain", 1, False)

        # a partial add says where the server is
        rc, out, err, _ = await admin("--peers", f"{down},{p1.url}", "add", "app", "c", c.address)
        assert (rc, out) == (1, f"{p1.url}: added app/c {c.address}: state down, admin ready, "
                                "weight 1 (added at run time)\n")
        assert err == (f"foobar-lb: error: {refused}\n"
                       f"foobar-lb: app/c is on {p1.url}; not known for {down}\n")
        await p1.wait_state("c", "up")
        assert _entry((await p1.servers())["c"]) == (c.address, "up", "ready", 1, True)

        rc, out, err, _ = await admin("--peers", f"{p1.url},{down}", "servers", "--json")
        assert (rc, err) == (1, f"foobar-lb: error: {refused}\n")
        answer = json.loads(out)
        assert list(answer) == [p1.url, down]
        assert [s["name"] for s in answer[p1.url]["backends"][0]["servers"]] == ["a", "c"]
        assert answer[down] == {"error": "cannot reach the admin listener: connection refused"}
        rc, out, err, _ = await admin("--peers", f"{p1.url},{down}", "servers")
        assert rc == 1 and out.splitlines()[0] == f"== {p1.url}" and f"== {down}" not in out
        assert err == f"foobar-lb: error: {refused}\n"

        rc, out, err, _ = await admin("--peers", f"{p1.url},{down}", "remove", "app", "c")
        assert (rc, out) == (1, f"{p1.url}: server app/c removed\n")
        assert err == (f"foobar-lb: error: {refused}\n"
                       f"foobar-lb: app/c is on none of them; not on {p1.url}; not known for {down}\n")
        assert list(await p1.servers()) == ["a"]

        # two peers that take the connection and never answer: each bounded by --timeout, both
        # waited for at once (one after the other would take twice as long); a call to p1 alone
        # just before measures what starting the command costs on this machine now
        _, _, _, alone = await admin("--peers", p1.url, "servers")
        with socket.socket() as s1, socket.socket() as s2:
            for s in (s1, s2):
                s.bind((LOOPBACK, 0))
                s.listen(8)  # the kernel completes the handshake; nobody reads or answers
            silent = [f"http://{LOOPBACK}:{s.getsockname()[1]}" for s in (s1, s2)]
            rc, out, err, took = await admin("--peers", ",".join([silent[0], p1.url, silent[1]]),
                                             "--timeout", "2", "set", "app", "a", "--state",
                                             "ready")
        assert (rc, out) == (1, f"{p1.url}: app/a {a.address}: state up, admin ready, weight 1\n")
        assert err == "".join(f"foobar-lb: error: {u}: no answer within 2s\n" for u in silent)
        assert 2.0 <= took < alone + 2.0 + 1.2, (took, alone)
        assert _entry((await p1.servers())["a"]) == (a.address, "up", "ready", 1, False)


async def test_a_wrong_token_on_one_peer_is_named_and_a_taken_name_is_found(tmp_path):
    async with ScriptedServer("a") as a, ScriptedServer("c") as c, ScriptedServer("d") as d, \
            Peers(Peer(tmp_path / "1", [a]), Peer(tmp_path / "2", [a], token="another-token-77"),
                  Peer(tmp_path / "3", [a])) as (p1, p2, p3):
        urls = f"{p1.url},{p2.url},{p3.url}"
        rc, out, err, _ = await admin("--peers", urls, "set", "app", "a", "--state", "maint")
        assert (rc, out, err) == (
            1, f"{p1.url}: app/a {a.address}: state up, admin maint, weight 1\n"
               f"{p3.url}: app/a {a.address}: state up, admin maint, weight 1\n",
            f"foobar-lb: error: {p2.url}: 401 Unauthorized: send Authorization: Bearer <token>\n")
        assert [(await p.servers())["a"]["admin"] for p in (p1, p2, p3)] == ["maint", "ready", "maint"]
        rc, out, err, _ = await admin("--peers", urls, "--token", "another-token-77", "servers")
        assert rc == 1 and out.splitlines()[0] == f"== {p2.url}", out
        assert err == "".join(f"foobar-lb: error: {u}: 401 Unauthorized: send Authorization: Bearer "
                              "<token>\n" for u in (p1.url, p3.url))

        # c added on p1 alone first, d there under the same name on p3: the add over all three
        # is refused by p1 (409) and p3, and the last line says who has what
        rc, _, err, _ = await admin("--url", p1.url, "add", "app", "c", c.address)
        assert (rc, err) == (0, "")
        rc, _, err, _ = await admin("--url", p3.url, "add", "app", "c", d.address)
        assert (rc, err) == (0, "")
        rc, out, err, _ = await admin("--peers", f"{p1.url},{p3.url}", "add", "app", "c", c.address)
        assert (rc, out) == (1, "")
        assert err == (f"foobar-lb: error: {p1.url}: backend app has a server 'c' already ({c.address})\n"
                       f"foobar-lb: error: {p3.url}: backend app has a server 'c' already ({d.address})\n"
                       f"foobar-lb: app/c is on {p1.url}; another app/c is on {p3.url} (at {d.address})\n")
        assert [(await p.servers())["c"]["address"] for p in (p1, p3)] == [c.address, d.address]
        assert "c" not in await p2.servers()


def test_user_mistakes_are_one_line_and_exit_2(monkeypatch, capsys):
    """Said before anything is sent (in this process: no load balancer needed)."""
    monkeypatch.delenv("FOOBAR_ADMIN_TOKEN", raising=False)
    free = free_port()
    for args, want in (
            (("--peers", "ftp://x", "servers"),
             'foobar-lb: error: --peers "ftp://x": expected an admin listener\'s address, like '
             "http://10.0.0.11:8404\n"),
            (("--peers", f"{LOOPBACK}:{free},,{LOOPBACK}:1", "servers"),
             f'foobar-lb: error: --peers "{LOOPBACK}:{free},,{LOOPBACK}:1": an empty address; '
             "expected an admin listener's address, like http://10.0.0.11:8404\n"),
            (("--peers", f"{LOOPBACK}:99999", "servers"),
             f'foobar-lb: error: --peers "{LOOPBACK}:99999": expected an admin listener\'s '
             "address, like http://10.0.0.11:8404\n"),
            (("--peers", f"http://{LOOPBACK}:{free}/api", "servers"),
             f'foobar-lb: error: --peers "http://{LOOPBACK}:{free}/api": expected an admin '
             "listener's address, like http://10.0.0.11:8404\n"),
            (("--peers", f"{LOOPBACK}:{free}", "servers", "--peers", f"http://{LOOPBACK}:{free}/"),
             f"foobar-lb: error: --peers: http://{LOOPBACK}:{free} is given twice\n"),
            (("--url", f"{LOOPBACK}:{free}", "--peers", f"{LOOPBACK}:{free}", "servers"),
             "foobar-lb: error: admin: give either --url or --peers, not both\n"),
            (("--peers", f"{LOOPBACK}:{free}", "set", "app", "a"),
             "foobar-lb: error: admin set: give --state ready|drain|maint and/or --weight N\n"),
    ):
        rc = cli.main(["admin", *args])
        assert (rc, *capsys.readouterr()) == (2, "", want), args


# ---------------------------------------------------------------------------------------------
# `lab`


def test_lab_is_listed_and_gets_its_command_line_untouched(monkeypatch, capsys):
    seen: list[list[str]] = []

    class Lab:  # stands in for foobar_lb.lab (another module's), to see what it is handed
        @staticmethod
        def cli_main(argv: list[str]) -> int:
            seen.append(argv)
            return 7

    monkeypatch.setitem(sys.modules, "foobar_lb.lab", Lab)
    argv = ["exec", "app1", "--", "sh", "-c", "echo --help", "--dir", "x"]
    assert cli.main(["lab", *argv]) == 7
    assert cli.main(["lab", "--help"]) == 7
    assert cli.main(["lab"]) == 7
    assert seen == [argv, ["--help"], []]
    cli._parser().print_help()
    assert re.search(r"^    lab +a lab of real hosts in network namespaces", capsys.readouterr().out,
                     re.M)
    monkeypatch.setitem(sys.modules, "foobar_lb.lab", None)  # as if it were not there
    assert cli.main(["lab", "up"]) == 2
    assert capsys.readouterr() == ("", "foobar-lb: error: lab: this installation has no foobar_lb.lab\n")


@pytest.mark.skipif(importlib.util.find_spec("foobar_lb.lab") is None,
                    reason="foobar_lb.lab is not written yet")
async def test_lab_help_reaches_the_lab():
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "foobar_lb", "lab", "--help", stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(p.communicate(), 30)
    assert p.returncode == 0, err
    assert b"exec" in out and b"down" in out and b"no foobar_lb.lab" not in err, out
