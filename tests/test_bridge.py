"""The MCP bridge as Claude Code runs it: a subprocess speaking MCP over stdio, driven by
`mcp`'s own client, against a real hub and a real agent on loopback."""

from __future__ import annotations

import itertools
import json
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, cast

import attrs
import pytest
import trio

import agentmesh
import agentmesh.bridge as bridge_module
from agentmesh import Agent, Backoff, Hub, HubConfig, TaskContext, open_hub
from agentmesh import protocol as p
from agentmesh._mcp_capabilities import CapabilityTools
from agentmesh._mcp_views import Delegation
from agentmesh.bridge import Bridge, BridgeError
from agentmesh.client import TaskHandle
from agentmesh.registry import Capability

from .conftest import WAIT
from .test_delivery import wait_until

pytest.importorskip("mcp")

from mcp import ClientSession, MCPError, StdioServerParameters, stdio_client
from mcp import types as mcp_types
from mcp.types import CallToolResult, TextContent

from agentmesh._mcp_server import ProgressNotes

HUB_WAIT = 0.5  # the bridge's --hub-wait: how long a tool waits for an unreachable hub


# --- a bridge subprocess, a worker agent ----------------------------------------------


class Notes:
    """The notifications the bridge sends its MCP client, as they come."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Any](1000)

    async def handle(self, message: Any) -> None:
        self._send.send_nowait(message)

    async def next(self, kind: type[Any], **params: Any) -> Any:
        """The next notification of `kind` whose params have the `params` items (the
        others are skipped)."""
        with trio.fail_after(WAIT):
            async for message in self._receive:
                if isinstance(message, kind) and all(
                    getattr(message.params, key) == value for key, value in params.items()
                ):
                    return message
        raise AssertionError("the notifications ended")


@asynccontextmanager
async def open_bridge(
    url: str, log: Path, *options: str, notes: Notes | None = None
) -> AsyncIterator[ClientSession]:
    """An initialised MCP session with `python -m agentmesh.bridge --hub url ...`; its
    stderr goes to `log`, which must hold no traceback when the bridge has exited. The
    notifications go to `notes`, if given."""
    server = StdioServerParameters(
        command=sys.executable,
        args=["-m", "agentmesh.bridge", "--hub", url, "--hub-wait", str(HUB_WAIT), *options],
    )
    with log.open("a") as errlog:
        async with (
            stdio_client(server, errlog=errlog) as (read, write),
            ClientSession(
                read, write, message_handler=notes.handle if notes is not None else None
            ) as session,
        ):
            with trio.fail_after(WAIT):
                await session.initialize()
            yield session
    assert "Traceback" not in await trio.Path(log).read_text()


# The `steps` capability sends a progress frame every STEP seconds, five in all. A call
# that waits STEPS_WAIT (much longer than a step, for a loaded machine, and shorter than
# the five) returns the result only if each frame extends its wait.
STEP = 0.4
STEPS_WAIT = 1.5


@attrs.define
class Worker:
    agent: Agent
    release: trio.Event  # lets every `slow` task finish
    started: trio.Event = attrs.field(factory=trio.Event)  # a `hang` task began
    stopped: trio.Event = attrs.field(factory=trio.Event)  # a `hang` task was cancelled


def worker_agent() -> Worker:
    agent = Agent("worker", description="echoes, and waits when asked to")
    release = trio.Event()
    worker = Worker(agent, release)

    @agent.capability("echo")
    async def echo(text: str) -> str:
        """Say the text back.

        Args:
            text: what to say
        """
        return text

    @agent.capability("slow")
    async def slow() -> str:
        """Finish when the test says so."""
        await release.wait()
        return "finally"

    @agent.capability("steps")
    async def steps(count: int, ctx: TaskContext) -> str:
        """Report progress `count` times, a step apart, then finish."""
        for step in range(1, count + 1):
            await trio.sleep(STEP)  # the agent's work
            await ctx.progress(step / count, f"step {step}")
        return "all done"

    @agent.capability("hang")
    async def hang() -> None:
        """Never finish; say when started and when cancelled."""
        worker.started.set()
        try:
            await trio.sleep_forever()
        finally:
            worker.stopped.set()

    return worker


@pytest.fixture
async def worker(hub: Hub, nursery: trio.Nursery) -> Worker:
    worker = worker_agent()
    with trio.fail_after(WAIT):
        await nursery.start(worker.agent.serve, hub.url)
    return worker


@pytest.fixture
async def bridge(hub: Hub, tmp_path: Path) -> AsyncIterator[ClientSession]:
    assert hub.url is not None
    async with open_bridge(hub.url, tmp_path / "bridge.log") as session:
        yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> CallToolResult:
    with trio.fail_after(WAIT):
        return await session.call_tool(tool, arguments)


async def ok(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """A tool's structured result; the call must succeed."""
    result = await call(session, tool, **arguments)
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    return dict(result.structured_content)


