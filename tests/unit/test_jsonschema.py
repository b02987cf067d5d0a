"""The committed JSON Schemas and docs/protocol.md agree with the dataclasses they describe."""

from __future__ import annotations

import json
import re
import struct
import typing
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest

from schemas import jsonschema as J
from schemas import protocol as P
from schemas.arkit import FACE_VALUE_NAMES, NUM_FACE_VALUES

ROOT = Path(__file__).resolve().parents[2]
JSON_DIR = ROOT / "schemas" / "json"
DOC = ROOT / "docs" / "protocol.md"

ALL = [("client", c) for c in P.CLIENT_MESSAGES.values()] + [
    ("server", c) for c in P.SERVER_MESSAGES.values()]
IDS = [f"{d}.{c.TYPE}" for d, c in ALL]



def errors(instance, schema: dict, root: dict | None = None) -> list[str]:
    """What the reference JSON Schema validator (the `jsonschema` package, draft 2020-12) finds
    wrong with ``instance``; [] when valid. ``root`` resolves local $refs."""
    import jsonschema

    if root is not None:
        schema = {**root, **schema}
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return [e.message for e in cls(schema).iter_errors(instance)]

def _optional(cls: type[P.Message], name: str) -> bool:
    tp = typing.get_type_hints(cls)[name]
    return type(None) in typing.get_args(tp)


def _required(direction: str, cls: type[P.Message], name: str) -> bool:
    """Client fields: required when their metadata says so; server fields: unless optional."""
    if direction == "client":
        return bool(next(f for f in fields(cls) if f.name == name).metadata.get("required"))
    return not _optional(cls, name)


def _schema(direction: str, cls: type[P.Message]) -> dict:
    return J.build_all()[f"{direction}.{cls.TYPE}.json"]


# ------------------------------------------------------------------ committed files


def test_committed_files_equal_build_all():
    built = J.build_all()
    on_disk = {p.name for p in JSON_DIR.glob("*.json")}
    assert on_disk == set(built), "run: .venv/bin/python -m schemas.jsonschema"
    for name, schema in built.items():
        text = (JSON_DIR / name).read_text(encoding="utf-8")
        assert text == J.dump(schema), f"{name} is stale; run: python -m schemas.jsonschema"
        assert json.loads(text) == schema


def test_one_file_per_message_plus_bundle():
    built = J.build_all()
    assert "client.open.json" in built and "server.opened.json" in built
    assert len(built) == len(P.CLIENT_MESSAGES) + len(P.SERVER_MESSAGES) + 2
    bundle = built["protocol.json"]
    for d, cls in ALL:
        assert bundle["$defs"][f"{d}.{cls.TYPE}"] == {
            k: v for k, v in built[f"{d}.{cls.TYPE}.json"].items() if k != "$schema"}
    assert bundle["x-binary-frames"]["x-frames"] == built["binary-frames.json"]["x-frames"]


def test_main_writes_the_same_files(tmp_path):
    (tmp_path / "stale.json").write_text("{}")
    assert J.main([str(tmp_path)]) == 0
    assert {p.name for p in tmp_path.glob("*.json")} == set(J.build_all())
    for p in tmp_path.glob("*.json"):
        assert p.read_text(encoding="utf-8") == (JSON_DIR / p.name).read_text(encoding="utf-8")


# ------------------------------------------------------------------ schemas match dataclasses


