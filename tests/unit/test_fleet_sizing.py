"""`parley up --workers auto|N`: how many processes each stage gets."""

from __future__ import annotations

import pytest

from parley.cli import main
from parley.fleet import auto_workers, worker_counts


def test_auto_gives_stt_a_process_per_core_and_the_light_stages_one():
    assert auto_workers(1) == {"stt": 1, "llm": 1, "tts": 1, "lipsync": 1}
    assert auto_workers(2) == {"stt": 2, "llm": 1, "tts": 1, "lipsync": 1}
    assert auto_workers(16) == {"stt": 16, "llm": 3, "tts": 3, "lipsync": 3}


def test_a_number_still_means_that_many_per_stage():
    assert worker_counts(3) == {"stt": 3, "llm": 3, "tts": 3, "lipsync": 3}
    assert worker_counts("2") == dict.fromkeys(("stt", "llm", "tts", "lipsync"), 2)
    assert worker_counts("AUTO", cores=4)["stt"] == 4


@pytest.mark.parametrize("bad", ["0", "-1", "many"])
def test_a_bad_workers_value_is_refused_by_the_cli(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["up", "--workers", bad])
    assert exc.value.code == 2
    assert "auto or a number" in capsys.readouterr().err
