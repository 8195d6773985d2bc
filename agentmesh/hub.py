"""The hub's Trio layer: listeners, one nursery per connection, timers, shutdown.

All decisions are made by `routing.Router`; this module moves frames and time.
"""

from __future__ import annotations

import enum
import hmac
import logging
import math
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from itertools import islice
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import parse_qs, urlsplit

import orjson
import trio

from . import _tracing
from . import protocol as p
from ._commits import Commits
from ._events import Listener, agent_view, task_view
from ._journal import Journal
from ._logs import LogLimiter
from ._monitor import serve_monitor
from ._poller import Poller
from ._version import __version__
from ._websocket import (
    ConnectionClosed,
    Flusher,
    Handshake,
    ServerWebSocket,
    Stalled,
    remote_address,
)
from .config import HubConfig
from .metrics import Snapshot as MetricsSnapshot
from .routing import Router
from .store import MemoryStore, Snapshot, Store

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from ._cluster import Cluster

__all__ = [
    "CLOSE_DROPPED",
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_SILENT",
    "CLOSE_SLOW_CONSUMER",
    "Hub",
    "open_hub",
]

log = logging.getLogger("agentmesh.hub")

CLOSE_GOING_AWAY = 1001  # the hub is shutting down
CLOSE_SILENT = 4001  # no message for `silence_limit` seconds
CLOSE_SLOW_CONSUMER = 4002  # the peer let its outbox fill up
CLOSE_DROPPED = 4004  # cut by the hub's operator (`Hub.drop`)
CLOSE_INTERNAL_ERROR = 1011  # a bug in the hub, met while serving this connection
CLOSE_LOST = 1006  # the stream broke (never sent: there is no stream to send it on)
_CROWD_WAIT = 1.0  # seconds a sender waits at most for a connection it crowded
_CLEANUP_BITE = 500  # tasks dropped per scheduler turn (under a millisecond of work)
_DASHBOARD_AGENTS = 1000  # agents in `Hub.dashboard()`, at most
_DASHBOARD_TASKS = 500  # recent tasks in `Hub.dashboard()`, at most
_TOTALS = ("delegated", "completed", "failed", "timeout", "cancelled")  # in `Hub.stats()`


class _Turn:
    """Whose message the router is handling now: the connection to slow down when the
    frames it causes crowd another connection."""

    def __init__(self) -> None:
        self.sender: _Connection | None = None


