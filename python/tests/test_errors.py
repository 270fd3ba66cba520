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


async def test_request_against_a_hung_broker_raises_within_the_callers_timeout():
    """A broker that accepts TCP and never answers: the request fails within the timeout the caller gave (the
    client's own 10 s connect bound does not stretch it), naming the address and never the password."""
    from agent_connection_manager import BrokerError, Client

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    port = hung.getsockname()[1]
    try:
        client = Client(f"amqp://guest:S3CRET@127.0.0.1:{port}/%2f", "acm-hung")
        began = time.monotonic()
        with pytest.raises(BrokerError) as raised:
            await client.request({"type": "stats.get"}, timeout=1.5)
        elapsed = time.monotonic() - began
        assert elapsed < 1.5 + 1.0, f"the request with timeout=1.5 raised only after {elapsed:.1f}s"
        message = str(raised.value)
        assert f"127.0.0.1:{port}" in message, message
        assert "S3CRET" not in message, message
    finally:
        hung.close()
