"""Workers: the processes that accept and proxy, started by the master.

Rules of this module:
- a worker process runs one `serving.Serving`; it gets everything from the master
  (configuration, listening sockets, shared memory, server states) in its first message,
  applies the state changes and the runtime API's changes the master pushes (admin states,
  weights, servers added and removed), reports what live traffic observes, and exits
  when told, when its work is done after a drain, or at once when the master is gone (parent
  death signal, or the channel closing).
It never binds a socket, never runs a health check and never decides a server's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
from typing import Any

from .admission import Admission, fit_fd_limit
from .build import build, prepare_server
from .channel import Channel, recv_one
from .limits import ClientTable
from .servers import Server
from .serving import Serving
from .shared import COUNTER_BYTES, SEM_CAPACITY, SEM_SIZE, Counters, Layout, Region, SemSlots
from .tls import TlsError, preload

__all__ = ["main"]

log = logging.getLogger("foobar_lb.worker")


# ---------------------------------------------------------------------------------------------
# The worker process


class _MasterLink:
    """A worker's observer: what live traffic sees goes to the master, which decides."""

    def __init__(self, channel: Channel):
        self.channel = channel

    def observed_error(self, be: Any, server: Server, what: str, layer7: bool = False) -> None:
        server.errors += 1
        self.channel.send(("error", be.name, server.name, what, layer7))

    def observed_ok(self, be: Any, server: Server) -> None:
        self.channel.send(("ok", be.name, server.name))


_PR_SET_PDEATHSIG = 1


def _die_with_master(master_pid: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != master_pid:  # it died before we asked to follow it
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    """`python -m foobar_lb.worker FD`: FD is this worker's end of the master's channel."""
    argv = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the master's to handle
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ctrl = socket.socket(fileno=int(argv[0]))
    init = recv_one(ctrl)
    _die_with_master(init["master_pid"])
    try:
        preload(init["config"])  # TLS files are read before root is given up
    except TlsError as e:  # (changed since the master checked them)
        print(f"foobar-lb: error: {e}", file=sys.stderr, flush=True)
        return 2
    if init["ids"] is not None:  # global.user/group: no root once the sockets are ours
        uid, gid = init["ids"]
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    logging.raiseExceptions = False  # a log line that cannot be written is dropped
    logging.basicConfig(level=init["log_level"], stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s %(name)s[w{init['id']}]: %(message)s")
    from .runtime import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(_run(init, ctrl))


async def _run(init: dict[str, Any], ctrl: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    config = init["config"]
    sem_region = Region(SEM_SIZE * SEM_CAPACITY, fd=init["sems_fd"])
    counters = Counters(Region(COUNTER_BYTES, fd=init["counters_fd"]))
    layout = Layout()
    layout.offsets = dict(init["layout"])
    layout.cells = init["cells"]
    sems = init["sems"]

    commands: asyncio.Queue[tuple] = asyncio.Queue()
    serving: Serving | None = None
    early: list[tuple] = []  # changes that came before there was anything to apply them to

    def apply(msg: tuple) -> None:
        if msg[0] == "state":
            serving.apply(*msg[1:])
        else:
            _runtime_change(msg, serving, layout, counters, channel)

    def on_message(msg: tuple) -> None:
        kind = msg[0]
        if kind == "state" or kind in _RUNTIME:
            if serving is None:
                early.append(msg)
            else:
                apply(msg)
        elif msg[0] == "reopen":  # SIGUSR1 to the master: log rotation
            if serving is not None:
                serving.reopen_log()
        else:  # drain, stop or abort
            commands.put_nowait(msg)

    channel = Channel(on_message, lambda: commands.put_nowait(("abort",)))  # master gone
    await loop.create_unix_connection(lambda: channel, sock=ctrl)
    built = build(config, layout=layout, counters=counters, observer=_MasterLink(channel),
                  slots=lambda b, s: SemSlots(sem_region, sems[(b, s.name)], s.maxconn),
                  states=init["states"])
    settings = config.settings
    clients = ClientTable(settings.limit_table_size, settings.ipv6_prefix, fd=init["clients_fd"],
                          held_fd=init["held_fd"])
    admission = Admission(loop, SemSlots(sem_region, sems[("maxconn",)], settings.maxconn),
                          clients)
    serving = Serving(loop, built, admission)
    for msg in early:  # (a check, or the runtime API, changed a server while it was starting)
        apply(msg)
    early.clear()
    socks = {key: socket.socket(fileno=fd) for key, fd in init["sockets"].items()}
    # the open-file limit (global.max_open_files, else raised to fit maxconn) and the budget
    fd_limit = fit_fd_limit(settings.maxconn, settings.max_open_files)
    await serving.listen(socks, init["backlog"], fd_limit)
    loop.add_signal_handler(signal.SIGTERM, commands.put_nowait, ("stop", config.settings.grace))
    loop.add_signal_handler(signal.SIGUSR1, serving.reopen_log)  # (sent to a worker itself)
    channel.send(("ready", os.getpid()))
    msg = await commands.get()
    while msg[0] != "abort":
        kind, within = msg
        if kind == "drain":
            serving.drain()
        else:
            await serving.stop()
        finishing = asyncio.ensure_future(serving.finish(loop.time() + within))
        getting = asyncio.ensure_future(commands.get())
        await asyncio.wait([finishing, getting], return_when=asyncio.FIRST_COMPLETED)
        if finishing.done():
            getting.cancel()
            _say_cut(*finishing.result(), "the %s period ended" % (
                "hard_stop_after" if kind == "drain" else "grace"))
            break
        finishing.cancel()
        msg = getting.result()  # a stop during a drain, or an abort
    else:
        _say_cut(*serving.abort(), "stopped at once")
    serving.close()
    channel.close()
    await asyncio.sleep(0)
    return 0


def _say_cut(connections: int, requests: int, why: str) -> None:
    if connections:
        log.warning("%s: cut %d request%s in flight and %d connection%s", why, requests,
                    "" if requests == 1 else "s", connections,
                    "" if connections == 1 else "s")


_RUNTIME = frozenset(("admin", "weight", "add", "remove"))


def _runtime_change(msg: tuple, serving: Serving, layout: Layout, counters: Counters,
                    channel: Channel) -> None:
    """A change made through the runtime API, decided by the master."""
    kind = msg[0]
    if kind == "admin":
        serving.set_admin(*msg[1:])
    elif kind == "weight":
        serving.set_weight(*msg[1:])
    elif kind == "add":
        # ("add", backend, ServerConfig, the master's layout offsets and cells, state, health,
        # admin): prepared like the servers of a build, with the master's offsets
        _, backend, cfg, offsets, cells, state, health, admin = msg
        layout.offsets.update(offsets)
        layout.cells = max(layout.cells, cells)
        server = Server.from_config(cfg, backend=backend)
        prepare_server(server, config=serving.built.config, layout=layout, counters=counters,
                       states={(backend, cfg.name): (state, health, admin)})
        serving.add_server(backend, server, cfg)
    elif kind == "remove":  # ("remove", backend, server, seconds its requests may take)
        _, backend, name, within = msg
        serving.remove_server(backend, name, within,
                              lambda left: channel.send(("removed", backend, name, left)))


if __name__ == "__main__":
    sys.exit(main())
