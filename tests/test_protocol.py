"""The wire codec: decoding client frames, round-tripping hub frames, strict errors."""

from __future__ import annotations

import re
from typing import Any

import attrs
import orjson
import pytest

from agentmesh.protocol import (
    EVENTS,
    PROTOCOL_VERSION,
    REPLIES,
    REQUESTS,
    AgentInfo,
    AgentList,
    Broadcast,
    BroadcastAck,
    Cancel,
    CancelAck,
    Capability,
    Delegate,
    Delegated,
    Deregister,
    Deregistered,
    Discover,
    Envelope,
    Error,
    ErrorCode,
    Event,
    Heartbeat,
    HeartbeatAck,
    HubSummary,
    ListTasks,
    MessageType,
    Progress,
    ProtocolError,
    Register,
    Registered,
    Result,
    Resume,
    Status,
    TaskAssignment,
    TaskInfo,
    TaskList,
    TaskOutcome,
    Unwatch,
    Unwatched,
    Watch,
    Watching,
    decode_from_client,
    decode_from_hub,
    encode,
    encode_fields,
    trace_problem,
)

M = MessageType
INVALID = ErrorCode.INVALID_MESSAGE
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACE: dict[str, Any] = {"traceparent": TRACEPARENT, "tracestate": "rojo=00f067aa0ba902b7"}
UNKNOWN_TYPE = ErrorCode.UNKNOWN_TYPE


def frame(type_: str = "heartbeat", payload: Any = None, msg_id: Any = "c1", **extra: Any) -> str:
    """A client frame as JSON text; `payload=None` leaves the payload out."""
    raw: dict[str, Any] = {"type": type_, "id": msg_id}
    if payload is not None:
        raw["payload"] = payload
    raw.update(extra)
    return orjson.dumps(raw).decode()


def names_path(message: str, path: str) -> bool:
    """True if `path` occurs in `message` as a whole path (not a prefix of a longer one)."""
    return re.search(re.escape(path) + r"(?=$|[:;\s])", message) is not None


# ---------------------------------------------------------------------------------------
# Client -> hub: every request type decodes.

REQUEST_CASES: dict[MessageType, tuple[dict[str, Any], Any]] = {
    M.REGISTER: (
        {
            "name": "reviewer",
            "description": "reviews code",
            "capabilities": [
                "echo",
                {"name": "code-review", "description": "d", "params_schema": {"type": "object"}},
            ],
            "metadata": {"lang": "py"},
            "resume": {"agent_id": "agt_1", "token": "tok"},
        },
        Register(
            name="reviewer",
            description="reviews code",
            capabilities=(
                Capability(name="echo"),
                Capability(name="code-review", description="d", params_schema={"type": "object"}),
            ),
            metadata={"lang": "py"},
            resume=Resume(agent_id="agt_1", token="tok"),
        ),
    ),
    M.DEREGISTER: ({}, Deregister()),
    M.DISCOVER: ({"capability": "review"}, Discover(capability="review")),
    M.DELEGATE: (
        {"capability": "echo", "params": {"text": "hi"}, "ttl": 30, **TRACE},
        Delegate(capability="echo", params={"text": "hi"}, ttl=30.0, **TRACE),
    ),
    M.RESULT: (
        {"task_id": "t1", "success": False, "data": [1, {"a": None}], "error": "boom"},
        Result(task_id="t1", success=False, data=[1, {"a": None}], error="boom"),
    ),
    M.STATUS: ({"task_id": "t1"}, Status(task_id="t1")),
    M.BROADCAST: (
        {"message": "hello", "data": {"k": 1}},
        Broadcast(message="hello", data={"k": 1}),
    ),
    M.HEARTBEAT: ({}, Heartbeat()),
    M.CANCEL: (
        {"task_id": "t1", "reason": "changed my mind"},
        Cancel(task_id="t1", reason="changed my mind"),
    ),
    M.PROGRESS: (
        {"task_id": "t1", "progress": 0.5, "message": "half", "data": "x", **TRACE},
        Progress(task_id="t1", progress=0.5, message="half", data="x", **TRACE),
    ),
    M.LIST_TASKS: ({"state": "failed", "limit": 5}, ListTasks(state="failed", limit=5)),
    M.WATCH: ({"kinds": ["task_state"]}, Watch(kinds=("task_state",))),
    M.UNWATCH: ({}, Unwatch()),
}


def test_request_cases_cover_every_request_type() -> None:
    assert set(REQUEST_CASES) == set(REQUESTS)


