"""The hub's HTTP monitoring port, Trio layer: ``/healthz``, ``/readyz``, ``/metrics``.

Modelled on nats-server's monitoring port: plain HTTP/1.1 (h11, no framework), a handful
of read-only GET routes, health endpoints open to anyone, the rest behind the admin
token. What to answer comes from a `MonitorApp` (the hub); this module only speaks HTTP,
bounds what a client can make it hold, and keeps every connection's faults to itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import NoReturn, Protocol
from urllib.parse import urlsplit

import attrs
import h11
import trio

from ._logs import LogLimiter

__all__ = ["MAX_REQUEST_HEAD", "MonitorApp", "serve_monitor"]

log = logging.getLogger("agentmesh.monitor")

MAX_REQUEST_HEAD = 8192  # request line and headers, bytes; more gets 431
_READ_SIZE = 16384
_LINGER_BYTES = 65536  # read (and drop) at most this much from a client we are closing on
_LINGER_SECONDS = 1.0  # ... for at most this long (less if request_timeout is shorter)
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)

_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"
_ALLOW = b"GET, HEAD"
_METHODS = frozenset({b"GET", b"HEAD"})
_CHALLENGE = b'Bearer realm="agentmesh"'


class MonitorApp(Protocol):
    """What the monitoring port asks the hub. Each call must be quick (it runs on the
    event loop) and must not block; an exception becomes a 500 for that request only."""

    def ready(self) -> bool:
        """Accepting connections (not starting, not shutting down)."""
        ...

    def metrics(self) -> bytes:
        """The Prometheus text exposition (format version 0.0.4), already rendered."""
        ...

    def authorized(self, authorization: str | None) -> bool:
        """Whether a request with this ``Authorization`` header value (None: no header)
        may read the protected routes: True when the hub has no tokens, else only for
        ``Bearer <admin token>``."""
        ...


@attrs.frozen
class _Reply:
    status: int
    body: bytes
    content_type: bytes = _TEXT
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _plain(status: int, *headers: tuple[bytes, bytes]) -> _Reply:
    return _Reply(status, HTTPStatus(status).phrase.lower().encode() + b"\n", _TEXT, headers)


async def serve_monitor(
    app: MonitorApp,
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    request_timeout: float = 10.0,
    max_connections: int = 64,
) -> NoReturn:
    """Serve the monitoring routes over HTTP/1.1 on `host`:`port` until cancelled.

    Calls ``task_status.started(bound_port)`` once the listeners are bound and accepting
    (so `port` 0 works: ``port = await nursery.start(serve_monitor, app, host, 0)``). A
    failure to bind (port in use, bad host) raises before `started`; a port out of range
    raises ValueError.

    Routes (GET, and HEAD: the same headers, no body):

    - ``/healthz``: 200 ``{"status": "ok"}``, as long as the process serves. Open.
    - ``/readyz``: 200 ``{"status": "ready"}`` when ``app.ready()``, else 503
      ``{"status": "not ready"}``. Open.
    - ``/metrics``: 200 with ``app.metrics()`` as ``text/plain; version=0.0.4``, if
      ``app.authorized(<Authorization header>)`` (more than one such header counts as
      none), else 401 with ``WWW-Authenticate: Bearer realm="agentmesh"``.

    A query string is ignored. Everything else gets a short text answer: an unknown path
    404; another method on a known path 405 with ``Allow: GET, HEAD``; an exception in
    the app 500 (logged, rate-limited) for that request only; these keep the connection.
    A request line and headers over 8 KiB get 431; a request with a body
    (``Content-Length`` above 0, or chunked) 413 on a known path, as these routes take
    none (the body is not read); malformed HTTP 400 (501 for a transfer coding other
    than chunked, 505 for a version other than HTTP/1.0 or 1.1). These close the
    connection (as does any answer to a request with a body), after a short lingering
    read (at most 1 s and 64 KiB) so that the client sees the answer, not a reset.

    Connections are kept alive for several requests (HTTP/1.1 unless the client sends
    ``Connection: close``; HTTP/1.0 closes). Each request, from the first byte awaited to
    the last byte of the answer written, must complete within `request_timeout`
    seconds; so an idle kept-alive connection is closed after that long too. A client
    that sent part of a request by then gets 408; one that sent nothing is just closed.
    At most `max_connections` connections are served at once; the ones past that get
    503 at once and are closed (and past twice that, are closed without an answer).

    Every connection is a fault boundary: a client's garbage, a broken socket, or an
    exception in the app ends that connection (or request) and nothing else, and the
    listener goes on. Nothing is buffered without bound: h11 holds at most 8 KiB of an
    incomplete request.

    Cancellation: stops accepting, closes the listeners and every open connection at
    once (an answer being written is cut off), then raises `trio.Cancelled`.
    """
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range (0 to 65535)")
    if not request_timeout > 0 or math.isnan(request_timeout):
        raise ValueError("request_timeout must be positive")
    if max_connections < 1:
        raise ValueError("max_connections must be at least 1")
    server = _Server(app, request_timeout=request_timeout, max_connections=max_connections)
    listeners = await trio.open_tcp_listeners(port, host=host)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, server.handle, listeners)
            bound: int = listeners[0].socket.getsockname()[1]
            shown = f"[{host}]" if ":" in host else host
            log.info("agentmesh monitoring on http://%s:%d", shown, bound)
            task_status.started(bound)
            await trio.sleep_forever()
    finally:
        for listener in listeners:  # serve_listeners closes them too, once it has started
            listener.socket.close()
    raise AssertionError("unreachable")  # pragma: no cover


class _Connection:
    """One client connection: its h11 state and whether this request cycle saw bytes."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST_HEAD)
        self.got_bytes = False  # in this request cycle
        self.fed = 0  # bytes given to h11 in this request cycle

    def next_cycle(self) -> None:
        self.fed = len(self.h11.trailing_data[0])  # what came with the last request
        self.got_bytes = self.fed > 0

    def head_size(self) -> int:
        """After a Request event: the size of its request line and headers."""
        return self.fed - len(self.h11.trailing_data[0])

    async def next_event(self) -> h11.Event:
        """The next h11 event, reading as needed; raises h11.RemoteProtocolError."""
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                assert not isinstance(event, type)  # PAUSED: we never read ahead of answering
                return event
            data = await self.stream.receive_some(_READ_SIZE)
            if data:
                self.got_bytes = True
                self.fed += len(data)
            self.h11.receive_data(data)  # b"" is the end of the stream

    def encode(self, reply: _Reply, *, close: bool, head: bool = False) -> bytes:
        """The reply as bytes (for `head`, without the body); with Connection: close if
        `close`."""
        headers = [
            (b"Content-Type", reply.content_type),
            (b"Content-Length", str(len(reply.body)).encode()),
            (b"Cache-Control", b"no-store"),
            *reply.headers,
        ]
        if close:
            headers.append((b"Connection", b"close"))
        phrase = HTTPStatus(reply.status).phrase.encode()
        out = self.h11.send(h11.Response(status_code=reply.status, headers=headers, reason=phrase))
        assert out is not None
        if reply.body and not head:
            out += self.h11.send(h11.Data(data=reply.body)) or b""
        out += self.h11.send(h11.EndOfMessage()) or b""
        return out

    async def linger(self, seconds: float) -> None:
        """Half-close, then drop what the client still sends (bounded), so that closing
        with unread bytes does not reset the connection before the client reads our
        answer."""
        with trio.move_on_after(seconds):
            try:
                await self.stream.send_eof()
                left = _LINGER_BYTES
                while left > 0:
                    data = await self.stream.receive_some(_READ_SIZE)
                    if not data:
                        break
                    left -= len(data)
            except _BROKEN:
                pass


