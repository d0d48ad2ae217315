"""The lab (`foobar_lb lab`): hosts made of network namespaces, two load balancers on a keepalived
VRRP address, the nftables rule set on every host, and what a client sees when a load balancer's
process dies, when its cable is pulled and when an app host's cable is pulled.

One lab is shared by the whole module (made once, with a prefix of its own, and taken down in a
finalizer that also checks nothing is left); the tests run in file order and each leaves the lab
as it found it (lb1 master, every cable in, every process running). They need root, `ip netns`
and keepalived: elsewhere they are skipped, except under CI=true where that is a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.netns, pytest.mark.mariadb, pytest.mark.slow]

SRC = str(Path(__file__).resolve().parent.parent / "src")
LOAD = str(Path(__file__).resolve().parent / "lab_load.py")
PREFIX = f"t{os.getpid() % 100000}"
CONCURRENCY = 4
LOAD_TIMEOUT = 1.0  # per request: a request whose SYN is lost waits for the 1 s retransmission


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "the lab tests need root"
    if shutil.which("ip") is None or subprocess.run(["ip", "netns", "list"],
                                                    capture_output=True).returncode != 0:
        return "the lab tests need `ip netns` (iproute2)"
    for prog, package in (("keepalived", "keepalived"), ("nft", "nftables")):
        if shutil.which(prog) is None:
            return f"the lab tests need {prog} (package {package})"
    if not Path("/usr/bin/curl").exists():
        return "the lab tests need /usr/bin/curl (package curl)"
    return None


def _need_mariadb() -> None:
    from foobar_app.db import cluster

    try:
        cluster.find_binaries()
    except cluster.MariaDBMissing as e:
        pytest.fail(f"{e} (the README's test command installs it)")


@pytest.fixture(scope="module", autouse=True)
def _needs():
    why = _missing()
    if why and os.environ.get("CI") == "true":
        pytest.fail(f"{why} (CI=true: not skipped)")
    if why:
        pytest.skip(why)
    _need_mariadb()


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def lab(*args: str, timeout: float = 120.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "foobar_lb", "lab", *args],
                          capture_output=True, text=True, timeout=timeout, env=env or _env())


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix + "-")]


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text in cmd and state != "Z":
            found.append(f"{p.name} {cmd.strip()}")
    return found


def _root_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return sorted(line.split(":")[1].strip() for line in out.splitlines())


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Lab:
    def __init__(self, dir: Path, status: dict):
        self.dir = dir
        self.st = status

    def status(self) -> dict:
        p = lab("status", "--dir", str(self.dir), "--json")
        assert p.returncode == 0, p.stderr
        self.st = json.loads(p.stdout)
        return self.st

    def ns(self, host: str) -> str:
        return self.st["hosts"][host]["netns"]

    def holds_vip(self, host: str) -> bool:
        out = subprocess.run(["ip", "-n", self.ns(host), "-4", "-o", "addr", "show", "dev", "eth0"],
                             capture_output=True, text=True).stdout
        return f" {self.st['vip']}/" in out

    def wait_vip(self, host: str, timeout: float) -> float:
        """Seconds until `host` holds the virtual address (polled every 20 ms); fails after
        `timeout`."""
        t0 = time.monotonic()
        while not self.holds_vip(host):
            assert time.monotonic() - t0 < timeout, f"{host} did not take the virtual address " \
                                                    f"within {timeout}s"
            time.sleep(0.02)
        return time.monotonic() - t0

    def mac(self, host: str) -> str:
        out = subprocess.run(["ip", "-n", self.ns(host), "-o", "link", "show", "dev", "eth0"],
                             capture_output=True, text=True).stdout
        return out.split("link/ether ")[1].split()[0]

    def client_neighbour(self) -> str:
        out = subprocess.run(["ip", "-n", self.st["client_netns"], "neigh", "show", self.st["vip"]],
                             capture_output=True, text=True).stdout
        return out.split("lladdr ")[1].split()[0] if "lladdr " in out else ""

    def curl(self, host: str, url: str, *extra: str, timeout: float = 1.0) -> tuple[int, str]:
        p = subprocess.run(["ip", "netns", "exec", self.ns(host), "/usr/bin/curl", "-s", "-i",
                            "-m", str(timeout), *extra, url], capture_output=True, text=True,
                           timeout=timeout + 5)
        code = int(p.stdout.split()[1]) if p.stdout.startswith("HTTP/") else 0
        return code, p.stdout

    def load(self, duration: float, timeout: float = LOAD_TIMEOUT) -> Load:
        return Load(self, duration, timeout)


class Load:
    """tests/lab_load.py in the client namespace, stopped with SIGTERM (or after `duration`)."""

    def __init__(self, lab: Lab, duration: float, timeout: float):
        self.timeout = timeout
        self.p = subprocess.Popen(["ip", "netns", "exec", lab.st["client_netns"], sys.executable, LOAD,
                                   "--url", lab.st["url"], "--duration", str(duration),
                                   "--concurrency", str(CONCURRENCY), "--timeout", str(timeout),
                                   "--pause", "0.01"], stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "started"

    def stop(self) -> dict:
        self.p.send_signal(signal.SIGTERM)
        out, _ = self.p.communicate(timeout=self.timeout + 10)
        return json.loads(out.strip().splitlines()[-1])


def _tcp_open(the_lab: Lab, host: str, address: str, port: int) -> bool:
    code = (f"import socket; s = socket.socket(); s.settimeout(0.5); "
            f"print(s.connect_ex(({address!r}, {port})))")
    p = subprocess.run(["ip", "netns", "exec", the_lab.ns(host), sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=10)
    return p.stdout.strip() == "0"


def _failures_between(report: dict, t0: float, t1: float) -> list:
    return [f for f in report["failures"] if t0 <= f[0] <= t1]


def _say(what: str, report: dict, **figures) -> None:
    extra = " ".join(f"{k}={v:.2f}s" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items())
    print(f"\n{what}: {extra} ok={report['ok']} failed={report['failed']} kinds={report['kinds']} "
          f"longest_gap={report['longest_gap']:.2f}s")


@pytest.fixture(scope="module")
def the_lab(tmp_path_factory, _needs):
    dir = tmp_path_factory.mktemp("lab") / "lab"
    before_links = _root_links()
    p = lab("up", "--dir", str(dir), "--prefix", PREFIX, "--json")
    try:
        assert p.returncode == 0, p.stderr
        yield Lab(dir, json.loads(p.stdout))
    finally:
        down = lab("down", "--dir", str(dir), "--prefix", PREFIX)
        assert down.returncode == 0, down.stderr
        again = lab("down", "--dir", str(dir), "--prefix", PREFIX)  # idempotent
        assert again.returncode == 0, again.stderr
        assert _namespaces(PREFIX) == []
        assert _processes_mentioning(str(dir)) == []  # keepalived, foobar_lb, foobar_app, curl
        assert _root_links() == before_links  # nothing was ever made in the root namespace


def test_user_mistakes_are_one_line_and_exit_2(tmp_path):
    p = lab("status", "--dir", str(tmp_path / "none"))
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == (f"foobar-lb lab: error: --dir {str(tmp_path / 'none')!r}: no lab there "
                        "(lab.json is missing; run `lab up`)\n")
    p = lab("up", "--dir", str(tmp_path / "x"), "--subnet", "10.1.2.0/28")
    assert (p.returncode, p.stderr) == (2, "foobar-lb lab: error: --subnet '10.1.2.0/28': expected an "
                                           "IPv4 network from /8 to /24 (host addresses .5 to .100 are "
                                           "used), like 10.213.0.0/24\n")
    p = lab("up", "--dir", str(tmp_path / "x"), "--prefix", "Bad-Prefix")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--prefix 'Bad-Prefix'" in p.stderr
    assert not (tmp_path / "x").exists()
    # a machine without keepalived: one line naming the package
    bin = tmp_path / "bin"
    bin.mkdir()
    for prog in ("ip", "nft"):
        (bin / prog).symlink_to(shutil.which(prog))
    env = {**_env(), "PATH": f"{bin}:/usr/bin:/bin"}
    p = lab("up", "--dir", str(tmp_path / "x"), env=env)
    assert (p.returncode, p.stderr) == (2, "foobar-lb lab: error: the lab needs keepalived (package "
                                           "keepalived)\n")
    assert not (tmp_path / "x").exists()


def test_status_json_names_every_host_its_address_role_and_processes(the_lab):
    st = the_lab.status()
    d = str(the_lab.dir.resolve())
    assert {k: st[k] for k in ("vip", "url", "client_netns", "ops_netns", "dir", "prefix",
                               "admin_urls", "cluster")} == {
        "vip": "10.213.0.100", "url": "http://10.213.0.100:80/",
        "client_netns": f"{PREFIX}-client", "ops_netns": f"{PREFIX}-ops", "dir": d, "prefix": PREFIX,
        "admin_urls": ["http://10.213.0.11:8404", "http://10.213.0.12:8404"],
        "cluster": f"{d}/db/cluster.json",
    }
    assert st["admin_token"] == (the_lab.dir / "admin.token").read_text().strip()
    assert len(st["admin_token"]) >= 16
    hosts = st["hosts"]
    assert {h: (e["netns"], e["address"], e["role"]) for h, e in hosts.items()} == {
        "ops": (f"{PREFIX}-ops", "10.213.0.5", "ops"),
        "client": (f"{PREFIX}-client", "10.213.0.10", "client"),
        "lb1": (f"{PREFIX}-lb1", "10.213.0.11", "master"),
        "lb2": (f"{PREFIX}-lb2", "10.213.0.12", "backup"),
        "app1": (f"{PREFIX}-app1", "10.213.0.21", "app"),
        "app2": (f"{PREFIX}-app2", "10.213.0.22", "app"),
        "db1": (f"{PREFIX}-db1", "10.213.0.31", "primary"),
        "db2": (f"{PREFIX}-db2", "10.213.0.32", "replica"),
    }
    for h in ("lb1", "lb2"):
        assert sorted(hosts[h]["procs"]) == ["keepalived", "lb"]
        assert hosts[h]["admin"] == f"http://10.213.0.1{h[-1]}:8404"
    for h in ("app1", "app2"):
        assert sorted(hosts[h]["procs"]) == ["app"]
    for h in ("db1", "db2"):
        assert sorted(hosts[h]["procs"]) == ["mariadbd"]
    for e in hosts.values():
        assert e["pids"] == sorted(e["procs"].values())
        assert all(_alive(pid) for pid in e["pids"])
    assert set(_namespaces(PREFIX)) == {f"{PREFIX}-{h}" for h in hosts} | {f"{PREFIX}-sw"}


def test_generated_configurations_are_valid_and_the_token_is_private(the_lab):
    d = the_lab.dir
    p = subprocess.run([sys.executable, "-m", "foobar_lb", "check", "--config", str(d / "lb.toml")],
                       capture_output=True, text=True, env=_env())
    assert (p.returncode, p.stdout.strip()) == (0, f"{d / 'lb.toml'}: ok (1 frontends, 1 backends, "
                                                   "2 servers)")
    assert json.loads((d / "db" / "cluster.json").read_text())["control_netns"] == f"{PREFIX}-ops"
    for h in ("lb1", "lb2"):
        p = subprocess.run(["keepalived", "--config-test", "-f", str(d / h / "keepalived.conf")],
                           capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
    for f in ("admin.token", "lb1/ready.header", "lb2/ready.header", "lb1/keepalived.conf",
              "lb2/keepalived.conf"):
        assert (d / f).stat().st_mode & 0o777 == 0o600, f
    token = the_lab.st["admin_token"]
    assert _processes_mentioning(token) == []  # in no command line (the track script's included)
    for h in the_lab.st["hosts"]:
        p = subprocess.run(["nft", "-c", "-f", str(d / h / "nftables.conf")], capture_output=True,
                           text=True)
        assert p.returncode == 0, p.stderr


def test_the_site_answers_through_the_vip_and_the_firewall_closes_the_rest(the_lab):
    served = []
    for _ in range(4):
        code, out = the_lab.curl("client", the_lab.st["url"])
        assert code == 200
        served.append(next(line.split(": ")[1].strip() for line in out.splitlines()
                           if line.lower().startswith("x-served-by:")))
    assert sorted(served) == ["app1", "app1", "app2", "app2"]
    auth = f"Authorization: Bearer {the_lab.st['admin_token']}"
    # the admin API: from the client and the operator, with the token; without it 401
    for host in ("client", "ops"):
        assert the_lab.curl(host, "http://10.213.0.11:8404/ready", "-H", auth)[0] == 200
    assert the_lab.curl("client", "http://10.213.0.12:8404/ready")[0] == 401
    # an app server: from a load balancer yes, from the client and the operator no (dropped)
    assert the_lab.curl("lb2", "http://10.213.0.21:8081/health")[0] == 200
    for host in ("client", "ops"):
        assert the_lab.curl(host, "http://10.213.0.21:8081/health", timeout=0.5)[0] == 0
    # a load balancer's other ports: closed to the client
    assert the_lab.curl("client", "http://10.213.0.11:22/", timeout=0.5)[0] == 0
    # the databases: from the app hosts yes, from the client no
    for db in ("10.213.0.31", "10.213.0.32"):
        assert _tcp_open(the_lab, "app1", db, 3306)
        assert not _tcp_open(the_lab, "client", db, 3306)
        assert not _tcp_open(the_lab, "lb1", db, 3306)


def _lb1_takes_back(the_lab: Lab, load: Load, since: float) -> tuple[float, dict, list]:
    """lb1 takes the address back (within 15 s; the client's neighbour entry follows it); the
    load is stopped a second later. Returns how long it took, the load's report and the
    failures from `since` until the requests in flight at the take-back have timed out."""
    back = the_lab.wait_vip("lb1", 15.0)
    t_back = time.time()
    time.sleep(1.0)
    report = load.stop()
    assert not the_lab.holds_vip("lb2")
    assert the_lab.client_neighbour() == the_lab.mac("lb1")
    return back, report, _failures_between(report, since, t_back + LOAD_TIMEOUT + 0.5)


def test_master_process_killed_the_backup_takes_over_within_3s_and_lb1_takes_it_back(the_lab):
    st = the_lab.status()
    assert (st["hosts"]["lb1"]["role"], st["hosts"]["lb2"]["role"]) == ("master", "backup")
    master = st["hosts"]["lb1"]["procs"]["lb"]
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(master)], capture_output=True,
                                              text=True).stdout.split()]
    assert len(workers) == 1
    load = the_lab.load(60)
    time.sleep(1.0)
    killed = time.time()
    os.kill(master, signal.SIGKILL)
    took = the_lab.wait_vip("lb2", 5.0)
    t_vip = time.time()
    time.sleep(0.5)
    assert not any(_alive(w) for w in workers), "the workers outlived their master"
    assert not the_lab.holds_vip("lb1")
    assert the_lab.client_neighbour() == the_lab.mac("lb2")  # the gratuitous ARP was heard
    time.sleep(LOAD_TIMEOUT)  # the requests lost in the switch have timed out
    # lb1 back: its track script passes twice, it preempts after 3 adverts plus its skew
    restarted = time.time()
    p = lab("restart", "--dir", str(the_lab.dir), "lb1")
    assert (p.returncode, p.stdout) == (0, "lb1: started lb\n"), p.stderr
    back, report, takeback = _lb1_takes_back(the_lab, load, restarted)
    during = _failures_between(report, killed, restarted)
    _say("lb1's foobar_lb SIGKILLed", report, takeover=took, takeback_after_restart=back,
         failed_takeover=len(during), failed_takeback=len(takeback))
    assert took <= 3.0
    assert t_vip - killed <= 3.0 + 0.1
    assert report["failed"] == len(during) + len(takeback)  # no failure outside the two switches
    assert report["ok"] > 0 and report["longest_gap"] < 3.0 + LOAD_TIMEOUT
    # every request in flight on lb2 when the address moves back is lost: at most one a client
    assert len(takeback) <= CONCURRENCY
    assert the_lab.status()["hosts"]["lb1"]["role"] == "master"


def test_master_link_cut_the_backup_takes_over_within_4s_and_lb1_takes_it_back(the_lab):
    assert the_lab.holds_vip("lb1")
    load = the_lab.load(60)
    time.sleep(1.0)
    cut = time.time()
    assert lab("link", "--dir", str(the_lab.dir), "lb1", "down").returncode == 0
    took = the_lab.wait_vip("lb2", 6.0)
    time.sleep(LOAD_TIMEOUT)
    assert the_lab.client_neighbour() == the_lab.mac("lb2")
    restored = time.time()
    assert lab("link", "--dir", str(the_lab.dir), "lb1", "up").returncode == 0
    back, report, takeback = _lb1_takes_back(the_lab, load, restored)
    during = _failures_between(report, cut, restored)
    _say("lb1's cable pulled", report, takeover=took, takeback_after_link_up=back,
         failed_takeover=len(during), failed_takeback=len(takeback))
    assert took <= 3 * 1 + 1  # 3 x advert_int + 1 s
    assert report["failed"] == len(during) + len(takeback)
    assert len(takeback) <= CONCURRENCY


def test_an_app_host_cut_off_under_load(the_lab):
    """A pulled cable black-holes the app host: new connections to it time out after
    timeout.connect (300 ms) and are retried on app2. A GET that reached app1 between the cut
    and app1 being marked down (in flight, or sent on a pooled connection) gets no answer: the
    lab's backend has `retry_on_timeout`, so after timeout.server (5 s) it goes to app2 too. No
    GET fails; those few are late (about 5 s, at most one a client). The load's clients wait up
    to 8 s here, to see the load balancer's answer."""
    load = the_lab.load(60, timeout=8.0)
    time.sleep(1.0)
    assert lab("link", "--dir", str(the_lab.dir), "app1", "down").returncode == 0
    time.sleep(6.0)
    assert lab("link", "--dir", str(the_lab.dir), "app1", "up").returncode == 0
    time.sleep(1.5)
    report = load.stop()
    _say("app1's cable pulled", report)
    assert report["failed"] == 0, report["kinds"]
    assert report["ok"] > 0 and report["servers"]["app2"] > 0
    assert report["longest_gap"] < 1.0


def _admin(the_lab: Lab, *args: str) -> subprocess.CompletedProcess:
    """`admin --peers` from the ops host, the token in the environment (no command line)."""
    env = _env()
    env["FOOBAR_ADMIN_TOKEN"] = the_lab.st["admin_token"]
    peers = ",".join(the_lab.st["admin_urls"])
    return subprocess.run([sys.executable, "-m", "foobar_lb", "lab", "exec", "--dir", str(the_lab.dir),
                           "ops", "--", sys.executable, "-m", "foobar_lb", "admin", "--peers", peers,
                           *args], capture_output=True, text=True, timeout=60, env=env)


def test_a_third_app_host_added_with_admin_peers_under_load_fails_nothing(the_lab):
    load = the_lab.load(60)
    time.sleep(0.5)
    p = lab("add-app", "--dir", str(the_lab.dir))
    assert p.returncode == 0, p.stderr
    added = json.loads(p.stdout)
    assert {k: added[k] for k in ("name", "netns", "address", "role", "server")} == {
        "name": "app3", "netns": f"{PREFIX}-app3", "address": "10.213.0.23", "role": "app",
        "server": "10.213.0.23:8081"}
    p = _admin(the_lab, "add", "app", "app3", "10.213.0.23:8081")
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [
        f"{url}: added app/app3 10.213.0.23:8081: state down, admin ready, weight 1 (added at run time)"
        for url in the_lab.st["admin_urls"]]
    t0 = time.monotonic()
    while the_lab.curl("client", the_lab.st["url"])[1].count("X-Served-By: app3") == 0:
        assert time.monotonic() - t0 < 5.0, "app3 took no request within 5 s"
        time.sleep(0.1)
    time.sleep(1.0)
    report = load.stop()
    _say("app3 added to both load balancers", report, servers=report["servers"])
    assert report["failed"] == 0
    assert report["servers"].get("app3", 0) > 0
    # both load balancers have it (the backup too, ready for a takeover)
    p = _admin(the_lab, "servers", "--json")
    assert p.returncode == 0, p.stderr
    assert p.stdout.count('"name": "app3"') == 2


def test_admin_peers_with_one_peer_cut_off_exits_1_naming_it(the_lab):
    assert lab("link", "--dir", str(the_lab.dir), "lb2", "down").returncode == 0
    try:
        p = _admin(the_lab, "--timeout", "1", "servers")
        assert p.returncode == 1
        lb2 = the_lab.st["admin_urls"][1]
        assert p.stderr == (f"foobar-lb: error: {lb2}: cannot reach the admin listener: no connection "
                            "within 1s\n")
        assert p.stdout.startswith(f"== {the_lab.st['admin_urls'][0]}\n")
    finally:
        assert lab("link", "--dir", str(the_lab.dir), "lb2", "up").returncode == 0
    assert the_lab.holds_vip("lb1")


def _post(the_lab: Lab, name: str) -> tuple[int, dict, str]:
    code, out = the_lab.curl("client", the_lab.st["url"] + "items", "-X", "POST", "-H",
                             "Content-Type: application/json", "-d", json.dumps({"name": name}),
                             timeout=8.0)
    head, _, body = out.partition("\n\n")  # text mode: curl's CRLF read as LF
    role = next((line.split(": ")[1].strip() for line in head.splitlines()
                 if line.lower().startswith("x-db-role:")), "")
    return code, json.loads(body) if body.startswith("{") else {}, role


def _cluster(the_lab: Lab, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "foobar_app", "cluster", *args, "--dir",
                           str(the_lab.dir / "db")], capture_output=True, text=True, timeout=60,
                          env=_env())


