"""The stats page: `html(stats)` renders `Master.stats()` as one self-contained HTML page.

Rules of this module:
- pure: a dict in, a string out; no I/O, nothing of the running program imported (the admin
  listener serves the result at `GET /stats`, the JSON itself at `GET /stats?json`);
- every value is read with `.get()` and shown as a dash when absent or of a surprising type, so
  the page renders whatever fields `Master.stats()` carries today and tomorrow, and a bad value
  never turns the page into a 500;
- every text that comes from the configuration or from a server (names, addresses, check
  results) passes `html.escape`; the page's Content-Security-Policy allows only its own inline
  style and script (by hash) and fetches from this origin, so a missed escape could still not
  run a script, and no external asset can load;
- people read it: human units (1.2 MB, 3.4 ms, 2m 5s ago), states coloured (up green, down red,
  drain and maint amber) and always written out; under 600px wide each row becomes a card;
- it refreshes itself every few seconds: a small script fetches the page again and swaps the
  numbers in (keeping the scroll position); without scripting, a `<meta refresh>` reloads it.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Mapping
from html import escape
from typing import Any

__all__ = ["REFRESH_SECONDS", "html"]

REFRESH_SECONDS = 3
DASH = "\u2013"  # what an absent value shows
_SEP = " \u00b7 "

_STATE_CLASS = {"up": "up", "open": "up", "down": "down", "drain": "warn", "maint": "warn",
                "draining": "warn", "starting": "warn", "stopping": "warn", "serving": "up"}

# -- formatting: each returns plain text (escaped by the caller) or None for "absent" ------------


def _num(v: Any) -> float | None:
    """A number to show (not a bool, not NaN or infinite), or None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def fmt_count(v: Any) -> str | None:
    """12345 -> "12,345"."""
    n = _num(v)
    if n is None:
        return None
    return f"{n:,}" if isinstance(n, int) else f"{n:,.1f}"


def fmt_bytes(v: Any) -> str | None:
    """Bytes in decimal units: 512 B, 1.2 kB, 34 MB, 5.6 GB."""
    n = _num(v)
    if n is None:
        return None
    if abs(n) < 1000:
        return f"{int(n)} B"
    for unit in ("kB", "MB", "GB", "TB", "PB"):
        n /= 1000
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.1f} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")


def fmt_seconds(v: Any) -> str | None:
    """A short duration (a check, a response time): 850 µs, 3.4 ms, 120 ms, 1.25 s, 2m 5s."""
    s = _num(v)
    if s is None or s < 0:
        return None
    if s < 1e-3:
        return f"{s * 1e6:.0f} \u00b5s"
    if s < 0.1:
        return f"{s * 1e3:.1f} ms"
    if s < 1:
        return f"{s * 1e3:.0f} ms"
    if s < 60:
        return f"{s:.2f} s"
    return fmt_age(s)


def fmt_age(v: Any) -> str | None:
    """A span of time in the two largest units: 42s, 2m 5s, 3h 4m, 2d 3h."""
    s = _num(v)
    if s is None or s < 0:
        return None
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def fmt_ago(v: Any) -> str | None:
    age = fmt_age(v)
    return None if age is None else f"{age} ago"


def fmt_rate(v: Any) -> str | None:
    """Requests per second: 0/s, 3.5/s, 1,234/s."""
    n = _num(v)
    if n is None:
        return None
    if n == 0:
        return "0/s"
    return f"{n:.1f}/s" if abs(n) < 100 else f"{n:,.0f}/s"


def fmt_text(v: Any) -> str | None:
    if v is None or v == "":
        return None
    return str(v)


# -- reading the stats dict ----------------------------------------------------------------------


def _dict(v: Any) -> Mapping[str, Any]:
    return v if isinstance(v, Mapping) else {}


def _sessions(s: Mapping[str, Any]) -> Any:
    """Total sessions of a server (`sessions`; today's stats call it `requests`)."""
    return s.get("sessions", s.get("requests"))


