"""Several chains in one ``fastws index`` (SPEC §14): ``--config chains.toml``, channel
templates, ``network``/``chainId``, per-chain checkpoints and metrics, outages.

Two eth-tester chains of their own (two chain ids, two deployers), each served over
HTTP JSON-RPC on its own port, and a real fastws server taking the publications.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import free_port, http, scrape
from test_indexer import events, start_indexer, stop, subscribe, until
from wsclient import connect

from fastws.indexer import UsageError, main, parse_args
from fastws.indexer.demo_chain import DemoChain, RpcServer
from fastws.indexer.templates import Channels, ChannelTemplate, TemplateError

WEI = 10**18
ADDR = "0x" + "ab" * 20


# --------------------------------------------------------------------------- templates


def test_templates_render_every_field_and_skip_a_missing_argument() -> None:
    ch = Channels(["events:{event}", "market:{address}", "wallet:{args.bettor}",
                   "{network}:{chain_id}:{Event}", "big:{args.amount}", "yes:{args.outcome}",
                   "q:{args.question}", "events:{event}"])
    data = {"eventType": "BetPlaced", "marketAddress": "0xAbC0", "args": {
        "bettor": "0xDEF1", "amount": str(2**70), "outcome": True, "question": "a b"}}
    assert ch.render(data, "bet_placed", "base", 8453) == [
        "events:bet_placed", "market:0xabc0", "wallet:0xdef1", "base:8453:BetPlaced",
        f"big:{2**70}", "yes:true"]                # a string with a space names no channel
    created = {"eventType": "MarketCreated", "marketAddress": "0x01", "args": {"marketId": 7}}
    assert ch.render(created, "market_created", "base", 1) == [
        "events:market_created", "market:0x01", "base:1:MarketCreated"]   # no bettor: skipped


@pytest.mark.parametrize(("text", "why"), [
    ("events:{evnt}", "unknown field {evnt}"),
    ("wallet:{args.}", "does not name an argument"),
    ("wallet:{args.a-b}", "does not name an argument"),
    ("events:{event", "unbalanced"),
    ("events:}{event}", "unbalanced"),
    ("my events:{event}", "channel name"),
    ("events:*{event}", "pattern"),
    ("", "non-empty"),
])
def test_malformed_templates_are_refused(text: str, why: str) -> None:
    with pytest.raises(TemplateError, match=why):
        ChannelTemplate.parse(text)


# --------------------------------------------------------------------------- chains.toml


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "chains.toml"
    path.write_text(text)
    return str(path)


def test_chains_toml_is_read_with_defaults_and_relative_paths(tmp_path: Path) -> None:
    abi = json.loads((Path(__file__).parent.parent / "fastws" / "indexer" /
                      "PredictionMarket.json").read_text())["abi"]
    (tmp_path / "abis").mkdir()
    (tmp_path / "abis" / "market.json").write_text(json.dumps(abi))
    path = write(tmp_path, f"""
[store]
url = "postgresql://postgres@127.0.0.1:5432/app"

[chains.bsc]
rpc = "wss://bsc.example/ws"
contracts = ["{ADDR.upper().replace("0X", "0x")}"]
abi = "abis/market.json"
chain_id = 56
from_block = 100
confirmations = 3
channels = ["network:{{network}}", "token:{{address}}", "wallet:{{args.bettor}}"]

