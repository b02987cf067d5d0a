"""The STT stage's backend interface, its registered backends and its fallback chain."""

from __future__ import annotations

import asyncio
from typing import Protocol

import numpy as np

from workers.fallback import FallbackChain, NoBackend, StallTimeout, ThreadCall
from workers.stt.pocketsphinx_backend import RecognizerStream

RATE = 16000


class Recognizer(Protocol):
    """Recognizes one utterance at a time: ``open_stream()``, then ``feed(samples)`` (16 kHz
    mono float32 in [-1, 1]; returns a partial transcript or None), ``finish()`` (the final
    text), ``speaker()`` (after finish: what to hand the next ``open_stream(speaker=...)`` of
    the same speaker) and ``close()``. Blocking calls: the stage runs them in a thread.
    ``warm()`` loads the model before the first job; optional ``probe()`` (sync or async) says
    it works again."""

    name: str

    def warm(self) -> None: ...

    def open_stream(self, speaker: str = "") -> RecognizerStream: ...


def _cuda_or_cpu() -> str:
    """whisperX has no "auto" device: ask CTranslate2 (whisperX's engine) for a GPU."""
    try:
        import ctranslate2
    except ImportError:  # whisperX itself will say what is missing
        return "cuda"
    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def pocketsphinx(config):
    from workers.stt.pocketsphinx_backend import PocketsphinxBackend

    return PocketsphinxBackend()


def faster_whisper(config):
    from workers.stt.faster_whisper_backend import FasterWhisperBackend

    cfg = config.stt
    return FasterWhisperBackend(cfg.model, device=cfg.device, compute_type=cfg.compute_type,
                                beam_size=cfg.beam_size, language=cfg.language,
                                cpu_threads=cfg.cpu_threads)


def whisperx(config):
    from workers.stt.whisperx_backend import WhisperXBackend

    cfg = config.stt
    device = _cuda_or_cpu() if cfg.device == "auto" else cfg.device
    # int8 is the CPU default; on a GPU whisperX is meant to run float16
    compute = "float16" if cfg.compute_type == "int8" and device == "cuda" else cfg.compute_type
    return WhisperXBackend(cfg.model, device=device, compute_type=compute,
                           batch_size=cfg.batch_size, language=cfg.language,
                           beam_size=cfg.beam_size, cpu_threads=cfg.cpu_threads)


class FallbackRecognizer(FallbackChain):
    """A :class:`Recognizer` over an ordered chain of them.

    Its streams keep the utterance's audio fed so far; when the backend fails or stalls
    (in ``feed`` or ``finish``), the next backend's stream is fed all of it again and goes on,
    so the utterance is recognized whole.
    """

    stage = "stt"

    def warm(self) -> None:
        for backend in self.backends:
            backend.warm()

    @property
    def holds_gil(self) -> bool:
        """Every backend decodes holding the GIL and no call needs a watchdog thread."""
        return (all(getattr(b, "holds_gil", False) for b in self.backends)
                and self.timeout_for(len(self.backends) - 1) is None)

    @property
    def finishes_late(self) -> bool:
        """Some backend's stream still works after finish() (in speaker() and close())."""
        return any(getattr(b, "finishes_late", False) for b in self.backends)

    def open_stream(self, speaker: str = "") -> ChainedStream:
        return ChainedStream(self, speaker)

    async def default_probe(self, backend) -> None:
        def run() -> None:
            stream = backend.open_stream()
            try:
                stream.feed(np.zeros(RATE // 4, np.float32))
                stream.finish()
            finally:
                stream.close()

        await asyncio.to_thread(run)

    async def close(self) -> None:
        await self.aclose()
        await self.each("close")


class ChainedStream:
    """One utterance through a :class:`FallbackRecognizer` (see there)."""

    def __init__(self, chain: FallbackRecognizer, speaker: str = ""):
        self.chain = chain
        self.speaker_hint = speaker  # each backend takes only its own (see RecognizerStream)
        self.plan = chain.order()
        self.at = 0
        self.audio: list[np.ndarray] = []
        self.call = ThreadCall()
        self.event = None
        self.stream = self._open(0)

    @property
    def backend_name(self) -> str:
        return self.chain.backends[self.plan[self.at]].name

    def _open(self, at: int) -> RecognizerStream:
        return self.chain.backends[self.plan[at]].open_stream(self.speaker_hint)

    def _timeout(self) -> float | None:
        return self.chain.timeout_for(len(self.plan) - self.at - 1)

    def feed(self, samples: np.ndarray) -> str | None:
        self.audio.append(samples)
        try:
            partial = self.call(self.stream.feed, samples, timeout=self._timeout())
        except Exception as exc:
            # the next backend hears the whole utterance so far, this chunk included
            partial = self._fail_over(exc)
        return partial

    def hypothesis(self) -> str | None:
        """The backend's best hypothesis so far, where it can give one at once (pocketsphinx);
        None where it cannot (a Whisper would have to decode the whole utterance again)."""
        snapshot = getattr(self.stream, "hypothesis", None)
        if snapshot is None:
            return None
        try:
            return self.call(snapshot, timeout=self._timeout())
        except Exception:  # only a head start: the failure shows on the next feed or finish
            return None

    def finish(self) -> str:
        while True:
            try:
                text = self.call(self.stream.finish, timeout=self._timeout())
                self.chain.first_output(self.event)
                return text
            except Exception as exc:
                self._fail_over(exc)

    def speaker(self) -> str:
        return self.stream.speaker()

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            self.call.abandon()

    def _fail_over(self, exc: Exception) -> str | None:
        """Open the next backend's stream and feed it everything so far; returns its partial.
        Raises ``exc`` when no backend is left."""
        while True:
            failed = self.plan[self.at]
            if self.at + 1 >= len(self.plan):
                self.chain.failed(failed, exc, None)
                raise exc
            self.event = self.chain.failed(failed, exc, self.plan[self.at + 1])
            self.call.abandon()
            if not isinstance(exc, StallTimeout):  # a stalled call may still be using it
                try:
                    self.stream.close()
                except Exception:  # the failed backend's stream may be broken: dropped
                    pass
            self.at += 1
            try:
                self.stream = self._open(self.at)
                if not self.audio:
                    return None
                audio = np.concatenate(self.audio)
                partial = self.call(self.stream.feed, audio, timeout=self._timeout())
                # caught up: the new backend has heard everything the failed one had
                self.chain.first_output(self.event)
                return partial
            except Exception as again:  # this one fails too: on to the next
                exc = again


__all__ = ["ChainedStream", "FallbackRecognizer", "NoBackend", "Recognizer"]
