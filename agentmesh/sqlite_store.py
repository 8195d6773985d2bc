"""The durable store: one SQLite file in WAL mode. The only module that knows SQL.

The hub writes one transaction per batch of routing work (`write`), from a worker
thread, and sends what promises durability once it has returned. With
`synchronous=NORMAL` (the default) a commit survives the hub's process being killed at
any moment, and costs no fsync; `synchronous="FULL"` survives a power cut too, at an
fsync per commit.

The file's schema version is SQLite's `user_version`. An older file is migrated in
place, one numbered step at a time, in one transaction; a newer one is refused. A lock
file beside the database (`<name>.lock`, held with `flock`) keeps a second hub away.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import orjson

from .store import AgentRow, Changes, Snapshot, StoreError

__all__ = ["APPLICATION_ID", "MIGRATIONS", "SCHEMA_VERSION", "SQLiteStore"]

APPLICATION_ID = int.from_bytes(b"amsh", "big")  # in the file's header, from version 2


def _trace_context_in_rows(db: sqlite3.Connection) -> None:
    """Step 3: a task's row holds its W3C trace context. A row of version 2 is an array
    of 14 fields; `traceparent` and `tracestate` (null) go in before its last two
    (`owed_cancel`, `notified`), so that the row still ends as it did. One statement,
    one pass over the table (a function of ours rewrites each row)."""
    db.create_function("agentmesh_v3_row", 1, _v3_row, deterministic=True)
    db.execute("UPDATE tasks SET row = agentmesh_v3_row(row)")


def _v3_row(row: bytes) -> bytes:
    fields = orjson.loads(row)
    if len(fields) != 14:  # written by version 3 already
        return row
    fields[12:12] = (None, None)
    return orjson.dumps(fields)


# Step N takes a file from version N - 1 to version N: SQL statements, or a function
# that rewrites rows.
MIGRATIONS: dict[int, tuple[str | Callable[[sqlite3.Connection], None], ...]] = {
    1: (
        """CREATE TABLE agents (
            agent_id TEXT PRIMARY KEY,
            seq INTEGER NOT NULL,
            record BLOB NOT NULL
        )""",
        """CREATE TABLE tasks (
            seq INTEGER PRIMARY KEY,
            task_id TEXT NOT NULL,
            requester TEXT NOT NULL,
            assignee TEXT NOT NULL,
            state TEXT NOT NULL,
            row BLOB NOT NULL,
            params BLOB,
            deadline REAL,
            finished REAL,
            owed INTEGER NOT NULL
        )""",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    ),
    # Mark the file as an agentmesh store, so that another program's database is told
    # apart from a corrupt one.
    2: (f"PRAGMA application_id = {APPLICATION_ID}",),
    3: (_trace_context_in_rows,),
    # A task's priority, and the queue it waits in for a free agent (columns, as they
    # matter only while it is unfinished: adding them rewrites no row).
    4: (
        "ALTER TABLE tasks ADD COLUMN priority INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tasks ADD COLUMN queue TEXT",
    ),
    # In a cluster: the hub that owns a stub (a task whose requester is on another hub),
    # while it is unfinished (docs/cluster.md).
    5: ("ALTER TABLE tasks ADD COLUMN owner TEXT",),
}
SCHEMA_VERSION = max(MIGRATIONS)

_TASK_COLUMNS = (
    "seq, task_id, requester, assignee, state, row, params, deadline, finished, owed, "
    "priority, queue, owner"
)
_PUT_TASK = f"INSERT OR REPLACE INTO tasks ({_TASK_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)"


class SQLiteStore:
    """A hub's state in the SQLite file at `path` (created if missing, with its folder).

    Nothing is opened until `load`. `faults` is for tests: called inside every write
    transaction just before its commit, it may raise `sqlite3.Error` to play a failing
    disk.
    """

    durable = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "NORMAL",
        faults: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self.faults = faults
        self._db: sqlite3.Connection | None = None
        self._lock: int | None = None

    @classmethod
    def in_dir(cls, data_dir: str | os.PathLike[str], **options: object) -> SQLiteStore:
        """The store of a data directory: `<data_dir>/agentmesh.db`."""
        return cls(Path(data_dir) / "agentmesh.db", **options)  # type: ignore[arg-type]

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    # ---------------------------------------------------------------------------------

    def load(self) -> Snapshot:
        """Open the file (lock, migrate), then read everything back. Raises StoreError
        with one line on what is wrong: another hub holds it, it is newer, or it is not
        a database (corrupt) or cannot be read or written."""
        db = self._open()
        try:
            agents = [
                AgentRow(agent_id=a, seq=s, record=r)
                for a, s, r in db.execute("SELECT agent_id, seq, record FROM agents ORDER BY seq")
            ]
            tasks = db.execute(f"SELECT {_TASK_COLUMNS} FROM tasks ORDER BY seq").fetchall()
            meta = dict(db.execute("SELECT key, value FROM meta"))
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"cannot read {self.path}: {_describe(exc)}") from exc
        counters = _decode_counters(meta.get("counters"))
        return Snapshot(agents=agents, tasks=tasks, counters=counters)

    def write(self, changes: Changes) -> None:
        """One transaction: all of `changes` or, on error (StoreError), none."""
        db = self._db
        if db is None:
            raise StoreError(f"{self.path} is not open")
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                if changes.gone_tasks:
                    db.executemany(
                        "DELETE FROM tasks WHERE seq = ?", [(s,) for s in changes.gone_tasks]
                    )
                if changes.tasks:
                    db.executemany(_PUT_TASK, changes.tasks)
                if changes.paid:
                    db.executemany(
                        "UPDATE tasks SET owed = 0 WHERE seq = ?", [(s,) for s in changes.paid]
                    )
                if changes.gone_agents:
                    db.executemany(
                        "DELETE FROM agents WHERE agent_id = ?",
                        [(a,) for a in changes.gone_agents],
                    )
                if changes.agents:
                    db.executemany(
                        "INSERT OR REPLACE INTO agents (agent_id, seq, record) VALUES (?,?,?)",
                        [(a.agent_id, a.seq, a.record) for a in changes.agents],
                    )
                db.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES ('counters', ?)",
                    (orjson.dumps(changes.counters),),
                )
                if self.faults is not None:
                    self.faults(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot write {self.path}: {_describe(exc)}") from exc

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor lets go of the lock
            self._lock = None

    # ---------------------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        if self._db is not None:
            raise StoreError(f"{self.path} is already open")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._take_lock()
        except OSError as exc:
            self.close()
            raise StoreError(f"cannot use {self.path.parent}: {exc.strerror or exc}") from exc
        try:
            # Autocommit mode: transactions are ours (BEGIN ... COMMIT). One writer, in
            # worker threads one after the other, never two at once.
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db = db
            self._check_version(db)  # before anything writes to the file
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"{self.path}: SQLite cannot use WAL mode here ({mode})")
            db.execute(f"PRAGMA synchronous = {self.synchronous}")
            self._migrate(db)
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"cannot open {self.path}: {_describe(exc)}") from exc
        except StoreError:
            self.close()
            raise
        return db

    def _take_lock(self) -> None:
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"another hub (pid {holder}) is using {self.path}; stop it, or give this "
                "one another data directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock = fd

    def _check_version(self, db: sqlite3.Connection) -> None:
        """Refuse a file from a newer schema, or another program's, having read only its
        header."""
        application = db.execute("PRAGMA application_id").fetchone()[0]
        if application not in (0, APPLICATION_ID):
            raise StoreError(
                f"{self.path} is another program's SQLite database (application id "
                f"{application:#x}), not an agentmesh store"
            )
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} was written by a newer agentmesh (schema version {version}; "
                f"this one knows up to {SCHEMA_VERSION}); upgrade agentmesh to open it"
            )

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Bring the file to `SCHEMA_VERSION`, all steps in one transaction. It writes
        even when there is nothing to migrate: SQLite opens a read-only file read-only,
        silently, and a hub that cannot write must refuse to start."""
        version = db.execute("PRAGMA user_version").fetchone()[0]
        db.execute("BEGIN IMMEDIATE")
        try:
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    if isinstance(statement, str):
                        db.execute(statement)
                    else:
                        statement(db)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise


def _describe(exc: sqlite3.Error) -> str:
    """One line for an SQLite error, saying what it most likely means."""
    text = str(exc) or type(exc).__name__
    if "not a database" in text or "malformed" in text:
        return f"{text} (the file is corrupt or not an agentmesh store)"
    return text


def _decode_counters(blob: bytes | None) -> dict[str, int]:
    """The counters kept in `meta`; anything else found there is ignored."""
    try:
        counters = orjson.loads(blob or b"{}")
    except orjson.JSONDecodeError:
        return {}
    if not isinstance(counters, dict):
        return {}
    return {k: v for k, v in counters.items() if isinstance(v, int) and v >= 0}
