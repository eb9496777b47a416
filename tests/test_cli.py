"""The fastws command line: exit statuses, one-line errors, serve/publish/index/bench."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastws import __version__, cli
from fastws.config import Config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FASTWS_* variable of the developer's shell leaks into these tests."""
    for name in list(os.environ):
        if name.startswith("FASTWS_"):
            monkeypatch.delenv(name)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m fastws ARGS` as a subprocess (a clean FASTWS_* environment)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "fastws", *args], capture_output=True,
                          text=True, cwd=ROOT, env=full, timeout=60)


def one_line(text: str) -> str:
    """Assert text is exactly one non-empty line, without a traceback; return it."""
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    assert "Traceback" not in text
    return text.strip()


# --------------------------------------------------------------------------- subprocess


@pytest.mark.parametrize(("args", "env", "expect"), [
    (["serve", "--port", "abc"], {}, "fastws: --port: must be an integer 1-65535, got 'abc'"),
    (["serve", "--port"], {}, "fastws: --port: expected one argument"),
    (["serve", "--bogus"], {}, "fastws: unrecognized arguments: --bogus"),
    (["serve", "--workers", "4"], {}, "fastws: --workers: 4 workers need a shared broker"),
    (["serve"], {"FASTWS_BROKER": "kafka://x"}, "fastws: FASTWS_BROKER: must be memory://"),
    (["serve", "--log-format", "xml"], {}, "fastws: --log-format: must be one of text, json"),
])
def test_bad_values_exit_2_with_one_line(args: list[str], env: dict, expect: str) -> None:
    out = run_cli(*args, env=env)
    assert out.returncode == 2
    assert one_line(out.stderr).startswith(expect)
    assert out.stdout == ""


def test_bad_config_file_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "fastws.toml"
    path.write_text("[limits]\nmax_subscriptions = -3\n")
    out = run_cli("serve", "--config", str(path))
    assert out.returncode == 2
    assert one_line(out.stderr) == (
        "fastws: limits.max_subscriptions: must be a positive integer, got -3")
    path.write_text("[server]\nprot = 1\n")
    out = run_cli("serve", "--config", str(path))
    assert (out.returncode, one_line(out.stderr)) == (2, "fastws: server.prot: unknown key")


def test_version_subprocess() -> None:
    out = run_cli("--version")
    assert out.returncode == 0
    assert out.stdout == f"fastws {__version__}\n"


def test_publish_bad_json_subprocess() -> None:
    out = run_cli("publish", "events:x", "{not json")
    assert out.returncode == 2
    assert one_line(out.stderr).startswith("fastws publish: JSON: not valid JSON")


# --------------------------------------------------------------------------- in process


@pytest.mark.parametrize(("argv", "expect"), [
    ([], "fastws: missing command"),
    (["frobnicate"], "fastws: unknown command 'frobnicate'"),
    (["serve", "--port", "0"], "fastws: --port: must be an integer 1-65535, got '0'"),
    (["serve", "--workers", "x"], "fastws: --workers: must be an integer 1-1024, got 'x'"),
    (["serve", "--broker", "redis://h:0/0"], "fastws: --broker: bad host:port 'h:0'"),
    (["serve", "--api-key", "a b"], "fastws: --api-key: must be a non-empty string"),
    (["serve", "--allow-origin", "nope"], "fastws: --allow-origin: must be origins like"),
    (["serve", "--jwt-public-key", "/nonexistent.pem"], "fastws: --jwt-public-key: cannot read"),
    (["serve", "--ping-interval", "-1"], "fastws: --ping-interval: must be a positive number"),
    (["serve", "--drain-timeout", "x"], "fastws: --drain-timeout: must be a non-negative"),
    (["serve", "--log-level", "loud"], "fastws: --log-level: must be one of"),
    (["serve", "--config", "/nonexistent/fastws.toml"], "fastws: --config: cannot read"),
    (["serve", "--demo=1"], "fastws: --demo: ignored explicit argument '1'"),
    (["serve", "--pong"], "fastws: unrecognized arguments: --pong"),
    (["publish"], "fastws: the following arguments are required: CHANNEL, JSON"),
    (["publish", "c", "NaN"], "fastws publish: JSON: not valid JSON"),
    (["publish", "c", "[1,"], "fastws publish: JSON: not valid JSON"),
    (["publish", "--url", "ftp://x", "c", "1"], "fastws publish: --url: must be an http://"),
    (["publish", "--timeout", "0", "c", "1"], "fastws publish: --timeout: must be a positive"),
])
def test_errors_in_process(capsys: pytest.CaptureFixture[str], argv: list[str],
                           expect: str) -> None:
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert one_line(captured.err).startswith(expect), captured.err
    assert captured.out == ""


def test_environment_errors_in_process(capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTWS_PORT", "http")
    assert cli.main(["serve"]) == 2
    assert one_line(capsys.readouterr().err) == (
        "fastws: FASTWS_PORT: must be an integer 1-65535, got 'http'")
    monkeypatch.setenv("FASTWS_URL", "gopher://x")
    assert cli.main(["publish", "c", "1"]) == 2
    assert "FASTWS_URL: must be an http://" in one_line(capsys.readouterr().err)


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"fastws {__version__}\n"
    assert cli.main(["--help"]) == 0
    assert "serve" in capsys.readouterr().out
    assert cli.main(["serve", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--host", "--port", "--workers", "--config", "--broker", "--api-key",
                 "--jwt-secret", "--jwt-public-key", "--allow-origin", "--demo", "--echo",
                 "--log-level", "--log-format"):
        assert flag in text


# --------------------------------------------------------------------------- serve


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> list[Config]:
    """Replace fastws.server with a stub whose run(config) records and returns 7."""
    seen: list[Config] = []
    module = types.ModuleType("fastws.server")

    def run(config: Config) -> int:
        seen.append(config)
        return 7

    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fastws.server", module)
    return seen


def test_serve_builds_config_and_runs_server(fake_server: list[Config], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "fastws.toml"
    path.write_text('[server]\nport = 9003\nlog_level = "error"\n'
                    "[limits]\nmax_subscriptions = 3\n[namespaces.chat]\npresence = true\n")
    monkeypatch.setenv("FASTWS_PORT", "9002")
    monkeypatch.setenv("FASTWS_API_KEY", "env1,env2")
    monkeypatch.setenv("FASTWS_LOG_LEVEL", "warning")
    code = cli.main(["serve", "--config", str(path), "--port", "9001", "--api-key", "a",
                     "--api-key", "b", "--allow-origin", "https://x.io", "--demo"])
    assert code == 7
    (config,) = fake_server
    assert config.server.port == 9001  # flag > env > file
    assert config.server.api_keys == ("a", "b")  # flag > env
    assert config.server.log_level == "warning"  # env > file
    assert config.server.allow_origins == ("https://x.io",)
    assert config.server.demo is True and config.server.echo is False
    assert config.limits.max_subscriptions == 3
    assert config.namespace("chat:1").presence is True


def test_serve_echo_runs_echo_server(fake_server: list[Config],
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple] = []
    module = types.ModuleType("fastws.echo")
    module.run = (lambda host, port, compression: calls.append((host, port, compression))  # type: ignore[attr-defined]
                  or 0)
    monkeypatch.setitem(sys.modules, "fastws.echo", module)
    assert cli.main(["serve", "--echo", "--port", "9005"]) == 0
    assert cli.main(["serve", "--echo", "--port", "9006", "--no-compression"]) == 0
    assert calls == [("127.0.0.1", 9005, True), ("127.0.0.1", 9006, False)]
    assert fake_server == []


def test_serve_crash_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    module = types.ModuleType("fastws.server")

    def run(config: Config) -> int:
        raise RuntimeError("boom\nsecond line")

    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fastws.server", module)
    assert cli.main(["serve"]) == 1
    assert one_line(capsys.readouterr().err) == "fastws: error: RuntimeError: boom second line"


# --------------------------------------------------------------------------- publish


class _Handler(http.server.BaseHTTPRequestHandler):
    """POST /api/publish: 200 for key 'good', 401 otherwise, 400 for channel 'bad'."""

    requests: list[tuple[str, dict, dict]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server API
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append((self.path, dict(self.headers), body))
        if self.headers.get("Authorization") != "Bearer good":
            status, answer = 401, {"error": "invalid api key"}
        elif body["channel"] == "bad":
            status, answer = 400, {"error": "bad channel name"}
        else:
            status, answer = 200, {"offset": 1, "epoch": "e"}
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def api() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    _Handler.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_publish_prints_answer(api: str, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["publish", "--url", api + "/", "--api-key", "good",
                     "--idempotency-key", "k1", "events:x", '{"a": [1, 2.5, "x"]}'])
    assert code == 0
    assert json.loads(capsys.readouterr().out) == {"offset": 1, "epoch": "e"}
    ((path, headers, body),) = _Handler.requests
    assert path == "/api/publish"
    assert headers["Authorization"] == "Bearer good"
    assert body == {"channel": "events:x", "data": {"a": [1, 2.5, "x"]},
                    "idempotency_key": "k1"}


def test_publish_reads_key_and_url_from_environment(api: str,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTWS_URL", api.replace("http://", "ws://"))
    monkeypatch.setenv("FASTWS_API_KEY", "good,other")
    assert cli.main(["publish", "c", "12345678901234567890"]) == 0
    assert _Handler.requests[0][2] == {"channel": "c", "data": 12345678901234567890}


@pytest.mark.parametrize(("key", "channel", "expect"), [
    ("wrong", "c", "fastws publish: HTTP 401: invalid api key"),
    ("good", "bad", "fastws publish: HTTP 400: bad channel name"),
])
def test_publish_http_error_is_one_line(api: str, capsys: pytest.CaptureFixture[str],
                                        key: str, channel: str, expect: str) -> None:
    assert cli.main(["publish", "--url", api, "--api-key", key, channel, "1"]) == 1
    captured = capsys.readouterr()
    assert one_line(captured.err) == expect and captured.out == ""


def test_publish_unreachable_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["publish", "--url", f"http://127.0.0.1:{port}", "c", "1"]) == 1
    assert one_line(capsys.readouterr().err).startswith("fastws publish: cannot reach")


# --------------------------------------------------------------------------- index, bench


def test_index_bad_flag_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["index", "--rpc", "http://x", "--contract", "0x1"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "--contract" in err and "0x1" in err


def test_bench_runs_loadtest(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "loadtest").mkdir()
    (tmp_path / "loadtest" / "fanout.py").write_text("")
    monkeypatch.chdir(tmp_path)
    calls: list[tuple] = []
    monkeypatch.setattr(cli.subprocess, "call",
                        lambda cmd, cwd: calls.append((cmd, cwd)) or 0)
    assert cli.main(["bench", "--smoke", "--procs", "2"]) == 0
    ((cmd, cwd),) = calls
    assert cmd[1:] == ["-m", "loadtest.fanout", "--smoke", "--procs", "2"]
    assert Path(cwd) == tmp_path


def test_bench_outside_a_checkout_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """On a `pip install .` there is no loadtest/: one line, exit 2; --help says it too."""
    monkeypatch.setattr(cli, "_bench_roots", lambda: [tmp_path])
    assert cli.main(["bench", "--smoke"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "not part of the installed package" in err and "source checkout" in err
    assert cli.main(["--help"]) == 0
    assert "source checkout only" in " ".join(capsys.readouterr().out.split())
