"""The MCP bridge: an agentmesh network as six tools for Claude Code (or any MCP client).

    agentmesh bridge --hub ws://127.0.0.1:8765

serves MCP over stdio. The bridge holds one hub connection as a hidden agent named
``mcp-bridge`` (left out of discover and broadcasts) and keeps it alive on its own;
tools called while the hub is down fail with a clear sentence after `Bridge.hub_wait`
seconds, and the process stays up.

MCP clients such as Claude Code ignore notifications, so the bridge is pull-only: every
tool blocks for a bounded time at most, and the outcome of each task delegated through
the bridge is kept (the latest `MAX_TASKS`) until the model reads it.

The `mcp` package is an optional extra, imported only when the server is built, so this
module imports without it.
"""

# No `from __future__ import annotations` here: the MCP SDK reads the tool signatures at
# run time, and their `pydantic.Field`s exist only inside `build_server`.

import argparse
import logging
import os
import sys
from collections.abc import Awaitable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar, cast

import attrs
import trio
from typing_extensions import NotRequired, TypedDict

from . import protocol as p
from ._version import __version__
from .client import Backoff, Client, TaskHandle
from .errors import (
    AgentMeshError,
    ConnectionLost,
    HubError,
    NoCapableAgent,
    TaskError,
    Unauthorized,
    UnknownAgent,
)

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

__all__ = ["Bridge", "BridgeError", "bridge_main", "build_server", "serve_stdio"]

log = logging.getLogger("agentmesh.bridge")

MISSING_EXTRA = "the MCP bridge needs the mcp extra: pip install 'agentmesh-hub[mcp]'"
MAX_TASKS = 1000  # tasks remembered at most; the oldest finished ones are forgotten first
MAX_WAIT = 60.0  # seconds a tool may block waiting for a task
DEFAULT_TTL = 300.0
# A local hub that comes back should be found again within a couple of seconds.
RECONNECT = Backoff(base=0.1, cap=2.0)
REFUSED_RETRY = 30.0  # seconds between tries when the hub refuses the bridge itself

T = TypeVar("T")
TaskStateName = Literal["pending", "in_progress", "completed", "failed", "timeout", "cancelled"]
_ENDED = {"failed": "failed", "timeout": "timed out", "cancelled": "was cancelled"}


class BridgeError(Exception):
    """A tool call failed. The message is one sentence for the model to read."""


# ---------------------------------------------------------------------------------------
# What the tools return (also their MCP output schemas)


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


class TaskView(TypedDict):
    task_id: str
    state: TaskStateName
    done: bool
    agent_id: str
    capability: str
    result: NotRequired[Any]  # once completed (not in list_tasks)
    error: NotRequired[str]  # in list_tasks, for a task that ended without success


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


# ---------------------------------------------------------------------------------------
# The bridge: the hub side of the tools


@attrs.define
class _Delegation:
    """A task delegated through the bridge. `read`: the model has seen how it ended."""

    handle: TaskHandle
    capability: str
    read: bool = False

    def view(self, *, with_result: bool) -> TaskView:
        handle = self.handle
        view = TaskView(
            task_id=handle.task_id,
            state=_state(handle),
            done=handle.done,
            agent_id=handle.agent_id,
            capability=self.capability,
        )
        error = _error(handle)
        if error is not None:
            view["error"] = error
        elif with_result and handle.outcome is not None:
            view["result"] = handle.outcome.data
        return view

    def failure(self) -> str | None:
        """The sentence telling how the task ended without success, if it did."""
        error = _error(self.handle)
        if error is None:
            return None
        handle = self.handle
        how = _ENDED.get(_state(handle), "failed")
        return (
            f"Task {handle.task_id} ({self.capability} on agent {handle.agent_id}) "
            f"{how}: {error.rstrip('.')}."
        )


