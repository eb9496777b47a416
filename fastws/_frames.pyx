# cython: language_level=3
"""RFC 6455 message-level checks that picows leaves to the application (compiled core).

The public face is :mod:`fastws.frames`; read its docstring first. This module holds
the hot code: the sans-I/O :class:`MessageAssembler`, an incremental UTF-8 validator
(Hoehrmann's DFA with an 8-bytes-at-a-time ASCII fast path) and the two thin helpers
that talk to a picows transport, :func:`receive` and :func:`close_with`.
"""

cimport cython
from cpython.bytearray cimport (PyByteArray_AS_STRING, PyByteArray_FromStringAndSize,
                                PyByteArray_GET_SIZE, PyByteArray_Resize)
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcpy
from fastws._picows cimport WSCloseCode, WSFrame, WSMsgType, WSTransport

from picows import WSProtocolError

import asyncio
import zlib

__all__ = ["MessageAssembler", "ProtocolViolation", "close_code_valid", "close_with",
           "receive", "utf8_valid"]

cdef enum:
    OP_CONTINUATION = 0x0
    OP_TEXT = 0x1
    OP_BINARY = 0x2
    OP_CLOSE = 0x8
    OP_PING = 0x9
    OP_PONG = 0xA
    CLOSE_PROTOCOL_ERROR = 1002
    CLOSE_INVALID_TEXT = 1007
    CLOSE_MESSAGE_TOO_BIG = 1009
    CLOSE_NORMAL = 1000
    MAX_CONTROL_PAYLOAD = 125
    MAX_CLOSE_REASON = 123       # 125 minus the 2-byte code
    UTF8_ACCEPT = 0
    UTF8_REJECT = 12
    LINGER_MAX_BYTES = 65536     # a lingering close discards at most this much input

# a lingering close gives the peer this long to close after our CLOSE (SPEC §9)
LINGER_SECONDS = 2.0
# RFC 7692 7.2.2: the receiver appends the tail the sender stripped
cdef bytes _DEFLATE_TAIL = b"\x00\x00\xff\xff"
_decompressobj = zlib.decompressobj
_zlib_error = zlib.error


class ProtocolViolation(WSProtocolError):
    """The peer broke RFC 6455; the connection must be closed with ``code``.

    ``code`` is the close code to send (1002, 1007 or 1009) and ``reason`` a short
    human-readable text (≤ 123 bytes). It subclasses picows' ``WSProtocolError``, so a
    listener that lets it escape ``on_ws_frame`` still gets the right CLOSE frame from
    picows (which then also logs it at ERROR level; :func:`receive` does not).
    """

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------
# UTF-8 validation: Bjoern Hoehrmann's DFA (states are multiples of 12, 0 accepts, 12
# rejects). The byte -> class half of the table is filled in at import time from ranges.

cdef uint8_t _UTF8D[364]


cdef _init_utf8_table():
    cdef int i
    cdef list classes = [
        (0x00, 0x7F, 0), (0x80, 0x8F, 1), (0x90, 0x9F, 9), (0xA0, 0xBF, 7),
        (0xC0, 0xC1, 8), (0xC2, 0xDF, 2), (0xE0, 0xE0, 10), (0xE1, 0xEC, 3),
        (0xED, 0xED, 4), (0xEE, 0xEF, 3), (0xF0, 0xF0, 11), (0xF1, 0xF3, 6),
        (0xF4, 0xF4, 5), (0xF5, 0xFF, 8),
    ]
    cdef list transitions = [
        0, 12, 24, 36, 60, 96, 84, 12, 12, 12, 48, 72, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12,
        12, 12, 12, 0, 12, 12, 12, 12, 12, 0, 12, 0, 12, 12, 12, 24, 12, 12, 12, 12, 12, 24,
        12, 24, 12, 12, 12, 12, 12, 12, 12, 12, 12, 24, 12, 12, 12, 12, 12, 24, 12, 12, 12, 12,
        12, 12, 12, 24, 12, 12, 12, 12, 12, 12, 12, 12, 12, 36, 12, 36, 12, 12, 12, 36, 12, 12,
        12, 12, 12, 36, 12, 36, 12, 12, 12, 36, 12, 12, 12, 12, 12, 12, 12, 12, 12, 12,
    ]
    for lo, hi, cls in classes:
        for i in range(lo, hi + 1):
            _UTF8D[i] = cls
    for i in range(108):
        _UTF8D[256 + i] = transitions[i]


_init_utf8_table()


