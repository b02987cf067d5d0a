"""What STT makes of one session's mic audio, chunk by chunk (Sans-I/O).

A :class:`Listener` takes mic entries and says what to do: start an utterance (with the
pre-roll to feed the recognizer), feed more audio, ask the end-of-turn model whether a pause is
the end (``Check``; the caller answers with :meth:`Listener.verdict`), say that the end is
likely (``Likely``: start the reply early) or no longer likely (``Resumed``), end the
utterance, or give the session back because nothing is arriving.

The end of a turn (hands-free): with an end-of-turn model, a VAD silence of ``turn_pause_ms``
asks the model; "complete" ends the turn there, "not yet" waits for more speech, up to
``turn_max_silence_ms`` of silence in all. Without a model, ``silence_ms`` of silence ends it.
Either way, hands-free, ``speculate_ms`` of silence inside an utterance is a likely end: the
caller may start the reply on the words so far, and drops it if speech resumes (``Resumed``)
or the final transcript differs.

It holds the converter to 16 kHz mono, the VAD and the pre-roll;
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
from workers.stt.vad import Vad, VadEvent

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
class Check:
    """A pause in speech: ask the end-of-turn model about ``audio`` (the utterance's last
    seconds, 16 kHz) and pass its probability to :meth:`Listener.verdict`."""

    audio: np.ndarray
    pause: int  # where the pause began (16 kHz samples since the session's first chunk)


@dataclass
class End:
    """The utterance is over: finish the recognizer. ``reason``: vad (silence_ms), turn_model
    (the model heard a complete turn), silence_cap (turn_max_silence_ms), client, max_length,
    audio_gap (the client stopped sending mid-utterance). ``speech`` is False when nothing was
    heard (an end_of_utterance after silence): the client still gets an answer. ``silent``:
    how many samples at its end the VAD heard as silence (a server end): the recognizer need
    not decode all of them before the final words."""

    reason: str
    eos_ts: float  # wall clock of the chunk that ended it, for the latency waterfall
    speech: bool = True
    silent: int = 0
    vad_ms: float = 0.0  # time the VAD's model took on the chunk that ended it


@dataclass
class Likely:
    """The player has been silent ``speculate_ms`` inside the utterance: the turn may well end
    at ``pause`` (where the silence began). Start the reply early, on the words so far."""

    pause: int  # 16 kHz samples since the session's first chunk
    ts: float  # wall clock of the chunk that made it likely


@dataclass
class Resumed:
    """Speech went on after the :class:`Likely` at ``pause``: what was started early is void."""

    pause: int


@dataclass
class Release:
    """No audio for a while outside an utterance: the session needs no worker until it sends
    more (an idle NPC costs nothing)."""


Action = Start | Feed | Check | Likely | Resumed | End | Release


@dataclass
class ListenerConfig:
    silence_ms: int = 500
    start_ms: int = 60
    preroll_ms: int = 300
    max_utterance_s: float = 30.0
    idle_release_ms: int = 1500
    audio_gap_end_ms: int = 3000
    vad: str = "energy"  # "energy" | "silero"
    turn_model: bool = False  # the caller has an end-of-turn model to answer Check with
    turn_pause_ms: int = 200
    turn_max_silence_ms: int = 1200
    turn_threshold: float = 0.5
    turn_window_s: float = 8.0
    speculate_ms: int = 0  # silence that makes the end likely (Likely); 0: never

    @classmethod
    def from_stt(cls, cfg, vad: str | None = None, turn_model: bool | None = None
                 ) -> ListenerConfig:
        """From the ``[stt]`` settings (core.config.SttConfig). ``vad`` and ``turn_model``:
        what the worker has (a fallback VAD, a model that loaded); by default what ``cfg``
        asks for."""
        return cls(silence_ms=cfg.vad_silence_ms, start_ms=cfg.vad_start_ms,
                   preroll_ms=cfg.preroll_ms, max_utterance_s=cfg.max_utterance_s,
                   idle_release_ms=cfg.idle_release_ms, audio_gap_end_ms=cfg.audio_gap_end_ms,
                   vad=cfg.vad if vad is None else vad,
                   turn_model=cfg.turn_model != "none" if turn_model is None else turn_model,
                   turn_pause_ms=cfg.turn_pause_ms, turn_max_silence_ms=cfg.turn_max_silence_ms,
                   turn_threshold=cfg.turn_threshold, speculate_ms=cfg.speculate_ms)


def make_vad(cfg: ListenerConfig):
    """The configured VAD at 16 kHz; both kinds share one interface (push -> VadEvent)."""
    silence = cfg.turn_pause_ms if cfg.turn_model else cfg.silence_ms
    if cfg.vad == "silero":
        from workers.stt.silero_vad import SileroVad

        return SileroVad(rate=RATE, silence_ms=silence, start_ms=cfg.start_ms)
    if cfg.vad == "energy":
        return Vad(rate=RATE, silence_ms=silence, start_ms=cfg.start_ms)
    raise ValueError(f"stt.vad must be silero or energy, not {cfg.vad!r}")


class Listener:
    def __init__(self, rate: int, channels: int, fmt: str, cfg: ListenerConfig,
                 base: int = 0, client_ends: bool = False, after_server_end: bool = False,
                 echo: EchoGate | None = None):
        self.cfg = cfg
        self.echo = echo  # keeps the NPC's own voice (the reply UE plays) from the VAD
        self.base = base
        self.client_ends = client_ends
        # the previous utterance was ended by the server (VAD or model): an end_of_utterance
        # before any new speech is that utterance's own, late; it was answered already
        self.after_server_end = after_server_end
        self.conv = MicConverter(rate, channels, fmt, RATE)
        self.vad = make_vad(cfg)
        self.preroll: deque[np.ndarray] = deque()
        self.preroll_len = 0
        self.preroll_max = cfg.preroll_ms * RATE // 1000
        self.speaking = False  # an utterance is open (a recognizer stream is fed)
        self.speech_start = 0
        self.mic_seq = 0
        # the utterance's last turn_window_s, for the end-of-turn model
        self.recent: deque[np.ndarray] = deque()
        self.recent_len = 0
        self.recent_max = int(cfg.turn_window_s * RATE)
        self.paused: int | None = None  # in a pause the model was asked about (its start)
        self.pause_ts = 0.0  # wall clock of the chunk where that pause was heard
        self.likely: int | None = None  # the pause a Likely was said for, until it resolves

    @property
    def position(self) -> int:
        """16 kHz samples since the session's first chunk, up to what has been pushed."""
        return self.base + self.vad.position

    def push(self, mic: MicEntry) -> list[Action]:
        self.mic_seq = mic.seq
        if mic.end_of_utterance:
            if self.speaking:
                return self._end([], "client", mic.ts)
            if self.after_server_end:
                self.after_server_end = False
                return []
            # nothing heard: the turn still ends, with an answer that says so
            return [End("client", mic.ts, speech=False)]
        samples = self.conv.push(mic.pcm)
        if not len(samples):
            return []
        heard = samples if self.echo is None else self.echo.push(samples, mic.ts)
        # in an utterance the player speaks and the reply stops: the VAD hears the raw mic
        events = self.vad.push(samples if self.speaking else heard)
        out: list[Action] = []
        if not self.speaking:
            self._hold(samples)
        pause: VadEvent | None = None
        for ev in events:
            if ev.kind == "start" and not self.speaking:
                self.speaking = True
                self.after_server_end = False
                self.speech_start = self.base + ev.sample
                pre = np.concatenate(list(self.preroll))
                out.append(Start(self.speech_start, pre))
                self._remember(pre)
                self.preroll.clear()
                self.preroll_len = 0
                samples = samples[:0]  # this chunk went out with the pre-roll
            elif ev.kind == "start":
                self.paused, pause = None, None  # the speaker went on after the pause
            elif ev.kind == "end" and self.speaking and not self.client_ends:
                if not self.cfg.turn_model:
                    out.append(Feed(samples))
                    # ev.sample: where the silence began
                    return self._end(out, "vad", mic.ts, self.vad.position - ev.sample)
                pause = ev
        if self.speaking and len(samples):
            out.append(Feed(samples))
            self._remember(samples)
        if pause is not None:
            self.paused = self.base + pause.sample
            self.pause_ts = mic.ts
            out.append(Check(self._recent_audio(), self.paused))
        out += self._speculation(mic.ts)
        if self.speaking and self.paused is not None and (
                self.position - self.paused >= self._cap_samples()):
            return self._end(out, "silence_cap", self.pause_ts, self.position - self.paused)
        if self.speaking and self.position - self.speech_start > self.cfg.max_utterance_s * RATE:
            return self._end(out, "max_length", mic.ts)
        return out

    def verdict(self, probability: float, check: Check) -> list[Action]:
        """The end-of-turn model's answer to ``check``: a complete turn ends here, unless the
        speaker went on meanwhile; an incomplete one waits (up to turn_max_silence_ms)."""
        if not self.speaking or self.paused != check.pause:
            return []
        if probability >= self.cfg.turn_threshold:
            return self._end([], "turn_model", self.pause_ts, self.position - check.pause)
        return []

    def _pause_start(self) -> int | None:
        """Where the current silence inside the utterance began (None: speech now). Without
        a model the VAD is still "in speech" through a pause; with one, its end event made
        ``paused``."""
        if self.paused is not None:
            return self.paused
        vad = self.vad
        if not vad.in_speech:
            return None
        silent = vad.silent_samples
        return self.base + vad.position - silent if silent > 0 else None

    def _speculation(self, ts: float) -> list[Action]:
        """Likely once per pause of speculate_ms; Resumed when speech comes back after it.
        Hands-free only: push-to-talk's end is the client's."""
        if not self.speaking or self.cfg.speculate_ms <= 0 or self.client_ends:
            return []
        pause = self._pause_start()
        out: list[Action] = []
        if self.likely is not None and pause != self.likely:
            out.append(Resumed(self.likely))
            self.likely = None
        if (self.likely is None and pause is not None
                and self.position - pause >= self.cfg.speculate_ms * RATE // 1000):
            self.likely = pause
            out.append(Likely(pause, ts))
        return out

    def _cap_samples(self) -> int:
        return self.cfg.turn_max_silence_ms * RATE // 1000

    def _remember(self, samples: np.ndarray) -> None:
        if not self.cfg.turn_model or not len(samples):
            return
        self.recent.append(samples)
        self.recent_len += len(samples)
        while self.recent and self.recent_len - len(self.recent[0]) >= self.recent_max:
            self.recent_len -= len(self.recent.popleft())

    def _recent_audio(self) -> np.ndarray:
        return np.concatenate(list(self.recent)) if self.recent else np.zeros(0, np.float32)

    def quiet(self, waited_ms: float, now_ms: float) -> list[Action]:
        """Nothing arrived for ``waited_ms``: give the session back, or end an utterance whose
        client stopped sending (a dropped connection must not hold a worker for good)."""
        if not self.speaking:
            return [Release()] if waited_ms >= self.cfg.idle_release_ms else []
        if waited_ms >= self.cfg.audio_gap_end_ms:
            self.speaking = False
            self.likely = None
            return [End("audio_gap", now_ms)]
        return []

    def utterance_done(self) -> None:
        """The caller finished the recognizer; listen for the next utterance."""
        self.speaking = False
        self.paused = None
        self.likely = None
        self.recent.clear()
        self.recent_len = 0

    def _end(self, out: list[Action], reason: str, ts: float, silent: int = 0) -> list[Action]:
        self.speaking = False
        self.paused = None
        self.likely = None  # the caller settles what it started early against the final text
        out.append(End(reason, ts, silent=max(0, silent), vad_ms=self.vad.push_model_ms))
        return out

    def _hold(self, samples: np.ndarray) -> None:
        self.preroll.append(samples)
        self.preroll_len += len(samples)
        while self.preroll and self.preroll_len - len(self.preroll[0]) >= self.preroll_max:
            self.preroll_len -= len(self.preroll.popleft())
