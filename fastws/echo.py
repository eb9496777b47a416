"""A plain WebSocket echo server for protocol-conformance testing (``fastws serve --echo``).

Every TEXT and BINARY message (up to 16 MiB, fragmented or not) is sent back as one
unfragmented message of the same type and bytes. All RFC 6455 checks come from
:mod:`fastws.frames`, the same code the pub/sub listener uses, so running Autobahn
(kosoku) against this server tests the real thing.  permessage-deflate is negotiated
exactly as on ``/ws`` (:func:`fastws.frames.negotiate_deflate`); on a compressed
connection every echo goes back compressed (see :func:`deflate_echo`).
``GET /healthz`` answers ``{"status":"ok"}``; nothing else is served.

Run it with ``python -m fastws.echo --port 9001`` or call :func:`run` / :func:`serve_echo`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import zlib

import uvloop
from picows import (
    WSFrame,
    WSListener,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from fastws.frames import MessageAssembler, negotiate_deflate, receive

DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "EchoListener", "deflate_echo", "main", "run", "serve_echo"]


class EchoListener(WSListener):
    """One connection: reassemble and validate with a MessageAssembler, send messages back."""

    def __init__(self, max_message_size: int, window_bits: int = 0) -> None:
        super().__init__()
        self._assembler = MessageAssembler(max_message_size)
        self._assembler.deflate = window_bits > 0
        self._window_bits = window_bits         # 0: plain echoes only
        self._transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        """Remember the transport, for backpressure."""
        self._transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Called by picows for every frame; echoes each complete data message."""
        msg = receive(self._assembler, transport, frame)
        if msg is None:
            return
        if self._window_bits:
            packed = deflate_echo(msg[1], self._window_bits)
            transport.send(msg[0], packed, rsv1=True)
            return
        transport.send(msg[0], msg[1])

    def pause_writing(self) -> None:
        """The peer reads slower than it sends: stop reading until our replies drain."""
        if self._transport is not None:
            self._transport.underlying_transport.pause_reading()

    def resume_writing(self) -> None:
        """Our replies drained below the low-water mark: read again."""
        if self._transport is not None:
            self._transport.underlying_transport.resume_reading()


HEALTHZ = b'{"status":"ok"}'


def deflate_echo(payload: bytes, window_bits: int) -> bytes:
    """One message compressed on its own (RFC 7692 7.2.1) with a ``window_bits`` window.

    The echo server compresses every echo on a compressed connection, small or not:
    Autobahn's compression cases (kosoku 12.*, 13.*) check each echo that way.  zlib
    has no 8-bit raw window; 9 is used then, as Autobahn itself does.  Level 1: the
    conformance cases echo ~1.5 GB, and the level is not part of the negotiation.
    """
    packer = zlib.compressobj(1, zlib.DEFLATED, -max(window_bits, 9))
    return (packer.compress(payload) + packer.flush(zlib.Z_SYNC_FLUSH))[:-4]


async def serve_echo(host: str, port: int, *,
                     max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                     compression: bool = True) -> None:
    """Serve the echo protocol on host:port until cancelled."""

    def factory(request: WSUpgradeRequest) -> object:
        if request.path.split(b"?")[0] == b"/healthz":
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_ok_response(
                HEALTHZ, {"Content-Type": "application/json"}), None)
        offer = ", ".join(request.headers.getall("sec-websocket-extensions", ()))
        deal = negotiate_deflate(offer) if offer and compression else None
        if deal is None:
            return EchoListener(max_message_size)
        bits = deal[0].rpartition("server_max_window_bits=")[2]
        listener = EchoListener(max_message_size, int(bits) if bits.isdigit() else 15)
        return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(
            {"Sec-WebSocket-Extensions": deal[0]}), listener)

    server = await ws_create_server(
        factory, host, port,
        enable_auto_pong=False,             # PINGs go through the assembler (RSV checks)
        max_frame_size=max_message_size,    # one bigger frame: picows closes with 1009
        websocket_handshake_timeout=10,
    )
    async with server:
        await server.serve_forever()


async def _serve_until_signal(host: str, port: int, max_message_size: int,
                              compression: bool) -> None:
    task = asyncio.create_task(serve_echo(host, port, max_message_size=max_message_size,
                                          compression=compression))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def run(host: str, port: int, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        compression: bool = True) -> int:
    """Run the echo server under uvloop until SIGTERM or SIGINT; returns the exit status."""
    try:
        uvloop.run(_serve_until_signal(host, port, max_message_size, compression))
    except OSError as exc:
        print(f"fastws echo: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m fastws.echo [--host H] [--port P] [--max-message-size N]``."""
    parser = argparse.ArgumentParser(prog="python -m fastws.echo", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--max-message-size", type=int, default=DEFAULT_MAX_MESSAGE_SIZE)
    parser.add_argument("--no-compression", action="store_true")
    args = parser.parse_args(argv)
    return run(args.host, args.port, max_message_size=args.max_message_size,
               compression=not args.no_compression)


if __name__ == "__main__":
    sys.exit(main())