@pytest.mark.parametrize("type_", list(REQUEST_CASES), ids=lambda t: t.value)
def test_decode_every_request_type(type_: MessageType) -> None:
    payload, expected = REQUEST_CASES[type_]
    env = decode_from_client(frame(type_.value, payload, msg_id="m7"))
    assert env.type is type_
    assert env.id == "m7"
    assert type(env.payload) is REQUESTS[type_]
    assert env.payload == expected
    assert env.sender is None
    assert env.to is None
    assert env.timestamp is None
    assert env.in_reply_to is None


def test_decode_request_defaults() -> None:
    env = decode_from_client(frame("register", {"name": "bare"}))
    assert env.payload == Register(name="bare")
    assert env.payload.capabilities == ()
    assert env.payload.metadata == {}
    assert env.payload.resume is None

    env = decode_from_client(frame("delegate", {"capability": "echo"}))
    assert env.payload == Delegate(capability="echo", params={}, ttl=None)
    assert (env.payload.traceparent, env.payload.tracestate) == (None, None)


@pytest.mark.parametrize(
    "raw",
    [
        '{"type": "status", "id": "c1"}',
        '{"type": "status", "id": "c1", "payload": null}',
        '{"type": "status", "id": "c1", "payload": {}}',
    ],
    ids=["absent", "null", "empty"],
)
def test_absent_null_or_empty_payload_is_an_empty_object(raw: str) -> None:
    assert decode_from_client(raw).payload == Status(task_id=None)


def test_envelope_fields_from_wire() -> None:
    env = decode_from_client(
        frame(
            "status",
            {},
            msg_id="c9",
            to="agt_2",
            timestamp=1.5,
            in_reply_to="h3",
            **{"from": "agt_1"},
        )
    )
    assert env.sender == "agt_1"
    assert env.to == "agt_2"
    assert env.timestamp == 1.5
    assert env.in_reply_to == "h3"


def test_ttl_integer_becomes_float() -> None:
    env = decode_from_client(frame("delegate", {"capability": "echo", "ttl": 5}))
    assert env.payload.ttl == 5.0
    assert type(env.payload.ttl) is float


def test_capability_string_shorthand_is_accepted() -> None:
    env = decode_from_client(frame("register", {"name": "n", "capabilities": ["echo"]}))
    assert env.payload.capabilities == (
        Capability(name="echo", description="", params_schema=None),
    )


# ---------------------------------------------------------------------------------------
# Hub -> client: every payload class round-trips through encode() and decode_from_hub().

CAPS = (
    Capability(name="echo"),
    Capability(name="code-review", description="d", params_schema={"type": "object"}),
)
TASK_INFO = TaskInfo(
    task_id="t1",
    state="completed",
    capability="echo",
    requester="agt_1",
    assignee="agt_2",
    created_at=1700000000.25,
    updated_at=1700000001.5,
    ttl=30.0,
    success=True,
    data={"out": [1, 2]},
    error=None,
)
HUB_SUMMARY = HubSummary(
    agents=3,
    online=2,
    tasks={"pending": 1, "completed": 4},
    uptime=12.5,
    counters={"frames_in": 10},
    version="1.2.3",
)

# (type, payload, in_reply_to): in_reply_to set means a reply, None an event.
HUB_CASES: list[tuple[MessageType, Any, str | None]] = [
    # Replies
    (
        M.REGISTER,
        Registered(agent_id="agt_1", resume_token="tok", heartbeat_interval=15.0, resumed=True),
        "c1",
    ),
    (M.DEREGISTER, Deregistered(agent_id="agt_1"), "c1"),
    (
        M.DISCOVER,
        AgentList(
            agents=(
                AgentInfo(agent_id="agt_1", name="a", description="x", capabilities=CAPS),
                AgentInfo(
                    agent_id="agt_2", name="b", description="", capabilities=(), online=False
                ),
            )
        ),
        "c1",
    ),
    (M.DELEGATE, Delegated(task_id="t1", agent_id="agt_2", state="in_progress"), "c1"),
    (M.STATUS, TASK_INFO, "c1"),
    (M.STATUS, HUB_SUMMARY, "c1"),
    (M.BROADCAST, BroadcastAck(recipients=4), "c1"),
    (M.HEARTBEAT_ACK, HeartbeatAck(), "c1"),
    (M.CANCEL, CancelAck(task_id="t1", state="cancelled"), "c1"),
    (M.LIST_TASKS, TaskList(tasks=(TASK_INFO,)), "c1"),
    (M.WATCH, Watching(kinds=("agent_registered", "task_state")), "c1"),
    (M.UNWATCH, Unwatched(), "c1"),
    (
        M.ERROR,
        Error(code=ErrorCode.FORBIDDEN, message="not yours", details={"task_id": "t1"}),
        "c1",
    ),
    # Events
    (
        M.DELEGATE,
        TaskAssignment(task_id="t1", capability="echo", params={"text": "hi"}, ttl=29.5),
        None,
    ),
    (
        M.RESULT,
        TaskOutcome(task_id="t1", state="failed", success=False, data=None, error="boom"),
        None,
    ),
    (M.STATUS, TASK_INFO, None),
    (M.BROADCAST, Broadcast(message="hello", data=[1, "two"]), None),
    (
        M.DELEGATE,
        TaskAssignment(task_id="t1", capability="echo", params={}, ttl=1.0, **TRACE),
        None,
    ),
    (
        M.RESULT,
        TaskOutcome(task_id="t1", state="completed", success=True, traceparent=TRACEPARENT),
        None,
    ),
    (M.CANCEL, Cancel(task_id="t1", reason="timeout"), None),
    (M.PROGRESS, Progress(task_id="t1", progress=0.25, message="quarter", data={"n": 1}), None),
    (M.PROGRESS, Progress(task_id="t1", progress=1.0, **TRACE), None),
    (
        M.EVENT,
        Event(kind="task_state", seq=7, time=1700000002.0, task=TASK_INFO, duration=0.5),
        None,
    ),
    (
        M.EVENT,
        Event(
            kind="agent_left",
            seq=8,
            time=1700000003.0,
            missed=2,
            agent=AgentInfo(agent_id="agt_1", name="a", description="", capabilities=CAPS),
            reason="deregistered",
        ),
        None,
    ),
    (M.ERROR, Error(code=ErrorCode.INTERNAL, message="oops"), None),
]


