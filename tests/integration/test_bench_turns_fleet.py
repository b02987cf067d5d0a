"""A tiny `parley bench turns` on a real fleet (one recording of one's own, hands-free and
push-to-talk), so its fleet path cannot rot, and ``--log`` gives what finds a slow turn: the
row names its session and the log holds that session's turn. Figures: gross bounds only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from benchmarks import turns as T
from benchmarks.speech import speech

pytestmark = pytest.mark.slow


def test_a_recording_is_measured_on_a_fleet_and_its_turn_found_in_the_log(tmp_path, capsys):
    x = speech("Where can I find the blacksmith?", rate=16000)[:, 0].astype(np.float32) / 32768
    sf.write(tmp_path / "ask.wav", x, 16000)
    log = tmp_path / "fleet.jsonl"
    assert T.main(["--audio", str(tmp_path / "ask.wav"), "--configs", "silero-800",
                   "--log", str(log)]) == 0
    out = capsys.readouterr().out
    [row] = [line for line in out.splitlines() if "ask.wav 16k" in line]
    assert "turns 1 " in row and "CUT" not in row and "MISSED" not in row
    assert row.endswith("(session hf0)")
    endpoint = float(row.split(" endpoint ")[1].split()[0])
    assert 700 <= endpoint <= 1000  # the server's own position: silero-800's wait
    last = out.strip().splitlines()[-1]
    assert last.startswith("best=silero-800 ") and " missed=0 " in last
    assert "ptt_p50_ms=nan" not in last  # the push-to-talk row ran too

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert lines[0] == {"event": "bench_config", "config": "silero-800"}
    finals = [e for e in lines if e.get("event") == "utterance_final"
              and e.get("session", "").startswith("hf0.")]
    assert len(finals) == 1 and finals[0]["reason"] == "vad" and finals[0]["turn"] == 1
