"""The hub's HTTP monitoring port, Trio layer: the dashboard, its JSON API and its event
stream, ``/healthz``, ``/readyz``, ``/metrics``.

Modelled on nats-server's monitoring port: plain HTTP/1.1 (h11, no framework), a handful
of read-only routes, health endpoints open to anyone, the rest behind the admin token
(an ``Authorization`` header, or the session cookie of the dashboard's login form). What
to answer comes from a `MonitorApp` (the hub); this module only speaks HTTP, bounds what
a client can make it hold, and keeps every connection's faults to itself.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import importlib.resources
import logging
import math
import re
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from http import HTTPStatus
from typing import Any, NoReturn, Protocol
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import h11
import orjson
import trio

from ._logs import LogLimiter

__all__ = [
    "EVENT_QUEUE",
    "MAX_LOGIN_BODY",
    "MAX_REQUEST_HEAD",
    "MAX_SESSIONS",
    "SESSION_COOKIE",
    "SESSION_LIFETIME",
    "MonitorApp",
    "serve_monitor",
]

log = logging.getLogger("agentmesh.monitor")

MAX_REQUEST_HEAD = 8192  # request line and headers, bytes; more gets 431
MAX_LOGIN_BODY = 4096  # the login form's body, bytes; more gets 413
EVENT_QUEUE = 1000  # events held for one event stream's client; past that, dropped and counted
SESSION_COOKIE = "agentmesh_session"
SESSION_LIFETIME = 12 * 3600.0  # seconds a dashboard login lasts
MAX_SESSIONS = 64  # logins kept at once; a new one past that ends the oldest
_READ_SIZE = 16384
_LINGER_BYTES = 65536  # read (and drop) at most this much from a client we are closing on
_LINGER_SECONDS = 1.0  # ... for at most this long (less if request_timeout is shorter)
_STATS_SECONDS = 1.0  # an event stream's `stats` event, every this many seconds
_KEEPALIVE_SECONDS = 15.0  # ... and its keepalive comment
_EVENT_BATCH = 512  # events written to a stream's socket in one write at most
_COALESCE_SECONDS = 0.01  # a stream's writer waits this long for more after an event
_RETRY_MS = 2000  # an event stream's `retry:`: how soon a browser reconnects
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError)
_TASKS_PREFIX = "/api/tasks/"

_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_HTML = b"text/html; charset=utf-8"
_PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"
_EVENT_STREAM = b"text/event-stream; charset=utf-8"
_FORM = "application/x-www-form-urlencoded"
_CHALLENGE = b'Bearer realm="agentmesh"'
_EVENT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")


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

    def dashboard(self) -> dict[str, Any]:
        """JSON-ready state of the hub now: ``{"hub": {"version": str, "uptime": float,
        "connections": int, "durable": bool, "authenticated": bool}, "agents": [{"agent_id",
        "name", "description", "capabilities": [{"name", "description", "params_schema"}],
        "online": bool, "in_flight": int, "metadata": {...}}]`` (registration order, at
        most 1000), ``"tasks": [TaskView, ...]`` (newest first, at most 500, without their
        data), ``"stats": <as stats()>}``."""
        ...

    def task(self, task_id: str) -> dict[str, Any] | None:
        """One task in full (its TaskView with its real ``data``, plus ``"params"``), or
        None if the hub holds no such task."""
        ...

    def stats(self) -> dict[str, Any]:
        """Running totals: ``{"time": unix float, "delegated", "completed", "failed",
        "timeout", "cancelled": int, "latency_sum": float, "latency_count": int}`` (sums
        over every finished task: an interval's mean latency is the difference of the
        sums over the difference of the counts), ``"agents", "online", "connections":
        int, "tasks": {state: count}}``."""
        ...

    def subscribe(self, listener: Callable[[dict[str, Any]], None]) -> Callable[[], None]:
        """Call ``listener(event)`` for each event of the router (a JSON-ready dict with
        ``"kind"``, ``"seq"`` and ``"time"``, shared: not to be changed), synchronously
        on the event loop, until the returned function is called. The listener does not
        block and does not raise."""
        ...


@attrs.frozen
class _Reply:
    status: int
    body: bytes
    content_type: bytes = _TEXT
    headers: tuple[tuple[bytes, bytes], ...] = ()


def _plain(status: int, *headers: tuple[bytes, bytes]) -> _Reply:
    return _Reply(status, HTTPStatus(status).phrase.lower().encode() + b"\n", _TEXT, headers)


def _json(status: int, value: Any, *headers: tuple[bytes, bytes]) -> _Reply:
    return _Reply(status, orjson.dumps(value) + b"\n", _JSON, headers)


def _see_other(*headers: tuple[bytes, bytes]) -> _Reply:
    return _Reply(303, b"see other\n", _TEXT, ((b"Location", b"/"), *headers))


_UNAUTHORIZED_API = _json(401, {"error": "unauthorized"}, (b"WWW-Authenticate", _CHALLENGE))
_NO_SUCH_TASK = _json(404, {"error": "no such task"})


@attrs.frozen
class _Request:
    method: bytes
    path: str
    headers: Sequence[tuple[bytes, bytes]]  # as h11 gives them: names in lower case
    body: bytes = b""

    def header(self, name: bytes) -> str | None:
        """The value of header `name` (lower case), if it came exactly once."""
        given = [value for key, value in self.headers if key == name]
        return given[0].decode("latin-1") if len(given) == 1 else None

    def cookies(self, name: str) -> list[str]:
        """The values of every cookie called `name` (a browser may send several)."""
        found = []
        for key, value in self.headers:
            if key == b"cookie":
                for part in value.decode("latin-1").split(";"):
                    cookie, _, content = part.strip().partition("=")
                    if cookie == name:
                        found.append(content.strip('"'))
        return found


@attrs.frozen
class _Route:
    allow: bytes  # the methods, as the Allow header of a 405 says them
    handler: Callable[[_Request], _Reply | _EventStream]
    form: bool = False  # a POST takes a form body (at most MAX_LOGIN_BODY bytes)

    @property
    def methods(self) -> frozenset[bytes]:
        return frozenset(method.strip() for method in self.allow.split(b","))


@attrs.frozen
class _Page:
    """An HTML page and the headers that go with it: its Content-Security-Policy allows
    exactly its own inline scripts and styles (by hash), and nothing from elsewhere."""

    body: bytes
    headers: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def of(cls, text: str, *, scripts: bool) -> _Page:
        def hashes(tag: str) -> str:
            found = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.DOTALL)
            digests = (hashlib.sha256(block.encode()).digest() for block in found)
            sources = [f"'sha256-{base64.b64encode(d).decode()}'" for d in digests]
            return " ".join(sources) or "'none'"

        policy = [
            "default-src 'none'",
            f"style-src {hashes('style')}",
            "img-src 'self' data:",
            "form-action 'self'",
            "frame-ancestors 'none'",
            "base-uri 'none'",
        ]
        if scripts:
            policy[1:1] = [f"script-src {hashes('script')}", "connect-src 'self'"]
        headers = (
            (b"Content-Security-Policy", "; ".join(policy).encode()),
            (b"Referrer-Policy", b"no-referrer"),
            (b"X-Frame-Options", b"DENY"),
        )
        return cls(text.encode(), headers)

    def reply(self, status: int = 200, *headers: tuple[bytes, bytes]) -> _Reply:
        return _Reply(status, self.body, _HTML, (*self.headers, *headers))


@functools.cache
def _dashboard_page() -> _Page:
    text = importlib.resources.files(__package__).joinpath("dashboard.html").read_text("utf-8")
    return _Page.of(text, scripts=True)


_LOGIN_STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; background: #f4f6f9; color: #1d2433;
  display: flex; min-height: 90vh; align-items: center; justify-content: center; }
main { background: #fff; border: 1px solid #dde2ea; border-radius: 8px; padding: 28px 32px;
  width: 340px; box-shadow: 0 2px 8px rgba(20, 30, 50, .06); }
h1 { font-size: 20px; margin: 0 0 4px; } p { color: #5b6577; margin: 0 0 18px; }
label { display: block; font-weight: 600; margin-bottom: 6px; }
input { width: 100%; box-sizing: border-box; padding: 8px 10px; font: inherit;
  border: 1px solid #c4ccd8; border-radius: 5px; }
button { margin-top: 14px; width: 100%; padding: 9px; font: inherit; font-weight: 600;
  color: #fff; background: #2f6fdf; border: 0; border-radius: 5px; cursor: pointer; }
.error { color: #b42318; background: #fdecea; border-radius: 5px; padding: 8px 10px; }
"""

