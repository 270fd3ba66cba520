"""The README's FastAPI example, run as written: the upstream lifespan pattern with synchronous calls from
coroutines, on the process-wide manager; then start_connection_manager() and stop_connection_manager()."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_example() -> str:
    text = README.read_text()
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    examples = [b for b in blocks if "lifespan" in b]
    assert examples, "README.md's From Python section has no lifespan example"
    return examples[0]


async def test_readme_lifespan_example(isolated):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    import agent_connection_manager as acm

    namespace: dict = {"__name__": "readme_example"}
    exec(compile(readme_example(), str(README), "exec"), namespace)
    app = namespace["app"]
    manager = namespace["connection_manager"]
    assert manager is acm.get_connection_manager(), "one process-wide instance"
    assert manager.amqp_prefix == isolated.prefix

    async with app.router.lifespan_context(app):
        assert manager.running
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
            created = await http.post("/agents/agent-readme/sessions")
            assert created.status_code == 200, created.text
            session_id = created.json()["session_id"]
            stats = (await http.get("/stats")).json()
            assert stats["active_sessions"] == 1
            assert stats["timestamp"].endswith(("Z", "+00:00"))
            closed = await http.delete(f"/sessions/{session_id}")
            assert closed.json() == {"closed": True}
            missing = await http.delete("/sessions/no-such-session")
            assert missing.json() == {"closed": False}
    assert not manager.running
    assert isolated.queue_consumers("commands") == 0

    await acm.start_connection_manager()
    assert acm.get_connection_manager().running
    await acm.stop_connection_manager()
    assert not acm.get_connection_manager().running
