"""The Python SDK (client and agents) against a real hub on loopback."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from functools import partial
from typing import Any

import pytest
import trio
import trio.testing

import agentmesh
from agentmesh import Agent, Backoff, Hub, HubConfig, TaskContext, capability, connect

from .conftest import WAIT

FAST = Backoff(base=0.02, cap=0.1)


def echo_agent() -> Agent:
    agent = Agent("echoer", description="says it back")

    @agent.capability("echo")
    async def echo(text: str, times: int = 1) -> str:
        """Repeat the text.

        Args:
            text: what to repeat
            times: how many times
        """
        return text * times

    @agent.capability()
    def shout(text: str) -> str:  # a plain function: runs in a thread
        return text.upper()

    return agent


class Reviewer(Agent):
    """A class-based agent with state and hooks."""

    description = "reviews code"

    def __init__(self) -> None:
        super().__init__("reviewer")
        self.reviewed = 0
        self.events: list[str] = []
        self.torn_down = trio.Event()

    async def setup(self) -> None:
        self.events.append("setup")

    async def teardown(self) -> None:
        self.events.append("teardown")
        self.torn_down.set()

    @capability("code-review", description="Counts the lines of a snippet")
    async def review(self, code: str, strict: bool = False) -> dict[str, Any]:
        self.reviewed += 1
        return {"lines": len(code.splitlines()), "strict": strict, "n": self.reviewed}


async def start(nursery: trio.Nursery, agent: Agent, hub: Hub) -> Agent:
    with trio.fail_after(WAIT):
        started: Agent = await nursery.start(agent.serve, hub.url)
    return started


# --- both styles, discover, delegate ----------------------------------------------------


async def test_functional_agent_round_trip(hub: Hub, nursery: trio.Nursery) -> None:
    agent = await start(nursery, echo_agent(), hub)
    async with connect(hub.url, name="asker") as client:
        [info] = await client.discover("ECHO")
        assert info.agent_id == agent.client.agent_id  # type: ignore[union-attr]
        echo = next(c for c in info.capabilities if c.name == "echo")
        assert echo.description == "Repeat the text."
        assert echo.params_schema == {
            "type": "object",
            "properties": {
                "text": {"type": "string", "description": "what to repeat"},
                "times": {"type": "integer", "description": "how many times"},
            },
            "required": ["text"],
            "additionalProperties": False,
        }
        assert await client.delegate("echo", {"text": "ab", "times": 2}) == "abab"
        assert await client.delegate("shout", {"text": "hi"}, to=info.agent_id) == "HI"


async def test_class_based_agent_keeps_state(hub: Hub, nursery: trio.Nursery) -> None:
    reviewer = Reviewer()
    await start(nursery, reviewer, hub)
    assert reviewer.events == ["setup"]
    async with connect(hub.url) as client:
        first = await client.delegate("code-review", {"code": "a\nb\n"})
        second = await client.delegate("Code-Review", {"code": "x", "strict": True})
        assert first == {"lines": 2, "strict": False, "n": 1}
        assert second == {"lines": 1, "strict": True, "n": 2}
    reviewer.shutdown()
    with trio.fail_after(WAIT):
        await reviewer.torn_down.wait()
    assert reviewer.events == ["setup", "teardown"]


async def test_typed_errors(hub: Hub, nursery: trio.Nursery) -> None:
    agent = echo_agent()

    @agent.capability()
    async def explode() -> None:
        raise RuntimeError("kaboom")

    await start(nursery, agent, hub)
    async with connect(hub.url) as client:
        with pytest.raises(agentmesh.NoCapableAgent) as no_agent:
            await client.delegate("translate", {})
        assert no_agent.value.code == "no_capable_agent"
        with pytest.raises(agentmesh.UnknownAgent):
            await client.delegate("echo", {"text": "x"}, to="agt_missing")
        with pytest.raises(agentmesh.TaskFailed) as failed:
            await client.delegate("explode")
        assert failed.value.error == "RuntimeError: kaboom"
        with pytest.raises(agentmesh.UnknownTask):
            await client.status("task_missing")
        with pytest.raises(agentmesh.UnknownTask):
            await client.cancel("task_missing")
        summary = await client.status()
        assert isinstance(summary, agentmesh.protocol.HubSummary)
        assert summary.counters["failed"] == 1


async def test_bad_params_never_reach_the_handler(hub: Hub, nursery: trio.Nursery) -> None:
    agent = Agent("strict")
    calls: list[Any] = []

    @agent.capability()
    async def add(a: int, b: int, note: str | None = None) -> int:
        calls.append((a, b))
        return a + b

    await start(nursery, agent, hub)
    async with connect(hub.url) as client:
        for params, expected in [
            ({"a": 1}, "missing param 'b'"),
            ({"a": 1, "b": 2, "c": 3}, "unknown param(s) 'c'"),
            ({"a": "1", "b": 2}, "param 'a': expected an integer, got a string"),
            ({"a": True, "b": 2}, "param 'a': expected an integer, got a boolean"),
            ({"a": 1, "b": 2, "note": 5}, "param 'note': expected a string or null"),
        ]:
            with pytest.raises(agentmesh.TaskFailed) as failed:
                await client.delegate("add", params)
            assert expected in str(failed.value.error), params
        assert calls == []
        assert await client.delegate("add", {"a": 1, "b": 2, "note": None}) == 3
        assert calls == [(1, 2)]


async def test_unserialisable_return_fails_the_task(hub: Hub, nursery: trio.Nursery) -> None:
    agent = Agent("sloppy")

    @agent.capability()
    async def give_set() -> Any:
        return {1, 2}

    await start(nursery, agent, hub)
    async with connect(hub.url) as client:
        with pytest.raises(agentmesh.TaskFailed) as failed:
            with trio.fail_after(WAIT):
                await client.delegate("give-set")
        assert "not JSON serialisable" in str(failed.value)


# --- progress, cancellation, deadlines ------------------------------------------------


async def test_progress_updates_reach_the_requester(hub: Hub, nursery: trio.Nursery) -> None:
    agent = Agent("worker")
    go_on = trio.Event()

    @agent.capability()
    async def work(ctx: TaskContext) -> str:
        await ctx.progress(0.25, "started")
        await go_on.wait()
        await ctx.progress(0.75, "almost", {"step": 3})
        return "done"

    await start(nursery, agent, hub)
    async with connect(hub.url) as client:
        handle = await client.submit("work")
        seen = []
        async for update in handle.progress():
            seen.append((update.progress, update.message, update.data))
            go_on.set()
        assert seen == [(0.25, "started", None), (0.75, "almost", {"step": 3})]
        assert await handle.wait() == "done"
        assert handle.state == "completed"


async def test_remote_cancel_stops_the_handler(hub: Hub, nursery: trio.Nursery) -> None:
    agent = Agent("sleeper")
    started, saw_cancel = trio.Event(), trio.Event()

    @agent.capability()
    async def nap() -> None:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            saw_cancel.set()
            raise

    await start(nursery, agent, hub)
    async with connect(hub.url) as client:
        handle = await client.submit("nap")
        with trio.fail_after(WAIT):
            await started.wait()
            await handle.cancel("no longer needed")
            await saw_cancel.wait()
            with pytest.raises(agentmesh.TaskCancelled):
                await handle.wait()


async def test_cancelling_the_caller_cancels_the_task(hub: Hub, nursery: trio.Nursery) -> None:
    agent = Agent("sleeper")
    started, saw_cancel = trio.Event(), trio.Event()

    @agent.capability()
    async def nap() -> None:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            saw_cancel.set()
            raise

    await start(nursery, agent, hub)
    async with connect(hub.url) as client:
        async with trio.open_nursery() as callers:
            callers.start_soon(client.delegate, "nap")
            with trio.fail_after(WAIT):
                await started.wait()
            callers.cancel_scope.cancel()
        with trio.fail_after(WAIT):
            await saw_cancel.wait()
        summary = await client.status()
        assert isinstance(summary, agentmesh.protocol.HubSummary)
        assert summary.tasks["cancelled"] == 1


async def test_caller_deadline_becomes_the_ttl(hub: Hub, nursery: trio.Nursery) -> None:
    agent = Agent("sleeper")
    deadlines: list[float] = []
    saw_cancel = trio.Event()

    @agent.capability()
    async def nap(ctx: TaskContext) -> None:
        deadlines.append(ctx.deadline - trio.current_time())
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            saw_cancel.set()
            raise

    await start(nursery, agent, hub)
    async with connect(hub.url) as client:
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(0.5):
                await client.delegate("nap")
        with trio.fail_after(WAIT):
            await saw_cancel.wait()
        [left] = deadlines
        assert 0 < left <= 0.5  # the handler's own scope carried the requester's deadline
        record = next(iter(hub.router.tasks))
        assert record.ttl <= 0.5


@pytest.mark.parametrize("hub_config", [HubConfig(heartbeat_interval=0.1)])
async def test_sync_handler_does_not_block_heartbeats(hub: Hub, nursery: trio.Nursery) -> None:
    agent = Agent("blocking")

    @agent.capability()
    def crunch(seconds: float) -> str:
        time.sleep(seconds)  # blocks its worker thread, not the connection
        return "crunched"

    await start(nursery, agent, hub)
    async with connect(hub.url) as client:
        # Several silence limits (3 x 0.1 s) pass while the handler blocks.
        assert await client.delegate("crunch", {"seconds": 1.0}) == "crunched"
        assert agent.client is not None
        assert agent.client.sessions == 1  # never dropped for silence
        assert client.sessions == 1


# --- surviving the network --------------------------------------------------------------


async def test_task_in_flight_survives_a_dropped_connection(
    hub: Hub, nursery: trio.Nursery
) -> None:
    agent = Agent("steady")
    started, release = trio.Event(), trio.Event()

    @agent.capability()
    async def slow(n: int) -> int:
        started.set()
        await release.wait()
        return n * 2

    await start(nursery, agent, hub)
    assert agent.client is not None
    agent_id = agent.client.agent_id
    async with connect(hub.url, backoff=FAST) as client:
        handle = await client.submit("slow", {"n": 21})
        with trio.fail_after(WAIT):
            await started.wait()
        assert hub.drop(agent_id)  # type: ignore[arg-type]
        release.set()  # the handler finishes while the agent is cut off
        with trio.fail_after(WAIT):
            assert await handle.wait() == 42
    assert agent.client.agent_id == agent_id
    assert agent.client.sessions == 2


async def test_watch_gets_events_watches_again_after_a_drop_and_unwatches(
    hub: Hub, nursery: trio.Nursery
) -> None:
    agent = Agent("echoer")

    @agent.capability()
    async def echo(text: str) -> str:
        return text

    async with (
        connect(hub.url, name="operator", backoff=FAST) as operator,
        connect(hub.url, register=False) as onlooker,
        onlooker.watch(["agent_online"]) as comings,
    ):
        async with operator.watch(["task_state", "agent_registered"]) as events:
            await start(nursery, agent, hub)
            with trio.fail_after(WAIT):
                joined = await events.receive()
            assert (joined.kind, joined.agent and joined.agent.name) == (
                "agent_registered",
                "echoer",
            )
            assert await operator.delegate("echo", {"text": "hi"}) == "hi"
            with trio.fail_after(WAIT):
                states = [(await events.receive()).task for _ in range(3)]
            assert [t.state for t in states if t is not None] == [
                "pending",
                "in_progress",
                "completed",
            ]
            assert hub.drop(operator.agent_id)  # type: ignore[arg-type]
            with trio.fail_after(WAIT):
                back = await comings.receive()  # the operator resumed
                assert back.agent is not None
                assert back.agent.agent_id == operator.agent_id
                # Its watch went first on the new connection, so this task is watched.
                assert await operator.delegate("echo", {"text": "again"}) == "again"
                after = [(await events.receive()).task for _ in range(3)]
            assert operator.sessions == 2
            assert [t.state for t in after if t is not None] == [
                "pending",
                "in_progress",
                "completed",
            ]
        assert hub._router is not None
        assert hub._router.events.watchers == 1  # the onlooker: leaving the block unwatched
        with pytest.raises(RuntimeError, match="already watching"):
            async with operator.watch(), operator.watch():
                pass


async def test_a_full_watch_buffer_drops_and_says_how_many(hub: Hub) -> None:
    async with connect(hub.url, name="operator") as operator:
        async with operator.watch(["agent_registered"], buffer=2) as events:
            for i in range(6):  # a0 and a1 wait in the buffer; the others are dropped
                async with connect(hub.url, name=f"a{i}"):
                    pass
            with trio.fail_after(WAIT):
                got = [await events.receive() for _ in range(2)]
            async with connect(hub.url, name="a6"):
                pass
            with trio.fail_after(WAIT):
                got.append(await events.receive())
        assert [(e.agent and e.agent.name, e.missed) for e in got] == [
            ("a0", 0),
            ("a1", 0),
            ("a6", 4),  # a2 to a5 were dropped
        ]


async def test_a_task_that_ended_by_its_ttl_is_never_run_again(
    hub: Hub, nursery: trio.Nursery
) -> None:
    # Delivered again (the hub re-sends unfinished tasks on a resume, and its TTL timer
    # may not have fired yet), a task whose handler the TTL or the hub's cancel already
    # ended must not run a second time. The chaos test caught one running twice.
    agent = Agent("staller")
    runs: list[str] = []
    stopped = trio.Event()

    @agent.capability()
    async def stall(ctx: TaskContext) -> None:
        runs.append(ctx.task_id)
        try:
            await trio.sleep_forever()
        finally:
            stopped.set()

    await start(nursery, agent, hub)
    async with connect(hub.url, name="asker") as client:
        handle = await client.submit("stall", ttl=0.2)
        with trio.fail_after(WAIT):
            with pytest.raises(agentmesh.TaskTimeout):
                await handle.wait()
            await stopped.wait()
        await trio.testing.wait_all_tasks_blocked()  # the agent noted how it ended
        again = agentmesh.TaskAssignment(
            task_id=handle.task_id, capability="stall", params={}, ttl=5
        )
        agent._on_task(again, client.agent_id or "")
        await trio.testing.wait_all_tasks_blocked()
    assert runs == [handle.task_id]


async def test_closing_the_client_ends_the_handles_of_its_unfinished_tasks(
    hub: Hub, nursery: trio.Nursery
) -> None:
    agent = Agent("sleeper")
    started = trio.Event()

    @agent.capability()
    async def sleep() -> None:
        started.set()
        await trio.sleep_forever()

    await start(nursery, agent, hub)
    async with connect(hub.url, name="asker") as client:
        handle = await client.submit("sleep")
        with trio.fail_after(WAIT):
            await started.wait()
    # Left (and deregistered): the hub cancelled the task and sends no outcome, so the
    # handle used to wait forever.
    with trio.fail_after(WAIT), pytest.raises(agentmesh.TaskCancelled, match="closed its client"):
        await handle.wait()
    assert handle.done


async def test_closing_the_client_inside_a_watch_does_not_wait_for_an_unwatch(
    hub: Hub,
) -> None:
    # Leaving the block after `aclose` used to wait, shielded, `connect_timeout` for
    # the reply to an unwatch sent on a closing connection.
    async with connect(hub.url, name="operator", connect_timeout=60) as client:
        with trio.fail_after(WAIT):
            async with client.watch():
                await client.aclose()


async def test_on_a_hub_with_tokens_a_user_watches_the_agents_and_an_admin_everything(
    nursery: trio.Nursery,
) -> None:
    config = HubConfig(tokens=frozenset({"user"}), admin_tokens=frozenset({"root"}))
    hub = Hub(config)
    await nursery.start(hub.serve, "127.0.0.1", 0)
    async with connect(hub.url, name="user", token="user") as user:
        with pytest.raises(agentmesh.Forbidden, match="admin token"):
            async with user.watch(["task_state"]):
                pass
        async with (
            user.watch() as agents_only,
            connect(hub.url, register=False, token="root") as admin,
            admin.watch() as everything,
        ):
            async with connect(hub.url, name="tool", token="user", hidden=True):
                pass
            async with connect(hub.url, name="newcomer", token="user"):
                pass
            with trio.fail_after(WAIT):
                seen = [await everything.receive() for _ in range(4)]
                first = await agents_only.receive()
        assert [(e.kind, e.agent and (e.agent.name, e.agent.hidden)) for e in seen] == [
            ("agent_registered", ("tool", True)),
            ("agent_left", ("tool", True)),
            ("agent_registered", ("newcomer", False)),
            ("agent_left", ("newcomer", False)),
        ]
        assert first.agent is not None
        assert first.agent.name == "newcomer"  # the hidden tool was left out


class RunningHub:
    """A hub in its own cancel scope, so a test can stop it and start another."""

    def __init__(self) -> None:
        self.hub = Hub()
        self.scope = trio.CancelScope()
        self.stopped = trio.Event()

    async def run(self, port: int, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with self.scope:
            async with trio.open_nursery() as inner:
                await inner.start(self.hub.serve, "127.0.0.1", port)
                task_status.started(self.hub.port)
        self.stopped.set()

    async def stop(self) -> None:
        self.scope.cancel()
        await self.stopped.wait()


async def test_start_before_hub_then_hub_restart(nursery: trio.Nursery) -> None:
    first = RunningHub()
    port = await nursery.start(first.run, 0)
    await first.stop()
    url = f"ws://127.0.0.1:{port}"

    # The hub is down: the agents keep retrying instead of crashing.
    echo, stalled = echo_agent(), Agent("stalled")
    release = trio.Event()

    @stalled.capability()
    async def wait_forever() -> None:
        await release.wait()

    agents_up = trio.Event()

    async def start_agents() -> None:
        for agent in (echo, stalled):
            await nursery.start(partial(agent.serve, url, backoff=FAST))
        agents_up.set()

    nursery.start_soon(start_agents)
    await trio.testing.wait_all_tasks_blocked()
    assert echo.client is not None
    assert echo.client.attempts >= 1
    assert echo.client.sessions == 0

    second = RunningHub()
    await nursery.start(second.run, port)
    with trio.fail_after(WAIT):
        await agents_up.wait()

    async with connect(url, name="asker", backoff=FAST) as client:
        assert await client.delegate("echo", {"text": "up"}) == "up"
        waiting = await client.submit("wait-forever")

        # The hub restarts on the same port, forgetting everything.
        await second.stop()
        await nursery.start(RunningHub().run, port)
        with trio.fail_after(WAIT), pytest.raises(agentmesh.HubRestarted):
            await waiting.wait()
        with trio.fail_after(WAIT):
            # The agent reconnects on its own; a requester looks until it is back.
            while not await client.discover("echo"):  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert await client.delegate("echo", {"text": "back"}) == "back"
        assert client.sessions == 2
        assert echo.client.sessions == 2
        release.set()


async def test_a_client_given_several_hubs_stays_on_one_and_moves_when_it_goes(
    nursery: trio.Nursery,
) -> None:
    dead = RunningHub()
    dead_port = await nursery.start(dead.run, 0)
    await dead.stop()
    first, second = RunningHub(), RunningHub()
    ports = [dead_port, await nursery.start(first.run, 0), await nursery.start(second.run, 0)]
    urls = [f"ws://127.0.0.1:{port}" for port in ports]

    # A hub that cannot be reached is skipped at once, for the next one.
    echo = echo_agent()
    with trio.fail_after(WAIT):
        await nursery.start(partial(echo.serve, urls, backoff=FAST))
    assert echo.client is not None
    assert (echo.client.url, echo.client.attempts) == (urls[1], 2)

    async with connect(urls[1:], name="asker", backoff=FAST) as client:
        assert client.url == urls[1]
        assert await client.delegate("echo", {"text": "first"}) == "first"

        # Its hub goes away: both retry it, then move on to the next one.
        await first.stop()
        with trio.fail_after(WAIT):
            while not await client.discover("echo"):  # noqa: ASYNC110
                await trio.sleep(0.01)
            assert await client.delegate("echo", {"text": "second"}) == "second"
        assert (client.url, client.sessions) == (urls[2], 2)
        assert (echo.client.url, echo.client.sessions) == (urls[2], 2)

        # The first hub comes back: nobody moves, since their hub is fine.
        await nursery.start(RunningHub().run, ports[1])
        assert await client.delegate("echo", {"text": "again"}) == "again"
        assert (client.url, client.sessions) == (urls[2], 2)
        assert (echo.client.url, echo.client.sessions) == (urls[2], 2)


async def test_a_client_that_reaches_none_of_its_hubs_says_so(nursery: trio.Nursery) -> None:
    ports = []
    for _ in range(2):
        gone = RunningHub()
        ports.append(await nursery.start(gone.run, 0))
        await gone.stop()
    urls = [f"ws://127.0.0.1:{port}" for port in ports]
    client = agentmesh.Client(urls, backoff=Backoff(base=0.01, cap=0.02, max_attempts=5))
    with trio.fail_after(WAIT), pytest.raises(agentmesh.HubUnavailable, match="any of 2 hubs"):
        await client.serve()
    assert client.attempts == 5  # each URL's attempts count


def test_a_client_needs_a_hub_url() -> None:
    with pytest.raises(ValueError, match="at least one hub URL"):
        agentmesh.Client([])
    with pytest.raises(ValueError, match="ws://host:port"):
        agentmesh.Client(["ws://127.0.0.1:1", "http://127.0.0.1:2"])


async def test_graceful_shutdown_finishes_or_fails_in_flight_tasks(
    hub: Hub, nursery: trio.Nursery
) -> None:
    agent = Agent("closing", shutdown_grace=0.3)
    quick_started, slow_started, finish_quick = trio.Event(), trio.Event(), trio.Event()

    @agent.capability()
    async def quick() -> str:
        quick_started.set()
        await finish_quick.wait()
        return "finished in time"

    @agent.capability()
    async def slow() -> str:
        slow_started.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    served = trio.Event()

    async def serve_agent() -> None:
        await agent.serve(hub.url)
        served.set()

    nursery.start_soon(serve_agent)
    async with connect(hub.url) as client:
        with trio.fail_after(WAIT):
            while not await client.discover("quick"):
                await trio.testing.wait_all_tasks_blocked()
            quick_task = await client.submit("quick")
            slow_task = await client.submit("slow")
            await quick_started.wait()
            await slow_started.wait()
            agent.shutdown()
            finish_quick.set()
            assert await quick_task.wait() == "finished in time"
            with pytest.raises(agentmesh.TaskFailed) as failed:
                await slow_task.wait()
            assert "shut down" in str(failed.value)
            await served.wait()
            assert await client.discover("quick") == []


@pytest.mark.parametrize("hub_config", [HubConfig(max_frame_size=20_000)])
async def test_a_result_too_large_for_the_hub_fails_the_task(
    hub: Hub, nursery: trio.Nursery
) -> None:
    agent = Agent("verbose")

    @agent.capability()
    async def dump() -> str:
        return "x" * 30_000

    await start(nursery, agent, hub)
    async with connect(hub.url) as client:
        with trio.fail_after(WAIT), pytest.raises(agentmesh.TaskFailed) as failed:
            await client.delegate("dump")
        assert "exceeds the hub's limit" in str(failed.value)


async def test_aclose_while_the_hub_is_down_stops_the_client(nursery: trio.Nursery) -> None:
    running = RunningHub()
    port = await nursery.start(running.run, 0)
    client = agentmesh.Client(f"ws://127.0.0.1:{port}", backoff=FAST)
    done = trio.Event()

    async def serve(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        await client.serve(task_status=task_status)
        done.set()

    await nursery.start(serve)
    await running.stop()  # the client now retries, offline
    await client.aclose()
    with trio.fail_after(WAIT):
        await done.wait()
    assert not client.online


# ---------------------------------------------------------------------------------------
# Agent.run, the entry point of agent scripts

_SCRIPT = """
import sys
from agentmesh import Agent, Backoff
agent = Agent("scripted")

