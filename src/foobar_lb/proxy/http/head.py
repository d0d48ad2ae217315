"""Heads: what a request head becomes for the server, and what a response head becomes for the
client, as pure functions (h11's `_body_framing` in spirit).

Rules of this module:
- no I/O, no clock, no connection state: bytes and flags in, bytes and a decision out, so each
  rule is unit-tested without sockets;
- a request is refused here with the status the client gets (`HeadError`), before any byte of
  it can reach a server: conflicting or malformed framing, a Host that is missing, repeated,
  empty or contradicts an absolute-form target, names with `_` that would normalise to a framing
  or hop-by-hop field, `h2c` upgrades, CONNECT (this is not a forward proxy), and `*` targets for
  other methods than OPTIONS; llhttp (through httptools) has refused bare CR/LF, control bytes,
  bad names, obs-fold and bad Content-Length values before we are called;
- hop-by-hop fields go (RFC 9110 section 7.6.1, with the ones `Connection` names), ours are
  written: framing, X-Forwarded-For/Proto, the header rules' lines;
- the response's body framing towards the client is decided in one place, `response_framing`.
"""

from __future__ import annotations

import re
from http import HTTPStatus

import httptools

__all__ = [
    "CHUNK",
    "CHUNK_END",
    "ERR_CLOSE",
    "ERR_KEEP",
    "NO_BODY",
    "PASS",
    "RAW",
    "STATUS_LINES",
    "UNTIL_CLOSE",
    "HeadError",
    "error_response",
    "good_host",
    "request_head",
    "request_target",
    "response_framing",
    "response_head",
    "tokens",
]

TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
# a Host value: a reg-name or IP literal, an optional port; no list, no whitespace inside
_HOST_VALUE = re.compile(rb"[ \t]*(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+;=%]*)(?::[0-9]*)?[ \t]*")
_GOOD_HOSTS: set[bytes] = set()  # Host values that passed (a memo: the same few come again)
CRLF = b"\r\n"
CHUNK_END = b"0\r\n\r\n"
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
# Hop-by-hop fields (RFC 9110 7.6.1) and framing we redo ourselves; any Proxy-* goes too.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
     b"proxy-connection"})
# names that a `_` spelling must never smuggle past a server that normalises names (`_` read
# as `-`, or dropped): compared with every `_` and `-` taken out
_GUARDED = HOP_BY_HOP | {b"content-length", b"host", b"expect"}
_GUARDED_BARE = frozenset(n.replace(b"-", b"") for n in _GUARDED)

# how a response body goes to the client: no body; as it comes (content-length); chunked by us
# (the server's close ends it); as it comes, ended by our close (HTTP/1.0 clients); the server's
# chunked encoding relayed byte for byte (trailers included)
NO_BODY, PASS, CHUNK, UNTIL_CLOSE, RAW = range(5)


class HeadError(Exception):
    """The request is refused with `status` (and the connection closed)."""

    def __init__(self, status: int, why: str = ""):
        super().__init__(status, why)
        self.status = status
        self.why = why


def good_host(value: bytes) -> bool:
    """Whether a Host value is valid (a reg-name or IP literal, an optional port); the valid
    ones are remembered, so that the same few values cost a set lookup next time."""
    if not value.strip() or not _HOST_VALUE.fullmatch(value):
        return False
    if len(_GOOD_HOSTS) >= 4096:
        _GOOD_HOSTS.clear()
    _GOOD_HOSTS.add(value)
    return True


def tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


# what a request field means to us (looked up by lower-case name)
_H_HOST, _H_CONNECTION, _H_TE, _H_EXPECT, _H_UPGRADE, _H_CL, _H_H2, _H_RID = range(8)
_SPECIAL = {
    b"host": _H_HOST,
    b"connection": _H_CONNECTION,
    b"transfer-encoding": _H_TE,
    b"expect": _H_EXPECT,
    b"upgrade": _H_UPGRADE,
    b"content-length": _H_CL,
    b"http2-settings": _H_H2,
    b"x-request-id": _H_RID,
}
# a client's X-Request-ID is kept when it is one field of 1 to 128 of these characters
VALID_RID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
_CONN_PLAIN = (b"close", b"keep-alive", b"upgrade")


