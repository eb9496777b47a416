"""The live page and /fastws.js in a real headless Chromium (Debian's `chromium`).

Driven with Python playwright using the system browser: playwright never downloads a
browser here.  A missing chromium or playwright fails these tests with a clear message;
nothing is skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import http, scrape, start_redis

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("FASTWS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
TIMEOUT_MS = 20_000

# Every event the page's client emits, recorded in the page for the assertions below.
RECORDER = """() => {
  window.__log = [];
  const names = ["state", "connected", "disconnect", "reconnecting", "subscribed", "error",
                 "closed", "online", "offline", "visible"];
  for (const name of names)
    window.fastws.on(name, (a) => window.__log.push([name, a && a.message ? a.message : a]));
}"""


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's package "
                    "(`apt-get install -y chromium`, part of `make system-deps`) "
                    "or point FASTWS_CHROMIUM at a Chromium binary")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: `pip install -e .[test]` (it drives the "
                    "system Chromium; no browser download is needed)")
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context(viewport={"width": 1100, "height": 720})
    pg = ctx.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    pg.errors = []
    pg.on("pageerror", lambda exc: pg.errors.append(f"pageerror: {exc}"))
    pg.on("console", lambda m: m.type == "error" and pg.errors.append(f"console: {m.text}"))
    try:
        yield pg
    finally:
        ctx.close()


def wait_for(predicate, timeout: float = TIMEOUT_MS / 1000, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def open_live_page(page, srv):
    from playwright.sync_api import expect

    resp = page.goto(srv.http_url + "/")
    assert resp is not None and resp.status == 200, resp and resp.status
    expect(page.locator("#state")).to_have_text("connected")
    page.evaluate(RECORDER)


def subscribe_on_page(page, pattern: str) -> None:
    """Type a pattern, press Enter, wait until the server confirmed the subscription."""
    page.fill("#pattern", pattern)
    page.press("#pattern", "Enter")
    page.wait_for_function(
        "p => window.__log.some(([n, a]) => n === 'subscribed' && a.channel === p)", arg=pattern)


def event_rows(page) -> list[tuple[str, str]]:
    """(channel, data text) of every row in #events, newest first."""
    rows = page.eval_on_selector_all(
        "#events li[data-channel]",
        "els => els.map(li => [li.dataset.channel, li.querySelector('.data').textContent])")
    return [tuple(r) for r in rows]


def recovered_rows(page) -> list[str]:
    """Data text of the rows marked as recovered (replayed on a resubscribe), newest first."""
    return page.eval_on_selector_all(
        "#events li[data-recovered='true']",
        "els => els.map(li => li.querySelector('.data').textContent)")


def log_of(page, name: str) -> list:
    return [a for n, a in page.evaluate("window.__log") if n == name]


def states(page) -> list[str]:
    return [a for n, a in page.evaluate("window.__log") if n == "state"]


def test_static_assets(server):
    status, headers, body = http("GET", server.http_url + "/fastws.js")
    assert status == 200
    ctype = {k.lower(): v for k, v in headers.items()}["content-type"]
    assert ctype.split(";")[0].strip() == "text/javascript", ctype
    assert b"export class FastWS" in body
    status, headers, body = http("GET", server.http_url + "/")
    assert status == 200
    assert b'id="pattern"' in body and b'id="events"' in body
    assert b"http://" not in body and b"https://" not in body  # no external resources


def test_live_page_streams_events(page, fastws_server, tmp_path):
    srv = fastws_server()
    open_live_page(page, srv)
    assert page.input_value("#pattern") == "events:*"
    subscribe_on_page(page, "test:*")

    srv.publish("other:nope", {"n": 0})  # matches nothing on the page
    sent = [("test:a", {"n": 1, "who": "alice"}), ("test:b:deep", "plain text"),
            ("test:a", [1, 2, 3]), ("test:c", {"html": "<b>not bold</b>"})]
    for channel, data in sent:
        srv.publish(channel, data)
    wait_for(lambda: len(event_rows(page)) >= len(sent), what="events on the page")
    time.sleep(0.3)  # anything extra (duplicates, the non-matching channel) would show now

    rows = event_rows(page)
    want = [(c, d if isinstance(d, str) else json.dumps(d, separators=(",", ":")))
            for c, d in reversed(sent)]
    assert rows == want
    assert page.locator("#events b").count() == 0  # data is shown as text, never as HTML
    assert page.text_content("#state") == "connected"
    assert page.text_content("#count") == str(len(sent))
    assert not page.errors, page.errors

    time.sleep(1.0)  # let the new-row highlight fade
    page.screenshot(path=str(tmp_path / "live-page.png"))
    assert (tmp_path / "live-page.png").stat().st_size > 10_000


