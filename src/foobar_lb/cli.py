"""Command line: `python -m foobar_lb serve|check`.

Rule of this module: parse arguments, load configuration, hand over to `runtime`; report user
mistakes as one line on stderr with exit status 2 and never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from importlib import resources
from pathlib import Path

from . import __version__
from .balancing import algorithm_names
from .config import Config, ConfigError, load_config, parse_config, quick_config
from .runtime import ListenError, LoadBalancer, new_event_loop

__all__ = ["main"]

PROG = "foobar-lb"
DEFAULT_CONFIG = "foobar.toml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="foobar_lb: an asyncio HTTP/TCP load balancer")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

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
    serve.add_argument("--algorithm", default="roundrobin", metavar="NAME",
                       help="quick form: balancing algorithm (" + ", ".join(algorithm_names()) + ")")
    serve.add_argument("--data-dir", metavar="DIR",
                       help="where managed servers keep their data ({data_dir}; default "
                            "global.data_dir, ./foobar-data)")
    serve.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                       help="overrides global.log_level")

    check = sub.add_parser("check", help="validate a configuration file (exit 0 valid, 2 invalid)")
    check.add_argument("--config", "-c", metavar="FILE", required=True)
    return p


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2


def _load(args: argparse.Namespace) -> Config:
    quick = args.bind or args.backend
    if quick:
        if args.config:
            raise ConfigError("", "give either --config or --bind/--backend, not both",
                              "command line")
        if not args.bind or not args.backend:
            missing = "--bind" if not args.bind else "--backend"
            raise ConfigError("", f"the quick form needs {missing} too", "command line")
        return quick_config(args.bind, args.backend, args.mode, args.algorithm)
    if args.config:
        return load_config(args.config)
    if Path(DEFAULT_CONFIG).is_file():
        return load_config(DEFAULT_CONFIG)
    # nothing given: the whole default stack (examples/stack.toml, shipped in the package)
    stack = resources.files("foobar_lb") / "stack.toml"
    return parse_config(stack.read_text(encoding="utf-8"), "examples/stack.toml")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 2
    try:
        cfg = _load(args) if args.command == "serve" else load_config(args.config)
    except ConfigError as e:
        return _fail(str(e))
    if args.command == "check":
        n = sum(len(b.servers) for b in cfg.backends.values())
        print(f"{cfg.source}: ok ({len(cfg.frontends)} frontends, {len(cfg.backends)} backends, "
              f"{n} servers)")
        return 0
    level = (args.log_level or cfg.settings.log_level).upper()
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        with asyncio.Runner(loop_factory=new_event_loop) as runner:
            return runner.run(_serve(cfg, args.data_dir))
    except KeyboardInterrupt:
        return 130


async def _serve(cfg: Config, data_dir: str | None) -> int:
    lb = LoadBalancer(cfg, data_dir=data_dir)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            print(f"{PROG}: {signal.Signals(signum).name}: stopping, letting requests in flight "
                  f"finish (up to {cfg.settings.grace:g}s; signal again to stop now)", flush=True)
            stop.set()
        else:
            for s in list(lb.sessions):
                if s.transport is not None:
                    s.transport.abort()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    starting = asyncio.ensure_future(lb.start())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([starting, stopped], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():  # a signal while the managed servers were starting
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, ListenError):
            await starting
        await lb.stop(grace=0)
        print(f"{PROG}: stopped", flush=True)
        return 0
    try:
        starting.result()
    except ListenError as e:
        stopped.cancel()
        if cfg.source is None:  # the quick form: name the option, not the generated key
            return _fail(f'command line: --bind "{e.address}": cannot listen: {e.reason}')
        return _fail(f"{cfg.source}: {e}")
    _banner(lb)
    await stopped
    await lb.stop()
    print(f"{PROG}: stopped", flush=True)
    return 0


def _banner(lb: LoadBalancer) -> None:
    out = []
    for name, fe in lb.frontends.items():
        where = ", ".join(f"{h}:{p}" if ":" not in h else f"[{h}]:{p}" for h, p in lb.addresses[name])
        out.append(f"{PROG}: frontend {name} ({fe.mode}) listening on {where}")
    for name, be in lb.backends.items():
        servers = ", ".join(f"{s.name} {s.address}" + (" (backup)" if s.backup else "")
                            for s in be.servers)
        out.append(f"{PROG}: backend {name} ({be.cfg.balance}): {servers}")
    for key, sup in lb.supervisors.items():
        state = sup.server.state
        out.append(f"{PROG}: app server {key} on http://{sup.server.address}/ "
                   f"(pid {sup.pid}, {state}): {' '.join(sup.argv)}")
    if lb.supervisors:
        data_dir = Path(lb.data_dir or lb.config.settings.data_dir).resolve()
        out.append(f"{PROG}: data directory {data_dir}")
    for name in lb.frontends:
        for host, port in lb.addresses[name]:
            shown = f"[{host}]" if ":" in host else host
            if lb.frontends[name].mode == "http":
                out.append(f"{PROG}: ready: http://{shown}:{port}/")
    out.append(f"{PROG}: press Ctrl-C (or send SIGTERM) to stop")
    print("\n".join(out), flush=True)
