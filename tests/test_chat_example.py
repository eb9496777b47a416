"""examples/chat driven in a real headless Chromium: two users, one of them on a page
without WebSocket (SSE and HTTP calls), through the example's backend and config, the
backend being fastws' connect and publish proxy (SPEC §11; no JWT anywhere).

Messages both ways with sender names, presence, typing shown then cleared, read
receipts, a direct message to the other's inbox, a message over the publish proxy's
length limit refused and shown to its sender, and offline sending: the server goes
away, two messages typed meanwhile arrive once each after it is back; a third user
joining later gets the room's last messages.  The backend's call counts and fastws'
/metrics show that every transport went through the connect proxy.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import free_port, http, scrape, start_redis, start_server, wait_port
from test_browser import browser

from fastws.client import Client
from fastws.errors import RequestError

__all__ = ["browser"]   # fixture, imported for pytest

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "examples" / "chat"
TIMEOUT_MS = 20_000


def chat_config(backend_port: int) -> str:
    """The example's fastws.toml, its ``[proxy]`` URLs on ``backend_port``."""
    text = (CHAT / "fastws.toml").read_text()
    assert "jwt_secret" not in tomllib.loads(text)["server"]     # no JWT in proxy mode
    assert text.count("127.0.0.1:8080/proxy/") == 2
    return text.replace("127.0.0.1:8080/proxy/", f"127.0.0.1:{backend_port}/proxy/")


def stats(state) -> dict[str, int]:
    """The backend's proxy call counts (``GET /stats``)."""
    _, _, body = http("GET", state["url"] + "stats")
    return json.loads(body)


@pytest.fixture
def chat():
    """Redis, fastws with the example's config, and the example's backend (its proxy)."""
    redis = start_redis()
    port = free_port()
    config = chat_config(port)
    srv = start_server("--broker", redis.url, config=config)
    backend = subprocess.Popen(
        [sys.executable, str(CHAT / "backend.py"), "--no-fastws", "--port", str(port),
         "--fastws-port", str(srv.port)], cwd=ROOT)
    wait_port(port, backend)
    state = {"srv": srv, "redis": redis, "url": f"http://127.0.0.1:{port}/",
             "config": config}
    try:
        yield state
    finally:
        backend.terminate()
        backend.wait(10)
        state["srv"].stop(timeout=3.0)
        redis.stop()


def open_user(browser, url: str, name: str, init: str | None = None):
    ctx = browser.new_context()
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.errors = []
    page.on("pageerror", lambda exc: page.errors.append(str(exc)))
    if init:
        page.add_init_script(init)
    page.goto(url)
    page.fill("#name", name)
    page.click("#login")
    page.wait_for_function("() => document.querySelector('#state').textContent === "
                           "'connected'")
    return page


def rows(page) -> list[tuple[str, str]]:
    return [tuple(r) for r in page.evaluate(
        """() => [...document.querySelectorAll('#messages .msg')].map(r =>
             [r.querySelector('.sender').textContent, r.querySelector('.text').textContent])""")]


def wait_row(page, sender: str, text: str) -> None:
    page.wait_for_function(
        """([s, t]) => [...document.querySelectorAll('#messages .msg:not(.pending)')].some(r =>
             r.querySelector('.sender').textContent === s &&
             r.querySelector('.text').textContent === t)""", arg=[sender, text])


def send(page, text: str) -> None:
    page.fill("#text", text)
    page.press("#text", "Enter")


