"""A real hub restarted on the same SQLite file: identities, tasks in flight, undelivered
outcomes, TTLs, the resume grace and the counters survive; replies that promise
durability wait for their commit; a failing store refuses new work and loses nothing
(issue 13). Each test also runs, where the difference shows, on a `MemoryStore`, which
must forget: so that each test can fail."""

from __future__ import annotations

import hashlib
import math
import select
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from wsproto.events import CloseConnection, TextMessage

from agentmesh import Agent, Hub, HubConfig, connect
from agentmesh.client import Backoff
from agentmesh.errors import HubRestarted
from agentmesh.sqlite_store import SQLiteStore
from agentmesh.store import MemoryStore, Store, TaskRow

from .conftest import WAIT
from .wire import Wire


class Hubs:
    """Hubs started one after the other on the same store file (or each on a fresh
    `MemoryStore`); `stop` is a graceful shutdown, as on SIGTERM."""

    def __init__(self, nursery: trio.Nursery, path: Path, *, memory: bool = False) -> None:
        self.nursery = nursery
        self.path = path
        self.memory = memory
        self.hub: Hub | None = None
        self._scope: trio.CancelScope | None = None
        self._done: trio.Event | None = None
        self._wires: list[Wire] = []

    async def start(
        self,
        config: HubConfig | None = None,
        *,
        port: int = 0,
        faults: Callable[[sqlite3.Connection], None] | None = None,
    ) -> Hub:
        assert self.hub is None, "one hub at a time"
        store: Store = MemoryStore() if self.memory else SQLiteStore(self.path, faults=faults)
        hub = Hub(config, store=store)
        scope, done = trio.CancelScope(), trio.Event()

        async def run(task_status: trio.TaskStatus[int]) -> None:
            try:
                with scope:
                    await hub.serve("127.0.0.1", port, task_status=task_status)
            finally:
                done.set()

        with trio.fail_after(WAIT):
            await self.nursery.start(run)
        self.hub, self._scope, self._done = hub, scope, done
        return hub

    async def stop(
        self, *wires: Wire, then: Callable[[], None] = lambda: None
    ) -> dict[Wire, list[dict[str, Any]]]:
        """Cancel the hub (then call `then`), and read each of `wires` up to the hub's
        1001 close, then close it; the frames each read before the close."""
        assert self._scope is not None
        assert self._done is not None
        self._scope.cancel()
        then()
        heard: dict[Wire, list[dict[str, Any]]] = {}
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for wire in wires:
                    nursery.start_soon(_read_to_close, wire, heard.setdefault(wire, []))
            await self._done.wait()
        self.hub = self._scope = self._done = None
        return heard

    async def wire(self, target: str = "/") -> Wire:
        assert self.hub is not None
        self._wires.append(await Wire.open(self.hub.port or 0, target=target))
        return self._wires[-1]

    async def aclose(self) -> None:
        """Close every wire, then stop the hub if it runs."""
        for wire in self._wires:
            wire.close()
        if self.hub is not None:
            await self.stop()


async def _read_to_close(wire: Wire, frames: list[dict[str, Any]]) -> None:
    frames += wire.inbox
    wire.inbox.clear()
    parts: list[str] = []
    while True:
        event = await wire.event()
        assert event is not None, "the hub closed the socket without a close frame"
        if isinstance(event, CloseConnection):
            assert event.code == 1001, event
            wire.close()
            return
        assert isinstance(event, TextMessage)
        parts.append(event.data)
        if event.message_finished:
            frames.append(orjson.loads("".join(parts)))
            parts = []


@pytest.fixture
async def open_hubs(nursery: trio.Nursery, tmp_path: Path) -> AsyncIterator[Callable[..., Hubs]]:
    """`open_hubs(memory=False)`: a `Hubs`; after the test its hub (if running) is stopped
    and its wires closed."""
    made: list[Hubs] = []

    def make(*, memory: bool = False) -> Hubs:
        made.append(Hubs(nursery, tmp_path / "agentmesh.db", memory=memory))
        return made[-1]

    yield make
    for hubs in made:
        await hubs.aclose()


