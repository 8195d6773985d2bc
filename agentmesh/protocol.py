"""The agentmesh wire protocol (v1): envelope, payloads, codes, and the codec. Pure.

Every frame is one JSON object in a text frame::

    {"type": "delegate", "id": "m7", "from": null, "to": "agt_x", "timestamp": 1.7e9,
     "payload": {...}, "in_reply_to": null}

Which payload class a frame carries depends on its type and direction:

- `REQUESTS`: what a client sends to the hub.
- `REPLIES`: the hub's answer to a request; it has the request's type (except `error`)
  and `in_reply_to` set to the request's `id`.
- `EVENTS`: what the hub pushes unasked (a task for an agent, a result for a requester,
  a broadcast, ...); `in_reply_to` is absent (or null).

Decoding is strict: a wrong type is an `invalid_message` error naming the JSON path
(``$.payload.ttl``), never a silent coercion. Encoding and decoding happen here and
nowhere else.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Callable
from typing import Any, Final, TypeGuard, TypeVar, Union, get_args, get_origin

import attrs
import cattrs
import cattrs.cols
import cattrs.v
import orjson

from .registry import Capability, Match

__all__ = [
    "AGENT_EVENT_KINDS",
    "CLOSE_REPLACED",
    "EVENTS",
    "EVENT_KINDS",
    "PRIORITIES",
    "PROTOCOL_VERSION",
    "REPLIES",
    "REQUESTS",
    "AgentInfo",
    "AgentList",
    "Broadcast",
    "BroadcastAck",
    "BroadcastNote",
    "Cancel",
    "CancelAck",
    "Capability",
    "Delegate",
    "Delegated",
    "Deregister",
    "Deregistered",
    "Discover",
    "Envelope",
    "Error",
    "ErrorCode",
    "Event",
    "Heartbeat",
    "HeartbeatAck",
    "HubSummary",
    "ListTasks",
    "Match",
    "MessageType",
    "Payload",
    "Progress",
    "ProtocolError",
    "Register",
    "Registered",
    "Result",
    "Resume",
    "Status",
    "TaskAssignment",
    "TaskInfo",
    "TaskList",
    "TaskOutcome",
    "Unwatch",
    "Unwatched",
    "Watch",
    "Watching",
    "converter",
    "decode_from_client",
    "decode_from_hub",
    "delegated_payload",
    "encode",
    "encode_fields",
    "encode_utf8",
    "outcome_payload",
    "task_payload",
    "trace_problem",
]

# Version 2 adds capability routing: tags, concurrency limits, priorities, ranked
# discovery. A client asks for it in its URL (`?protocol=2`); to any other the hub speaks
# version 1, whose frames never carry the fields version 2 added.
PROTOCOL_VERSION: Final = 2
# Deepest nesting of objects and arrays accepted in a frame. Anything the hub accepts it
# must be able to encode again (orjson stops at 255 levels); real messages stay far below.
MAX_DEPTH: Final = 64
PRIORITIES: Final = range(-100, 101)  # a delegate's priority: higher waits less
CLOSE_REPLACED: Final = 4003  # a WebSocket close code: the agent resumed on a newer connection


class MessageType(str, enum.Enum):
    REGISTER = "register"
    DEREGISTER = "deregister"
    DISCOVER = "discover"
    DELEGATE = "delegate"
    RESULT = "result"
    STATUS = "status"
    BROADCAST = "broadcast"
    HEARTBEAT = "heartbeat"
    HEARTBEAT_ACK = "heartbeat_ack"
    CANCEL = "cancel"
    PROGRESS = "progress"
    LIST_TASKS = "list_tasks"
    WATCH = "watch"
    UNWATCH = "unwatch"
    EVENT = "event"
    ERROR = "error"


class ErrorCode(str, enum.Enum):
    INVALID_MESSAGE = "invalid_message"  # not JSON, not an object, a bad or missing field
    UNKNOWN_TYPE = "unknown_type"  # `type` is not a message a client may send
    NOT_REGISTERED = "not_registered"  # this connection must register first
    ALREADY_REGISTERED = "already_registered"  # this connection registered already
    UNKNOWN_AGENT = "unknown_agent"  # no agent with that ID
    UNKNOWN_TASK = "unknown_task"  # no task with that ID (or it was dropped after retention)
    NO_CAPABLE_AGENT = "no_capable_agent"  # nobody offers that capability
    FORBIDDEN = "forbidden"  # that task is not yours to read, answer or cancel
    TASK_FINISHED = "task_finished"  # the task already ended; a late or duplicate answer
    TOO_LARGE = "too_large"  # a field is over a size limit (frames over the limit: close 1009)
    LIMIT_EXCEEDED = "limit_exceeded"  # too many agents, tasks in flight or capabilities
    RATE_LIMITED = "rate_limited"  # this connection sends faster than the hub allows
    INTERNAL = "internal"  # a bug in the hub; the connection stays usable
    STORE_UNAVAILABLE = "store_unavailable"  # the hub's disk fails: no new work until it heals


class ProtocolError(Exception):
    """A frame the peer sent is wrong; becomes an `error` frame with `code`.

    `in_reply_to` is the offending frame's `id` when it could be read.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        in_reply_to: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.in_reply_to = in_reply_to
        self.details = details


# ---------------------------------------------------------------------------------------
# W3C trace context (Trace Context level 1): what a `traceparent` and a `tracestate`
# must look like. The hub checks them where a client sends them (`trace_problem`).

_TRACEPARENT: Final = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
MAX_TRACESTATE: Final = 512  # characters
_TRACESTATE: Final = re.compile(r"[\x20-\x7e]*")  # printable ASCII
_TRACEPARENT_SCHEMA: Final = {
    "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
    "description": "W3C traceparent: version-traceid-parentid-flags, lowercase hex; "
    "the version is not ff, the trace and parent IDs are not all zeros.",
}
_TRACESTATE_SCHEMA: Final = {
    "maxLength": MAX_TRACESTATE,
    "pattern": "^[\\x20-\\x7e]*$",
    "description": "W3C tracestate, passed on as it is: printable ASCII, at most "
    f"{MAX_TRACESTATE} characters, only with a traceparent.",
}


