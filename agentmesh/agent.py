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

Each task runs in its own cancel scope carrying the task's deadline; a `cancel` from the
hub cancels it. Params are checked against the handler's signature before the call. Plain
(non-async) handlers run in a worker thread so they cannot stall the connection.
"""

from __future__ import annotations

import inspect
import logging
import signal
from collections import OrderedDict
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import attrs
import orjson
import trio

from . import _tracing
from . import protocol as p
from ._params import BadParams, Signature
from .client import Client
from .registry import Capability

__all__ = ["Agent", "TaskContext", "capability"]

log = logging.getLogger("agentmesh.agent")
F = TypeVar("F", bound=Callable[..., Any])
_MARK = "__agentmesh_capability__"


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


def capability(name: str | None = None, *, description: str | None = None) -> Callable[[F], F]:
    """Mark a method of an `Agent` subclass as a capability (default name: the method's,
    with dashes). The description defaults to the docstring's first paragraph."""

    def mark(fn: F) -> F:
        setattr(fn, _MARK, (name, description))
        return fn

    return mark


class Agent:
    """An agent: a name, capabilities, and handlers for them.

    `max_concurrency` bounds the handlers running at once; `shutdown_grace` is how long
    in-flight tasks may finish on a graceful shutdown before they are cancelled.
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
        max_concurrency: int = 16,
        shutdown_grace: float = 10.0,
    ) -> None:
        self.name = name or self.name or type(self).__name__
        self.description = description if description is not None else self.description
        self.metadata = metadata or {}
        self.shutdown_grace = shutdown_grace
        self.client: Client | None = None
        self._limiter = trio.CapacityLimiter(max_concurrency)
        self._handlers: dict[str, _Handler] = {}
        self._running: dict[str, trio.CancelScope] = {}
        self._cancelled_by_hub: dict[str, str | None] = {}  # task ID -> the hub's reason
        # Tasks run to their end, with the outcome sent (None: ended by the hub's cancel
        # or the TTL, nothing to send): a task delivered again is never run twice.
        self._finished: OrderedDict[str, tuple[bool, Any, str | None] | None] = OrderedDict()
        self._tasks: trio.Nursery | None = None
        self._stopping = trio.Event()
        self._connecting: trio.CancelScope | None = None  # the first connection, until it is up
        self._accepting = False
        self._drained: trio.Event | None = None  # set when the last task ends, on shutdown
        for attr in dir(type(self)):
            marked = getattr(getattr(type(self), attr, None), _MARK, None)
            if marked is not None:
                method = getattr(self, attr)
                self._add(marked[0] or attr.replace("_", "-"), method, marked[1])

    # ---------------------------------------------------------------------------------
    # Declaring capabilities

    def capability(
        self, name: str | None = None, *, description: str | None = None
    ) -> Callable[[F], F]:
        """Decorator: register a function (async or plain) as the handler of `name`."""

        def register(fn: F) -> F:
            self._add(name or fn.__name__.replace("_", "-"), fn, description)
            return fn

        return register

    def _add(self, name: str, fn: Callable[..., Any], description: str | None) -> None:
        key = name.strip().lower()
        if key in self._handlers:
            raise ValueError(f"capability {name!r} is declared twice")
        signature = Signature.of(fn, TaskContext)
        self._handlers[key] = _Handler(
            capability=Capability(
                name=name,
                description=description if description is not None else signature.summary,
                params_schema=signature.schema,
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

    def run(self, url: str = "ws://127.0.0.1:8765", **client_options: Any) -> None:
        """Serve until SIGINT or SIGTERM, then shut down gracefully (a second signal
        cancels at once; the first stops an agent that is still trying to connect).
        Blocks; for scripts: unless logging is set up already, it logs at INFO to stderr
        (where it connected and as whom, tasks that failed)."""
        if not logging.getLogger().handlers:
            logging.basicConfig(
                level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
            )
        trio.run(partial(self._run_until_signalled, url, **client_options))

    async def _run_until_signalled(self, url: str, **client_options: Any) -> None:
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
        url: str = "ws://127.0.0.1:8765",
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
                    self._drained = trio.Event()
                    if self._running:
                        with trio.move_on_after(self.shutdown_grace):
                            await self._drained.wait()
                    for scope in self._running.values():
                        scope.cancel()
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

    def _on_task(self, task: p.TaskAssignment, requester: str) -> None:
        client, tasks = self.client, self._tasks
        assert client is not None
        assert tasks is not None
        if task.task_id in self._running:
            return  # delivered again after a resume: already at work on it
        if task.task_id in self._finished:
            finished = self._finished[task.task_id]
            if finished is not None:  # our result may have been lost in a drop: again
                tasks.start_soon(client.send_result, task.task_id, *finished)
            return  # else it ended here by the hub's cancel or its TTL: the hub ends it too
        handler = self._handlers.get(task.capability.strip().lower())
        if not self._accepting or handler is None:
            error = (
                "the agent is shutting down"
                if not self._accepting
                else f"this agent has no capability {task.capability!r}"
            )
            tasks.start_soon(client.send_result, task.task_id, False, None, error)
            return
        scope = trio.CancelScope(deadline=trio.current_time() + task.ttl)
        self._running[task.task_id] = scope
        tasks.start_soon(self._run_task, handler, task, requester, scope)

    def _on_cancel(self, task_id: str, reason: str | None) -> None:
        scope = self._running.get(task_id)
        if scope is not None:
            log.info("task %s cancelled by the hub: %s", task_id, reason)
            self._cancelled_by_hub[task_id] = reason
            scope.cancel()

    async def _run_task(
        self, handler: _Handler, task: p.TaskAssignment, requester: str, scope: trio.CancelScope
    ) -> None:
        client = self.client
        assert client is not None
        outcome: tuple[bool, Any, str | None] | None = None
        tracing = client._tracing
        span = tracing.handler(task, requester) if tracing is not None else None
        raised: BaseException | None = None
        try:
            with scope:
                kwargs = handler.signature.bind(task.params)
                if handler.signature.context_param:
                    kwargs[handler.signature.context_param] = TaskContext(
                        task_id=task.task_id,
                        capability=task.capability,
                        requester=requester,
                        deadline=scope.deadline,
                        traceparent=task.traceparent,
                        tracestate=task.tracestate,
                        client=client,
                    )
                await _acquire(self._limiter)
                try:
                    if span is None:
                        result = await _call_handler(handler, kwargs)
                    else:
                        with _tracing.RequestTracing.current(span):
                            result = await _call_handler(handler, kwargs)
                finally:
                    self._limiter.release()
                outcome = _serialisable(result, client.max_frame_size - 1024)
        except BadParams as exc:
            outcome = (False, None, f"bad params: {exc}")
        except Exception as exc:
            raised = exc
            log.warning("task %s (%s) failed", task.task_id, task.capability, exc_info=True)
            outcome = (False, None, f"{type(exc).__name__}: {exc}")
        except BaseException:  # cancelled: the agent is going away
            if span is not None:
                _tracing.RequestTracing.handled(span, "cancelled", None, None)
            raise
        finally:
            del self._running[task.task_id]
            if not self._running and self._drained is not None:
                self._drained.set()
            by_hub = task.task_id in self._cancelled_by_hub
            reason = self._cancelled_by_hub.pop(task.task_id, None)
        if outcome is None:  # the scope was cancelled
            if by_hub or trio.current_time() >= scope.deadline:
                if span is not None:  # the hub's cancel of a task that timed out says so
                    late = reason == "timeout" or trio.current_time() >= scope.deadline
                    _tracing.RequestTracing.handled(
                        span, "timeout" if late else "cancelled", None, None
                    )
                self._remember(task.task_id, None)
                return  # the hub ended the task itself (cancel or timeout)
            outcome = (False, None, "the agent shut down before the task finished")
        if span is not None:
            state = "completed" if outcome[0] else "failed"
            _tracing.RequestTracing.handled(span, state, outcome[2], raised)
        self._remember(task.task_id, outcome)
        await client.send_result(task.task_id, *outcome)

    def _remember(self, task_id: str, outcome: tuple[bool, Any, str | None] | None) -> None:
        """Keep how a task ended here (the latest 1,024), for when it comes again."""
        self._finished[task_id] = outcome
        while len(self._finished) > 1024:
            self._finished.popitem(last=False)


async def _acquire(limiter: trio.CapacityLimiter) -> None:
    """`limiter.acquire()`, without yielding when a token is free (the handler, which
    runs next, yields soon enough). Raises `Cancelled` first if the task's scope is
    cancelled, as `acquire` does."""
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        limiter.acquire_nowait()
    except trio.WouldBlock:
        await limiter.acquire()


async def _call_handler(handler: _Handler, kwargs: dict[str, Any]) -> Any:
    if handler.is_async:
        return await handler.fn(**kwargs)
    return await trio.to_thread.run_sync(partial(handler.fn, **kwargs), abandon_on_cancel=True)


def _serialisable(result: Any, limit: int) -> tuple[bool, Any, str | None]:
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
