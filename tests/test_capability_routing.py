"""Capability routing through a real hub and the SDK (issue 16): agents that declare how
many tasks they run at once never get more, the rest wait at the hub and move to the
first free slot; discovery by keywords, ranked, with filters."""

from __future__ import annotations

from collections import Counter

import trio

from agentmesh import AGENT_EVENT_KINDS, Agent, Hub, capability, connect
from agentmesh.protocol import Match, TaskInfo

from .conftest import WAIT
from .test_delivery import wait_until


class Gate:
    """Handlers that count how many run at once on each agent, and wait to be let go."""

    def __init__(self) -> None:
        self.running = Counter[str]()
        self.peak = Counter[str]()
        self.started = 0
        self.order: list[int] = []  # the tasks' `n`, as they started
        self.go = trio.Event()

    def agent(self, name: str, max_concurrency: int) -> Agent:
        agent = Agent(name, max_concurrency=max_concurrency)

        @agent.capability("slow-work")
        async def slow_work(n: int) -> int:
            self.running[name] += 1
            self.started += 1
            self.order.append(n)
            self.peak[name] = max(self.peak[name], self.running[name])
            try:
                await self.go.wait()
            finally:
                self.running[name] -= 1
            return n

        return agent


async def test_agents_of_concurrency_2_never_get_a_third_task(
    hub: Hub, nursery: trio.Nursery
) -> None:
    assert hub.url is not None
    gate = Gate()
    for name in ("w1", "w2", "w3"):
        await nursery.start(gate.agent(name, 2).serve, hub.url)
    async with connect(hub.url, name="asker") as asker:
        handles = [await asker.submit("slow-work", {"n": n}, ttl=60) for n in range(30)]
        await wait_until(lambda: gate.started == 6)
        waiting = [h for h in handles if h.agent_id == ""]
        assert len(waiting) == 24  # the hub holds them, the agents do not
        info = await asker.status(waiting[-1].task_id)
        assert isinstance(info, TaskInfo)
        assert info.state == "pending"
        assert info.queue_position == 24
        gate.go.set()
        with trio.fail_after(WAIT):
            results = [await h.wait() for h in handles]
    assert results == list(range(30))
    assert dict(gate.peak) == {"w1": 2, "w2": 2, "w3": 2}
    assert len({h.agent_id for h in handles}) == 3  # each learnt its agent from the hub


async def test_a_high_priority_task_overtakes_the_queue(hub: Hub, nursery: trio.Nursery) -> None:
    assert hub.url is not None
    gate = Gate()
    await nursery.start(gate.agent("only", 1).serve, hub.url)
    async with connect(hub.url, name="asker") as asker:
        first = await asker.submit("slow-work", {"n": 0})
        await wait_until(lambda: gate.started == 1)
        low = [await asker.submit("slow-work", {"n": n}) for n in (1, 2)]
        high = await asker.submit("slow-work", {"n": 3}, priority=50)
        gate.go.set()
        with trio.fail_after(WAIT):
            for handle in (first, high, *low):
                await handle.wait()
    assert gate.order == [0, 3, 1, 2]


async def test_discover_ranks_matches_and_filters(hub: Hub, nursery: trio.Nursery) -> None:
    assert hub.url is not None

    class Reviewer(Agent):
        @capability("code-review-x", description="reviews Python code", max_concurrency=3)
        async def review(self, code: str) -> str:
            return code

    exact = Agent("exact", tags=["python", "fast"])

    @exact.capability("code-review")
    async def code_review(code: str) -> str:
        return code

    await nursery.start(Reviewer("x").serve, hub.url)
    await nursery.start(exact.serve, hub.url)
    async with connect(hub.url, name="asker") as asker:
        found = await asker.discover("Code Review")
        assert [(a.name, a.match) for a in found] == [
            ("exact", Match(reason="exact", score=3, capability="code-review")),
            ("x", Match(reason="name", score=2, capability="code-review-x")),
        ]
        assert found[0].tags == ("python", "fast")
        assert found[1].capabilities[0].max_concurrency == 3
        assert found[1].max_concurrency is None  # not declared: the hub does not limit it
        assert [a.name for a in await asker.discover("review", tags=["PYTHON"])] == ["exact"]
        assert [a.name for a in await asker.discover("python")] == ["x", "exact"]  # text
        assert [a.name for a in await asker.discover("", online=True, tags=["fast"])] == ["exact"]
        assert await asker.discover("code reviewer") == []  # words match whole


async def test_registry_changes_arrive_as_events_without_polling(
    hub: Hub, nursery: trio.Nursery
) -> None:
    assert hub.url is not None
    async with (
        connect(hub.url, name="watcher") as watcher,
        watcher.watch(AGENT_EVENT_KINDS) as changes,
    ):
        agent = Agent("tagged", tags=["gpu"], max_concurrency=3)

        @agent.capability("render")
        async def render() -> None:
            return None

        await nursery.start(agent.serve, hub.url)
        with trio.fail_after(WAIT):
            event = await changes.receive()
        assert event.kind == "agent_registered"
        assert event.agent is not None
        assert event.agent.tags == ("gpu",)
        assert event.agent.max_concurrency == 3
        assert [c.name for c in event.agent.capabilities] == ["render"]
        agent.shutdown()
        with trio.fail_after(WAIT):
            left = await changes.receive()
        assert left.kind == "agent_left"