@cython.boundscheck(False)
@cython.wraparound(False)
cdef inline uint32_t _utf8_run(uint32_t state, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """Advance the DFA over n bytes; returns UTF8_REJECT as soon as a byte is invalid."""
    cdef Py_ssize_t i = 0
    cdef uint64_t word
    while i < n:
        if state == UTF8_ACCEPT:
            while i + 8 <= n:
                memcpy(&word, p + i, 8)
                if word & 0x8080808080808080ULL:
                    break
                i += 8
            if i >= n:
                break
        state = _UTF8D[256 + state + _UTF8D[p[i]]]
        if state == UTF8_REJECT:
            return UTF8_REJECT
        i += 1
    return state


cpdef bint utf8_valid(const unsigned char[:] data) noexcept:
    """True if ``data`` is complete, well-formed UTF-8 (no surrogates, overlongs, > U+10FFFF)."""
    if data.shape[0] == 0:
        return True
    return _utf8_run(UTF8_ACCEPT, &data[0], data.shape[0]) == UTF8_ACCEPT


cpdef bint close_code_valid(int code) noexcept:
    """True for the close codes a peer may send (RFC 6455 7.4): 1000-1003, 1007-1011, 3000-4999."""
    return (1000 <= code <= 1003) or (1007 <= code <= 1011) or (3000 <= code <= 4999)


# ---------------------------------------------------------------------------------------


@cython.final
cdef class MessageAssembler:
    """Turns the frames of one connection into complete, validated messages (sans-I/O).

    Create one per connection and call :meth:`feed` with every frame picows delivers
    to ``on_ws_frame``, in order. It never touches a socket; :func:`receive` is the
    thin adapter that does the replies on a picows transport.
    """

    def __init__(self, Py_ssize_t max_message_size=64 * 1024):
        if max_message_size < 0:
            raise ValueError("max_message_size must be >= 0")
        self.max_message_size = max_message_size
        self.reset()

    cpdef reset(self):
        """Forget any half-assembled message and a received CLOSE (state of a new connection)."""
        self._msg_type = 0
        self._utf8_state = UTF8_ACCEPT
        self._closed = False
        self._buf = None
        self._inflater = None
        self.reply_close_code = 0

    @property
    def in_message(self) -> bool:
        """True while a fragmented message has started and its final frame is awaited."""
        return self._msg_type != 0

    cpdef object feed(self, WSFrame frame):
        """Take one frame; return a complete ``(opcode, payload)`` or None.

        Returns, with ``opcode`` a plain int equal to a ``picows.WSMsgType``:

        * ``(TEXT, bytes)`` / ``(BINARY, bytes)``: a whole message, fragments joined,
          TEXT checked to be valid UTF-8 (the bytes are returned, not decoded);
        * ``(PING, payload)``: answer with a PONG carrying ``payload`` (only seen when
          picows' ``enable_auto_pong`` is off; with it on picows answers and never
          calls ``on_ws_frame`` for a PING, so there is never a double pong);
        * ``(CLOSE, payload)``: a valid CLOSE; answer with :attr:`reply_close_code`
          (the peer's code, or 1000 when it sent none) and disconnect. Every frame
          fed after it returns None;
        * None: a fragment of an unfinished message, or a PONG.

        Raises :class:`ProtocolViolation` (close 1002, 1007 or 1009) when the frame
        breaks RFC 6455; the assembler's state is then undefined: close the connection.
        The payload is copied once (the frame points into picows' reused read buffer).
        """
        cdef:
            int op = <int>frame.msg_type
            Py_ssize_t size = frame.payload_size
            const uint8_t* ptr = <const uint8_t*>frame.payload_ptr
            uint32_t state = UTF8_ACCEPT

        if self._closed:
            return None
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            if (frame.rsv1 and self.deflate and not (frame.rsv2 or frame.rsv3)
                    and (op == OP_TEXT or op == OP_BINARY)):
                return self._compressed(frame, op)      # RSV1: a compressed message
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "reserved bits set, no extension")

        if op == OP_TEXT or op == OP_BINARY:
            if self._msg_type != 0:
                raise ProtocolViolation(CLOSE_PROTOCOL_ERROR,
                                        "new message inside a fragmented message")
            if size > self.max_message_size:
                raise ProtocolViolation(CLOSE_MESSAGE_TOO_BIG, "message too big")
            if op == OP_TEXT:
                state = _utf8_run(UTF8_ACCEPT, ptr, size)
                if state == UTF8_REJECT or (frame.fin and state != UTF8_ACCEPT):
                    raise ProtocolViolation(CLOSE_INVALID_TEXT, "invalid UTF-8 in text message")
            if frame.fin:
                return (op, PyBytes_FromStringAndSize(<const char*>ptr, size))
            self._msg_type = op
            self._utf8_state = state
            self._buf = PyByteArray_FromStringAndSize(<const char*>ptr, size)
            return None

        if op == OP_CONTINUATION:
            if self._inflater is not None:
                return self._compressed(frame, op)
            return self._continue(frame)

        # Control frames (picows' parser already enforces both rules on the wire; they
        # are repeated here so that the assembler stands on its own).
        if not frame.fin:
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "fragmented control frame")
        if size > MAX_CONTROL_PAYLOAD:
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "control frame payload > 125 bytes")
        if op == OP_PONG:
            return None
        if op == OP_PING:
            return (op, PyBytes_FromStringAndSize(<const char*>ptr, size))
        if op == OP_CLOSE:
            self._check_close(frame)
            self._closed = True
            self._buf = None
            return (op, PyBytes_FromStringAndSize(<const char*>ptr, size))
        raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "unknown opcode")

    cdef inline object _continue(self, WSFrame frame):
        cdef:
            Py_ssize_t size = frame.payload_size
            const uint8_t* ptr = <const uint8_t*>frame.payload_ptr
            Py_ssize_t have
            uint32_t state
            bytes message

        if self._msg_type == 0:
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "continuation without a message")
        have = PyByteArray_GET_SIZE(self._buf)
        if size > self.max_message_size - have:
            raise ProtocolViolation(CLOSE_MESSAGE_TOO_BIG, "message too big")
        if self._msg_type == OP_TEXT:
            state = _utf8_run(self._utf8_state, ptr, size)
            if state == UTF8_REJECT or (frame.fin and state != UTF8_ACCEPT):
                raise ProtocolViolation(CLOSE_INVALID_TEXT, "invalid UTF-8 in text message")
            self._utf8_state = state
        if size:
            PyByteArray_Resize(self._buf, have + size)   # over-allocates: amortized O(n)
            memcpy(PyByteArray_AS_STRING(self._buf) + have, ptr, size)
        if not frame.fin:
            return None
        message = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(self._buf), have + size)
        result = (self._msg_type, message)
        self._msg_type = 0
        self._utf8_state = UTF8_ACCEPT
        self._buf = None
        return result

    cdef object _compressed(self, WSFrame frame, int op):
        """One frame of a compressed message (RFC 7692): inflate it as it arrives.

        The inflater lives only while the message does (the server's answer carries
        ``client_no_context_takeover``), and it never produces more than
        ``max_message_size`` bytes in all: a deflate bomb stops at the limit (1009).
        """
        cdef:
            Py_ssize_t have = 0
            Py_ssize_t room
            Py_ssize_t n
            uint32_t state
            bytes out
            int msg_type

        if op != OP_CONTINUATION:
            if self._msg_type != 0:
                raise ProtocolViolation(CLOSE_PROTOCOL_ERROR,
                                        "new message inside a fragmented message")
            self._inflater = _decompressobj(-15)
            self._msg_type = op
            self._utf8_state = UTF8_ACCEPT
            self._buf = None
        elif self._buf is not None:
            have = PyByteArray_GET_SIZE(self._buf)
        room = self.max_message_size - have
        try:
            out = self._inflater.decompress(frame.get_payload_as_memoryview(), room + 1)
            if frame.fin and PyBytes_GET_SIZE(out) <= room:
                out += self._inflater.decompress(_DEFLATE_TAIL, room + 1 - PyBytes_GET_SIZE(out))
        except _zlib_error:
            raise ProtocolViolation(CLOSE_INVALID_TEXT, "invalid compressed data")
        n = PyBytes_GET_SIZE(out)
        if n > room:
            raise ProtocolViolation(CLOSE_MESSAGE_TOO_BIG, "message too big")
        msg_type = self._msg_type
        if msg_type == OP_TEXT:
            state = _utf8_run(self._utf8_state, <const uint8_t*>PyBytes_AS_STRING(out), n)
            if state == UTF8_REJECT or (frame.fin and state != UTF8_ACCEPT):
                raise ProtocolViolation(CLOSE_INVALID_TEXT, "invalid UTF-8 in text message")
            self._utf8_state = state
        if not frame.fin:
            if self._buf is None:
                self._buf = PyByteArray_FromStringAndSize(PyBytes_AS_STRING(out), n)
            elif n:
                PyByteArray_Resize(self._buf, have + n)
                memcpy(PyByteArray_AS_STRING(self._buf) + have, PyBytes_AS_STRING(out), n)
            return None
        if self._buf is not None and have:
            out = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(self._buf), have) + out
        self._msg_type = 0
        self._utf8_state = UTF8_ACCEPT
        self._buf = None
        self._inflater = None
        return (msg_type, out)

    cdef inline NoResult _check_close(self, WSFrame frame) except NoResult.EXC:
        cdef:
            Py_ssize_t size = frame.payload_size
            const uint8_t* ptr = <const uint8_t*>frame.payload_ptr
            int code

        if size == 0:
            self.reply_close_code = CLOSE_NORMAL
            return NoResult.SUCCESS
        if size == 1:
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "close payload of 1 byte")
        code = (ptr[0] << 8) | ptr[1]
        if not close_code_valid(code):
            raise ProtocolViolation(CLOSE_PROTOCOL_ERROR, "invalid close code")
        if size > 2 and _utf8_run(UTF8_ACCEPT, ptr + 2, size - 2) != UTF8_ACCEPT:
            raise ProtocolViolation(CLOSE_INVALID_TEXT, "invalid UTF-8 in close reason")
        self.reply_close_code = code
        return NoResult.SUCCESS