def trace_problem(traceparent: str | None, tracestate: str | None) -> str | None:
    """What is wrong with a trace context a client sent, as an `invalid_message` text
    naming the field (``$.payload.traceparent: ...``); None if nothing is."""
    if traceparent is not None:
        if _TRACEPARENT.fullmatch(traceparent) is None:
            return (
                "$.payload.traceparent: must be a W3C traceparent, "
                "version-traceid-parentid-flags in lowercase hex (2-32-16-2 digits)"
            )
        if traceparent.startswith("ff"):
            return "$.payload.traceparent: version ff is not allowed"
        if traceparent[3:35] == "0" * 32 or traceparent[36:52] == "0" * 16:
            return "$.payload.traceparent: the trace ID and parent ID must not be all zeros"
    if tracestate is not None:
        if traceparent is None:
            return "$.payload.tracestate: only allowed with a traceparent"
        if len(tracestate) > MAX_TRACESTATE:
            return f"$.payload.tracestate: longer than {MAX_TRACESTATE} characters"
        if _TRACESTATE.fullmatch(tracestate) is None:
            return "$.payload.tracestate: must be printable ASCII"
    return None


# ---------------------------------------------------------------------------------------
# Client -> hub


@attrs.frozen(kw_only=True)
class Resume:
    """Present the ID and token of an earlier registration to get that identity back.

    `awaiting`: the tasks this requester still waits for. An outcome among them that
    the hub wrote to the old connection but that never arrived (lost in its buffers) is
    sent again."""

    agent_id: str
    token: str
    awaiting: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class Register:
    name: str
    description: str = ""
    capabilities: tuple[Capability, ...] = ()
    metadata: dict[str, Any] = attrs.field(factory=dict)
    resume: Resume | None = None
    hidden: bool = False  # not listed by discover, not sent broadcasts (tools, bridges)
    tags: tuple[str, ...] = ()  # words to find it by (discover matches them, and filters)
    max_concurrency: int | None = None  # tasks it runs at once, in all (None: no limit)


@attrs.frozen(kw_only=True)
class Deregister:
    pass


@attrs.frozen(kw_only=True)
class Discover:
    """Agents that `capability` (a keyword of one or more words) matches, best first
    (docs/protocol.md gives the rules), `limit` (1 to 1000) at a time; `cursor` is an
    earlier reply's `next_cursor`. With `online`, only the agents online now; with
    `tags`, only those with every one of them. An empty keyword lists every agent in
    registration order."""

    capability: str = ""
    limit: int = 100
    cursor: str | None = None
    online: bool = False
    tags: tuple[str, ...] = ()


def _traceparent() -> Any:
    return attrs.field(default=None, metadata={"schema": _TRACEPARENT_SCHEMA})


def _tracestate() -> Any:
    return attrs.field(default=None, metadata={"schema": _TRACESTATE_SCHEMA})


# The records of a delegation's five frames (delegate, result, the delegate's reply, the
# task, the outcome) are built for every such frame, so they are not frozen and may be
# built positionally: a frozen record costs about 800 instructions per field to build
# (attrs sets each through object.__setattr__) and a keyword argument 450 more; one of
# these costs a quarter of that. Nothing changes them once built, all the same.
@attrs.define
class Delegate:
    """A task for the agent in the envelope's `to`, or for any agent offering `capability`.

    `traceparent` and `tracestate` are the W3C trace context of the requester's call
    (https://www.w3.org/TR/trace-context/): the hub copies them onto the task's frames."""

    capability: str
    params: dict[str, Any] = attrs.field(factory=dict)
    ttl: float | None = None
    traceparent: str | None = _traceparent()
    tracestate: str | None = _tracestate()
    # When every capable agent is full, higher waits less: -100 to 100.
    priority: int = 0


@attrs.define  # a hot record, not frozen: see above Delegate
class Result:
    """A task's outcome, from the agent it was assigned to."""

    task_id: str
    success: bool
    data: Any = None
    error: str | None = None


@attrs.frozen(kw_only=True)
class Status:
    """With `task_id`: that task's record. Without: a summary of the hub."""

    task_id: str | None = None


@attrs.frozen(kw_only=True)
class ListTasks:
    """Tasks known to the hub, newest first: a registered agent sees the tasks it asked
    for or was given; a connection that did not register (an operator's tool) sees all.
    `limit` (1 to 1000) at a time; `cursor` is an earlier reply's `next_cursor`.
    `requester` / `assignee` keep only the tasks that agent asked for / was given."""

    state: str | None = None
    requester: str | None = None
    assignee: str | None = None
    limit: int = 100
    cursor: str | None = None


@attrs.frozen(kw_only=True)
class Broadcast:
    """To every other online agent; also what the recipients get, `from` the sender."""

    message: str
    data: Any = None


@attrs.frozen(kw_only=True)
class Heartbeat:
    pass


@attrs.frozen(kw_only=True)
class Cancel:
    """From a requester: cancel my task. From the hub to an agent: stop working on it."""

    task_id: str
    reason: str | None = None


@attrs.frozen(kw_only=True)
class Progress:
    """From the assignee, forwarded to the requester `from` the assignee. The trace
    context, if the assignee leaves it out, is the task's (the hub stamps it)."""

    task_id: str
    progress: float | None = None
    message: str | None = None
    data: Any = None
    traceparent: str | None = _traceparent()
    tracestate: str | None = _tracestate()


