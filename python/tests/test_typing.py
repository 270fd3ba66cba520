"""The shipped stubs match the extension module, and a typed caller checks against them."""

import subprocess
import sys

import pytest


def test_stubs_match_the_module():
    pytest.importorskip("mypy")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            "agent_connection_manager._native",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_typed_caller_checks(tmp_path):
    pytest.importorskip("mypy")
    caller = tmp_path / "caller.py"
    caller.write_text(
        "from agent_connection_manager import AgentConnectionManager, Client, DatabaseError\n"
        "m = AgentConnectionManager('postgresql+psycopg2://u@h/db', check_interval=10)\n"
        "sid: str = m.create_session('agent', name='n', experimental_parameters={'a': 1})\n"
        "closed: bool = m.close_session(sid)\n"
        "async def f(c: Client) -> None:\n"
        "    reply = await c.request({'type': 'stats.get'}, timeout=5.0)\n"
        "    async for event in c.subscribe(['#']):\n"
        "        print(event['event_type'], reply['ok'])\n"
        "m.create_session(42)  # wrong: an int\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", str(caller)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1 and "caller.py:9:" in errors[0], out.stdout + out.stderr
