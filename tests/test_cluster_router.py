"""The remote route in the pure router: two and three routers wired back to back.

Each router is one hub of a cluster. A `Net` stands in for NATS and the Trio shell: it
holds every message between hubs (and every answer) until a test delivers, drops,
duplicates or reorders it, and it hands each hub's directory rows to the others
(`sync`). One manual clock serves every hub, so every deadline is exact. No sockets,
no trio.
"""

from __future__ import annotations

import itertools
from collections import Counter
from typing import Any

import attrs
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentmesh._cluster_tasks import TaskRows
from agentmesh._journal import Journal
from agentmesh._remote import (
    EVERY_HUB,
    RELEASE_WAIT,
    RETRY_FIRST,
    RemoteState,
    task_key,
    task_value,
)
from agentmesh.config import HubConfig
from agentmesh.routing import Router
from agentmesh.sqlite_store import SQLiteStore

from .test_routing import WALL0, Clock, FakePeer

INF = float("inf")


@attrs.define(kw_only=True, eq=False)
class Message:
    """A message between hubs on its way, or (with `answer`) its answer on the way back."""

    src: str
    dest: str
    kind: str
    body: bytes
    request: bool = True
    answer: bytes | None = None

    @property
    def task_id(self) -> str:
        return str(orjson.loads(self.body).get("task_id"))


class Port:
    """One hub's `ClusterPort`: what it sends goes on the wire, encoded at once."""

    def __init__(self, name: str, net: Net) -> None:
        self._name = name
        self._net = net

    @property
    def name(self) -> str:
        return self._name

    def send(self, hub: str, kind: str, body: dict[str, Any], *, request: bool) -> None:
        message = Message(src=self._name, dest=hub, kind=kind, body=orjson.dumps(body))
        message.request = request
        self._net.wire.append(message)

    def forget(self, agent_id: str, hub: str) -> None:
        self._net.forgotten.append((self._name, agent_id, hub))


class Answer:
    """The `reply` of one delivered request: its answers go on the wire back."""

    def __init__(self, net: Net, request: Message) -> None:
        self._net = net
        self._request = request
        self.durable: list[bool] = []

    def send(
        self,
        frame: str,
        *,
        outcome_of: str | None = None,
        droppable: bool = False,
        durable: bool = False,
    ) -> None:
        assert self._request.request, f"{self._request.kind} is not answered"
        self.durable.append(durable)
        r = self._request
        self._net.wire.append(
            Message(src=r.dest, dest=r.src, kind=r.kind, body=r.body, answer=frame.encode())
        )

    def close(self, code: int, reason: str) -> None:  # pragma: no cover - never called
        raise AssertionError("an answer is never closed")

    def has_room(self) -> bool:  # pragma: no cover - never called
        return True


class Hub:
    """One router of the cluster, and its clients."""

    def __init__(self, name: str, net: Net, config: HubConfig) -> None:
        self.name = name
        self.net = net
        self.router = Router(
            config,
            clock=net.clock,
            wall=lambda: WALL0 + net.clock.now,
            cluster=Port(name, net),
        )
        self._ids = itertools.count(1)

    def send(self, peer: FakePeer, type_: str, payload: Any = None, **envelope: Any) -> str:
        msg_id = f"{self.name}{next(self._ids)}"
        frame = {"type": type_, "id": msg_id, "payload": {} if payload is None else payload}
        frame.update(envelope)
        self.router.receive(peer, orjson.dumps(frame).decode())
        return msg_id

    def request(self, peer: FakePeer, type_: str, payload: Any = None, **env: Any) -> Any:
        msg_id = self.send(peer, type_, payload, **env)
        replies = [f for f in peer.frames if f.get("in_reply_to") == msg_id]
        assert len(replies) == 1, peer.frames
        return replies[0]

    def register(self, name: str, *capabilities: Any, **fields: Any) -> FakePeer:
        peer = FakePeer()
        self.router.connected(peer, protocol=2)
        payload = {"name": name, "capabilities": list(capabilities), **fields}
        reply = self.request(peer, "register", payload)
        assert reply["type"] == "register", reply
        peer.agent_id = reply["payload"]["agent_id"]
        peer.token = reply["payload"]["resume_token"]
        peer.clear()
        self.net.sync()
        return peer

    def delegate(self, requester: FakePeer, capability: str = "echo", **fields: Any) -> Any:
        envelope = {"to": fields.pop("to")} if "to" in fields else {}
        payload = {"capability": capability, **fields}
        reply = self.request(requester, "delegate", payload, **envelope)
        assert reply["type"] == "delegate", reply
        return reply["payload"]

    def result(
        self, agent: FakePeer, task_id: str, *, success: bool = True, data: Any = "ok"
    ) -> None:
        self.send(agent, "result", {"task_id": task_id, "success": success, "data": data})

    @property
    def remote(self) -> RemoteState:
        """The router's cluster state (what it owes other hubs, which hubs are silent)."""
        assert self.router._remote is not None
        return self.router._remote

    def state(self, task_id: str) -> str:
        record = self.router.tasks.get(task_id)
        assert record is not None
        return record.state.value


class Net:
    """The cluster: hubs by name, the messages between them, and one clock."""

    def __init__(self, *names: str, **config: Any) -> None:
        self.clock = Clock()
        self.wire: list[Message] = []
        self.hubs = {name: Hub(name, self, HubConfig(**config)) for name in names}
        self._listed: dict[str, set[str]] = {name: set() for name in names}
        self.receipts: list[Answer] = []
        self.forgotten: list[tuple[str, str, str]] = []  # the janitors' deletes: (by, agent, hub)

    def __getitem__(self, name: str) -> Hub:
        return self.hubs[name]

    def sync(self) -> None:
        """Hand each hub's directory rows (and the agents gone from them) to the others."""
        rows_of = {name: hub.router.directory_rows() for name, hub in self.hubs.items()}
        everywhere = {row["agent_id"] for rows in rows_of.values() for row in rows}
        for name, hub in self.hubs.items():
            rows = rows_of[name]
            listed = {row["agent_id"] for row in rows}
            # A key is deleted only by a hub whose row it holds: an agent that moved to
            # another hub is that hub's row now, not gone.
            gone = self._listed[name] - listed - everywhere
            self._listed[name] = listed
            for other in self.hubs.values():
                if other is not hub:
                    other.router.directory(rows, gone=gone)

    def deliver(self, index: int = 0, copies: int = 1) -> Message:
        """Deliver the message at `index` (`copies` times over, as NATS may)."""
        message = self.wire.pop(index)
        for _ in range(copies):
            self._handle(message)
        return message

    def _handle(self, message: Message) -> None:
        if message.dest == EVERY_HUB:  # a broadcast: to every other hub, unanswered
            for name, other in self.hubs.items():
                if name != message.src:
                    reply = Answer(self, message)
                    other.router.cluster_receive(
                        message.src, message.kind, orjson.loads(message.body), reply
                    )
            return
        hub = self.hubs[message.dest].router
        body = orjson.loads(message.body)
        if message.answer is None:
            reply = Answer(self, message)
            self.receipts.append(reply)
            hub.cluster_receive(message.src, message.kind, body, reply)
        else:
            hub.cluster_reply(message.src, message.kind, body, orjson.loads(message.answer))

    def run(self, limit: int = 1000, copies: int = 1) -> None:
        """Deliver everything on the wire, in order (each `copies` times), until it is
        empty."""
        for _ in range(limit):
            if not self.wire:
                return
            self.deliver(copies=copies)
        raise AssertionError(f"the wire never emptied: {self.wire}")

    def drop(self, kind: str | None = None, *, answers: bool = False) -> list[Message]:
        """Take off the wire the messages (or, with `answers`, the answers) of `kind`."""
        dropped = [
            m
            for m in self.wire
            if (kind is None or m.kind == kind) and (m.answer is not None) == answers
        ]
        self.wire = [m for m in self.wire if m not in dropped]
        return dropped

    def at(self, t: float) -> None:
        """Move the clock to `t` and fire every hub's timers."""
        self.clock.now = t
        for hub in self.hubs.values():
            hub.router.fire_timers()

    def kinds(self) -> list[str]:
        return [m.kind + ("?" if m.answer is None else "!") for m in self.wire]


def outcomes(peer: FakePeer) -> list[dict[str, Any]]:
    return [f["payload"] for f in peer.of_type("result") if "in_reply_to" not in f]


def owed(net: Net) -> dict[str, list[str]]:
    """What each hub still owes another (its re-send entries), by hub."""
    return {name: sorted(hub.remote.owed) for name, hub in net.hubs.items() if hub.remote.owed}


def _pair(net: Net, here: str = "a", there: str = "b", **agent: Any) -> tuple[FakePeer, FakePeer]:
    """A requester on `here` and an echo agent on `there`."""
    requester = net[here].register("asker")
    worker = net[there].register("echoer", {"name": "echo", **agent.pop("cap", {})}, **agent)
    return requester, worker


# --- discovery and selection --------------------------------------------------------------


def test_discover_shows_remote_agents_and_their_hub_going_silent() -> None:
    net = Net("a", "b")
    asker = net["a"].register("asker")
    worker = net["b"].register("echoer", {"name": "echo", "description": "says it back"})
    reply = net["a"].request(asker, "discover", {"capability": "echo"})
    (found,) = reply["payload"]["agents"]
    assert found["agent_id"] == worker.agent_id
    assert found["online"] is True
    assert found["capabilities"][0]["description"] == "says it back"

    net["a"].router.hub_presence("b", alive=False)
    asker.clear()
    reply = net["a"].request(asker, "discover", {"capability": "echo"})
    assert [a["online"] for a in reply["payload"]["agents"]] == [False]
    net["a"].router.hub_presence("b", alive=True)
    asker.clear()
    reply = net["a"].request(asker, "discover", {"capability": "echo", "online": True})
    assert [a["agent_id"] for a in reply["payload"]["agents"]] == [worker.agent_id]


def test_a_remote_agent_is_neither_stored_nor_counted_as_this_hubs_own() -> None:
    net = Net("a", "b")
    journal = Journal()
    net["a"].router = Router(
        HubConfig(max_agents=2), clock=net.clock, journal=journal, cluster=Port("a", net)
    )
    for i in range(3):
        net["b"].register(f"far-{i}", {"name": "echo"})
    assert len(net["a"].router.registry) == 3
    assert net["a"].router.directory_rows() == []
    changes = net["a"].router.take_changes()
    assert changes.agents == []
    assert changes.gone_agents == []
    near = [net["a"].register(f"near-{i}") for i in (1, 2)]  # two of its own, whatever
    refused = net["a"].request(FakePeer(), "register", {"name": "near-3"})  # the directory
    assert refused["payload"]["code"] == "limit_exceeded"
    assert [row.agent_id for row in net["a"].router.take_changes().agents] == [
        peer.agent_id for peer in near
    ]
    net["b"].send(net["b"].register("far-3"), "deregister")
    net.sync()  # in the directory and gone again: not a store's business either
    changes = net["a"].router.take_changes()
    assert changes.agents == []
    assert changes.gone_agents == []


def test_selection_prefers_the_local_agent_at_equal_load() -> None:
    net = Net("a", "b")
    asker = net["a"].register("asker")
    remote = net["b"].register("far", {"name": "echo"})
    local = net["a"].register("near", {"name": "echo"})
    first = net["a"].delegate(asker)
    assert first["agent_id"] == local.agent_id  # 0 against 0: the local one
    second = net["a"].delegate(asker)
    assert second["agent_id"] == remote.agent_id  # 1 against 0: the remote one
    third = net["a"].delegate(asker)
    assert third["agent_id"] == local.agent_id  # 1 against 1: the local one again


# --- delegation and results ---------------------------------------------------------------


@pytest.mark.parametrize(("here", "there"), [("a", "b"), ("b", "a")])
def test_delegation_across_hubs_both_ways(here: str, there: str) -> None:
    net = Net("a", "b")
    asker, worker = _pair(net, here, there)
    task = net[here].delegate(asker, params={"text": "hi"}, ttl=30)
    assert task == {"task_id": task["task_id"], "agent_id": worker.agent_id, "state": "pending"}
    task_id = task["task_id"]
    assert net.kinds() == ["task?"]
    net.run()
    (assignment,) = worker.of_type("delegate")
    assert assignment["from"] == asker.agent_id
    assert assignment["payload"] == {
        "task_id": task_id,
        "capability": "echo",
        "params": {"text": "hi"},
        "ttl": 30.0,
    }
    assert asker.of_type("status")[-1]["payload"]["state"] == "in_progress"
    assert net[here].state(task_id) == "in_progress"
    assert all(net.receipts[0].durable)

    net[there].result(worker, task_id, data={"text": "hi"})
    assert net.kinds() == ["result?"]
    net.run()
    assert outcomes(asker) == [
        {
            "task_id": task_id,
            "state": "completed",
            "success": True,
            "data": {"text": "hi"},
            "error": None,
        }
    ]
    (outcome,) = [f for f in asker.of_type("result")]
    assert outcome["from"] == worker.agent_id
    assert net[here].state(task_id) == "completed"
    assert net[there].state(task_id) == "completed"
    assert owed(net) == {}
    assert net[there].router.tasks.owed(asker.agent_id) == []  # the stub is owed to nobody


