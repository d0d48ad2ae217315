"""Issue 12, TLS: HTTPS termination (SNI, versions, HSTS, redirect, reload, start-up errors),
mutual TLS, and TLS to servers. Real sockets on loopback, real TLS with trustme certificates;
the bytes asserted are the exact ones sent and received."""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import trustme

from procs import LbProcess

from support import LOOPBACK, ScriptedServer, _ServerConn, free_port, lb_config, running_lb

# a refused handshake: the server's alert, or (uvloop's transport closes at once) a reset
REFUSED = (ssl.SSLError, ConnectionResetError)


def write_pair(cert: trustme.LeafCert, d: Path, name: str) -> tuple[str, str]:
    c, k = d / f"{name}.pem", d / f"{name}.key"
    cert.cert_chain_pems[0].write_to_path(str(c))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(c), append=True)
    cert.private_key_pem.write_to_path(str(k))
    return str(c), str(k)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def client_ctx(ca: trustme.CA, **kw) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


async def https_get(port: int, ctx: ssl.SSLContext, host: str = "localhost", path: str = "/",
                    server_hostname: str | None = None) -> tuple[bytes, ssl.SSLObject | None]:
    """One request on a new TLS connection; returns (all bytes until close, the ssl object's
    peer certificate (binary))."""
    r, w = await asyncio.wait_for(asyncio.open_connection(
        LOOPBACK, port, ssl=ctx, server_hostname=server_hostname or host), 5)
    try:
        w.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(r.read(), 5)
        return data, w.get_extra_info("ssl_object").getpeercert(binary_form=True)
    finally:
        w.close()


def der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


async def test_https_request_gets_forwarded_proto_https_and_hsts(tmp_path, ca):
    leaf = ca.issue_cert("localhost")
    cert, key = write_pair(leaf, tmp_path, "site")
    async with ScriptedServer("a") as a:
        cfg = lb_config([a.address], frontend={"tls": {"cert": cert, "key": key},
                                               "hsts": "max-age=31536000"})
        async with running_lb(cfg) as lb:
            data, peer = await https_get(lb.address[1], client_ctx(ca), path="/x?y=1")
    assert peer == der(leaf)
    assert data == (b"HTTP/1.1 200 OK\r\nX-Server: a\r\nContent-Length: 13\r\n"
                    b"connection: close\r\nstrict-transport-security: max-age=31536000\r\n\r\n"
                    b"a GET /x?y=1\n")
    req = a.requests[0]
    assert ("x-forwarded-proto", "https") in req.headers


async def test_sni_picks_the_certificate_and_an_unknown_name_gets_the_default(tmp_path, ca):
    a = ca.issue_cert("a.test")
    b = ca.issue_cert("*.b.test", "b.test")
    ca_, ka = write_pair(a, tmp_path, "a")
    cb, kb = write_pair(b, tmp_path, "b")
    async with ScriptedServer("s") as s:
        cfg = lb_config([s.address], frontend={"tls": {"certificates": [
            {"cert": ca_, "key": ka}, {"cert": cb, "key": kb}]}})
        async with running_lb(cfg) as lb:
            port = lb.address[1]
            ctx = client_ctx(ca)
            data, peer = await https_get(port, ctx, host="a.test")
            assert data.startswith(b"HTTP/1.1 200 OK\r\n") and peer == der(a)
            data, peer = await https_get(port, ctx, host="x.b.test")
            assert data.startswith(b"HTTP/1.1 200 OK\r\n") and peer == der(b)
            data, peer = await https_get(port, ctx, host="b.test")
            assert peer == der(b)
            lax = client_ctx(ca, check_hostname=False)
            data, peer = await https_get(port, lax, host="unknown.test")
            assert data.startswith(b"HTTP/1.1 200 OK\r\n") and peer == der(a)
            # one label deep only: "y.x.b.test" is not "*.b.test"
            _, peer = await https_get(port, lax, host="y.x.b.test")
            assert peer == der(a)


