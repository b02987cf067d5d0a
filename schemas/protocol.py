"""The Unreal-facing WebSocket protocol: typed messages and their codecs.

Pure code (no sockets): ``decode_text``/``decode_binary`` turn a WebSocket message into a typed
message or raise :class:`ProtocolError` with a stable ``code``; ``encode`` goes the other way.
Control messages are JSON text frames; audio and face frames are binary, little-endian (every
platform Unreal ships on is little-endian, so a client can memcpy the header).

Every field's rules (required, range, enum, pattern, length) live in its dataclass field's
metadata (:func:`spec`): the decoder enforces them and schemas/jsonschema.py publishes them, so
code, JSON Schemas and docs/protocol.md (the normative text, checked by a test) cannot drift.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

import numpy as np

from schemas.arkit import NUM_FACE_VALUES

PROTOCOL_VERSION = 2
SAMPLE_FORMATS = ("s16le", "f32le")
ENDPOINTS = ("vad", "client")
BYTES_PER_SAMPLE = {"s16le": 2, "f32le": 4}
MAX_INPUT_RATE = 192_000
MAX_CHANNELS = 8
MAX_ID_LENGTH = 64
ID_PATTERN = f"^[A-Za-z0-9_.-]{{1,{MAX_ID_LENGTH}}}$"
U16 = 0xFFFF
U32 = 0xFFFFFFFF
# Largest integer every JSON parser holds exactly (IEEE double): positions may grow past u32.
MAX_SAFE_INT = 2**53 - 1
# Deepest JSON nesting accepted in a text frame; the protocol's own messages need 2.
MAX_JSON_DEPTH = 16
MAX_SECRET_LENGTH = 256
MAX_CLIENT_NAME = 128


def spec(default: Any = MISSING, *, required: bool = False,
         minimum: int | None = None, maximum: int | None = None,
         enum: tuple[str, ...] | None = None, pattern: str | None = None,
         max_length: int | None = None, values_minimum: int | None = None,
         values_maximum: int | None = None, keys: tuple[str, ...] | None = None,
         code: str | None = None) -> Any:
    """A message field with its wire rules; ``required`` fields have no default on the wire."""
    meta = {k: v for k, v in dict(
        required=required, minimum=minimum, maximum=maximum, enum=enum, pattern=pattern,
        max_length=max_length, values_minimum=values_minimum, values_maximum=values_maximum,
        keys=keys, code=code).items() if v is not None and v is not False}
    return field(default=default, metadata=meta)


def _id(**kw) -> Any:
    return spec("", required=True, pattern=ID_PATTERN, max_length=MAX_ID_LENGTH, **kw)


def _u32(default: Any = 0, **kw) -> Any:
    return spec(default, minimum=0, maximum=U32, **kw)


def clip(value: Any, limit: int = 40) -> str:
    """A client value quoted in an error, cut short: an error never echoes kilobytes back."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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
    NPC_NOT_ALLOWED = "npc_not_allowed"
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


ERROR_CODES = tuple(sorted(v for k, v in vars(ErrorCode).items() if k.isupper()))


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
    protocol: int = spec(PROTOCOL_VERSION, required=True, minimum=1, maximum=255)
    client: str = spec("", max_length=MAX_CLIENT_NAME)
    token_name: str | None = spec(None, pattern=ID_PATTERN, max_length=MAX_ID_LENGTH)
    token: str | None = spec(None, max_length=MAX_SECRET_LENGTH)