def test_delegation_by_id_to_a_remote_agent() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    net["a"].register("near", {"name": "echo"})  # would win a choice by capability
    task = net["a"].delegate(asker, to=worker.agent_id)
    assert task["agent_id"] == worker.agent_id
    net.run()
    assert len(worker.of_type("delegate")) == 1


def test_a_failure_from_the_remote_agent() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker)["task_id"]
    net.run()
    net["b"].send(worker, "result", {"task_id": task_id, "success": False, "error": "no"})
    net.run()
    assert [(o["state"], o["error"]) for o in outcomes(asker)] == [("failed", "no")]


def test_a_result_that_overtakes_the_task_answer() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker)["task_id"]
    net.deliver()  # the task reaches b; its answer waits on the wire
    assert net.kinds() == ["task!"]
    net["b"].result(worker, task_id)
    net.deliver(1)  # the result first
    assert [o["state"] for o in outcomes(asker)] == ["completed"]
    net.run()  # then the late answer: nothing more
    assert [o["state"] for o in outcomes(asker)] == ["completed"]
    assert owed(net) == {}


def test_three_hubs_each_delegating_to_the_next() -> None:
    net = Net("a", "b", "c")
    askers = {name: net[name].register(f"asker-{name}") for name in "abc"}
    workers = {name: net[name].register(f"w-{name}", {"name": f"job-{name}"}) for name in "abc"}
    tasks = {}
    for here, there in ("ab", "bc", "ca"):
        tasks[here] = net[here].delegate(askers[here], f"job-{there}")["task_id"]
    net.run()
    for here, there in ("ab", "bc", "ca"):
        (assignment,) = workers[there].of_type("delegate")
        assert assignment["payload"]["task_id"] == tasks[here]
        net[there].result(workers[there], tasks[here], data=here + there)
    net.run()
    for here, there in ("ab", "bc", "ca"):
        assert [o["data"] for o in outcomes(askers[here])] == [here + there]
    assert owed(net) == {}


# --- cancel, TTL, progress ----------------------------------------------------------------


def test_cancel_by_the_requester_reaches_the_remote_agent() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker)["task_id"]
    net.run()
    ack = net["a"].request(asker, "cancel", {"task_id": task_id, "reason": "changed my mind"})
    assert ack["payload"] == {"task_id": task_id, "state": "cancelled"}
    assert [o["state"] for o in outcomes(asker)] == ["cancelled"]
    assert net.kinds() == ["cancel?"]
    net.run()
    (cancel,) = worker.of_type("cancel")
    assert cancel["payload"] == {"task_id": task_id, "reason": "changed my mind"}
    assert net["b"].state(task_id) == "cancelled"
    worker.clear()
    net["b"].result(worker, task_id)  # too late: refused there, nothing sent
    assert worker.of_type("error")[0]["payload"]["code"] == "task_finished"
    assert net.wire == []
    assert owed(net) == {}


def test_a_cancel_that_overtakes_its_task_is_sent_again() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker)["task_id"]
    (late,) = net.drop("task")  # held back
    net["a"].request(asker, "cancel", {"task_id": task_id})
    net.run()  # the cancel finds nothing at b, and is answered
    assert f"cancel:{task_id}" not in net["a"].remote.owed
    net.wire.append(late)  # now the task arrives
    net.run()
    assert [f["type"] for f in worker.frames] == ["delegate", "cancel"]
    assert net["b"].state(task_id) == "cancelled"
    assert [o["state"] for o in outcomes(asker)] == ["cancelled"]


def test_ttl_is_the_owners_and_the_assignee_hub_cancels_a_second_later() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker, ttl=5)["task_id"]
    net.run()
    net.at(4.999)
    net.drop("task")  # re-sends (none should be due)
    assert outcomes(asker) == []
    net.at(5.0)
    assert [(o["state"], o["error"]) for o in outcomes(asker)] == [
        ("timeout", "task timed out after 5s")
    ]
    cancels = net.drop("cancel")  # the owner's cancel is lost, every time
    assert len(cancels) == 1
    for t in (5.1, 5.3, 5.7, 5.999):
        net.at(t)
        net.drop("cancel")
    assert worker.of_type("cancel") == []
    net.at(6.0)  # the deadline plus a second: b stops its agent on its own
    assert [c["payload"]["reason"] for c in worker.of_type("cancel")] == ["timeout"]
    assert net["b"].state(task_id) == "timeout"
    net.at(6.1)
    net.drop("cancel")
    net.at(10)
    assert net.wire == []
    assert owed(net) == {}  # the owner gave its cancel up a second after the deadline
    assert len(outcomes(asker)) == 1


def test_the_owners_timeout_reaching_the_stub_times_it_out_there_too() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker, ttl=5)["task_id"]
    net.run()
    net.at(5.0)
    net.run()  # the owner's cancel, for "timeout", reaches b
    assert [c["payload"]["reason"] for c in worker.of_type("cancel")] == ["timeout"]
    assert net["b"].state(task_id) == "timeout"
    assert [o["state"] for o in outcomes(asker)] == ["timeout"]
    assert owed(net) == {}


def test_ttl_of_a_task_whose_hub_is_unreachable() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    net["a"].router.link(False)
    task = net["a"].delegate(asker, ttl=2)
    assert task["state"] == "pending"
    assert net.wire == []  # nothing is sent while the link is down
    net.at(2.0)
    assert [o["state"] for o in outcomes(asker)] == ["timeout"]
    net.at(10)
    assert net.wire == []
    assert owed(net) == {}
    assert worker.frames == []


def test_progress_goes_to_the_requester() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker)["task_id"]
    net.run()
    net["b"].send(worker, "progress", {"task_id": task_id, "progress": 0.5, "message": "half"})
    assert net.kinds() == ["progress?"]
    assert net.wire[0].request is False
    net.run()
    (progress,) = asker.of_type("progress")
    assert progress["from"] == worker.agent_id
    assert progress["payload"]["progress"] == 0.5
    assert progress["payload"]["message"] == "half"
    assert net.wire == []  # unanswered


# --- identity: the lease check ------------------------------------------------------------


def test_a_stale_epoch_gets_not_holder() -> None:
    net = Net("a", "b", "c")
    asker, worker = _pair(net)
    # The requester's lease moved to c at epoch 1; a still thinks it holds it (at 0).
    row = {**net["a"].router.directory_rows()[0], "hub": "c", "epoch": 1}
    net["b"].router.directory([row])
    task_id = net["a"].delegate(asker, ttl=3)["task_id"]
    net.deliver()
    assert net.kinds() == ["task!"]
    assert orjson.loads(net.wire[0].answer or b"") == {"not_holder": "c"}
    net.run()
    assert worker.frames == []
    assert f"task:{task_id}" in net["a"].remote.owed  # still owed: re-sent
    net.at(0.1)
    assert net.kinds() == ["task?"]
    net.run()
    assert worker.frames == []
    net.at(3.0)
    assert [o["state"] for o in outcomes(asker)] == ["timeout"]


def test_only_the_holder_of_the_assignee_may_send_its_result() -> None:
    net = Net("a", "b", "c")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker)["task_id"]
    net.run()
    body = {"task_id": task_id, "assignee": worker.agent_id, "epoch": 0, "success": True}
    answer = Answer(net, Message(src="c", dest="a", kind="result", body=orjson.dumps(body)))
    net["a"].router.cluster_receive("c", "result", body, answer)
    assert [orjson.loads(m.answer or b"") for m in net.wire] == [{"not_holder": "b"}]
    net["a"].router.cluster_receive("b", "result", {**body, "epoch": 7}, answer)
    assert orjson.loads(net.wire[-1].answer or b"") == {"not_holder": "b"}
    assert outcomes(asker) == []
    assert net["a"].state(task_id) == "in_progress"
    net["a"].router.cluster_receive("b", "result", body, answer)  # the holder: taken
    assert [o["state"] for o in outcomes(asker)] == ["completed"]


def test_bad_messages_are_answered_with_an_error() -> None:
    net = Net("a", "b")
    router = net["a"].router
    for kind, body in [("task", {}), ("nonsense", {"task_id": "t"}), ("result", {"x": 1})]:
        message = Message(src="b", dest="a", kind=kind, body=orjson.dumps(body))
        router.cluster_receive("b", kind, body, Answer(net, message))
    assert [list(orjson.loads(m.answer or b"")) for m in net.wire] == [["error"]] * 3
    unanswered = Message(src="b", dest="a", kind="progress", body=b"{}", request=False)
    router.cluster_receive("b", "progress", {}, Answer(net, unanswered))
    assert len(net.wire) == 3


def _tampered(net: Net, kind: str, **change: Any) -> tuple[dict[str, Any], Message]:
    """The first message of `kind` on the wire, taken off it, with `change` applied."""
    (message,) = net.drop(kind)
    body = {**orjson.loads(message.body), **change}
    return body, attrs.evolve(message, body=orjson.dumps(body))


def _error_of(net: Net) -> str:
    (answer,) = [m for m in net.wire if m.answer is not None]
    error: str = orjson.loads(answer.answer or b"")["error"]
    return error


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"ttl": "nan"}, "ttl: expected int or float"),
        ({"ttl": float("nan")}, "ttl: must be a finite number"),
        ({"ttl": 1e9}, "ttl: must be from 0 to"),
        ({"ttl": True}, "ttl: expected int or float, got bool"),
        ({"params": [1]}, "params: expected dict"),
        ({"priority": 1000}, "priority: must be from -100 to 100"),
        ({"traceparent": 5}, "traceparent: expected str or null"),
        ({"traceparent": "00-bad"}, "traceparent"),
        ({"epoch": "0"}, "epoch: expected int"),
        ({"capability": None}, "capability: expected str"),
    ],
)
def test_a_bad_task_from_another_hub_is_refused_and_changes_nothing(
    change: dict[str, Any], complaint: str
) -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    net["a"].delegate(asker, ttl=5)
    body, message = _tampered(net, "task", **change)
    net["b"].router.cluster_receive("a", "task", body, Answer(net, message))
    assert complaint in _error_of(net)
    assert worker.of_type("delegate") == []
    assert len(net["b"].router.tasks) == 0
    # The hub's timers still work: a local task on b times out when it should.
    local, other = net["b"].register("local"), net["b"].register("other", {"name": "job"})
    task_id = net["b"].delegate(local, "job", ttl=2)["task_id"]
    assert other.of_type("delegate")
    net.at(2)
    assert net["b"].state(task_id) == "timeout"


@pytest.mark.parametrize(
    ("kind", "change", "complaint"),
    [
        ("result", {"error": {"nested": 1}}, "error: expected str or null, got dict"),
        ("result", {"success": "yes"}, "success: expected bool"),
        ("result", {"task_id": 7}, "task_id: expected str"),
    ],
)
def test_a_bad_result_from_another_hub_is_refused_and_re_sent(
    kind: str, change: dict[str, Any], complaint: str
) -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker)["task_id"]
    net.run()
    net["b"].result(worker, task_id)
    body, message = _tampered(net, kind, **change)
    net["a"].router.cluster_receive("b", kind, body, Answer(net, message))
    assert complaint in _error_of(net)
    assert outcomes(asker) == []  # nothing decided on a message that is not one
    net.run()  # the error answer leaves the result owed: b sends it again, whole
    net.at(0.1)
    net.run()
    assert [o["state"] for o in outcomes(asker)] == ["completed"]


def test_bad_progress_from_another_hub_is_dropped() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker)["task_id"]
    net.run()
    for change in ({"progress": "half"}, {"progress": float("inf")}, {"message": 5}):
        net["b"].send(worker, "progress", {"task_id": task_id, "progress": 0.5})
        body, message = _tampered(net, "progress", **change)
        net["a"].router.cluster_receive("b", "progress", body, Answer(net, message))
    assert asker.of_type("progress") == []
    assert net.wire == []  # progress is never answered, not even with an error


