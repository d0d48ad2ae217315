"""The test helpers read the proxy's output with h11, an independent parser, and fail loudly.

A helper that swallowed a parse error, or tidied a header value, would let a broken proxy pass
every test that uses it; these tests hold the helpers to what they promise.
"""

from __future__ import annotations

import asyncio

import pytest

from support import (
    HttpParseError,
    ScriptedServer,
    complete_responses,
    parse_cut_responses,
    parse_responses,
    raw_exchange,
)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def test_responses_are_read_with_every_field_exactly_as_sent():
    data = (b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nX-A:  two  spaces \r\nx-b:\tv\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-T: t \r\n\r\n" + OK)
    got = parse_responses(data)
    assert [(r.status, r.version, r.body) for r in got] == [
        (100, "1.1", b""), (200, "1.1", b"hello"), (200, "1.1", b"ok")]
    # the separator after the colon goes, every other byte stays (trailing spaces included)
    assert got[1].headers == [("X-A", "two  spaces "), ("x-b", "v"), ("Transfer-Encoding", "chunked")]
    assert got[1].trailers == [("X-T", "t ")]


def test_a_head_response_has_no_body_when_the_method_is_known():
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
    got = parse_responses(head + OK, ["HEAD", "GET"])
    assert [(r.status, r.header("content-length"), r.body) for r in got] == [
        (200, "5", b""), (200, "2", b"ok")]
    # read as the answer to a GET, the next response's first bytes become this one's body
    with pytest.raises(HttpParseError, match="illegal status line"):
        parse_responses(head + OK)


@pytest.mark.parametrize("data", [
    pytest.param(b"GARBAGE\r\n\r\n", id="not-http"),
    pytest.param(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", id="bare-lf"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n continued\r\nContent-Length: 0\r\n\r\n", id="obs-fold"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", id="two-lengths"),
    pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad-chunk-size"),
    pytest.param(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok" + OK,
                 id="bytes-after-close"),
    pytest.param(OK + b"junk", id="junk-after-a-response"),
])
def test_bytes_that_are_not_http_fail_every_parser(data):
    with pytest.raises(HttpParseError):
        parse_responses(data)
    with pytest.raises(HttpParseError):
        parse_cut_responses(data)
    if not data.endswith(b"junk"):  # (more may come of a partial line: it may yet be a head)
        with pytest.raises(HttpParseError):
            complete_responses(data)


def test_a_response_cut_short_fails_unless_the_test_expects_it():
    data = OK + b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nonly"
    assert [r.body for r in complete_responses(data)] == [b"ok"]  # more may come
    with pytest.raises(HttpParseError, match="response 2 was cut short"):
        parse_responses(data)
    done, cut = parse_cut_responses(data)
    assert [r.body for r in done] == [b"ok"]
    assert (cut.status, cut.body) == (200, b"only")
    # a chunked body without its last chunk is cut short too; a close-delimited one is whole
    assert parse_cut_responses(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n")[1].body \
        == b"ab"
    assert parse_responses(b"HTTP/1.1 200 OK\r\n\r\nuntil the close")[0].body == b"until the close"


async def test_a_scripted_server_fails_the_test_on_a_request_that_is_not_http():
    srv = ScriptedServer("s")
    async with srv:
        await raw_exchange(*srv.address.split(":"), b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=0.3)
        await raw_exchange(*srv.address.split(":"), b"GET / HTTP/1.1\r\nNo colon\r\n\r\n", timeout=1)
        assert len(srv.requests) == 1
        assert len(srv.parse_errors) == 1
        with pytest.raises(HttpParseError, match="received bytes that are not HTTP"):
            await srv.stop()
    async with ScriptedServer("g", expect_garbage=True) as garbage:
        await raw_exchange(*garbage.address.split(":"), b"\x00\x01\r\n\r\n", timeout=1)
        await asyncio.sleep(0)
        assert len(garbage.parse_errors) == 1  # recorded, and allowed


async def test_a_scripted_server_records_requests_exactly_as_sent():
    async with ScriptedServer("s") as srv:
        await raw_exchange(*srv.address.split(":"), [
            b"POST /p HTTP/1.1\r\nHost: x\r\nX-A: v \r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-T:  t\r\n\r\n"
            b"GET /2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"])
    assert [(r.method, r.url, r.body, r.chunked) for r in srv.requests] == [
        ("POST", "/p", b"abc", True), ("GET", "/2", b"", False)]
    assert srv.requests[0].headers == [("Host", "x"), ("X-A", "v "), ("Transfer-Encoding", "chunked")]
    assert srv.requests[0].trailers == [("X-T", "t")]
    assert srv.requests[0].conn_id == srv.requests[1].conn_id == 1
