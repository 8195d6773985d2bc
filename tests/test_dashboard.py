"""The dashboard in a real browser: headless Chromium (the Debian package, driven by
Playwright in a subprocess: interop/page_driver.py) against a real hub, its monitoring
port and SDK agents on loopback, with real tasks.

The test logs in through the form, then watches agents join and tasks flow as the hub
pushes them, filters, opens a task's details and sees the chart fill. Every wait is for
a condition on the page (Playwright's wait_for_function), never a sleep.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from agentmesh import Agent, Hub, HubConfig, TaskContext, TaskFailed, connect
from agentmesh._monitor import serve_monitor

from .conftest import WAIT
from .interop.page import CHROMIUM, Page, open_page
from .test_monitor import TASK, FakeApp

ADMIN = "dashboard-admin-token"
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def chromium() -> Path:
    """Skipped (here, outside Trio, so that the reason shows) if the browser is absent."""
    if not CHROMIUM.exists():
        reason = f"chromium is not installed at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; .ci/run should have installed it")
        pytest.skip(reason)
    return CHROMIUM


@pytest.fixture
async def page(chromium: Path, tmp_path: Path) -> AsyncIterator[Page]:
    async with open_page(tmp_path / "driver-stderr", chromium=chromium) as found:
        yield found


async def serve_hub(nursery: trio.Nursery, config: HubConfig) -> tuple[Hub, str]:
    """A hub and its monitoring port on loopback; the monitoring port's base URL."""
    hub = Hub(config)
    await nursery.start(hub.serve, "127.0.0.1", 0)
    http_port = await nursery.start(hub.serve_monitor, "127.0.0.1", 0)
    return hub, f"http://127.0.0.1:{http_port}"


def echo_agent() -> Agent:
    agent = Agent("echoer", description="says it back")

    @agent.capability("echo")
    async def echo(text: str, times: int = 1) -> str:
        """Repeat a text."""
        return text * times

    return agent


def review_agent(release: trio.Event) -> Agent:
    agent = Agent("reviewer", description="reviews code")

    @agent.capability("code-review")
    async def review(code: str, ctx: TaskContext) -> dict[str, Any]:
        """Count lines; fail on a bug; wait for the test on a slow one."""
        if "bug" in code:
            raise ValueError("found a bug on line 1")
        if "slow" in code:
            await ctx.progress(0.5, "halfway")
            await release.wait()
        return {"lines": len(code.splitlines())}

    return agent


async def wait(page: Page, js: str, arg: Any = None) -> Any:
    return await page.do("wait", js=js, arg=arg, timeout=WAIT)


ROW = "(id) => document.querySelector(`#tasks tr[data-task-id='${id}']`)"
VISIBLE = "() => [...document.querySelectorAll('#tasks tbody tr')].filter((tr) => !tr.hidden)"


async def text(page: Page, selector: str) -> str:
    found: str = await page.do(
        "eval", js="(s) => document.querySelector(s).textContent", arg=selector
    )
    return found


async def visible_tasks(page: Page) -> set[str]:
    ids = await page.do("eval", js=f"() => ({VISIBLE})().map((tr) => tr.dataset.taskId)")
    return set(ids)