async def error(session: ClientSession, tool: str, **arguments: Any) -> str:
    """The sentence of a tool error; the call must fail."""
    result = await call(session, tool, **arguments)
    assert result.is_error, result.structured_content
    return text_of(result)


def text_of(result: CallToolResult) -> str:
    return " ".join(c.text for c in result.content if isinstance(c, TextContent))


# --- the tool list ----------------------------------------------------------------------


def _types(schema: dict[str, Any]) -> dict[str, Any]:
    """Each property's JSON type (a sorted list for a union; None for any value)."""
    types: dict[str, Any] = {}
    for name, prop in schema["properties"].items():
        if "anyOf" in prop:
            types[name] = sorted(option["type"] for option in prop["anyOf"])
        else:
            types[name] = prop.get("type")
    return types


async def test_exactly_seven_tools_with_typed_arguments(bridge: ClientSession) -> None:
    with trio.fail_after(WAIT):
        listed = await bridge.list_tools()
    tools = {tool.name: tool for tool in listed.tools}
    assert sorted(tools) == [
        "broadcast_message",
        "cancel_task",
        "delegate_task",
        "discover_agents",
        "get_task_result",
        "hub_status",
        "list_tasks",
    ]
    expected = {
        "hub_status": ({}, []),
        "discover_agents": ({"capability": "string"}, []),
        "delegate_task": (
            {
                "capability": "string",
                "params": ["null", "object"],
                "agent_id": ["null", "string"],
                "ttl": "number",
                "wait": "number",
            },
            ["capability"],
        ),
        "get_task_result": ({"task_id": "string", "wait": "number"}, ["task_id"]),
        "cancel_task": ({"task_id": "string", "reason": ["null", "string"]}, ["task_id"]),
        "broadcast_message": ({"message": "string", "data": None}, ["message"]),
        "list_tasks": ({"state": ["null", "string"], "limit": "integer"}, []),
    }
    for name, (types, required) in expected.items():
        tool = tools[name]
        assert _types(tool.input_schema) == types, name
        assert tool.input_schema.get("required", []) == required, name
        assert len(tool.description or "") > 80, name
        assert "\n" not in (tool.description or ""), name  # one paragraph, not indented
        assert tool.output_schema is not None, name
        for prop in tool.input_schema["properties"].values():
            assert prop.get("description"), name
    wait = tools["delegate_task"].input_schema["properties"]["wait"]
    assert (wait["minimum"], wait["maximum"]) == (0, 60)
    state = tools["list_tasks"].input_schema["properties"]["state"]["anyOf"][0]
    assert state["enum"] == [
        "pending",
        "in_progress",
        "completed",
        "failed",
        "timeout",
        "cancelled",
    ]
    task = tools["get_task_result"].output_schema
    assert task is not None
    assert set(task["required"]) == {"task_id", "state", "done", "agent_id", "capability"}


# --- each tool at work -------------------------------------------------------------------


async def test_hub_status_and_discover_agents(bridge: ClientSession, worker: Worker) -> None:
    status = await ok(bridge, "hub_status")
    assert status["agents"] == status["agents_online"] == 2  # the worker and the bridge
    assert status["bridge_agent_id"].startswith("agt_")
    assert status["bridge_tasks"] == {}

    found = await ok(bridge, "discover_agents", capability="ECHO")
    [agent] = found["agents"]
    assert agent["agent_id"] == worker.agent.client.agent_id  # type: ignore[union-attr]
    assert (agent["name"], agent["online"]) == ("worker", True)
    echo = next(c for c in agent["capabilities"] if c["name"] == "echo")
    assert echo["description"] == "Say the text back."
    assert echo["params_schema"]["required"] == ["text"]

    everyone = await ok(bridge, "discover_agents")
    assert [a["name"] for a in everyone["agents"]] == ["worker"]  # the bridge is hidden
    assert await ok(bridge, "discover_agents", capability="translate") == {"agents": []}


async def test_delegate_returns_the_result_within_the_wait(
    bridge: ClientSession, worker: Worker
) -> None:
    task = await ok(bridge, "delegate_task", capability="echo", params={"text": "hi"})
    assert task["task_id"].startswith("task_")
    assert (task["state"], task["done"], task["result"]) == ("completed", True, "hi")
    assert task["agent_id"] == worker.agent.client.agent_id  # type: ignore[union-attr]

    chosen = await ok(
        bridge,
        "delegate_task",
        capability="echo",
        agent_id=task["agent_id"],
        params='{"text": "as a JSON string"}',  # models do this; it is accepted
    )
    assert chosen["result"] == "as a JSON string"
    again = await ok(bridge, "get_task_result", task_id=task["task_id"], wait=0)
    assert again == task  # kept after being read


