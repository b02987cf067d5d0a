"""Every stage fails over mid-turn in a real fleet: each stage's first backend is a test
double that fails partway through its output (tests/failing_backends.py, loaded by its
``package.module:Class`` name), the second is the real default backend, and the player gets
the turn whole: the reply the real backends give, audio and face with no gap or repeat."""

from __future__ import annotations

import pytest

from core.personas import load_personas
from tests.backends.fleet_turn import fleet_turn
from tests.support.turns import check_turn
from workers.llm.scripted import ScriptedPersonaBackend

pytestmark = pytest.mark.slow

DOUBLES = "tests.failing_backends"
ENV = {
    "PARLEY_STT_BACKENDS": f"{DOUBLES}:FailingAfterNFeeds,pocketsphinx",
    "PARLEY_LLM_BACKENDS": f"{DOUBLES}:FailingAfterNTokens,scripted",
    "PARLEY_TTS_BACKENDS": f"{DOUBLES}:FailingAfterNChunks,espeak",
    "PARLEY_LIPSYNC_BACKENDS": f"{DOUBLES}:FailingAfterNFrames,phoneme,audio",
}


async def test_every_stage_fails_over_mid_turn_and_the_turn_is_whole(tmp_path):
    turn = await fleet_turn(tmp_path, ENV, text="Who are you? Tell me about the gate.",
                            ready_s=60, done_s=60)
    assert all(code == 0 for code in turn.codes.values()), (turn.codes, turn.log[-3000:])
    s = check_turn(turn.result)
    persona = load_personas(_personas())["guard"]
    assert s["reply"] == ScriptedPersonaBackend().choose(persona, s["transcript"]), \
        "the reply the real backend gives, no word lost or repeated"
    assert turn.answered_by == "failing-scripted>scripted"
    for stage, double in (("stt", "failing-pocketsphinx"), ("llm", "failing-scripted"),
                          ("tts", "failing-espeak"), ("lipsync", "failing-phoneme")):
        failed = [line for line in turn.log.splitlines()
                  if "backend_failed" in line and double in line]
        assert failed, f"{stage}: the double never failed\n{turn.log[-3000:]}"


def _personas():
    from pathlib import Path

    return Path(__file__).resolve().parents[2] / "personas"
