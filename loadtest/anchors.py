"""The servers fastws is compared with, set up at run time in temporary directories.

Each anchor is a one-channel broadcaster: a WebSocket connection on ``/sub`` is a
subscriber, and every publication is sent on to all of them unchanged.  The publisher
is a WebSocket on ``/pub`` (each message is broadcast, then answered ``ok``: the ack
the harness's in-flight window waits for), except for Nchan, whose publisher is an
HTTP ``POST /pub``.  Nothing is installed into the repository:

* ``nchan``: nginx 1.22 + Debian's ``libnginx-mod-nchan`` (``apt-get install
  libnginx-mod-nchan``), one worker process, ``nchan_subscriber websocket`` (and
  ``nchan_subscriber eventsource`` on ``/sse``, for loadtest.sse).
* ``node-ws``: Node.js + ``npm install ws@8`` into a temporary directory.
* ``websockets``: Python ``websockets`` (asyncio server, ``broadcast()``), on uvloop.
* ``picows``: a bare picows broadcaster: ``transport.send`` to every subscriber, one
  ``send(2)`` per delivery (no batching): what fastws would be without its queue.

``start(name, port, cpu)`` returns a running :class:`Anchor`; ``available()`` says which
anchors can run on this machine (and why not).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.fanout import stop_process

__all__ = ["ANCHORS", "Anchor", "available", "start"]

ANCHORS = ("nchan", "node-ws", "websockets", "picows")
NCHAN_MODULE_DIRS = ("/usr/lib/nginx/modules", "/usr/share/nginx/modules")

NGINX_CONF = """\
worker_processes 1;
daemon off;
master_process off;
worker_rlimit_nofile 19500;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
load_module {module};
events {{ worker_connections 19000; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 100000000;
    nchan_message_buffer_length 16;
    nchan_message_timeout 30s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /sub {{
            nchan_subscriber websocket;
            nchan_channel_id bench;
            nchan_subscriber_first_message newest;
        }}
        location = /sse {{
            nchan_subscriber eventsource;
            nchan_channel_id bench;
            nchan_subscriber_first_message newest;
        }}
        location = /pub {{
            nchan_publisher http;
            nchan_channel_id bench;
        }}
    }}
}}
"""

NODE_SERVER = """\
// one-channel broadcaster on ws@8: /sub subscribes, each /pub message is broadcast
const { WebSocketServer } = require('ws');
const wss = new WebSocketServer({ host: '127.0.0.1', port: +process.argv[2],
                                  perMessageDeflate: false, clientTracking: false,
                                  backlog: 4096 });
const subs = new Set();
wss.on('connection', (ws, req) => {
  if (req.url.startsWith('/pub')) {
    ws.on('message', (data, isBinary) => {
      for (const s of subs) s.send(data, { binary: isBinary });
      ws.send('ok');
    });
  } else {
    subs.add(ws);
    ws.on('close', () => subs.delete(ws));
  }
});
wss.on('listening', () => console.log('listening'));
"""

WEBSOCKETS_SERVER = """\
# one-channel broadcaster on python websockets: /sub subscribes, /pub broadcasts
import asyncio, sys
import uvloop
from websockets.asyncio.server import broadcast, serve

SUBS = set()

async def handler(ws):
    if ws.request.path.startswith("/pub"):
        async for msg in ws:
            broadcast(SUBS, msg)
            await ws.send("ok")
    else:
        SUBS.add(ws)
        try:
            await ws.wait_closed()
        finally:
            SUBS.discard(ws)

async def main():
    async with serve(handler, "127.0.0.1", int(sys.argv[1]), compression=None,
                     max_queue=None, ping_interval=None, backlog=4096):
        print("listening", flush=True)
        await asyncio.Future()

uvloop.run(main())
"""

PICOWS_SERVER = """\
# bare picows broadcaster: /sub subscribes, each /pub message is sent to every subscriber
import asyncio, sys
import uvloop
from picows import WSListener, WSMsgType, ws_create_server

SUBS = set()

class Sub(WSListener):
    def on_ws_connected(self, transport):
        self.transport = transport
        SUBS.add(transport)
    def on_ws_disconnected(self, transport):
        SUBS.discard(transport)

class Pub(WSListener):
    def on_ws_frame(self, transport, frame):
        if frame.msg_type == WSMsgType.TEXT:
            payload = frame.get_payload_as_bytes()
            for t in SUBS:
                t.send(WSMsgType.TEXT, payload)
            transport.send(WSMsgType.TEXT, b"ok")
        elif frame.msg_type == WSMsgType.CLOSE:
            transport.disconnect()

def factory(request):
    return Pub() if request.path.startswith(b"/pub") else Sub()

async def main():
    server = await ws_create_server(factory, "127.0.0.1", int(sys.argv[1]),
                                    read_buffer_init_size=2048, backlog=4096)
    print("listening", flush=True)
    await server.serve_forever()

