"""agentmesh: a Trio hub for agent networks."""

from ._version import __version__ as __version__
from .agent import Agent as Agent
from .agent import TaskContext as TaskContext
from .agent import capability as capability
from .client import Backoff as Backoff
from .client import Client as Client
from .client import TaskHandle as TaskHandle
from .client import connect as connect
from .config import HubConfig as HubConfig
from .errors import AgentMeshError as AgentMeshError
from .errors import AlreadyRegistered as AlreadyRegistered
from .errors import ConnectionLost as ConnectionLost
from .errors import Forbidden as Forbidden
from .errors import HubError as HubError
from .errors import HubRestarted as HubRestarted
from .errors import HubUnavailable as HubUnavailable
from .errors import InternalHubError as InternalHubError
from .errors import InvalidMessage as InvalidMessage
from .errors import LimitExceeded as LimitExceeded
from .errors import NoCapableAgent as NoCapableAgent
from .errors import NotRegistered as NotRegistered
from .errors import RateLimited as RateLimited
from .errors import Replaced as Replaced
from .errors import StoreUnavailable as StoreUnavailable
from .errors import TaskCancelled as TaskCancelled
from .errors import TaskError as TaskError
from .errors import TaskFailed as TaskFailed
from .errors import TaskFinished as TaskFinished
from .errors import TaskTimeout as TaskTimeout
from .errors import TooLarge as TooLarge
from .errors import Unauthorized as Unauthorized
from .errors import UnknownAgent as UnknownAgent
from .errors import UnknownTask as UnknownTask
from .errors import UnknownType as UnknownType
from .hub import Hub as Hub
from .hub import open_hub as open_hub
from .lifecycle import TaskState as TaskState
from .protocol import AGENT_EVENT_KINDS as AGENT_EVENT_KINDS
from .protocol import EVENT_KINDS as EVENT_KINDS
from .protocol import AgentInfo as AgentInfo
from .protocol import Broadcast as Broadcast
from .protocol import Envelope as Envelope
from .protocol import ErrorCode as ErrorCode
from .protocol import Event as Event
from .protocol import HubSummary as HubSummary
from .protocol import MessageType as MessageType
from .protocol import Progress as Progress
from .protocol import TaskAssignment as TaskAssignment
from .protocol import TaskInfo as TaskInfo
from .protocol import TaskOutcome as TaskOutcome
from .registry import Capability as Capability
from .sqlite_store import SQLiteStore as SQLiteStore
from .store import MemoryStore as MemoryStore
from .store import Store as Store
from .store import StoreError as StoreError

__all__ = [
    "AGENT_EVENT_KINDS",
    "EVENT_KINDS",
    "Agent",
    "AgentInfo",
    "AgentMeshError",
    "AlreadyRegistered",
    "Backoff",
    "Broadcast",
    "Capability",
    "Client",
    "ConnectionLost",
    "Envelope",
    "ErrorCode",
    "Event",
    "Forbidden",
    "Hub",
    "HubConfig",
    "HubError",
    "HubRestarted",
    "HubSummary",
    "HubUnavailable",
    "InternalHubError",
    "InvalidMessage",
    "LimitExceeded",
    "MemoryStore",
    "MessageType",
    "NoCapableAgent",
    "NotRegistered",
    "Progress",
    "RateLimited",
    "Replaced",
    "SQLiteStore",
    "Store",
    "StoreError",
    "StoreUnavailable",
    "TaskAssignment",
    "TaskCancelled",
    "TaskContext",
    "TaskError",
    "TaskFailed",
    "TaskFinished",
    "TaskHandle",
    "TaskInfo",
    "TaskOutcome",
    "TaskState",
    "TaskTimeout",
    "TooLarge",
    "Unauthorized",
    "UnknownAgent",
    "UnknownTask",
    "UnknownType",
    "__version__",
    "capability",
    "connect",
    "open_hub",
]
