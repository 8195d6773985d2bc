"""The close and ping state machine (sans-IO), tested from its table: every legal move,
every illegal one (which raises and changes nothing)."""

from __future__ import annotations

import pytest

from agentmesh._closing import TRANSITIONS, CloseEvent, CloseState, Closing, IllegalClose

LEGAL = [(s, e, new) for s, row in TRANSITIONS.items() for e, new in row.items()]
ILLEGAL = [(s, e) for s in CloseState for e in CloseEvent if e not in TRANSITIONS.get(s, {})]


def in_state(state: CloseState) -> Closing:
    closing = Closing()
    closing.state = state
    return closing


def apply(closing: Closing, event: CloseEvent) -> None:
    {
        CloseEvent.SEND: lambda: closing.sent(1000, "bye"),
        CloseEvent.RECEIVE: lambda: closing.received(1001, "going"),
        CloseEvent.LOST: closing.lost,
    }[event]()


@pytest.mark.parametrize(("state", "event", "new"), LEGAL)
def test_legal_moves(state: CloseState, event: CloseEvent, new: CloseState) -> None:
    closing = in_state(state)
    apply(closing, event)
    assert closing.state is new


@pytest.mark.parametrize(("state", "event"), [i for i in ILLEGAL if i[1] is not CloseEvent.LOST])
def test_illegal_moves_raise_and_change_nothing(state: CloseState, event: CloseEvent) -> None:
    closing = in_state(state)
    with pytest.raises(IllegalClose):
        apply(closing, event)
    assert closing.state is state


def test_a_lost_stream_when_closed_stays_closed() -> None:
    closing = in_state(CloseState.CLOSED)
    closing.lost()
    assert closing.state is CloseState.CLOSED


def test_the_first_close_names_the_code() -> None:
    closing = Closing()
    closing.received(1005, "")
    assert closing.echo() == 1000  # no code given: answered with 1000
    closing.sent(closing.echo(), "")
    assert (closing.code, closing.state) == (1005, CloseState.CLOSED)
    lost = Closing()
    lost.lost()
    assert lost.code == 1006


def test_only_the_latest_ping_is_answered_and_none_once_closing() -> None:
    closing = Closing()
    closing.ping(b"1")
    closing.ping(b"2")
    assert closing.take_pong() == b"2"
    assert closing.take_pong() is None
    closing.sent(1000, "")
    closing.ping(b"3")
    assert closing.take_pong() is None
    assert not closing.may_send
