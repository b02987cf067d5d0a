"""Deterministic idle face layer: blinks, gaze saccades, slow brow and head drift.

A face driven only by lipsync freezes between and around words. ``IdleFace``
makes the rest of the face live, frame by frame on its own clock:

* blinks, both eyes together, every 2-6 s (``2 + 4 * Beta(2, 2)``: mean 4 s,
  most between 3 and 5 s), each ``BLINK_MS`` = 150 ms: 40% closing, 60%
  opening, as lids close faster than they open;
* gaze saccades: a fixation lasts 0.4-2.5 s, then the eyes jump in ~50 ms to a
  new target, mostly back near the listener (yaw within +-0.03 rad) and now
  and then aside (+-0.12 rad yaw, +-0.06 rad pitch); the eyes counter-rotate
  80% of the head's motion so the gaze holds while the head drifts;
* slow drift on HeadYaw/HeadPitch/HeadRoll (+-0.05/0.035/0.02 rad) and
  BrowInnerUp (0.03-0.11): two octaves of smooth value noise (2.6 s and 0.9 s
  keys).

Rotations are radians. Sign convention: positive yaw looks to the
character's left and positive pitch looks up; the EyeLook* blendshapes follow
the gaze (full at ``EYE_LOOK_FULL_RAD``). Flip ``YAW_SIGN``/``PITCH_SIGN`` if
a rig reads them the other way.

Determinism: everything comes from ``numpy.random.default_rng(seed)``
streams consumed in frame order, so the values of frame ``t`` depend only on
``seed`` and ``t``, however ``next`` calls split the frames.

Streaming use, per face frame coming out of a lipsync mapper::

    idle = IdleFace(fps=60, seed=npc_id)
    frames = idle.apply(lipsync_frames, speaking)  # speaking: 1 while the NPC talks

``apply`` advances the idle clock by ``len(frames)``, eases the speaking
weight over ``ease_ms`` (150 ms) and returns new frames (same index and
sample) whose mouth is the speech mouth, whose eyes, brows and head are the
idle layer's plus whatever the speech frames carry there. Between replies,
``next(n)`` gives idle frames to send on their own; ``apply`` and ``next``
share the clock.
"""

from __future__ import annotations

import numpy as np

from schemas.arkit import FACE_VALUE_NAMES, INDEX, NUM_BLENDSHAPES, NUM_FACE_VALUES, FaceFrame

__all__ = ["BLINK_MS", "MOUTH_SHAPES", "IdleFace", "blend"]

BLINK_MS = 150.0
BLINK_INTERVAL_S = (2.0, 6.0)
BLINK_CLOSING = 0.4  # share of a blink spent closing
EASE_MS = 150.0
EYE_LOOK_FULL_RAD = 0.6  # EyeLook* = |angle| / this
YAW_SIGN = 1.0
PITCH_SIGN = 1.0
VOR_GAIN = 0.8  # eyes undo this share of the head's rotation

# Amplitudes (radians, or blendshape weight for the brow) and key periods (s).
_HEAD = {"HeadYaw": 0.05, "HeadPitch": 0.035, "HeadRoll": 0.02}
_BROW_BASE, _BROW_AMP = 0.07, 0.04
_KEY_S = (2.6, 0.9)
_OCTAVE_GAIN = (1.0, 0.35)
_FIX_S = (0.4, 2.5)  # fixation duration range
_SACCADE_MS = 50.0

# The speech mapper owns these: jaw, lips, cheeks, tongue. The rest (eyes, brows,
# nose, head) is the idle layer plus anything the speech frames add.
MOUTH_SHAPES: tuple[str, ...] = tuple(
    n for n in FACE_VALUE_NAMES[:NUM_BLENDSHAPES]
    if n.startswith(("Jaw", "Mouth", "Cheek", "Tongue"))
)
_MOUTH = np.zeros(NUM_FACE_VALUES, bool)
_MOUTH[[INDEX[n] for n in MOUTH_SHAPES]] = True


def _smoothstep(x: float) -> float:
    x = min(1.0, max(0.0, x))
    return x * x * (3.0 - 2.0 * x)


