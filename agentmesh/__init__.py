"""agentmesh: a Trio hub for agent networks."""

from ._version import __version__ as __version__
from .config import HubConfig as HubConfig
from .hub import Hub as Hub
from .hub import open_hub as open_hub
from .lifecycle import TaskState as TaskState
from .protocol import ErrorCode as ErrorCode
from .protocol import MessageType as MessageType
from .registry import Capability as Capability

__all__ = [
    "Capability",
    "ErrorCode",
    "Hub",
    "HubConfig",
    "MessageType",
    "TaskState",
    "__version__",
    "open_hub",
]
