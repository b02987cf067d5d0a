"""One NPC session on one connection as a Sans-I/O state machine.

:meth:`Session.handle` takes a typed input (a client message or mic chunk, the answer to an I/O
request, a stream entry, a timer) and returns typed effects; ``gateway/server.py`` carries the
effects out and feeds their results back as inputs. Every decision is made here: who may resume,
what a take-over means, when a turn is interrupted, when it is done, what the client is sent.

Lifecycle::

    OPENING --load ok, attached, created--> OPEN <--playing / played--> REPLYING
    RESUMING --meta proves the secret, data loaded, attached, took over--> OPEN
    OPEN/REPLYING --close--> CLOSED | --owner entry of another connection--> TAKEN_OVER
                  --connection gone--> DETACHED
    OPENING/RESUMING --refused or storage failed--> REFUSED

The session owns its parts: the mic's sequence and buckets, and the :class:`Relay` (with its
segment bookkeeping and UE's playback clock). Nothing is shared with the connection core.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from gateway import access
from gateway.limits import Limits, Token, TokenBucket
from gateway.relay import PLAYBACK_SLACK_S, InterruptTurn, Relay
from schemas import protocol as P
from schemas.protocol import ErrorCode, ProtocolError
from schemas.streams import CHANNELS, ControlEntry, SessionMeta, parse_id

REPLY_SAMPLE_RATE = 22050

# --------------------------------------------------------------------------- inputs


@dataclass
class ClientMessage:
    """A session message from the client (end_of_utterance, ready, interrupt, close_session);
    ``wall_ms`` is its arrival, which stored control entries carry."""

    message: P.Message
    wall_ms: float = 0.0


@dataclass
class ClientAudio:
    frame: P.MicAudio


@dataclass
class LoadVerdict:
    """The fleet's load as admission control sees it now (gateway/admission.py)."""

    admit: bool
    reason: str = ""
    retry_after_ms: int = 0


@dataclass
class Attached:
    """The fleet-wide caps' answer: None when counted, else why not."""

    refused: str | None = None


@dataclass
class Created:
    """The new session's meta (with its secret's hash and owner) is stored."""


@dataclass
class MetaLoaded:
    """The stored meta of the sid a resume names (empty: none)."""

    raw: dict


@dataclass
class ResumeLoaded:
    next_mic_seq: int
    segments: set[tuple[int, int]]
    ready: set[tuple[int, int]]
    wall_ms: float = 0.0


@dataclass
class TookOver:
    """Our owner entry is in the events stream at ``mark``."""

    mark: tuple[int, int]


@dataclass
class StreamEntry:
    stream: str
    entry_id: str
    fields: dict


@dataclass
class StorageFailed:
    """A storage request of this session failed (Redis unavailable)."""


@dataclass
class Timer:
    """A WakeAt came due."""


@dataclass
class Detach:
    """The connection is gone; the client may come back and resume."""

    wall_ms: float = 0.0


Input = (ClientMessage | ClientAudio | LoadVerdict | Attached | Created | MetaLoaded
         | ResumeLoaded | TookOver | StreamEntry | StorageFailed | Timer | Detach)

# --------------------------------------------------------------------------- effects


@dataclass
class Send:
    message: P.Message | bytes


@dataclass
class SendDone:
    """Send a turn_done with the turn's stored latency marks filled in."""

    sid: str
    message: P.TurnDone


@dataclass
class AppendMic:
    session: str
    sid: str
    seq: int
    pcm: bytes


@dataclass
class AppendEndOfUtterance:
    session: str
    sid: str
    after_seq: int


@dataclass
class CheckLoad:
    session: str  # answer: LoadVerdict


@dataclass
class Attach:
    session: str  # answer: Attached
    sid: str


@dataclass
class Release:
    sid: str


@dataclass
class CreateSession:
    session: str  # answer: Created
    meta: SessionMeta
    secret_hash: str
    owner: str


@dataclass
class LoadMeta:
    session: str  # answer: MetaLoaded
    sid: str


