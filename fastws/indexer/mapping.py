"""ABI decoding of contract logs into the JSON-safe data fastws publishes.

Sans I/O: raw logs in (as JSON-RPC returns them: hex strings, or the ints and
HexBytes some providers hand back), ``(channels, data)`` out.  JSON-safe means:

- integers as JSON integers while ``|n| <= 2**53 - 1`` (what JavaScript reads exactly),
  beyond that as decimal strings;
- ``bytes``/``bytesN`` and hashes as ``0x`` lowercase hex, addresses as ``0x`` lowercase
  hex (like the ``market:`` and ``wallet:`` channel names);
- ``fixed``/``ufixed`` as decimal strings, structs as objects keyed by component name,
  arrays as lists; an indexed dynamic value (``string``, ``bytes``, arrays, structs) is
  only its keccak hash in the topic, so it is given as that ``0x`` hash.

Argument names are kept as the ABI spells them; event names become channel names in
snake_case (``MarketCreated`` → ``events:market_created``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from eth_abi import decode as abi_decode
from eth_utils import keccak

from fastws.channels import is_address

__all__ = [
    "MAX_SAFE_INTEGER",
    "EventCodec",
    "EventSpec",
    "Follow",
    "RawLog",
    "event_data",
    "json_safe",
    "normalize_log",
    "quantity",
    "snake_case",
    "to_hex",
]

MAX_SAFE_INTEGER = 2**53 - 1
_SNAKE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
_ARRAY = re.compile(r"^(.*)\[(\d*)\]$")


def snake_case(name: str) -> str:
    """``MarketCreated`` → ``market_created``, ``NFTMinted`` → ``nft_minted``."""
    return _SNAKE.sub("_", name).lower()


def quantity(value: Any) -> int:
    """A JSON-RPC quantity (``"0x1a"``, or an int some providers return) as an int."""
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return int(value, 16)
    raise TypeError(f"not a quantity: {value!r}")


def to_hex(value: Any) -> str:
    """Bytes, HexBytes or a hex string as lowercase ``0x`` hex."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "0x" + bytes(value).hex()
    if isinstance(value, str):
        v = value.lower()
        return v if v.startswith("0x") else "0x" + v
    raise TypeError(f"not hex data: {value!r}")


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    v = value[2:] if value.startswith(("0x", "0X")) else value
    return bytes.fromhex(v)


# --------------------------------------------------------------------------- ABI types


def _canonical(param: Mapping[str, Any]) -> str:
    """The canonical type of an ABI parameter: tuples spelled out as ``(a,b)[]``."""
    typ = param["type"]
    if typ.startswith("tuple"):
        inner = ",".join(_canonical(c) for c in param.get("components", ()))
        return f"({inner}){typ[len('tuple'):]}"
    return typ


def _is_dynamic(param: Mapping[str, Any]) -> bool:
    """Whether an indexed value of this type is stored as its hash in the topic."""
    typ = param["type"]
    return typ in ("string", "bytes") or typ.endswith("]") or typ.startswith("tuple")


def json_safe(value: Any, param: Mapping[str, Any]) -> Any:
    """Convert one decoded ABI value of parameter ``param`` to JSON-safe data."""
    typ = param["type"]
    m = _ARRAY.match(typ)
    if m:
        inner = dict(param, type=m.group(1))
        return [json_safe(v, inner) for v in value]
    if typ == "tuple":
        comps = param.get("components", ())
        if comps and all(c.get("name") for c in comps):
            return {c["name"]: json_safe(v, c) for c, v in zip(comps, value, strict=True)}
        return [json_safe(v, c) for c, v in zip(comps, value, strict=True)]
    if typ == "address":
        return value.lower()
    return _scalar(value)


