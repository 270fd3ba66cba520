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


def test_log_retention_days_is_accepted_as_the_original_takes_it(isolated):
    manager = AgentConnectionManager(None, 30, log_retention_days=3)
    assert manager.log_retention_days == 3
    assert AgentConnectionManager().log_retention_days == 7
    with pytest.raises(InvalidArgumentError):
        AgentConnectionManager(log_retention_days=0)


async def test_the_client_posts_and_tails_log_lines(isolated):
    """``Client.log`` posts an agent's lines, ``Client.get_logs`` reads them (oldest first, then after a cursor);
    bad arguments raise before anything is sent, and a refusal raises with its code."""
    import asyncio

    manager = AgentConnectionManager()
    await manager.start()
    try:
        await wait_ready(manager)
        session_id = manager.create_session("agent-client-logs")
        async with Client(isolated.amqp_url, isolated.prefix) as client:
            lines = [
                {"timestamp": "2026-12-03T11:00:0%dZ" % i, "level": level, "logger_name": "agent", "message": f"m{i}"}
                for i, level in enumerate(["DEBUG", "INFO", "ERROR"])
            ]
            await client.log("agent-client-logs", session_id, lines)
            got = []
            for _ in range(200):
                got = await client.get_logs(session_id=session_id, timeout=10.0)
                if len(got) == 3:
                    break
                await asyncio.sleep(0.1)
            assert [line["message"] for line in got] == ["m0", "m1", "m2"], got
            assert all(line["agent_id"] == "agent-client-logs" for line in got)
            after = await client.get_logs(agent_id="agent-client-logs", since_id=got[0]["id"])
            assert [line["id"] for line in after] == [got[1]["id"], got[2]["id"]]
            errors = await client.get_logs(session_id=session_id, min_level="ERROR")
            assert [line["message"] for line in errors] == ["m2"]
            with pytest.raises(InvalidArgumentError):
                await client.get_logs()
            with pytest.raises(InvalidArgumentError):
                await client.log("agent-client-logs", session_id, ["not a dict"])
            with pytest.raises(InvalidArgumentError):
                await client.get_logs(session_id=session_id, limit=1_000_000)
    finally:
        await manager.stop()


async def test_get_logs_tails_an_agents_lines(isolated):
    from conftest import eventually

    manager = AgentConnectionManager()
    await manager.start()
    try:
        await wait_ready(manager)
        session_id = manager.create_session("agent-logs")
        async with Client(isolated.amqp_url, isolated.prefix) as client:
            lines = [
                {"timestamp": "2026-12-03T10:00:0%dZ" % i, "level": "INFO", "logger_name": "agent", "message": f"line {i}"}
                for i in range(3)
            ]
            await client.send({"type": "agent.log", "agent_id": "agent-logs", "session_id": session_id, "logs": lines})
            got = eventually("three stored lines", lambda: (manager.get_logs(session_id=session_id) or None) and (
                len(manager.get_logs(session_id=session_id)) == 3 and manager.get_logs(session_id=session_id)))
            assert [line["message"] for line in got] == ["line 0", "line 1", "line 2"]
            newer = await manager.aget_logs(agent_id="agent-logs", since_id=got[0]["id"])
            assert [line["id"] for line in newer] == [got[1]["id"], got[2]["id"]]
    finally:
        await manager.stop()


async def test_the_client_sends_opentelemetrys_current_context(isolated):
    """With a current OpenTelemetry span, a command carries its ``traceparent``; the worker continues that trace, so
    the event the command causes carries the caller's trace id."""
    import json

    import pika
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from conftest import eventually

    trace_id = 0x4BF92F3577B34DA6A3CE929D0E0E4736
    span = NonRecordingSpan(
        SpanContext(trace_id=trace_id, span_id=0x00F067AA0BA902B7, is_remote=False, trace_flags=TraceFlags(1))
    )
    manager = AgentConnectionManager()
    await manager.start()
    connection = pika.BlockingConnection(pika.URLParameters(isolated.amqp_url))
    try:
        await wait_ready(manager)
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, f"{isolated.prefix}.events", "agent.session.created")
        async with Client(isolated.amqp_url, isolated.prefix) as client:
            with trace.use_span(span):
                reply = await client.request({"type": "session.create", "agent_id": "agent-traced"}, timeout=20.0)
            assert reply["ok"], reply
            untraced = await client.request({"type": "session.create", "agent_id": "agent-untraced"}, timeout=20.0)
            assert untraced["ok"], untraced

        def traceparents():
            got = {}
            while True:
                method, properties, body = channel.basic_get(queue, auto_ack=True)
                if method is None:
                    return got
                got[json.loads(body)["agent_id"]] = (properties.headers or {}).get("traceparent")

        seen = {}
        eventually("both events", lambda: seen.update(traceparents()) or (len(seen) == 2 and seen))
        assert seen["agent-traced"].split("-")[1] == "%032x" % trace_id, seen
        assert seen["agent-untraced"].split("-")[1] != "%032x" % trace_id, seen
    finally:
        connection.close()
        await manager.stop()
