"""The SDK's WebSocket connection (agentmesh/_client_websocket.py) and the client side of
the framing (agentmesh/_frames.py).

The framing is tested without sockets, against the hub's side of it; the connection over
real loopback sockets, against a server that is wsproto driven by hand, so that the
tests can send what a polite server never would."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    Request,
    TextMessage,
)

from agentmesh import _client_websocket as cw
from agentmesh import _frames as f
from agentmesh._groups import unwrap_single

from .conftest import WAIT

# --- framing, sans-IO ----------------------------------------------------------------------

SIZES = (0, 1, 125, 126, 65535, 65536, 200_000)


@pytest.mark.parametrize("n", SIZES)
def test_masked_frames_read_back_by_the_hubs_reader(n: int) -> None:
    text = ("é" * n)[: max(n // 2, 0)] + "x" * (n - n // 2)
    masker = f.Masker()
    frames = masker.frame(f.TEXT, text.encode()) + masker.frame(f.TEXT, b"next")
    assert f.FrameReader(1 << 24).receive(frames) == [(f.TEXT, text), (f.TEXT, "next")]


def test_every_frame_has_its_own_mask() -> None:
    masker = f.Masker()
    masks = {masker.frame(f.TEXT, b"same")[2:6] for _ in range(3000)}  # past one draw
    assert len(masks) > 2990  # 32 random bits each: a repeat or two at most


def test_a_masked_close_frame_carries_its_code_and_a_cut_reason() -> None:
    [(opcode, payload)] = f.FrameReader(1000).receive(f.Masker().close(4001, "é" * 100))
    assert opcode == f.CLOSE
    code, reason = f.parse_close(payload)  # type: ignore[arg-type]
    assert (code, reason) == (4001, "é" * 61)  # 122 bytes: 123 would cut a character


@pytest.mark.parametrize("n", SIZES)
def test_hub_frames_read_by_the_client_side(n: int) -> None:
    frames = f.encode_frame(f.TEXT, b"a" * n) + f.encode_frame(f.PING, b"p")
    assert f.ClientFrameReader(1 << 24).receive(frames) == [(f.TEXT, "a" * n), (f.PING, b"p")]


def test_the_client_side_reads_frames_cut_anywhere() -> None:
    frames = f.encode_frame(f.TEXT, b"x" * 300) + f.encode_frame(f.TEXT, "€".encode())
    for cut in range(len(frames) + 1):
        reader = f.ClientFrameReader(1000)
        got = reader.receive(frames[:cut]) + reader.receive(frames[cut:])
        assert got == [(f.TEXT, "x" * 300), (f.TEXT, "€")], cut
        assert reader.buffered == 0


def test_the_client_side_joins_fragments_and_stops_at_a_close() -> None:
    data = (
        bytes((f.TEXT, 2)) + b"ab"  # not final
        + f.encode_frame(f.PONG, b"")
        + bytes((0x80 | 0x0, 1)) + b"c"  # the final continuation
        + f.close_frame(1000, "bye")
        + f.encode_frame(f.TEXT, b"after the close")
    )  # fmt: skip
    reader = f.ClientFrameReader(100)
    assert reader.receive(data) == [(f.PONG, b""), (f.TEXT, "abc"), (f.CLOSE, b"\x03\xe8bye")]
    assert reader.closed
    assert reader.receive(f.encode_frame(f.TEXT, b"more")) == []


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (f.Masker().frame(f.TEXT, b"masked"), f.PROTOCOL_ERROR),  # a server must not mask
        (bytes((0xC1, 1)) + b"x", f.PROTOCOL_ERROR),  # a reserved bit
        (bytes((0x83, 0)), f.PROTOCOL_ERROR),  # an unknown opcode
        (bytes((0x09, 0)), f.PROTOCOL_ERROR),  # a fragmented ping
        (bytes((0x81, 126, 0, 5)) + b"short", f.PROTOCOL_ERROR),  # length not shortest
        (f.encode_frame(f.TEXT, b"x" * 101), f.TOO_BIG),
        (f.encode_frame(f.TEXT, b"\xff"), f.INVALID_DATA),
    ],
)
def test_the_client_side_refuses_what_a_server_must_not_send(data: bytes, code: int) -> None:
    with pytest.raises(f.FrameError) as refused:
        f.ClientFrameReader(100).receive(data)
    assert refused.value.code == code


def test_the_size_limit_is_seen_in_the_header() -> None:
    header = bytes((0x81, 127)) + (1 << 40).to_bytes(8, "big")
    with pytest.raises(f.FrameError) as refused:
        f.ClientFrameReader(1 << 20).receive(header)  # no payload sent, nothing buffered
    assert refused.value.code == f.TOO_BIG


# --- the connection, over loopback -----------------------------------------------------------


class WireServer:
    """A WebSocket server at the level of frames: wsproto for the well-formed ones, raw
    bytes for the rest."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection, request: Request) -> None:
        self.stream = stream
        self.ws = ws
        self.request = request
        self.events: list[Event] = []

    async def send(self, event: Event) -> None:
        await self.stream.send_all(self.ws.send(event))

    async def next_event(self) -> Event | None:
        """The next event from the client; None when it closed the TCP connection."""
        with trio.fail_after(WAIT):
            while not self.events:
                data = await self.stream.receive_some()
                if not data:
                    return None
                self.ws.receive_data(data)
                self.events += list(self.ws.events())
        return self.events.pop(0)


