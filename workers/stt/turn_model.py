"""End-of-turn model: does the utterance so far sound finished? (Smart Turn v3.2)

Smart Turn v3.2 (BSD-2; a Whisper-tiny encoder with a classifier head, 8 MB int8 ONNX) hears the
last 8 s of an utterance and gives the probability that the speaker is done: it tells "I want…"
(rising or level pitch, a word that leads on) from "I want the sword." Its weights ship inside
the ``pipecat-ai`` wheel (``pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx``); the
``turn`` extra installs that wheel without its dependencies (only the file is used; nothing of
pipecat is imported) and ``onnxruntime`` to run it. Features and inference are ours.

Input format (facts of the model): 16 kHz mono, the last 8 s (128000 samples; shorter audio is
zero-padded at the front), normalised to zero mean and unit variance, then Whisper's log-mel
spectrogram: periodic Hann window of 400, hop 160, reflect padding of 200 at both ends, power
spectrum, 80 Slaney-scale mel filters over 0-8 kHz with Slaney area normalisation, the last
frame dropped (800 frames), log10 floored at 1e-10, clamped to 8 below the maximum, then
(x + 4) / 4. The output is already a probability.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

RATE = 16000
SECONDS = 8
N_FFT = 400
HOP = 160
N_MELS = 80
WEIGHTS = ("audio", "turn", "smart_turn", "data", "smart-turn-v3.2-cpu.onnx")


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    # Slaney: linear below 1 kHz (3 mels per 200 Hz), logarithmic above (27 mels per factor 6.4)
    f = np.asarray(f, np.float64)
    lin = 3.0 * f / 200.0
    log = 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) * 27.0 / np.log(6.4)
    return np.where(f >= 1000.0, log, lin)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    lin = 200.0 * m / 3.0
    log = 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0)
    return np.where(m >= 15.0, log, lin)


@lru_cache(maxsize=1)
def mel_filters() -> np.ndarray:
    """(N_MELS, N_FFT // 2 + 1) triangular filters, each scaled to unit area (Slaney norm)."""
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(RATE / 2), N_MELS + 2))
    bins = np.linspace(0.0, RATE / 2, N_FFT // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None, :] - lo) / (mid - lo)
    falling = (hi - bins[None, :]) / (hi - mid)
    tri = np.clip(np.minimum(rising, falling), 0.0, None)
    return tri * (2.0 / (hi - lo))


@lru_cache(maxsize=1)
def _window() -> np.ndarray:
    n = np.arange(N_FFT)
    return 0.5 - 0.5 * np.cos(2 * np.pi * n / N_FFT)  # periodic Hann


def fit_window(audio: np.ndarray) -> np.ndarray:
    """The last 8 s of ``audio`` (16 kHz), zero-padded at the front when shorter."""
    n = RATE * SECONDS
    x = np.asarray(audio, np.float32).reshape(-1)[-n:]
    return np.concatenate([np.zeros(n - len(x), np.float32), x]) if len(x) < n else x


def log_mel(audio: np.ndarray) -> np.ndarray:
    """Whisper-style (80, 800) log-mel features of exactly 8 s of 16 kHz audio."""
    x = fit_window(audio)
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    power = np.abs(np.fft.rfft(frames * _window(), axis=-1)) ** 2  # (frames, bins)
    mel = np.log10(np.maximum(mel_filters() @ power.T, 1e-10))[:, :-1]
    mel = np.maximum(mel, mel.max() - 8.0)
    return ((mel + 4.0) / 4.0).astype(np.float32)


def find_weights(path: str = "") -> Path:
    """The model file: ``path`` when given, else the one inside the installed pipecat-ai wheel.
    Raises FileNotFoundError that says how to get it."""
    if path:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"stt.turn_model_path {path!r}: no such file")
        return p
    spec = importlib.util.find_spec("pipecat")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Smart Turn weights come with the pipecat-ai wheel, which "
                                "is not installed: scripts/bootstrap.sh turn (pip install "
                                "--no-deps pipecat-ai, plus onnxruntime)")
    p = Path(next(iter(spec.submodule_search_locations))).joinpath(*WEIGHTS)
    if not p.is_file():
        raise FileNotFoundError(f"pipecat-ai is installed but {p} is missing (a version "
                                "without Smart Turn v3.2?)")
    return p


def available(path: str = "") -> str | None:
    """Why the end-of-turn model cannot run here, or None when it can."""
    try:
        find_weights(path)
        import onnxruntime  # noqa: F401
    except (FileNotFoundError, ImportError) as exc:
        return str(exc)
    return None


class SmartTurn:
    """``predict(audio)`` -> probability that the utterance in ``audio`` (16 kHz) is complete.
    One thread: the STT worker serves many sessions and a 2-core machine has other stages."""

    def __init__(self, path: str = "", threads: int = 1):
        import onnxruntime as ort

        self.path = find_weights(path)
        self.name = self.path.stem  # the worker's health names the file that runs
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._session = ort.InferenceSession(str(self.path), sess_options=opts,
                                             providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name

    def predict(self, audio: np.ndarray) -> float:
        feats = log_mel(audio)[None]
        out = self._session.run(None, {self._input: feats})[0]
        return float(np.asarray(out).reshape(-1)[0])

    def warm(self) -> None:
        self.predict(np.zeros(RATE, np.float32))
