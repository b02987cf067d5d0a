"""Test doubles: real backends that fail (or stall) partway through their output.

Each wraps the stage's real default backend and raises after N pieces of one output (tokens,
chunks, frames, fed chunks), so a fallback chain has to take over mid-turn. They are
out-of-tree backends: a worker loads them by name, e.g.
``PARLEY_LLM_BACKENDS=tests.failing_backends:FailingAfterNTokens,scripted``. A probe (a short
request) succeeds, so the chain restores them and every turn fails over again.
"""

from __future__ import annotations

import time

import numpy as np


class InjectedFailure(RuntimeError):
    """The failure a test double injects."""


class FailingAfterNTokens:
    """The scripted persona, failing after ``n`` tokens of a reply."""

    name = "failing-scripted"
    n = 3
    stall_s = 0.0  # > 0: stall this long instead of raising

    def __init__(self, config=None):
        from workers.llm.scripted import ScriptedPersonaBackend

        self.inner = ScriptedPersonaBackend()

    async def stream_reply(self, persona, history, heard, prefix=""):
        import asyncio

        count = 0
        async for token in self.inner.stream_reply(persona, history, heard, prefix=prefix):
            if count == self.n:
                if self.stall_s:
                    await asyncio.sleep(self.stall_s)
                raise InjectedFailure(f"failing after {self.n} tokens")
            count += 1
            yield token


class StallingAfterNTokens(FailingAfterNTokens):
    name = "stalling-scripted"
    stall_s = 30.0


class FailingAfterNChunks:
    """espeak-ng, failing after ``n`` chunks of a fragment."""

    name = "failing-espeak"
    n = 3
    stall_s = 0.0

    def __init__(self, config=None):
        from workers.tts.espeak import EspeakSynth

        self.inner = EspeakSynth()
        self.sample_rate = self.inner.sample_rate

    def synthesize(self, text, voice="en-us", rate_wpm=175, pitch=50):
        for i, chunk in enumerate(self.inner.synthesize(text, voice=voice, rate_wpm=rate_wpm,
                                                        pitch=pitch)):
            if i == self.n:
                if self.stall_s:
                    time.sleep(self.stall_s)
                raise InjectedFailure(f"failing after {self.n} chunks")
            yield chunk

    def probe(self) -> None:
        """The chain's health probe: a short request, served by the real synthesizer (this
        double fails only on long outputs)."""
        list(self.inner.synthesize("Hello."))


class StallingAfterNChunks(FailingAfterNChunks):
    name = "stalling-espeak"
    stall_s = 30.0


class _FailingFaceStream:
    def __init__(self, inner, n: int):
        self.inner = inner
        self.n = n
        self.frames = 0

    def _count(self, frames):
        self.frames += len(frames)
        if self.frames > self.n:
            raise InjectedFailure(f"failing after {self.n} frames")
        return frames

    async def push(self, pcm, marks):
        return self._count(await self.inner.push(pcm, marks))

    async def flush(self):
        return self._count(await self.inner.flush())


class FailingAfterNFrames:
    """The phoneme-driven mapper, failing once a turn passes ``n`` frames."""

    name = "failing-phoneme"
    n = 30

    def __init__(self, config):
        from workers.lipsync.backends import PhonemeMapper

        self.inner = PhonemeMapper(config)

    def accepts(self, voice) -> bool:
        return self.inner.accepts(voice)

    def open(self, rate):
        return _FailingFaceStream(self.inner.open(rate), self.n)


class _FailingRecognizerStream:
    def __init__(self, inner, n: int):
        self.inner = inner
        self.n = n
        self.fed = 0

    def feed(self, samples: np.ndarray):
        self.fed += 1
        if self.fed > self.n:
            raise InjectedFailure(f"failing after {self.n} fed chunks")
        return self.inner.feed(samples)

    def finish(self) -> str:
        return self.inner.finish()

    def close(self) -> None:
        self.inner.close()


class FailingAfterNFeeds:
    """pocketsphinx, failing after ``n`` fed chunks of an utterance."""

    name = "failing-pocketsphinx"
    n = 5

    def __init__(self, config=None):
        from workers.stt.pocketsphinx_backend import PocketsphinxBackend

        self.inner = PocketsphinxBackend()

    def warm(self) -> None:
        self.inner.warm()

    def open_stream(self):
        return _FailingRecognizerStream(self.inner.open_stream(), self.n)


class RefusingWord:
    """espeak-ng that fails every fragment containing ``word`` (a line that cannot be baked)."""

    name = "refusing-espeak"
    word = "unspeakable"

    def __init__(self, config=None):
        from workers.tts.espeak import EspeakSynth

        self.inner = EspeakSynth()
        self.sample_rate = self.inner.sample_rate

    def synthesize(self, text, voice="en-us", rate_wpm=175, pitch=50):
        if self.word in text.lower():
            raise InjectedFailure(f"refusing to speak {self.word!r}")
        yield from self.inner.synthesize(text, voice=voice, rate_wpm=rate_wpm, pitch=pitch)
