"""The close and ping state of one WebSocket connection (RFC 6455 section 7). Sans-IO.

A connection is OPEN until either side sends a close frame; the closing handshake ends
when both have (CLOSED), or when the stream is lost. Every allowed move is one row of
`TRANSITIONS`; any other raises `IllegalClose` and leaves the state unchanged. The state
also holds what the peer's pings ask for: the latest ping's payload, to be answered by
one pong (a peer that pings faster than it reads gets one answer, not a queue).
"""

from __future__ import annotations

import enum

__all__ = ["TRANSITIONS", "CloseEvent", "CloseState", "Closing", "IllegalClose"]


class CloseState(enum.Enum):
    OPEN = "open"
    CLOSE_SENT = "close_sent"  # we sent our close frame; the peer's answer is awaited
    CLOSE_RECEIVED = "close_received"  # the peer sent one; ours (the echo) is owed
    CLOSED = "closed"  # both sent, or the stream is gone


class CloseEvent(enum.Enum):
    SEND = "send"  # our close frame went out
    RECEIVE = "receive"  # the peer's close frame arrived
    LOST = "lost"  # the stream broke, or was cut


S, E = CloseState, CloseEvent
TRANSITIONS: dict[CloseState, dict[CloseEvent, CloseState]] = {
    S.OPEN: {E.SEND: S.CLOSE_SENT, E.RECEIVE: S.CLOSE_RECEIVED, E.LOST: S.CLOSED},
    S.CLOSE_SENT: {E.RECEIVE: S.CLOSED, E.LOST: S.CLOSED},
    S.CLOSE_RECEIVED: {E.SEND: S.CLOSED, E.LOST: S.CLOSED},
}
del S, E


class IllegalClose(Exception):
    """`event` is not allowed in `state` (a bug in the caller); nothing changed."""

    def __init__(self, state: CloseState, event: CloseEvent) -> None:
        super().__init__(f"cannot {event.value} a close when {state.value}")
        self.state = state
        self.event = event


class Closing:
    """Where one connection is in its closing handshake, and how it ended.

    `code` and `reason` are how the connection closed, as far as known: the peer's close
    (1005 if it gave no code), ours, or 1006 when the stream was lost first.
    """

    def __init__(self) -> None:
        self.state = CloseState.OPEN
        self.may_send = True  # data frames may still go out: until our close frame is
        self.code: int | None = None
        self.reason = ""
        self.peer_code: int | None = None  # the code in the peer's close frame
        self.pong: bytes | None = None  # the payload of the latest unanswered ping

    def _move(self, event: CloseEvent) -> None:
        new = TRANSITIONS.get(self.state, {}).get(event)
        if new is None:
            raise IllegalClose(self.state, event)
        self.state = new
        self.may_send = new is CloseState.OPEN or new is CloseState.CLOSE_RECEIVED

    def ping(self, payload: bytes) -> None:
        """The peer pinged: answer it, unless the connection is closing."""
        if self.state is CloseState.OPEN:
            self.pong = payload

    def take_pong(self) -> bytes | None:
        pong, self.pong = self.pong, None
        return pong

    def received(self, code: int, reason: str) -> None:
        """The peer's close frame arrived."""
        self._move(CloseEvent.RECEIVE)
        self.peer_code = code
        self.pong = None
        if self.code is None:
            self.code, self.reason = code, reason

    def sent(self, code: int, reason: str) -> None:
        """Our close frame went out."""
        self._move(CloseEvent.SEND)
        if self.code is None:
            self.code, self.reason = code, reason

    def lost(self) -> None:
        """The stream broke or was cut; the handshake ends here."""
        if self.state is not CloseState.CLOSED:
            self._move(CloseEvent.LOST)
        if self.code is None:
            self.code, self.reason = 1006, "connection lost"

    def echo(self) -> int:
        """The code to answer the peer's close with: its own (1000 if it gave none)."""
        assert self.peer_code is not None
        return 1000 if self.peer_code == 1005 else self.peer_code
