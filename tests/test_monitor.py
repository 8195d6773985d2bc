"""The monitoring port's HTTP layer (agentmesh._monitor) over real loopback sockets.

The app behind it is a small fake with flags the tests flip (the hub's own metrics are
tested with the hub, the dashboard page in a real browser in test_dashboard.py). Requests
are raw bytes, so that the tests can send what no polite client would, and also go
through the standard library's clients (urllib, http.client) in a thread, as a real
scraper would; the event stream is read with h11's client side.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import importlib.resources
import logging
import re
import struct
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import h11
import orjson
import pytest
import trio

from agentmesh import _monitor
from agentmesh._monitor import (
    EVENT_QUEUE,
    MAX_LOGIN_BODY,
    MAX_REQUEST_HEAD,
    MAX_SESSIONS,
    SESSION_LIFETIME,
    MonitorApp,
    serve_monitor,
)

from .conftest import WAIT

METRICS = b"# HELP agentmesh_up 1 if up\n# TYPE agentmesh_up gauge\nagentmesh_up 1\n"


TASK = {
    "task_id": "t1",
    "state": "completed",
    "capability": "echo",
    "requester": "a2",
    "assignee": "a1",
    "created_at": 1700000000.0,
    "updated_at": 1700000000.5,
    "ttl": 30.0,
    "success": True,
    "data": None,
    "error": None,
    "truncated": True,
}


class FakeApp:
    """A MonitorApp whose answers the test sets."""

    def __init__(self) -> None:
        self.is_ready = True
        self.admin_token: str | None = None
        self.fail: Exception | None = None  # raised by metrics(), ready(), dashboard() when set
        self.body = METRICS
        self.seen: list[str | None] = []  # the Authorization values asked about
        self.tasks: dict[str, dict[str, Any]] = {
            "t1": {**TASK, "data": {"echoed": "hi"}, "truncated": False, "params": {"text": "hi"}},
            "t 1/x": {**TASK, "task_id": "t 1/x", "params": {}},
        }
        self.stats_fail: Exception | None = None
        self.stats_failed = trio.Event()
        self.delegated = 0
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self.unsubscribed = trio.Event()  # set (and replaced) at each unsubscribe
        self.changed = trio.Event()  # set (and replaced) at each subscribe and unsubscribe

    def ready(self) -> bool:
        if self.fail is not None:
            raise self.fail
        return self.is_ready

    def metrics(self) -> bytes:
        if self.fail is not None:
            raise self.fail
        return self.body

    def authorized(self, authorization: str | None) -> bool:
        self.seen.append(authorization)
        return self.admin_token is None or authorization == f"Bearer {self.admin_token}"

    def dashboard(self) -> dict[str, Any]:
        if self.fail is not None:
            raise self.fail
        hub = {"version": "9.9", "uptime": 12.5, "connections": 3, "durable": False}
        agent = {"agent_id": "a1", "name": "echoer", "description": "", "capabilities": []}
        return {
            "hub": {**hub, "authenticated": self.admin_token is not None},
            "agents": [{**agent, "online": True, "in_flight": 0, "metadata": {}}],
            "tasks": [TASK],
            "stats": self.stats(),
        }

    def task(self, task_id: str) -> dict[str, Any] | None:
        return self.tasks.get(task_id)

    def stats(self) -> dict[str, Any]:
        if self.stats_fail is not None:
            self.stats_failed.set()
            raise self.stats_fail
        return {"time": 1700000001.0, "delegated": self.delegated, "completed": 1}

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        self.listeners.append(listener)
        self._changed()

        def unsubscribe() -> None:
            self.listeners.remove(listener)
            self.unsubscribed.set()
            self.unsubscribed = trio.Event()
            self._changed()

        return unsubscribe

    def _changed(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    def emit(self, event: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            listener(event)


_: type[MonitorApp] = FakeApp  # the fake implements the protocol (checked by mypy)


@attrs.frozen
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)


class Wire:
    """A client connection at the level of bytes, with a reader of HTTP/1.1 answers."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _more(self) -> bytes:
        data = await self.stream.receive_some()
        self.buffer += data
        return data

    async def reply(self, *, head: bool = False) -> Reply:
        """The next answer (for a HEAD request: without a body, whatever Content-Length says)."""
        with trio.fail_after(WAIT):
            while b"\r\n\r\n" not in self.buffer:
                if not await self._more():
                    raise AssertionError(f"closed before an answer: {self.buffer!r}")
            top, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            status_line, *lines = top.decode("latin-1").split("\r\n")
            version, status, *_ = status_line.split(" ", 2)
            assert version == "HTTP/1.1", status_line
            headers: dict[str, str] = {}
            for line in lines:
                name, value = line.split(":", 1)
                assert name.lower() not in headers, f"repeated header {name}"
                headers[name.lower()] = value.strip()
            size = 0 if head else int(headers["content-length"])
            while len(self.buffer) < size:
                if not await self._more():
                    raise AssertionError("closed in the middle of a body")
            body, self.buffer = self.buffer[:size], self.buffer[size:]
        return Reply(int(status), headers, body)

    async def closed(self) -> None:
        """Wait until the server closes the connection (cleanly, with nothing more sent)."""
        with trio.fail_after(WAIT):
            while await self._more():
                pass
        assert self.buffer == b"", self.buffer


def get(target: str, *headers: str, method: str = "GET", close: bool = False) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: monitor", *headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@attrs.define
class Monitor:
    app: FakeApp
    port: int

    @asynccontextmanager
    async def wire(self) -> AsyncIterator[Wire]:
        with trio.fail_after(WAIT):
            stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            yield Wire(stream)

    async def ask(self, data: bytes, *, head: bool = False) -> Reply:
        """One request on a fresh connection; the answer."""
        async with self.wire() as wire:
            await wire.send(data)
            return await wire.reply(head=head)

    async def try_ask(self, data: bytes) -> Reply | None:
        """Like `ask`, but None if the server closed the connection without an answer."""
        async with self.wire() as wire:
            try:
                await wire.send(data)
                if not await wire._more():
                    return None
            except trio.BrokenResourceError:
                return None
            return await wire.reply()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


async def start(nursery: trio.Nursery, **options: Any) -> Monitor:
    app = FakeApp()
    port = await nursery.start(partial(serve_monitor, app, "127.0.0.1", 0, **options))
    return Monitor(app, port)


