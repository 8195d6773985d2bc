"""The hub's WebSocket framing, without sockets: wsproto (an independent implementation)
plays the client, and the hub's frames go back through a wsproto client to be read."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import (
    BytesMessage,
    CloseConnection,
    Message,
    Ping,
    Pong,
    TextMessage,
)

from agentmesh import _frames as f


def client() -> Connection:
    return Connection(ConnectionType.CLIENT)


def masked(first: int, payload: bytes, mask: bytes = b"\x01\x02\x03\x04") -> bytes:
    """A client frame built by hand, to say things wsproto would refuse to say."""
    n = len(payload)
    if n < 126:
        head = bytes((first, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((first, 0x80 | 126)) + struct.pack("!H", n)
    else:
        head = bytes((first, 0x80 | 127)) + struct.pack("!Q", n)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def test_text_messages_of_every_length_class() -> None:
    ws = client()
    texts = ["", "x", "é" * 62, "a" * 125, "b" * 126, "c" * 65535, "d" * 65536, "ü" * 40_000]
    data = b"".join(ws.send(TextMessage(data=t)) for t in texts)
    reader = f.FrameReader(1 << 20)
    assert reader.receive(data) == [(f.TEXT, t) for t in texts]


def test_binary_ping_pong_close_in_order() -> None:
    ws = client()
    data = (
        ws.send(BytesMessage(data=b"\x00\xff"))
        + ws.send(Ping(payload=b"p1"))
        + ws.send(Pong(payload=b"p2"))
        + ws.send(TextMessage(data="after"))
        + ws.send(CloseConnection(code=4000, reason="bye now"))
    )
    got = f.FrameReader(1000).receive(data)
    assert got == [
        (f.BINARY, b"\x00\xff"),
        (f.PING, b"p1"),
        (f.PONG, b"p2"),
        (f.TEXT, "after"),
        (f.CLOSE, b"\x0f\xa0bye now"),
    ]
    assert f.parse_close(got[-1][1]) == (4000, "bye now")  # type: ignore[arg-type]


@given(
    texts=st.lists(st.text(max_size=300), min_size=1, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=10),
)
def test_any_split_of_the_bytes_gives_the_same_messages(texts: list[str], cuts: list[int]) -> None:
    ws = client()
    data = b"".join(ws.send(TextMessage(data=t)) for t in texts)
    reader = f.FrameReader(1 << 20)
    got = []
    start = 0
    for cut in [*sorted({min(c, len(data)) for c in cuts}), len(data)]:
        got += reader.receive(data[start:cut])
        start = cut
    assert got == [(f.TEXT, t) for t in texts]


def test_fragmented_messages_are_joined_with_control_frames_between() -> None:
    ws = client()
    data = (
        ws.send(TextMessage(data="héllo ", message_finished=False))
        + ws.send(Ping(payload=b"mid"))
        + ws.send(TextMessage(data="wörld", message_finished=True))
        + ws.send(BytesMessage(data=b"ab", message_finished=False))
        + ws.send(BytesMessage(data=b"cd", message_finished=True))
    )
    assert f.FrameReader(100).receive(data) == [
        (f.PING, b"mid"),
        (f.TEXT, "héllo wörld"),
        (f.BINARY, b"abcd"),
    ]


def test_a_utf8_character_split_across_fragments() -> None:
    encoded = "€".encode()
    data = masked(0x01, encoded[:1]) + masked(0x80, encoded[1:])
    assert f.FrameReader(100).receive(data) == [(f.TEXT, "€")]


@pytest.mark.parametrize(
    ("data", "code", "fragment"),
    [
        pytest.param(bytes((0x81, 0x02)) + b"hi", 1002, "masked", id="unmasked"),
        pytest.param(masked(0xC1, b"x"), 1002, "reserved bits", id="rsv1"),
        pytest.param(masked(0x83, b"x"), 1002, "opcode 0x3", id="unknown-data-opcode"),
        pytest.param(masked(0x8B, b"x"), 1002, "opcode 0xb", id="unknown-control-opcode"),
        pytest.param(masked(0x09, b"x"), 1002, "control frames", id="fragmented-ping"),
        pytest.param(masked(0x89, b"x" * 126), 1002, "control frames", id="long-ping"),
        pytest.param(masked(0x80, b"x"), 1002, "continuation", id="stray-continuation"),
        pytest.param(
            masked(0x01, b"a") + masked(0x81, b"b"), 1002, "new message", id="interleaved"
        ),
        pytest.param(masked(0x81, b"\xff\xfe"), 1007, "UTF-8", id="bad-utf8"),
        pytest.param(masked(0x01, b"\xe2") + masked(0x80, b"\x28"), 1007, "UTF-8", id="bad-split"),
        pytest.param(masked(0x81, b"x" * 101), 1009, "100-byte", id="too-big"),
        pytest.param(
            masked(0x01, b"x" * 60) + masked(0x80, b"x" * 41), 1009, "", id="too-big-parts"
        ),
    ],
)
def test_protocol_errors_name_their_close_code(data: bytes, code: int, fragment: str) -> None:
    with pytest.raises(f.FrameError) as error:
        f.FrameReader(100).receive(data)
    assert error.value.code == code
    assert fragment in error.value.reason


def test_an_oversized_frame_is_refused_from_its_header_alone() -> None:
    header = bytes((0x81, 0x80 | 127)) + struct.pack("!Q", 1 << 40) + b"mask"
    with pytest.raises(f.FrameError) as error:
        f.FrameReader(1 << 20).receive(header)  # no payload sent, nothing buffered
    assert error.value.code == 1009


def test_a_large_frame_trickling_in_is_kept_until_whole() -> None:
    payload = os.urandom(300_000).hex()
    data = client().send(TextMessage(data=payload))
    reader = f.FrameReader(1 << 20)
    for i in range(0, len(data) - 1000, 1000):
        assert reader.receive(data[i : i + 1000]) == []
    assert reader.receive(data[(len(data) - 1) // 1000 * 1000 :]) == [(f.TEXT, payload)]


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, 200_000])
def test_hub_frames_read_back_by_a_client(n: int) -> None:
    ws = client()
    text = "é" * (n // 2) + "x" * (n % 2)
    ws.receive_data(f.encode_frame(f.TEXT, text.encode()) + f.close_frame(1001, "going"))
    events = list(ws.events())
    assert isinstance(events[0], Message)
    assert events[0].data == text
    assert isinstance(events[1], CloseConnection)
    assert (events[1].code, events[1].reason) == (1001, "going")


def test_close_reason_is_cut_to_fit_a_control_frame() -> None:
    frame = f.close_frame(4004, "é" * 100)  # 200 bytes of UTF-8
    assert len(frame) <= 2 + 125
    ws = client()
    ws.receive_data(frame)
    (event,) = list(ws.events())
    assert isinstance(event, CloseConnection)
    assert event.code == 4004
    assert set(event.reason) == {"é"}


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", (1005, "")),
        (b"\x03\xe8", (1000, "")),
        (b"\x0f\xa0ok", (4000, "ok")),
    ],
)
def test_parse_close(payload: bytes, expected: tuple[int, str]) -> None:
    assert f.parse_close(payload) == expected


@pytest.mark.parametrize(
    ("payload", "code"),
    [(b"\x03", 1002), (b"\x03\xed", 1002), (b"\x00\x00", 1002), (b"\x03\xe8\xff", 1007)],
)
def test_parse_close_refuses(payload: bytes, code: int) -> None:
    with pytest.raises(f.FrameError) as error:
        f.parse_close(payload)
    assert error.value.code == code


@pytest.mark.parametrize(
    "head",
    [
        pytest.param(bytes((0x81, 0x80 | 126)) + struct.pack("!H", 5), id="16-bit-for-5"),
        pytest.param(bytes((0x81, 0x80 | 127)) + struct.pack("!Q", 200), id="64-bit-for-200"),
        pytest.param(bytes((0x81, 0x80 | 127)) + struct.pack("!Q", 1 << 63), id="top-bit"),
    ],
)
def test_a_length_not_in_its_shortest_form_is_a_protocol_error(head: bytes) -> None:
    with pytest.raises(f.FrameError) as error:
        f.FrameReader(1 << 20).receive(head + b"mask")
    assert error.value.code == 1002


def test_nothing_after_a_close_frame_is_read() -> None:
    reader = f.FrameReader(1 << 20)
    data = masked(0x81, b"before") + masked(0x88, b"\x03\xe8") + b"\xff\xff\xff"
    assert reader.receive(data) == [(f.TEXT, "before"), (f.CLOSE, b"\x03\xe8")]
    assert reader.closed
    assert reader.receive(masked(0x81, b"after")) == []


def test_a_partial_message_is_counted_as_buffered() -> None:
    reader = f.FrameReader(1 << 20)
    reader.receive(masked(0x01, b"x" * 100))  # the first fragment of a message
    assert reader.buffered == 100
    reader.receive(masked(0x80, b"y" * 10)[:8])  # and the start of the last frame
    assert reader.buffered == 108


def test_short_text_frames_around_a_fragmented_message() -> None:
    """Whole short text frames (read on the reader's fast path) before, between the parts
    of, and after a fragmented message, all in one read; and one at the size limit."""
    data = (
        masked(0x81, b"one")
        + masked(0x01, b"fr")
        + masked(0x89, b"ping")
        + masked(0x80, b"ag")
        + masked(0x81, "twö".encode())
        + masked(0x81, b"x" * 100)
    )
    assert f.FrameReader(100).receive(data) == [
        (f.TEXT, "one"),
        (f.PING, b"ping"),
        (f.TEXT, "frag"),
        (f.TEXT, "twö"),
        (f.TEXT, "x" * 100),
    ]
    reader = f.FrameReader(100)
    with pytest.raises(f.FrameError) as error:
        reader.receive(masked(0x01, b"a") + masked(0x81, b"b"))  # not a continuation
    assert error.value.code == 1002
