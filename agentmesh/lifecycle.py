"""The task state machine, task records and the task table. Pure: no trio, no sockets.

A task moves PENDING -> IN_PROGRESS -> one of COMPLETED, FAILED, TIMEOUT, CANCELLED.
Every allowed move is one row of `TRANSITIONS`; anything else raises `IllegalTransition`
and leaves the record untouched. Terminal states have no rows, so they are final.
Times are plain floats handed in by the caller (the hub's clock), never read here.
"""

from __future__ import annotations

import enum
import math
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, ClassVar

import attrs
import orjson

from ._journal import Journal
from .store import TaskRow

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
    "from_row",
    "make_cursor",
    "read_cursor",
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

    # Members are singletons compared by identity, so identity's hash is as good as
    # Enum's (the hash of the name), which is Python code: a call per `TRANSITIONS`
    # lookup, two per delegation.
    __hash__ = object.__hash__


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
    the task's end. `traceparent`/`tracestate` are kept with the task, finished or not,
    so that every frame about it carries them.
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
    traceparent: str | None = None  # the W3C trace context its delegate carried
    tracestate: str | None = None
    owed_cancel: str | None = None  # a cancel reason the offline assignee has yet to hear
    notified: bool = False
    # The trace context to send the assignee instead (a tracing hub's routing span's);
    # never stored: after a restart the assignee gets the delegate's.
    forward_trace: tuple[str, str | None] | None = None
    priority: int = 0  # the delegate's: higher waits less for a free agent
    queue: str | None = None  # the queue it waits in for a free agent (assignee "")
    # In a cluster: the hub that owns (decides) the task, None for this one. A task with
    # an owner is a *stub*: its assignee is here, its requester on the owner.
    owner: str | None = None
    # The owner's `task` message is not yet answered by the assignee's hub; on a stub,
    # its `delivered` message is not yet answered by the owner. Never stored: a finished
    # stub's unanswered result is held in the table (`hold`) until its owner answers.
    owed_delivery: bool = False

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
        moves = TRANSITIONS.get(self.state)
        new = None if moves is None else moves.get(event)
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


# A task at rest: its fields as one JSON array, in this order (the state first, by its
# value, so that a state filter reads only a row's first bytes; `notified` last, so that
# whether it is owed shows in its last bytes). Bytes hold no references, and a dict of
# them is not even tracked by the garbage collector, so the finished tasks a hub retains
# cost no collection time. A row holds no time on the monotonic clock (which means
# nothing after a restart): a durable store keeps the same bytes.
_ROW_FIELDS = (
    "state",
    "task_id",
    "requester",
    "assignee",
    "capability",
    "ttl",
    "created_at",
    "updated_at",
    "success",
    "data",
    "error",
    "ended_by",
    "traceparent",
    "tracestate",
    "owed_cancel",
    "notified",
)
_AT = {name: i for i, name in enumerate(_ROW_FIELDS)}
_STATE_PREFIX = {value: orjson.dumps([value])[:-1] for value in STATES}  # b'["completed"'
_PAID = b",null,true]"  # how a row ends when nothing about it is owed to anyone
# The unfinished states' values, read on every task's moves: an attribute of a class
# costs a full lookup each time (Python 3.11 does not specialise it).
_PENDING, _IN_PROGRESS = PENDING.value, IN_PROGRESS.value

# What `retained_bytes` counts for a finished task besides its row: its ID, its sequence
# number and its entries in the table's dicts and arrays (measured: see test_retention.py).
ROW_OVERHEAD = 340
SCAN_BUDGET = 5_000  # tasks `page` looks at, at most, for one page
_BLOCK = 256  # sequence numbers per block of `_Order`


def _to_row(r: TaskRecord) -> bytes:
    row = orjson.dumps(
        (
            r.state.value,
            r.task_id,
            r.requester,
            r.assignee,
            r.capability,
            r.ttl,
            r.created_at,
            r.updated_at,
            r.success,
            r.data,
            r.error,
            r.ended_by,
            r.traceparent,
            r.tracestate,
            r.owed_cancel,
            r.notified,
        )
    )
    # orjson returns its whole working buffer (4 KiB at least) behind a short object; a
    # copy holds only the row. A join of two parts always copies (one part would be
    # handed back as it is), and costs a third of `bytes(memoryview(row))`.
    return b"".join((row, b""))


