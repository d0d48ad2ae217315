"""foobar_lb as a library: LoadBalancer built from a dict, a file or a Config, used as a fixture."""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from foobar_lb import ConfigError, ListenError, LoadBalancer, load_config, parse_config

from support import LOOPBACK, ScriptedServer, free_port, http_get


@pytest_asyncio.fixture
async def backend():
    async with ScriptedServer("app-1") as s:
        yield s


@pytest_asyncio.fixture
async def lb(backend):
    """The README's fixture example, verbatim in spirit: port 0, address read back."""
    balancer = LoadBalancer({
        "frontends": {"web": {"bind": ["127.0.0.1:0"], "default_backend": "app"}},
        "backends": {"app": {"servers": [{"name": "app-1", "address": backend.address}]}},
    })
    await balancer.start()
    yield balancer
    await balancer.stop()


async def test_fixture_gives_a_running_balancer_on_a_kernel_chosen_port(lb, backend):
    host, port = lb.address
    assert host == LOOPBACK and port > 0
    assert lb.addresses == {"web": [(host, port)]}
    assert lb.url() == f"http://{host}:{port}"
    resp = await http_get(host, port, "/hello")
    assert resp.status == 200 and resp.header("x-server") == "app-1"
    assert lb.server("app", "app-1").total == 1


async def test_built_from_a_file_and_from_a_config_object(tmp_path, backend):
    path = tmp_path / "foobar.toml"
    path.write_text(f"""
[frontends.www]
bind = ["127.0.0.1:0", "127.0.0.1:0"]
default_backend = "app"

[backends.app]
servers = [{{ name = "one", address = "{backend.address}" }}]
""")
    for source in (path, str(path), load_config(path), parse_config(path.read_text())):
        async with LoadBalancer(source) as lb:
            assert len(lb.addresses["www"]) == 2
            for host, port in lb.addresses["www"]:
                assert (await http_get(host, port)).status == 200


async def test_stop_closes_the_listeners():
    lb = LoadBalancer({"frontends": {"f": {"bind": "127.0.0.1:0", "default_backend": "b"}},
                       "backends": {"b": {"servers": [{"address": "127.0.0.1:9"}]}}})
    await lb.start()
    host, port = lb.address
    await lb.stop()
    with pytest.raises(OSError):
        await asyncio.open_connection(host, port)


async def test_bad_configuration_and_taken_port_raise_clear_errors():
    with pytest.raises(ConfigError, match=r"backends\.b\.servers\[0\]\.address"):
        LoadBalancer({"frontends": {"f": {"bind": "127.0.0.1:0", "default_backend": "b"}},
                      "backends": {"b": {"servers": [{"address": "nowhere"}]}}})
    port = free_port()
    with __import__("socket").socket() as taken:
        taken.bind((LOOPBACK, port))
        taken.listen()
        lb = LoadBalancer({"frontends": {"f": {"bind": f"127.0.0.1:{port}", "default_backend": "b"}},
                           "backends": {"b": {"servers": [{"address": "127.0.0.1:9"}]}}})
        with pytest.raises(ListenError, match="address already in use"):
            await lb.start()
    lb = LoadBalancer({"frontends": {"f": {"bind": "192.0.2.1:8080", "default_backend": "b"}},
                       "backends": {"b": {"servers": [{"address": "127.0.0.1:9"}]}}})
    with pytest.raises(ListenError, match="cannot assign requested address"):
        await lb.start()


def test_runs_on_plain_asyncio_too():
    """uvloop is used when importable; the plain asyncio loop works the same."""

    async def main():
        async with ScriptedServer("plain") as s, LoadBalancer({
            "frontends": {"f": {"bind": "127.0.0.1:0", "default_backend": "b"}},
            "backends": {"b": {"servers": [{"address": s.address}]}},
        }) as lb:
            assert not type(asyncio.get_running_loop()).__module__.startswith("uvloop")
            return [(await http_get(*lb.address, f"/{i}")).body for i in range(3)]

    assert asyncio.run(main()) == [b"plain GET /0\n", b"plain GET /1\n", b"plain GET /2\n"]