def _check(s: Mapping[str, Any]) -> tuple[Any, Any]:
    """(last check result, its duration): `check` is {"status", "duration"}, or (today) the
    result text alone."""
    c = s.get("check")
    if isinstance(c, Mapping):
        return c.get("status"), c.get("duration")
    return c, None


def _sum(servers: list[Mapping[str, Any]], get: Callable[[Mapping[str, Any]], Any]) -> Any:
    vals = [v for v in map(get, servers) if _num(v) is not None]
    return sum(vals) if vals else None


def _backend_total(be: Mapping[str, Any], servers: list[Mapping[str, Any]]) -> dict[str, Any]:
    """The backend's own aggregate row: its fields when it has them, else the sum of its
    servers' counters (never for percentiles, which do not add up)."""
    row: dict[str, Any] = dict(be)
    for key in ("current", "rate", "queue", "errors", "failures", "retries", "redispatches",
                "bytes_in", "bytes_out"):
        if key not in row:
            row[key] = _sum(servers, lambda s, k=key: s.get(k))
    if "sessions" not in row:
        row["sessions"] = _sum(servers, _sessions)
    if "responses" not in row:
        sums = {c: _sum(servers, lambda s, c=c: _dict(s.get("responses")).get(c))
                for c in ("1xx", "2xx", "3xx", "4xx", "5xx")}
        row["responses"] = {c: v for c, v in sums.items() if v is not None}
    states = [str(s.get("state", "")).lower() for s in servers]
    up = be.get("up") if _num(be.get("up")) is not None else states.count("up")
    total = be.get("total") if _num(be.get("total")) is not None else len(servers)
    row["up"], row["total"] = up, total
    if "state" not in be:
        row["state"] = "up" if up else "down"
    return row


# -- HTML pieces ---------------------------------------------------------------------------------


def _e(text: Any) -> str:
    return escape(str(text), quote=True)


def _v(value: Any) -> str:
    """Escaped text of a plain value, or a dash."""
    text = fmt_text(value)
    return DASH if text is None else _e(text)


def _badge(state: Any) -> str:
    """A state word in its colour (the word itself is always there: colour is a hint)."""
    word = fmt_text(state)
    if word is None:
        return ""
    cls = _STATE_CLASS.get(word.lower(), "other")
    return f'<span class="st {cls}">{_e(word.upper())}</span>'


class Col:
    """A column: its header group and label, what it means (the header's tooltip), how a row
    gives its value and how the value is shown; `cls`: classes of its cells."""

    __slots__ = ("card", "cls", "fmt", "get", "group", "label", "sub", "title")

    def __init__(self, group: str, label: str, title: str, get: Callable[[Mapping], Any],
                 fmt: Callable[[Any], str | None], cls: str = "n", card: str | None = None,
                 sub: Callable[[Mapping], str | None] | None = None):
        self.group, self.label, self.title = group, label, title
        self.get, self.fmt, self.cls = get, fmt, cls
        self.card = card or (f"{group} {label}" if group else label)  # its label on a card
        self.sub = sub  # a second, smaller line under the value

    def cell(self, row: Mapping[str, Any]) -> str:
        value, text, sub = None, None, None
        with contextlib.suppress(TypeError, ValueError, KeyError, AttributeError,
                                 OverflowError):
            value = self.get(row)
            text = self.fmt(value)
        if self.sub is not None:
            with contextlib.suppress(TypeError, ValueError, KeyError, AttributeError,
                                     OverflowError):
                sub = self.sub(row)
        label = _e(self.card)
        cls = self.cls
        if text is None and sub is None:
            return f'<td class="{cls} na" data-label="{label}">{DASH}</td>'
        if self.label in ("5xx", "errors", "failures") and _num(value):
            cls += " bad"
        sub_html = "" if self.sub is None else f'<span class="sub">{_e(sub or DASH)}</span>'
        return (f'<td class="{cls}" data-label="{label}"><span>{_e(text or DASH)}'
                f"{sub_html}</span></td>")


