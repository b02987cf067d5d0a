"""Conformance vectors for client authors, generated from the typed definitions in schemas/.

Writes two files that are checked in and kept equal to a fresh generation by a unit test:

* ``clients/vectors/protocol-vectors.json``: language-neutral test vectors. Every binary frame
  kind and every JSON message, valid and invalid: the exact bytes or text, and either the
  expected decoding or the error code the gateway answers with. Valid vectors come from the
  message dataclasses (every field filled, optional ones left out or null); invalid ones from
  the field types (wrong JSON type, null), each field's wire rules in its ``protocol.spec``
  metadata (required, range, enum, id pattern, length, map keys: the rules the decoder
  enforces, so the vectors cannot drift from it) and the protocol's fixed rules (JSON depth,
  JSON itself, frame sizes). Server messages get valid and wrong-type vectors only: a client
  takes the values a server sends. Expectations follow from how each vector was built, not
  from running the codec, so testing the codec against them means something.
* ``clients/cpp/parley_messages.hpp``: the JSON messages as plain C++17 structs (with their
  rules in comments and their JSON keys in ``kFields``), for a client to fill from its own
  JSON library.

Run ``python -m schemas.vectors`` after changing the protocol.
"""

from __future__ import annotations

import json
import re
import struct
import sys
import textwrap
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import numpy as np

from schemas import jsonschema as J
from schemas import protocol as P
from schemas.arkit import NUM_FACE_VALUES

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "clients" / "vectors" / "protocol-vectors.json"
CPP_MESSAGES = ROOT / "clients" / "cpp" / "parley_messages.hpp"
E = P.ErrorCode

# Realistic values by field name (as in docs/protocol.md); a field not named here gets one by
# its type, so a field added to a message shows up in the vectors without touching this file.
EXAMPLES: dict[str, Any] = {
    "session": "guard-01", "npc": "guard", "persona": "guard", "sample_rate": 48000,
    "channels": 2, "format": "f32le", "endpoint": "client", "client": "MyGame-UE5.4",
    "token_name": "game-server", "token": "s3cret", "protocol": P.PROTOCOL_VERSION,
    "sid": "guard-01.9f3c2a7b5e01d4c8",
    "resume_secret": "kq3V0f5tQm1xW8rYb2nH7cJ4dL6eP9sAzU0iO3gT", "turn": 2,
    "segment": 1, "seq": 3, "played_samples": 44100, "last": {"transcript": 2, "audio": 9},
    "mic_seq": 412, "id": 42, "text": "The gate opens at dawn.", "final": True,
    "code": E.UNKNOWN_SEGMENT, "message": "ready for turn 1 segment 5, whose audio was never sent",
    "channel": 1, "voice": "en-gb-scotland", "reply_sample_rate": 22050, "next_mic_seq": 409,
    "resumed": True, "max_frame_bytes": 65536, "max_sessions": 64, "server": "parley",
    "npcs": ["guard", "merchant"], "audio_samples": 121275, "face_frames": 330, "segments": 2,
    "interrupted": False, "timings": {"eos": 1700000000000.0, "ready": 1700000000412.5},
    "start_sample": 20480, "end_sample": 44160, "suppressed": 3,
}
BY_TYPE: dict[Any, Any] = {int: 7, str: "x", bool: True, float: 0.5}
# JSON values of the wrong type for a field of each kind: refused with bad_message
WRONG: dict[str, list[Any]] = {
    "int": ["7", True, 7.5, 7.0], "str": [7, False, ["x"]], "bool": [1, "true"],
    "dict[str, int]": [["audio", 3], {"audio": "3"}, {"audio": True}, {"audio": 1.5}],
    "dict[str, float]": [[1.0], {"eos": "1"}],
    "list[str]": ["guard", [1], [None], {"guard": True}],
}
# Ids that break the id rule (protocol.ID_PATTERN): empty, too long, a space, non-ASCII, a slash,
# a final newline (which a regex `$` lets through in Python, Perl and PCRE, not in JSON Schema)
BAD_IDS = ["", "x" * (P.MAX_ID_LENGTH + 1), "guard 01", "gu\u00e4rd", "guard/01", "guard-01\n"]
assert not any(re.fullmatch(P.ID_PATTERN[1:-1], bad) for bad in BAD_IDS)


