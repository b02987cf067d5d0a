"""One session's outputs, Sans-I/O: Redis entries in, client messages out.

:class:`Relay` holds each segment's face frames until the client's ``ready`` for it and keeps
the bookkeeping of which segments were sent and made ready; :class:`Playback` follows UE's
playback clock so barge-in and ``interrupt`` know what is still playing. Time is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from schemas import protocol as P
from schemas.protocol import ErrorCode
from schemas.streams import (
    EventEntry,
    FaceEntry,
    ReplyEntry,
    TranscriptEntry,
    VoiceEntry,
    parse_id,
)

PLAYBACK_SLACK_S = 0.3  # UE's own buffering beyond the audio's length


@dataclass
class Playback:
    """UE's playback of one turn's reply, as far as the gateway can know it.

    A segment plays from its ``ready`` on; segments and chunks play back to back, and a chunk
    never plays before it was sent (a late chunk stalls the audio). "Still playing" follows
    this clock, not the server's production, which ends long before UE's audio does.
    """

    end_at: float | None = None  # when UE has played all the audio it may play so far
    pending: dict[int, float] = field(default_factory=dict)  # segment -> s sent, not ready

    def sent(self, segment: int, seconds: float, ready: bool, now: float) -> None:
        if ready and segment not in self.pending:
            self._play(seconds, now)
        else:
            self.pending[segment] = self.pending.get(segment, 0.0) + seconds

    def ready(self, segment: int, now: float) -> None:
        seconds = self.pending.pop(segment, None)
        if seconds is not None:
            self._play(seconds, now)

    def _play(self, seconds: float, now: float) -> None:
        start = now if self.end_at is None else max(self.end_at, now)
        self.end_at = start + seconds

    def busy(self, now: float) -> bool:
        """Audio waiting for its ready counts: UE is about to play it."""
        if self.pending:
            return True
        return self.end_at is not None and now < self.end_at + PLAYBACK_SLACK_S


@dataclass
class _TurnState:
    voice_end: VoiceEntry | None = None
    face_end: FaceEntry | None = None
    failed: bool = False  # a stage gave up: no more audio will come
    held: int = 0
    done: bool = False
    interrupted: bool = False
    audio_samples: int = 0  # end of the last reply-audio chunk sent
    face_sent: int = 0  # face records sent
    segments: set[int] = field(default_factory=set)  # segments with audio sent
    first_audio_at: float | None = None
    ready_at: float | None = None
    playback: Playback = field(default_factory=Playback)


@dataclass
class InterruptTurn:
    """Relay's verdict that ``turn`` must stop: the I/O layer cancels it in Redis.

    ``reason`` is "barge_in" (the player spoke over it), "client" (UE's own interrupt) or
    "answer" (UE's interrupt answering our stop: the turn is cut already, only the heard text
    is left to keep)."""

    turn: int
    reason: str


class Relay:
    """One session's outputs: Redis entries in, client messages out, face gated by ``ready``."""

    STREAMS = ("transcript", "reply", "voice", "face", "events")

    def __init__(self, session: str, channel: int, min_turn: int = 0,
                 live_since_ms: float = 0.0, ready: set[tuple[int, int]] | None = None,
                 known: set[tuple[int, int]] | None = None):
        self.session = session
        self.channel = channel
        # (turn, segment)s whose audio went out (a ready may name only those), and those UE
        # said ready for: a resume brings both from Redis
        self.known_segments: set[tuple[int, int]] = set(known or ()) | set(ready or ())
        self.ready_segments: set[tuple[int, int]] = set(ready or ())
        self.min_turn = min_turn
        # events written before this (wall-clock ms) are history a resume replays: a speech
        # start among them must not cut the replayed reply the client is about to play
        self.live_since_ms = live_since_ms
        self.held: dict[tuple[int, int], list[P.FaceFrames]] = {}
        self.turns: dict[int, _TurnState] = {}
        self.face_sent = 0
        self.awaiting_answer: int | None = None  # turn we sent stop for, until UE's interrupt

    def _turn(self, turn: int) -> _TurnState:
        return self.turns.setdefault(turn, _TurnState())

    def playing(self, turn: int, now: float) -> bool:
        """Is UE (as far as we can tell) still playing ``turn``'s reply?"""
        ts = self.turns.get(turn)
        if ts is None or ts.first_audio_at is None or ts.interrupted:
            return False
        if ts.voice_end is None and not ts.failed:
            return True  # more audio is coming
        return ts.playback.busy(now)

    def current_turn(self) -> int | None:
        played = [t for t, ts in self.turns.items() if ts.first_audio_at is not None]
        return max(played) if played else None

    def interrupt(self, turn: int, reason: str = "client") -> list[P.Message | bytes]:
        """Stop ``turn``: UE stops playback; what is still held or in flight is dropped. A turn
        whose turn_done went out already (UE still playing it) gets a second, interrupted one."""
        ts = self._turn(turn)
        if ts.interrupted:
            return []
        ts.interrupted = True
        ts.done = True
        for key in [k for k in self.held if k[0] == turn]:
            del self.held[key]
        ts.held = 0
        if reason == "barge_in":
            self.awaiting_answer = turn
        # the totals are what was sent, so the client can check its buffers against them
        return [P.StopPlayback(session=self.session, turn=turn),
                P.TurnDone(session=self.session, turn=turn,
                           audio_samples=ts.audio_samples, face_frames=ts.face_sent,
                           segments=len(ts.segments), interrupted=True)]

    def client_interrupt(self, now: float) -> InterruptTurn | P.ErrorEvent:
        """UE sent ``interrupt``: the answer to our ``stop``, a cut of the reply it is playing,
        or too late (nothing plays any more), which is answered, never ignored."""
        if self.awaiting_answer is not None:
            turn, self.awaiting_answer = self.awaiting_answer, None
            return InterruptTurn(turn, "answer")
        playing = [t for t in self.turns if self.playing(t, now)]
        if playing:
            return InterruptTurn(max(playing), "client")
        return P.ErrorEvent(code=ErrorCode.NOT_PLAYING, session=self.session,
                            message=f"interrupt: nothing is playing; {self._last_played(now)}")

    def _last_played(self, now: float) -> str:
        turn = self.current_turn()
        if turn is None:
            return "no reply audio was sent on this session yet"
        ts = self.turns[turn]
        if ts.interrupted:
            return f"turn {turn} was interrupted already"
        ago = now - (ts.playback.end_at or now)
        return f"turn {turn}'s reply finished playing {ago:.1f} s ago"

    def feed(self, stream: str, entry_id: str, fields: dict,
             now: float = 0.0) -> list[P.Message | bytes | InterruptTurn]:
        if stream == "events":
            return self._event(EventEntry.from_fields(fields), now)
        turn, seq = parse_id(entry_id)
        if turn in self.turns and self.turns[turn].interrupted:
            return []  # the player cut this turn off: its late output is not wanted
        if stream == "transcript":
            t = TranscriptEntry.from_fields(fields)
            return [P.Transcript(session=self.session, turn=turn, seq=seq, text=t.text,
                                 final=t.final, start_sample=t.start_sample,
                                 end_sample=t.end_sample)]
        if stream == "reply":
            r = ReplyEntry.from_fields(fields)
            return [P.ReplyText(session=self.session, turn=turn, seq=seq, segment=r.segment,
                                text=r.text, final=r.end)]
        if stream == "voice":
            return self._voice(turn, seq, VoiceEntry.from_fields(fields), now)
        if stream == "face":
            return self._face(turn, seq, FaceEntry.from_fields(fields), now)
        raise ValueError(f"unknown stream {stream}")

    def _event(self, ev: EventEntry, now: float) -> list[P.Message | bytes | InterruptTurn]:
        if ev.turn < self.min_turn:
            return []
        if ev.kind == "error":
            self._turn(ev.turn).failed = True
            return [P.ErrorEvent(code=ev.code or ErrorCode.TURN_FAILED, message=ev.message,
                                 session=self.session, turn=ev.turn)]
        if ev.kind == "no_speech":
            return self._no_speech(ev.turn)
        if ev.kind == "speech_start" and ev.ts >= self.live_since_ms:
            # the player speaks over a reply UE is still playing, turn_done or not
            playing = [t for t in self.turns if t < ev.turn and self.playing(t, now)]
            if playing:
                return [InterruptTurn(max(playing), "barge_in")]
        return []

    def _no_speech(self, turn: int) -> list[P.Message | bytes]:
        """end_of_utterance after audio with nothing to answer: the turn ends, saying so."""
        ts = self._turn(turn)
        if ts.done:
            return []  # a retried STT job told us twice
        ts.done = True
        return [P.TurnDone(session=self.session, turn=turn, no_speech=True)]

    def _voice(self, turn: int, seq: int, v: VoiceEntry, now: float) -> list[P.Message | bytes]:
        ts = self._turn(turn)
        if v.end:
            ts.voice_end = v
            return self._maybe_done(turn)
        self.known_segments.add((turn, v.segment))
        flags = P.FLAG_LAST_IN_SEGMENT if v.last_in_segment else 0
        frame = P.ReplyAudio(self.channel, turn, seq, v.segment, v.rate, v.sample, v.pcm,
                             flags).encode()
        self._audio_sent(turn, ts, v.segment, v.sample + v.num_samples, v.rate, now)
        return [frame]

    def _audio_sent(self, turn: int, ts: _TurnState, segment: int, end: int, rate: int,
                    now: float) -> None:
        if ts.first_audio_at is None:
            ts.first_audio_at = now
            if self.awaiting_answer is not None and self.awaiting_answer < turn:
                self.awaiting_answer = None  # UE never answered that stop; this is a new reply
        seconds = max(0, end - ts.audio_samples) / rate if rate else 0.0
        ts.audio_samples = max(ts.audio_samples, end)
        ts.segments.add(segment)
        ts.playback.sent(segment, seconds, (turn, segment) in self.ready_segments, now)

    def _face(self, turn: int, seq: int, f: FaceEntry, now: float) -> list[P.Message | bytes]:
        ts = self._turn(turn)
        if f.end:
            ts.face_end = f
            return self._maybe_done(turn)
        frame = P.FaceFrames(self.channel, turn, seq, f.segment, f.samples.astype("<u8"),
                             f.values)
        key = (turn, f.segment)
        if key in self.ready_segments:
            self._face_sent(ts, len(f.samples))
            return [frame.encode()]
        self.held.setdefault(key, []).append(frame)
        ts.held += 1
        return []

    def _face_sent(self, ts: _TurnState, records: int) -> None:
        self.face_sent += records
        ts.face_sent += records

    def ready(self, turn: int, segment: int, now: float = 0.0) -> list[P.Message | bytes]:
        self.ready_segments.add((turn, segment))
        ts = self._turn(turn)
        if ts.ready_at is None:
            ts.ready_at = now  # UE starts playing: its audio clock starts here
        ts.playback.ready(segment, now)
        out: list[P.Message | bytes] = []
        frames = self.held.pop((turn, segment), [])
        for frame in frames:
            self._face_sent(ts, len(frame.samples))
            out.append(frame.encode())
        if frames:
            ts.held -= len(frames)
            out += self._maybe_done(turn)
        return out

    def _maybe_done(self, turn: int) -> list[P.Message | bytes]:
        ts = self._turn(turn)
        if ts.done or ts.voice_end is None or ts.face_end is None or ts.held:
            return []
        ts.done = True
        return [P.TurnDone(session=self.session, turn=turn,
                           audio_samples=ts.voice_end.sample,
                           face_frames=ts.face_end.first_index,
                           segments=ts.voice_end.segment)]


def heard_text(texts: dict[int, str], voice: list[VoiceEntry], played: int) -> str:
    """The reply as far as the player heard it: whole segments before the cut, and the cut
    segment up to the end of the last word that had started playing."""
    cut_segment, cut_end = -1, 0
    for v in voice:
        for m in v.marks:
            if m.kind == "word" and m.sample < played:
                end = int(m.value.split(":")[1])
                if (v.segment, end) > (cut_segment, cut_end):
                    cut_segment, cut_end = v.segment, end
    parts = [texts[s] for s in sorted(texts) if s < cut_segment]
    if cut_segment in texts:
        parts.append(texts[cut_segment][:cut_end])
    return " ".join(parts).strip()
