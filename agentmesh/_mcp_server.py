"""The MCP server of the bridge: its tools, resources and notifications (needs the mcp
extra). `agentmesh.bridge.Bridge` does the hub side.

Tools block for a bounded time: `wait` seconds, or with a progress token on the call,
until `wait` seconds pass without progress from the agent (up to the task's TTL), each
progress frame forwarded as an MCP progress notification. A tool call the client cancels
(or abandons on its own timeout) cancels the task it delegated.

Resources: ``agentmesh://agents``, ``agentmesh://agents/{agent_id}`` and
``agentmesh://tasks/{task_id}``, JSON, kept up to date by the hub's events; a client that
subscribes to one hears ``notifications/resources/updated`` when it changes (see
`agentmesh._mcp_notify`).
"""

# No `from __future__ import annotations` here: the MCP SDK reads the tool signatures at
# run time.

import inspect
import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, TypeVar

import mcp_types as types
import pydantic_core
import trio
from mcp.server.lowlevel.server import NotificationOptions
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceNotFoundError, ToolError
from mcp.server.stdio import stdio_server
from pydantic import Field, ValidationError

from . import protocol as p
from ._mcp_capabilities import CapabilityTool, CapabilityTools
from ._mcp_notify import AGENTS_URI, Notifier, agent_uri
from ._mcp_views import (
    AgentList,
    AgentView,
    Broadcasted,
    HubStatus,
    TaskList,
    TaskStateName,
    TaskView,
    agent_view,
)
from ._version import __version__
from .bridge import DEFAULT_TTL, MAX_TASKS, MAX_WAIT, Bridge, BridgeError, ProgressSink

T = TypeVar("T")
JSON = "application/json"
CAPABILITY_WAIT = 10.0  # seconds a capability tool waits (idle, with a progress token)
FIXED_TOOLS = (
    "hub_status",
    "discover_agents",
    "delegate_task",
    "get_task_result",
    "cancel_task",
    "broadcast_message",
    "list_tasks",
)

INSTRUCTIONS = """\
Tools to work an agentmesh network: agents connected to a hub, each offering \
capabilities. Find agents with discover_agents, hand work to them with delegate_task, \
and collect results with get_task_result; cancel_task stops a task. A task that takes \
longer than the wait keeps running, and the bridge keeps its result until you ask. The \
agents and the tasks delegated here are also resources (agentmesh://agents, \
agentmesh://tasks/{task_id}) that tell subscribers when they change."""


# ---------------------------------------------------------------------------------------
# Progress: agentmesh frames as MCP progress notifications


class ProgressNotes:
    """One tool call's progress notifications, from the agent's progress frames.

    MCP wants `progress` to increase from one notification to the next. The first frame
    decides: if it has a fraction (0 to 1, 0 included), the fractions are sent as
    `progress` with `total` 1, and a frame that would not raise `progress` (a fraction at
    or below the last one, or none) is sent a hair above the last value, so its message
    still arrives; if it has none, the frames count 1, 2, 3, ... with no total.
    """

    def __init__(self, ctx: Context[Any, Any]) -> None:
        self._ctx = ctx
        self._last = -math.inf  # below any fraction, 0 included
        self._fractions: bool | None = None  # undecided until the first frame

    async def __call__(self, frame: p.Progress) -> None:
        fraction = frame.progress
        if self._fractions is None:
            self._fractions = fraction is not None
        if not self._fractions:
            value = max(self._last, 0.0) + 1
        elif fraction is not None and fraction > self._last:
            value = fraction
        else:
            value = math.nextafter(self._last, math.inf)
        self._last = value
        await self._ctx.report_progress(value, 1.0 if self._fractions else None, frame.message)


def progress_of(ctx: Context[Any, Any]) -> ProgressSink | None:
    """Where the call's progress goes: None when the client gave no progress token."""
    meta = ctx.request_context.meta or {}
    return ProgressNotes(ctx) if meta.get("progress_token") is not None else None


# ---------------------------------------------------------------------------------------
# The server


def _described(fn: Callable[..., Any]) -> str:
    """A tool's description from its docstring: no indentation, each paragraph on one line."""
    text = inspect.cleandoc(fn.__doc__ or "")
    return "\n\n".join(" ".join(part.split()) for part in text.split("\n\n"))


