"""The committed JSON Schema is current, valid, and describes the frames a real hub speaks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import orjson
import trio

from agentmesh import Agent, Hub, connect
from agentmesh.schema import protocol_schema

from .conftest import open_raw

COMMITTED = Path(__file__).parent.parent / "docs" / "schema" / "protocol.json"


def test_committed_schema_is_up_to_date() -> None:
    committed = json.loads(COMMITTED.read_text())
    assert committed == orjson.loads(orjson.dumps(protocol_schema())), (
        "docs/schema/protocol.json is out of date: "
        "run `python -m agentmesh.schema > docs/schema/protocol.json`"
    )


def test_schema_is_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(protocol_schema())


def _validator(side: str) -> jsonschema.Draft202012Validator:
    schema = protocol_schema()
    return jsonschema.Draft202012Validator({**schema, "$ref": f"#/$defs/{side}"})


async def test_real_frames_match_the_schema(hub: Hub, nursery: trio.Nursery) -> None:
    agent = Agent("echoer")

    @agent.capability()
    async def echo(text: str) -> str:
        return text

    await nursery.start(agent.serve, hub.url)
    client_frames: list[dict[str, Any]] = [
        {"type": "watch", "id": "0", "payload": {"kinds": ["task_state"]}},
        {"type": "register", "id": "1", "payload": {"name": "raw", "capabilities": ["x"]}},
        {"type": "heartbeat", "id": "2"},
        {"type": "discover", "id": "3", "payload": {"capability": "echo"}},
        {"type": "delegate", "id": "4", "payload": {"capability": "echo", "params": {"text": "a"}}},
        {"type": "status", "id": "5", "payload": {}},
        {"type": "list_tasks", "id": "6", "payload": {"state": "completed"}},
        {"type": "broadcast", "id": "7", "payload": {"message": "hi", "data": [1]}},
        {"type": "cancel", "id": "8", "payload": {"task_id": "task_unknown"}},
        {"type": "teleport", "id": "9"},
    ]
    hub_frames: list[dict[str, Any]] = []
    async with (
        open_raw(hub.url or "") as watcher,
        open_raw(hub.url or "") as raw,
        connect(hub.url or "") as listener,
    ):
        hub_frames.append(await watcher.request("watch", {}))
        for frame in client_frames:
            reply = await raw.request(frame["type"], frame.get("payload"), id=frame["id"])
            hub_frames.append(reply)
        hub_frames.append(await raw.expect("result"))
        task_id = hub_frames[-1]["payload"]["task_id"]
        status = await raw.request("status", {"task_id": task_id})
        hub_frames.append(status)
        await listener.broadcast("to raw")
        hub_frames.append(await raw.expect("broadcast"))
        hub_frames += raw.inbox
        hub_frames.append(await watcher.request("unwatch"))
        hub_frames += watcher.inbox
        kinds = {f["payload"]["kind"] for f in watcher.inbox if f["type"] == "event"}
        assert kinds >= {"agent_registered", "task_state", "broadcast"}, kinds

    client, hub_side = _validator("ClientFrame"), _validator("HubFrame")
    for frame in client_frames[:-1]:
        assert not list(client.iter_errors(frame)), frame
    assert list(client.iter_errors(client_frames[-1]))  # an unknown type is not a frame
    seen = {(f["type"], "in_reply_to" in f) for f in hub_frames}
    assert len(seen) >= 10
    for frame in hub_frames:
        errors = [e.message for e in hub_side.iter_errors(frame)]
        assert not errors, (frame, errors)
