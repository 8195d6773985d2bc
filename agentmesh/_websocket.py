"""The hub's WebSocket connections over a Trio stream.

wsproto reads the opening handshake (an HTTP request, where its header checks are worth
having); after that `_frames` does the framing. One task per connection reads and hands
the messages straight to its caller (no channel, no second task per message). Frames
sent are queued; the `Flusher` writes what each connection has queued in one
non-blocking write, and a writer task per connection sends what the socket did not take
at once (and everything, for TLS). `send` never blocks: the outbox is bounded and a
full outbox is the caller's problem to settle.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from collections.abc import Sequence

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.utilities import ProtocolError, RemoteProtocolError

from . import _frames as f

__all__ = ["ConnectionClosed", "Flusher", "Handshake", "ServerWebSocket", "remote_address"]

log = logging.getLogger("agentmesh.hub")

_READ_SIZE = 65536
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)


class ConnectionClosed(Exception):
    """The connection is closed (or broken): `code` and `reason` say how, as far as known."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}".strip())
        self.code = code
        self.reason = reason


def remote_address(stream: trio.abc.Stream) -> str:
    """``host:port`` of the peer, for logs."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        try:
            host, port, *_ = stream.socket.getpeername()
            return f"{host}:{port}"
        except (OSError, ValueError):
            pass
    return "?"


class Handshake:
    """A client's opening handshake, read but not yet answered.

    `Handshake.read(stream)` returns None if the client hung up or sent a bad request
    (it then got a 4xx answer); the caller then `accept`s or `reject`s. No timeout here:
    the caller bounds the handshake.
    """

    def __init__(self, stream: trio.abc.Stream, ws: WSConnection, request: Request) -> None:
        self.stream = stream
        self.request = request
        self._ws = ws

    @property
    def target(self) -> str:
        """The request target: the path and the query string."""
        return self.request.target

    @property
    def headers(self) -> Sequence[tuple[bytes, bytes]]:
        return self.request.extra_headers

    @classmethod
    async def read(cls, stream: trio.abc.Stream) -> Handshake | None:
        ws = WSConnection(ConnectionType.SERVER)
        while True:
            try:
                data = await stream.receive_some(_READ_SIZE)
            except _BROKEN:
                return None
            if not data:
                return None
            try:
                ws.receive_data(bytes(data))
                for event in ws.events():
                    if isinstance(event, Request):
                        return cls(stream, ws, event)
            except RemoteProtocolError as exc:
                await _answer_bad_request(stream, ws, exc)
                return None

    async def accept(
        self, *, max_message_size: int, outbox_size: int, flusher: Flusher | None = None
    ) -> ServerWebSocket:
        """Send the 101 answer; raises `ConnectionClosed` if the client is gone."""
        try:
            await self.stream.send_all(self._ws.send(AcceptConnection()))
        except _BROKEN:
            raise ConnectionClosed(1006, "closed during the handshake") from None
        return ServerWebSocket(
            self.stream,
            max_message_size=max_message_size,
            outbox_size=outbox_size,
            flusher=flusher,
        )

    async def reject(
        self, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """Answer with an HTTP error instead of a WebSocket, and close the stream."""
        await _reject(self.stream, self._ws, status, body, headers)


async def _answer_bad_request(
    stream: trio.abc.Stream, ws: WSConnection, exc: RemoteProtocolError
) -> None:
    hint = exc.event_hint
    rejection = hint if isinstance(hint, RejectConnection) else RejectConnection()
    body = f"agentmesh: not a WebSocket handshake: {exc}\n".encode()
    await _reject(stream, ws, rejection.status_code, body, rejection.headers)


async def _reject(
    stream: trio.abc.Stream,
    ws: WSConnection,
    status: int,
    body: bytes,
    headers: Sequence[tuple[bytes, bytes]],
) -> None:
    """Send an HTTP error answer, as a courtesy (a peer that is gone does not get it),
    and close the stream."""
    try:
        data = ws.send(
            RejectConnection(
                status_code=status,
                headers=[*headers, (b"content-type", b"text/plain; charset=utf-8")],
                has_body=True,
            )
        )
        data += ws.send(RejectData(data=body, body_finished=True))
        await stream.send_all(data)
    except (*_BROKEN, ProtocolError, h11.ProtocolError) as exc:
        log.debug("could not answer a refused handshake: %r", exc)
    await trio.aclose_forcefully(stream)


class Flusher:
    """Writes what connections have queued, for all of them at once.

    One task for the whole hub: it runs after the tasks that queued frames (the read
    loops, the timers), and makes one non-blocking write per connection with something
    queued. Whatever the socket does not take at once is left to that connection's
    writer task. This spares a task switch per connection per write, which is most of
    what a small frame costs. Only for plain TCP sockets on POSIX systems; other streams
    (TLS) go through their writer task.

    A read loop brackets its routing with `hold()` and `release(now)`: with ``now`` (the
    read brought a single message, a sign that nothing else is waiting to add to the
    batch) the writes happen right there, sparing the flusher task's turn too.
    """

    def __init__(self) -> None:
        self._due: list[ServerWebSocket] = []
        self._lot = trio.lowlevel.ParkingLot()
        self._holding = False

    def due(self, ws: ServerWebSocket) -> None:
        if not self._due and not self._holding:
            self._lot.unpark()
        self._due.append(ws)

    def hold(self) -> None:
        self._holding = True

    def release(self, now: bool) -> None:
        self._holding = False
        if self._due:
            if now:
                self._flush()
            else:
                self._lot.unpark()

    def _flush(self) -> None:
        due, self._due = self._due, []
        for ws in due:
            ws.flush()

    async def run(self) -> None:
        """Flush until cancelled."""
        while True:
            await self._lot.park()
            self._flush()


def _raw_fd(stream: trio.abc.Stream) -> int | None:
    """The socket's file descriptor, if frames may be written to it with `os.write`."""
    if sys.platform == "win32" or not isinstance(stream, trio.SocketStream):
        return None
    return stream.socket.fileno()


