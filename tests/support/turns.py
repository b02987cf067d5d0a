"""Is this turn whole? One check for every test that plays a turn through the fleet."""

from __future__ import annotations

import numpy as np

from parley.client import TurnResult


def turn_problems(result: TurnResult, turn: int = 1, chunks: list | None = None,
                  baseline: TurnResult | None = None) -> list[str]:
    """Everything wrong with ``turn`` as the player got it (empty: the turn is whole).
    ``chunks``: the client's record of the reply-audio chunks (Client.chunks[session]), to
    check they tile the turn's sample clock; ``baseline``: the same utterance with no fault,
    whose reply a recovered turn must match."""
    s = result.summary()
    out = []
    if result.errors:
        out.append(f"errors: {result.errors}")
    if result.done is None:
        return [*out, "no turn_done"]
    if result.done.get("turn") != turn:
        out.append(f"turn_done for turn {result.done.get('turn')}, expected {turn}")
    if not s["transcript"]:
        out.append("no final transcript")
    if not s["reply"]:
        out.append("no final reply text")
    if s["seq_gaps"] or s["seq_duplicates"]:
        out.append(f"seq gaps={s['seq_gaps']} duplicates={s['seq_duplicates']}: "
                   f"{s['seq_problems']}")
    if s["face_before_ready"]:
        out.append(f"{s['face_before_ready']} face frames before their segment's ready")
    rate = result.reply_rate
    expected = result.audio_samples * 60 / rate if rate else 0
    if abs(result.face_frames - expected) > 2:
        out.append(f"face frames {result.face_frames} for {expected:.1f} at 60/s of audio")
    if result.done["audio_samples"] != result.audio_samples:
        out.append(f"turn_done.audio_samples {result.done['audio_samples']} != "
                   f"{result.audio_samples} received")
    if result.done["face_frames"] != result.face_frames:
        out.append(f"turn_done.face_frames {result.done['face_frames']} != "
                   f"{result.face_frames} received")
    pos = 0
    for _, seq, sample, n in sorted(c for c in chunks or [] if c[0] == turn):
        if sample != pos:
            out.append(f"audio seq {seq} starts at sample {sample}, previous chunk ended at {pos}")
            break
        pos += n
    if result.face_samples:
        stamps = np.concatenate(result.face_samples).astype(np.int64)
        want = np.rint(np.arange(len(stamps)) * rate / 60).astype(np.int64)
        bad = np.flatnonzero(stamps != want)
        if len(bad):
            i = int(bad[0])
            out.append(f"face frame {i} at sample {stamps[i]}, the 60 fps clock says {want[i]}")
    if baseline is not None and result.transcript == baseline.transcript:
        if result.reply != baseline.reply:
            out.append(f"reply {result.reply!r} != fault-free {baseline.reply!r}")
        # espeak-ng renders the same text a few ms longer or shorter from call to call
        if abs(result.audio_samples - baseline.audio_samples) > 0.02 * baseline.audio_samples:
            out.append(f"{result.audio_samples} reply samples, fault-free "
                       f"{baseline.audio_samples}")
    return out


def check_turn(result: TurnResult, *, min_audio_s: float = 0.5, chunks: list | None = None
               ) -> dict:
    """Asserts the turn is whole, with at least ``min_audio_s`` of reply, within gross latency
    bounds (this machine is shared and noisy); returns its summary."""
    bad = turn_problems(result, result.turn or (result.done or {}).get("turn", 1), chunks)
    assert not bad, bad
    s = result.summary()
    assert s["reply_audio_s"] >= min_audio_s
    lat = s["latency_ms"]
    assert 0 < lat["first_audio"] < 10_000, lat
    assert 0 <= lat["first_face"] < 2_000
    return s
