"""Delivery under stress, over real loopback sockets: each outcome once across drops and
resumes of any backlog, queues bounded in bytes, closes after whole frames, pipelining,
liveness, RFC 6455 edges, and a connection as a fault boundary (issue 12)."""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import orjson
import pytest
import trio
from wsproto.events import CloseConnection, TextMessage

from agentmesh import Hub, HubConfig

from .conftest import WAIT
from .wire import Wire

KIB = 1024
OpenWire = Callable[..., Awaitable[Wire]]


@pytest.fixture
async def wire(hub: Hub) -> AsyncIterator[OpenWire]:
    """`await wire(**options)`: a `Wire` to the hub, closed after the test."""
    opened: list[Wire] = []

    async def open_wire(**options: Any) -> Wire:
        opened.append(await Wire.open(hub.port or 0, **options))
        return opened[-1]

    yield open_wire
    for each in opened:
        each.close()


async def wait_until(condition: Callable[[], bool], timeout: float = WAIT) -> None:  # noqa: ASYNC109
    """Poll a condition on the hub's state (the hub offers no event for it)."""
    with trio.fail_after(timeout):
        while not condition():  # noqa: ASYNC110 - a condition on the hub, not an event
            await trio.sleep(0.005)


async def pair(wire: OpenWire, **requester_options: Any) -> tuple[Wire, Wire]:
    """A registered worker (capability `work`) and a registered requester."""
    worker = await wire()
    await worker.register("worker", "work")
    requester = await wire(**requester_options)
    await requester.register("requester")
    return worker, requester


async def routed(wire: Wire) -> None:
    """Wait until the hub has handled everything `wire` sent (it handles a connection's
    frames in order)."""
    assert (await wire.request("heartbeat"))["type"] == "heartbeat_ack"


def delegates(wire: Wire, n: int, *, to: str | None = None, size: int = 0) -> bytes:
    """`n` delegate frames in one buffer, for one write."""
    frames = []
    for i in range(n):
        payload = {"capability": "work", "params": {"n": i, "pad": "x" * size}}
        frames.append(_delegate_frame(wire, payload, to))
    return b"".join(frames)


def _delegate_frame(wire: Wire, payload: dict[str, Any], to: str | None) -> bytes:
    if to is None:
        return wire.frame("delegate", payload)
    text = orjson.dumps(
        {"type": "delegate", "id": f"d{payload['params']['n']}", "to": to, "payload": payload}
    ).decode()
    return wire.ws.send(TextMessage(data=text))


async def delegate_all(requester: Wire, n: int, **options: Any) -> list[str]:
    """Delegate `n` tasks in one write, reading the replies meanwhile (the hub stops
    reading from a client whose replies pile up); their task IDs."""
    task_ids: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(requester.stream.send_all, delegates(requester, n, **options))
        while len(task_ids) < n:
            frame = await requester.message()
            if frame["type"] == "delegate" and frame.get("in_reply_to"):
                task_ids.append(frame["payload"]["task_id"])
            else:
                assert frame["type"] != "error", frame
                requester.inbox.append(frame)
    return task_ids


async def take(worker: Wire, n: int, task_ids: list[str]) -> None:
    """Read `n` tasks into `task_ids`."""
    while len(task_ids) < n:
        frame = await worker.message()
        if frame["type"] == "delegate" and not frame.get("in_reply_to"):
            task_ids.append(frame["payload"]["task_id"])


async def delegate_and_take(requester: Wire, worker: Wire, n: int) -> list[str]:
    """Delegate `n` tasks while the worker reads them (as an agent does)."""
    taken: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(take, worker, n, taken)
        task_ids = await delegate_all(requester, n)
    assert sorted(taken) == sorted(task_ids)
    return task_ids


async def answer(worker: Wire, task_ids: list[str], *, size: int = 0) -> None:
    """Answer every task in one write; wait until the hub routed them."""
    data = "y" * size
    results = b"".join(
        worker.frame("result", {"task_id": t, "success": True, "data": data}) for t in task_ids
    )
    await worker.stream.send_all(results)  # results get no reply: nothing to read
    await routed(worker)


