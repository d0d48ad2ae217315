"""Shared test configuration: tests run on uvloop, as the product does in production."""

from __future__ import annotations

from foobar_lb import new_event_loop


def pytest_asyncio_loop_factories(config, item):
    return {"uvloop": new_event_loop}
