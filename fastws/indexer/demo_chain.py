"""An embedded chain for the demo and the tests: eth-tester (py-evm) with prediction markets.

:class:`DemoChain` runs a private chain in this process, deploys the committed
``MarketFactory`` (contracts/MarketFactory.vy) with a ``PredictionMarket`` blueprint
(contracts/PredictionMarket.vy; ABIs and bytecode in the JSON artifacts next to this
file), has the factory deploy the first market contracts, and drives them:
:meth:`DemoChain.tick` creates a market, places a bet or resolves a market, one
transaction and so one block at a time, the way ``serve --demo`` shows it; now and then
it has the factory deploy one more market contract (``MarketDeployed``), which the
indexer follows.  Every call into the chain holds :attr:`DemoChain.lock`: eth-tester is
not thread-safe.

:class:`RpcServer` serves the chain as a standard HTTP JSON-RPC endpoint (hex
quantities, like any node), so that ``fastws index --rpc`` can read it from another
process; a ``fault`` hook lets tests answer a call with an HTTP status or a JSON-RPC
error instead.  Run both by hand with::

    python -m fastws.indexer.demo_chain --port 8545   # prints the contract addresses

eth-tester and py-evm come with ``web3[tester]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

__all__ = ["DemoChain", "FOLLOW", "QUESTIONS", "RpcServer", "load_artifact"]

log = logging.getLogger("fastws.indexer")

QUESTIONS = (
    "Will ETH close above 5k this week?",
    "Will it rain in Paris tomorrow?",
    "Will the next block number be even?",
    "Will BTC dominance exceed 60% by Friday?",
    "Will the launch happen on time?",
    "Will gas stay under 20 gwei today?",
)
GAS = 300_000
DEPLOY_GAS = 2_000_000
WEI = 10**18
DEPLOY_EVERY = 30      # demo ticks between two market contracts deployed by the factory
MAX_CONTRACTS = 6      # the driver stops deploying market contracts at this many
FOLLOW = "MarketDeployed.market"   # the factory event whose argument is a new contract


def load_artifact(name: str = "PredictionMarket") -> dict[str, Any]:
    """A committed compile output (``PredictionMarket`` or ``MarketFactory``):
    ``{"abi": [...], "bytecode": "0x...", "blueprintBytecode": "0x...", ...}``."""
    text = resources.files("fastws.indexer").joinpath(f"{name}.json").read_text()
    return json.loads(text)


class DemoChain:
    """A py-evm chain with a MarketFactory and ``contracts`` PredictionMarket contracts
    deployed by it."""

    def __init__(self, contracts: int = 2, rng: random.Random | None = None) -> None:
        from eth_tester import EthereumTester, PyEVMBackend
        from web3 import EthereumTesterProvider, Web3

        self.lock = threading.RLock()
        self.rng = rng or random.Random()
        self.tester = EthereumTester(PyEVMBackend())
        self.provider = EthereumTesterProvider(self.tester)
        self.w3 = Web3(self.provider)
        self._request = self.provider.request_func(self.w3, self.w3.middleware_onion)
        artifact = load_artifact()
        self.abi: list[dict[str, Any]] = artifact["abi"]
        factory_artifact = load_artifact("MarketFactory")
        self.factory_abi: list[dict[str, Any]] = factory_artifact["abi"]
        self.accounts: list[str] = list(self.w3.eth.accounts)
        self.owner = self.accounts[0]
        self.contracts: list[Any] = []
        self.open_markets: dict[str, list[int]] = {}
        self.end_times: dict[tuple[str, int], int] = {}
        self.ticks = 0
        with self.lock:
            blueprint = self._create(artifact["blueprintBytecode"])
            ctor = self.w3.eth.contract(abi=self.factory_abi,
                                        bytecode=factory_artifact["bytecode"]).constructor
            deploy_data = ctor(blueprint).build_transaction({"from": self.owner, "gas": 0})
            factory = self._create(deploy_data["data"])
            self.factory = self.w3.eth.contract(address=factory, abi=self.factory_abi)
        for _ in range(contracts):
            self.deploy()

    # ------------------------------------------------------------------ chain access

    @property
    def addresses(self) -> list[str]:
        """The market contracts' addresses, lowercase."""
        return [c.address.lower() for c in self.contracts]

    @property
    def factory_address(self) -> str:
        """The MarketFactory's address, lowercase."""
        return str(self.factory.address).lower()

    def _create(self, data: str) -> str:
        """Send a contract-creation transaction with ``data``; the new address."""
        tx = self.w3.eth.send_transaction({"from": self.owner, "data": data,
                                           "gas": DEPLOY_GAS})
        receipt = self.w3.eth.get_transaction_receipt(tx)
        if receipt.status != 1:
            raise RuntimeError("contract creation reverted")
        return str(receipt.contractAddress)

    def deploy(self) -> str:
        """Have the factory deploy one more PredictionMarket (owner: account 0), as a
        transaction that logs ``MarketDeployed``; returns its address, lowercase."""
        with self.lock:
            tx = self.factory.functions.deployMarket().transact({"from": self.owner,
                                                                 "gas": DEPLOY_GAS})
            receipt = self.w3.eth.get_transaction_receipt(tx)
            if receipt.status != 1:
                raise RuntimeError("deployMarket reverted")
            (event,) = self.factory.events.MarketDeployed().process_receipt(receipt)
            contract = self.w3.eth.contract(address=event["args"]["market"], abi=self.abi)
        self.contracts.append(contract)
        self.open_markets[contract.address.lower()] = []
        return contract.address.lower()

    def _contract(self, address: str) -> Any:
        for c in self.contracts:
            if c.address.lower() == address.lower():
                return c
        raise KeyError(address)

    def _transact(self, fn: Any, sender: str, value: int = 0) -> dict[str, Any]:
        with self.lock:
            tx = fn.transact({"from": sender, "value": value, "gas": GAS})
            receipt = self.w3.eth.get_transaction_receipt(tx)
        if receipt.status != 1:
            raise RuntimeError(f"transaction {tx.hex()} reverted")
        return dict(receipt)

    def create_market(self, address: str, question: str, duration: int = 3600) -> int:
        """Open a market on contract ``address``; returns its id."""
        c = self._contract(address)
        with self.lock:
            end = self.w3.eth.get_block("latest")["timestamp"] + duration
            market_id = c.functions.marketCount().call()
            self._transact(c.functions.createMarket(question, end), self.owner)
        self.open_markets.setdefault(address.lower(), []).append(market_id)
        self.end_times[(address.lower(), market_id)] = end
        return market_id

    def place_bet(self, address: str, market_id: int, outcome: bool, amount: int,
                  bettor: int = 1) -> None:
        """Bet ``amount`` wei on ``outcome`` from account ``bettor``."""
        c = self._contract(address)
        self._transact(c.functions.placeBet(market_id, outcome), self.accounts[bettor], amount)

    def resolve(self, address: str, market_id: int, outcome: bool) -> None:
        """Resolve a market (as the owner)."""
        c = self._contract(address)
        self._transact(c.functions.resolveMarket(market_id, outcome), self.owner)
        markets = self.open_markets.get(address.lower(), [])
        if market_id in markets:
            markets.remove(market_id)

    def mine(self, blocks: int = 1) -> None:
        """Mine empty blocks."""
        with self.lock:
            self.tester.mine_blocks(blocks)

    def head(self) -> int:
        """The newest block number."""
        with self.lock:
            return int(self.w3.eth.block_number)

    def snapshot(self) -> Any:
        """Remember the chain as it is now (for :meth:`revert`)."""
        with self.lock:
            return self.tester.take_snapshot()

    def revert(self, snapshot: Any) -> None:
        """Drop every block after ``snapshot``: the next blocks fork the chain (a reorg)."""
        with self.lock:
            self.tester.revert_to_snapshot(snapshot)

    def request(self, method: str, params: list[Any]) -> dict[str, Any]:
        """One JSON-RPC call as a node answers it: ``{"result": ...}`` or ``{"error": ...}``."""
        with self.lock:
            return self._request(method, params)

    # ------------------------------------------------------------------ the demo driver

    def tick(self) -> str:
        """One demo action (one transaction): create, bet on or resolve a market; every
        ``DEPLOY_EVERY`` ticks, deploy one more market contract through the factory.

        Markets whose betting time is over are resolved first; a bet only goes to a
        market still open, so the driver runs for as long as the chain does.
        """
        rng = self.rng
        self.ticks += 1
        if self.ticks % DEPLOY_EVERY == 0 and len(self.contracts) < MAX_CONTRACTS:
            return f"deployed market contract {self.deploy()} (MarketDeployed)"
        address = rng.choice(self.addresses)
        open_ids = self.open_markets[address]
        with self.lock:
            now = int(self.w3.eth.get_block("latest")["timestamp"])
        expired = [m for m in open_ids if self.end_times.get((address, m), 0) <= now + 5]
        if expired:
            self.resolve(address, expired[0], rng.random() < 0.5)
            return f"resolved market {expired[0]} on {address} (closed)"
        roll = rng.random()
        if len(open_ids) < 2 or roll < 0.12:
            mid = self.create_market(address, rng.choice(QUESTIONS), rng.randrange(600, 3600))
            return f"created market {mid} on {address}"
        if roll < 0.24 and len(open_ids) > 2:
            mid = open_ids[0]
            self.resolve(address, mid, rng.random() < 0.5)
            return f"resolved market {mid} on {address}"
        mid = rng.choice(open_ids)
        amount = rng.randrange(WEI // 100, 5 * WEI)
        self.place_bet(address, mid, rng.random() < 0.5, amount,
                       bettor=rng.randrange(1, len(self.accounts)))
        return f"bet on market {mid} of {address}"


# --------------------------------------------------------------------------- JSON-RPC


def to_rpc_json(value: Any) -> Any:
    """eth-tester's Python values as a node's JSON: ints as hex quantities, bytes as hex."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return hex(value)
    if isinstance(value, (bytes, bytearray)):
        return "0x" + bytes(value).hex()
    if isinstance(value, dict) or hasattr(value, "items"):
        return {k: to_rpc_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_rpc_json(v) for v in value]
    return value


FaultHook = Callable[[str, list[Any]], "tuple[int, dict[str, str], bytes] | None"]


class RpcServer:
    """Serves a :class:`DemoChain` over HTTP JSON-RPC on 127.0.0.1, in a thread.

    ``fault(method, params)`` may return ``(status, headers, body)`` to answer a call
    with that instead (a 429, a 500, a JSON-RPC error, after a delay...); None lets it
    through.  ``calls`` counts the calls by method.
    """

    def __init__(self, chain: DemoChain, port: int = 0, host: str = "127.0.0.1") -> None:
        self.chain = chain
        self.fault: FaultHook | None = None
        self.calls: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                return None

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                status, headers, body = server.handle(self.rfile.read(length))
                self.send_response(status)
                for k, v in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._httpd = ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    def handle(self, raw: bytes) -> tuple[int, dict[str, str], bytes]:
        """Answer one JSON-RPC request body (single calls; batches answered one by one)."""
        try:
            req = json.loads(raw)
        except ValueError:
            return 400, {}, b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse"}}'
        if isinstance(req, list):
            parts = [self._one(r) for r in req]
            return 200, {}, json.dumps([p for _, _, p in parts]).encode()
        status, headers, doc = self._one(req)
        return status, headers, doc if isinstance(doc, bytes) else json.dumps(doc).encode()

    def _one(self, req: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        method, params = req.get("method", ""), req.get("params") or []
        self.calls[method] = self.calls.get(method, 0) + 1
        if self.fault is not None:
            answer = self.fault(method, params)
            if answer is not None:
                return answer
        try:
            resp = self.chain.request(method, params)
        except Exception as exc:  # noqa: BLE001 - a node answers errors, it does not crash
            resp = {"error": {"code": -32000, "message": f"{type(exc).__name__}: {exc}"}}
        out: dict[str, Any] = {"jsonrpc": "2.0", "id": req.get("id")}
        if resp.get("error") is not None:
            err = resp["error"]
            out["error"] = err if isinstance(err, dict) else {"code": -32000, "message": str(err)}
        else:
            out["result"] = to_rpc_json(resp.get("result"))
        return 200, {}, out

    def start(self) -> RpcServer:
        """Serve in a daemon thread; returns self."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="demo-chain-rpc",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()


def main(argv: list[str] | None = None) -> int:
    """``python -m fastws.indexer.demo_chain``: a demo chain with an RPC endpoint."""
    parser = argparse.ArgumentParser(prog="python -m fastws.indexer.demo_chain",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8545, help="JSON-RPC port (default 8545)")
    parser.add_argument("--contracts", type=int, default=2, help="markets contracts to deploy")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between demo transactions (0: no driver)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    chain = DemoChain(args.contracts)
    rpc = RpcServer(chain, args.port).start()
    print(f"rpc {rpc.url}  factory {chain.factory_address}  contracts "
          f"{','.join(chain.addresses)}  block {chain.head()}", flush=True)
    try:
        while True:
            if args.interval > 0:
                log.info("block %d: %s", chain.head() + 1, chain.tick())
            time.sleep(args.interval if args.interval > 0 else 3600)
    except KeyboardInterrupt:
        rpc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