def test_live_page_over_a_compressed_connection(page, fastws_server):
    """Chromium offers permessage-deflate by itself: the page's connection is compressed
    (SPEC §9), a large publication arrives compressed and one under 512 B plain, and the
    page shows both unchanged; with compression off the same page works plain."""
    srv = fastws_server()
    open_live_page(page, srv)
    values = scrape(srv.http_url)
    assert values["fastws_connections_compressed"] == values["fastws_connections"] == 1
    subscribe_on_page(page, "zip:*")
    big = {"rows": [{"tx": f"0x{i:064x}", "value": i} for i in range(12)]}   # > 512 B
    sent_before = scrape(srv.http_url)["fastws_bytes_sent_total"]
    srv.publish("zip:big", big)
    srv.publish("zip:small", "tiny")
    wait_for(lambda: len(event_rows(page)) >= 2, what="events on the page")
    assert event_rows(page) == [("zip:small", "tiny"),
                                ("zip:big", json.dumps(big, separators=(",", ":")))]
    # the big push went out compressed: far fewer bytes written than its JSON
    written = scrape(srv.http_url)["fastws_bytes_sent_total"] - sent_before
    assert written < len(json.dumps(big)) // 2, written
    assert not page.errors, page.errors

    plain = fastws_server("--no-compression")
    open_live_page(page, plain)
    values = scrape(plain.http_url)
    assert values["fastws_connections_compressed"] == 0 and values["fastws_connections"] == 1
    subscribe_on_page(page, "zip:*")
    plain.publish("zip:big", big)
    wait_for(lambda: len(event_rows(page)) >= 1, what="the plain event")
    assert not page.errors, page.errors


def test_second_subscription_and_unsubscribe(page, fastws_server):
    srv = fastws_server()
    open_live_page(page, srv)
    subscribe_on_page(page, "alpha:[ab]?")
    subscribe_on_page(page, "beta")
    for channel in ("alpha:a1", "alpha:c1", "alpha:b22", "beta", "beta:x", "alpha:b2"):
        srv.publish(channel, channel)
    wait_for(lambda: len(event_rows(page)) >= 3, what="events")
    time.sleep(0.3)
    assert [c for c, _ in event_rows(page)] == ["alpha:b2", "beta", "alpha:a1"]

    page.click('#subscriptions li[data-channel="beta"] button')
    page.wait_for_function("() => !window.fastws.subscriptions().includes('beta')")
    time.sleep(0.2)  # let the unsubscribe reach the server
    srv.publish("beta", "gone")
    srv.publish("alpha:a2", "still here")
    wait_for(lambda: event_rows(page)[0][0] == "alpha:a2", what="alpha:a2")
    time.sleep(0.3)
    assert [c for c, _ in event_rows(page)].count("beta") == 1
    assert not page.errors, page.errors


def test_page_reconnects_after_server_restart(page, fastws_server):
    srv = fastws_server()
    open_live_page(page, srv)
    subscribe_on_page(page, "live:*")
    srv.publish("live:1", {"before": True})
    wait_for(lambda: event_rows(page), what="first event")

    srv.stop(signal.SIGKILL)  # a crash: the page only sees the TCP connection go
    page.wait_for_function("() => window.fastws.state !== 'connected'")
    srv2 = fastws_server(port=srv.port)
    page.wait_for_function("() => window.fastws.state === 'connected'")
    # The subscription is re-sent by itself (with `since`; a new memory broker is a new
    # epoch, so the answer is recovered:false and the page shows a gap).
    page.wait_for_function(
        "() => window.__log.filter(([n, a]) => n === 'subscribed').length >= 2")
    srv2.publish("live:2", {"after": True})
    wait_for(lambda: len(event_rows(page)) >= 2, what="event after the restart")

    assert event_rows(page)[0] == ("live:2", '{"after":true}')
    seq = states(page)
    assert seq[:1] == ["disconnected"] and seq[-2:] == ["connecting", "connected"], seq
    assert "closed" not in seq
    assert page.text_content("#state") == "connected"
    assert page.text_content("#reconnects") == "1"
    notices = page.text_content("#notices")
    assert "reconnected" in notices and "gap" in notices, notices
    assert not [e for e in page.errors if "WebSocket" not in e], page.errors


