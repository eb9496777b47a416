"""fastws.auth and fastws.limits without a server: JWT keys, SIWE, grants, buckets, client IP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import time
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from eth_account import Account
from eth_account.messages import encode_defunct
from hypothesis import given, settings
from hypothesis import strategies as st

from fastws import _match, auth, channels
from fastws._glob_ref import glob_match as ref_glob
from fastws.auth import (
    Auth,
    AuthError,
    Siwe,
    SiweError,
    granted,
    may_match_prefix,
    parse_siwe_message,
    same_owner,
)
from fastws.broker.base import BrokerUnavailable
from fastws.broker.memory import MemoryBroker
from fastws.config import load_config
from fastws.limits import MAX_JSON_DEPTH, Bucket, KeyedLimiter, client_ip, json_depth

SECRET = "unit-test-secret-of-at-least-32-bytes!"


def iso(t: float) -> str:
    """RFC 3339 UTC time as SIWE messages carry it."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def siwe_message(domain: str, address: str, nonce: str, *, chain_id: int = 1,
                 statement: str | None = "Sign in to fastws.", issued: float | None = None,
                 expires: float | None = None, not_before: float | None = None,
                 resources: tuple[str, ...] = (), scheme: str | None = None) -> str:
    """An EIP-4361 message, laid out exactly as the EIP's ABNF says."""
    head = f"{scheme}://{domain}" if scheme else domain
    lines = [f"{head} wants you to sign in with your Ethereum account:", address, ""]
    if statement is not None:
        lines.append(statement)
    lines += ["", f"URI: https://{domain}/login", "Version: 1", f"Chain ID: {chain_id}",
              f"Nonce: {nonce}", f"Issued At: {iso(issued or time.time())}"]
    if expires is not None:
        lines.append(f"Expiration Time: {iso(expires)}")
    if not_before is not None:
        lines.append(f"Not Before: {iso(not_before)}")
    if resources:
        lines.append("Resources:")
        lines += [f"- {r}" for r in resources]
    return "\n".join(lines)


def sign(account, message: str) -> str:
    """The EIP-191 personal_sign signature of ``message`` as 0x hex."""
    return "0x" + account.sign_message(encode_defunct(text=message)).signature.hex().removeprefix(
        "0x")


# --------------------------------------------------------------------------- JWT


