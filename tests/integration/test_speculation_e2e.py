"""Start early, speak only when sure, through the real fleet (default settings: Silero VAD,
800 ms of silence ends the turn, 250 ms starts the reply early): a speculation started at a
mid-sentence pause is cancelled when the player goes on and nothing of it reaches the client;
one started after a finished sentence is adopted, and either way the client gets one whole,
gap-free turn."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from benchmarks.turns import BenchClient
from core.personas import load_personas
from core.redisconn import connect
from schemas.streams import Keys
from tests.integration.test_endpointing_e2e import (
    sentence_with_pause,
    stream_paced,
)
from tests.support.turns import turn_problems
from workers.llm.scripted import ScriptedPersonaBackend

pytestmark = pytest.mark.slow
R = 16000
GUARD = load_personas(Path(__file__).resolve().parents[2] / "personas")["guard"]


def answer(text: str) -> str:
    """What the scripted guard says to ``text`` (the fleet's LLM backend)."""
    return ScriptedPersonaBackend().choose(GUARD, text)


async def speculations(url: str, sid: str) -> dict[int, dict[str, str]]:
    """The session's speculation records: number -> {state, turn, text, ...}."""
    r = connect(url)
    try:
        raw = await r.hgetall(Keys().session(sid, "spec"))
        entries = {}
        for name in ("spec_reply", "spec_voice"):
            entries[name] = await r.xrange(Keys().session(sid, name))
    finally:
        await r.aclose()
    out: dict[int, dict[str, str]] = {}
    for k, v in raw.items():
        k, v = k.decode(), v.decode()
        if ":" in k:
            n, field = k.split(":", 1)
            out.setdefault(int(n), {})[field] = v
    for n, rec in out.items():
        rec["entries"] = str(sum(1 for name in entries for eid, _ in entries[name]
                                 if int(eid.decode().split("-")[0]) == n))
    return out


async def one_turn(gateway_url: str, session: str, text: str, word: int | None,
                   pause_s: float):
    frames, end = sentence_with_pause(text, word, pause_s)
    client = await BenchClient.connect(gateway_url)
    try:
        await client.open(session, "guard", R, 1)
        await stream_paced(client, session, frames, end)
        for _ in range(100):  # a loaded machine's STT may lag; positions decide, not clocks
            if any(m.session == session for m, _ in client.final_times):
                break
            await asyncio.sleep(0.1)
        finals = [m for m, _ in client.final_times if m.session == session]
        assert len(finals) == 1, [m.text for m in finals]
        await client.wait_turn(session, 1, timeout=30)
        await asyncio.sleep(0.3)  # anything late (it must not come) would arrive now
        return client.turns[session], list(client.chunks.get(session, [])), \
            client.opened[session].sid
    finally:
        await client.close()


async def test_a_speculation_at_a_mid_sentence_pause_is_cancelled_and_never_heard(
        gateway_url, redis_topology):
    """"Tell me | about the road to the north.": a 600 ms pause after "Tell me" (past the
    250 ms likely end, short of the 800 ms end). The reply started on "Tell me" (the guard's
    fallback line) is cancelled when the player goes on; the client hears only the answer
    to the whole sentence (the north road line), as one gap-free turn."""
    result, chunks, sid = await one_turn(gateway_url, "spec-cancel",
                                         "Tell me about the road to the north.", 2, 0.6)
    assert not turn_problems(result, 1, chunks), turn_problems(result, 1, chunks)
    specs = await speculations(redis_topology.url, sid)
    cancelled = [s for s in specs.values() if s["state"] == "cancelled"]
    assert cancelled, specs
    # the early start really was another answer, so a leak would show in the reply
    assert all(answer(s["text"]) != answer(result.transcript) for s in cancelled), specs
    assert result.reply == answer(result.transcript)
    # its outputs were dropped with it
    assert all(s["entries"] == "0" for s in cancelled), specs
    # the reply audio is the final reply's alone: as long as the same transcript's reply
    # without any speculation (a turn made the way STT leaves one), no more
    base, base_chunks, _ = await crafted_turn(gateway_url, redis_topology.url, "spec-cbase",
                                              result.transcript, dead_speculation=False)
    assert not turn_problems(base, 1, base_chunks)
    problems = turn_problems(result, 1, chunks, baseline=base)
    assert not problems, problems
    assert result.audio_samples > 0


async def test_a_finished_sentence_is_adopted_and_the_turn_is_whole(gateway_url,
                                                                    redis_topology):
    result, chunks, sid = await one_turn(gateway_url, "spec-adopt", "Open the gate, please.",
                                         None, 0.0)
    assert not turn_problems(result, 1, chunks), turn_problems(result, 1, chunks)
    specs = await speculations(redis_topology.url, sid)
    adopted = [s for s in specs.values() if s["state"] == "adopted"]
    assert len(adopted) == 1, specs
    assert adopted[0]["text"] == result.transcript and adopted[0]["turn"] == "1"
    assert adopted[0].get("llm_end") == "done" and adopted[0].get("tts_end") == "done"
    assert result.reply == answer(result.transcript)
    # the turn's own timings say the reply and its voice came from the speculation
    assert "reply_adopted" in result.timings and "voice_adopted" in result.timings


DEAD = "llm@gone:1:dead"  # a consumer with no liveness key: a worker that was killed


def fragments(text: str) -> list[str]:
    """The reply fragments the LLM stage writes for the scripted guard's answer to ``text``."""
    from workers.llm.fragmenter import Fragmenter
    from workers.llm.scripted import _tokens

    frag, out = Fragmenter(), []
    for token in _tokens(answer(text)):
        out += frag.push(token)
    return out + frag.flush()


async def crafted_turn(gateway_url: str, url: str, session: str, text: str,
                       dead_speculation: bool):
    """Turn 1 of a push-to-talk session as STT would leave it (final transcript, LLM job),
    with, when ``dead_speculation``, an adopted speculation whose LLM worker died after its
    first fragment: a test double of a kill -9, made in Redis, for the real fleet's jobs."""
    from parley.client import Client
    from schemas.streams import Job, ReplyEntry, TranscriptEntry

    keys = Keys()
    client = await Client.connect(gateway_url)
    r = connect(url)
    try:
        await client.open(session, "guard", R, 1, endpoint="client")
        sid = client.opened[session].sid
        adopt = 0
        if dead_speculation:
            adopt = 1
            first = ReplyEntry(segment=0, text=fragments(text)[0]).to_fields()
            await r.hset(keys.session(sid, "spec"), mapping={
                "n": 1, "1:state": "adopted", "1:turn": 1, "1:text": text,
                "1:llm": DEAD})  # no liveness key: that worker is gone
            await r.xadd(keys.session(sid, "spec_reply"), first, id="1-1")
            # and its job, pending in the dead worker's name (added and delivered in one
            # transaction, so no live worker gets it first): a takeover must drop it unrun
            async with r.pipeline(transaction=True) as p:
                p.xadd(keys.jobs("llm"), Job(stage="llm", sid=sid, turn=1, text=text,
                                             spec=1).to_fields())
                p.xreadgroup("llm", DEAD, {keys.jobs("llm"): ">"}, count=1)
                _, got = await p.execute()
            assert Job.from_fields(*got[0][1][0]).spec == 1
        await r.xadd(keys.session(sid, "transcript"),
                     TranscriptEntry(text=text, final=True).to_fields(), id="1-1")
        await r.xadd(keys.jobs("llm"), Job(stage="llm", sid=sid, turn=1, text=text,
                                           adopt=adopt).to_fields())
        await client.wait_turn(session, 1, timeout=30)
        await asyncio.sleep(0.3)
        spec = {k.decode(): v.decode() for k, v in
                (await r.hgetall(keys.session(sid, "spec"))).items()}
        for _ in range(100):  # taken over after claim_idle_ms (1 s) and acked
            if not await r.xpending_range(keys.jobs("llm"), "llm", "-", "+", 10,
                                          consumername=DEAD):
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the dead worker's speculative job is still pending")
        spec["spec_reply"] = await r.xlen(keys.session(sid, "spec_reply"))
        return client.turns[session], list(client.chunks.get(session, [])), spec
    finally:
        await r.aclose()
        await client.close()


async def test_an_adopted_speculation_that_dies_is_finished_by_the_models(gateway_url,
                                                                         redis_topology):
    """Kill -9 safety: the speculation's LLM worker is gone after one fragment (a failure
    injected in Redis: its record, its fragment and its job pending in the dead worker's
    name). The turn's LLM job copies that fragment, marks the speculation abandoned and runs
    the model for the rest; its TTS job speaks it all: the player gets the same whole turn as
    without one. The dead job is taken over and dropped, never run again."""
    text = "open the gate please"
    assert len(fragments(text)) >= 2  # so that the model's part is not empty
    base, base_chunks, _ = await crafted_turn(gateway_url, redis_topology.url, "spec-base",
                                              text, dead_speculation=False)
    assert not turn_problems(base, 1, base_chunks), turn_problems(base, 1, base_chunks)
    result, chunks, spec = await crafted_turn(gateway_url, redis_topology.url, "spec-dead",
                                              text, dead_speculation=True)
    assert spec["1:state"] == "abandoned"
    # its job was taken over and dropped, not run again: no new owner, no new entries
    assert spec["1:llm"] == DEAD and "1:llm_end" not in spec and spec["spec_reply"] == 1
    problems = turn_problems(result, 1, chunks, baseline=base)
    assert not problems, problems
    assert result.reply == answer(text)
