"""The task state machine, task records and the task table. Pure: no trio, no sockets.

A task moves PENDING -> IN_PROGRESS -> one of COMPLETED, FAILED, TIMEOUT, CANCELLED.
Every allowed move is one row of `TRANSITIONS`; anything else raises `IllegalTransition`
and leaves the record untouched. Terminal states have no rows, so they are final.
Times are plain floats handed in by the caller (the hub's clock), never read here.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import attrs
import orjson

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


# A finished task at rest: its fields as one JSON array, in this order (the state by its
# value). Bytes hold no references, and a dict of them is not even tracked by the garbage
# collector, so the finished tasks a hub retains cost no collection time.
_ROW_FIELDS = (
    "task_id",
    "requester",
    "assignee",
    "capability",
    "ttl",
    "deadline",
    "created_at",
    "updated_at",
    "state",
    "success",
    "data",
    "error",
    "finished_at",
    "ended_by",
    "owed_cancel",
    "notified",
)
_AT = {name: i for i, name in enumerate(_ROW_FIELDS)}


def _to_row(r: TaskRecord) -> bytes:
    return orjson.dumps(
        (
            r.task_id,
            r.requester,
            r.assignee,
            r.capability,
            r.ttl,
            r.deadline,
            r.created_at,
            r.updated_at,
            r.state.value,
            r.success,
            r.data,
            r.error,
            r.finished_at,
            r.ended_by,
            r.owed_cancel,
            r.notified,
        )
    )


def _from_row(row: bytes) -> TaskRecord:
    fields = dict(zip(_ROW_FIELDS, orjson.loads(row), strict=True))
    fields["state"] = STATES[fields["state"]]
    return TaskRecord(params={}, **fields)  # a finished task's parameters are not kept


class TaskTable:
    """In-memory task store, indexed by requester and by assignee.

    The hub reaches tasks only through this interface, so a durable store can stand in
    its place later; as with such a store, a change to a record counts once it is handed
    to `update`.

    Unfinished tasks are kept as `TaskRecord` objects. A finished task is kept as a row
    (see `_to_row`) until `drop_finished` removes it: a busy hub retains hundreds of
    thousands, and as objects they would make every full garbage collection walk them
    all, a pause of tens of milliseconds. `get` and the queries build a fresh record from
    a row each time; its parameters are not kept.
    """

    def __init__(self) -> None:
        self._live: dict[str, TaskRecord] = {}
        self._done: dict[str, bytes] = {}  # in the order the tasks finished
        self._done_counts: dict[str, int] = dict.fromkeys(STATES, 0)
        # agent ID -> its task IDs (as dict keys: a dict of strings is not tracked either)
        self._by_requester: dict[str, dict[str, None]] = {}
        self._by_assignee: dict[str, dict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._live) + len(self._done)

    def __iter__(self) -> Iterator[TaskRecord]:
        yield from list(self._live.values())
        yield from map(_from_row, list(self._done.values()))

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._live or task_id in self._done

    def add(self, record: TaskRecord) -> None:
        task_id = record.task_id
        if task_id in self:
            raise KeyError(f"duplicate task id {task_id!r}")
        if record.terminal:
            self._store_finished(record)
        else:
            self._live[task_id] = record
        self._by_requester.setdefault(record.requester, {})[task_id] = None
        self._by_assignee.setdefault(record.assignee, {})[task_id] = None

    def get(self, task_id: str) -> TaskRecord | None:
        record = self._live.get(task_id)
        if record is not None:
            return record
        row = self._done.get(task_id)
        return None if row is None else _from_row(row)

    def unfinished(self, task_id: str) -> TaskRecord | None:
        """The task if it has not finished (cheaper than `get` for a finished one)."""
        return self._live.get(task_id)

    def update(self, record: TaskRecord) -> None:
        """Keep the changes made to `record` (a task not in the table is ignored)."""
        task_id = record.task_id
        if record.terminal and (task_id in self._live or task_id in self._done):
            self._store_finished(record)

    def _store_finished(self, record: TaskRecord) -> None:
        if self._live.pop(record.task_id, None) is not None or record.task_id not in self._done:
            self._done_counts[record.state.value] += 1
        self._done[record.task_id] = _to_row(record)  # an update keeps its place in order

    def remove(self, task_id: str) -> TaskRecord | None:
        record = self._live.pop(task_id, None)
        if record is not None:
            self._unindex(task_id, record.requester, record.assignee)
            return record
        row = self._done.get(task_id)
        if row is None:
            return None
        self._forget_finished(orjson.loads(row))
        return _from_row(row)

    def _forget_finished(self, fields: list[Any]) -> None:
        """Remove a finished task, given the fields of its row."""
        task_id = fields[_AT["task_id"]]
        del self._done[task_id]
        self._done_counts[fields[_AT["state"]]] -= 1
        self._unindex(task_id, fields[_AT["requester"]], fields[_AT["assignee"]])

    def _unindex(self, task_id: str, requester: str, assignee: str) -> None:
        for index, agent_id in ((self._by_requester, requester), (self._by_assignee, assignee)):
            ids = index.get(agent_id)
            if ids is not None:
                ids.pop(task_id, None)
                if not ids:
                    del index[agent_id]

    def of_requester(self, agent_id: str, *, finished: bool = True) -> list[TaskRecord]:
        """The tasks `agent_id` asked for; only the unfinished ones unless `finished`."""
        return self._select(self._by_requester.get(agent_id, {}), finished)

    def of_assignee(self, agent_id: str, *, finished: bool = True) -> list[TaskRecord]:
        """The tasks assigned to `agent_id`; only the unfinished ones unless `finished`."""
        return self._select(self._by_assignee.get(agent_id, {}), finished)

    def _select(self, task_ids: Iterable[str], finished: bool) -> list[TaskRecord]:
        live, done = self._live, self._done
        chosen = [live[t] for t in task_ids if t in live]
        if finished:
            chosen += [_from_row(done[t]) for t in task_ids if t in done]
        return chosen

    def owed(self, agent_id: str) -> list[TaskRecord]:
        """Finished tasks with news for `agent_id`: the outcome of a task it asked for and
        has not been told (`notified` false), or a cancel it has yet to hear as the
        assignee (`owed_cancel`)."""
        done = self._done
        owed = {}
        for task_id in self._by_requester.get(agent_id, {}):
            if task_id in done and not orjson.loads(done[task_id])[_AT["notified"]]:
                owed[task_id] = done[task_id]
        for task_id in self._by_assignee.get(agent_id, {}):
            if task_id in done and orjson.loads(done[task_id])[_AT["owed_cancel"]] is not None:
                owed[task_id] = done[task_id]
        return [_from_row(row) for row in owed.values()]

    def counts(self) -> dict[str, int]:
        """Number of known tasks in each state, every state present."""
        counts = dict(self._done_counts)
        for record in self._live.values():
            counts[record.state.value] += 1
        return counts

    def drop_finished(self, before: float, limit: int | None = None) -> int:
        """Remove tasks that finished before `before` (on the clock that `apply` was
        given, which must be monotonic), at most `limit` of them; return how many.
        Costs what it removes: the oldest come first."""
        old: list[list[Any]] = []
        for row in self._done.values():
            if limit is not None and len(old) >= limit:
                break
            fields = orjson.loads(row)
            finished_at = fields[_AT["finished_at"]]
            if finished_at is None:
                continue  # a record made finished by hand, without a time: kept
            if finished_at >= before:
                break
            old.append(fields)
        for fields in old:
            self._forget_finished(fields)
        return len(old)
