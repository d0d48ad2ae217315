"""foobar_app: the aiohttp app servers behind foobar_lb, with a read/write-splitting database
layer (SQLite embedded by default)."""

from .app import make_app
from .db import Router, open_router

__all__ = ["Router", "make_app", "open_router"]
