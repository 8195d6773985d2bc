"""The agent registry: capability keys, the index behind find(), and select()."""

from __future__ import annotations

import pytest

from agentmesh.registry import AgentRecord, Capability, Match, Registry, capability_keys


def agent(
    agent_id: str, *capabilities: str, online: bool = True, in_flight: int = 0
) -> AgentRecord:
    return AgentRecord(
        agent_id=agent_id,
        name=f"name-{agent_id}",
        description="",
        capabilities=tuple(Capability(name=c) for c in capabilities),
        metadata={},
        token_hash=f"tok-{agent_id}".encode(),
        registered_at=0.0,
        online=online,
        in_flight=in_flight,
    )


def registry(*agents: AgentRecord) -> Registry:
    reg = Registry()
    for a in agents:
        reg.add(a)
    return reg


def ids(agents: list[AgentRecord]) -> list[str]:
    return [a.agent_id for a in agents]


# ---------------------------------------------------------------------------------------
# capability_keys


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("echo", {"echo"}),
        ("Code-Review", {"code-review", "code", "review"}),
        ("  Translate  ", {"translate"}),
        ("web search", {"web search", "web", "search"}),
        ("snake_case_name", {"snake_case_name", "snake", "case", "name"}),
        ("v2.summarize", {"v2.summarize", "v2", "summarize"}),
        ("a--b", {"a--b", "a", "b"}),
        ("Übersetzung", {"übersetzung"}),
        ("", set()),
        ("   ", set()),
        ("--", {"--"}),
    ],
)
def test_capability_keys(name: str, keys: set[str]) -> None:
    assert capability_keys(name) == keys


# ---------------------------------------------------------------------------------------
# find


def test_find_whole_name_and_words_case_insensitive() -> None:
    reg = registry(agent("a1", "code-review"))
    assert ids(reg.find("code-review")) == ["a1"]
    assert ids(reg.find("Code-Review")) == ["a1"]
    assert ids(reg.find("  CODE-REVIEW ")) == ["a1"]
    assert ids(reg.find("review")) == ["a1"]
    assert ids(reg.find("REVIEW")) == ["a1"]
    assert ids(reg.find("code")) == ["a1"]


@pytest.mark.parametrize("keyword", ["rev", "view", "code-rev", "codereview", "code reviews", "x"])
def test_find_does_not_match_partial_words(keyword: str) -> None:
    reg = registry(agent("a1", "code-review"))
    assert reg.find(keyword) == []


def test_find_returns_records() -> None:
    a1 = agent("a1", "echo")
    reg = registry(a1)
    assert reg.find("echo") == [a1]
    assert reg.find("echo")[0] is a1


def test_find_several_matches_in_registration_order() -> None:
    reg = registry(
        agent("z", "code-review"),
        agent("a", "review"),
        agent("m", "translate"),
        agent("b", "peer_review", "echo"),
    )
    # Ranked: the capability named so first, then names with the word, each in
    # registration order.
    assert ids(reg.find("review")) == ["a", "z", "b"]
    assert ids(reg.find("echo")) == ["b"]


def test_find_agent_with_two_matching_capabilities_listed_once() -> None:
    reg = registry(agent("a1", "review", "code-review", "Review"))
    assert ids(reg.find("review")) == ["a1"]


@pytest.mark.parametrize("keyword", ["", "   "])
def test_find_empty_keyword_lists_all_in_registration_order(keyword: str) -> None:
    reg = registry(agent("c", "x"), agent("a"), agent("b", "y", online=False))
    assert ids(reg.find(keyword)) == ["c", "a", "b"]


def test_find_empty_registry() -> None:
    reg = Registry()
    assert reg.find("") == []
    assert reg.find("echo") == []


def test_find_two_matches_among_many_non_matching() -> None:
    reg = Registry()
    for i in range(5000):
        reg.add(agent(f"n{i}", f"translate-{i}", "summarize"))
        if i == 1234:
            reg.add(agent("match-1", "code-review"))
        if i == 4321:
            reg.add(agent("match-2", "review"))
    assert len(reg) == 5002
    assert ids(reg.find("review")) == ["match-2", "match-1"]  # exact, then a name word
    assert ids(reg.find("code-review")) == ["match-1"]
    assert len(reg.find("summarize")) == 5000
    assert ids(reg.find("translate-4999")) == ["n4999"]


