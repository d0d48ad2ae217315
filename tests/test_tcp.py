"""TCP mode: bytes relayed both ways over real loopback sockets, one server per connection.

The backends are small asyncio servers written here; one test puts the proxy in front of a
throwaway MariaDB server (a one-node `cluster up`), a protocol where the server speaks first.
Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest

from foobar_app.db.cluster import MariaDBMissing, cluster_down, cluster_up
from foobar_app.db.mysql import parse_mysql_dsn

from support import LOOPBACK, free_port, lb_config, running_lb

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

STEP = 5.0  # bound on any single network wait


# ---------------------------------------------------------------------------------------------
# Backends and clients


@contextlib.asynccontextmanager
async def backend(handler: Handler, *, port: int = 0, sock: socket.socket | None = None
                  ) -> AsyncIterator[str]:
    """A stream server on loopback running `handler` per connection; yields "host:port".

    On exit the listener is closed and every connection still open is aborted.
    """
    writers: set[asyncio.StreamWriter] = set()
    tasks: set[asyncio.Task] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.add(writer)
        tasks.add(asyncio.current_task())
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # cancelled at the end of the test: a leaf task, nothing waits on it
        finally:
            writers.discard(writer)
            tasks.discard(asyncio.current_task())
            writer.close()

    if sock is not None:
        server = await asyncio.start_server(serve, sock=sock)
    else:
        server = await asyncio.start_server(serve, LOOPBACK, port)
    bound = server.sockets[0].getsockname()[1]
    try:
        yield f"{LOOPBACK}:{bound}"
    finally:
        server.close()
        for w in list(writers):
            w.transport.abort()
        for t in list(tasks):
            t.cancel()
        await asyncio.sleep(0)


def greeter(name: bytes) -> Handler:
    """Sends `name` + newline on accept, without waiting for the client, then closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(name + b"\n")
        await writer.drain()

    return handler


async def read_all(reader: asyncio.StreamReader, timeout: float = STEP) -> bytes:
    """Everything until EOF (a reset counts as the end), within `timeout`."""
    chunks = []
    async with asyncio.timeout(timeout):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


async def connect(lb) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = lb.address
    async with asyncio.timeout(STEP):
        return await asyncio.open_connection(host, port)


def tcp_config(servers: list[str], **backend: object) -> dict:
    return lb_config(servers, mode="tcp", backend=backend or None)


async def wait_for(cond: Callable[[], bool], timeout: float = STEP) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------------------
# a. A real MariaDB client session through the proxy


@pytest.fixture(scope="session")
def mariadb(tmp_path_factory) -> Iterator[dict]:
    """A lone MariaDB server (a cluster of a primary and no replica): its connect arguments."""
    d = tmp_path_factory.mktemp("tcp-mariadb")
    try:
        data = cluster_up(d, replicas=0)
    except MariaDBMissing as e:
        pytest.fail(f"{e} (the README's test command installs it)")
    try:
        yield parse_mysql_dsn(data["primary"])
    finally:
        cluster_down(d)


@pytest.mark.mariadb
async def test_mariadb_session_through_proxy(mariadb: dict):
    import aiomysql

    async with running_lb(tcp_config([f"{mariadb['host']}:{mariadb['port']}"])) as lb:
        host, port = lb.address
        async with asyncio.timeout(20):
            conn = await aiomysql.connect(host=host, port=port, user=mariadb["user"],
                                          password=mariadb["password"], db=mariadb["db"],
                                          connect_timeout=STEP, autocommit=True)
            try:
                async with conn.cursor() as cur:
                    await cur.execute("SELECT 1")
                    assert await cur.fetchall() == ((1,),)

                    # the session really is the server's, reached over TCP through the proxy
                    await cur.execute("SELECT CURRENT_USER(), DATABASE()")
                    assert await cur.fetchone() == (f"{mariadb['user']}@{mariadb['host']}",
                                                    mariadb["db"])

                    await cur.execute("CREATE TABLE t (id INT PRIMARY KEY, name VARCHAR(64), "
                                      "blob_col LONGBLOB)")
                    big = random.Random(1).randbytes(300_000)  # a row spread over many TCP segments
                    rows = [(1, "one", b"x"), (2, "two", big), (3, "three", b"")]
                    # blobs go as hex text: this PyMySQL refuses to escape bytes for aiomysql
                    await cur.executemany("INSERT INTO t VALUES (%s, %s, UNHEX(%s))",
                                          [(i, n, b.hex()) for i, n, b in rows])
                    assert cur.rowcount == 3
                    await cur.execute("SELECT id, name, blob_col FROM t ORDER BY id")
                    got = await cur.fetchall()
                    assert [(i, n, bytes(b)) for i, n, b in got] == rows
                    await cur.execute("SELECT COUNT(*), SUM(LENGTH(blob_col)) FROM t")
                    assert await cur.fetchone() == (3, 300_001)
                    await cur.execute("DROP TABLE t")
            finally:
                await conn.ensure_closed()
            # the proxy's connection to the server ended with the client's
            await wait_for(lambda: not lb.sessions)
        assert lb.server("app", "s1").total == 1


