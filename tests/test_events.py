"""The network's events (`watch`, and the listeners the dashboard subscribes), on the
sans-IO router with a manual clock: what is told, in which order, to whom, and what a
slow watcher misses."""

from __future__ import annotations

from typing import Any

import pytest

from agentmesh.protocol import AGENT_EVENT_KINDS, EVENT_KINDS

from .test_routing import WALL0, FakePeer, Mesh


class SlowPeer(FakePeer):
    """A connection whose outbox is full while `full` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.full = False

    def has_room(self) -> bool:
        return not self.full


def _watcher(mesh: Mesh, kinds: list[str] | None = None, peer: FakePeer | None = None) -> Any:
    peer = peer or FakePeer()
    mesh.router.connected(peer)
    reply = mesh.request(peer, "watch", {} if kinds is None else {"kinds": kinds})
    assert reply["type"] == "watch", reply
    peer.clear()
    return peer


def _events(peer: FakePeer) -> list[dict[str, Any]]:
    return [f["payload"] for f in peer.frames if f["type"] == "event"]


def _brief(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Each event as (kind, what it is about: a task's state or an agent's name)."""
    out = []
    for event in events:
        if "task" in event:
            out.append((event["kind"], event["task"]["state"]))
        elif "agent" in event:
            out.append((event["kind"], event["agent"]["name"]))
        else:
            out.append((event["kind"], ""))
    return out


def test_a_watcher_sees_the_whole_story_in_order() -> None:
    mesh = Mesh(resume_grace=5)
    watcher = _watcher(mesh)
    mesh.at(1.0)
    agent = mesh.register("echoer", "echo")
    requester = mesh.register("asker")
    mesh.at(2.0)
    task_id = mesh.delegate(requester, ttl=30)["task_id"]
    mesh.send(agent, "progress", {"task_id": task_id, "progress": 0.5, "message": "half"})
    mesh.at(2.25)
    mesh.send(agent, "result", {"task_id": task_id, "success": True, "data": {"big": "x"}})
    mesh.send(requester, "broadcast", {"message": "hello", "data": [1]})
    mesh.router.disconnected(agent)
    again = mesh.register("echoer", "echo", resume=agent)
    mesh.router.disconnected(again)
    mesh.fire(2.25 + 5)  # the grace runs out

    events = _events(watcher)
    assert _brief(events) == [
        ("agent_registered", "echoer"),
        ("agent_registered", "asker"),
        ("task_state", "pending"),
        ("task_state", "in_progress"),
        ("task_progress", ""),
        ("task_state", "completed"),
        ("broadcast", ""),
        ("agent_offline", "echoer"),
        ("agent_online", "echoer"),
        ("agent_offline", "echoer"),
        ("agent_left", "echoer"),
    ]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[0]["time"] == WALL0 + 1.0
    assert events[0]["agent"] == {
        "agent_id": agent.agent_id,
        "name": "echoer",
        "description": "",
        "capabilities": [{"name": "echo", "description": "", "params_schema": None}],
        "online": True,
        "metadata": {},
    }
    pending, started, progress, done = events[2:6]
    assert pending["task"]["requester"] == requester.agent_id
    assert pending["task"]["assignee"] == agent.agent_id
    assert "duration" not in pending
    assert "duration" not in started
    assert progress["progress"] == {"task_id": task_id, "progress": 0.5, "message": "half"}
    assert done["duration"] == 0.25  # delegate at 2.0, result at 2.25, on the manual clock
    assert done["task"]["success"] is True
    assert done["task"]["data"] is None  # left out,
    assert done["task"]["truncated"] is True  # and said so
    assert events[6]["broadcast"] == {
        "sender": requester.agent_id,
        "message": "hello",
        "recipients": 1,  # the echoer; the watcher did not register
    }
    assert events[7]["agent"]["online"] is False
    assert "did not resume within 5s" in events[-1]["reason"]
    assert not any(f["type"] == "event" for f in agent.frames + requester.frames)


def test_events_of_the_kinds_asked_for_and_a_second_watch_replaces_them() -> None:
    mesh = Mesh()
    tasks_only = _watcher(mesh, ["task_state"])
    agent = mesh.register("echoer", "echo")
    requester = mesh.register("asker")
    mesh.delegate(requester)
    assert _brief(_events(tasks_only)) == [("task_state", "pending"), ("task_state", "in_progress")]

    reply = mesh.request(tasks_only, "watch", {"kinds": ["agent_left", "agent_registered"]})
    assert reply["payload"] == {"kinds": ["agent_registered", "agent_left"]}  # in EVENT_KINDS order
    tasks_only.clear()
    mesh.request(agent, "deregister")
    mesh.register("late")
    # The deregistered agent's task failed: a task_state, no longer watched.
    assert _brief(_events(tasks_only)) == [("agent_left", "echoer"), ("agent_registered", "late")]


def test_unwatch_stops_and_a_closed_watcher_is_forgotten() -> None:
    mesh = Mesh()
    watcher, gone = _watcher(mesh), _watcher(mesh)
    reply = mesh.request(watcher, "unwatch")
    assert reply["type"] == "unwatch"
    assert reply["payload"] == {}
    mesh.router.disconnected(gone)
    gone.clear()
    watcher.clear()
    mesh.register("echoer", "echo")
    assert _events(watcher) == []
    assert _events(gone) == []
    assert mesh.router.events.active is False  # nobody watches: nothing is built
    assert mesh.router.events.seq == 0


def test_watch_reply_lists_every_kind_when_none_is_given() -> None:
    mesh = Mesh()
    peer = FakePeer()
    mesh.router.connected(peer)
    reply = mesh.request(peer, "watch")
    assert reply["payload"] == {"kinds": list(EVENT_KINDS)}


