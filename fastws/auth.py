"""Authentication: client JWTs, Sign-In with Ethereum, and what a token grants.

- :class:`Auth` verifies client JWTs (pyjwt): HS256/384/512 with ``jwt_secret``;
  RS*/PS*/ES*/EdDSA with ``jwt_public_key``, a PEM public key or certificate, or a
  JWKS file (``{"keys": [...]}``, the key picked by the token's ``kid``).  A valid
  token gives an :class:`Identity`: ``sub``, ``exp`` and the optional ``channels``
  claim (glob patterns the connection is limited to).
- :class:`Siwe` implements ``GET /auth/nonce`` and ``POST /auth/siwe`` (EIP-4361):
  a strict message parser (:func:`parse_siwe_message`), domain and chain id checks,
  single-use expiring nonces, and signature recovery with eth-account; it answers
  with an HS256 JWT whose ``sub`` is the checksummed address.
- :class:`ContractWallets` checks EIP-1271 contract-wallet signatures through a
  JSON-RPC node (``isValidSignature``), when ``siwe_rpc_url`` is set.
- :func:`http_auth` answers the ``/auth/*`` requests, with CORS for the origins of
  ``allow_origins`` (:func:`cors_headers`).
- :func:`attach` binds an Identity to a connection (user, grants, and ``iat``/``jti``,
  which a revocation is checked against) and arms its expiry: when ``exp`` passes,
  the connection gets a ``disconnect`` push and close 4501 "token expired", unless an
  ``auth`` message brought a newer token first.
- :func:`granted` says whether a ``channels`` claim allows a channel or pattern.

Nothing here does socket I/O but :class:`ContractWallets`' RPC calls (asynchronous,
with a deadline); the server calls these from its request handlers.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import re
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fastws import channels
from fastws._match import glob_match
from fastws.broker.base import BrokerUnavailable
from fastws.limits import Bucket

if TYPE_CHECKING:
    from fastws.server import Connection

__all__ = [
    "Auth",
    "AuthError",
    "ContractWallets",
    "Identity",
    "Siwe",
    "SiweError",
    "SiweMessage",
    "attach",
    "cors_headers",
    "granted",
    "http_auth",
    "is_address",
    "parse_siwe_message",
    "same_owner",
]

HMAC_ALGORITHMS = ["HS256", "HS384", "HS512"]
_RSA_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512",
                  "secp256k1": "ES256K"}
_ADDRESS_RE = re.compile(r"^0x[0-9a-fA-F]{40}$")

log = logging.getLogger("fastws.auth")


def is_address(text: str) -> bool:
    """True for a 0x-prefixed 20-byte hex address (any letter case)."""
    return bool(_ADDRESS_RE.match(text))


def same_owner(owner: str, user: str) -> bool:
    """True if ``user`` owns a private channel whose name ends in ``owner``.

    Exact equality, or, for 0x addresses, equality ignoring letter case (EIP-55
    checksums are only a letter-case encoding of the same 20 bytes).
    """
    if owner == user:
        return True
    return is_address(owner) and is_address(user) and owner.lower() == user.lower()


# --------------------------------------------------------------------------- JWT


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


def _literal_prefix(pattern: str) -> str:
    for i, ch in enumerate(pattern):
        if ch in channels.PATTERN_CHARS:
            return pattern[:i]
    return pattern


def granted(grants: Iterable[str], name: str) -> bool:
    """True if a ``channels`` claim allows the channel or pattern ``name``.

    A channel is allowed when one of the claim's patterns matches it (Redis glob).
    A pattern subscription is allowed only when every channel it can match is
    allowed, which is decided conservatively: the claim lists the same pattern, or
    a ``PREFIX*`` entry (a literal prefix then one ``*``) whose prefix starts the
    pattern's own literal prefix (``market:*`` allows ``market:0xab*``).
    """
    if not channels.is_pattern(name):
        return any(g == name or glob_match(g, name) for g in grants)
    prefix = _literal_prefix(name)
    for g in grants:
        if g == name:
            return True
        if g.endswith("*") and not channels.is_pattern(g[:-1]) and prefix.startswith(g[:-1]):
            return True
    return False


def _glob_tokens(pattern: str) -> list[str | None]:
    """A pattern as tokens: a literal character, ``"*"`` for a star, or None for one
    byte of any value (``?``, and any ``[...]`` class, over-approximated)."""
    out: list[str | None] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "*":
            out.append("*")
        elif ch == "?":
            out.append(None)
        elif ch == "[":
            j = pattern.find("]", i + 2)
            out.append(None)
            if j < 0:
                return out + ["*"]      # an unterminated class: assume anything follows
            i = j
        elif ch == "\\" and i + 1 < n:
            i += 1
            out.append("\\" + pattern[i])
        else:
            out.append(ch)
        i += 1
    return out


def may_match_prefix(pattern: str, prefix: str) -> bool:
    """True if some channel starting with ``prefix`` might match the glob ``pattern``.

    Over-approximates (character classes count as any byte), so a False is certain:
    used to find the namespaces a pattern that spans namespaces can reach.
    """
    toks = _glob_tokens(pattern)
    n = len(toks)

    def close(states: set[int]) -> set[int]:
        out = set(states)
        stack = list(states)
        while stack:
            i = stack.pop()
            if i < n and toks[i] == "*" and i + 1 not in out:
                out.add(i + 1)
                stack.append(i + 1)
        return out

    states = close({0})
    for ch in prefix:
        nxt: set[int] = set()
        for i in states:
            if i >= n:
                continue
            t = toks[i]
            if t == "*":
                nxt.add(i)
            elif t is None or t == ch or (len(t) == 2 and t[1] == ch):
                nxt.add(i + 1)
        if not nxt:
            return False
        states = close(nxt)
    return bool(states)


def attach(conn: Connection, identity: Identity | None, loop: Any) -> None:
    """Bind ``identity`` to ``conn`` (user, grants) and arm its expiry timer.

    When the token's ``exp`` passes the connection gets ``disconnect`` (4501,
    "token expired", reconnect false) and is closed, unless ``attach`` was called
    again with a newer token first (an ``auth`` message refreshing it).
    """
    from fastws.codes import DISCONNECT_TOKEN_EXPIRED

    old = conn.expiry
    if old is not None:
        old.cancel()
        conn.expiry = None
    if identity is None:
        conn.user, conn.grants, conn.iat, conn.jti = None, None, None, None
        return
    conn.user, conn.grants = identity.user, identity.channels
    conn.iat, conn.jti = identity.issued, identity.jti   # what a revocation is checked on
    if identity.expires is not None:
        delay = max(0.0, identity.expires - time.time())
        conn.expiry = loop.call_later(delay, conn.disconnect, DISCONNECT_TOKEN_EXPIRED)


# --------------------------------------------------------------------------- SIWE


class SiweError(ValueError):
    """A refused sign-in: ``status`` is the HTTP status, ``str(err)`` the reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class SiweMessage:
    """The fields of an EIP-4361 message."""

    domain: str
    address: str
    uri: str
    version: str
    chain_id: int
    nonce: str
    issued_at: datetime
    statement: str | None = None
    scheme: str | None = None
    expiration_time: datetime | None = None
    not_before: datetime | None = None
    request_id: str | None = None
    resources: tuple[str, ...] = ()


