"""The remote route: the `Router`'s decisions about agents and tasks on other hubs
(docs/cluster.md, "The router: a remote route beside the local one"). Pure: no trio, no
NATS.

`RemoteRoute` is a part of `Router` (its base class) kept in a module of its own: the
entry points the cluster's Trio shell calls (`directory`, `hub_presence`, `link`,
`cluster_receive`, `cluster_reply`), the handlers of the messages between hubs, and the
re-sends of what this hub owes another. The agents' leases (who holds which agent, and
what happens when that moves) are its base class, `_leases.Leases`. The router's own
methods branch here only at the point of delivery (`_deliver_remote`, `_cancel_remote`,
`_fill_remote`, stubs). Its state is `Router._remote` (a `RemoteState`), None on a hub
with no cluster, where none of this runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

import orjson

from . import protocol as p
from ._dispatch import TO_AGENT
from ._events import task_info, task_view
from ._leases import Leases
from ._remote import (
    BROADCAST,
    CANCEL,
    DELIVERED,
    EVERY_HUB,
    MAYBE_STR,
    PROGRESS,
    RELEASE,
    RESULT,
    RETRY_FIRST,
    RETRY_MAX,
    STR,
    STUB_GRACE,
    TASK,
    BadMessage,
    Owed,
    RemoteState,
    agent_from_row,
    agent_row,
    field,
    finite,
)
from .lifecycle import IN_PROGRESS, PENDING, TIMEOUT, TaskEvent, TaskRecord
from .registry import AgentRecord

if TYPE_CHECKING:
    from ._events import Events
    from .routing import Peer

__all__ = ["RemoteRoute"]

log = logging.getLogger("agentmesh.hub")
MT = p.MessageType

# Messages from other hubs: kind -> the router's handler (see `cluster_receive`).
_CLUSTER_HANDLERS = {
    TASK: "_on_remote_task",
    DELIVERED: "_on_remote_delivered",
    RESULT: "_on_remote_result",
    CANCEL: "_on_remote_cancel",
    PROGRESS: "_on_remote_progress",
    RELEASE: "_on_remote_release",
    BROADCAST: "_on_remote_broadcast",
}


def _speaker(body: Mapping[str, Any], role: str) -> tuple[str, str, int]:
    """The task ID, the agent the message speaks for (its `role`: requester or
    assignee) and that agent's epoch, checked. Raises `BadMessage`."""
    return field(body, "task_id", STR), field(body, role, STR), field(body, "epoch", (int,))