def bad_arguments(error: ValidationError) -> str:
    """One sentence for arguments the tool's input schema refuses."""
    problems: dict[str, str] = {}
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "the arguments"
        if where in problems:
            continue
        if item["type"] == "missing":
            problems[where] = f"`{where}` is required"
        else:
            message = item["msg"]
            problems[where] = f"`{where}`: {message[:1].lower()}{message[1:]}"
    return f"Bad arguments: {'; '.join(problems.values())}."


class BridgeServer(MCPServer[Any]):
    """`MCPServer` with the capability tools beside the fixed ones, argument errors as
    one sentence, and one resource per agent in the resource list. It overrides the
    public `list_tools`, `call_tool` and `list_resources`, which the SDK's request
    handlers call."""

    def __init__(self, bridge: Bridge, notifier: Notifier, *, capability_tools: bool) -> None:
        @asynccontextmanager
        async def lifespan(server: MCPServer[Any]) -> AsyncIterator[dict[str, Any]]:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(notifier.run)
                yield {}
                nursery.cancel_scope.cancel()

        super().__init__(
            "agentmesh",
            instructions=INSTRUCTIONS,
            version=__version__,
            log_level="WARNING",
            subscriptions=notifier.bus,
            middleware=[notifier.remember_session],
            lifespan=lifespan,
        )
        self.bridge = bridge
        self.notifier = notifier
        self.with_capability_tools = capability_tools
        self._capability_tools = CapabilityTools(reserved=FIXED_TOOLS)

    @property
    def capability_tools(self) -> dict[str, CapabilityTool]:
        """The capability tools, by name (empty without `with_capability_tools`)."""
        return self._capability_tools.tools

    def refresh_capability_tools(self, agent_ids: frozenset[str]) -> bool:
        """Take in the agents that changed; whether the capability tools did."""
        if not self.with_capability_tools:
            return False
        return self._capability_tools.update(self.bridge.agents, agent_ids)

    async def list_tools(self) -> list[types.Tool]:
        tools = await super().list_tools()
        if self.capability_tools:
            task_schema = next(t.output_schema for t in tools if t.name == "delegate_task")
            acting = types.ToolAnnotations(
                read_only_hint=False, destructive_hint=False, open_world_hint=True
            )
            tools += [
                types.Tool(
                    name=tool.name,
                    description=tool.description,
                    input_schema=tool.input_schema,
                    output_schema=task_schema,
                    annotations=acting,
                )
                for _, tool in sorted(self.capability_tools.items())
            ]
        return tools

    async def call_tool(
        self, name: str, arguments: dict[str, Any], context: Context[Any, Any] | None = None
    ) -> Any:
        # A name once given keeps its capability, offered or not: a client with a stale
        # tool list hears that no agent offers it.
        capability = self._capability_tools.capability_named(name)
        if capability is not None and self._tool_manager.get_tool(name) is None:
            assert context is not None
            return await self._call_capability(name, capability, arguments, context)
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            # The SDK wraps the input schema's ValidationError in a ToolError whose text
            # is pydantic's, several lines long; the model gets one sentence instead.
            if isinstance(exc.__cause__, ValidationError):
                sentence = bad_arguments(exc.__cause__)
                raise ToolError(f"Error executing tool {name}: {sentence}") from exc.__cause__
            raise

    async def _call_capability(
        self, name: str, capability: str, arguments: dict[str, Any], ctx: Context[Any, Any]
    ) -> types.CallToolResult:
        """Delegate the tool's capability, as delegate_task does (cancelling the call
        cancels the task)."""
        try:
            view = await self.bridge.delegate(
                capability,
                arguments,
                agent_id=None,
                ttl=DEFAULT_TTL,
                wait=CAPABILITY_WAIT,
                progress=progress_of(ctx),
            )
        except BridgeError as exc:
            raise ToolError(f"Error executing tool {name}: {exc}") from None
        text = pydantic_core.to_json(view, indent=2).decode()
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=text)],
            structured_content=dict(view),
        )

    async def list_resources(self) -> list[types.Resource]:
        resources = await super().list_resources()
        resources += [
            types.Resource(
                uri=agent_uri(agent.agent_id),
                name=f"agent {agent.name}",
                description=f"Agent {agent.name} ({agent.agent_id}): {agent.description}"
                if agent.description
                else f"Agent {agent.name} ({agent.agent_id})",
                mime_type=JSON,
            )
            for agent in sorted(self.bridge.agents.values(), key=lambda a: a.agent_id)
        ]
        return resources