@dataclass
class LoadResume:
    session: str  # answer: ResumeLoaded
    sid: str
    turn: int


@dataclass
class TakeOver:
    """Make ``owner`` the session's one owner and say so in its events stream."""

    session: str  # answer: TookOver
    sid: str
    owner: str


@dataclass
class Control:
    sid: str
    entry: ControlEntry


@dataclass
class Log:
    event: str
    fields: dict = field(default_factory=dict)
    level: str = "info"


@dataclass
class StartRelay:
    session: str
    sid: str
    cursors: dict[str, str]


@dataclass
class StopRelay:
    session: str


@dataclass
class FlushMic:
    """Wait until the session's queued mic audio is stored, then forget its hold."""

    sid: str


@dataclass
class MarkLeft:
    sid: str
    state: str  # "closed" | "detached"


@dataclass
class MarkPlaying:
    """UE's ready: the ready set, and (first time only) the playing event for STT's echo gate."""

    sid: str
    turn: int
    segment: int
    first: bool
    ts: float


@dataclass
class Timing:
    sid: str
    turn: int
    name: str


@dataclass
class CancelTurn:
    sid: str
    turn: int
    reason: str


@dataclass
class KeepHeard:
    sid: str
    turn: int
    played: int


@dataclass
class WakeAt:
    session: str  # answer, at monotonic time ``at``: Timer
    at: float


@dataclass
class LiveLinkStart:
    session: str
    sid: str


@dataclass
class LiveLinkFeed:
    session: str
    sid: str
    stream: str
    entry_id: str
    fields: dict
    interrupted: bool


@dataclass
class LiveLinkReady:
    session: str
    sid: str
    turn: int


@dataclass
class LiveLinkStopTurn:
    session: str
    turn: int


@dataclass
class LiveLinkStopSession:
    session: str


Effect = (Send | SendDone | AppendMic | AppendEndOfUtterance | CheckLoad | Attach | Release
          | CreateSession | LoadMeta | LoadResume | TakeOver | Control | Log | StartRelay
          | StopRelay | FlushMic | MarkLeft | MarkPlaying | Timing | CancelTurn | KeepHeard
          | WakeAt | LiveLinkStart | LiveLinkFeed | LiveLinkReady | LiveLinkStopTurn
          | LiveLinkStopSession)

# --------------------------------------------------------------------------- the machine


class Phase(enum.Enum):
    OPENING = "opening"
    RESUMING = "resuming"
    OPEN = "open"
    REPLYING = "replying"  # UE is (as far as we can tell) playing a reply
    CLOSED = "closed"
    TAKEN_OVER = "taken_over"
    DETACHED = "detached"
    REFUSED = "refused"


LIVE = (Phase.OPEN, Phase.REPLYING)
PENDING = (Phase.OPENING, Phase.RESUMING)


def error(code: str, message: str, session: str | None = None) -> Send:
    return Send(P.ErrorEvent(code=code, message=message, session=session))


