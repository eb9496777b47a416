"""Packaging: the compiled core is required, and `serve --demo` streams events."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT
from wsclient import connect


def test_import_fails_loudly_without_the_extension() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'fastws._match':\n"
        "            raise ImportError('simulated: extension not built')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import fastws\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode != 0
    assert "compiled extension fastws._match is missing" in proc.stderr
    assert "make build" in proc.stderr


def test_compiled_modules_are_extensions() -> None:
    from fastws import _fanout, _frames, _match

    for mod in (_match, _fanout, _frames):
        assert mod.__file__.endswith((".so", ".pyd")), mod.__file__


async def test_demo_server_streams_seed_style_events(fastws_server) -> None:
    srv = fastws_server("--demo")
    c = await connect(srv.ws_url)
    reply = await c.request({"id": 1, "type": "subscribe", "channel": "events:*"})
    assert reply["type"] == "subscribed"
    ev = await c.recv(timeout=15)
    assert ev["type"] == "event" and ev["channel"].startswith("events:")
    data = ev["data"]
    assert data["eventType"] in ("MarketCreated", "BetPlaced", "MarketResolved")
    assert data["marketAddress"].startswith("0x") and isinstance(data["timestamp"], int)
    assert ev["offset"] >= 1 and ev["epoch"]
