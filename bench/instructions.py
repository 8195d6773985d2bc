"""Instructions per delegation, counted by valgrind's callgrind: the A/B measure.

Wall-clock figures on a shared 2-core machine move by 20% from one run to the next;
instruction counts do not (the same code, inputs and PYTHONHASHSEED give the same count
to within a few hundred per delegation, whatever else the machine is doing). So a change
to the hot path is judged here, and confirmed by the bench's CPU times.

- ``router``: a delegation through the pure `Router` (no Trio, no sockets): a
  ``delegate`` from a requester and the agent's ``result``, each one `Router.receive` of
  a JSON frame, into peers that keep the frames they are sent. It includes decoding the
  two frames and encoding the three the hub sends (and one ``orjson.loads`` of the task
  frame, to find the task's ID).
- ``hub``: the hub itself (`open_hub`, a memory store), serving one agent and one
  requester that are ordinary clients in another process (not counted: asyncio
  `websockets`, one frame per write, as in ordinary.py), one delegation at a time: the
  hub's whole cost per delegation when it cannot batch, its socket reads and writes,
  Trio's scheduling and the router included.
- ``sdk``: one `agentmesh.Agent` and one `agentmesh.connect` requester in one process,
  delegating one task at a time through a real hub in another process (not counted):
  the SDK's cost on both sides of a delegation, Trio's scheduling and the socket calls
  included, with no batching to help it.

Each is run twice under callgrind, with N and 4N delegations, and the difference is
divided by 3N, so that start-up costs cancel out.

    python bench/instructions.py                      # all three, this tree
    python bench/instructions.py router --seeds 1,2,3
    python bench/instructions.py sdk --src /tmp/old   # another tree (an A/B), on PYTHONPATH

Child side: ``python bench/instructions.py --child router|hub|sdk N``; ``--drive URL N``
runs the hub workload's clients.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COUNTS = {"router": 1000, "hub": 300, "sdk": 300}  # N: 4N delegations are then 1 to 3 minutes
_COLLECTED = re.compile(rb"Collected : (\d+)")


def count(workload: str, n: int, *, src: Path, seed: int) -> int:
    """Instructions that `workload` with `n` delegations runs, start-up included."""
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONHASHSEED": str(seed)}
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    argv += [sys.executable, str(Path(__file__).resolve()), "--child", workload, str(n)]
    done = subprocess.run(argv, env=env, capture_output=True, check=True, timeout=1800)
    found = _COLLECTED.search(done.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no count:\n{done.stderr.decode()[-2000:]}")
    return int(found.group(1))


def per_delegation(workload: str, *, src: Path, seed: int) -> int:
    n = COUNTS[workload]
    small, large = (count(workload, k, src=src, seed=seed) for k in (n, 4 * n))
    return round((large - small) / (3 * n))


# ---------------------------------------------------------------------------------------
# Child side


def run_router(n: int) -> None:
    import orjson
    from agentmesh.config import HubConfig
    from agentmesh.routing import Router

    class Peer:
        def __init__(self) -> None:
            self.frames: list[str] = []

        def send(self, frame: str, **_: object) -> None:
            self.frames.append(frame)

        def close(self, code: int, reason: str) -> None:
            pass

        def has_room(self) -> bool:
            return True

    router = Router(HubConfig())
    worker, requester = Peer(), Peer()
    for peer, name, capabilities in ((worker, "w", [{"name": "echo"}]), (requester, "r", [])):
        router.connected(peer)  # type: ignore[arg-type]
        register = {"name": name, "capabilities": capabilities}
        frame = {"type": "register", "id": "1", "payload": register}
        router.receive(peer, orjson.dumps(frame).decode())  # type: ignore[arg-type]
    delegate = '{"type":"delegate","id":"d%d","payload":{"capability":"echo","params":{"n":1}}}'
    result = '{"type":"result","id":"r%d","payload":{"task_id":"%s","success":true,"data":1}}'
    for i in range(n):
        router.receive(requester, delegate % i)  # type: ignore[arg-type]
        task_id = orjson.loads(worker.frames[-1])["payload"]["task_id"]
        router.receive(worker, result % (i, task_id))  # type: ignore[arg-type]
        router.delivered([task_id])
        if len(requester.frames) > 200:
            worker.frames.clear()
            requester.frames.clear()


def run_hub(n: int) -> None:
    import subprocess

    import agentmesh
    import trio

    script = str(Path(__file__).resolve())

    async def main() -> None:
        async with agentmesh.open_hub(port=0) as hub:
            argv = [sys.executable, script, "--drive", hub.url, str(n)]
            await trio.run_process(argv, stdout=subprocess.DEVNULL)

    trio.run(main)


def drive(url: str, n: int) -> None:
    """`run_hub`'s clients: one agent echoing, one requester, `n` delegations in turn."""
    import asyncio

    import orjson
    from websockets.asyncio.client import connect

    async def opened(name: str, capabilities: list[str]) -> object:
        ws = await connect(url)
        frame = {
            "type": "register",
            "id": "reg",
            "payload": {"name": name, "capabilities": capabilities},
        }
        await ws.send(orjson.dumps(frame).decode())
        await ws.recv()
        return ws

    async def work(ws: object) -> None:
        async for text in ws:  # type: ignore[attr-defined]
            task = orjson.loads(text)["payload"]
            result = {"task_id": task["task_id"], "success": True, "data": task["params"]}
            frame = {"type": "result", "id": task["task_id"], "payload": result}
            await ws.send(orjson.dumps(frame).decode())  # type: ignore[attr-defined]

    async def main() -> None:
        worker = await opened("instructions-worker", ["echo"])
        requester = await opened("instructions-requester", [])
        working = asyncio.create_task(work(worker))
        for i in range(n):
            frame = {
                "type": "delegate",
                "id": f"d{i}",
                "payload": {"capability": "echo", "params": {"n": i}},
            }
            await requester.send(orjson.dumps(frame).decode())  # type: ignore[attr-defined]
            while orjson.loads(await requester.recv())["type"] != "result":  # type: ignore[attr-defined]
                pass  # the delegate's reply
        working.cancel()
        await asyncio.gather(worker.close(), requester.close())  # type: ignore[attr-defined]

    asyncio.run(main())


