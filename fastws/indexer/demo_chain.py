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
error instead.  :class:`WsRpcServer` serves it over WebSocket (``websockets``, which
web3 depends on), with ``eth_subscribe("newHeads")``: every block mined, by any path
into the chain, is pushed to the subscribers as it is mined.  Run them by hand with::

    python -m fastws.indexer.demo_chain --port 8545 --ws-port 8546   # prints the addresses

eth-tester and py-evm come with ``web3[tester]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import random
import secrets
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any

__all__ = ["DemoChain", "FACTORY_ADDRESS", "FOLLOW", "MARKET_ADDRESSES", "QUESTIONS",
           "TESTER_CHAIN_ID", "RpcServer", "WsRpcServer", "load_artifact"]

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
# The addresses every DemoChain has (documented in docs/indexer.md and docs/clients.md):
# each chain is a fresh eth-tester chain whose deployer (account 0, eth-tester's fixed
# first key) starts at nonce 0: nonce 0 deploys the blueprint, nonce 1 the factory, and
# the factory's own nonces give its markets in deployment order (CREATE addresses depend
# on the deployer and its nonce only).  `serve --demo` deploys the first two at start and
# the others one every DEPLOY_EVERY ticks; a fresh chain (after MAX_BLOCKS) repeats them.
FACTORY_ADDRESS = "0x2946259e0334f33a064106302415ad3391bed384"
TESTER_CHAIN_ID = 131277322940537    # eth-tester's own chain id
MARKET_ADDRESSES = (
    "0xc8624589ede8b4895513755817933fa17e3ef1f3",
    "0x665b35028596b164a9a51b4b28ed375fc4e88945",
    "0xdcb55cbb56df9efa14f16211d38e9246ada1a266",
    "0xf64dbe4871200d4b6fe51cf5066847b5c74ba2d9",
    "0xaa5c41b16d680118e417da6e871258e5e06bb4e5",
    "0xce2a2251403fdc5a237597194742ce901605dec5",
)


def load_artifact(name: str = "PredictionMarket") -> dict[str, Any]:
    """A committed compile output (``PredictionMarket`` or ``MarketFactory``):
    ``{"abi": [...], "bytecode": "0x...", "blueprintBytecode": "0x...", ...}``."""
    text = resources.files("fastws.indexer").joinpath(f"{name}.json").read_text()
    return json.loads(text)


class DemoChain:
    """A py-evm chain with a MarketFactory and ``contracts`` PredictionMarket contracts
    deployed by it.

    ``chain_id`` (default eth-tester's, :data:`TESTER_CHAIN_ID`) is what ``eth_chainId``
    answers and what transactions are signed for, so that two chains of one process
    are two networks; ``owner`` is the index of the account that deploys the contracts
    (account 0 gives the documented :data:`FACTORY_ADDRESS` and
    :data:`MARKET_ADDRESSES`; another gives other addresses).
    """

    def __init__(self, contracts: int = 2, rng: random.Random | None = None, *,
                 chain_id: int | None = None, owner: int = 0) -> None:
        from eth_tester import EthereumTester, PyEVMBackend
        from web3 import EthereumTesterProvider, Web3
        from web3.providers.eth_tester.defaults import API_ENDPOINTS, static_return

        self.lock = threading.RLock()
        self.rng = rng or random.Random()
        self.tester = EthereumTester(PyEVMBackend())
        endpoints = None
        self.chain_id = chain_id or TESTER_CHAIN_ID
        if chain_id is not None:
            self.tester.backend.chain.chain_id = chain_id       # what transactions sign for
            endpoints = dict(API_ENDPOINTS)
            endpoints["eth"] = dict(endpoints["eth"], chainId=static_return(chain_id))
        self.provider = EthereumTesterProvider(self.tester, api_endpoints=endpoints)
        self.w3 = Web3(self.provider)
        self._request = self.provider.request_func(self.w3, self.w3.middleware_onion)
        artifact = load_artifact()
        self.abi: list[dict[str, Any]] = artifact["abi"]
        factory_artifact = load_artifact("MarketFactory")
        self.factory_abi: list[dict[str, Any]] = factory_artifact["abi"]
        self.accounts: list[str] = list(self.w3.eth.accounts)
        self.owner = self.accounts[owner]
        self.contracts: list[Any] = []
        self.open_markets: dict[str, list[int]] = {}
        self.end_times: dict[tuple[str, int], int] = {}
        self.ticks = 0
        self.block_listeners: list[Callable[[dict[str, Any]], None]] = []
        mine_blocks = self.tester.mine_blocks

        def mine_and_tell(*args: Any, **kwargs: Any) -> Any:
            # every block goes through EthereumTester.mine_blocks (auto-mined
            # transactions, mine(), raw transactions sent over RPC): tell the listeners
            hashes = mine_blocks(*args, **kwargs)
            for block_hash in hashes:
                if self.block_listeners:
                    block = self.tester.get_block_by_hash(block_hash)
                    for listener in list(self.block_listeners):
                        listener(block)
            return hashes

        self.tester.mine_blocks = mine_and_tell   # type: ignore[method-assign]
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


