"""RFC 6455 message-level correctness on top of picows.

picows parses frames, unmasks them and enforces the frame-level rules (opcodes,
masking, length encodings, control frames fin=1 and ≤ 125 bytes, ``max_frame_size``).
It leaves to the application everything that spans frames or looks inside them:

* RSV bits: no extension is ever negotiated, so any RSV bit → close 1002;
* fragmentation: a CONTINUATION without a started message, or a new TEXT/BINARY
  while one is open → 1002; control frames may be interleaved between fragments;
* UTF-8 of TEXT messages → 1007, checked incrementally so that a bad fragment
  fails at once (Autobahn 6.x) instead of when the message completes;
* the message size over all fragments → 1009;
* CLOSE payloads: 1 byte → 1002, a code outside 1000-1003/1007-1011/3000-4999 →
  1002, a reason that is not UTF-8 → 1007; otherwise the peer's code is echoed,
  or 1000 when it sent none (``send_close(WSCloseCode.NO_INFO)`` would send 0).

The pieces, in the order a listener meets them::

    class Listener(WSListener):
        def on_ws_connected(self, transport):
            self.assembler = MessageAssembler(max_message_size=65536)

        def on_ws_frame(self, transport, frame):
            msg = receive(self.assembler, transport, frame)   # pongs, closes, 1002/1007/1009
            if msg is not None:
                opcode, payload = msg                          # TEXT or BINARY, bytes
                ...

* :class:`MessageAssembler` — sans-I/O: ``feed(frame)`` returns a complete
  ``(opcode, payload)`` (data messages, and PING/CLOSE for the caller to answer) or
  None, and raises :class:`ProtocolViolation`. Tests drive it with
  ``picows._make_test_ws_frame``; no socket needed.
* :func:`receive` — the adapter: feeds one frame, answers PING and CLOSE, closes on
  a violation, and returns only data messages.
* :func:`close_with` — send a CLOSE (never code 0) and disconnect.

Create the server with ``enable_auto_pong=False`` so that PINGs reach the assembler
and get their RSV bits checked (Autobahn 3.6); with picows' auto-pong on, PINGs are
answered by picows and never seen here, so there is no double pong either way.

The implementation is compiled (``fastws/_frames.pyx``); a compiled listener can
``from fastws._frames cimport MessageAssembler, receive`` and skip Python dispatch.
"""

from __future__ import annotations

from fastws._frames import (
    MessageAssembler,
    ProtocolViolation,
    close_code_valid,
    close_with,
    receive,
    utf8_valid,
)
from fastws.codes import Close

#: The close codes the assembler raises, and the answer to a CLOSE without a code
#: (``_frames.pyx`` holds the same numbers as C constants, which Python cannot import).
CLOSE_NORMAL = Close.NORMAL
CLOSE_PROTOCOL_ERROR = Close.PROTOCOL_ERROR
CLOSE_INVALID_TEXT = Close.INVALID_PAYLOAD
CLOSE_MESSAGE_TOO_BIG = Close.TOO_BIG

__all__ = [
    "CLOSE_INVALID_TEXT",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "MessageAssembler",
    "ProtocolViolation",
    "close_code_valid",
    "close_with",
    "receive",
    "utf8_valid",
]