def _hub_case_id(case: tuple[MessageType, Any, str | None]) -> str:
    type_, payload, in_reply_to = case
    kind = "reply" if in_reply_to else "event"
    return f"{kind}-{type_.value}-{type(payload).__name__}"


def test_hub_cases_cover_every_reply_and_event_class() -> None:
    replies = {(t, type(p)) for t, p, r in HUB_CASES if r is not None}
    events = {(t, type(p)) for t, p, r in HUB_CASES if r is None}
    assert replies == set(REPLIES.items()) | {(M.STATUS, HubSummary)}
    assert events == set(EVENTS.items())


@pytest.mark.parametrize("case", HUB_CASES, ids=_hub_case_id)
def test_hub_frame_round_trip(case: tuple[MessageType, Any, str | None]) -> None:
    type_, payload, in_reply_to = case
    env = Envelope(
        type=type_,
        id="h42",
        payload=payload,
        sender="agt_9",
        to="agt_1",
        timestamp=1700000000.5,
        in_reply_to=in_reply_to,
    )
    decoded = decode_from_hub(encode(env))
    assert decoded == env
    assert type(decoded.payload) is type(payload)


@pytest.mark.parametrize(
    "payload",
    [
        Delegate(capability="echo"),
        TaskAssignment(task_id="t1", capability="echo", params={}, ttl=1.0),
        TaskOutcome(task_id="t1", state="completed", success=True),
        Progress(task_id="t1"),
    ],
    ids=lambda payload: type(payload).__name__,
)
def test_no_trace_context_is_no_trace_fields_on_the_wire(payload: Any) -> None:
    """A frame without trace context is what it was before the fields existed (a client
    that refuses unknown fields reads it), and with one it has them."""
    wire = orjson.loads(encode(Envelope(type=M.DELEGATE, id="h1", payload=payload)))["payload"]
    assert "traceparent" not in wire
    assert "tracestate" not in wire
    traced = attrs.evolve(payload, **TRACE)
    wire = orjson.loads(encode(Envelope(type=M.DELEGATE, id="h1", payload=traced)))["payload"]
    assert {k: wire[k] for k in TRACE} == TRACE


@pytest.mark.parametrize(
    ("traceparent", "tracestate", "problem"),
    [
        (TRACEPARENT, None, None),
        (TRACEPARENT, "", None),
        (TRACEPARENT, "a=1,b=2", None),
        ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", None, None),
        (None, None, None),
        ("", None, "$.payload.traceparent: must be a W3C traceparent"),
        (TRACEPARENT[:-1], None, "$.payload.traceparent: must be a W3C traceparent"),
        ("ff" + TRACEPARENT[2:], None, "$.payload.traceparent: version ff"),
        (f"00-{'0' * 32}-00f067aa0ba902b7-01", None, "$.payload.traceparent: the trace ID"),
        (None, "a=1", "$.payload.tracestate: only allowed with a traceparent"),
        (TRACEPARENT, "x" * 513, "$.payload.tracestate: longer than 512 characters"),
        (TRACEPARENT, r"a=\x7f ~", None),  # a backslash is printable
        (TRACEPARENT, "a=\x7f", "$.payload.tracestate: must be printable ASCII"),
    ],
)
def test_trace_problem(
    traceparent: str | None, tracestate: str | None, problem: str | None
) -> None:
    found = trace_problem(traceparent, tracestate)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert found.startswith(problem), found


