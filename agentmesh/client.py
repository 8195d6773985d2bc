"""The Python client: one hub connection for any Trio program, kept alive.

    async with agentmesh.connect("ws://127.0.0.1:8765", name="planner") as client:
        agents = await client.discover("review")
        verdict = await client.delegate("code-review", {"code": src}, ttl=60)

The client registers, heartbeats, reconnects with exponential backoff and full jitter,
and resumes with its token so its agent ID, its tasks and undelivered results survive a
dropped connection. Every error frame from the hub is raised as a typed exception.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import ssl
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
import trio

from . import _tracing
from . import protocol as p
from ._client_websocket import (
    ClientWebSocket,
    ConnectionClosed,
    HandshakeFailed,
    HandshakeRejected,
    open_client_websocket,
)
from ._groups import unwrap_single
from .errors import (
    AgentMeshError,
    ConnectionLost,
    HubRestarted,
    HubUnavailable,
    Replaced,
    StoreUnavailable,
    TaskCancelled,
    TaskFailed,
    TaskTimeout,
    Unauthorized,
    hub_error,
)
from .registry import Capability

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

__all__ = ["Backoff", "Client", "TaskHandle", "connect"]

log = logging.getLogger("agentmesh.client")
MT = p.MessageType

_LOOKER_HEARTBEAT = 10.0  # seconds; for clients that did not register
_ABANDONED = 1024  # delegates given up on before their reply, remembered at most
_PROGRESS = 64  # progress updates a task handle keeps unread
_NETWORK_ERRORS = (
    OSError,
    HandshakeFailed,
    ConnectionClosed,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
)


@attrs.frozen(kw_only=True)
class Backoff:
    """Reconnect delays: exponential with full jitter, `uniform(0, min(cap, base * 2**n))`.

    `max_attempts=None` retries forever.
    """

    base: float = 0.5
    cap: float = 30.0
    max_attempts: int | None = None

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        return (rng or random).uniform(0, min(self.cap, self.base * 2 ** min(attempt, 32)))


class TaskHandle:
    """A delegated task, as its requester sees it: its `state`, progress, and outcome.

    `traceparent`/`tracestate`: the W3C trace context its delegate carried, if any."""

    def __init__(
        self,
        client: Client,
        task_id: str,
        agent_id: str,
        state: str,
        *,
        traceparent: str | None = None,
        tracestate: str | None = None,
        span: Span | None = None,
        waiter: _Waiter | None = None,
    ) -> None:
        self.task_id = task_id
        self.agent_id = agent_id
        self.state = state
        self.outcome: p.TaskOutcome | None = None
        self.traceparent = traceparent
        self.tracestate = tracestate
        self._span = span  # the requester's span, ended with the task
        self._client = client
        self._ended = False
        self._ended_event: trio.Event | None = None  # made for the first `wait`
        self._waiter = waiter  # a `delegate` waiting for the end, woken then
        self._error: Exception | None = None
        # The progress channel is made when someone asks for it (most never do); until
        # then the updates wait here, as many as the channel would hold.
        self._progress: (
            tuple[trio.MemorySendChannel[p.Progress], trio.MemoryReceiveChannel[p.Progress]] | None
        ) = None
        self._early_progress: list[p.Progress] = []

    @property
    def done(self) -> bool:
        return self._ended

    async def wait(self) -> Any:
        """The task's result data; raises `TaskFailed`, `TaskTimeout`, `TaskCancelled`, or
        `HubRestarted`. Cancelling the wait does not cancel the task (see `cancel`)."""
        if self._ended_event is None:
            self._ended_event = trio.Event()
            if self._ended:
                self._ended_event.set()
        await self._ended_event.wait()
        return self._result()

    def _result(self) -> Any:
        """`wait`'s answer, once done."""
        if self._error is not None:
            raise self._error
        assert self.outcome is not None
        return self.outcome.data

    async def cancel(self, reason: str | None = None) -> None:
        """Ask the hub to cancel the task (its agent's handler is cancelled too)."""
        await self._client.cancel(self.task_id, reason)

    def progress(self) -> trio.MemoryReceiveChannel[p.Progress]:
        """Progress updates from the agent as they come (``async for``); the iteration
        ends when the task ends. A reader that lags more than 64 updates loses some."""
        if self._progress is None:
            self._progress = trio.open_memory_channel[p.Progress](_PROGRESS)
            send = self._progress[0]
            for update in self._early_progress:
                send.send_nowait(update)
            self._early_progress = []
            if self._ended:
                send.close()
        return self._progress[1]

    def _progressed(self, update: p.Progress) -> None:
        """A progress update came; a reader that lags loses some (progress is advisory)."""
        if self._progress is None:
            if len(self._early_progress) < _PROGRESS and not self._ended:
                self._early_progress.append(update)
            return
        try:
            self._progress[0].send_nowait(update)
        except (trio.WouldBlock, trio.ClosedResourceError):
            pass

    def _finish(self, outcome: p.TaskOutcome | None, error: Exception | None = None) -> None:
        if self._ended:
            return
        self.outcome = outcome
        if outcome is not None:
            self.state = outcome.state
            if outcome.state == "timeout":
                error = TaskTimeout(self.task_id, outcome.error or "the task timed out")
            elif outcome.state == "cancelled":
                error = TaskCancelled(self.task_id, outcome.error or "the task was cancelled")
            elif not outcome.success:
                error = TaskFailed(self.task_id, outcome.error)
        if self._span is not None:
            _tracing.RequestTracing.finished(self._span, outcome, error)
            self._span = None
        self._error = error
        if self._progress is not None:
            self._progress[0].close()
        self._ended = True
        if self._ended_event is not None:
            self._ended_event.set()
        if self._waiter is not None:
            self._waiter.wake()

    def __repr__(self) -> str:
        return f"<TaskHandle {self.task_id} {self.state} on {self.agent_id}>"


