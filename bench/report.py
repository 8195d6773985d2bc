"""Results as JSON, a markdown report, and a chart of throughput and p99 against load."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import baseline

RATIO_TARGET = 0.85
P99_TARGET_MS = 10.0
AGENTS_TARGET = 10_000
DURABLE_RATIO_TARGET = 0.5  # the durable hub's peak / the memory hub's, at least
DURABLE_P99_TARGET_MS = 20.0  # at half of the durable hub's peak
RESTART_TASKS = 1_000_000  # retained tasks the restart target is for
RESTART_TARGET_S = 5.0
# Discover p50 with the most agents / with the fewest, at most. A scan of every agent
# would multiply it many times over from 100 to 10,000 agents; this leaves room for noise.
DISCOVER_FLAT = 2.0
SDK_CLIENT_CPU_TARGET_US = 75.0  # client CPU per SDK-to-SDK delegation, at most
ORDINARY_HUB_CPU_TARGET_US = 40.0  # hub CPU per delegation with ordinary clients, at most
# The rows of the hub-against-its-peers table, in order.
PEERS = {
    "lean": "hub, lean load generator (batched writes)",
    "ordinary": "hub, ordinary clients (one frame per write)",
    "ordinary_durable": "durable hub, ordinary clients",
    "sdk": "SDK to SDK (through the hub)",
    "nats": "NATS request-reply (nats-server, nats-py)",
}


def _against_floor(run: dict[str, Any]) -> str:
    """The floor under an open-loop p99, for the targets table: an echo server's p99 at
    the same rate (see the open-loop section)."""
    floor = run.get("floor")
    return "" if floor is None else f" (an echo server at the same rate: {floor['p99_ms']:.2f} ms)"


def targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target of the design, what was measured, and whether it was met."""
    checks: dict[str, dict[str, Any]] = {}
    if "summary" in results:
        ratio = results["summary"]["ratio"]
        checks["throughput"] = {
            "target": f"hub >= {RATIO_TARGET:.0%} of the ceiling (2/5 of the trio-websocket "
            "echo rate)",
            "measured": f"{ratio:.1%}",
            "met": ratio >= RATIO_TARGET,
        }
        p99 = results["half_load"]["p99_ms"]
        checks["latency"] = {
            "target": f"p99 < {P99_TARGET_MS:g} ms at half of peak load",
            "measured": f"{p99:.2f} ms" + _against_floor(results["half_load"]),
            "met": p99 < P99_TARGET_MS,
        }
        s = results["summary"]
        checks["durable_throughput"] = {
            "target": f"durable hub's peak >= {DURABLE_RATIO_TARGET:.0%} of the memory hub's",
            "measured": f"{s['durable_peak']:.0f}/s against {s['hub_peak']:.0f}/s: "
            f"{s['durable_ratio']:.1%}",
            "met": s["durable_ratio"] >= DURABLE_RATIO_TARGET,
        }
        p99 = results["durable_half_load"]["p99_ms"]
        checks["durable_latency"] = {
            "target": f"durable hub: p99 < {DURABLE_P99_TARGET_MS:g} ms at half of its peak",
            "measured": f"{p99:.2f} ms" + _against_floor(results["durable_half_load"]),
            "met": p99 < DURABLE_P99_TARGET_MS,
        }
    if "sdk" in results:
        sdk = results["sdk"]
        checks["sdk_client_cpu"] = {
            "target": f"SDK to SDK: client CPU < {SDK_CLIENT_CPU_TARGET_US:g} us per delegation "
            f"(size {sdk['size']})",
            "measured": f"{sdk['client_cpu_us']:.1f} us at {sdk['rate']:.0f} delegations/s",
            "met": sdk["client_cpu_us"] < SDK_CLIENT_CPU_TARGET_US,
        }
    if any("ordinary" in row for row in results.get("peers", [])):
        rows = [row for row in results["peers"] if "ordinary" in row]
        worst = max(rows, key=lambda row: row["ordinary"]["server_cpu_us"] or 0.0)
        cpu = worst["ordinary"]["server_cpu_us"]
        checks["ordinary_hub_cpu"] = {
            "target": f"hub with ordinary clients: hub CPU < {ORDINARY_HUB_CPU_TARGET_US:g} us "
            f"per delegation (sizes {', '.join(row['size'] for row in rows)})",
            "measured": ", ".join(
                f"{row['ordinary']['server_cpu_us']} us at {row['size']}" for row in rows
            ),
            "met": cpu is not None and cpu < ORDINARY_HUB_CPU_TARGET_US,
        }
    if "baseline" in results and "skipped" not in results["baseline"]:
        checks |= _baseline_targets(results["baseline"])
    if "restart" in results:
        restart = results["restart"]
        accept = restart["accept_median_s"]
        checks["restart"] = {
            "target": f"restart with {RESTART_TASKS:,} retained tasks < {RESTART_TARGET_S:g} s "
            "(until it accepts a connection)",
            "measured": f"{accept:.2f} s with {restart['tasks']:,} tasks (median of "
            f"{len(restart['starts'])})",
            # Not tried is not failed: --quick restarts on fewer tasks.
            "met": accept < RESTART_TARGET_S if restart["tasks"] >= RESTART_TASKS else None,
        }
    if "scale" in results:
        levels = results["scale"]["levels"]
        most = max(level["agents"] for level in levels)
        tried = max(results["settings"]["scale_levels"])
        checks["idle_agents"] = {
            "target": f"{AGENTS_TARGET:,} idle agents on one hub",
            "measured": f"{most:,} connected",
            # Not tried is not failed: --quick stops at fewer agents.
            "met": most >= AGENTS_TARGET if tried >= AGENTS_TARGET else None,
        }
        if len(levels) > 1:
            first, last = levels[0], levels[-1]
            growth = last["discover"]["p50_ms"] / first["discover"]["p50_ms"]
            checks["discover"] = {
                "target": "discover cost independent of non-matching agents "
                f"(p50 grows < {DISCOVER_FLAT:g}x)",
                "measured": f"p50 {first['discover']['p50_ms']:.3f} ms with "
                f"{first['agents']:,} agents, {last['discover']['p50_ms']:.3f} ms with "
                f"{last['agents']:,} ({growth:.2f}x)",
                "met": growth < DISCOVER_FLAT,
            }
    return checks


