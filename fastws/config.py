"""fastws configuration: one frozen, typed structure and the code that fills it.

Every option is a dataclass field whose ``metadata`` holds its documentation, its
kind (how a value is parsed and checked), its command-line flag and its environment
variables. The command line (``fastws.cli``), the ``FASTWS_*`` environment, the TOML
file, ``docs/configuration.md`` and ``fastws.example.toml`` all come from these fields.
The kinds live in :mod:`fastws.config_kinds`, the document generators in
:mod:`fastws.config_docs`:

    python -m fastws.config_docs --markdown      > docs/configuration.md
    python -m fastws.config_docs --example-toml  > fastws.example.toml

Precedence, per key: flag > ``FASTWS_<NAME>`` environment > config file > default.
Any unknown key or bad value raises :class:`ConfigError`, whose message is one line
naming the option (``--port``, ``FASTWS_PORT``, ``server.port``, ...).

Typical use::

    config = load_config({"port": "9000"}, os.environ)   # at start-up
    ns = config.namespace("chat:room1")                   # rules for a channel
    config = reload(config)                               # on SIGHUP
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastws import channels
from fastws.channels import OWNER_NAMESPACES
from fastws.codes import Close
from fastws.config_kinds import (
    BROKER_SCHEMES,
    HOST,
    TOKEN,
    Bool,
    Choice,
    Int,
    Kind,
    List,
    Seconds,
    Str,
    check_broker,
    check_http_url,
    check_network,
    check_origin,
    got,
)

__all__ = [
    "BROKER_SCHEMES",
    "DEFAULT_NAMESPACE",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "OWNER_NAMESPACES",
    "PERMISSIONS",
    "READ_PERMISSIONS",
    "Config",
    "ConfigError",
    "LimitsConfig",
    "NamespaceConfig",
    "ProxyConfig",
    "SUBSCRIBE_PERMISSIONS",
    "ServerConfig",
    "default_of",
    "env_names",
    "flag_name",
    "load_config",
    "reload",
]

ENV_PREFIX = "FASTWS_"
DEFAULT_NAMESPACE = "*"
PERMISSIONS = ("anyone", "authenticated", "owner", "api")
READ_PERMISSIONS = ("subscriber", *PERMISSIONS)
# subscribe and publish may also ask the application's backend ([proxy] subscribe/publish)
SUBSCRIBE_PERMISSIONS = (*PERMISSIONS, "proxy")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")

# A namespace name: printable ASCII without space, ':' or glob characters.
_NAMESPACE_RE = re.compile(r"^[!-~]{1,255}$")
_NAMESPACE_FORBIDDEN = channels.PATTERN_CHARS | {":", "]"}


class ConfigError(ValueError):
    """A bad option: ``str(err)`` is one line, ``"<option>: <what is wrong>"``.

    ``option`` is the name the user wrote (``--port``, ``FASTWS_PORT``,
    ``limits.max_subscriptions``); the CLI prints the message and exits 2.
    """

    def __init__(self, option: str, problem: str) -> None:
        self.option = option
        self.problem = " ".join(problem.split())
        super().__init__(f"{option}: {self.problem}" if option else self.problem)


# --------------------------------------------------------------------------- fields


def _opt(default: Any, doc: str, kind: Kind, *, flag: str | None = "",
         env: tuple[str, ...] | None = None, file: bool = True, reload: bool = True,
         unit: str = "") -> Any:
    """Declare one option: its default, documentation and how it is read.

    ``flag`` "" derives ``--name-with-dashes`` (for ``[server]``); None means no flag.
    ``env`` None derives ``FASTWS_<FLAG>`` (and ``FASTWS_<NAME>`` when different).
    ``file`` False keeps the key out of the TOML file; ``reload`` False keeps the
    running value on SIGHUP.
    """
    meta = {"doc": doc, "kind": kind, "flag": flag, "env": env, "file": file,
            "reload": reload, "unit": unit}
    if isinstance(default, tuple | list):
        frozen = tuple(default)
        return field(default_factory=lambda: frozen, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """``[server]``: the command-line options, under their own names, plus timers."""

    host: str = _opt("127.0.0.1", "Address to listen on.", HOST, reload=False)
    port: int = _opt(8765, "TCP port to listen on (WebSocket, HTTP API, metrics: one port).",
                     Int(1, 65535), reload=False)
    workers: int = _opt(1, "Worker processes sharing the port. More than 1 needs a shared "
                        "broker (redis://…).", Int(1, 1024), reload=False)
    config: str | None = _opt(None, "Path of the TOML config file (only as a flag or "
                              "environment variable).", Str("a file path", optional=True),
                              file=False, reload=False)
    broker: str = _opt("memory://", "Broker URL: memory:// (one process), redis://host:port/db, "
                       "rediss://…, redis+cluster://host:port[,host:port…], "
                       "redis+sentinel://host:port[,…]/MASTER/db.",
                       Str("a broker URL", check=check_broker), reload=False)
    api_keys: tuple[str, ...] = _opt((), "API keys accepted as `Authorization: Bearer` by "
                                     "POST /api/publish. Flag repeatable; environment "
                                     "comma-separated.", List(TOKEN), flag="--api-key")
    jwt_secret: str | None = _opt(None, "HMAC secret (HS256) verifying client JWTs and signing "
                                  "SIWE tokens.", Str("a secret without spaces",
                                                      optional=True))
    jwt_public_key: str | None = _opt(None, "PEM public key or certificate, or a JWKS file, "
                                      "verifying client JWTs (RS/PS/ES/EdDSA); exclusive with "
                                      "jwt_secret.",
                                      Str("a file path", optional=True))
    allow_origins: tuple[str, ...] = _opt((), "Origins allowed to open WebSockets (browser "
                                          "`Origin` header); empty = any. Others are closed "
                                          f"with {Close.ORIGIN_NOT_ALLOWED}. Also the origins "
                                          "whose pages may call /auth/nonce and /auth/siwe "
                                          "(CORS): empty = none, `*` = any.",
                                          List(Str("an origin", check=check_origin)),
                                          flag="--allow-origin")
    demo: bool = _opt(False, "Run the embedded demo chain feeding live events.", Bool(),
                      reload=False)
    echo: bool = _opt(False, "Plain WebSocket echo server (text and binary, up to 16 MiB) for "
                      "protocol-conformance testing.", Bool(), reload=False)
    log_level: str = _opt("info", "Logging level.", Choice(LOG_LEVELS))
    log_format: str = _opt("text", "Log line format.", Choice(LOG_FORMATS))
    ping_interval: float = _opt(25.0, "Seconds between server WebSocket pings.", Seconds(),
                                unit="s")
    pong_timeout: float = _opt(10.0, "A connection silent for ping_interval + pong_timeout "
                               "seconds is closed.", Seconds(), unit="s")
    drain_timeout: float = _opt(30.0, "Seconds from SIGTERM to exit; disconnects are spread "
                                f"over this window (code {Close.DRAINING}).",
                                Seconds(positive=False), unit="s")
    trusted_proxies: tuple[str, ...] = _opt(("127.0.0.1/8", "::1"),
                                            "Peers (IP or network) whose last X-Forwarded-For "
                                            "hop is taken as the client IP.",
                                            List(Str("an IP network", check=check_network)),
                                            flag="--trusted-proxy")
    compression: bool = _opt(True, "Accept permessage-deflate (RFC 7692) offers: each "
                             "publication is compressed once for every receiver that "
                             "negotiated it.", Bool())
    compression_min_size: int = _opt(512, "Messages shorter than this go out uncompressed.",
                                     Int(0, 1 << 30), unit="bytes")
    read_buffer_size: int = _opt(2048, "Initial read buffer per connection (picows), bytes.",
                                 Int(64, 16 * 1024 * 1024), reload=False, unit="bytes")
    siwe_domains: tuple[str, ...] = _opt((), "Domains accepted in Sign-In with Ethereum "
                                         "messages besides the request's Host; empty = the "
                                         "server's host only.", List(TOKEN),
                                         flag="--siwe-domain")
    siwe_chain_ids: tuple[int, ...] = _opt((), "Chain ids accepted in SIWE messages; "
                                           "empty = any.", List(Int(1)),
                                           flag="--siwe-chain-id")
    siwe_rpc_url: str | None = _opt(None, "JSON-RPC endpoint (http:// or https://) of the "
                                    "chain whose contract wallets may sign in with SIWE "
                                    "(EIP-1271 isValidSignature, for messages naming that "
                                    "chain's id); unset = only signatures by the address's "
                                    "own key.", Str("an http:// or https:// URL",
                                                    optional=True, check=check_http_url))
    siwe_rpc_timeout: float = _opt(5.0, "Seconds one EIP-1271 check may take in all (chain "
                                   "id, code, call); past it the sign-in gets 503.",
                                   Seconds(), unit="s")
    revocation_ttl: float = _opt(86400.0, "Seconds a POST /api/revoke record is kept when "
                                 "the request gives no ttl (1 s to 366 days): set it to the "
                                 "longest lifetime of the tokens you accept (SIWE tokens live "
                                 "3600 s), so that a revoked token expires before its record.",
                                 Seconds(), unit="s")
    lifecycle_stream: bool = _opt(False, "Append a `connect` and a `disconnect` record of "
                                  "every connection to the Redis stream fastws:lifecycle "
                                  "(docs/protocol.md section 12); needs a Redis broker.",
                                  Bool(), reload=False)

    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """``trusted_proxies`` parsed (host bits ignored), for client-IP checks."""
        return tuple(ipaddress.ip_network(p, strict=False) for p in self.trusted_proxies)


def _limit(default: Any, doc: str, kind: Kind, unit: str = "") -> Any:
    return _opt(default, doc, kind, flag=None, env=(), unit=unit)


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """``[limits]``: per message, connection, client IP and process. Limits hold per node."""

    max_message_size: int = _limit(65536, "Largest message accepted, bytes; above it the "
                                   f"connection is closed with {Close.TOO_BIG}.", Int(1), "bytes")
    max_channel_length: int = _limit(255, "Longest channel name or pattern, bytes.",
                                     Int(1, 65535), "bytes")
    max_subscriptions: int = _limit(256, "Subscriptions per connection.", Int(1))
    messages_per_connection: int = _limit(200, "Messages per connection per messages_window; "
                                          f"then error 429, and {Close.RATE_LIMITED} if it "
                                          "persists.", Int(1))
    messages_window: float = _limit(10.0, "Window of messages_per_connection, seconds.",
                                    Seconds(), "s")
    connections_per_ip: int = _limit(50, "New connections per client IP per "
                                     "connections_per_ip_window; then HTTP 429 or close "
                                     f"{Close.RATE_LIMITED}.", Int(1))
    connections_per_ip_window: float = _limit(10.0, "Window of connections_per_ip, seconds.",
                                              Seconds(), "s")
    subscribes_per_connection: int = _limit(0, "Subscribe requests per connection per "
                                            "subscribes_window; 0 = no limit.", Int(0))
    subscribes_window: float = _limit(3600.0, "Window of subscribes_per_connection, "
                                      "seconds.", Seconds(), "s")
    requests_per_ip_per_s: int = _limit(0, "HTTP requests (not upgrades) per client IP per "
                                        "second; 0 = no limit.", Int(0))
    max_connections: int = _limit(0, "Open connections per process; 0 = as many as file "
                                  f"descriptors allow. Above it: close {Close.CONNECTION_LIMIT}.",
                                  Int(0))
    send_buffer: int = _limit(1048576, "Bytes queued in the server for one connection; past "
                              f"it the connection is closed with {Close.SLOW_CONSUMER} (slow "
                              "consumer).", Int(1), "bytes")


@dataclass(frozen=True, slots=True)
class NamespaceConfig:
    """``[namespaces."*"]`` and ``[namespaces.NAME]``: rules for the channels ``NAME:…``."""

    history_size: int = _limit(100, "Publications kept per channel (0 = no history).", Int(0))
    history_ttl: float = _limit(300.0, "Seconds a channel's history is kept after its last "
                                "publication.", Seconds(), "s")
    presence: bool = _limit(False, "Join/leave pushes and presence requests.", Bool())
    subscribe: str = _limit("anyone", "Who may subscribe: anyone | authenticated | owner "
                            "(token `sub` equals the rest of the name) | api (nobody) | "
                            "proxy (the backend of `[proxy] subscribe` decides).",
                            Choice(SUBSCRIBE_PERMISSIONS))
    publish: str = _limit("api", "Who may publish from a WebSocket: anyone | authenticated | "
                          "owner | api (only the HTTP API, the CLI, the indexer and Redis) | "
                          "proxy (the backend of `[proxy] publish` decides, and may rewrite "
                          "the data).", Choice(SUBSCRIBE_PERMISSIONS))
    history_access: str = _limit("subscriber", "Who may request history: subscriber (whoever "
                                 "may subscribe) | anyone | authenticated | owner | api.",
                                 Choice(READ_PERMISSIONS))
    presence_access: str = _limit("subscriber", "Who may request presence: subscriber | "
                                  "anyone | authenticated | owner | api.",
                                  Choice(READ_PERMISSIONS))
    stream: bool = _limit(False, "Append every accepted publication to the Redis stream "
                          "fastws:stream:NAME before it is acknowledged (ingest for "
                          "workers reading with XREADGROUP); needs a Redis broker.", Bool())
    stream_maxlen: int = _limit(1000000, "Approximate length the namespace's stream is "
                                "trimmed to (XADD MAXLEN ~).", Int(1))

    @property
    def private(self) -> bool:
        """True when ``subscribe`` is ``owner``, ``api`` or ``proxy``: each subscriber
        passed its own check, so publications reach exact subscribers only (no pattern,
        no namespace log)."""
        return self.subscribe in ("owner", "api", "proxy")


def _proxy(default: Any, doc: str, kind: Kind, unit: str = "") -> Any:
    return _opt(default, doc, kind, flag=None, env=(), unit=unit)


_URL = Str("an http:// or https:// URL", optional=True, check=check_http_url)


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """``[proxy]``: HTTP endpoints of the application's backend (docs/protocol.md §11)."""

    connect: str | None = _proxy(None, "URL asked to accept each connection without a valid "
                                 "JWT (WebSocket upgrade, /sse, /poll, /call) before it is "
                                 "accepted; unset = no connect proxy.", _URL)
    subscribe: str | None = _proxy(None, "URL asked for each subscribe to a namespace with "
                                   '`subscribe = "proxy"`.', _URL)
    publish: str | None = _proxy(None, "URL asked for each client publish to a namespace "
                                 'with `publish = "proxy"` (it may rewrite the data).', _URL)
    rpc: str | None = _proxy(None, "URL answering `rpc` requests; unset = error 404 "
                             '"unknown method".', _URL)
    timeout: float = _proxy(3.0, "Seconds a backend call may take; past it the call is "
                            "abandoned (connect: HTTP 503, subscribe/publish/rpc: error 504).",
                            Seconds(), "s")
    headers: tuple[str, ...] = _proxy(("Authorization", "Cookie"), "Request headers of the "
                                      "client forwarded to the backend (case-insensitive); "
                                      "no other header is.", List(TOKEN))
    max_in_flight: int = _proxy(8, "Outstanding backend calls per connection; one more is "
                                "answered error 429 at once.", Int(1))

    def url(self, kind: str) -> str | None:
        """The URL of ``kind`` (connect, subscribe, publish, rpc), None when unset."""
        return getattr(self, kind)