@pytest.mark.parametrize(
    "change",
    [
        {"capabilities": [{"name": 5}]},
        {"capabilities": ["echo"]},
        {"max_concurrency": "2"},
        {"max_concurrency": 0},
        {"online": "yes"},
        {"tags": [1]},
        {"hub": ""},
        {"epoch": 1.5},
    ],
)
def test_a_bad_directory_row_is_skipped_and_the_others_are_taken(change: dict[str, Any]) -> None:
    net = Net("a", "b")
    far = net["b"].register("far", {"name": "echo"})
    (row,) = net["b"].router.directory_rows()
    bad = {**row, **change, "agent_id": "agt_bad"}
    renamed = {**row, "agent_id": "agt_good", "name": "renamed"}
    net["a"].router.directory([bad, renamed])  # the good row after the bad one is taken
    assert sorted(a.agent_id for a in net["a"].router.registry) == sorted(
        [far.agent_id, "agt_good"]
    )
    asker = net["a"].register("asker")
    reply = net["a"].request(asker, "delegate", {"capability": "echo"})
    assert reply["type"] == "delegate", reply  # the capability still routes


@pytest.mark.parametrize("answer", [["in_progress"], None, {}, {"state": "bogus"}, 5])
def test_an_answer_that_is_not_one_leaves_the_task_owed(answer: Any) -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker, ttl=30)["task_id"]
    (message,) = net.drop("task")
    net["a"].router.cluster_reply("b", "task", orjson.loads(message.body), answer)
    assert owed(net) == {"a": [f"task:{task_id}"]}
    net.at(0.1)  # so it is sent again, and this time answered
    net.run()
    assert worker.of_type("delegate")
    assert net["a"].state(task_id) == "in_progress"


@pytest.mark.parametrize("beats", [False, True])
def test_presence_beats_do_not_reset_the_back_off(beats: bool) -> None:
    net = Net("a", "b")
    asker, _worker = _pair(net)
    net["a"].delegate(asker, ttl=60)
    net.drop("task")
    sent = []
    for tenth in range(1, 101):  # ten seconds, with every beat of b reported or none
        net.clock.now = tenth / 10
        if beats:
            net["a"].router.hub_presence("b", alive=True)
            net["a"].router.link(True)
        net["a"].router.fire_timers()
        sent += [round(net.clock.now, 1) for _ in net.drop("task")]
    # The back-off alone (100 ms, doubling to 2 s; the clock moves in tenths), with the
    # beats as without: 8 sends, ever further apart.
    gaps = [round(later - earlier, 1) for earlier, later in itertools.pairwise(sent)]
    assert (len(sent), sent[0], gaps) == (8, 0.1, sorted(gaps)), sent
    assert max(gaps) <= 2.1


def test_what_is_no_longer_owed_is_not_sent_when_a_hub_comes_back() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker, ttl=30)["task_id"]
    net.drop("task")  # lost
    net["a"].request(asker, "cancel", {"task_id": task_id})
    net.run()  # the cancel finds nothing on b: settled
    net["a"].router.hub_presence("b", alive=False)
    net["a"].router.hub_presence("b", alive=True)  # back before the task's re-send is due
    net.run()
    assert worker.of_type("delegate") == []
    assert owed(net) == {}


def _resume(net: Net, hub: str, worker: FakePeer, token: str | None = None) -> tuple[FakePeer, Any]:
    """`worker` resumes on `hub` on a new connection: the connection and the reply."""
    back = FakePeer()
    net[hub].router.connected(back, protocol=2)
    resume = {"agent_id": worker.agent_id, "token": worker.token if token is None else token}
    register = {"name": "echoer", "capabilities": [{"name": "echo"}], "resume": resume}
    return back, net[hub].request(back, "register", register)


def test_an_agent_resuming_on_the_owners_hub_takes_its_lease_and_tasks() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker, ttl=30)["task_id"]
    net.run()
    assert net["a"].state(task_id) == "in_progress"  # on b, which now dies
    net["a"].router.hub_presence("b", alive=False)
    back, reply = _resume(net, "a", worker)
    assert reply["payload"]["resumed"] is True, reply
    agent = net["a"].router.registry.get(worker.agent_id)
    assert (agent.hub, agent.epoch) == (None, 1)
    assert [f["payload"]["task_id"] for f in back.of_type("delegate")] == [task_id]
    net["a"].result(back, task_id, data="moved")
    assert [(o["state"], o["data"]) for o in outcomes(asker)] == [("completed", "moved")]
    assert owed(net) == {}  # nothing owed to b any more
    assert net.wire == []


def test_an_agent_resuming_on_a_third_hub_gets_its_tasks_from_their_owner() -> None:
    net = Net("a", "b", "c")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker, ttl=30)["task_id"]
    net.run()
    back, reply = _resume(net, "c", worker)  # b lost the agent's connection, not its state
    assert reply["payload"]["resumed"] is True, reply
    assert back.of_type("delegate") == []  # c has none of its tasks: their owners have
    net.sync()  # every hub sees the lease on c, at epoch 1
    assert net["a"].router.registry.get(worker.agent_id).hub == "c"
    assert worker.closes == [(4003, "this agent resumed on hub c")]
    assert net["b"].state(task_id) == "cancelled"  # b's stub, dropped without a word
    assert net.kinds() == ["task?"]  # a sends the task to c again
    net.run()
    assert [f["payload"]["task_id"] for f in back.of_type("delegate")] == [task_id]
    net["c"].result(back, task_id, data="from c")
    net.run()
    assert [(o["state"], o["data"]) for o in outcomes(asker)] == [("completed", "from c")]
    assert owed(net) == {}


def test_a_result_from_the_old_hub_after_the_move_is_refused() -> None:
    net = Net("a", "b", "c")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker, ttl=30)["task_id"]
    net.run()
    back, _ = _resume(net, "c", worker)
    net["c"].router.directory(net["c"].router.directory_rows())  # its own row: ignored
    net["a"].router.directory(net["c"].router.directory_rows())  # a sees the move first
    net["b"].result(worker, task_id, data="stale")  # b still thinks it holds the agent
    net.drop("task")
    net.run()
    assert outcomes(asker) == []  # b's result speaks for epoch 0: not the holder
    assert owed(net) == {"a": [f"task:{task_id}"], "b": [f"result:{task_id}"]}
    net.sync()  # b learns of the move: it speaks for the agent no more
    assert owed(net) == {"a": [f"task:{task_id}"]}
    net.at(0.1)  # a's re-send of the task reaches c
    net.run()
    assert [f["payload"]["task_id"] for f in back.of_type("delegate")] == [task_id]
    net["c"].result(back, task_id, data="from c")
    net.run()
    assert [(o["state"], o["data"]) for o in outcomes(asker)] == [("completed", "from c")]
    assert owed(net) == {}


@pytest.mark.parametrize("why", ["wrong token", "no hash in the row", "cut off"])
def test_a_resume_this_hub_cannot_check_keeps_the_agents_id(why: str) -> None:
    net = Net("a", "b")
    _asker, worker = _pair(net)
    if why == "no hash in the row":  # a row from a hub that does not write it
        rows = [{**r, "token_sha256": ""} for r in net["b"].router.directory_rows()]
        net["a"].router.directory(rows)
    if why == "cut off":
        net["a"].router.link(False)
    _back, reply = _resume(net, "a", worker, token="wrong" if why == "wrong token" else None)
    if why == "wrong token":  # as on one hub: a fresh identity, the agent left alone
        assert reply["payload"]["resumed"] is False
        assert reply["payload"]["agent_id"] != worker.agent_id
    else:
        assert reply["payload"]["code"] == "store_unavailable", reply
        assert "held by hub b" in reply["payload"]["message"]
    assert net["a"].router.registry.get(worker.agent_id).hub == "b"


def test_a_row_of_an_older_epoch_changes_nothing() -> None:
    net = Net("a", "b", "c")
    _asker, worker = _pair(net)
    old_rows = net["b"].router.directory_rows()
    _resume(net, "c", worker)
    net.sync()
    net["a"].router.directory(old_rows)  # late news of epoch 0
    assert net["a"].router.registry.get(worker.agent_id).hub == "c"
    net["c"].router.directory(old_rows)  # c holds it at epoch 1
    assert net["c"].router.registry.get(worker.agent_id).hub is None


def test_the_loser_of_a_race_to_take_an_agent_gives_it_up() -> None:
    net = Net("a", "b", "c")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker, ttl=30)["task_id"]
    net.run()
    back_a, _ = _resume(net, "a", worker)
    back_c, _ = _resume(net, "c", worker)  # both at epoch 1; c's write won in KV
    row = net["c"].router.directory_rows()[0]
    net["a"].router.directory([row])  # the same epoch: not news by itself
    assert net["a"].router.registry.get(worker.agent_id).hub is None
    net["a"].router.lease_lost(row)  # a's compare-and-set failed: the shell says so
    assert back_a.closes == [(4003, "this agent resumed on hub c")]
    assert net["a"].router.registry.get(worker.agent_id).hub == "c"
    net.run()
    assert [f["payload"]["task_id"] for f in back_c.of_type("delegate")] == [task_id]


def test_a_janitor_cut_off_at_its_moment_judges_once_back() -> None:
    net = Net("a", "b", resume_grace=5)
    _asker, worker = _pair(net)
    net["a"].router.hub_presence("b", alive=False)
    net.at(4)
    net["a"].router.link(False)  # a NATS blip over b's grace moment: a cannot judge
    net.at(5)
    net.at(6)
    assert net.forgotten == []
    net["a"].router.link(True)
    net.at(6.001)
    assert net.forgotten == [("a", worker.agent_id, "b")]


def _restarted_empty(net: Net, name: str) -> Hub:
    """Hub `name` restarted without its store: a new router on the same wire, whose
    watch hands it the rows its earlier incarnation left."""
    rows = net[name].router.directory_rows()
    fresh = Hub(name, net, HubConfig(resume_grace=5))
    net.hubs[name] = fresh
    fresh.router.directory(rows)
    return fresh


def test_an_agent_of_a_hub_restarted_without_its_store_resumes_there() -> None:
    net = Net("a", "b", resume_grace=5)
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker, ttl=60)["task_id"]
    net.run()
    _restarted_empty(net, "b")
    back, reply = _resume(net, "b", worker)  # its token, checked against b's old row
    assert reply["payload"]["resumed"] is True, reply
    assert net["b"].router.registry.get(worker.agent_id).epoch == 1
    net.sync()  # a sees the lease at epoch 1: the task goes to b again
    net.run()
    assert [f["payload"]["task_id"] for f in back.of_type("delegate")] == [task_id]
    net["b"].result(back, task_id, data="again")
    net.run()
    assert [(o["state"], o["data"]) for o in outcomes(asker)] == [("completed", "again")]


def test_an_agent_that_never_resumes_on_its_restarted_hub_is_forgotten() -> None:
    net = Net("a", "b", resume_grace=5)
    _asker, worker = _pair(net)
    _restarted_empty(net, "b")
    net.at(4.9)
    assert net.forgotten == []
    net.at(5)
    assert net.forgotten == [("b", worker.agent_id, "b")]  # its own old row
    _back, reply = _resume(net, "b", worker)
    assert reply["payload"]["resumed"] is False  # too late: a fresh identity


def test_a_requester_taken_over_hears_once_of_every_task_it_waits_for() -> None:
    """The requester's hub b dies. On a, the hub it resumes on, the stubs of its tasks
    are a's to decide now (a finished one's outcome included); a task a never heard of
    fails at once, with the reason."""
    net = Net("a", "b", "c")
    asker = net["b"].register("asker")
    near = net["a"].register("echoer", {"name": "echo"})
    far = net["c"].register("echoer", {"name": "echo"})
    net.sync()
    running = net["b"].delegate(asker, to=near.agent_id, ttl=30)["task_id"]
    done = net["b"].delegate(asker, to=near.agent_id, ttl=30)["task_id"]
    elsewhere = net["b"].delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    net.run()
    net["a"].result(near, done, data="early")
    net.drop()  # b is dead: the result goes nowhere
    for hub in ("a", "c"):
        net[hub].router.hub_presence("b", alive=False)
    back = FakePeer()
    net["a"].router.connected(back, protocol=2)
    resume = {"agent_id": asker.agent_id, "token": asker.token}
    resume["awaiting"] = [running, done, elsewhere]
    reply = net["a"].request(back, "register", {"name": "asker", "resume": resume})
    assert reply["payload"]["resumed"] is True, reply
    assert {o["task_id"]: o["state"] for o in outcomes(back)} == {
        done: "completed",
        elsewhere: "failed",
    }
    [lost] = [o for o in outcomes(back) if o["task_id"] == elsewhere]
    assert "previous hub" in lost["error"]
    assert owed(net) == {}  # nothing owed to b any more
    net["a"].result(near, running, data="late")
    assert [(o["task_id"], o["data"]) for o in outcomes(back)][-1] == (running, "late")
    assert len(outcomes(back)) == 3
    assert net.wire == []