class _Connection:
    """One client connection as the router sees it: a bounded outbox and a close switch.

    `send` never blocks. A frame the outbox has no room for closes the connection as a
    slow consumer (4002), except an advisory one (progress, broadcast), which is dropped
    once the outbox is half full. A frame that leaves the outbox more than half full
    makes the connection whose message caused it wait (`crowded`) before its next
    message is read: a client pipelining tasks to a slower agent goes at its pace.

    With a durable store (`commits`), a durable frame, and every frame after it, is
    held until the batch it belongs to is committed (`release`); held frames count
    against the room like queued ones.
    """

    def __init__(
        self, ws: ServerWebSocket, turn: _Turn, quiet: LogLimiter, commits: Commits | None
    ) -> None:
        self.ws = ws
        self._quiet = quiet
        self._commits = commits
        # (batch, frame, outcome_of, droppable, sender): frames waiting for a commit
        self._held: deque[tuple[int, str, str | None, bool, _Connection | None]] = deque()
        self._held_bytes = 0
        self.close_code = 1000
        self.close_reason = "bye"
        self.scope: trio.CancelScope | None = None
        self.dropped = 0  # advisory frames dropped because the peer was behind
        self.crowded: set[_Connection] = set()  # connections this one must wait for
        self._turn = turn
        self._lost: list[str] = []
        self.closing = False

    def send(
        self,
        frame: str,
        *,
        outcome_of: str | None = None,
        droppable: bool = False,
        durable: bool = False,
    ) -> None:
        if self._held or (durable and self._commits is not None):
            self._hold(frame, outcome_of, droppable)
            return
        if not (droppable or self.closing):  # `_send_now`'s usual case, inline
            ws = self.ws
            if ws.send(frame, outcome_of):
                sender = self._turn.sender
                if sender is not None and sender is not self and not ws.has_room():
                    sender.crowded.add(self)
                return
        self._send_now(frame, outcome_of, droppable)

    def _hold(self, frame: str, outcome_of: str | None, droppable: bool) -> None:
        commits = self._commits
        assert commits is not None
        if self.closing:
            if outcome_of is not None:
                self._lost.append(outcome_of)
            return
        sender = self._turn.sender
        self._held.append((commits.batch, frame, outcome_of, droppable, sender))
        self._held_bytes += len(frame)
        commits.holding(self)
        if sender is not None and sender is not self and not self.has_room():
            sender.crowded.add(self)

    def release(self, committed: int) -> bool:
        """Send the frames held for batches up to `committed`, as if sent now by whoever
        sent them; whether any are still held."""
        held, turn = self._held, self._turn
        if not held or held[0][0] > committed:
            return bool(held)
        while held and held[0][0] <= committed:
            _, frame, outcome_of, droppable, turn.sender = held.popleft()
            self._held_bytes -= len(frame)
            self._send_now(frame, outcome_of, droppable)
        turn.sender = None
        self.ws.wake()  # those waiting for room look again
        return bool(held)

    def _send_now(self, frame: str, outcome_of: str | None, droppable: bool) -> None:
        ws = self.ws
        if droppable and not ws.has_room():
            self.dropped += 1  # advisory frames never make a peer a slow consumer
            return
        if not self.closing:
            if ws.send(frame, outcome_of):
                sender = self._turn.sender
                if sender is not None and sender is not self and not ws.has_room():
                    sender.crowded.add(self)
                return
            self.close(CLOSE_SLOW_CONSUMER, "slow consumer: too many frames or bytes left unread")
        if outcome_of is not None:
            self._lost.append(outcome_of)

    def has_room(self, *, inbound: bool = True) -> bool:
        """Whether the outbox, with what is held for a commit, is at most half full."""
        if self.closing or not self.ws.has_room(inbound=inbound):
            return False
        outbox = self.ws.outbox
        return not self._held or (
            len(self._held) + len(outbox.frames) <= outbox.half_frames
            and self._held_bytes + outbox.bytes <= outbox.half_bytes
        )

    async def wait_room(self) -> None:
        """Wait until the outbox (with what is held) is at most half full, or the
        connection closes. Cancelling it changes nothing."""
        while not self.closing and not self.has_room(inbound=False):
            await self.ws.room_changed()

    def close(self, code: int, reason: str) -> None:
        if self.closing:
            return
        self.closing = True
        self.close_code, self.close_reason = code, reason
        if code == CLOSE_SLOW_CONSUMER:
            self._quiet.log(
                "slow consumer", logging.WARNING, "closing %s: %s", self.ws.remote, reason
            )
        self.ws.wake()
        if self.scope is not None:
            self.scope.cancel()

    def unsent_outcomes(self) -> list[str]:
        """Task IDs whose outcome frames were not wholly written (queued, or still held
        for a commit). Call it once nothing more is written."""
        held = [entry[2] for entry in self._held if entry[2] is not None]
        self._held.clear()
        return self._lost + self.ws.unsent_tags() + held


class _Wait(enum.Enum):
    """Why `_Reading.route` stopped: what the connection's task must do first."""

    ROOM = "room"  # wait for room in the outbox (and in the outboxes it crowded)
    TAKE_OVER = "take over"  # read what a `register` that resumes another hub's agent needs
    STOP = "stop"  # nothing: reading is over (the peer closed, or the hub closes it)


_ROOM, _TAKE_OVER, _STOP = _Wait.ROOM, _Wait.TAKE_OVER, _Wait.STOP


