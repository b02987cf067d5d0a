"""The gateway's protocol logic, Sans-I/O: messages in, actions out, no sockets, no Redis.

:class:`ConnectionCore` validates every inbound message of one WebSocket connection (type, size,
rate, session state) and returns actions for the I/O layer to carry out. :class:`Relay` turns one
session's Redis entries into outbound messages and holds each segment's face frames until the
client's ``ready`` for it. Time is passed in, so tests drive both without a clock or a network.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass, field

from schemas import protocol as P
from schemas.protocol import ErrorCode, ProtocolError
from schemas.streams import (
    CHANNELS,
    EventEntry,
    FaceEntry,
    ReplyEntry,
    TranscriptEntry,
    VoiceEntry,
    parse_id,
)

# --------------------------------------------------------------------------- actions


@dataclass
class Send:
    message: P.Message | bytes


@dataclass
class OpenAction:
    session: str
    sid: str
    channel: int
    request: P.OpenSession
    persona: str
    voice: str


@dataclass
class ResumeAction:
    session: str
    request: P.Resume


@dataclass
class CloseAction:
    session: str
    sid: str


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
class ReadyAction:
    session: str
    sid: str
    turn: int
    segment: int
    first: bool = True  # not a resend (after a reconnect) of a ready the session had


@dataclass
class InterruptAction:
    session: str
    sid: str
    played_samples: int | None


Action = (Send | OpenAction | ResumeAction | CloseAction | AppendMic | AppendEndOfUtterance
          | ReadyAction | InterruptAction)


# --------------------------------------------------------------------------- rate limiting


@dataclass
class TokenBucket:
    rate: float
    burst: float
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float, cost: float = 1.0) -> bool:
        if self.tokens < 0:
            self.tokens, self.stamp = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


@dataclass(frozen=True)
class Token:
    """A client credential from configuration: ``hello`` names it and presents its secret."""

    name: str
    secret: str
    max_sessions: int = 0  # sessions attached at once, fleet-wide, with this token; 0: no cap
    npcs: frozenset[str] | None = None  # persona ids it may open; None: all

    @classmethod
    def parse(cls, text: str) -> Token:
        """``NAME:SECRET[:MAX_SESSIONS[:NPC|NPC...]]`` (``*`` or nothing: every NPC)."""
        parts = text.strip().split(":")
        if len(parts) < 2 or len(parts) > 4 or not P._valid_id(parts[0]) or not parts[1]:
            raise ValueError("gateway.tokens: each entry is NAME:SECRET[:MAX_SESSIONS[:NPC|NPC]] "
                             f"with NAME of [A-Za-z0-9_.-]; got one with {len(parts)} part(s)")
        cap = int(parts[2]) if len(parts) > 2 and parts[2] else 0
        npcs = parts[3] if len(parts) > 3 else "*"
        allowed = None if npcs in ("", "*") else frozenset(n for n in npcs.split("|") if n)
        return cls(parts[0], parts[1], cap, allowed)

    def allows(self, npc: str) -> bool:
        return self.npcs is None or npc in self.npcs


def parse_tokens(entries: list[str], legacy: str = "") -> dict[str, Token]:
    tokens = {t.name: t for t in (Token.parse(e) for e in entries)}
    if legacy:  # gateway.auth_token: one unnamed token, known as "default"
        tokens.setdefault("default", Token("default", legacy))
    return tokens


@dataclass
class Limits:
    max_frame_bytes: int = 64 * 1024
    max_sessions: int = 64
    msgs_per_s: float = 200.0
    msgs_burst: float = 400.0
    conn_msgs_per_s: float = 100.0
    conn_msgs_burst: float = 200.0
    auth_token: str = ""
    tokens: dict[str, Token] = field(default_factory=dict)
    # Audio is limited by its own clock, not by message count: a client may push a whole
    # utterance unpaced (up to audio_burst_s of it at once), but not more than
    # audio_realtime_factor x real time for longer.
    audio_realtime_factor: float = 20.0
    audio_burst_s: float = 30.0

    def __post_init__(self) -> None:
        if self.auth_token and "default" not in self.tokens:
            self.tokens = parse_tokens([], self.auth_token) | self.tokens


# --------------------------------------------------------------------------- sessions


@dataclass
class SessionState:
    session: str
    sid: str
    channel: int
    frame_bytes: int  # bytes per interleaved sample frame
    bytes_per_s: float
    next_mic_seq: int = 1
    bucket: TokenBucket | None = None
    audio_bucket: TokenBucket | None = None
    known_segments: set[tuple[int, int]] = field(default_factory=set)
    ready: set[tuple[int, int]] = field(default_factory=set)
    limited_at: float = -1e9
    bad_audio_at: float = -1e9
    bad_audio_suppressed: int = 0
    owner_mark: tuple[int, int] = (0, 0)  # id of the events entry by which we took it over


class ConnectionCore:
    """State of one client connection and the validation of everything it sends."""

    def __init__(self, limits: Limits, personas: dict[str, str]):
        self.limits = limits
        self.personas = personas  # persona id -> voice
        self.authenticated = not limits.tokens
        self.token: Token | None = None  # the token hello authenticated with
        self.sessions: dict[str, SessionState] = {}
        self.by_channel: dict[int, SessionState] = {}
        self._next_channel = 1
        self.bucket = TokenBucket(limits.conn_msgs_per_s, limits.conn_msgs_burst)
        self._limited_at = -1e9

    # -------------------------------------------------------------- inbound

    def receive_text(self, text: str, now: float) -> list[Action]:
        size = len(text) if text.isascii() else len(text.encode())
        if size > self.limits.max_frame_bytes:
            return self._refuse(now, ErrorCode.FRAME_TOO_LARGE,
                                f"text frame of {size} bytes exceeds the limit of "
                                f"{self.limits.max_frame_bytes}")
        try:
            msg = P.decode_text(text)
        except ProtocolError as exc:
            if not self.bucket.take(now):
                return self._limited(None, now)
            return [self._error(exc.code, exc.message, exc.session)]
        session = getattr(msg, "session", None)
        state = self.sessions.get(session) if session else None
        if not self._allow(state, now):
            return self._limited(state, now)
        try:
            return self._handle(msg, state, now)
        except ProtocolError as exc:
            return [self._error(exc.code, exc.message, exc.session or session)]

    def receive_binary(self, data: bytes, now: float) -> list[Action]:
        if len(data) > self.limits.max_frame_bytes:
            return self._refuse(now, ErrorCode.FRAME_TOO_LARGE,
                                f"binary frame of {len(data)} bytes exceeds the limit of "
                                f"{self.limits.max_frame_bytes}")
        if data[:1] != bytes([P.FrameKind.MIC_AUDIO]):
            return self._refuse(now, ErrorCode.BAD_MESSAGE,
                                "clients send only mic audio frames (kind 1)")
        try:
            frame = P.decode_binary(data)
        except ProtocolError as exc:
            return self._refuse(now, exc.code, exc.message)
        state = self.by_channel.get(frame.channel)
        if not self.authenticated:
            return self._refuse(now, ErrorCode.NOT_AUTHENTICATED, "send hello before audio")
        if state is None:
            return self._refuse(
                now, ErrorCode.SESSION_NOT_OPEN,
                f"audio for channel {frame.channel}, which no open session has; "
                "open a session and use the channel from its 'opened' reply")
        if len(frame.pcm) % state.frame_bytes:
            return self._bad_audio(state, now,
                                   f"audio payload of {len(frame.pcm)} bytes is not a whole number "
                                   f"of {state.frame_bytes}-byte sample frames")
        if not state.audio_bucket.take(now, len(frame.pcm)):
            return self._limited(state, now, what="audio faster than real time allows")
        if state.next_mic_seq > P.U32:
            return self._bad_audio(state, now,
                                   f"mic seq {P.U32} (the largest u32) was used: this session "
                                   "takes no more audio; close it and open a new one")
        if frame.seq < state.next_mic_seq:
            return []  # a resend after a reconnect: Redis has it already
        out: list[Action] = []
        if frame.seq > state.next_mic_seq:
            out += self._bad_audio(state, now, f"mic chunks {state.next_mic_seq}..{frame.seq - 1} "
                                               "never arrived; continuing")
        state.next_mic_seq = frame.seq + 1
        out.append(AppendMic(state.session, state.sid, frame.seq, frame.pcm))
        return out

    def _bad_audio(self, state: SessionState, now: float, message: str) -> list[Action]:
        """At most one bad_audio per second per session; the next one counts those held back
        (a flood of bad chunks must not become a flood of answers)."""
        if now - state.bad_audio_at < 1.0:
            state.bad_audio_suppressed += 1
            return []
        state.bad_audio_at = now
        err = self._error(ErrorCode.BAD_AUDIO, message, state.session)
        if state.bad_audio_suppressed:
            err.message.suppressed = state.bad_audio_suppressed
            err.message.message += (f" ({state.bad_audio_suppressed} more bad_audio errors "
                                    "suppressed since the last one)")
            state.bad_audio_suppressed = 0
        return [err]

    def _refuse(self, now: float, code: str, message: str) -> list[Action]:
        """An error for a frame that names no session: it costs the connection's bucket, so a
        stream of bad frames cannot make the server answer each one."""
        if not self.bucket.take(now):
            return self._limited(None, now)
        return [self._error(code, message)]

    def _allow(self, state: SessionState | None, now: float) -> bool:
        bucket = state.bucket if state is not None else self.bucket
        return bucket.take(now)

    def _limited(self, state: SessionState | None, now: float,
                 what: str = "too many messages") -> list[Action]:
        # One error per second at most: answering every dropped message would amplify a flood.
        last = state.limited_at if state is not None else self._limited_at
        if now - last < 1.0:
            return []
        if state is not None:
            state.limited_at = now
        else:
            self._limited_at = now
        return [self._error(ErrorCode.RATE_LIMITED,
                            f"{what}; messages are being dropped",
                            state.session if state else None)]

    def _handle(self, msg: P.Message, state: SessionState | None, now: float) -> list[Action]:
        if isinstance(msg, P.Hello):
            return self._hello(msg)
        if isinstance(msg, P.Ping):
            return [Send(P.Pong(id=msg.id))]
        if not self.authenticated:
            raise ProtocolError(ErrorCode.NOT_AUTHENTICATED,
                                f"send hello with the auth token before {msg.TYPE!r}")
        if isinstance(msg, P.OpenSession):
            return self._open(msg, now)
        if isinstance(msg, P.Resume):
            return self._resume(msg, now)
        if state is None:
            raise ProtocolError(ErrorCode.SESSION_NOT_OPEN,
                                f"{msg.TYPE}: no open session {msg.session!r} on this connection",
                                session=msg.session)
        if isinstance(msg, P.CloseSession):
            self._forget(state)
            return [CloseAction(state.session, state.sid)]
        if isinstance(msg, P.EndOfUtterance):
            return [AppendEndOfUtterance(state.session, state.sid, state.next_mic_seq - 1)]
        if isinstance(msg, P.Ready):
            key = (msg.turn, msg.segment)
            if key not in state.known_segments:
                raise ProtocolError(
                    ErrorCode.UNKNOWN_SEGMENT,
                    f"ready for turn {msg.turn} segment {msg.segment}, whose audio was never "
                    "sent on this session", session=state.session)
            first = key not in state.ready
            state.ready.add(key)
            return [ReadyAction(state.session, state.sid, msg.turn, msg.segment, first)]
        if isinstance(msg, P.Interrupt):
            return [InterruptAction(state.session, state.sid, msg.played_samples)]
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"{msg.TYPE} is not accepted from clients")

    def _hello(self, msg: P.Hello) -> list[Action]:
        if msg.protocol != P.PROTOCOL_VERSION:
            raise ProtocolError(ErrorCode.UNSUPPORTED_PROTOCOL,
                                f"protocol {msg.protocol} is not supported; this server speaks "
                                f"{P.PROTOCOL_VERSION} (see 'Changes for client authors' in the "
                                "protocol document)")
        if self.limits.tokens:
            token = self.limits.tokens.get(msg.token_name or "default")
            # compare even for an unknown name, so the answer's timing tells nothing
            want = token.secret if token is not None else secrets.token_hex(16)
            if not hmac.compare_digest((msg.token or "").encode(), want.encode()) or not token:
                raise ProtocolError(ErrorCode.AUTH_FAILED,
                                    "hello: unknown token_name or wrong token")
            self.token = token
        self.authenticated = True
        return [Send(P.Welcome(max_frame_bytes=self.limits.max_frame_bytes,
                               max_sessions=self.limits.max_sessions,
                               npcs=self.allowed_npcs(),
                               token_name=self.token.name if self.token else None))]

    def allowed_npcs(self) -> list[str]:
        return sorted(p for p in self.personas if self.token is None or self.token.allows(p))

    def check_allowed(self, npc: str, session: str) -> None:
        if self.token is not None and not self.token.allows(npc):
            raise ProtocolError(ErrorCode.NPC_NOT_ALLOWED,
                                f"token {self.token.name!r} may not open npc {npc!r}",
                                session=session)

    def _new_state(self, session: str, sid: str, rate: int, channels: int, fmt: str,
                   now: float) -> SessionState:
        if len(self.sessions) >= self.limits.max_sessions:
            raise ProtocolError(ErrorCode.TOO_MANY_SESSIONS,
                                f"this connection already has {self.limits.max_sessions} sessions",
                                session=session)
        channel = self._next_channel
        while channel in self.by_channel:
            channel = channel % 65535 + 1
        self._next_channel = channel % 65535 + 1
        frame_bytes = channels * P.BYTES_PER_SAMPLE[fmt]
        bps = rate * frame_bytes
        lim = self.limits
        state = SessionState(
            session=session, sid=sid, channel=channel, frame_bytes=frame_bytes,
            bytes_per_s=bps,
            bucket=TokenBucket(lim.msgs_per_s, lim.msgs_burst),
            audio_bucket=TokenBucket(bps * lim.audio_realtime_factor, bps * lim.audio_burst_s),
        )
        state.bucket.take(now, 0)
        self.sessions[session] = state
        self.by_channel[channel] = state
        return state

    def _open(self, msg: P.OpenSession, now: float) -> list[Action]:
        if msg.session in self.sessions:
            raise ProtocolError(ErrorCode.SESSION_EXISTS,
                                f"session {msg.session!r} is already open on this connection",
                                session=msg.session)
        P.validate_open(msg)
        persona = msg.persona or msg.npc
        if persona not in self.personas:
            raise ProtocolError(
                ErrorCode.UNKNOWN_NPC,
                f"no persona {persona!r}; this connection may open: "
                f"{', '.join(self.allowed_npcs())}", session=msg.session)
        self.check_allowed(msg.npc, msg.session)
        self.check_allowed(persona, msg.session)
        # readable in logs, unique, and at most 64 characters; it is no credential (see resume)
        sid = f"{msg.session[:47]}.{secrets.token_hex(8)}"
        state = self._new_state(msg.session, sid, msg.sample_rate, msg.channels, msg.format, now)
        return [OpenAction(msg.session, sid, state.channel, msg, persona, self.personas[persona])]

    def _resume(self, msg: P.Resume, now: float) -> list[Action]:
        if msg.session in self.sessions:
            raise ProtocolError(ErrorCode.SESSION_EXISTS,
                                f"session {msg.session!r} is already open on this connection",
                                session=msg.session)
        bad = set(msg.last) - set(CHANNELS)
        if bad:
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                f"resume: unknown channel(s) {P.clip(sorted(bad))}",
                                session=msg.session)
        for other in self.sessions.values():
            if other.sid == msg.sid:  # twice on one link would double every output
                raise ProtocolError(ErrorCode.SESSION_EXISTS,
                                    f"resume: sid {msg.sid!r} is already attached on this "
                                    f"connection as session {other.session!r}",
                                    session=msg.session)
        # The I/O layer checks the sid against Redis and calls resumed() with the format.
        return [ResumeAction(msg.session, msg)]

    def resumed(self, msg: P.Resume, rate: int, channels: int, fmt: str, next_mic_seq: int,
                segments: set[tuple[int, int]], ready: set[tuple[int, int]],
                now: float) -> SessionState:
        state = self._new_state(msg.session, msg.sid, rate, channels, fmt, now)
        state.next_mic_seq = next_mic_seq
        state.known_segments |= segments
        state.ready |= ready
        return state

    def _forget(self, state: SessionState) -> None:
        self.sessions.pop(state.session, None)
        self.by_channel.pop(state.channel, None)

    def drop(self, session: str) -> None:
        state = self.sessions.get(session)
        if state is not None:
            self._forget(state)

    @staticmethod
    def _error(code: str, message: str, session: str | None = None) -> Send:
        return Send(P.ErrorEvent(code=code, message=message, session=session))


# --------------------------------------------------------------------------- relay


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

    def __init__(self, state: SessionState, min_turn: int = 0, live_since_ms: float = 0.0):
        self.state = state
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
        return [P.StopPlayback(session=self.state.session, turn=turn),
                P.TurnDone(session=self.state.session, turn=turn,
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
        return P.ErrorEvent(code=ErrorCode.NOT_PLAYING, session=self.state.session,
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
        st = self.state
        if stream == "events":
            return self._event(EventEntry.from_fields(fields), now)
        turn, seq = parse_id(entry_id)
        if turn in self.turns and self.turns[turn].interrupted:
            return []  # the player cut this turn off: its late output is not wanted
        if stream == "transcript":
            t = TranscriptEntry.from_fields(fields)
            return [P.Transcript(session=st.session, turn=turn, seq=seq, text=t.text,
                                 final=t.final, start_sample=t.start_sample,
                                 end_sample=t.end_sample)]
        if stream == "reply":
            r = ReplyEntry.from_fields(fields)
            return [P.ReplyText(session=st.session, turn=turn, seq=seq, segment=r.segment,
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
                                 session=self.state.session, turn=ev.turn)]
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
        return [P.TurnDone(session=self.state.session, turn=turn, no_speech=True)]

    def _voice(self, turn: int, seq: int, v: VoiceEntry, now: float) -> list[P.Message | bytes]:
        st = self.state
        ts = self._turn(turn)
        if v.end:
            ts.voice_end = v
            return self._maybe_done(turn)
        st.known_segments.add((turn, v.segment))
        flags = P.FLAG_LAST_IN_SEGMENT if v.last_in_segment else 0
        frame = P.ReplyAudio(st.channel, turn, seq, v.segment, v.rate, v.sample, v.pcm,
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
        ts.playback.sent(segment, seconds, (turn, segment) in self.state.ready, now)

    def _face(self, turn: int, seq: int, f: FaceEntry, now: float) -> list[P.Message | bytes]:
        st = self.state
        ts = self._turn(turn)
        if f.end:
            ts.face_end = f
            return self._maybe_done(turn)
        frame = P.FaceFrames(st.channel, turn, seq, f.segment, f.samples.astype("<u8"),
                             f.values)
        key = (turn, f.segment)
        if key in st.ready:
            self._face_sent(ts, len(f.samples))
            return [frame.encode()]
        self.held.setdefault(key, []).append(frame)
        ts.held += 1
        return []

    def _face_sent(self, ts: _TurnState, records: int) -> None:
        self.face_sent += records
        ts.face_sent += records

    def ready(self, turn: int, segment: int, now: float = 0.0) -> list[P.Message | bytes]:
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
        return [P.TurnDone(session=self.state.session, turn=turn,
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
