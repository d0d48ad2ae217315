"""`python -m foobar_lb lab up|down|status|link|restart|add-app|exec`: the whole stack spread over
hosts made of network namespaces on one machine (two load balancers sharing a VRRP address with
keepalived, app hosts, MariaDB hosts, a client and an operator host), for tests and for trying
the "no single point of failure" topology by hand.

Rule of this module: it owns the lab and nothing else. Everything it makes lives in the
namespaces named by its prefix (a switch namespace holding a bridge, one namespace a host, a
veth pair between each host and the switch, created inside those namespaces: nothing in the
root namespace) and in its directory (lab.json is the record of what runs where). It starts
the real programs (foobar_lb, foobar_app, keepalived, mariadbd through foobar_app's
`cluster_up`) and kills only the processes it recorded or that run inside its own namespaces.
It holds no balancing or database logic: it writes configuration files and runs commands.
User mistakes are one line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["LabError", "cli_main", "lab_down", "lab_status", "lab_up"]

PROG = "foobar-lb lab"
DEFAULT_DIR = "foobar-lab"
DEFAULT_PREFIX = "fblab"
DEFAULT_SUBNET = "10.213.0.0/24"
SWITCH = "sw"
BRIDGE = "br0"
VRID = 51
ADVERT_INT = 1
APP_PORT = 8081
ADMIN_PORT = 8404
DB_PORT = 3306
# close priorities near the top: the backup's skew, (256 - priority) / 256 s, is 0.22 s
PRIORITY = {"lb1": 250, "lb2": 200}
# host number in the subnet; app hosts are .20+N (N = 1..9), db hosts .30+N
FIXED = {"ops": 5, "client": 10, "lb1": 11, "lb2": 12}
VIP_OFFSET = 100
MAX_APPS = 9
HOST_RE = re.compile(r"(lb[12]|app[1-9]|db[1-9]|client|ops)")
PREFIX_RE = re.compile(r"[a-z][a-z0-9]{0,9}")
CURL = "/usr/bin/curl"
PACKAGES = {"keepalived": "keepalived", "nft": "nftables", "curl": "curl"}


class LabError(Exception):
    """A mistake or a missing piece, said in one line (exit 2)."""


# --------------------------------------------------------------------------------------------
# small helpers


def _run(argv: list[str], check: bool = True, timeout: float = 30.0,
         input: str | None = None) -> subprocess.CompletedProcess:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input)
    except FileNotFoundError as e:
        raise LabError(f"{argv[0]}: not found") from e
    except subprocess.TimeoutExpired as e:
        raise LabError(f"{' '.join(argv)}: no answer within {timeout:g}s") from e
    if check and p.returncode != 0:
        why = (p.stderr or p.stdout).strip().splitlines()
        raise LabError(f"{' '.join(argv)}: {why[-1] if why else f'exit {p.returncode}'}")
    return p


def _ns_exec(ns: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    return _run(["ip", "netns", "exec", ns, *argv], **kw)


def _netns_list() -> list[str]:
    out = _run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _starttime(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


def _alive(proc: dict[str, Any]) -> bool:
    pid, start = proc.get("pid"), proc.get("start")
    return bool(pid) and _starttime(pid) is not None and (start is None or _starttime(pid) == start)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _kill_all(pids: list[int], grace: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is still there after `grace` seconds."""
    pids = [p for p in pids if _starttime(p) is not None]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while pids and time.monotonic() < deadline:
            for pid in pids:
                _reap(pid)
            pids = [p for p in pids if _starttime(p) is not None]
            if pids:
                time.sleep(0.05)
        if not pids:
            return


