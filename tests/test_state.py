"""The server state machine, without sockets: hysteresis, causes, the order of events."""

from __future__ import annotations

from foobar_lb import config_from_dict
from foobar_lb.backend import Backend
from foobar_lb.build import build
from foobar_lb.servers import State
from foobar_lb.shared import Counters, Layout
from foobar_lb.state import StateMachine


def backend(check: dict | None = None, observe: str | None = None, n: int = 2, **server_kw):
    servers = [{"name": f"s{i + 1}", "address": f"127.0.0.1:{9000 + i}", **server_kw}
               for i in range(n)]
    be = {"servers": servers}
    if check is not None:
        be["check"] = check
    if observe is not None:
        be["observe"] = observe
    cfg = config_from_dict({"frontends": {"f": {"bind": "127.0.0.1:0", "default_backend": "b"}},
                            "backends": {"b": be}})
    return Backend(cfg.backends["b"])


def machine():
    sm = StateMachine()
    seen = []
    sm.hooks.append(lambda be, server, ch: seen.append(("hook", server.name, ch.old, ch.new)))
    sm.listeners.append(lambda ch: seen.append(("listener", ch.server, ch.old, ch.new)))
    return sm, seen


def test_fall_then_rise_with_hysteresis_and_causes():
    be = backend({"rise": 2, "fall": 3})
    s1 = be.by_name["s1"]
    sm, seen = machine()
    assert s1.state is State.UP and s1.health == 4  # rise + fall - 1: fully up
    sm.check_result(be, s1, False, "layer4 connection refused", 0.001)
    sm.check_result(be, s1, False, "layer4 connection refused", 0.001)
    assert (s1.state, s1.health, seen) == (State.UP, 2, [])
    sm.check_result(be, s1, False, "layer4 timeout", 2.0)
    assert (s1.state, s1.health) == (State.DOWN, 0)
    assert seen == [("hook", "s1", State.UP, State.DOWN), ("listener", "s1", State.UP, State.DOWN)]
    ch = sm.events[-1]
    assert (ch.backend, ch.server, ch.reason, ch.active_left, ch.backup_left) == (
        "b", "s1", "layer4 timeout (check took 2000ms)", 1, 0)
    assert be.algorithm.up == [be.by_name["s2"]]  # the algorithm was told
    sm.check_result(be, s1, True, "layer4 check passed", 0.001)
    assert (s1.state, s1.health) == (State.DOWN, 1)
    sm.check_result(be, s1, True, "layer4 check passed", 0.002)
    assert (s1.state, s1.health) == (State.UP, 4)
    assert sm.events[-1].reason == "layer4 check passed (check took 2ms)"
    assert [(e.old, e.new) for e in sm.events] == [(State.UP, State.DOWN), (State.DOWN, State.UP)]
    assert be.algorithm.up == [s1, be.by_name["s2"]]


def test_a_pass_while_going_down_climbs_back():
    be = backend({"rise": 2, "fall": 3})
    s1 = be.by_name["s1"]
    sm, _ = machine()
    for ok in (False, False, True, False, False):
        sm.check_result(be, s1, ok, "x", 0)
    # 4 -> 3 -> 2, a pass while up and at rise or above is fully up again (HAProxy): 4 -> 3 -> 2
    assert (s1.state, s1.health, len(sm.events)) == (State.UP, 2, 0)
    sm.check_result(be, s1, False, "x", 0)  # at rise, a failure puts it down
    assert (s1.state, s1.health, len(sm.events)) == (State.DOWN, 0, 1)


def test_observed_errors_put_a_server_down_at_the_limit_and_an_answer_resets_the_run():
    be = backend({"rise": 1, "fall": 1}, observe="layer4")
    be.cfg = be.cfg.__class__(**{**{f: getattr(be.cfg, f) for f in be.cfg.__dataclass_fields__},
                                  "error_limit": 3})
    s1 = be.by_name["s1"]
    sm, _ = machine()
    sm.observed_error(be, s1, "connection refused")
    sm.observed_error(be, s1, "connection refused")
    sm.observed_ok(be, s1)
    sm.observed_error(be, s1, "connection refused")
    sm.observed_error(be, s1, "connection refused")
    assert s1.state is State.UP
    sm.observed_error(be, s1, "connection reset")
    assert s1.state is State.DOWN
    assert sm.events[-1].reason == "3 consecutive errors on live traffic (last: connection reset)"
    # layer7 errors do not count with observe = layer4
    s2 = be.by_name["s2"]
    for _ in range(5):
        sm.observed_error(be, s2, "status 500", layer7=True)
    assert s2.state is State.UP and s2.errors == 0


def test_a_process_exit_is_down_at_once_and_checks_bring_it_back():
    be = backend({"rise": 2, "fall": 3})
    s2 = be.by_name["s2"]
    sm, seen = machine()
    sm.process_exited(be, s2, "process 42 exited (killed by SIGKILL)")
    assert (s2.state, s2.health) == (State.DOWN, 0)
    assert sm.events[-1].reason == "process 42 exited (killed by SIGKILL)"
    sm.check_result(be, s2, True, "layer7 check passed: 200", 0)
    assert s2.state is State.DOWN
    sm.check_result(be, s2, True, "layer7 check passed: 200", 0)
    assert s2.state is State.UP
    assert [x[0] for x in seen] == ["hook", "listener", "hook", "listener"]


def test_last_server_down_fails_the_queue_and_is_counted_in_the_event():
    be = backend({"rise": 1, "fall": 1}, n=1)
    s1 = be.by_name["s1"]
    sm, _ = machine()
    answers = []
    from foobar_lb.backend import Waiter

    class Who:
        def granted(self, arg, server):
            answers.append(server)

    be.queue.append(Waiter(None, 1e9, Who()))
    sm.check_result(be, s1, False, "layer4 connection refused", 0)
    assert answers == [None]  # nothing left up: the queued request gets its 503 now
    assert (sm.events[-1].active_left, sm.events[-1].backup_left) == (0, 0)


def test_a_reload_build_carries_states_and_counters_by_name():
    def cfg(names):
        return config_from_dict({
            "frontends": {"f": {"bind": "127.0.0.1:0", "default_backend": "b"}},
            "backends": {"b": {"check": {"rise": 2, "fall": 2},
                               "servers": [{"name": n, "address": f"127.0.0.1:{9000 + i}"}
                                           for i, n in enumerate(names)]}}})

    layout, counters = Layout(), Counters()
    old = build(cfg(["a", "b"]), layout=layout, counters=counters)
    sm = StateMachine()
    be = old.backends["b"]
    sm.check_result(be, be.by_name["b"], False, "x", 0)
    sm.check_result(be, be.by_name["b"], False, "x", 0)
    be.by_name["a"].total = 7
    new = build(cfg(["b", "c"]), old, layout=layout, counters=counters)
    nb = new.backends["b"]
    assert nb.by_name["b"].state is State.DOWN and nb.by_name["b"].health == 0
    assert nb.algorithm.up == [nb.by_name["c"]]
    assert nb.by_name["c"].state is State.UP and nb.by_name["c"].total == 0
    again = build(cfg(["a"]), new, layout=layout, counters=counters)
    assert again.backends["b"].by_name["a"].total == 7  # its counters, by name
