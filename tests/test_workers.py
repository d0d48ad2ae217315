"""The process model: a master and its workers, reload, stop, group-wide limits and counters.

Every test runs `python -m foobar_lb serve` as a real process group on loopback, with real
backend servers in the test's own loop; loads are bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from procs import LbProcess, alive, all_children, established_to, load, socket_inodes

from support import LOOPBACK, ScriptedServer, free_port, http_get, http_response

pytestmark = pytest.mark.slow


def cfg_for(port: int, servers: list[dict], *, glob: dict | None = None,
            backend: dict | None = None, frontend: dict | None = None) -> dict:
    cfg = {
        "frontends": {"www": {"bind": [f"{LOOPBACK}:{port}"], "default_backend": "app",
                              **(frontend or {})}},
        "backends": {"app": {"servers": servers, **(backend or {})}},
    }
    if glob:
        cfg["global"] = glob
    return cfg


def srv(name: str, s: ScriptedServer, **kw) -> dict:
    return {"name": name, "address": s.address, **kw}


async def test_two_workers_both_accept_and_both_skip_a_server_marked_down(tmp_path):
    async with ScriptedServer("a") as a, ScriptedServer("b") as b:
        port = free_port()
        check = {"inter": "200ms", "rise": 1, "fall": 1, "timeout": "200ms"}
        cfg = cfg_for(port, [srv("a", a, check=check), srv("b", b, check=check)],
                      glob={"workers": 2})
        async with LbProcess(tmp_path, cfg) as lb:
            workers = lb.workers()
            assert len(workers) == 2
            # 60 connections at once, each kept open after one request: both workers hold some
            clients = []
            for _ in range(60):
                r, w = await asyncio.open_connection(LOOPBACK, port)
                w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                clients.append((r, w))
            for r, _ in clients:
                assert (await r.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK\r\n")
            conns = set(established_to(port))
            owners = {pid: len(socket_inodes(pid) & conns) for pid in workers}
            assert sum(owners.values()) == 60, owners
            assert all(n > 0 for n in owners.values()), owners
            assert not socket_inodes(lb.pid) & conns  # the master never proxies
            for _, w in clients:
                w.close()
            # b goes down: its check fails; the master logs it, and neither worker sends to it
            mark = len(lb.err)
            await b.stop()
            await lb.wait_err(r"server app/b is DOWN", 5, start=mark)
            before = len(a.requests)
            res = await load(port, connections=8, requests=400, fresh_every=2)
            assert res.errors == 0, res.failed
            assert res.bodies == {b"a GET /\n": 400}
            assert len(a.requests) - before == 400


class Peak:
    """A handler that holds each request `delay` seconds and records the most in flight."""

    def __init__(self, delay: float):
        self.delay = delay
        self.inflight = 0
        self.peak = 0

    async def __call__(self, req):
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        await asyncio.sleep(self.delay)
        self.inflight -= 1
        return http_response(200, b"ok")


async def test_server_maxconn_and_global_maxconn_hold_across_workers(tmp_path):
    slow = Peak(0.25)
    async with ScriptedServer("s", slow) as s:
        port = free_port()
        cfg = cfg_for(port, [srv("s", s, maxconn=2)], glob={"workers": 2},
                      backend={"timeout": {"queue": "30s"}})
        async with LbProcess(tmp_path, cfg):
            res = await load(port, connections=20, requests=40, fresh_every=1)
            assert res.errors == 0, res.failed
            assert res.ok == 40
            assert slow.peak == 2  # reached, never passed, with 20 clients on 2 workers
            assert len(s.requests) == 40


async def test_global_maxconn_is_a_limit_of_the_group(tmp_path):
    slow = Peak(0.3)
    async with ScriptedServer("s", slow) as s:
        port = free_port()
        cfg = cfg_for(port, [srv("s", s)], glob={"workers": 2, "maxconn": 3})
        async with LbProcess(tmp_path, cfg):
            # 12 one-request connections at once over 2 workers, 3 served at a time
            res = await load(port, connections=12, requests=12, fresh_every=1)
            assert res.errors == 0, res.failed
            assert res.ok == 12
            assert slow.peak == 3


async def test_ten_reloads_under_load_lose_nothing(tmp_path):
    async with ScriptedServer("a") as a, ScriptedServer("b") as b:
        port = free_port()
        cfg = cfg_for(port, [srv("a", a), srv("b", b)], glob={"workers": 2})
        async with LbProcess(tmp_path, cfg) as lb:
            results = []
            running = asyncio.ensure_future(load(port, connections=24, requests=6000,
                                                 fresh_every=2, seconds=90))
            text = lb.config.read_text()
            for i in range(10):
                await asyncio.sleep(0.3)
                # the number of workers goes down and up again: no socket is ever closed
                lb.config.write_text(text.replace("workers = 2", f"workers = {1 + i % 2}"))
                os.kill(lb.pid, signal.SIGHUP)
                await lb.wait_err(rf"reload: serving .* with {1 + i % 2} workers", 20)
                lb.err.clear()
            res = await running
            results.append(res)
            assert res.errors == 0, res.failed
            assert res.ok == 6000
            stats = await lb.stats()
            assert stats["reloads"] == 10
            print(f"\nfoobar_lb, 10 reloads: {res.ok} requests, {res.errors} failed, "
                  f"{res.connections} connections")
    if shutil.which("haproxy"):
        await _haproxy_reload_figure(tmp_path, a_port=free_port())


async def _haproxy_reload_figure(tmp_path: Path, a_port: int) -> None:
    """The same scenario against HAProxy in master-worker mode; its figure is printed."""
    async with ScriptedServer("a") as a, ScriptedServer("b") as b:
        port = free_port()
        conf = tmp_path / "haproxy.cfg"
        sock = tmp_path / "haproxy.sock"
        conf.write_text(f"""
