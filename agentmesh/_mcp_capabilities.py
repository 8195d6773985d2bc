"""A tool per capability on the network (``agentmesh bridge --capability-tools``).

Each capability becomes an MCP tool: its input schema is the capability's params schema
(an open object when it has none), its description the capability's and the agents
offering it. Tool names may hold letters, digits, ``_`` and ``-``, 64 at most: other
characters become ``_``, and a name already taken (by one of the bridge's own tools, or
by another capability) gets ``_2``, ``_3``, ... Capabilities whose names need no change
are named first, then the others, each in order of name, so the same network always gets
the same names.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Any

import attrs

from . import protocol as p

MAX_NAME = 64
_NOT_ALLOWED = re.compile(r"[^A-Za-z0-9_-]")
_AGENTS_NAMED = 5  # agents named in a description at most
OPEN_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}


@attrs.frozen
class CapabilityTool:
    name: str  # the tool's
    capability: str
    description: str
    input_schema: dict[str, Any]


def capability_tools(
    agents: Iterable[p.AgentInfo], reserved: Collection[str]
) -> dict[str, CapabilityTool]:
    """The tools for the capabilities the `agents` offer, by tool name, never one of
    `reserved`."""
    offers: dict[str, list[tuple[p.AgentInfo, p.Capability]]] = {}
    for agent in sorted(agents, key=lambda agent: agent.agent_id):
        for offered in agent.capabilities:
            offers.setdefault(offered.name, []).append((agent, offered))
    taken = set(reserved)
    tools: dict[str, CapabilityTool] = {}
    for capability in sorted(offers, key=lambda name: (sanitised(name) != name, name)):
        name = _unique(sanitised(capability), taken)
        taken.add(name)
        tools[name] = _tool(name, capability, offers[capability])
    return tools


def sanitised(capability: str) -> str:
    """The capability's name with only the characters a tool name may hold."""
    return _NOT_ALLOWED.sub("_", capability)[:MAX_NAME] or "capability"


def _unique(name: str, taken: Collection[str]) -> str:
    n = 1
    candidate = name
    while candidate in taken:
        n += 1
        suffix = f"_{n}"
        candidate = name[: MAX_NAME - len(suffix)] + suffix
    return candidate


def _tool(
    name: str, capability: str, offers: list[tuple[p.AgentInfo, p.Capability]]
) -> CapabilityTool:
    described = next((c.description for _, c in offers if c.description), "")
    schema = next((c.params_schema for _, c in offers if c.params_schema is not None), None)
    if schema is None or schema.get("type") != "object":
        schema = OPEN_OBJECT
    agents = ", ".join(f"{agent.name} ({agent.agent_id})" for agent, _ in offers[:_AGENTS_NAMED])
    if len(offers) > _AGENTS_NAMED:
        agents += f" and {len(offers) - _AGENTS_NAMED} more"
    text = described.rstrip(".") + ". " if described else ""
    return CapabilityTool(
        name=name,
        capability=capability,
        description=(
            f"{text}Delegates the agentmesh capability {capability!r}, offered by {agents}, "
            "with these arguments as its params, to the least busy agent offering it, and "
            "waits up to 10 seconds for it (longer while the agent reports progress). "
            "Returns the task as delegate_task does; get_task_result collects a task that "
            "is still running."
        ),
        input_schema=schema,
    )
