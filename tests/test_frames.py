"""MessageAssembler without sockets: frames built with picows._make_test_ws_frame."""

from __future__ import annotations

import itertools
import random
import time

import pytest
from picows import WSMsgType
from picows.picows import _make_test_ws_frame

from fastws.frames import (
    MessageAssembler,
    ProtocolViolation,
    close_code_valid,
    utf8_valid,
)

TEXT, BINARY, CONT = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION
PING, PONG, CLOSE = WSMsgType.PING, WSMsgType.PONG, WSMsgType.CLOSE


def frame(op: WSMsgType, payload: bytes = b"", fin: bool = True, rsv1: bool = False):
    return _make_test_ws_frame(op, payload, fin, rsv1)


def violation(asm: MessageAssembler, *frames) -> int:
    """Feed frames; the last must raise ProtocolViolation. Returns its close code."""
    for f in frames[:-1]:
        asm.feed(f)
    with pytest.raises(ProtocolViolation) as info:
        asm.feed(frames[-1])
    assert info.value.reason
    return info.value.code


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return code.to_bytes(2, "big") + reason


# --- data messages -----------------------------------------------------------------


def test_single_frames_are_returned_whole() -> None:
    asm = MessageAssembler()
    assert asm.feed(frame(TEXT, "héllo".encode())) == (TEXT, "héllo".encode())
    assert asm.feed(frame(BINARY, b"\xff\x00")) == (BINARY, b"\xff\x00")
    assert asm.feed(frame(TEXT, b"")) == (TEXT, b"")
    kind, payload = asm.feed(frame(TEXT, b"x"))
    assert kind == TEXT and type(kind) is int and type(payload) is bytes


def test_fragments_are_joined_with_control_frames_between() -> None:
    asm = MessageAssembler()
    assert asm.feed(frame(TEXT, b"ab", fin=False)) is None
    assert asm.in_message
    assert asm.feed(frame(PING, b"p")) == (PING, b"p")
    assert asm.feed(frame(CONT, b"", fin=False)) is None
    assert asm.feed(frame(PONG, b"x")) is None
    assert asm.feed(frame(CONT, b"cd", fin=False)) is None
    assert asm.feed(frame(CONT, b"e", fin=True)) == (TEXT, b"abcde")
    assert not asm.in_message
    assert asm.feed(frame(BINARY, b"\x00", fin=False)) is None
    assert asm.feed(frame(CONT, b"\x01")) == (BINARY, b"\x00\x01")


def test_large_fragmented_message_is_linear() -> None:
    asm = MessageAssembler(16 * 1024 * 1024)
    chunk = bytes(range(256)) * 64                    # 16 KiB
    start = time.perf_counter()
    assert asm.feed(frame(BINARY, chunk, fin=False)) is None
    for _ in range(1022):
        assert asm.feed(frame(CONT, chunk, fin=False)) is None
    kind, payload = asm.feed(frame(CONT, chunk))
    assert time.perf_counter() - start < 2.0
    assert kind == BINARY and len(payload) == 16 * 1024 * 1024
    assert payload == chunk * 1024


def test_sequencing_errors_are_1002() -> None:
    assert violation(MessageAssembler(), frame(CONT, b"x")) == 1002
    assert violation(MessageAssembler(), frame(CONT, b"x", fin=False)) == 1002
    assert violation(MessageAssembler(), frame(TEXT, b"a", fin=False), frame(TEXT, b"b")) == 1002
    assert violation(MessageAssembler(), frame(BINARY, b"a", fin=False),
                     frame(TEXT, b"b", fin=False)) == 1002


def test_rsv_bits_are_1002() -> None:
    for op in (TEXT, BINARY, PING, PONG, CLOSE):
        assert violation(MessageAssembler(), frame(op, b"", rsv1=True)) == 1002
    assert violation(MessageAssembler(), frame(TEXT, b"a", fin=False),
                     frame(CONT, b"b", rsv1=True)) == 1002


def test_control_frame_rules_are_1002() -> None:
    for op in (PING, PONG, CLOSE):
        assert violation(MessageAssembler(), frame(op, b"", fin=False)) == 1002
        assert violation(MessageAssembler(), frame(op, b"\x03\xe8" + b"a" * 124)) == 1002
    asm = MessageAssembler()
    assert asm.feed(frame(PING, b"a" * 125)) == (PING, b"a" * 125)


def test_message_size_limit_is_1009_over_all_fragments() -> None:
    asm = MessageAssembler(10)
    assert asm.max_message_size == 10
    assert asm.feed(frame(BINARY, b"a" * 10)) == (BINARY, b"a" * 10)
    assert violation(MessageAssembler(10), frame(TEXT, b"a" * 11)) == 1009
    assert violation(MessageAssembler(10), frame(TEXT, b"a" * 11, fin=False)) == 1009
    assert violation(MessageAssembler(10), frame(BINARY, b"a" * 6, fin=False),
                     frame(CONT, b"a" * 5)) == 1009
    asm = MessageAssembler(10)
    asm.feed(frame(BINARY, b"a" * 6, fin=False))
    assert asm.feed(frame(CONT, b"a" * 4)) == (BINARY, b"a" * 10)
    with pytest.raises(ValueError):
        MessageAssembler(-1)


