"""The sans-IO router, driven by plain calls: no sockets, no trio, no real time.

A `FakePeer` records what the router sends it, and a manual `Clock` is the router's
monotonic time, so every deadline here is checked at its exact value.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import orjson
import pytest

from agentmesh.config import HubConfig
from agentmesh.protocol import MessageType
from agentmesh.routing import CANCEL_TAG, CLOSE_REPLACED, HUB, Router

WALL0 = 1_700_000_000.0  # the wall clock reads WALL0 + monotonic time
INF = float("inf")


class FakePeer:
    """One connection: every frame the router sends it (decoded), and its close calls."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self.outcomes: list[str | None] = []  # `outcome_of` of each frame, in order
        self.closes: list[tuple[int, str]] = []
        self.agent_id = ""
        self.token = ""

    def send(
        self,
        frame: str,
        *,
        outcome_of: str | None = None,
        droppable: bool = False,
        durable: bool = False,
    ) -> None:
        self.frames.append(orjson.loads(frame))
        self.outcomes.append(outcome_of)

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def has_room(self) -> bool:
        return True

    def clear(self) -> None:
        self.frames.clear()
        self.outcomes.clear()

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == type_]


class Clock:
    """The router's monotonic clock: it moves only when a test sets it."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Mesh:
    """A router on a manual clock, and a way to talk to it as clients would."""

    def __init__(self, **config: Any) -> None:
        self.clock = Clock()
        self.wakes: list[float] = []
        self.router = Router(
            HubConfig(**config),
            clock=self.clock,
            wall=lambda: WALL0 + self.clock.now,
            wake=self.wakes.append,
        )
        self._ids = itertools.count(1)

    def at(self, t: float) -> None:
        self.clock.now = t

    def fire(self, t: float) -> None:
        self.at(t)
        self.router.fire_timers()

    def send(self, peer: FakePeer, type_: str, payload: Any = None, **envelope: Any) -> str:
        msg_id = f"c{next(self._ids)}"
        frame = {"type": type_, "id": msg_id, "payload": {} if payload is None else payload}
        frame.update(envelope)
        self.router.receive(peer, orjson.dumps(frame).decode())
        return msg_id

    def request(
        self, peer: FakePeer, type_: str, payload: Any = None, **envelope: Any
    ) -> dict[str, Any]:
        """Send a frame and return the one reply to it."""
        msg_id = self.send(peer, type_, payload, **envelope)
        replies = [f for f in peer.frames if f.get("in_reply_to") == msg_id]
        assert len(replies) == 1, peer.frames
        return replies[0]

    def register(
        self, name: str, *capabilities: Any, resume: FakePeer | None = None, hidden: bool = False
    ) -> FakePeer:
        """A new connection registering `name`; with `resume`, as that peer's agent."""
        peer = FakePeer()
        self.router.connected(peer)
        payload: dict[str, Any] = {"name": name, "capabilities": list(capabilities)}
        if hidden:
            payload["hidden"] = True
        if resume is not None:
            payload["resume"] = {"agent_id": resume.agent_id, "token": resume.token}
        reply = self.request(peer, "register", payload)
        assert reply["type"] == "register", reply
        peer.agent_id = reply["payload"]["agent_id"]
        peer.token = reply["payload"]["resume_token"]
        return peer

    def delegate(
        self, requester: FakePeer, capability: str = "echo", **fields: Any
    ) -> dict[str, Any]:
        """Delegate and return the `delegate` reply's payload. `to=` goes in the envelope."""
        envelope = {"to": fields.pop("to")} if "to" in fields else {}
        reply = self.request(
            requester, "delegate", {"capability": capability, **fields}, **envelope
        )
        assert reply["type"] == "delegate", reply
        return reply["payload"]

    def status(self, peer: FakePeer, task_id: str) -> dict[str, Any]:
        return self.request(peer, "status", {"task_id": task_id})

    def discover(self, peer: FakePeer) -> dict[str, bool]:
        """Every registered agent's ID, mapped to whether it is online."""
        reply = self.request(peer, "discover")
        return {a["agent_id"]: a["online"] for a in reply["payload"]["agents"]}


def _pair(mesh: Mesh) -> tuple[FakePeer, FakePeer]:
    """An echo agent and a requester, both online, with nothing left in their records."""
    agent = mesh.register("echoer", "echo")
    requester = mesh.register("asker")
    agent.clear()
    requester.clear()
    return agent, requester


def _only(peer: FakePeer, type_: str) -> dict[str, Any]:
    """The single frame `peer` got, which must be of `type_`."""
    assert len(peer.frames) == 1, peer.frames
    (frame,) = peer.frames
    assert frame["type"] == type_, frame
    return frame


# --- TTL ----------------------------------------------------------------------------------


def test_ttl_expires_at_exact_deadline() -> None:
    mesh = Mesh()
    agent, requester = _pair(mesh)
    task = mesh.delegate(requester, ttl=10)
    task_id = task["task_id"]
    assert task["state"] == "in_progress"
    assert task["agent_id"] == agent.agent_id
    assert mesh.router.next_deadline() == 10.0
    assert mesh.wakes == [10.0]
    assignment = _only(agent, "delegate")
    assert assignment["from"] == requester.agent_id
    assert assignment["to"] == agent.agent_id
    assert assignment["payload"] == {
        "task_id": task_id,
        "capability": "echo",
        "params": {},
        "ttl": 10.0,
    }
    agent.clear()
    requester.clear()

    mesh.fire(9.999)
    assert agent.frames == []
    assert requester.frames == []
    assert mesh.router.next_deadline() == 10.0
    assert mesh.status(requester, task_id)["payload"]["state"] == "in_progress"
    requester.clear()

    mesh.fire(10.0)
    outcome = _only(requester, "result")
    assert outcome["from"] == HUB
    assert outcome["to"] == requester.agent_id
    assert "in_reply_to" not in outcome
    assert outcome["payload"] == {
        "task_id": task_id,
        "state": "timeout",
        "success": False,
        "data": None,
        "error": "task timed out after 10s",
    }
    assert requester.outcomes == [task_id]
    cancel = _only(agent, "cancel")
    assert cancel["from"] == HUB
    assert cancel["to"] == agent.agent_id
    assert cancel["payload"] == {"task_id": task_id, "reason": "timeout"}
    assert agent.outcomes == [CANCEL_TAG + task_id]  # owed until written (`delivered`)
    assert mesh.router.next_deadline() == INF
    assert mesh.router.summary().counters["timeout"] == 1

    agent.clear()
    requester.clear()
    for t in (10.0, 10.5, 1000.0):
        mesh.fire(t)
    assert agent.frames == []
    assert requester.frames == []
    assert mesh.router.summary().counters["timeout"] == 1
    assert mesh.wakes == [10.0]