def test_page_follows_drain(page, fastws_server):
    """SIGTERM: the page gets `disconnect` (4001, after_ms), waits, and reconnects."""
    srv = fastws_server(config="[server]\ndrain_timeout = 2\n")
    open_live_page(page, srv)
    subscribe_on_page(page, "drain:*")
    srv.publish("drain:1", 1)
    wait_for(lambda: event_rows(page), what="first event")
    assert srv.stop() == 0
    page.wait_for_function(
        "() => window.__log.some(([n, a]) => n === 'disconnect' && a.code === 4001)")
    srv2 = fastws_server(port=srv.port)
    page.wait_for_function("() => window.fastws.state === 'connected'")
    page.wait_for_function(
        "() => window.__log.filter(([n, a]) => n === 'subscribed').length >= 2")
    srv2.publish("drain:2", 2)
    wait_for(lambda: len(event_rows(page)) >= 2, what="event after the drain")
    assert [c for c, _ in event_rows(page)] == ["drain:2", "drain:1"]
    assert "closed" not in states(page)


def test_glob_matcher_agrees_with_server(page, server):
    """The JS glob matcher routes exactly as the server's compiled matcher does."""
    from fastws import _match

    page.goto(server.http_url + "/")
    patterns = ["*", "events:*", "market:0x*", "a?c", "[abc]*", "[^a]*", "[a-c]:*", "\\[*",
                "a[", "[", "[]]*", "[^]]*", "*\\*", "[c-a]*", "a\\", "[a\\]]*", "**b", "?*?",
                "[-a]*", "[a-]*", "\\?*", "[^-]*", "*[", "[ab", "*:*:*", "x\\y"]
    names = ["events:bet_placed", "market:0xabc", "abc", "a", "b:x", "[x", "a[", "*", "a*",
             "-", "]", "^", "c", "a:b:c", "xy", "x\\y", "?q", "cab", "", "market:0X1"]
    got = page.evaluate("""async ([ps, ns]) => {
      const { globMatch } = await import("/fastws.js");
      return ps.map(p => ns.map(n => globMatch(p, n)));
    }""", [patterns, names])
    for p, row in zip(patterns, got, strict=True):
        for n, g in zip(names, row, strict=True):
            assert g == bool(_match.glob_match(p, n)), (p, n, g)


def test_browser_rules_match_shared_vectors(page, server):
    """fastws.js's copies of the shared rules (is_pattern, wallet: normalisation, glob
    matching, which close codes end the client, the token-expired close) agree with
    tests/data/rules.json, the
    vectors tests/test_rules.py checks the server and the Python client against."""
    rules = json.loads((ROOT / "tests" / "data" / "rules.json").read_text())
    page.goto(server.http_url + "/")
    got = page.evaluate("""async (rules) => {
      const m = await import("/fastws.js");
      // A WebSocket that never opens: the client's own use of the rules, without a server.
      class Idle { constructor() { Idle.last = this; } close() {} }
      const client = () => new m.FastWS("ws://rules.invalid/ws", { WebSocket: Idle });
      const routed = rules.normalize.map(([name]) => {
        const c = client();
        c.subscribe(name, () => {});
        const keys = c.subscriptions();
        c.close();
        return keys[0];
      });
      const ends = [];
      for (const [code] of rules.should_reconnect) {
        const c = client();
        await new Promise((r) => setTimeout(r, 0));  // the first attempt opens a socket
        Idle.last.onclose({ code, reason: "test", wasClean: true });
        ends.push(c.state !== "closed");
        c.close();
      }
      // "token expired" is the one close in 4500-4999 after which a token function's
      // client reconnects (with a new token); any other reason there ends it.
      const [code, reason] = rules.token_expired;
      const refreshed = [];
      for (const why of [reason, "invalid token"]) {
        const c = new m.FastWS("ws://rules.invalid/ws", { WebSocket: Idle, token: () => "t" });
        await new Promise((r) => setTimeout(r, 0));
        Idle.last.onclose({ code, reason: why, wasClean: true });
        refreshed.push(c.state !== "closed");
        c.close();
      }
      return {
        token_expired: refreshed,
        is_pattern: rules.is_pattern.map(([n]) => m.isPattern(n)),
        normalize: rules.normalize.map(([n]) => m.normalizeChannel(n)),
        subscribe: routed,
        glob_match: rules.glob_match.map(([p, n]) => m.globMatch(p, n)),
        should_reconnect: rules.should_reconnect.map(([c]) => m.shouldReconnect(c)),
        reconnects: ends,
      };
    }""", rules)
    assert got.pop("token_expired") == [True, False]
    same_as = {"subscribe": "normalize", "reconnects": "should_reconnect"}
    for key, results in got.items():
        vectors = rules[same_as.get(key, key)]
        for row, value in zip(vectors, results, strict=True):
            assert value == row[-1], (key, row, value)
    assert not page.errors, page.errors


