"""The payloads the hub builds by hand for a delegation's frames (`protocol.task_payload`
and the like) are what the converter writes for their records, keys in the same order."""

from __future__ import annotations

from typing import Any

import agentmesh.protocol as p
from agentmesh.lifecycle import TaskEvent

TRACE = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"


def same(got: dict[str, Any], record: Any) -> None:
    expected = p.converter.unstructure(record)
    assert got == expected
    assert list(got) == list(expected)


def test_delegated_payload() -> None:
    for state in ("pending", "in_progress"):
        record = p.Delegated(task_id="t", agent_id="a", state=state)
        same(p.delegated_payload("t", "a", state), record)


def test_task_payload() -> None:
    for parent, state in ((None, None), (TRACE, None), (TRACE, "a=b"), (None, "a=b")):
        record = p.TaskAssignment(
            task_id="t",
            capability="c",
            params={"n": [1]},
            ttl=1.5,
            traceparent=parent,
            tracestate=state,
        )
        same(p.task_payload("t", "c", {"n": [1]}, 1.5, parent, state), record)


def test_outcome_payload() -> None:
    for parent, state in ((None, None), (TRACE, None), (TRACE, "a=b")):
        for success, data, error in ((True, {"x": 1}, None), (False, None, "boom")):
            record = p.TaskOutcome(
                task_id="t",
                state="completed" if success else "failed",
                success=success,
                data=data,
                error=error,
                traceparent=parent,
                tracestate=state,
            )
            got = p.outcome_payload("t", record.state, success, data, error, parent, state)
            same(got, record)


def test_encode_fields_takes_a_payload_dict_as_its_record() -> None:
    record = p.TaskAssignment(task_id="t", capability="c", params={}, ttl=2.0)
    fields = ("h1", "agt_a", "agt_b", 12.5, None)
    by_record = p.encode_fields(p.MessageType.DELEGATE, fields[0], record, *fields[1:])
    payload = p.task_payload("t", "c", {}, 2.0, None, None)
    by_dict = p.encode_fields(p.MessageType.DELEGATE, fields[0], payload, *fields[1:])
    assert by_dict == by_record
    assert p.decode_from_hub(by_dict).payload == record


def test_task_events_hash_as_themselves() -> None:
    # TaskEvent hashes by identity (cheaper than Enum's hash of the name): members are
    # still usable as keys, and equal only to themselves.
    table = {event: event.value for event in TaskEvent}
    assert [table[event] for event in TaskEvent] == [e.value for e in TaskEvent]
    assert len(set(TaskEvent)) == len(TaskEvent)
    assert TaskEvent.DELIVER != "deliver"
