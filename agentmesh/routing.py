"""The hub's decisions: who a frame goes to, what a task does next. Pure: no trio, no I/O.

The Trio layer (hub.py) owns sockets and time. It tells the `Router` what happened
(`connected`, `receive`, `disconnected`, `fire_timers`, `cleanup`) and the router answers
by calling `Peer.send` (which never blocks) and `Peer.close`, and by asking to be woken at
its next deadline through the `wake` callback. Every routing rule lives here, in one
place, so a remote route can later sit beside the local one.
"""

from __future__ import annotations

import itertools
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

import attrs
import orjson

from . import protocol as p
from ._dispatch import TO_AGENT, DispatchQueues
from ._events import Events, agent_view, task_info, task_view
from ._journal import Journal
from ._limits import ConnectionLimits
from ._logs import LogLimiter
from ._remote import STUB_GRACE, ClusterPort, RemoteState
from ._remote_route import RemoteRoute
from ._timers import Timers
from ._version import __version__
from .config import HubConfig
from .lifecycle import (
    IN_PROGRESS,
    PENDING,
    STATES,
    IllegalTransition,
    TaskEvent,
    TaskRecord,
    TaskTable,
)
from .metrics import Metrics
from .registry import AgentRecord, Registry, token_hash
from .store import Changes, Snapshot

__all__ = ["CANCEL_TAG", "CLOSE_REPLACED", "HUB", "Peer", "Router", "TaskTracer"]

log = logging.getLogger("agentmesh.hub")

HUB = "hub"  # the `from` of frames the hub itself originates
CANCEL_TAG = "cancel:"  # `outcome_of` of a cancel frame to an assignee: "cancel:<task ID>"
CLOSE_REPLACED = p.CLOSE_REPLACED  # the same agent resumed on a newer connection (or hub)
MT = p.MessageType
EC = p.ErrorCode

# Frames a connection may send before it registers.
_OPEN_TO_ALL = frozenset(
    {MT.REGISTER, MT.HEARTBEAT, MT.DISCOVER, MT.STATUS, MT.LIST_TASKS, MT.WATCH, MT.UNWATCH}
)
_LIST_LIMIT = 1000  # entries of one list_tasks or discover reply at most
_MAX_TAGS, _MAX_TAG = 32, 64  # tags of one agent, characters of one
_REPLY_FRAME = 256  # bytes of a reply's envelope and cursor, besides the request's id
_DONE = object()  # the end of a backlog
_EVENT_KINDS = frozenset(p.EVENT_KINDS)
# Frames whose payload the hub passes on to another agent.
_FORWARDED = frozenset({MT.RESULT, MT.BROADCAST, MT.PROGRESS, MT.DELEGATE})


class Peer(Protocol):
    """What the router needs of one client connection."""

    def send(
        self,
        frame: str,
        *,
        outcome_of: str | None = None,
        droppable: bool = False,
        durable: bool = False,
    ) -> None:
        """Queue `frame` without waiting. `outcome_of` names the task whose end it reports
        (or, as `CANCEL_TAG + task ID`, a cancel owed to the task's assignee), so that the
        Trio layer can hand back the frames of this kind that never left (`disconnected`)
        and say which were written (`delivered`).
        A `droppable` frame (progress, broadcast) may be dropped when the peer is behind,
        rather than counting against it as a slow consumer. A `durable` frame reports a
        change of state (a task taken on, delivered, ended; an identity made): with a
        durable store it leaves only once the change is committed, and the frames queued
        after it to the same peer wait behind it.
        """

    def close(self, code: int, reason: str) -> None:
        """Close the connection soon, with this WebSocket close code."""

    def has_room(self) -> bool:
        """Whether more frames may be queued without crowding the peer (its outbox is at
        most half full). If not, the Trio layer calls `Router.drained(peer)` once there is
        room again: a backlog (the catch-up after a resume) goes out at the peer's pace."""


class TaskTracer(Protocol):
    """What the router tells a tracer (the hub's OpenTelemetry spans: `_tracing`), only
    when it has one. Both calls are made while routing: they must not block."""

    def started(self, record: TaskRecord) -> tuple[str, str | None] | None:
        """A task was accepted (its delegate's trace context is the record's): return
        the trace context (traceparent, tracestate) to send its assignee instead of the
        delegate's, or None to send the delegate's."""

    def ended(self, record: TaskRecord) -> None:
        """The task reached its final state (`record.state`). Also called for tasks
        `started` never saw (restored from a store after a restart)."""