async def test_the_dashboard_live(page: Page, nursery: trio.Nursery) -> None:
    hub, base = await serve_hub(nursery, HubConfig(admin_tokens=frozenset({ADMIN})))
    assert hub.url is not None

    # Log in through the form: a wrong token first.
    await page.do("goto", url=base + "/")
    await page.do("fill", selector="#token", value="not-the-token")
    await page.do("click", selector="button[type=submit]")
    await wait(
        page, "() => document.querySelector('.error')?.textContent.includes('not the admin token')"
    )
    await page.do("fill", selector="#token", value=ADMIN)
    await page.do("click", selector="button[type=submit]")
    await wait(page, "() => document.body.dataset.live === '1'")
    assert await page.do("eval", js="() => location.pathname") == "/"
    assert await page.do("eval", js="() => !document.querySelector('#logout').hidden")

    # Agents join while the page watches: their rows come from the pushed events.
    release = trio.Event()
    echoer = await nursery.start(partial(echo_agent().serve, hub.url, token=ADMIN))
    reviewer = await nursery.start(partial(review_agent(release).serve, hub.url, token=ADMIN))
    ids = [echoer.client.agent_id, reviewer.client.agent_id]
    await wait(
        page,
        "(ids) => ids.every((id) => document.querySelector("
        "`#agents tr[data-agent-id='${id}'][data-online='1']`))",
        ids,
    )
    assert (
        await text(page, f"#agents tr[data-agent-id='{echoer.client.agent_id}'] td.caps") == "echo"
    )

    async with connect(hub.url, name="planner", token=ADMIN) as client:
        echoes = [await client.submit("echo", {"text": f"hello {n}", "times": 2}) for n in range(3)]
        bug = await client.submit("code-review", {"code": "bug()"})
        slow = await client.submit("code-review", {"code": "slow()\nslow()"})
        for handle in echoes:
            await handle.wait()
        with pytest.raises(TaskFailed):
            await bug.wait()

        # The slow task runs: its progress shows, and it is the reviewer's load.
        load = (
            "([id, n]) => document.querySelector(`#agents tr[data-agent-id='${id}']`)"
            ".cells[4].textContent === String(n)"
        )
        await wait(page, f"(id) => ({ROW})(id)?.dataset.state === 'in_progress'", slow.task_id)
        progress = f"(id) => ({ROW})(id).cells[4].textContent.includes('50% halfway')"
        await wait(page, progress, slow.task_id)
        await wait(page, load, [reviewer.client.agent_id, 1])
        # A click shows the task in full, its params too (the hub keeps them while it runs).
        await page.do("click", selector=f"#tasks tr[data-task-id='{slow.task_id}']")
        await wait(page, "() => document.querySelector('#details-params')")
        assert await text(page, "#details-params") == '{\n  "code": "slow()\\nslow()"\n}'
        assert await text(page, "#details [data-field=state]") == "in progress"
        assert await text(page, "#details-progress") == "Progress50% — halfway"
        release.set()
        assert await slow.wait() == {"lines": 2}
        await wait(page, load, [reviewer.client.agent_id, 0])
        # The open panel follows the task to its end.
        shown = "() => document.querySelector('#details [data-field=state]')?.textContent"
        await wait(page, f"() => ({shown})() === 'completed'")
        assert await text(page, "#details-data") == '{\n  "lines": 2\n}'
        fields = await page.do(
            "eval",
            js="() => Object.fromEntries([...document.querySelectorAll('#details dd[data-field]')]"
            ".map((dd) => [dd.dataset.field, dd.textContent]))",
        )
        assert fields["task_id"] == slow.task_id
        assert fields["requester"] == f"planner ({client.agent_id})"
        assert fields["assignee"] == f"reviewer ({reviewer.client.agent_id})"
        assert fields["success"] == "true"
        assert {"created_at", "updated_at", "ttl", "error", "truncated", "duration"} <= set(fields)
        await page.do("click", selector="#details-close")
        assert await page.do("eval", js="() => document.querySelector('#details').hidden")

        finals = {h.task_id: "completed" for h in [*echoes, slow]} | {bug.task_id: "failed"}
        states = (
            f"(finals) => Object.entries(finals).map(([id, s]) => ({ROW})(id)?.dataset.state === s)"
        )
        await wait(page, f"(finals) => ({states})(finals).every(Boolean)", finals)
        # Requester and assignee by name, a duration for every finished task.
        cells = await page.do(
            "eval",
            js=f"(id) => [...({ROW})(id).cells].map((td) => td.textContent)",
            arg=bug.task_id,
        )
        assert cells[1:5] == ["code-review", "planner", "reviewer", "failed"]
        assert cells[5].endswith(("ms", " s"))

        # The filters hide what does not match.
        assert await visible_tasks(page) == set(finals)
        await page.do("select", selector="#filter-capability", value="echo")
        assert await visible_tasks(page) == {h.task_id for h in echoes}
        await page.do("select", selector="#filter-state", value="failed")
        assert await visible_tasks(page) == set()
        assert not await page.do("eval", js="() => document.querySelector('#tasks-empty').hidden")
        await page.do("select", selector="#filter-capability", value="")
        assert await visible_tasks(page) == {bug.task_id}
        await page.do("select", selector="#filter-state", value="")
        assert await visible_tasks(page) == set(finals)

        # The chart: tasks finished per second and their mean latency.
        await wait(
            page,
            "() => { const svg = document.querySelector('#chart svg');"
            " return Number(svg.dataset.finished) >= 5 && Number(svg.dataset.latencies) > 0"
            " && svg.querySelectorAll('rect.bar').length > 0"
            " && svg.querySelector('polyline.lat, circle.lat-dot') !== null; }",
        )
        delegated = await page.do(
            "eval", js="() => document.querySelector('#hub-delegated').textContent"
        )
        assert delegated == "5"

    # An agent that leaves is gone from the table.
    echoer.shutdown()
    await wait(
        page,
        "(id) => !document.querySelector(`#agents tr[data-agent-id='${id}']`)",
        echoer.client.agent_id,
    )
    # No script error, nothing the CSP refused: only the wrong login's 401, as Chromium
    # logs every 4xx it loads.
    refused = "Failed to load resource: the server responded with a status of 401 (Unauthorized)"
    assert page.console == [{"ev": "console", "type": "error", "text": refused}]

    # Logging out ends the session: the login form again.
    await page.do("click", selector="#logout button")
    await wait(page, "() => document.querySelector('#token') !== null")


