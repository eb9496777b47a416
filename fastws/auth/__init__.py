"""Authentication: client JWTs, Sign-In with Ethereum, and what a token grants.

One module per concern, every public name re-exported here (``from fastws import
auth; auth.verify`` and ``from fastws.auth import Auth`` work as they always did):

- :mod:`fastws.auth.tokens`: :class:`Auth` verifies client JWTs (HS* with
  ``jwt_secret``; RS*/PS*/ES*/EdDSA with ``jwt_public_key``, a PEM key, certificate or
  JWKS file) into an :class:`Identity` (user, grants, ``iat``/``jti``, ``exp``),
  which :meth:`fastws.session.Session.set_identity` binds to a client.
- :mod:`fastws.auth.grants`: :func:`granted` says whether a ``channels`` claim allows
  a channel or pattern; :func:`may_match_prefix` which namespaces a pattern reaches.
- :mod:`fastws.auth.siwe`: :class:`Siwe` implements ``GET /auth/nonce`` and
  ``POST /auth/siwe`` (EIP-4361): a strict parser (:func:`parse_siwe_message`),
  domain and chain id checks, single-use expiring nonces, signature recovery; it
  answers with an HS256 JWT whose ``sub`` is the checksummed address.
- :mod:`fastws.auth.eip1271`: :class:`ContractWallets` checks contract-wallet
  signatures through a JSON-RPC node (``isValidSignature``), when ``siwe_rpc_url``
  is set.
- :mod:`fastws.auth.http`: :func:`http_auth` answers the ``/auth/*`` requests, with
  CORS for the origins of ``allow_origins`` (:func:`cors_headers`, which
  :func:`origin_listed` compares with the list).

Who owns a private channel (:func:`same_owner`, :func:`is_address`) is a channel
rule, defined in :mod:`fastws.channels` and re-exported here.

Nothing here does socket I/O but :class:`ContractWallets`' RPC calls (asynchronous,
with a deadline); the server calls these from its request handlers.
"""

from __future__ import annotations

from fastws.auth.eip1271 import ContractWallets
from fastws.auth.grants import granted, may_match_prefix
from fastws.auth.http import (
    CORS_ALLOW_HEADERS,
    CORS_MAX_AGE,
    cors_headers,
    http_auth,
    origin_listed,
)
from fastws.auth.siwe import MAX_MESSAGE, Siwe, SiweError, SiweMessage, parse_siwe_message
from fastws.auth.tokens import HMAC_ALGORITHMS, Auth, AuthError, Identity
from fastws.channels import is_address, same_owner

__all__ = [
    "CORS_ALLOW_HEADERS",
    "CORS_MAX_AGE",
    "HMAC_ALGORITHMS",
    "MAX_MESSAGE",
    "Auth",
    "AuthError",
    "ContractWallets",
    "Identity",
    "Siwe",
    "SiweError",
    "SiweMessage",
    "cors_headers",
    "granted",
    "http_auth",
    "is_address",
    "may_match_prefix",
    "origin_listed",
    "parse_siwe_message",
    "same_owner",
]
