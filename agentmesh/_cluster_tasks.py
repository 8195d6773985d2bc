"""The tasks bucket's Trio side (docs/cluster.md, "What is kept in NATS"): the rows of
the tasks this hub decides, written after each commit, and read back when one of their
requesters is taken over by another hub.

- **Writing.** `TaskRows.write` is the last step of each commit (`Commits.replicate`):
  the batch's rows of the tasks this hub owns go to `agentmesh_tasks` under
  `<requester>.<task_id>`, and the commit waits for their ack, so a frame held for
  that commit (the `delegate` reply, an outcome) goes out once its task is in the
  bucket. A row owed to nobody any more (its outcome written whole) is deleted; one
  that never reached the bucket is never written. A batch is written as plain
  publishes to the bucket's subjects, the last one a request whose reply is JetStream's
  ack: since a stream stores what one connection sends in order, it says that the
  whole batch is stored (one ack per batch, not per row: nats-py spends about 100 µs
  of CPU on a put that awaits its own). These writes are not compare-and-set, but they
  go out in turn with the hub's other messages: a row written before this hub saw its
  requester move reaches NATS before the handover does, so what the new owner writes
  in answer to the handover lands after it (docs/cluster.md, Identity).
- **While NATS is away** the commit does not wait (the link down), or waits at most
  `WRITE_TIMEOUT` (a batch not acknowledged): the rows not yet written are kept, the
  latest of each, and go with the next commits once the link is back, a share of them
  per commit beside its own, so that no commit waits long for a backlog (one written
  whole could take longer than `WRITE_TIMEOUT`, and then never get written). The share
  is `BACKLOG_ROWS` at first, halved after a commit that timed out, and doubled (up to
  `BACKLOG_ROWS` again) after one acknowledged within half of `WRITE_TIMEOUT`.
- **Held back after a take-over.** The rows of a requester this hub took over from a
  live hub wait until that hub answers `release` (`Router.fenced`, at most
  `RELEASE_WAIT`): a commit it made before it saw the move may still be on its way to
  NATS, and would land after them. Each held key counts as in the bucket (the old
  hub's row of it is), so a task told meanwhile has its row deleted. Once released,
  they go with the next commit (the router wakes one); if the requester moved on
  meanwhile, they are not this hub's to write, and are dropped.
- **Reading.** `TaskRows.read` fetches `<requester>.>` for the hub's read loop, before
  it routes a `register` that takes that requester over (`Router.prefetch`).

Cancellation: a write or read cancelled while on the link's loop is cancelled there;
what a cancelled write did not finish stays to be written.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any, cast

import orjson
import trio

from ._nats_link import LinkError, LinkState, NatsLink
from ._remote import task_key, task_value

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js.kv import KeyValue

    from .routing import Router
    from .store import Changes

__all__ = ["BACKLOG_ROWS", "READ_TIMEOUT", "TASKS_BUCKET", "WRITE_TIMEOUT", "TaskRows"]

log = logging.getLogger("agentmesh.cluster")

TASKS_BUCKET = "agentmesh_tasks"
WRITE_TIMEOUT = 2.0  # seconds a commit waits for the bucket's acks before it goes on
BACKLOG_ROWS = 1000  # rows kept from a link outage that one commit writes, at most
READ_TIMEOUT = 2.0  # seconds a take-over waits for its requester's rows


class TaskRows:
    """The rows this hub has in the tasks bucket, and those still to write."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._keys: dict[int, str] = {}  # a task's sequence number -> its key
        # Keys the bucket may hold: a row was sent for each (acknowledged or not), and
        # no delete of it acknowledged since. A row owed to nobody is deleted if here.
        self._stored: set[str] = set()
        self._unwritten: dict[str, bytes | None] = {}  # a key -> its row, or None: delete
        # Rows held back while their requester is fenced: its ID -> key -> row or None.
        self._held: dict[str, dict[str, bytes | None]] = {}
        self._bucket = _Bucket()
        self.link_breaks = 0  # the link went down this many times (`Cluster` counts)
        self.failures = 0  # batches not acknowledged in time (or refused)
        # The backlog's share of the next commit: halved when a commit times out,
        # doubled (up to `BACKLOG_ROWS`) when one is acknowledged within half of
        # `WRITE_TIMEOUT`, and else left as it is.
        self.share = BACKLOG_ROWS

    @property
    def pending(self) -> bool:
        """Whether rows wait for the link to come back."""
        return bool(self._unwritten)

    async def write(self, link: NatsLink, router: Router, changes: Changes) -> bool:
        """Put the rows of `changes` that this hub owns, delete those owed to nobody
        now, and wait for the ack (at most `WRITE_TIMEOUT`; the link down: not at all).
        What is not acknowledged, or went out while the link broke, is written with a
        later batch. Rows kept from before (the link was down) go along, at most
        `share` of them. Returns whether another commit should follow soon (nothing
        waits for it: these frames went out), for rows still to write: after an
        acknowledged batch; after one that timed out while the share could still shrink
        (a NATS that takes no single row in `WRITE_TIMEOUT` is as good as away: the
        next change brings the next try); after one during which the link broke and
        came back. Not after an error, which may come at once again (the next change,
        or the link's return, brings the next try)."""
        fresh = self._batch(router, changes)
        if self._held:
            self._release(router)
        unwritten = self._unwritten
        for key in fresh:  # the latest of each row
            unwritten.pop(key, None)
        if link.state is not LinkState.CONNECTED:
            unwritten.update(fresh)
            return False
        if not fresh and not unwritten:
            return False
        batch = fresh
        if unwritten:  # the oldest first
            old = list(islice(unwritten, self.share))
            batch = {key: unwritten.pop(key) for key in old}
            batch.update(fresh)
        breaks = self.link_breaks
        done = False
        began = trio.current_time()
        try:
            with trio.move_on_after(WRITE_TIMEOUT) as waited:
                try:
                    await _write(link, batch)
                    done = self.link_breaks == breaks  # else plain publishes may be lost
                except (LinkError, trio.WouldBlock, _Refused) as exc:  # with a later batch
                    log.warning("cannot write the tasks bucket (trying again later): %r", exc)
        finally:  # not acknowledged (or cancelled): kept for a later batch, and each
            if not done:  # row counted as in the bucket (it may have landed)
                self.failures += 1
                self._unwritten = {**batch, **self._unwritten}
                self._stored.update(key for key, value in batch.items() if value is not None)
        if not done:
            if waited.cancelled_caught and self.share > 1:  # (it paced itself)
                if len(batch) > len(fresh):
                    self.share //= 2
                return True
            return self.link_breaks != breaks and link.state is LinkState.CONNECTED
        if len(batch) > len(fresh) and trio.current_time() - began < WRITE_TIMEOUT / 2:
            self.share = min(BACKLOG_ROWS, 2 * self.share)
        for key, value in batch.items():
            if value is None:
                self._stored.discard(key)
            else:
                self._stored.add(key)
        return bool(self._unwritten)

    def _batch(self, router: Router, changes: Changes) -> dict[str, bytes | None]:
        """The bucket's side of one commit: a row or a delete per key. Only the rows of
        tasks whose requester is this hub's own agent are this hub's to write: a stub's
        is its owner's, and a requester that moved has its tasks decided elsewhere."""
        batch: dict[str, bytes | None] = {}
        keys, registry = self._keys, router.registry
        for row in changes.tasks:
            key = task_key(row.requester, row.task_id)
            requester = registry.get(row.requester)
            if row.owner is not None or requester is None or requester.hub is not None:
                if keys.pop(row.seq, None) is not None:
                    self._unwritten.pop(key, None)  # the new owner's now (if anyone's)
                    self._unhold(key)
                    if requester is None and key in self._stored:
                        batch[key] = None  # the requester is gone: its row goes
                    else:  # the new owner writes and deletes it from now on
                        self._stored.discard(key)
                continue
            if not row.owed:
                if keys.pop(row.seq, None) is not None:
                    self._forget(key, batch)
                continue
            batch[key] = task_value(row, self._name, requester.epoch)
            keys[row.seq] = key
        for seq in changes.paid:
            paid = keys.pop(seq, None)
            if paid is not None:
                self._forget(paid, batch)
        for seq in changes.gone_tasks:  # dropped here (by retention, or handed over): the
            gone = keys.pop(seq, None)  # row stays for the new owner, or until `max_age`
            if gone is not None:
                self._unwritten.pop(gone, None)
                self._unhold(gone)
                self._stored.discard(gone)
        fenced = router.fenced
        if fenced:
            for key in [key for key in batch if _requester(key) in fenced]:
                value = batch.pop(key)
                self._held.setdefault(_requester(key), {})[key] = value
                if value is not None:  # (the old holder's row of it is there)
                    self._stored.add(key)
        return batch

    def _release(self, router: Router) -> None:
        """The rows held back for requesters no longer fenced join those to write now;
        if the requester moved on meanwhile, they are its new hub's, and are dropped;
        if it is gone, they are deleted."""
        fenced, registry = router.fenced, router.registry
        for requester in [r for r in self._held if r not in fenced]:
            rows = self._held.pop(requester)
            agent = registry.get(requester)
            if agent is not None and agent.hub is not None:
                self._stored.difference_update(rows)
                continue
            for key, value in rows.items():
                self._unwritten[key] = value if agent is not None else None

    def _unhold(self, key: str) -> None:
        held = self._held.get(_requester(key))
        if held is not None:
            held.pop(key, None)

    def _forget(self, key: str, batch: dict[str, bytes | None]) -> None:
        """The row of `key` is owed to nobody now: deleted if the bucket has it, else
        never written."""
        self._unwritten.pop(key, None)
        if key in self._stored:
            batch[key] = None
        else:
            batch.pop(key, None)

    async def read(self, link: NatsLink, requester: str) -> list[Mapping[str, Any]] | None:
        """The rows of the tasks `requester` asked for, as the bucket holds them now;
        None if they cannot be read (within `READ_TIMEOUT`)."""
        if link.state is not LinkState.CONNECTED:
            return None
        entries: list[tuple[str, bytes]] | None = None
        with trio.move_on_after(READ_TIMEOUT):
            try:
                entries = await link.run(partial(_read, self._bucket, requester))
            except Exception as exc:
                log.warning("cannot read the tasks of %s: %s", requester, exc)
        if entries is None:
            return None
        rows: list[Mapping[str, Any]] = []
        for key, value in entries:
            try:
                row = orjson.loads(value)
            except orjson.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                log.warning("not a task row in %s: %r", TASKS_BUCKET, key)
                continue
            rows.append(row)
        return rows


