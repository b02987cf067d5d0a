"""The likely end of a turn, Sans-I/O: the listener says Likely after ``speculate_ms`` of
silence inside an utterance (so STT can start the reply early) and Resumed when the speaker
goes on, on synthesized speech with known boundaries; and the comparison of early and final
words."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.test_endpointing import R, feed, needs_silero, speech
from workers.speculation import norm
from workers.stt.listener import Check, End, Likely, Listener, ListenerConfig, Resumed, Start


def make(vad: str = "energy", client_ends: bool = False, **kw) -> Listener:
    cfg = ListenerConfig(vad=vad, **{"silence_ms": 800, "speculate_ms": 250, **kw})
    return Listener(R, 1, "s16le", cfg, client_ends=client_ends)


def at(actions, kind):
    """(16 kHz position after the chunk, action) of each action of ``kind``."""
    return [(seq * 320, a) for seq, a in actions if isinstance(a, kind)]


LEAD = R // 2


@pytest.mark.parametrize("vad", ["energy", pytest.param("silero", marks=needs_silero)])
def test_a_finished_sentence_is_likely_once_then_ends_with_no_resume(vad):
    s, [(_, b)] = speech("I want the sword.")
    x = np.concatenate([np.zeros(LEAD, np.float32), s, np.zeros(R, np.float32)])
    actions = feed(make(vad), x)
    [(t_likely, likely)] = at(actions, Likely)
    [(t_end, end)] = at(actions, End)
    assert not at(actions, Resumed)
    assert end.reason == "vad"
    # the pause it names is where speech ended (Silero's end lags the last sample ~100 ms)
    assert -0.05 * R <= likely.pause - (LEAD + b) <= 0.15 * R
    # said speculate_ms into the silence, 550 ms before the end (silence_ms 800)
    assert 0.25 * R <= t_likely - likely.pause <= 0.25 * R + 2 * 512
    assert 0.5 * R <= t_end - t_likely <= 0.6 * R
    assert likely.ts == float(t_likely // 320)


@pytest.mark.parametrize("vad", ["energy", pytest.param("silero", marks=needs_silero)])
def test_a_pause_longer_than_speculate_ms_is_likely_then_resumed_and_one_turn(vad):
    """A 500 ms pause inside the sentence: Likely in it, Resumed when the speaker goes on,
    Likely again after the last word, and one End: the early start at the pause is void."""
    s, [(_, b1), (a2, b2)] = speech("I want the sword from the blacksmith.", 2, 0.5)
    x = np.concatenate([np.zeros(LEAD, np.float32), s, np.zeros(R, np.float32)])
    actions = feed(make(vad), x)
    kinds = [type(a).__name__ for _, a in actions if type(a).__name__ != "Feed"]
    assert kinds == ["Start", "Likely", "Resumed", "Likely", "End"], kinds
    (t1, first), (t2, second) = at(actions, Likely)
    [(t_resumed, resumed)] = at(actions, Resumed)
    assert resumed.pause == first.pause
    assert -0.05 * R <= first.pause - (LEAD + b1) <= 0.15 * R
    # resumed as soon as the VAD hears speech again (its resume run), not later
    assert 0 <= t_resumed - (LEAD + a2) <= 0.2 * R
    assert -0.05 * R <= second.pause - (LEAD + b2) <= 0.15 * R
    assert t1 < t_resumed < t2


def test_a_pause_shorter_than_speculate_ms_is_not_likely():
    s, _ = speech("I want the sword from the blacksmith.", 2, 0.15)
    x = np.concatenate([np.zeros(LEAD, np.float32), s, np.zeros(R, np.float32)])
    actions = feed(make("energy"), x)
    assert len(at(actions, Likely)) == 1 and not at(actions, Resumed)


def test_off_at_zero_and_for_push_to_talk():
    s, _ = speech("I want the sword from the blacksmith.", 2, 0.5)
    x = np.concatenate([np.zeros(LEAD, np.float32), s, np.zeros(R, np.float32)])
    for lis in (make(speculate_ms=0), make(client_ends=True)):
        actions = feed(lis, x)
        assert at(actions, Start) and not at(actions, Likely) and not at(actions, Resumed)


def test_with_the_end_of_turn_model_the_pause_it_asks_about_is_likely_too():
    """With a model, the VAD ends at turn_pause_ms and the listener holds the pause itself:
    Likely still comes speculate_ms into it, and Resumed when the speaker goes on."""
    s, [(_, b1), (a2, _)] = speech("I want the sword from the blacksmith.", 2, 0.6)
    x = np.concatenate([np.zeros(LEAD, np.float32), s, np.zeros(2 * R, np.float32)])
    lis = make(turn_model=True, turn_pause_ms=200, turn_max_silence_ms=1000)
    actions = feed(lis, x)  # nobody answers the checks: the silence cap ends it
    kinds = [type(a).__name__ for _, a in actions if type(a).__name__ not in ("Feed",)]
    assert kinds == ["Start", "Check", "Likely", "Resumed", "Check", "Likely", "End"], kinds
    [(_, first), _] = at(actions, Likely)
    [(_, check), _] = at(actions, Check)
    assert first.pause == check.pause
    assert abs(first.pause - (LEAD + b1)) <= 0.1 * R
    [(t_res, _)] = at(actions, Resumed)
    assert 0 <= t_res - (LEAD + a2) <= 0.2 * R


def test_an_end_clears_the_likely_pause_for_the_next_utterance():
    s, _ = speech("Open the gate.")
    x = np.concatenate([np.zeros(LEAD, np.float32), s, np.zeros(R, np.float32)])
    lis = make()
    first = feed(lis, x)
    lis.utterance_done()
    again = feed(lis, x, seq0=len(x) // 320 + 10)
    for actions in (first, again):
        assert [type(a).__name__ for _, a in actions if type(a).__name__ in
                ("Likely", "Resumed", "End")] == ["Likely", "End"]


def test_words_compare_without_case_or_spacing():
    assert norm(" Open  the gate ") == norm("open the GATE") == "open the gate"
    assert norm("open the gate") != norm("open the gates")
