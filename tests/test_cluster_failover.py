"""Failover in a cluster (issue 17; docs/cluster.md, "Failure cases", rows 1 to 3): the
hub holding some agents is SIGKILLed. Agents that fail over resume on another hub with
their IDs, and their tasks end once each; an agent that never comes back has its tasks
failed with a reason. Requesters whose hub dies resume on another hub, which takes
their tasks over from the tasks bucket: each one they were told of ends once.

Hubs A and B run in this process (tests/test_cluster.py's harness); hub C, the one that
dies, is a real `python -m agentmesh start` subprocess, killed with SIGKILL. Every wait
is bounded; conditions are waited for, never slept on.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from agentmesh import Agent, HubConfig, TaskContext, connect
from agentmesh import protocol as p
from agentmesh.client import Client
from agentmesh.errors import AgentMeshError, ConnectionLost, TaskFailed

from . import test_cluster
from .test_cluster import FAST, WAIT, Nats, discovered, free_port, nats, start_hub

pytest.importorskip("nats")

__all__ = ["nats"]  # the fixture, used by name

SILENT_AFTER = 3.0  # agentmesh._cluster.SILENT_AFTER (not imported: it imports nats)


class Subprocess:
    """Hub C: `python -m agentmesh start` on a free port, its log in a file."""

    def __init__(self, nats_url: str, name: str, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}"
        self.argv = [sys.executable, "-m", "agentmesh", "start", "--host", "127.0.0.1"]
        self.argv += ["--port", str(self.port), "--memory", "--cluster", nats_url]
        self.argv += ["--hub-name", name, *extra]
        self.log = log
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = await trio.lowlevel.open_process(
                self.argv, stdout=subprocess.DEVNULL, stderr=out
            )
        with trio.fail_after(WAIT):
            while True:
                assert self.proc.poll() is None, f"hub exited:\n{self.log.read_text()}"
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.05)  # bounded: waiting for it to listen
                    continue
                await stream.aclose()
                return

    async def kill(self) -> None:
        """SIGKILL: no goodbye to NATS, to its agents or to anyone."""
        assert self.proc is not None
        self.proc.kill()
        with trio.fail_after(WAIT):
            await self.proc.wait()
        assert self.proc.returncode == -9

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            await self.kill()


def count_result_frames(client: Client, heard: Counter[str]) -> None:
    """Count every `result` frame `client` reads, by task ID, before the SDK's own
    dropping of a second one: what the requester's hub wrote, not what the SDK kept."""
    dispatch = client._dispatch

    def counting(envelope: p.Envelope) -> None:
        if envelope.type is p.MessageType.RESULT and envelope.in_reply_to is None:
            heard[envelope.payload.task_id] += 1
        dispatch(envelope)

    client._dispatch = counting  # type: ignore[method-assign]


async def serve_cancellably(
    nursery: trio.Nursery, agent: Agent, urls: list[str]
) -> Callable[[], None]:
    """Serve `agent` at `urls` (FAST backoff) until the returned function is called."""
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            await agent.serve(urls, backoff=FAST, task_status=task_status)

    with trio.fail_after(WAIT):
        await nursery.start(run)
    return scope.cancel


TOTAL = 2_000  # delegations in all
REQUESTERS = 2
IN_FLIGHT = 16  # per requester
AGENTS = 4
RUN_LIMIT = 20.0  # seconds for the whole run, the failover included (a bound, not a wait)


async def test_sigkill_of_an_agents_hub_loses_and_duplicates_nothing(
    nats: Nats, nursery: trio.Nursery, tmp_path: Path
) -> None:
    a, _ = await start_hub(nursery, nats.url, "A")
    b, _ = await start_hub(nursery, nats.url, "B")
    c = Subprocess(nats.url, "C", tmp_path / "c.log")
    await c.start()
    try:
        await _sigkill_run(nursery, a.url, b.url, c)
    finally:
        await c.stop()