def test_page_recovers_missed_events(page, fastws_server):
    """A dropped connection resubscribes with `since`; what was missed is replayed, once."""
    srv = fastws_server()
    open_live_page(page, srv)
    subscribe_on_page(page, "rec:room")
    srv.publish("rec:room", 1)
    srv.publish("rec:room", 2)
    wait_for(lambda: len(event_rows(page)) >= 2, what="first events")
    # Make the next reconnect wait exactly 2 s, then drop the socket from the page.
    page.evaluate("""() => {
      window.fastws.options.random = () => 1;
      window.fastws.options.minDelay = 2000;
      window.fastws._ws.close();
    }""")
    page.wait_for_function("() => window.fastws.state === 'disconnected'")
    for n in (3, 4, 5):
        srv.publish("rec:room", n)
    page.wait_for_function(
        "() => window.__log.filter(([n, a]) => n === 'subscribed').length >= 2")
    info = [a for n, a in page.evaluate("window.__log") if n == "subscribed"][-1]
    assert info["recovered"] is True and info["replayed"] == 3, info
    srv.publish("rec:room", 6)
    wait_for(lambda: len(event_rows(page)) >= 6, what="replayed and live events")
    time.sleep(0.3)
    assert [int(d) for _, d in event_rows(page)] == [6, 5, 4, 3, 2, 1]
    assert "recovered, 3 missed" in page.text_content("#notices")
    assert page.text_content("#state") == "connected"


def test_backoff_is_full_jitter(page, server):
    """After the n-th failed attempt the delay is uniform in [0, min(20 s, 0.5 s * 2^n)]."""
    page.goto(server.http_url + "/")
    got = page.evaluate("""async () => {
      const { backoffDelay } = await import("/fastws.js");
      const out = [];
      for (let n = 0; n < 10; n++) {
        const top = backoffDelay(n, { random: () => 0.999999 });
        const low = backoffDelay(n, { random: () => 0 });
        let max = 0;
        for (let i = 0; i < 2000; i++) max = Math.max(max, backoffDelay(n));
        out.push([low, top, max]);
      }
      return out;
    }""")
    for n, (low, top, seen_max) in enumerate(got):
        cap = min(20_000, 500 * 2**n)
        assert low == 0 and cap * 0.999 < top <= cap and cap * 0.9 < seen_max <= cap, (n, got[n])