async def test_delegate_then_get_task_result(bridge: ClientSession, worker: Worker) -> None:
    task = await ok(bridge, "delegate_task", capability="slow", wait=0)
    assert (task["state"], task["done"]) == ("in_progress", False)
    assert "result" not in task

    still = await ok(bridge, "get_task_result", task_id=task["task_id"], wait=0.05)
    assert (still["state"], still["done"]) == ("in_progress", False)
    listed = await ok(bridge, "list_tasks", state="in_progress")
    assert [t["task_id"] for t in listed["tasks"]] == [task["task_id"]]

    worker.release.set()
    done = await ok(bridge, "get_task_result", task_id=task["task_id"], wait=WAIT)
    assert (done["state"], done["done"], done["result"]) == ("completed", True, "finally")


async def test_list_tasks_filters_by_state(bridge: ClientSession, worker: Worker) -> None:
    first = await ok(bridge, "delegate_task", capability="echo", params={"text": "1"})
    running = await ok(bridge, "delegate_task", capability="slow", wait=0)
    second = await ok(bridge, "delegate_task", capability="echo", params={"text": "2"})
    await error(bridge, "delegate_task", capability="echo", params={"txt": "3"})

    everything = await ok(bridge, "list_tasks")
    assert everything["total"] == 4
    assert [t["state"] for t in everything["tasks"]] == [
        "failed",
        "completed",
        "in_progress",
        "completed",
    ]  # newest first
    assert all("result" not in t for t in everything["tasks"])
    completed = await ok(bridge, "list_tasks", state="completed")
    assert [t["task_id"] for t in completed["tasks"]] == [second["task_id"], first["task_id"]]
    latest = await ok(bridge, "list_tasks", state="completed", limit=1)
    assert (len(latest["tasks"]), latest["total"]) == (1, 2)
    [failed] = (await ok(bridge, "list_tasks", state="failed"))["tasks"]
    assert "bad params" in failed["error"]
    assert (await ok(bridge, "list_tasks", state="timeout")) == {"tasks": [], "total": 0}
    status = await ok(bridge, "hub_status")
    assert status["bridge_tasks"] == {"completed": 2, "in_progress": 1, "failed": 1}
    assert running["task_id"] in {t["task_id"] for t in everything["tasks"]}


async def test_broadcast_reaches_the_agents(bridge: ClientSession, worker: Worker) -> None:
    client = worker.agent.client
    assert client is not None
    sent = await ok(bridge, "broadcast_message", message="stand by", data={"eta": 5})
    assert sent == {"recipients": 1}
    status = await ok(bridge, "hub_status")
    with trio.fail_after(WAIT):
        async for envelope in client.broadcasts():
            assert (envelope.payload.message, envelope.payload.data) == ("stand by", {"eta": 5})
            assert envelope.sender == status["bridge_agent_id"]
            break


async def test_the_task_record_is_bounded(hub: Hub, worker: Worker, nursery: trio.Nursery) -> None:
    """Finished tasks make room, oldest first; unfinished ones never do."""
    assert hub.url is not None
    bridge = Bridge(hub.url, max_tasks=2)
    await nursery.start(bridge.serve)

    async def delegate(capability: str, **params: Any) -> str:
        task = await bridge.delegate(capability, params, agent_id=None, ttl=60, wait=0)
        return task["task_id"]

    def remembered() -> list[str]:
        return [task["task_id"] for task in bridge.tasks(None, 10)["tasks"]]

    with trio.fail_after(WAIT):
        slow = await delegate("slow")
        echoed = await bridge.delegate("echo", {"text": "a"}, agent_id=None, ttl=60, wait=WAIT)
        newer = await delegate("slow")  # the finished echo task makes room
        assert remembered() == [newer, slow]
        with pytest.raises(BridgeError, match=f"The bridge has no task '{echoed['task_id']}'"):
            await bridge.result(echoed["task_id"], 0)
        with pytest.raises(BridgeError, match="already tracks 2 unfinished tasks"):
            await delegate("echo", text="b")

        worker.release.set()
        assert (await bridge.result(newer, WAIT))["result"] == "finally"
        await bridge.result(slow, WAIT)
        latest = await delegate("echo", text="c")  # both finished and read: the older goes
        assert remembered() == [latest, newer]
        await bridge.aclose()