def answer_call(chain: DemoChain, req: dict[str, Any]) -> dict[str, Any]:
    """The JSON-RPC response object to one call ``req``, as a node sends it."""
    method, params = req.get("method", ""), req.get("params") or []
    try:
        resp = chain.request(method, params)
    except Exception as exc:  # noqa: BLE001 - a node answers errors, it does not crash
        resp = {"error": {"code": -32000, "message": f"{type(exc).__name__}: {exc}"}}
    out: dict[str, Any] = {"jsonrpc": "2.0", "id": req.get("id")}
    if resp.get("error") is not None:
        err = resp["error"]
        out["error"] = err if isinstance(err, dict) else {"code": -32000, "message": str(err)}
    else:
        out["result"] = to_rpc_json(resp.get("result"))
    return out


def head_json(block: dict[str, Any]) -> dict[str, Any]:
    """An eth-tester block as the header a ``newHeads`` notification carries."""
    keys = {"number": "number", "hash": "hash", "parent_hash": "parentHash",
            "timestamp": "timestamp", "miner": "miner", "gas_limit": "gasLimit",
            "gas_used": "gasUsed", "base_fee_per_gas": "baseFeePerGas",
            "state_root": "stateRoot", "logs_bloom": "logsBloom"}
    return {name: to_rpc_json(block[key]) for key, name in keys.items() if key in block}


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
        return 200, {}, answer_call(self.chain, req)

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


WsFaultHook = Callable[[str, list[Any]], "dict[str, Any] | None"]


