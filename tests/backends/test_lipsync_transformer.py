"""Transformer lipsync backend: features, model, checkpoints, windowing, streaming, batching.

Small models only (width 64, 2+2 layers, 4 heads); the whole file runs in a few seconds on
two cores. Skipped without torch (the default install has none).
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import soxr  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from schemas.arkit import INDEX, NUM_BLENDSHAPES  # noqa: E402
from workers.lipsync import features as ft  # noqa: E402
from workers.lipsync.audio_driven import frame_count, frame_sample  # noqa: E402
from workers.lipsync.transformer_backend import (  # noqa: E402
    EMOTION_NAMES,
    PUBLISHED_ZERO_COLUMNS,
    TransformerLipsync,
    TransformerRunner,
)
from workers.lipsync.transformer_model import (  # noqa: E402
    FaceTransformer,
    ModelConfig,
    apply_rotary,
    config_from_state_dict,
    load_model,
    rotary_tables,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"width": 64, "encoder_layers": 2, "decoder_layers": 2, "heads": 4}
SR = ft.FEATURE_RATE


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny models: a second intra-op thread only adds handoffs, and on a busy 2-core box
    # it measured 8x slower per forward (61 ms vs 7.7 ms). Restored for other modules.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def runner() -> TransformerRunner:
    return TransformerRunner(**SMALL, seed=1)


def _tone(freq: float, seconds: float, sr: int = SR) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)


def _speechy(seconds: float, sr: int, seed: int = 0) -> np.ndarray:
    """Gliding harmonic tone, syllable-rate envelope, a little noise: int16."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    if not len(t):
        return np.zeros(0, np.int16)
    phase = 2 * np.pi * np.cumsum(130 + 25 * np.sin(2 * np.pi * 0.8 * t)) / sr
    y = sum(np.sin(k * phase) / k for k in range(1, 12))
    y *= 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    y = 0.3 * y / np.abs(y).max() + 0.005 * rng.standard_normal(len(t))
    return (y * 32767).astype(np.int16)


# --- features ---------------------------------------------------------------------------------