def test_page_recovers_events_missed_during_a_restart_with_redis(page, fastws_server, tmp_path):
    """Server crash and restart on the Redis broker: the page reconnects by itself and the
    events published meanwhile (through a second node) are replayed, marked as recovered."""
    redis = start_redis()
    try:
        broker = ("--broker", redis.url)
        srv = fastws_server(*broker)
        other = fastws_server(*broker)  # a second node on the same Redis
        open_live_page(page, srv)
        subscribe_on_page(page, "market:0x*")
        subscribe_on_page(page, "market:0xabc")  # overlaps: still one row per event
        for n in (1, 2):
            srv.publish("market:0xabc", {"n": n})
        wait_for(lambda: len(event_rows(page)) >= 2, what="first events")
        page.evaluate("() => { window.fastws.options.maxDelay = 300; }")  # quick retries
        srv.stop(signal.SIGKILL)  # a crash: the page only sees the TCP connection go
        page.wait_for_function("() => window.fastws.state !== 'connected'")
        for n in (3, 4, 5):  # while the page is disconnected, through the other node
            other.publish("market:0xabc", {"n": n})
        srv2 = fastws_server(*broker, port=srv.port)
        page.wait_for_function(
            "() => window.__log.filter(([n, a]) => n === 'subscribed').length >= 4")
        infos = sorted(log_of(page, "subscribed")[-2:], key=lambda i: i["channel"])
        assert infos == [
            {"channel": name, "recovered": True, "replayed": 3, "resubscribe": True}
            for name in ("market:0x*", "market:0xabc")], infos
        srv2.publish("market:0xabc", {"n": 6})
        wait_for(lambda: len(event_rows(page)) >= 6, what="replayed and live events")
        time.sleep(0.3)  # a duplicate would show now
        assert [json.loads(d)["n"] for _, d in event_rows(page)] == [6, 5, 4, 3, 2, 1]
        assert [json.loads(d)["n"] for d in recovered_rows(page)] == [5, 4, 3]
        assert page.text_content("#recovered") == "3"
        assert page.locator("#events li[data-recovered='true'] .tag").count() == 3
        assert "recovered, 3 missed" in page.text_content("#notices")
        assert page.text_content("#state") == "connected"
        assert page.text_content("#reconnects") == "1"
        assert not [e for e in page.errors if "WebSocket" not in e], page.errors

        time.sleep(1.0)  # let the new-row highlight fade
        page.screenshot(path=str(tmp_path / "live-page-recovered.png"))
        assert (tmp_path / "live-page-recovered.png").stat().st_size > 10_000
        if os.environ.get("FASTWS_UPDATE_SCREENSHOT"):  # docs/img/live-page.png
            (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(ROOT / "docs" / "img" / "live-page.png"))
    finally:
        redis.stop()


def test_offline_and_online_events(page, fastws_server):
    """Chromium's network emulation: `offline` probes and drops the dead link, nothing is
    tried while offline, `online` reconnects at once and recovers what was missed."""
    srv = fastws_server()
    open_live_page(page, srv)
    subscribe_on_page(page, "net:room")
    srv.publish("net:room", 1)
    wait_for(lambda: event_rows(page), what="first event")
    page.evaluate("() => { window.fastws.options.pongTimeout = 500; }")
    page.context.set_offline(True)
    page.wait_for_function("() => window.__log.some(([n]) => n === 'offline')")
    page.wait_for_function("() => window.fastws.state === 'disconnected'")
    assert log_of(page, "disconnect")[-1]["reason"] == "no pong"
    retry = log_of(page, "reconnecting")[-1]
    assert retry["offline"] is True and retry["delay"] >= 20_000, retry  # waits for online
    srv.publish("net:room", 2)  # missed while offline
    t0 = time.monotonic()
    page.context.set_offline(False)
    page.wait_for_function("() => window.__log.some(([n]) => n === 'online')")
    page.wait_for_function(
        "() => window.__log.filter(([n, a]) => n === 'subscribed').length >= 2")
    assert time.monotonic() - t0 < 5  # at once, not after the 20 s backoff
    wait_for(lambda: len(event_rows(page)) >= 2, what="the missed event")
    assert [d for _, d in event_rows(page)] == ["2", "1"]
    assert recovered_rows(page) == ["2"]
    notices = page.text_content("#notices")
    assert "browser offline" in notices and "browser online" in notices


def test_visible_page_reconnects_at_once(page, fastws_server):
    """A page coming back to the foreground tries at once instead of waiting out its
    backoff. Headless Chromium has no real tab switching: the visibility change is
    simulated (document.visibilityState overridden, `visibilitychange` dispatched)."""
    srv = fastws_server()
    open_live_page(page, srv)
    page.evaluate("""() => {
      Object.defineProperty(document, "visibilityState", { value: "hidden", configurable: true });
      document.dispatchEvent(new Event("visibilitychange"));
      const o = window.fastws.options;
      o.minDelay = 60000; o.maxDelay = 60000; o.random = () => 1;
      window.fastws._ws.close();
    }""")
    page.wait_for_function("() => window.fastws.state === 'disconnected'")
    assert log_of(page, "reconnecting")[-1]["delay"] >= 59_000
    assert not log_of(page, "visible")  # hidden: nothing happens
    t0 = time.monotonic()
    page.evaluate("""() => {
      Object.defineProperty(document, "visibilityState", { value: "visible", configurable: true });
      document.dispatchEvent(new Event("visibilitychange"));
    }""")
    page.wait_for_function("() => window.fastws.state === 'connected'")
    assert time.monotonic() - t0 < 5
    assert log_of(page, "visible") == [{"state": "disconnected"}]


