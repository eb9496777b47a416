"""Timing rules of the Python client: reconnect backoff and ahead-of-time token refresh.

Pure functions, no I/O: :func:`backoff_delay` spaces reconnect attempts;
:func:`token_claims`, :func:`token_expires_in` and :func:`refresh_delay` decide when a
JWT is replaced on the live connection (the server alone verifies tokens).
"""

from __future__ import annotations

import base64
import random
import time
from collections.abc import Callable
from typing import Any

import orjson

__all__ = ["backoff_delay", "refresh_delay", "token_claims", "token_expires_in"]

_REFRESH_SPREAD_CAP = 60.0  # seconds: the most a refresh is moved earlier by jitter


def backoff_delay(failures: int, *, base: float = 0.5, cap: float = 20.0,
                  rand: Callable[[], float] = random.random) -> float:
    """Delay before the next attempt after the ``failures``-th failure in a row (0-based).

    Full jitter: uniform in [0, min(cap, base * 2**failures)]. ``rand`` returns a float
    in [0, 1) (``random.random`` by default; inject your own for tests).
    """
    ceiling = min(cap, base * (2.0 ** min(failures, 64)))
    return rand() * ceiling


def token_claims(token: str) -> dict[str, Any] | None:
    """The claims (payload) of a JWT, decoded *without* verifying its signature.

    Only for timing the token's refresh: the server is what verifies tokens. Returns None
    when ``token`` is not a JWT (three base64url parts whose middle one is a JSON object),
    e.g. an opaque token: such a token is then never refreshed ahead of time.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = orjson.loads(raw)
    except ValueError:  # binascii.Error, non-ASCII text and orjson.JSONDecodeError alike
        return None
    return claims if isinstance(claims, dict) else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def token_expires_in(token: str, now: float | None = None) -> float | None:
    """Seconds until the JWT ``token`` expires by its ``exp`` claim, or None without one.

    The client's clock (``time.time()``, or ``now``) is used, checked against the
    token's ``iat`` when it has one: a token issued "in the future" (the client's clock
    is behind the issuer's) or already past ``exp`` (the client's clock is ahead: the
    server has just accepted it) is taken to have its whole lifetime, ``exp - iat``,
    left. A fast clock otherwise only makes the refresh come early. None also when
    the token has expired by every measure (nothing to time).
    """
    claims = token_claims(token)
    if claims is None:
        return None
    exp = _number(claims.get("exp"))
    if exp is None:
        return None
    left = exp - (time.time() if now is None else now)
    iat = _number(claims.get("iat"))
    if iat is not None and exp > iat:
        lifetime = exp - iat
        if left > lifetime or left <= 0:  # the clocks disagree: trust the token's own span
            left = lifetime
    return left if left > 0 else None


def refresh_delay(remaining: float, *, margin: float = 10.0,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before refreshing a token that expires in ``remaining`` seconds.

    The refresh comes ``min(margin, remaining / 5)`` before expiry (i.e. at
    ``max(remaining - margin, 80 % of remaining)``), moved earlier by a random jitter of
    up to ``min(remaining / 10, 60 s)`` so that clients whose tokens expire together do
    not all ask for new ones at once. ``rand`` returns a float in [0, 1).
    """
    if remaining <= 0:
        return 0.0
    lead = min(margin, remaining / 5.0)
    jitter = rand() * min(remaining / 10.0, _REFRESH_SPREAD_CAP)
    return max(0.0, remaining - lead - jitter)
