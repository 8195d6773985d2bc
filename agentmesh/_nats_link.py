"""The bridge between Trio and NATS: nats-py on its own asyncio loop, in a thread.

The hub runs on Trio; nats-py runs on asyncio. A `NatsLink` owns one NATS connection
and one daemon thread running an asyncio event loop for it. The two sides talk through
two hand-off queues (`_Handoff`), one each way: the Trio side queues work for the loop
and is woken by `TrioToken.run_sync_soon` when results or messages come back. Each
queue wakes the other thread once per batch, not once per item, so a burst of
publishes or messages costs one wake-up of each thread.

What crosses is kept small: `publish`, `subscribe` (messages into a bounded Trio memory
channel, with an optional queue group), `request` (one reply), `flush`, `run` (any
nats-py coroutine with the connection, for JetStream and KV), `aclose`, and the
connection's state, reported to an `on_state` callback in the Trio thread. The link
carries bytes; it decides nothing (the router does).

Order: publishes and requests from the Trio side reach nats-py in the order they were
made (one loop-side task takes them in turn), so two publishes from one Trio task are
sent in that order. A `run` is not in that order: its coroutine gets an asyncio task of
its own, and a publish made after it may go first. Messages of one subscription arrive
in the order NATS delivered them.

Cancellation, in short: a Trio caller cancelled while its operation is on the asyncio
side gets `trio.Cancelled` at once; the operation is cancelled on the loop too, but
what was already handed to nats-py is not taken back (a publish may still go out, a
request may still reach its responder; its late reply is dropped). Each method says
precisely.

Only the Trio thread that made the link may use it.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import outcome
import trio

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription as NatsSubscription

__all__ = [
    "LinkClosed",
    "LinkError",
    "LinkState",
    "LinkStatistics",
    "Message",
    "NatsLink",
    "NoResponders",
    "RequestTimeout",
    "Subscription",
    "SubscriptionStatistics",
    "connect",
    "open_nats_link",
]

log = logging.getLogger("agentmesh.nats")

T = TypeVar("T")

# nats.connect options the link sets itself: its callbacks report to the Trio side.
_OWN_OPTIONS = frozenset({"servers", "error_cb", "disconnected_cb", "closed_cb", "reconnected_cb"})
# Messages a subscription may keep waiting in nats-py's pending queue while the Trio
# side does not read (beyond the Trio channel's bound); past that, nats-py drops them.
DEFAULT_PENDING_MSGS = 8192
DEFAULT_PENDING_BYTES = 16 * 1024 * 1024
# Bytes `publish_nowait` may have on the way to nats-py before it says `trio.WouldBlock`.
DEFAULT_UNSENT_BYTES = 8 * 1024 * 1024
_STATUS = "Status"
_NO_RESPONDERS = "503"


class LinkState(enum.Enum):
    """The link's connection, as the Trio side last heard of it."""

    CONNECTED = "connected"
    DISCONNECTED = "disconnected"  # nats-py is reconnecting; publishes are buffered
    CLOSED = "closed"  # for good: `aclose`, or nats-py gave up reconnecting


class LinkError(Exception):
    """NATS refused or failed an operation (the nats-py error is the `__cause__`)."""


class LinkClosed(LinkError):
    """The link is closed (or closing): nothing more can be sent or received."""


class NoResponders(LinkError):
    """A request found no subscriber on its subject (the server said so at once)."""


class RequestTimeout(LinkError):
    """A request's reply did not come within its timeout."""


@attrs.frozen
class Message:
    """One NATS message, as the Trio side gets it (nats-py's `Msg` stays on asyncio)."""

    subject: str
    data: bytes
    reply: str | None = None  # where to answer, for a request
    headers: Mapping[str, str] | None = None


@attrs.frozen(kw_only=True)
class SubscriptionStatistics:
    buffered: int  # in the Trio channel, not yet received
    delivered: int  # received by the Trio side so far
    dropped: int  # dropped by nats-py past its pending limits (slow consumer)
    max_buffer: int


