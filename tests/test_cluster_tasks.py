"""The tasks bucket's shell (`agentmesh/_cluster_tasks.TaskRows`) over a link that
records what it is asked to write: which rows a commit writes or deletes, and what it
keeps while the link is down. The routers are the pure ones of tests/test_cluster_router.py;
the real bucket is exercised by tests/test_cluster.py and tests/test_cluster_failover.py."""

from __future__ import annotations

from functools import partial
from typing import Any

import orjson
import pytest
import trio
import trio.testing

from agentmesh._cluster_tasks import BACKLOG_ROWS, TASKS_BUCKET, WRITE_TIMEOUT, TaskRows
from agentmesh._commits import Commits
from agentmesh._nats_link import LinkState, Message
from agentmesh._remote import RELEASE_WAIT, RETRY_FIRST, task_key
from agentmesh.store import Changes, MemoryStore

from .test_cluster_router import (
    Net,
    _asker_and_far,
    _journaled,
    _moved_while_its_hub_lives,
    _take_over,
    bucket,
)

pytest.importorskip("nats")

SUBJECT = f"$KV.{TASKS_BUCKET}."


class Link:
    """The link as `TaskRows.write` uses it: a batch is plain publishes, then a request
    whose reply is the ack. Records each batch sent (`sent`), and those acknowledged
    (`batches`); `ack` (awaited in the request) is what a test makes slow, hang or
    fail."""

    max_payload = 1 << 20

    def __init__(self, state: LinkState = LinkState.CONNECTED) -> None:
        self.state = state
        self.sent: list[dict[str, Any]] = []
        self.batches: list[dict[str, Any]] = []
        self._sending: dict[str, Any] = {}

    def publish_nowait(
        self, subject: str, data: bytes = b"", *, headers: dict[str, str] | None = None
    ) -> None:
        assert subject.startswith(SUBJECT), subject
        self._sending[subject[len(SUBJECT) :]] = None if headers else data

    def publish_many(self, messages: list[tuple[str, bytes, dict[str, str] | None]]) -> None:
        for subject, data, headers in messages:
            self.publish_nowait(subject, data, headers=headers)

    async def request(
        self,
        subject: str,
        data: bytes = b"",
        *,
        headers: dict[str, str] | None = None,
        timeout: float,  # noqa: ASYNC109 - as the link's
    ) -> Message:
        self.publish_nowait(subject, data, headers=headers)
        batch, self._sending = self._sending, {}
        self.sent.append(batch)
        await self.ack(batch)
        self.batches.append(batch)
        return Message(subject, b'{"stream": "KV_agentmesh_tasks", "seq": 1}', None, None)

    async def ack(self, batch: dict[str, Any]) -> None:
        pass

    async def ready_for_requests(self) -> None:
        pass


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
    """Not counted as written (its plain publishes may be lost), and, the link back,
    another commit is asked for at once: the reconnect's wake-up came while the batch
    was out (nothing seemed pending), so without asking, its rows waited for the next
    change (found by a review)."""
    net = Net("b", "c")
    b, asker, far = _asker_and_far(net)
    b.delegate(asker, to=far.agent_id, ttl=30)
    rows = TaskRows("b")

    class Breaking(Link):
        async def ack(self, batch: dict[str, Any]) -> None:
            rows.link_breaks += 1  # down and up again while it waited

    assert await rows.write(Breaking(), b.router, b.router.take_changes())
    assert rows.pending  # not counted as written
    assert rows.failures == 1
    link = Link()
    assert not await rows.write(link, b.router, Changes())
    assert len(link.batches) == 1
    assert not rows.pending


async def test_a_batch_jetstream_refuses_is_kept_for_a_later_commit() -> None:
    """The ack is an error (a stream that refuses the write, say): nothing of the
    batch counts as written, and it goes with the next commit."""
    net = Net("b", "c")
    b, asker, far = _asker_and_far(net)
    task_id = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    rows = TaskRows("b")

    class Refusing(Link):
        async def request(self, subject: str, data: bytes = b"", **options: Any) -> Message:
            await super().request(subject, data, **options)
            error = b'{"error": {"code": 503, "err_code": 10077, "description": "full"}}'
            return Message(subject, error, None, None)

    assert not await rows.write(Refusing(), b.router, b.router.take_changes())
    assert rows.failures == 1
    assert task_key(asker.agent_id, task_id) in rows._unwritten
    link = Link()
    await rows.write(link, b.router, Changes())
    assert task_key(asker.agent_id, task_id) in link.batches[-1]
    assert not rows.pending