_HEADER_RE = re.compile(
    r"^(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://)?(?P<domain>[^\s/?#@]+(?::[0-9]+)?) "
    r"wants you to sign in with your Ethereum account:$")
_URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s]+$")
_NONCE_RE = re.compile(r"^[A-Za-z0-9]{8,}$")
_DATETIME_RE = re.compile(
    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})$")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9\-._~!$&'()*+,;=:@%/?]*$")
_TAGS = ("URI", "Version", "Chain ID", "Nonce", "Issued At", "Expiration Time",
         "Not Before", "Request ID")
_REQUIRED = ("URI", "Version", "Chain ID", "Nonce", "Issued At")
MAX_MESSAGE = 8192


def _datetime(text: str, tag: str) -> datetime:
    if not _DATETIME_RE.match(text):
        raise SiweError(400, f"{tag} must be an RFC 3339 date-time, got {text[:40]!r}")
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise SiweError(400, f"{tag} is not a valid date-time: {text[:40]!r}") from None
    return value


def parse_siwe_message(text: str) -> SiweMessage:
    """Parse an EIP-4361 message strictly (LF line ends, fields in the EIP's order).

    Raises :class:`SiweError` (400) naming the first problem.  The address must be a
    valid EIP-55 checksum when it is mixed-case.
    """
    if not isinstance(text, str) or not text or len(text) > MAX_MESSAGE:
        raise SiweError(400, f"message must be a string of 1-{MAX_MESSAGE} characters")
    if "\r" in text:
        raise SiweError(400, "message lines must end with LF, not CRLF")
    lines = text.split("\n")
    if len(lines) < 8:
        raise SiweError(400, "message is not an EIP-4361 message (too few lines)")
    head = _HEADER_RE.match(lines[0])
    if head is None:
        raise SiweError(400, "first line must be '<domain> wants you to sign in with your "
                        "Ethereum account:'")
    address = lines[1]
    if not is_address(address):
        raise SiweError(400, "second line must be a 0x Ethereum address")
    from eth_utils import is_checksum_address

    if address != address.lower() and address[2:] != address[2:].upper() and \
            not is_checksum_address(address):
        raise SiweError(400, "address has an invalid EIP-55 checksum")
    if lines[2] != "":
        raise SiweError(400, "the address must be followed by an empty line")
    i = 3
    statement = None
    if lines[i] != "" and not lines[i].startswith("URI: "):
        statement = lines[i]
        i += 1
    if lines[i] == "":              # the empty line after the statement (or in its place)
        i += 1
    fields: dict[str, str] = {}
    order = iter(_TAGS)
    resources: list[str] = []
    while i < len(lines):
        line = lines[i]
        i += 1
        if line == "Resources:":
            resources = lines[i:]
            for r in resources:
                if not r.startswith("- ") or not _URI_RE.match(r[2:]):
                    raise SiweError(400, f"bad resource line {r[:60]!r}")
            resources = [r[2:] for r in resources]
            break
        tag, sep, value = line.partition(": ")
        if not sep or tag not in _TAGS:
            raise SiweError(400, f"unexpected line {line[:60]!r}")
        for expected in order:      # tags must come in the EIP's order, each once
            if expected == tag:
                break
        else:
            raise SiweError(400, f"field {tag!r} is out of order or repeated")
        fields[tag] = value
    for tag in _REQUIRED:
        if tag not in fields:
            raise SiweError(400, f"message lacks the {tag!r} field")
    if not _URI_RE.match(fields["URI"]):
        raise SiweError(400, "URI must be an absolute URI")
    if fields["Version"] != "1":
        raise SiweError(400, "Version must be 1")
    if not fields["Chain ID"].isdigit() or not fields["Chain ID"].isascii():
        raise SiweError(400, "Chain ID must be a decimal integer")
    if not _NONCE_RE.match(fields["Nonce"]):
        raise SiweError(400, "Nonce must be at least 8 letters and digits")
    rid = fields.get("Request ID")
    if rid is not None and not _REQUEST_ID_RE.match(rid):
        raise SiweError(400, "bad Request ID")
    return SiweMessage(
        domain=head["domain"], scheme=head["scheme"], address=address,
        statement=statement, uri=fields["URI"], version="1",
        chain_id=int(fields["Chain ID"][:80]), nonce=fields["Nonce"],
        issued_at=_datetime(fields["Issued At"], "Issued At"),
        expiration_time=(_datetime(fields["Expiration Time"], "Expiration Time")
                         if "Expiration Time" in fields else None),
        not_before=(_datetime(fields["Not Before"], "Not Before")
                    if "Not Before" in fields else None),
        request_id=rid, resources=tuple(resources))


