"""Vad: start/end of speech over 16 kHz mono float32, in any chunking."""

import numpy as np
import pytest

from benchmarks.speech import speech_16k
from workers.stt.vad import Vad, VadEvent

R = 16000
FRAME = 320  # 20 ms


def silence(seconds):
    return np.zeros(int(seconds * R), np.float32)


def noise(seconds, db, seed=0):
    x = np.random.default_rng(seed).standard_normal(int(seconds * R))
    return (x * 10 ** (db / 20)).astype(np.float32)


def tone(seconds, amp=0.3, freq=220):
    t = np.arange(int(seconds * R)) / R
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def push_chunked(vad, x, size):
    """Push in chunks of `size`; return (event, vad.position when it was reported) pairs."""
    out = []
    for i in range(0, len(x), size):
        out += [(ev, vad.position) for ev in vad.push(x[i:i + size])]
    return out


@pytest.mark.parametrize("x", [
    silence(3), noise(3, -70), noise(3, -40), 0.01 * np.sin(2 * np.pi * 50 * np.arange(3 * R) / R),
], ids=["digital-silence", "faint-noise", "steady-noise", "mains-hum"])
def test_no_speech_no_events(x):
    vad = Vad()
    assert vad.push(x.astype(np.float32)) == []
    assert not vad.in_speech and vad.position == len(x)


def test_burst_start_and_end_positions_and_report_delays():
    start, length = R // 2 + 37, R // 2  # not frame aligned
    x = np.concatenate([silence(0.5), np.zeros(37, np.float32), tone(0.5), silence(1.0)])
    events = push_chunked(Vad(start_ms=60, silence_ms=500), x, FRAME)
    assert [ev.kind for ev, _ in events] == ["start", "end"]
    (s, s_at), (e, e_at) = events
    assert abs(s.sample - start) <= FRAME
    assert abs(e.sample - (start + length)) <= FRAME
    # Reported once start_ms of voiced audio / silence_ms of silence has been seen.
    assert 0.060 * R <= s_at - s.sample <= 0.060 * R + 2 * FRAME
    assert 0.500 * R <= e_at - e.sample <= 0.500 * R + 2 * FRAME


def test_positions_hold_in_background_noise():
    x = np.concatenate([silence(1.0), tone(0.8), silence(1.0)]) + noise(2.8, -50)
    events = Vad().push(x)
    assert [ev.kind for ev in events] == ["start", "end"]
    assert abs(events[0].sample - R) <= FRAME
    assert abs(events[1].sample - int(1.8 * R)) <= 2 * FRAME


@pytest.mark.parametrize("pause_s,silence_ms,pairs", [
    (0.3, 500, 1), (0.45, 500, 1), (0.8, 500, 2), (0.3, 250, 2), (0.8, 1000, 1),
])
def test_pauses_shorter_than_silence_ms_stay_inside_the_utterance(pause_s, silence_ms, pairs):
    x = np.concatenate([silence(0.5), tone(0.4), silence(pause_s), tone(0.4), silence(1.5)])
    events = Vad(silence_ms=silence_ms).push(x)
    assert [ev.kind for ev in events] == ["start", "end"] * pairs


def test_blip_shorter_than_start_ms_is_not_speech():
    x = np.concatenate([silence(0.5), tone(0.04), silence(1.0)])
    assert Vad(start_ms=60).push(x) == []
    assert [ev.kind for ev in Vad(start_ms=20).push(x)] == ["start", "end"]


@pytest.mark.parametrize("amp_db,speech", [(-45, True), (-60, False)])
def test_absolute_minimum_level(amp_db, speech):
    # In digital silence the floor is -100 dB; only min_level_db (-55) separates a quiet
    # talker from a faint hum.
    x = np.concatenate([silence(0.5), tone(0.5, amp=10 ** (amp_db / 20) * np.sqrt(2)),
                        silence(1.0)])
    assert bool(Vad().push(x)) is speech


def test_any_chunking_gives_the_same_events():
    x = np.concatenate([silence(0.3), tone(0.5), silence(0.3), tone(0.2), silence(0.7),
                        tone(0.3), silence(0.6)]) + noise(2.9, -55, seed=3)
    reference = Vad().push(x)
    assert [ev.kind for ev in reference] == ["start", "end", "start", "end"]
    rng = np.random.default_rng(11)
    vad, got, i = Vad(), [], 0
    while i < len(x):
        n = int(rng.integers(1, 1500))
        got += vad.push(x[i:i + n])
        i += n
    assert got == reference and vad.position == len(x) // FRAME * FRAME
    vad = Vad()
    ones = [ev for k in range(0, 16000) for ev in vad.push(x[k:k + 1])]
    assert ones == [ev for ev in reference if ev.sample < 16000 - 0.5 * R]


def test_keyboard_clicks_do_not_hold_the_utterance_open():
    x = np.concatenate([silence(0.5), tone(0.5), silence(3.0)])
    click = 0.5 * np.exp(-np.arange(80) / 15) * np.random.default_rng(1).standard_normal(80)
    for at in range(R + 2000, len(x) - 100, 3200):  # every 200 ms after the speech
        x[at:at + 80] += click.astype(np.float32)
    events = Vad().push(x)
    assert [ev.kind for ev in events] == ["start", "end"]
    assert abs(events[1].sample - R) <= FRAME


def test_long_pause_free_speech_is_not_cut_by_the_floor_window():
    # 6 s of syllable-like modulation (4 Hz, ~20 dB deep) without a single pause: longer than
    # the 2 s floor window, so a floor that simply followed the window minimum would end it.
    t = np.arange(6 * R) / R
    env = 0.1 + 0.9 * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) ** 2
    speechy = (0.2 * env * np.sin(2 * np.pi * 180 * t)).astype(np.float32)
    x = np.concatenate([silence(1.0), speechy, silence(1.0)]) + noise(8.0, -50)
    events = Vad().push(x)
    assert [ev.kind for ev in events] == ["start", "end"]
    assert events[1].sample > 6.8 * R


def test_a_noise_step_does_not_hold_speech_forever():
    x = np.concatenate([noise(2.0, -70), noise(6.0, -30, seed=1)])
    vad = Vad()
    events = vad.push(x)
    assert not vad.in_speech and len(events) % 2 == 0
    for start, end in zip(events[::2], events[1::2], strict=True):
        assert start.kind == "start" and end.kind == "end"
        assert end.sample - start.sample < 3 * R


def test_real_speech_with_a_comma_pause_is_one_utterance():
    speech = speech_16k("Hello there, how are you today?")
    voiced = np.flatnonzero(np.abs(speech) > 1e-2)
    x = np.concatenate([silence(1.0), speech, silence(1.0)])
    x = x + noise(len(x) / R, -60)
    events = Vad().push(x)
    assert [ev.kind for ev in events] == ["start", "end"]
    assert abs(events[0].sample - (R + voiced[0])) <= 3 * FRAME
    assert abs(events[1].sample - (R + voiced[-1])) <= 8 * FRAME


def test_events_are_plain_values():
    assert VadEvent("start", 320) == VadEvent("start", 320)
    with pytest.raises(AttributeError):
        VadEvent("end", 1).sample = 2  # frozen


@pytest.mark.parametrize("kwargs", [{"frame_ms": 0}, {"rate": 44100, "frame_ms": 15},
                                    {"silence_ms": -1}, {"floor_window_ms": 0}])
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        Vad(**kwargs)