@attrs.frozen(kw_only=True)
class Watch:
    """Subscribe this connection to the network's events (`Event` frames), of the
    `kinds` given (see `EVENT_KINDS`), or of every kind. An operator's request: an admin
    token on a hub with tokens. A second `watch` replaces the first's kinds."""

    kinds: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class Unwatch:
    """Stop the events of an earlier `watch`."""


# ---------------------------------------------------------------------------------------
# Hub -> client


@attrs.frozen(kw_only=True)
class Registered:
    agent_id: str
    resume_token: str
    heartbeat_interval: float
    resumed: bool = False  # true when a `resume` was honoured
    protocol: int = PROTOCOL_VERSION
    max_frame_size: int = 1 << 20  # the longest frame the hub accepts


@attrs.frozen(kw_only=True)
class Deregistered:
    agent_id: str


@attrs.frozen(kw_only=True)
class AgentInfo:
    """An agent. `hidden` (a tool, such as the CLI or the MCP bridge) is present only in
    events, and only when true: discover never lists hidden agents. `match` says why a
    discover with a keyword found it. `hub` (in a cluster) names the hub of an agent
    connected to another hub. `tags`, `max_concurrency`, `match` and `hub` are present
    only when set."""

    agent_id: str
    name: str
    description: str
    capabilities: tuple[Capability, ...]
    online: bool = True
    metadata: dict[str, Any] = attrs.field(factory=dict)
    hidden: bool = False
    tags: tuple[str, ...] = ()
    max_concurrency: int | None = None
    match: Match | None = None
    hub: str | None = None


@attrs.frozen(kw_only=True)
class AgentList:
    """One page of agents; `next_cursor` asks for the next, and is null after the last."""

    agents: tuple[AgentInfo, ...]
    next_cursor: str | None = None


@attrs.define  # a hot record, not frozen: see above Delegate
class Delegated:
    task_id: str
    agent_id: str
    state: str


@attrs.define  # a hot record, not frozen: see above Delegate
class TaskAssignment:
    """A task for this agent, `from` its requester, with the trace context to continue
    (the hub's routing span's when the hub traces, else the requester's), if any."""

    task_id: str
    capability: str
    params: dict[str, Any]
    ttl: float  # seconds left when sent
    traceparent: str | None = _traceparent()
    tracestate: str | None = _tracestate()


@attrs.define  # a hot record, not frozen: see above Delegate
class TaskOutcome:
    """How a task ended, for its requester, `from` the assignee (or the hub), with the
    trace context its delegate carried, if any."""

    task_id: str
    state: str
    success: bool
    data: Any = None
    error: str | None = None
    traceparent: str | None = _traceparent()
    tracestate: str | None = _tracestate()


@attrs.frozen(kw_only=True)
class TaskInfo:
    """A task record: the reply to `status {task_id}`, and the push a requester gets when
    its PENDING task is delivered after the delegate reply."""

    task_id: str
    state: str
    capability: str
    requester: str
    assignee: str
    created_at: float
    updated_at: float
    ttl: float
    success: bool | None = None
    data: Any = None
    error: str | None = None
    truncated: bool = False  # in a list_tasks reply: `data` left out (null), `error` cut
    # Present only when set: a priority other than 0, and while the task waits at the hub
    # for a free agent, its place in the queue (1: next).
    priority: int = 0
    queue_position: int | None = None


@attrs.frozen(kw_only=True)
class TaskList:
    """One page of tasks; `next_cursor` asks for the next, and is null after the last."""

    tasks: tuple[TaskInfo, ...]
    next_cursor: str | None = None


@attrs.frozen(kw_only=True)
class HubSummary:
    """Reply to `status {}`."""

    agents: int
    online: int
    tasks: dict[str, int]
    uptime: float
    counters: dict[str, int]
    version: str
    protocol: int = PROTOCOL_VERSION


@attrs.frozen(kw_only=True)
class BroadcastAck:
    recipients: int


@attrs.frozen(kw_only=True)
class HeartbeatAck:
    pass


@attrs.frozen(kw_only=True)
class CancelAck:
    task_id: str
    state: str


@attrs.frozen(kw_only=True)
class Watching:
    """Reply to `watch`: the kinds of event this connection now gets."""

    kinds: tuple[str, ...]


@attrs.frozen(kw_only=True)
class Unwatched:
    """Reply to `unwatch`."""


@attrs.frozen(kw_only=True)
class BroadcastNote:
    """What an `Event` says of a broadcast (its data left out)."""

    sender: str
    message: str
    recipients: int


# What a watcher may be told, and what each kind carries besides `kind`, `seq`, `time`.
# Anyone may watch the agent kinds (without hidden agents); the others need an operator.
EVENT_KINDS: Final = (
    "agent_registered",  # agent: a fresh identity
    "agent_online",  # agent: resumed on a new connection
    "agent_offline",  # agent: its connection is gone; it may resume
    "agent_left",  # agent, reason: deregistered or did not resume in time
    "task_state",  # task (data left out), duration once finished: a task changed state
    "task_progress",  # progress (data left out): its assignee reported progress
    "broadcast",  # broadcast: an agent broadcast to the others
)
AGENT_EVENT_KINDS: Final = EVENT_KINDS[:4]


@attrs.frozen(kw_only=True)
class Event:
    """Something that happened in the network, pushed to a `watch`ing connection.

    `seq` counts the hub's events from 1 (it restarts with the hub); `time` is the hub's
    UNIX time. `missed` is how many events this connection was not sent just before this
    one because it read too slowly (events are advisory: dropped, never queued without
    bound). Only the fields of the event's kind are present (see `EVENT_KINDS`)."""

    kind: str
    seq: int
    time: float
    missed: int = 0
    agent: AgentInfo | None = None
    reason: str | None = None
    task: TaskInfo | None = None
    duration: float | None = None  # seconds from the delegate to the end
    progress: Progress | None = None
    broadcast: BroadcastNote | None = None


