"""The lipsync stage's backend interface, its registered backends and its fallback chain."""

from __future__ import annotations

import asyncio
from typing import Protocol

import numpy as np

from schemas.streams import VoiceEntry
from workers.fallback import FallbackChain, StallTimeout
from workers.lipsync.audio_driven import AudioLipsync, FaceFrame

Marks = list[tuple[int, str]]  # (sample, espeak phoneme) in the turn's reply audio


class FaceStream(Protocol):
    """One turn's face: frames ``index`` 0, 1, ... at the mapper's fps, each stamped with its
    reply-audio sample. ``push`` returns the frames now ready; ``flush`` the rest."""

    async def push(self, pcm: np.ndarray, marks: Marks) -> list[FaceFrame]: ...

    async def flush(self) -> list[FaceFrame]: ...


class FaceMapper(Protocol):
    """Turns reply audio (and the TTS's phoneme marks, where it sends them) into face frames.

    ``accepts`` says whether it can serve a turn whose first voice entry is ``voice`` (the
    phoneme mapper needs marks). Optional: ``start()`` / ``stop()`` (async, load and release
    a model), ``probe()`` (sync or async).
    """

    name: str

    def accepts(self, voice: VoiceEntry) -> bool: ...

    def open(self, rate: int) -> FaceStream: ...


class _SyncStream:
    """A FaceStream over a Sans-I/O mapper (push/flush that return frames at once)."""

    def __init__(self, lip, with_marks: bool):
        self.lip = lip
        self.with_marks = with_marks

    async def push(self, pcm: np.ndarray, marks: Marks) -> list[FaceFrame]:
        return self.lip.push(pcm, marks) if self.with_marks else self.lip.push(pcm)

    async def flush(self) -> list[FaceFrame]:
        return self.lip.flush()


class PhonemeMapper:
    """From espeak's phoneme timings (coarticulation, closed lips on p/b/m)."""

    name = "phoneme"

    def __init__(self, config):
        self.fps = config.lipsync.fps

    def accepts(self, voice: VoiceEntry) -> bool:
        return any(m.kind == "phoneme" for m in voice.marks)

    def open(self, rate: int) -> FaceStream:
        from workers.lipsync.phoneme_driven import PhonemeLipsync

        return _SyncStream(PhonemeLipsync(rate, fps=self.fps), with_marks=True)


class AudioMapper:
    """From the audio alone: any voice."""

    name = "audio"

    def __init__(self, config):
        self.fps = config.lipsync.fps
        self.lookahead_ms = config.lipsync.lookahead_ms

    def accepts(self, voice: VoiceEntry) -> bool:
        return True

    def open(self, rate: int) -> FaceStream:
        return _SyncStream(AudioLipsync(rate, fps=self.fps, lookahead_ms=self.lookahead_ms),
                           with_marks=False)


class _BatchedStream:
    """The transformer's split form: windows go through the worker's micro-batcher together
    with other sessions' windows."""

    def __init__(self, lip, batcher):
        self.lip = lip
        self.batcher = batcher

    async def push(self, pcm: np.ndarray, marks: Marks) -> list[FaceFrame]:
        return await self._run(self.lip.feed(pcm))

    async def flush(self) -> list[FaceFrame]:
        return await self._run(self.lip.feed_end())

    async def _run(self, windows) -> list[FaceFrame]:
        if not windows:
            return self.lip.deliver([])
        outs = await asyncio.gather(*(self.batcher.asubmit(w) for w in windows))
        return self.lip.deliver(list(outs))


class TransformerMapper:
    """A NeuroSync-architecture model, one per worker, batched across sessions (60 fps only:
    at another fps it serves nothing and the next mapper does)."""

    name = "transformer"

    def __init__(self, config):
        self.cfg = config.lipsync
        self.runner = None
        self.batcher = None

    async def start(self) -> None:
        cfg = self.cfg
        if cfg.fps != 60:
            return
        if not cfg.transformer_checkpoint:
            raise ValueError("lipsync backend 'transformer' needs "
                             "lipsync.transformer_checkpoint (its weights are yours)")
        from workers.batching import MicroBatcher
        from workers.lipsync.transformer_backend import TransformerRunner

        self.runner = await asyncio.to_thread(
            TransformerRunner.shared, checkpoint=cfg.transformer_checkpoint,
            device=cfg.transformer_device, heads=cfg.transformer_heads,
            dtype=cfg.transformer_dtype)
        self.batcher = MicroBatcher(self.runner.infer_windows, max_batch=cfg.transformer_max_batch,
                                    window_ms=cfg.transformer_batch_window_ms)

    async def stop(self) -> None:
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.close)

    def accepts(self, voice: VoiceEntry) -> bool:
        return self.batcher is not None

    def open(self, rate: int) -> FaceStream:
        from workers.lipsync.transformer_backend import TransformerLipsync

        lip = TransformerLipsync(self.cfg.transformer_checkpoint, rate, fps=self.cfg.fps,
                                 runner=self.runner)
        return _BatchedStream(lip, self.batcher)


