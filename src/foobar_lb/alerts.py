"""Alerts: a JSON event to webhooks or a command when a server or a backend changes state, or
when an app server's view of its database changes (replication broken or lagging, primary
unreachable).

Rules of this module:
- it runs in the master's event loop only (never in a worker, never on the traffic path): the
  state machine's hook and the checks call `state_change` / `app_health`, which never block or
  await: they build the event, apply the flap rule and put it on a bounded queue per target
  (each webhook, the command); a full queue drops the event and counts it (`dropped`);
- one sender task per target, so a slow or dead target delays only itself: each event gets
  1 + `retries` attempts, each bounded by `timeout`, with a backoff doubling from `backoff`
  (at most 30s) in between; a webhook must answer 2xx, a command must exit 0;
- one event per change, and no storms: at most `FLAP_LIMIT` (3) events per key (a server, a
  backend, an app server's view of one database node) within `flap_window` of the first one;
  the ones beyond are counted, and when the window ends ONE summary event (kind "flapping")
  says how many were not sent and what the state is now;
- the app servers' events come from their `/health`, which the load balancer's http checks
  already fetch (`Checks.on_body`): the load balancer compares each app server's view of each
  database node with the previous one; "recovering" (a replica on probation) is no change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from .config import AlertsConfig

__all__ = ["FLAP_LIMIT", "Alerts", "unrunnable"]

log = logging.getLogger("foobar_lb.alerts")

FLAP_LIMIT = 3  # events per key within one flap window
MAX_BACKOFF = 30.0


def unrunnable(cfg: Any) -> str | None:
    """Why the alert command cannot run (checked at start and on reload), or None."""
    a: AlertsConfig = cfg.alerts
    if not a.command:
        return None
    prog = a.command[0]
    found = shutil.which(prog) if os.sep not in prog else (
        prog if os.path.isfile(prog) and os.access(prog, os.X_OK) else None)
    if found is None:
        src = cfg.source or "command line"
        return f'{src}: alerts.command[0] = "{prog}": no such program (or not executable)'
    return None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Window:
    """One key's flap window: what was sent, what was held back."""

    __slots__ = ("handle", "last", "last_sent", "sent", "suppressed")

    def __init__(self) -> None:
        self.sent = 0
        self.suppressed = 0
        self.last_sent: dict[str, Any] | None = None
        self.last: dict[str, Any] | None = None
        self.handle: asyncio.TimerHandle | None = None


class _Target:
    """Where events go: one webhook or the command, with its queue and its sender task."""

    def __init__(self, name: str, send: Callable[[bytes, float], Any], size: int):
        self.name = name
        self.send = send  # async (body, timeout) -> None; raises on failure
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(size)
        self.task: asyncio.Task | None = None


