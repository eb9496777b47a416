"""A small application backend for the proxy tests: a real aiohttp server in the test's
event loop answering the connect / subscribe / publish / rpc proxies of fastws."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from conftest import free_port

Handler = Callable[[dict[str, Any]], Awaitable[Any] | Any]


class Backend:
    """Serves ``POST /connect``, ``/subscribe``, ``/publish``, ``/rpc`` with the
    handlers given (each takes the request's JSON and returns what is answered: a
    dict as JSON, bytes as they are); records every request body in ``calls``."""

    def __init__(self, **handlers: Handler) -> None:
        self.handlers = handlers
        self.calls: dict[str, list[dict[str, Any]]] = {}
        self.port = free_port()
        self.runner: web.AppRunner | None = None

    def url(self, kind: str) -> str:
        return f"http://127.0.0.1:{self.port}/{kind}"

    def proxy_toml(self, *kinds: str, **extra: Any) -> str:
        """A ``[proxy]`` table pointing ``kinds`` at this backend."""
        lines = ["[proxy]"] + [f'{k} = "{self.url(k)}"' for k in kinds]
        for key, value in extra.items():
            lines.append(f"{key} = {value!r}".replace("'", '"'))
        return "\n".join(lines) + "\n"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        kind = request.match_info["kind"]
        body = await request.json()
        self.calls.setdefault(kind, []).append(body)
        answer = self.handlers[kind](body)
        if asyncio.iscoroutine(answer):
            answer = await answer
        if isinstance(answer, web.StreamResponse):
            return answer
        if isinstance(answer, bytes):
            return web.Response(body=answer, content_type="application/json")
        return web.json_response(answer)

    async def __aenter__(self) -> Backend:
        app = web.Application()
        app.router.add_post("/{kind}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
