"""The outbox (proxy/outbox.py): a turn's first write goes at once, its later small writes leave
together once the turn's reads are handled, each connection's bytes in order; a close sends
what waits first, an abort drops it, a big write never overtakes a small one waiting before it.

Unit tests over recording transports on a real event loop (the flush is a real `call_soon`),
and one over real sockets: a hundred pipelined requests in one read through foobar_lb, their
responses byte for byte in order (read with h11, not with the proxy's parser).
"""

from __future__ import annotations

import asyncio

import h11

from foobar_lb.proxy.outbox import SMALL, Outbox

from support import ScriptedServer, lb_config, running_lb


class Recorder:
    """A transport that records what it is given, in order (writes and closes alike)."""

    def __init__(self, log: list, name: str):
        self.log = log
        self.name = name
        self.closing = False

    def write(self, data):
        self.log.append((self.name, "write", bytes(data)))

    def writelines(self, chunks):
        self.log.append((self.name, "writelines", [bytes(c) for c in chunks]))

    def is_closing(self):
        return self.closing

    def close(self):
        self.closing = True
        self.log.append((self.name, "close", None))

    def abort(self):
        self.closing = True
        self.log.append((self.name, "abort", None))


def _past_first_write(ob: Outbox, log: list) -> None:
    """The turn's first write (at once, to a transport of its own): the next ones wait."""
    ob.write(Recorder(log, "first"), b"")
    del log[:]


def _turn_begun() -> tuple[Outbox, list]:
    """An outbox on the running loop whose turn has had its first write, and the log of what
    its recording transports are given."""
    log: list = []
    ob = Outbox(asyncio.get_running_loop())
    _past_first_write(ob, log)
    return ob, log


async def test_a_turns_first_write_goes_at_once_the_rest_after_it_in_order():
    loop = asyncio.get_running_loop()
    log: list = []
    ob = Outbox(loop)
    a, b = Recorder(log, "a"), Recorder(log, "b")
    ob.write(a, b"0")
    assert log == [("a", "write", b"0")]  # the turn's first: at once
    ob.write(a, b"1")
    ob.write(b, b"x")
    ob.write(a, b"2")
    ob.write(a, b"3")
    assert len(log) == 1  # the others wait for the turn's end
    await asyncio.sleep(0)
    assert log[1:] == [("a", "writelines", [b"1", b"2", b"3"]), ("b", "write", b"x")]
    assert ob.pending == {} and not ob.armed
    ob.write(b, b"y")  # a new turn: its first write goes at once again
    ob.write(b, b"z")
    assert log[3:] == [("b", "write", b"y")]
    await asyncio.sleep(0)
    assert log[4:] == [("b", "write", b"z")] and len(log) == 5


async def test_a_close_sends_what_waits_first_and_an_abort_drops_it():
    ob, log = _turn_begun()
    a, b = Recorder(log, "a"), Recorder(log, "b")
    ob.write(a, b"last response")
    ob.write(b, b"never sent")
    ob.close(a)
    ob.abort(b)
    assert log == [("a", "write", b"last response"), ("a", "close", None), ("b", "abort", None)]
    await asyncio.sleep(0)
    assert len(log) == 3 and ob.pending == {}


async def test_a_big_write_or_chunks_go_at_once_after_what_waits():
    ob, log = _turn_begun()
    a = Recorder(log, "a")
    big = b"b" * (SMALL + 1)
    ob.write(a, b"head")
    ob.write(a, big)
    assert log == [("a", "write", b"head"), ("a", "write", big)]
    ob.write(a, b"small")
    ob.writelines(a, [b"c1", b"c2"])
    assert log[2:] == [("a", "write", b"small"), ("a", "writelines", [b"c1", b"c2"])]
    await asyncio.sleep(0)
    assert len(log) == 4  # nothing was left to flush


async def test_a_connection_closed_meanwhile_gets_nothing_and_the_others_still_do():
    ob, log = _turn_begun()
    a, b = Recorder(log, "a"), Recorder(log, "b")
    ob.write(a, b"for a")
    ob.write(b, b"for b")
    a.closing = True  # (the peer went away: connection_lost)
    await asyncio.sleep(0)
    assert log == [("b", "write", b"for b")]


async def test_a_write_made_while_flushing_is_the_next_turns():
    loop = asyncio.get_running_loop()
    log: list = []
    ob = Outbox(loop)
    b = Recorder(log, "b")

    class Echo(Recorder):
        def write(self, data):
            super().write(data)
            ob.write(b, b"echo " + bytes(data))  # (as a protocol callback might)
            ob.write(b, b"again")

    a = Echo(log, "a")
    _past_first_write(ob, log)
    ob.write(a, b"ping")
    await asyncio.sleep(0)
    # the flush wrote a's bytes; a's callback made the next turn's writes: the first at once
    assert log == [("a", "write", b"ping"), ("b", "write", b"echo ping")]
    await asyncio.sleep(0)
    assert log[2:] == [("b", "write", b"again")]


async def test_pipelined_requests_in_one_read_get_their_responses_in_order():
    async with ScriptedServer("a") as a, running_lb(lb_config([a.address])) as lb:
        r, w = await asyncio.open_connection(*lb.address)
        n = 100
        w.write(b"".join(b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(n)))
        conn = h11.Connection(h11.CLIENT)
        got: list[tuple[int, bytes]] = []
        status, body = 0, b""
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "t")]))  # (its state)
        while len(got) < n:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await asyncio.wait_for(r.read(65536), 10)
                assert data, f"closed after {len(got)} responses"
                conn.receive_data(data)
            elif isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                got.append((status, body))
                status, body = 0, b""
                conn.send(h11.EndOfMessage())
                conn.start_next_cycle()
                conn.send(h11.Request(method="GET", target="/", headers=[("Host", "t")]))
        w.close()
    assert got == [(200, b"a GET /%d\n" % i) for i in range(n)]
    assert [q.url for q in a.requests] == [f"/{i}" for i in range(n)]
