"""The SQLite store on its own, on real files: a round trip of a real router's rows, the
lock, schema versions and migrations, bad files and bad disks (issue 13).

The rows come from a real `Router` with a `Journal`, driven by a fake peer as in
tests/test_routing.py: they are the rows a hub writes, batch after batch."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import orjson
import pytest
import trio

from agentmesh._journal import Journal
from agentmesh.config import HubConfig
from agentmesh.lifecycle import _ROW_FIELDS
from agentmesh.routing import Router
from agentmesh.sqlite_store import APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION, SQLiteStore
from agentmesh.store import AgentRow, Changes, MemoryStore, Snapshot, StoreError, TaskRow

from . import test_routing
from .conftest import WAIT

WALL0 = 1_700_000_000.0
TRACE = {
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "rojo=00f067aa0ba902b7",
}
TRACED = ("in_flight", "owed", "pending")  # the tasks of `busy` with trace context


class FakePeer(test_routing.FakePeer):
    """One connection: the frames the router sends it, decoded."""

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        """Frames of `type_` that are not replies."""
        return [f for f in self.frames if f["type"] == type_ and "in_reply_to" not in f]


class Mesh:
    """A router with a journal on a manual clock; its wall clock reads `wall0 + now`."""

    def __init__(self, *, now: float = 0.0, wall0: float = WALL0, **config: Any) -> None:
        self.now = now
        self.router = Router(
            HubConfig(**config),
            clock=lambda: self.now,
            wall=lambda: wall0 + self.now,
            journal=Journal(),
        )
        self._ids = itertools.count(1)

    def at(self, now: float) -> None:
        self.now = now
        self.router.fire_timers()

    def send(self, peer: FakePeer, type_: str, payload: Any = None, **envelope: Any) -> str:
        msg_id = f"c{next(self._ids)}"
        frame = {"type": type_, "id": msg_id, "payload": payload or {}, **envelope}
        self.router.receive(peer, orjson.dumps(frame).decode())
        return msg_id

    def request(self, peer: FakePeer, type_: str, payload: Any = None, **envelope: Any) -> Any:
        msg_id = self.send(peer, type_, payload, **envelope)
        (reply,) = [f for f in peer.frames if f.get("in_reply_to") == msg_id]
        assert reply["type"] == type_, reply
        return reply["payload"]

    def register(self, name: str, *capabilities: str, **extra: Any) -> FakePeer:
        peer = FakePeer()
        self.router.connected(peer)
        reply = self.request(
            peer, "register", {"name": name, "capabilities": list(capabilities), **extra}
        )
        peer.agent_id, peer.token = reply["agent_id"], reply["resume_token"]
        return peer

    def delegate(
        self,
        requester: FakePeer,
        ttl: float,
        n: int,
        trace: dict[str, str] | None = None,
        **envelope: Any,
    ) -> str:
        payload = {"capability": "work", "params": {"n": n, "text": "é" * n}, "ttl": ttl}
        payload.update(trace or {})
        task_id: str = self.request(requester, "delegate", payload, **envelope)["task_id"]
        return task_id

    def answer(self, worker: FakePeer, task_id: str, *, success: bool = True) -> None:
        self.send(worker, "result", {"task_id": task_id, "success": success, "data": [task_id]})


@attrs.frozen
class Busy:
    """A router that went through a little of everything, and its batches."""

    mesh: Mesh
    batches: list[Changes]
    tasks: dict[str, str]  # what happened to it -> task ID
    worker: FakePeer
    requester: FakePeer


def busy() -> Busy:
    """Agents that stay, one that deregisters, one offline; tasks in flight, pending,
    finished in every way (delivered, or owed: queued and never written), one dropped by
    retention. The changes are taken after each step, as the hub commits them."""
    mesh = Mesh(resume_grace=10.0, retention=10.0)
    batches: list[Changes] = []

    def commit() -> None:
        batches.append(mesh.router.take_changes())

    router = mesh.router
    worker = mesh.register("worker", "work", description="does work", metadata={"k": [1]})
    requester = mesh.register("requester")
    leaver = mesh.register("leaver")
    away = mesh.register("away", "work")
    commit()
    tasks = {
        what: mesh.delegate(
            requester, ttl, n, TRACE if what in TRACED else None, to=worker.agent_id
        )
        for n, (what, ttl) in enumerate(
            [
                ("in_flight", 100.0),
                ("old", 50.0),
                ("completed", 50.0),
                ("owed", 50.0),
                ("failed", 50.0),
                ("cancelled", 50.0),
                ("timeout", 3.0),
            ]
        )
    }
    commit()
    mesh.at(1.0)
    mesh.answer(worker, tasks["old"])
    router.delivered([tasks["old"]])  # its outcome was written whole
    commit()
    mesh.at(3.5)  # the "timeout" task's TTL ran out
    mesh.at(4.0)
    router.disconnected(away)  # offline, may resume until 14
    tasks["pending"] = mesh.delegate(requester, 100.0, 9, TRACE, to=away.agent_id)
    mesh.answer(worker, tasks["completed"])
    mesh.answer(worker, tasks["owed"])  # queued, never written: still owed
    mesh.answer(worker, tasks["failed"], success=False)
    mesh.request(requester, "cancel", {"task_id": tasks["cancelled"], "reason": "no"})
    router.delivered([tasks[w] for w in ("completed", "failed", "cancelled", "timeout")])
    mesh.request(leaver, "deregister")
    commit()
    mesh.at(12.0)
    assert router.cleanup() == 1  # "old" finished before 2
    commit()
    assert tasks["old"] not in router.tasks
    return Busy(mesh, batches, tasks, worker, requester)


def contents(router: Router, now: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """The registry and the task table, with monotonic times as time left."""
    agents = {a.agent_id: (a.to_row(), a.in_flight) for a in router.registry}
    tasks = {}
    for record in router.tasks:
        fields = attrs.asdict(record, recurse=False)
        fields["state"] = record.state.value
        del fields["finished_at"]  # monotonic: not kept, only its order
        fields["deadline"] = round(record.deadline - now, 6) if not record.terminal else None
        tasks[record.task_id] = fields
    return agents, tasks


def write_all(store: SQLiteStore, batches: list[Changes]) -> None:
    for changes in batches:
        store.write(changes)


def load(path: Path) -> Snapshot:
    """What the file at `path` holds (the store closed again)."""
    store = SQLiteStore(path)
    try:
        return store.load()
    finally:
        store.close()


def one_line(exc: pytest.ExceptionInfo[StoreError]) -> str:
    message = str(exc.value)
    assert message, "no message"
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------------------------------
# A round trip


def test_a_router_restored_from_the_file_has_what_the_first_one_had(tmp_path: Path) -> None:
    was = busy()
    first = SQLiteStore(tmp_path / "agentmesh.db")
    assert first.load() == Snapshot()
    write_all(first, was.batches)
    first.close()

    snapshot = load(tmp_path / "agentmesh.db")
    # Another monotonic clock, the same wall clock: a new process, at the same instant.
    mesh = Mesh(now=1000.0, wall0=WALL0 + 12.0 - 1000.0, resume_grace=10.0, retention=10.0)
    mesh.router.restore(snapshot)

    old_agents, old_tasks = contents(was.mesh.router, was.mesh.now)
    agents, tasks = contents(mesh.router, mesh.now)
    assert len(agents) == 3  # "leaver" is gone
    assert len(tasks) == 7  # "old" is gone
    assert agents == old_agents
    assert all(not a.online for a in mesh.router.registry)
    # Queued and never written: stored as owed, so that it is sent again.
    assert old_tasks[was.tasks["owed"]]["notified"] is True
    old_tasks[was.tasks["owed"]]["notified"] = False
    assert tasks == old_tasks
    assert {t: r["state"] for t, r in tasks.items()} == {
        was.tasks[w]: s
        for w, s in [
            ("in_flight", "in_progress"),
            ("completed", "completed"),
            ("owed", "completed"),
            ("failed", "failed"),
            ("cancelled", "cancelled"),
            ("timeout", "timeout"),
            ("pending", "pending"),
        ]
    }
    assert mesh.router.tasks.counts() == was.mesh.router.tasks.counts()
    assert mesh.router.summary().counters == was.mesh.router.summary().counters
    assert mesh.router.summary().counters["delegated"] == 8
    assert [r.task_id for r in mesh.router.tasks.owed(was.requester.agent_id)] == [
        was.tasks["owed"]
    ]

    # The identities resume with their tokens, and get what they are owed, once.
    requester = mesh.register(
        "requester",
        resume={"agent_id": was.requester.agent_id, "token": was.requester.token},
    )
    assert requester.agent_id == was.requester.agent_id
    assert [f["payload"]["task_id"] for f in requester.of_type("result")] == [was.tasks["owed"]]
    worker = mesh.register(
        "worker", "work", resume={"agent_id": was.worker.agent_id, "token": was.worker.token}
    )
    assert [f["payload"]["task_id"] for f in worker.of_type("delegate")] == [was.tasks["in_flight"]]
    assert worker.of_type("delegate")[0]["payload"]["ttl"] == pytest.approx(88.0)
    # The trace context is kept with a task, unfinished or finished.
    assert {k: worker.of_type("delegate")[0]["payload"][k] for k in TRACE} == TRACE
    assert {k: requester.of_type("result")[0]["payload"][k] for k in TRACE} == TRACE
    traced = {t for t, r in tasks.items() if r["traceparent"] is not None}
    assert traced == {was.tasks[w] for w in TRACED}


def test_a_memory_store_keeps_nothing() -> None:
    # What the round trip proves is a property of the SQLite store, not of the router.
    was = busy()
    store = MemoryStore()
    for changes in was.batches:
        store.write(changes)
    mesh = Mesh()
    mesh.router.restore(store.load())
    assert contents(mesh.router, 0.0) == ({}, {})


# ---------------------------------------------------------------------------------------
# One hub per file


def test_a_second_store_on_the_same_file_is_refused_until_the_first_closes(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agentmesh.db"
    first = SQLiteStore(path)
    first.load()
    second = SQLiteStore(path)
    with pytest.raises(StoreError) as refused:
        second.load()
    message = one_line(refused)
    assert message.startswith(f"another hub (pid {os.getpid()}) is using {path}"), message
    with pytest.raises(StoreError, match="another hub"):  # refused again, not "already open"
        second.load()
    assert (tmp_path / "agentmesh.db.lock").read_text() == f"{os.getpid()}\n"
    first.write(Changes(counters={"delegated": 7}))
    first.close()
    assert second.load().counters == {"delegated": 7}
    second.close()


async def test_a_second_hub_on_the_same_data_dir_exits_with_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "agentmesh", "start", "--data-dir", str(data_dir), "--port", "0"],
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stderr is not None
        await _read_until(process.stderr, b"serving on ws://")
        second = await _cli("start", "--data-dir", str(data_dir), "--port", "0")
        assert second.returncode != 0
        lines = second.stderr.decode().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"agentmesh: another hub (pid {process.pid}) is using "), lines
        assert str(data_dir / "agentmesh.db") in lines[0]
        process.send_signal(signal.SIGTERM)
        with trio.fail_after(WAIT):
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        if process.stderr is not None:
            await process.stderr.aclose()


# ---------------------------------------------------------------------------------------
# Schema versions


def _user_version(path: Path) -> int:
    with _plain(path) as db:
        version: int = db.execute("PRAGMA user_version").fetchone()[0]
    return version


class _plain:
    """A plain SQLite connection, closed after the block (sqlite3's own context manager
    only commits)."""

    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, *_: object) -> None:
        self.db.close()


def _files(folder: Path) -> dict[str, str]:
    """Every file in `folder`, with the SHA-256 of its bytes."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize(
    "journal_mode",
    ["wal", "delete"],
)
def test_a_file_from_a_newer_schema_is_refused_and_left_untouched(
    tmp_path: Path, journal_mode: str
) -> None:
    path = tmp_path / "agentmesh.db"
    store = SQLiteStore(path)
    store.load()
    store.write(busy().batches[0])
    store.close()
    with _plain(path) as db:
        db.execute(f"PRAGMA journal_mode = {journal_mode}")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    (tmp_path / "agentmesh.db.lock").unlink()
    before = _files(tmp_path)

    with pytest.raises(StoreError) as refused:
        SQLiteStore(path).load()
    message = one_line(refused)
    assert message == (
        f"{path} was written by a newer agentmesh (schema version {SCHEMA_VERSION + 1}; "
        f"this one knows up to {SCHEMA_VERSION}); upgrade agentmesh to open it"
    )
    after = _files(tmp_path)
    del after["agentmesh.db.lock"]  # beside the file, the store's own
    assert after == before, "the newer file was changed"
    assert _user_version(path) == SCHEMA_VERSION + 1