class Session:
    def __init__(self, name: str, sid: str, channel: int, limits: Limits, owner: str = "",
                 token: Token | None = None):
        self.name = name  # the client's handle
        self.sid = sid
        self.channel = channel
        self.limits = limits
        self.owner = owner  # this connection's id in the session's owner field
        self.token = token
        self.phase = Phase.OPENING
        self.bucket = TokenBucket(limits.msgs_per_s, limits.msgs_burst)
        self.audio_bucket: TokenBucket | None = None
        self.frame_bytes = 0
        self.next_mic_seq = 1
        self.limited_at = -1e9
        self.bad_audio_at = -1e9
        self.bad_audio_suppressed = 0
        self.owner_mark = (0, 0)  # id of the events entry by which we took it over
        self.relay: Relay | None = None
        self.request: P.OpenSession | P.Resume | None = None
        self.meta: SessionMeta | None = None
        self._secret = ""
        self._wall_ms = 0.0  # arrival of the open/resume request
        self._marked: set[tuple[int, str]] = set()
        self._wake: float | None = None

    # -------------------------------------------------------------- construction

    @classmethod
    def opening(cls, msg: P.OpenSession, sid: str, channel: int, persona: str, voice: str,
                limits: Limits, now: float, wall_ms: float = 0.0, owner: str = "",
                token: Token | None = None) -> tuple[Session, list[Effect]]:
        s = cls(msg.session, sid, channel, limits, owner, token)
        s.request, s._wall_ms = msg, wall_ms
        s.meta = SessionMeta(sid=sid, session=msg.session, npc=msg.npc, persona=persona,
                             voice=voice, sample_rate=msg.sample_rate, channels=msg.channels,
                             format=msg.format, endpoint=msg.endpoint or "vad", seed=sid,
                             player=f"{owner}/{msg.player}" if msg.player else "")
        s._audio_format(msg.sample_rate, msg.channels, msg.format, now)
        return s, [CheckLoad(msg.session)]

    @classmethod
    def resuming(cls, msg: P.Resume, channel: int, limits: Limits, now: float,
                 owner: str = "", token: Token | None = None) -> tuple[Session, list[Effect]]:
        bad = set(msg.last) - set(CHANNELS)
        if bad:
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                f"resume: unknown channel(s) {P.clip(sorted(bad))}",
                                session=msg.session)
        s = cls(msg.session, msg.sid, channel, limits, owner, token)
        s.phase, s.request = Phase.RESUMING, msg
        s.bucket.take(now, 0)
        return s, [LoadMeta(msg.session, msg.sid)]

    def _audio_format(self, rate: int, channels: int, fmt: str, now: float) -> None:
        self.frame_bytes = channels * P.BYTES_PER_SAMPLE[fmt]
        bps = rate * self.frame_bytes
        lim = self.limits
        self.audio_bucket = TokenBucket(bps * lim.audio_realtime_factor, bps * lim.audio_burst_s)
        self.bucket.take(now, 0)

    @property
    def live(self) -> bool:
        return self.phase in LIVE

    @property
    def ended(self) -> bool:
        return self.phase not in LIVE and self.phase not in PENDING

    # -------------------------------------------------------------- dispatch

    def handle(self, inp: Input, now: float) -> list[Effect]:
        """The effects of ``inp`` at monotonic time ``now``."""
        if isinstance(inp, ClientAudio):
            return self._audio(inp.frame, now)
        if isinstance(inp, ClientMessage):
            return self._client(inp.message, inp.wall_ms, now)
        if isinstance(inp, StreamEntry):
            return self._settled(self._entry(inp, now), now)
        if isinstance(inp, Timer):
            self._wake = None
            return self._settled([], now)
        if isinstance(inp, StorageFailed):
            return self._refuse() if self.phase in PENDING else []
        if isinstance(inp, Detach):
            return self._detach(inp.wall_ms)
        if isinstance(inp, LoadVerdict | Attached | Created | MetaLoaded | ResumeLoaded
                      | TookOver):
            # an answer to a storage request; one that comes after the session moved on
            # (a close, a refusal) has nothing left to decide
            if self.phase is Phase.OPENING and isinstance(inp, LoadVerdict | Attached | Created):
                return self._opening(inp)
            if self.phase is Phase.RESUMING and not isinstance(inp, LoadVerdict | Created):
                return self._resuming(inp, now)
            return []
        raise TypeError(f"not an input: {inp!r}")

    def _refuse(self) -> list[Effect]:
        self.phase = Phase.REFUSED
        return [Release(self.sid)]

    # -------------------------------------------------------------- open

    def _opening(self, inp: LoadVerdict | Attached | Created) -> list[Effect]:
        meta = self.meta
        if isinstance(inp, LoadVerdict):
            if not inp.admit:
                # Said before the player speaks: the game can show the NPC as busy and retry.
                self.phase = Phase.REFUSED
                return [Log("session_refused", {"reason": inp.reason, "npc": meta.npc},
                            "warning"),
                        error(ErrorCode.OVERLOADED,
                              f"the NPC is busy: {inp.reason}; retry in "
                              f"{inp.retry_after_ms} ms", self.name)]
            return [Attach(self.name, self.sid)]
        if isinstance(inp, Attached):
            if inp.refused is not None:
                return self._cap_refused(inp.refused)
            self._secret, secret_hash = access.new_secret()
            return [CreateSession(self.name, meta, secret_hash, self.owner)]
        req = self.request
        self.phase = Phase.OPEN
        self.relay = Relay(self.name, self.channel)
        return [
            Control(self.sid, ControlEntry("open", ts=self._wall_ms, data={
                "session": self.name, "npc": req.npc, "persona": meta.persona,
                "sample_rate": req.sample_rate, "channels": req.channels,
                "format": req.format, "endpoint": meta.endpoint})),
            Log("session_opened", {"session": self.sid, "npc": req.npc,
                                   "persona": meta.persona, "rate": req.sample_rate,
                                   "channels": req.channels, "format": req.format}),
            Send(P.SessionOpened(session=self.name, channel=self.channel, sid=self.sid,
                                 npc=req.npc, persona=meta.persona, voice=meta.voice,
                                 reply_sample_rate=REPLY_SAMPLE_RATE, next_mic_seq=1,
                                 resume_secret=self._secret)),
            StartRelay(self.name, self.sid, {s: "0-0" for s in Relay.STREAMS}),
            LiveLinkStart(self.name, self.sid),
        ]

    def _cap_refused(self, why: str) -> list[Effect]:
        self.phase = Phase.REFUSED
        return [Log("session_refused", {"session": self.sid, "reason": why}, "warning"),
                error(ErrorCode.TOO_MANY_SESSIONS, why, self.name)]

    # -------------------------------------------------------------- resume

    def _resuming(self, inp: MetaLoaded | ResumeLoaded | Attached | TookOver,
                  now: float) -> list[Effect]:
        req = self.request
        if isinstance(inp, MetaLoaded):
            return self._check_meta(inp.raw)
        if isinstance(inp, Attached):
            if inp.refused is not None:
                return self._cap_refused(inp.refused)
            return [TakeOver(self.name, self.sid, self.owner)]
        if isinstance(inp, ResumeLoaded):
            self.next_mic_seq = inp.next_mic_seq
            self._wall_ms = inp.wall_ms
            self._audio_format(self.meta.sample_rate, self.meta.channels, self.meta.format, now)
            self.relay = Relay(self.name, self.channel, min_turn=req.turn,
                               live_since_ms=inp.wall_ms, ready=inp.ready,
                               known=inp.segments)
            return [Attach(self.name, self.sid)]
        # TookOver: this connection is the session's one owner from ``mark`` on
        self.owner_mark = inp.mark
        self.phase = Phase.OPEN
        meta = self.meta
        return [
            Control(self.sid, ControlEntry("resume", ts=self._wall_ms, data={  # no secret
                "session": req.session, "turn": req.turn, "last": req.last,
                "mic_seq": req.mic_seq})),
            Log("session_resumed", {"session": self.sid, "turn": req.turn, "last": req.last}),
            Send(P.SessionOpened(session=self.name, channel=self.channel, sid=self.sid,
                                 npc=meta.npc, persona=meta.persona, voice=meta.voice,
                                 reply_sample_rate=REPLY_SAMPLE_RATE,
                                 next_mic_seq=self.next_mic_seq, resumed=True)),
            StartRelay(self.name, self.sid, self._resume_cursors()),
            LiveLinkStart(self.name, self.sid),
        ]

    def _check_meta(self, raw: dict) -> list[Effect]:
        """Who may resume: the holder of the session's secret, while it is not ended, with a
        token that may open its NPC."""
        req = self.request
        stored = raw.get(b"secret_hash", b"").decode() if raw else ""
        # One answer for an unknown sid and a wrong secret: no oracle for valid sids.
        if not raw or not access.secret_matches(req.resume_secret, stored):
            self.phase = Phase.REFUSED
            return [Log("resume_refused", {"session": req.sid}, "warning"),
                    error(ErrorCode.SESSION_NOT_OPEN,
                          "resume: no stored session with this sid and resume_secret",
                          self.name)]
        meta = SessionMeta.from_fields(raw)
        if meta.state in ("closed", "ended"):
            self.phase = Phase.REFUSED
            return [error(ErrorCode.SESSION_NOT_OPEN,
                          f"resume: session {req.sid!r} was {meta.state}", self.name)]
        for npc in (meta.npc, meta.persona):
            if self.token is not None and not self.token.allows(npc):
                self.phase = Phase.REFUSED
                return [error(ErrorCode.NPC_NOT_ALLOWED,
                              f"token {self.token.name!r} may not open npc {npc!r}",
                              self.name)]
        self.meta = meta
        return [LoadResume(self.name, self.sid, req.turn)]

    def _resume_cursors(self) -> dict[str, str]:
        """Replay from what the client says it has of the turn it names; events from the
        start (the relay skips those of earlier turns)."""
        req = self.request
        cursors = {"events": "0-0"}
        for stream, ch in (("transcript", "transcript"), ("reply", "reply"),
                           ("voice", "audio"), ("face", "face")):
            cursors[stream] = f"{req.turn}-{req.last.get(ch, 0)}" if req.turn else "0-0"
        return cursors

    # -------------------------------------------------------------- client input

    def _client(self, msg: P.Message, wall_ms: float, now: float) -> list[Effect]:
        if not self.live:
            return [error(ErrorCode.SESSION_NOT_OPEN,
                          f"{msg.TYPE}: session {self.name!r} is not open yet", self.name)]
        if isinstance(msg, P.CloseSession):
            return self._close(wall_ms)
        if isinstance(msg, P.EndOfUtterance):
            if self.next_mic_seq - 1 < 1:
                return []  # no audio: nothing to end
            return [AppendEndOfUtterance(self.name, self.sid, self.next_mic_seq - 1)]
        if isinstance(msg, P.Ready):
            return self._settled(self._ready(msg, wall_ms, now), now)
        if isinstance(msg, P.Interrupt):
            return self._settled(self._client_interrupt(msg, wall_ms, now), now)
        return [error(ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE} is not accepted from clients",
                      self.name)]

    def _ready(self, msg: P.Ready, wall_ms: float, now: float) -> list[Effect]:
        key = (msg.turn, msg.segment)
        relay = self.relay
        if key not in relay.known_segments:
            return [error(ErrorCode.UNKNOWN_SEGMENT,
                          f"ready for turn {msg.turn} segment {msg.segment}, whose audio was "
                          "never sent on this session", self.name)]
        first = key not in relay.ready_segments  # not a resend after a reconnect
        out: list[Effect] = [
            Control(self.sid, ControlEntry("ready", ts=wall_ms, turn=msg.turn,
                                           segment=msg.segment)),
            *self._timing(msg.turn, "ready")]
        # frames first: the face is what UE is waiting for; the bookkeeping can follow
        for item in relay.ready(msg.turn, msg.segment, now):
            out += self._output(msg.turn, item)
        # the play clock for STT's echo gate: when UE started this segment
        out.append(MarkPlaying(self.sid, msg.turn, msg.segment, first, wall_ms))
        out.append(LiveLinkReady(self.name, self.sid, msg.turn))
        return out

    def _client_interrupt(self, msg: P.Interrupt, wall_ms: float, now: float) -> list[Effect]:
        """UE's interrupt: the answer to our stop, a cut of what plays, or too late (answered,
        never ignored)."""
        verdict = self.relay.client_interrupt(now)
        late = isinstance(verdict, P.ErrorEvent)
        played = msg.played_samples
        out: list[Effect] = [Control(self.sid, ControlEntry(
            "interrupt", ts=wall_ms, turn=0 if late else verdict.turn,
            played=-1 if played is None else played,
            code="too_late" if late else verdict.reason))]
        if late:
            return [*out, Log("interrupt_too_late", {"session": self.sid,
                                                     "reason": verdict.message}),
                    Send(verdict)]
        out.append(Log("interrupt", {"session": self.sid, "turn": verdict.turn,
                                     "reason": verdict.reason, "played": played}))
        if played is not None:  # history keeps only the words UE played before the cut
            out.append(KeepHeard(self.sid, verdict.turn, played))
        if verdict.reason == "client":
            out += self._cancel(verdict.turn, "client")
        return out

    def _audio(self, frame: P.MicAudio, now: float) -> list[Effect]:
        if not self.live:
            return [error(ErrorCode.SESSION_NOT_OPEN,
                          f"audio for session {self.name!r}, which is not open yet", self.name)]
        if len(frame.pcm) % self.frame_bytes:
            return self._bad_audio(now, f"audio payload of {len(frame.pcm)} bytes is not a "
                                        f"whole number of {self.frame_bytes}-byte sample frames")
        if not self.audio_bucket.take(now, len(frame.pcm)):
            return self.limited(now, what="audio faster than real time allows")
        if self.next_mic_seq > P.U32:
            return self._bad_audio(now, f"mic seq {P.U32} (the largest u32) was used: this "
                                        "session takes no more audio; close it and open a new "
                                        "one")
        if frame.seq < self.next_mic_seq:
            return []  # a resend after a reconnect: Redis has it already
        out: list[Effect] = []
        if frame.seq > self.next_mic_seq:
            out += self._bad_audio(now, f"mic chunks {self.next_mic_seq}..{frame.seq - 1} "
                                        "never arrived; continuing")
        self.next_mic_seq = frame.seq + 1
        out.append(AppendMic(self.name, self.sid, frame.seq, frame.pcm))
        return out

    def _bad_audio(self, now: float, message: str) -> list[Effect]:
        """At most one bad_audio per second per session; the next one counts those held back
        (a flood of bad chunks must not become a flood of answers)."""
        if now - self.bad_audio_at < 1.0:
            self.bad_audio_suppressed += 1
            return []
        self.bad_audio_at = now
        err = error(ErrorCode.BAD_AUDIO, message, self.name)
        if self.bad_audio_suppressed:
            err.message.suppressed = self.bad_audio_suppressed
            err.message.message += (f" ({self.bad_audio_suppressed} more bad_audio errors "
                                    "suppressed since the last one)")
            self.bad_audio_suppressed = 0
        return [err]

    def take_message(self, now: float) -> bool:
        """A message for this session within its own rate (not the connection's)?"""
        return self.bucket.take(now)

    def limited(self, now: float, what: str = "too many messages") -> list[Effect]:
        # One error per second at most: answering every dropped message would amplify a flood.
        if now - self.limited_at < 1.0:
            return []
        self.limited_at = now
        return [error(ErrorCode.RATE_LIMITED, f"{what}; messages are being dropped", self.name)]

    # -------------------------------------------------------------- outputs

    def _entry(self, inp: StreamEntry, now: float) -> list[Effect]:
        if not self.live:
            return []
        stream, eid, fields = inp.stream, inp.entry_id, inp.fields
        if stream == "events" and fields.get(b"kind") == b"owner":
            # a later owner entry by another connection: someone resumed this session
            if (parse_id(eid) > self.owner_mark
                    and fields.get(b"code", b"").decode() != self.owner):
                return self._taken_over()
            return []
        relay = self.relay
        out: list[Effect] = []
        if stream == "face":
            ts = relay.turns.get(parse_id(eid)[0])
            out.append(LiveLinkFeed(self.name, self.sid, stream, eid, fields,
                                    ts is not None and ts.interrupted))
        elif stream == "voice":
            out.append(LiveLinkFeed(self.name, self.sid, stream, eid, fields, False))
        try:
            items = relay.feed(stream, eid, fields, now)
        except (ValueError, KeyError) as exc:
            return [*out, Log("bad_stream_entry", {"stream": stream, "id": eid,
                                                   "error": str(exc)}, "error")]
        turn = parse_id(eid)[0] if stream != "events" else 0
        for item in items:
            if isinstance(item, InterruptTurn):
                out += self._cancel(item.turn, item.reason)
            else:
                out += self._output(turn, item)
        return out

    def _output(self, turn: int, item: P.Message | bytes) -> list[Effect]:
        if isinstance(item, bytes):
            kind = item[0]
            name = ("gw_first_audio" if kind == P.FrameKind.REPLY_AUDIO
                    else "gw_first_face" if kind == P.FrameKind.FACE_FRAMES else None)
            return [Send(item), *(self._timing(turn, name) if name else [])]
        if isinstance(item, P.TurnDone) and not item.interrupted:
            return [SendDone(self.sid, item)]
        return [Send(item)]

    def _timing(self, turn: int, name: str) -> list[Effect]:
        """Latency waterfall: the first time ``name`` happened in ``turn``, once."""
        if (turn, name) in self._marked:
            return []
        self._marked.add((turn, name))
        return [Timing(self.sid, turn, name)]

    def _cancel(self, turn: int, reason: str) -> list[Effect]:
        """Cancel ``turn`` everywhere: workers see the event (or the marker, if they start
        later) and stop; UE is told to stop playing unless it stopped on its own."""
        items = self.relay.interrupt(turn, reason)
        if not items:
            return []
        out: list[Effect] = [LiveLinkStopTurn(self.name, turn),
                             CancelTurn(self.sid, turn, reason),
                             Log("turn_interrupted", {"session": self.sid, "turn": turn,
                                                      "reason": reason})]
        for item in items:
            if reason == "client" and isinstance(item, P.StopPlayback):
                continue  # UE stopped on its own; it needs no stop
            out.append(Send(item))
        return out

    def _settled(self, out: list[Effect], now: float) -> list[Effect]:
        """OPEN while nothing plays, REPLYING while UE plays a reply; a timer wakes the machine
        when the reply's audio should have run out."""
        if not self.live:
            return out
        turn = self.relay.current_turn()
        playing = turn is not None and self.relay.playing(turn, now)
        if playing and self.phase is Phase.OPEN:
            self.phase = Phase.REPLYING
        elif not playing and self.phase is Phase.REPLYING:
            self.phase = Phase.OPEN
            out.append(Log("reply_played", {"session": self.sid, "turn": turn}, "debug"))
        if playing:
            ts = self.relay.turns[turn]
            done = ts.voice_end is not None or ts.failed
            if done and not ts.playback.pending and ts.playback.end_at is not None:
                at = ts.playback.end_at + PLAYBACK_SLACK_S
                if at != self._wake:
                    self._wake = at
                    out.append(WakeAt(self.name, at))
        return out

    # -------------------------------------------------------------- ending

    def _close(self, wall_ms: float) -> list[Effect]:
        self.phase = Phase.CLOSED
        return [Control(self.sid, ControlEntry("close", ts=wall_ms)),
                FlushMic(self.sid),  # what the player said before closing still counts
                StopRelay(self.name), LiveLinkStopSession(self.name),
                MarkLeft(self.sid, "closed"), Release(self.sid),
                Send(P.SessionClosed(session=self.name)),
                Log("session_closed", {"session": self.sid})]

    def _taken_over(self) -> list[Effect]:
        """Another connection resumed this session: stop serving it here and say so."""
        self.phase = Phase.TAKEN_OVER
        return [StopRelay(self.name), LiveLinkStopSession(self.name), Release(self.sid),
                Log("session_taken_over", {"session": self.sid}),
                Send(P.TakenOver(session=self.name))]

    def _detach(self, wall_ms: float) -> list[Effect]:
        if not self.live:
            return [Release(self.sid)] if self.phase in PENDING else []
        # The client may come back and resume; until then the session stays in Redis.
        self.phase = Phase.DETACHED
        return [Control(self.sid, ControlEntry("detach", ts=wall_ms)),
                MarkLeft(self.sid, "detached"), Release(self.sid)]
