"""HTTP/1.x proxying: one Protocol per client connection (`client.py`), one per server
connection (`server.py`), one object per request/response (`exchange.py`), and the pure head
functions both use (`head.py`).

Rule of this package: bytes are parsed by httptools (llhttp) only, decided upon by the pure
functions of `head.py`, and moved by the Protocols; nothing here picks servers (that is the
backend's `assign`) or binds sockets.
"""

from .client import HttpSession
from .head import error_response
from .server import UpstreamHttp

__all__ = ["HttpSession", "UpstreamHttp", "error_response"]