_LOGIN_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>agentmesh: log in</title><link rel="icon" href="data:,">
<style>{style}</style></head>
<body><main><h1>agentmesh</h1><p>This hub's dashboard needs its admin token.</p>{message}
<form method="post" action="/login">
<label for="token">Admin token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required autofocus>
<button type="submit">Log in</button>
</form></main></body></html>
"""


@functools.cache
def _login_page(message: str = "") -> _Page:
    shown = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
    return _Page.of(_LOGIN_HTML.format(style=_LOGIN_STYLE, message=shown), scripts=False)


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

    Routes (GET also answers HEAD: the same headers, no body):

    - ``GET /healthz``: 200 ``{"status": "ok"}``, as long as the process serves. Open.
    - ``GET /readyz``: 200 ``{"status": "ready"}`` when ``app.ready()``, else 503
      ``{"status": "not ready"}``. Open.
    - ``GET /metrics``: 200 with ``app.metrics()`` as ``text/plain; version=0.0.4``;
      protected: without access, 401 with ``WWW-Authenticate: Bearer realm="agentmesh"``.
    - ``GET /``: the dashboard (agentmesh/dashboard.html), with a Content-Security-Policy
      that allows its own inline script and style (by hash) and connections to this
      origin only, and nothing else. Without access: 200 with the login page (a form
      with one password field, ``token``, posted to ``/login``).
    - ``POST /login``: a form (``application/x-www-form-urlencoded``, at most 4 KiB,
      else 413; another type 415) whose ``token`` is checked as
      ``app.authorized("Bearer " + token)``: if it passes, 303 to ``/`` with a new
      session cookie (``agentmesh_session``, HttpOnly, SameSite=Strict, Path=/); if not,
      401 with the login page and a message. ``GET /login``: 303 to ``/``.
    - ``POST /logout``: ends the session of the request's cookie; 303 to ``/``, with the
      cookie cleared (if the request had one).
    - ``GET /api/dashboard``: ``app.dashboard()`` as JSON. Protected (401 JSON).
    - ``GET /api/tasks/<id>``: ``app.task(id)`` as JSON, or 404 ``{"error": "no such
      task"}``. Protected (401 JSON).
    - ``GET /api/events``: Server-Sent Events, protected (401 JSON). First ``event:
      snapshot`` with ``app.dashboard()``; then ``event: <kind>`` with each event the
      app's `subscribe` hands over (its JSON as ``data``), ``event: stats`` with
      ``app.stats()`` every second, and a ``: keepalive`` comment every 15 s. Events
      wait in a queue of `EVENT_QUEUE` per stream; those that find it full are dropped
      and counted, and the first frame after them (the next event, or a ``stats`` once
      nothing waits) carries ``"missed": N`` at its top level: the client's view has a
      gap, and it should rebuild from a fresh snapshot (a new stream). Events are
      written within 10 ms, those of a burst together. Once its headers are written a
      stream is not bound by `request_timeout`; it ends when the client closes (or
      sends more than 64 KiB), when a write does not complete within `request_timeout`
      (a client that stopped reading), or with the server; it closes the connection.

    Protected routes need access: the hub is open (``app.authorized(None)``), or the
    request has ``Authorization: Bearer <admin token>`` (``app.authorized(<header>)``;
    more than one such header counts as none), or the cookie of a live session. A
    session lasts `SESSION_LIFETIME` (12 h) from its login; at most `MAX_SESSIONS` (64)
    are kept, a new login past that ending the oldest. Sessions live in this server's
    memory: a restart logs everyone out.

    A query string is ignored. Everything else gets a short text answer: an unknown path
    404; another method on a known path 405 with the path's ``Allow``; an exception in
    the app 500 (logged, rate-limited) for that request only; these keep the connection.
    A request line and headers over 8 KiB get 431; a request with a body
    (``Content-Length`` above 0, or chunked) 413 on a known path, except ``POST
    /login`` (the body is not read); malformed HTTP 400 (501 for a transfer coding other
    than chunked, 505 for a version other than HTTP/1.0 or 1.1). These close the
    connection (as does any answer to a request with a body left unread), after a short
    lingering read (at most 1 s and 64 KiB) so that the client sees the answer, not a
    reset.

    Connections are kept alive for several requests (HTTP/1.1 unless the client sends
    ``Connection: close``; HTTP/1.0 closes). Each request, from the first byte awaited to
    the last byte of the answer written, must complete within `request_timeout`
    seconds; so an idle kept-alive connection is closed after that long too. A client
    that sent part of a request by then gets 408; one that sent nothing is just closed.
    At most `max_connections` connections are served at once, event streams included;
    the ones past that get 503 at once and are closed (and past twice that, are closed
    without an answer).

    Every connection is a fault boundary: a client's garbage, a broken socket, or an
    exception in the app ends that connection (or request) and nothing else, and the
    listener goes on. Nothing is buffered without bound: h11 holds at most 8 KiB of an
    incomplete request, an event stream at most `EVENT_QUEUE` events. Every call to the
    app is a quick synchronous one on the event loop.

    Cancellation: stops accepting, closes the listeners and every open connection at
    once (an answer being written, or an event stream, is cut off; streams unsubscribe),
    then raises `trio.Cancelled`.
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


_clock: Callable[[], float] = trio.current_time  # the sessions' clock (a test may replace it)


class _Sessions:
    """The dashboard's login sessions: at most `limit`, each valid for `lifetime` seconds
    from its creation. Kept by a digest of their token, oldest first."""

    def __init__(
        self,
        *,
        clock: Callable[[], float],
        limit: int = MAX_SESSIONS,
        lifetime: float = SESSION_LIFETIME,
    ) -> None:
        self._clock = clock
        self.limit = limit
        self.lifetime = lifetime
        self._ends: dict[bytes, float] = {}  # digest -> when it ends; in order of creation

    def new(self) -> str:
        """A new session's token (the oldest session ends if there are `limit`)."""
        now = self._clock()
        self._expire(now)
        while len(self._ends) >= self.limit:
            del self._ends[next(iter(self._ends))]
        token = secrets.token_urlsafe(32)
        self._ends[_digest(token)] = now + self.lifetime
        return token

    def valid(self, tokens: Iterable[str]) -> bool:
        """Whether one of `tokens` is a live session's."""
        now = self._clock()
        self._expire(now)
        return any(_digest(token) in self._ends for token in tokens)

    def end(self, token: str) -> None:
        self._ends.pop(_digest(token), None)

    def _expire(self, now: float) -> None:
        ends = self._ends
        while ends and next(iter(ends.values())) <= now:  # the oldest end first
            del ends[next(iter(ends))]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _cookie(value: str, *attributes: str) -> tuple[bytes, bytes]:
    parts = [f"{SESSION_COOKIE}={value}", *attributes, "HttpOnly", "SameSite=Strict", "Path=/"]
    return (b"Set-Cookie", "; ".join(parts).encode("ascii"))


