"""JSON Schemas (draft 2020-12) of the Unreal-facing protocol, derived from schemas/protocol.py.

Every JSON control message in ``CLIENT_MESSAGES`` and ``SERVER_MESSAGES`` gets one schema, built
from its dataclass: field names, types (``int``, ``str``, ``bool``, ``dict[str, int]``,
``list[str]``), defaults, the ``type`` constant, and the rules in each field's metadata
(``protocol.spec``: required, ranges, enums, patterns, lengths, map keys), which are the rules
the decoder enforces. The binary frame layouts are described for documentation in
``binary-frames.json`` (and under ``x-binary-frames`` in ``protocol.json``), with offsets computed
from the ``struct`` formats the codec packs with.

Client schemas are strict (``additionalProperties: false``); a field is required when its
metadata says so, and the others take their ``default`` when left out (``X | None`` fields may
also be null). Server schemas require every field the server always sends; its optional fields
are left out when unset, never null. They allow extra properties, so a client built against them
keeps working when a later version adds a field.

Run ``python -m schemas.jsonschema`` to rewrite schemas/json/; a unit test keeps the committed
files equal to :func:`build_all`.
"""

from __future__ import annotations

import json
import struct
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from schemas import protocol as P
from schemas.arkit import FACE_VALUE_NAMES, NUM_BLENDSHAPES, NUM_FACE_VALUES

DRAFT = "https://json-schema.org/draft/2020-12/schema"
ID_PREFIX = f"urn:parley:protocol:{P.PROTOCOL_VERSION}:"
OUT_DIR = Path(__file__).resolve().parent / "json"
ID_PATTERN = P.ID_PATTERN

# --------------------------------------------------------------------------- descriptions

MESSAGE_DOCS: dict[str, str] = {
    # client -> server
    "hello": "First message on a connection: protocol version, client name, token name and "
             "secret.",
    "open": "Opens an NPC session on this connection and negotiates the mic audio format.",
    "close": "Closes a session for good; its stored data expires and it cannot be resumed.",
    "end_of_utterance": "The player stopped talking (push-to-talk released): ends the "
                        "utterance after the last mic chunk sent, without waiting for the VAD.",
    "ready": "UE is about to play this reply segment: the gateway may now send its face frames.",
    "interrupt": "UE stopped the NPC (its own decision, or the answer to `stop`): the turn is "
                 "cancelled and the history keeps only the words heard up to played_samples. "
                 "Answered with `not_playing` when no reply plays any more.",
    "resume": "After a reconnect: re-attaches a stored session (by sid, proven by its "
              "resume_secret), takes it from any other connection, and replays what the client "
              "missed after `last` in `turn`, and every later turn.",
    "ping": "Application-level ping; answered with a pong carrying the same id.",
    # server -> client
    "welcome": "Answer to hello: the server's protocol version, this connection's limits and "
               "the NPCs it may open.",
    "opened": "Answer to open or resume: the session's binary channel, stored id, voice and (on "
              "open) its resume secret.",
    "closed": "Answer to close.",
    "taken_over": "The session was resumed on another connection: this connection gets nothing "
                  "more of it and its channel is freed.",
    "transcript": "What the player said: partial hypotheses, then one final per turn.",
    "reply": "The NPC's reply text: one message per segment, then a final one with the full "
             "text.",
    "stop": "The player barged in: stop playing this turn now and answer with `interrupt` "
            "carrying played_samples.",
    "turn_done": "Everything of this turn has been sent (all audio, and all face frames of the "
                 "segments UE said ready for).",
    "error": "Something was refused or failed. The connection and all other sessions go on.",
    "pong": "Answer to ping.",
}

