"""Redis key layout and the typed entries of every Redis stream.

Per-session output streams use explicit entry IDs ``<turn>-<seq>`` (seq from 1 within the turn):
Redis refuses an ID at or below the stream's top entry, so a worker that re-runs a job after a
crash cannot duplicate an entry, a takeover reads the top ID to learn where to continue, and a
client resumes with an XREAD after ``<turn>-<last seq>``. The mic stream uses ``<chunk seq>-0``
for audio and ``<chunk seq>-1`` for an end-of-utterance after that chunk, so a client's resend
after a reconnect is dropped by Redis itself.

All keys of one session share the hash tag ``{sid}``; all job streams share ``{jobs}`` so that
"enqueue the next job and ack this one" is one MULTI even on Redis Cluster.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas.arkit import NUM_FACE_VALUES

STAGES = ("stt", "llm", "tts", "lipsync")

# Every per-session key (``Keys.session``), with who writes it. All of them, and the session's
# listening state (``Keys.listener``), are deleted together by the session sweep
# (gateway/lifecycle.py) when the session's recording expires, ``redis.retention_s`` after the
# session ended (closed, or detached past ``redis.detached_grace_s``), or by ``parley forget``.
# Nothing else expires them one by one, so no key of a session can outlive the rest.
SESSION_KEYS = (
    "meta",        # hash, gateway: SessionMeta, state (open, detached, closed)
    "mic",         # stream, gateway: mic chunks <seq>-0, end_of_utterance <seq>-1
    "transcript",  # stream, stt: partial and final transcripts <turn>-<seq>
    "reply",       # stream, llm: reply fragments <turn>-<seq>
    "voice",       # stream, tts: reply audio <turn>-<seq>
    "face",        # stream, lipsync: face frames <turn>-<seq>
    "events",      # stream, all: speech_start, interrupt, errors
    "ready",       # set, gateway: "<turn>:<segment>" UE said ready for
    "history",     # hash, llm and gateway: what was said and heard, per turn
    "timing",      # hash, all: latency waterfall "<turn>:<mark>" -> ms
    "cancel",      # string, gateway: the latest interrupted turn
    "control",     # stream, gateway: the client's control messages as they came (ControlEntry)
    # Speculative replies (workers/speculation.py), never read by the gateway: the streams
    # also expire a while after their last write, the record after the last speculation.
    "spec",        # hash, stt (and the speculative jobs): speculations, their state and jobs
    "spec_reply",  # stream, llm: speculative reply fragments <speculation>-<seq>
    "spec_voice",  # stream, tts: speculative reply audio <speculation>-<seq>
)
# Client-visible channels, each numbered 1.. per turn; see Resume in schemas/protocol.py.
CHANNELS = ("transcript", "reply", "audio", "face")


class Keys:
    """Every Redis key Parley uses, in one place."""

    def __init__(self, prefix: str = "parley"):
        self.prefix = prefix

    def jobs(self, stage: str) -> str:
        return f"{self.prefix}:{{jobs}}:{stage}"

    def dead(self, stage: str) -> str:
        return f"{self.prefix}:{{jobs}}:dead:{stage}"

    def started(self, stage: str, sid: str, turn: int) -> str:
        """Guard: ``stage``'s job for this turn has been enqueued (same slot as the jobs)."""
        return f"{self.prefix}:{{jobs}}:started:{stage}:{sid}:{turn}"

    def group(self, stage: str) -> str:
        return stage

    def session(self, sid: str, name: str) -> str:
        """One of the session's own keys; ``name`` is one of SESSION_KEYS."""
        return f"{self.prefix}:s:{{{sid}}}:{name}"

    def session_keys(self, sid: str) -> list[str]:
        """Every key a session owns, in its own slot and in the {jobs} slot (for the sweep)."""
        return [*(self.session(sid, n) for n in SESSION_KEYS), self.listener(sid)]

    def listener(self, sid: str) -> str:
        """The session's STT listening state (ListenState), beside the job streams so that
        starting or ending a listening job and writing this state are one atomic step."""
        return f"{self.prefix}:{{jobs}}:listen:{sid}"

    def speaker(self, player: str) -> str:
        """What the recognizer learned about a player's voice (SessionMeta.player), for their
        sessions' first utterances; expires with the session TTL."""
        return f"{self.prefix}:player:{{{player}}}:speaker"

    def sessions(self) -> str:
        """Sorted set: every session not yet swept, scored by when it expires (ms since the
        epoch; an attached session's score is pushed forward while its gateway lives)."""
        return f"{self.prefix}:sessions"

    def alive(self, consumer: str) -> str:
        """A worker's proof of life, kept by its sidecar process (workers/liveness.py)."""
        return f"{self.prefix}:{{jobs}}:alive:{consumer}"

    def workers(self, stage: str) -> str:
        """Sorted set of the stage's workers (consumer names), scored by last heartbeat (ms)."""
        return f"{self.prefix}:workers:{stage}"

    def worker(self, consumer: str) -> str:
        return f"{self.prefix}:worker:{consumer}"

    def worker_pattern(self) -> str:
        return f"{self.prefix}:worker:*"


