"""The hub's `Poller` over real socket pairs: one task reads many sockets, each through
its callback, and a socket's task is woken only when its callback asks (or raises)."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio

from agentmesh._poller import Poller

from .conftest import WAIT

pytestmark = pytest.mark.skipif(not Poller.available(), reason="epoll is Linux only")


class Rounds:
    """Counts the poller's rounds (`before` ... `after`) and what was read in each."""

    def __init__(self) -> None:
        self.open = False
        self.done: list[list[bytes]] = []

    def before(self) -> None:
        assert not self.open
        self.open = True
        self.done.append([])

    def after(self) -> None:
        assert self.open
        self.open = False


@asynccontextmanager
async def running() -> AsyncIterator[tuple[Poller, Rounds, trio.Nursery]]:
    rounds = Rounds()
    poller = Poller(rounds.before, rounds.after)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller.run)
        yield poller, rounds, nursery
        nursery.cancel_scope.cancel()


@contextmanager
def pairs(n: int) -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair() for _ in range(n)]
    for ours, _ in made:
        ours.setblocking(False)
    try:
        yield made
    finally:
        for ours, theirs in made:
            ours.close()
            theirs.close()


def reader(sock: socket.socket, rounds: Rounds, until: bytes) -> object:
    """A callback: read what `sock` holds; done (returning it all) once `until` came."""
    got = bytearray()

    def on_readable() -> bytes | None:
        assert rounds.open  # called within a round
        data = os.read(sock.fileno(), 65536)
        rounds.done[-1].append(data)
        got.extend(data)
        return bytes(got) if got.endswith(until) else None

    return on_readable


async def test_a_read_returns_what_its_callback_returns_once_it_is_not_none() -> None:
    with pairs(1) as [(ours, theirs)]:
        async with running() as (poller, rounds, _):
            with trio.fail_after(WAIT):
                async with trio.open_nursery() as nursery:
                    got: list[bytes] = []

                    async def read() -> None:
                        got.append(await poller.read(ours.fileno(), reader(ours, rounds, b"!")))

                    nursery.start_soon(read)
                    await trio.testing.wait_all_tasks_blocked()
                    theirs.send(b"hello ")
                    await trio.testing.wait_all_tasks_blocked()
                    assert got == []  # the callback read it, and the task sleeps on
                    theirs.send(b"world!")
            assert got == [b"hello world!"]
            assert [b"hello "] in rounds.done
            assert [b"world!"] in rounds.done


async def test_every_socket_with_data_is_read_in_one_round() -> None:
    with pairs(5) as made:
        async with running() as (poller, rounds, _):
            results: dict[int, bytes] = {}
            with trio.fail_after(WAIT):
                async with trio.open_nursery() as nursery:
                    for i, (ours, _) in enumerate(made):

                        async def read(i: int = i, ours: socket.socket = ours) -> None:
                            results[i] = await poller.read(
                                ours.fileno(), reader(ours, rounds, b".")
                            )

                        nursery.start_soon(read)
                    await trio.testing.wait_all_tasks_blocked()
                    for i, (_, theirs) in enumerate(made):
                        theirs.send(b"%d." % i)
            assert results == {i: b"%d." % i for i in range(5)}
            assert sorted(rounds.done[-1]) == [b"%d." % i for i in range(5)]  # one round


async def test_a_callback_that_raises_raises_in_its_task_only() -> None:
    with pairs(2) as [(bad, bad_peer), (good, good_peer)]:
        async with running() as (poller, rounds, _):

            def broken() -> None:
                os.read(bad.fileno(), 100)
                raise RuntimeError("a bug in the callback")

            with trio.fail_after(WAIT):
                async with trio.open_nursery() as nursery:
                    got: list[bytes] = []

                    async def good_read() -> None:
                        got.append(await poller.read(good.fileno(), reader(good, rounds, b".")))

                    nursery.start_soon(good_read)
                    bad_peer.send(b"x")
                    with pytest.raises(RuntimeError, match="a bug in the callback"):
                        await poller.read(bad.fileno(), broken)
                    good_peer.send(b"still read.")
            assert got == [b"still read."]


async def test_a_cancelled_read_is_not_called_again_and_the_socket_can_be_read_again() -> None:
    with pairs(1) as [(ours, theirs)]:
        async with running() as (poller, rounds, _):
            calls: list[str] = []

            def first() -> None:
                calls.append("first")

            with trio.move_on_after(0.05):  # cancelled while parked
                await poller.read(ours.fileno(), first)
            theirs.send(b"after.")
            await trio.testing.wait_all_tasks_blocked()
            assert calls == []  # forgotten: the data waits for the next reader
            with trio.fail_after(WAIT):
                got = await poller.read(ours.fileno(), reader(ours, rounds, b"."))
            assert got == b"after."


async def test_a_reader_cancelled_earlier_in_the_round_is_skipped() -> None:
    """A callback may close another connection (the hub's router does): that one's task is
    cancelled in the same round, and its callback is not called after that."""
    with pairs(2) as made:
        async with running() as (poller, _rounds, _):
            scopes: dict[int, trio.CancelScope] = {}
            called: list[int] = []

            def make(i: int) -> object:
                def on_readable() -> None:
                    called.append(i)
                    os.read(made[i][0].fileno(), 100)
                    scopes[1 - i].cancel()  # whichever runs first cancels the other

                return on_readable

            async def read(i: int) -> None:
                with trio.CancelScope() as scope:
                    scopes[i] = scope
                    await poller.read(made[i][0].fileno(), make(i))  # type: ignore[arg-type]

            with trio.fail_after(WAIT):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read, 0)
                    nursery.start_soon(read, 1)
                    await trio.testing.wait_all_tasks_blocked()
                    made[0][1].send(b"a")
                    made[1][1].send(b"b")
                    await trio.testing.wait_all_tasks_blocked()
                    for scope in scopes.values():
                        scope.cancel()
            assert len(called) == 1  # both had data in that round; one was cancelled first


@pytest.mark.parametrize("raises", [False, True])
async def test_a_callback_that_cancels_its_own_task_ends_only_that_read(
    raises: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """The hub's callback may close its own connection (cancelling the task in `read`)
    and then return a reason to stop, or raise: that task is cancelled already, and
    the poller goes on (before, it woke that task a second time and died)."""
    with pairs(2) as [(ours, theirs), (next_, next_peer)]:
        async with running() as (poller, rounds, _):
            with trio.CancelScope() as scope:

                def closing() -> str:
                    os.read(ours.fileno(), 100)
                    scope.cancel()
                    if raises:
                        raise RuntimeError("a bug after the close")
                    return "stop"

                theirs.send(b"x")
                await poller.read(ours.fileno(), closing)
            assert scope.cancelled_caught
            assert ("a bug after the close" in caplog.text) is raises
            next_peer.send(b"still read.")
            with trio.fail_after(WAIT):
                assert (
                    await poller.read(next_.fileno(), reader(next_, rounds, b".")) == b"still read."
                )