async def test_a_client_limited_to_tls_1_1_fails_the_handshake(tmp_path, ca, caplog):
    cert, key = write_pair(ca.issue_cert("localhost"), tmp_path, "site")
    async with ScriptedServer("s") as s:
        cfg = lb_config([s.address], frontend={"tls": {"cert": cert, "key": key}})
        async with running_lb(cfg) as lb:
            old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            old.check_hostname = False
            old.verify_mode = ssl.CERT_NONE
            old.set_ciphers("DEFAULT:@SECLEVEL=0")  # so that it may offer TLS 1.1 at all
            with warnings.catch_warnings():  # (TLSv1_1 is deprecated: that is the point)
                warnings.simplefilter("ignore", DeprecationWarning)
                old.minimum_version = ssl.TLSVersion.TLSv1_1
                old.maximum_version = ssl.TLSVersion.TLSv1_1
            # refused: the protocol-version alert, or (uvloop closes at once) a reset
            with caplog.at_level("INFO", logger="foobar_lb.tls"):
                with pytest.raises(REFUSED):
                    await https_get(lb.address[1], old)
                for _ in range(100):  # (the server side may see it a moment later)
                    if lb.serving.tls_refusals["www"].count:
                        break
                    await asyncio.sleep(0.01)
            # the server side counted and logged the refusal
            assert lb.serving.tls_refusals["www"].count == 1
            assert [r.getMessage() for r in caplog.records if r.name == "foobar_lb.tls"] == [
                "frontend www: TLS handshake refused: UNSUPPORTED_PROTOCOL"]
            # a TLS 1.2 client on the same listener is served
            data, _ = await https_get(lb.address[1], client_ctx(ca))
            assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert s.requests and len(s.requests) == 1


async def test_min_version_1_3_refuses_tls_1_2(tmp_path, ca):
    cert, key = write_pair(ca.issue_cert("localhost"), tmp_path, "site")
    async with ScriptedServer("s") as s:
        cfg = lb_config([s.address], frontend={"tls": {"cert": cert, "key": key,
                                                       "min_version": "1.3"}})
        async with running_lb(cfg) as lb:
            with pytest.raises(REFUSED):
                await https_get(lb.address[1], client_ctx(
                    ca, maximum_version=ssl.TLSVersion.TLSv1_2))
            data, _ = await https_get(lb.address[1], client_ctx(ca))
            assert data.startswith(b"HTTP/1.1 200 OK\r\n")


async def raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    r, w = await asyncio.open_connection(LOOPBACK, port)
    try:
        w.write(data)
        out = b""
        async with asyncio.timeout(timeout):
            while b"\r\n\r\n" not in out:
                chunk = await r.read(65536)
                if not chunk:
                    break
                out += chunk
        return out
    finally:
        w.close()


@pytest.mark.parametrize(("value", "location"), [
    (True, b"https://example.com/p/q?x=1&y=%20"),
    (8443, b"https://example.com:8443/p/q?x=1&y=%20"),
])
async def test_redirect_https_keeps_path_and_query(value, location):
    async with ScriptedServer("s") as s:
        cfg = lb_config([s.address], frontend={"redirect_https": value})
        async with running_lb(cfg) as lb:
            got = await raw(lb.address[1], b"GET /p/q?x=1&y=%20 HTTP/1.1\r\n"
                                           b"Host: example.com:8080\r\n\r\n")
            assert got == (b"HTTP/1.1 301 Moved Permanently\r\nlocation: " + location
                           + b"\r\ncontent-length: 0\r\n\r\n")
            got = await raw(lb.address[1], b"POST /a HTTP/1.1\r\nHost: [::1]\r\n"
                                           b"Content-Length: 2\r\nConnection: close\r\n\r\nhi")
            port = b"" if value is True else b":8443"
            assert got == (b"HTTP/1.1 301 Moved Permanently\r\nlocation: https://[::1]" + port
                           + b"/a\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
    assert s.requests == []  # nothing reached a server


def run_cli(*args: str, cwd: Path) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", "foobar_lb", *args], cwd=cwd, capture_output=True,
                       text=True, timeout=30)
    return p.returncode, p.stderr


