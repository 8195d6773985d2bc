"""Typed exceptions of the Python SDK. Every error frame from the hub becomes one of these."""

from __future__ import annotations

from typing import Any

from .protocol import ErrorCode

__all__ = [
    "AgentMeshError",
    "AlreadyRegistered",
    "ConnectionLost",
    "Forbidden",
    "HubError",
    "HubRestarted",
    "HubUnavailable",
    "InternalHubError",
    "InvalidMessage",
    "LimitExceeded",
    "NoCapableAgent",
    "NotRegistered",
    "RateLimited",
    "Replaced",
    "StoreUnavailable",
    "TaskCancelled",
    "TaskError",
    "TaskFailed",
    "TaskFinished",
    "TaskTimeout",
    "TooLarge",
    "Unauthorized",
    "UnknownAgent",
    "UnknownTask",
    "UnknownType",
    "hub_error",
]


class AgentMeshError(Exception):
    """Base of every agentmesh SDK error. `code` is the protocol's error code, if any."""

    code: str | None = None


# --- the hub refused a request --------------------------------------------------------


class HubError(AgentMeshError):
    """The hub answered a request with an `error` frame."""

    def __init__(self, message: str, *, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class InvalidMessage(HubError):
    code = ErrorCode.INVALID_MESSAGE.value


class UnknownType(HubError):
    code = ErrorCode.UNKNOWN_TYPE.value


class NotRegistered(HubError):
    code = ErrorCode.NOT_REGISTERED.value


class AlreadyRegistered(HubError):
    code = ErrorCode.ALREADY_REGISTERED.value


class UnknownAgent(HubError):
    code = ErrorCode.UNKNOWN_AGENT.value


class UnknownTask(HubError):
    code = ErrorCode.UNKNOWN_TASK.value


class NoCapableAgent(HubError):
    code = ErrorCode.NO_CAPABLE_AGENT.value


class Forbidden(HubError):
    code = ErrorCode.FORBIDDEN.value


class TaskFinished(HubError):
    code = ErrorCode.TASK_FINISHED.value


class TooLarge(HubError):
    code = ErrorCode.TOO_LARGE.value


class LimitExceeded(HubError):
    code = ErrorCode.LIMIT_EXCEEDED.value


class RateLimited(HubError):
    code = ErrorCode.RATE_LIMITED.value


class InternalHubError(HubError):
    code = ErrorCode.INTERNAL.value


class StoreUnavailable(HubError):
    """The hub's disk is full or failing: it takes no new work until it heals. Retry."""

    code = ErrorCode.STORE_UNAVAILABLE.value


_BY_CODE: dict[str, type[HubError]] = {
    cls.code: cls
    for cls in (
        InvalidMessage,
        UnknownType,
        NotRegistered,
        AlreadyRegistered,
        UnknownAgent,
        UnknownTask,
        NoCapableAgent,
        Forbidden,
        TaskFinished,
        TooLarge,
        LimitExceeded,
        RateLimited,
        InternalHubError,
        StoreUnavailable,
    )
    if cls.code is not None
}


def hub_error(code: str, message: str, details: dict[str, Any] | None = None) -> HubError:
    """The exception for an error frame; an unknown code gives a plain `HubError`."""
    cls = _BY_CODE.get(code)
    if cls is None:
        error = HubError(f"[{code}] {message}", details=details)
        error.code = code
        return error
    return cls(message, details=details)


# --- a task did not complete ----------------------------------------------------------


class TaskError(AgentMeshError):
    """A delegated task ended without success. `task_id` names it."""

    def __init__(self, task_id: str, message: str) -> None:
        super().__init__(message)
        self.task_id = task_id


class TaskFailed(TaskError):
    """The agent reported failure (or left for good); `error` is its message."""

    code = "failed"

    def __init__(self, task_id: str, error: str | None) -> None:
        super().__init__(task_id, error or "the task failed")
        self.error = error


class TaskTimeout(TaskError):
    code = "timeout"


class TaskCancelled(TaskError):
    code = "cancelled"


# --- the connection -------------------------------------------------------------------


class ConnectionLost(AgentMeshError):
    """The connection dropped before the hub answered this request; it may or may not
    have been carried out. The client reconnects on its own."""


class HubRestarted(TaskError):
    """The hub restarted and no longer knows this task; its outcome will never come."""

    code = "hub_restarted"


class HubUnavailable(AgentMeshError):
    """The hub could not be reached within the configured number of attempts."""


class Replaced(AgentMeshError):
    """Another connection resumed this agent (close code 4003), on this hub or another
    of its cluster. Not retried: two clients resuming one identity would keep replacing
    each other."""

    code = "replaced"


class Unauthorized(AgentMeshError):
    """The hub refused the connection's token (HTTP 401 at the handshake). Not retried."""

    code = "unauthorized"
