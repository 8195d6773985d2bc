"""A lean WebSocket client for the load generator.

The load generator must cost less than the server it measures, or it measures itself.
A general-purpose client (trio-websocket) spends a task switch and a channel hop on
every message it receives and a socket write on every message it sends; this one reads
whatever has arrived and parses every frame in it in one pass, and writes the frames
queued since the last write at once. It speaks RFC 6455 the way any client must (masked
frames, a real opening handshake, done by wsproto), so the servers it loads cannot tell
it from another client; it knows only what the benchmark needs: text frames, and a close.
"""

from __future__ import annotations

import os
import struct
from urllib.parse import urlsplit

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, Request

_READ_SIZE = 65536
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")
_LEN16 = struct.Struct("!H")
_LEN64 = struct.Struct("!Q")


class Closed(Exception):
    """The server closed the connection."""


class Connection:
    """One client connection: `queue` text frames and `flush` them, `receive` texts."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._fd = stream.socket.fileno()
        self._out: list[bytes] = []
        self._pending = b""
        self._mask = os.urandom(4)
        self._key = int.from_bytes(self._mask * 1024, "little")  # the mask for 4 KiB

    @classmethod
    async def open(cls, url: str) -> Connection:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        stream = await trio.open_tcp_stream(host, port)
        ws = WSConnection(ConnectionType.CLIENT)
        await stream.send_all(ws.send(Request(host=f"{host}:{port}", target=parts.path or "/")))
        while True:
            data = await stream.receive_some(_READ_SIZE)
            if not data:
                raise Closed("closed during the handshake")
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    return cls(stream)
                if isinstance(event, RejectConnection):
                    raise Closed(f"handshake refused: {event.status_code}")

    def queue(self, text: str) -> None:
        """Add a masked text frame to what the next `flush` writes."""
        payload = text.encode()
        n = len(payload)
        if n < 126:
            head = bytes((0x81, 0x80 | n))
        elif n < 1 << 16:
            head = _HEAD16.pack(0x81, 0x80 | 126, n)
        else:
            head = _HEAD64.pack(0x81, 0x80 | 127, n)
        key = self._key if n <= 4096 else int.from_bytes(self._mask * (n // 4 + 1), "little")
        key &= (1 << (8 * n)) - 1
        masked = (int.from_bytes(payload, "little") ^ key).to_bytes(n, "little")
        self._out.append(head + self._mask + masked)

    async def flush(self) -> None:
        """Write what is queued: at once if the socket takes it all (it nearly always
        does), else through trio."""
        if self._out:
            data = b"".join(self._out)
            self._out = []
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                written = 0
            if written < len(data):
                await self.stream.send_all(data[written:])

    async def send(self, text: str) -> None:
        self.queue(text)
        await self.flush()

    async def receive(self) -> list[str]:
        """The text messages in the next data to arrive (maybe none). Raises `Closed`.

        It waits for epoll to say the socket is readable before reading (as the hub
        does): a read straight away would most often find nothing."""
        while True:
            await trio.lowlevel.wait_readable(self._fd)
            try:
                data = os.read(self._fd, _READ_SIZE)
                break
            except BlockingIOError:
                continue
            except OSError as exc:
                raise Closed(f"connection broken: {exc}") from None
        if not data:
            raise Closed("connection closed")
        buf = self._pending + data if self._pending else data
        end, pos = len(buf), 0
        texts: list[str] = []
        while end - pos >= 2:
            first, length = buf[pos], buf[pos + 1] & 0x7F
            head = pos + 2
            if length == 126:
                if end - pos < 4:
                    break
                (length,) = _LEN16.unpack_from(buf, pos + 2)
                head = pos + 4
            elif length == 127:
                if end - pos < 10:
                    break
                (length,) = _LEN64.unpack_from(buf, pos + 2)
                head = pos + 10
            if end - head < length:
                break
            opcode = first & 0x0F
            if opcode == 0x1:
                texts.append(buf[head : head + length].decode())
            elif opcode == 0x8:
                raise Closed(f"closed by the server: {bytes(buf[head : head + length])!r}")
            pos = head + length
        self._pending = bytes(buf[pos:])
        return texts

    async def aclose(self) -> None:
        await self.stream.aclose()