def _journaled(net: Net, name: str) -> Hub:
    """Give hub `name` a journal, as a hub of a cluster has: its task rows are what its
    shell writes to the tasks bucket (`bucket`)."""
    hub = net[name]
    hub.router = Router(
        hub.router.config,
        clock=net.clock,
        wall=lambda: WALL0 + net.clock.now,
        journal=Journal(),
        cluster=Port(name, net),
    )
    return hub


def _stub_hub(net: Net) -> tuple[Hub, FakePeer, FakePeer]:
    """Hub c journaled (its rows are what its store and shell write), a requester on b
    and an echo agent on c, listed everywhere: c's tasks for that requester are stubs."""
    c = _journaled(net, "c")
    asker = net["b"].register("asker")
    far = c.register("echoer", {"name": "echo"})
    net.sync()
    return c, asker, far


def _asker_and_far(net: Net) -> tuple[Hub, FakePeer, FakePeer]:
    """Hub b (journaled: its task rows are what its shell writes to the tasks bucket),
    a requester on it, and an echo agent on c, listed everywhere."""
    b = _journaled(net, "b")
    asker = b.register("asker")
    far = net["c"].register("echoer", {"name": "echo"})
    net.sync()
    return b, asker, far


def bucket(hub: Hub, rows: dict[str, Any]) -> dict[str, Any]:
    """What hub's shell writes to the tasks bucket from the changes since the last
    call, applied to `rows` (a key -> the row, as another hub reads it back)."""
    changes = hub.router.take_changes()
    for row in changes.tasks:
        if row.owner is not None:
            continue
        key = task_key(row.requester, row.task_id)
        if row.owed:
            rows[key] = orjson.loads(task_value(row, hub.name, 0))
        else:
            rows.pop(key, None)
    return rows


def _take_over(hub: Hub, asker: FakePeer, rows: Any, awaiting: list[str]) -> tuple[FakePeer, Any]:
    """`asker` resumes on `hub` on a new connection, its shell having read `rows` of the
    tasks bucket for it first (`prefetch`): the connection and the reply."""
    back = FakePeer()
    hub.router.connected(back, protocol=2)
    hub.router.prefetch(asker.agent_id, rows)
    resume = {"agent_id": asker.agent_id, "token": asker.token, "awaiting": awaiting}
    return back, hub.request(back, "register", {"name": "asker", "resume": resume})


def test_a_requester_whose_hub_dies_keeps_its_tasks_on_the_hub_it_resumes_on() -> None:
    """b, the requester's hub, dies. The requester resumes on a, which adopts its tasks
    from the tasks bucket: the outcome b kept for it comes in the catch-up, and the
    tasks still running end on a, once each, as their agents' hubs follow the
    requester's lease."""
    net = Net("a", "b", "c")
    b = _journaled(net, "b")
    asker = b.register("asker")
    near = net["a"].register("echoer", {"name": "echo"})
    far = net["c"].register("echoer", {"name": "echo"})
    net.sync()
    on_a = b.delegate(asker, to=near.agent_id, ttl=30)["task_id"]
    on_c = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    done = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    net.run()
    b.router.disconnected(asker)  # its connection breaks: `done`'s outcome waits on b
    net["c"].result(far, done, data="kept")
    net.run()
    rows = bucket(b, {})
    assert sorted(rows) == sorted(task_key(asker.agent_id, t) for t in (on_a, on_c, done))
    net.drop()  # b is dead
    for hub in ("a", "c"):
        net[hub].router.hub_presence("b", alive=False)
    back, reply = _take_over(net["a"], asker, list(rows.values()), [on_a, on_c, done])
    assert reply["payload"]["resumed"] is True, reply
    assert [(o["task_id"], o["data"]) for o in outcomes(back)] == [(done, "kept")]
    net.sync()  # c sees the requester on a: its stub's result goes there
    net.run()
    net["c"].result(far, on_c, data="from c")
    net["a"].result(near, on_a, data="from a")
    net.run()
    heard = Counter(o["task_id"] for o in outcomes(back))
    assert heard == {on_a: 1, on_c: 1, done: 1}
    assert {o["task_id"]: o["data"] for o in outcomes(back)}[on_c] == "from c"
    assert owed(net) == {}
    assert net.wire == []


def test_a_requester_taken_over_keeps_the_ttl_of_its_adopted_tasks() -> None:
    net = Net("a", "b", "c")
    b, asker, far = _asker_and_far(net)
    task_id = b.delegate(asker, to=far.agent_id, ttl=10)["task_id"]
    net.run()
    rows = bucket(b, {})
    net.drop()
    net.at(4)  # b dies 4 s into the task's 10
    for hub in ("a", "c"):
        net[hub].router.hub_presence("b", alive=False)
    back, _ = _take_over(net["a"], asker, list(rows.values()), [task_id])
    net.sync()
    net.run()
    net.at(9.9)
    assert outcomes(back) == []
    net.at(10)  # the deadline b had set, on a's clock
    assert [(o["task_id"], o["state"]) for o in outcomes(back)] == [(task_id, "timeout")]
    net.run()
    assert net["c"].state(task_id) == "timeout"  # a's cancel reached the agent's hub


def test_a_requester_that_moves_while_its_hub_lives_is_decided_by_its_new_hub() -> None:
    """The requester's connection to b breaks and it resumes on a; b lives. b hands its
    tasks over: the one its own agent runs becomes a stub of a's, the others are
    forgotten there, and nothing is cancelled."""
    net = Net("a", "b", "c")
    b = _journaled(net, "b")
    asker = b.register("asker")
    local = b.register("echoer", {"name": "echo"})
    far = net["c"].register("echoer", {"name": "echo"})
    net.sync()
    on_b = b.delegate(asker, to=local.agent_id, ttl=30)["task_id"]
    on_c = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    net.run()
    rows = bucket(b, {})
    b.router.disconnected(asker)
    back, reply = _take_over(net["a"], asker, list(rows.values()), [on_b, on_c])
    assert reply["payload"]["resumed"] is True, reply
    net.sync()  # b sees its requester on a: it hands its tasks over
    assert b.router.tasks.get(on_b).owner == "a"
    assert b.router.tasks.get(on_c) is None
    net.run()
    assert local.of_type("cancel") == []
    assert far.of_type("cancel") == []
    b.result(local, on_b, data="from b")
    net["c"].result(far, on_c, data="from c")
    net.run()
    assert {o["task_id"]: o["data"] for o in outcomes(back)} == {on_b: "from b", on_c: "from c"}
    assert len(outcomes(back)) == 2
    assert owed(net) == {}


def _moved_while_its_hub_lives(
    net: Net, *, old: str = "b", new: str = "a", noticed: bool = True
) -> tuple[Hub, FakePeer, FakePeer, str, FakePeer]:
    """A requester on hub `old` (journaled here), a task of its on c's agent; its
    connection to `old` breaks (noticed there unless `noticed` is false) and it
    resumes on `new` (which read its row: the task in progress), and `old` lives on.
    Returns `old`, the requester, c's agent, the task and the connection to `new`."""
    hub = _journaled(net, old)
    asker = hub.register("asker")
    far = net["c"].register("echoer", {"name": "echo"})
    net.sync()
    task_id = hub.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    net.run()
    rows = bucket(hub, {})
    if noticed:
        hub.router.disconnected(asker)
    back, reply = _take_over(net[new], asker, list(rows.values()), [task_id])
    assert reply["payload"]["resumed"] is True, reply
    return hub, asker, far, task_id, back


def _asker_on_b_task_on_a(net: Net) -> tuple[Hub, FakePeer, FakePeer, str]:
    """A requester on b (journaled), an echo agent on a, and a task of the one to the
    other, running: b, the requester, the agent and the task."""
    b = _journaled(net, "b")
    asker = b.register("asker")
    near = net["a"].register("echoer", {"name": "echo"})
    task_id = b.delegate(asker, to=near.agent_id, ttl=30)["task_id"]
    net.run()
    return b, asker, near, task_id


@pytest.mark.parametrize("end", ["cancel", "timeout"])
def test_a_stub_the_new_holder_had_ends_as_the_old_holder_decided(end: str) -> None:
    """A requester on b delegates to a's agent; b ends the task (a cancel, or the TTL),
    and the requester moves to a before b's word of it reaches a. a held a stub of the
    task, which the take-over made a's own; the row a read says how the task ended,
    and that stands: the task ends so on a, a's agent is told to stop, and the
    requester hears that outcome alone. Before, the stub ran on at a, whose TTL timed
    it out: a requester that had cancelled heard `cancelled`, then `timeout`. (Found by
    `test_random_moves_of_a_requester_give_each_task_one_outcome`.)"""
    net = Net("a", "b")
    b, asker, near, task_id = _asker_on_b_task_on_a(net)
    if end == "cancel":
        b.send(asker, "cancel", {"task_id": task_id})
    else:
        net.at(30)
    rows = bucket(b, {})
    assert net.kinds() == ["cancel?"]  # b's word to a, still on its way
    expected = b.state(task_id)
    b.router.disconnected(asker)
    back, reply = _take_over(net["a"], asker, list(rows.values()), [task_id])
    assert reply["payload"]["resumed"] is True, reply
    assert net["a"].state(task_id) == expected
    assert [f["payload"]["task_id"] for f in near.of_type("cancel")] == [task_id]
    net.run()
    net.at(61)
    net.run()
    assert [(o["task_id"], o["state"]) for o in outcomes(back)] == [(task_id, expected)]


@pytest.mark.parametrize("answered", [True, False])
def test_a_requester_that_read_its_outcome_hears_no_other_from_the_agents_hub(
    answered: bool,
) -> None:
    """A requester on b delegates to a's agent and cancels; b tells it `cancelled`,
    and b's cancel is on its way to a when the requester, having read the outcome,
    moves to a (awaiting nothing). a's stub of the task (its agent's result owed to b
    if the agent had `answered` first, else the agent still at work) is a's own now.
    The cancel b decided stands: the task ends cancelled on a, and the requester hears
    no other outcome (the same one again, as b's row says it may not have been
    written). Before, a told the agent's `completed`, or timed the running stub out
    at the TTL. (Found by `test_random_moves_of_a_requester_give_each_task_one_outcome`.)"""
    net = Net("a", "b")
    b, asker, near, task_id = _asker_on_b_task_on_a(net)
    b.send(asker, "cancel", {"task_id": task_id})
    if answered:
        net["a"].result(near, task_id, data="done")
    rows = bucket(b, {})
    assert outcomes(asker)[-1]["state"] == "cancelled"
    b.router.disconnected(asker)
    back, reply = _take_over(net["a"], asker, list(rows.values()), [])
    assert reply["payload"]["resumed"] is True, reply
    assert net["a"].state(task_id) == "cancelled"
    if not answered:
        assert [f["payload"]["task_id"] for f in near.of_type("cancel")] == [task_id]
    net.run()
    net.at(61)
    net.run()
    assert {o["state"] for o in outcomes(back)} <= {"cancelled"}
    assert owed(net) == {}


def test_a_result_sent_to_the_old_hub_after_it_saw_the_move_goes_on_to_the_new_one() -> None:
    """b has seen the move and forgotten the task; c has not, and sends its agent's
    result to b. b answers `moved` and c sends it to a. Before, b answered that the
    task had finished (it did not know it), c gave the result up, and the requester
    heard `timeout` at the TTL for a task that had completed."""
    net = Net("a", "b", "c")
    b, _, far, task_id, back = _moved_while_its_hub_lives(net)
    b.router.directory(net["a"].router.directory_rows())  # b sees the move, c not yet
    assert b.router.tasks.get(task_id) is None
    net["c"].result(far, task_id, data="from c")
    net.run()
    assert [(o["task_id"], o["data"]) for o in outcomes(back)] == [(task_id, "from c")]
    net.sync()
    net.run()
    net.at(31)
    net.run()
    assert len(outcomes(back)) == 1
    assert owed(net) == {}


