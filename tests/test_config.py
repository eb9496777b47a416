"""fastws.config: precedence, validation, namespaces, reload and the generated files."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from fastws import channels
from fastws.config import (
    Config,
    ConfigError,
    LimitsConfig,
    NamespaceConfig,
    ServerConfig,
    load_config,
    reload,
)
from fastws.config_docs import example_toml, markdown

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def toml(tmp_path: Path):
    """Write TOML text to a file and return its path as a string."""

    def write(text: str, name: str = "fastws.toml") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


def error(flags: dict | None = None, env: dict | None = None) -> str:
    """The ConfigError message load_config raises (asserting it is one line)."""
    with pytest.raises(ConfigError) as info:
        load_config(flags or {}, env or {})
    message = str(info.value)
    assert "\n" not in message and message
    return message


# --------------------------------------------------------------------------- defaults


def test_defaults_match_the_contract() -> None:
    c = load_config({}, {})
    assert c.server == ServerConfig()
    assert (c.server.host, c.server.port, c.server.workers) == ("127.0.0.1", 8765, 1)
    assert c.server.broker == "memory://" and c.server.config is None
    assert c.server.api_keys == () and c.server.allow_origins == ()
    assert (c.server.ping_interval, c.server.pong_timeout, c.server.drain_timeout) == (25, 10, 30)
    assert c.server.trusted_proxies == ("127.0.0.1/8", "::1")
    assert c.server.read_buffer_size == 2048
    lim = c.limits
    assert lim == LimitsConfig()
    assert (lim.max_message_size, lim.max_channel_length, lim.max_subscriptions) == (
        65536, 255, 256)
    assert (lim.messages_per_connection, lim.messages_window) == (200, 10)
    assert (lim.connections_per_ip, lim.connections_per_ip_window) == (50, 10)
    assert (lim.subscribes_per_connection, lim.subscribes_window) == (0, 3600)
    assert (lim.requests_per_ip_per_s, lim.max_connections, lim.send_buffer) == (0, 0, 1048576)
    star = c.namespace("anything:x")
    assert star == NamespaceConfig(history_size=100, history_ttl=300, presence=False,
                                   subscribe="anyone", publish="api")
    assert c.namespace("user:alice").subscribe == "owner"
    assert c.namespace("wallet:0xabc").subscribe == "owner"
    assert c.namespace("wallet").subscribe == "owner"
    assert c.for_channel("wallet").subscribe == "anyone"  # a channel with no namespace
    assert c.namespace("user").private and c.namespace("wallet").private
    assert not star.private and NamespaceConfig(subscribe="api").private


def test_config_is_frozen() -> None:
    c = load_config({}, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.server.port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.namespaces["x"] = NamespaceConfig()  # type: ignore[index]
    assert Config() == c


def test_every_field_is_documented() -> None:
    for cls in (ServerConfig, LimitsConfig, NamespaceConfig):
        for f in dataclasses.fields(cls):
            assert f.metadata["doc"].strip(), f.name


# --------------------------------------------------------------------------- precedence


@pytest.mark.parametrize(
    ("key", "flag", "env_var", "env_value", "file_value", "expect_flag", "expect_env",
     "expect_file", "default"),
    [
        ("port", "9001", "FASTWS_PORT", "9002", "9003", 9001, 9002, 9003, 8765),
        ("host", "0.0.0.0", "FASTWS_HOST", "::1", '"10.0.0.1"', "0.0.0.0", "::1", "10.0.0.1",
         "127.0.0.1"),
        ("broker", "redis://a:1/0", "FASTWS_BROKER", "redis://b:2/1", '"rediss://c:3"',
         "redis://a:1/0", "redis://b:2/1", "rediss://c:3", "memory://"),
        ("api_keys", ["k1", "k2"], "FASTWS_API_KEY", "e1,e2", '["f1"]', ("k1", "k2"),
         ("e1", "e2"), ("f1",), ()),
        ("log_format", "json", "FASTWS_LOG_FORMAT", "text", '"json"', "json", "text", "json",
         "text"),
        ("ping_interval", "1.5", "FASTWS_PING_INTERVAL", "2", "3", 1.5, 2.0, 3.0, 25.0),
        ("demo", True, "FASTWS_DEMO", "yes", "true", True, True, True, False),
    ],
)
def test_precedence_flag_env_file_default(toml, key, flag, env_var, env_value, file_value,
                                          expect_flag, expect_env, expect_file,
                                          default) -> None:
    path = toml(f"[server]\n{key} = {file_value}\n")
    env = {env_var: env_value}
    assert getattr(load_config({key: flag, "config": path}, env).server, key) == expect_flag
    assert getattr(load_config({"config": path}, env).server, key) == expect_env
    assert getattr(load_config({"config": path}, {}).server, key) == expect_file
    assert getattr(load_config({}, {}).server, key) == default


def test_config_path_from_environment(toml) -> None:
    path = toml("[limits]\nmax_subscriptions = 7\n")
    c = load_config({}, {"FASTWS_CONFIG": path})
    assert c.limits.max_subscriptions == 7 and c.server.config == path


def test_empty_environment_value_is_unset() -> None:
    assert load_config({}, {"FASTWS_PORT": "", "FASTWS_JWT_SECRET": ""}).server.port == 8765


def test_plural_environment_names_are_accepted() -> None:
    c = load_config({}, {"FASTWS_API_KEYS": "a, b", "FASTWS_ALLOW_ORIGINS": "https://x.io/"})
    assert c.server.api_keys == ("a", "b")
    assert c.server.allow_origins == ("https://x.io",)


def test_typed_flags_from_python_callers() -> None:
    c = load_config({"port": 9100, "api_keys": ("a",), "drain_timeout": 0}, {})
    assert (c.server.port, c.server.api_keys, c.server.drain_timeout) == (9100, ("a",), 0.0)


def test_strict_profile_and_example_load() -> None:
    strict = load_config({"config": str(ROOT / "deploy" / "fastws.strict.toml")}, {}).limits
    assert (strict.connections_per_ip, strict.connections_per_ip_window) == (10, 60)
    assert (strict.messages_per_connection, strict.messages_window) == (100, 60)
    assert (strict.subscribes_per_connection, strict.subscribes_window) == (20, 3600)
    assert strict.requests_per_ip_per_s == 10
    example = load_config({"config": str(ROOT / "fastws.example.toml")}, {})
    default = load_config({}, {})
    assert example.limits == default.limits
    assert dict(example.namespaces) == dict(default.namespaces)
    assert dataclasses.replace(example.server, config=None) == default.server


def test_example_with_every_key_uncommented_loads(tmp_path: Path) -> None:
    lines = []
    for line in example_toml().split("# One namespace")[0].splitlines():
        key = line[2:].split(" = ")[0] if line.startswith("# ") and " = " in line else ""
        if key.isidentifier() and "unset" not in line:
            line = line[2:]
        lines.append(line)
    path = tmp_path / "all.toml"
    path.write_text("\n".join(lines))
    c = load_config({"config": str(path)}, {})
    assert c.namespace("chat:x") == NamespaceConfig()
    assert c.limits == LimitsConfig()


# --------------------------------------------------------------------------- namespaces


def test_namespace_overrides_star_key_by_key(toml) -> None:
    path = toml("""
