"""The MCP bridge: an agentmesh network as tools and resources for Claude Code (or any MCP
client).

    agentmesh bridge --hub ws://127.0.0.1:8765

serves MCP over stdio. The bridge holds one hub connection as a hidden agent named
``mcp-bridge`` (left out of discover and broadcasts) and keeps it alive on its own;
tools called while the hub is down fail with a clear sentence after `Bridge.hub_wait`
seconds (`hub_status` after a second at most), and the process stays up.

This module is the hub side (`Bridge`: the requests, the tasks delegated through the
bridge with their progress, the agents on the network as the hub's events tell them) and
the command line; the MCP server itself (tools, resources, notifications) is in
`agentmesh._mcp_server`. The `mcp` package is an optional extra, imported only when the
server is built, so this module imports without it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import trio

from . import protocol as p
from ._mcp_views import (
    AgentList,
    Broadcasted,
    Delegation,
    HubStatus,
    TaskList,
    TaskStateName,
    TaskView,
    agent_view,
    record_ended,
    state_of,
)
from .client import Backoff, Client
from .errors import (
    AgentMeshError,
    ConnectionLost,
    Forbidden,
    HubError,
    InvalidMessage,
    NoCapableAgent,
    TaskFinished,
    Unauthorized,
    UnknownAgent,
    UnknownType,
)

if TYPE_CHECKING:
    from mcp.server.mcpserver import MCPServer

__all__ = ["Bridge", "BridgeError", "bridge_main", "build_server", "serve_stdio"]
# (AgentList, AgentView, Broadcasted, HubStatus, TaskList, TaskStateName, TaskView: the
# shapes the tools return, from agentmesh._mcp_views.)

log = logging.getLogger("agentmesh.bridge")

MISSING_EXTRA = "the MCP bridge needs the mcp extra: pip install 'agentmesh-hub[mcp]'"
MAX_TASKS = 1000  # tasks remembered at most; the oldest finished ones are forgotten first
MAX_WAIT = 60.0  # seconds a tool may block waiting for a task (idle, with a progress token)
DEFAULT_TTL = 300.0
STATUS_WAIT = 1.0  # seconds hub_status waits for the hub at most
CANCEL_WAIT = 5.0  # seconds a cancellation on the way out may take at most
AGENT_KINDS = ("agent_registered", "agent_online", "agent_offline", "agent_left")
REDISCOVER = 3.0  # seconds between discovers when the hub cannot let the bridge watch
RECONNECTED_CHECK = 2.0  # seconds between looks at whether the hub connection was renewed
# A local hub that comes back should be found again within a couple of seconds.
RECONNECT = Backoff(base=0.1, cap=2.0)
REFUSED_RETRY = 30.0  # seconds between tries when the hub refuses the bridge itself

T = TypeVar("T")
# How a hub older than the agents' watch for every connection (060c66c) refuses it: a hub
# without watch does not know the type, one with an older watch wants the admin token.
CANNOT_WATCH = (UnknownType, InvalidMessage, Forbidden)
ProgressSink = Callable[[p.Progress], Awaitable[None]]


class BridgeError(Exception):
    """A tool call failed. The message is one sentence for the model to read."""


@attrs.define
class Listener:
    """What the MCP server wants to hear from the bridge (called synchronously, so it
    must only take note): a task delegated through the bridge changed (its state, its
    progress), or agents changed (`joined_or_left`: the set of agents, not only one's
    state)."""

    task_changed: Callable[[str], None] = lambda task_id: None
    agents_changed: Callable[[frozenset[str], bool], None] = lambda ids, joined_or_left: None


# ---------------------------------------------------------------------------------------
# The bridge: the hub side of the tools


class Bridge:
    """One hub connection, as agent ``mcp-bridge``, the tasks delegated through it, and
    the agents on the network.

    Every method that talks to the hub waits at most `hub_wait` seconds for it (to
    connect and to answer) and raises `BridgeError` with a sentence for the model on
    any failure. `token` is presented to the hub at the handshake. `listener` hears of
    changes (see `Listener`).
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
        self.listener = Listener()
        self.agents: dict[str, p.AgentInfo] = {}  # the network as last heard, by ID
        self._tasks: dict[str, Delegation] = {}  # oldest first
        self._refusal: str | None = None  # why the hub last refused the bridge itself
        self._nursery: trio.Nursery | None = None
        self._following = trio.CancelScope()  # the agents' watch
        self._followed = trio.Event()  # set when it has ended

    # ---------------------------------------------------------------------------------
    # Running

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the hub connection until `aclose()` or cancellation, reconnecting on its own,
        and follow the network's agents meanwhile.

        Reports to `nursery.start` at once: a hub that is down, now or later, is retried
        in the background while the tools say so. A hub that refuses the bridge (its
        token, or it is full) is retried every `REFUSED_RETRY` seconds while the tools
        say why; nothing the hub does ends this. On cancellation the connection is cut.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._follow_agents_until_closed)
            task_status.started()
            while True:
                self._refusal = None
                try:
                    await self.client.serve()
                    break
                except (AgentMeshError, p.ProtocolError) as exc:
                    self._refusal = self._describe_refusal(exc)
                    log.warning("%s Retrying in %gs.", self._refusal, REFUSED_RETRY)
                await trio.sleep(REFUSED_RETRY)
            nursery.cancel_scope.cancel()

    def _describe_refusal(self, exc: Exception) -> str:
        url = self.client.url
        if not isinstance(exc, Unauthorized):
            return f"The hub at {url} refused the bridge: {exc}."
        how = "--token (or AGENTMESH_TOKEN)"
        if self.client.token is None:
            return f"The hub at {url} requires a token: start the bridge with {how}."
        return f"The hub at {url} refused the bridge's token: start it with the right {how}."

    async def aclose(self) -> None:
        """Stop watching the agents, deregister (the hub cancels the tasks still running
        for the bridge) and close the connection, in a few seconds at most."""
        # The watch ends first, while the connection can still carry its unwatch.
        self._following.cancel()
        if self._nursery is not None:
            with trio.move_on_after(self.client.connect_timeout):
                await self._followed.wait()
        await self.client.aclose()

    # ---------------------------------------------------------------------------------
    # The tools' work

    async def status(self) -> HubStatus:
        """The hub's summary, waiting at most `STATUS_WAIT` seconds for the hub."""
        summary = await self._ask(self.client.status(), min(self.hub_wait, STATUS_WAIT))
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
        return AgentList(agents=[agent_view(agent) for agent in agents])

    async def delegate(
        self,
        capability: str,
        params: dict[str, Any],
        *,
        agent_id: str | None,
        ttl: float,
        wait: float,
        progress: ProgressSink | None = None,
    ) -> TaskView:
        """Delegate, then wait for the outcome as `result` does.

        If cancelled while waiting (the MCP client cancelled the call), the task is
        cancelled at the hub and in its agent, within `CANCEL_WAIT` seconds, before the
        cancellation goes on.
        """
        self._make_room()
        capability = capability.strip()
        handle = await self._ask(
            self.client.submit(capability, params, to=agent_id or None, ttl=ttl)
        )
        record = Delegation(handle, capability, deadline=trio.current_time() + ttl)
        self._tasks[handle.task_id] = record
        self._follow_task(record)
        try:
            return await self._outcome(record, wait, progress, seen=0)
        except trio.Cancelled:
            if not handle.done:
                with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_WAIT):
                    try:
                        await handle.cancel("the MCP client cancelled the tool call")
                    except AgentMeshError as exc:  # it may have ended meanwhile
                        log.debug("cancel of %s: %s", handle.task_id, exc)
            raise

    async def result(
        self, task_id: str, wait: float, progress: ProgressSink | None = None
    ) -> TaskView:
        """A task's view once it ends or `wait` seconds pass; with `progress`, `wait` is an
        idle time, renewed by each progress frame (each passed to `progress`, the latest
        one known first), up to the task's TTL. A task that ended without success raises
        `BridgeError`. Cancelling the wait leaves the task running."""
        record = self._record(task_id)
        return await self._outcome(record, wait, progress, seen=max(0, record.frames - 1))

    async def cancel(self, task_id: str, reason: str | None) -> TaskView:
        """Cancel a task delegated through the bridge (at the hub and in its agent) and
        return its view once the hub says it ended (after `hub_wait` seconds at most)."""
        record = self._record(task_id)
        handle = record.handle
        if not handle.done:
            try:
                await self._ask(handle.cancel(reason or "cancelled by the MCP client"))
            except BridgeError:
                if not handle.done:  # else it ended meanwhile: said below
                    raise
            with trio.move_on_after(self.hub_wait):
                await record_ended(record)  # the outcome follows the hub's answer
            if not record.ended():
                raise BridgeError(
                    f"The hub cancelled task {handle.task_id}, but the bridge has not heard "
                    "its end yet; get_task_result will show it."
                )
            if handle.state == "cancelled":
                record.read = True
                return record.view(with_result=False)
        raise BridgeError(
            f"Task {handle.task_id} had already ended ({state_of(handle)}), so there was "
            "nothing to cancel; get_task_result has its outcome."
        )

    async def broadcast(self, message: str, data: Any) -> Broadcasted:
        recipients = await self._ask(self.client.broadcast(message, data))
        return Broadcasted(recipients=recipients)

    def tasks(self, state: TaskStateName | None, limit: int) -> TaskList:
        """The tasks delegated through the bridge, newest first."""
        matching = [
            record
            for record in reversed(self._tasks.values())
            if state is None or state_of(record.handle) == state
        ]
        return TaskList(
            tasks=[record.view(with_result=False) for record in matching[:limit]],
            total=len(matching),
        )

    def task(self, task_id: str) -> TaskView | None:
        """A task delegated through the bridge, with its result or error and its latest
        progress; None if the bridge has no such task."""
        record = self._tasks.get(task_id)
        return None if record is None else record.view(with_result=True, with_progress=True)

    # ---------------------------------------------------------------------------------
    # Following the network

    async def _follow_agents_until_closed(self) -> None:
        try:
            with self._following:
                await self._follow_agents()
        finally:
            self._followed.set()

    async def _follow_agents(self) -> None:
        """Keep `agents` up to date from the hub's agent events, or, on a hub that cannot
        let the bridge watch them (one older than that: see `CANNOT_WATCH`), by
        discovering them every `REDISCOVER` seconds, until the bridge connects anew (to a
        hub that may since have been upgraded). A watch that fails otherwise is tried
        again after a backoff: `REDISCOVER` seconds at least when the hub refused it."""
        told = False
        failures = 0
        while True:
            try:
                async with self.client.watch(AGENT_KINDS) as events:
                    failures = 0
                    await self._follow_events(events)
            except CANNOT_WATCH as exc:
                how = log.debug if told else log.info
                how(
                    "the hub cannot let the bridge watch its agents (%s); discovering them "
                    "every %gs instead",
                    exc,
                    REDISCOVER,
                )
                told = True
                await self._discover_until_reconnected()
            except AgentMeshError as exc:  # the connection dropped, or a passing refusal
                failures += 1
                delay = self.client.backoff.delay(failures)
                if isinstance(exc, HubError):
                    delay = max(delay, REDISCOVER)
                log.debug("watching the agents: %s; trying again in %.2gs", exc, delay)
                await trio.sleep(delay)

    async def _discover_until_reconnected(self) -> None:
        sessions = self.client.sessions
        while self.client.sessions == sessions:
            await self._rediscover()
            await trio.sleep(REDISCOVER)

    async def _follow_events(self, events: trio.MemoryReceiveChannel[p.Event]) -> None:
        """Apply the agent events as they come, reading every agent again at first and
        whenever events were lost."""
        sessions = self.client.sessions
        await self._rediscover()
        while True:
            event: p.Event | None = None
            with trio.move_on_after(RECONNECTED_CHECK):
                event = await events.receive()
            if event is not None and event.missed:
                await self._rediscover()
            elif event is not None:
                self._apply(event)
            if self.client.sessions != sessions:  # events were lost meanwhile
                sessions = self.client.sessions
                await self._rediscover()

    async def _rediscover(self) -> None:
        """Read every agent again, and tell the listener what changed."""
        found: dict[str, p.AgentInfo] = {}
        cursor: str | None = None
        try:
            while True:
                page = await self.client.discover_page("", limit=1000, cursor=cursor)
                found.update((agent.agent_id, agent) for agent in page.agents)
                cursor = page.next_cursor
                if cursor is None:
                    break
        except AgentMeshError as exc:  # the connection dropped: the next try fixes it
            log.debug("discover: %s", exc)
            return
        before = self.agents
        self.agents = found
        changed = frozenset(
            agent_id
            for agent_id in before.keys() | found.keys()
            if before.get(agent_id) != found.get(agent_id)
        )
        if changed:
            self.listener.agents_changed(changed, before.keys() != found.keys())

    def _apply(self, event: p.Event) -> None:
        agent = event.agent
        if agent is None or agent.hidden or agent.agent_id == self.client.agent_id:
            return  # what discover shows, without the bridge itself
        known = agent.agent_id in self.agents
        if event.kind == "agent_left":
            if not known:
                return
            del self.agents[agent.agent_id]
        else:
            self.agents[agent.agent_id] = agent
        joined_or_left = known if event.kind == "agent_left" else not known
        self.listener.agents_changed(frozenset({agent.agent_id}), joined_or_left)

    def _follow_task(self, record: Delegation) -> None:
        """Read the task's progress frames as they come, until it ends (the one reader
        of `TaskHandle.progress`), and tell the waiting calls and the listener."""

        async def follow() -> None:
            task_id = record.handle.task_id
            async for frame in record.handle.progress():
                record.add(frame)
                self.listener.task_changed(task_id)
            await record_ended(record)  # the iteration ends when the task does
            record.bump()
            self.listener.task_changed(task_id)

        assert self._nursery is not None, "Bridge.serve is not running"
        self._nursery.start_soon(follow)

    # ---------------------------------------------------------------------------------
    # Helpers

    async def _ask(self, request: Awaitable[T], within: float | None = None) -> T:
        """Await a hub request for `within` (default `hub_wait`) seconds at most; failures
        become sentences."""
        within = self.hub_wait if within is None else within
        with trio.move_on_after(within):
            try:
                return await request
            except ConnectionLost:
                raise BridgeError(
                    "The hub connection dropped before the hub answered, so the request may "
                    "or may not have been carried out; the bridge is reconnecting."
                ) from None
            except TaskFinished as exc:
                raise BridgeError(f"The hub says the {exc.message}.") from None
            except HubError as exc:
                raise BridgeError(_request_refused(exc)) from None
        if self.client.online:
            raise BridgeError(f"The hub at {self.client.url} did not answer within {within:g} s.")
        if self._refusal is not None:
            raise BridgeError(self._refusal)
        raise BridgeError(
            f"The agentmesh hub at {self.client.url} is unreachable; the bridge keeps "
            "reconnecting in the background. Check that the hub is running, then try again."
        )

    def _record(self, task_id: str) -> Delegation:
        record = self._tasks.get(task_id.strip())
        if record is None:
            raise BridgeError(
                f"The bridge has no task {task_id!r}: only tasks delegated through this "
                f"bridge (the latest {self.max_tasks}) can be read; list_tasks shows them."
            )
        return record

    async def _outcome(
        self, record: Delegation, wait: float, progress: ProgressSink | None, *, seen: int
    ) -> TaskView:
        """Wait for the task to end: `wait` seconds, or with `progress`, until `wait`
        seconds pass without a progress frame (each frame after the first `seen` is
        passed on), up to the task's TTL. Then its view, or its failure."""
        handle = record.handle
        if progress is None:
            with trio.move_on_after(wait):
                await record_ended(record)
        else:
            while True:
                # Frames that come while the notifications are sent are sent next.
                while seen < record.frames:
                    batch, seen = record.since(seen), record.frames
                    for frame in batch:
                        await progress(frame)
                if handle.done:
                    break
                changed = record.changed
                idle = min(trio.current_time() + wait, record.deadline + self.hub_wait)
                with trio.move_on_at(idle) as scope:
                    await changed.wait()
                if scope.cancelled_caught:
                    break
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
            state = state_of(record.handle)
            counts[state] = counts.get(state, 0) + 1
        return counts