def build_server(bridge: Bridge, *, capability_tools: bool = False) -> BridgeServer:
    """The MCP server with the seven tools (and with `capability_tools` one per capability
    on the network) and the resources, working through `bridge`. Its lifespan runs the
    notifications; serve it while `bridge.serve` runs."""
    notifier = Notifier()
    server = BridgeServer(bridge, notifier, capability_tools=capability_tools)
    notifier.tools = server.refresh_capability_tools
    server.refresh_capability_tools(frozenset(bridge.agents))  # any known already
    bridge.listener.task_changed = notifier.task_changed
    bridge.listener.agents_changed = notifier.agents_changed
    _add_tools(server, bridge)
    _add_resources(server, bridge, notifier)
    return server


async def serve_stdio(bridge: Bridge, *, capability_tools: bool = False) -> None:
    """Serve MCP over stdin and stdout until stdin closes, then deregister from the hub.

    The hub connection runs in the background all along: a hub that is down at start
    or goes away later never ends this. On cancellation the hub connection is cut.
    """
    server = build_server(bridge, capability_tools=capability_tools)
    # MCPServer.run_stdio_async announces no list changes; the low-level server's run
    # takes the notification options (MCPServer has no public way to reach it).
    lowlevel = server._lowlevel_server
    options = lowlevel.create_initialization_options(
        NotificationOptions(resources_changed=True, tools_changed=capability_tools)
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(bridge.serve)
        async with stdio_server() as (read, write):
            await lowlevel.run(read, write, options)
        await bridge.aclose()
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------------------
# The tools


def _add_tools(server: BridgeServer, bridge: Bridge) -> None:
    read_only = types.ToolAnnotations(read_only_hint=True, open_world_hint=True)
    acting = types.ToolAnnotations(
        read_only_hint=False, destructive_hint=False, open_world_hint=True
    )
    stopping = types.ToolAnnotations(
        read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=True
    )

    def tool(annotations: types.ToolAnnotations) -> Callable[[T], T]:
        def add(fn: T) -> T:
            assert callable(fn)
            server.add_tool(fn, description=_described(fn), annotations=annotations)
            return fn

        return add

    async def call(work: Awaitable[T]) -> T:
        try:
            return await work
        except BridgeError as exc:
            raise ToolError(str(exc)) from None

    @tool(read_only)
    async def hub_status() -> HubStatus:
        """Check the agentmesh hub: its version and uptime, how many agents are registered
        and online (the bridge itself is one), task counts by state at the hub and for the
        tasks delegated through this bridge. Fails within a second with a clear message if
        the hub is unreachable."""
        return await call(bridge.status())

    @tool(read_only)
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

    @tool(acting)
    async def delegate_task(
        ctx: Context[Any, Any],
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
                description="Seconds to wait for the result before returning (with a "
                "progress token, seconds without progress); 0 returns at once.",
            ),
        ] = 10.0,
    ) -> TaskView:
        """Delegate a task to an agent on the agentmesh network and wait up to `wait`
        seconds for it. Returns the task_id and state; when the task completes within the
        wait, done is true and `result` holds its output. Otherwise it keeps running: call
        get_task_result with the task_id later, the bridge keeps the result until then.
        With a progress token, the agent's progress is sent as progress notifications and
        the wait goes on while progress comes (up to the ttl). Cancelling the call
        cancels the task. A refused delegation (unknown agent, no capable agent) and a
        task that fails (bad params, an error in the agent) or times out are reported as
        errors."""
        return await call(
            bridge.delegate(
                capability,
                params or {},
                agent_id=agent_id,
                ttl=ttl,
                wait=wait,
                progress=progress_of(ctx),
            )
        )

    @tool(read_only)
    async def get_task_result(
        ctx: Context[Any, Any],
        task_id: Annotated[str, Field(description="The task_id that delegate_task returned.")],
        wait: Annotated[
            float,
            Field(
                ge=0,
                le=MAX_WAIT,
                description="Seconds to wait for the task to finish (with a progress "
                "token, seconds without progress); 0 returns at once.",
            ),
        ] = 30.0,
    ) -> TaskView:
        """Get the state and result of a task delegated with delegate_task, waiting up to
        `wait` seconds for it to finish (longer while progress comes, with a progress
        token). Returns done true and `result` once it completed; done false while it is
        pending or in progress (ask again later). A task that failed, timed out or was
        cancelled is reported as an error saying why. Cancelling this call leaves the
        task running (cancel_task stops it)."""
        return await call(bridge.result(task_id, wait, progress_of(ctx)))

    @tool(stopping)
    async def cancel_task(
        task_id: Annotated[str, Field(description="The task_id that delegate_task returned.")],
        reason: Annotated[
            str | None, Field(description="Why, for the agent and the hub's records.")
        ] = None,
    ) -> TaskView:
        """Cancel a task delegated through this bridge: the hub ends it as cancelled and
        the agent working on it is told to stop. Returns the task, in state cancelled. A
        task that already ended is reported as an error (get_task_result has its
        outcome)."""
        return await call(bridge.cancel(task_id, reason))

    @tool(acting)
    async def broadcast_message(
        message: Annotated[str, Field(description="The message for every agent.")],
        data: Annotated[Any, Field(description="Optional JSON data sent with the message.")] = None,
    ) -> Broadcasted:
        """Send a message to every other agent online on the agentmesh network. Nothing
        comes back: returns how many agents it reached."""
        return await call(bridge.broadcast(message, data))

    @tool(read_only)
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


