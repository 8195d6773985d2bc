"""Scale: idle agents on one hub. Memory per agent, discover cost, broadcast fan-out.

The hub runs in its own process; load processes open the agents, `CONNECT_CONCURRENCY`
handshakes at a time. Every agent registers with one capability and then stays silent
(the hub runs with a 600 s heartbeat interval, so nobody is dropped for silence).
`NEEDLES` of them offer ``needle``, the rest ``idle-agent``; a hidden probe agent in the
first load process asks ``discover needle`` and sends the broadcasts.

At each level (number of agents connected) it measures:

- the hub's RSS (VmRSS), and from it RSS per idle agent = (RSS - RSS with no agent) / N;
- discover latency: round trips of ``discover needle`` from the probe, one at a time.
  The answer always lists the same `NEEDLES` agents, so any growth with the level is a
  cost of the agents that do not match. Heartbeat round trips, interleaved, are the
  control: what any request costs at that level;
- broadcast fan-out: from the probe's sending of one ``broadcast`` until the last agent
  has received it (perf_counter, which is CLOCK_MONOTONIC on Linux: one clock for all the
  processes). It includes the time the load processes take to read N frames; the hub's
  own CPU time for it is reported beside.

Parent side: `measure_scale`. Child side: ``python bench/scale.py CONFIG_JSON``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections import defaultdict
from time import perf_counter
from typing import Any

import orjson
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection

from load import LoadError, dumps, emit, latency_summary, next_command, open_agent, open_many
from procs import Child, Server, ask_all, split

NEEDLES = 10
IDLE_CAPABILITY = "idle-agent"
NEEDLE_CAPABILITY = "needle"


# ---------------------------------------------------------------------------------------
# Parent side


def measure_scale(
    levels: list[int],
    *,
    processes: int,
    discover_count: int,
    broadcasts: int,
    progress: Any = print,
) -> dict[str, Any]:
    """Grow one hub through `levels` agents and measure at each; see the module doc."""
    results: list[dict[str, Any]] = []
    with Server.hub() as hub:
        time.sleep(0.5)
        baseline = hub.rss_bytes()
        children = [Child("scale.py", {"url": hub.url, "probe": i == 0}) for i in range(processes)]
        try:
            for child in children:
                child.receive()  # ready
            probe = children[0]
            for level in levels:
                started = time.monotonic()
                per_child = split(level, processes)
                for child, count in zip(children, per_child, strict=True):
                    child.send({"cmd": "grow", "to": count})
                grown = [child.receive() for child in children]
                opened = sum(g["agents"] for g in grown)
                grow_s = time.monotonic() - started
                why = [reason for g in grown for reason in g["why"]]
                time.sleep(1.0)  # let the hub settle before reading its memory
                rss = hub.rss_bytes()
                row: dict[str, Any] = {
                    "agents": opened,
                    "connect_s": round(grow_s, 2),
                    "rss_mb": round(rss / 2**20, 1),
                    "rss_per_agent_kb": round((rss - baseline) / opened / 1024, 2),
                }
                found = probe.ask({"cmd": "discover", "count": discover_count})
                row["discover_matches"] = found["matches"]
                row["discover"] = latency_summary(found["discover"])
                row["heartbeat"] = latency_summary(found["heartbeat"])
                row["broadcast"] = _broadcasts(hub, children, per_child, broadcasts)
                results.append(row)
                progress(
                    f"  {opened:>6} agents: RSS {row['rss_mb']} MB "
                    f"({row['rss_per_agent_kb']} KB/agent), discover p50 "
                    f"{row['discover']['p50_ms']} ms, broadcast "
                    f"{row['broadcast']['median_ms']} ms (connected in {grow_s:.1f} s)"
                )
                if opened < level:
                    row["shortfall"] = f"only {opened} of {level} agents connected: {why[:1]}"
                    progress(f"  stopped: {row['shortfall']}")
                    break
        finally:
            for child in children:
                child.stop()
    return {
        "baseline_rss_mb": round(baseline / 2**20, 1),
        "needles": NEEDLES,
        "levels": results,
    }


def _broadcasts(
    hub: Server, children: list[Child], per_child: list[int], count: int
) -> dict[str, Any]:
    """Send `count` broadcasts one after another; time each until every agent has it, and
    take the hub's CPU time meanwhile (in clock ticks of 10 ms: a rough figure)."""
    times, acks, cpu = [], [], []
    for tag in range(count):
        cpu_before = hub.cpu_seconds()
        sent = children[0].ask({"cmd": "broadcast", "tag": f"b{time.monotonic_ns()}-{tag}"})
        got = ask_all(children, {"cmd": "received", "tag": sent["tag"], "timeout": 60})
        cpu.append((hub.cpu_seconds() - cpu_before) * 1e3)
        received = sum(g["count"] for g in got)
        if received < sum(per_child):
            raise RuntimeError(f"broadcast reached {received} of {sum(per_child)} agents")
        last = max(g["last"] for g in got if g["count"])
        times.append((last - sent["sent_at"]) * 1e3)
        acks.append((sent["ack_at"] - sent["sent_at"]) * 1e3)
    return {
        "recipients": sent["recipients"],
        "median_ms": round(statistics.median(times), 2),
        "all_ms": [round(t, 2) for t in times],
        "ack_median_ms": round(statistics.median(acks), 2),
        "hub_cpu_median_ms": round(statistics.median(cpu), 1),
    }


