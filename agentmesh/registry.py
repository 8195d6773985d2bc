"""Registered agents, the search index, and the choice among capable agents. Pure.

Discovery splits a keyword into words (on spaces and punctuation, as names are split)
and ranks the agents it matches: a capability named exactly so, then a capability whose
name has the words in that order, then agents whose text (capability names and
descriptions, the agent's name, description and tags) has all the words. An index from
each word to the agents whose text has it keeps a search O(matches), not O(agents).

Delegation by capability picks among the agents offering it that have a free slot
(`AgentRecord.has_room`: an agent's and a capability's `max_concurrency`).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from bisect import bisect_right
from collections.abc import Callable, Hashable, Iterable, Iterator
from operator import attrgetter
from typing import Any

import attrs
import orjson

from ._journal import Journal
from .lifecycle import make_cursor, read_cursor
from .store import AgentRow

__all__ = [
    "AgentRecord",
    "Capability",
    "Match",
    "Registry",
    "capability_keys",
    "token_hash",
    "words",
]

_WORD = re.compile(r"[^\W_]+")
# How a search matched an agent, best first: its `score` is 3, 2 or 1.
EXACT, NAME, TEXT = "exact", "name", "text"
_SCORES = {EXACT: 3, NAME: 2, TEXT: 1}
_RANKED = 1 << 48  # a ranked cursor's position: (3 - score) * _RANKED + seq


@attrs.frozen(kw_only=True)
class Capability:
    """Something an agent can do: a name, what it does, and a JSON Schema of its params."""

    name: str
    description: str = ""
    params_schema: dict[str, Any] | None = None
    max_concurrency: int | None = None  # its tasks one agent runs at once (None: no limit)


@attrs.frozen(kw_only=True, slots=True)
class Match:
    """Why a search found an agent: `reason` is `exact` (a capability of that name),
    `name` (a capability whose name has the words in order) or `text` (all the words in
    its text); `score` 3, 2 or 1; `capability` the one that matched, if one did."""

    reason: str
    score: int
    capability: str | None = None


def words(text: str) -> list[str]:
    """The lowercased words of `text`, split on spaces and punctuation."""
    return _WORD.findall(text.lower())


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
    tags: tuple[str, ...] = ()
    max_concurrency: int | None = None  # tasks it runs at once, in all (None: no limit)
    # In a cluster: the hub that holds it (None: this one) and its lease's epoch there.
    hub: str | None = None
    epoch: int = 0
    seq: int = attrs.field(default=0, init=False)  # registration order, set by `Registry.add`
    # Normalised capability name -> its tasks in flight, kept only when limited.
    running: dict[str, int] = attrs.field(factory=dict, init=False)
    # In a cluster, for an agent of another hub: the tasks its hub says it runs beyond
    # those this hub gave it (`load` messages). It counts in selection, not in limits.
    elsewhere: int = attrs.field(default=0, init=False)

    # Normalised name -> the agent's own spelling; computed once, read on every delegate.
    _names: dict[str, str] = attrs.field(init=False, repr=False)
    # Normalised name -> its `max_concurrency`, for the capabilities that have one.
    _limits: dict[str, int] = attrs.field(init=False, repr=False)
    limited: bool = attrs.field(init=False, repr=False)  # any limit at all
    # For search: each capability's name words, every word of its text, its tags.
    _name_words: tuple[tuple[str, tuple[str, ...]], ...] = attrs.field(init=False, repr=False)
    _cap_text: tuple[tuple[str, frozenset[str]], ...] = attrs.field(init=False, repr=False)
    text_words: frozenset[str] = attrs.field(init=False, repr=False)
    tag_keys: frozenset[str] = attrs.field(init=False, repr=False)
    # Its capabilities as protocol version 1 has them (no `max_concurrency`).
    v1_capabilities: tuple[Capability, ...] = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._names = {c.name.strip().lower(): c.name for c in reversed(self.capabilities)}
        self._limits = {
            c.name.strip().lower(): c.max_concurrency
            for c in reversed(self.capabilities)
            if c.max_concurrency is not None
        }
        self.limited = self.max_concurrency is not None or bool(self._limits)
        self.v1_capabilities = (
            tuple(attrs.evolve(c, max_concurrency=None) for c in self.capabilities)
            if self._limits
            else self.capabilities
        )
        self._name_words = tuple((c.name, tuple(words(c.name))) for c in self.capabilities)
        self._cap_text = tuple(
            (c.name, frozenset(words(c.name)) | frozenset(words(c.description)))
            for c in self.capabilities
        )
        text = [self.name, self.description, *self.tags]
        for c in self.capabilities:
            text += (c.name, c.description)
        self.text_words = frozenset(w for t in text for w in words(t))
        self.tag_keys = frozenset(t.strip().lower() for t in self.tags)

    def has_room(self, capability: str) -> bool:
        """Whether it may take one more task of `capability` (normalised) now."""
        if self.max_concurrency is not None and self.in_flight >= self.max_concurrency:
            return False
        limit = self._limits.get(capability)
        return limit is None or self.running.get(capability, 0) < limit

    def match(self, query: tuple[str, ...]) -> Match:
        """How `query` (words, all of them in `text_words`) matches this agent."""
        best: Match | None = None
        for name, name_words in self._name_words:
            if name_words == query:
                return Match(reason=EXACT, score=3, capability=name)
            if best is None and _has_run(name_words, query):
                best = Match(reason=NAME, score=2, capability=name)
        if best is not None:
            return best
        top, found = None, 0  # the capability whose text has the most of the words
        wanted = set(query)
        for name, text in self._cap_text:
            hits = len(wanted & text)
            if hits > found:
                top, found = name, hits
        return Match(reason=TEXT, score=1, capability=top)

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
            "tags": list(self.tags),
            "max_concurrency": self.max_concurrency,
        }
        if self.epoch:  # its lease in a cluster, since it resumed there on another hub
            record["epoch"] = self.epoch
        return AgentRow(agent_id=self.agent_id, seq=self.seq, record=orjson.dumps(record))

    @classmethod
    def from_row(cls, row: AgentRow) -> AgentRecord:
        """An agent read back from a store: offline, with no task in flight yet."""
        fields = orjson.loads(row.record)
        fields["capabilities"] = tuple(Capability(**c) for c in fields["capabilities"])
        fields["tags"] = tuple(fields.get("tags", ()))
        fields["token_hash"] = bytes.fromhex(fields["token_hash"])
        agent = cls(online=False, **fields)
        agent.seq = row.seq
        return agent


class Registry:
    """All registered agents and the indexes over them. With a `journal`, every agent
    added or removed is marked there, for a durable store."""

    def __init__(self, journal: Journal | None = None) -> None:
        self.journal = journal
        self._agents: dict[str, AgentRecord] = {}
        self._index: dict[str, dict[str, AgentRecord]] = {}  # every word of its text -> agents
        self._offering: dict[str, dict[str, AgentRecord]] = {}  # whole name -> agents
        self._tagged: dict[str, dict[str, AgentRecord]] = {}  # tag -> agents
        self._assignments = itertools.count(1)
        self._registrations = itertools.count(1)
        self._generation = 0  # moves on every add and remove
        self.remote = 0  # how many of the agents are held by other hubs (`AgentRecord.hub`)
        self._last: tuple[tuple[Hashable, int], list[tuple[int, AgentRecord, Match]]] | None
        self._last = None  # the last search's key and ranking

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
        if self.journal is not None and agent.hub is None:  # a remote one is not ours
            self.journal.agent(agent.agent_id)

    def restore(self, agents: Iterable[AgentRecord]) -> None:
        """Add agents read back from a store, in registration order, keeping their `seq`."""
        last = 0
        for agent in agents:
            self._file(agent)
            last = max(last, agent.seq)
        self._registrations = itertools.count(last + 1)

    def _file(self, agent: AgentRecord) -> None:
        self._generation += 1
        if agent.hub is not None:
            self.remote += 1
        self._agents[agent.agent_id] = agent
        for index, keys in self._entries(agent):
            for key in keys:
                index.setdefault(key, {})[agent.agent_id] = agent

    def remove(self, agent_id: str) -> AgentRecord | None:
        agent = self._agents.pop(agent_id, None)
        if agent is not None:
            self._generation += 1
            if agent.hub is not None:
                self.remote -= 1
            elif self.journal is not None:
                self.journal.agent_gone(agent_id)
            for index, keys in self._entries(agent):
                for key in keys:
                    bucket = index[key]
                    del bucket[agent_id]
                    if not bucket:
                        del index[key]
        return agent

    def find(self, keyword: str) -> list[AgentRecord]:
        """Every agent `keyword` matches, best first (see `search`); hidden ones left out."""
        found, _ = self.search(keyword, limit=len(self._agents) or 1)
        return [agent for _, agent, _ in found]

    def search(
        self,
        keyword: str,
        *,
        online: bool = False,
        tags: Iterable[str] = (),
        cursor: str | None = None,
        limit: int = 100,
    ) -> tuple[list[tuple[str, AgentRecord, Match | None]], str | None]:
        """Agents `keyword` matches, a page of up to `limit` at a time from where `cursor`
        (from an earlier page) left off; hidden agents are left out, and with `online`
        the offline ones, with `tags` those without every one of them.

        Ranked best first (`Match.score`), then in registration order; an empty keyword
        lists every agent in registration order, with no `Match`. Each agent comes with
        the cursor that resumes the listing at it; the second value resumes after the
        last, or is None when no agent is left. Costs O(the agents with the keyword's
        rarest word (or tag)) plus O(limit log matches). Raises ValueError for a cursor
        `search` did not make.
        """
        query = tuple(words(keyword))
        wanted = frozenset(t.strip().lower() for t in tags)
        if not query and keyword.strip():  # no word in it, as "++": its name whole
            key = keyword.strip().lower()
            return self._ranked(
                (key, wanted),
                lambda: self._offering.get(key, {}).values(),
                lambda a: Match(reason=EXACT, score=3, capability=a.capability_name(key)),
                online,
                wanted,
                cursor,
                limit,
            )
        if query:
            return self._ranked(
                (query, wanted),
                lambda: self._having(query, wanted),
                lambda a: a.match(query),
                online,
                wanted,
                cursor,
                limit,
            )
        after = read_cursor("a", cursor) or 0
        pool = self._tagged_all(wanted) if wanted else list(self._agents.values())
        found: list[tuple[str, AgentRecord, Match | None]] = []
        for agent in itertools.islice(pool, bisect_right(pool, after, key=attrgetter("seq")), None):
            if agent.hidden or (online and not agent.online) or not wanted <= agent.tag_keys:
                continue
            if len(found) == limit:
                return found, make_cursor("a", found[-1][1].seq)
            found.append((make_cursor("a", agent.seq - 1), agent, None))
        return found, None

    def _having(self, query: tuple[str, ...], tags: frozenset[str]) -> list[AgentRecord]:
        """The agents whose text has every word of `query` (and every tag of `tags`), from
        the smallest posting list: registration order."""
        postings = [self._index.get(w, {}) for w in set(query)]
        postings += [self._tagged.get(t, {}) for t in tags]
        postings.sort(key=len)
        first, rest = postings[0], postings[1:]
        return [a for i, a in first.items() if all(i in other for other in rest)]

    def _tagged_all(self, tags: frozenset[str]) -> list[AgentRecord]:
        """The agents with every tag of `tags`, in registration order."""
        postings = sorted((self._tagged.get(t, {}) for t in tags), key=len)
        first, rest = postings[0], postings[1:]
        found = [a for i, a in first.items() if all(i in other for other in rest)]
        found.sort(key=attrgetter("seq"))
        return found

    def _ranked(
        self,
        key: Hashable,
        candidates: Callable[[], Iterable[AgentRecord]],
        match: Callable[[AgentRecord], Match],
        online: bool,
        tags: frozenset[str],
        cursor: str | None,
        limit: int,
    ) -> tuple[list[tuple[str, AgentRecord, Match | None]], str | None]:
        """A page of `candidates`, best match first: its position is the score and the
        registration order (`_RANKED`), which a cursor holds. The ranking of the last
        search (`key`) is kept until an agent is added or removed, so that its next
        pages cost O(limit), not a new ranking each."""
        after = read_cursor("r", cursor)
        after = -1 if after is None else after
        cached = self._last
        if cached is not None and cached[0] == (key, self._generation):
            ranking = cached[1]
        else:
            ranking = []
            for agent in candidates():
                if agent.hidden or not tags <= agent.tag_keys:
                    continue
                how = match(agent)
                ranking.append(((3 - how.score) * _RANKED + agent.seq, agent, how))
            ranking.sort(key=_first)
            self._last = ((key, self._generation), ranking)
        found: list[tuple[str, AgentRecord, Match | None]] = []
        last = after
        for position, agent, how in itertools.islice(
            ranking, bisect_right(ranking, after, key=_first), None
        ):
            if online and not agent.online:
                continue
            if len(found) == limit:
                return found, make_cursor("r", last)
            found.append((make_cursor("r", position - 1), agent, how))
            last = position
        return found, None

    def offers(self, capability: str) -> bool:
        """Whether some agent (online or not) offers `capability`."""
        return capability.strip().lower() in self._offering

    def select(self, capability: str) -> AgentRecord | None:
        """The agent to give a new `capability` task to, or None if no agent offering it
        has a free slot (`has_room`; see `offers`).

        Online agents first; among them the fewest tasks in flight (for an agent of
        another hub, with those its hub reports: `elsewhere`), then a local agent
        before one on another hub (`hub`), then the one that waited longest since its
        last assignment. An agent that is resuming is chosen only when no capable agent
        is online (its task waits, PENDING, for it): if they are all full, the task
        waits for one of them instead.
        """
        key = capability.strip().lower()
        best: AgentRecord | None = None
        full_online = False
        for agent in self._offering.get(key, {}).values():
            if agent.limited and not agent.has_room(key):
                full_online = full_online or agent.online
                continue
            if best is None or (
                not agent.online,
                agent.in_flight + agent.elsewhere,
                agent.hub is not None,
                agent.last_assigned,
            ) < (
                not best.online,
                best.in_flight + best.elsewhere,
                best.hub is not None,
                best.last_assigned,
            ):
                best = agent
        if best is not None and not best.online and full_online:
            return None
        return best

    def assigned(self, agent: AgentRecord, capability: str) -> None:
        """Count one more task of `capability` (normalised) in flight for `agent`."""
        agent.in_flight += 1
        agent.last_assigned = next(self._assignments)
        if agent.limited:
            agent.running[capability] = agent.running.get(capability, 0) + 1

    def finished(self, agent_id: str, capability: str) -> AgentRecord | None:
        """Count one task of `capability` (as spelt, any case) of `agent_id` as finished;
        return the agent (None if it left)."""
        agent = self._agents.get(agent_id)
        if agent is not None and agent.in_flight > 0:
            agent.in_flight -= 1
            if agent.limited:  # only then is the capability's count kept
                capability = capability.strip().lower()
                left = agent.running.get(capability, 0) - 1
                if left > 0:
                    agent.running[capability] = left
                else:
                    agent.running.pop(capability, None)
        return agent

    def _entries(
        self, agent: AgentRecord
    ) -> tuple[tuple[dict[str, dict[str, AgentRecord]], Iterable[str]], ...]:
        """Each index with the keys `agent` is filed under in it."""
        return (
            (self._index, agent.text_words),
            (self._offering, agent.offered),
            (self._tagged, agent.tag_keys),
        )


def _first(entry: tuple[int, AgentRecord, Match]) -> int:
    return entry[0]


def _has_run(found: tuple[str, ...], query: tuple[str, ...]) -> bool:
    """Whether `query` occurs in `found` as consecutive words."""
    n = len(query)
    return any(found[i : i + n] == query for i in range(len(found) - n + 1))
