"""Take docs/images/dashboard.png: the dashboard of a hub with a handful of agents and tasks
flowing, as headless Chromium shows it at 1280x800.

    python docs/images/make_screenshot.py [--seconds 125] [--out docs/images/dashboard.png]

Runs a real hub (in memory, with an admin token) and its monitoring port on loopback,
six agents and three requesters with the SDK, logs in through the form, lets the load
run for `--seconds` (the chart's history: two minutes fill it), with a broadcast and
an agent cut off (it resumes) near the end, and takes the picture. It needs what the
tests need: the Debian chromium at /usr/bin/chromium and Playwright
(tests/interop/page_driver.py drives the browser).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from agentmesh import Agent, Hub, HubConfig, TaskContext, connect  # noqa: E402
from agentmesh.errors import AgentMeshError  # noqa: E402
from tests.interop.page import open_page  # noqa: E402

ADMIN = "screenshot-admin-token"


def agents() -> list[Agent]:
    summarizers = []
    for n in (1, 2):
        agent = Agent(f"summarizer-{n}", description="Summarizes documents")

        @agent.capability("summarize")
        async def summarize(text: str, ctx: TaskContext, words: int = 50) -> str:
            """Summarize a text in a few words."""
            for step in range(3):
                await trio.sleep(random.uniform(0.05, 0.25))
                await ctx.progress((step + 1) / 3, f"pass {step + 1} of 3")
            return " ".join(text.split()[:words])

        summarizers.append(agent)

    reviewer = Agent("code-reviewer", description="Reviews Python code")

    @reviewer.capability("code-review")
    async def review(code: str, strict: bool = False) -> dict[str, Any]:
        """Count a snippet's lines and find its issues."""
        await trio.sleep(random.uniform(0.2, 1.5))
        if strict and random.random() < 0.3:
            raise ValueError("line 3: undefined name 'resutl'")
        return {"lines": len(code.splitlines()), "issues": random.randint(0, 4)}

    translator = Agent("translator", description="Translates between languages")

    @translator.capability("translate")
    async def translate(text: str, to: str = "fr") -> str:
        """Translate a short text."""
        await trio.sleep(random.uniform(0.01, 0.08))
        return f"[{to}] {text}"

    @translator.capability("detect-language")
    async def detect(text: str) -> str:
        """Guess a text's language."""
        await trio.sleep(0.01)
        return "en"

    fetcher = Agent("web-fetcher", description="Fetches pages (and sometimes fails)")

    @fetcher.capability("fetch-url")
    async def fetch(url: str) -> dict[str, Any]:
        """Fetch a page's title."""
        await trio.sleep(random.uniform(0.1, 0.6))
        if random.random() < 0.15:
            raise ConnectionError(f"{url}: connection reset by peer")
        if random.random() < 0.05:
            await trio.sleep(10)  # past the requester's TTL: a timeout
        return {"url": url, "status": 200, "title": "Example Domain"}

    return [*summarizers, reviewer, translator, fetcher]


WORK: list[tuple[str, Any]] = [
    ("summarize", lambda: {"text": "The hub routes tasks between agents " * 8, "words": 12}),
    ("translate", lambda: {"text": "good morning", "to": random.choice(["fr", "de", "ja"])}),
    ("translate", lambda: {"text": "see you soon", "to": "es"}),
    ("detect-language", lambda: {"text": "bonjour tout le monde"}),
    ("code-review", lambda: {"code": "def f(x):\n    return x * 2\n", "strict": True}),
    ("fetch-url", lambda: {"url": f"https://example.com/page/{random.randint(1, 99)}"}),
]


async def requester(url: str, name: str, rate: float, stop: trio.Event) -> None:
    async with connect(url, name=name, token=ADMIN) as client, trio.open_nursery() as tasks:
        started = trio.current_time()
        while not stop.is_set():
            capability, params = random.choice(WORK)

            async def one(capability: str = capability, params: Any = params) -> None:
                try:
                    await client.delegate(capability, params(), ttl=3.0)
                except AgentMeshError:
                    pass  # failures and timeouts are part of the picture

            tasks.start_soon(one)
            elapsed = trio.current_time() - started
            swing = 1 + 0.6 * math.sin(elapsed / 9)  # a load that rises and falls
            await trio.sleep(random.expovariate(rate * swing))
        tasks.cancel_scope.cancel()


async def main(seconds: float, out: Path) -> None:
    hub = Hub(HubConfig(admin_tokens=frozenset({ADMIN})))
    async with trio.open_nursery() as nursery:
        await nursery.start(hub.serve, "127.0.0.1", 0)
        assert hub.url is not None
        http_port = await nursery.start(hub.serve_monitor, "127.0.0.1", 0)
        running = agents()
        for agent in running:
            await nursery.start(partial(agent.serve, hub.url, token=ADMIN))
        fetcher = running[-1]
        assert fetcher.client is not None
        fetcher_id = fetcher.client.agent_id
        assert fetcher_id is not None
        stop = trio.Event()
        for name, rate in [("planner", 4.0), ("research-lead", 2.5), ("ci-bot", 1.5)]:
            nursery.start_soon(requester, hub.url, name, rate, stop)
        with tempfile.TemporaryDirectory() as tmp:
            async with open_page(Path(tmp) / "stderr") as page:
                base = f"http://127.0.0.1:{http_port}"
                await page.do("goto", url=base + "/")
                await page.do("fill", selector="#token", value=ADMIN)
                await page.do("click", selector="button[type=submit]")
                await page.do("wait", js="document.body.dataset.live === '1'")
                async with connect(hub.url, name="ops-console", token=ADMIN, hidden=True) as ops:
                    # The chart's history is what the picture shows: wait for it.
                    await trio.sleep(seconds - 2)
                    await ops.broadcast("deploy window opens in 5 minutes")
                    await trio.sleep(1.5)
                    hub.drop(fetcher_id, "maintenance")  # it resumes a moment later
                    await trio.sleep(0.3)
                    await page.do("screenshot", path=str(out))
                if page.console:
                    print("the page logged:", page.console, file=sys.stderr)
        stop.set()
        nursery.cancel_scope.cancel()
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=125.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "dashboard.png")
    args = parser.parse_args()
    trio.run(main, args.seconds, args.out)
