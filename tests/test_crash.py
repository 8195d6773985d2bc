"""Crash test: a standalone hub killed again and again under load, on one data directory.

The hub runs as a real subprocess (`python -m agentmesh start --data-dir DIR`). In this
process, SDK workers (`agentmesh.Agent`) serve a capability and SDK requesters
(`agentmesh.Client`) keep up to `IN_FLIGHT` tasks each delegated at once, until at least
`TASKS` delegations were acknowledged. Meanwhile a killer stops the hub `KILLS` times at
random moments (with SIGKILL in one test, SIGTERM in the other; with SIGKILL some new
hubs are killed again while they start) and starts a new one on the same data directory
and port each time; the SDK clients reconnect and resume on their own. After the last
outcome, the hub is stopped once more, so that the books checked are read back from disk.

Every task whose `delegate` was acknowledged must reach exactly one terminal outcome at
its requester, the one its params asked for (completed with the right data, failed,
timed out, or cancelled), and the last hub's own record must agree. A submit cut off by a
kill (`ConnectionLost`, so no acknowledgement) is counted and delegated again as a new
task. Run with `pytest -s` to see the counts. AGENTMESH_CRASH_SEED replays a seed (the
interleaving still depends on timing); AGENTMESH_CRASH_TASKS and AGENTMESH_CRASH_KILLS
make a longer run.
"""

from __future__ import annotations

import itertools
import math
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from agentmesh import (
    Agent,
    Backoff,
    Client,
    ConnectionLost,
    HubError,
    HubRestarted,
    TaskCancelled,
    TaskFailed,
    TaskFinished,
    TaskHandle,
    TaskTimeout,
    connect,
)
from agentmesh.protocol import Envelope, MessageType, TaskInfo

SEED = int(os.environ.get("AGENTMESH_CRASH_SEED", str(random.randrange(1 << 32))))
TASKS = int(os.environ.get("AGENTMESH_CRASH_TASKS", "5000"))  # acknowledged, at least
KILLS = int(os.environ.get("AGENTMESH_CRASH_KILLS", "12"))  # stops of a serving hub
MIN_TASKS, MIN_KILLS = 5000, 10  # what the issue asks for
WORKERS = 3
REQUESTERS = 4
IN_FLIGHT = 40  # per requester
# Reconnect at once when the hub is back. A connection the hub's death cuts during its
# opening handshake waits out `connect_timeout` (trio-websocket never ends that wait).
CLIENT_OPTIONS: dict[str, Any] = {"backoff": Backoff(base=0.02, cap=0.1), "connect_timeout": 2.0}
GRACE = 60.0  # resume grace: far longer than a restart
TTL = 60.0  # of an ordinary task: never reached
START_LIMIT = 20.0  # seconds a hub may take to start serving
DRAIN_LIMIT = 30.0  # seconds, after the last restart, for the last outcomes
RUN_LIMIT = 240.0  # seconds for the whole test

# What a task asks for (by share of the delegations), and the outcome it must get.
KINDS = (
    ("complete", 0.90),  # returns 2 * n after a few milliseconds
    ("fail", 0.04),  # raises
    ("timeout", 0.03),  # sleeps past its short TTL
    ("cancel", 0.03),  # sleeps; its requester cancels it
)
EXPECTED = {"complete": "completed", "fail": "failed", "timeout": "timeout", "cancel": "cancelled"}


# --- the hub, as a process ----------------------------------------------------------------


def _free_port() -> int:
    """A free loopback port outside the kernel's ephemeral range, so that no client's
    own outgoing connection can take it (or connect to itself on it) while the hub is
    down; port 0's choice if the range is unknown."""
    try:
        low, _ = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low = 0
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(10_000, low) if low > 11_000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            chosen: int = s.getsockname()[1]
            return chosen
    raise RuntimeError("no free port")


