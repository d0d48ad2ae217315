"""The stats page (`GET /stats` of the admin listener): `statspage.html()` on hand-made stats
(escaping, every state written out, human units, today's and tomorrow's fields, bad values), and
the real page of a running load balancer rendered by headless Chromium (the text it shows, a
screenshot).

Chromium is Debian's `chromium` (`bash scripts/test.sh` installs it). Without it the browser
test skips, except under `CI=true`, where it fails: CI must run it.
To refresh the README's screenshots: `FOOBAR_STATS_SCREENSHOTS=docs pytest tests/test_statspage.py`
(writes docs/stats.png, desktop width, and docs/stats-phone.png).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import time
from html import unescape
from html.parser import HTMLParser
from pathlib import Path

import pytest

from foobar_lb import statspage
from foobar_lb.statspage import fmt_age, fmt_ago, fmt_bytes, fmt_count, fmt_rate, fmt_seconds
from procs import LbProcess

from support import LOOPBACK, ScriptedServer, free_port, http_get

NOW = 1796018400.0  # 2026-11-30 06:00:00 UTC


# -- reading the page back -----------------------------------------------------------------------


class _Rows(HTMLParser):
    """Every table row of the page: its class, its row header's text and its cells' texts
    (keyed by data-label); and every <script>/<style>'s text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: list[dict] = []
        self.inline: dict[str, list[str]] = {"script": [], "style": []}
        self._row: dict | None = None
        self._cell: list | None = None
        self._raw: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("script", "style"):
            self._raw = tag
            self.inline[tag].append("")
        elif tag == "tr":
            self._row = {"class": a.get("class", ""), "name": "", "cells": {}, "html_cls": {}}
        elif self._row is not None and tag in ("td", "th"):
            self._cell = [tag, a.get("data-label", ""), a.get("class", ""), ""]
        elif self._cell is not None and tag == "span" and "st" in a.get("class", "").split():
            self._cell[3] += " "

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._raw = None
        elif tag in ("td", "th") and self._cell is not None and self._row is not None:
            kind, label, cls, text = self._cell
            text = " ".join(text.split())
            if kind == "th" and "name" in cls.split():
                self._row["name"] = text
            else:
                self._row["cells"][label] = text
                self._row["html_cls"][label] = cls
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._raw is not None:
            self.inline[self._raw][-1] += data
        elif self._cell is not None:
            self._cell[3] += data + " "


def rows(page: str) -> _Rows:
    p = _Rows()
    p.feed(page)
    p.close()
    return p


def server_rows(page: str) -> dict[str, dict]:
    """{first word of the name cell (the server's name): row} of the server rows."""
    return {r["name"].split()[0]: r for r in rows(page).rows if r["class"] == "server"}


# -- hand-made stats -----------------------------------------------------------------------------


def _server(state: str, **kw) -> dict:
    base = {"address": "127.0.0.1:9001", "state": state, "admin": "ready", "since": 125.0,
            "weight": 1, "backup": False, "current": 3, "sessions": 12345, "rate": 4.25,
            "responses": {"1xx": 0, "2xx": 12000, "3xx": 300, "4xx": 40, "5xx": 5},
            "errors": 2, "failures": 1, "retries": 7, "redispatches": 6, "queue": 0,
            "check": {"status": "layer7 check passed: 200", "duration": 0.0034},
            "bytes_in": 1_234_567, "bytes_out": 5_600_000_000,
            "response_time": {"p50": 0.00085, "p90": 0.12, "p99": 1.25}}
    base.update(kw)
    return base


def tomorrow() -> dict:
    """Every field CONTEXT13.md plans for Master.stats()."""
    return {
        "pid": 4211, "uptime": 9123.4, "reloads": 2,
        "workers": [{"id": 1, "pid": 4213, "generation": 2, "status": "serving"},
                    {"id": 2, "pid": 4214, "generation": 2, "status": "draining"}],
        "frontends": {"www": {
            "mode": "http", "connections": 48211, "current": 37, "requests": 1203391,
            "rate": 412.7, "responses": {"1xx": 0, "2xx": 1190021, "3xx": 8120, "4xx": 5011,
                                         "5xx": 239},
            "denied": 12, "rate_limited": 340, "client_refused": 1, "bytes_in": 391_204_113,
            "bytes_out": 8_911_230_441}},
        "backends": {"app": {
            "servers": {
                "s-up": _server("up"),
                "s-down": _server("down", since=45, check={"status": "layer4 connection refused",
                                                           "duration": 0.0004}),
                "s-drain": _server("up", admin="drain"),
                "s-maint": _server("maint", admin="maint", backup=True, since=3 * 86400 + 4000),
            },
            "up": 2, "total": 4, "queue": 1, "current": 9, "sessions": 40000, "rate": 9.5,
            "since": 3600}},
    }


