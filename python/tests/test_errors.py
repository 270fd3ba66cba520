"""Errors: ValueError for bad arguments, the package's exceptions for infrastructure, within the timeouts."""

import socket
import time

import pytest

from agent_connection_manager import AgentConnectionManager, AgentConnectionManagerError, DatabaseError


def test_bad_arguments(isolated):
    with pytest.raises(ValueError):
        AgentConnectionManager("mysql://root@127.0.0.1/x")
    with pytest.raises(ValueError):
        AgentConnectionManager(42)
    with pytest.raises(ValueError):
        AgentConnectionManager(check_interval=0)
    with pytest.raises(ValueError):
        AgentConnectionManager(check_interval="soon")
    manager = AgentConnectionManager(isolated.db_url)
    with pytest.raises(ValueError):
        manager.create_session("")
    with pytest.raises(ValueError):
        manager.create_session("agent", experimental_parameters={"when": object()})
    with pytest.raises(ValueError):
        manager.create_session("agent", experimental_parameters=[1, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        manager.create_session("agent", experimental_parameters={"x": float("inf")})
    with pytest.raises(ValueError):
        manager.create_session("agent", name="bad\x00name")
    with pytest.raises(TypeError):
        manager.create_session(None)  # type: ignore[arg-type]
    assert manager.close_session("") is False


def test_unreachable_database_raises_quickly():
    manager = AgentConnectionManager("postgresql://postgres@127.0.0.1:1/nowhere")
    began = time.monotonic()
    with pytest.raises(DatabaseError):
        manager.get_connection_stats()
    assert time.monotonic() - began < 10
    assert issubclass(DatabaseError, AgentConnectionManagerError)


async def test_silent_database_never_hangs(isolated):
    """A server that accepts TCP connections and never answers: every call ends within the checkout timeout."""
    isolated.configure(database={"checkout_timeout_secs": 1})
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        port = silent.getsockname()[1]
        manager = AgentConnectionManager(f"postgresql://postgres@127.0.0.1:{port}/silent")
        for call in (manager.get_connection_stats, lambda: manager.create_session("agent"), lambda: manager.close_session("s")):
            began = time.monotonic()
            with pytest.raises(DatabaseError):
                call()
            assert time.monotonic() - began < 6
        began = time.monotonic()
        with pytest.raises(DatabaseError):
            await manager.start()
        assert time.monotonic() - began < 6
        assert not manager.running