def test_a_result_the_old_hub_took_before_it_saw_the_move_reaches_the_new_one() -> None:
    """c's agent answers, and b decides the task, after a read the tasks bucket and
    before b saw the move: a adopted the task in progress. When b sees the move it
    sends its decision to a, which takes it from the hub it adopted the task from.
    Before, b dropped it (an outcome "a tells now") and the requester heard `timeout`."""
    net = Net("a", "b", "c")
    b, _, far, task_id, back = _moved_while_its_hub_lives(net)
    net["c"].result(far, task_id, data="from c")
    net.run()
    assert b.router.tasks.get(task_id).state.value == "completed"
    net.sync()  # b sees the move and hands over
    assert net.kinds() == ["result?"]  # sent on once (a review saw it go twice)
    net.run()
    assert [(o["task_id"], o["data"]) for o in outcomes(back)] == [(task_id, "from c")]
    net.at(31)
    net.run()
    assert len(outcomes(back)) == 1
    assert owed(net) == {}


def test_an_outcome_told_on_the_old_connection_after_the_new_hub_read_reaches_it() -> None:
    """b has not noticed the requester's connection broke: c's result, after a read
    the bucket, is told on that connection (as good as lost). When b sees the move it
    sends that outcome on too, and the requester hears it on a, once (found by a
    review: b counted it told, sent nothing, and a said `timeout` at the TTL)."""
    net = Net("a", "b", "c")
    b, asker, far, task_id, back = _moved_while_its_hub_lives(net, noticed=False)
    net["c"].result(far, task_id, data="from c")
    net.run()
    assert [o["task_id"] for o in outcomes(asker)] == [task_id]  # the old connection
    net.sync()  # b sees the move and closes the old connection
    b.router.disconnected(asker, [task_id])  # its shell: never written
    net.run()
    net.at(31)
    net.run()
    assert [(o["state"], o["data"]) for o in outcomes(back)] == [("completed", "from c")]
    assert owed(net) == {}


def test_a_task_that_moves_away_and_back_is_not_bounced_between_its_hubs() -> None:
    """The requester moves b -> a -> b while its task waits in c's queue: both b and a
    handed it over once. When c's agent takes it, its `delivered` goes to b, which
    decides the task again, not on to a and back (found by a review: 100 requests and
    counting, until a second past the deadline)."""
    net = Net("a", "b", "c")
    a = _journaled(net, "a")
    b = _journaled(net, "b")
    asker = b.register("asker")
    far = net["c"].register("echoer", {"name": "echo", "max_concurrency": 1})
    local = net["c"].register("local")
    net.sync()
    busy = net["c"].delegate(local, to=far.agent_id, ttl=30)["task_id"]
    task_id = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    net.run()
    assert net["c"].state(task_id) == "pending"
    rows = bucket(b, {})
    b.router.disconnected(asker)
    back, _ = _take_over(a, asker, list(rows.values()), [task_id])
    net.sync()
    net.run()
    rows = bucket(a, bucket(b, rows))
    a.router.disconnected(back)
    again, reply = _take_over(b, asker, list(rows.values()), [task_id])
    assert reply["payload"]["resumed"] is True, reply
    net.sync()
    net.run()
    net["c"].result(far, busy, data="x")  # the agent frees up: the waiting task goes
    delivered = 0
    for _ in range(50):
        if not net.wire:
            break
        delivered += net.deliver().kind == "delivered"
    assert not net.wire
    assert delivered <= 2  # the request and its answer
    net["c"].result(far, task_id, data="from c")
    net.run()
    assert [(o["task_id"], o["data"]) for o in outcomes(again)] == [(task_id, "from c")]


def test_a_told_outcome_sent_on_to_the_hub_that_handed_the_task_over_is_answered() -> None:
    """R moves a -> b (a hands its task over), b tells R the outcome and deletes the row,
    and R moves back to a at once. b sends the recently told outcome on to a, which
    knows nothing of the task now: it answers, and b stops (found by a review: a said
    `moved` back to b, which re-sent it with a warning each time for `resume_grace`)."""
    net = Net("a", "b", "c")
    b = _journaled(net, "b")
    a, asker, far, task_id, on_b = _moved_while_its_hub_lives(net, old="a", new="b")
    net.sync()  # a hands the task over
    net.run()
    net["c"].result(far, task_id, data="from c")
    net.run()
    assert [o["task_id"] for o in outcomes(on_b)] == [task_id]
    b.router.delivered([task_id])
    rows = bucket(b, bucket(a, {}))  # b's delete: the bucket holds no row of it
    b.router.disconnected(on_b)
    back, reply = _take_over(a, asker, list(rows.values()), [])
    assert reply["payload"]["resumed"] is True, reply
    net.sync()  # b hands over, and sends on the outcome it told 0 s ago
    net.run()
    assert owed(net) == {}
    assert outcomes(back) == []  # R had it, and does not wait for it


@pytest.mark.parametrize("agent_on", ["c", "b"], ids=["decided on b", "b's stub"])
def test_an_outcome_sent_on_whose_answer_is_lost_is_not_told_again_on_a_move_back(
    agent_on: str,
) -> None:
    """R moves b -> a. b decided the task before it saw the move (c's result), or its
    own agent ran it (a stub of a's now): either way b sends the outcome on to a, which
    tells R and deletes the row, and a's answer is lost. R moves back to b at once,
    waiting for nothing: b still owes the outcome, and must not tell it again (it did
    until the take-over judged such a task by its row and by `awaiting`)."""
    net = Net("a", "b", "c")
    a = _journaled(net, "a")
    b = _journaled(net, "b")
    asker = b.register("asker")
    worker = net[agent_on].register("echoer", {"name": "echo"})
    net.sync()
    task_id = b.delegate(asker, to=worker.agent_id, ttl=30)["task_id"]
    net.run()
    rows = bucket(b, {})
    b.router.disconnected(asker)
    back, _ = _take_over(a, asker, list(rows.values()), [task_id])
    if agent_on == "b":
        net.sync()  # b hands over first: its agent's task is a stub of a's
        net.run()
    net[agent_on].result(worker, task_id, data="done")
    if agent_on == "c":
        net.run()  # b takes c's result: it has not seen the move
        net.sync()  # now it does, and sends its decision on to a
    assert net.kinds() == ["result?"]
    net.deliver()  # a tells R; its answer is lost
    assert [o["task_id"] for o in outcomes(back)] == [task_id]
    assert net.drop(answers=True) != []
    a.router.delivered([task_id])
    rows = bucket(a, rows)
    a.router.disconnected(back)
    again, reply = _take_over(b, asker, list(rows.values()), [])
    assert reply["payload"]["resumed"] is True, reply
    net.sync()
    net.run()
    net.at(31)
    net.run()
    assert outcomes(again) == []
    assert owed(net) == {}


def test_a_take_over_asks_the_old_hub_for_release_until_it_has_seen_the_move() -> None:
    """a took the requester over from b (live): a's rows of its tasks wait (`fenced`)
    until b says it writes none any more, which it says once its directory shows the
    move (docs/cluster.md, Identity). Before, b answers `released: false` and a asks
    again after 100 ms."""
    net = Net("a", "b", "c")
    _, asker, _, _, _ = _moved_while_its_hub_lives(net)
    a = net["a"].router
    assert list(a.fenced) == [asker.agent_id]
    assert net.kinds().count("release?") == 1
    net.run()  # b still holds the requester: not yet
    assert list(a.fenced) == [asker.agent_id]
    net.sync()  # b sees the move
    net.at(RETRY_FIRST)
    assert net.kinds().count("release?") == 1
    net.run()
    assert list(a.fenced) == []
    assert owed(net) == {}


def test_a_take_over_from_a_hub_that_never_answers_release_waits_a_second_at_most() -> None:
    net = Net("a", "b", "c")
    _moved_while_its_hub_lives(net)
    a = net["a"].router
    a.journal = Journal()
    woken: list[float] = []
    a.journal.wake = lambda: woken.append(net.clock.now)
    for t in (0.1, 0.3, 0.7):  # asked again, doubling; every one lost
        net.drop("release")
        net.at(t)
        assert a.fenced
    net.drop("release")
    net.at(RELEASE_WAIT)
    assert list(a.fenced) == []
    assert woken == [RELEASE_WAIT]  # a commit, for the rows held back
    net.sync()
    net.run()  # (a re-sends its adopted task to c)
    assert owed(net) == {}


def test_a_take_over_from_a_dead_hub_or_of_an_agent_with_no_tasks_holds_nothing_back() -> None:
    net = Net("a", "b", "c")
    b = _journaled(net, "b")
    asker = b.register("asker")
    idle = b.register("idle")
    far = net["c"].register("echoer", {"name": "echo"})
    net.sync()
    task_id = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    net.run()
    rows = bucket(b, {})
    _take_over(net["a"], idle, [], [])  # no task of its: nothing to hold back
    assert list(net["a"].router.fenced) == []
    net.drop()
    net["a"].router.hub_presence("b", alive=False)
    _take_over(net["a"], asker, list(rows.values()), [task_id])  # b is dead
    assert list(net["a"].router.fenced) == []
    assert "release?" not in net.kinds()


@pytest.mark.parametrize(
    "body",
    [{}, {"requester": 7, "epoch": 1}, {"requester": "agt_x", "epoch": "1"}],
    ids=["empty", "requester not a string", "epoch not an int"],
)
def test_a_bad_release_is_answered_with_an_error(body: dict[str, Any]) -> None:
    net = Net("a", "b")
    message = Message(src="a", dest="b", kind="release", body=orjson.dumps(body))
    net["b"].router.cluster_receive("a", "release", body, Answer(net, message))
    [answer] = net.wire
    assert "error" in orjson.loads(answer.answer)


def test_release_is_refused_while_this_hub_holds_the_requester_at_that_epoch() -> None:
    """A hub's word on another's lease is not taken: b still holds the requester at
    epoch 0, and the directory has not shown it moving, so whatever the epoch a
    `release` names, b answers that it is not released (and acts on nothing)."""
    net = Net("a", "b")
    asker = net["b"].register("asker")
    for epoch, released in ((0, True), (1, False), (5, False)):
        body = {"requester": asker.agent_id, "epoch": epoch}
        message = Message(src="a", dest="b", kind="release", body=orjson.dumps(body))
        net["b"].router.cluster_receive("a", "release", body, Answer(net, message))
        [answer] = net.drop(answers=True)
        assert orjson.loads(answer.answer) == {"released": released}
    assert asker.closes == []


def test_only_the_hub_a_task_was_adopted_from_may_report_it_besides_its_agents_holder() -> None:
    """The bad cases beside them: a result for an adopted task from a third hub (not
    the assignee's holder, not the hub the row came from) is refused, and a `moved`
    answer from a hub the message was not sent to changes nothing."""
    net = Net("a", "b", "c", "d")
    _, _, far, task_id, back = _moved_while_its_hub_lives(net)
    net.sync()
    net.run()
    body = {"task_id": task_id, "assignee": far.agent_id, "epoch": 0, "success": True,
            "data": "forged", "error": None}  # fmt: skip
    reply = Answer(net, Message(src="d", dest="a", kind="result", body=orjson.dumps(body)))
    net["a"].router.cluster_receive("d", "result", body, reply)
    net.run()
    assert outcomes(back) == []
    assert net["a"].state(task_id) == "in_progress"
    net["c"].result(far, task_id, data="from c")
    [sent] = [m for m in net.wire if m.kind == "result" and m.answer is None]
    assert sent.dest == "a"
    net["c"].router.cluster_reply("d", "result", orjson.loads(sent.body), {"moved": "d"})
    assert net["c"].remote.owed[f"result:{task_id}"].hub == "a"
    net.run()
    assert [(o["task_id"], o["data"]) for o in outcomes(back)] == [(task_id, "from c")]


def test_a_bad_task_row_is_skipped_and_the_others_are_adopted() -> None:
    net = Net("a", "b", "c")
    b, asker, far = _asker_and_far(net)
    task_id = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    net.run()
    rows = list(bucket(b, {}).values())
    bad = [{**rows[0], "row": ["nonsense"]}, {**rows[0], "deadline": None}, {"row": 7}]
    net.drop()
    for hub in ("a", "c"):
        net[hub].router.hub_presence("b", alive=False)
    back, _ = _take_over(net["a"], asker, [*bad, *rows], [task_id])
    assert outcomes(back) == []  # adopted (once), not failed
    assert net["a"].state(task_id) == "in_progress"
    net.sync()
    net.run()
    net["c"].result(far, task_id, data="ok")
    net.run()
    assert [(o["task_id"], o["state"]) for o in outcomes(back)] == [(task_id, "completed")]


