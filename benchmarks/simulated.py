"""SIMULATED models for `parley bench load`: fixed sleeps instead of model work.

They measure the fleet's own capacity (gateway, Redis, runtime, lipsync) with the model cost
taken out. Each is a stand-in with the duck-typed interface of the stage's built-in backends,
loaded by name through a stage's backend list, e.g.::

    PARLEY_STT_BACKENDS=benchmarks.simulated:SimulatedRecognizer
    PARLEY_LLM_BACKENDS=benchmarks.simulated:SimulatedLlm
    PARLEY_TTS_BACKENDS=benchmarks.simulated:SimulatedTts

Lipsync runs as it is (phoneme-driven from the TTS marks). Never use these in a deployment:
the recognizer does not listen, it returns the benchmark's known question.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator

import numpy as np

# The question every benchmark player speaks; the simulated recognizer "hears" it.
QUESTION = "Hello there. Who are you?"

# Timings of GPU-class models (the same figures `parley bench latency` simulates).
STT_FINAL_MS = 50.0  # end of speech -> final transcript
LLM_TTFT_MS = 150.0
LLM_TOKENS_PER_S = 40.0
TTS_FIRST_CHUNK_MS = 80.0
TTS_RTF = 0.1

ENV = {
    "PARLEY_STT_BACKENDS": "benchmarks.simulated:SimulatedRecognizer",
    "PARLEY_LLM_BACKENDS": "benchmarks.simulated:SimulatedLlm",
    "PARLEY_TTS_BACKENDS": "benchmarks.simulated:SimulatedTts",
}


class _SimStream:
    def __init__(self, text: str):
        self.text = text

    def feed(self, samples: np.ndarray) -> str | None:
        return None  # no partials: a simulated model costs nothing while the player speaks

    def finish(self) -> str:
        time.sleep(STT_FINAL_MS / 1000)  # runs in a worker thread, as a real decode does
        return self.text

    def speaker(self) -> str:
        return ""

    def close(self) -> None:
        pass


class SimulatedRecognizer:
    """SIMULATED STT: the known question after ``STT_FINAL_MS``, whatever was said."""

    name = "simulated-stt"

    def __init__(self, config=None):
        self.text = os.environ.get("PARLEY_SIM_STT_TEXT", QUESTION)

    def warm(self) -> None:
        pass

    def open_stream(self, speaker: str = "") -> _SimStream:
        return _SimStream(self.text)


class SimulatedLlm:
    """SIMULATED LLM: the scripted persona's line, at a fixed TTFT and token rate."""

    name = "simulated-llm"

    def __init__(self, config=None):
        from workers.llm.scripted import ScriptedPersonaBackend

        self._lines = ScriptedPersonaBackend()

    async def stream_reply(self, persona, history: list[dict], heard: str) -> AsyncIterator[str]:
        words = self._lines.choose(persona, heard).split(" ")
        await asyncio.sleep(LLM_TTFT_MS / 1000)
        for i, word in enumerate(words):
            if i:
                await asyncio.sleep(1 / LLM_TOKENS_PER_S)
            yield word if i == 0 else " " + word


class SimulatedTts:
    """SIMULATED streaming TTS: espeak-ng's audio and phoneme marks (cached per text, so real
    PCM of the right length at no synthesis cost), delivered after a fixed first-chunk delay
    plus ``TTS_RTF`` x the first chunk.

    The TTS stage takes a fragment's audio all at once, so a streaming model's later chunks
    cannot be paced here; charging the whole fragment's RTF up front instead would model a
    non-streaming model, whose long second sentence (4.2 s at RTF 0.1: 0.5 s) reaches UE only
    ~50 ms before a short first one (1 s) has played: underruns from the model, not from the
    fleet this profile measures."""

    name = "simulated-tts"

    def __init__(self, config=None):
        from workers.tts.espeak import EspeakSynth

        self._synth = EspeakSynth()
        self.sample_rate = self._synth.sample_rate
        self._cache: dict[tuple, list] = {}
        self._lock = threading.Lock()

    def synthesize(self, text: str, voice: str = "en-us", rate_wpm: int = 175,
                   pitch: int = 50) -> Iterator:
        key = (text, voice, rate_wpm, pitch)
        with self._lock:
            chunks = self._cache.get(key)
            if chunks is None:
                chunks = list(self._synth.synthesize(text, voice=voice, rate_wpm=rate_wpm,
                                                     pitch=pitch))
                self._cache[key] = chunks
        first_s = len(chunks[0].pcm) / self.sample_rate if chunks else 0.0
        # the stage calls this in a worker thread and takes the whole list
        time.sleep(TTS_FIRST_CHUNK_MS / 1000 + TTS_RTF * first_s)
        return iter(chunks)