[chains.base-sepolia]
rpc = "https://sepolia.base.example"
contracts = ["{ADDR}"]
poll_interval = 0.5
max_range = 50
checkpoint = "base.json"
""")
    a = parse_args(["--config", path, "--broker", "redis://127.0.0.1:6379/0"])
    bsc, base = a.chains
    assert a.store == "postgresql://postgres@127.0.0.1:5432/app"
    assert (bsc.network, bsc.rpc, bsc.contracts, bsc.chain_id, bsc.from_block,
            bsc.confirmations) == ("bsc", "wss://bsc.example/ws", (ADDR,), 56, 100, 3)
    assert bsc.abi == abi and bsc.channels.texts[2] == "wallet:{args.bettor}"
    assert (base.chain_id, base.confirmations, base.poll_interval, base.max_range) == (
        None, 2, 0.5, 50)
    assert base.channels.texts == ["events:{event}", "market:{address}"]
    assert bsc.digest != base.digest or bsc.network != base.network
    assert parse_args(["--config", path, "--store", "postgres://h/other"]).store \
        == "postgres://h/other"                                  # the flag wins


GOOD = f'rpc = "http://127.0.0.1:8545"\ncontracts = ["{ADDR}"]\n'


@pytest.mark.parametrize(("table", "label"), [
    (f'contracts = ["{ADDR}"]\n', "chains.eth.rpc"),
    ('rpc = "ftp://x"\n', "chains.eth.rpc"),
    ('rpc = "http://x"\ncontracts = ["0x12"]\n', "chains.eth.contracts"),
    ('rpc = "http://x"\n', "chains.eth.contracts"),
    (GOOD + "colour = 1\n", "chains.eth.colour"),
    (GOOD + 'channels = ["events:{evnt}"]\n', "chains.eth.channels"),
    (GOOD + 'channels = "events:{event}"\n', "chains.eth.channels"),
    (GOOD + "chain_id = \"one\"\n", "chains.eth.chain_id"),
    (GOOD + "confirmations = 0\n", "chains.eth.confirmations"),
    (GOOD + "from_block = -1\n", "chains.eth.from_block"),
    (GOOD + "poll_interval = 0\n", "chains.eth.poll_interval"),
    (GOOD + 'follow = "Nope.market"\n', "chains.eth.follow"),
    (GOOD + 'abi = "missing.json"\n', "chains.eth.abi"),
])
def test_a_bad_chain_table_exits_2_naming_the_key(table: str, label: str, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[chains.eth]\n" + table)
    with pytest.raises(UsageError, match=label.replace(".", r"\.")):
        parse_args(["--config", path])
    assert main(["--config", path]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fastws index: {label}")


def test_other_bad_input_names_the_culprit(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("[{not json")
    path = write(tmp_path, f'[chains.eth]\n{GOOD}abi = "broken.json"\n')
    with pytest.raises(UsageError, match=r"chains\.eth\.abi: .*broken\.json is not JSON"):
        parse_args(["--config", path])
    for text, label in [('[chains."a b"]\n' + GOOD, 'chains.a b'),
                        ("[chains]\n", "chains:"),
                        ('[store]\nurl = "mysql://h/db"\n[chains.eth]\n' + GOOD, "store.url"),
                        ('[store]\nuri = "x"\n[chains.eth]\n' + GOOD, "store.uri"),
                        ("[chains.eth\n", "--config"),
                        ("[chains.a]\n" + GOOD + 'checkpoint = "x"\n[chains.b]\n' + GOOD
                         + 'checkpoint = "x"\n', "chains.b.checkpoint: 'x' is chains.a's")]:
        with pytest.raises(UsageError, match=label):
            parse_args(["--config", write(tmp_path, text)])
    good = write(tmp_path, "[chains.eth]\n" + GOOD)
    with pytest.raises(UsageError, match="--rpc: not with"):
        parse_args(["--config", good, "--rpc", "http://x"])
    with pytest.raises(UsageError, match="--store"):
        parse_args(["--config", good, "--store", "redis://x"])
    with pytest.raises(UsageError, match="--channels"):
        parse_args(["--rpc", "http://x", "--contract", ADDR, "--channels", "a:{nope}"])
    with pytest.raises(UsageError, match="--network"):
        parse_args(["--rpc", "http://x", "--contract", ADDR, "--network", "a b"])
    a = parse_args(["--rpc", "http://x", "--contract", ADDR, "--network", "base",
                    "--chain-id", "8453", "--channels", "token:{address},n:{network}",
                    "--store", "postgresql://h/db"])
    assert (a.network, a.chain_id, a.channels.texts, a.checkpoint) == (
        "base", 8453, ["token:{address}", "n:{network}"], a.checkpoint)
    assert a.checkpoint.startswith("base:")            # kept in the store


def test_the_servers_config_reads_past_the_indexers_tables(tmp_path: Path) -> None:
    from fastws.config import load_config

    path = write(tmp_path, "[namespaces.events]\nhistory_size = 7\n[store]\n"
                           'url = "postgresql://h/db"\n[chains.eth]\n' + GOOD)
    assert load_config({"config": path}).for_channel("events:x").history_size == 7


# --------------------------------------------------------------------------- two chains


@pytest.fixture(scope="module")
def two_chains() -> Iterator[tuple[DemoChain, DemoChain]]:
    """Two chains: eth-tester's chain id and account 0, then chain id 31337 and
    account 1, each served over HTTP JSON-RPC as ``chain.rpc``."""
    a = DemoChain(contracts=0)
    b = DemoChain(contracts=0, chain_id=31337, owner=1)
    for c in (a, b):
        c.rpc = RpcServer(c).start()   # type: ignore[attr-defined]
    yield a, b
    for c in (a, b):
        c.rpc.stop()                   # type: ignore[attr-defined]


def value(port: int, name: str, **labels: str) -> float:
    """One sample of the indexer's /metrics (-1 while it does not answer)."""
    key = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    try:
        return scrape(f"http://127.0.0.1:{port}").get(key, -1)
    except OSError:
        return -1


