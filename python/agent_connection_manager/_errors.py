"""The package's exceptions. The engine raises these very classes (it imports them from here), so they are
defined once, in Python, where a class may have two bases and attributes of its own."""

from typing import Any, Dict, Optional


class AgentConnectionManagerError(Exception):
    """Base class of the package's errors."""


class DatabaseError(AgentConnectionManagerError):
    """PostgreSQL failed, refused or did not answer in time."""


class BrokerError(AgentConnectionManagerError):
    """RabbitMQ refused, lost or did not accept a connection, channel or publish."""


class RequestTimeoutError(AgentConnectionManagerError):
    """No reply came within the request's timeout."""


class ConfigurationError(AgentConnectionManagerError):
    """The layered configuration (ACM_* variables, ACM_CONFIG, config/default.toml) is unusable."""


class InvalidArgumentError(AgentConnectionManagerError, ValueError):
    """An argument the engine cannot use: both a ``ValueError`` and one of the package's errors."""


class SubscriptionClosedError(AgentConnectionManagerError):
    """The subscription ended (its client was closed or lost its broker connection): no event will come."""


class CommandRefusedError(AgentConnectionManagerError):
    """The engine understood the call but refused it.

    ``code`` is the reply's error code (``not_found``, ``conflict``, ``forbidden``, ``limit``) and ``reply`` the
    reply itself, ``{"ok": False, "error": {"code": ..., "message": ...}}``.
    """

    code: str
    reply: Dict[str, Any]

    def __init__(self, message: str, code: str = "", reply: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(message)
        self.code = code
        self.reply = reply if reply is not None else {"ok": False, "error": {"code": code, "message": message}}
