"""Every stage's fallback chain fails over mid-output: a first backend that fails (a named
test double, tests/failing_backends.py) partway through, a real second one, and the output
comes out whole, with no gap and no repeat. The failed backend is probed and restored."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from core.config import Config
from core.personas import load_personas
from schemas.streams import Mark, VoiceEntry
from tests.failing_backends import (
    FailingAfterNChunks,
    FailingAfterNFeeds,
    FailingAfterNFrames,
    FailingAfterNTokens,
    InjectedFailure,
    StallingAfterNChunks,
    StallingAfterNTokens,
)
from workers import registry
from workers.lipsync.backends import FallbackFaceMapper, PhonemeMapper
from workers.llm.backends import FallbackReplyModel
from workers.llm.scripted import ScriptedPersonaBackend
from workers.stt.backends import FallbackRecognizer
from workers.stt.pocketsphinx_backend import PocketsphinxBackend
from workers.tts.backends import FallbackSynthesizer
from workers.tts.espeak import EspeakSynth

PERSONA = load_personas(Path(__file__).resolve().parents[2] / "personas")["guard"]
FAST = {"stall_timeout_s": 0.3, "probe_interval_s": 0.05}


async def until(cond, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


# ---------------------------------------------------------------------------------- LLM


@pytest.mark.parametrize("first", [FailingAfterNTokens, StallingAfterNTokens])
async def test_llm_next_backend_continues_the_reply(first):
    chain = FallbackReplyModel([first(), ScriptedPersonaBackend()], **FAST)
    chain.attach()
    used: list[str] = []
    tokens = [t async for t in chain.stream_reply(PERSONA, [], "who are you", used=used)]
    whole = ScriptedPersonaBackend().choose(PERSONA, "who are you")
    assert "".join(tokens) == whole, "no word lost, none repeated"
    assert used == [first.name, "scripted"]
    event = chain.failovers[-1]
    assert (event.failed, event.to) == (first.name, "scripted")
    assert event.first_output_ms is not None and event.first_output_ms < 1000
    assert chain.down and chain.name == "scripted"
    await until(lambda: not chain.down)  # probed in the background, restored
    assert chain.name == first.name
    await chain.aclose()


async def test_llm_last_backend_failing_mid_reply_ends_the_reply_there():
    chain = FallbackReplyModel([FailingAfterNTokens()])
    tokens = [t async for t in chain.stream_reply(PERSONA, [], "who are you")]
    assert len(tokens) == FailingAfterNTokens.n


async def test_llm_scripted_continues_another_models_sentence_with_its_own():
    tokens = [t async for t in ScriptedPersonaBackend().stream_reply(
        PERSONA, [], "who are you", prefix="Well, let me")]
    assert "".join(tokens) == " " + ScriptedPersonaBackend().choose(PERSONA, "who are you")


# ---------------------------------------------------------------------------------- TTS

TEXT = "Halt, traveller. The gate is closed until dawn, by order of the captain."


def _check_continuous(chunks):
    pos = 0
    for ch in chunks:
        assert ch.sample == pos, "positions go on without a gap or a repeat"
        for m in [*ch.phonemes, *ch.words]:
            assert pos <= m.sample < pos + len(ch.pcm) + 1
        pos += len(ch.pcm)
    return pos


@pytest.mark.parametrize("first", [FailingAfterNChunks, StallingAfterNChunks])
async def test_tts_next_synthesizer_speaks_the_rest_of_the_fragment(first):
    chain = FallbackSynthesizer([first(), EspeakSynth()], **FAST)
    chain.attach()
    chunks = await asyncio.to_thread(lambda: list(chain.synthesize(TEXT)))
    total = _check_continuous(chunks)
    alone = sum(len(c.pcm) for c in EspeakSynth().synthesize(TEXT))
    # espeak-ng renders the same text a few ms longer or shorter from call to call
    assert abs(total - alone) <= 0.02 * alone
    assert chain.failovers[-1].first_output_ms is not None
    await until(lambda: not chain.down)
    await chain.aclose()


class _SlowEspeak:
    """espeak-ng at 120 words a minute whatever it is asked: a voice slower than the first."""

    name = "espeak-slow"

    def __init__(self):
        self.inner = EspeakSynth()
        self.sample_rate = self.inner.sample_rate

    def synthesize(self, text, voice="en-us", rate_wpm=175, pitch=50):
        return self.inner.synthesize(text, voice=voice, rate_wpm=120, pitch=pitch)


async def test_tts_slower_voice_takes_over_at_the_same_place_in_the_word():
    """The next voice continues at the same distance past the start of the word the failed
    one was speaking, not at the same sample count (which would skip words)."""
    n = 12
    first = list(EspeakSynth().synthesize(TEXT))[:n]
    produced = sum(len(c.pcm) for c in first)
    word = [w for c in first for w in c.words][-1]
    slow = list(_SlowEspeak().synthesize(TEXT))
    b = next(w.sample for c in slow for w in c.words if w.text_start == word.text_start)
    want = produced + sum(len(c.pcm) for c in slow) - (b + produced - word.sample)

    class Failing(FailingAfterNChunks):
        pass

    Failing.n = n
    chunks = list(FallbackSynthesizer([Failing(), _SlowEspeak()]).synthesize(TEXT))
    total = _check_continuous(chunks)
    assert abs(total - want) <= 0.02 * want, (total, want)
    words = [w.text_start for c in chunks for w in c.words]
    assert words == sorted(set(words)), "each word once, in order"


class _Espeak16k:
    """espeak-ng resampled to 16 kHz: a second synthesizer at another rate."""

    name = "espeak-16k"
    sample_rate = 16000

    def synthesize(self, text, voice="en-us", rate_wpm=175, pitch=50):
        import soxr

        from workers.tts.espeak import SynthChunk

        inner = EspeakSynth()
        pcm = np.concatenate([c.pcm for c in inner.synthesize(text, voice=voice)])
        out = soxr.resample(pcm, inner.sample_rate, 16000).astype(np.int16)
        for start in range(0, len(out), 800):
            yield SynthChunk(pcm=out[start:start + 800], sample=start)


async def test_tts_backend_at_another_rate_is_resampled_to_the_chains():
    chain = FallbackSynthesizer([FailingAfterNChunks(), _Espeak16k()])
    assert chain.sample_rate == EspeakSynth().sample_rate
    chunks = list(chain.synthesize(TEXT))
    total = _check_continuous(chunks)
    alone = sum(len(c.pcm) for c in EspeakSynth().synthesize(TEXT))
    assert abs(total - alone) <= 0.03 * alone


# ---------------------------------------------------------------------------------- lipsync


def _voice_entries():
    """A reply's voice as the TTS publishes it: 50 ms chunks with phoneme marks."""
    synth = EspeakSynth()
    out, pos = [], 0
    for ch in synth.synthesize(TEXT):
        marks = [Mark("phoneme", pos + p.sample - ch.sample, p.phoneme) for p in ch.phonemes]
        out.append(VoiceEntry(segment=0, sample=pos, rate=synth.sample_rate,
                              pcm=ch.pcm.astype("<i2").tobytes(), marks=marks))
        pos += len(ch.pcm)
    return out


