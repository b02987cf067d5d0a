from benchmarks.player import material, report


def test_report_has_a_row_per_material_and_player_and_ends_with_the_summary_line():
    text = report({("jfk.flac", "named"): [10.0, 12.0], ("jfk.flac", "unnamed"): [200.0, 400.0],
                   ("espeak-ng", "named"): [8.0], ("espeak-ng", "unnamed"): [11.0]})
    lines = text.splitlines()
    assert len([ln for ln in lines if ln.startswith(("jfk.flac", "espeak-ng"))]) == 4
    assert lines[-1].startswith("named_p50_ms=10 ")
    assert "unnamed_p50_ms=" in lines[-1]


def test_the_questions_are_shorter_than_what_the_first_npc_hears():
    for first, questions in material().values():
        assert questions and all(0 < len(q) < len(first) for q in questions)
