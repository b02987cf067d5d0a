"""The speculation record's rules, on a real Redis (workers/speculation.py): numbering,
one live speculation per session, adopt and cancel only a live one, a cancelled one's entries
dropped and no later write accepted, a speculative job claimed once."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from schemas.streams import Keys
from workers import speculation as S

K = Keys()
SID = "spec-rules"


def job_ctx(r, n: int, stage: str = "llm", turn: int = 1):
    """What the speculation helpers read of a speculative job's context."""
    return SimpleNamespace(redis=r, keys=K, sid=SID, job=SimpleNamespace(spec=n, turn=turn),
                           key=lambda name: K.session(SID, name),
                           worker=SimpleNamespace(stage=SimpleNamespace(name=stage)))


async def state(r, n: int) -> str | None:
    v = await r.hget(K.session(SID, "spec"), f"{n}:state")
    return v.decode() if v else None


async def test_numbers_grow_and_a_new_one_cancels_the_live_one(redis_client):
    r = redis_client
    one = await S.start(r, K, SID, 1, "open the gate")
    two = await S.start(r, K, SID, 1, "open the gate please")
    assert (one, two) == (1, 2)
    assert await state(r, 1) == "cancelled" and await state(r, 2) == "live"
    assert await S.settle(r, K, SID, 2, "adopted")
    three = await S.start(r, K, SID, 2, "who are you")
    assert await state(r, 2) == "adopted"  # a new turn's start leaves an adopted one alone
    assert three == 3 and await r.ttl(K.session(SID, "spec")) > 3600


async def test_cancel_drops_its_entries_and_refuses_later_writes(redis_client):
    r = redis_client
    n = await S.start(r, K, SID, 1, "open the gate")
    ctx = job_ctx(r, n)
    await S.write(ctx, "reply", f"{n}-1", {"segment": "0", "text": "The gate"})
    assert 0 < await r.pttl(K.session(SID, "spec_reply")) <= S.STREAM_TTL_S * 1000
    assert await S.settle(r, K, SID, n, "cancelled")
    assert await r.xlen(K.session(SID, "spec_reply")) == 0
    with pytest.raises(S.SpeculationOff):
        await S.write(ctx, "reply", f"{n}-2", {"segment": "1", "text": "opens"})
    assert not await S.settle(r, K, SID, n, "adopted")  # a cancelled one is never adopted
    assert await r.xlen(K.session(SID, "spec_reply")) == 0


async def test_an_older_speculation_cannot_write_under_a_newer_one(redis_client):
    r = redis_client
    old = await S.start(r, K, SID, 1, "open")
    assert await S.settle(r, K, SID, old, "adopted")
    new = await S.start(r, K, SID, 2, "who")
    await S.write(job_ctx(r, new), "reply", f"{new}-1", {"text": "I am"})
    with pytest.raises(S.SpeculationOff):  # its ID is below the newer entries: never whole
        await S.write(job_ctx(r, old), "reply", f"{old}-1", {"text": "The gate"})


async def test_a_speculative_job_is_claimed_once_and_not_when_off(redis_client):
    r = redis_client
    n = await S.start(r, K, SID, 1, "open the gate")
    assert await S.claim(job_ctx(r, n), "llm@a")
    assert not await S.claim(job_ctx(r, n), "llm@b")  # a takeover's rerun
    assert await S.claim(job_ctx(r, n, "tts"), "tts@a")
    assert await S.settle(r, K, SID, n, "cancelled")
    m = await S.start(r, K, SID, 1, "open the gate please")
    assert await S.settle(r, K, SID, m, "cancelled")
    assert not await S.claim(job_ctx(r, m), "llm@a")


async def test_a_failed_job_abandons_an_adopted_speculation_only(redis_client):
    r = redis_client
    n = await S.start(r, K, SID, 1, "open the gate")
    await S.ended(job_ctx(r, n), "failed")
    assert await state(r, n) == "live"  # not adopted: STT settles it
    assert await S.settle(r, K, SID, n, "adopted")
    await S.ended(job_ctx(r, n, "tts"), "done")
    assert await state(r, n) == "adopted"
    await S.ended(job_ctx(r, n), "failed")
    assert await state(r, n) == "abandoned"