async def outcomes(wire: Wire, until: int) -> Counter[str]:
    """Read until `until` distinct outcomes arrived, then until the hub answered a
    heartbeat sent after: every outcome frame seen, by task ID."""
    seen = Counter[str]()
    while len(seen) < until:
        frame = await wire.message()
        if frame["type"] == "result" and not frame.get("in_reply_to"):
            seen[frame["payload"]["task_id"]] += 1
    msg_id = "after-outcomes"
    await wire.send("heartbeat", msg_id=msg_id)
    while True:
        frame = await wire.message()
        if frame.get("in_reply_to") == msg_id:
            return seen
        if frame["type"] == "result":
            seen[frame["payload"]["task_id"]] += 1


async def resume(open_wire: OpenWire, old: Wire, **awaiting: Any) -> Wire:
    again = await open_wire()
    reply = await again.register(
        "requester", resume={"agent_id": old.agent_id, "token": old.token, **awaiting}
    )
    assert reply["payload"]["resumed"] is True
    return again


# ---------------------------------------------------------------------------------------
# Each outcome once, across a drop in the middle of a backlog


@pytest.mark.parametrize("awaiting", [True, False], ids=["awaiting", "raw"])
async def test_a_requester_dropped_mid_backlog_hears_no_outcome_twice(
    hub: Hub, wire: OpenWire, awaiting: bool
) -> None:
    worker, requester = await pair(wire, rcvbuf=4 * KIB)
    task_ids = await delegate_and_take(requester, worker, 300)
    await answer(worker, task_ids, size=2 * KIB)
    # Read 50 outcomes, then reset: what the kernels held for us is gone.
    read = Counter[str]()
    while sum(read.values()) < 50:
        frame = await requester.message()
        if frame["type"] == "result":
            read[frame["payload"]["task_id"]] += 1
    requester.reset()
    await wait_until(lambda: hub.router.connection_of(requester.agent_id) is None)
    missing = [t for t in task_ids if t not in read]
    options = {"awaiting": missing} if awaiting else {}
    again = await resume(wire, requester, **options)
    if awaiting:  # the SDK's way: it names what it still waits for, and gets each once
        seen = await outcomes(again, until=len(missing))
        assert seen == Counter(missing)
    else:  # a raw client: what was written whole counts as delivered, never sent twice
        seen = await outcomes(again, until=0)
        assert not set(seen) & set(read), "outcomes already read were sent again"
        assert all(count == 1 for count in seen.values())
        assert hub.router.tasks.get(missing[-1]) is not None


async def test_a_resume_owed_5000_outcomes_streams_them_each_once(hub: Hub, wire: OpenWire) -> None:
    worker, requester = await pair(wire)
    task_ids = await delegate_and_take(requester, worker, 5000)
    requester.reset()
    await wait_until(lambda: hub.router.connection_of(requester.agent_id) is None)
    await answer(worker, task_ids)
    again = await resume(wire, requester)
    seen = await outcomes(again, until=5000)
    assert seen == Counter(task_ids)  # every one, once, and the connection still open


async def test_an_agent_resuming_with_5000_tasks_gets_each_once(hub: Hub, wire: OpenWire) -> None:
    worker, requester = await pair(wire)
    worker.reset()
    await wait_until(lambda: hub.router.connection_of(worker.agent_id) is None)
    task_ids = await delegate_all(requester, 5000, to=worker.agent_id)
    back = await wire()
    reply = await back.register(
        "worker", "work", resume={"agent_id": worker.agent_id, "token": worker.token}
    )
    assert reply["payload"]["resumed"] is True
    async with trio.open_nursery() as nursery:  # the backlog, at the pace it reads
        taken: list[str] = []
        nursery.start_soon(take, back, 5000, taken)
    assert Counter(taken) == Counter(task_ids)  # each once
    async with trio.open_nursery() as nursery:
        nursery.start_soon(answer, back, taken)
        assert (await outcomes(requester, until=5000)) == Counter(task_ids)


# ---------------------------------------------------------------------------------------
# Queues bounded in bytes; a non-reader cut with 4002; a close after whole frames


