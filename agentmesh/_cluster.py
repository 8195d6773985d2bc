"""The cluster's Trio shell: one hub of several, joined through NATS (docs/cluster.md).

`Cluster` owns the hub's `NatsLink` and is the router's `ClusterPort`. It carries; the
router decides. What it does:

- **Messages between hubs.** `send` queues a message; the messages that one turn of the
  event loop sends to one hub, of one kind, travel as one NATS message on
  `agentmesh.v1.to.<dest>.<src>.<kind>`, a JSON array of bodies. A request's reply is
  the array of the answers, in the same order, each handed to `Router.cluster_reply`.
  Messages to this hub (`agentmesh.v1.to.<me>.>`) go to `Router.cluster_receive`, each
  with a reply `Peer` whose answer joins the array; an answer that reports a change of
  state (`durable`) is held, as a client's frame is, until its batch is committed.
- **Broadcasts.** A local agent's broadcast goes to every hub at once on
  `agentmesh.v1.broadcast.<me>` (`send` to `EVERY_HUB`); the others' go to
  `Router.cluster_receive`, unanswered.
- **Load.** `agentmesh.v1.load.<me>` every 200 ms: the tasks in flight of this hub's
  agents whose count changed; the others' go to `Router.remote_load` (selection only).
- **Presence.** `agentmesh.v1.presence.<me>` every second (`PRESENCE_EVERY`); the other
  hubs' go to `Router.hub_presence`: a hub silent for `SILENT_AFTER` (3 s) is not alive,
  and a hub that leaves says so at once.
- **The directory.** This hub's agents are written to the KV bucket `agentmesh_agents`
  (a row per agent, `_remote.agent_row`) when they change: registered, resumed, offline,
  gone. The shell learns of those changes as a watcher of the router's agent events, so
  it costs nothing per task. The whole bucket is watched into `Router.directory`. Every
  write is a compare-and-set on the revision last seen: that is what moves an agent's
  lease when it resumes on another hub, and a write that finds the agent taken tells
  the router (`Router.lease_lost`). The router's janitor deletes a dead hub's rows
  through `forget`.
- **Start.** `join` connects, refuses a NATS without JetStream, creates the buckets
  (`agentmesh_agents`, `agentmesh_hubs`) if missing, and claims the hub's name in
  `agentmesh_hubs`, a bucket that forgets a key 3 s after its last write: the claim is
  written again every second while the hub lives (`_Claim`). A live hub with the name
  refuses the second one (at once if it answers a `ping`); a dead one's claim expires
  and is taken over. Any failure is one `ClusterError` with a one-line message.

- **The tasks bucket** (`_cluster_tasks.TaskRows`): the rows of the tasks this hub
  decides, written as the last step of each commit (so frames held for it wait for
  their acks), and read back before a take-over of their requester.

Not here yet (docs/cluster.md, "What is next"): `release`.

nats-py is imported only by the link, when `join` connects: a hub without `cluster`
never imports this module.
"""

from __future__ import annotations

import itertools
import logging
import re
import ssl
import time
import uuid
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import orjson
import trio

from . import protocol as p
from ._cluster_tasks import READ_TIMEOUT, TASKS_BUCKET, WRITE_TIMEOUT, TaskRows
from ._nats_link import (
    LinkClosed,
    LinkError,
    LinkState,
    Message,
    NatsLink,
    NoResponders,
    RequestTimeout,
)
from ._nats_link import connect as connect_link
from ._remote import BROADCAST, EVERY_HUB, KINDS, agent_row

if TYPE_CHECKING:
    from nats.aio.client import Client

    from ._commits import Commits
    from ._websocket import Flusher
    from .config import HubConfig
    from .routing import Router
    from .store import Changes

__all__ = [
    "AGENTS_BUCKET",
    "HUBS_BUCKET",
    "Cluster",
    "ClusterError",
    "default_hub_name",
    "nats_options",
    "valid_hub_name",
]

log = logging.getLogger("agentmesh.cluster")

AGENTS_BUCKET = "agentmesh_agents"
HUBS_BUCKET = "agentmesh_hubs"
PREFIX = "agentmesh.v1"
PRESENCE_EVERY = 1.0  # seconds between two presence messages of a hub
LOAD_EVERY = 0.2  # seconds between two `load` messages of a hub (when a count changed)
LOAD_ALL_EVERY = 5.0  # every count, changed or not, this often (for hubs that joined)
SILENT_AFTER = 3.0  # a hub not heard from for this long is not alive
CLAIM_REFRESH = 1.0  # seconds between two writes of a hub's claim on its name
PING = "ping"  # the kind a starting hub sends to the holder of its name's claim
_PING_TIMEOUT = 0.5
_JOIN_TIMEOUT = 10.0  # seconds `join` may take in all (connect, JetStream, claim)
_REQUEST_KEPT = 10.0  # seconds an unanswered request's bodies are kept for its reply
_WRITE_RETRY = 0.5  # seconds before the directory is written again after a failure
_MAX_MESSAGE = 512 << 10  # bytes of one message between hubs at most (NATS: 1 MiB by default)
_CLAIM_RETRY = 0.25  # seconds between two tries of a claim held by another hub
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_AGENT_KINDS = frozenset(p.AGENT_EVENT_KINDS)


class ClusterError(Exception):
    """The hub cannot join its cluster (the message is one line, for the operator)."""