def test_encode_wire_shape_of_a_reply() -> None:
    env = Envelope(
        type=M.CANCEL,
        id="h1",
        payload=CancelAck(task_id="t1", state="cancelled"),
        sender="agt_2",
        in_reply_to="c5",
    )
    assert orjson.loads(encode(env)) == {
        "type": "cancel",
        "id": "h1",
        "from": "agt_2",
        "to": None,
        "timestamp": None,
        "payload": {"task_id": "t1", "state": "cancelled"},
        "in_reply_to": "c5",
    }


def test_encode_event_has_no_in_reply_to() -> None:
    env = Envelope(type=M.ERROR, id="h1", payload=Error(code=ErrorCode.TOO_LARGE, message="big"))
    wire = orjson.loads(encode(env))
    assert "in_reply_to" not in wire
    assert wire["payload"] == {"code": "too_large", "message": "big", "details": None}
    assert wire["from"] is None


def test_encode_sender_is_from_on_the_wire() -> None:
    env = Envelope(type=M.BROADCAST, id="h1", payload=Broadcast(message="hi"), sender="agt_7")
    wire = orjson.loads(encode(env))
    assert wire["from"] == "agt_7"
    assert "sender" not in wire
    assert decode_from_hub(encode(env)).sender == "agt_7"


def test_encode_nested_capabilities_as_objects() -> None:
    env = Envelope(
        type=M.DISCOVER,
        id="h1",
        payload=AgentList(
            agents=(AgentInfo(agent_id="a", name="n", description="", capabilities=CAPS),)
        ),
        in_reply_to="c1",
    )
    agent = orjson.loads(encode(env))["payload"]["agents"][0]
    assert agent["capabilities"] == [
        {"name": "echo", "description": "", "params_schema": None},
        {"name": "code-review", "description": "d", "params_schema": {"type": "object"}},
    ]
    assert agent["online"] is True


def test_registered_carries_protocol_version() -> None:
    env = Envelope(
        type=M.REGISTER,
        id="h1",
        payload=Registered(agent_id="a", resume_token="t", heartbeat_interval=10.0),
        in_reply_to="c1",
    )
    assert orjson.loads(encode(env))["payload"]["protocol"] == PROTOCOL_VERSION == 2
    assert orjson.loads(encode(env))["payload"]["resumed"] is False


def test_status_reply_without_task_id_is_a_hub_summary() -> None:
    env = Envelope(type=M.STATUS, id="h1", payload=HUB_SUMMARY, in_reply_to="c1")
    assert type(decode_from_hub(encode(env)).payload) is HubSummary
    env = Envelope(type=M.STATUS, id="h1", payload=TASK_INFO, in_reply_to="c1")
    assert type(decode_from_hub(encode(env)).payload) is TaskInfo


def test_status_event_is_always_a_task_info() -> None:
    # Without in_reply_to a summary is not a legal event: it is decoded as TaskInfo and fails.
    env = Envelope(type=M.STATUS, id="h1", payload=HUB_SUMMARY)
    with pytest.raises(ProtocolError) as info:
        decode_from_hub(encode(env))
    assert info.value.code is INVALID
    assert names_path(info.value.message, "$.payload.task_id")
    assert info.value.in_reply_to == "h1"


@pytest.mark.parametrize(
    ("raw", "in_reply_to"),
    [
        pytest.param(
            {"type": "heartbeat_ack", "id": "h1", "payload": {}}, None, id="heartbeat_ack-event"
        ),
        pytest.param({"type": "register", "id": "h1", "payload": {}}, None, id="register-event"),
        pytest.param({"type": "result", "id": "h1", "payload": {}}, "c1", id="result-reply"),
        pytest.param({"type": "progress", "id": "h1", "payload": {}}, "c1", id="progress-reply"),
        pytest.param({"type": "nonsense", "id": "h1", "payload": {}}, None, id="nonsense"),
    ],
)
def test_hub_frame_of_unexpected_type(raw: dict[str, Any], in_reply_to: str | None) -> None:
    if in_reply_to is not None:
        raw = {**raw, "in_reply_to": in_reply_to}
    with pytest.raises(ProtocolError) as info:
        decode_from_hub(orjson.dumps(raw).decode())
    assert info.value.code is UNKNOWN_TYPE
    assert info.value.in_reply_to == "h1"
    assert repr(raw["type"]) in info.value.message


def test_hub_error_frame_with_unknown_code() -> None:
    raw = {"type": "error", "id": "h1", "payload": {"code": "bogus", "message": "m"}}
    with pytest.raises(ProtocolError) as info:
        decode_from_hub(orjson.dumps(raw).decode())
    assert info.value.code is INVALID
    assert names_path(info.value.message, "$.payload.code")


