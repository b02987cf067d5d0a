"""A tiny `parley bench load` (one player, both profiles, a few idle sessions), so the
benchmark cannot rot. Its figures are not checked beyond gross bounds."""

from __future__ import annotations

import re

import pytest

from benchmarks.load import main

pytestmark = pytest.mark.slow


def test_tiny_load_benchmark_runs_both_profiles_and_prints_its_line(capsys):
    assert main(["--profiles", "offline,sim", "--steps", "1", "--sim-steps", "1",
                 "--step-s", "3", "--stagger-s", "0", "--idle", "3", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()
            if line.startswith(("offline ", "sim "))]
    assert [(r[0], r[1], r[2]) for r in rows] == [("offline", "1", "0"), ("offline", "1", "3"),
                                                 ("sim", "1", "0")]
    for r in rows:
        assert int(r[3]) >= 1  # turns
        assert 55 <= float(r[9]) <= 65  # face frames per second of reply audio
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"players_max=\d+ sim_players_max=\d+ idle_sessions=\d+ "
                     r"false_takeovers=(?P<false>\d+) lost_turns=(?P<lost>\d+) "
                     r"stt_rtf=(?P<rtf>[\d.]+)", last)
    assert m, last
    assert int(m["lost"]) == 0 and int(m["false"]) == 0
    assert 0 < float(m["rtf"]) < 5
    assert "STT ceiling" in out and "per idle session" in out
