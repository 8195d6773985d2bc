"""The Trio side of page_driver.py: a headless Chromium page in a subprocess, one command
at a time (tests/test_dashboard.py, docs/images/make_screenshot.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

DRIVER = Path(__file__).parent / "page_driver.py"
CHROMIUM = Path("/usr/bin/chromium")  # the Debian package; .ci/run installs it
BROWSER_START = 30.0  # a cold first start of Chromium on a loaded machine


class Page:
    """One page of the driver's browser. `do(op, ...)` runs an operation (see
    page_driver.py) and returns its value; a failure raises AssertionError with
    Playwright's message. `console` collects what the page logged as errors."""

    def __init__(self, process: trio.Process, stderr: Path) -> None:
        self.process = process
        self.stderr = stderr
        self.console: list[dict[str, Any]] = []
        self.version = ""
        self._ready = trio.Event()
        self._ids = 0
        self._lock = trio.Lock()
        self._send, self._replies = trio.open_memory_channel[dict[str, Any]](16)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        buffer = b""
        with self._send:
            while chunk := await self.process.stdout.receive_some():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    if message.get("ev") == "ready":
                        self.version = message["version"]
                        self._ready.set()
                    elif message.get("ev") == "console":
                        self.console.append(message)
                    else:
                        await self._send.send(message)

    def _died(self, doing: str) -> AssertionError:
        tail = self.stderr.read_text(errors="replace")[-3000:]
        return AssertionError(f"the page driver exited while {doing}: {tail}")

    async def do(self, op: str, *, timeout: float = 5.0, **fields: Any) -> Any:  # noqa: ASYNC109
        """Run `op` (Playwright's own `timeout` bounds it; this waits a little longer)."""
        assert self.process.stdin is not None
        async with self._lock:
            self._ids += 1
            line = json.dumps({"id": self._ids, "op": op, "timeout": timeout, **fields})
            await self.process.stdin.send_all(line.encode() + b"\n")
            with trio.fail_after(timeout + 5.0):
                try:
                    reply = await self._replies.receive()
                except trio.EndOfChannel:
                    raise self._died(f"running {op}") from None
        assert reply["id"] == self._ids, reply
        if not reply["ok"]:
            raise AssertionError(f"{op} {fields}: {reply['error']}")
        return reply["value"]


@asynccontextmanager
async def open_page(
    stderr: Path, *, width: int = 1280, height: int = 800, chromium: Path = CHROMIUM
) -> AsyncIterator[Page]:
    """A fresh browser with one page of `width` x `height`; closed on the way out."""
    argv = [sys.executable, str(DRIVER), str(chromium), str(width), str(height)]
    with stderr.open("wb") as errors:
        process = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors
        )
    page = Page(process, stderr)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(page._read)
            with trio.fail_after(BROWSER_START):
                async with trio.open_nursery() as waiting:

                    async def died() -> None:
                        await process.wait()
                        raise page._died("starting")

                    waiting.start_soon(died)
                    await page._ready.wait()
                    waiting.cancel_scope.cancel()
            yield page
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            assert process.stdin is not None
            await process.stdin.aclose()  # the driver closes the browser and exits
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                await process.wait()
