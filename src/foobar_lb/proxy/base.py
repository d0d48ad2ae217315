"""What the proxy Protocols share: one lazy timer each, and the client side's bookkeeping.

Rule of this module: a connection has at most one timer; `_arm(when)` only moves it earlier,
and `_on_timer` (the subclass's) re-checks the state when it fires and re-arms for a later
deadline if there is one, so activity never costs a timer operation. A client connection's
first deadline, set at accept (`ClientSide._arm_first`), is not a timer of its own: the
connection joins its frontend's `swept` set (its `th` is `SWEPT`), and the frontend's one sweep
timer gives it a timer of its own only when that deadline is near, so a connection that ends or
moves its deadline earlier before then never makes one (a uvloop timer costs thousands of
instructions to make and cancel; a set's add and discard, a few dozen).
"""

from __future__ import annotations

import asyncio
import errno

from ..shared import F_CURRENT

__all__ = ["OUT_OF_FDS", "SWEPT", "ClientSide", "LazyTimer", "pass_eof"]

# a server connection that failed for want of a descriptor here: this process's limit, not the
# server's fault (never observed as its error: the request waits for one, or gets 503)
OUT_OF_FDS = frozenset((errno.EMFILE, errno.ENFILE))


def pass_eof(peer_done: bool, peer: asyncio.Transport | None) -> bool:
    """A FIN arrived on one leg of a relay: pass it on to the other leg (`peer`). The return
    value is eof_received's: True keeps this leg open for writing; False closes it, when the
    other way is done already (`peer_done`) or a half-close cannot be passed on."""
    if peer_done or peer is None:
        return False
    if peer.can_write_eof():
        peer.write_eof()
        return True
    return False


class LazyTimer(asyncio.Protocol):
    """Subclasses have the slots `loop`, `th`, `th_when` and a method `_on_timer`."""

    __slots__ = ()

    def _arm(self, when: float) -> None:
        """Make sure the timer fires no later than `when`."""
        th = self.th
        if th is None or self.th_when > when:
            if th is not None:
                th.cancel()
            self.th_when = when
            self.th = self.loop.call_at(when, self._on_timer)

    def _disarm(self) -> None:
        if self.th is not None:
            self.th.cancel()
            self.th = None


SWEPT = "swept"  # a client connection's `th` while its frontend's sweep holds its deadline


def _sweep(fe, loop: asyncio.AbstractEventLoop) -> None:
    """The frontend's sweep: connections whose deadline comes before the sweep after next get a
    timer of their own (so each fires on time: the sweep runs every `sweep_every`, at most a
    quarter of the deadline's timeout)."""
    every = fe.sweep_every
    soon = loop.time() + 2 * every
    swept = fe.swept
    for s in [s for s in swept if s.th_when <= soon]:
        swept.discard(s)
        s.th = loop.call_at(s.th_when, s._on_timer)
    fe.sweep_th = loop.call_later(every, _sweep, fe, loop) if swept else None


class ClientSide(LazyTimer):
    """A client connection: counted against global maxconn, maybe waiting in a backend queue.
    Subclasses have the slots `lb`, `fe`, `transport`, `peer_ip`, `peer_key`, `client_key`,
    `proxied`, `closing` and `waiter`, and a method `accepted`."""

    __slots__ = ()

    def _arm(self, when: float) -> None:
        """Make sure the timer fires no later than `when` (a deadline the sweep holds is
        taken from it)."""
        th = self.th
        if th is None or self.th_when > when:
            if th is SWEPT:
                self.fe.swept.discard(self)
            elif th is not None:
                th.cancel()
            self.th_when = when
            self.th = self.loop.call_at(when, self._on_timer)

    def _arm_first(self, when: float) -> None:
        """The connection's first deadline, at accept: held by the frontend's sweep."""
        if self.th is not None:
            self._arm(when)
            return
        self.th = SWEPT
        self.th_when = when
        fe = self.fe
        fe.swept.add(self)
        if fe.sweep_th is None:
            fe.sweep_th = self.loop.call_later(fe.sweep_every, _sweep, fe, self.loop)

    def _disarm(self) -> None:
        th = self.th
        if th is not None:
            if th is SWEPT:
                self.fe.swept.discard(self)
            else:
                th.cancel()
            self.th = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        """Who the client is (the peer, until a PROXY header or a trusted proxy says more), the
        frontend's rules at accept (`clientaddr.Edge`), then the subclass's `accepted`."""
        self.transport = transport
        fe = self.fe
        fe.ctr[fe.cbase + F_CURRENT] += 1  # (-1 in _ended: connection_lost always follows)
        # (a PROXY header read before TLS gives the client's address: serving._proxied)
        peer = self.proxied[0] if self.proxied else transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer_ip = peer[0]
            self.peer_key = self.client_key = peer[0].encode()
        edge = fe.edge
        if edge is None or edge.accept(self):
            self.accepted()

    def _ended(self) -> None:
        """The connection is gone: free its maxconn slot, its queue place and its timer."""
        self.lb.leave(self)
        fe = self.fe
        fe.ctr[fe.cbase + F_CURRENT] -= 1
        self.closing = True
        if self.waiter is not None:
            self.waiter.cancel()
            self.waiter = None
        self._disarm()
