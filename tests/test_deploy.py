"""deploy/: the shipped nginx site in front of two real fastws nodes over TLS, and checks
of the systemd unit, the Prometheus rules, the Grafana dashboard, the Dockerfile and
the compose file.

nginx is Debian's package (``make system-deps``), run by the test as its own user with
every path inside a temporary directory and a self-signed certificate made by openssl.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path

import pytest
from conftest import (
    ROOT,
    ServerProc,
    free_port,
    http,
    scrape,
    start_server,
    wait_port,
    wait_status,
)
from wsclient import RawClient, connect

from fastws.config import load_config
from fastws.workers import STOP_GRACE

DEPLOY = ROOT / "deploy"
NGINX_SITE = DEPLOY / "nginx" / "fastws.conf"
DEFAULTS = load_config({}, {}).server


def _need(exe: str) -> str:
    path = shutil.which(exe) or (f"/usr/sbin/{exe}" if os.path.exists(f"/usr/sbin/{exe}")
                                 else None)
    if path is None:
        pytest.fail(f"{exe} is not installed (`make system-deps` installs it from Debian)")
    return path


# --------------------------------------------------------------------------- nginx


def make_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (openssl)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [_need("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=30)
    return cert, key


def _replace(pattern: str, repl: str, text: str, count: int) -> str:
    """re.sub that insists on exactly ``count`` matches (the shipped file changed?)."""
    out, n = re.subn(pattern, repl, text, flags=re.MULTILINE)
    assert n == count, f"expected {count} match(es) of {pattern!r} in {NGINX_SITE}, got {n}"
    return out


def render_site(cert: Path, key: Path, *, https_port: int | None = None,
                http_port: int | None = None, upstreams: list[int] | None = None) -> str:
    """The shipped site with test certificate paths, and optionally test ports/nodes."""
    site = NGINX_SITE.read_text()
    site = _replace(r"^(\s*ssl_certificate\s+)\S+;", rf"\g<1>{cert};", site, 1)
    site = _replace(r"^(\s*ssl_certificate_key\s+)\S+;", rf"\g<1>{key};", site, 1)
    if https_port is not None:
        site = _replace(r"^\s*listen \[::\]:(80|443)\b.*;\n", "", site, 2)
        site = _replace(r"^(\s*listen )443 ssl;", rf"\g<1>127.0.0.1:{https_port} ssl;", site, 1)
        site = _replace(r"^(\s*listen )80;", rf"\g<1>127.0.0.1:{http_port};", site, 1)
    if upstreams is not None:
        lines = "".join(f"    server 127.0.0.1:{p} max_fails=3 fail_timeout=10s;\n"
                        for p in upstreams)
        site = _replace(r"(^\s*server \d+\.\d+\.\d+\.\d+:\d+ .*;\n)+", lines, site, 1)
    return site


def write_nginx_conf(directory: Path, site: str) -> Path:
    """A main nginx.conf whose pid, logs and temp paths all live in ``directory``."""
    (directory / "site.conf").write_text(site)
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (directory / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    user = "user root root;\n" if os.geteuid() == 0 else ""  # workers as the test's user
    conf = directory / "nginx.conf"
    conf.write_text(f"""{user}worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 256; }}