@dataclass
class OpenSession(Message):
    TYPE: ClassVar[str] = "open"
    session: str = _id()
    npc: str = _id()
    sample_rate: int = spec(16000, minimum=1, maximum=MAX_INPUT_RATE, code="bad_sample_rate")
    channels: int = spec(1, minimum=1, maximum=MAX_CHANNELS, code="bad_channels")
    format: str = spec("s16le", enum=SAMPLE_FORMATS, code="unsupported_format")
    persona: str | None = spec(None, pattern=ID_PATTERN, max_length=MAX_ID_LENGTH)
    # who speaks in this session: this connection's sessions of the same player share what the
    # recognizer learned about their voice, so a first question to another NPC starts adapted
    player: str | None = spec(None, pattern=ID_PATTERN, max_length=MAX_ID_LENGTH)
    # "vad": the server's VAD ends an utterance after a silence; "client": only
    # end_of_utterance does (push-to-talk, or a recorded question sent as one turn)
    endpoint: str = spec("vad", enum=ENDPOINTS)


@dataclass
class CloseSession(Message):
    TYPE: ClassVar[str] = "close"
    session: str = _id()


@dataclass
class EndOfUtterance(Message):
    TYPE: ClassVar[str] = "end_of_utterance"
    session: str = _id()


@dataclass
class Ready(Message):
    TYPE: ClassVar[str] = "ready"
    session: str = _id()
    turn: int = _u32(required=True)
    segment: int = _u32(required=True)


@dataclass
class Interrupt(Message):
    TYPE: ClassVar[str] = "interrupt"
    session: str = _id()
    # reply-audio samples of the current turn UE had played when it stopped
    played_samples: int | None = spec(None, minimum=0, maximum=MAX_SAFE_INT)


@dataclass
class Resume(Message):
    """After a reconnect: re-attach ``sid`` (proving ownership with ``resume_secret``) and
    replay what was missed after ``last`` in ``turn``, and every later turn."""

    TYPE: ClassVar[str] = "resume"
    session: str = _id()
    sid: str = _id()
    resume_secret: str = spec("", required=True, max_length=MAX_SECRET_LENGTH)
    turn: int = _u32()
    last: dict[str, int] = field(default_factory=dict, metadata={
        "keys": ("transcript", "reply", "audio", "face"), "values_minimum": 0,
        "values_maximum": U32})
    mic_seq: int | None = _u32(None)


@dataclass
class Ping(Message):
    TYPE: ClassVar[str] = "ping"
    id: int | None = _u32(None)


# server -> client


@dataclass
class Welcome(Message):
    TYPE: ClassVar[str] = "welcome"
    protocol: int = PROTOCOL_VERSION
    server: str = "parley"
    max_frame_bytes: int = 0
    max_sessions: int = 0
    npcs: list[str] = field(default_factory=list)  # the NPCs this connection may open
    token_name: str | None = None  # the token the connection authenticated with


@dataclass
class SessionOpened(Message):
    TYPE: ClassVar[str] = "opened"
    session: str = ""
    channel: int = spec(0, minimum=1, maximum=U16)  # the u16 binary frames of it carry
    sid: str = ""  # the stored session id: for resume, replay, export and status
    npc: str = ""
    persona: str = ""
    voice: str = ""
    reply_sample_rate: int = 0
    next_mic_seq: int = _u32(1)  # first mic chunk sequence number the gateway expects
    resumed: bool = False
    # only when answering open: the credential resume needs; the server keeps only its hash
    resume_secret: str | None = None


@dataclass
class SessionClosed(Message):
    TYPE: ClassVar[str] = "closed"
    session: str = ""


@dataclass
class TakenOver(Message):
    """The session was resumed on another connection: this one no longer gets its output."""

    TYPE: ClassVar[str] = "taken_over"
    session: str = ""


@dataclass
class Transcript(Message):
    TYPE: ClassVar[str] = "transcript"
    session: str = ""
    turn: int = _u32()
    seq: int = _u32()
    text: str = ""
    final: bool = False
    start_sample: int | None = spec(None, minimum=0, maximum=MAX_SAFE_INT)  # 16 kHz samples
    end_sample: int | None = spec(None, minimum=0, maximum=MAX_SAFE_INT)


