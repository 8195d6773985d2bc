"""The SDK's WebSocket connection to a hub, over a Trio stream (the client's side).

wsproto does the opening handshake (the HTTP request out, the 101 answer in, with its
checks of the answer); after that `_frames` does the framing, as it does for the hub:
masked frames out, the server's unmasked frames in. Two things make it cheaper than a
general-purpose client, and both are the hub's own habits:

- Messages are read in the task that asks for them (`get_message`): one read takes
  whatever has arrived and parses every frame in it, and the messages wait in a list
  for the next calls. No reader task, no channel, no task switch per message. Nothing
  is read while nobody asks, so a slow consumer holds the hub back through TCP.
- Frames sent are queued, and a writer task writes everything queued since its last
  write in one system call (the hub reads them in one). The queue is bounded in bytes:
  `send_message` waits for room while it is full.

On plain TCP it reads and writes the socket with `os.read`/`os.write` (checking first,
each time, that the socket is still open); through TLS, with the stream's calls.
"""

from __future__ import annotations

import os
import sys
from collections import deque
from collections.abc import Sequence

import attrs
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, Request
from wsproto.utilities import ProtocolError

from . import _frames as f

__all__ = [
    "ClientWebSocket",
    "CloseReason",
    "ConnectionClosed",
    "HandshakeFailed",
    "HandshakeRejected",
    "open_client_websocket",
]

_READ_SIZE = 65536
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)
YIELD_BYTES = 1 << 16  # queued bytes beyond which `send_message` yields first
OUTBOX_BYTES = 1 << 20  # and beyond which it waits for room


@attrs.frozen
class CloseReason:
    """How a connection closed: the close code and reason (1006: lost, no close frame)."""

    code: int
    reason: str


class ConnectionClosed(Exception):
    """The connection is closed, closing, or broken; `reason` says how, as far as known."""

    def __init__(self, reason: CloseReason) -> None:
        super().__init__(f"{reason.code} {reason.reason}".strip())
        self.reason = reason


class HandshakeFailed(Exception):
    """The opening handshake did not complete: the peer hung up, or did not answer as a
    WebSocket server does."""


class HandshakeRejected(HandshakeFailed):
    """The server answered the opening handshake with an HTTP error (`status_code`)."""

    def __init__(self, status_code: int) -> None:
        super().__init__(f"HTTP {status_code} to the WebSocket upgrade")
        self.status_code = status_code


async def open_client_websocket(
    nursery: trio.Nursery,
    stream: trio.abc.Stream,
    host: str,
    resource: str,
    *,
    headers: Sequence[tuple[bytes, bytes]] = (),
    max_message_size: int = 1 << 20,
) -> ClientWebSocket:
    """Do the opening handshake on `stream` (``Host: host``, ``GET resource``, `headers`
    added), then start the connection's writer task in `nursery`.

    Raises `HandshakeRejected` for an HTTP error answer, `HandshakeFailed` if the peer hung
    up or answered with something else. No timeout here (the caller bounds it); on
    cancellation the stream is left as it is, for the caller to close.
    """
    ws = WSConnection(ConnectionType.CLIENT)
    try:
        request = Request(host=host, target=resource, extra_headers=list(headers))
        await stream.send_all(ws.send(request))
        while True:
            data = await stream.receive_some(_READ_SIZE)
            if not data:
                raise HandshakeFailed("the server closed the connection during the handshake")
            ws.receive_data(bytes(data))
            for event in ws.events():
                if isinstance(event, AcceptConnection):
                    connection = ClientWebSocket(
                        stream, max_message_size=max_message_size, received=_trailing_data(ws)
                    )
                    nursery.start_soon(connection._write_loop)
                    return connection
                if isinstance(event, RejectConnection):
                    raise HandshakeRejected(event.status_code)
    except ProtocolError as exc:
        raise HandshakeFailed(f"not a WebSocket answer: {exc}") from None
    except _BROKEN as exc:
        raise HandshakeFailed(f"the connection broke during the handshake: {exc}") from None