uvloop.run(main())
"""


@dataclass
class Anchor:
    """A running anchor: where to subscribe and publish, and its process."""

    name: str
    sub_url: str
    pub_url: str
    pub_mode: str               # "raw" (WebSocket) or "http"
    proc: subprocess.Popen
    tmp: Path
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self, tail: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return (self.tmp / "out.log").read_text(errors="replace")[-tail:]
        return ""

    def stop(self) -> None:
        stop_process(self.proc, self.tmp)


def _nchan_module() -> str | None:
    for d in NCHAN_MODULE_DIRS:
        p = Path(d) / "ngx_nchan_module.so"
        if p.exists():
            return str(p)
    return None


def available() -> dict[str, str | None]:
    """Anchor name → None if it can run here, else why not (and what to install)."""
    out: dict[str, str | None] = {}
    if not shutil.which("nginx"):
        out["nchan"] = "nginx not found: apt-get install nginx libnginx-mod-nchan"
    elif not _nchan_module():
        out["nchan"] = "ngx_nchan_module.so not found: apt-get install libnginx-mod-nchan"
    else:
        out["nchan"] = None
    if not shutil.which("node") or not shutil.which("npm"):
        out["node-ws"] = "node/npm not found: install Node.js 18+"
    else:
        out["node-ws"] = None
    try:
        import websockets  # noqa: F401
        out["websockets"] = None
    except ImportError:
        out["websockets"] = "python websockets not installed: pip install websockets"
    out["picows"] = None
    return out


def _versions(name: str, tmp: Path) -> dict[str, str]:
    def run(*cmd: str) -> str:
        with contextlib.suppress(Exception):
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        return "?"

    if name == "nchan":
        pkg = run("dpkg-query", "-W", "-f=${Version}", "libnginx-mod-nchan")
        return {"nginx": run("nginx", "-v"), "libnginx-mod-nchan": pkg}
    if name == "node-ws":
        with contextlib.suppress(Exception):
            import json

            ver = json.loads((tmp / "node_modules/ws/package.json").read_text())["version"]
            return {"node": run("node", "--version"), "ws": ver}
        return {"node": run("node", "--version")}
    if name == "websockets":
        import websockets

        return {"websockets": websockets.__version__}
    import picows

    return {"picows": getattr(picows, "__version__", "?")}


def start(name: str, port: int, cpu: int | None = None, timeout: float = 120) -> Anchor:
    """Set up and start anchor ``name`` on 127.0.0.1:``port`` (pinned to ``cpu``)."""
    why = available().get(name, f"unknown anchor {name!r}")
    if why:
        raise RuntimeError(f"{name}: {why}")
    tmp = Path(tempfile.mkdtemp(prefix=f"fastws-anchor-{name}-"))
    pub_mode = "raw"
    env = dict(os.environ)
    if name == "nchan":
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=tmp, module=_nchan_module(), port=port))
        cmd = ["nginx", "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf)]
        pub_mode = "http"
    elif name == "node-ws":
        (tmp / "server.js").write_text(NODE_SERVER)
        (tmp / "package.json").write_text('{"name": "fastws-anchor", "private": true}\n')
        npm = subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund",
                              "ws@8"], cwd=tmp, capture_output=True, text=True,
                             timeout=timeout)
        if npm.returncode != 0:
            raise RuntimeError(f"node-ws: npm install ws@8 failed: {npm.stderr[-500:]}")
        cmd = ["node", str(tmp / "server.js"), str(port)]
    elif name == "websockets":
        (tmp / "server.py").write_text(WEBSOCKETS_SERVER)
        cmd = [sys.executable, str(tmp / "server.py"), str(port)]
    elif name == "picows":
        (tmp / "server.py").write_text(PICOWS_SERVER)
        cmd = [sys.executable, str(tmp / "server.py"), str(port)]
    else:
        raise RuntimeError(f"unknown anchor {name!r}")
    if cpu is not None and shutil.which("taskset"):
        cmd = ["taskset", "-c", str(cpu), *cmd]
    with open(tmp / "out.log", "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp, env=env)
    base = f"127.0.0.1:{port}"
    anchor = Anchor(name, f"ws://{base}/sub",
                    f"http://{base}/pub" if pub_mode == "http" else f"ws://{base}/pub",
                    pub_mode, proc, tmp, _versions(name, tmp))
    _wait_port(port, anchor, 30)
    return anchor


def _wait_port(port: int, anchor: Anchor, timeout: float) -> None:
    import socket
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if anchor.proc.poll() is not None:
            out = anchor.output()
            anchor.stop()
            raise RuntimeError(f"{anchor.name} exited ({anchor.proc.returncode}): {out}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            time.sleep(0.2)
            return
        time.sleep(0.05)
    anchor.stop()
    raise RuntimeError(f"{anchor.name} did not listen on {port} within {timeout:.0f} s")
