"""The transport edge (SPEC §9): permessage-deflate and lingering closes, on a real server
with raw sockets (byte-exact frames, RSV1 seen on the wire)."""

from __future__ import annotations

import os
import socket
import threading
import time
import zlib
from collections.abc import Iterator

import orjson
import pytest
from conftest import ServerProc, scrape, start_server
from fastws._fanout import deflate_payload, make_frame
from syncws import RSV1, SyncWS

from fastws.frames import DEFLATE_ANSWER, negotiate_deflate

OFFER_CHROMIUM = "permessage-deflate; client_max_window_bits"
TAIL = b"\x00\x00\xff\xff"


def inflate(payload: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(payload + TAIL)


def deflate(payload: bytes) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    return (packer.compress(payload) + packer.flush(zlib.Z_SYNC_FLUSH))[:-4]


def message(ws: SyncWS) -> tuple[bool, dict]:
    """(was compressed, JSON) of the next TEXT message; fails on a CLOSE."""
    while True:
        op, rsv1, payload = ws.read_frame()
        if op == 1:
            return rsv1, orjson.loads(inflate(payload) if rsv1 else payload)
        assert op != 8, ("closed", payload)


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProc]:
    server = start_server(config="[namespaces.chat]\npublish = \"anyone\"\n")
    yield server
    server.stop(timeout=5)
    assert "Traceback" not in server.output(), server.output()


# ---------------------------------------------------------------------- negotiation


@pytest.mark.parametrize(("offer", "answer"), [
    ("permessage-deflate", (DEFLATE_ANSWER, True)),
    (OFFER_CHROMIUM, (DEFLATE_ANSWER, True)),
    ("x-webkit-deflate-frame, permessage-deflate; server_no_context_takeover",
     (DEFLATE_ANSWER, True)),
    ("permessage-deflate; server_max_window_bits=10",
     (DEFLATE_ANSWER + "; server_max_window_bits=10", False)),
    ("permessage-deflate; server_max_window_bits=15", (DEFLATE_ANSWER, True)),
    ("permessage-deflate; bogus, permessage-deflate", (DEFLATE_ANSWER, True)),
    ("permessage-deflate; server_max_window_bits=7", None),
    ("permessage-deflate; server_max_window_bits", None),
    ("permessage-deflate; client_no_context_takeover; client_no_context_takeover", None),
    ("permessage-deflate; server_no_context_takeover=1", None),
    ("x-other", None),
])
def test_negotiate_deflate(offer: str, answer: tuple[str, bool] | None) -> None:
    assert negotiate_deflate(offer) == answer


def test_deflate_payload_is_raw_deflate_without_the_tail() -> None:
    data = orjson.dumps({"data": ["abc" * 10] * 50})
    packed = deflate_payload(data)
    assert packed is not None and len(packed) < len(data) // 4
    assert inflate(packed) == data
    assert deflate_payload(os.urandom(600)) is None            # does not shrink: plain
    assert make_frame(b"x", 1, True)[0] == 0xC1                 # FIN | RSV1 | TEXT


# ---------------------------------------------------------------------- compression


def test_offer_is_answered_and_publications_go_out_compressed(srv: ServerProc) -> None:
    ws = SyncWS(srv.port, extensions=OFFER_CHROMIUM)
    plain = SyncWS(srv.port)
    assert ws.headers["sec-websocket-extensions"] == DEFLATE_ANSWER
    assert "sec-websocket-extensions" not in plain.headers
    for c in (ws, plain):
        c.send_frame(1, b'{"id":1,"type":"subscribe","channel":"chat:z"}')
        assert message(c)[1]["type"] == "subscribed"
    assert scrape(srv.http_url)["fastws_connections_compressed"] == 1
    big = {"event": "Transfer", "rows": [{"from": "0x" + "ab" * 20, "value": i}
                                         for i in range(20)]}
    srv.publish("chat:z", big)                       # > 512 B: compressed once
    srv.publish("chat:z", "small")                   # < 512 B: plain
    compressed, push = message(ws)
    assert compressed and push["data"] == big
    compressed, small = message(ws)
    assert not compressed and small["data"] == "small"
    assert message(plain) == (False, push)
    assert message(plain)[1]["data"] == "small"
    # a compressed client message (RSV1) is inflated and served
    ws.send_frame(1, deflate(b'{"id":2,"type":"ping"}'), rsv=RSV1)
    assert message(ws)[1] == {"id": 2, "type": "pong"}
    # a compressed message in fragments: RSV1 on the first frame only
    packed = deflate(b'{"id":3,"type":"ping","pad":"' + b"p" * 3000 + b'"}')
    ws.send_frame(1, packed[:10], fin=False, rsv=RSV1)
    ws.send_frame(0, packed[10:])
    assert message(ws)[1] == {"id": 3, "type": "pong"}
    ws.sock.close()
    plain.sock.close()