# ---------------------------------------------------------------------------------------
# Bad client frames: exact code, the JSON path in the message, in_reply_to when readable.


def bad(
    case_id: str,
    raw: str | bytes,
    fragment: str,
    *,
    code: ErrorCode = INVALID,
    in_reply_to: str | None = "c1",
) -> Any:
    """One bad frame: the error must have `code`, name `fragment`, answer `in_reply_to`."""
    return pytest.param(raw, code, fragment, in_reply_to, id=case_id)


def delegate(**payload: Any) -> str:
    return frame("delegate", {"capability": "x", **payload})


def ttl_literal(literal: str) -> str:
    """A delegate frame whose ttl is `literal`, written into the JSON text as is."""
    return (
        '{"type": "delegate", "id": "c1", "payload": {"capability": "x", "ttl": ' + literal + "}}"
    )


def result(**payload: Any) -> str:
    return frame("result", {"task_id": "t", "success": True, **payload})


def register(**payload: Any) -> str:
    return frame("register", {"name": "n", **payload})


NO_ID: dict[str, Any] = {"in_reply_to": None}

BAD_FRAMES = [
    # The frame itself
    bad("binary-frame", b'{"type": "heartbeat", "id": "c1"}', "binary", **NO_ID),
    bad("not-json", "not json", "not valid JSON", **NO_ID),
    bad("empty-text", "", "not valid JSON", **NO_ID),
    bad("array", "[1, 2]", "must be a JSON object", **NO_ID),
    bad("string", '"heartbeat"', "must be a JSON object", **NO_ID),
    bad("null", "null", "must be a JSON object", **NO_ID),
    # NaN and Infinity are not JSON
    bad("nan", ttl_literal("NaN"), "not valid JSON", **NO_ID),
    bad("infinity", ttl_literal("Infinity"), "not valid JSON", **NO_ID),
    bad("-infinity", ttl_literal("-Infinity"), "not valid JSON", **NO_ID),
    bad("overflow", ttl_literal("1e400"), "not valid JSON", **NO_ID),
    # The envelope
    bad("missing-id", '{"type": "heartbeat"}', "$.id", **NO_ID),
    bad("empty-id", frame(msg_id=""), "$.id", **NO_ID),
    bad("number-id", frame(msg_id=7), "$.id", **NO_ID),
    bad("null-id", frame(msg_id=None), "$.id", **NO_ID),
    bad("missing-type", '{"id": "c1"}', "$.type"),
    bad("number-type", frame(type_=3), "$.type"),
    bad("array-type", frame(type_=["heartbeat"]), "$.type"),
    bad("unknown-envelope-field", frame(extra=1), "$"),
    bad("number-to", frame(to=5), "$.to"),
    bad("array-from", frame(**{"from": ["agt_1"]}), "$.from"),
    bad("bool-timestamp", frame(timestamp=True), "$.timestamp"),
    bad("number-in_reply_to", frame(in_reply_to=5), "$.in_reply_to"),
    bad("array-payload", frame(payload=[]), "$.payload"),
    bad("string-payload", frame(payload="x"), "$.payload"),
    bad("number-payload", frame(payload=0), "$.payload"),
    # Unknown types, including ones only the hub sends
    bad("unknown-type", frame(type_="teleport"), "'teleport'", code=UNKNOWN_TYPE),
    bad("empty-type", frame(type_=""), "''", code=UNKNOWN_TYPE),
    bad("hub-only-type", frame(type_="heartbeat_ack"), "'heartbeat_ack'", code=UNKNOWN_TYPE),
    bad("error-type", frame(type_="error"), "'error'", code=UNKNOWN_TYPE),
    bad("wrong-case-type", frame(type_="Heartbeat"), "'Heartbeat'", code=UNKNOWN_TYPE),
    # Payload fields: wrong JSON types are errors, never coercions
    bad("ttl-string", delegate(ttl="abc"), "$.payload.ttl"),
    bad("ttl-numeric-string", delegate(ttl="5"), "$.payload.ttl"),
    bad("ttl-bool", delegate(ttl=True), "$.payload.ttl"),
    bad("ttl-array", delegate(ttl=[5]), "$.payload.ttl"),
    bad("params-array", delegate(params=[1, 2]), "$.payload.params"),
    bad("params-string", delegate(params="a=1"), "$.payload.params"),
    bad("delegate-capability-number", frame("delegate", {"capability": 5}), "$.payload.capability"),
    bad("capability-missing", frame("delegate", {}), "$.payload.capability"),
    bad("success-int", result(success=1), "$.payload.success"),
    bad("success-zero", result(success=0), "$.payload.success"),
    bad("success-string", result(success="true"), "$.payload.success"),
    bad("success-missing", frame("result", {"task_id": "t"}), "$.payload.success"),
    bad("task_id-bool", result(task_id=True), "$.payload.task_id"),
    bad("error-number", result(error=0), "$.payload.error"),
    bad("status-task_id-number", frame("status", {"task_id": 5}), "$.payload.task_id"),
    bad(
        "progress-string",
        frame("progress", {"task_id": "t", "progress": "50%"}),
        "$.payload.progress",
    ),
    bad("broadcast-message", frame("broadcast", {"message": 1}), "$.payload.message"),
    bad("discover-null", frame("discover", {"capability": None}), "$.payload.capability"),
    bad("register-name-missing", frame("register", {}), "$.payload.name"),
    bad("metadata-array", register(metadata=[]), "$.payload.metadata"),
    bad("capabilities-string", register(capabilities="echo"), "$.payload.capabilities"),
    bad("capabilities-object", register(capabilities={"name": "echo"}), "$.payload.capabilities"),
    bad("capability-number", register(capabilities=["echo", 5]), "$.payload.capabilities[1]"),
    bad("capability-array", register(capabilities=[["echo"]]), "$.payload.capabilities[0]"),
    bad(
        "capability-name-number",
        register(capabilities=[{"name": 5}]),
        "$.payload.capabilities[0].name",
    ),
    bad(
        "capability-name-missing",
        register(capabilities=[{"description": "d"}]),
        "$.payload.capabilities[0].name",
    ),
    bad(
        "capability-schema-array",
        register(capabilities=[{"name": "x", "params_schema": []}]),
        "$.payload.capabilities[0].params_schema",
    ),
    bad(
        "resume-token-number",
        register(resume={"agent_id": "a", "token": 5}),
        "$.payload.resume.token",
    ),
    bad("resume-token-missing", register(resume={"agent_id": "a"}), "$.payload.resume.token"),
    bad("resume-string", register(resume="a"), "$.payload.resume"),
    # Unknown payload fields
    bad("heartbeat-extra", frame("heartbeat", {"beat": 1}), "$.payload"),
    bad("register-extra", register(zeta=1), "$.payload"),
    bad(
        "capability-extra",
        register(capabilities=[{"name": "x", "version": 2}]),
        "$.payload.capabilities[0]",
    ),
    bad(
        "resume-extra",
        register(resume={"agent_id": "a", "token": "t", "x": 1}),
        "$.payload.resume",
    ),
]