def test_the_assignee_hub_never_writes_nor_deletes_the_owners_row() -> None:
    """b owns the task; c runs it (a stub). b cancels it: c must not touch R.T."""
    net = Net("b", "c")
    c, asker, far = _stub_hub(net)
    task_id = net["b"].delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    net.run()
    shell = TaskRows("c")
    shell._batch(c.router, c.router.take_changes())  # the stub: nothing of c's
    net["b"].request(asker, "cancel", {"task_id": task_id})
    net.run()
    key = task_key(asker.agent_id, task_id)
    first = shell._batch(c.router, c.router.take_changes())
    c.router.delivered(["cancel:" + task_id])  # the cancel frame written to the agent
    second = shell._batch(c.router, c.router.take_changes())
    assert key not in first, "c, the assignee's hub, wrote the owner's row"
    assert key not in second, "c deleted the owner's row"


def test_an_adopted_queued_task_goes_to_an_agent_with_room() -> None:
    """far (max 1) runs other's task from b; asker's task waits in b's queue. asker
    resumes on a (b lives). far frees at t=1; asker's adopted task still waits on a
    until its TTL."""
    net = Net("a", "b", "c")
    b = _journaled(net, "b")
    asker = b.register("asker")
    other = b.register("other")
    far = net["c"].register("echoer", {"name": "echo", "max_concurrency": 1})
    net.sync()
    busy = b.delegate(other, ttl=30)["task_id"]
    waiting = b.delegate(asker, ttl=30)["task_id"]
    net.run()
    assert b.router.tasks.get(waiting).queue is not None
    rows = bucket(b, {})
    b.router.disconnected(asker)
    _take_over(net["a"], asker, list(rows.values()), [waiting])
    for hub in ("b", "c"):  # only the row that changed (the requester's), as the watch does
        net[hub].router.directory(net["a"].router.directory_rows())
    net.run()
    net.at(1)
    net["c"].result(far, busy, data="done")
    net.run()
    net.at(29)
    net.run()
    rec = net["a"].router.tasks.get(waiting)
    assert rec.queue is None, "adopted queued task never dispatched though far is idle"


def test_a_requester_that_moves_back_hears_a_finished_task_once() -> None:
    net = Net("a", "b", "c")
    b, asker, far = _asker_and_far(net)
    done = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    net.run()
    b.router.disconnected(asker)  # its outcome will wait on b
    net["c"].result(far, done, data="kept")
    net.run()
    rows = bucket(b, {})
    back, _ = _take_over(net["a"], asker, list(rows.values()), [done])
    assert [o["task_id"] for o in outcomes(back)] == [done]  # once, from a
    net["a"].router.delivered([done])
    net.sync()  # b hands over
    net.run()
    net["a"].router.disconnected(back)
    again, reply = _take_over(b, asker, [], [])  # it moves back to b, awaiting nothing
    assert reply["payload"]["resumed"] is True
    assert outcomes(again) == [], "the same outcome a second time, from the old holder"


def test_rows_read_for_a_refused_register_are_not_adopted_later() -> None:
    net = Net("a", "b", "c")
    b, asker, far = _asker_and_far(net)
    task_id = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    net.run()
    stale = list(bucket(b, {}).values())
    # a resume frame the router refuses (a blank name) after the shell prefetched
    probe = FakePeer()
    net["a"].router.connected(probe, protocol=2)
    net["a"].router.prefetch(asker.agent_id, stale)
    bad = {"agent_id": asker.agent_id, "token": "wrong", "awaiting": []}
    assert net["a"].request(probe, "register", {"name": " ", "resume": bad})["type"] == "error"
    net["c"].result(far, task_id, data="ok")
    net.run()
    assert [o["task_id"] for o in outcomes(asker)] == [task_id]  # heard once, on b
    b.router.delivered([task_id])
    b.router.disconnected(asker)
    # the real resume: the bucket read times out, so the shell prefetches nothing
    back = FakePeer()
    net["a"].router.connected(back, protocol=2)
    resume = {"agent_id": asker.agent_id, "token": asker.token, "awaiting": []}
    net["a"].request(back, "register", {"name": "asker", "resume": resume})
    net.sync()
    net.run()
    net.at(31)
    net.run()
    assert outcomes(back) == [], "a task finished and heard on b is decided again on a"


def test_stubs_taken_over_are_stored_as_this_hubs_own() -> None:
    """The requester's hub b dies; the requester resumes on c, where its task runs as a
    stub. c decides it now, but its store/bucket row still says the owner is b."""
    net = Net("b", "c")
    c, asker, far = _stub_hub(net)
    task_id = net["b"].delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    net.run()
    c.router.take_changes()
    net.drop()
    c.router.hub_presence("b", alive=False)
    _take_over(c, asker, [], [task_id])
    assert c.router.tasks.get(task_id).owner is None
    rows = [r for r in c.router.take_changes().tasks if r.task_id == task_id]
    assert rows, "the take-over is not stored"
    assert rows[0].owner is None, "store and bucket still say b owns it"


def test_an_outcome_told_on_a_connection_that_broke_is_told_again_after_a_take_over() -> None:
    """The bucket still has a finished row that says `notified` (its delete had not
    landed when b died): the requester says it waits for that task, so it hears the
    outcome again, not a failure for want of a record."""
    net = Net("a", "b", "c")
    b, asker, far = _asker_and_far(net)
    task_id = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    net.run()
    net["c"].result(far, task_id, data="told")
    net.run()
    rows = bucket(b, {})  # completed; told but not yet written whole: the row says so
    [row] = rows.values()
    row["row"][-1] = True  # as the row reads once the outcome was written whole
    net.drop()
    for hub in ("a", "c"):
        net[hub].router.hub_presence("b", alive=False)
    back, _ = _take_over(net["a"], asker, [row], [task_id])
    assert [(o["task_id"], o["state"], o["data"]) for o in outcomes(back)] == [
        (task_id, "completed", "told")
    ]


def test_a_take_over_whose_tasks_could_not_be_read_is_refused_and_keeps_the_id() -> None:
    """The shell could not read the requester's rows (`prefetch(..., None)`): the
    resume is refused with `store_unavailable`, so the client keeps its ID and tries
    again, rather than lose its tasks to a fresh identity or a take-over without them."""
    net = Net("a", "b", "c")
    b = _journaled(net, "b")
    asker = b.register("asker")
    b.router.disconnected(asker)
    back = FakePeer()
    net["a"].router.connected(back, protocol=2)
    net["a"].router.prefetch(asker.agent_id, None)
    resume = {"agent_id": asker.agent_id, "token": asker.token, "awaiting": []}
    reply = net["a"].request(back, "register", {"name": "asker", "resume": resume})
    assert reply["type"] == "error", reply
    assert reply["payload"]["code"] == "store_unavailable"
    assert "could not read the tasks" in reply["payload"]["message"]
    assert net["a"].router.registry.get(asker.agent_id).hub == "b"  # not taken
    net["a"].router.prefetch(asker.agent_id, [])  # read this time
    reply = net["a"].request(back, "register", {"name": "asker", "resume": resume})
    assert reply["payload"]["resumed"] is True, reply


def test_a_take_over_is_read_for_only_with_the_agents_token() -> None:
    net = Net("a", "b")
    asker = net["b"].register("asker")
    assert net["a"].router.takes_over(asker.agent_id, asker.token)
    assert not net["a"].router.takes_over(asker.agent_id, "not-the-token")
    assert not net["a"].router.takes_over("agt_unknown", asker.token)
    assert not net["b"].router.takes_over(asker.agent_id, asker.token)  # its own already


def test_a_dead_hubs_agents_are_forgotten_after_the_resume_grace() -> None:
    net = Net("a", "b", "c", resume_grace=5)
    asker, worker = _pair(net)
    net["a"].delegate(asker, ttl=60)
    net.run()
    for hub in ("a", "c"):
        net[hub].router.hub_presence("b", alive=False)
    net.at(4.9)
    assert net.forgotten == []
    net.at(5)
    assert sorted(net.forgotten) == [("a", worker.agent_id, "b"), ("c", worker.agent_id, "b")]
    for hub in ("a", "c"):  # the delete, as the watch hands it to every hub
        net[hub].router.directory((), gone=[worker.agent_id])
    assert [(o["state"], o["error"]) for o in outcomes(asker)] == [
        ("failed", f"agent {worker.agent_id} (hub b) left the cluster")
    ]


@pytest.mark.parametrize("back", ["heard again", "cut off"])
def test_the_janitor_leaves_a_hub_that_is_back_or_that_it_cannot_judge(back: str) -> None:
    net = Net("a", "b", resume_grace=5)
    _pair(net)
    net["a"].router.hub_presence("b", alive=False)
    if back == "heard again":
        net.at(3)
        net["a"].router.hub_presence("b", alive=True)
        net.at(4)
        net["a"].router.hub_presence("b", alive=False)  # silent again: 5 s from now
        net.at(8)
        assert net.forgotten == []
        net.at(9)
        assert len(net.forgotten) == 1
    else:
        net["a"].router.link(False)
        net.at(10)
        assert net.forgotten == []


def test_a_stub_is_cancelled_by_its_owner_only() -> None:
    net = Net("a", "b")
    asker, _worker = _pair(net)
    task_id = net["a"].delegate(asker)["task_id"]
    net.run()
    admin = FakePeer()
    net["b"].router.connected(admin, admin=True)
    net["b"].request(admin, "register", {"name": "operator"})
    reply = net["b"].request(admin, "cancel", {"task_id": task_id, "reason": "op"})
    assert reply["payload"]["code"] == "forbidden", reply
    assert "owned by hub a" in reply["payload"]["message"]
    net.run()
    assert outcomes(asker) == []
    assert net["a"].state(task_id) == "in_progress"


# --- losses, re-sends, duplicates ---------------------------------------------------------


def test_a_lost_task_is_sent_again_after_100ms_then_doubling() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    net["a"].delegate(asker, ttl=10)
    sent = [0.0] if net.drop("task") else []
    while net["a"].router.next_deadline() < 9:
        net.at(net["a"].router.next_deadline())
        if net.drop("task"):
            sent.append(net.clock.now)
    assert sent == pytest.approx([0.0, 0.1, 0.3, 0.7, 1.5, 3.1, 5.1, 7.1])
    net.at(net["a"].router.next_deadline())
    assert net.clock.now == pytest.approx(9.1)
    net.run()
    (assignment,) = worker.of_type("delegate")
    assert assignment["payload"]["ttl"] == pytest.approx(0.9)  # the time left
    net.at(10)
    net.run()
    assert [c["payload"]["reason"] for c in worker.of_type("cancel")] == ["timeout"]
    net.at(20)
    assert net.wire == []
    assert owed(net) == {}


def test_a_lost_answer_gets_the_same_answer_and_no_second_delivery() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker)["task_id"]
    net.deliver()
    assert net.drop("task", answers=True)
    net.at(0.1)
    net.run()
    assert len(worker.of_type("delegate")) == 1
    assert net["a"].state(task_id) == "in_progress"
    net["b"].result(worker, task_id)
    net.drop("result")  # the result is lost
    net.at(0.2)
    assert net.kinds() == ["result?"]  # re-sent 100 ms later
    net.deliver()
    net.drop("result", answers=True)  # and its answer lost
    net.at(0.4)
    net.run()
    assert [o["state"] for o in outcomes(asker)] == ["completed"]
    assert owed(net) == {}


def test_duplicates_of_every_message_change_nothing() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker)["task_id"]
    net.run(copies=3)
    net.at(0.1)  # a re-send that crosses the answer changes nothing either
    net.run(copies=3)
    net["b"].result(worker, task_id)
    net.wire = net.wire * 2
    net.run(copies=3)
    assert len(worker.of_type("delegate")) == 1
    assert [o["state"] for o in outcomes(asker)] == ["completed"]
    assert owed(net) == {}


def test_a_result_is_re_sent_until_the_owner_is_back() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker, ttl=60)["task_id"]
    net.run()
    net["b"].router.link(False)
    net["b"].result(worker, task_id)
    net.at(5)
    assert net.wire == []
    net["b"].router.link(True)  # at once, not at the next back-off
    assert net.kinds() == ["result?"]
    net.run()
    assert [o["state"] for o in outcomes(asker)] == ["completed"]
    assert owed(net) == {}


def test_a_task_waits_while_the_remote_hub_is_silent_and_goes_when_it_is_back() -> None:
    net = Net("a", "b")
    asker, _ = _pair(net)
    net["a"].router.hub_presence("b", alive=False)
    task_id = net["a"].delegate(asker, ttl=30)["task_id"]  # the only capable agent
    net.drop("task")
    net.at(1.0)
    net.drop("task")
    net["a"].router.hub_presence("b", alive=True)  # sent again at once
    assert net.kinds() == ["task?"]
    net.run()
    assert net["a"].state(task_id) == "in_progress"


# --- a remote agent leaving ---------------------------------------------------------------