def test_npm_package_is_the_served_module(server):
    """clients/js (npm `fastws-client`) publishes fastws/static's files, nothing else:
    package.json points at copies that sync.mjs makes at pack time from the one source."""
    pkg_dir = ROOT / "clients" / "js"
    pkg = json.loads((pkg_dir / "package.json").read_text())
    from fastws import __version__

    assert pkg["name"] == "fastws-client" and pkg["version"] == __version__
    assert pkg["type"] == "module" and pkg["sideEffects"] is False
    assert pkg["exports"]["."] == {"types": "./fastws.d.ts", "default": "./fastws.js"}
    assert (pkg["main"], pkg["types"]) == ("./fastws.js", "./fastws.d.ts")
    assert set(pkg["files"]) == {"fastws.js", "fastws.d.ts", "README.md"}
    assert "dependencies" not in pkg
    assert pkg["scripts"]["prepack"] == "node sync.mjs"
    sync = (pkg_dir / "sync.mjs").read_text()
    assert '"fastws", "static"' in sync and '["fastws.js", "fastws.d.ts"]' in sync
    ignored = (pkg_dir / ".gitignore").read_text().split()
    assert "/fastws.js" in ignored and "/fastws.d.ts" in ignored  # copies, never edited
    # What the server serves is the very file the package copies.
    status, _, body = http("GET", server.http_url + "/fastws.js")
    assert status == 200 and body == (ROOT / "fastws" / "static" / "fastws.js").read_bytes()


def test_docs_siwe_example_in_the_browser(page, fastws_server):
    """The browser Sign-In with Ethereum example of docs/clients.md, run as written, with
    a stand-in EIP-1193 wallet at window.ethereum whose personal_sign is eth-account's."""
    from eth_account import Account
    from eth_account.messages import encode_defunct

    srv = fastws_server("--jwt-secret", "test-secret-0123456789abcdef0123")
    acct = Account.create()
    signed: list[str] = []

    def personal_sign(hex_message: str) -> str:
        message = bytes.fromhex(hex_message.removeprefix("0x")).decode()
        signed.append(message)
        sig = acct.sign_message(encode_defunct(text=message)).signature.hex()
        return "0x" + sig.removeprefix("0x")

    text = (ROOT / "docs" / "clients.md").read_text()
    block = text.split("tests/test_browser.py runs this block", 1)[1]
    block = block.split("```html\n", 1)[1].split("\n```", 1)[0]
    script = block.removeprefix('<script type="module">\n').removesuffix("</script>")
    assert "import { FastWS }" in script and "<script" not in script

    logs: list[str] = []
    page.on("console", lambda m: logs.append(m.text))
    page.expose_function("pySign", personal_sign)
    page.goto(srv.http_url + "/")
    page.evaluate("""addr => {
      window.ethereum = { request: async ({ method, params }) => {
        if (method === "eth_requestAccounts") return [addr];  // wallets give lower case
        if (method === "eth_chainId") return "0x1";
        if (method === "personal_sign") return await window.pySign(params[0]);
        throw new Error("unsupported " + method);
      } };
    }""", acct.address.lower())
    page.add_script_tag(content=script, type="module")
    # The page's own client subscribes to nothing: one subscription is the example's.
    # (page.wait_for_timeout lets sync playwright serve the window.pySign calls.)
    wait_for(lambda: page.wait_for_timeout(20) or
             scrape(srv.http_url).get("fastws_subscriptions") == 1,
             what="the wallet subscription")
    srv.publish(f"wallet:{acct.address}", {"balance": 7})
    wait_for(lambda: page.wait_for_timeout(20) or any("my wallet:" in m for m in logs),
             what="the wallet event")
    assert 'my wallet: {"balance":7}' in logs, logs
    assert len(signed) == 1 and signed[0].startswith(f"127.0.0.1:{srv.port} wants you")
    assert not page.errors, page.errors


def _jwt(secret: str, sub: str, ttl: float, *, iat: bool = False) -> str:
    import jwt

    now = time.time()
    claims: dict = {"sub": sub, "exp": int(now + ttl)}
    if iat:
        claims["iat"] = int(now)
    return jwt.encode(claims, secret, algorithm="HS256")


JWT_SECRET = "test-secret-0123456789abcdef0123"