class WsRpcServer:
    """Serves a :class:`DemoChain` over WebSocket JSON-RPC on 127.0.0.1, in a thread,
    with ``eth_subscribe("newHeads")`` / ``eth_unsubscribe``.

    Each block mined is pushed to every newHeads subscriber from the chain's mining
    hook (no polling).  ``fault(method, params)`` may return a JSON-RPC ``error`` object
    to answer a call with instead (e.g. refuse ``eth_subscribe``); :meth:`drop` closes
    every connection, as a node restarting does.  ``calls`` counts calls by method.
    """

    def __init__(self, chain: DemoChain, port: int = 0, host: str = "127.0.0.1") -> None:
        self.chain = chain
        self.fault: WsFaultHook | None = None
        self.calls: dict[str, int] = {}
        self.host = host
        self._port = port
        self._loop = asyncio.new_event_loop()
        self._subs: dict[str, Any] = {}          # subscription id → connection
        self._server: Any = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self.port = 0
        self.url = ""

    def start(self) -> WsRpcServer:
        """Listen and serve in a daemon thread; returns self once listening."""
        self._thread = threading.Thread(target=self._serve, name="demo-chain-ws-rpc",
                                        daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._server is None:
            raise RuntimeError("the WebSocket JSON-RPC server did not start")
        self.chain.block_listeners.append(self._on_block)
        return self

    def _serve(self) -> None:
        from websockets.asyncio.server import serve

        asyncio.set_event_loop(self._loop)

        async def listen() -> None:
            self._server = await serve(self._handler, self.host, self._port, max_size=None,
                                       compression=None)
            self.port = self._server.sockets[0].getsockname()[1]
            self.url = f"ws://{self.host}:{self.port}"
            self._ready.set()

        try:
            self._loop.run_until_complete(listen())
            self._loop.run_forever()
        finally:
            self._ready.set()

    async def _handler(self, conn: Any) -> None:
        try:
            async for raw in conn:
                try:
                    req = json.loads(raw)
                except ValueError:
                    await conn.send(json.dumps({"jsonrpc": "2.0", "id": None, "error": {
                        "code": -32700, "message": "parse error"}}))
                    continue
                for one in req if isinstance(req, list) else [req]:
                    await conn.send(json.dumps(self._answer(conn, one)))
        except Exception:  # noqa: BLE001 - a client going away ends its handler
            pass
        finally:
            for sub, c in list(self._subs.items()):
                if c is conn:
                    self._subs.pop(sub, None)

    def _answer(self, conn: Any, req: dict[str, Any]) -> dict[str, Any]:
        method, params = req.get("method", ""), req.get("params") or []
        self.calls[method] = self.calls.get(method, 0) + 1
        out: dict[str, Any] = {"jsonrpc": "2.0", "id": req.get("id")}
        if self.fault is not None:
            err = self.fault(method, params)
            if err is not None:
                return dict(out, error=err)
        if method == "eth_subscribe":
            if params[:1] != ["newHeads"]:
                return dict(out, error={"code": -32602,
                                        "message": f"unsupported subscription {params[:1]}"})
            sub = "0x" + secrets.token_hex(16)
            self._subs[sub] = conn
            return dict(out, result=sub)
        if method == "eth_unsubscribe":
            return dict(out, result=self._subs.pop(params[0] if params else "", None)
                        is not None)
        return answer_call(self.chain, req)

    def _on_block(self, block: dict[str, Any]) -> None:
        """Called by the chain's mining hook (in the mining thread)."""
        if self._subs:
            head = head_json(block)
            with contextlib.suppress(RuntimeError):    # the loop may be closed
                self._loop.call_soon_threadsafe(self._push, head)

    def _push(self, head: dict[str, Any]) -> None:
        for sub, conn in list(self._subs.items()):
            msg = json.dumps({"jsonrpc": "2.0", "method": "eth_subscription",
                              "params": {"subscription": sub, "result": head}})
            self._loop.create_task(self._send(conn, msg))

    @staticmethod
    async def _send(conn: Any, msg: str) -> None:
        with contextlib.suppress(Exception):
            await conn.send(msg)

    @property
    def subscribers(self) -> int:
        """newHeads subscriptions open now."""
        return len(self._subs)

    def drop(self) -> None:
        """Close every client connection (their subscriptions end with them)."""
        async def close_all() -> None:
            for conn in list(self._server.connections):
                await conn.close(1012, "restarting")

        asyncio.run_coroutine_threadsafe(close_all(), self._loop).result(10)

    def stop(self) -> None:
        """Stop serving, close the connections and the socket."""
        if self._on_block in self.chain.block_listeners:
            self.chain.block_listeners.remove(self._on_block)

        async def shut() -> None:
            self._server.close()
            await self._server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)


def main(argv: list[str] | None = None) -> int:
    """``python -m fastws.indexer.demo_chain``: a demo chain with an RPC endpoint."""
    parser = argparse.ArgumentParser(prog="python -m fastws.indexer.demo_chain",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8545, help="JSON-RPC port (default 8545)")
    parser.add_argument("--ws-port", type=int, default=0,
                        help="WebSocket JSON-RPC port, with eth_subscribe newHeads (default "
                             "0: none)")
    parser.add_argument("--contracts", type=int, default=2, help="markets contracts to deploy")
    parser.add_argument("--chain-id", type=int, default=None,
                        help=f"the chain id (default eth-tester's {TESTER_CHAIN_ID})")
    parser.add_argument("--owner", type=int, default=0,
                        help="the deploying account (default 0: the documented addresses)")
    parser.add_argument("--interval", type=float, default=1.0,
                        help="seconds between demo transactions (0: no driver)")
    args = parser.parse_args(argv)
    from fastws.extras import MissingExtra, require_chain

    try:
        require_chain("python -m fastws.indexer.demo_chain", ("web3", "eth_tester"))
    except MissingExtra as exc:
        print(exc, file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    chain = DemoChain(args.contracts, chain_id=args.chain_id, owner=args.owner)
    rpc = RpcServer(chain, args.port).start()
    ws = WsRpcServer(chain, args.ws_port).start() if args.ws_port else None
    print(f"rpc {rpc.url}{f'  ws {ws.url}' if ws else ''}  factory {chain.factory_address}  "
          f"contracts {','.join(chain.addresses)}  block {chain.head()}  chain id "
          f"{chain.chain_id}", flush=True)
    try:
        while True:
            if args.interval > 0:
                log.info("block %d: %s", chain.head() + 1, chain.tick())
            time.sleep(args.interval if args.interval > 0 else 3600)
    except KeyboardInterrupt:
        rpc.stop()
        if ws is not None:
            ws.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