def from_row(row: bytes, params: dict[str, Any] | None = None, deadline: float = 0.0) -> TaskRecord:
    """The record a row holds. A finished task's parameters are not kept, nor its
    monotonic times (`deadline` 0, `finished_at` None)."""
    fields = dict(zip(_ROW_FIELDS, orjson.loads(row), strict=True))
    fields["state"] = STATES[fields["state"]]
    return TaskRecord(params=params or {}, deadline=deadline, **fields)


def _unsent(row: bytes) -> bytes:
    """`row` with `notified` false: its outcome was queued, and is not yet written."""
    return row[:-5] + b"false]" if row.endswith(b"true]") else row


def make_cursor(kind: str, position: int) -> str:
    """An opaque paging cursor: a letter for what it pages through, then a position."""
    return f"{kind}{position}"


def read_cursor(kind: str, cursor: str | None) -> int | None:
    """The position in a cursor from `make_cursor(kind, ...)`; None for no cursor.
    Raises ValueError (with a sentence for the client) for anything else."""
    if cursor is None:
        return None
    digits = cursor[1:]
    if cursor[:1] != kind or not (digits.isascii() and digits.isdigit()) or len(digits) > 18:
        raise ValueError(
            f"{cursor[:40]!r} is not a cursor from this reply type; pass the next_cursor "
            "of an earlier reply unchanged"
        )
    return int(digits)