class Router(RemoteRoute):
    """Agents, tasks, and every rule about them, driven by the hub's Trio layer.

    `clock` is monotonic (the hub passes `trio.current_time`), `wall` is UNIX time for
    the timestamps people read. `wake(t)` is called whenever the earliest deadline
    becomes `t`, so the caller can call `fire_timers` then.

    With a `journal` (a durable store), every change to agents and tasks is marked
    there, and `take_changes` turns the marks into rows; `restore` fills a new router
    from a store's `Snapshot`. While `store_error` is set (the store fails), new work
    (a delegate, a fresh identity) is refused with `store_unavailable`.

    With a `tracer`, every task is reported to it as it starts and ends (see
    `TaskTracer`); without one, trace context is only carried.

    With a `cluster` port, the router is one hub of a cluster (docs/cluster.md): agents
    of other hubs come from `directory`, a task given to one of them goes to its hub
    (`cluster_receive` and `cluster_reply` carry the messages between hubs), and this
    hub decides only the tasks it owns. Without one, nothing of that exists.
    """

    # The remote route's state, set (as the last instance attribute) only with a cluster
    # port. Not one more attribute for every router: CPython 3.11 specialises attribute
    # access (`self.x`) only for instances with at most 29 attributes, and a router has
    # 29; one more makes every delegation about 2% slower (callgrind).
    _remote: RemoteState | None = None

    def __init__(
        self,
        config: HubConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        wake: Callable[[float], None] = lambda _: None,
        journal: Journal | None = None,
        tracer: TaskTracer | None = None,
        cluster: ClusterPort | None = None,
    ) -> None:
        self.config = config or HubConfig()
        self.journal = journal
        self._tracer = tracer
        self._quiet = LogLimiter(log, clock=clock)
        self.store_error: str | None = None
        self.registry = Registry(journal)
        # Age is enforced by `cleanup`, in bites; count and bytes at every finish.
        self.tasks = TaskTable(
            max_retained_tasks=self.config.max_retained_tasks,
            max_retained_bytes=self.config.max_retained_bytes,
            journal=journal,
        )
        self.counters: dict[str, int] = dict.fromkeys(
            (
                "frames_in",
                "frames_out",
                "errors",
                "delegated",
                "completed",
                "failed",
                "timeout",
                "cancelled",
                "broadcasts",
            ),
            0,
        )
        self.metrics = Metrics()  # what an operator scrapes: O(1) per event
        # What an operator watches (`watch`, the dashboard): built only while watched.
        self.events = Events(
            wall=wall, frame=lambda event: self._frame(MT.EVENT, event), advise=self._advise
        )
        self._clock = clock
        self._wall = wall
        self._wake = wake
        self._started = clock()
        self._ids = itertools.count(1)
        self._agent_of: dict[Peer, str] = {}
        self._peer_of: dict[str, Peer] = {}
        self._replaced: dict[Peer, str] = {}  # connections superseded by a resume
        self._admins: set[Peer] = set()
        self._v2: set[Peer] = set()  # connections that speak protocol version 2
        self.limits = ConnectionLimits(self.config, clock)
        self._rate_limited_on = self.config.rate_limit is not None
        self._open_requests: dict[str, int] = {}  # unfinished tasks by requester
        # A forwarded frame gains an envelope; leave room so it still fits the limit.
        self._forward_limit = max(self.config.max_frame_size - 1024, 0)
        self.timers = Timers(self._pending)
        self.queue = DispatchQueues(self.config.max_queued)  # tasks waiting for a free agent
        self._filling = False  # in `_fill`
        self._backlogs: dict[Peer, Iterator[None]] = {}  # catch-ups waiting for room
        self._handlers: dict[p.MessageType, Callable[[Peer, str | None, p.Envelope], None]] = {
            MT.REGISTER: self._on_register,
            MT.DEREGISTER: self._on_deregister,
            MT.DISCOVER: self._on_discover,
            MT.DELEGATE: self._on_delegate,
            MT.RESULT: self._on_result,
            MT.STATUS: self._on_status,
            MT.BROADCAST: self._on_broadcast,
            MT.HEARTBEAT: self._on_heartbeat,
            MT.CANCEL: self._on_cancel,
            MT.PROGRESS: self._on_progress,
            MT.LIST_TASKS: self._on_list_tasks,
            MT.WATCH: self._on_watch,
            MT.UNWATCH: self._on_unwatch,
        }
        if cluster is not None:  # last, and only then: see `_remote`
            self._remote = RemoteState(port=cluster, name=cluster.name)

    # ---------------------------------------------------------------------------------
    # What the Trio layer calls

    def connected(self, peer: Peer, *, admin: bool = False, protocol: int = 1) -> None:
        """A new connection; it must register before most requests. An `admin` connection
        (it presented an admin token) may read and cancel every task. It speaks
        `protocol` (from its handshake): version 1 peers never get a field version 2
        added (they may decode strictly)."""
        if admin:
            self._admins.add(peer)
        if protocol >= 2:
            self._v2.add(peer)

    def receive(self, peer: Peer, frame: str | bytes) -> None:
        """Handle one frame from `peer`. Never raises: bad frames get an error frame."""
        self.counters["frames_in"] += 1
        # Every frame, well-formed or not, spends from the connection's rate budget.
        limited = self._rate_limited_on and not self.limits.frame(peer)
        try:
            envelope = p.decode_from_client(frame)
        except p.ProtocolError as exc:
            if limited:
                self._rate_limited(peer, exc.in_reply_to)
            else:
                self._error(peer, exc.in_reply_to, exc.code, exc.message, exc.details)
            return
        if limited:
            self._rate_limited(peer, envelope.id)
            return
        if envelope.size > self._forward_limit and envelope.type in _FORWARDED:
            self._error(
                peer,
                envelope.id,
                EC.TOO_LARGE,
                f"a {envelope.type.value} this large could not be forwarded within the "
                f"{self.config.max_frame_size}-character frame limit",
            )
            return
        me = self._agent_of.get(peer)
        if me is None and envelope.type not in _OPEN_TO_ALL:
            self._error(
                peer,
                envelope.id,
                EC.NOT_REGISTERED,
                f"register before sending {envelope.type.value}",
            )
            return
        try:
            self._handlers[envelope.type](peer, me, envelope)
        except p.ProtocolError as exc:
            self._error(peer, envelope.id, exc.code, exc.message, exc.details)
        except Exception:
            log.exception("internal error handling %s from %s", envelope.type.value, me)
            self._error(peer, envelope.id, EC.INTERNAL, "internal hub error; the hub logged it")

    def _rate_limited(self, peer: Peer, in_reply_to: str | None) -> None:
        self._error(peer, in_reply_to, EC.RATE_LIMITED, self.limits.rate_error())

    def disconnected(self, peer: Peer, unsent_outcomes: Iterable[str] = ()) -> None:
        """`peer` is gone. Its agent waits `resume_grace` to resume before it is dropped.

        `unsent_outcomes` are task IDs whose outcome frames never left; they will be sent
        again when the requester resumes.
        """
        # Outcomes that never left are owed again: now, if the requester is back on
        # another connection (this one was replaced), else when it resumes.
        self._admins.discard(peer)
        self._v2.discard(peer)
        self.limits.forget(peer)
        self._backlogs.pop(peer, None)
        self.events.unwatch(peer)
        replaced = self._replaced.pop(peer, None)
        agent_id = self._agent_of.pop(peer, None)
        if agent_id is not None:
            self._peer_of.pop(agent_id, None)
        for task_id in unsent_outcomes:
            if task_id.startswith(CANCEL_TAG):  # still owed (`owed_cancel`): sent again now
                record = self.tasks.get(task_id[len(CANCEL_TAG) :])  # if the assignee is
                if record is not None:  # back on another connection, else when it resumes
                    self._tell_assignee(record)
                continue
            self.tasks.release(task_id)
            record = self.tasks.get(task_id)
            if record is not None and record.requester in (agent_id, replaced):
                record.notified = False
                self._notify(record)
                self.tasks.update(record)
        agent = self.registry.get(agent_id) if agent_id is not None else None
        if agent is not None:
            agent.online = False
            agent.resume_by = self._clock() + self.config.resume_grace
            self._schedule(agent.resume_by, "grace", agent.agent_id)
            log.info("agent %s (%s) disconnected; may resume", agent.agent_id, agent.name)
            if self.events.active:
                body = {"agent": agent_view(agent)}
                self.events.emit("agent_offline", body, hidden=agent.hidden)

    def catching_up(self, peer: Peer) -> bool:
        """Whether `peer` has a catch-up still to be sent (the Trio layer reads its next
        frame only after, so that a reply marks the end of the catch-up)."""
        return peer in self._backlogs

    def delivered(self, task_ids: Iterable[str]) -> None:
        """The outcome frames of these tasks were written whole to their requesters (and
        the cancels tagged `CANCEL_TAG + task ID`, to their assignees)."""
        release = self.tasks.release
        for task_id in task_ids:
            if task_id.startswith(CANCEL_TAG):
                record = self.tasks.get(task_id[len(CANCEL_TAG) :])
                if record is not None and record.owed_cancel is not None:
                    record.owed_cancel = None  # heard: no longer owed
                    self.tasks.update(record)
                continue
            release(task_id, written=True)

    def drained(self, peer: Peer) -> None:
        """`peer` has room again (see `Peer.has_room`): send it more of its backlog, then
        of the tasks waiting for it (`_fill`)."""
        backlog = self._backlogs.get(peer)
        if backlog is not None:
            self._pump(peer, backlog)
        if self.queue and peer not in self._backlogs:
            agent_id = self._agent_of.get(peer)
            agent = self.registry.get(agent_id) if agent_id is not None else None
            if agent is not None:
                self._fill(agent)

    def _pump(self, peer: Peer, backlog: Iterator[None]) -> None:
        """Advance `backlog` (each step queues a frame or so) while `peer` has room."""
        while peer.has_room():
            if next(backlog, _DONE) is _DONE:
                self._backlogs.pop(peer, None)
                return
        self._backlogs[peer] = backlog

    def connection_of(self, agent_id: str) -> Peer | None:
        """The open connection of `agent_id`, if it is online."""
        return self._peer_of.get(agent_id)

    def next_deadline(self) -> float:
        return self.timers.next_deadline()

    def fire_timers(self) -> None:
        """Act on every deadline that has passed: task TTLs and resume grace periods."""
        now = self._clock()
        for kind, key in self.timers.due(now):
            if kind == "ttl":
                record = self.tasks.unfinished(key)
                # (A task that became a stub, its requester gone to another hub, has
                # the `stub` timer of its own.)
                if record is not None and record.deadline <= now and record.owner is None:
                    self._finish(
                        record,
                        TaskEvent.EXPIRE,
                        error=f"task timed out after {record.ttl:g}s",
                        tell_assignee="timeout",
                    )
            elif kind == "grace":
                agent = self.registry.get(key)
                # Only the timer of the current absence counts, not one from an earlier one.
                if agent is not None and agent.resume_by is not None and agent.resume_by <= now:
                    self._drop_agent(
                        agent,
                        f"agent {key} disconnected and did not resume within "
                        f"{self.config.resume_grace:g}s",
                    )
            elif kind == "retry":
                self._retry(key)
            elif kind == "stub":
                self._stub_expired(key, now)
            elif kind == "janitor":
                self._janitor(key, now)
            elif kind == "orphan":
                self._orphan_expired(key)
            elif kind == "moved":
                self._rs().handed.pop(key, None)
                self._rs().adopted.pop(key, None)
            elif kind == "fence":
                fence = self._rs().fences.get(key)
                if fence is not None and fence[1] <= now:  # (not a later fence's)
                    self._lift_fence(key, fence[0])

    def cleanup(self, limit: int | None = None) -> int:
        """Drop finished tasks older than the retention period, the oldest first and at
        most `limit` of them; return how many."""
        return self.tasks.drop_finished(self._clock() - self.config.retention, limit)

    def _pending(self, when: float, kind: str, key: str) -> bool:
        """Whether a timer can still fire (see `Timers`)."""
        if kind == "ttl":
            return self.tasks.unfinished(key) is not None
        if kind == "retry":
            owed = self._rs().owed.get(key)
            return owed is not None and owed.due == when
        if kind == "stub":
            return self.tasks.unfinished(key) is not None
        if kind == "janitor":
            return key in self._rs().dead_hubs
        if kind == "orphan":
            return key in self._rs().orphans
        if kind == "moved":
            return key in self._rs().handed or key in self._rs().adopted
        if kind == "fence":
            fence = self._rs().fences.get(key)
            return fence is not None and fence[1] == when
        agent = self.registry.get(key)
        return agent is not None and agent.resume_by == when

    def summary(self, protocol: int = p.PROTOCOL_VERSION) -> p.HubSummary:
        return p.HubSummary(
            agents=len(self.registry),
            online=len(self._peer_of),
            tasks=self.tasks.counts(),
            uptime=round(self._clock() - self._started, 3),
            counters=dict(self.counters),
            version=__version__,
            protocol=protocol,
        )

    def restore(self, snapshot: Snapshot) -> None:
        """Take back what a store kept, before any connection: every agent offline with
        a fresh `resume_grace` to resume in, every unfinished task with its TTL timer (a
        TTL that ran out while the hub was down fires at once), and the counters."""
        now, offset = self._clock(), self._wall() - self._clock()
        agents = [AgentRecord.from_row(row) for row in snapshot.agents]
        self.registry.restore(agents)
        for agent in agents:
            agent.resume_by = now + self.config.resume_grace
            self._schedule(agent.resume_by, "grace", agent.agent_id)
        stubs = self.tasks.restore(snapshot.tasks, lambda t: t - offset)
        if self._remote is not None:
            for task_id, owner in stubs:  # their results, unanswered before the restart
                self._result_again(task_id, owner)
        for stored in snapshot.tasks:
            if stored[8] is None:  # unfinished (TaskRow.finished)
                record = self.tasks.unfinished(stored[1])
                assert record is not None
                if record.queue is not None:  # in arrival order: stored in sequence order
                    self.queue.push(record.queue, record.task_id, record.requester, record.priority)
                assignee = self.registry.get(record.assignee)
                if assignee is not None:
                    self.registry.assigned(assignee, record.capability.strip().lower())
                if record.owner is not None and self._remote is not None:  # a stub: a second
                    # after its owner's TTL, this hub ends it on its own
                    self._schedule(record.deadline + STUB_GRACE, "stub", record.task_id)
                    continue
                requester = record.requester
                self._open_requests[requester] = self._open_requests.get(requester, 0) + 1
                self._schedule(record.deadline, "ttl", record.task_id)
        for name, value in snapshot.counters.items():
            if name in self.counters:
                self.counters[name] = value

    def take_changes(self) -> Changes:
        """What changed since the last call, as rows for the store (see `journal`)."""
        assert self.journal is not None
        seqs, gone_tasks, agent_ids, gone_agents, written = self.journal.take()
        offset = self._wall() - self._clock()
        agents = [self.registry.get(agent_id) for agent_id in agent_ids]
        return Changes(
            tasks=self.tasks.rows(seqs, lambda t: t + offset),
            gone_tasks=gone_tasks,
            agents=[agent.to_row() for agent in agents if agent is not None],
            gone_agents=gone_agents,
            paid=self.tasks.paid(written),
            counters=dict(self.counters),
        )

    def _check_store(self) -> None:
        """Refuse new work while the store cannot keep it."""
        if self.store_error is not None:
            raise p.ProtocolError(
                EC.STORE_UNAVAILABLE,
                f"the hub cannot store new work now ({self.store_error}); try again later",
            )

    # ---------------------------------------------------------------------------------
    # Handlers: (peer, my agent ID or None, envelope)

    def _on_register(self, peer: Peer, me: str | None, env: p.Envelope) -> None:
        request: p.Register = env.payload
        resume = request.resume
        adopted: Iterable[Mapping[str, Any]] | None = ()  # its tasks, if taken over
        if resume is not None and self._remote is not None:  # (`prefetch`), for this
            adopted = self._remote.prefetched.pop(resume.agent_id, ())  # frame only
        if me is not None:
            raise p.ProtocolError(EC.ALREADY_REGISTERED, f"this connection is already {me}")
        if not request.name.strip():
            raise p.ProtocolError(EC.INVALID_MESSAGE, "$.payload.name: must not be empty")
        if len(request.capabilities) > self.config.max_capabilities:
            raise p.ProtocolError(
                EC.LIMIT_EXCEEDED,
                f"at most {self.config.max_capabilities} capabilities per agent",
            )
        _check_registration(request)
        if resume is not None:
            self.limits.may_resume(peer)
        old = self.registry.get(resume.agent_id) if resume else None
        if old is None and resume is not None and self._remote is not None:
            old = self._remote.orphans.get(resume.agent_id)  # an earlier incarnation's
        taken = old is not None and old.hub is not None
        if old is not None and taken:
            self._may_take_over(old, adopted is not None)  # held by another hub
        if (
            old is not None
            and resume is not None
            and secrets.compare_digest(old.token_hash, token_hash(resume.token))
        ):
            if taken:
                self._take_over(old)
            agent_id, token, resumed = old.agent_id, resume.token, True
            stale = self._peer_of.get(agent_id)
            if stale is not None:
                self._unbind(stale)
                self._replaced[stale] = agent_id
                stale.close(CLOSE_REPLACED, "this agent resumed on another connection")
        else:
            if resume is not None:  # an unknown agent, or a wrong token
                self.limits.resume_failed(peer)
            self._check_store()
            self.limits.may_create(peer)
            if len(self.registry) - self.registry.remote >= self.config.max_agents:
                raise p.ProtocolError(
                    EC.LIMIT_EXCEEDED,
                    f"the hub holds its maximum of {self.config.max_agents} agents",
                )
            self.limits.created(peer)
            agent_id, token, resumed = _new_id("agt"), secrets.token_urlsafe(24), False
        agent = AgentRecord(
            agent_id=agent_id,
            name=request.name,
            description=request.description,
            capabilities=request.capabilities,
            metadata=request.metadata,
            token_hash=old.token_hash if resumed and old else token_hash(token),
            registered_at=old.registered_at if resumed and old else self._wall(),
            last_assigned=old.last_assigned if resumed and old else 0,
            hidden=request.hidden,
            tags=request.tags,
            max_concurrency=request.max_concurrency,
            # A lease taken over from another hub is one epoch on (`_take_over`).
            epoch=old.epoch + (old.hub is not None) if resumed and old else 0,
        )
        if resumed:  # its tasks in flight, counted by capability as it registers now
            for task in self.tasks.of_assignee(agent_id, finished=False):
                self.registry.assigned(agent, task.capability.strip().lower())
            agent.last_assigned = old.last_assigned if old else 0
        self.registry.add(agent)
        self._agent_of[peer] = agent_id
        self._peer_of[agent_id] = peer
        self._reply(
            peer,
            env,
            p.Registered(
                agent_id=agent_id,
                resume_token=token,
                heartbeat_interval=self.config.heartbeat_interval,
                resumed=resumed,
                protocol=2 if peer in self._v2 else 1,
                max_frame_size=self.config.max_frame_size,
            ),
            durable=True,
        )
        log.info("agent %s (%s) %s", agent_id, request.name, "resumed" if resumed else "registered")
        if self.events.active:
            kind = "agent_online" if resumed else "agent_registered"
            self.events.emit(kind, {"agent": agent_view(agent)}, hidden=agent.hidden)
        if resumed:
            if taken:  # the tasks it asked for on its old hub (their rows, from KV)
                assert old is not None
                assert old.hub is not None
                self._adopt(agent, old.hub, adopted or ())
            self._catch_up(agent_id, peer, resume.awaiting if resume else ())
            if taken and resume is not None:
                self._lost_with_its_hub(peer, agent_id, resume.awaiting)
        if self.queue:
            self._fill(agent)

    def _on_deregister(self, peer: Peer, me: str | None, env: p.Envelope) -> None:
        assert me is not None
        agent = self.registry.get(me)
        self._unbind(peer)
        if agent is not None:
            self._drop_agent(agent, f"agent {me} deregistered")
        self._reply(peer, env, p.Deregistered(agent_id=me), durable=True)

    def _on_discover(self, peer: Peer, me: str | None, env: p.Envelope) -> None:
        request: p.Discover = env.payload
        _check_limit(request.limit)
        try:
            found, rest = self.registry.search(
                request.capability,
                online=request.online,
                tags=request.tags,
                cursor=request.cursor,
                limit=request.limit,
            )
        except ValueError as exc:
            raise p.ProtocolError(EC.INVALID_MESSAGE, f"$.payload.cursor: {exc}") from None
        v2 = peer in self._v2  # else none of version 2's fields
        agents = [
            p.AgentInfo(
                agent_id=a.agent_id,
                name=a.name,
                description=a.description,
                capabilities=a.capabilities if v2 else a.v1_capabilities,
                online=a.online,
                metadata=a.metadata,
                tags=a.tags if v2 else (),
                max_concurrency=a.max_concurrency if v2 else None,
                match=match if v2 else None,
                hub=a.hub if v2 else None,
            )
            for _, a, match in found
        ]
        # An agent larger than a whole reply is sent alone (its register frame fitted).
        fit = max(_fitting(agents, _reply_budget(self.config, env)), min(len(agents), 1))
        if fit < len(agents):
            rest = found[fit][0]
        self._reply(peer, env, p.AgentList(agents=tuple(agents[:fit]), next_cursor=rest))

    def _on_delegate(self, peer: Peer, me: str | None, env: p.Envelope) -> None:
        assert me is not None
        request: p.Delegate = env.payload
        ttl = self.config.default_ttl if request.ttl is None else request.ttl
        if not 0 < ttl <= self.config.max_ttl:
            raise p.ProtocolError(
                EC.INVALID_MESSAGE,
                f"$.payload.ttl: must be more than 0 and at most {self.config.max_ttl:g} seconds",
            )
        if not request.capability.strip():
            raise p.ProtocolError(EC.INVALID_MESSAGE, "$.payload.capability: must not be empty")
        if request.priority not in p.PRIORITIES:
            raise p.ProtocolError(
                EC.INVALID_MESSAGE,
                f"$.payload.priority: must be an integer from {p.PRIORITIES.start} to "
                f"{p.PRIORITIES.stop - 1}, got {request.priority}",
            )
        traceparent, tracestate = request.traceparent, request.tracestate
        if traceparent is not None or tracestate is not None:
            _check_trace(traceparent, tracestate)
        limit = self.config.max_params_size
        # `size` counts characters; a character is at most 4 bytes of UTF-8.
        if 4 * env.size > limit and len(orjson.dumps(request.params)) > limit:
            raise p.ProtocolError(
                EC.TOO_LARGE, f"$.payload.params: larger than {limit} bytes as JSON"
            )
        if self.store_error is not None:
            self._check_store()
        if self._open_requests.get(me, 0) >= self.config.max_tasks_per_requester:
            raise p.ProtocolError(
                EC.LIMIT_EXCEEDED,
                f"at most {self.config.max_tasks_per_requester} unfinished tasks per requester",
            )
        key = request.capability.strip().lower()
        agent: AgentRecord | None
        if env.to is not None:
            agent = self.registry.get(env.to)
            if agent is None:
                raise p.ProtocolError(EC.UNKNOWN_AGENT, f"no agent {env.to!r} is registered")
            if not agent.offers(request.capability):
                raise p.ProtocolError(
                    EC.NO_CAPABLE_AGENT,
                    f"agent {env.to} does not offer capability {request.capability!r}",
                )
            queue = TO_AGENT + agent.agent_id
            if agent.limited and not agent.has_room(key):
                agent = None  # it is full: the task waits for it
        else:
            agent, queue = self.registry.select(request.capability), key
            if agent is None and not self.registry.offers(request.capability):
                raise p.ProtocolError(
                    EC.NO_CAPABLE_AGENT, f"no agent offers capability {request.capability!r}"
                )
        if agent is None and self.queue.full:
            raise p.ProtocolError(
                EC.LIMIT_EXCEEDED,
                f"every agent offering {request.capability!r} is busy, and the hub already "
                f"holds its maximum of {self.config.max_queued} waiting tasks",
            )
        now, wall = self._clock(), self._wall()
        record = TaskRecord(
            task_id=_new_id("task"),
            requester=me,
            assignee="" if agent is None else agent.agent_id,
            capability=request.capability if agent is None else agent.capability_name(key),
            params=request.params,
            ttl=ttl,
            deadline=now + ttl,
            created_at=wall,
            updated_at=wall,
            traceparent=traceparent,
            tracestate=tracestate,
            priority=request.priority,
            queue=queue if agent is None else None,
        )
        if self._tracer is not None:
            forward = self._traced(self._tracer.started, record)
            if traceparent is not None:  # an untraced task's frames carry no trace fields:
                record.forward_trace = forward  # agents older than them refuse those
        self.tasks.add(record)
        self._open_requests[me] = self._open_requests.get(me, 0) + 1
        self.counters["delegated"] += 1
        self._schedule(record.deadline, "ttl", record.task_id)
        if self.events.tasks_watched:
            self.events.emit("task_state", {"task": task_view(record)})
        if agent is None:
            self.queue.push(queue, record.task_id, me, request.priority)
        else:
            self.registry.assigned(agent, key)
            target = self._peer_of.get(agent.agent_id)
            if target is not None:
                self._deliver(record, target)
            elif agent.hub is not None:
                self._deliver_remote(record)
        reply = p.delegated_payload(record.task_id, record.assignee, record.state.value)
        self._reply(peer, env, reply, durable=True)  # a `Delegated`

    def _on_result(self, peer: Peer, me: str | None, env: p.Envelope) -> None:
        request: p.Result = env.payload
        record = self._task_for_assignee(me, request.task_id, "send a result for")
        if record.state is PENDING:  # answered before we saw it delivered: it was.
            record.apply(TaskEvent.DELIVER, now=self._clock(), wall=self._wall())
        self._finish(
            record,
            TaskEvent.COMPLETE if request.success else TaskEvent.FAIL,
            by=me,
            success=request.success,
            data=request.data,
            error=request.error
            if request.error is not None or request.success
            else "the agent reported failure",
        )

    def _on_status(self, peer: Peer, me: str | None, env: p.Envelope) -> None:
        request: p.Status = env.payload
        if request.task_id is None:
            self._reply(peer, env, self.summary(2 if peer in self._v2 else 1))
            return
        record = self.tasks.get(request.task_id)
        if record is None:
            raise p.ProtocolError(EC.UNKNOWN_TASK, f"no task {request.task_id!r}")
        involved = me is not None and me in (record.requester, record.assignee)
        operator = peer in self._admins or (me is None and not self.config.authenticated)
        if not involved and not operator:
            raise p.ProtocolError(
                EC.FORBIDDEN, f"task {request.task_id} is neither yours nor assigned to you"
            )
        info = task_info(record, v2=peer in self._v2)
        if record.queue is not None and peer in self._v2:
            info = attrs.evolve(info, queue_position=self.queue.position(record.task_id))
        self._reply(peer, env, info)

    def _on_broadcast(self, peer: Peer, me: str | None, env: p.Envelope) -> None:
        assert me is not None
        recipients = self._fan_out(me, self._frame(MT.BROADCAST, env.payload, sender=me))
        if self._remote is not None:
            recipients += self._broadcast_remote(me, env.payload)
        self.counters["broadcasts"] += 1
        self.metrics.broadcast(recipients)
        if self.events.tasks_watched:
            note = {"sender": me, "message": env.payload.message, "recipients": recipients}
            self.events.emit("broadcast", {"broadcast": note})
        self._reply(peer, env, p.BroadcastAck(recipients=recipients))

    def _fan_out(self, sender: str, frame: str) -> int:
        """Send a broadcast `frame` to every online agent here but its sender and the
        hidden ones, droppable; how many it was queued to."""
        recipients = 0
        for agent_id, other in self._peer_of.items():
            if agent_id != sender and not self._is_hidden(agent_id):
                other.send(frame, droppable=True)
                recipients += 1
        self.counters["frames_out"] += recipients
        return recipients

    def _is_hidden(self, agent_id: str) -> bool:
        agent = self.registry.get(agent_id)
        return agent is not None and agent.hidden

    def _on_list_tasks(self, peer: Peer, me: str | None, env: p.Envelope) -> None:
        request: p.ListTasks = env.payload
        if request.state is not None and request.state not in STATES:
            raise p.ProtocolError(
                EC.INVALID_MESSAGE,
                f"$.payload.state: must be one of {', '.join(STATES)}",
            )
        _check_limit(request.limit)
        if peer in self._admins or (me is None and not self.config.authenticated):
            of = None  # an operator: every task
        elif me is None:
            raise p.ProtocolError(
                EC.FORBIDDEN, "listing every task needs an admin token; register to list yours"
            )
        else:
            of = me
        try:
            found, rest = self.tasks.page(
                of=of,
                requester=request.requester,
                assignee=request.assignee,
                state=request.state,
                cursor=request.cursor,
                limit=request.limit,
            )
        except ValueError as exc:
            raise p.ProtocolError(EC.INVALID_MESSAGE, f"$.payload.cursor: {exc}") from None
        v2 = peer in self._v2
        tasks = [task_info(r, v2=v2) for _, r in found]
        fit = _fitting(tasks, _reply_budget(self.config, env))
        if fit == 0 and tasks:  # one task larger than a whole reply: sent cut down
            tasks[0], fit = task_info(found[0][1], truncated=True, v2=v2), 1
        if fit < len(tasks):
            rest = found[fit][0]
        self._reply(peer, env, p.TaskList(tasks=tuple(tasks[:fit]), next_cursor=rest))

    def _on_watch(self, peer: Peer, me: str | None, env: p.Envelope) -> None:
        request: p.Watch = env.payload
        unknown = sorted(set(request.kinds) - _EVENT_KINDS)
        if unknown:
            raise p.ProtocolError(
                EC.INVALID_MESSAGE,
                f"$.payload.kinds: unknown kind(s) {', '.join(map(repr, unknown))}; "
                f"there are: {', '.join(p.EVENT_KINDS)}",
            )
        # An operator sees everything; anyone may follow the agents, as discover shows
        # them (the hidden ones left out), but not the tasks, progress and broadcasts.
        operator = peer in self._admins or not self.config.authenticated
        kinds = tuple(k for k in p.EVENT_KINDS if k in request.kinds) or p.EVENT_KINDS
        if not operator:
            if not request.kinds:
                kinds = p.AGENT_EVENT_KINDS
            elif not set(kinds) <= set(p.AGENT_EVENT_KINDS):
                raise p.ProtocolError(
                    EC.FORBIDDEN,
                    "watching tasks, progress and broadcasts needs an admin token; "
                    f"anyone may watch the agents ({', '.join(p.AGENT_EVENT_KINDS)})",
                )
        self._reply(peer, env, p.Watching(kinds=kinds))  # before the first event
        self.events.watch(peer, kinds, hidden=operator, v2=peer in self._v2)

    def _on_unwatch(self, peer: Peer, me: str | None, env: p.Envelope) -> None:
        self.events.unwatch(peer)
        self._reply(peer, env, p.Unwatched())

    def _on_heartbeat(self, peer: Peer, me: str | None, env: p.Envelope) -> None:
        self._reply(peer, env, p.HeartbeatAck(), type_=MT.HEARTBEAT_ACK)

    def _on_cancel(self, peer: Peer, me: str | None, env: p.Envelope) -> None:
        request: p.Cancel = env.payload
        record = self.tasks.get(request.task_id)
        if record is None:
            raise p.ProtocolError(EC.UNKNOWN_TASK, f"no task {request.task_id!r}")
        if record.requester != me and peer not in self._admins:
            raise p.ProtocolError(EC.FORBIDDEN, f"only the requester may cancel {record.task_id}")
        if record.owner is not None:  # a stub: its owner decides
            raise p.ProtocolError(
                EC.FORBIDDEN,
                f"task {record.task_id} is owned by hub {record.owner}: cancel it there",
            )
        if record.terminal:
            raise p.ProtocolError(
                EC.TASK_FINISHED, f"task {record.task_id} already ended: {record.state.value}"
            )
        reason = request.reason or "cancelled by the requester"
        self._reply(peer, env, p.CancelAck(task_id=record.task_id, state="cancelled"), durable=True)
        self._finish(record, TaskEvent.CANCEL, error=reason, tell_assignee=reason)

    def _on_progress(self, peer: Peer, me: str | None, env: p.Envelope) -> None:
        request: p.Progress = env.payload
        if request.traceparent is not None or request.tracestate is not None:
            _check_trace(request.traceparent, request.tracestate, {"task_id": request.task_id})
        record = self._task_for_assignee(me, request.task_id, "report progress on")
        if request.traceparent is None and record.traceparent is not None:
            request = attrs.evolve(
                request, traceparent=record.traceparent, tracestate=record.tracestate
            )
        task_id = record.task_id
        if self.events.tasks_watched:
            note = {"task_id": task_id, "progress": request.progress, "message": request.message}
            self.events.emit("task_progress", {"progress": note})
        requester = self._peer_of.get(record.requester)
        if requester is not None:
            self._advise(
                requester, self._frame(MT.PROGRESS, request, sender=me, to=record.requester)
            )
        elif record.owner is not None:
            self._progress_remote(record, request)

    # ---------------------------------------------------------------------------------
    # Task mechanics

    def _task_for_assignee(self, me: str | None, task_id: str, action: str) -> TaskRecord:
        # Results and progress get no reply on success, so a refusal names its task.
        record = self.tasks.get(task_id)
        if record is None:
            raise p.ProtocolError(
                EC.UNKNOWN_TASK, f"no task {task_id!r}", details={"task_id": task_id}
            )
        if record.assignee != me:
            raise p.ProtocolError(
                EC.FORBIDDEN,
                f"only the agent assigned task {task_id} may {action} it",
                details={"task_id": task_id},
            )
        if record.state.terminal:
            raise p.ProtocolError(
                EC.TASK_FINISHED,
                f"task {task_id} already ended ({record.state.value}); this was not delivered",
                details={"task_id": task_id, "state": record.state.value},
            )
        return record

    def _deliver(self, record: TaskRecord, target: Peer) -> None:
        """Send the task to its agent; a PENDING task becomes IN_PROGRESS."""
        now = self._clock()
        remaining = record.deadline - now
        trace = record.forward_trace
        assignment = p.task_payload(  # a `TaskAssignment`
            record.task_id,
            record.capability,
            record.params,
            round(remaining, 3) if remaining > 0 else 0.0,
            record.traceparent if trace is None else trace[0],
            record.tracestate if trace is None else trace[1],
        )
        self._send(
            target,
            self._frame(MT.DELEGATE, assignment, sender=record.requester, to=record.assignee),
            durable=True,
        )
        if record.state is PENDING:
            record.apply(TaskEvent.DELIVER, now=now, wall=self._wall())
            self.tasks.update(record)
            if self.events.tasks_watched:
                self.events.emit("task_state", {"task": task_view(record)})
            if record.owner is not None:  # a stub: its owner hears of it
                self._owe_delivered(record)

    def _finish(
        self,
        record: TaskRecord,
        event: TaskEvent,
        *,
        success: bool | None = None,
        data: Any = None,
        error: str | None = None,
        by: str | None = HUB,
        tell_assignee: str | None = None,
    ) -> None:
        """End a task: record it, free its agent, and tell the requester (exactly once).

        With `tell_assignee`, the assignee (if it has the task) gets a `cancel` with that
        reason, so its handler stops.
        """
        was = record.state
        now = self._clock()
        try:
            state = record.apply(
                event, now=now, wall=self._wall(), success=success, data=data, error=error
            )
        except IllegalTransition as exc:  # pragma: no cover - guarded by callers
            raise p.ProtocolError(EC.TASK_FINISHED, str(exc)) from None
        record.ended_by = by
        if record.owner is not None:  # a stub: the owner decides
            self._stub_finished(record)
        took = now - (record.deadline - record.ttl)
        self.metrics.task_finished(record.capability, took)
        if record.queue is not None:  # it never had an agent
            self.queue.discard(record.task_id)
            # Waiting for one agent, it may have held back the others waiting for it.
            freed = self._queued_for(record.queue)
            record.queue = None
        else:
            freed = self.registry.finished(record.assignee, record.capability)
        left = self._open_requests.get(record.requester, 0) - 1
        if left > 0:
            self._open_requests[record.requester] = left
        else:
            self._open_requests.pop(record.requester, None)
        self.counters[state.value] += 1
        if tell_assignee is not None and (was is IN_PROGRESS or self._sent_away(record)):
            record.owed_cancel = tell_assignee
            self._tell_assignee(record)
        self._notify(record)
        self.tasks.update(record)
        if self.events.tasks_watched:
            self.events.emit("task_state", {"task": task_view(record), "duration": took})
        if self._tracer is not None:
            self._traced(self._tracer.ended, record)
        if freed is not None and self.queue:
            self._fill(freed)

    def _fill(self, agent: AgentRecord) -> None:
        """Give `agent` (it has a slot free, or joined) the tasks waiting for it while it
        has room: the best of its own queue's and its capabilities' queues' next tasks
        (`DispatchQueues.best`). Only an online agent, at its pace: while its outbox is
        over half full it waits for `drained`, and a resuming one is filled once back."""
        if self._filling:  # a task failed here ends, and its end would fill again
            return
        peer = self._peer_of.get(agent.agent_id)
        if peer is None or peer in self._backlogs:  # the catch-up goes first
            if peer is None and agent.hub is not None:
                self._fill_remote(agent)
            return
        self._filling = True
        try:
            self._fill_from(agent, peer)
        finally:
            self._filling = False

    def _fill_from(self, agent: AgentRecord, peer: Peer) -> None:
        own = TO_AGENT + agent.agent_id
        blocked = False  # its own queue's next task is of a capability it has no room for
        while peer.has_room():
            keys = [k for k in agent.offered if not agent.limited or agent.has_room(k)]
            entry = self.queue.best(keys if blocked else [*keys, own])
            if entry is None:
                return
            record = self.tasks.unfinished(entry.task_id)
            assert record is not None, "a queued task is unfinished"
            key = record.capability.strip().lower()
            if entry.key == own and not agent.offers(key):  # it resumed without it
                self._finish(
                    record,
                    TaskEvent.FAIL,
                    error=f"agent {agent.agent_id} no longer offers {record.capability!r}",
                )
                continue
            if entry.key == own and agent.limited and not agent.has_room(key):
                blocked = True  # the other queues may still have tasks it has room for
                continue
            self.queue.take(entry)
            record.queue = None
            record.capability = agent.capability_name(key)
            self.tasks.assign(record, agent.agent_id)
            self.registry.assigned(agent, key)
            self._deliver(record, peer)  # a PENDING task becomes IN_PROGRESS
            requester = self._peer_of.get(record.requester)
            if requester is not None:  # news for the requester, as after a resume
                info = task_info(record, v2=requester in self._v2)
                self._advise(requester, self._frame(MT.STATUS, info, to=record.requester))

    def _queued_for(self, queue: str) -> AgentRecord | None:
        """The agent a queue is for, if it is one agent's own (`TO_AGENT`)."""
        if not queue.startswith(TO_AGENT):
            return None
        return self.registry.get(queue[len(TO_AGENT) :])

    def _traced(self, call: Callable[[TaskRecord], Any], record: TaskRecord) -> Any:
        """`call(record)` on the tracer; a tracer that raises is logged (rate-limited)
        and routing goes on as if there were none."""
        try:
            return call(record)
        except Exception:
            self._quiet.log("tracer", logging.ERROR, "the tracer failed", exc_info=True)
            return None

    def _tell_assignee(self, record: TaskRecord) -> None:
        """Send the assignee the cancel it is owed, if it is online (else on resume). It
        stays owed (`owed_cancel`) until its frame is written (`delivered`): a cancel cut
        off with a connection, or lost with a crashed hub, is sent again."""
        if self._sent_away(record):  # to the assignee's hub, until it answers
            self._cancel_remote(record)
            return
        assignee = self._peer_of.get(record.assignee)
        if assignee is not None and record.owed_cancel is not None:
            cancel = p.Cancel(task_id=record.task_id, reason=record.owed_cancel)
            frame = self._frame(MT.CANCEL, cancel, sender=HUB, to=record.assignee)
            self._send(assignee, frame, outcome_of=CANCEL_TAG + record.task_id, durable=True)

    def _notify(self, record: TaskRecord) -> None:
        """Send the requester its task's end, if it is online and has not had it. The
        caller keeps the change with `tasks.update`."""
        requester = self._peer_of.get(record.requester)
        if requester is None or record.notified:
            return
        outcome = p.outcome_payload(  # a `TaskOutcome`
            record.task_id,
            record.state.value,
            bool(record.success),
            record.data,
            record.error,
            record.traceparent,
            record.tracestate,
        )
        record.notified = True
        frame = self._frame(MT.RESULT, outcome, sender=record.ended_by, to=record.requester)
        self._send(requester, frame, outcome_of=record.task_id, durable=True)
        self.tasks.hold(record.task_id)  # kept until `delivered` or `disconnected`

    def _catch_up(self, agent_id: str, peer: Peer, awaiting: Iterable[str]) -> None:
        """After a resume, send what the agent missed, at its pace (see `_pump`).

        `awaiting` are the tasks the requester says it still waits for: an outcome among
        them that the hub wrote to an earlier connection (it was lost with that
        connection's buffers) is owed again."""
        tasks = self.tasks
        for task_id in awaiting:
            if tasks.unfinished(task_id) is None:
                record = tasks.get(task_id)
                if record is not None and record.requester == agent_id and record.notified:
                    record.notified = False
                    tasks.update(record)
        # What it missed is listed now: a task given to it later (`_fill`) is sent once.
        owed = [r.task_id for r in tasks.owed(agent_id)]
        held = [r.task_id for r in tasks.of_assignee(agent_id, finished=False)]
        self._pump(peer, self._catch_up_frames(agent_id, peer, owed, held))

    def _catch_up_frames(
        self, agent_id: str, peer: Peer, owed: list[str], held: list[str]
    ) -> Iterator[None]:
        """The catch-up, one frame per step: the cancels the agent missed (it may still be
        working on those tasks), its unfinished tasks again, and the outcomes of tasks it
        asked for. Each is looked up when its turn comes, so a task that changed
        meanwhile is sent as it is then, and an outcome sent meanwhile is not sent twice."""
        tasks = self.tasks
        for task_id in owed:
            record = tasks.get(task_id)
            if record is not None and record.assignee == agent_id and record.owed_cancel:
                self._tell_assignee(record)
                tasks.update(record)
                yield
        for task_id in held:
            record = tasks.unfinished(task_id)
            if record is None or record.assignee != agent_id:
                continue
            was = record.state
            self._deliver(record, peer)  # at least once: the SDK drops duplicates
            if was is PENDING:  # news for the requester, advisory like progress
                requester = self._peer_of.get(record.requester)
                if requester is not None:
                    info = task_info(record, v2=requester in self._v2)
                    self._advise(requester, self._frame(MT.STATUS, info, to=record.requester))
            yield
        for task_id in owed:
            record = tasks.get(task_id)
            if record is not None and record.requester == agent_id and not record.notified:
                self._notify(record)
                tasks.update(record)
                yield

    def _drop_agent(self, agent: AgentRecord, reason: str) -> None:
        """Forget `agent` for good: its tasks fail, tasks it asked for are cancelled."""
        self.registry.remove(agent.agent_id)
        if self.events.active:
            body = {"agent": agent_view(agent), "reason": reason}
            self.events.emit("agent_left", body, hidden=agent.hidden)
        for record in self.tasks.of_assignee(agent.agent_id, finished=False):
            self._finish(record, TaskEvent.FAIL, error=reason)
        for task_id in self.queue.under(TO_AGENT + agent.agent_id):  # sent to it by ID
            waiting = self.tasks.unfinished(task_id)
            if waiting is not None:
                self._finish(waiting, TaskEvent.FAIL, error=reason)
        asked = self.tasks.of_requester(agent.agent_id, finished=False)
        asked.sort(key=lambda r: r.queue is None)  # the queued first: a slot that another
        for record in asked:  # frees must not go to one of them
            self._finish(
                record, TaskEvent.CANCEL, error=f"requester left: {reason}", tell_assignee=reason
            )
        log.info("agent %s (%s) removed: %s", agent.agent_id, agent.name, reason)

    def _unbind(self, peer: Peer) -> None:
        agent_id = self._agent_of.pop(peer, None)
        if agent_id is not None:
            self._peer_of.pop(agent_id, None)

    def _schedule(self, when: float, kind: str, key: str) -> None:
        if self.timers.add(when, kind, key):
            self._wake(when)

    # ---------------------------------------------------------------------------------
    # Frames

    def _frame(
        self,
        type_: p.MessageType,
        payload: Any,
        *,
        sender: str | None = HUB,
        to: str | None = None,
        in_reply_to: str | None = None,
    ) -> str:
        msg_id = f"h{next(self._ids)}"
        return p.encode_fields(type_, msg_id, payload, sender, to, self._wall(), in_reply_to)

    def _send(
        self, peer: Peer, frame: str, *, outcome_of: str | None = None, durable: bool = False
    ) -> None:
        self.counters["frames_out"] += 1
        peer.send(frame, outcome_of=outcome_of, durable=durable)

    def _advise(self, peer: Peer, frame: str) -> None:
        """Send an advisory frame (progress, a status push): dropped if `peer` is behind."""
        self.counters["frames_out"] += 1
        peer.send(frame, droppable=True)

    def _reply(
        self,
        peer: Peer,
        request: p.Envelope,
        payload: Any,
        *,
        type_: p.MessageType | None = None,
        durable: bool = False,
    ) -> None:
        frame = self._frame(type_ or request.type, payload, in_reply_to=request.id)
        self._send(peer, frame, durable=durable)

    def _error(
        self,
        peer: Peer,
        in_reply_to: str | None,
        code: p.ErrorCode,
        message: str,
        details: dict[str, Any] | None = None,
    ) -> None:
        self.counters["errors"] += 1
        self.metrics.error(code.value)
        error = p.Error(code=code, message=message, details=details)
        self._send(peer, self._frame(MT.ERROR, error, in_reply_to=in_reply_to))


