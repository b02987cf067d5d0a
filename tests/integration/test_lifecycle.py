"""Idle sessions cost nothing and abandoned ones go: a town of NPCs nobody talks to must not
stop anyone else from being heard, and a client that vanishes leaves nothing behind once its
grace period is over. Own fleet and own Redis (a short grace period)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from parley.client import Client
from parley.redis_server import RedisServer
from schemas.streams import Keys
from tests.conftest import speech
from tests.support.fleet import running_fleet

pytestmark = pytest.mark.slow

GRACE_S = 3
TOKEN = "lifecycle-test-secret"
RATE = 16000
KEYS = Keys()


@pytest.fixture(scope="module")
def idle_fleet(tmp_path_factory):
    server = RedisServer().start()
    log = tmp_path_factory.mktemp("lifecycle") / "fleet.log"
    # recordings are kept 2 s after the session ended: then every key goes
    env = {"PARLEY_REDIS_DETACHED_GRACE_S": str(GRACE_S),
           "PARLEY_REDIS_RETENTION_S": "2",
           "PARLEY_GATEWAY_SWEEP_S": "0.5", "PARLEY_GATEWAY_MAX_SESSIONS": "1000",
           # a game server with a token may hold hundreds of NPC sessions
           "PARLEY_GATEWAY_TOKENS": f"town:{TOKEN}"}
    try:
        with running_fleet(server.url, log, env=env) as f:
            f.r = redis.Redis.from_url(server.url)
            yield f
            f.r.close()
    finally:
        server.stop()


def stt_pending(r: redis.Redis) -> int:
    try:
        return int(r.xpending(KEYS.jobs("stt"), "stt")["pending"])
    except redis.ResponseError:
        return 0


async def speak_and_wait(url: str, session: str, text: str, timeout: float = 60.0):
    client = await Client.connect(url, token=TOKEN, token_name="town")
    try:
        await client.open(session, "guard", RATE, 1)
        await client.stream(session, speech(text, RATE), RATE, realtime=False)
        return await client.wait_done(session, timeout)
    finally:
        await client.close()


async def open_idle(url: str, n: int, prefix: str) -> Client:
    client = await Client.connect(url, token=TOKEN, token_name="town")
    await asyncio.gather(*(client.open(f"{prefix}{i}", "guard", RATE, 1) for i in range(n)))
    return client


async def test_forty_abandoned_idle_sessions_do_not_stop_a_new_one(idle_fleet):
    url = f"ws://127.0.0.1:{idle_fleet.port}"
    client = await open_idle(url, 40, "town")
    await asyncio.sleep(0.5)
    # an NPC nobody talks to holds no STT job (the one STT worker has 32 slots)
    assert stt_pending(idle_fleet.r) == 0
    await client.ws.close()  # dropped without close: the sessions are detached, not closed
    result = await speak_and_wait(url, "talker", "Hello there, who are you?")
    assert result.transcript and result.done is not None, result.errors


async def test_abandoned_sessions_expire_with_all_their_keys(idle_fleet):
    url = f"ws://127.0.0.1:{idle_fleet.port}"
    r = idle_fleet.r
    clients = [await open_idle(url, 125, f"npc{c}-") for c in range(8)]  # 1,000 sessions
    # two of them had a whole turn, so every kind of key and job guard exists
    spoken = await Client.connect(url, token=TOKEN, token_name="town")
    await spoken.open("spoken", "guard", RATE, 1)
    await spoken.stream("spoken", speech("What is your name?", RATE), RATE, realtime=False)
    assert (await spoken.wait_done("spoken", 60)).done is not None
    assert r.zcard(KEYS.sessions()) >= 1001
    for c in [*clients, spoken]:
        await c.ws.close()
    deadline = time.monotonic() + GRACE_S + 20
    left = None
    while time.monotonic() < deadline:
        left = [k for k in r.scan_iter(match="parley:*", count=1000)
                if b":s:{" in k or b":listen:" in k or b":started:" in k]
        if not left and r.zcard(KEYS.sessions()) == 0:
            break
        await asyncio.sleep(0.5)
    assert not left, f"{len(left)} keys left, e.g. {left[:5]}"
    assert r.zcard(KEYS.sessions()) == 0
    await asyncio.sleep(2.0)  # an STT job that was listening gives the session back
    assert stt_pending(r) == 0
    result = await speak_and_wait(url, "after", "Hello there, who are you?")
    assert result.transcript and result.done is not None, result.errors
