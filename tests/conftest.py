"""Fixtures: a real hub on a loopback port, and a plain WebSocket client speaking raw JSON."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import orjson
import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from agentmesh import Hub, HubConfig

WAIT = 5.0  # wall-clock bound on any single wait in a test


class RawClient:
    """A client that speaks the wire protocol by hand, as a client in any language would."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.agent_id: str | None = None
        self.resume_token: str | None = None
        self._ids = itertools.count(1)
        self.inbox: list[dict[str, Any]] = []  # frames received while waiting for others

    async def send(self, type_: str, payload: Any = None, **envelope: Any) -> str:
        msg_id = envelope.pop("id", None) or f"c{next(self._ids)}"
        frame = {"type": type_, "id": msg_id, "payload": {} if payload is None else payload}
        frame.update(envelope)
        await self.ws.send_message(orjson.dumps(frame).decode())
        return msg_id

    async def recv(self, timeout: float = WAIT) -> dict[str, Any]:  # noqa: ASYNC109
        """The next frame, from the inbox first."""
        if self.inbox:
            return self.inbox.pop(0)
        with trio.fail_after(timeout):
            return orjson.loads(await self.ws.get_message())

    async def expect(
        self,
        type_: str,
        timeout: float = WAIT,  # noqa: ASYNC109
        **match: Any,
    ) -> dict[str, Any]:
        """Wait for a frame of `type_` whose payload has the `match` items; keep the others."""
        with trio.fail_after(timeout):
            for i, frame in enumerate(self.inbox):
                if _matches(frame, type_, match):
                    return self.inbox.pop(i)
            while True:
                frame = orjson.loads(await self.ws.get_message())
                if _matches(frame, type_, match):
                    return frame
                self.inbox.append(frame)

    async def request(self, type_: str, payload: Any = None, **envelope: Any) -> dict[str, Any]:
        """Send and return the reply (the frame whose in_reply_to is our id)."""
        msg_id = await self.send(type_, payload, **envelope)
        with trio.fail_after(WAIT):
            for i, frame in enumerate(self.inbox):
                if frame.get("in_reply_to") == msg_id:
                    return self.inbox.pop(i)
            while True:
                frame = orjson.loads(await self.ws.get_message())
                if frame.get("in_reply_to") == msg_id:
                    return frame
                self.inbox.append(frame)

    async def register(self, name: str, *capabilities: Any, **extra: Any) -> dict[str, Any]:
        reply = await self.request(
            "register", {"name": name, "capabilities": list(capabilities), **extra}
        )
        assert reply["type"] == "register", reply
        self.agent_id = reply["payload"]["agent_id"]
        self.resume_token = reply["payload"]["resume_token"]
        return reply


def _matches(frame: dict[str, Any], type_: str, match: dict[str, Any]) -> bool:
    payload = frame.get("payload") or {}
    return frame.get("type") == type_ and all(payload.get(k) == v for k, v in match.items())


@pytest.fixture
def hub_config() -> HubConfig:
    return HubConfig()


@pytest.fixture(autouse=True)
def _own_data_home(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A standalone hub a test starts keeps its store under the test's own folder (its
    default data directory), never in the home directory, and never shared."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data-home"))
    monkeypatch.delenv("AGENTMESH_DATA_DIR", raising=False)
    monkeypatch.delenv("AGENTMESH_MEMORY", raising=False)


@pytest.fixture
async def hub(nursery: trio.Nursery, hub_config: HubConfig) -> Hub:
    hub = Hub(hub_config)
    await nursery.start(hub.serve, "127.0.0.1", 0)
    return hub


@asynccontextmanager
async def open_raw(url: str, **options: Any) -> AsyncIterator[RawClient]:
    """A RawClient on a fresh WebSocket connection to `url`."""
    async with open_websocket_url(url, **options) as ws:
        try:
            yield RawClient(ws)
        finally:
            if ws.closed is not None:
                # trio-websocket's client waits for the server's TCP close but never
                # closes its own socket when the server closed first; do it here.
                await ws._stream.aclose()


@pytest.fixture
def connect(hub: Hub) -> Any:
    """`async with connect() as client:` a RawClient to the hub."""
    return partial(open_raw, hub.url)