global
    master-worker
    nbthread 2
    stats socket {sock} mode 600 level admin expose-fd listeners
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 10s
frontend www
    bind {LOOPBACK}:{port}
    default_backend app
backend app
    server a {a.address}
    server b {b.address}
""")
        proc = await asyncio.create_subprocess_exec(
            "haproxy", "-W", "-f", str(conf), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    (await http_get(LOOPBACK, port, "/"))
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            running = asyncio.ensure_future(load(port, connections=24, requests=6000,
                                                 fresh_every=2, seconds=90))
            for _ in range(10):
                await asyncio.sleep(0.3)
                proc.send_signal(signal.SIGUSR2)
            res = await running
            print(f"HAProxy -W, 10 reloads: {res.ok} requests, {res.errors} failed "
                  f"({dict(res.failed)})")
        finally:
            for pid in [*all_children(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            await proc.wait()


async def test_reload_with_an_invalid_file_keeps_serving(tmp_path):
    async with ScriptedServer("a") as a:
        port = free_port()
        cfg = cfg_for(port, [srv("a", a)])
        async with LbProcess(tmp_path, cfg) as lb:
            lb.config.write_text(lb.config.read_text() + "\n[global]\nworkers = 0\n")
            mark = len(lb.err)
            rc, out, err = await lb.reload()
            assert rc == 2
            assert err == (f"foobar-lb: error: {lb.config}: global.workers = 0: expected a number "
                           'of worker processes from 1 to 256, or "auto"\n')
            line = await lb.wait_err("reload failed", 5, start=mark)
            assert line.endswith(f"reload failed, still serving the previous configuration: "
                                 f"{lb.config}: global.workers = 0: expected a number of worker "
                                 'processes from 1 to 256, or "auto"')
            assert (await http_get(LOOPBACK, port, "/")).status == 200
            # SIGHUP with the same bad file: one line, still serving
            os.kill(lb.pid, signal.SIGHUP)
            await lb.wait_err("reload failed", 5, start=mark + 1)
            assert (await http_get(LOOPBACK, port, "/")).status == 200
            lb.config.write_text(lb.config.read_text().replace("workers = 0", "workers = 2"))
            rc, out, err = await lb.reload()
            assert rc == 0, err
            assert out.startswith("foobar-lb: serving ") and "with 2 workers" in out
            assert (await http_get(LOOPBACK, port, "/")).status == 200


async def test_reload_adds_and_removes_servers_and_in_flight_requests_complete(tmp_path):
    gate = asyncio.Event()

    async def held(req):
        await gate.wait()
        return http_response(200, b"old done")

    async with ScriptedServer("old", held) as old, ScriptedServer("new") as new:
        port = free_port()
        async with LbProcess(tmp_path, cfg_for(port, [srv("old", old)])) as lb:
            pending = [asyncio.ensure_future(http_get(LOOPBACK, port, "/", timeout=20))
                       for _ in range(3)]
            while len(old.requests) < 3:
                await asyncio.sleep(0.02)
            lb.config.write_text(lb.config.read_text().replace(
                f'{{ name = "old", address = "{old.address}" }}',
                f'{{ name = "new", address = "{new.address}" }}'))
            rc, _out, err = await lb.reload()
            assert rc == 0, err
            res = await load(port, connections=4, requests=40)
            assert res.errors == 0
            assert res.bodies == {b"new GET /\n": 40}
            assert len(old.requests) == 3
            gate.set()
            for p in pending:
                r = await p
                assert (r.status, r.body) == (200, b"old done")
            stats = await lb.stats()
            assert list(stats["backends"]["app"]["servers"]) == ["new"]


async def test_reload_moves_a_frontend_to_a_new_address(tmp_path):
    async with ScriptedServer("a") as a:
        port, port2 = free_port(), free_port()
        async with LbProcess(tmp_path, cfg_for(port, [srv("a", a)])) as lb:
            lb.config.write_text(lb.config.read_text().replace(f":{port}\"", f":{port2}\""))
            rc, _, err = await lb.reload()
            assert rc == 0, err
            assert (await http_get(LOOPBACK, port2, "/")).status == 200
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    await http_get(LOOPBACK, port, "/", timeout=1)
                except OSError:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(OSError):
                await http_get(LOOPBACK, port, "/", timeout=1)


async def _slow_requests_in_flight(tmp_path, s: ScriptedServer, n: int, grace: str):
    """A 2-worker group in front of `s` with `n` requests waiting on it: (lb, port, the pids of
    the master and its children, the pending requests)."""
    port = free_port()
    lb = LbProcess(tmp_path, cfg_for(port, [srv("s", s)], glob={"workers": 2, "grace": grace}))
    await lb.start()
    pids = [lb.pid, *all_children(lb.pid)]
    pending = [asyncio.ensure_future(http_get(LOOPBACK, port, "/", timeout=40)) for _ in range(n)]
    while len(s.requests) < n:
        await asyncio.sleep(0.02)
    return lb, pids, pending


async def test_sigterm_lets_slow_requests_finish_and_leaves_no_process(tmp_path):
    async def slow(req):
        await asyncio.sleep(1.0)
        return http_response(200, b"slow")

    async with ScriptedServer("s", slow) as s:
        lb, pids, pending = await _slow_requests_in_flight(tmp_path, s, 20, "5s")
        try:
            t0 = time.monotonic()
            os.kill(lb.pid, signal.SIGTERM)
            for p in pending:
                r = await p
                assert (r.status, r.body) == (200, b"slow")
            rc = await asyncio.wait_for(lb.proc.wait(), 6)
            assert rc == 0
            assert time.monotonic() - t0 < 5
            await asyncio.sleep(0.2)
            assert [p for p in pids if alive(p)] == []
            assert lb.out[-1] == "foobar-lb: stopped"
        finally:
            lb.kill_all()
            await lb.stop()


async def test_a_second_signal_stops_at_once(tmp_path):
    async def slow(req):
        await asyncio.sleep(30)
        return http_response(200, b"late")

    async with ScriptedServer("s", slow) as s:
        lb, pids, pending = await _slow_requests_in_flight(tmp_path, s, 4, "20s")
        try:
            os.kill(lb.pid, signal.SIGTERM)
            await lb.wait_out("SIGTERM: stopping", 5)
            t0 = time.monotonic()
            os.kill(lb.pid, signal.SIGINT)
            rc = await asyncio.wait_for(lb.proc.wait(), 10)
            assert rc == 0
            assert time.monotonic() - t0 < 5  # not the 20s grace
            for p in pending:  # the requests in flight were cut
                with pytest.raises((AssertionError, OSError)):
                    await p
            await asyncio.sleep(0.2)
            assert [p for p in pids if alive(p)] == []
        finally:
            lb.kill_all()
            await lb.stop()


async def test_a_setting_that_cannot_change_live_fails_the_reload_naming_it(tmp_path):
    async with ScriptedServer("a") as a:
        port = free_port()
        async with LbProcess(tmp_path, cfg_for(port, [srv("a", a)])) as lb:
            lb.config.write_text(lb.config.read_text() + '\n[global]\nuser = "nobody"\n')
            rc, _, err = await lb.reload()
            assert rc == 2
            assert err == (f"foobar-lb: error: {lb.config}: global.user: cannot change on a "
                           "reload (restart to change it)\n")
            assert (await http_get(LOOPBACK, port, "/")).status == 200


async def test_a_killed_worker_is_replaced_and_counters_never_go_down(tmp_path):
    async with ScriptedServer("a") as a:
        port = free_port()
        cfg = cfg_for(port, [srv("a", a)], glob={"workers": 2})
        async with LbProcess(tmp_path, cfg) as lb:
            answered = 0
            for _ in range(3):
                res = await load(port, connections=6, requests=300)
                assert res.errors == 0
                answered += res.ok
                rc, _, err = await lb.reload()
                assert rc == 0, err
            res = await load(port, connections=6, requests=300)
            answered += res.ok
            # the reloads' old workers are gone once they drained
            deadline = time.monotonic() + 15
            while len(lb.workers()) != 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            victim = lb.workers()[0]
            t0 = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            while time.monotonic() - t0 < 5:
                now = lb.workers()
                if len(now) == 2 and victim not in now:
                    break
                await asyncio.sleep(0.02)
            assert len(lb.workers()) == 2 and victim not in lb.workers()
            assert time.monotonic() - t0 < 1.5
            await lb.wait_err(rf"worker \d+ \(pid {victim}\) died \(killed by SIGKILL\); "
                              r"starting a new one", 5)
            res = await load(port, connections=6, requests=300)
            assert res.errors == 0
            answered += res.ok
            stats = await lb.stats()
            assert stats["frontends"]["www"]["requests"] == answered == 1500
            assert stats["frontends"]["www"]["responses"]["2xx"] == 1500
            assert stats["backends"]["app"]["servers"]["a"]["requests"] == 1500
            assert stats["reloads"] == 3


async def test_state_changes_are_pushed_to_every_worker_within_100ms(tmp_path):
    async with ScriptedServer("a") as a, ScriptedServer("b") as b, \
            ScriptedServer("b-check") as b_check:
        port = free_port()
        check = {"inter": "100ms", "rise": 1, "fall": 1, "timeout": "100ms", "jitter": 0,
                 "port": b_check.port}
        cfg = cfg_for(port, [srv("a", a), srv("b", b, check=check)], glob={"workers": 2})
        async with LbProcess(tmp_path, cfg) as lb:
            stop = asyncio.Event()

            async def keep_asking():
                while not stop.is_set():
                    r = await load(port, connections=4, requests=8, fresh_every=2)
                    assert r.errors == 0, r.failed

            runner = asyncio.ensure_future(keep_asking())
            await asyncio.sleep(0.5)
            assert len(b.requests) > 0
            # b keeps serving, but its check fails: the master marks it down
            await b_check.stop()
            await lb.wait_err(r"server app/b is DOWN", 5)
            await asyncio.sleep(0.1)
            seen = len(b.requests)
            await asyncio.sleep(0.7)  # the load goes on through both workers
            stop.set()
            await runner
            assert len(b.requests) == seen
            assert len(a.requests) > 0


async def test_listen_backlog_is_what_was_asked(tmp_path):
    async with ScriptedServer("a") as a:
        port = free_port()
        async with LbProcess(tmp_path, cfg_for(port, [srv("a", a)], glob={"backlog": 3000})):
            out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                                 text=True).stdout.split()
            assert out[0] == "LISTEN" and out[2] == "3000", out
        port = free_port()
        somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
        async with LbProcess(tmp_path, cfg_for(port, [srv("a", a)])):
            out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                                 text=True).stdout.split()
            assert int(out[2]) == min(max(somaxconn, 4096), somaxconn) == somaxconn


async def test_workers_die_with_the_master(tmp_path):
    async with ScriptedServer("a") as a:
        port = free_port()
        lb = LbProcess(tmp_path, cfg_for(port, [srv("a", a)], glob={"workers": 2}))
        await lb.start()
        workers = lb.workers()
        assert len(workers) == 2
        os.kill(lb.pid, signal.SIGKILL)
        await lb.proc.wait()
        deadline = time.monotonic() + 1.0
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not any(alive(p) for p in workers)
        await lb.stop()


async def test_auto_workers_is_the_cpus_this_process_may_use(tmp_path):
    async with ScriptedServer("a") as a:
        port = free_port()
        async with LbProcess(tmp_path, cfg_for(port, [srv("a", a)], glob={"workers": "auto"})) as lb:
            assert len(lb.workers()) == len(os.sched_getaffinity(0))


async def test_quick_form_takes_workers(tmp_path):
    async with ScriptedServer("a") as a:
        port = free_port()
        lb = LbProcess(tmp_path, None, "--bind", f"{LOOPBACK}:{port}", "--backend", a.address,
                       "--workers", "2")
        async with lb:
            assert len(lb.workers()) == 2
            assert (await http_get(LOOPBACK, port, "/")).status == 200


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
async def test_workers_drop_root_to_user_and_group(tmp_path):
    async with ScriptedServer("a") as a:
        port = free_port()
        cfg = cfg_for(port, [srv("a", a)], glob={"user": "nobody", "group": "nogroup"})
        os.chmod(tmp_path, 0o777)
        async with LbProcess(tmp_path, cfg) as lb:

            def ids(pid: int, key: str) -> set[str]:
                status = Path(f"/proc/{pid}/status").read_text()
                return set(next(ln for ln in status.splitlines() if ln.startswith(key)).split()[1:])

            # the workers, which face clients, run as nobody; the master keeps root so that a
            # reload may bind a port below 1024 (as HAProxy's master does)
            assert len(lb.workers()) == 1
            for pid in lb.workers():
                assert ids(pid, "Uid:") == {"65534"}
                assert ids(pid, "Gid:") == {"65534"}
                assert ids(pid, "Groups:") == set()
            assert ids(lb.pid, "Uid:") == {"0"}
            assert (await http_get(LOOPBACK, port, "/")).status == 200


# ---------------------------------------------------------------------------------------------
# Starting: fail fast, say what is wrong


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "foobar_lb", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd)


def test_missing_managed_program_exits_2_before_binding(tmp_path):
    port = free_port()
    cfg = cfg_for(port, [{"name": "x", "address": f"{LOOPBACK}:{free_port()}",
                          "command": ["no-such-program-here", "{port}"]}])
    (tmp_path / "lb.toml").write_text(__import__("procs").to_toml(cfg))
    r = run_cli("serve", "--config", str(tmp_path / "lb.toml"))
    assert r.returncode == 2
    assert r.stderr == (f"foobar-lb: error: {tmp_path / 'lb.toml'}: backends.app.servers[0]."
                        'command: cannot run "no-such-program-here": not found on PATH\n')
    assert r.stdout == ""
    r = run_cli("check", "--config", str(tmp_path / "lb.toml"))
    assert r.returncode == 2
    assert "cannot run \"no-such-program-here\": not found on PATH" in r.stderr


def test_managed_server_that_keeps_dying_is_exit_2_with_its_stderr(tmp_path):
    port = free_port()
    script = tmp_path / "dies.py"
    script.write_text("import sys\nprint('cannot open cluster.json: no such file', "
                      "file=sys.stderr)\nsys.exit(3)\n")
    cfg = cfg_for(port, [{"name": "x", "address": f"{LOOPBACK}:{free_port()}",
                          "command": ["{python}", str(script)]}])
    (tmp_path / "lb.toml").write_text(__import__("procs").to_toml(cfg))
    t0 = time.monotonic()
    r = run_cli("serve", "--config", str(tmp_path / "lb.toml"))
    assert r.returncode == 2
    assert time.monotonic() - t0 < 10
    assert ("foobar-lb: error: managed server app/x exited 3 times before its first passing "
            "check (last: process") in r.stderr
    assert "the last lines of its stderr:\n  cannot open cluster.json: no such file\n" in r.stderr
    assert "ready:" not in r.stdout
    assert "Traceback" not in r.stderr


async def test_no_server_up_at_startup_timeout_is_not_ready_and_503(tmp_path):
    port = free_port()
    script = tmp_path / "sleeps.py"
    script.write_text("import time\ntime.sleep(60)\n")  # runs, never listens
    cfg = cfg_for(port, [{"name": "x", "address": f"{LOOPBACK}:{free_port()}",
                          "command": ["{python}", str(script)]}],
                  glob={"startup_timeout": "1s"})
    async with LbProcess(tmp_path, cfg) as lb:
        await lb.wait_err(r"not ready: frontend www: backend app has no server up", 5)
        r = await http_get(LOOPBACK, port, "/")
        assert r.status == 503
        assert not [ln for ln in lb.out if "ready:" in ln]


async def test_a_state_change_while_workers_start_is_applied_not_a_crash(tmp_path):
    """A check that marks a server down while the workers are still starting: its change waits
    for the worker's Serving (it once reached a worker before it, which died)."""
    port = free_port()
    async with ScriptedServer("a") as a:
        dead = f"{LOOPBACK}:{free_port()}"  # nobody listens there
        check = {"inter": "50ms", "fastinter": "50ms", "downinter": "50ms", "rise": 1, "fall": 1,
                 "timeout": "100ms"}
        cfg = cfg_for(port, [srv("a", a), {"name": "gone", "address": dead}],
                      glob={"workers": 4}, backend={"check": check})
        for _ in range(3):
            async with LbProcess(tmp_path, cfg) as lb:
                stats = await lb.stats()
                assert stats["backends"]["app"]["servers"]["gone"]["state"] == "down"
                assert len(stats["workers"]) == 4
                for _ in range(8):  # every worker knows: nothing goes to the dead server
                    r = await http_get(LOOPBACK, port, "/")
                    assert r.status == 200
            assert not [ln for ln in lb.err if "Traceback" in ln or "failed to start" in ln]