def now_ms() -> float:
    """Wall-clock stamp for latency accounting only (positions are sample counts)."""
    return round(time.time() * 1000.0, 3)


def entry_id(turn: int, seq: int) -> str:
    return f"{turn}-{seq}"


def parse_id(raw: bytes | str) -> tuple[int, int]:
    s = raw.decode() if isinstance(raw, bytes) else raw
    a, _, b = s.partition("-")
    return int(a), int(b or 0)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _i(v: Any, default: int = 0) -> int:
    return default if v is None else int(_s(v))


def _f(v: Any, default: float = 0.0) -> float:
    return default if v is None else float(_s(v))


def _get(d: dict, k: str) -> Any:
    return d.get(k.encode(), d.get(k))


# --------------------------------------------------------------------------- jobs


@dataclass
class Job:
    """Stage X, session S, turn T. ``cursor`` tells STT where in the mic stream to start.

    ``spec``: a speculative job of speculation ``spec`` (its outputs go to the session's
    ``spec_*`` streams); ``adopt``: a turn's job that takes over speculation ``adopt``'s
    outputs (workers/speculation.py)."""

    stage: str
    sid: str
    turn: int
    cursor: str = "0-0"
    attempt: int = 1
    text: str = ""  # llm: the final transcript
    ts: float = field(default_factory=now_ms)
    id: str = ""  # the job stream entry ID, set when read
    position: int = 0  # stt: 16 kHz samples since the session's first mic chunk, at ``cursor``
    spec: int = 0
    adopt: int = 0

    def to_fields(self) -> dict[str, str]:
        # (WAKE_LISTENER_LUA writes the same fields for an STT job)
        fields = {
            "stage": self.stage, "sid": self.sid, "turn": str(self.turn), "cursor": self.cursor,
            "attempt": str(self.attempt), "text": self.text, "ts": str(self.ts),
            "pos": str(self.position),
        }
        if self.spec:
            fields["spec"] = str(self.spec)
        if self.adopt:
            fields["adopt"] = str(self.adopt)
        return fields

    @classmethod
    def from_fields(cls, entry_id: bytes | str, d: dict) -> Job:
        return cls(
            stage=_s(_get(d, "stage")), sid=_s(_get(d, "sid")), turn=_i(_get(d, "turn")),
            cursor=_s(_get(d, "cursor") or "0-0"), attempt=_i(_get(d, "attempt"), 1),
            text=_s(_get(d, "text") or ""), ts=_f(_get(d, "ts")), id=_s(entry_id),
            position=_i(_get(d, "pos")), spec=_i(_get(d, "spec")), adopt=_i(_get(d, "adopt")),
        )


# --------------------------------------------------------------------------- listening