def test_hs256_tokens_and_refusals() -> None:
    a = Auth(SECRET, None)
    tok = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    ident = a.verify(tok)
    assert ident.user == "alice" and ident.expires is not None and ident.channels is None
    with pytest.raises(AuthError) as err:
        a.verify(jwt.encode({"sub": "a", "exp": int(time.time()) - 1}, SECRET, algorithm="HS256"))
    assert err.value.expired and str(err.value) == "token expired"
    bad = [
        jwt.encode({"sub": "a"}, "another-secret-of-at-least-32-bytes!!", algorithm="HS256"),
        jwt.encode({"name": "no sub"}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": ""}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "a", "nbf": int(time.time()) + 600}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "a"}, None, algorithm="none"),           # alg none
        jwt.encode({"sub": "a", "channels": "events:*"}, SECRET, algorithm="HS256"),
        jwt.encode({"sub": "a", "channels": ["bad name"]}, SECRET, algorithm="HS256"),
        "x.y.z", "",
    ]
    for tok in bad:
        with pytest.raises(AuthError):
            a.verify(tok)
    with pytest.raises(AuthError, match="not configured"):
        Auth(None, None).verify(tok)


def _pem(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def test_rs256_es256_pem_and_no_algorithm_confusion(tmp_path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    for key, alg in ((rsa_key, "RS256"), (ec_key, "ES256")):
        path = tmp_path / f"{alg}.pem"
        path.write_bytes(_pem(key))
        a = Auth(None, str(path))
        assert a.enabled and not a.can_issue
        tok = jwt.encode({"sub": "bob", "channels": ["market:*"]}, key, algorithm=alg)
        ident = a.verify(tok)
        assert ident.user == "bob" and ident.channels == ("market:*",)
        # HS256 "signed" with the public key as the secret (algorithm confusion) fails
        head = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').rstrip(b"=")
        body = base64.urlsafe_b64encode(b'{"sub":"eve"}').rstrip(b"=")
        mac = hmac.new(_pem(key), head + b"." + body, hashlib.sha256).digest()
        forged = (head + b"." + body + b"." + base64.urlsafe_b64encode(mac).rstrip(b"="))
        for tok in (forged.decode(), jwt.encode({"sub": "eve"}, SECRET, algorithm="HS256")):
            with pytest.raises(AuthError):
                a.verify(tok)


def test_jwks_file_picks_the_key_by_kid(tmp_path) -> None:
    k1 = ec.generate_private_key(ec.SECP256R1())
    k2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwks = {"keys": [
        {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(k1.public_key())), "kid": "one",
         "alg": "ES256", "use": "sig"},
        {**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k2.public_key())), "kid": "two",
         "alg": "RS256"},
    ]}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks))
    a = Auth(None, str(path))
    assert a.verify(jwt.encode({"sub": "x"}, k1, "ES256", headers={"kid": "one"})).user == "x"
    assert a.verify(jwt.encode({"sub": "y"}, k2, "RS256", headers={"kid": "two"})).user == "y"
    with pytest.raises(AuthError, match="alg"):   # signed by one, kid of the other
        a.verify(jwt.encode({"sub": "x"}, k1, "ES256", headers={"kid": "two"}))
    with pytest.raises(AuthError, match="kid"):
        a.verify(jwt.encode({"sub": "x"}, k1, "ES256"))   # two keys: a kid is needed
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
    with pytest.raises(ValueError, match="oct"):
        Auth(None, str(path))


# --------------------------------------------------------------------------- grants


def test_granted_channels_and_patterns() -> None:
    g = ("market:*", "events:bet_placed", "user:alice")
    assert granted(g, "market:0xab") and granted(g, "events:bet_placed")
    assert not granted(g, "events:other") and not granted(g, "user:bob")
    assert granted(g, "market:*") and granted(g, "market:0xab*") and granted(g, "market:?")
    assert not granted(g, "*") and not granted(g, "events:*") and not granted(g, "m*")
    assert granted(("*",), "anything:*")
    assert same_owner("0xabcdef0000000000000000000000000000000001",
                      "0xAbCdEf0000000000000000000000000000000001")
    assert not same_owner("alice", "Alice") and same_owner("alice", "alice")


@settings(max_examples=300, deadline=None)
@given(a=st.sampled_from(["alice", "Alice", "0x" + "ab" * 20, "0x" + "AB" * 20, "0xAb" + "cd" * 19,
                          "0X" + "ab" * 20, "0x" + "ab" * 19]),
       b=st.sampled_from(["alice", "0x" + "ab" * 20, "0x" + "Ab" * 20, "0xab" + "cd" * 19,
                          "0x" + "ab" * 21]))
def test_owner_rule_is_one_rule(a: str, b: str) -> None:
    """Channel owners are defined once (fastws.channels); auth re-exports them, and the
    owner key (what a revocation by user is stored under) agrees with same_owner."""
    assert auth.same_owner is channels.same_owner and auth.is_address is channels.is_address
    assert same_owner(a, b) == (channels.owner_key(a) == channels.owner_key(b))
    assert channels.is_pattern is _match.is_pattern


def test_origins_compare_one_way() -> None:
    """allow_origins as the config writes them, and a request's Origin as auth compares it."""
    origins = load_config({"allow_origins": ["https://Dapp.example/", "http://localhost:3000"]},
                          {}).server.allow_origins
    assert origins == ("https://dapp.example", "http://localhost:3000")
    assert auth.origin_listed(origins, "HTTPS://DAPP.example") and auth.origin_listed(
        origins, "https://dapp.example/")
    assert not auth.origin_listed(origins, "https://dapp.example:443")
    assert auth.origin_listed(("*",), "null") and not auth.origin_listed((), "https://a.b")
    assert auth.cors_headers(origins, " https://DAPP.example ") == {
        "Access-Control-Allow-Origin": "https://DAPP.example",
        "Access-Control-Expose-Headers": "Retry-After"}
    assert auth.cors_headers(("*",), "null") is None
    assert auth.cors_headers((), "https://a.b") is None