def _builtin_namespaces(star: NamespaceConfig) -> dict[str, NamespaceConfig]:
    """The namespaces that exist without a table: ``*``, and owner ``user``/``wallet``."""
    out = {DEFAULT_NAMESPACE: star}
    for name in OWNER_NAMESPACES:
        out[name] = dataclasses.replace(star, subscribe="owner")
    return out


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where a Config came from, so that :func:`reload` can read it again."""

    flags: Mapping[str, object] = field(default_factory=dict)
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Config:
    """The whole configuration: ``server``, ``limits`` and resolved ``namespaces``.

    ``namespaces`` maps each namespace name to its fully resolved rules (each table
    applied key by key over ``"*"``); it always holds ``"*"``, ``"user"`` and
    ``"wallet"``. Use :meth:`namespace` or :meth:`for_channel` to look rules up.
    """

    server: ServerConfig = field(default_factory=ServerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    namespaces: Mapping[str, NamespaceConfig] = field(
        default_factory=lambda: _builtin_namespaces(NamespaceConfig()))
    origin: _Origin = field(default_factory=_Origin, repr=False, compare=False)

    def __post_init__(self) -> None:
        spaces = dict(self.namespaces)
        star = spaces.setdefault(DEFAULT_NAMESPACE, NamespaceConfig())
        for name, rules in _builtin_namespaces(star).items():
            spaces.setdefault(name, rules)
        object.__setattr__(self, "namespaces", types.MappingProxyType(spaces))

    def namespace(self, name: str) -> NamespaceConfig:
        """Rules for a namespace name (``"chat"``) or a channel/pattern (``"chat:room"``).

        A name holding ``:`` is a channel (:meth:`for_channel`); a namespace without a
        table (and ``""``) gets the ``"*"`` rules.
        """
        if ":" in name:
            return self.for_channel(name)
        return self.namespaces.get(name) or self.namespaces[DEFAULT_NAMESPACE]

    def for_channel(self, channel: str) -> NamespaceConfig:
        """Rules for a channel or pattern: its namespace's
        (:func:`fastws.channels.namespace_of`), the ``"*"`` rules when it has none."""
        return (self.namespaces.get(channels.namespace_of(channel))
                or self.namespaces[DEFAULT_NAMESPACE])


# --------------------------------------------------------------------------- loading


def flag_name(f: dataclasses.Field) -> str | None:
    """The command-line flag of an option field (``--name-with-dashes`` unless its
    metadata names one), or None when it has none."""
    flag = f.metadata["flag"]
    if flag == "":
        return "--" + f.name.replace("_", "-")
    return flag


def env_names(f: dataclasses.Field) -> tuple[str, ...]:
    """The environment variables of an option field: ``FASTWS_<FLAG>`` and, when it
    differs, ``FASTWS_<NAME>`` (unless its metadata names them; empty: none)."""
    env = f.metadata["env"]
    if env is not None:
        return env
    names = []
    flag = flag_name(f)
    if flag:
        names.append(ENV_PREFIX + flag[2:].replace("-", "_").upper())
    names.append(ENV_PREFIX + f.name.upper())
    return tuple(dict.fromkeys(names))


def default_of(f: dataclasses.Field) -> Any:
    """The default value of an option field."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


