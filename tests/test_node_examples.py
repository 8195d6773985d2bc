"""The Node.js examples in examples/node/ talk to a real hub.

They use the JavaScript client in clients/js over Node's built-in WebSocket (no npm
install), so they show that a client in another language can be an agent (agent.mjs) or a
requester (requester.mjs) next to Python clients.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

import agentmesh
from agentmesh import Hub, HubConfig

from .conftest import WAIT

NODE_EXAMPLES = Path(__file__).parent.parent / "examples" / "node"


@functools.cache
def _node_command() -> tuple[tuple[str, ...] | None, str]:
    """The command that runs node with a global WebSocket, or None and why not."""
    node = shutil.which("node")
    if node is None:
        return None, "node is not on PATH"
    found = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30)
    version = found.stdout.strip()
    try:
        major = int(version.lstrip("v").split(".")[0])
    except ValueError:
        return None, f"cannot read the node version from {version!r}"
    # Node 20 and 21 have WebSocket behind a flag; Node >= 22 has it by default.
    command = (node, "--experimental-websocket") if major < 22 else (node,)
    probe = subprocess.run(
        [*command, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
        capture_output=True,
        timeout=30,
    )
    if probe.returncode != 0:
        return None, f"node {version} has no global WebSocket (Node >= 20 is needed)"
    return command, version


@pytest.fixture(scope="session")
def node() -> tuple[str, ...]:
    command, why = _node_command()
    if command is None:
        pytest.skip(why)
    return command


class NodeAgent:
    """agent.mjs running as a subprocess; its stdout lines are read as they come."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.agent_id = ""
        self.lines: list[str] = []  # everything it printed so far
        self._new_lines, self._unread = trio.open_memory_channel[str](math.inf)

    async def read_stdout(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        async with self.process.stdout, self._new_lines:
            async for chunk in self.process.stdout:
                *complete, buffer = (buffer + chunk).split(b"\n")
                for raw in complete:
                    line = raw.decode()
                    self.lines.append(line)
                    self._new_lines.send_nowait(line)

    async def wait_for(self, text: str) -> str:
        """The next line containing `text`; earlier lines are skipped (but kept in .lines)."""
        with trio.fail_after(WAIT):
            async for line in self._unread:
                if text in line:
                    return line
        raise AssertionError(f"agent.mjs exited before printing {text!r}: {self.lines}")


@pytest.fixture
async def node_agent(node: tuple[str, ...], hub: Hub) -> AsyncIterator[NodeAgent]:
    """agent.mjs, registered with the hub. Killed at teardown if it is still running."""
    assert hub.url is not None
    process = await trio.lowlevel.open_process(
        [*node, str(NODE_EXAMPLES / "agent.mjs"), hub.url], stdout=subprocess.PIPE
    )
    agent = NodeAgent(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(agent.read_stdout)
            try:
                line = await agent.wait_for("registered as ")
                agent.agent_id = line.split()[2]
                yield agent
            finally:
                with trio.CancelScope(shield=True):
                    if process.returncode is None:
                        process.kill()
                    await process.wait()  # stdout then reaches EOF and the reader ends
    finally:
        with trio.CancelScope(shield=True):
            assert process.stdout is not None
            await process.stdout.aclose()
            agent._unread.close()


async def run_requester(node: tuple[str, ...], url: str, *args: str) -> Any:
    with trio.fail_after(WAIT * 4):
        return await trio.run_process(
            [*node, str(NODE_EXAMPLES / "requester.mjs"), url, *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def test_node_requester_uses_the_node_agent(
    node: tuple[str, ...], hub: Hub, node_agent: NodeAgent
) -> None:
    assert hub.url is not None
    done = await run_requester(node, hub.url, "héllo, wörld 🌍")
    assert done.returncode == 0, done.stderr.decode()
    events = {e["event"]: e for e in map(json.loads, done.stdout.decode().splitlines())}
    assert [a["agent_id"] for a in events["discovered"]["agents"]] == [node_agent.agent_id]
    assert events["result"]["data"] == "🌍 dlröw ,olléh"
    assert events["result"]["agent_id"] == node_agent.agent_id
    assert events["failed"]["state"] == "failed"
    assert (
        events["failed"]["error"] == "bad params: param 'text': expected a string, got an integer"
    )
    assert events["error"]["code"] == "no_capable_agent"
    # The requester deregistered: only the agent is left.
    assert hub.router.summary().agents == 1


async def test_node_requester_fails_without_an_agent(node: tuple[str, ...], hub: Hub) -> None:
    assert hub.url is not None
    done = await run_requester(node, hub.url)
    assert done.returncode == 1
    assert "no agent offers 'reverse'" in done.stderr.decode()


async def test_python_requester_uses_the_node_agent(hub: Hub, node_agent: NodeAgent) -> None:
    assert hub.url is not None
    async with agentmesh.connect(hub.url, name="py-requester") as client:
        with trio.fail_after(WAIT):
            assert await client.delegate("reverse", {"text": "abc"}) == "cba"
            with pytest.raises(agentmesh.TaskFailed, match="param 'text': expected a string"):
                await client.delegate("reverse", {"text": 5})
            with pytest.raises(agentmesh.TaskFailed, match=r"unknown param\(s\): colour"):
                await client.delegate("reverse", {"text": "abc", "colour": "red"})
            # The hub picks by whole capability name, case-insensitively.
            assert await client.delegate(" REVERSE ", {"text": "xy"}) == "yx"


async def test_discover_shows_the_node_agent_and_its_schema(
    hub: Hub, node_agent: NodeAgent
) -> None:
    assert hub.url is not None
    async with agentmesh.connect(hub.url, name="py-requester") as client:
        with trio.fail_after(WAIT):
            [info] = await client.discover("reverse")
    assert info.agent_id == node_agent.agent_id
    assert info.name == "node-reverser"
    assert info.online
    assert info.metadata["lang"] == "javascript"
    [capability] = info.capabilities
    assert capability.name == "reverse"
    assert capability.params_schema is not None
    assert capability.params_schema["required"] == ["text"]
    assert capability.params_schema["properties"]["text"] == {"type": "string"}


async def test_cancel_stops_the_node_agent_working(hub: Hub, node_agent: NodeAgent) -> None:
    assert hub.url is not None
    async with agentmesh.connect(hub.url, name="py-requester") as client:
        with trio.fail_after(WAIT):
            task = await client.submit("reverse", {"text": "slow", "delay_ms": 60000})
            await node_agent.wait_for(f"task {task.task_id} started")
            await task.cancel("changed my mind")
            await node_agent.wait_for(f"task {task.task_id} cancelled: changed my mind")
            with pytest.raises(agentmesh.TaskCancelled):
                await task.wait()
            # Still serving after the cancel.
            assert await client.delegate("reverse", {"text": "ok"}) == "ko"


async def test_node_agent_resumes_and_drops_the_duplicate_task(
    hub: Hub, node_agent: NodeAgent
) -> None:
    assert hub.url is not None
    async with agentmesh.connect(hub.url, name="py-requester") as client:
        with trio.fail_after(WAIT):
            task = await client.submit("reverse", {"text": "resumed", "delay_ms": 1000})
            await node_agent.wait_for(f"task {task.task_id} started")
            assert hub.drop(node_agent.agent_id)  # close code 4004: the agent may resume
            await node_agent.wait_for("connection closed (4004")
            await node_agent.wait_for(f"registered as {node_agent.agent_id} (resumed)")
            # The hub re-sends the task in the catch-up; the agent keeps its one copy.
            await node_agent.wait_for(f"duplicate task {task.task_id}")
            assert await task.wait() == "demuser"
    assert sum(f"task {task.task_id} started" in line for line in node_agent.lines) == 1


@pytest.mark.parametrize("hub_config", [HubConfig(heartbeat_interval=0.1)])
async def test_node_agent_heartbeats_keep_it_connected(hub: Hub, node_agent: NodeAgent) -> None:
    # Silence limit 0.3 s. The agent is the only client, so every frame the hub reads is
    # its heartbeat: 20 of them span ~2 s, several silence limits.
    start = hub.router.summary().counters["frames_in"]
    with trio.fail_after(WAIT):
        while hub.router.summary().counters["frames_in"] < start + 20:  # noqa: ASYNC110
            await trio.sleep(0.05)
    assert hub.router.connection_of(node_agent.agent_id) is not None
    assert sum("registered as" in line for line in node_agent.lines) == 1


async def test_sigterm_deregisters_the_node_agent(hub: Hub, node_agent: NodeAgent) -> None:
    assert hub.url is not None
    node_agent.process.send_signal(signal.SIGTERM)
    with trio.fail_after(WAIT):
        assert await node_agent.process.wait() == 0
    assert "SIGTERM: deregistering" in node_agent.lines
    async with agentmesh.connect(hub.url, name="checker") as client:
        with trio.fail_after(WAIT):
            # Deregistered, not merely disconnected (that would list it with online=False).
            assert await client.discover("reverse") == []
            assert [a.name for a in await client.discover()] == ["checker"]