def today() -> dict:
    """The shape Master.stats() has as this page is written (before the metrics helper)."""
    return {
        "pid": 10, "uptime": 61.2, "reloads": 0,
        "workers": [{"id": 1, "pid": 11, "generation": 0, "status": "serving"}],
        "frontends": {"www": {"mode": "http", "connections": 3, "denied": 0, "requests": 10,
                              "responses": {"1xx": 0, "2xx": 10, "3xx": 0, "4xx": 0, "5xx": 0},
                              "rate_limited": 0, "client_refused": 0}},
        "backends": {"app": {"servers": {
            "s1": {"address": "127.0.0.1:1", "state": "up", "requests": 10, "failures": 0,
                   "check": "layer4 check passed", "weight": 1, "backup": False},
            "s2": {"address": "127.0.0.1:2", "state": "down", "requests": 0, "failures": 2,
                   "check": "layer4 connection refused", "weight": 1, "backup": False,
                   "maxconn": 5}}}},
    }


# -- units ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fmt", "value", "text"), [
    (fmt_bytes, 0, "0 B"), (fmt_bytes, 999, "999 B"), (fmt_bytes, 1234, "1.2 kB"),
    (fmt_bytes, 1_234_567, "1.2 MB"), (fmt_bytes, 123_456_789, "123 MB"),
    (fmt_bytes, 5_600_000_000, "5.6 GB"), (fmt_bytes, 2e15, "2.0 PB"),
    (fmt_seconds, 0.00085, "850 \u00b5s"), (fmt_seconds, 0.0034, "3.4 ms"),
    (fmt_seconds, 0.12, "120 ms"), (fmt_seconds, 1.25, "1.25 s"), (fmt_seconds, 125, "2m 5s"),
    (fmt_age, 42.9, "42s"), (fmt_age, 125, "2m 5s"), (fmt_age, 3 * 3600 + 4 * 60, "3h 4m"),
    (fmt_age, 2 * 86400 + 3 * 3600 + 5, "2d 3h"), (fmt_ago, 125, "2m 5s ago"),
    (fmt_rate, 0, "0/s"), (fmt_rate, 3.46, "3.5/s"), (fmt_rate, 1234.4, "1,234/s"),
    (fmt_count, 1234567, "1,234,567"),
    # absent or not a number: None (the page shows a dash)
    (fmt_bytes, None, None), (fmt_bytes, "12", None), (fmt_seconds, -1, None),
    (fmt_age, True, None), (fmt_count, {"a": 1}, None), (fmt_rate, [1], None),
])
def test_human_units(fmt, value, text) -> None:
    assert fmt(value) == text


# -- html() --------------------------------------------------------------------------------------


def test_hostile_names_addresses_and_check_messages_are_escaped() -> None:
    s = tomorrow()
    evil = "<script>alert(1)</script>"
    s["frontends"] = {'<i onmouseover="x()">fe': s["frontends"]["www"]}
    s["backends"] = {"b<&>": {"servers": {
        evil: _server("up", address='"><img src=x onerror=alert(2)>',
                      check={"status": '<b>bad</b> & "quoted"', "duration": 0.001}),
        "plain": _server("down", check="it's <em>down</em>")}}}
    s["workers"] = [{"id": "<u>", "pid": "<s>", "generation": 0, "status": "<blink>"}]
    page = statspage.html(s, now=NOW)
    # our one script is the only tag of its kind; no injected element survives as markup
    assert page.count("<script") == 1 and page.rstrip().endswith("</script></body></html>")
    for bad in ("<img", "<b>", "<em>", "<i ", "<u>", "<s>", "<blink>", 'onmouseover="x()"'):
        assert bad not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(2)&gt;" in page
    assert "&lt;b&gt;bad&lt;/b&gt; &amp; &quot;quoted&quot;" in page
    assert "it&#x27;s &lt;em&gt;down&lt;/em&gt;" in page
    assert 'id="backend-b&lt;&amp;&gt;"' in page and "Backend b&lt;&amp;&gt;" in page
    # and read back as text, the names are what the configuration said
    got = rows(page).rows
    names = [r["name"] for r in got]
    assert any(n.startswith(evil) for n in names), names
    assert any(n.startswith('<i onmouseover="x()">fe') for n in names), names