@attrs.frozen(kw_only=True)
class Error:
    code: ErrorCode
    message: str
    details: dict[str, Any] | None = None


Payload = Union[  # noqa: UP007
    Register, Deregister, Discover, Delegate, Result, Status, Broadcast, Heartbeat, Cancel,
    Progress, ListTasks, Watch, Unwatch, Registered, Deregistered, AgentList, Delegated,
    TaskAssignment, TaskOutcome, TaskInfo, TaskList, HubSummary, BroadcastAck, HeartbeatAck,
    CancelAck, Watching, Unwatched, Event, Error,
]  # fmt: skip

M = MessageType
REQUESTS: Final[dict[MessageType, type[Any]]] = {
    M.REGISTER: Register,
    M.DEREGISTER: Deregister,
    M.DISCOVER: Discover,
    M.DELEGATE: Delegate,
    M.RESULT: Result,
    M.STATUS: Status,
    M.BROADCAST: Broadcast,
    M.HEARTBEAT: Heartbeat,
    M.CANCEL: Cancel,
    M.PROGRESS: Progress,
    M.LIST_TASKS: ListTasks,
    M.WATCH: Watch,
    M.UNWATCH: Unwatch,
}
# `status` replies are TaskInfo or HubSummary; see `_reply_class`.
REPLIES: Final[dict[MessageType, type[Any]]] = {
    M.REGISTER: Registered,
    M.DEREGISTER: Deregistered,
    M.DISCOVER: AgentList,
    M.DELEGATE: Delegated,
    M.STATUS: TaskInfo,
    M.BROADCAST: BroadcastAck,
    M.HEARTBEAT_ACK: HeartbeatAck,
    M.CANCEL: CancelAck,
    M.LIST_TASKS: TaskList,
    M.WATCH: Watching,
    M.UNWATCH: Unwatched,
    M.ERROR: Error,
}
EVENTS: Final[dict[MessageType, type[Any]]] = {
    M.DELEGATE: TaskAssignment,
    M.RESULT: TaskOutcome,
    M.STATUS: TaskInfo,
    M.BROADCAST: Broadcast,
    M.CANCEL: Cancel,
    M.PROGRESS: Progress,
    M.EVENT: Event,
    M.ERROR: Error,
}
del M


@attrs.define  # a hot record, not frozen: see above Delegate
class Envelope:
    """One frame. `sender` is the wire's `from`; the hub sets it, never trusting a client.

    `timestamp` is the sender's clock in UNIX seconds, if it sent a number. A string
    there (an ISO 8601 time, as other clients send) is accepted and not kept: None.
    """

    type: MessageType
    id: str
    payload: Any
    sender: str | None = None
    to: str | None = None
    timestamp: float | None = None
    in_reply_to: str | None = None
    size: int = attrs.field(default=0, eq=False)  # length of the decoded frame, if decoded


# ---------------------------------------------------------------------------------------
# The converter: strict, so that "ttl": "abc" is an error and not a coercion.

converter = cattrs.Converter(forbid_extra_keys=True)
T = TypeVar("T")


def _expect(kind: type[Any], what: str) -> Callable[[Any, type[Any]], Any]:
    def hook(value: Any, _: type[Any]) -> Any:
        if type(value) is not kind:
            raise ValueError(f"expected {what}, got {_json_type(value)}")
        return value

    return hook


def _number(value: Any, _: type[Any]) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ValueError(f"expected a number, got {_json_type(value)}")
    return float(value)


def _is_object(t: Any) -> bool:
    return get_origin(t) is dict and get_args(t)[0] is str


def _strict_object(t: Any, conv: cattrs.Converter) -> Callable[[Any, Any], Any]:
    value_type = get_args(t)[1]
    structure_value = None if value_type is Any else conv.get_structure_hook(value_type)

    def hook(value: Any, _: Any) -> dict[str, Any]:
        if type(value) is not dict:
            raise ValueError(f"expected an object, got {_json_type(value)}")
        if structure_value is None:
            return value
        return {k: structure_value(v, value_type) for k, v in value.items()}

    return hook


def _is_record(t: Any) -> bool:
    return attrs.has(t) and t is not Capability


def _strict_record(t: Any, conv: cattrs.Converter) -> Callable[[Any, Any], Any]:
    inner = cattrs.gen.make_dict_structure_fn(t, conv, _cattrs_forbid_extra_keys=True)

    def hook(value: Any, type_: Any) -> Any:
        if type(value) is not dict:
            raise ValueError(f"expected an object, got {_json_type(value)}")
        return inner(value, type_)

    return hook


def _is_sequence(t: Any) -> bool:
    return get_origin(t) in (list, tuple)


def _strict_sequence(t: Any, conv: cattrs.Converter) -> Callable[[Any, Any], Any]:
    if get_origin(t) is tuple:
        inner = cattrs.cols.homogenous_tuple_structure_factory(t, conv)
    else:
        inner = cattrs.cols.list_structure_factory(t, conv)

    def hook(value: Any, type_: Any) -> Any:
        if type(value) is not list:
            raise ValueError(f"expected an array, got {_json_type(value)}")
        return inner(value, type_)

    return hook


def _capability(value: Any, _: type[Any]) -> Capability:
    # "echo" is shorthand for {"name": "echo"}.
    if type(value) is str:
        value = {"name": value}
    if type(value) is not dict:
        raise ValueError(f"expected a capability name or object, got {_json_type(value)}")
    return _capability_fields(value, Capability)


def _explain(exc: BaseException, type_: Any) -> str:
    """One short phrase for one field's error; `transform_error` appends the JSON path."""
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return f"unknown field(s) {', '.join(sorted(exc.extra_fields))}"
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, ValueError) and str(exc).startswith("expected"):
        return str(exc)
    return cattrs.v.format_exception(exc, type_)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "an object",
    }.get(type(value), type(value).__name__)


