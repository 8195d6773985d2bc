"""Leases: which hub holds each agent of a cluster, and what happens when that moves
(docs/cluster.md, "Identity"). Pure: no trio, no NATS.

`Leases` is a part of `Router` (a base class of `RemoteRoute`) kept in a module of its
own. An agent's lease is its row in the agents bucket, `{hub, epoch}`. It moves when
the agent resumes on another hub (`_take_over` there, `_lease_lost` on the old holder,
`_send_again` on every owner), when a hub restarted without its store finds its earlier
incarnation's rows (`_orphan`), and when a dead hub's rows are deleted (`_janitor`).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import protocol as p
from ._dispatch import TO_AGENT
from ._remote import (
    CANCEL,
    DELIVERED,
    HANDOVER_LOOKBACK,
    RELEASE,
    RELEASE_WAIT,
    RESULT,
    STR,
    STUB_GRACE,
    TASK,
    BadMessage,
    agent_from_row,
    field,
    task_from_value,
)
from .lifecycle import (
    CANCELLED,
    COMPLETED,
    FAILED,
    PENDING,
    TIMEOUT,
    StateType,
    TaskEvent,
    TaskRecord,
)
from .registry import AgentRecord, token_hash

if TYPE_CHECKING:
    from ._dispatch import DispatchQueues
    from ._journal import Journal
    from ._logs import LogLimiter
    from ._remote import Owed, RemoteState
    from .config import HubConfig
    from .lifecycle import TaskTable
    from .registry import Registry
    from .routing import Peer

__all__ = ["Leases"]

log = logging.getLogger("agentmesh.hub")
# The event that ends a task in each terminal state.
_ENDED_BY: dict[StateType, TaskEvent] = {
    COMPLETED: TaskEvent.COMPLETE,
    FAILED: TaskEvent.FAIL,
    TIMEOUT: TaskEvent.EXPIRE,
    CANCELLED: TaskEvent.CANCEL,
}
MT = p.MessageType


class Leases:
    """The `Router`'s methods for the agents' leases (see the module's docstring)."""

    if TYPE_CHECKING:  # what it uses of the `Router` it is a part of
        config: HubConfig
        registry: Registry
        tasks: TaskTable
        queue: DispatchQueues
        _peer_of: dict[str, Peer]
        _open_requests: dict[str, int]
        _quiet: LogLimiter
        _clock: Callable[[], float]
        _wall: Callable[[], float]
        journal: Journal | None

        _remote: RemoteState | None

        def _rs(self) -> RemoteState: ...

        def directory(
            self, rows: Iterable[Mapping[str, Any]], gone: Iterable[str] = ()
        ) -> None: ...

        def _file_remote(self, agent: AgentRecord, old: AgentRecord | None) -> None: ...

        def _finish(
            self,
            record: TaskRecord,
            event: TaskEvent,
            *,
            success: bool | None = None,
            data: Any = None,
            error: str | None = None,
            by: str | None = ...,
            tell_assignee: str | None = None,
        ) -> None: ...

        def _schedule(self, when: float, kind: str, key: str) -> None: ...

        def _settle(self, owed: Owed) -> None: ...

        def _owe(
            self, kind: str, task_id: str, body: dict[str, Any], hub: str | None, until: float
        ) -> None: ...

        def _answer(
            self, reply: Peer, answer: dict[str, Any], *, durable: bool = False
        ) -> None: ...

        def _deliver_remote(self, record: TaskRecord) -> None: ...

        def _deliver(self, record: TaskRecord, target: Peer) -> None: ...

        def _fill(self, agent: AgentRecord) -> None: ...

        def _tell_assignee(self, record: TaskRecord) -> None: ...

        def _send_owed(self, owed: Owed) -> None: ...

        def _owe_result(self, record: TaskRecord, owner: str, until: float) -> None: ...

        def _cancel_remote(self, record: TaskRecord) -> None: ...

        def _unbind(self, peer: Peer) -> None: ...

        def _frame(
            self,
            type_: p.MessageType,
            payload: Any,
            *,
            sender: str | None = ...,
            to: str | None = None,
            in_reply_to: str | None = None,
        ) -> str: ...

        def _send(
            self, peer: Peer, frame: str, *, outcome_of: str | None = None, durable: bool = False
        ) -> None: ...

    def lease_lost(self, row: Mapping[str, Any]) -> None:
        """The shell could not write this hub's own agent's row: `row`, read back, says
        another hub holds it at the same epoch or a newer one (it won a race to resume
        the agent). The agent is that hub's from now on, as in `directory`."""
        try:
            agent = agent_from_row(row)
        except BadMessage as exc:
            self._quiet.log("directory", logging.WARNING, "not a directory row (%s)", exc)
            return
        old = self.registry.get(agent.agent_id)
        if old is None or old.hub is not None or agent.hub == self._rs().name:
            self.directory((row,))
            return
        if agent.epoch < old.epoch:
            return  # an older lease than this hub's: the shell writes ours over it
        self._lease_lost(old, agent.hub or "")
        self._file_remote(agent, old)

    def takes_over(self, agent_id: str, token: str) -> bool:
        """Whether a resume of `agent_id` with `token` here would take it over from
        another hub (or from an earlier incarnation of this one): the shell then reads
        the tasks it asked for from the tasks bucket first (`prefetch`)."""
        remote = self._remote
        if remote is None:
            return False
        agent = self.registry.get(agent_id)
        if agent is None or agent.hub is None:
            agent = remote.orphans.get(agent_id)
        return (
            agent is not None
            and bool(agent.token_hash)
            and secrets.compare_digest(agent.token_hash, token_hash(token))
        )

    def unknown(self, agent_id: str) -> bool:
        """Whether this hub of a cluster has no record of `agent_id` at all, neither its
        own agent nor another hub's (nor an orphan): its directory watch may not have
        shown the agent's row yet, and the shell reads that row before a resume."""
        remote = self._remote
        return (
            remote is not None
            and self.registry.get(agent_id) is None
            and agent_id not in remote.orphans
        )

    def prefetch(self, agent_id: str, rows: Iterable[Mapping[str, Any]] | None) -> None:
        """The tasks bucket's rows of `agent_id`'s tasks, for its `register` that comes
        next: adopted if it takes the agent over (`_adopt`). None: they could not be
        read, and the take-over is refused (`store_unavailable`): the client keeps its
        ID and tries again. The shell calls `prefetched` once that frame is routed."""
        self._rs().prefetched[agent_id] = None if rows is None else list(rows)

    def prefetched(self, agent_id: str) -> None:
        """The `register` the rows were read for was routed: whatever it did, they are
        of no more use (a later resume reads them again)."""
        self._rs().prefetched.pop(agent_id, None)

    def _orphan(self, agent: AgentRecord) -> None:
        """A row that names this hub for an agent it does not hold: left by an earlier
        incarnation of this hub, restarted without its store. The agent may resume here
        (its token checked against the row, as a take-over) for `resume_grace`; after
        that its row is deleted, and every hub drops it."""
        remote = self._rs()
        if agent.agent_id not in remote.orphans:
            self._schedule(self._clock() + self.config.resume_grace, "orphan", agent.agent_id)
        remote.orphans[agent.agent_id] = agent

    def _orphan_expired(self, agent_id: str) -> None:
        """An orphan's `resume_grace` is over: its row goes."""
        remote = self._rs()
        if remote.orphans.pop(agent_id, None) is not None:
            remote.port.forget(agent_id, remote.name)

    def _may_take_over(self, agent: AgentRecord, tasks_read: bool = True) -> None:
        """A resume of `agent`, held by another hub, may take its lease over only if
        this hub can check the token (the row carries its hash), can write the bucket
        (the link is up), and could read the tasks it asked for (`tasks_read`). Else it
        is refused with `store_unavailable`, not answered with a fresh identity, so that
        the client keeps its ID and tries again or elsewhere."""
        if agent.token_hash and self._rs().link_up and tasks_read:
            return
        why = (
            "cannot check its token"
            if not agent.token_hash
            else "is cut off from the cluster"
            if not self._rs().link_up
            else "could not read the tasks it asked for"
        )
        raise p.ProtocolError(
            p.ErrorCode.STORE_UNAVAILABLE,
            f"agent {agent.agent_id} is held by hub {agent.hub}, and this hub {why}: try "
            "again, or connect to that hub",
        )

    def _take_over(self, agent: AgentRecord) -> None:
        """A resume here with the right token takes over the lease of `agent`, held by
        another hub (which is dead, or lost the agent's connection): the agent is this
        hub's from now on, at the next epoch. The shell writes its row with a
        compare-and-set on the row it last saw, so of two hubs taking it at once one
        wins (the other hears of it: `lease_lost`). The tasks this hub gave the agent
        are delivered here now, in the resume's catch-up; the owners of the others send
        them here once the directory tells them of the move. The tasks it asked for
        there are this hub's once it is registered here (`_adopt`)."""
        self._rs().orphans.pop(agent.agent_id, None)
        for record in self.tasks.of_assignee(agent.agent_id, finished=False):
            if record.owner is None:
                record.owed_delivery = False  # it is here now: no `task` owed elsewhere
        log.info("agent %s (%s) taken over from hub %s", agent.agent_id, agent.name, agent.hub)

    def _adopt(self, agent: AgentRecord, old_hub: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Take over the tasks `agent` asked for on its old hub, `old_hub`, with the
        tasks bucket's rows of them (read before its `register` was routed): this hub
        decides them from now on. The stubs this hub had of
        them become its own first (`_own_stubs`). Of the others, an unfinished one runs
        on with its TTL (from its wall-clock deadline) and goes to its assignee again (at
        least once: the agent's hub drops a second copy, the SDK's `Agent` one it runs
        already), or waits in the queue here; a finished one whose outcome the agent
        has not had is sent in the resume's catch-up (which follows). The rows of these
        tasks, which this hub writes now, wait for the old hub's release (`_fence`)."""
        agent_id = agent.agent_id
        found: dict[str, tuple[TaskRecord, float | None, Mapping[str, Any]]] = {}
        for value in rows:
            try:
                record, deadline = task_from_value(value)
            except BadMessage as exc:
                self._quiet.log("task row", logging.WARNING, "not a task row (%s)", exc)
                continue
            if record.requester == agent_id:
                found[record.task_id] = (record, deadline, value)
        if self._own_stubs(agent_id, {k: v[0] for k, v in found.items()}) or found:
            self._fence(agent, old_hub)
        offset = self._wall() - self._clock()
        queued = False
        for record, deadline, value in found.values():
            if record.task_id in self.tasks:
                continue
            self._rs().handed.pop(record.task_id, None)  # it is back: decided here again
            if record.state.terminal:
                # The catch-up sends its outcome if the agent was not told, or says it
                # still waits for it (told on a connection that broke before it read it).
                self.tasks.add(record)
                if record.owed_cancel is not None:  # and the cancel owed goes on
                    self._tell_assignee(record)
                continue
            assert deadline is not None
            record.deadline = deadline - offset
            self.tasks.add(record)
            if type(writer := value.get("hub")) is str:  # may still report its outcome
                self._rs().adopted[record.task_id] = writer
                self._schedule(record.deadline + STUB_GRACE, "moved", record.task_id)
            self._open_requests[agent_id] = self._open_requests.get(agent_id, 0) + 1
            self._schedule(record.deadline, "ttl", record.task_id)
            if record.queue is not None:
                self.queue.push(record.queue, record.task_id, agent_id, record.priority)
                queued = True
                continue
            assignee = self.registry.get(record.assignee)
            if assignee is None:
                self._finish(
                    record, TaskEvent.FAIL, error=f"agent {record.assignee} left the cluster"
                )
                continue
            self.registry.assigned(assignee, record.capability.strip().lower())
            if assignee.hub is not None:
                self._deliver_remote(record)
            elif (peer := self._peer_of.get(assignee.agent_id)) is not None:
                self._deliver(record, peer)
            # else its agent gets it when it resumes here (the resume's catch-up)
        if queued:  # an agent with room may be waiting for nothing else
            for agent in list(self.registry):
                if agent.online:
                    self._fill(agent)
        log.debug("took over the tasks of agent %s", agent_id)

    @property
    def fenced(self) -> Collection[str]:
        """The requesters whose task rows the shell holds back for now (`_fence`)."""
        remote = self._remote
        return () if remote is None else remote.fences.keys()

    def _fence(self, agent: AgentRecord, old_hub: str) -> None:
        """`agent` was taken over from `old_hub`. Until that hub says it writes no row
        of the agent's tasks any more (`release`), the shell holds back this hub's
        writes of them: the task rows are not compare-and-set, and a commit the old hub
        made before it saw the move may still be on its way to NATS, to land after them
        (docs/cluster.md, Identity). The release is asked for again (100 ms, doubling)
        for `RELEASE_WAIT` at most; a dead hub is not asked."""
        remote = self._rs()
        if old_hub == remote.name or old_hub in remote.dead_hubs:
            return
        until = self._clock() + RELEASE_WAIT
        remote.fences[agent.agent_id] = (old_hub, until)
        self._schedule(until, "fence", agent.agent_id)
        body = {"requester": agent.agent_id, "epoch": agent.epoch}
        self._owe(RELEASE, agent.agent_id, body, old_hub, until)

    def _lift_fence(self, requester: str, hub: str | None) -> None:
        """`hub` released `requester`, or the wait is over: the rows held back go with
        the next commit, which this wakes."""
        remote = self._rs()
        fence = remote.fences.get(requester)
        if fence is not None and fence[0] == hub:
            del remote.fences[requester]
            remote.owed.pop(f"{RELEASE}:{requester}", None)  # (`Owed.key`) asked no more
            if self.journal is not None:
                self.journal.wake()

    def _on_remote_release(self, src: str, body: Mapping[str, Any], reply: Peer) -> None:
        """Hub `src` took `requester` over at `epoch` and asks whether this hub, its old
        holder, still writes rows of the requester's tasks. Not once it has seen the
        move: a hub writes only the rows of its own agents' tasks, and those it wrote
        before went out to NATS ahead of this answer. So the answer is
        `{"released": true}`, unless this hub holds the requester still, at an older
        epoch (its directory has not shown the move yet): then `false`, and `src` asks
        again. This hub acts on nothing in it: a hub's word on another's lease is only
        the directory's."""
        requester, epoch = field(body, "requester", STR), field(body, "epoch", (int,))
        agent = self.registry.get(requester)
        holding = agent is not None and agent.hub is None and agent.epoch < epoch
        self._answer(reply, {"released": not holding})

    def _own_stubs(self, agent_id: str, rows: Mapping[str, TaskRecord]) -> bool:
        """The stubs this hub has of tasks `agent_id` asked for on its old hub (their
        agents are this hub's) are decided here from now on: this hub is the only one
        that can tell it their outcome. The old holder may have decided one before its
        word of it reached here; the task's row (in `rows`, if it has one) says so, and
        that decision stands:

        - a stub still running ends as its row says, if the row is finished
          (`_ended_there`);
        - a stub whose agent answered, the result still owed to the old holder, takes
          its row's outcome if the row is finished, and is told here if it is not. With
          no row (it goes once the outcome is written whole to the requester, and the
          cancel owed to the agent's hub is answered) it is told only if the agent
          says it waits for it: the catch-up's rule for an outcome written whole.

        Returns whether it found any."""
        owned = False
        for record in self.tasks.of_requester(agent_id, finished=False):
            if record.owner is None:
                continue
            owned = True
            record.owner = None
            record.owed_delivery = False
            self._open_requests[agent_id] = self._open_requests.get(agent_id, 0) + 1
            self._schedule(record.deadline, "ttl", record.task_id)  # the owner's timer
            row = rows.get(record.task_id)
            if row is not None and row.state.terminal:
                self._ended_there(record, row)
            else:
                self.tasks.update(record)  # this hub's to store, and to write to KV
        remote = self._rs()
        for key, owed in list(remote.owed.items()):
            if owed.kind != RESULT:
                continue
            ended = self.tasks.get(owed.task_id)
            if ended is None or ended.requester != agent_id:
                continue
            owned = True
            del remote.owed[key]  # told to the requester here, not to its old hub
            self._settle(owed)
            row = rows.get(owed.task_id)
            if row is not None and row.state.terminal:
                self.tasks.remove(ended.task_id)
                self.tasks.add(row)
                continue
            ended.notified = row is None  # the catch-up tells it again if it is awaited
            self.tasks.update(ended)
        return owned

    def _ended_there(self, record: TaskRecord, row: TaskRecord) -> None:
        """`record`, a stub made this hub's own, was decided by the old holder (as
        `row` says) before its word reached here: a cancel or a timeout on its way, say.
        It ends here the same way, and its agent is told to stop unless the agent ended
        it. The requester hears the outcome in the resume's catch-up, which follows
        (unless the row says it was told and the requester does not wait for it)."""
        event = _ENDED_BY[row.state]
        if event is TaskEvent.COMPLETE and record.state is PENDING:
            record.apply(TaskEvent.DELIVER, now=self._clock(), wall=self._wall())
        stop = None
        if row.ended_by != record.assignee:  # the agent may still be working on it
            stop = "timeout" if event is TaskEvent.EXPIRE else row.owed_cancel or row.error
            stop = stop or "ended by the requester's hub"
        record.notified = True  # not now: the catch-up decides, by the row's word
        self._finish(
            record,
            event,
            success=row.success,
            data=row.data,
            error=row.error,
            by=row.ended_by,
            tell_assignee=stop,
        )
        record.notified = row.notified
        self.tasks.update(record)

    def _lost_with_its_hub(self, peer: Peer, agent_id: str, awaiting: Iterable[str]) -> None:
        """After a take-over, the tasks the agent says it waits for that this hub has
        never heard of were decided by its old hub, and their outcomes cannot reach it
        here: each fails, so that it waits for none of them for ever."""
        for task_id in awaiting:
            if task_id in self.tasks:
                continue
            error = (
                f"task {task_id} was asked for on the agent's previous hub, which is gone "
                "or gave it up, and the cluster kept no record of it"
            )
            outcome = p.outcome_payload(task_id, "failed", False, None, error, None, None)
            self._send(peer, self._frame(MT.RESULT, outcome, to=agent_id))

    def _lease_lost(self, agent: AgentRecord, hub: str) -> None:
        """This hub's own `agent` resumed on `hub`: its connection here is closed, and
        the stubs it held here end without a word to their owners (who send the tasks to
        its new hub). The tasks it asked for here are `hub`'s to decide now
        (`_hand_over`)."""
        peer = self._peer_of.get(agent.agent_id)
        if peer is not None:
            self._unbind(peer)
            peer.close(p.CLOSE_REPLACED, f"this agent resumed on hub {hub}")
        reason = f"agent {agent.agent_id} moved to hub {hub}"
        remote = self._rs()
        remote.owner_word = True
        try:
            for record in self.tasks.of_assignee(agent.agent_id, finished=False):
                if record.owner is not None:
                    self._finish(record, TaskEvent.CANCEL, error=reason)
            for task_id in self.queue.under(TO_AGENT + agent.agent_id):
                waiting = self.tasks.unfinished(task_id)
                if waiting is not None and waiting.owner is not None:
                    self._finish(waiting, TaskEvent.CANCEL, error=reason)
            self._hand_over(agent.agent_id, hub)
        finally:
            remote.owner_word = False
        for key, owed in list(remote.owed.items()):  # it speaks for the agent no more
            if owed.kind in (RESULT, DELIVERED) and owed.body.get("assignee") == agent.agent_id:
                del remote.owed[key]
                self._settle(owed)
        remote.fences.pop(agent.agent_id, None)  # its rows are `hub`'s now
        log.info("agent %s (%s) moved to hub %s", agent.agent_id, agent.name, hub)

    def _hand_over(self, requester: str, hub: str) -> None:
        """This hub's own `requester` resumed on `hub`, which decides the tasks it asked
        for here from now on (it read them from the tasks bucket). Each one given to an
        agent here becomes a stub of `hub`'s, so that the agent's result goes there;
        the others are forgotten here (their assignees' hubs send their results to
        `hub`, as the directory tells them of the move)."""
        remote = self._rs()
        for record in self.tasks.of_requester(requester, finished=False):
            if record.owner is not None:
                continue
            self._open_requests[requester] = self._open_requests.get(requester, 1) - 1
            owed = remote.owed.pop(f"{TASK}:{record.task_id}", None)  # (`Owed.key`)
            if owed is not None:
                self._settle(owed)
            agent = self.registry.get(record.assignee)
            if record.queue is None and agent is not None and agent.hub is None:
                record.owner = hub
                self.tasks.update(record)
                self._schedule(record.deadline + STUB_GRACE, "stub", record.task_id)
                continue
            if record.queue is not None:
                self.queue.discard(record.task_id)
            elif agent is not None:
                self.registry.finished(agent.agent_id, record.capability)
            self.tasks.remove(record.task_id)
            remote.handed[record.task_id] = hub  # a late `result` here is sent on there
            self._schedule(record.deadline + STUB_GRACE, "moved", record.task_id)
        if not self._open_requests.get(requester, 1):
            del self._open_requests[requester]
        sent_on = set()
        for ended in self.tasks.owed(requester):  # outcomes it owed: `hub`'s to tell now
            if ended.requester != requester:
                continue
            if ended.owed_cancel is not None:  # kept for the cancel its agent is owed,
                if not ended.notified:  # but its outcome is not this hub's to tell:
                    ended.notified = True  # should the requester come back, `hub`'s
                    self.tasks.update(ended)  # word (its row) is told, not this one
                continue
            if ended.ended_by and ended.ended_by == ended.assignee:
                self._send_on(ended, hub)
                sent_on.add(ended.task_id)
            else:  # its TTL, a cancel: `hub` decides those from the row it read
                self.tasks.remove(ended.task_id)
        # And those told on the requester's old connection lately, which may have been
        # dead already (this hub had not noticed): maybe never read. (A finished row
        # keeps no owner: those just sent on are known by their IDs.)
        for ended in self.tasks.finished_since(requester, self._clock() - HANDOVER_LOOKBACK):
            if (
                ended.task_id not in sent_on
                and ended.owed_cancel is None
                and ended.ended_by
                and ended.ended_by == ended.assignee
            ):
                self._send_on(ended, hub)

    def _send_on(self, ended: TaskRecord, hub: str) -> None:
        """A task's agent answered here after `hub` read the tasks bucket, maybe (before
        this hub saw its requester move): `hub` may not know it. The answer goes there as
        a finished stub's result does (`hub` takes it from the hub it adopted the task
        from; one it had already decided, or knows nothing of, it answers and drops),
        re-sent for `resume_grace` at most."""
        ended.owner, ended.notified = hub, True
        self.tasks.update(ended)
        self._owe_result(ended, hub, self._clock() + self.config.resume_grace)

    def _follow_requester(self, requester: AgentRecord) -> None:
        """The lease of a remote `requester` moved: the stubs here of tasks it asked
        for are its new hub's now (which took them over from the tasks bucket), and so
        are their results and `delivered` owed, sent there at once."""
        hub = requester.hub
        for record in self.tasks.of_requester(requester.agent_id, finished=False):
            if record.owner is not None:
                record.owner = hub
                self.tasks.update(record)
        for owed in list(self._rs().owed.values()):
            if owed.kind not in (RESULT, DELIVERED) or owed.hub == hub:
                continue
            stub = self.tasks.get(owed.task_id)
            if stub is not None and stub.requester == requester.agent_id:
                owed.hub = hub
                if owed.kind == RESULT and hub is not None:  # and after a restart too
                    self.tasks.stub_owner(owed.task_id, hub)
                self._send_owed(owed)

    def _send_again(self, agent: AgentRecord) -> None:
        """The lease of a remote `agent` moved: the unfinished tasks this hub gave it
        are owed to its new hub (re-sent at once, at least once), and so are the cancels
        owed for it."""
        for record in self.tasks.of_assignee(agent.agent_id, finished=False):
            if record.owner is None:
                self._deliver_remote(record)
        for key, owed in list(self._rs().owed.items()):
            if owed.kind == CANCEL and owed.body.get("assignee") == agent.agent_id:
                del self._rs().owed[key]
                ended = self.tasks.get(owed.task_id)
                if ended is not None:
                    self._cancel_remote(ended)

    def _janitor(self, hub: str, now: float) -> None:
        """`hub` has been silent for `resume_grace`: its agents did not resume anywhere
        in time, and their rows are deleted from the bucket (`ClusterPort.forget`; a
        race between hubs doing it is harmless). Every hub, this one too, then drops
        them as the directory says they are gone."""
        remote = self._rs()
        since = remote.dead_hubs.get(hub)
        if since is None or since + self.config.resume_grace > now or not remote.link_up:
            return  # back, or silent since later, or this hub cannot tell (cut off)
        for agent in self.registry:
            if agent.hub == hub:
                remote.port.forget(agent.agent_id, hub)
