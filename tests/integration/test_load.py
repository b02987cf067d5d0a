"""Several players at once on a small fleet: busy workers are not mistaken for dead ones.

pocketsphinx holds the GIL while it decodes, so under load an STT worker's event loop starves
for whole seconds; before liveness moved to a sidecar process, 8 players on 2 workers per stage
gave dozens of takeovers of live jobs and lost turns. Gross bounds only: every turn is answered
and the fleet log shows no takeover and no dead letter while no process died.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from parley.client import Client
from parley.redis_server import RedisServer
from tests.conftest import speech
from tests.support.fleet import running_fleet

pytestmark = pytest.mark.slow

RATE = 16000
PLAYERS = 8
LINES = ["Who are you and what do you guard here?", "Tell me about the road to the north.",
         "What is your name, stranger?", "Is the gate open tonight?"]


@pytest.fixture(scope="module")
def loaded_fleet(tmp_path_factory):
    server = RedisServer().start()
    log = tmp_path_factory.mktemp("load") / "fleet.log"
    env = {"PARLEY_GATEWAY_ADMIT_MAX_QUEUE_MS": "500",
           "PARLEY_GATEWAY_ADMISSION_POLL_S": "0.1"}
    try:
        with running_fleet(server.url, log, workers=2, env=env) as f:
            f.log = log
            yield f
    finally:
        server.stop()


async def test_eight_players_at_once_lose_no_turn_and_no_job(loaded_fleet):
    url = f"ws://127.0.0.1:{loaded_fleet.port}"
    client = await Client.connect(url)
    try:
        for i in range(PLAYERS):
            await client.open(f"p{i}", "guard", RATE, 1)
        clips = [speech(LINES[i % len(LINES)], RATE) for i in range(PLAYERS)]
        await asyncio.gather(*(client.stream(f"p{i}", clips[i], RATE, realtime=True)
                               for i in range(PLAYERS)))
        results = await asyncio.gather(*(client.wait_done(f"p{i}", 120) for i in range(PLAYERS)))
    finally:
        await client.close()
    failed = [(r.session, r.errors) for r in results if r.done is None or r.errors]
    assert not failed, failed
    log = loaded_fleet.log.read_text()
    assert log.count("job_taken_over") == 0, log[-3000:]
    assert log.count("job_dead_lettered") == 0, log[-3000:]


async def test_overloaded_fleet_refuses_new_sessions_and_answers_spoken_turns(loaded_fleet):
    """Every STT worker frozen: the player's turn waits in the queue. New sessions are refused
    with `overloaded` (said before anyone speaks); the spoken turn is answered once the workers
    are back, and sessions are admitted again."""
    url = f"ws://127.0.0.1:{loaded_fleet.port}"
    stt = [c.proc for c in loaded_fleet.children if c.name.startswith("stt-")]
    client = await Client.connect(url)
    try:
        await client.open("waiting", "guard", RATE, 1)  # the fleet may still be busy from before
        for p in stt:
            os.kill(p.pid, signal.SIGSTOP)
        try:
            await client.stream("waiting", speech(LINES[0], RATE), RATE, realtime=False)
            refused = None
            deadline = time.monotonic() + 20
            while refused is None and time.monotonic() < deadline:
                await asyncio.sleep(0.3)
                other = await Client.connect(url)
                try:
                    await other.open("late", "guard", RATE, 1,  # admitted: not yet overloaded
                                     overloaded_wait_s=0)
                except RuntimeError as exc:
                    refused = str(exc)
                finally:
                    await other.close()
        finally:
            for p in stt:
                os.kill(p.pid, signal.SIGCONT)
        assert refused is not None, "an overloaded fleet admitted new sessions"
        assert "overloaded" in refused and "busy" in refused and "retry" in refused, refused
        result = await client.wait_done("waiting", 60)
        assert result.done is not None and not result.errors, result.errors
        await asyncio.sleep(1.0)
        again = await Client.connect(url)
        try:
            await again.open("later", "guard", RATE, 1)  # admitted again once it has caught up
        finally:
            await again.close()
    finally:
        await client.close()
