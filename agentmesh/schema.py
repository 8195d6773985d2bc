"""A JSON Schema of the wire protocol, generated from the message classes.

    python -m agentmesh.schema > docs/schema/protocol.json

The committed copy in docs/schema/ is checked against this output by the test suite, so
it cannot drift from the code.
"""

from __future__ import annotations

import enum
import types
import typing
from typing import Any, Union, get_args, get_origin

import attrs
import orjson

from . import protocol as p

__all__ = ["protocol_schema"]

_PRIMITIVES: dict[Any, dict[str, Any]] = {
    str: {"type": "string"},
    int: {"type": "integer"},
    float: {"type": "number"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
}


def protocol_schema() -> dict[str, Any]:
    """The whole protocol: every payload class, and the frames each side may send."""
    defs: dict[str, Any] = {}
    client = [_frame(t, cls, defs, reply=False, client=True) for t, cls in p.REQUESTS.items()]
    hub = [_frame(t, cls, defs, reply=True) for t, cls in p.REPLIES.items()]
    hub.append(_frame(p.MessageType.STATUS, p.HubSummary, defs, reply=True))
    hub += [_frame(t, cls, defs, reply=False) for t, cls in p.EVENTS.items()]
    defs["ClientFrame"] = {
        "description": "A frame a client sends to the hub.",
        "oneOf": client,
    }
    defs["HubFrame"] = {
        "description": "A frame the hub sends to a client: a reply (with in_reply_to) "
        "or an event (without).",
        "oneOf": hub,
    }
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://agentmesh.invalid/schema/protocol-v{p.PROTOCOL_VERSION}.json",
        "title": f"agentmesh wire protocol, version {p.PROTOCOL_VERSION}",
        "description": "Every WebSocket text frame is one JSON object: one of these frames.",
        "anyOf": [{"$ref": "#/$defs/ClientFrame"}, {"$ref": "#/$defs/HubFrame"}],
        "$defs": dict(sorted(defs.items())),
    }


def _frame(
    type_: p.MessageType, cls: type[Any], defs: dict[str, Any], *, reply: bool, client: bool = False
) -> dict[str, Any]:
    _define(cls, defs)
    nullable_string = {"type": ["string", "null"]}
    properties: dict[str, Any] = {
        "type": {"const": type_.value},
        "id": {"type": "string", "minLength": 1},
        "from": {**nullable_string, "description": "Set by the hub; ignored from clients."},
        "to": nullable_string,
        "timestamp": {
            "type": ["number", "string", "null"],
            "description": "Ignored by the hub: UNIX seconds, or a string such as ISO-8601.",
        }
        if client
        else {"type": ["number", "null"], "description": "UNIX seconds when the hub sent it."},
        "payload": {"$ref": f"#/$defs/{cls.__name__}"},
        "in_reply_to": {"type": "string"} if reply else {"type": "null"},
    }
    required = ["type", "id", "in_reply_to"] if reply else ["type", "id"]
    return {
        "title": f"{type_.value} ({cls.__name__})",
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
    }


def _define(cls: type[Any], defs: dict[str, Any]) -> None:
    if cls.__name__ in defs:
        return
    defs[cls.__name__] = {}  # reserve the name: classes may refer to each other
    hints = typing.get_type_hints(cls)
    properties: dict[str, Any] = {}
    required = []
    for field in attrs.fields(cls):
        properties[field.name] = _schema_of(hints[field.name], defs)
        properties[field.name] |= field.metadata.get("schema", {})  # a pattern, a limit
        if field.default is attrs.NOTHING:
            required.append(field.name)
        elif not isinstance(field.default, attrs.Factory):  # type: ignore[arg-type]
            properties[field.name]["default"] = _json_default(field.default)
    schema: dict[str, Any] = {"type": "object"}
    if cls.__doc__:
        schema["description"] = " ".join(cls.__doc__.split())
    schema |= {"properties": properties, "required": required, "additionalProperties": False}
    defs[cls.__name__] = schema


def _schema_of(hint: Any, defs: dict[str, Any]) -> dict[str, Any]:
    if hint is Any:
        return {}
    if hint in _PRIMITIVES:
        return dict(_PRIMITIVES[hint])
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [member.value for member in hint]}
    if hint is p.Capability:  # a plain string is shorthand for {"name": ...}
        _define(hint, defs)
        return {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/Capability"}]}
    if attrs.has(hint):
        _define(hint, defs)
        return {"$ref": f"#/$defs/{hint.__name__}"}
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return {"anyOf": [_schema_of(a, defs) for a in args]}
    if origin in (tuple, list):
        return {"type": "array", "items": _schema_of(args[0], defs)}
    if origin is dict:
        return {"type": "object", "additionalProperties": _schema_of(args[1], defs)}
    raise TypeError(f"no JSON Schema for {hint!r}")


def _json_default(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def main() -> None:
    print(orjson.dumps(protocol_schema(), option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
