"""Chaos: a real hub, real SDK agents and requesters, and connections cut at random.

Four workers (`agentmesh.Agent`) serve a capability that takes a short random time and
sometimes raises or overruns its TTL. Three requesters (`agentmesh.Client`) submit a few
hundred tasks with short TTLs, and cancel a few. Meanwhile a chaos task keeps cutting
workers' connections from the hub side (`Hub.drop`: they resume), killing workers outright
(their serve scope is cancelled, so they never deregister; a new worker takes the slot),
cutting requesters' connections (the SDK resumes), and resetting requesters' TCP
connections, which loses whatever the kernels held for them. One requester reads slowly,
and a fifth of the outcomes are large, so cuts land in the middle of partial writes.

Every task must end exactly once at its requester, no task may be lost or reported twice,
and the hub's books must balance. The run is driven by a seeded `random.Random`: set
AGENTMESH_CHAOS_SEED to replay a seed (the interleaving still depends on timing).
"""

from __future__ import annotations

import os
import random
import socket
import struct
from collections import Counter, defaultdict
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection

from agentmesh import (
    Agent,
    Backoff,
    Client,
    ConnectionLost,
    Hub,
    HubConfig,
    HubRestarted,
    NoCapableAgent,
    TaskCancelled,
    TaskFailed,
    TaskFinished,
    TaskHandle,
    TaskTimeout,
    connect,
)
from agentmesh.protocol import Envelope, MessageType

SEED = int(os.environ.get("AGENTMESH_CHAOS_SEED", "1729"))
WORKERS = 4
REQUESTERS = 3
TASKS_PER_REQUESTER = 100
FAST = Backoff(base=0.02, cap=0.1)  # reconnect well within resume_grace
GRACE = 0.5
CONFIG = HubConfig(resume_grace=GRACE, default_ttl=2.0)
SLOW_READERS = {1}  # requesters that read slowly
BIG = 200_000  # characters of a big outcome


class CountingClient(Client):
    """A requester that counts the `result` frames it receives, per task ID.

    `TaskHandle` ignores a second outcome, so a task reported twice would go unseen
    without this.
    """

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.result_frames = Counter[str]()
        self.identities: list[str] = []  # every agent ID it has had (a resume keeps it)

    def _dispatch(self, envelope: Envelope) -> None:
        if envelope.type is MessageType.RESULT and envelope.in_reply_to is None:
            self.result_frames[envelope.payload.task_id] += 1
        super()._dispatch(envelope)


class SlowReader(CountingClient):
    """A requester that reads its connection slowly: a pause now and then between frames,
    so that its frames pile up at the hub and the hub's writes to it are cut short."""

    async def _read_until_closed(self, ws: WebSocketConnection) -> None:
        await super()._read_until_closed(_Lagging(ws))  # type: ignore[arg-type]


