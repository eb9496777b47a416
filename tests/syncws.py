"""A blocking, byte-exact WebSocket client for tests: it sends exactly the frames it is
told (any opcode, FIN, RSV bits, even a lying length) and reads frames with their RSV1
bit, so hostile input and permessage-deflate can be checked on the wire."""

from __future__ import annotations

import os
import socket
import struct

import orjson

RSV1 = 4   # the ``rsv`` value of the compressed bit (permessage-deflate)


def handshake(extensions: str | None = None) -> bytes:
    """An upgrade request for /ws, offering ``extensions`` when given."""
    ext = f"Sec-WebSocket-Extensions: {extensions}\r\n" if extensions else ""
    return (f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            f"{ext}\r\n").encode()


class Closed(Exception):
    """The server closed the WebSocket; ``args[0]`` is the code."""


class SyncWS:
    """One upgraded connection; ``headers`` are the 101 answer's (lower-cased names)."""

    def __init__(self, port: int, timeout: float = 10.0,
                 extensions: str | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.sendall(handshake(extensions))
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(4096)
            assert chunk, "closed during the handshake"
            head += chunk
        head, self.buf = head.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.headers = {k.strip().lower(): v.strip() for k, _, v in
                        (line.partition(":") for line in head.decode().split("\r\n")[1:])}

    @staticmethod
    def frame(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0,
              length: int | None = None) -> bytes:
        """One masked frame; ``length`` may lie about the payload's size."""
        n = len(payload) if length is None else length
        first = (0x80 if fin else 0) | (rsv & 7) << 4 | (opcode & 0x0F)
        if n < 126:
            head = struct.pack("!BB", first, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", first, 0x80 | 126, n)
        else:
            head = struct.pack("!BBQ", first, 0x80 | 127, n)
        mask = os.urandom(4)
        k = len(payload)
        body = (int.from_bytes(payload, "little") ^ int.from_bytes(
            (mask * (k // 4 + 1))[:k], "little")).to_bytes(k, "little") if k else b""
        return head + mask + body

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True, rsv: int = 0,
                   length: int | None = None) -> None:
        self.sock.sendall(self.frame(opcode, payload, fin, rsv, length))

    def send_json(self, msg: object) -> None:
        self.send_frame(1, orjson.dumps(msg))

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_frame(self) -> tuple[int, bool, bytes]:
        """(opcode, RSV1 set, payload) of the next frame."""
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        return b0 & 0x0F, bool(b0 & 0x40), self._read(n)

    def recv_frame(self) -> tuple[int, bytes]:
        """(opcode, payload) of the next frame."""
        op, _, payload = self.read_frame()
        return op, payload

    def recv_json(self) -> dict:
        """The next TEXT message (pings are answered, pongs skipped); raises on close."""
        while True:
            op, payload = self.recv_frame()
            if op == 1:
                return orjson.loads(payload)
            if op == 8:
                raise Closed(struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005)
            if op == 9:
                self.send_frame(10, payload)

    def close_code(self) -> int:
        """Read until the CLOSE frame; its code (a reset fails the test)."""
        while True:
            op, payload = self.recv_frame()
            if op == 8:
                return struct.unpack("!H", payload[:2])[0]

    def close(self) -> None:
        self.sock.close()
