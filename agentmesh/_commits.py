"""Group commit: the router's changes written in batches, off the event loop. Trio layer.

While a batch is being written (in a worker thread), the router goes on routing; what
it changes meanwhile makes the next batch. A frame that promises durability (the
`delegate` reply, a task handed to its agent, an outcome) is held by its connection,
tagged with the batch collecting when it was sent, and goes out once that batch is
committed (`Commits.release`). If the store fails, the same batch is tried again, ever
less often, and meanwhile the router refuses new work (`Router.store_error`); nothing
held is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio

from .routing import Router
from .store import Changes, Store, StoreError

__all__ = ["Commits"]

log = logging.getLogger("agentmesh.hub")

_RETRY_FIRST = 0.05  # seconds before a failed batch is tried again; doubles each time
_RETRY_MOST = 5.0


class Holder(Protocol):
    """A connection with frames held for a commit."""

    def release(self, committed: int) -> bool:
        """Send the frames held for batches up to `committed`; whether some are left."""


class Commits:
    """The batches of one hub and the connections holding frames for them.

    `batch` numbers the batch collecting now; `committed` the last one written.
    """

    def __init__(self, router: Router, store: Store, *, on_released: Callable[[Any], None]):
        self.router = router
        self.store = store
        self.batch = 1
        self.committed = 0
        self._on_released = on_released
        self._holders: dict[Holder, None] = {}
        self._unwritten: Changes | None = None  # a batch taken and not yet written
        self._wanted = trio.Event()
        self._done = trio.Event()  # set after each commit
        # In a cluster, the last step of each commit: the batch's task rows to the tasks
        # bucket (`Cluster.replicate`), awaited before the frames go out; true if
        # another commit should follow soon, for rows still to write (`TaskRows.write`).
        self.replicate: Callable[[Changes], Awaitable[bool]] | None = None

    def wake(self) -> None:
        """Something changed or was held: a commit is wanted."""
        self._wanted.set()

    def holding(self, holder: Holder) -> None:
        """`holder` has held a frame for the current batch."""
        self._holders[holder] = None
        self._wanted.set()

    def forget(self, holder: Holder) -> None:
        """`holder` closed: what it held is not sent."""
        self._holders.pop(holder, None)

    async def run(self) -> None:
        """Commit batch after batch, forever. Cancellation waits for a write in progress
        to end (a commit takes milliseconds); its frames stay held."""
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            await self._commit()

    async def settle(self) -> None:
        """Wait until everything changed or held before the call is committed and sent
        (for a graceful shutdown: frames go out before the 1001 close)."""
        target = self.batch
        while self.committed < target:
            self._wanted.set()
            done = self._done
            await done.wait()

    async def final(self) -> None:
        """Write what is left, after the last connection closed, trying again while the
        store fails, and replicate it (in a cluster, for the hubs that take over this
        one's requesters); cancel it (a deadline) to give up. Nothing is sent any more,
        so nothing waits for it but the file and the tasks bucket."""
        if self._unwritten is not None:  # the batch that was failing, first
            await self._write(self._unwritten)
            if self.replicate is not None:
                await self.replicate(self._unwritten)
            self._unwritten = None
        changes = self.router.take_changes()
        if len(changes):
            await self._write(changes)
        if self.replicate is not None:
            more = await self.replicate(changes)
            while more:  # a backlog from an outage, all of it
                more = await self.replicate(Changes())

    async def _write(self, changes: Changes) -> None:
        """`store.write` in a worker thread, again and again while it fails (less and
        less often), with `router.store_error` set meanwhile."""
        router = self.router
        delay = _RETRY_FIRST
        began = trio.current_time()
        while self.store.durable:  # (a memory hub of a cluster commits to NATS only)
            try:
                await trio.to_thread.run_sync(self.store.write, changes)
                break
            except StoreError as exc:
                router.metrics.store_failures += 1
                if router.store_error is None:
                    log.error("refusing new work: %s", exc)
                router.store_error = str(exc)
                await trio.sleep(delay)
                delay = min(2 * delay, _RETRY_MOST)
        router.metrics.commits.observe(trio.current_time() - began)
        if router.store_error is not None:
            log.warning("the store works again: taking new work")
            router.store_error = None

    async def _commit(self) -> None:
        changes = self.router.take_changes()
        batch = self.batch
        self.batch += 1
        if len(changes):
            self._unwritten = changes
            await self._write(changes)
            self._unwritten = None
        if self.replicate is not None and await self.replicate(changes):
            self._wanted.set()
        self.committed = batch
        holders, self._holders = self._holders, {}
        for holder in holders:
            if holder.release(batch):
                self._holders[holder] = None
            self._on_released(holder)
        self._done.set()
        self._done = trio.Event()
