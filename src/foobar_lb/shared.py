"""Memory shared by the master and its workers: group-wide limits and group-wide counters.

Rules of this module:
- a limit of the whole worker group (a server's `maxconn`, the global `maxconn`) is a POSIX
  semaphore in a shared memory region the master creates (memfd) and every worker maps;
  taking a slot is `sem_trywait` and giving it back `sem_post`: atomic, never blocking, and
  without a system call while nobody sleeps on it (nobody ever does), called through the
  standard library's C semaphore object (multiprocessing's `SemLock`, over that address);
- counters are 64-bit cells in one region per worker process, written by that worker only
  (no lock) and summed by the master when read; a worker that exits (or is killed) leaves its
  cells behind, and the master folds them into the totals, so group counters never go down;
- a single process (the `LoadBalancer` library) uses the same shapes over private memory.
It knows nothing of HTTP, servers' states or sockets.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from _multiprocessing import SemLock
from collections.abc import Hashable
from functools import partial

__all__ = [
    "Counters",
    "Layout",
    "LocalSlots",
    "Region",
    "SemSlots",
    "SemTable",
]

# A server's counters, at these offsets of its block
S_REQUESTS = 0  # requests (http) or connections (tcp) given to it (attempts: retries count)
S_FAILURES = 1  # failed attempts (connect errors, broken or late responses)
S_BYTES_IN = 2  # bytes written to it (requests; tcp: the client's bytes), before TLS
S_BYTES_OUT = 3  # bytes read from it (responses; tcp: the server's bytes), after TLS
S_RELEASED = 4  # of S_REQUESTS, those given back: it has S_REQUESTS - S_RELEASED now (a dead
# worker's are all released when its cells are folded: see S_PAIRS)
S_RETRIES = 5  # failed attempts on it that were tried again
S_REDISPATCHES = 6  # of those, tried again on another server
S_TIMEOUT_CONNECT = 7  # connections to it not made within `timeout connect`
S_TIMEOUT_SERVER = 8  # responses from it later than `timeout server`
S_ECON = 9  # connection errors (refused, unreachable, timed out): part of S_FAILURES
S_ERESP = 10  # response errors (broken, cut, late): part of S_FAILURES
S_SIZE = 16
S_GAUGES = ()
S_PAIRS = ((S_REQUESTS, S_RELEASED),)  # (taken, given back): the difference is open now
# A frontend's counters
F_CONNECTIONS = 0  # client connections accepted
F_1XX = 1  # F_1XX + status // 100 - 1: the proxy's own answers, by class 1xx to 5xx, to
# requests routed to no backend (the others are in the `responses` blocks, see Layout.classes)
F_DENIED = 6  # connections refused at accept by allow/deny (or a PROXY header not allowed)
F_RATE_LIMITED = 7  # requests answered 429 by the frontend's rate_limit
F_CLIENT_REFUSED = 8  # connections closed at accept by max_client_connections
F_TLS_HANDSHAKES = 9  # TLS handshakes completed
F_TLS_FAILURES = 10  # TLS handshakes refused (no shared version or cipher, bad certificate...)
F_BYTES_IN = 11  # bytes read from clients (after TLS)
F_BYTES_OUT = 12  # bytes written to clients (before TLS)
F_CURRENT = 13  # GAUGE: client connections open now (admitted or parked)
F_TIMEOUT_CLIENT = 14  # `timeout client`: a body stalled, or the client stopped reading
F_LOG_DROPPED = 15  # access log lines dropped: the worker's log buffer was full (accesslog.py)
F_TIMEOUT_HTTP_REQUEST = 16  # `timeout http_request`: a request head not complete in time (408)
F_TIMEOUT_TUNNEL = 17  # `timeout tunnel`: a tunnel (tcp mode, upgraded http) gone quiet
F_SIZE = 32
F_GAUGES = (F_CURRENT,)
# A backend's counters
B_QUEUED = 0  # GAUGE: requests (connections) waiting in its queue now
B_TIMEOUT_QUEUE = 1  # requests that waited `timeout queue` without a server (503)
B_SIZE = 4
B_GAUGES = (B_QUEUED,)
# Responses by class: 5 cells (1xx..5xx) per (frontend, backend, server), and per (frontend,
# backend) for the proxy's own answers (server ""): see Layout.classes
CLASSES = 5
# Histograms: per (kind, backend, server), one cell per bucket holding that bucket's count alone
# (x in bucket i when bounds[i-1] < x <= bounds[i]: i = bisect_left(bounds, x), as Prometheus's
# `le` is inclusive), one for +Inf, then the sum in microseconds; the count is the buckets' sum
# (see Layout.histogram)
HISTOGRAM_KINDS = ("response", "connect", "queue")

COUNTER_BYTES = 1 << 22  # per worker: 524288 cells (~70 a server), pages touched only when used
SEM_SIZE = 32  # sizeof(sem_t) on 64-bit Linux
SEM_CAPACITY = 8192


class Region:
    """A shared memory region: a memfd (handed to workers by descriptor) mapped here."""

    __slots__ = ("_anchor", "addr", "fd", "mm", "size")

    def __init__(self, size: int, fd: int | None = None):
        if fd is None:
            fd = os.memfd_create("foobar_lb", 0)  # not inheritable: passed on explicitly
            os.ftruncate(fd, size)
        self.fd = fd
        self.size = size
        self.mm = mmap.mmap(fd, size)
        self._anchor = ctypes.c_char.from_buffer(self.mm)
        self.addr = ctypes.addressof(self._anchor)

    def close(self) -> None:
        self._anchor = None
        self.mm.close()
        os.close(self.fd)


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    p = ctypes.c_void_p
    for name, args in (("sem_init", (p, ctypes.c_int, ctypes.c_uint)),
                       ("sem_trywait", (p,)), ("sem_post", (p,)),
                       ("sem_getvalue", (p, ctypes.POINTER(ctypes.c_int))),
                       # the robust process-shared mutexes of limits.py's table
                       ("pthread_mutexattr_init", (p,)), ("pthread_mutexattr_destroy", (p,)),
                       ("pthread_mutexattr_setpshared", (p, ctypes.c_int)),
                       ("pthread_mutexattr_setrobust", (p, ctypes.c_int)),
                       ("pthread_mutex_init", (p, p)), ("pthread_mutex_lock", (p,)),
                       ("pthread_mutex_unlock", (p,)), ("pthread_mutex_consistent", (p,))):
        fn = getattr(libc, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int
    return libc


_LIBC = None


def libc():
    global _LIBC
    if _LIBC is None:
        _LIBC = _libc()
    return _LIBC


_SEMAPHORE = 1  # (multiprocessing's SemLock kinds: 0 a recursive mutex, 1 a semaphore)


class SemSlots:
    """`limit` slots shared by every process that maps the region: `take()` (True: a slot is
    ours) and `give()`, the C methods of a `SemLock` over the semaphore's address (`_rebuild`
    with no name wraps an existing `sem_t`, as multiprocessing does when it unpickles one): a
    few hundred instructions a call, where ctypes takes a few thousand. (Its deallocation's
    `sem_close` does nothing to a semaphore made by `sem_init`: glibc finds no mapping.)"""

    __slots__ = ("_value", "addr", "give", "limit", "take")

    def __init__(self, region: Region, index: int, limit: int):
        self.addr = region.addr + index * SEM_SIZE
        self.limit = limit
        self._value = libc().sem_getvalue
        sem = SemLock._rebuild(self.addr, _SEMAPHORE, SemLock.SEM_VALUE_MAX, None)
        self.take = partial(sem.acquire, False)
        self.give = sem.release

    def free(self) -> int:
        v = ctypes.c_int()
        self._value(self.addr, ctypes.byref(v))
        return v.value


class LocalSlots:
    """The same interface within one process."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give(self) -> None:
        self.used -= 1

    def free(self) -> int:
        return self.limit - self.used


