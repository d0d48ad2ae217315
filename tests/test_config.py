"""Configuration: TOML in, frozen typed objects out, and one clear line for every mistake.

The bad files go through the real command line (`python -m foobar_lb check --config FILE`):
exit status 2, exactly one line on stderr naming the key path, the bad value and what was
expected, nothing on stdout, never a traceback.
"""

from __future__ import annotations

import ast
import dataclasses
import ipaddress
import math
import socket
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

from foobar_lb import ConfigError, load_config, parse_config
from foobar_lb import config as config_module
from foobar_lb.config import (
    Address,
    ForwardFor,
    HeaderRules,
    Limits,
    Rule,
    ServerConfig,
    Timeouts,
)
from foobar_lb.units import (
    DURATION_EXPECTED,
    SIZE_EXPECTED,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

PREFIX = "foobar-lb: error: "
DURATION = 'expected a duration string with a unit, like "500ms", "2s", "1m" or "1h"'
SIZE = 'expected a size in bytes or a string with a unit, like 16384, "16k" or "10m"'
SERVER_ADDRESS = 'expected a server address "host:port" with a port from 1 to 65535'
HEADER_NAME = "expected an HTTP header name (letters, digits and !#$%&'*+-.^_`|~)"
COMMAND = 'expected a command line: a list of strings like ["{python}", "-m", "foobar_app", "serve"]'


def run_lb(*args: str, cwd: Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "foobar_lb", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def assert_one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    """Exit 2, nothing on stdout, one line on stderr and no traceback; returns that line."""
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert r.stderr.endswith("\n")
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Bad files: (id, file content or None for no file, the expected stderr line with {file})

FE = '[frontends.web]\nbind = "127.0.0.1:8080"\ndefault_backend = "app"\n'
BE = '[backends.app]\nservers = [{ name = "a", address = "127.0.0.1:9001" }]\n'


def server(extra: str) -> str:
    """A valid frontend and a backend whose one server has `extra` in its inline table."""
    return FE + f"[backends.app]\nservers = [{{ {extra} }}]\n"


BAD_FILES: list[tuple[str, str | bytes | None, str]] = [
    ("toml-syntax", '[frontends.web]\nbind = 127.0.0.1:8080\n',
     "{file}: invalid TOML: Expected newline or end of document after a statement "
     "(at line 2, column 13)"),
    ("toml-unclosed-array", "frontends = [\n",
     "{file}: invalid TOML: Invalid value (at end of document)"),
    ("missing-file", None, "{file}: no such file"),
    ("not-utf8", b"\xff\xfe[frontends]\n",
     "{file}: cannot read: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
    ("unknown-top-level-key", "frontend = {}\n" + FE + BE,
     "{file}: frontend: unknown key; expected one of global, defaults, frontends, backends, admin, "
     "alerts, log, metrics"),
    # the access log (issue 13)
    ("log-unknown-key", '[log]\nacces = "stdout"\n' + FE + BE,
     "{file}: log.acces: unknown key; expected one of access, format, buffer, syslog_format"),
    ("log-format", '[log]\naccess = "stdout"\nformat = "xml"\n' + FE + BE,
     '{file}: log.format = "xml": expected one of "text", "json"'),
    ("log-syslog-without-port", '[log]\naccess = "syslog:loghost"\n' + FE + BE,
     '{file}: log.access = "syslog:loghost": expected "stdout", "stderr", a file path, or '
     '"syslog:HOST:PORT" (like "syslog:127.0.0.1:514")'),
    ("log-access-empty", '[log]\naccess = ""\n' + FE + BE,
     '{file}: log.access = "": expected "stdout", "stderr", a file path, or '
     '"syslog:HOST:PORT" (like "syslog:127.0.0.1:514")'),
    ("log-access-directory", '[log]\naccess = "/var/log/"\n' + FE + BE,
     '{file}: log.access = "/var/log/": expected a file path, not a directory (or "stdout", '
     '"stderr", a file path, or "syslog:HOST:PORT" (like "syslog:127.0.0.1:514"))'),
    ("log-buffer-tiny", '[log]\naccess = "stdout"\nbuffer = 10\n' + FE + BE,
     "{file}: log.buffer = 10: expected a size from 256 bytes to 1g"),
    ("log-syslog-format", '[log]\naccess = "syslog:127.0.0.1:514"\nsyslog_format = "gelf"\n'
     + FE + BE, '{file}: log.syslog_format = "gelf": expected one of "rfc5424", "rfc3164"'),
    ("unknown-frontend-key", '[frontends.web]\nbnd = "127.0.0.1:8080"\ndefault_backend = "app"\n' + BE,
     "{file}: frontends.web.bnd: unknown key; expected one of bind, mode, default_backend, rules, "
     "timeout, limits, forwardfor, forwarded_proto, request_headers, response_headers, "
     "reject_underscore_headers, allow, deny, trusted_proxies, accept_proxy, rate_limit, "
     "max_client_connections, tls, hsts, redirect_https"),
    # TLS (issue 12): the configuration's own checks; the files' checks are in test_tls.py
    ("tls-both-forms", FE + 'tls = { cert = "a.pem", key = "a.key", certificates = [] }\n' + BE,
     "{file}: frontends.web.tls.certificates: give either cert/key or certificates"),
    ("tls-verify-client-without-ca",
     FE + 'tls = { cert = "a.pem", key = "a.key", verify_client = "optional" }\n' + BE,
     '{file}: frontends.web.tls.client_ca: missing; expected a PEM CA file (verify_client is '
     '"optional")'),
    ("server-tls-cert-without-key", server('address = "127.0.0.1:9001", tls = { cert = "c.pem" }'),
     "{file}: backends.app.servers[0].tls.key: missing; cert and key go together"),
    ("redirect-on-tls", FE + 'tls = { cert = "a.pem", key = "a.key" }\nredirect_https = true\n'
     + BE, "{file}: frontends.web.redirect_https: only on a plain HTTP frontend (this one has tls)"),
    ("hsts-without-tls", FE + 'hsts = "max-age=1"\n' + BE,
     "{file}: frontends.web.hsts: only on a frontend with tls"),
    ("redirect-in-tcp-mode", FE + 'mode = "tcp"\nredirect_https = true\n' + BE,
     '{file}: frontends.web.redirect_https: only in mode "http"'),
    ("unknown-server-key", server('adress = "127.0.0.1:9001"'),
     "{file}: backends.app.servers[0].adress: unknown key; expected one of name, address, weight, "
     "backup, maxconn, check, command, env, send_proxy, tls"),
    ("backend-timeout-in-frontend", FE + '[frontends.web.timeout]\nconnect = "5s"\n' + BE,
     "{file}: frontends.web.timeout.connect: unknown key; expected one of client, http_request, "
     "http_keep_alive"),
    ("no-frontends", BE, "{file}: frontends: missing; expected a [frontends.NAME] section"),
    ("no-backends", FE, "{file}: backends: missing; expected a [backends.NAME] section"),
    ("missing-bind", '[frontends.web]\ndefault_backend = "app"\n' + BE,
     '{file}: frontends.web.bind: missing; expected a list of addresses like ["127.0.0.1:8080"]'),
    ("bad-bind", '[frontends.web]\nbind = ["127.0.0.1:8080", "localhost"]\ndefault_backend = "app"\n' + BE,
     '{file}: frontends.web.bind[1] = "localhost": expected an address "host:port" with a port from '
     '0 to 65535, like "127.0.0.1:8080", "[::1]:8080" or "*:8080"'),
    ("bind-port-out-of-range", '[frontends.web]\nbind = "127.0.0.1:65536"\ndefault_backend = "app"\n' + BE,
     '{file}: frontends.web.bind[0] = "127.0.0.1:65536": expected an address "host:port" with a port '
     'from 0 to 65535, like "127.0.0.1:8080", "[::1]:8080" or "*:8080"'),
    ("server-without-port", server('address = "127.0.0.1"'),
     '{file}: backends.app.servers[0].address = "127.0.0.1": ' + SERVER_ADDRESS),
    ("server-port-out-of-range", server('address = "127.0.0.1:70000"'),
     '{file}: backends.app.servers[0].address = "127.0.0.1:70000": ' + SERVER_ADDRESS),
    ("server-port-zero", server('address = "127.0.0.1:0"'),
     '{file}: backends.app.servers[0].address = "127.0.0.1:0": ' + SERVER_ADDRESS),
    ("server-without-address", server('name = "a"'),
     '{file}: backends.app.servers[0].address: missing; expected a server address "host:port"'),
    ("no-servers", FE + "[backends.app]\nservers = []\n",
     '{file}: backends.app.servers = []: expected a non-empty list of servers like '
     '[{ address = "127.0.0.1:8081" }]'),
    ("weight-negative", server('address = "127.0.0.1:9001", weight = -1'),
     "{file}: backends.app.servers[0].weight = -1: expected an integer from 0 to 256"),
    ("weight-too-large", server('address = "127.0.0.1:9001", weight = 257'),
     "{file}: backends.app.servers[0].weight = 257: expected an integer from 0 to 256"),
    ("weight-bool", server('address = "127.0.0.1:9001", weight = true'),
     "{file}: backends.app.servers[0].weight = true: expected an integer from 0 to 256"),
    ("weight-string", server('address = "127.0.0.1:9001", weight = "10"'),
     '{file}: backends.app.servers[0].weight = "10": expected an integer from 0 to 256'),
    ("duration-without-unit", FE + BE + "[backends.app.timeout]\nconnect = 5\n",
     "{file}: backends.app.timeout.connect = 5: " + DURATION),
    ("duration-bad-unit", '[defaults.timeout]\nserver = "5 parsecs"\n' + FE + BE,
     '{file}: defaults.timeout.server = "5 parsecs": ' + DURATION),
    ("grace-without-unit", "[global]\ngrace = 10\n" + FE + BE,
     "{file}: global.grace = 10: " + DURATION),
    ("bad-size", FE + '[frontends.web.limits]\nmax_request_body = "lots"\n' + BE,
     '{file}: frontends.web.limits.max_request_body = "lots": ' + SIZE),
    ("size-too-small", FE + "[frontends.web.limits]\nmax_uri = 10\n" + BE,
     "{file}: frontends.web.limits.max_uri = 10: expected a size of at least 64 bytes"),
    ("unknown-balance", FE + BE + 'balance = "fastest"\n',
     '{file}: backends.app.balance = "fastest": expected one of "roundrobin", "static-rr", '
     '"leastconn", "random", "source", "first"'),
    ("unknown-mode", '[defaults]\nmode = "udp"\n' + FE + BE,
     '{file}: defaults.mode = "udp": expected one of "http", "tcp"'),
    ("default-backend-does-not-exist",
     '[frontends.web]\nbind = "127.0.0.1:8080"\ndefault_backend = "ap"\n' + BE,
     '{file}: frontends.web.default_backend = "ap": expected the name of a backend ("app")'),
    ("no-default-backend-nor-rules", '[frontends.web]\nbind = "127.0.0.1:8080"\n' + BE,
     "{file}: frontends.web.default_backend: missing; expected the name of a backend (or some rules)"),
    ("mode-mismatch",
     '[frontends.web]\nbind = "127.0.0.1:8080"\nmode = "tcp"\ndefault_backend = "app"\n' + BE,
     '{file}: frontends.web.default_backend = "app": expected a backend in tcp mode like its '
     'frontend (backends.app.mode is "http")'),
    ("duplicate-server-names",
     FE + '[backends.app]\nservers = [{ name = "a", address = "127.0.0.1:9001" }, '
          '{ name = "a", address = "127.0.0.1:9002" }]\n',
     '{file}: backends.app.servers[1].name = "a": expected a server name not already used by '
     'backends.app.servers[0]'),
    ("duplicate-default-server-name",
     FE + '[backends.app]\nservers = [{ name = "server-2", address = "127.0.0.1:9001" }, '
          '{ address = "127.0.0.1:9002" }]\n',
     '{file}: backends.app.servers[1].name = "server-2": expected a server name not already used by '
     'backends.app.servers[0]'),
    ("rule-without-host-or-path",
     '[frontends.web]\nbind = "127.0.0.1:8080"\nrules = [{ backend = "app" }]\n' + BE,
     "{file}: frontends.web.rules[0]: a rule needs host, path_prefix or both"),
    ("rule-bad-path-prefix",
     '[frontends.web]\nbind = "127.0.0.1:8080"\nrules = [{ path_prefix = "api", backend = "app" }]\n' + BE,
     '{file}: frontends.web.rules[0].path_prefix = "api": expected a path prefix starting with "/"'),
    ("rate-limit-per-zero", FE + 'rate_limit = { requests = 10, per = "0s" }\n' + BE,
     '{file}: frontends.web.rate_limit.per = "0s": expected a duration above 0'),
    ("rate-limit-in-tcp-mode",
     '[frontends.web]\nbind = "127.0.0.1:8080"\nmode = "tcp"\ndefault_backend = "db"\n'
     'rate_limit = { requests = 10 }\n'
     '[backends.db]\nmode = "tcp"\nservers = [{ address = "127.0.0.1:9001" }]\n',
     '{file}: frontends.web.rate_limit: limits requests, so needs mode "http" '
     '(max_client_connections works in tcp mode)'),
    ("rules-in-tcp-mode",
     '[frontends.web]\nbind = "127.0.0.1:8080"\nmode = "tcp"\nrules = [{ host = "a.test", backend = "db" }]\n'
     '[backends.db]\nmode = "tcp"\nservers = [{ address = "127.0.0.1:9001" }]\n',
     '{file}: frontends.web.rules: host and path rules need mode "http"'),
    ("header-rule-bad-name", FE + '[frontends.web.request_headers]\nset = { "X Bad" = "1" }\n' + BE,
     '{file}: frontends.web.request_headers.set."X Bad": invalid name; ' + HEADER_NAME),
    ("header-delete-bad-name", FE + '[frontends.web.response_headers]\ndelete = ["ok", "bad:name"]\n' + BE,
     '{file}: frontends.web.response_headers.delete[1] = "bad:name": ' + HEADER_NAME),
    ("header-bad-value", FE + '[frontends.web.request_headers]\nadd = { X-A = ["ok", " padded"] }\n' + BE,
     '{file}: frontends.web.request_headers.add.X-A[1] = " padded": expected a header value without '
     "control characters or edge spaces"),
    ("bad-section-name", '[frontends."my web"]\nbind = "127.0.0.1:8080"\ndefault_backend = "app"\n' + BE,
     "{file}: frontends.\"my web\": invalid name; expected a name of letters, digits, '-', '_', '.' "
     "or ':' (at most 64)"),
    ("bad-forwardfor-network", FE + '[frontends.web.forwardfor]\nexcept = ["nonsense"]\n' + BE,
     '{file}: frontends.web.forwardfor.except[0] = "nonsense": expected a network like "10.0.0.0/8" '
     'or "::1"'),
    ("bad-allow-cidr", FE + 'allow = ["10.0.0.0/8", "10.1.2.3/8"]\n' + BE,
     '{file}: frontends.web.allow[1] = "10.1.2.3/8": expected a network like "10.0.0.0/8" or '
     '"::1/128" (no host bits set)'),
    ("bad-deny-cidr", FE + 'deny = ["::1/129"]\n' + BE,
     '{file}: frontends.web.deny[0] = "::1/129": expected a network like "10.0.0.0/8" or '
     '"::1/128" (no host bits set)'),
    ("accept-proxy-without-from", FE + 'accept_proxy = {}\n' + BE,
     '{file}: frontends.web.accept_proxy.from: missing; expected a list of networks like '
     '["127.0.0.1/32"]'),
    ("bad-send-proxy", server('address = "127.0.0.1:9001", send_proxy = "v3"'),
     '{file}: backends.app.servers[0].send_proxy = "v3": expected one of "v1", "v2"'),
    ("frontend-not-a-table", 'frontends = { web = "127.0.0.1:8080" }\n' + BE,
     '{file}: frontends.web = "127.0.0.1:8080": expected a table'),
    ("frontends-not-a-table", 'frontends = "web"\n' + BE,
     '{file}: frontends = "web": expected a table of named sections'),
    ("frontends-empty", "[frontends]\n" + BE,
     "{file}: frontends: empty; expected at least one [frontends.NAME]"),
    ("empty-bind", '[frontends.web]\nbind = []\ndefault_backend = "app"\n' + BE,
     "{file}: frontends.web.bind = []: expected a non-empty list of addresses"),
    ("bind-used-twice", FE + '[frontends.admin]\nbind = "127.0.0.1:8080"\ndefault_backend = "app"\n' + BE,
     '{file}: frontends.admin.bind = "127.0.0.1:8080": expected an address not already used by '
     "frontends.web.bind"),
    ("rule-bad-host",
     '[frontends.web]\nbind = "127.0.0.1:8080"\nrules = [{ host = "a b", backend = "app" }]\n' + BE,
     '{file}: frontends.web.rules[0].host = "a b": expected a host name like "api.foobar.test" or '
     '"*.foobar.test"'),
    ("admin-no-token", FE + BE + '[admin]\nbind = "0.0.0.0:8404"\n',
     "{file}: admin.token: the admin listener on 0.0.0.0:8404 is not on a loopback address, so "
     'it needs a token ([admin] token = "..." or token_file = "...")'),
    ("admin-short-token", FE + BE + '[admin]\nbind = "127.0.0.1:8404"\ntoken = "abc"\n',
     "{file}: admin.token: a token of at least 8 printable characters, no edge spaces"),
    ("admin-token-twice",
     FE + BE + '[admin]\nbind = "127.0.0.1:8404"\ntoken = "abcdefghi"\ntoken_file = "t"\n',
     "{file}: admin.token_file: give token or token_file, not both"),
    ("admin-token-file-missing", FE + BE + '[admin]\nbind = "127.0.0.1:8404"\ntoken_file = "nope"\n',
     '{file}: admin.token_file = "nope": expected a readable file holding the token (No such file '
     "or directory)"),
    ("admin-token-file-empty", FE + BE + '[admin]\nbind = "127.0.0.1:8404"\ntoken_file = "/dev/null"\n',
     '{file}: admin.token_file = "/dev/null": expected a file holding a token (it is empty)'),
    ("admin-on-a-frontend", FE + BE + '[admin]\nbind = "127.0.0.1:8080"\n',
     '{file}: admin.bind = "127.0.0.1:8080": expected an address no frontend uses (frontends.web '
     "binds 127.0.0.1:8080)"),
    ("metrics-unknown-key", FE + BE + '[metrics]\nbucket = ["1ms"]\n',
     "{file}: metrics.bucket: unknown key; expected one of buckets"),
    ("metrics-buckets-not-a-list", FE + BE + '[metrics]\nbuckets = "1ms"\n',
     '{file}: metrics.buckets = "1ms": expected a list of 1 to 50 increasing durations, like '
     '["1ms", "5ms", "25ms", "100ms", "500ms", "2s"]'),
    ("metrics-bucket-no-unit", FE + BE + '[metrics]\nbuckets = ["1ms", 5]\n',
     '{file}: metrics.buckets[1] = 5: expected a duration string with a unit, like "500ms", "2s", '
     '"1m" or "1h"'),
    ("metrics-buckets-not-increasing", FE + BE + '[metrics]\nbuckets = ["5ms", "5ms"]\n',
     '{file}: metrics.buckets[1] = "5ms": expected a duration above 0 and above the one before it'),
    ("metrics-bucket-zero", FE + BE + '[metrics]\nbuckets = ["0s"]\n',
     '{file}: metrics.buckets[0] = "0s": expected a duration above 0'),
    ("alerts-unknown-key", FE + BE + '[alerts]\nwebhook = "http://127.0.0.1:9000/"\n',
     "{file}: alerts.webhook: unknown key; expected one of webhooks, command, flap_window, "
     "timeout, retries, backoff, queue"),
    ("alerts-webhook-not-a-string", FE + BE + "[alerts]\nwebhooks = [9000]\n",
     '{file}: alerts.webhooks[0] = 9000: expected an http:// or https:// URL like '
     '"http://127.0.0.1:9000/hook"'),
    ("alerts-webhook-scheme", FE + BE + '[alerts]\nwebhooks = ["ftp://127.0.0.1/hook"]\n',
     '{file}: alerts.webhooks[0] = "ftp://127.0.0.1/hook": expected an http:// or https:// URL '
     'like "http://127.0.0.1:9000/hook"'),
    ("alerts-command-empty", FE + BE + "[alerts]\ncommand = []\n",
     "{file}: alerts.command = []: expected a non-empty list of strings: the program and its "
     'arguments, like ["/usr/local/bin/page", "--team", "ops"]'),
    ("alerts-command-not-strings", FE + BE + '[alerts]\ncommand = ["page", 3]\n',
     "{file}: alerts.command[1] = 3: expected a string"),
    ("alerts-flap-window-zero", FE + BE + '[alerts]\nflap_window = "0s"\n',
     '{file}: alerts.flap_window = "0s": expected a duration above 0 and at most "1d"'),
    ("alerts-retries", FE + BE + "[alerts]\nretries = 11\n",
     "{file}: alerts.retries = 11: expected an integer from 0 to 10"),
    ("empty-data-dir", '[global]\ndata_dir = ""\n' + FE + BE,
     '{file}: global.data_dir = "": expected a non-empty string'),
    ("workers-zero", "[global]\nworkers = 0\n" + FE + BE,
     '{file}: global.workers = 0: expected a number of worker processes from 1 to 256, or "auto"'),
    ("backup-not-bool", server('address = "127.0.0.1:9001", backup = "yes"'),
     '{file}: backends.app.servers[0].backup = "yes": expected true or false'),
    ("bad-server-name", server('name = "a b", address = "127.0.0.1:9001"'),
     "{file}: backends.app.servers[0].name = \"a b\": expected a name of letters, digits, '-', '_', "
     "'.' or ':' (at most 64)"),
    ("command-unclosed-quote", server('address = "127.0.0.1:9001", command = "serve \'x"'),
     "{file}: backends.app.servers[0].command = \"serve 'x\": " + COMMAND),
    ("command-empty", server('address = "127.0.0.1:9001", command = []'),
     "{file}: backends.app.servers[0].command = []: " + COMMAND),
    ("command-unbalanced-brace", server('address = "127.0.0.1:9001", command = ["serve", "{port"]'),
     '{file}: backends.app.servers[0].command[1] = "{port": expected balanced {placeholders} '
     "({{ and }} for braces)"),
    ("command-unknown-placeholder", server('address = "127.0.0.1:9001", command = ["serve", "{nope}"]'),
     '{file}: backends.app.servers[0].command[1] = "{nope}": expected placeholders among {python}, '
     "{data_dir}, {name}, {address}, {host}, {port}, {backend}"),
    ("env-bad-name", server('address = "127.0.0.1:9001", env = { "1X" = "a" }'),
     "{file}: backends.app.servers[0].env.1X: invalid name; expected an environment variable name"),
    ("env-not-string", server('address = "127.0.0.1:9001", env = { X = 1 }'),
     "{file}: backends.app.servers[0].env.X = 1: expected a string"),
    ("check-bad-expect", FE + BE + 'check = { path = "/h", expect = 700 }\n',
     '{file}: backends.app.check.expect = 700: expected a status like 200, a range like "200-399", '
     "or a list of them"),
    ("check-inter-zero", FE + BE + 'check = { inter = "0s" }\n',
     '{file}: backends.app.check.inter = "0s": expected a duration above zero'),
    ("check-fastinter-zero", FE + BE + 'check = { fastinter = "0s" }\n',
     '{file}: backends.app.check.fastinter = "0s": expected a duration above zero'),
    ("check-bad-path", FE + BE + 'check = { path = "health" }\n',
     '{file}: backends.app.check.path = "health": expected a request path starting with "/"'),
    ("check-jitter-too-large", FE + BE + "check = { jitter = 0.9 }\n",
     "{file}: backends.app.check.jitter = 0.9: expected a fraction from 0 to 0.5"),
    ("observe-without-check", FE + BE + 'observe = "layer4"\n',
     '{file}: backends.app.observe = "layer4": expected "none" without a check: a server marked down '
     "by observation comes back only through its checks (add check = { ... })"),
    ("observe-layer7-in-tcp",
     '[frontends.web]\nbind = "127.0.0.1:8080"\nmode = "tcp"\ndefault_backend = "app"\n' + BE
     + 'mode = "tcp"\ncheck = true\nobserve = "layer7"\n',
     '{file}: backends.app.observe = "layer7": expected "layer4" or "none" in tcp mode'),
]


@pytest.mark.parametrize(("content", "expected"), [pytest.param(c, e, id=i) for i, c, e in BAD_FILES])
def test_check_rejects_bad_file_with_one_line(tmp_path: Path, content: str | bytes | None, expected: str):
    path = tmp_path / "lb.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    r = run_lb("check", "--config", str(path), cwd=tmp_path)
    line = assert_one_error_line(r)
    assert line == PREFIX + expected.replace("{file}", str(path))


def _config_raise_sites() -> dict[int, str]:
    """{line: function} for every statement of foobar_lb/config.py that raises a ConfigError
    (directly, or made by its _bad and _bad_key helpers)."""
    sites: dict[int, str] = {}

    def visit(node: ast.AST, function: str) -> None:
        for child in ast.iter_child_nodes(node):
            if (isinstance(child, ast.Raise) and isinstance(child.exc, ast.Call)
                    and isinstance(child.exc.func, ast.Name)
                    and child.exc.func.id in ("ConfigError", "_bad", "_bad_key")):
                sites[child.lineno] = function
            inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else function
            visit(child, inner)

    visit(ast.parse(Path(config_module.__file__).read_text(encoding="utf-8")), "")
    return sites


# raise sites a configuration file cannot reach, and why
NOT_FROM_A_FILE = {"quick_config": "options given on the command line (-o), not a file"}


def test_bad_files_reach_every_mistake_the_loader_can_report(tmp_path: Path):
    """The table above goes through every check of the product's loader: each row ends at a
    ConfigError raised by config.py, and every place in config.py that raises one for a file is
    reached by some row (a new check without a row fails here)."""
    reached: dict[int, list[str]] = {}
    for ident, content, _ in BAD_FILES:
        path = tmp_path / f"{ident}.toml"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content, encoding="utf-8")
        with pytest.raises(ConfigError) as info:
            load_config(path)
        frames = [f for f in traceback.extract_tb(info.value.__traceback__)
                  if f.filename == config_module.__file__]
        reached.setdefault(frames[-1].lineno, []).append(ident)
    sites = _config_raise_sites()
    assert set(reached) <= set(sites), {line: ids for line, ids in reached.items() if line not in sites}
    unreached = sorted(f"{function} (config.py:{line})" for line, function in sites.items()
                       if line not in reached and function not in NOT_FROM_A_FILE)
    assert unreached == []


def test_config_error_carries_path_and_source():
    text = FE + BE + "[backends.app.timeout]\nconnect = 5\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "x.toml")
    e = info.value
    assert e.path == "backends.app.timeout.connect"
    assert e.source == "x.toml"
    assert str(e) == "x.toml: backends.app.timeout.connect = 5: " + DURATION
    assert isinstance(e, ValueError)


# ---------------------------------------------------------------------------------------------
# A valid file: several frontends and backends, rules, header rules, units, defaults

GOOD = """\
[global]
grace = "15s"
log_level = "warning"

[defaults]
balance = "leastconn"
retries = 2
forwardfor = { header = "X-Client-IP", except = ["10.0.0.0/8"] }

[defaults.timeout]
connect = "500ms"
client = "1m"
server = "45s"
tunnel = "1h"

[defaults.limits]
max_request_body = "10m"
max_uri = "4k"

[frontends.web]
bind = ["127.0.0.1:8080", "[::1]:8080"]
default_backend = "app"
rules = [
    { host = "API.foobar.test", backend = "api" },
    { path_prefix = "/static/", backend = "static" },
    { host = "*.foobar.test", path_prefix = "/admin", backend = "api" },
]

[frontends.web.timeout]
http_request = "2.5s"

[frontends.web.limits]
max_header_size = "32k"
max_headers = 50

[frontends.web.request_headers]
delete = ["X-Debug"]
set = { X-Env = "test" }
add = { Via = ["foobar", "edge"] }

[frontends.web.response_headers]
set = { Server = "foobar" }

[frontends.db]
bind = "*:3306"
mode = "tcp"
default_backend = "mariadb"
forwardfor = false

[backends.app]
servers = [
    { name = "app1", address = "127.0.0.1:9001", weight = 10 },
    { name = "app2", address = "localhost:9002", weight = 0 },
    { address = "127.0.0.1:9003", backup = true, maxconn = 100 },
]

[backends.api]
balance = "source"
servers = [{ address = "[::1]:9100" }]

[backends.api.timeout]
server = "2m"

[backends.static]
redispatch = false
retries = 0
servers = [{ address = "127.0.0.1:9200" }]
response_headers = { delete = ["Set-Cookie"] }

[backends.mariadb]
mode = "tcp"
servers = [{ name = "db1", address = "127.0.0.1:3307" }]
"""


@pytest.fixture
def good_file(tmp_path: Path) -> Path:
    path = tmp_path / "good.toml"
    path.write_text(GOOD, encoding="utf-8")
    return path


def test_check_accepts_valid_file(good_file: Path, tmp_path: Path):
    r = run_lb("check", "--config", str(good_file), cwd=tmp_path)
    assert "Traceback" not in r.stderr
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert r.stdout == f"{good_file}: ok (2 frontends, 4 backends, 6 servers)\n"


def test_valid_file_gives_typed_values(good_file: Path):
    cfg = load_config(good_file)
    assert cfg.source == str(good_file)
    assert list(cfg.frontends) == ["web", "db"]
    assert list(cfg.backends) == ["app", "api", "static", "mariadb"]
    assert cfg.settings.grace == 15.0
    assert cfg.settings.log_level == "warning"

    # [defaults] timeouts and limits over the built-in ones, then the section's own.
    default_timeouts = Timeouts(connect=0.5, client=60.0, server=45.0, http_request=10.0,
                                http_keep_alive=10.0, queue=5.0, tunnel=3600.0)
    default_limits = Limits(max_request_body=10 * 1024 * 1024, max_uri=4096, max_header_size=16384,
                            max_headers=101)
    default_ff = ForwardFor(enabled=True, header="X-Client-IP",
                            except_networks=(ipaddress.ip_network("10.0.0.0/8"),))

    web = cfg.frontends["web"]
    assert web.name == "web"
    assert web.bind == (Address("127.0.0.1", 8080), Address("::1", 8080))
    assert web.mode == "http"
    assert web.default_backend == "app"
    assert web.rules == (
        Rule(backend="api", host="api.foobar.test"),
        Rule(backend="static", path_prefix="/static/"),
        Rule(backend="api", host="*.foobar.test", path_prefix="/admin"),
    )
    assert web.timeouts == dataclasses.replace(default_timeouts, http_request=2.5)
    assert all(isinstance(getattr(web.timeouts, f.name), float)
               for f in dataclasses.fields(Timeouts))
    assert web.limits == dataclasses.replace(default_limits, max_header_size=32768, max_headers=50)
    assert web.forwardfor == default_ff
    assert web.forwarded_proto is True
    assert web.request_headers == HeaderRules(delete=("X-Debug",), set=(("X-Env", "test"),),
                                              add=(("Via", "foobar"), ("Via", "edge")))
    assert web.response_headers == HeaderRules(set=(("Server", "foobar"),))

    db = cfg.frontends["db"]
    assert db.bind == (Address("", 3306),)
    assert str(db.bind[0]) == "*:3306"
    assert db.mode == "tcp"
    assert db.rules == ()
    assert db.forwardfor == ForwardFor(enabled=False)
    assert db.timeouts == default_timeouts
    assert db.limits == default_limits
    assert not db.request_headers

    app = cfg.backends["app"]
    assert app.mode == "http"
    assert app.balance == "leastconn"
    assert app.retries == 2
    assert app.redispatch is True
    assert app.timeouts == default_timeouts
    assert app.servers == (
        ServerConfig("app1", Address("127.0.0.1", 9001), weight=10),
        ServerConfig("app2", Address("localhost", 9002), weight=0),
        ServerConfig("server-3", Address("127.0.0.1", 9003), weight=1, backup=True, maxconn=100),
    )

    api = cfg.backends["api"]
    assert api.balance == "source"
    assert api.timeouts == dataclasses.replace(default_timeouts, server=120.0)
    assert api.servers == (ServerConfig("server-1", Address("::1", 9100)),)
    assert str(api.servers[0].address) == "[::1]:9100"

    static = cfg.backends["static"]
    assert static.redispatch is False
    assert static.retries == 0
    assert static.response_headers == HeaderRules(delete=("Set-Cookie",))

    assert cfg.backends["mariadb"].mode == "tcp"
    assert cfg.backends["mariadb"].servers[0].name == "db1"


def test_valid_file_is_frozen(good_file: Path):
    cfg = load_config(good_file)
    web = cfg.frontends["web"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        web.mode = "tcp"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        web.timeouts.client = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.backends["app"].servers[0].weight = 5  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.settings.grace = 0.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.source = "elsewhere"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.frontends["new"] = web  # type: ignore[index]
    with pytest.raises(TypeError):
        del cfg.backends["app"]  # type: ignore[attr-defined]
    assert isinstance(web.bind, tuple)
    assert isinstance(web.rules, tuple)
    assert isinstance(cfg.backends["app"].servers, tuple)


def test_minimal_file_gets_builtin_defaults():
    cfg = parse_config(FE + BE)
    web, app = cfg.frontends["web"], cfg.backends["app"]
    assert web.timeouts == Timeouts()
    assert (web.timeouts.connect, web.timeouts.client, web.timeouts.tunnel) == (5.0, 30.0, 3600.0)
    assert web.limits == Limits()
    assert (web.limits.max_request_body, web.limits.max_header_size) == (0, 16384)
    assert web.forwardfor == ForwardFor()
    assert web.forwardfor.header == "X-Forwarded-For"
    assert web.mode == app.mode == "http"
    assert app.balance == "roundrobin"
    assert app.retries == 3
    assert app.redispatch is True
    assert app.servers == (ServerConfig("a", Address("127.0.0.1", 9001), weight=1, backup=False, maxconn=0),)
    assert cfg.settings.grace == 10.0
    assert cfg.settings.log_level == "info"
    assert cfg.source is None


# ---------------------------------------------------------------------------------------------
# units


@pytest.mark.parametrize(("text", "seconds"), [
    ("500ms", 0.5),
    ("2s", 2.0),
    ("1m", 60.0),
    ("1h", 3600.0),
    ("1d", 86400.0),
    ("1.5s", 1.5),
    ("250us", 0.00025),
    ("0s", 0.0),
    ("0ms", 0.0),
    (" 3 s ", 3.0),
    ("90m", 5400.0),
])
def test_parse_duration_good(text: str, seconds: float):
    value = parse_duration(text)
    assert isinstance(value, float)
    assert math.isclose(value, seconds, rel_tol=1e-12, abs_tol=1e-15)


@pytest.mark.parametrize("value", [
    5, 5.0, 0, True, None, [], b"5s",
    "", "5", "s", "5 parsecs", "5S", "5sec", "-1s", "+1s", "1.s", ".5s", "1e3s", "5ms5", "1m30s",
    "5 s s", "inf s", "nans",
], ids=repr)
def test_parse_duration_bad(value: object):
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == DURATION_EXPECTED


@pytest.mark.parametrize(("value", "size"), [
    (0, 0),
    (16384, 16384),
    ("512", 512),
    ("512b", 512),
    ("512B", 512),
    ("16k", 16384),
    ("16K", 16384),
    ("16kb", 16384),
    ("16KiB", 16384),
    ("10m", 10 * 1024 * 1024),
    ("10MB", 10 * 1024 * 1024),
    ("1g", 1024**3),
    (" 4 k ", 4096),
])
def test_parse_size_good(value: object, size: int):
    assert parse_size(value) == size


@pytest.mark.parametrize("value", [
    -1, True, False, 1.5, 16384.0, None, [],
    "", "lots", "-5", "1.5k", "16kk", "16t", "k", "16 k b b", "16i", "16ib", "16bi", "0x10",
], ids=repr)
def test_parse_size_bad(value: object):
    with pytest.raises(ValueError) as info:
        parse_size(value)
    assert str(info.value) == SIZE_EXPECTED


@pytest.mark.parametrize("seconds", [0.0, 0.25, 1.0, 2.5, 60.0, 90.0, 3600.0, 86400.0])
def test_format_duration_round_trips(seconds: float):
    assert math.isclose(parse_duration(format_duration(seconds)), seconds)


@pytest.mark.parametrize(("n", "text"), [(0, "0"), (100, "100"), (16384, "16k"), (10 * 1024**2, "10m"),
                                         (1024**3, "1g"), (1536, "1536")])
def test_format_size(n: int, text: str):
    assert format_size(n) == text
    assert parse_size(text) == n


# ---------------------------------------------------------------------------------------------
# serve: command-line mistakes


def test_serve_quick_form_bad_backend(tmp_path: Path):
    r = run_lb("serve", "--bind", "127.0.0.1:0", "--backend", "nope", cwd=tmp_path)
    line = assert_one_error_line(r)
    assert line == PREFIX + 'command line: --backend "nope": ' + SERVER_ADDRESS


def test_serve_with_half_a_quick_form_is_one_line(tmp_path: Path):
    """(`serve` with nothing at all runs the default stack: see test_stack.py.)"""
    r = run_lb("serve", "--bind", "127.0.0.1:0", cwd=tmp_path)
    line = assert_one_error_line(r)
    assert line == PREFIX + "command line: the quick form needs --backend too"


def test_serve_port_already_in_use(tmp_path: Path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = run_lb("serve", "--bind", f"127.0.0.1:{port}", "--backend", "127.0.0.1:9", cwd=tmp_path,
                   timeout=15)
    line = assert_one_error_line(r)
    assert line.startswith(PREFIX)
    assert f"127.0.0.1:{port}" in line
    assert "address already in use" in line


# ---------------------------------------------------------------------------------------------
# Health checks, observation, queues and pools (in-process: the same ConfigError line)

CHECK_BAD = [
    ('check = { inter = "0s" }', 'backends.app.check.inter = "0s": expected a duration above zero'),
    ('check = { jitter = 0.9 }', "backends.app.check.jitter = 0.9: expected a fraction from 0 to 0.5"),
    ('check = { expect = "2xx" }',
     'backends.app.check.expect = "2xx": expected a status like 200, a range like "200-399", '
     "or a list of them"),
    ('check = { type = "udp" }', 'backends.app.check.type = "udp": expected one of "tcp", "http"'),
    ('check = { rise = 0 }', "backends.app.check.rise = 0: expected an integer from 1 to 1000"),
    ('check = { path = "health" }',
     'backends.app.check.path = "health": expected a request path starting with "/"'),
    ('check = { interval = "1s" }',
     "backends.app.check.interval: unknown key; expected one of type, method, path, host, expect, "
     "inter, fastinter, downinter, rise, fall, timeout, port, jitter"),
    ('observe = "layer7"',
     'backends.app.observe = "layer7": expected "none" without a check: a server marked down by '
     "observation comes back only through its checks (add check = { ... })"),
    ("maxqueue = -1", "backends.app.maxqueue = -1: expected an integer of at least 0"),
    ('http_reuse = "always"', 'backends.app.http_reuse = "always": expected one of "safe", "never"'),
]


@pytest.mark.parametrize(("line", "expected"), CHECK_BAD)
def test_check_and_queue_keys_are_validated(line: str, expected: str):
    text = FE + f'[backends.app]\n{line}\nservers = [{{ address = "127.0.0.1:9001" }}]\n'
    with pytest.raises(ConfigError) as e:
        parse_config(text, "lb.toml")
    assert str(e.value) == f"lb.toml: {expected}"


def test_server_check_overrides_and_defaults():
    cfg = parse_config(FE + """
[backends.app]
check = { path = "/health", inter = "1s", rise = 3, expect = ["200-204", 302] }
servers = [
  { name = "a", address = "127.0.0.1:9001" },
  { name = "b", address = "127.0.0.1:9002", check = { port = 9102, fall = 5 } },
  { name = "c", address = "127.0.0.1:9003", check = false },
]
""")
    be = cfg.backends["app"]
    a, b, c = be.servers
    assert a.check.type == "http" and a.check.path == "/health"
    assert (a.check.inter, a.check.fastinter, a.check.downinter, a.check.timeout) == (1.0,) * 4
    assert a.check.expect == ((200, 204), (302, 302))
    assert (a.check.rise, a.check.fall, a.check.port) == (3, 3, None)
    assert (b.check.rise, b.check.fall, b.check.port, b.check.path) == (3, 5, 9102, "/health")
    assert c.check is None
    assert be.observe == "layer4" and be.error_limit == 10
    plain = parse_config(FE + BE).backends["app"]
    assert plain.servers[0].check is None and plain.observe == "none"
    assert (plain.maxqueue, plain.http_reuse, plain.pool_max_idle) == (1024, "safe", 1024)
    tcp_check = parse_config(FE + '[backends.app]\ncheck = true\nservers = [{ address = "127.0.0.1:1" }]\n')
    assert tcp_check.backends["app"].servers[0].check.type == "tcp"


def test_global_section_values_and_defaults():
    cfg = parse_config(FE + BE + '[global]\nlog_level = "debug"\n')
    g = cfg.settings
    assert (g.log_level, g.grace, g.maxconn, g.data_dir, g.startup_timeout) == (
        "debug", 10.0, 20000, "foobar-data", 30.0)
    g = parse_config(FE + BE + '[global]\ngrace = "2s"\nmaxconn = 5\ndata_dir = "/tmp/x"\n').settings
    assert (g.grace, g.maxconn, g.data_dir, g.log_level) == (2.0, 5, "/tmp/x", "info")
