"""`parley bench load`'s own arithmetic: playback underruns and when a step holds."""

from __future__ import annotations

from benchmarks.load import Step, Turn, judge, summary, underruns


def test_reply_audio_that_keeps_ahead_of_playback_never_underruns():
    # 100 ms chunks arriving every 100 ms: the 100 ms buffer never runs dry
    arrivals = [(0.1 * i, 1600, 16000) for i in range(10)]
    count, end, stall = underruns(arrivals)
    assert count == 0 and stall == 0
    assert abs(end - (0.1 + 1.0)) < 1e-9  # buffer + one second of audio


def test_a_chunk_after_the_audio_ran_dry_is_one_underrun_and_playback_rebuffers():
    arrivals = [(0.0, 1600, 16000), (0.15, 1600, 16000), (1.0, 1600, 16000),
                (1.05, 1600, 16000)]
    count, end, stall = underruns(arrivals)
    assert count == 1  # the third chunk: the first two ran out at 0.3 s
    assert abs(stall - 0.8) < 1e-9  # silent from 0.3 s until 1.1 s (arrival + buffer)
    assert abs(end - (1.0 + 0.1 + 0.2)) < 1e-9


def _step(players: int, latencies: list[float], **kw) -> Step:
    turns = [Turn(player=0, speech_s=2.0, status="completed", latency_ms=x, audio_s=1.0,
                  face_frames=60) for x in latencies]
    args = dict(profile="offline", players=players, idle=0, turns=turns, wall_s=10.0,
                speaking_share=0.25, takeovers=0, dead=0, deaths=0,
                cpu={"stt": 50.0, "gateway": 5.0}, stt_cpu_per_speech_s=0.3)
    args.update(kw)
    return Step(**args)


def test_a_step_holds_within_twice_the_one_player_p95_and_nothing_lost():
    base = _step(1, [100.0, 110.0])
    judge(base, None)
    assert base.holds
    ok = _step(4, [150.0, 200.0])
    judge(ok, base)
    assert ok.holds
    slow = _step(8, [150.0, 400.0])
    judge(slow, base)
    assert not slow.holds
    taken = _step(4, [120.0], takeovers=2)
    judge(taken, base)
    assert not taken.holds and taken.false_takeovers == 2
    lost = _step(4, [120.0])
    lost.turns.append(Turn(player=1, speech_s=2.0, status="failed"))
    judge(lost, base)
    assert not lost.holds and lost.lost == 1


def test_the_summary_line_and_the_stt_ceiling():
    base = _step(1, [100.0])
    judge(base, None)
    two = _step(2, [120.0])
    judge(two, base)
    idle = _step(1, [115.0], idle=500)
    judge(idle, base)
    sim = _step(1, [300.0], profile="sim")
    judge(sim, None)
    lines = summary({"offline": [base, two, idle], "sim": [sim]}, stt_rtf=0.25, memory={},
                    cores=2)
    # 2 cores / (0.25 x 0.25) = 32 players
    assert "= 32.0 players" in lines[0]
    assert lines[-1] == ("players_max=2 sim_players_max=1 idle_sessions=500 false_takeovers=0 "
                         "lost_turns=0 stt_rtf=0.250")