@settings(max_examples=300, deadline=None)
@given(pattern=st.text(alphabet="ab:*?[]^\\", max_size=8),
       suffix=st.text(alphabet="ab:x", max_size=4))
def test_may_match_prefix_never_misses(pattern: str, suffix: str) -> None:
    """If some channel 'ns:…' matches the pattern, may_match_prefix must say so."""
    channel = "ab:" + suffix
    if ref_glob(pattern.encode(), channel.encode()):
        assert may_match_prefix(pattern, "ab:"), (pattern, channel)


def test_may_match_prefix_examples() -> None:
    assert may_match_prefix("*", "vip:") and may_match_prefix("v*", "vip:")
    assert may_match_prefix("*:x", "vip:") and may_match_prefix("[uv]ip:*", "vip:")
    assert not may_match_prefix("events:*", "vip:") and not may_match_prefix("a*", "vip:")
    assert not may_match_prefix("vi", "vip:")


# --------------------------------------------------------------------------- SIWE


def test_siwe_parser_accepts_the_eip_layouts() -> None:
    acct = Account.create()
    now = time.time()
    m = parse_siwe_message(siwe_message("example.com", acct.address, "abcdefgh12345678",
                                        chain_id=137, expires=now + 60, not_before=now - 5,
                                        resources=("ipfs://Qm1", "https://x.y/z"),
                                        scheme="https"))
    assert (m.domain, m.address, m.chain_id, m.scheme) == ("example.com", acct.address, 137,
                                                           "https")
    assert m.statement == "Sign in to fastws." and m.resources == ("ipfs://Qm1", "https://x.y/z")
    m = parse_siwe_message(siwe_message("localhost:8765", acct.address.lower(), "12345678",
                                        statement=None))
    assert m.statement is None and m.domain == "localhost:8765"


@pytest.mark.parametrize("mutate, reason", [
    (lambda m: m.replace("wants you", "asks you"), "first line"),
    (lambda m: m.replace("\n", "\r\n"), "CRLF"),
    (lambda m: m.replace("Version: 1", "Version: 2"), "Version"),
    (lambda m: m.replace("Chain ID: 1", "Chain ID: one"), "Chain ID"),
    (lambda m: m.replace("Nonce: abcdefgh12345678", "Nonce: short"), "Nonce"),
    (lambda m: m.replace("Issued At: ", "Issued At: yesterday "), "Issued At"),
    (lambda m: m.replace("URI: https", "URI: no scheme here"), "URI"),
    (lambda m: m.replace("\nVersion: 1", ""), "Version"),
    (lambda m: m + "\nNonce: again1234", "out of order"),
    (lambda m: m + "\nWho: me", "unexpected"),
    (lambda m: m * 40, "characters"),
])
def test_siwe_parser_refuses(mutate, reason) -> None:
    acct = Account.create()
    msg = siwe_message("example.com", acct.address, "abcdefgh12345678")
    with pytest.raises(SiweError, match=reason) as err:
        parse_siwe_message(mutate(msg))
    assert err.value.status == 400


def test_siwe_parser_refuses_a_bad_checksum() -> None:
    addr = Account.create().address
    flipped = addr[:2] + "".join(c.swapcase() if c.isalpha() else c for c in addr[2:])
    if flipped == flipped.lower() or flipped[2:] == flipped[2:].upper():
        pytest.skip("address without letters to flip")
    with pytest.raises(SiweError, match="checksum"):
        parse_siwe_message(siwe_message("example.com", flipped, "abcdefgh12345678"))