@pytest.mark.parametrize(("raw", "code", "fragment", "in_reply_to"), BAD_FRAMES)
def test_bad_client_frame(
    raw: str | bytes, code: ErrorCode, fragment: str, in_reply_to: str | None
) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_from_client(raw)
    error = info.value
    assert error.code is code
    assert error.in_reply_to == in_reply_to
    assert str(error) == error.message
    if fragment.startswith("$"):
        assert names_path(error.message, fragment), error.message
    else:
        assert fragment in error.message


def test_ttl_string_is_never_coerced() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_from_client(frame("delegate", {"capability": "x", "ttl": "abc"}))
    assert info.value.code is INVALID
    assert info.value.message == "expected a number, got a string @ $.payload.ttl"


def test_bool_is_not_a_number_and_int_is_not_a_bool() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_from_client(frame("delegate", {"capability": "x", "ttl": True}))
    assert info.value.message == "expected a number, got a boolean @ $.payload.ttl"
    with pytest.raises(ProtocolError) as info:
        decode_from_client(frame("result", {"task_id": "t", "success": 1}))
    assert info.value.message == "expected true or false, got a number @ $.payload.success"


def test_capabilities_string_is_not_split_into_characters() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_from_client(frame("register", {"name": "n", "capabilities": "echo"}))
    assert info.value.code is INVALID
    assert info.value.message == "expected an array, got a string @ $.payload.capabilities"


def test_unknown_type_message_lists_request_types() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_from_client(frame(type_="teleport", msg_id="m3"))
    assert info.value.code is UNKNOWN_TYPE
    assert info.value.in_reply_to == "m3"
    for type_ in REQUESTS:
        assert type_.value in info.value.message


def test_unknown_payload_fields_are_named() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_from_client(frame("register", {"name": "n", "zeta": 1, "alpha": 2}))
    assert info.value.code is INVALID
    assert info.value.message == "unknown field(s) alpha, zeta @ $.payload"


def test_unknown_envelope_fields_are_named() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_from_client(frame(sender="agt_1", ttl=3))
    assert info.value.message == "$: unknown envelope field(s) sender, ttl"


def test_missing_required_field_message() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_from_client(frame("cancel", {}))
    assert info.value.message == "required field missing @ $.payload.task_id"


def test_nested_path_error_message() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_from_client(
            frame("register", {"name": "n", "resume": {"agent_id": "a", "token": 5}})
        )
    assert info.value.message == "expected a string, got a number @ $.payload.resume.token"


