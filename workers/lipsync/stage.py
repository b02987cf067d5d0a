"""Lipsync stage: tails the turn's voice chunks and publishes face frames stamped with samples."""

from __future__ import annotations

import bisect
import zlib

import numpy as np

from core.config import Config
from core.idle_face import IdleFace
from schemas.streams import FaceEntry, Job, VoiceEntry
from workers import registry
from workers.lipsync.audio_driven import FaceFrame
from workers.lipsync.backends import ChainedFaceStream, FallbackFaceMapper
from workers.runtime import JobContext, Stage

VOICE_WAIT_S = 60.0


def make_backend(name: str, config: Config):
    """One face mapper by its registered name or ``package.module:Class``."""
    return registry.make_backend("lipsync", name, config)


def make_chain(config: Config, log=None) -> FallbackFaceMapper:
    return FallbackFaceMapper.from_config(
        [make_backend(n, config) for n in config.lipsync.backends], config, log)


class LipsyncStage(Stage):
    name = "lipsync"

    def __init__(self, config):
        super().__init__(config)
        # an ordered chain: a turn gets the first mapper that can serve it (the phoneme
        # mapper needs the TTS's phoneme marks), and the next one takes over if it fails
        self.mapper = make_chain(config)

    @property
    def batcher(self):
        """The transformer's micro-batcher (one model per worker, batched across sessions)."""
        return next((b.batcher for b in self.mapper.backends
                     if getattr(b, "batcher", None) is not None), None)

    async def start(self, worker) -> None:
        await self.mapper.start()

    async def stop(self) -> None:
        await self.mapper.stop()

    def describe(self) -> dict:
        cfg = self.config.lipsync
        return {"backends": self.mapper.names, "fps": cfg.fps, "lookahead_ms": cfg.lookahead_ms}

    async def handle(self, ctx: JobContext) -> list[Job]:
        cfg = self.config.lipsync
        writer = await ctx.writer("face")
        lip: ChainedFaceStream | None = None
        # Seeded by session and turn, so a takeover re-creates exactly the same blinks (and a
        # replay, which carries the recorded session's seed, the same face frames).
        seed = (await ctx.meta()).seed or ctx.sid
        idle = IdleFace(fps=cfg.fps, seed=zlib.crc32(f"{seed}/{ctx.turn}".encode()))
        seg_starts: list[int] = []  # first sample of each segment, in order
        seg_ids: list[int] = []

        async def put(frames: list[FaceFrame]) -> None:
            if not frames:
                return
            frames = idle.apply(frames, speaking=1.0)
            samples = np.array([f.sample for f in frames], dtype=np.int64)
            owner = [seg_ids[max(0, bisect.bisect_right(seg_starts, s) - 1)] for s in samples]
            start = 0
            for i in range(1, len(frames) + 1):
                if i == len(frames) or owner[i] != owner[start]:
                    # a takeover re-makes the same frames; the writer skips what is published
                    entry = FaceEntry(
                        segment=owner[start], samples=samples[start:i],
                        values=np.stack([f.values for f in frames[start:i]]),
                        first_index=frames[start].index,
                    )
                    if await writer.put(entry.to_fields()):
                        await ctx.mark("first_face")
                    start = i

        async for _eid, fields in ctx.tail_turn("voice", VOICE_WAIT_S):
            voice = VoiceEntry.from_fields(fields)
            if lip is None and (voice.pcm or voice.end):
                lip = self.mapper.open(voice.rate, voice)
            if voice.end:
                tail = await lip.flush()
                await put(tail)
                total = tail[-1].index + 1 if tail else _count(voice.sample, voice.rate,
                                                               cfg.fps)
                end = FaceEntry(segment=voice.segment, samples=np.zeros(0, np.int64),
                                values=np.zeros((0, 61), np.float32), first_index=total,
                                end=True)
                await writer.put(end.to_fields())
                ctx.log.info("face_done", frames=total, mapper=lip.backend_name)
                return []
            if not seg_ids or seg_ids[-1] != voice.segment:
                seg_ids.append(voice.segment)
                seg_starts.append(voice.sample)
            pcm = np.frombuffer(voice.pcm, dtype="<i2")
            marks = [(m.sample, m.value) for m in voice.marks if m.kind == "phoneme"]
            await put(await lip.push(pcm, marks))


def _count(samples: int, rate: int, fps: int) -> int:
    return -(-samples * fps // rate)