def request_target(url: bytes, host_field: bytes | None) -> tuple[bytes | None, bytes, bytes | None]:
    """(host for routing, lower case without port; path; the authority of an absolute-form
    target, or None). An absolute-form target whose authority differs from the Host field is
    refused (RFC 9112 3.2.2: the target's authority is the one)."""
    authority = None
    if url[:1] == b"/" or url == b"*":
        q = url.find(b"?")
        path = url if q < 0 else url[:q]
        host = host_field
    else:
        try:
            parsed = httptools.parse_url(url)
        except httptools.HttpParserInvalidURLError:
            raise HeadError(400, "invalid request target") from None
        if not parsed.host or parsed.schema not in (b"http", b"https"):
            raise HeadError(400, "invalid request target")
        authority = parsed.host if parsed.port is None else b"%s:%d" % (parsed.host, parsed.port)
        if parsed.host[:1] != b"[" and b":" in parsed.host:
            authority = b"[%s]" % authority
        path = parsed.path or b"/"
        host = authority
        if host_field is not None and host_field.lower() != authority.lower():
            raise HeadError(400, "Host differs from the request target")
    if host is not None:
        host = host.lower()
        if host[:1] == b"[":
            host = host[: host.find(b"]") + 1]
        else:
            colon = host.rfind(b":")
            if colon >= 0:
                host = host[:colon]
    return host, path, authority


