"""How small can ``--event demo`` pushes get with permessage-deflate, per message?

The pushes of ``python -m loadtest.fanout --event demo[1|3]`` (a client publication's
``event`` push, with its ``from``) compressed three ways, each message on its own as
``server_no_context_takeover`` requires: fastws' own deflate (the frame every compressed
receiver gets), zlib at level 9, and zopfli (an exhaustive deflate encoder: the
smallest valid deflate stream within reach, ~1,000× slower, not for a server).  What
zopfli cannot go below, no deflate encoder can be expected to: it bounds the wire
bytes of RFC 7692 without context takeover for this data.

zopfli is not a dependency of fastws: ``pip install zopfli`` first.

    python -m loadtest.deflate_bound
"""

from __future__ import annotations

import os
import sys
import time
import zlib

from fastws._fanout import deflate_payload

from fastws import protocol
from loadtest.fanout import CHANNEL, demo_events


def main() -> int:
    try:
        import zopfli.zlib as zopfli_zlib
    except ImportError:
        print("loadtest.deflate_bound: needs zopfli (pip install zopfli)", file=sys.stderr)
        return 2
    for bets in (1, 2, 3):
        tot = {"raw": 0, "fastws": 0, "zlib9": 0, "zopfli": 0}
        events = demo_events(bets)
        for i, ev in enumerate(events):
            data = b'{"t":%d,"seq":%d,"pad":%s}' % (time.time_ns(), 100000 + i, ev)
            msg = protocol.event_payload_from(
                CHANNEL, data, 200000 + i, "4bbaf68d", False,
                {"user": None, "client": os.urandom(8).hex()})
            tot["raw"] += len(msg)
            tot["fastws"] += len(deflate_payload(msg))
            z = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
            tot["zlib9"] += len(z.compress(msg) + z.flush(zlib.Z_SYNC_FLUSH)) - 4
            # the zlib wrapper: 2 bytes of header, 4 of Adler-32 around the deflate stream
            tot["zopfli"] += len(zopfli_zlib.compress(msg, numiterations=50)) - 6
        raw = tot.pop("raw")
        print(f"--event demo{bets if bets != 2 else ''}: {raw / len(events):,.1f} B per push; "
              + ", ".join(f"{k} {v / raw:.3f}x" for k, v in tot.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
