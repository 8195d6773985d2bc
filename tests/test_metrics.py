"""The hub's metrics: counted at O(1) per event, exposed in the Prometheus text format."""

from __future__ import annotations

import sqlite3
import threading
from typing import Any

import orjson
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from agentmesh import Agent, Hub, HubConfig, SQLiteStore, TaskFailed, connect
from agentmesh.lifecycle import TaskTable
from agentmesh.metrics import DELEGATION_BUCKETS, MAX_CAPABILITIES, Histogram, Metrics

from .conftest import WAIT, open_raw
from .test_delivery import wait_until


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and labels (parsed by prometheus_client)."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_histogram_buckets_are_cumulative_and_end_at_inf() -> None:
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 7.0):
        histogram.observe(value)
    assert histogram.buckets() == [("0.1", 2.0), ("1.0", 3.0), ("+Inf", 4.0)]
    assert histogram.sum == pytest.approx(7.65)


def test_capabilities_past_the_label_limit_are_counted_as_other() -> None:
    metrics = Metrics()
    for n in range(MAX_CAPABILITIES + 5):
        metrics.task_finished(f"cap-{n}", 0.01)
    assert len(metrics.delegations) == MAX_CAPABILITIES + 1
    assert sum(metrics.delegations["other"].counts) == 5


async def test_a_scrape_counts_what_the_hub_did(
    hub: Hub, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    agent = Agent("worker")

    @agent.capability("echo")
    async def echo(text: str) -> str:
        return text

    @agent.capability("boom")
    async def boom() -> None:
        raise RuntimeError("no")

    await nursery.start(agent.serve, hub.url)
    with trio.fail_after(WAIT):
        async with connect(hub.url, name="asker") as client:
            for _ in range(3):
                await client.delegate("echo", {"text": "hi"})
            with pytest.raises(TaskFailed):
                await client.delegate("boom")
            with pytest.raises(Exception, match="no agent offers"):
                await client.delegate("translate")
            await client.broadcast("hello")  # one recipient: the worker
            # A scrape reads no task: it costs the same with a million retained.
            monkeypatch.setattr(TaskTable, "__iter__", _never)
            monkeypatch.setattr(TaskTable, "page", _never)
            got = samples(hub.metrics())
    assert got[("agentmesh_connections", ())] == 2
    assert got[("agentmesh_agents", (("state", "online"),))] == 2
    assert got[("agentmesh_tasks_delegated_total", ())] == 4
    assert got[("agentmesh_tasks_finished_total", (("state", "completed"),))] == 3
    assert got[("agentmesh_tasks_finished_total", (("state", "failed"),))] == 1
    assert got[("agentmesh_tasks", (("state", "completed"),))] == 3
    assert got[("agentmesh_errors_total", (("code", "no_capable_agent"),))] == 1
    assert got[("agentmesh_broadcast_recipients_total", ())] == 1
    echo_count = ("agentmesh_delegation_seconds_count", (("capability", "echo"),))
    assert got[echo_count] == 3
    top = ("agentmesh_delegation_seconds_bucket", (("capability", "echo"), ("le", "+Inf")))
    assert got[top] == 3
    assert got[("agentmesh_frames_total", (("direction", "in"),))] > 0
    assert ("agentmesh_store_up", ()) not in got  # a memory hub has no store to watch
    assert len(DELEGATION_BUCKETS) + 1 == sum(
        1
        for name, labels in got
        if name == "agentmesh_delegation_seconds_bucket" and ("capability", "echo") in labels
    )


async def test_bytes_in_and_out_are_the_websocket_bytes_and_outlive_their_connection(
    hub: Hub,
) -> None:
    def traffic() -> tuple[float, float]:
        got = samples(hub.metrics())
        return (
            got[("agentmesh_bytes_total", (("direction", "in"),))],
            got[("agentmesh_bytes_total", (("direction", "out"),))],
        )

    async with open_raw(hub.url or "") as raw:
        await raw.request("heartbeat")  # settled: nothing else is on the wire
        before = traffic()
        frame = orjson.dumps({"type": "heartbeat", "id": "x1", "payload": {}})
        await raw.ws.send_message(frame.decode())
        reply = await raw.ws.get_message()
        after = traffic()
        # A client's frame of under 126 bytes: 2 header bytes and a 4-byte mask; the
        # hub's: 2 header bytes, unmasked.
        assert after[0] - before[0] == len(frame) + 6
        assert after[1] - before[1] == len(reply.encode()) + 2
    await wait_until(lambda: samples(hub.metrics())[("agentmesh_connections", ())] == 0)
    closed = traffic()
    assert closed[0] >= after[0]  # the closed connection's bytes are still counted
    assert closed[1] >= after[1]


def _never(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("a scrape must not walk the tasks")


@pytest.fixture
def hub_config() -> HubConfig:
    return HubConfig()


async def test_a_durable_hub_reports_its_commits_and_a_failing_store(tmp_path: Any) -> None:
    failing = threading.Event()

    def faults(db: sqlite3.Connection) -> None:
        if failing.is_set():
            raise sqlite3.OperationalError("database or disk is full")

    hub = Hub(store=SQLiteStore(tmp_path / "agentmesh.db", faults=faults))
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.serve, "127.0.0.1", 0)
            async with open_raw(hub.url) as client:
                await client.register("probe")  # its reply waits for a commit
                got = samples(hub.metrics())
                assert got[("agentmesh_store_up", ())] == 1
                assert got[("agentmesh_store_commit_seconds_count", ())] >= 1
                assert got[("agentmesh_store_failures_total", ())] == 0
                failing.set()
                async with open_raw(hub.url) as held, open_raw(hub.url) as refused:
                    # Its registration is taken, and its reply waits for the commit that fails.
                    await held.send("register", {"name": "held", "capabilities": []})
                    await wait_until(lambda: hub.router.store_error is not None)
                    reply = await refused.request("register", {"name": "x", "capabilities": []})
                    assert reply["payload"]["code"] == "store_unavailable"
                    got = samples(hub.metrics())
                    assert got[("agentmesh_store_up", ())] == 0
                    assert got[("agentmesh_store_failures_total", ())] >= 1
                    failing.clear()
                    assert (await held.recv())["payload"]["agent_id"].startswith("agt_")
            nursery.cancel_scope.cancel()


async def _get(port: int, path: str, token: str | None = None) -> tuple[int, bytes]:
    headers = "" if token is None else f"Authorization: Bearer {token}\r\n"
    with trio.fail_after(WAIT):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            request = f"GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n"
            await stream.send_all(request.encode())
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def test_metrics_need_the_admin_token_on_a_hub_with_tokens(nursery: trio.Nursery) -> None:
    hub = Hub(HubConfig(tokens=frozenset({"agent-token"}), admin_tokens=frozenset({"root"})))
    await nursery.start(hub.serve, "127.0.0.1", 0)
    port = await nursery.start(hub.serve_monitor, "127.0.0.1", 0)
    assert (await _get(port, "/metrics"))[0] == 401
    assert (await _get(port, "/metrics", "agent-token"))[0] == 401  # not an admin
    status, body = await _get(port, "/metrics", "root")
    assert status == 200
    assert ("agentmesh_connections", ()) in samples(body)
    assert (await _get(port, "/healthz"))[0] == 200  # health stays open
    assert (await _get(port, "/readyz"))[0] == 200


async def test_readyz_is_not_ready_before_the_hub_serves_nor_once_it_stops() -> None:
    hub = Hub()
    assert not hub.ready()
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.serve, "127.0.0.1", 0)
            assert hub.ready()
            nursery.cancel_scope.cancel()
    assert not hub.ready()
