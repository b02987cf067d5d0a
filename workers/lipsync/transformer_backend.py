"""Streaming lipsync from a NeuroSync-architecture transformer, batched across sessions.

``TransformerLipsync`` has AudioLipsync's contract (``push(pcm) -> frames``, ``flush()``,
``FaceFrame(index, sample, values)``, ``ceil(samples * fps / rate)`` frames per stream, frame
``i`` stamped ``frame_sample(i, rate, fps)``). Importing this module needs no torch: torch
and transformer_model.py load when the first ``TransformerRunner`` is built.

Pipeline, per stream: PCM -> float -> soxr stream to 88.2 kHz (bit-identical however it is
chunked) -> ``FeatureStream`` (features.py, 256 per 60 fps row) -> windows of 128 rows
starting every 96 (32 rows of overlap) -> model -> linear cross-fade over each overlap,
weight ``i / 32`` on the newer window -> face values. As published (NeuroSync Local API,
utils/audio/processing/audio_processing.py, checked in x5471140/NeuroSync_Local_API_humanoid
at 56f1ada7): a window past the end of the stream is padded by repeating its last row and
windows start while ``start < frames`` (a final window inside the previous one's overlap
cross-fades over its own length); outputs 0..60 are divided by 100; the first 0.1 s eases in
from 0; eye blink/look, TongueOut and the nine head/eye rotations are zeroed (the published
player does the same; Parley's IdleFace layer drives eyes and head). Outputs keep the model's
order, which is Unreal's EARFaceBlendShape order (the published player writes output ``i``
to blendshape ``i``). The 7 emotions never reach the face; ``emotions`` holds them.

Latency (in audio, before compute): a frame leaves once the window that finishes it has run,
i.e. once the audio reaches that window's end (128 rows after its first) plus 33 ms (the
deltas' 4 analysis frames of look-ahead, the last reaching 8.3 ms past its centre), plus
soxr's output block (<= 38 ms). So a window's first frame waits 2.13 s + 33..71 ms of audio,
the frame before the next overlap 0.55 s + 33..71 ms. Measured (22.05 kHz, 10 ms pushes,
8 s): 604..2214 ms, mean 1.41 s. A reply shorter than ~2.2 s is answered entirely at
``flush``. Model time comes on top (see docs/backends/lipsync-transformer.md).

Streaming features differ from the published whole-clip ones in one respect: the MFCC
normalisation and 80 dB floor use the audio so far (from the stream's start to the window's
end) rather than the whole clip; for streams that fit in one window they are identical.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import soxr

from schemas.arkit import INDEX, NUM_BLENDSHAPES, NUM_FACE_VALUES
from workers.lipsync.audio_driven import FaceFrame, frame_count, frame_sample
from workers.lipsync.features import FEATURE_RATE, NUM_FEATURES, FeatureStream

__all__ = [
    "EMOTION_NAMES",
    "PUBLISHED_ZERO_COLUMNS",
    "TransformerLipsync",
    "TransformerRunner",
]

EMOTION_NAMES = ("Angry", "Disgusted", "Fearful", "Happy", "Neutral", "Sad", "Surprised")
MODEL_FPS = 60  # the features and the published weights are 60 fps
WINDOW = 128
OVERLAP = 32
OUTPUT_SCALE = 100.0  # published targets are 0..100
EASE_IN_FRAMES = 6  # int(0.1 s * 60)
# Columns the published inference zeroes: eye blink/look (both eyes), TongueOut, rotations.
PUBLISHED_ZERO_COLUMNS: tuple[int, ...] = (
    *(INDEX[f"Eye{m}{side}"] for side in ("Left", "Right")
      for m in ("Blink", "LookDown", "LookIn", "LookOut", "LookUp")),
    INDEX["TongueOut"],
    *range(NUM_BLENDSHAPES, NUM_FACE_VALUES),
)
assert sorted(PUBLISHED_ZERO_COLUMNS) == [0, 1, 2, 3, 4, 7, 8, 9, 10, 11, *range(51, 61)]

_INSTALL_HINT = ('the transformer lipsync backend needs torch: '
                 'pip install -e ".[lipsync-transformer]"')


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(_INSTALL_HINT) from e
    return torch


class TransformerRunner:
    """One loaded model; runs feature windows from any number of sessions as batches.

    ``checkpoint=None`` builds random weights (seeded): for tests and benchmarks only, the
    faces are meaningless. With a checkpoint, sizes come from its tensors; ``width`` and
    layer counts, if given, must agree. ``device="auto"``: CUDA when torch sees one.
    ``dtype="auto"``: float16 on CUDA, float32 on CPU.
    Thread-safe: one forward at a time.
    """

    _shared: ClassVar[dict[tuple, TransformerRunner]] = {}
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, checkpoint: str | None = None, device: str = "cpu",
                 width: int | None = None, encoder_layers: int | None = None,
                 decoder_layers: int | None = None, heads: int = 16, dtype: str = "auto",
                 max_batch: int = 32, seed: int = 0, global_rope: bool = False) -> None:
        torch = _import_torch()
        from workers.lipsync import transformer_model as tm

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if dtype == "auto":
            dtype = "float16" if self.device.type == "cuda" else "float32"
        self.dtype = getattr(torch, dtype)
        sizes = {"width": width, "encoder_layers": encoder_layers,
                 "decoder_layers": decoder_layers}
        if checkpoint:
            state = tm.read_state_dict(checkpoint)
            cfg = tm.config_from_state_dict(state, heads=heads, global_rope=global_rope)
            for name, want in sizes.items():
                if want is not None and want != getattr(cfg, name):
                    raise ValueError(f"{checkpoint}: {name} is {getattr(cfg, name)}, "
                                     f"configured {want}")
            model = tm.FaceTransformer(cfg)
            model.load_state_dict(state, strict=True)
        else:
            given = {k: v for k, v in sizes.items() if v is not None}
            cfg = tm.ModelConfig(heads=heads, global_rope=global_rope, **given)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = tm.FaceTransformer(cfg)
        self.config = cfg
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.max_batch = max(1, int(max_batch))
        self._lock = threading.Lock()
        self._torch = torch

    @classmethod
    def shared(cls, **kwargs: Any) -> TransformerRunner:
        """One runner per distinct configuration in this process (a full model is 0.94 GB
        in float32 and takes seconds to load; build it once, not per turn)."""
        key = tuple(sorted(kwargs.items()))
        with cls._shared_lock:
            runner = cls._shared.get(key)
            if runner is None:
                runner = cls._shared[key] = cls(**kwargs)
            return runner

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def infer_windows(self, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Feature windows (frames, 256) from any sessions -> raw outputs (frames, 68)
        float32, same order. Windows of equal length run as one batch (up to ``max_batch``);
        the model has no padding mask, so different lengths run apart."""
        out: list[np.ndarray | None] = [None] * len(batch)
        groups: dict[int, list[int]] = {}
        for i, w in enumerate(batch):
            if w.ndim != 2 or w.shape[1] != self.config.input_dim:
                raise ValueError(f"window {i}: expected (frames, {self.config.input_dim}), "
                                 f"got {w.shape}")
            groups.setdefault(w.shape[0], []).append(i)
        torch = self._torch
        with self._lock, torch.inference_mode():
            for idx in groups.values():
                for b in range(0, len(idx), self.max_batch):
                    part = idx[b : b + self.max_batch]
                    x = torch.from_numpy(np.stack([batch[i] for i in part]).astype(np.float32))
                    y = self.model(x.to(device=self.device, dtype=self.dtype))
                    y = y.float().cpu().numpy()
                    for j, i in enumerate(part):
                        out[i] = y[j]
        return out  # type: ignore[return-value]