async def test_a_row_larger_than_nats_takes_is_deleted_instead_and_the_rest_written(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """NATS refuses a message over its max_payload, and a plain publish's refusal
    reaches only the link's error handler: the batch's ack would say all was stored.
    So such a row goes as a delete (no older, smaller version of it stays), with a
    warning, and the others are written."""
    net = Net("b", "c")
    b, asker, far = _asker_and_far(net)
    small = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    large = b.delegate(asker, to=far.agent_id, ttl=30, params={"x": "y" * 5000})["task_id"]
    rows, link = TaskRows("b"), Link()
    link.max_payload = 4096
    await rows.write(link, b.router, b.router.take_changes())
    [batch] = link.batches
    assert batch[task_key(asker.agent_id, large)] is None
    assert batch[task_key(asker.agent_id, small)] is not None
    assert "more than NATS takes" in caplog.text


async def test_a_row_whose_write_timed_out_is_deleted_once_its_outcome_is_written(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A batch not acknowledged in time may still have landed. Its task then finished
    and was paid before the row was written again: the row must be deleted, or a hub
    that takes the requester over later reads a task still owed and sends its outcome
    a second time. (Before, a key counted as in the bucket only once acknowledged, so
    no delete was written and the row stayed until `max_age`.)"""
    net = Net("b", "c")
    b, asker, far = _asker_and_far(net)
    rows = TaskRows("b")

    class Unacknowledged(Link):  # sent, and the ack never comes
        async def ack(self, batch: dict[str, Any]) -> None:
            await trio.sleep_forever()

    link = Unacknowledged()
    task_id = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    await rows.write(link, b.router, b.router.take_changes())
    assert rows.failures == 1
    key = task_key(asker.agent_id, task_id)
    assert key in link.sent[0]  # it went out
    net.run()
    net["c"].result(far, task_id)
    net.run()
    b.router.delivered([task_id])  # the outcome reached the requester: paid
    healthy = Link()
    await rows.write(healthy, b.router, b.router.take_changes())
    assert healthy.batches == [{key: None}]
    assert not rows.pending


async def test_a_backlog_larger_than_one_write_can_hold_is_written_over_several_commits(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Rows kept through a long outage: written all at once, they took longer than
    `WRITE_TIMEOUT` to be acknowledged, so they were never written and every commit
    waited that long. Now each commit takes `BACKLOG_ROWS` of them beside its own."""
    net = Net("b", "c")
    b, asker, far = _asker_and_far(net)
    rows = TaskRows("b")

    class Slow(Link):  # a millisecond per row before the ack
        async def ack(self, batch: dict[str, Any]) -> None:
            await trio.sleep(len(batch) / 1000)

    link = Slow(LinkState.DISCONNECTED)
    backlog = 3 * BACKLOG_ROWS + 10
    assert backlog / 1000 > WRITE_TIMEOUT  # too much for one write
    for _ in range(backlog):
        b.delegate(asker, to=far.agent_id, ttl=600)
    await rows.write(link, b.router, b.router.take_changes())
    assert len(rows._unwritten) == backlog
    link.state = LinkState.CONNECTED
    started = trio.current_time()
    task_id = b.delegate(asker, to=far.agent_id, ttl=600)["task_id"]
    more = await rows.write(link, b.router, b.router.take_changes())  # its own row, and some
    assert trio.current_time() - started < WRITE_TIMEOUT
    assert more
    assert task_key(asker.agent_id, task_id) in link.batches[-1]
    writes = 1
    while more:
        more = await rows.write(link, b.router, Changes())  # the commits `more` asks for
        writes += 1
    assert writes == 4
    assert rows.failures == 0
    assert not rows.pending
    assert sum(len(batch) for batch in link.batches) == backlog + 1  # each row once


async def _drain(rows: TaskRows, link: Link, router: Any, most: int) -> int:
    """The commits `TaskRows.write` asks for, one after another: how many it took."""
    more, commits = True, 0
    while more and commits < most:
        more = await rows.write(link, router, Changes())
        commits += 1
    return commits


async def test_a_backlog_drains_over_a_link_too_slow_for_a_full_share_per_commit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """At 5 ms a row, `BACKLOG_ROWS` rows take 5 s: more than `WRITE_TIMEOUT`. With a
    fixed share per commit, every commit timed out and the backlog never drained. Now
    a commit that timed out halves the share (and the next follows at once)."""
    net = Net("b", "c")
    b, asker, far = _asker_and_far(net)
    rows = TaskRows("b")

    class Slower(Link):
        async def ack(self, batch: dict[str, Any]) -> None:
            await trio.sleep(len(batch) * 0.005)

    link = Slower(LinkState.DISCONNECTED)
    backlog = BACKLOG_ROWS + 200
    for _ in range(backlog):
        b.delegate(asker, to=far.agent_id, ttl=600)
    await rows.write(link, b.router, b.router.take_changes())
    link.state = LinkState.CONNECTED
    commits = await _drain(rows, link, b.router, 30)
    assert not rows.pending
    assert rows.failures == 2  # 1,000 rows (5 s), then 500 (2.5 s); 250 fit
    assert rows.share == BACKLOG_ROWS // 4
    assert commits == 2 + 5  # 1,200 rows in shares of 250
    assert {key for batch in link.batches for key in batch} == set(rows._stored)
    assert len(rows._stored) == backlog


async def test_a_backlog_drains_over_a_link_whose_acks_are_slow_whatever_the_size(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Acks that take 1.2 s however many rows: the share stays (a review found a
    share sized by rows per second shrink to 1 here, and 10,000 rows take 82 min)."""
    net = Net("b", "c")
    b, asker, far = _asker_and_far(net)
    rows = TaskRows("b")

    class Laggy(Link):
        async def ack(self, batch: dict[str, Any]) -> None:
            await trio.sleep(1.2)

    link = Laggy(LinkState.DISCONNECTED)
    for _ in range(3 * BACKLOG_ROWS):
        b.delegate(asker, to=far.agent_id, ttl=600)
    await rows.write(link, b.router, b.router.take_changes())
    link.state = LinkState.CONNECTED
    assert await _drain(rows, link, b.router, 30) == 3
    assert not rows.pending
    assert rows.share == BACKLOG_ROWS


async def test_after_stalled_acks_the_share_grows_back_once_acks_are_quick(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Ten commits time out (the share falls to 1, and the retries stop: a NATS that
    takes no single row in `WRITE_TIMEOUT` is as good as away), then acks come in 0.6
    s: the share doubles back with each commit."""
    net = Net("b", "c")
    b, asker, far = _asker_and_far(net)
    rows = TaskRows("b")

    class Stalling(Link):
        stalled = True

        async def ack(self, batch: dict[str, Any]) -> None:
            await trio.sleep(10 if self.stalled else 0.6)

    link = Stalling(LinkState.DISCONNECTED)
    backlog = 2 * BACKLOG_ROWS
    for _ in range(backlog):
        b.delegate(asker, to=far.agent_id, ttl=600)
    await rows.write(link, b.router, b.router.take_changes())
    link.state = LinkState.CONNECTED
    assert await _drain(rows, link, b.router, 30) == 10  # 1,000 -> 1, then it waits
    assert rows.share == 1
    assert rows.pending
    link.stalled = False
    b.delegate(asker, to=far.agent_id, ttl=600)  # the next change
    await rows.write(link, b.router, b.router.take_changes())
    assert await _drain(rows, link, b.router, 30) < 15
    assert not rows.pending


async def test_the_last_changes_at_a_graceful_stop_reach_the_tasks_bucket() -> None:
    """`Commits.final` (after the last connection closed) wrote the store but not the
    bucket: a task its requester's new hub reads back would lack what came last."""
    net = Net("b", "c")
    b, asker, far = _asker_and_far(net)
    rows, link = TaskRows("b"), Link()
    commits = Commits(b.router, MemoryStore(), on_released=lambda _: None)
    commits.replicate = partial(rows.write, link, b.router)
    task_id = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    await commits.final()
    [batch] = link.batches
    assert orjson.loads(batch[task_key(asker.agent_id, task_id)])["hub"] == "b"


async def test_a_write_cancelled_midway_keeps_its_rows(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A commit cancelled while it waits for the bucket (the hub stopping) had taken
    its rows, and the backlog's, out of what is kept: lost, for `final` too."""
    net = Net("b", "c")
    b, asker, far = _asker_and_far(net)
    rows = TaskRows("b")

    class Hanging(Link):
        async def ack(self, batch: dict[str, Any]) -> None:
            await trio.sleep_forever()

    task_id = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    with trio.move_on_after(WRITE_TIMEOUT / 2):  # before the write's own timeout
        await rows.write(Hanging(), b.router, b.router.take_changes())
    assert task_key(asker.agent_id, task_id) in rows._unwritten
    link = Link()
    assert not await rows.write(link, b.router, Changes())
    assert task_key(asker.agent_id, task_id) in link.batches[-1]


async def test_the_last_commit_at_a_graceful_stop_writes_the_whole_backlog() -> None:
    net = Net("b", "c")
    b, asker, far = _asker_and_far(net)
    rows, link = TaskRows("b"), Link(LinkState.DISCONNECTED)
    for _ in range(2 * BACKLOG_ROWS + 500):
        b.delegate(asker, to=far.agent_id, ttl=600)
    await rows.write(link, b.router, b.router.take_changes())  # kept: the link is down
    link.state = LinkState.CONNECTED
    commits = Commits(b.router, MemoryStore(), on_released=lambda _: None)
    commits.replicate = partial(rows.write, link, b.router)
    await commits.final()
    assert not rows.pending
    assert sum(len(batch) for batch in link.batches) == 2 * BACKLOG_ROWS + 500


async def test_a_register_commit_does_not_wait_for_a_directory_loop_that_is_gone(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A commit holding a `register` waits for the agent's row (`flush_writes`); once
    the hub stops (`Cluster.run` ends, and its directory loop with it), no row will be
    written, and it must not wait out `WRITE_TIMEOUT` (that kept every frame of the
    commit from going out before the 1001 close)."""
    from agentmesh._cluster import Cluster

    cluster = Cluster("nats://127.0.0.1:4222", "b")
    cluster._directory_running = True  # as while `run` runs
    cluster._mark_dirty("some-agent")  # registered: its row not yet written
    began = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cluster._flush_awhile)
        await trio.testing.wait_all_tasks_blocked()
        cluster._directory_gone()  # `run`'s end
    assert trio.current_time() == began  # at once, not after WRITE_TIMEOUT


async def test_a_hub_keeps_no_key_of_a_requester_that_moved_away() -> None:
    """b hands the requester's tasks to a, whose rows they are now: the one b's own
    agent runs becomes a stub there, the other is forgotten. b must keep neither key
    (it kept the stub's in `_stored` for good: a leak of a key per task of every
    requester that moved away while its task ran on its old hub), nor write or delete
    their rows."""
    net = Net("a", "b", "c")
    b, asker, far = _asker_and_far(net)
    local = b.register("echoer", {"name": "echo"})
    net.sync()
    rows, link = TaskRows("b"), Link()
    on_b = b.delegate(asker, to=local.agent_id, ttl=30)["task_id"]
    on_c = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    net.run()
    await rows.write(link, b.router, b.router.take_changes())
    assert len(rows._stored) == 2
    [batch] = link.batches
    b.router.disconnected(asker)
    stored = [orjson.loads(batch[task_key(asker.agent_id, t)]) for t in (on_b, on_c)]
    _take_over(net["a"], asker, stored, [on_b, on_c])
    net.sync()  # b sees the move and hands over
    net.run()
    await rows.write(link, b.router, b.router.take_changes())
    b.result(local, on_b, data="from b")  # the stub ends, its result goes to a
    net.run()
    await rows.write(link, b.router, b.router.take_changes())
    assert link.batches == [batch]  # nothing written since: the rows are a's
    assert rows._stored == set()
    assert rows._keys == {}
    assert not rows.pending


async def test_a_requester_taken_over_has_its_rows_held_until_its_old_hub_releases_it() -> None:
    """The race `release` closes (docs/cluster.md, Identity). a takes the requester over
    from b, which lives and may have a commit on its way to NATS: a row of it landing
    after a's would stand for the task (the rows are not compare-and-set). So a writes
    no row of the requester's tasks until b says it writes none, once it has seen the
    move. Meanwhile the requester cancels its task on a and reads the outcome: the
    row's delete is held back too, and written once released (the key counts as in
    the bucket, where b's row of it is). Before, a wrote at once, and b's row, landing
    after a's delete, said the task was running until `max_age`."""
    net = Net("a", "b", "c")
    a = _journaled(net, "a")
    b, asker, _, task_id, back = _moved_while_its_hub_lives(net)
    rows, link = TaskRows("a"), Link()
    await rows.write(link, a.router, a.router.take_changes())  # the register's commit
    assert link.batches == []  # held back
    net.run()  # b is asked, and still holds the requester: not released
    a.request(back, "cancel", {"task_id": task_id})
    a.router.delivered([task_id])  # the outcome reached the requester's socket
    await rows.write(link, a.router, a.router.take_changes())
    assert link.batches == []
    net.sync()  # b sees the move: it writes no row of the requester's any more
    assert bucket(b, {}) == {}
    net.at(RETRY_FIRST)  # a asks again
    net.run()
    assert list(a.router.fenced) == []
    await rows.write(link, a.router, a.router.take_changes())  # the commit it wakes
    assert link.batches == [{task_key(asker.agent_id, task_id): None}]
    assert rows._stored == set()


async def test_rows_held_for_a_requester_that_moves_on_meanwhile_are_not_written() -> None:
    """The requester moves b -> a -> c before b answers a's release: a's rows of its
    tasks are c's to write now, and a drops them (and forgets their keys)."""
    net = Net("a", "b", "c")
    a = _journaled(net, "a")
    _, asker, _, task_id, back = _moved_while_its_hub_lives(net)
    rows, link = TaskRows("a"), Link()
    await rows.write(link, a.router, a.router.take_changes())
    assert list(rows._held) == [asker.agent_id]
    net.drop("release")
    net.sync()  # every hub sees the requester on a
    a.router.disconnected(back)
    _take_over(net["c"], asker, [], [task_id])
    net.sync()  # a sees it on c
    assert list(a.router.fenced) == []
    net.at(RELEASE_WAIT)
    await rows.write(link, a.router, a.router.take_changes())
    assert link.batches == []
    assert rows._stored == set()
    assert rows._held == {}
