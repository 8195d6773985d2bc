"""The durable store: what a restart costs, and what the file costs per task.

The throughput part of the benchmark (run.py) runs a durable hub (`--data-dir`) beside
the memory hub (`--memory`) at every size; this module gives it the durable hub's data
directory and measures the file afterwards (`durable_hub`). The restart part
(`measure_restart`):

1. builds a store of `--store-tasks` (1,000,000) finished tasks without a network: a
   real `Router` with a `Journal` routes a few delegations between fake peers in this
   process, and its `take_changes` rows are the template that the other rows are made
   from (the same fields, sizes and encoding; a new task ID, parameters and times for
   each), written with `SQLiteStore.write` in large batches;
2. starts `python -m agentmesh start --data-dir DIR` on it (retention bounds raised so
   that every task stays) and times it until it accepts a TCP connection, then until it
   answers a `status` request (which counts the tasks it holds), and reads its RSS;
3. times `SQLiteStore.load` and `Router.restore` in a fresh process of their own
   (``python bench/store.py restore DIR``), without the CLI around them;
4. measures the file: bytes per task after a checkpoint.

    python bench/store.py build DIR --tasks 1000000   # a store, for experiments
    python bench/store.py restore DIR                 # step 3 alone, as JSON
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from time import perf_counter, process_time
from typing import Any

import orjson
import trio
from agentmesh._journal import Journal
from agentmesh.config import HubConfig
from agentmesh.lifecycle import _AT  # the row's field positions, to vary a template row
from agentmesh.routing import Router
from agentmesh.sqlite_store import SQLiteStore
from agentmesh.store import Changes, TaskRow

from procs import BENCH, Server, cpu_seconds, free_port, rss_bytes
from wire import Connection

CAPABILITY = "bench-echo"  # as load.py's workers offer
DB_NAME = "agentmesh.db"  # what SQLiteStore.in_dir names the file
BATCH = 50_000  # rows per write while building
BYTES_PER_TASK_ROOM = 2048  # --max-retained-bytes per retained task: more than enough
START_TIMEOUT = 180.0


# ---------------------------------------------------------------------------------------
# The durable hub of the throughput runs


def filesystem(path: Path) -> str:
    """The type of the file system `path` is on (ext4, tmpfs...), from /proc/mounts."""
    path = path.resolve()
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, fstype, *_ = line.split()
            if (path == Path(mount) or Path(mount) in path.parents) and len(mount) > len(best):
                best, kind = mount, fstype
    return kind


@contextlib.contextmanager
def durable_hub(parent: Path | None) -> Iterator[tuple[Server, dict[str, Any]]]:
    """A durable hub in a fresh data directory under `parent` (the system's temporary
    folder if None), and a dict that holds, once the hub has stopped, what its file
    measured (see `file_stats`)."""
    stats: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="agentmesh-bench-", dir=parent) as data_dir:
        server = Server.hub(Path(data_dir), kind="hub_durable")
        try:
            yield server, stats
        finally:
            server.stop()
        stats.update(file_stats(Path(data_dir) / DB_NAME))


def file_stats(db: Path) -> dict[str, Any]:
    """The store's size as the hub left it, and after a checkpoint (the WAL folded into
    the database file and truncated), per task it holds."""

    def sizes() -> dict[str, int]:
        return {
            suffix or "db": (db.with_name(db.name + suffix).stat().st_size)
            if db.with_name(db.name + suffix).exists()
            else 0
            for suffix in ("", "-wal", "-shm")
        }

    left = sizes()
    con = sqlite3.connect(db)
    try:
        tasks, finished = con.execute("SELECT count(*), count(finished) FROM tasks").fetchone()
        agents = con.execute("SELECT count(*) FROM agents").fetchone()[0]
        row_bytes = con.execute(
            "SELECT coalesce(avg(length(row) + coalesce(length(params), 0)), 0) FROM tasks"
        ).fetchone()[0]
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        checkpointed = sizes()
        page_size = con.execute("PRAGMA page_size").fetchone()[0]
        free_pages = con.execute("PRAGMA freelist_count").fetchone()[0]
    finally:
        con.close()
    total = checkpointed["db"] + checkpointed["-wal"]
    return {
        "tasks": tasks,
        "finished": finished,
        "agents": agents,
        "bytes_as_left": left,
        "bytes_checkpointed": checkpointed,
        "free_bytes": free_pages * page_size,
        "bytes_per_task": round(total / tasks, 1) if tasks else None,
        "row_bytes_per_task": round(row_bytes, 1),
    }


# ---------------------------------------------------------------------------------------
# Building a store without a network


class _Peer:
    """A connection in this process: it keeps the frames the router sends it."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []

    def send(
        self,
        frame: str,
        *,
        outcome_of: str | None = None,
        droppable: bool = False,
        durable: bool = False,
    ) -> None:
        self.frames.append(orjson.loads(frame))

    def close(self, code: int, reason: str) -> None:
        pass

    def has_room(self) -> bool:
        return True

    def take(self) -> list[dict[str, Any]]:
        frames, self.frames = self.frames, []
        return frames