# --- UTF-8 -------------------------------------------------------------------------


def test_invalid_utf8_text_is_1007() -> None:
    for bad in (b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"abc\xe2\x82"):
        assert violation(MessageAssembler(), frame(TEXT, bad)) == 1007
    # BINARY is not checked
    assert MessageAssembler().feed(frame(BINARY, b"\xff")) == (BINARY, b"\xff")


def test_utf8_is_checked_per_fragment_and_fails_fast() -> None:
    euro = "€".encode()                                  # e2 82 ac
    asm = MessageAssembler()
    assert asm.feed(frame(TEXT, b"a" + euro[:1], fin=False)) is None
    assert asm.feed(frame(CONT, euro[1:2], fin=False)) is None
    assert asm.feed(frame(CONT, euro[2:] + b"z")) == (TEXT, b"a" + euro + b"z")
    # an invalid fragment fails at once, long before the final frame
    assert violation(MessageAssembler(), frame(TEXT, b"ok", fin=False),
                     frame(CONT, b"\xce\xba\xed\xa0\x80", fin=False)) == 1007
    # a sequence cut off by the final frame is invalid
    assert violation(MessageAssembler(), frame(TEXT, euro[:2], fin=False),
                     frame(CONT, b"")) == 1007


def test_utf8_split_anywhere_gives_the_same_verdict() -> None:
    rng = random.Random(7)
    samples = ["κόσμε".encode(), "😀a€".encode(), b"\xed\x9f\xbf", b"\xf0\x90\x80\x80",
               b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80edited",
               bytes(rng.randrange(256) for _ in range(40))]
    for data in samples:
        expect = _py_valid(data)
        for cut in range(len(data) + 1):
            asm = MessageAssembler()
            try:
                asm.feed(frame(TEXT, data[:cut], fin=False))
                got = asm.feed(frame(CONT, data[cut:])) == (TEXT, data)
            except ProtocolViolation as exc:
                assert exc.code == 1007
                got = False
            assert got is expect, (data, cut)


def _py_valid(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_utf8_validator_agrees_with_python() -> None:
    for n in range(256):
        assert utf8_valid(bytes([n])) is _py_valid(bytes([n]))
    for a, b in itertools.product(range(256), repeat=2):
        s = bytes([a, b])
        assert utf8_valid(s) is _py_valid(s), s
    edges = [0x00, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xFF]
    for a, b, c in itertools.product(range(0xE0, 0xF0), range(256), edges):
        s = bytes([a, b, c])
        assert utf8_valid(s) is _py_valid(s), s
    for a, b, c, d in itertools.product(range(0xF0, 0xF8), range(256), edges[1:4], edges[2:8]):
        s = bytes([a, b, c, d])
        assert utf8_valid(s) is _py_valid(s), s
    rng = random.Random(1)
    for _ in range(2000):
        s = "".join(chr(rng.choice((rng.randrange(0x80), rng.randrange(0xD800),
                                    rng.randrange(0xE000, 0x110000))))
                    for _ in range(rng.randrange(1, 30))).encode()
        assert utf8_valid(s)                           # ASCII fast path + multibyte mix
        assert utf8_valid(s + b"\x80") is False
    assert utf8_valid(b"")


# --- CLOSE -------------------------------------------------------------------------


def test_close_without_code_is_answered_with_1000() -> None:
    asm = MessageAssembler()
    assert asm.reply_close_code == 0
    assert asm.feed(frame(CLOSE, b"")) == (CLOSE, b"")
    assert asm.reply_close_code == 1000


def test_valid_close_code_is_echoed() -> None:
    for code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 3000, 3999, 4000, 4999):
        asm = MessageAssembler()
        payload = close_payload(code, "bye ☺".encode())
        assert asm.feed(frame(CLOSE, payload)) == (CLOSE, payload)
        assert asm.reply_close_code == code


def test_invalid_close_payloads() -> None:
    assert violation(MessageAssembler(), frame(CLOSE, b"\x03")) == 1002
    for code in (0, 999, 1004, 1005, 1006, 1012, 1015, 1016, 1100, 2000, 2999, 5000, 65535):
        assert not close_code_valid(code)
        assert violation(MessageAssembler(), frame(CLOSE, close_payload(code))) == 1002
    bad_reason = close_payload(1000, b"\xce\xba\xed\xa0\x80")
    assert violation(MessageAssembler(), frame(CLOSE, bad_reason)) == 1007


def test_frames_after_close_are_ignored() -> None:
    asm = MessageAssembler()
    asm.feed(frame(TEXT, b"a", fin=False))
    asm.feed(frame(CLOSE, close_payload(1001)))
    assert asm.feed(frame(CONT, b"\xff")) is None
    assert asm.feed(frame(TEXT, b"x")) is None
    asm.reset()
    assert asm.reply_close_code == 0 and not asm.in_message
    assert asm.feed(frame(TEXT, b"x")) == (TEXT, b"x")


def test_protocol_violation_is_a_picows_protocol_error() -> None:
    from picows import WSProtocolError

    exc = ProtocolViolation(1002, "why")
    assert isinstance(exc, WSProtocolError)
    assert (exc.code, exc.reason, exc.args) == (1002, "why", (1002, "why"))