class _Lagging:
    """A connection whose `get_message` takes its time."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self._ws = ws
        self._pauses = random.Random(SEED + 2)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ws, name)

    async def get_message(self) -> str | bytes:
        if self._pauses.random() < 0.1:
            await trio.sleep(0.02)
        return await self._ws.get_message()


class Chaos:
    """The whole experiment: the hub, its workers and requesters, and the tallies."""

    def __init__(self, hub: Hub, nursery: trio.Nursery, seed: int) -> None:
        self.hub = hub
        self.nursery = nursery
        self.rng = random.Random(seed)
        self.workers: list[tuple[Agent, trio.CancelScope]] = []
        self.requesters: list[CountingClient] = []
        self.runs = Counter[int]()  # handler runs per task (by its `n`), over every worker
        self.stats = Counter[str]()
        self.outcomes: dict[str, list[str]] = defaultdict(list)  # task ID -> outcomes seen
        self.handles: list[tuple[CountingClient, TaskHandle]] = []
        self.expected: dict[str, int] = {}  # task ID -> the data a completion must carry

    def report(self) -> str:
        counters = self.hub.router.counters
        hub = {k: counters[k] for k in ("delegated", "completed", "failed", "timeout",
                                        "cancelled")}  # fmt: skip
        return f"seed={SEED} tallies={dict(sorted(self.stats.items()))} hub={hub}"

    # --- workers ------------------------------------------------------------------------

    def _worker(self, slot: int) -> Agent:
        agent = Agent(f"worker-{slot}", shutdown_grace=0.1)

        @agent.capability("work")
        async def work(n: int, seconds: float, fail: bool, big: bool = False) -> Any:
            self.runs[n] += 1
            await trio.sleep(seconds)
            if fail:
                raise ValueError(f"task {n} failed on purpose")
            # A big outcome makes the hub's writes to its requester partial.
            return [n * 2, "x" * BIG] if big else n * 2

        return agent

    async def _serve_worker(
        self, slot: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        agent = self._worker(slot)
        with trio.CancelScope() as scope:
            if slot < len(self.workers):
                self.workers[slot] = (agent, scope)
            else:
                self.workers.append((agent, scope))
            await agent.serve(self.hub.url, backoff=FAST, task_status=task_status)

    async def start_worker(self, slot: int) -> None:
        with trio.fail_after(10):
            await self.nursery.start(self._serve_worker, slot)

    # --- requesters ---------------------------------------------------------------------

    async def start_requester(self, index: int) -> CountingClient:
        kind = SlowReader if index in SLOW_READERS else CountingClient
        client = kind(self.hub.url, name=f"requester-{index}", backoff=FAST)
        with trio.fail_after(10):
            await self.nursery.start(client.serve)
        assert client.agent_id is not None
        client.identities.append(client.agent_id)
        self.requesters.append(client)
        return client

    async def submit_all(self, client: CountingClient, first: int) -> None:
        async with trio.open_nursery() as tasks:
            for n in range(first, first + TASKS_PER_REQUESTER):
                ttl = self.rng.uniform(0.3, 1.5)
                roll = self.rng.random()
                seconds = 3.0 if roll < 0.08 else self.rng.uniform(0, 0.1)  # 8%: overruns
                fail = self.rng.random() < 0.15
                big = self.rng.random() < 0.2
                cancel_after = self.rng.uniform(0, 0.2) if self.rng.random() < 0.07 else None
                tasks.start_soon(self.one_task, client, n, ttl, seconds, fail, big, cancel_after)
                await trio.sleep(self.rng.uniform(0, 0.05))

    async def one_task(
        self,
        client: CountingClient,
        n: int,
        ttl: float,
        seconds: float,
        fail: bool,
        big: bool,
        cancel_after: float | None,
    ) -> None:
        params = {"n": n, "seconds": seconds, "fail": fail, "big": big}
        try:
            with trio.fail_after(10):  # waits out a requester reconnection at most
                handle = await client.submit("work", params, ttl=ttl)
        except ConnectionLost:  # the task may exist; its result frame is counted anyway
            self.stats["submit_lost"] += 1
            return
        except NoCapableAgent:  # every worker was just killed and not yet replaced
            self.stats["no_capable_agent"] += 1
            return
        self.stats["submitted"] += 1
        self.handles.append((client, handle))
        self.expected[handle.task_id] = n * 2
        async with trio.open_nursery() as side:
            if cancel_after is not None:
                side.start_soon(self.cancel_later, handle, cancel_after)
            outcome = await self.wait(handle, ttl)
            side.cancel_scope.cancel()
        self.outcomes[handle.task_id].append(outcome)
        self.stats[outcome] += 1

    async def wait(self, handle: TaskHandle, ttl: float) -> str:
        # The hub ends every task by its TTL; the outcome may wait for a reconnection.
        with trio.move_on_after(ttl + 10):
            try:
                data = await handle.wait()
            except TaskFailed:
                return "failed"
            except TaskTimeout:
                return "timeout"
            except TaskCancelled:
                return "cancelled"
            except HubRestarted:  # the hub forgot the requester: it must not
                return "forgotten"
            if isinstance(data, list):  # a big one: [n * 2, padding]
                data = data[0]
            if data != self.expected[handle.task_id]:
                return f"wrong data {data!r}"
            return "completed"
        return "LOST"

    async def cancel_later(self, handle: TaskHandle, delay: float) -> None:
        await trio.sleep(delay)
        try:
            await handle.cancel("chaos")
            self.stats["cancels_sent"] += 1
        except (TaskFinished, ConnectionLost):  # it ended first, or the reply was lost
            pass

    # --- the chaos ----------------------------------------------------------------------

    async def wreak(self, stop: trio.Event) -> None:
        # Its own generator, so that the submitters' draws do not shift its choices; the
        # first four strikes are one of each kind, so every kind happens in every run.
        rng = random.Random(SEED + 1)
        strikes = 0
        while not stop.is_set():
            await trio.sleep(rng.uniform(0.02, 0.12))
            roll = (0.0, 0.5, 0.7, 0.9)[strikes] if strikes < 4 else rng.random()
            strikes += 1
            slot = rng.randrange(len(self.workers))
            agent, scope = self.workers[slot]
            if roll < 0.45:  # cut a worker's connection; it resumes
                if agent.client is not None and agent.client.agent_id is not None:
                    self.stats["worker_drops"] += self.hub.drop(agent.client.agent_id)
            elif roll < 0.65:  # kill a worker: no deregister; its tasks fail after grace
                scope.cancel()
                self.stats["kills"] += 1
                await self.start_worker(slot)
            elif roll < 0.8:  # cut a requester's connection; the SDK resumes
                client = rng.choice(self.requesters)
                if client.agent_id is not None:
                    self.stats["requester_drops"] += self.hub.drop(client.agent_id)
            else:  # reset a requester's TCP connection: what the kernels held is lost
                await self.reset(rng.choice(self.requesters))

    async def reset(self, client: CountingClient) -> None:
        ws = client._ws
        if ws is None or ws.closed is not None:
            return
        sock = ws._stream.socket  # type: ignore[attr-defined]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await ws._stream.aclose()  # type: ignore[attr-defined]
        self.stats["requester_resets"] += 1


@pytest.mark.parametrize("hub_config", [CONFIG])
async def test_request_while_a_dropped_connection_winds_down(hub: Hub) -> None:
    """Requests made while a dropped connection winds down fail with ConnectionLost or
    succeed after the resume; nothing else. (Found by the chaos test: the client once
    showed itself online with no connection for a few scheduling rounds, and requests
    failed an internal assertion.)"""
    failures: list[str] = []

    async with connect(hub.url, backoff=FAST) as client:

        async def ask() -> None:
            try:
                await client.status()  # may fail with ConnectionLost, and nothing else
            except ConnectionLost:
                pass
            except AssertionError as exc:
                failures.append(f"status() raised {exc!r}")

        rounds = 0
        with trio.fail_after(10):
            while not failures and rounds < 10:  # the window is a few scheduling rounds
                rounds += 1
                assert client.agent_id is not None
                async with trio.open_nursery() as callers:
                    hub.drop(client.agent_id)
                    while client.online:  # new calls every round until it notices the drop
                        for _ in range(3):
                            callers.start_soon(ask)
                        await trio.lowlevel.checkpoint()
                while not client.online:  # noqa: ASYNC110
                    await trio.sleep(0.01)
        assert failures == [], f"after {rounds} drops"


@pytest.mark.parametrize("hub_config", [CONFIG])
async def test_chaos_every_task_ends_exactly_once(hub: Hub, nursery: trio.Nursery) -> None:
    print(f"\nchaos seed {SEED} (replay with AGENTMESH_CHAOS_SEED={SEED})")
    chaos = Chaos(hub, nursery, SEED)
    with trio.fail_after(60):
        for slot in range(WORKERS):
            await chaos.start_worker(slot)
        requesters = [await chaos.start_requester(i) for i in range(REQUESTERS)]
        stop = trio.Event()
        async with trio.open_nursery() as experiment:
            experiment.start_soon(chaos.wreak, stop)
            async with trio.open_nursery() as submitting:
                for i, client in enumerate(requesters):
                    submitting.start_soon(chaos.submit_all, client, i * TASKS_PER_REQUESTER)
            stop.set()
        # Let held outcomes of tasks whose submit lost its reply arrive too.
        router = hub.router
        while any(not record.terminal for record in router.tasks):  # noqa: ASYNC110
            await trio.sleep(0.05)
        for client in requesters:
            while True:  # a round trip: everything queued before it has arrived
                try:
                    await client.status()
                    break
                except ConnectionLost:  # the last drop of the chaos was still settling
                    await trio.sleep(0.01)

        report = chaos.report()
        print(report)
        stats = chaos.stats

        # Nothing lost, nothing forgotten, nothing wrong.
        assert stats["LOST"] == 0, report
        assert stats["forgotten"] == 0, report
        bad = [o for outcomes in chaos.outcomes.values() for o in outcomes if o.startswith("wrong")]
        assert not bad, f"{bad} {report}"
        for client in requesters:
            assert client.agent_id == client.identities[0], (
                f"a requester lost its identity {report}"
            )

        # Each handle ended exactly once, with exactly one result frame at its requester.
        task_ids = [handle.task_id for _, handle in chaos.handles]
        assert len(task_ids) == len(set(task_ids)), report
        for client, handle in chaos.handles:
            assert handle.done, f"{handle} {report}"
            assert len(chaos.outcomes[handle.task_id]) == 1, f"{handle} {report}"
            assert client.result_frames[handle.task_id] == 1, (
                f"{handle}: {client.result_frames[handle.task_id]} result frames {report}"
            )
            record = router.tasks.get(handle.task_id)
            assert record is not None, report
            assert chaos.outcomes[handle.task_id] == [record.state.value], (record, report)

        # The hub's side: every task ended, and its requester heard exactly once (this
        # includes tasks whose delegate reply was lost to a dropped connection).
        by_requester = {client.agent_id: client for client in requesters}
        for record in router.tasks:
            assert record.terminal, (record, report)
            client = by_requester[record.requester]
            assert record.notified, (record, report)
            assert client.result_frames[record.task_id] == 1, (
                f"{record}: {client.result_frames[record.task_id]} result frames {report}"
            )
        for client in requesters:
            unknown = set(client.result_frames) - {r.task_id for r in router.tasks}
            assert not unknown, f"results for tasks the hub never had: {unknown} {report}"

        # The books balance.
        counters = router.counters
        ended = sum(counters[s] for s in ("completed", "failed", "timeout", "cancelled"))
        assert ended == counters["delegated"] == len(router.tasks), report
        # A submit whose reply was lost to a dropped connection may or may not have made one.
        assert stats["submitted"] <= counters["delegated"], report
        assert counters["delegated"] <= stats["submitted"] + stats["submit_lost"], report
        for state in ("completed", "failed", "timeout", "cancelled"):
            assert counters[state] == router.tasks.counts()[state], report

        # No task ran twice (a re-sent task is dropped by the agent that already has it).
        assert max(chaos.runs.values(), default=0) == 1, report

        # The chaos did happen, and so did every kind of outcome.
        assert stats["worker_drops"] > 0, report
        assert stats["kills"] > 0, report
        assert stats["requester_drops"] > 0, report
        assert stats["requester_resets"] > 0, report
        for outcome in ("completed", "failed", "timeout"):
            assert stats[outcome] > 0, report

        for client in requesters:
            await client.aclose()
        for _, scope in chaos.workers:
            scope.cancel()
