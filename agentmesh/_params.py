"""Handler signatures as JSON Schema, and params checked against them before a call.

Understands the JSON-shaped annotations: str, int, float, bool, None, list[X], dict[str, X],
X | None, Union, Literal and Any. Other annotations are advertised as "any value" and not
checked.
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin

import attrs

__all__ = ["BadParams", "Signature"]


class BadParams(ValueError):
    """The params do not fit the handler's signature; the handler is not called."""


@attrs.frozen
class Signature:
    """What a handler accepts: `params` by name with their annotations, and whether one
    parameter takes the task context instead of a param."""

    params: dict[str, tuple[Any, bool]]  # name -> (annotation, required)
    context_param: str | None
    extra_allowed: bool
    schema: dict[str, Any]
    summary: str
    # For `bind`: the params whose annotation is one plain JSON type, each with it.
    _plain: tuple[tuple[str, type, bool], ...] | None = attrs.field(
        init=False, eq=False, repr=False
    )
    _names: frozenset[str] = attrs.field(init=False, eq=False, repr=False)

    def __attrs_post_init__(self) -> None:
        plain = [(n, hint, req) for n, (hint, req) in self.params.items() if hint in _PLAIN]
        # A param with any other annotation is checked the long way (`check`).
        object.__setattr__(self, "_plain", tuple(plain) if len(plain) == len(self.params) else None)
        object.__setattr__(self, "_names", frozenset(self.params))

    @classmethod
    def of(cls, fn: Callable[..., Any], context_type: type) -> Signature:
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # unresolvable annotations: advertise them as "any"
            hints = {}
        params: dict[str, tuple[Any, bool]] = {}
        context_param = None
        extra_allowed = False
        for name, param in inspect.signature(fn).parameters.items():
            hint = hints.get(name, Any)
            if hint is context_type or context_type in get_args(hint):
                context_param = name
            elif param.kind is param.VAR_KEYWORD:
                extra_allowed = True
            elif param.kind in (param.POSITIONAL_ONLY, param.VAR_POSITIONAL):
                raise TypeError(
                    f"{fn.__qualname__}: parameter {name!r} cannot be given by name; "
                    "capability handlers take keyword params"
                )
            else:
                params[name] = (hint, param.default is param.empty)
        doc = inspect.getdoc(fn) or ""
        summary, described = _parse_doc(doc)
        properties = {}
        for name, (hint, _) in params.items():
            prop = schema_of(hint)
            if name in described:
                prop = {**prop, "description": described[name]}
            properties[name] = prop
        schema: dict[str, Any] = {
            "type": "object",
            "properties": properties,
            "required": [n for n, (_, required) in params.items() if required],
            "additionalProperties": extra_allowed,
        }
        return cls(params, context_param, extra_allowed, schema, summary)

    def bind(self, given: dict[str, Any]) -> dict[str, Any]:
        """Check `given` against the signature; return the keyword arguments.

        Raises `BadParams` naming every missing, unknown or mistyped param.
        """
        if self._plain is not None and (self.extra_allowed or self._names.issuperset(given)):
            # The usual case, params of plain JSON types that fit: checked inline.
            for name, hint, required in self._plain:
                if name in given:
                    kind = type(given[name])
                    if kind is not hint and not (hint is float and kind is int):
                        break
                elif required:
                    break
            else:
                return dict(given)
        problems = []
        for name, (hint, required) in self.params.items():
            if name not in given:
                if required:
                    problems.append(f"missing param {name!r}")
            else:
                mismatch = check(given[name], hint)
                if mismatch:
                    problems.append(f"param {name!r}: {mismatch}")
        if not self.extra_allowed:
            unknown = sorted(set(given) - set(self.params))
            if unknown:
                problems.append("unknown param(s) " + ", ".join(map(repr, unknown)))
        if problems:
            raise BadParams("; ".join(problems))
        return dict(given)


# The annotations `bind` checks inline: `check` says the value fits when its type is the
# annotation itself (or, for float, an int).
_PLAIN: frozenset[Any] = frozenset({str, int, float, bool})

_JSON_TYPES: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    type(None): "null",
    list: "array",
    dict: "object",
}


def schema_of(hint: Any) -> dict[str, Any]:
    """JSON Schema for one annotation."""
    if hint is Any or hint is inspect.Parameter.empty:
        return {}
    if hint is None:
        hint = type(None)
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return {"anyOf": [schema_of(a) for a in args]}
    if origin is Literal:
        return {"enum": list(args)}
    if origin in (list, tuple, set, frozenset):
        return {"type": "array", "items": schema_of(args[0])} if args else {"type": "array"}
    if origin is dict:
        if len(args) == 2:
            return {"type": "object", "additionalProperties": schema_of(args[1])}
        return {"type": "object"}
    return {}


def check(value: Any, hint: Any) -> str | None:
    """Why `value` does not fit `hint`, or None if it does."""
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    if hint is None:
        hint = type(None)
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        if any(check(value, a) is None for a in args):
            return None
        return f"expected {_name(hint)}, got {_json_name(value)}"
    if origin is Literal:
        return None if value in args else f"expected one of {list(args)!r}, got {value!r}"
    if origin in (list, tuple, set, frozenset) or hint in (list, tuple):
        if type(value) is not list:
            return f"expected an array, got {_json_name(value)}"
        if args:
            for i, item in enumerate(value):
                inner = check(item, args[0])
                if inner:
                    return f"[{i}]: {inner}"
        return None
    if origin is dict or hint is dict:
        if type(value) is not dict:
            return f"expected an object, got {_json_name(value)}"
        if len(args) == 2:
            for key, item in value.items():
                inner = check(item, args[1])
                if inner:
                    return f"[{key!r}]: {inner}"
        return None
    if hint is float:
        ok = type(value) in (int, float)
    elif hint in (int, str, bool, type(None)):
        ok = type(value) is hint
    else:
        return None  # not a JSON-shaped annotation: not checked
    return None if ok else f"expected {_name(hint)}, got {_json_name(value)}"


_NAMES: dict[Any, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
    list: "an array",
    dict: "an object",
}


def _name(hint: Any) -> str:
    if hint in _NAMES:
        return _NAMES[hint]
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_name(a) for a in args)
    return getattr(hint, "__name__", str(hint))


def _json_name(value: Any) -> str:
    return _NAMES.get(type(value), type(value).__name__)


_ARG_LINE = re.compile(r"^\s{2,}(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.+)$")


def _parse_doc(doc: str) -> tuple[str, dict[str, str]]:
    """The first paragraph, and param descriptions from a Google-style ``Args:`` section."""
    summary = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    described: dict[str, str] = {}
    in_args = False
    for line in doc.splitlines():
        if line.strip() in ("Args:", "Arguments:", "Parameters:", "Params:"):
            in_args = True
            continue
        if in_args:
            if line and not line.startswith(" "):
                break
            match = _ARG_LINE.match(line)
            if match:
                described[match.group(1)] = match.group(2).strip()
    return summary, described
