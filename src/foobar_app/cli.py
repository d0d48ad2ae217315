"""Command line: `python -m foobar_app serve` and `python -m foobar_app cluster ACTION`
(up, start, status, down, switchover, failover, rejoin).

Rule of this module: parse arguments and run; user mistakes (bad DSN, port taken, no MariaDB
installed) are one line on stderr with exit status 2, never a traceback. SIGTERM and SIGINT
stop the server cleanly. A `cluster` command of a cluster with a control namespace (`up
--control-netns`, recorded in cluster.json) run outside it re-executes itself there (`ip netns
exec NAME python -m foobar_app cluster ...`, the same arguments) and exits with its status.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import subprocess
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
                       help="MariaDB: how often each node is checked and the heartbeat written; "
                            "a node silent for twice this is hung (default 500ms)")
    serve.add_argument("--causal-reads", choices=("session", "fast", "none"), default="session",
                       help="reads carrying a causal token (X-Causal-Token or the foobar_causal "
                            "cookie): session = a replica known to have it, else wait on one "
                            "up to --causal-timeout, else the primary; fast = a replica known "
                            "to have it, else the primary at once; none = ignore the token "
                            "(default session)")
    serve.add_argument("--causal-timeout", type=_seconds, default=1.0, metavar="DURATION",
                       help="session mode: the longest a read waits for a replica to catch up "
                            "before it goes to the primary (default 1s)")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument("--log-level", default="info",
                       choices=("debug", "info", "warning", "error"))

    cluster = sub.add_parser("cluster", help="a local MariaDB primary and replicas",
                             description="Create, inspect and stop a MariaDB primary with "
                                         "replicas (GTID replication) under one directory, from "
                                         "the machine's mariadbd and mariadb-install-db.")
    csub = cluster.add_subparsers(dest="action", metavar="ACTION")
    up = csub.add_parser("up", help="create and start the cluster (or start a stopped one "
                                    "again), print its cluster.json")
    up.add_argument("--dir", required=True, help="where the nodes live")
    up.add_argument("--replicas", type=int, default=1, help="how many replicas (default 1)")
    up.add_argument("--general-log", action="store_true",
                    help="log every statement each node runs (DIR/NODE/general.log)")
    up.add_argument("--semisync", action="store_true",
                    help="semi-synchronous replication (AFTER_SYNC): a commit is acknowledged "
                         "once a replica has it, so `failover` loses no acknowledged write")
    up.add_argument("--host", action="append", default=[], metavar="NAME=ADDR[:PORT][@NETNS]",
                    help="a node on another host (repeatable; the first is the primary, "
                         "--replicas is then ignored): it listens on ADDR:3306 (or PORT), "
                         "started in network namespace NETNS when given, and every command "
                         "reaches it over TCP at ADDR")
    up.add_argument("--control-netns", metavar="NAME",
                    help="the network namespace every command of this cluster runs from "
                         "(recorded; a command run elsewhere re-executes itself there)")
    for name, text in (("status", "each node's role, state, GTID position and lag"),
                       ("down", "stop every node"),
                       ("start", "start a stopped cluster again, with its data"),
                       ("switchover", "move the primary role to a replica (the primary "
                                      "reachable; loses nothing)"),
                       ("failover", "promote the most advanced replica (the primary "
                                    "unreachable)"),
                       ("rejoin", "make a returning old primary (or any node) a replica")):
        c = csub.add_parser(name, help=text)
        c.add_argument("--dir", required=True)
        if name == "switchover":
            c.add_argument("--to", metavar="NAME", help="the replica to promote (default: the "
                                                        "most advanced)")
        if name == "rejoin":
            c.add_argument("name", metavar="NAME", help="the node to rejoin")
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
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if args.command == "cluster":
        return _cluster(args, argv)
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
        names = None
        if args.cluster:
            from .db.mysql import cluster_nodes

            found = cluster_nodes(args.cluster)  # every node; the app finds their roles itself
            names = [name for name, _ in found]
            primary, replicas = found[0][1], [dsn for _, dsn in found[1:]]
        options: dict = {"causal_reads": args.causal_reads, "causal_timeout": args.causal_timeout}
        if primary.startswith("sqlite:"):
            options["readers"] = args.readers
        else:
            options.update(pool_size=args.pool_size, query_timeout=args.query_timeout,
                           max_replication_lag=args.max_replication_lag,
                           heartbeat_interval=args.heartbeat_interval, names=names)
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


def _parse_host(text: str) -> dict:
    """NAME=ADDR[:PORT][@NETNS] -> {"name", "address", "netns"[, "port"]}."""
    name, eq, rest = text.partition("=")
    where, _, netns = rest.partition("@")
    address, port = where, ""
    if where.count(":") == 1:  # (an IPv6 address has several: no port then)
        address, _, port = where.partition(":")
    if not eq or not name or not address or (port and not port.isdigit()):
        raise ValueError(f'--host "{text}": expected NAME=ADDR[:PORT][@NETNS] like '
                         f"db1=10.213.0.31@fblab-db1")
    host: dict = {"name": name, "address": address, "netns": netns}
    if port:
        host["port"] = int(port)
    return host


REEXEC_ENV = "FOOBAR_CLUSTER_IN_NETNS"


def _reexec(c, args: argparse.Namespace, argv: list[str]) -> int | None:
    """Run this command again inside the cluster's control namespace when not there (its exit
    status), or None to run it here."""
    if args.action == "down":  # by pid: no network needed, and its namespace may be gone
        return None
    netns = args.control_netns if args.action == "up" else c.control_netns_of(args.dir)
    if not netns:
        return None
    here = os.stat("/proc/self/ns/net").st_ino
    if here == c.netns_inode(netns):
        return None
    if os.environ.get(REEXEC_ENV) == netns:
        raise c.ClusterError(f"control namespace {netns!r}: not entered by `ip netns exec`")
    cmd = ["ip", "netns", "exec", netns, sys.executable, "-m", "foobar_app", *argv]
    try:
        return subprocess.run(cmd, env={**os.environ, REEXEC_ENV: netns}).returncode
    except FileNotFoundError:
        raise c.ClusterError(f"control namespace {netns!r}: no `ip` command (install "
                             "iproute2)") from None


def _cluster(args: argparse.Namespace, argv: list[str]) -> int:
    from .db import cluster as c

    if args.action is None:
        _parser().parse_args(["cluster", "--help"])
        return 2
    try:
        rc = _reexec(c, args, argv)
        if rc is not None:
            return rc
        if args.action == "up":
            if args.replicas < 0:
                return _fail(f"--replicas {args.replicas}: expected 0 or more")
            try:
                hosts = [_parse_host(h) for h in args.host] or None
            except ValueError as e:
                return _fail(str(e))
            data = c.cluster_up(args.dir, args.replicas, general_log=args.general_log,
                                semisync=args.semisync, hosts=hosts,
                                control_netns=args.control_netns)
            print(json.dumps(data, indent=2), flush=True)
        elif args.action == "status":
            for row in c.cluster_status(args.dir):
                print(_status_line(row), flush=True)
        elif args.action == "start":
            started = c.cluster_start(args.dir)
            print(f"{PROG}: started {', '.join(started) if started else 'nothing (all ran)'}",
                  flush=True)
        elif args.action == "switchover":
            r = c.cluster_switchover(args.dir, args.to)
            print(f"{PROG}: switchover done in {r['seconds']:.2f}s: {r['primary']} is the "
                  f"primary (at {r['position']}); {r['previous']} was fenced first "
                  f"({r['sessions_killed']} session(s) killed) and replicates from it; no "
                  f"acknowledged write lost", flush=True)
        elif args.action == "failover":
            r = c.cluster_failover(args.dir)
            print(f"{PROG}: failover done in {r['seconds']:.2f}s: {r['primary']} is the primary "
                  f"(at {r['position'] or '-'}); {', '.join(r['replicas']) or 'no replica'} "
                  f"repointed; {r['previous']} is fenced until `cluster rejoin`", flush=True)
            print(f"{PROG}: {_loss_line(r)}", flush=True)
        elif args.action == "rejoin":
            r = c.cluster_rejoin(args.dir, args.name)
            print(f"{PROG}: {r['node']} replicates from {r['primary']} (caught up at "
                  f"{r['position']})", flush=True)
        else:
            stopped = c.cluster_down(args.dir)
            print(f"{PROG}: stopped {', '.join(stopped) if stopped else 'nothing (nothing ran)'}",
                  flush=True)
    except c.ClusterError as e:
        return _fail(str(e).splitlines()[0])  # the first line names the log to look at
    except (c.pymysql.err.MySQLError, OSError) as e:  # a node failed mid-command
        return _fail(f"cluster {args.action}: a node did not answer as expected: {e}")
    return 0


def _loss_line(r: dict) -> str:
    if r["lost"] is None:
        told = (f"its last position is unknown (it is unreachable); every transaction it "
                f"committed after {r['position'] or 'the start'} is lost")
    elif r["lost"] == 0:
        return (f"{r['previous']}: its binary log ends at {r['previous_position']}, all on "
                f"{r['primary']}: nothing is lost")
    else:
        told = (f"its binary log ends at {r['previous_position']}: {r['lost']} transaction(s) "
                f"committed there are not on {r['primary']} and are lost")
    guard = ("semi-sync was on: none of them was acknowledged to a client while "
             "Rpl_semi_sync_master_status was ON" if r["semisync"] else
             "asynchronous replication: they may have been acknowledged to clients")
    return f"{r['previous']}: {told} ({guard})"


def _status_line(row: dict) -> str:
    where = (f"{row['address']}:{row['port']:<5}" if row.get("address")
             else f"port {row['port']:<5}")
    head = f"{row['node']:<10} {row['role']:<8} {where} pid {row['pid']:<7}"
    if not row["running"]:
        return f"{head} stopped"
    if "error" in row:
        return f"{head} running, unreachable: {row['error']}"
    line = (f"{head} running, {row['state']}, read_only={int(row['read_only'])}, "
            f"gtid {row['gtid'] or '-'}, epoch {row.get('epoch', 0)}")
    if "semisync" in row:
        line += f", semi-sync {'ON' if row['semisync'] == 'ON' else 'OFF (asynchronous)'}"
    if "io_thread" not in row:
        return line
    lag = row.get("heartbeat_lag")
    source = (f"{row['master_host']}:{row['master_port']}" if row.get("address")
              else f"port {row['master_port']}")
    return (f"{line}, from {source}, IO thread {row['io_thread']}, "
            f"SQL thread {row['sql_thread']}, Seconds_Behind_Master "
            f"{row['seconds_behind_master']}, heartbeat lag "
            f"{'-' if lag is None else f'{lag:.2f}s'}"
            + (f", error: {row['last_error']}" if row["last_error"] else ""))
