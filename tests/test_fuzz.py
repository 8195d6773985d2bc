"""Fuzzing the wire protocol: the decoders, the pure Router, and a live hub.

One frame generator serves all three. It starts from a valid frame of every message type
(filled in with IDs the fuzzer has seen, so that many frames reach deep into the router)
and mutates it: drop a key, add a key, replace any value at any path with random JSON,
change a value's type, rename the type. Junk (random text, bytes, any JSON value, text
with a character flipped) is mixed in. The generator draws its choices from a `Chooser`:
Hypothesis drives it in the pure tests (so failures shrink), a seeded `random.Random` in
the live-hub test (a real socket inside a Hypothesis example would be slow).

The properties:

- decoding never raises anything but `ProtocolError` with an `ErrorCode`, whose
  `in_reply_to` is the frame's `id` whenever it could be read;
- the router never raises, answers each bad frame with exactly one `error` frame (never
  `internal`), each request with at most one reply, sends only frames that decode, never
  reports a task twice, and still serves a clean round trip afterwards;
- a live hub keeps the fuzzing connection open and other agents working.
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import attrs
import orjson
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio_websocket import ConnectionClosed

from agentmesh import Hub, HubConfig
from agentmesh.protocol import (
    EVENTS,
    REPLIES,
    REQUESTS,
    Envelope,
    ErrorCode,
    HubSummary,
    MessageType,
    ProtocolError,
    decode_from_client,
    decode_from_hub,
    encode,
)
from agentmesh.routing import Router

from .conftest import WAIT, RawClient

T = TypeVar("T")
CODES = {code.value for code in ErrorCode}
NO_REPLY_ON_SUCCESS = {"result", "progress"}  # hot-path frames: silent when accepted
CLIENT_TYPES = sorted(t.value for t in REQUESTS)
ALL_TYPES = sorted(t.value for t in MessageType)
ENVELOPE_KEYS = ["type", "id", "from", "to", "timestamp", "payload", "in_reply_to"]
FIELD_NAMES = sorted(
    set(ENVELOPE_KEYS)
    | {name for cls in REQUESTS.values() for name in attrs.fields_dict(cls)}
    | {"name", "description", "params_schema", "agent_id", "token", "state", "code"}
)
EDGE_VALUES: list[Any] = [
    "",
    " ",
    "\u00a0",
    0,
    -1,
    0.0,
    -0.0,
    1e-300,
    1e308,
    86_400,
    86_400.000001,
    2**63,
    2**64 - 1,  # the largest integer a frame may hold (past it: invalid_message)
    -(2**63),
    True,
    False,
    None,
    [],
    {},
    [None],
    {"": None},
    "agt_nobody",
    "task_nope",
    "hub",
    "x" * 300,
    "\u0000",
    "🦀",
]
REF = re.compile(r"@@([TARK])(\d+)@@")
SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------
# Where random choices come from


class Chooser(Protocol):
    def below(self, n: int) -> int:
        """A number in [0, n)."""

    def json(self) -> Any:
        """A random (shallow) JSON value."""

    def text(self) -> str:
        """A random short string."""

    def junk(self) -> str | bytes:
        """A frame that is probably not JSON at all."""


def pick(ch: Chooser, options: Sequence[T]) -> T:
    return options[ch.below(len(options))]


def flip(ch: Chooser) -> bool:
    return ch.below(2) == 0


# Hypothesis: everything shrinks. Integers go past 64 bits and strings include every
# code point (in the pure tests, lone surrogates too: a WebSocket cannot carry them).
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
    | st.sampled_from(EDGE_VALUES)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
any_text = st.text(st.characters(exclude_categories=()), max_size=200)
surrogate_text = st.text(
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF) | st.sampled_from('{}[]":,a1 '),
    min_size=1,
    max_size=40,
)
deep_nesting = st.builds(
    lambda n, opener, closed: (opener * n + ("1" if opener.endswith(":") else "")
                               + (("}" if opener.startswith("{") else "]") * n if closed else "")),
    st.integers(1, 5000),
    st.sampled_from(["[", '{"a":', '{"type":"heartbeat","id":"x","payload":']),
    st.booleans(),
)  # fmt: skip
junk_frames = (
    any_text | surrogate_text | deep_nesting | st.binary(max_size=200) | json_values.map(json.dumps)
)


class HypothesisChooser:
    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def below(self, n: int) -> int:
        return self.data.draw(st.integers(0, n - 1)) if n > 1 else 0

    def json(self) -> Any:
        # A copy: `sampled_from(EDGE_VALUES)` hands out the same [] and {} every time,
        # and a later mutation may write into them.
        return copy.deepcopy(self.data.draw(json_values))

    def text(self) -> str:
        return self.data.draw(st.text(max_size=12))

    def junk(self) -> str | bytes:
        return self.data.draw(junk_frames)


class RandomChooser:
    """The same choices from a seeded `random.Random`, for the live-hub test. No lone
    surrogates: a WebSocket text frame is UTF-8."""

    ALPHABET = "abcxyz _-.:/\\\"'{}[],0123456789é€😀\n\t\u0000\u202e"

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def below(self, n: int) -> int:
        return self.rng.randrange(n)

    def text(self) -> str:
        return "".join(self.rng.choice(self.ALPHABET) for _ in range(self.rng.randrange(12)))

    def json(self, depth: int = 0) -> Any:
        kind = self.rng.randrange(9 if depth < 3 else 6)
        if kind == 0:
            return None
        if kind == 1:
            return self.rng.random() < 0.5
        if kind == 2:
            return self.rng.choice([0, 1, -1, 7, 2**31, -(2**53), 2**64 - 1, -(2**63)])
        if kind == 3:
            return self.rng.choice([0.5, -2.25, 1e-9, 3.0e300, 86_400.5])
        if kind == 4:
            return self.text()
        if kind == 5:
            return copy.deepcopy(self.rng.choice(EDGE_VALUES))
        if kind in (6, 7):
            return [self.json(depth + 1) for _ in range(self.rng.randrange(4))]
        return {self.text(): self.json(depth + 1) for _ in range(self.rng.randrange(4))}

    def junk(self) -> str | bytes:
        kind = self.rng.randrange(4)
        if kind == 0:
            return self.text()
        if kind == 1:
            return bytes(self.rng.randrange(256) for _ in range(self.rng.randrange(40)))
        if kind == 2:
            n = self.rng.randrange(1, 3000)
            return "[" * n + "]" * self.rng.choice([n, n - 1, 0])
        return json.dumps(self.json())


# ---------------------------------------------------------------------------------------
# Valid frames, and how to break them


@attrs.define
class Knowledge:
    """IDs the fuzzer has seen, so that valid frames name real tasks and agents."""

    task_ids: list[str] = attrs.field(factory=lambda: ["task_nope"])
    agent_ids: list[str] = attrs.field(factory=lambda: ["agt_nobody"])
    tokens: list[tuple[str, str]] = attrs.field(factory=lambda: [("agt_nobody", "tok")])
    capabilities: list[str] = attrs.field(
        factory=lambda: ["echo", "work", " Echo ", "code-review", "review", "nope"]
    )

    # Frames name IDs by reference ("@@T3@@": the fourth task ID), filled in at the very
    # end, so that the random IDs never steer a mutation: Hypothesis replays an example
    # against a router that hands out other IDs, and it must draw the same way.
    def task(self, ch: Chooser) -> str:
        return f"@@T{ch.below(len(self.task_ids))}@@"

    def agent(self, ch: Chooser) -> str:
        return f"@@A{ch.below(len(self.agent_ids))}@@"

    def resume(self, ch: Chooser) -> dict[str, str]:
        i = ch.below(len(self.tokens))
        return {"agent_id": f"@@R{i}@@", "token": f"@@K{i}@@"}

    def fill(self, frame: str | bytes) -> str | bytes:
        if not isinstance(frame, str):
            return frame

        def real(ref: re.Match[str]) -> str:
            kind, i = ref[1], int(ref[2])
            known = {
                "T": self.task_ids,
                "A": self.agent_ids,
                "R": [agent_id for agent_id, _ in self.tokens],
                "K": [token for _, token in self.tokens],
            }[kind]
            # A mutation may have made a reference out of range ("@@A1@@" -> "@@A10@@").
            value = known[i] if i < len(known) else f"unknown-{kind}{i}"
            return json.dumps(value)[1:-1]

        return REF.sub(real, frame)

    def learn(self, frame: Any) -> None:
        payload = frame.get("payload") if isinstance(frame, dict) else None
        if not isinstance(payload, dict):
            return
        task_id, agent_id = payload.get("task_id"), payload.get("agent_id")
        if isinstance(task_id, str) and task_id not in self.task_ids:
            self.task_ids.append(task_id)
        if isinstance(agent_id, str) and agent_id not in self.agent_ids:
            self.agent_ids.append(agent_id)
        token = payload.get("resume_token")
        if frame.get("type") == "register" and isinstance(token, str):
            self.tokens.append((payload["agent_id"], token))


def valid_client_frame(ch: Chooser, k: Knowledge, msg_id: str) -> dict[str, Any]:
    """A well-formed frame of a random client type (it may still be refused by the hub:
    wrong task, not registered, ...)."""
    type_ = pick(ch, CLIENT_TYPES)
    task_id = k.task(ch)
    cap = pick(ch, k.capabilities)
    payload: dict[str, Any]
    if type_ == "register":
        payload = {
            "name": pick(ch, ["fuzzer", "Fuzz Agent", "é"]),
            "description": "fuzzing",
            "capabilities": [cap, {"name": pick(ch, k.capabilities), "params_schema": {}}],
            "metadata": {"seed": ch.json()},
            "hidden": flip(ch),
        }
        if flip(ch):
            payload["resume"] = k.resume(ch)
    elif type_ == "discover":
        payload = {"capability": cap}
    elif type_ == "delegate":
        payload = {"capability": cap, "params": {"n": ch.json()}, "ttl": pick(ch, [0.5, 5, 60])}
    elif type_ == "result":
        payload = {"task_id": task_id, "success": flip(ch), "data": ch.json(), "error": None}
    elif type_ == "status":
        payload = {"task_id": task_id} if flip(ch) else {}
    elif type_ == "broadcast":
        payload = {"message": "hello", "data": ch.json()}
    elif type_ == "cancel":
        payload = {"task_id": task_id, "reason": pick(ch, [None, "", "changed my mind"])}
    elif type_ == "progress":
        payload = {"task_id": task_id, "progress": 0.5, "message": "half", "data": None}
    elif type_ == "list_tasks":
        payload = {"state": pick(ch, [None, "pending", "completed"]), "limit": 10}
    else:  # deregister, heartbeat
        payload = {}
    frame: dict[str, Any] = {"type": type_, "id": msg_id, "payload": payload}
    if type_ == "delegate" and flip(ch):
        frame["to"] = k.agent(ch)
    if flip(ch):
        frame.update({"from": pick(ch, [None, "agt_spoofed", "hub"]), "timestamp": 1.7e9})
    if flip(ch):
        frame["in_reply_to"] = None
    return frame


def hub_frames() -> list[dict[str, Any]]:
    """A valid frame of every kind the hub sends: each reply, then each event."""
    info = {
        "task_id": "task_1",
        "state": "in_progress",
        "capability": "echo",
        "requester": "agt_1",
        "assignee": "agt_2",
        "created_at": 1.7e9,
        "updated_at": 1.7e9,
        "ttl": 60.0,
        "success": None,
        "data": None,
        "error": None,
    }
    summary = {
        "agents": 2,
        "online": 1,
        "tasks": {"pending": 0, "in_progress": 1},
        "uptime": 1.5,
        "counters": {"delegated": 1},
        "version": "0.1.0",
        "protocol": 1,
    }
    agent = {
        "agent_id": "agt_2",
        "name": "echoer",
        "description": "",
        "capabilities": [{"name": "echo", "description": "", "params_schema": None}],
        "online": True,
        "metadata": {},
    }
    error = {"code": "forbidden", "message": "no", "details": None}
    replies = [
        ("register", {"agent_id": "agt_1", "resume_token": "t", "heartbeat_interval": 30.0,
                      "resumed": False, "protocol": 1}),
        ("deregister", {"agent_id": "agt_1"}),
        ("discover", {"agents": [agent]}),
        ("delegate", {"task_id": "task_1", "agent_id": "agt_2", "state": "pending"}),
        ("status", info),
        ("status", summary),
        ("broadcast", {"recipients": 3}),
        ("heartbeat_ack", {}),
        ("cancel", {"task_id": "task_1", "state": "cancelled"}),
        ("list_tasks", {"tasks": [info]}),
        ("error", error),
    ]  # fmt: skip
    events = [
        ("delegate", {"task_id": "task_1", "capability": "echo", "params": {}, "ttl": 9.5}),
        ("result", {"task_id": "task_1", "state": "completed", "success": True, "data": [1],
                    "error": None}),
        ("status", info),
        ("broadcast", {"message": "hi", "data": None}),
        ("cancel", {"task_id": "task_1", "reason": "timeout"}),
        ("progress", {"task_id": "task_1", "progress": 0.5, "message": None, "data": None}),
        ("error", error),
    ]  # fmt: skip
    frames = []
    for i, (type_, payload) in enumerate(replies + events):
        frame = {"type": type_, "id": f"h{i}", "from": "hub", "to": None, "timestamp": 1.7e9,
                 "payload": payload}  # fmt: skip
        if i < len(replies):
            frame["in_reply_to"] = f"c{i}"
        frames.append(frame)
    return frames


HUB_FRAMES = hub_frames()


def _slots(value: Any) -> list[tuple[Any, Any]]:
    """(container, key) of every value inside `value`, at any depth."""
    found: list[tuple[Any, Any]] = []
    stack = [value]
    while stack:
        container = stack.pop()
        keys = list(container) if isinstance(container, dict) else range(len(container))
        for key in keys:
            found.append((container, key))
            if isinstance(container[key], dict | list):
                stack.append(container[key])
    return found


def _retyped(value: Any, ch: Chooser) -> Any:
    """The same content as another JSON type."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return pick(ch, [str(value), value != 0, [value], float(value) if flip(ch) else None])
    if isinstance(value, str):
        return pick(ch, [len(value), value == "", [value], {value: value}])
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        return list(value.values()) if flip(ch) else json.dumps(value)
    return pick(ch, ["null", 0, False, [], {}])


