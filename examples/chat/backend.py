"""The chat example's backend: serves the page, names users, and (SPEC §11) acts as
fastws' connect and publish proxy.  ``python examples/chat/backend.py`` also starts
``fastws serve --config examples/chat/fastws.toml``; ``--no-fastws`` leaves that to you.

Users log in with a name (no password: it is an example).  ``POST /login`` sets a signed
session cookie and, unless fastws.toml has a ``[proxy] connect`` URL, answers a JWT for
fastws (``sub`` = the name).  With the proxy configured the page sends no token:
fastws asks ``POST /proxy/connect`` who the connection is (from its forwarded Cookie),
and ``POST /proxy/publish`` checks every message (at most MAX_TEXT characters) and
stamps the sender's name into it.  Both answer the JSON shapes of SPEC §11
(``{"result": …}`` or ``{"error": {"code", "message"}}``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import importlib.resources
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import jwt
from aiohttp import web

HERE = Path(__file__).resolve().parent
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
MAX_TEXT = 500                  # characters in one message (the publish proxy's limit)
TOKEN_TTL = 3600                # seconds a JWT is valid (the page logs in again after)
COOKIE = "chat_session"


class Backend:
    """The backend's state: the fastws config it shares, and the cookie signing key."""

    def __init__(self, config_path: Path, fastws_port: int | None) -> None:
        cfg = tomllib.loads(config_path.read_text())
        server = cfg.get("server", {})
        self.secret: str = server.get("jwt_secret", "")
        self.fastws_port = fastws_port or int(server.get("port", 8765))
        self.proxy_mode = bool(cfg.get("proxy", {}).get("connect"))
        self.cookie_key = hashlib.sha256(b"chat-cookie:" + self.secret.encode()).digest()

    # ------------------------------------------------------------ sessions

    def cookie_for(self, name: str) -> str:
        mac = hmac.new(self.cookie_key, name.encode(), hashlib.sha256).digest()
        return f"{name}.{base64.urlsafe_b64encode(mac[:18]).decode()}"

    def user_of_cookie(self, header: str) -> str | None:
        """The logged-in name a ``Cookie`` header proves, or None."""
        for part in header.split(";"):
            key, _, value = part.strip().partition("=")
            if key == COOKIE:
                name = value.rpartition(".")[0]
                if NAME_RE.match(name) and hmac.compare_digest(value, self.cookie_for(name)):
                    return name
        return None

    def token_for(self, name: str) -> str:
        now = int(time.time())
        return jwt.encode({"sub": name, "iat": now, "exp": now + TOKEN_TTL}, self.secret,
                          algorithm="HS256")

    # ------------------------------------------------------------ pages

    async def index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(HERE / "static" / "index.html")

    async def fastws_js(self, request: web.Request) -> web.Response:
        """The browser client of the installed fastws (same origin as the page)."""
        text = importlib.resources.files("fastws").joinpath("static/fastws.js").read_text()
        return web.Response(text=text, content_type="text/javascript")

    async def login(self, request: web.Request) -> web.Response:
        """``{"name"}`` → the session cookie, and ``{"name", "token", "ws"}``."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        name = body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not NAME_RE.match(name):
            return web.json_response({"error": "a name is 1-32 letters, digits, _ or -"},
                                     status=400)
        host = request.host.rpartition(":")[0] if ":" in request.host else request.host
        ws = f"ws://{host}:{self.fastws_port}/ws"
        resp = web.json_response({"name": name, "ws": ws, "max_text": MAX_TEXT,
                                  "token": None if self.proxy_mode else self.token_for(name)})
        resp.set_cookie(COOKIE, self.cookie_for(name), httponly=True, samesite="Lax")
        return resp

    # ------------------------------------------------------------ proxies (SPEC §11)

    async def proxy_connect(self, request: web.Request) -> web.Response:
        """``{"client","transport","ip","headers","token"}`` → the user of the cookie."""
        body = await request.json()
        headers = {k.lower(): v for k, v in (body.get("headers") or {}).items()}
        name = self.user_of_cookie(headers.get("cookie", ""))
        if name is None:
            return web.json_response({"error": {"code": 401, "message": "log in first"}})
        return web.json_response({"result": {"user": name, "expire_at": None,
                                             "meta": {"name": name}}})

    async def proxy_publish(self, request: web.Request) -> web.Response:
        """``{"client","user","channel","data"}`` → allowed (with the sender's name
        stamped in), or refused when the text is too long."""
        body = await request.json()
        data = body.get("data")
        if not isinstance(data, dict):
            return web.json_response({"error": {"code": 400, "message": "data must be an "
                                                 "object"}})
        text = data.get("text")
        if text is not None and (not isinstance(text, str) or len(text) > MAX_TEXT):
            return web.json_response({"error": {"code": 413, "message": "message too long "
                                                 f"({MAX_TEXT} characters at most)"}})
        return web.json_response({"result": {"data": {**data, "name": body.get("user")}}})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_get("/fastws.js", self.fastws_js)
        app.router.add_static("/static/", HERE / "static")
        app.router.add_post("/login", self.login)
        app.router.add_post("/proxy/connect", self.proxy_connect)
        app.router.add_post("/proxy/publish", self.proxy_publish)
        return app


def start_fastws(config: Path, port: int | None) -> subprocess.Popen[bytes]:
    """``fastws serve --config CONFIG`` as a child process."""
    cmd = [sys.executable, "-m", "fastws", "serve", "--config", str(config)]
    if port:
        cmd += ["--port", str(port)]
    return subprocess.Popen(cmd)


async def serve(args: argparse.Namespace) -> None:
    backend = Backend(args.config, args.fastws_port)
    child = None if args.no_fastws else start_fastws(args.config, args.fastws_port)
    runner = web.AppRunner(backend.app())
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    mode = "connect proxy" if backend.proxy_mode else "JWT"
    print(f"chat: http://{args.host}:{args.port}/ (users named by {mode}; fastws on port "
          f"{backend.fastws_port})", flush=True)
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="the backend's port (8080)")
    p.add_argument("--config", type=Path, default=HERE / "fastws.toml",
                   help="the fastws config (examples/chat/fastws.toml)")
    p.add_argument("--fastws-port", type=int, default=None,
                   help="fastws' port (default: the config's, 8765)")
    p.add_argument("--no-fastws", action="store_true", help="do not start fastws")
    asyncio.run(serve(p.parse_args(argv)))


if __name__ == "__main__":
    main()