def test_completed_task_never_times_out() -> None:
    mesh = Mesh()
    agent, requester = _pair(mesh)
    task_id = mesh.delegate(requester, ttl=10)["task_id"]
    agent.clear()
    requester.clear()

    mesh.at(5.0)
    mesh.send(agent, "result", {"task_id": task_id, "success": True, "data": {"echo": 1}})
    assert agent.frames == []  # a result gets no reply
    outcome = _only(requester, "result")
    assert outcome["from"] == agent.agent_id
    assert outcome["payload"]["state"] == "completed"
    assert outcome["payload"]["data"] == {"echo": 1}
    requester.clear()

    assert mesh.router.next_deadline() == 10.0  # the stale TTL entry is still queued
    mesh.fire(10.0)
    assert agent.frames == []
    assert requester.frames == []
    assert mesh.router.next_deadline() == INF
    assert mesh.status(requester, task_id)["payload"]["state"] == "completed"
    counters = mesh.router.summary().counters
    assert (counters["completed"], counters["timeout"]) == (1, 0)


def test_only_an_earlier_deadline_wakes_the_caller() -> None:
    mesh = Mesh()
    _, requester = _pair(mesh)
    mesh.delegate(requester, ttl=50)
    assert mesh.wakes == [50.0]
    mesh.delegate(requester, ttl=20)
    assert mesh.wakes == [50.0, 20.0]
    mesh.delegate(requester, ttl=30)
    assert mesh.wakes == [50.0, 20.0]
    assert mesh.router.next_deadline() == 20.0


def test_default_ttl_applies_when_delegate_gives_none() -> None:
    mesh = Mesh(default_ttl=42.0)
    agent, requester = _pair(mesh)
    mesh.at(1.0)
    task_id = mesh.delegate(requester)["task_id"]
    assert mesh.router.next_deadline() == 43.0
    assert mesh.wakes == [43.0]
    assert _only(agent, "delegate")["payload"]["ttl"] == 42.0
    assert mesh.status(requester, task_id)["payload"]["ttl"] == 42.0
    requester.clear()

    mesh.fire(42.999)
    assert requester.frames == []
    mesh.fire(43.0)
    assert _only(requester, "result")["payload"]["state"] == "timeout"


@pytest.mark.parametrize("ttl", [100.001, 1e9, 0, -1])
def test_ttl_out_of_range_is_refused(ttl: float) -> None:
    mesh = Mesh(max_ttl=100.0)
    agent, requester = _pair(mesh)
    reply = mesh.request(requester, "delegate", {"capability": "echo", "ttl": ttl})
    assert reply["type"] == "error"
    assert reply["payload"]["code"] == "invalid_message"
    assert reply["payload"]["message"].startswith("$.payload.ttl:")
    assert "at most 100 seconds" in reply["payload"]["message"]
    assert agent.frames == []
    assert len(mesh.router.tasks) == 0
    assert mesh.router.next_deadline() == INF
    assert mesh.wakes == []
    assert mesh.router.summary().counters["delegated"] == 0


def test_ttl_equal_to_max_ttl_is_accepted() -> None:
    mesh = Mesh(max_ttl=100.0)
    agent, requester = _pair(mesh)
    assert mesh.delegate(requester, ttl=100)["state"] == "in_progress"
    assert _only(agent, "delegate")["payload"]["ttl"] == 100.0
    assert mesh.router.next_deadline() == 100.0


# --- resume grace -------------------------------------------------------------------------


def test_assignee_that_does_not_resume_fails_its_task() -> None:
    mesh = Mesh(resume_grace=30.0)
    agent, requester = _pair(mesh)
    task_id = mesh.delegate(requester, ttl=100)["task_id"]
    requester.clear()
    agent.clear()

    mesh.router.disconnected(agent, ())
    assert mesh.wakes == [100.0, 30.0]
    assert mesh.router.next_deadline() == 30.0

    mesh.fire(29.9)
    assert requester.frames == []
    assert mesh.discover(requester) == {agent.agent_id: False, requester.agent_id: True}
    requester.clear()

    mesh.fire(30.0)
    outcome = _only(requester, "result")
    assert outcome["from"] == HUB
    assert outcome["payload"]["task_id"] == task_id
    assert outcome["payload"]["state"] == "failed"
    assert outcome["payload"]["success"] is False
    assert outcome["payload"]["error"] == (
        f"agent {agent.agent_id} disconnected and did not resume within 30s"
    )
    requester.clear()
    assert mesh.discover(requester) == {requester.agent_id: True}
    summary = mesh.router.summary()
    assert (summary.agents, summary.online) == (1, 1)
    assert summary.counters["failed"] == 1

    requester.clear()
    mesh.fire(100.0)  # the task's TTL entry finds it already ended
    assert requester.frames == []
    assert agent.frames == []


def test_assignee_that_resumes_keeps_its_task_and_gets_it_again() -> None:
    mesh = Mesh(resume_grace=30.0)
    agent, requester = _pair(mesh)
    task_id = mesh.delegate(requester, ttl=100, params={"x": 1})["task_id"]
    requester.clear()
    mesh.router.disconnected(agent, ())

    mesh.at(20.0)
    back = mesh.register("echoer", "echo", resume=agent)
    reply = back.frames[0]
    assert reply["payload"]["resumed"] is True
    assert back.agent_id == agent.agent_id
    assert back.token == agent.token
    redelivered = back.frames[1:]
    assert len(redelivered) == 1
    assert redelivered[0]["type"] == "delegate"
    assert redelivered[0]["from"] == requester.agent_id
    assert redelivered[0]["payload"] == {
        "task_id": task_id,
        "capability": "echo",
        "params": {"x": 1},
        "ttl": 80.0,
    }
    assert requester.frames == []  # it was in progress already: no status push
    back.clear()
    assert mesh.router.registry.get(agent.agent_id).in_flight == 1

    mesh.fire(30.0)
    assert back.frames == []
    assert requester.frames == []
    assert mesh.discover(requester) == {agent.agent_id: True, requester.agent_id: True}
    assert mesh.status(requester, task_id)["payload"]["state"] == "in_progress"
    requester.clear()

    mesh.send(back, "result", {"task_id": task_id, "success": True, "data": "ok"})
    outcome = _only(requester, "result")
    assert outcome["payload"]["state"] == "completed"
    assert outcome["from"] == agent.agent_id