def _trace(body: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The W3C trace context a message carries, checked as a client's is."""
    traceparent = field(body, "traceparent", MAYBE_STR, None)
    tracestate = field(body, "tracestate", MAYBE_STR, None)
    problem = p.trace_problem(traceparent, tracestate)
    if problem is not None:
        raise BadMessage(problem.replace("$.payload.", ""))
    return traceparent, tracestate


def _is_state(answer: Mapping[str, Any], *states: str) -> bool:
    return answer.get("state") in states


# What answers each kind of request (anything else is not an answer: the request stays
# owed). docs/cluster.md has the table.
_ANSWERS: dict[str, Callable[[Mapping[str, Any]], bool]] = {
    TASK: lambda a: _is_state(a, "in_progress", "pending") or type(a.get("refused")) is str,
    DELIVERED: lambda a: True,
    RESULT: lambda a: a.get("task_finished") is True or type(a.get("state")) is str,
    CANCEL: lambda a: True,
    RELEASE: lambda a: a.get("released") is True,
}


class RemoteRoute(Leases):
    """The `Router`'s methods for the remote route (see the module's docstring)."""

    if TYPE_CHECKING:  # what it uses of the `Router`, beyond what `Leases` declares
        events: Events
        _remote: RemoteState | None
        _v2: set[Peer]
        _filling: bool
        _wall: Callable[[], float]

        def _fill(self, agent: AgentRecord) -> None: ...

        def _advise(self, peer: Peer, frame: str) -> None: ...

        def _drop_agent(self, agent: AgentRecord, reason: str) -> None: ...

        def _deliver(self, record: TaskRecord, target: Peer) -> None: ...

        def _fan_out(self, sender: str, frame: str) -> int: ...

    def directory(self, rows: Iterable[Mapping[str, Any]], gone: Iterable[str] = ()) -> None:
        """Agents held by other hubs, as the agents bucket has them. Each row (see
        `_remote.agent_row`) adds a remote agent or updates one (this hub's count of
        the tasks it gave the agent is kept); `gone` are agents deleted from the bucket,
        dropped for good: the tasks given to them fail, the stubs they asked for are
        cancelled. Rows that are not rows are left out (logged), and so are rows of an
        older epoch than the agent's known one.

        A row at a newer epoch on another hub is a lease that moved (the agent resumed
        there): the tasks this hub gave the agent go to its new hub again (`task`, at
        least once: its SDK drops what it runs already), and if the agent was this hub's
        own, its connection here is closed and the stubs it held here are dropped (their
        owners send them to the new hub)."""
        remote = self._rs()
        for row in rows:
            try:
                agent = agent_from_row(row)
            except BadMessage as exc:
                self._quiet.log("directory", logging.WARNING, "not a directory row (%s)", exc)
                continue
            old = self.registry.get(agent.agent_id)
            if agent.hub == remote.name and old is None:
                self._orphan(agent)
                continue
            if agent.hub == remote.name or (old is not None and agent.epoch < old.epoch):
                continue  # ours, or older news than we have
            if old is not None and old.hub is None:
                if agent.epoch == old.epoch:
                    continue  # ours at this epoch (a hub that lost a race: `lease_lost`)
                self._lease_lost(old, agent.hub or "")
            self._file_remote(agent, old)
        for agent_id in gone:
            remote.orphans.pop(agent_id, None)
            leaving = self.registry.get(agent_id)
            if leaving is not None and leaving.hub is not None:
                remote.listed_offline.discard(agent_id)
                remote.owner_word = True  # the stubs it asked for end: nobody is left to hear
                try:
                    reason = f"agent {agent_id} (hub {leaving.hub}) left the cluster"
                    self._drop_agent(leaving, reason)
                finally:
                    remote.owner_word = False

    def _file_remote(self, agent: AgentRecord, old: AgentRecord | None) -> None:
        """Keep `agent`, from a row of the bucket, in place of `old`: this hub's count
        of the tasks it gave the agent goes on; if its lease moved, what this hub owes
        it goes to its new hub."""
        remote = self._rs()
        moved = old is not None and (old.hub, old.epoch) != (agent.hub, agent.epoch)
        if old is not None:
            agent.in_flight, agent.last_assigned = old.in_flight, old.last_assigned
            agent.running.update(old.running)
            agent.elsewhere = old.elsewhere if not moved else 0
        if agent.online:
            remote.listed_offline.discard(agent.agent_id)
        else:
            remote.listed_offline.add(agent.agent_id)
        agent.online = self._reachable(agent)
        self.registry.add(agent)
        if moved:
            self._send_again(agent)
            self._follow_requester(agent)
        if agent.online and self.queue:
            self._fill(agent)

    def directory_rows(self) -> list[dict[str, Any]]:
        """This hub's own agents as directory rows: what the Trio shell writes to the
        agents bucket (and what tests hand the other routers' `directory`)."""
        name = self._rs().name
        return [agent_row(a, name) for a in self.registry if a.hub is None]

    def hub_presence(self, hub: str, *, alive: bool) -> None:
        """`hub` was heard from (`alive`), or has been silent too long: its agents count
        as online again (those whose rows say so) or as offline. A hub heard from again
        after a silence is sent at once what is owed to it. Only a change does anything,
        so the shell may report every beat."""
        dead = self._rs().dead_hubs
        if alive != (hub in dead):
            return  # no news: a beat of a live hub, or a dead one still silent
        if alive:
            del dead[hub]
        else:
            now = dead[hub] = self._clock()
            self._schedule(now + self.config.resume_grace, "janitor", hub)
        self._reach(hub)
        if alive:
            self._resend(hub)

    def link(self, up: bool) -> None:
        """The link to the cluster went down or came back. While it is down, every remote
        agent counts as offline and nothing is sent (what is owed stays owed, and its
        TTLs run); back up, everything owed is sent at once. Only a change does anything."""
        remote = self._rs()
        if up == remote.link_up:
            return
        remote.link_up = up
        self._reach(None)
        if up:
            self._resend(None)
            # A janitor's moment that came while cut off (it judged nothing): now.
            now = self._clock()
            for hub, since in remote.dead_hubs.items():
                self._schedule(max(now, since + self.config.resume_grace), "janitor", hub)

    def local_load(self) -> dict[str, int]:
        """This hub's agents' tasks in flight, by agent: what its `load` messages say."""
        return {a.agent_id: a.in_flight for a in self.registry if a.hub is None}

    def remote_load(self, hub: str, loads: Any) -> None:
        """Hub `hub` says how many tasks its agents run (a `load` message; those it
        leaves out did not change), as a JSON object of counts by agent ID. Each counts
        in selection beyond the tasks this hub gave the agent itself, never in its
        limits. What is not a count is skipped."""
        if not isinstance(loads, Mapping):
            return
        registry = self.registry
        for agent_id, total in loads.items():
            agent = registry.get(agent_id)
            if agent is not None and agent.hub == hub and type(total) is int and total >= 0:
                agent.elsewhere = max(0, total - agent.in_flight)

    def cluster_receive(self, src: str, kind: str, body: Mapping[str, Any], reply: Peer) -> None:
        """Handle one message of `kind` from hub `src` (NATS vouches for the name).

        Every message that speaks for an agent is taken only if `src` holds that agent's
        lease at the epoch it names; else it is answered `{"not_holder": hub}` (the hub
        this one thinks holds it, or null). Each kind is idempotent by task ID: a message
        again gets the answer it got the first time. The answer of a request kind goes to
        `reply` as one JSON object (`durable` when it reports a change of state, so held
        for its commit like a client's frame); `progress` gets none. Never raises: a
        message that is not one is logged and answered `{"error": ...}`."""
        handler = _CLUSTER_HANDLERS.get(kind)
        try:
            if handler is None:
                raise ValueError(f"unknown kind {kind!r}")
            getattr(self, handler)(src, body, reply)
        except (KeyError, TypeError, ValueError) as exc:
            self._quiet.log("cluster", logging.WARNING, "a bad %s from hub %s: %r", kind, src, exc)
            if kind not in (PROGRESS, BROADCAST):
                self._answer(reply, {"error": f"{type(exc).__name__}: {exc}"})

    def cluster_reply(
        self, src: str, kind: str, body: Mapping[str, Any], answer: Mapping[str, Any]
    ) -> None:
        """Hub `src` answered our message of `kind` (`body`, as sent) with `answer`. It is
        no longer owed, unless the answer is `not_holder`, an error, or not an answer to
        that kind (see `_ANSWERS`): then it is re-sent (the directory may have caught up
        by then) until its deadline."""
        task_id = body.get("requester" if kind == RELEASE else "task_id")  # (`Owed.key`)
        if type(task_id) is not str or not isinstance(answer, Mapping):
            return
        if type(moved := answer.get("moved")) is str and moved and moved != self._rs().name:
            self._moved(src, kind, task_id, moved)
            return
        if "not_holder" in answer or "error" in answer or not _ANSWERS[kind](answer):
            if "not_holder" not in answer:
                self._quiet.log(
                    "cluster", logging.WARNING, "hub %s answered a %s with %r", src, kind, answer
                )
            return
        owed = self._rs().owed.pop(f"{kind}:{task_id}", None)
        if owed is not None:
            self._settle(owed)
        if kind == TASK:
            self._task_answered(task_id, answer)

    def _moved(self, src: str, kind: str, task_id: str, hub: str) -> None:
        """Hub `src` handed the task over to `hub` (its requester moved there) before this
        hub's directory showed the move: what it owes about the task goes there, now."""
        owed = self._rs().owed.get(f"{kind}:{task_id}")
        if owed is None or self._destination(owed) != src:
            return  # answered meanwhile, or already sent on elsewhere
        owed.hub = hub
        stub = self.tasks.unfinished(task_id)
        if stub is not None and stub.owner == src:  # as `_follow_requester` does
            stub.owner = hub
            self.tasks.update(stub)
        if kind == RESULT:  # and after a restart too
            self.tasks.stub_owner(task_id, hub)
        self._send_owed(owed)

    def _reachable(self, agent: AgentRecord) -> bool:
        """Whether a remote agent counts as online: its row says so, its hub is heard
        from, and the link is up."""
        return (
            self._rs().link_up
            and agent.hub not in self._rs().dead_hubs
            and agent.agent_id not in self._rs().listed_offline
        )

    def _reach(self, hub: str | None) -> None:
        """Set the remote agents of `hub` (all, for None) online or offline as they now
        are (`_reachable`); those back online are given waiting tasks."""
        back = []
        for agent in self.registry:
            if agent.hub is not None and (hub is None or agent.hub == hub):
                online = self._reachable(agent)
                if online and not agent.online:
                    back.append(agent)
                agent.online = online
        if self.queue:
            for agent in back:
                self._fill(agent)

    def _resend(self, hub: str | None) -> None:
        """Send what is owed to `hub` (to every hub, for None) now, its back-off reset;
        what is no longer owed is given up."""
        now = self._clock()
        for owed in list(self._rs().owed.values()):
            if not self._still_owed(owed):
                del self._rs().owed[owed.key]
                self._settle(owed)
            elif hub is None or self._destination(owed) == hub:
                owed.delay = RETRY_FIRST
                self._send_owed(owed)
                owed.due = now + owed.delay
                self._schedule(owed.due, "retry", owed.key)

    def _holds(self, src: str, agent_id: str, epoch: Any) -> bool:
        """Whether hub `src` holds `agent_id`'s lease at `epoch`, as the directory says."""
        agent = self.registry.get(agent_id)
        return agent is not None and agent.hub == src and agent.epoch == epoch

    def _not_holder(self, reply: Peer, agent_id: str) -> None:
        agent = self.registry.get(agent_id)
        holder = None if agent is None else (agent.hub or self._rs().name)
        self._answer(reply, {"not_holder": holder})

    def _answer(self, reply: Peer, answer: dict[str, Any], *, durable: bool = False) -> None:
        reply.send(orjson.dumps(answer).decode(), durable=durable)

    def _sent_away(self, record: TaskRecord) -> bool:
        """Whether this hub owns `record` and gave it to an agent on another hub."""
        if self._remote is None or record.owner is not None:
            return False
        agent = self.registry.get(record.assignee)
        return agent is not None and agent.hub is not None

    def _rs(self) -> RemoteState:
        """The remote route's state: only a hub of a cluster has remote agents, stubs
        and owed messages."""
        remote = self._remote
        assert remote is not None, "this router has no cluster port"
        return remote

    def _epoch(self, agent_id: str) -> int:
        agent = self.registry.get(agent_id)
        return 0 if agent is None else agent.epoch

    # What one hub owes another: sent now, re-sent by timers of kind "retry".

    def _owe(
        self, kind: str, task_id: str, body: dict[str, Any], hub: str | None, until: float
    ) -> None:
        """Send a request now and re-send it (100 ms, doubling to 2 s) until it is
        answered (`cluster_reply`), no longer owed, or `until` has passed."""
        owed = Owed(kind=kind, task_id=task_id, hub=hub, body=body, until=until)
        self._rs().owed[owed.key] = owed
        self._send_owed(owed)
        owed.due = self._clock() + owed.delay
        self._schedule(owed.due, "retry", owed.key)

    def _destination(self, owed: Owed) -> str | None:
        """Where `owed` goes now: its hub, or the one holding the task's assignee."""
        if owed.hub is not None:
            return owed.hub
        agent = self.registry.get(owed.body["assignee"])
        return None if agent is None else agent.hub

    def _send_owed(self, owed: Owed) -> None:
        hub = self._destination(owed)
        if hub is None or not self._rs().link_up:
            return  # nowhere to send it now: still owed
        body = owed.body
        if owed.kind == TASK:  # the time left, as it is now
            record = self.tasks.unfinished(owed.task_id)
            left = 0.0 if record is None else record.deadline - self._clock()
            body = {**body, "ttl": round(left, 3) if left > 0 else 0.0}
        self._rs().port.send(hub, owed.kind, body, request=True)

    def _retry(self, key: str) -> None:
        """A re-send timer: send `key` again if it is still owed and due (a timer made
        stale by `_resend` finds it not due yet), or give it up past its deadline."""
        owed = self._rs().owed.get(key)
        now = self._clock()
        if owed is None or owed.due > now:
            return
        if not self._still_owed(owed) or now >= owed.until:
            del self._rs().owed[key]
            self._settle(owed)
            return
        self._send_owed(owed)
        owed.delay = min(2 * owed.delay, RETRY_MAX)
        owed.due = now + owed.delay
        self._schedule(owed.due, "retry", key)

    def _still_owed(self, owed: Owed) -> bool:
        if owed.kind == RESULT:  # the entry itself is the flag: the stub is a row now
            return owed.task_id in self.tasks
        if owed.kind == CANCEL:
            record = self.tasks.get(owed.task_id)
            return record is not None and record.owed_cancel is not None
        if owed.kind == RELEASE:  # (its `task_id` is the requester's ID)
            fence = self._rs().fences.get(owed.task_id)
            return fence is not None and fence[0] == owed.hub
        live = self.tasks.unfinished(owed.task_id)
        return live is not None and live.owed_delivery

    def _settle(self, owed: Owed) -> None:
        """`owed` is owed no more (answered, or given up): clear its flag."""
        if owed.kind == RESULT:  # its row paid: a restart does not send it again
            self.tasks.release(owed.task_id, written=True)
        elif owed.kind == CANCEL:
            record = self.tasks.get(owed.task_id)
            if record is not None and record.owed_cancel is not None:
                record.owed_cancel = None
                self.tasks.update(record)
        elif owed.kind == RELEASE:
            self._lift_fence(owed.task_id, owed.hub)
        else:
            live = self.tasks.unfinished(owed.task_id)
            if live is not None:
                live.owed_delivery = False

    # The owner's side: tasks it gave to agents on other hubs.

    def _deliver_remote(self, record: TaskRecord) -> None:
        """Hand the task to the hub that holds its assignee (`task`), re-sent until that
        hub answers (`owed_delivery`) or the deadline passes. It stays PENDING here until
        that hub says its agent has it; its TTL is this hub's timer."""
        trace = record.forward_trace
        body = {
            "task_id": record.task_id,
            "requester": record.requester,
            "epoch": self._epoch(record.requester),
            "assignee": record.assignee,
            "capability": record.capability,
            "params": record.params,
            "ttl": record.ttl,
            "priority": record.priority,
            "traceparent": record.traceparent if trace is None else trace[0],
            "tracestate": record.tracestate if trace is None else trace[1],
        }
        record.owed_delivery = True
        self._owe(TASK, record.task_id, body, None, record.deadline)

    def _cancel_remote(self, record: TaskRecord) -> None:
        """Send the assignee's hub the cancel owed (`owed_cancel`), re-sent until it
        answers or a second past the deadline (by then that hub has cancelled it)."""
        if record.owed_cancel is None:
            return
        body = {
            "task_id": record.task_id,
            "requester": record.requester,
            "epoch": self._epoch(record.requester),
            "assignee": record.assignee,
            "reason": record.owed_cancel,
        }
        until = max(record.deadline, self._clock()) + STUB_GRACE
        self._owe(CANCEL, record.task_id, body, None, until)

    def _task_answered(self, task_id: str, answer: Mapping[str, Any]) -> None:
        """The assignee's hub answered a `task`: its agent has it (`in_progress`), it
        waits there (`pending`), or it was refused (the task fails)."""
        record = self.tasks.get(task_id)
        if record is None or record.owner is not None:
            return
        if not record.terminal:
            if "refused" in answer:
                self._finish(record, TaskEvent.FAIL, error=str(answer["refused"]))
            elif answer.get("state") == IN_PROGRESS.value and record.state is PENDING:
                self._remote_took(record)
        elif record.ended_by != record.assignee and record.owed_cancel is None:
            # It ended here while the task was on its way: a cancel that overtook the
            # task found nothing there, so the task is cancelled again.
            record.owed_cancel = (
                "timeout" if record.state is TIMEOUT else record.error or "cancelled"
            )
            self.tasks.update(record)
            self._cancel_remote(record)

    def _remote_took(self, record: TaskRecord) -> None:
        """The remote assignee has the task: it is IN_PROGRESS, and its requester hears."""
        record.apply(TaskEvent.DELIVER, now=self._clock(), wall=self._wall())
        self.tasks.update(record)
        if self.events.tasks_watched:
            self.events.emit("task_state", {"task": task_view(record)})
        requester = self._peer_of.get(record.requester)
        if requester is not None:  # news for the requester, as after `_fill`
            info = task_info(record, v2=requester in self._v2)
            self._advise(requester, self._frame(MT.STATUS, info, to=record.requester))

    def _fill_remote(self, agent: AgentRecord) -> None:
        """`_fill` for an agent on another hub, while it is online and has room by this
        hub's count (its limits against the tasks this hub gave it): the waiting tasks go
        to its hub, which queues them again if the agent is full there."""
        if not agent.online:
            return
        own = TO_AGENT + agent.agent_id
        blocked = False  # as in `_fill_from`
        self._filling = True
        try:
            while True:
                keys = [k for k in agent.offered if not agent.limited or agent.has_room(k)]
                entry = self.queue.best(keys if blocked else [*keys, own])
                if entry is None:
                    return
                record = self.tasks.unfinished(entry.task_id)
                assert record is not None, "a queued task is unfinished"
                key = record.capability.strip().lower()
                if entry.key == own and not agent.offers(key):
                    self._finish(
                        record,
                        TaskEvent.FAIL,
                        error=f"agent {agent.agent_id} no longer offers {record.capability!r}",
                    )
                    continue
                if entry.key == own and agent.limited and not agent.has_room(key):
                    blocked = True
                    continue
                self.queue.take(entry)
                record.queue = None
                record.capability = agent.capability_name(key)
                self.tasks.assign(record, agent.agent_id)
                self.registry.assigned(agent, key)
                self.tasks.update(record)
                self._deliver_remote(record)
        finally:
            self._filling = False

    def _on_remote_delivered(self, src: str, body: Mapping[str, Any], reply: Peer) -> None:
        task_id, assignee, epoch = _speaker(body, "assignee")
        moved = None if task_id in self.tasks else self._rs().handed.get(task_id)
        if moved is not None and moved != src:
            self._answer(reply, {"moved": moved})
            return
        if not self._holds(src, assignee, epoch):
            self._not_holder(reply, assignee)
            return
        record = self.tasks.unfinished(task_id)
        if (
            record is not None
            and record.owner is None
            and record.assignee == assignee
            and record.state is PENDING
        ):
            record.owed_delivery = False  # the `task` was answered, if that answer is lost
            self._remote_took(record)
        self._answer(reply, {}, durable=True)

    def _on_remote_result(self, src: str, body: Mapping[str, Any], reply: Peer) -> None:
        """A result of the task's remote assignee: decided here, once. Answered with the
        task's state, the same for the same result again; `task_finished` if the task
        had ended otherwise (a cancel, the TTL)."""
        task_id, assignee, epoch = _speaker(body, "assignee")
        success = field(body, "success", (bool,))
        error = field(body, "error", MAYBE_STR, None)
        record = self.tasks.get(task_id)
        moved = None if record is not None else self._rs().handed.get(task_id)
        if moved is not None and moved != src:  # decided by the requester's new hub
            self._answer(reply, {"moved": moved})
            return
        # Nothing to decide (it ended, or is not ours): said to anyone, lease or not, so
        # that a hub whose agent left stops re-sending.
        if record is None or record.owner is not None or record.assignee != assignee:
            state = "unknown" if record is None else record.state.value
            self._answer(reply, {"task_finished": True, "state": state})
            return
        if record.terminal:
            if record.ended_by == assignee:  # this result, again
                self._answer(reply, {"state": record.state.value})
            else:
                self._answer(reply, {"task_finished": True, "state": record.state.value})
            return
        # The assignee's holder speaks for it; so does the hub this one adopted the task
        # from, for an answer it took before it saw the requester move (`_hand_over`).
        if not self._holds(src, assignee, epoch) and self._rs().adopted.get(task_id) != src:
            self._not_holder(reply, assignee)
            return
        if record.state is PENDING:  # answered before we heard it was delivered: it was
            record.apply(TaskEvent.DELIVER, now=self._clock(), wall=self._wall())
        self._finish(
            record,
            TaskEvent.COMPLETE if success else TaskEvent.FAIL,
            by=assignee,
            success=success,
            data=body.get("data"),
            error=error if error is not None or success else "the agent reported failure",
        )
        self._answer(reply, {"state": record.state.value}, durable=True)

    def _on_remote_progress(self, src: str, body: Mapping[str, Any], reply: Peer) -> None:
        task_id, assignee, epoch = _speaker(body, "assignee")
        fraction = finite(body, "progress", None)
        message = field(body, "message", MAYBE_STR, None)
        traceparent, tracestate = _trace(body)
        if not self._holds(src, assignee, epoch):
            return
        record = self.tasks.unfinished(task_id)
        if record is None or record.owner is not None or record.assignee != assignee:
            return
        progress = p.Progress(
            task_id=record.task_id,
            progress=fraction,
            message=message,
            data=body.get("data"),
            traceparent=traceparent or record.traceparent,
            tracestate=tracestate or record.tracestate,
        )
        if self.events.tasks_watched:
            note = {
                "task_id": record.task_id,
                "progress": progress.progress,
                "message": progress.message,
            }
            self.events.emit("task_progress", {"progress": note})
        requester = self._peer_of.get(record.requester)
        if requester is not None:
            frame = self._frame(MT.PROGRESS, progress, sender=assignee, to=record.requester)
            self._advise(requester, frame)

    # The assignee's side: stubs of tasks other hubs own.

    def _on_remote_task(self, src: str, body: Mapping[str, Any], reply: Peer) -> None:
        """A task for one of our agents, from its owner: kept as a stub, routed here as a
        local task is (to the agent, or into its queue while it is full), never decided
        here. Answered `in_progress` (the agent has it), `pending` (it waits for the
        agent), or `refused`."""
        task_id, requester, epoch = _speaker(body, "requester")
        assignee, capability = field(body, "assignee", STR), field(body, "capability", STR)
        params, ttl = field(body, "params", (dict,)), finite(body, "ttl")
        priority = field(body, "priority", (int,), 0)
        traceparent, tracestate = _trace(body)
        if not 0 <= ttl <= self.config.max_ttl:
            raise BadMessage(f"ttl: must be from 0 to {self.config.max_ttl:g}, got {ttl!r}")
        if priority not in p.PRIORITIES:
            raise BadMessage(f"priority: must be from -100 to 100, got {priority}")
        if not self._holds(src, requester, epoch):
            self._not_holder(reply, requester)
            return
        existing = self.tasks.get(task_id)
        if existing is not None:  # again: the same answer
            state = PENDING.value if existing.state is PENDING else IN_PROGRESS.value
            self._answer(reply, {"state": state}, durable=True)
            return
        agent = self.registry.get(assignee)
        if agent is None or agent.hub is not None:
            self._not_holder(reply, assignee)
            return
        key = capability.strip().lower()
        if not agent.offers(key):
            refusal = f"agent {agent.agent_id} does not offer capability {capability!r}"
            self._answer(reply, {"refused": refusal}, durable=True)
            return
        full = agent.limited and not agent.has_room(key)
        if full and self.queue.full:
            refusal = (
                f"agent {agent.agent_id} is busy, and its hub already holds its maximum "
                f"of {self.config.max_queued} waiting tasks"
            )
            self._answer(reply, {"refused": refusal}, durable=True)
            return
        now, wall = self._clock(), self._wall()
        record = TaskRecord(
            task_id=task_id,
            requester=requester,
            assignee="" if full else agent.agent_id,
            capability=capability if full else agent.capability_name(key),
            params=params,
            ttl=ttl,
            deadline=now + ttl,
            created_at=wall,
            updated_at=wall,
            traceparent=traceparent,
            tracestate=tracestate,
            priority=priority,
            queue=TO_AGENT + agent.agent_id if full else None,
        )
        self.tasks.add(record)
        self._schedule(record.deadline + STUB_GRACE, "stub", task_id)
        if self.events.tasks_watched:
            self.events.emit("task_state", {"task": task_view(record)})
        if full:
            self.queue.push(TO_AGENT + agent.agent_id, task_id, requester, record.priority)
        else:
            self.registry.assigned(agent, key)
            target = self._peer_of.get(agent.agent_id)
            if target is not None:  # before it has an owner: the answer says so, no
                self._deliver(record, target)  # `delivered` is owed
        record.owner = src
        self._answer(reply, {"state": record.state.value}, durable=True)

    def _owe_delivered(self, record: TaskRecord) -> None:
        """A stub that waited reached its agent: tell the owner (`delivered`)."""
        body = {
            "task_id": record.task_id,
            "assignee": record.assignee,
            "epoch": self._epoch(record.assignee),
        }
        record.owed_delivery = True
        self._owe(DELIVERED, record.task_id, body, record.owner, record.deadline)

    def _stub_finished(self, record: TaskRecord) -> None:
        """A stub ends here (called by `_finish`): nobody here is owed its outcome. Unless
        it ends on its owner's word, the end goes to the owner as a `result`, re-sent
        until the owner answers or a second past the deadline; the stub is held in the
        table meanwhile."""
        record.notified = True
        if self._rs().owner_word:
            return
        assert record.owner is not None
        self._owe_result(record, record.owner, record.deadline + STUB_GRACE)

    def _result_again(self, task_id: str, owner: str) -> None:
        """A stub that ended before this hub restarted, its result not yet answered by
        its owner: sent again, for a `resume_grace` at most (its deadline is not kept)."""
        record = self.tasks.get(task_id)
        if record is not None:
            self._owe_result(record, owner, self._clock() + self.config.resume_grace)

    def _owe_result(self, record: TaskRecord, owner: str, until: float) -> None:
        """Send a finished stub's end to its owner as a `result`, re-sent until the
        owner answers or `until`; the stub is held in the table meanwhile."""
        assignee = record.assignee
        if not assignee and record.queue is not None and record.queue.startswith(TO_AGENT):
            assignee = record.queue[len(TO_AGENT) :]  # it never reached its agent
        body = {
            "task_id": record.task_id,
            "assignee": assignee,
            "epoch": self._epoch(assignee),
            "success": bool(record.success),
            "data": record.data,
            "error": record.error,
        }
        self.tasks.hold(record.task_id, owner=owner)
        self._owe(RESULT, record.task_id, body, owner, until)

    def _stub_expired(self, task_id: str, now: float) -> None:
        """A second past a stub's deadline, its owner has said nothing (its cancel was
        lost): the agent is told to stop."""
        record = self.tasks.unfinished(task_id)
        if record is None or record.deadline + STUB_GRACE > now:
            return
        self._rs().owner_word = True
        try:
            self._finish(
                record,
                TaskEvent.EXPIRE,
                error=f"task timed out after {record.ttl:g}s",
                tell_assignee="timeout",
            )
        finally:
            self._rs().owner_word = False

    def _on_remote_cancel(self, src: str, body: Mapping[str, Any], reply: Peer) -> None:
        task_id, requester, epoch = _speaker(body, "requester")
        reason = field(body, "reason", MAYBE_STR, None) or "cancelled by the requester"
        record = self.tasks.unfinished(task_id)
        if record is None or record.owner != src or record.requester != requester:
            self._answer(reply, {}, durable=True)  # nothing to cancel (any more)
            return
        if not self._holds(src, requester, epoch):
            self._not_holder(reply, requester)
            return
        self._rs().owner_word = True
        try:
            if reason == "timeout":  # the owner's TTL: the stub times out too
                error = f"task timed out after {record.ttl:g}s"
                self._finish(record, TaskEvent.EXPIRE, error=error, tell_assignee=reason)
            else:
                self._finish(record, TaskEvent.CANCEL, error=reason, tell_assignee=reason)
        finally:
            self._rs().owner_word = False
        self._answer(reply, {}, durable=True)

    def _progress_remote(self, record: TaskRecord, request: p.Progress) -> None:
        """Progress on a stub goes to its owner: once, unanswered, droppable."""
        remote = self._remote
        if remote is None or not remote.link_up or record.owner is None:
            return
        body = {
            "task_id": record.task_id,
            "assignee": record.assignee,
            "epoch": self._epoch(record.assignee),
            "progress": request.progress,
            "message": request.message,
            "data": request.data,
            "traceparent": request.traceparent,
            "tracestate": request.tracestate,
        }
        remote.port.send(record.owner, PROGRESS, body, request=False)

    # Broadcasts: one message to every hub, each fanning it out to its own agents.

    def _broadcast_remote(self, sender: str, broadcast: p.Broadcast) -> int:
        """Send a local agent's broadcast to every other hub, once, unanswered (at most
        once, as on one hub); how many remote agents it is meant for: the online,
        non-hidden ones in the directory (not confirmed: each hub counts its own)."""
        remote = self._rs()
        if not remote.link_up:
            return 0
        body = {
            "sender": sender,
            "epoch": self._epoch(sender),
            "message": broadcast.message,
            "data": broadcast.data,
        }
        remote.port.send(EVERY_HUB, BROADCAST, body, request=False)
        return sum(1 for a in self.registry if a.hub is not None and a.online and not a.hidden)

    def _on_remote_broadcast(self, src: str, body: Mapping[str, Any], reply: Peer) -> None:
        """A broadcast of an agent on hub `src`, which must hold it: to every online,
        non-hidden agent here, droppable."""
        sender, epoch = field(body, "sender", STR), field(body, "epoch", (int,))
        message = field(body, "message", STR)
        if not self._holds(src, sender, epoch):
            self._quiet.log(
                "cluster",
                logging.WARNING,
                "hub %s sent a broadcast for %s: not its agent",
                src,
                sender,
            )
            return
        payload = p.Broadcast(message=message, data=body.get("data"))
        self._fan_out(sender, self._frame(MT.BROADCAST, payload, sender=sender))
