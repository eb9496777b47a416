"""The kinds of fastws options: how a raw value is parsed and checked.

A kind (:class:`Kind`) turns a raw value into a checked, typed one.  ``text`` is True
when the raw value came as a string from the command line or the environment, False
when it came typed (TOML, or a Python caller).  A problem raises
``ValueError("must be ...")``, which :mod:`fastws.config` turns into a
:class:`~fastws.config.ConfigError` naming the option.  The ``check_*`` functions are
the further checks of string options (broker URLs, networks, origins, URLs, hosts).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

__all__ = [
    "BROKER_SCHEMES", "HOST", "TOKEN", "Bool", "Choice", "Int", "Kind", "List", "Seconds", "Str",
    "check_broker", "check_host", "check_http_url", "check_network", "check_origin", "got",
    "origin_key",
]

BROKER_SCHEMES = ("memory", "redis", "rediss", "redis+cluster", "redis+sentinel")


class Kind(Protocol):
    """What every kind has: a name for the documents, and ``parse``."""

    @property
    def type_name(self) -> str:
        """How the documents name the kind (``integer``, ``list of string``...)."""

    def parse(self, value: object, text: bool) -> Any:
        """The checked value; raises ValueError("must be ...") when it is not."""


def got(value: object) -> str:
    """A raw value as an error message shows it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


@dataclass(frozen=True, slots=True)
class Int:
    """An integer in ``lo``..``hi`` (``hi`` None: no upper bound)."""

    lo: int = 0
    hi: int | None = None
    zero_means: str = ""

    @property
    def expect(self) -> str:
        if self.hi is not None:
            return f"an integer {self.lo}-{self.hi}"
        if self.lo == 1:
            return "a positive integer"
        if self.lo == 0:
            return "a non-negative integer"
        return f"an integer >= {self.lo}"

    type_name = "integer"

    def parse(self, value: object, text: bool) -> int:
        raw = value
        if text and isinstance(value, str):
            try:
                value = int(value.strip().replace("_", ""), 10)
            except ValueError:
                raise ValueError(f"must be {self.expect}, got {got(raw)}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be {self.expect}, got {got(raw)}")
        if value < self.lo or (self.hi is not None and value > self.hi):
            raise ValueError(f"must be {self.expect}, got {got(raw)}")
        return value


@dataclass(frozen=True, slots=True)
class Seconds:
    """A finite number of seconds, > 0 (or >= 0 when not ``positive``), as a float."""

    positive: bool = True

    type_name = "seconds"

    @property
    def expect(self) -> str:
        return "a positive number of seconds" if self.positive else (
            "a non-negative number of seconds")

    def parse(self, value: object, text: bool) -> float:
        raw = value
        if text and isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ValueError(f"must be {self.expect}, got {got(raw)}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"must be {self.expect}, got {got(raw)}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"must be {self.expect}, got {got(raw)}")
        if value < 0 or (self.positive and value == 0):
            raise ValueError(f"must be {self.expect}, got {got(raw)}")
        return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True, slots=True)
class Bool:
    """true or false; from text also 1/yes/on and 0/no/off (and empty: false)."""

    type_name = "boolean"

    def parse(self, value: object, text: bool) -> bool:
        if text and isinstance(value, str):
            low = value.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
        if isinstance(value, bool):
            return value
        raise ValueError(f"must be true or false, got {got(value)}")


@dataclass(frozen=True, slots=True)
class Choice:
    """One of ``choices`` (any letter case; returned lower-case)."""

    choices: tuple[str, ...]

    @property
    def type_name(self) -> str:
        return "|".join(self.choices)

    def parse(self, value: object, text: bool) -> str:
        if isinstance(value, str) and value.strip().lower() in self.choices:
            return value.strip().lower()
        raise ValueError(f"must be one of {', '.join(self.choices)}, got {got(value)}")


@dataclass(frozen=True, slots=True)
class Str:
    """A non-empty string without whitespace, checked further by ``check``."""

    what: str = "a non-empty string without spaces"
    optional: bool = False
    check: Callable[[str], str] | None = None
    type_name: str = "string"

    def parse(self, value: object, text: bool) -> str | None:
        if self.optional and value is None:
            return None
        if not isinstance(value, str):
            raise ValueError(f"must be {self.what}, got {got(value)}")
        value = value.strip()
        if self.optional and value == "":
            return None
        if not value or any(c.isspace() for c in value):
            raise ValueError(f"must be {self.what}, got {got(value)}")
        return self.check(value) if self.check else value


