"""Type stubs of the engine's extension module (re-exported by ``agent_connection_manager``)."""

import datetime
import uuid
from types import TracebackType
from typing import Any, AsyncIterator, Dict, Generator, List, Optional, Type, Union, final

__all__ = [
    "AgentConnectionManager",
    "Client",
    "Subscription",
    "get_connection_manager",
    "start_connection_manager",
    "stop_connection_manager",
]

@final
class AgentConnectionManager:
    """Manages agent connections, health monitoring and the instruction lifecycle.

    ``db_engine``: ``None`` (the layered configuration), a PostgreSQL URL (``postgres://``, ``postgresql://``,
    ``postgresql+psycopg2://``, ``postgresql+asyncpg://``, ``postgresql+psycopg://``), or a SQLAlchemy ``Engine``,
    ``AsyncEngine`` or ``URL``. ``check_interval``: seconds between sweeper cycles. Everything else (broker, prefix,
    thresholds, HTTP endpoint) comes from the layered configuration.
    """

    def __new__(
        cls, db_engine: Any = None, check_interval: int = 30, log_retention_days: Optional[int] = None
    ) -> "AgentConnectionManager":
        """``log_retention_days``: days agents' log lines are kept (``logs.retention_days``, default 7)."""
    @property
    def log_retention_days(self) -> int: ...
    def get_logs(
        self,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
        since_id: Optional[int] = None,
        limit: Optional[int] = None,
        min_level: Optional[str] = None,
    ) -> List[Dict[str, Any]]:
        """Agents' log lines, oldest first, each with its increasing ``id`` (poll with ``since_id``)."""
    async def aget_logs(
        self,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
        since_id: Optional[int] = None,
        limit: Optional[int] = None,
        min_level: Optional[str] = None,
    ) -> List[Dict[str, Any]]: ...
    async def start(self) -> None:
        """Create and migrate the database if needed, then run the worker in this process."""
    async def stop(self) -> None:
        """Stop the worker gracefully."""
    @property
    def running(self) -> bool: ...
    @property
    def ready(self) -> bool:
        """Whether the started worker is connected to the broker and consuming (its topology declared)."""
    @property
    def database_url(self) -> str:
        """The database URL in force, password redacted."""
    @property
    def amqp_prefix(self) -> str: ...
    @property
    def check_interval(self) -> int: ...
    def get_connection_stats(self) -> Dict[str, Any]:
        """Counts of active connections and sessions, inactive sessions, pending and sent instructions,
        ``total_instructions_pending`` and ``timestamp`` (a timezone-aware ``datetime``), from one snapshot."""
    async def aget_connection_stats(self) -> Dict[str, Any]: ...
    def create_session(
        self,
        agent_id: str,
        acquisition_uuid: Optional[Union[str, uuid.UUID]] = None,
        name: Optional[str] = None,
        description: Optional[str] = None,
        experimental_parameters: Optional[Dict[str, Any]] = None,
    ) -> str:
        """Create an active session and return its id."""
    async def acreate_session(
        self,
        agent_id: str,
        acquisition_uuid: Optional[Union[str, uuid.UUID]] = None,
        name: Optional[str] = None,
        description: Optional[str] = None,
        experimental_parameters: Optional[Dict[str, Any]] = None,
    ) -> str: ...
    def close_session(self, session_id: str) -> bool:
        """End a session (its connections closed, its open instructions cancelled): True when it is ended, now or
        before; False when there is no such session."""
    async def aclose_session(self, session_id: str) -> bool: ...

def get_connection_manager() -> AgentConnectionManager:
    """The process-wide manager, configured from the layered configuration."""

async def start_connection_manager() -> None:
    """Start the process-wide manager."""

async def stop_connection_manager() -> None:
    """Stop the process-wide manager, if it was made."""

@final
class Subscription:
    """Events (dicts) of a ``Client.subscribe``.

    Its queues are bound by ``await subscription`` (which gives the subscription), ``await subscription.bind()``,
    or else the first ``next``/``async for`` step: only events published after binding are delivered, so bind before
    acting on what you want to hear of.
    """

    def __aiter__(self) -> AsyncIterator[Dict[str, Any]]: ...
    async def __anext__(self) -> Dict[str, Any]: ...
    def __await__(self) -> Generator[Any, None, "Subscription"]: ...
    async def bind(self) -> None:
        """Bind the subscription's queues now."""
    async def next(self, timeout: float) -> Optional[Dict[str, Any]]:
        """The next event; None when none comes within ``timeout`` seconds ("nothing yet"); raises
        ``SubscriptionClosedError`` when the subscription ended ("closed": none will come)."""

@final
class Client:
    """Publishes heartbeats and commands, awaits replies and subscribes to events.

    ``amqp_url`` and ``prefix`` default to the layered configuration's ``amqp.url`` and ``amqp.prefix``. The
    connection is made by ``connect()``, ``async with`` or the first call.
    """

    def __new__(cls, amqp_url: Optional[str] = None, prefix: Optional[str] = None) -> "Client": ...
    @property
    def prefix(self) -> str: ...
    async def connect(self) -> None: ...
    async def heartbeat(
        self, agent_id: str, session_id: str, connection_id: str, client_info: Optional[Any] = None
    ) -> None: ...
    async def request(
        self, body: Dict[str, Any], timeout: float = 30.0, message_id: Optional[str] = None
    ) -> Dict[str, Any]:
        """Send a command and return its reply: ``{"ok": True, "result": ...}`` or
        ``{"ok": False, "error": {"code": ..., "message": ...}}``. ``timeout`` bounds the whole call, connecting
        included. With ``message_id`` a retried request is applied once (the repeat gets the first reply)."""
    async def send(self, body: Dict[str, Any], message_id: Optional[str] = None) -> None:
        """Publish a command without awaiting its reply; ``message_id`` as for ``request``."""
    async def log(self, agent_id: str, session_id: str, entries: List[Dict[str, Any]]) -> None:
        """Publish an agent's log lines (``agent.log``): dicts with ``timestamp``, ``level``, ``logger_name`` and
        ``message``, at most 500."""
    async def get_logs(
        self,
        agent_id: Optional[str] = None,
        session_id: Optional[str] = None,
        since_id: Optional[int] = None,
        limit: Optional[int] = None,
        min_level: Optional[str] = None,
        timeout: float = 30.0,
    ) -> List[Dict[str, Any]]:
        """Agents' log lines with ``logs.get``, oldest first, each with its increasing ``id`` (poll with
        ``since_id``); ``agent_id`` or ``session_id`` is needed."""
    def subscribe(self, patterns: List[str]) -> Subscription: ...
    async def close(self) -> None: ...
    async def __aenter__(self) -> "Client": ...
    async def __aexit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None: ...