async def _face(mapper, entries):
    stream = mapper.open(entries[0].rate, entries[0])
    frames = []
    for v in entries:
        pcm = np.frombuffer(v.pcm, dtype="<i2")
        frames += await stream.push(pcm, [(m.sample, m.value) for m in v.marks])
    return frames + await stream.flush()


async def test_lipsync_next_mapper_makes_the_frames_from_the_next_frame_on():
    cfg = Config.load(env={})
    entries = _voice_entries()
    chain = FallbackFaceMapper([FailingAfterNFrames(cfg), PhonemeMapper(cfg)], **FAST)
    chain.attach()
    frames = await _face(chain, entries)
    alone = await _face(FallbackFaceMapper([PhonemeMapper(cfg)]), entries)
    assert [f.index for f in frames] == list(range(len(alone))), "no gap, no repeat"
    assert len(frames) > FailingAfterNFrames.n
    # the phoneme mapper is deterministic: the face is the one it makes on its own
    np.testing.assert_allclose(np.stack([f.values for f in frames]),
                               np.stack([f.values for f in alone]), atol=1e-5)
    assert chain.failovers[-1].failed == "failing-phoneme"
    await until(lambda: not chain.down)
    await chain.aclose()


async def test_lipsync_failure_in_the_flush_still_ends_the_turn_whole():
    cfg = Config.load(env={})
    entries = _voice_entries()
    alone = await _face(FallbackFaceMapper([PhonemeMapper(cfg)]), entries)

    class FailingInFlush(FailingAfterNFrames):
        n = len(alone) - 1  # every frame but the last comes out of push; flush fails

    chain = FallbackFaceMapper([FailingInFlush(cfg), PhonemeMapper(cfg)])
    frames = await _face(chain, entries)
    assert [f.index for f in frames] == list(range(len(alone)))