def _scalar(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER else str(value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "0x" + bytes(value).hex()
    if isinstance(value, Decimal):
        return str(value)
    return value


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class EventSpec:
    """One non-anonymous event of an ABI, ready to decode its logs."""

    name: str
    channel_name: str
    signature: str
    topic0: str
    indexed: tuple[Mapping[str, Any], ...]
    plain: tuple[Mapping[str, Any], ...]
    plain_types: tuple[str, ...]
    order: tuple[tuple[bool, int], ...]   # (is_indexed, position) per input, in ABI order

    @classmethod
    def from_abi(cls, item: Mapping[str, Any]) -> EventSpec:
        """Build from an ABI entry of ``"type": "event"``."""
        inputs = list(item.get("inputs", ()))
        signature = f"{item['name']}({','.join(_canonical(p) for p in inputs)})"
        indexed = tuple(p for p in inputs if p.get("indexed"))
        plain = tuple(p for p in inputs if not p.get("indexed"))
        order: list[tuple[bool, int]] = []
        ni = npl = 0
        for p in inputs:
            if p.get("indexed"):
                order.append((True, ni))
                ni += 1
            else:
                order.append((False, npl))
                npl += 1
        return cls(
            name=item["name"], channel_name=snake_case(item["name"]), signature=signature,
            topic0="0x" + keccak(text=signature).hex(), indexed=indexed, plain=plain,
            plain_types=tuple(_canonical(p) for p in plain), order=tuple(order),
        )

    def decode(self, topics: Sequence[bytes], data: bytes) -> dict[str, Any]:
        """Decoded JSON-safe arguments by name (``arg<i>`` for unnamed ones)."""
        if len(topics) != 1 + len(self.indexed):
            raise ValueError(f"{self.signature}: {len(topics)} topics for "
                             f"{len(self.indexed)} indexed inputs")
        plain_values = abi_decode(list(self.plain_types), data) if self.plain else ()
        args: dict[str, Any] = {}
        for i, (is_indexed, pos) in enumerate(self.order):
            if is_indexed:
                param = self.indexed[pos]
                topic = topics[1 + pos]
                if _is_dynamic(param):
                    value: Any = "0x" + topic.hex()
                else:
                    value = json_safe(abi_decode([_canonical(param)], topic)[0], param)
            else:
                param = self.plain[pos]
                value = json_safe(plain_values[pos], param)
            args[param.get("name") or f"arg{i}"] = value
        return args


class EventCodec:
    """Decodes the logs of one ABI: topic0 → :class:`EventSpec`."""

    def __init__(self, abi: Iterable[Mapping[str, Any]]) -> None:
        self.events: dict[str, EventSpec] = {}
        for item in abi:
            if item.get("type") == "event" and not item.get("anonymous"):
                spec = EventSpec.from_abi(item)
                self.events[spec.topic0] = spec

    def __len__(self) -> int:
        return len(self.events)

    def spec_for(self, log: RawLog) -> EventSpec | None:
        """The event a log belongs to, or None (anonymous, or not in the ABI)."""
        return self.events.get(log.topics[0]) if log.topics else None


@dataclass(frozen=True, slots=True)
class RawLog:
    """One log as the indexer needs it, normalized to ints and lowercase hex."""

    address: str
    block_number: int
    block_hash: str
    tx_hash: str
    log_index: int
    topics: tuple[str, ...]
    data: str
    removed: bool = False

    @property
    def uid(self) -> str:
        """``txHash:logIndex``, the log's identity and idempotency key."""
        return f"{self.tx_hash}:{self.log_index}"


def normalize_log(log: Mapping[str, Any]) -> RawLog:
    """A JSON-RPC log object (any provider's flavour) as a :class:`RawLog`."""
    return RawLog(
        address=to_hex(log["address"]),
        block_number=quantity(log["blockNumber"]),
        block_hash=to_hex(log["blockHash"]),
        tx_hash=to_hex(log["transactionHash"]),
        log_index=quantity(log["logIndex"]),
        topics=tuple(to_hex(t) for t in log.get("topics", ())),
        data=to_hex(log.get("data") or "0x"),
        removed=bool(log.get("removed", False)),
    )


def event_data(spec: EventSpec, log: RawLog, timestamp: int) -> dict[str, Any]:
    """The published data: ``{eventType, marketAddress, blockNumber, blockHash, txHash,
    logIndex, timestamp, args}``."""
    args = spec.decode([_to_bytes(t) for t in log.topics], _to_bytes(log.data))
    return {
        "eventType": spec.name,
        "marketAddress": log.address,
        "blockNumber": log.block_number,
        "blockHash": log.block_hash,
        "txHash": log.tx_hash,
        "logIndex": log.log_index,
        "timestamp": timestamp,
        "args": args,
    }


@dataclass(frozen=True, slots=True)
class Follow:
    """``--follow EVENT.ARG``: an event whose ``address`` argument names a contract
    created at run time (a factory's), whose logs are indexed from then on."""

    event: str
    arg: str

    def __str__(self) -> str:
        return f"{self.event}.{self.arg}"

    @classmethod
    def parse(cls, text: str, abi: Iterable[Mapping[str, Any]]) -> Follow:
        """Check ``EVENT.ARG`` against ``abi``; raises ValueError saying what is wrong."""
        event, dot, arg = text.strip().partition(".")
        if not dot or not event or not arg or "." in arg:
            raise ValueError(f"{text!r} is not EVENT.ARG (an event and its address argument)")
        entries = [i for i in abi if i.get("type") == "event" and i.get("name") == event
                   and not i.get("anonymous")]
        if not entries:
            raise ValueError(f"no event {event} in the ABI")
        for entry in entries:
            for param in entry.get("inputs", ()):
                if param.get("name") == arg:
                    if param.get("type") != "address":
                        raise ValueError(f"{event}.{arg} is a {param.get('type')}, "
                                         "not an address")
                    return cls(event, arg)
        names = ", ".join(p.get("name") or "?" for p in entries[0].get("inputs", ()))
        raise ValueError(f"event {event} has no argument {arg} (its arguments: {names})")

    def child(self, spec: EventSpec, log: RawLog) -> str | None:
        """The contract ``log`` names, lowercase, if it is this event (else None)."""
        if spec.name != self.event:
            return None
        try:
            value = spec.decode([_to_bytes(t) for t in log.topics], _to_bytes(log.data))
        except Exception:  # noqa: BLE001 - a log that does not decode names nothing
            return None
        address = value.get(self.arg)
        if not isinstance(address, str) or not is_address(address) \
                or address != address.lower() or address == "0x" + "00" * 20:
            return None
        return address