@attrs.frozen(kw_only=True)
class LinkStatistics:
    state: LinkState
    published: int
    requests_in_flight: int
    subscriptions: int
    reconnects: int
    dropped: int  # over every subscription


class _Handoff:
    """Callables queued by one thread, run in another in batches.

    `wake(drain)` asks the other thread to call `drain` soon; it is called only when
    the queue goes from empty to not empty, so a burst costs one wake-up.
    """

    def __init__(self, wake: Callable[[Callable[[], None]], object]) -> None:
        self._wake = wake
        self._items: collections.deque[Callable[[], object]] = collections.deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def put(self, item: Callable[[], object]) -> None:
        with self._lock:
            self._items.append(item)
            if self._scheduled:
                return
            self._scheduled = True
        self._wake(self.drain)

    def take(self) -> collections.deque[Callable[[], object]]:
        with self._lock:
            items, self._items = self._items, collections.deque()
            self._scheduled = False
        return items

    def drain(self) -> None:
        for item in self.take():
            try:
                item()
            except Exception:  # a bug in a callback must not end either loop
                log.exception("nats link: a callback failed")


class _Waiter:
    """One Trio task parked until the loop answers (see `NatsLink._on_loop`)."""

    __slots__ = ("atask", "cancelled", "task", "waiting")

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.waiting = True
        self.cancelled = False  # set in the Trio thread, read in the loop thread
        self.atask: asyncio.Future[Any] | None = None

    def finish(self, result: outcome.Outcome[Any]) -> None:
        """In the Trio thread: wake the task with `result`, unless it gave up."""
        if self.waiting:
            self.waiting = False
            trio.lowlevel.reschedule(self.task, result)


class Subscription(trio.abc.ReceiveChannel[Message]):
    """Messages of one subject (or wildcard) for the Trio side, with a bound.

    At most `max_buffer` messages wait in the Trio channel. While it is full, the loop
    side stops handing messages over (it waits; the asyncio loop does not block), and
    NATS's messages for this subscription queue in nats-py, up to `pending_msgs` and
    `pending_bytes`. Past those, nats-py drops them as a slow consumer: they are counted
    in `statistics().dropped`, and the server never re-sends them (core NATS is at most
    once). So a Trio side that stops reading never grows memory past those bounds, and
    loses messages only past them.

    `receive` on a closed link returns the messages already in the Trio channel, then
    raises `trio.EndOfChannel`. `aclose` unsubscribes (and drops what was not read).
    """

    def __init__(self, link: NatsLink, subject: str, queue: str | None, max_buffer: int) -> None:
        self.subject = subject
        self.queue = queue
        self._link = link
        self._max_buffer = max_buffer
        self._send, self._receive = trio.open_memory_channel[Message](max_buffer)
        # Credit, shared by both threads under `_lock`: messages handed to the Trio side
        # and not yet received. The loop side waits on `_room` when it reaches the bound.
        self._lock = threading.Lock()
        self._outstanding = 0
        self._paused = False
        self._room: asyncio.Event | None = None  # made on the loop
        self._nats_sub: NatsSubscription | None = None
        self._closed = False
        self._user_closed = False
        self._delivered = 0
        self.dropped = 0  # written by the loop thread

    # -- the loop side ---------------------------------------------------------------

    async def _on_message(self, msg: Msg) -> None:
        """nats-py's callback, one message at a time: wait for credit, hand it over."""
        assert self._room is not None
        while True:
            with self._lock:
                if self._closed:
                    return
                if self._outstanding < self._max_buffer:
                    self._outstanding += 1
                    break
                self._paused = True
                self._room.clear()
            await self._room.wait()
        message = Message(msg.subject, msg.data, msg.reply or None, msg.headers)
        self._link._to_trio.put(lambda: self._deliver(message))

    # -- the Trio side ---------------------------------------------------------------

    def _deliver(self, message: Message) -> None:
        try:
            self._send.send_nowait(message)  # never full: the credit bounds it
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # closed meanwhile: dropped

    def _returned(self) -> None:
        self._delivered += 1
        with self._lock:
            self._outstanding -= 1
            resume, self._paused = self._paused, False
        if resume:
            self._link._wake_room(self)

    async def receive(self) -> Message:
        """The next message; waits for one. Cancellation loses nothing (a message is
        taken only when this returns). `trio.EndOfChannel` once the link is closed and
        the buffered messages are read; `trio.ClosedResourceError` after `aclose`."""
        message = await self._receive.receive()
        self._returned()
        return message

    def receive_nowait(self) -> Message:
        """The next message if one is buffered, else `trio.WouldBlock`."""
        message = self._receive.receive_nowait()
        self._returned()
        return message

    def statistics(self) -> SubscriptionStatistics:
        return SubscriptionStatistics(
            buffered=self._receive.statistics().current_buffer_used,
            delivered=self._delivered,
            dropped=self.dropped,
            max_buffer=self._max_buffer,
        )

    def _end(self) -> None:
        """In the Trio thread: no more messages (link closed); buffered ones stay."""
        with self._lock:
            self._closed = True
        self._send.close()

    async def aclose(self) -> None:
        """Unsubscribe and close. Messages not yet received are dropped. If cancelled,
        the subscription is still closed on the Trio side at once; the UNSUB goes out
        on the loop regardless. Never raises for a link that is closed already."""
        if self._user_closed:
            return
        self._user_closed = True
        self._end()
        self._link._unsubscribe(self)  # before the checkpoint: a cancel cannot skip it
        await self._receive.aclose()


