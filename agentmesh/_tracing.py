"""OpenTelemetry spans for the hub and the SDK: the one module that imports opentelemetry.

Optional. With opentelemetry-api installed (``pip install "agentmesh-hub[otel]"``) and a
tracer provider set up (the OpenTelemetry SDK's, or a distribution's), one trace links a
task's three parts, each span a child of the one before:

- ``agentmesh delegate <capability>`` (CLIENT), in the requester, from `Client.submit`
  until the task's outcome arrives (`RequestTracing`);
- ``agentmesh route <capability>`` (SERVER), in the hub, from the delegate until the
  task ends (`HubTracer`, the router's `TaskTracer`);
- ``agentmesh handle <capability>`` (SERVER), in the agent, around the handler
  (`RequestTracing.handler`).

The spans meet through the protocol's W3C trace context (`traceparent`, `tracestate`):
the requester's span is the delegate's, the hub's span is the task frame's. Without
opentelemetry, `available` is false and nothing here is used: the SDK and the hub
carry trace context that a caller gives them, and make no spans.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Final

from ._version import __version__

try:
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # pragma: no cover (the test environment has opentelemetry)
    available = False
else:
    available = True

if TYPE_CHECKING:
    from opentelemetry.trace import Span, TracerProvider

    from . import protocol as p
    from .lifecycle import TaskRecord

__all__ = ["HubTracer", "RequestTracing", "available", "real_provider"]

# Final states that count as errors: the task did not get done. A cancellation is the
# requester's choice (or its leaving), not a fault: its spans keep the status unset.
_ERRORS: Final = frozenset({"failed", "timeout"})


def real_provider(provider: TracerProvider | None) -> TracerProvider | None:
    """`provider`, or if None the global one, if it is a real one: not the API's default
    proxy (nothing set up) nor a no-op provider (which turns tracing off); else None."""
    if provider is None:
        provider = trace.get_tracer_provider()
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        return None
    return provider


def _parent(traceparent: str | None, tracestate: str | None) -> Context:
    """The context a W3C trace context names (an empty one, for a new trace, if None)."""
    if traceparent is None:
        return Context()
    carrier = {"traceparent": traceparent}
    if tracestate is not None:
        carrier["tracestate"] = tracestate
    return _PROPAGATOR.extract(carrier, context=Context())


def _context_of(span: Span) -> tuple[str, str | None] | None:
    """The W3C trace context (traceparent, tracestate) that makes a child of `span`."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span, Context()))
    traceparent = carrier.get("traceparent")
    return None if traceparent is None else (traceparent, carrier.get("tracestate"))


def _end(span: Span, state: str, error: str | None) -> None:
    span.set_attribute("agentmesh.state", state)
    if state in _ERRORS:
        span.set_status(trace.StatusCode.ERROR, error)
    span.end()


class HubTracer:
    """The hub's spans: one SERVER span per task, ``agentmesh route <capability>``, from
    its delegate to its end, a child of the requester's span (the delegate's trace
    context) or a new trace. Its context is what the assignee gets in the task frame.
    Attributes: ``agentmesh.task_id``, ``.capability``, ``.requester``, ``.assignee``,
    and at the end ``.state``; status ERROR for a failed or timed-out task.

    It keeps the span of every unfinished task it saw start (bounded as they are); a
    task restored after a restart has none, and its end is ignored.
    """

    def __init__(self, provider: TracerProvider) -> None:
        self._tracer = trace.get_tracer("agentmesh.hub", __version__, tracer_provider=provider)
        self._spans: dict[str, Span] = {}

    def started(self, record: TaskRecord) -> tuple[str, str | None] | None:
        span = self._tracer.start_span(
            f"agentmesh route {record.capability}",
            context=_parent(record.traceparent, record.tracestate),
            kind=trace.SpanKind.SERVER,
            attributes={
                "agentmesh.task_id": record.task_id,
                "agentmesh.capability": record.capability,
                "agentmesh.requester": record.requester,
                "agentmesh.assignee": record.assignee,
            },
        )
        self._spans[record.task_id] = span
        return _context_of(span)

    def ended(self, record: TaskRecord) -> None:
        span = self._spans.pop(record.task_id, None)
        if span is not None:
            _end(span, record.state.value, record.error)

    def __len__(self) -> int:
        """Spans open: the unfinished tasks it saw start."""
        return len(self._spans)