FIELD_DOCS: dict[str, str] = {
    "session": "The client's handle of the NPC session, unique on this connection.",
    "turn": "Turn number within the session, from 1; one turn per final transcript.",
    "seq": "Sequence number within (turn, this channel), from 1 without gaps.",
    "segment": "Reply segment index within the turn, from 0.",
    "text": "UTF-8 text.",
    "final": "True on the last message of this channel in the turn.",
    "protocol": "Protocol version.",
    "client": "Free-form client name, for logs.",
    "token": "The token's secret; required when the gateway has tokens configured.",
    "token_name": "Name of the token (gateway.tokens); omitted: \"default\".",
    "resume_secret": "The session's resume secret from `opened`; keep it private.",
    "npcs": "Persona ids this connection may open.",
    "suppressed": "Errors of the same kind left unsent since the last one.",
    "endpoint": "Who ends an utterance: \"vad\" (the server's VAD or end_of_utterance) or "
                "\"client\" (end_of_utterance only).",
    "no_speech": "The turn ended at end_of_utterance with no speech to answer (no reply).",
    "timings": "Wall-clock ms (Unix epoch) of each step of the turn; keys in the protocol "
               "document.",
    "npc": "NPC id; also the persona when `persona` is omitted.",
    "persona": "Persona id; defaults to the npc id.",
    "player": "The player who speaks in this session; this connection's sessions of the same "
              "player share what the recognizer learned about their voice.",
    "sample_rate": "Mic audio sample rate in Hz.",
    "channels": "Interleaved mic audio channels.",
    "format": "Mic sample format: s16le (int16) or f32le (float32), little-endian.",
    "played_samples": "Reply-audio samples UE had played when it stopped.",
    "sid": "The stored session id, as received in `opened`.",
    "last": "Last sequence number seen in `turn`, per channel (transcript, reply, audio, face); "
            "a missing channel means nothing of it was seen.",
    "mic_seq": "Next mic chunk seq the client would send (informational).",
    "id": "Echoed in the pong.",
    "server": "Server name.",
    "max_frame_bytes": "Largest text or binary frame the gateway accepts.",
    "max_sessions": "Most sessions open at once on this connection.",
    "channel": "u16 channel that this session's binary frames carry.",
    "voice": "TTS voice of the persona.",
    "reply_sample_rate": "Nominal sample rate of the reply audio; each reply audio frame "
                         "carries the authoritative rate.",
    "next_mic_seq": "seq of the first mic chunk the gateway expects.",
    "resumed": "True when this answers a resume.",
    "start_sample": "Utterance start, in 16 kHz samples of the session's mic audio.",
    "end_sample": "Utterance end, in 16 kHz samples of the session's mic audio.",
    "audio_samples": "Total reply-audio samples of the turn.",
    "face_frames": "Total face frames of the turn.",
    "segments": "Number of reply segments with audio in the turn.",
    "code": "Stable error code; switch on this, not on the message.",
    "message": "Human-readable explanation.",
}

FIELD_DOCS_BY_TYPE: dict[tuple[str, str], str] = {
    ("reply", "segment"): "Segment index from 0; on the final message, the number of segments.",
    ("reply", "text"): "This segment's text; on the final message, the whole reply.",
    ("transcript", "text"): "The hypothesis so far, or the final transcript.",
    ("error", "session"): "The session concerned, when the error can be attributed to one.",
    ("error", "turn"): "Set when a turn failed; that turn gets no turn_done.",
    ("ready", "turn"): "Turn of the segment, as in its reply audio frames.",
    ("ready", "segment"): "Segment index, as in its reply audio frames.",
    ("resume", "turn"): "The turn `last` refers to; 0 replays everything stored.",
    ("resume", "session"): "The handle to use for the session on this connection.",
}

# --------------------------------------------------------------------------- messages

_SCALARS = {int: "integer", str: "string", bool: "boolean"}


def _json_type(tp: Any) -> tuple[dict[str, Any], bool]:
    """(schema of the Python type, optional?) for the field types the protocol uses."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(tp)) != 2:
            raise TypeError(f"unsupported union {tp!r}")
        inner, _ = _json_type(args[0])
        return inner, True
    if tp in _SCALARS:
        return {"type": _SCALARS[tp]}, False
    if typing.get_origin(tp) is dict and typing.get_args(tp) == (str, int):
        return {"type": "object", "additionalProperties": {"type": "integer"}}, False
    if typing.get_origin(tp) is dict and typing.get_args(tp) == (str, float):
        return {"type": "object", "additionalProperties": {"type": "number"}}, False
    if typing.get_origin(tp) is list and typing.get_args(tp) == (str,):
        return {"type": "array", "items": {"type": "string"}}, False
    raise TypeError(f"unsupported field type {tp!r}")


def _rules(meta: Any, schema: dict[str, Any]) -> None:
    """The field's metadata rules, as JSON Schema keywords."""
    for key, keyword in (("minimum", "minimum"), ("maximum", "maximum"),
                         ("pattern", "pattern"), ("max_length", "maxLength")):
        if key in meta:
            schema[keyword] = meta[key]
    if "enum" in meta:
        schema["enum"] = list(meta["enum"])
    if "keys" in meta:
        schema["propertyNames"] = {"enum": list(meta["keys"])}
    values = schema.get("additionalProperties")
    if isinstance(values, dict):
        if "values_minimum" in meta:
            values["minimum"] = meta["values_minimum"]
        if "values_maximum" in meta:
            values["maximum"] = meta["values_maximum"]


