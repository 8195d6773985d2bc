"""An echo agent in the functional style.

python examples/echo_agent.py [ws://127.0.0.1:8765]
"""

from __future__ import annotations

import logging
import sys

import trio

from agentmesh import Agent, TaskContext

agent = Agent("echo", description="Says back what it is told")


@agent.capability("echo")
async def echo(text: str, times: int = 1) -> str:
    """Repeat a text.

    Args:
        text: the text to repeat
        times: how many times to repeat it
    """
    return text * times


@agent.capability("slow-echo")
async def slow_echo(text: str, ctx: TaskContext, steps: int = 3) -> str:
    """Repeat a text after a few steps, reporting progress on each."""
    for step in range(1, steps + 1):
        await trio.sleep(0.05)
        await ctx.progress(step / steps, f"step {step} of {steps}")
    return text


@agent.capability("upper")
def upper(text: str) -> str:
    """Upper-case a text (a plain function: it runs in a worker thread)."""
    return text.upper()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    agent.run(sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8765")
