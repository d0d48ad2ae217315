"""Command line: `python -m foobar_lb serve|check|reload|stats|admin`.

Rule of this module: parse arguments, load configuration, hand over to the master (`serve`) or
talk to a running one (`reload`, `stats` through the control socket; `admin` through the
admin listener's runtime API); report user mistakes as one line on stderr with exit status 2
and never a traceback. It does no work itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from importlib import resources
from pathlib import Path
from typing import Any

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
# `admin`: the runtime API from the shell (urllib; every state-changing request is JSON)

DEFAULT_ADMIN_URL = "http://127.0.0.1:8404"


def _admin_parser(sub: Any) -> None:
    admin = sub.add_parser(
        "admin", help="see and change a running group's servers (the runtime API)",
        description="Talks to the admin listener ([admin] bind). The token comes from --token or "
                    "the environment variable FOOBAR_ADMIN_TOKEN.")
    admin.add_argument("--url", default=DEFAULT_ADMIN_URL,
                       help=f"the admin listener (default {DEFAULT_ADMIN_URL})")
    admin.add_argument("--token", help="its token (default: $FOOBAR_ADMIN_TOKEN)")
    # --url and --token after the action too (`admin servers --url ...`)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--token", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    acts = admin.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    servers = acts.add_parser("servers", parents=[common],
                              help="every backend's servers: state, admin state, weight, counters")
    servers.add_argument("--json", action="store_true", help="the API's JSON as it comes")
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
    pass


def _call(args: argparse.Namespace, method: str, path: str, body: dict | None = None,
          timeout: float = 60.0) -> tuple[int, Any]:
    """(status, JSON answer) of one request to the runtime API; _AdminError with one line when
    it could not be asked or answered with an error."""
    import os
    import urllib.error
    import urllib.parse
    import urllib.request

    base = args.url.rstrip("/")
    if "://" not in base:
        base = "http://" + base
    headers = {"Accept": "application/json"}
    token = args.token or os.environ.get("FOOBAR_ADMIN_TOKEN")
    if token:
        headers["Authorization"] = f"Bearer {token}"
    data = None
    if method != "GET":
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(base + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except urllib.error.URLError as e:
        reason = e.reason
        why = (reason.strerror or str(reason)) if isinstance(reason, OSError) else str(reason)
        raise _AdminError(f"{base}: cannot reach the admin listener: {why.lower()}") from None
    except (OSError, ValueError) as e:  # a timeout, a malformed URL
        raise _AdminError(f"{base}: {e}") from None
    try:
        answer = json.loads(raw)
    except ValueError:
        text = raw.decode(errors="replace").strip().splitlines()
        raise _AdminError(text[0] if text else f"{base}{path}: HTTP {status}") from None
    if status >= 400 and isinstance(answer, dict) and "error" in answer:
        raise _AdminError(str(answer["error"]))
    return status, answer


def _server_path(args: argparse.Namespace) -> str:
    from urllib.parse import quote

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


def _admin(args: argparse.Namespace) -> int:
    try:
        return _admin_action(args)
    except _AdminError as e:
        return _fail(str(e))


def _admin_action(args: argparse.Namespace) -> int:
    act = args.action
    if act is None:
        return _fail("admin: say what to do: servers, set, add, remove, check or reload")
    if act == "servers":
        _, answer = _call(args, "GET", "/api/backends")
        say(json.dumps(answer, indent=2) if args.json else _table(answer))
        return 0
    if act == "set":
        if args.state is None and args.weight is None:
            return _fail("admin set: give --state ready|drain|maint and/or --weight N")
        body: dict[str, Any] = {}
        if args.state is not None:
            body["state"] = args.state
        if args.weight is not None:
            body["weight"] = args.weight
        _, s = _call(args, "POST", _server_path(args), body)
        say(_line(args.backend, s))
        return 0
    if act == "add":
        body = {"address": args.address, "weight": args.weight, "backup": args.backup}
        _, s = _call(args, "PUT", _server_path(args), body)
        say(f"added {_line(args.backend, s)}")
        return 0
    if act == "remove":
        _, answer = _call(args, "DELETE", _server_path(args), timeout=600.0)
        say(answer.get("message", "removed"))
        return 0
    if act == "check":
        _, answer = _call(args, "POST", _server_path(args) + "/check")
        took = answer.get("duration") or 0.0
        counted = "" if answer.get("counted") else " (no check configured: a TCP connect, " \
                                                    "not counted)"
        s = answer.get("server", {})
        say(f"{args.backend}/{args.server}: {answer.get('status')} ({took * 1000:.0f}ms){counted}; "
            f"state {s.get('state')}, admin {s.get('admin')}")
        return 0 if answer.get("ok") else 1
    # reload
    _, answer = _call(args, "POST", "/api/reload", {}, timeout=120.0)
    if not answer.get("ok"):
        return _fail(answer.get("message", "reload failed"))
    say(f"{PROG}: {answer.get('message')}")
    return 0
