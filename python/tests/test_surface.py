"""The Python surface a FastAPI team expects: errors with codes and two bases, idempotent requests by
``message_id``, explicit binding, and ``next`` telling "nothing yet" from "closed"."""

import pytest

from agent_connection_manager import (
    AgentConnectionManager,
    AgentConnectionManagerError,
    Client,
    CommandRefusedError,
    InvalidArgumentError,
    SubscriptionClosedError,
)
from conftest import wait_ready


def test_bad_arguments_are_value_errors_and_package_errors(isolated):
    manager = AgentConnectionManager(isolated.db_url)
    with pytest.raises(InvalidArgumentError) as raised:
        manager.create_session("")
    assert isinstance(raised.value, ValueError)
    assert isinstance(raised.value, AgentConnectionManagerError)
    with pytest.raises(ValueError):
        AgentConnectionManager(check_interval=0)
    with pytest.raises(AgentConnectionManagerError):
        Client("http://not-amqp", "p")


def test_command_refused_error_carries_its_code_and_reply():
    # The engine raises it with (message, code); the reply is what the worker would have answered.
    error = CommandRefusedError("not_found: no session s-1", "not_found")
    assert str(error) == "not_found: no session s-1"
    assert error.code == "not_found"
    assert error.reply == {"ok": False, "error": {"code": "not_found", "message": "not_found: no session s-1"}}
    assert isinstance(error, AgentConnectionManagerError)


async def test_a_retried_request_with_its_message_id_is_applied_once(isolated):
    manager = AgentConnectionManager()
    await manager.start()
    try:
        await wait_ready(manager)
        async with Client(isolated.amqp_url, isolated.prefix) as client:
            body = {"type": "session.create", "agent_id": "agent-retry"}
            first = await client.request(body, timeout=20, message_id="create-agent-retry-1")
            again = await client.request(body, timeout=20, message_id="create-agent-retry-1")
            other = await client.request(body, timeout=20, message_id="create-agent-retry-2")
            assert first["ok"] and again["ok"] and other["ok"], (first, again, other)
            assert again["result"]["session_id"] == first["result"]["session_id"]
            assert other["result"]["session_id"] != first["result"]["session_id"]
            await client.send(body, message_id="create-agent-retry-1")
            stats = await client.request({"type": "stats.get"}, timeout=20)
            assert stats["result"]["active_sessions"] == 2, stats
            with pytest.raises(InvalidArgumentError):
                await client.request(body, message_id="")
    finally:
        await manager.stop()


async def test_next_tells_nothing_yet_from_closed(isolated):
    manager = AgentConnectionManager()
    await manager.start()
    try:
        await wait_ready(manager)
        client = Client(isolated.amqp_url, isolated.prefix)
        subscription = client.subscribe(["agent.session.created"])
        await subscription.bind()
        assert await subscription.next(timeout=0.2) is None  # nothing yet
        manager.create_session("agent-next")
        event = await subscription.next(timeout=20)
        assert event is not None and event["agent_id"] == "agent-next", event
        await client.close()
        with pytest.raises(SubscriptionClosedError):
            await subscription.next(timeout=20)
    finally:
        await manager.stop()
