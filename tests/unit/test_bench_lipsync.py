from __future__ import annotations

import re

from benchmarks import lipsync

SHORT = ("Bob paid the man.", "Maybe mop the lamp.", "Put it back, Pam.")
LAST = re.compile(
    r"closure_recall=(?P<cr>[01]\.\d+) jaw_corr=(?P<jc>-?[01]\.\d+) "
    r"lookahead_ms=(?P<la>\d+\.\d+) frames_per_s=(?P<fps>\d+)"
)


def test_benchmark_runs_and_reports(capsys) -> None:
    lipsync.main(list(SHORT))
    lines = capsys.readouterr().out.strip().splitlines()
    m = LAST.fullmatch(lines[-1])
    assert m, lines[-1]
    assert 0.0 <= float(m["cr"]) <= 1.0 and -1.0 <= float(m["jc"]) <= 1.0
    assert 0.0 < float(m["la"]) <= 100.0 and int(m["fps"]) > 0
    assert any(line.startswith("phoneme") for line in lines)


def test_phoneme_driven_closes_every_bilabial() -> None:
    r = lipsync.run(list(SHORT))
    ph = r["methods"]["phoneme"]
    assert ph["bilabials"] >= 20  # 10 per voice
    assert ph["closure_recall"] >= 0.95
    assert ph["false_closure"] <= 0.1
    assert r["methods"]["baseline"]["jaw_corr"] < 1.0 and not r["unknown_phonemes"]
