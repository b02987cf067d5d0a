"""`parley export`: a stored session's replies as WAV + Live Link Face CSV, per turn.

The CSV is the one the Live Link Face app exports and Unreal's Live Link Face importer
(``ULiveLinkFaceImporterFactory::LoadCSV``/``ParseTimecode``/``InferFrameRate`` in Epic's
LiveLinkFaceImporterFactory.cpp, LiveLinkFaceImporter plugin) turns into a Level Sequence:
header ``Timecode,BlendShapeCount,<61 names>``, one row per frame. The importer takes property
names from the header (so values are matched by name), reads ``Timecode`` as
``hh:mm:ss:frame.zzz`` and has no frame-rate field: it assumes 60 fps only if some row's frame
field exceeds 30, else 30 fps. A turn shorter than 31 frames (~0.5 s) therefore imports at
half speed; longer turns import at 60 fps.

Timecodes count from sample 0 of the turn's reply audio, so the WAV and the CSV start together.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import redis
import soundfile as sf

from core.redisconn import connect_sync
from schemas.arkit import FACE_VALUE_NAMES, INDEX, NUM_FACE_VALUES
from schemas.streams import FaceEntry, Keys, VoiceEntry, parse_id

# Column order of the Live Link Face app's CSV export: the EARFaceBlendShape order except for two
# swapped pairs, JawRight before JawLeft and MouthRight before MouthLeft. Taken from a take the app
# exported (repository alexdjulin/LiveLinkFace-CSV-Retarget-For-Motionbuilder, anim/S07-001.csv),
# which also shows the row format: "12:27:47:47.169,61,<values with 10 decimals>". Unreal's
# importer maps columns by header name, so the names, not the order, decide the curves.
LIVE_LINK_CSV_COLUMNS: tuple[str, ...] = (
    "EyeBlinkLeft", "EyeLookDownLeft", "EyeLookInLeft", "EyeLookOutLeft", "EyeLookUpLeft",
    "EyeSquintLeft", "EyeWideLeft",
    "EyeBlinkRight", "EyeLookDownRight", "EyeLookInRight", "EyeLookOutRight", "EyeLookUpRight",
    "EyeSquintRight", "EyeWideRight",
    "JawForward", "JawRight", "JawLeft", "JawOpen",
    "MouthClose", "MouthFunnel", "MouthPucker", "MouthRight", "MouthLeft",
    "MouthSmileLeft", "MouthSmileRight", "MouthFrownLeft", "MouthFrownRight",
    "MouthDimpleLeft", "MouthDimpleRight", "MouthStretchLeft", "MouthStretchRight",
    "MouthRollLower", "MouthRollUpper", "MouthShrugLower", "MouthShrugUpper",
    "MouthPressLeft", "MouthPressRight", "MouthLowerDownLeft", "MouthLowerDownRight",
    "MouthUpperUpLeft", "MouthUpperUpRight",
    "BrowDownLeft", "BrowDownRight", "BrowInnerUp", "BrowOuterUpLeft", "BrowOuterUpRight",
    "CheekPuff", "CheekSquintLeft", "CheekSquintRight", "NoseSneerLeft", "NoseSneerRight",
    "TongueOut",
    "HeadYaw", "HeadPitch", "HeadRoll",
    "LeftEyeYaw", "LeftEyePitch", "LeftEyeRoll", "RightEyeYaw", "RightEyePitch", "RightEyeRoll",
)
assert sorted(LIVE_LINK_CSV_COLUMNS) == sorted(FACE_VALUE_NAMES)

# For each CSV column, the index of its value in a face frame (enum order).
_CSV_FROM_ENUM = np.array([INDEX[name] for name in LIVE_LINK_CSV_COLUMNS], dtype=np.intp)
_MAX_ID = 2**63 - 1


def livelink_timecode(sample: int, rate: int, fps: int = 60) -> str:
    """``HH:MM:SS:FF.mmm`` for a reply-audio sample: whole frames plus thousandths of a frame.

    Exact integer arithmetic (rounded to the nearest thousandth of a frame) so that a carry
    from .999 rolls into the next frame, second and minute instead of printing ``:60``.
    """
    sample = max(0, int(sample))  # nothing plays before the reply starts
    milli = (2 * sample * fps * 1000 + rate) // (2 * rate)
    frames, sub = divmod(milli, 1000)
    seconds, ff = divmod(frames, fps)
    minutes, ss = divmod(seconds, 60)
    hh, mm = divmod(minutes, 60)
    return f"{hh:02d}:{mm:02d}:{ss:02d}:{ff:02d}.{sub:03d}"


def _rows(x, dtype, tail: tuple[int, ...]) -> np.ndarray:
    # Accept one array or the client's list of per-message arrays.
    if isinstance(x, (list, tuple)):
        if not x:
            return np.zeros((0, *tail), dtype)
        if np.ndim(x[0]) == 1 + len(tail):
            return np.concatenate([np.asarray(a, dtype=dtype) for a in x])
    return np.asarray(x, dtype=dtype)


def write_livelink_csv(path: str | Path, samples: np.ndarray | Sequence[np.ndarray],
                       values: np.ndarray | Sequence[np.ndarray], rate: int,
                       fps: int = 60) -> int:
    """Write face frames (values in enum order) as a Live Link Face CSV; returns the row count.

    ``samples`` are reply-audio sample positions (n,) and ``values`` float (n, 61) in
    FACE_VALUE_NAMES order; either may also be a list of such arrays, as the client keeps them.
    """
    s = _rows(samples, np.int64, ()).reshape(-1)
    v = _rows(values, np.float32, (NUM_FACE_VALUES,)).reshape(-1, NUM_FACE_VALUES)
    if len(s) != len(v):
        raise ValueError(f"{len(s)} samples for {len(v)} face frames")
    if rate <= 0 or fps <= 0:
        raise ValueError("rate and fps must be positive")
    order = np.argsort(s, kind="stable")
    lines = ["Timecode,BlendShapeCount," + ",".join(LIVE_LINK_CSV_COLUMNS)]
    for i in order:
        row = v[i, _CSV_FROM_ENUM]
        lines.append(f"{livelink_timecode(int(s[i]), rate, fps)},{NUM_FACE_VALUES},"
                     + ",".join(f"{x:.10f}" for x in row))
    Path(path).write_text("\n".join(lines) + "\n")
    return len(order)


# --------------------------------------------------------------------------- Redis


def _turns(r: redis.Redis, key: str) -> list[int]:
    """Turns present in a ``<turn>-<seq>`` stream, reading one entry per turn, not the audio."""
    turns: list[int] = []
    start = "-"
    while True:
        head = r.xrange(key, start, "+", count=1)
        if not head:
            return turns
        turn, _ = parse_id(head[0][0])
        turns.append(turn)
        start = f"{turn + 1}-0"


def _turn_range(r: redis.Redis, key: str, turn: int) -> list:
    return r.xrange(key, f"{turn}-0", f"{turn}-{_MAX_ID}")


def _voice(entries: list) -> tuple[np.ndarray, int]:
    """The turn's reply audio, each chunk placed at its ``sample`` (gaps stay silent)."""
    chunks = [VoiceEntry.from_fields(f) for _, f in entries]
    rates = {c.rate for c in chunks if c.rate > 0}
    if len(rates) > 1:
        raise ValueError(f"reply audio changes sample rate within a turn: {sorted(rates)}")
    rate = rates.pop() if rates else 0
    total = max([c.sample + c.num_samples for c in chunks] + [c.sample for c in chunks if c.end],
                default=0)
    pcm = np.zeros(total, np.int16)
    for c in chunks:
        if not c.end and c.num_samples:
            pcm[c.sample:c.sample + c.num_samples] = np.frombuffer(c.pcm, dtype="<i2")
    return pcm, rate