@pytest.mark.parametrize("hub_config", [HubConfig(outbox_bytes=2 << 20)])
async def test_a_requester_that_never_reads_large_outcomes_is_cut_within_its_budget(
    hub: Hub, wire: OpenWire, hub_config: HubConfig
) -> None:
    worker, requester = await pair(wire, rcvbuf=4 * KIB)
    task_ids = await delegate_and_take(requester, worker, 40)
    peer = hub.router.connection_of(requester.agent_id)
    assert peer is not None
    held: list[int] = []
    original = peer.ws.send  # type: ignore[attr-defined]

    def send(frame: str, tag: str | None = None) -> bool:
        queued = bool(original(frame, tag))
        held.append(peer.ws.buffered)  # type: ignore[attr-defined]
        return queued

    peer.ws.send = send  # type: ignore[attr-defined]
    await answer(worker, task_ids, size=500 * KIB)  # 20 MB of outcomes for a non-reader
    assert peer.closing  # type: ignore[attr-defined]
    assert max(held) <= hub_config.outbox_bytes
    # Reading now, it gets whole frames, then the close code.
    got: list[str] = []
    parts: list[str] = []
    while True:
        event = await requester.event()
        assert event is not None, "the hub closed the socket without a close frame"
        if isinstance(event, CloseConnection):
            assert event.code == 4002, event
            break
        assert isinstance(event, TextMessage)
        parts.append(event.data)
        if event.message_finished:
            got.append(orjson.loads("".join(parts))["payload"]["task_id"])
            parts = []
    assert 0 < len(got) < 40
    # What it never got is owed: the resume brings each of the rest, once.
    again = await resume(wire, requester, awaiting=[t for t in task_ids if t not in got])
    assert await outcomes(again, until=40 - len(got)) == Counter(set(task_ids) - set(got))


@pytest.mark.parametrize("hub_config", [HubConfig(send_timeout=0.3)])
async def test_a_non_reader_sent_only_broadcasts_is_cut_with_4002(hub: Hub, wire: OpenWire) -> None:
    listener = await wire(rcvbuf=4 * KIB)
    await listener.register("listener")
    peer = hub.router.connection_of(listener.agent_id)
    sender = await wire()
    await sender.register("sender")
    for _ in range(30):  # 15 MB: most are dropped as advisory, none makes it overflow
        reply = await sender.request("broadcast", {"message": "z" * 500 * KIB})
        assert reply["type"] == "broadcast"
    await wait_until(lambda: bool(peer.closing))  # type: ignore[union-attr]
    assert await listener.close_code() == 4002
    assert peer.dropped > 0  # type: ignore[union-attr]


@pytest.mark.parametrize("hub_config", [HubConfig(outbox_bytes=16 << 20)])
async def test_a_close_while_a_frame_is_half_written_follows_whole_frames(
    hub: Hub, wire: OpenWire
) -> None:
    listener = await wire(rcvbuf=4 * KIB)
    await listener.register("listener")
    peer = hub.router.connection_of(listener.agent_id)
    sender = await wire()
    await sender.register("sender")
    for i in range(8):  # more than the kernels hold: the hub's writer is mid-frame
        reply = await sender.request("broadcast", {"message": str(i) * 900 * KIB})
        assert reply["payload"]["recipients"] == 1
    assert peer is not None
    assert peer.ws.outbox.partial  # type: ignore[attr-defined]
    assert hub.drop(listener.agent_id, "operator says so")
    # Every frame parses (wsproto would fail on a close inside a cut frame), then 4004.
    assert await listener.close_code() == 4004


# ---------------------------------------------------------------------------------------
# Pipelining


async def test_3000_requests_in_one_write_get_every_reply(hub: Hub, wire: OpenWire) -> None:
    client = await wire()
    replies = []
    async with trio.open_nursery() as nursery:
        data = b"".join(client.frame("heartbeat", msg_id=f"p{i}") for i in range(3000))
        nursery.start_soon(client.stream.send_all, data)
        replies = [await client.message() for _ in range(3000)]
    assert [r["in_reply_to"] for r in replies] == [f"p{i}" for i in range(3000)]
    assert (await client.request("status"))["type"] == "status"  # still open


# ---------------------------------------------------------------------------------------
# RFC 6455 edges


def masked(first: int, payload: bytes, *, length: bytes | None = None) -> bytes:
    """A client frame built by hand; `length` replaces the encoded payload length."""
    mask = b"abcd"
    if length is None:
        n = len(payload)
        length = bytes((0x80 | n,)) if n < 126 else bytes((0xFE,)) + struct.pack("!H", n)
    return bytes((first,)) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


