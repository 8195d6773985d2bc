"""Discover agents by capability and delegate work to them.

python examples/requester.py [ws://127.0.0.1:8765]
"""

from __future__ import annotations

import sys

import trio

import agentmesh

SNIPPET = """
def add(a, b):
    try:
        return a + b
    except:
        return None
"""


async def main(url: str) -> None:
    async with agentmesh.connect(url, name="requester") as client:
        for agent in await client.discover(""):
            names = ", ".join(c.name for c in agent.capabilities) or "-"
            print(f"found {agent.name} ({agent.agent_id}): {names}")

        # By capability: the hub picks the least busy agent that offers it.
        print("echo:", await client.delegate("echo", {"text": "hello ", "times": 2}))

        # Follow progress with the lower-level handle.
        task = await client.submit("slow-echo", {"text": "done", "steps": 2})
        async for update in task.progress():
            print(f"progress: {update.progress:.0%} {update.message}")
        print("slow-echo:", await task.wait())

        # By agent ID, with a deadline that becomes the task's TTL.
        [reviewer] = await client.discover("review")
        with trio.fail_after(10):
            verdict = await client.delegate("code-review", {"code": SNIPPET}, to=reviewer.agent_id)
        print("review:", "; ".join(verdict["findings"]))

        try:
            await client.delegate("translate", {"text": "bonjour"})
        except agentmesh.NoCapableAgent as exc:
            print("translate:", exc)


if __name__ == "__main__":
    trio.run(main, sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8765")
