"""AgentConnectionManager: the synchronous methods and their awaitable twins, before and after start()."""

import asyncio
import datetime
import socket
import threading
import time
import uuid

import psycopg2
import pytest

from agent_connection_manager import AgentConnectionManager
from conftest import wait_ready

STATS_KEYS = {
    "active_connections",
    "active_sessions",
    "inactive_sessions",
    "pending_instructions",
    "sent_instructions",
    "total_instructions_pending",
    "timestamp",
}


def test_sync_methods_work_before_start(isolated):
    manager = AgentConnectionManager(isolated.db_url)
    acquisition = str(uuid.uuid4())
    session_id = manager.create_session(
        "agent-1",
        acquisition_uuid=acquisition,
        name="grid square 7",
        description="a test session",
        experimental_parameters={"dose": 1.5, "tags": ["a", "b"]},
    )
    assert isinstance(session_id, str) and session_id

    stats = manager.get_connection_stats()
    assert set(stats) == STATS_KEYS
    assert stats["active_sessions"] == 1
    assert stats["active_connections"] == 0
    assert isinstance(stats["timestamp"], datetime.datetime)
    assert stats["timestamp"].utcoffset() == datetime.timedelta(0)

    conn = psycopg2.connect(isolated.db_url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT agent_id, acquisition_uuid, name, description, experimental_parameters "
                "FROM agent_session WHERE session_id = %s",
                (session_id,),
            )
            row = cur.fetchone()
    finally:
        conn.close()
    assert row is not None
    assert row[:4] == ("agent-1", acquisition, "grid square 7", "a test session")
    assert row[4] == {"dose": 1.5, "tags": ["a", "b"]}

    assert manager.close_session(session_id) is True
    assert manager.close_session(session_id) is True, "closing an ended session again answers True"
    assert manager.close_session("no-such-session") is False
    assert manager.get_connection_stats()["active_sessions"] == 0
    assert manager.running is False


async def test_awaitable_twins(isolated):
    manager = AgentConnectionManager(isolated.db_url)
    session_id = await manager.acreate_session("agent-2", acquisition_uuid=uuid.uuid4())
    stats = await manager.aget_connection_stats()
    assert stats["active_sessions"] == 1
    assert await manager.aclose_session(session_id) is True
    assert await manager.aclose_session("no-such-session") is False


async def test_sync_calls_work_inside_a_running_loop_and_release_the_gil(isolated):
    """The synchronous methods wait on the engine, not on the caller's loop, and release the GIL meanwhile."""
    manager = AgentConnectionManager(isolated.db_url)
    manager.get_connection_stats()  # the schema, once
    ticks = []
    stop = threading.Event()

    def ticker():
        while not stop.is_set():
            ticks.append(1)
            stop.wait(0.001)

    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        before = len(ticks)
        ids = [manager.create_session(f"agent-loop-{i}") for i in range(20)]
        during = len(ticks) - before
    finally:
        stop.set()
        thread.join()
    assert len(set(ids)) == 20
    assert during > 0, "another Python thread ran while the calls waited (the GIL was released)"
    assert asyncio.get_running_loop().is_running()


def test_forty_threads_create_sessions_at_once(isolated):
    manager = AgentConnectionManager(isolated.db_url)
    barrier = threading.Barrier(40)
    results = [None] * 40
    errors = []

    def work(i):
        try:
            barrier.wait(timeout=30)
            results[i] = manager.create_session(f"agent-{i}")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a create_session call did not return"
    assert errors == []
    assert len(set(results)) == 40 and all(results)
    assert manager.get_connection_stats()["active_sessions"] == 40


async def test_start_and_stop_leave_no_consumer(isolated):
    manager = AgentConnectionManager(check_interval=60)
    assert manager.check_interval == 60
    assert manager.amqp_prefix == isolated.prefix
    await manager.start()
    try:
        assert manager.running
        await wait_ready(manager)
        assert isolated.queue_consumers("heartbeats") >= 1
        assert isolated.queue_consumers("commands") >= 1
        await manager.start()  # starting again changes nothing
    finally:
        await manager.stop()
    assert not manager.running
    assert isolated.queue_consumers("heartbeats") == 0
    assert isolated.queue_consumers("commands") == 0
    await manager.stop()  # stopping again changes nothing


@pytest.mark.parametrize(
    "scheme", ["postgres", "postgresql", "postgresql+psycopg2", "postgresql+asyncpg", "postgresql+psycopg"]
)
def test_url_forms(isolated, scheme):
    url = isolated.db_url.replace("postgres://", f"{scheme}://", 1)
    manager = AgentConnectionManager(url)
    assert manager.database_url.endswith(f"/{isolated.database}")
    assert manager.get_connection_stats()["active_sessions"] == 0


def test_sqlalchemy_engine_and_url(isolated):
    sqlalchemy = pytest.importorskip("sqlalchemy")
    url = isolated.db_url.replace("postgres://postgres@", "postgresql+psycopg2://postgres:not-needed@", 1)
    engine = sqlalchemy.create_engine(url)
    try:
        manager = AgentConnectionManager(engine)
        assert "not-needed" not in manager.database_url, "the password is redacted"
        session_id = manager.create_session("agent-sa")
        assert AgentConnectionManager(engine.url).close_session(session_id) is True
    finally:
        engine.dispose()


def test_sqlalchemy_async_engine(isolated):
    pytest.importorskip("asyncpg")
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(isolated.db_url.replace("postgres://", "postgresql+asyncpg://", 1))
    manager = AgentConnectionManager(engine)
    assert manager.get_connection_stats()["active_sessions"] == 0


async def test_start_serves_http_when_configured(isolated):
    httpx = pytest.importorskip("httpx")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    isolated.configure(http={"listen": f"127.0.0.1:{port}"})
    manager = AgentConnectionManager()
    await manager.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5, trust_env=False) as http:
            assert (await http.get("/healthz")).status_code == 200
            deadline = time.monotonic() + 30
            while (ready := await http.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, f"/readyz still answers {ready.status_code}: {ready.text}"
                await asyncio.sleep(0.05)
            assert "acm_" in (await http.get("/metrics")).text
    finally:
        await manager.stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2, trust_env=False)