def test_a_remote_agent_gone_for_good_fails_its_tasks() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    net["a"].delegate(asker)
    net.run()
    net["b"].send(worker, "deregister")
    net.sync()
    assert [(o["state"], o["error"]) for o in outcomes(asker)] == [
        ("failed", f"agent {worker.agent_id} (hub b) left the cluster")
    ]
    net.run()  # b's own failure of the stub reaches a too late: one outcome
    assert len(outcomes(asker)) == 1
    assert owed(net) == {}


def test_a_requester_gone_for_good_cancels_its_stubs() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker)["task_id"]
    net.run()
    net["a"].send(asker, "deregister")
    net.sync()  # b hears of it from the directory first
    assert [c["payload"]["task_id"] for c in worker.of_type("cancel")] == [task_id]
    assert net["b"].state(task_id) == "cancelled"
    net.run()  # a's own cancel arrives, and is answered
    assert len(worker.of_type("cancel")) == 1
    assert owed(net) == {}


def test_the_assignee_dropped_on_its_own_hub_fails_the_task_at_the_owner() -> None:
    net = Net("a", "b", resume_grace=5)
    asker, worker = _pair(net)
    net["a"].delegate(asker, ttl=60)
    net.run()
    net["b"].router.disconnected(worker)
    net.at(5)  # its grace is over on b: b fails the stub and tells a
    net.run()
    assert [o["state"] for o in outcomes(asker)] == ["failed"]
    assert "did not resume" in outcomes(asker)[0]["error"]
    net.sync()
    assert len(outcomes(asker)) == 1


def test_the_assignee_resuming_on_its_hub_gets_its_stub_again() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net)
    task_id = net["a"].delegate(asker)["task_id"]
    net["b"].router.disconnected(worker)
    net.run()
    assert net["a"].state(task_id) == "pending"  # b holds it for its resuming agent
    back = FakePeer()
    net["b"].router.connected(back)
    payload = {
        "name": "echoer",
        "capabilities": [{"name": "echo"}],
        "resume": {"agent_id": worker.agent_id, "token": worker.token},
    }
    net["b"].request(back, "register", payload)
    assert [f["payload"]["task_id"] for f in back.of_type("delegate")] == [task_id]
    assert net.kinds() == ["delivered?"]
    net.run()
    assert net["a"].state(task_id) == "in_progress"
    net["b"].result(back, task_id)
    net.run()
    assert [o["state"] for o in outcomes(asker)] == ["completed"]


def test_a_broadcast_reaches_every_agent_on_every_hub_once() -> None:
    net = Net("a", "b", "c")
    sender = net["a"].register("sender")
    near = net["a"].register("near")
    far = [net["b"].register("far-b"), net["c"].register("far-c")]
    hidden = net["c"].register("tool", hidden=True)
    net.sync()
    reply = net["a"].request(sender, "broadcast", {"message": "hello", "data": {"k": 1}})
    # near, here; far-b and far-c, there (counted from the directory, not confirmed)
    assert reply["payload"] == {"recipients": 3}
    assert net.kinds() == ["broadcast?"]  # one message, for every hub
    net.run()
    for peer in (near, *far):
        [got] = peer.of_type("broadcast")
        assert (got["from"], got["payload"]) == (
            sender.agent_id,
            {"message": "hello", "data": {"k": 1}},
        )
    assert sender.of_type("broadcast") == [reply]  # its reply, not a copy
    assert hidden.of_type("broadcast") == []
    assert net.wire == []  # unanswered


def test_a_broadcast_for_an_agent_the_sending_hub_does_not_hold_is_dropped() -> None:
    net = Net("a", "b")
    sender = net["a"].register("sender")
    far = net["b"].register("far")
    net.sync()
    for body in (
        {"sender": sender.agent_id, "epoch": 1, "message": "x"},  # a stale epoch
        {"sender": far.agent_id, "epoch": 0, "message": "x"},  # b's own agent, via a
        {"sender": sender.agent_id, "epoch": 0, "message": 5},  # not a broadcast
    ):
        reply = Answer(net, Message(src="a", dest="b", kind="broadcast", body=b"{}"))
        net["b"].router.cluster_receive("a", "broadcast", body, reply)
    assert far.of_type("broadcast") == []
    assert net.wire == []  # and never answered


def test_a_broadcast_while_cut_off_reaches_this_hubs_agents_only() -> None:
    net = Net("a", "b")
    sender = net["a"].register("sender")
    near = net["a"].register("near")
    net["b"].register("far")
    net.sync()
    net["a"].router.link(False)
    reply = net["a"].request(sender, "broadcast", {"message": "hello"})
    assert reply["payload"] == {"recipients": 1}
    assert len(near.of_type("broadcast")) == 1
    assert net.wire == []


def test_the_load_an_agents_hub_reports_counts_in_selection_only() -> None:
    net = Net("a", "b")
    asker = net["a"].register("asker")
    near = net["a"].register("near", {"name": "echo"})
    far = net["b"].register("far", {"name": "echo"}, max_concurrency=2)
    net.sync()

    def assignee() -> str:
        task_id = net["a"].delegate(asker, ttl=60)["task_id"]
        net.run()
        return str(net["a"].router.tasks.get(task_id).assignee)

    assert assignee() == near.agent_id  # equal load (0): the local agent
    net["a"].router.remote_load("b", {far.agent_id: 3})  # b's own requesters' tasks
    assert assignee() == near.agent_id  # 1 against 3
    assert net["b"].router.local_load() == {far.agent_id: 0}
    net["a"].router.remote_load("b", {far.agent_id: 0})
    assert assignee() == far.agent_id  # 2 against 0: across
    net["a"].router.remote_load("b", {far.agent_id: 50})  # not a limit: far has room
    net["a"].router.remote_load("b", {near.agent_id: 0})  # a's own: not b's to say
    assert net["a"].router.registry.get(far.agent_id).has_room("echo")
    assert net["a"].router.registry.get(near.agent_id).elsewhere == 0
    for bad in ([1], {far.agent_id: -1}, {far.agent_id: "3"}, {far.agent_id: True}, None):
        net["a"].router.remote_load("b", bad)  # skipped
    assert net["a"].router.registry.get(far.agent_id).elsewhere == 49  # 50, less a's one


# --- concurrency limits across hubs -------------------------------------------------------


def test_the_owner_queues_by_the_room_it_knows() -> None:
    net = Net("a", "b")
    asker, worker = _pair(net, max_concurrency=1)
    first = net["a"].delegate(asker)
    second = net["a"].delegate(asker)
    assert second["state"] == "pending"
    assert second["agent_id"] == ""  # it waits on a
    assert net.kinds() == ["task?"]
    net.run()
    net["b"].result(worker, first["task_id"])
    net.run()  # a frees the slot it counted, and sends the next
    assert [f["payload"]["task_id"] for f in worker.of_type("delegate")] == [
        first["task_id"],
        second["task_id"],
    ]
    assert net["a"].state(second["task_id"]) == "in_progress"


def test_a_task_that_reaches_a_full_agent_waits_in_its_hubs_queue() -> None:
    net = Net("a", "b", "c")
    asker_a = net["a"].register("asker-a")
    asker_c = net["c"].register("asker-c")
    worker = net["b"].register("echoer", {"name": "echo"}, max_concurrency=1)
    one = net["a"].delegate(asker_a)["task_id"]
    net.run()
    two = net["c"].delegate(asker_c, priority=5)["task_id"]
    net.run()
    three = net["b"].delegate(net["b"].register("asker-b"), priority=1)
    assert [f["payload"]["task_id"] for f in worker.of_type("delegate")] == [one]
    assert three["state"] == "pending"
    # c's task reached the full agent: answered pending, it waits on b
    assert net["c"].state(two) == "pending"
    assert net["b"].router.queue.position(two) == 1  # priority 5 before b's own 1
    net["b"].result(worker, one)
    assert [f["payload"]["task_id"] for f in worker.of_type("delegate")][-1] == two
    assert net.kinds() == ["result?", "delivered?"]
    net.run()
    assert net["c"].state(two) == "in_progress"
    assert asker_c.of_type("status")[-1]["payload"]["state"] == "in_progress"
    agent = net["b"].router.registry.get(worker.agent_id)
    assert agent is not None
    assert agent.in_flight == 1
    net["b"].result(worker, two)
    net.run()
    assert [o["state"] for o in outcomes(asker_c)] == ["completed"]
    assert [f["payload"]["task_id"] for f in worker.of_type("delegate")][-1] == three["task_id"]


def test_a_waiting_stub_times_out_with_its_owner() -> None:
    net = Net("a", "b", "c")
    asker = net["a"].register("asker")
    worker = net["b"].register("echoer", {"name": "echo"}, max_concurrency=1)
    busy = net["c"].register("other")
    net["c"].delegate(busy, ttl=60)
    net.run()
    task_id = net["a"].delegate(asker, ttl=2)["task_id"]
    net.run()
    assert net["b"].router.queue.position(task_id) == 1
    net.at(2)
    net.run()
    assert [o["state"] for o in outcomes(asker)] == ["timeout"]
    assert task_id not in net["b"].router.queue
    assert net["b"].state(task_id) == "timeout"  # on its owner's word, "timeout"
    assert len(worker.of_type("delegate")) == 1  # it never reached the agent
    assert owed(net) == {}


def test_a_full_hub_queue_refuses_and_the_owner_fails_the_task() -> None:
    net = Net("a", "b", max_queued=1)
    asker = net["a"].register("asker")
    worker = net["b"].register("echoer", {"name": "echo"}, max_concurrency=1)
    local = net["b"].register("local")
    net["b"].delegate(local)
    net["b"].delegate(local)  # the one queue slot on b
    task_id = net["a"].delegate(asker, to=worker.agent_id, ttl=30)["task_id"]
    # a counts no task on the agent: it sends; b is full and refuses
    net.run()
    (outcome,) = outcomes(asker)
    assert outcome["state"] == "failed"
    assert "maximum of 1 waiting tasks" in outcome["error"]
    assert task_id not in net["b"].router.tasks


# --- random schedules -----------------------------------------------------------------------