class ServerWebSocket:
    """An open connection: `receive()` messages, `send()` frames through a bounded outbox,
    `aclose()` to finish. `write_loop()` must run meanwhile; with a `Flusher`, it only
    sends what the flusher could not.

    A queued frame may carry a tag (the hub tags outcomes with their task ID);
    `unsent_tags()` tells which tagged frames may not have reached the peer.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_message_size: int,
        outbox_size: int,
        flusher: Flusher | None = None,
    ):
        self.stream = stream
        self.remote = remote_address(stream)
        self.outbox_size = outbox_size
        self.closed: ConnectionClosed | None = None  # set once either side closed
        self._reader = f.FrameReader(max_message_size)
        self._outbox: deque[tuple[str, str | None]] = deque()
        self._control: list[bytes] = []  # a pong, sent ahead of queued frames
        self._writing: list[tuple[str, str | None]] = []  # frames the writer task has
        self._backlog = b""  # what the flusher could not write, for the writer task
        self._due = False  # handed to the flusher or the writer task, not yet written
        self._fd = _raw_fd(stream) if flusher is not None else None
        self._flusher = flusher if self._fd is not None else None
        self._lot = trio.lowlevel.ParkingLot()
        self._peer_close: tuple[int, str] | None = None
        self._full_read = True  # the last read filled the buffer: read again at once

    @property
    def queued(self) -> int:
        """Frames waiting in the outbox."""
        return len(self._outbox)

    def send(self, frame: str, tag: str | None = None) -> bool:
        """Queue a text frame; False (and nothing queued) if the outbox is full."""
        if len(self._outbox) >= self.outbox_size:
            return False
        self._outbox.append((frame, tag))
        self._schedule()
        return True

    def _schedule(self) -> None:
        """See that what is queued gets written: by the flusher, else the writer task."""
        if self._due or self._writing:
            return  # already arranged, or the writer task is busy and will look again
        self._due = True
        if self._flusher is not None:
            self._flusher.due(self)
        else:
            self._lot.unpark()

    def _take(self) -> tuple[list[tuple[str, str | None]], bytes]:
        """Everything queued, as frames and as the bytes to write."""
        frames = list(self._outbox)
        self._outbox.clear()
        encode, text = f.encode_frame, f.TEXT
        data = b"".join([*self._control, *[encode(text, frame.encode()) for frame, _ in frames]])
        self._control = []
        return frames, data

    def flush(self) -> None:
        """Write what is queued without waiting; the writer task gets what is left."""
        self._due = False
        if self._fd is None or self._writing or not (self._outbox or self._control):
            return
        frames, data = self._take()
        try:
            written = os.write(self._fd, data)
        except OSError:  # full (BlockingIOError), or broken: the writer task finds out
            written = 0
        if written < len(data):
            self._writing, self._backlog = frames, data[written:]
            self._lot.unpark()

    async def write_loop(self) -> None:
        """Send what is queued, in order and in one write, until the stream breaks (then
        return) or cancelled (part of a write may have gone out; `unsent_tags` still
        counts its frames)."""
        while True:
            if not (self._outbox or self._control or self._backlog):
                await self._lot.park()
                continue
            self._due = False
            frames, data = self._take()
            data, self._backlog = self._backlog + data, b""
            self._writing += frames
            try:
                await self.stream.send_all(data)
            except _BROKEN:
                self._close(1006, "connection lost")
                return
            self._writing = []

    async def _read(self) -> bytes | bytearray:
        """The next bytes from the peer, with one turn of the scheduler either way.

        After a read that filled the buffer, more is likely waiting: read at once, then
        yield. Otherwise the socket was drained, and a read now would most likely find
        nothing: wait until epoll says it is readable (as cheap as a read that finds
        data, and it spares one that does not)."""
        fd = self._fd
        if fd is None:
            return await self.stream.receive_some(_READ_SIZE)
        if self._full_read:
            await trio.lowlevel.checkpoint_if_cancelled()
            data = self._read_now(fd)
            if data is not None:
                await trio.lowlevel.cancel_shielded_checkpoint()
                return data
        while True:
            await trio.lowlevel.wait_readable(fd)
            data = self._read_now(fd)
            if data is not None:
                return data

    def _read_now(self, fd: int) -> bytes | None:
        """What the socket holds now; None if nothing."""
        try:
            data = os.read(fd, _READ_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise trio.BrokenResourceError from exc
        self._full_read = len(data) == _READ_SIZE
        return data

    async def receive(self) -> list[str | bytes]:
        """Wait for the next data from the peer and return the messages in it (text as
        str, binary as bytes; maybe none, if it held only part of a frame or control
        frames). Pings are answered. Raises `ConnectionClosed` once the peer closes,
        breaks the protocol (its close code is then the one to answer with), or the
        stream breaks. Cancelling it loses no data: nothing was read yet.
        """
        if self.closed is not None:
            raise self.closed
        try:
            data = await self._read()
        except _BROKEN:
            raise self._close(1006, "connection lost") from None
        if not data:
            raise self._close(1006, "connection lost")
        try:
            events = self._reader.receive(data)
        except f.FrameError as exc:
            raise self._close(exc.code, exc.reason) from None
        messages: list[str | bytes] = []
        for opcode, payload in events:
            if opcode == f.TEXT or opcode == f.BINARY:
                messages.append(payload)
            elif opcode == f.PING:
                assert isinstance(payload, bytes)
                self._control = [f.encode_frame(f.PONG, payload)]  # only the latest counts
                self._schedule()
            elif opcode == f.CLOSE:
                assert isinstance(payload, bytes)
                try:
                    self._peer_close = f.parse_close(payload)
                except f.FrameError as exc:
                    raise self._close(exc.code, exc.reason) from None
                code = self._peer_close[0]
                raise self._close(1000 if code == 1005 else code, self._peer_close[1])
        return messages

    def _close(self, code: int, reason: str) -> ConnectionClosed:
        if self.closed is None:
            self.closed = ConnectionClosed(code, reason)
        return self.closed

    def unsent_tags(self) -> list[str]:
        """Tags of frames that may not have reached the peer. Call it once the write loop
        has stopped: it empties the outbox, and nothing more is written."""
        unsent = [tag for _, tag in self._writing if tag is not None]
        unsent += [tag for _, tag in self._outbox if tag is not None]
        self._writing, self._backlog, self._fd = [], b"", None
        self._outbox.clear()
        return unsent

    async def aclose(self, code: int, reason: str) -> None:
        """The closing handshake, then close the stream. Call it once the write loop has
        stopped. If the peer closed first, its code is echoed; else the hub's close frame
        goes out and the peer's answer is awaited (bound this with a timeout: on
        cancellation the stream is closed at once). A peer that broke the protocol gets
        the close code for that (1002, 1007 or 1009) instead of `code`."""
        self._fd = None  # no more writes by the flusher, whose list may still hold us
        try:
            if self._peer_close is not None:
                echo = self._peer_close[0]
                await self.stream.send_all(f.close_frame(1000 if echo == 1005 else echo))
            elif self.closed is None:
                self._close(code, reason)
                await self.stream.send_all(f.close_frame(code, reason))
                await self._await_peer_close()
            elif self.closed.code != 1006:  # the peer broke the protocol: fail the connection
                await self.stream.send_all(f.close_frame(self.closed.code, self.closed.reason))
        except _BROKEN:
            pass
        finally:
            await trio.aclose_forcefully(self.stream)

    async def _await_peer_close(self) -> None:
        reader = self._reader
        while True:
            data = await self.stream.receive_some(_READ_SIZE)
            if not data:
                return
            try:
                if any(opcode == f.CLOSE for opcode, _ in reader.receive(data)):
                    return
            except f.FrameError:
                return
