"""Backends named ``package.module:Class``: each stage loads the benchmarks' simulated ones."""

from __future__ import annotations

import pytest

from core.config import Config
from workers.registry import load_object


def test_load_object_and_its_errors():
    assert load_object("workers.registry:load_object") is load_object
    with pytest.raises(ValueError):
        load_object("workers.registry")
    with pytest.raises(ValueError):
        load_object("no_such_package.mod:Thing")
    with pytest.raises(ValueError):
        load_object("workers.registry:Nothing")


def test_each_stage_loads_a_backend_by_reference():
    from workers.llm.stage import make_backend as llm
    from workers.stt.stage import make_backend as stt
    from workers.tts.stage import make_backend as tts

    config = Config.load(env={})
    recognizer = stt("benchmarks.simulated:SimulatedRecognizer", config)
    recognizer.warm()
    stream = recognizer.open_stream()
    assert stream.feed(None) is None
    assert stream.finish() == "Hello there. Who are you?"
    assert llm("benchmarks.simulated:SimulatedLlm", config).name == "simulated-llm"
    voice = tts("benchmarks.simulated:SimulatedTts", config)
    chunks = list(voice.synthesize("Halt."))
    assert sum(len(c.pcm) for c in chunks) > voice.sample_rate // 10  # real PCM
    assert any(c.phonemes for c in chunks)  # marks, so lipsync runs as it does for espeak
