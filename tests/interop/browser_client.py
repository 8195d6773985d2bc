"""An interop driver: headless Chromium's `WebSocket`, driven by Playwright.

tests/test_interop.py runs it as a subprocess and drives it with JSON lines on stdin;
it reports what the pages' WebSockets see as JSON lines on stdout, in the line protocol
described in ws_client.py. Each socket lives in its own page (about:blank), opened with
`new WebSocket(url)`; its events are passed out through an exposed function.

    python browser_client.py CHROMIUM   prints {"ev": "ready", "version": ...} first

The browser is the Debian `chromium` at CHROMIUM (Playwright never downloads its own),
in a fresh user-data dir, with background networking off.

"pause" blocks the page's main thread in a synchronous XMLHttpRequest that Playwright
holds (routed, unanswered) until "resume": the renderer then takes no data from the
network service, which stops reading the socket. A page cannot send a text frame that is
not valid UTF-8 (`send` takes a USVString): "send_invalid_utf8" answers "unsupported".
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from typing import Any

from playwright.async_api import BrowserContext, Page, Route, async_playwright

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAUSE_URL = "http://127.0.0.1:9/agentmesh-pause"  # routed: never reaches the network

SOCKET_JS = """
(url) => {
  const SHOWN = 65536;
  const ws = new WebSocket(url);
  window.__ws = ws;
  ws.onopen = () => window.__report({ev: "open"});
  ws.onmessage = (e) => {
    const event = {ev: "message", len: e.data.length};
    if (e.data.length <= SHOWN) event.data = e.data;
    window.__report(event);
  };
  ws.onerror = () => window.__report({ev: "error", message: "error event"});
  ws.onclose = (e) =>
    window.__report({ev: "close", code: e.code, reason: e.reason, clean: e.wasClean});
}
"""

PAUSE_JS = """
(url) => {
  const request = new XMLHttpRequest();
  request.open("GET", url, false);  // synchronous: the main thread waits for the answer
  try { request.send(); } catch (e) {}
}
"""


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class Sock:
    def __init__(self, name: str, page: Page) -> None:
        self.name = name
        self.page = page
        self.resumed: asyncio.Event | None = None
        self.pausing: asyncio.Task[Any] | None = None

    async def hold(self, route: Route) -> None:
        """Answer the pausing request only once resumed."""
        emit({"ev": "paused", "sock": self.name})
        assert self.resumed is not None
        await self.resumed.wait()
        await route.fulfill(body="ok", headers={"Access-Control-Allow-Origin": "*"})


async def open_sock(context: BrowserContext, name: str, url: str) -> Sock:
    page = await context.new_page()
    sock = Sock(name, page)
    await page.expose_function("__report", lambda event: emit({**event, "sock": name}))
    await page.route(PAUSE_URL, sock.hold)
    await page.evaluate(SOCKET_JS, url)
    return sock


async def handle(context: BrowserContext, command: dict[str, Any], socks: dict[str, Sock]) -> None:
    op, name = command["op"], command.get("sock", "")
    if op == "open":
        socks[name] = await open_sock(context, name, command["url"])
        return
    sock = socks[name]
    page = sock.page
    if op == "send":
        await page.evaluate(
            "([text, repeat]) => window.__ws.send(text.repeat(repeat))",
            [command["text"], command.get("repeat", 1)],
        )
    elif op == "close":
        await page.evaluate(
            "([code, reason]) => window.__ws.close(code, reason)",
            [command.get("code", 1000), command.get("reason", "")],
        )
    elif op == "pause":
        sock.resumed = asyncio.Event()
        sock.pausing = asyncio.create_task(page.evaluate(PAUSE_JS, PAUSE_URL))
    elif op == "resume":
        assert sock.resumed is not None
        assert sock.pausing is not None
        sock.resumed.set()
        await sock.pausing
    else:
        emit({"ev": "unsupported", "sock": name, "op": op})


async def main(executable: str) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    with tempfile.TemporaryDirectory(prefix="agentmesh-chromium-") as profile:
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                profile, executable_path=executable, headless=True, args=ARGS
            )
            assert context.browser is not None
            emit({"ev": "ready", "version": context.browser.version})
            socks: dict[str, Sock] = {}
            while line := await stdin.readline():
                await handle(context, json.loads(line), socks)
            await context.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
