"""Lipsync benchmark: bilabial closures, jaw agreement and throughput.

    .venv/bin/python -m benchmarks.lipsync

Speech comes from espeak-ng (``EspeakSynth``, en-us and en-gb) for a fixed set
of sentences heavy in p, b and m; the ground truth is espeak's own phoneme
timing. Three mappers see the same 50 ms chunks (what the TTS stage sends):

* ``baseline``: naive RMS -> JawOpen, no spectral cues and no lip logic;
* ``audio``: the built-in ``AudioLipsync`` (audio only, no marks);
* ``phoneme``: ``PhonemeLipsync`` (marks + audio), the reference for the jaw.

Metrics:

* closure recall: fraction of bilabial phonemes (p, b, m; the interval from
  the mark to the next mark) with at least one frame within +-1 frame of the
  interval where the lips are shut. Shut means the lips meet, ``JawOpen -
  MouthClose <= 0.05``, and the closure is active, ``MouthClose >= 0.05`` or
  ``MouthPress >= 0.15``. The baseline drives no lip shapes, so for it shut
  means just ``JawOpen <= 0.05`` (the most it could show).
* false closure: the same test at the centre frame of vowels lasting >= 50 ms;
  a mapper that keeps the lips shut would score recall 1 and false closure 1.
* jaw_corr: Pearson correlation of a mapper's JawOpen with the phoneme-driven
  JawOpen over all frames.
* frames/s: frames produced per second of CPU (``time.process_time``, this
  process on one core), synthesis excluded.

The last line printed is
``closure_recall=.. jaw_corr=.. lookahead_ms=.. frames_per_s=..`` for the
audio-driven path (lookahead_ms is its ``latency_samples``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from schemas.arkit import INDEX, NUM_FACE_VALUES
from workers.lipsync.audio_driven import AudioLipsync, frame_count, frame_sample
from workers.lipsync.phoneme_driven import PhonemeLipsync
from workers.lipsync.visemes import viseme_of
from workers.tts.espeak import EspeakSynth

__all__ = ["SENTENCES", "VOICES", "main", "run"]

SENTENCES: tuple[str, ...] = (
    "Bob bought a big blue balloon, maybe for the baby.",
    "Please pass me the maple syrup; my mother made pancakes.",
    "The ambassador from Botswana submitted a proposal to Parliament.",
    "Put the map back in the bag before the probe begins.",
    "Mumbai, Memphis and Birmingham are pretty big places.",
    "A bumblebee bumped into my window by the pump.",
    "Maybe the bishop will pay for the broken lamp.",
    "I promise my pal Pam brought a pumpkin pie.",
    "Bring both boxes up the steps, and mind the bump.",
    "The purple plums were probably the best in the market.",
    "My memory of the summer campaign is embarrassingly dim.",
    "Hold the rope, keep your footing, and step up slowly.",
    "Where's the mob boss? He went up the mountain at dawn.",
    "Amber, bring the lamp, the comb and the cup, please.",
    "We need more timber, rope and a hammer by tomorrow.",
    "Stop! Don't move. The beam above you is about to drop.",
    "Empty barrels make the most noise, my grandfather said.",
    "The merchant swapped a pair of boots for a pound of butter.",
    "Remember the name of the lamb that bleated by the pub?",
    "Problems multiply when the map is upside down, Bob.",
)
VOICES: tuple[str, ...] = ("en-us", "en-gb")

_JAW = INDEX["JawOpen"]
_CLOSE = INDEX["MouthClose"]
_PRESS = (INDEX["MouthPressLeft"], INDEX["MouthPressRight"])
_VOWEL_VISEMES = {"aa", "E", "I", "O", "U", "@"}
_OTHER_CONSONANTS = {"DD", "kk", "SS", "TH", "CH", "RR"}  # lips should not seal

# Closure test (see the module docstring).
APERTURE_MAX = 0.05
CLOSE_MIN = 0.05
PRESS_MIN = 0.15
BASELINE_JAW_MAX = 0.05


@dataclass
class _Utterance:
    voice: str
    text: str
    rate: int
    chunks: list[tuple[np.ndarray, list[tuple[int, str]]]]  # 50 ms pcm, marks in it
    marks: list[tuple[int, str]]
    samples: int


def _synthesize(sentences: tuple[str, ...] | list[str],
                voices: tuple[str, ...]) -> list[_Utterance]:
    synth = EspeakSynth()
    out = []
    for voice in voices:
        for text in sentences:
            chunks = [
                (c.pcm, [(m.sample, m.phoneme) for m in c.phonemes])
                for c in synth.synthesize(text, voice=voice)
            ]
            marks = [m for _, ms in chunks for m in ms]
            n = sum(len(p) for p, _ in chunks)
            out.append(_Utterance(voice, text, synth.sample_rate, chunks, marks, n))
    return out


class NaiveRms:
    """Baseline: JawOpen = loudness of a 27 ms window centred on the frame, mapped
    linearly from -50 dBFS (shut) to -10 dBFS (0.7); nothing else moves."""

    def __init__(self, sample_rate: int, fps: int = 60) -> None:
        self.sample_rate, self.fps = sample_rate, fps
        self.half = round(0.0135 * sample_rate)

    def run(self, chunks: list[tuple[np.ndarray, list]]) -> np.ndarray:
        x = np.concatenate([p for p, _ in chunks]).astype(np.float64) / 32768.0
        n = frame_count(len(x), self.sample_rate, self.fps)
        padded = np.concatenate((np.zeros(self.half), x, np.zeros(self.half)))
        s = np.array([frame_sample(i, self.sample_rate, self.fps) for i in range(n)], np.int64)
        win = np.lib.stride_tricks.sliding_window_view(padded, 2 * self.half)[s]
        db = 10.0 * np.log10((win * win).mean(axis=1) + 1e-12)
        v = np.zeros((n, NUM_FACE_VALUES), np.float32)
        v[:, _JAW] = np.clip((db + 50.0) / 40.0, 0.0, 1.0) * 0.7
        return v


def _run_audio(lip: AudioLipsync, u: _Utterance) -> np.ndarray:
    frames = []
    for pcm, _ in u.chunks:
        frames += lip.push(pcm)
    frames += lip.flush()
    return np.stack([f.values for f in frames])


def _run_phoneme(lip: PhonemeLipsync, u: _Utterance) -> np.ndarray:
    frames = []
    for pcm, marks in u.chunks:
        frames += lip.push(pcm, marks)
    frames += lip.flush()
    return np.stack([f.values for f in frames])


def _shut(v: np.ndarray, lips: bool) -> np.ndarray:
    jaw = v[:, _JAW]
    if not lips:
        return jaw <= BASELINE_JAW_MAX
    close = v[:, _CLOSE]
    press = np.maximum(v[:, _PRESS[0]], v[:, _PRESS[1]])
    return (jaw - close <= APERTURE_MAX) & ((close >= CLOSE_MIN) | (press >= PRESS_MIN))


def _intervals(u: _Utterance) -> list[tuple[int, int, str]]:
    """(start, end, viseme) per phoneme with a positive duration."""
    out = []
    for k, (start, ph) in enumerate(u.marks):
        end = u.marks[k + 1][0] if k + 1 < len(u.marks) else u.samples
        if end > start:
            out.append((start, end, viseme_of(ph)))
    return out


def _score(u: _Utterance, v: np.ndarray, lips: bool, fps: int) -> list[int]:
    """[bilabials, closed, long vowels, closed, other consonants, closed] for one utterance."""
    shut = _shut(v, lips)
    idx = np.arange(len(v))
    s = np.array([frame_sample(i, u.rate, fps) for i in idx])
    hop = u.rate / fps
    sc = [0] * 6
    for start, end, vis in _intervals(u):
        centre = bool(shut[int(np.argmin(np.abs(s - (start + end) / 2)))])
        if vis == "PP":
            near = (s >= start - hop - 0.5) & (s < end + hop + 0.5)
            sc[0] += 1
            sc[1] += bool(shut[near].any())
        elif vis in _VOWEL_VISEMES and end - start >= 0.05 * u.rate:
            sc[2] += 1
            sc[3] += centre
        elif vis in _OTHER_CONSONANTS:
            sc[4] += 1
            sc[5] += centre
    return sc


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() < 1e-9 or b.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def run(sentences: list[str] | tuple[str, ...] | None = None, fps: int = 60,
        voices: tuple[str, ...] = VOICES) -> dict:
    """Run the benchmark; returns per-method metrics and the headline numbers."""
    utts = _synthesize(tuple(sentences) if sentences else SENTENCES, voices)
    rate = utts[0].rate
    audio = AudioLipsync(rate, fps=fps)
    phoneme = PhonemeLipsync(rate, fps=fps)
    naive = NaiveRms(rate, fps=fps)
    methods = {
        # The baseline runs offline over whole utterances (its frames/s is not comparable);
        # its centred window would need half a window of latency streaming.
        "baseline": (lambda u: naive.run(u.chunks), False, naive.half),
        "audio": (lambda u: _run_audio(audio, u), True, audio.latency_samples),
        "phoneme": (lambda u: _run_phoneme(phoneme, u), True, phoneme.latency_samples),
    }
    outputs: dict[str, list[np.ndarray]] = {}
    result: dict = {"sentences": len(utts) // len(voices), "voices": list(voices),
                    "seconds": sum(u.samples for u in utts) / rate, "methods": {}}
    for name, (fn, _, latency) in methods.items():
        # Best of two passes: the first warms caches and numpy's FFT plans.
        best = None
        for _ in range(2):
            t0 = time.process_time()
            out = [fn(u) for u in utts]
            dt = time.process_time() - t0
            best = dt if best is None else min(best, dt)
        outputs[name] = out
        frames = sum(len(o) for o in out)
        result["methods"][name] = {
            "frames": frames,
            "frames_per_s": frames / max(best, 1e-9),
            "lookahead_ms": 1000.0 * latency / rate,
        }
    for u, o in zip(utts, outputs["phoneme"], strict=True):
        assert len(o) == frame_count(u.samples, rate, fps)
    ref_jaw = np.concatenate([o[:, _JAW] for o in outputs["phoneme"]])
    for name, (_, lips, _) in methods.items():
        tot = np.zeros(6, np.int64)
        by_voice: dict[str, list[int]] = {}
        for u, o in zip(utts, outputs[name], strict=True):
            sc = np.array(_score(u, o, lips, fps))
            tot += sc
            bv = by_voice.setdefault(u.voice, [0, 0])
            bv[0] += int(sc[0])
            bv[1] += int(sc[1])
        m = result["methods"][name]
        m["bilabials"] = int(tot[0])
        m["closure_recall"] = float(tot[1] / max(tot[0], 1))
        m["false_closure"] = float(tot[3] / max(tot[2], 1))
        m["consonant_closure"] = float(tot[5] / max(tot[4], 1))
        m["closure_recall_by_voice"] = {k: v[1] / max(v[0], 1) for k, v in by_voice.items()}
        m["jaw_corr"] = _corr(np.concatenate([o[:, _JAW] for o in outputs[name]]), ref_jaw)
    a = result["methods"]["audio"]
    result.update(
        closure_recall=a["closure_recall"], jaw_corr=a["jaw_corr"],
        lookahead_ms=a["lookahead_ms"], frames_per_s=a["frames_per_s"],
        phoneme_closure_recall=result["methods"]["phoneme"]["closure_recall"],
        phoneme_frames_per_s=result["methods"]["phoneme"]["frames_per_s"],
        unknown_phonemes=dict(phoneme.unknown_phonemes),
    )
    return result


def format_table(r: dict) -> str:
    head = (f"{r['sentences']} sentences x {len(r['voices'])} voices ({', '.join(r['voices'])}),"
            f" {r['seconds']:.1f} s of speech, "
            f"{r['methods']['audio']['bilabials']} bilabials, 50 ms chunks")
    cols = (f"{'method':<9} {'closure':>8} {'by voice':>11} {'vowel cl.':>9} {'cons cl.':>8} "
            f"{'jaw_corr':>8} {'latency':>8} {'frames/s':>9}")
    lines = [head, cols, "-" * len(cols)]
    for name, m in r["methods"].items():
        bv = "/".join(f"{x:.2f}" for x in m["closure_recall_by_voice"].values())
        lines.append(
            f"{name:<9} {m['closure_recall']:>8.3f} {bv:>11} {m['false_closure']:>9.3f} "
            f"{m['consonant_closure']:>8.3f} "
            f"{m['jaw_corr']:>8.3f} {m['lookahead_ms']:>6.1f}ms {m['frames_per_s']:>9.0f}"
        )
    lines += [
        "closure: share of p/b/m with the lips shut within +-1 frame",
        "vowel cl. / cons cl.: lips shut at the centre of vowels >= 50 ms / of t d n l k g s"
        " z th ch r (lower is better)",
        "jaw_corr: JawOpen vs the phoneme-driven JawOpen; latency: audio needed past a frame"
        " before it is emitted; baseline frames/s: offline, whole utterances",
    ]
    if r["unknown_phonemes"]:
        lines.append(f"unknown phonemes: {r['unknown_phonemes']}")
    return "\n".join(lines)


def summary_line(r: dict) -> str:
    return (f"closure_recall={r['closure_recall']:.3f} jaw_corr={r['jaw_corr']:.3f} "
            f"lookahead_ms={r['lookahead_ms']:.1f} frames_per_s={r['frames_per_s']:.0f}")


def main(sentences: list[str] | None = None) -> None:
    r = run(sentences)
    print(format_table(r))
    print(summary_line(r))


if __name__ == "__main__":
    main()
