"""What STT makes of one session's mic audio, chunk by chunk (Sans-I/O).

A :class:`Listener` takes mic entries and says what to do: start an utterance (with the
pre-roll to feed the recognizer), feed more audio, end the utterance, or give the session back
because nothing is arriving. It holds the converter to 16 kHz mono, the VAD and the pre-roll;
the recognizer, Redis and the clock stay with the caller (``workers/stt/stage.py``), so every
decision here is testable with arrays alone. Positions are 16 kHz samples since the session's
first mic chunk (``base`` is where this listener's first chunk sits).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from schemas.streams import MicEntry
from workers.stt.audio import MicConverter
from workers.stt.echo import EchoGate
from workers.stt.vad import Vad

RATE = 16000


@dataclass
class Start:
    """Speech began at ``sample``: open a recognizer stream and feed it ``audio`` (pre-roll)."""

    sample: int
    audio: np.ndarray


@dataclass
class Feed:
    audio: np.ndarray


@dataclass
class End:
    """The utterance is over: finish the recognizer. ``reason``: vad, client, max_length,
    audio_gap (the client stopped sending mid-utterance)."""

    reason: str
    eos_ts: float  # wall clock of the chunk that ended it, for the latency waterfall


@dataclass
class Release:
    """No audio for a while outside an utterance: the session needs no worker until it sends
    more (an idle NPC costs nothing)."""


Action = Start | Feed | End | Release


@dataclass
class ListenerConfig:
    silence_ms: int = 500
    start_ms: int = 60
    preroll_ms: int = 300
    max_utterance_s: float = 30.0
    idle_release_ms: int = 1500
    audio_gap_end_ms: int = 3000


class Listener:
    def __init__(self, rate: int, channels: int, fmt: str, cfg: ListenerConfig,
                 base: int = 0, client_ends: bool = False, echo: EchoGate | None = None):
        self.cfg = cfg
        self.echo = echo  # keeps the NPC's own voice (the reply UE plays) from the VAD
        self.base = base
        self.client_ends = client_ends
        self.conv = MicConverter(rate, channels, fmt, RATE)
        self.vad = Vad(rate=RATE, silence_ms=cfg.silence_ms, start_ms=cfg.start_ms)
        self.preroll: deque[np.ndarray] = deque()
        self.preroll_len = 0
        self.preroll_max = cfg.preroll_ms * RATE // 1000
        self.speaking = False  # an utterance is open (a recognizer stream is fed)
        self.speech_start = 0
        self.mic_seq = 0

    @property
    def position(self) -> int:
        """16 kHz samples since the session's first chunk, up to what has been pushed."""
        return self.base + self.vad.position

    def push(self, mic: MicEntry) -> list[Action]:
        self.mic_seq = mic.seq
        if mic.end_of_utterance:
            # end_of_utterance outside an utterance (nothing heard yet) ends nothing
            return [End("client", mic.ts)] if self.speaking else []
        samples = self.conv.push(mic.pcm)
        if not len(samples):
            return []
        heard = samples if self.echo is None else self.echo.push(samples, mic.ts)
        # in an utterance the player speaks and the reply stops: the VAD hears the raw mic
        events = self.vad.push(samples if self.speaking else heard)
        out: list[Action] = []
        if not self.speaking:
            self._hold(samples)
        for ev in events:
            if ev.kind == "start" and not self.speaking:
                self.speaking = True
                self.speech_start = self.base + ev.sample
                out.append(Start(self.speech_start, np.concatenate(list(self.preroll))))
                self.preroll.clear()
                self.preroll_len = 0
                samples = samples[:0]  # this chunk went out with the pre-roll
            elif ev.kind == "end" and self.speaking and not self.client_ends:
                out.append(Feed(samples))
                return self._end(out, "vad", mic.ts)
        if self.speaking and len(samples):
            out.append(Feed(samples))
        if self.speaking and self.position - self.speech_start > self.cfg.max_utterance_s * RATE:
            return self._end(out, "max_length", mic.ts)
        return out

    def quiet(self, waited_ms: float, now_ms: float) -> list[Action]:
        """Nothing arrived for ``waited_ms``: give the session back, or end an utterance whose
        client stopped sending (a dropped connection must not hold a worker for good)."""
        if not self.speaking:
            return [Release()] if waited_ms >= self.cfg.idle_release_ms else []
        if waited_ms >= self.cfg.audio_gap_end_ms:
            self.speaking = False
            return [End("audio_gap", now_ms)]
        return []

    def utterance_done(self) -> None:
        """The caller finished the recognizer; listen for the next utterance."""
        self.speaking = False

    def _end(self, out: list[Action], reason: str, ts: float) -> list[Action]:
        self.speaking = False
        out.append(End(reason, ts))
        return out

    def _hold(self, samples: np.ndarray) -> None:
        self.preroll.append(samples)
        self.preroll_len += len(samples)
        while self.preroll and self.preroll_len - len(self.preroll[0]) >= self.preroll_max:
            self.preroll_len -= len(self.preroll.popleft())
