import json

import numpy as np
import pytest

from schemas import protocol as P
from schemas.protocol import ErrorCode, ProtocolError


def test_json_round_trip_of_every_client_message():
    msgs = [
        P.Hello(client="ue", token="t"),
        P.OpenSession(session="npc-1", npc="guard", sample_rate=48000, channels=2,
                      format="f32le"),
        P.CloseSession(session="npc-1"),
        P.EndOfUtterance(session="npc-1"),
        P.Ready(session="npc-1", turn=2, segment=1),
        P.Interrupt(session="npc-1", played_samples=1234),
        P.Resume(session="npc-1", sid="npc-1.ab", turn=3, last={"audio": 5, "face": 9}),
        P.Ping(id=7),
    ]
    for m in msgs:
        assert P.decode_text(P.encode(m)) == m


def test_server_messages_decode_with_their_registry():
    m = P.Transcript(session="a", turn=1, seq=2, text="hi", final=True, start_sample=0,
                     end_sample=10)
    assert P.decode_text(P.encode(m), P.SERVER_MESSAGES) == m


@pytest.mark.parametrize("text,code", [
    ("{not json", ErrorCode.BAD_JSON),
    ("[1, 2]", ErrorCode.BAD_MESSAGE),
    ('{"no": "type"}', ErrorCode.BAD_MESSAGE),
    ('{"type": "dance"}', ErrorCode.UNKNOWN_TYPE),
    ('{"type": "open", "session": "a", "npc": "g", "sample_rate": "fast"}', ErrorCode.BAD_MESSAGE),
    ('{"type": "open", "session": "a", "npc": "g", "sample_rate": true}', ErrorCode.BAD_MESSAGE),
    ('{"type": "open", "session": "a", "npc": "g", "colour": 1}', ErrorCode.BAD_MESSAGE),
    ('{"type": "ready", "session": "bad id!", "turn": 1, "segment": 0}', ErrorCode.BAD_MESSAGE),
    ('{"type": "resume", "session": "a", "last": {"audio": "x"}}', ErrorCode.BAD_MESSAGE),
])
def test_bad_text_is_refused_with_a_code(text, code):
    with pytest.raises(ProtocolError) as err:
        P.decode_text(text)
    assert err.value.code == code
    assert err.value.message


@pytest.mark.parametrize("kw,code", [
    ({"format": "mp3"}, ErrorCode.UNSUPPORTED_FORMAT),
    ({"sample_rate": 0}, ErrorCode.BAD_SAMPLE_RATE),
    ({"sample_rate": 500_000}, ErrorCode.BAD_SAMPLE_RATE),
    ({"channels": 0}, ErrorCode.BAD_CHANNELS),
    ({"channels": 9}, ErrorCode.BAD_CHANNELS),
    ({"npc": ""}, ErrorCode.BAD_MESSAGE),
    ({"endpoint": "whenever"}, ErrorCode.BAD_MESSAGE),
])
def test_open_validation(kw, code):
    args = dict(session="a", npc="guard", sample_rate=16000, channels=1, format="s16le")
    args.update(kw)
    with pytest.raises(ProtocolError) as err:
        P.validate_open(P.OpenSession(**args))
    assert err.value.code == code


def test_binary_frames_round_trip_little_endian():
    mic = P.MicAudio(channel=3, seq=77, pcm=b"\x01\x02\x03\x04")
    raw = mic.encode()
    assert raw[:8] == bytes([1, 0, 3, 0, 77, 0, 0, 0])
    assert P.decode_binary(raw) == mic

    audio = P.ReplyAudio(channel=2, turn=4, seq=9, segment=1, sample_rate=22050, sample=44100,
                         pcm=b"\x00\x01" * 10, flags=P.FLAG_LAST_IN_SEGMENT)
    raw = audio.encode()
    assert len(raw) == P.REPLY_AUDIO_HEADER.size + 20 == 28 + 20
    assert P.decode_binary(raw) == audio

    values = np.random.default_rng(0).random((3, 61), dtype=np.float32)
    face = P.FaceFrames(channel=2, turn=4, seq=1, segment=0,
                        samples=np.array([0, 368, 735], np.uint64), values=values)
    raw = face.encode()
    assert len(raw) == P.FACE_HEADER.size + 3 * (8 + 61 * 4)
    back = P.decode_binary(raw)
    assert back.samples.tolist() == [0, 368, 735]
    np.testing.assert_array_equal(back.values, values)


def test_short_binary_frame_is_refused():
    with pytest.raises(ProtocolError) as err:
        P.decode_binary(b"\x01")
    assert err.value.code == ErrorCode.BAD_AUDIO


def test_to_dict_drops_unset_optionals():
    d = P.ErrorEvent(code="x", message="y").to_dict()
    assert d == {"type": "error", "code": "x", "message": "y"}
    assert json.loads(P.encode(P.Pong())) == {"type": "pong"}


@pytest.mark.parametrize("text,deep", [
    ("[" * 17 + "]" * 17, True),
    ("[" * 16 + "]" * 16, False),
    ('{"a":"' + "[" * 100 + '"}', False),  # brackets inside a string do not nest
    ('{"a":"\\"' + "[" * 100 + '"}', False),  # nor after an escaped quote
    ("[" + "[]," * 1000 + "[]]", False),  # wide is fine
])
def test_json_depth(text, deep):
    assert P.json_depth_exceeds(text) is deep


def test_deep_json_is_bad_message_not_recursion_error():
    with pytest.raises(P.ProtocolError) as err:
        P.decode_text("[" * 100_000 + "]" * 100_000)
    assert err.value.code == ErrorCode.BAD_MESSAGE
