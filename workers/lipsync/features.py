"""Audio features for the transformer lipsync backend: numpy only (no torch, no librosa).

The feature layout follows NeuroSync's published extractor, so that weights trained on it
can be used. Facts checked (not code: this file is ours) against the public NeuroSync Local
API, as stored in the fork x5471140/NeuroSync_Local_API_humanoid:
utils/audio/extraction/extract_features.py (commit 35767a76) and utils/config.py (e5110603);
its requirements pin librosa 0.11.0, whose defaults fill in the rest.

* Audio at 88.2 kHz. Analysis windows of ``int(0.01667 * 88200)`` = 1470 samples (one 60 fps
  frame) with a hop of 735, i.e. *120* analysis frames per second, centred on ``735 * t``;
  each pair (2j, 2j + 1) is then averaged into 60 fps row j (an odd last frame stays alone).
  So row j sits 4.2 ms after ``j / 60`` s, and a clip of N samples gives
  ``ceil((1 + N // 735) / 2)`` rows. (A 1470-sample hop straight at 60 fps, as the brief
  guessed, is not what the published extractor does.)
* 23 MFCCs (librosa defaults: periodic Hann, zero-padded centred frames, power spectrum,
  128 Slaney mel bands 0..44.1 kHz with Slaney area norm, ``10 log10(max(1e-10, S))``
  floored 80 dB under the clip's peak, orthonormal DCT-II), normalised per coefficient
  over the whole clip (mean 0, std 1), plus deltas and delta-deltas (Savitzky-Golay,
  9 frames, ``interp`` edges): 69 values.
* 187 autocorrelation lags 1..187 of each mean-removed, symmetric-Hann window
  (reflect-padded at the clip edges), divided by lag 0; an all-zero first or last
  frame copies its neighbour.
* The published loader peak-normalises the clip first; with the 80 dB floor relative to
  the peak, per-clip MFCC normalisation and lag-0 normalisation that only matters for
  digital silence, so streaming skips it.

Row layout: [23 MFCC | 23 delta | 23 delta-delta | 187 autocorrelation] = 256.

Streaming (``FeatureStream``): the clip-wide steps (80 dB floor, MFCC mean/std) use every
analysis frame from the start of the stream up to the end of the rows asked for (plus the
4-frame delta context), a set fixed by the row numbers alone, so the result is identical
however the audio was split into pushes, and equals the offline features when one call
covers the whole clip (``extract_features`` is exactly that). Cross-checked once against
the published recipe run with librosa 0.11.0 (3 s of a gliding harmonic tone with noise and
200 ms of leading digital silence, odd frame count): largest difference 2.1e-6 on MFCCs
(librosa computes in float32), 3e-7 on deltas, 4e-8 on autocorrelation (our float32 output).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "FEATURE_RATE",
    "FRAME_LENGTH",
    "HOP",
    "NUM_FEATURES",
    "FeatureStream",
    "autocorrelation",
    "dct_matrix",
    "delta",
    "extract_features",
    "mel_filterbank",
    "mfcc_from_log_mel",
]

FEATURE_RATE = 88_200
FPS = 60
FRAME_LENGTH = 1470  # int(0.01667 * 88200): one 60 fps frame, the analysis window
HOP = FRAME_LENGTH // 2  # 735: analysis at 120 Hz, pairs averaged into 60 fps rows
HALF = FRAME_LENGTH // 2  # centred frames reach this far before/after their centre
N_MFCC = 23
N_MELS = 128
N_AUTOCORR = 187
NUM_FEATURES = 3 * N_MFCC + N_AUTOCORR  # 256
TOP_DB = 80.0
AMIN = 1e-10
CMVN_EPS = 1e-10
DELTA_WIDTH = 9
CONTEXT = DELTA_WIDTH // 2  # analysis frames a delta looks ahead (and back)
_EDGE_ZERO = 1e-7  # an autocorrelation frame below this everywhere counts as empty
_AC_NFFT = 4096  # >= 2 * 1470 - 1: linear (not circular) autocorrelation via the FFT


# --- building blocks ------------------------------------------------------------------------


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default): linear to 1 kHz, then logarithmic."""
    f = np.asarray(f, np.float64)
    lin = f * 3.0 / 200.0
    log = 15.0 + np.log(np.maximum(f, 1000.0) / 1000.0) * 27.0 / math.log(6.4)
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    lin = m * 200.0 / 3.0
    log = 1000.0 * np.exp((m - 15.0) * math.log(6.4) / 27.0)
    return np.where(m >= 15.0, log, lin)


