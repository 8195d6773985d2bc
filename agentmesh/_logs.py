"""Rate limits for log lines that a client can make the hub repeat. Pure: no trio.

A flood of refused handshakes would otherwise write a line each (thousands a second).
`LogLimiter` writes the first few lines of each kind in a window of time, counts the
rest, and says how many it left out in one line once the window is over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import attrs

__all__ = ["LogLimiter"]


@attrs.define
class _Window:
    start: float
    logged: int = 0
    left_out: int = 0
    last: tuple[int, str, tuple[object, ...]] | None = None  # the last line left out


class LogLimiter:
    """Writes at most `lines` lines of each kind (`key`) per `window` seconds to `logger`.

    The lines past that are counted; when the window is over, its count is written as
    one line: the last line left out, followed by ``(N more like this in W s, not logged)``.
    A window is seen to be over at the next `log` call of any kind, or at `flush`.
    Keys name kinds of events ("refused handshake"), a handful per program: never a
    peer's address, or the windows would pile up.
    """

    def __init__(
        self,
        logger: logging.Logger,
        *,
        lines: int = 5,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if lines < 1 or not window > 0:
            raise ValueError("lines must be at least 1 and window positive")
        self.logger = logger
        self.lines = lines
        self.window = window
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    def log(self, key: str, level: int, msg: str, *args: object, exc_info: bool = False) -> bool:
        """Write a line (as `logger.log` would), unless `key` had its `lines` already in
        this window; return whether it was written."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self._clock()
        self.flush(now)
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = _Window(start=now)
        if window.logged < self.lines:
            window.logged += 1
            self.logger.log(level, msg, *args, exc_info=exc_info, stacklevel=2)  # the caller's line
            return True
        window.left_out += 1
        window.last = (level, msg, args)
        return False

    def flush(self, now: float | None = None) -> None:
        """Close the windows that are over, writing the count of each that left lines out."""
        if now is None:
            now = self._clock()
        over = [key for key, w in self._windows.items() if now - w.start >= self.window]
        for key in over:
            window = self._windows.pop(key)
            if window.last is not None:
                level, msg, args = window.last
                self.logger.log(
                    level,
                    f"{msg} (%d more like this in %g s, not logged)",
                    *args,
                    window.left_out,
                    self.window,
                )