def test_resume_with_a_wrong_token_is_a_new_identity() -> None:
    mesh = Mesh(resume_grace=30.0)
    agent, requester = _pair(mesh)
    mesh.router.disconnected(agent, ())
    impostor = FakePeer()
    reply = mesh.request(
        impostor,
        "register",
        {"name": "echoer", "resume": {"agent_id": agent.agent_id, "token": "wrong"}},
    )
    assert reply["payload"]["resumed"] is False
    assert reply["payload"]["agent_id"] != agent.agent_id
    assert mesh.discover(requester) == {
        agent.agent_id: False,
        requester.agent_id: True,
        reply["payload"]["agent_id"]: True,
    }
    mesh.fire(30.0)
    assert agent.agent_id not in mesh.router.registry


def test_task_for_an_offline_agent_waits_pending_and_is_delivered_on_resume() -> None:
    mesh = Mesh(resume_grace=30.0)
    agent, requester = _pair(mesh)
    mesh.router.disconnected(agent, ())

    mesh.at(5.0)
    task = mesh.delegate(requester, to=agent.agent_id, ttl=60)
    assert task["state"] == "pending"
    assert task["agent_id"] == agent.agent_id
    task_id = task["task_id"]
    assert len(requester.frames) == 1  # only the reply
    requester.clear()
    assert mesh.status(requester, task_id)["payload"]["state"] == "pending"
    requester.clear()

    mesh.at(10.0)
    back = mesh.register("echoer", "echo", resume=agent)
    assert [f["type"] for f in back.frames] == ["register", "delegate"]
    assignment = back.frames[1]
    assert assignment["payload"]["task_id"] == task_id
    assert assignment["payload"]["ttl"] == 55.0
    push = _only(requester, "status")
    assert "in_reply_to" not in push
    assert push["from"] == HUB
    assert push["payload"]["task_id"] == task_id
    assert push["payload"]["state"] == "in_progress"
    assert push["payload"]["assignee"] == agent.agent_id
    assert push["payload"]["requester"] == requester.agent_id


def test_task_by_capability_goes_to_an_offline_agent_only_if_no_one_else_offers_it() -> None:
    mesh = Mesh(resume_grace=30.0)
    agent, requester = _pair(mesh)
    mesh.router.disconnected(agent, ())
    task = mesh.delegate(requester)
    assert (task["state"], task["agent_id"]) == ("pending", agent.agent_id)

    other = mesh.register("echoer-2", "echo")
    other.clear()
    mesh.delegate(requester)  # the offline agent has 1 task in flight, this one 0
    task = mesh.delegate(requester)  # now 1 each: online still wins
    assert (task["state"], task["agent_id"]) == ("in_progress", other.agent_id)
    assert [f["payload"]["task_id"] for f in other.of_type("delegate")][-1] == task["task_id"]
    assert len(other.frames) == 2


def test_pending_task_that_expires_is_not_delivered_on_resume() -> None:
    mesh = Mesh(resume_grace=30.0)
    agent, requester = _pair(mesh)
    mesh.router.disconnected(agent, ())
    task_id = mesh.delegate(requester, to=agent.agent_id, ttl=10)["task_id"]
    requester.clear()

    mesh.fire(10.0)
    outcome = _only(requester, "result")
    assert outcome["payload"]["task_id"] == task_id
    assert outcome["payload"]["state"] == "timeout"
    requester.clear()

    mesh.at(20.0)
    back = mesh.register("echoer", "echo", resume=agent)
    assert [f["type"] for f in back.frames] == ["register"]
    assert requester.frames == []


# --- exactly-once outcomes ----------------------------------------------------------------


def _completed_task(mesh: Mesh, agent: FakePeer, requester: FakePeer) -> str:
    task_id = mesh.delegate(requester)["task_id"]
    requester.clear()
    mesh.send(agent, "result", {"task_id": task_id, "success": True, "data": [1, 2]})
    assert _only(requester, "result")["payload"]["task_id"] == task_id
    assert requester.outcomes == [task_id]
    return task_id


def test_unsent_outcome_is_sent_again_exactly_once_on_resume() -> None:
    mesh = Mesh()
    agent, requester = _pair(mesh)
    task_id = _completed_task(mesh, agent, requester)

    mesh.router.disconnected(requester, [task_id])
    back = mesh.register("asker", resume=requester)
    assert [f["type"] for f in back.frames] == ["register", "result"]
    again = back.frames[1]
    assert again["from"] == agent.agent_id
    assert again["payload"] == {
        "task_id": task_id,
        "state": "completed",
        "success": True,
        "data": [1, 2],
        "error": None,
    }
    assert back.outcomes == [None, task_id]

    mesh.router.disconnected(back, [])
    third = mesh.register("asker", resume=requester)
    assert [f["type"] for f in third.frames] == ["register"]


def test_sent_outcome_is_not_sent_again() -> None:
    mesh = Mesh()
    agent, requester = _pair(mesh)
    task_id = _completed_task(mesh, agent, requester)

    # IDs that are not this requester's outcomes change nothing.
    mesh.router.disconnected(requester, ["task_unknown"])
    mesh.router.disconnected(agent, [task_id])
    back = mesh.register("asker", resume=requester)
    assert [f["type"] for f in back.frames] == ["register"]
    agent_back = mesh.register("echoer", "echo", resume=agent)
    assert [f["type"] for f in agent_back.frames] == ["register"]


def test_outcome_reached_while_requester_is_away_is_sent_on_resume() -> None:
    mesh = Mesh(resume_grace=30.0)
    agent, requester = _pair(mesh)
    task_id = mesh.delegate(requester)["task_id"]
    mesh.router.disconnected(requester, [])

    mesh.at(10.0)
    mesh.send(agent, "result", {"task_id": task_id, "success": False, "error": "boom"})
    mesh.at(20.0)
    back = mesh.register("asker", resume=requester)
    assert [f["type"] for f in back.frames] == ["register", "result"]
    assert back.frames[1]["payload"]["state"] == "failed"
    assert back.frames[1]["payload"]["error"] == "boom"
    mesh.fire(30.0)
    assert [f["type"] for f in back.frames] == ["register", "result"]


