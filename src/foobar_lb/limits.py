"""Per-client limits: a token bucket per client address (`rate_limit`) and the connections a
client address holds at once (`max_client_connections`), for the whole worker group.

Rules of this module:
- the state lives in ONE table in memory the master creates (a memfd, kept for the master's
  lifetime, so it survives reloads) and every worker maps; the library (`LoadBalancer`) uses
  the same table over private memory. A client is (frontend, address): the frontend by its
  counters' offset (`Layout`: stable by name across reloads, the same in every process), the
  address packed, IPv6 cut to its first `ipv6_prefix` bits (64), IPv4-mapped IPv6 as IPv4;
- the table is bounded by construction: `limit_table_size` entries in sets of 8 ways, like a
  CPU cache. A client's set is a keyed hash of its key (blake2b with a secret the master draws
  at start, so a client cannot aim its addresses at a victim's set). A new client takes, in
  its set: an empty way, else the way that is idle (no open connection, bucket full again)
  for longest, else the least recently seen way without an open connection; when all 8 hold
  open connections, the new client is not tracked (served, not limited). A flood of distinct
  addresses only ever replaces entries: memory never grows. An idle entry is the same as an
  absent one (a full bucket, no connection), so idle entries expire by being reused first;
- entries hold no pointers (no LRU list): a torn write, by a worker killed mid-update, leaves
  at worst one client's numbers wrong, never a broken structure;
- the lock: one process-shared ROBUST pthread mutex per stripe of sets (64 stripes). Taking
  and giving back an uncontended one are atomic instructions in user space (glibc: a
  compare-and-swap on the futex word; the robust list is registered once per thread), so the
  uncontended path makes no system call; a contended one sleeps on the futex for the few
  microseconds of Python the holder needs, rather than spinning on a shared core. Chosen over
  a semaphore used as a mutex (or sem_trywait and a spin): a worker killed while it holds a
  semaphore (SIGKILL, the OOM killer) leaves it taken and wedges the group for good; the
  kernel releases a robust mutex of a dead owner, and the next taker (EOWNERDEAD) marks it
  consistent and goes on, which is safe because of the rule above;
- a worker records, in a region of its own the master keeps (`held`: a count per entry), the
  connections it counted; when a worker dies without giving them back (SIGKILL, a crash) the
  master takes them off the table (`forget`), so its clients are not held over the limit;
- time is CLOCK_MONOTONIC (`time.monotonic()`), the same clock in every process.
It knows nothing of HTTP or sockets: `Limiter.request` says how long until a token is free,
`Limiter.connect` whether a connection may stay; the callers answer (admission, client.py).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import mmap
import os
import socket
import struct
import time

from .shared import F_CLIENT_REFUSED, F_RATE_LIMITED, Region, libc

__all__ = [
    "REFUSED",
    "UNTRACKED",
    "ClientTable",
    "Limiter",
    "attach",
    "table_bytes",
    "too_many_requests",
]

WAYS = 8
ENTRY = struct.Struct("<24sdddqd")  # key, tokens, stamp, seen, conns, idle_at: 64 bytes
ESIZE = 64
SET_BYTES = WAYS * ESIZE
STRIPES = 64
LOCK_SIZE = 64  # sizeof(pthread_mutex_t) is 40 on x86-64, 48 on arm64
HEADER = 4096  # magic, secret, sets; then the locks; entries from DATA on
MAGIC = b"foobar_lb clients v1\0\0\0\0"
DATA = HEADER + STRIPES * LOCK_SIZE
EOWNERDEAD = 130
REFUSED = -1  # connect(): over the limit
UNTRACKED = -2  # connect(): no way free in the client's set (every way holds connections)
_EMPTY = bytes(24)
_KEYS_CACHED = 4096  # per process: client address -> (key, set); cleared when full


def table_bytes(size: int) -> int:
    """The bytes of a table of at least `size` entries (whole sets, whole pages)."""
    sets = max(1, -(-size // WAYS))
    return -(-(DATA + sets * SET_BYTES) // mmap.PAGESIZE) * mmap.PAGESIZE


class ClientTable:
    """The per-client table: created by the master (`fd=None`), mapped by workers (`fd`), or
    private to one process (`private=True`)."""

    __slots__ = ("_lock", "_unlock", "cache", "capacity", "held", "held_region", "mask", "mm",
                 "region", "secret", "sets", "size")

    def __init__(self, size: int = 100000, ipv6_prefix: int = 64, fd: int | None = None,
                 private: bool = False, held_fd: int | None = None):
        nbytes = table_bytes(size)
        self.size = size
        if private:
            self.region = None
            self.mm = mmap.mmap(-1, nbytes)
            anchor = ctypes.c_char.from_buffer(self.mm)
            base = ctypes.addressof(anchor)
            del anchor  # (the map outlives this process's use of it)
        else:
            self.region = Region(nbytes, fd)
            self.mm = self.region.mm
            base = self.region.addr
        lib = libc()
        locks = [base + HEADER + i * LOCK_SIZE for i in range(STRIPES)]
        if private or fd is None:  # new memory: draw a secret, make the locks
            self.sets = max(1, -(-size // WAYS))
            struct.pack_into("<24s16sQ", self.mm, 0, MAGIC, os.urandom(16), self.sets)
            attr = ctypes.create_string_buffer(64)
            lib.pthread_mutexattr_init(attr)
            lib.pthread_mutexattr_setpshared(attr, 1)
            lib.pthread_mutexattr_setrobust(attr, 1)
            for a in locks:
                if lib.pthread_mutex_init(a, attr) != 0:
                    raise OSError(ctypes.get_errno(), "pthread_mutex_init failed")
            lib.pthread_mutexattr_destroy(attr)
        magic, _, self.sets = struct.unpack_from("<24s16sQ", self.mm, 0)
        if magic != MAGIC:
            raise RuntimeError("not a client table")
        self.secret = bytes(self.mm[24:40])
        self.capacity = self.sets * WAYS
        bits = 128 - ipv6_prefix
        self.mask = ((1 << 128) - 1) >> bits << bits
        self.cache: dict[tuple[int, bytes], tuple[bytes, int, int]] = {}
        # this worker's connections by entry (see `forget`), or None (the library)
        self.held_region = None
        self.held = None
        if held_fd is not None:
            self.held_region = Region(self.held_bytes(), held_fd)
            self.held = memoryview(self.held_region.mm).cast("i")
        lock, unlock = lib.pthread_mutex_lock, lib.pthread_mutex_unlock
        consistent = lib.pthread_mutex_consistent

        def take(stripe: int) -> None:
            a = locks[stripe]
            rc = lock(a)
            if rc:
                if rc != EOWNERDEAD:
                    raise OSError(rc, "pthread_mutex_lock failed")
                consistent(a)  # its holder died: our entries have no structure to repair

        self._lock = take
        self._unlock = lambda stripe: unlock(locks[stripe])

    # -- keys -------------------------------------------------------------------------------
    def key(self, tag: int, client: bytes) -> tuple[bytes, int, int]:
        """(the 24-byte key, the set's offset, the lock stripe) of `client` (an address as
        text bytes) on the frontend `tag`."""
        got = self.cache.get((tag, client))
        if got is not None:
            return got
        addr = pack_address(client, self.mask)
        key = struct.pack("<IB3x", tag, addr[0]) + addr[1:].ljust(16, b"\0")
        h = int.from_bytes(hashlib.blake2b(key, digest_size=8, key=self.secret).digest(),
                           "little")
        s = h % self.sets
        got = (key, DATA + s * SET_BYTES, s % STRIPES)
        cache = self.cache
        if len(cache) >= _KEYS_CACHED:
            cache.clear()
        cache[(tag, client)] = got
        return got

    def _find(self, key: bytes, base: int, now: float, claim: bool) -> int:
        """The offset of `key`'s entry in the set at `base` (the lock held); with `claim`, a
        way is taken for it if it has none (-1: every way holds open connections)."""
        mm = self.mm
        end = base + SET_BYTES
        pos = mm.find(key, base, end)
        while pos >= 0:
            if (pos - base) % ESIZE == 0:
                return pos
            pos = mm.find(key, pos + 1, end)  # (bytes inside a number, not a key)
        if not claim:
            return -1
        best, best_rank = -1, None
        for off in range(base, end, ESIZE):
            k, _, _, seen, conns, idle_at = ENTRY.unpack_from(mm, off)
            if k == _EMPTY:
                best = off
                break
            if conns > 0:
                continue
            # idle for longest first (they are as good as absent), then least recently seen
            rank = (0, idle_at) if idle_at <= now else (1, seen)
            if best_rank is None or rank < best_rank:
                best, best_rank = off, rank
        if best >= 0:
            ENTRY.pack_into(mm, best, key, 0.0, 0.0, now, 0, now)
        return best

    # -- the limits ---------------------------------------------------------------------------
    def take(self, tag: int, client: bytes, rate: float, burst: int, now: float) -> float:
        """A request of `client`: 0.0 if a token was taken, else the seconds until one is free.
        `rate`: tokens per second; `burst`: the bucket's capacity."""
        key, base, stripe = self.key(tag, client)
        mm = self.mm
        self._lock(stripe)
        try:
            off = self._find(key, base, now, True)
            if off < 0:
                return 0.0  # not tracked: served
            _, tokens, stamp, _, conns, _ = ENTRY.unpack_from(mm, off)
            tokens, wait = bucket(tokens, stamp, now, rate, burst)
            ENTRY.pack_into(mm, off, key, tokens, now, now, conns,
                            now + (burst - tokens) / rate)
            return wait
        finally:
            self._unlock(stripe)

    def connect(self, tag: int, client: bytes, limit: int, now: float) -> int:
        """A new connection of `client`: its entry's offset if it may stay (give it back with
        `disconnect`), REFUSED if `client` has `limit` open already, UNTRACKED if it cannot be
        counted (served, nothing to give back)."""
        key, base, stripe = self.key(tag, client)
        mm = self.mm
        self._lock(stripe)
        try:
            off = self._find(key, base, now, True)
            if off < 0:
                return UNTRACKED
            conns = struct.unpack_from("<q", mm, off + 48)[0]
            struct.pack_into("<d", mm, off + 40, now)  # seen
            if conns >= limit:
                return REFUSED
            struct.pack_into("<q", mm, off + 48, conns + 1)
            if self.held is not None:
                self.held[(off - DATA) // ESIZE] += 1
            return off
        finally:
            self._unlock(stripe)

    def disconnect(self, off: int) -> None:
        """A connection counted by `connect` (which returned `off`) has ended. An entry with
        open connections is never given to another client, so `off` is still its entry."""
        stripe = ((off - DATA) // SET_BYTES) % STRIPES
        mm = self.mm
        self._lock(stripe)
        try:
            conns = struct.unpack_from("<q", mm, off + 48)[0]
            if conns > 0:
                struct.pack_into("<q", mm, off + 48, conns - 1)
            if self.held is not None:
                self.held[(off - DATA) // ESIZE] -= 1
        finally:
            self._unlock(stripe)

    def held_bytes(self) -> int:
        """The size of a worker's `held` region: an int32 per entry, whole pages (touched
        only where used)."""
        return -(-self.capacity * 4 // mmap.PAGESIZE) * mmap.PAGESIZE

    def forget(self, held: Region) -> int:
        """The master's part, for a worker that ended: take off the table the connections its
        `held` region still records (none after a normal exit); how many there were."""
        counts = memoryview(held.mm).cast("i")
        raw = bytes(held.mm)
        gone = 0
        zero = bytes(mmap.PAGESIZE)
        try:
            for page in range(0, len(raw), mmap.PAGESIZE):
                if raw[page:page + mmap.PAGESIZE] == zero:
                    continue  # (a page the worker never touched)
                for i in range(page // 4, min((page + mmap.PAGESIZE) // 4, self.capacity)):
                    n = counts[i]
                    if n > 0:
                        off = DATA + i * ESIZE
                        stripe = ((off - DATA) // SET_BYTES) % STRIPES
                        self._lock(stripe)
                        try:
                            conns = struct.unpack_from("<q", self.mm, off + 48)[0]
                            struct.pack_into("<q", self.mm, off + 48, max(0, conns - n))
                        finally:
                            self._unlock(stripe)
                        gone += n
                        counts[i] = 0
        finally:
            counts.release()
        return gone

    def lookup(self, tag: int, client: bytes) -> tuple[float, float, int] | None:
        """(tokens, stamp, open connections) of `client`'s entry, or None (for tests)."""
        key, base, stripe = self.key(tag, client)
        self._lock(stripe)
        try:
            off = self._find(key, base, time.monotonic(), False)
            if off < 0:
                return None
            _, tokens, stamp, _, conns, _ = ENTRY.unpack_from(self.mm, off)
            return tokens, stamp, conns
        finally:
            self._unlock(stripe)

    def used(self) -> int:
        """Entries in use (a scan: for tests and stats, not the hot path)."""
        mm = self.mm
        return sum(1 for off in range(DATA, DATA + self.sets * SET_BYTES, ESIZE)
                   if mm[off:off + 24] != _EMPTY)

    def close(self) -> None:
        if self.held is not None:
            self.held.release()
            self.held_region.close()
            self.held = None
        if self.region is not None:
            self.region.close()
        else:
            self.mm.close()


def bucket(tokens: float, stamp: float, now: float, rate: float,
           burst: int) -> tuple[float, float]:
    """The token bucket: (tokens left, 0.0) after taking one, or (tokens, seconds until one is
    free) when there is none. `stamp` 0: a new client, whose bucket is full."""
    tokens = float(burst) if stamp == 0.0 else min(float(burst),
                                                   tokens + max(0.0, now - stamp) * rate)
    if tokens >= 1.0:
        return tokens - 1.0, 0.0
    return tokens, (1.0 - tokens) / rate


def retry_after(wait: float) -> int:
    """`Retry-After`: whole seconds until a token is free, at least 1."""
    return max(1, math.ceil(wait - 1e-9))


def pack_address(client: bytes, mask: int) -> bytes:
    """A family byte (4, 6; 1 for anything else, e.g. a Unix socket's empty address) and the
    address: IPv4 whole, IPv6 masked to its prefix, IPv4-mapped IPv6 as IPv4."""
    text = client.decode("latin-1")
    if ":" in text:
        try:
            b = socket.inet_pton(socket.AF_INET6, text.partition("%")[0])
        except OSError:
            return b"\x01" + client[:16]
        if b[:12] == b"\0" * 10 + b"\xff\xff":
            return b"\x04" + b[12:]
        return b"\x06" + (int.from_bytes(b, "big") & mask).to_bytes(16, "big")
    try:
        return b"\x04" + socket.inet_pton(socket.AF_INET, text)
    except OSError:
        return b"\x01" + client[:16]


_PHRASE = b"Too Many Requests"


def too_many_requests(wait: float, keep_alive: bool) -> bytes:
    """The 429 answer, with `Retry-After`."""
    body = (b"<html><body><h1>429 Too Many Requests</h1>\nYou have sent too many requests; "
            b"try again later.\n</body></html>\n")
    return (b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: %d\r\ncache-control: no-cache\r\n"
            b"content-type: text/html\r\nretry-after: %d\r\nconnection: %s\r\n\r\n%s"
            % (len(body), retry_after(wait), b"keep-alive" if keep_alive else b"close", body))


class Limiter:
    """One frontend's per-client limits over the table (`Frontend.climits`)."""

    __slots__ = ("burst", "cbase", "ctr", "max_conns", "rate", "table", "tag")

    def __init__(self, table: ClientTable, fe) -> None:
        self.table = table
        self.tag = fe.cbase
        self.ctr = fe.ctr
        self.cbase = fe.cbase
        rl = fe.cfg.rate_limit
        self.rate = rl.requests / rl.per if rl is not None else 0.0
        self.burst = rl.burst if rl is not None else 0
        self.max_conns = fe.cfg.max_client_connections

    def request(self, client: bytes) -> float:
        """0.0: the request may go on; else the seconds until `client` has a token (counted)."""
        wait = self.table.take(self.tag, client, self.rate, self.burst, time.monotonic())
        if wait:
            self.ctr[self.cbase + F_RATE_LIMITED] += 1
        return wait

    def connect(self, client: bytes) -> int:
        """`ClientTable.connect` for this frontend; a refusal is counted."""
        got = self.table.connect(self.tag, client, self.max_conns, time.monotonic())
        if got == REFUSED:
            self.ctr[self.cbase + F_CLIENT_REFUSED] += 1
        return got


def attach(frontends, table: ClientTable | None) -> None:
    """Give each frontend with per-client limits its `Limiter` (None for the others). A
    rate-limited frontend has no simple path: its requests all take the full one, where the
    bucket is checked; frontends without limits pay nothing per request."""
    for fe in frontends.values():
        cfg = fe.cfg
        if table is None or (cfg.rate_limit is None and not cfg.max_client_connections):
            fe.climits = None
            continue
        fe.climits = Limiter(table, fe)
        if cfg.rate_limit is not None:
            fe.simple = None

