"""What a hub counts for its operator, and its Prometheus exposition. Pure: no trio.

The router tells a `Metrics` what happens (`task_finished`, `error`, `broadcast`), one
call per event at O(1): plain integers and fixed histogram buckets, no locks. A scrape
(`render`) reads them, and the gauges of the moment from a `Snapshot` the hub fills,
through `prometheus_client`'s exposition: its cost does not grow with the number of
tasks, only with the number of distinct capabilities (at most `MAX_CAPABILITIES`
histograms; the rest are counted under `capability="other"`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping

import attrs
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["DELEGATION_BUCKETS", "MAX_CAPABILITIES", "Histogram", "Metrics", "Snapshot"]

# Seconds, from a loopback round trip to a long agent task.
DELEGATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)
COMMIT_BUCKETS = (
    *(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
MAX_CAPABILITIES = 100  # label values of the delegation histogram, at most
_FINISHED = ("completed", "failed", "timeout", "cancelled")


class Histogram:
    """Counts of observations in fixed buckets (upper bounds, in increasing order), and
    their sum."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative `(le, count)` pairs, `+Inf` last, as Prometheus wants them."""
        out, total = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            total += count
            out.append((bound, float(total)))
        return out


class Metrics:
    """The counts of one hub's events (see the module's docstring)."""

    def __init__(self) -> None:
        self.delegations: dict[str, Histogram] = {}  # capability -> delegate in, outcome out
        self.errors: dict[str, int] = {}  # error code -> error frames sent
        self.broadcast_recipients = 0
        self.slow_consumers = 0  # connections closed with 4002
        self.commits = Histogram(COMMIT_BUCKETS)  # seconds per store commit
        self.store_failures = 0
        self.bytes_in = 0  # WebSocket bytes of the connections closed so far
        self.bytes_out = 0

    def task_finished(self, capability: str, seconds: float) -> None:
        """A task ended `seconds` after its delegate came in."""
        histogram = self.delegations.get(capability)
        if histogram is None:
            key = capability if len(self.delegations) < MAX_CAPABILITIES else "other"
            histogram = self.delegations.get(key)
            if histogram is None:
                histogram = self.delegations[key] = Histogram(DELEGATION_BUCKETS)
        # `histogram.observe(seconds)`, inline: once per task, and the call cost as much.
        histogram.counts[bisect_left(histogram.bounds, seconds)] += 1
        histogram.sum += seconds

    def error(self, code: str) -> None:
        self.errors[code] = self.errors.get(code, 0) + 1

    def connection_closed(self, bytes_in: int, bytes_out: int) -> None:
        """A connection ended, having read and written this many bytes."""
        self.bytes_in += bytes_in
        self.bytes_out += bytes_out

    def broadcast(self, recipients: int) -> None:
        self.broadcast_recipients += recipients

    def render(self, snapshot: Snapshot) -> bytes:
        """The Prometheus text exposition (version 0.0.4) of these counts with
        `snapshot`'s gauges."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self, snapshot))
        return generate_latest(registry)


@attrs.frozen(kw_only=True)
class Snapshot:
    """The hub's state at a scrape: gauges, and the router's running counters."""

    connections: int
    agents_online: int
    agents_resuming: int
    tasks: Mapping[str, int]  # state -> tasks held in it now
    counters: Mapping[str, int]  # the router's counters (frames_in, delegated, ...)
    queued_bytes: int  # bytes queued to every connection's outbox
    bytes_in: int = 0  # WebSocket bytes the open connections read, and wrote
    bytes_out: int = 0
    durable: bool
    store_up: bool = True


class _Collector(Collector):
    def __init__(self, metrics: Metrics, snapshot: Snapshot) -> None:
        self.metrics, self.snapshot = metrics, snapshot

    def collect(self) -> Iterator[Metric]:
        m, s = self.metrics, self.snapshot
        yield GaugeMetricFamily("agentmesh_connections", "Open client connections", s.connections)
        agents = GaugeMetricFamily(
            "agentmesh_agents", "Registered agents, by whether they are connected", labels=["state"]
        )
        agents.add_metric(["online"], s.agents_online)
        agents.add_metric(["resuming"], s.agents_resuming)
        yield agents
        tasks = GaugeMetricFamily("agentmesh_tasks", "Tasks held, by state", labels=["state"])
        for state, count in s.tasks.items():
            tasks.add_metric([state], count)
        yield tasks
        yield CounterMetricFamily(
            "agentmesh_tasks_delegated", "Tasks delegated", s.counters.get("delegated", 0)
        )
        finished = CounterMetricFamily(
            "agentmesh_tasks_finished", "Tasks that ended, by how", labels=["state"]
        )
        for state in _FINISHED:
            finished.add_metric([state], s.counters.get(state, 0))
        yield finished
        delegation = HistogramMetricFamily(
            "agentmesh_delegation_seconds",
            "From a delegate's arrival to its task's end, by capability",
            labels=["capability"],
        )
        for capability, histogram in m.delegations.items():
            delegation.add_metric([capability], histogram.buckets(), histogram.sum)
        yield delegation
        frames = CounterMetricFamily(
            "agentmesh_frames", "WebSocket messages, by direction", labels=["direction"]
        )
        frames.add_metric(["in"], s.counters.get("frames_in", 0))
        frames.add_metric(["out"], s.counters.get("frames_out", 0))
        yield frames
        traffic = CounterMetricFamily(
            "agentmesh_bytes",
            "WebSocket bytes (frames and their headers) read and written, by direction",
            labels=["direction"],
        )
        traffic.add_metric(["in"], m.bytes_in + s.bytes_in)
        traffic.add_metric(["out"], m.bytes_out + s.bytes_out)
        yield traffic
        errors = CounterMetricFamily(
            "agentmesh_errors", "Error frames sent, by code", labels=["code"]
        )
        for code, count in sorted(m.errors.items()):
            errors.add_metric([code], count)
        yield errors
        yield CounterMetricFamily(
            "agentmesh_broadcasts", "Broadcasts sent", s.counters.get("broadcasts", 0)
        )
        yield CounterMetricFamily(
            "agentmesh_broadcast_recipients",
            "Frames the broadcasts fanned out to",
            m.broadcast_recipients,
        )
        yield GaugeMetricFamily(
            "agentmesh_queued_bytes", "Bytes queued to the connections' outboxes", s.queued_bytes
        )
        yield CounterMetricFamily(
            "agentmesh_slow_consumer_closes",
            "Connections closed for not reading (4002)",
            m.slow_consumers,
        )
        if s.durable:
            yield GaugeMetricFamily(
                "agentmesh_store_up",
                "1 while the store takes writes, 0 while it fails",
                1 if s.store_up else 0,
            )
            commits = HistogramMetricFamily(
                "agentmesh_store_commit_seconds", "Time a store commit took, retries included"
            )
            commits.add_metric([], m.commits.buckets(), m.commits.sum)
            yield commits
            yield CounterMetricFamily(
                "agentmesh_store_failures", "Store writes that failed", m.store_failures
            )
