"""Fallback transports in a real headless Chromium (SPEC §10): the browser client picks
SSE or long-poll by itself, and a plain EventSource resumes across a node crash.

Same set-up as tests/test_browser.py (Debian's chromium driven by playwright).
"""

from __future__ import annotations

import json
import signal
import time

import pytest
from conftest import start_redis
from test_browser import browser, event_rows, open_live_page, page, subscribe_on_page, wait_for

__all__ = ["browser", "page"]   # fixtures, imported for pytest

pytestmark = pytest.mark.timeout(120)

CONFIG = "[namespaces.chat]\npublish = \"anyone\"\nhistory_size = 100\n"

NO_WEBSOCKET = "delete window.WebSocket;"
NO_EVENTSOURCE = "delete window.WebSocket; delete window.EventSource;"
# A WebSocket that never opens (a proxy stripping Upgrade); the real one is kept aside.
BROKEN_WEBSOCKET = """
window.__realWebSocket = window.WebSocket;
window.WebSocket = class {
  constructor() { this.readyState = 0; setTimeout(() => this.onclose &&
    this.onclose({ code: 1006, reason: "", wasClean: false }), 20); }
  close() {}
};
"""


def data_of(page) -> list[int]:
    return [json.loads(d)["n"] for _, d in event_rows(page)][::-1]


@pytest.mark.parametrize(("script", "transport"), [(NO_WEBSOCKET, "sse"),
                                                   (NO_EVENTSOURCE, "poll")])
def test_live_page_without_websocket_recovers_across_a_crash(page, fastws_server, script,
                                                              transport):
    """No WebSocket in the page (then no EventSource either): the client moves to SSE
    (long-poll), the live page works the same, and a node crash on Redis loses nothing."""
    redis = start_redis()
    try:
        broker = ("--broker", redis.url)
        srv = fastws_server(*broker, config=CONFIG)
        other = fastws_server(*broker, config=CONFIG)
        page.add_init_script(script)
        open_live_page(page, srv)
        assert page.evaluate("window.fastws.transport") == transport, (
            page.text_content("#notices"), page.errors)
        subscribe_on_page(page, "chat:*")
        subscribe_on_page(page, "chat:a")       # overlaps: one row per event
        for n in (1, 2):
            srv.publish("chat:a", {"n": n})
        wait_for(lambda: len(event_rows(page)) >= 2, what="first events")
        # requests go over POST /call
        assert page.evaluate("window.fastws.ping().then(r => r.type)") == "pong"
        pub = page.evaluate("window.fastws.publish('chat:b', {n: 0}).then(r => r.type)")
        assert pub == "published"
        wait_for(lambda: len(event_rows(page)) >= 3, what="own publication")
        page.evaluate("() => { window.fastws.options.maxDelay = 300; }")
        srv.stop(signal.SIGKILL)
        page.wait_for_function("() => window.fastws.state !== 'connected'")
        for n in (3, 4, 5):
            other.publish("chat:a", {"n": n})
        srv2 = fastws_server(*broker, config=CONFIG, port=srv.port)
        page.wait_for_function("() => window.fastws.state === 'connected'")
        srv2.publish("chat:a", {"n": 6})
        wait_for(lambda: len(event_rows(page)) >= 7, what="replayed and live events")
        time.sleep(0.5)                          # a duplicate would show now
        assert data_of(page) == [1, 2, 0, 3, 4, 5, 6]
        assert page.evaluate("window.fastws.transport") == transport
        assert page.text_content("#transport-used") == transport
    finally:
        redis.stop()


def test_live_page_transport_parameter(page, fastws_server):
    srv = fastws_server(config=CONFIG)
    page.goto(srv.http_url + "/?transport=poll")
    page.wait_for_function("() => window.fastws && window.fastws.state === 'connected'")
    page.evaluate("() => { window.__log = []; window.fastws.on('subscribed', a => "
                  "window.__log.push(['subscribed', a])); }")
    assert page.evaluate("window.fastws.transport") == "poll"
    subscribe_on_page(page, "chat:p")
    srv.publish("chat:p", {"n": 1})
    wait_for(lambda: data_of(page) == [1], what="event over long-poll")
    assert page.input_value("#transport") == "poll"