class _Server:
    def __init__(self, app: MonitorApp, *, request_timeout: float, max_connections: int) -> None:
        self.app = app
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self.grace = min(_LINGER_SECONDS, request_timeout)
        self.active = 0
        self.refusing = 0
        self.quiet = LogLimiter(log)
        self.routes: dict[str, Callable[[h11.Request], _Reply]] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
        }

    async def handle(self, stream: trio.SocketStream) -> None:
        """serve_listeners' handler (it closes the stream afterwards)."""
        conn = _Connection(stream)
        if self.active < self.max_connections:
            self.active += 1
            try:
                await self._guarded(self._serve(conn))
            finally:
                self.active -= 1
        elif self.refusing < self.max_connections:
            self.refusing += 1
            try:
                await self._guarded(self._refuse(conn))
            finally:
                self.refusing -= 1
        # else: closed at once, without an answer

    async def _guarded(self, serving: Awaitable[None]) -> None:
        """A connection's fault boundary: what goes wrong ends this connection only."""
        try:
            await serving
        except _BROKEN:
            pass
        except Exception:  # a bug here ends this connection, not the listener
            self.quiet.log(
                "connection failed", logging.ERROR, "monitor: a connection failed", exc_info=True
            )

    async def _refuse(self, conn: _Connection) -> None:
        with trio.move_on_after(self.grace):
            await conn.stream.send_all(conn.encode(_plain(503), close=True))
            await conn.linger(self.grace)

    async def _serve(self, conn: _Connection) -> None:
        while True:
            conn.next_cycle()
            with trio.move_on_after(self.request_timeout) as scope:
                keep_alive = await self._exchange(conn)
            if scope.cancelled_caught:
                if conn.got_bytes and conn.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    with trio.move_on_after(self.grace):
                        await conn.stream.send_all(conn.encode(_plain(408), close=True))
                        await conn.linger(self.grace)
                return
            if not keep_alive:
                return
            conn.h11.start_next_cycle()

    async def _exchange(self, conn: _Connection) -> bool:
        """Read one request and answer it; whether the connection may carry another."""
        try:
            event = await conn.next_event()
            if isinstance(event, h11.ConnectionClosed):
                return False
            assert isinstance(event, h11.Request), event
            # h11 bounds only what it holds incomplete: a longer head read at once passes.
            if conn.head_size() > MAX_REQUEST_HEAD:
                raise h11.RemoteProtocolError("request head too long", error_status_hint=431)
            if event.http_version not in (b"1.0", b"1.1"):
                raise h11.RemoteProtocolError("not HTTP/1.x", error_status_hint=505)
            end = conn.h11.next_event()  # EndOfMessage at once if there is no body
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if 400 <= exc.error_status_hint < 600 else 400
            await conn.stream.send_all(conn.encode(_plain(status), close=True))
            await conn.linger(self.grace)
            return False
        has_body = not isinstance(end, h11.EndOfMessage)
        reply = self._route(event, has_body)
        await conn.stream.send_all(conn.encode(reply, close=has_body, head=event.method == b"HEAD"))
        if has_body:  # not read: the connection cannot be reused
            await conn.linger(self.grace)
            return False
        return conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE

    def _route(self, request: h11.Request, has_body: bool) -> _Reply:
        route = self.routes.get(_path(request.target))
        if route is None:
            return _plain(404)
        if request.method not in _METHODS:
            return _plain(405, (b"Allow", _ALLOW))
        if has_body:
            return _plain(413)
        try:
            return route(request)
        except Exception:
            self.quiet.log(
                "route failed",
                logging.ERROR,
                "monitor: %s %s failed",
                request.method.decode("ascii", "replace"),
                request.target.decode("ascii", "replace"),
                exc_info=True,
            )
            return _plain(500)

    def _healthz(self, request: h11.Request) -> _Reply:
        return _Reply(200, b'{"status": "ok"}\n', _JSON)

    def _readyz(self, request: h11.Request) -> _Reply:
        if self.app.ready():
            return _Reply(200, b'{"status": "ready"}\n', _JSON)
        return _Reply(503, b'{"status": "not ready"}\n', _JSON)

    def _metrics(self, request: h11.Request) -> _Reply:
        given = [value for name, value in request.headers if name == b"authorization"]
        authorization = given[0].decode("latin-1") if len(given) == 1 else None
        if not self.app.authorized(authorization):
            return _plain(401, (b"WWW-Authenticate", _CHALLENGE))
        body = self.app.metrics()
        if not isinstance(body, bytes):
            raise TypeError(f"MonitorApp.metrics() returned {type(body).__name__}, not bytes")
        return _Reply(200, body, _PROMETHEUS)


def _path(target: bytes) -> str:
    """The path of a request target (origin form or absolute form), without the query."""
    text = target.decode("ascii", "replace")
    if not text.startswith("/"):
        return urlsplit(text).path if "://" in text else ""
    return text.split("?", 1)[0].split("#", 1)[0]
