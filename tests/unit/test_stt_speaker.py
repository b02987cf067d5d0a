"""What the STT stage learns about a player's voice after an utterance, against a real Redis.

The learning (pocketsphinx's end of utterance: up to 250 ms of CPU) waits for the turn's first
reply audio: it starts once that audio is published and relayed, never later than the cap when
no audio comes, and at once for a recognizer that has nothing left to do. What it learned
starts the session's next utterance, or, for a player named at ``open``, their first one in
another session."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from core.config import Config
from schemas.streams import SPEAKER_FIELD, Job, Keys
from workers.runtime import JobContext, Stage, Worker
from workers.stt import stage as stt

VOICE = Keys().session("s.1", "voice")


class _Stage(Stage):
    name = "stt"


def _ctx(url: str) -> JobContext:
    cfg = Config.load(env={"PARLEY_REDIS_URL": url})
    return JobContext(Worker(_Stage(cfg), cfg, consumer="speaker-test"),
                      Job(stage="stt", sid="s.1", turn=2, id="1-1"))


async def _utterances(url: str, finishes_late: bool) -> stt._Utterances:
    ctx = _ctx(url)
    # only the part of the STT stage this asks about: whether its recognizer finishes late
    stage = SimpleNamespace(backend=SimpleNamespace(finishes_late=finishes_late))
    return stt._Utterances(stage, ctx, listener=None, writer=None)


async def _timed(coro) -> float:
    t0 = time.monotonic()
    await coro
    return time.monotonic() - t0


async def test_leftover_work_starts_after_the_first_reply_audio(scratch_url, redis_client):
    u = await _utterances(scratch_url, finishes_late=True)

    async def first_audio():
        await asyncio.sleep(0.1)
        await redis_client.xadd(VOICE, {"pcm": b""}, id="2-1")

    waited, _ = await asyncio.gather(_timed(u.after_first_audio()), first_audio())
    # after the audio and the relay grace; well before the cap (gross bounds: shared CPUs)
    assert 0.1 + stt.RELAY_GRACE_S - 0.02 <= waited < stt.FIRST_AUDIO_WAIT_MS / 1000
    await u.ctx.worker.redis.aclose()


async def test_no_reply_audio_holds_it_for_the_cap_only(scratch_url, redis_client):
    u = await _utterances(scratch_url, finishes_late=True)
    await redis_client.xadd(VOICE, {"pcm": b""}, id="1-1")  # the turn before's audio
    waited = await _timed(u.after_first_audio())
    assert stt.FIRST_AUDIO_WAIT_MS / 1000 - 0.02 <= waited < 2.0
    await u.ctx.worker.redis.aclose()


async def test_a_recognizer_with_nothing_left_does_not_wait(scratch_url):
    u = await _utterances(scratch_url, finishes_late=False)
    assert await _timed(u.after_first_audio()) < 0.1
    await u.ctx.worker.redis.aclose()


async def test_a_session_starts_from_its_own_last_utterance_else_the_players(scratch_url,
                                                                           redis_client):
    ctx, keys = _ctx(scratch_url), Keys()
    p1, nobody = SimpleNamespace(player="conn-1/p1"), SimpleNamespace(player="")
    assert await stt.SttStage._speaker(ctx, p1) == ""  # nothing learned anywhere yet
    await redis_client.set(keys.speaker("conn-1/p1"), "cmn:players")
    assert await stt.SttStage._speaker(ctx, p1) == "cmn:players"
    assert await stt.SttStage._speaker(ctx, nobody) == ""  # no player named: own only
    await redis_client.hset(keys.listener("s.1"), SPEAKER_FIELD, "cmn:own")
    assert await stt.SttStage._speaker(ctx, p1) == "cmn:own"
    assert await stt.SttStage._speaker(ctx, nobody) == "cmn:own"
    await ctx.worker.redis.aclose()