class TransformerLipsync:
    """Streaming transformer lipsync for one audio stream; ``flush`` ends it and resets.

    ``push``/``flush`` run the model themselves. A micro-batcher serving many sessions
    uses the split form instead: ``feed(pcm)`` / ``feed_end()`` return the feature windows
    now ready, ``runner.infer_windows`` runs them together with other sessions' windows,
    and ``deliver(outputs)`` (outputs in the same order) returns this stream's frames.
    After each ``push``/``flush``/``deliver``, ``emotions`` is a (frames, 7) float32 array
    (``EMOTION_NAMES`` order, raw model units) for the frames just returned.
    """

    def __init__(self, checkpoint: str | None, sample_rate: int, fps: int = MODEL_FPS,
                 device: str = "cpu", width: int | None = None,
                 encoder_layers: int | None = None, decoder_layers: int | None = None,
                 heads: int = 16, dtype: str = "auto", window: int = WINDOW,
                 overlap: int = OVERLAP, zero_columns: Sequence[int] = PUBLISHED_ZERO_COLUMNS,
                 ease_in_frames: int = EASE_IN_FRAMES, output_scale: float = OUTPUT_SCALE,
                 runner: TransformerRunner | None = None) -> None:
        if sample_rate <= 0:
            raise ValueError("sample_rate must be positive")
        if fps != MODEL_FPS:
            raise ValueError(f"the transformer lipsync runs at {MODEL_FPS} fps, not {fps}")
        if not 0 <= overlap < window:
            raise ValueError("need 0 <= overlap < window")
        self.sample_rate = int(sample_rate)
        self.fps = MODEL_FPS
        self.window = int(window)
        self.overlap = int(overlap)
        self.step = self.window - self.overlap
        self.runner = runner or TransformerRunner.shared(
            checkpoint=checkpoint, device=device, width=width, encoder_layers=encoder_layers,
            decoder_layers=decoder_layers, heads=heads, dtype=dtype)
        if self.runner.output_dim < NUM_FACE_VALUES:
            raise ValueError(f"model gives {self.runner.output_dim} outputs, need >= 61")
        self.zero_columns = np.asarray(sorted(set(zero_columns)), np.int64)
        self.ease_in_frames = int(ease_in_frames)
        self.output_scale = float(output_scale)
        self.emotions = np.zeros((0, len(EMOTION_NAMES)), np.float32)
        self.reset()

    @property
    def window_frames(self) -> int:
        return self.window

    @property
    def hop_frames(self) -> int:
        """New frames each window adds (window - overlap): 96."""
        return self.step

    @property
    def num_features(self) -> int:
        return NUM_FEATURES

    @property
    def width(self) -> int:
        return self.runner.config.width

    def reset(self) -> None:
        """Forget the stream; the next push starts again at frame 0, sample 0."""
        self._resampler = (None if self.sample_rate == FEATURE_RATE else
                           soxr.ResampleStream(self.sample_rate, FEATURE_RATE, 1,
                                               dtype="float64"))
        self._features = FeatureStream()
        self._received = 0
        self._total: int | None = None  # frames in the stream, once it has ended
        self._next_window = 0
        self._issued: list[tuple[int, int, int]] = []  # (window, first row, real rows)
        self._carry = np.zeros((0, self.runner.output_dim), np.float32)  # next overlap
        self._emitted = 0

    # -- one-session API -----------------------------------------------------------------

    def push(self, pcm: np.ndarray) -> list[FaceFrame]:
        """Add mono PCM (int16, or float in [-1, 1]); return the frames now complete."""
        return self.deliver(self.infer_windows(self.feed(pcm)))

    def flush(self) -> list[FaceFrame]:
        """End of the stream: the remaining frames (``ceil(samples * fps / rate)`` in
        all), then reset."""
        return self.deliver(self.infer_windows(self.feed_end()))

    def infer_windows(self, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The runner's batched inference (windows from any sessions sharing it)."""
        return self.runner.infer_windows(batch) if batch else []

    # -- split API for micro-batching ------------------------------------------------------

    def feed(self, pcm: np.ndarray) -> list[np.ndarray]:
        """Add PCM; return the (window, 256) float32 feature windows now ready."""
        if self._total is not None:
            raise RuntimeError("feed after feed_end: deliver the last outputs first")
        x = np.asarray(pcm)
        if x.ndim != 1:
            raise ValueError(f"expected mono 1-D PCM, got shape {x.shape}")
        if x.dtype == np.int16:
            x = x.astype(np.float64) / 32768.0
        elif x.dtype.kind == "f":
            x = x.astype(np.float64)
        else:
            raise TypeError(f"expected int16 or float PCM, got {x.dtype}")
        self._received += len(x)
        if self._resampler is not None:
            x = self._resampler.resample_chunk(x)
        self._features.push(x)
        return self._issue()

    def feed_end(self) -> list[np.ndarray]:
        """End of the stream: the remaining windows (possibly none)."""
        if self._total is None:
            if self._resampler is not None:
                self._features.push(self._resampler.resample_chunk(np.zeros(0), last=True))
            self._features.finish()
            self._total = frame_count(self._received, self.sample_rate, self.fps)
        return self._issue()

    def deliver(self, outputs: Sequence[np.ndarray]) -> list[FaceFrame]:
        """Model outputs for the oldest windows handed out, in order -> finished frames.
        Once the ended stream's last window is delivered, the stream resets."""
        if len(outputs) > len(self._issued):
            raise ValueError(f"{len(outputs)} outputs for {len(self._issued)} pending windows")
        rows: list[np.ndarray] = []
        for out in outputs:
            k, first, real = self._issued.pop(0)
            o = np.array(out, np.float32)[:real]
            if o.shape != (real, self.runner.output_dim):
                raise ValueError(f"window {k}: output shape {np.shape(out)}")
            if k > 0:  # cross-fade with the previous window's tail over the overlap
                ov = min(len(self._carry), real)
                alpha = (np.arange(ov, dtype=np.float32) / max(ov, 1))[:, None]
                o[:ov] = (1.0 - alpha) * self._carry[:ov] + alpha * o[:ov]
            last = self._total is not None and first + self.step >= self._total
            keep = real if last else self.step
            rows.append(o[:keep])
            self._carry = o[keep:] if not last else o[:0]
        done = self._total is not None and not self._issued and self._next_window_past_end()
        if done and self._emitted + sum(map(len, rows)) < self._total:
            rows.append(self._carry)  # defensive: a tail no later window will fade into
        frames = self._frames(np.concatenate(rows) if rows else self._carry[:0])
        if done:
            self.reset()
        return frames

    # -- internals ---------------------------------------------------------------------------

    def _next_window_past_end(self) -> bool:
        return self._total is not None and self._next_window * self.step >= self._total

    def _issue(self) -> list[np.ndarray]:
        feats = self._features
        windows = []
        while True:
            first = self._next_window * self.step
            if self._total is None:
                if not feats.ready(first + self.window):
                    break
                real = self.window
                rows = feats.rows(first, first + real)
            else:
                if first >= self._total:
                    break
                real = min(self.window, self._total - first)
                rows = feats.rows(first, first + real)
                if real < self.window:  # published padding: repeat the last row
                    rows = np.vstack((rows, np.repeat(rows[-1:], self.window - real, axis=0)))
            feats.release(first + self.step)
            windows.append(rows)
            self._issued.append((self._next_window, first, real))
            self._next_window += 1
        return windows

    def _frames(self, out: np.ndarray) -> list[FaceFrame]:
        n = len(out)
        start = self._emitted
        values = out[:, :NUM_FACE_VALUES] / self.output_scale
        values[:, self.zero_columns] = 0.0
        ease = self.ease_in_frames if self._total is None else min(self.ease_in_frames,
                                                                     self._total)
        if start < ease:
            curve = np.linspace(0.0, 1.0, ease, dtype=np.float32)[start : start + n]
            values[: len(curve)] *= curve[:, None]
        values[:, :NUM_BLENDSHAPES] = np.clip(values[:, :NUM_BLENDSHAPES], 0.0, 1.0)
        values = values.astype(np.float32)
        self.emotions = np.ascontiguousarray(
            out[:, NUM_FACE_VALUES : NUM_FACE_VALUES + len(EMOTION_NAMES)], np.float32)
        self._emitted += n
        return [
            FaceFrame(i, frame_sample(i, self.sample_rate, self.fps), values[j])
            for j, i in enumerate(range(start, start + n))
        ]


assert NUM_FEATURES == 256