class SemTable:
    """The master's semaphores, one per key (a server, the global maxconn), kept for the
    master's lifetime so that a reload carries the slots in use over."""

    __slots__ = ("index", "limits", "region")

    def __init__(self, region: Region | None = None):
        self.region = region or Region(SEM_SIZE * SEM_CAPACITY)
        self.index: dict[Hashable, int] = {}
        self.limits: dict[Hashable, int] = {}

    def slots(self, key: Hashable, limit: int) -> int:
        """The index of `key`'s semaphore, created with `limit` slots or resized to it."""
        i = self.index.get(key)
        if i is None:
            i = len(self.index)
            if i >= SEM_CAPACITY:
                raise RuntimeError(f"more than {SEM_CAPACITY} limited servers")
            self.index[key] = i
            self.limits[key] = limit
            if libc().sem_init(self.region.addr + i * SEM_SIZE, 1, limit) != 0:
                raise OSError(ctypes.get_errno(), "sem_init failed")
            return i
        old = self.limits[key]
        if limit != old:  # a reload changed it: slots in use stay taken
            self.limits[key] = limit
            s = SemSlots(self.region, i, limit)
            for _ in range(limit - old):
                s.give()
            for _ in range(old - limit):
                s.take()  # as many as are free now; the rest shrink as they are given back
        return i