# ---------------------------------------------------------------------------------------
# The thin I/O adapter for picows.


cpdef close_with(WSTransport transport, int code, str reason="", bint linger=True):
    """Send a CLOSE frame with ``code`` and ``reason`` (cut to 123 bytes), then close.

    Safe to call more than once: the CLOSE is sent only if none was sent yet. Use it
    instead of ``send_close(WSCloseCode.NO_INFO)``, which puts code 0 on the wire.

    With ``linger`` (when the server starts the close) the close is a lingering one
    (:func:`linger`): the peer may still be sending, and closing with unread input
    would make the kernel answer with a reset that destroys the CLOSE frame.  Answering
    the peer's own CLOSE (``linger=False``) disconnects at once.
    """
    cdef bytes raw
    if transport.is_disconnected:
        return
    if not transport.is_close_frame_sent:
        raw = reason.encode("utf-8")
        if len(raw) > MAX_CLOSE_REASON:
            raw = raw[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode("utf-8")
        transport.send_close(<WSCloseCode>code, raw)
        if linger and _linger(transport):
            return
    elif _Linger.active(transport):
        return
    transport.disconnect(True)


class _Linger(asyncio.Protocol):
    """Stands in for picows' protocol once our CLOSE is sent: input is discarded.

    The sending side is shut down (``write_eof``, after what is buffered); what the
    peer still sends is read and dropped until it closes, or ``LINGER_SECONDS`` or
    ``LINGER_MAX_BYTES`` pass; then the socket closes.  picows hears of the end
    through its own ``connection_lost`` (``on_ws_disconnected`` as usual).
    """

    __slots__ = ("ws", "tr", "seen", "timer")

    def __init__(self, ws: object, tr: object) -> None:
        self.ws = ws
        self.tr = tr
        self.seen = 0
        self.timer = None

    @staticmethod
    def active(WSTransport transport) -> bool:
        """True when ``transport`` is in a lingering close already."""
        return isinstance(transport.underlying_transport.get_protocol(), _Linger)

    def data_received(self, data: bytes) -> None:
        self.seen += len(data)
        if self.seen > LINGER_MAX_BYTES:
            self.tr.close()

    def eof_received(self) -> bool:
        return False                    # the peer closed: close our side too

    def expire(self) -> None:
        self.tr.close()

    def pause_writing(self) -> None:
        self.ws.pause_writing()

    def resume_writing(self) -> None:
        self.ws.resume_writing()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.ws.connection_lost(exc)


cdef bint _linger(WSTransport transport) except -1:
    """Start a lingering close of ``transport`` (its CLOSE frame is sent); False if
    the socket cannot half-close (then the caller disconnects at once)."""
    tr = transport.underlying_transport
    if tr.is_closing():
        return False
    ws = tr.get_protocol()
    if isinstance(ws, _Linger):
        return True
    try:
        if not tr.can_write_eof():
            return False
        lingering = _Linger(ws, tr)
        tr.set_protocol(lingering)
        tr.write_eof()
    except (OSError, RuntimeError, AttributeError, NotImplementedError):
        return False
    lingering.timer = transport._loop.call_later(LINGER_SECONDS, lingering.expire)
    return True


cpdef object receive(MessageAssembler assembler, WSTransport transport, WSFrame frame):
    """Feed ``frame`` and do the protocol's own replies; return a data message or None.

    Call it first thing in ``on_ws_frame``. PING gets its PONG, a CLOSE gets the echoed
    code (1000 if none) and a disconnect, a violation gets its close code and a
    disconnect; what comes back is only ``(TEXT | BINARY, bytes)`` for the application.
    Once a CLOSE is sent nothing more is read (frames already buffered are dropped).
    """
    if transport.is_close_frame_sent:
        return None
    try:
        msg = assembler.feed(frame)
    except ProtocolViolation as exc:
        close_with(transport, exc.code, exc.reason)
        return None
    if msg is None:
        return None
    cdef int op = (<tuple>msg)[0]
    if op == OP_TEXT or op == OP_BINARY:
        return msg
    if op == OP_PING:
        transport.send_pong((<tuple>msg)[1])
    elif op == OP_CLOSE:
        close_with(transport, assembler.reply_close_code, "", False)
    return None
