"""The 61 Live Link face values, in Unreal's ``EARFaceBlendShape`` order.

Index i of every face frame on the wire, in Redis and in Live Link packets is
``FACE_VALUE_NAMES[i]``. The first 52 are ARKit blendshapes (0..1); the last 9
are head and eye rotations (radians, signed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLENDSHAPE_NAMES: tuple[str, ...] = (
    "EyeBlinkLeft",
    "EyeLookDownLeft",
    "EyeLookInLeft",
    "EyeLookOutLeft",
    "EyeLookUpLeft",
    "EyeSquintLeft",
    "EyeWideLeft",
    "EyeBlinkRight",
    "EyeLookDownRight",
    "EyeLookInRight",
    "EyeLookOutRight",
    "EyeLookUpRight",
    "EyeSquintRight",
    "EyeWideRight",
    "JawForward",
    "JawLeft",
    "JawRight",
    "JawOpen",
    "MouthClose",
    "MouthFunnel",
    "MouthPucker",
    "MouthLeft",
    "MouthRight",
    "MouthSmileLeft",
    "MouthSmileRight",
    "MouthFrownLeft",
    "MouthFrownRight",
    "MouthDimpleLeft",
    "MouthDimpleRight",
    "MouthStretchLeft",
    "MouthStretchRight",
    "MouthRollLower",
    "MouthRollUpper",
    "MouthShrugLower",
    "MouthShrugUpper",
    "MouthPressLeft",
    "MouthPressRight",
    "MouthLowerDownLeft",
    "MouthLowerDownRight",
    "MouthUpperUpLeft",
    "MouthUpperUpRight",
    "BrowDownLeft",
    "BrowDownRight",
    "BrowInnerUp",
    "BrowOuterUpLeft",
    "BrowOuterUpRight",
    "CheekPuff",
    "CheekSquintLeft",
    "CheekSquintRight",
    "NoseSneerLeft",
    "NoseSneerRight",
    "TongueOut",
)

ROTATION_NAMES: tuple[str, ...] = (
    "HeadYaw",
    "HeadPitch",
    "HeadRoll",
    "LeftEyeYaw",
    "LeftEyePitch",
    "LeftEyeRoll",
    "RightEyeYaw",
    "RightEyePitch",
    "RightEyeRoll",
)

FACE_VALUE_NAMES: tuple[str, ...] = BLENDSHAPE_NAMES + ROTATION_NAMES
NUM_BLENDSHAPES = len(BLENDSHAPE_NAMES)  # 52
NUM_FACE_VALUES = len(FACE_VALUE_NAMES)  # 61
INDEX: dict[str, int] = {name: i for i, name in enumerate(FACE_VALUE_NAMES)}

assert NUM_BLENDSHAPES == 52 and NUM_FACE_VALUES == 61


@dataclass
class FaceFrame:
    """One face frame of a stream: the 61 values, pinned to the audio sample it belongs to."""

    index: int  # frame number from the start of this audio stream
    sample: int  # audio sample this frame belongs to: round(index * sample_rate / fps)
    values: np.ndarray  # float32 (61,), EARFaceBlendShape order