def _resp(c: str) -> Callable[[Mapping], Any]:
    return lambda r: _dict(r.get("responses")).get(c)


def _took(v: Any) -> str | None:
    took = fmt_seconds(v)
    return None if took is None else f"took {took}"


def _rt(p: str) -> Callable[[Mapping], Any]:
    return lambda r: _dict(r.get("response_time")).get(p)


_RESPONSES = [Col("responses", c, f"responses with a {c} status", _resp(c), fmt_count, card=c)
              for c in ("1xx", "2xx", "3xx", "4xx", "5xx")]
_BYTES = [Col("bytes", "in", "bytes received from clients", lambda r: r.get("bytes_in"),
              fmt_bytes),
          Col("bytes", "out", "bytes sent to clients", lambda r: r.get("bytes_out"), fmt_bytes)]

SERVER_COLS = [
    Col("", "last check", "what the last health check said, and how long it took",
        lambda r: _check(r)[0], fmt_text, "t chk", card="check",
        sub=lambda r: _took(_check(r)[1])),
    Col("", "weight", "its share of the traffic, relative to its peers",
        lambda r: r.get("weight"), fmt_count),
    Col("sessions", "now", "sessions open now", lambda r: r.get("current"), fmt_count),
    Col("sessions", "total", "sessions since start (survives reloads)", _sessions, fmt_count),
    Col("sessions", "rate", "requests per second over the last ~10 s", lambda r: r.get("rate"),
        fmt_rate),
    Col("", "queue", "requests waiting for a free slot (maxconn)", lambda r: r.get("queue"),
        fmt_count),
    *_RESPONSES,
    Col("errors", "errors", "requests that failed with this server (connect, read, timeout)",
        lambda r: r.get("errors"), fmt_count, card="errors"),
    Col("errors", "failures", "failures observed on live traffic (passive health)",
        lambda r: r.get("failures"), fmt_count, card="failures"),
    Col("errors", "retries", "attempts tried again after a failure", lambda r: r.get("retries"),
        fmt_count, card="retries"),
    Col("errors", "redisp", "requests moved to another server after a failure",
        lambda r: r.get("redispatches"), fmt_count, card="redispatches"),
    *_BYTES,
    Col("response time", "p50", "median response time (request sent -> response head)",
        _rt("p50"), fmt_seconds, card="time p50"),
    Col("response time", "p90", "90th percentile response time", _rt("p90"), fmt_seconds, card="time p90"),
    Col("response time", "p99", "99th percentile response time", _rt("p99"), fmt_seconds, card="time p99"),
]

FRONTEND_COLS = [
    Col("", "mode", "http or tcp", lambda r: r.get("mode"), fmt_text, "t"),
    Col("sessions", "now", "client connections open now", lambda r: r.get("current"), fmt_count),
    Col("sessions", "total", "client connections accepted since start",
        lambda r: r.get("connections"), fmt_count),
    Col("requests", "total", "requests answered since start", lambda r: r.get("requests"),
        fmt_count),
    Col("requests", "rate", "requests per second over the last ~10 s", lambda r: r.get("rate"),
        fmt_rate),
    *_RESPONSES,
    Col("refused", "denied", "connections refused by allow/deny rules",
        lambda r: r.get("denied"), fmt_count, card="denied"),
    Col("refused", "limited", "requests refused by per-client rate limits",
        lambda r: r.get("rate_limited"), fmt_count, card="rate-limited"),
    Col("refused", "clients", "connections refused by per-client connection limits",
        lambda r: r.get("client_refused"), fmt_count, card="client limit"),
    *_BYTES,
]


