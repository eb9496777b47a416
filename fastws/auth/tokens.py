"""Client JWTs: key loading, verification, issuing, and binding a token to a connection.

:class:`Auth` verifies client JWTs (pyjwt): HS256/384/512 with ``jwt_secret``;
RS*/PS*/ES*/EdDSA with ``jwt_public_key``, a PEM public key or certificate, or a JWKS
file (``{"keys": [...]}``, the key picked by the token's ``kid``).  A valid token
gives an :class:`Identity`: ``sub``, ``exp`` and the optional ``channels`` claim
(glob patterns the connection is limited to, see :mod:`fastws.auth.grants`).
:func:`attach` binds an Identity to a connection and arms its expiry.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

from fastws import channels

__all__ = ["HMAC_ALGORITHMS", "Auth", "AuthError", "Identity"]

HMAC_ALGORITHMS = ["HS256", "HS384", "HS512"]
_RSA_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512",
                  "secp256k1": "ES256K"}


class AuthError(ValueError):
    """A token that is not accepted; ``str(err)`` is the reason, ``expired`` says why."""

    def __init__(self, message: str, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True, slots=True)
class Identity:
    """What a verified token says: who, until when, and which channels."""

    user: str
    expires: float | None = None                 # unix time (``exp``), None = never
    channels: tuple[str, ...] | None = None      # ``channels`` claim, None = no limit
    issued: float | None = None                  # ``iat`` (unix time), None = absent
    jti: str | None = None                       # ``jti`` (a token id), if a string
    claims: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _algorithms_for(key: Any) -> list[str]:
    """The JWS algorithms that may be verified with a public key object."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    if isinstance(key, rsa.RSAPublicKey):
        return list(_RSA_ALGORITHMS)
    if isinstance(key, ec.EllipticCurvePublicKey):
        alg = _EC_ALGORITHMS.get(key.curve.name)
        if alg is None:
            raise ValueError(f"unsupported elliptic curve {key.curve.name}")
        return [alg]
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ["EdDSA"]
    raise ValueError(f"unsupported public key type {type(key).__name__}")


def _load_public_keys(path: str) -> tuple[Any, list[str], dict[str | None, Any]]:
    """Read a PEM public key, a PEM certificate or a JWKS file.

    Returns ``(key, algorithms, jwks)``: for PEM ``jwks`` is empty; for JWKS ``key``
    is None and ``jwks`` maps each ``kid`` (None when a key has none) to a PyJWK.
    """
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw.lstrip().startswith(b"{"):
        import jwt

        doc = json.loads(raw)
        keys = doc.get("keys", [doc]) if isinstance(doc, dict) else None
        if not isinstance(keys, list) or not keys:
            raise ValueError(f"{path}: a JWKS file needs a non-empty \"keys\" array")
        jwks: dict[str | None, Any] = {}
        for item in keys:
            if not isinstance(item, dict) or item.get("use", "sig") != "sig":
                continue
            if item.get("kty") == "oct":
                raise ValueError(f"{path}: symmetric (oct) keys are not accepted in a JWKS "
                                 "file; use jwt_secret")
            jwk = jwt.PyJWK.from_dict(item)
            jwks[item.get("kid")] = jwk
        if not jwks:
            raise ValueError(f"{path}: no signing key in the JWKS file")
        return None, [], jwks
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if b"-----BEGIN CERTIFICATE-----" in raw:
        key = x509.load_pem_x509_certificate(raw).public_key()
    else:
        key = load_pem_public_key(raw)
    return key, _algorithms_for(key), {}


class Auth:
    """Verifies client JWTs with the configured secret, public key or JWKS (pyjwt).

    ``Auth(secret, public_key_file)``; :attr:`enabled` is False when neither is set,
    and then every token is refused.  :meth:`issue` signs HS256 tokens (SIWE) and
    needs the secret.
    """

    def __init__(self, secret: str | None, public_key_file: str | None) -> None:
        self.secret = secret or None
        self.key: Any = None
        self.algorithms: list[str] = []
        self.jwks: dict[str | None, Any] = {}
        if self.secret:
            self.key, self.algorithms = self.secret, list(HMAC_ALGORITHMS)
        elif public_key_file:
            self.key, self.algorithms, self.jwks = _load_public_keys(public_key_file)

    @property
    def enabled(self) -> bool:
        """True when tokens can be verified."""
        return self.key is not None or bool(self.jwks)

    @property
    def can_issue(self) -> bool:
        """True when this server can sign tokens (a jwt_secret is configured)."""
        return self.secret is not None

    def _key_for(self, token: str) -> tuple[Any, list[str]]:
        if not self.jwks:
            return self.key, self.algorithms
        import jwt

        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        jwk = self.jwks.get(kid)
        if jwk is None and kid is None and len(self.jwks) == 1:
            jwk = next(iter(self.jwks.values()))
        if jwk is None:
            raise AuthError(f"invalid token: no key with kid {str(kid)[:64]!r}")
        return jwk.key, [jwk.algorithm_name]

    def verify(self, token: str, now: float | None = None) -> Identity:
        """Return the token's :class:`Identity`; raise :class:`AuthError` if not valid.

        ``sub`` must be a non-empty string; ``exp``/``nbf``/``iat`` are checked by
        pyjwt (``expired`` is set on the error when ``exp`` has passed); ``channels``,
        if present, must be a list of channel names or patterns.
        """
        if not self.enabled:
            raise AuthError("authentication is not configured on this server")
        import jwt

        key, algorithms = self._key_for(token)
        options: dict[str, Any] = {"require": ["sub"]}
        try:
            claims = jwt.decode(token, key, algorithms=algorithms, options=options)
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired", expired=True) from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise AuthError("invalid token: sub must be a non-empty string")
        exp = claims.get("exp")
        grants = claims.get("channels")
        if grants is not None:
            if not isinstance(grants, list) or len(grants) > 1024:
                raise AuthError("invalid token: channels must be a list of patterns")
            try:
                grants = tuple(channels.validate(g, 1024) for g in grants)
            except channels.ChannelError as exc:
                raise AuthError(f"invalid token: channels: {exc}") from None
        iat, jti = claims.get("iat"), claims.get("jti")
        issued = float(iat) if isinstance(iat, int | float) and not isinstance(iat, bool) \
            else None
        return Identity(sub, float(exp) if exp is not None else None, grants,
                        issued, jti if isinstance(jti, str) else None, claims)

    def issue(self, sub: str, ttl: float, now: float | None = None, **extra: Any) -> str:
        """Sign an HS256 token for ``sub`` valid ``ttl`` seconds (needs jwt_secret).

        It carries ``iat`` and a random ``jti`` (32 hex digits) unless ``extra`` names
        one: ``POST /api/revoke`` can revoke it alone by that id."""
        if self.secret is None:
            raise AuthError("this server has no jwt_secret to sign tokens with")
        import jwt

        now = time.time() if now is None else now
        claims = {"sub": sub, "iat": int(now), "exp": int(now + ttl),
                  "jti": os.urandom(16).hex(), **extra}
        return jwt.encode(claims, self.secret, algorithm="HS256")
