"""SDK to SDK: the closed loop a user of the Python SDK gets, through a hub.

The load generator (load.py) speaks the wire protocol itself, as cheaply as it can, so
that the hub is what runs out of CPU. Here the clients are the SDK's own: `Agent`s serve
the capability (a handler that returns its param) and `agentmesh.connect` requesters
keep `window` delegations each in flight with ``await client.delegate(...)``, every one
of them in one client process, against a hub in its own. It measures the SDK as much as
the hub: throughput, latency from calling `delegate` until it returns, and the CPU time
per delegation of the client process (requesters and agents together) and of the hub.

    python bench/sdk.py                      # 4x4x8, 3 runs of 5 s, each with a fresh hub
    python bench/sdk.py --runs 5 --size 8x8x8
    python bench/sdk.py --profile out.txt    # and py-spy on the client process (raw stacks)
    python bench/sdk.py --summary out.txt    # the top functions of such a file

Parent side: `run_sdk` starts the client process and reads /proc. Child side:
``python bench/sdk.py CONFIG_JSON`` (started by `run_sdk`).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from functools import partial
from pathlib import Path
from time import perf_counter
from typing import Any

import trio

from load import Size, Window, emit, latency_summary, next_command
from procs import Child, Server, machine_busy_seconds

CAPABILITY = "bench-echo"
SIZE = "4x4x8"  # the size the SDK target is stated at
_LINE = re.compile(r":\d+\)$")  # a py-spy frame's line number
_FILE = re.compile(r"^.* \(")  # a py-spy frame's function
# A trio worker thread waiting for its next job: py-spy counts it as on CPU (see hotspots.py).
_IDLE_WORKER = "WorkerThread._work (trio/_core/_thread_cache.py)"


# ---------------------------------------------------------------------------------------
# Parent side


def run_sdk(
    server: Server,
    size: Size,
    *,
    warmup: float,
    duration: float,
    profile: Path | None = None,
    src: Path | None = None,
) -> dict[str, Any]:
    """`size` of SDK load on `server` (a hub) from one client process; what was measured.

    With `profile`, the client process (not the hub) is sampled by py-spy during the
    measured window and the raw stacks are written there. With `src`, the client runs
    that tree's SDK (see baseline.py)."""
    config = {
        "url": server.url,
        "workers": size.workers,
        "requesters": size.requesters,
        "window": size.window,
        "warmup": warmup,
        "duration": duration,
    }
    child = Child("sdk.py", {"child": config}, src=src)
    try:
        child.receive()  # ready: agents and requesters registered
        child.send({"cmd": "go"})
        time.sleep(warmup)
        spy = _start_profile(child.pid, duration, profile) if profile else None
        cpu0 = (machine_busy_seconds(), server.cpu_seconds(), child.cpu_seconds())
        start = time.monotonic()
        time.sleep(duration)
        cpu1 = (machine_busy_seconds(), server.cpu_seconds(), child.cpu_seconds())
        elapsed = time.monotonic() - start
        result = child.receive()
        if spy is not None:
            spy.wait(timeout=60)
    finally:
        child.stop()
    latencies = result["latencies"]
    machine, hub_cpu, client_cpu = ((b - a) for a, b in zip(cpu0, cpu1, strict=True))
    done = len(latencies) / duration * elapsed  # delegations in the CPU-measured time
    return {
        "server": "hub",
        "clients": "sdk",
        "size": size.label,
        "loop": "closed",
        "rate": round(len(latencies) / duration, 1),
        "completed": len(latencies),
        **latency_summary(latencies),
        "server_cpu_pct": round(hub_cpu / elapsed * 100, 1),
        "load_cpu_pct": round(client_cpu / elapsed * 100, 1),
        "other_cpu_pct": round(max(0.0, machine - hub_cpu - client_cpu) / elapsed * 100, 1),
        "client_cpu_us": round(client_cpu / done * 1e6, 1) if done else None,
        "hub_cpu_us": round(hub_cpu / done * 1e6, 1) if done else None,
    }


