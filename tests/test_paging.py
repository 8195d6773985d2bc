"""Bounded replies: `list_tasks` and `discover` page with a limit and a cursor, and stop
short of `max_reply_size` bytes.

First the pure `TaskTable.page` and `Registry.page`, then a real hub on loopback.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import orjson
import pytest
import trio

from agentmesh import HubConfig, lifecycle
from agentmesh.lifecycle import COMPLETED, FAILED, IN_PROGRESS, TaskEvent, TaskRecord, TaskTable
from agentmesh.registry import AgentRecord, Capability, Registry

from .conftest import WAIT, RawClient
from .records import make_record

Connect = Any


def record(task_id: str, **overrides: Any) -> TaskRecord:
    return make_record(task_id, **{"params": {}, **overrides})


def table_of(count: int, **overrides: Any) -> TaskTable:
    table = TaskTable()
    for n in range(count):
        table.add(record(f"t{n}", **overrides))
    return table


def every_page(table: TaskTable, **options: Any) -> list[list[str]]:
    """The task IDs of each page, following the cursors to the end."""
    pages, cursor = [], None
    while True:
        found, cursor = table.page(cursor=cursor, **options)
        pages.append([r.task_id for _, r in found])
        if cursor is None:
            return pages


# ---------------------------------------------------------------------------------------
# TaskTable.page


def test_pages_newest_first_until_the_cursor_is_none() -> None:
    table = table_of(7)
    assert every_page(table, limit=3) == [["t6", "t5", "t4"], ["t3", "t2", "t1"], ["t0"]]
    found, cursor = table.page(limit=100)
    assert len(found) == 7
    assert cursor is None


def test_a_cursor_neither_repeats_nor_skips_under_inserts_and_drops() -> None:
    table = TaskTable()
    for n in range(10):
        task = record(f"t{n}", state=IN_PROGRESS)
        table.add(task)
        if n % 3 == 0:
            task.apply(TaskEvent.COMPLETE, now=float(n), wall=0.0, success=True)
            task.notified = True
            table.update(task)
    first, cursor = table.page(limit=4)
    assert [r.task_id for _, r in first] == ["t9", "t8", "t7", "t6"]
    for n in range(10, 20):  # new tasks meanwhile: not listed by this listing
        table.add(record(f"t{n}"))
    table.remove("t2")  # a task that goes meanwhile is simply not there
    rest = []
    while cursor is not None:
        found, cursor = table.page(cursor=cursor, limit=2)
        rest += [r.task_id for _, r in found]
    assert rest == ["t5", "t4", "t3", "t1", "t0"]


def test_each_entry_carries_the_cursor_that_resumes_at_it() -> None:
    table = table_of(5)
    found, _ = table.page(limit=5)
    resume_at_t2 = found[2][0]
    again, _ = table.page(cursor=resume_at_t2, limit=2)
    assert [r.task_id for _, r in again] == ["t2", "t1"]


def test_state_filter_reads_rows_and_live_records() -> None:
    table = TaskTable()
    for n in range(6):
        task = record(f"t{n}", state=IN_PROGRESS)
        table.add(task)
        if n % 2:
            task.apply(TaskEvent.FAIL if n == 3 else TaskEvent.COMPLETE, now=1.0, wall=1.0)
            table.update(task)
    assert every_page(table, state="completed", limit=10) == [["t5", "t1"]]
    assert every_page(table, state="failed", limit=10) == [["t3"]]
    assert every_page(table, state="in_progress", limit=2) == [["t4", "t2"], ["t0"]]
    assert every_page(table, state="timeout", limit=10) == [[]]


def test_a_sparse_filter_reads_through_its_index() -> None:
    table = TaskTable()
    for n in range(25):
        task = record(f"t{n}", state=IN_PROGRESS, requester=f"agt_{n % 5}")
        table.add(task)
        task.apply(TaskEvent.FAIL if n in (2, 7) else TaskEvent.COMPLETE, now=1.0, wall=1.0)
        table.update(task)
    # Two failed tasks among 25: found at once, whatever the scan budget.
    assert every_page(table, state=FAILED.value, limit=10, scan=2) == [["t7", "t2"]]
    # The narrowest filter leads (agt_2 asked for 5), the others are checked.
    assert every_page(table, requester="agt_2", state=FAILED.value, scan=5) == [["t7", "t2"]]
    assert every_page(table, requester="agt_3", assignee="agt_work") == [
        ["t23", "t18", "t13", "t8", "t3"]
    ]
    # Every filter broad: the order is walked, `scan` at a time.
    assert every_page(table, state=COMPLETED.value, limit=100, scan=10)[0] == [
        f"t{n}" for n in range(24, 14, -1)
    ]


def test_scan_budget_stops_a_sparse_match_of_broad_filters_with_a_cursor() -> None:
    table = TaskTable()
    for n in range(25):
        task = record(f"t{n}", state=IN_PROGRESS, requester=f"agt_{n % 2}")
        table.add(task)
        failed = n % 2 == 0 and n != 4  # agt_0's tasks fail, but for t4
        task.apply(TaskEvent.FAIL if failed else TaskEvent.COMPLETE, now=1.0, wall=1.0)
        table.update(task)
    pages = every_page(table, requester="agt_0", state=COMPLETED.value, limit=10, scan=10)
    assert pages == [[], [], ["t4"]]  # 10 + 10 looked at, then the last 5


def test_scan_budget_walks_past_dropped_tasks() -> None:
    table = TaskTable(max_retained_tasks=5)
    table.add(record("oldest_live"))
    for n in range(300):
        task = record(f"t{n}", state=IN_PROGRESS)
        table.add(task)
        task.apply(TaskEvent.COMPLETE, now=float(n), wall=0.0, success=True)
        task.notified = True
        table.update(task)
    pages = every_page(table, limit=100, scan=50)
    assert [t for page in pages for t in page] == [
        "t299",
        "t298",
        "t297",
        "t296",
        "t295",
        "oldest_live",
    ]
    assert len(pages) <= 3  # dropped tasks are compacted away, not walked one by one


def test_tasks_removed_as_fast_as_they_come_are_listed_once() -> None:
    """A block of the order emptied and filled again is not walked twice."""
    table = table_of(1024)  # four full blocks first
    for n in range(600):
        table.add(record(f"gone{n}"))
        table.remove(f"gone{n}")
        if n % 100 == 0:
            table.add(record(f"kept{n}"))
    expected = [f"kept{n}" for n in range(500, -1, -100)] + [f"t{n}" for n in range(1023, -1, -1)]
    assert every_page(table, limit=5000) == [expected]
    assert [t for page in every_page(table, limit=7, scan=300) for t in page] == expected


def test_an_agents_tasks_few_or_many() -> None:
    table = TaskTable()
    for n in range(40):
        who = "agt_a" if n % 4 == 0 else "agt_b"
        table.add(record(f"t{n}", requester=who, assignee="agt_a" if n == 5 else "agt_w"))
    mine = ["t36", "t32", "t28", "t24", "t20", "t16", "t12", "t8", "t5", "t4", "t0"]
    # few: sorted at once; many (more than the scan budget): the order is walked
    for scan in (5_000, 8):
        pages = every_page(table, of="agt_a", limit=4, scan=scan)
        assert [t for page in pages for t in page] == mine
    assert every_page(table, of="agt_nobody", limit=4) == [[]]


def test_a_page_costs_its_limit_not_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """Over 20,000 finished tasks, a page of 10 reads 10 rows, and a sparse filter looks
    at no more than the scan budget."""
    table = TaskTable()
    for n in range(20_000):
        task = record(f"t{n}", requester=f"agt_{n % 2}", state=IN_PROGRESS)
        table.add(task)
        task.apply(TaskEvent.COMPLETE, now=float(n), wall=0.0, success=True)
        task.notified = True
        table.update(task)
    decoded = []
    real = lifecycle.from_row
    monkeypatch.setattr(lifecycle, "from_row", lambda row: decoded.append(row) or real(row))
    for options in ({}, {"of": "agt_1"}, {"state": "completed"}):
        decoded.clear()
        found, cursor = table.page(limit=10, **options)  # type: ignore[arg-type]
        assert len(found) == 10
        assert len(decoded) == 10
    decoded.clear()
    found, cursor = table.page(state="failed", limit=10, scan=1000)
    assert (found, decoded, cursor) == ([], [], None)  # the state index is empty
    found, cursor = table.page(of="agt_1", requester="agt_0", limit=10, scan=1000)
    assert (found, decoded) == ([], [])  # nothing matches both: no row decoded
    assert cursor == "t19000"  # stopped where the budget ran out: 1,000 looked at


def test_a_task_an_agent_asked_itself_is_listed_once() -> None:
    table = TaskTable()
    table.add(record("self", requester="agt_a", assignee="agt_a"))
    assert every_page(table, of="agt_a") == [["self"]]


@pytest.mark.parametrize(
    "cursor", ["", "t", "x12", "a12", "t-1", "t1.5", "t\u0661\u0662", "t" + "9" * 19]
)
def test_a_cursor_the_table_did_not_make_is_refused(cursor: str) -> None:
    with pytest.raises(ValueError, match="not a cursor"):
        table_of(3).page(cursor=cursor)


# ---------------------------------------------------------------------------------------
# Registry.search


def agent(agent_id: str, *capabilities: str, hidden: bool = False) -> AgentRecord:
    return AgentRecord(
        agent_id=agent_id,
        name=agent_id,
        description="",
        capabilities=tuple(Capability(name=c) for c in capabilities),
        metadata={},
        token_hash=b"tok",
        registered_at=0.0,
        hidden=hidden,
    )


def agent_pages(registry: Registry, keyword: str, limit: int) -> list[list[str]]:
    pages, cursor = [], None
    while True:
        found, cursor = registry.search(keyword, cursor=cursor, limit=limit)
        pages.append([a.agent_id for _, a, _ in found])
        if cursor is None:
            return pages


def test_registry_pages_in_registration_order() -> None:
    registry = Registry()
    for n in range(5):
        registry.add(agent(f"a{n}", "echo" if n != 2 else "other"))
    registry.add(agent("tool", "echo", hidden=True))
    assert agent_pages(registry, "echo", 2) == [["a0", "a1"], ["a3", "a4"]]
    assert agent_pages(registry, "", 10) == [["a0", "a1", "a2", "a3", "a4"]]
    assert agent_pages(registry, "nobody", 10) == [[]]


def test_registry_cursor_is_stable_while_agents_come_and_go() -> None:
    registry = Registry()
    for n in range(4):
        registry.add(agent(f"a{n}", "echo"))
    first, cursor = registry.search("echo", limit=2)
    assert [a.agent_id for _, a, _ in first] == ["a0", "a1"]
    registry.remove("a2")
    registry.add(agent("late", "echo"))
    registry.add(agent("a0", "echo"))  # a resume re-registers: it moves to the end
    found, cursor = registry.search("echo", cursor=cursor, limit=10)
    assert [a.agent_id for _, a, _ in found] == ["a3", "late", "a0"]
    assert cursor is None


@pytest.mark.parametrize("cursor", ["t1", "a", "1", "a1e3"])
def test_registry_refuses_a_cursor_it_did_not_make(cursor: str) -> None:
    with pytest.raises(ValueError, match="not a cursor"):
        Registry().search("", cursor=cursor)


# ---------------------------------------------------------------------------------------
# Over a real hub


REPLY_SIZE = 4096


@pytest.fixture
def hub_config() -> HubConfig:
    return HubConfig(max_reply_size=REPLY_SIZE)


async def raw_reply(client: RawClient, type_: str, payload: dict[str, Any]) -> tuple[int, Any]:
    """Send a request on a connection that gets nothing else; the reply's size in bytes
    as sent, and the reply."""
    msg_id = await client.send(type_, payload)
    with trio.fail_after(WAIT):
        text = await client.ws.get_message()
    assert isinstance(text, str)
    reply = orjson.loads(text)
    assert reply["in_reply_to"] == msg_id
    return len(text.encode()), reply


async def finished_tasks(stack: AsyncExitStack, connect: Connect, data: list[Any]) -> list[str]:
    """Delegate one task per item of `data`, answered with it; their IDs, oldest first."""
    worker = await stack.enter_async_context(connect())
    requester = await stack.enter_async_context(connect())
    await worker.register("worker", "echo")
    await requester.register("asker")
    task_ids = []
    for item in data:
        ack = await requester.request("delegate", {"capability": "echo"})
        task_id = ack["payload"]["task_id"]
        await worker.expect("delegate", task_id=task_id)
        await worker.send("result", {"task_id": task_id, "success": True, "data": item})
        await requester.expect("result", task_id=task_id)
        task_ids.append(task_id)
    return task_ids


async def all_pages(
    client: RawClient, type_: str, key: str, payload: dict[str, Any]
) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    cursor = None
    while True:
        size, reply = await raw_reply(client, type_, {**payload, "cursor": cursor})
        assert reply["type"] == type_, reply
        yield size, reply["payload"]
        cursor = reply["payload"]["next_cursor"]
        if cursor is None:
            return


async def test_list_tasks_pages_over_the_hub(connect: Connect) -> None:
    async with AsyncExitStack() as stack:
        task_ids = await finished_tasks(stack, connect, list(range(5)))
        operator = await stack.enter_async_context(connect())
        pages = [
            [t["task_id"] for t in page["tasks"]]
            async for _, page in all_pages(operator, "list_tasks", "tasks", {"limit": 2})
        ]
        assert pages == [task_ids[4:2:-1], task_ids[2:0:-1], task_ids[:1]]
        # One reply without a cursor: the whole list, as before paging existed.
        _, whole = await raw_reply(operator, "list_tasks", {})
        assert [t["task_id"] for t in whole["payload"]["tasks"]] == task_ids[::-1]
        assert whole["payload"]["next_cursor"] is None


async def test_list_tasks_filters_by_requester_and_assignee(connect: Connect) -> None:
    async with AsyncExitStack() as stack:
        task_ids = await finished_tasks(stack, connect, list(range(3)))
        operator = await stack.enter_async_context(connect())
        _, one = await raw_reply(operator, "list_tasks", {"limit": 1})
        requester, assignee = (one["payload"]["tasks"][0][k] for k in ("requester", "assignee"))
        for payload, expected in (
            ({"requester": requester}, task_ids[::-1]),
            ({"assignee": assignee, "state": "completed"}, task_ids[::-1]),
            ({"requester": assignee}, []),  # the worker asked for nothing
            ({"assignee": "agt_nobody"}, []),
        ):
            _, reply = await raw_reply(operator, "list_tasks", payload)
            assert [t["task_id"] for t in reply["payload"]["tasks"]] == expected, payload
        _, bad = await raw_reply(operator, "list_tasks", {"requester": 7})
        assert bad["payload"]["code"] == "invalid_message"


async def test_list_tasks_reply_stays_under_max_reply_size(connect: Connect) -> None:
    async with AsyncExitStack() as stack:
        data = ["x" * 900] * 12  # about 11 KB of results
        task_ids = await finished_tasks(stack, connect, data)
        operator = await stack.enter_async_context(connect())
        listed, pages = [], 0
        async for size, page in all_pages(operator, "list_tasks", "tasks", {"limit": 100}):
            assert size <= REPLY_SIZE
            assert all(t["data"] == "x" * 900 and not t["truncated"] for t in page["tasks"])
            listed += [t["task_id"] for t in page["tasks"]]
            pages += 1
        assert listed == task_ids[::-1]
        assert pages >= 3


async def test_a_task_larger_than_a_reply_is_listed_without_its_data(connect: Connect) -> None:
    async with AsyncExitStack() as stack:
        [big, small] = await finished_tasks(stack, connect, ["y" * (2 * REPLY_SIZE), "small"])
        operator = await stack.enter_async_context(connect())
        pages = [page async for _, page in all_pages(operator, "list_tasks", "tasks", {})]
        tasks = [t for page in pages for t in page["tasks"]]
        assert [(t["task_id"], t["data"], t["truncated"]) for t in tasks] == [
            (small, "small", False),
            (big, None, True),
        ]


async def test_discover_pages_and_stays_under_max_reply_size(connect: Connect) -> None:
    async with AsyncExitStack() as stack:
        names = [f"agent{n}" for n in range(8)]
        for name in names:
            client = await stack.enter_async_context(connect())
            await client.register(name, "echo", metadata={"blurb": "z" * 700})
        asker = await stack.enter_async_context(connect())
        seen, pages = [], 0
        async for size, page in all_pages(asker, "discover", "agents", {"capability": "echo"}):
            assert size <= REPLY_SIZE
            seen += [a["name"] for a in page["agents"]]
            pages += 1
        assert seen == names
        assert pages >= 2
        limited = [
            [a["name"] for a in page["agents"]]
            async for _, page in all_pages(asker, "discover", "agents", {"limit": 3})
        ]
        assert limited == [names[:3], names[3:6], names[6:]]


@pytest.mark.parametrize("type_", ["list_tasks", "discover"])
@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"limit": 0}, "$.payload.limit: must be from 1 to 1000, got 0"),
        ({"limit": 1001}, "$.payload.limit: must be from 1 to 1000, got 1001"),
        ({"cursor": "bogus"}, "$.payload.cursor: 'bogus' is not a cursor from this reply type"),
        ({"cursor": 12}, "expected a string, got a number @ $.payload.cursor"),
    ],
)
async def test_bad_page_requests_get_invalid_message(
    connect: Connect, type_: str, payload: dict[str, Any], message: str
) -> None:
    async with connect() as client:
        reply = await client.request(type_, payload)
        assert reply["type"] == "error"
        assert reply["payload"]["code"] == "invalid_message"
        assert reply["payload"]["message"].startswith(message)


async def test_a_cursor_of_one_reply_type_is_refused_by_the_other(connect: Connect) -> None:
    async with AsyncExitStack() as stack:
        await finished_tasks(stack, connect, [1, 2])
        operator = await stack.enter_async_context(connect())
        _, tasks = await raw_reply(operator, "list_tasks", {"limit": 1})
        cursor = tasks["payload"]["next_cursor"]
        assert cursor is not None
        reply = await operator.request("discover", {"cursor": cursor})
        assert reply["payload"]["code"] == "invalid_message"
        assert "$.payload.cursor" in reply["payload"]["message"]
