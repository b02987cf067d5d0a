"""Whisper through whisperX's batched faster-whisper pipeline, batched ACROSS sessions (GPU;
also runs on CPU).

Install with ``pip install -e ".[stt-whisperx]"`` in its own environment (whisperX and vLLM pin
different torch versions). whisperX 3.8 pins torch~=2.8.0 with torchaudio, torchvision and
pyannote.audio 4, and PyPI's Linux x86_64 torch 2.8.0 is the CUDA 12.8 build: about 4 GB of
wheels even for CPU use. The import is lazy: this module loads without whisperX and only
constructing the backend fails.

whisperX batches the VAD chunks of one long recording. A worker here holds many short
utterances from many sessions instead, so the batch is across sessions: each stream buffers
its utterance, and finish() hands the audio to a shared micro-batcher
(``workers.batching.MicroBatcher``) that gathers the finish() calls arriving within
``window_ms`` (up to ``batch_size``) and decodes them in one batched encoder + generate call.
On a GPU one batch of 8 costs little more than one utterance, so under load the end-of-speech
latency stays near a single decode instead of queueing behind the other sessions.

* whisperX's own VAD is not used (the stage's VAD already cut the utterance), so no VAD model
  is loaded or downloaded.
* An utterance longer than Whisper's 30 s window is cut at the quietest 20 ms frame of the
  last 2 s before each 30 s mark; its windows join the batch like separate utterances and their
  texts are put back together in order.
* No partial transcripts: feed() only buffers (a partial would cost a batched decode per
  session per second).
* Each utterance's windows become a result in whisperX's documented format
  (``{"segments": [{"text", "start", "end"}], "language"}``) and the transcript is read from
  that, so the same reader handles ``FasterWhisperPipeline.transcribe()`` output.

What runs where: argument checks, the batching glue, window splitting and result parsing are
tested on CPU (tests/backends/test_stt_whisper.py) with a stand-in for the model call. The real
``_WhisperXModel`` (whisperX 3.8.6 loading a local CTranslate2 model and its batched decode) is
tested on CPU with a tiny random Whisper in the whisperX environment that
``scripts/backend-env.sh whisperx`` builds; it is skipped where whisperX is not installed. Real
checkpoints on a GPU are not tested.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

RATE = 16000
WINDOW = 30 * RATE  # Whisper's input window
_SEARCH = 2 * RATE  # where a long utterance may be cut: the last 2 s before the 30 s mark
_FRAME = 320  # 20 ms frames for finding the quietest cut point
DEVICES = ("cuda", "cpu")
EXTRA = 'pip install -e ".[stt-whisperx]"'

ModelCall = Callable[[list[np.ndarray]], Sequence[Any]]


def _import_whisperx():
    try:
        import whisperx
    except ImportError as exc:
        raise ImportError(f"the whisperx STT backend needs whisperX: {EXTRA} ({exc})") from exc
    return whisperx


def split_windows(audio: np.ndarray, window: int = WINDOW) -> list[tuple[int, np.ndarray]]:
    """(start sample, piece) pieces of at most ``window`` samples, cut in quiet frames."""
    pieces = []
    start = 0
    search = min(_SEARCH, window // 2)
    while len(audio) - start > window:
        lo = start + window - search
        frames = audio[lo:lo + search // _FRAME * _FRAME].reshape(-1, _FRAME)
        cut = lo + (int(np.argmin(np.square(frames).mean(axis=1))) + 1) * _FRAME
        pieces.append((start, audio[start:cut]))
        start = cut
    if len(audio) > start:
        pieces.append((start, audio[start:]))
    return pieces


def segment_text(out: Any) -> str:
    """Text of one window: a string (one item of ``generate_segment_batched``'s ``"text"``
    list) or a ``{"text": ...}`` mapping (an item of its pipeline's output)."""
    if isinstance(out, Mapping):
        out = out.get("text", "")
    if isinstance(out, (list, tuple)):  # the pipeline's text for batch_size 1 is [text]
        out = out[0] if out else ""
    if not isinstance(out, str):
        raise TypeError(f"unexpected whisperx segment output {type(out).__name__}: {out!r:.80}")
    return out


def transcript_from_result(result: Mapping) -> str:
    """One line of text from whisperX's result format:
    ``{"segments": [{"text": str, "start": float, "end": float, ...}], "language": str}``."""
    if not isinstance(result, Mapping) or not isinstance(result.get("segments"), list):
        raise ValueError(f"not a whisperx result (no segments list): {result!r:.120}")
    texts = (seg.get("text", "") for seg in result["segments"])
    return " ".join(" ".join(t.split()) for t in texts if t and t.strip())


class _UnusedVad:
    """Handed to whisperx.load_model() so that it loads no VAD model (its default, pyannote's,
    ships in the wheel but costs load time and memory; silero's comes from torch.hub, the
    network): Parley's own VAD segments the audio, and only transcribe() would call this."""

    def __call__(self, *args, **kwargs):
        raise RuntimeError("whisperX VAD is not used by Parley: utterances come pre-segmented")


class _WhisperXModel:
    """The model call: whisperX's pipeline, fed log-mel windows directly. Loading, and one
    batched encoder + generate over up to batch_size windows of at most 30 s. Returns one
    text per window."""

    def __init__(self, whisperx, model: str, device: str, compute_type: str, language: str,
                 beam_size: int, cpu_threads: int):
        # threads: CTranslate2's intra-op threads on CPU (whisperX's own default is 4).
        self.pipeline = whisperx.load_model(
            model, device, compute_type=compute_type, language=language,
            asr_options={"beam_size": beam_size}, vad_model=_UnusedVad(), threads=cpu_threads)

    def __call__(self, windows: list[np.ndarray]) -> list[str]:
        p = self.pipeline
        # The pipeline's preprocess: log-mel with the model's mel count, padded to 30 s.
        feats = [p.preprocess({"inputs": w})["inputs"] for w in windows]
        batch = np.stack([f.numpy() if hasattr(f, "numpy") else np.asarray(f) for f in feats])
        out = p.model.generate_segment_batched(batch.astype(np.float32), p.tokenizer, p.options)
        # whisperX 3.x returns the whole batch as {"text": [str per row], "avg_logprob": [...]};
        # list() of that mapping would be its two keys, not the texts.
        if not isinstance(out, Mapping) or not isinstance(out.get("text"), list):
            raise TypeError(f"unexpected generate_segment_batched output: {out!r:.120}")
        return out["text"]


class WhisperXStream:
    """One utterance: buffered, decoded in a cross-session batch at finish()."""

    def __init__(self, backend: WhisperXBackend):
        self._backend = backend
        self._chunks: list[np.ndarray] = []
        self._final: str | None = None
        self._closed = False

    def feed(self, samples: np.ndarray) -> str | None:
        """Buffer 16 kHz mono float32; whisperX gives no partials, so always None."""
        if self._closed or self._final is not None:
            raise RuntimeError("feed() on a finished or closed recognizer stream")
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if len(x):
            self._chunks.append(x)
        return None

    def finish(self) -> str:
        """Final transcript ("" for no speech). Blocks until this utterance's batch is
        decoded, so call it from a worker thread. Idempotent."""
        if self._final is not None:
            return self._final
        if self._closed:
            raise RuntimeError("finish() on a closed recognizer stream")
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
        self._chunks = []
        self._final = self._backend.submit(audio) if len(audio) else ""
        return self._final

    def speaker(self) -> str:
        return ""

    def close(self) -> None:
        self._closed = True
        self._chunks = []

    def __enter__(self) -> WhisperXStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class WhisperXBackend:
    """``batch_size``: most windows per batched decode (GPU memory bound: each is a 30 s mel).
    ``window_ms``: how long the batcher waits for more finish() calls after the first.
    ``cpu_threads``: CTranslate2 threads when ``device="cpu"`` (0: CTranslate2's default).

    ``model_call`` and ``batcher`` are seams for tests and benchmarks: a stand-in for the
    batched model call (then whisperX is not imported), and the micro-batcher class."""

    name = "whisperx"

    def __init__(self, model: str, device: str = "cuda", compute_type: str = "float16",
                 batch_size: int = 8, language: str = "en", beam_size: int = 1,
                 window_ms: float = 5.0, cpu_threads: int = 0, *,
                 model_call: ModelCall | None = None,
                 batcher: Callable[..., Any] | None = None):
        if not model:
            raise ValueError("whisperx: model (a name or a directory) is not set")
        if device not in DEVICES:
            raise ValueError(f"whisperx: device must be one of {DEVICES}, got {device!r}")
        if not compute_type:
            raise ValueError("whisperx: compute_type is not set")
        if batch_size < 1:
            raise ValueError(f"whisperx: batch_size must be >= 1, got {batch_size}")
        if not language:
            # The batched decode shares one prompt, so it cannot detect a language per session.
            raise ValueError("whisperx: language must be set (batched decoding has no "
                             "per-utterance language detection)")
        if beam_size < 1:
            raise ValueError(f"whisperx: beam_size must be >= 1, got {beam_size}")
        if window_ms < 0:
            raise ValueError(f"whisperx: window_ms must be >= 0, got {window_ms}")
        if cpu_threads < 0:
            raise ValueError(f"whisperx: cpu_threads must be >= 0, got {cpu_threads}")
        self._whisperx = _import_whisperx() if model_call is None else None
        self.model = model
        self.device = device
        self.compute_type = compute_type
        self.batch_size = batch_size
        self.language = language
        self.beam_size = beam_size
        self.cpu_threads = cpu_threads
        self._model_call = model_call
        self._lock = threading.Lock()
        if batcher is None:
            from workers.batching import MicroBatcher as batcher
        # The model call always runs in the batcher's one thread (CUDA likes a single thread).
        self._batcher = batcher(self._decode_batch, max_batch=batch_size, window_ms=window_ms)

    def _get_model(self) -> ModelCall:
        with self._lock:
            if self._model_call is None:
                try:
                    self._model_call = _WhisperXModel(self._whisperx, self.model, self.device,
                                                      self.compute_type, self.language,
                                                      self.beam_size, self.cpu_threads)
                except Exception as exc:
                    raise RuntimeError(
                        f"whisperx: could not load model {self.model!r} on {self.device} "
                        f"({self.compute_type}): {type(exc).__name__}: {exc}") from exc
            return self._model_call

    def warm(self) -> None:
        """Load the model and decode 0.5 s of silence once (CUDA kernels, allocator pools),
        both in the batcher's thread, where every later decode runs."""
        self.submit(np.zeros(RATE // 2, np.float32))

    def open_stream(self, speaker: str = "") -> WhisperXStream:
        return WhisperXStream(self)  # nothing to carry between a speaker's utterances

    def submit(self, audio: np.ndarray) -> str:
        """Transcript of one utterance, decoded in a batch with whatever else is waiting."""
        return self._batcher.submit(audio)

    def _decode_batch(self, audios: list[np.ndarray]) -> list[str]:
        """The batcher's function: utterances in, one transcript per utterance out (in order).
        Windows of all utterances are decoded together, batch_size per model call."""
        model = self._get_model()
        owners: list[tuple[int, int, int]] = []  # (utterance, start, length) per window
        windows: list[np.ndarray] = []
        for i, audio in enumerate(audios):
            for start, piece in split_windows(np.asarray(audio, dtype=np.float32).reshape(-1)):
                owners.append((i, start, len(piece)))
                windows.append(piece)
        texts: list[str] = []
        for k in range(0, len(windows), self.batch_size):
            chunk = windows[k:k + self.batch_size]
            out = list(model(chunk))
            if len(out) != len(chunk):
                raise RuntimeError(f"whisperx returned {len(out)} texts for {len(chunk)} windows")
            texts.extend(segment_text(o) for o in out)
        results = [{"segments": [], "language": self.language} for _ in audios]
        for (i, start, length), text in zip(owners, texts, strict=True):
            results[i]["segments"].append(
                {"text": text, "start": start / RATE, "end": (start + length) / RATE})
        return [transcript_from_result(r) for r in results]

    def close(self) -> None:
        """Stop the batcher: utterances already submitted are still decoded; a finish()
        after this fails (``BatcherClosed``)."""
        self._batcher.close()