def mel_filterbank(sr: int, n_fft: int, n_mels: int = N_MELS) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangles evenly spaced in Slaney mels from 0 Hz to Nyquist,
    each scaled to unit area (2 / bandwidth in Hz)."""
    bins = np.linspace(0.0, sr / 2.0, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(sr / 2.0), n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rise = (bins - lo) / (mid - lo)
    fall = (hi - bins) / (hi - mid)
    return np.maximum(0.0, np.minimum(rise, fall)) * (2.0 / (hi - lo))


def dct_matrix(n_out: int, n_in: int) -> np.ndarray:
    """First ``n_out`` rows of the orthonormal DCT-II on ``n_in`` points."""
    k = np.arange(n_out)[:, None]
    n = np.arange(n_in)[None, :]
    d = np.cos(np.pi * k * (2 * n + 1) / (2 * n_in)) * math.sqrt(2.0 / n_in)
    d[0] /= math.sqrt(2.0)
    return d


def _derivative_weights(width: int, order: int) -> np.ndarray:
    """Least-squares polynomial (degree ``order``) fit over ``width`` points: weights giving
    its ``order``-th derivative at the centre (a Savitzky-Golay differentiator)."""
    k = np.arange(width, dtype=np.float64) - width // 2
    vander = np.vander(k, order + 1, increasing=True)
    return math.factorial(order) * np.linalg.pinv(vander)[order]


_DELTA_W = {order: _derivative_weights(DELTA_WIDTH, order) for order in (1, 2)}


def delta(x: np.ndarray, order: int = 1) -> np.ndarray:
    """Delta features along axis 0 (time) like librosa's ``delta`` (width 9, ``interp``).

    The fit's degree equals the derivative's order, so the derivative is constant over each
    fitted window and ``interp`` edges equal the nearest full window's value. Fewer than 9
    frames: zeros (the published extractor refuses such clips).
    """
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    n, h = len(x), DELTA_WIDTH // 2
    if n < DELTA_WIDTH:
        return out
    view = np.lib.stride_tricks.sliding_window_view(x, DELTA_WIDTH, axis=0)
    out[h : n - h] = view @ _DELTA_W[order]
    out[:h] = out[h]
    out[n - h :] = out[n - h - 1]
    return out


def mfcc_from_log_mel(log_mel: np.ndarray, floor_db: float) -> np.ndarray:
    """(frames, n_mels) dB -> (frames, 23) MFCC, after flooring at ``floor_db``."""
    return np.maximum(log_mel, floor_db) @ _DCT.T


def autocorrelation(frames: np.ndarray) -> np.ndarray:
    """(k, 1470) raw windows -> (k, 187) normalised autocorrelation, lags 1..187."""
    w = (frames - frames.mean(axis=1, keepdims=True)) * _AC_WINDOW
    spec = np.fft.rfft(w, _AC_NFFT, axis=1)
    ac = np.fft.irfft(spec.real**2 + spec.imag**2, _AC_NFFT, axis=1)[:, 1 : N_AUTOCORR + 1]
    # Lag 0 directly: the FFT's rounding would turn digital silence into noise / ~0.
    energy = np.einsum("ij,ij->i", w, w)
    scale = np.divide(1.0, energy, out=np.zeros_like(energy), where=energy != 0.0)
    return ac * scale[:, None]  # an all-zero window stays zero, as published


def _log_mel(frames: np.ndarray) -> np.ndarray:
    """(k, 1470) zero-padded windows -> (k, 128) mel power in dB (not floored yet)."""
    spec = np.fft.rfft(frames * _STFT_WINDOW, FRAME_LENGTH, axis=1)
    power = spec.real**2 + spec.imag**2
    return 10.0 * np.log10(np.maximum(power @ _MEL.T, AMIN))


def _pairs(rows: np.ndarray, n: int) -> np.ndarray:
    """Average analysis rows ``(2i, 2i + 1)`` into ``n`` rows; ``rows`` may lack the last."""
    even = rows[0 : 2 * n : 2]
    odd = rows[1 : 2 * n : 2]
    out = even.copy()  # an odd clip's last frame has no partner: it stands alone
    out[: len(odd)] = (even[: len(odd)] + odd) / 2.0
    return out


_STFT_WINDOW = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(FRAME_LENGTH) / FRAME_LENGTH)
_AC_WINDOW = np.hanning(FRAME_LENGTH)  # symmetric, as np.hanning in the published code
_MEL = mel_filterbank(FEATURE_RATE, FRAME_LENGTH)
_DCT = dct_matrix(N_MFCC, N_MELS)


# --- streaming extractor --------------------------------------------------------------------


class FeatureStream:
    """Incremental 256-dim features from 88.2 kHz float audio.

    ``push`` audio, ``finish`` at the end, then ask for rows with ``rows(a, b)`` once
    ``ready(b)``. Analysis frame ``t`` covers samples ``[735 t - 735, 735 t + 735)``; it is
    computed once they have arrived. Memory: the dB mel spectra of the whole stream are kept
    for the clip-wide floor and MFCC statistics (512 B per analysis frame as float32,
    3.7 MB per minute); autocorrelation rows and audio are dropped once used.
    """

    def __init__(self) -> None:
        self._y = np.zeros(0, np.float64)  # audio from absolute sample _y0
        self._y0 = 0
        self._received = 0
        self._finished = False
        self._done = 0  # analysis frames computed
        self._mel = np.zeros((0, N_MELS), np.float32)
        self._mel_n = 0
        self._ac = np.zeros((0, N_AUTOCORR), np.float64)  # rows from analysis frame _ac0
        self._ac0 = 0
        self._first_checked = False  # the published fix for an empty frame 0

    # -- input --

    @property
    def received(self) -> int:
        return self._received

    @property
    def total_frames(self) -> int | None:
        """Analysis frames in the whole clip, once finished: ``1 + N // 735``."""
        return 1 + self._received // HOP if self._finished else None

    @property
    def total_rows(self) -> int | None:
        """60 fps rows the published extractor would give for the whole clip."""
        t = self.total_frames
        return None if t is None else (t + 1) // 2

    def push(self, y: np.ndarray) -> None:
        if self._finished:
            raise RuntimeError("push after finish")
        y = np.asarray(y, np.float64)
        if len(y):
            self._y = np.concatenate((self._y, y))
            self._received += len(y)
        # Frame t is complete once samples up to 735 t + 735 have arrived (one more for
        # frame 0's mirror padding, so simply: all frames t with 735 t + 736 <= received).
        self._compute(max(self._done, (self._received - 1) // HOP))

    def finish(self) -> None:
        if not self._finished:
            self._finished = True
            self._compute(self.total_frames)

    def ready(self, stop: int) -> bool:
        """Whether rows [.., stop) can be computed: every frame they and their deltas use."""
        return self._finished or self._done >= 2 * stop + CONTEXT

    # -- output --

    def rows(self, first: int, stop: int) -> np.ndarray:
        """(stop - first, 256) float32 feature rows [first, stop); rows past the clip's end
        (when finished) repeat its last row."""
        if not self.ready(stop):
            raise ValueError(f"rows up to {stop} need more audio")
        if 2 * first < self._ac0:
            raise ValueError(f"row {first} was already released")
        total = self.total_frames
        last = stop if total is None else min(stop, (total + 1) // 2)
        if last <= first:  # nothing real to give: repeat the clip's final row
            return np.repeat(self.rows(max(0, last - 1), last), stop - first, axis=0)
        end = 2 * last + CONTEXT if total is None else min(2 * last + CONTEXT, total)
        mel = self._mel[:end].astype(np.float64)
        mfcc_all = mfcc_from_log_mel(mel, float(mel.max()) - TOP_DB)
        mean = mfcc_all.mean(axis=0)
        scale = 1.0 / (mfcc_all.std(axis=0) + CMVN_EPS)
        lo = max(0, 2 * first - CONTEXT)
        seg = mfcc_all[lo:end]
        core = slice(2 * first - lo, 2 * first - lo + 2 * (last - first))
        cep = np.hstack((
            (seg[core] - mean) * scale,
            delta(seg, 1)[core] * scale,  # delta of (x - m) * s is delta(x) * s
            delta(seg, 2)[core] * scale,
        ))
        ac = self._ac[2 * first - self._ac0 : 2 * last - self._ac0]
        out = np.hstack((_pairs(cep, last - first), _pairs(ac, last - first)))
        if last < stop:
            out = np.vstack((out, np.repeat(out[-1:], stop - last, axis=0)))
        return out.astype(np.float32)

    def release(self, before: int) -> None:
        """Rows before ``before`` will not be asked for again: drop their autocorrelation."""
        drop = min(2 * before, self._done) - self._ac0
        if drop > 0:
            self._ac = self._ac[drop:]
            self._ac0 += drop

    # -- analysis --

    def _compute(self, stop: int | None) -> None:
        start = self._done
        if stop is None or stop <= start:
            return
        # Absolute sample range the windows of frames [start, stop) cover.
        lo, hi = start * HOP - HALF, (stop - 1) * HOP + HALF
        y = self._y
        base = self._y0
        stft_src, ac_src = y, y
        if lo < base:  # frame 0: zeros for the STFT, a mirror image for the autocorrelation
            pad = base - lo
            stft_src = np.concatenate((np.zeros(pad), stft_src))
            ac_src = np.concatenate((_reflect(y, pad, left=True), ac_src))
            base = lo
        end = base + len(stft_src)
        if hi > end:  # the clip's end (finish only)
            pad = hi - end
            stft_src = np.concatenate((stft_src, np.zeros(pad)))
            ac_src = np.concatenate((ac_src, _reflect(y, pad, left=False)))
        offsets = np.arange(start, stop) * HOP - HALF - base
        win_stft = np.lib.stride_tricks.sliding_window_view(stft_src, FRAME_LENGTH)[offsets]
        win_ac = np.lib.stride_tricks.sliding_window_view(ac_src, FRAME_LENGTH)[offsets]
        mel = _log_mel(win_stft).astype(np.float32)
        ac = autocorrelation(win_ac)
        self._append_mel(mel)
        self._append_ac(ac, stop)
        self._done = stop
        # Keep what frame `stop` onwards needs and the last 736 samples (the mirror image
        # padding the clip's end).
        keep = max(0, min(stop * HOP - HALF, self._received - HALF - 1))
        if keep > self._y0:
            self._y = self._y[keep - self._y0 :]
            self._y0 = keep

    def _append_mel(self, mel: np.ndarray) -> None:
        need = self._mel_n + len(mel)
        if need > len(self._mel):  # amortised growth
            grown = np.zeros((max(need, 2 * len(self._mel), 256), N_MELS), np.float32)
            grown[: self._mel_n] = self._mel[: self._mel_n]
            self._mel = grown
        self._mel[self._mel_n : need] = mel
        self._mel_n = need

    def _append_ac(self, ac: np.ndarray, stop: int) -> None:
        rows = np.vstack((self._ac, ac))
        # The published fix: an all-zero first (last) frame copies the next (previous) one.
        if not self._first_checked and stop >= 2:
            self._first_checked = True
            if self._ac0 == 0 and np.all(np.abs(rows[0]) < _EDGE_ZERO):
                rows[0] = rows[1]
        last = stop == self.total_frames and len(rows) >= 2
        if last and np.all(np.abs(rows[-1]) < _EDGE_ZERO):
            rows[-1] = rows[-2]
        self._ac = rows


def _reflect(y: np.ndarray, n: int, left: bool) -> np.ndarray:
    """``n`` samples of ``np.pad(y, mode="reflect")`` beyond one edge of ``y``."""
    if len(y) < 2:
        return np.zeros(n)
    padded = np.pad(y, (n, 0) if left else (0, n), mode="reflect")
    return padded[:n] if left else padded[-n:]


def extract_features(y: np.ndarray, sr: int = FEATURE_RATE, normalize: bool = True) -> np.ndarray:
    """Whole-clip features, (ceil((1 + N // 735) / 2), 256) float32, as published.

    ``y`` is float audio at ``sr``; other rates are resampled to 88.2 kHz with soxr.
    ``normalize`` divides by the peak first, like the published loader.
    """
    y = np.asarray(y, np.float64)
    if sr != FEATURE_RATE:
        import soxr  # a default dependency; imported here to keep module import light

        y = soxr.resample(y, sr, FEATURE_RATE)
    if normalize and len(y) and np.max(np.abs(y)) > 0:
        y = y / np.max(np.abs(y))
    stream = FeatureStream()
    stream.push(y)
    stream.finish()
    return stream.rows(0, stream.total_rows)