class _Encoder:
    """Events as (SSE event name, JSON bytes), each encoded once however many streams
    take it: the app hands every listener the same dict, one listener after another."""

    def __init__(self) -> None:
        self._last: tuple[dict[str, Any], tuple[str, bytes]] | None = None
        self._names: dict[str, str] = {}  # kind -> its SSE event name, for a few kinds

    def __call__(self, event: dict[str, Any]) -> tuple[str, bytes]:
        last = self._last
        if last is not None and last[0] is event:
            return last[1]
        kind = event.get("kind")
        if not isinstance(kind, str):
            name = "message"
        elif (known := self._names.get(kind)) is not None:
            name = known
        else:  # a header of the stream: only a plain word, else "message"
            name = kind if _EVENT_NAME.fullmatch(kind) else "message"
            if len(self._names) < 64:
                self._names[kind] = name
        encoded = (name, orjson.dumps(event))
        self._last = (event, encoded)
        return encoded


def _with_missed(data: bytes, missed: int) -> bytes:
    """A JSON object's bytes with ``"missed": <missed>`` first among its keys."""
    if not (missed and data.startswith(b"{")):
        return data
    rest = data[1:] if data == b"{}" else b"," + data[1:]
    return b'{"missed":%d' % missed + rest


def _take(queue: trio.MemoryReceiveChannel[tuple[str, bytes]], frames: list[bytes]) -> bool:
    """Add what waits in `queue` to `frames`, up to `_EVENT_BATCH` of them; whether that
    many are there."""
    while len(frames) < _EVENT_BATCH:
        try:
            frames.append(_frame(*queue.receive_nowait()))
        except trio.WouldBlock:
            return False
    return True