# ---------------------------------------------------------------------------------------
# add / remove / get


def test_get_contains_len_iter() -> None:
    a1, a2 = agent("a1", "echo"), agent("a2")
    reg = registry(a1, a2)
    assert len(reg) == 2
    assert reg.get("a1") is a1
    assert reg.get("nope") is None
    assert "a2" in reg
    assert "nope" not in reg
    assert list(reg) == [a1, a2]


def test_remove_cleans_the_index() -> None:
    a1 = agent("a1", "code-review", "echo")
    reg = registry(a1, agent("a2", "echo"))
    assert reg.remove("a1") is a1
    assert reg.get("a1") is None
    assert "a1" not in reg
    assert len(reg) == 1
    assert reg.find("code-review") == []
    assert reg.find("review") == []
    assert reg.find("code") == []
    assert ids(reg.find("echo")) == ["a2"]
    assert ids(reg.find("")) == ["a2"]
    assert reg.select("code-review") is None


def test_remove_unknown_is_none() -> None:
    reg = registry(agent("a1", "echo"))
    assert reg.remove("zzz") is None
    assert ids(reg.find("echo")) == ["a1"]


def test_remove_twice_and_re_add() -> None:
    reg = registry(agent("a1", "echo"))
    reg.remove("a1")
    assert reg.remove("a1") is None
    assert reg.find("echo") == []
    again = agent("a1", "echo")
    reg.add(again)
    assert reg.find("echo") == [again]


def test_remove_all_then_index_is_empty() -> None:
    reg = registry(agent("a1", "code-review"), agent("a2", "review"))
    reg.remove("a1")
    reg.remove("a2")
    assert len(reg) == 0
    for keyword in ("", "review", "code", "code-review"):
        assert reg.find(keyword) == []


def test_add_existing_id_replaces_and_reindexes() -> None:
    old = agent("a1", "code-review", "echo")
    reg = registry(old, agent("a2", "echo"))
    new = agent("a1", "translate")
    reg.add(new)
    assert len(reg) == 2
    assert reg.get("a1") is new
    assert reg.find("code-review") == []
    assert reg.find("review") == []
    assert ids(reg.find("echo")) == ["a2"]
    assert reg.find("translate") == [new]
    assert reg.select("echo") is reg.get("a2")
    assert reg.select("translate") is new
    # Replacing counts as a new registration: it now comes last.
    assert ids(reg.find("")) == ["a2", "a1"]


def test_add_existing_id_with_same_capabilities_is_listed_once() -> None:
    reg = registry(agent("a1", "echo"))
    replacement = agent("a1", "echo")
    reg.add(replacement)
    assert reg.find("echo") == [replacement]
    assert len(reg) == 1


# ---------------------------------------------------------------------------------------
# select


def test_select_nobody_offers_it() -> None:
    assert Registry().select("echo") is None
    reg = registry(agent("a1", "translate"))
    assert reg.select("echo") is None
    assert reg.select("") is None


def test_select_only_exact_capability_name() -> None:
    reg = registry(agent("a1", "code-review"))
    assert ids(reg.find("review")) == ["a1"]  # a word match for find...
    assert reg.select("review") is None  # ...but not an offer of "review"
    assert reg.select("code") is None
    assert reg.select("code-review") is reg.get("a1")


def test_select_exact_name_among_word_matches() -> None:
    reg = registry(agent("a1", "code-review"), agent("a2", "review", in_flight=5))
    assert reg.select("review") is reg.get("a2")


def test_select_case_and_whitespace_insensitive() -> None:
    reg = registry(agent("a1", "Code-Review"))
    assert reg.select("  code-REVIEW ") is reg.get("a1")


def test_select_fewest_in_flight() -> None:
    reg = registry(
        agent("busy", "echo", in_flight=3),
        agent("idle", "echo", in_flight=0),
        agent("some", "echo", in_flight=1),
    )
    assert reg.select("echo") is reg.get("idle")


def test_select_ties_rotate() -> None:
    agents = [agent("a", "echo"), agent("b", "echo"), agent("c", "echo")]
    reg = registry(*agents)
    chosen = []
    for _ in range(7):
        pick = reg.select("echo")
        assert pick is not None
        chosen.append(pick.agent_id)
        reg.assigned(pick, "echo")
        reg.finished(pick.agent_id, "echo")
    assert chosen == ["a", "b", "c", "a", "b", "c", "a"]
    assert [a.in_flight for a in agents] == [0, 0, 0]