class Siwe:
    """Sign-In with Ethereum for one node: nonces, checks, and token issuing.

    Nonces are stateless and single use: ``random ‖ expiry ‖ HMAC(secret)`` in hex,
    so any worker sharing the ``jwt_secret`` accepts a nonce another one issued;
    each process remembers the nonces it has seen until they expire and refuses a
    second use, and :meth:`sign_in_shared` also spends them through the broker
    (``claim_once``), so that a nonce works once on every process and node sharing it.
    Signature recovery costs CPU (about 0.2 ms with coincurve, 8 ms in
    pure Python), so at most ``max_verify_per_s`` run per second; beyond, 503.
    """

    NONCE_TTL = 300.0           # seconds a nonce may be used after GET /auth/nonce
    TOKEN_TTL = 3600.0          # seconds an issued token is valid (capped by Expiration Time)
    CLOCK_SKEW = 300.0          # Issued At may be this far in the future
    MAX_USED = 200_000          # nonces remembered at once; beyond, sign-in answers 503

    def __init__(self, auth: Auth, domains: Iterable[str] = (),
                 chain_ids: Iterable[int] = (), max_verify_per_s: int = 100) -> None:
        self.auth = auth
        self.domains = {d.lower() for d in domains}
        self.chain_ids = frozenset(chain_ids)
        self.used: dict[str, float] = {}
        self.max_verify_per_s = max_verify_per_s
        self._verify_bucket = Bucket(max_verify_per_s, time.monotonic())
        key = (auth.secret or "").encode()
        self._nonce_key = hmac.new(key, b"fastws siwe nonce v1", hashlib.sha256).digest()

    def _tag(self, body: bytes) -> bytes:
        return hmac.new(self._nonce_key, body, hashlib.sha256).digest()[:10]

    def nonce(self, now: float | None = None) -> str:
        """A fresh nonce (48 hex digits) valid for :attr:`NONCE_TTL` seconds."""
        self._require_secret()
        now = time.time() if now is None else now
        body = os.urandom(10) + struct.pack(">I", int(now + self.NONCE_TTL))
        return (body + self._tag(body)).hex()

    def _require_secret(self) -> None:
        if not self.auth.can_issue:
            raise SiweError(501, "Sign-In with Ethereum is not available: the server has "
                            "no jwt_secret (--jwt-secret) to sign tokens with")

    def _nonce_expiry(self, nonce: str, now: float) -> float:
        try:
            raw = bytes.fromhex(nonce)
        except ValueError:
            raw = b""
        if len(raw) != 24 or not hmac.compare_digest(self._tag(raw[:14]), raw[14:]):
            raise SiweError(401, "unknown nonce (get one from GET /auth/nonce)")
        expiry = struct.unpack(">I", raw[10:14])[0]
        if expiry <= now:
            raise SiweError(401, "nonce expired (get a new one from GET /auth/nonce)")
        return float(expiry)

    def _domain_ok(self, domain: str, host: str | None) -> bool:
        domain = domain.lower()
        if host and domain == host.strip().lower():
            return True
        if domain in self.domains:
            return True
        name = domain.rsplit(":", 1)[0] if domain.rsplit(":", 1)[-1].isdigit() else domain
        return name in self.domains

    def sign_in(self, message: object, signature: object, host: str | None,
                now: float | None = None) -> dict[str, Any]:
        """Check a signed EIP-4361 message; return ``{"token", "sub", "exp", "jti"}``
        (``jti``: the token's id, for ``POST /api/revoke``).

        Raises :class:`SiweError` with the HTTP status: 400 malformed, 401 nonce or
        signature refused (a nonce works once), 403 domain or chain id not allowed,
        501 no jwt_secret, 503 too many sign-ins at once.  The nonce is spent in this
        process only, and only signatures by the address's own key are accepted; the
        server uses :meth:`sign_in_shared`.
        """
        msg, now, _ = self._spend(message, signature, host, now)
        return self._issue(msg, _recover(message, signature), now)

    async def sign_in_shared(self, message: object, signature: object, host: str | None,
                             claim: Callable[[str, float], Awaitable[bool]],
                             now: float | None = None,
                             wallets: ContractWallets | None = None) -> dict[str, Any]:
        """:meth:`sign_in`, the nonce also spent through ``claim`` (the broker's
        ``claim_once``): with a shared broker it works once across every process and
        node, not only in this one.  The claim lasts until the nonce expires plus
        :attr:`CLOCK_SKEW`, for nodes whose clocks differ.  503 when the broker cannot
        record it (the nonce is spent here anyway: the client gets a new one).

        With ``wallets``, a signature that does not recover to the message's address
        is also accepted when that address is a contract whose EIP-1271
        ``isValidSignature`` accepts it (:meth:`ContractWallets.verify`; 503 when the
        RPC node cannot tell).
        """
        msg, now, expiry = self._spend(message, signature, host, now)
        try:
            first = await claim("siwe:" + msg.nonce.lower(), expiry - now + self.CLOCK_SKEW)
        except BrokerUnavailable:
            raise SiweError(503, "cannot record the nonce now (broker unavailable); "
                            "get a new nonce and retry") from None
        if not first:
            raise SiweError(401, "nonce already used (replay refused)")
        signer = _recover(message, signature)
        if (signer is None or signer.lower() != msg.address.lower()) and wallets is not None \
                and await wallets.verify(msg.address, message, signature, msg.chain_id):
            from eth_utils import to_checksum_address

            signer = to_checksum_address(msg.address)
        return self._issue(msg, signer, now)

    def _spend(self, message: object, signature: object, host: str | None,
               now: float | None) -> tuple[SiweMessage, float, float]:
        """Every check before the signature; spends the nonce in this process."""
        self._require_secret()
        now = time.time() if now is None else now
        if not isinstance(message, str) or not isinstance(signature, str):
            raise SiweError(400, "body must be {\"message\": string, \"signature\": string}")
        msg = parse_siwe_message(message)
        if not self._domain_ok(msg.domain, host):
            raise SiweError(403, f"domain {msg.domain[:80]!r} is not this server's")
        if self.chain_ids and msg.chain_id not in self.chain_ids:
            raise SiweError(403, f"chain id {msg.chain_id} is not allowed")
        ts = lambda d: d.timestamp()  # noqa: E731
        if msg.expiration_time is not None and ts(msg.expiration_time) <= now:
            raise SiweError(401, "message expired (Expiration Time has passed)")
        if msg.not_before is not None and ts(msg.not_before) > now:
            raise SiweError(401, "message not yet valid (Not Before is in the future)")
        if ts(msg.issued_at) > now + self.CLOCK_SKEW:
            raise SiweError(401, "Issued At is in the future")
        expiry = self._nonce_expiry(msg.nonce, now)
        self._forget_expired(now)
        if msg.nonce in self.used:
            raise SiweError(401, "nonce already used (replay refused)")
        if len(self.used) >= self.MAX_USED:
            raise SiweError(503, "too many sign-ins in progress; retry later")
        if self._verify_bucket.take(self.max_verify_per_s, 1.0, time.monotonic()):
            raise SiweError(503, "too many sign-ins at once; retry later")
        self.used[msg.nonce] = expiry          # spent from its first presentation on
        return msg, now, expiry

    def _issue(self, msg: SiweMessage, signer: str | None, now: float) -> dict[str, Any]:
        """The token for ``signer`` (checksummed), if it is the message's address."""
        if signer is None or signer.lower() != msg.address.lower():
            raise SiweError(401, "signature does not match the message's address")
        ttl = self.TOKEN_TTL
        if msg.expiration_time is not None:
            ttl = min(ttl, msg.expiration_time.timestamp() - now)
        jti = os.urandom(16).hex()
        token = self.auth.issue(signer, ttl, now, chain_id=msg.chain_id, jti=jti)
        return {"token": token, "sub": signer, "exp": int(now + ttl), "jti": jti}

    def _forget_expired(self, now: float) -> None:
        if not self.used:
            return
        first = next(iter(self.used.values()))
        if first > now and len(self.used) < self.MAX_USED // 2:
            return
        for k in [k for k, exp in self.used.items() if exp <= now]:
            del self.used[k]


