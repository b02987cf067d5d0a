"""The Unreal-facing WebSocket protocol: typed messages and their codecs.

Pure code (no sockets): ``decode_text``/``decode_binary`` turn a WebSocket message into a typed
message or raise :class:`ProtocolError` with a stable ``code``; ``encode`` goes the other way.
Control messages are JSON text frames; audio and face frames are binary, little-endian (every
platform Unreal ships on is little-endian, so a client can memcpy the header).

See docs/protocol.md for message order and examples.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from schemas.arkit import NUM_FACE_VALUES

PROTOCOL_VERSION = 1
SAMPLE_FORMATS = ("s16le", "f32le")
BYTES_PER_SAMPLE = {"s16le": 2, "f32le": 4}
MAX_INPUT_RATE = 192_000
MAX_CHANNELS = 8
MAX_ID_LENGTH = 64


class ErrorCode:
    """Stable error codes sent in ``error`` events; clients switch on these, not on messages."""

    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    NOT_AUTHENTICATED = "not_authenticated"
    AUTH_FAILED = "auth_failed"
    UNSUPPORTED_PROTOCOL = "unsupported_protocol"
    SESSION_NOT_OPEN = "session_not_open"
    SESSION_EXISTS = "session_exists"
    TOO_MANY_SESSIONS = "too_many_sessions"
    UNKNOWN_NPC = "unknown_npc"
    UNSUPPORTED_FORMAT = "unsupported_format"
    BAD_SAMPLE_RATE = "bad_sample_rate"
    BAD_CHANNELS = "bad_channels"
    BAD_AUDIO = "bad_audio"
    FRAME_TOO_LARGE = "frame_too_large"
    RATE_LIMITED = "rate_limited"
    UNKNOWN_SEGMENT = "unknown_segment"
    NOT_PLAYING = "not_playing"
    TURN_FAILED = "turn_failed"
    INTERNAL = "internal"
    UNAVAILABLE = "unavailable"
    OVERLOADED = "overloaded"  # open refused: the fleet is at capacity (admission control)


class ProtocolError(Exception):
    """An inbound message the gateway refuses. ``session`` is set when it can be attributed."""

    def __init__(self, code: str, message: str, *, session: str | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.session = session


# --------------------------------------------------------------------------- JSON messages


@dataclass
class Message:
    """Base of every JSON control message; ``type`` names it on the wire."""

    TYPE: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        d = {"type": self.TYPE}
        d.update({k: v for k, v in asdict(self).items() if v is not None})
        return d


# client -> server


@dataclass
class Hello(Message):
    TYPE: ClassVar[str] = "hello"
    protocol: int = PROTOCOL_VERSION
    client: str = ""
    token: str | None = None


@dataclass
class OpenSession(Message):
    TYPE: ClassVar[str] = "open"
    session: str = ""
    npc: str = ""
    sample_rate: int = 16000
    channels: int = 1
    format: str = "s16le"
    persona: str | None = None  # defaults to the npc id
    # "vad": the server's VAD ends an utterance after a silence (default); "client": only
    # end_of_utterance does (push-to-talk, or a recorded question sent as one turn)
    endpoint: str | None = None


@dataclass
class CloseSession(Message):
    TYPE: ClassVar[str] = "close"
    session: str = ""


@dataclass
class EndOfUtterance(Message):
    TYPE: ClassVar[str] = "end_of_utterance"
    session: str = ""


@dataclass
class Ready(Message):
    TYPE: ClassVar[str] = "ready"
    session: str = ""
    turn: int = 0
    segment: int = 0


@dataclass
class Interrupt(Message):
    TYPE: ClassVar[str] = "interrupt"
    session: str = ""
    played_samples: int | None = None  # reply-audio samples UE had played when it stopped


@dataclass
class Resume(Message):
    """After a reconnect: re-open ``session`` and replay what was missed after ``last``.

    ``last`` maps a channel (transcript, reply, audio, face) to the last sequence number seen in
    ``turn``; everything after it, and every later turn, is sent again.
    """

    TYPE: ClassVar[str] = "resume"
    session: str = ""
    sid: str = ""
    turn: int = 0
    last: dict[str, int] = field(default_factory=dict)
    mic_seq: int | None = None


@dataclass
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    id: int | None = None


# server -> client


@dataclass
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    protocol: int = PROTOCOL_VERSION
    server: str = "parley"
    max_frame_bytes: int = 0
    max_sessions: int = 0


@dataclass
class SessionOpened(Message):
    TYPE: ClassVar[str] = "opened"
    session: str = ""
    channel: int = 0  # the u16 that binary frames of this session carry
    sid: str = ""  # the stored session id: for resume, replay, export and status
    npc: str = ""
    persona: str = ""
    voice: str = ""
    reply_sample_rate: int = 0
    next_mic_seq: int = 1  # first mic chunk sequence number the gateway expects
    resumed: bool = False


@dataclass
class SessionClosed(Message):
    TYPE: ClassVar[str] = "closed"
    session: str = ""


@dataclass
class Transcript(Message):
    TYPE: ClassVar[str] = "transcript"
    session: str = ""
    turn: int = 0
    seq: int = 0
    text: str = ""
    final: bool = False
    start_sample: int | None = None  # utterance bounds, 16 kHz samples since session open
    end_sample: int | None = None


@dataclass
class ReplyText(Message):
    TYPE: ClassVar[str] = "reply"
    session: str = ""
    turn: int = 0
    seq: int = 0
    segment: int = 0
    text: str = ""
    final: bool = False


@dataclass
class TurnDone(Message):
    TYPE: ClassVar[str] = "turn_done"
    session: str = ""
    turn: int = 0
    audio_samples: int = 0
    face_frames: int = 0
    segments: int = 0
    interrupted: bool = False
    # Wall-clock ms (epoch) of each step of the turn: eos, final_transcript, first_token,
    # first_fragment, tts_first_chunk, first_face, gw_first_audio, ready, gw_first_face, ...
    timings: dict[str, float] | None = None


@dataclass
class StopPlayback(Message):
    """The player barged in: stop playing ``turn`` now and answer ``interrupt`` with the
    number of reply samples that were played."""

    TYPE: ClassVar[str] = "stop"
    session: str = ""
    turn: int = 0


@dataclass
class ErrorEvent(Message):
    TYPE: ClassVar[str] = "error"
    code: str = ErrorCode.INTERNAL
    message: str = ""
    session: str | None = None
    turn: int | None = None


@dataclass
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    id: int | None = None


CLIENT_MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m
    for m in (Hello, OpenSession, CloseSession, EndOfUtterance, Ready, Interrupt, Resume, Ping)
}
SERVER_MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m
    for m in (Welcome, SessionOpened, SessionClosed, Transcript, ReplyText, TurnDone, ErrorEvent,
              Pong, StopPlayback)
}

_FIELD_TYPES = {"int": int, "str": str, "bool": bool, "dict[str, int]": dict,
                "dict[str, float]": dict}


def _check_type(name: str, annotation: str, value: Any) -> Any:
    optional = annotation.endswith("| None")
    base = annotation.replace("| None", "").strip()
    if value is None:
        if optional:
            return None
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {name!r} must not be null")
    want = _FIELD_TYPES.get(base)
    # bool is an int in Python; refuse it where an int is meant so `true` is not a sample rate
    if want is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {name!r} must be an integer")
    if want is not None and not isinstance(value, want):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {name!r} must be {base}")
    number = (int, float) if "float" in base else int
    if want is dict and not all(
        isinstance(k, str) and isinstance(v, number) and not isinstance(v, bool)
        for k, v in value.items()
    ):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {name!r} must map names to numbers")
    return value


def _from_dict(cls: type[Message], data: dict[str, Any], strict: bool = True) -> Message:
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known) - {"type"}
    if unknown and not strict:
        data = {k: v for k, v in data.items() if k not in unknown}
    elif unknown:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"{cls.TYPE}: unknown field(s) {', '.join(sorted(unknown))}"
        )
    kwargs = {}
    for name, f in known.items():
        if name in data:
            kwargs[name] = _check_type(name, str(f.type), data[name])
    msg = cls(**kwargs)
    session = getattr(msg, "session", None)
    if session is not None and cls.TYPE not in ("hello", "ping") and not _valid_id(session):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"{cls.TYPE}: 'session' must be 1..{MAX_ID_LENGTH} characters of [A-Za-z0-9_.-]",
        )
    return msg


_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def _valid_id(value: str) -> bool:
    return 0 < len(value) <= MAX_ID_LENGTH and all(c in _ID_CHARS for c in value)


def decode_text(text: str | bytes, registry: dict[str, type[Message]] = CLIENT_MESSAGES,
                strict: bool = True) -> Message:
    """Parse one JSON text frame into its typed message.

    ``strict=False`` drops unknown fields instead of refusing them: a client reading a newer
    server's messages should not break on a field it does not know.
    """
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"malformed JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a message must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a message needs a string 'type'")
    cls = registry.get(kind)
    if cls is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown message type {kind!r}; expected one of {', '.join(sorted(registry))}",
        )
    return _from_dict(cls, data, strict)


def encode(msg: Message) -> str:
    return json.dumps(msg.to_dict(), separators=(",", ":"))


def validate_open(msg: OpenSession) -> None:
    """Checks the audio format of an ``open``; raises ProtocolError naming the bad field."""
    if not _valid_id(msg.npc):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "open: 'npc' must be a non-empty id",
                            session=msg.session)
    if msg.format not in SAMPLE_FORMATS:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_FORMAT,
            f"sample format {msg.format!r} is not supported; "
            f"use one of {', '.join(SAMPLE_FORMATS)}",
            session=msg.session,
        )
    if not 0 < msg.sample_rate <= MAX_INPUT_RATE:
        raise ProtocolError(
            ErrorCode.BAD_SAMPLE_RATE,
            f"sample_rate must be 1..{MAX_INPUT_RATE} Hz, got {msg.sample_rate}",
            session=msg.session,
        )
    if msg.endpoint not in (None, "vad", "client"):
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE,
            f"endpoint must be 'vad' or 'client', got {msg.endpoint!r}", session=msg.session)
    if not 1 <= msg.channels <= MAX_CHANNELS:
        raise ProtocolError(
            ErrorCode.BAD_CHANNELS,
            f"channels must be 1..{MAX_CHANNELS}, got {msg.channels}",
            session=msg.session,
        )


# --------------------------------------------------------------------------- binary frames
#
# Every binary frame starts with: u8 kind, u8 flags, u16 channel. All integers little-endian.


class FrameKind:
    MIC_AUDIO = 1
    REPLY_AUDIO = 2
    FACE_FRAMES = 3


FLAG_LAST_IN_SEGMENT = 0x01  # reply audio: last chunk of its segment
FLAG_LAST_IN_TURN = 0x02  # reply audio / face: last chunk of the turn

_COMMON = struct.Struct("<BBH")
MIC_HEADER = struct.Struct("<BBHI")  # kind, flags, channel, seq
REPLY_AUDIO_HEADER = struct.Struct("<BBHIIIIQ")  # + turn, seq, segment, sample_rate, sample
FACE_HEADER = struct.Struct("<BBHIIIHH")  # + turn, seq, segment, frame_count, value_count
FACE_FRAME = struct.Struct("<Q" + "f" * NUM_FACE_VALUES)  # sample, 61 values


@dataclass
class MicAudio:
    """Player audio: ``pcm`` in the session's negotiated format, interleaved channels."""

    channel: int
    seq: int
    pcm: bytes
    flags: int = 0

    def encode(self) -> bytes:
        return MIC_HEADER.pack(FrameKind.MIC_AUDIO, self.flags, self.channel, self.seq) + self.pcm