def _baseline_targets(b: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Issue 18's targets as ratios to the code of the day it was filed, both run here."""
    checks: dict[str, dict[str, Any]] = {}
    sdk = f"sdk {baseline.SDK_SIZE}"
    if sdk in b["ratios"]:
        r, m = b["ratios"][sdk], b["medians"][sdk]
        checks["sdk_against_baseline"] = {
            "target": f"SDK to SDK against the SDK and hub of {b['rev']} (the day issue 18 "
            f"was filed), this run: throughput >= {baseline.SDK_RATE_TARGET:g}x, client CPU "
            f"per delegation <= {baseline.SDK_CLIENT_CPU_TARGET:.2f}x (75 of 225 us)",
            "measured": f"throughput {r['rate']:.2f}x ({m['baseline']['rate']:.0f} -> "
            f"{m['this']['rate']:.0f}/s), client CPU {r['client_cpu_us']:.2f}x "
            f"({m['baseline']['client_cpu_us']} -> {m['this']['client_cpu_us']} us)",
            "met": r["rate"] >= baseline.SDK_RATE_TARGET
            and r["client_cpu_us"] <= baseline.SDK_CLIENT_CPU_TARGET,
        }
    sizes = [s for s in baseline.ORDINARY_SIZES if f"ordinary {s}" in b["ratios"]]
    if sizes:
        ratio = {s: b["ratios"][f"ordinary {s}"]["server_cpu_us"] for s in sizes}
        medians = {s: b["medians"][f"ordinary {s}"] for s in sizes}
        checks["ordinary_against_baseline"] = {
            "target": f"hub with ordinary clients against the hub of {b['rev']}, this run: hub "
            "CPU per delegation <= "
            + ", ".join(f"{baseline.ORDINARY_HUB_CPU_TARGETS[s]:.2f}x at {s}" for s in sizes)
            + " (40 of 79 and 66 us)",
            "measured": ", ".join(
                f"{ratio[s]:.2f}x at {s} ({medians[s]['baseline']['server_cpu_us']} -> "
                f"{medians[s]['this']['server_cpu_us']} us)"
                for s in sizes
            ),
            "met": all(ratio[s] <= baseline.ORDINARY_HUB_CPU_TARGETS[s] for s in sizes),
        }
    return checks


def headline(results: dict[str, Any]) -> str:
    lines = []
    if "summary" in results:
        s = results["summary"]
        lines.append(
            f"echo {s['echo_peak']:.0f}/s -> ceiling {s['ceiling']:.0f} delegations/s; "
            f"hub {s['hub_peak']:.0f}/s at {s['hub_peak_size']} = {s['ratio']:.1%} of it; "
            f"p99 at half of peak {results['half_load']['p99_ms']:.2f} ms"
        )
        lines.append(
            f"echo on agentmesh's own stack {s['echo_own_peak']:.0f}/s -> ceiling "
            f"{s['ceiling_own']:.0f} delegations/s; the hub is {s['ratio_own']:.1%} of it"
        )
        lines.append(
            f"durable hub {s['durable_peak']:.0f}/s at {s['durable_peak_size']} = "
            f"{s['durable_ratio']:.1%} of the memory hub; p99 at half of its peak "
            f"{results['durable_half_load']['p99_ms']:.2f} ms; "
            f"{s['durable_store']['bytes_per_task']} bytes per task on disk"
        )
    if "sdk" in results:
        sdk = results["sdk"]
        lines.append(
            f"SDK to SDK {sdk['rate']:.0f}/s at {sdk['size']}, p50 {sdk['p50_ms']:.2f} ms; "
            f"client CPU {sdk['client_cpu_us']} us, hub CPU {sdk['hub_cpu_us']} us per delegation"
        )
    for row in results.get("peers", []):
        parts = []
        for kind, short in (("lean", "hub lean"), ("ordinary", "hub ordinary"),
                            ("sdk", "SDK"), ("nats", "NATS")):  # fmt: skip
            if kind in row:
                run = row[kind]
                parts.append(f"{short} {run['rate']:.0f}/s ({run['server_cpu_us']} us server)")
        ratios = row["ratios"]
        if "ordinary_rate" in ratios:
            parts.append(
                f"ordinary hub/NATS: {ratios['ordinary_rate']:.2f}x throughput, "
                f"{ratios.get('ordinary_server_cpu', float('nan')):.1f}x server CPU"
            )
        lines.append(f"peers at {row['size']}: " + ", ".join(parts))
    if "cluster" in results:
        c = results["cluster"]
        if "skipped" in c:
            lines.append(f"cluster: skipped, {c['skipped']}")
        else:
            lines.append(f"cluster: {_cluster_ratios(c)}")
    if "restart" in results:
        r = results["restart"]
        lines.append(
            f"restart on {r['tasks']:,} retained tasks: accepts after {r['accept_median_s']:.2f} s"
            f" (empty store {r['empty_start']['accept_s']:.2f} s), RSS {r['rss_median_mb']} MB; "
            f"{r['file']['bytes_per_task']} bytes per task on disk"
        )
    for check in results["targets"].values():
        mark = {True: "met", False: "NOT met", None: "not tried"}[check["met"]]
        lines.append(f"  [{mark}] {check['target']}: {check['measured']}")
    return "\n".join(lines)


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**NOT met**", None: "not tried"}[met]


def write(results: dict[str, Any], out: Path) -> list[Path]:
    """Write results.json, results.md and (with matplotlib) throughput.png into `out`."""
    written = [out / "results.json", out / "results.md"]
    written[0].write_text(json.dumps(results, indent=2) + "\n")
    chart = out / "throughput.png"
    has_chart = "throughput" in results and _chart(results, chart)
    if has_chart:
        written.append(chart)
    readme = os.path.relpath(Path(__file__).with_name("README.md"), out)
    written[1].write_text(_markdown(results, readme, chart.name if has_chart else None))
    return written


# ---------------------------------------------------------------------------------------
# Markdown


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def _markdown(results: dict[str, Any], readme: str, chart: str | None) -> str:
    meta, settings = results["meta"], results["settings"]
    lines = [
        "# agentmesh benchmark results",
        "",
        f"Run on {meta['date']}: {meta['cpu']}, {meta['cores']} cores, Python "
        f"{meta['python']}, agentmesh {meta['versions']['agentmesh-hub']} (source "
        f"{meta['agentmesh_source_sha256']}), trio {meta['versions']['trio']}, "
        f"trio-websocket {meta['versions']['trio-websocket']}, wsproto "
        f"{meta['versions']['wsproto']}. {settings['duration']:g} s measured after "
        f"{settings['warmup']:g} s of warm-up per run, {settings['processes']} load "
        f"process(es); the whole run took {meta['wall_s']} s. What each number means: "
        f"[bench/README.md]({readme}).",
        "",
        "## Targets",
        "",
    ]
    lines += _table(
        ["target", "measured", "met"],
        [[c["target"], c["measured"], _verdict(c["met"])] for c in results["targets"].values()],
    )  # fmt: skip
    if "throughput" in results:
        lines += _throughput_md(results, chart)
    if "sdk" in results:
        lines += _sdk_md(results["sdk"])
    if "peers" in results:
        lines += _peers_md(results["peers"])
    if "limits" in results:
        lines += _limits_md(results["limits"])
    if "cluster" in results:
        lines += _cluster_md(results["cluster"])
    if "baseline" in results:
        lines += _baseline_md(results["baseline"])
    if "throughput" in results or "restart" in results:
        lines += _store_md(results)
    if "scale" in results:
        lines += _scale_md(results["scale"])
    for key, what in (("profile", "hub"), ("profile_durable", "durable hub")):
        if key in results and "error" not in results[key]:
            lines += _profile_md(results[key], what)
    return "\n".join(lines) + "\n"


def _throughput_md(results: dict[str, Any], chart: str | None) -> list[str]:
    s, half = results["summary"], results["half_load"]
    lines = ["", "## Throughput and latency", ""]
    if chart:
        lines += [f"![throughput and p99 against load]({chart})", ""]
    own_bound = _load_bound(results["throughput"], "echo_own")
    lines += [
        f"Peak: the trio-websocket echo server carried **{s['echo_peak']:.0f}** echoes/s "
        f"(size {s['echo_peak_size']}), so the ceiling the targets name is 2/5 of that, "
        f"**{s['ceiling']:.0f}** delegations/s. The hub peaked at **{s['hub_peak']:.0f}** "
        f"delegations/s (size {s['hub_peak_size']}): **{s['ratio']:.1%}** of that ceiling. "
        f"Per CPU-second of the server: echo {s['echo_per_server_cpu_s']:.0f}/s, hub "
        f"{s['hub_per_server_cpu_s']:.0f}/s, ratio {s['ratio_per_cpu']:.1%}.",
        "",
        "The hub does not run on trio-websocket but on its own WebSocket layer, so the "
        "same load was also put on an echo server built on that layer: "
        f"**{s['echo_own_peak']:.0f}** echoes/s (size {s['echo_own_peak_size']})"
        + (", limited by the load generator, not the server" if own_bound else "")
        + f". Its ceiling is {s['ceiling_own']:.0f} delegations/s and the hub reaches "
        f"**{s['ratio_own']:.1%}** of it: on this stack framing and socket work cost "
        "little, and most of a delegation's cost is the hub's own work (JSON, routing).",
        "",
        "Closed loop, latency of the hub's delegations (send `delegate` to receive "
        "`result`). CPU is % of one core during the measured window; *other* is what "
        "programs outside the benchmark used (high = a disturbed run).",
        "",
    ]
    rows = []
    for r in results["throughput"]:
        echo, own, hub = r["echo"], r["echo_own"], r["hub"]
        flag = " (disturbed)" if any(x["disturbed"] for x in (echo, own, hub)) else ""
        rows.append(
            [
                r["size"],
                r["outstanding"],
                f"{echo['rate']:.0f}",
                f"{r['ceiling']:.0f}",
                f"**{hub['rate']:.0f}**",
                f"{r['ratio']:.1%}",
                f"{own['rate']:.0f}",
                f"{r['ratio_own']:.1%}",
                f"{hub['p50_ms']:.2f}",
                f"{hub['p90_ms']:.2f}",
                f"{hub['p99_ms']:.2f}",
                f"{hub['server_cpu_pct']:.0f} / {echo['server_cpu_pct']:.0f} / "
                f"{own['server_cpu_pct']:.0f}",
                f"{hub['load_cpu_pct']:.0f} / {echo['load_cpu_pct']:.0f} / "
                f"{own['load_cpu_pct']:.0f}",
                f"{max(x['other_cpu_pct'] for x in (echo, own, hub)):.0f}{flag}",
            ]
        )
    lines += _table(
        [
            "size WxRxwindow",
            "outstanding",
            "echo/s (trio-websocket)",
            "ceiling/s",
            "hub delegations/s",
            "hub / ceiling",
            "echo/s (agentmesh stack)",
            "hub / its own ceiling",
            "p50 ms",
            "p90 ms",
            "p99 ms",
            "server CPU: hub / echo / echo (agentmesh)",
            "load CPU in those runs",
            "CPU other (most)",
        ],
        rows,
    )
    lines += [
        "",
        "### At half of peak load (open loop)",
        "",
        f"{half['target_rate']:.0f} delegations/s sent on a fixed schedule with the "
        f"agents of size {half['size']}; {half['rate']:.0f}/s completed. Latency from "
        "the scheduled send time. Each requester sends on its own schedule, one frame at "
        "a time, so the hub cannot batch as it does in the closed loop; the other row "
        "shows a lighter load for comparison.",
        "",
        "*Floor*: the same schedule against the echo server on the hub's own stack, right "
        "after (it answers each delegate at once and does next to nothing else): what "
        "this host and the load generator leave for any server. *Steadiness*: after "
        "each pair, the same chunk of Python timed again and again for a few seconds, "
        "alone (bench/steadiness.py); its p99 over its fastest says how unsteady the "
        "host's CPU was.",
        "",
    ]
    lines += _table(
        ["share of peak", "rate/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "hub CPU",
         "load CPU", "other CPU", "floor: echo p99 / max ms", "steadiness: chunk p99 / fastest"],
        [
            [
                f"{r['share']:.0%}",
                f"{r['target_rate']:.0f}",
                f"{r['p50_ms']:.2f}",
                f"{r['p90_ms']:.2f}",
                f"**{r['p99_ms']:.2f}**",
                f"{r['max_ms']:.2f}",
                f"{r['server_cpu_pct']:.0f}%",
                f"{r['load_cpu_pct']:.0f}%",
                f"{r['other_cpu_pct']:.0f}%",
                _floor(r),
                _steadiness(r),
            ]
            for r in results["open_loop"]
        ],
    )  # fmt: skip
    return lines


def _floor(run: dict[str, Any]) -> str:
    floor = run.get("floor")
    return "-" if floor is None else f"{floor['p99_ms']:.2f} / {floor['max_ms']:.2f}"


def _steadiness(run: dict[str, Any]) -> str:
    probe = run.get("steadiness")
    if probe is None:
        return "-"
    return f"{probe['p99_ms'] / probe['fastest_ms']:.1f}x ({probe['p99_ms']:.2f} ms)"


def _store_md(results: dict[str, Any]) -> list[str]:
    lines = ["", "## The durable store", ""]
    if "throughput" in results:
        s, half = results["summary"], results["durable_half_load"]
        files = s["durable_store"]
        settings = results["settings"]
        lines += [
            "The same load on a hub that keeps its state in SQLite (`agentmesh start "
            "--data-dir DIR`, a fresh directory for each run, in "
            f"`{settings.get('store_dir', '?')}` on {settings.get('store_filesystem', '?')}) "
            f"and on the memory hub (`--memory`). The durable hub peaked at "
            f"**{s['durable_peak']:.0f}** delegations/s (size {s['durable_peak_size']}), "
            f"**{s['durable_ratio']:.1%}** of the memory hub's {s['hub_peak']:.0f}/s (size "
            f"{s['hub_peak_size']}). Per CPU-second of the hub process (all its threads): "
            f"durable {s['durable_per_server_cpu_s']:.0f}/s, memory "
            f"{s['hub_per_server_cpu_s']:.0f}/s ({s['durable_ratio_per_cpu']:.1%}).",
            "",
        ]
        rows = []
        for r in results["throughput"]:
            hub, dur = r["hub"], r["hub_durable"]
            flag = " (disturbed)" if hub["disturbed"] or dur["disturbed"] else ""
            rows.append(
                [
                    r["size"],
                    f"{hub['rate']:.0f}",
                    f"**{dur['rate']:.0f}**",
                    f"{r['durable_ratio']:.1%}",
                    f"{hub['p50_ms']:.2f} / {hub['p99_ms']:.2f}",
                    f"{dur['p50_ms']:.2f} / {dur['p99_ms']:.2f}",
                    f"{hub['server_cpu_pct']:.0f} / {dur['server_cpu_pct']:.0f} "
                    f"({dur.get('server_threads_cpu_pct', 0):.0f})",
                    f"{hub['load_cpu_pct']:.0f} / {dur['load_cpu_pct']:.0f}",
                    f"{dur['store']['tasks']:,}",
                    f"{dur['store']['bytes_per_task']}",
                    f"{max(hub['other_cpu_pct'], dur['other_cpu_pct']):.0f}{flag}",
                ]
            )
        lines += _table(
            [
                "size WxRxwindow",
                "memory hub/s",
                "durable hub/s",
                "durable / memory",
                "memory p50 / p99 ms",
                "durable p50 / p99 ms",
                "hub CPU %: memory / durable (its writer thread)",
                "load CPU %",
                "tasks stored",
                "bytes per task",
                "CPU other (most)",
            ],
            rows,
        )
        lines += [
            "",
            f"At half of its peak (open loop, {half['target_rate']:.0f} delegations/s sent "
            f"with the agents of size {half['size']}; {half['rate']:.0f}/s completed): p50 "
            f"{half['p50_ms']:.2f} ms, p90 {half['p90_ms']:.2f} ms, **p99 "
            f"{half['p99_ms']:.2f} ms**, max {half['max_ms']:.2f} ms; hub CPU "
            f"{half['server_cpu_pct']:.0f}%, other {half['other_cpu_pct']:.0f}%.",
            "",
            f"On disk, at the peak size: {files['tasks']:,} tasks (typical small ones: the "
            f"load's params and result) in {_mb(files['bytes_checkpointed'])} MB after a "
            f"checkpoint, **{files['bytes_per_task']} bytes per task**, of which "
            f"{files['row_bytes_per_task']} are the task's row (its JSON).",
        ]
    if "restart" in results:
        r = results["restart"]
        build, inproc, file, empty = r["build"], r["in_process"], r["file"], r["empty_start"]
        lines += [
            "",
            f"### Restart with {r['tasks']:,} retained tasks",
            "",
            f"A store of {r['tasks']:,} finished tasks (rows made from a real router's, "
            f"written in batches with `SQLiteStore.write`: {build['build_s']} s), "
            f"{_mb(file['bytes_checkpointed'])} MB, **{file['bytes_per_task']} bytes per "
            f"task** ({file['row_bytes_per_task']} of them the row). Then `agentmesh start "
            "--data-dir` on it, timed from starting the process until it accepts a TCP "
            "connection (it listens once the store is read and restored) and until it "
            "answers a `status` request, which counted every task. The page cache is warm "
            f"(the file was just written). On an empty store the same start takes "
            f"{empty['accept_s']:.3f} s (Python, the imports, a new file) and "
            f"{empty['rss_mb']} MB.",
            "",
        ]
        lines += _table(
            ["start", "accepts after s", "hub CPU by then s", "answers status after s",
             "RSS MB", "stops in s (SIGTERM)"],
            [
                [
                    i + 1,
                    f"**{st['accept_s']:.3f}**",
                    f"{st['accept_cpu_s']:.3f}",
                    f"{st['status_s']:.3f}",
                    f"**{st['rss_mb']}**",
                    f"{st['stop_s']:.3f}",
                ]
                for i, st in enumerate(r["starts"])
            ],
        )  # fmt: skip
        lines += [
            "",
            f"In a process of their own, without the CLI: `SQLiteStore.load` "
            f"{inproc['load_s']:.3f} s ({inproc['load_cpu_s']:.3f} s CPU), `Router.restore` "
            f"{inproc['restore_s']:.3f} s ({inproc['restore_cpu_s']:.3f} s CPU); RSS "
            f"{inproc['rss_with_snapshot_mb']} MB with the snapshot, "
            f"{inproc['rss_after_mb']} MB once it is freed.",
        ]
    return lines


def _sdk_md(sdk: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## SDK to SDK",
        "",
        f"`agentmesh.Agent`s serving and `agentmesh.connect` requesters, all in one client "
        f"process, through a hub in its own (closed loop, size {sdk['size']}; "
        "`python bench/sdk.py` runs it alone, `--profile` samples the client process).",
        "",
    ]
    lines += _table(
        ["delegations/s", "p50 ms", "p99 ms", "client CPU us/delegation",
         "hub CPU us/delegation", "client CPU", "hub CPU", "other CPU"],
        [[f"{sdk['rate']:.0f}", f"{sdk['p50_ms']:.2f}", f"{sdk['p99_ms']:.2f}",
          f"{sdk['client_cpu_us']:.1f}", f"{sdk['hub_cpu_us']:.1f}",
          f"{sdk['load_cpu_pct']:.0f}%", f"{sdk['server_cpu_pct']:.0f}%",
          f"{sdk['other_cpu_pct']:.0f}%"]],
    )  # fmt: skip
    return lines


def _limits_md(row: dict[str, Any]) -> list[str]:
    limit = row["max_concurrency"]
    lines = [
        "",
        "## Concurrency limits",
        "",
        f"Size {row['size']}: each worker registers `max_concurrency` {limit}, half its share "
        "of the tasks in flight, so that half of them wait in the hub's dispatch queue and "
        "move to each slot as it frees; against the same load with no limit. The peak is "
        "the closed loop; the latency is an open loop at half of that row's own peak.",
        "",
    ]
    rows = []
    for key, label in (("unlimited", "no limit"), ("limited", f"max_concurrency {limit}")):
        peak, half = row[key]["peak"], row[key]["half"]
        rows.append(
            [
                label,
                f"{peak['rate']:,.0f}",
                f"{peak['p50_ms']:.2f}",
                f"{peak['p99_ms']:.2f}",
                f"{half['rate']:,.0f}",
                f"{half['p50_ms']:.2f}",
                f"{half['p99_ms']:.2f}",
                f"{peak['server_cpu_pct']:.0f}%",
            ]
        )
    lines += _table(
        [
            "workers",
            "peak deleg/s",
            "p50 ms",
            "p99 ms",
            "half-peak deleg/s",
            "p50 ms",
            "p99 ms",
            "hub CPU at peak",
        ],
        rows,
    )
    lines += ["", f"Peak with limits / without: **{row['peak_ratio']:.2f}**."]
    return lines


CLUSTER_PLACES = {
    "hop": {"cross": "requester on A, agent on B", "local": "both on A"},
    "cross": {"cross": "requesters on A, agents on B", "local": "all on A"},
    "scale_out": {
        "two_hubs": "2 hubs: one half on A, one on B",
        "one_hub": "1 hub (not in a cluster): both halves",
    },
}


def _cluster_ratios(c: dict[str, Any]) -> str:
    r = c["ratios"]
    return (
        f"a hop through NATS adds {r['hop_added_p50_ms']:.2f} ms at p50, "
        f"{r['hop_added_p99_ms']:.2f} ms at p99 (one at a time); cross-hub / one hub "
        f"{_x(r['cross_rate'])} throughput at {c['cross']['size']} (p99 "
        f"{c['cross']['cross']['p99_ms']:.2f} against {c['cross']['local']['p99_ms']:.2f} ms); "
        f"2 hubs / 1 hub {_x(r['scale_out_rate'])} ({c['cores']} cores, shared with the load)"
    )


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _cluster_md(c: dict[str, Any]) -> list[str]:
    lines = ["", "## Several hubs through NATS", ""]
    if "skipped" in c:
        return [*lines, f"Skipped: {c['skipped']}."]
    lines += [
        "Hubs `agentmesh start --memory --cluster nats://... --hub-name X` joined through a "
        "nats-server with JetStream (`-js -sd <tmpdir>`), every process fresh for each run, "
        "under the lean load generator (bench/cluster.py; `python bench/cluster.py` runs "
        f"it alone). Medians of {c['runs']} run(s) of each placement, the placements "
        "alternating. CPU is % of one core over the measured window, µs are CPU per "
        "delegation; *bridge* is the hub's threads besides its main one (the NATS link's "
        f"asyncio loop). This machine has **{c['cores']} cores**, shared by the hubs, "
        "nats-server and the load processes: look at the CPU columns for what was "
        "saturated, and at *other* for how much other programs took.",
        "",
        f"**Ratios**: {_cluster_ratios(c)}.",
    ]
    headers = {
        "hop": "### One delegation in flight: the hop's added latency",
        "cross": "### Cross-hub closed loop against one hub",
        "scale_out": "### 2 hubs against 1",
    }
    notes = {
        "hop": "One requester, one agent, one delegation at a time; latency "
        "from sending `delegate` to receiving `result`. Across hubs the task goes A -> "
        "NATS -> B and the result B -> NATS -> A: the difference between the rows is that "
        "way there and back.",
        "cross": "W agents on B and R requesters on A with N delegations each in flight, "
        "against the same load with every agent on A (A in the same cluster).",
        "scale_out": "Two independent halves of the size each, one capability per half: "
        "requesters and agents on A, requesters and agents on B (each hub serves its own; "
        "both in the cluster), against both halves on one hub that is not in a cluster. "
        "Two load processes in both cases; the rate is the total, and CPU µs are per "
        "delegation of that total (each hub of the two carried about half: "
        "`rates_per_load` in results.json).",
    }
    for part in ("hop", "cross", "scale_out"):
        block = c[part]
        lines += ["", headers[part], "", notes[part] + f" Size {block['size']}.", ""]
        rows = []
        for what, label in CLUSTER_PLACES[part].items():
            run = block[what]
            pct, us, bridge = run["cpu_pct"], run["cpu_us"], run["bridge_cpu_pct"]
            rows.append(
                [
                    label,
                    f"**{run['rate']:,.0f}**",
                    f"{run['p50_ms']:.2f}",
                    f"{run['p90_ms']:.2f}",
                    f"**{run['p99_ms']:.2f}**",
                    f"{_us(us.get('hub_a'))} / {_us(us.get('hub_b'))} / {_us(us.get('nats'))}",
                    f"{_pct(pct.get('hub_a'))} / {_pct(pct.get('hub_b'))} / "
                    f"{_pct(pct.get('nats'))}",
                    f"{_pct(bridge.get('hub_a'))} / {_pct(bridge.get('hub_b'))}",
                    _pct(pct.get("load")),
                    _pct(pct.get("other")),
                ]
            )
        lines += _table(
            ["placement", "delegations/s", "p50 ms", "p90 ms", "p99 ms",
             "CPU us/delegation: hub A / hub B / nats-server",
             "CPU: hub A / hub B / nats-server", "of which bridge: A / B", "load CPU",
             "other CPU"],
            rows,
        )  # fmt: skip
    logged = [
        line
        for part in ("hop", "cross", "scale_out")
        for what in CLUSTER_PLACES[part]
        for line in c[part][what].get("hub_log", [])
    ]
    if logged:
        unique = list(dict.fromkeys(logged))
        lines += ["", f"The hubs logged ({len(logged)} lines, first {min(10, len(unique))}):", ""]
        lines += [f"    {line}" for line in unique[:10]]
    return lines


def _baseline_md(b: dict[str, Any]) -> list[str]:
    lines = ["", "## Against the code of the day issue 18 was filed", ""]
    if "skipped" in b:
        return [*lines, f"Skipped: {b['skipped']}."]
    lines += [
        f"Commit {b['rev']} (the last before issue 18's speed work) taken from git and run "
        "beside this tree, alternating, on the same loads: SDK to SDK with the hub and the SDK "
        "both from one tree, and ordinary clients (the same asyncio `websockets` clients for "
        f"both) through each tree's hub. Medians of {b['rounds']} round(s); `python "
        "bench/baseline.py` runs it alone. The issue's targets are ratios to these runs, "
        "since this host's speed moves by about 2x from day to day.",
        "",
    ]
    rows = []
    for load, by_tree in b["medians"].items():
        for tree in ("baseline", "this"):
            m = by_tree[tree]
            name = b["rev"] if tree == "baseline" else "this tree"
            rows.append([load, name, f"**{m['rate']:.0f}**", f"{m['p50_ms']:.2f}",
                         f"{m['p99_ms']:.2f}", _us(m["server_cpu_us"]),
                         _us(m["client_cpu_us"]), _pct(m["other_cpu_pct"])])  # fmt: skip
        r = b["ratios"][load]
        rows.append([load, "**this / baseline**", _ratio(r, "rate"), "", "",
                     _ratio(r, "server_cpu_us"), _ratio(r, "client_cpu_us"), ""])  # fmt: skip
    lines += _table(
        ["load", "code", "delegations/s", "p50 ms", "p99 ms", "hub CPU us/delegation",
         "client CPU us/delegation", "other CPU"],
        rows,
    )  # fmt: skip
    return lines


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}%"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ratio(ratios: dict[str, float], key: str) -> str:
    return f"{ratios[key]:.2f}x" if key in ratios else "-"