def _trailing_data(ws: WSConnection) -> bytes:
    """What the server sent right behind its 101 answer (h11 keeps it aside)."""
    h11_connection = getattr(ws.handshake, "_h11_connection", None)
    trailing = getattr(h11_connection, "trailing_data", (b"", False))
    return bytes(trailing[0])


def _socket_of(stream: trio.abc.Stream) -> trio.socket.SocketType | None:
    """The socket, if frames may be read and written on it with `os.read`/`os.write`."""
    if sys.platform == "win32" or not isinstance(stream, trio.SocketStream):
        return None
    return stream.socket


class ClientWebSocket:
    """An open client connection: `get_message()` in one task at a time, `send_message()`
    from any, `aclose()` to close. Its writer task (started by `open_client_websocket`)
    ends once the close frame is out or the connection broke.

    `closed` is None while the connection is open, then how it closed. Pings are
    answered; the connection does not send any of its own (the SDK heartbeats in the
    protocol)."""

    def __init__(
        self, stream: trio.abc.Stream, *, max_message_size: int, received: bytes = b""
    ) -> None:
        self._stream = stream
        self._socket = _socket_of(stream)
        self._reader = f.ClientFrameReader(max_message_size)
        self._masker = f.Masker()
        self._messages: deque[str | bytes] = deque()
        self._early = received
        self._full_read = True  # the last read filled the buffer: read again at once
        self._outbox: list[bytes] = []
        self._queued = 0  # bytes in the outbox and in the write under way
        self._writer_idle = True  # parked, waiting for frames
        self._writer_running = True  # until the writer task ends
        self._cut = False  # a write is part done: cancelled now, the stream is mid-frame
        self._direct = trio.Lock()  # for senders that write themselves (no writer task)
        self._wake_writer = trio.lowlevel.ParkingLot()
        self._room = trio.lowlevel.ParkingLot()  # senders waiting for the outbox to drain
        self._close_sent = False  # a close frame is queued (nothing is queued after it)
        self._done = False  # nothing more is written: the close is out, or writing broke
        self._closed: CloseReason | None = None
        self._peer_closed = trio.Event()  # reading is over: the close came, or the stream broke
        self._consumer = False  # some task reads with `get_message`: `aclose` leaves it to it
        self.read_time = 0.0  # when the last bytes were read (trio's clock)

    @property
    def closed(self) -> CloseReason | None:
        return self._closed

    # -- sending -----------------------------------------------------------------------

    async def send_message(self, message: str | bytes) -> None:
        """Queue `message` as a text frame (bytes: its UTF-8) for the writer task; returns
        once it is queued.
        That is at once (without yielding) while the outbox holds little; past
        `YIELD_BYTES` it yields first, so that a task sending in a loop lets the writer
        and the others run, and past `OUTBOX_BYTES` it waits for room. Raises
        `ConnectionClosed` if the connection is closed or closing. If cancelled (before,
        or while it waits), nothing is queued; once queued, the frame goes out unless
        the connection breaks first.

        Once the writer task is gone (cancelled with its nursery: the connection is being
        torn down) while the stream is still open, the frame is written here instead, as
        a plain client would: a shielded last word (a cancel, a deregister) still goes."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._queued >= YIELD_BYTES and self._writer_running:
            await trio.lowlevel.checkpoint()
            while self._queued >= OUTBOX_BYTES and self._writer_running and not self._done:
                await self._room.park()
        if self._close_sent or self._closed is not None or self._done:
            raise ConnectionClosed(self._closed or CloseReason(1000, "closing"))
        data = message.encode() if isinstance(message, str) else message
        frame = self._masker.frame(f.TEXT, data)
        if self._writer_running:
            self._queue(frame)
            return
        try:  # one frame after another on the stream; and at once, if nobody else writes
            self._direct.acquire_nowait()
        except trio.WouldBlock:
            await self._direct.acquire()
        try:
            data = b"".join([*self._outbox, frame])  # after what the writer left, if any
            self._outbox, self._queued = [], 0
            await self._write(data)
        except (*_BROKEN, OSError):
            self._lost()
            raise ConnectionClosed(self._closed or CloseReason(1006, "")) from None
        finally:
            self._direct.release()

    def send_nowait(self, message: str | bytes) -> bool:
        """`send_message` when it would neither wait nor yield: queue `message` and
        return True; or, with the outbox past `YIELD_BYTES`, the connection closing or
        closed, or no writer task, queue nothing and return False."""
        if (
            self._queued >= YIELD_BYTES
            or not self._writer_running
            or self._close_sent
            or self._closed is not None
            or self._done
        ):
            return False
        data = message.encode() if isinstance(message, str) else message
        self._queue(self._masker.frame(f.TEXT, data))
        return True

    def _queue(self, frame: bytes) -> None:
        self._outbox.append(frame)
        self._queued += len(frame)
        if self._writer_idle:
            self._writer_idle = False
            self._wake_writer.unpark()

    async def _write_loop(self) -> None:
        """The writer task: what is queued, in one write each time it wakes, until the
        close frame is out or the stream breaks (then it returns, and wakes everyone
        waiting for room: their sends raise). Cancelled, it writes what is queued if the
        socket takes it at once, and leaves the rest to the senders (`send_message`); a
        write it cut short leaves the stream mid-frame: the connection is then lost."""
        writing: bytes | None = None
        try:
            while not self._done:
                if not self._outbox:
                    self._writer_idle = True
                    await self._wake_writer.park()
                    continue
                closing = self._close_sent
                writing = b"".join(self._outbox) if len(self._outbox) > 1 else self._outbox[0]
                self._outbox = []
                await self._write(writing)
                self._queued -= len(writing)
                writing = None
                if closing and not self._outbox:
                    self._done = True  # the close frame was the last thing queued
                elif self._queued < OUTBOX_BYTES:
                    self._room.unpark_all()
        except (*_BROKEN, OSError):
            self._lost()
        finally:
            self._writer_running = False
            if self._cut:
                self._lost()
            elif not self._done:  # cancelled
                if writing is not None:  # none of it went out: it is still to send
                    self._outbox.insert(0, writing)
                self._write_now()
            self._room.unpark_all()

    def _write_now(self) -> None:
        """Write what is queued if the socket takes it at once (plain TCP); what it does
        not take, whole frames, stays queued. No waiting, no yielding."""
        sock = self._socket
        if sock is None or not self._outbox:
            return
        data = b"".join(self._outbox)
        fd = sock.fileno()
        try:
            written = os.write(fd, data) if fd >= 0 else -1
        except BlockingIOError:
            written = 0
        except OSError:
            written = -1
        if written == len(data):
            self._outbox, self._queued = [], 0
        elif written != 0:  # broken, or a frame cut short
            self._lost()

    async def _write(self, data: bytes) -> None:
        """Write all of `data`. While only part of it is out, `_cut` says so: cancelled
        then, the stream is left mid-frame."""
        sock = self._socket
        if sock is None:
            self._cut = True  # a cancelled TLS write leaves the stream broken anyway
            await self._stream.send_all(data)
            self._cut = False
            return
        view = memoryview(data)
        while view:
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                pass
            if view:
                self._cut = len(view) < len(data)
                await trio.lowlevel.wait_writable(fd)
        self._cut = False

    def _lost(self) -> None:
        """The stream broke (or was closed under us): no close handshake."""
        if self._closed is None:
            self._closed = CloseReason(1006, "connection lost")
        self._done = True
        self._room.unpark_all()
        if self._writer_idle:
            self._writer_idle = False
            self._wake_writer.unpark()  # to see that it is done, and return
        self._peer_closed.set()

    # -- receiving ---------------------------------------------------------------------

    async def get_message(self) -> str | bytes:
        """The next message (text as str, binary as bytes), reading more only when none
        is left of the last read (`read_time` says when that was). Raises
        `ConnectionClosed` once the server closed (answering its close frame), broke the
        protocol (closing with its code), or the stream broke; the messages before that
        are returned first. Cancelling it loses nothing: a read that was under way had
        read nothing yet."""
        self._consumer = True
        messages = self._messages
        while not messages:
            if self._closed is not None:
                raise ConnectionClosed(self._closed)
            data = await self._read()
            self.read_time = trio.current_time()
            self._received(data)
        return messages.popleft()

    async def _read(self) -> bytes | bytearray:
        """The next bytes from the server (b"" once it is gone), with one turn of the
        scheduler either way. After a read that filled the buffer more is likely
        waiting: read at once; otherwise wait until epoll says the socket is readable
        (as the hub does)."""
        if self._early:
            data, self._early = self._early, b""
            await trio.lowlevel.checkpoint()
            return data
        sock = self._socket
        try:
            if sock is None:
                return await self._stream.receive_some(_READ_SIZE)
            if self._full_read:
                await trio.lowlevel.checkpoint_if_cancelled()
                now = self._read_now(sock)
                if now is not None:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return now
            while True:
                fd = sock.fileno()
                if fd < 0:
                    return b""
                await trio.lowlevel.wait_readable(fd)
                now = self._read_now(sock)
                if now is not None:
                    return now
        except (*_BROKEN, OSError):
            return b""

    def _read_now(self, sock: trio.socket.SocketType) -> bytes | None:
        """What the socket holds now; None if nothing, b"" if it is closed."""
        fd = sock.fileno()
        if fd < 0:
            return b""
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return None
        self._full_read = len(data) == _READ_SIZE
        return data

    def _received(self, data: bytes | bytearray) -> None:
        """Parse what was read: messages to the list, pings answered, a close answered."""
        if not data:
            self._lost()
            return
        try:
            events = self._reader.receive(data)
        except f.FrameError as exc:  # the server broke the protocol: close with the code
            self._close(exc.code, exc.reason)
            self._finish(CloseReason(exc.code, exc.reason))
            return
        for opcode, payload in events:
            if opcode == f.TEXT or opcode == f.BINARY:
                self._messages.append(payload)
            elif opcode == f.PING:
                assert isinstance(payload, bytes)
                if not self._close_sent:
                    self._queue(self._masker.frame(f.PONG, payload))
            elif opcode == f.CLOSE:
                assert isinstance(payload, bytes)
                try:
                    code, reason = f.parse_close(payload)
                except f.FrameError as exc:
                    self._close(exc.code, exc.reason)
                    self._finish(CloseReason(exc.code, exc.reason))
                    return
                self._close(code if code != 1005 else 1000, "")  # the echo, unless ours went
                self._finish(CloseReason(code, reason))

    def _finish(self, reason: CloseReason) -> None:
        if self._closed is None:
            self._closed = reason
        self._peer_closed.set()

    # -- closing -----------------------------------------------------------------------

    def _close(self, code: int, reason: str) -> None:
        """Queue the close frame, unless one is queued already; nothing is sent after it."""
        if self._close_sent or self._done:
            return
        self._close_sent = True
        self._queue(self._masker.close(code, reason))

    async def aclose(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame and wait for the server's: read by the task that reads
        with `get_message`, or here if no task ever did (the messages still arriving
        are then dropped). Bound it with a timeout: a server that does not answer, or a
        reader that stopped reading, blocks it. On cancellation the close frame may or
        may not be out; the caller closes the stream either way."""
        self._close(code, reason)
        if self._consumer:
            await self._peer_closed.wait()
            return
        while not self._peer_closed.is_set() and self._closed is None:
            self._messages.clear()
            try:
                await self.get_message()
            except ConnectionClosed:
                pass