async def test_two_chains_publish_concurrently_and_one_outage_holds_back_nothing(
        two_chains, fastws_server, tmp_path: Path) -> None:
    a, b = two_chains
    srv = fastws_server()
    addr_a, addr_b = a.deploy(), b.deploy()
    docs = (Path(__file__).parent.parent / "docs" / "indexer.md").read_text()
    assert addr_b in docs          # the demo's l2 (chain id 31337, account 1): documented
    bettor = a.accounts[2].lower()
    b_port = b.rpc.port
    b.rpc.stop()                                        # beta's node is down at start
    path = write(tmp_path, f"""
[chains.alpha]
rpc = "{a.rpc.url}"
contracts = ["{addr_a}"]
from_block = {a.head() + 1}
confirmations = 1
chain_id = {a.chain_id}
channels = ["net:{{network}}", "bettor:{{args.bettor}}", "c{{chain_id}}:{{event}}"]
poll_interval = 0.05
checkpoint = "{tmp_path / 'alpha.json'}"

[chains.beta]
rpc = "http://127.0.0.1:{b_port}"
contracts = ["{addr_b}"]
from_block = {b.head() + 1}
confirmations = 1
poll_interval = 0.05
checkpoint = "{tmp_path / 'beta.json'}"
""")
    c = await connect(srv.ws_url)
    await subscribe(c, "net:alpha", 1)
    await subscribe(c, f"bettor:{bettor}", 2)
    await subscribe(c, f"market:{addr_b}", 3)
    mport = free_port()
    proc = start_indexer("--config", path, "--url", srv.http_url, "--api-key", srv.api_key,
                         "--metrics-port", str(mport), log=tmp_path / "indexer.log")
    try:
        mid = a.create_market(addr_a, "Will ETH close above 5k this week?")
        (created,) = await events(c, 1)                # alpha goes on without beta
        assert created["channel"] == "net:alpha"
        assert (created["data"]["network"], created["data"]["chainId"]) == ("alpha",
                                                                            a.chain_id)
        await until(lambda: value(mport, "fastws_indexer_rpc_faults_total",
                                  network="beta", kind="transient") >= 1, what="beta's faults")
        assert value(mport, "fastws_indexer_rpc_faults_total", network="alpha",
                     kind="transient") == 0
        assert http("GET", f"http://127.0.0.1:{mport}/readyz")[0] == 503  # beta not started

        b.rpc = RpcServer(b, b_port).start()           # beta's node comes up
        bmid = b.create_market(addr_b, "Will it rain in Paris tomorrow?")
        (b_created,) = await events(c, 1)
        assert b_created["channel"] == f"market:{addr_b}"
        assert (b_created["data"]["network"], b_created["data"]["chainId"]) == ("beta", 31337)

        b.rpc.fault = lambda method, params: (503, {}, b"down")   # beta fails while running
        faults = value(mport, "fastws_indexer_rpc_faults_total", network="beta",
                       kind="transient")
        await until(lambda: value(mport, "fastws_indexer_rpc_faults_total", network="beta",
                                  kind="transient") > faults, what="beta failing")
        b.place_bet(addr_b, bmid, True, WEI, bettor=3)
        a.place_bet(addr_a, mid, True, 2 * WEI, bettor=2)
        got = await events(c, 2)                       # alpha's bet, on both its channels
        assert {e["channel"] for e in got} == {"net:alpha", f"bettor:{bettor}"}
        assert all(e["data"]["eventType"] == "BetPlaced" for e in got)
        b.rpc.fault = None
        (b_bet,) = await events(c, 1)                  # beta catches up
        assert b_bet["channel"] == f"market:{addr_b}"
        assert b_bet["data"]["eventType"] == "BetPlaced"

        def caught_up() -> bool:
            return (value(mport, "fastws_indexer_checkpoint_block", network="alpha") == a.head()
                    and value(mport, "fastws_indexer_checkpoint_block", network="beta")
                    == b.head())
        await until(caught_up, what="both chains caught up")
        for net, chain in (("alpha", a), ("beta", b)):
            assert value(mport, "fastws_indexer_head_block", network=net) == chain.head()
            assert value(mport, "fastws_indexer_lag_blocks", network=net) == 0
            assert 0 <= value(mport, "fastws_indexer_lag_seconds", network=net) < 120
            assert value(mport, "fastws_indexer_events_total", network=net) == 2
    finally:
        assert stop(proc) == 0
    for name, chain in (("alpha", a), ("beta", b)):
        cp = json.loads((tmp_path / f"{name}.json").read_text())
        assert cp["chainId"] == chain.chain_id and cp["block"] == chain.head()


