"""The gateway and Redis die and come back: the client resumes, nothing is lost, nothing
crashes. Own fleet and own Redis (with AOF, as `parley up` runs it), so these kills disturb
no other test."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from parley.client import Client
from parley.fleet import _port_open
from parley.redis_server import RedisServer
from tests.conftest import speech
from tests.support.fleet import running_fleet

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def own_fleet(tmp_path_factory):
    redis = RedisServer(appendonly=True).start()
    log = tmp_path_factory.mktemp("restarts") / "fleet.log"
    try:
        with running_fleet(redis.url, log) as f:
            f.redis_server = redis
            yield f
    finally:
        redis.stop()


def complete(result, done):
    s = result.summary()
    assert not result.errors, result.errors
    assert s["seq_gaps"] == 0 and s["seq_duplicates"] == 0, s["seq_problems"]
    assert result.audio_samples == done.audio_samples > 0
    assert abs(result.face_frames - result.audio_samples * 60 / result.reply_rate) <= 2


async def wait_until(cond, timeout):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.01)


async def test_gateway_killed_mid_turn_client_resumes_and_misses_nothing(own_fleet):
    url = f"ws://127.0.0.1:{own_fleet.port}"
    gateway = own_fleet.children[0]
    assert gateway.name == "gateway"
    client = await Client.connect(url)
    try:
        await client.open("npc", "innkeeper", 48000, 2)
        await client.stream("npc", speech("Hello. Do you have a room for the night?", 48000, 2),
                            48000, realtime=False)
        tr = client.turns["npc"]
        await wait_until(lambda: tr.t_first_audio > 0, 30)
        gateway.proc.send_signal(signal.SIGKILL)
        gateway.proc.wait()
        got_before = tr.audio_samples
        own_fleet.supervise_once()  # the supervisor restarts it on the same port
        await wait_until(lambda: _port_open("127.0.0.1", own_fleet.port), 20)
        await client.reconnect(url)
        done = await client.wait_turn("npc", 1, 30)
        complete(tr, done)
        assert got_before < tr.audio_samples or got_before == done.audio_samples
    finally:
        await client.close()


async def test_redis_restart_every_process_reconnects_and_the_next_turn_works(own_fleet):
    url = f"ws://127.0.0.1:{own_fleet.port}"
    client = await Client.connect(url)
    try:
        await client.open("npc2", "merchant", 16000, 1)
        await client.stream("npc2", speech("Hello there, what do you sell?", 16000), 16000,
                            realtime=False)
        complete(client.turns["npc2"], await client.wait_turn("npc2", 1, 30))

        redis = own_fleet.redis_server
        redis.stop(remove=False)  # SIGTERM: Redis writes its AOF and exits
        await asyncio.sleep(1.5)  # every process now sees connection errors
        redis.start()
        await asyncio.sleep(1.0)
        alive = {c.name: c.proc.poll() for c in own_fleet.children}
        assert all(code is None for code in alive.values()), alive

        # the session's listening job survived in the AOF and is taken up again
        client.turns["npc2"].t_first_audio = 0.0
        await client.stream("npc2", speech("Good morning. How much for the lantern?", 16000),
                            16000, realtime=False)
        done = await client.wait_turn("npc2", 2, 45)
        assert not done.interrupted
    finally:
        await client.close()