def _face(entries: list) -> tuple[np.ndarray, np.ndarray]:
    faces = [FaceEntry.from_fields(f) for _, f in entries]
    faces = [f for f in faces if not f.end and len(f.samples)]
    if not faces:
        return np.zeros(0, np.int64), np.zeros((0, NUM_FACE_VALUES), np.float32)
    return (np.concatenate([f.samples for f in faces]),
            np.concatenate([f.values for f in faces]))


def export_turns(redis_url: str, sid: str, turn: int | None, out_dir: Path,
                 prefix: str = "parley") -> list[Path]:
    """Write ``turn-<T>.wav`` and ``turn-<T>.csv`` for each reply turn (or just ``turn``).

    Raises LookupError when the session has no stored reply audio (unknown, expired, or no reply
    yet) or lacks the requested turn.
    """
    keys = Keys(prefix)
    voice_key, face_key = keys.session(sid, "voice"), keys.session(sid, "face")
    r = connect_sync(redis_url)
    try:
        present = _turns(r, voice_key)
        if not present:
            raise LookupError(f"session {sid!r}: no reply audio stored (unknown or expired "
                              "session, or no reply yet)")
        if turn is not None:
            if turn not in present:
                raise LookupError(f"session {sid!r} has no reply for turn {turn}; "
                                  f"stored turns: {present}")
            present = [turn]
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: list[Path] = []
        for t in present:
            pcm, rate = _voice(_turn_range(r, voice_key, t))
            if rate <= 0:
                raise ValueError(f"session {sid!r} turn {t}: reply audio has no sample rate")
            samples, values = _face(_turn_range(r, face_key, t))
            wav, csv = out / f"turn-{t}.wav", out / f"turn-{t}.csv"
            sf.write(str(wav), pcm, rate, subtype="PCM_16")
            write_livelink_csv(csv, samples, values, rate)
            written += [wav, csv]
        return written
    finally:
        r.close()
