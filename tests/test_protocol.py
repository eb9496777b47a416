"""Protocol v1 parsing and reply bytes, with no sockets (fastws.protocol, fastws.channels)."""

from __future__ import annotations

import orjson
import pytest

from fastws import channels, protocol
from fastws.protocol import ProtocolError, Since, parse


def err(payload: bytes | str) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse(payload)
    return info.value


def test_subscribe_with_since() -> None:
    req = parse(b'{"id":1,"type":"subscribe","channel":"events:*",'
                b'"since":{"offset":41,"epoch":"e"}}')
    assert (req.id, req.type, req.channel) == (1, "subscribe", "events:*")
    assert req.since == Since(41, "e")


def test_requests_of_every_type() -> None:
    assert parse('{"type":"ping"}').id is None
    assert parse('{"id":3,"type":"publish","channel":"a:b","data":{"x":[1]}}').data == {"x": [1]}
    assert parse('{"id":4,"type":"history","channel":"a:b"}').limit == 100
    assert parse('{"id":4,"type":"history","channel":"a:b","limit":5000}').limit == 1000
    assert parse('{"id":5,"type":"presence","channel":"a:b"}').channel == "a:b"
    assert parse('{"id":6,"type":"auth","token":"t"}').token == "t"
    assert parse('{"id":2,"type":"unsubscribe","channel":"a:*"}').channel == "a:*"


def test_wallet_names_are_lowercased() -> None:
    assert parse('{"type":"subscribe","channel":"wallet:0xAbC"}').channel == "wallet:0xabc"
    assert channels.normalize("user:AbC") == "user:AbC"


@pytest.mark.parametrize(("payload", "code", "fragment"), [
    (b"not json", 400, "invalid JSON"),
    (b"[1,2]", 400, "JSON object"),
    (b'{"id":"1","type":"ping"}', 400, "id must be"),
    (b'{"id":true,"type":"ping"}', 400, "id must be"),
    (b'{"id":-1,"type":"ping"}', 400, "id must be"),
    (b'{"id":1}', 400, "type must be"),
    (b'{"id":1,"type":"dance"}', 404, "unknown type"),
    (b'{"id":1,"type":"subscribe"}', 400, "channel is required"),
    (b'{"id":1,"type":"subscribe","channel":""}', 400, "empty"),
    (b'{"id":1,"type":"subscribe","channel":"a b"}', 400, "without space"),
    (b'{"id":1,"type":"subscribe","channel":7}', 400, "must be a string"),
    ('{"id":1,"type":"subscribe","channel":"caf\u00e9"}'.encode(), 400, "ASCII"),
    (b'{"id":1,"type":"subscribe","channel":"' + b"x" * 256 + b'"}', 400, "longer than 255"),
    (b'{"id":1,"type":"publish","channel":"a:*","data":1}', 400, "pattern"),
    (b'{"id":1,"type":"publish","channel":"a:b"}', 400, "data is required"),
    (b'{"id":1,"type":"subscribe","channel":"a","since":5}', 400, "since must be"),
    (b'{"id":1,"type":"subscribe","channel":"a","since":{"offset":-1}}', 400, "since.offset"),
    (b'{"id":1,"type":"subscribe","channel":"a","since":{"offset":1,"epoch":2}}', 400,
     "since.epoch"),
    (b'{"id":1,"type":"history","channel":"a","limit":"x"}', 400, "limit"),
    (b'{"id":1,"type":"auth"}', 400, "token"),
])
def test_errors(payload: bytes, code: int, fragment: str) -> None:
    exc = err(payload)
    assert exc.code == code
    assert fragment in exc.message
    if b'"id":1' in payload:
        assert exc.id == 1


def test_reply_bytes() -> None:
    assert protocol.reply(1, "pong") == b'{"id":1,"type":"pong"}'
    assert protocol.reply(None, "pong") == b'{"type":"pong"}'
    assert orjson.loads(protocol.error_reply(2, 404, "x")) == {
        "id": 2, "type": "error", "code": 404, "message": "x"}


def test_event_payload_is_exact() -> None:
    assert protocol.event_payload("events:x", b'{"a":1}', 42, "e") == (
        b'{"type":"event","channel":"events:x","offset":42,"epoch":"e","data":{"a":1}}')
    assert protocol.event_payload("events:x", b'"raw"') == (
        b'{"type":"event","channel":"events:x","data":"raw"}')


def test_namespaces_and_patterns() -> None:
    assert channels.namespace_of("events:x") == "events"
    assert channels.namespace_of("events:*") == "events"
    assert channels.namespace_of("*:x") == ""
    assert channels.namespace_of("plain") == ""
    assert channels.is_pattern("a\\b") and channels.is_pattern("a[b]")
    assert not channels.is_pattern("a:b")
    assert channels.owner_of("wallet:0xab") == "0xab"


