"""Who watches the network, and what they are told. Pure: no trio.

The router calls `Events.emit` for each thing an operator may want to see (an agent
joining or leaving, a task changing state, progress, a broadcast), only while `active`
(for the agents) or `tasks_watched` (for the rest) says someone watches: a hub nobody
watches builds no event. An event is one JSON-ready
dict (the payload of an `event` frame, `protocol.Event`), built once and shared by every
watcher: connections that sent `watch` get it as a frame, in-process listeners (the
dashboard's event stream) get the dict itself. Each costs O(watchers), never O(tasks).

Events are advisory: a watcher that reads too slowly is skipped (its next event says
how many it `missed`), never queued for without bound and never cut for it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection
from typing import Any, Protocol

from . import protocol as p
from .lifecycle import TaskRecord
from .registry import AgentRecord

__all__ = [
    "CUT_ERROR",
    "Events",
    "Listener",
    "Watcher",
    "agent_view",
    "task_info",
    "task_view",
]

Listener = Callable[[dict[str, Any]], None]
CUT_ERROR = 1024  # characters of a task's error that a cut-down view keeps
_AGENT_KINDS = frozenset(p.AGENT_EVENT_KINDS)


class Watcher(Protocol):
    """A connection that may watch (the router's `Peer`)."""

    def has_room(self) -> bool: ...


class _Watch:
    __slots__ = ("hidden", "kinds", "missed", "v2")

    def __init__(self, kinds: Collection[str], hidden: bool, v2: bool) -> None:
        self.kinds = frozenset(kinds)  # empty: every kind
        self.hidden = hidden  # told of hidden agents too
        self.v2 = v2  # speaks protocol version 2 (else: none of its fields)
        self.missed = 0


class Events:
    """The watchers of one router and the event sequence (see the module's docstring).

    `frame(event)` encodes an event as an `event` frame; `advise(watcher, frame)` sends
    it as an advisory frame (dropped if the watcher is behind). `wall` is UNIX time.
    """

    def __init__(
        self,
        *,
        wall: Callable[[], float],
        frame: Callable[[dict[str, Any]], str],
        advise: Callable[[Any, str], None],  # (a Watcher, the frame)
    ) -> None:
        # Whether anyone watches at all, and anyone more than the agents: the router's one
        # check per event (following the agents, as every MCP bridge does, costs a task
        # nothing).
        self.active = False
        self.tasks_watched = False
        self._wall = wall
        self._frame = frame
        self._advise = advise
        self._seq = 0
        self._watchers: dict[Watcher, _Watch] = {}
        self._listeners: dict[int, Listener] = {}
        self._keys = itertools.count()

    @property
    def seq(self) -> int:
        """The number of the last event (0 before the first)."""
        return self._seq

    @property
    def watchers(self) -> int:
        """How many connections watch."""
        return len(self._watchers)

    def watch(
        self,
        watcher: Watcher,
        kinds: Collection[str] = (),
        *,
        hidden: bool = True,
        v2: bool = True,
    ) -> None:
        """Send `watcher` the events of `kinds` (every kind if empty) from now on, those
        about hidden agents only if `hidden`, without protocol version 2's fields unless
        `v2`; a second call replaces the first. Unknown kinds, and kinds the watcher may
        not see, are the caller's to refuse."""
        self._watchers[watcher] = _Watch(kinds, hidden, v2)
        self._recount()

    def unwatch(self, watcher: Watcher) -> bool:
        """Stop sending `watcher` events; whether it was watching."""
        found = self._watchers.pop(watcher, None) is not None
        if found:
            self._recount()
        return found

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(event)` for every event from now on, until the returned
        function is called. It runs inside the router's call: it must be quick, must not
        raise, and must not change the dict (every watcher shares it)."""
        key = next(self._keys)
        self._listeners[key] = listener
        self._recount()

        def unsubscribe() -> None:
            self._listeners.pop(key, None)
            self._recount()

        return unsubscribe

    def _recount(self) -> None:
        self.active = bool(self._watchers or self._listeners)
        self.tasks_watched = bool(self._listeners) or any(
            not watch.kinds or not watch.kinds <= _AGENT_KINDS for watch in self._watchers.values()
        )

    def emit(self, kind: str, body: dict[str, Any], *, hidden: bool = False) -> None:
        """Tell every watcher that `kind` happened, with `body`'s fields; if it is about
        a `hidden` agent, only the watchers that see those."""
        self._seq += 1
        event = {"kind": kind, "seq": self._seq, "time": self._wall(), **body}
        for listener in self._listeners.values():
            listener(event)
        shared: dict[bool, str] = {}  # the frame, by whether it has version 2's fields
        for watcher, watch in self._watchers.items():
            if (watch.kinds and kind not in watch.kinds) or (hidden and not watch.hidden):
                continue
            if not watcher.has_room():
                watch.missed += 1
                continue
            seen = event if watch.v2 else _v1_event(event)
            if watch.missed:
                frame = self._frame({**seen, "missed": watch.missed})
                watch.missed = 0
            else:
                frame = shared.get(watch.v2) or shared.setdefault(watch.v2, self._frame(seen))
            self._advise(watcher, frame)


_V2_AGENT_FIELDS = ("tags", "max_concurrency")


def _v1_event(event: dict[str, Any]) -> dict[str, Any]:
    """`event` as protocol version 1 has it: its agent without version 2's fields."""
    agent = event.get("agent")
    if agent is None or not (
        any(f in agent for f in _V2_AGENT_FIELDS)
        or any("max_concurrency" in c for c in agent["capabilities"])
    ):
        return event
    plain = {k: v for k, v in agent.items() if k not in _V2_AGENT_FIELDS}
    plain["capabilities"] = [
        {k: v for k, v in c.items() if k != "max_concurrency"} for c in agent["capabilities"]
    ]
    return {**event, "agent": plain}


def agent_view(agent: AgentRecord) -> dict[str, Any]:
    """An agent as events and the dashboard show it: `protocol.AgentInfo`'s fields, with
    `hidden` only when it is (a tool, such as the CLI or the MCP bridge), and `tags` and
    `max_concurrency` only when set."""
    view = {
        "agent_id": agent.agent_id,
        "name": agent.name,
        "description": agent.description,
        "capabilities": p.converter.unstructure(agent.capabilities),
        "online": agent.online,
        "metadata": agent.metadata,
    }
    if agent.hidden:
        view["hidden"] = True
    if agent.tags:  # these two only when set, as in AgentInfo
        view["tags"] = list(agent.tags)
    if agent.max_concurrency is not None:
        view["max_concurrency"] = agent.max_concurrency
    return view


def task_view(record: TaskRecord, *, full: bool = False) -> dict[str, Any]:
    """A task as events and the dashboard show it: `protocol.TaskInfo`'s fields, its data
    left out and its error cut (`truncated` says so); `full` keeps both and adds the
    params (null once the task has finished: the hub keeps them no longer)."""
    error = record.error
    truncated = False
    if not full and (record.data is not None or (error is not None and len(error) > CUT_ERROR)):
        truncated = True
        error = error[:CUT_ERROR] if error is not None else None
    view = {
        "task_id": record.task_id,
        "state": record.state.value,
        "capability": record.capability,
        "requester": record.requester,
        "assignee": record.assignee,
        "created_at": record.created_at,
        "updated_at": record.updated_at,
        "ttl": record.ttl,
        "success": record.success,
        "data": record.data if full else None,
        "error": error,
        "truncated": truncated,
    }
    if full:  # a finished task's params are not kept (retained tasks stay small)
        view["params"] = None if record.terminal else record.params
    return view


def task_info(record: TaskRecord, *, truncated: bool = False, v2: bool = True) -> p.TaskInfo:
    """The task for the wire; `truncated` leaves its data out and cuts its error short;
    without `v2`, as protocol version 1 has it (no priority)."""
    return p.TaskInfo(
        task_id=record.task_id,
        state=record.state.value,
        capability=record.capability,
        requester=record.requester,
        assignee=record.assignee,
        created_at=record.created_at,
        updated_at=record.updated_at,
        ttl=record.ttl,
        success=record.success,
        data=None if truncated else record.data,
        error=record.error[:CUT_ERROR] if truncated and record.error else record.error,
        truncated=truncated,
        priority=record.priority if v2 else 0,
    )