class _Reading:
    """How a connection's messages reach the router: in turn, each after the waits it
    needs (`route` stops before a message that must wait, and says why), and the
    silence deadline moved on as they come (`alive`). The hub's `Poller` calls
    `readable` when the socket has data; the connection's task does the waiting."""

    __slots__ = ("_clock", "cluster", "conn", "deadline", "limit", "liveness", "pending",
                 "router", "slack", "taken", "turn")  # fmt: skip

    def __init__(
        self,
        conn: _Connection,
        router: Router,
        turn: _Turn,
        cluster: Cluster | None,
        liveness: trio.CancelScope,
        limit: float,
    ) -> None:
        self.conn, self.router, self.turn, self.cluster = conn, router, turn, cluster
        self.liveness, self.limit = liveness, limit
        self.slack = min(1.0, limit / 10)  # moving a deadline has a cost: not on every read
        self._clock = trio.lowlevel.current_clock()  # `trio.current_time`, minus two calls
        self.pending: list[str | bytes] = []  # messages left to route after a wait
        # (agent, token, its register) to route once what it needs was read
        self.taken: tuple[str, str, str | bytes] | None = None
        self.deadline = 0.0
        self.alive(now=True)

    def alive(self, *, now: bool = False) -> None:
        """A message came: the silence deadline moves on (`now`: at once, else only
        once it came within `limit`)."""
        time = self._clock.current_time()
        if now or self.deadline - time < self.limit:
            self.liveness.deadline = self.deadline = time + self.limit + self.slack

    def readable(self) -> _Wait | None:
        """The `Poller`'s callback: route what the socket holds. None to go on reading;
        else why the connection's task must take over (to wait, or to end)."""
        ws = self.conn.ws
        try:
            messages = ws.receive_now()
        except ConnectionClosed:
            return _STOP
        if messages:
            self.alive()
            wait = self.route(messages)
            if wait is not None:
                return wait
        return _STOP if ws.ended else None

    def route_pending(self) -> _Wait | None:
        """`route` the messages left when it last stopped."""
        pending, self.pending = self.pending, []
        return self.route(pending)

    def route(self, messages: list[str | bytes]) -> _Wait | None:
        """Route `messages` in turn; stop before one that must wait (keeping it and the
        rest in `pending`, or in `taken`) and return why. A connection the hub closes
        (while routing its own messages, say) reads nothing more: its messages after
        that are as if still on the wire."""
        conn, router, turn, cluster = self.conn, self.router, self.turn, self.cluster
        outbox = conn.ws.outbox
        turn.sender = conn
        try:
            for i, message in enumerate(messages):
                if conn.closing:
                    return _STOP
                # A catch-up still to send implies no room: it is sent whenever there is
                # (`Router.drained`). `has_room` is asked only if its usual case (nothing
                # held, the outbox at most half full) fails.
                if conn.crowded or (
                    (
                        conn._held
                        or outbox.bytes > outbox.half_bytes
                        or len(outbox.frames) > outbox.half_frames
                    )
                    and not conn.has_room(inbound=False)
                ):
                    self.pending = messages[i:]
                    return _ROOM
                if cluster is not None and type(message) is str and '"resume"' in message:
                    resumed = _resumed_elsewhere(router, message)
                    if resumed is not None:  # its row and tasks from NATS, first
                        self.taken = (*resumed, message)
                        self.pending = messages[i + 1 :]
                        return _TAKE_OVER
                router.receive(conn, message)
        finally:
            turn.sender = None
        return None


