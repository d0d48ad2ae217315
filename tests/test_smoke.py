from support import ScriptedServer, http_get, lb_config, running_lb


async def test_round_robin_two_servers():
    async with ScriptedServer("a") as a, ScriptedServer("b") as b:
        async with running_lb(lb_config([a.address, b.address])) as lb:
            host, port = lb.address
            got = [(await http_get(host, port, "/x")).header("x-server") for _ in range(4)]
    assert got == ["a", "b", "a", "b"]