# --- every failure is a tool error with a sentence ----------------------------------------


async def test_refused_delegations(bridge: ClientSession, worker: Worker) -> None:
    message = await error(
        bridge, "delegate_task", capability="echo", agent_id="agt_nobody", params={"text": "x"}
    )
    assert "No agent 'agt_nobody' is registered" in message
    assert "discover_agents" in message

    message = await error(bridge, "delegate_task", capability="translate")
    assert "No agent offers capability 'translate'" in message

    worker_id = worker.agent.client.agent_id  # type: ignore[union-attr]
    message = await error(bridge, "delegate_task", capability="translate", agent_id=worker_id)
    assert f"Agent {worker_id} does not offer capability 'translate'" in message

    message = await error(bridge, "delegate_task", capability="echo", params=[1, 2])
    assert message == (
        "Error executing tool delegate_task: Bad arguments: `params`: input should be a "
        "valid dictionary."
    )

    message = await error(bridge, "delegate_task", capability="echo", ttl=10**6)
    assert "The hub refused the request: $.payload.ttl: must be more than 0" in message

    message = await error(bridge, "get_task_result", task_id="task_nowhere")
    assert "The bridge has no task 'task_nowhere'" in message

    message = await error(bridge, "get_task_result", task_id="task_nowhere", wait=600)
    assert message.endswith(  # over the bound: refused before it runs, in one sentence
        "get_task_result: Bad arguments: `wait`: input should be less than or equal to 60."
    )
    message = await error(bridge, "delegate_task", wait=-1)
    assert message.endswith(
        "delegate_task: Bad arguments: `capability` is required; "
        "`wait`: input should be greater than or equal to 0."
    )
    assert (await ok(bridge, "list_tasks"))["total"] == 0


async def test_failed_and_timed_out_tasks(bridge: ClientSession, worker: Worker) -> None:
    message = await error(bridge, "delegate_task", capability="echo", params={"txt": "x"})
    assert message.startswith("Error executing tool delegate_task: Task task_")
    assert "(echo on agent agt_" in message
    assert "failed: bad params: missing param 'text'" in message

    message = await error(bridge, "delegate_task", capability="slow", ttl=0.2, wait=WAIT)
    assert "timed out" in message

    running = await ok(bridge, "delegate_task", capability="slow", ttl=0.2, wait=0)
    message = await error(bridge, "get_task_result", task_id=running["task_id"], wait=WAIT)
    assert f"Task {running['task_id']} (slow on agent" in message
    assert "timed out" in message
    timed_out = await ok(bridge, "list_tasks", state="timeout")
    assert timed_out["total"] == 2


# --- progress and cancellation -----------------------------------------------------------


async def test_progress_notifications_keep_the_call_going(
    bridge: ClientSession, worker: Worker
) -> None:
    """With a progress token, each progress frame arrives as a notification, in order, and
    the call outlives its `wait` while they come."""
    notes: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        notes.append((progress, total, message))

    with trio.fail_after(WAIT):
        result = await bridge.call_tool(
            "delegate_task",
            {"capability": "steps", "params": {"count": 5}, "wait": STEPS_WAIT},
            progress_callback=on_progress,
        )
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    assert result.structured_content["result"] == "all done"  # 5 steps outlast the wait
    assert notes == [(n / 5, 1.0, f"step {n}") for n in range(1, 6)]

    # Without a token, the wait is the wait.
    task = await ok(bridge, "delegate_task", capability="steps", params={"count": 5}, wait=0)
    assert task["done"] is False
    assert (await ok(bridge, "get_task_result", task_id=task["task_id"], wait=WAIT))["done"]


class FakeContext:
    """The part of an MCP tool call's context that progress notifications use."""

    def __init__(self) -> None:
        self.sent: list[tuple[float, float | None, str | None]] = []

    async def report_progress(
        self, progress: float, total: float | None = None, message: str | None = None
    ) -> None:
        self.sent.append((progress, total, message))


async def notes_for(
    *frames: tuple[float | None, str],
) -> list[tuple[float, float | None, str | None]]:
    """The notifications `ProgressNotes` sends for frames of (progress, message)."""
    ctx = FakeContext()
    notes = ProgressNotes(cast(Any, ctx))
    for progress, message in frames:
        await notes(p.Progress(task_id="task_x", progress=progress, message=message))
    return ctx.sent