def _thead(first: str, cols: list[Col]) -> str:
    top = [f'<th rowspan="2" scope="col" class="name">{first}</th>',
           '<th rowspan="2" scope="col" title="its state, and how long ago it last changed">'
           "state</th>"]
    sub = []
    i = 0
    while i < len(cols):
        group = cols[i].group
        j = i
        while j < len(cols) and cols[j].group == group:
            j += 1
        if group:
            top.append(f'<th colspan="{j - i}" scope="colgroup" class="g">{_e(group)}</th>')
            sub += [f'<th scope="col" title="{_e(c.title)}">{_e(c.label)}</th>'
                    for c in cols[i:j]]
        else:
            top += [f'<th rowspan="2" scope="col" title="{_e(c.title)}">{_e(c.label)}</th>'
                    for c in cols[i:j]]
        i = j
    return f"<thead><tr>{''.join(top)}</tr><tr>{''.join(sub)}</tr></thead>"


def _row(kind: str, name: str, row: Mapping[str, Any], cols: list[Col], state: str,
         tags: str = "", sub: str | None = None) -> str:
    cells = "".join(c.cell(row) for c in cols)
    sub_html = f'<span class="sub">{_e(sub)}</span>' if sub else ""
    since = fmt_ago(row.get("since"))
    return (f'<tr class="{kind}"><th scope="row" class="name">'
            f"<span>{_e(name)}{tags}{sub_html}</span></th>"
            f'<td class="state" data-label="state"><span>{state or DASH}'
            f'<span class="sub">{_e(since or DASH)}</span></span></td>{cells}</tr>')


def _server_state(s: Mapping[str, Any]) -> str:
    state = s.get("state")
    out = _badge(state)
    admin = fmt_text(s.get("admin"))
    if admin is not None and admin.lower() not in ("ready", str(state).lower()):
        out += " " + _badge(admin)
    return out


def _frontends(frontends: Mapping[str, Any]) -> str:
    if not frontends:
        return ""
    rows = []
    for name, fe in frontends.items():
        fe = _dict(fe)
        rows.append(_row("frontend", name, fe, FRONTEND_COLS, _badge(fe.get("state", "open"))))
    return ('<section><h2>Frontends</h2><div class="scroll"><table class="grid">'
            f'{_thead("frontend", FRONTEND_COLS)}<tbody>{"".join(rows)}</tbody></table></div>'
            "</section>")


def _backend(name: str, be: Mapping[str, Any]) -> str:
    servers = {str(k): _dict(v) for k, v in _dict(be.get("servers")).items()}
    total = _backend_total(be, list(servers.values()))
    rows = []
    for sname, s in servers.items():
        tags = ' <span class="tag">backup</span>' if s.get("backup") is True else ""
        address = fmt_text(s.get("address"))
        rows.append(_row("server", sname, s, SERVER_COLS, _server_state(s), tags,
                         address or DASH))
    counts = f' <span class="cnt">{_e(total["up"])}/{_e(total["total"])} up</span>'
    rows.append(_row("backend", "total", total, SERVER_COLS,
                     _badge(total.get("state")) + counts))
    return (f'<section id="backend-{_e(name)}"><h2>Backend {_e(name)}</h2>'
            f'<div class="scroll"><table class="grid">{_thead("server", SERVER_COLS)}'
            f'<tbody>{"".join(rows)}</tbody></table></div></section>')


def _overview(backends: Mapping[str, Any]) -> str:
    items = []
    for name, be in backends.items():
        be = _dict(be)
        servers = [_dict(v) for v in _dict(be.get("servers")).values()]
        t = _backend_total(be, servers)
        items.append(f'<li><a href="#backend-{_e(name)}">{_e(name)}</a> '
                     f'{_badge(t.get("state"))} {_e(t["up"])}/{_e(t["total"])} up</li>')
    if not items:
        return ""
    return f'<ul class="overview"><li>backends:</li>{"".join(items)}</ul>'


