"""MicConverter: any client mic format to 16 kHz mono float32, streaming."""

import numpy as np
import pytest

from workers.stt.audio import SAMPLE_FORMATS, MicConverter

RATES = [8000, 16000, 22050, 44100, 48000]
LAYOUTS = [(1, "s16le"), (2, "s16le"), (1, "f32le"), (2, "f32le")]


def sine(freq, rate, seconds, channels=1, amp=0.5):
    t = np.arange(round(rate * seconds)) / rate
    x = amp * np.sin(2 * np.pi * freq * t)
    return np.repeat(x[:, None], channels, axis=1)


def encode(x, fmt):
    if fmt == "s16le":
        return np.clip(np.rint(x * 32768), -32768, 32767).astype("<i2").tobytes()
    return x.astype("<f4").tobytes()


def dominant_hz(y, rate=16000):
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    return np.argmax(spec) * rate / len(y)


def convert(conv, raw, chunk_sizes=None):
    if chunk_sizes is None:
        return np.concatenate([conv.push(raw), conv.flush()])
    out, i = [], 0
    for n in chunk_sizes:
        out.append(conv.push(raw[i:i + n]))
        i += n
    assert i >= len(raw)
    out.append(conv.flush())
    return np.concatenate(out)


def test_formats_are_little_endian_int16_and_float32():
    assert SAMPLE_FORMATS["s16le"] == np.dtype("<i2")
    assert SAMPLE_FORMATS["f32le"] == np.dtype("<f4")


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("channels,fmt", LAYOUTS)
def test_sine_keeps_frequency_level_and_length(rate, channels, fmt):
    x = sine(1000, rate, 0.75, channels)
    n = len(x)
    conv = MicConverter(rate, channels, fmt)
    y = convert(conv, encode(x, fmt))
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - n * 16000 / rate) <= 2
    assert conv.in_samples == n
    assert abs(dominant_hz(y) - 1000) < 3
    mid = y[800:-800]
    assert 0.49 < np.abs(mid).max() < 0.51  # passband is flat, scaling is right


@pytest.mark.parametrize("rate,channels,fmt", [
    (44100, 2, "s16le"), (48000, 2, "f32le"), (16000, 2, "s16le"), (22050, 1, "s16le"),
])
def test_odd_byte_splits_match_one_push(rate, channels, fmt):
    raw = encode(sine(440, rate, 0.5, channels), fmt)
    whole = convert(MicConverter(rate, channels, fmt), raw)
    rng = np.random.default_rng(7)
    sizes = list(rng.integers(1, 700, size=len(raw)))  # far more than needed
    split = MicConverter(rate, channels, fmt)
    got = convert(split, raw, sizes[: np.searchsorted(np.cumsum(sizes), len(raw)) + 1])
    np.testing.assert_allclose(got, whole, atol=1e-6)
    assert split.in_samples == len(raw) // (channels * SAMPLE_FORMATS[fmt].itemsize)


def test_partial_frame_waits_for_the_rest():
    conv = MicConverter(16000, 2, "s16le")
    frame = np.array([1000, 3000], "<i2").tobytes()  # one stereo frame, 4 bytes
    assert len(conv.push(frame[:3])) == 0 and conv.in_samples == 0
    out = conv.push(frame[3:])
    assert conv.in_samples == 1
    np.testing.assert_allclose(out, [2000 / 32768])


def test_downmix_averages_channels():
    left = sine(300, 16000, 0.1)[:, 0]
    x = np.stack([left, -left], axis=1)  # opposite phase cancels
    assert np.abs(MicConverter(16000, 2, "f32le").push(encode(x, "f32le"))).max() < 1e-7
    x = np.stack([np.full(160, 0.5), np.zeros(160), np.full(160, 0.25)], axis=1)
    np.testing.assert_allclose(MicConverter(16000, 3, "f32le").push(encode(x, "f32le")), 0.25)


def test_int16_maps_to_minus_one_to_just_under_one():
    raw = np.array([-32768, 0, 32767], "<i2").tobytes()
    np.testing.assert_allclose(MicConverter(16000, 1, "s16le").push(raw),
                               [-1.0, 0.0, 32767 / 32768])


def test_float_garbage_is_contained():
    raw = np.array([np.nan, np.inf, -np.inf, 3.0, -0.5], "<f4").tobytes()
    out = MicConverter(16000, 1, "f32le").push(raw)
    np.testing.assert_allclose(out, [0.0, 1.0, -1.0, 1.0, -0.5])


def test_resampler_latency_is_small_for_20ms_chunks():
    # Streaming matters only if output is not held back: at 48 kHz, 20 ms chunks must come
    # out within ~50 ms (soxr buffers a little and releases in blocks).
    conv = MicConverter(48000, 1, "f32le")
    chunk = encode(sine(440, 48000, 0.02), "f32le")
    produced = 0
    for k in range(1, 101):
        produced += len(conv.push(chunk))
        assert k * 320 - produced <= 800, (k, produced)


def test_same_rate_has_no_delay_and_flush_is_empty():
    conv = MicConverter(16000, 1, "s16le")
    assert len(conv.push(encode(sine(440, 16000, 0.02), "s16le"))) == 320
    assert len(conv.flush()) == 0


def test_empty_push_flush_twice_and_push_after_flush():
    conv = MicConverter(44100, 1, "s16le")
    out = conv.push(b"")
    assert out.dtype == np.float32 and len(out) == 0
    conv.push(encode(sine(440, 44100, 0.1), "s16le"))
    assert len(conv.flush()) > 0
    assert len(conv.flush()) == 0
    with pytest.raises(RuntimeError, match="flush"):
        conv.push(b"\x00\x00")


@pytest.mark.parametrize("args,match", [
    ((0, 1, "s16le"), "sample rate.*got 0"),
    ((-8000, 1, "s16le"), "sample rate.*got -8000"),
    ((192001, 1, "s16le"), "192000"),
    ((16000.5, 1, "s16le"), "integer"),
    ((16000, 0, "s16le"), "channels.*1..8.*got 0"),
    ((16000, 9, "s16le"), "channels.*got 9"),
    ((16000, 1, "mp3"), "sample_format 'mp3'.*f32le, s16le"),
    ((16000, 1, "s16be"), "s16be"),
    ((16000, 1, "s16le", 0), "output sample rate"),
])
def test_bad_arguments_raise_clear_value_errors(args, match):
    with pytest.raises(ValueError, match=match):
        MicConverter(*args)


def test_192k_and_8_channels_are_accepted():
    conv = MicConverter(192000, 8, "s16le")
    y = convert(conv, encode(sine(1000, 192000, 0.1, 8), "s16le"))
    assert abs(len(y) - 1600) <= 2 and abs(dominant_hz(y) - 1000) < 15
