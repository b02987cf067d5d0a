import csv

import numpy as np
import pytest
import redis
import soundfile as sf

from parley.export import (
    LIVE_LINK_CSV_COLUMNS,
    export_turns,
    livelink_timecode,
    write_livelink_csv,
)
from parley.redis_server import RedisServer
from schemas.arkit import FACE_VALUE_NAMES, INDEX
from schemas.streams import FaceEntry, Keys, VoiceEntry

RATE = 22050
SID = "guard-1.abc"


@pytest.fixture(scope="module")
def server():
    s = RedisServer(appendonly=False).start()
    yield s
    s.stop()


def frame_samples(n: int) -> np.ndarray:
    return np.array([round(i * RATE / 60) for i in range(n)], np.int64)


def face_values(n: int) -> np.ndarray:
    v = np.zeros((n, 61), np.float32)
    v[:, INDEX["JawLeft"]] = 0.25
    v[:, INDEX["JawRight"]] = 0.75
    v[:, INDEX["MouthLeft"]] = 0.125
    v[:, INDEX["MouthRight"]] = 0.875
    v[:, INDEX["JawOpen"]] = np.arange(n) / n
    v[:, INDEX["HeadYaw"]] = -0.5
    return v


def store_turn(r, keys, turn: int, chunks: list[tuple[int, int]], frames: int,
               tone: int) -> np.ndarray:
    """Voice chunks (segment, n samples) and face frames, with explicit IDs as the workers do."""
    seq, sample, parts = 0, 0, []
    for i, (segment, n) in enumerate(chunks):
        pcm = (np.arange(n) % 100 * tone).astype(np.int16)
        last = i + 1 == len(chunks) or chunks[i + 1][0] != segment
        seq += 1
        r.xadd(keys.session(SID, "voice"),
               VoiceEntry(segment=segment, sample=sample, rate=RATE, pcm=pcm.tobytes(),
                          last_in_segment=last).to_fields(), id=f"{turn}-{seq}")
        sample += n
        parts.append(pcm)
    r.xadd(keys.session(SID, "voice"),
           VoiceEntry(segment=chunks[-1][0], sample=sample, rate=RATE, end=True).to_fields(),
           id=f"{turn}-{seq + 1}")
    s, v = frame_samples(frames), face_values(frames)
    half = frames // 2
    for k, (a, b) in enumerate(((0, half), (half, frames)), start=1):
        r.xadd(keys.session(SID, "face"),
               FaceEntry(segment=k, samples=s[a:b], values=v[a:b], first_index=a).to_fields(),
               id=f"{turn}-{k}")
    r.xadd(keys.session(SID, "face"),
           FaceEntry(segment=2, samples=np.zeros(0, np.int64), values=np.zeros((0, 61)),
                     first_index=frames, end=True).to_fields(), id=f"{turn}-3")
    return np.concatenate(parts)