class _Waiter:
    """A request waiting for its reply: `wait` returns once `wake` is called (the reply
    came, or the connection dropped). A delegate's waiter `until_done` is woken by the
    task handle instead, when the task ends (or at once, for an error reply).

    One task waits, parked with `wait_task_rescheduled` and woken with `reschedule`:
    an `Event` would cost a parking lot for the one task, and a scheduler turn more
    when the reply is there already."""

    __slots__ = (
        "_task",
        "envelope",
        "error",
        "handle",
        "request",
        "span",
        "until_done",
        "woken",
    )

    def __init__(
        self,
        request: p.Delegate | None = None,
        span: Span | None = None,
        *,
        until_done: bool = False,
    ) -> None:
        self.woken = False
        self._task: trio.lowlevel.Task | None = None  # parked in `wait`
        self.envelope: p.Envelope | None = None
        self.error: Exception | None = None
        self.handle: TaskHandle | None = None  # for a delegate reply
        self.request = request  # the delegate this waits on the reply to
        self.span = span  # the delegate's span, handed to the handle
        self.until_done = until_done

    async def wait(self) -> None:
        """Until `wake` (a checkpoint, as `Event.wait`). Cancellation abandons the wait:
        a `wake` after that does nothing."""
        if self.woken:
            await trio.lowlevel.checkpoint()
            return
        self._task = trio.lowlevel.current_task()
        await trio.lowlevel.wait_task_rescheduled(self._abort)

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def wake(self) -> None:
        if self.woken:
            return
        self.woken = True
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)


TaskCallback = Callable[[p.TaskAssignment, str], None]
CancelCallback = Callable[[str, str | None], None]


class _Watching:
    """A `Client.watch` block's channel, and the events it had to drop."""

    def __init__(self, kinds: tuple[str, ...], buffer: int) -> None:
        self.watch = p.Watch(kinds=kinds)
        self.started = False  # the hub said yes
        self.send, self.receive = trio.open_memory_channel[p.Event](buffer)
        self.dropped = 0

    def put(self, event: p.Event) -> None:
        if self.dropped:
            event = attrs.evolve(event, missed=event.missed + self.dropped)
        try:
            self.send.send_nowait(event)
            self.dropped = 0
        except trio.WouldBlock:
            self.dropped = event.missed + 1  # the ones it stands for, and itself
        except trio.ClosedResourceError:
            pass


