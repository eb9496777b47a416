"""The ``fastws`` command line: a thin layer of options over :mod:`fastws.config`.

Subcommands (docs/protocol.md section 2)::

    fastws serve   [options]          # flags generated from fastws.config.ServerConfig
    fastws publish [--url URL] [--api-key KEY] CHANNEL JSON [CHANNEL JSON ...]
    fastws index   ...                # delegates to fastws.indexer when it exists
    fastws bench   [args]             # source checkout only: `python -m loadtest.fanout`
    fastws --version

Exit status: what the subcommand returns; 2 for a bad flag or config value, with one
line on stderr naming the option (``fastws: --port: must be an integer 1-65535, got
'x'``); 1 for a runtime failure. No traceback ever reaches the user.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from fastws._version import __version__
from fastws.config import (
    Config,
    ConfigError,
    ServerConfig,
    default_of,
    env_names,
    flag_name,
    load_config,
)
from fastws.extras import MissingExtra, require_chain
from fastws.usage import OneLineParser, UsageError

__all__ = ["main", "build_parser", "serve_flags", "OneLineParser", "UsageError"]

PROG = "fastws"
DEFAULT_URL = "http://127.0.0.1:8765"


def _say(prefix: str, message: str) -> None:
    """Write exactly one line to stderr."""
    sys.stderr.write(f"{prefix}: {' '.join(str(message).split())}\n")


def _add_serve_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ServerConfig field, named and documented by its metadata."""
    for f in dataclasses.fields(ServerConfig):
        flag = flag_name(f)
        if flag is None:
            continue
        help_text = f"{f.metadata['doc']} [env {env_names(f)[0]}]".replace("%", "%%")
        default = default_of(f)
        if isinstance(default, bool):      # on by default: --name / --no-name
            action = argparse.BooleanOptionalAction if default else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, default=None,
                                help=help_text)
        elif isinstance(default, tuple):
            parser.add_argument(flag, dest=f.name, action="append", default=None,
                                metavar=flag[2:].replace("-", "_").upper(), help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=None,
                                metavar=f.name.upper(),
                                help=f"{help_text} (default {default})".replace("%", "%%"))


def build_parser() -> argparse.ArgumentParser:
    """The whole ``fastws`` parser (exposed for docs and tests)."""
    parser = OneLineParser(prog=PROG, allow_abbrev=False,
                     description="A fast WebSocket pub/sub server.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")

    serve = sub.add_parser("serve", help="run the server", allow_abbrev=False,
                           description="Run the server. Every flag also reads FASTWS_<NAME> "
                           "from the environment; precedence: flag > environment > "
                           "config file > default.")
    _add_serve_flags(serve)

    publish = sub.add_parser("publish", help="publish through POST /api/publish",
                             allow_abbrev=False)
    publish.add_argument("--url", default=None,
                         help=f"server base URL [env FASTWS_URL] (default {DEFAULT_URL})")
    publish.add_argument("--api-key", dest="api_key", default=None,
                         help="API key [env FASTWS_API_KEY]")
    publish.add_argument("--idempotency-key", dest="idempotency_key", default=None,
                         help="publish at most once per key and channel within 5 minutes")
    publish.add_argument("--timeout", default="10", help="seconds (default 10)")
    publish.add_argument("channel", metavar="CHANNEL")
    publish.add_argument("data", metavar="JSON")
    publish.add_argument("more", nargs="*", metavar="CHANNEL JSON",
                         help="more publications, sent in order as one batch request")

    index = sub.add_parser("index", help="publish blockchain contract logs",
                           add_help=False, prefix_chars="\0")
    index.add_argument("args", nargs=argparse.REMAINDER)

    bench = sub.add_parser("bench", help="run the fan-out benchmark, python -m loadtest.fanout "
                           "(source checkout only: loadtest/ is not in the installed package)",
                           add_help=False, prefix_chars="\0")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def serve_flags(args: argparse.Namespace) -> dict[str, object]:
    """The ``serve`` flags the user gave, keyed by ServerConfig field name."""
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


# --------------------------------------------------------------------------- serve


def _serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    try:
        config: Config = load_config(serve_flags(args), env)
    except ConfigError as exc:
        _say(PROG, str(exc))
        return 2
    try:
        _require_extras(config)
    except MissingExtra as exc:
        _say(PROG, str(exc))
        return 2
    if config.server.echo:
        echo = importlib.import_module("fastws.echo")
        code = echo.run(config.server.host, config.server.port,
                        compression=config.server.compression)
    else:
        server = importlib.import_module("fastws.server")
        code = server.run(config)
    return code if isinstance(code, int) else 0


def _require_extras(config: Config) -> None:
    """Raise MissingExtra when the config uses a feature of an extra not installed."""
    if config.server.echo:
        return
    if config.server.demo:
        require_chain("serve --demo", ("web3", "eth_tester", "eth_abi", "eth_utils"))
    if config.server.siwe_rpc_url:
        require_chain("siwe_rpc_url (EIP-1271 checks)", ("web3", "eth_abi", "eth_utils"))


# --------------------------------------------------------------------------- publish


