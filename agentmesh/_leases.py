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
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import protocol as p
from ._dispatch import TO_AGENT
from ._remote import CANCEL, DELIVERED, RESULT, BadMessage, agent_from_row
from .lifecycle import TaskEvent, TaskRecord
from .registry import AgentRecord

if TYPE_CHECKING:
    from ._dispatch import DispatchQueues
    from ._logs import LogLimiter
    from ._remote import Owed, RemoteState
    from .config import HubConfig
    from .lifecycle import TaskTable
    from .registry import Registry
    from .routing import Peer

__all__ = ["Leases"]

log = logging.getLogger("agentmesh.hub")
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

        def _deliver_remote(self, record: TaskRecord) -> None: ...

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

    def _may_take_over(self, agent: AgentRecord) -> None:
        """A resume of `agent`, held by another hub, may take its lease over only if
        this hub can check the token (the row carries its hash) and can write the
        bucket (the link is up). Else it is refused with `store_unavailable`, not
        answered with a fresh identity, so that the client keeps its ID and tries again
        or elsewhere."""
        if agent.token_hash and self._rs().link_up:
            return
        why = "is cut off from the cluster" if agent.token_hash else "cannot check its token"
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
        them here once the directory tells them of the move."""
        self._rs().orphans.pop(agent.agent_id, None)
        for record in self.tasks.of_assignee(agent.agent_id, finished=False):
            if record.owner is None:
                record.owed_delivery = False  # it is here now: no `task` owed elsewhere
        # The stubs here of tasks it asked for on its old hub are decided here from now
        # on: this hub is the only one that can tell it their outcome.
        for record in self.tasks.of_requester(agent.agent_id, finished=False):
            if record.owner is not None:
                record.owner = None
                record.owed_delivery = False
                self._open_requests[record.requester] = (
                    self._open_requests.get(record.requester, 0) + 1
                )
                self._schedule(record.deadline, "ttl", record.task_id)  # the owner's timer
        remote = self._rs()
        for key, owed in list(remote.owed.items()):
            if owed.kind != RESULT:
                continue
            ended = self.tasks.get(owed.task_id)
            if ended is not None and ended.requester == agent.agent_id:
                del remote.owed[key]  # told to the requester here, not to its old hub
                self._settle(owed)
                ended.notified = False
                self.tasks.update(ended)
        log.info("agent %s (%s) taken over from hub %s", agent.agent_id, agent.name, agent.hub)

    def _lost_with_its_hub(self, peer: Peer, agent_id: str, awaiting: Iterable[str]) -> None:
        """After a take-over, the tasks the agent says it waits for that this hub has
        never heard of were decided by its old hub, and their outcomes cannot reach it
        here: each fails, so that it waits for none of them for ever."""
        for task_id in awaiting:
            if task_id in self.tasks:
                continue
            error = (
                f"task {task_id} was asked for on the agent's previous hub, which is gone "
                "or gave it up; tasks do not follow their requester to another hub yet"
            )
            outcome = p.outcome_payload(task_id, "failed", False, None, error, None, None)
            self._send(peer, self._frame(MT.RESULT, outcome, to=agent_id))

    def _lease_lost(self, agent: AgentRecord, hub: str) -> None:
        """This hub's own `agent` resumed on `hub`: its connection here is closed, and
        the stubs it held here end without a word to their owners (who send the tasks to
        its new hub). Tasks it asked for here cannot follow it yet (the tasks bucket is
        not built): they are cancelled, as for a requester that left."""
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
            for record in self.tasks.of_requester(agent.agent_id, finished=False):
                self._finish(
                    record,
                    TaskEvent.CANCEL,
                    error=f"requester left: {reason}",
                    tell_assignee=f"requester left: {reason}",
                )
        finally:
            remote.owner_word = False
        for key, owed in list(remote.owed.items()):  # it speaks for the agent no more
            if owed.kind in (RESULT, DELIVERED) and owed.body.get("assignee") == agent.agent_id:
                del remote.owed[key]
                self._settle(owed)
        log.info("agent %s (%s) moved to hub %s", agent.agent_id, agent.name, hub)

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
