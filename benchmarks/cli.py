"""`python -m benchmarks`: options, the run from tool check to report, and its exit status.

Rule: exit 0 with the report written and printed; 2 when a tool is missing or an option is
wrong (one line each, how to fix it); 1 when a target or a run failed (which process, its
output tail); 130 on Ctrl-C. Whatever the exit, every process the run started has been
stopped by its pid before it returns.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from . import report
from .scenarios import (
    BASELINE_SCENARIO,
    REMEASURE_DISTURBED,
    SCENARIOS,
    TARGET_KINDS,
    Bench,
    progress,
    run_idle_scenario,
    run_wrk_scenario,
    target_kind,
)
from .tools import BenchError, Pinning, Processes, check_tools, machine_description, raise_nofile_limit

DEFAULTS = {"rounds": 5, "duration": 10.0, "warmup": 2.0, "idle_connections": 10_000, "wait_quiet": 30.0}
QUICK = {"rounds": 1, "duration": 2.0, "warmup": 0.0, "idle_connections": 500, "wait_quiet": 0.0}
QUICK_SCENARIOS = ("http-small-c50", "http-close-c20", "tcp-small-c50", "idle-10k")
OUT_DEFAULT = Path(__file__).resolve().parent / "out"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark foobar_lb side by side with HAProxy (and pproxy in TCP mode) with wrk, "
                    "in interleaved rounds, against nginx (or foobar_app) backends it starts itself; "
                    "writes results.json, results.md and results.png and prints the Markdown.",
        epilog="Scenarios: " + "; ".join(f"{n}: {s.title}" for n, s in SCENARIOS.items())
               + ". Needs wrk, haproxy, nginx, taskset (apt) and pproxy, matplotlib (pip).",
    )
    p.add_argument("--scenarios", metavar="A,B",
                   help=f"comma-separated scenarios to run (default: all: {','.join(SCENARIOS)})")
    p.add_argument("--targets", metavar="A,B",
                   help=f"comma-separated kinds of target to run, of {','.join(TARGET_KINDS)} "
                        "(default: all; e.g. haproxy,foobar_lb skips pproxy and floor; floor is "
                        "benchmarks/floor_proxy.py, the least a Python proxy on uvloop and httptools "
                        "does per request, one process; in TCP mode a bare relay)")
    p.add_argument("--rounds", type=int, metavar="N",
                   help=f"interleaved rounds per scenario (default {DEFAULTS['rounds']})")
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help=f"length of each measured wrk run (default {DEFAULTS['duration']:g})")
    p.add_argument("--warmup", type=float, metavar="SECONDS",
                   help=f"one unmeasured wrk run per target before the rounds; 0: none "
                        f"(default {DEFAULTS['warmup']:g})")
    p.add_argument("--idle-connections", type=int, metavar="N",
                   help=f"connections held open in idle-10k (default {DEFAULTS['idle_connections']})")
    p.add_argument("--wait-quiet", type=float, metavar="SECONDS",
                   help="before each measured run, wait up to this long for CPU load from other processes "
                        "on the machine to stop, and measure a run disturbed by such load again (at most "
                        f"{REMEASURE_DISTURBED} times); 0: neither (default {DEFAULTS['wait_quiet']:g}; "
                        "every run records the other load it saw either way)")
    p.add_argument("--out", type=Path, default=OUT_DEFAULT, metavar="DIR",
                   help="where results.json, results.md and results.png go (default benchmarks/out/)")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="foobar_lb worker processes (foobar_lb --workers N) and HAProxy threads "
                        "(nbthread N) (default 1); pproxy stays one process. The proxy gets cores 1..N "
                        "to itself when the machine has more than N cores; otherwise it is not pinned, "
                        "shares the cores with wrk and nginx, and its figures are reported with no target")
    p.add_argument("--baseline-src", type=Path, metavar="DIR",
                   help="another checkout's src/ directory (e.g. a `git worktree` of the commit "
                        "before a change), run in http-small-c50 as the target foobar_lb-baseline "
                        "beside this tree's foobar_lb: what the change costs, measured in the same "
                        "run (issue 13: metrics may cost at most 5%% of the CPU per request)")
    p.add_argument("--pproxy-loop", choices=("uvloop", "asyncio"), default="uvloop",
                   help="event loop pproxy runs on (default uvloop, what pproxy picks itself when it can)")
    p.add_argument("--quick", action="store_true",
                   help=f"a short run (under a minute): {QUICK['rounds']} round, "
                        f"{QUICK['duration']:g} s runs, "
                        f"no warm-up, only {', '.join(QUICK_SCENARIOS)} (with {QUICK['idle_connections']} "
                        "connections); options given explicitly still win")
    return p.parse_args(argv)


def _split(value: str | None, known, what: str, parser_error) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        parser_error(f"--{what}: unknown {', '.join(bad) or '(empty)'}; expected some of {', '.join(known)}")
    return names


def _usage_error(message: str) -> None:
    print(f"python -m benchmarks: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _interrupt(signum, frame):  # SIGTERM: unwind like Ctrl-C, through every finally
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = _split(args.scenarios, list(SCENARIOS), "scenarios", _usage_error)
    kinds = _split(args.targets, TARGET_KINDS, "targets", _usage_error) or list(TARGET_KINDS)
    base = QUICK if args.quick else DEFAULTS
    rounds = args.rounds if args.rounds is not None else base["rounds"]
    duration = args.duration if args.duration is not None else base["duration"]
    warmup = args.warmup if args.warmup is not None else base["warmup"]
    idle_n = args.idle_connections if args.idle_connections is not None else base["idle_connections"]
    wait_quiet = args.wait_quiet if args.wait_quiet is not None else base["wait_quiet"]
    if scenarios is None:
        scenarios = list(QUICK_SCENARIOS if args.quick else SCENARIOS)
    workers = args.workers
    if args.baseline_src is not None and not (args.baseline_src / "foobar_lb").is_dir():
        _usage_error(f"--baseline-src {args.baseline_src}: no foobar_lb package in it (give a "
                     "checkout's src directory)")
    if rounds < 1 or duration < 1 or warmup < 0 or idle_n < 1 or wait_quiet < 0 or workers < 1:
        _usage_error("--rounds, --duration, --idle-connections and --workers must be at least 1, "
                     "--warmup and --wait-quiet at least 0")
    notes: list[str] = []
    if args.quick:
        cut = [f"{rounds} round" + ("" if rounds == 1 else "s") + f" (not {DEFAULTS['rounds']})",
               f"{duration:g} s runs (not {DEFAULTS['duration']:g})",
               "no warm-up" if warmup == 0 else f"{warmup:g} s warm-up",
               "no waiting for other load" if wait_quiet == 0 else f"waits up to {wait_quiet:g}s for quiet"]
        left_out = [n for n in SCENARIOS if n not in scenarios]
        if "idle-10k" in scenarios:
            cut.append(f"idle-10k with {idle_n:,} connections (not {DEFAULTS['idle_connections']:,})")
        if left_out:
            cut.append("left out: " + ", ".join(left_out))
        line = "quick run: " + "; ".join(cut)
        progress(line)
        notes.append(line)

    tools, missing = check_tools(need_pproxy="pproxy" in kinds)
    if missing:
        for line in missing:
            print(f"python -m benchmarks: {line}", file=sys.stderr)
        return 2

    soft, hard = raise_nofile_limit()
    pinning = Pinning.for_machine(tools.get("taskset"), workers)
    if not pinning.enabled:
        notes.append("one core only: no pinning; wrk, nginx and the proxy share the CPU")
    if not pinning.proxy_has_own_cores:
        notes.append(f"workers {workers} on {pinning.cores} core(s): the proxy under test cannot have cores "
                     "of its own; it is not pinned and the load generator (wrk, nginx"
                     + (", foobar_app" if "e2e-app" in scenarios else "")
                     + ") shares the cores with it, so its CPU and latency include that contention: "
                     "figures are reported, with no target")
    if "idle-10k" in scenarios:
        allowed = max(100, min(soft, hard) - 1000)  # the runner and the proxy each hold one fd per connection
        if idle_n > allowed:
            notes.append(f"idle-10k: the open-file limit ({soft}/{hard}) allows {allowed:,} connections, "
                         f"not {idle_n:,}: measured with {allowed:,}")
            idle_n = allowed
    if "pproxy" in kinds and "tcp-small-c50" in scenarios:
        notes.append("pproxy is a plain TCP forwarder (tunnel://) to ONE backend (nginx server 1): "
                     f"it does not balance; it runs on {args.pproxy_loop} through "
                     "benchmarks/pproxy_launch.py "
                     "(pproxy 2.7.9 cannot start by itself next to uvloop 0.23); it is one process "
                     "whatever --workers")
    if "http-close-c20" in scenarios and "haproxy" in kinds:
        notes.append("http-close-c20: HAProxy's `http-reuse safe` sends the first request of every client "
                     "connection over a server connection of its own (HAProxy's manual, http-reuse), so "
                     "with one request per client connection it opens a server connection per request; "
                     "it closes them with a reset, which leaves no TIME_WAIT socket behind, so counting "
                     "sockets (ss, /proc/net/tcp) misses them: server conns/req counts what the backends "
                     "accepted")
    over_fd = "idle-10k" in scenarios and 2 * (idle_n + 200) + 300 > hard
    notes.append(f"HAProxy: nbthread {workers}, maxconn 8000 (wrk scenarios); idle-10k: maxconn = "
                 "connections + 200"
                 + (", with ulimit-n at the hard limit and no strict-limits" if over_fd else "")
                 + "; one process: its CPU (user, system) and RSS are those of that process, all its "
                 "threads (read the same way, over its process tree)")
    notes.append(f"foobar_lb: a master (which does not proxy) and {workers} worker process"
                 + ("" if workers == 1 else "es") + ", uvloop; its CPU (user, system) and RSS are summed "
                 "over the master and every worker (the started pid and all its descendants, "
                 "/proc/PID/task/*/children, read at both ends of each run); no health checks on either "
                 "proxy; same timeouts (connect 5s, client 30s, server 30s; idle-10k: client and "
                 "keep-alive 5m)")

    workdir = Path(tempfile.mkdtemp(prefix="foobar-bench-"))
    procs = Processes(workdir)
    machine = machine_description(tools, pinning)
    with contextlib.suppress(OSError):
        machine["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    bench = Bench(procs, tools, pinning, workdir, hard, pproxy_loop=args.pproxy_loop, workers=workers,
                  wait_quiet=wait_quiet, baseline_src=args.baseline_src)
    results: dict[str, dict] = {}
    started = time.monotonic()
    old_term = signal.signal(signal.SIGTERM, _interrupt)
    keep_logs = False
    try:
        progress(f"benchmarks: {pinning.describe()}; work dir {workdir}")
        for name in scenarios:
            sc = SCENARIOS[name]
            targets = [t for t in sc.targets if target_kind(t) in kinds]
            if args.baseline_src is not None and name == BASELINE_SCENARIO and "foobar_lb" in targets:
                targets.insert(targets.index("foobar_lb") + 1, "foobar_lb-baseline")
            if not targets:
                notes.append(f"{name}: skipped (no selected target)")
                continue
            if sc.kind == "idle":
                results[name] = run_idle_scenario(bench, sc, targets, rounds, idle_n)
            else:
                results[name] = run_wrk_scenario(bench, sc, targets, rounds, duration, warmup)
    except BenchError as exc:
        keep_logs = True
        print(f"python -m benchmarks: error: {exc}", file=sys.stderr)
        print(f"python -m benchmarks: every started process was stopped; logs kept in {workdir}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("python -m benchmarks: interrupted; every started process was stopped", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, old_term)
        if not keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)

    summaries = {name: report.summarize(res) for name, res in results.items()}
    for name, res in results.items():
        if res.get("discarded_runs"):
            notes.append(f"{name}: {len(res['discarded_runs'])} run(s) disturbed by other load on the "
                         "machine were measured again (the disturbed ones: results.json, discarded_runs)")
    for name, summ in summaries.items():
        for t, s in summ.items():
            if s.get("errors"):
                notes.append(f"{name}: {t} had errors reported by wrk: "
                             + ", ".join(f"{k} {v}" for k, v in s["errors"].items()))
            if s.get("disturbed_runs"):
                seen = ", ".join(f"{k.replace('_', ' ')} {v:.0f}%" for k, v in s["other_cpu_pct"].items())
                notes.append(f"{name}: {t}: {s['disturbed_runs']} counted run(s) disturbed by other load on "
                             f"the machine (median other load of its runs: {seen})")
            if s.get("failed"):
                notes.append(f"{name}: {t}: {s['failed']} idle connection(s) failed or were closed")
    doc = {
        "machine": machine,
        "options": {"scenarios": scenarios, "targets": kinds, "rounds": rounds, "duration": duration,
                    "warmup": warmup, "idle_connections": idle_n, "wait_quiet": wait_quiet,
                    "quick": args.quick, "workers": workers,
                    "pproxy_loop": args.pproxy_loop},
        "notes": notes,
        "elapsed_seconds": round(time.monotonic() - started, 1),
        "results": results,
        "summaries": summaries,
    }
    doc["targets"] = report.evaluate_targets(summaries, results, judged=pinning.proxy_has_own_cores)
    md = report.write(doc, args.out)
    progress(f"benchmarks: wrote {args.out}/results.json, results.md, results.png "
             f"({doc['elapsed_seconds']:.0f}s of measuring)")
    print(md)
    return 0