def test_siwe_sign_in_checks_everything() -> None:
    auth = Auth(SECRET, None)
    siwe = Siwe(auth, domains=["app.example.com"], chain_ids=[1, 8453])
    acct, other = Account.create(), Account.create()
    host = "127.0.0.1:8765"

    def attempt(nonce=None, **kw) -> dict:
        domain = kw.pop("domain", host)
        signer = kw.pop("signer", acct)
        msg = siwe_message(domain, kw.pop("address", acct.address), nonce or siwe.nonce(), **kw)
        return siwe.sign_in(msg, sign(signer, msg), host)

    nonce = siwe.nonce()
    out = attempt(nonce)
    ident = auth.verify(out["token"])
    assert ident.user == acct.address == out["sub"]          # checksummed
    assert 3590 < ident.expires - time.time() <= 3600
    assert ident.claims["chain_id"] == 1
    # the same message and signature again: replay refused
    msg = siwe_message(host, acct.address, nonce)
    with pytest.raises(SiweError, match="already used") as err:
        siwe.sign_in(msg, sign(acct, msg), host)
    assert err.value.status == 401
    assert attempt(domain="app.example.com")["sub"] == acct.address   # configured domain
    assert attempt(chain_id=8453)["sub"] == acct.address
    exp = time.time() + 30
    assert attempt(expires=exp)["exp"] == int(exp)          # token capped by Expiration Time
    refusals = [
        (dict(domain="evil.example"), 403, "domain"),
        (dict(chain_id=5), 403, "chain id"),
        (dict(signer=other), 401, "signature"),
        (dict(address=other.address), 401, "signature"),
        (dict(expires=time.time() - 1), 401, "expired"),
        (dict(not_before=time.time() + 60), 401, "not yet valid"),
        (dict(issued=time.time() + 3600), 401, "future"),
        (dict(nonce="f" * 48), 401, "unknown nonce"),
    ]
    for kw, status, reason in refusals:
        with pytest.raises(SiweError, match=reason) as err:
            attempt(**kw)
        assert err.value.status == status, kw
    old = siwe.nonce(now=time.time() - Siwe.NONCE_TTL - 1)
    with pytest.raises(SiweError, match="nonce expired"):
        attempt(old)
    msg = siwe_message(host, acct.address, siwe.nonce())
    for sig in ("0x1234", "zz" * 65, "0x" + "00" * 65):
        with pytest.raises(SiweError) as err:
            siwe.sign_in(msg, sig, host)
        assert err.value.status == 401
    with pytest.raises(SiweError) as err:
        Siwe(Auth(None, None)).nonce()
    assert err.value.status == 501


async def test_siwe_nonce_spent_through_the_broker() -> None:
    auth = Auth(SECRET, None)
    a, b, alone = Siwe(auth), Siwe(auth), Siwe(auth)    # three processes, one secret
    broker = MemoryBroker()                             # what they share (Redis in production)
    acct = Account.create()
    host = "127.0.0.1:8765"
    msg = siwe_message(host, acct.address, a.nonce())
    sig = sign(acct, msg)
    assert (await a.sign_in_shared(msg, sig, host, broker.claim_once))["sub"] == acct.address
    # a process that spends nonces only in itself takes the replay ...
    assert alone.sign_in(msg, sig, host)["sub"] == acct.address
    # ... one that spends them through the shared broker refuses it
    with pytest.raises(SiweError, match="already used") as err:
        await b.sign_in_shared(msg, sig, host, broker.claim_once)
    assert err.value.status == 401
    # the claim: the nonce's key, kept until the nonce expires plus the clock allowance
    claims: list[tuple[str, float]] = []

    async def record(key: str, ttl: float) -> bool:
        claims.append((key, ttl))
        return True

    nonce = a.nonce()
    msg = siwe_message(host, acct.address, nonce)
    await a.sign_in_shared(msg, sign(acct, msg), host, record)
    assert claims[0][0] == "siwe:" + nonce
    assert Siwe.NONCE_TTL - 2 < claims[0][1] - Siwe.CLOCK_SKEW <= Siwe.NONCE_TTL

    async def down(key: str, ttl: float) -> bool:
        raise BrokerUnavailable("redis is not connected")

    msg = siwe_message(host, acct.address, a.nonce())
    with pytest.raises(SiweError, match="broker unavailable") as err:
        await a.sign_in_shared(msg, sign(acct, msg), host, down)
    assert err.value.status == 503
    with pytest.raises(SiweError, match="already used"):   # spent anyway: outcome unknown
        await a.sign_in_shared(msg, sign(acct, msg), host, record)


