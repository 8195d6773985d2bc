"""The command line, run as a user runs it: a subprocess against a real hub."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import ConnectionClosed

from agentmesh import Agent, Hub, connect

from .conftest import WAIT, open_raw


async def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(WAIT * 2):
        return await trio.run_process(
            [sys.executable, "-m", "agentmesh", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, **(env or {})},
        )


@pytest.fixture
async def echo(hub: Hub, nursery: trio.Nursery) -> Agent:
    agent = Agent("echoer")

    @agent.capability()
    async def echo(text: str) -> str:
        return text

    @agent.capability()
    async def fail() -> None:
        raise ValueError("nope")

    started: Agent = await nursery.start(agent.serve, hub.url)
    return started


async def test_status_agents_and_tasks(hub: Hub, echo: Agent) -> None:
    url = hub.url or ""
    status = await cli("status", "--hub", url)
    assert status.returncode == 0, status.stderr
    text = status.stdout.decode()
    assert re.search(r"^agents\s+1 \(1 online\)$", text, re.M), text

    agents = await cli("agents", "--hub", url)
    lines = agents.stdout.decode().splitlines()
    assert lines[0].split() == ["AGENT", "ID", "NAME", "ONLINE", "CAPABILITIES"]
    assert lines[1].split()[1:] == ["echoer", "yes", "echo,", "fail"]

    as_json = orjson.loads((await cli("agents", "echo", "--hub", url, "--json")).stdout)
    assert [a["name"] for a in as_json] == ["echoer"]
    assert orjson.loads((await cli("agents", "translate", "--hub", url, "--json")).stdout) == []

    done = await cli("delegate", "echo", '{"text": "hi there"}', "--hub", url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode() == "hi there\n"
    failed = await cli("delegate", "fail", "--hub", url)
    assert failed.returncode == 1
    assert failed.stderr.decode().strip().endswith("failed: ValueError: nope")

    tasks = orjson.loads((await cli("tasks", "--hub", url, "--json")).stdout)
    assert [(t["capability"], t["state"]) for t in tasks] == [
        ("fail", "failed"),
        ("echo", "completed"),
    ]
    only_failed = await cli("tasks", "--state", "failed", "--hub", url)
    rows = only_failed.stdout.decode().splitlines()
    assert len(rows) == 2
    assert rows[1].split()[1:3] == ["failed", "fail"]


async def test_inspecting_does_not_disturb_the_network(hub: Hub, echo: Agent) -> None:
    url = hub.url or ""
    async with connect(url, name="listener") as listener:
        results = await _run_together(
            ("status", "--hub", url),
            ("agents", "--hub", url),
            ("tasks", "--hub", url),
            ("broadcast", "ping", "--hub", url),
            ("broadcast", "ping", "--hub", url),
        )
        assert [r.returncode for r in results] == [0] * 5
        assert results[3].stdout.decode() == "sent to 2 agents\n"  # echoer and listener
        names = {a.name for a in await listener.discover()}
        assert names == {"echoer", "listener"}  # no CLI agent is listed
        summary = await listener.status()
        assert summary.online == 2  # type: ignore[union-attr]
        heard = [await _next_broadcast(listener) for _ in range(2)]
        assert [b.payload.message for b in heard] == ["ping", "ping"]


async def test_bad_input_and_unreachable_hub(hub: Hub, echo: Agent) -> None:
    url = hub.url or ""
    bad_json = await cli("delegate", "echo", "{nope", "--hub", url)
    assert bad_json.returncode == 2
    assert bad_json.stderr.decode().startswith("agentmesh: params is not valid JSON")
    not_object = await cli("delegate", "echo", "[1]", "--hub", url)
    assert not_object.returncode == 2
    no_agent = await cli("delegate", "translate", "--hub", url)
    assert no_agent.returncode == 1
    assert no_agent.stderr.decode() == (
        "agentmesh: no_capable_agent: no agent offers capability 'translate'\n"
    )
    usage = await cli("tasks", "--state", "sleeping", "--hub", url)
    assert usage.returncode == 2

    unreachable = await cli("status", env={"AGENTMESH_HUB": "ws://127.0.0.1:9"})
    assert unreachable.returncode == 3
    lines = unreachable.stderr.decode().splitlines()
    assert len(lines) == 1  # one clear line, no traceback
    assert lines[0].startswith("agentmesh: cannot reach the hub at ws://127.0.0.1:9")


async def test_start_serves_until_sigterm(nursery: trio.Nursery) -> None:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "agentmesh", "start", "--port", "0", "--heartbeat-interval", "5"],
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        url = await _read_url(process.stderr)
        async with open_raw(url) as client:
            reply = await client.register("probe")
            assert reply["payload"]["heartbeat_interval"] == 5.0
            process.send_signal(signal.SIGTERM)
            with pytest.raises(ConnectionClosed) as closed:
                await client.recv()
            assert closed.value.reason.code == 1001
        with trio.fail_after(WAIT):
            assert await process.wait() == 0
    finally:
        process.kill()
        await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()


async def _read_url(stream: Any) -> str:
    seen = b""
    with trio.fail_after(WAIT * 2):
        while True:
            chunk = await stream.receive_some()
            assert chunk, seen.decode()
            seen += chunk
            found = re.search(rb"serving on (ws://\S+)", seen)
            if found:
                return found.group(1).decode()


async def _run_together(*commands: tuple[str, ...]) -> list[subprocess.CompletedProcess[bytes]]:
    results: list[Any] = [None] * len(commands)

    async def run(i: int, args: tuple[str, ...]) -> None:
        results[i] = await cli(*args)

    async with trio.open_nursery() as nursery:
        for i, args in enumerate(commands):
            nursery.start_soon(run, i, args)
    return results


async def _next_broadcast(client: Any) -> Any:
    with trio.fail_after(WAIT):
        return await client.broadcasts().receive()