def _carol_tokens(page, fastws_server, ttl: Callable[[int], tuple[float, bool]]):
    """A server checking JWTs, its page open with ``window.pyToken()`` issuing carol's
    n-th token (from 0) for ``ttl(n)`` = (seconds, with iat); returns the server and the
    tokens issued so far."""
    srv = fastws_server("--jwt-secret", JWT_SECRET)
    issued: list[str] = []

    def new_token() -> str:
        seconds, iat = ttl(len(issued))
        issued.append(_jwt(JWT_SECRET, "carol", seconds, iat=iat))
        return issued[-1]

    page.expose_function("pyToken", new_token)
    page.goto(srv.http_url + "/")
    return srv, issued


def test_token_helpers_in_the_browser(page, server):
    """tokenClaims / tokenExpiresIn / refreshDelay, as the Python client's helpers."""
    page.goto(server.http_url + "/")
    out = page.evaluate("""async (signed) => {
      const { tokenClaims, tokenExpiresIn, refreshDelay } = await import("/fastws.js");
      const b64 = (o) => btoa(String.fromCharCode(...new TextEncoder().encode(JSON.stringify(o))))
        .replace(/\\+/g, "-").replace(/\\//g, "_").replace(/=+$/, "");
      const jwt = (claims) => b64({ alg: "HS256" }) + "." + b64(claims) + ".sig";
      const now = 1_000_000_000;
      return {
        claims: tokenClaims(jwt({ sub: "é?>", exp: 5 })),
        signed: tokenClaims(signed),
        bad: ["", "opaque", "a.b", "a.b.c.d", "x.!!!.y", jwt([1, 2]), "x.bm90IGpzb24.y"]
          .map(tokenClaims),
        left: tokenExpiresIn(jwt({ exp: now / 1000 + 30 }), now),
        none: [{ sub: "a" }, { exp: "soon" }, { exp: now / 1000 - 1 }]
          .map((c) => tokenExpiresIn(jwt(c), now)),
        behind: tokenExpiresIn(jwt({ iat: now / 1000 + 100, exp: now / 1000 + 160 }), now),
        ahead: tokenExpiresIn(jwt({ iat: now / 1000 - 100, exp: now / 1000 - 40 }), now),
        agree: tokenExpiresIn(jwt({ iat: now / 1000 - 50, exp: now / 1000 + 10 }), now),
        hour: [0, 1].map((r) => refreshDelay(3_600_000, { random: () => r })),
        short: [0, 1].map((r) => refreshDelay(3000, { random: () => r })),
        zero: refreshDelay(-5),
      };
    }""", _jwt("secret-0123456789abcdef0123456789", "bob", 60))
    assert out["claims"] == {"sub": "é?>", "exp": 5}
    assert out["signed"]["sub"] == "bob"
    assert out["bad"] == [None] * 7
    assert out["left"] == 30_000 and out["none"] == [None] * 3
    assert (out["behind"], out["ahead"], out["agree"]) == (60_000, 60_000, 10_000)
    assert out["hour"] == [3_590_000, 3_530_000]
    assert out["short"][0] == pytest.approx(2400) and out["short"][1] == pytest.approx(2100)
    assert out["zero"] == 0


def test_token_function_refreshes_the_live_connection(page, fastws_server):
    """A token function with short-lived JWTs (3 s) is called before each exp and its
    token sent in an `auth` request: the page keeps its connection through several
    refreshes (no reconnect, no 4501) and gets every event once, in order."""
    srv, issued = _carol_tokens(page, fastws_server, lambda n: (3, n % 2 == 1))
    page.evaluate("""async () => {
      const { FastWS } = await import("/fastws.js");
      window.__log = [];
      window.__events = [];
      const c = window.carol = new FastWS(`ws://${location.host}/ws`,
                                          { token: () => window.pyToken() });
      for (const n of ["state", "disconnect", "refresh", "closed", "error"])
        c.on(n, (a) => window.__log.push([n, a && a.error ? String(a.error) : a]));
      const onEvent = (e, m) => window.__events.push([e.channel, e.data, m.recovered]);
      await Promise.all([c.subscribe("user:carol", onEvent).ready,
                         c.subscribe("events:*", onEvent).ready]);
    }""")
    sent = 0
    deadline = time.monotonic() + 20
    while page.evaluate("window.carol.tokenRefreshes") < 3:  # three tokens in turn
        assert time.monotonic() < deadline, page.evaluate("window.__log")
        srv.publish("user:carol", sent)
        srv.publish("events:a" if sent % 2 else "events:b", sent)
        sent += 1
        page.wait_for_timeout(20)  # lets playwright answer window.pyToken calls
    page.wait_for_function("n => window.__events.length >= n", arg=2 * sent)
    events = page.evaluate("window.__events")
    assert [d for ch, d, _ in events if ch == "user:carol"] == list(range(sent))
    assert [d for ch, d, _ in events if ch != "user:carol"] == list(range(sent))
    assert not any(rec for _, _, rec in events)
    log = page.evaluate("window.__log")
    assert [a for n, a in log if n == "state"] == ["connecting", "connected"], log
    assert not [a for n, a in log if n in ("disconnect", "closed", "error")], log
    refreshes = [a for n, a in log if n == "refresh"]
    assert len(refreshes) >= 3 and all(r["ok"] and r["attempt"] == 1 for r in refreshes)
    assert all(1000 < r["expiresIn"] <= 3000 for r in refreshes), refreshes
    assert page.evaluate("window.carol.reconnects") == 0
    assert len(issued) == page.evaluate("window.carol.tokenRefreshes") + 1
    srv.publish("user:carol", "last")
    page.wait_for_function("() => window.__events.some(([, d]) => d === 'last')")
    assert page.evaluate("window.carol.state") == "connected"
    assert not page.errors, page.errors
    page.evaluate("window.carol.close()")


