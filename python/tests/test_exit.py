"""A Python program that uses the engine ends cleanly however it ends.

Each scenario is a small program run RUNS times, each time in a fresh interpreter, against a manager started by the
test (it answers the programs' requests). Every run must exit with status 0, print the scenario's marker (so it did
what it claims) and never print "Fatal Python error". Before the engine's threads passed a gate that closes at
``atexit``, about one run in two of the first scenario died with SIGSEGV or SIGABRT; before every method of the
package that runs Python code held a pass of that gate, most runs of ``threads_busy_in_calls`` died with SIGABRT.
"""

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

from agent_connection_manager import AgentConnectionManager
from conftest import wait_ready

RUNS = 50
PARALLEL = 4
RUN_TIMEOUT = 60.0

PRELUDE = """
import asyncio, itertools, os, signal, socket, sys, threading
from agent_connection_manager import AgentConnectionManager, Client
URL, PREFIX = os.environ["EXIT_TEST_AMQP_URL"], os.environ["EXIT_TEST_PREFIX"]
"""

SCENARIOS = {
    # asyncio.run returns right after a client connected, closed, and (in `async with`) had a request answered.
    "asyncio_run_returns": """
        async def main():
            c = Client(URL, PREFIX)
            await c.connect()
            await c.close()
            async with Client(URL, PREFIX) as c:
                reply = await c.request({"type": "stats.get"}, timeout=20)
                assert reply["ok"], reply
        asyncio.run(main())
        print("MARKER")
    """,
    # Ctrl-C while a request and a subscription's wait are in flight.
    "keyboard_interrupt": """
        async def main():
            c = Client(URL, PREFIX)
            sub = await c.subscribe(["nothing.will.match"])
            waiting = asyncio.ensure_future(sub.next(timeout=60))
            asking = asyncio.ensure_future(c.request({"type": "stats.get"}, timeout=60))
            await asyncio.sleep(0)
            signal.raise_signal(signal.SIGINT)
            await asyncio.sleep(60)
        try:
            asyncio.run(main())
        except KeyboardInterrupt:
            print("MARKER")
    """,
    # The interpreter shuts down with a client never closed: one in a global, one dropped with a request, a send
    # and a subscription's wait still in flight.
    "never_closed": """
        kept = Client(URL, PREFIX)
        async def main():
            await kept.connect()
            c = Client(URL, PREFIX)
            sub = await c.subscribe(["nothing.will.match"])
            asyncio.ensure_future(sub.next(timeout=60))
            asyncio.ensure_future(c.request({"type": "stats.get"}, timeout=60))
            asyncio.ensure_future(kept.send({"type": "stats.get"}))
            await asyncio.sleep(0)
        asyncio.run(main())
        print("MARKER")
    """,
    # The main thread ends while daemon threads are busy in the engine's methods: one makes awaitables in its own
    # loop and cancels them, one makes synchronous calls that are answered at once. Those methods run Python code
    # (asyncio's, json's) from inside the engine's code, and a thread CPython ends there during finalization took the
    # process down ("FATAL: exception not rethrown") in most runs before every such method held a pass of the gate.
    "threads_busy_in_calls": """
        sys.setswitchinterval(0.0005)
        manager = AgentConnectionManager()
        warm = [threading.Event(), threading.Event()]
        def awaitables():
            async def spin():
                sub = Client(URL, PREFIX).subscribe(["nothing.will.match"])
                for rounds in itertools.count():
                    futures = [sub.next(timeout=0) for _ in range(20)]
                    await asyncio.sleep(0)
                    for f in futures:
                        f.cancel()
                    if rounds == 50:
                        warm[0].set()
            asyncio.run(spin())
        def sync_calls():
            for calls in itertools.count():
                try:
                    manager.get_connection_stats()
                except RuntimeError:
                    return  # the interpreter is shutting down
                if calls == 20:
                    warm[1].set()
        for target in (awaitables, sync_calls):
            threading.Thread(target=target, daemon=True).start()
        for e in warm:
            assert e.wait(30), "a thread did not get busy"
        print("MARKER")
    """,
    # The main thread ends while daemon threads still wait: one in a synchronous call (its database never
    # answers), one in its own event loop awaiting a subscription.
    "thread_still_waiting": """
        hung = socket.socket()
        hung.bind(("127.0.0.1", 0))
        hung.listen(16)
        manager = AgentConnectionManager(db_engine="postgresql://postgres@127.0.0.1:%d/hung" % hung.getsockname()[1])
        entered = [threading.Event(), threading.Event()]
        def sync_call():
            entered[0].set()
            manager.get_connection_stats()
        def own_loop():
            async def wait():
                sub = await Client(URL, PREFIX).subscribe(["nothing.will.match"])
                entered[1].set()
                await sub.next(timeout=60)
            asyncio.run(wait())
        for target in (sync_call, own_loop):
            threading.Thread(target=target, daemon=True).start()
        for e in entered:
            assert e.wait(30), "a thread did not start its wait"
        print("MARKER")
    """,
}


def _run_once(script: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False
    )


@pytest.fixture
def answering_manager(isolated):
    """A started manager on the test's prefix, so that the programs' requests get replies."""
    import asyncio

    manager = AgentConnectionManager()
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(manager.start())
        loop.run_until_complete(wait_ready(manager))
        yield isolated
    finally:
        loop.run_until_complete(manager.stop())
        loop.close()


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_program_ends_cleanly(answering_manager, scenario):
    script = PRELUDE + textwrap.dedent(SCENARIOS[scenario])
    env = dict(os.environ)
    env["EXIT_TEST_AMQP_URL"] = answering_manager.amqp_url
    env["EXIT_TEST_PREFIX"] = answering_manager.prefix
    with ThreadPoolExecutor(PARALLEL) as pool:
        results = list(pool.map(lambda _: _run_once(script, env), range(RUNS)))
    failures = [
        f"run {i}: exit status {r.returncode}\n--- stdout ---\n{r.stdout}\n--- stderr ---\n{r.stderr[-3000:]}"
        for i, r in enumerate(results)
        if r.returncode != 0 or "Fatal Python error" in r.stderr or "MARKER" not in r.stdout
    ]
    assert not failures, f"{len(failures)} of {RUNS} runs of {scenario} did not end cleanly:\n" + "\n".join(
        failures[:3]
    )