@agent.capability("boom")
async def boom() -> None:
    raise RuntimeError("kaboom")

agent.run(sys.argv[1], backoff=Backoff(base=0.05, cap=0.2))
"""


async def _agent_script(url: str) -> trio.Process:
    return await trio.lowlevel.open_process(
        [sys.executable, "-c", _SCRIPT, url], stderr=subprocess.PIPE
    )


async def _read_until(process: trio.Process, needle: bytes) -> bytes:
    """The script's stderr up to the first line holding `needle`."""
    assert process.stderr is not None
    seen = b""
    with trio.fail_after(WAIT * 2):
        while needle not in seen:
            chunk = await process.stderr.receive_some()
            assert chunk, f"stderr ended before {needle!r}: {seen.decode()}"
            seen += chunk
    return seen


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
async def test_the_first_signal_stops_an_agent_that_cannot_connect(signum: int) -> None:
    # Nothing listens on the discard port: the agent keeps trying, until one signal.
    process = await _agent_script("ws://127.0.0.1:9")
    try:
        await _read_until(process, b"failed")  # it has tried at least once
        process.send_signal(signum)
        with trio.fail_after(WAIT):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
        assert process.stderr is not None
        await process.stderr.aclose()


async def test_agent_run_logs_where_and_as_whom_and_a_failing_handlers_traceback(
    hub: Hub,
) -> None:
    process = await _agent_script(hub.url)
    try:
        seen = await _read_until(process, b"registered as agt_")
        assert f"at {hub.url}".encode() in seen
        async with connect(hub.url, name="asker") as client:
            with pytest.raises(agentmesh.TaskFailed, match="RuntimeError: kaboom"):
                await client.delegate("boom")
        seen = await _read_until(process, b"RuntimeError: kaboom")  # the traceback's end
        assert b"(boom) failed" in seen, seen.decode()
        assert b"Traceback (most recent call last)" in seen, seen.decode()
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
        assert process.stderr is not None
        await process.stderr.aclose()


