"""Task records for the pure task-table tests."""

from __future__ import annotations

from typing import Any

from agentmesh.lifecycle import TaskRecord


def make_record(task_id: str = "t1", **overrides: Any) -> TaskRecord:
    """A pending task from agt_req to agt_work; `overrides` set any field."""
    fields: dict[str, Any] = {
        "task_id": task_id,
        "requester": "agt_req",
        "assignee": "agt_work",
        "capability": "echo",
        "params": {"text": "hi"},
        "ttl": 30.0,
        "deadline": 130.0,
        "created_at": 1000.0,
        "updated_at": 1000.0,
    }
    fields.update(overrides)
    return TaskRecord(**fields)