class NatsLink:
    """One NATS connection, driven from Trio; nats-py runs on a loop in a thread.

    Make one with `connect` (then `aclose` it) or `open_nats_link` (an async context
    manager). `on_state(state)` and `on_error(exc)` are called in the Trio thread, must
    not block, and should not raise (an exception there is logged and ignored).
    """

    def __init__(
        self,
        *,
        on_state: Callable[[LinkState], None] | None = None,
        on_error: Callable[[Exception], None] | None = None,
    ) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._on_state = on_state
        self._on_error = on_error
        self._state = LinkState.DISCONNECTED
        self._closing = False
        self._nc: Client | None = None
        self._loop = asyncio.new_event_loop()
        self._to_trio = _Handoff(self._to_trio_wake)
        self._ops = _Handoff(self._loop_wake)
        self._ops_ready: asyncio.Event | None = None
        self._thread = threading.Thread(
            target=self._thread_main, name="agentmesh-nats", daemon=True
        )
        self._stopped = trio.Event()
        self._waiters: set[_Waiter] = set()
        self._subs: set[Subscription] = set()
        self._by_sid: dict[int, Subscription] = {}  # the loop side's
        self._replies: dict[str, _Waiter] = {}
        self._reply_prefix: str | None = None
        self._reply_lock = trio.Lock()
        self._tokens = itertools.count()
        self._published = 0
        self._reconnects = 0
        self._dropped_closed = 0
        # `publish_nowait`'s bytes on the way to nats-py: added by Trio, taken by the loop.
        self._unsent_limit = DEFAULT_UNSENT_BYTES
        self._queued_bytes = 0  # written by the Trio thread only
        self._taken_bytes = 0  # written by the loop thread only

    # ---------------------------------------------------------------------------------
    # The threads

    def _to_trio_wake(self, drain: Callable[[], None]) -> None:
        try:
            self._token.run_sync_soon(drain)
        except trio.RunFinishedError:
            pass  # the Trio run ended without closing the link: nobody to tell

    def _loop_wake(self, drain: Callable[[], None]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._kick)
        except RuntimeError:
            pass  # the loop is closed: the op is answered by `_thread_main`'s sweep

    def _kick(self) -> None:
        assert self._ops_ready is not None
        self._ops_ready.set()

    def _thread_main(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        self._ops_ready = asyncio.Event()
        pump = loop.create_task(self._pump())
        try:
            loop.run_forever()
        finally:
            pump.cancel()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            self._to_trio.put(self._thread_ended)

    async def _pump(self) -> None:
        """The loop side's one consumer of Trio's operations, in order."""
        assert self._ops_ready is not None
        while True:
            await self._ops_ready.wait()
            self._ops_ready.clear()
            for op in self._ops.take():
                try:
                    result = op()
                    if asyncio.iscoroutine(result):  # an inline op (publish): in turn
                        await result
                except Exception:  # pragma: no cover - ops catch their own errors
                    log.exception("nats link: an operation failed on the loop")

    def _thread_ended(self) -> None:
        for waiter in list(self._waiters):
            waiter.finish(outcome.Error(LinkClosed("the NATS link is closed")))
        self._waiters.clear()
        self._set_state(LinkState.CLOSED)
        self._stopped.set()

    # ---------------------------------------------------------------------------------
    # Calls across

    async def _on_loop(self, make: Callable[[], Awaitable[T]], *, inline: bool = False) -> T:
        """Run `make()` on the loop and wait for its result in Trio.

        `inline` ops run in the pump, in order with the others (they must not wait on
        the network); the rest get an asyncio task each. If the Trio caller is
        cancelled, the asyncio side is cancelled too (an inline op that already ran is
        not undone) and the caller gets `trio.Cancelled` at once."""
        self._check_open()
        waiter = _Waiter(trio.lowlevel.current_task())
        self._waiters.add(waiter)

        async def run() -> None:
            try:
                result: outcome.Outcome[Any] = outcome.Value(await make())
            except asyncio.CancelledError:
                result = outcome.Error(LinkClosed("cancelled on the loop"))
            except Exception as exc:
                result = outcome.Error(exc)
            self._to_trio.put(lambda: waiter.finish(result))

        def start() -> Awaitable[None] | None:
            if waiter.cancelled:
                return None
            if inline:
                return run()
            waiter.atask = self._loop.create_task(run())
            return None

        def cancel() -> None:
            if waiter.atask is not None:
                waiter.atask.cancel()

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            waiter.waiting = False
            waiter.cancelled = True
            self._waiters.discard(waiter)
            self._ops.put(cancel)
            return trio.lowlevel.Abort.SUCCEEDED

        self._ops.put(start)
        try:
            value: T = await trio.lowlevel.wait_task_rescheduled(abort)
        finally:
            self._waiters.discard(waiter)
        return value

    def _check_open(self) -> None:
        if self._closing:
            raise LinkClosed("the NATS link is closed")

    # ---------------------------------------------------------------------------------
    # nats-py's callbacks (on the loop)

    async def _cb_disconnected(self) -> None:
        self._to_trio.put(lambda: self._set_state(LinkState.DISCONNECTED))

    async def _cb_reconnected(self) -> None:
        self._reconnects += 1
        self._to_trio.put(lambda: self._set_state(LinkState.CONNECTED))

    async def _cb_closed(self) -> None:
        self._to_trio.put(lambda: self._set_state(LinkState.CLOSED))

    async def _cb_error(self, exc: Exception) -> None:
        from nats.errors import SlowConsumerError

        if isinstance(exc, SlowConsumerError):
            sub = self._by_sid.get(exc.sid)
            if sub is not None:
                sub.dropped += 1
            else:
                self._dropped_closed += 1
            return
        self._to_trio.put(lambda: self._report_error(exc))

    def _set_state(self, state: LinkState) -> None:
        if self._state is state or self._state is LinkState.CLOSED:
            return
        self._state = state
        if state is LinkState.CLOSED:
            for sub in list(self._subs):
                sub._end()
            for waiter in self._replies.values():
                waiter.finish(outcome.Error(LinkClosed("the NATS link is closed")))
            self._replies.clear()
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:
                log.exception("nats link: on_state failed")

    def _report_error(self, exc: Exception) -> None:
        if self._on_error is not None:
            try:
                self._on_error(exc)
            except Exception:
                log.exception("nats link: on_error failed")
        else:
            log.warning("nats: %s", exc)

    # ---------------------------------------------------------------------------------
    # The interface

    async def _connect(self, servers: Sequence[str], options: dict[str, Any]) -> None:
        import nats

        self._thread.start()

        async def connect() -> Client:
            return await nats.connect(
                servers=list(servers),
                error_cb=self._cb_error,
                disconnected_cb=self._cb_disconnected,
                reconnected_cb=self._cb_reconnected,
                closed_cb=self._cb_closed,
                **options,
            )

        try:
            self._nc = await self._on_loop(connect)
        except BaseException as exc:
            self._closing = True
            self._loop.call_soon_threadsafe(self._loop.stop)
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + 5
                await self._stopped.wait()
            if isinstance(exc, Exception) and not isinstance(exc, LinkError):
                raise LinkError(f"cannot connect to NATS at {', '.join(servers)}: {exc}") from exc
            raise
        self._state = LinkState.DISCONNECTED
        self._set_state(LinkState.CONNECTED)

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def max_payload(self) -> int:
        """The largest message the server takes, from its INFO (1 MiB by default); a
        larger one is refused. (An int nats-py sets at each connect: safe to read.)"""
        nc = self._nc
        return nc.max_payload if nc is not None and nc.max_payload > 0 else 1 << 20

    @property
    def client(self) -> Client:
        """The nats-py client, for `run` callbacks only: touch it on the loop, never
        from Trio."""
        assert self._nc is not None
        return self._nc

    async def publish(
        self,
        subject: str,
        data: bytes = b"",
        *,
        reply: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish one message. Returns once nats-py has it in its outbound buffer
        (written to the server soon after; `flush` waits for the server). While the
        link is reconnecting, nats-py buffers it (up to its `pending_size`, then
        `LinkError`). `LinkClosed` after `aclose`.

        Cancelled while in flight: the caller gets `trio.Cancelled` at once; the message
        may still be published (it is not taken back once handed to the loop)."""
        nc = self._nc
        assert nc is not None

        async def send() -> None:
            await nc.publish(subject, data, reply or "", dict(headers) if headers else None)

        try:
            await self._on_loop(send, inline=True)
        except LinkError:
            raise
        except Exception as exc:
            raise _link_error(exc) from exc
        self._published += 1

    def publish_nowait(
        self,
        subject: str,
        data: bytes = b"",
        *,
        reply: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Queue one message for the loop and return at once, without waiting for the
        loop (the cheap way to send: no wake-up of the Trio side comes back). Messages
        keep their order with every other publish and request. An error nats-py raises
        for it later (a closed connection, a payload too large, a full reconnect
        buffer) goes to `on_error`, and the message is lost.

        `trio.WouldBlock` when more than `DEFAULT_UNSENT_BYTES` (8 MiB) of such messages
        are still on the way to nats-py (the loop is behind): send fewer, or `await
        publish`. `LinkClosed` after `aclose`. Never a checkpoint."""
        size = len(data) + len(subject)
        self._reserve(size)
        nc = self._nc
        assert nc is not None
        hdrs = dict(headers) if headers else None

        async def send() -> None:
            self._taken_bytes += size
            try:
                await nc.publish(subject, data, reply or "", hdrs)
            except Exception as exc:
                error = _link_error(exc)
                self._to_trio.put(lambda: self._report_error(error))

        self._ops.put(send)
        self._published += 1

    def _reserve(self, size: int) -> None:
        """Count `size` more bytes on the way to nats-py, or raise `trio.WouldBlock` if
        that is over the limit (`LinkClosed` after `aclose`)."""
        self._check_open()
        if self._queued_bytes - self._taken_bytes + size > self._unsent_limit:
            raise trio.WouldBlock
        self._queued_bytes += size

    def publish_many(self, messages: Sequence[tuple[str, bytes, Mapping[str, str] | None]]) -> None:
        """`publish_nowait` for each `(subject, data, headers)` of `messages`, in order,
        as one hand-over to the loop: a batch of them wakes the loop's thread once, not
        once for each share of them it takes while they are still being queued. Raises
        as `publish_nowait` does, before any of them is queued. Never a checkpoint."""
        size = sum(len(data) + len(subject) for subject, data, _ in messages)
        self._reserve(size)
        nc = self._nc
        assert nc is not None
        items = [(s, d, dict(h) if h else None) for s, d, h in messages]

        async def send() -> None:
            self._taken_bytes += size
            for subject, data, headers in items:
                try:
                    await nc.publish(subject, data, "", headers)
                except Exception as exc:
                    self._to_trio.put(partial(self._report_error, _link_error(exc)))

        self._ops.put(send)
        self._published += len(items)

    async def subscribe(
        self,
        subject: str,
        *,
        queue: str | None = None,
        max_buffer: int = 256,
        pending_msgs: int = DEFAULT_PENDING_MSGS,
        pending_bytes: int = DEFAULT_PENDING_BYTES,
    ) -> Subscription:
        """Subscribe to `subject` (wildcards allowed), in queue group `queue` if given
        (each message goes to one member of the group). Returns once the server has the
        subscription (a flush), so a publish made after this returns reaches it.
        The bounds: see `Subscription`. Cancelled before it returns: the subscription,
        if it was made on the loop, is removed again."""
        if max_buffer < 1:
            raise ValueError("max_buffer must be at least 1")
        nc = self._nc
        assert nc is not None
        sub = Subscription(self, subject, queue, max_buffer)

        async def make() -> NatsSubscription:
            sub._room = asyncio.Event()
            nsub = await nc.subscribe(
                subject,
                queue=queue or "",
                cb=sub._on_message,
                pending_msgs_limit=pending_msgs,
                pending_bytes_limit=pending_bytes,
            )
            sub._nats_sub = nsub
            self._by_sid[nsub._id] = sub
            try:
                await _flush(nc, 5.0)
            except asyncio.CancelledError:
                await nsub.unsubscribe()
                raise
            return nsub

        try:
            await self._on_loop(make)
        except LinkError:
            raise
        except Exception as exc:
            raise _link_error(exc) from exc
        self._subs.add(sub)
        if self._state is LinkState.CLOSED:
            sub._end()
        return sub

    def _unsubscribe(self, sub: Subscription) -> None:
        self._subs.discard(sub)
        if self._closing:
            return

        def unsubscribe() -> Awaitable[None] | None:
            nsub = sub._nats_sub
            if sub._room is not None:
                sub._room.set()  # a callback waiting for room returns
            if nsub is None:
                return None
            self._by_sid.pop(nsub._id, None)
            return _quietly(nsub.unsubscribe())

        self._ops.put(unsubscribe)

    def _wake_room(self, sub: Subscription) -> None:
        room = sub._room
        if room is not None and not self._closing:
            try:
                self._loop.call_soon_threadsafe(room.set)
            except RuntimeError:
                pass

    async def request(
        self,
        subject: str,
        data: bytes = b"",
        *,
        timeout: float,  # noqa: ASYNC109 - a NATS request has one, as in nats-py
        headers: Mapping[str, str] | None = None,
    ) -> Message:
        """Publish a request and wait for its first reply, at most `timeout` seconds
        (`RequestTimeout`); `NoResponders` at once when nobody subscribes to `subject`.

        Replies come through one wildcard subscription on the link's own inbox, so a
        request costs no asyncio task or future. Cancelled (or timed out) while in
        flight: the caller gets `trio.Cancelled` (or `RequestTimeout`) at once, the
        request may still reach a responder, and its reply, if any, is dropped.
        `LinkClosed` if the link closes before the reply comes."""
        if timeout <= 0:
            raise ValueError("timeout must be more than 0")
        self._check_open()
        nc = self._nc
        assert nc is not None
        prefix = self._reply_prefix
        if prefix is None:
            prefix = await self._reply_subscription()
            self._check_open()  # closed meanwhile
        token = f"{next(self._tokens):x}"
        inbox = prefix + token
        waiter = _Waiter(trio.lowlevel.current_task())
        self._replies[token] = waiter

        def send() -> Awaitable[None]:
            return _failing_to(
                nc.publish(subject, data, inbox, dict(headers) if headers else None),
                lambda exc: self._to_trio.put(lambda: waiter.finish(outcome.Error(exc))),
            )

        def abort(_: trio.lowlevel.RaiseCancelT) -> trio.lowlevel.Abort:
            waiter.waiting = False
            self._replies.pop(token, None)
            return trio.lowlevel.Abort.SUCCEEDED

        self._ops.put(send)
        try:
            with trio.fail_after(timeout):
                message: Message = await trio.lowlevel.wait_task_rescheduled(abort)
        except trio.TooSlowError:
            raise RequestTimeout(f"no reply on {subject!r} in {timeout:g}s") from None
        except LinkError:
            raise
        except Exception as exc:
            raise _link_error(exc) from exc
        finally:
            self._replies.pop(token, None)
        if message.headers and message.headers.get(_STATUS) == _NO_RESPONDERS and not message.data:
            raise NoResponders(f"no responders on {subject!r}")
        return message

    async def ready_for_requests(self) -> None:
        """Make the link's one reply subscription now, if not yet made, so that a
        `request` from now on is handed over at once, in turn with the publishes made
        before it (the first one otherwise waits for the subscription, and publishes
        made meanwhile go first). Cancelled: see `subscribe`."""
        if self._reply_prefix is None:
            await self._reply_subscription()

    async def _reply_subscription(self) -> str:
        """Make the link's one reply subscription (once) and return its prefix."""
        nc = self._nc
        assert nc is not None
        prefix = nc.new_inbox() + "."

        async def on_reply(msg: Msg) -> None:
            token = msg.subject[len(prefix) :]
            message = Message(msg.subject, msg.data, msg.reply or None, msg.headers)
            self._to_trio.put(lambda: self._answered(token, message))

        async def make() -> None:
            # Unbounded (0 messages: no limit; bytes: none reachable): replies are as
            # many as the requests in flight, and are handed over without waiting.
            await nc.subscribe(
                prefix + "*", cb=on_reply, pending_msgs_limit=0, pending_bytes_limit=1 << 62
            )
            await _flush(nc, 5.0)

        async with self._reply_lock:
            if self._reply_prefix is None:
                await self._on_loop(make)
                self._reply_prefix = prefix
            return self._reply_prefix

    def _answered(self, token: str, message: Message) -> None:
        waiter = self._replies.pop(token, None)
        if waiter is not None:  # else cancelled, timed out, or a second reply: dropped
            waiter.finish(outcome.Value(message))

    async def flush(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - nats-py's
        """Wait until the server has processed everything published so far (a PING
        round trip), at most `timeout` seconds (`RequestTimeout`). Cancelled: the
        flush is abandoned; what was published still goes out."""
        nc = self._nc
        assert nc is not None

        async def flush() -> None:
            await _flush(nc, timeout)

        try:
            await self._on_loop(flush)
        except LinkError:
            raise
        except Exception as exc:
            raise _link_error(exc) from exc

    async def run(self, fn: Callable[[Client], Awaitable[T]]) -> T:
        """Run `await fn(client)` on the loop (JetStream, KV, anything nats-py does)
        and return its result. Cancelled: its asyncio task is cancelled, and the caller
        gets `trio.Cancelled` at once. nats-py's own errors come as they are."""
        nc = self._nc
        assert nc is not None
        return await self._on_loop(lambda: fn(nc))

    def statistics(self) -> LinkStatistics:
        return LinkStatistics(
            state=self._state,
            published=self._published,
            requests_in_flight=len(self._replies),
            subscriptions=len(self._subs),
            reconnects=self._reconnects,
            dropped=self._dropped_closed + sum(s.dropped for s in self._subs),
        )

    async def aclose(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109 - a bound
        """Close the connection and stop the loop thread.

        At once: every later call raises `LinkClosed`; requests waiting for a reply
        raise `LinkClosed`; subscriptions stop (their buffered messages can still be
        received, then `trio.EndOfChannel`). Then, on the loop, in order after the
        publishes already made: nats-py writes what it holds to the server (if
        connected) and closes; messages NATS had sent that were not yet handed over are
        dropped. Waits for the thread to end, at most `timeout` seconds. Cancelled:
        the close goes on in the thread and the caller gets `trio.Cancelled`. Idempotent.
        """
        if self._closing:
            with trio.move_on_after(timeout):
                await self._stopped.wait()
            return
        self._closing = True
        for waiter in self._replies.values():
            waiter.finish(outcome.Error(LinkClosed("the NATS link closed")))
        self._replies.clear()
        for sub in list(self._subs):
            sub._end()
        nc = self._nc

        async def close() -> None:
            try:
                if nc is not None:
                    await nc.close()
            except Exception:  # closing a broken connection: nothing to report
                log.debug("nats: error while closing", exc_info=True)
            finally:
                asyncio.get_running_loop().stop()

        def start() -> None:
            self._loop.create_task(close())

        self._ops.put(start)
        with trio.move_on_after(timeout):
            await self._stopped.wait()
            # The thread's last act was to hand `_thread_ended` over: it is ending now.
            await trio.to_thread.run_sync(self._thread.join, abandon_on_cancel=True)

    async def __aenter__(self) -> NatsLink:
        return self

    async def __aexit__(self, *_: object) -> None:
        with trio.CancelScope(shield=True):
            await self.aclose()


async def connect(
    servers: str | Sequence[str],
    *,
    on_state: Callable[[LinkState], None] | None = None,
    on_error: Callable[[Exception], None] | None = None,
    **options: Any,
) -> NatsLink:
    """Connect to NATS at `servers` (one URL or several: nats-py tries them and
    reconnects to any) and return the link; `aclose` it when done.

    `options` go to `nats.connect` as they are: `name`, `user`/`password`, `token`,
    `user_credentials`, `nkeys_seed`, `tls`, `tls_hostname`, `connect_timeout`,
    `allow_reconnect`, `max_reconnect_attempts`, `reconnect_time_wait`,
    `ping_interval`, `max_outstanding_pings`, `pending_size`, `inbox_prefix`, ...
    (the callbacks are the link's own). Raises `LinkError` if it cannot connect.
    Cancelled: the connection attempt is cancelled and the thread stopped."""
    own = _OWN_OPTIONS & options.keys()
    if own:
        raise TypeError(f"the link sets {', '.join(sorted(own))} itself")
    urls = [servers] if isinstance(servers, str) else list(servers)
    if not urls:
        raise ValueError("no NATS server URL")
    link = NatsLink(on_state=on_state, on_error=on_error)
    await link._connect(urls, options)
    return link


@asynccontextmanager
async def open_nats_link(
    servers: str | Sequence[str],
    *,
    on_state: Callable[[LinkState], None] | None = None,
    on_error: Callable[[Exception], None] | None = None,
    **options: Any,
) -> AsyncIterator[NatsLink]:
    """`connect`, as an async context manager that closes the link on the way out
    (shielded, within the close timeout)."""
    link = await connect(servers, on_state=on_state, on_error=on_error, **options)
    async with link:
        yield link


def _link_error(exc: Exception) -> LinkError:
    from nats import errors

    if isinstance(exc, errors.ConnectionClosedError):
        return LinkClosed("the NATS connection is closed")
    if isinstance(exc, errors.NoRespondersError):
        return NoResponders(str(exc) or "no responders")
    return LinkError(f"{type(exc).__name__}: {exc}".rstrip(": "))


async def _flush(nc: Client, seconds: float) -> None:
    """nats-py's `flush`, made to mean what it says: its PING is written to the socket
    at once, ahead of commands still in its pending buffer (a SUB, publishes), so the
    PONG can come before the server saw them. Push the buffer out first."""
    push = getattr(nc, "_flush_pending", None)
    if push is not None:
        await push(force_flush=True)
    await nc.flush(timeout=seconds)  # type: ignore[arg-type]  # annotated int, takes float


async def _quietly(coro: Awaitable[None]) -> None:
    try:
        await coro
    except Exception:
        log.debug("nats: ignored", exc_info=True)


async def _failing_to(coro: Awaitable[None], fail: Callable[[Exception], None]) -> None:
    """Await `coro` (a publish) in the pump; report an error to `fail` instead of
    raising it into the pump."""
    try:
        await coro
    except Exception as exc:
        fail(exc)