async def test_progress_notes_from_fractions_and_from_messages() -> None:
    # Fractions, the first one 0: fractions out of 1, not a count.
    sent = await notes_for((0.0, "a"), (0.25, "b"), (0.5, "c"), (1.0, "d"))
    assert sent == [(0.0, 1.0, "a"), (0.25, 1.0, "b"), (0.5, 1.0, "c"), (1.0, 1.0, "d")]
    # A frame that would not raise the progress comes a hair above the last one.
    sent = await notes_for((0.5, "a"), (0.5, "b"), (None, "c"), (0.25, "d"), (0.75, "e"))
    assert [total for _, total, _ in sent] == [1.0] * 5
    assert [message for _, _, message in sent] == ["a", "b", "c", "d", "e"]
    assert (sent[0][0], sent[-1][0]) == (0.5, 0.75)
    assert all(a[0] < b[0] for a, b in itertools.pairwise(sent))
    # Messages alone are counted.
    sent = await notes_for((None, "a"), (None, "b"), (None, "c"))
    assert sent == [(1, None, "a"), (2, None, "b"), (3, None, "c")]


async def test_progress_that_comes_while_notifying_is_forwarded(
    hub: Hub, nursery: trio.Nursery
) -> None:
    """Frames the agent sends while the bridge awaits a notification are forwarded too."""
    assert hub.url is not None
    agent = Agent("cued")
    more, finish = trio.Event(), trio.Event()

    @agent.capability()
    async def cued(ctx: TaskContext) -> str:
        await ctx.progress(0.1, "one")
        await more.wait()
        await ctx.progress(0.2, "two")
        await ctx.progress(0.3, "three")
        await finish.wait()
        return "done"

    bridge = Bridge(hub.url)
    with trio.fail_after(WAIT):
        await nursery.start(agent.serve, hub.url)
        await nursery.start(bridge.serve)
    forwarded: list[str | None] = []

    async def slow_client(frame: p.Progress) -> None:
        forwarded.append(frame.message)
        if frame.message == "one":  # the others arrive while this one is being sent
            more.set()
            [record] = bridge._tasks.values()
            while record.frames < 3:
                await record.changed.wait()
            finish.set()

    with trio.fail_after(WAIT):
        task = await bridge.delegate(
            "cued", {}, agent_id=None, ttl=60, wait=WAIT, progress=slow_client
        )
        assert task["result"] == "done"
        assert forwarded == ["one", "two", "three"]
        await bridge.aclose()


def test_the_progress_kept_holds_no_data() -> None:
    record = Delegation(cast(TaskHandle, None), "steps", deadline=0.0)
    record.add(p.Progress(task_id="task_x", progress=0.5, message="half", data="x" * 10**6))
    [kept] = record.recent
    assert (kept.progress, kept.message, kept.data) == (0.5, "half", None)


async def test_a_cancelled_call_cancels_the_task(bridge: ClientSession, worker: Worker) -> None:
    async with trio.open_nursery() as nursery:
        scope = trio.CancelScope()

        async def delegate() -> None:
            with scope:
                await bridge.call_tool("delegate_task", {"capability": "hang", "wait": 60})

        nursery.start_soon(delegate)
        with trio.fail_after(WAIT):
            await worker.started.wait()
        scope.cancel()  # the MCP client sends notifications/cancelled
    with trio.fail_after(WAIT):
        await worker.stopped.wait()  # the agent's handler was cancelled

    # A client whose own timeout runs out sends the same.
    worker.started, worker.stopped = trio.Event(), trio.Event()
    with trio.fail_after(WAIT), pytest.raises(MCPError, match="timed out"):
        await bridge.call_tool(
            "delegate_task", {"capability": "hang", "wait": 60}, read_timeout_seconds=0.5
        )
    with trio.fail_after(WAIT):
        await worker.stopped.wait()
    cancelled = await ok(bridge, "list_tasks", state="cancelled")
    assert cancelled["total"] == 2


async def test_cancel_task(bridge: ClientSession, worker: Worker) -> None:
    task = await ok(bridge, "delegate_task", capability="hang", wait=0)
    with trio.fail_after(WAIT):
        await worker.started.wait()
    cancelled = await ok(bridge, "cancel_task", task_id=task["task_id"], reason="enough")
    assert (cancelled["state"], cancelled["done"]) == ("cancelled", True)
    with trio.fail_after(WAIT):
        await worker.stopped.wait()
    message = await error(bridge, "get_task_result", task_id=task["task_id"])
    assert f"Task {task['task_id']} (hang on agent" in message
    assert "was cancelled: enough." in message

    message = await error(bridge, "cancel_task", task_id=task["task_id"])
    assert message.endswith(
        f"Task {task['task_id']} had already ended (cancelled), so there was nothing to "
        "cancel; get_task_result has its outcome."
    )
    done = await ok(bridge, "delegate_task", capability="echo", params={"text": "x"})
    message = await error(bridge, "cancel_task", task_id=done["task_id"])
    assert "had already ended (completed)" in message
    message = await error(bridge, "cancel_task", task_id="task_nowhere")
    assert "The bridge has no task 'task_nowhere'" in message


