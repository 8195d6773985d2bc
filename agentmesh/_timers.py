"""The router's deadlines: task TTLs and resume grace periods, in one heap. Pure.

A timer is `(when, kind, key)`. Timers are never cancelled: one that can no longer fire
(its task ended early, its agent came back) stays in the heap, and the caller checks
when it comes up. So that the heap stays proportional to what is pending rather than to
the task rate, the timers that `still_pending` says are dead are shed whenever the heap
has doubled since the last shedding: O(1) per timer.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterator

__all__ = ["Timers"]

_MIN_SHED = 1024  # timers held before those that cannot fire are shed


class Timers:
    """A heap of `(when, kind, key)`; `still_pending(when, kind, key)` tells a live one."""

    def __init__(self, still_pending: Callable[[float, str, str], bool]) -> None:
        self._still_pending = still_pending
        self._heap: list[tuple[float, int, str, str]] = []
        self._seq = itertools.count()
        self._shed_at = _MIN_SHED

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator[tuple[float, str, str]]:
        """Every timer held, live or not, in no order."""
        return ((when, kind, key) for when, _, kind, key in self._heap)

    def next_deadline(self) -> float:
        return self._heap[0][0] if self._heap else float("inf")

    def add(self, when: float, kind: str, key: str) -> bool:
        """Hold a timer; whether it is now the earliest."""
        heap = self._heap
        earliest = not heap or when < heap[0][0]
        heapq.heappush(heap, (when, next(self._seq), kind, key))
        if len(heap) >= self._shed_at:
            self._shed()
        return earliest

    def due(self, now: float) -> Iterator[tuple[str, str]]:
        """Take the timers whose time has come, earliest first, as `(kind, key)`. Timers
        added while iterating are taken too if they are due."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, kind, key = heapq.heappop(heap)
            yield kind, key

    def _shed(self) -> None:
        pending = self._still_pending
        live = [entry for entry in self._heap if pending(entry[0], entry[2], entry[3])]
        heapq.heapify(live)
        self._heap = live
        self._shed_at = max(2 * len(live), _MIN_SHED)