# ---------------------------------------------------------------------------------------------
# b. Large payloads both ways, unchanged, and backpressure


def small_buffers(sock: socket.socket, size: int = 65536) -> socket.socket:
    # fixed (not auto-tuned) kernel buffers on the test's own sockets, so what sits in flight
    # while the client does not read is mostly what the proxy holds
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
    return sock


async def test_large_payload_relayed_unchanged_with_backpressure():
    total = 32 * 1024 * 1024
    payload = random.Random(7).randbytes(total)
    echoed = 0  # bytes the echo server got written out (its drain returned)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal echoed
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
            echoed += len(chunk)
        writer.write_eof()

    listener = small_buffers(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    listener.bind((LOOPBACK, 0))  # accepted sockets inherit the buffer sizes
    async with backend(echo, sock=listener) as addr, running_lb(tcp_config([addr])) as lb:
        host, port = lb.address
        sock = small_buffers(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        sock.setblocking(False)
        async with asyncio.timeout(STEP):
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
        sent = 0

        async def send() -> None:
            nonlocal sent
            view = memoryview(payload)
            for i in range(0, total, 256 * 1024):
                writer.write(view[i:i + 256 * 1024])
                await writer.drain()
                sent = i + 256 * 1024
            writer.write_eof()

        sender = asyncio.create_task(send())
        try:
            # the client reads nothing: the echo server must get stuck long before the end,
            # because the proxy stops reading from it instead of buffering what it sends
            last, still_since = -1, 0.0
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(STEP):
                while True:
                    await asyncio.sleep(0.05)
                    if echoed != last:
                        last, still_since = echoed, loop.time()
                    elif echoed and loop.time() - still_since > 0.3:
                        break
            # (what is in flight then sits mostly in the kernel's auto-tuned buffers of the
            # proxy's sockets, about 5 MiB on Linux with default settings)
            assert 0 < echoed < total // 3, f"the echo server wrote {echoed} of {total} bytes"
            assert not sender.done() and sent < total // 2, "the client's writes should be held up too"
            (session,) = lb.sessions
            for t in (session.transport, session.up.transport):
                assert t.get_write_buffer_size() <= 1 << 20, "the proxy buffers too much"

            # now read: everything comes back, in order and intact
            got = bytearray()
            async with asyncio.timeout(20):
                while chunk := await reader.read(1 << 20):
                    got += chunk
                await sender
            assert len(got) == total
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            assert echoed == total
        finally:
            sender.cancel()
            writer.close()


# ---------------------------------------------------------------------------------------------
# c. Half-close


@pytest.mark.parametrize("early", [True, False], ids=["fin-before-server-connected", "fin-mid-session"])
async def test_client_half_close_passed_to_server(early: bool):
    """`early`: data and FIN sent at once, likely before the proxy reached the server (held,
    then passed on); otherwise only after a first exchange, on the established connection."""
    seen: list[bytes] = []
    server_saw_eof = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not early:
            seen.append(await reader.readexactly(5))
            writer.write(b"ack\n")
            await writer.drain()
        data = await read_all(reader)  # returns only at EOF: the client's FIN got through
        seen.append(data)
        server_saw_eof.set()
        await asyncio.sleep(0.1)  # a reply well after the FIN: the other way is still open
        writer.write(b"reply to " + data)
        await writer.drain()
        # the handler returns: the server closes

    async with backend(handler) as addr, running_lb(tcp_config([addr])) as lb:
        reader, writer = await connect(lb)
        try:
            if not early:
                writer.write(b"hello")
                async with asyncio.timeout(STEP):
                    assert await reader.readline() == b"ack\n"
            writer.write(b"request bytes")
            writer.write_eof()
            async with asyncio.timeout(STEP):
                await server_saw_eof.wait()
            assert seen == ([] if early else [b"hello"]) + [b"request bytes"]
            # the reply comes after the client's FIN, then the connection closes
            assert await read_all(reader) == b"reply to request bytes"
            assert reader.at_eof()
        finally:
            writer.close()
        await wait_for(lambda: not lb.sessions)


async def test_server_half_close_passed_to_client():
    got_from_client = asyncio.Event()
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner")
        await writer.drain()
        writer.write_eof()  # server done sending, still reading
        received.append(await read_all(reader))
        got_from_client.set()

    async with backend(handler) as addr, running_lb(tcp_config([addr])) as lb:
        reader, writer = await connect(lb)
        try:
            assert await read_all(reader) == b"banner"  # EOF reached the client
            writer.write(b"late data")
            await writer.drain()
            writer.write_eof()
            async with asyncio.timeout(STEP):
                await got_from_client.wait()
            assert received == [b"late data"]
        finally:
            writer.close()
        await wait_for(lambda: not lb.sessions)


# ---------------------------------------------------------------------------------------------
# d. The server speaks first


async def test_server_speaks_first():
    client_bytes: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hello from the server\r\n")
        await writer.drain()
        client_bytes.append(await reader.readline())
        writer.write(b"250 ok\r\n")
        await writer.drain()

    async with backend(handler) as addr, running_lb(tcp_config([addr])) as lb:
        reader, writer = await connect(lb)
        try:
            # nothing sent yet: the greeting must arrive on its own
            async with asyncio.timeout(2.0):
                assert await reader.readline() == b"220 hello from the server\r\n"
            assert client_bytes == []
            writer.write(b"HELO client\r\n")
            async with asyncio.timeout(STEP):
                assert await reader.readline() == b"250 ok\r\n"
            assert client_bytes == [b"HELO client\r\n"]
            assert await read_all(reader) == b""
        finally:
            writer.close()


async def test_relayed_bytes_are_counted_within_a_second_and_exactly_at_the_end():
    # a relayed read adds to its connection's count; the counters get it each second while
    # the connection is open, and the rest when it ends
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()

    async with backend(echo) as addr, running_lb(tcp_config([addr])) as lb:
        fe = lb.frontends["www"]
        srv = lb.server("app", "s1")

        def counted() -> tuple[int, int, int, int]:
            return (fe.ctr[fe.o_bin], fe.ctr[fe.o_bout], srv.ctr[srv.o_bin], srv.ctr[srv.o_bout])

        reader, writer = await connect(lb)
        try:
            writer.write(b"x" * 1000)
            async with asyncio.timeout(STEP):
                assert await reader.readexactly(1000) == b"x" * 1000
            await wait_for(lambda: counted() == (1000,) * 4, timeout=2.0)  # still open
            writer.write(b"y" * 234)
            async with asyncio.timeout(STEP):
                assert await reader.readexactly(234) == b"y" * 234
        finally:
            writer.close()
        await wait_for(lambda: not lb.sessions)
        assert counted() == (1234,) * 4


# ---------------------------------------------------------------------------------------------
# e. One server per connection, round robin


async def test_round_robin_one_server_per_connection():
    async with (backend(greeter(b"a")) as a, backend(greeter(b"b")) as b,
                running_lb(tcp_config([a, b])) as lb):
        names = []
        for _ in range(4):
            reader, writer = await connect(lb)
            try:
                names.append(await read_all(reader))
            finally:
                writer.close()
        assert names == [b"a\n", b"b\n", b"a\n", b"b\n"]
        assert lb.server("app", "s1").total == 2
        assert lb.server("app", "s2").total == 2


# ---------------------------------------------------------------------------------------------
# f. A server refusing connections: redispatch to another one


async def test_refused_server_redispatched_to_working_one():
    refused = f"{LOOPBACK}:{free_port()}"  # nothing listens there
    async with backend(greeter(b"ok")) as ok, running_lb(tcp_config([refused, ok])) as lb:
        for _ in range(6):
            reader, writer = await connect(lb)
            try:
                assert await read_all(reader) == b"ok\n"
            finally:
                writer.close()
        dead, alive = lb.server("app", "s1"), lb.server("app", "s2")
        assert dead.failures >= 3  # round robin kept offering it, every try was redispatched
        assert alive.total == 6
        await wait_for(lambda: dead.active == 0 and alive.active == 0)


# ---------------------------------------------------------------------------------------------
# g. Every server refusing: the client is closed, the proxy keeps running


async def test_all_servers_refuse_client_closed_proxy_keeps_running():
    ports = [free_port(), free_port()]
    config = tcp_config([f"{LOOPBACK}:{p}" for p in ports], retries=2)
    async with running_lb(config) as lb:
        loop = asyncio.get_running_loop()
        for _ in range(3):
            reader, writer = await connect(lb)
            try:
                t0 = loop.time()
                async with asyncio.timeout(STEP):
                    # a clean close (end of file), not a reset: read() raises on a reset
                    assert await reader.read(65536) == b""
                took = loop.time() - t0
                assert reader.at_eof()
                # three refused connects on loopback take milliseconds; the proxy must not wait
                # (for a retry delay, a connect timeout, a client timeout) before closing
                assert took < 0.5, took
            finally:
                writer.close()
        s1, s2 = lb.server("app", "s1"), lb.server("app", "s2")
        assert s1.failures + s2.failures == 3 * 3  # first try and two retries per connection
        await wait_for(lambda: not lb.sessions and s1.active == 0 and s2.active == 0)

        # still serving: once a server listens, connections get through
        async with backend(greeter(b"back"), port=ports[0]):
            reader, writer = await connect(lb)
            try:
                assert await read_all(reader) == b"back\n"
            finally:
                writer.close()
