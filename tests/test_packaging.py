"""Packaging: the compiled core is required, the server runs without the ``chain`` extra,
and `serve --demo` streams events."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from conftest import ROOT, http, scrape, start_server
from wsclient import connect

# What `pip install fastws` (no extras) leaves out: the chain extra and what it brings.
CHAIN = ("web3", "eth_account", "eth_tester", "coincurve", "eth_abi", "eth_utils", "eth_keys",
         "eth_typing", "hexbytes", "websockets", "eth", "py_ecc")
# Prepended to `python -c`: those modules cannot be imported, as on a core install.
BLOCKER = (
    "import sys\n"
    f"BLOCKED = {CHAIN!r}\n"
    "class Block:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name.split('.')[0] in BLOCKED:\n"
    "            raise ImportError(f'No module named {name!r} (blocked: core install)')\n"
    "sys.meta_path.insert(0, Block())\n"
)
CLI = BLOCKER + "from fastws.cli import main\nsys.exit(main())\n"


def core_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``fastws ARGS`` as on a core install (the chain extra unimportable)."""
    return subprocess.run([sys.executable, "-c", CLI, *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_core_dependencies_leave_the_chain_out() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = " ".join(project["dependencies"]).lower()
    for name in ("web3", "eth-account", "eth-tester", "coincurve"):
        assert name not in core, name
    chain = " ".join(project["optional-dependencies"]["chain"]).lower()
    for name in ("web3[tester]", "eth-account", "coincurve"):
        assert name in chain, name
    assert "fastws[chain]" in project["optional-dependencies"]["test"]
    makefile = (ROOT / "Makefile").read_text()
    assert '-e ".[chain,test]"' in makefile      # make serve (--demo) and make test need it


def test_server_imports_without_the_chain_extra() -> None:
    code = BLOCKER + (
        "import fastws, fastws.server, fastws.cli, fastws.node, fastws.client, fastws.auth\n"
        "import fastws.indexer, fastws.demo\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED)\n"
        "assert not loaded, loaded\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


async def test_serve_runs_without_the_chain_extra() -> None:
    help_ = core_cli("serve", "--help")
    assert help_.returncode == 0 and "--broker" in help_.stdout, help_.stderr
    srv = start_server("--jwt-secret", "s" * 32, launch=("-c", CLI))
    try:
        assert http("GET", srv.http_url + "/healthz")[0] == 200
        c = await connect(srv.ws_url)
        reply = await c.request({"id": 1, "type": "subscribe", "channel": "events:*"})
        assert reply["type"] == "subscribed"
        srv.publish("events:x", {"a": 1})
        ev = await c.recv()
        assert ev["channel"] == "events:x" and ev["data"] == {"a": 1}
        assert scrape(srv.http_url)["fastws_deliveries_total"] == 1
        assert http("GET", srv.http_url + "/auth/nonce")[0] == 200
        status, _, body = http("POST", srv.http_url + "/auth/siwe",
                               {"message": "m", "signature": "0x00"})
        assert status == 501 and b"pip install 'fastws[chain]'" in body, body
    finally:
        assert srv.stop() == 0, srv.output()
    assert "Traceback" not in srv.output()


def test_chain_features_name_the_extra() -> None:
    runs = {
        "serve --demo": core_cli("serve", "--port", "1", "--demo"),
        "siwe_rpc_url": core_cli("serve", "--port", "1", "--jwt-secret", "s" * 32,
                                 "--siwe-rpc-url", "http://127.0.0.1:1"),
        "fastws index": core_cli("index", "--rpc", "http://127.0.0.1:1", "--contract",
                                 "0x" + "11" * 20),
    }
    runs["python -m fastws.indexer.demo_chain"] = subprocess.run(
        [sys.executable, "-c", BLOCKER + "from fastws.indexer.demo_chain import main\n"
         "sys.exit(main(['--port', '0']))\n"], capture_output=True, text=True, cwd=ROOT,
        timeout=60)
    for feature, proc in runs.items():
        assert proc.returncode == 2, (feature, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, (feature, proc.stderr)
        assert feature in lines[0] and "pip install 'fastws[chain]'" in lines[0], lines
    index_help = core_cli("index", "--help")
    assert index_help.returncode == 0 and "fastws[chain]" in index_help.stdout


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
    # two embedded chains (SPEC §14): every event says which
    from fastws.demo import NETWORKS
    from fastws.indexer.demo_chain import TESTER_CHAIN_ID

    ids = {name: chain_id or TESTER_CHAIN_ID for name, chain_id, _ in NETWORKS}
    assert len(ids) == 2 and ids[data["network"]] == data["chainId"]
    seen = {data["network"]}
    while len(seen) < 2:          # both chains feed it
        ev = await c.recv(timeout=15)
        if ev.get("type") == "event":
            assert ids[ev["data"]["network"]] == ev["data"]["chainId"]
            seen.add(ev["data"]["network"])


def test_demo_chain_addresses_are_fixed() -> None:
    """`make serve` always deploys the documented addresses (docs/indexer.md, clients.md):
    a fresh chain, a deployer at nonce 0, the factory's markets in order."""
    from fastws.indexer.demo_chain import (
        FACTORY_ADDRESS,
        MARKET_ADDRESSES,
        MAX_CONTRACTS,
        DemoChain,
    )

    assert len(MARKET_ADDRESSES) == MAX_CONTRACTS
    for _ in range(2):                      # the demo starts a fresh chain after MAX_BLOCKS
        chain = DemoChain(2)
        assert chain.factory_address == FACTORY_ADDRESS
        assert chain.addresses == list(MARKET_ADDRESSES[:2])
    while len(chain.contracts) < MAX_CONTRACTS:
        chain.deploy()
    assert chain.addresses == list(MARKET_ADDRESSES)
    for address in (FACTORY_ADDRESS, *MARKET_ADDRESSES):
        assert address in (ROOT / "docs" / "indexer.md").read_text(), address
    assert f"market:{MARKET_ADDRESSES[0]}" in (ROOT / "docs" / "clients.md").read_text()