class Layout:
    """Where each frontend's, backend's and server's counters are, the same in every process
    of a group; offsets are never reused, so a reload keeps them by name. `gauges`: the cells
    that go up and down (what is open now), which a dead worker's totals leave out (the master
    keeps it; workers get `offsets` and `cells` only). `pairs`: (taken, given back) counters
    whose difference is what is open now (cheaper than a gauge when `taken` is counted anyway);
    a dead worker gave everything back."""

    __slots__ = ("cells", "gauges", "offsets", "pairs")

    def __init__(self) -> None:
        self.offsets: dict[tuple[str, ...], int] = {}
        self.cells = 0
        self.gauges: list[int] = []
        self.pairs: list[tuple[int, int]] = []

    def frontend(self, name: str) -> int:
        return self._at(("frontend", name), F_SIZE, F_GAUGES)

    def server(self, backend: str, name: str) -> int:
        off = self.offsets.get(("server", backend, name))
        if off is None:
            off = self._at(("server", backend, name), S_SIZE, S_GAUGES)
            self.pairs += [(off + a, off + b) for a, b in S_PAIRS]
        return off

    def backend(self, name: str) -> int:
        return self._at(("backend", name), B_SIZE, B_GAUGES)

    def classes(self, frontend: str, backend: str, server: str) -> int:
        """5 cells, responses 1xx..5xx of `server` to requests of `frontend` (server "": the
        proxy's own answers to requests routed to `backend`)."""
        return self._at(("responses", frontend, backend, server), CLASSES)

    def histogram(self, kind: str, backend: str, server: str, bounds: tuple[float, ...]) -> int:
        """len(bounds) + 2 cells: one per bucket, +Inf, the sum (us). New bounds (a reload
        that changed them) are new cells."""
        return self._at(("histogram", kind, backend, server, bounds_key(bounds)),
                        len(bounds) + 2)

    def _at(self, key: tuple[str, ...], size: int, gauges: tuple[int, ...] = ()) -> int:
        off = self.offsets.get(key)
        if off is None:
            if (self.cells + size) * 8 > COUNTER_BYTES:
                raise RuntimeError("too many counters")
            off = self.offsets[key] = self.cells
            self.cells += size
            self.gauges += [off + g for g in gauges]
        return off


def bounds_key(bounds: tuple[float, ...]) -> str:
    """Histogram bounds as part of a Layout key."""
    return ",".join(repr(float(b)) for b in bounds)


class Counters:
    """One writer's cells (`cells[i] += n` on the hot path), over shared or private memory."""

    __slots__ = ("cells", "region")

    def __init__(self, region: Region | None = None):
        self.region = region
        if region is None:
            self.cells = memoryview(bytearray(COUNTER_BYTES)).cast("q")
        else:
            self.cells = memoryview(region.mm).cast("q")

    def close(self) -> None:
        self.cells.release()
        if self.region is not None:
            self.region.close()
