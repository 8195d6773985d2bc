"""A tool per capability on the network (``agentmesh bridge --capability-tools``).

Each capability becomes an MCP tool: its input schema is the capability's params schema
(an open object when it has none), its description the capability's and the agents
offering it. Tool names may hold letters, digits, ``_`` and ``-``, 64 at most: other
characters become ``_``, and a name already taken (by one of the bridge's own tools, or
by another capability) gets ``_2``, ``_3``, ...

A name, once given, is the capability's for the bridge's lifetime: while it is offered,
while it is not, and when it is offered again; no other capability ever gets it. (A
client holding a stale tool list then calls a tool that is gone, never one that changed
meaning.) Capabilities that come together are named those needing no change first, then
the others, each in order of name, so the same network seen at once gets the same names.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
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


class CapabilityTools:
    """The capability tools, kept up to date agent by agent: `update` costs what the
    agents that changed offer, and the tools of those capabilities, not the network."""

    def __init__(self, reserved: Collection[str]) -> None:
        self.tools: dict[str, CapabilityTool] = {}  # the capabilities offered, by tool name
        self._names: dict[str, str] = {}  # tool name by capability, ever given
        self._capabilities: dict[str, str] = {}  # and the other way round
        self._taken = set(reserved)  # the bridge's own tools' names and those given
        # Who offers each capability (by agent ID), and what each agent offers.
        self._offers: dict[str, dict[str, tuple[p.AgentInfo, p.Capability]]] = {}
        self._offered_by: dict[str, tuple[str, ...]] = {}

    def update(self, agents: Mapping[str, p.AgentInfo], changed: Iterable[str]) -> bool:
        """Take in the agents whose IDs are `changed` as `agents` now has them (gone if
        absent); whether the tools changed."""
        touched: set[str] = set()
        for agent_id in changed:
            for capability in self._offered_by.pop(agent_id, ()):
                del self._offers[capability][agent_id]
                touched.add(capability)
            agent = agents.get(agent_id)
            if agent is None:
                continue
            offered = {c.name: c for c in agent.capabilities}
            self._offered_by[agent_id] = tuple(offered)
            for capability, offer in offered.items():
                self._offers.setdefault(capability, {})[agent_id] = (agent, offer)
                touched.add(capability)
        new = [c for c in touched if c not in self._names and self._offers.get(c)]
        for capability in sorted(new, key=lambda c: (sanitised(c) != c, c)):
            given = _unique(sanitised(capability), self._taken)
            self._taken.add(given)
            self._names[capability] = given
            self._capabilities[given] = capability
        tools_changed = False
        for capability in touched:  # each offered now or before, so named
            name = self._names[capability]
            offers = self._offers.get(capability)
            if not offers:
                self._offers.pop(capability, None)
                if self.tools.pop(name, None) is not None:
                    tools_changed = True
                continue
            tool = _tool(name, capability, [offers[a] for a in sorted(offers)])
            if self.tools.get(name) != tool:
                self.tools[name] = tool
                tools_changed = True
        return tools_changed

    def capability_named(self, name: str) -> str | None:
        """The capability a tool name was given to, offered now or not, if any."""
        return self._capabilities.get(name)


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