# --------------------------------------------------------------------------- limits


def test_bucket_is_n_per_window_with_refill() -> None:
    b = Bucket(3, 0.0)
    assert [b.take(3, 3.0, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(3, 3.0, 0.0) == pytest.approx(1.0)     # one token per second
    assert b.take(3, 3.0, 0.5) == pytest.approx(0.5)
    assert b.take(3, 3.0, 1.0) == 0.0
    assert b.full(3, 3.0, 100.0) and not b.full(3, 3.0, 1.0)


def test_keyed_limiter_memory_is_bounded() -> None:
    lim = KeyedLimiter(max_keys=1000, sweep_every=1.0)
    for i in range(50_000):
        lim.take(f"10.0.{i // 256 % 256}.{i % 256}-{i}", 5, 10.0, i * 1e-4)
    assert len(lim) <= 1000
    lim.take("k", 2, 10.0, 100.0)
    lim.take("k", 2, 10.0, 100.0)
    assert lim.take("k", 2, 10.0, 100.0) == pytest.approx(5.0)
    lim.take("other", 2, 10.0, 200.0)        # the sweep forgets refilled buckets
    assert "k" not in lim.buckets


def test_client_ip_rules() -> None:
    trusted = [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8")]
    assert client_ip("127.0.0.1", None, trusted) == ("127.0.0.1", True)        # local: exempt
    assert client_ip("127.0.0.7", None, trusted) == ("127.0.0.7", True)
    assert client_ip("::1", None, trusted) == ("::1", True)
    assert client_ip("203.0.113.9", None, trusted) == ("203.0.113.9", False)
    # through a trusted proxy: the last hop, even a loopback one, is not exempt
    assert client_ip("127.0.0.1", "198.51.100.1, 203.0.113.5", trusted) == ("203.0.113.5", False)
    assert client_ip("10.1.2.3", "127.0.0.1", trusted) == ("127.0.0.1", False)
    assert client_ip("10.1.2.3", "[2001:db8::1]:443", trusted) == ("2001:db8::1", False)
    # an untrusted peer cannot choose its IP with the header
    assert client_ip("203.0.113.9", "127.0.0.1", trusted) == ("203.0.113.9", False)
    assert client_ip("127.0.0.1", "garbage", trusted) == ("127.0.0.1", False)
    assert client_ip("::ffff:203.0.113.9", None, trusted) == ("203.0.113.9", False)


def test_json_depth() -> None:
    deep: list = []
    cur = deep
    for _ in range(MAX_JSON_DEPTH + 10):
        cur.append([])
        cur = cur[0]
    assert json_depth(1) == 0 and json_depth({"a": [1, {"b": 2}]}) == 3
    assert json_depth(deep) == MAX_JSON_DEPTH + 1       # stops once past the limit
    assert json_depth([[]] * 100_000) == 2


def test_token_roundtrip_with_issue() -> None:
    a = Auth(SECRET, None)
    tok = a.issue("0xabc", 60, now=time.time(), chain_id=1)
    ident = a.verify(tok)
    assert ident.user == "0xabc" and ident.claims["chain_id"] == 1
    assert datetime.now(UTC) < datetime.fromtimestamp(ident.expires, UTC) < (
        datetime.now(UTC) + timedelta(seconds=61))
