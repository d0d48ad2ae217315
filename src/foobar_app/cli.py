"""Command line: `python -m foobar_app serve` and `python -m foobar_app cluster up|status|down`.

Rule of this module: parse arguments and run; user mistakes (bad DSN, port taken, no MariaDB
installed) are one line on stderr with exit status 2, never a traceback. SIGTERM and SIGINT
stop the server cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
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
    serve.add_argument("--cluster", metavar="FILE",
                       help="the primary and replicas from a cluster.json written by `cluster up`")
    serve.add_argument("--readers", type=int, default=4,
                       help="SQLite: read-only connections in the replica pool (default 4)")
    serve.add_argument("--pool-size", type=int, default=10,
                       help="MariaDB: connections per node (default 10)")
    serve.add_argument("--query-timeout", type=_seconds, default=5.0, metavar="DURATION",
                       help="MariaDB: longest a statement may run (default 5s)")
    serve.add_argument("--max-replication-lag", type=_seconds, default=5.0, metavar="DURATION",
                       help="MariaDB: a replica further behind is skipped (default 5s)")
    serve.add_argument("--heartbeat-interval", type=_seconds, default=0.5, metavar="DURATION",
                       help="MariaDB: how often the heartbeat is written and lag read (default 500ms)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument("--log-level", default="info",
                       choices=("debug", "info", "warning", "error"))

    cluster = sub.add_parser("cluster", help="a local MariaDB primary and replicas",
                             description="Create, inspect and stop a MariaDB primary with "
                                         "replicas (GTID replication) under one directory, from "
                                         "the machine's mariadbd and mariadb-install-db.")
    csub = cluster.add_subparsers(dest="action", metavar="ACTION")
    up = csub.add_parser("up", help="create and start the cluster, print its cluster.json")
    up.add_argument("--dir", required=True, help="where the nodes live")
    up.add_argument("--replicas", type=int, default=1, help="how many replicas (default 1)")
    up.add_argument("--general-log", action="store_true",
                    help="log every statement each node runs (DIR/NODE/general.log)")
    for name, text in (("status", "each node's role, replication threads and lag"),
                       ("down", "stop every node")):
        c = csub.add_parser(name, help=text)
        c.add_argument("--dir", required=True)
    return p


def _seconds(text: str) -> float:
    from foobar_lb.units import parse_duration  # the one spelling of durations in the project

    try:
        return parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {e}") from None


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
    if args.command == "cluster":
        return _cluster(args)
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
    primary, replicas = args.db, args.replica
    try:
        if args.cluster:
            from .db.mysql import dsn_from_cluster

            primary, replicas = dsn_from_cluster(args.cluster)
        if primary.startswith("sqlite:"):
            options = {"readers": args.readers}
        else:
            options = {"pool_size": args.pool_size, "query_timeout": args.query_timeout,
                       "max_replication_lag": args.max_replication_lag,
                       "heartbeat_interval": args.heartbeat_interval}
        db = await open_router(primary, replicas, **options)
    except ValueError as e:
        return _fail(str(e))
    except DatabaseUnavailable as e:
        return _fail(f"--db: {e}")
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


def _cluster(args: argparse.Namespace) -> int:
    from .db.cluster import ClusterError, cluster_down, cluster_status, cluster_up

    if args.action is None:
        _parser().parse_args(["cluster", "--help"])
        return 2
    try:
        if args.action == "up":
            if args.replicas < 0:
                return _fail(f"--replicas {args.replicas}: expected 0 or more")
            data = cluster_up(args.dir, args.replicas, general_log=args.general_log)
            print(json.dumps(data, indent=2), flush=True)
        elif args.action == "status":
            rows = cluster_status(args.dir)
            for row in rows:
                print(_status_line(row), flush=True)
        else:
            stopped = cluster_down(args.dir)
            print(f"{PROG}: stopped {', '.join(stopped) if stopped else 'nothing (nothing ran)'}",
                  flush=True)
    except ClusterError as e:
        return _fail(str(e).splitlines()[0])  # the first line names the log to look at
    return 0


def _status_line(row: dict) -> str:
    head = f"{row['node']:<10} {row['role']:<8} port {row['port']:<5} pid {row['pid']:<7}"
    if not row["running"]:
        return f"{head} stopped"
    if "error" in row:
        return f"{head} running, unreachable: {row['error']}"
    if row["role"] != "replica":
        return f"{head} running, read_only={int(row['read_only'])}, gtid {row['gtid'] or '-'}"
    lag = row.get("heartbeat_lag")
    return (f"{head} running, read_only={int(row['read_only'])}, IO thread {row['io_thread']}, "
            f"SQL thread {row['sql_thread']}, Seconds_Behind_Master "
            f"{row['seconds_behind_master']}, heartbeat lag "
            f"{'-' if lag is None else f'{lag:.2f}s'}"
            + (f", error: {row['last_error']}" if row["last_error"] else ""))
