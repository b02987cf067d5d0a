"""The sequential whole-file design, in one process: the baseline of `parley bench latency`.

Each stage waits for all of its input and then runs the same backends the fleet does: the
recognizer decodes the whole utterance after the player stops, the LLM's whole reply is spoken
in one synthesis, the face is computed from the whole reply audio, and the player hears
nothing before the face is done. No Redis hop or process hand-off is counted, which flatters
the baseline: the streaming fleet pays those and is still compared against this.

Kept out of the product on purpose: no deployment should run this way.
"""

from __future__ import annotations

import time

import numpy as np

from core.personas import Persona


class SequentialPipeline:
    """The four stages of one turn, run one after the other on whole inputs."""

    def __init__(self, simulated: bool = False):
        from workers.lipsync.phoneme_driven import PhonemeLipsync

        if simulated:  # SIMULATED GPU-class timings (benchmarks/simulated.py)
            from benchmarks.simulated import SimulatedLlm, SimulatedRecognizer, SimulatedTts

            self.stt, self.llm, self.tts = SimulatedRecognizer(), SimulatedLlm(), SimulatedTts()
        else:
            from workers.llm.scripted import ScriptedPersonaBackend
            from workers.stt.pocketsphinx_backend import PocketsphinxBackend
            from workers.tts.espeak import EspeakSynth

            # the CMN warm-up would decode the first 1.5 s twice after the player stopped:
            # without it the baseline is not made slower than it has to be
            self.stt = PocketsphinxBackend(cmn_warmup_ms=0)
            self.llm, self.tts = ScriptedPersonaBackend(), EspeakSynth()
        self._face = PhonemeLipsync
        self.stt.warm()

    async def turn(self, audio: np.ndarray, persona: Persona) -> dict:
        """``audio``: the utterance, int16 mono at 16 kHz. Returns the stage times in ms,
        counted from the end of the player's speech."""
        t0 = time.perf_counter()
        stream = self.stt.open_stream()
        stream.feed(audio.reshape(-1).astype(np.float32) / 32768)
        heard = stream.finish().strip()
        stream.close()
        t1 = time.perf_counter()
        reply = "".join([t async for t in self.llm.stream_reply(persona, [], heard)]).strip()
        t2 = time.perf_counter()
        chunks = list(self.tts.synthesize(reply, voice=persona.voice,
                                          rate_wpm=persona.voice_rate_wpm,
                                          pitch=persona.voice_pitch))
        t3 = time.perf_counter()
        face = self._face(self.tts.sample_rate, fps=60)
        frames = 0
        for ch in chunks:
            frames += len(face.push(ch.pcm, [(p.sample, p.phoneme) for p in ch.phonemes]))
        frames += len(face.flush())
        t4 = time.perf_counter()
        return {"heard": heard, "reply": reply, "frames": frames,
                "stt_ms": (t1 - t0) * 1000, "llm_ms": (t2 - t1) * 1000,
                "tts_ms": (t3 - t2) * 1000, "face_ms": (t4 - t3) * 1000,
                "ttfa_ms": (t4 - t0) * 1000}