def test_rsv1_without_negotiation_closes_1002(srv: ServerProc) -> None:
    ws = SyncWS(srv.port)
    ws.send_frame(1, deflate(b'{"id":1,"type":"ping"}'), rsv=RSV1)
    assert ws.close_code() == 1002


def test_deflate_bomb_closes_1009_after_the_limit(srv: ServerProc) -> None:
    """64 MiB of zeros deflate to ~64 KiB: max_message_size (64 KiB) counts the inflated
    bytes, so the server stops at the limit and closes 1009 with bounded memory."""
    ws = SyncWS(srv.port, extensions="permessage-deflate")
    bomb = deflate(b"\x00" * (64 << 20))
    assert len(bomb) < 65536
    ws.send_frame(1, bomb, rsv=RSV1)
    assert ws.close_code() == 1009


def test_compression_can_be_turned_off() -> None:
    server = start_server("--no-compression")
    try:
        ws = SyncWS(server.port, extensions=OFFER_CHROMIUM)
        assert "sec-websocket-extensions" not in ws.headers
        ws.send_frame(1, deflate(b'{"id":1,"type":"ping"}'), rsv=RSV1)
        assert ws.close_code() == 1002
    finally:
        server.stop(timeout=5)


# ---------------------------------------------------------------------- lingering close


def _keep_sending(sock: socket.socket, frames: list[bytes], stop: threading.Event) -> None:
    """Send every frame (then one more each 10 ms until ``stop``), never reading."""
    try:
        for f in frames:
            sock.sendall(f)
        while not stop.wait(0.01):
            sock.sendall(frames[-1])
    except OSError:
        pass


def close_code_while_sending(ws: SyncWS, frames: list[bytes]) -> int:
    """The code of the CLOSE frame ``ws`` reads while a thread keeps sending ``frames``
    (and more) without reading; a reset instead of the frame fails the test."""
    stop = threading.Event()
    sender = threading.Thread(target=_keep_sending, args=(ws.sock, frames, stop))
    sender.start()
    try:
        return ws.close_code()
    finally:
        stop.set()
        sender.join()
        ws.sock.close()


def test_rate_limited_burst_gets_the_4029_close_frame(srv: ServerProc) -> None:
    """800 subscribes sent without reading: the client reads the 4029 CLOSE (not a reset)."""
    ws = SyncWS(srv.port)
    frames = [SyncWS.frame(1, orjson.dumps({"id": i, "type": "subscribe", "channel": f"chat:{i}"}))
              for i in range(800)]
    assert close_code_while_sending(ws, frames) == 4029


def test_oversize_fragmented_message_gets_the_1009_close_frame(srv: ServerProc) -> None:
    """1 MiB in 16 KiB fragments (max_message_size is 64 KiB): the 1009 CLOSE arrives."""
    ws = SyncWS(srv.port)
    chunk = b"a" * 16384
    frames = [SyncWS.frame(1 if i == 0 else 0, chunk, fin=False) for i in range(64)]
    assert close_code_while_sending(ws, frames) == 1009


def test_lingering_close_ends_when_the_peer_closes(srv: ServerProc) -> None:
    """After its CLOSE the server half-closes (EOF follows the CLOSE frame) and drops the
    connection as soon as the peer closes, well before the 2 s linger."""
    ws = SyncWS(srv.port)
    ws.send_frame(2, b"\x00")                         # binary: 1003
    assert ws.close_code() == 1003
    assert ws.sock.recv(10) == b""                    # FIN after the CLOSE frame
    ws.sock.close()
    deadline = time.monotonic() + 1.5
    while scrape(srv.http_url)["fastws_connections"] != 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)


# ---------------------------------------------------------------------- stalled readers


@pytest.mark.timeout(120)
def test_stalled_readers_cost_at_most_their_send_buffer() -> None:
    """100 readers that stall beside 20 fast ones (send_buffer scaled down to 256 KiB):
    RSS grows by at most 1.2 × send_buffer per stalled reader + 20 MB, every stalled
    reader is dropped, every fast one gets everything, and RSS comes back after."""
    from loadtest import stalled

    send_buffer = 256 * 1024
    r = stalled.run(stalled=100, fast=20, publications=4000, size=2048,
                    send_buffer=send_buffer)
    assert r["fast_complete"] == 20, r
    assert r["ended"] == 100 and set(r["close_codes"]) <= {4008}, r
    assert r["growth_bytes"] <= 100 * 1.2 * send_buffer + 20e6, r
    assert r["rss_after_close_kib"] - r["rss_before_kib"] < 10 * 1024, r