converter.register_structure_hook(str, _expect(str, "a string"))
converter.register_structure_hook(bool, _expect(bool, "true or false"))
converter.register_structure_hook(float, _number)
converter.register_structure_hook(int, _expect(int, "an integer"))
converter.register_structure_hook_factory(_is_object, _strict_object)
converter.register_structure_hook_factory(_is_record, _strict_record)
converter.register_structure_hook_factory(_is_sequence, _strict_sequence)
_capability_fields = cattrs.gen.make_dict_structure_fn(Capability, converter)
converter.register_structure_hook(Capability, _capability)


# JSON values pass through as they are: no copy of params or data on every frame.
def _is_json_value(t: Any) -> bool:
    return bool(t is Any or (get_origin(t) is dict and get_args(t)[1:] == (Any,)))


converter.register_unstructure_hook_func(_is_json_value, lambda v: v)
converter.register_structure_hook(ErrorCode, lambda v, _: ErrorCode(v))
converter.register_unstructure_hook(ErrorCode, lambda v: v.value)


# Fields added since version 1 are left out while they hold their default, in both
# directions: a frame that does not use them is byte for byte what it was before they
# existed, so that peers that decode strictly (older hubs, and SDKs such as this one)
# keep working. So a frame without trace context has no trace fields, rather than nulls.
def _omit_defaults(cls: type[Any], *names: str) -> None:
    omit: Any = cattrs.gen.override(omit_if_default=True)
    fn = cattrs.gen.make_dict_unstructure_fn(cls, converter, **dict.fromkeys(names, omit))
    converter.register_unstructure_hook(cls, fn)


for _cls in (Progress, TaskAssignment, TaskOutcome):
    _omit_defaults(_cls, "traceparent", "tracestate")
del _cls
_omit_defaults(Delegate, "traceparent", "tracestate", "priority")
_omit_defaults(Capability, "max_concurrency")
_omit_defaults(Register, "tags", "max_concurrency")
_omit_defaults(Discover, "online", "tags")
_omit_defaults(AgentInfo, "hidden", "tags", "max_concurrency", "match", "hub")
_omit_defaults(TaskInfo, "priority", "queue_position")


# ---------------------------------------------------------------------------------------
# The codec

_ENVELOPE_KEYS: Final = frozenset(
    {"type", "id", "from", "to", "timestamp", "payload", "in_reply_to"}
)


def encode(envelope: Envelope) -> str:
    """Serialise one envelope to the text of one frame."""
    return encode_fields(
        envelope.type,
        envelope.id,
        envelope.payload,
        sender=envelope.sender,
        to=envelope.to,
        timestamp=envelope.timestamp,
        in_reply_to=envelope.in_reply_to,
    )


def encode_fields(
    type_: MessageType,
    msg_id: str,
    payload: Any,
    sender: str | None,
    to: str | None,
    timestamp: float | None,
    in_reply_to: str | None,
) -> str:
    """`encode` for an envelope given field by field: the hub's way, on its hot path, to
    write a frame without building an `Envelope` to take apart at once. The payload may
    be a record, or a dict ready for JSON (see `task_payload` and the like). The hub
    passes the fields by position (keywords cost a little more per call)."""
    # `encode_utf8`'s body again rather than a call to it: this runs for every frame the
    # hub writes, and the extra call with its keywords cost about 1k instructions.
    cls = type(payload)
    if cls is dict:
        body = payload
    else:
        unstructure = _UNSTRUCTURE.get(cls)
        if unstructure is None:
            unstructure = _UNSTRUCTURE[cls] = converter.get_unstructure_hook(cls)
        body = unstructure(payload)
    frame = {
        "type": type_,  # orjson writes an enum member as its value
        "id": msg_id,
        "from": sender,
        "to": to,
        "timestamp": timestamp,
        "payload": body,
    }
    if in_reply_to is not None:
        frame["in_reply_to"] = in_reply_to
    return orjson.dumps(frame).decode()


def encode_utf8(
    type_: MessageType,
    msg_id: str,
    payload: Any,
    *,
    sender: str | None,
    to: str | None,
    timestamp: float | None,
    in_reply_to: str | None,
) -> bytes:
    """`encode_fields`, as the UTF-8 bytes of the text (what a WebSocket sends)."""
    cls = type(payload)
    unstructure = _UNSTRUCTURE.get(cls)
    if unstructure is None:
        unstructure = _UNSTRUCTURE[cls] = converter.get_unstructure_hook(cls)
    frame = {
        "type": type_,  # orjson writes an enum member as its value
        "id": msg_id,
        "from": sender,
        "to": to,
        "timestamp": timestamp,
        "payload": unstructure(payload),
    }
    if in_reply_to is not None:
        frame["in_reply_to"] = in_reply_to
    return orjson.dumps(frame)


def _traced(payload: dict[str, Any], record: Any) -> dict[str, Any]:
    """`payload` with the record's trace context, if it has any (left out if not)."""
    if record.traceparent is not None:
        payload["traceparent"] = record.traceparent
    if record.tracestate is not None:
        payload["tracestate"] = record.tracestate
    return payload


# The payloads of a delegation's five frames, written by hand: the same dicts as the
# converter's (tests/test_sdk.py checks it), without its per-field calls.
def _plain_delegate(d: Delegate) -> dict[str, Any]:
    payload = _traced({"capability": d.capability, "params": d.params, "ttl": d.ttl}, d)
    if d.priority:  # left out at 0, as the converter does
        payload["priority"] = d.priority
    return payload


def _plain_result(r: Result) -> dict[str, Any]:
    return {"task_id": r.task_id, "success": r.success, "data": r.data, "error": r.error}


def _plain_delegated(d: Delegated) -> dict[str, Any]:
    return delegated_payload(d.task_id, d.agent_id, d.state)