def mutate(frame: Any, ch: Chooser) -> Any:
    """`frame` broken in one to three ways."""
    frame = copy.deepcopy(frame)
    for _ in range(1 + ch.below(3)):
        slots = _slots(frame) if isinstance(frame, dict | list) else []
        kind = ch.below(8)
        if not slots or kind == 7:
            frame = ch.json() if ch.below(4) == 0 else frame  # rarely: something else entirely
            continue
        container, key = pick(ch, slots)
        if kind == 0:  # drop a key (or a list item)
            del container[key]
        elif kind == 1:  # add a key to some object
            objects = [c[k] for c, k in slots if isinstance(c[k], dict)]
            target = pick(ch, objects) if objects and flip(ch) else frame
            if isinstance(target, dict):
                name = pick(ch, FIELD_NAMES) if flip(ch) else ch.text()
                target[name] = ch.json()
        elif kind == 2:  # replace a value at any path
            container[key] = ch.json()
        elif kind == 3:  # the same value, another type
            container[key] = _retyped(container[key], ch)
        elif kind == 4:  # an edge value
            container[key] = copy.deepcopy(pick(ch, EDGE_VALUES))
        elif kind == 5:  # null
            container[key] = None
        elif isinstance(frame, dict):  # kind 6: another type name, same payload
            frame["type"] = pick(ch, [*ALL_TYPES, "", "Delegate", "teleport", " result"])
    return frame