class Alerts:
    def __init__(self, cfg: AlertsConfig | None = None):
        self.cfg = cfg or AlertsConfig()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.targets: dict[str, _Target] = {}
        self.windows: dict[tuple, _Window] = {}
        self.up_once: set[tuple[str, str]] = set()  # servers that have been up
        self.empty: set[str] = set()  # backends left with no server up (event sent)
        self.views: dict[tuple[str, str, str], str] = {}  # (backend, server, node) -> state
        self.paused = False
        self.checks: Any = None
        self._session: Any = None  # aiohttp.ClientSession, made when a webhook needs it
        self.host = socket.gethostname()
        self.seq = 0
        self.sent = 0  # deliveries that succeeded
        self.failed = 0  # deliveries given up after every attempt
        self.dropped = 0  # events a full queue could not take
        self.suppressed = 0  # events held back by the flap rule (each summarized)

    # -- wiring ------------------------------------------------------------------------------
    def attach(self, machine: Any, checks: Any) -> None:
        """Hear the state machine's changes and (when enabled) the http checks' bodies."""
        machine.hooks.append(self.state_change)
        machine.admin_hooks.append(self.admin_change)
        self.checks = checks
        checks.on_body = self.app_health if self.cfg.enabled else None

    def start(self) -> None:
        """In the running loop: start a sender for each target."""
        self.loop = asyncio.get_running_loop()
        self._targets()

    def configure(self, cfg: AlertsConfig) -> None:
        """A reload: targets that stay keep their queue; new ones start; removed ones stop."""
        if cfg == self.cfg:
            return
        self.cfg = cfg
        if self.checks is not None:
            self.checks.on_body = self.app_health if cfg.enabled else None
        if self.loop is not None:
            self._targets()

    def _targets(self) -> None:
        want: dict[str, Callable[[bytes, float], Any]] = {
            f"webhook {url}": (lambda body, t, url=url: self._post(url, body, t))
            for url in self.cfg.webhooks}
        if self.cfg.command:
            argv = self.cfg.command
            want[f"command {' '.join(argv)}"] = lambda body, t, argv=argv: self._run(argv, body, t)
        for name in list(self.targets):
            if name not in want:
                t = self.targets.pop(name)
                if t.task is not None:
                    t.task.cancel()
        for name, send in want.items():
            if name not in self.targets:
                t = self.targets[name] = _Target(name, send, self.cfg.queue)
                t.task = self.loop.create_task(self._sender(t))

    def pause(self) -> None:
        """Stopping: changes from now on (servers stopped on purpose) are not events."""
        self.paused = True

    async def close(self, flush: float = 2.0) -> None:
        """Send the summaries of open windows, give queued events up to `flush` seconds, stop."""
        self.paused = True
        for key in list(self.windows):
            self._window_end(key)
        pending = [t.queue.join() for t in self.targets.values()]
        if pending:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(flush):
                    await asyncio.gather(*pending)
        for t in self.targets.values():
            if t.task is not None:
                t.task.cancel()
        for t in self.targets.values():
            if t.task is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await t.task
        self.targets.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def stats(self) -> dict[str, int]:
        return {"sent": self.sent, "failed": self.failed, "dropped": self.dropped,
                "suppressed": self.suppressed,
                "queued": sum(t.queue.qsize() for t in self.targets.values())}

    # -- what happened -------------------------------------------------------------------------
    def state_change(self, be: Any, server: Any, change: Any) -> None:
        """The state machine's hook: one event per server state change, one when the backend
        is left with no server up (kind "backend_down") and one when it has one again."""
        if not self.cfg.enabled or self.paused:
            return
        key = (be.name, server.name)
        old, new = change.old.value, change.new.value
        if new == "up" and key not in self.up_once:
            # a server's first time up (managed servers start down): no news
            self.up_once.add(key)
        else:
            self.up_once.add(key)
            self.emit(self.event("server", be.name, server.name, old, new, change.reason,
                                 active_left=change.active_left,
                                 backup_left=change.backup_left), key)
        left = change.active_left + change.backup_left
        if left == 0 and be.name not in self.empty:
            self.empty.add(be.name)
            self.emit(self.event("backend_down", be.name, None, "up", "down",
                                 f"no server left up (last: {server.name} is {new}: "
                                 f"{change.reason})"), (be.name,))
        elif left and be.name in self.empty:
            self.empty.discard(be.name)
            self.emit(self.event("backend_up", be.name, None, "down", "up",
                                 f"{server.name} is {new}: {change.reason}"), (be.name,))

    def admin_change(self, be: Any, server: Any, old: Any) -> None:
        """An operator's ready, drain or maint (the runtime API): a server event from the state
        it was in to the one it is in now, as an operator sees them (its health while ready,
        else what the operator set), and the backend's events when it leaves none usable."""
        if not self.cfg.enabled or self.paused:
            return
        health = server.state.value
        was = health if old.value == "ready" else old.value
        now = health if server.admin.value == "ready" else server.admin.value
        key = (be.name, server.name)
        self.up_once.add(key)
        if was != now:
            self.emit(self.event("server", be.name, server.name, was, now,
                                 f"set {server.admin.value} by an operator"), key)
        left = sum(1 for s in be.servers if s.usable)
        if left == 0 and be.name not in self.empty:
            self.empty.add(be.name)
            self.emit(self.event("backend_down", be.name, None, "up", "down",
                                 f"no server left in rotation (last: {server.name} is {now}, "
                                 "set by an operator)"), (be.name,))
        elif left and be.name in self.empty:
            self.empty.discard(be.name)
            self.emit(self.event("backend_up", be.name, None, "down", "up",
                                 f"{server.name} is {now}, set by an operator"), (be.name,))

    def app_health(self, be: Any, server: Any, body: bytes) -> None:
        """An app server's /health, read by its http check: its view of every database node
        (foobar_app's shape: {"primary": state, "replicas": {name: state}, "nodes": {...}})."""
        if not self.cfg.enabled or self.paused:
            return
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(data, dict) or not isinstance(data.get("replicas"), dict):
            return
        nodes = data.get("nodes") if isinstance(data.get("nodes"), dict) else {}

        def detail(name: str | None) -> str:
            n = nodes.get(name) if name else None
            return str(n.get("detail") or "") if isinstance(n, dict) else ""

        primary = data.get("primary")
        if isinstance(primary, str):
            pname = next((k for k, n in nodes.items()
                          if isinstance(n, dict) and n.get("role") == "primary"), None)
            state = primary if primary in ("up", "down", "hung") else "none"
            why = detail(pname) if state != "none" else primary
            self._view(be.name, server.name, "primary", pname, state,
                       f"{server.name} sees the primary {state}" + (f": {why}" if why else ""))
        for name, state in data["replicas"].items():
            if not isinstance(state, str) or state == "recovering":
                continue  # a replica on probation: not settled yet, no change
            why = detail(name)
            self._view(be.name, server.name, f"replica {name}", name, state,
                       f"{server.name} sees replica {name} {state}" + (f": {why}" if why else ""))

    def _view(self, backend: str, server: str, what: str, node: str | None, state: str,
              reason: str) -> None:
        key = (backend, server, what)
        old = self.views.get(key)
        self.views[key] = state
        if old == state or (old is None and state == "up"):
            return
        kind = "primary" if what == "primary" else "replication"
        self.emit(self.event(kind, backend, server, old or "unknown", state, reason, node=node),
                  key)

    # -- events --------------------------------------------------------------------------------
    def event(self, kind: str, backend: str, server: str | None, old: str, new: str,
              reason: str, **extra: Any) -> dict[str, Any]:
        self.seq += 1
        return {"time": _now(), "kind": kind, "backend": backend, "server": server, "old": old,
                "new": new, "reason": reason, **extra, "host": self.host,
                "id": f"{self.host}-{os.getpid()}-{int(time.time())}-{self.seq}"}

    def emit(self, event: dict[str, Any], key: tuple) -> None:
        """Send `event` unless its key has had FLAP_LIMIT events in the current window."""
        w = self.windows.get(key)
        if w is None:
            w = self.windows[key] = _Window()
            if self.loop is not None:
                w.handle = self.loop.call_later(self.cfg.flap_window, self._window_end, key)
        w.last = event
        if w.sent < FLAP_LIMIT:
            w.sent += 1
            w.last_sent = event
            self._enqueue(event)
        else:
            w.suppressed += 1
            self.suppressed += 1

    def _window_end(self, key: tuple) -> None:
        w = self.windows.pop(key, None)
        if w is None:
            return
        if w.handle is not None:
            w.handle.cancel()
        if not w.suppressed:
            return
        last = w.last
        window = self.cfg.flap_window
        summary = self.event(
            "flapping", last["backend"], last["server"], w.last_sent["new"], last["new"],
            f"{w.suppressed} more {last['kind']} events within {window:g}s were not sent "
            f"(at most {FLAP_LIMIT} per {window:g}s); it is {last['new']} now (last: "
            f"{last['reason']})",
            suppressed=w.suppressed, of=last["kind"],
            **({"node": last["node"]} if "node" in last else {}))
        self._enqueue(summary)

    def _enqueue(self, event: dict[str, Any]) -> None:
        log.info("alert: %s %s/%s %s -> %s: %s", event["kind"], event["backend"],
                 event["server"] or "-", event["old"], event["new"], event["reason"])
        for t in self.targets.values():
            try:
                t.queue.put_nowait(event)
            except asyncio.QueueFull:
                self.dropped += 1
                if self.dropped & (self.dropped - 1) == 0:  # 1, 2, 4, 8, ...: not a log storm
                    log.warning("alerts: the queue of %s is full (%d events): event dropped "
                                "(%d dropped so far)", t.name, self.cfg.queue, self.dropped)

    # -- delivery --------------------------------------------------------------------------------
    async def _sender(self, t: _Target) -> None:
        while True:
            event = await t.queue.get()
            try:
                await self._deliver(t, event)
            finally:
                t.queue.task_done()

    async def _deliver(self, t: _Target, event: dict[str, Any]) -> None:
        body = json.dumps(event).encode()
        delay = self.cfg.backoff
        attempts = 1 + self.cfg.retries
        for attempt in range(1, attempts + 1):
            try:
                async with asyncio.timeout(self.cfg.timeout):
                    await t.send(body, self.cfg.timeout)
                self.sent += 1
                return
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any failure of a target is retried, then given up
                why = "timed out" if isinstance(e, TimeoutError) else (str(e) or type(e).__name__)
                if attempt == attempts:
                    self.failed += 1
                    log.warning("alerts: %s %s event not delivered to %s after %d attempts: %s",
                                event["kind"], event["id"], t.name, attempts, why)
                    return
                log.info("alerts: %s failed (%s): attempt %d of %d in %gs", t.name, why,
                         attempt + 1, attempts, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)

    async def _post(self, url: str, body: bytes, timeout: float) -> None:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers={"User-Agent": "foobar_lb-alerts"},
                timeout=aiohttp.ClientTimeout(total=None))
        async with self._session.post(url, data=body, allow_redirects=False,
                                      headers={"Content-Type": "application/json"}) as resp:
            if not 200 <= resp.status < 300:
                raise RuntimeError(f"answered {resp.status}")

    @staticmethod
    async def _run(argv: tuple[str, ...], body: bytes, timeout: float) -> None:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
            stderr=None, start_new_session=True)
        try:
            await proc.communicate(body + b"\n")
        finally:
            if proc.returncode is None:  # timed out (or we are stopping): not left running
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"exited with status {proc.returncode}")
