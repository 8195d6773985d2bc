"""Concurrency limits and the dispatch queue: the pure `FairQueue`, then the router on a
manual clock (no sockets, no trio, no real time), with fake peers from test_routing."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest

from agentmesh._dispatch import DispatchQueues, FairQueue, Waiting
from tests.test_routing import FakePeer, Mesh, NarrowPeer

# ---------------------------------------------------------------------------------------
# FairQueue


def _entry(n: int, requester: str, priority: int = 0) -> Waiting:
    return Waiting(task_id=f"t{n}", requester=requester, priority=priority, key="k", seq=n)


def _drain(queue: FairQueue) -> list[str]:
    out = []
    while len(queue):
        out.append(queue.pop().task_id)
    return out


def test_a_queue_takes_turns_between_requesters_each_first_in_first_out() -> None:
    queue = FairQueue()
    for n, requester in enumerate("aaaabbc"):
        queue.push(_entry(n, requester))
    # a started waiting first, then b, then c: one turn each, in that order.
    assert _drain(queue) == ["t0", "t4", "t6", "t1", "t5", "t2", "t3"]


def test_a_higher_priority_goes_first_and_keeps_its_own_turns() -> None:
    queue = FairQueue()
    queue.push(_entry(0, "a"))
    queue.push(_entry(1, "a", priority=5))
    queue.push(_entry(2, "b"))
    queue.push(_entry(3, "b", priority=5))
    queue.push(_entry(4, "a", priority=-3))
    queue.push(_entry(5, "a", priority=5))
    assert _drain(queue) == ["t1", "t3", "t5", "t0", "t2", "t4"]


def test_a_removed_entry_leaves_the_others_their_turns() -> None:
    queue = FairQueue()
    entries = [_entry(n, r) for n, r in enumerate("abab")]
    for entry in entries:
        queue.push(entry)
    queue.remove(entries[0])
    queue.remove(entries[3])
    assert queue.head() is entries[2]  # a's turn still comes first
    assert _drain(queue) == ["t2", "t1"]
    assert queue.head() is None


@pytest.mark.parametrize("seed", range(20))
def test_position_is_where_pop_takes_it(seed: int) -> None:
    rng = random.Random(seed)
    queue = FairQueue()
    entries = [_entry(n, rng.choice("abcd"), rng.choice((0, 0, 1, 2))) for n in range(60)]
    for entry in entries:
        queue.push(entry)
    for entry in rng.sample(entries, 10):  # ended while waiting
        queue.remove(entry)
        entries.remove(entry)
    positions = {e.task_id: queue.position(e) for e in entries}
    order = _drain(queue)
    assert positions == {task_id: i + 1 for i, task_id in enumerate(order)}


def test_dispatch_queues_pick_the_best_head_of_several() -> None:
    queues = DispatchQueues(bound=3)
    queues.push("x", "t1", "a", 0)
    queues.push("y", "t2", "a", 1)
    queues.push("x", "t3", "b", 1)
    assert queues.full
    best = queues.best(["x", "y"])
    assert best is not None
    assert best.task_id == "t2"
    queues.take(best)
    assert [e.task_id for e in queues] == ["t1", "t3"]
    assert queues.best(["y"]) is None
    assert queues.discard("t1") is not None
    assert queues.discard("t1") is None
    assert queues.position("t3") == 1
    assert len(queues) == 1


# ---------------------------------------------------------------------------------------
# The router


def _agent(mesh: Mesh, name: str, *capabilities: Any, **fields: Any) -> FakePeer:
    """A registered agent speaking protocol version 2; `fields` go in its register
    payload (max_concurrency, tags)."""
    peer = FakePeer()
    mesh.router.connected(peer, protocol=2)
    payload = {"name": name, "capabilities": list(capabilities), **fields}
    reply = mesh.request(peer, "register", payload)
    assert reply["type"] == "register", reply
    peer.agent_id = reply["payload"]["agent_id"]
    peer.token = reply["payload"]["resume_token"]
    peer.clear()
    return peer


def _requester(mesh: Mesh, name: str = "asker") -> FakePeer:
    return _agent(mesh, name)


def _tasks(peer: FakePeer) -> list[str]:
    """The task IDs `peer` was sent, in order, and forgets them."""
    ids = [f["payload"]["task_id"] for f in peer.of_type("delegate")]
    peer.clear()
    return ids


def _finish(mesh: Mesh, agent: FakePeer, task_id: str) -> None:
    mesh.send(agent, "result", {"task_id": task_id, "success": True, "data": task_id})


def _outcomes(peer: FakePeer) -> dict[str, str]:
    return {f["payload"]["task_id"]: f["payload"]["state"] for f in peer.of_type("result")}


def test_three_agents_of_concurrency_2_get_100_tasks_two_at_a_time_in_fair_order() -> None:
    mesh = Mesh()
    agents = [_agent(mesh, f"w{i}", "echo", max_concurrency=2) for i in range(3)]
    r1, r2, r3 = (_requester(mesh, f"r{i}") for i in (1, 2, 3))
    made: dict[str, tuple[str, int]] = {}  # task ID -> (requester, its n-th task)
    for requester, count, priority in ((r1, 60, 0), (r2, 30, 0), (r3, 10, 5)):
        for n in range(count):
            reply = mesh.delegate(requester, "echo", params={"n": n}, priority=priority)
            made[reply["task_id"]] = (requester.agent_id, n)
    assert len(made) == 100
    running = {a.agent_id: _tasks(a) for a in agents}
    assert [len(r) for r in running.values()] == [2, 2, 2]  # the first 6 of r1
    dispatched: list[tuple[str, int]] = []
    peak = Counter[str]()
    while any(running.values()):
        # The agent with the oldest task finishes it: slots free in an order of their own.
        agent = next(a for a in agents if running[a.agent_id])
        _finish(mesh, agent, running[agent.agent_id].pop(0))
        for other in agents:
            for task_id in _tasks(other):
                running[other.agent_id].append(task_id)
                dispatched.append(made[task_id])
            peak[other.agent_id] = max(peak[other.agent_id], len(running[other.agent_id]))
            assert len(running[other.agent_id]) <= 2
    assert max(peak.values()) == 2
    # Priority 5 first, first in first out; then r1 and r2 take turns (r1 waited
    # first); then what is left of r1.
    a, b, c = r1.agent_id, r2.agent_id, r3.agent_id
    turns = [x for n in range(30) for x in ((a, 6 + n), (b, n))]
    expected = [(c, n) for n in range(10)] + turns + [(a, n) for n in range(36, 60)]
    assert dispatched == expected
    assert sum(len(_outcomes(r)) for r in (r1, r2, r3)) == 100


def test_a_queued_task_shows_its_place_in_status_and_moves_when_a_slot_frees() -> None:
    mesh = Mesh()
    worker = _agent(mesh, "w", "echo", max_concurrency=1)
    asker = _requester(mesh)
    first = mesh.delegate(asker, "echo")
    queued = [mesh.delegate(asker, "echo") for _ in range(3)]
    assert first["state"] == "in_progress"
    assert first["agent_id"] == worker.agent_id
    assert all(q["state"] == "pending" and q["agent_id"] == "" for q in queued)
    status = mesh.status(asker, queued[2]["task_id"])["payload"]
    assert status["state"] == "pending"
    assert status["queue_position"] == 3
    assert "queue_position" not in mesh.status(asker, first["task_id"])["payload"]
    assert _tasks(worker) == [first["task_id"]]
    asker.clear()
    _finish(mesh, worker, first["task_id"])
    assert _tasks(worker) == [queued[0]["task_id"]]
    # The requester hears that its task now has an agent, as a status push.
    (push,) = asker.of_type("status")
    assert push["payload"]["task_id"] == queued[0]["task_id"]
    assert push["payload"]["state"] == "in_progress"
    assert push["payload"]["assignee"] == worker.agent_id
    assert mesh.status(asker, queued[2]["task_id"])["payload"]["queue_position"] == 2


def test_a_queued_task_goes_to_an_agent_that_joins() -> None:
    mesh = Mesh()
    busy = _agent(mesh, "busy", "echo", max_concurrency=1)
    asker = _requester(mesh)
    mesh.delegate(asker, "echo")
    waiting = mesh.delegate(asker, "echo", ttl=30)["task_id"]
    _tasks(busy)
    newcomer = FakePeer()
    mesh.router.connected(newcomer)
    reply = mesh.request(newcomer, "register", {"name": "newcomer", "capabilities": ["ECHO"]})
    newcomer.agent_id = reply["payload"]["agent_id"]
    assert _tasks(newcomer) == [waiting]  # no limit; any case
    assert _tasks(busy) == []
    record = mesh.router.tasks.get(waiting)
    assert record is not None
    assert record.assignee == newcomer.agent_id
    assert record.capability == "ECHO"  # the agent's own spelling


def test_a_queued_task_whose_ttl_runs_out_times_out_and_is_never_delivered() -> None:
    mesh = Mesh()
    worker = _agent(mesh, "w", "echo", max_concurrency=1)
    asker = _requester(mesh)
    running = mesh.delegate(asker, "echo", ttl=60)["task_id"]
    waiting = mesh.delegate(asker, "echo", ttl=5)["task_id"]
    _tasks(worker)
    mesh.fire(4.999)
    assert _outcomes(asker) == {}
    mesh.fire(5.0)
    assert _outcomes(asker) == {waiting: "timeout"}
    assert len(mesh.router.queue) == 0
    _finish(mesh, worker, running)
    assert _tasks(worker) == []  # nothing waits any more
    assert mesh.router.registry.get(worker.agent_id).in_flight == 0  # type: ignore[union-attr]


def test_a_cancelled_queued_task_leaves_the_queue() -> None:
    mesh = Mesh()
    worker = _agent(mesh, "w", "echo", max_concurrency=1)
    asker = _requester(mesh)
    running = mesh.delegate(asker, "echo")["task_id"]
    waiting = mesh.delegate(asker, "echo")["task_id"]
    reply = mesh.request(asker, "cancel", {"task_id": waiting})
    assert reply["type"] == "cancel"
    assert _outcomes(asker) == {waiting: "cancelled"}
    _tasks(worker)
    _finish(mesh, worker, running)
    assert _tasks(worker) == []
    assert worker.of_type("cancel") == []  # it never had the task


def test_a_requester_that_leaves_takes_its_queued_tasks_with_it() -> None:
    mesh = Mesh(resume_grace=10.0)
    worker = _agent(mesh, "w", "echo", max_concurrency=1)
    asker, other = _requester(mesh), _requester(mesh, "other")
    running = mesh.delegate(asker, "echo")["task_id"]
    mesh.delegate(asker, "echo")
    theirs = mesh.delegate(other, "echo")["task_id"]
    assert _tasks(worker) == [running]
    mesh.router.disconnected(asker)
    mesh.fire(10.0)  # gone for good: its running task is cancelled, its queued one too
    (cancel,) = worker.of_type("cancel")
    assert cancel["payload"]["task_id"] == running
    assert _tasks(worker) == [theirs]  # the freed slot goes to the other requester
    assert len(mesh.router.queue) == 0


def test_a_capabilitys_own_limit_holds_beside_the_agents() -> None:
    mesh = Mesh()
    worker = _agent(
        mesh,
        "w",
        {"name": "slow", "max_concurrency": 1},
        "fast",
        max_concurrency=3,
    )
    asker = _requester(mesh)
    slow = [mesh.delegate(asker, "slow")["task_id"] for _ in range(2)]
    fast = [mesh.delegate(asker, "fast")["task_id"] for _ in range(3)]
    # One slow (its own limit), then two fast fill the agent's 3; one fast waits.
    assert _tasks(worker) == [slow[0], fast[0], fast[1]]
    _finish(mesh, worker, fast[0])
    assert _tasks(worker) == [fast[2]]  # the slow one still has no room
    _finish(mesh, worker, slow[0])
    assert _tasks(worker) == [slow[1]]


def test_a_task_sent_by_id_to_a_full_agent_waits_for_that_agent() -> None:
    mesh = Mesh()
    full = _agent(mesh, "full", "echo", max_concurrency=1)
    free = _agent(mesh, "free", "echo")
    asker = _requester(mesh)
    first = mesh.delegate(asker, "echo", to=full.agent_id)["task_id"]
    second = mesh.delegate(asker, "echo", to=full.agent_id)
    assert second["state"] == "pending"
    assert second["agent_id"] == ""
    assert _tasks(free) == []
    _tasks(full)
    _finish(mesh, full, first)
    assert _tasks(full) == [second["task_id"]]


def test_past_the_queue_bound_a_delegate_is_refused_and_the_hub_goes_on() -> None:
    mesh = Mesh(max_queued=2)
    worker = _agent(mesh, "w", "echo", max_concurrency=1)
    asker = _requester(mesh)
    running = mesh.delegate(asker, "echo")["task_id"]
    mesh.delegate(asker, "echo")
    mesh.delegate(asker, "echo")
    reply = mesh.request(asker, "delegate", {"capability": "echo"})
    assert reply["type"] == "error"
    assert reply["payload"]["code"] == "limit_exceeded"
    assert "maximum of 2 waiting tasks" in reply["payload"]["message"]
    _tasks(worker)
    _finish(mesh, worker, running)
    assert len(_tasks(worker)) == 1
    assert mesh.delegate(asker, "echo")["state"] == "pending"  # room again


def test_a_resuming_agent_is_not_chosen_while_capable_online_agents_are_only_full() -> None:
    mesh = Mesh(resume_grace=30.0)
    away = _agent(mesh, "away", "echo")
    mesh.router.disconnected(away)
    busy = _agent(mesh, "busy", "echo", max_concurrency=1)
    asker = _requester(mesh)
    mesh.delegate(asker, "echo")
    waiting = mesh.delegate(asker, "echo")
    assert waiting["agent_id"] == ""  # waits for the online one rather than the away one
    assert _tasks(busy) != []


@pytest.mark.parametrize(
    ("payload", "code", "path"),
    [
        ({"capability": "echo", "priority": 101}, "invalid_message", "$.payload.priority"),
        ({"capability": "echo", "priority": -101}, "invalid_message", "$.payload.priority"),
        ({"capability": "echo", "priority": 1.5}, "invalid_message", "$.payload.priority"),
    ],
)
def test_a_bad_priority_is_refused(payload: dict[str, Any], code: str, path: str) -> None:
    mesh = Mesh()
    _agent(mesh, "w", "echo")
    asker = _requester(mesh)
    reply = mesh.request(asker, "delegate", payload)
    assert reply["type"] == "error"
    assert reply["payload"]["code"] == code
    assert path in reply["payload"]["message"]
    assert mesh.delegate(asker, "echo", priority=100)["state"] == "in_progress"


@pytest.mark.parametrize(
    ("fields", "code", "fragment"),
    [
        ({"max_concurrency": 0}, "invalid_message", "$.payload.max_concurrency"),
        (
            {"capabilities": [{"name": "x", "max_concurrency": -1}]},
            "invalid_message",
            "$.payload.capabilities[0].max_concurrency",
        ),
        ({"tags": ["t"] * 33}, "limit_exceeded", "at most 32 tags"),
        ({"tags": [" "]}, "invalid_message", "$.payload.tags[0]"),
        ({"tags": ["x" * 65]}, "invalid_message", "$.payload.tags[0]"),
    ],
)
def test_bad_limits_and_tags_are_refused(fields: dict[str, Any], code: str, fragment: str) -> None:
    mesh = Mesh()
    peer = FakePeer()
    mesh.router.connected(peer)
    reply = mesh.request(peer, "register", {"name": "w", **fields})
    assert reply["type"] == "error", reply
    assert reply["payload"]["code"] == code
    assert fragment in reply["payload"]["message"]
    assert len(mesh.router.registry) == 0
    assert _agent(mesh, "w", "x", max_concurrency=1, tags=["ok"]).agent_id


def test_tasks_waiting_for_an_agent_by_id_fail_when_it_leaves_for_good() -> None:
    mesh = Mesh(resume_grace=5.0)
    full = _agent(mesh, "full", "echo", max_concurrency=1)
    asker = _requester(mesh)
    running = mesh.delegate(asker, "echo", to=full.agent_id)["task_id"]
    waiting = mesh.delegate(asker, "echo", to=full.agent_id)["task_id"]
    mesh.router.disconnected(full)
    mesh.fire(5.0)
    assert _outcomes(asker) == {running: "failed", waiting: "failed"}
    assert len(mesh.router.queue) == 0


def test_a_blocked_task_sent_by_id_does_not_hold_back_the_agents_other_queues() -> None:
    mesh = Mesh()
    worker = _agent(mesh, "w", {"name": "slow", "max_concurrency": 1}, "fast", max_concurrency=2)
    asker = _requester(mesh)
    mesh.delegate(asker, "slow")
    fast = mesh.delegate(asker, "fast")["task_id"]  # the agent is full now
    mesh.delegate(asker, "slow", to=worker.agent_id)  # waits in its own queue: no room
    waiting_fast = mesh.delegate(asker, "fast")["task_id"]  # waits in fast's queue
    _tasks(worker)
    _finish(mesh, worker, fast)  # room for a fast task, none for a slow one
    assert _tasks(worker) == [waiting_fast]


def test_an_agent_that_joins_is_given_the_queue_at_its_own_pace() -> None:
    mesh = Mesh()
    _agent(mesh, "busy", "echo", max_concurrency=1)
    asker = _requester(mesh)
    ids = [mesh.delegate(asker, "echo")["task_id"] for _ in range(51)][1:]
    newcomer = NarrowPeer(room=10)
    mesh.router.connected(newcomer, protocol=2)
    mesh.request(newcomer, "register", {"name": "n", "capabilities": ["echo"]})
    got = [f["payload"]["task_id"] for f in newcomer.of_type("delegate")]
    assert got == ids[:9]  # the register reply took one of its 10
    newcomer.room = 20
    mesh.router.drained(newcomer)
    got = [f["payload"]["task_id"] for f in newcomer.of_type("delegate")]
    assert got == ids[:29]
    assert len(mesh.router.queue) == 21


def test_tasks_sent_by_id_fail_once_the_agent_resumes_without_their_capability() -> None:
    mesh = Mesh(resume_grace=30.0)
    worker = _agent(mesh, "w", "echo", "other", max_concurrency=1)
    asker = _requester(mesh)
    mesh.delegate(asker, "echo")
    waiting = mesh.delegate(asker, "other", to=worker.agent_id)["task_id"]
    mesh.router.disconnected(worker)
    again = FakePeer()
    mesh.router.connected(again, protocol=2)
    resume = {"agent_id": worker.agent_id, "token": worker.token}
    payload = {"name": "w", "capabilities": ["echo"], "max_concurrency": 1, "resume": resume}
    mesh.request(again, "register", payload)
    (failed,) = asker.of_type("result")  # at once: it would never get room for it
    assert failed["payload"]["task_id"] == waiting
    assert failed["payload"]["state"] == "failed"
    assert "no longer offers 'other'" in failed["payload"]["error"]
    assert waiting not in _tasks(again)


# ---------------------------------------------------------------------------------------
# Protocol version 1 peers: none of version 2's fields


def test_a_version_1_peer_gets_none_of_version_2s_fields() -> None:
    mesh = Mesh()
    worker = _agent(
        mesh, "w", {"name": "code-review", "max_concurrency": 1}, max_concurrency=1, tags=["py"]
    )
    asker = _requester(mesh)
    mesh.delegate(asker, "code-review")
    waiting = mesh.delegate(asker, "code-review", priority=5)["task_id"]
    old = FakePeer()
    mesh.router.connected(old)  # no ?protocol=2
    registered = mesh.request(old, "register", {"name": "old"})["payload"]
    assert registered["protocol"] == 1
    for peer, v2 in ((old, False), (asker, True)):
        (info,) = mesh.request(peer, "discover", {"capability": "code review"})["payload"]["agents"]
        assert info["agent_id"] == worker.agent_id
        assert ("match" in info, "tags" in info, "max_concurrency" in info) == (v2, v2, v2)
        assert ("max_concurrency" in info["capabilities"][0]) == v2
    new_status = mesh.status(asker, waiting)["payload"]
    assert (new_status["priority"], new_status["queue_position"]) == (5, 1)
    mesh.router._admins.add(old)  # an operator's old CLI
    old_status = mesh.status(old, waiting)["payload"]
    assert "priority" not in old_status
    assert "queue_position" not in old_status
    mesh.request(old, "watch", {"kinds": ["agent_registered"]})
    mesh.request(asker, "watch", {"kinds": ["agent_registered"]})
    old.clear()
    asker.clear()
    _agent(mesh, "tagged", {"name": "x", "max_concurrency": 2}, tags=["gpu"])
    (event_old,) = old.of_type("event")
    (event_new,) = asker.of_type("event")
    assert "tags" not in event_old["payload"]["agent"]
    assert "max_concurrency" not in event_old["payload"]["agent"]["capabilities"][0]
    assert event_new["payload"]["agent"]["tags"] == ["gpu"]
    assert event_new["payload"]["agent"]["capabilities"][0]["max_concurrency"] == 2
