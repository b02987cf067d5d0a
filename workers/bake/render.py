"""One line through the live stages' own TTS and lipsync chains, written atomically.

The line is cut into fragments as the LLM stage cuts a reply, each fragment is spoken by the TTS
chain with the persona's voice, and the face is made from the audio (and phoneme marks) chunk by
chunk as the lipsync stage does, with the same idle face (blinks, gaze) seeded by the line id:
a baked line looks and sounds like the same line spoken live.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.config import Config
from core.idle_face import IdleFace
from core.personas import load_personas
from schemas.arkit import NUM_FACE_VALUES
from schemas.streams import Mark, VoiceEntry
from workers.bake.lines import Line, output_paths
from workers.llm.fragmenter import Fragmenter


@dataclass
class Rendered:
    pcm: np.ndarray  # int16 mono
    rate: int
    samples: np.ndarray  # (frames,) reply-audio sample of each face frame
    values: np.ndarray  # (frames, 61) in FACE_VALUE_NAMES order
    timings: dict = field(default_factory=dict)
    backends: dict = field(default_factory=dict)


class LineRenderer:
    """Built once per bake worker: the persona table and the TTS and face chains."""

    def __init__(self, config: Config):
        from workers.lipsync.stage import make_chain as face_chain
        from workers.tts.stage import make_chain as tts_chain

        self.config = config
        self.personas = load_personas(config.personas_dir())
        self.tts = tts_chain(config)
        self.face = face_chain(config)
        self.fps = config.lipsync.fps

    async def start(self) -> None:
        await self.face.start()  # loads a lipsync model, where one is configured

    async def stop(self) -> None:
        await self.face.stop()
        await self.tts.aclose()

    async def render(self, line: Line) -> Rendered:
        persona = self.personas.get(line.npc)
        if persona is None:
            raise LookupError(f"npc {line.npc!r} has no persona in {self.config.personas_dir()}")
        frag = Fragmenter()
        texts = frag.push(line.text) + frag.flush()
        rate = int(self.tts.sample_rate)
        t0 = time.perf_counter()
        chunks: list[tuple[np.ndarray, list[tuple[int, str]]]] = []
        at = 0  # where the next fragment starts in the line's audio
        first_audio_ms = None
        for text in texts:
            spoken = await asyncio.to_thread(lambda t=text: list(self.tts.synthesize(
                t, voice=persona.voice, rate_wpm=persona.voice_rate_wpm,
                pitch=persona.voice_pitch)))
            if first_audio_ms is None and spoken:
                first_audio_ms = (time.perf_counter() - t0) * 1000
            for ch in spoken:
                shift = at - ch.sample  # marks: fragment positions -> line positions
                chunks.append((np.asarray(ch.pcm, np.int16),
                               [(shift + p.sample, p.phoneme) for p in ch.phonemes]))
                at += len(ch.pcm)
        tts_ms = (time.perf_counter() - t0) * 1000
        pcm = np.concatenate([c[0] for c in chunks]) if chunks else np.zeros(0, np.int16)
        if not len(pcm):
            raise ValueError(f"line {line.id!r}: the TTS produced no audio for {line.text!r}")
        t1 = time.perf_counter()
        samples, values, mapper = await self._face(line, chunks, rate)
        face_ms = (time.perf_counter() - t1) * 1000
        return Rendered(pcm=pcm, rate=rate, samples=samples, values=values,
                        timings={"tts_first_audio_ms": round(first_audio_ms or 0.0, 1),
                                 "tts_ms": round(tts_ms, 1), "face_ms": round(face_ms, 1)},
                        backends={"tts": self.tts.name, "lipsync": mapper})

    async def _face(self, line: Line, chunks, rate: int):
        # the first voice entry decides the mapper, as in the lipsync stage (phoneme marks)
        first = VoiceEntry(segment=0, sample=0, rate=rate,
                           marks=[Mark("phoneme", s, p) for _pcm, marks in chunks[:1]
                                  for s, p in marks])
        stream = self.face.open(rate, first)
        frames = []
        for pcm, marks in chunks:
            frames += await stream.push(pcm, marks)
        frames += await stream.flush()
        idle = IdleFace(fps=self.fps, seed=zlib.crc32(f"bake/{line.id}".encode()))
        frames = idle.apply(frames, speaking=1.0) if frames else frames
        if not frames:
            return (np.zeros(0, np.int64), np.zeros((0, NUM_FACE_VALUES), np.float32),
                    stream.backend_name)
        return (np.array([f.sample for f in frames], np.int64),
                np.stack([f.values for f in frames]).astype(np.float32), stream.backend_name)


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename over ``path``: readers see the old file or the whole new one,
    and a worker killed mid-write leaves only a ``.tmp`` file (removed at the end of the bake).
    No fsync: a killed process loses nothing the kernel has, and after a machine crash the
    check in lines.baked (samples and frames against the JSON) finds a short file and the line
    is baked again; live workers share the disk with Redis's AOF."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_outputs(out_dir: str | Path, line: Line, r: Rendered, extra: dict | None = None) -> dict:
    """DIR/<id>.wav, DIR/<id>.csv (Live Link Face) and DIR/<id>.json, the JSON last: it is what
    makes the line count as baked (see lines.baked)."""
    import soundfile as sf

    from parley.export import write_livelink_csv

    wav, csv_path, meta_path = output_paths(out_dir, line.id)
    wav.parent.mkdir(parents=True, exist_ok=True)
    _atomic(wav, lambda p: sf.write(str(p), r.pcm, r.rate, subtype="PCM_16", format="WAV"))
    frames = 0

    def csv_write(p: Path) -> None:
        nonlocal frames  # timecodes in 60ths of a second, as `parley export` writes them
        frames = write_livelink_csv(p, r.samples, r.values, r.rate)

    _atomic(csv_path, csv_write)
    meta = {"id": line.id, "npc": line.npc, "line": line.text, "digest": line.digest(),
            "rate": r.rate, "samples": len(r.pcm), "audio_s": round(len(r.pcm) / r.rate, 3),
            "frames": frames, "fps": 60, "backends": r.backends, "timings_ms": r.timings,
            **(extra or {})}
    _atomic(meta_path, lambda p: p.write_text(json.dumps(meta, indent=1) + "\n"))
    return meta
