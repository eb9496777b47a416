"""`make docs-check`: the documented commands and examples work as written.

Convention for README.md and docs/*.md: a fenced code block whose info string carries the
word ``runnable`` after its language is run here, against a server this test starts:

    ```sh runnable            bash -e; must exit 0 within RUN_TIMEOUT
    ```python runnable        python; must exit 0 within RUN_TIMEOUT
    ```python runnable streams
    ```html runnable streams  a client that runs until stopped: it must print (console.log
                              in the browser) at least one line within STREAM_TIMEOUT, with
                              no error, and is then stopped

The server is ``fastws serve --demo --api-key secret`` (what ``make serve`` runs, plus the
key the docs use): port 8765 in a block becomes its port.  A block that starts its own
``fastws serve`` gets a free port of its own instead (also as ``FASTWS_PORT`` and
``FASTWS_URL``, for commands that rely on the default port), and its background jobs are
stopped at the end (the block runs in its own process group).  Shell blocks run in a
temporary directory with this environment's ``fastws`` and ``python`` first on PATH;
``html`` blocks are added as a module script to
a page of the server in Chromium (as tests/test_browser.py does).  Leave unmarked what
takes minutes (benchmarks), needs other machines or services (Redis on 6379, a chain
RPC), or is a fragment; the Sign-In with Ethereum examples of docs/clients.md have their
own tests (tests/test_client.py, tests/test_browser.py).

Also here: the figures generated from docs/bench/ (``python -m loadtest.docnumbers``).
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT, free_port, start_server

RUN_TIMEOUT = 60.0
STREAM_TIMEOUT = 30.0
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)[ \t]+([^\n]*\brunnable\b[^\n]*)\n(.*?)^```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
CHROMIUM = os.environ.get("FASTWS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"


@dataclass(frozen=True)
class Block:
    """One runnable block: where it is, its language, flags and code."""

    path: Path
    line: int
    lang: str
    flags: frozenset[str]
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def runnable_blocks() -> list[Block]:
    """Every block marked runnable in README.md and docs/*.md, in file order."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in FENCE.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            out.append(Block(path, line, m.group(1), frozenset(m.group(2).split()),
                             m.group(3)))
    return out


BLOCKS = runnable_blocks()


def test_the_docs_have_runnable_blocks() -> None:
    """The convention is in use (a typo in the marker would silently run nothing)."""
    langs = {b.lang for b in BLOCKS}
    assert {"sh", "python", "html"} <= langs, langs
    assert {b.path.name for b in BLOCKS} >= {"README.md", "clients.md"}
    for b in BLOCKS:
        assert b.lang in ("sh", "python", "html"), b.name
        assert b.flags <= {"runnable", "streams"}, (b.name, b.flags)


@pytest.fixture(scope="module")
def demo():
    """What `make serve` runs, with the api key the docs use."""
    srv = start_server("--demo", api_key="secret")
    yield srv
    srv.stop(timeout=3.0)
    for d in srv.tmp:
        shutil.rmtree(d, ignore_errors=True)


def _env(bindir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTWS_")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _bindir(tmp: Path) -> Path:
    """``fastws`` and ``python`` of this environment, as the docs call them."""
    bindir = tmp / "bin"
    bindir.mkdir()
    for name, argv in (("fastws", f'"{sys.executable}" -m fastws'),
                       ("python", f'"{sys.executable}"'), ("python3", f'"{sys.executable}"')):
        (bindir / name).write_text(f'#!/bin/sh\nexec {argv} "$@"\n')
        (bindir / name).chmod(0o755)
    return bindir


def _port_for(block: Block, demo) -> int:
    return free_port() if "fastws serve" in block.code else demo.port


def _stream_one_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """The first line ``proc`` prints within ``timeout`` (b"" if none)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline, buf = time.monotonic() + timeout, b""
    while b"\n" not in buf and time.monotonic() < deadline:
        if not sel.select(max(0.0, deadline - time.monotonic())):
            break
        chunk = os.read(proc.stdout.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
    return buf


def _stop_group(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Stop ``proc`` and whatever it started in the background (its process group):
    SIGTERM, then SIGKILL to what is left after ``timeout``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        proc.poll()                       # reap the leader, or the group never empties
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _run_process(block: Block, argv: list[str], tmp_path: Path,
                 env: dict[str, str] | None = None) -> None:
    env = {**_env(_bindir(tmp_path)), **(env or {})}
    if "streams" not in block.flags:
        # output to a file: a background job (`fastws serve &`) would hold a pipe open
        log = tmp_path / "output.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{block.name} still running after {RUN_TIMEOUT:g} s:\n"
                        f"{log.read_text(errors='replace')[-3000:]}")
        finally:
            _stop_group(proc)     # its background jobs too
        text = log.read_text(errors="replace")
        assert proc.returncode == 0, f"{block.name} exited {proc.returncode}:\n{text[-3000:]}"
        return
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        first = _stream_one_line(proc, STREAM_TIMEOUT)
    finally:
        _stop_group(proc)
    text = proc.stderr.read().decode(errors="replace")
    assert first.strip(), f"{block.name} printed nothing in {STREAM_TIMEOUT:g} s:\n{text[-3000:]}"
    assert "Traceback" not in text and "Error" not in text, f"{block.name}:\n{text[-3000:]}"


SHELL_PROLOGUE = "set -e\n"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang in ("sh", "python")],
                         ids=lambda b: b.name)
def test_runnable_block(block: Block, demo, tmp_path: Path) -> None:
    port = _port_for(block, demo)
    code = block.code.replace("8765", str(port))
    if block.lang == "sh":
        script = tmp_path / "block.sh"
        script.write_text(SHELL_PROLOGUE + code)
        # `fastws serve` and `fastws publish` without --port / --url use 8765 too
        _run_process(block, ["bash", str(script)], tmp_path,
                     {"FASTWS_PORT": str(port), "FASTWS_URL": f"http://127.0.0.1:{port}"})
    else:
        script = tmp_path / "block.py"
        script.write_text(code)
        _run_process(block, [sys.executable, str(script)], tmp_path)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM} (`make system-deps` installs it)")
    from playwright.sync_api import sync_playwright

    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                               args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.lang == "html"], ids=lambda b: b.name)
def test_runnable_html_block(block: Block, demo, browser) -> None:
    script = block.code.strip()
    assert script.startswith('<script type="module">') and script.endswith("</script>"), \
        f"{block.name}: one <script type=module> element"
    script = script.removeprefix('<script type="module">').removesuffix("</script>")
    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        logs: list[str] = []
        errors: list[str] = []
        page.on("console", lambda m: (errors if m.type == "error" else logs).append(m.text))
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(demo.http_url + "/")
        page.add_script_tag(content=script, type="module")
        deadline = time.monotonic() + STREAM_TIMEOUT
        # a few lines, not the first alone: a state line comes before any event
        while len(logs) < 3 and not errors and time.monotonic() < deadline:
            page.wait_for_timeout(50)
        assert not errors, f"{block.name}: {errors}"
        assert logs, f"{block.name} logged nothing in {STREAM_TIMEOUT:g} s"
    finally:
        ctx.close()


def test_doc_numbers_come_from_the_bench_output() -> None:
    """README's numbers, operations.md's sizing and sysctl.md's memory are generated from
    docs/bench/ (``python -m loadtest.docnumbers --write``), never edited by hand."""
    from loadtest.docnumbers import check

    assert check() == []