def _plain_task(t: TaskAssignment) -> dict[str, Any]:
    return task_payload(t.task_id, t.capability, t.params, t.ttl, t.traceparent, t.tracestate)


def _plain_outcome(o: TaskOutcome) -> dict[str, Any]:
    return outcome_payload(
        o.task_id, o.state, o.success, o.data, o.error, o.traceparent, o.tracestate
    )


# The payloads of the three frames the hub writes per delegation, from their fields: the
# hub passes these dicts to `encode_fields` instead of a record. Building the frozen
# record only to take it apart at once cost about as much as encoding the frame (attrs'
# frozen `__init__` makes a call per field: ~9k instructions for a `TaskAssignment`).
# Each equals `converter.unstructure` of its record, keys in the same order
# (tests/test_sdk.py checks it).


def delegated_payload(task_id: str, agent_id: str, state: str) -> dict[str, Any]:
    """A `Delegated`'s payload: the reply to a delegate."""
    return {"task_id": task_id, "agent_id": agent_id, "state": state}


def task_payload(
    task_id: str,
    capability: str,
    params: dict[str, Any],
    ttl: float,
    traceparent: str | None,
    tracestate: str | None,
) -> dict[str, Any]:
    """A `TaskAssignment`'s payload: a task for its agent (no trace fields when None)."""
    payload = {"task_id": task_id, "capability": capability, "params": params, "ttl": ttl}
    if traceparent is not None:
        payload["traceparent"] = traceparent
    if tracestate is not None:
        payload["tracestate"] = tracestate
    return payload


def outcome_payload(
    task_id: str,
    state: str,
    success: bool,
    data: Any,
    error: str | None,
    traceparent: str | None,
    tracestate: str | None,
) -> dict[str, Any]:
    """A `TaskOutcome`'s payload: how a task ended (no trace fields when None)."""
    payload = {"task_id": task_id, "state": state, "success": success, "data": data, "error": error}
    if traceparent is not None:
        payload["traceparent"] = traceparent
    if tracestate is not None:
        payload["tracestate"] = tracestate
    return payload


# The converter's hooks by payload class, looked up once: its own dispatch costs more
# than the hook itself for these small records.
# A dict payload (an `Event` the router builds by hand) is JSON-ready as it is.
_UNSTRUCTURE: dict[type[Any], Callable[[Any], Any]] = {
    dict: lambda payload: payload,
    Delegate: _plain_delegate,
    Result: _plain_result,
    Delegated: _plain_delegated,
    TaskAssignment: _plain_task,
    TaskOutcome: _plain_outcome,
}
_STRUCTURE: dict[type[Any], Callable[[Any, Any], Any]] = {}
_TYPES: Final = {t.value: t for t in MessageType}
_OPTIONAL_STR: Final = (str, type(None))
_TIMESTAMP: Final = (float, int, type(None))


def decode_from_client(frame: str | bytes) -> Envelope:
    """Parse a frame a client sent to the hub. Raises `ProtocolError` if it is bad."""
    raw, type_, msg_id = _parse(frame)
    hot = _HOT_REQUESTS.get(type_)
    if hot is not None and raw.get("in_reply_to") is None:
        envelope = _hot_envelope(raw, hot, msg_id, frame)
        if envelope is not None:
            return envelope
    cls = REQUESTS.get(type_)  # type: ignore[call-overload]
    if cls is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown message type {type_!r}; a client may send: "
            + ", ".join(t.value for t in REQUESTS),
            in_reply_to=msg_id,
        )
    return _envelope(raw, _TYPES[type_], msg_id, cls, frame)  # type: ignore[arg-type]


def decode_from_hub(frame: str | bytes) -> Envelope:
    """Parse a frame the hub sent to a client. Raises `ProtocolError` if it is bad."""
    raw, type_, msg_id = _parse(frame)
    hot = (_HOT_EVENTS if raw.get("in_reply_to") is None else _HOT_REPLIES).get(type_)
    if hot is not None:
        envelope = _hot_envelope(raw, hot, msg_id, frame)
        if envelope is not None:
            return envelope
    return _hub_envelope(raw, type_, msg_id, frame)


def _hub_envelope(raw: dict[str, Any], type_: str, msg_id: str, frame: str | bytes) -> Envelope:
    """`decode_from_hub` the general way, with the converter."""
    replying = raw.get("in_reply_to") is not None
    table = REPLIES if replying else EVENTS
    cls = table.get(type_)  # type: ignore[call-overload]
    if cls is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE, f"unexpected message type {type_!r}", in_reply_to=msg_id
        )
    body = raw.get("payload")
    if cls is TaskInfo and table is REPLIES and not (type(body) is dict and "task_id" in body):
        cls = HubSummary
    return _envelope(raw, _TYPES[type_], msg_id, cls, frame)  # type: ignore[arg-type]


def _parse(frame: str | bytes) -> tuple[dict[str, Any], str, str]:
    if not isinstance(frame, str):
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, "binary frames are not accepted; send JSON text frames"
        )
    try:
        raw = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, f"frame is not valid JSON: {exc}") from None
    if type(raw) is not dict:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, f"frame must be a JSON object, got {_json_type(raw)}"
        )
    # The slow checks run only on frames that may need them, as their shape tells: a
    # frame cannot nest deeper than it has brackets, nor hold an integer beyond 64 bits
    # without a run of 20 digits (or of "-" and 19).
    shape = frame.encode().translate(_SHAPE)
    if shape.count(b"[") > MAX_DEPTH and _too_deep(raw, MAX_DEPTH):
        problem = f"frame nests objects and arrays deeper than {MAX_DEPTH} levels"
    elif _LONG_DIGITS in shape and (huge := _huge_integer(frame)) is not None:
        path, digits = huge
        shown = digits if len(digits) <= 40 else f"{digits[:20]}... ({len(digits)} digits)"
        problem = (
            f"{path}: integer {shown} does not fit in 64 bits (it must lie from "
            f"{_INTEGERS.start} to {_INTEGERS.stop - 1}); send it as a string"
        )
    else:
        problem = None
    msg_id = raw.get("id")
    if problem is not None:
        in_reply_to = msg_id if type(msg_id) is str else None
        raise ProtocolError(ErrorCode.INVALID_MESSAGE, problem, in_reply_to=in_reply_to)
    if type(msg_id) is not str or not msg_id:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, "$.id: every frame needs a non-empty string id"
        )
    type_ = raw.get("type")
    if type(type_) is not str:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, "$.type: expected a string", in_reply_to=msg_id
        )
    if not _ENVELOPE_KEYS.issuperset(raw):  # no set is made for a frame that is fine
        extra = raw.keys() - _ENVELOPE_KEYS
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"$: unknown envelope field(s) {', '.join(sorted(extra))}",
            in_reply_to=msg_id,
        )
    return raw, type_, msg_id