def dumps(value: Any, ch: Chooser) -> str:
    """JSON text, sometimes ASCII-escaped (\\uXXXX, including escaped lone surrogates)."""
    return json.dumps(value, ensure_ascii=flip(ch))


def flip_a_char(text: str, ch: Chooser) -> str:
    """Delete, insert or replace one character: JSON that is almost right."""
    i = ch.below(len(text) + 1)
    c = pick(ch, list('{}[]",: 0aé'))  # no backslash: it would make an escape of what follows
    return pick(
        ch, [text[:i] + text[i + 1 :], text[:i] + c + text[i:], text[:i] + c + text[i + 1 :]]
    )


def client_frame(ch: Chooser, k: Knowledge, msg_id: str) -> str | bytes:
    """One frame for the hub: valid, mutated, or junk."""
    mode = ch.below(10)
    if mode < 3:
        frame = dumps(valid_client_frame(ch, k, msg_id), ch)
    elif mode < 8:
        frame = dumps(mutate(valid_client_frame(ch, k, msg_id), ch), ch)
    elif mode == 8:
        frame = flip_a_char(json.dumps(valid_client_frame(ch, k, msg_id)), ch)
    else:
        frame = ch.junk()
    return k.fill(frame)


def hub_frame(ch: Chooser) -> str | bytes:
    """One frame for a client: a valid hub frame, mutated, or junk."""
    mode = ch.below(10)
    frame = copy.deepcopy(pick(ch, HUB_FRAMES))
    if mode < 2:
        return dumps(frame, ch)
    if mode < 8:
        return dumps(mutate(frame, ch), ch)
    if mode == 8:
        return flip_a_char(json.dumps(frame), ch)
    return ch.junk()