@pytest.fixture
def hubs(open_hubs: Callable[..., Hubs]) -> Hubs:
    return open_hubs()


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a condition on the hub's state (the hub offers no event for it)."""
    with trio.fail_after(WAIT):
        while not condition():  # noqa: ASYNC110 - a condition on the hub, not an event
            await trio.sleep(0.002)


async def routed(wire: Wire) -> list[dict[str, Any]]:
    """Wait until the hub handled everything `wire` sent; the frames that came before
    the heartbeat's ack."""
    before = list(wire.inbox)
    wire.inbox.clear()
    msg_id = f"routed-{id(wire)}-{time.monotonic_ns()}"
    await wire.send("heartbeat", msg_id=msg_id)
    while True:
        frame = await wire.message()
        if frame.get("in_reply_to") == msg_id:
            assert frame["type"] == "heartbeat_ack", frame
            return before
        before.append(frame)


def results(frames: list[dict[str, Any]]) -> Counter[str]:
    return Counter(
        f["payload"]["task_id"] for f in frames if f["type"] == "result" and "in_reply_to" not in f
    )


async def outcomes(wire: Wire, until: int) -> Counter[str]:
    """Read until `until` outcomes arrived, then until the hub answered a heartbeat
    sent after: every outcome frame seen, by task ID."""
    seen = Counter[str]()
    while sum(seen.values()) < until:
        seen += results([await wire.message()])
    return seen + results(await routed(wire))


def nothing_arrived(wire: Wire) -> bool:
    """Whether no byte from the hub is waiting on `wire`'s socket (nor read already)."""
    readable, _, _ = select.select([wire.sock.fileno()], [], [], 0)
    return not readable and not wire.inbox and not wire.events


async def resume(hubs: Hubs, old: Wire, name: str, *capabilities: str, **extra: Any) -> Wire:
    again = await hubs.wire()
    reply = await again.register(
        name, *capabilities, resume={"agent_id": old.agent_id, "token": old.token, **extra}
    )
    assert reply["payload"]["resumed"] is True, reply
    assert (again.agent_id, again.token) == (old.agent_id, old.token)
    return again


async def pair(hubs: Hubs) -> tuple[Wire, Wire]:
    """A registered worker (capability `work`) and a registered requester."""
    worker = await hubs.wire()
    await worker.register("worker", "work")
    requester = await hubs.wire()
    await requester.register("requester")
    return worker, requester


async def delegate(requester: Wire, **payload: Any) -> str:
    reply = await requester.request("delegate", {"capability": "work", **payload})
    assert reply["type"] == "delegate", reply
    task_id: str = reply["payload"]["task_id"]
    return task_id


async def assignment(worker: Wire) -> dict[str, Any]:
    """The next task frame the worker gets; other frames are kept."""
    kept: list[dict[str, Any]] = []
    while True:
        frame = await worker.message()
        if frame["type"] == "delegate" and "in_reply_to" not in frame:
            worker.inbox[:0] = kept
            payload: dict[str, Any] = frame["payload"]
            return payload
        kept.append(frame)


async def answer(worker: Wire, task_id: str, data: Any = "done") -> None:
    await worker.send("result", {"task_id": task_id, "success": True, "data": data})


def waiting_for(gate: threading.Event) -> Callable[[sqlite3.Connection], None]:
    """A faults hook: each commit waits until `gate` is set (at most `WAIT`)."""

    def faults(db: sqlite3.Connection) -> None:
        gate.wait(WAIT)

    return faults


