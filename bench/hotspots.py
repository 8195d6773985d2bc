"""Where the hub spends its CPU: py-spy's raw stacks summed into components.

`run.py --profile` samples the hub with ``py-spy record --format raw`` during one extra
closed-loop run at the peak size (py-spy counts only samples in which the hub was on
CPU). Each sample is charged to one component:

- decode: anything under `protocol.decode_from_client` (orjson parsing, cattrs structuring,
  the strict checks);
- store (a durable hub): anything under the commit loop (`_commits.py`: the journal's
  changes turned into rows by `Router.take_changes`, the hand-off to a worker thread) or
  `sqlite_store.py` (the worker thread's `SQLiteStore.write`: SQLite itself, which py-spy
  shows as that function's own time);
- encode: anything under `protocol.encode` or `protocol.encode_fields` (cattrs
  unstructuring, orjson);
- otherwise the innermost frame that belongs to a known package decides: websocket
  (framing: _frames.py and _websocket.py, and wsproto for handshakes), routing
  (routing.py, registry.py, lifecycle.py: the hub's decisions), hub (hub.py: the read
  loop), trio sockets (the send and receive system calls), trio scheduler (running
  tasks, epoll), or other.

    python bench/hotspots.py bench/results/profile.txt [TOP]  # summarise a raw file
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*)(?::\d+)?\)$")
_PACKAGES = (
    ("wsproto/", "websocket"),
    ("agentmesh/_frames.py", "websocket"),
    ("agentmesh/_websocket.py", "websocket"),
    ("agentmesh/routing.py", "routing"),
    ("agentmesh/registry.py", "routing"),
    ("agentmesh/lifecycle.py", "routing"),
    ("agentmesh/hub.py", "hub"),
    ("trio/_socket.py", "trio sockets"),
    ("trio/_highlevel_socket.py", "trio sockets"),
    ("trio/", "trio scheduler"),
)
# A trio worker thread waiting for its next job, in a timed lock acquire: py-spy counts
# it as on CPU, but it is not (its CPU time in /proc says so). Left out.
_IDLE_WORKER = ("WorkerThread._work", "trio/_core/_thread_cache.py")
_STORE_FILES = ("agentmesh/_commits.py", "agentmesh/sqlite_store.py", "agentmesh/_journal.py")
# The trio tasks a hub runs per connection; a sample in none of them is the scheduler's.
_TASKS = {
    "Hub._read_loop": "read loop (hub.py: receive, then the router)",
    "ServerWebSocket.write_loop": "write loop (_websocket.py: the outbox in one write)",
    "Commits.run": "commit loop (_commits.py: take_changes, to_thread)",
    "WorkerThread._handle_job": "worker thread (SQLiteStore.write, trio's thread hand-off)",
}
COMPONENTS = (
    "decode",
    "store",
    "encode",
    "routing",
    "hub",
    "websocket",
    "trio sockets",
    "trio scheduler",
    "other",
)


def _parse(frame: str) -> tuple[str, str]:
    match = _FRAME.match(frame)
    return (match["func"], match["file"]) if match else (frame, "")


def component(stack: list[tuple[str, str]]) -> str:
    """The component a sample (stack from root to leaf) is charged to."""
    for func, file in stack:
        if file == "agentmesh/protocol.py" and func == "decode_from_client":
            return "decode"
        if file == "agentmesh/protocol.py" and func in ("encode", "encode_fields"):
            return "encode"
        if file in _STORE_FILES or func == "Router.take_changes":
            return "store"
    for _, file in reversed(stack):
        for prefix, name in _PACKAGES:
            if file.startswith(prefix):
                return name
    return "other"


def _in_hub(file: str) -> bool:
    """An agentmesh module below the entry point (which is on every stack)."""
    return file.startswith("agentmesh/") and file not in (
        "agentmesh/cli.py",
        "agentmesh/__main__.py",
    )


def task(stack: list[tuple[str, str]]) -> str:
    """The hub task a sample was taken in."""
    for func, _ in stack:
        if func in _TASKS:
            return _TASKS[func]
    return "scheduler and other tasks"


def summarise(raw: Path, top: int = 12) -> dict[str, Any]:
    """Shares (% of the hub's on-CPU samples) by component, by task, by function (self
    time), and of the agentmesh functions including what they call."""
    components: Counter[str] = Counter()
    tasks: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = idle = 0
    for line in raw.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text:
            continue
        count = int(count_text)
        stack = [_parse(f) for f in stack_text.split(";")]
        if stack[-1] == _IDLE_WORKER:
            idle += count
            continue
        total += count
        components[component(stack)] += count
        tasks[task(stack)] += count
        func, file = stack[-1]
        own[f"{func} ({file})"] += count
        for name in {f"{f} ({file})" for f, file in stack if _in_hub(file)}:
            inclusive[name] += count

    def shares(counter: Counter[str], n: int | None = None) -> dict[str, float]:
        return {k: round(v / total * 100, 1) for k, v in counter.most_common(n)}

    return {
        "samples": total,
        "idle_worker_samples_left_out": idle,
        "components_pct": {c: round(components[c] / total * 100, 1) for c in COMPONENTS},
        "tasks_pct": shares(tasks),
        "self_pct": shares(own, top),
        "agentmesh_inclusive_pct": shares(inclusive, top),
    }


def _print(summary: dict[str, Any]) -> None:
    print(f"{summary['samples']} samples of the hub on CPU")
    for title, key in (
        ("by component", "components_pct"),
        ("by task", "tasks_pct"),
        ("by function (self)", "self_pct"),
        ("agentmesh functions (inclusive)", "agentmesh_inclusive_pct"),
    ):
        print(f"\n{title}:")
        for name, pct in summary[key].items():
            print(f"  {pct:5.1f}%  {name}")


if __name__ == "__main__":
    _print(summarise(Path(sys.argv[1]), top=int(sys.argv[2]) if len(sys.argv) > 2 else 12))