async def _serve_one(
    listener: trio.SocketListener, reject: int | None, served: list[WireServer], up: trio.Event
) -> None:
    stream = await listener.accept()
    ws = WSConnection(ConnectionType.SERVER)
    while True:
        ws.receive_data(await stream.receive_some())
        requests = [e for e in ws.events() if isinstance(e, Request)]
        if requests:
            break
    if reject is not None:
        await stream.send_all(ws.send(RejectConnection(status_code=reject)))
        await stream.aclose()
        return
    await stream.send_all(ws.send(AcceptConnection()))
    served.append(WireServer(stream, ws, requests[0]))
    up.set()


@asynccontextmanager
async def connection(
    *, reject: int | None = None, max_message_size: int = 1 << 20
) -> AsyncIterator[tuple[cw.ClientWebSocket, WireServer]]:
    """A client connection and the server's end of it (its stream closed after)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    served: list[WireServer] = []
    up = trio.Event()
    async with listener, trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            nursery.start_soon(_serve_one, listener, reject, served, up)
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            try:
                ws = await cw.open_client_websocket(
                    nursery,
                    stream,
                    f"127.0.0.1:{port}",
                    "/agents?token=t",
                    headers=[(b"Authorization", b"Bearer secret")],
                    max_message_size=max_message_size,
                )
            except BaseException:
                await stream.aclose()
                raise
            await up.wait()  # the server's end is ready too
        try:
            yield ws, served[0]
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
                await trio.aclose_forcefully(served[0].stream)
            nursery.cancel_scope.cancel()


async def test_the_handshake_sends_the_resource_and_the_headers() -> None:
    async with connection() as (ws, server):
        assert server.request.target == "/agents?token=t"
        assert server.request.host.startswith("127.0.0.1:")
        assert (b"authorization", b"Bearer secret") in server.request.extra_headers
        assert ws.closed is None


async def test_an_http_error_answer_is_a_rejection_with_its_status() -> None:
    with pytest.raises(cw.HandshakeRejected) as rejected, unwrap_single():
        async with connection(reject=401):
            pass  # pragma: no cover
    assert rejected.value.status_code == 401


async def test_a_server_that_hangs_up_during_the_handshake_fails_it() -> None:
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]

    async def hang_up() -> None:
        stream = await listener.accept()
        await stream.receive_some()
        await stream.aclose()

    async with listener, trio.open_nursery() as nursery:
        nursery.start_soon(hang_up)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            with trio.fail_after(WAIT), pytest.raises(cw.HandshakeFailed):
                await cw.open_client_websocket(nursery, stream, "h", "/")


async def test_messages_both_ways_several_frames_in_one_write() -> None:
    async with connection() as (ws, server):
        for i in range(50):
            await ws.send_message(f"m{i}")  # queued: the writer sends them together
        got = []
        while len(got) < 50:
            event = await server.next_event()
            assert isinstance(event, TextMessage)
            got.append(event.data)
        assert got == [f"m{i}" for i in range(50)]
        data = b"".join(server.ws.send(TextMessage(data=f"r{i}")) for i in range(50))
        await server.stream.send_all(data)
        with trio.fail_after(WAIT):
            assert [await ws.get_message() for _ in range(50)] == [f"r{i}" for i in range(50)]


async def test_a_ping_is_answered_with_its_payload() -> None:
    async with connection() as (ws, server):
        await server.send(Ping(payload=b"are you there"))
        await server.send(TextMessage(data="after the ping"))
        with trio.fail_after(WAIT):
            assert await ws.get_message() == "after the ping"
        event = await server.next_event()
        assert isinstance(event, Pong)
        assert event.payload == b"are you there"


async def test_a_close_from_the_server_is_answered_and_ends_reading() -> None:
    async with connection() as (ws, server):
        await server.send(TextMessage(data="last words"))
        await server.send(CloseConnection(code=4004, reason="dropped by the operator"))
        with trio.fail_after(WAIT):
            assert await ws.get_message() == "last words"  # what came before the close
            with pytest.raises(cw.ConnectionClosed) as closed:
                await ws.get_message()
        assert closed.value.reason == cw.CloseReason(4004, "dropped by the operator")
        assert ws.closed == closed.value.reason
        echo = await server.next_event()
        assert isinstance(echo, CloseConnection)
        assert echo.code == 4004
        with pytest.raises(cw.ConnectionClosed):
            await ws.send_message("too late")


async def test_aclose_sends_the_code_and_waits_for_the_answer() -> None:
    async with connection() as (ws, server), trio.open_nursery() as nursery:
        nursery.start_soon(ws.aclose, 1000, "client closing")
        event = await server.next_event()
        assert isinstance(event, CloseConnection)
        assert (event.code, event.reason) == (1000, "client closing")
        await trio.testing.wait_all_tasks_blocked()
        assert ws.closed is None  # still waiting for the server's close frame
        await server.send(event.response())
    assert ws.closed == cw.CloseReason(1000, "client closing")  # as the server echoed it


async def test_a_protocol_error_of_the_server_closes_with_its_code() -> None:
    async with connection(max_message_size=10) as (ws, server):
        await server.send(TextMessage(data="x" * 11))
        with trio.fail_after(WAIT), pytest.raises(cw.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == f.TOO_BIG
        event = await server.next_event()
        assert isinstance(event, CloseConnection)
        assert event.code == f.TOO_BIG


async def test_a_broken_connection_ends_reading_and_sending() -> None:
    async with connection() as (ws, server):
        await server.stream.aclose()
        with trio.fail_after(WAIT), pytest.raises(cw.ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == 1006
        with pytest.raises(cw.ConnectionClosed):
            await ws.send_message("nobody there")


async def test_a_stream_closed_under_the_connection_ends_reading() -> None:
    async with connection() as (ws, _), trio.open_nursery() as nursery:
        got: list[BaseException] = []

        async def read() -> None:
            try:
                await ws.get_message()
            except cw.ConnectionClosed as exc:
                got.append(exc)

        nursery.start_soon(read)
        await trio.testing.wait_all_tasks_blocked()
        await ws._stream.aclose()  # as the chaos test resets a connection
    assert len(got) == 1


async def test_sending_to_a_server_that_does_not_read_stops_at_the_bound() -> None:
    async with connection() as (ws, _), trio.open_nursery() as nursery:
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while True:
                await ws.send_message("x" * 4000)
                sent += 1

        nursery.start_soon(flood)
        with trio.fail_after(WAIT):
            # Until the kernel's buffers are full and the outbox is too: then the sender
            # waits for room, and nothing runs.
            while True:
                before = sent
                await trio.testing.wait_all_tasks_blocked()
                if sent == before:
                    break
        assert cw.OUTBOX_BYTES <= ws._queued < cw.OUTBOX_BYTES + 4100
        nursery.cancel_scope.cancel()


async def test_frames_sent_while_the_connection_is_torn_down_still_go_out() -> None:
    """A cancelled writer task writes what is queued if the socket takes it; after it,
    senders write themselves (the CLI's shielded cancel of its task on Ctrl+C)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    served: list[WireServer] = []
    up = trio.Event()
    async with listener, trio.open_nursery() as nursery:
        nursery.start_soon(_serve_one, listener, None, served, up)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            with trio.CancelScope() as connection_scope:
                async with trio.open_nursery() as connection:
                    ws = await cw.open_client_websocket(connection, stream, "h", "/")
                    await ws.send_message("before")
                    connection_scope.cancel()  # the writer has not run yet
                    with trio.CancelScope(shield=True):
                        await ws.send_message("while cancelling")
            await ws.send_message("after the writer")
            with trio.fail_after(WAIT):
                await up.wait()
            server = served[0]
            got = []
            while len(got) < 3:
                event = await server.next_event()
                assert isinstance(event, TextMessage)
                got.append(event.data)
            assert got == ["before", "while cancelling", "after the writer"]
            await server.stream.aclose()
