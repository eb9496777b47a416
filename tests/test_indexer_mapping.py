"""Indexer parts without a chain: ABI decoding, flags, checkpoints, adaptive ranges."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from decimal import Decimal
from typing import Any

import pytest
from conftest import ROOT
from eth_abi import encode
from eth_utils import keccak

from fastws.indexer import UsageError, main, parse_args
from fastws.indexer.checkpoint import (
    Checkpoint,
    CheckpointMismatch,
    FileCheckpoint,
    Followed,
    PublishedEvent,
)
from fastws.indexer.mapping import (
    MAX_SAFE_INTEGER,
    EventCodec,
    Follow,
    event_data,
    json_safe,
    normalize_log,
    snake_case,
)
from fastws.indexer.source import Backoff, LogSource, RpcError, RpcTransient

ADDR = "0x" + "ab" * 20
OTHER = "0x" + "Cd" * 20


def test_snake_case() -> None:
    assert snake_case("MarketCreated") == "market_created"
    assert snake_case("BetPlaced") == "bet_placed"
    assert snake_case("NFTMinted") == "nft_minted"
    assert snake_case("ERC20Transfer") == "erc20_transfer"
    assert snake_case("Transfer") == "transfer"
    assert snake_case("already_snake") == "already_snake"


def test_json_safe_numbers_bytes_addresses_structs() -> None:
    uint = {"type": "uint256"}
    assert json_safe(MAX_SAFE_INTEGER, uint) == MAX_SAFE_INTEGER
    assert json_safe(MAX_SAFE_INTEGER + 1, uint) == str(MAX_SAFE_INTEGER + 1)
    assert json_safe(-(2**60), {"type": "int256"}) == str(-(2**60))
    assert json_safe(b"\x01\xff", {"type": "bytes"}) == "0x01ff"
    assert json_safe(True, {"type": "bool"}) is True
    assert json_safe("0xAbCdEf0000000000000000000000000000000001", {"type": "address"}) \
        == "0xabcdef0000000000000000000000000000000001"
    # a string that looks like an address stays as written
    assert json_safe("0xAbCdEf0000000000000000000000000000000001", {"type": "string"}) \
        == "0xAbCdEf0000000000000000000000000000000001"
    assert json_safe(Decimal("1.5"), {"type": "fixed128x18"}) == "1.5"
    assert json_safe([[1, 2**64], [3]], {"type": "uint256[][]"}) == [[1, str(2**64)], [3]]
    struct = {"type": "tuple[]", "components": [{"name": "who", "type": "address"},
                                                {"name": "amount", "type": "uint256"}]}
    assert json_safe([("0x" + "AA" * 20, 2**70)], struct) == [
        {"who": "0x" + "aa" * 20, "amount": str(2**70)}]
    unnamed = {"type": "tuple", "components": [{"type": "uint8"}, {"type": "bytes32"}]}
    assert json_safe((7, b"\x00" * 32), unnamed) == [7, "0x" + "00" * 32]


ABI: list[dict[str, Any]] = [
    {"type": "event", "name": "BetPlaced", "anonymous": False, "inputs": [
        {"name": "marketId", "type": "uint256", "indexed": True},
        {"name": "bettor", "type": "address", "indexed": True},
        {"name": "outcome", "type": "bool", "indexed": False},
        {"name": "amount", "type": "uint256", "indexed": False},
    ]},
    {"type": "event", "name": "Tagged", "anonymous": False, "inputs": [
        {"name": "tag", "type": "string", "indexed": True},
        {"name": "", "type": "bytes32", "indexed": False},
        {"name": "pos", "type": "tuple", "indexed": False, "components": [
            {"name": "x", "type": "int64"}, {"name": "y", "type": "int64"}]},
    ]},
    {"type": "event", "name": "Anon", "anonymous": True, "inputs": []},
    {"type": "function", "name": "placeBet", "inputs": [], "outputs": []},
]


def _log(topics: list[bytes], data: bytes, **kw: Any) -> dict[str, Any]:
    return {"address": kw.get("address", OTHER), "blockNumber": kw.get("block", "0x10"),
            "blockHash": "0x" + "11" * 32, "transactionHash": "0x" + "22" * 32,
            "logIndex": kw.get("log_index", 3), "topics": ["0x" + t.hex() for t in topics],
            "data": "0x" + data.hex()}


def test_event_codec_decodes_indexed_and_plain_args() -> None:
    codec = EventCodec(ABI)
    assert len(codec) == 2     # the anonymous event cannot be identified by topic
    topic0 = keccak(text="BetPlaced(uint256,address,bool,uint256)")
    bettor = "0x" + "9f" * 20
    raw = _log([topic0, encode(["uint256"], [7]), encode(["address"], [bettor])],
               encode(["bool", "uint256"], [True, 5 * 10**18]))
    lg = normalize_log(raw)
    spec = codec.spec_for(lg)
    assert spec is not None and spec.channel_name == "bet_placed"
    data = event_data(spec, lg, 1_700_000_000)
    assert data == {
        "eventType": "BetPlaced", "marketAddress": OTHER.lower(), "blockNumber": 16,
        "blockHash": "0x" + "11" * 32, "txHash": "0x" + "22" * 32, "logIndex": 3,
        "timestamp": 1_700_000_000,
        "args": {"marketId": 7, "bettor": bettor, "outcome": True, "amount": "5000000000000000000"},
    }
    assert list(data) == ["eventType", "marketAddress", "blockNumber", "blockHash", "txHash",
                          "logIndex", "timestamp", "args"]


def test_indexed_dynamic_value_is_its_hash_and_unnamed_args_get_positions() -> None:
    codec = EventCodec(ABI)
    topic0 = keccak(text="Tagged(string,bytes32,(int64,int64))")
    tag_hash = keccak(text="hello")
    raw = _log([topic0, tag_hash], encode(["bytes32", "(int64,int64)"], [b"\x01" * 32, (-1, 2)]))
    lg = normalize_log(raw)
    data = event_data(codec.spec_for(lg), lg, 1)
    assert data["args"] == {"tag": "0x" + tag_hash.hex(), "arg1": "0x" + "01" * 32,
                            "pos": {"x": -1, "y": 2}}


def test_normalize_log_accepts_provider_flavours() -> None:
    a = normalize_log({"address": ADDR.upper().replace("0X", "0x"), "blockNumber": 16,
                       "blockHash": bytes.fromhex("11" * 32), "transactionHash": "0x" + "22" * 32,
                       "logIndex": "0x3", "topics": [b"\x01" * 32], "data": b""})
    assert a.address == ADDR and a.block_number == 16 and a.log_index == 3
    assert a.block_hash == "0x" + "11" * 32 and a.topics == ("0x" + "01" * 32,)
    assert a.data == "0x" and a.uid == "0x" + "22" * 32 + ":3"


@pytest.mark.parametrize(("name", "events"), [
    ("PredictionMarket", {"MarketCreated", "BetPlaced", "MarketResolved"}),
    ("MarketFactory", {"MarketDeployed"}),
])
def test_committed_artifact_matches_the_contract_source(name: str, events: set[str]) -> None:
    artifact = json.loads((ROOT / "fastws" / "indexer" / f"{name}.json").read_text())
    source = (ROOT / "contracts" / f"{name}.vy").read_bytes()
    assert artifact["sourceSha256"] == hashlib.sha256(source).hexdigest(), \
        f"contracts/{name}.vy changed: run python contracts/compile.py"
    assert artifact["bytecode"].startswith("0x") and len(artifact["bytecode"]) > 500
    # the ERC-5202 blueprint: the factory deploys PredictionMarket from one
    assert "fe7100" in artifact["blueprintBytecode"][:40]
    names = {e["name"] for e in artifact["abi"] if e["type"] == "event"}
    assert names == events


def test_follow_names_an_address_argument_of_an_event() -> None:
    factory = [{"type": "event", "name": "PairCreated", "anonymous": False, "inputs": [
        {"name": "token0", "type": "address", "indexed": True},
        {"name": "pair", "type": "address", "indexed": False},
        {"name": "count", "type": "uint256", "indexed": False}]}]
    follow = Follow.parse("PairCreated.pair", factory)
    assert str(follow) == "PairCreated.pair"
    (spec,) = EventCodec(factory).events.values()
    pair = "0x" + "Ab" * 20

    def pair_created(token0: str, pair: str) -> Any:
        return normalize_log({
            "address": ADDR, "blockNumber": "0x5", "blockHash": "0x" + "11" * 32,
            "transactionHash": "0x" + "22" * 32, "logIndex": "0x0",
            "topics": [spec.topic0, "0x" + "00" * 12 + token0[2:]],
            "data": "0x" + encode(["address", "uint256"], [pair, 7]).hex()})

    log = pair_created("0x" + "cd" * 20, pair)
    assert follow.child(spec, log) == pair.lower()
    assert Follow.parse("PairCreated.token0", factory).child(spec, log) == "0x" + "cd" * 20
    zero = pair_created("0x" + "cd" * 20, "0x" + "00" * 20)
    assert follow.child(spec, zero) is None             # the zero address names nothing
    for text, error in [("PairCreated", "not EVENT.ARG"), ("Nope.pair", "no event Nope"),
                        ("PairCreated.pool", "no argument pool .its arguments: token0, pair"),
                        ("PairCreated.count", "is a uint256, not an address")]:
        with pytest.raises(ValueError, match=error):
            Follow.parse(text, factory)


# --------------------------------------------------------------------------- flags

RPC = ["--rpc", "http://127.0.0.1:8545", "--contract", ADDR]


@pytest.fixture(autouse=True)
def _no_fastws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("FASTWS_"):
            monkeypatch.delenv(k)


def test_flags_defaults_and_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    a = parse_args([*RPC, "--contract", f"{ADDR},{OTHER},{ADDR.upper().replace('0X', '0x')}"])
    assert a.contracts == (ADDR, OTHER.lower()) and a.confirmations == 2
    assert a.from_block is None and a.url == "http://127.0.0.1:8765" and a.broker is None
    assert a.checkpoint.startswith(".fastws-index-") and a.metrics_port == 0
    monkeypatch.setenv("FASTWS_CONFIRMATIONS", "5")
    monkeypatch.setenv("FASTWS_API_KEY", "k1,k2")
    monkeypatch.setenv("FASTWS_CHECKPOINT", str(tmp_path / "cp.json"))
    a = parse_args([*RPC, "--from-block", "0x10"])
    assert a.confirmations == 5 and a.api_key == "k1" and a.from_block == 16
    assert parse_args([*RPC, "--confirmations", "1"]).confirmations == 1   # flag > env


@pytest.mark.parametrize(("argv", "flag"), [
    (["--contract", ADDR], "--rpc"),
    (["--rpc", "ftp://x", "--contract", ADDR], "--rpc"),
    (["--rpc", "ws://", "--contract", ADDR], "--rpc"),
    (["--rpc", "http://x"], "--contract"),
    ([*RPC[:3], "0x1234"], "--contract"),
    ([*RPC, "--confirmations", "0"], "--confirmations"),
    ([*RPC, "--confirmations", "two"], "--confirmations"),
    ([*RPC, "--from-block", "-1"], "--from-block"),
    ([*RPC, "--abi", "/nonexistent/abi.json"], "--abi"),
    ([*RPC, "--broker", "redis+cluster://127.0.0.1:7000"], "--broker"),
    ([*RPC, "--broker", "redis://127.0.0.1:6379/0", "--url", "http://x"], "--broker"),
    ([*RPC, "--broker", "kafka://x"], "--broker"),
    ([*RPC, "--url", "ftp://x"], "--url"),
    ([*RPC, "--poll-interval", "0"], "--poll-interval"),
    ([*RPC, "--max-range", "0"], "--max-range"),
    ([*RPC, "--metrics-port", "70000"], "--metrics-port"),
    ([*RPC, "--log-level", "loud"], "--log-level"),
    ([*RPC, "--bogus"], "--bogus"),
    ([*RPC, "--follow", "MarketDeployed"], "--follow"),
    ([*RPC, "--follow", "Deployed.market"], "--follow"),
    ([*RPC, "--follow", "MarketCreated.question"], "--follow"),
    ([*RPC, "--child-abi", "/nonexistent/abi.json"], "--child-abi"),
    ([*RPC, "--follow", "MarketDeployed.market", "--child-abi", "/nonexistent/a.json"],
     "--child-abi"),
])
def test_bad_flags_name_the_flag(argv: list[str], flag: str,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match=flag):
        parse_args(argv)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fastws index: ") and flag in err


def test_redis_broker_flags(tmp_path) -> None:
    a = parse_args([*RPC, "--broker", "redis://127.0.0.1:6379/0"])
    assert a.broker == "redis://127.0.0.1:6379/0" and a.checkpoint.startswith("fastws:indexer:")
    assert a.config.for_channel("events:x").history_size == 100
    (tmp_path / "fastws.toml").write_text('[namespaces.events]\nhistory_size = 7\n')
    a = parse_args([*RPC, "--broker", "redis://h/0", "--config", str(tmp_path / "fastws.toml"),
                    "--checkpoint", "my:key"])
    assert a.config.for_channel("events:x").history_size == 7 and a.checkpoint == "my:key"
    assert parse_args([*RPC, "--broker", "memory://"]).broker is None    # → --url


def test_ws_rpc_flags() -> None:
    assert parse_args(["--rpc", "ws://127.0.0.1:8546", "--contract", ADDR]).rpc \
        == "ws://127.0.0.1:8546"
    assert parse_args(["--rpc", "wss://node.example/v3/k", "--contract", ADDR]).rpc \
        == "wss://node.example/v3/k"


def test_follow_flags(tmp_path) -> None:
    a = parse_args([*RPC, "--follow", "MarketDeployed.market"])       # the bundled ABIs
    assert str(a.follow) == "MarketDeployed.market"
    assert a.checkpoint != parse_args(RPC).checkpoint                 # its own checkpoint
    (tmp_path / "factory.json").write_text(json.dumps([
        {"type": "event", "name": "Spawned", "inputs": [
            {"name": "child", "type": "address", "indexed": True}]}]))
    (tmp_path / "child.json").write_text(json.dumps({"abi": ABI}))
    a = parse_args([*RPC, "--abi", str(tmp_path / "factory.json"), "--follow", "Spawned.child",
                    "--child-abi", str(tmp_path / "child.json")])
    assert [e["name"] for e in a.abi] == ["Spawned", *(e["name"] for e in ABI)]
    with pytest.raises(UsageError, match="--child-abi: only with --follow"):
        parse_args([*RPC, "--child-abi", str(tmp_path / "child.json")])


def test_abi_file_forms(tmp_path) -> None:
    (tmp_path / "list.json").write_text(json.dumps(ABI))
    (tmp_path / "artifact.json").write_text(json.dumps({"abi": ABI, "bytecode": "0x"}))
    (tmp_path / "noevents.json").write_text(json.dumps([ABI[-1]]))
    for name in ("list.json", "artifact.json"):
        assert parse_args([*RPC, "--abi", str(tmp_path / name)]).abi == ABI
    with pytest.raises(UsageError, match="--abi: .* declares no"):
        parse_args([*RPC, "--abi", str(tmp_path / "noevents.json")])


def test_cli_delegates_and_exits_2_on_a_bad_flag() -> None:
    proc = subprocess.run([sys.executable, "-m", "fastws", "index", *RPC, "--confirmations",
                           "-3"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "fastws index: --confirmations: must be at least 1, got -3"]


# --------------------------------------------------------------------------- checkpoints


async def test_file_checkpoint_round_trip_and_mismatch(tmp_path) -> None:
    store = FileCheckpoint(tmp_path / "cp.json")
    assert await store.load() is None
    cp = Checkpoint(chain_id=1337, contracts=[ADDR], block=41, hashes={40: "0xa", 41: "0xb"},
                    recent=[PublishedEvent("0xt:0", {"blockNumber": 41, "args": {"a": "1"}})],
                    retracted=["0xu:1"])
    await store.save(cp)
    again = await store.load()
    assert again == cp and again.recent[0].block == 41
    assert [p.name for p in tmp_path.iterdir()] == ["cp.json"]    # no temp file left
    again.check(1337, [ADDR])
    with pytest.raises(CheckpointMismatch, match="chain id"):
        again.check(1, [ADDR])
    with pytest.raises(CheckpointMismatch, match="contracts"):
        again.check(1337, [OTHER])
    with pytest.raises(CheckpointMismatch, match="written with no --follow"):
        again.check(1337, [ADDR], "MarketDeployed.market")

    cp.follow = "MarketDeployed.market"
    cp.followed = [Followed(OTHER.lower(), 40, "0xt:1")]
    await store.save(cp)
    again = await store.load()
    assert again == cp
    again.check(1337, [ADDR], "MarketDeployed.market")
    with pytest.raises(CheckpointMismatch, match="written with --follow MarketDeployed.market"):
        again.check(1337, [ADDR])


# --------------------------------------------------------------------------- getLogs ranges


class RangeLimitedRpc:
    """A node that refuses getLogs over more than ``limit`` blocks (the fault to test)."""

    def __init__(self, limit: int, hint: bool = False) -> None:
        self.limit, self.hint = limit, hint
        self.ranges: list[tuple[int, int]] = []
        self.transient = 0

    async def request(self, method: str, params: list[Any]) -> Any:
        if self.transient:
            self.transient -= 1
            raise RpcTransient(method, "HTTP 429", retry_after=0.0)
        lo, hi = int(params[0]["fromBlock"], 16), int(params[0]["toBlock"], 16)
        self.ranges.append((lo, hi))
        if hi - lo + 1 > self.limit:
            msg = "query exceeds max block range"
            if self.hint:
                msg += f", this block range should work: [{hex(lo)}, {hex(lo + self.limit - 1)}]"
            raise RpcError(method, -32005, msg)
        return []

    async def close(self) -> None:
        return None


async def _no_sleep(_: float) -> None:
    return None


async def test_log_source_narrows_then_widens_the_range() -> None:
    rpc = RangeLimitedRpc(limit=10)
    faults: list[str] = []
    src = LogSource(rpc, [ADDR], max_range=100, grow_after=2, on_fault=faults.append,
                    sleep=_no_sleep)
    _, last = await src.logs(0, 999)
    assert last == 5 and src.span == 6                 # 100 → 50 → 25 → 12 → 6 blocks
    assert rpc.ranges[:2] == [(0, 99), (0, 49)] and faults.count("range") == 4
    accepted = [(0, 5)]
    while accepted[-1][1] < 999:
        _, last = await src.logs(accepted[-1][1] + 1, 999)
        accepted.append((accepted[-1][1] + 1, last))
    assert all(hi - lo + 1 <= 10 for lo, hi in accepted)          # contiguous, none lost
    assert any(hi - lo + 1 > 6 for lo, hi in accepted)            # widened again after successes


async def test_log_source_follows_the_providers_range_hint_and_retries_429() -> None:
    rpc = RangeLimitedRpc(limit=10, hint=True)
    rpc.transient = 2
    faults: list[str] = []
    src = LogSource(rpc, [ADDR], max_range=2000, on_fault=faults.append,
                    backoff=Backoff(base=0.001, cap=0.001), sleep=_no_sleep)
    _, last = await src.logs(5, 5000)
    assert last == 14 and src.span == 10
    assert faults == ["transient", "transient", "range"]


async def test_log_source_narrows_the_range_when_get_logs_times_out() -> None:
    class SlowNode(RangeLimitedRpc):
        async def request(self, method: str, params: list[Any]) -> Any:
            lo, hi = int(params[0]["fromBlock"], 16), int(params[0]["toBlock"], 16)
            if hi - lo + 1 > self.limit:
                self.ranges.append((lo, hi))
                raise RpcTransient(method, "TimeoutError", timeout=True)
            return await super().request(method, params)

    rpc = SlowNode(limit=300)
    faults: list[str] = []
    src = LogSource(rpc, [ADDR], max_range=2000, on_fault=faults.append, sleep=_no_sleep)
    _, last = await src.logs(0, 10_000)
    assert last == 249 and src.span == 250 and faults == ["transient"] * 3