async def test_old_records_and_entries_are_forgotten(redis_client):
    r = redis_client
    for i in range(1, 8):
        n = await S.start(r, K, SID, i, f"turn {i}")
        await S.write(job_ctx(r, n), "voice", f"{n}-1", {"pcm": b"\x00\x00"})
        assert await S.settle(r, K, SID, n, "adopted")
    fields = {k.decode().split(":")[0] for k in await r.hkeys(K.session(SID, "spec"))}
    assert fields == {"n", "4", "5", "6", "7"}, fields
    ids = [e.decode() for e, _ in await r.xrange(K.session(SID, "spec_voice"))]
    assert ids == ["5-1", "6-1", "7-1"]
    assert "spec" in K.session(SID, "spec") and all(
        name in {k.rsplit(":", 1)[1] for k in K.session_keys(SID)}
        for name in ("spec", "spec_reply", "spec_voice"))


async def test_the_final_transcript_adopts_with_what_was_made_so_far(redis_client):
    """STT's confirmed end: transcript, adoption and the copy of the speculation's entries in
    one script; the copy stops at a gap, and a second run (a takeover) copies nothing twice."""
    r = redis_client
    n = await S.start(r, K, SID, 3, "open the gate")
    ctx = job_ctx(r, n)
    await S.write(ctx, "reply", f"{n}-1", {"segment": "0", "text": "The gate"})
    await S.write(ctx, "reply", f"{n}-2", {"segment": "1", "text": "opens."})
    await S.write(ctx, "voice", f"{n}-1", {"segment": "0", "pcm": b"\x00\x01" * 8})
    await S.write(ctx, "voice", f"{n}-3", {"segment": "0", "pcm": b"\x02"})  # after a gap
    final = {"text": "open the gate", "final": "1"}
    got = await S.adopt_final(r, K, SID, n, 3, "3-1", final)
    assert got == (True, 2, 1) and await state(r, n) == "adopted"
    reply = await r.xrange(K.session(SID, "reply"))
    assert [e for e, _ in reply] == [b"3-1", b"3-2"] and reply[1][1][b"text"] == b"opens."
    voice = await r.xrange(K.session(SID, "voice"))
    assert [e for e, _ in voice] == [b"3-1"] and voice[0][1][b"pcm"] == b"\x00\x01" * 8
    assert (await r.xrange(K.session(SID, "transcript")))[0][1][b"text"] == b"open the gate"
    # a rerun: the transcript is there (its ID published, or the same ID again) and the
    # speculation is no longer live: nothing is written twice
    assert await S.adopt_final(r, K, SID, n, 3, "3-1", final) == (False, 0, 0)
    assert await S.adopt_final(r, K, SID, n, 3, None, final) == (False, 0, 0)
    assert await r.xlen(K.session(SID, "transcript")) == 1
    assert await r.xlen(K.session(SID, "reply")) == 2


async def test_a_speculation_no_longer_live_is_not_copied(redis_client):
    r = redis_client
    n = await S.start(r, K, SID, 1, "open the gate")
    await S.write(job_ctx(r, n), "reply", f"{n}-1", {"segment": "0", "text": "The gate"})
    await S.start(r, K, SID, 1, "open the gate please")  # cancels n
    got = await S.adopt_final(r, K, SID, n, 1, "1-1", {"text": "open the gate", "final": "1"})
    assert got == (False, 0, 0)
    assert await r.xlen(K.session(SID, "reply")) == 0
    assert await r.xlen(K.session(SID, "transcript")) == 1  # the transcript goes in anyway


async def test_a_speculative_job_stops_when_its_adopted_turn_is_interrupted(redis_client):
    """A barge-in on the adopted reply: the adopters stop with the turn, and so does the
    speculative job they copied from (nothing more of it is wanted)."""
    r = redis_client
    n = await S.start(r, K, SID, 2, "tell me a long story")
    assert await S.settle(r, K, SID, n, "adopted")
    ctx = job_ctx(r, n, turn=2)
    job = asyncio.create_task(asyncio.sleep(30))
    watcher = asyncio.create_task(S.watch(ctx, job))
    await r.set(K.session(SID, "cancel"), 1)  # an older turn's interrupt: not this one
    await asyncio.sleep(3 * S.WATCH_S)
    assert not job.done()
    await r.set(K.session(SID, "cancel"), 2)
    await asyncio.wait_for(watcher, 2)
    with pytest.raises(asyncio.CancelledError):
        await job
    assert ctx.interrupted