class HubProcess:
    """`agentmesh start` on one data directory and port, started again after each stop."""

    def __init__(self, data_dir: Path, port: int, nursery: trio.Nursery) -> None:
        self.data_dir = data_dir
        self.port = port
        self.url = f"ws://127.0.0.1:{port}"
        self.process: trio.Process | None = None
        self.starts = 0
        self.bind_retries = 0
        self.early_kills = 0  # SIGKILLs while a hub was still starting
        self.start_times: list[float] = []  # seconds from spawn to serving
        self.stop_times: list[float] = []  # seconds from the signal to the exit
        self.exit_codes = Counter[int]()
        self.log: deque[str] = deque(maxlen=200)  # the last lines of every hub's stderr
        self._nursery = nursery  # for the stderr readers

    def _command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "agentmesh",
            "start",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--log-level",
            "info",  # for the "serving on" line; a handful of lines per restart
            "--resume-grace",
            str(GRACE),
            "--close-timeout",
            "2",
        ]

    async def start(self, kill_after: float | None = None) -> None:
        """Start a hub and return once it serves. With `kill_after`, a hub not yet serving
        that many seconds after its spawn (still starting, or reading the store back) is
        killed first and another started. A port still held (rare: a socket of the last
        hub not yet released) is retried."""
        assert self.process is None, "the last hub still runs"
        with trio.fail_after(START_LIMIT):
            while True:
                spawned = time.monotonic()
                process = self.process = await trio.lowlevel.open_process(
                    self._command(), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
                serving, ended, lines = trio.Event(), trio.Event(), list[str]()
                self._nursery.start_soon(self._read_stderr, process, serving, ended, lines)
                with trio.move_on_after(math.inf if kill_after is None else kill_after):
                    await _first(serving, ended)
                if serving.is_set():
                    self.starts += 1
                    self.start_times.append(time.monotonic() - spawned)
                    return
                if not ended.is_set():  # killed while starting
                    kill_after = None
                    await self.stop(signal.SIGKILL)
                    self.early_kills += 1
                    continue
                code = await process.wait()
                self.process = None
                text = "\n".join(lines)
                if "cannot serve" in text and "in use" in text:
                    self.bind_retries += 1
                    await trio.sleep(0.05)  # the kernel releases the port; try again
                    continue
                raise AssertionError(f"the hub exited with {code} at start-up:\n{text}")

    async def _read_stderr(
        self, process: trio.Process, serving: trio.Event, ended: trio.Event, lines: list[str]
    ) -> None:
        assert process.stderr is not None
        pending = b""
        try:
            async with process.stderr:
                while chunk := await process.stderr.receive_some():
                    pending += chunk
                    *complete, pending = pending.split(b"\n")
                    for raw in complete:
                        line = raw.decode(errors="replace")
                        lines.append(line)
                        self.log.append(f"[hub {process.pid}] {line}")
                        if re.search(r"serving on ws://", line):
                            serving.set()
        finally:
            ended.set()

    async def stop(self, signum: int) -> int:
        """Send `signum` and wait for the hub to exit; its exit code."""
        process = self.process
        assert process is not None
        signalled = time.monotonic()
        process.send_signal(signum)
        with trio.fail_after(START_LIMIT):
            code = await process.wait()
        self.process = None
        self.stop_times.append(time.monotonic() - signalled)
        self.exit_codes[code] += 1
        return code

    async def aclose(self) -> None:
        """Stop the hub if it runs: SIGTERM, then SIGKILL if it does not exit in time."""
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.terminate()
            with trio.move_on_after(START_LIMIT):
                await process.wait()
            process.kill()  # no-op once it exited
            await process.wait()


async def _first(*events: trio.Event) -> None:
    """Wait until one of `events` is set."""
    async with trio.open_nursery() as race:
        for event in events:
            race.start_soon(_set_then_cancel, event, race.cancel_scope)


async def _set_then_cancel(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()


# --- the requesters' side -----------------------------------------------------------------


class CountingClient(Client):
    """A requester that counts the `result` frames it receives, per task ID: across a
    crash an outcome may come twice on the wire, and `TaskHandle` shows it only once."""

    def __init__(self, url: str, **options: Any) -> None:
        super().__init__(url, **options)
        self.result_frames = Counter[str]()

    def _dispatch(self, envelope: Envelope) -> None:
        if envelope.type is MessageType.RESULT and envelope.in_reply_to is None:
            self.result_frames[envelope.payload.task_id] += 1
        super()._dispatch(envelope)


@attrs.define(eq=False)
class Task:
    n: int
    kind: str
    task_id: str
    acknowledged: float  # time.monotonic() at the acknowledgement
    outcome: str | None = None  # the terminal state heard
    waited: float | None = None  # seconds from the acknowledgement to the outcome
    cancel_acked: bool = False


class Crash:
    """The experiment: the hub process, the workers and requesters, and the tallies."""

    def __init__(self, hub: HubProcess, signum: int, seed: int) -> None:
        self.hub = hub
        self.signum = signum
        self.rng = random.Random(seed)
        self.kill_rng = random.Random(seed + 1)
        self.numbers = itertools.count()
        self.tasks: dict[str, Task] = {}  # acknowledged, by task ID
        self.outcomes = Counter[str]()  # outcomes heard, per task ID
        self.states = Counter[str]()  # outcomes by state
        self.stats = Counter[str]()
        self.runs = Counter[int]()  # handler runs per delegation (by its n)
        self.refusals = Counter[str]()  # requests the hub refused, which it should not
        self.mismatches: list[str] = []  # an outcome other than the one asked for
        self.kills = 0  # stops of a serving hub
        self.enough = trio.Event()  # stop submitting
        self._progress: tuple[int, trio.Event] | None = None  # the killer's next point
        self.in_flight = 0
        self.idle = trio.Event()  # nothing in flight, once `enough`

    # --- workers ----------------------------------------------------------------------

    def worker(self, slot: int) -> Agent:
        agent = Agent(f"worker-{slot}", max_concurrency=64, shutdown_grace=0.5)

        @agent.capability("crunch")
        async def crunch(n: int, kind: str, seconds: float) -> int:
            self.runs[n] += 1
            await trio.sleep(seconds)
            if kind == "fail":
                raise ValueError(f"task {n} was asked to fail")
            return 2 * n

        return agent

    # --- requesters -------------------------------------------------------------------

    async def requester(self, client: CountingClient, tasks: trio.Nursery) -> None:
        """Keep `IN_FLIGHT` tasks of `client` going (in `tasks`) until `enough`."""
        permits = trio.Semaphore(IN_FLIGHT)
        while True:
            await permits.acquire()
            if self._enough():
                permits.release()
                return
            self.in_flight += 1
            tasks.start_soon(self._one_task, client, permits)

    def _enough(self) -> bool:
        if not self.enough.is_set() and len(self.tasks) >= TASKS and self.kills >= KILLS:
            self.enough.set()
        return self.enough.is_set()

    async def _one_task(self, client: CountingClient, permits: trio.Semaphore) -> None:
        try:
            kind = self.rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
            seconds, ttl = {
                "complete": (self.rng.uniform(0, 0.03), TTL),
                "fail": (self.rng.uniform(0, 0.03), TTL),
                "timeout": (5.0, self.rng.uniform(0.2, 1.0)),
                "cancel": (5.0, TTL),
            }[kind]
            handle, n = await self._submit(client, kind, seconds, ttl)
            task = Task(n=n, kind=kind, task_id=handle.task_id, acknowledged=time.monotonic())
            if handle.task_id in self.tasks:
                self.stats["task ID given twice"] += 1
            self.tasks[handle.task_id] = task
            if self._progress is not None and len(self.tasks) >= self._progress[0]:
                self._progress[1].set()
                self._progress = None
            if kind == "cancel":
                await trio.sleep(self.rng.uniform(0, 0.5))
                await self._cancel(handle, task)
            await self._outcome(handle, task)
        finally:
            self.in_flight -= 1
            if self.in_flight == 0 and self.enough.is_set():
                self.idle.set()
            permits.release()

    async def _submit(
        self, client: CountingClient, kind: str, seconds: float, ttl: float
    ) -> tuple[TaskHandle, int]:
        """Delegate until acknowledged: a submit the kill cut off is done again, as a
        new task (with a new `n`); the handle and the `n` acknowledged."""
        while True:
            n = next(self.numbers)
            try:
                params = {"n": n, "kind": kind, "seconds": seconds}
                return await client.submit("crunch", params, ttl=ttl), n
            except ConnectionLost:
                self.stats["unacknowledged (ConnectionLost)"] += 1
            except HubError as exc:  # not expected (no capable agent, store unavailable)
                self.refusals[f"submit refused: {type(exc).__name__}: {exc}"] += 1
                await trio.sleep(0.01)

    async def _cancel(self, handle: TaskHandle, task: Task) -> None:
        while not handle.done:
            try:
                await handle.cancel("the requester changed its mind")
                task.cancel_acked = True
                return
            except ConnectionLost:
                self.stats["cancel cut off (ConnectionLost)"] += 1
            except TaskFinished:
                self.stats["cancel too late (task finished)"] += 1
                return
            except HubError as exc:  # not expected (an unknown task: the hub forgot it)
                self.refusals[f"cancel refused: {type(exc).__name__}: {exc}"] += 1
                return

    async def _outcome(self, handle: TaskHandle, task: Task) -> None:
        try:
            data = await handle.wait()
            state = "completed"
            if data != 2 * task.n:
                self.mismatches.append(f"{task.task_id} completed with {data!r}, not {2 * task.n}")
        except TaskFailed:
            state = "failed"
        except TaskTimeout:
            state = "timeout"
        except TaskCancelled:
            state = "cancelled"
        except HubRestarted:
            state = "hub_restarted"  # the hub forgot the task: as good as lost
        self.outcomes[task.task_id] += 1
        task.waited = time.monotonic() - task.acknowledged
        self.states[state] += 1
        task.outcome = state
        expected = EXPECTED[task.kind]
        if state != expected and not (task.kind == "cancel" and not task.cancel_acked):
            self.mismatches.append(
                f"{task.task_id} ({task.kind}, cancel acked: {task.cancel_acked}) ended "
                f"{state}: {handle.outcome}"
            )

    # --- the killer -------------------------------------------------------------------

    async def killer(self) -> None:
        """Stop the hub `KILLS` times at random moments of the run, and start it again
        each time: when the acknowledged tasks pass a random count, and a random few
        milliseconds later. With SIGKILL, a fifth of the new hubs are killed again while
        they start (reading the store back, or just after)."""
        rng = self.kill_rng
        for point in sorted(rng.randrange(TASKS) for _ in range(KILLS)):
            await self._acknowledged(point)
            await trio.sleep(rng.uniform(0, 0.05))
            code = await self.hub.stop(self.signum)
            self.kills += 1
            if self.signum == signal.SIGKILL:
                assert code == -signal.SIGKILL, code
            else:
                assert code == 0, f"SIGTERM: the hub exited with {code}\n" + self._log()
            early = self.signum == signal.SIGKILL and rng.random() < 0.2
            await self.hub.start(kill_after=rng.uniform(0.1, 0.5) if early else None)

    async def _acknowledged(self, count: int) -> None:
        """Wait until `count` delegations were acknowledged."""
        if len(self.tasks) < count:
            self._progress = (count, trio.Event())
            await self._progress[1].wait()

    def _log(self) -> str:
        return "\n".join(self.hub.log)

    # --- the books ----------------------------------------------------------------------

    async def hub_records(self) -> dict[str, TaskInfo]:
        """Every task the last hub holds, through `list_tasks` (an unregistered client
        sees them all)."""
        records: dict[str, TaskInfo] = {}
        async with connect(self.hub.url, register=False, **CLIENT_OPTIONS) as looker:
            cursor: str | None = None
            while True:
                page = await looker.list_tasks_page(None, 1000, cursor=cursor)
                records.update((t.task_id, t) for t in page.tasks)
                cursor = page.next_cursor
                if cursor is None:
                    return records


async def _run(tmp_path: Path, signum: int) -> None:
    name = signal.Signals(signum).name
    began = time.monotonic()
    with trio.fail_after(RUN_LIMIT):
        async with trio.open_nursery() as readers:
            hub = HubProcess(tmp_path / "data", _free_port(), readers)
            try:
                await hub.start()
                crash = Crash(hub, signum, SEED)
                requesters = [
                    CountingClient(hub.url, name=f"requester-{i}", **CLIENT_OPTIONS)
                    for i in range(REQUESTERS)
                ]
                async with trio.open_nursery() as nursery:
                    for slot in range(WORKERS):
                        await nursery.start(_serving(crash.worker(slot), hub.url))
                    for client in requesters:
                        await nursery.start(client.serve)
                    loaded = time.monotonic()
                    async with trio.open_nursery() as load:
                        for client in requesters:
                            load.start_soon(crash.requester, client, nursery)
                        await crash.killer()
                        await crash.enough.wait()
                        load.cancel_scope.cancel()  # requesters waiting for a permit
                    submitted = time.monotonic()
                    with trio.move_on_after(DRAIN_LIMIT):
                        if crash.in_flight:
                            await crash.idle.wait()
                    drained = time.monotonic()
                    # One more stop, so that the books read back are the store's.
                    await hub.stop(signum)
                    await hub.start()
                    records = await crash.hub_records()
                    nursery.cancel_scope.cancel()  # workers and requesters, cut
                _report(crash, requesters, records, name, loaded, submitted, drained, began)
            finally:
                with trio.CancelScope(shield=True):
                    await hub.aclose()
                readers.cancel_scope.cancel()


def _serving(agent: Agent, url: str) -> Any:
    async def serve(*, task_status: trio.TaskStatus[Agent] = trio.TASK_STATUS_IGNORED) -> None:
        await agent.serve(url, task_status=task_status, **CLIENT_OPTIONS)

    return serve


def _report(
    crash: Crash,
    requesters: list[CountingClient],
    records: dict[str, TaskInfo],
    name: str,
    loaded: float,
    submitted: float,
    drained: float,
    began: float,
) -> None:
    hub = crash.hub
    acknowledged = len(crash.tasks)
    lost = [t for t in crash.tasks.values() if t.outcome in (None, "hub_restarted")]
    duplicated = [task_id for task_id, count in crash.outcomes.items() if count > 1]
    unknown_to_hub = [task_id for task_id in crash.tasks if task_id not in records]
    unfinished_at_hub = [
        task_id
        for task_id in crash.tasks
        if task_id in records and records[task_id].state in ("pending", "in_progress")
    ]
    disagree = [
        f"{task_id}: requester heard {task.outcome}, hub says {records[task_id].state}"
        for task_id, task in crash.tasks.items()
        if task_id in records and task.outcome is not None
        and records[task_id].state != task.outcome
    ]  # fmt: skip
    frames = Counter[str]()
    for client in requesters:
        frames.update(client.result_frames)
    wire_repeats = sum(count - 1 for count in frames.values() if count > 1)
    reruns = sum(count - 1 for count in crash.runs.values() if count > 1)
    report = {
        "signal": name,
        "seed": SEED,
        "acknowledged": acknowledged,
        "outcomes": dict(sorted(crash.states.items())),
        "lost": len(lost),
        "duplicated": len(duplicated),
        "mismatched": len(crash.mismatches),
        "refused": sum(crash.refusals.values()),
        "kills": crash.kills,
        "kills while starting": hub.early_kills,
        "hub starts": hub.starts,
        "exit codes": dict(hub.exit_codes),
        "bind retries": hub.bind_retries,
        "start seconds (mean/max)": _mean_max(hub.start_times),
        "stop seconds (mean/max)": _mean_max(hub.stop_times),
        **dict(sorted(crash.stats.items())),
        "outcome frames repeated on the wire": wire_repeats,
        "handler runs repeated": reruns,
        "longest wait for an outcome": _longest(crash.tasks.values()),
        "tasks at the last hub": len(records),
        "of them never acknowledged": len(set(records) - set(crash.tasks)),
        "seconds (load/drain/total)": (
            f"{submitted - loaded:.1f}/{drained - submitted:.1f}/{time.monotonic() - began:.1f}"
        ),
    }
    print(f"\ncrash test, {name}: " + ", ".join(f"{k}: {v}" for k, v in report.items()))
    problems = []
    if lost:
        problems.append(
            "lost: "
            + "; ".join(
                f"{t.task_id} ({t.kind}, heard {t.outcome}, hub: {records.get(t.task_id)})"
                for t in lost[:10]
            )
        )
    if duplicated:
        problems.append(f"duplicated: {duplicated[:10]}")
    if crash.mismatches:
        problems.append(f"mismatched: {crash.mismatches[:10]}")
    if unknown_to_hub:
        problems.append(f"acknowledged but unknown to the last hub: {unknown_to_hub[:10]}")
    if unfinished_at_hub:
        problems.append(f"unfinished at the last hub: {unfinished_at_hub[:10]}")
    if disagree:
        problems.append(f"hub and requester disagree: {disagree[:10]}")
    if crash.refusals:
        problems.append(f"refused: {dict(crash.refusals.most_common(10))}")
    if set(hub.exit_codes) != {0 if crash.signum == signal.SIGTERM else -signal.SIGKILL}:
        problems.append(f"exit codes: {dict(hub.exit_codes)}")
    if crash.stats["task ID given twice"]:
        problems.append("a task ID was given to two delegations")
    detail = "\n".join(problems) + f"\n{report}\nhub log (last lines):\n{crash._log()}"
    assert not problems, detail
    assert acknowledged >= min(TASKS, MIN_TASKS), detail
    assert crash.kills >= min(KILLS, MIN_KILLS), detail


def _longest(tasks: Iterable[Task]) -> str:
    """The task that waited longest for its outcome, after the acknowledgement."""
    heard = [t for t in tasks if t.waited is not None]
    if not heard:
        return "-"
    task = max(heard, key=lambda t: t.waited or 0)
    return f"{task.waited:.2f}s ({task.kind}, {task.outcome})"


def _mean_max(times: list[float]) -> str:
    return f"{sum(times) / len(times):.2f}/{max(times):.2f}" if times else "-"


@pytest.mark.timeout(RUN_LIMIT + 30)
@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
async def test_every_acknowledged_task_ends_exactly_once_across_restarts(
    tmp_path: Path, signum: int
) -> None:
    await _run(tmp_path, signum)
