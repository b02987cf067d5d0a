"""`parley bench bake`'s table and summary line (the run itself needs a fleet: see the docs)."""

from __future__ import annotations

from benchmarks.bake import render, summary


def _result() -> dict:
    return {"cores": 2, "bake_workers": 2, "turns": 3, "loadavg_before": 1.0,
            "loadavg_after": 1.5,
            "bake_alone": {"lines": 60, "s": 10.0, "lines_per_s": 6.0, "audio_x": 30.0,
                           "cpu_s_per_line": 0.061, "audio_s_per_line": 5.2},
            "live": {"latency": [400.0, 500.0, 600.0], "failed": 0},
            "bake_live": {"latency": [450.0, 550.0, 650.0], "failed": 0,
                          "bake_lines_per_s": 1.5},
            "unyielding": {"latency": [900.0, 1000.0, 3000.0], "failed": 1,
                           "bake_lines_per_s": 4.0}}


def test_table_rows_and_one_summary_line():
    text = render(_result())
    assert "bake alone" in text and "2 idle cores would bake 32.8 lines/s" in text
    assert "live + bake, not yielding (baseline)" in text and "(1 failed)" in text
    line = summary(_result())
    assert "\n" not in line
    fields = dict(kv.split("=") for kv in line.split())
    assert fields["bake_lines_per_s"] == "6.00" and fields["bake_cpu_ms_per_line"] == "61"
    assert fields["live_p50_ms"] == "500" and fields["bake_live_p50_ms"] == "550"
    assert fields["unyielding_p95_ms"] == "2800"
    assert fields["bake_during_live_lines_per_s"] == "1.50"