def test_the_primarys_host_cut_off_writes_503_reads_go_on_failover_and_rejoin(the_lab):
    from foobar_app.db import cluster

    code, item, role = _post(the_lab, "before")
    assert (code, role) == (201, "primary")
    db = the_lab.dir / "db"
    assert lab("link", "--dir", str(the_lab.dir), "db1", "down").returncode == 0
    t0 = time.monotonic()
    while True:  # the first write may wait for the cut connection: 503, committed unknown
        code, body, _ = _post(the_lab, "during")
        assert code == 503 and body["error"]["code"] == "primary_unavailable", (code, body)
        if body["error"]["committed"] is False:
            break
        assert time.monotonic() - t0 < 10.0
    assert body["error"]["code"] == "primary_unavailable"
    code, out = the_lab.curl("client", the_lab.st["url"] + f"items/{item['id']}")
    assert code == 200 and "X-DB-Role: replica" in out and '"name": "before"' in out
    p = _cluster(the_lab, "failover")
    assert p.returncode == 0, p.stderr
    assert "db2 is the primary" in p.stdout
    t0 = time.monotonic()
    while (got := _post(the_lab, "after"))[0] != 201:
        assert time.monotonic() - t0 < 10.0, got
        time.sleep(0.2)
    assert got[2] == "primary"
    assert the_lab.status()["hosts"]["db1"]["role"] == "fenced"
    assert the_lab.st["hosts"]["db2"]["role"] == "primary"
    # db1's cable back: still writable (nobody could tell it), but stale: it takes no writes
    assert lab("link", "--dir", str(the_lab.dir), "db1", "up").returncode == 0
    time.sleep(2.0)
    before = {r["node"]: r for r in cluster.cluster_status(db)}
    assert before["db1"].get("stale") is True and before["db1"]["read_only"] is False
    for i in range(5):
        assert _post(the_lab, f"back {i}")[:3:2] == (201, "primary")
    after = {r["node"]: r for r in cluster.cluster_status(db)}
    assert after["db1"]["gtid"] == before["db1"]["gtid"]  # not one write reached it
    assert after["db2"]["gtid"] != before["db2"]["gtid"]
    p = _cluster(the_lab, "rejoin", "db1")
    assert p.returncode == 0, p.stderr
    st = the_lab.status()["hosts"]
    assert (st["db1"]["role"], st["db2"]["role"]) == ("replica", "primary")
    rows = {r["node"]: r for r in cluster.cluster_status(db)}
    assert rows["db1"]["read_only"] is True and not rows["db1"].get("stale")