class Bridge:
    """One hub connection, as agent ``mcp-bridge``, and the tasks delegated through it.

    Every method that talks to the hub waits at most `hub_wait` seconds for it (to
    connect and to answer) and raises `BridgeError` with a sentence for the model on
    any failure. `token` is presented to the hub at the handshake.
    """

    def __init__(
        self,
        hub_url: str,
        *,
        token: str | None = None,
        hub_wait: float = 5.0,
        max_tasks: int = MAX_TASKS,
        backoff: Backoff = RECONNECT,
    ) -> None:
        self.client = Client(
            hub_url,
            name="mcp-bridge",
            description="The MCP bridge: a language model working the network",
            backoff=backoff,
            connect_timeout=5.0,
            hidden=True,
            token=token,
        )
        self.hub_wait = hub_wait
        self.max_tasks = max_tasks
        self._tasks: dict[str, _Delegation] = {}  # oldest first
        self._refusal: str | None = None  # why the hub last refused the bridge itself

    # ---------------------------------------------------------------------------------
    # Running

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the hub connection until `aclose()` or cancellation, reconnecting on its own.

        Reports to `nursery.start` at once: a hub that is down, now or later, is retried
        in the background while the tools say so. A hub that refuses the bridge (its
        token, or it is full) is retried every `REFUSED_RETRY` seconds while the tools
        say why; nothing the hub does ends this.
        """
        task_status.started()
        while True:
            self._refusal = None
            try:
                await self.client.serve()
                return
            except (AgentMeshError, p.ProtocolError) as exc:
                self._refusal = self._describe_refusal(exc)
                log.warning("%s Retrying in %gs.", self._refusal, REFUSED_RETRY)
            await trio.sleep(REFUSED_RETRY)

    def _describe_refusal(self, exc: Exception) -> str:
        url = self.client.url
        if not isinstance(exc, Unauthorized):
            return f"The hub at {url} refused the bridge: {exc}."
        how = "--token (or AGENTMESH_TOKEN)"
        if self.client.token is None:
            return f"The hub at {url} requires a token: start the bridge with {how}."
        return f"The hub at {url} refused the bridge's token: start it with the right {how}."

    async def aclose(self) -> None:
        """Deregister (the hub cancels the tasks still running for the bridge) and close
        the connection, in a few seconds at most."""
        await self.client.aclose()

    # ---------------------------------------------------------------------------------
    # The tools' work

    async def status(self) -> HubStatus:
        summary = await self._ask(self.client.status())
        assert isinstance(summary, p.HubSummary)
        return HubStatus(
            hub_url=self.client.url,
            hub_version=summary.version,
            uptime_seconds=round(summary.uptime, 1),
            agents=summary.agents,
            agents_online=summary.online,
            hub_tasks=summary.tasks,
            bridge_agent_id=self.client.agent_id,
            bridge_tasks=self._counts(),
        )

    async def discover(self, capability: str) -> AgentList:
        agents = await self._ask(self.client.discover(capability.strip()))
        return AgentList(agents=[_agent_view(agent) for agent in agents])

    async def delegate(
        self,
        capability: str,
        params: dict[str, Any],
        *,
        agent_id: str | None,
        ttl: float,
        wait: float,
    ) -> TaskView:
        """Delegate, then wait up to `wait` seconds for the outcome (see `result`)."""
        self._make_room()
        capability = capability.strip()
        handle = await self._ask(
            self.client.submit(capability, params, to=agent_id or None, ttl=ttl)
        )
        record = self._tasks[handle.task_id] = _Delegation(handle, capability)
        return await self._outcome(record, wait)

    async def result(self, task_id: str, wait: float) -> TaskView:
        """A task's view once it ends or `wait` seconds pass. A task that ended without
        success raises `BridgeError`; cancelling the wait leaves the task running."""
        record = self._tasks.get(task_id.strip())
        if record is None:
            raise BridgeError(
                f"The bridge has no task {task_id!r}: only tasks delegated through this "
                f"bridge (the latest {self.max_tasks}) can be read; list_tasks shows them."
            )
        return await self._outcome(record, wait)

    async def broadcast(self, message: str, data: Any) -> Broadcasted:
        recipients = await self._ask(self.client.broadcast(message, data))
        return Broadcasted(recipients=recipients)

    def tasks(self, state: TaskStateName | None, limit: int) -> TaskList:
        """The tasks delegated through the bridge, newest first."""
        matching = [
            record
            for record in reversed(self._tasks.values())
            if state is None or _state(record.handle) == state
        ]
        return TaskList(
            tasks=[record.view(with_result=False) for record in matching[:limit]],
            total=len(matching),
        )

    # ---------------------------------------------------------------------------------
    # Helpers

    async def _ask(self, request: Awaitable[T]) -> T:
        """Await a hub request for `hub_wait` seconds at most; failures become sentences."""
        with trio.move_on_after(self.hub_wait):
            try:
                return await request
            except ConnectionLost:
                raise BridgeError(
                    "The hub connection dropped before the hub answered, so the request may "
                    "or may not have been carried out; the bridge is reconnecting."
                ) from None
            except HubError as exc:
                raise BridgeError(_request_refused(exc)) from None
        if self.client.online:
            raise BridgeError(
                f"The hub at {self.client.url} did not answer within {self.hub_wait:g} s."
            )
        if self._refusal is not None:
            raise BridgeError(self._refusal)
        raise BridgeError(
            f"The agentmesh hub at {self.client.url} is unreachable; the bridge keeps "
            "reconnecting in the background. Check that the hub is running, then try again."
        )

    async def _outcome(self, record: _Delegation, wait: float) -> TaskView:
        """Wait up to `wait` seconds for the task to end; then its view, or its failure."""
        handle = record.handle
        with trio.move_on_after(wait):
            try:
                await handle.wait()
            except TaskError:
                pass  # told below
        if handle.done:
            record.read = True
            failure = record.failure()
            if failure is not None:
                raise BridgeError(failure)
        return record.view(with_result=True)

    def _make_room(self) -> None:
        """Forget the oldest finished task, read ones first, if the record is full; if
        every task in it is unfinished, refuse."""
        if len(self._tasks) < self.max_tasks:
            return
        finished = [record for record in self._tasks.values() if record.handle.done]
        if not finished:
            raise BridgeError(
                f"The bridge already tracks {len(self._tasks)} unfinished tasks, its limit; "
                "collect some results with get_task_result before delegating more."
            )
        oldest = next((record for record in finished if record.read), finished[0])
        del self._tasks[oldest.handle.task_id]

    def _counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self._tasks.values():
            state = _state(record.handle)
            counts[state] = counts.get(state, 0) + 1
        return counts


def _state(handle: TaskHandle) -> TaskStateName:
    if handle.done and handle.outcome is None:
        return "failed"  # lost in a hub restart
    return cast(TaskStateName, handle.state)


def _error(handle: TaskHandle) -> str | None:
    outcome = handle.outcome
    if not handle.done or (outcome is not None and outcome.success):
        return None
    if outcome is None:
        return "the hub restarted and lost the task"
    return outcome.error or f"the task ended in state {outcome.state}"


def _request_refused(exc: HubError) -> str:
    message = exc.message[:1].upper() + exc.message[1:]
    if isinstance(exc, UnknownAgent):
        return f"{message}; discover_agents lists the agents and their IDs."
    if isinstance(exc, NoCapableAgent):
        return f"{message}; discover_agents shows which capabilities are on offer."
    return f"The hub refused the request: {exc.message}."


def _agent_view(agent: p.AgentInfo) -> AgentView:
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


# ---------------------------------------------------------------------------------------
# The MCP server

INSTRUCTIONS = """\
Tools to work an agentmesh network: agents connected to a hub, each offering \
capabilities. Find agents with discover_agents, hand work to them with delegate_task, \
and collect results with get_task_result. Nothing is pushed to you: a task that takes \
longer than the wait keeps running, and the bridge keeps its result until you ask."""


def build_server(bridge: Bridge) -> "MCPServer[Any]":
    """The MCP server with the six tools, working through `bridge`. Needs the mcp extra."""
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError
    from mcp.types import ToolAnnotations
    from pydantic import Field

    server: MCPServer[Any] = MCPServer(
        "agentmesh", instructions=INSTRUCTIONS, version=__version__, log_level="WARNING"
    )
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=True)
    acting = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=True)

    async def call(work: Awaitable[T]) -> T:
        try:
            return await work
        except BridgeError as exc:
            raise ToolError(str(exc)) from None

    @server.tool(annotations=read_only)
    async def hub_status() -> HubStatus:
        """Check the agentmesh hub: its version and uptime, how many agents are registered
        and online (the bridge itself is one), task counts by state at the hub and for the
        tasks delegated through this bridge. Fails with a clear message if the hub is
        unreachable."""
        return await call(bridge.status())

    @server.tool(annotations=read_only)
    async def discover_agents(
        capability: Annotated[
            str,
            Field(
                description="A capability keyword, matched case-insensitively against "
                "capability names, whole or by one word ('review' finds 'code-review'). "
                "Leave empty to list every agent."
            ),
        ] = "",
    ) -> AgentList:
        """Find agents on the agentmesh network by capability. Returns each agent's ID,
        name, description, whether it is online, and its capabilities, each with the JSON
        Schema of the params it takes: what delegate_task needs."""
        return await call(bridge.discover(capability))

    @server.tool(annotations=acting)
    async def delegate_task(
        capability: Annotated[
            str, Field(min_length=1, description="The capability to perform, e.g. 'echo'.")
        ],
        params: Annotated[
            dict[str, Any] | None,
            Field(
                description="The task's params: a JSON object matching the capability's "
                "params_schema (see discover_agents)."
            ),
        ] = None,
        agent_id: Annotated[
            str | None,
            Field(
                description="The ID of the agent to do it. Leave out to let the hub pick "
                "the least busy agent offering the capability."
            ),
        ] = None,
        ttl: Annotated[
            float,
            Field(
                gt=0,
                description="Seconds the task may take in all before it times out.",
            ),
        ] = DEFAULT_TTL,
        wait: Annotated[
            float,
            Field(
                ge=0,
                le=MAX_WAIT,
                description="Seconds to wait for the result before returning; 0 returns at once.",
            ),
        ] = 10.0,
    ) -> TaskView:
        """Delegate a task to an agent on the agentmesh network and wait up to `wait`
        seconds for it. Returns the task_id and state; when the task completes within the
        wait, done is true and `result` holds its output. Otherwise it keeps running: call
        get_task_result with the task_id later, the bridge keeps the result until then.
        A refused delegation (unknown agent, no capable agent) and a task that fails
        (bad params, an error in the agent) or times out are reported as errors."""
        return await call(
            bridge.delegate(capability, params or {}, agent_id=agent_id, ttl=ttl, wait=wait)
        )

    @server.tool(annotations=read_only)
    async def get_task_result(
        task_id: Annotated[str, Field(description="The task_id that delegate_task returned.")],
        wait: Annotated[
            float,
            Field(
                ge=0,
                le=MAX_WAIT,
                description="Seconds to wait for the task to finish; 0 returns at once.",
            ),
        ] = 30.0,
    ) -> TaskView:
        """Get the state and result of a task delegated with delegate_task, waiting up to
        `wait` seconds for it to finish. Returns done true and `result` once it completed;
        done false while it is pending or in progress (ask again later). A task that
        failed, timed out or was cancelled is reported as an error saying why."""
        return await call(bridge.result(task_id, wait))

    @server.tool(annotations=acting)
    async def broadcast_message(
        message: Annotated[str, Field(description="The message for every agent.")],
        data: Annotated[Any, Field(description="Optional JSON data sent with the message.")] = None,
    ) -> Broadcasted:
        """Send a message to every other agent online on the agentmesh network. Nothing
        comes back: returns how many agents it reached."""
        return await call(bridge.broadcast(message, data))

    @server.tool(annotations=read_only)
    async def list_tasks(  # async: a plain function would run in a worker thread
        state: Annotated[
            TaskStateName | None,
            Field(description="Only tasks in this state; leave out for all."),
        ] = None,
        limit: Annotated[
            int, Field(ge=1, le=MAX_TASKS, description="How many tasks to list at most.")
        ] = 50,
    ) -> TaskList:
        """List the tasks delegated through this bridge, newest first, with their state
        (pending, in_progress, completed, failed, timeout, cancelled) and, for those that
        ended without success, the error. Results are left out: get_task_result has them."""
        return bridge.tasks(state, limit)

    return server


async def serve_stdio(bridge: Bridge) -> None:
    """Serve MCP over stdin and stdout until stdin closes, then deregister from the hub.

    The hub connection runs in the background all along: a hub that is down at start
    or goes away later never ends this.
    """
    server = build_server(bridge)
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.serve)
        await server.run_stdio_async()
        await bridge.aclose()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agentmesh bridge",
        description="Serve an agentmesh hub's network as MCP tools over stdio.",
    )
    parser.add_argument(
        "--hub",
        default=os.environ.get("AGENTMESH_HUB", "ws://127.0.0.1:8765"),
        help="the hub's URL [AGENTMESH_HUB, default ws://127.0.0.1:8765]",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("AGENTMESH_TOKEN"),
        help="the token the hub asks for, if any [AGENTMESH_TOKEN]",
    )
    parser.add_argument(
        "--hub-wait",
        type=_seconds,
        default=5.0,
        help="seconds a tool waits for an unreachable hub before failing [default 5]",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("AGENTMESH_LOG_LEVEL", "warning"),
        choices=["debug", "info", "warning", "error"],
        help="what to log to stderr [AGENTMESH_LOG_LEVEL, default warning]",
    )
    return parser


def _seconds(text: str) -> float:
    seconds = float(text)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return seconds


def bridge_main(argv: Sequence[str] | None = None) -> None:
    """`agentmesh bridge [--hub URL] [--token TOKEN]`: serve until stdin closes."""
    parser = _parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        import mcp.server.mcpserver  # noqa: F401
    except ImportError:
        print(MISSING_EXTRA, file=sys.stderr)
        raise SystemExit(1) from None
    try:
        bridge = Bridge(args.hub, token=args.token, hub_wait=args.hub_wait)
    except ValueError as exc:
        parser.error(str(exc))
    try:
        trio.run(partial(serve_stdio, bridge))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    bridge_main()
