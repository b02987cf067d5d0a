"""Mid-turn failover per stage: the time from a backend's failure to the next backend's
first output.

    .venv/bin/python -m benchmarks.backend_failover [--runs N]

Each stage's fallback chain is run in this process with the named test doubles of
``tests/failing_backends.py`` first (a real default backend that raises partway through its
output) and the real default backend second, on the CPU backends of the default install:

* stt: pocketsphinx fails after K fed 40 ms chunks; the next pocketsphinx is fed the utterance
  so far again. First output = it has caught up (the replay is fed).
* llm: the scripted persona fails after 3 tokens; the next one continues the reply. First
  output = its first token.
* tts: espeak-ng fails after 3 chunks (150 ms) of a fragment; the next espeak-ng speaks the
  fragment from that sample on. First output = its first chunk.
* lipsync: the phoneme mapper fails after K frames; the next is fed the turn's audio so far
  again. First output = its first new frame.

STT and lipsync replay what came before, so their figure grows with how far into the
utterance (reply) the failure comes; both are measured early and late. A stall (a backend
that stops answering) is detected after ``fallback.stall_timeout_s`` and then costs the
same. The last line printed is ``stt_ms=.. llm_ms=.. tts_ms=.. lipsync_ms=..`` (medians,
failure late in the output).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np

TEXT = ("Halt, traveller. The gate is closed until dawn, by order of the captain, and no "
        "one passes without a writ bearing his seal.")


def _stats(values: list[float]) -> str:
    vals = sorted(values)
    p95 = vals[min(len(vals) - 1, round(0.95 * (len(vals) - 1)))]
    return f"median {statistics.median(vals):7.2f} ms  p95 {p95:7.2f} ms  (n={len(vals)})"


async def _llm(runs: int) -> list[float]:
    from pathlib import Path

    from core.personas import load_personas
    from tests.failing_backends import FailingAfterNTokens
    from workers.llm.backends import FallbackReplyModel
    from workers.llm.scripted import ScriptedPersonaBackend

    persona = load_personas(Path(__file__).resolve().parents[1] / "personas")["guard"]
    out = []
    for _ in range(runs):
        chain = FallbackReplyModel([FailingAfterNTokens(), ScriptedPersonaBackend()])
        _ = [t async for t in chain.stream_reply(persona, [], "who are you")]
        out.append(chain.failovers[-1].first_output_ms)
    return out


def _tts(runs: int) -> list[float]:
    from tests.failing_backends import FailingAfterNChunks
    from workers.tts.backends import FallbackSynthesizer
    from workers.tts.espeak import EspeakSynth

    out = []
    for _ in range(runs):
        chain = FallbackSynthesizer([FailingAfterNChunks(), EspeakSynth()])
        list(chain.synthesize(TEXT, voice="en-us"))
        out.append(chain.failovers[-1].first_output_ms)
    return out


async def _lipsync(runs: int, frames: int) -> list[float]:
    from core.config import Config
    from schemas.streams import Mark, VoiceEntry
    from tests.failing_backends import FailingAfterNFrames
    from workers.lipsync.backends import FallbackFaceMapper, PhonemeMapper
    from workers.tts.espeak import EspeakSynth

    cfg = Config.load(env={})
    synth = EspeakSynth()
    entries, pos = [], 0
    for ch in synth.synthesize(TEXT + " " + TEXT):
        marks = [Mark("phoneme", pos + p.sample - ch.sample, p.phoneme) for p in ch.phonemes]
        entries.append(VoiceEntry(segment=0, sample=pos, rate=synth.sample_rate,
                                  pcm=ch.pcm.astype("<i2").tobytes(), marks=marks))
        pos += len(ch.pcm)

    class Failing(FailingAfterNFrames):
        n = frames

    out = []
    for _ in range(runs):
        chain = FallbackFaceMapper([Failing(cfg), PhonemeMapper(cfg)])
        stream = chain.open(entries[0].rate, entries[0])
        for v in entries:
            await stream.push(np.frombuffer(v.pcm, "<i2"), [(m.sample, m.value)
                                                            for m in v.marks])
        await stream.flush()
        out.append(chain.failovers[-1].first_output_ms)
    return out


def _stt(runs: int, feeds: int) -> list[float]:
    import soxr

    from tests.failing_backends import FailingAfterNFeeds
    from workers.stt.backends import FallbackRecognizer
    from workers.stt.pocketsphinx_backend import PocketsphinxBackend
    from workers.tts.espeak import EspeakSynth

    synth = EspeakSynth()
    pcm = np.concatenate([c.pcm for c in synth.synthesize(TEXT)]).astype(np.float32) / 32768
    audio = soxr.resample(pcm, synth.sample_rate, 16000).astype(np.float32)

    class Failing(FailingAfterNFeeds):
        n = feeds

    real = PocketsphinxBackend()
    real.warm()
    failing = Failing()
    failing.warm()
    out = []
    for _ in range(runs):
        chain = FallbackRecognizer([failing, real])
        stream = chain.open_stream()
        for start in range(0, len(audio), 640):
            stream.feed(audio[start:start + 640])
        stream.finish()
        stream.close()
        out.append(chain.failovers[-1].first_output_ms)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks.backend_failover",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))  # errors only
    t0 = time.perf_counter()
    rows = {
        "stt (failure at 0.4 s of speech)": _stt(args.runs, 10),
        "stt (failure at 4 s of speech)": _stt(args.runs, 100),
        "llm (failure after 3 tokens)": asyncio.run(_llm(args.runs)),
        "tts (failure 150 ms into a fragment)": _tts(args.runs),
        "lipsync (failure at frame 30, 0.5 s)": asyncio.run(_lipsync(args.runs, 30)),
        "lipsync (failure at frame 480, 8 s)": asyncio.run(_lipsync(args.runs, 480)),
    }
    for name, values in rows.items():
        print(f"{name:40s} {_stats(values)}")
    med = [statistics.median(v) for v in rows.values()]
    print(f"({time.perf_counter() - t0:.1f} s)")
    print(f"stt_ms={med[1]:.2f} llm_ms={med[2]:.2f} tts_ms={med[3]:.2f} lipsync_ms={med[5]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