# A frame's shape, by `bytes.translate` (one pass in C): digits and "-" become "0", the
# brackets that open a container "[", every other byte a space.
_SHAPE: Final = bytes(
    ord("0") if chr(b) in "-0123456789" else ord("[") if chr(b) in "[{" else ord(" ")
    for b in range(256)
)
_INTEGERS: Final = range(-(1 << 63), 1 << 64)  # the integers orjson reads exactly
# Beyond them an integer has 20 digits (2**64), or a "-" and 19 (-2**63 - 1); a 19-digit
# one (a 64-bit ID) does not make a frame go the slow way.
_LONG_DIGITS: Final = b"0" * 20


def _huge_integer(frame: str) -> tuple[str, str] | None:
    """The JSON path and the digits of an integer in `frame` beyond 64 bits (orjson reads
    it as a float, rounded), if there is one. Slow, for the frames whose shape calls for
    it: the json module reads every integer exactly, then orjson, writing them, finds in C
    whether one is beyond 64 bits; only then is the frame walked, for its path."""
    try:
        value = json.loads(frame)
        orjson.dumps(value)
    except orjson.JSONEncodeError:  # "Integer exceeds 64-bit range"
        return _first_huge(value)
    except ValueError:  # pragma: no cover (orjson read it: so does json)
        pass
    return None


def _first_huge(value: dict[str, Any]) -> tuple[str, str] | None:
    """Where `value` holds an integer beyond 64 bits, and its digits. A path is made for
    each container, not for each value."""
    stack: list[tuple[dict[str, Any] | list[Any], str]] = [(value, "$")]
    while stack:
        container, path = stack.pop()
        items = container.items() if type(container) is dict else enumerate(container)
        for key, item in items:
            kind = type(item)
            if kind is int:
                if item not in _INTEGERS:
                    return _step(path, key), str(item)
            elif kind is dict or kind is list:
                stack.append((item, _step(path, key)))
    return None


def _step(path: str, key: str | int) -> str:
    """The JSON path of a member (`key` a string) or an element (an index) at `path`."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if key.isidentifier() else f"{path}[{key!r}]"


def _too_deep(value: dict[str, Any], limit: int) -> bool:
    """Whether containers nest deeper than `limit`. Costs one step per object or array,
    so a typical frame takes a handful; values are never re-encoded to find out."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        container, depth = stack.pop()
        children = container.values() if type(container) is dict else container
        for child in children:
            if type(child) is dict or type(child) is list:
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False


def _envelope(
    raw: dict[str, Any], type_: MessageType, msg_id: str, cls: type[T], frame: str
) -> Envelope:
    sender, to, in_reply_to = raw.get("from"), raw.get("to"), raw.get("in_reply_to")
    if (
        type(sender) not in _OPTIONAL_STR
        or type(to) not in _OPTIONAL_STR
        or type(in_reply_to) not in _OPTIONAL_STR
    ):
        for key, value in (("from", sender), ("to", to), ("in_reply_to", in_reply_to)):
            if type(value) not in _OPTIONAL_STR:
                raise ProtocolError(
                    ErrorCode.INVALID_MESSAGE,
                    f"$.{key}: expected a string or null, got {_json_type(value)}",
                    in_reply_to=msg_id,
                )
    timestamp = raw.get("timestamp")
    if type(timestamp) not in _TIMESTAMP:  # the hub ignores it: any string, not kept
        if type(timestamp) is not str:
            raise ProtocolError(
                ErrorCode.INVALID_MESSAGE,
                f"$.timestamp: expected a number, a string or null, got {_json_type(timestamp)}",
                in_reply_to=msg_id,
            )
        timestamp = None
    body = raw.get("payload")
    if body is None:
        body = {}
    if type(body) is not dict:
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE,
            f"$.payload: expected an object, got {_json_type(body)}",
            in_reply_to=msg_id,
        )
    structure = _STRUCTURE.get(cls)
    if structure is None:
        structure = _STRUCTURE[cls] = converter.get_structure_hook(cls)
    try:
        payload = structure(body, cls)
    except Exception as exc:
        errors = cattrs.transform_error(exc, path="$.payload", format_exception=_explain)
        raise ProtocolError(
            ErrorCode.INVALID_MESSAGE, "; ".join(errors), in_reply_to=msg_id
        ) from None
    return Envelope(
        type=type_,
        id=msg_id,
        payload=payload,
        sender=sender,
        to=to,
        timestamp=timestamp,
        in_reply_to=in_reply_to,
        size=len(frame),
    )


# ---------------------------------------------------------------------------------------
# The hot frames, decoded without the converter
#
# A delegation is five frames: delegate and result from clients, the delegate's reply,
# the task and the outcome from the hub. Each has a function here that reads the usual
# form of its payload (the fields of their exact JSON types, no others) straight into its
# record, and answers None for anything else: the converter then decides, and words the
# error if there is one. So a frame decodes to the same thing either way
# (tests/test_sdk.py checks it), only faster the usual way.

