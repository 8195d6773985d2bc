"""Bounded retention of finished tasks: by count, bytes and age, never an undelivered one.

Pure `TaskTable` tests: no sockets, times handed in by hand.
"""

from __future__ import annotations

import gc
import random
import tracemalloc
from typing import Any

import pytest

from agentmesh.lifecycle import (
    IN_PROGRESS,
    ROW_OVERHEAD,
    TERMINAL_STATES,
    TaskEvent,
    TaskRecord,
    TaskTable,
)

from .records import make_record


def record(task_id: str, **overrides: Any) -> TaskRecord:
    """A task in progress (the table finishes it)."""
    return make_record(task_id, **{"state": IN_PROGRESS, **overrides})


def finish(
    table: TaskTable,
    task_id: str,
    now: float,
    *,
    notified: bool = True,
    owed_cancel: str | None = None,
    data: Any = "ok",
    **fields: Any,
) -> TaskRecord:
    """Add a task and finish it at `now`, as the router does (delivered unless told)."""
    task = record(task_id, **fields)
    table.add(task)
    task.apply(TaskEvent.COMPLETE, now=now, wall=now, success=True, data=data)
    task.notified, task.owed_cancel = notified, owed_cancel
    table.update(task)
    return task


def finished_ids(table: TaskTable) -> set[str]:
    return {r.task_id for r in table if r.terminal}


def finished_count(table: TaskTable) -> int:
    counts = table.counts()
    return sum(counts[state.value] for state in TERMINAL_STATES)


# ---------------------------------------------------------------------------------------
# By count


def test_count_bound_drops_the_oldest_finished_at_once() -> None:
    table = TaskTable(max_retained_tasks=3)
    for n in range(6):
        finish(table, f"t{n}", now=float(n))
        assert finished_count(table) <= 3  # at all times, not at a cleanup
    assert finished_ids(table) == {"t3", "t4", "t5"}
    assert table.get("t0") is None
    assert table.counts()["completed"] == 3
    assert table.of_requester("agt_req", finished=True) != []


def test_count_bound_goes_by_finishing_order_not_adding_order() -> None:
    table = TaskTable(max_retained_tasks=2)
    tasks = [record(f"t{n}") for n in range(3)]
    for task in tasks:
        table.add(task)
    for n, task in enumerate(reversed(tasks)):  # t2 finishes first, t0 last
        task.apply(TaskEvent.FAIL, now=float(n), wall=0.0)
        task.notified = True
        table.update(task)
    assert finished_ids(table) == {"t1", "t0"}


def test_count_bound_leaves_unfinished_tasks_alone() -> None:
    table = TaskTable(max_retained_tasks=1)
    for n in range(3):
        table.add(record(f"live{n}"))
    finish(table, "a", now=1.0)
    finish(table, "b", now=2.0)
    assert {r.task_id for r in table} == {"live0", "live1", "live2", "b"}


def test_count_bound_never_drops_an_undelivered_outcome() -> None:
    table = TaskTable(max_retained_tasks=2)
    finish(table, "untold", now=0.0, notified=False)
    finish(table, "cancel_owed", now=1.0, owed_cancel="stop")
    for n in range(5):
        finish(table, f"told{n}", now=2.0 + n)
    # Both owed tasks are over the bound; they stay, the delivered ones make room.
    assert finished_ids(table) == {"untold", "cancel_owed"}
    assert [r.task_id for r in table.owed("agt_req")] == ["untold"]
    assert [r.task_id for r in table.owed("agt_work")] == ["cancel_owed"]


def test_an_outcome_once_delivered_may_go_to_make_room() -> None:
    table = TaskTable(max_retained_tasks=2)
    finish(table, "untold", now=0.0, notified=False)
    finish(table, "a", now=1.0)
    finish(table, "b", now=2.0)  # over: "a" goes, "untold" is held
    assert finished_ids(table) == {"untold", "b"}
    untold = table.get("untold")
    assert untold is not None
    untold.notified = True  # delivered on resume
    table.update(untold)
    finish(table, "c", now=3.0)
    assert finished_ids(table) == {"b", "c"}


def test_an_outcome_on_its_way_is_kept_until_written() -> None:
    table = TaskTable(max_retained_tasks=2)
    task = record("queued")
    table.add(task)
    table.hold("queued")  # the router queued its outcome frame, not yet written
    task.apply(TaskEvent.COMPLETE, now=0.0, wall=0.0, success=True)
    task.notified = True
    table.update(task)
    for n in range(4):
        finish(table, f"t{n}", now=1.0 + n)
    assert finished_ids(table) == {"queued", "t3"}  # the newer ones made room
    table.release("queued")  # written whole: the next room it takes first
    finish(table, "t4", now=9.0)
    assert finished_ids(table) == {"t3", "t4"}
    table.release("queued")  # twice, or for a task long gone: nothing happens
    table.release("never")


def test_an_outcome_owed_again_is_held_again() -> None:
    """An outcome whose frame never left is owed again (the router sets `notified` back
    to false): from then on it is not dropped for room."""
    table = TaskTable(max_retained_tasks=2)
    finish(table, "lost", now=0.0)
    lost = table.get("lost")
    assert lost is not None
    lost.notified = False
    table.update(lost)
    for n in range(4):
        finish(table, f"t{n}", now=1.0 + n)
    assert "lost" in finished_ids(table)
    assert len(finished_ids(table)) == 2


# ---------------------------------------------------------------------------------------
# By bytes