def test_two_users_chat(browser, chat):
    alice = open_user(browser, chat["url"], "alice")
    bob = open_user(browser, chat["url"], "bob", init="delete window.WebSocket;")
    assert alice.evaluate("window.chat.client.transport") == "websocket"
    bob_transport = bob.evaluate("window.chat.client.transport")
    assert bob_transport in ("sse", "poll")
    # both were named by the backend's connect proxy from their session token
    calls = stats(chat)
    assert calls.get("connect websocket ok", 0) >= 1, calls
    assert calls.get(f"connect {bob_transport} ok", 0) >= 1, calls

    # presence: each sees both
    for page in (alice, bob):
        page.wait_for_function("() => [...document.querySelectorAll('#people li')]"
                               ".map(l => l.textContent).join() === 'alice,bob'")

    # typing shown, then cleared by the message; messages both ways with sender names
    alice.type("#text", "hello b")
    bob.wait_for_function("() => document.querySelector('#typing').textContent"
                          ".includes('alice is typing')")
    alice.fill("#text", "hello bob")
    alice.press("#text", "Enter")
    wait_row(bob, "alice", "hello bob")
    bob.wait_for_function("() => document.querySelector('#typing').textContent === ''")
    send(bob, "hi alice")
    wait_row(alice, "bob", "hi alice")
    wait_row(bob, "bob", "hi alice")

    # read receipts, both ways (ephemeral, never in history)
    alice.wait_for_function("() => [...document.querySelectorAll('#messages .msg')].some(r =>"
                            " r.querySelector('.receipt').textContent === 'read by bob')")
    bob.wait_for_function("() => [...document.querySelectorAll('#messages .msg')].some(r =>"
                          " r.querySelector('.receipt').textContent === 'read by alice')")

    # over the publish proxy's length limit: refused, shown to the sender, sent to no one
    for page in (alice, bob):
        send(page, "x" * 501)
        page.wait_for_function("() => document.querySelector('#error').textContent === "
                               "'message too long (500 characters at most)'")
    assert not any(len(text) > 500 for page in (alice, bob) for _, text in rows(page))
    calls = stats(chat)
    assert calls.get("publish refused", 0) == 2, calls
    assert calls.get("connect http ok", 0) >= 1, calls     # bob's /call publishes

    # a direct message lands in the other's inbox (user:bob, an owner channel)
    alice.fill("#dm-to", "bob")
    alice.fill("#dm-text", "psst")
    alice.press("#dm-text", "Enter")
    bob.wait_for_function("() => [...document.querySelectorAll('#inbox li')]"
                          ".some(l => l.textContent === 'alice: psst')")

    # offline: the server goes away; alice sends two messages; they arrive once each
    srv = chat["srv"]
    srv.stop(signal.SIGKILL)
    alice.wait_for_function("() => window.chat.client.state !== 'connected'")
    send(alice, "offline one")
    send(alice, "offline two")
    alice.wait_for_function("() => document.querySelector('#pending').textContent === '2'")
    chat["srv"] = start_server("--broker", chat["redis"].url, port=srv.port,
                               config=chat["config"])
    wait_row(bob, "alice", "offline two")
    wait_row(alice, "alice", "offline two")
    alice.wait_for_function("() => document.querySelector('#pending').textContent === '0'")
    send(bob, "welcome back")  # bob still chats (fallback transport) after the restart
    wait_row(alice, "bob", "welcome back")
    got = rows(bob)
    assert got.count(("alice", "offline one")) == 1 and got.count(("alice", "offline two")) == 1
    assert got.index(("alice", "offline one")) < got.index(("alice", "offline two"))
    assert rows(alice).count(("alice", "offline one")) == 1

    # a third user arriving later sees the room's last messages (subscribe with `last`),
    # sender names included, and the receipts and typing signals not at all
    carol = open_user(browser, chat["url"], "carol")
    wait_row(carol, "bob", "welcome back")
    history = rows(carol)
    assert history == [("alice", "hello bob"), ("bob", "hi alice"), ("alice", "offline one"),
                       ("alice", "offline two"), ("bob", "welcome back")], history
    assert alice.errors == [] and bob.errors == [] and carol.errors == []

    # the restarted fastws asked the backend too (connects, messages, typing, receipts)
    metrics = scrape(chat["srv"].http_url)
    assert metrics['fastws_proxy_requests_total{kind="connect",result="ok"}'] >= 3, metrics
    assert metrics['fastws_proxy_requests_total{kind="publish",result="ok"}'] >= 3, metrics
    calls = stats(chat)
    assert calls.get("connect websocket refused", 0) == 0, calls
    assert calls["publish ok"] >= 7, calls


