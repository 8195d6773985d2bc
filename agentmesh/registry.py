"""Registered agents, the capability index, and the choice among capable agents. Pure.

Capability names match case-insensitively, either whole (``code-review``) or by one of
their words (``review``): the index maps each of those keys to the agents that have
it, so `find` costs O(matches), not O(agents).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from bisect import bisect_right
from collections.abc import Iterable, Iterator
from operator import attrgetter
from typing import Any

import attrs
import orjson

from ._journal import Journal
from .lifecycle import make_cursor, read_cursor
from .store import AgentRow

__all__ = ["AgentRecord", "Capability", "Registry", "capability_keys", "token_hash"]

_WORD = re.compile(r"[^\W_]+")


@attrs.frozen(kw_only=True)
class Capability:
    """Something an agent can do: a name, what it does, and a JSON Schema of its params."""

    name: str
    description: str = ""
    params_schema: dict[str, Any] | None = None


def capability_keys(name: str) -> set[str]:
    """Index keys of a capability name: the whole lowercased name and each of its words."""
    lowered = name.strip().lower()
    keys = set(_WORD.findall(lowered))
    if lowered:
        keys.add(lowered)
    return keys


def token_hash(token: str) -> bytes:
    """What the hub keeps of a resume token: its SHA-256 (the token itself never)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@attrs.define(kw_only=True, eq=False)
class AgentRecord:
    """One agent as the hub knows it. `online` is false while it may still resume."""

    agent_id: str
    name: str
    description: str
    capabilities: tuple[Capability, ...]
    metadata: dict[str, Any]
    token_hash: bytes  # `token_hash(resume token)`
    registered_at: float
    online: bool = True
    in_flight: int = 0  # tasks assigned to it and not yet finished
    last_assigned: int = 0  # assignment sequence number, to rotate among equals
    resume_by: float | None = None  # while offline: when its grace period ends
    hidden: bool = False  # a tool, not a worker: left out of `find`
    seq: int = attrs.field(default=0, init=False)  # registration order, set by `Registry.add`

    # Normalised name -> the agent's own spelling; computed once, read on every delegate.
    _names: dict[str, str] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._names = {c.name.strip().lower(): c.name for c in reversed(self.capabilities)}

    @property
    def offered(self) -> Iterable[str]:
        """The normalised (stripped, lowercased) names of its capabilities."""
        return self._names.keys()

    def offers(self, capability: str) -> bool:
        return capability.strip().lower() in self._names

    def capability_name(self, capability: str) -> str:
        """The agent's own spelling of `capability` (matched case-insensitively)."""
        return self._names.get(capability.strip().lower(), capability)

    def to_row(self) -> AgentRow:
        """The agent as a durable store keeps it: its registration, not its connection."""
        record = {
            "agent_id": self.agent_id,
            "name": self.name,
            "description": self.description,
            "capabilities": [attrs.asdict(c) for c in self.capabilities],
            "metadata": self.metadata,
            "token_hash": self.token_hash.hex(),
            "registered_at": self.registered_at,
            "hidden": self.hidden,
        }
        return AgentRow(agent_id=self.agent_id, seq=self.seq, record=orjson.dumps(record))

    @classmethod
    def from_row(cls, row: AgentRow) -> AgentRecord:
        """An agent read back from a store: offline, with no task in flight yet."""
        fields = orjson.loads(row.record)
        fields["capabilities"] = tuple(Capability(**c) for c in fields["capabilities"])
        fields["token_hash"] = bytes.fromhex(fields["token_hash"])
        agent = cls(online=False, **fields)
        agent.seq = row.seq
        return agent


