"""The hub's own WebSocket layer over real loopback sockets: handshakes, control frames,
fragments, protocol errors, closes. The client side is wsproto driven by hand, so that
the tests can send what a polite client library never would."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Pong,
    Request,
    TextMessage,
)

from agentmesh import Hub, HubConfig

from .conftest import WAIT

Connect = Any


class WireClient:
    """A WebSocket client at the level of frames: wsproto for the well-formed ones, raw
    bytes for the rest."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.events: list[Event] = []

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> Event | None:
        """The next event from the hub; None when the hub closed the TCP connection."""
        with trio.fail_after(WAIT):
            while not self.events:
                data = await self.stream.receive_some()
                if not data:
                    return None
                self.ws.receive_data(data)
                self.events += list(self.ws.events())
        return self.events.pop(0)

    async def close_code(self) -> int:
        """Read until the hub's close frame; its code."""
        while True:
            event = await self.next_event()
            assert event is not None, "the hub closed the socket without a close frame"
            if isinstance(event, CloseConnection):
                return event.code


@asynccontextmanager
async def wire(port: int) -> AsyncIterator[WireClient]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        client = WireClient(stream, WSConnection(ConnectionType.CLIENT))
        await client.send(Request(host="127.0.0.1", target="/"))
        assert isinstance(await client.next_event(), AcceptConnection)
        yield client


def masked(first: int, payload: bytes, mask: bytes = b"abcd") -> bytes:
    head = bytes((first, 0x80 | len(payload))) if len(payload) < 126 else b""
    assert head, "short frames only"
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def frame(type_: str, msg_id: str = "w1") -> bytes:
    return orjson.dumps({"type": type_, "id": msg_id, "payload": {}})


async def test_ping_is_answered_with_its_payload(hub: Hub) -> None:
    async with wire(hub.port or 0) as client:
        await client.send(Ping(payload=b"are you there"))
        event = await client.next_event()
        assert isinstance(event, Pong)
        assert event.payload == b"are you there"


async def test_fragmented_message_with_a_ping_between(hub: Hub) -> None:
    whole = frame("heartbeat")
    async with wire(hub.port or 0) as client:
        await client.stream.send_all(
            masked(0x01, whole[:10]) + masked(0x89, b"mid") + masked(0x80, whole[10:])
        )
        pong, ack = await client.next_event(), await client.next_event()
        assert isinstance(pong, Pong)
        assert isinstance(ack, TextMessage)
        assert orjson.loads(ack.data)["type"] == "heartbeat_ack"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        pytest.param(bytes((0x81, 2)) + b"{}", 1002, id="unmasked"),
        pytest.param(masked(0xC1, b"{}"), 1002, id="reserved-bits"),
        pytest.param(masked(0x80, b"{}"), 1002, id="stray-continuation"),
        pytest.param(masked(0x81, b'{"id": "\xff"}'), 1007, id="not-utf8"),
        pytest.param(masked(0x88, b"\x03"), 1002, id="bad-close"),
        pytest.param(
            bytes((0x81, 0xFF)) + struct.pack("!Q", 1 << 40) + b"mask", 1009, id="huge-header"
        ),
    ],
)
async def test_protocol_errors_close_that_connection_only(
    hub: Hub, connect: Connect, data: bytes, code: int
) -> None:
    async with connect() as bystander, wire(hub.port or 0) as client:
        await bystander.register("bystander")
        await client.stream.send_all(data)
        assert await client.close_code() == code
        assert await client.next_event() is None  # and then the hub closes the socket
        assert (await bystander.request("heartbeat"))["type"] == "heartbeat_ack"


async def test_the_hub_echoes_a_client_close(hub: Hub) -> None:
    async with wire(hub.port or 0) as client:
        await client.send(TextMessage(data=frame("heartbeat").decode()))
        assert isinstance(await client.next_event(), TextMessage)
        await client.send(CloseConnection(code=4321, reason="done here"))
        assert await client.close_code() == 4321
        assert await client.next_event() is None


