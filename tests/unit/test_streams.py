import numpy as np

from schemas.streams import (
    EventEntry,
    FaceEntry,
    Job,
    Keys,
    Mark,
    MicEntry,
    ReplyEntry,
    SessionMeta,
    TranscriptEntry,
    VoiceEntry,
    mic_id,
    parse_id,
)


def bytes_fields(d):
    """As redis-py returns them: bytes keys and values."""
    return {k.encode(): (v if isinstance(v, bytes) else str(v).encode()) for k, v in d.items()}


def test_keys_share_a_hash_tag_per_session_and_for_jobs():
    k = Keys("parley")
    assert k.session("s1", "mic") == "parley:s:{s1}:mic"
    assert k.session("s1", "face").startswith("parley:s:{s1}")
    assert "{jobs}" in k.jobs("stt") and "{jobs}" in k.dead("llm")


def test_codecs_round_trip_through_redis_bytes():
    job = Job(stage="llm", sid="a.1", turn=3, cursor="12-0", attempt=2, text="who are you")
    back = Job.from_fields(b"1-1", bytes_fields(job.to_fields()))
    assert (back.stage, back.sid, back.turn, back.cursor, back.attempt, back.text, back.id) == \
        ("llm", "a.1", 3, "12-0", 2, "who are you", "1-1")

    meta = SessionMeta(sid="a.1", session="a", npc="guard", persona="guard", voice="en-us",
                       sample_rate=48000, channels=2, format="f32le")
    assert SessionMeta.from_fields(bytes_fields(meta.to_fields())) == meta

    t = TranscriptEntry(text="hello", final=True, start_sample=10, end_sample=99, mic_seq=5)
    assert TranscriptEntry.from_fields(bytes_fields(t.to_fields())) == t

    r = ReplyEntry(segment=2, text="Halt.", end=False)
    assert ReplyEntry.from_fields(bytes_fields(r.to_fields())) == r
    done = ReplyEntry(segment=3, text="Halt. Who goes there?", end=True, backend="openai")
    assert ReplyEntry.from_fields(bytes_fields(done.to_fields())) == done
    assert "backend" not in r.to_fields()  # fragments stay as small as before

    v = VoiceEntry(segment=1, sample=2205, rate=22050, pcm=b"\x01\x00" * 8, last_in_segment=True,
                   marks=[Mark("phoneme", 2210, "h"), Mark("word", 2205, "Halt")])
    vb = VoiceEntry.from_fields(bytes_fields(v.to_fields()))
    assert vb == v and vb.num_samples == 8

    f = FaceEntry(segment=1, samples=np.array([0, 368], np.int64),
                  values=np.arange(122, dtype=np.float32).reshape(2, 61), first_index=7)
    fb = FaceEntry.from_fields(bytes_fields(f.to_fields()))
    assert fb.segment == 1 and fb.first_index == 7 and not fb.end
    np.testing.assert_array_equal(fb.values, f.values)

    e = EventEntry(kind="error", turn=4, code="turn_failed", message="boom")
    assert EventEntry.from_fields(bytes_fields(e.to_fields())) == e


def test_mic_ids_put_end_of_utterance_after_its_chunk():
    assert mic_id(7) == "7-0" and mic_id(7, control=True) == "7-1"
    assert parse_id(b"7-1") == (7, 1)
    m = MicEntry.from_entry(b"7-1", bytes_fields(MicEntry(seq=7, end_of_utterance=True)
                                                 .to_fields()))
    assert m.end_of_utterance and m.seq == 7


def test_control_entry_round_trip_keeps_no_secret():
    from schemas.streams import ControlEntry

    for entry in (ControlEntry("ready", turn=2, segment=3),
                  ControlEntry("interrupt", turn=1, played=22050, code="answer"),
                  ControlEntry("interrupt", played=-1, code="too_late"),
                  ControlEntry("open", data={"npc": "guard", "sample_rate": 16000}),
                  ControlEntry("close")):
        assert ControlEntry.from_fields(bytes_fields(entry.to_fields())) == entry
    resume = ControlEntry("resume", data={"turn": 1, "last": {"audio": 3}})
    assert "secret" not in str(resume.to_fields())
