"""Ordinary clients: the closed loop of load.py, written the way a user writes a client.

The load generator (load.py) reads every frame that has arrived and answers them all in
one write, so the hub gets its frames in batches. A client that a user writes with the
asyncio `websockets` library does one ``await ws.send(...)`` per frame and reads one
message at a time (``async for message in ws``), so the hub gets one frame per read and
has to write one frame per write, and its cost per delegation is that of a hub that
cannot batch. This is that client, speaking the wire protocol (docs/protocol.md):

- W worker agents register the capability and answer each task at once with a
  successful ``result`` (its data is the task's params);
- R requesters keep `window` delegations each in flight: every ``result`` that comes
  back sends the next ``delegate``.

All of them run in one asyncio process (the default event loop, no uvloop), against a
hub in its own. JSON is orjson, as in the load generator, so that what the clients do
differently is the framing and the writes, not the JSON. Latency is from sending
``delegate`` until its ``result`` arrives. It measures throughput, p50/p99, and the CPU
time per delegation of the hub and of the client process.

    python bench/ordinary.py                    # 4x4x8, 3 runs of 5 s, each on a fresh hub
    python bench/ordinary.py --size 16x16x16 --runs 5 --durable

Parent side: `run_ordinary` starts the client process and reads /proc. Child side:
``python bench/ordinary.py CONFIG_JSON`` (started by `run_ordinary`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path
from time import perf_counter
from typing import Any

import orjson

from load import LoadError, Size, Window, emit, latency_summary
from procs import Child, Server, measure_child, per_delegation

CAPABILITY = "bench-echo"
SIZES = "4x4x8,16x16x16"


# ---------------------------------------------------------------------------------------
# Parent side


def run_ordinary(server: Server, size: Size, *, warmup: float, duration: float) -> dict[str, Any]:
    """`size` of ordinary-client load on `server` (a hub) from one process."""
    _, measured = run_loop("ordinary.py", server, size, warmup=warmup, duration=duration)
    return {
        "server": server.kind,
        "clients": "websockets (asyncio), one frame per write",
        **measured,
    }


def run_loop(
    script: str, server: Server, size: Size, *, warmup: float, duration: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run `script`'s child side (a closed loop of `size` in one process) against
    `server`: the child's reply, and what every closed loop reports (size, rate,
    latency, CPU per delegation)."""
    config = {
        "url": server.url,
        "workers": size.workers,
        "requesters": size.requesters,
        "window": size.window,
        "warmup": warmup,
        "duration": duration,
    }
    child = Child(script, {"child": config})
    try:
        reply, cpu = measure_child(child, server, warmup=warmup, duration=duration)
    finally:
        child.stop()
    latencies = reply["latencies"]
    return reply, {
        "size": size.label,
        "loop": "closed",
        "rate": round(len(latencies) / duration, 1),
        "completed": len(latencies),
        **latency_summary(latencies),
        **per_delegation(len(latencies), duration, cpu),
    }


# ---------------------------------------------------------------------------------------
# Child side