def _start_profile(pid: int, duration: float, out: Path) -> subprocess.Popen[bytes]:
    spy = Path(sys.executable).with_name("py-spy")
    argv = [str(spy) if spy.exists() else "py-spy", "record", "--pid", str(pid)]
    argv += ["--duration", str(max(1, round(duration))), "--rate", "250"]
    argv += ["--format", "raw", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def top_functions(raw: Path, top: int = 20) -> dict[str, Any]:
    """A py-spy raw file summed up: % of on-CPU samples by module and by function (self
    time, and inclusive), line numbers left out."""
    own: Counter[str] = Counter()
    files: Counter[str] = Counter()  # self time by module
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text:
            continue
        count = int(count_text)
        frames = [_LINE.sub(")", frame) for frame in stack_text.split(";")]
        if frames[-1] == _IDLE_WORKER:  # waits for the parent's next command, off CPU
            continue
        total += count
        own[frames[-1]] += count
        files[_FILE.sub("", frames[-1])] += count
        for name in set(frames):
            inclusive[name] += count

    def shares(counter: Counter[str]) -> dict[str, float]:
        return {k: round(v / total * 100, 1) for k, v in counter.most_common(top)}

    return {
        "samples": total,
        "by_file_pct": shares(files),
        "self_pct": shares(own),
        "inclusive_pct": shares(inclusive),
    }


# ---------------------------------------------------------------------------------------
# Child side


async def child_main(config: dict[str, Any]) -> None:
    import agentmesh

    url = config["url"]
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        for i in range(config["workers"]):
            agent = agentmesh.Agent(f"sdk-worker-{i}")

            @agent.capability(CAPABILITY)
            async def echo(n: int) -> int:
                return n

            await nursery.start(partial(agent.serve, url))
        clients = [
            await stack.enter_async_context(agentmesh.connect(url, name=f"sdk-requester-{i}"))
            for i in range(config["requesters"])
        ]
        emit({"event": "ready"})
        await next_command()  # go

        now = perf_counter()
        measured = Window(now + config["warmup"], now + config["warmup"] + config["duration"])

        async def loop(client: agentmesh.Client, k: int) -> None:
            # No deadline around `delegate`: it would become the tasks' TTL.
            done = perf_counter()
            while done < measured.end:
                started = done
                await client.delegate(CAPABILITY, {"n": k})
                done = perf_counter()
                measured.record(started, done)

        async with trio.open_nursery() as load:
            for client in clients:
                for k in range(config["window"]):
                    load.start_soon(loop, client, k)
        emit({"latencies": [round(x, 7) for x in measured.latencies]})
        await next_command()  # stop (or end of input)
        nursery.cancel_scope.cancel()  # the agents; the requesters close with the stack


# ---------------------------------------------------------------------------------------
# Standalone


def _print_run(run: dict[str, Any]) -> None:
    print(
        f"  {run['rate']:>8.0f}/s  p50 {run['p50_ms']:7.3f}  p99 {run['p99_ms']:7.3f} ms  "
        f"client {run['client_cpu_us']:6.1f} us  hub {run['hub_cpu_us']:5.1f} us per "
        f"delegation  (client {run['load_cpu_pct']:5.1f}% hub {run['server_cpu_pct']:5.1f}% "
        f"other {run['other_cpu_pct']:5.1f}% CPU)",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default=SIZE, help=f"WxRxWINDOW [{SIZE}]")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds [5]")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before [1]")
    parser.add_argument("--runs", type=int, default=3, help="runs, each on a fresh hub [3]")
    parser.add_argument("--profile", type=Path, help="py-spy the client process (one run)")
    parser.add_argument("--summary", type=Path, help="only summarise a py-spy raw file")
    parser.add_argument("--json", type=Path, help="write the runs and medians here")
    args = parser.parse_args(argv)
    if args.summary:
        summary = top_functions(args.summary)
        print(f"{summary['samples']} samples")
        for title in ("by_file_pct", "self_pct", "inclusive_pct"):
            print(f"\n{title}:")
            for name, pct in summary[title].items():
                print(f"  {pct:5.1f}%  {name}")
        return 0
    size = Size.parse(args.size)
    runs = []
    print(f"SDK to SDK, size {size.label}, {args.runs} runs of {args.duration:g} s", flush=True)
    for i in range(args.runs):
        with Server.hub() as server:
            profile = args.profile if i == 0 else None
            run = run_sdk(server, size, warmup=args.warmup, duration=args.duration, profile=profile)
        runs.append(run)
        _print_run(run)
    keys = ("rate", "p50_ms", "p99_ms", "client_cpu_us", "hub_cpu_us", "other_cpu_pct")
    medians = {k: round(statistics.median(r[k] for r in runs), 1) for k in keys}
    spread = {k: [min(r[k] for r in runs), max(r[k] for r in runs)] for k in keys}
    print(f"median: {json.dumps(medians)}\nrange:  {json.dumps(spread)}")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "median": medians}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):  # started by `run_sdk`
        trio.run(child_main, json.loads(sys.argv[1])["child"])
    else:
        sys.exit(main())
