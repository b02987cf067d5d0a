"""The conformance kit: the checked-in vectors and C++ structs equal a fresh generation, the
Python codec decodes every vector as it says, and the C++17 codec in clients/cpp/ (compiled
with the system compiler) does too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import fields

import numpy as np
import pytest

from gateway.core import ConnectionCore, Limits
from schemas import jsonschema as J
from schemas import protocol as P
from schemas import vectors as V
from schemas.protocol import ProtocolError
from schemas.streams import CHANNELS
from tests.unit.test_jsonschema import errors

VECTORS = json.loads(V.VECTORS.read_text(encoding="utf-8"))
CPP_DIR = V.ROOT / "clients" / "cpp"


def test_checked_in_files_equal_a_fresh_generation():
    assert V.VECTORS.read_text(encoding="utf-8") == V.dump(V.build()), \
        "stale vectors; run: python -m schemas.vectors"
    assert V.CPP_MESSAGES.read_text(encoding="utf-8") == V.cpp_messages(), \
        "stale parley_messages.hpp; run: python -m schemas.vectors"


def test_vectors_cover_every_frame_kind_and_message():
    kinds = {v["expect"]["kind"] for v in VECTORS["binary"] if "expect" in v}
    assert kinds == {P.FrameKind.MIC_AUDIO, P.FrameKind.REPLY_AUDIO, P.FrameKind.FACE_FRAMES}
    assert any("error" in v for v in VECTORS["binary"])
    valid = {(v["direction"], v["expect"]["type"]) for v in VECTORS["json"] if "expect" in v}
    assert valid == ({("client->server", t) for t in P.CLIENT_MESSAGES}
                     | {("server->client", t) for t in P.SERVER_MESSAGES})
    refused = {v["name"].split(".")[0] for v in VECTORS["json"] if "error" in v}
    assert set(P.CLIENT_MESSAGES) <= refused
    names = [v["name"] for v in VECTORS["binary"] + VECTORS["json"]]
    assert len(names) == len(set(names))


def _decoded(frame) -> dict:
    d = {"kind": {P.MicAudio: 1, P.ReplyAudio: 2, P.FaceFrames: 3}[type(frame)],
         "flags": frame.flags, "channel": frame.channel}
    if isinstance(frame, P.MicAudio):
        return {**d, "seq": frame.seq, "pcm": frame.pcm.hex()}
    d.update(turn=frame.turn, seq=frame.seq, segment=frame.segment)
    if isinstance(frame, P.ReplyAudio):
        return {**d, "sample_rate": frame.sample_rate, "sample": frame.sample,
                "pcm": frame.pcm.hex()}
    return {**d, "frame_count": len(frame.samples), "value_count": frame.values.shape[1],
            "records": [{"sample": int(s), "values": [float(x) for x in row]}
                        for s, row in zip(frame.samples, frame.values, strict=True)]}


@pytest.mark.parametrize("vector", VECTORS["binary"], ids=lambda v: v["name"])
def test_python_codec_decodes_every_binary_vector(vector):
    data = bytes.fromhex(vector["hex"])
    if "error" in vector:
        with pytest.raises(ProtocolError) as exc:
            P.decode_binary(data)
        assert exc.value.code == vector["error"], exc.value.message
        return
    frame = P.decode_binary(data)
    assert _decoded(frame) == vector["expect"]
    if isinstance(frame, P.FaceFrames):
        frame.samples = frame.samples.astype(np.uint64)
    assert frame.encode() == data  # and the encoder writes exactly these bytes


def _gateway_verdict(text: str, direction: str) -> dict:
    """What the gateway (client messages) or a client (server messages) makes of a text frame:
    the decoding; a hello also goes through the gateway's own connection logic, which refuses
    a protocol version it does not speak."""
    if direction == "server->client":
        return P.decode_text(text, P.SERVER_MESSAGES, strict=False).to_dict()
    msg = P.decode_text(text)
    if isinstance(msg, P.Hello):
        [answer] = ConnectionCore(Limits(), {}).receive_text(text, 0.0)
        if isinstance(answer.message, P.ErrorEvent):
            raise ProtocolError(answer.message.code, answer.message.message)
    return msg.to_dict()


def test_resume_channels_are_the_stored_channels():
    last = next(f for f in fields(P.Resume) if f.name == "last")
    assert set(last.metadata["keys"]) == set(CHANNELS)


def test_every_rule_of_every_client_field_has_vectors():
    """A rule added to a field's metadata gets vectors without touching schemas/vectors.py."""
    names = {v["name"] for v in VECTORS["json"]}
    for cls in P.CLIENT_MESSAGES.values():
        for f in fields(cls):
            meta = f.metadata
            if meta.get("required"):
                assert f"{cls.TYPE}.{f.name}.missing" in names
            for rule, label in (("minimum", "below_minimum"), ("maximum", "above_maximum"),
                                ("enum", "not_in_enum"), ("pattern", "bad_id_1"),
                                ("keys", "unknown_key")):
                if rule in meta:
                    assert f"{cls.TYPE}.{f.name}.{label}" in names, (cls.TYPE, f.name, rule)


