"""The Sans-I/O parts of replay and trace: planning the client's events, the comparison, the
waterfall, the recording file."""

from __future__ import annotations

from parley import recording as R
from parley.replay import compare, plan, render
from parley.trace import render as render_trace
from parley.trace import turn_trace
from schemas.streams import ControlEntry, MicEntry

T0 = 1_000_000.0


def _rec(events: list[dict], turns: dict[int, R.TurnOutcome] | None = None) -> R.Recording:
    meta = {"npc": "guard", "persona": "guard", "sample_rate": 16000, "channels": 1,
            "format": "s16le", "endpoint": "vad", "seed": "npc.1"}
    frames = sum(e.get("n", 0) for e in events)
    return R.Recording("npc.1", meta, events, b"\0\0" * frames, turns or {})


def _mic(t: float, seq: int) -> dict:
    return {"t": T0 + t, "kind": "mic", "seq": seq, "frame": (seq - 1) * 320, "n": 320}


def _outcome(turn: int, **kw) -> R.TurnOutcome:
    base = dict(transcript="who are you", reply="The name is Brannoc.", reply_rate=22050,
                audio_samples=44100, audio_sha="a" * 16, face_frames=120, face_sha="f" * 16)
    return R.TurnOutcome(turn=turn, **(base | kw))


def test_merge_orders_mic_and_control_by_arrival():
    mic = [MicEntry(1, pcm=b"\1\0" * 320, ts=T0), MicEntry(2, pcm=b"\2\0" * 320, ts=T0 + 20),
           MicEntry(2, end_of_utterance=True, ts=T0 + 21)]
    control = [ControlEntry("open", ts=T0 - 5, data={"npc": "guard"}),
               ControlEntry("ready", ts=T0 + 10, turn=1, segment=0)]
    events, audio = R.merge_events(mic, control, 2)
    assert [e["kind"] for e in events] == ["open", "mic", "ready", "mic", "end_of_utterance"]
    assert audio[:2] == b"\1\0" and len(audio) == 4 * 320
    assert events[3]["frame"] == 320


def test_plan_waits_for_what_each_event_answered_and_keeps_barge_in_offsets():
    turn1 = _outcome(1, audio_samples=44100)  # 2 s of reply
    events = [
        _mic(0, 1), _mic(20, 2),
        {"t": T0 + 1000, "kind": "ready", "turn": 1, "segment": 0},
        _mic(1500, 3),  # 0.5 s into the reply: the player talks over it
        {"t": T0 + 1700, "kind": "interrupt", "turn": 1, "played": 15000, "code": "answer"},
        _mic(5000, 4),  # long after the reply ended
        {"t": T0 + 9000, "kind": "close"},
    ]
    fast = plan(_rec(events, {1: turn1}), fast=True)
    ready, barge, cut, later, close = fast[2:]
    assert ready.needs == [("audio", 1, 0)]
    assert barge.anchor == 1 and barge.delay_ms == 500
    assert cut.needs == [("stop", 1)] and cut.anchor is None
    assert ("played", 1) in later.needs and later.delay_ms < 20
    assert ("done", 1) in close.needs
    real = plan(_rec(events, {1: turn1}), fast=False)
    assert real[5].delay_ms == 3300  # the recorded gap


def test_fast_mic_stays_under_the_gateway_audio_limit():
    steps = plan(_rec([_mic(i * 20, i + 1) for i in range(5)]), fast=True)
    assert all(0 < s.delay_ms <= 20 / 8 for s in steps[1:])


def test_compare_marks_what_differs_and_only_what_ue_played_of_a_cut_turn():
    a = {1: _outcome(1), 2: _outcome(2, interrupted=True, played=100, heard="The name",
                                     played_sha="p" * 16, played_face_sha="q" * 16)}
    b = {1: _outcome(1, reply="Speak up."),
         2: _outcome(2, interrupted=True, played=100, heard="The name", played_sha="p" * 16,
                     played_face_sha="q" * 16, audio_sha="b" * 16, audio_samples=40000)}
    report = compare(a, b)
    assert report.differing == [1]
    text = render(report)
    assert "≠ reply" in text and "~ audio" in text
    assert "turns=2 identical=1 differing=1 (1)" in text


def test_trace_names_the_slowest_step_and_never_goes_negative():
    o = _outcome(1, timings={"eos": 0.0, "final_transcript": 300.0, "first_token": 310.0,
                             "first_fragment": 312.0, "tts_first_chunk": 360.0,
                             "gw_first_audio": 358.0, "ready": 365.0, "first_face": 380.0,
                             "gw_first_face": 381.0, "stt_finish_ms": 40.0})
    tr = turn_trace(o)
    assert tr["slowest"] == {"mark": "final_transcript", "owner": "stt", "step_ms": 300.0}
    assert all(s["step_ms"] >= 0 for s in tr["steps"])
    assert "stt backend 40 ms" in render_trace([tr])
    assert turn_trace(_outcome(2))["steps"] == []


def test_a_recording_file_round_trips(tmp_path):
    rec = _rec([{"t": T0, "kind": "open", "data": {"npc": "guard"}}, _mic(0, 1)],
               {1: _outcome(1, heard="The")})
    rec.mic = bytes(range(256)) * 2 + b"\0" * 128
    back = R.read_file(R.write_file(rec, tmp_path / "x.parley"))
    assert back.mic == rec.mic and back.events == rec.events and back.turns == rec.turns
    (tmp_path / "bad").write_text("no zip")
    try:
        R.read_file(tmp_path / "bad")
    except ValueError as exc:
        assert "not a Parley recording" in str(exc)
    else:
        raise AssertionError("read a file that is no recording")
