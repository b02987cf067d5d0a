"""espeak-ng phoneme mnemonics -> viseme classes -> ARKit mouth poses.

Three tables:

* ``PHONEME_VISEME``: every mnemonic espeak-ng's English phoneme tables define
  (``en`` and its ``en-us``, ``en-rp``, ``en-sc``, ``en-n``, ``en-wm``, ``en-wi``
  children, plus the ``base1`` consonants they inherit), stress marks stripped.
  The en-us, en-gb, en-gb-x-rp, en-gb-scotland, en-gb-x-gbclan, en-gb-x-gbcwmd
  and en-029 voices emitted 106 distinct mnemonics (74 once stress marks are
  stripped) over 27 varied sentences; all of them are here
  (tests/unit/test_lipsync_phoneme.py re-checks en-us and en-gb). Diphthongs
  map to the viseme of their first element.
* ``POSES``: viseme -> ``{blendshape name: weight}``. ``MouthClose`` is given as
  the fraction of the jaw opening the lips seal (1 = lips together), because in
  ARKit MouthClose only means something relative to JawOpen; the mapper
  multiplies it by the final JawOpen.
* ``DOMINANCE``: per viseme, Cohen–Massaro style dominance for three groups of
  shapes (jaw, lip seal, lip shape), and the anticipatory / carry-over time
  constants.

Unknown mnemonics fall back by their first character (vowel letter -> that
vowel's viseme, consonant -> the consonant's viseme or DD) and are counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from schemas.arkit import INDEX, NUM_BLENDSHAPES

__all__ = [
    "DOMINANCE",
    "JAW_SHAPES",
    "PHONEME_VISEME",
    "POSES",
    "SEAL_SHAPES",
    "VISEMES",
    "Dominance",
    "pose_matrix",
    "strip_stress",
    "viseme_of",
]

VISEMES: tuple[str, ...] = (
    "sil", "PP", "FF", "TH", "DD", "kk", "CH", "SS", "RR", "hh",
    "aa", "E", "I", "O", "U", "@",
)

# Dominance groups (Cohen-Massaro give each articulatory parameter its own dominance):
# the jaw, the lip seal (lips against each other or the teeth) and the lip shape
# (rounding, spreading). A b before "oo" is both sealed and rounded.
JAW_SHAPES: tuple[str, ...] = ("JawOpen", "JawForward")
SEAL_SHAPES: tuple[str, ...] = (
    "MouthClose", "MouthPressLeft", "MouthPressRight", "MouthRollLower", "MouthRollUpper",
    "MouthShrugLower", "MouthShrugUpper",
)


def _lr(stem: str, value: float) -> dict[str, float]:
    return {stem + "Left": value, stem + "Right": value}


POSES: dict[str, dict[str, float]] = {
    # Relaxed, lips lightly together (no press); jaw shut.
    "sil": {"MouthClose": 1.0},
    # p b m: lips sealed and pressed, jaw nearly shut.
    "PP": {"JawOpen": 0.06, "MouthClose": 1.0, **_lr("MouthPress", 0.45),
           "MouthRollLower": 0.12, "MouthRollUpper": 0.08},
    # f v: lower lip tucked under the upper teeth.
    "FF": {"JawOpen": 0.08, "MouthRollLower": 0.55, **_lr("MouthUpperUp", 0.25),
           "MouthShrugUpper": 0.1},
    # th: tongue between the teeth.
    "TH": {"JawOpen": 0.15, "TongueOut": 0.35, **_lr("MouthLowerDown", 0.1),
           **_lr("MouthUpperUp", 0.1)},
    # t d n l: tongue tip up, teeth slightly apart.
    "DD": {"JawOpen": 0.14, **_lr("MouthStretch", 0.08), **_lr("MouthLowerDown", 0.08)},
    # k g ng: back of the tongue; mouth loose.
    "kk": {"JawOpen": 0.2, **_lr("MouthStretch", 0.06), **_lr("MouthLowerDown", 0.1)},
    # ch j sh zh: lips forward and flared.
    "CH": {"JawOpen": 0.1, "MouthFunnel": 0.45, "MouthPucker": 0.2,
           **_lr("MouthUpperUp", 0.2), **_lr("MouthLowerDown", 0.15)},
    # s z: teeth together, lips spread.
    "SS": {"JawOpen": 0.06, **_lr("MouthStretch", 0.3), **_lr("MouthSmile", 0.12),
           **_lr("MouthUpperUp", 0.12), **_lr("MouthLowerDown", 0.1)},
    # r: slight rounding.
    "RR": {"JawOpen": 0.14, "MouthFunnel": 0.3, "MouthPucker": 0.3},
    # h: a breath through whatever shape the neighbours make (very low dominance).
    "hh": {"JawOpen": 0.2},
    # Open vowels: a, ah, aw-start, aI/aU start.
    "aa": {"JawOpen": 0.7, **_lr("MouthLowerDown", 0.3), **_lr("MouthUpperUp", 0.1)},
    # Mid front: e, eI, e@.
    "E": {"JawOpen": 0.45, **_lr("MouthStretch", 0.2), **_lr("MouthSmile", 0.1),
          **_lr("MouthLowerDown", 0.2)},
    # Close front, spread: i, i:, I, y.
    "I": {"JawOpen": 0.22, **_lr("MouthStretch", 0.3), **_lr("MouthSmile", 0.25),
          **_lr("MouthUpperUp", 0.08)},
    # Rounded mid/open back: o, O:, 0, oU, OI.
    "O": {"JawOpen": 0.45, "MouthFunnel": 0.6, "MouthPucker": 0.2},
    # Close rounded: u:, U, w.
    "U": {"JawOpen": 0.2, "MouthPucker": 0.8, "MouthFunnel": 0.45},
    # Schwa and other reduced central vowels: neutral, half open.
    "@": {"JawOpen": 0.32, **_lr("MouthLowerDown", 0.1)},
}


@dataclass(frozen=True)
class Dominance:
    seal: float  # dominance of the viseme's SEAL_SHAPES at its plateau
    shape: float  # ... of its other lip shapes
    jaw: float  # ... of its JAW_SHAPES
    ant_ms: float  # anticipatory decay (before the phoneme starts)
    car_ms: float  # carry-over decay (after it ends)


# Bilabials and labiodentals own the seal (1.0, 0.9 against a vowel's 0.3: the lips
# meet whatever surrounds them) but take their shape from the neighbours; rounding
# (U, O, CH, RR) owns the shape and is anticipated early, as in speech; tongue
# consonants leave the lips to their neighbours; sibilants own the jaw (teeth
# together); schwa and h are the most coarticulated.
DOMINANCE: dict[str, Dominance] = {
    "sil": Dominance(0.3, 0.3, 0.3, 25.0, 30.0),
    "PP": Dominance(1.0, 0.2, 0.6, 20.0, 15.0),
    "FF": Dominance(0.9, 0.3, 0.5, 22.0, 15.0),
    "TH": Dominance(0.3, 0.3, 0.4, 18.0, 18.0),
    "DD": Dominance(0.1, 0.1, 0.35, 15.0, 18.0),
    "kk": Dominance(0.1, 0.1, 0.3, 15.0, 18.0),
    "CH": Dominance(0.3, 0.6, 0.5, 25.0, 20.0),
    "SS": Dominance(0.3, 0.35, 0.6, 18.0, 18.0),
    "RR": Dominance(0.2, 0.4, 0.3, 25.0, 20.0),
    "hh": Dominance(0.02, 0.02, 0.02, 15.0, 15.0),
    "aa": Dominance(0.3, 0.3, 0.7, 20.0, 25.0),
    "E": Dominance(0.3, 0.3, 0.6, 20.0, 25.0),
    "I": Dominance(0.3, 0.3, 0.5, 20.0, 25.0),
    "O": Dominance(0.3, 0.5, 0.6, 35.0, 30.0),
    "U": Dominance(0.3, 0.6, 0.5, 40.0, 30.0),
    "@": Dominance(0.25, 0.1, 0.4, 15.0, 20.0),
}

_VOWELS = {
    # en
    "@": "@", "@-": "@", "@2": "@", "@5": "@", "@#": "@", "a#": "@", "a#2": "@",
    "3": "RR", "3:": "RR", "@L": "DD",
    "a": "aa", "a2": "aa", "aa": "aa", "A:": "aa", "A@": "aa", "A#": "aa", "A~": "aa",
    "V": "aa", "VR": "aa", "a/": "aa",
    "aI": "aa", "aI@": "aa", "aI3": "aa", "aI2": "aa", "aU": "aa", "aU@": "aa",
    "E": "E", "E#": "E", "E2": "E", "e": "E", "e:": "E", "e#": "E", "eI": "E", "e@": "E",
    "I": "I", "I#": "I", "I2": "I", "I2#": "I", "i": "I", "i:": "I", "i@": "I",
    "i@3": "I", "IR": "I",
    "0": "O", "0#": "O", "02": "O", "O": "O", "O2": "O", "O:": "O", "O@": "O", "o@": "O",
    "o": "O", "o:": "O", "O~": "O", "oU": "O", "oU#": "O", "OI": "O",
    "U": "U", "U@": "U", "u": "U", "u:": "U",
    # syllabic consonants (base1)
    "m-": "PP", "n-": "DD", "N-": "kk", "l-": "DD", "r-": "RR",
}
_CONSONANTS = {
    "p": "PP", "b": "PP", "m": "PP", "B": "FF",
    "f": "FF", "v": "FF", "v#": "FF",
    "T": "TH", "D": "TH",
    "t": "DD", "d": "DD", "t#": "DD", "t2": "DD", "d#": "DD", "t[": "DD", "d[": "DD",
    "n": "DD", "n.": "DD", "n^": "DD", "l": "DD", "l/": "DD", "l/2": "DD", "l/3": "DD",
    "l^": "DD", "l.": "DD", "L": "DD", "L/": "DD", "l#": "DD", "*": "DD", "**": "DD",
    "k": "kk", "g": "kk", "N": "kk", "x": "kk", "X": "kk", "q": "kk", "c": "kk", "J": "kk",
    "C": "kk", "Q": "kk", "?": "kk", "#X1": "kk",
    "tS": "CH", "dZ": "CH", "S": "CH", "Z": "CH", "tS;": "CH", "dZ;": "CH", "S;": "CH",
    "Z;": "CH", "J^": "CH",
    "s": "SS", "z": "SS", "z#": "SS", "z/2": "SS", "s.": "SS", "z.": "SS", "s;": "SS",
    "z;": "SS",
    "r": "RR", "r/": "RR", "R": "RR", "R2": "RR", "R3": "RR", 'r"': "RR", "r.": "RR",
    "w": "U", "w#": "U",
    "j": "I", ";": "I",
    "h": "hh",
}
_PAUSES = {"_", "_:", "_!", "_|", "_::", "_^_", "_;_", "_X1", "||", ":", "-", "#@", "#a",
           "#e", "#i", "#o", "#u"}

PHONEME_VISEME: dict[str, str] = {
    **{p: "sil" for p in _PAUSES}, **_CONSONANTS, **_VOWELS,
}

_STRESS = "'," + "%="
_VOWEL_FIRST = {"a": "aa", "A": "aa", "V": "aa", "e": "E", "E": "E", "i": "I", "I": "I",
                "y": "I", "Y": "I", "o": "O", "O": "O", "0": "O", "u": "U", "U": "U",
                "@": "@", "3": "RR"}


def strip_stress(phoneme: str) -> str:
    """``"'oU"`` -> ``"oU"``: espeak prefixes stressed vowels with ' or , (and % =)."""
    return phoneme.lstrip(_STRESS)


def viseme_of(phoneme: str, unknown: Counter | None = None) -> str:
    """Viseme class of an espeak mnemonic; unknown ones fall back by first character
    (vowel letter -> its vowel viseme, pause mark -> sil, consonant -> its viseme or DD)
    and are counted in ``unknown`` when given."""
    p = strip_stress(phoneme)
    v = PHONEME_VISEME.get(p)
    if v is not None:
        return v
    if unknown is not None:
        unknown[phoneme] += 1
    first = p[:1]
    if first in _VOWEL_FIRST:
        return _VOWEL_FIRST[first]
    if first in ("_", "|", ""):
        return "sil"
    return _CONSONANTS.get(first, "DD")


def pose_matrix() -> np.ndarray:
    """(len(VISEMES), 52) float64: ``POSES`` as vectors in EARFaceBlendShape order."""
    m = np.zeros((len(VISEMES), NUM_BLENDSHAPES))
    for i, v in enumerate(VISEMES):
        for name, w in POSES[v].items():
            m[i, INDEX[name]] = w
    return m
