"""The browser client's offline outbox (SPEC §13) in a real headless Chromium: kept in
IndexedDB across a page reload and sent once after reconnecting; bounded; a page without
IndexedDB falls back to memory with a console warning and no page error.

Same set-up as tests/test_browser.py (Debian's chromium driven by playwright).
"""

from __future__ import annotations

import json
import signal

import pytest
from conftest import http
from test_browser import browser, page

__all__ = ["browser", "page"]   # fixtures, imported for pytest

pytestmark = pytest.mark.timeout(120)

CONFIG = "[namespaces.chat]\npublish = \"anyone\"\nhistory_size = 100\n"
FAST = "{minDelay: 50, maxDelay: 300}"


def open_blank(page, srv) -> None:
    """A page of the server's origin without the live page's own client."""
    page.goto(srv.http_url + "/fastws.js")
    page.evaluate("async () => { window.M = await import('/fastws.js'); }")


def make_client(page, srv, opts: str) -> None:
    page.evaluate(f"""() => {{
      window.c = new window.M.FastWS({srv.ws_url!r}, {{...{FAST}, ...{opts}}});
      window.results = [];
    }}""")
    page.wait_for_function("() => window.c.state === 'connected'")


def page_errors(page) -> list[str]:
    """Uncaught errors of the page (console messages such as a refused connection or the
    favicon's 404 are not the client's)."""
    return [e for e in page.errors if e.startswith("pageerror")]


def stored(page) -> int:
    """Entries in the IndexedDB outbox store now."""
    return page.evaluate("""() => new Promise((resolve) => {
      const r = indexedDB.open("fastws-outbox", 1);
      r.onsuccess = () => {
        const q = r.result.transaction("queue").objectStore("queue").count();
        q.onsuccess = () => { resolve(q.result); r.result.close(); };
      };
    })""")


def channel_history(srv, ch: str) -> list:
    """The channel's kept publications (a history request over POST /call)."""
    status, _, body = http("POST", srv.http_url + "/call",
                           {"id": 1, "type": "history", "channel": ch, "limit": 100})
    assert status == 200, body
    return [p["data"] for p in json.loads(body)["publications"]]


def test_indexeddb_outbox_survives_a_reload(page, fastws_server):
    """Offline publications stored in IndexedDB are sent, once each and in order, by the
    next page's FastWS of the same url after a reload; the store is emptied."""
    srv = fastws_server(config=CONFIG)
    open_blank(page, srv)
    # this page must not reconnect before the reload: its retries wait 30 s
    make_client(page, srv, '{outbox: "indexeddb", minDelay: 30000, maxDelay: 60000, '
                           'random: () => 1}')
    page.evaluate("() => window.c.publish('chat:r', 'online')")
    srv.stop(signal.SIGKILL)
    page.wait_for_function("() => window.c.state !== 'connected'")
    page.evaluate("""() => { for (const t of ['one', 'two'])
      window.c.publish('chat:r', t).then(r => window.results.push(r.offset)); }""")
    page.wait_for_function("() => window.c.outboxSize === 2")
    page.wait_for_function("""() => new Promise((resolve) => {
      const r = indexedDB.open("fastws-outbox", 1);
      r.onsuccess = () => { const q = r.result.transaction("queue").objectStore("queue")
        .count(); q.onsuccess = () => { resolve(q.result === 2); r.result.close(); }; };
    })""")
    srv2 = fastws_server(port=srv.port, config=CONFIG)
    page.reload()  # the promises are gone with the page; the queue is not
    page.evaluate("async () => { window.M = await import('/fastws.js'); }")
    page.evaluate(f"""() => {{ window.published = [];
      window.c = new window.M.FastWS({srv2.ws_url!r}, {{...{FAST}, outbox: "indexeddb"}});
      window.c.on("published", (p) => window.published.push(p.reply.offset)); }}""")
    page.wait_for_function("() => window.published.length === 2")
    assert page.evaluate("window.published") == [1, 2]  # a restarted memory broker
    assert channel_history(srv2, "chat:r") == ["one", "two"]
    page.wait_for_function("() => window.c.outboxSize === 0")
    assert stored(page) == 0
    assert page_errors(page) == []


def test_memory_outbox_in_order_and_bounded(page, fastws_server):
    """The default (memory) outbox: queued while the server is gone, rejected beyond the
    limit with a message naming it, the rest published in order after reconnecting,
    each promise resolving with its offset."""
    srv = fastws_server(config=CONFIG)
    open_blank(page, srv)
    make_client(page, srv, "{outboxLimit: 3}")
    srv.stop(signal.SIGKILL)
    page.wait_for_function("() => window.c.state !== 'connected'")
    err = page.evaluate("""async () => {
      for (const t of ['a', 'b', 'c'])
        window.c.publish('chat:m', t).then(r => window.results.push([t, r.offset]));
      try { await window.c.publish('chat:m', 'd'); return null; }
      catch (e) { return [e.kind, e.message]; }
    }""")
    assert err[0] == "outbox" and "limit is 3" in err[1], err
    srv2 = fastws_server(port=srv.port, config=CONFIG)
    page.wait_for_function("() => window.results.length === 3")
    assert page.evaluate("window.results") == [["a", 1], ["b", 2], ["c", 3]]
    assert channel_history(srv2, "chat:m") == ["a", "b", "c"]


def test_no_indexeddb_falls_back_to_memory(page, fastws_server):
    """IndexedDB unavailable (private mode): a console warning, the memory outbox, no
    page error; publishing works."""
    srv = fastws_server(config=CONFIG)
    warnings: list[str] = []
    page.on("console", lambda m: m.type == "warning" and warnings.append(m.text))
    page.add_init_script("""Object.defineProperty(window, "indexedDB", {get() {
      return { open() { throw new DOMException("private mode", "InvalidStateError"); } };
    }});""")
    open_blank(page, srv)
    make_client(page, srv, '{outbox: "indexeddb"}')
    offset = page.evaluate("async () => (await window.c.publish('chat:p', 'x')).offset")
    assert offset == 1
    assert any("IndexedDB is not available" in w for w in warnings), warnings
    assert page_errors(page) == []