def _publish(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    me = f"{PROG} publish"
    if len(args.more) % 2:
        _say(me, f"CHANNEL {args.more[-1]!r} has no JSON after it: give CHANNEL JSON pairs")
        return 2
    pairs = [(args.channel, args.data), *zip(args.more[::2], args.more[1::2], strict=True)]
    if len(pairs) > 1 and args.idempotency_key is not None:
        _say(me, "--idempotency-key: only with one publication (one key per channel)")
        return 2
    datas = []
    for n, (_, text) in enumerate(pairs, 1):
        try:
            datas.append(json.loads(text, parse_constant=_no_constant))
        except (ValueError, RecursionError) as exc:
            where = "JSON" if len(pairs) == 1 else f"JSON #{n}"
            _say(me, f"{where}: not valid JSON ({exc})")
            return 2
    url = (args.url or env.get("FASTWS_URL") or DEFAULT_URL).strip()
    label = "--url" if args.url else ("FASTWS_URL" if env.get("FASTWS_URL") else "--url")
    for ws, http in (("ws://", "http://"), ("wss://", "https://")):
        if url.startswith(ws):
            url = http + url[len(ws):]
    if not url.startswith(("http://", "https://")) or len(url.split("://", 1)[1]) == 0:
        _say(me, f"{label}: must be an http:// or https:// URL, got {url!r}")
        return 2
    try:
        timeout = float(args.timeout)
        if not timeout > 0:
            raise ValueError
    except ValueError:
        _say(me, f"--timeout: must be a positive number of seconds, got {args.timeout!r}")
        return 2
    key = args.api_key
    if key is None:
        key = next((k.strip() for k in env.get("FASTWS_API_KEY", "").split(",") if k.strip()),
                   None)
    body: dict[str, object] | list[dict[str, object]]
    body = {"channel": args.channel, "data": datas[0]}
    if args.idempotency_key is not None:
        body["idempotency_key"] = args.idempotency_key
    if len(pairs) > 1:
        body = [{"channel": ch, "data": d} for (ch, _), d in zip(pairs, datas, strict=True)]
    headers = {"Content-Type": "application/json", "User-Agent": f"fastws/{__version__}"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    endpoint = url.rstrip("/") + "/api/publish"
    request = urllib.request.Request(endpoint, data=json.dumps(body).encode(),
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            answer = resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        _say(me, f"HTTP {exc.code}: {_reason(exc)}")
        return 1
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        _say(me, f"cannot reach {endpoint}: {reason}")
        return 1
    sys.stdout.write(answer.strip() + "\n")
    if isinstance(body, list):  # per item: say which were not published
        try:
            results = json.loads(answer)
        except ValueError:
            results = []
        failed = [(n, r) for n, r in enumerate(results, 1)
                  if isinstance(r, dict) and "error" in r]
        for n, r in failed:
            _say(me, f"publication #{n} ({pairs[n - 1][0]}): HTTP {r.get('status')}: "
                     f"{r['error']}")
        return 1 if failed else 0
    return 0


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


def _reason(exc: urllib.error.HTTPError) -> str:
    """The server's reason for an HTTP error: its JSON message, else the status text."""
    try:
        raw = exc.read().decode("utf-8", "replace")
    except OSError:
        raw = ""
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        for key in ("reason", "message", "error", "detail"):
            if isinstance(doc.get(key), str) and doc[key]:
                return doc[key]
    text = " ".join(raw.split())
    return text[:200] if text else str(exc.reason)


# --------------------------------------------------------------------------- index, bench


def _index(args: argparse.Namespace) -> int:
    """Hand over to ``fastws.indexer.main(argv) -> int`` (imported only when used)."""
    from fastws.indexer import main as entry

    code = entry(list(args.args))
    return code if isinstance(code, int) else 0


BENCH_MISSING = ("loadtest/fanout.py not found: the benchmark is not part of the installed "
                 "package; run it from a source checkout of fastws (its root directory, "
                 "after `make build`)")


def _bench_roots() -> list[Path]:
    """Where ``fastws bench`` looks for ``loadtest/``: the working directory, then the
    checkout this fastws is imported from (an editable install or ``PYTHONPATH``)."""
    return [Path.cwd(), Path(__file__).resolve().parent.parent]


def _bench(args: argparse.Namespace) -> int:
    """Run ``python -m loadtest.fanout`` from the source checkout that holds it."""
    for root in _bench_roots():
        if (root / "loadtest" / "fanout.py").is_file():
            cmd = [sys.executable, "-m", "loadtest.fanout", *args.args]
            return subprocess.call(cmd, cwd=root)
    _say(f"{PROG} bench", BENCH_MISSING)
    return 2


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fastws`` command line; returns the exit status (never raises)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    parser = build_parser()
    try:
        try:
            args = parser.parse_args(argv)
        except UsageError as exc:
            _say(PROG, str(exc))
            return 2
        except SystemExit as exc:  # --help, --version
            return exc.code if isinstance(exc.code, int) else 0
        if args.command is None:
            _say(PROG, "missing command: serve, publish, index or bench (see fastws --help)")
            return 2
        if args.command == "serve":
            return _serve(args, env)
        if args.command == "publish":
            return _publish(args, env)
        if args.command == "index":
            return _index(args)
        return _bench(args)
    except KeyboardInterrupt:
        return 130
    except ConfigError as exc:
        _say(PROG, str(exc))
        return 2
    except Exception as exc:  # noqa: BLE001 - the user gets one line, never a traceback
        _say(PROG, f"error: {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
