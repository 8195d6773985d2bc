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
from collections.abc import Callable, Sequence

import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.utilities import ProtocolError, RemoteProtocolError

from . import _frames as f
from ._closing import CloseState, Closing
from ._outbox import Outbox

__all__ = [
    "ConnectionClosed",
    "Flusher",
    "Handshake",
    "ServerWebSocket",
    "Stalled",
    "remote_address",
]

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
            except (RemoteProtocolError, UnicodeDecodeError) as exc:
                # wsproto decodes some header values as ASCII, and lets that error out.
                await _answer_bad_request(stream, ws, exc)
                return None

    async def accept(
        self,
        *,
        max_message_size: int,
        outbox_frames: int,
        outbox_bytes: int,
        send_timeout: float,
        flusher: Flusher | None = None,
    ) -> ServerWebSocket:
        """Send the 101 answer; raises `ConnectionClosed` if the client is gone. Frames
        the client sent right behind its request are kept for the first `receive`."""
        try:
            await self.stream.send_all(self._ws.send(AcceptConnection()))
        except _BROKEN:
            raise ConnectionClosed(1006, "closed during the handshake") from None
        return ServerWebSocket(
            self.stream,
            max_message_size=max_message_size,
            outbox_frames=outbox_frames,
            outbox_bytes=outbox_bytes,
            send_timeout=send_timeout,
            flusher=flusher,
            received=_trailing_data(self._ws),
        )

    async def reject(
        self, status: int, body: bytes, headers: Sequence[tuple[bytes, bytes]] = ()
    ) -> None:
        """Answer with an HTTP error instead of a WebSocket, and close the stream."""
        await _reject(self.stream, self._ws, status, body, headers)


def _trailing_data(ws: WSConnection) -> bytes:
    """What the client sent after its handshake request (h11 keeps it aside)."""
    h11_connection = getattr(ws.handshake, "_h11_connection", None)
    trailing = getattr(h11_connection, "trailing_data", (b"", False))
    return bytes(trailing[0])


async def _answer_bad_request(
    stream: trio.abc.Stream, ws: WSConnection, exc: RemoteProtocolError | UnicodeDecodeError
) -> None:
    hint = getattr(exc, "event_hint", None)
    rejection = hint if isinstance(hint, RejectConnection) else RejectConnection()
    reason = "a header value is not ASCII" if isinstance(exc, UnicodeDecodeError) else exc
    body = f"agentmesh: not a WebSocket handshake: {reason}\n".encode()
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
            try:
                ws.flush()
            except Exception:  # a bug in a callback: that connection's, not the others'
                log.exception("internal error writing to %s", ws.remote)
                if ws.on_fault is not None:
                    ws.on_fault()

    async def run(self) -> None:
        """Flush until cancelled."""
        while True:
            if not self._due:  # a flush may have made more due (room for a backlog)
                await self._lot.park()
            self._flush()


def _raw_fd(stream: trio.abc.Stream) -> int | None:
    """The socket's file descriptor, if frames may be written to it with `os.write`."""
    if sys.platform == "win32" or not isinstance(stream, trio.SocketStream):
        return None
    return stream.socket.fileno()


class Stalled(Exception):
    """The peer took no byte for `send_timeout` seconds while frames were waiting."""


