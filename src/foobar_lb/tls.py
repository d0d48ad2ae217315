"""TLS: SSL contexts from the configuration, their checks, and the plain-HTTP redirect to HTTPS.

Rule of this module: it owns every `ssl.SSLContext` the load balancer uses (a frontend's, with
its SNI choice among certificates, and the client contexts to servers) and the checks of the
files they read (missing, not PEM, a key not matching its certificate, an expired certificate),
each a one-line `TlsError` naming the key path and the file. Contexts are built from the
configuration where they are used (each worker generation builds its own, before it gives up
root, so a reload re-reads the files); the master only checks them. Refused handshakes are
counted and logged here (the event loop drops them silently). It parses no HTTP except the
redirect's, and it never binds or accepts a socket.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import httptools

from .config import Config, FrontendConfig, ServerTls, TlsCert, TlsConfig

__all__ = [
    "CIPHERS",
    "RedirectSession",
    "Refusals",
    "TlsError",
    "check_config",
    "client_subject_line",
    "frontend_context",
    "preload",
    "server_context",
]

# Mozilla's "intermediate" TLS 1.2 list: forward secrecy and AEAD only (TLS 1.3 suites are
# OpenSSL's own, all modern)
CIPHERS = ":".join((
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
    "DHE-RSA-AES128-GCM-SHA256", "DHE-RSA-AES256-GCM-SHA384",
))
log = logging.getLogger("foobar_lb.tls")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsError(ValueError):
    """A TLS file that cannot be used: `path` is its key path, `file` the file named there."""

    def __init__(self, path: str, file: str, reason: str):
        self.path = path
        self.file = file
        self.reason = reason
        super().__init__(f'{path} = "{file}": {reason}')


# ---------------------------------------------------------------------------------------------
# Reading and checking files


def _read(path: str, file: str) -> bytes:
    try:
        with open(file, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise TlsError(path, file, "no such file") from None
    except OSError as e:
        raise TlsError(path, file, f"cannot read: {(e.strerror or str(e)).lower()}") from None


def _check_cert(path: str, file: str) -> dict:
    """The certificate's decoded fields (subjectAltName, notAfter); TlsError if it cannot be
    used: not PEM, or expired."""
    data = _read(path, file)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TlsError(path, file, "not a PEM certificate")
    try:
        info = ssl._ssl._test_decode_cert(file)  # (CPython's own decoder; no dependency)
    except (ssl.SSLError, OSError, ValueError):
        raise TlsError(path, file, "not a PEM certificate") from None
    not_after = info.get("notAfter")
    if not_after and ssl.cert_time_to_seconds(not_after) < time.time():
        raise TlsError(path, file, f"certificate expired ({not_after})")
    return info


def _check_key(path: str, file: str) -> None:
    data = _read(path, file)
    if b"-----BEGIN" not in data or b"PRIVATE KEY-----" not in data:
        raise TlsError(path, file, "not a PEM private key")


def _load_pair(ctx: ssl.SSLContext, pair_path: str, cert: str, key: str,
               cert_key: str = "cert", key_key: str = "key") -> dict:
    info = _check_cert(f"{pair_path}.{cert_key}", cert)
    _check_key(f"{pair_path}.{key_key}", key)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as e:
        if "KEY_VALUES_MISMATCH" in str(e) or "key values mismatch" in str(e):
            raise TlsError(f"{pair_path}.{key_key}", key,
                           f'does not match the certificate "{cert}"') from None
        raise TlsError(f"{pair_path}.{key_key}", key,
                       f"cannot load with \"{cert}\": {e.reason or e}") from None
    return info


def _load_ca(ctx: ssl.SSLContext, path: str, file: str) -> None:
    data = _read(path, file)
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TlsError(path, file, "not a PEM certificate")
    try:
        ctx.load_verify_locations(cafile=file)
    except ssl.SSLError:
        raise TlsError(path, file, "not a PEM certificate") from None


# ---------------------------------------------------------------------------------------------
# Frontends: HTTPS termination


def _base_server_context(tls: TlsConfig) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.set_ciphers(CIPHERS)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if tls.client_ca is not None:
        _load_ca(ctx, f"{tls.path}.client_ca", tls.client_ca)
        ctx.verify_mode = (ssl.CERT_REQUIRED if tls.verify_client == "required"
                           else ssl.CERT_OPTIONAL)
    return ctx


def _names(info: dict) -> list[str]:
    return [v.lower() for k, v in info.get("subjectAltName", ()) if k == "DNS"]


def _pair_paths(tls: TlsConfig, pair: TlsCert) -> str:
    return pair.path or tls.path


class Refusals:
    """Handshakes of one frontend: completed ones counted, refused ones counted (`count`) and
    logged, at most one line a second (with how many were refused since the last line), so a
    flood cannot flood the log. The counts are cells of the shared counters (`ctr[ok]`,
    `ctr[failed]`, see shared.F_TLS_*) when given, else private."""

    __slots__ = ("ctr", "failed", "frontend", "last_log", "logged", "ok")

    def __init__(self, frontend: str, ctr=None, ok: int = 0, failed: int = 1):
        self.frontend = frontend
        self.ctr = ctr if ctr is not None else memoryview(bytearray(16)).cast("q")
        self.ok = ok
        self.failed = failed
        self.logged = 0  # `count` at the last line
        self.last_log = 0.0

    @property
    def count(self) -> int:
        """Handshakes refused (by this process)."""
        return self.ctr[self.failed]

    def completed(self) -> None:
        self.ctr[self.ok] += 1

    def refused(self, e: ssl.SSLError) -> None:
        self.ctr[self.failed] += 1
        now = time.monotonic()
        if now - self.last_log >= 1.0:
            n = self.count - self.logged
            more = f" ({n - 1} more since the last line)" if n > 1 else ""
            log.info("frontend %s: TLS handshake refused: %s%s", self.frontend,
                     e.reason or e.__class__.__name__, more)
            self.last_log = now
            self.logged = self.count


def _counting_sslobject(refusals: Refusals) -> type[ssl.SSLObject]:
    """An SSLObject class whose handshakes are told to `refusals`: completed ones, and failed
    ones (the event loop's TLS transport drops them silently otherwise)."""

    def do_handshake(self) -> None:
        try:
            ssl.SSLObject.do_handshake(self)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise
        except ssl.SSLError as e:
            refusals.refused(e)
            raise
        refusals.completed()

    return type("CountingSSLObject", (ssl.SSLObject,), {"do_handshake": do_handshake})


def frontend_context(tls: TlsConfig, refusals: Refusals | None = None) -> ssl.SSLContext:
    """The server context of a frontend: the first certificate by default, the others chosen
    by the SNI name (exact names first, then `*.` wildcards, one label deep). With `refusals`,
    refused handshakes are counted and logged there."""
    ctx = _preloaded.get(tls)
    if ctx is not None:
        if refusals is not None:
            ctx.sslobject_class = _counting_sslobject(refusals)
        return ctx
    contexts: list[tuple[ssl.SSLContext, dict]] = []
    for pair in tls.certificates:
        ctx = _base_server_context(tls)
        info = _load_pair(ctx, _pair_paths(tls, pair), pair.cert, pair.key)
        contexts.append((ctx, info))
    default = contexts[0][0]
    if refusals is not None:  # (the class is fixed when the connection's object is made)
        default.sslobject_class = _counting_sslobject(refusals)
    if len(contexts) == 1:
        return default
    exact: dict[str, ssl.SSLContext] = {}
    wild: dict[str, ssl.SSLContext] = {}
    for ctx, info in contexts:
        for name in _names(info):
            if name.startswith("*."):
                wild.setdefault(name[1:], ctx)  # ".example.com"
            else:
                exact.setdefault(name, ctx)

    def choose(sslobj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        if not name:
            return None
        name = name.lower().rstrip(".")
        ctx = exact.get(name)
        if ctx is None:
            dot = name.find(".")
            ctx = wild.get(name[dot:]) if dot > 0 else None
        if ctx is not None and ctx is not default:
            sslobj.context = ctx
        return None

    default.sni_callback = choose
    return default


_SUBJECT_KEYS = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                 "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
                 "emailAddress": "emailAddress", "domainComponent": "DC"}


def client_subject_line(transport: asyncio.BaseTransport) -> bytes:
    """The `X-Client-Cert-Subject` line for the verified client certificate of a connection
    ("O=Example,CN=alice" in the certificate's order), or b"" without one. (Only a verified
    certificate is seen: OpenSSL refused the handshake otherwise.)"""
    cert = transport.get_extra_info("peercert")
    if not cert:
        return b""
    parts = [f"{_SUBJECT_KEYS.get(k, k)}={v}" for rdn in cert.get("subject", ()) for k, v in rdn]
    text = "".join(c for c in ",".join(parts) if c >= " " and c != "\x7f")
    return b"x-client-cert-subject: %s\r\n" % text.encode("utf-8") if text else b""


# ---------------------------------------------------------------------------------------------
# Servers: TLS to them


def server_context(tls: ServerTls) -> ssl.SSLContext:
    """A client context to servers: verified against `ca` (or the system's CAs) unless
    `verify = false` was said; with a client certificate if `cert`/`key` are given."""
    pre = _preloaded.get(tls)
    if pre is not None:
        return pre
    if tls.verify:
        ctx = ssl.create_default_context()
        if tls.ca is not None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            _load_ca(ctx, f"{tls.path}.ca", tls.ca)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert is not None and tls.key is not None:
        _load_pair(ctx, tls.path, tls.cert, tls.key)
    return ctx


# ---------------------------------------------------------------------------------------------
# The whole configuration, checked (start-up, `check`, reload)

# contexts built ahead by `preload` (a worker, before it gives up root for global.user: key
# files are often readable by root alone), by the configuration object they come from
_preloaded: dict[TlsConfig | ServerTls, ssl.SSLContext] = {}


def preload(config: Config) -> None:
    """Build every context of `config` now (reading the files with this process's rights);
    `frontend_context` and `server_context` hand these out afterwards. For a worker process,
    which serves one configuration only."""
    for fe in config.frontends.values():
        if fe.tls is not None:
            _preloaded[fe.tls] = frontend_context(fe.tls)
    for be in config.backends.values():
        for srv in be.servers:
            if srv.tls is not None and srv.tls not in _preloaded:
                _preloaded[srv.tls] = server_context(srv.tls)



def check_config(config: Config) -> str | None:
    """The first TLS file that cannot be used, as a one-line error, or None. (Builds every
    context once and throws it away.)"""
    try:
        for fe in config.frontends.values():
            if fe.tls is not None:
                frontend_context(fe.tls)
        seen: set[ServerTls] = set()
        for be in config.backends.values():
            for s in be.servers:
                if s.tls is not None and s.tls not in seen:
                    seen.add(s.tls)
                    server_context(s.tls)
    except TlsError as e:
        if config.source is None:  # the quick form: name the option
            option = {"frontends.main.tls.cert": "--tls-cert",
                      "frontends.main.tls.key": "--tls-key"}.get(e.path, e.path)
            return f'command line: {option} "{e.file}": {e.reason}'
        return f"{config.source}: {e}"
    return None


# ---------------------------------------------------------------------------------------------
# Plain HTTP to HTTPS


class RedirectSession(asyncio.Protocol):
    """A plain-HTTP frontend with `redirect_https`: every request gets a 301 to the same host,
    path and query over https; nothing reaches a server. Idle for `timeout http_keep_alive`
    (or `http_request` before the first request), the connection closes."""

    def __init__(self, lb, fe):
        cfg: FrontendConfig = fe.cfg
        self.loop = lb.loop
        self.closing = False
        self.port = cfg.redirect_https or 443
        self.idle = cfg.timeouts.http_keep_alive or 86400.0
        self.first = cfg.timeouts.http_request or 86400.0
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.host: bytes | None = None
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.timer = self.loop.call_later(self.first, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.parser = None

    def data_received(self, data: bytes) -> None:
        if self.parser is None:
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = self.loop.call_later(self.idle, self.transport.close)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # answered (301); what follows is not HTTP
            self.parser = None
            self.transport.close()
        except httptools.HttpParserError:
            self._answer(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                         b"connection: close\r\n\r\n", close=True)

    def on_message_begin(self) -> None:
        self.url = b""
        self.host = None

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"host" and self.host is None:
            self.host = value.strip()

    def on_message_complete(self) -> None:
        from .proxy.http.head import good_host

        url, host = self.url, self.host
        if url[:1] != b"/":  # absolute form: the authority is the host
            scheme_end = url.find(b"://")
            rest = url[scheme_end + 3:] if scheme_end > 0 else b""
            slash = rest.find(b"/")
            host, url = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
        if not host or not good_host(host.lower()):
            self._answer(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n"
                         b"connection: close\r\n\r\n", close=True)
            return
        name = host[:host.find(b"]") + 1] if host.startswith(b"[") else host.rsplit(b":", 1)[0]
        port = b"" if self.port == 443 else b":%d" % self.port
        keep = self.parser.should_keep_alive() and not self.closing
        self._answer(b"HTTP/1.1 301 Moved Permanently\r\nlocation: https://%s%s%s\r\n"
                     b"content-length: 0\r\n%s\r\n"
                     % (name, port, url, b"" if keep else b"connection: close\r\n"),
                     close=not keep)

    def drain(self) -> None:
        """The next answer closes the connection."""
        self.closing = True

    shutdown = drain

    def _answer(self, data: bytes, close: bool) -> None:
        t = self.transport
        if t is None or t.is_closing():
            return
        t.write(data)
        if close:
            self.parser = None
            t.close()