def request_head(method: bytes, url: bytes, http11: bool, fields: list[tuple[bytes, bytes]],
                 upgrade_flag: bool, route, authority: bytes | None,
                 xff_ip: bytes | None,
                 rid: bytes | None = None) -> tuple[bytes, bool, bool, bool, bool, bool]:
    """The head sent to the server for a request llhttp accepted, or HeadError.

    `route`: the frontend/backend pair's precomputed route (`frontend.Route`: fields to drop,
    lines to add, limits). `authority`: the target's, for an absolute-form request (it becomes
    the Host). `xff_ip`: the client address to append to X-Forwarded-For (None: the field is
    passed on as it came, if at all). `rid`: a fresh request id: the head gets
    `X-Request-ID: rid`, or the client's own when it sent one valid field (`VALID_RID`); a
    client's X-Request-ID fields are never passed on as they came.

    Returns (head, chunked, body, upgrade, needs_host, expect_continue): the head ends with its
    empty line; `body`: a body follows (chunked, or a content-length above 0); `upgrade`: a
    valid upgrade request; `needs_host`: HTTP/1.0 without Host (the server's address is added);
    `expect_continue`: the client waits for 100 Continue (which the proxy sends itself: the
    Expect field is not passed on, since the body is buffered before a server is engaged)."""
    if method == b"CONNECT":
        raise HeadError(501, "CONNECT")
    if url == b"*" and method != b"OPTIONS":
        raise HeadError(400, "asterisk-form target without OPTIONS")
    if len(fields) > route.max_headers:
        raise HeadError(431, "too many fields")
    plan = route
    xff_low = route.xff_low
    size = len(url)
    drop = plan.req_drop
    nhost = 0
    host_value = None
    conn_tokens = None
    te = None
    nte = 0
    expect = None
    upgrade = None
    xff = None
    cl = None
    nrid = 0  # (their_rid: set with it)
    parts = [method, b" ", url, b" HTTP/1.1\r\n"]
    special = _SPECIAL
    for name, value in fields:
        size += len(name) + len(value) + 4
        low = name.lower()
        kind = special.get(low)
        if kind is not None:
            if kind == _H_HOST:
                nhost += 1
                host_value = value
                if authority is not None:
                    continue  # replaced by the target's authority below
            elif kind == _H_CONNECTION:
                conn_tokens = tokens(value) + (conn_tokens or [])
                continue
            elif kind == _H_TE:
                te = value if te is None else te + b"," + value
                nte += 1
                continue
            elif kind == _H_EXPECT:
                expect = value.strip().lower()
                continue
            elif kind == _H_UPGRADE:
                upgrade = value.strip()
                continue
            elif kind == _H_H2:
                raise HeadError(400, "HTTP2-Settings (h2c upgrade)")
            elif kind == _H_RID:
                their_rid = value
                nrid += 1
                continue
            else:  # content-length: llhttp refused bad values, duplicates and CL with TE
                cl = value
        elif low == xff_low:
            v = value.strip()
            xff = v if xff is None else xff + b", " + v
            continue
        elif b"_" in low:
            bare = low.replace(b"_", b"").replace(b"-", b"")
            if bare in _GUARDED_BARE or bare[:5] == b"proxy":
                raise HeadError(400, "a field name with _ for a framing or hop-by-hop field")
            if route.reject_underscore:
                raise HeadError(400, "a field name with _")
            if low in drop:
                continue
        elif low in drop or low[:6] == b"proxy-":
            continue
        parts += (name, b": ", value, CRLF)

    if size > route.max_header_size:
        raise HeadError(431, "head too large")
    if nhost > 1 or (http11 and nhost == 0):  # RFC 9112 3.2, absolute-form included
        raise HeadError(400, "missing or repeated Host")
    if nhost and host_value not in _GOOD_HOSTS and not good_host(host_value):
        raise HeadError(400, "empty or invalid Host")
    chunked = False
    if te is not None:
        if not http11:
            raise HeadError(400, "Transfer-Encoding in HTTP/1.0")
        codings = [t.strip().lower() for t in te.split(b",")]
        if nte == 1 and codings == [b"chunked"]:
            chunked = True
        elif nte == 1 and len(codings) == 1 and TOKEN.fullmatch(codings[0]):
            raise HeadError(501, "unknown transfer coding")
        else:
            raise HeadError(400, "Transfer-Encoding other than a single chunked")
    if cl is not None and route.max_body and int(cl) > route.max_body:
        raise HeadError(413, "body too large")
    if conn_tokens:
        extra = [t for t in conn_tokens if t not in _CONN_PLAIN]
        if extra:  # rare: Connection names more fields to drop; start over without them
            if any(t in _GUARDED for t in extra):
                raise HeadError(400, "Connection names a framing field")
            del parts[4:]
            for name, value in fields:
                low = name.lower()
                kind = special.get(low)
                if (kind is not None and kind != _H_HOST and kind != _H_CL) or (
                        kind == _H_HOST and authority is not None) or low == xff_low or (
                        low in drop or low[:6] == b"proxy-" or low in extra):
                    continue
                parts += (name, b": ", value, CRLF)
    expect_continue = False
    if expect is not None and http11:  # HTTP/1.0 clients do not wait for 100 Continue
        if expect != b"100-continue":
            raise HeadError(417, "unknown expectation")
        expect_continue = True  # answered by the proxy itself, never passed on
    if authority is not None:
        parts += (b"host: ", authority, CRLF)
    if chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    is_upgrade = False
    if upgrade_flag and upgrade is not None and conn_tokens and b"upgrade" in conn_tokens:
        if b"h2c" in tokens(upgrade):
            raise HeadError(400, "Upgrade: h2c")
        is_upgrade = True
        parts += (b"connection: upgrade\r\nupgrade: ", upgrade, CRLF)
    elif upgrade is not None and b"h2c" in tokens(upgrade):
        raise HeadError(400, "Upgrade: h2c")
    if xff_ip is not None:
        parts += (route.xff, b": ", xff_ip if xff is None else xff + b", " + xff_ip, CRLF)
    elif xff is not None:
        parts += (route.xff, b": ", xff, CRLF)
    if nrid == 1 and VALID_RID.fullmatch(their_rid):
        rid = their_rid
    if rid is not None:  # (where the simple path writes it too: client.HttpSession._simple)
        parts += (b"X-Request-ID: ", rid, CRLF)
    parts.append(route.req_add)  # x-forwarded-proto and the header rules' lines, then CRLF
    return (b"".join(parts), chunked, chunked or (cl is not None and cl.strip() != b"0"),
            is_upgrade, nhost == 0 and authority is None, expect_continue)


