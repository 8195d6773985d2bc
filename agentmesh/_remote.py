"""The remote route's pure parts: the port to other hubs, the kinds of message between
hubs, a remote agent's directory row, and the re-send state of what one hub owes
another. No trio, no NATS (docs/cluster.md, "The router: a remote route beside the
local one").

The router speaks to other hubs through a `ClusterPort`, beside the `Peer`s of its own
connections. A message is a kind and a JSON object (`body`); a request gets one answer,
which the Trio shell hands back with `Router.cluster_reply`. Nothing owed is a queued
message: it is a flag on the task (`owed_delivery`, `owed_cancel`) or a finished stub
held in the task table, and one `Owed` entry per owed message holds its back-off (and
the body it re-sends), so that memory stays bounded by the task table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import attrs
import orjson

from .lifecycle import STATES, TaskRecord, from_row
from .registry import AgentRecord, Capability
from .store import TaskRow

__all__ = [
    "BROADCAST",
    "CANCEL",
    "DELIVERED",
    "EVERY_HUB",
    "HANDOVER_LOOKBACK",
    "KINDS",
    "MAYBE_STR",
    "PROGRESS",
    "RELEASE",
    "RELEASE_WAIT",
    "RESULT",
    "RETRY_FIRST",
    "RETRY_MAX",
    "STR",
    "STUB_GRACE",
    "TASK",
    "BadMessage",
    "ClusterPort",
    "Owed",
    "RemoteState",
    "agent_from_row",
    "agent_row",
    "field",
    "finite",
    "task_from_value",
    "task_key",
    "task_value",
]

# The kinds of message between hubs (docs/cluster.md, "Messages between hubs").
TASK = "task"  # owner -> the assignee's hub: run this task
DELIVERED = "delivered"  # the assignee's hub -> owner: a pending task reached its agent
RESULT = "result"  # the assignee's hub -> owner: the agent's answer (or its end there)
CANCEL = "cancel"  # owner -> the assignee's hub: stop the task
PROGRESS = "progress"  # the assignee's hub -> owner, unanswered and droppable
RELEASE = "release"  # a requester's new hub -> its old one: are your rows of it out?
BROADCAST = "broadcast"  # to every other hub (`EVERY_HUB`), unanswered and droppable
KINDS = frozenset({TASK, DELIVERED, RESULT, CANCEL, PROGRESS, RELEASE})  # sent to one hub
EVERY_HUB = "*"  # `ClusterPort.send`'s hub for a message to every other hub

RETRY_FIRST = 0.1  # seconds before the first re-send of an unanswered request
RETRY_MAX = 2.0  # the back-off doubles up to this
# The assignee's hub cancels its agent's task this long after the deadline if the owner
# said nothing (the owner's own timer fired at the deadline, and its cancel was lost).
STUB_GRACE = 1.0
# Seconds back from a handover that the old holder of a requester looks for outcomes its
# agents' answers decided and that it told on the requester's old connection: the new
# holder may have read those tasks from the bucket still running (its read and the old
# holder's sight of the move are milliseconds apart; NATS slow to take the row, seconds),
# and the requester may never have read them. They go to the new holder, which drops
# what it knows already.
HANDOVER_LOOKBACK = 5.0
# Seconds at most that a hub that took a requester over holds back its writes of the
# requester's task rows, until the old holder answers `release` (a dead or silent old
# holder writes nothing more, and one that never answers does not stall them for long).
RELEASE_WAIT = 1.0


class ClusterPort(Protocol):
    """What the router needs of the link to the other hubs of its cluster."""

    @property
    def name(self) -> str:
        """This hub's name in the cluster (one NATS subject token)."""

    def send(self, hub: str, kind: str, body: dict[str, Any], *, request: bool) -> None:
        """Queue a message of `kind` to `hub` without waiting (the Trio shell hands it to
        the link with `publish_nowait`). With `request`, the answer comes back through
        `Router.cluster_reply(hub, kind, body, answer)`; a lost message or answer is
        simply never answered (the router re-sends). `hub` is `EVERY_HUB` for a message
        to every other hub (a broadcast: never a request)."""

    def forget(self, agent_id: str, hub: str) -> None:
        """Delete a dead hub's agent from the agents bucket (the janitor's delete), if
        `hub` still holds it there (a compare-and-set on the row last seen: an agent that
        moved meanwhile is left alone). Never blocks. The router hears of the delete as
        every hub does, through the directory (`gone`)."""


