"""MicConverter: any client mic format to 16 kHz mono float32, streaming."""

import numpy as np
import pytest

from workers.stt.audio import SAMPLE_FORMATS, MicConverter
from workers.stt.resample import Resampler

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
    # out within ~50 ms (a loose bound; the per-rate test below is the tight one).
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


# --- the resampler itself ------------------------------------------------------------------

def chunked(rs, x, sizes):
    out, i = [], 0
    for n in sizes:
        out.append(rs.push(x[i:i + n]))
        i += n
    out.append(rs.push(x[i:]))
    out.append(rs.flush())
    return np.concatenate(out)


def twenty_ms(x, rate):
    """Chunk sizes of 20 ms each, exact on average (11025 Hz alternates 220 and 221)."""
    n = len(x) * 50 // rate
    return [k * rate // 50 - (k - 1) * rate // 50 for k in range(1, n + 1)]


def level_db(rate, freq, out_rate=16000, seconds=1.0):
    x = sine(freq, rate, seconds)[:, 0].astype(np.float32)
    y = chunked(Resampler(rate, out_rate), x, twenty_ms(x, rate))
    mid = y[len(y) // 4: 3 * len(y) // 4]
    return 20 * np.log10(np.sqrt(2 * np.mean(mid.astype(np.float64) ** 2)) / 0.5)


@pytest.mark.parametrize("rate", [8000, 11025, 22050, 44100, 48000, 192000])
def test_every_20ms_chunk_comes_out_at_once(rate):
    # No block buffering: after the first chunk (which holds back the kernel's half-width),
    # each push returns 320 +- 1 samples and the total is never more than 3 ms behind.
    conv = MicConverter(rate, 1, "s16le")
    produced = 0
    for k, n in enumerate(twenty_ms(np.zeros(rate * 2), rate), start=1):
        got = len(conv.push((np.zeros(n, np.int16) + 100).tobytes()))
        if k > 1:
            assert abs(got - 320) <= 1, (k, got)
        produced += got
        assert k * 320 - produced <= 48, (k, produced)


@pytest.mark.parametrize("rate,out_rate", [(44100, 16000), (8000, 16000), (48000, 16000),
                                           (11025, 16000), (16000, 44100), (22050, 48000)])
def test_any_chunking_gives_the_same_output(rate, out_rate):
    x = np.random.default_rng(3).standard_normal(rate // 2).astype(np.float32)
    whole = chunked(Resampler(rate, out_rate), x, [])
    sizes = list(np.random.default_rng(5).integers(0, 900, size=200))
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), len(x))]
    np.testing.assert_allclose(chunked(Resampler(rate, out_rate), x, sizes), whole, atol=1e-6)
    assert abs(len(whole) - len(x) * out_rate / rate) <= 2


@pytest.mark.parametrize("rate,freqs", [(44100, (1000, 6500)), (48000, (1000, 6500)),
                                        (8000, (1000, 3500))])
def test_passband_keeps_its_level(rate, freqs):
    for f in freqs:
        assert abs(level_db(rate, f)) < 0.5, f


@pytest.mark.parametrize("rate", [44100, 48000])
@pytest.mark.parametrize("freq", [9000, 12000])
def test_what_would_alias_is_removed(rate, freq):
    assert level_db(rate, freq) < -50


@pytest.mark.parametrize("rate,out_rate", [(44100, 16000), (8000, 16000), (48000, 16000),
                                           (22050, 16000), (16000, 44100), (192000, 16000)])
@pytest.mark.parametrize("k", [0, 1, 777, 4321])
def test_a_click_lands_at_its_own_time(rate, out_rate, k):
    x = np.zeros(6000, np.float32)
    x[k] = 1.0
    y = chunked(Resampler(rate, out_rate), x, twenty_ms(x, rate))
    assert abs(int(np.argmax(y)) - round(k * out_rate / rate)) <= 1


def test_no_drift_over_a_long_stream():
    rs, step, total_in, total_out = Resampler(44100, 16000), 882, 0, 0
    block = np.zeros(step, np.float32)
    for _ in range(3000):  # 60 s in 20 ms chunks
        total_out += len(rs.push(block))
        total_in += step
    total_out += len(rs.flush())
    assert abs(total_out - total_in * 16000 / 44100) <= 2


def _tone(idx, freq, rate):
    """sin(2 pi freq t) at integer sample indices, exact however large the index."""
    return np.sin(2 * np.pi * ((np.asarray(idx, np.int64) * freq) % rate) / rate)


@pytest.mark.parametrize("rate,out_rate", [(192000, 16000), (191999, 192000), (44100, 48000)])
def test_positions_stay_exact_after_ten_hours(rate, out_rate):
    # Put the stream where 10 h of input would leave it (history filled with the tone), go
    # on with the same tone: the output must be that tone at the exact output times (no drift,
    # no int64 overflow in n * M).
    rs, freq = Resampler(rate, out_rate), 1000
    received = rate * 3600 * 10
    n0 = ((received - rs.W) * rs.L + rs.M - 1) // rs.M
    base = (n0 * rs.M) // rs.L - (rs.W - 1)
    rs._received, rs._n, rs._base = received, n0, base
    rs._buf = _tone(np.arange(base, received), freq, rate).astype(np.float32)
    y = rs.push(_tone(np.arange(received, received + rate // 10), freq, rate).astype(np.float32))
    assert abs(len(y) - out_rate // 10) <= 1
    want = _tone(np.arange(n0, n0 + len(y)), freq, out_rate)
    assert np.abs(y - want).max() < 2e-3


def test_odd_rate_pair_with_a_huge_table_still_works():
    rs = Resampler(191999, 16000)  # L = 16000 phases would not fit: rounded phases
    assert rs.phases < rs.L and rs._table.nbytes <= 4 << 20
    x = sine(1000, 191999, 0.5)[:, 0].astype(np.float32)
    y = chunked(rs, x, twenty_ms(x, 191999))
    assert abs(len(y) - 8000) <= 2 and abs(dominant_hz(y) - 1000) < 3
    assert 0.49 < np.abs(y[800:-800]).max() < 0.51


def test_common_rates_use_exact_phases():
    for rate in (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000, 176400,
                 192000):
        for out_rate in (16000, 48000):
            rs = Resampler(rate, out_rate)
            assert rs.phases == rs.L and rs._table.nbytes <= 4 << 20


def test_speed():
    import time
    rs, x = Resampler(48000, 16000), np.zeros(960, np.float32)
    t0 = time.perf_counter()
    for _ in range(500):  # 10 s of 48 kHz in 20 ms chunks
        rs.push(x)
    assert time.perf_counter() - t0 < 0.5


def test_resampler_flush_ends_the_stream():
    rs = Resampler(44100, 16000)
    rs.push(np.ones(882, np.float32))
    assert len(rs.flush()) > 0 and len(rs.flush()) == 0
    with pytest.raises(RuntimeError, match="flush"):
        rs.push(np.ones(10, np.float32))