def _hints(cls: type[P.Message]) -> dict[str, tuple[Any, bool]]:
    """field -> (type without None, optional?)"""
    out = {}
    for name, tp in typing.get_type_hints(cls).items():
        if name == "TYPE":
            continue
        args = typing.get_args(tp)
        optional = type(None) in args
        if optional:
            tp = next(a for a in args if a is not type(None))
        out[name] = (tp, optional)
    return out


def _kind(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is dict:
        return f"dict[str, {typing.get_args(tp)[1].__name__}]"
    if origin is list:
        return f"list[{typing.get_args(tp)[0].__name__}]"
    return tp.__name__


def _example(name: str, tp: Any) -> Any:
    if name in EXAMPLES:
        return EXAMPLES[name]
    if typing.get_origin(tp) is dict:
        return {"a": BY_TYPE[typing.get_args(tp)[1]]}
    if typing.get_origin(tp) is list:
        return [BY_TYPE[typing.get_args(tp)[0]]]
    return BY_TYPE[tp]


def _full(cls: type[P.Message]) -> dict[str, Any]:
    return {"type": cls.TYPE, **{n: _example(n, tp) for n, (tp, _) in _hints(cls).items()}}


def _meta(cls: type[P.Message]) -> dict[str, Any]:
    """field -> its wire rules (protocol.spec metadata), the ones the decoder enforces."""
    return {f.name: f.metadata for f in fields(cls)}


def _expect(cls: type[P.Message], data: dict[str, Any]) -> dict[str, Any]:
    """The decoding: every field, defaults filled in, unset optional fields left out."""
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known}).to_dict()


def _text(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False)


def _vector(name: str, direction: str, data: Any, expect: Any = None,
            error: str | None = None, text: str | None = None) -> dict[str, Any]:
    v = {"name": name, "direction": direction, "text": _text(data) if text is None else text}
    if error is None:
        v["expect"] = expect
    else:
        v["error"] = error
    return v


# --------------------------------------------------------------------------- JSON vectors


def _valid(cls: type[P.Message], direction: str) -> list[dict[str, Any]]:
    full = _full(cls)
    out = [_vector(f"{cls.TYPE}.all_fields", direction, full, _expect(cls, full))]
    hints = _hints(cls)
    optional = [n for n, (_, opt) in hints.items() if opt]
    if optional:
        left_out = {k: v for k, v in full.items() if k not in optional}
        out.append(_vector(f"{cls.TYPE}.optional_fields_left_out", direction, left_out,
                           _expect(cls, left_out)))
        nulls = {**full, **dict.fromkeys(optional)}
        out.append(_vector(f"{cls.TYPE}.optional_fields_null", direction, nulls,
                           _expect(cls, left_out)))
    if direction == "client->server":  # only the required fields: the rest take defaults
        required = {k: v for k, v in full.items()
                    if k == "type" or _meta(cls)[k].get("required")}
        if required != full:
            out.append(_vector(f"{cls.TYPE}.required_fields_only", direction, required,
                               _expect(cls, required)))
    if direction == "server->client":  # a client ignores fields a later server adds
        out.append(_vector(f"{cls.TYPE}.unknown_field_ignored", direction,
                           {**full, "added_later": {"x": 1}}, _expect(cls, full)))
    return out


