"""foobar_lb as a real process: the command line, big streams, signals."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httptools
import pytest

from support import LOOPBACK, RawClient, ScriptedServer, free_port, http_get, http_response

MIB = 1024 * 1024


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited early with {proc.returncode}: "
                                 f"{proc.stderr.read() if proc.stderr else ''}")
        with socket.socket() as s:
            if s.connect_ex((LOOPBACK, port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {port} after {timeout}s")


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((LOOPBACK, port)) != 0


@contextlib.contextmanager
def lb_process(*args: str):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "foobar_lb", "serve", "--bind", f"{LOOPBACK}:{port}", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_port(port, proc)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# -- a sink/source server for big bodies -------------------------------------------------------


class _Big(asyncio.Protocol):
    """POST /sink: counts the body and answers the count; GET /source/N: sends N bytes."""

    def __init__(self):
        self.parser = httptools.HttpRequestParser(self)
        self.count = 0
        self.url = b""
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def on_url(self, url):
        self.url += url

    def on_body(self, body):
        self.count += len(body)

    def on_message_complete(self):
        if self.url.startswith(b"/source/"):
            n = int(self.url.rsplit(b"/", 1)[1])
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
            asyncio.get_running_loop().create_task(self._send(n))
        else:
            body = b"%d" % self.count
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self.url = b""
        self.count = 0

    async def _send(self, n: int):
        block = b"z" * MIB
        while n > 0 and not self.transport.is_closing():
            piece = block[: min(n, MIB)]
            self.transport.write(piece)
            n -= len(piece)
            while self.transport.get_write_buffer_size() > 4 * MIB:
                await asyncio.sleep(0.005)

    def data_received(self, data):
        self.parser.feed_data(data)


@pytest.mark.slow
async def test_100_mib_streams_through_with_bounded_memory():
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(_Big, LOOPBACK, 0)
    bport = srv.sockets[0].getsockname()[1]
    try:
        with lb_process("--backend", f"{LOOPBACK}:{bport}") as (proc, port):
            base = _rss_kib(proc.pid)
            reader, writer = await asyncio.open_connection(LOOPBACK, port)
            total = 100 * MIB
            # upload, chunked
            writer.write(b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            block = os.urandom(256 * 1024)
            sent = 0
            while sent < total:
                writer.write(b"%x\r\n%s\r\n" % (len(block), block))
                sent += len(block)
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert head.startswith(b"HTTP/1.1 200")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            assert int(await reader.readexactly(length)) == total
            # download, content-length; the client reads slowly at first
            writer.write(b"GET /source/%d HTTP/1.1\r\nHost: x\r\n\r\n" % total)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            assert b"content-length: %d" % total in head.lower()
            await asyncio.sleep(0.5)  # not reading: the proxy must stop reading the server
            got = 0
            async with asyncio.timeout(60):
                while got < total:
                    got += len(await reader.read(MIB))
            assert got == total
            peak = _rss_kib(proc.pid, "VmHWM")
            writer.close()
            # 200 MiB went through; the proxy's peak grew by a few buffers, not by the bodies
            print(f"proxy RSS at start {base} KiB, peak {peak} KiB")
            assert peak - base < 40 * 1024, (base, peak)
    finally:
        srv.close()


async def test_sigterm_lets_the_request_in_flight_finish_then_exits():
    async def slow(req):
        await asyncio.sleep(0.6)
        return http_response(200, b"finished\n")

    async with ScriptedServer("a", slow) as a:
        with lb_process("--backend", a.address) as (proc, port):
            async with RawClient(LOOPBACK, port) as c:
                await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                await asyncio.sleep(0.2)
                proc.send_signal(signal.SIGTERM)
                (resp,) = await c.read_responses(1, timeout=5)
                assert resp.status == 200 and resp.body == b"finished\n"
                assert resp.header("connection") == "close"  # no more requests on it
            rc = await asyncio.to_thread(proc.wait, 10)
            assert rc == 0
            assert _port_closed(port)
            assert "stopping" in proc.stdout.read()


def _http_server(directory: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", LOOPBACK],
                            cwd=directory, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_quick_form_balances_python_http_servers_in_exact_rotation(tmp_path):
    procs = []
    ports = []
    try:
        for name in ("one", "two"):
            d = tmp_path / name
            d.mkdir()
            (d / "index.html").write_text(f"{name}\n")
            ports.append(free_port())
            procs.append(_http_server(d, ports[-1]))
        for p, proc in zip(ports, procs, strict=True):
            await asyncio.to_thread(_wait_port, p, proc)
        backends = [arg for p in ports for arg in ("--backend", f"{LOOPBACK}:{p}")]
        with lb_process(*backends) as (_, port):
            bodies = [(await http_get(LOOPBACK, port, "/")).body for _ in range(6)]
        assert bodies == [b"one\n", b"two\n"] * 3
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(5)


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fcgi;
  uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  server {{ listen 127.0.0.1:{p1}; location / {{ return 200 "nginx-1\\n"; }} }}
  server {{ listen 127.0.0.1:{p2}; location / {{ return 200 "nginx-2\\n"; }} }}
}}
"""


async def test_quick_form_balances_two_nginx_servers_in_exact_rotation(tmp_path):
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx is not installed (the README's test command installs it)")
    p1, p2 = free_port(), free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=tmp_path, p1=p1, p2=p2))
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        await asyncio.to_thread(_wait_port, p1, proc)
        await asyncio.to_thread(_wait_port, p2, proc)
        with lb_process("--backend", f"{LOOPBACK}:{p1}", "--backend", f"{LOOPBACK}:{p2}",
                        "--algorithm", "roundrobin") as (_, port):
            async with RawClient(LOOPBACK, port) as c:  # one keep-alive client connection
                bodies = []
                for _ in range(6):
                    await c.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    (resp,) = await c.read_responses(1)
                    c.buf = b""
                    bodies.append(resp.body)
        assert bodies == [b"nginx-1\n", b"nginx-2\n"] * 3
    finally:
        proc.terminate()
        proc.wait(5)