# ---------------------------------------------------------------------------------- STT


@pytest.fixture(scope="module")
def utterance():
    from benchmarks.speech import speech_16k

    return speech_16k("hello how are you today", pad_s=0.3)


def _recognize(recognizer, audio) -> tuple[str, list]:
    stream = recognizer.open_stream()
    partials = []
    try:
        for start in range(0, len(audio), 640):
            partials.append(stream.feed(audio[start:start + 640]))
        return stream.finish(), partials
    finally:
        stream.close()


async def test_stt_next_recognizer_hears_the_whole_utterance(utterance):
    real = PocketsphinxBackend()
    failing = FailingAfterNFeeds()
    chain = FallbackRecognizer([failing, real], **FAST)
    chain.warm()
    chain.attach()
    text, _ = await asyncio.to_thread(_recognize, chain, utterance)
    alone, _ = _recognize(real, utterance)
    assert text == alone, "the same words as the real recognizer alone"
    assert len({"hello", "how", "are", "you", "today"} & set(text.split())) >= 2, text
    event = chain.failovers[-1]
    assert (event.failed, event.to) == ("failing-pocketsphinx", "pocketsphinx")
    assert event.first_output_ms is not None
    await until(lambda: not chain.down)
    await chain.aclose()


def test_stt_last_recognizer_failing_is_an_error(utterance):
    chain = FallbackRecognizer([FailingAfterNFeeds()])
    chain.warm()
    with pytest.raises(InjectedFailure):
        _recognize(chain, utterance)


# ---------------------------------------------------------------------------------- registry


def test_registry_builds_registered_and_out_of_tree_backends():
    cfg = Config.load(env={})
    assert registry.make_backend("llm", "scripted", cfg).name == "scripted"
    made = registry.make_backend("lipsync", "tests.failing_backends:FailingAfterNFrames", cfg)
    assert made.name == "failing-phoneme"
    assert registry.make_backend("llm", "tests.failing_backends:FailingAfterNTokens",
                                 cfg).name == "failing-scripted"
    with pytest.raises(ValueError, match=r"unknown tts backend .nope.*package.module:Class"):
        registry.make_backend("tts", "nope", cfg)
    with pytest.raises(ValueError, match="cannot import no_such_module"):
        registry.make_backend("tts", "no_such_module:Thing", cfg)
    assert {s.stage for s in registry.BACKENDS} == set(registry.STAGES)


def test_parley_backends_lists_out_of_tree_backends_the_config_names():
    from parley.backends import probe

    cfg = Config.load(env={"PARLEY_LLM_BACKENDS": "tests.failing_backends:FailingAfterNTokens,"
                                                  "scripted,nowhere.at_all:Model"})
    rows = {e["name"]: e for e in probe(cfg)["stages"]["llm"]}
    assert rows["tests.failing_backends:FailingAfterNTokens"]["available"]
    assert rows["tests.failing_backends:FailingAfterNTokens"]["selected"]
    assert not rows["nowhere.at_all:Model"]["available"]
    assert "nowhere" in rows["nowhere.at_all:Model"]["why"]