def on_disk(path: Path) -> bytes:
    """The bytes of the database and of its write-ahead log."""
    wal = path.with_name(path.name + "-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


# ---------------------------------------------------------------------------------------
# Identities


async def test_an_identity_survives_a_restart_and_its_token_is_never_stored(
    hubs: Hubs,
) -> None:
    await hubs.start()
    worker = await hubs.wire()
    await worker.register("worker", "work")
    # Registered means committed: the identity is in the file (the WAL) now.
    stored = on_disk(hubs.path)
    assert hashlib.sha256(worker.token.encode()).hexdigest().encode() in stored
    assert worker.token.encode() not in stored
    await hubs.stop(worker)
    assert worker.token.encode() not in on_disk(hubs.path)

    await hubs.start()
    again = await resume(hubs, worker, "worker", "work")
    stranger = await hubs.wire()
    refused = await stranger.register(
        "worker", "work", resume={"agent_id": worker.agent_id, "token": worker.token + "x"}
    )
    assert refused["payload"]["resumed"] is False  # a fresh identity, as before a restart
    assert stranger.agent_id != worker.agent_id
    await hubs.stop(again, stranger)


async def test_a_memory_hub_forgets_everything_at_a_restart(
    open_hubs: Callable[..., Hubs],
) -> None:
    # The negative control: what the other tests prove is the store's doing.
    hubs = open_hubs(memory=True)
    await hubs.start()
    worker, requester = await pair(hubs)
    task_id = await delegate(requester)
    await hubs.stop(worker, requester)
    await hubs.start()
    again = await hubs.wire()
    reply = await again.register(
        "requester", resume={"agent_id": requester.agent_id, "token": requester.token}
    )
    assert reply["payload"]["resumed"] is False
    status = await again.request("status", {"task_id": task_id})
    assert status["payload"]["code"] == "unknown_task", status
    summary = await again.request("status")
    assert summary["payload"]["counters"]["delegated"] == 0
    await hubs.stop(again)
    assert not hubs.path.exists()


# ---------------------------------------------------------------------------------------
# Tasks and outcomes


async def test_a_task_in_flight_survives_a_restart(hubs: Hubs) -> None:
    await hubs.start()
    worker, requester = await pair(hubs)
    task_id = await delegate(requester, params={"n": 1}, ttl=30)
    assert (await assignment(worker))["task_id"] == task_id
    await hubs.stop(worker, requester)

    await hubs.start()
    requester = await resume(hubs, requester, "requester")
    worker = await resume(hubs, worker, "worker", "work")
    again = await assignment(worker)  # the catch-up: the task, again
    assert (again["task_id"], again["params"]) == (task_id, {"n": 1})
    assert 0 < again["ttl"] <= 30
    await answer(worker, task_id, data={"n": 1})
    assert await outcomes(requester, until=1) == Counter([task_id])
    await hubs.stop(worker, requester)


async def test_the_dispatch_queue_survives_a_restart_with_its_priorities(hubs: Hubs) -> None:
    await hubs.start()
    worker = await hubs.wire()
    await worker.register("worker", "work", max_concurrency=1)
    requester = await hubs.wire()
    await requester.register("requester")
    running = await delegate(requester, ttl=30)
    low = [await delegate(requester, ttl=30) for _ in range(2)]
    high = await delegate(requester, ttl=30, priority=9)
    assert (await assignment(worker))["task_id"] == running
    await hubs.stop(worker, requester)

    hub = await hubs.start()
    assert [e.task_id for e in hub.router.queue] == [*low, high]
    token = {"agent_id": requester.agent_id, "token": requester.token}
    requester = await hubs.wire("/?protocol=2")  # which has queue_position
    await requester.register("requester", resume=token)
    status = await requester.request("status", {"task_id": low[1]})
    assert status["payload"]["queue_position"] == 3  # after the high one, and low[0]
    assert status["payload"]["assignee"] == ""
    again = await hubs.wire()
    token = {"agent_id": worker.agent_id, "token": worker.token}
    await again.register("worker", "work", max_concurrency=1, resume=token)
    worker = again
    assert (await assignment(worker))["task_id"] == running  # the catch-up
    order = []
    for task_id in [running, high, low[0]]:
        await answer(worker, task_id)
        order.append((await assignment(worker))["task_id"])
    assert order == [high, *low]  # one at a time, the priority first
    await answer(worker, low[1])
    assert await outcomes(requester, until=4) == Counter([running, *low, high])
    await hubs.stop(worker, requester)


TRACE = {
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "rojo=00f067aa0ba902b7",
}


async def test_a_pending_tasks_trace_context_survives_a_restart(hubs: Hubs) -> None:
    await hubs.start()
    worker, requester = await pair(hubs)
    worker.close()  # resuming: its task waits for it, PENDING
    hub = hubs.hub
    assert hub is not None
    await wait_until(lambda: hub.router.connection_of(worker.agent_id) is None)
    reply = await requester.request("delegate", {"capability": "work", **TRACE})
    assert reply["payload"]["state"] == "pending", reply
    task_id = reply["payload"]["task_id"]
    await hubs.stop(requester)

    await hubs.start()
    requester = await resume(hubs, requester, "requester")
    worker = await resume(hubs, worker, "worker", "work")
    task = await assignment(worker)  # the catch-up, with the delegate's trace context
    assert task["task_id"] == task_id
    assert {k: task[k] for k in TRACE} == TRACE
    await answer(worker, task_id)
    while True:
        frame = await requester.message()
        if frame["type"] == "result":
            break
    assert frame["payload"]["task_id"] == task_id
    assert {k: frame["payload"][k] for k in TRACE} == TRACE
    await hubs.stop(worker, requester)


async def test_an_undelivered_outcome_survives_a_restart_and_comes_once(hubs: Hubs) -> None:
    await hubs.start()
    worker, requester = await pair(hubs)
    task_id = await delegate(requester)
    await assignment(worker)
    requester.close()
    hub = hubs.hub
    assert hub is not None
    await wait_until(lambda: hub.router.connection_of(requester.agent_id) is None)
    await answer(worker, task_id)
    assert not results(await routed(worker))
    await hubs.stop(worker)

    await hubs.start()
    back = await resume(hubs, requester, "requester")
    assert await outcomes(back, until=1) == Counter([task_id])
    await hubs.stop(back)

    await hubs.start()  # it was delivered, and that was stored: not sent again
    back = await resume(hubs, requester, "requester")
    assert not results(await routed(back))
    status = await back.request("status", {"task_id": task_id})
    assert status["payload"]["state"] == "completed", status
    await hubs.stop(back)


async def test_a_ttl_that_ran_out_while_the_hub_was_down_ends_as_timeout(hubs: Hubs) -> None:
    await hubs.start()
    worker, requester = await pair(hubs)
    task_id = await delegate(requester, ttl=1)
    deadline = time.time() + 1  # the hub's deadline is before this
    await assignment(worker)
    heard = await hubs.stop(worker, requester)
    assert not results(heard[requester]), "the TTL ran out before the hub stopped"
    while time.time() <= deadline:  # noqa: ASYNC110 - waiting on the wall clock
        await trio.sleep(0.02)

    await hubs.start()
    back = await resume(hubs, requester, "requester")
    seen: list[dict[str, Any]] = []
    while not results(seen):
        seen.append(await back.message())
    seen += await routed(back)
    (outcome,) = [f for f in seen if f["type"] == "result"]
    assert outcome["payload"]["task_id"] == task_id
    assert outcome["payload"]["state"] == "timeout"
    # The worker hears the task ended, and does not get it again.
    worker = await resume(hubs, worker, "worker", "work")
    told = await routed(worker)
    assert [(f["type"], f["payload"]) for f in told] == [
        ("cancel", {"task_id": task_id, "reason": "timeout"})
    ]
    await hubs.stop(back, worker)


async def test_the_resume_grace_starts_again_at_the_restart_and_counters_carry_over(
    hubs: Hubs,
) -> None:
    grace = 0.5
    config = HubConfig(resume_grace=grace, retention=grace)
    first = await hubs.start(config)
    worker, requester = await pair(hubs)
    task_id = await delegate(requester)
    await assignment(worker)
    await answer(worker, task_id)
    assert await outcomes(requester, until=1) == Counter([task_id])
    worker.close()  # its grace in this hub starts now
    await wait_until(lambda: first.router.connection_of(worker.agent_id) is None)
    left = trio.current_time()
    while trio.current_time() < left + 0.6 * grace:  # noqa: ASYNC110 - on the clock
        await trio.sleep(0.01)
    await hubs.stop(requester)

    before = trio.current_time()
    hub = await hubs.start(config)
    after = trio.current_time()
    for agent_id in (worker.agent_id, requester.agent_id):
        agent = hub.router.registry.get(agent_id)
        assert agent is not None
        assert not agent.online
        assert agent.resume_by is not None
        assert before + grace <= agent.resume_by <= after + grace
    # Past the grace that started when it left, within the one that started now.
    while trio.current_time() <= left + grace:  # noqa: ASYNC110 - waiting on the clock
        await trio.sleep(0.01)
    assert trio.current_time() < before + grace, "too slow to tell the two graces apart"
    worker = await resume(hubs, worker, "worker", "work")
    summary = await worker.request("status")
    counters = summary["payload"]["counters"]
    assert (counters["delegated"], counters["completed"]) == (1, 1)
    # The requester did not resume: its grace (from the restart) ends, and it is gone.
    await wait_until(lambda: hub.router.registry.get(requester.agent_id) is None)
    assert trio.current_time() >= before + grace
    late = await hubs.wire()
    reply = await late.register(
        "requester", resume={"agent_id": requester.agent_id, "token": requester.token}
    )
    assert reply["payload"]["resumed"] is False
    await hubs.stop(worker, late)


# ---------------------------------------------------------------------------------------
# When it is on disk


@pytest.mark.parametrize("durable", [True, False], ids=["sqlite", "memory"])
async def test_the_delegate_reply_waits_for_its_commit(
    open_hubs: Callable[..., Hubs], durable: bool
) -> None:
    hubs = open_hubs(memory=not durable)
    gate = threading.Event()
    gate.set()
    await hubs.start(faults=waiting_for(gate))
    hub = hubs.hub
    assert hub is not None
    worker, requester = await pair(hubs)
    looker = await hubs.wire()  # unregistered: nothing of it waits for a commit
    gate.clear()  # the next commit does not end until the gate opens
    try:
        await requester.send("delegate", {"capability": "work"}, msg_id="d1")
        await requester.send("heartbeat", msg_id="h1")
        await wait_until(lambda: len(hub.router.tasks) == 1)  # it was routed
        # The hub answers meanwhile, on a connection that waits for nothing...
        assert (await looker.request("heartbeat"))["type"] == "heartbeat_ack"
        if not durable:  # nothing to wait for: the reply and the ack went at once
            assert not nothing_arrived(requester)
            return
        # ... but neither the reply, nor the ack sent after it, nor the task went out.
        assert nothing_arrived(requester)
        assert nothing_arrived(worker)
    finally:
        gate.set()
    reply, ack = await requester.message(), await requester.message()
    assert (reply["type"], reply["in_reply_to"]) == ("delegate", "d1"), reply
    assert (ack["type"], ack["in_reply_to"]) == ("heartbeat_ack", "h1"), ack
    assert (await assignment(worker))["task_id"] == reply["payload"]["task_id"]
    await hubs.stop(worker, requester, looker)


async def test_a_delegate_given_up_on_before_its_reply_is_cancelled_when_it_comes(
    hubs: Hubs, nursery: trio.Nursery
) -> None:
    # The SDK gives up on `submit` (a deadline, a cancelled MCP call) while the hub holds
    # the reply for its commit: the task exists all the same. When the reply comes, the
    # client cancels it rather than leave it running for nobody.
    gate = threading.Event()
    gate.set()
    hub = await hubs.start(faults=waiting_for(gate))
    agent = Agent("worker")
    stopped = trio.Event()

    @agent.capability()
    async def slow() -> None:
        try:
            await trio.sleep_forever()
        finally:
            stopped.set()

    await nursery.start(agent.serve, hub.url)
    async with connect(hub.url, name="asker") as asker:
        gate.clear()  # the delegate's commit, hence its reply, waits
        try:
            with trio.CancelScope() as giving_up:

                async def give_up() -> None:
                    await wait_until(lambda: len(hub.router.tasks) == 1)  # it was routed
                    giving_up.cancel()

                nursery.start_soon(give_up)
                await asker.submit("slow")
            assert giving_up.cancelled_caught
        finally:
            gate.set()
        (task_id,) = [r.task_id for _, r in hub.router.tasks.page(limit=10)[0]]
        await wait_until(lambda: hub.router.tasks.get(task_id).state.value == "cancelled")
        with trio.fail_after(WAIT):
            await stopped.wait()  # and its handler stopped
    await hubs.stop()


async def test_a_client_refused_for_a_failing_store_tries_its_next_hub(
    hubs: Hubs, hub: Hub
) -> None:
    def faults(db: sqlite3.Connection) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    sick = await hubs.start(faults=faults)
    first = await hubs.wire()
    await first.send("register", {"name": "first", "capabilities": []})
    await wait_until(lambda: sick.router.store_error is not None)
    urls = [sick.url, hub.url]  # `hub`: a healthy memory hub
    with trio.fail_after(WAIT):
        async with connect(urls, name="mover", backoff=Backoff(base=0.01, cap=0.02)) as client:
            assert (client.url, client.attempts, client.sessions) == (hub.url, 2, 1)
            assert [a.name for a in await client.discover("")] == ["mover"]
    await hubs.stop(first)


async def test_a_failing_store_refuses_new_work_and_loses_nothing(hubs: Hubs) -> None:
    failing = threading.Event()

    def faults(db: sqlite3.Connection) -> None:
        if failing.is_set():
            raise sqlite3.OperationalError("database or disk is full")

    hub = await hubs.start(faults=faults)
    worker, requester = await pair(hubs)
    other = await hubs.wire()
    await other.register("other")
    before = await delegate(requester)
    await assignment(worker)

    failing.set()
    await answer(worker, before)  # accepted: its outcome waits for the store
    assert not await routed(worker)  # no error for the worker
    await wait_until(lambda: hub.router.store_error is not None)
    refused = await other.request("delegate", {"capability": "work"})
    assert refused["type"] == "error", refused
    assert refused["payload"]["code"] == "store_unavailable"
    assert "database or disk is full" in refused["payload"]["message"]
    newcomer = await hubs.wire()
    fresh = await newcomer.request("register", {"name": "new", "capabilities": []})
    assert fresh["payload"]["code"] == "store_unavailable", fresh
    assert (await other.request("heartbeat"))["type"] == "heartbeat_ack"
    assert nothing_arrived(requester)  # its outcome is held, not lost

    failing.clear()  # the retry commits what was held, and the outcome goes out, once
    assert await outcomes(requester, until=1) == Counter([before])
    await wait_until(lambda: hub.router.store_error is None)
    after = await delegate(other)
    assert (await assignment(worker))["task_id"] == after
    await hubs.stop(worker, requester, other, newcomer)

    store = SQLiteStore(hubs.path)
    snapshot = store.load()
    store.close()
    rows = {row.task_id: row for row in map(TaskRow._make, snapshot.tasks)}
    assert rows[before].state == "completed"
    assert not rows[before].owed  # delivered, and stored as such
    assert rows[after].state == "in_progress"
    assert snapshot.counters["delegated"] == 2
    assert snapshot.counters["completed"] == 1


async def test_a_graceful_stop_stores_what_is_left(hubs: Hubs) -> None:
    gate = threading.Event()
    gate.set()
    await hubs.start(faults=waiting_for(gate))
    worker, requester = await pair(hubs)
    early = [await delegate(requester) for _ in range(3)]
    late = [await delegate(requester) for _ in range(3)]
    for _ in range(6):
        await assignment(worker)
    for task_id in early:
        await answer(worker, task_id)
    assert await outcomes(requester, until=3) == Counter(early)
    # These outcomes still wait for their commit when the hub is told to stop: they go
    # out before the 1001, and that they were written is stored before the hub ends.
    gate.clear()
    for task_id in late:
        await answer(worker, task_id)
    assert not await routed(worker)
    assert nothing_arrived(requester)
    heard = await hubs.stop(worker, requester, then=gate.set)
    assert results(heard[requester]) == Counter(late)

    hub = await hubs.start()
    tasks = hub.router.tasks
    assert [tasks.get(t).state.value for t in early + late] == ["completed"] * 6  # type: ignore[union-attr]
    assert tasks.owed(requester.agent_id) == []
    back = await resume(hubs, requester, "requester")
    assert not results(await routed(back))  # nothing is sent twice
    await hubs.stop(back)


async def test_a_batch_failing_as_the_hub_stops_is_stored_by_the_last_commit(
    hubs: Hubs,
) -> None:
    # The outcomes go out as the hub stops; the commit that records them as written
    # fails once, and the hub is gone before it tries again: the last commit, after the
    # connections closed, must store that batch.
    gate = threading.Event()
    gate.set()
    calls: list[float] = []  # when each write began
    fail_at = [math.inf]

    def faults(db: sqlite3.Connection) -> None:
        call = len(calls)
        calls.append(time.monotonic())
        gate.wait(WAIT)
        if call == fail_at[0]:
            raise sqlite3.OperationalError("disk I/O error")

    def then() -> None:
        fail_at[0] = len(calls)  # the commit after the one waiting at the gate
        gate.set()

    await hubs.start(faults=faults)
    worker, requester = await pair(hubs)
    task_ids = [await delegate(requester) for _ in range(3)]
    for _ in task_ids:
        await assignment(worker)
    gate.clear()
    waiting = len(calls) + 1
    # One write: one batch, which waits at the gate.
    await worker.stream.send_all(
        b"".join(
            worker.frame("result", {"task_id": t, "success": True, "data": 1}) for t in task_ids
        )
    )
    assert not await routed(worker)
    await wait_until(lambda: len(calls) == waiting)  # the commit is at the gate
    heard = await hubs.stop(worker, requester, then=then)
    assert results(heard[requester]) == Counter(task_ids)
    # (It was tried again at once, by the last commit, unless the hub took longer than
    # the loop's first retry, 0.05 s, to close: then by the loop.)
    assert len(calls) >= fail_at[0] + 2, "the failing batch was not tried again"

    hub = await hubs.start()
    assert hub.router.tasks.owed(requester.agent_id) == []
    back = await resume(hubs, requester, "requester")
    assert not results(await routed(back))  # nothing is sent twice
    await hubs.stop(back)


# ---------------------------------------------------------------------------------------
# Through the SDK


@pytest.mark.parametrize("durable", [True, False], ids=["sqlite", "memory"])
async def test_an_sdk_delegate_waits_across_a_restart(
    nursery: trio.Nursery, open_hubs: Callable[..., Hubs], durable: bool
) -> None:
    hubs = open_hubs(memory=not durable)
    hub = await hubs.start()
    port = hub.port or 0
    url = f"ws://127.0.0.1:{port}"
    release = trio.Event()
    calls: list[int] = []
    agent = Agent("worker")

    @agent.capability()
    async def work(n: int) -> int:
        calls.append(n)
        await release.wait()
        return n * 2

    backoff = Backoff(base=0.02, cap=0.05)
    served = trio.Event()

    async def serve(task_status: trio.TaskStatus[Agent]) -> None:
        try:
            await agent.serve(url, backoff=backoff, task_status=task_status)
        finally:
            served.set()

    await nursery.start(serve)
    async with connect(url, name="requester", backoff=backoff) as client:
        handle = await client.submit("work", {"n": 21})
        await wait_until(lambda: calls == [21])
        await hubs.stop()
        await hubs.start(port=port)
        if not durable:
            with trio.fail_after(WAIT), pytest.raises(HubRestarted):
                await handle.wait()
            release.set()
        else:
            await wait_until(lambda: client.sessions == 2 and agent.client.sessions == 2)  # type: ignore[union-attr]
            release.set()
            with trio.fail_after(WAIT):
                assert await handle.wait() == 42
            assert calls == [21]  # the task came again, and the agent knew it had it
    agent.shutdown()
    with trio.fail_after(WAIT):
        await served.wait()
    await hubs.stop()


async def test_frames_held_for_a_commit_count_against_the_outbox(hubs: Hubs) -> None:
    # A client pipelining requests while a commit is slow must not be cut as a slow
    # consumer when the held replies are released: the hub stops reading from it once
    # what is held and what is queued fill half its outbox, as it does without a store.
    gate = threading.Event()
    gate.set()
    hub = await hubs.start(HubConfig(outbox_size=16), faults=waiting_for(gate))
    worker, requester = await pair(hubs)
    conn: Any = hub.router.connection_of(requester.agent_id)
    gate.clear()
    try:
        await requester.send("delegate", {"capability": "work"}, msg_id="d1")
        for i in range(60):
            await requester.send("heartbeat", msg_id=f"h{i}")
        # Either the hub stopped reading (it counts the held frames), or it held more
        # than the whole outbox takes (it did not).
        await wait_until(lambda: len(conn._held) > 16 or not conn.has_room(inbound=False))
    finally:
        gate.set()
    replies = 0
    while replies < 61:
        event = await requester.event()
        assert not isinstance(event, CloseConnection), f"cut after {replies}: {event}"
        assert event is not None, f"the hub closed the connection after {replies} replies"
        if isinstance(event, TextMessage):
            replies += 1
    await hubs.stop(worker, requester)