def test_over_deep_json_is_refused_before_parsing():
    deep = next(v for v in VECTORS["json"] if v["name"] == "text.nested_far_too_deep")
    with pytest.raises(ProtocolError) as exc:
        P.decode_text(deep["text"])
    assert exc.value.code == P.ErrorCode.BAD_MESSAGE
    assert "nested deeper" in exc.value.message


@pytest.mark.parametrize("vector", VECTORS["json"], ids=lambda v: v["name"])
def test_python_codec_decodes_every_json_vector(vector):
    if "error" in vector:
        with pytest.raises(ProtocolError) as exc:
            _gateway_verdict(vector["text"], vector["direction"])
        assert exc.value.code == vector["error"], exc.value.message
        return
    assert _gateway_verdict(vector["text"], vector["direction"]) == vector["expect"]


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def test_cpp_codec_passes_the_binary_vectors(tmp_path):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler ($CXX, c++, g++ or clang++) on PATH, so the C++17 codec "
                    "in clients/cpp/ is not checked; `bash scripts/bootstrap.sh dev` installs "
                    "g++ from Debian packages")
    exe = tmp_path / "conformance"
    build = subprocess.run(
        [cxx, "-std=c++17", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-O1",
         str(CPP_DIR / "conformance_test.cpp"), "-o", str(exe)],
        capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    # the headers alone stay clean under the stricter warnings game engines build with
    unit = tmp_path / "headers.cpp"
    unit.write_text('#include "parley_protocol.hpp"\n#include "parley_messages.hpp"\n'
                    "int main() { parley::Frame f; return parley::Decode(nullptr, 0, f) == "
                    "parley::DecodeError::BadAudio ? 0 : 1; }\n")
    strict = subprocess.run(
        [cxx, "-std=c++17", f"-I{CPP_DIR}", "-Wall", "-Wextra", "-Wpedantic", "-Wconversion",
         "-Wsign-conversion", "-Wshadow", "-Wold-style-cast", "-Werror", str(unit), "-o",
         str(tmp_path / "headers")], capture_output=True, text=True, timeout=300)
    assert strict.returncode == 0, strict.stderr
    run = subprocess.run([str(exe), str(V.VECTORS)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    n = len(VECTORS["binary"])
    assert f"{n} of {n} binary vectors passed" in run.stdout, run.stdout
    m = sum("expect" in v for v in VECTORS["json"])
    assert f"{m} of {m} valid JSON vectors match the structs" in run.stdout, run.stdout


def _schemas() -> dict:
    return {name.removesuffix(".json"): schema for name, schema in J.build_all().items()}


NEWLINE_ID = "bad_id_" + str(V.BAD_IDS.index("guard-01\n") + 1)
RULE_CODES = {P.ErrorCode.BAD_MESSAGE, P.ErrorCode.BAD_SAMPLE_RATE, P.ErrorCode.BAD_CHANNELS,
              P.ErrorCode.UNSUPPORTED_FORMAT}


def test_vectors_agree_with_the_json_schemas():
    """Vectors, codec and the published JSON Schemas say the same: a valid message is valid
    under its schema, a message refused for its fields is not."""
    schemas, checked = _schemas(), 0
    for v in VECTORS["json"]:
        try:
            data = json.loads(v["text"])
        except (ValueError, RecursionError):  # not JSON, or too deep for Python's parser
            continue
        side = "client" if v["direction"] == "client->server" else "server"
        if not isinstance(data, dict) or f"{side}.{data.get('type')}" not in schemas:
            continue
        schema = schemas[f"{side}.{data['type']}"]
        # a client takes null for an optional server field; the schema says a server never sends it
        lenient = side == "server" and v["name"].endswith("optional_fields_null")
        if "expect" in v and not lenient:
            assert errors(data, schema) == [], v["name"]
            checked += 1
        # the jsonschema package matches patterns with Python's re.search, whose `$` also
        # matches before a final newline (ECMA-262's, which JSON Schema means, does not)
        if v["name"].endswith(NEWLINE_ID):
            continue
        # JSON Schema counts 7.0 as an integer; the codec, stricter, refuses it
        if any(isinstance(x, float) and x.is_integer() for x in data.values()):
            continue
        if v.get("error") in RULE_CODES:
            assert errors(data, schema) != [], v["name"]
            checked += 1
    assert checked > 300


def test_the_gateway_answers_each_refused_vector_with_its_code():
    """Not only the codec: the gateway's connection logic sends exactly this error code, once,
    and stays usable (a ping right after is answered)."""
    refused = [v for v in VECTORS["json"] if v["direction"] == "client->server" and "error" in v]
    assert len(refused) > 200
    for v in refused:
        core = ConnectionCore(Limits(), {})
        [answer] = core.receive_text(v["text"], 0.0)
        assert isinstance(answer.message, P.ErrorEvent), v["name"]
        assert answer.message.code == v["error"], (v["name"], answer.message.message)
        [pong] = core.receive_text('{"type":"ping","id":1}', 0.0)
        assert pong.message == P.Pong(id=1), v["name"]