def _v1_file(path: Path, rows: Snapshot) -> None:
    """A file as agentmesh wrote it at schema version 1, holding `rows`."""
    with _plain(path) as db:
        for statement in MIGRATIONS[1]:
            db.execute(statement)
        db.executemany(
            "INSERT INTO agents (agent_id, seq, record) VALUES (?, ?, ?)",
            [(a.agent_id, a.seq, a.record) for a in rows.agents],
        )
        db.executemany(
            "INSERT INTO tasks (seq, task_id, requester, assignee, state, row, params, "
            "deadline, finished, owed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [t[:10] for t in rows.tasks],  # the columns of version 1
        )
        db.execute(
            "INSERT INTO meta (key, value) VALUES ('counters', ?)", (orjson.dumps(rows.counters),)
        )
        db.execute("PRAGMA user_version = 1")


def _application_id(path: Path) -> int:
    with _plain(path) as db:
        application: int = db.execute("PRAGMA application_id").fetchone()[0]
    return application


def _rows(batches: list[Changes]) -> Snapshot:
    """The rows `batches` leave, as a store holds them (the last version of each)."""
    tasks: dict[int, TaskRow] = {}
    agents: dict[str, AgentRow] = {}
    counters: dict[str, int] = {}
    for changes in batches:
        for seq in changes.gone_tasks:
            tasks.pop(seq, None)
        tasks.update((t.seq, t) for t in changes.tasks)
        for agent_id in changes.gone_agents:
            agents.pop(agent_id, None)
        agents.update((a.agent_id, a) for a in changes.agents)
        counters = changes.counters
    return Snapshot(
        agents=sorted(agents.values(), key=lambda a: a.seq),
        tasks=sorted(tasks.values()),
        counters=counters,
    )