@dataclass
class ListenState:
    """Where STT is in a session's mic stream (hash ``Keys.listener``).

    ``active``: a listening job exists (queued or running). A session gets one when mic audio
    arrives and gives it back after a quiet spell, so an NPC nobody talks to holds no worker.
    ``cursor``/``position``: mic entry ID and 16 kHz position where the next job starts;
    ``turn``: the turn its next utterance becomes. The same hash holds ``speaker``
    (:data:`SPEAKER_FIELD`), written by STT beside these: what the recognizer learned about the
    player, so their next utterance starts adapted on whichever worker takes it.
    """

    active: bool = False
    cursor: str = "0-0"
    turn: int = 1
    position: int = 0

    def to_fields(self) -> dict[str, str]:
        return {"active": "1" if self.active else "0", "cursor": self.cursor,
                "turn": str(self.turn), "pos": str(self.position)}

    @classmethod
    def from_fields(cls, d: dict) -> ListenState:
        return cls(active=_s(_get(d, "active") or "0") == "1",
                   cursor=_s(_get(d, "cursor") or "0-0"), turn=_i(_get(d, "turn"), 1),
                   position=_i(_get(d, "pos")))


SPEAKER_FIELD = "speaker"
# In a session's meta hash: the speaker value its first utterance started from when it came from
# the player's other sessions (Keys.speaker); a replay starts there too
SPEAKER_START = "speaker_start"


# Start a listening job for a session unless one is active: run after every mic append (by the
# gateway), and by STT after it gives a session back (audio that came in meanwhile is not left
# unread). KEYS: listener hash, STT job stream; ARGV: sid, now (ms). Returns 1 when it started one.
WAKE_LISTENER_LUA = """
local st = redis.call('HMGET', KEYS[1], 'active', 'cursor', 'turn', 'pos')
if st[1] == '1' then
  return 0
end
local cursor, turn, pos = st[2] or '0-0', st[3] or '1', st[4] or '0'
redis.call('HSET', KEYS[1], 'active', '1', 'cursor', cursor, 'turn', turn, 'pos', pos)
redis.call('XADD', KEYS[2], '*', 'stage', 'stt', 'sid', ARGV[1], 'turn', turn, 'cursor', cursor,
           'attempt', '1', 'text', '', 'ts', ARGV[2], 'pos', pos)
return 1
"""


# --------------------------------------------------------------------------- session meta


@dataclass
class SessionMeta:
    sid: str
    session: str  # the client's handle for it
    npc: str
    persona: str
    voice: str
    sample_rate: int
    channels: int
    format: str
    created: float = field(default_factory=now_ms)
    state: str = "open"
    endpoint: str = "vad"  # "vad" | "client": who ends an utterance
    # seeds what is random by design (the idle face's blinks): the sid, or on a replay the
    # recorded session's seed, so that the replay makes the same face frames
    seed: str = ""
    # "<connection>/<player id>" when the client named the player: the key of what the
    # recognizer learned about their voice (Keys.speaker), shared by their sessions
    player: str = ""

    def to_fields(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items()}

    @classmethod
    def from_fields(cls, d: dict) -> SessionMeta:
        g = {_s(k): _s(v) for k, v in d.items()}
        return cls(
            sid=g["sid"], session=g["session"], npc=g["npc"], persona=g["persona"],
            voice=g["voice"], sample_rate=int(g["sample_rate"]), channels=int(g["channels"]),
            format=g["format"], created=float(g.get("created", 0)), state=g.get("state", "open"),
            endpoint=g.get("endpoint", "vad"), seed=g.get("seed", ""),
            player=g.get("player", ""),
        )


# --------------------------------------------------------------------------- mic stream


def mic_id(seq: int, control: bool = False) -> str:
    return f"{seq}-{1 if control else 0}"


@dataclass
class MicEntry:
    seq: int
    pcm: bytes = b""
    end_of_utterance: bool = False
    ts: float = field(default_factory=now_ms)

    def to_fields(self) -> dict[str, Any]:
        if self.end_of_utterance:
            return {"eou": "1", "ts": str(self.ts)}
        return {"pcm": self.pcm, "ts": str(self.ts)}

    @classmethod
    def from_entry(cls, entry_id: bytes | str, d: dict) -> MicEntry:
        seq, sub = parse_id(entry_id)
        return cls(seq=seq, pcm=_get(d, "pcm") or b"", end_of_utterance=sub == 1,
                   ts=_f(_get(d, "ts")))