def _tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _write_private(path: Path, text: str) -> None:
    """A file only root may read (tokens, the header the track script sends)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def preflight() -> None:
    """Root, `ip netns`, keepalived, nft and curl; else one line naming what is missing."""
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, veth pairs, nftables)")
    if shutil.which("ip") is None:
        raise LabError("the lab needs `ip netns` (package iproute2)")
    p = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if p.returncode != 0:
        raise LabError(f"the lab needs `ip netns`: {p.stderr.strip() or 'it failed'}")
    for prog, package in PACKAGES.items():
        if shutil.which(prog) is None and not (prog == "curl" and Path(CURL).exists()):
            raise LabError(f"the lab needs {prog} (package {package})")
    if not Path(CURL).exists():
        raise LabError(f"the lab needs {CURL} (package curl)")


# --------------------------------------------------------------------------------------------
# the layout


class Layout:
    """Names and addresses of one lab, from its prefix and subnet."""

    def __init__(self, prefix: str, subnet: str, dir: Path):
        self.prefix = prefix
        self.net = ipaddress.ip_network(subnet)
        self.dir = dir

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def addr(self, host: str) -> str:
        if host in FIXED:
            n = FIXED[host]
        elif host.startswith("app"):
            n = 20 + int(host[3:])
        elif host.startswith("db"):
            n = 30 + int(host[2:])
        else:
            raise LabError(f"host {host!r}: unknown")
        return str(self.net.network_address + n)

    @property
    def vip(self) -> str:
        return str(self.net.network_address + VIP_OFFSET)

    def range(self, first: int, last: int) -> str:
        a = self.net.network_address
        return f"{a + first}-{a + last}"

    @property
    def plen(self) -> int:
        return self.net.prefixlen


def _check_subnet(text: str) -> str:
    try:
        net = ipaddress.ip_network(text)
    except ValueError:
        net = None
    if net is None or net.version != 4 or net.prefixlen > 24 or net.prefixlen < 8:
        raise LabError(f"--subnet {text!r}: expected an IPv4 network from /8 to /24 "
                       "(host addresses .5 to .100 are used), like 10.213.0.0/24")
    return str(net)


def _kind(host: str) -> str:
    return re.sub(r"\d+$", "", host)


# --------------------------------------------------------------------------------------------
# configuration files


def lb_toml(lay: Layout, apps: list[str], token_file: Path) -> str:
    servers = ",\n".join(f'  {{ name = "{a}", address = "{lay.addr(a)}:{APP_PORT}" }}' for a in apps)
    return f"""\
# foobar_lb configuration shared by both load balancers of the lab (written by `lab up`).
# The frontend binds the virtual address on both hosts: each load balancer namespace sets
# net.ipv4.ip_nonlocal_bind=1, so the backup can bind it before keepalived gives it the address.

[global]
workers = 1                  # one worker per load balancer: the lab runs on a 2-core machine
grace = "2s"
startup_timeout = "10s"

[defaults]
mode = "http"
# connect: small, so that a connection to an app host that was cut off is abandoned quickly
# and the request retried on the other host (retries/redispatch below)
timeout = {{ connect = "300ms", client = "30s", server = "5s" }}

[admin]
bind = "0.0.0.0:{ADMIN_PORT}"           # the client and ops hosts reach it (nftables); the token guards it
token_file = "{token_file}"

[frontends.www]
bind = ["{lay.vip}:80"]
default_backend = "app"

[backends.app]
balance = "roundrobin"
retries = 3
redispatch = true            # a failed attempt goes to the other app host
retry_on_timeout = true      # an idempotent request unanswered within timeout.server (5 s) too:
                             # one sent to a host whose cable was just cut goes to the other
servers = [
{servers},
]

# http checks with short intervals so the lab's tests are quick (the defaults are inter 2s,
# fall 3): a host that stops answering is down after 2 failed checks (the second 250 ms after
# the first), back after 2 passing ones.
[backends.app.check]
path = "/health"
inter = "500ms"
fastinter = "250ms"
downinter = "500ms"
rise = 2
fall = 2
timeout = "400ms"
"""


def keepalived_conf(lay: Layout, host: str, header_file: Path, nopreempt: bool) -> str:
    master = host == "lb1" and not nopreempt
    state = "MASTER" if master else "BACKUP"
    preempt = ("    nopreempt                        # a recovered node does not take the address back\n"
               if nopreempt else "")
    return f"""\
# keepalived configuration of {host} (written by `lab up`; the two differ in state and priority).
global_defs {{
    router_id {lay.ns(host)}
    script_user root                 # the track script runs as root: it reads the token's header file
    enable_script_security           # refuse scripts whose path a non-root user could change
    vrrp_garp_master_refresh 0       # no periodic gratuitous ARP
}}