def test_failed_refresh_falls_back_to_reconnect(page, fastws_server):
    """While the token function fails, the live refresh is retried until exp; then the
    server closes 4501 "token expired" and the client reconnects with the function's next
    token, the private channel carrying on (a string token would stop for good)."""
    srv, issued = _carol_tokens(page, fastws_server,
                                lambda n: (2 if n == 0 else 3600, False))  # first: ~1-2 s
    page.evaluate("""async () => {
      const { FastWS } = await import("/fastws.js");
      window.__log = [];
      window.__events = [];
      const c = window.carol = new FastWS(`ws://${location.host}/ws`, {
        // the token service is down while connected: live refreshes fail
        token: () => c.state === "connected" ? Promise.reject(new Error("token service down"))
                                             : window.pyToken(),
        minDelay: 20, maxDelay: 100,
      });
      for (const n of ["state", "disconnect", "subscribed", "closed", "refresh"])
        c.on(n, (a) => window.__log.push([n, a && a.error ? { ...a, error: String(a.error) } : a]));
      const sub = c.subscribe("user:carol", (e, m) => window.__events.push([e.data, m.recovered]));
      await sub.ready;
    }""")
    srv.publish("user:carol", "before")
    page.wait_for_function("() => window.__events.length === 1")
    page.wait_for_function(
        "() => window.__log.some(([n, a]) => n === 'disconnect' && a.refresh === true)",
        timeout=10_000)
    page.wait_for_function(
        "() => window.__log.filter(([n]) => n === 'subscribed').length >= 2")
    srv.publish("user:carol", "after")
    page.wait_for_function("() => window.__events.length === 2")
    assert page.evaluate("window.__events") == [["before", False], ["after", False]]
    assert page.evaluate("window.carol.state") == "connected"
    assert page.evaluate("window.carol.reconnects") == 1
    log = page.evaluate("window.__log")
    assert not [a for n, a in log if n == "closed"]
    push = [a for n, a in log if n == "disconnect"][-1]
    assert (push["code"], push["reason"]) == (4501, "token expired"), push
    failed = [a for n, a in log if n == "refresh"]
    assert len(failed) >= 2 and not any(r["ok"] for r in failed), failed
    assert all(r["error"] == "Error: token service down" for r in failed)
    assert [r["attempt"] for r in failed] == list(range(1, len(failed) + 1))
    assert failed[-1]["retryIn"] is None  # gave up: the next try would come after exp
    assert page.evaluate("window.carol.tokenRefreshes") == 0
    assert len(issued) == 2
    page.evaluate("window.carol.close()")


def test_live_page_tags_the_demo_events_with_their_network(fastws_server, page) -> None:
    """`make serve`: two embedded chains (SPEC §14), and the live page shows which chain
    each event comes from."""
    srv = fastws_server("--demo")
    open_live_page(page, srv)
    subscribe_on_page(page, "events:*")
    page.wait_for_function("""() => {
        const nets = [...document.querySelectorAll('#events .tag.net')].map(e => e.textContent);
        return nets.includes('l1') && nets.includes('l2');
    }""", timeout=30_000)
    assert all('"network":' in text for _, text in event_rows(page))
    assert page.errors == []