class Client:
    """One hub connection, registered as an agent named `name`, kept alive.

    Run it with ``await nursery.start(client.serve)`` (returns once registered) or use
    `connect`. Requests made while the connection is down wait for it to come back.
    `on_task` and `on_cancel` are for agents (see `agentmesh.Agent`).

    `token` is sent as ``Authorization: Bearer`` at the handshake; `ssl_context` verifies a
    ``wss://`` hub (for example with your own CA: ``ssl.create_default_context(cafile=...)``).

    `url` may be a list of hub URLs (the hubs of a cluster, docs/cluster.md): the client
    stays on one hub and moves on only when it cannot have a session there. After a
    failed attempt (the hub cannot be reached, or refuses with `store_unavailable`) it
    tries the next URL at once; after a whole round of failures it waits the backoff
    (`max_attempts` counts attempts, every URL's). A connection that drops is first
    retried on the same hub. `url` is the hub it is on (or tries next).

    With ``register=False`` the client only looks (discover, status, list_tasks) and is
    never an agent; with ``hidden=True`` it registers but is left out of discover and
    broadcasts (for tools such as the CLI and the MCP bridge).

    With opentelemetry installed, delegating makes a span (and an agent's handler runs in
    one) with `tracer_provider`, or if None with the global provider once the program has
    set a real one up (docs/tracing.md).
    """

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        name: str = "client",
        description: str = "",
        capabilities: Iterable[Capability | str] = (),
        metadata: dict[str, Any] | None = None,
        backoff: Backoff | None = None,
        connect_timeout: float = 10.0,
        on_task: TaskCallback | None = None,
        on_cancel: CancelCallback | None = None,
        broadcast_buffer: int = 256,
        register: bool = True,
        hidden: bool = False,
        token: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        tracer_provider: TracerProvider | None = None,
        tags: Iterable[str] = (),
        max_concurrency: int | None = None,
    ) -> None:
        self.urls = (url,) if isinstance(url, str) else tuple(url)
        if not self.urls:
            raise ValueError("give at least one hub URL")
        for each in self.urls:
            parts = urlsplit(each)
            if parts.scheme not in ("ws", "wss") or not parts.hostname:
                raise ValueError(f"hub URL must look like ws://host:port, got {each!r}")
        self.url = self.urls[0]  # the hub it is connected to, or tries next
        self._at = 0  # self.url's place in self.urls
        self.name = name
        self.description = description
        self.capabilities = tuple(
            c if isinstance(c, Capability) else Capability(name=c) for c in capabilities
        )
        self.metadata = metadata or {}
        self.tags = tuple(tags)
        self.max_concurrency = max_concurrency
        self.backoff = backoff or Backoff()
        self.connect_timeout = connect_timeout
        self.on_task = on_task
        self.on_cancel = on_cancel
        self.register = register
        self.hidden = hidden
        self.token = token
        self.ssl_context = ssl_context
        self._tracing = _tracing.RequestTracing(tracer_provider) if _tracing.available else None
        self.agent_id: str | None = None
        self.max_frame_size = 1 << 20  # the hub's limit, as it announces at registration
        self.sessions = 0  # how many times it has registered (1 + reconnections)
        self.attempts = 0  # connection attempts, successful or not
        self.heartbeat_interval: float | None = None
        self._resume: p.Resume | None = None
        self._ws: ClientWebSocket | None = None
        self._online = trio.Event()
        self._dropped = trio.Event()  # set (and replaced) each time the connection drops
        self._replaced: str | None = None  # the hub closed us with 4003: why
        self._closing = False
        self._ids = itertools.count(1)
        self._waiters: dict[str, _Waiter] = {}
        self._tasks: dict[str, TaskHandle] = {}
        self._nursery: trio.Nursery | None = None
        self._broadcast_in, self._broadcast_out = trio.open_memory_channel[p.Envelope](
            broadcast_buffer
        )
        self._watching: _Watching | None = None  # while a `watch` block runs
        self._abandoned: dict[str, None] = {}  # IDs of delegates given up on before a reply
        self._frame_time = 0.0  # when the frame being dispatched was read (trio's clock)

    @property
    def online(self) -> bool:
        return self._online.is_set()

    def _stopped(self) -> bool:
        """Whether `aclose` was called: the client no longer reconnects."""
        return self._closing

    # ---------------------------------------------------------------------------------
    # Running

    async def serve(
        self, *, task_status: trio.TaskStatus[Client] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Connect, register, and stay connected, reconnecting as needed, until `aclose()`
        (then it returns) or cancellation (then the connection is cut).

        Reports the client to `nursery.start` once first registered; a hub that is down
        at start-up is retried. Raises `HubUnavailable` after `backoff.max_attempts`
        failed attempts in a row, and `Replaced` once another connection resumed this
        agent (close code 4003: never reconnected, as docs/protocol.md asks).
        """
        with unwrap_single():
            await self._serve(task_status)

    async def _serve(self, task_status: trio.TaskStatus[Client]) -> None:
        failures = 0
        hubs = len(self.urls)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            while not self._stopped():
                error = "connection closed"
                sessions = self.sessions
                try:
                    await self._connect_once(task_status)
                except BaseException as exc:
                    if _rejected(exc) in (401, 403):
                        raise Unauthorized(
                            f"the hub at {self.url} refused the token (HTTP {_rejected(exc)})"
                        ) from None
                    if not _is_network_failure(exc, StoreUnavailable):
                        raise
                    error = _describe(exc)
                    log.info("hub connection to %s: %s", self.url, error)
                if self._replaced is not None:  # another connection resumed us: not again
                    raise Replaced(
                        f"another connection resumed {self.agent_id} ({self._replaced}); "
                        "not reconnecting"
                    )
                if self.sessions:
                    task_status = trio.TASK_STATUS_IGNORED  # started() was called
                # A connection that registered resets the backoff, and the client tries the
                # same hub again; a failed attempt counts, and moves it to the next hub.
                failures = 0 if self.sessions > sessions else failures + 1
                if self._stopped():  # `aclose` ran during that connection
                    return
                limit = self.backoff.max_attempts
                if limit is not None and failures >= limit:
                    where = f"the hub at {self.url}" if hubs == 1 else f"any of {hubs} hubs"
                    raise HubUnavailable(f"cannot reach {where}: {error}")
                if failures:
                    self._at = (self._at + 1) % hubs
                    self.url = self.urls[self._at]
                    if failures % hubs:
                        continue  # the next hub at once; the backoff after a whole round
                delay = self.backoff.delay(failures // hubs)
                log.debug("reconnecting in %.2fs (failure %d)", delay, failures)
                await trio.sleep(delay)

    async def _connect_once(self, task_status: trio.TaskStatus[Client]) -> None:
        self.attempts += 1
        parts = urlsplit(self.url)
        secure = parts.scheme == "wss"
        port = parts.port or (443 if secure else 80)
        host = parts.hostname or ""
        # This SDK speaks protocol version 2 (docs/protocol.md#versions).
        resource = (parts.path or "/") + "?" + (parts.query + "&" if parts.query else "")
        resource += f"protocol={p.PROTOCOL_VERSION}"
        with trio.fail_after(self.connect_timeout):
            if secure:
                stream: Any = await trio.open_ssl_over_tcp_stream(
                    host, port, ssl_context=self.ssl_context or ssl.create_default_context()
                )
                try:
                    await stream.do_handshake()  # a bad certificate fails here, at once
                except BaseException:
                    await trio.aclose_forcefully(stream)
                    raise
            else:
                stream = await trio.open_tcp_stream(host, port)
        try:
            async with trio.open_nursery() as nursery:
                with trio.fail_after(self.connect_timeout):
                    headers = []
                    if self.token:
                        headers.append((b"Authorization", f"Bearer {self.token}".encode()))
                    ws = await open_client_websocket(
                        nursery,
                        stream,
                        f"{host}:{port}",
                        resource,
                        headers=headers,
                        # Hub frames can be a little over the hub's own input limit
                        # (an envelope around a forwarded payload), and lists are larger.
                        max_message_size=16 * self.max_frame_size,
                    )
                    self._ws = ws
                    registered = await self._register(ws) if self.register else None
                    watching = self._watching
                    if watching is not None and watching.started:  # before any request
                        await ws.send_message(_encode(MT.WATCH, self._next_id(), watching.watch))
                        if self._watching is not watching:  # the block ended meanwhile
                            await ws.send_message(_encode(MT.UNWATCH, self._next_id(), p.Unwatch()))
                self.sessions += 1
                self._online.set()
                if task_status is not trio.TASK_STATUS_IGNORED:
                    task_status.started(self)
                heartbeat = trio.CancelScope()
                nursery.start_soon(self._heartbeat, ws, heartbeat)
                if registered is not None:
                    log.info(
                        "%s %s as %s at %s",
                        self.name,
                        "resumed" if registered.resumed else "registered",
                        self.agent_id,
                        self.url,
                    )
                await self._read_until_closed(ws)
                # Let the writer send the close frame of a closing handshake (ours or
                # the hub's), but not for long.
                heartbeat.cancel()
                nursery.cancel_scope.deadline = trio.current_time() + self.connect_timeout
        finally:
            # Offline first, so that no request finds the event set and no connection.
            self._went_offline()
            self._ws = None
            await trio.aclose_forcefully(stream)  # the WebSocket close, if any, is done

    async def _register(self, ws: ClientWebSocket) -> p.Registered:
        request = p.Register(
            name=self.name,
            description=self.description,
            capabilities=self.capabilities,
            metadata=self.metadata,
            # The outcomes we still wait for: any the hub wrote that never arrived come again.
            resume=attrs.evolve(self._resume, awaiting=tuple(self._tasks))
            if self._resume is not None
            else None,
            hidden=self.hidden,
            tags=self.tags,
            max_concurrency=self.max_concurrency,
        )
        msg_id = self._next_id()
        await ws.send_message(_encode(MT.REGISTER, msg_id, request))
        while True:
            envelope = p.decode_from_hub(await ws.get_message())
            if envelope.in_reply_to == msg_id:
                break
        _raise_if_error(envelope)
        registered: p.Registered = envelope.payload
        if self.agent_id is not None and not registered.resumed:
            self._hub_forgot_us()
        self.agent_id = registered.agent_id
        self.heartbeat_interval = registered.heartbeat_interval
        self.max_frame_size = registered.max_frame_size
        self._resume = p.Resume(agent_id=registered.agent_id, token=registered.resume_token)
        return registered

    def _hub_forgot_us(self) -> None:
        """The hub restarted (or dropped us for good): our tasks there are gone."""
        log.warning("the hub no longer knew %s; registered afresh", self.agent_id)
        for handle in list(self._tasks.values()):
            handle._finish(
                None, HubRestarted(handle.task_id, "the hub restarted and lost this task")
            )
        self._tasks.clear()

    async def _heartbeat(self, ws: ClientWebSocket, scope: trio.CancelScope) -> None:
        """Heartbeat at the interval the hub announced (an unregistered client, which was
        told none, every 10 s), so the hub never takes a quiet client for a dead one."""
        with scope:
            while True:
                await trio.sleep(self.heartbeat_interval or _LOOKER_HEARTBEAT)
                try:
                    await ws.send_message(_encode(MT.HEARTBEAT, self._next_id(), p.Heartbeat()))
                except ConnectionClosed:
                    return  # the reader notices too

    async def _read_until_closed(self, ws: ClientWebSocket) -> None:
        """Dispatch frames until the connection closes or the hub is silent too long
        (3 heartbeat intervals, up to a tenth more; only when registered, since only then
        do we heartbeat). Cancelling it stops the reading; nothing read is lost."""
        silence = 3 * (self.heartbeat_interval or _LOOKER_HEARTBEAT)
        slack = silence / 10  # the deadline moves at most that often: moving it costs
        with trio.CancelScope() as liveness:
            moved = trio.current_time()
            liveness.deadline = moved + silence + slack
            while True:
                try:
                    frame = await ws.get_message()
                except ConnectionClosed as closed:
                    if closed.reason.code == p.CLOSE_REPLACED:
                        self._replaced = closed.reason.reason or "replaced"
                    return
                now = self._frame_time = ws.read_time
                if now - moved > slack:
                    # At least `silence` after the last frame: that one came at most
                    # `slack` after `moved`.
                    moved, liveness.deadline = now, now + silence + slack
                try:
                    decoded = p.decode_from_hub(frame)
                except p.ProtocolError as exc:
                    log.warning("ignoring a frame from the hub that does not parse: %s", exc)
                    continue
                self._dispatch(decoded)
        log.warning("the hub said nothing for %gs; reconnecting", silence)

    def _went_offline(self) -> None:
        self._abandoned.clear()  # their replies would have come on that connection
        if self._online.is_set():
            self._online = trio.Event()
        self._dropped.set()
        self._dropped = trio.Event()
        for waiter in self._waiters.values():
            waiter.error = ConnectionLost("the hub connection dropped before the reply came")
            waiter.wake()
        self._waiters.clear()

    # ---------------------------------------------------------------------------------
    # Incoming frames

    def _dispatch(self, envelope: p.Envelope) -> None:
        """Act on a frame from the hub."""
        type_, in_reply_to, payload = envelope.type, envelope.in_reply_to, envelope.payload
        if in_reply_to is not None:
            waiter = self._waiters.pop(in_reply_to, None)
            if waiter is None and self._abandoned.pop(in_reply_to, False) is None:
                if type_ is MT.DELEGATE:  # a task nobody waits for
                    self._spawn(self._cancel_quietly, payload.task_id)
                return
            if waiter is not None:
                waiter.envelope = envelope
                if type_ is MT.DELEGATE:
                    # Track the task before anything else is read: its result may be next.
                    delegated: p.Delegated = payload
                    request, span = waiter.request, waiter.span
                    waiter.handle = TaskHandle(
                        self,
                        delegated.task_id,
                        delegated.agent_id,
                        delegated.state,
                        traceparent=request.traceparent if request else None,
                        tracestate=request.tracestate if request else None,
                        span=span,
                        waiter=waiter if waiter.until_done else None,
                    )
                    if span is not None:
                        _tracing.RequestTracing.accepted(span, delegated)
                    self._tasks[delegated.task_id] = waiter.handle
                    if waiter.until_done:
                        return  # the task's end wakes it
                waiter.wake()
            elif type_ is MT.ERROR:
                log.warning("hub error: %s", payload.message)
            return
        if type_ is MT.RESULT:
            handle = self._tasks.pop(payload.task_id, None)
            if handle is not None:
                handle._finish(payload)
        elif type_ is MT.DELEGATE:
            if self.on_task is None:
                self._spawn(self.send_result, payload.task_id, False, None, "not an agent")
            else:
                self.on_task(payload, envelope.sender or "")
        elif type_ is MT.STATUS:
            handle = self._tasks.get(payload.task_id)
            if handle is not None:  # delivered late, or taken from the hub's queue
                handle.state = payload.state
                handle.agent_id = payload.assignee or handle.agent_id
        elif type_ is MT.PROGRESS:
            handle = self._tasks.get(payload.task_id)
            if handle is not None:
                handle._progressed(payload)
        elif type_ is MT.EVENT:
            if self._watching is not None:
                self._watching.put(payload)
        elif type_ is MT.BROADCAST:
            try:
                self._broadcast_in.send_nowait(envelope)
            except trio.WouldBlock:
                log.warning("broadcast buffer full; dropping a broadcast from %s", envelope.sender)
        elif type_ is MT.CANCEL:
            if self.on_cancel is not None:
                self.on_cancel(payload.task_id, payload.reason)
        elif type_ is MT.ERROR:
            log.warning("hub error: %s", payload.message)

    def _spawn(self, fn: Callable[..., Any], *args: Any) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(fn, *args)

    # ---------------------------------------------------------------------------------
    # Requests

    async def _request(
        self, type_: p.MessageType, payload: Any, *, to: str | None = None
    ) -> p.Envelope:
        """Send a request once connected and return the reply envelope (see `_exchange`)."""
        envelope = (await self._exchange(type_, payload, to=to)).envelope
        assert envelope is not None
        return envelope

    async def _exchange(
        self,
        type_: p.MessageType,
        payload: Any,
        *,
        to: str | None = None,
        waiter: _Waiter | None = None,
    ) -> _Waiter:
        """Send a request once connected and wait for its reply (on `waiter`, if given).

        Raises the typed error for an error frame, or `ConnectionLost` if the connection
        drops first. Cancellation abandons the wait (the request may still be carried out).
        """
        ws = await self._connection()
        msg_id = self._next_id()
        waiter = self._waiters[msg_id] = waiter or _Waiter()
        try:
            try:
                await ws.send_message(_encode(type_, msg_id, payload, to=to))
            except ConnectionClosed:
                raise ConnectionLost("the hub connection dropped while sending") from None
            await waiter.wait()
        finally:
            if self._waiters.pop(msg_id, None) is not None and type_ is MT.DELEGATE:
                # Given up on before the reply (cancelled): if the hub made the task,
                # cancel it when the reply comes, or it would run with nobody waiting.
                self._abandoned[msg_id] = None
                while len(self._abandoned) > _ABANDONED:
                    self._abandoned.pop(next(iter(self._abandoned)))
        if waiter.error is not None:
            raise waiter.error
        if waiter.envelope is not None:
            _raise_if_error(waiter.envelope)
        return waiter

    async def _send(self, type_: p.MessageType, payload: Any) -> None:
        """Send a frame that has no reply on success, once connected; retry across drops."""
        while True:
            ws = await self._connection()
            try:
                await ws.send_message(_encode(type_, self._next_id(), payload))
                return
            except ConnectionClosed:
                if self._ws is ws:  # not already replaced by a new connection
                    self._went_offline()  # then wait for the reconnection and send again

    async def _connection(self) -> ClientWebSocket:
        """The live connection, at once if there is one (without yielding: no await
        between the check and the caller's use of it), else once there is one.
        Cancellation interrupts the wait."""
        while True:
            ws = self._ws
            if ws is not None and self._online.is_set():
                if ws.closed is None:
                    return ws
                # Closed by the hub, not yet noticed by the reader: a request sent now
                # would fail unsent. Wait for the next connection instead.
                await self._dropped.wait()
            else:
                await self._online.wait()

    async def discover(
        self,
        capability: str = "",
        *,
        online: bool = False,
        tags: Iterable[str] = (),
        limit: int = 100,
        cursor: str | None = None,
    ) -> list[p.AgentInfo]:
        """Agents a keyword matches, best first: a capability of that name, then one whose
        name has its words in that order, then agents whose text (capability names and
        descriptions, the agent's name, description and tags) has all its words; each
        with its `match`. `online` keeps only the agents online, `tags` those with every
        one of them. One page of up to `limit` (1 to 1000): see `discover_page`."""
        page = await self.discover_page(
            capability, online=online, tags=tags, limit=limit, cursor=cursor
        )
        return list(page.agents)

    async def discover_page(
        self,
        capability: str = "",
        *,
        online: bool = False,
        tags: Iterable[str] = (),
        limit: int = 100,
        cursor: str | None = None,
    ) -> p.AgentList:
        """A page of `discover`, with the `next_cursor` to pass for the next (None after
        the last). A reply also stops short of the hub's `max_reply_size`."""
        request = p.Discover(
            capability=capability, limit=limit, cursor=cursor, online=online, tags=tuple(tags)
        )
        page: p.AgentList = (await self._request(MT.DISCOVER, request)).payload
        return page

    async def submit(
        self,
        capability: str,
        params: dict[str, Any] | None = None,
        *,
        to: str | None = None,
        ttl: float | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        priority: int = 0,
    ) -> TaskHandle:
        """Delegate a task and return its handle once the hub has taken it (see
        `TaskHandle.wait`). Cancelled before the hub's answer, the task is cancelled when
        the answer comes.

        Without `ttl`, the caller's Trio deadline (if any) becomes the task's TTL. When
        every capable agent is full, the task waits at the hub (PENDING, its place in
        `status`): `priority` (-100 to 100) goes first, higher first.

        The delegate carries `traceparent` and `tracestate` (W3C trace context) as given.
        Without them, and with opentelemetry set up, a CLIENT span ``agentmesh delegate
        <capability>`` starts in the current context, its context goes with the
        delegate, and it ends when the task does (docs/tracing.md).
        """
        waiter = self._delegation(
            capability, params, to, ttl, traceparent, tracestate, priority=priority
        )
        return await self._delegate(waiter, to)

    def _delegation(
        self,
        capability: str,
        params: dict[str, Any] | None,
        to: str | None,
        ttl: float | None,
        traceparent: str | None,
        tracestate: str | None,
        *,
        priority: int = 0,
        until_done: bool = False,
    ) -> _Waiter:
        """The waiter of a delegate about to be sent, with its TTL (the caller's deadline,
        if none is given) and its span, if tracing."""
        if ttl is None:
            deadline = trio.current_effective_deadline()
            if deadline != math.inf:
                ttl = max(deadline - trio.current_time(), 0.001)
        span = None
        if traceparent is None and self._tracing is not None:
            started = self._tracing.request(capability, to)
            if started is not None:
                span, traceparent, tracestate = started
        request = p.Delegate(
            capability=capability,
            params=params or {},
            ttl=ttl,
            traceparent=traceparent,
            tracestate=tracestate,
            priority=priority,
        )
        return _Waiter(request, span, until_done=until_done)

    async def _delegate(self, waiter: _Waiter, to: str | None) -> TaskHandle:
        """Send the waiter's delegate and wait: for the hub's answer, or with
        `until_done` for the task's end (one wake-up, not two). Cancellation abandons
        the wait; `waiter.handle` is then the task if the hub took it."""
        try:
            await self._exchange(MT.DELEGATE, waiter.request, to=to, waiter=waiter)
        except BaseException as exc:
            if waiter.span is not None and waiter.handle is None:  # else the handle ends it
                _tracing.RequestTracing.refused(waiter.span, exc)
            raise
        handle = waiter.handle
        assert handle is not None
        return handle

    async def delegate(
        self,
        capability: str,
        params: dict[str, Any] | None = None,
        *,
        to: str | None = None,
        ttl: float | None = None,
        traceparent: str | None = None,
        tracestate: str | None = None,
        priority: int = 0,
    ) -> Any:
        """Delegate a task to `to` (an agent ID) or to any agent offering `capability`,
        and return its result data. Trace context and `priority`: as for `submit`.

        Raises `NoCapableAgent`, `UnknownAgent`, `TaskFailed`, `TaskTimeout`,
        `TaskCancelled`, or `HubRestarted`. If the caller is cancelled (or its deadline
        passes) while waiting, the task is cancelled at the hub and in the agent.
        """
        waiter = self._delegation(
            capability, params, to, ttl, traceparent, tracestate, priority=priority, until_done=True
        )
        try:
            handle = await self._delegate(waiter, to)
        except trio.Cancelled:
            taken = waiter.handle  # None: not taken yet (it is cancelled when it is)
            if taken is not None and not taken.done:
                self._spawn(self._cancel_quietly, taken.task_id)
            raise
        return handle._result()

    async def _cancel_quietly(self, task_id: str) -> None:
        try:
            with trio.move_on_after(self.connect_timeout):
                await self.cancel(task_id, "the requester stopped waiting")
        except Exception as exc:  # the task may have ended meanwhile
            log.debug("cancel of %s: %s", task_id, exc)

    async def cancel(self, task_id: str, reason: str | None = None) -> None:
        """Cancel a task this client delegated."""
        await self._request(MT.CANCEL, p.Cancel(task_id=task_id, reason=reason))

    async def status(self, task_id: str | None = None) -> p.TaskInfo | p.HubSummary:
        """A task's record (yours, or assigned to you), or without `task_id` the hub's summary."""
        reply = await self._request(MT.STATUS, p.Status(task_id=task_id))
        result: p.TaskInfo | p.HubSummary = reply.payload
        return result

    async def list_tasks(
        self,
        state: str | None = None,
        limit: int = 100,
        *,
        cursor: str | None = None,
        requester: str | None = None,
        assignee: str | None = None,
    ) -> list[p.TaskInfo]:
        """Tasks newest first, optionally in one state, asked for by `requester`, given to
        `assignee`: this client's own (asked for or assigned), or every task when the
        client did not register. One page of up to `limit` (1 to 1000): see
        `list_tasks_page` for the rest."""
        page = await self.list_tasks_page(
            state, limit, cursor=cursor, requester=requester, assignee=assignee
        )
        return list(page.tasks)

    async def list_tasks_page(
        self,
        state: str | None = None,
        limit: int = 100,
        *,
        cursor: str | None = None,
        requester: str | None = None,
        assignee: str | None = None,
    ) -> p.TaskList:
        """A page of `list_tasks`, with the `next_cursor` to pass for the next (None after
        the last). A page may hold fewer than `limit` and still have a cursor: the hub
        stops at `max_reply_size` bytes and after looking at a few thousand tasks."""
        request = p.ListTasks(
            state=state, limit=limit, cursor=cursor, requester=requester, assignee=assignee
        )
        page: p.TaskList = (await self._request(MT.LIST_TASKS, request)).payload
        return page

    async def broadcast(self, message: str, data: Any = None) -> int:
        """Send to every other online agent; return how many it reached."""
        reply = await self._request(MT.BROADCAST, p.Broadcast(message=message, data=data))
        recipients: int = reply.payload.recipients
        return recipients

    def broadcasts(self) -> trio.MemoryReceiveChannel[p.Envelope]:
        """Broadcasts from other agents as they arrive (``async for``, or ``.receive()``);
        each envelope's `sender` says who sent it, its payload is a `Broadcast`. Up to
        `broadcast_buffer` wait unread; later ones are dropped with a warning."""
        return self._broadcast_out

    @asynccontextmanager
    async def watch(
        self, kinds: Iterable[str] = (), *, buffer: int = 1024
    ) -> AsyncIterator[trio.MemoryReceiveChannel[p.Event]]:
        """The network's events (`protocol.Event`: agents joining and leaving, tasks
        changing state, progress, broadcasts) for the duration of the block, of `kinds`
        (see `protocol.EVENT_KINDS`; all if empty)::

            async with client.watch(["task_state"]) as events:
                async for event in events:
                    print(event.task.task_id, event.task.state)

        On a hub with tokens, the agent kinds (`protocol.AGENT_EVENT_KINDS`, hidden
        agents left out) are anyone's; the others need the admin token (else `Forbidden`
        is raised on entry), and a non-admin's watch without kinds gets the agent kinds.
        Up to `buffer` events wait unread; the ones after are dropped, and the next one
        kept says how many in its `missed` (as the hub's does for events it could not
        send). Across a reconnection the watch is sent again, before any other request
        on the new connection; the events in between are lost (`seq` jumps). One watch
        per client at a time. Leaving the block sends `unwatch` (unless the connection
        is down or closing).
        """
        if self._watching is not None:
            raise RuntimeError("this client is already watching; leave that block first")
        watching = self._watching = _Watching(tuple(kinds), buffer)
        try:
            await self._request(MT.WATCH, watching.watch)
            watching.started = True
            with watching.receive:
                yield watching.receive
        finally:
            self._watching = None
            watching.send.close()
            if watching.started and self.online and not self._closing:
                with trio.move_on_after(self.connect_timeout) as scope:
                    scope.shield = True
                    try:
                        await self._request(MT.UNWATCH, p.Unwatch())
                    except AgentMeshError as exc:
                        log.debug("unwatch: %s", exc)

    async def send_result(
        self, task_id: str, success: bool, data: Any = None, error: str | None = None
    ) -> None:
        """Report a task's outcome (agents). Waits for the connection if it is down."""
        await self._send(
            MT.RESULT, p.Result(task_id=task_id, success=success, data=data, error=error)
        )

    def _send_result_now(
        self, task_id: str, success: bool, data: Any = None, error: str | None = None
    ) -> bool:
        """`send_result` if it need not wait: True once the result is queued on the live
        connection; False, with nothing sent, if the connection is down or its outbox is
        full (then `send_result`, which waits)."""
        ws = self._ws
        if ws is None or not self._online.is_set():
            return False
        # The payload as the wire has it (what `p.Result` unstructures to).
        result = {"task_id": task_id, "success": success, "data": data, "error": error}
        return ws.send_nowait(_encode(MT.RESULT, self._next_id(), result))

    async def send_progress(
        self,
        task_id: str,
        progress: float | None = None,
        message: str | None = None,
        data: Any = None,
        *,
        traceparent: str | None = None,
        tracestate: str | None = None,
    ) -> None:
        """Report progress on a task (agents). Dropped if the connection is down. Without
        trace context the hub gives the requester the task's."""
        ws = self._ws
        if ws is None or not self.online:
            return
        update = p.Progress(
            task_id=task_id,
            progress=progress,
            message=message,
            data=data,
            traceparent=traceparent,
            tracestate=tracestate,
        )
        try:
            await ws.send_message(_encode(MT.PROGRESS, self._next_id(), update))
        except ConnectionClosed:
            pass

    async def aclose(self) -> None:
        """Deregister (the hub cancels this client's unfinished requests and fails the tasks
        it still holds) and close the connection. Bounded by `connect_timeout`. The
        handles of tasks still unfinished end with `TaskCancelled` (the hub cancels them,
        and no outcome comes to a client that left)."""
        ws = self._ws
        try:
            if self._closing or ws is None or not self.online:
                self._closing = True
                if self._nursery is not None:
                    self._nursery.cancel_scope.cancel()  # stop reconnecting; serve returns
                return
            self._closing = True
            with trio.move_on_after(self.connect_timeout):
                if self.register:  # a client that only looked has nothing to deregister
                    try:
                        await self._request(MT.DEREGISTER, p.Deregister())
                    except Exception as exc:
                        log.debug("deregister: %s", exc)
                await ws.aclose(1000, "client closing")
        finally:
            handles, self._tasks = self._tasks, {}
            for handle in handles.values():
                reason = "the requester closed its client before the task ended"
                handle._finish(None, TaskCancelled(handle.task_id, reason))

    def _next_id(self) -> str:
        return f"m{next(self._ids)}"


@asynccontextmanager
async def connect(
    url: str | Sequence[str] = "ws://127.0.0.1:8765", **options: Any
) -> AsyncIterator[Client]:
    """A registered `Client` for the duration of the block (see `Client` for options;
    `url` may be several hubs' URLs).

    Waits until registered (a hub that is down is retried: bound it with
    ``trio.fail_after``). Leaving the block deregisters and closes the connection.
    """
    client = Client(url, **options)
    serving = trio.CancelScope()
    with unwrap_single():
        async with trio.open_nursery() as nursery:
            await nursery.start(_serve_shielded, client, serving)
            try:
                yield client
            finally:
                with trio.CancelScope(shield=True):
                    await client.aclose()
                serving.cancel()
                nursery.cancel_scope.cancel()


class _ShieldOnStart(trio.TaskStatus[Client]):
    """A task status that shields `scope` once `started` is called, then passes it on."""

    def __init__(self, scope: trio.CancelScope, status: trio.TaskStatus[Client]) -> None:
        self._scope = scope
        self._status = status

    def started(self, value: Client | None = None) -> None:
        assert value is not None
        self._scope.shield = True
        self._status.started(value)


async def _serve_shielded(
    client: Client,
    scope: trio.CancelScope,
    *,
    task_status: trio.TaskStatus[Client] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`client.serve` in `scope`, which is shielded from the outside once the client has
    registered: leaving `connect` cancelled (a Ctrl+C) still deregisters over a live
    connection, and cancelling `scope` (after `aclose`) stops it. Before that, outside
    cancellation stops the connecting."""
    with scope:
        await client.serve(task_status=_ShieldOnStart(scope, task_status))


def _encode(type_: p.MessageType, msg_id: str, payload: Any, *, to: str | None = None) -> bytes:
    return p.encode_utf8(
        type_, msg_id, payload, sender=None, to=to, timestamp=time.time(), in_reply_to=None
    )


def _raise_if_error(envelope: p.Envelope) -> None:
    """Raise the typed exception for an `error` reply."""
    if envelope.type is MT.ERROR:
        error: p.Error = envelope.payload
        raise hub_error(error.code.value, error.message, error.details)


def _rejected(exc: BaseException) -> int | None:
    """The HTTP status of a refused handshake inside `exc`, if that is what it is."""
    if isinstance(exc, BaseExceptionGroup):
        statuses = [_rejected(e) for e in exc.exceptions]
        return next((s for s in statuses if s is not None), None)
    if isinstance(exc, HandshakeRejected):
        return exc.status_code
    return None


def _is_network_failure(exc: BaseException, *also: type[BaseException]) -> bool:
    """Whether `exc` (every exception in it, if a group) is one of the errors that a
    reconnect answers, or of `also`."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_is_network_failure(e, *also) for e in exc.exceptions)
    return isinstance(exc, (*_NETWORK_ERRORS, *also))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    if isinstance(exc, HandshakeRejected):  # something answered HTTP, but not a hub
        return f"it is not an agentmesh hub (HTTP {exc.status_code} to the WebSocket upgrade)"
    text = str(exc) or type(exc).__name__
    if exc.__cause__ is not None:
        text += f": {_describe(exc.__cause__)}"
    return text