@pytest.fixture
async def monitor(nursery: trio.Nursery) -> Monitor:
    return await start(nursery)


# --- the routes ---------------------------------------------------------------------


async def test_healthz(monitor: Monitor) -> None:
    reply = await monitor.ask(get("/healthz"))
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["cache-control"] == "no-store"
    assert reply.json() == {"status": "ok"}
    monitor.app.is_ready = False  # healthy all the same: the process serves
    assert (await monitor.ask(get("/healthz"))).status == 200


async def test_readyz_follows_the_app(monitor: Monitor) -> None:
    reply = await monitor.ask(get("/readyz"))
    assert (reply.status, reply.json()) == (200, {"status": "ready"})
    assert reply.headers["content-type"] == "application/json"
    monitor.app.is_ready = False
    reply = await monitor.ask(get("/readyz"))
    assert (reply.status, reply.json()) == (503, {"status": "not ready"})
    monitor.app.is_ready = True
    assert (await monitor.ask(get("/readyz"))).status == 200


async def test_metrics_open_without_tokens(monitor: Monitor) -> None:
    reply = await monitor.ask(get("/metrics"))
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert reply.body == METRICS
    assert monitor.app.seen == [None]


async def test_metrics_needs_the_admin_token(monitor: Monitor) -> None:
    monitor.app.admin_token = "s3cret"
    for headers in [(), ("Authorization: Bearer nope",), ("Authorization: s3cret",)]:
        reply = await monitor.ask(get("/metrics", *headers))
        assert reply.status == 401, headers
        assert reply.headers["www-authenticate"] == 'Bearer realm="agentmesh"'
        assert METRICS not in reply.body
    reply = await monitor.ask(get("/metrics", "Authorization: Bearer s3cret"))
    assert (reply.status, reply.body) == (200, METRICS)
    assert monitor.app.seen == [None, "Bearer nope", "s3cret", "Bearer s3cret"]
    # Two Authorization headers count as none.
    two = get("/metrics", "Authorization: Bearer s3cret", "Authorization: Bearer s3cret")
    assert (await monitor.ask(two)).status == 401
    assert monitor.app.seen[-1] is None
    # The health routes stay open.
    assert (await monitor.ask(get("/healthz"))).status == 200
    assert (await monitor.ask(get("/readyz"))).status == 200


async def test_head_is_get_without_a_body(monitor: Monitor) -> None:
    async with monitor.wire() as wire:
        for path in ["/healthz", "/readyz", "/metrics"]:
            await wire.send(get(path))
            full = await wire.reply()
            await wire.send(get(path, method="HEAD"))
            head = await wire.reply(head=True)
            assert head.status == full.status == 200
            assert head.headers == full.headers
            assert head.body == b""
            assert int(head.headers["content-length"]) == len(full.body) > 0
        # Had a body come after a HEAD answer, it would be read as this answer's start.
        await wire.send(get("/healthz", close=True))
        assert (await wire.reply()).json() == {"status": "ok"}
        await wire.closed()


async def test_query_string_and_absolute_form(monitor: Monitor) -> None:
    assert (await monitor.ask(get("/healthz?verbose=1"))).status == 200
    assert (await monitor.ask(get("http://monitor/readyz"))).status == 200


# --- bad requests -------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/nope",
        "/healthz/",
        "/healthz/x",
        "/metricsx",
        "//metrics",
        "*",
        "/index.html",
        "/api",
        "/api/",
        "/api/dashboard/x",
        "/api/tasks",
        "/login/",
    ],
)
async def test_unknown_path_is_404(monitor: Monitor, target: str) -> None:
    async with monitor.wire() as wire:
        await wire.send(get(target))
        reply = await wire.reply()
        assert reply.status == 404
        assert reply.body == b"not found\n"
        assert reply.headers["content-type"] == "text/plain; charset=utf-8"
        await wire.send(get("/healthz"))  # the connection goes on
        assert (await wire.reply()).status == 200


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH", "BREW"])
async def test_other_methods_are_405(monitor: Monitor, method: str) -> None:
    monitor.app.admin_token = "s3cret"  # 405 whatever the token
    async with monitor.wire() as wire:
        for path in ["/healthz", "/readyz", "/metrics"]:
            await wire.send(get(path, method=method))
            reply = await wire.reply()
            assert reply.status == 405, path
            assert reply.headers["allow"] == "GET, HEAD"
    assert monitor.app.seen == []  # the app was not asked


async def test_oversized_request_head_is_431(monitor: Monitor) -> None:
    big_header = get("/metrics", "X-Padding: " + "a" * MAX_REQUEST_HEAD)
    many_headers = get("/metrics", *(f"X-{i}: {'b' * 90}" for i in range(100)))
    long_target = get("/metrics?" + "c" * MAX_REQUEST_HEAD)
    for request in [big_header, many_headers, long_target]:
        async with monitor.wire() as wire:
            await wire.send(request)
            reply = await wire.reply()
            assert reply.status == 431
            assert reply.headers["connection"] == "close"
            await wire.closed()
    # Just under the limit is fine.
    fits = get("/healthz", "X-Padding: " + "d" * (MAX_REQUEST_HEAD - 100))
    assert (await monitor.ask(fits)).status == 200