# ---------------------------------------------------------------------------------------
# 1. The decoders


def readable_id(frame: str | bytes) -> str | None:
    """The `id` an error must answer: set when the frame is a JSON object with a
    non-empty string id (protocol.md §6)."""
    if not isinstance(frame, str):
        return None
    try:
        raw = orjson.loads(frame)
    except orjson.JSONDecodeError:
        return None
    if isinstance(raw, dict) and type(raw.get("id")) is str and raw["id"]:
        return raw["id"]  # type: ignore[no-any-return]
    return None


def check_decode(decode: Callable[[str | bytes], Envelope], frame: str | bytes) -> Envelope | None:
    """Decode `frame`: an Envelope or a well-formed ProtocolError, nothing else."""
    refused: ProtocolError | None = None
    try:
        envelope = decode(frame)
    except ProtocolError as exc:
        refused = exc
    if refused is not None:
        assert isinstance(refused.code, ErrorCode), refused.code
        assert isinstance(refused.message, str), refused.message
        assert refused.message
        assert refused.in_reply_to == readable_id(frame), (refused.in_reply_to, refused.message)
        orjson.dumps(refused.message)  # the hub must be able to send it back
        return None
    assert isinstance(envelope, Envelope)
    assert envelope.id == readable_id(frame)
    return envelope


def check_client_decode(frame: str | bytes, *, round_trip: bool = True) -> Envelope | None:
    envelope = check_decode(decode_from_client, frame)
    if envelope is None:
        return None
    assert type(envelope.payload) is REQUESTS[envelope.type]
    if round_trip:  # what the hub accepted it can write again, as the same envelope
        assert decode_from_client(encode(envelope)) == envelope
    return envelope


def check_hub_decode(frame: str | bytes) -> None:
    envelope = check_decode(decode_from_hub, frame)
    if envelope is None:
        return
    table = EVENTS if envelope.in_reply_to is None else REPLIES
    expected = table[envelope.type]
    assert type(envelope.payload) in (expected, HubSummary), envelope