# -------------------------------------------------------------------------------------
# On the link's asyncio loop (through `NatsLink.run`)


class _Bucket:
    """The tasks bucket's handle, looked up once (each look-up is a JetStream request)."""

    def __init__(self) -> None:
        self._kv: KeyValue | None = None

    async def __call__(self, nc: Client) -> KeyValue:
        if self._kv is None:
            self._kv = await nc.jetstream().key_value(TASKS_BUCKET)
        return self._kv


async def _write(link: NatsLink, batch: Mapping[str, bytes | None]) -> None:
    """Write `batch` (a row per key, or None: delete it): every item a plain publish to
    its key's subject but the last, a request whose reply is JetStream's ack, which says
    the stream stored all of them (it stores one connection's messages in order).

    All of them go through the link in turn with its other publishes (not as a
    `NatsLink.run` of nats-py's own calls, which runs in an asyncio task of its own and
    may be overtaken): so a message this hub sends after the commit, the handover of a
    requester's tasks to its new hub above all, reaches NATS after these rows, and what
    the new hub writes in answer lands after these. `_Refused` if JetStream says no;
    `LinkError` (`RequestTimeout` included) or `trio.WouldBlock` (the link's loop far
    behind) if it could not be asked."""
    await link.ready_for_requests()  # else the ack's request waits, and is overtaken
    subject = f"$KV.{TASKS_BUCKET}."
    most = link.max_payload - 1024  # room for the subject and the headers
    items = list(batch.items())
    for i, (key, value) in enumerate(items):
        # NATS would refuse it, and say so only to the link's `on_error`, after the
        # batch's ack had counted it as stored.
        if value is not None and len(value) > most:
            log.warning(
                "the row of task %s is %d bytes, more than NATS takes: it is deleted from "
                "the tasks bucket instead (a hub that takes its requester over fails it)",
                key,
                len(value),
            )
            items[i] = (key, None)  # and no older, smaller row of it stays there either
    *rest, (key, value) = items
    if rest:  # one hand-over to the link's loop for all of them
        link.publish_many(
            [
                (subject + other, b"", _DELETE) if row is None else (subject + other, row, None)
                for other, row in rest
            ]
        )
    if value is None:
        reply = await link.request(subject + key, headers=_DELETE, timeout=WRITE_TIMEOUT)
    else:
        reply = await link.request(subject + key, value, timeout=WRITE_TIMEOUT)
    try:
        ack = orjson.loads(reply.data)
    except orjson.JSONDecodeError:
        ack = None
    if not isinstance(ack, dict) or "error" in ack or "seq" not in ack:
        raise _Refused(ack)


def _requester(key: str) -> str:
    """The requester's ID in a key of the tasks bucket (`task_key`)."""
    return key.partition(".")[0]


class _Refused(Exception):
    """JetStream did not store a batch: its answer (an error, or not an ack)."""


# A KV delete: a marker that the bucket's watchers skip, and that JetStream drops a
# minute later (a message TTL: nats-py makes KV streams with `allow_msg_ttl`), so that
# the bucket does not keep a marker per task for its whole `max_age`.
_DELETE = {"KV-Operation": "DEL", "Nats-TTL": "60"}


async def _read(bucket: _Bucket, requester: str, nc: Client) -> list[tuple[str, bytes]]:
    """Every row of the tasks bucket under `<requester>.`: (key, value)."""
    kv = await bucket(nc)
    watcher = await kv.watch(f"{requester}.>", ignore_deletes=True)
    entries: list[tuple[str, bytes]] = []
    try:
        async for entry in watcher:
            if entry is None:
                break
            if entry.operation not in ("DEL", "PURGE"):
                entries.append((entry.key, entry.value or b""))
    finally:
        try:
            await cast(Any, watcher).stop()  # untyped in nats-py
        except Exception:
            pass
    return entries