def test_several_errors_are_all_reported() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_from_client(frame("result", {"task_id": 1, "success": "yes"}))
    assert names_path(info.value.message, "$.payload.task_id")
    assert names_path(info.value.message, "$.payload.success")


# ---------------------------------------------------------------------------------------
# Known bugs (see the reasons).


def test_resume_not_an_object_message() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_from_client(frame("register", {"name": "n", "resume": "a"}))
    assert info.value.message == "expected an object, got a string @ $.payload.resume"


@pytest.mark.parametrize(
    ("field", "value"),
    [("tasks", {"pending": "x"}), ("counters", {"frames_in": 1.5})],
)
def test_hub_summary_counts_must_be_integers(field: str, value: dict[str, Any]) -> None:
    payload = {"agents": 1, "online": 1, "tasks": {}, "uptime": 1.0, "counters": {}, "version": "1"}
    payload[field] = value
    raw = {"type": "status", "id": "h1", "in_reply_to": "c1", "payload": payload}
    with pytest.raises(ProtocolError) as info:
        decode_from_hub(orjson.dumps(raw).decode())
    assert info.value.code is INVALID
    assert f"$.payload.{field}" in info.value.message


def test_encode_fields_writes_what_encode_writes() -> None:
    cases: list[tuple[Any, str | None]] = [
        (TaskAssignment(task_id="task_1", capability="echo", params={"a": [1]}, ttl=3.0), None),
        (Delegated(task_id="task_1", agent_id="agt_b", state="in_progress"), "c7"),
    ]
    for payload, in_reply_to in cases:
        envelope = Envelope(
            type=MessageType.DELEGATE,
            id="h1",
            payload=payload,
            sender="agt_a",
            to="agt_b",
            timestamp=12.5,
            in_reply_to=in_reply_to,
        )
        fields = encode_fields(
            MessageType.DELEGATE,
            "h1",
            payload,
            sender="agt_a",
            to="agt_b",
            timestamp=12.5,
            in_reply_to=in_reply_to,
        )
        assert fields == encode(envelope)
        assert decode_from_hub(fields).payload == payload


# ---------------------------------------------------------------------------------------
# The envelope's timestamp: ignored by the hub, so any string passes (ISO 8601 above all)


@pytest.mark.parametrize(
    ("timestamp", "kept"),
    [
        pytest.param("2026-12-01T09:00:00.000Z", None, id="iso-8601-javascript"),
        pytest.param("2026-12-01T10:00:00+01:00", None, id="iso-8601-offset"),
        pytest.param("now", None, id="any-string"),
        pytest.param("", None, id="empty-string"),
        pytest.param(1795474652.0356936, 1795474652.0356936, id="unix-seconds"),
        pytest.param(1795474652035, 1795474652035, id="integer-milliseconds"),
        pytest.param(None, None, id="null"),
    ],
)
def test_timestamp_accepted(timestamp: Any, kept: float | None) -> None:
    env = decode_from_client(frame(timestamp=timestamp))
    assert env.timestamp == kept
    assert decode_from_hub(frame("heartbeat_ack", {}, in_reply_to="c0", timestamp=timestamp))


