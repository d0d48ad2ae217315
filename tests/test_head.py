"""The head functions, without sockets: what a request head becomes for the server (or the
status it is refused with), and how a response body is framed for the client."""

from __future__ import annotations

import pytest

from foobar_lb import config_from_dict
from foobar_lb.build import build
from foobar_lb.proxy.http.head import (
    CHUNK,
    NO_BODY,
    PASS,
    RAW,
    UNTIL_CLOSE,
    HeadError,
    request_head,
    request_target,
    response_framing,
)
from foobar_lb.shared import Counters, Layout


def route(**frontend):
    cfg = config_from_dict({
        "frontends": {"f": {"bind": "127.0.0.1:0", "default_backend": "b", **frontend}},
        "backends": {"b": {"servers": [{"address": "127.0.0.1:9"}]}}})
    return build(cfg, layout=Layout(), counters=Counters()).frontends["f"].routes["b"]


R = route()


def head(fields, method=b"GET", url=b"/", http11=True, upgrade=False, authority=None,
         xff_ip=b"10.0.0.1", r=R):
    return request_head(method, url, http11, fields, upgrade, r, authority, xff_ip)


def test_a_plain_get_keeps_its_fields_and_gets_ours():
    h, chunked, body, upgrade, needs_host, expect = head([(b"Host", b"a"), (b"Accept", b"*/*")])
    assert h == (b"GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n"
                 b"X-Forwarded-For: 10.0.0.1\r\nx-forwarded-proto: http\r\n\r\n")
    assert (chunked, body, upgrade, needs_host, expect) == (False, False, False, False, False)