async def test_an_open_hub_needs_no_login(page: Page, nursery: trio.Nursery) -> None:
    hub, base = await serve_hub(nursery, HubConfig())
    assert hub.url is not None
    await nursery.start(partial(echo_agent().serve, hub.url))
    await page.do("goto", url=base + "/")
    await wait(page, "() => document.body.dataset.live === '1'")
    assert await page.do("eval", js="() => document.querySelector('#logout').hidden")
    # What was there before the page opened comes with the snapshot.
    await wait(
        page, "() => document.querySelector('#agents tbody tr')?.cells[0].textContent === 'echoer'"
    )
    assert await text(page, "#hub-durable") == "in memory"
    assert page.console == [], page.console


async def test_after_a_gap_the_page_starts_again_from_a_snapshot(
    page: Page, nursery: trio.Nursery
) -> None:
    """Events were dropped for a slow page (``missed``): it opens a new stream, whose
    snapshot it rebuilds from. Against the monitoring port's fake app, which says when
    the page subscribes."""
    app = FakeApp()
    port = await nursery.start(partial(serve_monitor, app, "127.0.0.1", 0))
    await page.do("goto", url=f"http://127.0.0.1:{port}/")
    await wait(page, f"() => ({ROW})('t1')?.dataset.state === 'completed'")
    [first] = app.listeners
    running = {**TASK, "task_id": "t2", "state": "in_progress", "success": None}
    app.emit({"kind": "task_state", "seq": 2, "time": 2.0, "task": running, "duration": None})
    await wait(page, f"() => ({ROW})('t2')?.dataset.state === 'in_progress'")
    app.emit({"kind": "task_state", "seq": 9, "time": 3.0, "missed": 6, "task": TASK})
    with trio.fail_after(WAIT):
        while first in app.listeners or len(app.listeners) != 1:
            await app.changed.wait()
    # Rebuilt from the new snapshot (which knows nothing of t2), and live again.
    await wait(page, f"() => document.body.dataset.live === '1' && !({ROW})('t2')")
    assert await visible_tasks(page) == {"t1"}
    app.emit({"kind": "task_state", "seq": 10, "time": 4.0, "task": running, "duration": None})
    await wait(page, f"() => ({ROW})('t2')?.dataset.state === 'in_progress'")
    assert page.console == [], page.console
