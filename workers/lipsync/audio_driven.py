"""Streaming audio -> ARKit face values, from loudness and a few spectral cues.

Sans-I/O core: feed PCM with ``push``, end a stream with ``flush``; both return
the face frames that became computable. Nothing here knows about time except
through sample counts.

How a frame is made (frame ``i`` belongs to audio sample ``s_i``):

1. Features come from one Hann window of ``window_samples`` (~27 ms) per
   frame, centred ``lookahead_samples`` *after* ``s_i`` ("row i"): loudness in
   dBFS plus band energies, an F1-region centroid, the spectral centroid and
   the zero-crossing rate. The frame can therefore be emitted once sample
   ``s_i + lookahead_samples + window_samples // 2`` has arrived.
2. The lookahead is spent as context, not as a shift: the frame's own moment
   is row ``i - K`` (``K`` = whole frames in the lookahead, 2 at 40 ms and
   60 fps, so that row is centred 6.7 ms after ``s_i``) and rows
   ``i - K + 1 .. i`` are what comes next. A lip closure is the quiet gap
   itself; shifting every feature 40 ms early, as this mapper first did, put
   the closed lips before the gap and missed short stops. On
   benchmarks/lipsync.py (espeak, 340 p/b/m) that design closed the lips on
   39% of the bilabials, shut them at 12% of long vowels' centres and its
   JawOpen correlated 0.60 with the phoneme-driven one; this one: 96.5%, 3.6%
   and 0.82.
3. Loudness is normalised against a slow reference that follows the speaker's
   level (so quiet and loud voices both articulate) and gated in absolute terms
   so silence keeps the mouth shut.
4. The features give six targets in 0..1: ``open`` (level times vowel
   openness from the F1 centroid), ``round`` (low F1 and centroid: oo/oh),
   ``fric`` (high-band energy / zero crossings: s, sh, f, t), ``spread`` (front
   vowels: ee), a slow speech ``activity``, and ``closure``, the largest of:
   a dip in level inside speech (recent or within the lookahead) that does
   not hiss above 2.5 kHz (t, k and s closures and bursts do; a labial closure
   radiates only the voice bar); the voice bar of b (80-250 Hz holding
   >= 80% of the energy, which vowels, n and d do not reach); the murmur of m
   (low, plus a 0.9-1.6 kHz resonance that n lacks). Voiced th looks like a b
   below 250 Hz but carries 250-400 Hz, which vetoes the first two cues.
   Audio alone cannot tell every b from a d or g: the lips also shut on 10% of
   non-labial consonants (d, g, v, some n and l), against 3.7% for the
   phoneme-driven mapper.
5. Each target goes through a one-pole filter with a fast attack and a slower
   release; it is causal in frames, so it adds no latency beyond the lookahead.
6. A fixed linear map turns the smoothed targets into blendshapes; a closure
   shuts the jaw part way and seals the lips over the rest (MouthClose), so the
   lips meet even when the jaw is still partly open.

Determinism: each row's features depend only on the samples in its window
and the smoothers run frame by frame in plain Python floats, so the output is
bit-identical however the stream is split into pushes.

Cost, one core of the dev box, 22.05 kHz at 60 fps, measured side by side with
the first design: ~14.5k frames/s fed 50 ms chunks (was ~16k), ~6.5k fed 20 ms
chunks (7.7k), ~41k fed 1 s chunks (45k). Fixed per-push numpy overhead
dominates; even 20 ms chunks run >100x real time.

``PhonemeLipsync`` (phoneme_driven.py) reuses ``FaceFrame`` and the push/flush
contract.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from schemas.arkit import INDEX, NUM_BLENDSHAPES, NUM_FACE_VALUES, FaceFrame

__all__ = ["AudioLipsync", "FaceFrame", "frame_count", "frame_sample"]

WINDOW_MS = 27.0
_BLOCK = 128  # frames analysed per vectorised batch
_EPS = 1e-12

# Loudness normalisation (dB). The reference starts at a typical TTS speech level,
# rises quickly to louder speech and sinks slowly while speech continues.
_REF_START_DB = -20.0
_REF_FLOOR_DB = -45.0  # never normalise so far that background noise opens the mouth
_REF_RISE_MS = 80.0
_REF_FALL_DB_PER_S = 6.0
_RANGE_DB = 24.0  # levels from ref - _RANGE_DB (closed) up to ref - 2 dB (fully open)
_GATE_DB = (-58.0, -48.0)  # absolute gate: below the first value the mouth is closed

# Closure cues, each a (none, full) ramp. Levels are 0..1 after normalisation: espeak's
# vowels sit at ~0.9, its p at ~0.2, b at ~0.4 and m at ~0.65 (band shares measured over
# the benchmark's 40 utterances).
_DIP = (0.62, 0.3)  # level dip inside speech
_HISS = (0.12, 0.35)  # share above 2.5 kHz (t/k/s closures, bursts): closure .. none
_TH = (0.22, 0.32)  # 250-400 Hz share: b's voice bar ~0.15, voiced th's murmur ~0.45
_VBAR = (0.75, 0.85)  # 80-250 Hz share: b's voice bar ~0.85, d ~0.6, n ~0.6, vowels < 0.4
_NASAL_BAR = (0.4, 0.6)  # 80-250 Hz share of a nasal murmur
_NASAL_M = (0.03, 0.07)  # 0.9-1.6 kHz share of a murmur: n ~0.01, m ~0.12
_CLOSE_SHARP = (0.2, 0.7)  # smoothed closure -> lips sealed 0..1

# Smoothed channels and their (attack ms, release ms).
_TAU = {
    "open": (12.0, 50.0),
    "round": (35.0, 70.0),
    "fric": (15.0, 45.0),
    "spread": (30.0, 60.0),
    "closure": (10.0, 35.0),
    "activity": (20.0, 300.0),
}
_CHANNELS = tuple(_TAU)


def frame_sample(index: int, sample_rate: int, fps: int) -> int:
    """``round(index * sample_rate / fps)`` (half to even, like Python) in exact integers."""
    q, r = divmod(index * sample_rate, fps)
    return q + (1 if 2 * r > fps or (2 * r == fps and q % 2) else 0)


def frame_count(num_samples: int, sample_rate: int, fps: int) -> int:
    """Frames for a stream of ``num_samples``: ``ceil(num_samples * fps / sample_rate)``."""
    return -(-num_samples * fps // sample_rate)


def _frame_samples(idx: np.ndarray, sample_rate: int, fps: int) -> np.ndarray:
    q, r = np.divmod(idx * sample_rate, fps)
    up = (2 * r > fps) | ((2 * r == fps) & (q % 2 == 1))
    return q + up


def _clip01(x: np.ndarray) -> np.ndarray:
    # Two ufuncs: np.clip's Python wrapper cost ~13% of a 3-frame push.
    return np.minimum(np.maximum(x, 0.0), 1.0)


def _ramp(x: float, lo: float, hi: float) -> float:
    """0 at ``lo``, 1 at ``hi`` (either order), clipped."""
    return min(1.0, max(0.0, (x - lo) / (hi - lo)))


class AudioLipsync:
    """Streaming lipsync for one audio stream; ``flush`` ends it and resets for the next."""

    def __init__(self, sample_rate: int, fps: int = 60, lookahead_ms: float = 40.0) -> None:
        if sample_rate <= 0 or fps <= 0:
            raise ValueError("sample_rate and fps must be positive")
        if lookahead_ms < 0:
            raise ValueError("lookahead_ms must be >= 0")
        self.sample_rate = int(sample_rate)
        self.fps = int(fps)
        self._half = max(1, round(WINDOW_MS / 2000.0 * sample_rate))
        self._win = 2 * self._half
        self._look = round(lookahead_ms * sample_rate / 1000.0)
        # Whole frames in the lookahead: rows i-K+1..i are the future of frame i.
        self._k = self._look * self.fps // self.sample_rate
        self._nfft = 1 << (self._win - 1).bit_length()
        n = np.arange(self._win)
        self._hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / self._win)
        self._hann_sum = float(self._hann.sum())
        freqs = np.fft.rfftfreq(self._nfft, 1.0 / sample_rate)
        top = min(8000.0, sample_rate / 2.0)

        def band(lo: float, hi: float) -> slice:
            return slice(int(np.searchsorted(freqs, lo)), int(np.searchsorted(freqs, min(hi, top))))

        self._b_total = band(80.0, top)
        self._b_low = band(80.0, 900.0)  # F1 of most vowels, nasal murmur
        self._b_high = band(3500.0, top)  # frication
        self._b_f1 = band(200.0, 1000.0)
        self._b_burst = band(2500.0, top)  # hiss of t/k/s closures, bursts, aspiration
        self._b_nasal = band(900.0, 1600.0)  # second murmur resonance of m
        self._b_bar = band(80.0, 250.0)  # voice bar of a voiced closure, nasal murmur
        self._b_th = band(250.0, 400.0)  # strong in the murmur of voiced th, weak in b
        self._f_total = freqs[self._b_total]
        self._f_f1 = freqs[self._b_f1]
        dt_ms = 1000.0 / fps
        self._coef = [
            (1.0 - math.exp(-dt_ms / a), 1.0 - math.exp(-dt_ms / r)) for a, r in _TAU.values()
        ]
        self._ref_rise = 1.0 - math.exp(-dt_ms / _REF_RISE_MS)
        self._ref_fall = _REF_FALL_DB_PER_S * dt_ms / 1000.0
        self.reset()

    @property
    def lookahead_samples(self) -> int:
        """How far past its own sample a frame's analysis window is centred."""
        return self._look

    @property
    def window_samples(self) -> int:
        return self._win

    @property
    def latency_samples(self) -> int:
        """Samples past ``frame.sample`` that must have arrived before the frame is emitted."""
        return self._look + self._half

    def reset(self) -> None:
        """Forget the stream; the next push starts again at frame 0, sample 0."""
        # Zeros before sample 0 so the first windows (rows -K..-1 included) need no
        # special case.
        first = -frame_sample(self._k, self.sample_rate, self.fps) + self._look - self._half
        pad = max(0, -first)
        self._buf = np.zeros(pad, np.float64)
        self._buf_start = -pad  # absolute sample index of _buf[0]
        self._received = 0
        self._next = 0  # next frame index to emit
        self._ref = _REF_START_DB
        self._state = [0.0] * len(_CHANNELS)
        self._hist: deque[tuple[float, ...]] = deque(maxlen=self._k + 1)

    def push(self, pcm: np.ndarray) -> list[FaceFrame]:
        """Add mono PCM (int16, or float in [-1, 1]); return the frames now complete."""
        x = np.asarray(pcm)
        if x.ndim != 1:
            raise ValueError(f"expected mono 1-D PCM, got shape {x.shape}")
        if x.dtype == np.int16:
            x = x.astype(np.float64) / 32768.0
        elif x.dtype.kind == "f":
            x = x.astype(np.float64)
        else:
            raise TypeError(f"expected int16 or float PCM, got {x.dtype}")
        if len(x):
            self._buf = np.concatenate((self._buf, x))
            self._received += len(x)
        # Frame i is ready when s_i + latency <= received.
        last_ok = self._received - self.latency_samples
        stop = 0
        if last_ok >= 0:
            stop = frame_count(last_ok + 1, self.sample_rate, self.fps)
            while stop > 0 and frame_sample(stop - 1, self.sample_rate, self.fps) > last_ok:
                stop -= 1  # rounding put that frame's sample just past last_ok
        return self._emit(stop)

    def flush(self) -> list[FaceFrame]:
        """End of the stream: emit the remaining frames (windows zero-padded past the
        end) so the stream has ``ceil(samples * fps / sample_rate)`` frames, then reset."""
        total = frame_count(self._received, self.sample_rate, self.fps)
        if total > self._next:
            last = frame_sample(total - 1, self.sample_rate, self.fps)
            missing = last + self.latency_samples - (self._buf_start + len(self._buf))
            if missing > 0:
                self._buf = np.concatenate((self._buf, np.zeros(missing)))
        frames = self._emit(total)
        self.reset()
        return frames

    def _emit(self, stop: int) -> list[FaceFrame]:
        if stop <= self._next:
            return []
        # The first call also analyses rows -K..-1: the "present" of frames 0..K-1.
        first_row = self._next - self._k if self._next == 0 else self._next
        rows = np.arange(first_row, stop, dtype=np.int64)
        row_samples = _frame_samples(rows, self.sample_rate, self.fps)
        starts = row_samples + (self._look - self._half - self._buf_start)
        view = np.lib.stride_tricks.sliding_window_view(self._buf, self._win)
        # Blocks keep the (frames, nfft) work arrays in cache on long pushes.
        feats = np.concatenate([
            self._targets(view[starts[b : b + _BLOCK]]) for b in range(0, len(starts), _BLOCK)
        ])
        values = self._blendshapes(self._smooth(feats))
        idx = rows[len(rows) - len(values):]
        samples = row_samples[len(rows) - len(values):]
        frames = [
            FaceFrame(int(i), int(s), v)
            for i, s, v in zip(idx.tolist(), samples.tolist(), values, strict=True)
        ]
        self._next = stop
        # Keep only what the next frame's window still needs.
        keep = frame_sample(stop, self.sample_rate, self.fps) + self._look - self._half
        drop = min(keep - self._buf_start, len(self._buf))  # the end must stay at _received
        if drop > 0:
            self._buf = self._buf[drop:]
            self._buf_start += drop
        return frames

    def _targets(self, w: np.ndarray) -> np.ndarray:
        """Per-row features -> raw inputs (rows, 11), vectorised over rows: dB, gate,
        fric, openness, roundness, spread, murmur, and the closure cues hiss, th-like,
        m-like and bar-like (each 0..1)."""
        # Row-wise sums only (no BLAS): summation order must not depend on the batch size.
        db = 10.0 * np.log10((w * w * self._hann).sum(axis=1) / self._hann_sum + _EPS)
        spec = np.fft.rfft(w * self._hann, self._nfft, axis=1)
        p = spec.real**2 + spec.imag**2
        total = p[:, self._b_total].sum(axis=1) + _EPS

        def share(b: slice) -> np.ndarray:
            return p[:, b].sum(axis=1) / total

        low = share(self._b_low)
        high = share(self._b_high)
        pf1 = p[:, self._b_f1]
        f1 = (pf1 * self._f_f1).sum(axis=1) / (pf1.sum(axis=1) + _EPS)
        centroid = (p[:, self._b_total] * self._f_total).sum(axis=1) / total
        zcr = np.count_nonzero(np.diff(np.signbit(w), axis=1), axis=1) / self._win
        bar = share(self._b_bar)

        def ramp(x: np.ndarray, lo_hi: tuple[float, float]) -> np.ndarray:
            return _clip01((x - lo_hi[0]) / (lo_hi[1] - lo_hi[0]))

        out = np.empty((len(w), 11))
        out[:, 0] = db
        out[:, 1] = (db - _GATE_DB[0]) / (_GATE_DB[1] - _GATE_DB[0])
        out[:, 2] = np.maximum((high - 0.25) / 0.45, (zcr - 0.15) / 0.3)
        out[:, 3] = (f1 - 280.0) / 380.0  # F1 ~280 Hz for ee/oo, ~700 Hz for ah
        # oo/oh/w: low F1 and centroid, but not the bare low murmur of a nasal.
        out[:, 4] = (
            _clip01((900.0 - centroid) / 300.0)
            * _clip01((centroid - 380.0) / 100.0)
            * _clip01((650.0 - f1) / 250.0)
        )
        out[:, 5] = _clip01((centroid - 850.0) / 300.0) * _clip01((500.0 - f1) / 150.0)
        # m/n/b murmur: nearly all energy below 900 Hz and a very low centroid.
        out[:, 6] = _clip01((450.0 - centroid) / 100.0) * _clip01((low - 0.85) / 0.1)
        out[:, 1:4] = _clip01(out[:, 1:4])
        out[:, 7] = ramp(share(self._b_burst), _HISS)
        out[:, 8] = ramp(share(self._b_th), _TH)
        out[:, 9] = ramp(bar, _NASAL_BAR) * ramp(share(self._b_nasal), _NASAL_M)
        out[:, 10] = ramp(bar, _VBAR)
        return out

    def _smooth(self, t: np.ndarray) -> np.ndarray:
        """Sequential part: loudness reference, level, closure, attack/release smoothing.

        Each row becomes a tuple in a queue; frame i is produced once its present
        row i - K has the K rows after it. Returns (frames, 6) smoothed channels in
        ``_CHANNELS`` order: K fewer than rows on the stream's first call.
        """
        ref = self._ref
        state = self._state
        coef = self._coef
        hist = self._hist
        k = self._k
        rise, fall = self._ref_rise, self._ref_fall
        out = []
        target = [0.0] * len(_CHANNELS)
        for row in t.tolist():
            db, gate = row[0], row[1]
            if db > ref:
                ref += (db - ref) * rise
            elif db > _GATE_DB[0]:  # only sink during sound, so pauses don't raise the gain
                ref = max(_REF_FLOOR_DB, ref - fall)
            x = min(1.0, max(0.0, (db - ref + _RANGE_DB) / (_RANGE_DB - 2.0)))
            row[0] = x * x * (3.0 - 2.0 * x) * gate  # level; smoothstep: consonants stay small
            hist.append(row)
            if len(hist) <= k:
                continue  # rows before frame 0: only context
            level, gate, fric, openness, rounded, spread, murmur, hiss, th, m_like, bar = hist[0]
            voiced = level * (1.0 - fric)
            target[0] = voiced * (0.35 + 0.65 * openness) * (1.0 - 0.8 * murmur)
            target[1] = min(1.0, 1.5 * level) * rounded * (1.0 - fric)
            target[2] = min(1.0, 2.5 * level) * fric  # frication is quiet; lower bar
            target[3] = voiced * spread
            # Closure needs speech around it: recent (activity) or just ahead.
            speech = max(state[5], max(h[0] for h in hist))
            # Voiced th has a labial-looking low murmur but strong 250-400 Hz; near
            # silence (gate < 1, level ~0) has no usable spectrum and counts as dark.
            labial = 1.0 - _ramp(level, 0.1, 0.25) * th
            dip = _ramp(level, _DIP[0], _DIP[1]) * (1.0 - gate * hiss) * (1.0 - fric)
            target[4] = max(
                dip * labial * speech,
                bar * labial * min(1.0, 3.0 * level) * speech,  # voice bar of b
                m_like * min(1.0, 2.0 * level),  # murmur of m
            )
            target[5] = level
            for j in range(len(state)):
                y = state[j]
                v = target[j]
                att, rel = coef[j]
                state[j] = y + (v - y) * (att if v > y else rel)
            out.append(tuple(state))
        self._ref = ref
        return np.array(out, np.float64).reshape(-1, len(_CHANNELS))

    @staticmethod
    def _blendshapes(ch: np.ndarray) -> np.ndarray:
        o, r, f, s, c, _activity = ch.T
        unround = 1.0 - r
        seal = _clip01((c - _CLOSE_SHARP[0]) / (_CLOSE_SHARP[1] - _CLOSE_SHARP[0]))
        v = np.zeros((len(ch), NUM_FACE_VALUES), np.float64)
        jaw = (0.7 * o * (1.0 - 0.3 * r) + 0.08 * f) * (1.0 - 0.5 * seal)

        def put(name: str, value: np.ndarray) -> None:
            v[:, INDEX[name]] = value

        def pair(stem: str, value: np.ndarray) -> None:
            put(stem + "Left", value)
            put(stem + "Right", value)

        put("JawOpen", jaw)
        put("MouthFunnel", 0.55 * r)
        put("MouthPucker", 0.7 * r)
        pair("MouthLowerDown", (0.45 * o * unround + 0.25 * f) * (1.0 - seal))
        pair("MouthUpperUp", (0.3 * o * unround + 0.3 * f) * (1.0 - seal))
        pair("MouthStretch", 0.12 * o * unround + 0.3 * f + 0.3 * s)
        pair("MouthSmile", 0.15 * s)
        # MouthClose seals the lips over an open jaw, so it must not exceed JawOpen.
        put("MouthClose", seal * jaw)
        pair("MouthPress", 0.45 * seal)
        put("MouthShrugUpper", 0.15 * seal)
        v[:, :NUM_BLENDSHAPES] = _clip01(v[:, :NUM_BLENDSHAPES])
        return v.astype(np.float32)
