"""Whisper STT backends on CPU, offline.

faster-whisper runs for real: a tiny random-weight Whisper is built with transformers (its
tokenizer made here from the 256 byte-level symbols plus Whisper's special tokens, since no
vocab files can be downloaded), converted to CTranslate2 int8 and decoded through
FasterWhisperBackend. Random weights give nonsense text; the point is that the whole path runs.

whisperX: the cross-session batching glue (through the real workers.batching.MicroBatcher),
window splitting and result parsing are tested everywhere with a stand-in for the batched model
call (FakeWhisperXModel, a test double). The real whisperX path (whisperx.load_model on the same
tiny CTranslate2 model, its batched decode) runs only where whisperX imports: its torch 2.8
stack is kept out of the project venv, in the one scripts/backend-env.sh whisperx builds.
"""

from __future__ import annotations

import concurrent.futures
import re
import sys
import threading
import time

import numpy as np
import pytest

from workers.stt.faster_whisper_backend import FasterWhisperBackend
from workers.stt.whisperx_backend import (
    RATE,
    WINDOW,
    WhisperXBackend,
    segment_text,
    split_windows,
    transcript_from_result,
)

SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>",
            "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
            "<|notimestamps|>"]
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>; the converter names them from vocab_size


def _audio(seconds: float, seed: int = 0) -> np.ndarray:
    """A warbling tone in noise: something that is not silence."""
    t = np.arange(int(seconds * RATE)) / RATE
    tone = 0.3 * np.sin(2 * np.pi * (200 + 50 * np.sin(2 * np.pi * 3 * t)) * t)
    return (tone + 0.02 * np.random.default_rng(seed).standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_whisper_dir(tmp_path_factory):
    """A CTranslate2 int8 Whisper (d_model 64, 2+2 layers) with a tokenizer.json, built once."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    converters = pytest.importorskip("ctranslate2.converters")
    pytest.importorskip("faster_whisper")
    from tokenizers import decoders, models, pre_tokenizers

    t0 = time.perf_counter()
    root = tmp_path_factory.mktemp("tiny-whisper")
    hf_dir, ct2_dir = root / "hf", root / "ct2"
    # Byte-level BPE without merges: every byte is a token, so any text round-trips.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {sym: i for i, sym in enumerate(alphabet)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    eot = len(vocab)
    hf_tok = transformers.WhisperTokenizerFast(
        tokenizer_object=tok, unk_token=SPECIALS[0], bos_token=SPECIALS[0],
        eos_token=SPECIALS[0], pad_token=SPECIALS[0])
    n_text = len(hf_tok)
    config = transformers.WhisperConfig(
        vocab_size=n_text + N_TIMESTAMPS, num_mel_bins=80, d_model=64,
        encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
        max_source_positions=1500, max_target_positions=448,
        decoder_start_token_id=eot + 1, pad_token_id=eot, bos_token_id=eot, eos_token_id=eot,
        # WhisperConfig's defaults name GPT-2-vocabulary ids (50256): beyond this vocabulary
        # they made CTranslate2 write out of bounds (segfaults at exit, run-to-run garbage).
        suppress_tokens=[], begin_suppress_tokens=[vocab["Ġ"], eot])
    torch.manual_seed(0)
    model = transformers.WhisperForConditionalGeneration(config)
    with torch.no_grad():  # output embedding is tied: only letters (and space) can win
        emb = model.model.decoder.embed_tokens.weight
        keep = [vocab[c] for c in "abcdefghijklmnopqrstuvwxyz"] + [vocab["Ġ"]]
        mask = torch.zeros(emb.shape[0], dtype=torch.bool)
        mask[keep] = True
        emb[~mask] = 0
        emb[mask] *= 8
    model.save_pretrained(hf_dir)
    hf_tok.save_pretrained(hf_dir)
    converters.TransformersConverter(str(hf_dir), copy_files=["tokenizer.json"]).convert(
        str(ct2_dir), quantization="int8")
    print(f"tiny whisper built and converted in {time.perf_counter() - t0:.1f} s")
    return ct2_dir


# --- faster-whisper, for real -------------------------------------------------------------

def test_tiny_whisper_streams_partials_and_a_final(tiny_whisper_dir):
    backend = FasterWhisperBackend(str(tiny_whisper_dir), device="cpu", compute_type="int8",
                                   partial_every_s=0.5, max_new_tokens=32)
    t0 = time.perf_counter()
    backend.warm()
    warm_s = time.perf_counter() - t0
    audio = _audio(2.0)
    stream = backend.open_stream()
    partials = []
    t0 = time.perf_counter()
    for i in range(0, len(audio), 320):  # 20 ms chunks, as the stage feeds them
        p = stream.feed(audio[i:i + 320])
        assert p is None or isinstance(p, str)
        if p is not None:
            partials.append(p)
    feed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    text = stream.finish()
    finish_s = time.perf_counter() - t0
    stream.close()
    print(f"warm {warm_s:.2f} s, feed 2 s audio {feed_s:.2f} s ({len(partials)} partials), "
          f"finish {finish_s:.3f} s: {text!r}")
    assert isinstance(text, str) and text
    assert re.fullmatch(r"[a-z ]+", text), "one line of the letters the model can emit"
    assert partials and all(partials), "a new, non-empty partial was decoded"
    assert stream.finish() == text, "finish() is idempotent"
    assert finish_s < 10 and feed_s < 20, "a tiny model decodes 2 s of audio in well under that"


def test_finish_without_partials_and_streams_from_threads(tiny_whisper_dir):
    backend = FasterWhisperBackend(str(tiny_whisper_dir), device="cpu", compute_type="int8",
                                   partial_every_s=0, max_new_tokens=16)
    stream = backend.open_stream()
    assert all(stream.feed(c) is None for c in np.array_split(_audio(1.0), 10))
    expected = stream.finish()
    # Sessions share the model: concurrent streams in worker threads, as the stage runs them.
    def one(_):
        with backend.open_stream() as s:
            s.feed(_audio(1.0))
            return s.finish()

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        assert list(pool.map(one, range(3))) == [expected] * 3
    empty = backend.open_stream()
    assert empty.finish() == "", "no audio, no decode"
    with pytest.raises(RuntimeError, match="finished"):
        empty.feed(_audio(0.1))


def test_unloadable_models_say_why(tiny_whisper_dir):
    hub = FasterWhisperBackend("parley-test/no-such-whisper", device="cpu",
                               local_files_only=True)
    with pytest.raises(RuntimeError, match=r"could not load model .*Hugging Face Hub"):
        hub.warm()
    with pytest.raises(RuntimeError, match="no such directory"):
        FasterWhisperBackend("/nonexistent/whisper-ct2", device="cpu").warm()


@pytest.mark.parametrize("kwargs", [{"device": "tpu"}, {"compute_type": "int3"},
                                    {"beam_size": 0}, {"partial_every_s": -1},
                                    {"max_new_tokens": 0}])
def test_faster_whisper_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        FasterWhisperBackend("small.en", **kwargs)


def test_faster_whisper_without_the_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_whisper", None)  # import now fails
    with pytest.raises(ImportError, match=r"stt-faster-whisper"):
        FasterWhisperBackend("small.en")


# --- whisperX: the batching glue, with a stand-in model call ------------------------------

class FakeWhisperXModel:
    """TEST DOUBLE for the batched whisperX call: one text per window, named after the
    window's level (each test utterance is a constant level), as whisperX's
    generate_segment_batched returns them (leading space)."""

    def __init__(self, fail: Exception | None = None, short_by: int = 0):
        self.batches: list[int] = []
        self.fail = fail
        self.short_by = short_by
        self.lock = threading.Lock()

    def __call__(self, windows):
        with self.lock:
            self.batches.append(len(windows))
        assert all(len(w) <= WINDOW for w in windows), "never more than Whisper's 30 s"
        if self.fail:
            raise self.fail
        texts = [f" utterance {round(float(np.max(np.abs(w))) * 100)}" for w in windows]
        return texts[: len(texts) - self.short_by]


def _level(k: int, seconds: float = 1.0) -> np.ndarray:
    return np.full(int(seconds * RATE), k / 100, np.float32)


@pytest.fixture
def whisperx_backend():
    made = []

    def make(model_call, **kwargs):
        kwargs.setdefault("window_ms", 50.0)  # wide, so that thread start-up jitter fits
        b = WhisperXBackend("large-v3", model_call=model_call, **kwargs)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def _finish_concurrently(backend, levels):
    barrier = threading.Barrier(len(levels))

    def session(k):
        stream = backend.open_stream()
        for piece in np.array_split(_level(k), 5):
            assert stream.feed(piece) is None, "whisperX gives no partials"
        barrier.wait()
        try:
            return stream.finish()
        finally:
            stream.close()

    with concurrent.futures.ThreadPoolExecutor(len(levels)) as pool:
        return list(pool.map(session, levels))


def test_concurrent_finishes_are_decoded_in_one_batch(whisperx_backend):
    model = FakeWhisperXModel()
    backend = whisperx_backend(model, batch_size=8)
    levels = [11, 22, 33, 44, 55, 66]
    assert _finish_concurrently(backend, levels) == [f"utterance {k}" for k in levels]
    assert sum(model.batches) == len(levels)
    assert max(model.batches) > 1 and len(model.batches) < len(levels), model.batches


def test_batch_size_bounds_every_model_call(whisperx_backend):
    model = FakeWhisperXModel()
    backend = whisperx_backend(model, batch_size=3)
    levels = list(range(10, 30))
    assert _finish_concurrently(backend, levels) == [f"utterance {k}" for k in levels]
    assert max(model.batches) <= 3 and sum(model.batches) == len(levels)


def test_long_utterances_are_cut_in_quiet_frames_and_joined_in_order(whisperx_backend):
    # 70 s: loud, with a quiet 20 ms at 29.5 s and at 59 s; levels name the windows.
    audio = np.concatenate([_level(10, 29.5), np.zeros(320, np.float32), _level(20, 29.48),
                            np.zeros(320, np.float32), _level(30, 11.0)])
    pieces = split_windows(audio)
    assert [round(s / RATE, 2) for s, _ in pieces] == [0.0, 29.52, 59.02]
    assert all(len(p) <= WINDOW for _, p in pieces)
    assert np.array_equal(np.concatenate([p for _, p in pieces]), audio)
    model = FakeWhisperXModel()
    backend = whisperx_backend(model, batch_size=2)
    stream = backend.open_stream()
    stream.feed(audio)
    assert stream.finish() == "utterance 10 utterance 20 utterance 30"
    assert model.batches == [2, 1], "3 windows at batch_size 2"
    assert split_windows(np.zeros(0, np.float32)) == []


def test_empty_utterance_never_reaches_the_model(whisperx_backend):
    model = FakeWhisperXModel()
    stream = whisperx_backend(model).open_stream()
    assert stream.finish() == "" and model.batches == []


def test_model_errors_reach_every_waiting_session(whisperx_backend):
    backend = whisperx_backend(FakeWhisperXModel(fail=RuntimeError("CUDA out of memory")))
    with pytest.raises(RuntimeError, match="out of memory"):
        _finish_concurrently(backend, [1, 2, 3])
    backend = whisperx_backend(FakeWhisperXModel(short_by=1))
    with pytest.raises(RuntimeError, match="2 texts for 3 windows"):
        backend._decode_batch([_level(1), _level(2), _level(3)])


def test_whisperx_documented_result_format_is_read():
    result = {"segments": [{"text": " Halt! Who goes there?", "start": 0.0, "end": 1.4},
                           {"text": "  ", "start": 1.4, "end": 1.6},
                           {"text": " I am\na friend.", "start": 1.6, "end": 2.9,
                            "words": [{"word": "I", "start": 1.6, "end": 1.7}]}],
              "language": "en"}
    assert transcript_from_result(result) == "Halt! Who goes there? I am a friend."
    assert transcript_from_result({"segments": [], "language": "en"}) == ""
    with pytest.raises(ValueError):
        transcript_from_result({"text": "no segments"})
    assert segment_text(" hi") == " hi"
    assert segment_text({"text": " hi"}) == " hi"
    assert segment_text({"text": [" hi"]}) == " hi"
    with pytest.raises(TypeError):
        segment_text(42)


@pytest.mark.parametrize("kwargs", [{"batch_size": 0}, {"device": "tpu"}, {"language": ""},
                                    {"beam_size": 0}, {"window_ms": -1}])
def test_whisperx_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        WhisperXBackend("large-v3", model_call=FakeWhisperXModel(), **kwargs)


def test_whisperx_without_the_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "whisperx", None)
    with pytest.raises(ImportError, match=r"stt-whisperx"):
        WhisperXBackend("large-v3")


def test_warm_loads_once_in_the_batcher_thread(whisperx_backend):
    threads = []

    class ThreadRecordingModel(FakeWhisperXModel):
        """TEST DOUBLE: records which thread each batched call ran in."""

        def __call__(self, windows):
            threads.append(threading.current_thread().name)
            return [" "] * len(windows)

    backend = whisperx_backend(ThreadRecordingModel())
    backend.warm()
    assert threads and threads[0] != threading.current_thread().name


# --- whisperX, for real (only where whisperX is installed) ---------------------------------

@pytest.fixture
def real_whisperx(tiny_whisper_dir, monkeypatch):
    """The backend on the tiny model through whisperX's own loading, with a spy (not a stand-in:
    it calls the original) on whisperX's batched decode recording each batch's feature shape."""
    pytest.importorskip("whisperx")
    asr = pytest.importorskip("whisperx.asr")  # torch, faster-whisper, pyannote.audio
    batches: list[tuple[int, ...]] = []
    original = asr.WhisperModel.generate_segment_batched

    def spy(self, features, *args, **kwargs):
        batches.append(tuple(features.shape))
        return original(self, features, *args, **kwargs)

    monkeypatch.setattr(asr.WhisperModel, "generate_segment_batched", spy)
    backend = WhisperXBackend(str(tiny_whisper_dir), device="cpu", compute_type="int8",
                              batch_size=8, window_ms=250.0, cpu_threads=2)
    yield backend, batches, asr
    backend.close()


def test_real_whisperx_decodes_sessions_in_one_batch(real_whisperx):
    backend, batches, asr = real_whisperx
    t0 = time.perf_counter()
    backend.warm()  # whisperx.load_model + a decode of 0.5 s of silence
    warm_s = time.perf_counter() - t0
    pipeline = backend._model_call.pipeline
    assert isinstance(pipeline, asr.FasterWhisperPipeline)
    assert isinstance(pipeline.model, asr.WhisperModel)
    assert type(pipeline.vad_model).__name__ == "_UnusedVad", "no whisperX VAD was loaded"
    assert batches == [(1, 80, 3000)], "warm-up: one 30 s log-mel window"
    batches.clear()

    # Four sessions finish together; the 35 s one is cut in two windows: 5 windows in all.
    seconds = [1.0, 2.5, 0.6, 35.0]
    barrier = threading.Barrier(len(seconds))

    def session(i):
        with backend.open_stream() as stream:
            for piece in np.array_split(_audio(seconds[i], seed=i), 10):
                assert stream.feed(piece) is None
            barrier.wait()
            t = time.perf_counter()
            text = stream.finish()
            return text, time.perf_counter() - t

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(seconds)) as pool:
        results = list(pool.map(session, range(len(seconds))))
    total_s = time.perf_counter() - t0
    texts = [t for t, _ in results]
    print(f"whisperX on CPU: warm {warm_s:.2f} s; {len(seconds)} sessions "
          f"({sum(seconds):.1f} s audio) in {total_s:.2f} s, batches {batches}, finish() "
          f"{', '.join(f'{s:.2f}' for _, s in results)} s; texts "
          f"{[t[:24] for t in texts]}")
    assert sum(b[0] for b in batches) == 5, batches
    assert all(b[1:] == (80, 3000) for b in batches), "30 s log-mel windows"
    assert max(b[0] for b in batches) > 1 and len(batches) < len(seconds), \
        f"sessions shared a batched decode: {batches}"
    for text in texts:  # random weights: nonsense, but one line of what the model can emit
        assert isinstance(text, str) and re.fullmatch(r"[a-z ]*", text), text[:80]
    assert texts[3], "the long utterance's windows were decoded"
    assert total_s < 60, "a tiny model decodes five windows in well under that"


def test_real_whisperx_texts_match_its_own_pipeline(real_whisperx):
    """Parley's direct use (preprocess + generate_segment_batched) gives the texts whisperX's
    own pipeline call (the one transcribe() makes after its VAD) gives for the same windows."""
    backend, batches, _ = real_whisperx
    audios = [_audio(1.5, seed=7), _audio(0.8, seed=8)]
    ours = backend._decode_batch(audios)
    pipeline = backend._model_call.pipeline
    theirs = list(pipeline(({"inputs": a} for a in audios), batch_size=len(audios),
                           num_workers=0))
    assert len(batches) == 2 and batches[0][0] == batches[1][0] == 2, batches
    assert ours == [transcript_from_result({"segments": [{"text": segment_text(o)}]})
                    for o in theirs]


def test_real_whisperx_unloadable_model_says_why():
    pytest.importorskip("whisperx.asr")
    missing = WhisperXBackend("/nonexistent/whisper-ct2", device="cpu", compute_type="int8")
    try:
        with pytest.raises(RuntimeError, match=r"whisperx: could not load model "):
            missing.warm()
    finally:
        missing.close()


@pytest.mark.slow
async def test_real_whisperx_in_a_fleet_worker_hears_a_turn(tiny_whisper_dir, tmp_path):
    """The STT worker loads whisperX in its start() from the [stt] settings alone, and the
    player's utterance becomes a final transcript that starts the turn; every process exits 0.
    The random model's words are nonsense, so the scripted persona answers with its fallback
    or whichever line the nonsense happens to match."""
    pytest.importorskip("whisperx.asr")
    from tests.backends.fleet_turn import fleet_turn
    from tests.support.turns import check_turn

    turn = await fleet_turn(tmp_path, {
        "PARLEY_STT_BACKENDS": "whisperx", "PARLEY_STT_MODEL": str(tiny_whisper_dir),
        "PARLEY_STT_DEVICE": "cpu", "PARLEY_STT_COMPUTE_TYPE": "int8",
        "PARLEY_STT_CPU_THREADS": "2", "HF_HUB_OFFLINE": "1"},
        text="Who are you, and what is your business at the gate tonight?",
        ready_s=120, done_s=180)
    assert all(c == 0 for c in turn.codes.values()), f"{turn.codes}\n{turn.log[-3000:]}"
    assert re.fullmatch(r"[a-z ]+", turn.result.transcript), turn.result.transcript[:80]
    check_turn(turn.result, min_audio_s=0.3)
