"""A WebSocket client on a raw socket, for tests that need what a client library hides:
a small receive buffer, a client that stops reading, a TCP reset, frames sent by hand."""

from __future__ import annotations

import itertools
import socket
import struct
from typing import Any

import orjson
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Request, TextMessage

from .conftest import WAIT


class Wire:
    """One connection. `messages()` yields the hub's JSON frames; `inbox` keeps those a
    `request` read past."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.stream = trio.SocketStream(sock)
        self.ws = WSConnection(ConnectionType.CLIENT)
        self.events: list[Event] = []
        self.inbox: list[dict[str, Any]] = []
        self.agent_id = ""
        self.token = ""
        self._ids = itertools.count(1)

    @classmethod
    async def open(
        cls, port: int, *, rcvbuf: int | None = None, early: bytes = b"", target: str = "/"
    ) -> Wire:
        """Connect and finish the handshake; `early` is sent in the same write as the
        request; `rcvbuf` shrinks the socket's receive buffer (before connecting, so that
        the TCP window stays small); `target` is the request's (`/?protocol=2`)."""
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        with trio.fail_after(WAIT):
            await sock.connect(("127.0.0.1", port))
            wire = cls(sock)
            request = wire.ws.send(Request(host="127.0.0.1", target=target))
            await wire.stream.send_all(request + early)
            assert isinstance(await wire.event(), AcceptConnection)
        return wire

    def frame(self, type_: str, payload: Any = None, msg_id: str | None = None) -> bytes:
        """The bytes of one JSON frame, masked as a client's must be."""
        msg_id = msg_id or f"w{next(self._ids)}"
        text = orjson.dumps({"type": type_, "id": msg_id, "payload": payload or {}}).decode()
        return self.ws.send(TextMessage(data=text))

    async def send(self, type_: str, payload: Any = None, msg_id: str | None = None) -> None:
        await self.stream.send_all(self.frame(type_, payload, msg_id))

    async def event(self, timeout: float = WAIT) -> Event | None:  # noqa: ASYNC109
        """The next WebSocket event; None once the hub closed the TCP connection."""
        with trio.fail_after(timeout):
            while not self.events:
                data = await self.stream.receive_some(65536)
                if not data:
                    return None
                self.ws.receive_data(data)
                self.events += list(self.ws.events())
        return self.events.pop(0)

    async def message(self, timeout: float = WAIT) -> dict[str, Any]:  # noqa: ASYNC109
        """The next JSON frame (from the inbox first); fails on a close."""
        if self.inbox:
            return self.inbox.pop(0)
        parts = []
        while True:
            event = await self.event(timeout)
            if isinstance(event, TextMessage):  # wsproto hands over a frame as it arrives
                parts.append(event.data)
                if event.message_finished:
                    frame: dict[str, Any] = orjson.loads("".join(parts))
                    return frame
            assert not isinstance(event, CloseConnection | None), f"closed: {event}"

    async def request(self, type_: str, payload: Any = None) -> dict[str, Any]:
        msg_id = f"w{next(self._ids)}"
        await self.send(type_, payload, msg_id)
        kept = []
        while True:
            frame = await self.message()
            if frame.get("in_reply_to") == msg_id:
                self.inbox[:0] = kept
                return frame
            kept.append(frame)

    async def register(self, name: str, *capabilities: str, **extra: Any) -> dict[str, Any]:
        reply = await self.request(
            "register", {"name": name, "capabilities": list(capabilities), **extra}
        )
        assert reply["type"] == "register", reply
        self.agent_id = reply["payload"]["agent_id"]
        self.token = reply["payload"]["resume_token"]
        return reply

    async def close_code(self) -> int:
        """Read whole frames until the hub's close frame; its code. Fails if the stream
        ends first or a frame does not parse."""
        while True:
            event = await self.event()
            assert event is not None, "the hub closed the socket without a close frame"
            if isinstance(event, CloseConnection):
                return event.code

    def reset(self) -> None:
        """Drop the connection with a TCP reset: what the kernel holds for us is lost."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def close(self) -> None:
        if self.sock.fileno() != -1:
            self.sock.close()