def test_a_version_1_file_is_migrated_in_place_with_its_rows(tmp_path: Path) -> None:
    path = tmp_path / "agentmesh.db"
    rows = _rows(busy().batches)
    assert (len(rows.tasks), len(rows.agents)) == (7, 3)
    _v1_file(path, rows)
    assert _user_version(path) == 1
    assert _application_id(path) == 0

    store = SQLiteStore(path)
    snapshot = store.load()
    assert _user_version(path) == SCHEMA_VERSION
    assert _application_id(path) == APPLICATION_ID  # step 2
    assert snapshot.agents == rows.agents
    assert snapshot.tasks == rows.tasks
    assert snapshot.counters == rows.counters
    store.close()
    assert load(path) == snapshot  # and it opens again, as it is


def test_a_version_2_file_gets_trace_context_in_its_rows(tmp_path: Path) -> None:
    """Version 3 put `traceparent` and `tracestate` in a task's row, before its last two
    fields: a row of version 2 (14 fields) gets them, null; its other fields stay."""
    path = tmp_path / "agentmesh.db"
    now = _rows(busy().batches)
    at = _ROW_FIELDS.index("traceparent")
    assert _ROW_FIELDS[at : at + 2] == ("traceparent", "tracestate")
    assert _ROW_FIELDS[at + 2 :] == ("owed_cancel", "notified")

    def narrow(row: TaskRow) -> TaskRow:
        fields = orjson.loads(row.row)
        del fields[at : at + 2]
        return row._replace(row=orjson.dumps(fields))

    def untraced(row: TaskRow) -> TaskRow:
        fields = orjson.loads(row.row)
        fields[at : at + 2] = [None, None]
        return row._replace(row=orjson.dumps(fields))

    v2 = attrs.evolve(now, tasks=[narrow(t) for t in now.tasks])
    assert all(len(orjson.loads(t.row)) == 14 for t in v2.tasks)
    _v1_file(path, v2)
    with _plain(path) as db:
        for statement in MIGRATIONS[2]:
            db.execute(statement)  # type: ignore[arg-type]
        db.execute("PRAGMA user_version = 2")

    snapshot = load(path)
    assert _user_version(path) == SCHEMA_VERSION
    assert snapshot.tasks == [untraced(t) for t in now.tasks]
    assert snapshot.agents == now.agents
    # A router takes them back as it takes rows it wrote itself.
    mesh = Mesh(now=1000.0, wall0=WALL0 + 12.0 - 1000.0, resume_grace=10.0, retention=10.0)
    mesh.router.restore(snapshot)
    assert len(mesh.router.tasks) == len(now.tasks)
    assert all(r.traceparent is None for r in mesh.router.tasks)


