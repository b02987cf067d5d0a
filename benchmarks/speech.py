"""Synthesized speech for the tests and benchmarks: one function, espeak-ng through the TTS
stage's own binding (the default install has it; no audio files to ship)."""

from __future__ import annotations

import numpy as np
import soxr


def speech(text: str, rate: int = 16000, channels: int = 1, voice: str = "en-us",
           lead_s: float = 0.2, tail_s: float = 0.2) -> np.ndarray:
    """espeak-ng speaking ``text`` at ``rate``: int16 frames (n, channels), with ``lead_s`` of
    silence before and ``tail_s`` after. Channels after the first are scaled by 0.8, so a
    downmix is really exercised."""
    from workers.tts.espeak import EspeakSynth

    synth = EspeakSynth()
    pcm = np.concatenate([c.pcm for c in synth.synthesize(text, voice=voice)]).astype(np.float32)
    pcm /= 32768.0
    if rate != synth.sample_rate:
        pcm = soxr.resample(pcm, synth.sample_rate, rate)
    pcm = np.concatenate([np.zeros(int(lead_s * rate), np.float32), pcm,
                          np.zeros(int(tail_s * rate), np.float32)])
    frames = np.repeat(pcm[:, None], channels, axis=1)
    if channels > 1:
        frames[:, 1:] *= 0.8
    return (np.clip(frames, -1, 1) * 32767).astype(np.int16)


def speech_16k(text: str, pad_s: float = 0.0) -> np.ndarray:
    """Mono float32 at 16 kHz (what STT and the VAD work on), ``pad_s`` of silence around."""
    return speech(text, 16000, lead_s=pad_s, tail_s=pad_s)[:, 0].astype(np.float32) / 32768
