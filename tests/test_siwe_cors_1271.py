"""CORS on the sign-in endpoints and EIP-1271 contract-wallet sign-in, on real servers.

CORS: raw HTTP requests (preflights, then the real requests, some on one keep-alive
connection) to ``fastws serve`` processes with and without ``allow_origins``.

EIP-1271: a real EVM (eth-tester's py-evm chain, :class:`DemoChain`) served over HTTP
JSON-RPC (:class:`RpcServer`), with ``contracts/Wallet1271.vy`` deployed from its
committed compile output (``tests/data/Wallet1271.json``): a one-owner wallet whose
``isValidSignature`` accepts what the owner's key signed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
from conftest import free_port, http
from eth_account import Account
from test_auth import sign, siwe_message
from wsclient import connect

from fastws.config import ConfigError, load_config

SECRET = "cors-1271-test-secret-of-32-bytes-plus"
DAPP = "https://dapp.example"
FAST = "[server]\ndrain_timeout = 0.5\n"
ARTIFACT = Path(__file__).parent / "data" / "Wallet1271.json"
SOURCE = Path(__file__).parent.parent / "contracts" / "Wallet1271.vy"


# --------------------------------------------------------------------------- raw HTTP


@dataclass
class Answer:
    status: int
    headers: dict[str, str]      # lower-cased names
    body: bytes

    def json(self) -> dict:
        return json.loads(self.body)


def exchange(port: int, *requests: str, body: bytes = b"") -> list[Answer]:
    """Send the request heads (the last one followed by ``body``) on one connection;
    read one answer per request (a body by Content-Length; none for 204)."""
    raw = "".join(r.replace("\n", "\r\n") + "\r\n" for r in requests).encode() + body
    answers: list[Answer] = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        buf = b""
        while len(answers) < len(requests):
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                assert chunk, f"connection closed after {len(answers)} answers: {buf!r}"
                buf += chunk
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip()
                       for k, _, v in (ln.partition(":") for ln in lines[1:])}
            status = int(lines[0].split(" ")[1])
            length = 0 if status == 204 else int(headers.get("content-length", "0"))
            while len(buf) < length:
                chunk = s.recv(65536)
                assert chunk, "connection closed in a body"
                buf += chunk
            answers.append(Answer(status, headers, buf[:length]))
            buf = buf[length:]
    return answers


def request(method: str, path: str, origin: str | None = None, *, port: int,
            extra: str = "", body: bytes = b"") -> str:
    """One request head (LF line ends; :func:`exchange` sends CRLF)."""
    head = f"{method} {path} HTTP/1.1\nHost: 127.0.0.1:{port}\n"
    if origin is not None:
        head += f"Origin: {origin}\n"
    if body:
        head += f"Content-Type: application/json\nContent-Length: {len(body)}\n"
    return head + extra


def preflight(port: int, path: str, origin: str | None, method: str = "POST") -> Answer:
    extra = (f"Access-Control-Request-Method: {method}\n"
             "Access-Control-Request-Headers: content-type\n")
    return exchange(port, request("OPTIONS", path, origin, port=port, extra=extra))[0]


def get_nonce(port: int, origin: str | None = None) -> Answer:
    return exchange(port, request("GET", "/auth/nonce", origin, port=port))[0]


def signed_body(port: int, account, address: str | None = None, chain_id: int = 1) -> bytes:
    nonce = get_nonce(port).json()["nonce"]
    msg = siwe_message(f"127.0.0.1:{port}", address or account.address, nonce,
                       chain_id=chain_id)
    return json.dumps({"message": msg, "signature": sign(account, msg)}).encode()


# --------------------------------------------------------------------------- CORS


def test_cors_preflight_and_requests_from_an_allowed_origin(fastws_server) -> None:
    srv = fastws_server("--jwt-secret", SECRET, "--allow-origin", DAPP,
                        "--allow-origin", "http://localhost:3000", config=FAST)
    port = srv.port
    for path, methods in (("/auth/siwe", "POST, OPTIONS"),
                          ("/auth/nonce", "GET, HEAD, OPTIONS")):
        a = preflight(port, path, DAPP, method=methods.split(",")[0])
        assert a.status == 204, a
        assert a.headers["access-control-allow-origin"] == DAPP
        assert a.headers["vary"] == "Origin"
        assert a.headers["access-control-allow-methods"] == methods
        assert a.headers["access-control-allow-headers"] == "Content-Type, Authorization"
        assert a.headers["access-control-max-age"] == "600"
        assert "content-length" not in a.headers and a.body == b""
    # the exact origin is echoed, whatever its letter case
    a = preflight(port, "/auth/siwe", "HTTP://LocalHost:3000")
    assert a.status == 204 and a.headers["access-control-allow-origin"] == "HTTP://LocalHost:3000"

    # a preflight, then the nonce and the sign-in it announced, on one keep-alive connection
    acct = Account.create()
    body = signed_body(port, acct)
    pre, nonce, signed = exchange(
        port,
        request("OPTIONS", "/auth/siwe", DAPP, port=port,
                extra="Access-Control-Request-Method: POST\n"),
        request("GET", "/auth/nonce", DAPP, port=port),
        request("POST", "/auth/siwe", DAPP, port=port, body=body), body=body)
    assert pre.status == 204
    assert nonce.status == 200 and len(nonce.json()["nonce"]) == 48
    assert signed.status == 200 and signed.json()["sub"] == acct.address, signed
    for a in (nonce, signed):
        assert a.headers["access-control-allow-origin"] == DAPP
        assert a.headers["vary"] == "Origin"
        assert a.headers["cache-control"] == "no-store"
    # errors are readable by the page too (the browser hides answers without the header)
    (replay,) = exchange(port, request("POST", "/auth/siwe", DAPP, port=port, body=body),
                         body=body)
    assert replay.status == 401 and "replay" in replay.json()["error"]
    assert replay.headers["access-control-allow-origin"] == DAPP
    (wrong,) = exchange(port, request("PUT", "/auth/siwe", DAPP, port=port))
    assert wrong.status == 405 and wrong.headers["allow"] == "POST, OPTIONS"
    assert wrong.headers["access-control-allow-origin"] == DAPP


def test_cors_refuses_other_origins(fastws_server) -> None:
    srv = fastws_server("--jwt-secret", SECRET, "--allow-origin", DAPP, config=FAST)
    port = srv.port
    for origin in ("https://evil.example", "https://dapp.example.evil", "http://dapp.example",
                   "null", "https://dapp.example/path"):
        a = preflight(port, "/auth/siwe", origin)
        assert a.status == 403, (origin, a)
        assert "origin not allowed" in a.json()["error"]
        assert not any(k.startswith("access-control-") for k in a.headers), a.headers
        assert a.headers["vary"] == "Origin"
        # the request itself is answered (CORS does not protect the server), without
        # the header: the browser does not let the page read it
        n = get_nonce(port, origin)
        assert n.status == 200 and "access-control-allow-origin" not in n.headers
    # OPTIONS from something that is not a browser (no Origin): the methods, no CORS
    (a,) = exchange(port, request("OPTIONS", "/auth/nonce", port=port))
    assert a.status == 204 and a.headers["allow"] == "GET, HEAD, OPTIONS"
    assert "access-control-allow-origin" not in a.headers


def test_every_auth_answer_varies_on_origin(fastws_server) -> None:
    """docs/security.md: every /auth/* answer carries Vary: Origin, with or without an
    Origin header, whatever its status (a cache must not serve one origin's answer to
    another)."""
    srv = fastws_server("--jwt-secret", SECRET, "--allow-origin", DAPP, config=FAST)
    port = srv.port
    bad = b'{"message": 1}'
    for origin in (None, DAPP, "https://evil.example"):
        answers = exchange(
            port,
            request("OPTIONS", "/auth/nonce", origin, port=port),
            request("OPTIONS", "/auth/siwe", origin, port=port,
                    extra="Access-Control-Request-Method: POST\n"),
            request("GET", "/auth/nonce", origin, port=port),
            request("GET", "/auth/siwe", origin, port=port),
            request("PUT", "/auth/nonce", origin, port=port),
            request("POST", "/auth/siwe", origin, port=port, body=bad), body=bad)
        statuses = [a.status for a in answers]
        expected = [204, 204] if origin != "https://evil.example" else [403, 403]
        assert statuses == [*expected, 200, 405, 405, 400], (origin, statuses)
        # a refusal the HTTP front writes before routing (here a bad Content-Length)
        answers += exchange(port, request("POST", "/auth/siwe", origin, port=port,
                                          extra="Content-Length: x\n"))
        assert answers[-1].status == 400
        for a in answers:
            assert a.headers.get("vary") == "Origin", (origin, a.status, a.headers)


def test_cors_is_off_without_allow_origins_and_open_with_star(fastws_server) -> None:
    # no allow_origins (any origin may open a WebSocket): no CORS, a safe default
    srv = fastws_server("--jwt-secret", SECRET, config=FAST)
    assert preflight(srv.port, "/auth/siwe", DAPP).status == 403
    assert "access-control-allow-origin" not in get_nonce(srv.port, DAPP).headers
    # "*": any origin, each answered with its own name (never "*")
    star = fastws_server("--jwt-secret", SECRET, "--allow-origin", "*", config=FAST)
    for origin in (DAPP, "https://other.example:8443"):
        a = preflight(star.port, "/auth/siwe", origin)
        assert a.status == 204 and a.headers["access-control-allow-origin"] == origin
        assert get_nonce(star.port, origin).headers["access-control-allow-origin"] == origin
    assert preflight(star.port, "/auth/siwe", "null").status == 403
    # other routes are untouched
    (a,) = exchange(star.port, request("OPTIONS", "/api/publish", DAPP, port=star.port))
    assert a.status == 405 and "access-control-allow-origin" not in a.headers


# --------------------------------------------------------------------------- EIP-1271


@dataclass
class Chain:
    rpc: object                  # fastws.indexer.demo_chain.RpcServer
    chain_id: int
    wallet: str                  # the Wallet1271's address, checksummed
    owner: object                # its owner's eth-account key


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    """An eth-tester chain behind HTTP JSON-RPC, with a Wallet1271 owned by a new key."""
    from fastws.indexer.demo_chain import DemoChain, RpcServer

    demo = DemoChain(contracts=0)
    artifact = json.loads(ARTIFACT.read_text())["contracts/Wallet1271.vy"]
    owner = Account.create()
    with demo.lock:
        factory = demo.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
        tx = factory.constructor(owner.address).transact({"from": demo.accounts[0],
                                                          "gas": 1_000_000})
        receipt = demo.w3.eth.get_transaction_receipt(tx)
        assert receipt.status == 1
        wallet = receipt.contractAddress
        chain_id = int(demo.w3.eth.chain_id)
        assert demo.w3.eth.contract(address=wallet, abi=artifact["abi"]).functions.owner(
        ).call() == owner.address
    rpc = RpcServer(demo).start()
    yield Chain(rpc, chain_id, wallet, owner)
    rpc.stop()


def sign_in(port: int, account, address: str, chain_id: int) -> tuple[int, dict, dict]:
    body = signed_body(port, account, address, chain_id)
    status, headers, raw = http("POST", f"http://127.0.0.1:{port}/auth/siwe", body)
    return status, {k.lower(): v for k, v in headers.items()}, json.loads(raw)


def no_traceback(srv) -> None:
    out = srv.output()
    assert "Traceback" not in out, out


WALLET_SOURCE_SHA256 = "b4b8df2e5623e23be4c0a1d3b3fe11df2c5ad17326b4ff28f9561ba694414c8b"


def test_wallet_artifact_is_the_committed_source() -> None:
    artifact = json.loads(ARTIFACT.read_text())
    assert artifact["version"] == "0.4.3"
    abi = artifact["contracts/Wallet1271.vy"]["abi"]
    fn = next(f for f in abi if f.get("name") == "isValidSignature")
    assert [i["type"] for i in fn["inputs"]] == ["bytes32", "bytes"]
    assert [o["type"] for o in fn["outputs"]] == ["bytes4"]
    assert hashlib.sha256(SOURCE.read_bytes()).hexdigest() == WALLET_SOURCE_SHA256, \
        "contracts/Wallet1271.vy changed: recompile it (see its header), update the hash"
    try:    # vyper is a developer tool: the bytecode is recompiled where it is installed
        import vyper
        from vyper.compiler.settings import Settings
    except ImportError:
        return

    out = vyper.compile_code(SOURCE.read_text(), output_formats=["bytecode"],
                             settings=Settings(evm_version="cancun"))
    assert out["bytecode"] == artifact["contracts/Wallet1271.vy"]["bytecode"]


async def test_contract_wallet_signs_in_through_eip1271(fastws_server, chain) -> None:
    srv = fastws_server("--jwt-secret", SECRET, "--siwe-rpc-url", chain.rpc.url, config=FAST)
    port = srv.port
    # the owner's personal_sign signature, for the contract's address: accepted
    status, _, out = await asyncio.to_thread(sign_in, port, chain.owner, chain.wallet,
                                             chain.chain_id)
    assert status == 200, out
    assert out["sub"] == chain.wallet
    claims = jwt.decode(out["token"], SECRET, algorithms=["HS256"])
    assert claims["sub"] == chain.wallet and claims["chain_id"] == chain.chain_id
    assert chain.rpc.calls.get("eth_call", 0) >= 1
    # a lower-case address in the message: the token still names the checksummed one
    status, _, out = await asyncio.to_thread(sign_in, port, chain.owner, chain.wallet.lower(),
                                             chain.chain_id)
    assert status == 200 and out["sub"] == chain.wallet, out
    # the token owns the contract's private channel
    c = await connect(srv.ws_url + "?token=" + out["token"])
    reply = await c.request({"id": 1, "type": "subscribe", "channel": "wallet:" + chain.wallet})
    assert reply.get("type") != "error", reply
    c.close()

    # another key's signature: the contract says no
    status, _, out = await asyncio.to_thread(sign_in, port, Account.create(), chain.wallet,
                                             chain.chain_id)
    assert status == 401 and out["error"] == "signature does not match the message's address"
    # a message naming another chain: that chain's contract is not the one the node sees
    status, _, out = await asyncio.to_thread(sign_in, port, chain.owner, chain.wallet, 1)
    assert status == 401 and f"verified on chain {chain.chain_id} only" in out["error"], out
    # an address without code, signed by another key: refused as before
    status, _, out = await asyncio.to_thread(sign_in, port, chain.owner,
                                             Account.create().address, chain.chain_id)
    assert status == 401 and out["error"] == "signature does not match the message's address"
    # plain accounts sign in as before, without asking the node anything
    calls = dict(chain.rpc.calls)
    acct = Account.create()
    status, _, out = await asyncio.to_thread(sign_in, port, acct, acct.address, chain.chain_id)
    assert status == 200 and out["sub"] == acct.address
    assert chain.rpc.calls == calls
    no_traceback(srv)


async def test_contract_wallet_refused_without_rpc_url(fastws_server, chain) -> None:
    srv = fastws_server("--jwt-secret", SECRET, config=FAST)
    status, _, out = await asyncio.to_thread(sign_in, srv.port, chain.owner, chain.wallet,
                                             chain.chain_id)
    assert status == 401 and out["error"] == "signature does not match the message's address"


async def test_rpc_failures_answer_503(fastws_server, chain) -> None:
    # nothing listens at the RPC URL
    down = fastws_server("--jwt-secret", SECRET, "--siwe-rpc-url",
                         f"http://127.0.0.1:{free_port()}", config=FAST)
    status, headers, out = await asyncio.to_thread(sign_in, down.port, chain.owner,
                                                   chain.wallet, chain.chain_id)
    assert status == 503 and out["error"].startswith("could not verify contract wallet"), out
    assert headers["retry-after"] == "1"
    # a node that accepts the connection and never answers: 503 after siwe_rpc_timeout
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(8)
        slow = fastws_server("--jwt-secret", SECRET, "--siwe-rpc-timeout", "1",
                             "--siwe-rpc-url", f"http://127.0.0.1:{mute.getsockname()[1]}",
                             config=FAST)
        body = await asyncio.to_thread(signed_body, slow.port, chain.owner, chain.wallet,
                                       chain.chain_id)
        t0 = time.monotonic()
        pending = asyncio.ensure_future(asyncio.to_thread(
            http, "POST", slow.http_url + "/auth/siwe", body))
        conn, _ = await asyncio.to_thread(mute.accept)   # the server now waits on the node
        # meanwhile the event loop is free: the server answers other requests at once
        assert (await asyncio.to_thread(http, "GET", slow.http_url + "/healthz"))[0] == 200
        assert not pending.done()
        status, _, raw = await pending
        conn.close()
        assert status == 503 and "could not verify contract wallet" in json.loads(raw)["error"]
        assert 0.9 < time.monotonic() - t0 < 5
    # a node answering eth_call with an HTTP error, then with a JSON-RPC error
    srv = fastws_server("--jwt-secret", SECRET, "--siwe-rpc-url", chain.rpc.url, config=FAST)
    faults = [(500, {}, b"upstream down"),
              (200, {}, b'{"jsonrpc":"2.0","id":1,"error":{"code":-32005,"message":"limit"}}')]
    try:
        for fault in faults:
            chain.rpc.fault = lambda method, params, f=fault: f if method == "eth_call" else None
            status, _, out = await asyncio.to_thread(sign_in, srv.port, chain.owner,
                                                     chain.wallet, chain.chain_id)
            assert status == 503 and "could not verify contract wallet" in out["error"], out
    finally:
        chain.rpc.fault = None
    # and once the node is back, the same wallet signs in
    status, _, out = await asyncio.to_thread(sign_in, srv.port, chain.owner, chain.wallet,
                                             chain.chain_id)
    assert status == 200 and out["sub"] == chain.wallet
    for s in (down, slow, srv):
        no_traceback(s)


def test_rpc_options_are_checked() -> None:
    c = load_config({"siwe_rpc_url": "https://rpc.example/v1/key", "siwe_rpc_timeout": "2"}, {})
    assert c.server.siwe_rpc_url == "https://rpc.example/v1/key"
    assert c.server.siwe_rpc_timeout == 2.0
    assert load_config({}, {}).server.siwe_rpc_url is None
    for bad, why in (({"siwe_rpc_url": "ws://node:8546"}, "http:// or https:// URL"),
                     ({"siwe_rpc_url": "http://"}, "http:// or https:// URL"),
                     ({"siwe_rpc_url": "http://node:99999"}, "bad port"),
                     ({"siwe_rpc_timeout": "0"}, "positive number of seconds")):
        with pytest.raises(ConfigError) as err:
            load_config(bad, {})
        assert why in str(err.value), str(err.value)