@pytest.mark.parametrize(
    "request_bytes",
    [
        get("/metrics", "Content-Length: 5") + b"hello",
        get("/healthz", "Content-Length: 100000"),  # the body is never read
        get("/readyz", "Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n",
    ],
)
async def test_a_body_is_413_and_closes(monitor: Monitor, request_bytes: bytes) -> None:
    async with monitor.wire() as wire:
        await wire.send(request_bytes)
        reply = await wire.reply()
        assert reply.status == 413
        assert reply.headers["connection"] == "close"
        await wire.closed()
    assert monitor.app.seen == []


async def test_an_empty_body_is_fine(monitor: Monitor) -> None:
    async with monitor.wire() as wire:
        await wire.send(get("/healthz", "Content-Length: 0"))
        assert (await wire.reply()).status == 200
        await wire.send(get("/healthz"))
        assert (await wire.reply()).status == 200


@pytest.mark.parametrize(
    ("garbage", "status"),
    [
        (b"\x00\x01\x02\x03 garbage\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # HTTP/1.1 without Host
        (b"GET /healthz HTTP/1.1\r\nHost: monitor\r\nno colon here\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400),
        (b"GET  /healthz  HTTP/1.1\r\nHost: monitor\r\n\r\n", 400),
        (b"GET /healthz HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET /healthz HTTP/2.0\r\nHost: monitor\r\n\r\n", 505),
    ],
)
async def test_malformed_http_is_400(monitor: Monitor, garbage: bytes, status: int) -> None:
    async with monitor.wire() as wire:
        await wire.send(garbage)
        reply = await wire.reply()
        assert reply.status == status, reply
        assert reply.headers["connection"] == "close"
        await wire.closed()
    assert (await monitor.ask(get("/healthz"))).status == 200


async def test_garbage_after_a_good_request(monitor: Monitor) -> None:
    async with monitor.wire() as wire:
        await wire.send(get("/healthz") + b"\xff\xfe not http\r\n\r\n")
        assert (await wire.reply()).status == 200
        assert (await wire.reply()).status == 400
        await wire.closed()


async def test_a_client_that_hangs_up_midway(monitor: Monitor) -> None:
    async with monitor.wire() as wire:
        await wire.send(b"GET /metr")
    async with monitor.wire() as wire:  # and one that resets
        await wire.send(b"GET /metrics HTTP/1.1\r\n")
        linger = struct.pack("ii", 1, 0)  # close with a reset
        wire.stream.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_LINGER, linger)
    assert (await monitor.ask(get("/healthz"))).status == 200


# --- time limits and connection limits ----------------------------------------------


async def test_silent_client_is_closed_after_request_timeout(nursery: trio.Nursery) -> None:
    monitor = await start(nursery, request_timeout=0.2)
    # Before the connection opens: the server's timer may start before this task
    # resumes from connecting.
    t0 = trio.current_time()
    async with monitor.wire() as wire:
        await wire.closed()  # no answer: it asked nothing
        assert 0.2 <= trio.current_time() - t0 < 0.2 + 1.0


async def test_partial_request_gets_408(nursery: trio.Nursery) -> None:
    monitor = await start(nursery, request_timeout=0.2)
    # Before the connection opens: the server's timer may start before this task
    # resumes from connecting.
    t0 = trio.current_time()
    async with monitor.wire() as wire:
        await wire.send(b"GET /healthz HTTP/1.1\r\nHost: monitor\r\n")  # no blank line
        reply = await wire.reply()
        assert trio.current_time() - t0 >= 0.2
        assert reply.status == 408
        await wire.closed()
        assert trio.current_time() - t0 < 0.2 + 1.0


async def test_a_slow_drip_is_bounded_per_request(nursery: trio.Nursery) -> None:
    """Each byte comes well within the timeout, but the request as a whole does not."""
    monitor = await start(nursery, request_timeout=0.3)
    request = get("/healthz")
    async with monitor.wire() as wire:
        t0 = trio.current_time()
        with trio.fail_after(WAIT):
            for i in range(len(request)):
                try:
                    await wire.send(request[i : i + 1])
                except trio.BrokenResourceError:
                    break
                await trio.sleep(0.05)  # the slow client under test, not a wait for a race
                if trio.current_time() - t0 > 0.3 + 1.0:
                    break
        reply = await wire.reply()
        assert reply.status == 408
        assert trio.current_time() - t0 < 0.3 + 1.0 + 0.1


async def test_idle_keep_alive_is_closed_after_request_timeout(nursery: trio.Nursery) -> None:
    monitor = await start(nursery, request_timeout=0.2)
    async with monitor.wire() as wire:
        await wire.send(get("/healthz"))
        assert (await wire.reply()).status == 200
        t0 = trio.current_time()
        await wire.closed()
        assert 0.2 <= trio.current_time() - t0 < 0.2 + 1.0


async def test_a_client_that_does_not_read_is_cut_off(nursery: trio.Nursery) -> None:
    """A reader slower than the timeout does not hold the server: pipelined requests for
    far more than the socket buffers hold, never read; the server gives up on it."""
    monitor = await start(nursery, request_timeout=0.3, max_connections=1)
    monitor.app.body = b"x" * 1_000_000
    t0 = trio.current_time()
    async with monitor.wire() as wire:
        await wire.send(get("/metrics") * 50)
        # The one slot is taken until the server gives up; then a new client is served.
        with trio.fail_after(WAIT):
            while (reply := await monitor.try_ask(get("/healthz"))) is None:
                pass
            while reply.status == 503:
                reply = await monitor.try_ask(get("/healthz")) or reply
        assert reply.status == 200
        assert trio.current_time() - t0 >= 0.3
        # What the server had written before it gave up, and no more.
        with trio.fail_after(WAIT):
            received = 0
            try:
                while data := await wire.stream.receive_some():
                    received += len(data)
            except trio.BrokenResourceError:
                pass
        assert 0 < received < 50 * 1_000_000


async def test_too_many_connections_get_503(nursery: trio.Nursery) -> None:
    monitor = await start(nursery, max_connections=2)
    async with monitor.wire() as first, monitor.wire() as second:
        for wire in (first, second):  # answered: so both are being served
            await wire.send(get("/healthz"))
            assert (await wire.reply()).status == 200
        async with monitor.wire() as third:
            await third.send(get("/healthz"))
            reply = await third.reply()
            assert reply.status == 503
            assert reply.headers["connection"] == "close"
            await third.closed()
        for wire in (first, second):  # those two go on
            await wire.send(get("/readyz"))
            assert (await wire.reply()).status == 200
        await first.send(get("/healthz", close=True))
        assert (await first.reply()).status == 200
        await first.closed()
        # The server frees the slot before it closes the connection.
        assert (await monitor.ask(get("/healthz"))).status == 200


# --- keep-alive -----------------------------------------------------------------------


async def test_keep_alive_and_pipelining(monitor: Monitor) -> None:
    async with monitor.wire() as wire:
        for path in ["/healthz", "/readyz", "/metrics", "/nope", "/healthz"]:
            await wire.send(get(path))
            reply = await wire.reply()
            assert "connection" not in reply.headers
        # Three at once; the answers come in order.
        await wire.send(get("/metrics") + get("/nope") + get("/readyz", close=True))
        assert (await wire.reply()).body == METRICS
        assert (await wire.reply()).status == 404
        last = await wire.reply()
        assert (last.status, last.headers["connection"]) == (200, "close")
        await wire.closed()


async def test_connection_close_and_http_1_0(monitor: Monitor) -> None:
    async with monitor.wire() as wire:
        await wire.send(get("/healthz", close=True))
        reply = await wire.reply()
        assert reply.headers["connection"] == "close"
        await wire.closed()
    async with monitor.wire() as wire:
        await wire.send(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert (await wire.reply()).status == 200
        await wire.closed()


# --- faults -----------------------------------------------------------------------------


async def test_an_app_exception_is_500_and_logged(
    monitor: Monitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="agentmesh.monitor")
    monitor.app.fail = RuntimeError("the metrics broke")
    async with monitor.wire() as wire:
        await wire.send(get("/metrics"))
        reply = await wire.reply()
        assert reply.status == 500
        assert b"the metrics broke" not in reply.body  # nothing of the inside leaks
        [record] = caplog.records
        assert record.name == "agentmesh.monitor"
        assert "GET /metrics" in record.getMessage()
        assert record.exc_info is not None
        assert isinstance(record.exc_info[1], RuntimeError)
        await wire.send(get("/readyz"))  # ready() fails the same way
        assert (await wire.reply()).status == 500
        monitor.app.fail = None
        await wire.send(get("/metrics"))  # the same connection goes on
        assert (await wire.reply()).body == METRICS
    assert (await monitor.ask(get("/healthz"))).status == 200


async def test_a_flood_of_500s_is_logged_a_few_times(
    monitor: Monitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="agentmesh.monitor")
    monitor.app.fail = ValueError("again")
    async with monitor.wire() as wire:
        for _ in range(20):
            await wire.send(get("/metrics"))
            assert (await wire.reply()).status == 500
    assert 1 <= len(caplog.records) <= 5


async def test_metrics_that_are_not_bytes_are_500(
    monitor: Monitor, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="agentmesh.monitor")
    monitor.app.body = "text, not bytes"  # type: ignore[assignment]
    assert (await monitor.ask(get("/metrics"))).status == 500
    assert len(caplog.records) == 1


# --- starting and stopping -------------------------------------------------------------


async def test_cancel_closes_the_listener_and_connections() -> None:
    app = FakeApp()
    scope = trio.CancelScope()
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        try:
            with scope:
                await serve_monitor(app, "127.0.0.1", 0, task_status=task_status)
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(run)
        monitor = Monitor(app, port)
        async with monitor.wire() as idle, monitor.wire() as mid_request:
            await idle.send(get("/healthz"))
            assert (await idle.reply()).status == 200
            await mid_request.send(b"GET /heal")
            scope.cancel()
            for wire in (idle, mid_request):
                await wire.closed()
        with trio.fail_after(WAIT):
            await stopped.wait()
        assert scope.cancelled_caught
        with trio.fail_after(WAIT), pytest.raises(OSError, match="connect"):
            await trio.open_tcp_stream("127.0.0.1", port)  # nobody listens there


async def test_bad_arguments_and_a_port_in_use(nursery: trio.Nursery) -> None:
    app = FakeApp()
    for port in (-1, 65536, 99999):
        with pytest.raises(ValueError, match="out of range"):
            await serve_monitor(app, "127.0.0.1", port)
    with pytest.raises(ValueError, match="request_timeout"):
        await serve_monitor(app, "127.0.0.1", 0, request_timeout=0)
    with pytest.raises(ValueError, match="max_connections"):
        await serve_monitor(app, "127.0.0.1", 0, max_connections=0)
    monitor = await start(nursery)
    with pytest.raises(OSError, match="in use"):
        await serve_monitor(app, "127.0.0.1", monitor.port)
    assert (await monitor.ask(get("/healthz"))).status == 200


# --- the dashboard and its API ----------------------------------------------------------

ADMIN = "s3cret"
COOKIE = re.compile(r"agentmesh_session=([A-Za-z0-9_-]{43}); HttpOnly; SameSite=Strict; Path=/")


def post(
    target: str, body: bytes, *headers: str, form: bool = True, length: int | None = None
) -> bytes:
    """A POST request; `length` says another Content-Length than the body's (to send the
    body later, or never)."""
    size = len(body) if length is None else length
    lines = [f"POST {target} HTTP/1.1", "Host: monitor", f"Content-Length: {size}"]
    if form:
        lines.append("Content-Type: application/x-www-form-urlencoded")
    return ("\r\n".join([*lines, *headers]) + "\r\n\r\n").encode() + body


def _inline_hashes(tag: str) -> list[str]:
    page = importlib.resources.files("agentmesh").joinpath("dashboard.html").read_text()
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.DOTALL)
    digests = [hashlib.sha256(block.encode()).digest() for block in blocks]
    return [f"'sha256-{base64.b64encode(digest).decode()}'" for digest in digests]


async def test_the_dashboard_page(monitor: Monitor) -> None:
    page = importlib.resources.files("agentmesh").joinpath("dashboard.html").read_bytes()
    async with monitor.wire() as wire:
        await wire.send(get("/"))
        reply = await wire.reply()
        assert (reply.status, reply.body) == (200, page)
        assert reply.headers["content-type"] == "text/html; charset=utf-8"
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["x-frame-options"] == "DENY"
        policy = dict(
            part.strip().split(" ", 1)
            for part in reply.headers["content-security-policy"].split(";")
        )
        [script], [style] = _inline_hashes("script"), _inline_hashes("style")
        assert policy == {
            "default-src": "'none'",
            "script-src": script,
            "connect-src": "'self'",
            "style-src": style,
            "img-src": "'self' data:",
            "form-action": "'self'",
            "frame-ancestors": "'none'",
            "base-uri": "'none'",
        }
        assert "unsafe" not in reply.headers["content-security-policy"]
        assert b"http://" not in page.replace(b"http://www.w3.org/2000/svg", b"")  # nothing remote
        assert b"https://" not in page
        await wire.send(get("/", method="HEAD"))
        head = await wire.reply(head=True)
        assert (head.status, head.headers) == (200, reply.headers)


async def test_api_dashboard_and_tasks(monitor: Monitor) -> None:
    reply = await monitor.ask(get("/api/dashboard"))
    assert (reply.status, reply.headers["content-type"]) == (200, "application/json")
    assert reply.json() == monitor.app.dashboard()
    reply = await monitor.ask(get("/api/tasks/t1"))
    assert (reply.status, reply.json()) == (200, monitor.app.tasks["t1"])
    assert reply.json()["params"] == {"text": "hi"}
    reply = await monitor.ask(get("/api/tasks/t%201%2Fx?full=1"))  # an ID is percent-decoded
    assert (reply.status, reply.json()["task_id"]) == (200, "t 1/x")
    for missing in ["/api/tasks/nope", "/api/tasks/", "/api/tasks/%ff%fe"]:
        reply = await monitor.ask(get(missing))
        assert (reply.status, reply.json()) == (404, {"error": "no such task"}), missing
        assert reply.headers["content-type"] == "application/json"


@pytest.mark.parametrize(
    ("target", "method", "allow"),
    [
        ("/", "POST", "GET, HEAD"),
        ("/login", "PUT", "GET, HEAD, POST"),
        ("/logout", "GET", "POST"),
        ("/logout", "HEAD", "POST"),
        ("/api/dashboard", "POST", "GET, HEAD"),
        ("/api/events", "DELETE", "GET, HEAD"),
        ("/api/tasks/t1", "POST", "GET, HEAD"),
    ],
)
async def test_405_says_what_each_route_allows(
    monitor: Monitor, target: str, method: str, allow: str
) -> None:
    monitor.app.admin_token = ADMIN
    reply = await monitor.ask(get(target, method=method), head=method == "HEAD")
    assert (reply.status, reply.headers["allow"]) == (405, allow)
    assert monitor.app.seen == []


@pytest.mark.parametrize("target", ["/", "/api/dashboard", "/api/events", "/logout", "/login"])
async def test_a_body_is_413_but_for_the_login_form(monitor: Monitor, target: str) -> None:
    method = "POST" if target in ("/logout", "/login") else "GET"
    request = get(target, "Content-Length: 5", method=method) + b"hello"
    if target == "/login":  # the one route that reads a body: too big is 413
        request = post("/login", b"token=" + b"x" * MAX_LOGIN_BODY)
    async with monitor.wire() as wire:
        await wire.send(request)
        reply = await wire.reply()
        assert (reply.status, reply.headers["connection"]) == (413, "close")
        await wire.closed()
    assert monitor.app.seen == []
    assert "set-cookie" not in reply.headers


# --- access: the admin token, the login form, sessions -----------------------------------


async def _login(monitor: Monitor, token: str = ADMIN) -> str:
    """Log in through the form; the session cookie's value."""
    reply = await monitor.ask(post("/login", f"token={token}".encode()))
    assert (reply.status, reply.headers["location"]) == (303, "/")
    found = COOKIE.fullmatch(reply.headers["set-cookie"])
    assert found is not None, reply.headers["set-cookie"]
    return found[1]


async def test_without_access_the_page_is_the_login_form(monitor: Monitor) -> None:
    monitor.app.admin_token = ADMIN
    for headers in [(), ("Authorization: Bearer nope",), ("Cookie: agentmesh_session=forged",)]:
        reply = await monitor.ask(get("/", *headers))
        assert reply.status == 200, headers
        assert reply.headers["content-type"] == "text/html; charset=utf-8"
        assert b'<form method="post" action="/login">' in reply.body
        assert b'name="token" type="password"' in reply.body
        assert b"EventSource" not in reply.body  # not the dashboard
        policy = reply.headers["content-security-policy"]
        assert "script-src" not in policy  # the login page has no script: none may run
        assert policy.startswith("default-src 'none'; style-src 'sha256-")
    for target in ["/api/dashboard", "/api/tasks/t1", "/api/events"]:
        reply = await monitor.ask(get(target))
        assert (reply.status, reply.json()) == (401, {"error": "unauthorized"}), target
        assert reply.headers["www-authenticate"] == 'Bearer realm="agentmesh"'
    assert (await monitor.ask(get("/metrics"))).status == 401
    assert monitor.app.listeners == []
    # The health routes stay open.
    assert (await monitor.ask(get("/healthz"))).status == 200
    assert (await monitor.ask(get("/readyz"))).status == 200


async def test_the_admin_token_in_a_header(monitor: Monitor) -> None:
    monitor.app.admin_token = ADMIN
    bearer = f"Authorization: Bearer {ADMIN}"
    reply = await monitor.ask(get("/", bearer))
    assert b"EventSource" in reply.body  # the dashboard itself
    assert (await monitor.ask(get("/api/dashboard", bearer))).json()["hub"]["authenticated"]
    assert (await monitor.ask(get("/api/tasks/t1", bearer))).status == 200
    assert (await monitor.ask(get("/metrics", bearer))).body == METRICS
    # Twice counts as none.
    assert (await monitor.ask(get("/api/dashboard", bearer, bearer))).status == 401
    assert monitor.app.seen[-1] is None


async def test_login_logout(monitor: Monitor) -> None:
    monitor.app.admin_token = ADMIN
    session = await _login(monitor)
    assert monitor.app.seen == [f"Bearer {ADMIN}"]
    cookie = f"Cookie: theme=light; agentmesh_session={session}; other=1"
    reply = await monitor.ask(get("/", cookie))
    assert (reply.status, b"EventSource" in reply.body) == (200, True)
    assert (await monitor.ask(get("/api/dashboard", cookie))).status == 200
    assert (await monitor.ask(get("/api/tasks/t1", cookie))).status == 200
    assert (await monitor.ask(get("/metrics", cookie))).body == METRICS  # the same access
    # Several cookies of that name (paths differ): any live one will do.
    two = f"Cookie: agentmesh_session=stale; agentmesh_session={session}"
    assert (await monitor.ask(get("/api/dashboard", two))).status == 200
    # GET /login only sends to the page.
    reply = await monitor.ask(get("/login"))
    assert (reply.status, reply.headers["location"]) == (303, "/")
    # Log out: the session ends, the cookie is cleared.
    reply = await monitor.ask(get("/logout", cookie, "Content-Length: 0", method="POST"))
    assert (reply.status, reply.headers["location"]) == (303, "/")
    assert reply.headers["set-cookie"] == (
        "agentmesh_session=; Max-Age=0; HttpOnly; SameSite=Strict; Path=/"
    )
    assert b"EventSource" not in (await monitor.ask(get("/", cookie))).body
    assert (await monitor.ask(get("/api/dashboard", cookie))).status == 401
    # Without a cookie (a cross-site form has none, SameSite=Strict), nothing is cleared.
    reply = await monitor.ask(get("/logout", "Content-Length: 0", method="POST"))
    assert (reply.status, "set-cookie" in reply.headers) == (303, False)
    # Each login is a session of its own.
    first, second = await _login(monitor), await _login(monitor)
    assert first != second
    for value in (first, second):
        assert (
            await monitor.ask(get("/api/dashboard", f"Cookie: agentmesh_session={value}"))
        ).status == 200


async def test_a_login_keeps_the_connection(monitor: Monitor) -> None:
    monitor.app.admin_token = ADMIN
    async with monitor.wire() as wire:
        await wire.send(post("/login", f"token={ADMIN}".encode()) + get("/healthz"))
        assert (await wire.reply()).status == 303
        assert (await wire.reply()).status == 200
        # A chunked body, and one whose client waits for 100 Continue, are read too.
        chunked = (
            b"POST /login HTTP/1.1\r\nHost: monitor\r\n"
            b"Content-Type: application/x-www-form-urlencoded; charset=UTF-8\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
            b"6\r\ntoken=\r\n6\r\ns3cret\r\n0\r\n\r\n"
        )
        await wire.send(chunked)
        assert (await wire.reply()).status == 303
        body = f"token={ADMIN}".encode()
        await wire.send(post("/login", b"", "Expect: 100-continue", length=len(body)))
        with trio.fail_after(WAIT):
            while b"\r\n\r\n" not in wire.buffer:
                await wire._more()
        assert wire.buffer.startswith(b"HTTP/1.1 100 ")
        wire.buffer = wire.buffer.split(b"\r\n\r\n", 1)[1]
        await wire.send(body)
        assert (await wire.reply()).status == 303


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"token=wrong", 401),
        (b"token=", 401),
        (b"", 401),
        (b"password=s3cret", 401),
        (b"token=s3cret&token=s3cret", 401),  # one token, not two
        (b"token=%FF%FE", 401),  # not UTF-8 once decoded: a wrong token
        (b"token=\xff\xfe", 400),  # not UTF-8 at all
        (b"&".join(b"f%d=1" % i for i in range(100)), 400),  # too many fields
    ],
)
async def test_a_bad_login(monitor: Monitor, body: bytes, status: int) -> None:
    monitor.app.admin_token = ADMIN
    async with monitor.wire() as wire:
        await wire.send(post("/login", body))
        reply = await wire.reply()
        assert reply.status == status
        assert "set-cookie" not in reply.headers
        assert b'action="/login"' in reply.body  # the form again, with a message
        assert b'class="error"' in reply.body
        await wire.send(get("/healthz"))  # the connection goes on
        assert (await wire.reply()).status == 200


