"""Agent connection management, with the Rust engine inside.

The API of the SmartEM backend's ``agent_connection_manager`` (``AgentConnectionManager``,
``get_connection_manager``, ``start_connection_manager``, ``stop_connection_manager``), plus awaitable twins of the
synchronous methods, a ``Client`` for agents and the backend, and an exception hierarchy.
"""

from ._errors import (
    AgentConnectionManagerError,
    BrokerError,
    CommandRefusedError,
    ConfigurationError,
    DatabaseError,
    InvalidArgumentError,
    RequestTimeoutError,
    SubscriptionClosedError,
)
from ._native import (
    AgentConnectionManager,
    Client,
    Subscription,
    get_connection_manager,
    start_connection_manager,
    stop_connection_manager,
)

__all__ = [
    "AgentConnectionManager",
    "AgentConnectionManagerError",
    "BrokerError",
    "Client",
    "CommandRefusedError",
    "ConfigurationError",
    "DatabaseError",
    "InvalidArgumentError",
    "RequestTimeoutError",
    "Subscription",
    "SubscriptionClosedError",
    "get_connection_manager",
    "start_connection_manager",
    "stop_connection_manager",
]
