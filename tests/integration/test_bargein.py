"""Barge-in: the player speaks while the NPC talks, or UE cuts the NPC off.

These turns run on a fleet with SIMULATED GPU model timings (LLM 150 ms to first token then
40 tokens/s; TTS 80 ms to first chunk at 0.1 real-time factor): with the offline backends a
reply is fully generated within ~50 ms, so there would be no work left in flight to cancel.
"""

from __future__ import annotations

import asyncio

import pytest
import redis

from benchmarks import simulated
from parley.client import Client
from schemas import protocol as P
from schemas.streams import Keys, VoiceEntry
from tests.conftest import speech
from tests.support.fleet import running_fleet

pytestmark = pytest.mark.slow
PREFIX = "sim"


@pytest.fixture(scope="module")
def sim_fleet(redis_server, tmp_path_factory):
    log = tmp_path_factory.mktemp("simfleet") / "fleet.log"
    # the real recognizer hears the player; LLM and TTS at SIMULATED GPU-class speed, so the
    # reply is still being made when the player cuts in
    env = {"PARLEY_REDIS_PREFIX": PREFIX,
           "PARLEY_LLM_BACKENDS": simulated.ENV["PARLEY_LLM_BACKENDS"],
           "PARLEY_TTS_BACKENDS": simulated.ENV["PARLEY_TTS_BACKENDS"]}
    with running_fleet(redis_server.url, log, env=env) as f:
        yield f


def timing(r, sid: str) -> dict[str, float]:
    raw = r.hgetall(Keys(PREFIX).session(sid, "timing"))
    return {k.decode(): float(v) for k, v in raw.items()}


async def wait_until(cond, timeout=10.0):
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError


async def test_player_barges_in_and_every_stage_stops(sim_fleet):
    url = f"ws://127.0.0.1:{sim_fleet.port}"
    question = speech("Who are you? What is your name?", 16000)
    cut_in = speech("Wait, hello!", 16000)
    client = await Client.connect(url)
    r = redis.from_url(sim_fleet.redis_url)
    try:
        opened = await client.open("npc", "wizard", 16000, 1)
        await client.stream("npc", question, 16000, realtime=True)
        tr = client.turns["npc"]
        await wait_until(lambda: tr.t_first_audio > 0, 15)
        # the player talks over the NPC while its reply is still being generated
        await client.stream("npc", cut_in, 16000, realtime=True)
        try:
            done1 = await client.wait_turn("npc", 1, 15)
            done2 = await client.wait_turn("npc", 2, 30)
        except TimeoutError:
            raise AssertionError([m.to_dict() for m in client.messages]) from None
    finally:
        await client.close()
    stops = [m for m in client.messages if isinstance(m, P.StopPlayback)]
    assert [s.turn for s in stops] == [1]
    assert done1.interrupted and not done2.interrupted
    sid = opened.sid
    t = timing(r, sid)
    # the cancellation reached the stages still working on turn 1 within 150 ms
    assert "1:interrupt" in t and "2:speech_start" in t
    assert t["1:interrupt"] - t["2:speech_start"] < 150
    stopped = {k: v - t["1:interrupt"] for k, v in t.items() if k.startswith("1:stopped_")}
    assert "1:stopped_tts" in stopped, t  # TTS paces its chunks, so it is always mid-turn here
    assert all(ms < 150 for ms in stopped.values()), stopped
    # turn 1's voice never reached its end: TTS stopped instead of finishing the reply
    voice = r.xrange(Keys(PREFIX).session(sid, "voice"), "1-0", f"1-{2**63 - 1}")
    assert not any(VoiceEntry.from_fields(f).end for _, f in voice)
    # the history keeps only the words the player heard before cutting in
    heard = r.hget(Keys(PREFIX).session(sid, "history"), "1:heard").decode()
    reply = [m.text for m in client.messages
             if isinstance(m, P.ReplyText) and m.turn == 1 and not m.final]
    full = " ".join(reply)
    assert len(heard.split()) < len(full.split())
    assert full.replace(",", "").replace(".", "").startswith(
        heard.replace(",", "").replace(".", ""))
    r.close()


async def test_ue_interrupt_cuts_the_turn_and_keeps_what_was_heard(sim_fleet):
    url = f"ws://127.0.0.1:{sim_fleet.port}"
    client = await Client.connect(url)
    r = redis.from_url(sim_fleet.redis_url)
    try:
        opened = await client.open("npc2", "guard", 16000, 1)
        await client.stream("npc2", speech("Who are you?", 16000), 16000, realtime=False)
        tr = client.turns["npc2"]
        await wait_until(lambda: tr.audio_samples > 22050, 15)  # about a second of reply
        await client.send(P.Interrupt(session="npc2", played_samples=22050))
        done = await client.wait_turn("npc2", 1, 10)
    finally:
        await client.close()
    assert done.interrupted
    assert not any(isinstance(m, P.StopPlayback) for m in client.messages)
    heard = r.hget(Keys(PREFIX).session(opened.sid, "history"), "1:heard").decode()
    # the LLM may have been cut before its final message; then the segments sent are the reply
    segments = " ".join(m.text for m in client.messages
                        if isinstance(m, P.ReplyText) and m.turn == 1 and not m.final)
    full = next((m.text for m in client.messages if isinstance(m, P.ReplyText) and m.final),
                segments)
    # one second of speech: a few words, the start of the reply and not all of it
    assert 0 < len(heard.split()) <= 8 < len(full.split()) or len(heard) < len(full), heard
    assert full.startswith(heard), (heard, full)
    r.close()