# --------------------------------------------------------------------------- EIP-1271


class ContractWallets:
    """EIP-1271 signature checks for contract wallets, through one JSON-RPC node.

    ``ContractWallets(url, timeout)``: :meth:`verify` asks the node (web3's
    ``AsyncHTTPProvider``, no retries) for its chain id (once), the address's code
    and, when it has code, ``isValidSignature(bytes32 hash, bytes signature)`` with
    the message's EIP-191 hash; the signature is valid iff the call returns the magic
    value ``0x1626ba7e``.  The calls of one check take at most ``timeout`` seconds in
    all, and never block the event loop (web3 is even imported in a thread).
    """

    MAGIC = bytes.fromhex("1626ba7e")       # bytes4(keccak256("isValidSignature(bytes32,bytes)"))
    MAX_SIGNATURE = 4096                    # bytes (multisig wallets concatenate signatures)

    def __init__(self, url: str, timeout: float = 5.0) -> None:
        self.url = url
        self.timeout = timeout
        self.chain_id: int | None = None    # the node's, once asked
        self._w3: Any = None

    async def _web3(self) -> Any:
        if self._w3 is None:
            import importlib

            await asyncio.to_thread(importlib.import_module, "web3")   # ~0.5 s of CPU
            import aiohttp
            from web3 import AsyncHTTPProvider, AsyncWeb3

            if self._w3 is None:
                provider = AsyncHTTPProvider(
                    self.url, exception_retry_configuration=None,
                    request_kwargs={"timeout": aiohttp.ClientTimeout(total=self.timeout)})
                self._w3 = AsyncWeb3(provider)
        return self._w3

    async def verify(self, address: str, message: str, signature: str, chain_id: int) -> bool:
        """True if the contract at ``address`` accepts ``signature`` of ``message``.

        False when the address has no code (an EOA whose key did not sign), when the
        signature is not hex, and when the contract answers anything but the magic
        value or reverts.  Raises :class:`SiweError` 401 when ``chain_id`` is not the
        node's chain (the contract there may be another one), and 503 "could not
        verify contract wallet" when the node fails or does not answer in time.
        """
        sig = signature[2:] if signature[:2] in ("0x", "0X") else signature
        if not sig or len(sig) % 2 or len(sig) > 2 * self.MAX_SIGNATURE:
            return False
        try:
            raw = bytes.fromhex(sig)
        except ValueError:
            return False
        try:
            w3 = await self._web3()         # (the first import is not the node's time)
            return await asyncio.wait_for(self._verify(w3, address, message, raw, chain_id),
                                          self.timeout)
        except SiweError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the node is a 503
            log.warning("could not verify an EIP-1271 signature of %s: %s: %s", address,
                        type(exc).__name__, self._redact(str(exc))[:300])
            raise SiweError(503, "could not verify contract wallet: the RPC node failed or "
                            "did not answer in time; get a new nonce and retry") from None

    def _redact(self, text: str) -> str:
        """``text`` without the parts of the URL that may hold an API key."""
        from urllib.parse import urlsplit

        parts = urlsplit(self.url)
        for secret in (parts.path, parts.query, parts.username, parts.password):
            if secret and len(secret) > 1:
                text = text.replace(secret, "…")
        return text

    async def _verify(self, w3: Any, address: str, message: str, signature: bytes,
                      chain_id: int) -> bool:
        from eth_abi import encode
        from eth_utils import keccak, to_checksum_address
        from web3.exceptions import ContractLogicError

        if self.chain_id is None:
            self.chain_id = int(await w3.eth.chain_id)
        if chain_id != self.chain_id:
            raise SiweError(401, "signature does not match the message's address (contract "
                            f"wallets are verified on chain {self.chain_id} only, the message "
                            f"names chain {chain_id})")
        to = to_checksum_address(address)
        if not await w3.eth.get_code(to):
            return False
        text = message.encode()
        digest = keccak(b"\x19Ethereum Signed Message:\n" + str(len(text)).encode() + text)
        data = self.MAGIC + encode(["bytes32", "bytes"], [digest, signature])
        try:
            out = bytes(await w3.eth.call({"to": to, "data": data}))
        except ContractLogicError:       # reverted: the wallet refuses
            return False
        return out[:32] == self.MAGIC + bytes(28)

    async def close(self) -> None:
        """Close the HTTP session to the node."""
        if self._w3 is not None:
            await self._w3.provider.disconnect()
            self._w3 = None