http {{
    log_format upstreams '$request_uri $status $upstream_status';
    access_log {directory}/access.log upstreams;
    client_body_temp_path {directory}/tmp/body;
    proxy_temp_path {directory}/tmp/proxy;
    fastcgi_temp_path {directory}/tmp/fastcgi;
    uwsgi_temp_path {directory}/tmp/uwsgi;
    scgi_temp_path {directory}/tmp/scgi;
    include {directory}/site.conf;
}}
""")
    return conf


def nginx_test(directory: Path, conf: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_need("nginx"), "-t", "-p", str(directory), "-c", str(conf),
         "-e", str(directory / "error.log")], capture_output=True, text=True, timeout=30)


@dataclass
class Stack:
    """nginx (TLS on https_port) in front of fastws nodes ``nodes``."""

    nodes: list[ServerProc]
    https_port: int
    http_port: int
    ssl: ssl.SSLContext
    directory: Path

    @property
    def wss_url(self) -> str:
        return f"wss://127.0.0.1:{self.https_port}/ws"

    def get(self, path: str) -> tuple[int, dict, bytes]:
        opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=self.ssl))
        try:
            with opener.open(f"https://127.0.0.1:{self.https_port}{path}", timeout=10) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Two fastws nodes (memory broker each) behind the shipped nginx site, over TLS."""
    nodes = [start_server(config="[server]\ndrain_timeout = 2\n") for _ in range(2)]
    proc = None
    try:
        cert, key = make_cert(tmp_path)
        https_port, http_port = free_port(), free_port()
        site = render_site(cert, key, https_port=https_port, http_port=http_port,
                           upstreams=[n.port for n in nodes])
        conf = write_nginx_conf(tmp_path, site)
        proc = subprocess.Popen(
            [_need("nginx"), "-p", str(tmp_path), "-c", str(conf), "-e",
             str(tmp_path / "error.log"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_port(https_port, proc, timeout=10)
        except Exception:
            log = tmp_path / "error.log"
            raise RuntimeError("nginx did not start:\n" +
                               (log.read_text() if log.exists() else "")) from None
        ctx = ssl.create_default_context(cafile=str(cert))
        yield Stack(nodes, https_port, http_port, ctx, tmp_path)
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGQUIT)  # graceful stop
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for n in nodes:
            n.stop()
            for d in n.tmp:
                shutil.rmtree(d, ignore_errors=True)


async def _sub(c: RawClient, channel: str) -> None:
    reply = await c.request({"id": 1, "type": "subscribe", "channel": channel})
    assert reply == {"id": 1, "type": "subscribed", "channel": channel}, reply


async def test_websocket_over_tls_through_nginx_to_two_nodes(stack: Stack) -> None:
    # least_conn: the second connection goes to the node without one
    clients = [await connect(stack.wss_url, ssl_context=stack.ssl) for _ in range(2)]
    for c in clients:
        await _sub(c, "events:nginx")
    counts = [scrape(n.http_url)["fastws_connections"] for n in stack.nodes]
    assert counts == [1, 1], counts
    # memory broker: each node delivers its own publications; publish on both
    for i, node in enumerate(stack.nodes):
        await asyncio.to_thread(node.publish, "events:nginx", {"node": i})
    got = sorted([(await c.recv())["data"]["node"] for c in clients])
    assert got == [0, 1]
    # the API through nginx (keep-alive upstream, HTTP/1.1): one node gets it
    waiting = [asyncio.ensure_future(c.recv(timeout=10)) for c in clients]
    req = urllib.request.Request(
        f"https://127.0.0.1:{stack.https_port}/api/publish", method="POST",
        data=json.dumps({"channel": "events:nginx", "data": "via-nginx"}).encode(),
        headers={"Authorization": "Bearer test-key", "Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=stack.ssl))
    with opener.open(req, timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read())["offset"] >= 1
    done, pending = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    assert [t.result()["data"] for t in done] == ["via-nginx"]
    await asyncio.sleep(0.2)
    [other] = pending
    assert not other.done()  # the other node did not have it
    other.cancel()
    for c in clients:
        c.close()


def test_health_and_metrics_through_nginx(stack: Stack) -> None:
    status, _, body = stack.get("/healthz")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    status, _, body = stack.get("/readyz")
    assert status == 200, body
    status, headers, body = stack.get("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b"\nfastws_connections " in body and b"process_open_fds" in body
    # the plain-HTTP server only redirects to HTTPS
    conn = HTTPConnection("127.0.0.1", stack.http_port, timeout=10)
    conn.request("GET", "/ws")
    resp = conn.getresponse()
    assert resp.status == 301 and resp.getheader("Location") == "https://127.0.0.1/ws"
    conn.close()
    log = (stack.directory / "error.log").read_text()
    assert "upstream" not in log, log  # no upgrade refused as HTTP/1.0, no failures


async def test_draining_node_upgrades_are_retried_on_the_other(stack: Stack) -> None:
    """A rolling restart: SIGTERM one node; nginx sends new upgrades to the other."""
    a, b = stack.nodes
    first = await connect(stack.wss_url, ssl_context=stack.ssl)
    await _sub(first, "events:roll")
    on_a = scrape(a.http_url)["fastws_connections"] == 1
    drained = a if on_a else b
    other = b if on_a else a
    drained.proc.send_signal(signal.SIGTERM)
    status, _, body = await asyncio.to_thread(wait_status, drained.http_url + "/readyz", 503)
    assert status == 503 and json.loads(body)["reason"] == "draining"
    later = [await connect(stack.wss_url, ssl_context=stack.ssl) for _ in range(4)]
    for c in later:
        await _sub(c, "events:roll")
    assert scrape(other.http_url)["fastws_connections"] == 4
    push = await first.recv()
    assert push["type"] == "disconnect" and push["code"] == 4001 and push["reconnect"]
    assert await first.wait_closed() == 4001
    await asyncio.to_thread(other.publish, "events:roll", "after")
    for c in later:
        assert (await c.recv())["data"] == "after"
        c.close()
    assert await asyncio.to_thread(drained.proc.wait, 10) == 0
    # least_conn sent at least one of them to the draining node first: refused, retried
    log = (stack.directory / "access.log").read_text().splitlines()
    retried = [line for line in log if line.startswith("/ws 101 ") and "," in line]
    assert retried and all(line.split()[2] in ("503,", "502,") for line in retried), log


def test_shipped_nginx_site_passes_nginx_t(tmp_path: Path) -> None:
    """`nginx -t` on the file as shipped (only the certificate paths replaced)."""
    cert, key = make_cert(tmp_path)
    conf = write_nginx_conf(tmp_path, render_site(cert, key))
    res = nginx_test(tmp_path, conf)
    assert res.returncode == 0, res.stderr
    assert "syntax is ok" in res.stderr and "test is successful" in res.stderr


def _locations(site: str) -> dict[str, str]:
    """{location argument: body} of every location block (no nested blocks in ours)."""
    return {m.group(1).strip(): m.group(2)
            for m in re.finditer(r"^\s*location\s+([^{]+)\{(.*?)^\s*\}", site,
                                 re.MULTILINE | re.DOTALL)}


def _raw(port: int, request: bytes) -> bytes:
    """Send ``request`` and read the answer until the server closes the connection."""
    import socket

    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data


def test_http10_as_the_nginx_comment_says(server) -> None:
    """What deploy/nginx/fastws.conf and operations.md say about HTTP/1.0: a plain
    request is answered (200, Connection: close), an upgrade is refused with 400."""
    plain = _raw(server.port, b"GET /healthz HTTP/1.0\r\n\r\n")
    assert b" 200 " in plain.split(b"\r\n")[0] and b"Connection: close" in plain
    upgrade = _raw(server.port, b"GET /ws HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\n"
                   b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   b"Sec-WebSocket-Version: 13\r\n\r\n")
    assert b" 400 " in upgrade.split(b"\r\n")[0] and b"Unsupported HTTP version" in upgrade


def test_nginx_site_settings() -> None:
    site = NGINX_SITE.read_text()
    locations = _locations(site)
    assert {"/", "= /api/publish", "= /metrics"} <= set(locations)
    for name, body in locations.items():
        # the upgrade needs 1.1 (refused as 1.0 with 400); plain requests keep their
        # upstream connection alive only with 1.1: every proxied location says so
        assert re.search(r"^\s*proxy_http_version 1\.1;", body, re.M), name
        assert "proxy_pass http://fastws;" in body, name
    ws = locations["/"]
    heartbeat = DEFAULTS.ping_interval + DEFAULTS.pong_timeout
    for directive in ("proxy_read_timeout", "proxy_send_timeout"):
        seconds = int(re.search(rf"{directive} (\d+)s;", ws).group(1))
        assert seconds > heartbeat, (directive, seconds, heartbeat)
    assert "http_503" in ws  # upgrades refused by a draining node go to another
    for header in ("Upgrade $http_upgrade", "Connection $fastws_connection",
                   "X-Forwarded-For $proxy_add_x_forwarded_for"):
        assert re.search(r"proxy_set_header\s+" + header.replace(" ", r"\s+")
                         .replace("$", r"\$"), site), header
    upstream = re.search(r"upstream fastws \{(.*?)\}", site, re.DOTALL).group(1)
    assert len(re.findall(r"^\s*server ", upstream, re.M)) >= 2
    assert re.search(r"listen 443 ssl;", site) and "ssl_certificate_key" in site


# --------------------------------------------------------------------------- systemd


def _unit(path: Path) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = ""
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
            sections[current] = {}
            continue
        key, _, value = line.partition("=")
        sections[current].setdefault(key, []).append(value)
    return sections


def test_systemd_unit_settings() -> None:
    svc = _unit(DEPLOY / "systemd" / "fastws.service")["Service"]
    assert svc["KillSignal"] == ["SIGTERM"]
    assert svc["Restart"] == ["on-failure"]
    assert int(svc["LimitNOFILE"][0]) >= 200_000
    stop = int(svc["TimeoutStopSec"][0].rstrip("s"))
    # --workers: the supervisor SIGKILLs workers STOP_GRACE after drain_timeout
    assert stop > DEFAULTS.drain_timeout + STOP_GRACE, (stop, DEFAULTS.drain_timeout)
    assert svc["KillMode"] == ["mixed"]  # SIGTERM to the supervisor, which forwards it
    assert "-HUP" in svc["ExecReload"][0]
    assert svc["User"] != ["root"] and "fastws serve" in svc["ExecStart"][0]
    assert "2" in svc["RestartPreventExitStatus"][0].split()  # a bad config: no restart loop


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed on this machine (no systemd)")
    unit = (DEPLOY / "systemd" / "fastws.service").read_text()
    fastws_exe = Path(sys.executable).with_name("fastws")
    assert fastws_exe.exists(), fastws_exe
    rendered = unit.replace("/opt/fastws/venv/bin/fastws", str(fastws_exe))
    assert rendered != unit
    (tmp_path / "fastws.service").write_text(rendered)
    res = subprocess.run([exe, "verify", str(tmp_path / "fastws.service")],
                         capture_output=True, text=True, timeout=60)
    problems = [line for line in (res.stdout + res.stderr).splitlines()
                if "fastws.service" in line]
    assert res.returncode == 0 and not problems, res.stdout + res.stderr


# --------------------------------------------------------------------------- Prometheus


def _promtool() -> str:
    return _need("promtool")


def test_alert_rules_check_and_unit_tests() -> None:
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"],
                 ["check", "config", "prometheus.yml"]):
        res = subprocess.run([_promtool(), *args], cwd=DEPLOY / "prometheus",
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, (args, res.stdout, res.stderr)
    rules = (DEPLOY / "prometheus" / "alerts.yml").read_text()
    for alert in ("FastwsBrokerDown", "FastwsEventLoopLag", "FastwsSlowConsumerDisconnects",
                  "FastwsConnectionsDropped"):
        assert f"alert: {alert}" in rules


def _metric_names(text: str) -> set[str]:
    return set(re.findall(r"\b((?:fastws|process)_[a-z_]+)\b", text))


def test_rules_and_dashboard_use_metrics_the_server_exports(server) -> None:
    _, _, body = http("GET", server.http_url + "/metrics")
    exported = set()  # families (labelled ones may have no sample yet) and histogram series
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", body.decode(), re.M):
        exported.add(name)
        if kind == "histogram":
            exported |= {name + "_bucket", name + "_sum", name + "_count"}
    dashboard = json.loads((DEPLOY / "grafana" / "fastws.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [a.get("expr", "") for a in dashboard["annotations"]["list"]]
    used = _metric_names("\n".join(exprs))
    used |= _metric_names((DEPLOY / "prometheus" / "alerts.yml").read_text())
    workers_only = {"fastws_workers"}  # exported with --workers N only
    assert all(f'"{name}"' in (ROOT / "fastws" / "workers.py").read_text()
               for name in workers_only)
    missing = sorted(used - exported - workers_only)
    assert not missing, f"not exported by the server: {missing}"
    assert len(exprs) >= 20


def test_grafana_dashboard_structure() -> None:
    d = json.loads((DEPLOY / "grafana" / "fastws.json").read_text())
    assert d["uid"] == "fastws" and d["title"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in d["templating"]["list"]}
    assert {"datasource", "instance", "job"} <= variables
    for p in d["panels"]:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"] and all(t["expr"] for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
    titles = " ".join(p["title"].lower() for p in d["panels"])
    for word in ("connections", "latency", "event loop", "broker", "slow"):
        assert word in titles, word


# --------------------------------------------------------------------------- containers


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_and_non_root() -> None:
    """A static lint: no Docker engine (nor hadolint) here to build the image with."""
    ins = _dockerfile()
    stages = [args.split()[-1] for word, args in ins if word == "FROM"
              and " AS " in args.upper()]
    assert len([w for w, _ in ins if w == "FROM"]) >= 2 and len(stages) >= 2, stages
    final = len(ins) - 1 - [w for w, _ in ins][::-1].index("FROM")
    tail = ins[final:]
    users = [args for word, args in tail if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    for word, args in ins:
        if word == "COPY" and "--from=" in args:
            assert re.search(r"--from=(\S+)", args).group(1) in stages, args
    last = dict(tail)
    assert "8765" in last["EXPOSE"] and last["STOPSIGNAL"] == "SIGTERM"
    assert "healthz" in last["HEALTHCHECK"] and "fastws" in last["ENTRYPOINT"]
    assert not any(w == "RUN" and "gcc" in a for w, a in tail)  # no compiler at runtime


def test_dockerfile_context_has_what_the_build_needs() -> None:
    """Every COPY source exists, is let through the .dockerignore, and covers the build."""
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ignore[0] == "*" or "*" in ignore
    allowed = {p[1:].rstrip("/") for p in ignore if p.startswith("!")}
    sources: list[str] = []
    for word, args in _dockerfile():
        if word == "COPY" and "--from=" not in args:
            sources += args.split()[:-1]
    for src in sources:
        assert (ROOT / src).exists(), src
        assert src.rstrip("/") in allowed, f"{src} is excluded by Dockerfile.dockerignore"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = {"pyproject.toml", "setup.py", pyproject["project"]["readme"]}
    packages = pyproject["tool"]["setuptools"]["packages"]
    if isinstance(packages, dict):  # [tool.setuptools.packages.find] include = ["fastws*"]
        packages = [p.rstrip("*") for p in packages["find"]["include"]]
    needed |= {pkg.split(".")[0] for pkg in packages}
    assert needed <= {s.rstrip("/").removeprefix("./") for s in sources}, needed
    assert list((ROOT / "fastws").glob("*.pyx")), "the build compiles fastws/*.pyx"


def test_compose_file() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed in this environment")
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "fastws1", "fastws2", "prometheus", "grafana"} <= set(services)
    for name in ("fastws1", "fastws2"):
        svc = services[name]
        cmd = svc["command"]
        assert cmd[cmd.index("--broker") + 1] == "redis://redis:6379/0"
        assert (DEPLOY / svc["build"]["context"] / svc["build"]["dockerfile"]).exists()
        grace = int(str(svc["stop_grace_period"]).rstrip("s"))
        assert grace > int(svc["environment"]["FASTWS_DRAIN_TIMEOUT"])
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            assert (DEPLOY / volume.split(":")[0]).exists(), volume
    for sub in ("datasources/prometheus.yml", "dashboards/fastws.yml"):
        assert yaml.safe_load((DEPLOY / "grafana" / "provisioning" / sub).read_text())