def test_byte_bound_drops_the_oldest_until_it_holds() -> None:
    small = finish(TaskTable(), "probe", now=0.0)
    one = TaskTable()
    one.add(small)
    one_task = one.retained_bytes
    assert one_task > ROW_OVERHEAD

    table = TaskTable(max_retained_bytes=4 * one_task)
    for n in range(4):
        finish(table, f"s{n}", now=float(n))
    assert len(finished_ids(table)) == 4
    finish(table, "big", now=10.0, data="x" * (2 * one_task))  # worth three small ones
    assert table.retained_bytes <= 4 * one_task
    assert finished_ids(table) == {"s3", "big"}


def test_byte_bound_holds_after_every_finish() -> None:
    table = TaskTable(max_retained_bytes=20_000)
    rng = random.Random(7)
    for n in range(300):
        finish(table, f"t{n}", now=float(n), data="y" * rng.randrange(0, 3000))
        assert table.retained_bytes <= 20_000
    assert 0 < len(finished_ids(table)) < 300


def test_byte_bound_never_drops_an_undelivered_outcome() -> None:
    table = TaskTable(max_retained_bytes=3000)
    finish(table, "untold", now=0.0, notified=False, data="z" * 5000)
    finish(table, "told", now=1.0)
    assert table.retained_bytes > 3000  # only held tasks are past the bound
    assert finished_ids(table) == {"untold"}


def test_retained_bytes_follow_updates_and_removals() -> None:
    table = TaskTable()
    task = finish(table, "t", now=0.0, data="a")
    small = table.retained_bytes
    task.data = "a" * 1000
    table.update(task)
    assert table.retained_bytes == small + 999
    assert table.remove("t") is not None
    assert table.retained_bytes == 0
    assert table.counts()["completed"] == 0


# ---------------------------------------------------------------------------------------
# By age


def test_age_drops_what_finished_before_the_cutoff() -> None:
    table = TaskTable()
    for n in range(5):
        finish(table, f"t{n}", now=10.0 * n)
    assert table.drop_finished(before=25.0) == 3
    assert finished_ids(table) == {"t3", "t4"}
    assert table.drop_finished(before=25.0) == 0


def test_age_also_takes_held_tasks_past_retention() -> None:
    """Past `retention` (at least the resume grace) nobody can resume to collect them."""
    table = TaskTable(max_retained_tasks=2)
    finish(table, "untold", now=0.0, notified=False)
    finish(table, "told", now=1.0)
    finish(table, "newer", now=2.0)  # "untold" is passed over for room, put aside
    assert finished_ids(table) == {"untold", "newer"}
    assert table.drop_finished(before=0.5) == 1
    assert finished_ids(table) == {"newer"}


def test_with_retention_each_finish_drops_aged_tasks() -> None:
    table = TaskTable(retention=100.0)
    finish(table, "old1", now=0.0)
    finish(table, "old2", now=1.0)
    finish(table, "old3", now=2.0)
    finish(table, "mid", now=60.0)
    assert len(finished_ids(table)) == 4  # nothing is 100 s old yet
    finish(table, "new", now=150.0)  # drops up to two aged ones
    assert finished_ids(table) == {"old3", "mid", "new"}
    finish(table, "newer", now=151.0)
    assert finished_ids(table) == {"mid", "new", "newer"}


def test_bounds_hold_under_a_mixed_load() -> None:
    table = TaskTable(max_retained_tasks=50, max_retained_bytes=40_000, retention=30.0)
    rng = random.Random(12)
    held: set[str] = set()
    for n in range(2000):
        notified = rng.random() > 0.02
        finish(table, f"t{n}", now=n * 0.1, notified=notified, data="d" * rng.randrange(400))
        if not notified:
            held.add(f"t{n}")
        kept = finished_ids(table)
        droppable = kept - held
        assert len(kept) <= 50 or not droppable
        assert table.retained_bytes <= 40_000 or not droppable
        # held tasks stay until they are 30 s old
        assert {h for h in held if int(h[1:]) * 0.1 > n * 0.1 - 29} <= kept


# ---------------------------------------------------------------------------------------
# Memory


def test_a_small_retained_task_costs_under_600_bytes() -> None:
    """The whole memory of a finished, delivered task: its row, ID, sequence number and
    index entries, measured with tracemalloc over 20,000 tasks made as the router makes
    them (the records themselves are gone once finished)."""
    count = 20_000
    rng = random.Random(3)
    table = TaskTable()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(count):
            task = record(
                f"task_{rng.getrandbits(64):016x}",
                requester=f"agt_{n % 8:016x}",
                assignee=f"agt_{n % 8 + 100:016x}",
                ttl=60.0,
                deadline=12345.678 + n,
                created_at=1795474652.037207 + n,
                updated_at=1795474652.037207 + n,
            )
            table.add(task)
            task.apply(TaskEvent.COMPLETE, now=2e4 + n, wall=1.8e9 + n, success=True, data="hi")
            task.ended_by, task.notified = task.assignee, True
            table.update(task)
        del task
        gc.collect()
        per_task = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    assert len(table) == count
    assert per_task < 600, f"{per_task:.0f} bytes per retained task"
    # What the byte bound counts is close to what a task really costs.
    assert table.retained_bytes / count == pytest.approx(per_task, rel=0.2)


def test_an_outcome_on_its_way_twice_is_kept_until_both_are_written() -> None:
    table = TaskTable(max_retained_tasks=1)
    finish(table, "twice", now=0.0)
    table.hold("twice")  # queued on the old connection
    table.hold("twice")  # and again on the new one (the resume named it)
    finish(table, "newer", now=1.0)
    table.release("twice")  # the old connection's copy is settled
    finish(table, "newest", now=2.0)
    assert "twice" in finished_ids(table)  # the new connection's copy is still out
    table.release("twice")
    finish(table, "last", now=3.0)
    assert finished_ids(table) == {"last"}