@attrs.define(kw_only=True, eq=False, slots=True)
class Owed:
    """One message a hub owes another until it is answered or `until` passes: its next
    re-send is at `due`, after `delay` (doubling up to `RETRY_MAX`). `hub` is where it
    goes; None for the hub that holds the task's assignee when it is sent (the lease may
    move meanwhile)."""

    kind: str
    task_id: str
    hub: str | None
    body: dict[str, Any]
    until: float
    delay: float = RETRY_FIRST
    due: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.task_id}"


@attrs.define(kw_only=True, eq=False, slots=True)
class RemoteState:
    """What a router of a cluster keeps about the others (`Router._remote`)."""

    port: ClusterPort
    name: str  # this hub's
    link_up: bool = True
    dead_hubs: dict[str, float] = attrs.Factory(dict)  # silent too long: since when
    listed_offline: set[str] = attrs.Factory(set)  # remote agents whose rows say offline
    owed: dict[str, Owed] = attrs.Factory(dict)  # messages owed to other hubs, by key
    owner_word: bool = False  # a stub ends on its owner's word: nothing to report
    # Rows that name this hub for agents it does not hold: an earlier incarnation's
    # (restarted without its store). Each may resume here for `resume_grace`.
    orphans: dict[str, AgentRecord] = attrs.Factory(dict)
    # The tasks bucket's rows of an agent about to be taken over (`R.>`, read by the
    # shell before its `register` is routed): adopted if the take-over happens.
    # None: they could not be read (the take-over is refused: `store_unavailable`).
    prefetched: dict[str, list[Mapping[str, Any]] | None] = attrs.Factory(dict)
    # Until a second past their deadlines (the `moved` timer): the tasks this hub handed
    # over to their requester's new hub and forgot, by ID -> that hub (a `result` or
    # `delivered` that still comes here is answered `{"moved": hub}`); and the tasks it
    # adopted -> the hub whose row it read (which may still report their outcome: it
    # decided them before it saw the move).
    handed: dict[str, str] = attrs.Factory(dict)
    adopted: dict[str, str] = attrs.Factory(dict)
    # Requesters taken over from a live hub -> (that hub, until when), until it answers
    # `release` (or `RELEASE_WAIT` passes: the `fence` timer): the shell holds back their
    # task rows meanwhile, so that a row of the old holder's on its way cannot land
    # after them.
    fences: dict[str, tuple[str, float]] = attrs.Factory(dict)


class BadMessage(ValueError):
    """A message from another hub, or a directory row, that is not one."""


_REQUIRED: Any = object()


def field(
    body: Mapping[str, Any], key: str, kinds: tuple[type, ...], default: Any = _REQUIRED
) -> Any:
    """`body[key]`, which must be one of `kinds` (JSON's: a bool is no int), or
    `default` if it is absent (when there is one). Raises `BadMessage`."""
    if not isinstance(body, Mapping):
        raise BadMessage(f"expected an object, got {type(body).__name__}")
    value = body.get(key, _REQUIRED)
    if value is _REQUIRED:
        if default is _REQUIRED:
            raise BadMessage(f"{key}: missing")
        return default
    if not isinstance(value, kinds) or (type(value) is bool and bool not in kinds):
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise BadMessage(f"{key}: expected {names}, got {type(value).__name__}")
    return value