async def test_a_login_that_is_not_a_form_is_415(monitor: Monitor) -> None:
    monitor.app.admin_token = ADMIN
    reply = await monitor.ask(
        post("/login", b'{"token": "s3cret"}', "Content-Type: application/json", form=False)
    )
    assert reply.status == 415
    reply = await monitor.ask(post("/login", b"token=s3cret", form=False))
    assert reply.status == 415
    assert monitor.app.seen == []


async def test_a_login_body_of_4_kib_is_read_and_more_is_413(monitor: Monitor) -> None:
    monitor.app.admin_token = ADMIN
    fits = b"token=" + b"x" * (MAX_LOGIN_BODY - 6)
    assert (await monitor.ask(post("/login", fits))).status == 401
    assert monitor.app.seen == ["Bearer " + "x" * (MAX_LOGIN_BODY - 6)]
    # Chunked, the size is known only as it comes: cut at the first byte too many.
    chunk = b"x" * 1000
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(5)) + b"0\r\n\r\n"
    request = (
        b"POST /login HTTP/1.1\r\nHost: monitor\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n\r\n" + chunks
    )
    async with monitor.wire() as wire:
        await wire.send(request)
        reply = await wire.reply()
        assert (reply.status, reply.headers["connection"]) == (413, "close")
        await wire.closed()
    # A declared length over the limit is refused before a byte of the body is read.
    async with monitor.wire() as wire:
        await wire.send(post("/login", b"", length=MAX_LOGIN_BODY + 1))
        reply = await wire.reply()
        assert (reply.status, reply.headers["connection"]) == (413, "close")
    assert len(monitor.app.seen) == 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_sessions_end_after_12_hours(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    monkeypatch.setattr(_monitor, "_clock", clock)
    monitor = await start(nursery)
    monitor.app.admin_token = ADMIN
    cookie = f"Cookie: agentmesh_session={await _login(monitor)}"
    clock.now += SESSION_LIFETIME - 1
    assert (await monitor.ask(get("/api/dashboard", cookie))).status == 200
    later = f"Cookie: agentmesh_session={await _login(monitor)}"
    clock.now += 1
    assert (await monitor.ask(get("/api/dashboard", cookie))).status == 401
    assert b"EventSource" not in (await monitor.ask(get("/", cookie))).body
    assert (await monitor.ask(get("/api/dashboard", later))).status == 200  # its own 12 h
    clock.now += SESSION_LIFETIME
    assert (await monitor.ask(get("/api/dashboard", later))).status == 401


async def test_at_most_64_sessions_the_oldest_ends(monitor: Monitor) -> None:
    monitor.app.admin_token = ADMIN
    sessions = [await _login(monitor) for _ in range(MAX_SESSIONS + 1)]

    async def status(session: str) -> int:
        return (
            await monitor.ask(get("/api/dashboard", f"Cookie: agentmesh_session={session}"))
        ).status

    assert await status(sessions[0]) == 401
    assert [await status(s) for s in sessions[1:]] == [200] * MAX_SESSIONS


# --- the event stream ---------------------------------------------------------------------


class EventStream:
    """A client of /api/events: h11 reads the HTTP response, this splits its body into
    Server-Sent Events ({"event": name, "data": JSON}, {"comment": text}, {"retry": ms})."""

    def __init__(self, wire: Wire) -> None:
        self.wire = wire
        self.h11 = h11.Connection(h11.CLIENT)
        self.text = b""
        self.response: h11.Response | None = None

    async def open(self, *headers: tuple[str, str], method: str = "GET") -> h11.Response:
        request = h11.Request(
            method=method, target="/api/events", headers=[("Host", "monitor"), *headers]
        )
        await self.wire.send(self.h11.send(request) + (self.h11.send(h11.EndOfMessage()) or b""))
        with trio.fail_after(WAIT):
            event = await self._event()
        assert isinstance(event, h11.Response), event
        self.response = event
        return event

    async def _event(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await self.wire.stream.receive_some()
            if not data:
                raise EOFError("the server closed the stream")
            self.h11.receive_data(data)

    async def next(self, timeout: float = WAIT) -> dict[str, Any]:  # noqa: ASYNC109
        with trio.fail_after(timeout):
            while b"\n\n" not in self.text:
                event = await self._event()
                assert isinstance(event, h11.Data), event
                self.text += event.data
        block, self.text = self.text.split(b"\n\n", 1)
        parsed: dict[str, Any] = {}
        for line in block.decode().split("\n"):
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "":
                parsed["comment"] = value
            elif field == "data":
                parsed["data"] = orjson.loads(value)
            else:
                parsed[field] = value
        return parsed

    async def next_of(self, kind: str) -> dict[str, Any]:
        """The next event of `kind` (the data), skipping stats and comments."""
        while True:
            found = await self.next()
            if found.get("event") == kind:
                data: dict[str, Any] = found["data"]
                return data
            assert found.get("event") in (None, "stats"), found


async def _wait_unsubscribed(app: FakeApp, left: int = 0) -> None:
    with trio.fail_after(WAIT):
        while len(app.listeners) > left:
            await app.unsubscribed.wait()


def _broadcast(seq: int, message: str = "hello") -> dict[str, Any]:
    note = {"sender": "a1", "message": message, "recipients": 2}
    return {"kind": "broadcast", "seq": seq, "time": 2.0, "broadcast": note}


async def test_event_stream_snapshot_events_stats(monitor: Monitor) -> None:
    async with monitor.wire() as wire:
        stream = EventStream(wire)
        t0 = trio.current_time()
        response = await stream.open()
        headers = {name.decode(): value.decode() for name, value in response.headers}
        assert response.status_code == 200
        assert headers["content-type"] == "text/event-stream; charset=utf-8"
        assert headers["transfer-encoding"] == "chunked"  # a stream: no length
        assert "content-length" not in headers
        assert headers["cache-control"] == "no-store"
        assert await stream.next() == {"retry": "2000"}
        assert await stream.next() == {"event": "snapshot", "data": monitor.app.dashboard()}
        assert len(monitor.app.listeners) == 1
        event = {"kind": "task_state", "seq": 1, "time": 2.0, "task": TASK, "duration": 0.5}
        monitor.app.emit(event)
        monitor.app.emit(_broadcast(2))
        assert await stream.next() == {"event": "task_state", "data": event}
        assert await stream.next() == {"event": "broadcast", "data": _broadcast(2)}
        monitor.app.delegated = 7
        stats = await stream.next()  # about a second after the stream began
        assert trio.current_time() - t0 >= 0.9
        assert stats == {"event": "stats", "data": monitor.app.stats()}
    await _wait_unsubscribed(monitor.app)  # the client left: the stream ended


async def test_event_stream_outlives_request_timeout_with_keepalives(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_monitor, "_KEEPALIVE_SECONDS", 0.1)
    monkeypatch.setattr(_monitor, "_STATS_SECONDS", 60.0)
    monitor = await start(nursery, request_timeout=0.2)
    async with monitor.wire() as wire:
        stream = EventStream(wire)
        await stream.open()
        assert (await stream.next())["retry"]
        assert (await stream.next())["event"] == "snapshot"
        t0 = trio.current_time()
        while trio.current_time() - t0 < 4 * 0.2:
            assert await stream.next() == {"comment": "keepalive"}
        monitor.app.emit(_broadcast(1))
        assert await stream.next_of("broadcast") == _broadcast(1)
        assert len(monitor.app.listeners) == 1


async def test_event_stream_counts_what_a_slow_client_missed(monitor: Monitor) -> None:
    async with monitor.wire() as wire:
        stream = EventStream(wire)
        await stream.open()
        await stream.next()
        await stream.next()
        total = 3 * EVENT_QUEUE
        for seq in range(1, total + 1):  # all at once: the stream's writer cannot take any
            monitor.app.emit(_broadcast(seq))
        seqs = []
        while len(seqs) < EVENT_QUEUE:  # the ones that fit, in order, with nothing missed
            found = await stream.next()
            assert "missed" not in found.get("data", {}), found
            if found.get("event") == "broadcast":
                seqs.append(found["data"]["seq"])
        assert seqs == list(range(1, EVENT_QUEUE + 1))
        # The next frame says what was lost just before it: the next event, or a stats
        # frame if one comes first (nothing waits by then).
        monitor.app.emit(_broadcast(total + 1))
        with_missed = []
        while True:
            found = await stream.next()
            if "missed" in found.get("data", {}):
                with_missed.append(found)
            if found.get("event") == "broadcast":
                seqs.append(found["data"]["seq"])
                if seqs[-1] == total + 1:
                    break
        # One more may have fitted: the writer, waiting, took the first one at once.
        accepted = seqs[:-1]
        assert accepted in (list(range(1, EVENT_QUEUE + 1)), list(range(1, EVENT_QUEUE + 2)))
        [told] = with_missed
        assert told["data"]["missed"] == total - len(accepted)
        assert next(iter(told["data"])) == "missed"  # at its top level
        assert found["data"] == {**_broadcast(total + 1), **found["data"]}
        monitor.app.emit(_broadcast(total + 2))
        assert await stream.next_of("broadcast") == _broadcast(total + 2)  # and no more


async def test_event_stream_a_client_that_does_not_read(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The socket's buffers fill, then the queue; the rest are dropped, counted: every
    event is either received or counted as missed, just before the next one received."""
    monkeypatch.setattr(_monitor, "_STATS_SECONDS", 0.1)  # the last gap is told by stats
    monitor = await start(nursery)
    async with monitor.wire() as wire:
        stream = EventStream(wire)
        await stream.open()
        await stream.next()
        await stream.next()
        big = "x" * 16384
        total = 2000  # 32 MB: more than loopback's socket buffers hold
        for seq in range(1, total + 1):
            monitor.app.emit(_broadcast(seq, big))
            if seq % 50 == 0:
                await trio.lowlevel.checkpoint()  # the writer may take some meanwhile
        received: list[int] = []
        missed = told = 0  # all told, and told since the last event received
        with trio.fail_after(2 * WAIT):
            while len(received) + missed < total:  # the last gap is told by a stats frame
                found = await stream.next()
                told += found.get("data", {}).get("missed", 0)
                missed += found.get("data", {}).get("missed", 0)
                if found.get("event") == "broadcast":
                    seq = found["data"]["seq"]
                    assert told == seq - (received[-1] if received else 0) - 1
                    received.append(seq)
                    told = 0
        assert missed > 0
        assert received == sorted(received)
        assert len(received) + missed == total


async def test_event_stream_cut_when_a_write_stalls(nursery: trio.Nursery) -> None:
    monitor = await start(nursery, request_timeout=0.3, max_connections=1)
    async with monitor.wire() as wire:
        stream = EventStream(wire)
        await stream.open()
        await stream.next()
        await stream.next()
        big = "y" * 65536
        seq = 0
        t0 = trio.current_time()
        with trio.fail_after(WAIT):
            while monitor.app.listeners:  # never read: the server gives up on the client
                seq += 1
                monitor.app.emit(_broadcast(seq, big))
                await trio.lowlevel.checkpoint()
        assert trio.current_time() - t0 >= 0.3
        # The one connection slot is free again.
        assert (await monitor.ask(get("/healthz"))).status == 200


async def test_event_streams_count_against_max_connections(nursery: trio.Nursery) -> None:
    monitor = await start(nursery, max_connections=1)
    async with monitor.wire() as wire:
        stream = EventStream(wire)
        await stream.open()
        await stream.next()
        assert (await monitor.ask(get("/healthz"))).status == 503
    await _wait_unsubscribed(monitor.app)
    with trio.fail_after(WAIT):
        while (reply := await monitor.try_ask(get("/healthz"))) is None or reply.status != 200:
            pass  # the slot is freed once the server has seen the client go


async def test_event_stream_head_and_access(monitor: Monitor) -> None:
    async with monitor.wire() as wire:
        await wire.send(get("/api/events", method="HEAD"))
        head = await wire.reply(head=True)
        assert (head.status, head.headers["content-type"]) == (
            200,
            "text/event-stream; charset=utf-8",
        )
        assert monitor.app.listeners == []  # nobody subscribed for a HEAD
        await wire.send(get("/healthz"))  # and the connection goes on
        assert (await wire.reply()).status == 200
    monitor.app.admin_token = ADMIN
    assert (await monitor.ask(get("/api/events"))).status == 401
    session = await _login(monitor)
    async with monitor.wire() as wire:
        stream = EventStream(wire)
        response = await stream.open(("Cookie", f"agentmesh_session={session}"))
        assert response.status_code == 200
        assert (await stream.next())["retry"]
        snapshot = await stream.next()
        assert snapshot["data"]["hub"]["authenticated"] is True


async def test_event_stream_faults(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_monitor, "_STATS_SECONDS", 0.1)
    monitor = await start(nursery)
    caplog.set_level(logging.ERROR, logger="agentmesh.monitor")
    monitor.app.fail = RuntimeError("no snapshot")
    assert (await monitor.ask(get("/api/events"))).status == 500
    assert monitor.app.listeners == []  # it subscribed, then let go
    monitor.app.fail = None
    async with monitor.wire() as wire:
        stream = EventStream(wire)
        await stream.open()
        await stream.next()
        await stream.next()
        monitor.app.emit({"kind": "broadcast", "seq": 1, "bad": {1, 2}})  # not JSON: a bug
        monitor.app.emit({"kind": "agent_left\nevent: forged", "seq": 2})
        monitor.app.emit(_broadcast(3))
        # The listener did not raise; the odd kind is not a header; what was lost is counted.
        assert await stream.next() == {
            "event": "message",
            "data": {"missed": 1, "kind": "agent_left\nevent: forged", "seq": 2},
        }
        assert await stream.next() == {"event": "broadcast", "data": _broadcast(3)}
        assert "an event could not be sent" in caplog.text
        monitor.app.stats_fail = RuntimeError("no stats")  # the stream goes on without them
        with trio.fail_after(WAIT):
            await monitor.app.stats_failed.wait()
        monitor.app.emit(_broadcast(4))
        assert await stream.next_of("broadcast") == _broadcast(4)
        monitor.app.stats_fail = None
        while (found := await stream.next()).get("event") != "stats":
            pass
        assert found["data"] == monitor.app.stats()
        assert "stats() failed" in caplog.text


async def _read_to_the_end(stream: EventStream) -> None:
    with trio.fail_after(WAIT):
        while True:
            await stream.next()


async def test_cancel_ends_event_streams(nursery: trio.Nursery) -> None:
    app = FakeApp()
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        with scope:
            await serve_monitor(app, "127.0.0.1", 0, task_status=task_status)

    monitor = Monitor(app, await nursery.start(run))
    async with monitor.wire() as wire:
        stream = EventStream(wire)
        await stream.open()
        await stream.next()
        await stream.next()
        scope.cancel()
        with pytest.raises(EOFError):
            await _read_to_the_end(stream)
    assert app.listeners == []


# --- real clients ---------------------------------------------------------------------


def _urlopen(url: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, _lower(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, _lower(error.headers), error.read()


def _lower(headers: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in headers.items()}


async def test_urllib(monitor: Monitor) -> None:
    async def fetch(path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        with trio.fail_after(WAIT):
            return await trio.to_thread.run_sync(_urlopen, monitor.url(path), headers)

    status, headers, body = await fetch("/healthz")
    assert (status, orjson.loads(body)) == (200, {"status": "ok"})
    monitor.app.is_ready = False
    status, _, body = await fetch("/readyz")
    assert (status, orjson.loads(body)) == (503, {"status": "not ready"})
    monitor.app.admin_token = "s3cret"
    status, headers, _ = await fetch("/metrics")
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="agentmesh"'
    status, headers, body = await fetch("/metrics", Authorization="Bearer s3cret")
    assert (status, body) == (200, METRICS)
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert (await fetch("/nowhere"))[0] == 404


def _keep_alive(port: int) -> list[tuple[int, bytes]]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        answers = []
        for method, path in [("GET", "/healthz"), ("HEAD", "/metrics"), ("GET", "/metrics")]:
            connection.request(method, path)
            response = connection.getresponse()
            answers.append((response.status, response.read()))
        connection.request("POST", "/metrics", body=b"x")
        response = connection.getresponse()
        answers.append((response.status, response.read()))
        return answers
    finally:
        connection.close()


async def test_http_client_keep_alive(monitor: Monitor) -> None:
    with trio.fail_after(WAIT):
        answers = await trio.to_thread.run_sync(_keep_alive, monitor.port)
    assert answers == [
        (200, b'{"status": "ok"}\n'),
        (200, b""),
        (200, METRICS),
        (405, b"method not allowed\n"),
    ]