async def test_a_registered_agent_that_closes_goes_offline(hub: Hub) -> None:
    async with wire(hub.port or 0) as client:
        register = {"type": "register", "id": "r", "payload": {"name": "w", "capabilities": []}}
        await client.send(TextMessage(data=orjson.dumps(register).decode()))
        reply = await client.next_event()
        assert isinstance(reply, TextMessage)
        agent_id = orjson.loads(reply.data)["payload"]["agent_id"]
        await client.send(CloseConnection(code=1000))
        assert await client.close_code() == 1000
    agent = hub.router.registry.get(agent_id)
    assert agent is not None
    assert not agent.online  # kept for its resume grace, but offline


async def http_answer(port: int, request: bytes) -> bytes:
    """Send `request` and read the answer until the hub closes the connection."""
    with trio.fail_after(WAIT):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await stream.send_all(request)
            response = b""
            while chunk := await stream.receive_some():
                response += chunk
    return response


async def test_not_a_websocket_request_gets_400(hub: Hub) -> None:
    response = await http_answer(hub.port or 0, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400 "), response
    assert b"not a WebSocket handshake" in response


async def test_garbage_instead_of_http_gets_400(hub: Hub) -> None:
    response = await http_answer(hub.port or 0, b"\x16\x03\x01 not http at all\r\n\r\n")
    assert response.startswith(b"HTTP/1.1 400 "), response


@pytest.mark.parametrize("hub_config", [HubConfig(handshake_timeout=0.2)])
async def test_a_connection_that_never_finishes_its_handshake_is_cut(
    hub: Hub, connect: Connect
) -> None:
    with trio.fail_after(WAIT):
        async with await trio.open_tcp_stream("127.0.0.1", hub.port or 0) as stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and no more
            assert await stream.receive_some() == b""  # cut, without an answer
    async with connect() as client:  # the hub goes on
        assert (await client.request("heartbeat"))["type"] == "heartbeat_ack"


@pytest.mark.parametrize("hub_config", [HubConfig(outbox_bytes=16 << 20)])
async def test_large_frames_to_a_reader_that_lags_arrive_whole_and_in_order(
    connect: Connect,
) -> None:
    # Several MB for a peer that is not reading yet: more than the socket takes at once,
    # so the hub's writer task sends the rest once the peer reads. (With the default
    # 4 MiB budget, broadcasts past half of it would be dropped as advisory.)
    async with connect() as sender, connect() as lagging:
        await sender.register("sender")
        await lagging.register("lagging")
        messages = [chr(ord("a") + i) * 900_000 for i in range(5)]
        for message in messages:
            reply = await sender.request("broadcast", {"message": message})
            assert reply["type"] == "broadcast", reply
        await sender.send("heartbeat")  # and the hub goes on meanwhile
        assert (await sender.expect("heartbeat_ack"))["type"] == "heartbeat_ack"
        for message in messages:
            frame = await lagging.expect("broadcast")
            assert frame["payload"]["message"] == message


async def test_frames_one_per_write_cut_across_writes_and_a_full_read(hub: Hub) -> None:
    # As ordinary clients send: a frame per write, here some cut across two writes (the
    # hub waits for the rest), then more than one read takes (the hub reads again at
    # once): every heartbeat is answered, in order.
    ids = [f"h{i}" for i in range(40)]
    frames = [masked(0x81, frame("heartbeat", i)) for i in ids]
    spaces = b" " * 120  # JSON allows them before the object
    long = masked(0x01, spaces) + masked(0x00, spaces) * 600
    long += masked(0x80, frame("heartbeat", "long"))
    async with wire(hub.port or 0) as client:
        for data in frames[:20]:
            await client.stream.send_all(data)
        for data in frames[20:]:
            await client.stream.send_all(data[:5])
            await trio.testing.wait_all_tasks_blocked()  # the hub has read the first part
            await client.stream.send_all(data[5:])
        await client.stream.send_all(long)  # over 64 KiB: fragments, then the heartbeat
        for expected in [*ids, "long"]:
            event = await client.next_event()
            assert isinstance(event, TextMessage)
            ack = orjson.loads(event.data)
            assert (ack["type"], ack["in_reply_to"]) == ("heartbeat_ack", expected)