class Registry:
    """All registered agents and the index from capability keys to agents. With a
    `journal`, every agent added or removed is marked there, for a durable store."""

    def __init__(self, journal: Journal | None = None) -> None:
        self.journal = journal
        self._agents: dict[str, AgentRecord] = {}
        self._index: dict[str, dict[str, AgentRecord]] = {}  # every key -> agents
        self._offering: dict[str, dict[str, AgentRecord]] = {}  # whole name -> agents
        self._assignments = itertools.count(1)
        self._registrations = itertools.count(1)

    def __len__(self) -> int:
        return len(self._agents)

    def __iter__(self) -> Iterator[AgentRecord]:
        return iter(self._agents.values())

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._agents

    def get(self, agent_id: str) -> AgentRecord | None:
        return self._agents.get(agent_id)

    def add(self, agent: AgentRecord) -> None:
        """Add `agent`, or replace the record with the same ID (a resume that re-registers)."""
        self.remove(agent.agent_id)
        agent.seq = next(self._registrations)
        self._file(agent)
        if self.journal is not None:
            self.journal.agent(agent.agent_id)

    def restore(self, agents: Iterable[AgentRecord]) -> None:
        """Add agents read back from a store, in registration order, keeping their `seq`."""
        last = 0
        for agent in agents:
            self._file(agent)
            last = max(last, agent.seq)
        self._registrations = itertools.count(last + 1)

    def _file(self, agent: AgentRecord) -> None:
        self._agents[agent.agent_id] = agent
        for index, keys in self._entries(agent):
            for key in keys:
                index.setdefault(key, {})[agent.agent_id] = agent

    def remove(self, agent_id: str) -> AgentRecord | None:
        agent = self._agents.pop(agent_id, None)
        if agent is not None:
            if self.journal is not None:
                self.journal.agent_gone(agent_id)
            for index, keys in self._entries(agent):
                for key in keys:
                    bucket = index[key]
                    del bucket[agent_id]
                    if not bucket:
                        del index[key]
        return agent

    def find(self, keyword: str) -> list[AgentRecord]:
        """Agents with a capability matching `keyword` (whole name or one word of it).

        An empty keyword lists every agent. Hidden agents are left out. Order is
        registration order.
        """
        return [agent for agent in self._matching(keyword).values() if not agent.hidden]

    def page(
        self, keyword: str, *, cursor: str | None = None, limit: int = 100
    ) -> tuple[list[tuple[str, AgentRecord]], str | None]:
        """`find`, a page at a time: up to `limit` agents from where `cursor` (from an
        earlier page) left off, in registration order.

        Each agent comes with the cursor that resumes the listing at it; the second value
        resumes after the last, or is None when no agent is left. An agent that registers
        (or resumes) after the first page comes at the end. Costs O(matches) at C speed
        plus O(limit). Raises ValueError for a cursor `page` did not make.
        """
        after = read_cursor("a", cursor) or 0
        matching = list(self._matching(keyword).values())  # in registration order
        found: list[tuple[str, AgentRecord]] = []
        for agent in itertools.islice(
            matching, bisect_right(matching, after, key=attrgetter("seq")), None
        ):
            if agent.hidden:
                continue
            if len(found) == limit:
                return found, make_cursor("a", found[-1][1].seq)
            found.append((make_cursor("a", agent.seq - 1), agent))
        return found, None

    def _matching(self, keyword: str) -> dict[str, AgentRecord]:
        key = keyword.strip().lower()
        return self._agents if not key else self._index.get(key, {})

    def select(self, capability: str) -> AgentRecord | None:
        """The agent to give a new `capability` task to, or None if nobody offers it.

        Online agents first; among them the fewest tasks in flight, then the one that
        waited longest since its last assignment. An agent that is resuming is chosen
        only when no capable agent is online (its task waits, PENDING, for it).
        """
        best: AgentRecord | None = None
        for agent in self._offering.get(capability.strip().lower(), {}).values():
            if best is None or (not agent.online, agent.in_flight, agent.last_assigned) < (
                not best.online,
                best.in_flight,
                best.last_assigned,
            ):
                best = agent
        return best

    def assigned(self, agent: AgentRecord) -> None:
        """Count one more task in flight for `agent`."""
        agent.in_flight += 1
        agent.last_assigned = next(self._assignments)

    def finished(self, agent_id: str) -> None:
        """Count one task of `agent_id` as finished (no-op for an agent that left)."""
        agent = self._agents.get(agent_id)
        if agent is not None and agent.in_flight > 0:
            agent.in_flight -= 1

    def _entries(
        self, agent: AgentRecord
    ) -> tuple[tuple[dict[str, dict[str, AgentRecord]], Iterable[str]], ...]:
        """Each index with the keys `agent` is filed under in it."""
        return ((self._index, self._keys(agent.capabilities)), (self._offering, agent.offered))

    @staticmethod
    def _keys(capabilities: Iterable[Capability]) -> set[str]:
        keys: set[str] = set()
        for capability in capabilities:
            keys |= capability_keys(capability.name)
        return keys