def _text(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()  # a str goes out as a text frame


async def _open(url: str, name: str, capabilities: list[str]) -> Any:
    from websockets.asyncio.client import connect

    ws = await connect(url)  # the library's defaults, as a user would
    await ws.send(_text({"type": "register", "id": "reg", "payload": {
        "name": name, "capabilities": capabilities}}))  # fmt: skip
    reply = orjson.loads(await ws.recv())
    if reply["type"] != "register":
        raise LoadError(f"register refused: {reply['payload']}")
    return ws


async def _work(ws: Any) -> None:
    """A worker agent: answer every task at once with a successful result."""
    async for text in ws:
        frame = orjson.loads(text)
        if frame["type"] != "delegate" or "in_reply_to" in frame:
            raise LoadError(f"worker got an unexpected frame: {frame}")
        task = frame["payload"]
        result = {"task_id": task["task_id"], "success": True, "data": task["params"]}
        await ws.send(_text({"type": "result", "id": task["task_id"], "payload": result}))


async def _request(ws: Any, window: int, measured: Window) -> None:
    """Keep `window` delegations in flight: each result that comes back sends the next."""
    seq = 0
    by_id: dict[str, float] = {}  # request id -> when its delegate was sent
    by_task: dict[str, float] = {}  # task id -> the same, once the hub acked it

    async def delegate(started: float) -> None:
        nonlocal seq
        seq += 1
        by_id[f"r{seq}"] = started
        await ws.send(_text({"type": "delegate", "id": f"r{seq}", "payload": {
            "capability": CAPABILITY, "params": {"n": seq}}}))  # fmt: skip

    for _ in range(window):
        await delegate(perf_counter())
    async for text in ws:
        frame = orjson.loads(text)
        kind = frame["type"]
        if kind == "result":
            started = by_task.pop(frame["payload"]["task_id"])
            done = perf_counter()
            measured.record(started, done)
            await delegate(done)
        elif kind == "delegate" and "in_reply_to" in frame:
            by_task[frame["payload"]["task_id"]] = by_id.pop(frame["in_reply_to"])
        else:
            raise LoadError(f"unexpected frame: {frame}")


async def next_command() -> dict[str, Any]:
    """The parent's next command; ``{"cmd": "stop"}`` at end of input."""
    line = await asyncio.to_thread(sys.stdin.readline)
    return json.loads(line) if line.strip() else {"cmd": "stop"}


async def child_main(config: dict[str, Any]) -> None:
    url = config["url"]
    workers = await asyncio.gather(
        *(_open(url, f"ordinary-worker-{i}", [CAPABILITY]) for i in range(config["workers"]))
    )
    requesters = await asyncio.gather(
        *(_open(url, f"ordinary-requester-{i}", []) for i in range(config["requesters"]))
    )
    emit({"event": "ready"})
    await next_command()  # go

    now = perf_counter()
    measured = Window(now + config["warmup"], now + config["warmup"] + config["duration"])
    tasks = [asyncio.create_task(_work(ws)) for ws in workers]
    tasks += [asyncio.create_task(_request(ws, config["window"], measured)) for ws in requesters]
    done, _ = await asyncio.wait(
        tasks, timeout=measured.end - perf_counter(), return_when=asyncio.FIRST_EXCEPTION
    )
    for task in tasks:
        task.cancel()
    for task in done:  # a task that ended before the window did: something went wrong
        task.result()
    emit({"latencies": [round(x, 7) for x in measured.latencies]})
    await next_command()  # stop (or end of input)
    await asyncio.gather(*(ws.close() for ws in [*workers, *requesters]))


# ---------------------------------------------------------------------------------------
# Standalone


def main(argv: list[str] | None = None) -> int:
    import store

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default=SIZES.split(",")[0], help="WxRxWINDOW [4x4x8]")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds [5]")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before [1]")
    parser.add_argument("--runs", type=int, default=3, help="runs, each on a fresh hub [3]")
    parser.add_argument("--durable", action="store_true", help="a durable hub (SQLite)")
    parser.add_argument("--json", type=Path, help="write the runs and medians here")
    args = parser.parse_args(argv)
    size = Size.parse(args.size)
    runs = []
    for _ in range(args.runs):
        if args.durable:
            with store.durable_hub(None) as (server, _files):
                run = run_ordinary(server, size, warmup=args.warmup, duration=args.duration)
        else:
            with Server.hub() as server:
                run = run_ordinary(server, size, warmup=args.warmup, duration=args.duration)
        runs.append(run)
        print_run(run)
    print_medians(runs, args.json)
    return 0


def print_run(run: dict[str, Any]) -> None:
    print(
        f"  {run['size']:>9} {run['rate']:>8.0f}/s  p50 {run['p50_ms']:7.3f}  p99 "
        f"{run['p99_ms']:7.3f} ms  server {run['server_cpu_us']:6.1f} us  client "
        f"{run['client_cpu_us']:6.1f} us per request  (server {run['server_cpu_pct']:5.1f}% "
        f"client {run['load_cpu_pct']:5.1f}% other {run['other_cpu_pct']:5.1f}% CPU)",
        flush=True,
    )


def print_medians(runs: list[dict[str, Any]], out: Path | None) -> None:
    keys = ("rate", "p50_ms", "p99_ms", "server_cpu_us", "client_cpu_us", "other_cpu_pct")
    medians = {k: round(statistics.median(r[k] for r in runs), 1) for k in keys}
    spread = {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in keys}
    print(f"median: {json.dumps(medians)}\nrange:  {json.dumps(spread)}")
    if out:
        out.write_text(json.dumps({"runs": runs, "median": medians}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):  # started by `run_ordinary`
        asyncio.run(child_main(json.loads(sys.argv[1])["child"]))
    else:
        sys.exit(main())