def _peers_md(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "## The hub against its peers",
        "",
        "The same closed loop (W agents answering at once, R requesters keeping N in "
        "flight, all clients in one process) through the hub with three kinds of client, "
        "and through nats-server with nats-py clients (request-reply in a queue group), "
        "close together in time. *Server CPU* is the CPU time of the server process (hub "
        "or nats-server, all threads) per delegation (per request for NATS); *client CPU* "
        "that of the client process (requesters and agents together). A delegation is 5 "
        "frames through the hub, a request 4 messages through nats-server. The lean "
        "generator's client CPU is left out: it is built to cost nothing, not to be a client.",
        "",
    ]
    table = []
    for row in rows:
        for kind, label in PEERS.items():
            if kind not in row:
                continue
            run = row[kind]
            flag = " (disturbed)" if run.get("disturbed") else ""
            part = run.get("part")
            table.append(
                [
                    row["size"],
                    label + (f" [{part} part's run]" if part not in (None, "peers") else ""),
                    f"**{run['rate']:.0f}**",
                    f"{run['p50_ms']:.2f}",
                    f"{run['p99_ms']:.2f}",
                    f"**{_us(run['server_cpu_us'])}**",
                    "-" if kind == "lean" else _us(run["client_cpu_us"]),
                    f"{run['server_cpu_pct']:.0f}% / {run['load_cpu_pct']:.0f}%",
                    f"{run['other_cpu_pct']:.0f}%{flag}",
                ]
            )
    lines += _table(
        ["size WxRxN", "what", "delegations/s", "p50 ms", "p99 ms",
         "server CPU us/delegation", "client CPU us/delegation", "CPU server / clients",
         "other CPU"],
        table,
    )  # fmt: skip
    lines += [
        "",
        "Ratios against NATS request-reply at the same size: throughput (hub / NATS; above "
        "1 the hub carried more), server CPU per delegation (hub / nats-server per "
        "request; the hub's cost as a multiple of the bus's), and client CPU per "
        "delegation (the client / nats-py's per request).",
        "",
    ]
    ratio_rows = []
    for row in rows:
        ratios = row["ratios"]
        if not ratios:
            continue
        for kind in ("lean", "ordinary", "ordinary_durable", "sdk"):
            if f"{kind}_rate" in ratios:
                ratio_rows.append(
                    [
                        row["size"],
                        PEERS[kind],
                        _ratio(ratios, f"{kind}_rate"),
                        f"**{_ratio(ratios, f'{kind}_server_cpu')}**",
                        _ratio(ratios, f"{kind}_client_cpu"),
                    ]
                )
    lines += _table(
        ["size WxRxN", "against NATS request-reply", "throughput hub / NATS",
         "server CPU hub / nats-server", "client CPU / nats-py"],
        ratio_rows,
    )  # fmt: skip
    return lines