@pytest.mark.parametrize(
    ("timestamp", "what"),
    [
        pytest.param(True, "a boolean", id="bool"),
        pytest.param({"unix": 1}, "an object", id="object"),
        pytest.param([2026, 12, 1], "an array", id="array"),
    ],
)
def test_timestamp_refused(timestamp: Any, what: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_from_client(frame(timestamp=timestamp))
    assert info.value.code is INVALID
    assert info.value.in_reply_to == "c1"
    assert info.value.message == f"$.timestamp: expected a number, a string or null, got {what}"


def test_a_hub_frames_timestamp_is_still_a_float() -> None:
    text = encode_fields(
        M.HEARTBEAT_ACK,
        "h1",
        HeartbeatAck(),
        sender="hub",
        to=None,
        timestamp=1795474652.0356936,
        in_reply_to="c1",
    )
    env = decode_from_hub(text)
    assert type(env.timestamp) is float
    assert env.timestamp == 1795474652.0356936


# ---------------------------------------------------------------------------------------
# Integers beyond 64 bits: orjson would read them as rounded floats, so they are refused.


def params_literal(literal: str) -> str:
    """A delegate frame whose params hold `literal`, written into the JSON text as is."""
    return (
        '{"type": "delegate", "id": "c1", "payload": {"capability": "x", '
        '"params": {"values": [1, 2, ' + literal + "]}}}"
    )


@pytest.mark.parametrize(
    "literal",
    [
        pytest.param(str(2**63 - 1), id="int64-max"),
        pytest.param(str(-(2**63)), id="int64-min"),
        pytest.param(str(2**64 - 1), id="uint64-max"),
        pytest.param("1000000000000000000", id="19-digits"),
        pytest.param("0.12345678901234567890123", id="long-fraction"),
        pytest.param("12345678901234567890123e-5", id="long-mantissa-with-exponent"),
        pytest.param("123456789012345678901.5", id="long-float"),
        pytest.param('"12345678901234567890123456789"', id="digits-in-a-string"),
        pytest.param("1e300", id="large-float"),
    ],
)
def test_numbers_that_pass_as_they_are(literal: str) -> None:
    env = decode_from_client(params_literal(literal))
    assert env.payload.params["values"][2] == orjson.loads(literal)
    if "." not in literal and "e" not in literal and '"' not in literal:
        assert env.payload.params["values"][2] == int(literal)  # exact, not rounded


@pytest.mark.parametrize(
    ("literal", "shown"),
    [
        pytest.param(str(2**64), str(2**64), id="uint64-max-plus-1"),
        pytest.param(str(-(2**63) - 1), str(-(2**63) - 1), id="int64-min-minus-1"),
        pytest.param("1" + "0" * 29, "1" + "0" * 29, id="30-digits"),
        pytest.param("9" * 300, "9" * 20 + "... (300 digits)", id="300-digits"),
    ],
)
def test_integers_beyond_64_bits_are_refused(literal: str, shown: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_from_client(params_literal(literal))
    assert info.value.code is INVALID
    assert info.value.in_reply_to == "c1"
    assert info.value.message == (
        f"$.payload.params.values[2]: integer {shown} does not fit in 64 bits (it must lie "
        "from -9223372036854775808 to 18446744073709551615); send it as a string"
    )


def test_an_integer_beyond_64_bits_is_refused_anywhere_in_a_frame() -> None:
    cases = {
        '{"type": "heartbeat", "id": "c1", "timestamp": 99999999999999999999}': "$.timestamp",
        '{"type": "heartbeat", "id": "c1", "payload": {"odd key": 1e2, "n": '
        + str(2**70)
        + "}}": "$.payload.n",
        '{"type": "broadcast", "id": "c1", "payload": {"message": "m", "data": {"a b": ['
        + str(2**65)
        + "]}}}": "$.payload.data['a b'][0]",
    }
    for text, path in cases.items():
        with pytest.raises(ProtocolError) as info:
            decode_from_client(text)
        assert info.value.message.startswith(f"{path}: integer "), info.value.message


def test_a_number_too_large_for_a_float_is_not_json() -> None:
    for literal in ["1e400", "-1e400", "1" + "0" * 400]:
        with pytest.raises(ProtocolError) as info:
            decode_from_client(params_literal(literal))
        assert info.value.code is INVALID
        assert info.value.in_reply_to is None  # orjson refuses the text: no id to answer
        assert "number is infinity" in info.value.message


# ---------------------------------------------------------------------------------------
# Over a real hub


async def test_a_huge_integer_in_params_gets_a_clear_error_and_reaches_no_one(
    connect: Any,
) -> None:
    async with connect() as worker, connect() as requester:
        await worker.register("worker", "count")
        await requester.register("requester")
        await requester.ws.send_message(
            '{"type": "delegate", "id": "big", "payload": {"capability": "count", '
            '"params": {"n": 123456789012345678901234567890}}}'
        )
        error = await requester.expect("error")
        assert error["in_reply_to"] == "big"
        assert error["payload"]["code"] == "invalid_message"
        assert error["payload"]["message"].startswith(
            "$.payload.params.n: integer 123456789012345678901234567890 does not fit in 64 bits"
        )
        # The largest integer that fits reaches the assignee exactly, and first: the
        # refused one never reached it.
        await requester.ws.send_message(
            '{"type": "delegate", "id": "max", "payload": {"capability": "count", '
            '"params": {"n": 18446744073709551615}}}'
        )
        task = await worker.expect("delegate")
        assert task["payload"]["params"] == {"n": 2**64 - 1}


async def test_iso_timestamps_are_accepted_by_a_real_hub(connect: Any) -> None:
    iso = "2026-12-01T09:00:00.000Z"  # new Date().toISOString()
    async with connect() as client:
        reply = await client.request("register", {"name": "js-client"}, timestamp=iso)
        assert reply["type"] == "register", reply
        assert type(reply["timestamp"]) is float  # the hub's own: UNIX seconds
        reply = await client.request("heartbeat", timestamp=iso)
        assert reply["type"] == "heartbeat_ack", reply
        reply = await client.request("heartbeat", timestamp={"iso": iso})
        assert reply["payload"]["code"] == "invalid_message", reply
        assert "$.timestamp" in reply["payload"]["message"]
