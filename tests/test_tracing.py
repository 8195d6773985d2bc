"""W3C trace context on the wire and OpenTelemetry spans (issue 14, tracing): a real hub on
a loopback port, an SDK agent and an SDK requester in one process, their spans caught by
the OpenTelemetry SDK's in-memory exporter. Each test makes its own tracer provider and
hands it to the hub and the clients: the global provider is never set."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from functools import partial

import pytest
import trio
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from agentmesh import Agent, Hub, TaskContext, connect
from agentmesh.errors import TaskCancelled, TaskFailed, TaskTimeout

from .conftest import WAIT, open_raw

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACESTATE = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
TRACE = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}


class Spans:
    """A tracer provider whose finished spans land in memory."""

    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))

    def finished(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> ReadableSpan:
        (span,) = [s for s in self.finished() if s.name == name]
        return span


@pytest.fixture
def spans() -> Spans:
    return Spans()


@pytest.fixture
async def traced_hub(nursery: trio.Nursery, spans: Spans) -> Hub:
    hub = Hub(tracer_provider=spans.provider)
    await nursery.start(hub.serve, "127.0.0.1", 0)
    return hub


class Seen:
    """What the handler saw of its task and of the current span."""

    def __init__(self) -> None:
        self.contexts: list[TaskContext] = []
        self.current: list[trace.SpanContext] = []


@pytest.fixture
async def worker(nursery: trio.Nursery, traced_hub: Hub, spans: Spans) -> AsyncIterator[Seen]:
    seen = Seen()
    agent = Agent("worker")

    @agent.capability()
    async def echo(text: str, ctx: TaskContext) -> str:
        seen.contexts.append(ctx)
        seen.current.append(trace.get_current_span().get_span_context())
        await ctx.progress(0.5, "half")
        return text

    @agent.capability()
    async def boom(ctx: TaskContext) -> str:
        raise ValueError("it broke")

    @agent.capability()
    async def stall(ctx: TaskContext) -> None:
        await trio.sleep_forever()

    await nursery.start(partial(agent.serve, traced_hub.url, tracer_provider=spans.provider))
    yield seen
    agent.shutdown()


def _hex(span_id: int) -> str:
    return f"{span_id:016x}"


def _parent_of(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


async def test_one_trace_links_the_requesters_call_the_hubs_routing_and_the_handler(
    traced_hub: Hub, worker: Seen, spans: Spans
) -> None:
    outer = spans.provider.get_tracer("test")
    with trio.fail_after(WAIT):
        async with connect(traced_hub.url, name="asker", tracer_provider=spans.provider) as asker:
            with outer.start_as_current_span("the requester's work") as work:
                handle = await asker.submit("echo", {"text": "hi"})
            progress = await handle.progress().receive()
            assert await handle.wait() == "hi"
            agent_id = handle.agent_id

    root = spans.named("the requester's work")
    client = spans.named("agentmesh delegate echo")
    routing = spans.named("agentmesh route echo")
    handler = spans.named("agentmesh handle echo")
    assert (client.kind, routing.kind, handler.kind) == (
        SpanKind.CLIENT,
        SpanKind.SERVER,
        SpanKind.SERVER,
    )
    # One trace: requester span -> hub span -> agent span.
    trace_id = work.get_span_context().trace_id
    assert {s.context.trace_id for s in (root, client, routing, handler)} == {trace_id}
    assert _parent_of(client) == root.context.span_id
    assert _parent_of(routing) == client.context.span_id
    assert _parent_of(handler) == routing.context.span_id
    assert routing.parent is not None
    assert routing.parent.is_remote
    # The delegate carried the client span's context; the task frame the hub span's.
    assert handle.traceparent is not None
    assert handle.traceparent[:53] == f"00-{trace_id:032x}-{_hex(client.context.span_id)}-"
    (ctx,) = worker.contexts
    assert ctx.traceparent is not None
    assert ctx.traceparent[:53] == f"00-{trace_id:032x}-{_hex(routing.context.span_id)}-"
    # The handler ran inside its span; its progress reached the requester with the
    # task's context (the delegate's), stamped by the hub.
    assert worker.current == [handler.context]
    assert progress.traceparent == handle.traceparent

    task_id = handle.task_id
    assert routing.attributes == {
        "agentmesh.task_id": task_id,
        "agentmesh.capability": "echo",
        "agentmesh.requester": asker.agent_id,
        "agentmesh.assignee": agent_id,
        "agentmesh.state": "completed",
    }
    assert client.attributes == {
        "agentmesh.capability": "echo",
        "agentmesh.task_id": task_id,
        "agentmesh.assignee": agent_id,
        "agentmesh.state": "completed",
    }
    assert handler.attributes is not None
    assert handler.attributes["agentmesh.task_id"] == task_id
    assert handler.attributes["agentmesh.requester"] == asker.agent_id
    assert handler.attributes["agentmesh.state"] == "completed"
    for span in (client, routing, handler):
        assert span.status.status_code is StatusCode.UNSET, span.name
    # The spans nest in time too.
    assert client.start_time is not None
    assert routing.start_time is not None
    assert client.start_time <= routing.start_time
    assert routing.end_time is not None
    assert client.end_time is not None
    assert routing.end_time <= client.end_time
    assert len(traced_hub.router._tracer) == 0  # type: ignore[arg-type]  # nothing left open


async def test_a_failed_task_marks_all_three_spans_as_errors(
    traced_hub: Hub, worker: Seen, spans: Spans
) -> None:
    with trio.fail_after(WAIT):
        async with connect(traced_hub.url, name="asker", tracer_provider=spans.provider) as asker:
            with pytest.raises(TaskFailed, match="it broke"):
                await asker.delegate("boom")

    client = spans.named("agentmesh delegate boom")
    routing = spans.named("agentmesh route boom")
    handler = spans.named("agentmesh handle boom")
    assert _parent_of(routing) == client.context.span_id
    assert _parent_of(handler) == routing.context.span_id
    for span in (client, routing, handler):
        assert span.status.status_code is StatusCode.ERROR, span.name
        assert span.status.description == "ValueError: it broke", span.name
        assert span.attributes is not None
        assert span.attributes["agentmesh.state"] == "failed", span.name
    (event,) = handler.events
    assert event.name == "exception"
    assert event.attributes is not None
    assert event.attributes["exception.type"] == "ValueError"


async def test_timed_out_and_cancelled_tasks_end_their_spans(
    traced_hub: Hub, worker: Seen, spans: Spans
) -> None:
    with trio.fail_after(WAIT):
        async with connect(traced_hub.url, name="asker", tracer_provider=spans.provider) as asker:
            with pytest.raises(TaskTimeout):
                await asker.delegate("stall", ttl=0.05)
            handle = await asker.submit("stall")
            await handle.cancel("enough")
            with pytest.raises(TaskCancelled):
                await handle.wait()

    by_state: dict[str, list[ReadableSpan]] = {}
    for span in spans.finished():
        assert span.attributes is not None
        by_state.setdefault(str(span.attributes["agentmesh.state"]), []).append(span)
    timed_out = {s.name: s for s in by_state["timeout"]}
    # The handler's too: the hub's cancel for a timeout says "timeout" (it used to be
    # told as cancelled, the cancel arriving before the agent's own deadline).
    assert set(timed_out) == {
        "agentmesh delegate stall",
        "agentmesh route stall",
        "agentmesh handle stall",
    }
    for span in timed_out.values():
        assert span.status.status_code is StatusCode.ERROR, span.name
    cancelled = {s.name: s for s in by_state["cancelled"]}
    assert set(cancelled) == {
        "agentmesh delegate stall",
        "agentmesh route stall",
        "agentmesh handle stall",
    }
    for span in cancelled.values():  # a cancellation is the requester's choice, no fault
        assert span.status.status_code is StatusCode.UNSET, span.name


async def test_a_refused_delegate_ends_its_span_as_an_error(traced_hub: Hub, spans: Spans) -> None:
    with trio.fail_after(WAIT):
        async with connect(traced_hub.url, name="asker", tracer_provider=spans.provider) as asker:
            with pytest.raises(Exception, match="no agent offers"):
                await asker.delegate("nobody-does-this")
    (client,) = spans.finished()  # the hub made no span: there was no task
    assert client.name == "agentmesh delegate nobody-does-this"
    assert client.status.status_code is StatusCode.ERROR
    assert [e.name for e in client.events] == ["exception"]


async def test_an_explicit_trace_context_goes_as_it_is_and_the_hub_continues_it(
    traced_hub: Hub, worker: Seen, spans: Spans
) -> None:
    with trio.fail_after(WAIT):
        async with connect(traced_hub.url, name="asker", tracer_provider=spans.provider) as asker:
            handle = await asker.submit("echo", {"text": "x"}, **TRACE)
            await handle.wait()
    assert (handle.traceparent, handle.tracestate) == (TRACEPARENT, TRACESTATE)
    names = {s.name for s in spans.finished()}
    assert names == {"agentmesh route echo", "agentmesh handle echo"}  # no client span
    routing = spans.named("agentmesh route echo")
    assert routing.context.trace_id == int(TRACEPARENT[3:35], 16)
    assert _parent_of(routing) == int(TRACEPARENT[36:52], 16)
    assert routing.context.trace_state.to_header() == TRACESTATE
    (ctx,) = worker.contexts
    assert ctx.tracestate == TRACESTATE  # passed on to the agent


async def test_a_raw_client_sees_the_trace_context_on_the_wire(
    traced_hub: Hub, spans: Spans
) -> None:
    url = traced_hub.url or ""
    async with open_raw(url) as agent, open_raw(url) as requester:
        await agent.register("raw-worker", "work")
        await requester.register("raw-requester")
        reply = await requester.request("delegate", {"capability": "work", **TRACE})
        assert reply["type"] == "delegate", reply
        task_id = reply["payload"]["task_id"]
        task = (await agent.expect("delegate", task_id=task_id))["payload"]
        routing_id = task["traceparent"][36:52]
        assert task["traceparent"][:36] == TRACEPARENT[:36]  # the same trace, the hub's span
        assert routing_id != TRACEPARENT[36:52]
        assert task["tracestate"] == TRACESTATE
        await agent.send("progress", {"task_id": task_id, "progress": 0.5})
        progress = (await requester.expect("progress", task_id=task_id))["payload"]
        assert {k: progress[k] for k in TRACE} == TRACE  # stamped by the hub
        await agent.send("result", {"task_id": task_id, "success": True, "data": 1})
        outcome = (await requester.expect("result", task_id=task_id))["payload"]
        assert {k: outcome[k] for k in TRACE} == TRACE

        bad = await requester.request(
            "delegate", {"capability": "work", "traceparent": TRACEPARENT.upper()}
        )
        assert bad["payload"]["code"] == "invalid_message"
        assert bad["payload"]["message"].startswith("$.payload.traceparent:")
        untraced = await requester.request("delegate", {"capability": "work"})
        task = (await agent.expect("delegate", task_id=untraced["payload"]["task_id"]))["payload"]
        # The hub traces it anyway (a new trace), but its frames carry no trace fields:
        # agents older than them would refuse the frame.
        assert set(task) == {"task_id", "capability", "params", "ttl"}
    assert spans.named("agentmesh route work").context.trace_id == int(TRACEPARENT[3:35], 16)


async def test_an_untraced_requester_gets_no_trace_fields_from_a_tracing_hub(
    traced_hub: Hub, worker: Seen
) -> None:
    # A client older than the trace fields (here: raw frames checked for them) must be
    # able to use a tracing hub: its task's progress and outcome carry none, though the
    # hub and the agent trace it (the agent's progress used to carry the hub's context).
    url = traced_hub.url or ""
    async with open_raw(url) as requester:
        await requester.register("old-requester")
        reply = await requester.request("delegate", {"capability": "echo", "params": {"text": "x"}})
        task_id = reply["payload"]["task_id"]
        progress = (await requester.expect("progress", task_id=task_id))["payload"]
        outcome = (await requester.expect("result", task_id=task_id))["payload"]
    assert not TRACE.keys() & progress.keys()
    assert not TRACE.keys() & outcome.keys()
    assert outcome["data"] == "x"
    (ctx,) = worker.contexts
    assert ctx.traceparent is None  # nor did the agent get one


async def test_a_hub_without_a_tracer_provider_only_carries_trace_context(hub: Hub) -> None:
    # No provider given and no global one set up (the API's proxy): no tracer at all.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    assert hub.router._tracer is None
    url = hub.url or ""
    async with open_raw(url) as agent, open_raw(url) as requester:
        await agent.register("raw-worker", "work")
        await requester.register("raw-requester")
        reply = await requester.request("delegate", {"capability": "work", **TRACE})
        task = (await agent.expect("delegate", task_id=reply["payload"]["task_id"]))["payload"]
        assert {k: task[k] for k in TRACE} == TRACE
        untraced = await requester.request("delegate", {"capability": "work"})
        task = (await agent.expect("delegate", task_id=untraced["payload"]["task_id"]))["payload"]
        assert set(task) == {"task_id", "capability", "params", "ttl"}


async def test_an_sdk_without_a_tracer_provider_makes_no_spans(
    traced_hub: Hub, spans: Spans
) -> None:
    url = traced_hub.url or ""
    with trio.fail_after(WAIT):
        async with connect(url, name="asker") as asker, open_raw(url) as agent:
            await agent.register("raw-worker", "work")
            handle = await asker.submit("work")
            task = (await agent.expect("delegate", task_id=handle.task_id))["payload"]
            await agent.send("result", {"task_id": handle.task_id, "success": True})
            await handle.wait()
    assert handle.traceparent is None
    (routing,) = spans.finished()  # the hub's only: a trace of its own,
    assert routing.parent is None
    assert "traceparent" not in task  # not sent to the agent (it may predate the fields)


NO_OTEL = """
import sys
sys.modules["opentelemetry"] = None  # as if it were not installed
import trio, agentmesh
from agentmesh import _tracing
assert not _tracing.available
TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

async def main():
    seen = []
    agent = agentmesh.Agent("w")

    @agent.capability()
    async def echo(text: str, ctx: agentmesh.TaskContext) -> str:
        seen.append(ctx.traceparent)
        return text

    with trio.fail_after(10):
        async with agentmesh.open_hub("127.0.0.1", 0) as hub, trio.open_nursery() as nursery:
            assert hub.router._tracer is None
            await nursery.start(agent.serve, hub.url)
            async with agentmesh.connect(hub.url) as client:
                assert await client.delegate("echo", {"text": "a"}) == "a"
                handle = await client.submit("echo", {"text": "b"}, traceparent=TP)
                assert await handle.wait() == "b"
            agent.shutdown()
    assert seen == [None, TP], seen
    print("ok")

trio.run(main)
"""


def test_without_opentelemetry_everything_works_and_trace_context_is_carried() -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_OTEL],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONWARNINGS": "error"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
