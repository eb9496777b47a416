"""``fastws index``: publish contracts' logs to fastws channels, from one chain or several.

Each log of the watched contracts is published, once it has ``--confirmations``
blocks (its own counts as one), to ``events:<event name in snake_case>`` and
``market:<contract address, lowercase>`` with data ``{eventType, marketAddress,
blockNumber, blockHash, txHash, logIndex, timestamp, args}``; a reorg publishes
retractions (the data plus ``"removed": true``) before the new chain's events.  With
``--config chains.toml`` it indexes every ``[chains.NAME]`` table at once (SPEC §14:
:mod:`fastws.indexer.chains`); every event carries ``network`` and ``chainId``;
``channels`` templates (:mod:`fastws.indexer.templates`) choose where events go;
``--store postgresql://…`` keeps every event in PostgreSQL before publishing it
(:mod:`fastws.indexer.store`).  See docs/indexer.md.

The package is never imported by the server's hot path; importing it is cheap (web3
and friends load when :func:`main` runs).  Parts: ``mapping`` (ABI decoding, sans
I/O), ``source`` (RPC, retries, adaptive getLogs ranges), ``runner`` (confirmations,
reorgs, checkpoints), ``chains`` (several chains), ``templates``, ``checkpoint``,
``store``, ``publish``, ``metrics``, ``demo_chain``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastws.channels import is_address
from fastws.extras import MissingExtra, require_chain
from fastws.usage import OneLineParser, UsageError

__all__ = ["main", "parse_args", "IndexArgs", "UsageError"]

PROG = "fastws index"
DEFAULT_URL = "http://127.0.0.1:8765"
log = logging.getLogger("fastws.indexer")



@dataclass(frozen=True, slots=True)
class IndexArgs:
    """The validated options of one ``fastws index`` run."""

    rpc: str
    contracts: tuple[str, ...]
    abi: list[dict[str, Any]]       # with --child-abi's entries after --abi's
    from_block: int | None
    confirmations: int
    broker: str | None          # redis://… to publish into the broker, else None (HTTP)
    url: str
    api_key: str | None
    checkpoint: str             # a file, or with a Redis broker a key
    poll_interval: float
    max_range: int
    metrics_port: int
    log_level: str
    config: Any = None          # the servers' Config (namespace rules), Redis broker only
    follow: Any = None          # mapping.Follow of --follow EVENT.ARG, or None
    network: str = "default"    # --network: the events' network (single-chain flags)
    chain_id: int | None = None  # --chain-id: checked against the node when given
    channels: Any = None        # templates.Channels of --channels (default templates)
    store: str | None = None    # --store postgresql://… (or [store] url)
    chains: tuple[Any, ...] = ()  # chains.ChainSpec of --config's [chains.NAME] tables


def _env(name: str) -> str | None:
    value = os.environ.get(f"FASTWS_{name}")
    return value if value not in (None, "") else None


# (flag, metavar, help): each flag is also read from FASTWS_<FLAG> (``--api-key``:
# FASTWS_API_KEY), named at the end of its help
_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--rpc", "URL", "JSON-RPC endpoint of a node: http(s)://, or ws(s):// to be woken by "
                     "eth_subscribe newHeads instead of polling"),
    ("--contract", "ADDR[,ADDR]", "contract address(es) to index"),
    ("--abi", "FILE", "ABI JSON (a list, or an object with an \"abi\" key); default: the "
                      "bundled PredictionMarket and MarketFactory ABIs"),
    ("--follow", "EVENT.ARG", "an event (of a factory) whose address argument is a contract "
                              "to index too, from that event's block on"),
    ("--child-abi", "FILE", "ABI of the contracts --follow finds (default: --abi)"),
    ("--from-block", "N", "where a first run starts (default: new blocks only); a "
                          "checkpoint wins"),
    ("--confirmations", "N", "publish once a block has N confirmations, its own included "
                             "(default 2)"),
    ("--network", "NAME", "the chain's name in every event's network field and in the "
                          "metrics (default: default)"),
    ("--chain-id", "N", "the chain id the node must answer (a mismatch stops the start)"),
    ("--channels", "T[,T]", "channel templates (default events:{event},market:{address}); "
                            "fields {event} {Event} {address} {network} {chain_id} "
                            "{args.NAME}"),
    ("--store", "URL", "postgresql://user@host:port/db: keep every event in the table "
                       "fastws_events (and the checkpoints there) before publishing it"),
    ("--broker", "URL", "redis://host:port/db: publish into the shared broker and keep the "
                        "checkpoint there; memory:// or unset: through --url"),
    ("--url", "URL", f"fastws server to publish to over HTTP (default {DEFAULT_URL})"),
    ("--api-key", "KEY", "the server's API key"),
    ("--checkpoint", "FILE|KEY", "checkpoint file (default .fastws-index-<contracts "
                                 "hash>.json), or with a Redis broker its key (default "
                                 "fastws:indexer:<contracts hash>)"),
    ("--config", "FILE", "a TOML with [chains.NAME] tables (several chains at once) and "
                         "[store] url, and/or the servers' [namespaces] (their history, "
                         "log and stream rules, Redis broker only)"),
    ("--poll-interval", "SECONDS", "seconds between polls of the head (default 1; with "
                                   "ws:// only while the newHeads subscription is down)"),
    ("--max-range", "N", "most blocks per eth_getLogs call (default 2000; narrower when the "
                         "node refuses)"),
    ("--metrics-port", "PORT", "serve Prometheus /metrics on 127.0.0.1:PORT (default 0: "
                               "off)"),
    ("--log-level", "LEVEL", "debug, info, warning, error (default info)"),
)


def _env_name(flag: str) -> str:
    """``--api-key`` -> ``API_KEY`` (the variable is FASTWS_API_KEY)."""
    return flag.removeprefix("--").upper().replace("-", "_")


def _build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description="Publish each log of the contracts, once "
                      "confirmed, to events:<event_name> and market:<address> of a fastws "
                      "server; a reorg publishes retractions first. Needs the 'chain' extra: pip "
                      "install 'fastws[chain]'. See docs/indexer.md.")
    for flag, metavar, text in _FLAGS:
        p.add_argument(flag, metavar=metavar, help=f"{text} [FASTWS_{_env_name(flag)}]")
    return p


def _int(flag: str, value: str | None, default: int | None, minimum: int) -> int | None:
    if value is None:
        return default
    try:
        n = int(value, 0)
    except ValueError:
        raise UsageError(f"{flag}: {value!r} is not an integer") from None
    if n < minimum:
        raise UsageError(f"{flag}: must be at least {minimum}, got {n}")
    return n


def _load_abi(path: str | None, flag: str = "--abi") -> list[dict[str, Any]]:
    if path is None:     # the demo's contracts: PredictionMarket and MarketFactory
        from fastws.indexer.demo_chain import load_artifact

        return load_artifact()["abi"] + load_artifact("MarketFactory")["abi"]
    try:
        doc = json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UsageError(f"{flag}: {path} is not JSON ({exc})") from None
    if isinstance(doc, dict) and isinstance(doc.get("abi"), list):
        doc = doc["abi"]
    if not isinstance(doc, list) or not all(isinstance(i, dict) for i in doc):
        raise UsageError(f"{flag}: {path} holds no ABI (a list of entries, or "
                         "{\"abi\": [...]})")
    if not any(i.get("type") == "event" and not i.get("anonymous") for i in doc):
        raise UsageError(f"{flag}: {path} declares no (non-anonymous) event")
    return doc


_SINGLE = ("rpc", "contract", "abi", "follow", "child_abi", "from_block", "confirmations",
           "network", "chain_id", "channels", "checkpoint")


def _read_toml(path: str) -> dict[str, Any]:
    import tomllib

    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise UsageError(f"--config: cannot read {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"--config: {path} is not TOML ({exc})") from None


def parse_args(argv: list[str]) -> IndexArgs:
    """Flags > ``FASTWS_*`` environment > config file > defaults; raises
    :class:`UsageError`."""
    from fastws.indexer.chains import (
        check_rpc,
        parse_chains,
        parse_store_table,
        parse_store_url,
    )

    ns = _build_parser().parse_args(argv)

    def pick(attr: str) -> str | None:      # the flag, else FASTWS_<ATTR>
        value = getattr(ns, attr)
        return value if value is not None else _env(attr.upper())

    config_file = pick("config")
    doc = _read_toml(config_file) if config_file else {}
    store = parse_store_url("--store", pick("store"))
    if store is None:
        store = parse_store_table(doc)
    broker = pick("broker")
    url = pick("url")
    scheme = broker.partition("://")[0].lower() if broker else ""
    if scheme in ("redis+cluster", "redis+sentinel"):
        raise UsageError(f"--broker: {scheme}:// is not available to the indexer yet; give "
                         "one node as redis://host:port/db or publish with --url")
    if broker and scheme not in ("memory", "redis", "rediss"):
        raise UsageError(f"--broker: {broker!r} is not memory:// or redis://host:port/db")
    if scheme in ("redis", "rediss"):
        if ns.url is not None:
            raise UsageError("--broker: give either --broker redis://… or --url, not both")
    else:
        broker = None        # memory:// is one process's: publish through a server instead
    url = url or DEFAULT_URL
    if not url.startswith(("http://", "https://")):
        raise UsageError(f"--url: {url!r} is not an http:// or https:// URL")
    api_key = pick("api_key")
    if api_key and "," in api_key and ns.api_key is None:
        api_key = api_key.split(",")[0].strip()   # FASTWS_API_KEY may list the server's keys
    config: Any = None
    if broker is not None:
        from fastws.config import ConfigError, load_config

        try:
            # checked against the indexer's broker (a stream namespace needs a Redis one)
            config = load_config({"broker": broker,
                                  **({"config": config_file} if config_file else {})})
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    poll_raw = pick("poll_interval") or "1"
    try:
        poll = float(poll_raw)
    except ValueError:
        raise UsageError(f"--poll-interval: {poll_raw!r} is not a number") from None
    if not 0 < poll <= 3600:
        raise UsageError(f"--poll-interval: must be in (0, 3600] seconds, got {poll_raw}")
    max_range = _int("--max-range", pick("max_range"), 2000, 1)
    metrics_port = _int("--metrics-port", pick("metrics_port"), 0, 0)
    if metrics_port is not None and metrics_port > 65535:
        raise UsageError(f"--metrics-port: {metrics_port} is not a TCP port")
    level = (pick("log_level") or "info").lower()
    if level not in ("debug", "info", "warning", "error", "critical"):
        raise UsageError(f"--log-level: {level!r} is not debug, info, warning or error")
    assert max_range is not None and metrics_port is not None
    common = dict(broker=broker, url=url, api_key=api_key, poll_interval=poll,
                  max_range=max_range, metrics_port=metrics_port, log_level=level,
                  config=config, store=store)

    if "chains" in doc:      # several chains: the single-chain flags do not apply
        for attr in _SINGLE:
            if getattr(ns, attr) is not None:
                flag = "--" + attr.replace("_", "-")
                raise UsageError(f"{flag}: not with [chains.NAME] tables in --config "
                                 f"{config_file} (set it in each chain's table)")
        assert config_file is not None
        chains = parse_chains(doc, Path(config_file).resolve().parent, poll_interval=poll,
                              max_range=max_range)
        if broker is None and store is None:
            for spec in chains:
                cp = Path(spec.checkpoint or ".")
                if spec.checkpoint and (cp.is_dir() or not cp.resolve().parent.is_dir()):
                    raise UsageError(f"chains.{spec.network}.checkpoint: {spec.checkpoint} is "
                                     "not a file in an existing directory")
        return IndexArgs(rpc="", contracts=(), abi=[], from_block=None, confirmations=2,
                         checkpoint="", chains=chains, **common)  # type: ignore[arg-type]

    rpc = check_rpc("--rpc", pick("rpc"))
    raw_contracts = pick("contract")
    if not raw_contracts:
        raise UsageError("--contract: required (one or more 0x addresses, comma-separated)")
    contracts: list[str] = []
    for item in raw_contracts.split(","):
        item = item.strip()
        if not is_address(item):
            raise UsageError(f"--contract: {item!r} is not a 0x address of 40 hex digits")
        if item.lower() not in contracts:
            contracts.append(item.lower())
    abi = _load_abi(pick("abi"))
    follow_raw, child_abi_path = pick("follow"), pick("child_abi")
    follow: Any = None
    if child_abi_path and not follow_raw:
        raise UsageError("--child-abi: only with --follow EVENT.ARG")
    if follow_raw:
        from fastws.indexer.mapping import Follow

        if child_abi_path:
            abi = abi + _load_abi(child_abi_path, "--child-abi")
        try:
            follow = Follow.parse(follow_raw, abi)
        except ValueError as exc:
            raise UsageError(f"--follow: {exc}") from None
    from_block = _int("--from-block", pick("from_block"), None, 0)
    confirmations = _int("--confirmations", pick("confirmations"), 2, 1)
    network = pick("network") or "default"
    from fastws.indexer.chains import NETWORK

    if not NETWORK.fullmatch(network):
        raise UsageError(f"--network: {network!r} is not letters, digits, _ . - (at most 64)")
    chain_id = _int("--chain-id", pick("chain_id"), None, 1)
    from fastws.indexer.templates import DEFAULT_CHANNELS, Channels, TemplateError

    raw_channels = pick("channels")
    try:
        channels = Channels([t.strip() for t in raw_channels.split(",")] if raw_channels
                            else DEFAULT_CHANNELS)
    except TemplateError as exc:
        raise UsageError(f"--channels: {exc}") from None
    identity = ",".join(sorted(contracts)) + (f"|follow={follow}" if follow else "")
    digest = hashlib.sha256(identity.encode()).hexdigest()[:12]
    checkpoint = pick("checkpoint")
    if store is not None:
        checkpoint = checkpoint or f"{network}:{digest}"
    elif broker is not None:
        checkpoint = checkpoint or f"fastws:indexer:{digest}"
    else:
        checkpoint = checkpoint or f".fastws-index-{digest}.json"
        cp_path = Path(checkpoint)
        if cp_path.is_dir() or not cp_path.resolve().parent.is_dir():
            raise UsageError(f"--checkpoint: {checkpoint} is not a file in an existing "
                             "directory")
    assert confirmations is not None
    return IndexArgs(rpc=rpc, contracts=tuple(contracts), abi=abi, from_block=from_block,
                     confirmations=confirmations, checkpoint=checkpoint, follow=follow,
                     network=network, chain_id=chain_id, channels=channels,
                     **common)  # type: ignore[arg-type]


async def _run(args: IndexArgs) -> int:
    from fastws.indexer.chains import run_chains

    return await run_chains(args, _say)


def _say(message: str) -> None:
    sys.stderr.write(f"{PROG}: {' '.join(message.split())}\n")


def main(argv: list[str] | None = None) -> int:
    """Run ``fastws index`` with ``argv``; returns the exit status (2: bad flag, or
    the ``chain`` extra is not installed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not {"-h", "--help"} & set(argv):
        try:
            require_chain(PROG, ("web3", "eth_abi", "eth_utils", "websockets"))
        except MissingExtra as exc:
            _say(exc.hint)
            return 2
    try:
        args = parse_args(argv)
    except UsageError as exc:
        _say(str(exc))
        return 2
    except SystemExit as exc:   # --help
        return int(exc.code or 0)
    if args.store is not None:
        try:
            require_chain(f"{PROG} --store", ("asyncpg",))
        except MissingExtra as exc:
            _say(exc.hint)
            return 2
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        return uvloop.run(_run(args))
    except KeyboardInterrupt:
        return 0
