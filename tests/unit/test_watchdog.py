"""The per-turn watchdog's decision (gateway/watchdog.py), without I/O."""

from __future__ import annotations

from gateway.watchdog import (
    MAX_REISSUES,
    GiveUp,
    Reissue,
    SessionView,
    Top,
    TurnWatchdog,
    in_flight,
    parse_tops,
    stalled_stage,
)

STALL = 3.0


NONE, FINAL = Top(), Top(1, 4, True)


def view(reply=NONE, voice=NONE, face=NONE, transcript=FINAL, **kw) -> SessionView:
    return SessionView(transcript=transcript, reply=reply, voice=voice, face=face, **kw)


def run(dog: TurnWatchdog, v: SessionView, times: list[float], sid: str = "s"):
    return [dog.observe(sid, v, t) for t in times]


LOST_FACE_END = view(Top(1, 3, True), Top(1, 40, True), Top(1, 7))


def test_a_stalled_turn_is_reissued_after_stall_s_without_progress():
    dog = TurnWatchdog(STALL)
    got = run(dog, LOST_FACE_END, [0.0, 1.0, 2.9, 3.0])
    assert got[:3] == [None, None, None]
    assert got[3] == Reissue("s", 1, "lipsync", ("stt", "llm", "tts", "lipsync"),
                             {"reply": 3, "voice": 40, "face": 7}, 0)


def test_progress_restarts_the_clock():
    dog = TurnWatchdog(STALL)
    assert dog.observe("s", view(Top(1, 3, True), Top(1, 40, True), Top(1, 6)), 0.0) is None
    assert dog.observe("s", LOST_FACE_END, 2.0) is None  # face moved on: slow, not stalled
    assert dog.observe("s", LOST_FACE_END, 4.0) is None
    assert isinstance(dog.observe("s", LOST_FACE_END, 5.0), Reissue)


def test_the_stalled_stage_is_the_first_without_its_end_marker():
    cases = {
        "llm": view(Top(1, 2)),  # reply stopped short
        "tts": view(Top(1, 3, True), Top(1, 12), Top(1, 3)),
        "lipsync": LOST_FACE_END,
    }
    for stage, v in cases.items():
        assert stalled_stage(v, 1) == stage
    # nothing of the turn yet downstream: the final transcript alone makes it in flight
    assert stalled_stage(view(), 1) == "llm" and in_flight(view()) == 1
    # the reply of the turn before is no output of this one
    assert stalled_stage(view(Top(1, 3, True), Top(1, 9, True), Top(1, 5, True),
                              transcript=Top(2, 3, True)), 2) == "llm"
    d = run(TurnWatchdog(STALL), view(Top(1, 3, True), Top(1, 12)), [0.0, 3.0])[1]
    assert d.stage == "tts" and d.stages == ("stt", "llm", "tts")
    assert d.published == {"reply": 3, "voice": 12, "face": 0}


def test_nothing_owed_nothing_done():
    done = view(Top(1, 3, True), Top(1, 40, True), Top(1, 8, True))
    talking = SessionView(transcript=Top(2, 5, False), reply=Top(1, 3, True),
                          voice=Top(1, 40, True), face=Top(1, 8, True))
    interrupted = view(Top(1, 2), Top(1, 9), Top(1, 3), cancelled=1)
    failed = view(Top(1, 2), ended=frozenset({1}))
    for v in (done, talking, interrupted, failed, SessionView()):
        dog = TurnWatchdog(STALL)
        assert run(dog, v, [0.0, 5.0, 10.0, 60.0]) == [None] * 4
        assert not dog.watches


def test_reissues_are_spaced_and_capped():
    dog = TurnWatchdog(STALL)
    times = [0.0, 3.0, 4.0, 6.0, 9.0, 12.0, 15.0]
    got = []
    for t in times:
        d = dog.observe("s", LOST_FACE_END, t)
        got.append(d)
        if isinstance(d, Reissue):
            dog.reissued("s", d.stage)
    kinds = [type(d).__name__ if d else None for d in got]
    assert kinds == [None, "Reissue", None, "Reissue", "GiveUp", None, None]
    assert MAX_REISSUES == 2
    assert got[4] == GiveUp("s", 1, "lipsync")


def test_a_busy_fleet_does_not_count_as_a_reissue():
    """When the I/O finds a job of the turn still in the fleet it does not call reissued():
    the watchdog asks again a stall later, without giving up."""
    dog = TurnWatchdog(STALL)
    got = run(dog, LOST_FACE_END, [0.0, 3.0, 6.0, 9.0, 12.0])
    assert [type(d).__name__ for d in got[1:]] == ["Reissue"] * 4


def test_a_new_turn_and_sessions_let_go():
    dog = TurnWatchdog(STALL)
    dog.observe("a", LOST_FACE_END, 0.0)
    dog.observe("b", LOST_FACE_END, 0.0)
    dog.forget(["a"])
    assert set(dog.watches) == {"a"}
    nxt = view(Top(2, 1), Top(1, 40, True), Top(1, 8, True), transcript=Top(2, 4, True))
    assert dog.observe("a", nxt, 3.5) is None  # turn 2 starts its own clock
    assert dog.watches["a"].turn == 2


def test_parse_tops():
    raw = [b"1-5", b"1", b"2-3", b"0", b"2-9", b"3", b"", b"0", b"1", [b"1", b"3"]]
    v = parse_tops(raw)
    assert v == SessionView(transcript=Top(1, 5, True), reply=Top(2, 3, False),
                            voice=Top(2, 9, True), face=Top(), cancelled=1,
                            ended=frozenset({1, 3}))
    assert parse_tops([b"2-9", b"2", b"", b"", b"", b"", b"", b"", b"0", []]).voice == Top()