def response_framing(status: int, is_head: bool, http11: bool, te_chunked: bool,
                     has_cl: bool) -> tuple[int, bool]:
    """How a final response's body goes to the client, and whether the server's close ends it:
    (mode, eof_ends)."""
    if is_head or status == 204 or status == 304 or 100 <= status < 200:
        return NO_BODY, False
    if te_chunked:
        return (RAW if http11 else UNTIL_CLOSE), False
    if has_cl:
        return PASS, False
    # delimited by the server's close: chunked for an HTTP/1.1 client, so that a truncation
    # stays visible; an HTTP/1.0 client learns the end from our close
    return (CHUNK if http11 else UNTIL_CLOSE), True


_PLAIN_CONNECTION = (b"close", b"keep-alive", b"upgrade")


def _field_lines(names: list[bytes]) -> re.Pattern[bytes]:
    """A pattern matching whole field lines ("Name: value" CRLF) for any of `names`."""
    alt = b"|".join(re.escape(n) for n in names)
    return re.compile(rb"^(" + alt + rb")[ \t]*:([^\r\n]*)\r\n", re.IGNORECASE | re.MULTILINE)


def response_head(rx: bytes, start: int, end: int, status: int, route, is_head: bool,
                  http11: bool, keep_client: bool | None) -> tuple[bytes, int, bool]:
    """The head the client gets for a server's response head that llhttp accepted, found in
    `rx` from `start` to its empty line at `end`: our status line, the server's fields minus
    the hop-by-hop ones (with those `Connection` names) and the route's deletions, our framing
    and `Connection`, the route's additions. `keep_client`: whether the client connection stays
    open; None for an interim (1xx) or 101 head, which has no body. Returns (head, mode,
    eof_ends), the last two from `response_framing`; HeadError(502) for a head over the limits.
    """
    line = rx.find(b"\r\n", start) + 2  # the fields start after the status line
    fields = rx[line:end + 2]  # each field line ends with CRLF
    n = len(fields)
    # (a field line takes at least 4 bytes: only a long head may have too many of them)
    if n + line - start > route.max_header_size or (
            n > 4 * route.max_headers and fields.count(b"\n") > route.max_headers):
        raise HeadError(502, "response head too large")
    cl = te = False
    # the lines to cut or read: each found as (line, name) in the lower-cased fields after a
    # leading newline; found at `a` there, a line starts at `a` here
    low = b"\n" + fields.lower()
    kept = None
    odd = False  # a Connection or Upgrade line to read
    pos = 0
    for ln, name in route.resp_scan.findall(low):
        if name == b"content-length":
            cl = True
            continue
        a = low.find(b"\n" + ln, pos)
        if kept is None:
            kept = [fields[:a]]
        elif a > pos:
            kept.append(fields[pos:a])
        pos = a + len(ln) + 2
        if ln in _PLAIN_CONNECTION_LINES:
            continue
        if name == b"transfer-encoding":
            te = ln.rstrip().endswith(b"chunked")
        elif name == b"connection" or name == b"upgrade":
            kept.append((name, fields[a:pos - 2]))  # (read below, and cut)
            odd = True
    if kept is not None:
        kept.append(fields[pos:])
        fields = _rest(kept) if odd else b"".join(kept)
    status_line = STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status
    if status == 101:
        return status_line + fields + _upgrade_lines(kept) + route.resp_add, NO_BODY, False
    if keep_client is None:  # an interim head
        return status_line + fields + route.resp_add, NO_BODY, False
    mode, eof_ends = response_framing(status, is_head, http11, te, cl)
    if mode == PASS and keep_client and http11:  # the commonest case
        return b"".join((status_line, fields, route.resp_add)), mode, eof_ends
    ours = b"transfer-encoding: chunked\r\n" if mode in (CHUNK, RAW) else b""
    if not keep_client or mode == UNTIL_CLOSE:
        ours += b"connection: close\r\n"
    elif not http11:
        ours += b"connection: keep-alive\r\n"
    return b"".join((status_line, fields, ours, route.resp_add)), mode, eof_ends


