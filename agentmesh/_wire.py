"""Writing several WebSocket frames to a socket in one go.

trio-websocket sends each message with its own socket write. Under load a connection's
outbox often holds several frames; encoding them all and writing them at once saves a
socket call and a scheduler round per frame. This reaches into trio-websocket's
connection (its wsproto state, stream and stream lock), so the dependency is pinned to a
minor version and `can_batch` falls back to one `send_message` per frame if the
internals are not there.
"""

from __future__ import annotations

from collections.abc import Sequence

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection
from wsproto.events import TextMessage

__all__ = ["can_batch", "send_frames"]

_INTERNALS = ("_wsproto", "_stream", "_stream_lock", "_abort_web_socket")


def can_batch(ws: WebSocketConnection) -> bool:
    return all(hasattr(ws, name) for name in _INTERNALS)


async def send_frames(ws: WebSocketConnection, frames: Sequence[str], batch: bool) -> None:
    """Send `frames` as text messages, in order; raises `ConnectionClosed` like
    `send_message`. On cancellation part of the data may have been written."""
    if not batch or len(frames) == 1:
        for frame in frames:
            await ws.send_message(frame)
        return
    if ws.closed is not None:
        raise ConnectionClosed(ws.closed)
    data = b"".join(ws._wsproto.send(TextMessage(data=frame)) for frame in frames)
    async with ws._stream_lock:
        try:
            await ws._stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await ws._abort_web_socket()
            raise ConnectionClosed(ws.closed) from None
