from __future__ import annotations

import math

import numpy as np
import pytest

from schemas.arkit import INDEX, NUM_BLENDSHAPES, NUM_FACE_VALUES
from workers.lipsync.audio_driven import (
    AudioLipsync,
    FaceFrame,
    frame_count,
    frame_sample,
)
from workers.tts.espeak import EspeakSynth

RATES = (16000, 22050, 24000, 48000)
JAW = INDEX["JawOpen"]


def _run(lip: AudioLipsync, pcm: np.ndarray, sizes: list[int] | None = None) -> list[FaceFrame]:
    frames: list[FaceFrame] = []
    if sizes is None:
        frames += lip.push(pcm)
    else:
        pos = 0
        for n in sizes:
            frames += lip.push(pcm[pos : pos + n])
            pos += n
        frames += lip.push(pcm[pos:])
    return frames + lip.flush()


def _random_sizes(rng: np.random.Generator, total: int) -> list[int]:
    sizes = []
    while sum(sizes) < total:
        sizes.append(int(rng.choice([0, 1, 2, 17, 300, 367, 1102, 4000])))
    return sizes


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, int]:
    synth = EspeakSynth()
    text = "Hello there, traveller. The road north is dangerous after dark."
    pcm = np.concatenate([c.pcm for c in synth.synthesize(text)])
    return pcm, synth.sample_rate


def test_frame_helpers() -> None:
    for sr in RATES:
        for i in range(500):
            assert frame_sample(i, sr, 60) == round(i * sr / 60)
        for n in range(0, 3000, 7):
            assert frame_count(n, sr, 60) == math.ceil(n * 60 / sr)


@pytest.mark.parametrize("sr", RATES)
def test_frame_count_and_stamps(sr: int) -> None:
    rng = np.random.default_rng(sr)
    lip = AudioLipsync(sr)
    for n in (0, 1, 2, sr // 60 - 1, sr // 60, sr // 60 + 1, 1000, 12345, sr, sr + 1):
        pcm = (rng.standard_normal(n) * 3000).astype(np.int16)
        for sizes in (None, _random_sizes(rng, n)):
            frames = _run(lip, pcm, sizes)  # flush resets, so the instance is reused
            assert len(frames) == math.ceil(n * 60 / sr), (n, sizes)
            assert [f.index for f in frames] == list(range(len(frames)))
            assert [f.sample for f in frames] == [round(f.index * sr / 60) for f in frames]


def test_values_are_sane() -> None:
    sr = 24000
    rng = np.random.default_rng(1)
    t = np.arange(sr * 2) / sr
    loud = np.concatenate([
        np.sign(np.sin(2 * np.pi * 150 * t[:sr])),  # full-scale square wave
        rng.uniform(-1.0, 1.0, sr),  # full-scale white noise
    ]).astype(np.float32)
    frames = _run(AudioLipsync(sr), loud)
    values = np.stack([f.values for f in frames])
    assert values.dtype == np.float32 and values.shape == (len(frames), NUM_FACE_VALUES)
    assert np.isfinite(values).all()
    assert values[:, :NUM_BLENDSHAPES].min() >= 0.0
    assert values[:, :NUM_BLENDSHAPES].max() <= 1.0
    assert not values[:, NUM_BLENDSHAPES:].any()  # rotations come in a later issue


def test_silence_keeps_mouth_closed() -> None:
    sr = 16000
    frames = _run(AudioLipsync(sr), np.zeros(sr, np.int16))
    values = np.stack([f.values for f in frames])
    assert values[:, JAW].max() < 1e-3
    assert values.max() < 1e-3


def test_speech_drives_jaw(speech: tuple[np.ndarray, int]) -> None:
    pcm, sr = speech
    tail = sr // 2
    audio = np.concatenate([pcm, np.zeros(tail, np.int16)])
    frames = _run(AudioLipsync(sr), audio)
    jaw = np.array([f.values[JAW] for f in frames])
    x = audio.astype(np.float64) / 32768.0
    half = int(0.015 * sr)
    rms = np.array([np.sqrt(np.mean(x[max(0, f.sample - half) : f.sample + half] ** 2))
                    for f in frames])
    assert jaw.std() > 0.1 and jaw.max() > 0.4
    assert np.corrcoef(jaw, rms)[0, 1] > 0.5

    # Closed in the silence after the speech (allowing ~150 ms to relax).
    last_sound = int(np.nonzero(np.abs(pcm) > 300)[0][-1])
    quiet = [f.values[JAW] for f in frames if f.sample > last_sound + int(0.15 * sr)]
    assert len(quiet) > 20
    assert max(quiet) < 0.05


def test_chunking_independence(speech: tuple[np.ndarray, int]) -> None:
    pcm, sr = speech
    rng = np.random.default_rng(7)
    whole = _run(AudioLipsync(sr), pcm)
    as_float = _run(AudioLipsync(sr), pcm.astype(np.float32) / 32768.0, _random_sizes(rng, 5000))
    for _ in range(3):
        split = _run(AudioLipsync(sr), pcm, _random_sizes(rng, len(pcm)))
        assert len(split) == len(whole)
        for a, b in zip(whole, split, strict=True):
            assert (a.index, a.sample) == (b.index, b.sample)
            assert np.array_equal(a.values, b.values)
    assert all(np.array_equal(a.values, b.values) for a, b in zip(whole, as_float, strict=True))


@pytest.mark.parametrize(("sr", "lookahead_ms"), [(22050, 40.0), (16000, 0.0), (48000, 25.0)])
def test_emitted_as_soon_as_window_complete(sr: int, lookahead_ms: float) -> None:
    lip = AudioLipsync(sr, lookahead_ms=lookahead_ms)
    assert lip.lookahead_samples == round(lookahead_ms * sr / 1000)
    assert lip.latency_samples == lip.lookahead_samples + lip.window_samples // 2
    rng = np.random.default_rng(3)
    pcm = (rng.standard_normal(int(0.3 * sr)) * 3000).astype(np.int16)
    received = 0
    seen = 0
    pos = 0
    while pos < len(pcm):
        step = int(rng.integers(1, 10))
        before = received
        frames = lip.push(pcm[pos : pos + step])
        pos += step
        received = min(pos, len(pcm))
        for f in frames:
            need = f.sample + lip.latency_samples
            assert before < need <= received, (f.index, before, need, received)
        seen += len(frames)
    # Every frame whose window is complete was emitted before flush.
    expected = sum(
        1 for i in range(frame_count(len(pcm), sr, 60))
        if frame_sample(i, sr, 60) + lip.latency_samples <= len(pcm)
    )
    assert seen == expected
    assert seen + len(lip.flush()) == frame_count(len(pcm), sr, 60)


def test_rejects_bad_input() -> None:
    lip = AudioLipsync(16000)
    with pytest.raises(ValueError):
        lip.push(np.zeros((10, 2), np.int16))
    with pytest.raises(TypeError):
        lip.push(np.zeros(10, np.int32))