def test_check_refuses_two_frontends_on_one_address(tmp_path):
    p = tmp_path / "lb.toml"
    p.write_text('[frontends.a]\nbind = "127.0.0.1:8000"\ndefault_backend = "b"\n'
                 '[frontends.c]\nbind = ["127.0.0.1:8001", "*:8000"]\ndefault_backend = "b"\n'
                 '[backends.b]\nservers = [{ address = "127.0.0.1:9" }]\n')
    r = run_cli("check", "--config", str(p))
    assert r.returncode == 2
    assert r.stderr == (f'foobar-lb: error: {p}: frontends.c.bind[1] = "*:8000": expected an '
                        "address not already used by frontends.a.bind\n")


def test_serve_with_a_bad_option_shows_serve_usage():
    r = run_cli("serve", "--bogus")
    assert r.returncode == 2
    assert r.stderr.startswith("usage: foobar-lb serve ")
    assert r.stderr.endswith("foobar-lb serve: error: unrecognized arguments: --bogus\n")


async def test_sigterm_stops_it_when_stdout_is_a_closed_pipe(tmp_path):
    async with ScriptedServer("a") as a:
        port = free_port()
        (tmp_path / "lb.toml").write_text(__import__("procs").to_toml(
            cfg_for(port, [srv("a", a)], glob={"workers": 2})))
        # `serve | head -n 1`: the reader leaves after one line
        sh = await asyncio.create_subprocess_shell(
            f"{sys.executable} -m foobar_lb serve --config {tmp_path / 'lb.toml'} "
            f"--pid-file {tmp_path / 'lb.pid'} 2>{tmp_path / 'err'} | head -n 1 >/dev/null",
            start_new_session=True)
        pid_file = tmp_path / "lb.pid"
        deadline = time.monotonic() + 10
        while not pid_file.exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        master = int(pid_file.read_text())
        for _ in range(100):
            try:
                if (await http_get(LOOPBACK, port, "/")).status == 200:
                    break
            except OSError:
                await asyncio.sleep(0.05)
        group = [master, *all_children(master)]
        os.kill(master, signal.SIGTERM)
        await asyncio.wait_for(sh.wait(), 10)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in group) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert not any(alive(p) for p in group)
        assert "Traceback" not in (tmp_path / "err").read_text()