def test_unsent_outcome_of_a_replaced_connection_is_not_lost() -> None:
    mesh = Mesh()
    agent, requester = _pair(mesh)
    task_id = _completed_task(mesh, agent, requester)

    # The requester resumes while its old connection still looks alive (half-open);
    # the outcome queued on the old connection never left it.
    back = mesh.register("asker", resume=requester)
    assert requester.closes == [(CLOSE_REPLACED, "this agent resumed on another connection")]
    assert [f["type"] for f in back.frames] == ["register"]
    mesh.router.disconnected(requester, [task_id])
    assert [f["type"] for f in back.frames] == ["register", "result"]
    assert back.outcomes == [None, task_id]


# --- a requester gone for good ------------------------------------------------------------


def test_a_cancel_stays_owed_until_written_and_an_unsent_one_goes_again() -> None:
    mesh = Mesh(resume_grace=30.0)
    agent, requester = _pair(mesh)
    written = mesh.delegate(requester, ttl=60)["task_id"]
    cut_off = mesh.delegate(requester, ttl=60)["task_id"]
    agent.clear()
    for task_id in (written, cut_off):
        mesh.request(requester, "cancel", {"task_id": task_id, "reason": "enough"})
    assert [f["payload"]["task_id"] for f in agent.of_type("cancel")] == [written, cut_off]
    tasks = mesh.router.tasks
    assert [tasks.get(t).owed_cancel for t in (written, cut_off)] == ["enough", "enough"]
    mesh.router.delivered([CANCEL_TAG + written])  # only the first reached the socket
    assert tasks.get(written).owed_cancel is None
    assert [r.task_id for r in tasks.owed(agent.agent_id)] == [cut_off]
    # The connection ends with the second unsent: the agent hears it when it resumes.
    mesh.router.disconnected(agent, [CANCEL_TAG + cut_off])
    back = mesh.register("echoer", "echo", resume=agent)
    assert [f["payload"]["task_id"] for f in back.of_type("cancel")] == [cut_off]
    assert back.outcomes[-1] == CANCEL_TAG + cut_off
    mesh.router.delivered([CANCEL_TAG + cut_off])
    assert tasks.owed(agent.agent_id) == []


def test_requester_gone_for_good_has_its_unfinished_tasks_cancelled() -> None:
    mesh = Mesh(resume_grace=30.0)
    agent, requester = _pair(mesh)
    done = _completed_task(mesh, agent, requester)
    first = mesh.delegate(requester, ttl=100)["task_id"]
    second = mesh.delegate(requester, ttl=100)["task_id"]
    assert mesh.router.registry.get(agent.agent_id).in_flight == 2
    agent.clear()

    mesh.router.disconnected(requester, [])
    mesh.fire(29.9)
    assert agent.frames == []

    mesh.fire(30.0)
    reason = f"agent {requester.agent_id} disconnected and did not resume within 30s"
    cancels = agent.of_type("cancel")
    assert len(agent.frames) == 2
    assert sorted(c["payload"]["task_id"] for c in cancels) == sorted([first, second])
    assert {c["payload"]["reason"] for c in cancels} == {reason}
    assert {c["from"] for c in cancels} == {HUB}
    agent.clear()

    info = mesh.status(agent, first)["payload"]
    assert info["state"] == "cancelled"
    assert info["error"] == f"requester left: {reason}"
    assert mesh.status(agent, done)["payload"]["state"] == "completed"
    assert mesh.router.registry.get(agent.agent_id).in_flight == 0
    assert requester.agent_id not in mesh.router.registry
    counters = mesh.router.summary().counters
    assert (counters["cancelled"], counters["completed"]) == (2, 1)

    agent.clear()
    reply = mesh.request(agent, "result", {"task_id": first, "success": True})
    assert reply["payload"]["code"] == "task_finished"


def test_each_disconnect_gets_a_full_resume_grace() -> None:
    mesh = Mesh(resume_grace=30.0)
    agent, requester = _pair(mesh)
    task_id = mesh.delegate(requester, ttl=1000)["task_id"]
    requester.clear()

    mesh.router.disconnected(agent, ())  # grace until 30
    mesh.at(20.0)
    back = mesh.register("echoer", "echo", resume=agent)
    mesh.at(25.0)
    mesh.router.disconnected(back, ())  # grace until 55

    mesh.fire(30.0)
    assert requester.frames == []
    assert agent.agent_id in mesh.router.registry
    mesh.fire(54.9)
    assert requester.frames == []
    mesh.fire(55.0)
    assert _only(requester, "result")["payload"]["task_id"] == task_id


# --- cleanup ------------------------------------------------------------------------------


def test_cleanup_drops_finished_tasks_only_after_retention() -> None:
    mesh = Mesh(retention=100.0)
    agent, requester = _pair(mesh)
    done = mesh.delegate(requester, ttl=1000)["task_id"]
    open_ = mesh.delegate(requester, ttl=1000)["task_id"]
    mesh.at(4.0)
    mesh.send(agent, "result", {"task_id": done, "success": True})
    requester.clear()

    mesh.at(104.0)
    assert mesh.router.cleanup() == 0
    assert mesh.status(requester, done)["payload"]["state"] == "completed"

    mesh.at(104.5)
    assert mesh.router.cleanup() == 1
    requester.clear()
    gone = mesh.request(requester, "status", {"task_id": done})
    assert gone["type"] == "error"
    assert gone["payload"]["code"] == "unknown_task"

    mesh.at(999.0)
    assert mesh.router.cleanup() == 0
    assert mesh.status(requester, open_)["payload"]["state"] == "in_progress"
    counts = mesh.router.summary().tasks
    assert (counts["completed"], counts["in_progress"]) == (0, 1)


def test_cleanup_drops_tasks_that_timed_out() -> None:
    mesh = Mesh(retention=50.0)
    _, requester = _pair(mesh)
    task_id = mesh.delegate(requester, ttl=10)["task_id"]
    mesh.fire(10.0)
    mesh.at(60.0)
    assert mesh.router.cleanup() == 0
    mesh.at(60.25)
    assert mesh.router.cleanup() == 1
    assert task_id not in mesh.router.tasks


# --- a stale connection -------------------------------------------------------------------


