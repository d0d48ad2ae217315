"""Summaries, ratios, targets, and the three output files (results.json, results.md, results.png).

Rule: every figure is a median over rounds (req/s also with its min-max); a ratio is always
foobar_lb's median over the reference's median (HAProxy in the same mode, measured in the same
run), so "1.00x" means "as good as HAProxy" and the issue's targets read directly off it. A
target whose scenario was not run, or whose reference was not measured, is "not measured",
never met; when the proxy had no cores of its own (as many workers as cores, or more), every
figure is "reported (no target)", never met or missed. The targets are those of issue 11 (the
HTTP engine), a stretch goal among them marked as such. Server connections per request are
the connections the backends accepted during a run over the requests wrk completed in it. The
worker count heads the report.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .scenarios import OTHER_LOAD_WARN, median, target_kind


def _med(runs: list[dict], key) -> float:
    return median([key(r) for r in runs])


def summarize(result: dict) -> dict:
    """Per target medians (and req/s min-max); then ratios to the reference target."""
    per: dict[str, dict] = {}
    for t in result["targets"]:
        runs = [r for r in result["runs"] if r["target"] == t]
        if not runs:
            continue
        if result["kind"] == "idle":
            kib = [r["kib_per_conn"] for r in runs]
            per[t] = {
                "opened": min(r["opened"] for r in runs), "wanted": result["connections"],
                "failed": sum(r["failed"] for r in runs),
                "rss_before_kib": _med(runs, lambda r: r["rss_before_kib"]),
                "rss_after_kib": _med(runs, lambda r: r["rss_after_kib"]),
                "kib_per_conn": median(kib), "kib_per_conn_min": min(kib), "kib_per_conn_max": max(kib),
            }
            continue
        rps = [r["rps"] for r in runs]
        errors: dict[str, int] = {}
        for r in runs:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        per[t] = {
            "rps": median(rps), "rps_min": min(rps), "rps_max": max(rps),
            "p50_ms": _med(runs, lambda r: r["latency_ms"]["p50"]),
            "p99_ms": _med(runs, lambda r: r["latency_ms"]["p99"]),
            "cpu_pct": _med(runs, lambda r: r["cpu_pct"]),
            "user_us_per_req": _med(runs, lambda r: r["user_us_per_req"]),
            "system_us_per_req": _med(runs, lambda r: r["system_us_per_req"]),
            "cpu_us_per_req": _med(runs, lambda r: r["user_us_per_req"] + r["system_us_per_req"]),
            "server_conns_per_req": _med(runs, lambda r: r.get("server_conns_per_req", math.nan)),
            "requests": sum(r["requests"] for r in runs),
            "errors": errors,
            "other_cpu_pct": {k: _med(runs, lambda r, k=k: r["other_cpu_pct"][k])
                              for k in runs[0].get("other_cpu_pct", {})},
            "disturbed_runs": sum(1 for r in runs
                                  if max(r.get("other_cpu_pct", {}).values(), default=0) >= OTHER_LOAD_WARN),
        }
        bg = [r["background"] for r in runs if "background" in r]
        if bg:  # the slow clients beside the runs: what the proxy did with them
            per[t]["background"] = {k: sum(b.get(k, 0) for b in bg) for k in
                                    ("opened", "closed_by_proxy", "answered_408", "connect_failures")}
    ref = per.get(result["reference"])
    for t, s in per.items():
        if t == result["reference"] or ref is None:
            continue
        if result["kind"] == "idle":
            s["ratio_kib_per_conn"] = _ratio(s["kib_per_conn"], ref["kib_per_conn"])
        else:
            s["ratio_rps"] = _ratio(s["rps"], ref["rps"])
            s["ratio_p99"] = _ratio(s["p99_ms"], ref["p99_ms"])
            s["ratio_cpu_per_req"] = _ratio(s["cpu_us_per_req"], ref["cpu_us_per_req"])
    base = per.get("foobar_lb-baseline")
    if base is not None and "foobar_lb" in per:
        per["foobar_lb"]["ratio_cpu_vs_baseline"] = _ratio(per["foobar_lb"]["cpu_us_per_req"],
                                                          base["cpu_us_per_req"])
    lb = per.get("foobar_lb-tcp")
    if lb is not None and "pproxy" in per:
        lb["ratio_rps_vs_pproxy"] = _ratio(lb["rps"], per["pproxy"]["rps"])
    return per


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else float("nan")


# -- the targets ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    text: str
    scenario: str
    target: str
    key: str  # a key of the summary
    op: str  # "<=", ">=", or "" (reported only)
    limit: float
    unit: str = "x"
    stretch: bool = False  # a stretch goal: reported met or missed like the others, labelled so
    # the value is this target's `key` in `scenario` over the same in `over` (a cost: on / off)
    over: str | None = None


# issue 11 item 4 (the HTTP engine), on one worker; all ratios are foobar_lb / HAProxy
TARGETS = (
    Target("HTTP small c=50: CPU per request (user+system) vs HAProxy", "http-small-c50", "foobar_lb",
           "ratio_cpu_per_req", "<=", 1.35),
    Target("HTTP small c=50: req/s vs HAProxy", "http-small-c50", "foobar_lb", "ratio_rps", ">=", 0.75),
    Target("HTTP small c=50: p99 latency vs HAProxy", "http-small-c50", "foobar_lb", "ratio_p99", "<=", 1.5),
    Target("HTTP small c=200: req/s vs HAProxy", "http-small-c200", "foobar_lb", "ratio_rps", ">=", 0.75),
    Target("HTTP 64 KiB: req/s vs HAProxy", "http-64k", "foobar_lb", "ratio_rps", ">=", 1.0),
    Target("TCP: CPU per request (user+system) vs HAProxy", "tcp-small-c50", "foobar_lb-tcp",
           "ratio_cpu_per_req", "<=", 1.0),
    Target("TCP: req/s vs HAProxy", "tcp-small-c50", "foobar_lb-tcp", "ratio_rps", ">=", 0.97),
    Target("New connection per request c=20: CPU per request (user+system) vs HAProxy", "http-close-c20",
           "foobar_lb", "ratio_cpu_per_req", "<=", 1.5),
    Target("New connection per request c=20: p99 latency vs HAProxy", "http-close-c20", "foobar_lb",
           "ratio_p99", "<=", 2.0),
    Target("Stretch: HTTP small c=50: CPU per request (user+system) vs HAProxy", "http-small-c50",
           "foobar_lb", "ratio_cpu_per_req", "<=", 1.10, stretch=True),
    # the floor (benchmarks/floor_proxy.py): what Python on uvloop and httptools costs at the least
    Target("Floor proxy, HTTP small c=50: CPU per request (user+system) vs HAProxy", "http-small-c50",
           "floor", "ratio_cpu_per_req", "", 0.0),
    Target("Floor proxy, HTTP small c=50: req/s vs HAProxy", "http-small-c50", "floor", "ratio_rps", "",
           0.0),
    # (--tcp: a relay and nothing else, what any Python TCP proxy on uvloop pays at the least)
    Target("Floor relay, TCP: CPU per request (user+system) vs HAProxy", "tcp-small-c50", "floor-tcp",
           "ratio_cpu_per_req", "", 0.0),
    # issue 13 (monitoring): metrics are always on; their cost is measured against the code before
    # them (--baseline-src), and the access log's as on / off, beside HAProxy's own
    Target("Metrics (always on), HTTP small c=50: CPU per request vs foobar_lb before them "
           "(--baseline-src)", "http-small-c50", "foobar_lb", "ratio_cpu_vs_baseline", "<=", 1.05),
    Target("Access log on vs off, HTTP small c=50: foobar_lb CPU per request", "http-log-c50",
           "foobar_lb", "cpu_us_per_req", "", 0.0, over="http-small-c50"),
    Target("Access log on vs off, HTTP small c=50: HAProxy CPU per request", "http-log-c50",
           "haproxy", "cpu_us_per_req", "", 0.0, over="http-small-c50"),
    # issue 14 (slow clients): the normal load's throughput beside them, vs without
    Target("Beside 500 slowloris connections: foobar_lb req/s vs without", "http-slowloris-c50",
           "foobar_lb", "rps", ">=", 0.9, over="http-small-c50"),
    Target("Beside 500 slowloris connections: HAProxy req/s vs without", "http-slowloris-c50",
           "haproxy", "rps", "", 0.0, over="http-small-c50"),
    Target("Beside 200 uploads trickling at 10 B/s: foobar_lb req/s vs without", "http-trickle-c50",
           "foobar_lb", "rps", ">=", 0.9, over="http-small-c50"),
    Target("Beside 200 uploads trickling at 10 B/s: HAProxy req/s vs without", "http-trickle-c50",
           "haproxy", "rps", "", 0.0, over="http-small-c50"),
)


NOT_JUDGED = "the proxy shared the cores with the load generator"


def evaluate_targets(summaries: dict[str, dict], results: dict[str, dict], judged: bool = True) -> list[dict]:
    """One row per target; `judged` False (the proxy had no cores of its own): none is met or missed."""
    rows = []
    for tg in TARGETS:
        value = summaries.get(tg.scenario, {}).get(tg.target, {}).get(tg.key)
        if tg.over is not None and value is not None:
            value = _ratio(value, summaries.get(tg.over, {}).get(tg.target, {}).get(tg.key, math.nan))
        if value is None or (isinstance(value, float) and math.isnan(value)):
            status = "not measured"
        elif not tg.op or not judged:
            status = "reported (no target)"
        elif (value <= tg.limit) if tg.op == "<=" else (value >= tg.limit):
            status = "met"
        else:
            status = "missed"
        notes = []
        if tg.op and not judged and status != "not measured":
            notes.append(NOT_JUDGED)
        res = results.get(tg.scenario)
        if res is not None and status != "not measured" and (res["rounds"], res.get("duration")) != (5, 10):
            notes.append(f"{res['rounds']} round(s) of {res['duration']:g} s, not the issue's 5 x 10 s")
        note = "; ".join(notes)
        rows.append({"target": tg.text, "scenario": tg.scenario, "who": tg.target, "metric": tg.key,
                     "op": tg.op, "limit": tg.limit, "unit": tg.unit, "value": value,
                     "status": status, "note": note, "stretch": tg.stretch})
    return rows


# -- Markdown -----------------------------------------------------------------------------------------


def _n(v: float, digits: int = 0) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:,.{digits}f}"


def _x(v: float | None) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.2f}x"


def _conns(v: float | None) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def _ms(v: float) -> str:
    return "n/a" if math.isnan(v) else (f"{v * 1000:.0f} us" if v < 1 else f"{v:.2f} ms")


def markdown(doc: dict) -> str:
    m = doc["machine"]
    out = ["# foobar_lb vs HAProxy (and pproxy): benchmark results", ""]
    out.append(f"- date: {m['date']}; machine: {m['cpu_model']}, {m['cores']} cores, {m['kernel']}, "
               f"Python {m['python']}, uvloop {m['uvloop']}")
    out.append(f"- {m['haproxy']}; {m['nginx']}; {m['wrk']}; pproxy {m['pproxy']}")
    opts = doc["options"]
    workers = m.get("workers", opts.get("workers", 1))
    out.append(f"- workers: {workers} (foobar_lb --workers {workers}: a master and {workers} worker "
               f"process{'' if workers == 1 else 'es'}, CPU and RSS summed over all of them; "
               f"HAProxy nbthread {workers})")
    out.append(f"- pinning: {m['pinning']}")
    out.append(f"- rounds: {opts['rounds']}, {opts['duration']:g} s per wrk run, warm-up "
               f"{opts['warmup']:g} s per target (not counted); runs interleaved (A B C A B C ...); "
               "figures are medians over rounds")
    for note in doc["notes"]:
        out.append(f"- {note}")
    out.append("")
    for name, res in doc["results"].items():
        summ = doc["summaries"][name]
        out.append(f"## {name}")
        out.append("")
        out.append(f"{res['title']}; {res['rounds']} round(s); reference: {res['reference']}.")
        out.append("")
        if res["kind"] == "idle":
            out.append("| target | idle connections | RSS before (KiB) | RSS after (KiB) "
                       "| KiB per connection (median) | min-max | failed | ratio to reference |")
            out.append("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
            for t, s in summ.items():
                out.append(f"| {t} | {s['opened']:,} of {s['wanted']:,} | {_n(s['rss_before_kib'])} | "
                           f"{_n(s['rss_after_kib'])} | {_n(s['kib_per_conn'], 1)} | "
                           f"{_n(s['kib_per_conn_min'], 1)}-{_n(s['kib_per_conn_max'], 1)} | {s['failed']} | "
                           f"{_x(s.get('ratio_kib_per_conn'))} |")
        else:
            out.append("| target | req/s (median) | min-max | p50 | p99 | CPU % | user us/req "
                       "| sys us/req | server conns/req | errors | req/s ratio | p99 ratio | CPU/req ratio "
                       "| other load % |")
            out.append("| --- |" + " ---: |" * 8 + " --- |" + " ---: |" * 4)
            for t, s in summ.items():
                errs = ", ".join(f"{k} {v}" for k, v in s["errors"].items()) or "0"
                ratio = _x(s.get("ratio_rps"))
                if "ratio_rps_vs_pproxy" in s:
                    ratio += f" ({_x(s['ratio_rps_vs_pproxy'])} vs pproxy)"
                out.append(f"| {t} | {_n(s['rps'])} | {_n(s['rps_min'])}-{_n(s['rps_max'])} | "
                           f"{_ms(s['p50_ms'])} | {_ms(s['p99_ms'])} | {_n(s['cpu_pct'])} | "
                           f"{_n(s['user_us_per_req'], 1)} | {_n(s['system_us_per_req'], 1)} | "
                           f"{_conns(s.get('server_conns_per_req'))} | {errs} | "
                           f"{ratio} | {_x(s.get('ratio_p99'))} | {_x(s.get('ratio_cpu_per_req'))} | "
                           f"{'/'.join(_n(v) for v in s['other_cpu_pct'].values()) or 'n/a'} |")
            for t, s in summ.items():
                bg = s.get("background")
                if bg:
                    out.append("")
                    out.append(f"{t}: slow clients over its runs: {bg['opened']:,} opened, "
                               f"{bg['closed_by_proxy']:,} closed by the proxy "
                               f"({bg['answered_408']:,} of them after a 408), "
                               f"{bg['connect_failures']:,} connects failed.")
        out.append("")
    sources = sorted({r["server_conns_source"] for r in doc["results"].values()
                      if "server_conns_source" in r})
    if sources:
        out.append("Server conns/req: TCP connections the backends accepted during a run (counted by "
                   + " and by ".join(sources) + ") over the requests wrk completed in it (median); "
                   "1 means a server connect and close for every request, near 0 means pooled "
                   "connections reused.")
        out.append("")
    out.append("Other load %: CPU used during the runs by processes outside the benchmark (median, % of one "
               "core; proxy core / client core when pinned). Above "
               f"{OTHER_LOAD_WARN:g}% a run was disturbed by something else on the machine.")
    out.append("")
    out.append("## Targets")
    out.append("")
    out.append("Issue 11's targets (the HTTP engine, one worker) and issue 13's (the cost of "
               "monitoring). Ratios are foobar_lb / HAProxy (same mode, same run) unless the row says "
               "otherwise; a target missed says by how much; the stretch goal is reported the "
               "same way."
               + ("" if m.get("proxy_has_own_cores", True) else
                  f" With {workers} workers on {m['cores']} cores the proxy had no cores of its own: "
                  "figures are reported, with no target."))
    out.append("")
    out.append("| target | wanted | measured | status |")
    out.append("| --- | --- | --- | --- |")
    for row in doc["targets"]:
        v = row["value"]
        if v is None or (isinstance(v, float) and math.isnan(v)):
            measured = "—"
        else:
            measured = f"{v:.1f}{row['unit']}" if row["unit"] != "x" else f"{v:.2f}x"
        wanted = f"{row['op']} {row['limit']:g}{row['unit']}" if row["op"] else "reported, no target"
        status = row["status"]
        if status == "missed":
            status += f" by {abs(v - row['limit']):.2f}{row['unit']}"
        status += f" ({row['note']})" if row["note"] else ""
        out.append(f"| {row['target']} | {wanted} | {measured} | {status} |")
    out.append("")
    return "\n".join(out)


# -- the picture ----------------------------------------------------------------------------------------


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"haproxy": "#4c72b0", "foobar_lb": "#dd8452", "pproxy": "#55a868"}
    wrk_names = [n for n, r in doc["results"].items() if r["kind"] == "wrk"]
    idle_names = [n for n, r in doc["results"].items() if r["kind"] == "idle"]
    ncols = max(1, len(wrk_names))
    heights = [1.0, 1.0] * bool(wrk_names) + [0.55] * bool(idle_names) or [1.0]
    fig = plt.figure(figsize=(max(8.0, 2.8 * ncols), 3.6 * sum(heights)), constrained_layout=True)
    grid = fig.add_gridspec(len(heights), ncols, height_ratios=heights)
    row = 0
    if wrk_names:
        for i, name in enumerate(wrk_names):
            ax = fig.add_subplot(grid[row, i])
            summ = doc["summaries"][name]
            ts = list(summ)
            med = [summ[t]["rps"] for t in ts]
            lo = [summ[t]["rps"] - summ[t]["rps_min"] for t in ts]
            hi = [summ[t]["rps_max"] - summ[t]["rps"] for t in ts]
            bars = ax.bar(range(len(ts)), med, yerr=[lo, hi], capsize=4,
                          color=[colors.get(target_kind(t), "grey") for t in ts])
            conns = [summ[t].get("server_conns_per_req") for t in ts]
            ax.bar_label(bars, [f"{_conns(c)}\nsrv conn/req" for c in conns], label_type="center",
                         fontsize=6, color="white")
            ax.set_xticks(range(len(ts)), ts, rotation=20, fontsize=8)
            ax.set_title(f"{name}\nreq/s (median, min-max)", fontsize=9)
            ax.ticklabel_format(axis="y", style="plain")
            ax.tick_params(axis="y", labelsize=8)
        row += 1
        ax = fig.add_subplot(grid[row, :])
        labels, users, systems, cols = [], [], [], []
        for name in wrk_names:
            for t, s in doc["summaries"][name].items():
                labels.append(f"{name}\n{t}")
                users.append(s["user_us_per_req"])
                systems.append(s["system_us_per_req"])
                cols.append(colors.get(target_kind(t), "grey"))
        x = range(len(labels))
        ax.bar(x, users, color=cols, label="user")
        ax.bar(x, systems, bottom=users, color=cols, alpha=0.45, hatch="//", label="system")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel("CPU us per request")
        ax.set_title("proxy CPU per request (median): user (solid) + system (hatched)", fontsize=9)
        ax.legend(fontsize=8)
        row += 1
    if idle_names:
        ax = fig.add_subplot(grid[row, :])
        labels, vals, cols = [], [], []
        for name in idle_names:
            for t, s in doc["summaries"][name].items():
                labels.append(f"{t} ({s['opened']:,} conns)")
                vals.append(s["kib_per_conn"])
                cols.append(colors.get(target_kind(t), "grey"))
        ax.barh(range(len(labels)), vals, color=cols)
        ax.set_yticks(range(len(labels)), labels, fontsize=8)
        ax.axvline(20, color="red", linestyle="--", linewidth=1,
                   label="20 KiB (an earlier issue's bound, not judged here)")
        ax.set_xlabel("RSS KiB per idle keep-alive connection (median)")
        ax.legend(fontsize=8)
    workers = doc["machine"].get("workers", 1)
    fig.suptitle(f"foobar_lb vs HAProxy / pproxy — {doc['machine']['cpu_model']}, "
                 f"{doc['options']['rounds']} round(s) x {doc['options']['duration']:g}s, "
                 f"{workers} worker{'' if workers == 1 else 's'} / thread{'' if workers == 1 else 's'}",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(doc: dict, out_dir: Path) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    md = markdown(doc)
    (out_dir / "results.json").write_text(
        json.dumps(_finite(doc), indent=2, default=_json_default, allow_nan=False) + "\n")
    (out_dir / "results.md").write_text(md)
    plot(doc, out_dir / "results.png")
    return md


def _finite(o):
    """NaN (a ratio with nothing to divide by) becomes null, so results.json is strict JSON."""
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_finite(v) for v in o]
    return o


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
