"""Voice activity detection over 16 kHz mono float32 (Sans-I/O).

A 20 ms frame is voiced when its level is ``threshold_db`` above the noise floor and above an
absolute ``min_level_db``, so digital silence and faint hiss never count as speech however low
the floor gets. Speech starts after ``start_ms`` of consecutive voiced frames (the event is at
the first of them) and ends after ``silence_ms`` without a voiced run of ``resume_ms`` (the
event is at the end of the last voiced frame). Shorter blips count as silence while in speech,
or keyboard clicks every few hundred ms would hold an utterance open for good.

The floor is a minimum-statistics estimate: the minimum over ``floor_window_ms`` of the frame
power smoothed over ~60 ms (the smoothing keeps zeroed packets from dragging it down). Unlike
a floor that only adapts on quiet frames, it follows a noise that gets louder (a fan switching
on) even while every frame looks voiced. In speech it may rise by only ``floor_rise_db_s``,
or a pause-free sentence longer than the window would be cut once the window holds nothing
but speech; a steady level (frame-level spread under ``steady_db``) is noise, not speech, and
lifts that limit so a noise step cannot hold an utterance open.

Measured on synthetic scenes (two espeak-ng utterances at -26/-38/-14 dBFS in digital silence,
white noise at -60/-55/-45 dBFS, pink -40, 50 Hz hum -40, keyboard clicks, zeroed packets, and
a -65 -> -35 dBFS pink noise step), any chunking: start within -20..+50 ms of the truth
(+130 ms in hum), end within -280..+10 ms (the quiet tail of "shield" sinks into pink noise and
hum), no false starts. The noise step merges its onset with the next utterance, which ends
0.5 s late. With a floor that adapts only on quiet frames (the previous design), five of these
scenes stayed "in speech" for good; with a plain windowed minimum, any sentence without a pause
for 2 s was cut.

pocketsphinx.Vad (WebRTC's GMM classifier) was tried as an extra per-frame gate: it split the
quiet speaker's sentences into pieces and fired on noise onsets, and it fixed no scene.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

_FLOOR_SUBBLOCKS = 8  # the floor window is kept as sub-block minimums: O(1) work per frame
_FLOOR_SMOOTH = 0.3  # per-frame power smoothing ahead of the minimum (~60 ms)
_STEADY_ALPHA = 0.1  # level mean/variance tracking for the steadiness test (~200 ms)
_LEVEL_FLOOR_DB = -100.0  # digital silence is -inf dB; clamp so the arithmetic stays finite


@dataclass(frozen=True)
class VadEvent:
    kind: str  # "start" | "end"
    sample: int  # samples since the stream began: first voiced frame / end of last voiced one


class SpeechRuns:
    """Start and end of speech from per-frame verdicts, the rule both VADs share:
    ``start_frames`` consecutive voiced frames start it (the event at the first of them);
    ``silence_frames`` without a voiced run of ``resume_frames`` end it (the event at the end
    of the last voiced frame). Shorter blips count as silence while in speech."""

    def __init__(self, start_frames: int, silence_frames: int, resume_frames: int):
        self.start_frames = start_frames
        self.silence_frames = silence_frames
        self.resume_frames = resume_frames
        self.in_speech = False
        self.run = 0  # consecutive voiced frames
        self.run_start = 0
        self.silent = 0  # frames since the last voiced run of resume_frames or more
        self.last_voiced_end = 0

    def backdate(self, frames: int, frame_len: int) -> None:
        """The silence that just began really began ``frames`` frames earlier (they were
        voiced only by the model's memory of the speech before them)."""
        if self.in_speech and frames > 0:
            self.silent += frames
            self.last_voiced_end -= frames * frame_len

    def frame(self, voiced: bool, start: int, end: int) -> VadEvent | None:
        """One frame's verdict (``start``/``end``: its samples); the event it completes."""
        if voiced:
            if self.run == 0:
                self.run_start = start
            self.run += 1
        else:
            self.run = 0
        if not self.in_speech:
            if self.run >= self.start_frames:
                self.in_speech = True
                self.silent = 0
                self.last_voiced_end = end
                return VadEvent("start", self.run_start)
        elif self.run >= self.resume_frames:
            self.silent = 0
            self.last_voiced_end = end
        else:
            self.silent += 1
            if self.silent >= self.silence_frames:
                self.in_speech = False
                return VadEvent("end", self.last_voiced_end)
        return None


class Vad:
    def __init__(self, rate: int = 16000, frame_ms: int = 20, start_ms: int = 60,
                 silence_ms: int = 500, threshold_db: float = 10.0,
                 min_level_db: float = -55.0, floor_window_ms: int = 2000,
                 resume_ms: int = 40, floor_rise_db_s: float = 3.0, steady_db: float = 4.0):
        if rate <= 0 or frame_ms <= 0 or rate * frame_ms % 1000:
            raise ValueError(f"frame_ms={frame_ms} is not a whole number of samples at {rate} Hz")
        if min(start_ms, silence_ms, resume_ms) < 0 or floor_window_ms <= 0:
            raise ValueError("start_ms, silence_ms and resume_ms must be >= 0 and "
                             "floor_window_ms > 0")
        self.rate = rate
        self.push_model_ms = 0.0  # no model: what SileroVad reports for its last push
        self.frame = rate * frame_ms // 1000
        # Durations round up to whole frames: silence_ms=50 must not end speech after 40 ms.
        self._runs = SpeechRuns(max(1, -(-start_ms // frame_ms)),
                                max(1, -(-silence_ms // frame_ms)),
                                max(1, -(-resume_ms // frame_ms)))
        self.threshold_db = threshold_db
        self.min_level_db = min_level_db
        self.steady_db = steady_db
        self._rise_per_frame = floor_rise_db_s * frame_ms / 1000
        self._sub_frames = max(1, -(-floor_window_ms // frame_ms) // _FLOOR_SUBBLOCKS)
        self._mins: deque[float] = deque(maxlen=_FLOOR_SUBBLOCKS - 1)
        self._sub_min = np.inf
        self._sub_n = 0
        self._smooth: float | None = None
        self._mean_db = _LEVEL_FLOOR_DB
        self._var_db = 0.0
        self.floor_db = _LEVEL_FLOOR_DB
        self._buf = np.zeros(0, np.float32)
        self._position = 0

    @property
    def in_speech(self) -> bool:
        return self._runs.in_speech

    @property
    def position(self) -> int:
        """Samples consumed into whole frames (a partial frame waits for the next push)."""
        return self._position

    @property
    def silent_samples(self) -> int:
        """In speech: samples since the end of the last voiced run (0 outside speech)."""
        runs = self._runs
        return self._position - runs.last_voiced_end if runs.in_speech else 0

    def _track_floor(self, level_db: float) -> None:
        power = 10.0 ** (level_db / 10.0)
        s = power if self._smooth is None else self._smooth + _FLOOR_SMOOTH * (power - self._smooth)
        self._smooth = s
        self._sub_min = min(self._sub_min, s)
        self._sub_n += 1
        floor = min(self._sub_min, *self._mins) if self._mins else self._sub_min
        if self._sub_n >= self._sub_frames:
            self._mins.append(self._sub_min)
            self._sub_min, self._sub_n = np.inf, 0
        floor_db = 10.0 * np.log10(floor)
        d = level_db - self._mean_db
        self._mean_db += _STEADY_ALPHA * d
        self._var_db += _STEADY_ALPHA * (d * d - self._var_db)
        if self._runs.in_speech and self._var_db > self.steady_db ** 2:
            floor_db = min(floor_db, self.floor_db + self._rise_per_frame)
        self.floor_db = floor_db

    def push(self, samples: np.ndarray) -> list[VadEvent]:
        """Consume samples (any count); returns the start/end events they complete."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        buf = np.concatenate([self._buf, x]) if len(self._buf) else x
        n = len(buf) // self.frame
        self._buf = buf[n * self.frame:].copy()
        if n == 0:
            return []
        frames = buf[: n * self.frame].reshape(n, self.frame).astype(np.float64)
        # a frame's level without its mean: a mic's DC offset is no voice (0.05 of DC held
        # every pause above the floor and cut a sentence in two)
        levels = 10.0 * np.log10(np.var(frames, axis=1) + 1e-12)
        np.maximum(levels, _LEVEL_FLOOR_DB, out=levels)
        events: list[VadEvent] = []
        for level in levels.tolist():
            start = self._position
            self._position += self.frame
            # Classify against the floor as it was before this frame.
            voiced = level > max(self.min_level_db, self.floor_db + self.threshold_db)
            self._track_floor(level)
            ev = self._runs.frame(voiced, start, self._position)
            if ev is not None:
                events.append(ev)
        return events
