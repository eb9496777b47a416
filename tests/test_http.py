"""HTTP/1.1 request heads and responses, with no sockets (fastws.http)."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastws import __version__
from fastws.http import (
    MAX_BODY,
    MAX_HEAD,
    HttpError,
    body_length,
    json_response,
    keep_alive,
    parse_head,
    response,
)


def refused(fn, *args) -> tuple[int, str]:
    with pytest.raises(HttpError) as info:
        fn(*args)
    return info.value.status, info.value.message


def split(answer: bytes) -> tuple[str, dict[str, str], bytes]:
    """(status line, headers, body) of one whole answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


# ------------------------------------------------------------------ parse_head


def test_a_request_head_and_where_its_body_starts() -> None:
    buf = (b"POST /api/publish?x=1 HTTP/1.1\r\nHost: a\r\nContent-Type:application/json\r\n"
           b"X-Empty:\r\nAuthorization: Bearer k: v \r\n\r\n{}")
    method, path, version, headers, start = parse_head(buf)
    assert (method, path, version) == ("POST", "/api/publish?x=1", "HTTP/1.1")
    assert headers == {"host": "a", "content-type": "application/json", "x-empty": "",
                       "authorization": "Bearer k: v"}
    assert buf[start:] == b"{}"


def test_a_repeated_header_keeps_its_last_value() -> None:
    _, _, _, headers, _ = parse_head(b"GET / HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    assert headers == {"x-a": "2"}


def test_an_incomplete_head_waits_for_more() -> None:
    assert parse_head(b"") is None
    assert parse_head(b"GET / HTTP/1.1\r\nHost: a\r\n") is None
    assert parse_head(b"GET / HTTP/1.1\r\n\r") is None
    assert parse_head(b"x" * MAX_HEAD) is None   # at the limit: still waiting


def test_a_head_over_the_limit_is_431() -> None:
    assert refused(parse_head, b"x" * (MAX_HEAD + 1)) == (431, "request head too large")
    big = b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD + b"\r\n\r\n"
    assert refused(parse_head, big) == (431, "request head too large")


@pytest.mark.parametrize("line", [
    b"GET /",                       # no version
    b"GET / HTTP/1.1 extra",        # four parts
    b"GET  / HTTP/1.1",             # two spaces
    b"GET / HTTP/2.0",              # not HTTP/1.x
    b"GET / http/1.1",
    b"\x16\x03\x01\x02\x00",        # a TLS ClientHello on the plain port
    b"",
])
def test_a_malformed_request_line_is_400(line: bytes) -> None:
    assert refused(parse_head, line + b"\r\nHost: a\r\n\r\n") == (400, "malformed request line")


def test_a_header_line_without_a_colon_is_400() -> None:
    buf = b"GET / HTTP/1.1\r\nHost a\r\n\r\n"
    assert refused(parse_head, buf) == (400, "malformed header")


def test_http_1_0_heads_parse() -> None:
    assert parse_head(b"GET /healthz HTTP/1.0\r\n\r\n") == ("GET", "/healthz", "HTTP/1.0", {}, 25)


HEAD_PARTS = st.sampled_from([b"GET / HTTP/1.1", b"POST /api/publish HTTP/1.0", b"\r\n",
                              b"\r\n\r\n", b"Host: a", b"Content-Length: 5", b":", b" ",
                              b"\xff\x00", b"Upgrade: websocket"])


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.one_of(HEAD_PARTS, st.binary(max_size=40)), max_size=12))
def test_any_bytes_give_a_head_none_or_an_http_error(parts: list[bytes]) -> None:
    buf = b"".join(parts)
    try:
        head = parse_head(buf)
    except HttpError as exc:
        assert exc.status in (400, 431)
        return
    if head is not None:
        method, path, version, headers, start = head
        assert version.startswith("HTTP/1.") and buf[start - 4:start] == b"\r\n\r\n"
        assert all(name == name.strip().lower() for name in headers)


# ------------------------------------------------------------------ body_length


def test_body_length() -> None:
    assert body_length({}) == 0
    assert body_length({"content-length": "12"}) == 12
    assert body_length({"content-length": " 7 "}) == 7    # int() takes the spaces
    assert body_length({"content-length": str(MAX_BODY)}) == MAX_BODY


@pytest.mark.parametrize("value", ["x", "", "1.5", "0x10", "1,2"])
def test_a_bad_content_length_is_400(value: str) -> None:
    assert refused(body_length, {"content-length": value}) == (400, "bad Content-Length")


@pytest.mark.parametrize("value", ["-1", str(MAX_BODY + 1), "99999999999"])
def test_a_body_too_large_or_negative_is_413(value: str) -> None:
    assert refused(body_length, {"content-length": value}) == (413, "body too large")


@pytest.mark.parametrize("headers", [
    {"transfer-encoding": "chunked"},
    {"transfer-encoding": "identity", "content-length": "3"},
    {"transfer-encoding": ""},
])
def test_any_transfer_encoding_is_400(headers: dict[str, str]) -> None:
    assert refused(body_length, headers) == (
        400, "Transfer-Encoding is not supported; send Content-Length")


def test_a_bad_content_length_is_reported_before_transfer_encoding() -> None:
    headers = {"content-length": "x", "transfer-encoding": "chunked"}
    assert refused(body_length, headers) == (400, "bad Content-Length")


# ------------------------------------------------------------------ keep_alive


@pytest.mark.parametrize(("version", "headers", "keep"), [
    ("HTTP/1.1", {}, True),
    ("HTTP/1.1", {"connection": "keep-alive"}, True),
    ("HTTP/1.1", {"connection": "close"}, False),
    ("HTTP/1.1", {"connection": "Close"}, False),
    ("HTTP/1.0", {}, False),
    ("HTTP/1.0", {"connection": "keep-alive"}, False),   # 1.0 is always closed
    ("HTTP/1.2", {}, False),
])
def test_keep_alive(version: str, headers: dict[str, str], keep: bool) -> None:
    assert keep_alive(version, headers) is keep


# ------------------------------------------------------------------ responses


def test_a_json_response() -> None:
    status, headers, body = split(json_response(200, {"offset": 1}))
    assert status == "HTTP/1.1 200 OK"
    assert headers == {"Content-Length": str(len(body)), "Server": f"fastws/{__version__}",
                       "Content-Type": "application/json"}
    assert orjson.loads(body) == {"offset": 1} and body.endswith(b"\n")


def test_extra_headers_override_the_content_type() -> None:
    status, headers, body = split(response(429, b"hi", {"Retry-After": "2",
                                                        "Content-Type": "text/plain"}))
    assert status == "HTTP/1.1 429 Too Many Requests"
    assert headers["Content-Type"] == "text/plain" and headers["Retry-After"] == "2"
    assert headers["Content-Length"] == "2" and body == b"hi"


def test_204_has_no_body_headers_and_unknown_statuses_get_a_reason() -> None:
    status, headers, body = split(response(204, b"", {"Allow": "GET"}))
    assert status == "HTTP/1.1 204 No Content" and body == b""
    assert headers == {"Server": f"fastws/{__version__}", "Allow": "GET"}
    assert split(response(418, b""))[0] == "HTTP/1.1 418 Status"
    assert split(response(431, b""))[0] == "HTTP/1.1 431 Request Header Fields Too Large"
