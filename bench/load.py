"""The load generator: requesters and worker agents speaking the wire protocol directly.

It speaks the wire protocol with a lean WebSocket client of its own ([wire.py](wire.py))
and orjson, not the SDK, so that the load costs as little as possible and the server
under test is what runs out of CPU first: each connection reads whatever has arrived,
handles every frame in it, and writes the frames it answers with in one write.

Two kinds of server, one code path. A requester sends ``delegate`` frames and counts a
request done when the frame that ends it comes back:

- hub: the hub acks the delegate, forwards the task to a worker agent, the worker
  answers with a ``result`` at once, and the hub routes the result back. Done = the
  requester receives that ``result`` (5 frames through the hub);
- echo: the echo server sends the very same delegate frame back. Done = the requester
  receives it (2 frames through the server).

Latency is measured in the requester's process, from sending ``delegate`` to receiving
the frame that ends it. A closed loop keeps ``window`` requests outstanding per
requester; an open loop sends at a fixed rate and measures from the intended send time,
so that a stalled server cannot hide its stalls (no coordinated omission).

Parent side: `run_load` starts the load processes and aggregates what they measured.
Child side: ``python bench/load.py CONFIG_JSON`` (started by `run_load`).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any, TypeVar

import orjson
import trio
from trio_websocket import WebSocketConnection, connect_websocket_url

from procs import Child, Server, machine_busy_seconds, split, thread_cpu_seconds
from wire import Connection

C = TypeVar("C")
CAPABILITY = "bench-echo"
CONNECT_CONCURRENCY = 64


class LoadError(Exception):
    """The server answered something the load generator did not expect."""


# ---------------------------------------------------------------------------------------
# Sizes and results (parent side)


@dataclass(frozen=True)
class Size:
    """W worker agents x R requesters x `window` delegations outstanding per requester."""

    workers: int
    requesters: int
    window: int

    @classmethod
    def parse(cls, text: str) -> Size:
        try:
            workers, requesters, window = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"a size is WxRxWINDOW, like 8x8x16, not {text!r}") from None
        if min(workers, requesters, window) < 1:
            raise ValueError(f"every part of a size must be at least 1: {text!r}")
        return cls(workers, requesters, window)

    @property
    def label(self) -> str:
        return f"{self.workers}x{self.requesters}x{self.window}"

    @property
    def outstanding(self) -> int:
        return self.requesters * self.window


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (q in 0..100)."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def latency_summary(latencies: list[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean in milliseconds, from latencies in seconds."""
    ordered = sorted(latencies)
    ms = {f"p{q}_ms": percentile(ordered, q) * 1e3 for q in (50, 90, 99)}
    ms["max_ms"] = ordered[-1] * 1e3 if ordered else math.nan
    ms["mean_ms"] = sum(ordered) / len(ordered) * 1e3 if ordered else math.nan
    return {key: round(value, 3) for key, value in ms.items()}


def run_load(
    server: Server,
    size: Size,
    *,
    processes: int,
    warmup: float,
    duration: float,
    rate: float | None = None,
    profile: Path | None = None,
    max_concurrency: int | None = None,
) -> dict[str, Any]:
    """Put `size` of load on `server` and return what was measured.

    Closed loop unless `rate` (delegations/s in total) is given. With `profile`, the
    server is sampled by py-spy during the measured window and the raw stacks are
    written there. With `max_concurrency`, each worker registers that limit, and the
    tasks past it wait in the hub's queue.
    """
    workers = split(size.workers, processes)
    requesters = split(size.requesters, processes)
    children = []
    try:
        for i in range(processes):
            config = {
                "mode": "hub" if server.kind.startswith("hub") else "echo",
                "url": server.url,
                "workers": workers[i],
                "requesters": requesters[i],
                "window": size.window,
                "rate": None if rate is None else rate * requesters[i] / size.requesters,
                "warmup": warmup,
                "duration": duration,
                "max_concurrency": max_concurrency,
            }
            children.append(Child("load.py", config))
        for child in children:
            child.receive()  # ready: connected and registered
        for child in children:
            child.send({"cmd": "go"})
        time.sleep(warmup)
        spy = _start_profile(server.pid, duration, profile) if profile else None
        threads0 = thread_cpu_seconds(server.pid)
        cpu0 = [machine_busy_seconds(), server.cpu_seconds(), *(c.cpu_seconds() for c in children)]
        start = time.monotonic()
        time.sleep(duration)
        cpu1 = [machine_busy_seconds(), server.cpu_seconds(), *(c.cpu_seconds() for c in children)]
        threads1 = thread_cpu_seconds(server.pid)
        elapsed = time.monotonic() - start
        results = [child.receive() for child in children]
        if spy is not None:
            spy.wait(timeout=60)
    finally:
        for child in children:
            child.stop()
    latencies = [x for r in results for x in r["latencies"]]
    machine, server_cpu, *load_cpu = (
        (b - a) / elapsed * 100 for a, b in zip(cpu0, cpu1, strict=True)
    )
    return {
        "server": server.kind,
        "size": size.label,
        "loop": "closed" if rate is None else "open",
        "target_rate": rate,
        "max_concurrency": max_concurrency,
        "rate": round(len(latencies) / duration, 1),
        "completed": len(latencies),
        **latency_summary(latencies),
        "server_cpu_pct": round(server_cpu, 1),
        # The server's threads besides the main one (a durable hub's SQLite writes).
        "server_threads_cpu_pct": round((threads1[1] - threads0[1]) / elapsed * 100, 1),
        "load_cpu_pct": round(sum(load_cpu), 1),
        "other_cpu_pct": round(max(0.0, machine - server_cpu - sum(load_cpu)), 1),
    }