# --- the agent's workers: concurrency, the queue, cancellation --------------------------


async def test_max_concurrency_bounds_handlers_and_the_rest_wait_their_turn(
    hub: Hub, nursery: trio.Nursery
) -> None:
    agent = Agent("busy", max_concurrency=2)
    release, two_running = trio.Event(), trio.Event()
    running = peak = ran = 0

    @agent.capability()
    async def work(n: int) -> int:
        nonlocal running, peak, ran
        running += 1
        peak = max(peak, running)
        if running == 2:
            two_running.set()
        try:
            await release.wait()
        finally:
            running -= 1
        ran += 1
        return n

    @agent.capability()
    async def quick(n: int) -> int:  # never suspends: runs in whichever worker is free
        return -n

    await start(nursery, agent, hub)
    async with connect(hub.url) as client:
        handles = [await client.submit("work", {"n": n}) for n in range(5)]
        with trio.fail_after(WAIT):
            await two_running.wait()
            await trio.testing.wait_all_tasks_blocked(0.05)  # all five delegated
        # The agent declared its limit: the others wait their turn at the hub.
        assert (running, peak, len(agent._queue), len(hub.router.queue)) == (2, 2, 0, 3)
        release.set()
        with trio.fail_after(WAIT):
            assert [await h.wait() for h in handles] == [0, 1, 2, 3, 4]
            assert await client.delegate("quick", {"n": 3}) == -3
    assert (peak, ran) == (2, 5)