def blend(speech_values: np.ndarray, idle_values: np.ndarray,
          speaking_weight: np.ndarray | float) -> np.ndarray:
    """Mix speech and idle frames (``(61,)`` or ``(n, 61)``; weight scalar or ``(n,)``).

    Mouth shapes (``MOUTH_SHAPES``): ``w * speech + (1 - w) * idle``. Everything
    else: ``idle + speech`` (the idle layer's blinks, gaze, brow and head keep
    running under speech), blendshapes clipped to 0..1. Returns float32.
    """
    s = np.asarray(speech_values, np.float64)
    i = np.asarray(idle_values, np.float64)
    w = np.asarray(speaking_weight, np.float64)
    if w.ndim == 1:
        w = w[:, None]
    out = np.where(_MOUTH, w * s + (1.0 - w) * i, i + s)
    out[..., :NUM_BLENDSHAPES] = np.clip(out[..., :NUM_BLENDSHAPES], 0.0, 1.0)
    return out.astype(np.float32)


class _ValueNoise:
    """Smooth noise in -1..1: random keys every ``period`` frames, smoothstep between."""

    def __init__(self, rng: np.random.Generator, period: float) -> None:
        self._rng = rng
        self._period = period
        self._k0 = 0  # key index of _keys[0]
        self._keys = [float(rng.uniform(-1.0, 1.0))]

    def at(self, t: int) -> float:
        u = t / self._period
        j = int(u)
        while self._k0 + len(self._keys) <= j + 1:
            self._keys.append(float(self._rng.uniform(-1.0, 1.0)))
        if j - self._k0 > 8:  # time only moves forward: forget old keys
            del self._keys[: j - self._k0]
            self._k0 = j
        a, b = self._keys[j - self._k0], self._keys[j - self._k0 + 1]
        return a + (b - a) * _smoothstep(u - j)


