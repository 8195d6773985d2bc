"""The frames waiting to be written to one connection, and which of them were. Sans-IO.

This is the one place that knows which frames reached the socket: the Trio layer hands
`Outbox.pending()` to the socket and reports back how many bytes it took with `wrote(n)`.
A frame counts as sent once its last byte was taken, and not before: a frame cut off
mid-write, and every frame after it, is unsent (`unsent_tags`). The outbox is bounded in
frames and in bytes; `fits` says whether one more frame may join it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

__all__ = ["Outbox"]

_NONE: Sequence[str] = ()
_WRITE_SIZE = 256 * 1024  # bytes handed to one write at most, when more are queued


class Outbox:
    """Whole WebSocket frames in the order they are to be written.

    A frame may carry a tag (the hub tags a task's outcome with its task ID). The first
    frame may be partly written (`partial`); the rest are untouched.
    """

    def __init__(self, *, max_frames: int, max_bytes: int) -> None:
        self.max_frames = max_frames
        self.max_bytes = max_bytes
        self.half_frames = max_frames // 2
        self.half_bytes = max_bytes // 2
        self.bytes = 0  # unwritten bytes queued
        # (frame, tag), first to write first; read-only outside this class
        self.frames: deque[tuple[bytes, str | None]] = deque()
        self._offset = 0  # bytes of the first frame already written
        self._tagged = 0  # frames queued with a tag

    def __len__(self) -> int:
        return len(self.frames)

    def has_room(self, extra: int = 0) -> bool:
        """Whether it holds at most half its frames and bytes (`extra` as in `fits`)."""
        return self.bytes + extra <= self.half_bytes and len(self.frames) <= self.half_frames

    @property
    def partial(self) -> bool:
        """Whether the first frame is cut: some of its bytes are written, not all."""
        return self._offset > 0

    def offer(self, frame: bytes, tag: str | None, extra: int) -> bool:
        """Queue `frame` if it `fits` (with `extra`); whether it did."""
        frames = self.frames
        if frames and (
            len(frames) >= self.max_frames or self.bytes + len(frame) + extra > self.max_bytes
        ):
            return False
        frames.append((frame, tag))
        self.bytes += len(frame)
        if tag is not None:
            self._tagged += 1
        return True

    def fits(self, size: int, *, extra: int = 0) -> bool:
        """Whether a frame of `size` bytes may be queued, with `extra` bytes held
        elsewhere for the same connection (a partial inbound message). An empty outbox
        takes any one frame."""
        if not self.frames:
            return True
        return len(self.frames) < self.max_frames and (self.bytes + size + extra <= self.max_bytes)

    def push(self, frame: bytes, tag: str | None = None) -> None:
        self.frames.append((frame, tag))
        self.bytes += len(frame)
        if tag is not None:
            self._tagged += 1

    def push_control(self, frame: bytes) -> None:
        """Queue a control frame (a pong) ahead of the data frames, at the first frame
        boundary: behind the cut frame, if one is partly written."""
        self.frames.insert(1 if self._offset else 0, (frame, None))
        self.bytes += len(frame)

    def pending(self) -> bytes:
        """The next unwritten bytes, in order, for one write: every frame queued, or as
        many whole frames as make `_WRITE_SIZE` (a socket takes no more at once)."""
        frames = self.frames
        if len(frames) == 1:
            return frames[0][0][self._offset :]
        if self.bytes <= _WRITE_SIZE:
            data = b"".join([frame for frame, _ in frames])
        else:
            batch, size = [], -self._offset
            for frame, _ in frames:
                batch.append(frame)
                size += len(frame)
                if size >= _WRITE_SIZE:
                    break
            data = b"".join(batch)
        return data[self._offset :] if self._offset else data

    def head(self) -> bytes:
        """The unwritten rest of the first frame only (to finish it before a close)."""
        return self.frames[0][0][self._offset :] if self.frames else b""

    def wrote(self, n: int) -> Sequence[str]:
        """The socket took the first `n` bytes of `pending()`; the tags of the frames
        that are now wholly written."""
        frames = self.frames
        if n >= self.bytes:  # the usual case: all of it
            done = [tag for _, tag in frames if tag is not None] if self._tagged else _NONE
            frames.clear()
            self.bytes = self._offset = self._tagged = 0
            return done
        self.bytes -= n
        n += self._offset
        written: list[str] = []
        while n >= len(frames[0][0]):
            frame, tag = frames.popleft()
            n -= len(frame)
            if tag is not None:
                written.append(tag)
        self._tagged -= len(written)
        self._offset = n
        return written

    def unsent_tags(self) -> list[str]:
        """Tags of the frames not wholly written, the cut one included."""
        return [tag for _, tag in self.frames if tag is not None]

    def clear(self) -> None:
        self.frames.clear()
        self.bytes = self._offset = self._tagged = 0
