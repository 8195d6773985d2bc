"""Floods a client can cause: identities made at line rate, log lines at line rate."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from agentmesh import Hub, HubConfig
from agentmesh._logs import LogLimiter

from .conftest import WAIT

# ---------------------------------------------------------------------------------------
# Identities: new ones and failed resumes, per connection


@pytest.fixture
def hub_config() -> HubConfig:
    return HubConfig(max_registrations_per_connection=5, max_failed_resumes=3)


async def register(client: Any, **extra: Any) -> dict[str, Any]:
    """A `register` on `client`'s connection, then a `deregister` if it made an agent,
    so that the connection may register again."""
    reply = await client.request("register", {"name": "flood", **extra})
    if reply["type"] == "register":
        assert (await client.request("deregister"))["type"] == "deregister"
    return reply


def refused(reply: dict[str, Any], message: str) -> bool:
    payload = reply["payload"]
    return reply["type"] == "error" and payload == {
        "code": "limit_exceeded",
        "message": message,
        "details": None,
    }


async def test_a_connection_makes_a_limited_number_of_identities(hub: Hub, connect: Any) -> None:
    made: set[str] = set()
    async with connect() as flood:
        for _ in range(5):
            reply = await register(flood)
            made.add(reply["payload"]["agent_id"])
        assert len(made) == 5
        reply = await register(flood)
        assert refused(reply, "at most 5 new identities per connection"), reply
        assert len(hub.router.registry) == 0  # each one deregistered; the 6th never made
        reply = await flood.request("heartbeat")  # the connection stays usable
        assert reply["type"] == "heartbeat_ack"
    async with connect() as fresh:  # the budget is per connection
        reply = await fresh.request("register", {"name": "next"})
        assert reply["type"] == "register", reply
        assert len(hub.router.registry) == 1


async def test_failed_resumes_are_limited_then_every_resume_is_refused(
    hub: Hub, connect: Any
) -> None:
    async with connect() as owner:
        await owner.register("owner")
        good = {"agent_id": owner.agent_id, "token": owner.resume_token}
    async with connect() as guesser:
        bad_resumes = [
            {"agent_id": good["agent_id"], "token": "guess-1"},
            {"agent_id": "agt_nobody", "token": "x"},
            {"agent_id": good["agent_id"], "token": "guess-2"},
        ]
        for resume in bad_resumes:  # not honoured: a fresh identity, as documented
            reply = await register(guesser, resume=resume)
            assert reply["payload"]["resumed"] is False, reply
        assert len(hub.router.registry) == 1  # the owner, waiting to resume
        for resume in [{"agent_id": good["agent_id"], "token": "guess-3"}, good]:
            reply = await register(guesser, resume=resume)
            assert refused(reply, "at most 3 failed resumes per connection"), reply
        reply = await register(guesser)  # a new identity, not a resume: still allowed
        assert reply["type"] == "register", reply
    async with connect() as owner_again:  # another connection resumes with the token
        reply = await owner_again.request("register", {"name": "owner", "resume": good})
        assert reply["payload"]["resumed"] is True, reply


async def test_the_router_forgets_a_connections_counts_when_it_goes(hub: Hub, connect: Any) -> None:
    for _ in range(3):
        async with connect() as client:
            await register(client)
        # The client waits for the hub's TCP close, which comes after `disconnected`.
        assert not len(hub.router.limits)


# ---------------------------------------------------------------------------------------
# Log lines: LogLimiter, with a manual clock


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(clock: Clock) -> LogLimiter:
    logger = logging.getLogger("tests.floods")
    logger.setLevel(logging.DEBUG)
    return LogLimiter(logger, lines=3, window=10.0, clock=clock)


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    found = [r.getMessage() for r in caplog.records if r.name == "tests.floods"]
    caplog.clear()
    return found


def test_the_first_lines_of_a_window_are_written_the_rest_counted(
    limiter: LogLimiter, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    written = [limiter.log("refused", logging.INFO, "refused %s", f"10.0.0.{i}") for i in range(8)]
    assert written == [True] * 3 + [False] * 5
    assert lines(caplog) == ["refused 10.0.0.0", "refused 10.0.0.1", "refused 10.0.0.2"]
    clock.now += 9.9
    limiter.flush()
    assert lines(caplog) == []  # the window is not over yet
    clock.now += 0.1
    limiter.flush()
    assert lines(caplog) == ["refused 10.0.0.7 (5 more like this in 10 s, not logged)"]
    limiter.flush()
    assert lines(caplog) == []  # said once


def test_the_next_line_after_a_window_brings_its_count_first(
    limiter: LogLimiter, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    for i in range(4):
        limiter.log("refused", logging.INFO, "refused %d", i)
    caplog.clear()
    clock.now += 30
    assert limiter.log("refused", logging.INFO, "refused %d", 4)
    assert lines(caplog) == ["refused 3 (1 more like this in 10 s, not logged)", "refused 4"]


def test_keys_have_windows_of_their_own(
    limiter: LogLimiter, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    for _ in range(5):
        limiter.log("a", logging.INFO, "a")
    clock.now += 5
    for _ in range(4):
        limiter.log("b", logging.WARNING, "b")
    assert [r.levelno for r in caplog.records].count(logging.WARNING) == 3
    caplog.clear()
    clock.now += 5  # a's window is over; b's has 5 s to go
    limiter.flush()
    assert lines(caplog) == ["a (2 more like this in 10 s, not logged)"]
    clock.now += 5
    limiter.flush()
    assert lines(caplog) == ["b (1 more like this in 10 s, not logged)"]


def test_a_quiet_window_ends_without_a_count(
    limiter: LogLimiter, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter.log("a", logging.INFO, "a")
    clock.now += 60
    limiter.flush()
    assert lines(caplog) == ["a"]


def test_a_traceback_is_written_with_the_lines_that_are_written(
    limiter: LogLimiter, caplog: pytest.LogCaptureFixture
) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        for _ in range(4):
            limiter.log("error", logging.ERROR, "it broke", exc_info=True)
    assert [r.exc_info is not None for r in caplog.records] == [True] * 3


def test_lines_below_the_loggers_level_are_not_counted(
    limiter: LogLimiter, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    limiter.logger.setLevel(logging.WARNING)
    for _ in range(10):
        assert not limiter.log("debug", logging.DEBUG, "noise")
    clock.now += 10
    limiter.flush()
    assert lines(caplog) == []


def test_a_limiter_needs_a_line_and_a_window() -> None:
    with pytest.raises(ValueError, match="lines"):
        LogLimiter(logging.getLogger("x"), lines=0)
    with pytest.raises(ValueError, match="window"):
        LogLimiter(logging.getLogger("x"), window=0)


# ---------------------------------------------------------------------------------------
# Log lines over a real hub: refused handshakes


async def refuse_handshake(hub: Hub) -> None:
    assert hub.port is not None
    with trio.fail_after(WAIT):
        async with await trio.open_tcp_stream("127.0.0.1", hub.port) as stream:
            await stream.send_all(
                b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: MDEyMzQ1Njc4OWFiY2RlZg==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 401 "), answer


@pytest.mark.parametrize("hub_config", [HubConfig(tokens=frozenset({"t"}))])
async def test_refused_handshakes_write_a_few_lines_and_a_count(
    hub: Hub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    monkeypatch.setattr(hub, "_quiet", LogLimiter(logging.getLogger("agentmesh.hub"), clock=clock))
    with caplog.at_level(logging.INFO, logger="agentmesh.hub"):
        for _ in range(200):
            await refuse_handshake(hub)
        clock.now += 10
        await refuse_handshake(hub)
    refusals = [
        r.getMessage() for r in caplog.records if "missing or wrong token" in r.getMessage()
    ]
    assert len(refusals) == 5 + 1 + 1, refusals
    assert refusals[5].endswith(": missing or wrong token (195 more like this in 10 s, not logged)")