class _Order:
    """Integers added in increasing order, read newest first from any point.

    Kept in blocks of `_BLOCK` consecutive numbers (arrays: nothing for the garbage
    collector to walk). Removal is lazy: a block is compacted once half of it is gone, so
    it costs O(1) amortised and never more than one block's work at a time.
    """

    def __init__(self) -> None:
        self._blocks: dict[int, array[int]] = {}
        self._gone: dict[int, int] = {}  # block -> entries removed since it was compacted
        self._keys: array[int] = array("q")  # block numbers, ascending; some may be empty
        self._empty = 0  # how many of `_keys` name no block any more

    def add(self, n: int) -> None:
        key = n // _BLOCK
        block = self._blocks.get(key)
        if block is None:
            block = self._blocks[key] = array("q")
            if self._keys and self._keys[-1] == key:  # emptied, not yet compacted away
                self._empty -= 1
            else:
                self._keys.append(key)
        block.append(n)

    def extend(self, numbers: Sequence[int]) -> None:
        """`add` each of `numbers` (ascending, all above those added so far), a block at
        a time."""
        start = 0
        while start < len(numbers):
            key = numbers[start] // _BLOCK
            end = bisect_left(numbers, (key + 1) * _BLOCK, start)
            block = self._blocks.get(key)
            if block is None:
                if self._keys and self._keys[-1] == key:  # emptied, not yet compacted away
                    self._empty -= 1
                else:
                    self._keys.append(key)
                block = self._blocks[key] = array("q")
            block.extend(numbers[start:end])
            start = end

    def discard(self, n: int, exists: Callable[[int], bool]) -> None:
        """`n` is gone (`exists(n)` is already false)."""
        key = n // _BLOCK
        gone = self._gone.get(key, 0) + 1
        block = self._blocks[key]
        if 2 * gone < len(block):
            self._gone[key] = gone
            return
        self._gone.pop(key, None)
        kept = array("q", filter(exists, block))
        if kept:
            self._blocks[key] = kept
            return
        del self._blocks[key]
        self._empty += 1
        if 2 * self._empty > len(self._keys):
            self._keys = array("q", filter(self._blocks.__contains__, self._keys))
            self._empty = 0

    def below(self, before: int | None) -> Iterator[int]:
        """The numbers under `before` (all if None), newest first; some may be gone."""
        keys, blocks = self._keys, self._blocks
        end = len(keys) if before is None else bisect_right(keys, (before - 1) // _BLOCK)
        for i in range(end - 1, -1, -1):
            block = blocks.get(keys[i])
            if block is not None:
                top = len(block) if before is None else bisect_left(block, before)
                for j in range(top - 1, -1, -1):
                    yield block[j]


class _Fifo:
    """(sequence number, time) pairs, first in first out, in two arrays."""

    def __init__(self) -> None:
        self._seqs: array[int] = array("q")
        self._times: array[float] = array("d")
        self._head = 0

    def __len__(self) -> int:
        return len(self._seqs) - self._head

    def push(self, seq: int, at: float) -> None:
        self._seqs.append(seq)
        self._times.append(at)

    def extend(self, seqs: Sequence[int], times: Sequence[float]) -> None:
        self._seqs.extend(seqs)
        self._times.extend(times)

    def peek(self) -> tuple[int, float]:
        return self._seqs[self._head], self._times[self._head]

    def newest(self, since: float) -> Iterator[int]:
        """The sequence numbers pushed at `since` or later, the newest first. Times come
        in order, but for those with none (-inf: a task added already finished, such as
        one adopted from another hub's row), which are passed over."""
        seqs, times = self._seqs, self._times
        for i in range(len(seqs) - 1, self._head - 1, -1):
            at = times[i]
            if at >= since:
                yield seqs[i]
            elif at != -math.inf:
                return

    def pop(self) -> tuple[int, float]:
        first = self.peek()
        self._head += 1
        if self._head >= 1024 and 2 * self._head >= len(self._seqs):
            del self._seqs[: self._head], self._times[: self._head]
            self._head = 0
        return first


class TaskTable:
    """In-memory task store, indexed by requester and by assignee, with bounded retention.

    The hub reaches tasks only through this interface, so a durable store can stand in
    its place later; as with such a store, a change to a record counts once it is handed
    to `add` or `update`.

    Every task gets a sequence number when added: the order of `page` and its cursors.
    Unfinished tasks are kept as `TaskRecord` objects. A finished task is kept as a row
    (see `_to_row`): a busy hub retains hundreds of thousands, and as objects they would
    make every full garbage collection walk them all, a pause of tens of milliseconds.
    `get` and the queries build a fresh record from a row each time; its parameters are
    not kept.

    Finished tasks are retained for at most `max_retained_tasks` tasks and
    `max_retained_bytes` bytes (`retained_bytes`): storing a finished task drops the
    oldest finished (in finishing order) past either bound, at once. A task still owed
    to someone, its outcome not yet delivered (`notified` false, or on its way: see
    `hold`) or a cancel owed to its assignee (`owed_cancel`), is never dropped for room;
    it counts against the bounds, and is dropped only by age. With `retention`, each
    task that finishes also drops up to two tasks that finished more than `retention`
    earlier; `drop_finished` drops the rest.

    With a `journal`, every task added, changed or removed is marked there, for a
    durable store (see `rows`).
    """

    def __init__(
        self,
        *,
        max_retained_tasks: int = 200_000,
        max_retained_bytes: int = 128 << 20,
        retention: float | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.max_retained_tasks = max_retained_tasks
        self.max_retained_bytes = max_retained_bytes
        self.retention = retention
        self.journal = journal
        self._next_seq = 0
        self._seq_of: dict[str, int] = {}  # task ID -> sequence number, every task
        self._live: dict[int, TaskRecord] = {}
        self._rows: dict[int, bytes] = {}  # finished tasks
        # Finished tasks still owed to someone -> their finishing time once making room
        # has set them aside (None before).
        self._held: dict[int, float | None] = {}
        self._in_flight: dict[int, int] = {}  # outcomes on their way (see `hold`) -> count
        self._aside_at: dict[int, float] = {}  # those of them room set aside -> finish time
        # In a cluster, finished stubs whose result is on its way to their owner -> the
        # owner (a finished row keeps no owner: this says whose row it is meanwhile).
        self._stub_owners: dict[int, str] = {}
        self._bytes = 0
        # state -> the sequence numbers of the tasks in it (an index for `page`, `counts`)
        self._by_state: dict[str, dict[int, None]] = {state: {} for state in STATES}
        # agent ID -> the sequence numbers of its tasks (dict keys: an untracked dict)
        self._by_requester: dict[str, dict[int, None]] = {}
        self._by_assignee: dict[str, dict[int, None]] = {}
        self._order = _Order()  # every task, in the order added
        self._finished = _Fifo()  # finishing order: what room and age take
        self._aside = _Fifo()  # held tasks that making room passed over (age takes them)
        self._released = _Fifo()  # tasks set aside, then no longer owed: room takes first

    def __len__(self) -> int:
        return len(self._live) + len(self._rows)

    def __iter__(self) -> Iterator[TaskRecord]:
        """Every task, the unfinished first: for tests and tools. It copies the whole
        table, so no request uses it (they use `page`)."""
        yield from list(self._live.values())
        yield from map(from_row, list(self._rows.values()))

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._seq_of

    @property
    def retained_bytes(self) -> int:
        """What the finished tasks count against `max_retained_bytes`: the length of each
        one's row plus `ROW_OVERHEAD`."""
        return self._bytes

    def add(self, record: TaskRecord) -> None:
        task_id = record.task_id
        if task_id in self._seq_of:
            raise KeyError(f"duplicate task id {task_id!r}")
        seq = self._next_seq
        self._next_seq += 1
        self._seq_of[task_id] = seq
        self._order.add(seq)
        # Not `setdefault(agent_id, {})`: that makes a dict per task, to throw away.
        mine = self._by_requester.get(record.requester)
        if mine is None:
            mine = self._by_requester[record.requester] = {}
        mine[seq] = None
        mine = self._by_assignee.get(record.assignee)
        if mine is None:
            mine = self._by_assignee[record.assignee] = {}
        mine[seq] = None
        if record.state.terminal:  # not `record.terminal`: a property costs a call
            self._store_finished(seq, record)
        else:
            self._live[seq] = record
            self._by_state[record.state.value][seq] = None
        if self.journal is not None:
            self.journal.task(seq)

    def get(self, task_id: str) -> TaskRecord | None:
        seq = self._seq_of.get(task_id)
        if seq is None:
            return None
        record = self._live.get(seq)
        return record if record is not None else from_row(self._rows[seq])

    def unfinished(self, task_id: str) -> TaskRecord | None:
        """The task if it has not finished (cheaper than `get` for a finished one)."""
        seq = self._seq_of.get(task_id)
        return None if seq is None else self._live.get(seq)

    def assign(self, record: TaskRecord, agent_id: str) -> None:
        """Give `record` (an unfinished task in the table, waiting for an agent) to
        `agent_id`; the caller keeps the change with `update`."""
        seq = self._seq_of[record.task_id]
        mine = self._by_assignee[record.assignee]
        del mine[seq]
        if not mine:
            del self._by_assignee[record.assignee]
        record.assignee = agent_id
        self._by_assignee.setdefault(agent_id, {})[seq] = None

    def update(self, record: TaskRecord) -> None:
        """Keep the changes made to `record` (a task not in the table is ignored)."""
        seq = self._seq_of.get(record.task_id)
        if seq is not None:
            if record.state.terminal:
                self._store_finished(seq, record)
            else:  # pending -> in progress is the only move between unfinished states
                states = self._by_state
                states[_PENDING].pop(seq, None)
                states[record.state.value][seq] = None
            if self.journal is not None:
                self.journal.task(seq)

    def _store_finished(self, seq: int, record: TaskRecord) -> None:
        row = _to_row(record)
        old = self._rows.get(seq)
        self._rows[seq] = row
        at = -math.inf if record.finished_at is None else record.finished_at
        owes = not record.notified or record.owed_cancel is not None
        held = self._held
        if owes:
            held.setdefault(seq, None)
        if old is None:
            self._live.pop(seq, None)
            states = self._by_state
            states[_PENDING].pop(seq, None)
            states[_IN_PROGRESS].pop(seq, None)
            states[record.state.value][seq] = None
            self._bytes += len(row) + ROW_OVERHEAD
            self._finished.push(seq, at)
            if self.retention is not None:
                self.drop_finished(at - self.retention, limit=2)
        else:
            self._bytes += len(row) - len(old)  # an update keeps its place in order
            aside = None if owes else held.pop(seq, None)
            if aside is not None:  # set aside, now it may go for room
                self._released.push(seq, aside)
        if len(self._rows) > self.max_retained_tasks or self._bytes > self.max_retained_bytes:
            self._make_room()

    def _make_room(self) -> None:
        """Drop the oldest finished tasks until both bounds hold (or only held tasks are
        left); each task passes through here once, so O(1) amortised."""
        rows, held = self._rows, self._held
        for fifo in (self._released, self._finished):
            while fifo and (
                len(rows) > self.max_retained_tasks or self._bytes > self.max_retained_bytes
            ):
                seq, at = fifo.pop()
                if seq in held:
                    held[seq] = at
                    self._aside.push(seq, at)
                elif seq in self._in_flight:
                    self._aside_at[seq] = at
                    self._aside.push(seq, at)
                elif seq in rows:
                    self._forget(seq)

    def hold(self, task_id: str, *, owner: str | None = None) -> None:
        """The task's outcome is on its way to its requester (queued, not yet written),
        or to its `owner` (a stub's, in a cluster): it is not dropped for room until as
        many `release`s as `hold`s."""
        seq = self._seq_of.get(task_id)
        if seq is not None:
            self._in_flight[seq] = self._in_flight.get(seq, 0) + 1
            if owner is not None:
                self._stub_owners[seq] = owner

    def stub_owner(self, task_id: str, owner: str) -> None:
        """A finished stub's result, on its way (`hold`), goes to `owner` now (its
        requester moved there): its stored row says so from the next commit."""
        seq = self._seq_of.get(task_id)
        if seq is not None and seq in self._stub_owners:
            self._stub_owners[seq] = owner
            if self.journal is not None:
                self.journal.task(seq)

    def release(self, task_id: str, *, written: bool = False) -> None:
        """The outcome `hold` kept the task for was `written` (whole, to its requester's
        socket), or will not be."""
        seq = self._seq_of.get(task_id)
        if seq is None or seq not in self._in_flight:
            return
        if written and self.journal is not None:  # the stored row may say so now
            self.journal.outcome_written(seq)
        holds = self._in_flight[seq]
        if holds > 1:  # another copy is still on its way (on a newer connection)
            self._in_flight[seq] = holds - 1
            return
        del self._in_flight[seq]
        self._stub_owners.pop(seq, None)
        at = self._aside_at.pop(seq, None)
        if at is not None and seq not in self._held and seq in self._rows:
            self._released.push(seq, at)  # set aside meanwhile: room may take it now
            self._make_room()

    def remove(self, task_id: str) -> TaskRecord | None:
        seq = self._seq_of.get(task_id)
        if seq is None:
            return None
        record = self._live.pop(seq, None)
        if record is not None:
            if self.journal is not None:
                self.journal.task_gone(seq)
            self._by_state[record.state.value].pop(seq, None)
            self._unindex(seq, task_id, record.requester, record.assignee)
            return record
        record = from_row(self._rows[seq])
        self._forget(seq)
        return record

    def _forget(self, seq: int) -> None:
        """Remove a finished task."""
        if self.journal is not None:
            self.journal.task_gone(seq)
        row = self._rows.pop(seq)
        self._held.pop(seq, None)
        self._in_flight.pop(seq, None)
        self._aside_at.pop(seq, None)
        self._stub_owners.pop(seq, None)
        self._bytes -= len(row) + ROW_OVERHEAD
        fields = orjson.loads(row)
        self._by_state[fields[_AT["state"]]].pop(seq, None)
        self._unindex(
            seq, fields[_AT["task_id"]], fields[_AT["requester"]], fields[_AT["assignee"]]
        )

    def _unindex(self, seq: int, task_id: str, requester: str, assignee: str) -> None:
        del self._seq_of[task_id]
        for index, agent_id in ((self._by_requester, requester), (self._by_assignee, assignee)):
            seqs = index.get(agent_id)
            if seqs is not None:
                seqs.pop(seq, None)
                if not seqs:
                    del index[agent_id]
        self._order.discard(seq, self._exists)

    def _exists(self, seq: int) -> bool:
        return seq in self._live or seq in self._rows

    def of_requester(self, agent_id: str, *, finished: bool = True) -> list[TaskRecord]:
        """The tasks `agent_id` asked for; only the unfinished ones unless `finished`."""
        return self._select(self._by_requester.get(agent_id, {}), finished)

    def of_assignee(self, agent_id: str, *, finished: bool = True) -> list[TaskRecord]:
        """The tasks assigned to `agent_id`; only the unfinished ones unless `finished`."""
        return self._select(self._by_assignee.get(agent_id, {}), finished)

    def _select(self, seqs: Iterable[int], finished: bool) -> list[TaskRecord]:
        live, rows = self._live, self._rows
        chosen = [live[s] for s in seqs if s in live]
        if finished:
            chosen += [from_row(rows[s]) for s in seqs if s in rows]
        return chosen

    def finished_since(self, agent_id: str, since: float) -> list[TaskRecord]:
        """The tasks `agent_id` asked for that finished at `since` or later (the hub's
        clock), the newest first: O(the tasks finished since), not O(those retained)."""
        mine, rows = self._by_requester.get(agent_id, {}), self._rows
        return [from_row(rows[s]) for s in self._finished.newest(since) if s in mine and s in rows]

    def owed(self, agent_id: str) -> list[TaskRecord]:
        """Finished tasks with news for `agent_id`: the outcome of a task it asked for and
        has not been told (`notified` false), or a cancel it has yet to hear as the
        assignee (`owed_cancel`)."""
        held, rows = self._held, self._rows
        owed: dict[int, TaskRecord] = {}
        for seq in self._by_requester.get(agent_id, {}):
            if seq in held:
                record = from_row(rows[seq])
                if not record.notified:
                    owed[seq] = record
        for seq in self._by_assignee.get(agent_id, {}):
            if seq in held and seq not in owed:
                record = from_row(rows[seq])
                if record.owed_cancel is not None:
                    owed[seq] = record
        return list(owed.values())

    def counts(self) -> dict[str, int]:
        """Number of known tasks in each state, every state present."""
        return {state: len(seqs) for state, seqs in self._by_state.items()}

    def drop_finished(self, before: float, limit: int | None = None) -> int:
        """Remove tasks that finished before `before` (on the clock that `apply` was
        given, which must be monotonic), at most `limit` of them; return how many. Age
        takes held tasks too: nobody can still resume to collect them once `retention`
        (at least the resume grace) is up. Costs what it removes: the oldest come first."""
        dropped = 0
        for fifo in (self._released, self._finished, self._aside):
            while fifo and (limit is None or dropped < limit):
                seq, at = fifo.peek()
                if seq in self._rows:
                    if at >= before:
                        break
                    self._forget(seq)
                    dropped += 1
                fifo.pop()
        return dropped

    def page(
        self,
        *,
        of: str | None = None,
        requester: str | None = None,
        assignee: str | None = None,
        state: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
        scan: int = SCAN_BUDGET,
    ) -> tuple[list[tuple[str, TaskRecord]], str | None]:
        """Up to `limit` tasks, newest first (in the order added), from where `cursor`
        (from an earlier page) left off, with every filter that is set: `of` asked for
        or was given them, `requester` asked for them, `assignee` was given them, they
        are in `state`.

        Each task comes with the cursor that resumes the listing at it (for a caller that
        sends fewer); the second value resumes after the last, or is None when no task is
        left. Tasks added after the first page are not listed; none is listed twice or
        skipped. Reads through the indexes: the smallest of the filters' sets of tasks,
        sorted, when it holds at most `scan` tasks; else the order of all, skipping those
        that do not match. Looks at `scan` tasks at most, so a page may hold fewer than
        `limit` tasks and still a cursor. Raises ValueError for a cursor `page` did not
        make.
        """
        before = read_cursor("t", cursor)
        # Each filter as the sets of tasks it accepts: a task matches one of its sets.
        filters: list[tuple[dict[int, None], ...]] = []
        if of is not None:
            filters.append((self._by_requester.get(of, {}), self._by_assignee.get(of, {})))
        if requester is not None:
            filters.append((self._by_requester.get(requester, {}),))
        if assignee is not None:
            filters.append((self._by_assignee.get(assignee, {}),))
        if state is not None:
            filters.append((self._by_state[state],))
        candidates: Iterable[int]
        narrowest = min(filters, key=lambda sets: sum(map(len, sets)), default=None)
        if narrowest is not None and sum(map(len, narrowest)) <= scan:  # few: sort them
            filters.remove(narrowest)
            seqs = sorted(set().union(*narrowest) if len(narrowest) > 1 else narrowest[0])
            candidates = reversed(
                seqs[: len(seqs) if before is None else bisect_left(seqs, before)]
            )
        else:  # many: walk the order, skipping what does not match
            candidates = self._order.below(before)
        live, rows = self._live, self._rows
        found: list[tuple[str, TaskRecord]] = []
        for looked, seq in enumerate(candidates):
            if looked == scan:
                return found, make_cursor("t", seq + 1)
            if not all(any(seq in s for s in sets) for sets in filters):
                continue
            record = live.get(seq)
            if record is None:
                row = rows.get(seq)
                if row is None:
                    continue
                record = from_row(row)
            found.append((make_cursor("t", seq + 1), record))
            if len(found) == limit:
                return found, make_cursor("t", seq)
        return found, None

    # ---------------------------------------------------------------------------------
    # A durable store's side: rows out, rows back in

    def rows(self, seqs: Iterable[int], to_wall: Callable[[float], float]) -> list[TaskRow]:
        """The tasks `seqs` (from the journal) as stored rows; those gone meanwhile are
        left out. An outcome queued but not yet written is stored as not notified, so
        that it is sent again if the hub dies before it is. `to_wall` turns a monotonic
        time into wall-clock time."""
        out: list[TaskRow] = []
        live, rows, in_flight = self._live, self._rows, self._in_flight
        for seq in seqs:
            record = live.get(seq)
            if record is not None:
                out.append(
                    TaskRow(
                        seq=seq,
                        task_id=record.task_id,
                        requester=record.requester,
                        assignee=record.assignee,
                        state=record.state.value,
                        row=_to_row(record),
                        params=orjson.dumps(record.params),
                        deadline=to_wall(record.deadline),
                        finished=None,
                        owed=True,
                        priority=record.priority,
                        queue=record.queue,
                        owner=record.owner,
                    )
                )
                continue
            row = rows.get(seq)
            if row is None:
                continue
            if seq in in_flight:
                row = _unsent(row)
            fields = orjson.loads(row)
            out.append(
                TaskRow(
                    seq=seq,
                    task_id=fields[_AT["task_id"]],
                    requester=fields[_AT["requester"]],
                    assignee=fields[_AT["assignee"]],
                    state=fields[_AT["state"]],
                    row=row,
                    params=None,
                    deadline=None,
                    finished=fields[_AT["updated_at"]],
                    owed=not row.endswith(_PAID),
                    owner=self._stub_owners.get(seq),
                )
            )
        return out

    def paid(self, seqs: Iterable[int]) -> list[int]:
        """Those of `seqs` (written outcomes, from the journal) whose task is owed to
        nobody now: a store marks their rows so (`Changes.paid`) without writing them
        again."""
        rows, in_flight = self._rows, self._in_flight
        return [s for s in seqs if s not in in_flight and rows.get(s, b"").endswith(_PAID)]

    def restore(
        self, rows: Sequence[tuple[Any, ...]], to_clock: Callable[[float], float]
    ) -> list[tuple[str, str]]:
        """Fill an empty table from stored rows: tuples in `TaskRow`'s field order, in
        sequence order. `to_clock` turns a wall-clock time into a monotonic one.
        Retention bounds are applied once, at the end. (A restart reads every retained
        task back, a million say: one tight loop.) Returns the finished stubs whose
        result was on its way to their owner, as (task ID, owner): to send again."""
        if self._seq_of:
            raise RuntimeError("restore fills an empty table")
        seq_of, live, done, held = self._seq_of, self._live, self._rows, self._held
        by_requester, by_assignee, by_state = self._by_requester, self._by_assignee, self._by_state
        seqs: array[int] = array("q")
        ends: list[tuple[float, int]] = []
        stubs: list[tuple[str, str]] = []
        size = 0
        for (
            seq,
            task_id,
            requester,
            assignee,
            state,
            blob,
            params,
            deadline,
            end,
            owed,
            *more,
        ) in rows:
            seqs.append(seq)
            seq_of[task_id] = seq
            mine = by_requester.get(requester)
            if mine is None:
                mine = by_requester[requester] = {}
            mine[seq] = None
            mine = by_assignee.get(assignee)
            if mine is None:
                mine = by_assignee[assignee] = {}
            mine[seq] = None
            by_state[state][seq] = None
            if end is None:
                record = from_row(blob, orjson.loads(params or b"{}"), to_clock(deadline))
                if more:  # written since priorities and queues (store version 4)
                    record.priority, record.queue = more[0], more[1]
                    if len(more) > 2:  # and stubs' owners (version 5)
                        record.owner = more[2]
                live[seq] = record
                continue
            if owed:
                held[seq] = None
                if len(more) > 2 and more[2] is not None:  # a stub's, to its owner
                    stubs.append((task_id, more[2]))
            elif not blob.endswith(_PAID):  # stored while on its way, marked paid since
                blob = blob[:-6] + b"true]"
            done[seq] = blob
            size += len(blob)
            ends.append((end, seq))
        if not seqs:
            return stubs
        self._order.extend(seqs)
        self._next_seq = seqs[-1] + 1
        self._bytes = size + ROW_OVERHEAD * len(done)
        ends.sort()  # nearly sorted already: tasks finish about in the order they came
        offset = to_clock(0.0)
        self._finished.extend([s for _, s in ends], [e + offset for e, _ in ends])
        if len(done) > self.max_retained_tasks or self._bytes > self.max_retained_bytes:
            self._make_room()
        return stubs