# The node serves only while its load balancer says so: GET /ready of the local admin API
# (master, workers and listeners up, a server up in the default backend). The bearer token is
# sent from a root-only header file, so it is in no command line and no world-readable file.
vrrp_script foobar_ready {{
    script "{CURL} --silent --fail --output /dev/null --max-time 0.8 --header @{header_file} http://127.0.0.1:{ADMIN_PORT}/ready"
    interval 1                       # every second
    timeout 1
    fall 1                           # one failure: FAULT, the address goes (priority 0 advert)
    rise 2                           # two successes: back
}}

vrrp_instance foobar {{
    state {state:<26} # {"lb1 starts as the master" if master else "starts as a backup"}
    interface eth0                   # VRRP adverts (224.0.0.18, IP protocol 112) go out here
    virtual_router_id {VRID:<14} # the same on both, unique on the network
    priority {PRIORITY[host]:<23} # lb1 250, lb2 200: the highest ready node holds the address
    advert_int {ADVERT_INT}                     # the backup takes over after 3 missed adverts plus a skew
{preempt}    garp_master_delay 1              # gratuitous ARP again 1 s after becoming master
    garp_master_repeat 3             # 3 gratuitous ARPs at a time
    garp_lower_prio_repeat 3         # and when a master hears a lower-priority advert
    garp_lower_prio_delay 1
    virtual_ipaddress {{
        {lay.vip}/32 dev eth0
    }}
    track_script {{
        foobar_ready
    }}
}}
"""


def nftables_conf(lay: Layout, host: str) -> str:
    kind = _kind(host)
    head = f"""\
#!/usr/sbin/nft -f
# nftables of {host} ({lay.addr(host)}), the README's "Firewall rules" with the lab's addresses
flush ruleset

define LB_HOSTS  = {{ {lay.addr("lb1")}, {lay.addr("lb2")} }}
define APP_HOSTS = {lay.range(21, 20 + MAX_APPS)}
define DB_HOSTS  = {lay.range(31, 39)}
define CLIENT    = {lay.addr("client")}
define ADMIN     = {lay.addr("ops")}          # where ssh and the operator's commands come from

