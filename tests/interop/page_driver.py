"""A page driver: one headless Chromium page, driven by Playwright, for tests/test_dashboard.py
(and docs/images/make_screenshot.py).

Playwright's API runs on asyncio, the tests on Trio, so it runs as a subprocess that
takes commands as JSON lines on stdin and answers each on stdout:

    python page_driver.py CHROMIUM [WIDTH HEIGHT]   prints {"ev": "ready", "version": ...}

    -> {"id": 1, "op": "goto", "url": "http://..."}
    <- {"id": 1, "ok": true, "value": null}            or "ok": false with "error"

Operations (Playwright's, on the one page; `timeout` in seconds where it applies):
goto(url), fill(selector, value), click(selector), select(selector, value),
wait(js, arg, timeout) (page.wait_for_function: until `js` returns a truthy value, which
is the answer), eval(js, arg) (its value), screenshot(path).

What the page says on its console at level error or warning (a Content-Security-Policy
violation is one), and any uncaught exception, comes out as {"ev": "console", ...} lines
between the answers. The browser is the Debian `chromium` at CHROMIUM (Playwright never
downloads its own), with a fresh profile and background networking off.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from playwright.async_api import ConsoleMessage, Error, Page, async_playwright

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


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def on_console(message: ConsoleMessage) -> None:
    if message.type in ("error", "warning"):
        emit({"ev": "console", "type": message.type, "text": message.text})


async def run(page: Page, command: dict[str, Any]) -> Any:
    op = command["op"]
    timeout = command.get("timeout", 5.0) * 1000
    if op == "goto":
        await page.goto(command["url"], timeout=timeout)
        return page.url
    if op == "fill":
        await page.fill(command["selector"], command["value"], timeout=timeout)
    elif op == "click":
        await page.click(command["selector"], timeout=timeout)
    elif op == "select":
        await page.select_option(command["selector"], command["value"], timeout=timeout)
    elif op == "wait":
        handle = await page.wait_for_function(
            command["js"], arg=command.get("arg"), timeout=timeout, polling="raf"
        )
        return await handle.json_value()
    elif op == "eval":
        return await page.evaluate(command["js"], command.get("arg"))
    elif op == "screenshot":
        await page.screenshot(path=command["path"], timeout=timeout)
    else:
        raise ValueError(f"unknown op {op!r}")
    return None


async def main(executable: str, width: int, height: int) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, headless=True, args=ARGS
        )
        context = await browser.new_context(viewport={"width": width, "height": height})
        page = await context.new_page()
        page.on("console", on_console)
        page.on(
            "pageerror",
            lambda error: emit({"ev": "console", "type": "pageerror", "text": str(error)}),
        )
        emit({"ev": "ready", "version": browser.version})
        while line := await stdin.readline():
            command = json.loads(line)
            try:
                value = await run(page, command)
            except Error as exc:  # Playwright's: a timeout, a selector that matched nothing
                emit({"id": command["id"], "ok": False, "error": str(exc)})
            else:
                emit({"id": command["id"], "ok": True, "value": value})
        await browser.close()


if __name__ == "__main__":
    size = [int(n) for n in sys.argv[2:4]] or [1280, 800]
    asyncio.run(main(sys.argv[1], *size))