def test_every_template_is_valid() -> None:
    """The starting points of the mutations decode cleanly (else mutating them says less)."""
    k = Knowledge()
    rng = RandomChooser(random.Random(0))
    seen = set()
    for i in range(300):
        frame = valid_client_frame(rng, k, f"c{i}")
        seen.add(frame["type"])
        decode_from_client(json.dumps(frame))
    assert seen == set(CLIENT_TYPES)
    for frame in HUB_FRAMES:
        decode_from_hub(json.dumps(frame))


@SETTINGS
@given(junk_frames)
def test_client_decoder_on_junk(frame: str | bytes) -> None:
    check_client_decode(frame, round_trip=False)


@SETTINGS
@given(json_values)
def test_client_decoder_on_any_json_value(value: Any) -> None:
    check_client_decode(json.dumps(value))


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_client_decoder_on_mutated_frames(data: st.DataObject) -> None:
    ch = HypothesisChooser(data)
    check_client_decode(client_frame(ch, Knowledge(), "c1"))


@SETTINGS
@given(
    st.integers(0, 400),
    st.sampled_from(["delegate.params", "result.data", "register.metadata", "broadcast.data"]),
    st.sampled_from(["[", '{"k": ']),
)
def test_client_decoder_accepts_only_what_it_can_encode(
    depth: int, where: str, opener: str
) -> None:
    """However deep a value nests, the decoder accepts it only if it can write it again."""
    closer = "]" if opener == "[" else "}"
    deep = opener * depth + "1" + closer * depth
    type_, field = where.split(".")
    payload = {"delegate": '"capability": "c"', "result": '"task_id": "t", "success": true',
               "register": '"name": "n"', "broadcast": '"message": "m"'}[type_]  # fmt: skip
    inner = deep if field != "params" and field != "metadata" else f'{{"x": {deep}}}'
    frame = f'{{"type": "{type_}", "id": "c1", "payload": {{{payload}, "{field}": {inner}}}}}'
    envelope = check_client_decode(frame)
    if depth <= 32:  # ordinary nesting is of course accepted
        assert envelope is not None


@SETTINGS
@given(junk_frames)
def test_hub_decoder_on_junk(frame: str | bytes) -> None:
    check_hub_decode(frame)


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_hub_decoder_on_mutated_frames(data: st.DataObject) -> None:
    check_hub_decode(hub_frame(HypothesisChooser(data)))


@pytest.mark.parametrize("payload", ["5", "1.5", "true"])
def test_hub_decoder_status_reply_payload_not_an_object(payload: str) -> None:
    """Found by the hub-decoder fuzz: this once raised TypeError, not ProtocolError."""
    frame = f'{{"type": "status", "id": "h1", "in_reply_to": "c1", "payload": {payload}}}'
    with pytest.raises(ProtocolError) as refused:
        decode_from_hub(frame)
    assert refused.value.code is ErrorCode.INVALID_MESSAGE


# ---------------------------------------------------------------------------------------
# 2. The Router, pure: several peers, random frames, a manual clock


