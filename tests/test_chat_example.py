"""examples/chat driven in a real headless Chromium: two users, one of them on a page
without WebSocket (SSE and HTTP calls), through the example's backend and config.

Messages both ways with sender names, presence, typing shown then cleared, read
receipts, a direct message to the other's inbox, and offline sending: the server goes
away, two messages typed meanwhile arrive once each after it is back; a third user
joining later gets the room's last messages.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port, http, start_redis, start_server, wait_port
from test_browser import browser

__all__ = ["browser"]   # fixture, imported for pytest

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "examples" / "chat"
TIMEOUT_MS = 20_000


@pytest.fixture
def chat():
    """Redis, fastws with the example's config, and the example's backend."""
    redis = start_redis()
    config = (CHAT / "fastws.toml").read_text()
    srv = start_server("--broker", redis.url, config=config)
    port = free_port()
    backend = subprocess.Popen(
        [sys.executable, str(CHAT / "backend.py"), "--no-fastws", "--port", str(port),
         "--fastws-port", str(srv.port)], cwd=ROOT)
    wait_port(port, backend)
    state = {"srv": srv, "redis": redis, "url": f"http://127.0.0.1:{port}/"}
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
    assert bob.evaluate("window.chat.client.transport") in ("sse", "poll")

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
                               config=(CHAT / "fastws.toml").read_text())
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


def test_backend_answers_the_proxy_shapes():
    """The backend's connect and publish proxy endpoints answer SPEC §11's shapes: the
    user of a login cookie (401 without one); a message over the length limit refused
    (413), others allowed with the sender's name stamped in."""
    port = free_port()
    backend = subprocess.Popen([sys.executable, str(CHAT / "backend.py"), "--no-fastws",
                                "--port", str(port)], cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_port(port, backend)
        status, headers, body = http("POST", base + "/login", {"name": "dora"})
        assert status == 200 and json.loads(body)["token"]  # JWT mode: no [proxy] table
        cookie = {k.lower(): v for k, v in headers.items()}["set-cookie"].split(";")[0]
        connect_req = {"client": "c1", "transport": "websocket", "ip": "127.0.0.1",
                       "token": None}
        _, _, body = http("POST", base + "/proxy/connect",
                          {**connect_req, "headers": {"Cookie": cookie}})
        assert json.loads(body)["result"]["user"] == "dora"
        for bad in ({}, {"cookie": cookie.replace("dora", "eve")}):
            _, _, body = http("POST", base + "/proxy/connect", {**connect_req, "headers": bad})
            assert json.loads(body)["error"]["code"] == 401
        pub = {"client": "c1", "user": "dora", "channel": "room:general"}
        _, _, body = http("POST", base + "/proxy/publish",
                          {**pub, "data": {"text": "x" * 501, "name": "mallory"}})
        assert json.loads(body)["error"]["code"] == 413
        _, _, body = http("POST", base + "/proxy/publish",
                          {**pub, "data": {"text": "hi", "name": "mallory"}})
        assert json.loads(body) == {"result": {"data": {"text": "hi", "name": "dora"}}}
        status, _, _ = http("POST", base + "/login", {"name": "no spaces"})
        assert status == 400
    finally:
        backend.terminate()
        backend.wait(10)