@pytest.fixture(scope="module")
def stored(server):
    keys = Keys("test")
    r = redis.Redis.from_url(server.url)
    r.flushdb()
    one = store_turn(r, keys, 1, [(1, 11025), (1, 11025), (2, 22050)], 120, tone=3)
    three = store_turn(r, keys, 3, [(1, 4410)], 12, tone=5)
    r.close()
    return server.url, {1: one, 3: three}


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_export_writes_wav_and_csv_per_turn(stored, tmp_path):
    url, pcm = stored
    paths = export_turns(url, SID, None, tmp_path, prefix="test")
    assert [p.name for p in paths] == ["turn-1.wav", "turn-1.csv", "turn-3.wav", "turn-3.csv"]

    info = sf.info(str(tmp_path / "turn-1.wav"))
    assert (info.samplerate, info.channels, info.subtype) == (RATE, 1, "PCM_16")
    assert info.frames == 44100 and info.duration == pytest.approx(2.0)
    data, _ = sf.read(str(tmp_path / "turn-1.wav"), dtype="int16")
    np.testing.assert_array_equal(data, pcm[1])

    rows = read_csv(tmp_path / "turn-1.csv")
    header, body = rows[0], rows[1:]
    assert header == ["Timecode", "BlendShapeCount", *LIVE_LINK_CSV_COLUMNS]
    assert header[2:4] == ["EyeBlinkLeft", "EyeLookDownLeft"]
    # the app's order swaps these two pairs relative to EARFaceBlendShape
    assert header[17:19] == ["JawRight", "JawLeft"]
    assert header[23:25] == ["MouthRight", "MouthLeft"]
    assert header[-9:] == list(FACE_VALUE_NAMES[52:])
    assert len(body) == 120 and all(len(r) == 63 and r[1] == "61" for r in body)

    by_name = [dict(zip(header, r, strict=True)) for r in body]
    assert float(by_name[7]["JawLeft"]) == pytest.approx(0.25)
    assert float(by_name[7]["JawRight"]) == pytest.approx(0.75)
    assert float(by_name[7]["MouthLeft"]) == pytest.approx(0.125)
    assert float(by_name[7]["MouthRight"]) == pytest.approx(0.875)
    assert float(by_name[7]["HeadYaw"]) == pytest.approx(-0.5)
    assert float(by_name[60]["JawOpen"]) == pytest.approx(0.5)

    assert body[0][0] == "00:00:00:00.000" and body[60][0] == "00:00:01:00.000"
    assert body[1][0] == "00:00:00:01.001"  # sample 368 of 22050 Hz: 1.0014 frames
    for i, r in enumerate(body):  # read back as Unreal's importer does: h:m:s + frames / 60
        h, m, s, f = r[0].split(":")
        t = int(h) * 3600 + int(m) * 60 + int(s) + float(f) / 60
        assert t == pytest.approx(frame_samples(120)[i] / RATE, abs=1e-5)

    assert sf.info(str(tmp_path / "turn-3.wav")).frames == 4410
    assert len(read_csv(tmp_path / "turn-3.csv")) == 13


def test_export_one_turn_and_refusals(stored, tmp_path):
    url, _ = stored
    paths = export_turns(url, SID, 3, tmp_path / "out", prefix="test")
    assert [p.name for p in paths] == ["turn-3.wav", "turn-3.csv"]
    with pytest.raises(LookupError, match="turn 2"):
        export_turns(url, SID, 2, tmp_path, prefix="test")
    with pytest.raises(LookupError, match="no reply audio"):
        export_turns(url, "nobody.x", None, tmp_path, prefix="test")
    with pytest.raises(LookupError):
        export_turns(url, SID, None, tmp_path, prefix="other")


def test_write_livelink_csv_takes_the_clients_lists(tmp_path):
    s, v = frame_samples(10), face_values(10)
    path = tmp_path / "face.csv"
    assert write_livelink_csv(path, [s[:4], s[4:]], [v[:4], v[4:]], RATE) == 10
    rows = read_csv(path)
    assert len(rows) == 11 and float(rows[3][rows[0].index("JawRight")]) == pytest.approx(0.75)
    assert write_livelink_csv(tmp_path / "empty.csv", [], [], RATE) == 0
    assert read_csv(tmp_path / "empty.csv")[0][:2] == ["Timecode", "BlendShapeCount"]
    with pytest.raises(ValueError):
        write_livelink_csv(path, s[:3], v, RATE)


def test_timecode_carries_into_seconds_minutes_hours():
    assert livelink_timecode(0, RATE) == "00:00:00:00.000"
    assert livelink_timecode(RATE - 1, RATE) == "00:00:00:59.997"
    assert livelink_timecode(RATE * 61, RATE) == "00:01:01:00.000"
    assert livelink_timecode(RATE * 3600 + RATE // 2, RATE) == "01:00:00:30.000"
    assert livelink_timecode(1, 48000) == "00:00:00:00.001"  # 1/800 frame rounds to .001