def test_the_trace_migration_rewrites_every_old_row(tmp_path: Path) -> None:
    path = tmp_path / "agentmesh.db"
    (template,) = [t for t in _rows(busy().batches).tasks if t.finished is not None][:1]
    fields = orjson.loads(template.row)
    del fields[12:14]
    rows = [
        template._replace(seq=seq, task_id=f"task_{seq}", row=orjson.dumps(fields))
        for seq in range(2500)
    ]
    _v1_file(path, Snapshot(tasks=rows))
    snapshot = load(path)
    assert len(snapshot.tasks) == 2500
    assert {len(orjson.loads(TaskRow(*t).row)) for t in snapshot.tasks} == {16}


def test_a_migration_that_fails_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "agentmesh.db"
    rows = _rows(busy().batches)
    _v1_file(path, rows)
    broken = {**MIGRATIONS, SCHEMA_VERSION + 1: ("CREATE TABLE later (x)", "NOT SQL")}
    monkeypatch.setattr("agentmesh.sqlite_store.MIGRATIONS", broken)
    monkeypatch.setattr("agentmesh.sqlite_store.SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(StoreError) as refused:
        SQLiteStore(path).load()
    assert "syntax error" in one_line(refused)
    # All steps are one transaction: not even step 2 stayed.
    assert _user_version(path) == 1
    assert _application_id(path) == 0
    with _plain(path) as db:
        tables = {n for (n,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"agents", "tasks", "meta"}
    monkeypatch.undo()
    assert load(path).tasks == rows.tasks


@pytest.mark.parametrize("empty", ["missing", "zero bytes"])
def test_a_new_file_is_made_at_the_current_version(tmp_path: Path, empty: str) -> None:
    path = tmp_path / "deeper" / "agentmesh.db"
    if empty == "zero bytes":
        path.parent.mkdir()
        path.touch()
    store = SQLiteStore(path)
    assert store.load() == Snapshot()
    store.close()
    assert _user_version(path) == SCHEMA_VERSION
    assert _application_id(path) == APPLICATION_ID
    with _plain(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


# ---------------------------------------------------------------------------------------
# Bad files


def test_another_programs_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "agentmesh.db"
    with _plain(path) as db:
        db.execute("PRAGMA application_id = 42")
        db.execute("CREATE TABLE tasks (todo TEXT)")
        db.commit()
    before = path.read_bytes()
    with pytest.raises(StoreError) as refused:
        SQLiteStore(path).load()
    assert one_line(refused) == (
        f"{path} is another program's SQLite database (application id 0x2a), not an agentmesh store"
    )
    assert path.read_bytes() == before


def _corrupt(path: Path, how: str) -> None:
    noise = random.Random(13)
    if how == "random bytes":
        path.write_bytes(noise.randbytes(8192))
        return
    store = SQLiteStore(path)
    store.load()
    write_all(store, busy().batches)
    store.close()  # the last connection: the WAL is checkpointed into the file
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    assert len(data) >= 3 * page, len(data)
    data[page:] = noise.randbytes(len(data) - page)  # every page but the first
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["random bytes", "pages overwritten"])
def test_a_corrupt_file_is_refused(tmp_path: Path, how: str) -> None:
    path = tmp_path / "agentmesh.db"
    _corrupt(path, how)
    for _ in range(2):  # the same answer again: nothing was left open or locked
        with pytest.raises(StoreError) as refused:
            SQLiteStore(path).load()
        message = one_line(refused)
        assert str(path) in message, message
        assert "corrupt" in message.replace(str(path), ""), message


async def test_a_corrupt_file_stops_the_cli_with_one_line(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    _corrupt(data_dir / "agentmesh.db", "pages overwritten")
    refused = await _cli("start", "--data-dir", str(data_dir), "--port", "0")
    assert refused.returncode != 0
    lines = refused.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("agentmesh: "), lines
    assert "corrupt" in lines[0].replace(str(data_dir), ""), lines


# ---------------------------------------------------------------------------------------
# Bad disks


def test_an_unwritable_data_dir_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    data_dir.chmod(0o500)
    try:
        if _writes_anyway(data_dir):
            pytest.skip("this user writes into a read-only directory anyway (root)")
        for store in (SQLiteStore.in_dir(data_dir), SQLiteStore.in_dir(data_dir / "sub")):
            with pytest.raises(StoreError) as refused:
                store.load()
            message = one_line(refused)
            assert "Permission denied" in message, message
    finally:
        data_dir.chmod(0o700)


def _writes_anyway(folder: Path) -> bool:
    """Whether the permissions of `folder` do not stop us (as for root, unless it gave
    up CAP_DAC_OVERRIDE)."""
    if os.geteuid() != 0:
        return False
    try:
        (folder / "probe").touch()
    except PermissionError:
        return False
    (folder / "probe").unlink()
    return True


_OPEN_READ_ONLY = """
import sys
from agentmesh.sqlite_store import SQLiteStore
from agentmesh.store import StoreError
try:
    SQLiteStore(sys.argv[1]).load()
except StoreError as exc:
    print(exc)
else:
    print("loaded")
"""


def test_a_read_only_database_file_is_refused_at_start(tmp_path: Path) -> None:
    # SQLite opens a write-protected file read-only without a word; the hub would start,
    # then fail every commit. It must refuse at once instead. Root ignores the file's
    # mode, so as root the check runs without CAP_DAC_OVERRIDE (setpriv), if it can.
    path = tmp_path / "agentmesh.db"
    store = SQLiteStore(path)
    store.load()
    store.write(Changes(counters={"delegated": 1}))
    store.close()
    path.chmod(0o444)
    command = [sys.executable, "-c", _OPEN_READ_ONLY, str(path)]
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("root ignores file modes, and setpriv is not here to drop that")
        command = [setpriv, "--bounding-set=-dac_override,-dac_read_search", "--", *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=WAIT * 2, check=False)
    if "Operation not permitted" in done.stderr:  # no capability to drop, in this container
        pytest.skip(f"setpriv cannot drop capabilities here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (f"cannot open {path}: attempt to write a readonly database"), (
        done.stdout
    )


def test_a_data_dir_that_cannot_be_a_directory_is_refused(tmp_path: Path) -> None:
    # Even root cannot make a directory under a file.
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(StoreError) as refused:
        SQLiteStore.in_dir(tmp_path / "a-file" / "data").load()
    message = one_line(refused)
    assert message.startswith(f"cannot use {tmp_path / 'a-file' / 'data'}: "), message


class Faults:
    """A faults hook: raises `error` while set; `db` is the store's connection."""

    def __init__(self) -> None:
        self.error: sqlite3.Error | None = None
        self.calls = 0
        self.db: sqlite3.Connection | None = None
        self.then: Callable[[sqlite3.Connection], None] | None = None

    def __call__(self, db: sqlite3.Connection) -> None:
        self.calls += 1
        self.db = db
        if self.then is not None:
            self.then(db)
            self.then = None
        if self.error is not None:
            raise self.error


def test_a_write_that_fails_keeps_none_of_its_batch(tmp_path: Path) -> None:
    path = tmp_path / "agentmesh.db"
    was = busy()
    faults = Faults()
    store = SQLiteStore(path, faults=faults)
    store.load()
    write_all(store, was.batches[:3])
    faults.error = sqlite3.OperationalError("disk I/O error")
    for changes in was.batches[3:]:  # deletes, updates, new rows, counters: each fails
        assert len(changes)
        with pytest.raises(StoreError) as failed:
            store.write(changes)
        assert one_line(failed) == f"cannot write {path}: disk I/O error"
    assert faults.calls == 5
    store.close()
    assert load(path) == _snapshot(was.batches[:3])

    # The hub writes the same batches again once the disk works: then they are there.
    store = SQLiteStore(path, faults=faults)
    store.load()
    faults.error = None
    write_all(store, was.batches[3:])
    store.close()
    assert load(path) == _snapshot(was.batches)


def _snapshot(batches: list[Changes]) -> Snapshot:
    """What a store that took `batches` loads."""
    return _rows(batches)


def test_a_full_disk_keeps_none_of_its_batch(tmp_path: Path) -> None:
    path = tmp_path / "agentmesh.db"
    was = busy()
    faults = Faults()

    def fill_up(db: sqlite3.Connection) -> None:  # the disk has room for what is there
        (pages,) = db.execute("PRAGMA page_count").fetchone()
        db.execute(f"PRAGMA max_page_count = {pages}")

    store = SQLiteStore(path, faults=faults)
    store.load()
    write_all(store, was.batches[:-1])
    faults.then = fill_up
    store.write(was.batches[-1])
    big = TaskRow(
        seq=100,
        task_id="task_big",
        requester=was.requester.agent_id,
        assignee=was.worker.agent_id,
        state="pending",
        row=b"[]",
        params=b"x" * (1 << 20),
        deadline=WALL0 + 100,
        finished=None,
        owed=True,
    )
    small = big._replace(seq=99, task_id="task_small", params=b"{}")
    gone = _rows(was.batches).tasks[0].seq
    changes = Changes(tasks=[small, big], gone_tasks=[gone], counters={"delegated": 99})
    with pytest.raises(StoreError) as full:
        store.write(changes)
    assert one_line(full) == f"cannot write {path}: database or disk is full"
    assert faults.calls == len(was.batches)  # SQLite itself refused, before the hook
    store.close()
    assert load(path) == _snapshot(was.batches)

    # A disk with room again takes the same batch.
    store = SQLiteStore(path)
    store.load()
    store.write(changes)
    store.close()
    loaded = load(path)
    stored = [TaskRow._make(t) for t in loaded.tasks]  # plain tuples, as SQLite gives them
    assert [t.task_id for t in stored][-2:] == ["task_small", "task_big"]
    assert gone not in {t.seq for t in stored}
    assert loaded.counters == {"delegated": 99}


# ---------------------------------------------------------------------------------------


async def _cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(WAIT * 2):
        return await trio.run_process(
            [sys.executable, "-m", "agentmesh", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


async def _read_until(stream: trio.abc.ReceiveStream, marker: bytes) -> bytes:
    seen = b""
    with trio.fail_after(WAIT * 2):
        while marker not in seen:
            chunk = await stream.receive_some()
            assert chunk, seen.decode()
            seen += chunk
    return seen