def test_select_spreads_load_when_tasks_stay_in_flight() -> None:
    a, b = agent("a", "echo"), agent("b", "echo")
    reg = registry(a, b)
    chosen = []
    for _ in range(4):
        pick = reg.select("echo")
        assert pick is not None
        chosen.append(pick.agent_id)
        reg.assigned(pick, "echo")
    assert chosen == ["a", "b", "a", "b"]
    assert (a.in_flight, b.in_flight) == (2, 2)
    reg.finished("b", "echo")
    assert reg.select("echo") is b


def test_assigned_and_finished_counts() -> None:
    a = agent("a", "echo")
    reg = registry(a)
    reg.assigned(a, "echo")
    reg.assigned(a, "echo")
    assert a.in_flight == 2
    first = a.last_assigned
    reg.assigned(a, "echo")
    assert a.last_assigned > first
    reg.finished("a", "echo")
    assert a.in_flight == 2
    reg.finished("a", "echo")
    reg.finished("a", "echo")
    reg.finished("a", "echo")  # never below zero
    assert a.in_flight == 0
    reg.finished("gone", "echo")  # an agent that left: no error


def test_select_online_preferred_over_offline_even_if_busier() -> None:
    reg = registry(
        agent("resuming", "echo", online=False, in_flight=0),
        agent("online-busy", "echo", in_flight=9),
    )
    assert reg.select("echo") is reg.get("online-busy")


def test_select_offline_when_it_is_the_only_one() -> None:
    reg = registry(agent("resuming", "echo", online=False, in_flight=4), agent("other", "x"))
    assert reg.select("echo") is reg.get("resuming")


def test_select_among_offline_fewest_in_flight() -> None:
    reg = registry(
        agent("off-busy", "echo", online=False, in_flight=2),
        agent("off-idle", "echo", online=False, in_flight=1),
    )
    assert reg.select("echo") is reg.get("off-idle")


def test_select_follows_online_flag_changes() -> None:
    a = agent("a", "echo")
    b = agent("b", "echo", in_flight=3)
    reg = registry(a, b)
    assert reg.select("echo") is a
    a.online = False
    assert reg.select("echo") is b
    b.online = False
    assert reg.select("echo") is a


def test_agent_offers() -> None:
    a = agent("a", "Code-Review", "echo")
    assert a.offers("code-review")
    assert a.offers(" ECHO ")
    assert not a.offers("review")
    assert not a.offers("")


# ---------------------------------------------------------------------------------------
# Ranked search: the matching table (docs/protocol.md, "How discover matches")


def _described(
    agent_id: str,
    capabilities: dict[str, str],
    *,
    name: str = "",
    description: str = "",
    tags: tuple[str, ...] = (),
    online: bool = True,
) -> AgentRecord:
    return AgentRecord(
        agent_id=agent_id,
        name=name or agent_id,
        description=description,
        capabilities=tuple(Capability(name=c, description=d) for c, d in capabilities.items()),
        metadata={},
        token_hash=b"t",
        registered_at=0.0,
        tags=tags,
        online=online,
    )


def _network() -> Registry:
    return registry(
        _described("x", {"code-review-x": "Reviews Python code for bugs"}),
        _described("exact", {"code-review": ""}),
        _described("style", {"lint": "checks code style, and does a quick review"}),
        _described("named", {"summarize": ""}, name="Code Review Bot"),
        _described("tagged", {"translate": ""}, tags=("code", "Review")),
        _described("reversed", {"review-code": ""}),
        _described("other", {"echo": "says it back"}, description="nothing to see"),
    )


_CODE_REVIEW = [
    ("exact", "exact", "code-review"),
    ("x", "name", "code-review-x"),
    ("style", "text", "lint"),
    ("named", "text", None),
    ("tagged", "text", None),
    ("reversed", "text", "review-code"),
]