def _wrong_types(cls: type[P.Message], direction: str) -> list[dict[str, Any]]:
    full, out = _full(cls), []
    for name, (tp, optional) in _hints(cls).items():
        for i, bad in enumerate(WRONG[_kind(tp)]):
            out.append(_vector(f"{cls.TYPE}.{name}.wrong_type_{i + 1}", direction,
                               {**full, name: bad}, error=E.BAD_MESSAGE))
        if not optional:
            out.append(_vector(f"{cls.TYPE}.{name}.null", direction, {**full, name: None},
                               error=E.BAD_MESSAGE))
    return out


def _rule_breaks(cls: type[P.Message]) -> list[dict[str, Any]]:
    """Client messages only: values of the right type that the gateway refuses, and the
    edge values it still takes, each from the field's metadata."""
    full, out, d = _full(cls), [], "client->server"
    out.append(_vector(f"{cls.TYPE}.unknown_field", d, {**full, "colour": "red"},
                       error=E.BAD_MESSAGE))
    for name, meta in _meta(cls).items():
        if meta.get("required"):
            left_out = {k: v for k, v in full.items() if k != name}
            out.append(_vector(f"{cls.TYPE}.{name}.missing", d, left_out, error=E.BAD_MESSAGE))
        code = meta.get("code", E.BAD_MESSAGE)
        for label, bad in _breaking_values(name, meta):
            out.append(_vector(f"{cls.TYPE}.{name}.{label}", d, {**full, name: bad}, error=code))
        for label, edge in _edge_values(meta):
            data = {**full, name: edge}
            if cls is P.Hello and name == "protocol" and edge != P.PROTOCOL_VERSION:
                # decodes, but the gateway speaks only its own version
                out.append(_vector(f"hello.protocol.{label}", d, data,
                                   error=E.UNSUPPORTED_PROTOCOL))
            else:
                out.append(_vector(f"{cls.TYPE}.{name}.{label}", d, data, _expect(cls, data)))
    return out


def _breaking_values(name: str, meta: Any) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    if "enum" in meta:
        out.append(("not_in_enum", "s24le" if "s16le" in meta["enum"] else "nope"))
    if "minimum" in meta:
        out.append(("below_minimum", meta["minimum"] - 1))
    if "maximum" in meta:
        out.append(("above_maximum", meta["maximum"] + 1))
        out.append(("far_above_maximum", 2**64))  # past u64 and a double's exact range
    if "pattern" in meta:
        out += [(f"bad_id_{i + 1}", bad) for i, bad in enumerate(BAD_IDS)]
    elif "max_length" in meta:
        out.append(("too_long", "x" * (meta["max_length"] + 1)))
    if "keys" in meta:
        unknown = "sound"
        assert unknown not in meta["keys"]
        out.append(("unknown_key", {unknown: 1}))
    if "values_minimum" in meta:
        out.append(("value_below_minimum", {meta["keys"][0]: meta["values_minimum"] - 1}))
    if "values_maximum" in meta:
        out.append(("value_above_maximum", {meta["keys"][0]: meta["values_maximum"] + 1}))
    return out


def _edge_values(meta: Any) -> list[tuple[str, Any]]:
    """Values on the edge of a rule, which the gateway accepts."""
    out: list[tuple[str, Any]] = []
    if "minimum" in meta:
        out.append(("at_minimum", meta["minimum"]))
    if "maximum" in meta:
        out.append(("at_maximum", meta["maximum"]))
    if "max_length" in meta:
        out.append(("at_max_length", "x" * meta["max_length"]))
    if "keys" in meta:
        lo, hi = meta.get("values_minimum", 0), meta.get("values_maximum", 1)
        out.append(("every_key", {k: (lo, hi)[i % 2] for i, k in enumerate(meta["keys"])}))
    return out


