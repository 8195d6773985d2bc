"""One reader for many sockets: an epoll set of its own, read by one Trio task.

A task that waits for its socket with `trio.lowlevel.wait_readable` re-arms the socket
in Trio's epoll (a system call), parks, and is woken when data comes: a task switch
and a re-arm per read, which is much of what a small frame costs the hub. A `Poller`
registers each socket once, level-triggered, in an epoll set of its own, and waits for
that set alone: one wakeup finds every socket with data, and each socket's callback
handles it inline, in the poller's task. The socket's own task stays parked in
`Poller.read` until its callback wants it back (to wait for something), or raises.

Linux only: where `select.epoll` is missing, `Poller.available()` is false and each
connection reads in its own task.
"""

from __future__ import annotations

import contextlib
import logging
import select
from collections.abc import Callable
from typing import TypeVar, cast

import outcome
import trio

__all__ = ["Poller"]

log = logging.getLogger("agentmesh.hub")

T = TypeVar("T")
_ROUND = 256  # sockets handled per round at most (level-triggered: the rest come next)


class _Reader:
    __slots__ = ("on_readable", "task")

    def __init__(self, on_readable: Callable[[], object], task: trio.lowlevel.Task) -> None:
        self.on_readable = on_readable
        self.task = task


class Poller:
    """Reads the sockets registered with `read`, in the task that runs `run`.

    Each round handles every socket with data: ``before()``, then each one's callback,
    then ``after()`` (the hub holds its writes over the round and makes them at the end).
    """

    def __init__(self, before: Callable[[], None], after: Callable[[], None]) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, _Reader] = {}
        self._before = before
        self._after = after

    @staticmethod
    def available() -> bool:
        return hasattr(select, "epoll")

    async def run(self) -> None:
        """Handle the sockets with data, round after round, until cancelled; then close
        the epoll set. A task still in `read` then waits until it is cancelled: the hub
        stops the poller only after its connections ended.

        A round's ``after()`` comes once every socket of it was handled: the hub's writes
        wait for the round (at most `_ROUND` sockets, a read of each)."""
        epoll, readers = self._epoll, self._readers
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll.fileno())
                ready = epoll.poll(0, _ROUND)
                self._before()
                try:
                    for fd, _ in ready:
                        reader = readers.get(fd)
                        if reader is None:  # woken or cancelled earlier in this round
                            continue
                        try:
                            wanted = reader.on_readable()
                        except Exception as exc:  # that socket's fault: its task raises it
                            self._wake(fd, reader, outcome.Error(exc))
                            continue
                        if wanted is not None:
                            self._wake(fd, reader, outcome.Value(wanted))
                finally:
                    self._after()
        finally:
            epoll.close()

    async def read(self, fd: int, on_readable: Callable[[], T | None]) -> T:
        """Call ``on_readable()`` in the poller's task each time `fd` has data (or an
        error, or the peer's end), until it returns something other than None: return
        that, or raise what it raised. Only one `read` of an `fd` at a time.

        Cancelled, it raises `Cancelled` at once, and the callback is not called
        again; that is also what happens to a task whose callback cancels it (a
        connection that closes itself), whatever the callback then returns."""
        reader = _Reader(on_readable, trio.lowlevel.current_task())
        self._epoll.register(fd, select.EPOLLIN)
        self._readers[fd] = reader

        def abort(_: object) -> trio.lowlevel.Abort:
            self._forget(fd, reader)
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            return cast(T, await trio.lowlevel.wait_task_rescheduled(abort))
        finally:
            self._forget(fd, reader)

    def _wake(self, fd: int, reader: _Reader, result: outcome.Outcome[object]) -> None:
        """Hand `result` to the reader's task, unless the callback cancelled that task
        itself (a connection that closed itself: its `read` has returned already)."""
        if self._readers.get(fd) is not reader:
            if isinstance(result, outcome.Error):
                log.error("internal error on a connection that was closing", exc_info=result.error)
            return
        self._forget(fd, reader)
        trio.lowlevel.reschedule(reader.task, result)

    def _forget(self, fd: int, reader: _Reader) -> None:
        if self._readers.get(fd) is reader:
            del self._readers[fd]
            with contextlib.suppress(OSError, ValueError):  # closed already: epoll forgot it
                self._epoll.unregister(fd)
