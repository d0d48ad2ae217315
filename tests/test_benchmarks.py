"""The benchmark runner, run for real: `python -m benchmarks --quick` against haproxy and foobar_lb.

A missing tool (wrk, haproxy, nginx, pproxy) fails this test with the runner's own message
(how to install it); it is never skipped: the test command installs them. foobar_lb runs as a
master and workers: its CPU must be read from all of them, so every run records a CPU per request
above 0 and more than one process measured, and the report names the worker count. Every run
also records the server connections the proxy opened (the backends' own accept counters): HAProxy,
the reference, opens about one per request when each client connection carries one request
(http-close-c20) and far fewer than one per request on keep-alive client connections, which is
what shows that the counter counts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_quick_run_measures_haproxy_and_foobar_lb_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks", "--quick", "--scenarios", "http-small-c50,http-close-c20",
             "--out", str(out)],
            cwd=REPO, capture_output=True, text=True, timeout=120,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"python -m benchmarks --quick took over 120s; stderr so far:\n{exc.stderr}")
    assert proc.returncode == 0, (f"python -m benchmarks exited {proc.returncode}\n"
                                  f"stderr:\n{proc.stderr}\nstdout:\n{proc.stdout}")

    doc = json.loads((out / "results.json").read_text())
    result = doc["results"]["http-small-c50"]
    # floor: the least a Python proxy on uvloop and httptools does (benchmarks/floor_proxy.py)
    assert set(result["targets"]) == {"haproxy", "foobar_lb", "floor"}
    summary = doc["summaries"]["http-small-c50"]
    for target in ("haproxy", "foobar_lb", "floor"):
        runs = [r for r in result["runs"] if r["target"] == target]
        assert runs, f"no run of {target}"
        for run in runs:
            assert run["rps"] > 0 and run["requests"] > 0
            assert run["cpu_pct"] > 0
            assert run["user_us_per_req"] + run["system_us_per_req"] > 0
            assert run["latency_ms"]["p50"] > 0 and run["latency_ms"]["p99"] >= run["latency_ms"]["p50"]
        s = summary[target]
        assert s["rps"] > 0 and s["cpu_pct"] > 0 and s["cpu_us_per_req"] > 0

    # foobar_lb's master never proxies: its CPU is that of the master and every worker, summed
    for run in (r for r in result["runs"] if r["target"] == "foobar_lb"):
        cpu = run["user_us_per_req"] + run["system_us_per_req"]
        assert cpu > 0, f"foobar_lb recorded {cpu} us of CPU per request in round {run['round']}"
        assert len(run["proxy_pids"]) >= 2, f"only {run['proxy_pids']} measured: not master and workers"
        assert run["proxy_pids"][0] == result["pids"]["foobar_lb"]
    assert doc["machine"]["workers"] == 1 and doc["options"]["workers"] == 1
    assert any("summed over the master and every worker" in n for n in doc["notes"]), doc["notes"]
    assert not any("its own pid measured" in n for n in doc["notes"])
    assert summary["foobar_lb"]["ratio_rps"] > 0

    # server connections opened per request, in every run of both scenarios
    for name in ("http-small-c50", "http-close-c20"):
        res = doc["results"][name]
        assert set(res["targets"]) == {"haproxy", "foobar_lb", "floor"}, name
        assert "stub_status" in res["server_conns_source"]
        for run in res["runs"]:
            assert isinstance(run["server_conns"], int) and run["server_conns"] >= 0, (name, run)
            assert run["server_conns_per_req"] >= 0
            assert run["server_conns_per_req"] == pytest.approx(run["server_conns"] / run["requests"])
        for target in ("haproxy", "foobar_lb"):
            assert doc["summaries"][name][target]["server_conns_per_req"] >= 0
    assert doc["results"]["http-close-c20"]["headers"] == ["Connection: close"]
    assert doc["results"]["http-close-c20"]["connections"] == 20
    for run in (r for r in result["runs"] if r["target"] == "haproxy"):  # keep-alive: reused
        assert run["server_conns"] <= 4 * result["connections"], run
    for run in (r for r in doc["results"]["http-close-c20"]["runs"] if r["target"] == "haproxy"):
        assert 0.5 <= run["server_conns_per_req"] <= 1.5, run  # HAProxy: one per client connection
    rows = {row["target"]: row for row in doc["targets"]}
    close_rows = [row for row in doc["targets"] if row["scenario"] == "http-close-c20"]
    assert {row["metric"] for row in close_rows} == {"ratio_cpu_per_req", "ratio_p99"}
    assert all(row["status"] != "not measured" and row["value"] > 0 for row in close_rows), close_rows
    stretch = [row for row in doc["targets"] if row["stretch"]]
    assert [(r["scenario"], r["metric"], r["limit"]) for r in stretch] == [
        ("http-small-c50", "ratio_cpu_per_req", 1.10)]
    assert rows["HTTP small c=50: CPU per request (user+system) vs HAProxy"]["limit"] == 1.35
    floor = rows["Floor proxy, HTTP small c=50: CPU per request (user+system) vs HAProxy"]
    assert floor["status"] == "reported (no target)" and floor["value"] > 0, floor
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["haproxy"].startswith("HAProxy")

    for name in ("results.md", "results.png"):
        assert (out / name).stat().st_size > 0, f"{name} is empty"
    md = (out / "results.md").read_text()
    assert "## http-small-c50" in md and "## http-close-c20" in md and "## Targets" in md
    assert "server conns/req" in md and "New connection per request c=20" in md
    assert "- workers: 1 (foobar_lb --workers 1" in md and "HAProxy nbthread 1" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## http-small-c50" in proc.stdout  # the Markdown is printed too


def test_cost_rows_divide_a_scenario_by_another_and_the_baseline():
    """The rows of issue 13 and 14 (metrics vs --baseline-src, access log on vs off, the load
    beside slow clients vs without) are ratios the report computes from the summaries."""
    sys.path.insert(0, str(REPO))
    from benchmarks import report

    def run(target, rps, cpu):
        return {"target": target, "rps": rps, "latency_ms": {"p50": 1.0, "p99": 2.0},
                "user_us_per_req": cpu / 2, "system_us_per_req": cpu / 2, "errors": {},
                "cpu_pct": 99.0, "requests": 1000, "other_cpu_pct": {}}

    def result(name, runs):
        return {"scenario": name, "kind": "wrk", "targets": sorted({r["target"] for r in runs}),
                "reference": "haproxy", "runs": runs, "rounds": 5, "duration": 10}

    results = {
        "http-small-c50": result("http-small-c50", [
            run("haproxy", 100.0, 10.0), run("foobar_lb", 70.0, 14.0),
            run("foobar_lb-baseline", 50.0, 20.0)]),
        "http-log-c50": result("http-log-c50", [run("haproxy", 80.0, 12.0),
                                                run("foobar_lb", 45.0, 21.0)]),
        "http-trickle-c50": result("http-trickle-c50", [run("haproxy", 90.0, 10.0),
                                                        run("foobar_lb", 63.0, 15.0)]),
    }
    summaries = {n: report.summarize(r) for n, r in results.items()}
    rows = {row["target"]: row for row in report.evaluate_targets(summaries, results)}
    metrics = rows["Metrics (always on), HTTP small c=50: CPU per request vs foobar_lb before "
                   "them (--baseline-src)"]
    assert (metrics["value"], metrics["status"]) == (0.7, "met")
    log = rows["Access log on vs off, HTTP small c=50: foobar_lb CPU per request"]
    assert (log["value"], log["status"]) == (1.5, "reported (no target)")
    assert rows["Access log on vs off, HTTP small c=50: HAProxy CPU per request"]["value"] == 1.2
    trickle = rows["Beside 200 uploads trickling at 10 B/s: foobar_lb req/s vs without"]
    assert (trickle["value"], trickle["status"]) == (0.9, "met")
    slowloris = rows["Beside 500 slowloris connections: foobar_lb req/s vs without"]
    assert slowloris["status"] == "not measured"
