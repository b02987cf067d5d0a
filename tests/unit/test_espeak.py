from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from workers.tts.espeak import EspeakSynth, SynthChunk

TEXT = "Hello there, traveller."


@pytest.fixture(scope="module")
def synth() -> EspeakSynth:
    return EspeakSynth()


def _audio(chunks: list[SynthChunk]) -> np.ndarray:
    return np.concatenate([c.pcm for c in chunks])


def test_synthesize_chunks(synth: EspeakSynth) -> None:
    assert synth.name == "espeak"
    assert synth.sample_rate == 22050
    chunks = list(synth.synthesize(TEXT))
    assert chunks
    total = 0
    for c in chunks:
        assert c.pcm.dtype == np.int16 and c.pcm.ndim == 1 and len(c.pcm) > 0
        assert len(c.pcm) <= synth.sample_rate // 20  # <= 50 ms
        assert c.sample == total  # contiguous
        total += len(c.pcm)
    assert 0.5 <= total / synth.sample_rate <= 4.0
    assert np.abs(_audio(chunks)).max() > 1000  # actually audible

    for attr in ("phonemes", "words"):
        marks = [(c, m) for c in chunks for m in getattr(c, attr)]
        assert marks, attr
        samples = [m.sample for _, m in marks]
        assert samples == sorted(samples), attr
        for c, m in marks:  # each mark lives in the chunk that contains its start
            assert c.sample <= m.sample < c.sample + len(c.pcm)

    words = [m for c in chunks for m in c.words]
    assert [TEXT[w.text_start : w.text_start + w.text_length] for w in words] == [
        "Hello", "there", "traveller",
    ]
    phonemes = [m.phoneme for c in chunks for m in c.phonemes]
    assert "h" in phonemes and all(phonemes)


def test_word_offsets_are_str_indices(synth: EspeakSynth) -> None:
    text = "Café über naïve."
    words = [m for c in synth.synthesize(text) for m in c.words]
    assert [text[w.text_start : w.text_start + w.text_length] for w in words] == [
        "Café", "über", "naïve",
    ]


def test_voices(synth: EspeakSynth) -> None:
    voices = synth.voices()
    assert "en-us" in voices and "en-gb" in voices
    assert "f3" in synth.variants()
    a = _audio(list(synth.synthesize(TEXT, voice="en-us")))
    b = _audio(list(synth.synthesize(TEXT, voice="en-gb+f3")))
    assert len(a) != len(b) or not np.array_equal(a, b)


def test_rate_changes_duration(synth: EspeakSynth) -> None:
    slow = _audio(list(synth.synthesize(TEXT, rate_wpm=120)))
    fast = _audio(list(synth.synthesize(TEXT, rate_wpm=300)))
    assert len(fast) < 0.75 * len(slow)


@pytest.mark.parametrize("voice", ["xx-nope", "en-us+nosuchvariant", ""])
def test_unknown_voice(synth: EspeakSynth, voice: str) -> None:
    with pytest.raises(ValueError, match="voice"):
        synth.synthesize(TEXT, voice=voice)


def test_empty_text(synth: EspeakSynth) -> None:
    assert list(synth.synthesize("")) == []
    assert list(synth.synthesize("  \n\t ")) == []


def test_threads(synth: EspeakSynth) -> None:
    texts = {"short": "Yes.", "long": "The road north is dangerous after dark, friend."}
    expected = {k: len(_audio(list(synth.synthesize(t)))) for k, t in texts.items()}

    def work(key: str) -> list[int]:
        return [len(_audio(list(synth.synthesize(texts[key])))) for _ in range(15)]

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {k: pool.submit(work, k) for k in texts}
        results = {k: f.result() for k, f in futures.items()}  # re-raises worker errors
    for key, lengths in results.items():
        # espeak-ng output is not bit-reproducible between calls (lengths wobble by
        # ~10 ms even single-threaded); mixing up the two texts would differ by seconds.
        assert len(lengths) == 15
        assert all(abs(n - expected[key]) < 2000 for n in lengths), (key, lengths)


def test_the_same_text_gives_the_same_samples_on_every_call():
    # espeak-ng carries wave-generator state between utterances; it is reset before each one
    from workers.tts import espeak

    synth = EspeakSynth()
    assert espeak._wavegen is not None and espeak._wavegen.active, espeak._wavegen.why_not
    text = "I am only a guard, friend. Ask me about the gate."
    first = np.concatenate([c.pcm for c in synth.synthesize(text, voice="en-gb-scotland")])
    synth.synthesize("Something else in between.", voice="en-us")
    again = np.concatenate([c.pcm for c in synth.synthesize(text, voice="en-gb-scotland")])
    assert np.array_equal(first, again)
