"""benchmarks/gpu_check.py on the CPU: the script a GPU session runs first must not rot.

Only ``--cpu`` runs here (CI has no GPU). faster-whisper runs for real on a random tiny
Whisper; in this environment vLLM and coqui-tts are not installed, so their parts must say why
they skip, not fail. The parts themselves run in their own environments
(scripts/backend-env.sh) with ``python -m benchmarks.gpu_check --cpu --only PART``.
"""

from __future__ import annotations

import importlib.util

import pytest

from benchmarks import gpu_check
from benchmarks.random_models import build_llama


def test_cpu_run_measures_faster_whisper_and_says_why_others_skip(capsys, tmp_path):
    pytest.importorskip("faster_whisper")
    pytest.importorskip("transformers")
    rc = gpu_check.main(["--cpu", "--only", "stt-faster-whisper,llm,tts",
                         "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "random Whisper, tiny shapes; int8 on cpu" in out
    assert "real-time factor" in out
    if importlib.util.find_spec("vllm") is None:
        assert "[llm-vllm]\n  skipped: " in out
    if importlib.util.find_spec("TTS") is None:
        assert "[tts-coqui]\n  skipped: " in out
    assert "failed:" not in out


def test_unknown_model_size_is_refused(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="unknown size '7b'; one of tiny, 1b"):
        build_llama(tmp_path / "m", size="7b")
