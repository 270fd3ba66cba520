"""Client: heartbeats, requests, sends and subscriptions against a started manager; the sweeper seen through events."""

import asyncio
import time

import pytest

from agent_connection_manager import (
    AgentConnectionManager,
    AgentConnectionManagerError,
    BrokerError,
    Client,
    RequestTimeoutError,
)
from conftest import wait_ready


async def next_event(subscription, what, match, timeout=20.0):
    """The first event for which ``match`` holds, within ``timeout`` seconds (other events are skipped)."""
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; events seen: {seen}")
        event = await subscription.next(timeout=remaining)
        if event is not None:
            if match(event):
                return event
            seen.append(event.get("event_type"))


async def test_heartbeat_opens_a_connection_the_sweeper_closes_as_stale(isolated):
    isolated.configure(sweeper={"connection_stale_after_secs": 2})
    manager = AgentConnectionManager(check_interval=1)
    await manager.start()
    try:
        await wait_ready(manager)
        session_id = manager.create_session("agent-hb")
        async with Client(isolated.amqp_url, isolated.prefix) as client:
            events = await client.subscribe(["agent.connection.#"])
            await client.heartbeat("agent-hb", session_id, "conn-1", client_info={"host": "scope-1"})
            opened = await next_event(
                events,
                "agent.connection.opened for conn-1",
                lambda e: e["event_type"] == "agent.connection.opened" and e["connection_id"] == "conn-1",
            )
            assert opened["session_id"] == session_id and opened["agent_id"] == "agent-hb"
            stale = await next_event(
                events,
                "agent.connection.stale for conn-1",
                lambda e: e["event_type"] == "agent.connection.stale" and e["connection_id"] == "conn-1",
                timeout=30.0,
            )
            assert stale["session_id"] == session_id
        assert manager.get_connection_stats()["active_connections"] == 0
    finally:
        await manager.stop()


async def test_request_send_and_subscribe_iteration(isolated):
    manager = AgentConnectionManager()
    await manager.start()
    try:
        await wait_ready(manager)
        client = Client()  # amqp.url and amqp.prefix from the layered configuration
        assert client.prefix == isolated.prefix
        await client.connect()
        sessions = client.subscribe(["agent.session.created", "agent.session.#"])
        await sessions
        reply = await client.request({"type": "session.create", "agent_id": "agent-rq"}, timeout=20)
        assert reply["ok"] is True, reply
        session_id = reply["result"]["session_id"]

        async for event in sessions:  # one pattern overlaps the other: the event still comes once
            assert event["event_type"] == "agent.session.created"
            assert event["session_id"] == session_id
            break
        assert await sessions.next(timeout=1.0) is None, "an event matching two patterns came twice"

        missing = await client.request({"type": "session.close", "session_id": "no-such-session"}, timeout=20)
        assert missing["ok"] is True and missing["result"]["closed"] is False, missing
        refused = await client.request({"type": "session.create", "agent_id": ""}, timeout=20)
        assert refused["ok"] is False and refused["error"]["code"] == "invalid", refused

        await client.send({"type": "session.close", "session_id": session_id})
        closed = await sessions.next(timeout=20.0)
        assert closed is not None and closed["event_type"] == "agent.session.closed"
        stats = await client.request({"type": "stats.get"})
        assert stats["ok"] is True and stats["result"]["active_sessions"] == 0

        await client.close()
        with pytest.raises(AgentConnectionManagerError):
            await client.send({"type": "stats.get"})
    finally:
        await manager.stop()


async def test_request_without_a_worker_times_out(isolated):
    async with Client(isolated.amqp_url, isolated.prefix) as client:
        # The worker declares the exchange; without one the publish itself is refused by the broker.
        began = time.monotonic()
        with pytest.raises((RequestTimeoutError, BrokerError)):
            await client.request({"type": "stats.get"}, timeout=0.5)
        assert time.monotonic() - began < 10


async def test_request_times_out_when_the_worker_is_stopped(isolated):
    manager = AgentConnectionManager()
    await manager.start()
    await wait_ready(manager)
    await manager.stop()  # the topology stays, no consumer answers
    async with Client(isolated.amqp_url, isolated.prefix) as client:
        began = time.monotonic()
        with pytest.raises(RequestTimeoutError):
            await client.request({"type": "stats.get"}, timeout=0.5)
        assert time.monotonic() - began < 5


async def test_unreachable_broker_raises_quickly():
    began = time.monotonic()
    with pytest.raises(BrokerError):
        await Client("amqp://guest:guest@127.0.0.1:1/%2f", "nowhere").connect()
    assert time.monotonic() - began < 15


async def test_client_bad_arguments(isolated):
    with pytest.raises(ValueError):
        Client("http://127.0.0.1:5672", "p")
    with pytest.raises(ValueError):
        Client(isolated.amqp_url, "")
    client = Client(isolated.amqp_url, isolated.prefix)
    with pytest.raises(ValueError):
        await client.heartbeat("", "s", "c")
    with pytest.raises(ValueError):
        await client.heartbeat("a", "s", "c", client_info={"x": object()})
    with pytest.raises(ValueError):
        await client.request({"agent_id": "no type"})
    with pytest.raises(ValueError):
        await client.request(["not", "a", "dict"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await client.request({"type": "stats.get"}, timeout=0)
    with pytest.raises(ValueError):
        await client.send({"type": "session.create", "agent_id": float("nan")})
    with pytest.raises(ValueError):
        client.subscribe([])
    await client.close()


async def test_concurrent_requests_share_one_client(isolated):
    manager = AgentConnectionManager()
    await manager.start()
    try:
        await wait_ready(manager)
        async with Client(isolated.amqp_url, isolated.prefix) as client:
            replies = await asyncio.gather(
                *[client.request({"type": "session.create", "agent_id": f"agent-{i}"}, timeout=20) for i in range(20)]
            )
        assert all(r["ok"] for r in replies)
        assert len({r["result"]["session_id"] for r in replies}) == 20
    finally:
        await manager.stop()
