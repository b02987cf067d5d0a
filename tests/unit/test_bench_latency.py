from benchmarks.latency import LENGTHS, report


def test_report_ends_with_the_summary_line_for_three_sentence_replies():
    def rows(ttfa, overhead):
        return [{"sentences": n, "ttfa_ms": ttfa * n, "first_face_ms": 4.0, "server_ms": ttfa,
                 "backend_ms": 1.0, "overhead_ms": overhead, "gaps": 0, "dups": 0}
                for n in LENGTHS for _ in range(3)]

    text = report({("streaming", ""): rows(20.0, 3.0), ("sequential", ""): rows(500.0, 90.0)})
    last = text.splitlines()[-1]
    assert last == ("ttfa_p50_ms=60.0 baseline_ttfa_p50_ms=1500.0 ratio=25.00 "
                    "overhead_p50_ms=3.00")
