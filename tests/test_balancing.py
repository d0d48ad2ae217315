"""Balancing algorithms: exact schedules, distributions and the safety properties all share.

Pure unit tests (no sockets, no event loop). State changes go through `Balancer.set_state` /
`Balancer.set_weight` and load through `Balancer.take` / `Balancer.drop`, because that is the
contract: algorithms are told about changes, they never poll.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import foobar_lb
from foobar_lb import Algorithm, Balancer, algorithm_names, config_from_dict, register_algorithm
from foobar_lb.balancing import _REGISTRY, get_algorithm
from foobar_lb.servers import Server, State

BUILTINS = ["roundrobin", "static-rr", "leastconn", "random", "source", "first"]
ALGORITHMS = algorithm_names()

PROPS = settings(max_examples=200, deadline=None)


def make_servers(*weights: int, prefix: str = "s", **kw) -> list[Server]:
    """Servers named s1, s2, ... with the given weights (ports 8001, 8002, ...)."""
    return [Server(f"{prefix}{i}", "127.0.0.1", 8000 + i, weight=w, **kw)
            for i, w in enumerate(weights, 1)]


def algo(name: str, servers: list[Server], seed: int = 0) -> Algorithm:
    return get_algorithm(name)(servers, rng=random.Random(seed))


def names(picks) -> list[str | None]:
    return [None if s is None else s.name for s in picks]


def picks(chooser, n: int, key: bytes | None = None) -> list[str | None]:
    return names(chooser.pick(key) for _ in range(n))


def test_builtins_registered():
    assert set(BUILTINS) <= set(ALGORITHMS)
    for name in BUILTINS:
        assert get_algorithm(name).name == name
    with pytest.raises(KeyError, match="unknown balancing algorithm"):
        get_algorithm("no-such-algorithm")


# ---------------------------------------------------------------------------------------------
# 1. roundrobin: exact rotation


def test_roundrobin_equal_weights_exact_rotation():
    a = algo("roundrobin", make_servers(1, 1, 1, 1))
    assert picks(a, 5) == ["s1", "s2", "s3", "s4", "s1"]


def test_roundrobin_exact_rotation_through_balancer():
    b = Balancer(make_servers(1, 1, 1, 1))  # roundrobin is the default
    got = []
    for _ in range(5):
        s = b.pick()
        b.take(s)  # load must not matter to roundrobin
        got.append(s.name)
    assert got == ["s1", "s2", "s3", "s4", "s1"]
    # equal weights other than 1 rotate the same way
    assert picks(Balancer(make_servers(7, 7, 7, 7), "roundrobin"), 8) == ["s1", "s2", "s3", "s4"] * 2


def test_roundrobin_skips_down_and_full_and_restarts_on_change():
    servers = make_servers(1, 1, 1, 1)
    b = Balancer(servers)
    assert picks(b, 2) == ["s1", "s2"]
    b.set_state(servers[2], State.DOWN)
    # a change of the server set restarts the rotation from the first usable server
    assert picks(b, 4) == ["s1", "s2", "s4", "s1"]
    servers[1].maxconn = 1
    b.take(servers[1])
    assert servers[1].full
    # a full server is skipped for that pick (its score is left alone, as nginx does with
    # max_conns): the other two share the traffic evenly, up to the credit s4 had built up
    counts = Counter(picks(b, 40))
    assert set(counts) == {"s1", "s4"}
    assert abs(counts["s1"] - counts["s4"]) <= 2
    b.drop(servers[1])
    assert "s2" in picks(b, 3)


# ---------------------------------------------------------------------------------------------
# 2. smooth weighted round robin


def test_smooth_weighted_roundrobin_nginx_sequence():
    servers = [Server(n, "127.0.0.1", 8000 + i, weight=w)
               for i, (n, w) in enumerate([("a", 5), ("b", 1), ("c", 1)])]
    expected = ["a", "a", "b", "a", "c", "a", "a"]
    a = algo("roundrobin", servers)
    assert picks(a, 7) == expected
    # the scores are back to zero after a full cycle: the next cycle is the same
    assert picks(a, 14) == expected * 2
    assert picks(Balancer(servers, "roundrobin"), 7) == expected


@pytest.mark.parametrize("weights", [(5, 1, 1), (3, 2, 1), (1, 2, 3, 4), (7, 3), (256, 1, 13), (2, 2, 4)])
@pytest.mark.parametrize("cycles", [1, 3])
def test_smooth_weighted_roundrobin_exact_counts(weights, cycles):
    a = algo("roundrobin", make_servers(*weights))
    counts = Counter(picks(a, cycles * sum(weights)))
    assert counts == {f"s{i}": cycles * w for i, w in enumerate(weights, 1)}


def test_smooth_weighted_roundrobin_is_smooth():
    # 3, 2, 1 per nginx: a b a c b a (never the same server three times running)
    a = algo("roundrobin", make_servers(3, 2, 1))
    assert picks(a, 6) == ["s1", "s2", "s1", "s3", "s2", "s1"]


@PROPS
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6))
def test_smooth_weighted_roundrobin_full_cycle_property(weights):
    a = algo("roundrobin", make_servers(*weights))
    seq = picks(a, sum(weights))
    assert Counter(seq) == {f"s{i}": w for i, w in enumerate(weights, 1)}
    # smoothness: over any prefix of n picks each server is within one pick of its fair share
    total = sum(weights)
    seen: Counter[str] = Counter()
    for n, name in enumerate(seq, 1):
        seen[name] += 1
        for i, w in enumerate(weights, 1):
            assert abs(seen[f"s{i}"] - n * w / total) < len(weights)


# ---------------------------------------------------------------------------------------------
# 3. static-rr


def test_static_rr_equal_weights_exact_rotation():
    a = algo("static-rr", make_servers(1, 1, 1, 1))
    assert picks(a, 9) == ["s1", "s2", "s3", "s4"] * 2 + ["s1"]
    assert picks(Balancer(make_servers(3, 3, 3), "static-rr"), 6) == ["s1", "s2", "s3"] * 2


def test_static_rr_schedule_is_smooth():
    a = algo("static-rr", make_servers(5, 1, 1))
    assert picks(a, 14) == ["s1", "s1", "s2", "s1", "s3", "s1", "s1"] * 2


@pytest.mark.parametrize("weights", [(5, 1, 1), (3, 2, 1), (1, 2, 3, 4), (2, 4, 6), (256, 1, 13)])
@pytest.mark.parametrize("cycles", [1, 2])
def test_static_rr_exact_counts(weights, cycles):
    a = algo("static-rr", make_servers(*weights))
    counts = Counter(picks(a, cycles * sum(weights)))
    assert counts == {f"s{i}": cycles * w for i, w in enumerate(weights, 1)}


@PROPS
@given(st.lists(st.integers(1, 60), min_size=1, max_size=6))
def test_static_rr_full_cycle_property(weights):
    a = algo("static-rr", make_servers(*weights))
    assert Counter(picks(a, sum(weights))) == {f"s{i}": w for i, w in enumerate(weights, 1)}


def test_static_rr_skips_full_and_follows_state():
    servers = make_servers(1, 1, 1)
    b = Balancer(servers, "static-rr")
    servers[1].maxconn = 1
    b.take(servers[1])
    assert picks(b, 4) == ["s1", "s3", "s1", "s3"]
    b.drop(servers[1])
    b.set_state(servers[0], State.DOWN)
    assert Counter(picks(b, 6)) == {"s2": 3, "s3": 3}


# ---------------------------------------------------------------------------------------------
# 4. random (power of two choices)


def test_random_shares_follow_weights():
    weights = (1, 2, 3, 4)
    n = 50_000
    a = algo("random", make_servers(*weights), seed=12345)
    counts = Counter(picks(a, n))
    total = sum(weights)
    for i, w in enumerate(weights, 1):
        expected = w / total
        share = counts[f"s{i}"] / n
        assert abs(share - expected) <= 0.05 * expected, (counts, i)


def test_random_seeded_is_reproducible():
    one = picks(algo("random", make_servers(1, 2, 3, 4), seed=7), 200)
    two = picks(Balancer(make_servers(1, 2, 3, 4), "random", rng=random.Random(7)), 200)
    assert one == two
    assert len(set(one)) == 4


def test_random_power_of_two_prefers_less_loaded():
    servers = make_servers(1, 1, 1, 1)
    b = Balancer(servers, "random", rng=random.Random(3))
    for _ in range(100):
        b.take(servers[0])
    n = 8000
    counts = Counter(picks(b, n))
    # s1 only wins when both draws are s1: about 1/16 instead of 1/4
    assert counts["s1"] < 0.10 * n
    for name in ("s2", "s3", "s4"):
        assert counts[name] > 0.28 * n
    # once the load is gone, s1 gets its fair share again
    for _ in range(100):
        b.drop(servers[0])
    counts = Counter(picks(b, n))
    assert counts["s1"] > 0.2 * n


# ---------------------------------------------------------------------------------------------
# 5. leastconn


def test_leastconn_idle_ties_round_robin():
    assert picks(algo("leastconn", make_servers(1, 1, 1, 1)), 5) == ["s1", "s2", "s3", "s4", "s1"]


def test_leastconn_equal_load_ties_round_robin():
    servers = make_servers(1, 1, 1)
    b = Balancer(servers, "leastconn")
    for s in servers:
        b.take(s)
        b.take(s)
    assert picks(b, 4) == ["s1", "s2", "s3", "s1"]


def test_leastconn_picks_fewest_active():
    servers = make_servers(1, 1, 1, 1)
    b = Balancer(servers, "leastconn")
    for s, n in zip(servers, (3, 1, 4, 2), strict=True):
        for _ in range(n):
            b.take(s)
    assert b.pick().name == "s2"
    b.take(servers[1])
    b.take(servers[1])  # s2 now 3: s4 (2) is least
    assert b.pick().name == "s4"
    for _ in range(4):
        b.drop(servers[2])  # s3 now 0
    assert b.pick().name == "s3"


def test_leastconn_takes_weight_into_account():
    # load is (active + 1) / weight: s1 = 3/3 = 1, s2 = 2/1 = 2, s3 = 1/2 -> s3
    servers = make_servers(3, 1, 2)
    b = Balancer(servers, "leastconn")
    for s, n in zip(servers, (2, 1, 0), strict=True):
        for _ in range(n):
            b.take(s)
    assert b.pick().name == "s3"
    # s3 = 3/2 now: s1 (1) is the least loaded for its weight, though it has the most active
    b.take(servers[2])
    b.take(servers[2])
    assert b.pick().name == "s1"


def test_leastconn_weighted_fill_with_take():
    servers = make_servers(3, 1)
    b = Balancer(servers, "leastconn")
    for _ in range(400):
        b.take(b.pick())
    assert (servers[0].active, servers[1].active) == (300, 100)


# ---------------------------------------------------------------------------------------------
# 6. source


def addresses(n: int) -> list[bytes]:
    return [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}".encode() for i in range(n)]


def test_source_same_key_same_server():
    servers = make_servers(1, 1, 1, 1)
    b = Balancer(servers, "source")
    for key in (b"10.0.0.7", b"192.168.1.20", b"::1", b""):
        first = b.pick(key)
        assert all(b.pick(key) is first for _ in range(50))
    # stable across instances and fresh Server objects (no per-process salted hash)
    again = Balancer(make_servers(1, 1, 1, 1), "source")
    keys = addresses(200)
    assert names(b.pick(k) for k in keys) == names(again.pick(k) for k in keys)


def test_source_spreads_addresses():
    b = Balancer(make_servers(1, 1, 1, 1), "source")
    keys = addresses(2000)
    counts = Counter(names(b.pick(k) for k in keys))
    assert set(counts) == {"s1", "s2", "s3", "s4"}
    for name, c in counts.items():
        assert 0.15 * len(keys) <= c <= 0.35 * len(keys), (name, counts)


def test_source_weights_shift_share():
    b = Balancer(make_servers(3, 1), "source")
    counts = Counter(names(b.pick(k) for k in addresses(2000)))
    assert 0.65 * 2000 <= counts["s1"] <= 0.85 * 2000, counts


def test_source_only_keys_of_a_down_server_move():
    servers = make_servers(1, 1, 1, 1)
    b = Balancer(servers, "source")
    keys = addresses(2000)
    before = {k: b.pick(k) for k in keys}
    gone = servers[2]
    b.set_state(gone, State.DOWN)
    after = {k: b.pick(k) for k in keys}
    moved = [k for k in keys if after[k] is not before[k]]
    assert moved == [k for k in keys if before[k] is gone]
    assert moved  # some keys were on it
    assert all(after[k] is not gone for k in keys)
    # they spread over the others, not all onto one
    assert len({after[k] for k in moved}) == 3
    # and when it comes back every key is where it was
    b.set_state(gone, State.UP)
    assert all(b.pick(k) is before[k] for k in keys)


# ---------------------------------------------------------------------------------------------
# 7. first


def test_first_fills_servers_in_order():
    servers = make_servers(1, 1, 1, maxconn=2)
    b = Balancer(servers, "first")
    got = []
    for _ in range(6):
        s = b.pick()
        b.take(s)
        got.append(s.name)
    assert got == ["s1", "s1", "s2", "s2", "s3", "s3"]
    assert b.pick() is None  # all full
    b.drop(servers[1])
    assert b.pick() is servers[1]
    b.drop(servers[0])
    assert b.pick() is servers[0]  # the first non-full server in config order


def test_first_uses_active_to_skip_full():
    servers = make_servers(1, 1, 1, 1, maxconn=5)
    b = Balancer(servers, "first")
    for s, n in zip(servers, (5, 5, 4, 0), strict=True):
        for _ in range(n):
            b.take(s)
    assert b.pick() is servers[2]


def test_first_without_maxconn_always_first_usable():
    servers = make_servers(1, 1, 1)
    b = Balancer(servers, "first")
    for s in servers:
        for _ in range(1000):
            b.take(s)
    assert picks(b, 20) == ["s1"] * 20
    b.set_state(servers[0], State.DOWN)
    assert picks(b, 5) == ["s2"] * 5
    b.set_weight(servers[1], 0)
    assert picks(b, 5) == ["s3"] * 5
    b.set_state(servers[0], State.UP)
    assert picks(b, 5) == ["s1"] * 5


# ---------------------------------------------------------------------------------------------
# 8. properties of every registered algorithm

server_spec = st.tuples(
    st.integers(0, 256),  # weight
    st.sampled_from(list(State)),  # state
    st.integers(0, 3),  # maxconn (0: no limit)
    st.integers(0, 4),  # active
    st.booleans(),  # backup
)
server_specs = st.lists(server_spec, min_size=0, max_size=7)
keys = st.one_of(st.none(), st.binary(max_size=16))


def build(name: str, specs, *, with_backups: bool, allbackups: bool = False, seed: int = 0):
    servers = [
        Server(f"s{i}", "127.0.0.1", 8000 + i, weight=w, maxconn=m, backup=with_backups and bk)
        for i, (w, _, m, _, bk) in enumerate(specs, 1)
    ]
    b = Balancer(servers, name, allbackups=allbackups, rng=random.Random(seed))
    for s, (_, state, _, active, _) in zip(servers, specs, strict=True):
        for _ in range(active):
            b.take(s)
        b.set_state(s, state, "test")
    return servers, b


def ok(s: Server) -> bool:
    return s.usable and not s.full


def check_pick(s: Server | None, servers: list[Server]) -> None:
    """The pick is a usable, non-full server, and None only when the tier in use has none."""
    actives = [x for x in servers if not x.backup and x.usable]
    tier = actives or [x for x in servers if x.backup and x.usable]
    if s is None:
        assert not any(ok(x) for x in tier)
        return
    assert s in servers
    assert s.state is State.UP
    assert s.weight > 0
    assert not s.full
    assert s in tier  # no backup while an active server is up


@pytest.mark.parametrize("name", ALGORITHMS)
@PROPS
@given(specs=server_specs, key_list=st.lists(keys, min_size=1, max_size=5))
def test_pick_is_usable_and_none_only_when_nothing_is(name, specs, key_list):
    servers, b = build(name, specs, with_backups=False)
    for key in key_list:
        s = b.pick(key)
        check_pick(s, servers)
        if s is None:
            assert not any(ok(x) for x in servers)
        # the algorithm itself honours the same contract
        a = b.algorithm.pick(key)
        assert a is None or ok(a)
        assert (a is None) == (not any(ok(x) for x in servers))


@pytest.mark.parametrize("name", ALGORITHMS)
@PROPS
@given(specs=server_specs, key_list=st.lists(keys, min_size=1, max_size=5), allbackups=st.booleans())
def test_pick_with_backups_is_usable(name, specs, key_list, allbackups):
    servers, b = build(name, specs, with_backups=True, allbackups=allbackups)
    for key in key_list:
        s = b.pick(key)
        check_pick(s, servers)
        if s is not None and s.backup and not allbackups:
            # without allbackups the first usable backup gets everything
            assert s is next(x for x in servers if x.backup and ok(x))


@pytest.mark.parametrize("name", ALGORITHMS)
@PROPS
@given(specs=st.lists(server_spec, min_size=1, max_size=7), key=keys, data=st.data())
def test_avoid_is_passed_over_when_another_is_usable(name, specs, key, data):
    servers, b = build(name, specs, with_backups=True)
    avoid = data.draw(st.sampled_from(servers))  # the server a retry failed on
    s = b.pick(key, avoid=avoid)
    check_pick(s, servers)
    actives = [x for x in servers if not x.backup and x.usable]
    tier = actives or [x for x in servers if x.backup and x.usable]
    others = [x for x in tier if ok(x) and x is not avoid]
    if others:
        assert s in others  # another usable one is there: the failed server is passed over
    elif avoid in tier and ok(avoid):
        assert s is avoid  # it is the only one left: the retry goes back to it
    else:
        assert s is None  # nothing usable in the tier in use


operations = st.lists(
    st.one_of(
        st.tuples(st.just("state"), st.integers(0, 5), st.sampled_from(list(State))),
        st.tuples(st.just("weight"), st.integers(0, 5), st.integers(0, 256)),
        st.tuples(st.just("pick"), keys, st.booleans()),
        st.tuples(st.just("drop"), st.integers(0, 5), st.none()),
    ),
    max_size=60,
)


@pytest.mark.parametrize("name", ALGORITHMS)
@PROPS
@given(
    weights=st.lists(st.integers(0, 256), min_size=1, max_size=6),
    maxconn=st.integers(0, 3),
    ops=operations,
)
def test_random_operations_never_pick_a_down_server(name, weights, maxconn, ops):
    servers = make_servers(*weights, maxconn=maxconn)
    b = Balancer(servers, name, rng=random.Random(0))
    for op, arg, extra in ops:
        if op == "state":
            b.set_state(servers[arg % len(servers)], extra)
        elif op == "weight":
            b.set_weight(servers[arg % len(servers)], extra)
        elif op == "drop":
            s = servers[arg % len(servers)]
            if s.active:
                b.drop(s)
        else:
            s = b.pick(arg)
            check_pick(s, servers)
            if s is None:
                assert not any(ok(x) for x in servers)
            elif extra:
                b.take(s)
        # the algorithm's view always matches the servers' state
        assert b.algorithm.up == [x for x in servers if x.usable]


# ---------------------------------------------------------------------------------------------
# 9. backups


def backend(name: str = "roundrobin", allbackups: bool = False):
    actives = make_servers(1, 1, prefix="a")
    backups = make_servers(1, 1, prefix="b", backup=True)
    return actives, backups, Balancer(actives + backups, name, allbackups=allbackups)


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("allbackups", [False, True])
def test_backups_only_when_no_active_is_up(name, allbackups):
    (a1, a2), (b1, _), b = backend(name, allbackups)
    key_list = [None, *addresses(64)]

    def served() -> Counter[str]:
        return Counter(names(b.pick(k) for k in key_list for _ in range(4)))

    assert set(served()) <= {"a1", "a2"}
    b.set_state(a1, State.DOWN)
    assert set(served()) == {"a2"}
    b.set_state(a2, State.MAINT)
    if allbackups:
        if name == "first":
            assert set(served()) == {"b1"}
        else:
            assert set(served()) == {"b1", "b2"}  # they share
    else:
        assert set(served()) == {"b1"}  # the first usable backup gets everything
    b.set_state(b1, State.DOWN)
    assert set(served()) == {"b2"}
    b.set_state(b1, State.UP)
    b.set_state(a2, State.UP)
    assert set(served()) == {"a2"}  # an active is back: backups get nothing
    b.set_state(a1, State.UP)
    assert set(served()) <= {"a1", "a2"}


def test_allbackups_share_by_algorithm():
    (a1, a2), _, b = backend("roundrobin", allbackups=True)
    b.set_state(a1, State.DOWN)
    b.set_state(a2, State.DOWN)
    assert picks(b, 4) == ["b1", "b2", "b1", "b2"]


def test_backup_with_weight_zero_or_full_is_skipped():
    (a1, a2), (b1, b2), b = backend()
    b.set_state(a1, State.DOWN)
    b.set_state(a2, State.DOWN)
    b.set_weight(b1, 0)
    assert picks(b, 3) == ["b2"] * 3
    b.set_weight(b1, 1)
    b1.maxconn = 1
    b.take(b1)
    assert picks(b, 3) == ["b2"] * 3
    b2.maxconn = 1
    b.take(b2)
    assert b.pick() is None


def test_no_server_up_gives_none():
    (a1, a2), (b1, b2), b = backend()
    for s in (a1, a2, b1, b2):
        b.set_state(s, State.DOWN)
    assert b.pick() is None
    assert not b.any_up()


@pytest.mark.parametrize("name", BUILTINS)
def test_avoid_passes_over_avoided_server(name):
    servers = make_servers(1, 1, 1)
    b = Balancer(servers, name, rng=random.Random(1))
    for avoid in servers:
        for key in [None, *addresses(30)]:
            s = b.pick(key, avoid=avoid)
            assert s is not None
            assert s is not avoid
    # when the avoided server is the only usable one, it is still used
    b.set_state(servers[1], State.DOWN)
    b.set_state(servers[2], State.DOWN)
    assert b.pick(b"10.0.0.1", avoid=servers[0]) is servers[0]


def test_avoid_among_backups():
    (a1, a2), (b1, b2), b = backend()
    b.set_state(a1, State.DOWN)
    b.set_state(a2, State.DOWN)
    assert b.pick(avoid=b1) is b2
    b.set_state(b2, State.DOWN)
    assert b.pick(avoid=b1) is b1


# ---------------------------------------------------------------------------------------------
# 10. user algorithms


@pytest.fixture
def registry() -> Iterator[list[str]]:
    """Names registered by a test; removed afterwards so other tests see the builtins only."""
    added: list[str] = []
    before = dict(_REGISTRY)
    yield added
    for name in added:
        _REGISTRY.pop(name, None)
    assert before == _REGISTRY


def minimal_config(balance: str) -> dict:
    return {
        "frontends": {"main": {"bind": ["127.0.0.1:8080"], "default_backend": "main"}},
        "backends": {"main": {"balance": balance, "servers": [{"address": "127.0.0.1:8081"}]}},
    }


def test_register_user_algorithm(registry):
    class Newest(foobar_lb.Algorithm):
        def pick(self, key=None):
            for s in reversed(self.up):
                if not s.full:
                    return s
            return None

    name = "test-newest"
    assert name not in algorithm_names()
    with pytest.raises(foobar_lb.ConfigError):
        config_from_dict(minimal_config(name))

    assert register_algorithm(name, Newest) is Newest
    registry.append(name)
    assert name in algorithm_names()
    assert Newest.name == name

    servers = make_servers(1, 1, 1)
    b = Balancer(servers, name)
    assert isinstance(b.algorithm, Newest)
    assert b.pick() is servers[2]
    b.set_state(servers[2], State.DOWN)  # it is told, like the builtins
    assert b.pick() is servers[1]

    cfg = config_from_dict(minimal_config(name))
    assert cfg.backends["main"].balance == name


def test_register_rejects_non_algorithms(registry):
    class NotAnAlgorithm:
        def pick(self, key=None):
            return None

    before = algorithm_names()
    for bad in (NotAnAlgorithm, object, len, get_algorithm("roundrobin")([])):
        with pytest.raises(TypeError):
            register_algorithm("test-bad", bad)
    assert algorithm_names() == before


def test_register_rejects_empty_name(registry):
    class Fine(Algorithm):
        def pick(self, key=None):
            return None

    with pytest.raises(ValueError):
        register_algorithm("", Fine)
    assert "" not in _REGISTRY
