"""Agents in a few lines, in two styles, on top of the client.

Functional, for quick scripts::

    agent = Agent("echo", description="Says it back")

    @agent.capability("echo")
    async def echo(text: str) -> str:
        return text

    agent.run("ws://127.0.0.1:8765")

Class-based, for agents with state::

    class Reviewer(Agent):
        @capability("code-review", description="Reviews Python code")
        async def review(self, code: str, ctx: TaskContext) -> dict[str, Any]: ...

Each task runs in a cancel scope carrying the task's deadline (the scope of the worker
that runs it: a handler that returns without waiting costs no task of its own); a
`cancel` from the hub cancels it. Params are checked against the handler's signature
before the call. Plain (non-async) handlers run in a worker thread so they cannot stall
the connection.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import signal
import types
from collections import OrderedDict, deque
from collections.abc import Callable, Generator, Iterable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import orjson
import trio

from . import _tracing
from . import protocol as p
from ._params import BadParams, Signature
from .client import Client
from .registry import Capability

if TYPE_CHECKING:
    from opentelemetry.trace import Span

__all__ = ["Agent", "TaskContext", "capability"]

log = logging.getLogger("agentmesh.agent")
F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__agentmesh_capability__"
Outcome = tuple[bool, Any, "str | None"]  # a result to send: success, data, error


@attrs.define(kw_only=True, eq=False)
class TaskContext:
    """What a handler may know about its task. Ask for it by annotating a parameter
    with this type; it is not a param of the capability.

    `traceparent`/`tracestate`: the W3C trace context of the task frame (None if it had
    none), to pass on to whatever the handler calls. Its progress frames carry none of
    their own: the hub stamps the task's on what it forwards."""

    task_id: str
    capability: str
    requester: str
    deadline: float  # on trio's clock
    traceparent: str | None = None
    tracestate: str | None = None
    _client: Client = attrs.field(alias="client", repr=False)

    async def progress(
        self, progress: float | None = None, message: str | None = None, data: Any = None
    ) -> None:
        """Tell the requester how far along the task is (best effort, never blocks long).

        From a plain handler running in a thread: ``trio.from_thread.run(ctx.progress, 0.5)``.
        """
        await self._client.send_progress(self.task_id, progress, message, data)


@attrs.frozen
class _Handler:
    capability: Capability
    fn: Callable[..., Any]
    signature: Signature
    is_async: bool


_LOCAL_LIMIT = 16  # handlers at once, for an agent that declares no `max_concurrency`


def capability(
    name: str | None = None,
    *,
    description: str | None = None,
    max_concurrency: int | None = None,
) -> Callable[[F], F]:
    """Mark a method of an `Agent` subclass as a capability (default name: the method's,
    with dashes). The description defaults to the docstring's first paragraph;
    `max_concurrency` bounds its tasks running at once (the hub holds the rest)."""

    def mark(fn: F) -> F:
        setattr(fn, _MARK, (name, description, max_concurrency))
        return fn

    return mark