def test_resume_replaces_a_stale_connection() -> None:
    mesh = Mesh(resume_grace=30.0)
    agent, requester = _pair(mesh)
    task_id = mesh.delegate(requester, ttl=100)["task_id"]
    agent.clear()

    mesh.at(7.0)
    back = mesh.register("echoer", "echo", resume=agent)
    assert agent.closes == [(CLOSE_REPLACED, "this agent resumed on another connection")]
    assert CLOSE_REPLACED == 4003
    assert back.closes == []
    assert back.agent_id == agent.agent_id
    assert [f["type"] for f in back.frames] == ["register", "delegate"]
    assert back.frames[1]["payload"]["task_id"] == task_id
    assert back.frames[1]["payload"]["ttl"] == 93.0
    assert agent.frames == []

    # The old connection is no longer that agent.
    reply = mesh.request(agent, "result", {"task_id": task_id, "success": True})
    assert reply["payload"]["code"] == "not_registered"
    # Its late disconnect neither takes the agent offline nor starts a grace period.
    mesh.router.disconnected(agent, ())
    assert mesh.discover(requester) == {agent.agent_id: True, requester.agent_id: True}
    assert mesh.router.next_deadline() == 100.0
    assert mesh.router.summary().online == 2
    mesh.fire(30.0)
    assert agent.agent_id in mesh.router.registry


# --- receive never raises -----------------------------------------------------------------

BAD_FRAMES = [
    pytest.param(b"\x00\xff\x10", "invalid_message", None, id="binary-garbage"),
    pytest.param(b'{"type":"heartbeat","id":"m1"}', "invalid_message", None, id="binary-json"),
    pytest.param("not json", "invalid_message", None, id="not-json"),
    pytest.param("", "invalid_message", None, id="empty"),
    pytest.param("[" * 10_000, "invalid_message", None, id="deep-unclosed"),
    pytest.param("[" * 10_000 + "]" * 10_000, "invalid_message", None, id="deep-closed"),
    pytest.param("\ud800", "invalid_message", None, id="lone-surrogate"),
    pytest.param('{"type":"heartbeat","id":"\\ud800"}', "invalid_message", None, id="bad-escape"),
    pytest.param("[]", "invalid_message", None, id="array"),
    pytest.param("null", "invalid_message", None, id="null"),
    pytest.param('"heartbeat"', "invalid_message", None, id="string"),
    pytest.param('{"type":"heartbeat"}', "invalid_message", None, id="no-id"),
    pytest.param('{"type":"heartbeat","id":""}', "invalid_message", None, id="empty-id"),
    pytest.param('{"type":"heartbeat","id":7}', "invalid_message", None, id="number-id"),
    pytest.param('{"id":"m1"}', "invalid_message", "m1", id="no-type"),
    pytest.param('{"type":5,"id":"m1"}', "invalid_message", "m1", id="number-type"),
    pytest.param('{"type":"nope","id":"m1"}', "unknown_type", "m1", id="unknown-type"),
    pytest.param('{"type":"heartbeat_ack","id":"m1"}', "unknown_type", "m1", id="hub-type"),
    pytest.param('{"type":"error","id":"m1"}', "unknown_type", "m1", id="error-type"),
    pytest.param('{"type":"heartbeat","id":"m1","x":1}', "invalid_message", "m1", id="extra"),
    pytest.param('{"type":"heartbeat","id":"m1","payload":[]}', "invalid_message", "m1", id="arr"),
    pytest.param('{"type":"heartbeat","id":"m1","to":5}', "invalid_message", "m1", id="to-num"),
    pytest.param(
        '{"type":"heartbeat","id":"m1","timestamp":1e999}', "invalid_message", None, id="inf"
    ),
    pytest.param(
        '{"type":"delegate","id":"m1","payload":{"capability":"echo","ttl":"abc"}}',
        "invalid_message",
        "m1",
        id="ttl-string",
    ),
    pytest.param(
        '{"type":"broadcast","id":"m1","payload":{"message":"x","data":'
        + "[" * 2000
        + "]" * 2000
        + "}}",
        "invalid_message",
        None,
        id="deep-payload",
    ),
]


@pytest.mark.parametrize(("frame", "code", "in_reply_to"), BAD_FRAMES)
@pytest.mark.parametrize("registered", [False, True], ids=["anonymous", "registered"])
def test_bad_frame_gets_exactly_one_error(
    frame: str | bytes, code: str, in_reply_to: str | None, registered: bool
) -> None:
    mesh = Mesh()
    agent, requester = _pair(mesh)
    peer = requester if registered else FakePeer()
    before = mesh.router.summary().counters
    mesh.router.receive(peer, frame)
    error = _only(peer, "error")
    assert error["from"] == HUB
    assert error["payload"]["code"] == code
    assert isinstance(error["payload"]["message"], str)
    assert error["payload"]["message"]
    assert error.get("in_reply_to") == in_reply_to
    assert agent.frames == []
    after = mesh.router.summary().counters
    assert after["frames_in"] - before["frames_in"] == 1
    assert after["frames_out"] - before["frames_out"] == 1
    assert after["errors"] - before["errors"] == 1
    # ...and the connection still works.
    assert mesh.request(peer, "heartbeat")["type"] == "heartbeat_ack"


def test_register_is_checked_before_anything_is_added() -> None:
    mesh = Mesh()
    peer = FakePeer()
    blank = mesh.request(peer, "register", {"name": " "})
    assert blank["payload"]["code"] == "invalid_message"
    assert len(mesh.router.registry) == 0
    registered = mesh.register("a")
    again = mesh.request(registered, "register", {"name": "b"})
    assert again["payload"]["code"] == "already_registered"
    assert len(mesh.router.registry) == 1


@pytest.mark.parametrize(
    ("type_", "payload"),
    [
        ("delegate", {"capability": "echo"}),
        ("result", {"task_id": "t", "success": True}),
        ("broadcast", {"message": "hi"}),
        ("cancel", {"task_id": "t"}),
        ("progress", {"task_id": "t"}),
        ("deregister", {}),
    ],
)
def test_requests_before_register_are_refused(type_: str, payload: dict[str, Any]) -> None:
    mesh = Mesh()
    agent, _ = _pair(mesh)
    peer = FakePeer()
    reply = mesh.request(peer, type_, payload)
    assert reply["type"] == "error"
    assert reply["payload"]["code"] == "not_registered"
    assert len(peer.frames) == 1
    assert agent.frames == []
    assert len(mesh.router.tasks) == 0


