"""Coqui TTS backend: the glue around the model, then the real coqui-tts code path.

A fake engine stands in for the loaded model in most tests. Where ``TTS`` imports
(scripts/backend-env.sh coqui makes such an environment), tiny random VITS models built here are
loaded through the backend's own ``_CoquiEngine`` and synthesize for real; the last test runs
a user's model named in ``PARLEY_COQUI_MODEL`` (directory or Coqui model name).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import pytest

from workers.tts.coqui_backend import (
    CoquiBackend,
    PcmChunker,
    float_to_int16,
    resolve_model,
    split_sentences,
)
from workers.tts.espeak import SynthChunk


class FakeEngine:
    """Returns a ramp per call so tests can check order, lengths and values."""

    def __init__(self, sample_rate=24000, speakers=(), languages=(), streams=False,
                 clones=False, piece_s=0.37, pieces=3):
        self.sample_rate = sample_rate
        self.speakers = list(speakers)
        self.languages = list(languages)
        self.streams = streams
        self.clones = clones
        self.has_speed = streams
        self.piece = int(sample_rate * piece_s)
        self.pieces = pieces
        self.calls: list[tuple] = []

    def _wav(self):
        return np.linspace(-0.5, 0.5, self.piece, dtype=np.float32)

    def synthesize(self, text, speaker, speaker_wav, language, speed):
        self.calls.append(("synth", text, speaker, speaker_wav, language, speed))
        return list(self._wav())  # Coqui's Synthesizer returns a list of floats

    def stream(self, text, speaker, speaker_wav, language, speed):
        self.calls.append(("stream", text, speaker, speaker_wav, language, speed))
        for _ in range(self.pieces):
            yield self._wav()


def _pcm(chunks: list[SynthChunk]) -> np.ndarray:
    return np.concatenate([c.pcm for c in chunks]) if chunks else np.zeros(0, np.int16)


def _model_dir(tmp_path, audio=None, files=("model.pth",), **extra):
    d = tmp_path / "model"
    d.mkdir()
    cfg = {"model": "vits", "audio": audio or {"sample_rate": 22050}, **extra}
    (d / "config.json").write_text(json.dumps(cfg))
    for f in files:
        (d / f).write_bytes(b"")
    return d


# -- chunking ---------------------------------------------------------------------------------


def test_float_to_int16_scales_clips_and_cleans():
    out = float_to_int16([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, -3.0, float("nan"), float("inf")])
    assert out.dtype == np.int16
    assert out.tolist() == [0, 16384, -16384, 32767, -32767, 32767, -32767, 0, 32767]


def test_float_to_int16_accepts_tensor_like():
    class Tensorish:  # duck-typed like a torch tensor on a GPU
        def detach(self):
            return self

        def float(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return np.array([[0.25, -0.25]], dtype=np.float32)

    assert float_to_int16(Tensorish()).tolist() == [8192, -8192]


def test_chunker_makes_even_chunks_across_pieces():
    ch = PcmChunker(24000, 50)  # 1200 samples per chunk
    out = ch.push(np.zeros(1000)) + ch.push(np.zeros(1500)) + ch.push(np.zeros(2000))
    out += ch.flush()
    assert [len(c.pcm) for c in out] == [1200, 1200, 1200, 900]
    assert [c.sample for c in out] == [0, 1200, 2400, 3600]
    assert all(c.phonemes == [] and c.words == [] for c in out)
    assert ch.flush() == []


def test_chunker_keeps_every_sample_in_order():
    rng = np.random.default_rng(1)
    pieces = [rng.uniform(-1, 1, n).astype(np.float32) for n in (7, 1103, 0, 2500, 19)]
    ch = PcmChunker(22050, 20)
    out = [c for p in pieces for c in ch.push(p)] + ch.flush()
    assert np.array_equal(_pcm(out), float_to_int16(np.concatenate(pieces)))


def test_chunker_rejects_bad_chunk_ms():
    with pytest.raises(ValueError, match="chunk_ms"):
        PcmChunker(22050, 0)


def test_split_sentences():
    assert split_sentences("Halt! Who goes there? State your business.  Now.") == [
        "Halt!", "Who goes there?", "State your business.", "Now."]
    assert split_sentences("No end") == ["No end"]
    assert split_sentences("  ") == []
    assert split_sentences("3.5 gold, please.") == ["3.5 gold, please."]


# -- model resolution and sample rate ------------------------------------------------------------


def test_resolve_model_dir_reads_sample_rate(tmp_path):
    d = _model_dir(tmp_path, audio={"sample_rate": 22050, "output_sample_rate": 24000},
                   languages=["en", "de"])
    spec = resolve_model(str(d))
    assert spec.local and spec.model_path == d / "model.pth"
    assert spec.config_path == d / "config.json"
    assert spec.sample_rate == 24000  # output_sample_rate wins, as in Coqui's Synthesizer
    assert spec.languages == ("en", "de") and spec.model_type == "vits"


def test_resolve_model_finds_the_one_checkpoint(tmp_path):
    d = _model_dir(tmp_path, files=("checkpoint_90000.pth", "speakers_xtts.pth", "dvae.pth"))
    assert resolve_model(str(d)).model_path == d / "checkpoint_90000.pth"


def test_resolve_model_checkpoint_file(tmp_path):
    d = _model_dir(tmp_path, files=("a.pth", "b.pth"))
    with pytest.raises(ValueError, match="several checkpoints"):
        resolve_model(str(d))
    assert resolve_model(str(d / "b.pth")).model_path == d / "b.pth"


def test_resolve_model_vocoder_rate_wins(tmp_path):
    d = _model_dir(tmp_path, audio={"sample_rate": 16000})
    (d / "vocoder").mkdir()
    (d / "vocoder" / "config.json").write_text(json.dumps({"audio": {"sample_rate": 22050}}))
    (d / "vocoder" / "model_file.pth").write_bytes(b"")
    spec = resolve_model(str(d))
    assert spec.vocoder_path == d / "vocoder" / "model_file.pth"
    assert spec.sample_rate == 22050


def test_resolve_model_errors(tmp_path):
    with pytest.raises(ValueError, match="needs a model"):
        resolve_model("")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope" / "model"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        resolve_model(str(empty))
    d = _model_dir(tmp_path, files=())
    with pytest.raises(FileNotFoundError, match=r"no model checkpoint"):
        resolve_model(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        resolve_model(str(d / "config.json"))
    (d / "config.json").write_text(json.dumps({"audio": {}}))
    (d / "model.pth").write_bytes(b"")
    with pytest.raises(ValueError, match=r"audio.sample_rate"):
        resolve_model(str(d))


def test_resolve_model_names():
    assert resolve_model("tts_models/en/vctk/vits").name == "tts_models/en/vctk/vits"
    spec = resolve_model("tts_models/multilingual/multi-dataset/xtts_v2")
    assert spec.model_type == "xtts" and spec.sample_rate is None and not spec.local


def test_backend_sample_rate_comes_from_engine_and_must_match_config(tmp_path):
    d = _model_dir(tmp_path, audio={"sample_rate": 22050})
    b = CoquiBackend(str(d), engine=FakeEngine(sample_rate=22050))
    assert b.sample_rate == 22050 and b.name == "coqui"
    with pytest.raises(RuntimeError, match="24000 Hz but its config says 22050"):
        CoquiBackend(str(d), engine=FakeEngine(sample_rate=24000))


def test_missing_package_error_names_the_extra(tmp_path, monkeypatch):
    d = _model_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "TTS", None)  # import TTS -> ImportError, as here
    monkeypatch.setitem(sys.modules, "TTS.api", None)
    with pytest.raises(ImportError, match=r"tts-coqui"):
        CoquiBackend(str(d))


def test_bad_device_and_chunk_ms():
    with pytest.raises(ValueError, match="device"):
        CoquiBackend("", device="tpu", engine=FakeEngine())
    with pytest.raises(ValueError, match="chunk_ms"):
        CoquiBackend("", chunk_ms=0, engine=FakeEngine())


# -- voices and languages ----------------------------------------------------------------------


VCTK = ["p225", "p226", "p227", "p228"]


def test_single_speaker_ignores_persona_voice():
    b = CoquiBackend("", engine=FakeEngine())
    assert b.resolve_voice("en-gb-scotland") == (None, None)
    chunks = list(b.synthesize("Halt.", voice="en-gb-scotland"))
    assert chunks and b.engine.calls[0][2] is None


def test_speaker_by_name_case_insensitive_and_by_map():
    b = CoquiBackend("", engine=FakeEngine(speakers=VCTK),
                     voices={"en-gb-scotland": "p227", "EN-GB-X-RP": "P228"})
    assert b.resolve_voice("p226") == ("p226", None)
    assert b.resolve_voice("P226") == ("p226", None)
    assert b.resolve_voice("en-gb-scotland") == ("p227", None)
    assert b.resolve_voice("en-gb-x-rp") == ("p228", None)  # map keys and targets: any case
    list(b.synthesize("Hello there.", voice="en-gb-scotland"))
    assert b.engine.calls[-1][2] == "p227"


def test_empty_voice_uses_the_default_speaker():
    assert CoquiBackend("", engine=FakeEngine(speakers=VCTK)).resolve_voice("") == ("p225", None)
    b = CoquiBackend("", speaker="P228", engine=FakeEngine(speakers=VCTK))
    assert b.speaker == "p228" and b.resolve_voice(None) == ("p228", None)


def test_unknown_voice_lists_speakers_and_how_to_map():
    b = CoquiBackend("", engine=FakeEngine(speakers=VCTK))
    with pytest.raises(ValueError) as info:
        b.synthesize("Hi.", voice="en-gb-scotland")
    msg = str(info.value)
    assert "'en-gb-scotland'" in msg and "p225, p226, p227, p228" in msg
    assert "Speakers (4)" in msg and 'coqui_voices = ["en-gb-scotland=<speaker>"]' in msg
    with pytest.raises(ValueError, match="Did you mean p225"):
        b.resolve_voice("p2255")
    with pytest.raises(ValueError, match="no speaker 'nobody'"):
        CoquiBackend("", speaker="nobody", engine=FakeEngine(speakers=VCTK))


def test_unknown_voice_message_is_bounded_for_big_speaker_lists():
    names = [f"speaker{i:03d}" for i in range(109)]
    b = CoquiBackend("", engine=FakeEngine(speakers=names))
    with pytest.raises(ValueError, match=r"Speakers \(109\).*and 69 more"):
        b.resolve_voice("villain")


def test_clone_from_wav(tmp_path):
    ref = tmp_path / "brannoc.wav"
    ref.write_bytes(b"RIFF")
    b = CoquiBackend("", engine=FakeEngine(speakers=["Ana Florence"], clones=True,
                                            languages=["en", "de"], streams=True))
    assert b.resolve_voice(str(ref)) == (None, str(ref))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        b.resolve_voice(str(tmp_path / "missing.wav"))
    plain = CoquiBackend("", engine=FakeEngine(speakers=VCTK))
    with pytest.raises(ValueError, match="cannot clone"):
        plain.resolve_voice(str(ref))


def test_language_defaults_to_en_and_is_checked():
    eng = FakeEngine(languages=["en", "de", "fr"])
    assert CoquiBackend("", engine=eng).language == "en"
    assert CoquiBackend("", language="de", engine=eng).language == "de"
    with pytest.raises(ValueError, match=r"no language 'xx'.*en, de, fr"):
        CoquiBackend("", language="xx", engine=eng)
    with pytest.raises(ValueError, match="set language, one of de, fr"):
        CoquiBackend("", engine=FakeEngine(languages=["de", "fr"]))
    with pytest.raises(ValueError, match="single-language"):
        CoquiBackend("", language="en", engine=FakeEngine())


# -- synthesis ---------------------------------------------------------------------------------


def test_per_sentence_synthesis_when_the_model_cannot_stream():
    eng = FakeEngine(sample_rate=22050, piece_s=0.37)
    b = CoquiBackend("", engine=eng, chunk_ms=50)
    it = b.synthesize("Halt! State your business. Quickly now.")
    assert eng.calls == []  # lazy: the model runs as chunks are taken
    first = next(it)
    assert [c[1] for c in eng.calls] == ["Halt!"]  # first audio after the first sentence
    chunks = [first, *it]
    assert [c[1] for c in eng.calls] == ["Halt!", "State your business.", "Quickly now."]
    step = 22050 * 50 // 1000
    total = 3 * int(22050 * 0.37)
    assert all(len(c.pcm) == step for c in chunks[:-1]) and 0 < len(chunks[-1].pcm) <= step
    assert sum(len(c.pcm) for c in chunks) == total
    assert [c.sample for c in chunks] == list(range(0, total, step))
    assert all(c.pcm.dtype == np.int16 and not c.phonemes and not c.words for c in chunks)


def test_streaming_model_uses_stream_with_speed_from_rate():
    eng = FakeEngine(speakers=["Ana Florence", "Claribel Dervla"], languages=["en", "de"],
                     streams=True, clones=True, pieces=4)
    b = CoquiBackend("", language="de", engine=eng)
    chunks = list(b.synthesize("Guten Tag. Wie geht's?", voice="claribel dervla",
                               rate_wpm=210, pitch=80))
    assert eng.calls == [("stream", "Guten Tag. Wie geht's?", "Claribel Dervla", None, "de",
                          pytest.approx(1.2))]
    assert sum(len(c.pcm) for c in chunks) == 4 * eng.piece
    list(b.synthesize("x", voice="", rate_wpm=40))
    assert eng.calls[-1][-1] == 0.5  # clamped to SPEED_RANGE
    list(b.synthesize("x", voice="", rate_wpm=1000))
    assert eng.calls[-1][-1] == 2.0


def test_speed_is_not_passed_to_models_without_it():
    eng = FakeEngine()
    list(CoquiBackend("", engine=eng).synthesize("Hi.", rate_wpm=300))
    assert eng.calls[0][-1] is None


def test_empty_text_and_bad_rate():
    eng = FakeEngine(speakers=VCTK)
    b = CoquiBackend("", engine=eng)
    assert list(b.synthesize("   ", voice="p225")) == []
    assert eng.calls == []
    with pytest.raises(ValueError, match="rate_wpm"):
        b.synthesize("hi", rate_wpm=0)
    with pytest.raises(ValueError, match="no speaker"):
        b.synthesize("   ", voice="nobody")  # the voice is checked even for empty text


def test_model_errors_surface_from_iteration_and_release_the_lock():
    class Broken(FakeEngine):
        def synthesize(self, *a):
            raise RuntimeError("CUDA out of memory")

    b = CoquiBackend("", engine=Broken())
    with pytest.raises(RuntimeError, match="out of memory"):
        list(b.synthesize("Hi."))
    assert not b._lock.locked()


def test_from_config_reads_tts_coqui_settings():
    from types import SimpleNamespace

    tts = SimpleNamespace(coqui_model="", coqui_device="", coqui_speaker="p226",
                          coqui_language="", coqui_voices=["en-gb-scotland = p227", "junk"])
    cfg = SimpleNamespace(tts=tts)
    b = CoquiBackend.from_config(cfg, engine=FakeEngine(speakers=VCTK))
    assert (b.device, b.speaker, b.language) == ("cpu", "p226", None)
    assert b.resolve_voice("en-gb-scotland") == ("p227", None)
    with pytest.raises(ValueError, match="needs a model"):
        CoquiBackend.from_config(SimpleNamespace(tts=SimpleNamespace()))


# -- the real coqui-tts code path, on tiny random models ---------------------------------------


def _import_tts():
    # TTS raises a plain ImportError when torch/torchaudio/torchcodec are missing
    return pytest.importorskip("TTS", exc_type=ImportError)


@pytest.fixture(scope="module")
def tiny_vits(tmp_path_factory):
    _import_tts()
    root = tmp_path_factory.mktemp("coqui")
    from benchmarks.random_models import build_vits

    # 16 and 24 kHz, not coqui's 22050 default, so a rate taken from anywhere but the config
    # would show
    return {"single": build_vits(root / "single", "tiny", 16000),
            "multi": build_vits(root / "multi", "tiny", 24000, speakers=TINY_SPEAKERS)}


TINY_SPEAKERS = ["p225", "p226", "brannoc"]


def _load(model_dir, **kwargs):
    t0 = time.perf_counter()
    b = CoquiBackend(str(model_dir), **kwargs)
    print(f"\ncoqui {model_dir.name}: loaded in {time.perf_counter() - t0:.2f} s")
    return b


def _spy(backend):
    """Records what the real engine is asked for and the length of what it returns."""
    calls, real = [], backend.engine.synthesize

    def synthesize(text, speaker, speaker_wav, language, speed):
        wav = real(text, speaker, speaker_wav, language, speed)
        calls.append((text, speaker, speed, len(wav)))
        return wav

    backend.engine.synthesize = synthesize
    return calls


def _timed(backend, text, **kwargs):
    t0 = time.perf_counter()
    chunks = list(backend.synthesize(text, **kwargs))
    took = time.perf_counter() - t0
    audio = sum(len(c.pcm) for c in chunks) / backend.sample_rate
    print(f"coqui: {audio:.2f} s of audio in {took:.2f} s, real-time factor {took / audio:.2f}")
    return chunks


def _check_chunks(chunks, sample_rate, total):
    step = sample_rate * 50 // 1000
    assert sum(len(c.pcm) for c in chunks) == total
    assert all(c.pcm.dtype == np.int16 and c.pcm.ndim == 1 for c in chunks)
    assert all(len(c.pcm) == step for c in chunks[:-1]) and 0 < len(chunks[-1].pcm) <= step
    assert [c.sample for c in chunks] == list(range(0, total, step))
    assert all(not c.phonemes and not c.words for c in chunks)


def test_tiny_vits_loads_and_speaks_per_sentence(tiny_vits):
    from TTS.api import TTS
    from TTS.utils.synthesizer import PAD_SILENCE_SAMPLES

    from workers.tts.coqui_backend import _CoquiEngine

    b = _load(tiny_vits["single"])
    assert isinstance(b.engine, _CoquiEngine) and isinstance(b.engine.api, TTS)
    assert b.sample_rate == b.spec.sample_rate == 16000  # from config.json, as loaded
    assert b.speakers() == [] and b.language is None
    assert not (b.engine.streams or b.engine.clones or b.engine.has_speed)
    assert b.resolve_voice("en-gb-scotland") == (None, None)  # single speaker: voice ignored
    calls = _spy(b)
    chunks = _timed(b, "Halt. State your business.", voice="en-gb-scotland", rate_wpm=300)
    assert [c[:3] for c in calls] == [("Halt.", None, None), ("State your business.", None, None)]
    _check_chunks(chunks, 16000, total=sum(c[3] for c in calls))
    pcm = _pcm(chunks)
    assert len(pcm) > 0.1 * b.sample_rate and np.abs(pcm.astype(np.int32)).max() > 0
    # Coqui's per-call pause is cut: the first sentence's audio is not followed by its zeros
    first = pcm[:calls[0][3]]
    assert len(first) < PAD_SILENCE_SAMPLES or np.any(first[-PAD_SILENCE_SAMPLES:])


def test_tiny_multi_speaker_vits_lists_and_uses_its_speakers(tiny_vits):
    import torch

    b = _load(tiny_vits["multi"], voices={"en-gb-scotland": "P226"})
    assert b.sample_rate == 24000
    assert b.speakers() == TINY_SPEAKERS and b.speaker == "p225"  # the first is the default
    assert b.resolve_voice("") == ("p225", None)
    assert b.resolve_voice("Brannoc") == ("brannoc", None)
    assert b.resolve_voice("en-gb-scotland") == ("p226", None)
    with pytest.raises(ValueError, match=r"no speaker 'en-us'.*p225, p226, brannoc"):
        b.resolve_voice("en-us")
    calls = _spy(b)
    chunks = _timed(b, "Who goes there? Speak up!", voice="en-gb-scotland")
    assert [c[:2] for c in calls] == [("Who goes there?", "p226"), ("Speak up!", "p226")]
    _check_chunks(chunks, 24000, total=sum(c[3] for c in calls))

    def speak(voice):  # same noise for both, so only the speaker differs
        torch.manual_seed(1)
        return _pcm(list(b.synthesize("Halt.", voice=voice)))

    assert not np.array_equal(speak("p225"), speak("brannoc"))  # the speaker reaches the model
    assert b.speakers() == TINY_SPEAKERS and not b._lock.locked()


# -- a user's model, where the package imports ---------------------------------------------------


def test_real_model_synthesizes():
    _import_tts()
    model = os.environ.get("PARLEY_COQUI_MODEL")
    if not model:
        pytest.skip("set PARLEY_COQUI_MODEL to a model directory or a Coqui model name")
    b = CoquiBackend(model, device=os.environ.get("PARLEY_COQUI_DEVICE", "cpu"),
                     speaker=os.environ.get("PARLEY_COQUI_SPEAKER") or None)
    chunks = _timed(b, "Halt. State your business.", voice="")
    pcm = _pcm(chunks)
    assert len(pcm) > 0.3 * b.sample_rate  # at least 0.3 s of audio for two sentences
    assert np.abs(pcm.astype(np.int32)).max() > 300  # not silence
    step = b.sample_rate * 50 // 1000
    assert all(len(c.pcm) == step for c in chunks[:-1])


@pytest.mark.slow
async def test_real_model_in_a_fleet_worker_voices_a_turn(tiny_vits, tmp_path):
    """The TTS worker loads the model in its start() from the [tts] settings alone and speaks
    the reply at the model's rate; lipsync follows that audio (no phoneme marks from coqui)
    and every process exits 0."""
    from tests.backends.fleet_turn import fleet_turn
    from tests.support.turns import check_turn

    turn = await fleet_turn(tmp_path, {
        "PARLEY_TTS_BACKENDS": "coqui", "PARLEY_TTS_COQUI_MODEL": str(tiny_vits["single"]),
        "HF_HUB_OFFLINE": "1"}, ready_s=120, done_s=180)
    assert all(c == 0 for c in turn.codes.values()), f"{turn.codes}\n{turn.log[-3000:]}"
    s = check_turn(turn.result, min_audio_s=0.3)
    assert s["reply_sample_rate"] == 16000, "the model's own rate, from its config"