@dataclass
class ReplyText(Message):
    TYPE: ClassVar[str] = "reply"
    session: str = ""
    turn: int = _u32()
    seq: int = _u32()
    segment: int = _u32()
    text: str = ""
    final: bool = False


@dataclass
class TurnDone(Message):
    TYPE: ClassVar[str] = "turn_done"
    session: str = ""
    turn: int = _u32()
    audio_samples: int = spec(0, minimum=0, maximum=MAX_SAFE_INT)
    face_frames: int = _u32()
    segments: int = _u32()
    interrupted: bool = False
    # Wall-clock ms (Unix epoch) of each step of the turn; keys in docs/protocol.md
    timings: dict[str, float] | None = None
    # end_of_utterance came after audio with no speech in it (or none the recognizer could
    # make out): nothing to answer, and the client need not wait
    no_speech: bool = False


@dataclass
class StopPlayback(Message):
    """The player barged in: stop playing ``turn`` now and answer ``interrupt`` with the
    number of reply samples that were played."""

    TYPE: ClassVar[str] = "stop"
    session: str = ""
    turn: int = _u32()


@dataclass
class ErrorEvent(Message):
    TYPE: ClassVar[str] = "error"
    code: str = spec(ErrorCode.INTERNAL, enum=ERROR_CODES)
    message: str = ""
    session: str | None = None
    turn: int | None = _u32(None)
    suppressed: int | None = _u32(None)  # like errors left unsent since the last one


@dataclass
class Pong(Message):
    TYPE: ClassVar[str] = "pong"
    id: int | None = _u32(None)


CLIENT_MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m
    for m in (Hello, OpenSession, CloseSession, EndOfUtterance, Ready, Interrupt, Resume, Ping)
}
SERVER_MESSAGES: dict[str, type[Message]] = {
    m.TYPE: m
    for m in (Welcome, SessionOpened, SessionClosed, TakenOver, Transcript, ReplyText, TurnDone,
              ErrorEvent, Pong, StopPlayback)
}

_FIELD_TYPES = {"int": int, "str": str, "bool": bool, "dict[str, int]": dict,
                "dict[str, float]": dict, "list[str]": list}


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
    if want is list and not all(isinstance(v, str) for v in value):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"field {name!r} must be a list of strings")
    return value


def _check_rules(kind: str, name: str, meta: Any, value: Any) -> None:
    """The field's metadata rules (range, enum, pattern, length, map keys)."""
    code = meta.get("code", ErrorCode.BAD_MESSAGE)
    if value is None:
        return
    if isinstance(value, int) and not isinstance(value, bool):
        lo, hi = meta.get("minimum"), meta.get("maximum")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise ProtocolError(code, f"{kind}: {name!r} must be {lo}..{hi}, got {clip(value)}")
    if isinstance(value, str):
        if len(value) > meta.get("max_length", len(value)):
            raise ProtocolError(code, f"{kind}: {name!r} is longer than "
                                      f"{meta['max_length']} characters")
        if "enum" in meta and value not in meta["enum"]:
            raise ProtocolError(code, f"{kind}: {name!r} must be one of "
                                      f"{', '.join(meta['enum'])}; got {clip(value)}")
        if "pattern" in meta and not _valid_id(value):
            raise ProtocolError(code, f"{kind}: {name!r} must be 1..{MAX_ID_LENGTH} characters "
                                      f"of [A-Za-z0-9_.-]; got {clip(value)}")
    if isinstance(value, dict):
        bad = set(value) - set(meta.get("keys", value))
        if bad:
            raise ProtocolError(code, f"{kind}: {name!r} has unknown key(s) "
                                      f"{clip(sorted(bad))}; allowed: {', '.join(meta['keys'])}")
        lo, hi = meta.get("values_minimum"), meta.get("values_maximum")
        for k, v in value.items():
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise ProtocolError(code, f"{kind}: {name}[{k!r}] must be {lo}..{hi}, "
                                          f"got {clip(v)}")


