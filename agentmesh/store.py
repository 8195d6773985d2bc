"""Where a hub keeps its state between runs: the interface, its records, the memory store.

A store sees the hub's state as rows. At start the hub reads everything back with `load`
(a `Snapshot`); while it runs it hands each batch of changes to `write` (a `Changes`),
from a worker thread, one batch at a time, and sends what promises durability (the
`delegate` reply, a task's outcome) only once `write` has returned. The rows' times are
on the wall clock (UNIX seconds), so they mean the same thing after a restart.

`MemoryStore` keeps nothing: the default of an embedded `Hub`. `SQLiteStore`
(`agentmesh.sqlite_store`) keeps everything in one SQLite file.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import attrs

__all__ = ["AgentRow", "Changes", "MemoryStore", "Snapshot", "Store", "StoreError", "TaskRow"]


class StoreError(Exception):
    """The store cannot be opened, read or written; the message says why in one line."""


class TaskRow(NamedTuple):
    """One task as stored (a named tuple: a restart reads a million of them).

    `row` is the task table's encoding of the record (see `lifecycle`), `params` the
    parameters as JSON while the task is unfinished (None after). `deadline` is its TTL
    deadline, `finished` when it ended, both wall clock. `owed` is true while the task
    is unfinished or still owed to someone: its outcome to its requester (not yet
    written whole to it: the row says `notified` false) or a cancel to its assignee.
    `priority` is the delegate's, and `queue` names the queue the task waits in at the
    hub for a free agent (None once it has one, or never waited). `owner` is, in a
    cluster, the hub that decides an unfinished stub (None: this hub).
    """

    seq: int
    task_id: str
    requester: str
    assignee: str
    state: str
    row: bytes
    params: bytes | None
    deadline: float | None
    finished: float | None
    owed: bool
    priority: int = 0
    queue: str | None = None
    owner: str | None = None


@attrs.frozen(kw_only=True, slots=True)
class AgentRow:
    """One registered agent: its registration as JSON (`record`), with the SHA-256 of its
    resume token, never the token."""

    agent_id: str
    seq: int
    record: bytes


@attrs.define(kw_only=True)
class Changes:
    """One batch: rows to write (insert or replace) and keys to delete, with the counters.
    `paid` are tasks (by sequence number) now owed to nobody, their outcome written: their
    stored rows say `owed` false from now on, and a row that says so is read back as
    notified."""

    tasks: list[TaskRow] = attrs.Factory(list)
    gone_tasks: list[int] = attrs.Factory(list)
    agents: list[AgentRow] = attrs.Factory(list)
    gone_agents: list[str] = attrs.Factory(list)
    paid: list[int] = attrs.Factory(list)
    counters: dict[str, int] = attrs.Factory(dict)

    def __len__(self) -> int:
        return (
            len(self.tasks)
            + len(self.gone_tasks)
            + len(self.agents)
            + len(self.gone_agents)
            + len(self.paid)
        )


@attrs.define(kw_only=True)
class Snapshot:
    """Everything a store holds. `tasks` are in sequence order, each a `TaskRow` or a
    plain tuple of its fields in that order (a restart reads a million: a tuple each is
    what SQLite hands out)."""

    agents: list[AgentRow] = attrs.Factory(list)
    tasks: list[tuple[Any, ...]] = attrs.Factory(list)
    counters: dict[str, int] = attrs.Factory(dict)


class Store(Protocol):
    """What the hub needs of a store. `load` and `write` block (the hub calls them from a
    worker thread, never two at once) and raise `StoreError`."""

    @property
    def durable(self) -> bool:
        """Whether what is written survives the process; if not, the hub never waits
        for `write` (and never calls it)."""

    def load(self) -> Snapshot:
        """Everything stored, for a hub starting up."""

    def write(self, changes: Changes) -> None:
        """Keep `changes`, all or nothing: once this returns they survive a crash of the
        process. On error nothing of them is kept, and the hub tries the same batch
        again later."""

    def close(self) -> None:
        """Let go of the files (another hub may open them then)."""


class MemoryStore:
    """A store that keeps nothing: the hub's state lives and dies with the process."""

    durable = False

    def load(self) -> Snapshot:
        return Snapshot()

    def write(self, changes: Changes) -> None:
        pass

    def close(self) -> None:
        pass