_TRACE_KEYS: Final = frozenset({"traceparent", "tracestate"})


def _finite(value: Any) -> TypeGuard[float]:
    """A JSON number (not a boolean) that is finite."""
    kind = type(value)
    return (kind is float or kind is int) and value - value == 0


def _hot_delegate(body: dict[str, Any]) -> Delegate | None:
    capability = body.get("capability")
    params = body.get("params", _NO_PARAMS)
    ttl = body.get("ttl")
    traceparent, tracestate = body.get("traceparent"), body.get("tracestate")
    priority = body.get("priority", 0)
    if (
        type(capability) is not str
        or (params is not _NO_PARAMS and type(params) is not dict)
        or (ttl is not None and not _finite(ttl))
        or type(traceparent) not in _OPTIONAL_STR
        or type(tracestate) not in _OPTIONAL_STR
        or type(priority) is not int
        or not _DELEGATE_KEYS.issuperset(body)
    ):
        return None
    return Delegate(
        capability,
        {} if params is _NO_PARAMS else params,
        None if ttl is None else float(ttl),
        traceparent,
        tracestate,
        priority,
    )


def _hot_result(body: dict[str, Any]) -> Result | None:
    task_id, success, error = body.get("task_id"), body.get("success"), body.get("error")
    if (
        type(task_id) is not str
        or type(success) is not bool
        or type(error) not in _OPTIONAL_STR
        or not _RESULT_KEYS.issuperset(body)
    ):
        return None
    return Result(task_id, success, body.get("data"), error)


def _hot_heartbeat(body: dict[str, Any]) -> Heartbeat | None:
    return None if body else _HEARTBEAT


def _hot_delegated(body: dict[str, Any]) -> Delegated | None:
    task_id, agent_id, state = body.get("task_id"), body.get("agent_id"), body.get("state")
    if (
        type(task_id) is not str
        or type(agent_id) is not str
        or type(state) is not str
        or len(body) != 3
    ):
        return None
    return Delegated(task_id, agent_id, state)


def _hot_task(body: dict[str, Any]) -> TaskAssignment | None:
    task_id, capability = body.get("task_id"), body.get("capability")
    params, ttl = body.get("params"), body.get("ttl")
    traceparent, tracestate = body.get("traceparent"), body.get("tracestate")
    if (
        type(task_id) is not str
        or type(capability) is not str
        or type(params) is not dict
        or not _finite(ttl)
        or type(traceparent) not in _OPTIONAL_STR
        or type(tracestate) not in _OPTIONAL_STR
        or (len(body) != 4 and not _TASK_KEYS.issuperset(body))
    ):
        return None
    return TaskAssignment(task_id, capability, params, float(ttl), traceparent, tracestate)


def _hot_outcome(body: dict[str, Any]) -> TaskOutcome | None:
    task_id, state, success = body.get("task_id"), body.get("state"), body.get("success")
    error = body.get("error")
    traceparent, tracestate = body.get("traceparent"), body.get("tracestate")
    if (
        type(task_id) is not str
        or type(state) is not str
        or type(success) is not bool
        or type(error) not in _OPTIONAL_STR
        or type(traceparent) not in _OPTIONAL_STR
        or type(tracestate) not in _OPTIONAL_STR
        or not _OUTCOME_KEYS.issuperset(body)
    ):
        return None
    return TaskOutcome(task_id, state, success, body.get("data"), error, traceparent, tracestate)


def _keys(cls: type[Any]) -> frozenset[str]:
    return frozenset(field.name for field in attrs.fields(cls))


_NO_PARAMS: Final[dict[str, Any]] = {}  # a marker: never handed out
_HEARTBEAT: Final = Heartbeat()
_DELEGATE_KEYS: Final = _keys(Delegate)
_RESULT_KEYS: Final = _keys(Result)
_TASK_KEYS: Final = _keys(TaskAssignment)
_OUTCOME_KEYS: Final = _keys(TaskOutcome)

_Hot = tuple[MessageType, Callable[[dict[str, Any]], Any]]
_HOT_REQUESTS: Final[dict[str, _Hot]] = {
    MessageType.DELEGATE.value: (MessageType.DELEGATE, _hot_delegate),
    MessageType.RESULT.value: (MessageType.RESULT, _hot_result),
    MessageType.HEARTBEAT.value: (MessageType.HEARTBEAT, _hot_heartbeat),
}
_HOT_REPLIES: Final[dict[str, _Hot]] = {
    MessageType.DELEGATE.value: (MessageType.DELEGATE, _hot_delegated),
}
_HOT_EVENTS: Final[dict[str, _Hot]] = {
    MessageType.DELEGATE.value: (MessageType.DELEGATE, _hot_task),
    MessageType.RESULT.value: (MessageType.RESULT, _hot_outcome),
}


def _hot_payload(raw: dict[str, Any], hot: _Hot) -> Any:
    """The payload record of a hot frame in its usual form (see above), or None."""
    if (
        type(raw.get("from")) not in _OPTIONAL_STR
        or type(raw.get("to")) not in _OPTIONAL_STR
        or type(raw.get("in_reply_to")) not in _OPTIONAL_STR
        or type(raw.get("timestamp")) not in _TIMESTAMP
    ):
        return None
    body = raw.get("payload")
    return hot[1](body) if type(body) is dict else None


def _hot_envelope(
    raw: dict[str, Any], hot: _Hot, msg_id: str, frame: str | bytes
) -> Envelope | None:
    """The envelope of a hot frame in its usual form, or None."""
    payload = _hot_payload(raw, hot)
    if payload is None:
        return None
    get = raw.get
    return Envelope(
        hot[0],
        msg_id,
        payload,
        get("from"),
        get("to"),
        get("timestamp"),
        get("in_reply_to"),
        len(frame),
    )
