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

    def speaker(self) -> str:
        return self.inner.speaker()

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

    def open_stream(self, speaker: str = ""):
        return _FailingRecognizerStream(self.inner.open_stream(speaker), self.n)


# --------------------------------------------------------------------------- traps
#
# Failure injection for the recovery tests: the stage's real backend, which stops at a point
# the test chose ("armed") until the test kills the worker or lets it go. A worker is then
# caught at that point every time, however loaded the machine: polling and SIGSTOP slices
# only catch a short job by luck. Unarmed, they pass everything through.
#
# The test arms a trap by writing ``<PARLEY_TEST_TRAP_DIR>/<stage>.armed`` (JSON: where to
# stop). The first worker to get there takes it (an atomic rename to
# ``<stage>.sprung.<pid>``), so the worker that takes the job over runs on. It waits until
# ``<stage>.release`` exists (or it is killed).


def _trap_dir():
    import os
    from pathlib import Path

    d = os.environ.get("PARLEY_TEST_TRAP_DIR")
    return Path(d) if d else None


def _armed(stage: str) -> dict | None:
    import json

    d = _trap_dir()
    if d is None:
        return None
    try:
        return json.loads((d / f"{stage}.armed").read_text())
    except (OSError, ValueError):
        return None


def _spring(stage: str) -> bool:
    """Take the trap (one worker wins); False when another already did."""
    import os

    d = _trap_dir()
    try:
        os.rename(d / f"{stage}.armed", d / f"{stage}.sprung.{os.getpid()}")
    except OSError:
        return False
    return True


def _released(stage: str) -> bool:
    return (_trap_dir() / f"{stage}.release").exists()


def _hold(stage: str) -> None:
    while not _released(stage):
        time.sleep(0.005)


async def _ahold(stage: str) -> None:
    import asyncio

    while not _released(stage):
        await asyncio.sleep(0.005)  # the event loop (and its heartbeat) runs on


class TrappedLlm:
    """The scripted persona; armed with ``{"after_sentence": k}`` it stops at the k-th token
    after the first sentence's end (so that fragment is published), with ``{"tokens": 0}``
    before its first token (TTS has its job, no reply text is out)."""

    name = "trapped-scripted"

    def __init__(self, config=None):
        from workers.llm.scripted import ScriptedPersonaBackend

        self.inner = ScriptedPersonaBackend()

    async def stream_reply(self, persona, history, heard, prefix=""):
        trap = _armed("llm")
        count, after = 0, None
        async for token in self.inner.stream_reply(persona, history, heard, prefix=prefix):
            if trap is not None:
                stop = (count == trap["tokens"]) if "tokens" in trap else (
                    after is not None and count - after == trap["after_sentence"])
                if stop:
                    if _spring("llm"):
                        await _ahold("llm")
                    trap = None
            if after is None and token.rstrip().endswith((".", "?", "!")):
                after = count
            count += 1
            yield token


class TrappedSynth:
    """espeak-ng; armed with ``{"text": t}`` it stops before synthesizing the fragment ``t``
    (every earlier fragment is published whole)."""

    name = "trapped-espeak"

    def __init__(self, config=None):
        from workers.tts.espeak import EspeakSynth

        self.inner = EspeakSynth()
        self.sample_rate = self.inner.sample_rate

    def synthesize(self, text, voice="en-us", rate_wpm=175, pitch=50):
        trap = _armed("tts")
        if trap is not None and trap["text"] == text and _spring("tts"):
            _hold("tts")  # the stage runs this in a thread: its event loop goes on
        yield from self.inner.synthesize(text, voice=voice, rate_wpm=rate_wpm, pitch=pitch)


class _TrappedFaceStream:
    def __init__(self, inner, trap: dict | None):
        self.inner = inner
        self.trap = trap
        self.pushes = 0

    async def push(self, pcm, marks):
        self.pushes += 1
        if self.trap is not None and self.pushes == self.trap["pushes"]:
            if _spring("lipsync"):
                await _ahold("lipsync")
            self.trap = None
        return await self.inner.push(pcm, marks)

    async def flush(self):
        return await self.inner.flush()


class TrappedFaceMapper:
    """The phoneme-driven mapper; armed with ``{"pushes": n}`` it stops at the n-th voice
    entry of a turn (the frames of the earlier ones are published)."""

    name = "trapped-phoneme"

    def __init__(self, config):
        from workers.lipsync.backends import PhonemeMapper

        self.inner = PhonemeMapper(config)

    def accepts(self, voice) -> bool:
        return self.inner.accepts(voice)

    def open(self, rate):
        return _TrappedFaceStream(self.inner.open(rate), _armed("lipsync"))


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
