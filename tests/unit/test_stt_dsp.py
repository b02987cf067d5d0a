"""STT's Sans-I/O parts: format conversion and resampling, VAD, the pooled recognizer."""

import time

import numpy as np
import pytest

from tests.conftest import speech
from workers.stt.audio import MicConverter
from workers.stt.vad import Vad


def tone(freq, rate, seconds, channels=1, amp=0.5):
    t = np.arange(int(rate * seconds)) / rate
    x = amp * np.sin(2 * np.pi * freq * t)
    return np.repeat(x[:, None], channels, axis=1)


def encode(x, fmt):
    if fmt == "s16le":
        return (x * 32767).astype("<i2").tobytes()
    return x.astype("<f4").tobytes()


def dominant_hz(y, rate=16000):
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return np.argmax(spec) * rate / len(y)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000])
@pytest.mark.parametrize("channels,fmt", [(1, "s16le"), (2, "s16le"), (2, "f32le")])
def test_any_format_becomes_16k_mono_with_the_right_pitch_and_length(rate, channels, fmt):
    x = tone(440, rate, 1.0, channels)
    conv = MicConverter(rate, channels, fmt)
    y = np.concatenate([conv.push(encode(x, fmt)), conv.flush()])
    assert y.dtype == np.float32
    assert abs(len(y) - 16000) <= 2
    assert abs(dominant_hz(y) - 440) < 3
    assert 0.3 < np.abs(y[1000:-1000]).max() < 0.6


def test_chunking_does_not_change_the_result_even_mid_frame():
    x = tone(300, 44100, 0.5, 2)
    raw = encode(x, "s16le")
    one = MicConverter(44100, 2, "s16le")
    whole = np.concatenate([one.push(raw), one.flush()])
    many = MicConverter(44100, 2, "s16le")
    rng = np.random.default_rng(1)
    parts, i = [], 0
    while i < len(raw):
        n = int(rng.integers(1, 5000))  # odd sizes split sample frames in half
        parts.append(many.push(raw[i:i + n]))
        i += n
    parts.append(many.flush())
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-6)
    assert many.in_samples == len(x)


@pytest.mark.parametrize("args,msg", [
    ((0, 1, "s16le"), "sample rate"), ((16000, 0, "s16le"), "channels"),
    ((16000, 1, "mp3"), "format"),
])
def test_bad_arguments_say_what_is_wrong(args, msg):
    with pytest.raises(ValueError, match=msg):
        MicConverter(*args)


def burst_signal(pause_s):
    rate = 16000
    sil = np.zeros(int(0.5 * rate), np.float32)
    b1 = tone(200, rate, 0.6)[:, 0].astype(np.float32) * 0.3
    gap = np.zeros(int(pause_s * rate), np.float32)
    return np.concatenate([sil, b1, gap, b1, sil, sil]), len(sil), len(sil) + 2 * len(b1) + len(gap)


def test_vad_finds_start_and_end_of_speech():
    x, start, end = burst_signal(0.2)
    ev = Vad(silence_ms=500).push(x)
    assert [e.kind for e in ev] == ["start", "end"]
    assert abs(ev[0].sample - start) <= 320 and abs(ev[1].sample - end) <= 320


def test_vad_keeps_short_pauses_inside_the_utterance_and_splits_long_ones():
    x, _, _ = burst_signal(0.3)
    assert [e.kind for e in Vad(silence_ms=500).push(x)] == ["start", "end"]
    x, _, _ = burst_signal(0.8)
    assert [e.kind for e in Vad(silence_ms=500).push(x)] == ["start", "end", "start", "end"]


def test_vad_ignores_silence_and_faint_noise_and_any_chunking():
    rng = np.random.default_rng(0)
    noise = (rng.standard_normal(16000 * 3) * 1e-4).astype(np.float32)
    assert Vad().push(np.zeros(16000, np.float32)) == [] and Vad().push(noise) == []
    x, _, _ = burst_signal(0.8)
    v, events, i = Vad(), [], 0
    while i < len(x):
        n = int(rng.integers(1, 900))
        events += v.push(x[i:i + n])
        i += n
    assert events == Vad().push(x)


def test_vad_on_real_speech():
    x = speech("Hello there. Who are you?", 16000)[:, 0].astype(np.float32) / 32768
    ev = Vad(silence_ms=500).push(np.concatenate([x, np.zeros(16000, np.float32)]))
    assert ev[0].kind == "start" and ev[-1].kind == "end"
    assert ev[0].sample < 16000 * 0.35


def test_pocketsphinx_recognizes_speech_streams_partials_and_reuses_decoders():
    from workers.stt.pocketsphinx_backend import PocketsphinxBackend

    backend = PocketsphinxBackend()
    backend.warm()
    x = speech("Hello, how are you today?", 16000)[:, 0].astype(np.float32) / 32768
    stream = backend.open_stream()
    partials = [p for i in range(0, len(x), 320) if (p := stream.feed(x[i:i + 320]))]
    text = stream.finish()
    stream.close()
    assert partials, "partial hypotheses while the player speaks"
    assert {"how", "are", "you"} & set(text.split()), text
    t = time.perf_counter()
    again = backend.open_stream()  # from the pool: no model load
    assert time.perf_counter() - t < 0.25  # gross bound: a new decoder costs ~330 ms
    again.feed(np.zeros(16000, np.float32))
    assert again.finish() == ""
    again.close()