# the usual Connection lines, lower-cased (nothing to read in them: they are just cut)
_PLAIN_CONNECTION_LINES = frozenset(
    b"connection:" + sp + v + tail for sp in (b"", b" ") for v in (b"keep-alive", b"close")
    for tail in (b"", b" "))


def _rest(kept: list) -> bytes:
    """The kept field lines, joined; Connection values name more lines to cut (rare)."""
    extra = []
    lines = []
    for part in kept:
        if isinstance(part, tuple):
            name, whole = part
            if name == b"connection":
                value = whole[whole.index(b":") + 1:].strip()
                extra += [t for t in tokens(value) if t not in _PLAIN_CONNECTION]
        else:
            lines.append(part)
    fields = b"".join(lines)
    if not extra:
        return fields
    out = []
    pos = 0
    for m in _field_lines(extra).finditer(fields):
        out.append(fields[pos:m.start()])
        pos = m.end()
    out.append(fields[pos:])
    return b"".join(out)


def _upgrade_lines(kept: list | None) -> bytes:
    """Ours for a 101 response: the protocol the server switched to."""
    upgrade = b""
    for part in kept or ():
        if isinstance(part, tuple) and part[0] == b"upgrade":
            whole = part[1]
            upgrade = whole[whole.index(b":") + 1:].strip()
    return b"connection: upgrade\r\nupgrade: " + (upgrade or b"websocket") + CRLF


# ---------------------------------------------------------------------------------------------
# The proxy's own answers

_ERROR_TEXT = {
    400: "Your browser sent an invalid request.",
    408: "Your browser didn't send a complete request in time.",
    413: "The request body is larger than this server accepts.",
    414: "The request URI is too long.",
    417: "The expectation given in the Expect header cannot be met.",
    431: "The request header fields are too large.",
    500: "An internal error occurred.",
    501: "The request uses a method or transfer coding this server does not implement.",
    502: "The server returned an invalid or incomplete response.",
    503: "No server is available to handle this request.",
    504: "The server didn't respond in time.",
    505: "Only HTTP/1.0 and HTTP/1.1 are served here.",
}


def error_response(status: int, keep_alive: bool = False) -> bytes:
    """The proxy's own short answer, HAProxy style."""
    phrase = HTTPStatus(status).phrase
    body = (f"<html><body><h1>{status} {phrase}</h1>\n{_ERROR_TEXT.get(status, phrase)}\n"
            "</body></html>\n").encode()
    conn = b"keep-alive" if keep_alive else b"close"
    return (
        b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\ncache-control: no-cache\r\n"
        b"content-type: text/html\r\nconnection: %s\r\n\r\n%s"
        % (status, phrase.encode(), len(body), conn, body)
    )


ERR_CLOSE = {s: error_response(s) for s in _ERROR_TEXT}
ERR_KEEP = {s: error_response(s, True) for s in (502, 503, 504)}
STATUS_LINES = {
    int(s): b"HTTP/1.1 %d %s\r\n" % (int(s), s.phrase.encode()) for s in HTTPStatus
}
