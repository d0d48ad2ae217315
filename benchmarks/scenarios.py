"""The scenarios, the processes they need, and the interleaved rounds that measure them.

Rule: in a scenario every target runs at once behind the same backends, each on its own
fresh process; each round runs every target once, in the same order (A B C A B C ...), after
one unmeasured warm-up run per target. A target's CPU (user and system) and RSS are read from
/proc for its whole process tree (the pid started and every descendant: foobar_lb's master and
all its workers, HAProxy's one process with its threads) at both ends of each run; a run that
served requests with no measurable CPU (under one clock tick) fails, naming the target, rather
than report 0. The server connections a target opened during a run are the connections the
backends accepted meanwhile (nginx's stub_status counter; the app servers' own, app_launch),
read at both ends of the run while the other targets of the scenario sit idle with no health
checks. The CPU that anything else on the machine used meanwhile is read too:
a run disturbed by such other load is measured again (at most REMEASURE_DISTURBED times,
when waiting for quiet is on; the discarded runs are kept in the results). A target that
dies, or a wrk run that fails, ends the benchmark: no number is made up.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import configs, idle, wrk
from .tools import (
    CLK_TCK,
    LOOPBACK,
    REPO,
    BenchError,
    Pinning,
    Proc,
    Processes,
    TreeCpu,
    app_accepts,
    core_busy_seconds,
    cpu_seconds,
    free_port,
    http_request,
    nginx_accepts,
    probe,
    process_tree,
    throwaway_certificate,
    tree_cpu,
    tree_rss_kib,
    wait_port,
)

HTTP_TARGETS = ("haproxy", "foobar_lb", "floor")
TCP_TARGETS = ("haproxy-tcp", "foobar_lb-tcp", "pproxy", "floor-tcp")
TARGET_KINDS = ("haproxy", "foobar_lb", "pproxy", "floor")
# where `--baseline-src` adds the target foobar_lb-baseline
BASELINE_SCENARIO = "http-small-c50"
# CPU used by processes outside the benchmark, in % of one core, from which a run is disturbed
OTHER_LOAD_WARN = 10.0
# how many times a disturbed run is measured again (when waiting for quiet is on)
REMEASURE_DISTURBED = 2
# after a target answers its first request: how long it may take to start all its processes and
# go quiet (under SETTLE_CPU_PCT % of a core over a SETTLE_SAMPLE s sample) before it is measured
SETTLE_TIMEOUT = 30.0
SETTLE_CPU_PCT = 5.0
SETTLE_SAMPLE = 0.25
# how the server connections opened during a run are counted, by kind of backend
SERVER_CONNS_SOURCE = {"nginx": "nginx's stub_status accepts counter",
                       "app": "the app servers' accepts counters (benchmarks/app_launch.py)"}


@dataclass(frozen=True)
class Scenario:
    name: str
    kind: str  # "wrk": throughput and latency; "idle": memory per idle connection
    mode: str  # "http" or "tcp": how the proxies are configured
    path: str  # what wrk (or the idle client) asks for
    connections: int
    targets: tuple[str, ...]
    backends: str  # "nginx" or "app"
    title: str
    headers: tuple[str, ...] = ()  # extra request header lines wrk sends (wrk -H)
    tls: bool = False  # clients speak HTTPS to the proxies (TLS termination, same certificate)
    access_log: bool = False  # each proxy writes one access log line per request to a file
    # slow clients kept open beside each measured run (benchmarks/slowclients.py): (kind, count)
    background: tuple[str, int] | None = None

    @property
    def reference(self) -> str:
        return "haproxy-tcp" if self.mode == "tcp" else "haproxy"


SCENARIOS = {s.name: s for s in (
    Scenario("http-small-c50", "wrk", "http", "/", 50, HTTP_TARGETS, "nginx",
             "HTTP, small body (GET /), wrk -t1 -c50"),
    Scenario("http-small-c200", "wrk", "http", "/", 200, HTTP_TARGETS, "nginx",
             "HTTP, small body (GET /), wrk -t1 -c200"),
    Scenario("http-close-c20", "wrk", "http", "/", 20, HTTP_TARGETS, "nginx",
             'HTTP, small body (GET /), a new client connection per request '
             '(wrk -H "Connection: close"), wrk -t1 -c20', headers=("Connection: close",)),
    Scenario("http-log-c50", "wrk", "http", "/", 50, ("haproxy", "foobar_lb"), "nginx",
             "HTTP, small body (GET /), wrk -t1 -c50, with an access log: one line per request "
             "to a file (HAProxy: option httplog to stdout; foobar_lb: [log] access, text)",
             access_log=True),
    Scenario("http-slowloris-c50", "wrk", "http", "/", 50, ("haproxy", "foobar_lb"), "nginx",
             "HTTP, small body (GET /), wrk -t1 -c50, beside 500 slowloris connections (a head "
             "sent a byte a second, reopened when closed)", background=("slowloris", 500)),
    Scenario("http-trickle-c50", "wrk", "http", "/", 50, ("haproxy", "foobar_lb"), "nginx",
             "HTTP, small body (GET /), wrk -t1 -c50, beside 200 uploads of 1 MiB trickling at "
             "10 bytes a second (reopened when cut)", background=("trickle", 200)),
    Scenario("https-small-c50", "wrk", "http", "/", 50, ("haproxy", "foobar_lb"), "nginx",
             "HTTPS (TLS terminated by the proxy, keep-alive), small body (GET /), wrk -t1 -c50",
             tls=True),
    Scenario("http-64k", "wrk", "http", "/64k", 50, HTTP_TARGETS, "nginx",
             "HTTP, 64 KiB body (GET /64k), wrk -t1 -c50"),
    Scenario("tcp-small-c50", "wrk", "tcp", "/", 50, TCP_TARGETS, "nginx",
             "TCP mode, HTTP GET / relayed as bytes, wrk -t1 -c50"),
    Scenario("e2e-app", "wrk", "http", "/items?limit=10", 50, HTTP_TARGETS, "app",
             "end to end: two foobar_app workers on one SQLite file, GET /items?limit=10, wrk -t1 -c50"),
    Scenario("idle-10k", "idle", "http", "/", 10_000, ("haproxy", "foobar_lb"), "nginx",
             "10,000 idle keep-alive client connections, each after one small request: RSS growth"),
)}


def target_kind(target: str) -> str:
    return target.split("-", 1)[0]


def progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class Bench:
    """What every scenario shares: the started processes, tools, pinning, backends."""

    procs: Processes
    tools: dict[str, str]
    pinning: Pinning
    workdir: Path
    nofile_hard: int
    pproxy_loop: str = "uvloop"
    workers: int = 1  # foobar_lb --workers N, HAProxy nbthread N
    wait_quiet: float = 0.0  # before each measured run, wait up to this long for other load to stop
    nginx: tuple[int, int] | None = None
    nginx_status: int | None = None  # nginx's stub_status port (loopback, never proxied)
    apps: tuple[int, int] | None = None
    # `--baseline-src`: another checkout's src/ run as the target foobar_lb-baseline beside this
    # one (the same code before a change: what the change costs, in the same run)
    baseline_src: Path | None = None
    client_side: list[Proc] = field(default_factory=list)  # nginx, app servers: wrk's side

    # -- environment for Python children: this working tree's foobar and benchmarks first --------
    def python_env(self, src: Path | None = None) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(src or REPO / "src"), str(REPO)]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    # -- backends ---------------------------------------------------------------------------------
    def start_nginx(self) -> tuple[int, int]:
        if self.nginx:
            return self.nginx
        ports = (free_port(), free_port())
        status_port = free_port()
        conf = configs.nginx_conf(self.workdir, ports, self.nofile_hard, status_port)
        argv = self.pinning.client([self.tools["nginx"], "-c", str(conf), "-p", str(self.workdir),
                                    "-e", str(self.workdir / "nginx-error.log")])
        proc = self.procs.start("nginx", argv)
        self.client_side.append(proc)
        for port in ports:
            wait_port(proc, port)
            probe(proc, port, "/")
            probe(proc, port, "/64k")
        wait_port(proc, status_port)
        nginx_accepts(status_port)  # fails now, with what nginx answered, if the counter is not there
        self.nginx = ports
        self.nginx_status = status_port
        return ports

    def start_apps(self) -> tuple[int, int]:
        if self.apps:
            return self.apps
        db = self.workdir / "app" / "foobar.db"
        db.parent.mkdir(exist_ok=True)
        ports = (free_port(), free_port())
        for n, port in enumerate(ports, 1):
            argv = self.pinning.client([
                sys.executable, "-m", "benchmarks.app_launch", "serve", "--name", f"server-{n}",
                "--bind", f"{LOOPBACK}:{port}", "--db", f"sqlite:///{db}", "--log-level", "warning"])
            proc = self.procs.start(f"foobar_app server-{n}", argv, env=self.python_env())
            self.client_side.append(proc)
            wait_port(proc, port, timeout=30)
            probe(proc, port, "/health", timeout=30)
            app_accepts(port)  # fails now, with what the app answered, if the counter is not there
        for i in range(20):  # so that reads return data
            body = json.dumps({"name": f"item-{i}", "note": "benchmark data " * 4}).encode()
            status, answer = http_request(ports[i % 2], "POST", "/items", body,
                                          {"Content-Type": "application/json"})
            if status != 201:
                raise BenchError(f"foobar_app: POST /items answered {status}: {answer[:200]!r}")
        self.apps = ports
        return ports

    # -- server connections -------------------------------------------------------------------------
    def server_conns_reading(self, sc: Scenario) -> tuple[int, int]:
        """(connections the backends of `sc` have accepted so far, how many of them this reading
        opened itself): nginx's accepts counter, or the sum of the app servers' counters."""
        if sc.backends == "nginx":
            assert self.nginx_status is not None
            return nginx_accepts(self.nginx_status), 1
        assert self.apps is not None
        return sum(app_accepts(p) for p in self.apps), len(self.apps)

    @staticmethod
    def server_conns_opened(before: tuple[int, int], after: tuple[int, int]) -> int:
        """Connections the backends accepted between two readings, less the second reading's own
        (the first one's were counted before the run began)."""
        return max(0, after[0] - before[0] - after[1])

    def client_pids(self) -> list[int]:
        pids = []
        for p in self.client_side:
            pids += process_tree(p.pid)
        return pids

    def other_cpu(self, before: dict, after: dict, wall: float) -> dict[str, float]:
        """CPU (% of one core) used during a run by anything but this benchmark's own processes:
        on the proxy's cores and on the client's core when the proxy has cores of its own, else
        on all cores together."""
        busy = {c: after["cores"][c] - before["cores"].get(c, after["cores"][c]) for c in after["cores"]}
        client = after["client"] - before["client"] + after["wrk"] - before["wrk"]
        proxy = after["proxy"] - before["proxy"]
        if self.pinning.proxy_has_own_cores:
            cc = int(self.pinning.client_cpus or 0)
            on_proxy_cores = sum(busy.get(c, 0.0) for c in self.pinning.proxy_core_list)
            return {"proxy_core": _pct(on_proxy_cores - proxy, wall),
                    "client_core": _pct(busy.get(cc, 0.0) - client, wall)}
        return {"all_cores": _pct(sum(busy.values()) - proxy - client, wall)}

    def quiet(self) -> float:
        """Wait (at most `wait_quiet` s) until the machine is idle apart from this benchmark's idle
        processes: under OTHER_LOAD_WARN % over a 0.5 s sample. Return the time waited."""
        if self.wait_quiet <= 0:
            return 0.0
        start = time.monotonic()
        said = False
        while True:
            b0 = core_busy_seconds()
            time.sleep(0.5)
            b1 = core_busy_seconds()
            load = 100 * sum(b1[c] - b0.get(c, b1[c]) for c in b1) / 0.5
            waited = time.monotonic() - start
            if load < OTHER_LOAD_WARN or waited >= self.wait_quiet:
                return round(waited, 1)
            if not said:
                progress(f"  (other load on the machine: {load:.0f}% of a core; waiting up to "
                         f"{self.wait_quiet:g}s for it to stop)")
                said = True

    # -- targets ----------------------------------------------------------------------------------
    def start_target(self, target: str, sc: Scenario, timeouts: configs.Timeouts | None = None,
                     maxconn: int = configs.HAPROXY_MAXCONN) -> tuple[Proc, int]:
        timeouts = timeouts or configs.Timeouts()
        ports = self.start_apps() if sc.backends == "app" else self.start_nginx()
        servers = [(LOOPBACK, p) for p in ports]
        port = free_port()
        kind = target_kind(target)
        tag = f"{sc.name}-{target}-{port}"
        cert = throwaway_certificate(self.workdir) if sc.tls else None
        if kind == "haproxy":
            cfg = configs.haproxy_cfg(self.workdir / f"{tag}.cfg", sc.mode, port, servers, timeouts,
                                      maxconn, self.nofile_hard, threads=self.workers,
                                      tls_pem=cert[2] if cert else None, log=sc.access_log)
            argv = self.pinning.proxy([self.tools["haproxy"], "-db", "-f", str(cfg)])
            proc = self.procs.start(target, argv)
        elif kind == "foobar_lb":
            cfg = configs.foobar_lb_toml(self.workdir / f"{tag}.toml", sc.mode, port, servers, timeouts,
                                         tls=cert[:2] if cert else None,
                                         access_log=self.workdir / f"{tag}-access.log"
                                         if sc.access_log else None)
            argv = self.pinning.proxy([sys.executable, "-m", "foobar_lb", "serve", "--config", str(cfg),
                                       "--workers", str(self.workers)])
            src = None
            if target.endswith("-baseline"):
                if self.baseline_src is None:
                    raise BenchError(f"{target}: no --baseline-src given")
                src = self.baseline_src
            proc = self.procs.start(target, argv, env=self.python_env(src))
        elif kind == "pproxy":  # a plain TCP forwarder to ONE backend: it does not balance
            argv = self.pinning.proxy([
                sys.executable, "-m", "benchmarks.pproxy_launch", f"--loop={self.pproxy_loop}",
                "-l", f"tunnel://{LOOPBACK}:{port}", "-r", f"tunnel://{servers[0][0]}:{servers[0][1]}"])
            proc = self.procs.start(target, argv, env=self.python_env())
        elif kind == "floor":  # the least a Python proxy does per request (floor_proxy.py)
            argv = self.pinning.proxy([sys.executable, "-m", "benchmarks.floor_proxy",
                                       *(["--tcp"] if sc.mode == "tcp" else []), str(port),
                                       *(f"{h}:{p}" for h, p in servers)])
            proc = self.procs.start(target, argv, env=self.python_env())
        else:
            raise BenchError(f"unknown target {target!r}")
        wait_port(proc, port)
        probe(proc, port, sc.path, tls=sc.tls)
        self.settle(proc, 1 + self.workers if kind == "foobar_lb" else 1)
        return proc, port

    def settle(self, proc: Proc, processes: int) -> None:
        """Wait until the target's tree has `processes` processes (foobar_lb: the master and its
        workers; a first answer needs only one worker) and has gone quiet, so no start-up work
        is counted in a measured run."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            if not proc.alive():
                raise proc.failure(f"died while starting: {proc.describe_exit()}")
            c0 = tree_cpu(proc.pid)
            time.sleep(SETTLE_SAMPLE)
            c1 = tree_cpu(proc.pid)
            if (len(c1.pids) >= processes
                    and 100 * (c1.seconds - c0.seconds) / SETTLE_SAMPLE < SETTLE_CPU_PCT):
                return
            if time.monotonic() > deadline:
                raise proc.failure(
                    f"not settled {SETTLE_TIMEOUT:.0f}s after its first answer: {len(c1.pids)} process(es) "
                    f"(pids {', '.join(map(str, c1.pids))}; {processes} expected), "
                    f"{100 * (c1.seconds - c0.seconds) / SETTLE_SAMPLE:.0f}% CPU")


# -- wrk scenarios ----------------------------------------------------------------------------------


def _with_background(bench: Bench, sc: Scenario, target: str, proc: Proc, port: int,
                     duration: float, label: str) -> dict:
    """`_measure`, with the scenario's slow clients open beside the run when it has some."""
    if sc.background is None:
        return _measure(bench, sc, target, proc, port, duration, label)
    kind, count = sc.background
    argv = bench.pinning.client([sys.executable, "-m", "benchmarks.slowclients", str(port), kind,
                                 str(count)])
    slow = bench.procs.start(f"slowclients-{kind}", argv, env=bench.python_env())
    try:
        deadline = time.monotonic() + 30
        while '"ready"' not in slow.log.read_text(errors="replace"):
            if not slow.alive() or time.monotonic() > deadline:
                raise slow.failure("did not open its connections")
            time.sleep(0.05)
        run = _measure(bench, sc, target, proc, port, duration, label)
    finally:
        bench.procs.stop(slow)
    lines = [ln for ln in slow.log.read_text(errors="replace").splitlines() if ln.startswith("{")]
    run["background"] = json.loads(lines[-1]) if lines else {"kind": kind, "count": count}
    return run


def _measure(bench: Bench, sc: Scenario, target: str, proc: Proc, port: int, duration: float,
             label: str) -> dict:
    scheme = "https" if sc.tls else "http"
    argv = bench.pinning.client(wrk.command(bench.tools["wrk"], f"{scheme}://{LOOPBACK}:{port}{sc.path}",
                                            sc.connections, duration, headers=sc.headers))
    client_pids = bench.client_pids()
    conns0 = bench.server_conns_reading(sc)
    c0 = tree_cpu(proc.pid)
    before = _snapshot(c0, client_pids)
    t0 = time.monotonic()
    result, _ = wrk.run(argv, duration, label)
    wall = time.monotonic() - t0
    if not proc.alive():
        raise proc.failure(f"died during {label}: {proc.describe_exit()}")
    c1 = tree_cpu(proc.pid)
    after = _snapshot(c1, client_pids)
    server_conns = bench.server_conns_opened(conns0, bench.server_conns_reading(sc))
    if result.requests > 0 and c1.user + c1.system - c0.user - c0.system < 1:
        raise BenchError(
            f"{label}: {target} served {result.requests} requests but its processes used no measurable "
            f"CPU (under one tick, 1/{CLK_TCK} s): read from pid {proc.pid} and its descendants "
            f"(before: {', '.join(map(str, c0.pids))}; after: {', '.join(map(str, c1.pids))}); "
            "the processes that proxy are not the ones measured, so no CPU figure is reported")
    du, ds = (c1.user - c0.user) / CLK_TCK, (c1.system - c0.system) / CLK_TCK
    return {
        "target": target,
        "rps": result.rps,
        "requests": result.requests,
        "wrk_seconds": result.seconds,
        "wall_seconds": round(wall, 3),
        "latency_ms": result.latency_ms,
        "errors": result.errors,
        "read": result.read,
        "cpu_user_s": du,
        "cpu_system_s": ds,
        "cpu_pct": 100.0 * (du + ds) / wall,
        "user_us_per_req": 1e6 * du / result.requests,
        "system_us_per_req": 1e6 * ds / result.requests,
        "server_conns": server_conns,  # TCP connections the backends accepted during the run
        "server_conns_per_req": server_conns / result.requests,
        "server_conns_source": SERVER_CONNS_SOURCE[sc.backends],
        "rss_kib": tree_rss_kib(proc.pid),
        "proxy_pids": list(c1.pids),  # the tree read at the end: the started pid first
        "proxy_pids_at_start": list(c0.pids),
        "other_cpu_pct": bench.other_cpu(before, after, wall),
    }


def _pct(seconds: float, wall: float) -> float:
    return max(0.0, round(100 * seconds / wall, 1))  # tick rounding can make it a hair negative


def _snapshot(proxy: TreeCpu, client_pids: list[int]) -> dict:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk, once it has been waited for
    return {"cores": core_busy_seconds(), "proxy": proxy.seconds,
            "client": cpu_seconds(client_pids), "wrk": ru.ru_utime + ru.ru_stime}


def _fmt_ms(ms: float) -> str:
    return f"{ms * 1000:.0f}us" if ms < 1 else f"{ms:.2f}ms" if ms < 10 else f"{ms:.1f}ms"


def run_wrk_scenario(bench: Bench, sc: Scenario, targets: list[str], rounds: int, duration: float,
                     warmup: float) -> dict:
    started: dict[str, tuple[Proc, int]] = {}
    runs: list[dict] = []
    discarded: list[dict] = []  # runs disturbed by other load and measured again
    try:
        for t in targets:
            started[t] = bench.start_target(t, sc)
        pids = {t: p.pid for t, (p, _) in started.items()}
        trees = {t: process_tree(pid) for t, pid in pids.items()}
        progress(f"{sc.name}: " + ", ".join(
            f"{t} pid {pid}" + (f" (+{len(trees[t]) - 1} descendant(s) measured with it)"
                                if len(trees[t]) > 1 else "")
            for t, pid in pids.items()))
        if warmup > 0:
            for t, (proc, port) in started.items():
                _measure(bench, sc, t, proc, port, warmup, f"{sc.name} {t} warm-up")
                progress(f"[warm-up] {sc.name} {t}: done")
        attempts = 1 + (REMEASURE_DISTURBED if bench.wait_quiet > 0 else 0)
        for r in range(1, rounds + 1):
            for t, (proc, port) in started.items():
                label = f"[round {r}/{rounds}] {sc.name} {t}"
                for attempt in range(1, attempts + 1):
                    waited = bench.quiet()
                    run = _with_background(bench, sc, t, proc, port, duration, label)
                    run.update(round=r, attempt=attempt, waited_for_quiet_s=waited)
                    err = f" errors {run['errors']}" if run["errors"] else ""
                    other = run["other_cpu_pct"]
                    disturbed = max(other.values()) >= OTHER_LOAD_WARN
                    if disturbed:
                        err += " (other load: " + ", ".join(f"{k.replace('_', ' ')} {v:.0f}%"
                                                            for k, v in other.items()) + ")"
                    again = disturbed and attempt < attempts
                    progress(f"{label}: {run['rps']:.0f} req/s p99 {_fmt_ms(run['latency_ms']['p99'])} "
                             f"cpu {run['cpu_pct']:.0f}% "
                             f"{run['user_us_per_req'] + run['system_us_per_req']:.1f}us/req "
                             f"{run['server_conns_per_req']:.3f} server conns/req{err}"
                             + (": disturbed, measuring again" if again else ""))
                    if not again:
                        runs.append(run)
                        break
                    discarded.append(run)
    finally:
        for proc, _ in started.values():
            bench.procs.stop(proc)
    return {"scenario": sc.name, "kind": sc.kind, "mode": sc.mode, "title": sc.title,
            "path": sc.path, "connections": sc.connections, "headers": list(sc.headers),
            "server_conns_source": SERVER_CONNS_SOURCE[sc.backends], "targets": targets,
            "reference": sc.reference, "rounds": rounds, "duration": duration, "warmup": warmup,
            "pids": pids, "runs": runs, "discarded_runs": discarded}


# -- idle connections ---------------------------------------------------------------------------------


def run_idle_scenario(bench: Bench, sc: Scenario, targets: list[str], rounds: int, count: int,
                      time_limit: float = 120.0) -> dict:
    runs: list[dict] = []
    for r in range(1, rounds + 1):
        for t in targets:
            label = f"[round {r}/{rounds}] {sc.name} {t}"
            # a fresh process per measurement: memory freed by closed connections is not returned
            proc, port = bench.start_target(t, sc, timeouts=configs.IDLE_TIMEOUTS, maxconn=count + 200)
            try:
                rss: Callable[[], int] = lambda p=proc: tree_rss_kib(p.pid)  # noqa: E731
                res = idle.hold_idle(port, count, rss, time_limit=time_limit)
                if not proc.alive():
                    raise proc.failure(f"died during {label}: {proc.describe_exit()}")
                tree = process_tree(proc.pid)  # whose RSS was summed
            finally:
                bench.procs.stop(proc)
            run = {"round": r, "target": t, "pid": proc.pid, "proxy_pids": tree,
                   "wanted": res.wanted, "opened": res.opened,
                   "failed": res.failed, "first_error": res.first_error,
                   "open_seconds": round(res.open_seconds, 2), "rss_before_kib": res.rss_before_kib,
                   "rss_after_kib": res.rss_after_kib, "kib_per_conn": res.kib_per_conn}
            runs.append(run)
            fail = f", {res.failed} failed (first: {res.first_error})" if res.failed else ""
            progress(f"{label}: {res.opened} idle connections in {res.open_seconds:.1f}s, RSS "
                     f"{res.rss_before_kib} -> {res.rss_after_kib} KiB = "
                     f"{res.kib_per_conn:.1f} KiB/conn{fail}")
            if res.opened == 0:
                raise BenchError(f"{label}: no idle connection could be opened ({res.first_error})")
    return {"scenario": sc.name, "kind": sc.kind, "mode": sc.mode, "title": sc.title, "path": sc.path,
            "connections": count, "targets": targets, "reference": sc.reference, "rounds": rounds,
            "runs": runs}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")
