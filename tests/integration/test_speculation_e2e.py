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
    open_when_admitted,
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
        await open_when_admitted(client, session)
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
    # the reply audio is the final reply's alone: as long as its own rendering, no more
    assert result.audio_samples > 0
    assert result.done["audio_samples"] == result.audio_samples


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