# --- resources and their notifications ----------------------------------------------------


async def subscribe(session: ClientSession, uri: str) -> None:
    """resources/subscribe (sent as such: the SDK's helper warns that 2026 clients listen)."""
    request = mcp_types.SubscribeRequest(params=mcp_types.SubscribeRequestParams(uri=uri))
    with trio.fail_after(WAIT):
        await session.send_request(request, mcp_types.EmptyResult)


async def read_json(session: ClientSession, uri: str) -> Any:
    with trio.fail_after(WAIT):
        result = await session.read_resource(uri)
    [content] = result.contents
    assert isinstance(content, mcp_types.TextResourceContents)
    assert content.mime_type == "application/json"
    return json.loads(content.text)


async def test_live_resources(hub: Hub, tmp_path: Path, nursery: trio.Nursery) -> None:
    assert hub.url is not None
    notes = Notes()
    async with open_bridge(hub.url, tmp_path / "bridge.log", notes=notes) as bridge:
        await until_connected(bridge)
        with trio.fail_after(WAIT):
            templates = await bridge.list_resource_templates()
        assert sorted(t.uri_template for t in templates.resource_templates) == [
            "agentmesh://agents/{agent_id}",
            "agentmesh://tasks/{task_id}",
        ]
        await subscribe(bridge, "agentmesh://agents")

        # An agent joins: the list of agents is updated, and the list of resources.
        worker = worker_agent()
        with trio.fail_after(WAIT):
            await nursery.start(worker.agent.serve, hub.url)
        await notes.next(mcp_types.ResourceUpdatedNotification, uri="agentmesh://agents")
        await notes.next(mcp_types.ResourceListChangedNotification)
        worker_id = worker.agent.client.agent_id  # type: ignore[union-attr]
        [agent] = (await read_json(bridge, "agentmesh://agents"))["agents"]
        assert (agent["agent_id"], agent["name"], agent["online"]) == (worker_id, "worker", True)
        one = await read_json(bridge, f"agentmesh://agents/{worker_id}")
        echo = next(c for c in one["capabilities"] if c["name"] == "echo")
        assert echo["params_schema"]["required"] == ["text"]
        with trio.fail_after(WAIT):
            listed = await bridge.list_resources()
        assert {str(r.uri) for r in listed.resources} == {
            "agentmesh://agents",
            f"agentmesh://agents/{worker_id}",
        }

        # A task finishes: its resource is updated, and holds the result.
        task = await ok(bridge, "delegate_task", capability="slow", wait=0)
        uri = f"agentmesh://tasks/{task['task_id']}"
        await subscribe(bridge, uri)
        assert (await read_json(bridge, uri))["state"] == "in_progress"
        worker.release.set()
        await notes.next(mcp_types.ResourceUpdatedNotification, uri=uri)
        finished = await read_json(bridge, uri)
        assert (finished["state"], finished["result"]) == ("completed", "finally")

        with trio.fail_after(WAIT), pytest.raises(MCPError, match="no task"):
            await bridge.read_resource("agentmesh://tasks/task_nowhere")


async def test_a_tool_per_capability(hub: Hub, tmp_path: Path, nursery: trio.Nursery) -> None:
    assert hub.url is not None
    notes = Notes()
    async with open_bridge(
        hub.url, tmp_path / "bridge.log", "--capability-tools", notes=notes
    ) as bridge:
        await until_connected(bridge)
        agent = Agent("shouter")

        @agent.capability("text.shout", description="Say it louder.")
        async def shout(text: str) -> str:
            return text.upper()

        @agent.capability("hub_status")  # taken by a tool of the bridge's own
        async def status() -> str:
            return "mine"

        with trio.fail_after(WAIT):
            await nursery.start(agent.serve, hub.url)
        await notes.next(mcp_types.ToolListChangedNotification)
        with trio.fail_after(WAIT):
            tools = {tool.name: tool for tool in (await bridge.list_tools()).tools}
        assert {"text_shout", "hub_status", "hub_status_2"} <= tools.keys()
        tool = tools["text_shout"]
        assert tool.input_schema["required"] == ["text"]
        assert (tool.description or "").startswith("Say it louder. Delegates the agentmesh")
        assert "shouter (agt_" in (tool.description or "")

        shouted = await ok(bridge, "text_shout", text="hi")
        assert (shouted["state"], shouted["result"]) == ("completed", "HI")
        assert (await ok(bridge, "hub_status_2"))["result"] == "mine"
        message = await error(bridge, "text_shout", txt="hi")
        assert "failed: bad params: missing param 'text'" in message


