"""`parley bench failover --quick` (single Redis, one turn with a kill -9 and one without), so
the benchmark cannot rot; and its report line. Its figures are not checked beyond gross
bounds."""

from __future__ import annotations

import re

import pytest

from benchmarks.failover import Case, Turn, main, parse_args, report

pytestmark = pytest.mark.slow


def test_quick_failover_bench_runs_a_kill_and_a_baseline_turn(capsys, tmp_path):
    assert main(["--quick", "--log-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.startswith("single ")]
    # each case as it ends, then the table again after the run
    assert [(r[0], r[1]) for r in rows] == [("single", "reply")] * 2
    assert rows[0][5] == "1/0/0"
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"topologies=single turns=1 completed=1 lost=0 duplicated=0 gaps=0 "
                     r"writable_max_s=(?P<w>[\d.]+) added_max_s=(?P<a>-?[\d.]+)", last)
    assert m, last
    assert 0 <= float(m["w"]) < 15


def test_report_counts_lost_and_duplicated_turns():
    c = Case("cluster", "reply", [Turn(False, 1.0), Turn(True, 3.5, writable=2.5),
                                  Turn(True, None, writable=2.8),
                                  Turn(True, 2.0, writable=2.6, duplicates=1, gaps=2)])
    assert report([c], ["cluster"]) == (
        "topologies=cluster turns=3 completed=2 lost=1 duplicated=1 gaps=2 "
        "writable_max_s=2.80 added_max_s=2.50")
    assert "2/1/1" in c.row()
    args = parse_args(["--quick"])
    assert (args.topologies, args.cases, args.turns) == ("single", "reply", 1)