def finite(body: Mapping[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    """`field` for a finite number (or `default`, which may be None)."""
    kinds: tuple[type, ...] = (int, float) if default is _REQUIRED else (int, float, type(None))
    value = field(body, key, kinds, default)
    if value is not None and not math.isfinite(value):
        raise BadMessage(f"{key}: must be a finite number, got {value!r}")
    return value


STR: tuple[type, ...] = (str,)  # `field` kinds: a string
MAYBE_STR: tuple[type, ...] = (str, type(None))  # a string or null


def agent_row(agent: AgentRecord, hub: str) -> dict[str, Any]:
    """The directory row of a local agent, as the agents bucket holds it: with the
    SHA-256 of its resume token (never the token), which another hub checks when the
    agent resumes there."""
    row: dict[str, Any] = {
        "agent_id": agent.agent_id,
        "hub": hub,
        "epoch": agent.epoch,
        "token_sha256": agent.token_hash.hex(),
        "name": agent.name,
        "description": agent.description,
        "capabilities": [attrs.asdict(c) for c in agent.capabilities],
        "metadata": agent.metadata,
        "tags": list(agent.tags),
        "hidden": agent.hidden,
        "online": agent.online,
        "registered_at": agent.registered_at,
    }
    if agent.max_concurrency is not None:
        row["max_concurrency"] = agent.max_concurrency
    return row


def agent_from_row(row: Mapping[str, Any]) -> AgentRecord:
    """A remote agent from its directory row (see `agent_row`), every field checked as
    a client's `register` is. Raises `BadMessage` for a row that is not one."""
    hub, agent_id = field(row, "hub", STR), field(row, "agent_id", STR)
    if not hub or not agent_id:
        raise BadMessage("hub, agent_id: must not be empty")
    capabilities = []
    for each in field(row, "capabilities", (list,), []):
        capabilities.append(
            Capability(
                name=field(each, "name", STR),
                description=field(each, "description", STR, ""),
                params_schema=field(each, "params_schema", (dict, type(None)), None),
                max_concurrency=_limit(each),
            )
        )
    tags = field(row, "tags", (list,), [])
    if not all(type(tag) is str for tag in tags):
        raise BadMessage("tags: expected strings")
    try:  # absent: a row no hub can take over (the agent resumes on its own hub only)
        token = bytes.fromhex(field(row, "token_sha256", STR, ""))
    except ValueError:
        raise BadMessage("token_sha256: expected hexadecimal digits") from None
    if token and len(token) != 32:
        raise BadMessage("token_sha256: expected 64 hexadecimal digits")
    return AgentRecord(
        agent_id=agent_id,
        name=field(row, "name", STR),
        description=field(row, "description", STR, ""),
        capabilities=tuple(capabilities),
        metadata=field(row, "metadata", (dict,), {}),
        token_hash=token,
        registered_at=finite(row, "registered_at", 0.0),
        online=field(row, "online", (bool,), True),
        hidden=field(row, "hidden", (bool,), False),
        tags=tuple(tags),
        max_concurrency=_limit(row),
        hub=hub,
        epoch=field(row, "epoch", (int,), 0),
    )


def _limit(body: Mapping[str, Any]) -> int | None:
    """A `max_concurrency`: a count of at least 1, or None (no limit)."""
    limit: int | None = field(body, "max_concurrency", (int, type(None)), None)
    if limit is not None and limit < 1:
        raise BadMessage(f"max_concurrency: must be at least 1, or null, got {limit}")
    return limit


# The tasks bucket (docs/cluster.md, "What is kept in NATS"): the owner's rows of the
# tasks it decides, under `<requester>.<task_id>`, so that the hub an agent resumes on
# finds the tasks it asked for (`<requester>.>`).


def task_key(requester: str, task_id: str) -> str:
    return f"{requester}.{task_id}"


def task_value(row: TaskRow, hub: str, epoch: int) -> bytes:
    """A task's row in the tasks bucket: the store's row (`TaskRow`), with the owner
    and the epoch of its lease on the requester; times are wall clock."""
    return orjson.dumps(
        {
            "hub": hub,
            "epoch": epoch,
            "row": orjson.Fragment(row.row),
            "params": None if row.params is None else orjson.Fragment(row.params),
            "deadline": row.deadline,
            "priority": row.priority,
            "queue": row.queue,
        }
    )


def task_from_value(value: Mapping[str, Any]) -> tuple[TaskRecord, float | None]:
    """The task a row of the tasks bucket holds (see `task_value`), and its wall-clock
    deadline (None for a finished task). Raises `BadMessage` for a row that is not one."""
    row = field(value, "row", (list,))
    if len(row) < 2 or row[0] not in STATES:
        raise BadMessage("row: not a task's row")
    params = field(value, "params", (dict, type(None)), None)
    deadline = finite(value, "deadline", None)
    try:
        record = from_row(orjson.dumps(row), params)
    except (TypeError, ValueError, KeyError) as exc:
        raise BadMessage(f"row: not a task's row ({exc})") from None
    if not record.state.terminal and deadline is None:
        raise BadMessage("deadline: missing for an unfinished task")
    record.priority = field(value, "priority", (int,), 0)
    record.queue = field(value, "queue", MAYBE_STR, None)
    return record, None if record.state.terminal else deadline