@pytest.mark.parametrize("direction,cls", ALL, ids=IDS)
def test_properties_and_required_match_fields(direction, cls):
    s = _schema(direction, cls)
    names = [f.name for f in fields(cls)]
    assert s["$schema"] == J.DRAFT
    assert list(s["properties"]) == ["type", *names]
    assert s["properties"]["type"]["const"] == cls.TYPE
    assert s["required"] == ["type", *[n for n in names if _required(direction, cls, n)]]
    if direction == "client":
        assert s["additionalProperties"] is False
    else:
        assert "additionalProperties" not in s
    want = {int: "integer", str: "string", bool: "boolean", dict: "object", list: "array"}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        base = (next(a for a in typing.get_args(tp) if a is not type(None))
                if _optional(cls, f.name) else tp)
        jt = s["properties"][f.name]["type"]
        expect = want[typing.get_origin(base) or base]
        # a client may send null for an optional field; the server never sends null
        nullable = _optional(cls, f.name) and direction == "client"
        assert jt == ([expect, "null"] if nullable else expect), f.name


@pytest.mark.parametrize("direction,cls", ALL, ids=IDS)
def test_defaults_are_the_dataclass_defaults(direction, cls):
    s = _schema(direction, cls)
    d = cls()
    for f in fields(cls):
        prop = s["properties"][f.name]
        if "default" in prop:
            assert prop["default"] == getattr(d, f.name)
            assert not _required(direction, cls, f.name)
        else:  # None, a required field, or a server field (always sent)
            assert (getattr(d, f.name) is None or _required(direction, cls, f.name)
                    or direction == "server")


# ------------------------------------------------------------------ examples validate

S = "npc-1"
EXAMPLES: list[P.Message] = [
    P.Hello(client="ue", token_name="game", token="t"),
    P.Hello(),
    P.OpenSession(session=S, npc="guard", sample_rate=48000, channels=2, format="f32le"),
    P.OpenSession(session=S, npc="guard", persona="wizard"),
    P.CloseSession(session=S),
    P.EndOfUtterance(session=S),
    P.Ready(session=S, turn=2, segment=1),
    P.Interrupt(session=S, played_samples=1234),
    P.Interrupt(session=S),
    P.Resume(session=S, sid="npc-1.ab12cd34", resume_secret="s" * 32, turn=3,
             last={"audio": 5, "face": 9}, mic_seq=40),
    P.Resume(session=S, sid="npc-1.ab12cd34", resume_secret="s" * 32),
    P.Ping(id=7),
    P.Ping(),
    P.Welcome(max_frame_bytes=65536, max_sessions=64),
    P.Welcome(max_frame_bytes=65536, max_sessions=64, npcs=["guard"], token_name="game"),
    P.SessionOpened(session=S, channel=1, sid="npc-1.ab12cd34", npc="guard", persona="guard",
                    voice="en-us", reply_sample_rate=22050, next_mic_seq=1),
    P.SessionClosed(session=S),
    P.TakenOver(session=S),
    P.Transcript(session=S, turn=1, seq=1, text="hi", final=False, start_sample=0,
                 end_sample=8000),
    P.Transcript(session=S, turn=1, seq=2, text="hi there", final=True),
    P.ReplyText(session=S, turn=1, seq=1, segment=0, text="Hello."),
    P.TurnDone(session=S, turn=1, audio_samples=22050, face_frames=60, segments=1),
    P.TurnDone(session=S, turn=2, audio_samples=11025, face_frames=0, interrupted=True,
               timings={"eos": 1763700000000.0, "gw_first_audio": 1763700000139.5}),
    P.StopPlayback(session=S, turn=2),
    P.ErrorEvent(code=P.ErrorCode.TURN_FAILED, message="x", session=S, turn=1),
    P.ErrorEvent(code=P.ErrorCode.BAD_JSON, message="x"),
    P.ErrorEvent(code=P.ErrorCode.BAD_AUDIO, message="x", session=S, suppressed=12),
    P.Pong(id=7),
]


def _direction(msg: P.Message) -> str:
    return "client" if type(msg) in P.CLIENT_MESSAGES.values() else "server"


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.TYPE)
def test_encoded_examples_validate(msg):
    d = _direction(msg)
    wire = json.loads(P.encode(msg))
    assert errors(wire, _schema(d, type(msg))) == []
    bundle = J.build_all()["protocol.json"]
    assert errors(wire, bundle) == []
    assert errors(wire, {"$ref": f"#/$defs/{d}"}, bundle) == []


