"""Command line: `python -m foobar_lb serve|check|reload|stats|admin|lab`.

Rule of this module: parse arguments, load configuration, hand over to the master (`serve`) or
talk to a running one (`reload`, `stats` through the control socket; `admin` through the
admin listener's runtime API, of one load balancer or of several peers at once), or hand the
whole command line over (`lab`, to foobar_lb.lab); report user mistakes as one line on stderr
with exit status 2 and never a traceback. It does no work itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import re
import sys
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from . import __version__
from .balancing import algorithm_names
from .config import Config, ConfigError, load_config, parse_config, quick_config, with_admin
from .listeners import ListenError
from .managed import unrunnable
from .master import Master, StartError, ask, control_path, say
from .runtime import new_event_loop
from .tls import check_config as check_tls

__all__ = ["main"]

PROG = "foobar-lb"
DEFAULT_CONFIG = "foobar.toml"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line with this (sub)command's usage, exit 2
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def _workers(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= 256:
        raise argparse.ArgumentTypeError(f"invalid worker count {text!r}: expected 1 to 256")
    return n


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="foobar_lb: an asyncio HTTP/TCP load balancer")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    serve = sub.add_parser("serve", help="run the load balancer",
                           description="Run from a configuration file (--config, or ./foobar.toml), "
                                       "from --bind and --backend, or with none of them the whole "
                                       "default stack (the load balancer on 127.0.0.1:8080 and two "
                                       "foobar_app servers on SQLite).")
    serve.add_argument("--config", "-c", metavar="FILE", help="a TOML configuration file")
    serve.add_argument("--bind", action="append", metavar="ADDR",
                       help="quick form: address to listen on, like 127.0.0.1:8000 (repeatable)")
    serve.add_argument("--backend", action="append", metavar="ADDR",
                       help="quick form: a server, like 127.0.0.1:9001 (repeatable)")
    serve.add_argument("--mode", choices=("http", "tcp"), default="http",
                       help="quick form: http (default) or tcp")
    serve.add_argument("--allow", action="append", metavar="CIDR",
                       help="quick form: only clients in this network, like 10.0.0.0/8 (repeatable)")
    serve.add_argument("--deny", action="append", metavar="CIDR",
                       help="quick form: refuse clients in this network (repeatable; deny wins)")
    serve.add_argument("--algorithm", default="roundrobin", metavar="NAME",
                       help="quick form: balancing algorithm (" + ", ".join(algorithm_names()) + ")")
    serve.add_argument("--tls-cert", metavar="FILE",
                       help="quick form: serve HTTPS with this PEM certificate (chain)")
    serve.add_argument("--tls-key", metavar="FILE",
                       help="quick form: the PEM private key of --tls-cert")
    serve.add_argument("--admin", metavar="ADDR",
                       help="serve the admin listener (stats page, /metrics, /ready, runtime "
                            "API) on ADDR, like 127.0.0.1:8404 (overrides [admin] bind)")
    serve.add_argument("--workers", "-w", type=_workers, metavar="N",
                       help="worker processes (overrides global.workers; default 1)")
    serve.add_argument("--pid-file", metavar="PATH",
                       help="write the master's pid here; its control socket (for `reload` and "
                            "`stats`) goes beside it, with the suffix .sock")
    serve.add_argument("--data-dir", metavar="DIR",
                       help="where managed servers keep their data ({data_dir}; default "
                            "global.data_dir, ./foobar-data)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                       help="overrides global.log_level")

    check = sub.add_parser("check", help="validate a configuration file (exit 0 valid, 2 invalid)")
    check.add_argument("--config", "-c", metavar="FILE", required=True)

    reload = sub.add_parser("reload", help="make a running master re-read its configuration",
                            description="Exit 0 once the new configuration serves; 2 with the "
                                        "error when it is invalid (the old one keeps serving).")
    reload.add_argument("--pid-file", metavar="PATH", required=True)

    stats = sub.add_parser("stats", help="print a running group's servers and counters as JSON")
    stats.add_argument("--pid-file", metavar="PATH", required=True)

    _admin_parser(sub)
    # `lab` is handed its arguments untouched (main() does it before parsing): listed here only
    sub.add_parser("lab", add_help=False,
                   help="a lab of real hosts in network namespaces (two load balancers on a "
                        "virtual IP, app and database hosts): `lab --help` for more")
    return p


def _fail(message: str) -> int:
    with contextlib.suppress(OSError, ValueError):
        print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2


def _load(args: argparse.Namespace) -> Config:
    cfg = _load_config(args)
    return with_admin(cfg, args.admin) if args.admin else cfg


def _load_config(args: argparse.Namespace) -> Config:
    algos = algorithm_names()
    quick = args.bind or args.backend
    if (args.tls_cert or args.tls_key) and not quick:
        raise ConfigError("", "--tls-cert and --tls-key go with the quick form (--bind, "
                              "--backend); in a file: tls = { cert, key }", "command line")
    if quick:
        if args.config:
            raise ConfigError("", "give either --config or --bind/--backend, not both",
                              "command line")
        if not args.bind or not args.backend:
            missing = "--bind" if not args.bind else "--backend"
            raise ConfigError("", f"the quick form needs {missing} too", "command line")
        return quick_config(args.bind, args.backend, args.mode, args.algorithm, algos,
                            allow=args.allow, deny=args.deny, tls_cert=args.tls_cert,
                            tls_key=args.tls_key)
    if args.config:
        return load_config(args.config, algos)
    if Path(DEFAULT_CONFIG).is_file():
        return load_config(DEFAULT_CONFIG, algos)
    # nothing given: the whole default stack (examples/stack.toml, shipped in the package)
    stack = resources.files("foobar_lb") / "stack.toml"
    return parse_config(stack.read_text(encoding="utf-8"), "examples/stack.toml", algos)


def _check(cfg: Config) -> int:
    why = unrunnable(cfg) or check_tls(cfg)
    if why:
        return _fail(why)
    n = sum(len(b.servers) for b in cfg.backends.values())
    say(f"{cfg.source}: ok ({len(cfg.frontends)} frontends, {len(cfg.backends)} backends, "
        f"{n} servers)")
    return 0


def _talk(pid_file: str, cmd: str) -> dict | None:
    path = control_path(pid_file)
    try:
        return ask(pid_file, cmd)
    except FileNotFoundError:
        _fail(f"{path}: no control socket (is `serve --pid-file {pid_file}` running?)")
    except ConnectionRefusedError:
        _fail(f"{path}: nobody answers (the master is gone?)")
    except TimeoutError:
        _fail(f"{path}: no answer within 35s")
    except (OSError, ValueError) as e:
        _fail(f"{path}: {e}")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lab"]:
        return _lab(argv[1:])
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # say it with the usage of the command that got them
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        target = sub.choices.get(args.command, parser) if args.command else parser
        target.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command is None:
        _parser().print_help()
        return 2
    if args.command == "reload":
        reply = _talk(args.pid_file, "reload")
        if reply is None:
            return 2
        if not reply.get("ok"):
            return _fail(reply.get("message", "reload failed"))
        say(f"{PROG}: {reply.get('message')}")
        return 0
    if args.command == "admin":
        return _admin(args)
    if args.command == "stats":
        reply = _talk(args.pid_file, "stats")
        if reply is None:
            return 2
        say(json.dumps(reply["stats"], indent=2))
        return 0
    try:
        cfg = _load(args) if args.command == "serve" else load_config(args.config,
                                                                      algorithm_names())
    except ConfigError as e:
        return _fail(str(e))
    if args.command == "check":
        return _check(cfg)
    level = (args.log_level or cfg.settings.log_level).upper()
    logging.raiseExceptions = False  # a log line that cannot be written is dropped
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    master = Master(cfg, data_dir=args.data_dir, pid_file=args.pid_file, workers=args.workers)
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(master.run())
    except KeyboardInterrupt:
        return 130
    except StartError as e:
        return _fail(str(e))
    except ListenError as e:
        if cfg.source is None:  # the quick form: name the option, not the generated key
            return _fail(f'command line: --bind "{e.address}": cannot listen: {e.reason}')
        return _fail(f"{cfg.source}: {e}")


# ---------------------------------------------------------------------------------------------
# `admin`: the runtime API from the shell, to one load balancer (--url) or to several at once
# (--peers: one thread each, every request bounded); every state-changing request is JSON

DEFAULT_ADMIN_URL = "http://127.0.0.1:8404"
CONNECT_TIMEOUT = 3.0  # seconds to connect to an admin listener: a peer cut off fails fast
DEFAULT_TIMEOUT = 30.0  # seconds for an answer, but for the actions that wait for something:
ACTION_TIMEOUT = {"remove": 600.0,  # the server's requests in flight to finish in every worker
                  "reload": 120.0}  # the new workers to serve
_ADMIN_URL_EXPECTED = "expected an admin listener's address, like http://10.0.0.11:8404"
_HOST = re.compile(r"[A-Za-z0-9._:-]+")


def _seconds(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if not 0 < v <= 3600:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r}: expected seconds, more than "
                                         "0 and at most 3600")
    return v


def _admin_parser(sub: Any) -> None:
    admin = sub.add_parser(
        "admin", help="see and change the servers of one running load balancer, or of several "
                      "at once (the runtime API)",
        description="Talks to the admin listener ([admin] bind) of one load balancer (--url) or "
                    "of several at once (--peers). The token comes from --token or the "
                    "environment variable FOOBAR_ADMIN_TOKEN (the same for every peer). With "
                    "--peers the action goes to every load balancer listed, all at the same "
                    "time: one that cannot be reached, does not answer in time or refuses is "
                    "named on stderr (its URL and why, one line each) and the exit status is 1, "
                    "while the others are still changed (nothing is undone); after an add or a "
                    "remove that did not apply everywhere a last line says which load balancers "
                    "have the server. Exit status 2: a mistake on the command line.")
    admin.add_argument("--url", help=f"the admin listener (default {DEFAULT_ADMIN_URL})")
    admin.add_argument("--peers", action="append", metavar="URL,URL",
                       help="act on every one of these admin listeners at once, instead of "
                            "--url (comma-separated, or the option repeated)")
    admin.add_argument("--token", help="its token (default: $FOOBAR_ADMIN_TOKEN)")
    admin.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                       help=f"wait this long for each answer (default {DEFAULT_TIMEOUT:g}; remove "
                            f"{ACTION_TIMEOUT['remove']:g}, reload {ACTION_TIMEOUT['reload']:g}: "
                            f"they wait for drains, new workers); connecting takes at most "
                            f"{CONNECT_TIMEOUT:g}s")
    # the same options after the action too (`admin servers --url ...`); --peers given before
    # and after add up (a separate dest: a subcommand's values replace its parent's)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--peers", dest="peers_after", action="append", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    common.add_argument("--token", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--timeout", type=_seconds, default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    acts = admin.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    servers = acts.add_parser("servers", parents=[common],
                              help="every backend's servers: state, admin state, weight, counters "
                                   "(with --peers: each load balancer's under its URL)")
    servers.add_argument("--json", action="store_true",
                         help="the API's JSON as it comes (with --peers: {URL: answer}, "
                              '{"error": why} for a peer that failed)')
    st = acts.add_parser("set", parents=[common], help="drain, maint or ready a server, or set its weight")
    st.add_argument("backend")
    st.add_argument("server")
    st.add_argument("--state", choices=("ready", "drain", "maint"))
    st.add_argument("--weight", type=int, metavar="N")
    add = acts.add_parser("add", parents=[common],
                          help="add a server (checked before it takes traffic when its backend "
                               "has checks)")
    add.add_argument("backend")
    add.add_argument("server")
    add.add_argument("address", help="host:port")
    add.add_argument("--weight", type=int, default=1, metavar="N")
    add.add_argument("--backup", action="store_true")
    rm = acts.add_parser("remove", parents=[common],
                         help="drain a server, then remove it once its requests in flight are done")
    rm.add_argument("backend")
    rm.add_argument("server")
    ck = acts.add_parser("check", parents=[common], help="check a server now (exit 1 when the check fails)")
    ck.add_argument("backend")
    ck.add_argument("server")
    acts.add_parser("reload", parents=[common], help="re-read the configuration file")


class _AdminError(Exception):
    """A request not done: `why` in one line; `base` (the listener's URL) when the why is about
    reaching it rather than its answer."""

    def __init__(self, why: str, base: str | None = None, *, reached: bool = True):
        super().__init__(why)
        self.why = why
        self.base = base
        self.reached = reached  # False: no connection, so the request was not even sent

    def __str__(self) -> str:
        return f"{self.base}: {self.why}" if self.base else self.why


def _admin_base(text: str) -> str | None:
    """`scheme://host[:port]` of an admin listener's address (`http://` when none is given), or
    None when `text` is not one."""
    split = urlsplit(text if "://" in text else "http://" + text)
    try:
        port = split.port
    except ValueError:
        return None
    host = split.hostname
    if (split.scheme not in ("http", "https") or not host or not _HOST.fullmatch(host)
            or port == 0 or split.username is not None or split.password is not None
            or split.path not in ("", "/") or split.query or split.fragment):
        return None
    shown = f"[{host}]" if ":" in host else host
    return f"{split.scheme}://{shown}" + (f":{port}" if port is not None else "")


def _peer_urls(items: list[str]) -> list[str]:
    """The admin listeners of --peers (comma-separated, repeatable), in order; ValueError with
    one line for a bad or repeated one."""
    urls: list[str] = []
    for item in items:
        for part in item.split(","):
            text = part.strip()
            if not text:
                raise ValueError(f'--peers "{item}": an empty address; {_ADMIN_URL_EXPECTED}')
            url = _admin_base(text)
            if url is None:
                raise ValueError(f'--peers "{text}": {_ADMIN_URL_EXPECTED}')
            if url in urls:
                raise ValueError(f"--peers: {url} is given twice")
            urls.append(url)
    return urls


def _why(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return text[0].lower() + text[1:]


def _request(base: str, method: str, path: str, body: dict | None, token: str | None,
             timeout: float) -> Any:
    """The JSON answer of one request to the admin listener at `base`: at most CONNECT_TIMEOUT
    to connect, then `timeout` for each step of the answer; _AdminError when it could not be
    asked or answered with an error."""
    import http.client

    split = urlsplit(base)
    cls = http.client.HTTPSConnection if split.scheme == "https" else http.client.HTTPConnection
    conn = cls(split.hostname, split.port, timeout=min(CONNECT_TIMEOUT, timeout))
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if method != "GET":
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode() if body is not None else b""
    try:
        try:
            conn.connect()
        except TimeoutError:
            raise _AdminError(f"cannot reach the admin listener: no connection within "
                              f"{min(CONNECT_TIMEOUT, timeout):g}s", base, reached=False) from None
        except OSError as e:
            raise _AdminError(f"cannot reach the admin listener: {_why(e)}", base,
                              reached=False) from None
        try:
            conn.sock.settimeout(timeout)
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
            status, raw = resp.status, resp.read()
        except TimeoutError:
            raise _AdminError(f"no answer within {timeout:g}s", base) from None
        except (OSError, http.client.HTTPException) as e:
            raise _AdminError(f"the admin listener did not answer: {_why(e)}", base) from None
    finally:
        conn.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        lines = raw.decode(errors="replace").strip().splitlines()
        if status >= 400 and lines:
            raise _AdminError(lines[0]) from None  # the guard's 401, 403, 415 are text
        raise _AdminError(f"HTTP {status}: not a JSON answer (is it an admin listener?)",
                          base) from None
    if status >= 400:
        if isinstance(answer, dict) and "error" in answer:
            raise _AdminError(str(answer["error"]))
        raise _AdminError(f"HTTP {status}: {json.dumps(answer)[:200]}")
    return answer


def _server_path(args: argparse.Namespace) -> str:
    return f"/api/backends/{quote(args.backend, safe='')}/servers/{quote(args.server, safe='')}"


def _line(be: str, s: dict[str, Any]) -> str:
    extra = " (backup)" if s.get("backup") else ""
    extra += " (added at run time)" if s.get("runtime") else ""
    return (f"{be}/{s['name']} {s['address']}: state {s['state']}, admin {s['admin']}, "
            f"weight {s['weight']}{extra}")


def _table(answer: dict[str, Any]) -> str:
    rows = [("BACKEND", "SERVER", "ADDRESS", "STATE", "ADMIN", "WEIGHT", "CURRENT", "REQUESTS",
             "CHECK")]
    for be in answer.get("backends", []):
        for s in be.get("servers", []):
            check = s.get("check")
            if isinstance(check, dict):
                check = check.get("status")
            requests = s.get("sessions", s.get("requests"))
            flags = ("*" if s.get("runtime") else "") + (" (backup)" if s.get("backup") else "")
            rows.append((be["name"], s["name"] + flags, s["address"], s["state"], s["admin"],
                         str(s["weight"]), _dash(s.get("current")), _dash(requests),
                         check or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    out = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=False)) + "  " + r[-1]
           for r in rows]
    if any(s.get("runtime") for be in answer.get("backends", []) for s in be.get("servers", [])):
        out.append("* added at run time (kept by a reload, lost by a restart)")
    return "\n".join(line.rstrip() for line in out)


def _dash(v: Any) -> str:
    return "-" if v is None else str(v)


def _what(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    """(method, path, body) of the request the action makes."""
    act = args.action
    if act == "servers":
        return "GET", "/api/backends", None
    if act == "set":
        body: dict[str, Any] = {}
        if args.state is not None:
            body["state"] = args.state
        if args.weight is not None:
            body["weight"] = args.weight
        return "POST", _server_path(args), body
    if act == "add":
        return "PUT", _server_path(args), {"address": args.address, "weight": args.weight,
                                           "backup": args.backup}
    if act == "remove":
        return "DELETE", _server_path(args), None
    if act == "check":
        return "POST", _server_path(args) + "/check", None
    return "POST", "/api/reload", {}


def _said(args: argparse.Namespace, answer: Any) -> tuple[str, bool]:
    """What to print of an answer, and whether the action succeeded (a failed check did not);
    _AdminError for an answer that refuses (a reload that did not take)."""
    act = args.action
    if act == "servers":
        return (json.dumps(answer, indent=2) if args.json else _table(answer)), True
    if act == "set":
        return _line(args.backend, answer), True
    if act == "add":
        return f"added {_line(args.backend, answer)}", True
    if act == "remove":
        return answer.get("message", "removed"), True
    if act == "check":
        took = answer.get("duration") or 0.0
        counted = "" if answer.get("counted") else " (no check configured: a TCP connect, " \
                                                    "not counted)"
        s = answer.get("server", {})
        return (f"{args.backend}/{args.server}: {answer.get('status')} ({took * 1000:.0f}ms)"
                f"{counted}; state {s.get('state')}, admin {s.get('admin')}"), bool(answer.get("ok"))
    if not answer.get("ok"):
        raise _AdminError(answer.get("message", "reload failed"))
    return str(answer.get("message")), True


def _admin(args: argparse.Namespace) -> int:
    if args.action is None:
        return _fail("admin: say what to do: servers, set, add, remove, check or reload")
    if args.action == "set" and args.state is None and args.weight is None:
        return _fail("admin set: give --state ready|drain|maint and/or --weight N")
    peers = (args.peers or []) + getattr(args, "peers_after", [])
    if peers and args.url is not None:
        return _fail("admin: give either --url or --peers, not both")
    try:
        urls = _peer_urls(peers)
    except ValueError as e:
        return _fail(str(e))
    token = args.token or os.environ.get("FOOBAR_ADMIN_TOKEN")
    timeout = args.timeout or ACTION_TIMEOUT.get(args.action, DEFAULT_TIMEOUT)
    method, path, body = _what(args)
    if urls:
        return _admin_peers(args, urls, method, path, body, token, timeout)
    base = _admin_base(args.url or DEFAULT_ADMIN_URL)
    if base is None:
        return _fail(f'--url "{args.url}": {_ADMIN_URL_EXPECTED}')
    try:
        text, ok = _said(args, _request(base, method, path, body, token, timeout))
    except _AdminError as e:
        return _fail(str(e))
    say(f"{PROG}: {text}" if args.action == "reload" else text)
    return 0 if ok else 1


def _on_peers(urls: list[str], fn: Any, timeout: float) -> dict[str, tuple[bool, Any]]:
    """`fn(url)` for every url at once, a thread each: url -> (True, what it returned) or
    (False, an _AdminError saying why not). A thread still running after a connection's and an
    answer's time is given up (daemon threads: they do not hold the exit)."""
    done: dict[str, tuple[bool, Any]] = {}

    def run(url: str) -> None:
        try:
            done[url] = (True, fn(url))
        except _AdminError as e:
            done[url] = (False, e)
        except Exception as e:  # an answer of an unexpected shape: that peer's failure
            done[url] = (False, _AdminError(f"unexpected answer: {type(e).__name__}: {e}"))

    threads = [threading.Thread(target=run, args=(u,), name=f"admin {u}", daemon=True)
               for u in urls]
    for t in threads:
        t.start()
    deadline = time.monotonic() + CONNECT_TIMEOUT + timeout + 1.0
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    late = (False, _AdminError(f"no answer within {timeout:g}s"))
    return {u: done.get(u, late) for u in urls}


def _admin_peers(args: argparse.Namespace, urls: list[str], method: str, path: str,
                 body: dict[str, Any] | None, token: str | None, timeout: float) -> int:
    """The action on every peer at once. Exit status 0 when every one did it, 1 when one could
    not be reached, refused or failed its check (the others are done all the same)."""

    def one(url: str) -> tuple[Any, str, bool]:
        answer = _request(url, method, path, body, token, timeout)
        return (answer, *_said(args, answer))

    results = _on_peers(urls, one, timeout)
    if args.action == "servers" and args.json:
        say(json.dumps({u: (r[0] if ok else {"error": r.why}) for u, (ok, r) in results.items()},
                       indent=2))
    elif args.action == "servers":
        tables = [f"== {u}\n{r[1]}" for u, (ok, r) in results.items() if ok]
        if tables:
            say("\n\n".join(tables))
    else:
        for u, (ok, r) in results.items():
            if ok:
                say("\n".join(f"{u}: {line}" for line in r[1].splitlines()))
    failed = [u for u, (ok, _) in results.items() if not ok]
    with contextlib.suppress(OSError, ValueError):
        for u in failed:
            print(f"{PROG}: error: {u}: {results[u][1].why}", file=sys.stderr, flush=True)
        if failed and args.action in ("add", "remove"):
            print(f"{PROG}: {_where(args, urls, results, token, timeout)}", file=sys.stderr,
                  flush=True)
    return 1 if failed or not all(r[2] for ok, r in results.values() if ok) else 0


def _where(args: argparse.Namespace, urls: list[str], results: dict[str, tuple[bool, Any]],
           token: str | None, timeout: float) -> str:
    """Which load balancers have the server now, after an add or a remove that failed on some:
    those that failed once connected are asked again (an add that timed out may have been done;
    a 409 means the name is taken there already); those not reached are not known."""
    name = f"{args.backend}/{args.server}"
    ask = min(timeout, DEFAULT_TIMEOUT)

    def look(url: str) -> dict[str, Any] | None:
        answer = _request(url, "GET", "/api/backends", None, token, ask)
        for be in answer.get("backends", []):
            if be.get("name") == args.backend:
                return next((s for s in be.get("servers", []) if s.get("name") == args.server),
                            None)
        return None

    seen = _on_peers([u for u, (ok, r) in results.items() if not ok and r.reached], look, ask)
    on: list[str] = []
    off: list[str] = []
    other: list[str] = []
    unknown: list[str] = []
    for u in urls:
        if results[u][0]:
            (on if args.action == "add" else off).append(u)
            continue
        ok, s = seen.get(u, (False, None))
        if not ok:
            unknown.append(u)
        elif s is None:
            off.append(u)
        elif args.action == "add" and s.get("address") != args.address:
            other.append(f"{u} (at {s.get('address')})")
        else:
            on.append(u)
    parts = [f"{name} is on " + (", ".join(on) if on else "none of them")]
    if off:
        parts.append("not on " + ", ".join(off))
    if other:
        parts.append(f"another {name} is on " + ", ".join(other))
    if unknown:
        parts.append("not known for " + ", ".join(unknown))
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# `lab`: handed over whole to foobar_lb.lab (its own argument parser)


def _lab(argv: list[str]) -> int:
    try:
        lab = importlib.import_module("foobar_lb.lab")
    except ModuleNotFoundError as e:
        if e.name != "foobar_lb.lab":
            raise
        return _fail("lab: this installation has no foobar_lb.lab")
    try:
        return lab.cli_main(list(argv))
    except KeyboardInterrupt:
        return 130