def test_internal_error_in_a_handler_is_reported_and_the_router_keeps_working(
    caplog: pytest.LogCaptureFixture,
) -> None:
    mesh = Mesh()
    agent, requester = _pair(mesh)
    original = mesh.router._handlers[MessageType.DISCOVER]

    def broken(*_: Any) -> None:
        raise RuntimeError("handler bug")

    mesh.router._handlers[MessageType.DISCOVER] = broken
    with caplog.at_level(logging.ERROR, logger="agentmesh.hub"):
        reply = mesh.request(requester, "discover")
    assert len(requester.frames) == 1
    assert reply["type"] == "error"
    assert reply["from"] == HUB
    assert reply["payload"]["code"] == "internal"
    assert reply["payload"]["message"] == "internal hub error; the hub logged it"
    assert [r.exc_info[1].args for r in caplog.records if r.exc_info] == [("handler bug",)]
    assert mesh.router.summary().counters["errors"] == 1

    requester.clear()
    assert mesh.request(requester, "heartbeat")["type"] == "heartbeat_ack"
    task = mesh.delegate(requester)
    assert task["state"] == "in_progress"
    assert _only(agent, "delegate")["payload"]["task_id"] == task["task_id"]

    mesh.router._handlers[MessageType.DISCOVER] = original
    assert mesh.discover(requester) == {agent.agent_id: True, requester.agent_id: True}


# --- counters -----------------------------------------------------------------------------


def test_summary_counters_follow_what_happened() -> None:
    mesh = Mesh()
    zero = dict.fromkeys(
        (
            "frames_in",
            "frames_out",
            "errors",
            "delegated",
            "completed",
            "failed",
            "timeout",
            "cancelled",
            "broadcasts",
        ),
        0,
    )
    assert mesh.router.summary().counters == zero

    agent, requester = _pair(mesh)  # 2 in, 2 out
    first = mesh.delegate(requester)["task_id"]  # 1 in, 2 out (task + reply)
    mesh.send(agent, "result", {"task_id": first, "success": True})  # 1 in, 1 out
    mesh.at(1.0)
    mesh.delegate(requester, ttl=5)  # 1 in, 2 out
    mesh.fire(6.0)  # 2 out (outcome + cancel)
    mesh.router.receive(requester, "garbage")  # 1 in, 1 out
    summary = mesh.request(requester, "status")["payload"]  # 1 in, 1 out
    assert summary["counters"] == {
        **zero,
        "frames_in": 7,
        "frames_out": 10,  # the reply is counted once it is sent
        "errors": 1,
        "delegated": 2,
        "completed": 1,
        "timeout": 1,
    }
    assert summary["uptime"] == 6.0
    assert (summary["agents"], summary["online"]) == (2, 2)

    mesh.request(requester, "broadcast", {"message": "hi"})  # 1 in, 2 out
    third = mesh.delegate(requester)["task_id"]  # 1 in, 2 out
    mesh.send(agent, "result", {"task_id": third, "success": False})  # 1 in, 1 out
    fourth = mesh.delegate(requester)["task_id"]  # 1 in, 2 out
    mesh.request(requester, "cancel", {"task_id": fourth})  # 1 in, 3 out
    result = mesh.router.summary()
    assert result.counters == {
        **zero,
        "frames_in": 12,
        "frames_out": 21,
        "errors": 1,
        "delegated": 4,
        "completed": 1,
        "failed": 1,
        "timeout": 1,
        "cancelled": 1,
        "broadcasts": 1,
    }
    assert result.tasks == {
        "pending": 0,
        "in_progress": 0,
        "completed": 1,
        "failed": 1,
        "timeout": 1,
        "cancelled": 1,
    }
    total = sum(len(p.frames) for p in (agent, requester))
    assert total == 21 - 2  # every frame but the two register replies cleared by _pair


# --- broadcast ----------------------------------------------------------------------------


def test_broadcast_reaches_every_other_online_agent_once() -> None:
    mesh = Mesh()
    sender = mesh.register("a")
    b = mesh.register("b")
    c = mesh.register("c")
    away = mesh.register("d")
    mesh.router.disconnected(away, ())
    anonymous = FakePeer()
    mesh.router.connected(anonymous)
    for peer in (sender, b, c, away):
        peer.clear()

    ack = mesh.request(sender, "broadcast", {"message": "hi", "data": {"k": [1]}})
    assert ack["type"] == "broadcast"
    assert ack["payload"] == {"recipients": 2}
    assert len(sender.frames) == 1
    assert len(b.frames) == 1
    assert b.frames == c.frames  # the very same frame
    frame = b.frames[0]
    assert frame["type"] == "broadcast"
    assert frame["from"] == sender.agent_id
    assert frame["to"] is None
    assert "in_reply_to" not in frame
    assert frame["payload"] == {"message": "hi", "data": {"k": [1]}}
    assert away.frames == []
    assert anonymous.frames == []
    assert mesh.router.summary().counters["broadcasts"] == 1


def test_broadcast_with_no_one_else_online_reaches_no_one() -> None:
    mesh = Mesh()
    sender = mesh.register("a")
    anonymous = FakePeer()
    mesh.router.connected(anonymous)
    ack = mesh.request(sender, "broadcast", {"message": "anyone?"})
    assert ack["payload"] == {"recipients": 0}
    assert anonymous.frames == []
    refused = mesh.request(anonymous, "broadcast", {"message": "me too"})
    assert refused["payload"]["code"] == "not_registered"
    assert [f["type"] for f in sender.frames] == ["register", "broadcast"]


def test_timers_that_can_no_longer_fire_are_shed() -> None:
    """One TTL timer per task, but the finished tasks' timers do not pile up: the heap
    stays proportional to what is pending, not to how many tasks went through."""
    mesh = Mesh()
    agent, requester = _pair(mesh)
    open_task = mesh.delegate(requester, "echo")["task_id"]
    for _ in range(3000):
        _completed_task(mesh, agent, requester)
    assert len(mesh.router.timers) <= 1024
    assert open_task in [key for _, _, key in mesh.router.timers]
    mesh.fire(mesh.router.config.default_ttl)
    timed_out = mesh.router.tasks.get(open_task)
    assert timed_out is not None
    assert timed_out.state.value == "timeout"


# --- catch-up at the peer's pace ----------------------------------------------------------