def _default(f) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def message_schema(cls: type[P.Message], direction: str) -> dict[str, Any]:
    """Schema of one JSON message; ``direction`` is "client" or "server"."""
    hints = typing.get_type_hints(cls)
    client = direction == "client"
    props: dict[str, Any] = {"type": {"const": cls.TYPE, "description": "Message type."}}
    required = ["type"]
    for f in fields(cls):
        schema, optional = _json_type(hints[f.name])
        if optional and client:  # a client may send null for an optional field
            schema["type"] = [schema["type"], "null"]
        doc = FIELD_DOCS_BY_TYPE.get((cls.TYPE, f.name), FIELD_DOCS.get(f.name))
        if doc:
            schema["description"] = doc
        _rules(f.metadata, schema)
        default = _default(f)
        must = f.metadata.get("required", False) if client else not optional
        if client and not must and default is not MISSING and default is not None:
            schema["default"] = default
        props[f.name] = schema
        if must:
            required.append(f.name)
    schema: dict[str, Any] = {
        "$schema": DRAFT,
        "$id": f"{ID_PREFIX}{direction}.{cls.TYPE}",
        "title": f"{direction} -> {'server' if client else 'client'}: {cls.TYPE}",
        "description": MESSAGE_DOCS[cls.TYPE],
        "type": "object",
        "properties": props,
        "required": required,
    }
    if client:
        schema["additionalProperties"] = False
    return schema


# --------------------------------------------------------------------------- binary frames

_CTYPES = {"B": "u8", "H": "u16", "I": "u32", "Q": "u64", "f": "f32"}
_COMMON_FIELDS = (
    ("kind", "Frame kind: 1 mic audio, 2 reply audio, 3 face frames."),
    ("flags", "Bit flags; see the frame."),
    ("channel", "The session's channel from `opened`."),
)
_HEADER_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "mic_audio": (
        *_COMMON_FIELDS,
        ("seq", "Mic chunk number, from opened.next_mic_seq, +1 per chunk."),
    ),
    "reply_audio": (
        *_COMMON_FIELDS,
        ("turn", "Turn number."),
        ("seq", "Sequence number within (turn, audio), from 1."),
        ("segment", "Reply segment index, from 0."),
        ("sample_rate", "Sample rate of pcm, Hz."),
        ("sample", "Position of pcm[0] in the turn's reply audio, in samples at sample_rate."),
    ),
    "face_frames": (
        *_COMMON_FIELDS,
        ("turn", "Turn number."),
        ("seq", "Sequence number within (turn, face), from 1."),
        ("segment", "Reply segment the frames belong to."),
        ("frame_count", "Number of face records that follow."),
        ("value_count", f"Values per record, always {NUM_FACE_VALUES}."),
    ),
}


def _layout(st: struct.Struct, names: tuple[tuple[str, str], ...]) -> list[dict[str, Any]]:
    fmt = st.format if isinstance(st.format, str) else st.format.decode()
    assert fmt[0] == "<", fmt
    codes = fmt[1:]
    assert len(codes) == len(names), (fmt, names)
    out = []
    for i, (code, (name, doc)) in enumerate(zip(codes, names, strict=True)):
        out.append({"name": name, "offset": struct.calcsize("<" + codes[:i]),
                    "type": _CTYPES[code], "size": struct.calcsize("<" + code),
                    "description": doc})
    return out