# --------------------------------------------------------------------------- outputs


@dataclass
class TranscriptEntry:
    text: str
    final: bool
    start_sample: int = 0  # 16 kHz samples since the session opened
    end_sample: int = 0
    mic_seq: int = 0  # last mic chunk that went into it
    ts: float = field(default_factory=now_ms)
    end_of_speech_ts: float = 0.0

    def to_fields(self) -> dict[str, str]:
        return {
            "text": self.text, "final": "1" if self.final else "0",
            "start": str(self.start_sample), "end": str(self.end_sample),
            "mic_seq": str(self.mic_seq), "ts": str(self.ts),
            "eos_ts": str(self.end_of_speech_ts),
        }

    @classmethod
    def from_fields(cls, d: dict) -> TranscriptEntry:
        return cls(
            text=_s(_get(d, "text")), final=_s(_get(d, "final")) == "1",
            start_sample=_i(_get(d, "start")), end_sample=_i(_get(d, "end")),
            mic_seq=_i(_get(d, "mic_seq")), ts=_f(_get(d, "ts")),
            end_of_speech_ts=_f(_get(d, "eos_ts")),
        )


@dataclass
class ReplyEntry:
    """One speakable fragment of the reply (= one segment), or the end marker with the full text."""

    segment: int
    text: str
    end: bool = False
    ts: float = field(default_factory=now_ms)
    backend: str = ""  # on the end marker: the LLM backend that answered ("" on fragments)

    def to_fields(self) -> dict[str, str]:
        fields = {"segment": str(self.segment), "text": self.text,
                  "end": "1" if self.end else "0", "ts": str(self.ts)}
        if self.backend:
            fields["backend"] = self.backend
        return fields

    @classmethod
    def from_fields(cls, d: dict) -> ReplyEntry:
        return cls(segment=_i(_get(d, "segment")), text=_s(_get(d, "text")),
                   end=_s(_get(d, "end")) == "1", ts=_f(_get(d, "ts")),
                   backend=_s(_get(d, "backend") or ""))


@dataclass
class Mark:
    """A timing mark from TTS: a phoneme or word starting at ``sample`` of the reply audio."""

    kind: str  # "phoneme" | "word"
    sample: int
    value: str  # phoneme: espeak mnemonic; word: "start:end" character offsets in the segment

    def to_list(self) -> list:
        return [self.kind, self.sample, self.value]


@dataclass
class VoiceEntry:
    """Reply audio: mono int16 at ``rate``; ``sample`` = position of pcm[0] in the turn's reply."""

    segment: int
    sample: int
    rate: int
    pcm: bytes = b""
    last_in_segment: bool = False
    end: bool = False  # end marker of the turn: pcm empty, ``sample`` = total samples
    marks: list[Mark] = field(default_factory=list)
    ts: float = field(default_factory=now_ms)

    def to_fields(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "segment": str(self.segment), "sample": str(self.sample), "rate": str(self.rate),
            "pcm": self.pcm, "flags": str(int(self.last_in_segment) | (int(self.end) << 1)),
            "ts": str(self.ts),
        }
        if self.marks:
            d["marks"] = json.dumps([m.to_list() for m in self.marks], separators=(",", ":"))
        return d

    @staticmethod
    def ends(d: dict) -> bool:
        """Whether the entry ``d`` is the turn's end marker, from its flags alone."""
        return bool(_i(_get(d, "flags")) & 2)

    @classmethod
    def from_fields(cls, d: dict) -> VoiceEntry:
        flags = _i(_get(d, "flags"))
        raw_marks = _get(d, "marks")
        marks = [Mark(*m) for m in json.loads(_s(raw_marks))] if raw_marks else []
        return cls(
            segment=_i(_get(d, "segment")), sample=_i(_get(d, "sample")), rate=_i(_get(d, "rate")),
            pcm=_get(d, "pcm") or b"", last_in_segment=bool(flags & 1), end=bool(flags & 2),
            marks=marks, ts=_f(_get(d, "ts")),
        )

    @property
    def num_samples(self) -> int:
        return len(self.pcm) // 2