class NarrowPeer(FakePeer):
    """A peer with room for `room` more frames until the test drains it."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def send(
        self,
        frame: str,
        *,
        outcome_of: str | None = None,
        droppable: bool = False,
        durable: bool = False,
    ) -> None:
        super().send(frame, outcome_of=outcome_of, droppable=droppable)
        self.room -= 1

    def has_room(self) -> bool:
        return self.room > 0


def test_a_catch_up_goes_at_the_peers_pace_and_sends_each_outcome_once() -> None:
    mesh = Mesh(resume_grace=30.0)
    agent, requester = _pair(mesh)
    task_ids = [mesh.delegate(requester)["task_id"] for _ in range(50)]
    mesh.router.disconnected(requester)
    for task_id in task_ids:
        mesh.send(agent, "result", {"task_id": task_id, "success": True})
    back = NarrowPeer(room=10)
    mesh.router.connected(back)
    payload = {
        "name": "asker",
        "resume": {"agent_id": requester.agent_id, "token": requester.token},
    }
    mesh.send(back, "register", payload)
    assert len(back.of_type("result")) == 9  # the register reply took one slot
    assert mesh.router.catching_up(back)
    while mesh.router.catching_up(back):
        back.room = 10
        mesh.router.drained(back)
    assert sorted(f["payload"]["task_id"] for f in back.of_type("result")) == sorted(task_ids)
    back.room = 10
    mesh.router.drained(back)  # nothing more
    assert len(back.of_type("result")) == 50


def test_an_outcome_sent_while_the_catch_up_waits_is_not_sent_again() -> None:
    mesh = Mesh(resume_grace=30.0)
    agent, requester = _pair(mesh)
    first = mesh.delegate(requester)["task_id"]
    second = mesh.delegate(requester)["task_id"]
    mesh.router.disconnected(requester)
    mesh.send(agent, "result", {"task_id": first, "success": True})
    back = NarrowPeer(room=1)  # just the register reply
    mesh.router.connected(back)
    payload = {
        "name": "asker",
        "resume": {"agent_id": requester.agent_id, "token": requester.token},
    }
    mesh.send(back, "register", payload)
    mesh.send(agent, "result", {"task_id": second, "success": True})  # sent at once
    back.room = 10
    mesh.router.drained(back)
    assert sorted(f["payload"]["task_id"] for f in back.of_type("result")) == sorted(
        [first, second]
    )


def test_awaiting_brings_back_an_outcome_written_to_the_old_connection() -> None:
    mesh = Mesh(resume_grace=30.0)
    agent, requester = _pair(mesh)
    lost, kept = mesh.delegate(requester)["task_id"], mesh.delegate(requester)["task_id"]
    mesh.send(agent, "result", {"task_id": lost, "success": True})
    mesh.send(agent, "result", {"task_id": kept, "success": True})
    mesh.router.disconnected(requester)  # both written whole: neither is owed
    back = FakePeer()
    mesh.router.connected(back)
    resume = {"agent_id": requester.agent_id, "token": requester.token, "awaiting": [lost]}
    mesh.send(back, "register", {"name": "asker", "resume": resume})
    assert [f["payload"]["task_id"] for f in back.of_type("result")] == [lost]


# --- Trace context (W3C traceparent, tracestate) ----------------------------------------

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
TRACE = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}


def test_a_delegates_trace_context_is_on_the_task_frame_progress_and_outcome() -> None:
    mesh = Mesh()
    agent, requester = _pair(mesh)
    task_id = mesh.delegate(requester, ttl=10, **TRACE)["task_id"]
    assert _only(agent, "delegate")["payload"] == {
        "task_id": task_id,
        "capability": "echo",
        "params": {},
        "ttl": 10.0,
        **TRACE,
    }
    requester.clear()

    # Progress without trace context gets the task's; with its own, it keeps it.
    mesh.send(agent, "progress", {"task_id": task_id, "progress": 0.5})
    mine = "00-4bf92f3577b34da6a3ce929d0e0e4736-b7ad6b7169203331-01"
    mesh.send(agent, "progress", {"task_id": task_id, "progress": 0.7, "traceparent": mine})
    first, second = requester.of_type("progress")
    assert first["payload"] == {
        "task_id": task_id,
        "progress": 0.5,
        "message": None,
        "data": None,
        **TRACE,
    }
    assert second["payload"]["traceparent"] == mine
    assert "tracestate" not in second["payload"]
    requester.clear()

    mesh.send(agent, "result", {"task_id": task_id, "success": True, "data": "ok"})
    assert _only(requester, "result")["payload"] == {
        "task_id": task_id,
        "state": "completed",
        "success": True,
        "data": "ok",
        "error": None,
        **TRACE,
    }


def test_without_trace_context_the_frames_have_no_trace_fields() -> None:
    mesh = Mesh()
    agent, requester = _pair(mesh)
    task_id = mesh.delegate(requester)["task_id"]
    mesh.send(agent, "progress", {"task_id": task_id, "progress": 0.5})
    mesh.send(agent, "result", {"task_id": task_id, "success": False, "error": "no"})
    frames = agent.frames + requester.frames
    assert [f["type"] for f in frames] == ["delegate", "delegate", "progress", "result"]
    for frame in frames:
        assert "traceparent" not in frame["payload"], frame
        assert "tracestate" not in frame["payload"], frame
    assert mesh.router.tasks.get(task_id).traceparent is None


def test_a_traceparent_without_tracestate_goes_alone() -> None:
    mesh = Mesh()
    agent, requester = _pair(mesh)
    task_id = mesh.delegate(requester, traceparent=TRACEPARENT)["task_id"]
    assignment = _only(agent, "delegate")["payload"]
    assert (assignment["traceparent"], "tracestate" in assignment) == (TRACEPARENT, False)
    mesh.fire(mesh.router.next_deadline())
    (outcome,) = (f["payload"] for f in requester.of_type("result"))
    assert (outcome["state"], outcome["traceparent"]) == ("timeout", TRACEPARENT)
    assert "tracestate" not in outcome
    assert mesh.router.tasks.get(task_id).traceparent == TRACEPARENT


def test_the_resume_catch_up_carries_the_trace_context() -> None:
    mesh = Mesh()
    agent, requester = _pair(mesh)
    task_id = mesh.delegate(requester, **TRACE)["task_id"]
    mesh.router.disconnected(agent, ())
    back = mesh.register("echoer", "echo", resume=agent)
    again = back.of_type("delegate")
    assert [f["payload"]["task_id"] for f in again] == [task_id]
    assert {k: again[0]["payload"][k] for k in TRACE} == TRACE

    # An outcome the requester missed (cut off with its connection) comes again, from
    # the finished task's row, with the trace context.
    mesh.send(back, "result", {"task_id": task_id, "success": True, "data": 1})
    assert requester.outcomes[-1] == task_id
    mesh.router.disconnected(requester, [task_id])
    requester_back = mesh.register("asker", resume=requester)
    (outcome,) = requester_back.of_type("result")
    assert outcome["payload"]["task_id"] == task_id
    assert {k: outcome["payload"][k] for k in TRACE} == TRACE


@pytest.mark.parametrize(
    ("fields", "path", "fragment"),
    [
        ({"traceparent": "not a traceparent"}, "$.payload.traceparent", "W3C traceparent"),
        ({"traceparent": TRACEPARENT.upper()}, "$.payload.traceparent", "lowercase hex"),
        ({"traceparent": TRACEPARENT + "-00"}, "$.payload.traceparent", "W3C traceparent"),
        ({"traceparent": TRACEPARENT + "\n"}, "$.payload.traceparent", "W3C traceparent"),
        ({"traceparent": "ff" + TRACEPARENT[2:]}, "$.payload.traceparent", "version ff"),
        (
            {"traceparent": f"00-{'0' * 32}-00f067aa0ba902b7-01"},
            "$.payload.traceparent",
            "all zeros",
        ),
        (
            {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"},
            "$.payload.traceparent",
            "all zeros",
        ),
        ({"traceparent": 7}, "$.payload.traceparent", "expected a string"),
        (
            {"traceparent": TRACEPARENT, "tracestate": "a=" + "x" * 511},
            "$.payload.tracestate",
            "longer than 512",
        ),
        (
            {"traceparent": TRACEPARENT, "tracestate": "caf\u00e9=1"},
            "$.payload.tracestate",
            "printable ASCII",
        ),
        (
            {"traceparent": TRACEPARENT, "tracestate": "a=1\tb=2"},
            "$.payload.tracestate",
            "printable ASCII",
        ),
        ({"tracestate": "a=1"}, "$.payload.tracestate", "only allowed with a traceparent"),
    ],
)
def test_a_bad_trace_context_is_refused_naming_its_field(
    fields: dict[str, Any], path: str, fragment: str
) -> None:
    mesh = Mesh()
    agent, requester = _pair(mesh)
    reply = mesh.request(requester, "delegate", {"capability": "echo", **fields})
    assert reply["type"] == "error", reply
    assert reply["payload"]["code"] == "invalid_message"
    assert path in reply["payload"]["message"], reply
    assert fragment in reply["payload"]["message"]
    assert agent.frames == []  # no task was made
    assert len(mesh.router.tasks) == 0

    # The same on progress, which names its task.
    task_id = mesh.delegate(requester)["task_id"]
    requester.clear()
    agent.clear()
    mesh.send(agent, "progress", {"task_id": task_id, **fields})
    error = _only(agent, "error")["payload"]
    assert error["code"] == "invalid_message"
    assert path in error["message"], error
    assert requester.frames == []


def test_a_tracestate_of_512_printable_characters_is_accepted() -> None:
    mesh = Mesh()
    agent, requester = _pair(mesh)
    state = "a=" + "~ !" * 170
    assert len(state) == 512
    mesh.delegate(requester, traceparent=TRACEPARENT, tracestate=state)
    assert _only(agent, "delegate")["payload"]["tracestate"] == state


class FakeTracer:
    """A `TaskTracer` that records what the router tells it and forwards its own context."""

    def __init__(self) -> None:
        self.starts: list[tuple[str, str | None, str | None, str]] = []
        self.ends: list[tuple[str, str]] = []
        self.forward: tuple[str, str | None] | None = (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01",
            "hub=1",
        )

    def started(self, record: Any) -> tuple[str, str | None] | None:
        self.starts.append(
            (record.task_id, record.traceparent, record.tracestate, record.state.value)
        )
        return self.forward

    def ended(self, record: Any) -> None:
        self.ends.append((record.task_id, record.state.value))


def test_a_tracer_sees_each_task_start_and_end_and_the_assignee_gets_its_context() -> None:
    mesh = Mesh()
    fake = FakeTracer()
    mesh.router = Router(
        HubConfig(),
        clock=mesh.clock,
        wall=lambda: WALL0 + mesh.clock.now,
        wake=mesh.wakes.append,
        tracer=fake,
    )
    agent, requester = _pair(mesh)
    done = mesh.delegate(requester, **TRACE)["task_id"]
    assert fake.starts == [(done, TRACEPARENT, TRACESTATE, "pending")]
    forwarded = {"traceparent": fake.forward[0], "tracestate": fake.forward[1]}  # type: ignore[index]
    payload = _only(agent, "delegate")["payload"]
    assert {k: payload[k] for k in TRACE} == forwarded
    mesh.send(agent, "result", {"task_id": done, "success": True})
    assert fake.ends == [(done, "completed")]
    # The requester's frames carry its own context, not the hub's.
    assert {k: requester.of_type("result")[0]["payload"][k] for k in TRACE} == TRACE

    # An untraced task: the tracer sees it, but its frames carry no trace fields (agents
    # older than them refuse them).
    agent.clear()
    plain = mesh.delegate(requester)["task_id"]
    assert fake.starts[1] == (plain, None, None, "pending")
    assert not TRACE.keys() & _only(agent, "delegate")["payload"].keys()
    mesh.send(agent, "result", {"task_id": plain, "success": True})

    # After a drop the assignee gets the tracer's context again.
    agent.clear()
    failed = mesh.delegate(requester, **TRACE)["task_id"]
    mesh.router.disconnected(agent, ())
    back = mesh.register("echoer", "echo", resume=agent)
    (again,) = back.of_type("delegate")
    assert {k: again["payload"][k] for k in TRACE} == forwarded
    mesh.send(back, "result", {"task_id": failed, "success": False})
    assert fake.starts[2] == (failed, TRACEPARENT, TRACESTATE, "pending")
    assert fake.ends[2] == (failed, "failed")

    # A tracer with nothing to forward: the assignee gets the delegate's context.
    fake.forward = None
    back.clear()
    timed = mesh.delegate(requester, ttl=1, **TRACE)["task_id"]
    assert {k: _only(back, "delegate")["payload"][k] for k in TRACE} == TRACE
    mesh.fire(mesh.clock.now + 1)
    assert fake.ends[3] == (timed, "timeout")

    # A refused delegate starts nothing.
    reply = mesh.request(requester, "delegate", {"capability": "nobody", **TRACE})
    assert reply["payload"]["code"] == "no_capable_agent"
    assert len(fake.starts) == 4
