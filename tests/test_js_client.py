"""The JavaScript client (clients/js) against real hubs: its `node --test` suites.

Each JS test file runs in one `node --test` process against hubs started here on loopback
port 0, named in environment variables (see clients/js/test/helpers.js): an open hub with a
Python SDK agent on it, for the JS <-> Python round trips and for `Hub.drop` (the JS tests
delegate `py-drop` to cut a connection), and a hub with tokens. A failing JS test fails
the pytest test with node's output. Skipped only where node is missing or older than 20.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio

import agentmesh
from agentmesh import Agent, Hub, HubConfig

from .test_node_examples import _node_command

JS_CLIENT = Path(__file__).parent.parent / "clients" / "js"
JS_TESTS = sorted((JS_CLIENT / "test").glob("*.test.js"))
TOKEN = "js-token"
ADMIN_TOKEN = "js-admin-token"
RUN_LIMIT = 60.0  # one JS file's whole run; each of its waits is bounded by 5 s in JS


@pytest.fixture(scope="module")
def node() -> tuple[str, ...]:
    command, why = _node_command()
    if command is None:
        pytest.skip(why)
    return command


def _helper_agent(hub: Hub) -> Agent:
    """The Python SDK agent the JS tests talk to."""
    assert hub.url is not None
    url = hub.url
    agent = Agent("py-helper", description="Python SDK agent for the JS client's tests")

    @agent.capability("py-echo")
    async def echo(text: str) -> str:
        """Say it back, from Python."""
        return f"py:{text}"

    @agent.capability("py-fail")
    async def fail(why: str) -> None:
        """Fail with a message."""
        raise ValueError(why)

    @agent.capability("py-drop")
    async def drop(agent_id: str) -> bool:
        """Cut an agent's connection (close code 4004): it may resume."""
        return hub.drop(agent_id, "dropped by the JS test")

    @agent.capability("py-delegate")
    async def delegate(capability: str, params: dict[str, Any]) -> Any:
        """Delegate from a Python requester and return what it got (or its error)."""
        async with agentmesh.connect(url, name="py-requester") as client:
            try:
                return {"result": await client.delegate(capability, params, ttl=5)}
            except agentmesh.AgentMeshError as exc:
                return {"error": type(exc).__name__, "message": str(exc)}

    return agent


@pytest.fixture
async def hubs(nursery: trio.Nursery) -> AsyncIterator[dict[str, str]]:
    """Both hubs and the helper agent; the environment the JS tests read."""
    open_hub = Hub(HubConfig(heartbeat_interval=0.5))
    await nursery.start(open_hub.serve, "127.0.0.1", 0)
    token_hub = Hub(HubConfig(tokens=frozenset({TOKEN}), admin_tokens=frozenset({ADMIN_TOKEN})))
    await nursery.start(token_hub.serve, "127.0.0.1", 0)
    assert open_hub.url is not None
    assert token_hub.url is not None
    helper = _helper_agent(open_hub)
    helper_done = trio.Event()

    async def serve_helper(task_status: trio.TaskStatus[None]) -> None:
        assert open_hub.url is not None
        try:
            await helper.serve(open_hub.url, task_status=task_status)
        finally:
            helper_done.set()

    with trio.fail_after(5):
        await nursery.start(serve_helper)
    yield {
        "AGENTMESH_TEST_URL": open_hub.url,
        "AGENTMESH_TEST_TOKEN_URL": token_hub.url,
        "AGENTMESH_TEST_TOKEN": TOKEN,
        "AGENTMESH_TEST_ADMIN_TOKEN": ADMIN_TOKEN,
        # The Python that clients/js/test/hubs.js runs its own hubs with (test/hub.py).
        "AGENTMESH_TEST_PYTHON": sys.executable,
    }
    # Stop the helper while its hub still answers: a graceful shutdown cut short by the
    # hubs' cancellation would wait the client's connect_timeout for a deregister reply.
    helper.shutdown()
    with trio.fail_after(5):
        await helper_done.wait()


@pytest.mark.parametrize("test_file", JS_TESTS, ids=[p.name for p in JS_TESTS])
async def test_js_client(node: tuple[str, ...], hubs: dict[str, str], test_file: Path) -> None:
    with trio.fail_after(RUN_LIMIT):
        done = await trio.run_process(
            [*node, "--test", "--test-reporter=spec", str(test_file)],
            cwd=JS_CLIENT,
            env={**os.environ, **hubs, "NO_COLOR": "1"},
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, f"node --test {test_file.name} failed:\n{output}"
    # The spec reporter's summary: every test ran (none skipped) and passed.
    counts = dict(re.findall(r"^\S+ (tests|pass|fail|skipped|cancelled) (\d+)$", output, re.M))
    assert int(counts.get("tests", 0)) > 0, output
    assert counts.get("pass") == counts["tests"], output


def test_js_tests_exist() -> None:
    assert len(JS_TESTS) >= 5, JS_TESTS
