"""A plain WebSocket echo server for protocol-conformance testing (``fastws serve --echo``).

Every TEXT and BINARY message (up to 16 MiB, fragmented or not) is sent back as one
unfragmented message of the same type and bytes. All RFC 6455 checks come from
:mod:`fastws.frames`, the same code the pub/sub listener uses, so running Autobahn
(kosoku) against this server tests the real thing.

Run it with ``python -m fastws.echo --port 9001`` or call :func:`run` / :func:`serve_echo`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys

import uvloop
from picows import WSFrame, WSListener, WSTransport, WSUpgradeRequest, ws_create_server

from fastws.frames import MessageAssembler, receive

DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "EchoListener", "main", "run", "serve_echo"]


class EchoListener(WSListener):
    """One connection: reassemble and validate with a MessageAssembler, send messages back."""

    def __init__(self, max_message_size: int) -> None:
        super().__init__()
        self._assembler = MessageAssembler(max_message_size)
        self._transport: WSTransport | None = None

    def on_ws_connected(self, transport: WSTransport) -> None:
        """Remember the transport, for backpressure."""
        self._transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Called by picows for every frame; echoes each complete data message."""
        msg = receive(self._assembler, transport, frame)
        if msg is not None:
            transport.send(msg[0], msg[1])

    def pause_writing(self) -> None:
        """The peer reads slower than it sends: stop reading until our replies drain."""
        if self._transport is not None:
            self._transport.underlying_transport.pause_reading()

    def resume_writing(self) -> None:
        """Our replies drained below the low-water mark: read again."""
        if self._transport is not None:
            self._transport.underlying_transport.resume_reading()


async def serve_echo(host: str, port: int, *,
                     max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
    """Serve the echo protocol on host:port until cancelled."""

    def factory(_request: WSUpgradeRequest) -> WSListener:
        return EchoListener(max_message_size)

    server = await ws_create_server(
        factory, host, port,
        enable_auto_pong=False,             # PINGs go through the assembler (RSV checks)
        max_frame_size=max_message_size,    # one bigger frame: picows closes with 1009
        websocket_handshake_timeout=10,
    )
    async with server:
        await server.serve_forever()


async def _serve_until_signal(host: str, port: int, max_message_size: int) -> None:
    task = asyncio.create_task(serve_echo(host, port, max_message_size=max_message_size))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


def run(host: str, port: int, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> int:
    """Run the echo server under uvloop until SIGTERM or SIGINT; returns the exit status."""
    try:
        uvloop.run(_serve_until_signal(host, port, max_message_size))
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
    args = parser.parse_args(argv)
    return run(args.host, args.port, max_message_size=args.max_message_size)


if __name__ == "__main__":
    sys.exit(main())