def agent_offering(agent_id: str, *capabilities: str) -> p.AgentInfo:
    return p.AgentInfo(
        agent_id=agent_id,
        name=agent_id,
        description="",
        capabilities=tuple(Capability(name=name) for name in capabilities),
    )


def test_capability_tool_names_are_sticky() -> None:
    """A tool name, once given, means its capability for the bridge's lifetime."""
    tools = CapabilityTools(reserved={"hub_status"})

    def names() -> dict[str, str]:
        return {name: tool.capability for name, tool in tools.tools.items()}

    agents = {"agt_a": agent_offering("agt_a", "x.y", "hub_status")}
    assert tools.update(agents, {"agt_a"})
    assert names() == {"x_y": "x.y", "hub_status_2": "hub_status"}

    agents["agt_b"] = agent_offering("agt_b", "x_y")  # would take x_y if named afresh
    assert tools.update(agents, {"agt_b"})
    assert names() == {"x_y": "x.y", "hub_status_2": "hub_status", "x_y_2": "x_y"}

    del agents["agt_a"]  # x.y is offered no more: its tool goes, its name stays its own
    assert tools.update(agents, {"agt_a"})
    assert names() == {"x_y_2": "x_y"}
    assert tools.capability_named("x_y") == "x.y"  # a stale call asks for x.y, refused
    assert not tools.update(agents, {"agt_b"})  # nothing changed

    agents["agt_c"] = agent_offering("agt_c", "x.y", "x_y")
    assert tools.update(agents, {"agt_c"})
    assert names() == {"x_y": "x.y", "x_y_2": "x_y"}
    assert "agt_b (agt_b), agt_c (agt_c)" in tools.tools["x_y_2"].description

    # Named together, those that need no change go first: the same network, the same names.
    fresh = CapabilityTools(reserved=())
    both = {"agt_a": agent_offering("agt_a", "x.y"), "agt_b": agent_offering("agt_b", "x_y")}
    fresh.update(both, both.keys())
    assert {name: tool.capability for name, tool in fresh.tools.items()} == {
        "x_y": "x_y",
        "x_y_2": "x.y",
    }


# --- the hub going away -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def until_connected(bridge: ClientSession) -> dict[str, Any]:
    """hub_status once it succeeds: each try waits up to HUB_WAIT for the connection.
    A try that fails says the hub is unreachable, or (connected, on a loaded machine,
    to a hub still starting) that it did not answer in time."""
    with trio.fail_after(WAIT):
        while True:
            result = await bridge.call_tool("hub_status", {})
            if not result.is_error:
                assert result.structured_content is not None
                return dict(result.structured_content)
            text = text_of(result)
            assert "is unreachable" in text or "did not answer within" in text, text


async def test_bridge_survives_hub_outages(tmp_path: Path, nursery: trio.Nursery) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}"
    async with open_bridge(url, tmp_path / "bridge.log") as bridge:
        # Down at start: the bridge serves anyway; tools fail fast with a sentence.
        calls: list[tuple[str, dict[str, Any]]] = [
            ("hub_status", {}),
            ("discover_agents", {"capability": "echo"}),
            ("delegate_task", {"capability": "echo", "params": {"text": "x"}}),
            ("broadcast_message", {"message": "anyone?"}),
        ]
        for tool, arguments in calls:
            with trio.fail_after(HUB_WAIT + 1):
                message = await error(bridge, tool, **arguments)
                assert message.endswith(
                    f"The agentmesh hub at {url} is unreachable; the bridge keeps "
                    "reconnecting in the background. Check that the hub is running, "
                    "then try again."
                )
        assert (await ok(bridge, "list_tasks"))["total"] == 0  # needs no hub

        async with open_hub(port=port):
            await until_connected(bridge)
            worker = worker_agent()
            with trio.fail_after(WAIT):
                await nursery.start(partial(worker.agent.serve, url, backoff=Backoff(cap=0.1)))
            running = await ok(bridge, "delegate_task", capability="slow", wait=0)

        # The hub went away with the task. (A request racing the close hears that the
        # connection dropped, or, on a loaded machine where the bridge has not read the
        # close yet, that the hub did not answer; once the bridge has noticed, that the
        # hub is unreachable.)
        message = await error(bridge, "hub_status")
        assert any(
            words in message
            for words in ("is unreachable", "connection dropped", "did not answer within")
        ), message
        pending = await ok(bridge, "get_task_result", task_id=running["task_id"], wait=0)
        assert pending["done"] is False  # the outcome may yet come back

        async with open_hub(port=port):
            status = await until_connected(bridge)
            assert status["uptime_seconds"] < WAIT  # a new hub
            message = await error(bridge, "get_task_result", task_id=running["task_id"])
            assert "the hub restarted and lost the task" in message
            [lost] = (await ok(bridge, "list_tasks", state="failed"))["tasks"]
            assert lost["task_id"] == running["task_id"]


