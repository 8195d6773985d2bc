"""Tasks waiting at the hub for an agent with a free slot. Pure.

Each capability has a queue (and each agent one, for tasks sent to it by ID while it is
full). A queue serves its highest priority first; within a priority it takes turns
between requesters (round robin), each requester's tasks first in, first out, so that
no requester can starve the others by sending more.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import attrs

__all__ = ["TO_AGENT", "DispatchQueues", "FairQueue", "Waiting"]

TO_AGENT = "@"  # the key of an agent's own queue (tasks sent to it by ID): "@<agent ID>"


@attrs.define(kw_only=True, eq=False, slots=True)
class Waiting:
    """A task in a queue: `key` names the queue, `seq` is its arrival order (hub-wide)."""

    task_id: str
    requester: str
    priority: int
    key: str
    seq: int


class FairQueue:
    """One queue: per priority level, a turn for each requester with tasks waiting (in
    the order they started waiting), each requester's tasks in arrival order."""

    def __init__(self) -> None:
        # priority -> requester -> task ID -> entry. A dict's order is the rotation: the
        # requester served takes its next turn at the end.
        self._levels: dict[int, dict[str, dict[str, Waiting]]] = {}
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def push(self, entry: Waiting) -> None:
        level = self._levels.setdefault(entry.priority, {})
        level.setdefault(entry.requester, {})[entry.task_id] = entry
        self._len += 1

    def head(self) -> Waiting | None:
        """The entry `pop` would take, or None when empty."""
        if not self._levels:
            return None
        level = self._levels[max(self._levels)]
        mine = next(iter(level.values()))
        return next(iter(mine.values()))

    def pop(self) -> Waiting:
        """Take the next entry: the highest priority's next requester's oldest task."""
        priority = max(self._levels)
        level = self._levels[priority]
        requester, mine = next(iter(level.items()))
        entry = mine.pop(next(iter(mine)))
        del level[requester]
        if mine:
            level[requester] = mine  # its next task waits for its next turn
        elif not level:
            del self._levels[priority]
        self._len -= 1
        return entry

    def remove(self, entry: Waiting) -> None:
        """Take `entry` out (its task ended while waiting); the others keep their turns."""
        level = self._levels[entry.priority]
        mine = level[entry.requester]
        del mine[entry.task_id]
        if not mine:
            del level[entry.requester]
            if not level:
                del self._levels[entry.priority]
        self._len -= 1

    def position(self, entry: Waiting) -> int:
        """Where `entry` stands (1: next), if nothing else arrives meanwhile: every task of
        a higher priority goes first, then turns are taken as `pop` takes them."""
        ahead = sum(
            sum(len(mine) for mine in level.values())
            for priority, level in self._levels.items()
            if priority > entry.priority
        )
        level = self._levels[entry.priority]
        mine = level[entry.requester]
        turn = list(mine).index(entry.task_id)  # its requester's turns before it
        mine_seen = False
        for requester, tasks in level.items():
            if requester == entry.requester:
                mine_seen = True
                ahead += turn
            else:  # a requester before it in the rotation gets one more turn
                ahead += min(len(tasks), turn if mine_seen else turn + 1)
        return ahead + 1


class DispatchQueues:
    """Every queue, by key, and every waiting task, by ID; `bound` entries in all."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._queues: dict[str, FairQueue] = {}
        self._entries: dict[str, Waiting] = {}
        self._arrivals = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._entries

    def __iter__(self) -> Iterator[Waiting]:
        return iter(self._entries.values())

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.bound

    def push(self, key: str, task_id: str, requester: str, priority: int) -> Waiting:
        """Queue a task under `key` (the caller checks `full` first)."""
        self._arrivals += 1
        entry = Waiting(
            task_id=task_id, requester=requester, priority=priority, key=key, seq=self._arrivals
        )
        self._queues.setdefault(key, FairQueue()).push(entry)
        self._entries[task_id] = entry
        return entry

    def discard(self, task_id: str) -> Waiting | None:
        """Take a task out, if it waits; return its entry."""
        entry = self._entries.pop(task_id, None)
        if entry is not None:
            queue = self._queues[entry.key]
            queue.remove(entry)
            if not queue:
                del self._queues[entry.key]
        return entry

    def under(self, key: str) -> list[str]:
        """The IDs of the tasks waiting under `key`."""
        return (
            [e.task_id for e in self._entries.values() if e.key == key]
            if key in self._queues
            else []
        )

    def best(self, keys: Iterable[str]) -> Waiting | None:
        """The next task of the queues `keys`: the highest priority of their heads, then
        the one that arrived first."""
        best: Waiting | None = None
        queues = self._queues
        for key in keys:
            queue = queues.get(key)
            if queue is None:
                continue
            head = queue.head()
            if head is not None and (
                best is None or (head.priority, -head.seq) > (best.priority, -best.seq)
            ):
                best = head
        return best

    def take(self, entry: Waiting) -> None:
        """Remove `entry`, the head of its queue (from `best`), to dispatch it."""
        queue = self._queues[entry.key]
        taken = queue.pop()
        assert taken is entry
        del self._entries[entry.task_id]
        if not queue:
            del self._queues[entry.key]

    def position(self, task_id: str) -> int | None:
        """Where a waiting task stands in its queue (1: next), or None if it does not wait."""
        entry = self._entries.get(task_id)
        return None if entry is None else self._queues[entry.key].position(entry)