def test_backend_answers_the_proxy_shapes():
    """The backend's connect and publish proxy endpoints answer SPEC §11's shapes: the
    user of a session token or session cookie (401 without one); a message over the
    length limit refused (413), a forged name refused (403), others allowed unchanged."""
    port = free_port()
    backend = subprocess.Popen([sys.executable, str(CHAT / "backend.py"), "--no-fastws",
                                "--port", str(port)], cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_port(port, backend)
        status, headers, body = http("POST", base + "/login", {"name": "dora"})
        token = json.loads(body)["token"]
        assert status == 200 and token.count(".") == 0      # opaque, not a JWT
        cookie = {k.lower(): v for k, v in headers.items()}["set-cookie"].split(";")[0]
        assert cookie == f"chat_session={token}"
        connect_req = {"client": "c1", "transport": "websocket", "ip": "127.0.0.1"}
        for good in ({"token": token, "headers": {}},
                     {"token": None, "headers": {"Cookie": cookie}}):
            _, _, body = http("POST", base + "/proxy/connect", {**connect_req, **good})
            assert json.loads(body)["result"] == {"user": "dora", "meta": {"name": "dora"}}
        for bad in ({"token": None, "headers": {}},
                    {"token": token + "x", "headers": {"cookie": "chat_session=nope"}}):
            _, _, body = http("POST", base + "/proxy/connect", {**connect_req, **bad})
            assert json.loads(body)["error"]["code"] == 401
        pub = {"client": "c1", "user": "dora", "channel": "room:general", "meta": None}
        for data, code in (({"text": "x" * 501, "name": "dora"}, 413),
                           ({"text": "hi", "name": "mallory"}, 403), ("hi", 400)):
            _, _, body = http("POST", base + "/proxy/publish", {**pub, "data": data})
            assert json.loads(body)["error"]["code"] == code
        for data in ({"text": "x" * 500, "name": "dora"}, {"typing": True}, {"read": 3}):
            _, _, body = http("POST", base + "/proxy/publish", {**pub, "data": data})
            assert json.loads(body) == {"result": {}}
        _, _, body = http("GET", base + "/stats")
        assert json.loads(body) == {"connect websocket ok": 2, "connect websocket refused": 2,
                                    "publish refused": 3, "publish ok": 3}
        status, _, _ = http("POST", base + "/login", {"name": "no spaces"})
        assert status == 400
    finally:
        backend.terminate()
        backend.wait(10)


def test_one_command_starts_both():
    """``python examples/chat/backend.py`` (the README's one command, on other ports)
    starts fastws too, its ``[proxy]`` URLs moved to the backend's port: a client with
    the session token of ``/login`` is named by the connect proxy, and its messages pass
    the publish proxy (a long one refused)."""
    port, ws_port = free_port(), free_port()
    both = subprocess.Popen([sys.executable, str(CHAT / "backend.py"), "--port", str(port),
                             "--fastws-port", str(ws_port)], cwd=ROOT)
    try:
        wait_port(port, both)
        wait_port(ws_port, both)
        _, _, body = http("POST", f"http://127.0.0.1:{port}/login", {"name": "erin"})
        login = json.loads(body)
        assert login["ws"] == f"ws://127.0.0.1:{ws_port}/ws"

        async def chat() -> tuple[object, int]:
            async with Client(login["ws"], login["token"]) as c:
                await c.subscribe("room:general")
                await c.publish("room:general", {"text": "hi", "name": "erin"})
                event = await c.next_event(10)
                with pytest.raises(RequestError) as refused:
                    await c.publish("room:general", {"text": "x" * 501, "name": "erin"})
                return event, refused.value.code

        with ThreadPoolExecutor(1) as pool:   # (the browser tests' loop runs in this thread)
            event, code = pool.submit(asyncio.run, chat()).result(30)
        assert event.data == {"text": "hi", "name": "erin"} and event.sender["user"] == "erin"
        assert code == 413
        _, _, body = http("GET", f"http://127.0.0.1:{port}/stats")
        assert json.loads(body) == {"connect websocket ok": 1, "publish ok": 1,
                                    "publish refused": 1}
    finally:
        both.send_signal(signal.SIGINT)
        both.wait(15)