def nats_options(config: HubConfig) -> dict[str, Any]:
    """What `nats.connect` takes of the hub's sign-in and TLS settings (`cluster_*`).
    Raises `ClusterError` for a TLS file that cannot be read."""
    options: dict[str, Any] = {}
    if config.cluster_creds is not None:
        options["user_credentials"] = config.cluster_creds
    if config.cluster_nkey is not None:
        options["nkeys_seed"] = config.cluster_nkey
    if config.cluster_user is not None:
        options["user"], options["password"] = config.cluster_user, config.cluster_password
    if config.cluster_token is not None:
        options["token"] = config.cluster_token
    if config.cluster_tls_ca is not None or config.cluster_tls_cert is not None:
        try:
            context = ssl.create_default_context(cafile=config.cluster_tls_ca)
            if config.cluster_tls_cert is not None:
                context.load_cert_chain(config.cluster_tls_cert, config.cluster_tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise ClusterError(f"cannot read the TLS files for NATS: {exc}") from None
        options["tls"] = context
    return options


def valid_hub_name(name: str) -> bool:
    """Whether `name` is one NATS subject token of `[A-Za-z0-9_-]`."""
    return _NAME.fullmatch(name) is not None


def default_hub_name(host: str, port: int) -> str:
    """`<host>-<port>`, every character outside `[A-Za-z0-9_-]` made a `-`."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{host}-{port}")


def _urls(cluster: str) -> list[str]:
    urls = [url.strip() for url in cluster.split(",") if url.strip()]
    if not urls:
        raise ClusterError("--cluster: no NATS URL")
    return urls


class _Slot:
    """The reply `Peer` of one body of a message from another hub: its answer, one
    JSON object, takes its place in the reply array (see `_Answers`)."""

    __slots__ = ("_answers", "_index")

    def __init__(self, answers: _Answers, index: int) -> None:
        self._answers, self._index = answers, index

    def send(
        self,
        frame: str,
        *,
        outcome_of: str | None = None,
        droppable: bool = False,
        durable: bool = False,
    ) -> None:
        self._answers.answer(self._index, frame, durable=durable)

    def close(self, code: int, reason: str) -> None:
        pass

    def has_room(self) -> bool:
        return True


class _Answers:
    """The answers to one NATS message from another hub, sent back as one array once
    every body was handled (`finish`): at once, or, if one answer reports a change of
    state and the store is durable, when the batch it belongs to is committed (as a
    client's durable frame waits: `Commits.holding`)."""

    def __init__(self, cluster: Cluster, reply: str | None, count: int) -> None:
        self._cluster = cluster
        self._reply = reply
        self._frames: list[str] = ["null"] * count
        self._batch = 0  # the batch to wait for; 0: none

    def slot(self, index: int) -> _Slot:
        return _Slot(self, index)

    def answer(self, index: int, frame: str, *, durable: bool) -> None:
        self._frames[index] = frame
        commits = self._cluster.commits
        if durable and commits is not None:
            self._batch = commits.batch

    def finish(self) -> None:
        if self._reply is None:
            return
        commits = self._cluster.commits
        if self._batch and commits is not None and commits.committed < self._batch:
            commits.holding(self)
        else:
            self._send()

    def release(self, committed: int) -> bool:
        """`Commits`' call: send the answers if their batch is committed; whether they
        are still held."""
        if committed < self._batch:
            return True
        self._send()
        return False

    def _send(self) -> None:
        if self._reply is not None:
            data = ("[" + ",".join(self._frames) + "]").encode()
            self._cluster._publish(self._reply, data)
            self._reply = None


class _AgentWatch:
    """The router's `Peer` for its agent events (registered, online, offline, left):
    each marks an agent whose directory row must be written again."""

    def __init__(self, dirty: Callable[[str], None]) -> None:
        self._dirty = dirty

    def send(
        self,
        frame: str,
        *,
        outcome_of: str | None = None,
        droppable: bool = False,
        durable: bool = False,
    ) -> None:
        try:
            agent_id = orjson.loads(frame)["payload"]["agent"]["agent_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        self._dirty(str(agent_id))

    def close(self, code: int, reason: str) -> None:
        pass

    def has_room(self) -> bool:
        return True


class Cluster:
    """One hub's part of a cluster (see the module's docstring): `join` before the
    router is made (the router takes it as its `ClusterPort`), then `run` beside the
    hub's other tasks, then `aclose`."""

    def __init__(
        self,
        servers: str,
        name: str,
        options: Mapping[str, Any] | None = None,
        *,
        replicas: int = 1,
        tasks_age: float = 3600.0,
    ) -> None:
        if not valid_hub_name(name):
            raise ClusterError(f"--hub-name {name!r}: use letters, digits, '_' and '-' only")
        self._urls = _urls(servers)
        self._options = dict(options or {})  # to nats.connect: sign-in and TLS
        self._replicas = replicas  # of the buckets it creates
        self._tasks_age = tasks_age  # the tasks bucket's `max_age`, if this hub makes it
        self.tasks = TaskRows(name)
        self._name = name
        self.incarnation = uuid.uuid4().hex
        self.commits: Commits | None = None
        self._router: Router | None = None
        self._flusher: Flusher | None = None
        self._link: NatsLink | None = None
        self._outgoing: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self._requests: set[tuple[str, str]] = set()  # (hub, kind) of outgoing requests
        self._flush_wanted = trio.Event()
        self._pending: dict[str, tuple[float, str, str, list[dict[str, Any]]]] = {}
        self._tokens = itertools.count()
        # The incarnation in the reply subject: a late reply to an earlier incarnation of
        # this name never meets a request of this one with the same token.
        self._reply_prefix = f"_INBOX.{name}.c.{self.incarnation[:12]}."
        self._dirty: set[str] = set()
        self._dirty_wanted = trio.Event()
        self._written: set[str] = set()  # the keys of this hub's agents in the bucket
        # Each key's last revision and hub, as the watch or a write of ours saw it: the
        # compare-and-set of the next write (a lease moves by compare-and-set only).
        self._revisions: dict[str, tuple[int, str, int]] = {}  # (revision, hub, epoch)
        self._forgotten: dict[str, str] = {}  # the janitor's deletes to make: agent -> hub
        self._directory_running = False  # `_write_loop` runs: `flush_writes` may wait
        self._batch_done = trio.Event()  # set (and replaced) after each batch
        self._batches_taken = 0  # batches of the directory begun (each takes `_dirty`)
        self._batches_over = 0  # and ended, written or failed
        self._heard: dict[str, float] = {}  # other hubs: when last heard from
        # Other hubs the router was told are not alive (it counts every other as alive).
        self._dead: set[str] = set()
        self._directory_loaded = trio.Event()
        self._rewatch = trio.Event()  # set when the link is back: the watch starts anew
        self._link_lost = False  # the link went down since the watch started
        self._seen: set[str] | None = None  # keys a new watch delivered, until it caught up
        self._claim_keeper: _Claim | None = None
        self.dropped = 0  # messages between hubs dropped: the link was behind or closed
        self._first_error: Exception | None = None  # the link's first (why a join failed)

    # ---------------------------------------------------------------------------------
    # ClusterPort

    @property
    def name(self) -> str:
        return self._name

    def send(self, hub: str, kind: str, body: dict[str, Any], *, request: bool) -> None:
        """Queue `body` for `hub` (the router's call: it never blocks). What one turn
        queues for one hub and kind leaves as one NATS message (`_flush`)."""
        key = (hub, kind)
        bodies = self._outgoing.get(key)
        if bodies is None:
            bodies = self._outgoing[key] = []
            if request:
                self._requests.add(key)
        bodies.append(body)
        self._flush_wanted.set()

    async def look_up(self, agent_id: str) -> None:
        """Read `agent_id`'s row from the agents bucket, and take it as the directory
        watch would have (up to `READ_TIMEOUT`): for a resume of an agent this hub does
        not know yet, the watch being a little behind the agent (it registered on
        another hub a moment ago). Nothing if the link is down, the key is not there, or
        the read fails; the watch then shows the row (or not) as usual. Cancellation
        reads nothing."""
        link = self._link
        if link is None or link.state is not LinkState.CONNECTED:
            return
        entry: tuple[str, bytes | None, int] | None = None
        with trio.move_on_after(READ_TIMEOUT):
            try:
                entry = await link.run(partial(_kv_get, AGENTS_BUCKET, agent_id))
            except Exception as exc:
                log.warning("cannot read the row of agent %s: %s", agent_id, exc)
        if entry is not None and entry[1] is not None:
            self._on_entry(entry)

    async def read_tasks(self, requester: str) -> list[Mapping[str, Any]] | None:
        """The tasks bucket's rows of the tasks `requester` asked for (None: unread)."""
        if self._link is None:
            return None
        return await self.tasks.read(self._link, requester)

    def forget(self, agent_id: str, hub: str) -> None:
        """Delete a dead hub's agent from the bucket if the row last seen still names
        `hub` (the router's janitor; see `ClusterPort.forget`)."""
        self._forgotten[agent_id] = hub
        self._dirty_wanted.set()

    # ---------------------------------------------------------------------------------
    # Start and end

    async def join(self) -> None:
        """Connect to NATS, check JetStream, make the buckets, claim the name. Raises
        `ClusterError` (and is closed) if any of it fails or takes over 10 s."""
        try:
            with trio.fail_after(_JOIN_TIMEOUT):
                await self._join()
        except trio.TooSlowError:
            await self.aclose()
            raise ClusterError(
                f"could not join the cluster at {', '.join(self._urls)} within {_JOIN_TIMEOUT:g}s"
            ) from None
        except BaseException:
            await self.aclose()
            raise

    async def _join(self) -> None:
        try:
            import nats  # noqa: F401  # only to say what is missing
        except ImportError:
            raise ClusterError(
                '--cluster needs nats-py: pip install "agentmesh-hub[cluster]"'
            ) from None
        try:
            self._link = await connect_link(
                self._urls,
                on_state=self._on_state,
                on_error=self._on_link_error,
                name=f"agentmesh-{self._name}",
                connect_timeout=2,
                # At the start, each URL twice, then give up (nats-py's -1 would try
                # for ever); once connected, reconnect for ever (`_reconnect_for_ever`).
                max_reconnect_attempts=1,
                reconnect_time_wait=0.25,
                inbox_prefix=f"_INBOX.{self._name}",
                **self._options,
            )
        except LinkError as exc:
            why = "" if self._first_error is None else f" (NATS said: {self._first_error})"
            raise ClusterError(f"{exc}{why}") from None
        link = self._link
        await link.run(_reconnect_for_ever)
        try:
            await link.run(_check_jetstream)
        except Exception:
            raise ClusterError(
                f"NATS at {', '.join(self._urls)} has no JetStream (start nats-server with -js)"
            ) from None
        try:
            make = partial(_make_buckets, replicas=self._replicas, tasks_age=self._tasks_age)
            await link.run(make)
        except Exception as exc:
            raise ClusterError(f"cannot make the cluster's KV buckets: {exc}") from None
        try:
            await self._claim()
        except (ClusterError, trio.Cancelled):
            raise
        except Exception as exc:
            raise ClusterError(f"cannot claim the hub name {self._name!r}: {exc}") from None

    async def _claim(self) -> None:
        """Claim the name in `agentmesh_hubs` (create its key), and keep it: the bucket
        forgets a key 3 s after its last write, and the claim is written again every
        second from the link's loop (`_Claim`), whatever the hub's own loop is doing.
        So a claim that exists is a live hub's, or one that died less than 3 s ago: a
        holder that answers a ping refuses this hub at once; else the key is tried again
        until it expires (its hub is dead: the name is taken over) or 4.5 s have passed
        (its hub lives but does not answer yet: refused)."""
        link = self._link
        assert link is not None
        name = self._name
        value = orjson.dumps(
            {"incarnation": self.incarnation, "started": time.time(), "hub": self._name}
        )
        claim = self._claim_keeper = _Claim(name, value)
        waited = False
        with trio.move_on_after(SILENT_AFTER + 1.5) as waiting:
            while not await link.run(claim.take):
                waited = True
                try:
                    await link.request(
                        f"{PREFIX}.to.{name}.{name}.{PING}", b"[]", timeout=_PING_TIMEOUT
                    )
                except (NoResponders, RequestTimeout):
                    await trio.sleep(_CLAIM_RETRY)  # until the key expires, if it does
                    continue
                raise ClusterError(
                    f"the hub name {name!r} is taken by a live hub of this cluster "
                    "(choose another --hub-name)"
                )
        if waiting.cancelled_caught:
            raise ClusterError(
                f"the hub name {name!r} is held by a hub that keeps its claim but does not "
                "answer (starting?); try again later or choose another --hub-name"
            )
        if waited:
            log.info("took over the hub name %r: the hub that held it is gone", name)

    async def run(
        self,
        router: Router,
        commits: Commits | None,
        flusher: Flusher | None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Carry the router's messages, presence and directory until cancelled; report
        to `nursery.start` once this hub's name answers and the directory was read.
        Cancelled: the hub says it leaves (presence), its agents' rows are written
        offline and its claim on the name is deleted, within a couple of seconds."""
        link = self._link
        assert link is not None
        self._router, self.commits, self._flusher = router, commits, flusher
        if commits is not None:
            commits.replicate = partial(self.replicate, link, router)
        router.events.watch(_AgentWatch(self._mark_dirty), tuple(_AGENT_KINDS), hidden=True)
        for agent in router.registry:
            if agent.hub is None:
                self._dirty.add(agent.agent_id)
        try:
            async with trio.open_nursery() as nursery:
                inbox = await link.subscribe(f"{PREFIX}.to.{self._name}.>", max_buffer=1024)
                replies = await link.subscribe(self._reply_prefix + "*", max_buffer=1024)
                presence = await link.subscribe(f"{PREFIX}.presence.*", max_buffer=256)
                broadcasts = await link.subscribe(f"{PREFIX}.{BROADCAST}.*", max_buffer=256)
                loads = await link.subscribe(f"{PREFIX}.load.*", max_buffer=256)
                await link.ready_for_requests()  # the tasks bucket's writes ask for acks
                nursery.start_soon(self._receive_loop, inbox)
                nursery.start_soon(self._reply_loop, replies)
                nursery.start_soon(self._presence_in, presence)
                nursery.start_soon(self._broadcast_loop, broadcasts)
                nursery.start_soon(self._load_in, loads)
                nursery.start_soon(self._load_out)
                nursery.start_soon(self._presence_out)
                nursery.start_soon(self._flush_loop)
                nursery.start_soon(self._write_loop)
                self._directory_running = True
                nursery.start_soon(self._watch_directory)
                with trio.fail_after(_JOIN_TIMEOUT):
                    await self._directory_loaded.wait()
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._directory_gone()
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 2.0):
                await self._leave()

    async def replicate(self, link: NatsLink, router: Router, changes: Changes) -> bool:
        """`Commits.replicate`: the batch's task rows to the tasks bucket (true if
        another commit should follow soon: see `TaskRows.write`); and if agents
        registered, meanwhile,
        their rows in the agents bucket (`flush_writes`), so that a `register` reply,
        held for this commit, goes out once its agent can resume on any hub. Each waits
        at most `WRITE_TIMEOUT`; with the link down, neither does."""
        if not changes.agents or not self._directory_running:
            return await self.tasks.write(link, router, changes)
        async with trio.open_nursery() as nursery:
            if link.state is LinkState.CONNECTED:
                nursery.start_soon(self._flush_awhile)
            return await self.tasks.write(link, router, changes)

    async def _flush_awhile(self) -> None:
        with trio.move_on_after(WRITE_TIMEOUT):
            await self.flush_writes()

    async def _leave(self) -> None:
        """Say this hub leaves, write its agents offline, drop its claim on the name."""
        link, router = self._link, self._router
        if link is None or router is None or link.state is not LinkState.CONNECTED:
            return
        try:
            link.publish_nowait(
                f"{PREFIX}.presence.{self._name}",
                orjson.dumps({"incarnation": self.incarnation, "leaving": True}),
            )
            rows = {}
            for agent in router.registry:
                if agent.hub is None:
                    row = agent_row(agent, self._name)
                    row["online"] = False
                    rows[agent.agent_id] = orjson.dumps(row)
            revisions = {k: v[0] for k, v in self._revisions.items() if k in rows}
            write = partial(_kv_write, name=self._name, puts=rows, deletes={}, revisions=revisions)
            await link.run(write)
            if self._claim_keeper is not None:
                await link.run(self._claim_keeper.drop)
            await link.flush(timeout=1.0)
        except Exception:  # LinkError, trio.WouldBlock, a KV error: the others find out
            log.warning("could not tell the cluster this hub leaves", exc_info=True)

    async def aclose(self) -> None:
        """Drop the claim on the name (if `run` did not) and close the link."""
        link = self._link
        if link is None:
            return
        if self._claim_keeper is not None and link.state is LinkState.CONNECTED:
            with trio.move_on_after(1.0):
                try:
                    await link.run(self._claim_keeper.drop)
                except Exception:  # the claim expires in 3 s anyway
                    log.debug("could not drop the claim on the hub name", exc_info=True)
        await link.aclose()

    # ---------------------------------------------------------------------------------
    # Messages between hubs

    def _publish(self, subject: str, data: bytes, reply: str | None = None) -> None:
        link = self._link
        if link is None:
            return
        try:
            link.publish_nowait(subject, data, reply=reply)
        except (trio.WouldBlock, LinkError):
            self.dropped += 1  # requests are re-sent by the router; progress is advisory

    async def _flush_loop(self) -> None:
        while True:
            await self._flush_wanted.wait()
            self._flush_wanted = trio.Event()
            self._flush()

    def _flush(self) -> None:
        """Send what was queued, one NATS message per hub and kind, or several when the
        bodies would make one larger than `_MAX_MESSAGE` (NATS refuses a message over
        its max_payload, 1 MiB by default)."""
        outgoing, self._outgoing = self._outgoing, {}
        requests, self._requests = self._requests, set()
        now = trio.current_time()
        for (hub, kind), bodies in outgoing.items():
            if hub == EVERY_HUB:  # a broadcast: every hub has it on one subject
                subject = f"{PREFIX}.{kind}.{self._name}"
            else:
                subject = f"{PREFIX}.to.{hub}.{self._name}.{kind}"
            for chunk, data in _chunks(bodies):
                if (hub, kind) in requests:
                    token = f"{next(self._tokens):x}"
                    self._pending[token] = (now, hub, kind, chunk)
                    self._publish(subject, data, reply=self._reply_prefix + token)
                else:
                    self._publish(subject, data)

    def _on_link_error(self, exc: Exception) -> None:
        """An error on the link's loop (a publish NATS refused, say): what it carried
        is lost, and requests are re-sent by the router."""
        self.dropped += 1
        if self._first_error is None:  # what NATS said first; later: resets, retries
            self._first_error = exc
        log.warning("NATS link: %s", exc)

    async def _receive_loop(self, inbox: trio.abc.ReceiveChannel[Message]) -> None:
        """Messages to this hub, each body to the router, their answers back as one."""
        router = self._router
        assert router is not None
        async for message in inbox:
            parts = message.subject.split(".")
            if len(parts) != 6:
                continue
            src, kind = parts[4], parts[5]
            if kind == PING:
                if message.reply:
                    self._publish(message.reply, orjson.dumps([{"hub": self._name}]))
                continue
            if src == self._name or kind not in KINDS:
                continue
            bodies = _bodies(src, message.data)
            if bodies is None:
                continue
            answers = _Answers(self, message.reply, len(bodies))
            flusher = self._flusher
            if flusher is not None:
                flusher.hold()
            try:
                for index, body in enumerate(bodies):
                    if isinstance(body, dict):
                        router.cluster_receive(src, kind, body, answers.slot(index))
            finally:
                if flusher is not None:
                    flusher.release(now=True)
            answers.finish()

    async def _broadcast_loop(self, broadcasts: trio.abc.ReceiveChannel[Message]) -> None:
        """Other hubs' broadcasts (`agentmesh.v1.broadcast.<src>`), each body to the
        router, which fans it out to this hub's agents. Unanswered."""
        router = self._router
        assert router is not None
        for_nobody = _Answers(self, None, 1)  # a broadcast is never answered
        async for message in broadcasts:
            src = message.subject.rpartition(".")[2]
            if src == self._name:
                continue
            bodies = _bodies(src, message.data)
            if bodies is None:
                continue
            flusher = self._flusher
            if flusher is not None:
                flusher.hold()
            try:
                for body in bodies:
                    if isinstance(body, dict):
                        router.cluster_receive(src, BROADCAST, body, for_nobody.slot(0))
            finally:
                if flusher is not None:
                    flusher.release(now=True)

    async def _reply_loop(self, replies: trio.abc.ReceiveChannel[Message]) -> None:
        """Answers to our requests: each to `Router.cluster_reply` with its body."""
        router = self._router
        assert router is not None
        prefix = len(self._reply_prefix)
        async for message in replies:
            sent = self._pending.pop(message.subject[prefix:], None)
            if sent is None:
                continue
            _, hub, kind, bodies = sent
            try:
                answers = orjson.loads(message.data)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(answers, list):
                continue
            flusher = self._flusher
            if flusher is not None:
                flusher.hold()
            try:
                for body, answer in zip(bodies, answers, strict=False):
                    if isinstance(answer, dict):
                        router.cluster_reply(hub, kind, body, answer)
            finally:
                if flusher is not None:
                    flusher.release(now=True)

    # ---------------------------------------------------------------------------------
    # Presence

    async def _presence_out(self) -> None:
        """Say this hub is alive every second; find the hubs silent for too long."""
        subject = f"{PREFIX}.presence.{self._name}"
        data = orjson.dumps({"incarnation": self.incarnation})
        router = self._router
        assert router is not None
        while True:
            self._publish(subject, data)
            now = trio.current_time()
            for hub, heard in list(self._heard.items()):
                if now - heard > SILENT_AFTER:
                    del self._heard[hub]
                    self._dead.add(hub)
                    log.info("hub %s is silent: its agents count as offline", hub)
                    router.hub_presence(hub, alive=False)
            for token, (sent, *_) in list(self._pending.items()):
                if now - sent > _REQUEST_KEPT:
                    del self._pending[token]
            await trio.sleep(PRESENCE_EVERY)

    async def _load_out(self) -> None:
        """Every `LOAD_EVERY`, the counts of tasks in flight of this hub's agents that
        changed (every one, each `LOAD_ALL_EVERY`), on `agentmesh.v1.load.<me>`: other
        hubs count them in selection (`Router.remote_load`). At most once, as presence."""
        subject = f"{PREFIX}.load.{self._name}"
        router = self._router
        assert router is not None
        sent: dict[str, int] = {}
        every = round(LOAD_ALL_EVERY / LOAD_EVERY)
        for turn in itertools.count():
            loads = router.local_load()
            if turn % every:
                changed = {k: v for k, v in loads.items() if sent.get(k) != v}
            else:
                changed = loads
            sent = loads
            for chunk in _load_chunks(changed):
                self._publish(subject, chunk)
            await trio.sleep(LOAD_EVERY)

    async def _load_in(self, loads: trio.abc.ReceiveChannel[Message]) -> None:
        router = self._router
        assert router is not None
        async for message in loads:
            src = message.subject.rpartition(".")[2]
            if src == self._name:
                continue
            try:
                counts = orjson.loads(message.data)
            except orjson.JSONDecodeError:
                continue
            router.remote_load(src, counts)

    async def _presence_in(self, presence: trio.abc.ReceiveChannel[Message]) -> None:
        router = self._router
        assert router is not None
        async for message in presence:
            hub = message.subject.rpartition(".")[2]
            if hub == self._name:
                continue
            try:
                leaving = bool(orjson.loads(message.data).get("leaving"))
            except (orjson.JSONDecodeError, AttributeError):
                continue
            if leaving:
                log.info("hub %s left: its agents count as offline", hub)
                self._heard.pop(hub, None)
                self._dead.add(hub)
                router.hub_presence(hub, alive=False)
                continue
            self._heard[hub] = trio.current_time()
            if hub in self._dead:
                self._dead.discard(hub)
                log.info("hub %s is back", hub)
                router.hub_presence(hub, alive=True)

    def _on_state(self, state: LinkState) -> None:
        router = self._router
        if router is None:
            return
        router.link(state is LinkState.CONNECTED)
        if state is not LinkState.CONNECTED:
            self._link_lost = True
            self.tasks.link_breaks += 1
        elif self._link_lost:  # back: what KV may have missed meanwhile
            self._link_lost = False
            for agent in router.registry:
                if agent.hub is None:
                    self._mark_dirty(agent.agent_id)
            # A NATS that restarted has lost the watch's consumer, and nats-py does not
            # say so: watch again (the new watch reads the whole bucket).
            self._rewatch.set()
            if self.tasks.pending and self.commits is not None:
                self.commits.wake()  # the task rows not yet written, with the next commit

    # ---------------------------------------------------------------------------------
    # The directory

    def _mark_dirty(self, agent_id: str) -> None:
        self._dirty.add(agent_id)
        self._dirty_wanted.set()

    async def _write_loop(self) -> None:
        """Write the rows of this hub's agents that changed, or delete them (the agent
        is gone), and make the janitor's deletes, one batch at a time; a failed batch is
        tried again later. Every write is a compare-and-set on the revision last seen
        (`_kv_write`): one that finds the agent taken by another hub hands that row to
        `Router.lease_lost`."""
        router, link = self._router, self._link
        assert router is not None
        assert link is not None
        self._dirty_wanted.set()  # the agents read back from the store, if any
        while True:
            await self._dirty_wanted.wait()
            self._dirty_wanted = trio.Event()
            dirty, self._dirty = self._dirty, set()
            forgotten, self._forgotten = self._forgotten, {}
            self._batches_taken += 1
            puts: dict[str, bytes] = {}
            deletes: dict[str, int] = {}  # this hub's rows, at their revisions
            for agent_id in dirty:
                agent = router.registry.get(agent_id)
                seen = self._revisions.get(agent_id)
                if agent is not None and agent.hub is None:
                    if seen is not None and seen[1] != self._name and seen[2] >= agent.epoch:
                        continue  # another hub's lease, as new as ours: never written over
                    puts[agent_id] = orjson.dumps(agent_row(agent, self._name))
                elif agent is None and agent_id in self._written:
                    if seen is None or seen[1] == self._name:  # gone: its row, if ours
                        deletes[agent_id] = 0 if seen is None else seen[0]  # 0: unknown
                elif agent is not None:  # held by another hub now: its row is not ours
                    self._written.discard(agent_id)
            forgets = {  # at the revision that named the dead hub, or not at all
                agent_id: seen[0]
                for agent_id, hub in forgotten.items()
                if (seen := self._revisions.get(agent_id)) is not None and seen[1] == hub
            }
            if not puts and not deletes and not forgets:
                self._batch_over()
                continue
            write = partial(
                _kv_write,
                name=self._name,
                puts=puts,
                deletes=deletes,
                forgets=forgets,
                revisions={k: v[0] for k in puts if (v := self._revisions.get(k)) is not None},
            )
            try:
                done = await link.run(write)
            except Exception as exc:
                self._batch_over()
                log.warning("cannot write the agents' directory (trying again): %s", exc)
                self._written |= puts.keys()  # some may have landed: deleted if they go
                self._dirty |= dirty
                await trio.sleep(_WRITE_RETRY)
                self._dirty_wanted.set()
                continue
            for key, (revision, taken) in done.items():
                if taken is not None:  # another hub holds the agent now
                    self._seen_row(key, revision, taken)
                    router.lease_lost(taken)
                elif revision:
                    agent = router.registry.get(key)
                    self._revisions[key] = (revision, self._name, agent.epoch if agent else 0)
                elif key not in forgets:
                    self._revisions.pop(key, None)
            self._written |= puts.keys()
            self._written.difference_update(deletes)
            self._batch_over()

    def _directory_gone(self) -> None:
        """`_write_loop` ended (the hub is stopping): nothing waits for it any more."""
        self._directory_running = False
        self._batch_done.set()

    def _batch_over(self) -> None:
        self._batches_over += 1
        self._batch_done.set()
        self._batch_done = trio.Event()

    async def flush_writes(self) -> None:
        """Wait until the rows that changed before the call are written (or their
        batch failed once: it is tried again later), or the directory's loop is gone
        (`run` ended: the hub is stopping)."""
        target = self._batches_taken + (1 if self._dirty or self._forgotten else 0)
        # Not later batches (agents may keep coming); not at all once the loop is gone.
        while self._batches_over < target and self._directory_running:
            await self._batch_done.wait()

    def _seen_row(self, key: str, revision: int, row: dict[str, Any]) -> None:
        epoch = row.get("epoch")
        self._revisions[key] = (revision, str(row.get("hub")), epoch if type(epoch) is int else 0)

    async def _watch_directory(self) -> None:
        """Feed the agents bucket, as it changes, to `Router.directory`."""
        link = self._link
        assert link is not None
        token = trio.lowlevel.current_trio_token()

        def hand(entry: tuple[str, bytes | None, int] | None) -> None:
            try:
                token.run_sync_soon(self._on_entry, entry)
            except trio.RunFinishedError:
                pass

        while True:
            self._rewatch = trio.Event()
            self._seen = set()
            async with trio.open_nursery() as nursery:

                async def watch(scope: trio.CancelScope = nursery.cancel_scope) -> None:
                    try:
                        await link.run(lambda nc: _watch(nc, hand))
                    except Exception as exc:  # a new watch reads the whole bucket again
                        if isinstance(exc, LinkClosed):
                            raise
                        log.warning("the directory watch failed (watching again): %s", exc)
                        await trio.sleep(_WRITE_RETRY)
                    scope.cancel()

                nursery.start_soon(watch)
                await self._rewatch.wait()
                nursery.cancel_scope.cancel()

    def _on_entry(self, entry: tuple[str, bytes | None, int] | None) -> None:
        router = self._router
        if router is None:
            return
        if entry is None:  # caught up: what the bucket no longer holds is gone
            seen, self._seen = self._seen, None
            if seen is not None and self._directory_loaded.is_set():
                gone = [a.agent_id for a in router.registry if a.hub and a.agent_id not in seen]
                if gone:
                    router.directory((), gone=gone)
            self._directory_loaded.set()
            return
        key, value, revision = entry
        if self._seen is not None:
            self._seen.add(key)
        if value is None:
            self._revisions.pop(key, None)
            mine = router.registry.get(key)
            if mine is not None and mine.hub is None:  # a janitor took us for dead:
                self._mark_dirty(key)  # the row is written again (a create)
            router.directory((), gone=(key,))
            return
        try:
            row = orjson.loads(value)
        except orjson.JSONDecodeError:
            log.warning("not a directory row in %s: %r", AGENTS_BUCKET, key)
            return
        if not isinstance(row, dict):
            return
        hub = row.get("hub")
        known = self._revisions.get(key)
        if known is None or known[0] < revision:
            self._seen_row(key, revision, row)
        mine = router.registry.get(key)
        epoch = row.get("epoch")
        if (
            mine is not None
            and mine.hub is None
            and hub != self._name
            and type(epoch) is int
            and epoch >= mine.epoch
        ):
            # Another hub's row at our epoch or a newer one: it took the agent (a row
            # that lost a race to ours is never written, so this one won).
            router.lease_lost(row)
            return
        if (
            isinstance(hub, str)
            and hub != self._name
            and hub not in self._heard
            and hub not in self._dead
        ):
            self._heard[hub] = trio.current_time()  # silent 3 s from now: not alive
        router.directory((row,))


def _bodies(src: str, data: bytes) -> list[Any] | None:
    """The bodies a message between hubs carries (a JSON array, or one object), or
    None (logged) if it is not JSON."""
    try:
        bodies = orjson.loads(data)
    except orjson.JSONDecodeError:
        log.warning("a message from hub %s that is not JSON", src)
        return None
    if isinstance(bodies, dict):
        return [bodies]
    return bodies if isinstance(bodies, list) else None


def _load_chunks(counts: dict[str, int]) -> list[bytes]:
    """`counts` as JSON objects of at most `_MAX_MESSAGE` bytes each (none if empty)."""
    if not counts:
        return []
    data = orjson.dumps(counts)
    if len(data) <= _MAX_MESSAGE:
        return [data]
    items = list(counts.items())
    half = len(items) // 2
    return _load_chunks(dict(items[:half])) + _load_chunks(dict(items[half:]))


def _chunks(bodies: list[dict[str, Any]]) -> list[tuple[list[dict[str, Any]], bytes]]:
    """`bodies` as JSON arrays of at most `_MAX_MESSAGE` bytes each (a body larger than
    that alone), with the bodies each holds."""
    data = orjson.dumps(bodies)
    if len(data) <= _MAX_MESSAGE:
        return [(bodies, data)]
    out: list[tuple[list[dict[str, Any]], bytes]] = []
    chunk: list[dict[str, Any]] = []
    parts: list[bytes] = []
    size = 2
    for body in bodies:
        part = orjson.dumps(body)
        if parts and size + len(part) + 1 > _MAX_MESSAGE:
            out.append((chunk, b"[" + b",".join(parts) + b"]"))
            chunk, parts, size = [], [], 2
        chunk.append(body)
        parts.append(part)
        size += len(part) + 1
    out.append((chunk, b"[" + b",".join(parts) + b"]"))
    return out


# -------------------------------------------------------------------------------------
# On the link's asyncio loop (through `NatsLink.run`)


async def _reconnect_for_ever(nc: Client) -> None:
    """Once connected, a hub rides out any NATS outage: nats-py reads these options
    at each reconnect."""
    nc.options["max_reconnect_attempts"] = -1
    nc.options["reconnect_time_wait"] = 2.0


async def _check_jetstream(nc: Client) -> None:
    await nc.jetstream().account_info()


async def _make_buckets(nc: Client, replicas: int = 1, tasks_age: float = 3600.0) -> None:
    """Create the cluster's buckets that are missing (with `replicas` copies; the ones
    there are taken as they are). The tasks bucket forgets a row `tasks_age` after its
    last write: by then no hub owes anyone anything of that task."""
    from nats.js.errors import BucketNotFoundError

    js = nc.jetstream()
    buckets = ((AGENTS_BUCKET, None), (HUBS_BUCKET, SILENT_AFTER), (TASKS_BUCKET, tasks_age))
    for bucket, ttl in buckets:
        try:
            await js.key_value(bucket)
        except BucketNotFoundError:
            await js.create_key_value(bucket=bucket, history=1, ttl=ttl, replicas=replicas)


class _Claim:
    """This hub's claim on its name, kept on the link's loop: `take` creates the key,
    then a task writes it again every second (compare-and-set on the revision it wrote
    last), so that the bucket's 3 s `max_age` never expires it while the hub lives;
    `drop` stops that and deletes the key. A claim found taken by another hub (this one
    was cut off for over 3 s) is logged and no longer written."""

    def __init__(self, name: str, value: bytes) -> None:
        self.name, self.value = name, value
        self.revision = 0
        self._task: Any = None

    async def take(self, nc: Client) -> bool:
        import asyncio

        from nats.js.errors import KeyWrongLastSequenceError

        kv = await nc.jetstream().key_value(HUBS_BUCKET)
        try:
            self.revision = int(await kv.create(self.name, self.value))
        except KeyWrongLastSequenceError:
            return False
        self._task = asyncio.get_running_loop().create_task(self._keep(kv))
        return True

    async def _keep(self, kv: Any) -> None:
        import asyncio

        while True:
            await asyncio.sleep(CLAIM_REFRESH)
            try:
                if not await self._renew(kv):
                    log.error("hub name %r was taken over by another hub meanwhile", self.name)
                    return
            except Exception as exc:  # NATS unreachable for now: next time
                log.debug("cannot renew the claim on hub name %r: %s", self.name, exc)

    async def _renew(self, kv: Any) -> bool:
        """Write the claim again; False if another hub holds the name now. A revision
        that does not match (the last write's outcome was unknown: applied, its ack
        lost; or the key expired while this hub was cut off) is settled by reading the
        key: still this claim, or none, and the claim goes on."""
        from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

        try:
            self.revision = int(await kv.update(self.name, self.value, last=self.revision))
            return True
        except KeyWrongLastSequenceError:
            pass
        try:
            entry = await kv.get(self.name)
        except KeyNotFoundError:  # expired (or deleted): take it again, if still free
            try:
                self.revision = int(await kv.create(self.name, self.value))
                return True
            except KeyWrongLastSequenceError:
                entry = await kv.get(self.name)  # taken meanwhile: by whom?
        if entry.value != self.value:
            return False
        self.revision = int(entry.revision)
        return True

    async def drop(self, nc: Client) -> None:
        from nats.js.errors import KeyWrongLastSequenceError

        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        kv = await nc.jetstream().key_value(HUBS_BUCKET)
        try:
            await kv.delete(self.name, last=self.revision)
        except KeyWrongLastSequenceError:
            pass  # another hub holds it now: not ours to delete


async def _kv_write(
    nc: Client,
    *,
    name: str,
    puts: dict[str, bytes],
    deletes: Mapping[str, int],
    forgets: Mapping[str, int] | None = None,
    revisions: Mapping[str, int] | None = None,
) -> dict[str, tuple[int, dict[str, Any] | None]]:
    """Write this hub's rows (`puts`, each at the revision last seen in `revisions`;
    none: a create), delete its own (`deletes`) and a dead hub's (`forgets`), each at
    the revision that named that hub, all at once: every write a compare-and-set.
    Returns, for each key: its new revision (0: deleted, or left alone) and, for a row
    that another hub now holds (at this row's epoch or a newer one), that row. A write
    whose revision is stale is settled by reading the key: a row that names this hub
    (an answer lost, or a watch behind), or an older lease than this one, is written
    over at its revision; a key deleted meanwhile (by a janitor, while this hub was cut
    off) is created again. A delete whose revision is stale leaves the key alone, unless
    it still names this hub."""
    import asyncio

    from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError

    kv = await nc.jetstream().key_value(AGENTS_BUCKET)
    known = revisions or {}

    async def current(key: str) -> tuple[int, dict[str, Any] | None]:
        """The key's revision and row now; (0, None) if it has none."""
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            return 0, None
        try:
            row = orjson.loads(entry.value or b"")
        except orjson.JSONDecodeError:
            row = None
        return entry.revision or 0, row if isinstance(row, dict) else None

    async def put(key: str, value: bytes) -> tuple[int, dict[str, Any] | None]:
        last, epoch = known.get(key), orjson.loads(value)["epoch"]
        for _ in range(3):  # a key may change between the read and the write: again
            try:
                if last is None:
                    return await kv.create(key, value), None
                return await kv.update(key, value, last=last), None
            except KeyWrongLastSequenceError:
                revision, row = await current(key)
                if row is not None and row.get("hub") != name:
                    theirs = row.get("epoch")
                    if type(theirs) is not int or theirs >= epoch:
                        return revision, row  # taken by another hub
                last = revision or None  # ours, or an older lease than ours: ours now
        raise KeyWrongLastSequenceError(description=f"{key}: changing under every write")

    async def delete(key: str, last: int, own: bool) -> tuple[int, None]:
        if not last:  # a revision not known (a write whose answer was lost): read it
            revision, row = await current(key)
            if not (own and row is not None and row.get("hub") == name):
                return 0, None
            last = revision
        for _ in range(2):
            try:
                await kv.delete(key, last=last)
                return 0, None
            except (KeyWrongLastSequenceError, BadRequestError) as exc:
                # kv.delete passes the server's "wrong last sequence" on as it is
                if not isinstance(exc, KeyWrongLastSequenceError) and exc.err_code != 10071:
                    raise
            revision, row = await current(key)
            if not (own and row is not None and row.get("hub") == name):
                return 0, None  # another hub's now (or gone): left alone
            last = revision
        return 0, None

    forgets = forgets or {}
    keys = [*puts, *deletes, *forgets]
    done = await asyncio.gather(
        *(put(key, value) for key, value in puts.items()),
        *(delete(key, last, True) for key, last in deletes.items()),
        *(delete(key, last, False) for key, last in forgets.items()),
        return_exceptions=True,  # all of them over before the batch counts as failed
    )
    for outcome in done:
        if isinstance(outcome, BaseException):
            raise outcome
    return dict(zip(keys, cast("list[tuple[int, dict[str, Any] | None]]", done), strict=True))


async def _kv_get(bucket: str, key: str, nc: Client) -> tuple[str, bytes | None, int] | None:
    """`key`'s entry in `bucket` as the watch hands it (key, value, revision), or None if
    the bucket has no such key (or only its delete)."""
    from nats.js.errors import KeyDeletedError, KeyNotFoundError

    try:
        entry = await (await nc.jetstream().key_value(bucket)).get(key)
    except (KeyNotFoundError, KeyDeletedError):
        return None
    return key, entry.value or b"", entry.revision or 0


async def _watch(nc: Client, hand: Callable[[tuple[str, bytes | None, int] | None], None]) -> None:
    """Hand every entry of the agents bucket to `hand` (None once the entries there at
    the start were all handed), then every change, until cancelled."""
    kv = await nc.jetstream().key_value(AGENTS_BUCKET)
    watcher = await kv.watchall()
    try:
        async for entry in watcher:
            if entry is None:
                hand(None)
            elif entry.operation in ("DEL", "PURGE"):
                hand((entry.key, None, entry.revision or 0))
            else:
                hand((entry.key, entry.value or b"", entry.revision or 0))
    finally:
        try:
            await cast(Any, watcher).stop()  # untyped in nats-py
        except Exception:
            pass
