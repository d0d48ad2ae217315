"""The whole stack as a user runs it: `python -m foobar_lb serve`, real processes, real ports.

The stack under test is examples/stack.toml with its ports moved to free ones and its data in a
temporary directory; one test also runs the default (no arguments at all) on 8080-8082.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from support import LOOPBACK, free_port

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "examples" / "stack.toml"


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOOPBACK, port)) == 0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class Stack:
    """`python -m foobar_lb serve` in a subprocess, its output in files."""

    def __init__(self, workdir: Path, args: list[str]):
        self.workdir = workdir
        self.args = args
        self.out = workdir / "stdout.log"
        self.err = workdir / "stderr.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 45.0) -> Stack:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "foobar_lb", "serve", *self.args], cwd=self.workdir,
            stdout=self.out.open("w"), stderr=self.err.open("w"), stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while "ready:" not in self.out.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"stack not ready (rc={self.proc.poll()}):\n"
                                     f"{self.out.read_text()}\n{self.err.read_text()}")
            time.sleep(0.05)
        return self

    def worker_pids(self) -> dict[str, int]:
        """The latest pid of each managed server, from the load balancer's log."""
        pids = {}
        for m in re.finditer(r"started app/(server-\d) \(pid (\d+)\)", self.err.read_text()):
            pids[m.group(1)] = int(m.group(2))
        return pids

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def stack_config(tmp: Path) -> tuple[Path, tuple[int, int, int]]:
    ports = (free_port(), free_port(), free_port())
    text = STACK.read_text()
    for old, new in zip(("8080", "8081", "8082", "8404"), (*ports, free_port()), strict=True):
        text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
    path = tmp / "stack.toml"
    path.write_text(text)
    return path, ports


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stack")
    cfg, ports = stack_config(tmp)
    s = Stack(tmp, ["--config", str(cfg), "--data-dir", str(tmp / "data")]).start()
    s.url = f"http://{LOOPBACK}:{ports[0]}"
    s.ports = ports
    yield s
    s.stop()


async def test_four_gets_alternate_and_an_item_crosses_servers(stack):
    async with aiohttp.ClientSession() as http:
        served = []
        for _ in range(4):
            async with http.get(f"{stack.url}/items?limit=1") as r:
                assert r.status == 200
                served.append(r.headers["X-Served-By"])
        assert served in (["server-1", "server-2"] * 2, ["server-2", "server-1"] * 2)
        # written through one server, read back through the other
        async with http.post(f"{stack.url}/items", json={"name": "crossing", "note": "x"}) as r:
            assert r.status == 201 and r.headers["X-DB-Role"] == "primary"
            writer = r.headers["X-Served-By"]
            item = await r.json()
        async with http.get(f"{stack.url}/items/{item['id']}") as r:
            assert r.status == 200 and r.headers["X-DB-Role"] == "replica"
            assert r.headers["X-Served-By"] != writer
            assert await r.json() == item
        async with http.put(f"{stack.url}/items/{item['id']}", json={"name": "crossed"}) as r:
            assert r.status == 200 and r.headers["X-DB-Role"] == "primary"


async def test_200_concurrent_creates_lose_and_duplicate_nothing(stack):
    names = [f"c-{i}" for i in range(200)]
    conn = aiohttp.TCPConnector(limit=200)
    async with aiohttp.ClientSession(connector=conn) as http:
        async def create(name: str) -> int:
            async with http.post(f"{stack.url}/items", json={"name": name}) as r:
                assert r.status == 201, await r.text()
                return (await r.json())["id"]

        ids = await asyncio.wait_for(asyncio.gather(*(create(n) for n in names)), 120)
        assert len(set(ids)) == 200
        seen: dict[int, str] = {}
        after = 0
        while True:
            async with http.get(f"{stack.url}/items", params={"limit": "500", "after": str(after)}) as r:
                page = await r.json()
            seen.update({i["id"]: i["name"] for i in page["items"]})
            if page["next_after"] is None:
                break
            after = page["next_after"]
    mine = {i: n for i, n in seen.items() if n.startswith("c-")}
    assert sorted(mine.values()) == sorted(names)
    assert set(mine) == set(ids)


