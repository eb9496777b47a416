"""The fan-out harness's compiled subscriber and anchor mode (loadtest/_fastsub.pyx,
loadtest/anchors.py), checked for exact accounting, never for speed."""

from __future__ import annotations

import time
import zlib

import pytest
from picows import WSMsgType
from picows.picows import _make_test_ws_frame

from loadtest import anchors, fanout
from loadtest._build import load_fastsub


def _event(t: int, seq: int) -> bytes:
    return (b'{"type":"event","channel":"bench:fanout","data":{"t":%d,"seq":%d,'
            b'"pad":"xx"}}' % (t, seq))


def _feed(sub: object, payloads: list[bytes]) -> None:
    for p in payloads:
        sub.on_ws_frame(None, _make_test_ws_frame(WSMsgType.TEXT, p, True, False))


def test_compiled_subscriber_accounts_like_the_python_one() -> None:
    """Same frames → same counters and histogram in both hot paths."""
    fast = load_fastsub()
    now = time.time_ns()
    seqs = [1, 2, 3, 3, 5, 4, 6, 7]           # a duplicate, a gap, a late one
    payloads = [_event(now - 1000 * (100 + 37 * s), s) for s in seqs]
    payloads.append(b'{"t":%d,"seq":8}' % now)   # an anchor's bare payload
    payloads.append(b'{"id":1,"type":"error","code":400,"message":"x"}')
    replies: list[bytes] = []

    py_stats = fanout.Stats()
    c_stats = fast.CStats()
    for st in (py_stats, c_stats):
        st.win_start, st.win_end = now - 10**10, now + 10**10
    py_sub = fanout.Subscriber(py_stats)
    c_sub = fast.FastSubscriber(c_stats, lambda s, b: (replies.append(b),
                                                      fanout.on_reply(s, b)),
                                fanout.on_control)
    _feed(py_sub, payloads)
    _feed(c_sub, payloads)
    for name in ("received", "in_window", "duplicates", "gaps", "bad_frames"):
        assert getattr(c_stats, name) == getattr(py_stats, name), name
    assert (c_stats.received, c_stats.duplicates, c_stats.gaps) == (9, 2, 1)
    assert c_sub.last == py_sub.last == 8
    assert sum(c_stats.hist) == sum(py_stats.hist) == 9
    assert c_stats.first_error.startswith('{"id":1,"type":"error"')
    assert replies and b'"error"' in replies[0]
    # the latencies land in the same buckets (clocks differ by the feed time only)
    assert abs(c_stats.max_us - py_stats.max_us) < 50_000


@pytest.mark.timeout(120)
def test_raw_protocol_against_the_picows_anchor() -> None:
    """--protocol raw + --pub-mode raw: a bare broadcaster, exact accounting."""
    a = anchors.start("picows", fanout.free_port())
    try:
        args = fanout.parse_args(["--url", a.sub_url, "--server-pid", str(a.pid),
                                  "--protocol", "raw", "--pub-url", a.pub_url,
                                  "--pub-mode", "raw", "--label", "picows",
                                  "--subscribers", "100", "--procs", "1", "--duration", "1",
                                  "--warmup", "0.3", "--rate", "200", "--quiet"])
        args._argv = None
        r = fanout.run(args)
    finally:
        a.stop()
    assert r["connected"] == 100 and r["publications"] > 0, r
    assert r["lost"] == r["duplicates"] == r["out_of_order"] == r["disconnected"] == 0, r
    assert r["deliveries"] == r["publications"] * 100
    assert r["params"]["client"] in ("compiled", "python")


