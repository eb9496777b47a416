"""fastws.session: the protocol rules of one client, driven with no sockets at all.

A :class:`BufferedSession` collects what the session sends; the host is a tiny
object built from a real config (namespace rules from a TOML file) and a real JWT
verifier, the way the node provides them.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest

from fastws.auth import Auth, Identity
from fastws.codes import DISCONNECT_BY_API, Close, Err
from fastws.config import Config, load_config
from fastws.permissions import Permissions
from fastws.protocol import ProtocolError
from fastws.session import BufferedSession

SECRET = "test-secret-of-at-least-32-bytes!!"

TOML = """
[limits]
messages_per_connection = 5
messages_window = 60
max_subscriptions = 3
subscribes_per_connection = 0

[namespaces.user]
subscribe = "owner"

[namespaces.vip]
subscribe = "authenticated"

[namespaces.events]
publish = "authenticated"

[namespaces.news]
publish = "authenticated"
"""


class Host:
    """What the node gives a session: config, permissions, token checks, counters."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.permissions = Permissions(config)
        self.auth = Auth(SECRET, None)
        self.errors: Counter[int] = Counter()
        self.rate_limited: Counter[str] = Counter()
        self.messages_received = 0
        self.revoked_users: set[str] = set()

    def verify_token(self, token: str) -> Identity:
        return self.auth.verify(token)

    def revoked(self, user: str, issued: float | None, jti: str | None) -> bool:
        return user in self.revoked_users


@pytest.fixture
def host(tmp_path: Path) -> Host:
    path = tmp_path / "fastws.toml"
    path.write_text(TOML)
    return Host(load_config({"config": str(path), "jwt_secret": SECRET}, {}))


def token(sub: str, **claims: Any) -> str:
    return jwt.encode({"sub": sub, **claims}, SECRET, algorithm="HS256")


def sent(sess: BufferedSession) -> list[dict[str, Any]]:
    out = [orjson.loads(p) for p in sess.sent]
    sess.sent.clear()
    return out


def msg(**fields: Any) -> bytes:
    return orjson.dumps(fields)


def test_ping_is_answered_by_the_session(host: Host) -> None:
    s = BufferedSession(host, "c1")
    assert s.receive(msg(type="ping", id=7)) is None
    assert sent(s) == [{"type": "pong", "id": 7}]
    assert host.messages_received == 1


def test_a_request_for_the_node_comes_out_parsed(host: Host) -> None:
    s = BufferedSession(host, "c1")
    req = s.receive(msg(type="subscribe", id=1, channel="events:x"))
    assert req is not None and (req.type, req.id, req.channel) == ("subscribe", 1, "events:x")
    assert s.sent == []


@pytest.mark.parametrize("payload, code", [
    (b"not json", Err.BAD_REQUEST),
    (msg(type="nope", id=1), Err.UNKNOWN_TYPE),
    (msg(type="subscribe", id=1), Err.BAD_REQUEST),
])
def test_bad_messages_get_an_error_reply_and_are_counted(host: Host, payload: bytes,
                                                        code: int) -> None:
    s = BufferedSession(host, "c1")
    assert s.receive(payload) is None
    (reply,) = sent(s)
    assert reply["type"] == "error" and reply["code"] == code
    assert host.errors[code] == 1
    assert s.closed is None


def test_message_rate_limit_answers_429_then_closes_4029(host: Host) -> None:
    s = BufferedSession(host, "c1")
    now = 1000.0
    for _ in range(5):
        assert s.receive(msg(type="ping", id=1), now) is None
    sent(s)
    assert s.receive(msg(type="ping", id=9), now) is None
    (reply,) = sent(s)
    assert (reply["type"], reply["code"], reply["id"]) == ("error", Err.RATE_LIMITED, 9)
    assert host.rate_limited["messages"] == 1
    for _ in range(10):  # refusals that persist close the session
        s.receive(msg(type="ping", id=1), now)
    assert s.closed is not None and s.closed.code == Close.RATE_LIMITED
    assert sent(s)[-1]["type"] == "disconnect"


def test_subscribe_checks_duplicates_limits_and_permissions(host: Host) -> None:
    s = BufferedSession(host, "c1")
    assert s.begin_subscribe("events:a") == "events:a"
    with pytest.raises(ProtocolError) as dup:
        s.begin_subscribe("events:a")
    assert dup.value.code == Err.ALREADY_SUBSCRIBED
    with pytest.raises(ProtocolError) as anon:
        s.begin_subscribe("vip:lounge")
    assert anon.value.code == Err.UNAUTHORIZED
    with pytest.raises(ProtocolError) as owner:
        s.begin_subscribe("user:alice")
    assert owner.value.code == Err.UNAUTHORIZED
    s.begin_subscribe("events:b")
    s.begin_subscribe("events:c")
    with pytest.raises(ProtocolError) as full:
        s.begin_subscribe("events:d")
    assert full.value.code == Err.RATE_LIMITED
    assert s.subs == ["events:a", "events:b", "events:c"]
    s.forget("events:b")
    assert s.subs == ["events:a", "events:c"]


def test_identity_opens_owner_channels_and_arms_the_expiry(host: Host) -> None:
    s = BufferedSession(host, "c1")
    exp = int(time.time()) + 3600
    s.set_identity(s.authenticate(token("alice", exp=exp)))
    assert s.user == "alice" and s.expiry == exp
    assert s.begin_subscribe("user:alice") == "user:alice"
    with pytest.raises(ProtocolError) as other:
        s.begin_subscribe("user:bob")
    assert other.value.code == Err.FORBIDDEN
    s.set_identity(None)
    assert (s.user, s.expiry) == (None, None)


def test_authenticate_refuses_bad_revoked_other_user_and_narrower_grants(host: Host) -> None:
    s = BufferedSession(host, "c1")
    with pytest.raises(ProtocolError) as bad:
        s.authenticate("not.a.token")
    assert bad.value.code == Err.UNAUTHORIZED
    host.revoked_users.add("mallory")
    with pytest.raises(ProtocolError) as revoked:
        s.authenticate(token("mallory"))
    assert revoked.value.code == Err.UNAUTHORIZED and "revoked" in revoked.value.message
    s.set_identity(s.authenticate(token("alice")))
    with pytest.raises(ProtocolError) as switch:
        s.authenticate(token("bob"))
    assert switch.value.code == Err.FORBIDDEN
    s.begin_subscribe("events:a")
    with pytest.raises(ProtocolError) as narrower:
        s.authenticate(token("alice", channels=["news:*"]))
    assert narrower.value.code == Err.FORBIDDEN
    assert s.authenticate(token("alice", channels=["events:*"])).user == "alice"


def test_grants_limit_what_a_session_may_publish(host: Host) -> None:
    s = BufferedSession(host, "c1")
    s.set_identity(s.authenticate(token("alice", channels=["events:*"])))
    s.check("publish", "events:x")
    with pytest.raises(ProtocolError) as denied:
        s.check("publish", "news:x")
    assert denied.value.code == Err.FORBIDDEN


def test_nothing_is_sent_after_the_session_closed(host: Host) -> None:
    s = BufferedSession(host, "c1")
    s.disconnect(DISCONNECT_BY_API)
    assert s.closing and s.closed == DISCONNECT_BY_API
    s.send_text(b'{"type":"late"}')
    assert [m["type"] for m in sent(s)] == ["disconnect"]