class IdleFace:
    """Idle motion on its own frame clock; see the module docstring."""

    def __init__(self, fps: int = 60, seed: int = 0, ease_ms: float = EASE_MS) -> None:
        if fps <= 0:
            raise ValueError("fps must be positive")
        self.fps = int(fps)
        self.seed = seed
        streams = np.random.SeedSequence(seed).spawn(4)
        self._blink_rng = np.random.default_rng(streams[0])
        self._gaze_rng = np.random.default_rng(streams[1])
        noise_rng = np.random.default_rng(streams[2])
        names = (*_HEAD, "BrowInnerUp")
        self._noise = {
            n: [_ValueNoise(noise_rng, k * fps) for k in _KEY_S] for n in names
        }
        self._blink_len = max(2, round(BLINK_MS * fps / 1000.0))
        self._saccade_len = max(1, round(_SACCADE_MS * fps / 1000.0))
        self._ease_step = 1.0 / max(1.0, ease_ms * fps / 1000.0)
        self.frame = 0  # idle clock: frames generated so far
        self.blink_starts: list[int] = []  # idle-clock frames at which blinks began
        self._next_blink = self._blink_gap()
        self._gaze = (0.0, 0.0)
        self._gaze_from = (0.0, 0.0)
        self._gaze_to = (0.0, 0.0)
        self._saccade_at = 0
        self._next_saccade = self._fixation()
        self._weight = 0.0  # eased speaking weight (linear ramp; smoothstep on output)

    def _blink_gap(self) -> int:
        lo, hi = BLINK_INTERVAL_S
        s = lo + (hi - lo) * float(self._blink_rng.beta(2.0, 2.0))
        return self.frame + max(1, round(s * self.fps))

    def _fixation(self) -> int:
        s = float(self._gaze_rng.uniform(*_FIX_S))
        return self.frame + max(1, round(s * self.fps))

    def _new_target(self) -> tuple[float, float]:
        r = self._gaze_rng
        if r.random() < 0.6:  # back to (near) the listener
            return float(r.uniform(-0.03, 0.03)), float(r.uniform(-0.02, 0.02))
        return float(r.uniform(-0.12, 0.12)), float(r.uniform(-0.06, 0.04))

    def _step(self) -> np.ndarray:
        t = self.frame
        v = np.zeros(NUM_FACE_VALUES)
        # Blink.
        if t == self._next_blink:
            self.blink_starts.append(t)
            self._next_blink = self._blink_gap()  # start to start: 2-6 s
        lid = 0.0
        if self.blink_starts and t - self.blink_starts[-1] < self._blink_len:
            x = (t - self.blink_starts[-1] + 0.5) / self._blink_len
            c = BLINK_CLOSING
            lid = _smoothstep(x / c) if x < c else 1.0 - _smoothstep((x - c) / (1.0 - c))
        v[INDEX["EyeBlinkLeft"]] = v[INDEX["EyeBlinkRight"]] = lid
        # Head and brow drift.
        for name, amp in _HEAD.items():
            v[INDEX[name]] = amp * sum(g * n.at(t) for g, n in
                                       zip(_OCTAVE_GAIN, self._noise[name], strict=True))
        brow = sum(g * n.at(t) for g, n in zip(_OCTAVE_GAIN, self._noise["BrowInnerUp"],
                                                strict=True))
        v[INDEX["BrowInnerUp"]] = max(0.0, _BROW_BASE + _BROW_AMP * brow)
        # Gaze: fixations joined by quick saccades.
        if t == self._next_saccade:
            self._gaze_from, self._gaze_to = self._gaze, self._new_target()
            self._saccade_at = t
            self._next_saccade = self._fixation() + self._saccade_len
        k = _smoothstep((t - self._saccade_at + 1) / self._saccade_len)
        self._gaze = tuple(a + (b - a) * k
                           for a, b in zip(self._gaze_from, self._gaze_to, strict=True))
        yaw = YAW_SIGN * (self._gaze[0] - VOR_GAIN * v[INDEX["HeadYaw"]])
        pitch = PITCH_SIGN * (self._gaze[1] - VOR_GAIN * v[INDEX["HeadPitch"]])
        for eye in ("LeftEye", "RightEye"):
            v[INDEX[eye + "Yaw"]] = yaw
            v[INDEX[eye + "Pitch"]] = pitch
        side = min(1.0, abs(self._gaze[0]) / EYE_LOOK_FULL_RAD)
        vert = min(1.0, abs(self._gaze[1]) / EYE_LOOK_FULL_RAD)
        # Looking to the character's left: left eye out, right eye in.
        left = self._gaze[0] > 0
        v[INDEX["EyeLookOutLeft" if left else "EyeLookInLeft"]] = side
        v[INDEX["EyeLookInRight" if left else "EyeLookOutRight"]] = side
        up = self._gaze[1] > 0
        for s in ("Left", "Right"):
            v[INDEX[("EyeLookUp" if up else "EyeLookDown") + s]] = vert
        self.frame += 1
        return v

    def next(self, n: int) -> np.ndarray:
        """Idle values for the next ``n`` frames: float32 ``(n, 61)``."""
        out = np.zeros((n, NUM_FACE_VALUES), np.float32)
        for i in range(n):
            out[i] = self._step()
        return out

    def ease(self, speaking: np.ndarray) -> np.ndarray:
        """Eased speaking weight for the next ``len(speaking)`` frames (targets 0..1):
        a ramp of at most 1/9 per frame at 60 fps (150 ms end to end), smoothstep-shaped.
        Stateful: call once per frame batch, in order."""
        out = np.empty(len(speaking))
        w = self._weight
        step = self._ease_step
        for i, target in enumerate(np.asarray(speaking, np.float64).tolist()):
            target = min(1.0, max(0.0, target))
            w = min(target, w + step) if target > w else max(target, w - step)
            out[i] = _smoothstep(w)
        self._weight = w
        return out

    def apply(self, frames: list[FaceFrame], speaking: np.ndarray | float = 1.0
              ) -> list[FaceFrame]:
        """Blend the idle layer under speech frames; ``speaking`` per frame (or one value)."""
        if not frames:
            return []
        sp = np.broadcast_to(np.asarray(speaking, np.float64), (len(frames),))
        idle = self.next(len(frames))
        values = blend(np.stack([f.values for f in frames]), idle, self.ease(sp))
        return [FaceFrame(f.index, f.sample, v) for f, v in zip(frames, values, strict=True)]

