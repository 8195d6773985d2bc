"""The ceiling: a plain trio-websocket server that sends every message straight back.

    python bench/echo_server.py PORT

It does what the hub cannot avoid doing (read a frame, write a frame) and nothing else,
so under the same load generator it shows what the WebSocket stack itself can carry.
"""

from __future__ import annotations

import sys

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket


async def echo(request: WebSocketRequest) -> None:
    ws = await request.accept()
    try:
        while True:
            await ws.send_message(await ws.get_message())
    except ConnectionClosed:
        pass


async def main(port: int) -> None:
    await serve_websocket(echo, "127.0.0.1", port, ssl_context=None)


if __name__ == "__main__":
    try:
        trio.run(main, int(sys.argv[1]))
    except KeyboardInterrupt:
        pass
