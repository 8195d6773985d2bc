"""What the MCP bridge knows of the tasks delegated through it, and what its tools and
resources show of tasks and agents (the dicts are also the tools' MCP output schemas)."""

from __future__ import annotations

from collections import deque
from typing import Any, Literal, cast

import attrs
import trio
from typing_extensions import NotRequired, TypedDict

from . import protocol as p
from .client import TaskHandle
from .errors import TaskError

RECENT_PROGRESS = 64  # progress frames kept per task for the calls that forward them
TaskStateName = Literal["pending", "in_progress", "completed", "failed", "timeout", "cancelled"]
_ENDED = {"failed": "failed", "timeout": "timed out", "cancelled": "was cancelled"}


class CapabilityView(TypedDict):
    name: str
    description: str
    params_schema: dict[str, Any] | None


class AgentView(TypedDict):
    agent_id: str
    name: str
    description: str
    online: bool
    capabilities: list[CapabilityView]


class AgentList(TypedDict):
    agents: list[AgentView]


class ProgressView(TypedDict):
    progress: float | None  # 0 to 1, if the agent said
    message: str | None


class TaskView(TypedDict):
    task_id: str
    state: TaskStateName
    done: bool
    agent_id: str
    capability: str
    result: NotRequired[Any]  # once completed (not in list_tasks)
    error: NotRequired[str]  # in list_tasks, for a task that ended without success
    last_progress: NotRequired[ProgressView]  # in the task resource, once reported


class TaskList(TypedDict):
    tasks: list[TaskView]
    total: int  # tasks matching the filter, before the limit


class HubStatus(TypedDict):
    hub_url: str
    hub_version: str
    uptime_seconds: float
    agents: int
    agents_online: int
    hub_tasks: dict[str, int]
    bridge_agent_id: str | None
    bridge_tasks: dict[str, int]


class Broadcasted(TypedDict):
    recipients: int


@attrs.define(eq=False)
class Delegation:
    """A task delegated through the bridge. `read`: the model has seen how it ended.
    `frames` counts its progress frames; the latest `RECENT_PROGRESS` are in `recent`,
    without their `data` (only `progress` and `message` are shown or forwarded, and a
    frame's data may be large)."""

    handle: TaskHandle
    capability: str
    deadline: float  # on trio's clock: when the hub times the task out
    read: bool = False
    frames: int = 0
    recent: deque[p.Progress] = attrs.field(factory=lambda: deque(maxlen=RECENT_PROGRESS))
    changed: trio.Event = attrs.field(factory=trio.Event)  # set, and replaced, on news

    def ended(self) -> bool:
        return self.handle.done

    def add(self, frame: p.Progress) -> None:
        self.frames += 1
        self.recent.append(attrs.evolve(frame, data=None) if frame.data is not None else frame)
        self.bump()

    def bump(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def since(self, seen: int) -> list[p.Progress]:
        """The progress frames after the first `seen` (those still kept)."""
        return list(self.recent)[max(0, len(self.recent) - (self.frames - seen)) :]

    def view(self, *, with_result: bool, with_progress: bool = False) -> TaskView:
        handle = self.handle
        view = TaskView(
            task_id=handle.task_id,
            state=state_of(handle),
            done=handle.done,
            agent_id=handle.agent_id,
            capability=self.capability,
        )
        error = error_of(handle)
        if error is not None:
            view["error"] = error
        elif with_result and handle.outcome is not None:
            view["result"] = handle.outcome.data
        if with_progress and self.recent:
            last = self.recent[-1]
            view["last_progress"] = ProgressView(progress=last.progress, message=last.message)
        return view

    def failure(self) -> str | None:
        """The sentence telling how the task ended without success, if it did."""
        error = error_of(self.handle)
        if error is None:
            return None
        handle = self.handle
        how = _ENDED.get(state_of(handle), "failed")
        return (
            f"Task {handle.task_id} ({self.capability} on agent {handle.agent_id}) "
            f"{how}: {error.rstrip('.')}."
        )


async def record_ended(record: Delegation) -> None:
    """Return once the task has ended, however it ended."""
    try:
        await record.handle.wait()
    except TaskError:
        pass


def state_of(handle: TaskHandle) -> TaskStateName:
    if handle.done and handle.outcome is None:
        return "failed"  # lost in a hub restart
    return cast(TaskStateName, handle.state)


def error_of(handle: TaskHandle) -> str | None:
    outcome = handle.outcome
    if not handle.done or (outcome is not None and outcome.success):
        return None
    if outcome is None:
        return "the hub restarted and lost the task"
    return outcome.error or f"the task ended in state {outcome.state}"


def agent_view(agent: p.AgentInfo) -> AgentView:
    return AgentView(
        agent_id=agent.agent_id,
        name=agent.name,
        description=agent.description,
        online=agent.online,
        capabilities=[
            CapabilityView(name=c.name, description=c.description, params_schema=c.params_schema)
            for c in agent.capabilities
        ],
    )
