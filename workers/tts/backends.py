"""The TTS stage's backend interface, its registered backends and its fallback chain."""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

import numpy as np

from workers.fallback import FallbackChain, StallTimeout
from workers.tts.espeak import PhonemeMark, SynthChunk, WordMark


class Synthesizer(Protocol):
    """Speaks one reply fragment as int16 mono chunks at ``sample_rate``.

    Each chunk's ``sample`` is its position in the fragment's audio; its phoneme and word marks
    are positions in that audio too. A bad voice raises ValueError when called. Optional:
    ``probe()`` (sync or async), a small request that succeeds when the backend works again.
    """

    name: str
    sample_rate: int

    def synthesize(self, text: str, voice: str = "", rate_wpm: int = 175,
                   pitch: int = 50) -> Iterator[SynthChunk]: ...


def espeak(config):
    from workers.tts.espeak import EspeakSynth

    return EspeakSynth()


def coqui(config):
    from workers.tts.coqui_backend import CoquiBackend

    return CoquiBackend.from_config(config)


def drop_samples(chunks: Iterable[SynthChunk], skip: int) -> Iterator[SynthChunk]:
    """The chunks after the first ``skip`` samples (marks before the cut are dropped)."""
    for ch in chunks:
        n = len(ch.pcm)
        if skip >= n:
            skip -= n
            continue
        if skip:
            cut = ch.sample + skip
            ch = SynthChunk(pcm=ch.pcm[skip:], sample=cut,
                            phonemes=[p for p in ch.phonemes if p.sample >= cut],
                            words=[w for w in ch.words if w.sample >= cut])
            skip = 0
        yield ch


def continue_at(chunks: Iterator[SynthChunk], produced: int,
                word: tuple[int, int] | None) -> Iterator[SynthChunk]:
    """Another rendering of the fragment, from where the one that failed stopped: ``produced``
    samples in, ``word`` = (text offset, sample) of the last word it had started.

    When this rendering marks that word too, it continues at the same distance past the
    word's start (voices differ in speed: the same sample count would land on another word);
    otherwise at the same sample."""
    if word is None:
        yield from drop_samples(chunks, produced)
        return
    held: list[SynthChunk] = []
    for ch in chunks:
        held.append(ch)
        match = next((w for w in ch.words if w.text_start >= word[0]), None)
        if match is not None:
            skip = produced if match.text_start != word[0] else \
                match.sample + produced - word[1]
            yield from drop_samples(itertools.chain(held, chunks), max(0, skip))
            return
    yield from drop_samples(held, produced)


class _Rate:
    """Converts one backend's chunks to the chain's sample rate, marks included."""

    def __init__(self, src: int, dst: int):
        # the mic's streaming resampler: ~1 ms behind, where a block resampler held back the
        # fallback voice's first audio 20-40 ms
        from workers.stt.resample import Resampler

        self.src, self.dst = src, dst
        self.stream = Resampler(src, dst)
        self.pos = 0  # output samples so far

    def convert(self, ch: SynthChunk, last: bool) -> SynthChunk:
        x = self.stream.push(np.asarray(ch.pcm, np.float32) / 32768)
        if last:
            x = np.concatenate([x, self.stream.flush()])
        pcm = np.clip(np.rint(x * 32768), -32768, 32767).astype(np.int16)
        scale = self.dst / self.src
        out = SynthChunk(pcm=pcm, sample=self.pos,
                         phonemes=[PhonemeMark(p.phoneme, round(p.sample * scale))
                                   for p in ch.phonemes],
                         words=[WordMark(w.text_start, w.text_length, round(w.sample * scale))
                                for w in ch.words])
        self.pos += len(out.pcm)
        return out


def _pull(make: Callable[[], Iterable[SynthChunk]],
          timeout: float | None) -> Iterator[SynthChunk]:
    """The chunks of ``make()``, each within ``timeout`` of the previous one (else
    StallTimeout). The backend runs in a thread of its own so a stuck model call cannot hold
    the fragment."""
    if timeout is None:
        yield from make()
        return
    box: queue.Queue = queue.Queue()

    def run() -> None:
        try:
            for ch in make():
                box.put(("chunk", ch))
            box.put(("end", None))
        except BaseException as exc:  # handed to the consumer's thread
            box.put(("error", exc))

    threading.Thread(target=run, name="tts-backend", daemon=True).start()
    while True:
        try:
            kind, value = box.get(timeout=timeout)
        except queue.Empty:
            raise StallTimeout(f"no audio in {timeout:.1f}s") from None
        if kind == "end":
            return
        if kind == "error":
            raise value
        yield value


class FallbackSynthesizer(FallbackChain):
    """A :class:`Synthesizer` over an ordered chain of them, at the first one's sample rate.

    A backend that fails or stalls mid-fragment hands over to the next, which speaks the
    fragment again from where the audio stopped (see :func:`continue_at`): positions go on
    without a gap or a repeat. A backend at another rate is resampled to the chain's.
    """

    stage = "tts"

    def __init__(self, backends: list, **kwargs):
        super().__init__(backends, **kwargs)
        self.sample_rate: int = int(self.backends[0].sample_rate)

    def synthesize(self, text: str, voice: str | None = None, rate_wpm: int | None = None,
                   pitch: int | None = None) -> Iterator[SynthChunk]:
        """Unset arguments are left to each backend's own defaults."""
        given = {"voice": voice, "rate_wpm": rate_wpm, "pitch": pitch}
        kwargs = {k: v for k, v in given.items() if v is not None}
        produced = 0  # samples of this fragment already yielded, at self.sample_rate
        word = None  # (text offset, sample) of the last word mark yielded
        order = self.order()
        event = None
        for n, i in enumerate(order):
            backend = self.backends[i]
            timeout = self.timeout_for(len(order) - n - 1)
            try:
                chunks = self._chunks(backend, text, kwargs, timeout)
                for ch in continue_at(chunks, produced, word):
                    self.first_output(event)
                    ch = _shifted(ch, produced)
                    if ch.words:
                        word = (ch.words[-1].text_start, ch.words[-1].sample)
                    yield ch
                    produced += len(ch.pcm)
                return
            except Exception as exc:  # the next backend speaks the rest
                if n + 1 == len(order):
                    raise
                event = self.failed(i, exc, order[n + 1])

    def _chunks(self, backend, text, kwargs, timeout) -> Iterator[SynthChunk]:
        chunks = _pull(lambda: backend.synthesize(text, **kwargs), timeout)
        if int(backend.sample_rate) == self.sample_rate:
            yield from chunks
            return
        rate = _Rate(int(backend.sample_rate), self.sample_rate)
        held = None  # one chunk behind, so the resampler knows which is the last
        for ch in chunks:
            if held is not None:
                yield rate.convert(held, last=False)
            held = ch
        if held is not None:
            yield rate.convert(held, last=True)

    async def default_probe(self, backend) -> None:
        import asyncio

        await asyncio.to_thread(lambda: list(backend.synthesize("Hello.")))


def _shifted(ch: SynthChunk, at: int) -> SynthChunk:
    """``ch`` placed at sample ``at`` of the fragment (marks move with it)."""
    shift = at - ch.sample
    if not shift:
        return ch
    return SynthChunk(pcm=ch.pcm, sample=at,
                      phonemes=[PhonemeMark(p.phoneme, p.sample + shift) for p in ch.phonemes],
                      words=[WordMark(w.text_start, w.text_length, w.sample + shift)
                             for w in ch.words])