# ---------------------------------------------------------------------------------------
# Child side


class Inbox:
    """When this process's agents received each broadcast (tagged by its message)."""

    def __init__(self) -> None:
        self.count: dict[str, int] = defaultdict(int)
        self.last: dict[str, float] = {}
        self._waiting: tuple[str, int, trio.Event] | None = None

    def got(self, tag: str) -> None:
        self.count[tag] += 1
        self.last[tag] = perf_counter()
        if self._waiting and self._waiting[0] == tag and self.count[tag] >= self._waiting[1]:
            self._waiting[2].set()

    async def wait_for(self, tag: str, count: int) -> None:
        """Until `count` agents have received broadcast `tag`."""
        if self.count[tag] < count:
            self._waiting = (tag, count, trio.Event())
            await self._waiting[2].wait()
        self._waiting = None


class Fleet:
    """This process's idle agents, and the probe (in the first process only)."""

    def __init__(self, nursery: trio.Nursery, url: str, probe: WebSocketConnection | None):
        self.nursery = nursery
        self.url = url
        self.probe = probe
        self.agents: list[WebSocketConnection] = []
        self.inbox = Inbox()

    async def grow(self, to: int) -> dict[str, Any]:
        """Open agents until there are `to`; report how many there are, and why not more."""
        start = len(self.agents)
        failures: list[str] = []

        async def open_one(i: int) -> WebSocketConnection | None:
            n = start + i
            needle = self.probe is not None and n < NEEDLES
            capability = NEEDLE_CAPABILITY if needle else IDLE_CAPABILITY
            try:
                ws = await open_agent(self.nursery, self.url, f"idle-{n}", [capability])
            except (OSError, HandshakeError, ConnectionClosed, LoadError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                return None
            self.nursery.start_soon(self._idle, ws)
            return ws

        self.agents += await open_many(max(0, to - start), open_one)
        return {"agents": len(self.agents), "failed": len(failures), "why": failures[:1]}

    async def _idle(self, ws: WebSocketConnection) -> None:
        while True:
            frame = orjson.loads(await ws.get_message())
            if frame["type"] == "broadcast":
                self.inbox.got(frame["payload"]["message"])

    async def discover(self, count: int) -> dict[str, Any]:
        """`count` discover round trips from the probe, after 10 unmeasured ones.

        Each is followed by a heartbeat round trip, the control: what any request costs
        at this level, so that what discover adds to it can be told apart.
        """
        assert self.probe is not None
        discover = {"type": "discover", "payload": {"capability": NEEDLE_CAPABILITY}}
        heartbeat = {"type": "heartbeat"}
        latencies: dict[str, list[float]] = {"discover": [], "heartbeat": []}
        matches = 0
        for i in range(count + 10):
            for name, frame in (("discover", discover), ("heartbeat", heartbeat)):
                started = perf_counter()
                await self.probe.send_message(dumps({**frame, "id": f"{name}{i}"}))
                reply = orjson.loads(await self.probe.get_message())
                if i >= 10:
                    latencies[name].append(perf_counter() - started)
                if name == "discover":
                    matches = len(reply["payload"]["agents"])
        return {**latencies, "matches": matches}

    async def broadcast(self, tag: str) -> dict[str, Any]:
        """One broadcast from the probe, with message `tag`; when it left, when it was acked."""
        assert self.probe is not None
        frame = {"type": "broadcast", "id": tag, "payload": {"message": tag}}
        sent_at = perf_counter()
        await self.probe.send_message(dumps(frame))
        reply = orjson.loads(await self.probe.get_message())
        ack_at = perf_counter()
        if reply["type"] != "broadcast":
            raise LoadError(f"broadcast refused: {reply['payload']}")
        recipients = reply["payload"]["recipients"]
        return {"tag": tag, "sent_at": sent_at, "ack_at": ack_at, "recipients": recipients}

    async def received(self, tag: str) -> dict[str, Any]:
        """Wait until every agent here has broadcast `tag`."""
        await self.inbox.wait_for(tag, len(self.agents))
        return self.received_so_far(tag)

    def received_so_far(self, tag: str) -> dict[str, Any]:
        return {"count": self.inbox.count[tag], "last": self.inbox.last.get(tag)}


async def child_main(config: dict[str, Any]) -> None:
    async with trio.open_nursery() as nursery:
        probe = None
        if config["probe"]:
            probe = await open_agent(nursery, config["url"], "probe", hidden=True)
        fleet = Fleet(nursery, config["url"], probe)
        emit({"event": "ready"})
        while (command := await next_command())["cmd"] != "stop":
            if command["cmd"] == "grow":
                emit(await fleet.grow(command["to"]))
            elif command["cmd"] == "discover":
                emit(await fleet.discover(command["count"]))
            elif command["cmd"] == "broadcast":
                emit(await fleet.broadcast(command["tag"]))
            elif command["cmd"] == "received":
                with trio.move_on_after(command["timeout"]):
                    emit(await fleet.received(command["tag"]))
                    continue
                emit(fleet.received_so_far(command["tag"]))  # timed out
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(child_main, json.loads(sys.argv[1]))