def _start_profile(pid: int, duration: float, out: Path) -> subprocess.Popen[bytes]:
    spy = Path(sys.executable).with_name("py-spy")
    argv = [str(spy) if spy.exists() else "py-spy", "record", "--pid", str(pid)]
    argv += ["--duration", str(max(1, round(duration))), "--rate", "250"]
    argv += ["--format", "raw", "--output", str(out)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------------------------------
# Connections (child side; shared with scale.py)


def dumps(frame: dict[str, Any]) -> str:
    """A frame as text: a bytes message would go out as a binary frame, which the hub refuses."""
    return orjson.dumps(frame).decode()


async def open_agent(
    nursery: trio.Nursery,
    url: str,
    name: str | None,
    capabilities: Sequence[str] = (),
    *,
    hidden: bool = False,
) -> WebSocketConnection:
    """Connect, and register as `name` unless it is None (an echo-server connection)."""
    ws = await connect_websocket_url(nursery, url)
    if name is not None:
        payload: dict[str, Any] = {"name": name, "capabilities": list(capabilities)}
        if hidden:
            payload["hidden"] = True
        await ws.send_message(dumps({"type": "register", "id": "reg", "payload": payload}))
        reply = orjson.loads(await ws.get_message())
        if reply["type"] != "register":
            raise LoadError(f"register refused: {reply['payload']}")
    return ws


async def open_many(count: int, opener: Callable[[int], Awaitable[C | None]]) -> list[C]:
    """`opener(0..count-1)`, a few at a time (a burst of handshakes overflows the backlog).

    Returns the connections opened, leaving out those for which `opener` gave None.
    """
    opened: list[C | None] = [None] * count
    limit = trio.CapacityLimiter(CONNECT_CONCURRENCY)

    async def one(i: int) -> None:
        async with limit:
            opened[i] = await opener(i)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    return [ws for ws in opened if ws is not None]


def emit(message: dict[str, Any]) -> None:
    """One line to the parent."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def next_command() -> dict[str, Any]:
    """The parent's next command; ``{"cmd": "stop"}`` at end of input."""
    line = await trio.to_thread.run_sync(sys.stdin.readline)
    return json.loads(line) if line.strip() else {"cmd": "stop"}


# ---------------------------------------------------------------------------------------
# Requesters and workers (child side)


class Window:
    """The measured window: latencies of the requests that end inside it."""

    def __init__(self, start: float, end: float) -> None:
        self.start = start
        self.end = end
        self.latencies: list[float] = []

    def record(self, started: float, done: float) -> None:
        if self.start <= done < self.end:
            self.latencies.append(done - started)


class Requester:
    """One connection that sends delegate frames and matches the frames that end them."""

    def __init__(self, conn: Connection, *, echo: bool, capability: str = CAPABILITY) -> None:
        self.conn = conn
        self.echo = echo
        self.capability = capability
        self._seq = 0
        self._by_id: dict[str, float] = {}  # request id -> start time
        self._by_task: dict[str, float] = {}  # task id -> start time (hub: after the ack)

    def queue(self, started: float) -> None:
        self._seq += 1
        request_id = f"r{self._seq}"
        self._by_id[request_id] = started
        frame = {
            "type": "delegate",
            "id": request_id,
            "payload": {"capability": self.capability, "params": {"n": self._seq}},
        }
        self.conn.queue(dumps(frame))

    async def receive(self) -> list[float]:
        """Read what has arrived; the start times of the requests it ends."""
        ended = []
        for text in await self.conn.receive():
            frame = orjson.loads(text)
            if self.echo:
                ended.append(self._by_id.pop(frame["id"]))
                continue
            kind = frame["type"]
            if kind == "result":
                ended.append(self._by_task.pop(frame["payload"]["task_id"]))
            elif kind == "delegate" and "in_reply_to" in frame:
                task_id = frame["payload"]["task_id"]
                self._by_task[task_id] = self._by_id.pop(frame["in_reply_to"])
            elif kind == "status":  # a task of ours left the hub's queue for an agent
                continue
            else:
                raise LoadError(f"unexpected frame: {frame}")
        return ended

    async def closed_loop(self, window: int, measured: Window) -> None:
        """Keep `window` delegations outstanding: each one that ends starts the next."""
        for _ in range(window):
            self.queue(perf_counter())
        await self.conn.flush()
        while True:
            ended = await self.receive()
            if ended:
                done = perf_counter()
                for started in ended:
                    measured.record(started, done)
                    self.queue(done)
                await self.conn.flush()

    async def open_loop(self, rate: float, measured: Window) -> None:
        """Send `rate` delegations/s on a fixed schedule, whatever comes back."""

        async def collect() -> None:
            while True:
                ended = await self.receive()
                done = perf_counter()
                for started in ended:
                    measured.record(started, done)

        interval = 1 / rate
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            # Both clocks at one instant; a random phase keeps requesters from moving in step.
            phase = random.random() * interval
            t_trio, t_perf = trio.current_time() + phase, perf_counter() + phase
            for k in itertools.count():
                await trio.sleep_until(t_trio + k * interval)
                self.queue(t_perf + k * interval)  # the intended time, not the actual
                await self.conn.flush()


async def work(conn: Connection) -> None:
    """A worker agent: answer every task at once with a successful result."""
    while True:
        for text in await conn.receive():
            frame = orjson.loads(text)
            if frame["type"] != "delegate" or "in_reply_to" in frame:
                raise LoadError(f"worker got an unexpected frame: {frame}")
            task = frame["payload"]
            result = {"task_id": task["task_id"], "success": True, "data": task["params"]}
            conn.queue(dumps({"type": "result", "id": task["task_id"], "payload": result}))
        await conn.flush()


async def open_lean(
    url: str,
    name: str | None,
    capabilities: Sequence[str] = (),
    max_concurrency: int | None = None,
) -> Connection:
    """Like `open_agent`, on the load generator's lean client."""
    conn = await Connection.open(url)
    if name is not None:
        payload: dict[str, Any] = {"name": name, "capabilities": list(capabilities)}
        if max_concurrency is not None:
            payload["max_concurrency"] = max_concurrency
        await conn.send(dumps({"type": "register", "id": "reg", "payload": payload}))
        texts: list[str] = []
        while not texts:
            texts = await conn.receive()
        reply = orjson.loads(texts[0])
        if reply["type"] != "register":
            raise LoadError(f"register refused: {reply['payload']}")
    return conn


async def child_main(config: dict[str, Any]) -> None:
    echo = config["mode"] == "echo"
    url = config["url"]
    # Optional (bench/cluster.py): the workers on another hub than the requesters, and a
    # capability of their own.
    agents_url = config.get("agents_url") or url
    capability = config.get("capability") or CAPABILITY
    workers: list[Connection] = []
    if not echo:
        workers = await open_many(
            config["workers"],
            lambda i: open_lean(
                agents_url, f"worker-{i}", [capability], config.get("max_concurrency")
            ),
        )
    requester_conns = await open_many(
        config["requesters"], lambda i: open_lean(url, None if echo else f"requester-{i}")
    )
    requesters = [Requester(conn, echo=echo, capability=capability) for conn in requester_conns]
    emit({"event": "ready"})
    await next_command()  # go

    now = perf_counter()
    measured = Window(now + config["warmup"], now + config["warmup"] + config["duration"])
    with trio.move_on_at(trio.current_time() + measured.end - now):
        async with trio.open_nursery() as load:
            for conn in workers:
                load.start_soon(work, conn)
            for requester in requesters:
                if config["rate"]:
                    rate = config["rate"] / len(requesters)
                    load.start_soon(requester.open_loop, rate, measured)
                else:
                    load.start_soon(requester.closed_loop, config["window"], measured)
    emit({"latencies": [round(x, 7) for x in measured.latencies]})
    await next_command()  # stop (or end of input)
    for conn in [*workers, *requester_conns]:
        await conn.aclose()


if __name__ == "__main__":
    trio.run(child_main, json.loads(sys.argv[1]))
