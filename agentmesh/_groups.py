"""Exception groups at the edge of the public API.

Trio wraps whatever escapes a nursery in an exception group. Where a nursery is an
implementation detail of ours (a client's background tasks), callers should see the one
error that happened, so `except TaskFailed:` works around ``async with connect(...)``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

__all__ = ["unwrap_single"]


@contextmanager
def unwrap_single() -> Iterator[None]:
    """Re-raise a group holding exactly one exception as that exception (recursively);
    groups of several stay groups."""
    try:
        yield
    except BaseExceptionGroup as group:
        inner: BaseException = group
        while isinstance(inner, BaseExceptionGroup) and len(inner.exceptions) == 1:
            inner = inner.exceptions[0]
        if inner is group:
            raise
        raise inner from inner.__cause__