def test_every_server_state_is_written_and_coloured() -> None:
    page = statspage.html(tomorrow(), now=NOW)
    srv = server_rows(page)
    assert set(srv) == {"s-up", "s-down", "s-drain", "s-maint"}
    state = {name: r["cells"]["state"] for name, r in srv.items()}
    assert state["s-up"].startswith("UP ")
    assert state["s-down"].startswith("DOWN ")
    assert state["s-drain"].startswith("UP DRAIN ")  # up, and drained by an operator
    assert state["s-maint"].startswith("MAINT ")  # admin "maint" = state: said once
    assert state["s-up"] == "UP 2m 5s ago" and state["s-maint"] == "MAINT 3d 1h ago"
    assert '<span class="st up">UP</span>' in page
    assert '<span class="st down">DOWN</span>' in page
    assert '<span class="st warn">DRAIN</span>' in page
    assert '<span class="st warn">MAINT</span>' in page
    assert "backup" in srv["s-maint"]["name"] and "backup" not in srv["s-up"]["name"]
    # the backend: its own counts and state, and in the overview line
    (total,) = [r for r in rows(page).rows if r["class"] == "backend"]
    assert total["cells"]["state"] == "UP 2/4 up 1h 0m ago"
    assert re.search(r'href="#backend-app">app</a> <span class="st up">UP</span> 2/4 up', page)


def test_every_field_is_shown_in_human_units() -> None:
    page = statspage.html(tomorrow(), now=NOW)
    c = server_rows(page)["s-up"]["cells"]
    assert server_rows(page)["s-up"]["name"] == "s-up 127.0.0.1:9001"
    assert c == {
        "state": "UP 2m 5s ago", "check": "layer7 check passed: 200 took 3.4 ms",
        "weight": "1", "sessions now": "3", "sessions total": "12,345", "sessions rate": "4.2/s",
        "queue": "0", "1xx": "0", "2xx": "12,000", "3xx": "300", "4xx": "40", "5xx": "5",
        "errors": "2", "failures": "1", "retries": "7", "redispatches": "6",
        "bytes in": "1.2 MB", "bytes out": "5.6 GB",
        "time p50": "850 \u00b5s", "time p90": "120 ms", "time p99": "1.25 s"}
    assert "bad" in server_rows(page)["s-up"]["html_cls"]["5xx"]  # 5xx > 0 stands out
    fe = next(r for r in rows(page).rows if r["class"] == "frontend")
    assert fe["name"] == "www"
    assert fe["cells"] == {
        "state": "OPEN \u2013", "mode": "http", "sessions now": "37",
        "sessions total": "48,211", "requests total": "1,203,391", "requests rate": "413/s",
        "1xx": "0", "2xx": "1,190,021", "3xx": "8,120", "4xx": "5,011", "5xx": "239",
        "denied": "12", "rate-limited": "340", "client limit": "1", "bytes in": "391 MB",
        "bytes out": "8.9 GB"}
    # the backend's own numbers win; what it lacks is summed from its servers
    (be,) = [r["cells"] for r in rows(page).rows if r["class"] == "backend"]
    assert (be["sessions now"], be["sessions total"], be["queue"]) == ("9", "40,000", "1")
    assert (be["2xx"], be["retries"], be["bytes out"]) == ("48,000", "28", "22.4 GB")
    assert be["time p99"] == "\u2013"  # percentiles do not add up: never summed


def test_header_pid_uptime_reloads_workers_and_time() -> None:
    page = statspage.html(tomorrow(), now=NOW)
    meta = re.search(r'<p class="meta" id="summary">(.*?)</p>', page).group(1)
    text = re.sub(r"<[^>]+>", "", meta)
    assert text == ("pid 4211 \u00b7 up 2h 32m \u00b7 reloads 2 \u00b7 workers 1/2 serving "
                    "\u00b7 generated 2026-11-30 06:00:00 UTC")
    assert "worker 2: pid 4214, generation 2 <span class=\"st warn\">DRAINING</span>" in page
    # without `now`: the stats' own time if they carry one, else the clock
    assert "2026-11-30 06:00:00 UTC" in statspage.html({**tomorrow(), "time": NOW})
    assert time.strftime("%Y-%m-%d", time.gmtime()) in statspage.html(tomorrow())