def _nested(depth: int) -> str:
    """A ping whose unknown field nests ``depth`` levels in all (the message is level 1)."""
    return '{"type":"ping","x":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def _frames_that_are_not_messages() -> list[dict[str, Any]]:
    d = "client->server"
    brackets = {"type": "hello", "protocol": P.PROTOCOL_VERSION,
                "client": "[" * (P.MAX_JSON_DEPTH + 1) + "{\\\"" + "]" * 3}
    return [
        _vector("text.not_json", d, None, error=E.BAD_JSON, text='{"type":"ping"'),
        _vector("text.empty", d, None, error=E.BAD_JSON, text=""),
        _vector("text.array", d, [{"type": "ping"}], error=E.BAD_MESSAGE),
        _vector("text.string", d, "ping", error=E.BAD_MESSAGE),
        _vector("text.no_type", d, {"id": 1}, error=E.BAD_MESSAGE),
        _vector("text.type_not_a_string", d, {"type": 5}, error=E.BAD_MESSAGE),
        _vector("text.unknown_type", d, {"type": "dance"}, error=E.UNKNOWN_TYPE),
        _vector("text.server_type_from_client", d, _full(P.Welcome), error=E.UNKNOWN_TYPE),
        # nesting is checked before parsing: a deep frame is refused, never parsed
        _vector("text.nested_too_deep", d, None, error=E.BAD_MESSAGE,
                text=_nested(P.MAX_JSON_DEPTH + 1)),
        _vector("text.nested_far_too_deep", d, None, error=E.BAD_MESSAGE, text=_nested(1000)),
        _vector("text.brackets_in_a_string_do_not_nest", d, brackets,
                _expect(P.Hello, brackets)),
        # NaN and Infinity are not JSON, though some parsers take them
        _vector("text.nan", d, None, error=E.BAD_JSON, text='{"type":"ping","id":NaN}'),
        _vector("text.infinity", d, None, error=E.BAD_JSON,
                text='{"type":"ping","id":-Infinity}'),
        # valid JSON, far outside any field's range (and past what some parsers convert)
        _vector("text.integer_of_5000_digits", d, None, error=E.BAD_MESSAGE,
                text='{"type":"ping","id":' + "9" * 5000 + "}"),
    ]


def json_vectors() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for cls in P.CLIENT_MESSAGES.values():
        out += _valid(cls, "client->server")
        out += _wrong_types(cls, "client->server") + _rule_breaks(cls)
    for cls in P.SERVER_MESSAGES.values():
        out += _valid(cls, "server->client") + _wrong_types(cls, "server->client")
    return out + _frames_that_are_not_messages()


# --------------------------------------------------------------------------- binary vectors


def _mic(channel: int, seq: int, pcm: bytes, flags: int = 0) -> tuple[bytes, dict]:
    frame = P.MicAudio(channel, seq, pcm, flags)
    return frame.encode(), {"kind": P.FrameKind.MIC_AUDIO, "flags": flags, "channel": channel,
                            "seq": seq, "pcm": pcm.hex()}


def _reply(channel: int, turn: int, seq: int, segment: int, rate: int, sample: int, pcm: bytes,
           flags: int = 0) -> tuple[bytes, dict]:
    frame = P.ReplyAudio(channel, turn, seq, segment, rate, sample, pcm, flags)
    return frame.encode(), {"kind": P.FrameKind.REPLY_AUDIO, "flags": flags,
                            "channel": channel, "turn": turn, "seq": seq, "segment": segment,
                            "sample_rate": rate, "sample": sample, "pcm": pcm.hex()}


def _face(channel: int, turn: int, seq: int, segment: int, samples: list[int],
          flags: int = 0) -> tuple[bytes, dict]:
    # values k/64 and -k/128 are exact in float32, so any language compares them exactly
    values = np.array([[(k % 65) / 64 if r % 2 == 0 else -k / 128
                        for k in range(NUM_FACE_VALUES)] for r in range(len(samples))],
                      np.float32).reshape(len(samples), NUM_FACE_VALUES)
    frame = P.FaceFrames(channel, turn, seq, segment, np.array(samples, np.uint64), values, flags)
    records = [{"sample": s, "values": [float(x) for x in row]}
               for s, row in zip(samples, values, strict=True)]
    return frame.encode(), {"kind": P.FrameKind.FACE_FRAMES, "flags": flags, "channel": channel,
                            "turn": turn, "seq": seq, "segment": segment,
                            "frame_count": len(samples), "value_count": NUM_FACE_VALUES,
                            "records": records}