async def test_hub_status_tells_a_dead_hub_at_once(tmp_path: Path) -> None:
    url = f"ws://127.0.0.1:{free_port()}"
    async with open_bridge(url, tmp_path / "bridge.log", "--hub-wait", "60") as bridge:
        message = await error(bridge, "hub_status")  # within WAIT: not the 60 s hub-wait
        assert f"The agentmesh hub at {url} is unreachable" in message


@pytest.mark.parametrize("hub_config", [HubConfig(tokens={"s3cret"})])
async def test_the_token_reaches_the_hub(hub: Hub, nursery: trio.Nursery, tmp_path: Path) -> None:
    assert hub.url is not None
    with trio.fail_after(WAIT):
        await nursery.start(partial(worker_agent().agent.serve, hub.url, token="s3cret"))
    async with open_bridge(hub.url, tmp_path / "bridge.log") as bridge:
        message = await error(bridge, "hub_status")
        assert message.endswith(
            f"The hub at {hub.url} requires a token: start the bridge with --token "
            "(or AGENTMESH_TOKEN)."
        )
    notes = Notes()
    async with open_bridge(
        hub.url, tmp_path / "bridge.log", "--token", "s3cret", notes=notes
    ) as bridge:
        task = await ok(bridge, "delegate_task", capability="echo", params={"text": "in"})
        assert task["result"] == "in"
        # Not an admin token, yet the agents are followed live, through a watch (hidden
        # ones left out), not by discovering again and again.
        router = hub._router
        assert router is not None
        await wait_until(lambda: router.events.watchers == 1)
        await subscribe(bridge, "agentmesh://agents")
        newcomer = Agent("newcomer")

        @newcomer.capability()
        async def hello() -> str:
            return "hello"

        async with agentmesh.connect(hub.url, name="a-tool", token="s3cret", hidden=True):
            with trio.fail_after(WAIT):
                await nursery.start(partial(newcomer.serve, hub.url, token="s3cret"))
            await notes.next(mcp_types.ResourceUpdatedNotification, uri="agentmesh://agents")
        names = {a["name"] for a in (await read_json(bridge, "agentmesh://agents"))["agents"]}
        assert names == {"worker", "newcomer"}


def refuse_watch(hub: Hub, code: p.ErrorCode, times: int | None = None) -> list[float]:
    """Make the hub refuse `watch` with `code`, the first `times` times (or always), as a
    hub older than watch does with unknown_type. The times the hub got a watch, listed."""
    router = hub._router
    assert router is not None
    accept = router._handlers[p.MessageType.WATCH]
    watches: list[float] = []

    def watch(peer: Any, me: str | None, envelope: p.Envelope) -> None:
        watches.append(trio.current_time())
        if times is None or len(watches) <= times:
            raise p.ProtocolError(code, "no watch here")
        accept(peer, me, envelope)

    router._handlers[p.MessageType.WATCH] = watch
    return watches


async def test_a_hub_that_cannot_watch_is_followed_by_discovery(
    hub: Hub, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert hub.url is not None
    monkeypatch.setattr(bridge_module, "REDISCOVER", 0.05)
    watches = refuse_watch(hub, p.ErrorCode.UNKNOWN_TYPE)
    bridge = Bridge(hub.url)
    with trio.fail_after(WAIT):
        await nursery.start(bridge.serve)

        def names() -> set[str]:
            return {agent.name for agent in bridge.agents.values()}

        async with agentmesh.connect(hub.url, name="comer"):
            await wait_until(lambda: names() == {"comer"})
        await wait_until(lambda: names() == set())
        assert len(watches) == 1  # tried once, not again and again
        await bridge.aclose()


async def test_a_watch_refused_for_now_is_tried_again_later(
    hub: Hub, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert hub.url is not None
    monkeypatch.setattr(bridge_module, "REDISCOVER", 0.2)
    watches = refuse_watch(hub, p.ErrorCode.RATE_LIMITED, times=1)
    router = hub._router
    assert router is not None
    bridge = Bridge(hub.url)
    with trio.fail_after(WAIT):
        await nursery.start(bridge.serve)
        await wait_until(lambda: router.events.watchers == 1)
        assert len(watches) == 2
        assert watches[1] - watches[0] >= 0.2
        await bridge.aclose()