def _text(frame: dict[str, Any]) -> str:
    return orjson.dumps(frame).decode()


def _register(router: Router, name: str, capabilities: list[str]) -> _Peer:
    peer = _Peer()
    router.connected(peer)
    payload = {"name": name, "capabilities": capabilities}
    router.receive(peer, _text({"type": "register", "id": "reg", "payload": payload}))
    (reply,) = peer.take()
    if reply["type"] != "register":
        raise RuntimeError(f"register refused: {reply}")
    return peer


def template(workers: int = 16, requesters: int = 16, rounds: int = 4) -> Changes:
    """The rows of a real router after `rounds` delegations per requester, each done by
    a worker at once (a successful result with the params as data, as load.py's
    workers answer) and its outcome delivered: finished tasks owed to nobody, and the
    agents."""
    router = Router(HubConfig(heartbeat_interval=600), journal=Journal())
    worker_peers = [_register(router, f"worker-{i}", [CAPABILITY]) for i in range(workers)]
    requester_peers = [_register(router, f"requester-{i}", []) for i in range(requesters)]
    n = 0
    for _ in range(rounds):
        for peer in requester_peers:
            n += 1
            payload = {"capability": CAPABILITY, "params": {"n": n}}
            router.receive(peer, _text({"type": "delegate", "id": f"r{n}", "payload": payload}))
    for peer in worker_peers:
        for frame in peer.take():
            task = frame["payload"]
            result = {"task_id": task["task_id"], "success": True, "data": task["params"]}
            router.receive(
                peer, _text({"type": "result", "id": task["task_id"], "payload": result})
            )
    for peer in requester_peers:
        outcomes = [f["payload"]["task_id"] for f in peer.take() if f["type"] == "result"]
        router.delivered(outcomes)
    changes = router.take_changes()
    done = [row for row in changes.tasks if row.finished is not None and not row.owed]
    if len(done) != n:
        raise RuntimeError(f"template: {len(done)} of {n} tasks finished and delivered")
    return changes