# Weighted by repetition: messages move more often than they are lost, and agents answer.
ACTIONS = (
    *["delegate"] * 3,
    *["deliver"] * 5,
    "drop",
    "duplicate",
    *["answer"] * 4,
    "cancel",
    *["wait"] * 2,
    "silence",
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_schedules_give_each_task_exactly_one_outcome(data: st.DataObject) -> None:
    """Delegations across three hubs under drops, duplicates, reordering, cancels, TTLs
    and hubs going silent: every task delegated ends, and its requester hears its end
    exactly once; no agent ever runs more tasks than its limit."""
    net = Net("a", "b", "c", max_queued=50)
    askers = {name: net[name].register(f"asker-{name}") for name in "abc"}
    limits = {"a": None, "b": 1, "c": 2}
    workers = {}
    for name, limit in limits.items():
        extra = {} if limit is None else {"max_concurrency": limit}
        workers[name] = net[name].register(f"w-{name}", {"name": "echo"}, **extra)
    tasks: dict[str, str] = {}  # task ID -> the requester's hub
    answered: set[str] = set()

    def check_limits() -> None:
        for name, limit in limits.items():
            agent = net[name].router.registry.get(workers[name].agent_id)
            assert agent is not None
            if limit is not None:
                assert agent.in_flight <= limit

    for _ in range(data.draw(st.integers(5, 60), label="steps")):
        action = data.draw(st.sampled_from(ACTIONS))
        if action == "delegate":
            here = data.draw(st.sampled_from("abc"))
            payload = {"capability": "echo", "ttl": data.draw(st.sampled_from([1.0, 5.0, 30.0]))}
            envelope = {}
            if data.draw(st.booleans()):
                envelope["to"] = workers[data.draw(st.sampled_from("abc"))].agent_id
            reply = net[here].request(askers[here], "delegate", payload, **envelope)
            if reply["type"] == "delegate":
                tasks[reply["payload"]["task_id"]] = here
        elif action in ("deliver", "drop", "duplicate") and net.wire:
            i = data.draw(st.integers(0, len(net.wire) - 1))
            if action == "deliver":
                net.deliver(i)
            elif action == "drop":
                net.wire.pop(i)
            else:
                net.wire.insert(data.draw(st.integers(0, len(net.wire))), net.wire[i])
        elif action == "answer":
            name = data.draw(st.sampled_from("abc"))
            given_ = [f["payload"]["task_id"] for f in workers[name].of_type("delegate")]
            given_ = [t for t in given_ if t not in answered] or given_
            if given_:
                task_id = data.draw(st.sampled_from(given_))
                answered.add(task_id)
                net[name].send(
                    workers[name],
                    "result",
                    {"task_id": task_id, "success": data.draw(st.booleans()), "data": 1},
                )
        elif action == "cancel" and tasks:
            task_id = data.draw(st.sampled_from(sorted(tasks)))
            here = tasks[task_id]
            net[here].send(askers[here], "cancel", {"task_id": task_id})
        elif action == "wait":
            net.at(net.clock.now + data.draw(st.sampled_from([0.05, 0.3, 1.0, 2.5])))
        elif action == "silence":
            here, there = data.draw(st.sampled_from(["ab", "ba", "ac", "ca", "bc", "cb"]))
            alive = data.draw(st.booleans())
            net[here].router.hub_presence(there, alive=alive)
        check_limits()

    # The end: the wire heals, and hubs silenced are heard from again. (Only those, so
    # that what is owed must go by re-sends, not by `hub_presence`'s sending at once.)
    for name in "abc":
        for other in sorted(net[name].remote.dead_hubs):
            net[name].router.hub_presence(other, alive=True)
    end = net.clock.now + 40
    while net.clock.now < end:
        net.run(limit=10_000)
        check_limits()
        net.at(net.clock.now + 0.25)
    net.run(limit=10_000)

    for task_id, here in tasks.items():
        heard = [o for o in outcomes(askers[here]) if o["task_id"] == task_id]
        assert len(heard) == 1, (task_id, heard)
        assert net[here].router.tasks.get(task_id) is not None
    heard_of = Counter(o["task_id"] for p in askers.values() for o in outcomes(p))
    assert set(heard_of) == set(tasks)
    for worker in workers.values():  # nobody resumed: each task reached its agent once
        given = Counter(f["payload"]["task_id"] for f in worker.of_type("delegate"))
        assert set(given.values()) <= {1}, given
    assert owed(net) == {}
    for name in "abc":
        router = net[name].router
        assert router.tasks.counts()["pending"] == 0
        assert router.tasks.counts()["in_progress"] == 0
        assert len(router.queue) == 0

    # And the cluster still works: a clean round, every requester to every agent.
    for here, there in itertools.product("abc", repeat=2):
        reply = net[here].delegate(askers[here], to=workers[there].agent_id, ttl=30)
        net.run()
        assert net[here].state(reply["task_id"]) == "in_progress"
        net[there].result(workers[there], reply["task_id"], data=here + there)
        net.run()
        last = outcomes(askers[here])[-1]
        assert (last["task_id"], last["data"]) == (reply["task_id"], here + there)


def test_a_stubs_result_unanswered_at_a_restart_is_sent_again(tmp_path: Any) -> None:
    """Hub c (durable: SQLite) ends a stub and sends its result to the owner, b; c dies
    before b answers. Restarted from its store, c sends the result again and b tells
    the requester. Before, nothing was sent again, and the task waited for b's TTL."""
    net = Net("b", "c", resume_grace=5)
    c, asker, far = _stub_hub(net)
    task_id = net["b"].delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    net.run()
    c.result(far, task_id, data="done")
    store = SQLiteStore(tmp_path / "c.db")
    store.load()
    store.write(c.router.take_changes())  # the commit before the crash
    assert net.drop("result")  # c died with its result on the wire
    store.close()
    restarted, reopened = _restarted_from(net, "c", tmp_path / "c.db")
    net.run()
    assert [(o["state"], o["data"]) for o in outcomes(asker)] == [("completed", "done")]
    assert owed(net) == {}  # b answered: nothing owed any more
    reopened.write(restarted.router.take_changes())
    reopened.close()


def _restarted_from(net: Net, name: str, path: Any) -> tuple[Hub, SQLiteStore]:
    """Hub `name` restarted from its SQLite file at `path`: the new router, the store."""
    rows = net[name].router.directory_rows()
    restarted = _journaled(net, name)
    restarted.router.directory(rows)
    store = SQLiteStore(path)
    restarted.router.restore(store.load())
    return restarted, store


def test_results_the_owner_answered_are_not_sent_again_at_a_restart(tmp_path: Any) -> None:
    """A stub's result is committed while on its way; once the owner answers, its row is
    paid. Before, the row kept saying otherwise, and every restart sent every retained
    stub's result again."""
    net = Net("b", "c", resume_grace=5)
    c, asker, far = _stub_hub(net)
    store = SQLiteStore(tmp_path / "c.db")
    store.load()
    task_ids = [net["b"].delegate(asker, to=far.agent_id, ttl=30)["task_id"] for _ in range(3)]
    net.run()
    for task_id in task_ids:
        c.result(far, task_id, data="done")
    store.write(c.router.take_changes())  # the commit the results wait for
    net.run()  # b answers each
    store.write(c.router.take_changes())
    store.close()
    for _ in range(2):
        c, store = _restarted_from(net, "c", tmp_path / "c.db")
        assert net.kinds() == []  # nothing sent again
        store.write(c.router.take_changes())
        store.close()
    assert len(outcomes(asker)) == 3


def test_a_result_that_followed_its_requester_goes_there_after_a_restart(tmp_path: Any) -> None:
    """c's result for a stub followed its requester from b (dead) to a; c died before
    a answered. Restarted, c sends it to a, not back to b."""
    net = Net("a", "b", "c", resume_grace=5)
    b = _journaled(net, "b")
    c = _journaled(net, "c")
    asker = b.register("asker")
    far = c.register("echoer", {"name": "echo"})
    net.sync()
    task_id = b.delegate(asker, to=far.agent_id, ttl=30)["task_id"]
    net.run()
    store = SQLiteStore(tmp_path / "c.db")
    store.load()
    rows = bucket(b, {})
    c.result(far, task_id, data="done")
    store.write(c.router.take_changes())
    net.drop()  # b is dead, and the result with it
    for hub in ("a", "c"):
        net[hub].router.hub_presence("b", alive=False)
    back, reply = _take_over(net["a"], asker, list(rows.values()), [task_id])
    assert reply["payload"]["resumed"] is True, reply
    net.sync()  # c sees the requester on a: the result goes there
    store.write(c.router.take_changes())
    net.drop("result")  # c dies before a answers
    store.close()
    c, store = _restarted_from(net, "c", tmp_path / "c.db")
    net.sync()
    results = [m.dest for m in net.wire if m.answer is None and m.kind == "result"]
    assert results == ["a"]
    net.run()
    assert [(o["state"], o["data"]) for o in outcomes(back)] == [("completed", "done")]
    store.close()


# A requester that moves from hub to hub while its old hubs live on.
MOVES = (
    *["delegate"] * 3,
    *["deliver"] * 4,
    "drop",
    "duplicate",
    *["answer"] * 2,
    *["cancel"] * 2,
    "wait",
    "flush",
    *["move"] * 2,
    "sync",
)
# (what, i, j, flag): i and j choose (modulo) among what there is to choose from, so that
# a step keeps its meaning when the shrinker removes the steps before it.
MOVE_STEP = st.tuples(st.sampled_from(MOVES), st.integers(0, 7), st.integers(0, 7), st.booleans())


class Moving:
    """The requester's side: its connection now, the outcomes it read on the ones it
    left, and how many on this one were written whole (`delivered`)."""

    def __init__(self, peer: FakePeer) -> None:
        self.first = peer
        self.current = peer
        self.read: list[dict[str, Any]] = []
        self.written = 0

    def heard(self) -> list[dict[str, Any]]:
        return self.read + outcomes(self.current)


def _moves(steps: list[tuple[str, int, int, bool]]) -> None:
    """Three journaled hubs, an echo agent on each, and one requester that starts on a,
    delegates to the agents, cancels, and moves to another hub (`move`: its old
    connection breaks, noticed there before or after the move, after it read a prefix
    of what was written to it), while messages between hubs are delivered in any order,
    lost or doubled, agents answer, time passes and directory rows spread. Every step
    is followed by the commit rule: the rows of the requester's holder reach the
    bucket, and no other hub's do (what `release` makes so, as long as the old holder
    sees the move within `RELEASE_WAIT`; a hub writes only its own agents' rows, and
    here the requester is the only one that asks). Then the wire
    heals and every TTL runs out: the requester has heard of every task, and never two
    different outcomes of one."""
    net = Net("a", "b", "c")
    for name in "abc":
        _journaled(net, name)
    asker = Moving(net["a"].register("asker"))
    workers = {name: net[name].register(f"w-{name}", {"name": "echo"}) for name in "abc"}
    kv: dict[str, Any] = {}
    where = "a"
    tasks: list[str] = []
    answered: set[str] = set()
    for what, i, j, flag in steps:
        if what == "delegate":
            to = workers["abc"[i % 3]].agent_id
            payload = {"capability": "echo", "ttl": (30.0, 2.0)[j % 2]}
            reply = net[where].request(asker.current, "delegate", payload, to=to)
            if reply["type"] == "delegate":
                tasks.append(reply["payload"]["task_id"])
        elif what in ("deliver", "drop", "duplicate") and net.wire:
            k = i % len(net.wire)
            if what == "deliver":
                net.deliver(k)
            elif what == "drop":
                net.wire.pop(k)
            else:
                net.wire.insert(j % (len(net.wire) + 1), net.wire[k])
        elif what == "answer":
            name = "abc"[i % 3]
            given_ = [f["payload"]["task_id"] for f in workers[name].of_type("delegate")]
            given_ = [t for t in given_ if t not in answered]
            if given_:
                answered.add(task_id := given_[j % len(given_)])
                net[name].result(workers[name], task_id, data=1)
        elif what == "cancel" and tasks:
            net[where].send(asker.current, "cancel", {"task_id": tasks[i % len(tasks)]})
        elif what == "wait":
            net.at(net.clock.now + (0.05, 0.3, 1.0, 2.5)[i % 4])
        elif what == "flush":  # what was told on this connection is written whole
            told = outcomes(asker.current)
            net[where].router.delivered([o["task_id"] for o in told[asker.written :]])
            asker.written = len(told)
        elif what == "sync":
            net.sync()
        elif what == "move":
            to = [h for h in "abc" if h != where][i % 2]
            old, told = asker.current, outcomes(asker.current)
            asker.read += told[: asker.written + j % (len(told) - asker.written + 1)]
            heard = {o["task_id"] for o in asker.read}
            unsent = [o["task_id"] for o in told[asker.written :]]
            if flag:  # the old hub sees the connection break before the move
                net[where].router.disconnected(old, unsent)
            rows = [v for k, v in kv.items() if k.startswith(asker.first.agent_id + ".")]
            mine = net[where].router.directory_rows()
            net[to].router.directory([r for r in mine if r["agent_id"] == asker.first.agent_id])
            awaiting = [t for t in tasks if t not in heard]
            back, reply = _take_over(net[to], asker.first, rows, awaiting)
            assert reply["payload"]["resumed"] is True, reply
            if not flag:
                net[where].router.disconnected(old, unsent)  # after the move
            asker.current, asker.written, where = back, 0, to
        for name in "abc":  # the commit rule; only the holder's rows land (`release`)
            bucket(net[name], kv) if name == where else net[name].router.take_changes()
    end = net.clock.now + 40
    while net.clock.now < end:
        net.run(limit=10_000)
        for name in "abc":
            bucket(net[name], kv) if name == where else net[name].router.take_changes()
        net.sync()
        net.at(net.clock.now + 0.25)
    net.run(limit=10_000)
    heard_of: dict[str, set[str]] = {}
    for o in asker.heard():
        heard_of.setdefault(o["task_id"], set()).add(o["state"])
    assert [t for t in tasks if t not in heard_of] == [], heard_of
    # The same outcome again the SDK drops by its task ID; two different ones it cannot.
    assert {t: s for t, s in heard_of.items() if len(s) > 1} == {}


def test_a_timeout_decided_before_the_move_was_seen_is_not_told_after_a_move_back() -> None:
    """Found by the random moves (a helper's longer runs): R delegates on a to a's
    agent (TTL 2 s) and moves to b, where it cancels and hears `cancelled`. a, not yet
    aware of the move, times the task out at its TTL and tells its agent to stop; the
    agent has not read that cancel when R moves back to a. a had kept the task through
    its handover for the cancel it owed its agent, and told R `timeout` in the catch-up:
    a second, different outcome."""
    _moves(
        [
            ("delegate", 0, 1, False),
            ("move", 0, 0, False),
            ("cancel", 0, 0, False),
            ("wait", 3, 0, False),
            ("flush", 0, 0, False),
            ("move", 0, 0, False),
        ]
    )


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(MOVE_STEP, min_size=3, max_size=30))
def test_random_moves_of_a_requester_give_each_task_one_outcome(
    steps: list[tuple[str, int, int, bool]],
) -> None:
    _moves(steps)
