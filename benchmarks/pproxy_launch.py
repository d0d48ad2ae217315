"""Start pproxy with an event loop already set, so that it starts at all.

Rule: this module only prepares the event loop and then hands every argument to pproxy's own
``main`` unchanged; it never changes what pproxy does with a connection.

Why it exists: pproxy 2.7.9 calls ``uvloop.install()`` when uvloop is importable and then
``asyncio.get_event_loop()`` with no loop set, which uvloop 0.23 refuses ("There is no current
event loop"), so ``pproxy ...`` dies at start-up. Here the loop is created and set first, and
pproxy's own ``uvloop.install()`` (which would replace the policy and lose that loop) is made a
no-op.

    python -m benchmarks.pproxy_launch [--loop=uvloop|asyncio] PPROXY-ARGS...

``--loop=uvloop`` (the default when uvloop is importable) gives pproxy the loop it would choose
itself; ``--loop=asyncio`` gives it a plain asyncio loop (and hides uvloop from it).
"""

from __future__ import annotations

import asyncio
import sys


def _set_loop(kind: str) -> str:
    """Create and set the event loop pproxy will find; return the kind actually used."""
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            kind = "asyncio"
        else:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            asyncio.set_event_loop(asyncio.new_event_loop())
            uvloop.install = lambda: None  # pproxy calls it; the policy above is already in place
            return "uvloop"
    sys.modules["uvloop"] = None  # type: ignore[assignment]  # pproxy's `import uvloop` now fails
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())
    return kind


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    kind = "uvloop"
    if args and args[0].startswith("--loop="):
        kind = args.pop(0).split("=", 1)[1]
        if kind not in ("uvloop", "asyncio"):
            sys.exit(f"pproxy_launch: --loop must be uvloop or asyncio, not {kind!r}")
    used = _set_loop(kind)
    print(f"pproxy_launch: event loop {used}", flush=True)
    from pproxy.server import main as pproxy_main

    pproxy_main(args)


if __name__ == "__main__":
    main()