@dataclass
class ReplyAudio:
    """NPC voice: mono s16le at ``sample_rate``; ``sample`` = offset of pcm[0] in the reply."""

    channel: int
    turn: int
    seq: int
    segment: int
    sample_rate: int
    sample: int
    pcm: bytes
    flags: int = 0

    def encode(self) -> bytes:
        head = REPLY_AUDIO_HEADER.pack(
            FrameKind.REPLY_AUDIO, self.flags, self.channel, self.turn, self.seq, self.segment,
            self.sample_rate, self.sample,
        )
        return head + self.pcm


@dataclass
class FaceFrames:
    """Face frames of one reply segment; ``samples[i]`` pins ``values[i]`` to the reply audio."""

    channel: int
    turn: int
    seq: int
    segment: int
    samples: np.ndarray  # uint64 (n,)
    values: np.ndarray  # float32 (n, 61)
    flags: int = 0

    def encode(self) -> bytes:
        n = len(self.samples)
        head = FACE_HEADER.pack(
            FrameKind.FACE_FRAMES, self.flags, self.channel, self.turn, self.seq, self.segment,
            n, NUM_FACE_VALUES,
        )
        rec = np.empty(n, dtype=FACE_RECORD_DTYPE)
        rec["sample"] = self.samples
        rec["values"] = self.values
        return head + rec.tobytes()