def _mb(sizes: dict[str, int]) -> str:
    return f"{(sizes['db'] + sizes['-wal']) / 2**20:.1f}"


def _load_bound(rows: list[dict[str, Any]], kind: str) -> bool:
    """Whether the load generator, not the server, ran out of CPU at `kind`'s peak."""
    peak = max(rows, key=lambda r: r[kind]["rate"])[kind]
    return bool(peak["load_cpu_pct"] > 95 and peak["server_cpu_pct"] < 95)


def _scale_md(scale: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## Scale: idle agents",
        "",
        f"Hub RSS with no agent: {scale['baseline_rss_mb']} MB. Per idle agent = (RSS - "
        f"that) / agents. Discover asks for a capability that {scale['needles']} agents "
        "offer, whatever the total; a heartbeat round trip after each is the control (what "
        "any request costs at that level). Broadcast: from sending it until the last agent got "
        "it (median of the runs; includes the load process reading every frame).",
        "",
    ]
    rows = []
    for level in scale["levels"]:
        d, h, b = level["discover"], level["heartbeat"], level["broadcast"]
        rows.append(
            [
                f"{level['agents']:,}",
                f"{level['rss_mb']:.1f}",
                f"**{level['rss_per_agent_kb']:.1f}**",
                f"{d['p50_ms']:.3f} / {d['p99_ms']:.3f}",
                f"{h['p50_ms']:.3f} / {h['p99_ms']:.3f}",
                level["discover_matches"],
                f"{b['median_ms']:.1f}",
                f"{b['ack_median_ms']:.1f}",
                f"{b['hub_cpu_median_ms']:.0f}",
                f"{level['connect_s']:.1f}",
            ]
        )
    lines += _table(
        [
            "agents",
            "hub RSS MB",
            "KB per idle agent",
            "discover p50 / p99 ms",
            "heartbeat p50 / p99 ms (control)",
            "matches",
            "broadcast to all ms",
            "broadcast ack ms",
            "hub CPU per broadcast ms",
            "connect s",
        ],
        rows,
    )
    short = [level["shortfall"] for level in scale["levels"] if "shortfall" in level]
    if short:
        lines += ["", f"Stopped early: {short[0]}."]
    return lines