def binary_frames_schema() -> dict[str, Any]:
    """Documentation of the binary frames; not JSON, so only annotations, no assertions."""
    rec = P.FACE_RECORD_DTYPE
    return {
        "$schema": DRAFT,
        "$id": f"{ID_PREFIX}binary-frames",
        "title": "Parley binary frames (documentation only)",
        "description": "Binary WebSocket messages carry audio and face frames. Integers and "
                       "floats are little-endian, headers are packed (no padding), payloads "
                       "follow the header directly. See docs/protocol.md.",
        "x-byte-order": "little-endian",
        "x-frames": {
            "mic_audio": {
                "kind": P.FrameKind.MIC_AUDIO,
                "direction": "client -> server",
                "header_size": P.MIC_HEADER.size,
                "header": _layout(P.MIC_HEADER, _HEADER_FIELDS["mic_audio"]),
                "flags": {},
                "payload": "PCM in the session's format (s16le or f32le), channels "
                           "interleaved, a whole number of sample frames.",
            },
            "reply_audio": {
                "kind": P.FrameKind.REPLY_AUDIO,
                "direction": "server -> client",
                "header_size": P.REPLY_AUDIO_HEADER.size,
                "header": _layout(P.REPLY_AUDIO_HEADER, _HEADER_FIELDS["reply_audio"]),
                "flags": {"last_in_segment": P.FLAG_LAST_IN_SEGMENT,
                          "last_in_turn": P.FLAG_LAST_IN_TURN},
                "flags_note": "last_in_turn is reserved: servers never set it; the turn ends "
                              "with the turn_done message.",
                "payload": "Mono s16le PCM at sample_rate.",
            },
            "face_frames": {
                "kind": P.FrameKind.FACE_FRAMES,
                "direction": "server -> client",
                "header_size": P.FACE_HEADER.size,
                "header": _layout(P.FACE_HEADER, _HEADER_FIELDS["face_frames"]),
                "flags": {"last_in_turn": P.FLAG_LAST_IN_TURN},
                "flags_note": "servers send 0; the turn ends with the turn_done message.",
                "payload": "frame_count face records.",
                "record_size": rec.itemsize,
                "record": [
                    {"name": "sample", "offset": rec.fields["sample"][1], "type": "u64",
                     "size": 8, "description": "Reply-audio sample this frame belongs to, in "
                                               "the turn's reply audio at its sample_rate."},
                    {"name": "values", "offset": rec.fields["values"][1],
                     "type": f"f32[{NUM_FACE_VALUES}]", "size": 4 * NUM_FACE_VALUES,
                     "description": "Face values in x-face-values order."},
                ],
            },
        },
        "x-face-values": list(FACE_VALUE_NAMES),
        "x-face-value-ranges": {
            "blendshapes": f"indices 0..{NUM_BLENDSHAPES - 1}, 0..1",
            "rotations": f"indices {NUM_BLENDSHAPES}..{NUM_FACE_VALUES - 1}, radians, signed",
        },
    }


def _messages() -> list[tuple[str, type[P.Message]]]:
    return ([("client", c) for c in P.CLIENT_MESSAGES.values()]
            + [("server", c) for c in P.SERVER_MESSAGES.values()])


def _local(schema: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in schema.items() if k != "$schema"}


def build_all() -> dict[str, dict[str, Any]]:
    """Filename -> schema for everything under schemas/json/."""
    out: dict[str, dict[str, Any]] = {}
    defs: dict[str, Any] = {}
    for direction, cls in _messages():
        name = f"{direction}.{cls.TYPE}"
        out[f"{name}.json"] = message_schema(cls, direction)
        defs[name] = _local(out[f"{name}.json"])
    binary = binary_frames_schema()
    out["binary-frames.json"] = binary
    defs["client"] = {"description": "Any message a client sends.",
                      "oneOf": [{"$ref": f"#/$defs/client.{t}"} for t in P.CLIENT_MESSAGES]}
    defs["server"] = {"description": "Any message the server sends.",
                      "oneOf": [{"$ref": f"#/$defs/server.{t}"} for t in P.SERVER_MESSAGES]}
    out["protocol.json"] = {
        "$schema": DRAFT,
        "$id": f"{ID_PREFIX}protocol",
        "title": f"Parley Unreal protocol v{P.PROTOCOL_VERSION}: JSON control messages",
        "description": "One WebSocket text frame holds one of these messages. "
                       "$defs/client and $defs/server select by direction.",
        "oneOf": [{"$ref": "#/$defs/client"}, {"$ref": "#/$defs/server"}],
        "$defs": defs,
        "x-protocol-version": P.PROTOCOL_VERSION,
        "x-binary-frames": _local(binary),
    }
    return out


def dump(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    out_dir = Path(argv[0]) if argv else OUT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    built = build_all()
    for name, schema in built.items():
        (out_dir / name).write_text(dump(schema), encoding="utf-8")
    for stale in out_dir.glob("*.json"):
        if stale.name not in built:
            stale.unlink()
    print(f"wrote {len(built)} schemas to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