FACE_RECORD_DTYPE = np.dtype([("sample", "<u8"), ("values", "<f4", (NUM_FACE_VALUES,))])
assert FACE_RECORD_DTYPE.itemsize == FACE_FRAME.size


def decode_binary(data: bytes) -> MicAudio | ReplyAudio | FaceFrames:
    try:
        return _decode_binary(data)
    except (struct.error, ValueError) as exc:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"malformed binary frame: {exc}") from None


def _decode_binary(data: bytes) -> MicAudio | ReplyAudio | FaceFrames:
    if len(data) < _COMMON.size:
        raise ProtocolError(ErrorCode.BAD_AUDIO, "binary frame shorter than its 4-byte header")
    kind, flags, channel = _COMMON.unpack_from(data)
    if kind == FrameKind.MIC_AUDIO:
        if len(data) < MIC_HEADER.size:
            raise ProtocolError(ErrorCode.BAD_AUDIO, "mic audio frame shorter than its header")
        _, _, _, seq = MIC_HEADER.unpack_from(data)
        return MicAudio(channel=channel, seq=seq, pcm=bytes(data[MIC_HEADER.size:]), flags=flags)
    if kind == FrameKind.REPLY_AUDIO:
        _, _, _, turn, seq, segment, rate, sample = REPLY_AUDIO_HEADER.unpack_from(data)
        if (len(data) - REPLY_AUDIO_HEADER.size) % 2:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "reply audio with an odd number of bytes")
        return ReplyAudio(channel, turn, seq, segment, rate, sample,
                          bytes(data[REPLY_AUDIO_HEADER.size:]), flags)
    if kind == FrameKind.FACE_FRAMES:
        _, _, _, turn, seq, segment, n, nvals = FACE_HEADER.unpack_from(data)
        if nvals != NUM_FACE_VALUES:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"face frame with {nvals} values")
        if len(data) != FACE_HEADER.size + n * FACE_FRAME.size:
            raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                f"face frame of {len(data)} bytes; {n} records make "
                                f"{FACE_HEADER.size + n * FACE_FRAME.size}")
        rec = np.frombuffer(data, dtype=FACE_RECORD_DTYPE, count=n, offset=FACE_HEADER.size)
        return FaceFrames(channel, turn, seq, segment, rec["sample"].copy(), rec["values"].copy(),
                          flags)
    raise ProtocolError(ErrorCode.BAD_MESSAGE, f"unknown binary frame kind {kind}")
