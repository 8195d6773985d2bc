"""The ceilings: WebSocket servers that send every message straight back.

    python bench/echo_server.py PORT [trio-websocket | agentmesh]

They do what the hub cannot avoid doing (read a frame, write a frame) and nothing
else, so under the same load generator they show what a WebSocket stack itself can
carry. Two stacks:

- trio-websocket: `serve_websocket` and a handler that sends each message back. The
  ceiling named by the project's targets.
- agentmesh: the hub's own WebSocket layer (agentmesh/_websocket.py: one read loop per
  connection, queued frames written by the flusher), with the same accept, read loop and
  close as the hub, minus routing. The ceiling of the stack the hub actually runs on.
"""

from __future__ import annotations

import sys
from functools import partial

import trio
from agentmesh._websocket import ConnectionClosed as Closed
from agentmesh._websocket import Flusher, Handshake
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

STACKS = ("trio-websocket", "agentmesh")


async def echo(request: WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        while True:
            await ws.send_message(await ws.get_message())
    except ConnectionClosed:
        pass


async def echo_agentmesh(flusher: Flusher, stream: trio.SocketStream) -> None:
    handshake = await Handshake.read(stream)
    if handshake is None:
        await trio.aclose_forcefully(stream)
        return
    ws = await handshake.accept(
        max_message_size=1 << 20,
        outbox_frames=1024,
        outbox_bytes=4 << 20,
        send_timeout=30.0,
        flusher=flusher,
    )
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ws.write_loop)
            try:
                while True:
                    for message in await ws.receive():
                        assert isinstance(message, str)
                        ws.send(message)
            except Closed:
                pass
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await ws.close_writes(1000, "bye")
            await ws.finish()


async def main(port: int, stack: str) -> None:
    if stack == "trio-websocket":
        await serve_websocket(echo, "127.0.0.1", port, ssl_context=None)
    else:
        flusher = Flusher()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flusher.run)
            await trio.serve_tcp(partial(echo_agentmesh, flusher), port, host="127.0.0.1")


if __name__ == "__main__":
    stack = sys.argv[2] if len(sys.argv) > 2 else STACKS[0]
    if stack not in STACKS:
        sys.exit(f"unknown stack {stack!r}; one of {', '.join(STACKS)}")
    try:
        trio.run(main, int(sys.argv[1]), stack)
    except KeyboardInterrupt:
        pass
