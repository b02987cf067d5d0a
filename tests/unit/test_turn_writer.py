"""The runtime's idempotent turn writer against a real Redis: a re-run of a job appends only
what the previous run had not published, and a later turn's output supersedes the job."""

from __future__ import annotations

import pytest

from core.config import Config
from schemas.streams import Job, Keys
from workers.runtime import JobContext, Stage, Superseded, Worker

VOICE = Keys().session("s.1", "voice")


class _Stage(Stage):
    name = "tts"


async def _ctx(url: str, turn: int = 2) -> JobContext:
    cfg = Config.load(env={"PARLEY_REDIS_URL": url})
    worker = Worker(_Stage(cfg), cfg, consumer="writer-test")
    return JobContext(worker, Job(stage="tts", sid="s.1", turn=turn, id="1-1"))


async def test_a_rerun_skips_what_is_published_and_continues(scratch_url, redis_client):
    first = await _ctx(scratch_url)
    w = await first.writer("voice")
    assert not w.resuming
    for i in range(3):
        assert await w.put({"n": str(i)})
    # the worker died here; the takeover makes the same output again
    again = await _ctx(scratch_url)
    w2 = await again.writer("voice")
    assert w2.resuming and w2.published == 3
    wrote = [await w2.put({"n": str(i)}) for i in range(5)]
    assert wrote == [False, False, False, True, True]
    entries = await redis_client.xrange(VOICE)
    assert [e[0].decode() for e in entries] == [f"2-{i}" for i in range(1, 6)]
    assert [e[1][b"n"] for e in entries] == [str(i).encode() for i in range(5)]
    # a stage whose output varies reads what is there and appends after it
    w3 = await (await _ctx(scratch_url)).writer("voice")
    assert [seq for seq, _ in await w3.published_entries()] == [1, 2, 3, 4, 5]
    w3.skip_published()
    assert await w3.put({"n": "end"})
    assert (await redis_client.xrevrange(VOICE, count=1))[0][0] == b"2-6"
    for ctx in (first, again):
        await ctx.worker.redis.aclose()


async def test_a_later_turns_output_supersedes_the_job(scratch_url, redis_client):
    later, earlier = await _ctx(scratch_url, turn=3), await _ctx(scratch_url, turn=2)
    await (await later.writer("voice")).put({"n": "x"})
    with pytest.raises(Superseded):
        await earlier.writer("voice")
    for ctx in (later, earlier):
        await ctx.worker.redis.aclose()