class FallbackFaceMapper(FallbackChain):
    """A :class:`FaceMapper` over an ordered chain of them: a turn gets the first (healthy)
    mapper that accepts it, and the audio mapper when none does.

    The turn's stream keeps the audio and marks fed so far. When its mapper fails or stalls,
    the next one that accepts the turn is fed all of it again and yields the frames from the
    next frame on: frame indices and sample stamps go on with no gap and no repeat.
    """

    stage = "lipsync"

    def __init__(self, backends: list, fps: int = 60, lookahead_ms: float = 40.0, **kwargs):
        super().__init__(backends, **kwargs)
        self.fps = fps
        self.lookahead_ms = lookahead_ms

    @classmethod
    def from_config(cls, backends: list, config, log=None):
        fb = config.fallback
        return cls(backends, fps=config.lipsync.fps, lookahead_ms=config.lipsync.lookahead_ms,
                   stall_timeout_s=fb.stall_timeout_s, probe_interval_s=fb.probe_interval_s,
                   log=log)

    def accepts(self, voice: VoiceEntry) -> bool:
        return True

    def open(self, rate: int, voice: VoiceEntry | None = None) -> ChainedFaceStream:
        """The turn's stream; ``voice``, its first voice entry, picks who accepts it."""
        return ChainedFaceStream(self, rate, voice)

    def candidates(self, voice: VoiceEntry | None) -> list[int]:
        return [i for i in self.order()
                if voice is None or self.backends[i].accepts(voice)]

    def last_resort(self, rate: int) -> FaceStream:
        return _SyncStream(AudioLipsync(rate, fps=self.fps, lookahead_ms=self.lookahead_ms),
                           with_marks=False)

    async def start(self) -> None:
        self.attach()
        await self.each("start")

    async def stop(self) -> None:
        await self.aclose()
        await self.each("stop")

    async def default_probe(self, backend) -> None:
        stream = backend.open(16000)
        await stream.push(np.zeros(1600, np.int16), [])
        await stream.flush()


class ChainedFaceStream:
    """One turn's face through a :class:`FallbackFaceMapper` (see there)."""

    def __init__(self, chain: FallbackFaceMapper, rate: int, voice: VoiceEntry | None):
        self.chain = chain
        self.rate = rate
        self.plan = chain.candidates(voice)
        self.at = -1  # position in plan; -1 before the first open, len(plan): last resort
        self.pcm: list[np.ndarray] = []
        self.marks: Marks = []
        self.next_index = 0  # the first frame not yet returned
        self.event = None
        self.stream = self._open_next()

    @property
    def backend_name(self) -> str:
        return self.chain.backends[self.plan[self.at]].name if self.at < len(self.plan) \
            else "audio"

    def _open_next(self) -> FaceStream:
        self.at += 1
        if self.at >= len(self.plan):
            return self.chain.last_resort(self.rate)
        return self.chain.backends[self.plan[self.at]].open(self.rate)

    async def push(self, pcm: np.ndarray, marks: Marks) -> list[FaceFrame]:
        self.pcm.append(pcm)
        self.marks.extend(marks)
        return await self._guard(lambda s: s.push(pcm, marks), flush=False)

    async def flush(self) -> list[FaceFrame]:
        return await self._guard(lambda s: s.flush(), flush=True)

    async def _guard(self, op, flush: bool) -> list[FaceFrame]:
        while True:
            remaining = len(self.plan) - self.at - 1
            timeout = self.chain.timeout_for(remaining) if self.at < len(self.plan) else None
            try:
                try:
                    async with asyncio.timeout(timeout):
                        frames = await op(self.stream)
                except TimeoutError:
                    raise StallTimeout(f"no frames in {timeout:.1f}s") from None
                return self._new(frames)
            except Exception as exc:  # the next mapper makes the frames from here on
                if self.at >= len(self.plan):
                    raise
                failed = self.plan[self.at]
                self.stream = self._open_next()
                to = self.plan[self.at] if self.at < len(self.plan) else None
                self.event = self.chain.failed(failed, exc, to)
                op = self._replay(flush)

    def _replay(self, flush: bool):
        """What the next mapper is given: everything fed so far (this call's audio included),
        then the flush when the turn is ending."""
        audio = np.concatenate(self.pcm) if self.pcm else np.zeros(0, np.int16)
        marks = list(self.marks)

        async def op(stream: FaceStream) -> list[FaceFrame]:
            frames = await stream.push(audio, marks) if len(audio) else []
            return frames + (await stream.flush() if flush else [])
        return op

    def _new(self, frames: list[FaceFrame]) -> list[FaceFrame]:
        fresh = [f for f in frames if f.index >= self.next_index]
        if fresh:
            self.chain.first_output(self.event)
            self.event = None
            self.next_index = fresh[-1].index + 1
        return fresh
