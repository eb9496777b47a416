"""The rules the server and both clients share, checked against tests/data/rules.json.

The server's modules are the one source of each rule (fastws.channels, fastws.codes,
fastws._match); the Python client imports them, and the browser client's own copies
(fastws/static/fastws.js) are checked against the same vectors in a real Chromium by
tests/test_browser.py::test_browser_rules_match_shared_vectors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import fastws.client
from fastws import _glob_ref, _match, channels, config
from fastws.codes import DISCONNECT_TOKEN_EXPIRED, Close, Disconnect

RULES = json.loads((Path(__file__).parent / "data" / "rules.json").read_text())


def _ids(rows: list[list]) -> list[str]:
    return [" ".join(map(repr, row)) for row in rows]


def test_the_client_uses_the_servers_rules() -> None:
    assert fastws.client.is_pattern is channels.is_pattern
    assert fastws.client.normalize_channel is channels.normalize


@pytest.mark.parametrize(("name", "want"), RULES["is_pattern"], ids=_ids(RULES["is_pattern"]))
def test_is_pattern(name: str, want: bool) -> None:
    assert channels.is_pattern(name) is want
    assert _match.is_pattern(name) is want  # the compiled copy the hot path uses
    assert fastws.client.Subscription(None, name, None, None).pattern is want  # type: ignore[arg-type]


@pytest.mark.parametrize(("name", "want"), RULES["normalize"], ids=_ids(RULES["normalize"]))
def test_normalize(name: str, want: str) -> None:
    assert channels.normalize(name) == want
    assert channels.validate(name) == want  # what the protocol layer names the channel
    assert fastws.client.normalize_channel(name) == want


@pytest.mark.parametrize(("pattern", "name", "want"), RULES["glob_match"],
                         ids=_ids(RULES["glob_match"]))
def test_glob_match(pattern: str, name: str, want: bool) -> None:
    assert _match.glob_match(pattern, name) is want
    assert _glob_ref.glob_match(pattern, name) is want  # Redis' own algorithm
    if channels.is_pattern(pattern):  # how the client routes an event to a subscription
        sub = fastws.client.Subscription(None, pattern, None, None)  # type: ignore[arg-type]
        assert sub.matches(name) is want


@pytest.mark.parametrize(("code", "want"), RULES["should_reconnect"],
                         ids=_ids(RULES["should_reconnect"]))
def test_should_reconnect(code: int, want: bool) -> None:
    assert Close.should_reconnect(code) is want
    assert Disconnect(code, "x").reconnect is want


def test_every_close_code_has_a_vector() -> None:
    codes = {v for k, v in vars(Close).items() if k.isupper() and isinstance(v, int)}
    missing = codes - {code for code, _ in RULES["should_reconnect"]}
    assert not missing, f"add vectors for {sorted(missing)} to tests/data/rules.json"


def test_token_expired_close() -> None:
    """The close after which a client with a token callable reconnects with a new token."""
    assert [DISCONNECT_TOKEN_EXPIRED.code, DISCONNECT_TOKEN_EXPIRED.reason] == \
        RULES["token_expired"]
    assert not Close.should_reconnect(DISCONNECT_TOKEN_EXPIRED.code)


@pytest.mark.parametrize(("name", "want"), RULES["namespace_of"], ids=_ids(RULES["namespace_of"]))
def test_namespace_of(name: str, want: str) -> None:
    assert channels.namespace_of(name) == want


@pytest.mark.parametrize(("name", "want"), RULES["owner_of"], ids=_ids(RULES["owner_of"]))
def test_owner_of(name: str, want: str) -> None:
    assert channels.owner_of(name) == want


def test_owner_namespaces() -> None:
    assert list(channels.OWNER_NAMESPACES) == RULES["owner_namespaces"]
    assert list(config.OWNER_NAMESPACES) == RULES["owner_namespaces"]