def _header(stats: Mapping[str, Any], now: float) -> str:
    workers = stats.get("workers")
    parts = [f"pid {_v(stats.get('pid'))}",
             f"up {_e(fmt_age(stats.get('uptime')) or DASH)}",
             f"reloads {_e(fmt_count(stats.get('reloads')) or DASH)}"]
    wlist = ""
    if isinstance(workers, list):
        ws = [_dict(w) for w in workers]
        serving = sum(1 for w in ws if w.get("status") == "serving")
        parts.append(f"workers {serving}/{len(ws)} serving")
        wlist = "".join(
            f'<li>worker {_v(w.get("id"))}: pid {_v(w.get("pid"))}, '
            f'generation {_v(w.get("generation"))} {_badge(w.get("status"))}</li>'
            for w in ws)
        wlist = f'<ul class="workers">{wlist}</ul>'
    else:
        parts.append(f"workers {_e(fmt_count(workers) or DASH)}")
    t = time.gmtime(now)
    parts.append(f'generated <time datetime="{time.strftime("%Y-%m-%dT%H:%M:%SZ", t)}">'
                 f'{time.strftime("%Y-%m-%d %H:%M:%S UTC", t)}</time>')
    return f'<p class="meta" id="summary">{_SEP.join(parts)}</p>{wlist}'


_CSS = """
:root{--bg:#fff;--fg:#1d2125;--mute:#5f6b76;--line:#d8dde2;--head:#f1f3f5;--up:#1b7f3b;
--up-bg:#dcf5e3;--down:#b42318;--down-bg:#fde4e1;--warn:#8a5a00;--warn-bg:#fff0c7;--bad:#b42318}
@media (prefers-color-scheme:dark){:root{--bg:#15181b;--fg:#e4e7ea;--mute:#9aa5b0;
--line:#323a42;--head:#1f2428;--up:#7ee2a0;--up-bg:#173b25;--down:#ff9a8f;--down-bg:#4a1a16;
--warn:#ffd37a;--warn-bg:#46370f;--bad:#ff9a8f}}
*{box-sizing:border-box}
body{margin:0;padding:.75rem;background:var(--bg);color:var(--fg);
font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
h1{font-size:1.25rem;margin:0}h2{font-size:1.05rem;margin:1.1rem 0 .4rem}
a{color:inherit}.meta{margin:.2rem 0;color:var(--mute)}
.workers,.overview{list-style:none;margin:.3rem 0;padding:0;display:flex;flex-wrap:wrap;
gap:.3rem 1rem}
#ctl{margin:.2rem 0;color:var(--mute);font-size:.9rem}#msg{color:var(--bad)}
.scroll{overflow-x:auto;border:1px solid var(--line);border-radius:6px}
table{border-collapse:collapse;width:100%;font-size:13px;font-variant-numeric:tabular-nums}
th,td{padding:.25rem .35rem;border-bottom:1px solid var(--line);white-space:nowrap;
text-align:right;vertical-align:top}
thead th{background:var(--head);font-weight:600;text-align:center;font-size:12px;
vertical-align:bottom}
thead th[title]{cursor:help}th.g{border-left:1px solid var(--line)}
th.name{text-align:left;position:sticky;left:0;background:var(--bg);white-space:normal;
max-width:12rem;overflow-wrap:anywhere}
thead th.name{background:var(--head)}
.sub{display:block;font-weight:400;color:var(--mute);font-size:12px;white-space:nowrap}
td.t,td.state{text-align:left}td.chk{white-space:normal;min-width:7.5rem;max-width:12rem}
td.na{color:var(--mute)}.bad{color:var(--bad);font-weight:600}
tr.backend th,tr.backend td{background:var(--head);font-weight:600;border-bottom:0}
.st{display:inline-block;padding:0 .35rem;border-radius:4px;font-weight:700;font-size:11px;
letter-spacing:.03em;border:1px solid currentColor}
.st.up{color:var(--up);background:var(--up-bg)}.st.down{color:var(--down);background:var(--down-bg)}
.st.warn{color:var(--warn);background:var(--warn-bg)}.st.other{color:var(--mute)}
.tag{font-size:11px;font-weight:400;color:var(--mute);border:1px solid var(--line);
border-radius:4px;padding:0 .3rem;margin-left:.3rem}
.cnt{color:var(--mute);font-weight:400}
@media (max-width:600px){
body{padding:.5rem}
.scroll{overflow:visible;border:0}
table.grid thead{display:none}
table.grid,table.grid tbody{display:block}
table.grid tr{display:grid;grid-template-columns:1fr 1fr;column-gap:1rem;margin:0 0 .6rem;
padding:.4rem .6rem;border:1px solid var(--line);border-radius:8px}
table.grid th,table.grid td{display:flex;justify-content:space-between;align-items:baseline;
gap:.5rem;padding:.1rem 0;border:0;background:none;white-space:normal;min-width:0;max-width:none}
table.grid td::before{content:attr(data-label);color:var(--mute);font-weight:400;text-align:left}
table.grid th.name{grid-column:1/-1;position:static;font-size:15px;flex-wrap:wrap}
table.grid td.state,table.grid td.chk,table.grid td.t{grid-column:1/-1}
table.grid td.na{display:none}
table.grid .sub{display:inline;margin-left:.5rem}
tr.backend{background:var(--head)}
}
""".strip()