def test_feature_shapes_and_frame_count():
    for n in (SR, SR + 734, SR + 735, 3 * SR + 123):
        f = ft.extract_features(np.random.default_rng(0).standard_normal(n))
        assert f.shape == (math.ceil((1 + n // 735) / 2), 256) and f.dtype == np.float32
        # The published row count covers every 60 fps frame of the clip (+ at most one).
        assert f.shape[0] - frame_count(n, SR, 60) in (0, 1)
    f = ft.extract_features(_tone(300, 1.0, 22050), sr=22050)  # resampled to 88.2 kHz first
    assert f.shape == (61, 256) and np.isfinite(f).all()
    # MFCCs normalised per coefficient over the clip's 120 Hz frames: mean 0, std 1 there;
    # averaging pairs into 60 fps rows keeps the mean and shrinks the spread a little.
    f = ft.extract_features(_speechy(2.0, SR).astype(np.float64) / 32768)
    assert np.allclose(f[:, :23].mean(axis=0), 0, atol=0.05)
    assert ((f[:, :23].std(axis=0) > 0.5) & (f[:, :23].std(axis=0) <= 1.0)).all()


@pytest.mark.parametrize("freq", [400.0, 1000.0, 3000.0])
def test_mfcc_envelope_of_a_sine_peaks_at_its_band(freq):
    frames = np.lib.stride_tricks.sliding_window_view(_tone(freq, 0.1), ft.FRAME_LENGTH)[::735]
    log_mel = ft._log_mel(frames)
    mfcc = ft.mfcc_from_log_mel(log_mel, log_mel.max() - ft.TOP_DB)
    envelope = mfcc @ ft.dct_matrix(ft.N_MFCC, ft.N_MELS)  # inverse of the orthonormal DCT
    centres = ft._mel_to_hz(np.linspace(0, ft._hz_to_mel(SR / 2), ft.N_MELS + 2))[1:-1]
    peak = centres[np.argmax(envelope.mean(axis=0))]
    # 23 cepstra keep a smooth envelope: its peak lands within a few bands of the tone.
    assert abs(ft._hz_to_mel(peak) - ft._hz_to_mel(freq)) < 3 * (ft._hz_to_mel(SR / 2) / 129)


def test_mel_filterbank_and_dct_basics():
    fb = ft.mel_filterbank(SR, ft.FRAME_LENGTH)
    assert fb.shape == (128, 736) and (fb >= 0).all() and (fb.sum(axis=1) > 0).all()
    # Slaney norm: unit area in Hz, wherever a triangle spans enough 60 Hz FFT bins to
    # sample it (the lowest bands are narrower than a bin at 88.2 kHz / 1470 points).
    edges = ft._mel_to_hz(np.linspace(0, ft._hz_to_mel(SR / 2), 130))
    wide = (edges[2:] - edges[:-2]) > 8 * SR / ft.FRAME_LENGTH
    area = fb.sum(axis=1) * (SR / ft.FRAME_LENGTH)
    assert wide.sum() == 51 and np.allclose(area[wide], 1.0, rtol=0.01)
    d = ft.dct_matrix(128, 128)
    assert np.allclose(d @ d.T, np.eye(128), atol=1e-12)


def test_autocorrelation_of_a_periodic_tone():
    period = 147  # 600 Hz at 88.2 kHz
    y = _tone(SR / period, 0.05)
    ac = ft.autocorrelation(y[None, : ft.FRAME_LENGTH])[0]
    assert ac.shape == (187,)
    assert ac[period - 1] > 0.8  # lag 147 (index 146: lags start at 1)
    assert ac[period // 2 - 1] < -0.8  # half a period: opposite phase
    assert not ft.autocorrelation(np.zeros((1, ft.FRAME_LENGTH))).any()  # silence stays 0


def test_delta_matches_analytic_derivatives_including_edges():
    t = np.arange(30, dtype=np.float64)[:, None]
    assert np.allclose(ft.delta(3.0 * t + 1.0, 1), 3.0)
    assert np.allclose(ft.delta(0.5 * t**2, 2), 1.0)
    assert not ft.delta(t[:8], 1).any()  # shorter than the 9-frame window


def test_feature_stream_is_chunk_invariant_and_matches_offline():
    y = _speechy(3.3, SR, seed=3).astype(np.float64) / 32768
    y[: SR // 10] = 0.0  # digital silence up front exercises the published edge fix
    offline = ft.extract_features(y, normalize=False)

    def stream(chunks, upto):
        s = ft.FeatureStream()
        i = 0
        for c in chunks:
            s.push(y[i : i + c])
            i += c
        assert s.ready(upto)
        early = s.rows(0, upto)
        s.push(y[i:])
        s.finish()
        return early, s.rows(0, s.total_rows)

    rng = np.random.default_rng(0)
    a_early, a_all = stream([int(rng.integers(1, 3000)) for _ in range(80)], 60)
    b_early, b_all = stream([len(y) // 2], 60)
    assert np.array_equal(a_early, b_early) and np.array_equal(a_all, b_all)
    assert np.array_equal(a_all, offline)
    # Early rows use stats of the audio so far; the autocorrelation part is local.
    assert np.array_equal(a_early[:, 69:], offline[:60, 69:])


# --- model ------------------------------------------------------------------------------------


def _published_keys(enc: int, dec: int) -> set[str]:
    """NeuroSync's state-dict names, written out from the published layout."""
    attn = [f"{p}_linear.{w}" for p in "qkvo" for w in ("weight", "bias")]
    attn = [a.replace("o_linear", "out_linear") for a in attn]
    ffn = [f"ffn.linear{i}.{w}" for i in (1, 2) for w in ("weight", "bias")]

    def norms(n):
        return [f"norm{i}.{w}" for i in range(1, n + 1) for w in ("weight", "bias")]

    keys = {"encoder.embedding.weight", "encoder.embedding.bias", "encoder.layer_norm.weight",
            "encoder.layer_norm.bias", "decoder.fc_output.weight", "decoder.fc_output.bias",
            "decoder.layer_norm.weight", "decoder.layer_norm.bias"}
    for i in range(enc):
        p = f"encoder.transformer_encoder.{i}."
        keys |= {p + "self_attn." + a for a in attn} | {p + k for k in ffn + norms(2)}
    for i in range(dec):
        p = f"decoder.transformer_decoder.{i}."
        keys |= {p + m + "." + a for m in ("self_attn", "multihead_attn") for a in attn}
        keys |= {p + k for k in ffn + norms(3)}
    return keys


def _reference_forward(sd: dict, x: torch.Tensor, heads: int) -> torch.Tensor:
    """The published architecture spelled out with plain tensor ops; RoPE as complex
    rotation of interleaved pairs."""
    width = sd["encoder.embedding.weight"].shape[0]

    def lin(t, n):
        return t @ sd[n + ".weight"].T + sd[n + ".bias"]

    def norm(t, n):
        return F.layer_norm(t, (width,), sd[n + ".weight"], sd[n + ".bias"])

    def rope(t):
        b, h, n, d = t.shape
        z = torch.view_as_complex(t.reshape(b, h, n, d // 2, 2).contiguous())
        ang = torch.arange(n)[:, None] * 10000.0 ** (-torch.arange(0, d, 2) / d)
        return torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang)).reshape(t.shape)

    def attn(q_in, kv_in, n):
        def split(t):
            return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

        q, k, v = (split(lin(t, f"{n}.{p}_linear")) for t, p in
                   ((q_in, "q"), (kv_in, "k"), (kv_in, "v")))
        w = torch.softmax(rope(q) @ rope(k).transpose(-1, -2) / math.sqrt(q.shape[-1]), -1)
        return lin((w @ v).transpose(1, 2).reshape(q_in.shape), n + ".out_linear")

    def ffn(t, n):
        return lin(torch.relu(lin(t, n + ".ffn.linear1")), n + ".ffn.linear2")

    h = lin(x, "encoder.embedding")
    i = 0
    while f"encoder.transformer_encoder.{i}.norm1.weight" in sd:
        p = f"encoder.transformer_encoder.{i}"
        h = norm(h + attn(h, h, p + ".self_attn"), p + ".norm1")
        h = norm(h + ffn(h, p), p + ".norm2")
        i += 1
    mem = norm(h, "encoder.layer_norm")
    h, i = mem, 0
    while f"decoder.transformer_decoder.{i}.norm1.weight" in sd:
        p = f"decoder.transformer_decoder.{i}"
        h = norm(h + attn(h, h, p + ".self_attn"), p + ".norm1")
        h = norm(h + attn(h, mem, p + ".multihead_attn"), p + ".norm2")
        h = norm(h + ffn(h, p), p + ".norm3")
        i += 1
    return lin(norm(h, "decoder.layer_norm"), "decoder.fc_output")


def _small_model(seed: int = 0, **kw) -> FaceTransformer:
    torch.manual_seed(seed)
    return FaceTransformer(ModelConfig(**{**SMALL, **kw})).eval()


def test_model_shapes_names_and_reference_math():
    model = _small_model()
    x = torch.randn(3, 40, 256)
    with torch.no_grad():
        y = model(x)
        ref = _reference_forward(model.state_dict(), x, heads=4)
    assert y.shape == (3, 40, 68)
    assert set(model.state_dict()) == _published_keys(2, 2)
    assert torch.allclose(y, ref, atol=1e-4)
    with torch.device("meta"):  # published sizes (1024 wide, 8 + 8 layers), no memory
        full = FaceTransformer(ModelConfig())
    assert set(full.state_dict()) == _published_keys(8, 8)
    assert sum(p.numel() for p in full.parameters()) == 235_480_132


def test_trainer_lite_variant_shares_names_but_not_outputs(tmp_path):
    plain = _small_model(seed=2)
    torch.save(plain.state_dict(), tmp_path / "m.pth")
    wide = load_model(tmp_path / "m.pth", heads=4, global_rope=True)  # same tensors load
    x = torch.randn(1, 32, 256)
    with torch.no_grad():
        assert wide(x).shape == (1, 32, 68)
        assert not torch.allclose(wide(x), plain(x), atol=1e-3)


def test_rotary_scores_depend_only_on_position_difference():
    dim = 16
    cos, sin = rotary_tables(64, dim, 10000.0)
    q, k = torch.randn(dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)

    def score(m, n):
        qm = apply_rotary(q[None], cos[m : m + 1].double(), sin[m : m + 1].double())
        kn = apply_rotary(k[None], cos[n : n + 1].double(), sin[n : n + 1].double())
        return float((qm * kn).sum())

    for m, n in ((5, 2), (2, 5), (9, 9), (30, 1)):
        for shift in (1, 7, 20):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), abs=1e-5)
    assert score(0, 0) == pytest.approx(float(q @ k))  # position 0: no rotation
    assert score(5, 2) != pytest.approx(score(5, 3))  # but positions do matter
    rotated = apply_rotary(q.float()[None].repeat(64, 1), cos, sin)
    assert torch.allclose(rotated.norm(dim=-1), q.float().norm().expand(64))  # a rotation


def test_checkpoint_round_trip_strict(tmp_path):
    model = _small_model(seed=5)
    x = torch.randn(2, 128, 256)
    with torch.no_grad():
        want = model(x)
    bare = tmp_path / "model.pth"  # published: torch.save(model.state_dict())
    torch.save(model.state_dict(), bare)
    trainer = tmp_path / "checkpoint.pth"  # trainer format: nested, with extras
    torch.save({"model_state_dict": model.state_dict(), "epoch": 3, "config": {"lr": 1e-4}},
               trainer)
    for path in (bare, trainer):
        loaded = load_model(path, heads=4)
        assert loaded.cfg == model.cfg
        with torch.no_grad():
            assert torch.equal(loaded(x), want)
    sd = model.state_dict()
    assert config_from_state_dict(sd, heads=4) == model.cfg
    sd.pop("decoder.fc_output.bias")
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(RuntimeError, match="Missing key"):
        load_model(tmp_path / "broken.pth", heads=4)
    # The runner infers sizes from the checkpoint and rejects conflicting settings.
    r = TransformerRunner(checkpoint=str(bare), heads=4)
    assert r.config == model.cfg
    w = x[0].numpy()
    assert np.array_equal(r.infer_windows([w])[0], want[0].numpy())
    with pytest.raises(ValueError, match="width"):
        TransformerRunner(checkpoint=str(bare), heads=4, width=128)


# --- windowing, streaming, batching -----------------------------------------------------------


class _StubRunner:
    """Window k gives a ramp ``frame * 0.5`` plus an offset ``10 * k`` on every output."""

    output_dim = 68

    def __init__(self):
        self.windows: list[np.ndarray] = []

    def infer_windows(self, batch):
        out = []
        for w in batch:
            k = len(self.windows)
            self.windows.append(w)
            start = 96 * k
            ramp = 0.5 * np.arange(start, start + len(w), dtype=np.float32)
            out.append(np.repeat((ramp + 10.0 * k)[:, None], 68, axis=1))
        return out


def test_windows_and_linear_crossfade():
    stub = _StubRunner()
    rate = 22050
    n_frames = 400  # windows at 0, 96, 192, 288 (its 112 real rows padded to 128)
    pcm = _speechy(n_frames / 60, rate)
    lip = TransformerLipsync(None, rate, runner=stub, zero_columns=(), ease_in_frames=0,
                             output_scale=1.0)
    frames = []
    for i in range(0, len(pcm), 735):
        frames += lip.push(pcm[i : i + 735])
    frames += lip.flush()
    assert [f.index for f in frames] == list(range(n_frames))
    starts = [0, 96, 192, 288, 384]
    assert len(stub.windows) == len(starts)  # a window starts at every 96 while < 400
    assert all(w.shape == (128, 256) for w in stub.windows)
    # Windows are the feature rows at their starts (same audio, one offline pass).
    y88 = soxr.resample(pcm.astype(np.float64) / 32768, rate, SR)
    s = ft.FeatureStream()
    s.push(y88)
    s.finish()
    assert np.allclose(stub.windows[-1][:16], s.rows(384, 400), atol=1e-5)
    assert np.array_equal(stub.windows[-1][16:], np.repeat(stub.windows[-1][15:16], 112, 0))
    jaw = np.array([f.values[INDEX["JawOpen"]] for f in frames])
    idx = np.arange(n_frames)
    k = np.minimum(idx // 96, 4)
    want = 0.5 * idx + 10.0 * k
    for b in starts[1:]:  # overlap [b, b + ov): weight i / ov on the newer window
        ov = min(32, n_frames - b)
        i = np.arange(ov)
        want[b : b + ov] = 0.5 * (b + i) + 10.0 * (b // 96 - 1) + 10.0 * i / ov
    rot = np.array([f.values[INDEX["HeadYaw"]] for f in frames])  # rotations are not clipped
    assert np.allclose(rot, want, atol=1e-4)
    assert np.allclose(jaw, np.clip(want, 0.0, 1.0))  # blendshapes are
    # Continuity: each window's 10-unit offset is spread over its fade (a hard cut would
    # jump 10.5); the last window's fade is its own 16 rows.
    steps = np.diff(rot)
    assert np.abs(steps[:383] - 0.5).max() <= 10.0 / 32 + 1e-4
    assert np.abs(steps[383:] - 0.5).max() <= 10.0 / 16 + 1e-4


def test_streaming_frame_count_stamps_and_chunking(runner):
    rng = np.random.default_rng(7)
    for rate, seconds in ((22050, 0.0), (22050, 0.004), (24000, 1.1), (16000, 2.3),
                          (44100, 3.4), (88200, 2.5)):
        pcm = _speechy(seconds, rate, seed=1)
        out = {}
        for name, size in (("small", rate // 30), ("random", 0), ("whole", len(pcm) + 1)):
            lip = TransformerLipsync(None, rate, runner=runner)
            frames, i = [], 0
            while i < len(pcm):
                step = size or int(rng.integers(1, 4000))
                frames += lip.push(pcm[i : i + step])
                i += step
            frames += lip.flush()
            n = frame_count(len(pcm), rate, 60)
            assert [f.index for f in frames] == list(range(n)), (rate, seconds, name)
            assert [f.sample for f in frames] == [frame_sample(j, rate, 60) for j in range(n)]
            values = np.zeros((0, 61), np.float32)
            if frames:
                values = np.stack([f.values for f in frames])
            assert values.dtype == np.float32 and values.shape == (n, 61)
            out[name] = values
        for name in ("random", "whole"):
            np.testing.assert_allclose(out[name], out["small"], atol=1e-5)
        v = out["small"]
        assert ((v[:, :NUM_BLENDSHAPES] >= 0) & (v[:, :NUM_BLENDSHAPES] <= 1)).all()
        assert not v[:, list(PUBLISHED_ZERO_COLUMNS)].any()
        if len(v):
            assert not v[0].any()  # the published 0.1 s ease-in starts at 0


def test_frames_arrive_within_one_window_and_emotions(runner):
    rate = 22050
    pcm = _speechy(5.0, rate)
    lip = TransformerLipsync(None, rate, runner=runner)
    got = 0
    for i in range(0, len(pcm), 441):
        frames = lip.push(pcm[i : i + 441])
        assert lip.emotions.shape == (len(frames), len(EMOTION_NAMES))
        got += len(frames)
        heard = frame_count(i + 441, rate, 60)
        # Never ahead of the audio; behind it by at most a window plus 33 ms of delta
        # look-ahead, soxr's output block (<= 38 ms) and this 20 ms push: 8 frames.
        assert heard - 128 - 8 <= got <= heard
    assert got > 0  # frames left before the end of the stream
    tail = lip.flush()
    assert got + len(tail) == frame_count(len(pcm), rate, 60)


def test_batched_inference_equals_per_item(runner):
    rng = np.random.default_rng(2)
    windows = [rng.standard_normal((128, 256)).astype(np.float32) for _ in range(5)]
    windows.append(rng.standard_normal((40, 256)).astype(np.float32))  # odd length: own batch
    batched = runner.infer_windows(windows)
    single = [runner.infer_windows([w])[0] for w in windows]
    assert [b.shape for b in batched] == [(128, 68)] * 5 + [(40, 68)]
    for b, s in zip(batched, single, strict=True):
        np.testing.assert_allclose(b, s, atol=1e-5)


def test_micro_batched_sessions_match_solo_sessions(runner):
    rate = 22050
    clips = [_speechy(s, rate, seed=i) for i, s in enumerate((2.6, 0.7, 3.3))]
    solo = []
    for pcm in clips:
        lip = TransformerLipsync(None, rate, runner=runner)
        solo.append(lip.push(pcm) + lip.flush())
    lips = [TransformerLipsync(None, rate, runner=runner) for _ in clips]
    got: list[list] = [[] for _ in clips]
    longest = max(map(len, clips))
    for i in range(0, longest + 2205, 2205):  # 100 ms ticks; a clip ends on its first short tick
        pending = []
        for s, (lip, pcm) in enumerate(zip(lips, clips, strict=True)):
            if i < len(pcm):
                pending.append((s, lip.feed(pcm[i : i + 2205])))
            elif i - 2205 < len(pcm):
                pending.append((s, lip.feed_end()))
        outs = runner.infer_windows([w for _, ws in pending for w in ws])  # one batch
        for s, ws in pending:
            got[s] += lips[s].deliver(outs[: len(ws)])
            outs = outs[len(ws) :]
    for a, b in zip(got, solo, strict=True):
        assert [f.index for f in a] == [f.index for f in b]
        np.testing.assert_allclose(np.stack([f.values for f in a]),
                                   np.stack([f.values for f in b]), atol=1e-5)


def test_settings_are_checked(runner):
    with pytest.raises(ValueError, match="60 fps"):
        TransformerLipsync(None, 22050, fps=30, runner=runner)
    with pytest.raises(ValueError, match="overlap"):
        TransformerLipsync(None, 22050, window=32, overlap=32, runner=runner)


def test_default_install_imports_no_torch():
    code = ("import sys; import workers.lipsync.stage, workers.lipsync.features, "
            "workers.lipsync.transformer_backend; assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
