"""Sign-In with Ethereum (EIP-4361): ``GET /auth/nonce`` and ``POST /auth/siwe``.

A strict message parser (:func:`parse_siwe_message`), domain and chain id checks,
single-use expiring nonces (:class:`Siwe`), and signature recovery with eth-account;
a sign-in is answered with an HS256 JWT whose ``sub`` is the checksummed address.
Contract wallets (EIP-1271) are checked by :class:`fastws.auth.eip1271.ContractWallets`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import struct
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from fastws.auth.tokens import Auth
from fastws.channels import is_address
from fastws.errors import BrokerUnavailable
from fastws.limits import Bucket

if TYPE_CHECKING:
    from fastws.auth.eip1271 import ContractWallets

__all__ = ["MAX_MESSAGE", "Siwe", "SiweError", "SiweMessage", "parse_siwe_message"]


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