def _from_dict(cls: type[Message], data: dict[str, Any], strict: bool = True) -> Message:
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known) - {"type"}
    if unknown and not strict:
        data = {k: v for k, v in data.items() if k not in unknown}
    elif unknown:
        raise ProtocolError(ErrorCode.BAD_MESSAGE,
                            f"{cls.TYPE}: unknown field(s) {clip(sorted(unknown), 80)}")
    kwargs = {}
    for name, f in known.items():
        if name not in data:
            if strict and f.metadata.get("required"):
                raise ProtocolError(ErrorCode.BAD_MESSAGE,
                                    f"{cls.TYPE}: missing required field {name!r}",
                                    session=_session_of(data))
            continue
        value = _check_type(name, str(f.type), data[name])
        if strict:
            try:
                _check_rules(cls.TYPE, name, f.metadata, value)
            except ProtocolError as exc:
                if name != "session":
                    exc.session = _session_of(data)
                raise
        kwargs[name] = value
    return cls(**kwargs)


def _session_of(data: dict[str, Any]) -> str | None:
    s = data.get("session")
    return s if isinstance(s, str) and _valid_id(s) else None


_ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def _valid_id(value: str) -> bool:
    return 0 < len(value) <= MAX_ID_LENGTH and all(c in _ID_CHARS for c in value)


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def json_depth_exceeds(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Does ``text`` nest arrays/objects deeper than ``limit``? Checked before parsing, so a
    hostile frame never reaches the recursive parser (1000 levels would raise RecursionError).
    Strings are cut out first (their brackets do not nest); the rest is a running sum in C."""
    if text.count("[") + text.count("{") <= limit:
        return False
    rest = np.frombuffer(_JSON_STRING.sub("", text).encode(), np.uint8)
    return bool(rest.size) and int(np.cumsum(_OPEN[rest], dtype=np.int32).max()) > limit


def _json_int(digits: str) -> int:
    # Valid JSON, but Python refuses to convert over 4300 digits (a ValueError, read as bad
    # JSON); no field takes more than 20 digits, so a longer integer is only out of range
    if len(digits) > 32:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, f"an integer of {len(digits)} digits is "
                                                   "out of range")
    return int(digits)


def _not_json(name: str) -> Any:
    # json.loads takes NaN and Infinity, which JSON does not have (RFC 8259)
    raise ProtocolError(ErrorCode.BAD_JSON, f"malformed JSON: {name} is not a JSON value")


def decode_text(text: str | bytes, registry: dict[str, type[Message]] = CLIENT_MESSAGES,
                strict: bool = True) -> Message:
    """Parse one JSON text frame into its typed message.

    ``strict=False`` drops unknown fields and skips the value rules instead of refusing them: a
    client reading a newer server's messages should not break on a field it does not know.
    """
    if isinstance(text, bytes):
        try:
            text = text.decode()
        except UnicodeDecodeError:
            raise ProtocolError(ErrorCode.BAD_JSON, "a text frame must be UTF-8") from None
    if json_depth_exceeds(text):
        raise ProtocolError(ErrorCode.BAD_MESSAGE,
                            f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(text, parse_int=_json_int, parse_constant=_not_json)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"malformed JSON: {clip(str(exc), 120)}") from None
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a message must be a JSON object")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "a message needs a string 'type'")
    cls = registry.get(kind)
    if cls is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"unknown message type {clip(kind)}; expected one of {', '.join(sorted(registry))}",
        )
    return _from_dict(cls, data, strict)


def encode(msg: Message) -> str:
    return json.dumps(msg.to_dict(), separators=(",", ":"))


def validate(msg: Message) -> None:
    """Checks a message built in code against the same rules the decoder applies."""
    for f in fields(msg):
        try:
            _check_rules(msg.TYPE, f.name, f.metadata, getattr(msg, f.name))
        except ProtocolError as exc:
            exc.session = getattr(msg, "session", None)
            raise


validate_open = validate


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