async def _sigkill_run(nursery: trio.Nursery, a_url: str, b_url: str, c: Subprocess) -> None:
    calls: Counter[str] = Counter()  # handler calls, by task ID
    frames: Counter[str] = Counter()  # task frames the agents read, by task ID
    handled_by: dict[str, Counter[str]] = {}  # agent ID -> its handler calls, by task ID
    agents: list[Agent] = []
    stops: list[Callable[[], None]] = []
    for i in range(AGENTS):
        agent = Agent(f"worker-{i}", description="works, and fails over")
        mine: Counter[str] = Counter()

        @agent.capability("work")
        async def work(n: int, ctx: TaskContext, mine: Counter[str] = mine) -> int:
            calls[ctx.task_id] += 1
            mine[ctx.task_id] += 1
            await trio.lowlevel.checkpoint()  # in flight across a yield
            return n

        on_task = agent._on_task

        def counted(task: p.TaskAssignment, requester: str, on_task: Any = on_task) -> None:
            frames[task.task_id] += 1
            on_task(task, requester)

        agent._on_task = counted  # type: ignore[method-assign]
        stops.append(await serve_cancellably(nursery, agent, [c.url, b_url]))
        agents.append(agent)
        assert agent.client is not None
        assert agent.client.agent_id is not None
        handled_by[agent.client.agent_id] = mine
    ids = {agent.client.agent_id for agent in agents if agent.client is not None}

    outcomes: dict[int, list[tuple[str, Any]]] = {}  # delegation -> what its call gave
    task_of: dict[int, str] = {}  # delegation -> its task ID
    heard: Counter[str] = Counter()  # result frames the requesters read, by task ID
    completed_third = trio.Event()
    done = 0
    next_n = 0
    killed_at: float | None = None
    in_flight_at_kill = 0
    ended_at: float | None = None

    async with connect(a_url, name="looker") as looker:
        found = await discovered(looker, "work", count=AGENTS)
        assert {(f.agent_id, f.hub) for f in found} == {(i, "C") for i in ids}

        async def requester(index: int) -> None:
            async with connect(a_url, name=f"asker-{index}") as client:
                count_result_frames(client, heard)
                async with trio.open_nursery() as lanes:
                    for _ in range(IN_FLIGHT):
                        lanes.start_soon(lane, client)

        async def lane(client: Client) -> None:
            nonlocal next_n, done
            while next_n < TOTAL:
                n, next_n = next_n, next_n + 1
                try:
                    handle = await client.submit("work", {"n": n}, ttl=60.0)
                    task_of[n] = handle.task_id
                    outcome: tuple[str, Any] = ("completed", await handle.wait())
                except AgentMeshError as exc:
                    outcome = ("failed", f"{type(exc).__name__}: {exc}")
                outcomes.setdefault(n, []).append(outcome)
                done += 1
                if done >= TOTAL // 3:
                    completed_third.set()

        async def killer() -> None:
            nonlocal killed_at, in_flight_at_kill
            await completed_third.wait()
            killed_at, in_flight_at_kill = trio.current_time(), next_n - done
            await c.kill()

        began = trio.current_time()
        with trio.move_on_after(RUN_LIMIT):
            async with trio.open_nursery() as run:
                run.start_soon(killer)
                async with trio.open_nursery() as requesters:
                    for index in range(REQUESTERS):
                        requesters.start_soon(requester, index)
                ended_at = trio.current_time()
        tasks = set(task_of.values())
        lost = TOTAL - sum(len(o) for o in outcomes.values())
        twice = sum(len(o) - 1 for o in outcomes.values() if len(o) > 1)
        duplicated = twice + sum(n - 1 for n in heard.values() if n > 1)
        duplicated += sum(n - 1 for n in calls.values() if n > 1)
        completed = sum(1 for o in outcomes.values() if o[0][0] == "completed")
        failed = Counter(str(o[0][1]) for o in outcomes.values() if o[0][0] == "failed")
        print(
            f"\nfailover run: total={TOTAL} lost={lost} duplicated={duplicated}"
            f" completed={completed} failed={sum(failed.values())}"
            f" re-delivered(handler calls - tasks)={sum(calls.values()) - len(calls)}"
            f" re-delivered(task frames - tasks)={sum(frames.values()) - len(frames)}"
            f" handler-tasks={len(calls)} in-flight-at-kill={in_flight_at_kill}"
            f" killed-after={(killed_at or began) - began:.2f}s"
            f" run={(ended_at or trio.current_time()) - began:.2f}s"
            f" per-agent={sorted(len(m) for m in handled_by.values())}"
        )
        for reason, times in failed.most_common(5):
            print(f"  failed x{times}: {reason}")
        if ended_at is None:  # what the stuck ones wait for
            state = [(f.agent_id, f.hub, f.online) for f in await looker.discover("work")]
            print(f"  not ended within {RUN_LIMIT:g}s; the directory on A: {state}")
            where = [(x.client.url, x.client.online) for x in agents if x.client is not None]
            print(f"  the agents' SDKs (URL, online): {where}")
        assert killed_at is not None, "hub C was never killed"
        assert lost == 0, f"{lost} of {TOTAL} delegations never ended within {RUN_LIMIT:g}s"
        assert duplicated == 0, (twice, heard.most_common(3), calls.most_common(3))
        assert completed == TOTAL, failed.most_common(5)
        assert all(o == [("completed", n)] for n, o in outcomes.items())
        # Each task handled once, by one agent; every completed one was a handler call.
        assert set(calls) == tasks
        assert set(heard) == tasks  # and each once (duplicated == 0)
        assert len(tasks) == TOTAL
        # The SDK re-sends the result of a task it finished only while it remembers it
        # (1,024 per agent): here no agent handled more than that in the whole run.
        assert max(len(m) for m in handled_by.values()) <= 1024

        # The agents are on B now, with the IDs they had on C.
        found = await discovered(looker, "work", count=AGENTS, hub="B")
        assert {(f.agent_id, f.hub, f.online) for f in found} == {(i, "B", True) for i in ids}
        assert {agent.client.agent_id for agent in agents if agent.client is not None} == ids
        assert all(agent.client is not None and agent.client.url == b_url for agent in agents)
    for stop in stops:
        stop()