table inet filter {{
    chain input {{
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        ct state invalid drop
        iif lo accept
        meta l4proto {{ icmp, ipv6-icmp }} accept
        ip saddr $ADMIN tcp dport 22 accept
"""
    rules = {
        "lb": ("        # load balancer: HTTP and HTTPS from anywhere, VRRP between the pair, the admin\n"
               "        # API from the client and the operator\n"
               "        tcp dport { 80, 443 } accept\n"
               "        ip saddr $LB_HOSTS ip protocol vrrp accept\n"
               f"        ip saddr {{ $CLIENT, $ADMIN }} tcp dport {ADMIN_PORT} accept\n"),
        "app": ("        # app server: only from the load balancers\n"
                f"        ip saddr $LB_HOSTS tcp dport {APP_PORT} accept\n"),
        "db": ("        # database: from the app servers, replication between the databases, the operator\n"
               f"        ip saddr $APP_HOSTS tcp dport {DB_PORT} accept\n"
               f"        ip saddr $DB_HOSTS tcp dport {DB_PORT} accept\n"
               f"        ip saddr $ADMIN tcp dport {DB_PORT} accept\n"),
        "client": "        # client: nothing comes in but answers\n",
        "ops": "        # operator host: nothing comes in but answers\n",
    }[kind]
    return head + rules + """\
    }
    chain forward {
        type filter hook forward priority filter; policy drop;
    }
    chain output {
        type filter hook output priority filter; policy accept;
    }
}
"""


# --------------------------------------------------------------------------------------------
# the record


def _record_path(dir: Path) -> Path:
    return dir / "lab.json"


def _load(dir: Path) -> dict[str, Any]:
    path = _record_path(dir)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise LabError(f"--dir {str(dir)!r}: no lab there ({path.name} is missing; run `lab up`)") from e
    except (OSError, ValueError) as e:
        raise LabError(f"{path}: cannot read the lab's record: {e}") from e


def _save(dir: Path, lab: dict[str, Any]) -> None:
    path = _record_path(dir)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(lab, indent=2) + "\n")
    tmp.replace(path)


def _layout(lab: dict[str, Any]) -> Layout:
    return Layout(lab["prefix"], lab["subnet"], Path(lab["dir"]))


# --------------------------------------------------------------------------------------------
# network


def _add_netns(ns: str) -> None:
    _run(["ip", "netns", "add", ns])
    _run(["ip", "-n", ns, "link", "set", "lo", "up"])


def _make_switch(lay: Layout) -> None:
    sw = lay.ns(SWITCH)
    _add_netns(sw)
    _run(["ip", "-n", sw, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0",
          "forward_delay", "0", "mcast_snooping", "0"])
    _run(["ip", "-n", sw, "link", "set", BRIDGE, "up"])


def _plug(lay: Layout, host: str) -> None:
    """The host's namespace, its eth0 and the peer v-HOST on the switch's bridge, its address."""
    ns, sw = lay.ns(host), lay.ns(SWITCH)
    _add_netns(ns)
    _run(["ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"v-{host}",
          "netns", sw])
    _run(["ip", "-n", sw, "link", "set", f"v-{host}", "master", BRIDGE])
    _run(["ip", "-n", sw, "link", "set", f"v-{host}", "up"])
    _run(["ip", "-n", ns, "addr", "add", f"{lay.addr(host)}/{lay.plen}", "dev", "eth0"])
    _run(["ip", "-n", ns, "link", "set", "eth0", "up"])
    if _kind(host) == "lb":
        _ns_exec(ns, ["sysctl", "-q", "-w", "net.ipv4.ip_nonlocal_bind=1"])
    hostdir = lay.dir / host
    hostdir.mkdir(parents=True, exist_ok=True)
    conf = hostdir / "nftables.conf"
    conf.write_text(nftables_conf(lay, host))
    _ns_exec(ns, ["nft", "-f", str(conf)])


def _holds_vip(lay: Layout, host: str) -> bool:
    p = _run(["ip", "-n", lay.ns(host), "-4", "-o", "addr", "show", "dev", "eth0"], check=False)
    return f" {lay.vip}/" in p.stdout


# --------------------------------------------------------------------------------------------
# processes


def _child_env() -> dict[str, str]:
    """The environment of the lab's programs: this very foobar code first on the path."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent)
    paths = [src, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != src]]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.pop("FOOBAR_ADMIN_TOKEN", None)
    return env


def _spawn(lay: Layout, host: str, name: str, argv: list[str]) -> dict[str, Any]:
    hostdir = lay.dir / host
    hostdir.mkdir(parents=True, exist_ok=True)
    log = hostdir / f"{name}.log"
    with open(log, "ab") as out:
        p = subprocess.Popen(["ip", "netns", "exec", lay.ns(host), *argv], stdin=subprocess.DEVNULL,
                             stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                             cwd=hostdir, env=_child_env())
    return {"pid": p.pid, "start": _starttime(p.pid), "argv": argv, "log": str(log)}


def _commands(lab: dict[str, Any], host: str) -> dict[str, list[str]]:
    """What runs on a host (mariadbd on db hosts is started by foobar_app's cluster code)."""
    lay = _layout(lab)
    d = lay.dir
    kind = _kind(host)
    py = sys.executable
    if kind == "lb":
        return {
            "lb": [py, "-m", "foobar_lb", "serve", "--config", str(d / "lb.toml"),
                   "--pid-file", str(d / host / "lb.pid")],
            "keepalived": ["keepalived", "-n", "-l", "-D", "-G", "--vrrp",
                           "-f", str(d / host / "keepalived.conf"),
                           "-p", str(d / host / "keepalived.pid"),
                           "-r", str(d / host / "vrrp.pid"),
                           "-c", str(d / host / "checkers.pid")],
        }
    if kind == "app":
        argv = [py, "-m", "foobar_app", "serve", "--name", host, "--bind", f"{lay.addr(host)}:{APP_PORT}"]
        if lab["db"] == "mariadb":
            argv += ["--cluster", str(d / "db" / "cluster.json")]
        else:
            argv += ["--db", f"sqlite:///{d / host / 'foobar.db'}"]
        return {"app": argv}
    return {}


def _start(lab: dict[str, Any], host: str, only_dead: bool = False) -> list[str]:
    lay = _layout(lab)
    rec = lab["hosts"][host]
    started = []
    for name, argv in _commands(lab, host).items():
        old = rec["procs"].get(name)
        if only_dead and old and _alive(old):
            continue
        rec["procs"][name] = _spawn(lay, host, name, argv)
        started.append(name)
    return started


def _wait(what: str, cond, timeout: float, procs: list[dict[str, Any]] = (), interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        for proc in procs:
            if not _alive(proc):
                _reap(proc["pid"])
                raise LabError(f"{what}: {proc['argv'][0]} exited ({_tail(Path(proc['log']))})")
        if time.monotonic() >= deadline:
            tails = "; ".join(_tail(Path(p["log"]), 2) for p in procs)
            raise LabError(f"{what}: not within {timeout:g}s" + (f" ({tails})" if tails else ""))
        time.sleep(interval)


def _http_code(ns: str, url: str, header_file: Path | None = None, timeout: float = 1.0) -> int:
    argv = [CURL, "--silent", "--output", "/dev/null", "--write-out", "%{http_code}",
            "--max-time", f"{timeout:g}"]
    if header_file is not None:
        argv += ["--header", f"@{header_file}"]
    p = _ns_exec(ns, [*argv, url], check=False, timeout=timeout + 5)
    try:
        return int(p.stdout.strip() or 0)
    except ValueError:
        return 0


def _wait_app(lab: dict[str, Any], host: str, timeout: float = 30.0) -> None:
    lay = _layout(lab)
    url = f"http://{lay.addr(host)}:{APP_PORT}/health"
    _wait(f"{host}: foobar_app answering {url}", lambda: _http_code(lay.ns(host), url) == 200,
          timeout, [lab["hosts"][host]["procs"]["app"]], interval=0.2)


def _wait_lb(lab: dict[str, Any], host: str, timeout: float = 30.0) -> None:
    lay = _layout(lab)
    url = f"http://127.0.0.1:{ADMIN_PORT}/ready"
    header = lay.dir / host / "ready.header"
    _wait(f"{host}: foobar_lb ready ({url})",
          lambda: _http_code(lay.ns(host), url, header) == 200, timeout,
          [lab["hosts"][host]["procs"]["lb"]], interval=0.2)


def _vip_holders(lab: dict[str, Any]) -> list[str]:
    lay = _layout(lab)
    return [h for h in lab["hosts"] if _kind(h) == "lb" and _holds_vip(lay, h)]


# --------------------------------------------------------------------------------------------
# up, down, status


def _stale_namespaces(prefix: str) -> list[str]:
    pat = re.compile(re.escape(prefix) + r"-(" + HOST_RE.pattern + "|" + SWITCH + ")")
    return [ns for ns in _netns_list() if pat.fullmatch(ns)]


def lab_down(dir: str | Path | None = None, prefix: str | None = None) -> list[str]:
    """Stop every process of the lab and delete its namespaces (idempotent). Returns the
    namespaces deleted."""
    lab = None
    if dir is not None and _record_path(Path(dir)).exists():
        with contextlib.suppress(LabError):
            lab = _load(Path(dir))
    prefixes = {p for p in (prefix, lab and lab.get("prefix")) if p}
    pids: list[int] = []
    if lab and lab.get("hosts") and any(ns in _netns_list() for ns in
                                        (r["netns"] for r in lab["hosts"].values())):
        _db_down(lab)
    if lab:
        for rec in lab.get("hosts", {}).values():
            pids += [p["pid"] for p in rec.get("procs", {}).values() if _alive(p)]
    namespaces = sorted({ns for p in prefixes for ns in _stale_namespaces(p)})
    for ns in namespaces:
        out = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
        pids += [int(p) for p in out if p.isdigit()]
    _kill_all(sorted(set(pids)))
    for ns in namespaces:  # anything started meanwhile, or that ignored SIGTERM
        out = _run(["ip", "netns", "pids", ns], check=False).stdout.split()
        _kill_all([int(p) for p in out if p.isdigit()], grace=0)
    for ns in namespaces:
        _run(["ip", "netns", "del", ns], check=False)
    left = [ns for ns in namespaces if ns in _netns_list()]
    if left:
        raise LabError(f"could not delete the namespaces {', '.join(left)}")
    if lab:
        lab["hosts"] = {}
        lab["down"] = True
        _save(Path(dir), lab)
    return namespaces


def lab_up(dir: str | Path, prefix: str = DEFAULT_PREFIX, subnet: str = DEFAULT_SUBNET,
           nopreempt: bool = False, db: str = "sqlite", apps: int = 2) -> dict[str, Any]:
    preflight()
    d = Path(dir).resolve()
    lab_down(d, prefix)  # a stale lab of our own: same dir or same prefix
    if _record_path(d).exists() and (d / "db").is_dir():
        shutil.rmtree(d / "db")  # the stale lab's database: this one starts afresh
    d.mkdir(parents=True, exist_ok=True)
    lay = Layout(prefix, subnet, d)
    hosts = ["ops", "client", "lb1", "lb2", *[f"app{i}" for i in range(1, apps + 1)]]
    if db == "mariadb":
        hosts += ["db1", "db2"]
    lab: dict[str, Any] = {"prefix": prefix, "subnet": subnet, "dir": str(d), "vip": lay.vip,
                           "nopreempt": nopreempt, "db": db, "hosts": {}}
    for h in hosts:
        lab["hosts"][h] = {"netns": lay.ns(h), "address": lay.addr(h), "procs": {}}
    _save(d, lab)
    try:
        token = secrets.token_urlsafe(24)
        token_file = d / "admin.token"
        _write_private(token_file, token + "\n")
        _make_switch(lay)
        for h in hosts:
            _plug(lay, h)
        if db == "mariadb":
            _db_up(lab)
        app_hosts = [h for h in hosts if _kind(h) == "app"]
        for h in app_hosts:
            _start(lab, h)
        _save(d, lab)
        for h in app_hosts:
            _wait_app(lab, h)
        (d / "lb.toml").write_text(lb_toml(lay, app_hosts, token_file))
        for h in ("lb1", "lb2"):
            _write_private(d / h / "ready.header", f"Authorization: Bearer {token}\n")
            _write_private(d / h / "keepalived.conf", keepalived_conf(lay, h, d / h / "ready.header",
                                                                      nopreempt))
            lab["hosts"][h]["procs"]["lb"] = _spawn(lay, h, "lb", _commands(lab, h)["lb"])
        _save(d, lab)
        for h in ("lb1", "lb2"):
            _wait_lb(lab, h)
        for h in ("lb1", "lb2"):
            lab["hosts"][h]["procs"]["keepalived"] = _spawn(lay, h, "keepalived",
                                                            _commands(lab, h)["keepalived"])
        _save(d, lab)
        kas = [lab["hosts"][h]["procs"]["keepalived"] for h in ("lb1", "lb2")]
        _wait("the virtual address on one load balancer", lambda: len(_vip_holders(lab)) == 1,
              15.0, kas)
        lab["up_at"] = time.time()
        _save(d, lab)
    except BaseException:
        with contextlib.suppress(Exception):
            lab_down(d, prefix)
        raise
    return lab_status(d)


def _cluster():
    try:
        from foobar_app.db import cluster
    except ImportError as e:
        raise LabError(f"the database hosts need foobar_app: {e}") from e
    return cluster


def _db_up(lab: dict[str, Any]) -> None:
    """db1 the primary, db2 its replica, each mariadbd in its host's namespace on ADDRESS:3306,
    started by foobar_app's cluster code; its commands reach them from the ops host."""
    lay = _layout(lab)
    cluster = _cluster()
    hosts = [{"name": h, "address": lay.addr(h), "netns": lay.ns(h)} for h in lab["hosts"]
             if _kind(h) == "db"]
    try:
        cluster.cluster_up(lay.dir / "db", hosts=hosts, control_netns=lay.ns("ops"))
    except cluster.ClusterError as e:
        raise LabError(f"the database hosts: {e}") from e


def _db_nodes(lab: dict[str, Any]) -> dict[str, Any]:
    if lab.get("db") != "mariadb":
        return {}
    try:
        data = json.loads((Path(lab["dir"]) / "db" / "cluster.json").read_text())
    except (OSError, ValueError):
        return {}
    return data.get("nodes") or {}


def _db_down(lab: dict[str, Any]) -> None:
    """Stop the MariaDB nodes cleanly (replicas first) while the namespaces are still there."""
    if lab.get("db") != "mariadb" or not (Path(lab["dir"]) / "db" / "cluster.json").exists():
        return
    with contextlib.suppress(Exception):
        _cluster().cluster_down(Path(lab["dir"]) / "db", timeout=10.0)


def lab_status(dir: str | Path) -> dict[str, Any]:
    d = Path(dir).resolve()
    lab = _load(d)
    lay = _layout(lab)
    token = ""
    with contextlib.suppress(OSError):
        token = (d / "admin.token").read_text().strip()
    db_nodes = _db_nodes(lab)
    hosts: dict[str, Any] = {}
    for h, rec in lab.get("hosts", {}).items():
        kind = _kind(h)
        procs = {name: p["pid"] for name, p in rec["procs"].items() if _alive(p)}
        node = db_nodes.get(h) if kind == "db" else None
        if node and node.get("pid") and _starttime(node["pid"]) is not None:
            procs["mariadbd"] = node["pid"]
        entry: dict[str, Any] = {"netns": rec["netns"], "address": rec["address"]}
        if kind == "lb":
            entry["role"] = "master" if _holds_vip(lay, h) else "backup"
            entry["admin"] = f"http://{rec['address']}:{ADMIN_PORT}"
        elif kind == "db":
            entry["role"] = (node or {}).get("role", "unknown")
        else:
            entry["role"] = kind
        entry["pids"] = sorted(procs.values())
        entry["procs"] = procs
        hosts[h] = entry
    return {
        "vip": lab["vip"],
        "url": f"http://{lab['vip']}:80/",
        "client_netns": lay.ns("client"),
        "ops_netns": lay.ns("ops"),
        "dir": str(d),
        "prefix": lab["prefix"],
        "admin_token": token,
        "admin_urls": [f"http://{lay.addr(h)}:{ADMIN_PORT}" for h in ("lb1", "lb2")],
        "cluster": str(d / "db" / "cluster.json"),
        "hosts": hosts,
    }


# --------------------------------------------------------------------------------------------
# link, restart, add-app, exec


def _host(lab: dict[str, Any], host: str) -> dict[str, Any]:
    if host not in lab.get("hosts", {}):
        names = ", ".join(lab.get("hosts", {})) or "none: the lab is down"
        raise LabError(f"host {host!r}: not in this lab (hosts: {names})")
    return lab["hosts"][host]


def lab_link(dir: str | Path, host: str, state: str) -> None:
    lab = _load(Path(dir).resolve())
    _host(lab, host)
    lay = _layout(lab)
    _run(["ip", "-n", lay.ns(SWITCH), "link", "set", f"v-{host}", state])


def lab_restart(dir: str | Path, host: str, timeout: float = 30.0) -> list[str]:
    d = Path(dir).resolve()
    lab = _load(d)
    _host(lab, host)
    if _kind(host) == "db":
        cluster = _cluster()
        try:
            return ["mariadbd"] if host in cluster.cluster_start(d / "db", timeout=timeout) else []
        except cluster.ClusterError as e:
            raise LabError(f"{host}: {e}") from e
    started = _start(lab, host, only_dead=True)
    _save(d, lab)
    if "app" in started:
        _wait_app(lab, host, timeout)
    if "lb" in started:
        _wait_lb(lab, host, timeout)
    return started


def lab_add_app(dir: str | Path, name: str | None = None) -> dict[str, Any]:
    d = Path(dir).resolve()
    lab = _load(d)
    lay = _layout(lab)
    if name is None:
        free = [f"app{i}" for i in range(1, MAX_APPS + 1) if f"app{i}" not in lab["hosts"]]
        if not free:
            raise LabError(f"no room for another app host (at most {MAX_APPS})")
        name = free[0]
    elif not re.fullmatch(r"app[1-9]", name):
        raise LabError(f"--name {name!r}: expected app1 to app{MAX_APPS}")
    elif name in lab["hosts"]:
        raise LabError(f"--name {name!r}: the lab has that host already")
    lab["hosts"][name] = {"netns": lay.ns(name), "address": lay.addr(name), "procs": {}}
    _save(d, lab)
    _plug(lay, name)
    _start(lab, name)
    _save(d, lab)
    _wait_app(lab, name)
    st = lab_status(d)["hosts"][name]
    return {"name": name, **st, "server": f"{lay.addr(name)}:{APP_PORT}"}


# --------------------------------------------------------------------------------------------
# command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="A lab of hosts made of network namespaces: two load "
                                       "balancers on a VRRP address (keepalived), app hosts, "
                                       "database hosts, a client. Needs root.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", parser_class=_Parser)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=DEFAULT_DIR, help=f"the lab's directory (default ./{DEFAULT_DIR})")
    up = sub.add_parser("up", parents=[common], help="create and start the lab (a stale one of the "
                                                    "same dir or prefix is removed first)")
    up.add_argument("--prefix", default=DEFAULT_PREFIX,
                    help=f"namespace name prefix (default {DEFAULT_PREFIX})")
    up.add_argument("--subnet", default=DEFAULT_SUBNET, help=f"default {DEFAULT_SUBNET}")
    up.add_argument("--nopreempt", action="store_true",
                    help="a recovered lb1 does not take the virtual address back")
    up.add_argument("--db", choices=("mariadb", "sqlite"), default="mariadb",
                    help="mariadb: db1 (primary) and db2 (replica) hosts; sqlite: each app host "
                         "its own file, no db hosts (default mariadb)")
    up.add_argument("--json", action="store_true", help="print the status as JSON")
    down = sub.add_parser("down", parents=[common], help="stop everything and delete the namespaces")
    down.add_argument("--prefix", help="also remove namespaces of this prefix")
    st = sub.add_parser("status", parents=[common], help="hosts, addresses, roles, pids")
    st.add_argument("--json", action="store_true")
    ln = sub.add_parser("link", parents=[common], help="plug or unplug a host's cable")
    ln.add_argument("host")
    ln.add_argument("state", choices=("down", "up"))
    rs = sub.add_parser("restart", parents=[common], help="start again what stopped on a host")
    rs.add_argument("host")
    aa = sub.add_parser("add-app", parents=[common], help="a new app host (not added to the load "
                                                         "balancers: use admin --peers ... add)")
    aa.add_argument("--name", help="appN (default: the first free one)")
    ex = sub.add_parser("exec", parents=[common], help="run a command in a host's namespace",
                        usage=f"{PROG} exec [--dir DIR] HOST -- CMD ...")
    ex.add_argument("host")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    return p


