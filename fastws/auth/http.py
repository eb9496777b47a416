"""The ``/auth/*`` HTTP answers: ``GET /auth/nonce``, ``POST /auth/siwe``, and CORS.

:func:`http_auth` answers them and their preflights, with CORS for the origins of
``allow_origins`` (:func:`cors_headers`); every answer carries ``Vary: Origin``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastws.auth.eip1271 import ContractWallets
from fastws.auth.siwe import Siwe, SiweError
from fastws.config_kinds import origin_key
from fastws.extras import MissingExtra, require_chain

__all__ = ["CORS_ALLOW_HEADERS", "CORS_MAX_AGE", "cors_headers", "http_auth", "origin_listed"]

_AUTH_METHODS = {"/auth/nonce": "GET, HEAD, OPTIONS", "/auth/siwe": "POST, OPTIONS"}
_ORIGIN_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#]+$")
CORS_ALLOW_HEADERS = "Content-Type, Authorization"
CORS_MAX_AGE = 600          # seconds a browser may cache a preflight answer


def origin_listed(origins: Iterable[str], origin: str) -> bool:
    """True if ``origin`` is one of ``origins`` (``allow_origins``), or ``*`` is listed.

    The comparison is :func:`~fastws.config_kinds.origin_key`'s (letter case and a
    trailing ``/`` do not count).  What an empty list or a missing header means is the
    caller's policy: any origin for WebSockets, none for CORS (:func:`cors_headers`).
    """
    return "*" in origins or origin_key(origin) in origins


def cors_headers(origins: Iterable[str], origin: str | None) -> dict[str, str] | None:
    """The CORS headers answering a request from ``origin``, or None if not allowed.

    ``origins`` is ``allow_origins`` (each as :func:`~fastws.config_kinds.origin_key`
    writes it): an origin listed there is allowed, and any origin when ``*`` is listed;
    an empty list allows none (CORS is opt-in, although an empty list lets any origin
    open WebSockets).
    ``null`` (sandboxed frames, ``file:``) is never allowed.  The answer names the
    exact origin; callers add ``Vary: Origin``.
    """
    if not origin or not origins:
        return None
    origin = origin.strip()
    if not _ORIGIN_RE.match(origin) or not origin_listed(origins, origin):
        return None
    return {"Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": "Retry-After"}


async def http_auth(siwe: Siwe, method: str, route: str, headers: dict[str, str],
                    body: bytes, claim: Callable[[str, float], Awaitable[bool]] | None = None,
                    *, origins: Iterable[str] = (), wallets: ContractWallets | None = None,
                    ) -> tuple[int, dict[str, Any] | None, dict[str, str]]:
    """Answer ``GET /auth/nonce``, ``POST /auth/siwe`` and their CORS preflights
    (``OPTIONS``): (status, JSON body or None for none, headers).

    ``headers`` are the request's, lower-cased; ``host`` is the domain a SIWE
    message must name (unless it names a configured ``siwe_domains`` entry).
    ``claim`` is the broker's ``claim_once`` (:meth:`Siwe.sign_in_shared`); without
    it, nonces are spent in this process only.  ``origins`` (``allow_origins``) are
    the origins answered with CORS headers (:func:`cors_headers`): a preflight from
    one of them gets 204 with the allowed methods and headers, from another 403 with
    no CORS header.  ``wallets`` enables EIP-1271 contract-wallet signatures.
    Every answer carries ``Vary: Origin``, with or without an ``Origin`` header.
    """
    origin = headers.get("origin")
    cors = cors_headers(origins, origin)
    vary = {"Vary": "Origin"}
    if method == "OPTIONS" and route in _AUTH_METHODS:
        allow = _AUTH_METHODS[route]
        if origin is None:              # not a browser's preflight
            return 204, None, {"Allow": allow, **vary}
        if cors is None:
            return 403, {"error": "origin not allowed (allow_origins)"}, vary
        return 204, None, {**cors, "Access-Control-Allow-Methods": allow,
                           "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
                           "Access-Control-Max-Age": str(CORS_MAX_AGE), **vary}
    status, obj, extra = await _auth_answer(siwe, method, route, headers, body, claim,
                                            wallets)
    return status, obj, {**extra, **(cors or {}), **vary}


async def _auth_answer(siwe: Siwe, method: str, route: str, headers: dict[str, str],
                       body: bytes, claim: Callable[[str, float], Awaitable[bool]] | None,
                       wallets: ContractWallets | None,
                       ) -> tuple[int, dict[str, Any], dict[str, str]]:
    import orjson

    nocache = {"Cache-Control": "no-store"}
    try:
        if route == "/auth/nonce":
            if method not in ("GET", "HEAD"):
                return 405, {"error": "use GET"}, {"Allow": _AUTH_METHODS[route]}
            return 200, {"nonce": siwe.nonce()}, nocache
        if route == "/auth/siwe":
            if method != "POST":
                return 405, {"error": "use POST"}, {"Allow": _AUTH_METHODS[route]}
            try:
                msg = orjson.loads(body)
            except orjson.JSONDecodeError:
                return 400, {"error": "body must be JSON"}, {}
            if not isinstance(msg, dict):
                return 400, {"error": "body must be a JSON object"}, {}
            try:
                require_chain("Sign-In with Ethereum (/auth/siwe)",
                              ("eth_account", "eth_utils"))
            except MissingExtra as exc:
                return 501, {"error": str(exc)}, {}
            args = (msg.get("message"), msg.get("signature"), headers.get("host"))
            out = (siwe.sign_in(*args) if claim is None
                   else await siwe.sign_in_shared(*args, claim, wallets=wallets))
            return 200, out, nocache
    except SiweError as exc:
        extra = {"Retry-After": "1"} if exc.status == 503 else {}
        return exc.status, {"error": str(exc)}, extra
    return 404, {"error": "not found"}, {}