async def test_a_queued_task_cancelled_or_out_of_time_never_runs(
    hub: Hub, nursery: trio.Nursery
) -> None:
    agent = Agent("single", max_concurrency=1)
    release, started = trio.Event(), trio.Event()
    ran: list[str] = []

    @agent.capability()
    async def hold(name: str) -> str:
        ran.append(name)
        started.set()
        await release.wait()
        return name

    await start(nursery, agent, hub)
    async with connect(hub.url) as client:
        first = await client.submit("hold", {"name": "first"})
        with trio.fail_after(WAIT):
            await started.wait()
        cancelled = await client.submit("hold", {"name": "cancelled"})
        late = await client.submit("hold", {"name": "late"}, ttl=0.2)
        await cancelled.cancel("changed my mind")
        with trio.fail_after(WAIT):
            with pytest.raises(agentmesh.TaskCancelled):
                await cancelled.wait()
            with pytest.raises(agentmesh.TaskTimeout):
                await late.wait()
        release.set()
        with trio.fail_after(WAIT):
            assert await first.wait() == "first"
            assert await client.delegate("hold", {"name": "after"}) == "after"
    assert ran == ["first", "after"]
    assert not agent._running


async def test_a_handler_that_swallows_its_cancel_does_not_cancel_the_next_one(
    hub: Hub, nursery: trio.Nursery
) -> None:
    agent = Agent("stubborn", max_concurrency=1)
    started = trio.Event()

    @agent.capability()
    async def stubborn() -> str:
        started.set()
        try:
            await trio.sleep_forever()
        except trio.Cancelled:
            pass  # bad manners: the worker's scope is cancelled, the next task gets a new one
        return "swallowed"

    @agent.capability()
    async def nap(seconds: float) -> str:
        await trio.sleep(seconds)
        return "slept"

    await start(nursery, agent, hub)
    async with connect(hub.url) as client:
        handle = await client.submit("stubborn")
        with trio.fail_after(WAIT):
            await started.wait()
            await handle.cancel()
            with pytest.raises(agentmesh.TaskCancelled):
                await handle.wait()
            assert await client.delegate("nap", {"seconds": 0.01}) == "slept"


