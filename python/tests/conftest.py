"""Fixtures: each test gets its own database (random name, made by the engine on first use) and its own AMQP prefix
on the real PostgreSQL and RabbitMQ, named in a configuration file given by ``ACM_CONFIG``, and both are removed
afterwards."""

import asyncio
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional, TypeVar

import pika
import psycopg2
import pytest

PG_BASE = os.environ.get("ACM_TEST_PG_BASE", "postgres://postgres@127.0.0.1:5432")
AMQP_URL = os.environ.get("ACM_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")

T = TypeVar("T")


@dataclass
class Isolated:
    """One test's database and prefix, and the configuration file naming them."""

    database: str
    prefix: str
    config_path: Path
    amqp_url: str = AMQP_URL
    settings: Dict[str, Dict[str, Any]] = field(default_factory=dict)

    @property
    def db_url(self) -> str:
        return f"{PG_BASE}/{self.database}"

    def configure(self, **sections: Dict[str, Any]) -> None:
        """Changes configuration keys (``sweeper={"connection_stale_after_secs": 2}``); managers made afterwards
        read them."""
        for section, keys in sections.items():
            self.settings.setdefault(section, {}).update(keys)
        self.config_path.write_text(_toml(self.settings))

    def queue_consumers(self, queue: str) -> int:
        """The consumer count of one of the prefix's queues (a passive declare)."""
        conn = pika.BlockingConnection(pika.URLParameters(self.amqp_url))
        try:
            ok = conn.channel().queue_declare(queue=f"{self.prefix}.{queue}", passive=True)
            return ok.method.consumer_count
        finally:
            conn.close()


def _toml(settings: Dict[str, Dict[str, Any]]) -> str:
    lines = []
    for section, keys in settings.items():
        lines.append(f"[{section}]")
        for key, value in keys.items():
            if isinstance(value, bool):
                lines.append(f"{key} = {'true' if value else 'false'}")
            elif isinstance(value, (int, float)):
                lines.append(f"{key} = {value}")
            else:
                lines.append(f'{key} = "{value}"')
    return "\n".join(lines) + "\n"


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    suffix = uuid.uuid4().hex[:12]
    env = Isolated(database=f"acm_pytest_{suffix}", prefix=f"acm-pytest-{suffix}", config_path=tmp_path / "acm.toml")
    for name in list(os.environ):
        if name.startswith("ACM_") and "__" in name:
            monkeypatch.delenv(name)
    env.configure(
        database={"url": env.db_url, "checkout_timeout_secs": 5},
        amqp={"url": env.amqp_url, "prefix": env.prefix, "command_queue_type": "classic"},
        http={"listen": ""},
        sweeper={"check_interval_secs": 3600},
        outbox={"poll_interval_ms": 200},
    )
    monkeypatch.setenv("ACM_CONFIG", str(env.config_path))
    yield env
    _drop_database(env.database)
    _delete_topology(env.prefix)


def _drop_database(name: str) -> None:
    conn = psycopg2.connect(f"{PG_BASE}/postgres")
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def _delete_topology(prefix: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        ch = conn.channel()
        for queue in ("heartbeats", "commands", "dead-letter", "unroutable"):
            ch.queue_delete(queue=f"{prefix}.{queue}")
        for exchange in ("commands", "events", "dead-letter", "unroutable"):
            ch.exchange_delete(exchange=f"{prefix}.{exchange}")
    finally:
        conn.close()


def eventually(what: str, check: Callable[[], Optional[T]], timeout: float = 20.0) -> T:
    """Polls ``check`` until it returns something other than None or False, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = check()
        if last is not None and last is not False:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what} (last value: {last!r})")
        time.sleep(0.05)


async def wait_ready(manager, timeout: float = 30.0) -> None:
    """Waits (bounded) until a started manager consumes, so its exchanges and queues exist."""
    deadline = time.monotonic() + timeout
    while not manager.ready:
        if time.monotonic() > deadline:
            raise AssertionError(f"the manager was not ready within {timeout}s (broker connected, consumers running)")
        await asyncio.sleep(0.05)