# --------------------------------------------------------------------------- HTTP

_AUTH_METHODS = {"/auth/nonce": "GET, HEAD, OPTIONS", "/auth/siwe": "POST, OPTIONS"}
_ORIGIN_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^\s/?#]+$")
CORS_ALLOW_HEADERS = "Content-Type, Authorization"
CORS_MAX_AGE = 600          # seconds a browser may cache a preflight answer


def cors_headers(origins: Iterable[str], origin: str | None) -> dict[str, str] | None:
    """The CORS headers answering a request from ``origin``, or None if not allowed.

    ``origins`` is ``allow_origins`` (lower-case, without a trailing ``/``): an origin
    listed there is allowed, and any origin when ``*`` is listed; an empty list allows
    none (CORS is opt-in, although an empty list lets any origin open WebSockets).
    ``null`` (sandboxed frames, ``file:``) is never allowed.  The answer names the
    exact origin; callers add ``Vary: Origin``.
    """
    if not origin or not origins:
        return None
    origin = origin.strip()
    norm = origin.rstrip("/").lower()
    if not _ORIGIN_RE.match(origin) or (norm not in origins and "*" not in origins):
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
    """
    origin = headers.get("origin")
    cors = cors_headers(origins, origin)
    vary = {"Vary": "Origin"}
    if method == "OPTIONS" and route in _AUTH_METHODS:
        allow = _AUTH_METHODS[route]
        if origin is None:              # not a browser's preflight
            return 204, None, {"Allow": allow}
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
            args = (msg.get("message"), msg.get("signature"), headers.get("host"))
            out = (siwe.sign_in(*args) if claim is None
                   else await siwe.sign_in_shared(*args, claim, wallets=wallets))
            return 200, out, nocache
    except SiweError as exc:
        extra = {"Retry-After": "1"} if exc.status == 503 else {}
        return exc.status, {"error": str(exc)}, extra
    return 404, {"error": "not found"}, {}


def _recover(message: str, signature: str) -> str | None:
    """The checksummed address that signed ``message`` (EIP-191), or None."""
    sig = signature[2:] if signature[:2] in ("0x", "0X") else signature
    if len(sig) != 130:
        return None
    try:
        raw = bytes.fromhex(sig)
    except ValueError:
        return None
    from eth_account import Account
    from eth_account.messages import encode_defunct

    try:
        return Account.recover_message(encode_defunct(text=message), signature=raw)
    except Exception:  # eth-keys raises several types for a bad signature
        return None