GRACE = 2.0  # resume_grace of every hub in the next test


async def test_an_agent_that_never_returns_has_its_tasks_failed_with_a_reason(
    nats: Nats, nursery: trio.Nursery, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The harness's hubs, with a short resume_grace (start_hub builds its HubConfig).
    monkeypatch.setattr(test_cluster, "HubConfig", partial(HubConfig, resume_grace=GRACE))
    a, _ = await start_hub(nursery, nats.url, "A")
    await start_hub(nursery, nats.url, "B")
    assert a.config.resume_grace == GRACE
    c = Subprocess(nats.url, "C", tmp_path / "c.log", "--resume-grace", str(GRACE))
    await c.start()
    try:
        await _never_returns(nursery, a.url, c)
    finally:
        await c.stop()


async def _never_returns(nursery: trio.Nursery, a_url: str, c: Subprocess) -> None:
    started: list[str] = []
    all_started, never = trio.Event(), trio.Event()
    agent = Agent("stranded", description="its hub dies and it has nowhere else to go")

    @agent.capability("block")
    async def block(ctx: TaskContext) -> None:
        started.append(ctx.task_id)
        if len(started) == 3:
            all_started.set()
        await never.wait()

    stop = await serve_cancellably(nursery, agent, [c.url])
    assert agent.client is not None
    assert agent.client.agent_id is not None
    agent_id = agent.client.agent_id
    outcomes: dict[str, BaseException | Any] = {}
    async with connect(a_url, name="asker") as client:
        await discovered(client, "block", hub="C")
        handles = [await client.submit("block", {}, ttl=60.0) for _ in range(3)]
        with trio.fail_after(WAIT):
            await all_started.wait()  # the tasks reached the agent on C
        assert sorted(started) == sorted(h.task_id for h in handles)

        async def wait(handle: Any) -> None:
            try:
                outcomes[handle.task_id] = await handle.wait()
            except AgentMeshError as exc:
                outcomes[handle.task_id] = exc

        await c.kill()
        killed = trio.current_time()
        limit = SILENT_AFTER + GRACE + 4.0
        with trio.move_on_after(limit):
            async with trio.open_nursery() as waits:
                for handle in handles:
                    waits.start_soon(wait, handle)
        took = trio.current_time() - killed
        state = [(f.agent_id, f.hub, f.online) for f in await client.discover("block")]
        print(
            f"\nnever returns: ended={len(outcomes)} of 3 in {took:.2f}s (limit {limit:g}s);"
            f" outcomes={ {k: repr(v) for k, v in outcomes.items()} }; directory on A: {state}"
        )
        assert len(outcomes) == 3, f"{3 - len(outcomes)} of 3 tasks did not end in {limit:g}s"
        for outcome in outcomes.values():
            assert isinstance(outcome, TaskFailed), outcome
            assert agent_id in str(outcome), outcome
            assert "left" in str(outcome), outcome
        with trio.fail_after(WAIT):
            while True:
                if not await client.discover("block"):
                    break
                await trio.sleep(0.05)  # bounded: the row's deletion reaches A
    stop()


async def test_sigkill_of_a_requesters_hub_keeps_every_task_it_took(
    nats: Nats, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The requesters' hub C dies during 2,000 delegations to agents on A. The
    requesters resume on B, which takes over their tasks from the tasks bucket: every
    task whose `delegate` reply a requester had ends once, completed. A delegation
    whose reply never came (in flight at the kill) raises `ConnectionLost`, as the SDK
    says, and the lane submits it again."""
    a, _ = await start_hub(nursery, nats.url, "A")
    b, _ = await start_hub(nursery, nats.url, "B")
    c = Subprocess(nats.url, "C", tmp_path / "c.log")
    await c.start()
    try:
        await _requesters_hub_dies(nursery, a.url, b.url, c)
    finally:
        await c.stop()


async def _requesters_hub_dies(
    nursery: trio.Nursery, a_url: str, b_url: str, c: Subprocess
) -> None:
    calls: Counter[str] = Counter()  # handler calls, by task ID
    for i in range(AGENTS):
        agent = Agent(f"worker-{i}", description="works on A")

        @agent.capability("work")
        async def work(n: int, ctx: TaskContext) -> int:
            calls[ctx.task_id] += 1
            await trio.lowlevel.checkpoint()  # in flight across a yield
            return n

        await serve_cancellably(nursery, agent, [a_url])

    outcomes: dict[int, list[tuple[str, Any]]] = {}  # delegation -> what it gave
    task_of: dict[int, str] = {}  # delegation -> its task, once the hub took it
    heard: Counter[str] = Counter()  # result frames the requesters read, by task ID
    unanswered = 0  # submits the hub's death cut off before their reply: submitted again
    completed_third = trio.Event()
    done = next_n = 0
    killed_at: float | None = None
    in_flight_at_kill = 0
    ended_at: float | None = None
    ids: set[str] = set()

    async def requester(index: int) -> None:
        async with connect([c.url, b_url], name=f"asker-{index}", backoff=FAST) as client:
            assert client.agent_id is not None
            ids.add(client.agent_id)
            await discovered(client, "work", count=AGENTS)
            count_result_frames(client, heard)
            async with trio.open_nursery() as lanes:
                for _ in range(IN_FLIGHT):
                    lanes.start_soon(lane, client)
            assert client.url == b_url  # it failed over

    async def lane(client: Client) -> None:
        nonlocal next_n, done, unanswered
        while next_n < TOTAL:
            n, next_n = next_n, next_n + 1
            while True:
                try:
                    handle = await client.submit("work", {"n": n}, ttl=60.0)
                    break
                except ConnectionLost:
                    unanswered += 1  # no reply: the task may exist, nobody waits for it
            task_of[n] = handle.task_id
            try:
                outcome: tuple[str, Any] = ("completed", await handle.wait())
            except AgentMeshError as exc:
                outcome = ("failed", f"{type(exc).__name__}: {exc}")
            outcomes.setdefault(n, []).append(outcome)
            done += 1
            if done >= TOTAL // 3:
                completed_third.set()

    async def killer() -> None:
        nonlocal killed_at, in_flight_at_kill
        await completed_third.wait()
        killed_at, in_flight_at_kill = trio.current_time(), next_n - done
        await c.kill()

    began = trio.current_time()
    with trio.move_on_after(RUN_LIMIT):
        async with trio.open_nursery() as run:
            run.start_soon(killer)
            async with trio.open_nursery() as requesters:
                for index in range(REQUESTERS):
                    requesters.start_soon(requester, index)
            ended_at = trio.current_time()
    tasks = set(task_of.values())
    lost = TOTAL - sum(len(o) for o in outcomes.values())
    twice = sum(len(o) - 1 for o in outcomes.values() if len(o) > 1)
    wire_twice = sum(n - 1 for n in heard.values() if n > 1)  # allowed across a crash
    duplicated = twice + sum(n - 1 for n in calls.values() if n > 1 and calls)
    completed = sum(1 for o in outcomes.values() if o[0][0] == "completed")
    failed = Counter(str(o[0][1]) for o in outcomes.values() if o[0][0] == "failed")
    print(
        f"\nrequesters' hub killed: total={TOTAL} lost={lost} duplicated={duplicated}"
        f" completed={completed} failed={sum(failed.values())}"
        f" outcomes-on-the-wire-twice={wire_twice} unanswered-submits={unanswered}"
        f" handler-tasks={len(calls)} orphan-handler-tasks={len(set(calls) - tasks)}"
        f" in-flight-at-kill={in_flight_at_kill}"
        f" killed-after={(killed_at or began) - began:.2f}s"
        f" run={(ended_at or trio.current_time()) - began:.2f}s"
    )
    for reason, times in failed.most_common(5):
        print(f"  failed x{times}: {reason}")
    assert killed_at is not None, "hub C was never killed"
    assert len(ids) == REQUESTERS
    assert lost == 0, f"{lost} of {TOTAL} delegations never ended within {RUN_LIMIT:g}s"
    assert duplicated == 0, (twice, calls.most_common(3))
    assert completed == TOTAL, failed.most_common(5)
    assert all(o == [("completed", n)] for n, o in outcomes.items())
    assert set(heard) >= tasks  # each task the requesters waited for was told them
    assert len(tasks) == TOTAL
