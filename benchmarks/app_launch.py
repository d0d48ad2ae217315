"""Start a foobar_app server that also counts the connections it accepts, for the runner.

Rule: this module only counts and answers the count; every argument goes to foobar_app's own
``main`` unchanged and every request is handled by foobar_app as it would be without it. The
count is what nginx's stub_status ``accepts`` is for the nginx backends: every connection the
server accepted since it started, the reading's own included, answered as plain text on
``GET /__bench_accepts`` (a path foobar_app does not have, asked directly, never through a
proxy), so the runner knows how many server connections a proxy opened during a run.

    python -m benchmarks.app_launch serve --name ... --bind ... --db ...
"""

from __future__ import annotations

import sys

ACCEPTS_PATH = "/__bench_accepts"


def main(argv: list[str]) -> int:
    from aiohttp import web, web_server

    import foobar_app.cli as cli

    accepted = 0
    factory = web_server.Server.__call__  # aiohttp calls it once per accepted connection

    def counting_factory(self):
        nonlocal accepted
        accepted += 1
        return factory(self)

    async def accepts(request: web.Request) -> web.Response:
        return web.Response(text=f"{accepted}\n")

    make_app = cli.make_app

    def make_counted_app(*args, **kwargs):
        app = make_app(*args, **kwargs)
        app.router.add_get(ACCEPTS_PATH, accepts)
        return app

    web_server.Server.__call__ = counting_factory
    cli.make_app = make_counted_app
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
