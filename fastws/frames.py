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
* :func:`close_with` — send a CLOSE (never code 0) and close; when the server starts
  the close it lingers (SPEC §9): input is discarded, the sending side shut down, and
  the socket closes when the peer closes, after 2 s or after 64 KiB.

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

#: The ``Sec-WebSocket-Extensions`` value for permessage-deflate (RFC 7692) the server
#: answers with: no context between messages either way, so a compressed frame is built
#: once per publication and no connection keeps a zlib stream (SPEC §9).
DEFLATE_ANSWER = "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
_DEFLATE_PARAMS = frozenset({"server_no_context_takeover", "client_no_context_takeover",
                             "server_max_window_bits", "client_max_window_bits"})


def negotiate_deflate(offers: str) -> tuple[str, bool] | None:
    """Answer a ``Sec-WebSocket-Extensions`` header: ``(answer, compress)`` or None.

    Takes the first valid ``permessage-deflate`` offer (unknown or repeated parameters,
    or bad window sizes, make an offer invalid: it is skipped, never an error).  The
    answer always carries ``server_no_context_takeover`` and
    ``client_no_context_takeover``.  An offer limiting the server's window below 15 bits
    is accepted with that limit echoed and ``compress`` False: the server then sends
    that connection plain frames (RFC 7692 allows it per message), because one shared
    frame is compressed with a 15-bit window.  None: no offer to accept.
    """
    for offer in offers.split(","):
        parts = [p.strip() for p in offer.split(";")]
        if parts[0].lower() != "permessage-deflate":
            continue
        seen: dict[str, str | None] = {}
        ok = True
        for part in parts[1:]:
            if not part:
                continue
            name, eq, value = part.partition("=")
            name = name.strip().lower()
            val = value.strip().strip('"') if eq else None
            if name not in _DEFLATE_PARAMS or name in seen:
                ok = False
                break
            if name.endswith("context_takeover") and val is not None:
                ok = False
                break
            if name == "server_max_window_bits" and not (
                    val is not None and val.isdigit() and 8 <= int(val) <= 15
                    and val == str(int(val))):
                ok = False
                break
            if name == "client_max_window_bits" and val is not None and not (
                    val.isdigit() and 8 <= int(val) <= 15 and val == str(int(val))):
                ok = False
                break
            seen[name] = val
        if not ok:
            continue
        bits = seen.get("server_max_window_bits")
        if bits is not None and int(bits) < 15:
            return f"{DEFLATE_ANSWER}; server_max_window_bits={bits}", False
        return DEFLATE_ANSWER, True
    return None

#: The close codes the assembler raises, and the answer to a CLOSE without a code
#: (``_frames.pyx`` holds the same numbers as C constants, which Python cannot import).
CLOSE_NORMAL = Close.NORMAL
CLOSE_PROTOCOL_ERROR = Close.PROTOCOL_ERROR
CLOSE_INVALID_TEXT = Close.INVALID_PAYLOAD
CLOSE_MESSAGE_TOO_BIG = Close.TOO_BIG

__all__ = [
    "DEFLATE_ANSWER",
    "CLOSE_INVALID_TEXT",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "MessageAssembler",
    "ProtocolViolation",
    "close_code_valid",
    "close_with",
    "negotiate_deflate",
    "receive",
    "utf8_valid",
]