def run_sdk(n: int) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    import agentmesh
    import trio

    from procs import Server

    async def main(url: str) -> None:
        async with trio.open_nursery() as nursery:
            agent = agentmesh.Agent("instructions-worker")

            @agent.capability("echo")
            async def echo(n: int) -> int:
                return n

            await nursery.start(agent.serve, url)
            async with agentmesh.connect(url, name="instructions-requester") as client:
                for i in range(n):
                    await client.delegate("echo", {"n": i})
            nursery.cancel_scope.cancel()

    with Server.hub() as hub:  # its own process, which callgrind does not follow
        trio.run(main, hub.url)


# ---------------------------------------------------------------------------------------
# Standalone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workloads", nargs="*", help="router, hub, sdk [all three]")
    parser.add_argument("--seeds", default="1,2", help="PYTHONHASHSEEDs, one count each [1,2]")
    parser.add_argument("--src", type=Path, default=ROOT, help="the tree to measure [this one]")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "N"), help=argparse.SUPPRESS)
    parser.add_argument("--drive", nargs=2, metavar=("URL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        workload, n = args.child
        {"router": run_router, "hub": run_hub, "sdk": run_sdk}[workload](int(n))
        return 0
    if args.drive:
        drive(args.drive[0], int(args.drive[1]))
        return 0
    if shutil.which("valgrind") is None:
        parser.error("needs valgrind (Debian: apt install valgrind)")
    unknown = set(args.workloads) - set(COUNTS)
    if unknown:
        parser.error(f"unknown workload(s) {', '.join(sorted(unknown))}: router, hub, sdk")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    for workload in args.workloads or list(COUNTS):
        counts = [per_delegation(workload, src=args.src, seed=seed) for seed in seeds]
        shown = " / ".join(f"{c:,}" for c in counts)
        print(f"{workload}: {shown} instructions per delegation (PYTHONHASHSEED {args.seeds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