def _pcm16(*samples: int) -> bytes:
    return struct.pack(f"<{len(samples)}h", *samples)


def binary_vectors() -> list[dict[str, Any]]:
    c2s, s2c = "client->server", "server->client"
    doc_mic, _ = _mic(1, 1, b"")
    doc_reply, _ = _reply(1, 1, 9, 0, 22050, 8816, b"", P.FLAG_LAST_IN_SEGMENT)
    # the byte examples of docs/protocol.md section 4
    assert doc_mic.hex() == "0100010001000000"
    assert doc_reply.hex() == "02010100010000000900000000000000225600007022000000000000"
    valid = [
        ("mic_audio.s16le", c2s, *_mic(1, 1, _pcm16(0, 1, -1, 32767, -32768))),
        ("mic_audio.f32le_stereo", c2s,
         *_mic(0x1234, 0xDEADBEEF, struct.pack("<4f", 0.5, -0.25, 1.0, -1.0))),
        ("mic_audio.no_pcm", c2s, *_mic(3, 7, b"")),
        ("reply_audio.doc_example", s2c,
         *_reply(1, 1, 9, 0, 22050, 8816, _pcm16(100, -100, 0), P.FLAG_LAST_IN_SEGMENT)),
        ("reply_audio.large_values", s2c, *_reply(0xFFFF, 0xFFFFFFFF, 0x01020304, 7, 48000,
                                                  0x0123456789ABCDEF, _pcm16(-2, 2))),
        ("reply_audio.reserved_flag_bits_kept", s2c,
         *_reply(2, 3, 1, 0, 22050, 0, _pcm16(1), 0x82)),
        ("reply_audio.no_pcm", s2c, *_reply(1, 1, 1, 0, 22050, 0, b"")),
        ("face_frames.two_records", s2c, *_face(2, 3, 4, 1, [0, 368])),
        ("face_frames.large_sample", s2c, *_face(1, 1, 1, 0, [0x0123456789ABCDEF])),
        ("face_frames.no_records", s2c, *_face(1, 1, 1, 0, [])),
    ]
    out = [{"name": n, "direction": d, "hex": b.hex(), "expect": e} for n, d, b, e in valid]
    face2, _ = _face(2, 3, 4, 1, [0, 368])
    reply, _ = _reply(1, 1, 9, 0, 22050, 8816, _pcm16(100, -100, 0))
    values_60 = face2[:18] + struct.pack("<H", NUM_FACE_VALUES - 1) + face2[20:]
    invalid = [
        ("frame.empty", b"", E.BAD_AUDIO),
        ("frame.shorter_than_common_header", bytes.fromhex("010001"), E.BAD_AUDIO),
        ("frame.kind_0", bytes.fromhex("00000100") + b"\x00" * 24, E.BAD_MESSAGE),
        ("frame.kind_4", bytes.fromhex("04000100") + b"\x00" * 24, E.BAD_MESSAGE),
        ("frame.text_sent_as_binary", b'{"type":"ping"}', E.BAD_MESSAGE),
        ("mic_audio.short_header", doc_mic[:7], E.BAD_AUDIO),
        ("reply_audio.short_header", reply[:P.REPLY_AUDIO_HEADER.size - 1], E.BAD_MESSAGE),
        ("reply_audio.odd_pcm_bytes", reply[:-1], E.BAD_MESSAGE),
        ("face_frames.short_header", face2[:P.FACE_HEADER.size - 1], E.BAD_MESSAGE),
        ("face_frames.value_count_not_61", values_60, E.BAD_MESSAGE),
        ("face_frames.records_truncated", face2[:-4], E.BAD_MESSAGE),
        ("face_frames.trailing_bytes", face2 + b"\x00" * 4, E.BAD_MESSAGE),
    ]
    out += [{"name": n, "direction": c2s if b[:1] == b"\x01" else s2c, "hex": b.hex(),
             "error": code} for n, b, code in invalid]
    return out


