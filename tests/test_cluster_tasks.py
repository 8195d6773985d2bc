"""The tasks bucket's shell (`agentmesh/_cluster_tasks.TaskRows`) over a link that
records what it is asked to write: which rows a commit writes or deletes, and what it
keeps while the link is down. The routers are the pure ones of tests/test_cluster_router.py;
the real bucket is exercised by tests/test_cluster.py and tests/test_cluster_failover.py."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from agentmesh._cluster_tasks import TaskRows
from agentmesh._nats_link import LinkState
from agentmesh._remote import task_key
from agentmesh.store import Changes

from .test_cluster_router import Net, _asker_and_far

pytest.importorskip("nats")


class Link:
    """Records each batch `TaskRows.write` hands the link's loop."""

    def __init__(self, state: LinkState = LinkState.CONNECTED) -> None:
        self.state = state
        self.batches: list[dict[str, Any]] = []

    async def run(self, fn: Any) -> None:
        self.batches.append(dict(fn.args[0]))


async def test_a_task_is_written_then_deleted_once_its_outcome_is_written() -> None:
    net = Net("b", "c")
    b, asker, far = _asker_and_far(net)
    rows, link = TaskRows("b"), Link()
    task_id = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    await rows.write(link, b.router, b.router.take_changes())
    key = task_key(asker.agent_id, task_id)
    [first] = link.batches
    assert orjson.loads(first[key])["hub"] == "b"
    net.run()
    net["c"].result(far, task_id)
    net.run()
    await rows.write(link, b.router, b.router.take_changes())  # finished, not yet written
    assert orjson.loads(link.batches[-1][key])["row"][0] == "completed"
    b.router.delivered([task_id])  # the outcome reached the requester's socket
    await rows.write(link, b.router, b.router.take_changes())
    assert link.batches[-1] == {key: None}
    assert not rows.pending


async def test_rows_kept_while_down_go_with_the_first_commit_after() -> None:
    net = Net("b", "c")
    b, asker, far = _asker_and_far(net)
    b.delegate(asker, to=far.agent_id, ttl=30)
    net.run()
    rows, link = TaskRows("b"), Link(LinkState.DISCONNECTED)
    await rows.write(link, b.router, b.router.take_changes())  # link down: kept
    assert rows.pending
    assert link.batches == []
    link.state = LinkState.CONNECTED
    await rows.write(link, b.router, Changes())  # the commit the reconnect wakes
    assert len(link.batches) == 1
    assert not rows.pending


async def test_a_task_that_ends_while_the_link_is_down_is_never_written() -> None:
    net = Net("b", "c")
    b, asker, far = _asker_and_far(net)
    rows, link = TaskRows("b"), Link(LinkState.DISCONNECTED)
    for _ in range(200):
        task_id = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
        await rows.write(link, b.router, b.router.take_changes())
        net.run()
        net["c"].result(far, task_id)
        net.run()
        b.router.delivered([task_id])
        await rows.write(link, b.router, b.router.take_changes())
    assert not rows.pending  # neither a row nor a delete kept for any of them
    assert rows._keys == {}


async def test_a_batch_that_went_out_while_the_link_broke_is_written_again() -> None:
    net = Net("b", "c")
    b, asker, far = _asker_and_far(net)
    b.delegate(asker, to=far.agent_id, ttl=30)
    rows = TaskRows("b")

    class Breaking(Link):
        async def run(self, fn: Any) -> None:
            await super().run(fn)
            rows.link_breaks += 1  # the link went down meanwhile: plain publishes lost?

    link = Breaking()
    await rows.write(link, b.router, b.router.take_changes())
    assert rows.pending  # not counted as written
    assert rows.failures == 1
