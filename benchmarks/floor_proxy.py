"""The floor: the least an HTTP/1.1 proxy (or, with --tcp, a TCP relay) in Python on uvloop and
httptools can do per request.

Rule: this is a measuring instrument, not a product. It parses requests and responses with
httptools, forwards each request with its own head rebuilt (Host kept, X-Forwarded-For added),
relays response bytes as they come and knows where each response ends; each client connection
gets its own server connection (round robin at connect), kept for its life. It has none of
foobar_lb's strictness, limits, timeouts, pools, retries or checks: its CPU per request is the
floor foobar_lb's figures are read against (`--targets ...,floor`). With --tcp it is a relay:
each read from one side written to the other, nothing else (no timeouts, no counters, no
half-close), which is what foobar_lb's TCP mode is read against.

    python -m benchmarks.floor_proxy [--tcp] PORT HOST:PORT [HOST:PORT ...]
"""

from __future__ import annotations

import asyncio
import itertools
import sys

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    """A server connection: what it sends goes to its client as it comes (--tcp: nothing more)."""

    def __init__(self, client: Leg):
        self.client = client

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.client.transport.write(data)

    def connection_lost(self, exc):
        self.client.transport.close()


class Server(Upstream):
    """HTTP: the response is parsed too (where it ends), as a proxy must."""

    def __init__(self, client: Client):
        super().__init__(client)
        self.parser = httptools.HttpResponseParser(self)

    def data_received(self, data):
        self.client.transport.write(data)
        self.parser.feed_data(data)


class Leg(asyncio.Protocol):
    """A client connection and its one server connection (round robin at connect); what it
    sends before that connection is up waits in `waiting`. --tcp: bytes relayed as they come."""

    upstream_class: type[Upstream] = Upstream

    def __init__(self, servers):
        self.servers = servers
        self.upstream = None
        self.waiting = []

    def connection_made(self, transport):
        self.transport = transport
        host, port = next(self.servers)
        asyncio.get_running_loop().create_task(self.connect(host, port))

    async def connect(self, host, port):
        _, self.upstream = await asyncio.get_running_loop().create_connection(
            lambda: self.upstream_class(self), host, port)
        self.upstream.transport.writelines(self.waiting)

    def send(self, data):
        if self.upstream is None:
            self.waiting.append(data)
        else:
            self.upstream.transport.write(data)

    data_received = send

    def connection_lost(self, exc):
        if self.upstream is not None:
            self.upstream.transport.close()


class Client(Leg):
    """HTTP: each request parsed, its head rebuilt (X-Forwarded-For added) and sent."""

    upstream_class = Server

    def __init__(self, servers):
        super().__init__(servers)
        self.parser = httptools.HttpRequestParser(self)

    def connection_made(self, transport):
        self.peer = transport.get_extra_info("peername")[0].encode()
        super().connection_made(transport)

    def data_received(self, data):
        self.parser.feed_data(data)

    def on_url(self, url):
        self.url = url
        self.headers = []

    def on_header(self, name, value):
        self.headers += (name, b": ", value, b"\r\n")

    def on_message_complete(self):
        self.send(b"".join([self.parser.get_method(), b" ", self.url, b" HTTP/1.1\r\n",
                            *self.headers, b"X-Forwarded-For: ", self.peer, b"\r\n\r\n"]))


async def main(port: int, servers: list[tuple[str, int]], tcp: bool = False) -> None:
    ring = itertools.cycle(servers)
    kind = Leg if tcp else Client
    srv = await asyncio.get_running_loop().create_server(lambda: kind(ring), "127.0.0.1", port,
                                                         backlog=4096)
    await srv.serve_forever()


if __name__ == "__main__":
    args = sys.argv[1:]
    tcp = args[:1] == ["--tcp"]
    args = args[1:] if tcp else args
    addrs = [(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in args[1:]]
    uvloop.run(main(int(args[0]), addrs, tcp))