def test_hop_by_hop_fields_go_and_connection_named_ones_too():
    h, *_ = head([(b"Host", b"a"), (b"Connection", b"keep-alive, X-Private"),
                  (b"X-Private", b"1"), (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"),
                  (b"Proxy-Authorization", b"x"), (b"X-Forwarded-For", b"1.2.3.4"),
                  (b"X-Forwarded-Proto", b"https"), (b"X-End", b"kept")])
    assert h == (b"GET / HTTP/1.1\r\nHost: a\r\nX-End: kept\r\n"
                 b"X-Forwarded-For: 1.2.3.4, 10.0.0.1\r\nx-forwarded-proto: http\r\n\r\n")


def test_framing_and_expect_and_upgrade_are_written_by_us():
    h, chunked, body, upgrade, _, expect = head(
        [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked"), (b"Expect", b"100-continue")],
        method=b"POST")
    assert (chunked, body, upgrade, expect) == (True, True, False, True)
    # (Expect is answered by the proxy itself, which buffers the body: not passed on)
    assert h == (b"POST / HTTP/1.1\r\nHost: a\r\n"
                 b"transfer-encoding: chunked\r\nX-Forwarded-For: 10.0.0.1\r\n"
                 b"x-forwarded-proto: http\r\n\r\n")
    h, chunked, body, upgrade, _, _ = head(
        [(b"Host", b"a"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")], upgrade=True)
    assert (chunked, body, upgrade) == (False, False, True)
    assert b"connection: upgrade\r\nupgrade: websocket\r\n" in h
    _, _, body, _, _, _ = head([(b"Host", b"a"), (b"Content-Length", b"0")], method=b"POST")
    assert body is False
    _, _, body, _, _, _ = head([(b"Host", b"a"), (b"Content-Length", b"3")], method=b"POST")
    assert body is True


def test_http10_without_host_gets_the_servers_address_added_later():
    h, _, _, _, needs_host, _ = head([], http11=False)
    assert needs_host is True
    assert h.startswith(b"GET / HTTP/1.1\r\n")


def test_absolute_form_carries_the_targets_authority_as_host():
    host, path, authority = request_target(b"http://API.test:8080/x?y=1", None)
    assert (host, path, authority) == (b"api.test", b"/x", b"API.test:8080")
    h, *_ = head([(b"Host", b"api.test:8080")], url=b"http://API.test:8080/x?y=1",
                 authority=authority)
    assert h.startswith(b"GET http://API.test:8080/x?y=1 HTTP/1.1\r\n")
    assert b"\r\nhost: API.test:8080\r\n" in h and b"Host: api.test" not in h
    with pytest.raises(HeadError) as e:
        request_target(b"http://api.test/x", b"other")
    assert e.value.status == 400
    assert request_target(b"/a/b?c", b"Example.COM:80") == (b"example.com", b"/a/b", None)
    assert request_target(b"/", b"[::1]:80") == (b"[::1]", b"/", None)


@pytest.mark.parametrize(("fields", "kw", "status"), [
    ([(b"Host", b"a"), (b"Transfer-Encoding", b"chunked, chunked")], {}, 400),
    ([(b"Host", b"a"), (b"Transfer-Encoding", b",chunked")], {}, 400),
    ([(b"Host", b"a"), (b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"chunked")],
     {}, 400),
    ([(b"Host", b"a"), (b"Transfer-Encoding", b"gzip, chunked")], {}, 400),
    ([(b"Host", b"a"), (b"Transfer-Encoding", b"gzip")], {}, 501),
    ([(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")], {"http11": False}, 400),
    ([(b"Host", b"a"), (b"Transfer_Encoding", b"chunked")], {}, 400),
    ([(b"Host", b"a"), (b"Content_Length", b"5")], {}, 400),
    ([(b"Host", b"a"), (b"Conn_ection", b"x")], {}, 400),  # "connection" with the _ dropped
    ([(b"Host", b"a"), (b"X_Conn", b"x")], {}, 200),  # no framing or hop-by-hop name
    ([(b"Host", b"a"), (b"Connect_ion", b"close")], {}, 400),
    ([(b"Ho_st", b"a"), (b"Host", b"a")], {}, 400),
    ([], {}, 400),
    ([(b"Host", b"a"), (b"Host", b"a")], {}, 400),
    ([(b"Host", b"")], {}, 400),
    ([(b"Host", b"a"), (b"Upgrade", b"h2c"), (b"Connection", b"Upgrade, HTTP2-Settings"),
      (b"HTTP2-Settings", b"AAMAAABkAAQAoAAAAAIAAAAA")], {"upgrade": True}, 400),
    ([(b"Host", b"a"), (b"Upgrade", b"h2c")], {}, 400),
    ([(b"Host", b"a"), (b"HTTP2-Settings", b"x")], {}, 400),
    ([(b"Host", b"a")], {"method": b"CONNECT", "url": b"a:443"}, 501),
    ([(b"Host", b"a")], {"url": b"*"}, 400),
    ([(b"Host", b"a")], {"method": b"OPTIONS", "url": b"*"}, 200),
    ([(b"Host", b"a"), (b"Expect", b"something")], {}, 417),
    ([(b"Host", b"a"), (b"Connection", b"close, Transfer-Encoding")], {}, 400),
])
def test_refusals(fields, kw, status):
    if status == 200:
        head(fields, **kw)
        return
    with pytest.raises(HeadError) as e:
        head(fields, **kw)
    assert e.value.status == status


def test_limits_and_underscore_rule():
    small = route(limits={"max_request_body": 10, "max_header_size": "64", "max_headers": 2})
    with pytest.raises(HeadError) as e:
        head([(b"Host", b"a"), (b"Content-Length", b"11")], method=b"POST", r=small)
    assert e.value.status == 413
    with pytest.raises(HeadError) as e:
        head([(b"Host", b"a"), (b"A", b"1"), (b"B", b"2")], r=small)
    assert e.value.status == 431
    with pytest.raises(HeadError) as e:
        head([(b"Host", b"a"), (b"X", b"y" * 60)], r=small)
    assert e.value.status == 431
    strict = route(reject_underscore_headers=True)
    head([(b"Host", b"a"), (b"X_Custom", b"1")])  # passes by default
    with pytest.raises(HeadError) as e:
        head([(b"Host", b"a"), (b"X_Custom", b"1")], r=strict)
    assert e.value.status == 400


@pytest.mark.parametrize(("args", "framing"), [
    ((200, False, True, False, True), (PASS, False)),
    ((200, False, True, True, False), (RAW, False)),
    ((200, False, False, True, False), (UNTIL_CLOSE, False)),
    ((200, False, True, False, False), (CHUNK, True)),
    ((200, False, False, False, False), (UNTIL_CLOSE, True)),
    ((200, True, True, False, True), (NO_BODY, False)),
    ((204, False, True, False, False), (NO_BODY, False)),
    ((304, False, True, False, True), (NO_BODY, False)),
])
def test_response_framing(args, framing):
    """(status, is_head, http11, te_chunked, has_cl) -> (mode, ended by the server's close)"""
    assert response_framing(*args) == framing
