"""The exceptions of fastws, one tree rooted at :class:`FastWSError`::

    FastWSError
    ├── ConnectionClosed        the client's connection is closed for good
    │   └── AuthError           … because the server refused the token
    ├── RequestError            the server answered a client request with an error
    ├── RequestTimeout          no reply in time (also a TimeoutError)
    └── BrokerUnavailable       server side: the broker cannot take a call now (503)
"""

from __future__ import annotations

__all__ = [
    "FastWSError",
    "ConnectionClosed",
    "AuthError",
    "RequestError",
    "RequestTimeout",
    "BrokerUnavailable",
]


class FastWSError(Exception):
    """Base class of every error the fastws client raises."""


class ConnectionClosed(FastWSError):
    """The connection is closed.

    Raised by the pending call or ``async for`` once the client has stopped for good:
    the server closed with a code in 4500–4999, sent a ``disconnect`` push with
    ``reconnect: false``, or the client was closed by its owner.

    ``final`` is False only for a ``publish`` whose connection dropped before its
    reply came: the client is reconnecting by itself, but whether that publication
    was accepted is unknown, so it is not sent again behind the caller's back.
    """

    def __init__(self, code: int, reason: str = "", *, final: bool = True) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.final = final

    def __str__(self) -> str:
        return f"connection closed ({self.code}{': ' + self.reason if self.reason else ''})"


class AuthError(ConnectionClosed):
    """The server rejected the token: upgrade refused with HTTP 401/403, or close 4501."""


class RequestError(FastWSError):
    """The server answered a request with an ``error`` reply (``code``, ``message``)."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"request failed ({self.code}{': ' + self.message if self.message else ''})"


class RequestTimeout(FastWSError, TimeoutError):
    """No reply came within the request timeout (waiting for a connection included)."""


class BrokerUnavailable(FastWSError):
    """The broker cannot take the call now: the server answers HTTP 503 / error 503.

    Raised by every :class:`fastws.broker.Broker` (and re-exported there); the
    server's rules (e.g. spending a SIWE nonce) catch it without importing a broker.
    """
