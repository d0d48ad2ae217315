"""The access log: one line per HTTP request, and the request ids.

Rules of this module:
- with no access log configured nothing here runs per request: the proxy checks one attribute
  (`Route.alog`, `Frontend.alog`: None) where a request ends; what every request pays is its
  `X-Request-ID` (`RID_LINE` + a hexadecimal counter: a per-process random prefix, no system
  call, no formatting beyond `b"%x"`) and the few fields its `Exchange` keeps as it goes (the
  times `t_queue`, `t_connect`, `t_head`, and `bytes_out`), which the log reads at the end;
- a line is formatted in the event loop when its request ends, appended to a list, and the
  list handed over to this worker's ONE writer thread, through a `queue.SimpleQueue` (its `put`
  never blocks and takes no lock the loop could wait on), at most `FLUSH_DELAY` after its first
  line or as soon as it holds `FLUSH_BYTES` (so the thread wakes a few times a second under
  load, not once per loop iteration: each wake-up is a context switch and a GIL hand-over);
- the buffer is bounded in bytes (`[log] buffer`): lines handed over and not yet written
  count against it; a line that does not fit is dropped and counted in its frontend's
  `F_LOG_DROPPED` cell (summed by the master, `Master.stats()` "log_dropped"), so a stalled
  destination never slows traffic. Two counters, each written by one thread only (`queued`
  by the loop, `written` by the writer), say how much is in flight: no lock;
- why a thread rather than non-blocking pipes: a regular file ignores O_NONBLOCK (a write to
  a slow or full disk, or NFS, blocks whatever the flags), and opening a FIFO for writing blocks
  until a reader comes; in a thread every blocking call (open, write, sendto) blocks only the
  writer, never the loop;
- reopen (SIGUSR1 to the master, passed to every worker): a marker through the same queue, so
  lines handed over before it go to the old (renamed) file and the ones after it to the new
  one: none is lost;
- syslog: one UDP datagram per line (RFC 5424, or RFC 3164), facility local0, severity info.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import re
import socket
import threading
import time
from typing import TYPE_CHECKING, Any

from .shared import F_LOG_DROPPED

if TYPE_CHECKING:
    from .config import LogConfig

__all__ = ["PREFIX", "RID_LINE", "AccessLog", "ids", "new_id"]

# -- request ids --------------------------------------------------------------------------------
# a per-process random prefix (workers are started by exec, so each has its own) and a counter
PREFIX = os.urandom(6).hex().encode() + b"-"
RID_NAME = b"X-Request-ID"
RID_LINE = RID_NAME + b": " + PREFIX  # + b"%x" % next(ids) + CRLF: the line the server gets
ids = itertools.count(1)
# (a client's own X-Request-ID is kept when valid: proxy/http/head.py's VALID_RID)
_RID_IN_HEAD = re.compile(rb"\r\nX-Request-ID: ([^\r]*)\r\n")


def new_id() -> bytes:
    return b"%s%x" % (PREFIX, next(ids))


FLUSH_DELAY = 0.05  # seconds a line may wait in the loop before it is handed to the writer
FLUSH_BYTES = 65536  # or as soon as this much waits (at most half the buffer)


# -- the writer -----------------------------------------------------------------------------------
_REOPEN = object()
_STOP = object()
# syslog: <134> is facility local0 (16) * 8 + severity info (6)


class _Writer(threading.Thread):
    """Writes batches of lines to the destination; every blocking call happens here."""

    def __init__(self, cfg: LogConfig, q: queue.SimpleQueue):
        super().__init__(name="foobar-accesslog", daemon=True)
        self.cfg = cfg
        self.q = q
        self.written = 0  # bytes taken off the queue (written or lost): only this thread writes it
        self.fd: int | None = None
        self.sock: socket.socket | None = None
        self.errors = 0

    def _open(self) -> None:
        cfg = self.cfg
        if cfg.access == "stdout":
            self.fd = 1
        elif cfg.access == "stderr":
            self.fd = 2
        elif cfg.syslog_host is not None:
            family = socket.AF_INET6 if ":" in cfg.syslog_host else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_DGRAM)
        else:
            self.fd = os.open(cfg.access, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                              0o644)

    def _close(self) -> None:
        if self.fd is not None and self.fd > 2:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def run(self) -> None:
        try:
            self._open()
        except OSError as e:
            self._failed(e)
        while True:
            item = self.q.get()
            if item is _STOP:
                self._close()
                return
            if item is _REOPEN:
                self._close()
                try:
                    self._open()
                except OSError as e:
                    self._failed(e)
                continue
            n, lines = item
            try:
                self._write(lines)
            except OSError as e:
                self._failed(e)
            self.written += n

    def _write(self, lines: list[bytes]) -> None:
        if self.sock is not None:
            cfg = self.cfg
            for line in lines:
                self.sock.sendto(line, (cfg.syslog_host, cfg.syslog_port))
            return
        if self.fd is None:
            return
        view = memoryview(b"".join(lines))
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def _failed(self, e: OSError) -> None:
        self.errors += 1
        if self.errors == 1 or self.errors % 1000 == 0:
            # (stderr, once in a while: the access log itself may be what is broken)
            with contextlib.suppress(OSError):
                os.write(2, f"foobar-lb: access log {self.cfg.access}: {e.strerror or e} "
                            f"({self.errors} errors)\n".encode())


class AccessLog:
    """One worker's access log: `request(r, status, term)` when a request ends."""

    def __init__(self, cfg: LogConfig, loop: Any):
        self.cfg = cfg
        self.loop = loop
        self.json = cfg.format == "json"
        self.limit = cfg.buffer
        self.lines: list[bytes] = []  # formatted, not handed over yet
        self.size = 0  # their bytes
        self.queued = 0  # bytes handed over to the writer (only the loop writes it)
        self.flushing = False  # a flush is scheduled
        self.flush_at = min(FLUSH_BYTES, cfg.buffer // 2)
        self.dropped = 0  # in this process (the frontends' cells are what the master reads)
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.writer = _Writer(cfg, self.q)
        self.writer.start()
        self.syslog = cfg.syslog_host is not None
        self.rfc3164 = cfg.syslog_format == "rfc3164"
        self.hostname = socket.gethostname()
        self.pid = os.getpid()
        self._second = -1
        self._stamp = ""

    # -- the loop's side ----------------------------------------------------------------------
    def request(self, r: Any, status: int, term: str) -> None:
        """Request `r` (a proxy.http Exchange) ended: `status` the client got (0: none), `term`
        the termination state (see the README's table). One line per request: a request
        already logged is not logged again. (One function, no helper calls on the common
        path: it runs for every request when the log is on.)"""
        if getattr(r, "term", None) is not None:
            return
        r.term = term
        s = r.s
        fe = s.fe
        held = self.size + self.queued - self.writer.written
        if held >= self.limit:
            fe.ctr[fe.cbase + F_LOG_DROPPED] += 1
            self.dropped += 1
            return
        # phases in milliseconds (-1: never reached): queue wait, connect, response head, total
        end = self.loop.time()
        t_queue = getattr(r, "t_queue", 0.0)
        t_connect = getattr(r, "t_connect", 0.0)
        t_head = getattr(r, "t_head", 0.0)
        if t_queue:
            t_wait = getattr(r, "t_wait", 0.0)
            queue_ms = (t_queue - t_wait) * 1000 if t_wait else 0.0
        else:
            queue_ms = -1
        connect_ms = (t_connect - t_queue) * 1000 if t_connect and t_queue else -1
        response_ms = (t_head - t_connect) * 1000 if t_head and t_connect else -1
        total_ms = (end - r.t0) * 1000
        be = r.backend
        server = r.server or getattr(r, "tried", None)
        client = getattr(s, "log_client", None)
        if client is None:
            client = self._client(s)
            if s.xff_trust is None:  # (else each request names its client: X-Forwarded-For)
                s.log_client = client
        head = getattr(r, "head", None)
        m = _RID_IN_HEAD.search(head) if head else None
        rid = m.group(1).decode("latin-1") if m is not None else new_id().decode()
        method = getattr(r, "method", None)
        method = method.decode("latin-1") if method else "-"
        url = r.url.decode("latin-1") if r.url else "-"
        version = "HTTP/1.1" if getattr(r, "http11", True) else "HTTP/1.0"
        bytes_in = (len(head) if head else 0) + r.body_size
        retries = r.attempts - 1 if r.attempts > 1 else 0
        t = time.time()
        sec = int(t)
        if sec != self._second:
            self._second = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        stamp = "%s.%03dZ" % (self._stamp, (t - sec) * 1000)  # noqa: UP031 (the fastest)
        if self.json:
            text = json.dumps({
                "time": stamp, "client": client, "frontend": fe.name,
                "backend": be.name if be is not None else None,
                "server": server.name if server is not None else None,
                "queue_ms": round(queue_ms, 3), "connect_ms": round(connect_ms, 3),
                "response_ms": round(response_ms, 3), "total_ms": round(total_ms, 3),
                "status": status or None, "bytes_in": bytes_in, "bytes_out": r.bytes_out,
                "retries": retries, "term": term, "request_id": rid, "method": method,
                "url": url, "version": version}, separators=(",", ":"))
        else:
            if _UNSAFE.search(url) is not None or _UNSAFE.search(method) is not None:
                url, method = _quote(url), _quote(method)
            text = "%s %s %s %s/%s %s/%s/%s/%.3f %s %d %d %d %s %s \"%s %s %s\"" % (  # noqa: UP031
                stamp, client, fe.name, be.name if be is not None else "-",
                server.name if server is not None else "-",
                "%.3f" % queue_ms if queue_ms >= 0 else "-1",  # noqa: UP031
                "%.3f" % connect_ms if connect_ms >= 0 else "-1",  # noqa: UP031
                "%.3f" % response_ms if response_ms >= 0 else "-1",  # noqa: UP031
                total_ms, status or "-", bytes_in, r.bytes_out, retries, term, rid, method,
                url, version)
        line = (self._syslog(text, stamp) if self.syslog
                else text.encode("latin-1", "replace") + b"\n")
        n = len(line)
        if held + n > self.limit:
            fe.ctr[fe.cbase + F_LOG_DROPPED] += 1
            self.dropped += 1
            return
        self.lines.append(line)
        self.size += n
        if self.size >= self.flush_at:
            self.flush()
        elif not self.flushing:
            self.flushing = True
            self.loop.call_later(FLUSH_DELAY, self._timed_flush)

    @staticmethod
    def _client(s: Any) -> str:
        """The client's address (and port, when known)."""
        if s.client_key != s.peer_key:  # a trusted proxy's X-Forwarded-For named the client
            return s.client_key.decode("latin-1")
        proxied = s.proxied
        if proxied:
            return f"{proxied[0][0]}:{proxied[0][1]}"
        peer = s.transport.get_extra_info("peername") if s.transport is not None else None
        return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else s.peer_ip or "-"

    def _syslog(self, text: str, stamp: str) -> bytes:
        if self.rfc3164:
            when = time.strftime("%b %e %H:%M:%S", time.localtime())  # ("Nov  3")
            return f"<134>{when} {self.hostname} foobar_lb[{self.pid}]: {text}".encode(
                "latin-1", "replace")
        return f"<134>1 {stamp} {self.hostname} foobar_lb {self.pid} - - {text}".encode(
            "latin-1", "replace")

    def _timed_flush(self) -> None:
        self.flushing = False
        self.flush()

    def flush(self) -> None:
        """Hand what is buffered over to the writer."""
        lines = self.lines
        if not lines:
            return
        self.lines = []
        n = self.size
        self.size = 0
        self.queued += n
        self.q.put((n, lines))

    def reopen(self) -> None:
        """Log rotation: lines handed over so far go to the old file, later ones to the new."""
        self.flush()
        self.q.put(_REOPEN)

    def close(self, timeout: float = 2.0) -> None:
        """Hand over what is left and let the writer finish it (at most `timeout` seconds:
        a stalled destination does not hold the process)."""
        self.flush()
        self.q.put(_STOP)
        self.writer.join(timeout)


_UNSAFE = re.compile(r'[\x00-\x1f\x7f"\\ ]')


def _quote(text: str) -> str:
    """A request line's part, safe in a space-separated line: control characters, quotes,
    backslashes and spaces escaped as \\xHH."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
