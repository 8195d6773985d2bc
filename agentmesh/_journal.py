"""What changed since the last commit: the keys of changed tasks and agents. Pure.

The task table and the registry mark what they change here, when the hub has a durable
store; the router turns the marks into rows (`Router.take_changes`) once per batch of
routing work. Only keys are kept, so a task changed ten times in one batch is written
once, as it is at the end of the batch.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["Journal"]


class Journal:
    """Changed and removed keys; `wake()` is called when the first change of a batch
    arrives, so that the Trio layer can start a commit."""

    def __init__(self, wake: Callable[[], None] = lambda: None) -> None:
        self.wake = wake
        # In a cluster a written outcome is worth a commit of its own: its row leaves
        # the tasks bucket then (else it waits there for the hub's next change).
        self.commit_written = False
        self.tasks: dict[int, None] = {}  # sequence numbers of changed tasks
        self.gone_tasks: dict[int, None] = {}  # ... of removed ones
        self.agents: dict[str, None] = {}  # IDs of changed agents
        self.gone_agents: dict[str, None] = {}
        self.written: dict[int, None] = {}  # tasks whose outcome was written whole

    def __bool__(self) -> bool:
        return bool(self.tasks or self.gone_tasks or self.agents or self.gone_agents)

    def task(self, seq: int) -> None:
        if not self.tasks:
            self.wake()
        self.tasks[seq] = None

    def task_gone(self, seq: int) -> None:
        self.tasks.pop(seq, None)
        self.gone_tasks[seq] = None
        self.wake()

    def outcome_written(self, seq: int) -> None:
        """The task's outcome reached its requester's socket. Not worth a commit of its
        own (until it is stored, a crash only sends the outcome again): it goes with
        the next one, unless `commit_written`."""
        if self.commit_written and not self.written:
            self.wake()
        self.written[seq] = None

    def agent(self, agent_id: str) -> None:
        self.gone_agents.pop(agent_id, None)
        self.agents[agent_id] = None
        self.wake()

    def agent_gone(self, agent_id: str) -> None:
        self.agents.pop(agent_id, None)
        self.gone_agents[agent_id] = None
        self.wake()

    def take(self) -> tuple[list[int], list[int], list[str], list[str], list[int]]:
        """The marks so far (changed tasks, removed tasks, changed agents, removed
        agents, written outcomes of tasks not otherwise changed), leaving the journal
        empty."""
        tasks, gone = self.tasks, self.gone_tasks
        taken = (
            list(tasks),
            list(gone),
            list(self.agents),
            list(self.gone_agents),
            [s for s in self.written if s not in tasks and s not in gone],
        )
        self.tasks, self.gone_tasks, self.agents, self.gone_agents = {}, {}, {}, {}
        self.written = {}
        return taken