@pytest.mark.parametrize("direction,cls", ALL, ids=IDS)
def test_every_message_has_an_example(direction, cls):
    assert any(type(m) is cls for m in EXAMPLES)


@pytest.mark.parametrize("bad", [
    {"type": "open", "session": S, "npc": "guard", "sample_rate": 16000, "channels": 1,
     "format": "s16le", "colour": 1},  # unknown field
    {"type": "open", "session": S, "npc": "guard", "sample_rate": True, "channels": 1,
     "format": "s16le"},  # bool is not an integer
    {"type": "open", "session": S, "npc": "guard", "sample_rate": "fast", "channels": 1,
     "format": "s16le"},
    {"type": "open", "session": S, "npc": "guard", "sample_rate": 16000, "channels": 9,
     "format": "s16le"},
    {"type": "open", "session": S, "npc": "guard", "sample_rate": 16000, "channels": 1,
     "format": "mp3"},
    {"type": "open", "session": "bad id!", "npc": "guard", "sample_rate": 16000,
     "channels": 1, "format": "s16le"},
    {"type": "ready", "session": S, "turn": 1},  # missing segment
    {"type": "ready", "session": S, "turn": None, "segment": 0},  # null for a required field
    {"type": "resume", "session": S, "sid": "x", "resume_secret": "s", "turn": 1,
     "last": {"audio": "5"}},
    {"type": "resume", "session": S, "sid": "x", "resume_secret": "s", "turn": 1,
     "last": {"voice": 5}},
    {"type": "resume", "session": S, "sid": "x", "resume_secret": "s", "turn": 1,
     "last": {"audio": -1}},
    {"type": "resume", "session": S, "sid": "x"},  # no resume_secret
    {"type": "ping", "id": 2**64},
    {"type": "ready", "session": S, "turn": -1, "segment": 0},
    {"type": "open", "session": S, "npc": "guard", "endpoint": "later"},
    {"type": "open", "session": S, "npc": "guard", "persona": "x" * 65},
    {"type": "hello", "client": "ue"},  # no protocol
    {"type": "close"},
    {"type": "dance"},
])
def test_bad_client_messages_fail(bad):
    bundle = J.build_all()["protocol.json"]
    assert errors(bad, {"$ref": "#/$defs/client"}, bundle)


@pytest.mark.parametrize("text", [
    '{"type": "open", "session": "a", "npc": "g", "sample_rate": "fast"}',
    '{"type": "open", "session": "a", "npc": "g", "sample_rate": true}',
    '{"type": "open", "session": "a", "npc": "g", "colour": 1}',
    '{"type": "ready", "session": "bad id!", "turn": 1, "segment": 0}',
    '{"type": "resume", "session": "a", "last": {"audio": "x"}}',
    '{"type": "ready", "session": "a", "turn": null, "segment": 0}',
    '{"type": "ping", "id": 18446744073709551616}',
    '{"type": "resume", "session": "a", "sid": "a.1"}',
    '{"type": "open", "session": "a", "npc": "g", "endpoint": "later"}',
    '{"type": "interrupt", "session": "a", "played_samples": -5}',
])
def test_what_the_decoder_refuses_the_schema_refuses(text):
    with pytest.raises(P.ProtocolError):
        P.decode_text(text)
    data = json.loads(text)
    assert errors(data, _schema("client", P.CLIENT_MESSAGES[data["type"]]))


# ------------------------------------------------------------------ binary frames