def _profile_md(profile: dict[str, Any], what: str = "hub") -> list[str]:
    run = profile["run"]
    lines = [
        "",
        f"## Where the {what}'s CPU goes",
        "",
        f"py-spy, {profile['samples']} samples of the {what} on CPU (all its threads) during "
        "a closed-loop run "
        f"at size {run['size']} ({run['rate']:.0f} delegations/s while sampled; raw "
        f"stacks in `{profile['raw']}`, summary: `python bench/hotspots.py "
        f"bench/results/{profile['raw']}`).",
        "",
    ]
    lines += _table(
        ["component", "% of hub CPU"],
        [[name, f"{pct:.1f}"] for name, pct in profile["components_pct"].items()],
    )
    lines += [""]
    lines += _table(
        ["task", "% of hub CPU"],
        [[name, f"{pct:.1f}"] for name, pct in profile["tasks_pct"].items()],
    )
    lines += [""]
    lines += _table(
        ["agentmesh function (with what it calls)", "% of hub CPU"],
        [[f"`{name}`", f"{pct:.1f}"] for name, pct in profile["agentmesh_inclusive_pct"].items()],
    )
    lines += [""]
    lines += _table(
        ["function (self time)", "% of hub CPU"],
        [[f"`{name}`", f"{pct:.1f}"] for name, pct in profile["self_pct"].items()],
    )
    return lines