@pytest.mark.parametrize(
    ("keyword", "expected"),
    [
        # Exact name (any case, any punctuation between the words), then the names with
        # the words in that order, then every agent whose text has all the words.
        ("code review", _CODE_REVIEW),
        ("code-review", _CODE_REVIEW),  # the same words: the same answer
        ("CODE_REVIEW", _CODE_REVIEW),
        ("  Code,  Review! ", _CODE_REVIEW),
        (
            "review code",
            [
                ("reversed", "exact", "review-code"),
                ("x", "text", "code-review-x"),
                ("exact", "text", "code-review"),
                ("style", "text", "lint"),
                ("named", "text", None),
                ("tagged", "text", None),
            ],
        ),
        ("python bugs", [("x", "text", "code-review-x")]),
        ("code-review-x", [("x", "exact", "code-review-x")]),
        ("review x", [("x", "name", "code-review-x")]),
        ("bot", [("named", "text", None)]),
        ("echo", [("other", "exact", "echo")]),
        ("see", [("other", "text", None)]),
        ("reviews", [("x", "text", "code-review-x")]),  # a word is matched whole
        ("revi", []),
        ("code nothing", []),  # every word must match
    ],
)
def test_search_matches_and_ranks(
    keyword: str, expected: list[tuple[str, str, str | None]]
) -> None:
    found, rest = _network().search(keyword)
    got = [(a.agent_id, m.reason, m.capability) for _, a, m in found if m is not None]
    assert got == expected
    assert [m.score for _, _, m in found if m is not None] == [
        {"exact": 3, "name": 2, "text": 1}[reason] for _, reason, _ in expected
    ]
    assert rest is None


def test_search_filters_online_and_tags() -> None:
    reg = registry(
        _described("a", {"echo": ""}, tags=("gpu", "eu")),
        _described("b", {"echo": ""}, tags=("GPU",), online=False),
        _described("c", {"echo": ""}, tags=("cpu",)),
    )
    pick = lambda **kw: [a.agent_id for _, a, _ in reg.search("echo", **kw)[0]]  # noqa: E731
    assert pick() == ["a", "b", "c"]
    assert pick(online=True) == ["a", "c"]
    assert pick(tags=["gpu"]) == ["a", "b"]  # any case
    assert pick(tags=["gpu", "eu"]) == ["a"]
    assert pick(tags=["gpu"], online=True) == ["a"]
    assert pick(tags=["tpu"]) == []
    no_keyword = [a.agent_id for _, a, m in reg.search("", tags=["gpu"])[0] if m is None]
    assert no_keyword == ["a", "b"]


def test_ranked_pages_resume_where_they_left_off() -> None:
    reg = _network()
    everyone = [a.agent_id for _, a, _ in reg.search("code review")[0]]
    pages, cursor = [], None
    while True:
        found, cursor = reg.search("code review", cursor=cursor, limit=2)
        pages.append([a.agent_id for _, a, _ in found])
        if cursor is None:
            break
    assert pages == [everyone[0:2], everyone[2:4], everyone[4:6]]
    with pytest.raises(ValueError, match="not a cursor"):
        reg.search("code review", cursor="a1")  # a cursor of the unranked listing


def test_search_looks_only_at_the_agents_with_the_rarest_word() -> None:
    reg = Registry()
    for i in range(10_000):
        reg.add(_described(f"n{i}", {f"summarize-{i % 7}": "long texts"}))
    reg.add(_described("needle", {"summarize-0": "and code review"}))
    candidates = reg._having(("summarize", "review"), frozenset())
    assert [a.agent_id for a in candidates] == ["needle"]  # not the 10,000 summarizers
    found, _ = reg.search("summarize review")
    assert [a.agent_id for _, a, _ in found] == ["needle"]


def test_the_pages_after_the_first_reuse_its_ranking(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = Registry()
    for i in range(3000):
        reg.add(_described(f"n{i}", {f"task-{i}": "a helpful worker"}))
    calls = 0
    real = AgentRecord.match

    def counted(self: AgentRecord, query: tuple[str, ...]) -> Match:
        nonlocal calls
        calls += 1
        return real(self, query)

    monkeypatch.setattr(AgentRecord, "match", counted)
    seen, cursor, pages = [], None, 0
    while True:
        found, cursor = reg.search("helpful worker", cursor=cursor, limit=100)
        seen += [a.agent_id for _, a, _ in found]
        pages += 1
        if cursor is None:
            break
    assert seen == [f"n{i}" for i in range(3000)]
    assert pages == 30
    assert calls == 3000  # ranked once, not once a page
    reg.add(_described("late", {"x": "helpful worker"}))  # the ranking is made again
    assert reg.find("helpful worker")[-1].agent_id == "late"