def _request_refused(exc: HubError) -> str:
    message = exc.message[:1].upper() + exc.message[1:]
    if isinstance(exc, UnknownAgent):
        return f"{message}; discover_agents lists the agents and their IDs."
    if isinstance(exc, NoCapableAgent):
        return f"{message}; discover_agents shows which capabilities are on offer."
    return f"The hub refused the request: {exc.message}."


# ---------------------------------------------------------------------------------------
# The MCP server (agentmesh._mcp_server, which needs the mcp extra)


def build_server(bridge: Bridge, *, capability_tools: bool = False) -> MCPServer[Any]:
    """The MCP server working through `bridge`: its tools (and with `capability_tools`
    one more per capability on the network), its resources. Needs the mcp extra."""
    from ._mcp_server import build_server as build

    return build(bridge, capability_tools=capability_tools)


async def serve_stdio(bridge: Bridge, *, capability_tools: bool = False) -> None:
    """Serve MCP over stdin and stdout until stdin closes, then deregister from the hub.

    The hub connection runs in the background all along: a hub that is down at start
    or goes away later never ends this. On cancellation the hub connection is cut.
    """
    from ._mcp_server import serve_stdio as serve

    await serve(bridge, capability_tools=capability_tools)


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
        "--capability-tools",
        action="store_true",
        help="also offer one tool per capability on the network",
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
    """`agentmesh bridge [--hub URL] [--token TOKEN] [--capability-tools]`: serve until
    stdin closes."""
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
        trio.run(partial(serve_stdio, bridge, capability_tools=args.capability_tools))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    # Run as `python -m agentmesh.bridge`, this file is `__main__`; the MCP server imports
    # `agentmesh.bridge`, a second copy whose classes (BridgeError) differ from these.
    from agentmesh.bridge import bridge_main as main

    main()