_SERVER_FIELDS = {f.name: f for f in dataclasses.fields(ServerConfig)}
_LIMIT_FIELDS = {f.name: f for f in dataclasses.fields(LimitsConfig)}
_NS_FIELDS = {f.name: f for f in dataclasses.fields(NamespaceConfig)}
_PROXY_FIELDS = {f.name: f for f in dataclasses.fields(ProxyConfig)}


def _parse(f: dataclasses.Field, value: object, text: bool, label: str) -> Any:
    try:
        return f.metadata["kind"].parse(value, text)
    except ValueError as exc:
        raise ConfigError(label, str(exc)) from None


def _table(value: object, label: str) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise ConfigError(label, f"must be a table, got {got(value)}")
    return value


def _read_file(path: str, label: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(label, f"cannot read {path!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, f"invalid TOML: {exc}") from None


def _section(data: Mapping[str, object], name: str,
             fields_: Mapping[str, dataclasses.Field], prefix: str) -> dict[str, Any]:
    """Check one TOML table against ``fields_``; returns {name: parsed value}."""
    out = {}
    for key, value in _table(data, prefix.rstrip(".") or name).items():
        f = fields_.get(key)
        label = f"{prefix}{key}"
        if f is None or not f.metadata["file"]:
            raise ConfigError(label, "unknown key")
        out[key] = (_parse(f, value, False, label), label)
    return out


def _check_namespace_name(name: str) -> None:
    if name == DEFAULT_NAMESPACE:
        return
    if not _NAMESPACE_RE.match(name) or _NAMESPACE_FORBIDDEN & set(name):
        raise ConfigError(f'namespaces."{name}"', "a namespace name is 1-255 printable ASCII "
                          "characters without space, ':', '*', '?', '[', ']' or '\\'")


@dataclass(slots=True)
class _Resolved:
    """Values collected from every source, before the cross-field checks."""

    server: dict[str, tuple[Any, str]]
    limits: dict[str, tuple[Any, str]]
    namespaces: dict[str, dict[str, tuple[Any, str]]]
    proxy: dict[str, tuple[Any, str]] = field(default_factory=dict)


def _collect(flags: Mapping[str, object], env: Mapping[str, str]) -> _Resolved:
    for key in flags:
        if key not in _SERVER_FIELDS:
            raise ConfigError(f"--{key.replace('_', '-')}", "unknown option")

    def from_flags_env(name: str) -> tuple[Any, str] | None:
        f = _SERVER_FIELDS[name]
        value = flags.get(name)
        if value is not None and value != [] and value != ():
            label = flag_name(f) or name
            return _parse(f, value, isinstance(value, str) or (
                isinstance(value, list | tuple) and all(isinstance(v, str) for v in value)),
                label), label
        for var in env_names(f):
            text = env.get(var)
            if text is not None and text.strip() != "":
                return _parse(f, text, True, var), var
        return None

    # The config file path itself: flag > environment.
    found = from_flags_env("config")
    path, path_label = found if found else (None, "")
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_file(path, path_label)

    for section in data:
        if section in ("chains", "store"):    # fastws index's (SPEC §14): not the server's
            continue
        if section not in ("server", "limits", "proxy", "namespaces"):
            raise ConfigError(f"[{section}]", "unknown section (expected [server], [limits], "
                              "[proxy], [namespaces.NAME])")

    server = _section(data.get("server", {}), "server", _SERVER_FIELDS, "server.")
    if path is not None and "jwt_public_key" in server:
        # A relative key path in the file is relative to the file.
        key_path, label = server["jwt_public_key"]
        if key_path is not None:
            server["jwt_public_key"] = (str(Path(path).parent / key_path), label)
    for name in _SERVER_FIELDS:
        found = from_flags_env(name)
        if found is not None:
            server[name] = found
    if path is not None:
        server["config"] = (path, path_label)

    limits = _section(data.get("limits", {}), "limits", _LIMIT_FIELDS, "limits.")

    spaces: dict[str, dict[str, tuple[Any, str]]] = {}
    for name, table in _table(data.get("namespaces", {}), "namespaces").items():
        _check_namespace_name(name)
        shown = f'"{name}"' if name == DEFAULT_NAMESPACE else name
        spaces[name] = _section(table, f"namespaces.{shown}", _NS_FIELDS,
                                f"namespaces.{shown}.")
    proxy = _proxy_section(data.get("proxy", {}))
    return _Resolved(server, limits, spaces, proxy)


def _proxy_section(table: object) -> dict[str, tuple[Any, str]]:
    """``[proxy]``: every unknown key is named in one start-up error."""
    unknown = sorted(k for k in _table(table, "proxy") if k not in _PROXY_FIELDS)
    if unknown:
        raise ConfigError("[proxy]", "unknown key" + ("s " if len(unknown) > 1 else " ")
                          + ", ".join(unknown) + " (expected " + ", ".join(_PROXY_FIELDS)
                          + ")")
    return _section(table, "proxy", _PROXY_FIELDS, "proxy.")


def _finish(res: _Resolved, origin: _Origin) -> Config:
    """Cross-field checks, namespace resolution and the frozen result."""
    srv = {k: v for k, (v, _) in res.server.items()}
    label = {k: lbl for k, (_, lbl) in res.server.items()}
    server = ServerConfig(**srv)

    if not 1 <= server.revocation_ttl <= 366 * 86400:
        raise ConfigError(label.get("revocation_ttl", "revocation_ttl"),
                          f"must be 1 to {366 * 86400} seconds (366 days), got "
                          f"{server.revocation_ttl:g}")
    if server.workers > 1 and server.broker == "memory://":
        raise ConfigError(label.get("workers", "workers"),
                          f"{server.workers} workers need a shared broker "
                          "(--broker redis://host:port); memory:// serves one process")
    if server.jwt_secret is not None and server.jwt_public_key is not None:
        raise ConfigError(label.get("jwt_public_key", "jwt_public_key"),
                          "give either a JWT secret or a public key, not both")
    if server.jwt_public_key is not None:
        key_path = server.jwt_public_key
        try:
            with open(key_path, "rb") as fh:
                head = fh.read(4096)
        except OSError as exc:
            raise ConfigError(label["jwt_public_key"],
                              f"cannot read {key_path!r}: {exc.strerror or exc}") from None
        if b"-----BEGIN" not in head and not head.lstrip().startswith(b"{"):
            raise ConfigError(label["jwt_public_key"],
                              f"{key_path!r} is neither a PEM file nor a JWKS (JSON) file")

    limits = LimitsConfig(**{k: v for k, (v, _) in res.limits.items()})

    star_values = {k: v for k, (v, _) in res.namespaces.get(DEFAULT_NAMESPACE, {}).items()}
    star = NamespaceConfig(**star_values)
    spaces = _builtin_namespaces(star)
    for name, values in res.namespaces.items():
        if name == DEFAULT_NAMESPACE:
            continue
        base = spaces.get(name, star)
        spaces[name] = dataclasses.replace(base, **{k: v for k, (v, _) in values.items()})
    proxy = ProxyConfig(**{k: v for k, (v, _) in res.proxy.items()})
    _check_backend(server, label, proxy, res.proxy, spaces)
    return Config(server=server, limits=limits, proxy=proxy, namespaces=spaces, origin=origin)


def _check_backend(server: ServerConfig, label: Mapping[str, str], proxy: ProxyConfig,
                   proxy_labels: Mapping[str, tuple[Any, str]],
                   spaces: Mapping[str, NamespaceConfig]) -> None:
    """Streams need Redis; a ``"proxy"`` permission needs its ``[proxy]`` URL."""
    scheme = server.broker.partition("://")[0].lower()
    streamed = sorted(n for n, ns in spaces.items() if ns.stream)
    if scheme == "memory" and server.lifecycle_stream:
        raise ConfigError(label.get("lifecycle_stream", "server.lifecycle_stream"),
                          "the lifecycle stream needs a Redis broker (--broker "
                          "redis://host:port); memory:// keeps no streams")
    if scheme == "memory" and streamed:
        raise ConfigError(f"namespaces.{streamed[0]}.stream", "a stream namespace needs a "
                          "Redis broker (--broker redis://host:port); memory:// keeps no "
                          "streams")
    for name, ns in spaces.items():
        for what in ("subscribe", "publish"):
            if getattr(ns, what) == "proxy" and proxy.url(what) is None:
                raise ConfigError(f"namespaces.{name}.{what}", f'"proxy" needs [proxy] {what} '
                                  "(the backend's URL)")


def load_config(flags: Mapping[str, object] | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """Build the Config from command-line flags, the environment and the config file.

    ``flags`` maps :class:`ServerConfig` field names to values; ``None`` (or an empty
    list) means "not given". Strings are parsed as on the command line (``"8765"``),
    other values must already have the field's type. ``env`` defaults to
    ``os.environ``; only ``FASTWS_*`` names are read. The file is ``flags["config"]``,
    else ``FASTWS_CONFIG``, else none. Raises :class:`ConfigError` on any bad value.
    """
    flags = dict(flags or {})
    env = dict(os.environ if env is None else env)
    env = {k: v for k, v in env.items() if k.startswith(ENV_PREFIX)}
    origin = _Origin(types.MappingProxyType(flags), types.MappingProxyType(env))
    return _finish(_collect(flags, env), origin)


def reload(config: Config) -> Config:
    """Re-read the config file (SIGHUP) with the original flags and environment.

    Options marked restart-only (host, port, workers, broker, and the others listed
    in docs/configuration.md) keep their running values. Raises :class:`ConfigError`
    if the file is now bad; the caller should then keep ``config``.
    """
    res = _collect(config.origin.flags, config.origin.env)
    for f in dataclasses.fields(ServerConfig):
        if not f.metadata["reload"]:
            res.server[f.name] = (getattr(config.server, f.name), f.name)
    return _finish(res, config.origin)