@pytest.mark.parametrize(
    "payload",
    [{"kinds": ["task_state", "teleported"]}, {"kinds": "task_state"}, {"kinds": [3]}],
    ids=["unknown-kind", "not-a-list", "not-strings"],
)
def test_bad_watch_is_refused_and_starts_nothing(payload: dict[str, Any]) -> None:
    mesh = Mesh()
    peer = FakePeer()
    mesh.router.connected(peer)
    reply = mesh.request(peer, "watch", payload)
    assert reply["type"] == "error"
    assert reply["payload"]["code"] == "invalid_message"
    assert "$.payload.kinds" in reply["payload"]["message"]
    if payload["kinds"] == ["task_state", "teleported"]:
        assert "'teleported'" in reply["payload"]["message"]
        assert "agent_registered" in reply["payload"]["message"]  # says what there is
    peer.clear()
    mesh.register("echoer", "echo")
    assert _events(peer) == []


def test_on_a_hub_with_tokens_anyone_may_watch_the_agents_and_an_admin_everything() -> None:
    mesh = Mesh(tokens=frozenset({"t"}), admin_tokens=frozenset({"a"}))
    stranger = FakePeer()
    mesh.router.connected(stranger)
    agent = mesh.register("echoer", "echo")
    for peer in (stranger, agent):
        refused = mesh.request(peer, "watch", {"kinds": ["agent_left", "task_state"]})
        assert refused["payload"]["code"] == "forbidden"
        assert refused["payload"]["message"] == (
            "watching tasks, progress and broadcasts needs an admin token; anyone may "
            "watch the agents (agent_registered, agent_online, agent_offline, agent_left)"
        )
        granted = mesh.request(peer, "watch")  # no kinds: the agents, as discover shows
        assert granted["payload"] == {"kinds": list(AGENT_EVENT_KINDS)}
    admin = FakePeer()
    mesh.router.connected(admin, admin=True)
    assert mesh.request(admin, "watch")["payload"] == {"kinds": list(EVENT_KINDS)}
    for peer in (admin, stranger, agent):
        peer.clear()

    requester = mesh.register("second")
    mesh.delegate(requester)
    tool = mesh.register("a-tool", hidden=True)
    mesh.router.disconnected(tool)
    assert _brief(_events(admin)) == [
        ("agent_registered", "second"),
        ("task_state", "pending"),
        ("task_state", "in_progress"),
        ("agent_registered", "a-tool"),
        ("agent_offline", "a-tool"),
    ]
    assert _events(admin)[-1]["agent"]["hidden"] is True
    assert "hidden" not in _events(admin)[0]["agent"]  # present only when true
    for peer in (stranger, agent):  # no tasks, and no hidden agents
        assert _brief(_events(peer)) == [("agent_registered", "second")]


def test_a_slow_watcher_misses_events_and_is_told_how_many() -> None:
    mesh = Mesh()
    slow = _watcher(mesh, peer=SlowPeer())
    slow.full = True
    for i in range(3):
        mesh.register(f"agent-{i}")
    assert _events(slow) == []  # skipped, not queued
    assert slow.closes == []  # and never cut for it
    slow.full = False
    mesh.register("agent-3")
    mesh.register("agent-4")
    events = _events(slow)
    assert [(e["seq"], e.get("missed")) for e in events] == [(4, 3), (5, None)]


def test_listeners_share_each_event_and_unsubscribe() -> None:
    mesh = Mesh()
    heard: list[dict[str, Any]] = []
    unsubscribe = mesh.router.events.subscribe(heard.append)
    watcher = _watcher(mesh)
    mesh.register("echoer", "echo")
    assert [e["kind"] for e in heard] == ["agent_registered"]
    assert _events(watcher) == heard  # the same event, as a frame's payload
    unsubscribe()
    unsubscribe()  # twice is harmless
    mesh.register("other")
    assert len(heard) == 1
    assert len(_events(watcher)) == 2


def test_an_events_task_leaves_data_out_and_cuts_a_long_error() -> None:
    mesh = Mesh()
    watcher = _watcher(mesh, ["task_state"])
    agent = mesh.register("echoer", "echo")
    requester = mesh.register("asker")
    task_id = mesh.delegate(requester)["task_id"]
    mesh.send(agent, "result", {"task_id": task_id, "success": False, "error": "e" * 5000})
    done = _events(watcher)[-1]["task"]
    assert done["state"] == "failed"
    assert done["truncated"] is True
    assert done["error"] == "e" * 1024
    assert mesh.status(requester, task_id)["payload"]["error"] == "e" * 5000  # still whole


def test_following_the_agents_builds_no_task_event() -> None:
    # Every MCP bridge follows the agents: that must cost a task nothing.
    mesh = Mesh()
    follower = _watcher(mesh, list(AGENT_EVENT_KINDS))
    assert mesh.router.events.active
    assert not mesh.router.events.tasks_watched
    agent = mesh.register("echoer", "echo")
    requester = mesh.register("asker")
    seq = mesh.router.events.seq
    task_id = mesh.delegate(requester)["task_id"]
    mesh.send(agent, "progress", {"task_id": task_id, "progress": 0.5})
    mesh.send(agent, "result", {"task_id": task_id, "success": True})
    mesh.send(requester, "broadcast", {"message": "hi"})
    assert mesh.router.events.seq == seq  # nothing was built
    assert _brief(_events(follower)) == [
        ("agent_registered", "echoer"),
        ("agent_registered", "asker"),
    ]
    everything = _watcher(mesh)
    assert mesh.router.events.tasks_watched
    mesh.router.disconnected(everything)
    assert not mesh.router.events.tasks_watched