class Hub:
    """An agentmesh hub. Embed it with ``port = await nursery.start(hub.serve, host, port)``.

    `router` (available once serving) holds the registry and the task table. `store`
    keeps them across restarts: a `MemoryStore` (the default) keeps nothing, a
    `SQLiteStore` keeps everything (see docs/durability.md).

    With opentelemetry installed, the hub makes a span for each task (docs/tracing.md)
    with `tracer_provider`, or if None with the global provider if the program set a
    real one up by the time `serve` starts; a `NoOpTracerProvider` turns that off.
    """

    def __init__(
        self,
        config: HubConfig | None = None,
        *,
        store: Store | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.config = config or HubConfig()
        self.store: Store = store if store is not None else MemoryStore()
        self.tracer_provider = tracer_provider
        self.port: int | None = None
        self.url: str | None = None
        self._router: Router | None = None
        self._commits: Commits | None = None
        self._cluster: Cluster | None = None
        self._ready = False  # accepting connections: not starting, not shutting down
        self._timer_scope: trio.CancelScope | None = None
        self._connections: set[_Connection] = set()
        self._flusher = Flusher()
        self._poller: Poller | None = None  # while connections are served, on Linux
        self._turn = _Turn()
        self._quiet = LogLimiter(log)  # for the lines a client can make the hub repeat

    @property
    def router(self) -> Router:
        if self._router is None:
            raise RuntimeError("the hub is not serving yet")
        return self._router

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 8765,
        *,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Serve until cancelled; report the bound port to `nursery.start` once accepting.

        First the store is read back (`StoreError` if it cannot be: nothing is served).
        On cancellation every connection is closed with 1001 (going away), each close
        bounded by `config.close_timeout`, after what was held for a commit went out;
        then what is left is committed and the store closed.
        """
        if self._router is not None:
            raise RuntimeError("a Hub serves once; make a new Hub")
        listeners = None
        cluster: Cluster | None = None
        if self.config.cluster is not None:
            # The default name is the bound port's: bind first, accept only once joined.
            listeners = await self._listen(host, port, ssl_context)
            try:
                cluster = await self._join(host, _bound_port(listeners[0]))
            except BaseException:
                await _close_listeners(listeners)
                raise
        try:
            store = self.store
            try:
                self._restore(await trio.to_thread.run_sync(store.load), cluster)  # no ref
            except BaseException:
                await _close_listeners(listeners)
                raise
            try:
                await self._serve(host, port, ssl_context, task_status, listeners, cluster)
            finally:
                with trio.CancelScope(shield=True):  # closing a file: quick
                    await trio.to_thread.run_sync(store.close)
        finally:
            if cluster is not None:
                with trio.CancelScope(shield=True):
                    await cluster.aclose()
        raise AssertionError("unreachable")  # pragma: no cover

    async def _join(self, host: str, port: int) -> Cluster:
        """Join the cluster of `config.cluster` (`ClusterError` if it cannot)."""
        from ._cluster import Cluster, default_hub_name, nats_options

        config = self.config
        assert config.cluster is not None
        name = config.hub_name or default_hub_name(host, port)
        options = nats_options(config)
        cluster = self._cluster = Cluster(
            config.cluster,
            name,
            options,
            replicas=config.cluster_replicas,
            # No task row is of use past its deadline and a requester's resume grace.
            tasks_age=config.max_ttl + config.resume_grace + 60.0,
        )
        await cluster.join()
        log.info("joined the cluster at %s as hub %s", self.config.cluster, name)
        return cluster

    async def _listen(
        self, host: str, port: int, ssl_context: ssl.SSLContext | None
    ) -> list[trio.abc.Listener[trio.abc.Stream]]:
        if ssl_context is None:
            return list(await trio.open_tcp_listeners(port, host=host))
        return list(
            await trio.open_ssl_over_tcp_listeners(
                port, ssl_context, host=host, https_compatible=True
            )
        )

    def _restore(self, snapshot: Snapshot, cluster: Cluster | None = None) -> None:
        """Make the router, from what the store kept."""
        store = self.store
        # A hub of a cluster commits too, if only to the tasks bucket (the commit rule).
        journal = Journal() if store.durable or cluster is not None else None
        if journal is not None and cluster is not None:
            journal.commit_written = True
        tracer = None
        if _tracing.available:
            provider = _tracing.real_provider(self.tracer_provider)
            if provider is not None:
                tracer = _tracing.HubTracer(provider)
        router = self._router = Router(
            self.config,
            clock=trio.current_time,
            wake=self._wake,
            journal=journal,
            tracer=tracer,
            cluster=cluster,
        )
        router.restore(snapshot)
        if journal is not None:
            commits = self._commits = Commits(router, store, on_released=router.drained)
            journal.wake = commits.wake
            if journal:
                commits.wake()

    async def _serve(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None,
        task_status: trio.TaskStatus[int],
        listeners: list[trio.abc.Listener[trio.abc.Stream]] | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        stopping = trio.Event()
        async with trio.open_nursery() as nursery:
            connections = await nursery.start(self._host_connections, stopping)
            try:
                nursery.start_soon(self._run_timers)
                nursery.start_soon(self._run_cleanup)
                nursery.start_soon(self._flusher.run)
                if cluster is not None:
                    try:
                        await nursery.start(cluster.run, self.router, self._commits, self._flusher)
                    except BaseException:
                        await _close_listeners(listeners)
                        raise
                if listeners is None:
                    listeners = await self._listen(host, port, ssl_context)
                self.port = _bound_port(listeners[0])
                await nursery.start(
                    partial(
                        trio.serve_listeners, self._handle, listeners, handler_nursery=connections
                    )
                )
                scheme = "wss" if ssl_context else "ws"
                shown = f"[{host}]" if ":" in host else host
                self.url = f"{scheme}://{shown}:{self.port}"
                log.info("agentmesh hub serving on %s", self.url)
                self._ready = True
                task_status.started(self.port)
                await trio.sleep_forever()
            finally:
                stopping.set()

    async def _host_connections(
        self, stopping: trio.Event, *, task_status: trio.TaskStatus[trio.Nursery]
    ) -> None:
        """Hold the connection handlers in a nursery shielded from the hub's cancellation,
        so that on shutdown the listener stops first and then every connection gets a
        proper 1001 close, all within `close_timeout`.
        """
        commits = self._commits
        with trio.CancelScope(shield=True) as scope:
            async with trio.open_nursery() as hub_side:
                if commits is not None:
                    hub_side.start_soon(commits.run)
                if Poller.available():
                    flusher = self._flusher
                    self._poller = Poller(flusher.hold, partial(flusher.release, now=True))
                    hub_side.start_soon(self._poller.run)
                async with trio.open_nursery() as connections:
                    task_status.started(connections)
                    await stopping.wait()
                    self._ready = False
                    scope.deadline = trio.current_time() + self.config.close_timeout
                    if commits is not None:  # what was held goes out before the close
                        with trio.move_on_after(self.config.close_timeout / 2):
                            await commits.settle()
                    if self._connections:
                        log.info("closing %d connections", len(self._connections))
                    for conn in list(self._connections):
                        conn.close(CLOSE_GOING_AWAY, "hub shutting down")
                hub_side.cancel_scope.cancel()
            self._poller = None  # its epoll set is closed
        if commits is not None:
            with trio.CancelScope(shield=True) as last:
                last.deadline = trio.current_time() + self.config.close_timeout
                await commits.final()
            if last.cancelled_caught:
                if self.router.store_error is not None:
                    why = self.router.store_error
                elif self._cluster is not None:
                    why = "the store or the cluster's tasks bucket did not answer in time"
                else:
                    why = "the store did not answer in time"
                log.error(
                    "the last changes were not stored within %gs: %s",
                    self.config.close_timeout,
                    why,
                )

    async def _handle(self, stream: trio.abc.Stream) -> None:
        """One connection, start to end: a fault boundary. An unexpected error in its
        reading or routing is logged and closes it with 1011; the hub goes on."""
        ws: ServerWebSocket | None = None
        try:
            with trio.move_on_after(self.config.handshake_timeout):
                ws, admin, version = await self._open(stream)
        finally:
            if ws is None:
                await trio.aclose_forcefully(stream)
        if ws is None:
            return
        conn = _Connection(ws, self._turn, self._quiet, self._commits)
        router = self.router
        router.connected(conn, admin=admin, protocol=version)
        ws.on_room = partial(router.drained, conn)
        ws.on_written = router.delivered
        ws.on_fault = partial(conn.close, CLOSE_INTERNAL_ERROR, "internal hub error")
        self._connections.add(conn)
        try:
            async with trio.open_nursery() as nursery:
                conn.scope = nursery.cancel_scope
                if conn.closing:
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._write_loop, conn)
                await self._read_loop(conn, router)
                nursery.cancel_scope.cancel()
        except Exception:
            self._quiet.log(
                "connection error",
                logging.ERROR,
                "internal error on the connection of %s; closing it",
                ws.remote,
                exc_info=True,
            )
            conn.close(CLOSE_INTERNAL_ERROR, "internal hub error; the hub logged it")
        finally:
            self._connections.discard(conn)
            counted = ws.bytes_in, ws.bytes_out  # from now on in the totals, not the sum
            router.metrics.connection_closed(*counted)
            if self._commits is not None:
                self._commits.forget(conn)
            if conn.close_code == CLOSE_SLOW_CONSUMER:
                router.metrics.slow_consumers += 1
            conn.closing = True  # what the router sends from now on is not sent
            ws.wake()  # senders waiting for this connection's room wait no more
            # The whole close, writes and the peer's answer, within `close_timeout`.
            deadline = trio.current_time() + self.config.close_timeout
            with trio.CancelScope(shield=True, deadline=deadline) as closing:
                # A slow consumer gets only the end of a frame cut mid-write; the rest
                # is owed to its next connection.
                flush = conn.close_code not in (CLOSE_SLOW_CONSUMER, CLOSE_SILENT)
                await ws.close_writes(conn.close_code, conn.close_reason, flush=flush)
            if closing.cancelled_caught:
                ws.closing.lost()
            router.metrics.connection_closed(  # and what the close itself moved
                ws.bytes_in - counted[0], ws.bytes_out - counted[1]
            )
            try:
                router.disconnected(conn, conn.unsent_outcomes())
            except Exception:
                log.exception("internal error forgetting the connection of %s", ws.remote)
            with trio.CancelScope(shield=True, deadline=deadline):
                await ws.finish()

    async def _write_loop(self, conn: _Connection) -> None:
        try:
            await conn.ws.write_loop()
        except Stalled:
            conn.close(
                CLOSE_SLOW_CONSUMER,
                f"slow consumer: read nothing for {self.config.send_timeout:g}s",
            )
        else:  # the stream broke: nothing more can be written to it
            conn.close(CLOSE_LOST, "connection lost")

    async def _open(self, stream: trio.abc.Stream) -> tuple[ServerWebSocket | None, bool, int]:
        """The opening handshake: the token check, then the 101 answer (or a 401); the
        connection, whether it is an admin's, and the protocol version it speaks.

        A fault boundary: an unexpected error is logged with its traceback (rate-limited),
        answered with a 400 if no answer went out yet, and (None, False, 1) returned, as
        for any refused handshake; the caller closes the stream. Cancellation (the
        handshake timeout) goes through: the caller closes the stream without an answer.
        """
        handshake: Handshake | None = None
        answered = False
        try:
            handshake = await Handshake.read(stream)
            if handshake is None:
                return None, False, 1
            admin = False
            if self.config.authenticated:
                token = _presented_token(handshake)
                admin = _one_of(token, self.config.admin_tokens)
                if not admin and not _one_of(token, self.config.tokens):
                    self._quiet.log(
                        "refused handshake",
                        logging.INFO,
                        "refused %s: missing or wrong token",
                        remote_address(stream),
                    )
                    answered = True
                    await handshake.reject(
                        401,
                        b"agentmesh: missing or wrong token\n",
                        [(b"WWW-Authenticate", b'Bearer realm="agentmesh"')],
                    )
                    return None, False, 1
            answered = True
            ws = await handshake.accept(
                max_message_size=self.config.max_frame_size,
                outbox_frames=self.config.outbox_size,
                outbox_bytes=self.config.outbox_bytes,
                send_timeout=self.config.send_timeout,
                flusher=self._flusher,
            )
        except ConnectionClosed:
            return None, False, 1
        except Exception:
            self._quiet.log(
                "handshake error",
                logging.ERROR,
                "unexpected error in the opening handshake of %s; closing it",
                remote_address(stream),
                exc_info=True,
            )
            if handshake is not None and not answered:
                await handshake.reject(400, b"agentmesh: bad request; the hub logged it\n")
            return None, False, 1
        return ws, admin, _requested_protocol(handshake)

    async def _read_loop(self, conn: _Connection, router: Router) -> None:
        """Feed messages to the router until the peer closes or sends no message for
        longer than the silence limit (by at most a tenth of it, or 1 s): pings and parts
        of a message do not count.

        Before each message, the connection waits while its own outbox is more than half
        full (a client that pipelines requests gets every reply; one that stops reading
        is cut by its write loop), and while a connection its messages crowded is.

        A plain TCP socket is read by the hub's `Poller` (this task stays parked while
        its messages are routed there, and wakes only to wait); others here."""
        limit = self.config.silence_limit
        ws, flusher, poller = conn.ws, self._flusher, self._poller
        with trio.CancelScope() as liveness:
            reading = _Reading(conn, router, self._turn, self._cluster, liveness, limit)
            while True:
                # Bytes read with the handshake go through `receive`; after them, the
                # poller's callback reads (`pollable`).
                fd = None if poller is None else ws.pollable
                if reading.pending:  # what was left when it had to wait
                    flusher.hold()
                    try:
                        wait = reading.route_pending()
                    finally:
                        flusher.release(now=True)
                elif ws.ended:  # a close came with the last messages: nothing will follow
                    return
                elif fd is not None:
                    assert poller is not None
                    wait = await poller.read(fd, reading.readable)
                else:
                    try:
                        messages = await ws.receive()
                    except ConnectionClosed:
                        return
                    if not messages:
                        continue
                    reading.alive()
                    flusher.hold()
                    try:
                        wait = reading.route(messages)
                    finally:
                        flusher.release(now=len(messages) == 1)
                if wait is _ROOM:
                    liveness.deadline = math.inf  # it is our turn to wait
                    await self._wait_for_room(conn, router)
                    reading.alive(now=True)
                elif wait is _TAKE_OVER:
                    assert self._cluster is not None
                    await self._take_over(self._cluster, reading)
                elif wait is _STOP:
                    return
        if liveness.cancelled_caught:
            conn.close(CLOSE_SILENT, f"no message for {limit:g}s (missed heartbeats)")

    async def _take_over(self, cluster: Cluster, reading: _Reading) -> None:
        """Route the `register` that resumes an agent held elsewhere (`reading.taken`):
        first its row from the agents bucket if this hub does not know the agent yet (its
        directory watch a little behind), then, if the resume takes the agent over, the
        tasks it asked for from the tasks bucket."""
        assert reading.taken is not None
        (agent_id, token, message), reading.taken = reading.taken, None
        router = reading.router
        if router.unknown(agent_id):
            await cluster.look_up(agent_id)
        taking = router.takes_over(agent_id, token)
        if taking:
            await self._prefetch(cluster, router, agent_id)
        self._flusher.hold()
        self._turn.sender = reading.conn
        try:
            router.receive(reading.conn, message)
            if taking:
                router.prefetched(agent_id)
        finally:
            self._turn.sender = None
            self._flusher.release(now=True)

    @staticmethod
    async def _prefetch(cluster: Cluster, router: Router, agent_id: str) -> None:
        """Read the tasks `agent_id` asked for from the tasks bucket, for the router to
        adopt if its `register` takes it over (up to `READ_TIMEOUT`; unread, the
        take-over is refused with `store_unavailable`). Cancellation reads nothing."""
        rows = await cluster.read_tasks(agent_id)
        if rows is None:
            log.warning("could not read the tasks of agent %s: its take-over waits", agent_id)
        router.prefetch(agent_id, rows)

    @staticmethod
    async def _wait_for_room(conn: _Connection, router: Router) -> None:
        """Until `conn` has room and its catch-up is sent, and every connection it crowded
        has room or is closing, or `_CROWD_WAIT` has passed: a connection that stays
        crowded that long is not keeping up, and the next frame it has no room for cuts
        it, rather than keep the sender (and every other connection it serves) waiting."""
        with trio.move_on_after(_CROWD_WAIT):
            while conn.crowded:
                crowded = next(iter(conn.crowded))
                await crowded.wait_room()
                conn.crowded.discard(crowded)
        conn.crowded.clear()
        await conn.wait_room()
        while router.catching_up(conn) and not conn.closing:
            await conn.ws.room_changed()

    # ---------------------------------------------------------------------------------
    # Monitoring (see `serve_monitor`)

    def ready(self) -> bool:
        """Whether the hub accepts connections: serving, not starting or shutting down."""
        return self._ready

    def metrics(self) -> bytes:
        """The Prometheus text exposition of the hub's metrics (docs/observability.md).
        Costs O(connections + capabilities), not O(tasks)."""
        router = self._router
        if router is None:
            return b""
        summary = router.summary()
        return router.metrics.render(
            MetricsSnapshot(
                connections=len(self._connections),
                agents_online=summary.online,
                agents_resuming=summary.agents - summary.online,
                tasks=summary.tasks,
                counters=summary.counters,
                queued_bytes=sum(conn.ws.outbox.bytes for conn in self._connections),
                bytes_in=sum(conn.ws.bytes_in for conn in self._connections),
                bytes_out=sum(conn.ws.bytes_out for conn in self._connections),
                durable=self.store.durable,
                store_up=router.store_error is None,
            )
        )

    def authorized(self, authorization: str | None) -> bool:
        """Whether an HTTP `Authorization` header may read the metrics: always on an open
        hub, else only with an admin token (`Bearer <token>`)."""
        if not self.config.authenticated:
            return True
        return _one_of(_bearer(authorization or ""), self.config.admin_tokens)

    def dashboard(self) -> dict[str, Any]:
        """What the dashboard shows, JSON-ready: the hub, the first 1,000 agents (in
        registration order, with `in_flight`: tasks assigned and unfinished), the 500
        newest tasks (their data left out), and `stats()`. O(agents and tasks shown)."""
        router = self._router
        if router is None:
            return {"hub": self._hub_view(), "agents": [], "tasks": [], "stats": self.stats()}
        agents = []
        for agent in islice(router.registry, _DASHBOARD_AGENTS):
            view = agent_view(agent)
            view["in_flight"] = agent.in_flight
            view["hidden"] = agent.hidden
            agents.append(view)
        found, _ = router.tasks.page(limit=_DASHBOARD_TASKS)
        return {
            "hub": self._hub_view(),
            "agents": agents,
            "tasks": [task_view(record) for _, record in found],
            "stats": self.stats(),
        }

    def _hub_view(self) -> dict[str, Any]:
        router = self._router
        return {
            "version": __version__,
            "uptime": router.summary().uptime if router is not None else 0.0,
            "connections": len(self._connections),
            "durable": self.store.durable,
            "authenticated": self.config.authenticated,
        }

    def task(self, task_id: str) -> dict[str, Any] | None:
        """One task in full (its params and data too), JSON-ready; None if unknown."""
        record = self._router.tasks.get(task_id) if self._router is not None else None
        return None if record is None else task_view(record, full=True)

    def stats(self) -> dict[str, Any]:
        """The running totals the dashboard's chart takes differences of: tasks delegated
        and finished by state, and the sum and count of their delegation latencies
        (seconds, over every capability). O(capabilities)."""
        router = self._router
        if router is None:
            return {"time": time.time()}
        counters = router.counters
        histograms = router.metrics.delegations.values()
        summary = router.summary()
        return {
            "time": time.time(),
            **{name: counters[name] for name in _TOTALS},
            "latency_sum": sum(h.sum for h in histograms),
            "latency_count": sum(sum(h.counts) for h in histograms),
            "agents": summary.agents,
            "online": summary.online,
            "connections": len(self._connections),
            "tasks": summary.tasks,
        }

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call `listener(event)` for each of the network's events (the payloads of
        `event` frames, docs/protocol.md) until the returned function is called. It runs
        on the event loop inside the router's work: it must be quick, must not block or
        raise, and must not change the dict. Before `serve` has started, nothing is
        sent."""
        router = self._router
        if router is None:
            return lambda: None
        return router.events.subscribe(listener)

    async def serve_monitor(
        self,
        host: str = "127.0.0.1",
        port: int = 8766,
        *,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> NoReturn:
        """Serve the HTTP monitoring port (the dashboard at `/`, `/metrics`, `/healthz`,
        `/readyz`: docs/observability.md) until cancelled; report the bound port to
        `nursery.start` once listening. Start it beside `serve`, in the same nursery.
        Cancellation closes its connections (and the dashboards' event streams)."""
        await serve_monitor(self, host, port, task_status=task_status)

    def drop(self, agent_id: str, reason: str = "dropped by the hub") -> bool:
        """Cut `agent_id`'s connection (close code 4004); the agent may resume.

        Returns False if it has no open connection.
        """
        peer = self.router.connection_of(agent_id)
        if peer is None:
            return False
        peer.close(CLOSE_DROPPED, reason)
        return True

    def _wake(self, when: float) -> None:
        if self._timer_scope is not None and when < self._timer_scope.deadline:
            self._timer_scope.deadline = when

    async def _run_timers(self) -> None:
        router = self.router
        while True:
            with trio.CancelScope(deadline=router.next_deadline()) as self._timer_scope:
                await trio.sleep_forever()
            router.fire_timers()

    async def _run_cleanup(self) -> None:
        """Every `cleanup_interval`, drop the tasks past retention: a busy hub may have
        hundreds of thousands, so a few at a time, letting the routing go on between."""
        while True:
            await trio.sleep(self.config.cleanup_interval)
            dropped = 0
            while count := self.router.cleanup(limit=_CLEANUP_BITE):
                dropped += count
                await trio.lowlevel.checkpoint()
            if dropped:
                log.debug("dropped %d finished tasks past retention", dropped)


async def _close_listeners(listeners: list[trio.abc.Listener[trio.abc.Stream]] | None) -> None:
    """Close the listeners of a start that failed (shielded: it is quick)."""
    with trio.CancelScope(shield=True):
        for listener in listeners or ():
            await trio.aclose_forcefully(listener)


def _resumed_elsewhere(router: Router, message: str | bytes) -> tuple[str, str] | None:
    """The agent ID and token, if `message` is a `register` that would take over an
    agent that another hub holds (see `Router.takes_over`), or that resumes an agent
    this hub does not know (`Router.unknown`: its row may be on its way)."""
    try:
        frame = orjson.loads(message)
        resume = frame["payload"]["resume"]
        agent_id = resume["agent_id"] if frame["type"] == "register" else None
        token = resume["token"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None  # the router words the error, if it is one
    if type(agent_id) is not str or type(token) is not str:
        return None
    if router.takes_over(agent_id, token) or router.unknown(agent_id):
        return agent_id, token
    return None


def _bound_port(listener: trio.abc.Listener[trio.abc.Stream]) -> int:
    if isinstance(listener, trio.SSLListener):
        listener = listener.transport_listener
    assert isinstance(listener, trio.SocketListener)
    port: int = listener.socket.getsockname()[1]
    return port


def _bearer(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value, if it is one."""
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _presented_token(request: Handshake) -> str | None:
    """The bearer token of a handshake: the Authorization header, else a `token` query
    parameter (for browsers, which cannot set headers on a WebSocket). A target that
    is not a valid URL carries no token."""
    for name, value in request.headers:
        if name.lower() == b"authorization":
            token = _bearer(value.decode("latin-1"))
            if token is not None:
                return token
    try:
        query = urlsplit(request.target).query
    except ValueError:  # "//[": an IPv6 authority that does not end
        return None
    tokens = parse_qs(query).get("token")
    return tokens[0] if tokens else None


def _requested_protocol(request: Handshake) -> int:
    """The protocol version a handshake asks for (`?protocol=N`), at most the hub's; 1 if
    it asks for none, or for something that is not a version."""
    try:
        asked = parse_qs(urlsplit(request.target).query).get("protocol", ["1"])[0]
    except ValueError:
        return 1
    if not (asked.isascii() and asked.isdigit()) or len(asked) > 4:
        return 1
    return max(1, min(int(asked), p.PROTOCOL_VERSION))


def _one_of(token: str | None, accepted: frozenset[str]) -> bool:
    """Whether `token` is one of `accepted`, comparing in constant time."""
    if token is None:
        return False
    presented = token.encode("utf-8", "surrogatepass")  # never fails; matches no token
    found = False
    for candidate in accepted:
        found |= hmac.compare_digest(presented, candidate.encode())
    return found


@asynccontextmanager
async def open_hub(
    host: str = "127.0.0.1",
    port: int = 8765,
    *,
    config: HubConfig | None = None,
    store: Store | None = None,
    ssl_context: ssl.SSLContext | None = None,
    tracer_provider: TracerProvider | None = None,
) -> AsyncIterator[Hub]:
    """Run a hub for the duration of the block; `hub.url` says where. `tracer_provider`
    is as for `Hub`.

    Leaving the block (or cancelling it) shuts the hub down gracefully.
    """
    hub = Hub(config, store=store, tracer_provider=tracer_provider)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(hub.serve, host, port, ssl_context=ssl_context))
        try:
            yield hub
        finally:
            nursery.cancel_scope.cancel()