def test_close_reason_defaults_and_bound() -> None:
    """The reason of a lifecycle disconnect record: the given text cut to 123 bytes of
    UTF-8 (never mid-character), else a description of every close code fastws uses."""
    from fastws.codes import CLOSE_CODES, MAX_CLOSE_REASON, close_reason

    assert close_reason(1001, "tab closed") == "tab closed"
    assert close_reason(1000) == "normal closure" and close_reason(1006) == "connection lost"
    assert close_reason(4029) == "rate limited" and close_reason(4001) == "server draining"
    assert close_reason(4100) == "application close" and close_reason(2999) == "close code 2999"
    assert all(close_reason(code) and not close_reason(code).startswith("close code")
               for code in CLOSE_CODES)
    long = close_reason(1000, "é" * 100)
    assert len(long.encode()) <= MAX_CLOSE_REASON and long == "é" * (MAX_CLOSE_REASON // 2)


def test_websocket_end_code_and_reason() -> None:
    """server.ended_with: the server's close (its frame's reason when it says the same
    code), else the CLOSE received (no code: 1005) or sent, else 1006."""
    from types import SimpleNamespace as NS

    from fastws.server import ended_with

    def info(t: tuple[int, str] | None) -> NS | None:
        return None if t is None else NS(code=t[0], reason=t[1])

    def hs(recv: tuple[int, str] | None = None, sent: tuple[int, str] | None = None) -> NS:
        return NS(recv=info(recv), sent=info(sent))

    assert ended_with(4008, hs(sent=(4008, "slow consumer"))) == (4008, "slow consumer")
    assert ended_with(4008, hs(sent=(4001, "server draining"))) == (4008, "")
    assert ended_with(4008, None) == (4008, "")
    assert ended_with(0, hs(recv=(1001, "bye"), sent=(1001, ""))) == (1001, "bye")
    assert ended_with(0, hs(recv=(0, ""), sent=(1000, ""))) == (1005, "")
    assert ended_with(0, hs(sent=(1007, "bad text"))) == (1007, "bad text")
    assert ended_with(0, None) == (1006, "")


def test_close_code_ranges() -> None:
    """Close codes and their ranges come from fastws.codes; what metrics and the frame
    checks use are the same numbers."""
    from fastws import frames, metrics
    from fastws.codes import DISCONNECT_TOKEN_EXPIRED, Close

    assert Close.should_reconnect(Close.DRAINING) and Close.should_reconnect(4499)
    assert not Close.should_reconnect(Close.INVALID_TOKEN) and Close.should_reconnect(5000)
    assert not DISCONNECT_TOKEN_EXPIRED.reconnect
    assert Close.is_application(4000) and Close.is_application(4999)
    assert not Close.is_application(3999) and not Close.is_application(5000)
    assert (frames.CLOSE_NORMAL, frames.CLOSE_PROTOCOL_ERROR, frames.CLOSE_INVALID_TEXT,
            frames.CLOSE_MESSAGE_TOO_BIG) == (1000, 1002, 1007, 1009)
    assert set(metrics.KNOWN_CLOSE_CODES) == {1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009,
                                              1011, 4001, 4008, 4010, 4029, 4501, 4503, 4504,
                                              4505}
    assert metrics.KNOWN_ERROR_CODES == (400, 401, 403, 404, 409, 413, 429, 500, 503, 504)


def test_app_primitive_fields() -> None:
    """SPEC §13: ``last`` on subscribe, ``ephemeral``/``echo``/``idempotency_key`` on
    publish; absent means 0 / False / True / None."""
    req = parse(b'{"id":1,"type":"subscribe","channel":"c","last":100}')
    assert req.last == 100
    assert parse(b'{"type":"subscribe","channel":"c"}').last == 0
    req = parse(b'{"type":"publish","channel":"c","data":1,"ephemeral":true,"echo":false,'
                b'"idempotency_key":"k"}')
    assert (req.ephemeral, req.echo, req.idempotency_key) == (True, False, "k")
    req = parse(b'{"type":"publish","channel":"c","data":1}')
    assert (req.ephemeral, req.echo, req.idempotency_key) == (False, True, None)
    for bad, field in ((b'"last":0', "last"), (b'"last":101', "last"), (b'"last":"1"', "last"),
                       (b'"last":false', "last")):
        with pytest.raises(ProtocolError, match=field) as ei:
            parse(b'{"type":"subscribe","channel":"c",' + bad + b"}")
        assert ei.value.code == 400
    for bad, field in ((b'"ephemeral":1', "ephemeral"), (b'"echo":"no"', "echo"),
                       (b'"idempotency_key":5', "idempotency_key")):
        with pytest.raises(ProtocolError, match=field) as ei:
            parse(b'{"type":"publish","channel":"c","data":1,' + bad + b"}")
        assert ei.value.code == 400


def test_event_payload_from_is_exact() -> None:
    assert protocol.event_payload_from("c", b"1", 0, "", True, {"user": "u", "client": "i"}) \
        == b'{"type":"event","channel":"c","ephemeral":true,"from":{"user":"u","client":"i"},' \
           b'"data":1}'
    assert protocol.event_payload_from("c", b"{}", 3, "e", False, None) \
        == protocol.event_payload("c", b"{}", 3, "e")