[namespaces."*"]
history_size = 10
history_ttl = 60
[namespaces.chat]
presence = true
publish = "authenticated"
[namespaces.user]
presence = true
[namespaces.wallet]
subscribe = "authenticated"
""")
    c = load_config({"config": path}, {})
    chat = c.namespace("chat:room")
    assert (chat.history_size, chat.history_ttl, chat.presence, chat.subscribe,
            chat.publish) == (10, 60, True, "anyone", "authenticated")
    assert c.namespace("chat") == chat and c.for_channel("chat:*") == chat
    other = c.namespace("events:bet")
    assert (other.history_size, other.presence, other.publish) == (10, False, "api")
    assert c.for_channel("no-namespace") == other
    user = c.namespace("user:alice")
    assert (user.subscribe, user.presence, user.history_size) == ("owner", True, 10)
    assert c.namespace("wallet:0xab").subscribe == "authenticated"
    assert set(c.namespaces) == {"*", "chat", "user", "wallet"}
    # a channel's namespace is channels.namespace_of's: a pattern that spans namespaces
    # (its ':' after a glob character) gets the "*" rules
    for name in ("chat:room", "chat:*", "*:x", "ch?t:x", ":x", "chat"):
        assert c.for_channel(name) == c.namespaces[channels.namespace_of(name) or "*"], name


@pytest.mark.parametrize(("text", "message"), [
    ('[namespaces.chat]\nsubscribe = "nobody"',
     "namespaces.chat.subscribe: must be one of anyone, authenticated, owner, api, proxy, "
     "got 'nobody'"),
    ("[namespaces.chat]\nhistory_size = -1",
     "namespaces.chat.history_size: must be a non-negative integer, got -1"),
    ('[namespaces."*"]\npresence = "yes"',
     "namespaces.\"*\".presence: must be true or false, got 'yes'"),
    ("[namespaces.chat]\ncolour = 1", "namespaces.chat.colour: unknown key"),
    ('[namespaces."a:b"]\npresence = true', 'namespaces."a:b": a namespace name'),
    ('[namespaces."ev*"]\npresence = true', 'namespaces."ev*": a namespace name'),
    ("[namespaces]\nchat = 1", "namespaces.chat: must be a table, got 1"),
])
def test_namespace_errors(toml, text: str, message: str) -> None:
    assert error({"config": toml(text)}).startswith(message)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(("text", "message"), [
    ("[limits]\nmax_subscriptions = -3",
     "limits.max_subscriptions: must be a positive integer, got -3"),
    ("[limits]\nmax_message_size = 0",
     "limits.max_message_size: must be a positive integer, got 0"),
    ("[limits]\nmessages_window = 0",
     "limits.messages_window: must be a positive number of seconds, got 0"),
    ("[limits]\nsend_buffer = 1.5", "limits.send_buffer: must be a positive integer, got 1.5"),
    ("[limits]\nmax_connections = true",
     "limits.max_connections: must be a non-negative integer, got true"),
    ("[limits]\nfoo = 1", "limits.foo: unknown key"),
    ("[server]\nport = 70000", "server.port: must be an integer 1-65535, got 70000"),
    ('[server]\nport = "80"', "server.port: must be an integer 1-65535, got '80'"),
    ("[server]\nconfig = 'x.toml'", "server.config: unknown key"),
    ("[server]\nbogus = 1", "server.bogus: unknown key"),
    ('[server]\nlog_level = "loud"', "server.log_level: must be one of debug, info"),
    ("[server]\napi_keys = 'abc'", "server.api_keys: must be a list of strings, got 'abc'"),
    ("[server]\napi_keys = ['a b']", "server.api_keys: must be a non-empty string"),
    ('[server]\ntrusted_proxies = ["nope"]', "server.trusted_proxies: must be a list of IP"),
    ('[server]\nbroker = "kafka://x"', "server.broker: must be memory://"),
    ("[server]\nworkers = 4", "server.workers: 4 workers need a shared broker"),
    ("[server]\ndrain_timeout = -1",
     "server.drain_timeout: must be a non-negative number of seconds, got -1"),
    ("[bogus]\nx = 1", "[bogus]: unknown section"),
    ("server = 1", "server: must be a table, got 1"),
])
def test_file_errors_name_the_key(toml, text: str, message: str) -> None:
    assert error({"config": toml(text)}).startswith(message)


def test_invalid_toml_names_the_file(toml) -> None:
    path = toml("[server\nport = 1")
    assert error({"config": path}).startswith(f"{path}: invalid TOML")


def test_missing_file_names_the_option(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.toml")
    assert error({"config": missing}) == (
        f"--config: cannot read {missing!r}: No such file or directory")
    assert error(env={"FASTWS_CONFIG": missing}).startswith("FASTWS_CONFIG: cannot read")


@pytest.mark.parametrize(("flags", "env", "message"), [
    ({"port": "abc"}, {}, "--port: must be an integer 1-65535, got 'abc'"),
    ({}, {"FASTWS_PORT": "0"}, "FASTWS_PORT: must be an integer 1-65535, got '0'"),
    ({"workers": "0"}, {}, "--workers: must be an integer 1-1024, got '0'"),
    ({"workers": "2"}, {}, "--workers: 2 workers need a shared broker"),
    ({}, {"FASTWS_WORKERS": "3"}, "FASTWS_WORKERS: 3 workers need a shared broker"),
    ({"broker": "http://x"}, {}, "--broker: must be memory://"),
    ({"broker": "redis://"}, {}, "--broker: redis:// needs a host"),
    ({"broker": "redis://h:99999"}, {}, "--broker: bad host:port 'h:99999'"),
    ({"broker": "redis://h:1/x"}, {}, "--broker: the path of redis:// must be a database"),
    ({"broker": "redis://a:1,b:2"}, {}, "--broker: redis:// takes one host"),
    ({"broker": "redis+sentinel://a:1"}, {}, "--broker: redis+sentinel:// needs /MASTER"),
    ({"broker": "memory://x"}, {}, "--broker: memory:// takes no host"),
    ({"log_level": "loud"}, {}, "--log-level: must be one of debug, info, warning, error, "
     "critical, got 'loud'"),
    ({}, {"FASTWS_LOG_FORMAT": "xml"}, "FASTWS_LOG_FORMAT: must be one of text, json"),
    ({"ping_interval": "soon"}, {}, "--ping-interval: must be a positive number of seconds"),
    ({"pong_timeout": "nan"}, {}, "--pong-timeout: must be a positive number of seconds"),
    ({}, {"FASTWS_DEMO": "maybe"}, "FASTWS_DEMO: must be true or false, got 'maybe'"),
    ({"allow_origins": ["example.com"]}, {}, "--allow-origin: must be origins like"),
    ({"trusted_proxies": ["1.2.3.4/99"]}, {}, "--trusted-proxy: must be a list of IP"),
    ({"siwe_chain_ids": ["1", "x"]}, {}, "--siwe-chain-id: must be a positive integer"),
    ({"read_buffer_size": "1"}, {}, "--read-buffer-size: must be an integer 64-"),
    ({"nonsense": "1"}, {}, "--nonsense: unknown option"),
    ({"jwt_secret": "s", "jwt_public_key": "k.pem"}, {}, "--jwt-public-key: give either"),
    ({"jwt_public_key": "/nonexistent/k.pem"}, {}, "--jwt-public-key: cannot read"),
])
def test_flag_and_env_errors_name_the_option(flags: dict, env: dict, message: str) -> None:
    assert error(flags, env).startswith(message)


def test_accepted_broker_urls() -> None:
    for url in ("memory://", "redis://localhost:6379/0", "redis://:pw@h:1", "rediss://h",
                "redis+cluster://a:7000,b:7001", "redis+sentinel://a:1,b:2/mymaster/0",
                "redis+sentinel://[::1]:26379/m", "redis://[::1]:6379/2"):
        assert load_config({"broker": url}, {}).server.broker == url


def test_jwt_key_file(tmp_path: Path, toml) -> None:
    pem = tmp_path / "k.pem"
    pem.write_text("-----BEGIN PUBLIC KEY-----\nMFk=\n-----END PUBLIC KEY-----\n")
    assert load_config({"jwt_public_key": str(pem)}, {}).server.jwt_public_key == str(pem)
    assert error({"jwt_public_key": str(pem), "jwt_secret": "s"}) == (
        "--jwt-public-key: give either a JWT secret or a public key, not both")
    # A relative path in the file is relative to the file.
    c = load_config({"config": toml('[server]\njwt_public_key = "k.pem"\n')}, {})
    assert Path(c.server.jwt_public_key or "").resolve() == pem.resolve()
    not_pem = tmp_path / "x.txt"
    not_pem.write_text("hello")
    assert "is neither a PEM file nor a JWKS" in error({"jwt_public_key": str(not_pem)})
    jwks = tmp_path / "keys.json"
    jwks.write_text('{"keys": []}')
    assert load_config({"jwt_public_key": str(jwks)}, {}).server.jwt_public_key == str(jwks)


def test_trusted_networks() -> None:
    nets = load_config({}, {}).server.trusted_networks()
    assert [str(n) for n in nets] == ["127.0.0.0/8", "::1/128"]


# --------------------------------------------------------------------------- reload


def test_reload_keeps_restart_only_options(toml, tmp_path: Path) -> None:
    path = toml('[server]\nport = 9100\napi_keys = ["old"]\n[limits]\nmax_subscriptions = 5\n')
    c = load_config({"config": path, "host": "0.0.0.0"}, {"FASTWS_LOG_LEVEL": "debug"})
    Path(path).write_text(
        '[server]\nport = 9200\nhost = "1.2.3.4"\nworkers = 8\napi_keys = ["new"]\n'
        'log_level = "error"\n[limits]\nmax_subscriptions = 6\n'
        "[namespaces.chat]\npresence = true\n")
    r = reload(c)
    assert (r.server.port, r.server.host, r.server.workers, r.server.broker) == (
        9100, "0.0.0.0", 1, "memory://")
    assert r.server.api_keys == ("new",)
    assert r.server.log_level == "debug"  # the environment still wins over the file
    assert r.limits.max_subscriptions == 6
    assert r.namespace("chat:x").presence is True
    Path(path).write_text("[limits]\nmax_subscriptions = 0\n")
    with pytest.raises(ConfigError, match="limits.max_subscriptions"):
        reload(r)


def test_reload_without_a_file_is_identity() -> None:
    c = load_config({"port": "9300"}, {})
    assert reload(c) == c


# --------------------------------------------------------------------------- generated docs


def test_configuration_md_is_up_to_date() -> None:
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == markdown(), (
        "docs/configuration.md is stale: python -m fastws.config_docs --markdown "
        "> docs/configuration.md")


def test_example_toml_is_up_to_date() -> None:
    committed = (ROOT / "fastws.example.toml").read_text()
    assert committed == example_toml(), (
        "fastws.example.toml is stale: python -m fastws.config_docs --example-toml "
        "> fastws.example.toml")


def test_markdown_lists_every_key() -> None:
    text = markdown()
    for cls in (ServerConfig, LimitsConfig, NamespaceConfig):
        for f in dataclasses.fields(cls):
            assert f"`{f.name}`" in text or f"{f.name} (not in the file)" in text


def test_module_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "fastws.config_docs", "--markdown"],
                         capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout == markdown()
    bad = subprocess.run([sys.executable, "-m", "fastws.config_docs", "--nope"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