def _check_registration(request: p.Register) -> None:
    """Refuse limits that are not counts, and tags that are too many or too long."""
    if request.max_concurrency is not None and request.max_concurrency < 1:
        raise p.ProtocolError(
            EC.INVALID_MESSAGE, "$.payload.max_concurrency: must be at least 1, or null"
        )
    for i, capability in enumerate(request.capabilities):
        if capability.max_concurrency is not None and capability.max_concurrency < 1:
            raise p.ProtocolError(
                EC.INVALID_MESSAGE,
                f"$.payload.capabilities[{i}].max_concurrency: must be at least 1, or null",
            )
    if len(request.tags) > _MAX_TAGS:
        raise p.ProtocolError(EC.LIMIT_EXCEEDED, f"at most {_MAX_TAGS} tags per agent")
    for i, tag in enumerate(request.tags):
        if not tag.strip() or len(tag) > _MAX_TAG:
            raise p.ProtocolError(
                EC.INVALID_MESSAGE,
                f"$.payload.tags[{i}]: must be from 1 to {_MAX_TAG} characters, not blank",
            )


def _check_trace(
    traceparent: str | None, tracestate: str | None, details: dict[str, Any] | None = None
) -> None:
    """Refuse a trace context that is not W3C's (see `protocol.trace_problem`)."""
    problem = p.trace_problem(traceparent, tracestate)
    if problem is not None:
        raise p.ProtocolError(EC.INVALID_MESSAGE, problem, details=details)


def _check_limit(limit: int) -> None:
    """Refuse a page size out of range."""
    if not 0 < limit <= _LIST_LIMIT:
        raise p.ProtocolError(
            EC.INVALID_MESSAGE, f"$.payload.limit: must be from 1 to {_LIST_LIMIT}, got {limit}"
        )


def _reply_budget(config: HubConfig, env: p.Envelope) -> int:
    """Bytes the entries of a reply to `env` may take: `max_reply_size` less room for the
    envelope (which repeats the request's id, a character at most 6 bytes in JSON) and
    the cursor."""
    return config.max_reply_size - _REPLY_FRAME - 6 * len(env.id)


def _fitting(entries: list[Any], budget: int) -> int:
    """How many of `entries`, from the first, fit in `budget` bytes of JSON (with the
    commas between them)."""
    sizes = (len(orjson.dumps(p.converter.unstructure(e))) + 1 for e in entries)
    return sum(1 for _ in itertools.takewhile(budget.__ge__, itertools.accumulate(sizes)))


def _new_id(prefix: str) -> str:
    """A fresh ID: 64 random bits. Not a secret (a task is guarded by who may act on it,
    and resume tokens come from `secrets`), so no system call for each one."""
    return f"{prefix}_{random.getrandbits(64):016x}"