_JS = """
(function(){var c=document.getElementById("auto"),m=document.getElementById("msg"),k=0;
document.getElementById("ctl").hidden=false;
function tick(){if(!c.checked||document.hidden)return;
fetch(location.pathname,{cache:"no-store"}).then(function(r){
if(!r.ok)throw new Error("HTTP "+r.status);return r.text()}).then(function(t){
var n=new DOMParser().parseFromString(t,"text/html").getElementById("stats");
if(!n)throw new Error("no stats in the answer");
n.setAttribute("data-refreshes",++k);document.getElementById("stats").replaceWith(n);
m.textContent=""}).catch(function(e){
m.textContent=" refresh failed: "+e.message+"; the numbers shown are older"})}
setInterval(tick,REFRESH_MS)})();
""".strip().replace("REFRESH_MS", str(REFRESH_SECONDS * 1000))


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


_CSP = (f"default-src 'none'; style-src {_sha256(_CSS)}; script-src {_sha256(_JS)}; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'")


def html(stats: Mapping[str, Any], *, now: float | None = None) -> str:
    """The stats page of `stats` (the shape of `Master.stats()`), generated at `now` (epoch
    seconds; default: `stats["time"]` when present, else the current time)."""
    stats = _dict(stats)
    if now is None:
        now = stats["time"] if _num(stats.get("time")) is not None else time.time()
    try:
        time.gmtime(now)
    except (OverflowError, OSError, ValueError):
        now = time.time()
    frontends = _dict(stats.get("frontends"))
    backends = _dict(stats.get("backends"))
    body = (f"{_header(stats, now)}{_overview(backends)}{_frontends(frontends)}"
            + "".join(_backend(str(n), _dict(b)) for n, b in backends.items()))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        '<meta name="color-scheme" content="light dark">'
        f'<noscript><meta http-equiv="refresh" content="{REFRESH_SECONDS}"></noscript>'
        f"<title>foobar_lb stats</title><style>{_CSS}</style></head>\n<body>"
        '<h1>foobar_lb stats</h1>'
        f'<p id="ctl" hidden><label><input type="checkbox" id="auto" checked> refresh every '
        f'{REFRESH_SECONDS} s</label> \u00b7 <a href="?json">JSON</a><span id="msg"></span></p>'
        f'<noscript><p class="meta">This page reloads every {REFRESH_SECONDS} s. '
        '<a href="?json">JSON</a></p></noscript>'
        f'<main id="stats">{body}</main>'
        f"<script>{_JS}</script></body></html>\n")