def test_lanes_are_checked_each_in_order_in_both_hot_paths() -> None:
    """--path http-conns: 3 connections number 1,4,7… / 2,5,8… / 3,6,9…; any
    interleaving of the lanes is in order, a repeat or a skip within a lane is not."""
    fast = load_fastsub()
    now = time.time_ns()
    seqs = [2, 1, 3, 6, 4, 5, 9, 7, 8,    # lanes interleaved: all in order
            4,                            # a duplicate (lane 0, number 2 again)
            13]                           # lane 0 skips 10: a gap
    payloads = [_event(now, s) for s in seqs]
    py_stats, c_stats = fanout.Stats(), fast.CStats()
    py_stats.lanes = c_stats.lanes = 3
    py_sub = fanout.Subscriber(py_stats)
    c_sub = fast.FastSubscriber(c_stats, fanout.on_reply, fanout.on_control)
    _feed(py_sub, payloads)
    _feed(c_sub, payloads)
    for st in (py_stats, c_stats):
        assert (st.received, st.duplicates, st.gaps, st.bad_frames) == (11, 1, 1, 0)
    assert c_sub.last == py_sub.last == 10        # distinct publications seen


def test_compiled_subscriber_inflates_compressed_frames() -> None:
    """RSV1 frames (permessage-deflate) are inflated and accounted as plain ones."""
    fast = load_fastsub()
    now = time.time_ns()
    stats = fast.CStats()
    stats.win_start, stats.win_end = now - 10**10, now + 10**10
    sub = fast.FastSubscriber(stats, fanout.on_reply, fanout.on_control)
    for seq in (1, 2):
        packer = zlib.compressobj(6, zlib.DEFLATED, -15)
        payload = _event(now, seq) + b" " * 2000
        packed = (packer.compress(payload) + packer.flush(zlib.Z_SYNC_FLUSH))[:-4]
        sub.on_ws_frame(None, _make_test_ws_frame(WSMsgType.TEXT, packed, True, True))
    assert (stats.received, stats.gaps, stats.bad_frames, stats.compressed) == (2, 0, 0, 2)
    assert sub.last == 2 and stats.wire_bytes < 400


def test_inflate_every_counts_skipped_pushes_and_still_sees_a_loss() -> None:
    """--inflate-every 4: three pushes in four are counted unread as the next numbers;
    a push missing in between shows as a gap at the next inflated one."""
    fast = load_fastsub()
    now = time.time_ns()
    stats = fast.CStats()
    stats.win_start, stats.win_end = now - 10**10, now + 10**10
    sub = fast.FastSubscriber(stats, fanout.on_reply, fanout.on_control)

    def push(seq: int) -> None:
        packer = zlib.compressobj(6, zlib.DEFLATED, -15)
        payload = _event(now, seq) + b" " * 2000
        packed = (packer.compress(payload) + packer.flush(zlib.Z_SYNC_FLUSH))[:-4]
        sub.on_ws_frame(None, _make_test_ws_frame(WSMsgType.TEXT, packed, True, True))

    fast.set_inflate_every(4)
    try:
        for seq in range(1, 10):      # 1 and 5 and 9 inflated, the rest counted
            push(seq)
        assert (stats.received, stats.gaps, stats.duplicates, stats.compressed) == (9, 0, 0, 9)
        assert sub.last == 9 and stats.in_window == 9
        for seq in (10, 11, 12, 14):  # 13 lost: 14 is inflated and is not 13
            push(seq)
        assert stats.gaps == 1 and sub.last == 14
    finally:
        fast.set_inflate_every(1)


@pytest.mark.timeout(120)
def test_compressed_smoke_run() -> None:
    """--compression --event demo for a second: every delivery arrives, compressed."""
    args = fanout.parse_args(["--smoke", "--subscribers", "40", "--procs", "1",
                              "--duration", "1", "--warmup", "0.3", "--compression",
                              "--event", "demo", "--quiet"])
    args._argv = None
    r = fanout.run(args)
    assert r["connected"] == 40 and r["publications"] > 0, r
    assert r["lost"] == r["duplicates"] == r["out_of_order"] == r["bad_frames"] == 0, r
    assert r["compressed_deliveries"] == r["deliveries"] == r["publications"] * 40
    assert r["wire_bytes_per_delivery"] < 700          # ~1.1 KB pushes, compressed