def _print_status(st: dict[str, Any]) -> None:
    print(f"lab {st['prefix']} in {st['dir']}: {st['url']} (virtual address {st['vip']})")
    print(f"{'HOST':8} {'NETNS':16} {'ADDRESS':14} {'ROLE':8} PIDS")
    for h, e in st["hosts"].items():
        print(f"{h:8} {e['netns']:16} {e['address']:14} {e['role']:8} "
              f"{' '.join(str(p) for p in e['pids']) or '-'}")
    print(f"admin: {', '.join(st['admin_urls'])} (token in {st['dir']}/admin.token); "
          f"try: ip netns exec {st['client_netns']} curl -s {st['url']}")


def cli_main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.action is None:
        _parser().print_usage(sys.stderr)
        return 2
    try:
        preflight()
        if args.action == "up":
            if not PREFIX_RE.fullmatch(args.prefix):
                raise LabError(f"--prefix {args.prefix!r}: expected a lowercase letter then up to "
                               "9 letters or digits")
            subnet = _check_subnet(args.subnet)
            st = lab_up(args.dir, args.prefix, subnet, args.nopreempt, args.db)
            if args.json:
                print(json.dumps(st, indent=2))
            else:
                _print_status(st)
        elif args.action == "down":
            gone = lab_down(Path(args.dir).resolve(), args.prefix)
            print(f"lab down: {len(gone)} namespaces deleted")
        elif args.action == "status":
            st = lab_status(args.dir)
            if args.json:
                print(json.dumps(st, indent=2))
            else:
                _print_status(st)
        elif args.action == "link":
            lab_link(args.dir, args.host, args.state)
        elif args.action == "restart":
            started = lab_restart(args.dir, args.host)
            print(f"{args.host}: started {', '.join(started)}" if started
                  else f"{args.host}: everything runs already")
        elif args.action == "add-app":
            print(json.dumps(lab_add_app(args.dir, args.name), indent=2))
        elif args.action == "exec":
            cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
            if not cmd:
                raise LabError("exec: give a command after --")
            lab = _load(Path(args.dir).resolve())
            _host(lab, args.host)
            sys.stdout.flush()
            os.execvp("ip", ["ip", "netns", "exec", lab["hosts"][args.host]["netns"], *cmd])
    except LabError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0