class Agent:
    """An agent: a name, capabilities, and handlers for them.

    `max_concurrency` bounds the handlers running at once, and the agent registers it:
    the hub never sends more, and holds the tasks past it in its queue for whichever
    capable agent frees a slot first. Left None, up to 16 handlers run at once, the hub is
    not told, and it sends the agent every task it picks it for (as before hubs had
    limits; an older hub refuses the field). `tags` are words to be found by (`discover`).
    `shutdown_grace` is how long in-flight tasks may finish on a graceful shutdown
    before they are cancelled.
    Subclasses may override the `setup` and `teardown` hooks.
    """

    name: str = ""
    description: str = ""

    def __init__(
        self,
        name: str | None = None,
        *,
        description: str | None = None,
        metadata: dict[str, Any] | None = None,
        max_concurrency: int | None = None,
        shutdown_grace: float = 10.0,
        tags: Iterable[str] = (),
    ) -> None:
        self.name = name or self.name or type(self).__name__
        self.description = description if description is not None else self.description
        self.metadata = metadata or {}
        self.shutdown_grace = shutdown_grace
        self.max_concurrency = max_concurrency
        self.tags = tuple(tags)
        self.client: Client | None = None
        self._max_concurrency = max_concurrency or _LOCAL_LIMIT  # workers at most
        self._handlers: dict[str, _Handler] = {}
        self._running: dict[str, _Job] = {}  # delivered, not ended: queued or running
        self._queue: deque[_Job] = deque()  # waiting for a worker
        self._idle = trio.lowlevel.ParkingLot()  # workers waiting for jobs
        self._workers = 0
        self._awake = 0  # workers neither idle nor suspended in a handler
        self._cancelled_by_hub: dict[str, str | None] = {}  # task ID -> the hub's reason
        # Tasks run to their end, with the outcome sent (None: ended by the hub's cancel
        # or the TTL, nothing to send): a task delivered again is never run twice.
        self._finished: OrderedDict[str, Outcome | None] = OrderedDict()
        self._tasks: trio.Nursery | None = None
        self._stopping = trio.Event()
        self._connecting: trio.CancelScope | None = None  # the first connection, until it is up
        self._accepting = False
        self._drained: trio.Event | None = None  # set when the last task ends, on shutdown
        for attr in dir(type(self)):
            marked = getattr(getattr(type(self), attr, None), _MARK, None)
            if marked is not None:
                method = getattr(self, attr)
                self._add(marked[0] or attr.replace("_", "-"), method, *marked[1:])

    # ---------------------------------------------------------------------------------
    # Declaring capabilities

    def capability(
        self,
        name: str | None = None,
        *,
        description: str | None = None,
        max_concurrency: int | None = None,
    ) -> Callable[[F], F]:
        """Decorator: register a function (async or plain) as the handler of `name`;
        `max_concurrency` bounds its tasks running at once (the hub holds the rest)."""

        def register(fn: F) -> F:
            self._add(name or fn.__name__.replace("_", "-"), fn, description, max_concurrency)
            return fn

        return register

    def _add(
        self,
        name: str,
        fn: Callable[..., Any],
        description: str | None,
        max_concurrency: int | None = None,
    ) -> None:
        key = name.strip().lower()
        if key in self._handlers:
            raise ValueError(f"capability {name!r} is declared twice")
        signature = Signature.of(fn, TaskContext)
        self._handlers[key] = _Handler(
            capability=Capability(
                name=name,
                description=description if description is not None else signature.summary,
                params_schema=signature.schema,
                max_concurrency=max_concurrency,
            ),
            fn=fn,
            signature=signature,
            is_async=_is_async(fn),
        )

    @property
    def capabilities(self) -> tuple[Capability, ...]:
        return tuple(h.capability for h in self._handlers.values())

    # ---------------------------------------------------------------------------------
    # Hooks

    async def setup(self) -> None:
        """Called once before connecting: open what the handlers need."""

    async def teardown(self) -> None:
        """Called once after deregistering, even after a failure (shielded, bounded)."""

    # ---------------------------------------------------------------------------------
    # Running

    def run(self, url: str | Sequence[str] = "ws://127.0.0.1:8765", **client_options: Any) -> None:
        """Serve until SIGINT or SIGTERM, then shut down gracefully (a second signal
        cancels at once; the first stops an agent that is still trying to connect).
        Blocks; for scripts: unless logging is set up already, it logs at INFO to stderr
        (where it connected and as whom, tasks that failed)."""
        if not logging.getLogger().handlers:
            logging.basicConfig(
                level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
        trio.run(partial(self._run_until_signalled, url, **client_options))

    async def _run_until_signalled(self, url: str | Sequence[str], **client_options: Any) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with trio.open_nursery() as nursery:

                async def serve_then_stop() -> None:
                    await self.serve(url, **client_options)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(serve_then_stop)
                async for signum in signals:
                    if self._stopping.is_set():
                        log.warning("second %s: stopping now", signal.Signals(signum).name)
                        nursery.cancel_scope.cancel()
                        break
                    log.info("%s: shutting down gracefully", signal.Signals(signum).name)
                    self.shutdown()

    def shutdown(self) -> None:
        """Stop taking tasks, let in-flight ones finish within `shutdown_grace`, cancel the
        rest (their requesters hear FAILED), deregister; then `serve` returns. An agent
        that never connected yet stops trying, and `serve` returns at once."""
        self._stopping.set()
        if self._connecting is not None:
            self._connecting.cancel()

    async def serve(
        self,
        url: str | Sequence[str] = "ws://127.0.0.1:8765",
        *,
        task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED,
        **client_options: Any,
    ) -> None:
        """Run `setup`, connect, serve tasks until `shutdown()` (or cancellation), then
        deregister and run `teardown`. Reports the agent to `nursery.start` once registered.

        On cancellation, handlers are cancelled at once and the connection is cut without
        deregistering: the hub treats it as a drop, so its tasks wait `resume_grace` and then
        fail. Use `shutdown()` for a clean exit.
        """
        await self.setup()
        client = self.client = Client(
            url,
            name=self.name,
            description=self.description,
            capabilities=self.capabilities,
            metadata=self.metadata,
            tags=self.tags,
            max_concurrency=self.max_concurrency,
            on_task=self._on_task,
            on_cancel=self._on_cancel,
            **client_options,
        )
        try:
            async with trio.open_nursery() as connection:
                async with trio.open_nursery() as tasks:
                    self._tasks = tasks
                    self._accepting = True
                    with trio.CancelScope() as connecting:
                        self._connecting = connecting
                        if self._stopping.is_set():
                            connecting.cancel()
                        await connection.start(client.serve)
                    self._connecting = None
                    if connecting.cancelled_caught:  # shut down before it ever connected
                        connection.cancel_scope.cancel()
                        return
                    task_status.started(self)
                    await self._stopping.wait()
                    self._accepting = False
                    self._awake += len(self._idle)
                    self._idle.unpark_all()  # idle workers see that, and end
                    self._drained = trio.Event()
                    if self._running:
                        with trio.move_on_after(self.shutdown_grace):
                            await self._drained.wait()
                    for job in list(self._running.values()):
                        job.cancel()
                    # Results of cancelled tasks wait for a connection; not forever.
                    tasks.cancel_scope.deadline = trio.current_time() + self.shutdown_grace
                with trio.CancelScope(shield=True):
                    await client.aclose()
                connection.cancel_scope.cancel()
        finally:
            self._accepting = False
            with trio.CancelScope(shield=True), trio.move_on_after(client.connect_timeout):
                await client.aclose()
                await self.teardown()

    # ---------------------------------------------------------------------------------
    # Tasks
    #
    # A delivered task is a `_Job`, queued for a worker: a task in the `tasks` nursery
    # that runs jobs one after another, each in the worker's cancel scope with the job's
    # deadline. A handler that returns without suspending (the common case) costs no task
    # of its own and no scope of its own; one that suspends keeps its worker, and another
    # worker (woken, or started, up to `max_concurrency`) takes the jobs queued behind it.
    # The hub's cancel, or the TTL, cancels the worker's scope: the handler ends, and the
    # worker carries on in a new scope.

    def _on_task(self, task: p.TaskAssignment, requester: str) -> None:
        if task.task_id in self._running:
            return  # delivered again after a resume: already at work on it
        if task.task_id in self._finished:
            finished = self._finished[task.task_id]
            if finished is not None:  # our result may have been lost in a drop: again
                self._send_result(task.task_id, finished)
            return  # else it ended here by the hub's cancel or its TTL: the hub ends it too
        handler = self._handlers.get(task.capability)  # as declared, or else:
        if handler is None:
            handler = self._handlers.get(task.capability.strip().lower())
        if not self._accepting or handler is None:
            error = (
                "the agent is shutting down"
                if not self._accepting
                else f"this agent has no capability {task.capability!r}"
            )
            self._send_result(task.task_id, (False, None, error))
            return
        assert self.client is not None  # the TTL runs from when the task frame was read
        job = _Job(task, requester, handler, self.client._frame_time + task.ttl)
        self._running[task.task_id] = job
        self._queue.append(job)
        if not self._awake:
            self._summon()

    def _on_cancel(self, task_id: str, reason: str | None) -> None:
        job = self._running.get(task_id)
        if job is not None:
            log.info("task %s cancelled by the hub: %s", task_id, reason)
            self._cancelled_by_hub[task_id] = reason
            job.cancel()

    def _summon(self) -> None:
        """Get a worker to the queue: an idle one, or a new one below `max_concurrency`
        (else every worker is in a handler, and the first to finish takes the next job)."""
        if self._idle:
            self._awake += 1
            self._idle.unpark()
        elif self._workers < self._max_concurrency:
            assert self._tasks is not None
            self._workers += 1
            self._awake += 1
            self._tasks.start_soon(self._work)

    async def _work(self) -> None:
        """A worker: the queue's jobs, one at a time, until the agent stops accepting
        tasks and the queue is empty. Cancelled (the agent is going away), the handler
        it runs is cancelled and nothing is sent for its task."""
        job: _Job | None = None
        try:
            while True:
                with trio.CancelScope() as scope:
                    now = trio.current_time()  # again after each wait: jobs run in between
                    while True:
                        while not self._queue:
                            if not self._accepting:
                                return
                            await self._wait_for_job()
                            now = trio.current_time()
                        job = self._queue.popleft()
                        outcome = await self._handle(job, scope, now)
                        self._ended(job, outcome)
                        suspended, job = job.suspended, None
                        if suspended:  # the scope may have been cancelled meanwhile
                            if scope.cancel_called:
                                break
                            now = trio.current_time()
                if job is not None:  # the scope was cancelled: by the hub, the TTL, shutdown
                    self._ended(job, None)
                    job = None
                # Else the scope was cancelled after its handler returned (a handler
                # that swallowed `Cancelled`), or an earlier job's deadline passed while
                # this worker waited: the next job gets a new scope.
        finally:
            self._workers -= 1
            self._awake -= 1
            if job is not None:  # cancelled from outside: the agent is going away
                self._lost(job)

    async def _wait_for_job(self) -> None:
        """Park until `_summon` (which counts the worker awake again) or shutdown."""
        self._awake -= 1
        try:
            await self._idle.park()
        except BaseException:  # cancelled while idle: count ourselves back
            self._awake += 1
            raise

    async def _handle(self, job: _Job, scope: trio.CancelScope, now: float) -> Outcome | None:
        """Run the job's handler in `scope` (its deadline set to the job's); its outcome,
        or None if the job was cancelled or out of time (at `now`) before it started.
        Raises `Cancelled` if the scope is cancelled while the handler runs."""
        client = self.client
        assert client is not None
        task, handler = job.task, job.handler
        if job.cancelled or now >= job.deadline:
            return None  # cancelled, or its TTL ran out, while it waited in the queue
        if scope.deadline != job.deadline:
            scope.deadline = job.deadline
        job.scope = scope
        tracing = client._tracing
        span = job.span = tracing.handler(task, job.requester) if tracing is not None else None
        try:
            kwargs = handler.signature.bind(task.params)
            if handler.signature.context_param:
                kwargs[handler.signature.context_param] = TaskContext(
                    task_id=task.task_id,
                    capability=task.capability,
                    requester=job.requester,
                    deadline=job.deadline,
                    traceparent=task.traceparent,
                    tracestate=task.tracestate,
                    client=client,
                )
            if span is None:
                result = await self._call(job, kwargs)
            else:
                with _tracing.RequestTracing.current(span):
                    result = await self._call(job, kwargs)
            return _serialisable(result, client.max_frame_size - 1024)
        except BadParams as exc:
            return False, None, f"bad params: {exc}"
        except Exception as exc:
            job.raised = exc
            log.warning("task %s (%s) failed", task.task_id, task.capability, exc_info=True)
            return False, None, f"{type(exc).__name__}: {exc}"

    async def _call(self, job: _Job, kwargs: dict[str, Any]) -> Any:
        """The handler's return value. It runs here, in the worker, in a copy of the
        worker's context (what it sets there stays with its task). Until it first
        suspends it holds no one up; from then on it counts as busy (`job.suspended`),
        and the queue is someone else's (see `_summon`)."""
        handler = job.handler
        if handler.is_async:
            coro = handler.fn(**kwargs)
        else:
            coro = trio.to_thread.run_sync(partial(handler.fn, **kwargs), abandon_on_cancel=True)
        context = contextvars.copy_context()
        try:
            yielded = context.run(coro.send, None)
        except StopIteration as done:
            return done.value
        job.suspended = True
        self._awake -= 1
        if self._queue:
            self._summon()
        try:
            return await _resume(coro, context, yielded)
        finally:
            self._awake += 1

    def _ended(self, job: _Job, outcome: Outcome | None) -> None:
        """The job is over: with the handler's outcome (sent to the hub), or None if it
        was cancelled (by the hub or the TTL: nothing is sent; by shutdown: a failure)."""
        task_id = job.task.task_id
        by_hub = task_id in self._cancelled_by_hub
        reason = self._forget(job)
        span = job.span
        if outcome is None:
            late = trio.current_time() >= job.deadline
            if by_hub or late:
                if span is not None:  # the hub's cancel of a task that timed out says so
                    state = "timeout" if reason == "timeout" or late else "cancelled"
                    _tracing.RequestTracing.handled(span, state, None, None)
                self._remember(task_id, None)
                return  # the hub ended the task itself (cancel or timeout)
            outcome = (False, None, "the agent shut down before the task finished")
        if span is not None:
            state = "completed" if outcome[0] else "failed"
            _tracing.RequestTracing.handled(span, state, outcome[2], job.raised)
        self._remember(task_id, outcome)
        self._send_result(task_id, outcome)

    def _lost(self, job: _Job) -> None:
        """The job's worker was cancelled from outside (the agent is going away)."""
        self._forget(job)
        if job.span is not None:
            _tracing.RequestTracing.handled(job.span, "cancelled", None, None)

    def _forget(self, job: _Job) -> str | None:
        """Take the job off the books; the hub's reason, if it cancelled it."""
        task_id = job.task.task_id
        del self._running[task_id]
        if not self._running and self._drained is not None:
            self._drained.set()
        return self._cancelled_by_hub.pop(task_id, None)

    def _send_result(self, task_id: str, outcome: Outcome) -> None:
        """Queue the result on the connection, or if it is down (or its outbox full),
        send it from a task of its own once it is back."""
        client, tasks = self.client, self._tasks
        assert client is not None
        assert tasks is not None
        if not client._send_result_now(task_id, *outcome):
            tasks.start_soon(client.send_result, task_id, *outcome)

    def _remember(self, task_id: str, outcome: Outcome | None) -> None:
        """Keep how a task ended here (the latest 1,024), for when it comes again."""
        self._finished[task_id] = outcome
        while len(self._finished) > 1024:
            self._finished.popitem(last=False)


class _Job:
    """A delivered task, queued or running, until it ends."""

    __slots__ = (
        "cancelled",
        "deadline",
        "handler",
        "raised",
        "requester",
        "scope",
        "span",
        "suspended",
        "task",
    )

    def __init__(
        self, task: p.TaskAssignment, requester: str, handler: _Handler, deadline: float
    ) -> None:
        self.task = task
        self.requester = requester
        self.handler = handler
        self.deadline = deadline  # on trio's clock: now + the task's TTL, on delivery
        self.scope: trio.CancelScope | None = None  # its worker's, once it runs
        self.cancelled = False  # by the hub, or by shutdown, before it ran
        self.span: Span | None = None
        self.raised: Exception | None = None  # what the handler raised, if it did
        self.suspended = False  # its handler waited for something (yielded to trio)

    def cancel(self) -> None:
        """Cancel the handler if it runs; a job still queued is dropped when it comes up."""
        if self.scope is not None:
            self.scope.cancel()
        else:
            self.cancelled = True


@types.coroutine
def _resume(coro: Any, context: contextvars.Context, yielded: Any) -> Generator[Any, Any, Any]:
    """Go on running `coro`, which has just yielded `yielded` to the scheduler, as
    ``await`` would (in `context`): what the scheduler sends or throws in goes to it,
    what it yields goes out, and its return value is this one's."""
    try:
        while True:
            try:
                value = yield yielded
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                yielded = context.run(coro.throw, exc)
            else:
                yielded = context.run(coro.send, value)
    except StopIteration as done:
        return done.value


def _serialisable(result: Any, limit: int) -> Outcome:
    """The outcome for a handler's return value: it must be JSON and fit in a frame."""
    try:
        size = len(orjson.dumps(result))
    except TypeError as exc:
        return False, None, f"the handler's return value is not JSON serialisable: {exc}"
    if size > limit:
        return False, None, f"the handler's return value ({size} bytes) exceeds the hub's limit"
    return True, result, None


def _is_async(fn: Callable[..., Any]) -> bool:
    target = fn
    while isinstance(target, partial):
        target = target.func
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004
    )
