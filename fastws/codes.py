"""Every number of the wire contract in one place: error codes, close codes, disconnects.

Disconnects are values (:class:`Disconnect`), not strings scattered through the code.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Err", "Close", "CLOSE_CODES", "Disconnect",
    "DISCONNECT_DRAINING", "DISCONNECT_SLOW", "DISCONNECT_RATE_LIMITED",
    "DISCONNECT_INSUFFICIENT_STATE", "DISCONNECT_INVALID_TOKEN", "DISCONNECT_ORIGIN",
    "DISCONNECT_CONNECTION_LIMIT", "DISCONNECT_TOKEN_EXPIRED", "DISCONNECT_TOKEN_REVOKED",
    "DISCONNECT_BY_API",
    "MAX_CLOSE_REASON", "CLOSE_REASONS", "close_reason",
    "REASON_STREAM_CLOSED", "REASON_POLL_ANSWERED",
]

#: bytes of UTF-8 a close frame's reason may hold (125 - the 2 bytes of the code)
MAX_CLOSE_REASON = 123


class Err:
    """Error codes carried by `{"type":"error","code":N}` replies (SPEC §4)."""

    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    FORBIDDEN = 403
    UNKNOWN_TYPE = 404
    ALREADY_SUBSCRIBED = 409
    TOO_LARGE = 413
    RATE_LIMITED = 429
    INTERNAL = 500
    UNAVAILABLE = 503
    BACKEND_TIMEOUT = 504


class Close:
    """WebSocket close codes used by fastws (RFC 6455 and the 4xxx range of SPEC §4)."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005             # never sent: the peer's close frame carried no code
    ABNORMAL = 1006              # never sent: the connection ended without a close frame
    INVALID_PAYLOAD = 1007
    POLICY = 1008
    TOO_BIG = 1009
    INTERNAL = 1011
    # 4000-4999: the application range (SPEC §4)
    APP_FIRST = 4000
    NO_RECONNECT_FIRST = 4500
    APP_LAST = 4999
    # 4000-4499: the client should reconnect
    DRAINING = 4001
    SLOW_CONSUMER = 4008
    INSUFFICIENT_STATE = 4010
    RATE_LIMITED = 4029
    # 4500-4999: the client should not reconnect
    INVALID_TOKEN = 4501
    ORIGIN_NOT_ALLOWED = 4503
    CONNECTION_LIMIT = 4504
    DISCONNECTED = 4505          # POST /api/disconnect without a code

    @staticmethod
    def should_reconnect(code: int) -> bool:
        """True for codes after which a client should reconnect (everything but 4500-4999)."""
        return not Close.NO_RECONNECT_FIRST <= code <= Close.APP_LAST

    @staticmethod
    def is_application(code: int) -> bool:
        """True for the 4000-4999 range (the codes ``POST /api/disconnect`` may name)."""
        return Close.APP_FIRST <= code <= Close.APP_LAST


#: every close code of :class:`Close` (not the bounds of its 4xxx ranges), sorted
CLOSE_CODES = tuple(sorted(
    v for k, v in vars(Close).items()
    if k.isupper() and isinstance(v, int)
    and k not in ("APP_FIRST", "NO_RECONNECT_FIRST", "APP_LAST")))


@dataclass(frozen=True, slots=True)
class Disconnect:
    """A server-initiated close: the `disconnect` push fields and the close frame code."""

    code: int
    reason: str

    @property
    def reconnect(self) -> bool:
        return Close.should_reconnect(self.code)


DISCONNECT_DRAINING = Disconnect(Close.DRAINING, "server draining")
DISCONNECT_SLOW = Disconnect(Close.SLOW_CONSUMER, "slow consumer")
DISCONNECT_INSUFFICIENT_STATE = Disconnect(Close.INSUFFICIENT_STATE, "insufficient state")
DISCONNECT_RATE_LIMITED = Disconnect(Close.RATE_LIMITED, "rate limited")
DISCONNECT_INVALID_TOKEN = Disconnect(Close.INVALID_TOKEN, "invalid token")
DISCONNECT_TOKEN_EXPIRED = Disconnect(Close.INVALID_TOKEN, "token expired")
DISCONNECT_TOKEN_REVOKED = Disconnect(Close.INVALID_TOKEN, "token revoked")   # POST /api/revoke
DISCONNECT_ORIGIN = Disconnect(Close.ORIGIN_NOT_ALLOWED, "origin not allowed")
DISCONNECT_CONNECTION_LIMIT = Disconnect(Close.CONNECTION_LIMIT, "connection limit reached")
DISCONNECT_BY_API = Disconnect(Close.DISCONNECTED, "disconnected by the server")

#: what a lifecycle ``disconnect`` record says of a close code when no reason came with
#: it (SPEC §12): RFC 6455's meaning of the 1xxx codes, the server's reasons of the 4xxx
CLOSE_REASONS: dict[int, str] = {
    Close.NORMAL: "normal closure",
    Close.GOING_AWAY: "going away",
    Close.PROTOCOL_ERROR: "protocol error",
    Close.UNSUPPORTED_DATA: "unsupported data",
    Close.NO_STATUS: "no status code",
    Close.ABNORMAL: "connection lost",
    Close.INVALID_PAYLOAD: "invalid payload data",
    Close.POLICY: "policy violation",
    Close.TOO_BIG: "message too big",
    1010: "mandatory extension",
    Close.INTERNAL: "internal error",
    1012: "service restart",
    1013: "try again later",
    1014: "bad gateway",
    **{d.code: d.reason for d in (DISCONNECT_BY_API, DISCONNECT_CONNECTION_LIMIT,
                                  DISCONNECT_ORIGIN, DISCONNECT_INVALID_TOKEN,
                                  DISCONNECT_RATE_LIMITED, DISCONNECT_INSUFFICIENT_STATE,
                                  DISCONNECT_SLOW, DISCONNECT_DRAINING)},
}

#: the reason of an SSE stream the client ended (1001: it went away)
REASON_STREAM_CLOSED = "stream closed by the client"
#: the reason of a long-poll request's session once it is answered
REASON_POLL_ANSWERED = "poll answered"


def close_reason(code: int, reason: str = "") -> str:
    """The reason a connection's end is recorded with: ``reason`` (the text of the close
    frame, or the server's :class:`Disconnect` reason) cut to :data:`MAX_CLOSE_REASON`
    bytes of UTF-8, or when empty the standard description of ``code``."""
    if not reason:
        if code in CLOSE_REASONS:
            return CLOSE_REASONS[code]
        return "application close" if 3000 <= code <= Close.APP_LAST else f"close code {code}"
    raw = reason.encode("utf-8", "replace")
    if len(raw) <= MAX_CLOSE_REASON:
        return reason
    return raw[:MAX_CLOSE_REASON].decode("utf-8", "ignore")
