"""Whisper through faster-whisper (CTranslate2): one decode per utterance, CPU or GPU.

Install with ``pip install -e ".[stt-faster-whisper]"``; the import is lazy, so this module loads
without the package and only constructing the backend fails.

A stream buffers its utterance. Every ``partial_every_s`` of new audio it decodes everything
buffered so far with greedy settings and returns the text as a partial; finish() decodes the
whole utterance once more with ``beam_size``. Whisper is not streaming: each decode pads the
audio to its 30 s window, so a partial costs a full encoder pass no matter how short the audio.

Decode settings, and why:

* One temperature (0.0), no fallback. faster-whisper's default re-decodes up to five more times
  at rising temperatures when the text looks repetitive or unlikely, which on a noisy utterance
  multiplies the latency at the end of speech by up to 6.
* No faster-whisper VAD and no timestamps: the stage's VAD already cut the utterance, and
  timestamp tokens only lengthen the decode.
* ``max_new_tokens`` (192) caps how long a hallucination loop on noise can run (a full
  448-token decode otherwise); 30 s of fast speech (~180 words/min) is ~140 tokens.
* Partials back off: after a partial that took d seconds to decode, the next one waits for at
  least 2*d seconds of new audio, so on a slow CPU partials use at most about half of real time
  and never fall behind the player.

Measured here (2-core CPU, shared; medians of 7) with a tiny random-weight model like the one
in tests/backends/test_stt_whisper.py (d_model 64, 2+2 layers, int8), 2 s of audio: load
5-50 ms; a decode ~35 ms with up to 32 new tokens (mostly the encoder over the padded 30 s
window), ~80 ms with 192; the first decode after loading takes 120-270 ms, hence the warm-up
decode in warm(). Real checkpoints need a download or files on disk; none were timed here.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

RATE = 16000
DEVICES = ("auto", "cpu", "cuda")
# CTranslate2's compute types (https://opennmt.net/CTranslate2/quantization.html).
COMPUTE_TYPES = ("default", "auto", "int8", "int8_float32", "int8_float16", "int8_bfloat16",
                 "int16", "float16", "bfloat16", "float32")
EXTRA = 'pip install -e ".[stt-faster-whisper]"'


def _import_faster_whisper():
    try:
        import faster_whisper
    except ImportError as exc:
        raise ImportError(f"the faster-whisper STT backend needs faster-whisper: {EXTRA} "
                          f"({exc})") from exc
    return faster_whisper


def _looks_like_path(model: str) -> bool:
    # Hub ids contain "/" too ("Systran/faster-whisper-small"): only explicit paths count.
    return model.startswith(("/", "./", "../", "~"))


def join_segments(texts) -> str:
    """Whisper segments start with a space and may carry newlines: one line, single spaces."""
    return " ".join(" ".join(t.split()) for t in texts if t and t.strip())


class FasterWhisperStream:
    """One utterance. Use it from one thread at a time; the model is shared and thread-safe."""

    def __init__(self, backend: FasterWhisperBackend):
        self._backend = backend
        self._chunks: list[np.ndarray] = []
        self._samples = 0
        self._since_partial = 0
        self._partial_gap = backend.partial_samples  # grows when partials decode slowly
        self._last = ""
        self._final: str | None = None
        self._closed = False

    def _audio(self) -> np.ndarray:
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0] if self._chunks else np.zeros(0, np.float32)

    def feed(self, samples: np.ndarray) -> str | None:
        """Buffer 16 kHz mono float32. Returns a new partial transcript when one was decoded
        and it changed; otherwise None."""
        if self._closed or self._final is not None:
            raise RuntimeError("feed() on a finished or closed recognizer stream")
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if not len(x):
            return None
        self._chunks.append(x)
        self._samples += len(x)
        self._since_partial += len(x)
        if not self._partial_gap or self._since_partial < self._partial_gap:
            return None
        self._since_partial = 0
        t0 = time.perf_counter()
        text = self._backend.transcribe(self._audio(), partial=True)
        took = int((time.perf_counter() - t0) * RATE)
        self._partial_gap = max(self._backend.partial_samples, 2 * took)
        if text and text != self._last:
            self._last = text
            return text
        return None

    def finish(self) -> str:
        """Final transcript ("" for no speech). Idempotent."""
        if self._final is not None:
            return self._final
        if self._closed:
            raise RuntimeError("finish() on a closed recognizer stream")
        self._final = self._backend.transcribe(self._audio()) if self._samples else ""
        self._chunks = []
        return self._final

    def speaker(self) -> str:
        return ""

    def close(self) -> None:
        self._closed = True
        self._chunks = []

    def __enter__(self) -> FasterWhisperStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FasterWhisperBackend:
    """``model``: a CTranslate2 Whisper directory, or a faster-whisper size / Hub id
    (``small.en``, ``Systran/faster-whisper-small``), downloaded on first load."""

    name = "faster-whisper"

    def __init__(self, model: str, device: str = "auto", compute_type: str = "int8",
                 beam_size: int = 1, language: str | None = "en", partial_every_s: float = 1.0,
                 max_new_tokens: int | None = 192, cpu_threads: int = 0, num_workers: int = 1,
                 download_root: str | None = None, local_files_only: bool = False):
        if not model:
            raise ValueError("faster-whisper: model (a directory or a model name) is not set")
        if device not in DEVICES:
            raise ValueError(f"faster-whisper: device must be one of {DEVICES}, got {device!r}")
        if compute_type not in COMPUTE_TYPES:
            raise ValueError(f"faster-whisper: compute_type must be one of {COMPUTE_TYPES}, "
                             f"got {compute_type!r}")
        if beam_size < 1:
            raise ValueError(f"faster-whisper: beam_size must be >= 1, got {beam_size}")
        if partial_every_s < 0:
            raise ValueError(f"faster-whisper: partial_every_s must be >= 0 (0: no partials), "
                             f"got {partial_every_s}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"faster-whisper: max_new_tokens must be >= 1, got {max_new_tokens}")
        if num_workers < 1 or cpu_threads < 0:
            raise ValueError("faster-whisper: num_workers must be >= 1 and cpu_threads >= 0")
        self._fw = _import_faster_whisper()
        self.model = model
        self.device = device
        self.compute_type = compute_type
        self.beam_size = beam_size
        self.language = language or None  # None: detected per decode (an extra encoder pass)
        self.partial_samples = int(partial_every_s * RATE)
        self.max_new_tokens = max_new_tokens
        self.cpu_threads = cpu_threads
        # Concurrent sessions decode in parallel only with several CTranslate2 workers (each a
        # model replica's worth of scratch memory); with 1 their decodes queue.
        self.num_workers = num_workers
        self.download_root = download_root
        self.local_files_only = local_files_only
        self._whisper = None
        self._lock = threading.Lock()

    def _load(self):
        if _looks_like_path(self.model) and not os.path.isdir(os.path.expanduser(self.model)):
            raise RuntimeError(f"faster-whisper: could not load model {self.model!r}: "
                               "no such directory")
        try:
            return self._fw.WhisperModel(
                os.path.expanduser(self.model), device=self.device,
                compute_type=self.compute_type, cpu_threads=self.cpu_threads,
                num_workers=self.num_workers, download_root=self.download_root,
                local_files_only=self.local_files_only)
        except Exception as exc:
            where = ("" if os.path.isdir(os.path.expanduser(self.model)) else
                     " (not a local directory, so it was looked up as a model name on the "
                     "Hugging Face Hub; without network access, convert or download it ahead "
                     "and pass its directory)")
            raise RuntimeError(
                f"faster-whisper: could not load model {self.model!r} on device={self.device} "
                f"compute_type={self.compute_type}{where}: {type(exc).__name__}: {exc}") from exc

    def _get(self):
        with self._lock:
            if self._whisper is None:
                self._whisper = self._load()
            return self._whisper

    def warm(self) -> None:
        """Load the model and run one short decode, so that the first utterance does not pay
        for allocations and kernel set-up (+0.1-0.2 s on the tiny CPU model, more on a GPU)."""
        self._get()
        self.transcribe(np.zeros(RATE // 2, np.float32), partial=True)

    def transcribe(self, audio: np.ndarray, partial: bool = False) -> str:
        """Decode one utterance (16 kHz mono float32) to one line of text."""
        segments, _info = self._get().transcribe(
            np.asarray(audio, dtype=np.float32), language=self.language,
            beam_size=1 if partial else self.beam_size, temperature=0.0,
            condition_on_previous_text=False, without_timestamps=True, vad_filter=False,
            max_new_tokens=self.max_new_tokens)
        return join_segments(s.text for s in segments)  # the generator decodes lazily

    def open_stream(self, speaker: str = "") -> FasterWhisperStream:
        return FasterWhisperStream(self)  # nothing to carry between a speaker's utterances