def test_binary_layouts_match_the_codec():
    frames = J.build_all()["binary-frames.json"]["x-frames"]
    sizes = {"mic_audio": (P.MIC_HEADER, 8), "reply_audio": (P.REPLY_AUDIO_HEADER, 28),
             "face_frames": (P.FACE_HEADER, 20)}
    for name, (st, size) in sizes.items():
        f = frames[name]
        assert f["header_size"] == st.size == size
        end = 0
        for field in f["header"]:
            assert field["offset"] == end
            end += field["size"]
        assert end == size
        assert [x["name"] for x in f["header"][:3]] == ["kind", "flags", "channel"]
    assert frames["face_frames"]["record_size"] == P.FACE_FRAME.size == 8 + 61 * 4 == 252
    assert J.build_all()["binary-frames.json"]["x-face-values"] == list(FACE_VALUE_NAMES)


def test_binary_layout_offsets_decode_an_encoded_frame():
    frames = J.build_all()["binary-frames.json"]["x-frames"]
    fmt = {"u8": "<B", "u16": "<H", "u32": "<I", "u64": "<Q"}
    values = np.arange(2 * NUM_FACE_VALUES, dtype=np.float32).reshape(2, NUM_FACE_VALUES)
    encoded = {
        "mic_audio": (P.MicAudio(channel=7, seq=99, pcm=b"\x01\x02"), {"seq": 99}),
        "reply_audio": (P.ReplyAudio(7, 3, 12, 2, 22050, 123456789012, b"\0\0", 1),
                        {"turn": 3, "seq": 12, "segment": 2, "sample_rate": 22050,
                         "sample": 123456789012}),
        "face_frames": (P.FaceFrames(7, 3, 5, 2, np.array([368, 735], np.uint64), values),
                        {"turn": 3, "seq": 5, "segment": 2, "frame_count": 2,
                         "value_count": NUM_FACE_VALUES}),
    }
    for name, (frame, want) in encoded.items():
        data = frame.encode()
        got = {f["name"]: struct.unpack_from(fmt[f["type"]], data, f["offset"])[0]
               for f in frames[name]["header"]}
        assert got["kind"] == frames[name]["kind"] and got["channel"] == 7
        for k, v in want.items():
            assert got[k] == v, (name, k)
    face = frames["face_frames"]
    data = encoded["face_frames"][0].encode()
    second = face["header_size"] + face["record_size"]
    assert struct.unpack_from("<Q", data, second)[0] == 735
    assert struct.unpack_from("<f", data, second + 8 + 4 * 60)[0] == values[1, 60]


# ------------------------------------------------------------------ docs/protocol.md


def _doc() -> str:
    if not DOC.exists():
        pytest.skip("docs/protocol.md not written yet")
    return DOC.read_text(encoding="utf-8")


def test_doc_json_examples_are_exact_wire_messages():
    blocks = re.findall(r"```json\n(.*?)```", _doc(), re.S)
    assert blocks
    registry = {**P.CLIENT_MESSAGES, **P.SERVER_MESSAGES}
    bundle = J.build_all()["protocol.json"]
    seen = set()
    for block in blocks:
        for line in block.strip().splitlines():
            data = json.loads(line)
            cls = registry[data["type"]]
            reg = P.CLIENT_MESSAGES if cls.TYPE in P.CLIENT_MESSAGES else P.SERVER_MESSAGES
            msg = P.decode_text(line, reg)
            assert P.encode(msg) == line, f"not the codec's own encoding: {line}"
            assert errors(data, bundle) == [], line
            seen.add(cls.TYPE)
    assert seen == set(registry), f"no example for {set(registry) - seen}"


def test_doc_face_table_is_in_wire_order():
    rows = re.findall(r"^\| (\d+) \| `(\w+)` \|", _doc(), re.M)
    assert [int(i) for i, _ in rows] == list(range(NUM_FACE_VALUES))
    assert tuple(name for _, name in rows) == FACE_VALUE_NAMES


def test_doc_names_every_error_code_and_struct_size():
    doc = _doc()
    for k, code in vars(P.ErrorCode).items():
        if k.isupper():
            assert f"`{code}`" in doc, code
    for size in ("== 8", "== 28", "== 20", "== 252"):
        assert size in doc
