"""Hub settings, one frozen record with the defaults a standalone hub uses."""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["HubConfig"]


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if not value > 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


@attrs.frozen(kw_only=True)
class HubConfig:
    """How a hub behaves. Every time is in seconds.

    heartbeat_interval: announced to clients; a connection silent for
        `missed_heartbeats` intervals is closed (any frame counts as liveness).
    default_ttl / max_ttl: a task's time to live when the delegate gives none / at most.
    resume_grace: how long a disconnected agent's identity and tasks wait for it to resume.
    retention: how long a finished task stays readable with `status`.
    cleanup_interval: how often finished tasks past retention are dropped.
    max_frame_size: bytes of payload of one received message at most; a larger one
        closes the connection with 1009.
    outbox_size: frames queued to one connection; a peer that lets it fill is dropped.
    max_agents: registered agents (online or resuming) at most.
    max_tasks_per_requester: unfinished tasks one agent may have delegated at once.
    max_capabilities: capabilities one agent may register.
    max_params_size: bytes of a delegate's params (as JSON) at most.
    rate_limit: frames per second one connection may send on average (bursts up to
        `rate_burst`); None (the default) turns rate limiting off.
    tokens: accepted bearer tokens; empty means the hub is open (no authentication).
    admin_tokens: tokens that may also read and cancel every task.
    close_timeout: how long a closing handshake may take before the socket is cut.
    handshake_timeout: how long a new connection may take to finish its opening
        handshake (TLS, then HTTP) before it is cut.
    """

    heartbeat_interval: float = attrs.field(default=30.0, validator=_positive)
    missed_heartbeats: int = attrs.field(default=3, validator=_positive)
    default_ttl: float = attrs.field(default=300.0, validator=_positive)
    max_ttl: float = attrs.field(default=86_400.0, validator=_positive)
    resume_grace: float = attrs.field(default=30.0, validator=_positive)
    retention: float = attrs.field(default=300.0, validator=_positive)
    cleanup_interval: float = attrs.field(default=30.0, validator=_positive)
    max_frame_size: int = attrs.field(default=1 << 20, validator=_positive)
    outbox_size: int = attrs.field(default=1024, validator=_positive)
    max_agents: int = attrs.field(default=100_000, validator=_positive)
    max_tasks_per_requester: int = attrs.field(default=10_000, validator=_positive)
    max_capabilities: int = attrs.field(default=256, validator=_positive)
    max_params_size: int = attrs.field(default=256 * 1024, validator=_positive)
    rate_limit: float | None = attrs.field(default=None)
    rate_burst: int = attrs.field(default=1_000, validator=_positive)
    tokens: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    admin_tokens: frozenset[str] = attrs.field(default=frozenset(), converter=frozenset)
    close_timeout: float = attrs.field(default=2.0, validator=_positive)
    handshake_timeout: float = attrs.field(default=10.0, validator=_positive)

    @property
    def authenticated(self) -> bool:
        """Whether clients must present a token."""
        return bool(self.tokens or self.admin_tokens)

    def __attrs_post_init__(self) -> None:
        if self.rate_limit is not None and not self.rate_limit > 0:
            raise ValueError(f"rate_limit must be positive or None, got {self.rate_limit!r}")
        if self.retention < self.resume_grace:
            raise ValueError(
                "retention must be at least resume_grace, or a resuming requester could "
                "find its outcomes already dropped"
            )

    @property
    def silence_limit(self) -> float:
        """Seconds without any frame after which a connection is considered dead."""
        return self.heartbeat_interval * self.missed_heartbeats