def test_tls_file_errors_are_one_line_naming_key_and_file(tmp_path, ca):
    good_c, good_k = write_pair(ca.issue_cert("localhost"), tmp_path, "good")
    _other_c, other_k = write_pair(ca.issue_cert("other"), tmp_path, "other")
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    old_c, old_k = write_pair(ca.issue_cert("localhost", not_before=past - datetime.timedelta(
        days=30), not_after=past), tmp_path, "old")
    (tmp_path / "junk.pem").write_text("hello\n")
    cases = [
        ({"cert": "missing.pem", "key": good_k},
         'frontends.www.tls.cert = "missing.pem": no such file'),
        ({"cert": "junk.pem", "key": good_k},
         'frontends.www.tls.cert = "junk.pem": not a PEM certificate'),
        ({"cert": good_c, "key": "junk.pem"},
         'frontends.www.tls.key = "junk.pem": not a PEM private key'),
        ({"cert": good_c, "key": other_k},
         f'frontends.www.tls.key = "{other_k}": does not match the certificate "{good_c}"'),
        ({"cert": old_c, "key": old_k},
         f'frontends.www.tls.cert = "{old_c}": certificate expired (Jan  1 00:00:00 2020 GMT)'),
        ({"certificates": [{"cert": good_c, "key": good_k}, {"cert": "nope.pem", "key": good_k}]},
         'frontends.www.tls.certificates[1].cert = "nope.pem": no such file'),
    ]
    from procs import to_toml
    for tls, line in cases:
        cfg = lb_config(["127.0.0.1:9"], frontend={"tls": tls})
        (tmp_path / "lb.toml").write_text(to_toml(cfg))
        rc, err = run_cli("check", "--config", "lb.toml", cwd=tmp_path)
        assert (rc, err) == (2, f"foobar-lb: error: lb.toml: {line}\n")
    # the server side: a CA that is not PEM
    cfg = lb_config(["127.0.0.1:9"], backend={"tls": {"ca": "junk.pem"}})
    (tmp_path / "lb.toml").write_text(to_toml(cfg))
    assert run_cli("check", "--config", "lb.toml", cwd=tmp_path) == (
        2, 'foobar-lb: error: lb.toml: backends.app.tls.ca = "junk.pem": not a PEM certificate\n')
    # a lower version is a configuration error
    cfg = lb_config(["127.0.0.1:9"], frontend={"tls": {"cert": good_c, "key": good_k,
                                                       "min_version": "1.1"}})
    (tmp_path / "lb.toml").write_text(to_toml(cfg))
    assert run_cli("check", "--config", "lb.toml", cwd=tmp_path) == (
        2, 'foobar-lb: error: lb.toml: frontends.www.tls.min_version = "1.1": expected one of '
           '"1.2", "1.3"\n')
    # the quick form names its options, at start-up (nothing is left running)
    port = free_port()
    assert run_cli("serve", "--bind", f"127.0.0.1:{port}", "--backend", "127.0.0.1:9",
                   "--tls-cert", "missing.pem", "--tls-key", good_k, cwd=tmp_path) == (
        2, 'foobar-lb: error: command line: --tls-cert "missing.pem": no such file\n')
    assert run_cli("serve", "--bind", f"127.0.0.1:{port}", "--backend", "127.0.0.1:9",
                   "--tls-cert", good_c, "--tls-key", other_k, cwd=tmp_path) == (
        2, f'foobar-lb: error: command line: --tls-key "{other_k}": does not match the '
           f'certificate "{good_c}"\n')


async def read_response(r: asyncio.StreamReader) -> bytes:
    """One response with a Content-Length body."""
    async with asyncio.timeout(5):
        head = await r.readuntil(b"\r\n\r\n")
        n = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                n = int(line.split(b":")[1])
        return head + await r.readexactly(n)


@pytest.mark.slow
async def test_reload_swaps_the_certificate_and_keeps_open_connections(tmp_path, ca):
    first = ca.issue_cert("localhost")
    second = ca.issue_cert("localhost", organization_name="second")
    write_pair(first, tmp_path, "site")
    async with ScriptedServer("a") as a:
        port = free_port()
        cfg = lb_config([a.address], frontend={"bind": [f"{LOOPBACK}:{port}"],
                                               "tls": {"cert": "site.pem", "key": "site.key"}})
        async with LbProcess(tmp_path, cfg) as lb:
            ctx = client_ctx(ca)
            r, w = await asyncio.open_connection(LOOPBACK, port, ssl=ctx,
                                                 server_hostname="localhost")
            try:
                assert w.get_extra_info("ssl_object").getpeercert(True) == der(first)
                w.write(b"GET /1 HTTP/1.1\r\nHost: localhost\r\n\r\n")
                assert (await read_response(r)).startswith(b"HTTP/1.1 200 OK\r\n")
                write_pair(second, tmp_path, "site")
                rc, _out, err = await lb.reload()
                assert rc == 0, err
                # the connection opened before: still served (by the old generation, which
                # says it closes after this response)
                w.write(b"GET /2 HTTP/1.1\r\nHost: localhost\r\n\r\n")
                got = await read_response(r)
                assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"a GET /2\n")
            finally:
                w.close()
            data, peer = await https_get(port, ctx)
            assert data.startswith(b"HTTP/1.1 200 OK\r\n") and peer == der(second)
            # a broken file on reload: refused in one line, the running certificate stays
            (tmp_path / "site.key").write_text("junk\n")
            rc, _out, err = await lb.reload()
            assert (rc, err) == (2, f'foobar-lb: error: {lb.config}: frontends.www.tls.key = '
                                    f'"site.key": not a PEM private key\n')
            data, peer = await https_get(port, ctx)
            assert data.startswith(b"HTTP/1.1 200 OK\r\n") and peer == der(second)


