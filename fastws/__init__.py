"""fastws: a fast WebSocket pub/sub server.

The compiled core (``fastws._match``) is required: importing fastws without it
raises ImportError with instructions, never a silent pure-Python fallback.
"""

from fastws._version import __version__

try:
    from fastws import _match  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised by packaging tests
    raise ImportError(
        "fastws: the compiled extension fastws._match is missing or broken "
        f"({exc}). Build it with `make build` or `pip install .` "
        "(needs Cython and a C compiler)."
    ) from exc

from fastws.client import Client, Event, Subscription, connect  # noqa: E402
from fastws.errors import (  # noqa: E402
    AuthError,
    ConnectionClosed,
    FastWSError,
    RequestError,
    RequestTimeout,
)

__all__ = [
    "AuthError",
    "Client",
    "ConnectionClosed",
    "Event",
    "FastWSError",
    "RequestError",
    "RequestTimeout",
    "Subscription",
    "__version__",
    "connect",
]
