"""The outbox (sans-IO): which frames reached the socket, at frame granularity, and its
bounds in frames and bytes. No sockets: writes are reported by hand."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agentmesh._outbox import Outbox


def filled(*frames: tuple[bytes, str | None]) -> Outbox:
    box = Outbox(max_frames=10, max_bytes=100)
    for frame, tag in frames:
        box.push(frame, tag)
    return box


def test_a_whole_write_sends_everything() -> None:
    box = filled((b"aaaa", "t1"), (b"bbbb", "t2"))
    assert box.pending() == b"aaaabbbb"
    assert box.wrote(8) == ["t1", "t2"]
    assert len(box) == 0
    assert box.bytes == 0
    assert box.unsent_tags() == []


def test_a_frame_cut_mid_write_and_those_after_it_are_unsent() -> None:
    box = filled((b"aaaa", "t1"), (b"bbbb", "t2"), (b"cccc", "t3"))
    assert box.wrote(6) == ["t1"]  # t1 whole, t2 cut after two bytes
    assert box.unsent_tags() == ["t2", "t3"]
    assert box.partial
    assert box.head() == b"bb"
    assert box.pending() == b"bbcccc"
    assert box.wrote(2) == ["t2"]  # the end of t2: now it counts as sent
    assert not box.partial
    assert box.unsent_tags() == ["t3"]


def test_a_frame_written_to_its_last_byte_is_sent() -> None:
    box = filled((b"aaaa", "t1"), (b"bbbb", "t2"))
    box.wrote(4)
    assert box.unsent_tags() == ["t2"]
    assert not box.partial


def test_a_control_frame_goes_at_the_next_frame_boundary() -> None:
    box = filled((b"aaaa", None), (b"bbbb", None))
    box.push_control(b"P")
    assert box.pending() == b"Paaaabbbb"
    box.wrote(3)  # P and half of aaaa
    box.push_control(b"Q")  # not inside the cut frame
    assert box.pending() == b"aaQbbbb"


def test_bounds_in_frames_and_bytes() -> None:
    box = Outbox(max_frames=3, max_bytes=10)
    assert box.fits(50)  # an empty outbox takes any one frame
    box.push(b"x" * 4)
    assert box.fits(6)
    assert not box.fits(7)  # 11 bytes
    assert not box.fits(2, extra=5)  # a partial inbound message counts too
    box.push(b"x")
    box.push(b"x")
    assert not box.fits(1)  # 4 frames
    assert not box.has_room()
    box.wrote(6)
    assert box.has_room()


@given(
    sizes=st.lists(st.integers(1, 20), min_size=1, max_size=20),
    writes=st.lists(st.integers(0, 50), max_size=30),
)
def test_the_books_match_the_bytes_written(sizes: list[int], writes: list[int]) -> None:
    """Whatever the writes, a frame is unsent exactly when its last byte is not written."""
    box = Outbox(max_frames=100, max_bytes=1000)
    ends, total = [], 0
    for i, size in enumerate(sizes):
        box.push(bytes([i]) * size, f"t{i}")
        total += size
        ends.append(total)
    stream = box.pending()
    written, reported = 0, []
    for n in writes:
        n = min(n, box.bytes)
        assert box.pending() == stream[written:]
        reported += box.wrote(n)
        written += n
    assert reported == [f"t{i}" for i, end in enumerate(ends) if end <= written]
    assert box.bytes == total - written
    assert box.unsent_tags() == [f"t{i}" for i, end in enumerate(ends) if end > written]
    assert box.partial == (written not in (0, *ends) and written < total)