@dataclass(frozen=True, slots=True)
class List:
    """A list: TOML array, repeated flag, or comma-separated environment value."""

    item: Kind

    @property
    def type_name(self) -> str:
        return f"list of {self.item.type_name}"

    def parse(self, value: object, text: bool) -> tuple[Any, ...]:
        if text and isinstance(value, str):
            items: Iterable[object] = [p for p in value.split(",") if p.strip()]
        elif isinstance(value, list | tuple):
            items = value
        else:
            raise ValueError(f"must be a list of {self.item.type_name}s, got {got(value)}")
        out = []
        for item in items:
            out.append(self.item.parse(item, text))
        return tuple(out)


def check_broker(url: str) -> str:
    """Accept ``memory://`` and the Redis URL forms of SPEC section 7."""
    expect = ("must be memory://, redis://host:port/db, rediss://…, "
              "redis+cluster://host:port[,…] or redis+sentinel://host:port[,…]/MASTER/db")
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in BROKER_SCHEMES:
        raise ValueError(f"{expect}, got {url!r}")
    if scheme == "memory":
        if rest.strip("/"):
            raise ValueError(f"memory:// takes no host or path, got {url!r}")
        return "memory://"
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    if not netloc:
        raise ValueError(f"{scheme}:// needs a host, got {url!r}")
    for hostport in netloc.split(","):
        host, port = hostport, ""
        if hostport.startswith("["):
            host, _, tail = hostport[1:].partition("]")
            port = tail[1:] if tail.startswith(":") else tail
        elif hostport.count(":") == 1:
            host, port = hostport.split(":")
        if not host or (port and not (port.isdigit() and 1 <= int(port) <= 65535)):
            raise ValueError(f"bad host:port {hostport!r} in {url!r}")
    path = [p for p in parts.path.split("/") if p]
    db_ok = lambda s: s.isdigit()  # noqa: E731
    if scheme == "redis+sentinel":
        if not 1 <= len(path) <= 2 or (len(path) == 2 and not db_ok(path[1])):
            raise ValueError(f"redis+sentinel:// needs /MASTER[/db] after the hosts, got {url!r}")
    elif scheme == "redis+cluster":
        if path:
            raise ValueError(f"redis+cluster:// takes no database path, got {url!r}")
    elif len(path) > 1 or (path and not db_ok(path[0])):
        raise ValueError(f"the path of {scheme}:// must be a database number, got {url!r}")
    elif "," in netloc:
        raise ValueError(f"{scheme}:// takes one host (use redis+cluster:// for more), "
                         f"got {url!r}")
    return url


def check_network(text: str) -> str:
    """An IP address or network (host bits allowed)."""
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"must be a list of IP addresses or networks, got {text!r}") from None
    return text


def origin_key(origin: str) -> str:
    """An origin as ``allow_origins`` holds it, and as a request's ``Origin`` header is
    compared with it: lower-case, without surrounding spaces or a trailing ``/``."""
    return origin.strip().rstrip("/").lower()


def check_origin(text: str) -> str:
    """``*`` or ``scheme://host[:port]``, returned as :func:`origin_key` writes it."""
    if text == "*":
        return text
    scheme, sep, host = text.partition("://")
    if not sep or not scheme or not host.rstrip("/") or "/" in host.rstrip("/"):
        raise ValueError(f"must be origins like https://example.com (or *), got {text!r}")
    return origin_key(text)


def check_http_url(text: str) -> str:
    """An http:// or https:// URL with a host and, if any, a valid port."""
    parts = urlsplit(text)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"must be an http:// or https:// URL, got {text!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    return text


def check_host(text: str) -> str:
    """A host name or IP address (at most 253 characters)."""
    if len(text) > 253:
        raise ValueError(f"must be a host name or IP address, got {text!r}")
    return text


HOST = Str("a host name or IP address", check=check_host)
TOKEN = Str("a non-empty string without spaces")