class FakePeer:
    """One connection: the raw frames the router sent it, and its close calls."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.frames: list[str] = []
        self.closes: list[tuple[int, str]] = []
        self.gone = False  # disconnected: the router must never send to it again

    def send(
        self,
        frame: str,
        *,
        outcome_of: str | None = None,
        droppable: bool = False,
        durable: bool = False,
    ) -> None:
        assert not self.gone, f"frame sent to {self.name} after it disconnected: {frame}"
        self.frames.append(frame)

    def close(self, code: int, reason: str) -> None:
        self.closes.append((code, reason))

    def has_room(self) -> bool:
        return True

    def __repr__(self) -> str:
        return f"<FakePeer {self.name}>"


class World:
    """A Router, its peers and clock, and a checked way to feed it frames."""

    def __init__(self) -> None:
        self.now = 0.0
        self.router = Router(
            HubConfig(default_ttl=5.0, resume_grace=2.0, retention=10_000.0),
            clock=lambda: self.now,
            wall=lambda: 1.7e9 + self.now,
        )
        self.knowledge = Knowledge()
        self.peers: list[FakePeer] = []
        self.every_peer: list[FakePeer] = []
        self.results = Counter[str]()  # result events per task id, to any peer
        self._read: dict[FakePeer, int] = {}  # frames of each peer already collected
        self.tokens: dict[str, str] = {}  # agent ID -> resume token, from register replies
        self._ids = 0

    def connect(self) -> FakePeer:
        self._ids += 1
        peer = FakePeer(f"p{self._ids}")
        self.router.connected(peer)
        self.every_peer.append(peer)
        return peer

    def disconnect(self, peer: FakePeer) -> None:
        self.router.disconnected(peer)  # a FakePeer has no unsent frames
        peer.gone = True
        self.collect()

    def next_id(self) -> str:
        self._ids += 1
        return f"c{self._ids}"

    def collect(self) -> dict[FakePeer, list[str]]:
        """The frames sent to each peer since the last call, checked and learned from."""
        new = {}
        for peer in self.every_peer:
            new[peer] = peer.frames[self._read.get(peer, 0) :]
            self._read[peer] = len(peer.frames)
            for text in new[peer]:
                decode_from_hub(text)  # every frame the hub sends is valid protocol
                sent = orjson.loads(text)
                if sent["type"] == "result" and sent.get("in_reply_to") is None:
                    self.results[sent["payload"]["task_id"]] += 1
                if sent["type"] == "register" and "resume_token" in sent["payload"]:
                    payload = sent["payload"]  # the hub keeps only a hash of the token
                    self.tokens[payload["agent_id"]] = payload["resume_token"]
        assert max(self.results.values(), default=0) <= 1, f"a task reported twice: {new}"
        self._learn()
        return new

    def _learn(self) -> None:
        """Learn IDs from the router's tables, in their (deterministic) insertion order:
        learning them from frames would follow set order, which varies with the random
        IDs, and Hypothesis needs each example to draw the same way when replayed."""
        k = self.knowledge
        k.task_ids += [r.task_id for r in self.router.tasks if r.task_id not in k.task_ids]
        for agent in self.router.registry:
            if agent.agent_id not in k.agent_ids:
                k.agent_ids.append(agent.agent_id)
                k.tokens.append((agent.agent_id, self.tokens[agent.agent_id]))

    def tick(self, seconds: float) -> None:
        """Time passes: TTLs and grace periods run out."""
        self.now += seconds
        self.router.fire_timers()
        self.collect()

    def receive(self, peer: FakePeer, frame: str | bytes) -> list[dict[str, Any]]:
        """Feed `frame` to the router and check what it did; return what `peer` got."""
        self.collect()
        errors = self.router.counters["errors"]
        try:
            expected: Envelope | None = decode_from_client(frame)
            refused: ProtocolError | None = None
        except ProtocolError as exc:
            expected, refused = None, exc
        self.router.receive(peer, frame)  # never raises
        new = self.collect()
        got = [orjson.loads(text) for text in new[peer]]
        context = f"frame {frame!r} from {peer} got {got}"

        if refused is not None:  # a bad frame: exactly one error and nothing else
            assert len(got) == 1, context
            assert got[0]["type"] == "error", context
            assert got[0]["payload"]["code"] == refused.code.value, context
            assert got[0].get("in_reply_to") == refused.in_reply_to, context
            assert all(not new[p] for p in self.every_peer if p is not peer), context
        else:
            assert expected is not None
            replies = [f for f in got if "in_reply_to" in f]
            assert all(f["in_reply_to"] == expected.id for f in replies), context
            assert len(replies) <= 1, context
            if expected.type.value not in NO_REPLY_ON_SUCCESS:
                assert len(replies) == 1, context
            for reply in replies:
                if reply["type"] == "error":
                    code = reply["payload"]["code"]
                    assert code in CODES, context
                    assert code != "internal", context  # a bug in the hub, by definition
                elif expected.type is MessageType.HEARTBEAT:
                    assert reply["type"] == "heartbeat_ack", context
                else:
                    assert reply["type"] == expected.type.value, context
        error_frames = sum(f["type"] == "error" for f in got)
        assert self.router.counters["errors"] - errors == error_frames, context

        # A peer closed by the router (replaced by a resume) goes away, as a socket would.
        for p in list(self.peers):
            if p.closes and not p.gone:
                self.disconnect(p)
                self.peers[self.peers.index(p)] = self.connect()
        return got

    def request(self, peer: FakePeer, type_: str, payload: Any, **envelope: Any) -> dict[str, Any]:
        msg_id = self.next_id()
        got = self.receive(peer, orjson.dumps({"type": type_, "id": msg_id, "payload": payload,
                                               **envelope}).decode())  # fmt: skip
        [reply] = [f for f in got if f.get("in_reply_to") == msg_id]
        return reply

    def register(self, peer: FakePeer, name: str, *capabilities: str) -> str:
        reply = self.request(peer, "register", {"name": name, "capabilities": list(capabilities)})
        assert reply["type"] == "register", reply
        agent_id: str = reply["payload"]["agent_id"]
        return agent_id

    def sender_for(self, frame: str | bytes, ch: Chooser) -> FakePeer:
        """A random peer; or, half the time, the one that can act on the task the frame
        names (its assignee for result and progress, else its requester)."""
        if flip(ch):
            try:
                raw = orjson.loads(frame)
                record = self.router.tasks.get(raw["payload"]["task_id"])
                who = record.assignee if raw["type"] in NO_REPLY_ON_SUCCESS else record.requester
                peer = self.router.connection_of(who)
            except Exception:
                peer = None
            if peer in self.peers:
                return peer  # type: ignore[return-value]
        return pick(ch, self.peers)

    def check_consistency(self) -> None:
        """The task table, the counters and the outcomes sent all agree."""
        router = self.router
        counts = router.tasks.counts()
        assert router.counters["delegated"] == len(router.tasks), (router.counters, counts)
        for state in ("completed", "failed", "timeout", "cancelled"):
            assert router.counters[state] == counts[state], (state, router.counters, counts)
        for record in router.tasks:
            sent = self.results[record.task_id]
            assert sent == (1 if record.notified else 0), record
            assert not sent or record.terminal, record
            if record.terminal and router.connection_of(record.requester) is not None:
                assert record.notified, f"online requester never told: {record}"


def clean_round_trip(world: World) -> None:
    """Two fresh, well-behaved peers: delegate, result, status, discover all work."""
    worker, requester = world.connect(), world.connect()
    world.peers += [worker, requester]
    cap = "clean-check-capability"
    worker_id = world.register(worker, "clean-worker", cap)
    world.register(requester, "clean-requester")
    reply = world.request(requester, "delegate", {"capability": cap, "params": {"x": 1}, "ttl": 60})
    assert reply["type"] == "delegate", reply
    assert reply["payload"]["agent_id"] == worker_id, reply
    task_id = reply["payload"]["task_id"]
    task = orjson.loads(worker.frames[-1])
    assert task["type"] == "delegate", task
    assert task["payload"]["task_id"] == task_id, task
    got = world.receive(
        worker,
        orjson.dumps({"type": "result", "id": world.next_id(),
                      "payload": {"task_id": task_id, "success": True, "data": {"y": 2}}}).decode(),
    )  # fmt: skip
    assert got == []
    outcome = orjson.loads(requester.frames[-1])
    assert outcome["type"] == "result", outcome
    assert outcome["payload"] == {"task_id": task_id, "state": "completed", "success": True,
                                  "data": {"y": 2}, "error": None}  # fmt: skip
    status = world.request(requester, "status", {"task_id": task_id})
    assert status["payload"]["state"] == "completed", status
    found = world.request(requester, "discover", {"capability": cap})
    assert [a["agent_id"] for a in found["payload"]["agents"]] == [worker_id], found
    summary = world.request(requester, "status", {})
    assert summary["type"] == "status", summary
    world.check_consistency()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_router_survives_random_frames_from_several_peers(data: st.DataObject) -> None:
    ch = HypothesisChooser(data)
    world = World()
    world.peers = [world.connect() for _ in range(4)]
    world.register(world.peers[0], "echoer", "echo")
    world.register(world.peers[1], "worker", "work", "Echo")
    world.register(world.peers[2], "requester")  # peers[3] stays unregistered
    for cap in ("echo", "work", "echo"):
        world.request(world.peers[2], "delegate", {"capability": cap, "ttl": 3})
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        action = ch.below(12)
        if action < 9:
            frame = client_frame(ch, world.knowledge, world.next_id())
            world.receive(world.sender_for(frame, ch), frame)
        elif action == 9:
            world.tick(pick(ch, [0.1, 1.0, 2.5, 6.0]))
        elif action == 10:  # a connection drops; a fresh one takes its place
            slot = ch.below(len(world.peers))
            world.disconnect(world.peers[slot])
            world.peers[slot] = world.connect()
        else:
            world.router.cleanup()
        world.collect()
        world.check_consistency()
    clean_round_trip(world)


def _deep(n: int) -> str:
    """A JSON value nested `n` levels deep, as text (orjson reads 1024 levels, writes 254)."""
    return "[" * n + "1" + "]" * n


@pytest.mark.parametrize("where", ["result.data", "register.metadata", "delegate.params",
                                   "broadcast.data", "progress.data"])  # fmt: skip
def test_router_handles_deeply_nested_values(where: str) -> None:
    world = World()
    world.peers = [world.connect() for _ in range(3)]
    worker, requester, other = world.peers
    world.register(worker, "worker", "echo")
    world.register(requester, "requester")
    task = world.request(requester, "delegate", {"capability": "echo", "ttl": 60})
    task_id = task["payload"]["task_id"]
    deep = _deep(300)
    frames = {
        "result.data": (worker, f'{{"task_id": "{task_id}", "success": true, "data": {deep}}}'),
        "register.metadata": (other, f'{{"name": "deep", "metadata": {{"x": {deep}}}}}'),
        "delegate.params": (requester, f'{{"capability": "echo", "params": {{"x": {deep}}}}}'),
        "broadcast.data": (requester, f'{{"message": "m", "data": {deep}}}'),
        "progress.data": (worker, f'{{"task_id": "{task_id}", "data": {deep}}}'),
    }
    peer, payload = frames[where]
    type_ = where.split(".")[0]
    msg_id = world.next_id()
    text = f'{{"type": "{type_}", "id": "{msg_id}", "payload": {payload}}}'
    got = world.receive(peer, text)
    # Accepted or refused, the hub must not fail internally (checked in `receive`), and:
    # Too deep to be encoded again, so refused up front with a code.
    assert [f["payload"]["code"] for f in got if f["type"] == "error"] == ["invalid_message"]
    if where == "result.data":  # the task goes on; it ends at its TTL, heard exactly once
        assert world.results[task_id] == 0
        world.tick(61.0)
        assert world.results[task_id] == 1
    if where == "register.metadata":  # nobody's discover breaks
        found = world.request(requester, "discover", {})
        assert found["type"] == "discover", found
    assert all(f["payload"].get("code") != "internal" for f in got)


def test_resume_with_a_non_ascii_token_gets_a_fresh_identity() -> None:
    """Found by the router fuzz: comparing tokens once raised for non-ASCII text."""
    world = World()
    first, second = world.connect(), world.connect()
    world.peers = [first, second]
    agent_id = world.register(first, "first")
    resume = {"agent_id": agent_id, "token": "wrong-tokén"}
    reply = world.request(second, "register", {"name": "second", "resume": resume})
    # protocol.md §3: a resume that is not honoured is not an error: a fresh identity.
    assert reply["type"] == "register", reply
    assert reply["payload"]["resumed"] is False
    assert reply["payload"]["agent_id"] != agent_id


# ---------------------------------------------------------------------------------------
# 3. A live hub on loopback


async def _round_trip(requester: RawClient, worker: RawClient, n: int) -> None:
    """A delegate/result round trip between two well-behaved raw clients."""
    reply = await requester.request(
        "delegate", {"capability": "live-echo", "params": {"n": n}, "ttl": 30}, to=worker.agent_id
    )
    assert reply["type"] == "delegate", reply
    task_id = reply["payload"]["task_id"]
    task = await worker.expect("delegate", task_id=task_id)
    assert task["payload"]["params"] == {"n": n}
    await worker.send("result", {"task_id": task_id, "success": True, "data": n * 2})
    outcome = await requester.expect("result", task_id=task_id)
    assert outcome["payload"]["state"] == "completed", outcome
    assert outcome["payload"]["data"] == n * 2, outcome


LIVE_SEED = 20240611


async def test_live_hub_survives_a_barrage(hub: Hub, connect: Any) -> None:
    rng = random.Random(LIVE_SEED)
    print(f"live fuzz seed {LIVE_SEED}")
    ch = RandomChooser(rng)
    async with connect() as fuzz, connect() as worker, connect() as requester:
        await worker.register("live-worker", "live-echo")
        await requester.register("live-requester")
        # The fuzzer may name the others (and delegate to them) but not steal them: it
        # only learns resume tokens from its own registrations.
        k = Knowledge()
        k.agent_ids += [worker.agent_id, requester.agent_id]
        k.capabilities.append("live-echo")
        counts = Counter[str]()
        for i in range(200):
            frame = client_frame(ch, k, f"f{i}")
            try:
                expected: Envelope | None = decode_from_client(frame)
                refused: ProtocolError | None = None
            except ProtocolError as exc:
                expected, refused = None, exc
            await fuzz.ws.send_message(frame)
            barrier = f"~barrier~{i}"  # its ack comes after everything the frame caused
            await fuzz.send("heartbeat", id=barrier)
            got = []
            with trio.fail_after(WAIT):
                while True:
                    sent = orjson.loads(await fuzz.ws.get_message())
                    if sent.get("in_reply_to") == barrier:
                        assert sent["type"] == "heartbeat_ack", sent
                        break
                    if sent["type"] == "event":  # the fuzzer may have sent `watch`
                        counts["events"] += 1
                    else:
                        got.append(sent)
            for sent in got:
                k.learn(sent)
            context = f"frame {i} {frame!r} got {got}"
            replies = [f for f in got if "in_reply_to" in f]
            if refused is not None:
                assert [f["type"] for f in got] == ["error"], context
                assert got[0]["payload"]["code"] == refused.code.value, context
                assert got[0].get("in_reply_to") == refused.in_reply_to, context
                counts["refused"] += 1
            else:
                assert expected is not None
                assert len(replies) <= 1, context
                if expected.type.value not in NO_REPLY_ON_SUCCESS:
                    assert len(replies) == 1, context
                for reply in replies:
                    assert reply["in_reply_to"] == expected.id, context
                    if reply["type"] == "error":
                        assert reply["payload"]["code"] in CODES - {"internal"}, context
                counts["error" if replies and replies[0]["type"] == "error" else "accepted"] += 1
            if i % 50 == 49:  # meanwhile, the others keep working
                await _round_trip(requester, worker, i)
        print(f"live barrage: {dict(counts)}")
        assert counts["accepted"] > 20, counts  # the barrage reached past the decoder
        assert fuzz.ws.closed is None
        assert (await fuzz.request("heartbeat"))["type"] == "heartbeat_ack"
        await _round_trip(requester, worker, 1000)

        # One frame over the size limit, on its own connection: 1009 for it alone.
        async with connect() as big:
            limit = hub.config.max_frame_size
            frame = '{"type": "heartbeat", "id": "big", "x": "' + "x" * limit

            async def send_big() -> None:  # refused once its header arrives, maybe mid-send
                await big.ws.send_message(frame)
                await big.recv()

            with pytest.raises(ConnectionClosed) as closed:
                await send_big()
            assert closed.value.reason.code == 1009
        assert (await fuzz.request("heartbeat"))["type"] == "heartbeat_ack"
        await _round_trip(requester, worker, 2000)