def build() -> dict[str, Any]:
    return {
        "protocol": P.PROTOCOL_VERSION,
        "generated_by": "python -m schemas.vectors (from schemas/protocol.py)",
        "about": (
            "Conformance vectors of the Parley WebSocket protocol (docs/protocol.md). "
            "'binary': one binary WebSocket message each, as hex; 'json': one text frame each, "
            "as its exact text. A vector has either 'expect' (the decoding: binary header "
            "fields by name, pcm as hex, face records with their sample and 61 values; JSON "
            "messages with every field, defaults filled in and unset optional fields left "
            "out) or 'error' (the code the gateway answers with when a client sends it; a "
            "client decoding server frames refuses the same input). Integers are exact: "
            "u64 values above 2^53 appear, read them as integers, not doubles. Face values "
            "are exact in float32."),
        "binary": binary_vectors(),
        "json": json_vectors(),
    }


# --------------------------------------------------------------------------- C++ messages

_CPP = {int: "int64_t", str: "std::string", bool: "bool", float: "double"}


def _cpp_type(tp: Any, optional: bool) -> str:
    if typing.get_origin(tp) is dict:
        base = f"std::map<std::string, {_CPP[typing.get_args(tp)[1]]}>"
    elif typing.get_origin(tp) is list:
        base = f"std::vector<{_CPP[typing.get_args(tp)[0]]}>"
    else:
        base = _CPP[tp]
    return f"std::optional<{base}>" if optional else base


def _cpp_default(f, tp: Any, optional: bool) -> str:
    if optional:
        return ""
    default = f.default if f.default is not MISSING else MISSING
    if default is MISSING or typing.get_origin(tp) is dict:
        return ""
    if isinstance(default, bool):
        return " = true" if default else " = false"
    if isinstance(default, int):
        return f" = {default}"
    if isinstance(default, str) and default:
        return f" = {json.dumps(default)}"
    return ""


def _rule_text(meta: Any) -> str:
    """The field's wire rules in words, as the gateway enforces them."""
    out = [" Required."] if meta.get("required") else []
    if "pattern" in meta:
        out.append(f" An id: 1..{P.MAX_ID_LENGTH} characters of [A-Za-z0-9_.-].")
    elif "max_length" in meta:
        out.append(f" At most {meta['max_length']} characters.")
    if "minimum" in meta or "maximum" in meta:
        out.append(f" Range {meta.get('minimum', '')}..{meta.get('maximum', '')}.")
    if "enum" in meta:
        out.append(f" One of: {', '.join(meta['enum'])}.")
    if "keys" in meta:
        out.append(f" Keys: {', '.join(meta['keys'])}; values "
                   f"{meta.get('values_minimum', '')}..{meta.get('values_maximum', '')}.")
    if "code" in meta:
        out.append(f" Refused with {meta['code']}.")
    return "".join(out)


def _camel(name: str) -> str:
    return "".join(part.title() for part in name.split("_"))


def _cpp_struct(cls: type[P.Message], direction: str) -> list[str]:
    hints = _hints(cls)
    lines = [*_comment(J.MESSAGE_DOCS.get(cls.TYPE, cls.TYPE), ""),
             f"struct {_camel(cls.TYPE)}", "{",
             f'    static constexpr const char* kType = "{cls.TYPE}";']
    for f in fields(cls):
        tp, optional = hints[f.name]
        doc = J.FIELD_DOCS_BY_TYPE.get((cls.TYPE, f.name), J.FIELD_DOCS.get(f.name, ""))
        if optional:
            doc += (" Optional: leave it out when unset." if direction == "client"
                    else " Optional: absent when unset, never null.")
        if direction == "client":
            doc += _rule_text(f.metadata)
        lines += _comment(doc.strip(), "    ")
        lines.append(f"    {_cpp_type(tp, optional)} {f.name}{_cpp_default(f, tp, optional)};")
    names = ", ".join(f'"{f.name}"' for f in fields(cls))
    assert names, f"{cls.TYPE}: a C++ array needs at least one field"
    lines += ["    // The JSON keys of the fields above, besides `type`.",
              f"    static constexpr const char* kFields[] = {{{names}}};"]
    return [*lines, "};", ""]


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}// {line}" for line in textwrap.wrap(text, 96 - len(indent))]