@dataclass
class FaceEntry:
    """Face frames of one segment. ``samples`` pins each row of ``values`` to the reply audio."""

    segment: int
    samples: np.ndarray  # int64 (n,)
    values: np.ndarray  # float32 (n, 61)
    first_index: int = 0  # frame number of the first row within the turn
    end: bool = False  # end marker: no frames, ``first_index`` = total frames
    ts: float = field(default_factory=now_ms)

    def to_fields(self) -> dict[str, Any]:
        return {
            "segment": str(self.segment), "index": str(self.first_index),
            "samples": np.ascontiguousarray(self.samples, dtype="<i8").tobytes(),
            "values": np.ascontiguousarray(self.values, dtype="<f4").tobytes(),
            "end": "1" if self.end else "0", "ts": str(self.ts),
        }

    @classmethod
    def from_fields(cls, d: dict) -> FaceEntry:
        samples = np.frombuffer(_get(d, "samples") or b"", dtype="<i8")
        values = np.frombuffer(_get(d, "values") or b"", dtype="<f4").reshape(-1, NUM_FACE_VALUES)
        return cls(
            segment=_i(_get(d, "segment")), samples=samples, values=values,
            first_index=_i(_get(d, "index")), end=_s(_get(d, "end")) == "1",
            ts=_f(_get(d, "ts")),
        )


@dataclass
class EventEntry:
    """Turn-level control events: errors, and later interruptions and latency marks."""

    kind: str  # "error" | "speech_start" | "interrupt" | "playing" (UE's ready: code=segment)
    turn: int
    code: str = ""
    message: str = ""
    ts: float = field(default_factory=now_ms)

    def to_fields(self) -> dict[str, str]:
        return {"kind": self.kind, "turn": str(self.turn), "code": self.code,
                "message": self.message, "ts": str(self.ts)}

    @classmethod
    def from_fields(cls, d: dict) -> EventEntry:
        return cls(kind=_s(_get(d, "kind")), turn=_i(_get(d, "turn")), code=_s(_get(d, "code")),
                   message=_s(_get(d, "message")), ts=_f(_get(d, "ts")))


# --------------------------------------------------------------------------- control


CONTROL_KINDS = ("open", "resume", "ready", "interrupt", "close", "detach")


@dataclass
class ControlEntry:
    """A client control message as the gateway took it, stamped on arrival (stream ``control``,
    auto IDs: time-ordered, so MINID trims it by time). Together with the mic stream (audio
    ``<seq>-0`` and end_of_utterance ``<seq>-1``, each with its arrival ``ts``) it is what the
    client did, so a session can be played again as it happened (parley/replay.py). No
    credential is ever stored: not hello's token, not resume's secret.
    """

    kind: str  # one of CONTROL_KINDS
    ts: float = field(default_factory=now_ms)
    turn: int = 0  # ready: its turn; interrupt: the turn it cut (0: none)
    segment: int = 0  # ready: its segment
    played: int = -1  # interrupt: played_samples as UE sent it (-1: not given)
    code: str = ""  # interrupt: the verdict ("client", "answer" to a stop, "too_late")
    data: dict[str, Any] = field(default_factory=dict)  # open/resume: the request's fields

    def to_fields(self) -> dict[str, str]:
        fields = {"kind": self.kind, "ts": str(self.ts)}
        if self.kind == "ready":
            fields |= {"turn": str(self.turn), "segment": str(self.segment)}
        elif self.kind == "interrupt":
            fields |= {"turn": str(self.turn), "played": str(self.played), "code": self.code}
        if self.data:
            fields["data"] = json.dumps(self.data, separators=(",", ":"), sort_keys=True)
        return fields

    @classmethod
    def from_fields(cls, d: dict) -> ControlEntry:
        raw = _get(d, "data")
        return cls(kind=_s(_get(d, "kind")), ts=_f(_get(d, "ts")), turn=_i(_get(d, "turn")),
                   segment=_i(_get(d, "segment")), played=_i(_get(d, "played"), -1),
                   code=_s(_get(d, "code") or ""), data=json.loads(_s(raw)) if raw else {})
