"""The monitoring port's HTTP layer (agentmesh._monitor) over real loopback sockets.

The app behind it is a small fake with flags the tests flip (the hub's own metrics are
tested with the hub). Requests are raw bytes, so that the tests can send what no polite
client would, and also go through the standard library's clients (urllib, http.client)
in a thread, as a real scraper would.
"""

from __future__ import annotations

import http.client
import logging
import struct
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import orjson
import pytest
import trio

from agentmesh._monitor import MAX_REQUEST_HEAD, MonitorApp, serve_monitor

from .conftest import WAIT

METRICS = b"# HELP agentmesh_up 1 if up\n# TYPE agentmesh_up gauge\nagentmesh_up 1\n"


class FakeApp:
    """A MonitorApp whose answers the test sets."""

    def __init__(self) -> None:
        self.is_ready = True
        self.admin_token: str | None = None
        self.fail: Exception | None = None  # raised by metrics() and ready() when set
        self.body = METRICS
        self.seen: list[str | None] = []  # the Authorization values asked about

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
    "target", ["/", "/nope", "/healthz/", "/healthz/x", "/metricsx", "//metrics", "*"]
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
    async with monitor.wire() as wire:
        t0 = trio.current_time()
        await wire.closed()  # no answer: it asked nothing
        assert 0.2 <= trio.current_time() - t0 < 0.2 + 1.0


async def test_partial_request_gets_408(nursery: trio.Nursery) -> None:
    monitor = await start(nursery, request_timeout=0.2)
    async with monitor.wire() as wire:
        t0 = trio.current_time()
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