def test_todays_stats_render_with_dashes_for_what_they_lack() -> None:
    page = statspage.html(today(), now=NOW)
    srv = server_rows(page)
    assert srv["s1"]["cells"]["state"] == "UP \u2013"  # no `since` yet
    assert srv["s2"]["cells"]["state"] == "DOWN \u2013"
    assert srv["s2"]["cells"]["check"] == "layer4 connection refused \u2013"
    assert srv["s1"]["cells"]["sessions total"] == "10"  # today's `requests`
    assert srv["s2"]["cells"]["failures"] == "2"
    for label in ("sessions now", "sessions rate", "queue", "2xx", "errors", "retries",
                  "redispatches", "bytes in", "bytes out", "time p50", "time p99"):
        assert srv["s1"]["cells"][label] == "\u2013", label
        assert "na" in srv["s1"]["html_cls"][label].split()  # hidden on a phone's card
    (be,) = [r["cells"] for r in rows(page).rows if r["class"] == "backend"]
    assert be["state"] == "UP 1/2 up \u2013"
    assert (be["sessions total"], be["failures"]) == ("10", "2")


@pytest.mark.parametrize("stats", [
    {}, None, [], {"backends": None, "frontends": 3, "workers": "x"},
    {"backends": {"b": {"servers": {"s": None, "t": {"state": None, "responses": [1],
                                                     "check": {"status": None},
                                                     "response_time": "fast", "since": "x",
                                                     "weight": "heavy"}}}}},
    {"backends": {"b": {"servers": [], "up": "all"}}, "uptime": -5, "pid": None},
    {"backends": {"b": {"servers": {"s": {"state": "up", "bytes_in": float("nan"),
                                          "rate": float("inf"), "sessions": 10**30,
                                          "since": float("inf"), "current": -float("inf")}},
                        "since": float("nan"), "up": float("nan")}},
     "uptime": float("inf"), "time": 1e30, "reloads": float("nan")},
])
def test_surprising_values_never_break_the_page(stats) -> None:
    for now in (NOW, None):
        page = statspage.html(stats, now=now)
        assert page.startswith("<!DOCTYPE html>") and page.endswith("</html>\n")
        assert '<main id="stats">' in page
        assert "nan" not in page and "inf" not in page.replace("info", "")


