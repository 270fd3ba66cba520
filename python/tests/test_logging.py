"""The engine's log lines go to Python's ``logging``, under ``agent_connection_manager``, at their levels."""

import logging

from agent_connection_manager import AgentConnectionManager
from conftest import eventually, wait_ready


def _engine_records(caplog, level):
    return [r for r in caplog.records if r.name.startswith("agent_connection_manager.") and r.levelno == level]


async def test_engine_lines_reach_python_logging_at_their_levels(isolated, caplog):
    caplog.set_level(logging.INFO, logger="agent_connection_manager")
    manager = AgentConnectionManager()
    await manager.start()
    try:
        await wait_ready(manager)
        records = eventually("an INFO record from the engine", lambda: _engine_records(caplog, logging.INFO) or None)
        assert all(r.getMessage() for r in records)
        assert not [r for r in caplog.records if r.name.startswith("agent_connection_manager.") and r.levelno < 20]
    finally:
        await manager.stop()


async def test_a_child_logger_set_lower_than_its_parent_gets_its_lines(isolated, caplog):
    caplog.set_level(logging.ERROR, logger="agent_connection_manager")
    child = logging.getLogger("agent_connection_manager.worker")
    caplog.set_level(logging.DEBUG, logger=child.name)
    manager = AgentConnectionManager()
    await manager.start()
    try:
        await wait_ready(manager)
        eventually("a DEBUG or INFO record through the child logger", lambda: [
            r for r in caplog.records if r.name.startswith(child.name) and r.levelno < logging.WARNING
        ] or None)
    finally:
        await manager.stop()
