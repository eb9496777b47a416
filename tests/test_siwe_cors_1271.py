"""CORS on the sign-in endpoints, on real servers.

Raw HTTP requests (preflights, then the real requests, some on one keep-alive
connection) to ``fastws serve`` processes with and without ``allow_origins``.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass

from eth_account import Account
from test_auth import sign, siwe_message

SECRET = "cors-test-secret-of-32-bytes-plus"
DAPP = "https://dapp.example"
FAST = "[server]\ndrain_timeout = 0.5\n"


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
