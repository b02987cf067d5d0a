"""Voice activity detection over 16 kHz mono float32 (Sans-I/O).

Energy above an adaptive noise floor, with an absolute floor so digital silence and faint hiss
never count as speech; hangover (``silence_ms``) so pauses between words do not end the
utterance. Cheap enough to run on every chunk of every session (one RMS per 20 ms frame).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class VadEvent:
    kind: str  # "start" | "end"
    sample: int  # 16 kHz samples since the stream began


class Vad:
    def __init__(self, rate: int = 16000, frame_ms: int = 20, start_ms: int = 60,
                 silence_ms: int = 500, threshold_db: float = 12.0, min_level_db: float = -50.0,
                 floor_adapt: float = 0.05):
        self.rate = rate
        self.frame = rate * frame_ms // 1000
        self.start_frames = max(1, start_ms // frame_ms)
        self.silence_frames = max(1, silence_ms // frame_ms)
        self.threshold_db = threshold_db
        self.min_level_db = min_level_db
        self.floor_adapt = floor_adapt
        self.floor_db = -70.0
        self._buf = np.zeros(0, np.float32)
        self.position = 0  # samples consumed into whole frames
        self.in_speech = False
        self._voiced_run = 0
        self._silent_run = 0
        self._run_start = 0
        self._last_voiced_end = 0

    def push(self, samples: np.ndarray) -> list[VadEvent]:
        buf = np.concatenate([self._buf, samples.astype(np.float32, copy=False)])
        n = len(buf) // self.frame
        self._buf = buf[n * self.frame:]
        if n == 0:
            return []
        frames = buf[: n * self.frame].reshape(n, self.frame)
        db = 10 * np.log10(np.mean(frames * frames, axis=1) + 1e-12)
        events: list[VadEvent] = []
        for level in db:
            start = self.position
            self.position += self.frame
            voiced = level > max(self.min_level_db, self.floor_db + self.threshold_db)
            if not voiced:
                # the floor follows quiet frames only, so speech never raises it
                self.floor_db += self.floor_adapt * (level - self.floor_db)
            if voiced:
                if self._voiced_run == 0:
                    self._run_start = start
                self._voiced_run += 1
                self._silent_run = 0
                self._last_voiced_end = self.position
                if not self.in_speech and self._voiced_run >= self.start_frames:
                    self.in_speech = True
                    events.append(VadEvent("start", self._run_start))
            else:
                self._voiced_run = 0
                self._silent_run += 1
                if self.in_speech and self._silent_run >= self.silence_frames:
                    self.in_speech = False
                    events.append(VadEvent("end", self._last_voiced_end))
        return events