# ---------------------------------------------------------------------------------------
# The resources


def _add_resources(server: BridgeServer, bridge: Bridge, notifier: Notifier) -> None:
    def dumps(value: Any) -> str:
        return json.dumps(value, indent=2)

    def one_agent(agent_id: str) -> AgentView:
        agent = bridge.agents.get(agent_id)
        if agent is None:
            raise ResourceNotFoundError(
                f"No agent {agent_id!r} is on the network as the bridge knows it; "
                f"{AGENTS_URI} lists the agents."
            )
        return agent_view(agent)

    @server.resource(
        AGENTS_URI,
        name="agents",
        description="Every agent on the network (the bridge left out), with its "
        "capabilities and their params schemas; updated as agents come, go and go offline.",
        mime_type=JSON,
    )
    async def agents() -> str:
        listed = sorted(bridge.agents.values(), key=lambda agent: agent.agent_id)
        return dumps(AgentList(agents=[agent_view(agent) for agent in listed]))

    @server.resource(
        AGENTS_URI + "/{agent_id}",
        name="agent",
        description="One agent: its name, description, whether it is online, its "
        "capabilities and their params schemas.",
        mime_type=JSON,
    )
    async def agent(agent_id: str) -> str:
        return dumps(one_agent(agent_id))

    @server.resource(
        "agentmesh://tasks/{task_id}",
        name="task",
        description="A task delegated through this bridge: its state, its result or "
        "error once it ended, and its latest progress; updated as it changes.",
        mime_type=JSON,
    )
    async def task(task_id: str) -> str:
        view = bridge.task(task_id)
        if view is None:
            raise ResourceNotFoundError(
                f"The bridge has no task {task_id!r}: only tasks delegated through this "
                "bridge can be read; the list_tasks tool shows them."
            )
        return dumps(view)

    async def subscribe(ctx: Any, params: types.SubscribeRequestParams) -> types.EmptyResult:
        notifier.subscribed.add(str(params.uri))
        return types.EmptyResult()

    async def unsubscribe(ctx: Any, params: types.UnsubscribeRequestParams) -> types.EmptyResult:
        notifier.subscribed.discard(str(params.uri))
        return types.EmptyResult()

    # MCPServer takes no subscription handlers; the low-level server's public
    # add_request_handler does (and then announces `resources.subscribe`).
    lowlevel = server._lowlevel_server
    lowlevel.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
    lowlevel.add_request_handler(
        "resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe
    )
