"""Atheris fuzz target for the protocol parser and the parsers around it.

Run by hand (not part of ``make test``)::

    pip install atheris
    python fuzz/fuzz_protocol.py -atheris_runs=200000          # or -max_total_time=300
    python fuzz/fuzz_protocol.py fuzz/corpus/                   # grow a corpus directory

One input is split by its first byte into one of four targets, each with a
contract that a crash (any other exception) breaks:

- ``protocol.parse``: a :class:`Request`, or :class:`ProtocolError` with a code;
  the error reply it yields is valid JSON.
- ``channels.validate``: a canonical name, or :class:`ChannelError`.
- ``auth.parse_siwe_message``: a message, or :class:`SiweError` (status 400).
- the limits helpers: ``json_depth`` of any parsed JSON and ``request_id`` never raise.

``TestOneInput`` needs no atheris, so ``tests/test_hostile.py`` replays the seeds below.
"""

from __future__ import annotations

import sys

import orjson

from fastws import auth, channels, limits, protocol

SEEDS = [
    b'\x00{"id":1,"type":"subscribe","channel":"events:*","since":{"offset":4,"epoch":"e"}}',
    b'\x00{"id":2,"type":"publish","channel":"chat:x","data":[[[[1]]]]}',
    b'\x00{"id":3,"type":"history","channel":"events:x","limit":-1}',
    b'\x00{"type":"auth","token":""}',
    b"\x01wallet:0xAbC[\\]*?",
    b"\x02example.com wants you to sign in with your Ethereum account:\n"
    b"0x0000000000000000000000000000000000000001\n\n\nURI: https://example.com\n"
    b"Version: 1\nChain ID: 1\nNonce: abcdefgh\nIssued At: 2024-01-01T00:00:00Z",
    b"\x03" + b"[" * 100 + b"]" * 100,
]


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the atheris entry point's name
    """Run one input through the target its first byte picks."""
    if not data:
        return
    which, body = data[0] % 4, data[1:]
    if which == 0:
        try:
            req = protocol.parse(body)
        except protocol.ProtocolError as exc:
            assert exc.code in (400, 404), exc.code
            orjson.loads(protocol.error_reply(exc.id, exc.code, exc.message))
        else:
            assert req.type in protocol.TYPES
    elif which == 1:
        text = body.decode("utf-8", "replace")
        try:
            name = channels.validate(text)
        except channels.ChannelError:
            return
        assert name == channels.normalize(name) and 0 < len(name) <= 255
    elif which == 2:
        try:
            auth.parse_siwe_message(body.decode("utf-8", "replace"))
        except auth.SiweError as exc:
            assert exc.status == 400
    else:
        limits.request_id(body)
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        assert limits.json_depth(value) >= 0


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
