"""Command line: `python -m foobar_app serve`.

Rule of this module: parse arguments and run; user mistakes (bad DSN, port taken) are one line
on stderr with exit status 2, never a traceback. SIGTERM and SIGINT stop the server cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import signal
import sys

from aiohttp import web

from .app import make_app
from .db import DatabaseUnavailable, open_router

__all__ = ["main"]

PROG = "foobar-app"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="foobar_app: the app servers behind foobar_lb")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    serve = sub.add_parser("serve", help="run one app server")
    serve.add_argument("--name", default="server-1", help="this server's name (X-Served-By)")
    serve.add_argument("--bind", default="127.0.0.1:8081", metavar="HOST:PORT")
    serve.add_argument("--db", default="sqlite:///foobar-data/foobar.db", metavar="DSN",
                       help="the primary: sqlite:///path/to/file.db (default "
                            "sqlite:///foobar-data/foobar.db)")
    serve.add_argument("--replica", action="append", default=[], metavar="DSN",
                       help="a replica (repeatable; mysql:// primaries only)")
    serve.add_argument("--readers", type=int, default=4,
                       help="SQLite: read-only connections in the replica pool (default 4)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument("--log-level", default="info",
                       choices=("debug", "info", "warning", "error"))
    return p


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return 2


def _split_bind(bind: str) -> tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f'--bind "{bind}": expected HOST:PORT like 127.0.0.1:8081')
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "serve":
        _parser().print_help()
        return 2
    try:
        host, port = _split_bind(args.bind)
    except ValueError as e:
        return _fail(str(e))
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {args.name}: %(message)s")
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_serve(args, host, port))


async def _serve(args: argparse.Namespace, host: str, port: int) -> int:
    try:
        db = await open_router(args.db, args.replica, **({"readers": args.readers}
                                                         if args.db.startswith("sqlite:") else {}))
    except ValueError as e:
        return _fail(str(e))
    except DatabaseUnavailable as e:
        return _fail(f"--db {args.db}: {e}")
    app = make_app(args.name, db)
    runner = web.AppRunner(app, access_log=logging.getLogger("aiohttp.access")
                           if args.access_log else None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        reason = (e.strerror or str(e)).lower()
        if e.errno == errno.EADDRINUSE:
            reason = "address already in use"
        return _fail(f'--bind "{args.bind}": cannot listen: {reason}')
    backend = getattr(db.database, "describe", lambda: db.dialect)()
    print(f"{PROG}: {args.name} listening on http://{host}:{port} (database: {backend})",
          flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    with contextlib.suppress(Exception):
        await runner.cleanup()
    print(f"{PROG}: {args.name} stopped", flush=True)
    return 0