def test_page_is_self_contained_refreshes_and_fits_a_phone() -> None:
    page = statspage.html(tomorrow(), now=NOW)
    assert '<meta name="viewport" content="width=device-width,initial-scale=1">' in page
    assert "@media (max-width:600px)" in page
    # no external asset: nothing loads from anywhere (links are in-page anchors or ?json)
    assert not re.search(r"\b(src|srcset|action)=", page)
    assert set(re.findall(r'href="([^"]*)"', page)) == {"?json", "#backend-app"}
    assert "url(" not in page and "@import" not in page and "//" not in page.replace(
        "<!DOCTYPE", "")
    # refreshing: a script without which a <meta refresh> does it
    assert (f'<noscript><meta http-equiv="refresh" content="{statspage.REFRESH_SECONDS}">'
            "</noscript>") in page
    assert f"setInterval(tick,{statspage.REFRESH_SECONDS * 1000})" in page
    # the CSP allows exactly the inline style and script there are (by hash), nothing else
    csp = unescape(re.search(r'http-equiv="Content-Security-Policy" content="([^"]*)"',
                             page).group(1))
    inline = rows(page).inline
    assert len(inline["script"]) == 1 and len(inline["style"]) == 1

    def sha(text: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()

    assert f"script-src {sha(inline['script'][0])}'" in csp
    assert f"style-src {sha(inline['style'][0])}'" in csp
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp


# -- in a browser --------------------------------------------------------------------------------


def chromium_or_skip() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        why = ("chromium is not installed: the stats page's browser test needs Debian's "
               "`chromium` (bash scripts/test.sh installs it, or apt-get install chromium)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(why + "; CI=true, so this is a failure, not a skip")
        pytest.skip(why)
    return exe


async def chromium(exe: str, profile: Path, url: str, *args: str) -> str:
    """Run headless Chromium on `url` once; its standard output (the DOM with --dump-dom)."""
    p = await asyncio.create_subprocess_exec(
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
        f"--user-data-dir={profile}", *args, url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(p.communicate(), 120)
    except TimeoutError:
        p.kill()
        await p.wait()
        raise
    assert p.returncode == 0, f"chromium {args} exited {p.returncode}: {err.decode()[-2000:]}"
    return out.decode()


def _lb_config(port: int, aport: int, servers: list[tuple[str, str]]) -> dict:
    check = {"inter": "200ms", "fastinter": "100ms", "downinter": "100ms", "rise": 1,
             "fall": 1, "timeout": "300ms"}
    return {"global": {"workers": 2, "grace": "1s"},
            "frontends": {"www": {"bind": f"{LOOPBACK}:{port}", "default_backend": "app"}},
            "backends": {"app": {"servers": [{"name": n, "address": a} for n, a in servers],
                                 "check": check}},
            "admin": {"bind": f"{LOOPBACK}:{aport}"}}


async def _stats_json(aport: int) -> dict:
    r = await http_get(LOOPBACK, aport, "/stats?json")
    assert r.status == 200, r
    return json.loads(r.body)


async def test_stats_page_in_headless_chromium(tmp_path) -> None:
    exe = chromium_or_skip()
    port, aport = free_port(), free_port()
    async with (ScriptedServer("server-1") as s1, ScriptedServer("server-2") as s2,
                ScriptedServer("server-3") as s3):
        servers = [("server-1", s1.address), ("server-2", s2.address),
                   ("server-3", s3.address)]
        async with LbProcess(tmp_path, _lb_config(port, aport, servers)):
            # server-3 stops once the group serves: its checks fail, it goes down
            await s3.stop()
            want = {"server-1": "up", "server-2": "up", "server-3": "down"}
            deadline = time.monotonic() + 15
            while True:
                got = {n: s["state"] for n, s in
                       (await _stats_json(aport))["backends"]["app"]["servers"].items()}
                if got == want:
                    break
                assert time.monotonic() < deadline, f"states {got}, waiting for {want}"
                await asyncio.sleep(0.1)
            for _ in range(12):  # (to server-1 and server-2 only)
                assert (await http_get(LOOPBACK, port, "/")).status == 200
            served = await http_get(LOOPBACK, aport, "/stats")
            assert served.status == 200
            assert served.header("Content-Type") == "text/html; charset=utf-8"

            url = f"http://127.0.0.1:{aport}/stats"
            # (virtual time runs ahead 2 refresh periods: the page fetched itself again)
            budget = statspage.REFRESH_SECONDS * 2500
            dom = await chromium(exe, tmp_path / "profile", url, "--dump-dom",
                                 f"--virtual-time-budget={budget}")
            refreshes = re.search(r'<main id="stats" data-refreshes="(\d+)">', dom)
            assert refreshes and int(refreshes.group(1)) >= 1, dom[:3000]
            srv = server_rows(dom)
            assert set(srv) == set(want)
            for name, state in want.items():
                assert srv[name]["cells"]["state"].split()[0] == state.upper(), srv[name]
                assert srv[name]["name"].split()[1] == dict(servers)[name]
            assert srv["server-3"]["cells"]["check"].startswith("layer4 connection refused")
            assert srv["server-1"]["cells"]["check"].startswith("layer4 check passed")
            total = int(srv["server-1"]["cells"]["sessions total"].replace(",", "")) + int(
                srv["server-2"]["cells"]["sessions total"].replace(",", ""))
            assert total == 12
            # the script ran (the page's CSP let it): the refresh control is shown
            assert '<p id="ctl">' in dom and '<p id="ctl" hidden' not in dom

            shots = {"stats.png": "1440,600", "stats-phone.png": "412,980"}
            for name, size in shots.items():
                path = tmp_path / name
                await chromium(exe, tmp_path / "profile", url, f"--screenshot={path}",
                               f"--window-size={size}")
                data = path.read_bytes()
                assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
            if out := os.environ.get("FOOBAR_STATS_SCREENSHOTS"):  # README's, on purpose
                Path(out).mkdir(parents=True, exist_ok=True)
                for name in shots:
                    shutil.copyfile(tmp_path / name, Path(out) / name)
