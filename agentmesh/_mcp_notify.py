"""What the MCP bridge tells its client unasked: resource updates and list changes.

The bridge hears of changes synchronously (`Notifier.task_changed`, `agents_changed`) and
only takes note of them in sets; `Notifier.run` sends them, so a burst of progress frames
becomes one `notifications/resources/updated` per URI, and nothing queues without bound.

Two protocol eras, both served:

- A handshake-era client (2025 protocol versions; Claude Code, and `mcp`'s own
  `ClientSession.initialize`) subscribes with `resources/subscribe` and hears on the
  connection's standalone channel. The SDK gives a handler no way to reach that channel
  outside a request, so `remember_session`, a middleware (the SDK's public hook on every
  inbound message), keeps the `ServerSession` of the latest message: its notifications
  without a related request go out on the connection's standalone channel, which lives as
  long as the connection.
- A 2026-era client opens `subscriptions/listen`; its events are published on the
  server's `SubscriptionBus`, which filters them per stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import anyio
import trio
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.session import ServerSession
from mcp.server.subscriptions import (
    InMemorySubscriptionBus,
    ResourcesListChanged,
    ResourceUpdated,
    ToolsListChanged,
)

log = logging.getLogger("agentmesh.bridge")

AGENTS_URI = "agentmesh://agents"


def agent_uri(agent_id: str) -> str:
    return f"{AGENTS_URI}/{agent_id}"


def task_uri(task_id: str) -> str:
    return f"agentmesh://tasks/{task_id}"


class Notifier:
    """The notifications owed to the MCP client, and the task that sends them.

    `tools` is called with the IDs of the agents that changed: it returns whether the
    tool list did.
    """

    def __init__(self) -> None:
        self.tools: Callable[[frozenset[str]], bool] = lambda agent_ids: False
        self.bus = InMemorySubscriptionBus()
        self.session: ServerSession | None = None  # the latest inbound message's
        self.subscribed: set[str] = set()  # by resources/subscribe
        self._updated: set[str] = set()
        self._resources_changed = False
        self._tools_changed = False
        self._wake = trio.Event()

    # ---------------------------------------------------------------------------------
    # Taking note (synchronous: called by the bridge)

    def task_changed(self, task_id: str) -> None:
        self._note(task_uri(task_id))

    def agents_changed(self, agent_ids: frozenset[str], joined_or_left: bool) -> None:
        self._note(AGENTS_URI)
        for agent_id in agent_ids:
            self._note(agent_uri(agent_id))
        if joined_or_left:
            self._resources_changed = True
        if self.tools(agent_ids):
            self._tools_changed = True
        self._wake.set()

    def _note(self, uri: str) -> None:
        self._updated.add(uri)
        self._wake.set()

    # ---------------------------------------------------------------------------------
    # Sending

    async def run(self) -> None:
        """Send what was noted, as it is noted, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            updated, self._updated = self._updated, set()
            resources_changed, self._resources_changed = self._resources_changed, False
            tools_changed, self._tools_changed = self._tools_changed, False
            session = self.session
            try:
                for uri in sorted(updated):
                    await self.bus.publish(ResourceUpdated(uri=uri))
                    if session is not None and uri in self.subscribed:
                        await session.send_resource_updated(uri)
                if resources_changed:
                    await self.bus.publish(ResourcesListChanged())
                    if session is not None:
                        await session.send_resource_list_changed()
                if tools_changed:
                    await self.bus.publish(ToolsListChanged())
                    if session is not None:
                        await session.send_tool_list_changed()
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                log.debug("the MCP client is gone; notifications dropped")

    async def remember_session(
        self, ctx: ServerRequestContext[Any, Any], call_next: CallNext
    ) -> HandlerResult:
        """Middleware: keep the session of each inbound message (see the module's doc)."""
        self.session = ctx.session
        return await call_next(ctx)
