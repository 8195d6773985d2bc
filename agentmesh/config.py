"""Hub settings, one frozen record with the defaults a standalone hub uses."""

from __future__ import annotations

import re
from typing import Any

import attrs

_HUB_NAME = re.compile(r"[A-Za-z0-9_-]+")

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
    outbox_size: frames queued to one connection at most.
    outbox_bytes: bytes queued to one connection at most, counting what it sent and the
        hub has not yet read whole (a partial inbound message). A peer whose outbox fills
        with frames it was sent unasked is closed with 4002 (slow consumer); replies to
        its own requests are not: the hub stops reading from it until the outbox drains.
    send_timeout: how long queued frames may wait while the socket takes no byte at all
        before the connection is closed with 4002 (a peer that stopped reading).
    max_retained_tasks / max_retained_bytes: finished tasks kept at most, by count and
        by bytes; past either, the oldest finished (never an outcome not yet delivered)
        is dropped before its `retention` is up.
    max_reply_size: bytes of one `list_tasks` or `discover` reply at most; a longer
        answer is cut short and carries a cursor for the rest.
    max_registrations_per_connection: fresh identities one connection may create.
    max_failed_resumes: resumes with an unknown ID or a wrong token one connection may
        try; past it, its resumes are refused.
    max_agents: registered agents (online or resuming) at most.
    max_tasks_per_requester: unfinished tasks one agent may have delegated at once.
    max_queued: tasks waiting at the hub at most (every capable agent was full), in all.
    max_capabilities: capabilities one agent may register.
    max_params_size: bytes of a delegate's params (as JSON) at most.
    rate_limit: frames per second one connection may send on average (bursts up to
        `rate_burst`); None (the default) turns rate limiting off.
    tokens: accepted bearer tokens; empty means the hub is open (no authentication).
    admin_tokens: tokens that may also read and cancel every task.
    close_timeout: how long a closing handshake may take before the socket is cut.
    handshake_timeout: how long a new connection may take to finish its opening
        handshake (TLS, then HTTP) before it is cut.
    cluster: NATS URLs, comma-separated, of the cluster to join (docs/cluster.md); None
        (the default): a hub on its own, which never imports nats.
    hub_name: this hub's name in its cluster, one NATS subject token of
        `[A-Za-z0-9_-]`; None: `<host>-<port>`, sanitised.
    cluster_replicas: how many copies NATS keeps of the KV buckets the hub creates (the
        servers of a NATS cluster keep one each; 1, the default, for one nats-server).
    cluster_creds, cluster_nkey, cluster_user, cluster_password, cluster_token: how
        the hub signs in to NATS, as nats-server takes it (a credentials file, an NKey
        seed file, a user and password, a token); None: none.
    cluster_tls_ca, cluster_tls_cert, cluster_tls_key: TLS to NATS: the CA file to
        check the server with, and this hub's certificate and key (files) if the
        server asks for one; None: the system's CAs, no client certificate.
    """

    heartbeat_interval: float = attrs.field(
        default=30.0,
        validator=_positive,
        metadata={"help": "seconds between heartbeats, announced to clients"},
    )
    missed_heartbeats: int = attrs.field(
        default=3,
        validator=_positive,
        metadata={"help": "heartbeat intervals of silence after which a connection is closed"},
    )
    default_ttl: float = attrs.field(
        default=300.0,
        validator=_positive,
        metadata={"help": "seconds a task may live when its delegate gives no TTL"},
    )
    max_ttl: float = attrs.field(
        default=86_400.0,
        validator=_positive,
        metadata={"help": "longest TTL a delegate may ask for, in seconds"},
    )
    resume_grace: float = attrs.field(
        default=30.0,
        validator=_positive,
        metadata={
            "help": "seconds a disconnected agent's identity and tasks wait for it to resume"
        },
    )
    retention: float = attrs.field(
        default=300.0,
        validator=_positive,
        metadata={"help": "seconds a finished task stays readable (at least resume_grace)"},
    )
    cleanup_interval: float = attrs.field(
        default=30.0,
        validator=_positive,
        metadata={"help": "seconds between sweeps of finished tasks past retention"},
    )
    max_frame_size: int = attrs.field(
        default=1 << 20,
        validator=_positive,
        metadata={"help": "bytes of payload of one received message at most (larger: close 1009)"},
    )
    outbox_size: int = attrs.field(
        default=1024,
        validator=_positive,
        metadata={"help": "frames queued to one connection at most"},
    )
    outbox_bytes: int = attrs.field(
        default=4 << 20,
        validator=_positive,
        metadata={"help": "bytes queued to one connection at most"},
    )
    send_timeout: float = attrs.field(
        default=30.0,
        validator=_positive,
        metadata={
            "help": "seconds queued frames may wait on a socket that takes no byte (then 4002)"
        },
    )
    max_retained_tasks: int = attrs.field(
        default=200_000,
        validator=_positive,
        metadata={"help": "finished tasks kept at most; past it the oldest goes early"},
    )
    max_retained_bytes: int = attrs.field(
        default=128 << 20,
        validator=_positive,
        metadata={"help": "bytes of finished tasks kept at most; past it the oldest goes early"},
    )
    max_reply_size: int = attrs.field(
        default=1 << 20,
        validator=_positive,
        metadata={
            "help": "bytes of one list_tasks or discover reply at most; a cursor gives the rest"
        },
    )
    max_registrations_per_connection: int = attrs.field(
        default=100,
        validator=_positive,
        metadata={"help": "fresh identities one connection may create"},
    )
    max_failed_resumes: int = attrs.field(
        default=10,
        validator=_positive,
        metadata={"help": "failed resumes (unknown ID or wrong token) one connection may try"},
    )
    max_agents: int = attrs.field(
        default=100_000,
        validator=_positive,
        metadata={"help": "registered agents (online or resuming) at most"},
    )
    max_tasks_per_requester: int = attrs.field(
        default=10_000,
        validator=_positive,
        metadata={"help": "unfinished tasks one agent may have delegated at once"},
    )
    max_queued: int = attrs.field(
        default=100_000,
        validator=_positive,
        metadata={"help": "tasks waiting at the hub for a free agent at most, in all"},
    )
    max_capabilities: int = attrs.field(
        default=256, validator=_positive, metadata={"help": "capabilities one agent may register"}
    )
    max_params_size: int = attrs.field(
        default=256 * 1024,
        validator=_positive,
        metadata={"help": "bytes of a delegate's params (as JSON) at most"},
    )
    rate_limit: float | None = attrs.field(
        default=None,
        metadata={"help": "frames per second one connection may send on average; none: no limit"},
    )
    rate_burst: int = attrs.field(
        default=1_000,
        validator=_positive,
        metadata={"help": "frames a connection may send in a burst above rate_limit"},
    )
    tokens: frozenset[str] = attrs.field(
        default=frozenset(),
        converter=frozenset,
        metadata={"help": "a bearer token to accept (with none, the hub is open to all)"},
    )
    admin_tokens: frozenset[str] = attrs.field(
        default=frozenset(),
        converter=frozenset,
        metadata={"help": "a token that may also read and cancel every task"},
    )
    close_timeout: float = attrs.field(
        default=2.0,
        validator=_positive,
        metadata={"help": "seconds a closing handshake may take before the socket is cut"},
    )
    handshake_timeout: float = attrs.field(
        default=10.0,
        validator=_positive,
        metadata={
            "help": "seconds a new connection may take for its opening handshake (TLS, HTTP)"
        },
    )

    cluster: str | None = attrs.field(
        default=None,
        metadata={"help": "join the cluster behind these NATS URLs, comma-separated"},
    )
    hub_name: str | None = attrs.field(
        default=None,
        metadata={"help": "this hub's name in its cluster ([A-Za-z0-9_-]); none: HOST-PORT"},
    )
    cluster_replicas: int = attrs.field(
        default=1,
        validator=_positive,
        metadata={"help": "copies NATS keeps of the cluster's KV buckets (3 on a 3-node NATS)"},
    )
    cluster_creds: str | None = attrs.field(
        default=None, metadata={"help": "NATS credentials file (JWT and NKey) to join with"}
    )
    cluster_nkey: str | None = attrs.field(
        default=None, metadata={"help": "NATS NKey seed file to join with"}
    )
    cluster_user: str | None = attrs.field(
        default=None, metadata={"help": "NATS user to join as (with --cluster-password)"}
    )
    cluster_password: str | None = attrs.field(
        default=None,
        metadata={"help": "NATS password (better: AGENTMESH_CLUSTER_PASSWORD)"},
    )
    cluster_token: str | None = attrs.field(
        default=None, metadata={"help": "NATS token (better: AGENTMESH_CLUSTER_TOKEN)"}
    )
    cluster_tls_ca: str | None = attrs.field(
        default=None, metadata={"help": "CA file to check NATS's TLS certificate with"}
    )
    cluster_tls_cert: str | None = attrs.field(
        default=None, metadata={"help": "this hub's TLS certificate for NATS (with its key)"}
    )
    cluster_tls_key: str | None = attrs.field(
        default=None, metadata={"help": "this hub's TLS key for NATS"}
    )

    @property
    def authenticated(self) -> bool:
        """Whether clients must present a token."""
        return bool(self.tokens or self.admin_tokens)

    def __attrs_post_init__(self) -> None:
        if self.rate_limit is not None and not self.rate_limit > 0:
            raise ValueError(f"rate_limit must be positive or None, got {self.rate_limit!r}")
        if self.hub_name is not None and not _HUB_NAME.fullmatch(self.hub_name):
            raise ValueError(
                f"hub_name must be letters, digits, '_' and '-' (one NATS subject token), "
                f"not {self.hub_name!r}"
            )
        if self.cluster is not None and not self.cluster.strip(" ,"):
            raise ValueError("cluster must name at least one NATS URL")
        joining = [f for f in attrs.fields(HubConfig) if f.name.startswith("cluster_")]
        given = [f.name for f in joining if getattr(self, f.name) != f.default]
        if given and self.cluster is None:
            raise ValueError(f"{', '.join(given)} without cluster: there is nothing to join")
        if (self.cluster_tls_cert is None) != (self.cluster_tls_key is None):
            raise ValueError("cluster_tls_cert and cluster_tls_key go together")
        if (self.cluster_user is None) != (self.cluster_password is None):
            raise ValueError("cluster_user and cluster_password go together")
        if self.retention < self.resume_grace:
            raise ValueError(
                "retention must be at least resume_grace, or a resuming requester could "
                "find its outcomes already dropped"
            )

    @property
    def silence_limit(self) -> float:
        """Seconds without any frame after which a connection is considered dead."""
        return self.heartbeat_interval * self.missed_heartbeats
