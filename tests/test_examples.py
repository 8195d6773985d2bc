"""The examples in examples/ run against a real hub, as a user would run them."""

from __future__ import annotations

import signal
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio

from agentmesh import Hub, connect

from .conftest import WAIT

EXAMPLES = Path(__file__).parent.parent / "examples"


async def start_example(nursery: trio.Nursery, name: str, url: str) -> trio.Process:
    """Start examples/`name` in the background; the nursery waits for it to exit."""
    run = partial(
        trio.run_process,
        [sys.executable, str(EXAMPLES / name), url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    process: trio.Process = await nursery.start(run)
    return process


async def wait_for_agents(url: str, *capabilities: str) -> None:
    async with connect(url, name="watcher") as client:
        with trio.fail_after(WAIT * 2):
            for capability in capabilities:
                while not await client.discover(capability):  # noqa: ASYNC110
                    await trio.sleep(0.05)  # the agent process is still starting


async def test_examples_run_against_a_real_hub(hub: Hub, nursery: trio.Nursery) -> None:
    assert hub.url is not None
    agents: list[Any] = [
        await start_example(nursery, "echo_agent.py", hub.url),
        await start_example(nursery, "code_review_agent.py", hub.url),
    ]
    await wait_for_agents(hub.url, "echo", "code-review")

    with trio.fail_after(WAIT * 3):
        result = await trio.run_process(
            [sys.executable, str(EXAMPLES / "requester.py"), hub.url],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "found echo" in out
    assert "found code-reviewer" in out
    assert "echo: hello hello" in out
    assert "progress: 50% step 1 of 2" in out
    assert "slow-echo: done" in out
    assert "review: line 2: add() has no docstring; line 5: bare except" in out
    assert "translate: no agent offers capability 'translate'" in out

    # SIGTERM shuts each agent down gracefully: it deregisters and exits 0.
    for process in agents:
        process.send_signal(signal.SIGTERM)
    with trio.fail_after(WAIT * 2):
        for process in agents:
            assert await process.wait() == 0
    async with connect(hub.url, name="checker") as client:
        names = {agent.name for agent in await client.discover()}
        assert names == {"checker"}