HEARTBEAT = orjson.dumps({"type": "heartbeat", "id": "hb"})


async def test_a_message_in_the_same_read_as_a_close_is_handled(hub: Hub, wire: OpenWire) -> None:
    client = await wire()
    await client.stream.send_all(masked(0x81, HEARTBEAT) + masked(0x88, b"\x03\xe8"))
    event = await client.event()
    assert isinstance(event, TextMessage)
    assert orjson.loads(event.data)["in_reply_to"] == "hb"
    assert await client.close_code() == 1000


# The silence limit (3 heartbeat intervals) far beyond WAIT: a close that the hub notices
# only when the silence limit cuts the connection fails these tests' bounded waits.
SLOW_SILENCE = HubConfig(heartbeat_interval=60.0)


@pytest.mark.parametrize("hub_config", [attrs.evolve(SLOW_SILENCE, outbox_size=4)])
async def test_a_close_behind_messages_that_wait_for_room_is_answered(
    hub: Hub, wire: OpenWire
) -> None:
    """Six heartbeats and a close in one write, with room in the outbox for two replies:
    the routing stops to wait for room, then routes the rest, and then the close (its
    bytes read long ago) is answered. Before, the connection waited for more bytes that
    its peer, waiting for the answer, never sent."""
    client = await wire()
    beats = b"".join(
        masked(0x81, orjson.dumps({"type": "heartbeat", "id": f"h{i}"})) for i in range(6)
    )
    await client.stream.send_all(beats + masked(0x88, b"\x03\xe8"))
    replies = [await client.message() for _ in range(6)]
    assert [reply["in_reply_to"] for reply in replies] == [f"h{i}" for i in range(6)]
    assert await client.close_code() == 1000


@pytest.mark.parametrize("hub_config", [SLOW_SILENCE])
async def test_a_close_sent_with_the_handshake_is_answered(hub: Hub) -> None:
    """A message and a close right behind the opening handshake (read with it)."""
    client = await Wire.open(
        hub.port or 0, early=masked(0x81, HEARTBEAT) + masked(0x88, b"\x03\xe8")
    )
    try:
        assert (await client.message())["in_reply_to"] == "hb"
        assert await client.close_code() == 1000
    finally:
        client.close()


@pytest.mark.parametrize("hub_config", [HubConfig(outbox_bytes=2000)])
async def test_a_connection_that_closes_itself_while_its_messages_are_routed(
    hub: Hub, wire: OpenWire
) -> None:
    """An agent's delegate to itself makes a task frame too big for its own outbox, so
    the hub closes it (4002) while routing that message, with a heartbeat behind it in
    the same read. Before, the hub's poller then woke the closed connection's task a
    second time, and the hub ended. Now that connection alone ends; the next message
    (as if still on the wire) is not routed."""
    agent = await wire()
    await agent.register("self", "work")
    other = await wire()
    await other.register("other")
    big = {"capability": "work", "params": {"pad": "x" * 3000}}
    await agent.stream.send_all(
        agent.frame("delegate", big, "d1") + agent.frame("heartbeat", None, "h2")
    )
    assert await agent.close_code() == 4002
    assert (await other.request("heartbeat"))["type"] == "heartbeat_ack"  # the hub goes on


async def test_bytes_after_a_close_frame_are_ignored(hub: Hub, wire: OpenWire) -> None:
    client = await wire()
    await client.stream.send_all(masked(0x88, b"\x03\xe8") + b"\xff\xff garbage")
    assert await client.close_code() == 1000  # the echo, not a 1002 about the garbage


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(masked(0x81, HEARTBEAT, length=b"\xfe" + struct.pack("!H", 30)), id="16"),
        pytest.param(masked(0x81, HEARTBEAT, length=b"\xff" + struct.pack("!Q", 30)), id="64"),
        pytest.param(masked(0x81, b"", length=b"\xff" + struct.pack("!Q", 1 << 63)), id="top-bit"),
    ],
)
async def test_a_length_not_in_its_shortest_form_or_with_the_top_bit_is_1002(
    hub: Hub, wire: OpenWire, data: bytes
) -> None:
    client = await wire()
    await client.stream.send_all(data)
    assert await client.close_code() == 1002