@pytest.mark.slow
async def test_a_killed_worker_fails_no_get_and_comes_back(stack):
    victim = stack.worker_pids()["server-1"]
    failures: list[str] = []
    served: dict[str, int] = {}
    async with aiohttp.ClientSession() as http:
        async def client(n: int) -> None:
            for _ in range(n):
                try:
                    async with http.get(f"{stack.url}/items?limit=1") as r:
                        if r.status != 200:
                            failures.append(f"{r.status} {await r.text()}")
                        name = r.headers.get("X-Served-By", "?")
                        served[name] = served.get(name, 0) + 1
                except aiohttp.ClientError as e:
                    failures.append(repr(e))

        async def killer() -> None:
            await asyncio.sleep(0.3)
            os.kill(victim, signal.SIGKILL)

        await asyncio.wait_for(asyncio.gather(killer(), *(client(150) for _ in range(8))), 120)
        assert failures == []
        assert served.get("server-2", 0) > 0
        # restarted, with a new pid, and back in rotation
        deadline = time.monotonic() + 30
        while stack.worker_pids().get("server-1") == victim:
            assert time.monotonic() < deadline, stack.err.read_text()[-2000:]
            await asyncio.sleep(0.1)
        seen = set()
        while "server-1" not in seen:
            assert time.monotonic() < deadline, stack.err.read_text()[-2000:]
            async with http.get(f"{stack.url}/health") as r:
                assert r.status == 200
                seen.add(r.headers["X-Served-By"])
            await asyncio.sleep(0.05)
    assert not _alive(victim)
    assert "server app/server-1 is DOWN: process" in stack.err.read_text()


def test_sigterm_stops_everything_and_leaves_no_process_or_port(tmp_path):
    cfg, ports = stack_config(tmp_path)
    s = Stack(tmp_path, ["--config", str(cfg), "--data-dir", str(tmp_path / "data")]).start()
    pids = s.worker_pids()
    assert set(pids) == {"server-1", "server-2"}
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                          f"http://{LOOPBACK}:{ports[0]}/items"], capture_output=True, text=True,
                         timeout=10) if _have("curl") else None
    if out is not None:
        assert out.stdout == "200"
    assert s.stop() == 0
    assert "stopped" in s.out.read_text()
    for pid in pids.values():
        assert not _alive(pid), f"worker {pid} is still running"
    for port in ports:
        assert not _port_open(port), f"port {port} still listening"
    assert (tmp_path / "data" / "foobar.db").exists()


def _have(cmd: str) -> bool:
    from shutil import which

    return which(cmd) is not None


def test_serve_with_no_arguments_runs_the_default_stack_on_8080(tmp_path):
    """Exactly the README's first command: no arguments, the data in ./foobar-data."""
    busy = [p for p in (8080, 8081, 8082, 8404) if _port_open(p)]
    assert not busy, f"ports {busy} are taken on this machine: the default stack needs them"
    s = Stack(tmp_path, []).start()
    try:
        import urllib.request

        with urllib.request.urlopen("http://127.0.0.1:8080/items", timeout=10) as r:
            assert r.status == 200 and r.headers["X-Served-By"] in ("server-1", "server-2")
        assert "ready: http://127.0.0.1:8080/" in s.out.read_text()
        assert "admin listener on http://127.0.0.1:8404/" in s.out.read_text()
        with urllib.request.urlopen("http://127.0.0.1:8404/ready", timeout=10) as r:
            assert (r.status, r.read()) == (200, b"ready\n")
        assert (tmp_path / "foobar-data" / "foobar.db").exists()
        pids = s.worker_pids()
    finally:
        assert s.stop() == 0
    assert not any(_alive(p) for p in pids.values())
    assert not any(_port_open(p) for p in (8080, 8081, 8082, 8404))


def test_a_foobar_toml_in_the_working_directory_is_used(tmp_path):
    cfg, ports = stack_config(tmp_path)
    (tmp_path / "foobar.toml").write_text(cfg.read_text())
    s = Stack(tmp_path, []).start()
    try:
        assert f"ready: http://127.0.0.1:{ports[0]}/" in s.out.read_text()
        assert (tmp_path / "foobar-data" / "foobar.db").exists()
    finally:
        assert s.stop() == 0
