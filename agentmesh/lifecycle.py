"""The task state machine, task records and the task table. Pure: no trio, no sockets.

A task moves PENDING -> IN_PROGRESS -> one of COMPLETED, FAILED, TIMEOUT, CANCELLED.
Every allowed move is one row of `TRANSITIONS`; anything else raises `IllegalTransition`
and leaves the record untouched. Terminal states have no rows, so they are final.
Times are plain floats handed in by the caller (the hub's clock), never read here.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import Any, ClassVar

import attrs

__all__ = [
    "CANCELLED",
    "COMPLETED",
    "FAILED",
    "IN_PROGRESS",
    "PENDING",
    "STATES",
    "TERMINAL_STATES",
    "TIMEOUT",
    "TRANSITIONS",
    "IllegalTransition",
    "TaskEvent",
    "TaskRecord",
    "TaskState",
    "TaskTable",
]


class TaskState:
    """Base of the six task states. A state is a class, never instantiated.

    `value` is the state's name on the wire; `terminal` says whether it is final.
    """

    value: ClassVar[str]
    terminal: ClassVar[bool]

    def __init_subclass__(cls, *, value: str, terminal: bool) -> None:
        cls.value = value
        cls.terminal = terminal

    def __new__(cls) -> TaskState:
        raise TypeError("task states are classes; use the class itself")


class PENDING(TaskState, value="pending", terminal=False):
    """Created at the hub, not yet delivered to its agent (for example, the agent is resuming)."""


class IN_PROGRESS(TaskState, value="in_progress", terminal=False):
    """Delivered to the assigned agent, which has not answered yet."""


class COMPLETED(TaskState, value="completed", terminal=True):
    """The agent sent a successful result."""


class FAILED(TaskState, value="failed", terminal=True):
    """The agent sent a failure, or the agent went away for good."""


class TIMEOUT(TaskState, value="timeout", terminal=True):
    """The task's TTL ran out before a result arrived."""


class CANCELLED(TaskState, value="cancelled", terminal=True):
    """The requester (or the hub, shutting a requester's work down) cancelled it."""


StateType = type[TaskState]

STATES: dict[str, StateType] = {
    s.value: s for s in (PENDING, IN_PROGRESS, COMPLETED, FAILED, TIMEOUT, CANCELLED)
}
TERMINAL_STATES: tuple[StateType, ...] = tuple(s for s in STATES.values() if s.terminal)


class TaskEvent(enum.Enum):
    """What can happen to a task."""

    DELIVER = "deliver"  # the task frame was handed to the assigned agent
    COMPLETE = "complete"  # the agent sent success
    FAIL = "fail"  # the agent sent failure, or left for good
    EXPIRE = "expire"  # the TTL ran out
    CANCEL = "cancel"  # the requester cancelled


# The whole state machine. A state missing from the table, or an event missing from a
# state's row, is an illegal transition.
TRANSITIONS: dict[StateType, dict[TaskEvent, StateType]] = {
    PENDING: {
        TaskEvent.DELIVER: IN_PROGRESS,
        TaskEvent.FAIL: FAILED,
        TaskEvent.EXPIRE: TIMEOUT,
        TaskEvent.CANCEL: CANCELLED,
    },
    IN_PROGRESS: {
        TaskEvent.COMPLETE: COMPLETED,
        TaskEvent.FAIL: FAILED,
        TaskEvent.EXPIRE: TIMEOUT,
        TaskEvent.CANCEL: CANCELLED,
    },
}


class IllegalTransition(Exception):
    """`event` is not allowed in `state`; the record was not changed."""

    def __init__(self, state: StateType, event: TaskEvent) -> None:
        super().__init__(f"cannot {event.value} a task that is {state.value}")
        self.state = state
        self.event = event


@attrs.define(kw_only=True, eq=False)
class TaskRecord:
    """One delegated task as the hub knows it.

    `deadline` is on the hub's monotonic clock; `created_at`/`updated_at` are wall-clock
    seconds (for people and the wire). `notified` is true once the requester has been sent
    the task's end.
    """

    task_id: str
    requester: str
    assignee: str
    capability: str
    params: dict[str, Any]
    ttl: float
    deadline: float
    created_at: float
    updated_at: float
    state: StateType = PENDING
    success: bool | None = None
    data: Any = None
    error: str | None = None
    finished_at: float | None = None  # hub monotonic clock, for retention
    ended_by: str | None = None  # who ended it: the assignee's ID, or "hub"
    owed_cancel: str | None = None  # a cancel reason the offline assignee has yet to hear
    notified: bool = False

    @property
    def terminal(self) -> bool:
        return self.state.terminal

    def apply(
        self,
        event: TaskEvent,
        *,
        now: float,
        wall: float,
        success: bool | None = None,
        data: Any = None,
        error: str | None = None,
    ) -> StateType:
        """Move the task by `event`; return the new state.

        Raises `IllegalTransition` (and changes nothing) if the event is not allowed in
        the current state. On reaching a terminal state the outcome fields are set.
        """
        new = TRANSITIONS.get(self.state, {}).get(event)
        if new is None:
            raise IllegalTransition(self.state, event)
        self.state = new
        self.updated_at = wall
        if new.terminal:
            self.finished_at = now
            self.success = success if success is not None else new is COMPLETED
            self.data = data
            self.error = error
        return new


class TaskTable:
    """In-memory task store, indexed by requester and by assignee.

    The hub reaches tasks only through this interface (add/get/update/remove and the two
    indexes), so a durable store can stand in its place later.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, TaskRecord] = {}
        self._by_requester: dict[str, set[str]] = {}
        self._by_assignee: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[TaskRecord]:
        return iter(self._tasks.values())

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._tasks

    def add(self, record: TaskRecord) -> None:
        if record.task_id in self._tasks:
            raise KeyError(f"duplicate task id {record.task_id!r}")
        self._tasks[record.task_id] = record
        self._by_requester.setdefault(record.requester, set()).add(record.task_id)
        self._by_assignee.setdefault(record.assignee, set()).add(record.task_id)

    def get(self, task_id: str) -> TaskRecord | None:
        return self._tasks.get(task_id)

    def update(self, record: TaskRecord) -> None:
        """Persist a change to `record` (a no-op in memory; a durable store writes here)."""

    def remove(self, task_id: str) -> TaskRecord | None:
        record = self._tasks.pop(task_id, None)
        if record is not None:
            _discard(self._by_requester, record.requester, task_id)
            _discard(self._by_assignee, record.assignee, task_id)
        return record

    def of_requester(self, agent_id: str) -> list[TaskRecord]:
        return [self._tasks[t] for t in self._by_requester.get(agent_id, ())]

    def of_assignee(self, agent_id: str) -> list[TaskRecord]:
        return [self._tasks[t] for t in self._by_assignee.get(agent_id, ())]

    def counts(self) -> dict[str, int]:
        """Number of known tasks in each state, every state present."""
        counts = dict.fromkeys(STATES, 0)
        for record in self._tasks.values():
            counts[record.state.value] += 1
        return counts

    def drop_finished(self, before: float) -> int:
        """Remove terminal tasks that finished before `before`; return how many."""
        old = [
            r.task_id
            for r in self._tasks.values()
            if r.finished_at is not None and r.finished_at < before
        ]
        for task_id in old:
            self.remove(task_id)
        return len(old)


def _discard(index: dict[str, set[str]], key: str, task_id: str) -> None:
    ids = index.get(key)
    if ids is not None:
        ids.discard(task_id)
        if not ids:
            del index[key]
