"""Retention by time on a real Redis: a session's streams keep what is newer than the cutoff,
whatever their ID scheme, and `forget` leaves no key of the session behind."""

from __future__ import annotations

import time

import pytest
import redis as syncredis

from core.config import Config
from gateway.lifecycle import SessionLifecycle
from gateway.retention import trim_session
from schemas.streams import ControlEntry, Keys, MicEntry, TranscriptEntry, mic_id
from tests.support import topology

KEYS = Keys()
SID = "npc.0123456789abcdef"


async def _fill(r, t0: float) -> None:
    """Ten minutes of one chunk per second, a turn every minute, one control entry a minute."""
    for i in range(600):
        ts = t0 + i * 1000
        await r.xadd(KEYS.session(SID, "mic"), MicEntry(i + 1, pcm=b"\0\0", ts=ts).to_fields(),
                     id=mic_id(i + 1))
        if i % 60 == 59:
            turn = i // 60 + 1
            await r.xadd(KEYS.session(SID, "mic"),
                         MicEntry(i + 1, end_of_utterance=True, ts=ts).to_fields(),
                         id=mic_id(i + 1, control=True))
            await r.xadd(KEYS.session(SID, "transcript"),
                         TranscriptEntry("hello", True, ts=ts + 10).to_fields(), id=f"{turn}-1")
            await r.xadd(KEYS.session(SID, "control"),
                         ControlEntry("ready", ts=ts + 20, turn=turn).to_fields(),
                         id=f"{int(ts) + 20}-0")


async def test_streams_are_trimmed_by_time(redis_client):
    r = redis_client
    t0 = 1_700_000_000_000.0
    await _fill(r, t0)
    dropped = await trim_session(r, KEYS, SID, cutoff_ms=t0 + 300_000)  # keep the last 5 min
    mic = await r.xrange(KEYS.session(SID, "mic"))
    assert mic[0][0] == b"301-0"  # the first chunk written at or after the cutoff
    assert dropped["mic"] == 300 + 5  # chunks and end-of-utterance markers
    turns = [e[0] for e in await r.xrange(KEYS.session(SID, "transcript"))]
    assert turns == [f"{t}-1".encode() for t in range(6, 11)]
    control = await r.xrange(KEYS.session(SID, "control"))
    assert len(control) == 5
    # nothing older than the cutoff: nothing to do
    assert await trim_session(r, KEYS, SID, cutoff_ms=t0) == {}


async def test_forget_deletes_every_key_of_the_session(redis_client):
    r = redis_client
    await _fill(r, 1_700_000_000_000.0)
    await r.hset(KEYS.session(SID, "meta"), mapping={"sid": SID})
    await r.hset(KEYS.session(SID, "timing"), mapping={"1:eos": 1.0})
    await r.hset(KEYS.listener(SID), mapping={"turn": "3"})
    await r.set(KEYS.started("llm", SID, 2), 1)
    await r.zadd(KEYS.sessions(), {SID: 1})
    life = SessionLifecycle(r, KEYS, Config())
    assert await life.forget(SID) >= 6
    left = [k async for k in r.scan_iter(match=f"*{SID}*")]
    assert left == []
    assert await r.zscore(KEYS.sessions(), SID) is None


@pytest.fixture(scope="module")
def cluster():
    """A real Redis Cluster (tests/support/topology.py: 3 masters, 3 replicas); its ports."""
    topo = topology.ClusterTopology().start()
    try:
        yield [n.port for n in topo.nodes]
    finally:
        topo.stop()


async def test_forget_and_trim_on_a_redis_cluster(cluster):
    from core.redisconn import connect

    r = connect(f"redis+cluster://127.0.0.1:{cluster[0]}")
    try:
        t0 = 1_700_000_000_000.0
        await _fill(r, t0)
        dropped = await trim_session(r, KEYS, SID, cutoff_ms=t0 + 300_000)
        assert dropped["mic"] == 305
        await r.hset(KEYS.listener(SID), mapping={"turn": "3"})  # in the {jobs} slot
        await r.set(KEYS.started("tts", SID, 3), 1)
        await r.hset(KEYS.session(SID, "meta"), mapping={"sid": SID})
        life = SessionLifecycle(r, KEYS, Config())
        await life._end(SID)  # ended: live state gone, recording kept
        assert await r.exists(KEYS.listener(SID)) == 0
        assert await r.hget(KEYS.session(SID, "meta"), "state") == b"ended"
        assert await life.forget(SID) >= 4
    finally:
        await r.aclose()
    for port in cluster:
        node = syncredis.Redis(port=port)
        for _ in range(100):  # a replica applies the deletes a moment after its master
            left = node.keys(f"*{SID}*")
            if not left:
                break
            time.sleep(0.02)
        node.close()
        assert left == [], port
