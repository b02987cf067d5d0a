"""Streaming phoneme timings + audio -> ARKit face values, with coarticulation.

Sans-I/O core with the same contract as ``AudioLipsync``: ``push(pcm, marks)``
returns the face frames that became computable, ``flush()`` ends the stream.
Frame ``i`` belongs to sample ``frame_sample(i)`` and a stream of ``n``
samples gives ``frame_count(n)`` frames.

How a frame at sample ``s`` is made:

1. Each phoneme mark ``(start, mnemonic)`` becomes a viseme (``visemes.py``)
   holding from ``start`` to the next mark. Its dominance is 1 on that
   interval and falls off exponentially outside it (Cohen & Massaro 1993):
   ``exp(-d / ant_ms)`` before the start, ``exp(-d / car_ms)`` after the end,
   scaled by the viseme's dominance for each of three groups of shapes: lip
   seal, lip shape and jaw. Each group's pose is the dominance-weighted mean of
   the visemes' poses, so bilabials (seal dominance 1.0 against a vowel's 0.3)
   seal the lips whatever surrounds them while taking their rounding from the
   next vowel, rounding spreads into neighbouring consonants, and every shape
   starts moving ``ant_ms`` (15-40 ms, 1-3 frames) before its phoneme.
2. The seal share is sharpened (lips either touch or they do not: 0.25..0.8
   -> 0..1), then ``MouthClose = seal * JawOpen`` so the lips close over
   whatever jaw opening remains.
3. JawOpen is scaled by loudness: the RMS of a 30 ms window centred 10 ms
   after the frame (the jaw leads the sound), normalised against a slow
   reference that follows the speaker's level and smoothed with a fast-attack
   one-pole filter. Loud vowels open wider, quiet ones less (down to 35% of
   the pose), and silence shuts the jaw even if a mark is late.

Lookahead: the anticipation tail is cut at ``lookahead_ms`` (default 80,
at most ``MAX_LOOKAHEAD_MS`` = 100) with a shifted exponential that reaches 0
there, so a phoneme entering the horizon fades in without a jump. On the
benchmark, 40-100 ms all close 100% of bilabials; the outputs differ from the
100 ms ones by at most 0.15 at 80 ms and 0.35 at 60 ms (the rounding tails,
ant_ms 40, get cut). Marks arrive with the chunk that contains their sample,
so frame ``i`` is emitted once sample ``frame_sample(i) + latency_samples``
has arrived and it uses exactly the marks before ``frame_sample(i) +
lookahead_samples``: the output does not depend on how the stream is split
(bit-identical; the sequential parts run in Python floats).

Cost, one core, 22.05 kHz, 60 fps, 50 ms chunks: ~22k frames/s.

Marks are ``(sample, phoneme)`` pairs (or objects with ``.sample`` and
``.phoneme``/``.value``, e.g. ``PhonemeMark``, or a ``schemas.streams.Mark`` of
kind "phoneme": filter out word marks) in the coordinates of this stream: sample 0 is the
first sample pushed since construction or the last ``flush``. A mark must be
pushed no later than the push that delivers its sample; a mark earlier than
one already pushed is moved to that one's sample and counted in
``late_marks``. Marks equal to or past the end of the stream are ignored.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

import numpy as np

from schemas.arkit import INDEX, NUM_BLENDSHAPES, NUM_FACE_VALUES
from workers.lipsync.audio_driven import FaceFrame, _frame_samples, frame_count, frame_sample
from workers.lipsync.visemes import (
    DOMINANCE,
    JAW_SHAPES,
    SEAL_SHAPES,
    VISEMES,
    pose_matrix,
    viseme_of,
)

__all__ = ["MAX_LOOKAHEAD_MS", "PhonemeLipsync"]

MAX_LOOKAHEAD_MS = 100.0
CARRY_MS = 150.0  # carry-over tails are cut here (longest car_ms is 30 ms: e^-5 left)
RMS_MS = 30.0
RMS_LEAD_MS = 10.0  # the RMS window is centred this far after the frame: the jaw leads
_JAW_FLOOR = 0.35  # JawOpen scale at the loudness floor; 1.0 at full level
_CLOSE_LO, _CLOSE_HI = 0.25, 0.8  # closure share -> 0..1 (sharpened)

# Loudness normalisation (dB), same idea as AudioLipsync: a reference that rises
# quickly with loud speech and sinks slowly while sound continues.
_REF_START_DB = -20.0
_REF_FLOOR_DB = -45.0
_REF_RISE_MS = 80.0
_REF_FALL_DB_PER_S = 6.0
_RANGE_DB = 24.0
_GATE_DB = (-58.0, -48.0)
_LEVEL_TAU_MS = (15.0, 50.0)  # attack, release

_SIL = VISEMES.index("sil")
_JAW_COLS = [INDEX[n] for n in JAW_SHAPES]
_SEAL_COLS = [INDEX[n] for n in SEAL_SHAPES]
_SHAPE_COLS = [i for i in range(NUM_BLENDSHAPES) if i not in {*_JAW_COLS, *_SEAL_COLS}]
_JAW = INDEX["JawOpen"]
_CLOSE = INDEX["MouthClose"]
_EPS = 1e-12


def _mark_pair(m) -> tuple[int, str]:
    if isinstance(m, tuple | list):
        return int(m[0]), str(m[1])
    ph = getattr(m, "phoneme", None)
    if ph is None:
        ph = m.value
    return int(m.sample), str(ph)


class PhonemeLipsync:
    """Streaming phoneme-driven lipsync for one stream; ``flush`` ends it and resets."""

    def __init__(self, sample_rate: int, fps: int = 60, lookahead_ms: float = 80.0) -> None:
        if sample_rate <= 0 or fps <= 0:
            raise ValueError("sample_rate and fps must be positive")
        if not 0.0 <= lookahead_ms <= MAX_LOOKAHEAD_MS:
            raise ValueError(f"lookahead_ms must be in [0, {MAX_LOOKAHEAD_MS:g}]")
        self.sample_rate = int(sample_rate)
        self.fps = int(fps)
        sr = self.sample_rate
        self._look = round(lookahead_ms * sr / 1000.0)
        self._carry = round(CARRY_MS * sr / 1000.0)
        self._half = max(1, round(RMS_MS / 2000.0 * sr))
        self._rms_lead = round(RMS_LEAD_MS * sr / 1000.0)
        self._latency = max(self._look, self._rms_lead + self._half)
        poses = pose_matrix()
        doms = [DOMINANCE[v] for v in VISEMES]
        # (columns, their poses per viseme, dominance per viseme) for each group.
        self._groups = [
            (np.array(cols), poses[:, cols], np.array([getattr(d, g) for d in doms]))
            for cols, g in ((_SEAL_COLS, "seal"), (_SHAPE_COLS, "shape"), (_JAW_COLS, "jaw"))
        ]
        # Time constants in samples, and each tail's value at its cut so it can be
        # shifted to reach exactly 0 there (no jump when a phoneme enters the window).
        self._tau_a = np.array([d.ant_ms * sr / 1000.0 for d in doms])
        self._tau_c = np.array([d.car_ms * sr / 1000.0 for d in doms])
        self._cut_a = np.exp(-self._look / self._tau_a) if self._look else np.ones(len(doms))
        self._cut_c = np.exp(-self._carry / self._tau_c)
        dt_ms = 1000.0 / fps
        self._lev_coef = tuple(1.0 - math.exp(-dt_ms / t) for t in _LEVEL_TAU_MS)
        self._ref_rise = 1.0 - math.exp(-dt_ms / _REF_RISE_MS)
        self._ref_fall = _REF_FALL_DB_PER_S * dt_ms / 1000.0
        self.unknown_phonemes: Counter[str] = Counter()  # mnemonics not in PHONEME_VISEME
        self.late_marks = 0
        self.reset()

    @property
    def lookahead_samples(self) -> int:
        """How far past a frame's sample marks are taken into account."""
        return self._look

    @property
    def latency_samples(self) -> int:
        """Samples past ``frame.sample`` that must have arrived before the frame is emitted."""
        return self._latency

    def reset(self) -> None:
        """Forget the stream; the next push starts again at frame 0, sample 0."""
        pad = max(0, self._half - self._rms_lead)
        self._buf = np.zeros(pad, np.float64)
        self._buf_start = -pad
        self._received = 0
        self._next = 0
        # Phonemes in order; the stream starts in silence until the first mark.
        self._starts: list[int] = [0]
        self._vis: list[int] = [_SIL]
        self._ref = _REF_START_DB
        self._level = 0.0

    def push(self, pcm: np.ndarray, marks: Iterable = ()) -> list[FaceFrame]:
        """Add mono PCM (int16 or float in [-1, 1]) and the phoneme marks whose samples
        fall in it (or any later ones); return the frames now complete."""
        x = np.asarray(pcm)
        if x.ndim != 1:
            raise ValueError(f"expected mono 1-D PCM, got shape {x.shape}")
        if x.dtype == np.int16:
            x = x.astype(np.float64) / 32768.0
        elif x.dtype.kind == "f":
            x = x.astype(np.float64)
        else:
            raise TypeError(f"expected int16 or float PCM, got {x.dtype}")
        for sample, phoneme in sorted((_mark_pair(m) for m in marks), key=lambda p: p[0]):
            self._add_mark(sample, phoneme)
        if len(x):
            self._buf = np.concatenate((self._buf, x))
            self._received += len(x)
        last_ok = self._received - self._latency
        stop = 0
        if last_ok >= 0:
            stop = frame_count(last_ok + 1, self.sample_rate, self.fps)
            while stop > 0 and frame_sample(stop - 1, self.sample_rate, self.fps) > last_ok:
                stop -= 1
        return self._emit(stop)

    def flush(self) -> list[FaceFrame]:
        """End of the stream: emit the remaining frames (audio zero-padded past the end,
        silence after the last sample) and reset."""
        total = frame_count(self._received, self.sample_rate, self.fps)
        # Marks at or past the end have no audio; silence follows the last sample.
        while len(self._starts) > 1 and self._starts[-1] >= self._received:
            self._starts.pop()
            self._vis.pop()
        self._starts.append(self._received)
        self._vis.append(_SIL)
        if total > self._next:
            last = frame_sample(total - 1, self.sample_rate, self.fps)
            missing = last + self._rms_lead + self._half - (self._buf_start + len(self._buf))
            if missing > 0:
                self._buf = np.concatenate((self._buf, np.zeros(missing)))
        frames = self._emit(total)
        self.reset()
        return frames

    def _add_mark(self, sample: int, phoneme: str) -> None:
        v = VISEMES.index(viseme_of(phoneme, self.unknown_phonemes))
        if sample < self._starts[-1]:
            self.late_marks += 1
            sample = self._starts[-1]
        if sample == self._starts[-1]:
            # Zero-length predecessor (espeak emits "_" then the next phoneme at one sample).
            self._vis[-1] = v
        else:
            self._starts.append(sample)
            self._vis.append(v)

    def _emit(self, stop: int) -> list[FaceFrame]:
        if stop <= self._next:
            return []
        idx = np.arange(self._next, stop, dtype=np.int64)
        samples = _frame_samples(idx, self.sample_rate, self.fps)
        values = self._values(samples)
        frames = [
            FaceFrame(int(i), int(s), v)
            for i, s, v in zip(idx.tolist(), samples.tolist(), values, strict=True)
        ]
        self._next = stop
        nxt = frame_sample(stop, self.sample_rate, self.fps)
        keep = nxt + self._rms_lead - self._half
        drop = min(keep - self._buf_start, len(self._buf))
        if drop > 0:
            self._buf = self._buf[drop:]
            self._buf_start += drop
        # Phonemes that ended more than the carry-over window ago no longer matter.
        k = 0
        while k < len(self._starts) - 1 and self._starts[k + 1] + self._carry <= nxt:
            k += 1
        if k:
            del self._starts[:k], self._vis[:k]
        return frames

    def _values(self, samples: np.ndarray) -> np.ndarray:
        level = self._loudness(samples)
        s = samples[:, None].astype(np.float64)
        starts = np.array(self._starts, np.float64)
        ends = np.append(starts[1:], np.inf)[None, :]
        starts = starts[None, :]
        vis = np.array(self._vis)
        ta, tc = self._tau_a[vis], self._tau_c[vis]
        ca, cc = self._cut_a[vis], self._cut_c[vis]
        before = starts - s  # > 0: the phoneme is still ahead
        after = s - ends  # >= 0: it is over
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            ant = (np.exp(-before / ta) - ca) / (1.0 - ca)
            car = (np.exp(-after / tc) - cc) / (1.0 - cc)
        # Marks at or past the horizon s + lookahead are not known yet for this frame.
        g = np.where(before > 0, np.where(before < self._look, ant, 0.0),
                     np.where(after >= 0, np.maximum(car, 0.0), 1.0))
        out = np.zeros((len(samples), NUM_FACE_VALUES))
        for cols, poses, alpha in self._groups:
            w = g * alpha[vis]
            # Sums over phonemes run in a fixed order per frame (axis 1 of a 3-D array),
            # so a frame does not depend on which other frames share the batch.
            out[:, cols] = (w[:, :, None] * poses[vis][None]).sum(axis=1) / (
                w.sum(axis=1)[:, None] + _EPS)
        out[:, _JAW] *= _JAW_FLOOR + (1.0 - _JAW_FLOOR) * level
        closure = np.clip((out[:, _CLOSE] - _CLOSE_LO) / (_CLOSE_HI - _CLOSE_LO), 0.0, 1.0)
        out[:, _CLOSE] = closure * out[:, _JAW]
        out[:, :NUM_BLENDSHAPES] = np.clip(out[:, :NUM_BLENDSHAPES], 0.0, 1.0)
        return out.astype(np.float32)

    def _loudness(self, samples: np.ndarray) -> np.ndarray:
        """Smoothed, speaker-normalised loudness in 0..1 per frame (sequential)."""
        starts = samples + (self._rms_lead - self._half - self._buf_start)
        view = np.lib.stride_tricks.sliding_window_view(self._buf, 2 * self._half)[starts]
        db = (10.0 * np.log10((view * view).mean(axis=1) + _EPS)).tolist()
        ref, lev = self._ref, self._level
        att, rel = self._lev_coef
        g0, g1 = _GATE_DB
        out = []
        for d in db:
            if d > ref:
                ref += (d - ref) * self._ref_rise
            elif d > g0:
                ref = max(_REF_FLOOR_DB, ref - self._ref_fall)
            x = min(1.0, max(0.0, (d - ref + _RANGE_DB) / (_RANGE_DB - 2.0)))
            gate = min(1.0, max(0.0, (d - g0) / (g1 - g0)))
            target = x * x * (3.0 - 2.0 * x) * gate
            lev += (target - lev) * (att if target > lev else rel)
            out.append(lev)
        self._ref, self._level = ref, lev
        return np.array(out)