def test_down_leaves_no_namespace_process_or_interface(the_lab):
    hosts = the_lab.status()["hosts"]
    pids = [pid for e in hosts.values() for pid in e["pids"]]
    assert len(pids) == 2 * 2 + len([h for h in hosts if h.startswith(("app", "db"))])
    p = lab("down", "--dir", str(the_lab.dir))
    assert (p.returncode, p.stdout) == (0, f"lab down: {len(hosts) + 1} namespaces deleted\n"), p.stderr
    assert _namespaces(PREFIX) == []
    assert [pid for pid in pids if _alive(pid)] == []
    assert _processes_mentioning(str(the_lab.dir)) == []
    assert not [name for name in _root_links() if name.startswith(("v-", "eth0@"))]
    assert lab("down", "--dir", str(the_lab.dir)).stdout == "lab down: 0 namespaces deleted\n"


def test_nopreempt_a_recovered_lb1_leaves_the_address_where_it_is(tmp_path):
    """A lab of its own (after the shared one is down; SQLite app hosts, no db hosts: quicker):
    with `up --nopreempt` lb1 comes back as the backup, so its return costs no request."""
    dir, prefix = tmp_path / "lab", PREFIX + "n"
    p = lab("up", "--dir", str(dir), "--prefix", prefix, "--db", "sqlite", "--nopreempt", "--json")
    try:
        assert p.returncode == 0, p.stderr
        the_lab = Lab(dir, json.loads(p.stdout))
        for h in ("lb1", "lb2"):
            conf = (dir / h / "keepalived.conf").read_text()
            assert "    state BACKUP " in conf and "    nopreempt " in conf
        assert the_lab.holds_vip("lb1") and not the_lab.holds_vip("lb2")
        load = the_lab.load(60)
        time.sleep(0.5)
        os.kill(the_lab.st["hosts"]["lb1"]["procs"]["lb"], signal.SIGKILL)
        took = the_lab.wait_vip("lb2", 5.0)
        time.sleep(LOAD_TIMEOUT)
        restarted = time.time()
        p = lab("restart", "--dir", str(dir), "lb1")
        assert (p.returncode, p.stdout) == (0, "lb1: started lb\n"), p.stderr
        time.sleep(8.0)  # longer than a preempting take-back (rise 2, 3 adverts, skew: ~5 s)
        report = load.stop()
        _say("nopreempt: lb1 SIGKILLed and restarted", report, takeover=took,
             failed_after_restart=len(_failures_between(report, restarted, time.time())))
        assert took <= 3.0
        assert the_lab.holds_vip("lb2") and not the_lab.holds_vip("lb1")
        st = the_lab.status()["hosts"]
        assert (st["lb1"]["role"], st["lb2"]["role"]) == ("backup", "master")
        assert _failures_between(report, restarted, time.time()) == []
    finally:
        down = lab("down", "--dir", str(dir))
        assert down.returncode == 0, down.stderr
        assert _namespaces(prefix) == []
        assert _processes_mentioning(str(dir)) == []