def build(
    data_dir: Path,
    tasks: int,
    *,
    span: float = 60.0,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """A store in `data_dir` holding `tasks` finished tasks (finished over the last
    `span` seconds, so that the 300 s retention keeps them), made from `template` rows.
    Returns how long it took."""
    began = perf_counter()
    changes = template()
    models = [(row, orjson.loads(row.row)) for row in changes.tasks]
    store = SQLiteStore.in_dir(data_dir)
    store.load()  # creates the file, takes the lock
    try:
        store.write(Changes(agents=changes.agents, counters=changes.counters))
        now = time.time()
        start = now - span
        step = span / tasks
        at_id, at_data = _AT["task_id"], _AT["data"]
        at_created, at_updated = _AT["created_at"], _AT["updated_at"]
        counters = dict(changes.counters)
        getrandbits = random.getrandbits
        written = 0
        while written < tasks:
            batch: list[TaskRow] = []
            for seq in range(written, min(written + BATCH, tasks)):
                model, fields = models[seq % len(models)]
                fields = fields.copy()
                task_id = f"task_{getrandbits(64):016x}"
                finished = start + seq * step
                fields[at_id] = task_id
                fields[at_data] = {"n": seq + 1}
                fields[at_created] = finished - 0.0005
                fields[at_updated] = finished
                batch.append(
                    model._replace(
                        seq=seq, task_id=task_id, row=orjson.dumps(fields), finished=finished
                    )
                )
            written += len(batch)
            counters["delegated"] = counters["completed"] = written
            counters["frames_in"] = counters["frames_out"] = 3 * written
            store.write(Changes(tasks=batch, counters=counters))
            if written % (10 * BATCH) == 0:
                progress(f"    {written:,} tasks written")
    finally:
        store.close()
    return {"tasks": tasks, "build_s": round(perf_counter() - began, 2)}


# ---------------------------------------------------------------------------------------
# Restarting on it


def hub_options(tasks: int) -> list[str]:
    """`agentmesh start` flags that let a hub keep `tasks` finished tasks."""
    room = max(tasks, 1)
    return [
        "--max-retained-tasks",
        str(room),
        "--max-retained-bytes",
        str(room * BYTES_PER_TASK_ROOM),
    ]


async def _status(url: str) -> dict[str, Any]:
    conn = await Connection.open(url)
    try:
        await conn.send(json.dumps({"type": "status", "id": "s", "payload": {}}))
        texts: list[str] = []
        while not texts:
            texts = await conn.receive()
    finally:
        await conn.aclose()
    reply: dict[str, Any] = orjson.loads(texts[0])
    if reply["type"] != "status":
        raise RuntimeError(f"status refused: {reply}")
    return reply["payload"]  # type: ignore[no-any-return]


def time_start(data_dir: Path, tasks: int) -> dict[str, Any]:
    """Start a hub on `data_dir`: seconds until it accepts a connection, until it
    answers `status`, its RSS then, and seconds it takes to stop (SIGTERM)."""
    port = free_port()
    argv = [sys.executable, "-m", "agentmesh", "start", "--port", str(port)]
    argv += ["--data-dir", str(data_dir), "--log-level", "warning"]
    argv += ["--heartbeat-interval", "600", *hub_options(tasks)]
    with tempfile.TemporaryFile(mode="w+") as log:
        began = perf_counter()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the hub exited at start:\n{log.read()[-4000:]}")
                if perf_counter() - began > START_TIMEOUT:
                    raise RuntimeError(f"the hub did not listen within {START_TIMEOUT:g} s")
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    time.sleep(0.005)
            accepted = perf_counter() - began
            accepted_cpu = cpu_seconds(proc.pid)
            summary = trio.run(_status, f"ws://127.0.0.1:{port}")
            answered = perf_counter() - began
            rss = rss_bytes(proc.pid)
            stopping = perf_counter()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
            stopped = perf_counter() - stopping
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    held = sum(summary["tasks"].values())
    if held != tasks:
        raise RuntimeError(f"the restarted hub holds {held} tasks, not {tasks}")
    return {
        "accept_s": round(accepted, 3),
        "accept_cpu_s": round(accepted_cpu, 3),
        "status_s": round(answered, 3),
        "rss_mb": round(rss / 2**20, 1),
        "stop_s": round(stopped, 3),
        "tasks": held,
        "exit_code": proc.returncode,
    }


def restore_in_process(data_dir: Path, tasks: int) -> dict[str, Any]:
    """`SQLiteStore.load` and `Router.restore` timed in a fresh process (see `_restore`)."""
    argv = [sys.executable, str(BENCH / "store.py"), "restore", str(data_dir)]
    argv += ["--tasks", str(tasks)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT)
    if done.returncode:
        raise RuntimeError(f"restore failed:\n{done.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _restore(data_dir: Path, tasks: int) -> dict[str, Any]:
    """The child side of `restore_in_process`."""
    config = HubConfig(max_retained_tasks=max(tasks, 1), max_retained_bytes=max(tasks, 1) << 11)
    rss0 = rss_bytes_self()
    began, began_cpu = perf_counter(), process_time()
    store = SQLiteStore.in_dir(data_dir)
    snapshot = store.load()
    loaded, loaded_cpu = perf_counter(), process_time()
    router = Router(config, journal=Journal())
    router.restore(snapshot)
    restored, restored_cpu = perf_counter(), process_time()
    rss_with_snapshot = rss_bytes_self()
    del snapshot
    gc.collect()
    store.close()
    held = len(router.tasks)
    return {
        "load_s": round(loaded - began, 3),
        "restore_s": round(restored - loaded, 3),
        "total_s": round(restored - began, 3),
        "load_cpu_s": round(loaded_cpu - began_cpu, 3),
        "restore_cpu_s": round(restored_cpu - loaded_cpu, 3),
        "tasks": held,
        "rss_before_mb": round(rss0 / 2**20, 1),
        "rss_with_snapshot_mb": round(rss_with_snapshot / 2**20, 1),
        "rss_after_mb": round(rss_bytes_self() / 2**20, 1),
    }


def rss_bytes_self() -> int:
    return rss_bytes(os.getpid())


def measure_restart(
    tasks: int,
    *,
    restarts: int,
    parent: Path | None,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    """Steps 1 to 4 of the module's docstring, plus a start on an empty store (what
    Python, the imports and a fresh file cost without tasks)."""
    result: dict[str, Any] = {"tasks": tasks}
    with tempfile.TemporaryDirectory(prefix="agentmesh-bench-", dir=parent) as root:
        empty = Path(root) / "empty"
        result["empty_start"] = time_start(empty, 0)
        data_dir = Path(root) / "full"
        progress(f"  building a store of {tasks:,} finished tasks")
        result["build"] = build(data_dir, tasks, progress=progress)
        progress(f"    took {result['build']['build_s']} s")
        result["file"] = file_stats(data_dir / DB_NAME)
        progress(
            f"    {result['file']['bytes_per_task']} bytes per task "
            f"({result['file']['row_bytes_per_task']} of them the row)"
        )
        result["starts"] = []
        for _ in range(restarts):
            start = time_start(data_dir, tasks)
            result["starts"].append(start)
            progress(
                f"  hub start: accepts after {start['accept_s']:.3f} s, answers status "
                f"after {start['status_s']:.3f} s, RSS {start['rss_mb']} MB, stops in "
                f"{start['stop_s']:.3f} s"
            )
        result["in_process"] = restore_in_process(data_dir, tasks)
        inproc = result["in_process"]
        progress(
            f"  in process: SQLiteStore.load {inproc['load_s']:.3f} s + Router.restore "
            f"{inproc['restore_s']:.3f} s; RSS {inproc['rss_after_mb']} MB after"
        )
    accepts = sorted(s["accept_s"] for s in result["starts"])
    result["accept_median_s"] = accepts[len(accepts) // 2]
    result["rss_median_mb"] = sorted(s["rss_mb"] for s in result["starts"])[len(accepts) // 2]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("what", choices=["build", "restore", "start"])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    if args.what == "build":
        result = build(args.data_dir, args.tasks, progress=print)
        result["file"] = file_stats(args.data_dir / DB_NAME)
    elif args.what == "restore":
        result = _restore(args.data_dir, args.tasks)
    else:
        result = time_start(args.data_dir, args.tasks)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