async def test_a_frame_sent_with_the_handshake_request_is_read(hub: Hub, wire: OpenWire) -> None:
    client = await wire(early=masked(0x81, HEARTBEAT))
    reply = await client.message()
    assert reply["type"] == "heartbeat_ack"
    assert reply["in_reply_to"] == "hb"


# ---------------------------------------------------------------------------------------
# Liveness: only messages count


QUICK = HubConfig(heartbeat_interval=0.1)  # silent after 0.3 s


@pytest.mark.parametrize("hub_config", [QUICK])
@pytest.mark.parametrize("what", ["pings", "a-frame-that-never-ends"])
async def test_pings_or_a_trickle_of_bytes_do_not_keep_a_connection_alive(
    hub: Hub, wire: OpenWire, what: str
) -> None:
    client = await wire()
    unfinished = b"\x81\xfe\x10\x00abcd"  # the head of a 4 KiB text frame

    async def trickle_on() -> None:
        if what != "pings":
            await client.stream.send_all(unfinished)
        while True:  # until the hub cuts it
            await trio.sleep(0.01)
            await client.stream.send_all(masked(0x89, b"ping") if what == "pings" else b"x")

    with trio.fail_after(2):  # the limit is 0.3 s (plus its slack of 0.03 s)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle_on)
            code = await client.close_code()
            nursery.cancel_scope.cancel()
    assert code == 4001


# ---------------------------------------------------------------------------------------
# A connection is a fault boundary


async def test_an_unexpected_error_closes_that_connection_with_1011_only(
    hub: Hub, wire: OpenWire, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    bystander = await wire()
    await bystander.register("bystander")
    receive = hub.router.receive

    def faulty(peer: Any, frame: str | bytes) -> None:
        if "boom" in str(frame):
            raise RuntimeError("a bug")
        receive(peer, frame)

    monkeypatch.setattr(hub.router, "receive", faulty)
    victim = await wire()
    await victim.send("heartbeat", msg_id="boom")
    assert await victim.close_code() == 1011
    assert (await bystander.request("status"))["type"] == "status"
    assert [r for r in caplog.records if "internal error on the connection" in r.message]


async def test_a_heartbeat_after_the_resume_marks_the_end_of_a_long_catch_up(
    hub: Hub, wire: OpenWire
) -> None:
    worker, requester = await pair(wire)
    task_ids = await delegate_and_take(requester, worker, 3000)
    requester.reset()
    await wait_until(lambda: hub.router.connection_of(requester.agent_id) is None)
    await answer(worker, task_ids)
    again = await wire()
    await again.send(
        "register",
        {"name": "r", "resume": {"agent_id": requester.agent_id, "token": requester.token}},
        msg_id="resume",
    )
    await again.send("heartbeat", msg_id="after")  # sent at once: read after the catch-up
    seen = []
    while True:
        frame = await again.message()
        if frame.get("in_reply_to") == "after":
            break
        if frame["type"] == "result":
            seen.append(frame["payload"]["task_id"])
    assert Counter(seen) == Counter(task_ids)


async def test_after_a_1009_the_rest_of_the_message_is_read_not_reset(
    hub: Hub, wire: OpenWire
) -> None:
    client = await wire()
    head = bytes((0x81, 0xFF)) + struct.pack("!Q", 2 << 20) + b"mask"
    await client.stream.send_all(head + b"x" * 300_000)  # over the limit, and unread
    assert await client.close_code() == 1009
    await client.stream.send_eof()
    with trio.fail_after(WAIT):  # a clean end of stream: a reset would lose the close
        assert await client.stream.receive_some() == b""


@pytest.mark.parametrize("hub_config", [HubConfig(outbox_bytes=64 * KIB)])
async def test_a_partial_message_larger_than_half_the_budget_does_not_stall_reading(
    hub: Hub, wire: OpenWire
) -> None:
    client = await wire()
    big = client.frame("status", {"task_id": "x" * 100_000}, msg_id="big")
    # A whole heartbeat, and more than half the budget of the next message.
    await client.stream.send_all(client.frame("heartbeat", msg_id="hb") + big[:60_000])
    assert (await client.message())["in_reply_to"] == "hb"
    await client.stream.send_all(big[60_000:])
    reply = await client.message()
    assert reply["in_reply_to"] == "big"
    assert reply["payload"]["code"] == "unknown_task"