async def test_a_wrong_chain_id_stops_the_start_naming_both(two_chains, fastws_server,
                                                            tmp_path: Path) -> None:
    a, b = two_chains
    srv = fastws_server()
    path = write(tmp_path, f"""
[chains.alpha]
rpc = "{a.rpc.url}"
contracts = ["{ADDR}"]
chain_id = {a.chain_id}
checkpoint = "{tmp_path / 'alpha.json'}"

[chains.beta]
rpc = "{b.rpc.url}"
contracts = ["{ADDR}"]
chain_id = 56
checkpoint = "{tmp_path / 'beta.json'}"
""")
    common = ["--url", srv.http_url, "--api-key", srv.api_key]
    proc = start_indexer("--config", path, *common, log=tmp_path / "multi.log")
    assert proc.wait(30) == 2
    lines = [ln for ln in (tmp_path / "multi.log").read_text().splitlines()
             if ln.startswith("fastws index: ")]
    assert lines == ["fastws index: chains.beta.chain_id: chain id 56 is configured for beta, "
                     "but its node answers chain id 31337"]
    proc = start_indexer("--rpc", a.rpc.url, "--contract", ADDR, "--chain-id", "1",
                         "--checkpoint", str(tmp_path / "single.json"), *common,
                         log=tmp_path / "single.log")
    assert proc.wait(30) == 2
    assert (f"fastws index: --chain-id: chain id 1 is configured for default, but its node "
            f"answers chain id {a.chain_id}") in (tmp_path / "single.log").read_text()


async def test_two_chain_latency_tool_smoke() -> None:
    """``python -m loadtest.indexer_latency --chains`` (docs/benchmarks.md) runs: both
    networks, one time per block."""
    from loadtest.indexer_latency import measure_chains

    results = await measure_chains(blocks=2, rpc="ws", poll=0.2)
    assert list(results) == ["alpha", "beta"]
    assert all(len(xs) == 2 and all(0 < x < 30 for x in xs) for xs in results.values())


async def test_two_chains_into_a_redis_broker_with_a_checkpoint_key_each(
        two_chains, redis_server, fastws_server, tmp_path: Path) -> None:
    import redis

    a, b = two_chains
    srv = fastws_server("--broker", redis_server.url)
    addr_a, addr_b = a.deploy(), b.deploy()
    path = write(tmp_path, "".join(f"""
[chains.{name}]
rpc = "{chain.rpc.url}"
contracts = ["{addr}"]
from_block = {chain.head() + 1}
confirmations = 1
poll_interval = 0.05
channels = ["net:{{network}}"]
""" for name, chain, addr in (("alpha", a, addr_a), ("beta", b, addr_b))))
    c = await connect(srv.ws_url)
    await subscribe(c, "net:*", 1)
    a.create_market(addr_a, "Will BTC dominance exceed 60% by Friday?")
    b.create_market(addr_b, "Will the launch happen on time?")
    proc = start_indexer("--config", path, "--broker", redis_server.url,
                         log=tmp_path / "indexer.log")
    try:
        got = await events(c, 2)
    finally:
        assert stop(proc) == 0, (tmp_path / "indexer.log").read_text()
    assert sorted((e["channel"], e["data"]["network"], e["data"]["chainId"]) for e in got) \
        == [("net:alpha", "alpha", a.chain_id), ("net:beta", "beta", 31337)]
    keys = sorted(k.decode() for k in redis.Redis.from_url(redis_server.url)
                  .scan_iter("fastws:indexer:*"))
    assert [k.split(":")[2] for k in keys] == ["alpha", "beta"]    # one checkpoint each
