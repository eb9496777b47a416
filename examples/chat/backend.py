"""The chat example's backend: serves the page, logs users in, and (SPEC §11) is fastws'
connect and publish proxy.  ``python examples/chat/backend.py`` also starts
``fastws serve --config examples/chat/fastws.toml``; ``--no-fastws`` leaves that to you.

Users log in with a name (no password: it is an example).  ``POST /login`` answers an
opaque session token (and sets it as a cookie too); the page hands it to the fastws
client as its ``token``, which every transport carries (``?token=`` on the WebSocket,
/sse and /poll, ``Authorization: Bearer`` on /call).  fastws does not understand it (it
is no JWT): it asks ``POST /proxy/connect`` who the connection is, and
``POST /proxy/publish`` before every message (at most MAX_TEXT characters, and a
``name`` in the data must be the sender's).  Both answer the JSON shapes of SPEC §11
(``{"result": …}`` or ``{"error": {"code", "message"}}``).  ``GET /stats`` counts the
proxy calls.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.resources
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import tomllib
from collections import Counter
from pathlib import Path

from aiohttp import web

HERE = Path(__file__).resolve().parent
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
MAX_TEXT = 500                  # characters in one message (the publish proxy's limit)
COOKIE = "chat_session"
PORT = 8080                     # the backend's default port (the config's proxy URLs)


class Backend:
    """The backend's state: the sessions (token → name) and what the proxies were asked."""

    def __init__(self, config_path: Path, fastws_port: int | None) -> None:
        cfg = tomllib.loads(config_path.read_text())
        self.fastws_port = fastws_port or int(cfg.get("server", {}).get("port", 8765))
        if not cfg.get("proxy", {}).get("connect"):
            raise SystemExit(f"{config_path}: no [proxy] connect URL: fastws would never "
                             "ask this backend who a connection is")
        self.sessions: dict[str, str] = {}      # token → name (lost when the backend stops)
        self.calls: Counter[str] = Counter()    # "connect websocket ok", "publish refused", …

    # ------------------------------------------------------------ sessions

    def user_of(self, token: object, cookie_header: str) -> str | None:
        """The logged-in name of a session token, else of the ``Cookie`` header."""
        if isinstance(token, str) and token in self.sessions:
            return self.sessions[token]
        for part in cookie_header.split(";"):
            key, _, value = part.strip().partition("=")
            if key == COOKIE and value in self.sessions:
                return self.sessions[value]
        return None

    # ------------------------------------------------------------ pages

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(HERE / "static" / "index.html")

    async def fastws_js(self, request: web.Request) -> web.Response:
        """The browser client of the installed fastws (same origin as the page)."""
        text = importlib.resources.files("fastws").joinpath("static/fastws.js").read_text()
        return web.Response(text=text, content_type="text/javascript")

    async def login(self, request: web.Request) -> web.Response:
        """``{"name"}`` → ``{"name", "token", "ws", "max_text"}``: a new session token
        (also set as the session cookie)."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not NAME_RE.match(name):
            return web.json_response({"error": "a name is 1-32 letters, digits, _ or -"},
                                     status=400)
        token = secrets.token_urlsafe(24)
        self.sessions[token] = name
        host = request.host.rpartition(":")[0] if ":" in request.host else request.host
        ws = f"ws://{host}:{self.fastws_port}/ws"
        resp = web.json_response({"name": name, "ws": ws, "max_text": MAX_TEXT,
                                  "token": token})
        resp.set_cookie(COOKIE, token, httponly=True, samesite="Lax")
        return resp

    async def stats(self, request: web.Request) -> web.Response:
        """What the proxies were asked: ``{"connect websocket ok": N, "publish refused":
        N, …}`` (transport ``websocket``, ``sse``, ``poll`` or ``http`` for /call)."""
        return web.json_response(dict(self.calls))

    # ------------------------------------------------------------ proxies (SPEC §11)

    async def proxy_connect(self, request: web.Request) -> web.Response:
        """``{"client","transport","ip","headers","token"}`` → the user of the session
        token (or of the forwarded session cookie), else 401."""
        body = await request.json()
        headers = {k.lower(): v for k, v in (body.get("headers") or {}).items()}
        name = self.user_of(body.get("token"), headers.get("cookie", ""))
        transport = str(body.get("transport"))
        self.calls[f"connect {transport} {'ok' if name else 'refused'}"] += 1
        if name is None:
            return web.json_response({"error": {"code": 401, "message": "log in first"}})
        return web.json_response({"result": {"user": name, "meta": {"name": name}}})

    async def proxy_publish(self, request: web.Request) -> web.Response:
        """``{"client","user","channel","data","meta"}`` → allowed as it is (``{"result":
        {}}``: nothing rewritten), or refused: a text over MAX_TEXT characters (413), a
        ``name`` that is not the sender's (403), data that is not an object (400).
        Typing signals and read receipts (no text) pass."""
        body = await request.json()
        data, user = body.get("data"), body.get("user")
        refusal = None
        if not isinstance(data, dict):
            refusal = 400, "data must be an object"
        elif "text" in data and (not isinstance(data["text"], str)
                                 or len(data["text"]) > MAX_TEXT):
            refusal = 413, f"message too long ({MAX_TEXT} characters at most)"
        elif "name" in data and data["name"] != user:
            refusal = 403, "name must be your own"
        self.calls["publish refused" if refusal else "publish ok"] += 1
        if refusal:
            return web.json_response({"error": {"code": refusal[0], "message": refusal[1]}})
        return web.json_response({"result": {}})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/fastws.js", self.fastws_js)
        app.router.add_static("/static/", HERE / "static")
        app.router.add_post("/login", self.login)
        app.router.add_get("/stats", self.stats)
        app.router.add_post("/proxy/connect", self.proxy_connect)
        app.router.add_post("/proxy/publish", self.proxy_publish)
        return app


def fastws_config(config: Path, port: int) -> Path:
    """``config``, or a temporary copy whose ``[proxy]`` URLs name this backend's
    ``port`` when it is not the default one the file names."""
    text = config.read_text()
    moved = text.replace(f"127.0.0.1:{PORT}/proxy/", f"127.0.0.1:{port}/proxy/")
    if moved == text:
        return config
    with tempfile.NamedTemporaryFile("w", suffix=".toml", prefix="chat-fastws-",
                                     delete=False) as f:
        f.write(moved)
    return Path(f.name)


def start_fastws(config: Path, port: int | None) -> subprocess.Popen[bytes]:
    """``fastws serve --config CONFIG`` as a child process."""
    cmd = [sys.executable, "-m", "fastws", "serve", "--config", str(config)]
    if port:
        cmd += ["--port", str(port)]
    return subprocess.Popen(cmd)


async def serve(args: argparse.Namespace) -> None:
    backend = Backend(args.config, args.fastws_port)
    config = None if args.no_fastws else fastws_config(args.config, args.port)
    child = None if config is None else start_fastws(config, args.fastws_port)
    runner = web.AppRunner(backend.app())
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    print(f"chat: http://{args.host}:{args.port}/ (users named by this backend's connect "
          f"proxy; fastws on port {backend.fastws_port})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        if child is not None:
            child.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(10)
        if config is not None and config != args.config:
            config.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=PORT, help=f"the backend's port ({PORT})")
    p.add_argument("--config", type=Path, default=HERE / "fastws.toml",
                   help="the fastws config (examples/chat/fastws.toml)")
    p.add_argument("--fastws-port", type=int, default=None,
                   help="fastws' port (default: the config's, 8765)")
    p.add_argument("--no-fastws", action="store_true",
                   help="do not start fastws (run it yourself with a config whose [proxy] "
                        "URLs name this backend's port)")
    asyncio.run(serve(p.parse_args(argv)))


if __name__ == "__main__":
    main()