# ---------------------------------------------------------------------------------------------
# TLS to servers


class TlsServer(ScriptedServer):
    """A ScriptedServer behind TLS with `cert` (a trustme leaf). `handshakes`: completed ones."""

    def __init__(self, name: str, cert: trustme.LeafCert):
        super().__init__(name)
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        cert.configure_cert(self.ctx)

    async def start(self, port: int = 0) -> TlsServer:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _ServerConn(self), self.host, port,
                                               ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self


async def http_keepalive(port: int, paths: list[str]) -> list[bytes]:
    r, w = await asyncio.open_connection(LOOPBACK, port)
    out = []
    try:
        for p in paths:
            w.write(f"GET {p} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            out.append(await read_response(r))
    finally:
        w.close()
    return out


async def test_tls_to_servers_verifies_and_reuses_pooled_connections(tmp_path, ca):
    stranger = trustme.CA()  # another CA: its server must not be taken for ours
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    async with TlsServer("good", ca.issue_cert("127.0.0.1")) as good, \
            TlsServer("bad", stranger.issue_cert("127.0.0.1")) as bad:
        cfg = lb_config([bad.address, good.address],
                        backend={"tls": {"ca": str(tmp_path / "ca.pem")}})
        async with running_lb(cfg) as lb:
            got = await http_keepalive(lb.address[1], [f"/{i}" for i in range(6)])
        # every request was served by the good server: the bad one failed its connects
        # (retried on the good one), never a silent success
        assert [g.split(b"\r\n\r\n", 1)[1] for g in got] == [
            f"good GET /{i}\n".encode() for i in range(6)]
        assert bad.requests == []
        # pooled TLS connections reused: one connection carried them all
        assert good.connections == 1
        assert {r.conn_id for r in good.requests} == {1}
        assert ("x-forwarded-proto", "http") in good.requests[0].headers


async def test_tls_to_a_server_from_another_ca_is_a_503(tmp_path, ca):
    stranger = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    async with TlsServer("bad", stranger.issue_cert("127.0.0.1")) as bad:
        cfg = lb_config([bad.address], backend={"retries": 1, "tls": {
            "ca": str(tmp_path / "ca.pem")}})
        async with running_lb(cfg) as lb:
            got = await http_keepalive(lb.address[1], ["/"])
        assert got[0].startswith(b"HTTP/1.1 503 ")
        assert bad.requests == []
        # verify = false, said explicitly: the same server is used
        cfg = lb_config([bad.address], backend={"tls": {"verify": False}})
        async with running_lb(cfg) as lb:
            got = await http_keepalive(lb.address[1], ["/"])
        assert got[0].endswith(b"\r\n\r\nbad GET /\n")


async def test_tls_sni_name_checks_and_tcp_mode(tmp_path, ca):
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    async with TlsServer("named", ca.issue_cert("app.internal")) as named:
        tls = {"ca": str(tmp_path / "ca.pem"), "sni": "app.internal"}
        async with running_lb(lb_config([named.address], backend={"tls": tls})) as lb:
            got = await http_keepalive(lb.address[1], ["/a"])
        assert got[0].endswith(b"\r\n\r\nnamed GET /a\n")
        # without the name, the address does not match the certificate: refused
        tls = {"ca": str(tmp_path / "ca.pem")}
        async with running_lb(lb_config([named.address], backend={"tls": tls})) as lb:
            got = await http_keepalive(lb.address[1], ["/a"])
        assert got[0].startswith(b"HTTP/1.1 503 ")
        # TCP mode: the bytes relayed over TLS to the server
        tls = {"ca": str(tmp_path / "ca.pem"), "sni": "app.internal"}
        async with running_lb(lb_config([named.address], mode="tcp",
                                        backend={"tls": tls})) as lb:
            got = await http_keepalive(lb.address[1], ["/t"])
        assert got[0].endswith(b"\r\n\r\nnamed GET /t\n")
    assert len(named.requests) == 2


async def test_checks_use_tls(tmp_path, ca):
    stranger = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    check = {"inter": "100ms", "rise": 1, "fall": 1, "timeout": "500ms", "path": "/health"}
    async with TlsServer("good", ca.issue_cert("127.0.0.1")) as good, \
            TlsServer("bad", stranger.issue_cert("127.0.0.1")) as bad:
        cfg = lb_config({"app": [{"name": "good", "address": good.address},
                                 {"name": "bad", "address": bad.address}]},
                        backend={"check": check, "tls": {"ca": str(tmp_path / "ca.pem")}})
        async with running_lb(cfg) as lb:
            for _ in range(100):
                if (lb.server("app", "bad").state.value == "down"
                        and any(r.url == "/health" for r in good.requests)):
                    break
                await asyncio.sleep(0.05)
            assert lb.server("app", "bad").state.value == "down"
            assert lb.server("app", "good").state.value == "up"
    assert [r.url for r in good.requests][:1] == ["/health"]
    assert bad.requests == []


# ---------------------------------------------------------------------------------------------
# Mutual TLS


@pytest.mark.parametrize("verify", ["required", "optional"])
async def test_mutual_tls(tmp_path, ca, verify):
    cert, key = write_pair(ca.issue_cert("localhost"), tmp_path, "site")
    client_ca = trustme.CA()
    client_ca.cert_pem.write_to_path(str(tmp_path / "clients.pem"))
    alice = client_ca.issue_cert("alice.test", common_name="alice", organization_name="Example",
                                 organization_unit_name="Ops")
    async with ScriptedServer("a") as a:
        cfg = lb_config([a.address], frontend={"tls": {
            "cert": cert, "key": key, "client_ca": str(tmp_path / "clients.pem"),
            "verify_client": verify}})
        async with running_lb(cfg) as lb:
            port = lb.address[1]
            with_cert = client_ctx(ca)
            alice.configure_cert(with_cert)
            # a client certificate: served, its subject passed on (and a forged one dropped,
            # on the simple path and the full one alike)
            for extra in ("", "X-Client-Cert-Subject: CN=mallory\r\n"):
                r, w = await asyncio.open_connection(LOOPBACK, port, ssl=with_cert,
                                                     server_hostname="localhost")
                w.write(f"GET /m HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode())
                assert (await read_response(r)).endswith(b"\r\n\r\na GET /m\n")
                w.close()
            # a certificate from another CA: refused whatever verify_client says
            stranger = client_ctx(ca)
            trustme.CA().issue_cert("eve.test").configure_cert(stranger)
            try:
                data, _ = await https_get(port, stranger)
            except REFUSED:
                data = b""
            assert data == b""
            # no certificate at all
            try:
                data, _ = await https_get(port, client_ctx(ca))
            except REFUSED:
                data = b""
            if verify == "required":
                assert data == b""  # (TLS 1.3: refused after the client's handshake ended)
            else:
                assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    subjects = [[v for n, v in r.headers if n == "x-client-cert-subject"] for r in a.requests]
    want = [["O=Example,OU=Ops,CN=alice"]] * 2
    assert subjects == (want if verify == "required" else [*want, []])


async def test_the_handshake_counts_against_http_request(tmp_path, ca):
    cert, key = write_pair(ca.issue_cert("localhost"), tmp_path, "site")
    async with ScriptedServer("s") as s:
        cfg = lb_config([s.address], frontend={"tls": {"cert": cert, "key": key},
                                               "timeout": {"http_request": "300ms"}})
        async with running_lb(cfg) as lb:
            loop = asyncio.get_running_loop()
            r, w = await asyncio.open_connection(LOOPBACK, lb.address[1])
            t0 = loop.time()
            w.write(b"\x16\x03\x01")  # the start of a ClientHello, never finished
            async with asyncio.timeout(5):
                assert await r.read() == b""  # closed, without a byte
            assert 0.25 <= loop.time() - t0 < 3
            w.close()


async def test_a_client_certificate_to_servers(tmp_path, ca):
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    lb_cert, lb_key = write_pair(ca.issue_cert("lb.internal"), tmp_path, "lb")
    async with TlsServer("app", ca.issue_cert("127.0.0.1")) as app:
        app.ctx.verify_mode = ssl.CERT_REQUIRED  # the server wants ours
        ca.configure_trust(app.ctx)
        tls = {"ca": str(tmp_path / "ca.pem")}
        async with running_lb(lb_config([app.address], backend={"retries": 0, "tls": tls})) as lb:
            got = await http_keepalive(lb.address[1], ["/no"])
        assert got[0].startswith(b"HTTP/1.1 50")  # refused by the server: no response
        tls = {**tls, "cert": lb_cert, "key": lb_key}
        async with running_lb(lb_config([app.address], backend={"tls": tls})) as lb:
            got = await http_keepalive(lb.address[1], ["/yes"])
        assert got[0].endswith(b"\r\n\r\napp GET /yes\n")
    assert [r.url for r in app.requests] == ["/yes"]


@pytest.mark.slow
async def test_quick_form_serves_https(tmp_path, ca):
    cert, key = write_pair(ca.issue_cert("localhost"), tmp_path, "site")
    async with ScriptedServer("q") as q:
        port = free_port()
        lb = LbProcess(tmp_path, None, "--bind", f"{LOOPBACK}:{port}", "--backend", q.address,
                       "--tls-cert", cert, "--tls-key", key)
        async with lb:
            data, _ = await https_get(port, client_ctx(ca), path="/quick")
    assert data.startswith(b"HTTP/1.1 200 OK\r\n") and data.endswith(b"q GET /quick\n")
    assert ("x-forwarded-proto", "https") in q.requests[0].headers


async def test_redirect_answers_pipelined_requests_and_closes_after_an_upgrade():
    async with running_lb(lb_config(["127.0.0.1:9"], frontend={"redirect_https": True})) as lb:
        port = lb.address[1]
        r, w = await asyncio.open_connection(LOOPBACK, port)
        w.write(b"GET /a HTTP/1.1\r\nHost: h\r\n\r\nGET /b HTTP/1.1\r\nHost: h\r\n\r\n")
        async with asyncio.timeout(5):
            got = await r.readexactly(2 * len(b"HTTP/1.1 301 Moved Permanently\r\nlocation: "
                                              b"https://h/a\r\ncontent-length: 0\r\n\r\n"))
        assert got == (b"HTTP/1.1 301 Moved Permanently\r\nlocation: https://h/a\r\n"
                       b"content-length: 0\r\n\r\nHTTP/1.1 301 Moved Permanently\r\n"
                       b"location: https://h/b\r\ncontent-length: 0\r\n\r\n")
        w.close()
        r, w = await asyncio.open_connection(LOOPBACK, port)
        w.write(b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\n\r\n")
        async with asyncio.timeout(5):
            got = await r.read()  # to the close
        w.close()
        assert got == (b"HTTP/1.1 301 Moved Permanently\r\nlocation: https://h/ws\r\n"
                       b"content-length: 0\r\n\r\n")
        # no Host: 400, closed
        assert await raw(port, b"GET / HTTP/1.1\r\n\r\n") == (
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
async def test_a_root_only_key_serves_with_workers_as_nobody(tmp_path, ca):
    """Workers read the TLS files before they give up root (global.user)."""
    cert, key = write_pair(ca.issue_cert("localhost"), tmp_path, "site")
    os.chmod(key, 0o600)  # root's alone, as keys usually are
    os.chmod(tmp_path, 0o777)
    async with ScriptedServer("a") as a:
        port = free_port()
        cfg = lb_config([a.address], frontend={"bind": [f"{LOOPBACK}:{port}"],
                                               "tls": {"cert": cert, "key": key}})
        cfg["global"] = {"user": "nobody", "group": "nogroup"}
        async with LbProcess(tmp_path, cfg) as lb:
            assert len(lb.workers()) == 1
            data, _ = await https_get(port, client_ctx(ca))
            assert data.startswith(b"HTTP/1.1 200 OK\r\n")
            rc, _out, err = await lb.reload()  # the new workers too
            assert rc == 0, err
            data, _ = await https_get(port, client_ctx(ca))
            assert data.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_tls_termination_in_tcp_mode(tmp_path, ca, caplog):
    cert, key = write_pair(ca.issue_cert("localhost"), tmp_path, "site")
    async with ScriptedServer("t") as t:
        cfg = lb_config([t.address], mode="tcp", frontend={"tls": {"cert": cert, "key": key}})
        async with running_lb(cfg) as lb:
            r, w = await asyncio.open_connection(LOOPBACK, lb.address[1], ssl=client_ctx(ca),
                                                 server_hostname="localhost")
            w.write(b"GET /tcp HTTP/1.1\r\nHost: localhost\r\n\r\n")
            got = await read_response(r)
            w.close()
            await w.wait_closed()
            await asyncio.sleep(0.1)  # (the proxy sees the client's close_notify)
    # the bytes relayed as they are: nothing added in tcp mode
    assert got == b"HTTP/1.1 200 OK\r\nX-Server: t\r\nContent-Length: 11\r\n\r\nt GET /tcp\n"
    assert t.requests[0].headers == [("Host", "localhost")]
    assert [r.getMessage() for r in caplog.records if r.levelname != "INFO"] == []


async def test_a_tls_client_closing_with_a_request_in_flight(tmp_path, ca, caplog):
    cert, key = write_pair(ca.issue_cert("localhost"), tmp_path, "site")

    async def slow(req) -> bytes:
        await asyncio.sleep(0.5)
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async with ScriptedServer("s", slow) as s:
        cfg = lb_config([s.address], frontend={"tls": {"cert": cert, "key": key}})
        async with running_lb(cfg) as lb:
            _r, w = await asyncio.open_connection(LOOPBACK, lb.address[1], ssl=client_ctx(ca),
                                                  server_hostname="localhost")
            w.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            for _ in range(100):
                if s.requests:
                    break
                await asyncio.sleep(0.01)
            assert s.requests  # the request is at the server, its response owed
            w.close()  # close_notify
            for _ in range(100):
                if not lb.serving.sessions:
                    break
                await asyncio.sleep(0.01)
            assert not lb.serving.sessions  # the connection is gone, nothing leaked
    assert [r.getMessage() for r in caplog.records if r.levelname != "INFO"] == []


async def _tls_after_proxy(port: int, ctx: ssl.SSLContext, proxy: bytes) -> bytes:
    """A PROXY header, then TLS on the same connection, one request: all bytes until close."""
    r, w = await asyncio.wait_for(asyncio.open_connection(LOOPBACK, port), 5)
    try:
        w.write(proxy)
        await w.drain()
        await asyncio.wait_for(w.start_tls(ctx, server_hostname="localhost"), 5)
        w.write(b"GET /p HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        return await asyncio.wait_for(r.read(), 5)
    finally:
        w.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_a_proxy_header_before_tls(tmp_path, ca, version):
    """accept_proxy on an HTTPS frontend: the header is read from the socket first, exactly,
    then the TLS handshake; the header's client is the one X-Forwarded-For names."""
    from foobar_lb.proxy.proxyproto import header

    cert, key = write_pair(ca.issue_cert("localhost"), tmp_path, "site")
    async with ScriptedServer("a") as a:
        cfg = lb_config([a.address], frontend={"tls": {"cert": cert, "key": key},
                                               "accept_proxy": {"from": ["127.0.0.1/32"]}})
        async with running_lb(cfg) as lb:
            port = lb.address[1]
            proxy = header(version, ("192.0.2.7", 4321), (LOOPBACK, port))
            data = await _tls_after_proxy(port, client_ctx(ca), proxy)
            assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data
            (req,) = a.requests
            assert ("X-Forwarded-For", "192.0.2.7") in req.headers
            assert ("x-forwarded-proto", "https") in req.headers
            # a header without addresses (LOCAL / UNKNOWN): the peer's address stands
            data = await _tls_after_proxy(port, client_ctx(ca), header(version, None, None))
            assert data.startswith(b"HTTP/1.1 200 OK\r\n"), data
            assert ("X-Forwarded-For", LOOPBACK) in a.requests[1].headers
            # no header from a source that must send one: closed, no server touched
            with pytest.raises((*REFUSED, OSError)):
                await https_get(port, client_ctx(ca))
            assert len(a.requests) == 2