def test_client_switches_to_sse_and_back_to_websocket(page, fastws_server):
    """Two WebSocket attempts fail before open: SSE; positions carry over; after
    retryWebSocketAfter a WebSocket opens again and the client moves back to it."""
    srv = fastws_server(config=CONFIG)
    page.add_init_script(BROKEN_WEBSOCKET)
    page.goto(srv.http_url + "/healthz")
    page.evaluate("""async () => {
      const { FastWS } = await import("/fastws.js");
      const url = location.origin.replace("http", "ws") + "/ws";
      const c = window.c = new FastWS(url, { minDelay: 20, maxDelay: 100,
                                              retryWebSocketAfter: 1500 });
      window.got = []; window.switches = [];
      c.on("transport", (t) => window.switches.push([t.from, t.to]));
      c.subscribe("chat:s", (e) => window.got.push(e.data.n));
    }""")
    page.wait_for_function("() => c.transport === 'sse' && c.state === 'connected'")
    page.wait_for_function("() => c._subs.get('chat:s').status === 'subscribed'")
    for n in (1, 2):
        srv.publish("chat:s", {"n": n})
    page.wait_for_function("() => got.length >= 2")
    page.evaluate("() => { window.WebSocket = window.__realWebSocket; }")
    srv.publish("chat:s", {"n": 3})
    page.wait_for_function("() => c.transport === 'websocket' && c.state === 'connected'")
    page.wait_for_function("() => c._subs.get('chat:s').status === 'subscribed'")
    srv.publish("chat:s", {"n": 4})
    page.wait_for_function("() => got.length >= 4")
    time.sleep(0.3)
    assert page.evaluate("got") == [1, 2, 3, 4]
    assert page.evaluate("switches") == [["websocket", "sse"], ["sse", "websocket"]]


def test_plain_eventsource_resumes_across_a_node_crash(page, fastws_server):
    """No library: a browser EventSource on /sse, the node SIGKILLed and restarted on
    Redis; the browser's own Last-Event-ID resumes: every event once, in order."""
    redis = start_redis()
    try:
        broker = ("--broker", redis.url)
        srv = fastws_server(*broker, config=CONFIG)
        other = fastws_server(*broker, config=CONFIG)
        page.goto(srv.http_url + "/healthz")
        page.evaluate("""() => {
          window.got = []; window.opens = 0;
          const es = window.es = new EventSource("/sse?channel=chat:x&channel=chat:y*");
          es.onopen = () => { window.opens++; };
          es.onmessage = (ev) => {
            const m = JSON.parse(ev.data);
            if (m.type === "event") window.got.push([m.channel, m.data]);
          };
        }""")
        page.wait_for_function("() => opens === 1")
        time.sleep(0.3)                          # both subscriptions live
        for n in range(1, 4):
            srv.publish("chat:x", n)
            srv.publish("chat:yy", n)
        page.wait_for_function("() => got.length >= 6")
        srv.stop(signal.SIGKILL)
        for n in range(4, 7):                    # while the node is down, elsewhere
            other.publish("chat:x", n)
            other.publish("chat:yy", n)
        fastws_server(*broker, config=CONFIG, port=srv.port)
        page.wait_for_function("() => opens >= 2", timeout=30_000)
        for n in range(7, 10):
            other.publish("chat:x", n)
            other.publish("chat:yy", n)
        page.wait_for_function("() => got.length >= 18", timeout=30_000)
        time.sleep(0.5)
        got = page.evaluate("got")
        assert [d for c, d in got if c == "chat:x"] == list(range(1, 10))
        assert [d for c, d in got if c == "chat:yy"] == list(range(1, 10))
        assert len(got) == 18
    finally:
        redis.stop()


@pytest.mark.parametrize("script", [NO_WEBSOCKET, NO_EVENTSOURCE])
def test_refused_channel_is_an_error_for_that_subscription_only(page, fastws_server, script):
    """Over a WebSocket a forbidden subscribe gets an error reply and the rest goes on;
    the fallback transports, refused as a whole request, behave the same."""
    srv = fastws_server(config=CONFIG)
    page.add_init_script(script)
    page.goto(srv.http_url + "/healthz")
    page.evaluate("""async () => {
      const { FastWS } = await import("/fastws.js");
      const c = window.c = new FastWS(location.origin.replace("http", "ws") + "/ws",
                                      { minDelay: 20, maxDelay: 200 });
      window.got = []; window.refusal = null;
      c.subscribe("user:bob", () => {}).ready
        .catch((e) => { window.refusal = [e.code, e.message]; });
      c.subscribe("chat:ok", (e) => window.got.push(e.data.n));
    }""")
    page.wait_for_function("() => window.refusal !== null")
    assert page.evaluate("refusal")[0] == 401
    page.wait_for_function("() => c._subs.get('chat:ok') && "
                           "c._subs.get('chat:ok').status === 'subscribed'")
    srv.publish("chat:ok", {"n": 1})
    page.wait_for_function("() => got.length === 1")
    assert page.evaluate("c.subscriptions()") == ["chat:ok"]
    assert page.evaluate("c.state") == "connected"