class ServerWebSocket:
    """An open connection: `receive()` messages, `send()` frames through a bounded
    outbox, then `close_writes()` and `finish()`. `write_loop()` must run meanwhile;
    with a `Flusher`, it only sends what the flusher could not.

    Which frames were written is known at frame granularity (`_outbox.Outbox`): a frame
    may carry a tag (the hub tags outcomes with their task ID), and `unsent_tags()` tells
    which tagged frames were not wholly written. The close and ping state is a
    `_closing.Closing`.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        max_message_size: int,
        outbox_frames: int,
        outbox_bytes: int,
        send_timeout: float,
        flusher: Flusher | None = None,
        received: bytes = b"",
    ):
        self.stream = stream
        self.remote = remote_address(stream)
        self.send_timeout = send_timeout
        self.closing = Closing()
        self.outbox = Outbox(max_frames=outbox_frames, max_bytes=outbox_bytes)
        self.on_room: Callable[[], None] | None = None  # see `has_room`
        self.on_written: Callable[[Sequence[str]], None] | None = None  # tags written whole
        self.on_fault: Callable[[], None] | None = None  # a flush raised: close it
        self._ended: ConnectionClosed | None = None  # reading is over: how
        self._failure: tuple[int, str] | None = None  # the peer broke the protocol
        self._reader = f.FrameReader(max_message_size)
        self._early = received  # bytes the peer sent right behind its handshake
        self._fd = _raw_fd(stream)
        self._flusher = flusher if self._fd is not None else None
        self._writer = False  # the writer task has the outbox (the socket was full)
        self._due = False  # handed to the flusher or the writer task, not yet written
        self._lot = trio.lowlevel.ParkingLot()  # the writer task waits here
        self._room = trio.lowlevel.ParkingLot()  # `room_changed` waits here
        self._want_room = False
        self._full_read = True  # the last read filled the buffer: read again at once
        self.bytes_in = 0  # bytes read from the socket after the handshake
        self.bytes_out = 0  # bytes the socket took

    # -- sending -----------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Bytes this connection holds: its outbox, and a partial message it sent."""
        return self.outbox.bytes + self._reader.buffered

    def send(self, frame: str, tag: str | None = None) -> bool:
        """Queue a text frame; False (and nothing queued) if the outbox has no room for it
        or the connection is closing."""
        if not self.closing.may_send or not self.outbox.offer(
            f.encode_frame(f.TEXT, frame.encode()), tag, self._reader.buffered
        ):
            return False
        if not (self._due or self._writer):  # `_schedule`, inline: once per write
            self._due = True
            if self._flusher is not None:
                self._flusher.due(self)
            else:
                self._lot.unpark()
        return True

    def has_room(self, *, inbound: bool = True) -> bool:
        """Whether the outbox is at most half full (in frames and in bytes; with
        `inbound`, counting a partial message the peer is sending). If not, `on_room` is
        called, and `room_changed` returns, once the outbox is (a partial message does
        not drain by waiting)."""
        outbox = self.outbox
        if (
            outbox.bytes + (self._reader.buffered if inbound else 0) <= outbox.half_bytes
            and len(outbox.frames) <= outbox.half_frames
        ):
            return True
        self._want_room = True
        return False

    async def room_changed(self) -> None:
        """Wait until a write leaves the outbox at most half full, after a `has_room`
        that said no, or until `wake`. Cancelling it changes nothing."""
        await self._room.park()

    def wake(self) -> None:
        """Wake everyone in `room_changed` (the connection is closing)."""
        self._room.unpark_all()

    def _advance(self, n: int) -> None:
        """The socket took `n` more bytes: tell `on_written` which tagged frames are out."""
        self.bytes_out += n
        written = self.outbox.wrote(n)
        if written and self.on_written is not None:
            self.on_written(written)

    def _wrote(self) -> None:
        """After a write: tell those waiting for room if there is some now."""
        if self._want_room and self.outbox.has_room():
            self._want_room = False
            self._room.unpark_all()
            if self.on_room is not None:
                self.on_room()

    def _schedule(self) -> None:
        """See that what is queued gets written: by the flusher, else the writer task."""
        if self._due or self._writer:
            return  # already arranged, or the writer task is busy and will look again
        self._due = True
        if self._flusher is not None:
            self._flusher.due(self)
        else:
            self._lot.unpark()

    def _take_pong(self) -> None:
        """Queue the pong the latest ping asked for, at the next frame boundary."""
        pong = self.closing.take_pong()
        if pong is not None:
            self.outbox.push_control(f.encode_frame(f.PONG, pong))

    def flush(self) -> None:
        """Write what is queued without waiting; the writer task gets what is left."""
        self._due = False
        fd = self._fd
        if fd is None or self._writer:
            return
        if self.closing.pong is not None:
            self._take_pong()
        outbox = self.outbox
        data = outbox.pending()
        if not data:
            return
        try:
            written = os.write(fd, data)
        except OSError:  # full (BlockingIOError), or broken: the writer task finds out
            written = 0
        self.bytes_out += written  # `_advance`, inline
        tags = outbox.wrote(written)
        if tags and self.on_written is not None:
            self.on_written(tags)
        if outbox.bytes:
            self._writer = True
            self._lot.unpark()
        if self._want_room:
            self._wrote()

    async def write_loop(self) -> None:
        """Send what is queued, in order, until the stream breaks (then return) or the
        peer takes nothing for `send_timeout` seconds (then raise `Stalled`). Cancelling
        it leaves the outbox exact: a frame cut mid-write is still queued, with the
        count of its bytes already written."""
        while True:
            if not (self.outbox or self.closing.pong is not None):
                self._writer = False
                await self._lot.park()
                continue
            self._writer, self._due = True, False
            try:
                if self._fd is not None:
                    await self._write_raw(self._fd)
                else:
                    await self._write_stream()
            except _BROKEN:
                self.closing.lost()
                return
            self._wrote()

    async def _write_raw(self, fd: int) -> None:
        """One non-blocking write, after waiting until the socket takes bytes."""
        self._take_pong()
        with trio.move_on_after(self.send_timeout) as waited:
            await trio.lowlevel.wait_writable(fd)
        if waited.cancelled_caught:
            raise Stalled
        try:
            written = os.write(fd, self.outbox.pending())
        except BlockingIOError:
            written = 0
        except OSError as exc:
            raise trio.BrokenResourceError from exc
        self._advance(written)

    async def _write_stream(self) -> None:
        """Through the stream (TLS): a frame at a time, so that a write cut short by a
        broken stream leaves no doubt about which frames went out."""
        self._take_pong()
        data = self.outbox.head()
        with trio.move_on_after(self.send_timeout) as waited:
            await self.stream.send_all(data)
        if waited.cancelled_caught:
            raise Stalled  # the stream is now unusable, which is fine: we close it
        self._advance(len(data))

    def unsent_tags(self) -> list[str]:
        """Tags of frames not wholly written. Call it once nothing more is written (after
        `close_writes`): it empties the outbox."""
        unsent = self.outbox.unsent_tags()
        self.outbox.clear()
        return unsent

    # -- receiving ---------------------------------------------------------------------

    async def _read(self) -> bytes | bytearray:
        """The next bytes from the peer, with one turn of the scheduler either way
        (`receive` has the usual case, a wait then a read, inline).

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
        frames). Pings are answered. Raises `ConnectionClosed` once the peer closed (the
        messages before its close frame are returned first), broke the protocol (its
        close code is then the one to answer with), or the stream broke. Cancelling it
        loses no data: nothing was read yet.
        """
        if self._ended is not None:
            raise self._ended
        data: bytes | bytearray
        fd = self._fd
        if self._early:
            data, self._early = self._early, b""
        elif fd is not None and not self._full_read:
            # `_read`'s usual case, inline (a coroutine less per read): wait until the
            # socket is readable, then read what it holds.
            try:
                while True:
                    await trio.lowlevel.wait_readable(fd)
                    try:
                        data = os.read(fd, _READ_SIZE)
                        break
                    except BlockingIOError:
                        pass
                    except OSError:
                        data = b""  # broken
                        break
            except _BROKEN:
                data = b""
            self._full_read = len(data) == _READ_SIZE
        else:
            try:
                data = await self._read()
            except _BROKEN:
                data = b""
        return self._messages(data)

    @property
    def ended(self) -> bool:
        """Whether reading is over: `receive` would raise `ConnectionClosed` at once."""
        return self._ended is not None

    @property
    def pollable(self) -> int | None:
        """The socket's file descriptor if `receive_now` may read it (plain TCP, and no
        bytes from the handshake left to parse first); else None."""
        return self._fd if not self._early else None

    def receive_now(self) -> list[str | bytes]:
        """`receive` without waiting, for a socket that is readable (`pollable`): the
        messages in what it holds now, none if it holds nothing (yet). Raises as
        `receive` does."""
        if self._ended is not None:
            raise self._ended
        assert self._fd is not None
        try:
            data = os.read(self._fd, _READ_SIZE)
        except BlockingIOError:
            return []
        except OSError:
            data = b""  # broken
        return self._messages(data)

    def _messages(self, data: bytes | bytearray) -> list[str | bytes]:
        """The messages in `data`, just read (b"": the stream is gone)."""
        if not data:
            self.closing.lost()
            raise self._end(1006, "connection lost")
        self.bytes_in += len(data)
        try:
            events = self._reader.receive(data)
        except f.FrameError as exc:
            self._failure = (exc.code, exc.reason)
            raise self._end(exc.code, exc.reason) from None
        if len(events) == 1 and events[0][0] == f.TEXT:  # one read, one message: the usual
            return [events[0][1]]
        messages: list[str | bytes] = []
        peer_closed = False
        for opcode, payload in events:
            if opcode == f.TEXT or opcode == f.BINARY:
                messages.append(payload)
            elif opcode == f.PING:
                assert isinstance(payload, bytes)
                self.closing.ping(payload)
                self._schedule()
            elif opcode == f.CLOSE:
                assert isinstance(payload, bytes)
                try:
                    code, reason = f.parse_close(payload)
                except f.FrameError as exc:
                    self._failure = (exc.code, exc.reason)
                    raise self._end(exc.code, exc.reason) from None
                self.closing.received(code, reason)
                closed = self._end(self.closing.echo(), reason)
                peer_closed = True
        if peer_closed and not messages:
            raise closed
        return messages

    def _end(self, code: int, reason: str) -> ConnectionClosed:
        if self._ended is None:
            self._ended = ConnectionClosed(code, reason)
        return self._ended

    # -- closing -----------------------------------------------------------------------

    async def close_writes(self, code: int, reason: str, *, flush: bool = True) -> None:
        """End the sending side: write what is queued (only the frame cut mid-write, if
        any, unless `flush`), then the close frame: the echo of the peer's, if it closed
        first; the code for its protocol error, if it broke the protocol; else `code`.
        Call it once the write loop has stopped; nothing is written after. On
        cancellation (bound it with a timeout: a peer that does not read blocks it) the
        close frame may not be out; `unsent_tags` still tells which frames were."""
        self._fd = None  # no more writes by the flusher, whose list may still hold us
        state = self.closing.state
        if state is CloseState.CLOSED:
            return
        if state is CloseState.CLOSE_RECEIVED:
            code, reason = self.closing.echo(), ""
        elif self._failure is not None:
            code, reason, flush = *self._failure, False
        try:
            while self.outbox and (flush or self.outbox.partial):
                data = self.outbox.head()
                await self.stream.send_all(data)
                self._advance(len(data))
            await self.stream.send_all(f.close_frame(code, reason))
            self.closing.sent(code, reason)
        except _BROKEN:
            self.closing.lost()

    async def finish(self) -> None:
        """Wait for the peer's close frame if it is owed (bound this with a timeout), then
        close the stream (at once on cancellation). From a peer that broke the protocol,
        whatever it still sends is read and discarded until it closes: closing a socket
        with unread data would reset the connection, and the peer could lose our close
        frame."""
        try:
            if self.closing.state is CloseState.CLOSE_SENT:
                if self._failure is None:
                    await self._await_peer_close()
                else:
                    while await self.stream.receive_some(_READ_SIZE):
                        pass
        except _BROKEN:
            pass
        finally:
            await trio.aclose_forcefully(self.stream)

    async def _await_peer_close(self) -> None:
        reader = self._reader
        while not reader.closed:
            data = await self.stream.receive_some(_READ_SIZE)
            if not data:
                return
            try:
                reader.receive(data)
            except f.FrameError:
                return