def test_serve_into_a_pipe_closed_at_once_starts_without_a_traceback(tmp_path):
    port = free_port()
    (tmp_path / "lb.toml").write_text(__import__("procs").to_toml(
        cfg_for(port, [{"name": "a", "address": f"{LOOPBACK}:{free_port()}"}])))
    p = subprocess.Popen(f"{sys.executable} -m foobar_lb serve --config {tmp_path / 'lb.toml'} "
                         f"--pid-file {tmp_path / 'lb.pid'} | true", shell=True,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if (tmp_path / "lb.pid").exists():
                with __import__("socket").socket() as s:
                    if s.connect_ex((LOOPBACK, port)) == 0:
                        break
            time.sleep(0.05)
        master = int((tmp_path / "lb.pid").read_text())
        time.sleep(0.5)
        assert alive(master)
        os.kill(master, signal.SIGTERM)
        _, err = p.communicate(timeout=15)
        assert "Traceback" not in err
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)


async def test_tcp_mode_says_ready_and_no_data_dir_is_made(tmp_path):
    async with ScriptedServer("a") as a:
        port = free_port()
        cfg = {"frontends": {"t": {"bind": f"{LOOPBACK}:{port}", "mode": "tcp",
                                   "default_backend": "b"}},
               "backends": {"b": {"mode": "tcp", "servers": [srv("a", a)]}}}
        async with LbProcess(tmp_path, cfg) as lb:
            assert f"foobar-lb: ready: tcp://{LOOPBACK}:{port}/" in lb.out
        assert not (tmp_path / "foobar-data").exists()


async def test_banner_summarises_many_servers(tmp_path):
    port = free_port()
    servers = [{"name": f"s{i}", "address": f"{LOOPBACK}:{20000 + i}"} for i in range(50)]
    async with LbProcess(tmp_path, cfg_for(port, servers)) as lb:
        line = next(ln for ln in lb.out if ln.startswith("foobar-lb: backend app"))
        assert line == (f"foobar-lb: backend app (roundrobin, 50 servers): s0 {LOOPBACK}:20000, "
                        f"s1 {LOOPBACK}:20001, s2 {LOOPBACK}:20002, s3 {LOOPBACK}:20003, "
                        "and 46 more")
        assert all(len(ln) < 200 for ln in lb.out)


def test_library_example_from_the_readme_runs_in_a_fresh_directory(tmp_path):
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index("<!-- library-example -->")
    code = readme[start:].split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "test_example.py").write_text(code)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "test_example.py"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout
