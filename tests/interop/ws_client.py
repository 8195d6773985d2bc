"""An interop driver: the Python `websockets` library (asyncio) as a hub client.

tests/test_interop.py runs it as a subprocess and drives it with JSON lines on stdin;
it reports what its WebSockets see as JSON lines on stdout. The same line protocol is
spoken by node_client.mjs and browser_client.py:

    commands  {"op": "open", "sock": "a", "url": "ws://..."}
              {"op": "send", "sock": "a", "text": "...", "repeat": 1}
              {"op": "send_invalid_utf8", "sock": "a"}
              {"op": "close", "sock": "a", "code": 1000, "reason": "bye"}
              {"op": "pause", "sock": "a"}     stop reading (websockets then stops
              {"op": "resume", "sock": "a"}    reading the socket once its queue is full)
    events    {"ev": "open" | "message" | "close" | "error" | "paused" | "unsupported",
               "sock": "a", ...}

A message event carries `data` when it is at most 65536 characters long, and always
`len`. A close event carries `code`, `reason` and `clean` (a close frame was received).
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

SHOWN = 65536


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Sock:
    def __init__(self, name: str) -> None:
        self.name = name
        self.ws: ClientConnection | None = None
        self.reading = asyncio.Event()
        self.reading.set()
        self.task: asyncio.Task[None] | None = None

    async def run(self, url: str) -> None:
        try:
            # No keepalive pings (they are no sign of life to the hub anyway); no limit
            # on received messages (a forwarded payload may be a little over the hub's).
            self.ws = await connect(url, ping_interval=None, max_size=None, open_timeout=10)
        except Exception as exc:
            emit({"ev": "error", "sock": self.name, "message": repr(exc)})
            return
        emit({"ev": "open", "sock": self.name})
        ws = self.ws
        try:
            while True:
                await self.reading.wait()
                message = await ws.recv()
                event: dict[str, Any] = {"ev": "message", "sock": self.name, "len": len(message)}
                if len(message) <= SHOWN:
                    event["data"] = message
                emit(event)
        except ConnectionClosed as exc:
            rcvd = exc.rcvd
            emit(
                {
                    "ev": "close",
                    "sock": self.name,
                    "code": rcvd.code if rcvd is not None else 1006,
                    "reason": rcvd.reason if rcvd is not None else "",
                    "clean": rcvd is not None,
                    "sent": None if exc.sent is None else [exc.sent.code, exc.sent.reason],
                }
            )


async def handle(command: dict[str, Any], socks: dict[str, Sock]) -> None:
    op, name = command["op"], command.get("sock", "")
    if op == "open":
        sock = socks[name] = Sock(name)
        sock.task = asyncio.create_task(sock.run(command["url"]))
        return
    sock = socks[name]
    ws = sock.ws
    assert ws is not None, f"{name} is not open"
    try:
        if op == "send":
            await ws.send(command["text"] * command.get("repeat", 1))
        elif op == "send_invalid_utf8":
            # text=True sends bytes as a text frame as they are, without checking them.
            await ws.send(b'{"type": "heartbeat", "id": "\xff\xfe"}', text=True)
        elif op == "close":
            await ws.close(command.get("code", 1000), command.get("reason", ""))
        elif op == "pause":
            # Takes effect after the recv() under way, if any: one more message at most.
            sock.reading.clear()
            emit({"ev": "paused", "sock": name})
        elif op == "resume":
            sock.reading.set()
        else:
            emit({"ev": "unsupported", "sock": name, "op": op})
    except ConnectionClosed as exc:
        emit({"ev": "error", "sock": name, "message": f"{op}: {exc!r}"})


async def main() -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    socks: dict[str, Sock] = {}
    while line := await stdin.readline():
        await handle(json.loads(line), socks)
    for sock in socks.values():  # stdin closed: the test is done with us
        if sock.ws is not None:
            await sock.ws.close()


if __name__ == "__main__":
    asyncio.run(main())
