from __future__ import annotations

import numpy as np
import pytest

from core.idle_face import MOUTH_SHAPES, IdleFace, blend
from schemas.arkit import INDEX, NUM_BLENDSHAPES, NUM_FACE_VALUES
from workers.lipsync.audio_driven import FaceFrame

FPS = 60
BLINK_L, BLINK_R = INDEX["EyeBlinkLeft"], INDEX["EyeBlinkRight"]
JAW = INDEX["JawOpen"]


@pytest.mark.parametrize("seed", [0, 1, 2, 12345])
def test_blinks_over_a_minute(seed: int) -> None:
    idle = IdleFace(fps=FPS, seed=seed)
    v = idle.next(60 * FPS)
    starts = np.array(idle.blink_starts)
    gaps = np.diff(starts) / FPS
    assert 10 <= len(starts) <= 30
    assert gaps.min() >= 2.0 and gaps.max() <= 6.0
    assert 3.0 <= gaps.mean() <= 5.0
    assert np.array_equal(v[:, BLINK_L], v[:, BLINK_R])  # both eyes together
    closed = v[:, BLINK_L] > 0.0
    # Each blink: ~150 ms (9 frames at 60 fps) and reaches (nearly) shut.
    assert closed.sum() == len(starts) * 9
    for s in starts:
        assert v[s : s + 9, BLINK_L].max() > 0.9
        assert v[s + 9 : s + 10, BLINK_L].max(initial=0.0) == 0.0


def test_deterministic_and_split_independent() -> None:
    a = IdleFace(seed=7).next(2000)
    split = IdleFace(seed=7)
    b = np.concatenate([split.next(n) for n in (1, 0, 333, 1000, 666)])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, IdleFace(seed=8).next(2000))


def test_idle_ranges_and_smoothness() -> None:
    v = IdleFace(seed=3).next(120 * FPS)
    assert v.dtype == np.float32 and v.shape == (120 * FPS, NUM_FACE_VALUES)
    assert v[:, :NUM_BLENDSHAPES].min() >= 0.0 and v[:, :NUM_BLENDSHAPES].max() <= 1.0
    for name, lim in (("HeadYaw", 0.1), ("HeadPitch", 0.07), ("HeadRoll", 0.05)):
        x = v[:, INDEX[name]]
        assert np.abs(x).max() <= lim and x.std() > lim / 10  # small, in radians, moving
        assert np.abs(np.diff(x)).max() < 0.005  # slow
    brow = v[:, INDEX["BrowInnerUp"]]
    assert brow.min() >= 0.0 and brow.max() <= 0.2 and brow.std() > 0.005
    eye_yaw = v[:, INDEX["LeftEyeYaw"]]
    assert np.array_equal(eye_yaw, v[:, INDEX["RightEyeYaw"]])
    assert np.abs(eye_yaw).max() <= 0.25
    saccades = np.count_nonzero(np.abs(np.diff(eye_yaw)) > 0.01)
    assert 20 <= saccades <= 600  # jumps, not drift
    assert not v[:, [INDEX[n] for n in MOUTH_SHAPES]].any()  # the idle mouth is at rest


def test_ease_is_smooth_and_takes_150_ms() -> None:
    idle = IdleFace(seed=0)
    speaking = np.r_[np.zeros(30), np.ones(60), np.zeros(60)]
    w = idle.ease(speaking)
    assert w[:30].max() == 0.0
    assert w[30 + 8] == 1.0 and w[30 + 7] < 1.0  # 9 frames = 150 ms at 60 fps
    assert w[90 + 8] == 0.0 and w[90 + 7] > 0.0
    assert np.abs(np.diff(w)).max() <= 1.5 / 9 + 1e-9  # smoothstep of a 1/9 ramp
    # Same result fed in pieces.
    other = IdleFace(seed=0)
    assert np.array_equal(w, np.concatenate([other.ease(speaking[:45]), other.ease(speaking[45:])]))


def test_blend_rules() -> None:
    speech = np.zeros(NUM_FACE_VALUES, np.float32)
    speech[JAW] = 0.6
    speech[BLINK_L] = 0.5
    idle = np.zeros(NUM_FACE_VALUES, np.float32)
    idle[JAW] = 0.1
    idle[BLINK_L] = 0.7
    idle[INDEX["HeadYaw"]] = -0.04
    out = blend(speech, idle, 1.0)
    assert out[JAW] == pytest.approx(0.6)  # the mouth is the speech mouth
    assert out[BLINK_L] == 1.0  # eyes add up, clipped
    assert out[INDEX["HeadYaw"]] == pytest.approx(-0.04)  # rotations stay signed
    assert blend(speech, idle, 0.0)[JAW] == pytest.approx(0.1)
    both = blend(np.stack([speech, speech]), np.stack([idle, idle]), np.array([0.0, 0.5]))
    assert both[:, JAW] == pytest.approx([0.1, 0.35])


def test_apply_keeps_blinking_under_speech_and_eases() -> None:
    idle = IdleFace(seed=5)
    n = 20 * FPS
    t = np.arange(n)
    jaw = np.full(n, 0.5, np.float32)  # held open, so every jaw change is the ease
    speaking = ((t >= 2 * FPS) & (t < 18 * FPS)).astype(float)
    frames = []
    for i in range(n):
        v = np.zeros(NUM_FACE_VALUES, np.float32)
        v[JAW] = jaw[i]
        frames.append(FaceFrame(i, i * 735 // 2, v))
    out: list[FaceFrame] = []
    for a in range(0, n, 7):  # a streaming consumer, 7 frames at a time
        out += idle.apply(frames[a : a + 7], speaking[a : a + 7])
    assert [(f.index, f.sample) for f in out] == [(f.index, f.sample) for f in frames]
    v = np.stack([f.values for f in out])
    talking = slice(3 * FPS, 17 * FPS)
    assert v[talking, BLINK_L].max() > 0.9  # blinks while talking
    assert np.allclose(v[talking, JAW], jaw[talking])
    # No pop entering or leaving speech: 0.5 spread over 150 ms (raw: one 0.5 step).
    assert np.abs(np.diff(v[:, JAW])).max() <= 0.5 * 1.5 / 9 + 1e-6
    assert v[: 2 * FPS, JAW].max() == 0.0 and v[-FPS:, JAW].max() == 0.0