def _frame(kind: str, data: bytes) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


class _EventStream:
    """One client's event stream: its subscription to the app and the bounded queue of
    events (already encoded) waiting to be written. The listener never blocks and never
    raises: an event that finds the queue full is dropped and counted in `missed`; the
    first frame after the ones dropped (the next event queued, or a stats frame once the
    queue is empty) carries the count, so ``"missed": N`` always means "N events were
    lost just before this one"."""

    def __init__(self, encode: _Encoder, quiet: LogLimiter) -> None:
        self._encode = encode
        self._quiet = quiet
        self._send, self.queue = trio.open_memory_channel[tuple[str, bytes]](EVENT_QUEUE)
        self._unsubscribe: Callable[[], None] | None = None
        self.missed = 0
        self.first = b""  # the snapshot's frame

    def open(self, app: MonitorApp) -> None:
        """Subscribe, and take the snapshot, at once: no event comes in between."""
        self._unsubscribe = app.subscribe(self)
        try:
            snapshot = orjson.dumps(app.dashboard())
        except BaseException:
            self.close()
            raise
        self.first = b"retry: %d\n\n" % _RETRY_MS + _frame("snapshot", snapshot)

    def __call__(self, event: dict[str, Any]) -> None:
        """The listener: called by the app, inside the router's work."""
        try:
            name, data = self._encode(event)
        except Exception:
            self.missed += 1  # the client's view is incomplete: it should rebuild
            self._quiet.log(
                "bad event", logging.ERROR, "monitor: an event could not be sent", exc_info=True
            )
            return
        try:
            self._send.send_nowait((name, _with_missed(data, self.missed) if self.missed else data))
        except trio.WouldBlock:
            self.missed += 1
        except _BROKEN:
            pass
        else:
            self.missed = 0

    def stats_frame(self, stats: bytes) -> bytes:
        """A stats frame; it carries the count of events missed if nothing is queued
        (else the next event queued will)."""
        if self.missed and self.queue.statistics().current_buffer_used == 0:
            stats = _with_missed(stats, self.missed)
            self.missed = 0
        return _frame("stats", stats)

    def close(self) -> None:
        """Unsubscribe (once) and drop what waits."""
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        self._send.close()
        if unsubscribe is not None:
            try:
                unsubscribe()
            except Exception:
                self._quiet.log(
                    "unsubscribe failed",
                    logging.ERROR,
                    "monitor: unsubscribe failed",
                    exc_info=True,
                )


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
            (b"X-Content-Type-Options", b"nosniff"),
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
        self.sessions = _Sessions(clock=_clock)
        self.encode = _Encoder()  # shared by the event streams
        self.page = _dashboard_page()  # read now: a missing file fails the start, not a request
        get, post = b"GET, HEAD", b"POST"
        self.routes: dict[str, _Route] = {
            "/healthz": _Route(get, self._healthz),
            "/readyz": _Route(get, self._readyz),
            "/metrics": _Route(get, self._metrics),
            "/": _Route(get, self._index),
            "/login": _Route(b"GET, HEAD, POST", self._login, form=True),
            "/logout": _Route(post, self._logout),
            "/api/dashboard": _Route(get, self._api_dashboard),
            "/api/events": _Route(get, self._api_events),
        }
        self.task_route = _Route(get, self._api_task)  # /api/tasks/<id>

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
                keep_alive = await self._exchange(conn, scope)
            if scope.cancelled_caught:
                if conn.got_bytes and conn.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    with trio.move_on_after(self.grace):
                        await conn.stream.send_all(conn.encode(_plain(408), close=True))
                        await conn.linger(self.grace)
                return
            if not keep_alive:
                return
            conn.h11.start_next_cycle()

    async def _exchange(self, conn: _Connection, deadline: trio.CancelScope) -> bool:
        """Read one request and answer it; whether the connection may carry another.
        `deadline` bounds the exchange (an event stream lifts it once under way)."""
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
            has_body = not isinstance(end, h11.EndOfMessage)
            route = self._find(event.target)
            body: bytes | None = b""
            if route is None:
                answer: _Reply | _EventStream = _plain(404)
            elif event.method not in route.methods:
                answer = _plain(405, (b"Allow", route.allow))
            elif has_body and not (route.form and event.method == b"POST"):
                answer = _plain(413)
            else:
                if has_body:
                    body = await self._read_form(conn, event, end)
                    has_body = body is None  # a body read whole leaves the connection usable
                if body is None:
                    answer = _plain(413)
                else:
                    request = _Request(event.method, _path(event.target), event.headers, body)
                    answer = self._call(route, request)
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint if 400 <= exc.error_status_hint < 600 else 400
            await conn.stream.send_all(conn.encode(_plain(status), close=True))
            await conn.linger(self.grace)
            return False
        head = event.method == b"HEAD"
        if isinstance(answer, _EventStream):
            return await self._stream(conn, answer, deadline, head=head)
        await conn.stream.send_all(conn.encode(answer, close=has_body, head=head))
        if has_body:  # not read: the connection cannot be reused
            await conn.linger(self.grace)
            return False
        return conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE

    def _find(self, target: bytes) -> _Route | None:
        path = _path(target)
        if path.startswith(_TASKS_PREFIX):
            return self.task_route
        return self.routes.get(path)

    async def _read_form(
        self, conn: _Connection, request: h11.Request, first: object
    ) -> bytes | None:
        """The body of `request` (`first` is what h11 gave after its head), or None if it
        is over MAX_LOGIN_BODY bytes (then it is not read further)."""
        lengths = [value for name, value in request.headers if name == b"content-length"]
        if lengths and int(lengths[0]) > MAX_LOGIN_BODY:
            return None
        if conn.h11.they_are_waiting_for_100_continue:
            go_on = h11.InformationalResponse(status_code=100, headers=[])
            await conn.stream.send_all(conn.h11.send(go_on) or b"")
        chunks: list[bytes] = []
        size = 0
        event = first
        while not isinstance(event, h11.EndOfMessage):
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_LOGIN_BODY:
                    return None
                chunks.append(event.data)
            event = await conn.next_event()
            if isinstance(event, h11.ConnectionClosed):  # pragma: no cover - h11 raises first
                raise trio.BrokenResourceError("the client left mid-body")
        return b"".join(chunks)

    def _call(self, route: _Route, request: _Request) -> _Reply | _EventStream:
        """A route's answer; an exception in it (the app's) is a 500 for this request."""
        try:
            return route.handler(request)
        except Exception:
            self.quiet.log(
                "route failed",
                logging.ERROR,
                "monitor: %s %s failed",
                request.method.decode("ascii", "replace"),
                request.path,
                exc_info=True,
            )
            return _plain(500)

    async def _stream(
        self, conn: _Connection, events: _EventStream, deadline: trio.CancelScope, *, head: bool
    ) -> bool:
        """Write an event stream until it ends (see `serve_monitor`); for HEAD, only its
        headers. Whether the connection may carry another request."""
        try:
            response = h11.Response(
                status_code=200,
                reason=b"OK",
                headers=[
                    (b"Content-Type", _EVENT_STREAM),
                    (b"Cache-Control", b"no-store"),
                    (b"X-Content-Type-Options", b"nosniff"),
                    (b"X-Accel-Buffering", b"no"),  # for a proxy in front: do not buffer
                ],
            )
            out = conn.h11.send(response) or b""
            if head:
                out += conn.h11.send(h11.EndOfMessage()) or b""
                await conn.stream.send_all(out)
                return conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE
            out += conn.h11.send(h11.Data(data=events.first)) or b""
            await conn.stream.send_all(out)
            deadline.deadline = math.inf  # a stream is not a request: it lasts until it ends
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_client, conn, nursery.cancel_scope)
                await self._pump(conn, events)
                nursery.cancel_scope.cancel()
            return False
        finally:
            events.close()

    async def _pump(self, conn: _Connection, events: _EventStream) -> None:
        """Write the stream's events, its stats and keepalives, until a write fails or
        stalls for `request_timeout` (then return) or until cancelled."""
        now = trio.current_time()
        next_stats, next_keepalive = now + _STATS_SECONDS, now + _KEEPALIVE_SECONDS
        while True:
            frames: list[bytes] = []
            with trio.move_on_at(min(next_stats, next_keepalive)):
                frames.append(_frame(*await events.queue.receive()))
                if not _take(events.queue, frames):
                    # Let a burst gather: one write for many events, not one each.
                    await trio.sleep(_COALESCE_SECONDS)
            _take(events.queue, frames)
            now = trio.current_time()
            if now >= next_stats:
                next_stats += _STATS_SECONDS
                if next_stats <= now:  # behind (a slow write): no burst to catch up
                    next_stats = now + _STATS_SECONDS
                stats = self._stats()
                if stats is not None:
                    frames.append(events.stats_frame(stats))
            if now >= next_keepalive:
                next_keepalive = now + _KEEPALIVE_SECONDS
                frames.append(b": keepalive\n\n")
            if not frames:
                continue
            out = conn.h11.send(h11.Data(data=b"".join(frames))) or b""
            with trio.move_on_after(self.request_timeout) as stalled:
                try:
                    await conn.stream.send_all(out)
                except _BROKEN:
                    return
            if stalled.cancelled_caught:
                return

    def _stats(self) -> bytes | None:
        try:
            return orjson.dumps(self.app.stats())
        except Exception:
            self.quiet.log("stats failed", logging.ERROR, "monitor: stats() failed", exc_info=True)
            return None

    async def _watch_client(self, conn: _Connection, stream_scope: trio.CancelScope) -> None:
        """While a stream is written: end it when the client closes its side (or sends
        more than we are willing to drop)."""
        try:
            left = _LINGER_BYTES
            while left > 0:
                data = await conn.stream.receive_some(_READ_SIZE)
                if not data:
                    break
                left -= len(data)
        except _BROKEN:
            pass
        stream_scope.cancel()

    # --- access -------------------------------------------------------------------------

    def _allowed(self, request: _Request) -> bool:
        """Whether `request` may read the protected routes: an open hub or the admin token
        (one call to the app either way), or a live session's cookie."""
        if self.app.authorized(request.header(b"authorization")):
            return True
        return self.sessions.valid(request.cookies(SESSION_COOKIE))

    # --- the routes -------------------------------------------------------------------

    def _healthz(self, request: _Request) -> _Reply:
        return _Reply(200, b'{"status": "ok"}\n', _JSON)

    def _readyz(self, request: _Request) -> _Reply:
        if self.app.ready():
            return _Reply(200, b'{"status": "ready"}\n', _JSON)
        return _Reply(503, b'{"status": "not ready"}\n', _JSON)

    def _metrics(self, request: _Request) -> _Reply:
        if not self._allowed(request):
            return _plain(401, (b"WWW-Authenticate", _CHALLENGE))
        body = self.app.metrics()
        if not isinstance(body, bytes):
            raise TypeError(f"MonitorApp.metrics() returned {type(body).__name__}, not bytes")
        return _Reply(200, body, _PROMETHEUS)

    def _index(self, request: _Request) -> _Reply:
        if not self._allowed(request):
            return _login_page().reply(200)
        return self.page.reply(200)

    def _login(self, request: _Request) -> _Reply:
        if request.method != b"POST":
            return _see_other()
        content_type = (request.header(b"content-type") or "").split(";", 1)[0].strip()
        if content_type.lower() != _FORM:
            return _plain(415)
        try:
            fields = parse_qs(request.body.decode("utf-8"), max_num_fields=16)
        except (UnicodeDecodeError, ValueError):
            return _login_page("That form could not be read.").reply(400)
        tokens = fields.get("token", [])
        token = tokens[0] if len(tokens) == 1 else ""
        if not token or not self.app.authorized("Bearer " + token):
            challenge = (b"WWW-Authenticate", _CHALLENGE)
            return _login_page("That is not the admin token.").reply(401, challenge)
        return _see_other(_cookie(self.sessions.new()))

    def _logout(self, request: _Request) -> _Reply:
        presented = request.cookies(SESSION_COOKIE)
        if not presented:  # nothing to end (nor a cookie to clear: a cross-site POST has none)
            return _see_other()
        for token in presented:
            self.sessions.end(token)
        return _see_other(_cookie("", "Max-Age=0"))

    def _api_dashboard(self, request: _Request) -> _Reply:
        if not self._allowed(request):
            return _UNAUTHORIZED_API
        return _json(200, self.app.dashboard())

    def _api_task(self, request: _Request) -> _Reply:
        if not self._allowed(request):
            return _UNAUTHORIZED_API
        task_id = unquote(request.path[len(_TASKS_PREFIX) :])
        found = self.app.task(task_id) if task_id else None
        return _NO_SUCH_TASK if found is None else _json(200, found)

    def _api_events(self, request: _Request) -> _Reply | _EventStream:
        if not self._allowed(request):
            return _UNAUTHORIZED_API
        events = _EventStream(self.encode, self.quiet)
        if request.method == b"GET":
            events.open(self.app)
        return events


def _path(target: bytes) -> str:
    """The path of a request target (origin form or absolute form), without the query."""
    text = target.decode("ascii", "replace")
    if not text.startswith("/"):
        return urlsplit(text).path if "://" in text else ""
    return text.split("?", 1)[0].split("#", 1)[0]