async def test_handlers_run_in_their_own_context(hub: Hub, nursery: trio.Nursery) -> None:
    import contextvars

    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    agent = Agent("contexts", max_concurrency=1)

    @agent.capability()
    async def mark(value: str) -> str:
        before = var.get()
        var.set(value)  # never reset: it must not leak into the next task
        return before

    await start(nursery, agent, hub)
    async with connect(hub.url) as client:
        assert [await client.delegate("mark", {"value": v}) for v in "ab"] == ["unset", "unset"]


# --- the hot paths of the codec decode and encode as the converter does ---------------


HOT_FRAMES = [
    # (direction, frame): the usual forms, and unusual ones the converter must decide
    ("hub", {"type": "delegate", "id": "h1", "from": "hub", "timestamp": 1.5, "in_reply_to": "m1",
             "payload": {"task_id": "t", "agent_id": "a", "state": "in_progress"}}),
    ("hub", {"type": "delegate", "id": "h2", "from": "agt_r", "to": "agt_a", "timestamp": 1,
             "payload": {"task_id": "t", "capability": "c", "params": {"n": [1, {"x": None}]},
                         "ttl": 300, "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}}),
    ("hub", {"type": "result", "id": "h3", "from": "agt_a", "to": "agt_r", "timestamp": None,
             "payload": {"task_id": "t", "state": "completed", "success": True, "data": [1, "x"],
                         "error": None}}),
    ("hub", {"type": "result", "id": "h4", "payload": {"task_id": "t", "state": "failed",
             "success": False, "error": "boom", "tracestate": "a=b", "traceparent": "x"}}),
    ("hub", {"type": "delegate", "id": "h5", "in_reply_to": "m1",
             "payload": {"task_id": "t", "agent_id": "a", "state": "x", "extra": 1}}),
    ("hub", {"type": "delegate", "id": "h6", "payload": {"task_id": "t", "capability": "c",
             "params": {}, "ttl": True}}),
    ("hub", {"type": "delegate", "id": "h7", "payload": {"task_id": "t", "capability": "c",
             "params": [], "ttl": 1.0}}),
    ("hub", {"type": "result", "id": "h8", "timestamp": "2024-01-01T00:00:00Z",
             "payload": {"task_id": "t", "state": "completed", "success": 1}}),
    ("hub", {"type": "result", "id": "h9", "from": 3, "payload": {"task_id": "t",
             "state": "completed", "success": True}}),
    ("hub", {"type": "delegate", "id": "h10", "payload": {"task_id": "t", "capability": "c",
             "params": {}}}),
    ("client", {"type": "delegate", "id": "m1", "payload": {"capability": "c"}}),
    ("client", {"type": "delegate", "id": "m2", "timestamp": 1.0, "to": "agt_a",
                "payload": {"capability": "c", "params": {"a": 1}, "ttl": 2, "tracestate": "s"}}),
    ("client", {"type": "delegate", "id": "m3", "payload": {"capability": "c", "ttl": "abc"}}),
    ("client", {"type": "delegate", "id": "m4", "payload": {"capability": "c", "params": None}}),
    ("client", {"type": "delegate", "id": "m11", "payload": {"capability": "c", "priority": 7}}),
    ("client", {"type": "delegate", "id": "m12", "payload": {"capability": "c", "priority": 1.5}}),
    ("client", {"type": "delegate", "id": "m13", "payload": {"capability": "c", "priority": True}}),
    ("client", {"type": "result", "id": "m5", "payload": {"task_id": "t", "success": True,
                                                          "data": {"deep": [1]}}}),
    ("client", {"type": "result", "id": "m6", "payload": {"task_id": "t", "success": "yes"}}),
    ("client", {"type": "result", "id": "m7", "payload": {"task_id": "t", "success": False,
                                                          "error": 3}}),
    ("client", {"type": "heartbeat", "id": "m8", "payload": {}}),
    ("client", {"type": "heartbeat", "id": "m9", "payload": {"x": 1}}),
    ("client", {"type": "result", "id": "m10", "in_reply_to": "h1",
                "payload": {"task_id": "t", "success": True}}),
]  # fmt: skip


@pytest.mark.parametrize(("direction", "message"), HOT_FRAMES)
def test_the_hot_decoders_agree_with_the_converter(direction: str, message: dict[str, Any]) -> None:
    import orjson

    p = agentmesh.protocol
    frame = orjson.dumps(message).decode()
    decode = p.decode_from_client if direction == "client" else p.decode_from_hub

    def outcome(fn: Any) -> Any:
        try:
            return fn(frame)
        except p.ProtocolError as exc:
            return ("error", str(exc), exc.in_reply_to)

    fast = outcome(decode)
    tables = (p._HOT_REQUESTS, p._HOT_REPLIES, p._HOT_EVENTS)
    saved = [dict(t) for t in tables]
    try:
        for table in tables:
            table.clear()
        general = outcome(decode)
    finally:
        for table, entries in zip(tables, saved, strict=True):
            table.update(entries)
    assert fast == general
    if isinstance(fast, p.Envelope):
        assert type(fast.payload) is type(general.payload)
        assert fast.size == general.size


def test_the_hot_encoders_agree_with_the_converter() -> None:
    p = agentmesh.protocol
    trace = {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01", "tracestate": "a=b"}
    records = [
        p.Delegate(capability="c"),
        p.Delegate(capability="c", params={"a": [1]}, ttl=2.5, **trace),
        p.Delegate(capability="c", priority=-3),
        p.Result(task_id="t", success=True, data={"x": 1}),
        p.Result(task_id="t", success=False, error="boom"),
        p.Delegated(task_id="t", agent_id="a", state="pending"),
        p.TaskAssignment(task_id="t", capability="c", params={}, ttl=1.0),
        p.TaskAssignment(task_id="t", capability="c", params={"n": 1}, ttl=1.0, **trace),
        p.TaskOutcome(task_id="t", state="completed", success=True, data=[1]),
        p.TaskOutcome(task_id="t", state="failed", success=False, error="e", traceparent="x"),
    ]
    for record in records:
        expected = p.converter.unstructure(record)
        got = p._UNSTRUCTURE[type(record)](record)
        assert got == expected
        assert list(got) == list(expected)  # the same keys in the same order


async def test_a_client_whose_identity_another_connection_resumed_stops_and_says_so(
    hub: Hub, connect: Any
) -> None:
    """Closed with 4003 (another connection resumed its agent), the client does not
    resume again, which would close the other one in turn (docs/protocol.md), and its
    serve raises `Replaced`."""
    client = agentmesh.Client(hub.url, name="twin", backoff=Backoff(base=0.01, cap=0.02))
    ended: list[BaseException] = []
    stopped = trio.Event()

    async def serve(task_status: trio.TaskStatus[Any]) -> None:
        try:
            await client.serve(task_status=task_status)
        except agentmesh.Replaced as exc:
            ended.append(exc)
        stopped.set()

    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT):
            await nursery.start(serve)
        assert client._resume is not None
        resume = {"agent_id": client.agent_id, "token": client._resume.token}
        async with connect() as other:
            reply = await other.request("register", {"name": "twin", "resume": resume})
            assert reply["payload"]["resumed"] is True
            with trio.fail_after(WAIT):
                await stopped.wait()
            assert len(ended) == 1
            assert "another connection resumed" in str(ended[0])
            assert client.sessions == 1  # never connected again
            # The other connection still holds the agent: nothing replaced it back.
            beat = await other.request("heartbeat")
            assert beat["type"] == "heartbeat_ack", beat