# ---------------------------------------------------------------------------------------
# The chart


def _chart(results: dict[str, Any], path: Path) -> bool:
    """Throughput (hub and ceiling) and latency (p50, p99) against outstanding delegations."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        print("matplotlib is not installed: no chart (pip install matplotlib)")
        return False
    rows = results["throughput"]
    load = [r["outstanding"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7.5), sharex=True)

    top.plot(load, [r["hub"]["rate"] for r in rows], "o-", color="tab:blue", label="hub")
    top.plot(
        load, [r["hub_durable"]["rate"] for r in rows], "D-", color="tab:purple",
        label="hub, durable (SQLite)",
    )  # fmt: skip
    top.plot(
        load, [r["ceiling"] for r in rows], "s--", color="tab:gray",
        label="ceiling = 2/5 x trio-websocket echo rate",
    )  # fmt: skip
    top.plot(
        load, [r["ceiling"] * RATIO_TARGET for r in rows], ":", color="tab:green",
        label=f"target: {RATIO_TARGET:.0%} of the ceiling",
    )  # fmt: skip
    disturbed = [
        r for r in rows if any(r[kind]["disturbed"] for kind in ("hub", "echo", "echo_own"))
    ]
    for r in rows:
        if r["hub_durable"]["disturbed"]:
            top.annotate("disturbed", (r["outstanding"], r["hub_durable"]["rate"]),
                         xytext=(4, -14), textcoords="offset points", fontsize="small",
                         color="tab:red")  # fmt: skip
    for r in disturbed:
        top.annotate("disturbed", (r["outstanding"], r["hub"]["rate"]), xytext=(4, -14),
                     textcoords="offset points", fontsize="small", color="tab:red")  # fmt: skip
    top.set_ylabel("delegations / s")
    top.set_ylim(bottom=0)
    top.set_title("agentmesh hub: closed loop, W workers x R requesters x window")
    top.grid(alpha=0.3)
    top.legend(loc="lower right")

    bottom.plot(load, [r["hub"]["p50_ms"] for r in rows], "o-", color="tab:blue", label="p50")
    bottom.plot(load, [r["hub"]["p99_ms"] for r in rows], "^-", color="tab:red", label="p99")
    bottom.plot(
        load, [r["hub_durable"]["p99_ms"] for r in rows], "D--", color="tab:purple",
        label="p99, durable",
    )  # fmt: skip
    bottom.axhline(P99_TARGET_MS, color="tab:green", ls=":", label=f"{P99_TARGET_MS:g} ms")
    half = results["half_load"]
    bottom.plot(
        [], [], "*", color="tab:red", ms=12,
        label=f"p99 at half of peak (open loop, {half['target_rate']:.0f}/s): "
        f"{half['p99_ms']:.2f} ms",
    )  # fmt: skip
    durable_half = results["durable_half_load"]
    bottom.plot(
        [], [], "D", color="tab:purple", ms=8,
        label=f"durable p99 at half of its peak (open loop, "
        f"{durable_half['target_rate']:.0f}/s): {durable_half['p99_ms']:.2f} ms",
    )  # fmt: skip
    bottom.set_yscale("log")
    bottom.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    bottom.set_ylabel("latency, ms (log)")
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(load, [f"{r['outstanding']}\n{r['size']}" for r in rows])
    bottom.set_xlabel("delegations outstanding (R x window), and size WxRxwindow")
    bottom.grid(alpha=0.3, which="both")
    bottom.legend(loc="upper left", fontsize="small")

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