class RequestTracing:
    """The SDK's spans, made with `provider` or, if None, the global provider once the
    program has set up a real one (looked at for each span: a program may set it up
    after making its clients)."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self._provider = provider

    def _tracer(self, name: str) -> trace.Tracer | None:
        provider = real_provider(self._provider)
        if provider is None:
            return None
        return trace.get_tracer(name, __version__, tracer_provider=provider)

    def request(self, capability: str, to: str | None) -> tuple[Span, str, str | None] | None:
        """Start ``agentmesh delegate <capability>`` (CLIENT) in the current context: the
        span and the trace context for its delegate; None without a provider."""
        tracer = self._tracer("agentmesh.client")
        if tracer is None:
            return None
        attributes = {"agentmesh.capability": capability}
        if to is not None:
            attributes["agentmesh.assignee"] = to
        span = tracer.start_span(
            f"agentmesh delegate {capability}", kind=trace.SpanKind.CLIENT, attributes=attributes
        )
        context = _context_of(span)
        if context is None:  # pragma: no cover (a provider whose spans carry no context)
            span.end()
            return None
        return span, context[0], context[1]

    @staticmethod
    def accepted(span: Span, delegated: p.Delegated) -> None:
        """The hub took the task: its ID and agent on the span."""
        span.set_attribute("agentmesh.task_id", delegated.task_id)
        span.set_attribute("agentmesh.assignee", delegated.agent_id)

    @staticmethod
    def refused(span: Span, exc: BaseException) -> None:
        """The delegate got no task (refused, the connection dropped, or cancelled)."""
        if isinstance(exc, Exception):
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
        span.end()

    @staticmethod
    def finished(span: Span, outcome: p.TaskOutcome | None, error: Exception | None) -> None:
        """The task ended with `outcome` (or, without one, `error`: the hub lost it)."""
        if outcome is not None:
            _end(span, outcome.state, outcome.error)
            return
        span.set_attribute("agentmesh.state", "lost")
        span.set_status(trace.StatusCode.ERROR, str(error) if error is not None else None)
        span.end()

    def handler(self, task: p.TaskAssignment, requester: str) -> Span | None:
        """Start ``agentmesh handle <capability>`` (SERVER), a child of the task frame's
        trace context (the hub's span); None without a provider."""
        tracer = self._tracer("agentmesh.agent")
        if tracer is None:
            return None
        return tracer.start_span(
            f"agentmesh handle {task.capability}",
            context=_parent(task.traceparent, task.tracestate),
            kind=trace.SpanKind.SERVER,
            attributes={
                "agentmesh.task_id": task.task_id,
                "agentmesh.capability": task.capability,
                "agentmesh.requester": requester,
            },
        )

    @staticmethod
    @contextmanager
    def current(span: Span) -> Iterator[None]:
        """`span` is the current span inside the block (the handler's own spans are its
        children); the span is not ended here."""
        with trace.use_span(span, record_exception=False, set_status_on_exception=False):
            yield

    @staticmethod
    def handled(span: Span, state: str, error: str | None, exc: BaseException | None) -> None:
        """The handler is done, and the task `state` as far as the agent knows (completed,
        failed; cancelled or timeout when the hub ended it first)."""
        if isinstance(exc, Exception):
            span.record_exception(exc)
        _end(span, state, error)


if available:
    _PROPAGATOR: Final = TraceContextTextMapPropagator()