def cpp_messages() -> str:
    codes = sorted((k, v) for k, v in vars(E).items() if k.isupper())
    out = [
        "// Parley protocol JSON messages as plain C++17 structs. GENERATED by",
        "// `python -m schemas.vectors` from schemas/protocol.py: do not edit by hand.",
        "// Field names are the JSON keys. Fill them from your own JSON library (FJsonObject in",
        "// Unreal); integers are JSON integers, never strings or floats. See docs/protocol.md.",
        "#pragma once",
        "",
        "#include <cstdint>",
        "#include <map>",
        "#include <optional>",
        "#include <string>",
        "#include <vector>",
        "",
        "namespace parley {",
        "",
        f"inline constexpr int64_t kProtocolVersion = {P.PROTOCOL_VERSION};",
        "",
        "// Stable error codes of `error` messages: switch on these, not on the message text.",
        "namespace error_code {",
        *[f'inline constexpr const char* k{_camel(k.lower())} = "{v}";' for k, v in codes],
        "}  // namespace error_code",
        "",
        "// Messages a client sends (text frames).",
        "namespace client {",
        "",
    ]
    for cls in P.CLIENT_MESSAGES.values():
        out += _cpp_struct(cls, "client")
    out += ["}  // namespace client", "", "// Messages the server sends (text frames).",
            "namespace server {", ""]
    for cls in P.SERVER_MESSAGES.values():
        out += _cpp_struct(cls, "server")
    out += ["}  // namespace server", "",
            "// Every message type, by direction (the `type` field of each text frame).",
            "inline constexpr const char* kClientMessageTypes[] = {",
            *[f"    client::{_camel(t)}::kType," for t in P.CLIENT_MESSAGES], "};",
            "inline constexpr const char* kServerMessageTypes[] = {",
            *[f"    server::{_camel(t)}::kType," for t in P.SERVER_MESSAGES], "};",
            "",
            "// Every message struct, by direction, for code that treats them alike (a template",
            "// taking MessageList<M...> sees each one as M).",
            "template <typename... M>", "struct MessageList", "{", "};",
            "using ClientMessages = MessageList<",
            *_cpp_list([f"client::{_camel(t)}" for t in P.CLIENT_MESSAGES]),
            "using ServerMessages = MessageList<",
            *_cpp_list([f"server::{_camel(t)}" for t in P.SERVER_MESSAGES]),
            "", "}  // namespace parley", ""]
    return "\n".join(re.sub(r"\s+$", "", line) for line in out)


def _cpp_list(names: list[str]) -> list[str]:
    return [f"    {n}," for n in names[:-1]] + [f"    {names[-1]}>;"]


def dump(vectors: dict[str, Any]) -> str:
    return json.dumps(vectors, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    VECTORS.parent.mkdir(parents=True, exist_ok=True)
    CPP_MESSAGES.parent.mkdir(parents=True, exist_ok=True)
    vectors = build()
    VECTORS.write_text(dump(vectors), encoding="utf-8")
    CPP_MESSAGES.write_text(cpp_messages(), encoding="utf-8")
    print(f"wrote {len(vectors['binary'])} binary and {len(vectors['json'])} JSON vectors to "
          f"{VECTORS.relative_to(ROOT)}, and {CPP_MESSAGES.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
