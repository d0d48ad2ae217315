"""The access log: one line per HTTP request, and the request ids.

Rules of this module:
- with no access log configured nothing here runs per request: the proxy checks one attribute
  (`Route.alog`, `Frontend.alog`: None) where a request ends; the one cost every request pays is
  its `X-Request-ID` (`RID_LINE` + a hexadecimal counter: a per-process random prefix, no
  system call, no formatting beyond `b"%x"`);
- a line is formatted in the event loop when its request ends, appended to a list, and handed
  over once per loop iteration (`call_soon`) to this worker's ONE writer thread, through a
  `queue.SimpleQueue` (its `put` never blocks and takes no lock the loop could wait on);
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

__all__ = ["PREFIX", "RID_LINE", "AccessLog", "ids", "new_id", "request_id"]

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


def request_id(head: bytes | None) -> str:
    """The id a forwarded head carries (ours, or the client's valid one); a fresh one for a
    request refused before its head was made."""
    if head:
        m = _RID_IN_HEAD.search(head)
        if m is not None:
            return m.group(1).decode("latin-1")
    return new_id().decode()


# -- the writer -----------------------------------------------------------------------------------
_REOPEN = object()
_STOP = object()
FACILITY_LOCAL0 = 16
_PRI = b"<%d>" % (FACILITY_LOCAL0 * 8 + 6)  # local0.info


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
        self.last_error = ""

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
        self.flushing = False
        self.dropped = 0  # in this process (the frontends' cells are what the master reads)
        self.q: queue.SimpleQueue = queue.SimpleQueue()
        self.writer = _Writer(cfg, self.q)
        self.writer.start()
        self.syslog = cfg.syslog_host is not None
        self.rfc3164 = cfg.syslog_format == "rfc3164"
        self.hostname = socket.gethostname()
        self.tag = f"foobar_lb {os.getpid()}"
        self._second = -1
        self._stamp = ""

    # -- the loop's side ----------------------------------------------------------------------
    def request(self, r: Any, status: int, term: str) -> None:
        """Request `r` (a proxy.http Exchange) ended: `status` the client got (0: none), `term`
        the termination state (see the README's table). One line per request: a request
        already logged is not logged again."""
        if getattr(r, "term", None) is not None:
            return
        r.term = term
        s = r.s
        fe = s.fe
        if self.size + self.queued - self.writer.written > self.limit:
            fe.ctr[fe.cbase + F_LOG_DROPPED] += 1
            self.dropped += 1
            return
        line = self._format(r, s, fe, status, term)
        n = len(line)
        if self.size + n + self.queued - self.writer.written > self.limit:
            fe.ctr[fe.cbase + F_LOG_DROPPED] += 1
            self.dropped += 1
            return
        self.lines.append(line)
        self.size += n
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Hand what is buffered over to the writer (once per loop iteration)."""
        self.flushing = False
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

    # -- formatting -----------------------------------------------------------------------------
    def _now(self) -> str:
        t = time.time()
        sec = int(t)
        if sec != self._second:
            self._second = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._stamp}.{int((t - sec) * 1000):03d}Z"

    def _format(self, r: Any, s: Any, fe: Any, status: int, term: str) -> bytes:
        end = self.loop.time()
        t0 = r.t0
        # phases (milliseconds; -1: never reached): queue wait, connect, response head, total
        t_queue = getattr(r, "t_queue", 0.0)
        t_connect = getattr(r, "t_connect", 0.0)
        t_head = getattr(r, "t_head", 0.0)
        t_wait = getattr(r, "t_wait", 0.0)
        queue_ms = round((t_queue - t_wait) * 1000, 3) if t_wait and t_queue else (
            0.0 if t_queue else -1)
        connect_ms = round((t_connect - t_queue) * 1000, 3) if t_connect and t_queue else -1
        response_ms = round((t_head - t_connect) * 1000, 3) if t_head and t_connect else -1
        total_ms = round((end - t0) * 1000, 3)
        be = r.backend
        server = r.server or getattr(r, "tried", None)
        proxied = s.proxied
        if proxied:
            client = f"{proxied[0][0]}:{proxied[0][1]}"
        else:
            peer = s.transport.get_extra_info("peername") if s.transport is not None else None
            client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "-"
        if s.client_key != s.peer_key:  # a trusted proxy's X-Forwarded-For named the client
            client = s.client_key.decode("latin-1")
        head = getattr(r, "head", None)
        rid = request_id(head)
        method = (getattr(r, "method", None) or b"-").decode("latin-1")
        url = (r.url or b"-").decode("latin-1")
        version = "HTTP/1.1" if getattr(r, "http11", True) else "HTTP/1.0"
        bytes_in = (len(head) if head else 0) + r.body_size
        bytes_out = getattr(r, "bytes_out", 0)
        retries = max(r.attempts - 1, 0)
        if self.json:
            rec = {
                "time": self._now(), "client": client, "frontend": fe.name,
                "backend": be.name if be is not None else None,
                "server": server.name if server is not None else None,
                "queue_ms": queue_ms, "connect_ms": connect_ms, "response_ms": response_ms,
                "total_ms": total_ms, "status": status or None, "bytes_in": bytes_in,
                "bytes_out": bytes_out, "retries": retries, "term": term, "request_id": rid,
                "method": method, "url": url, "version": version,
            }
            text = json.dumps(rec, ensure_ascii=True, separators=(",", ":"))
        else:
            target = f"{be.name if be is not None else '-'}/{server.name if server else '-'}"
            text = (f"{self._now()} {client} {fe.name} {target} "
                    f"{_ms(queue_ms)}/{_ms(connect_ms)}/{_ms(response_ms)}/{_ms(total_ms)} "
                    f"{status or '-'} {bytes_in} {bytes_out} {retries} {term} {rid} "
                    f'"{_quote(method)} {_quote(url)} {version}"')
        if not self.syslog:
            return text.encode("latin-1", "replace") + b"\n"
        if self.rfc3164:
            stamp = time.strftime("%b %d %H:%M:%S", time.localtime())
            tag = self.tag.replace(" ", "[") + "]:"
            return f"<134>{stamp} {self.hostname} {tag} {text}".encode("latin-1", "replace")
        app, pid = self.tag.split(" ")
        return f"<134>1 {self._now()} {self.hostname} {app} {pid} - - {text}".encode(
            "latin-1", "replace")


def _ms(v: float) -> str:
    return "-1" if v < 0 else f"{v:.3f}"


_UNSAFE = re.compile(r'[\x00-\x1f\x7f"\\ ]')


def _quote(text: str) -> str:
    """A request line's part, safe in a space-separated line: control characters, quotes,
    backslashes and spaces escaped as \\xHH."""
    if _UNSAFE.search(text) is None:
        return text
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
