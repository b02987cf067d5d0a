"""Lipsync stage: tails the turn's voice chunks and publishes face frames stamped with samples."""

from __future__ import annotations

import asyncio
import bisect
import zlib

import numpy as np

from schemas.streams import FaceEntry, Job, VoiceEntry
from workers.lipsync.audio_driven import AudioLipsync, FaceFrame
from workers.lipsync.idle import IdleFace
from workers.lipsync.phoneme_driven import PhonemeLipsync
from workers.runtime import JobContext, Stage

VOICE_WAIT_S = 60.0


class LipsyncStage(Stage):
    name = "lipsync"

    def __init__(self, config):
        super().__init__(config)
        self.batcher = None  # transformer: one model per worker, batched across sessions

    async def start(self, worker) -> None:
        cfg = self.config.lipsync
        if "transformer" in cfg.backends and cfg.fps == 60:
            if not cfg.transformer_checkpoint:
                raise ValueError("lipsync backend 'transformer' needs "
                                 "lipsync.transformer_checkpoint (its weights are yours)")
            from workers.batching import MicroBatcher
            from workers.lipsync.transformer_backend import TransformerRunner

            runner = await asyncio.to_thread(
                TransformerRunner.shared, checkpoint=cfg.transformer_checkpoint,
                device=cfg.transformer_device, heads=cfg.transformer_heads,
                dtype=cfg.transformer_dtype)
            self.runner = runner
            self.batcher = MicroBatcher(runner.infer_windows, max_batch=cfg.transformer_max_batch,
                                        window_ms=cfg.transformer_batch_window_ms)

    def describe(self) -> dict:
        cfg = self.config.lipsync
        return {"backends": cfg.backends, "fps": cfg.fps, "lookahead_ms": cfg.lookahead_ms}

    def _mapper(self, voice: VoiceEntry) -> AudioLipsync | PhonemeLipsync:
        """Phoneme-driven when the TTS reports phoneme timings (espeak does), else from audio."""
        cfg = self.config.lipsync
        has_marks = any(m.kind == "phoneme" for m in voice.marks)
        for name in cfg.backends:
            if name == "transformer" and self.batcher is not None:
                from workers.lipsync.transformer_backend import TransformerLipsync

                return TransformerLipsync(cfg.transformer_checkpoint, voice.rate, fps=cfg.fps,
                                          runner=self.runner)
            if name == "phoneme" and has_marks:
                return PhonemeLipsync(voice.rate, fps=cfg.fps)
            if name == "audio":
                return AudioLipsync(voice.rate, fps=cfg.fps, lookahead_ms=cfg.lookahead_ms)
        return AudioLipsync(voice.rate, fps=cfg.fps, lookahead_ms=cfg.lookahead_ms)

    async def handle(self, ctx: JobContext) -> list[Job]:
        cfg = self.config.lipsync
        published = await ctx.progress("face")
        lip: AudioLipsync | PhonemeLipsync | None = None
        # Seeded by session and turn, so a takeover re-creates exactly the same blinks.
        idle = IdleFace(fps=cfg.fps, seed=zlib.crc32(f"{ctx.sid}/{ctx.turn}".encode()))
        seg_starts: list[int] = []  # first sample of each segment, in order
        seg_ids: list[int] = []
        seq = 0

        async def put(frames: list[FaceFrame]) -> None:
            nonlocal seq
            if not frames:
                return
            frames = idle.apply(frames, speaking=1.0)
            samples = np.array([f.sample for f in frames], dtype=np.int64)
            owner = [seg_ids[max(0, bisect.bisect_right(seg_starts, s) - 1)] for s in samples]
            start = 0
            for i in range(1, len(frames) + 1):
                if i == len(frames) or owner[i] != owner[start]:
                    seq += 1
                    if seq > published:
                        entry = FaceEntry(
                            segment=owner[start], samples=samples[start:i],
                            values=np.stack([f.values for f in frames[start:i]]),
                            first_index=frames[start].index,
                        )
                        await ctx.emit("face", seq, entry.to_fields())
                        await ctx.mark("first_face")
                    start = i

        async for _eid, fields in ctx.tail_turn("voice", VOICE_WAIT_S):
            voice = VoiceEntry.from_fields(fields)
            if lip is None and (voice.pcm or voice.end):
                lip = self._mapper(voice)
            if voice.end:
                tail = (await self._run_windows(lip, lip.feed_end()) if self._batched(lip)
                        else lip.flush())
                await put(tail)
                total = tail[-1].index + 1 if tail else _count(voice.sample, voice.rate,
                                                               cfg.fps)
                seq += 1
                end = FaceEntry(segment=voice.segment, samples=np.zeros(0, np.int64),
                                values=np.zeros((0, 61), np.float32), first_index=total,
                                end=True)
                await ctx.emit("face", seq, end.to_fields())
                ctx.log.info("face_done", frames=total)
                return []
            if not seg_ids or seg_ids[-1] != voice.segment:
                seg_ids.append(voice.segment)
                seg_starts.append(voice.sample)
            pcm = np.frombuffer(voice.pcm, dtype="<i2")
            if self._batched(lip):
                # the forward pass blocks for a while: it runs in the batcher's thread, together
                # with other sessions' windows
                await put(await self._run_windows(lip, lip.feed(pcm)))
            elif isinstance(lip, PhonemeLipsync):
                marks = [(m.sample, m.value) for m in voice.marks if m.kind == "phoneme"]
                await put(lip.push(pcm, marks))
            else:
                await put(lip.push(pcm))


    async def stop(self) -> None:
        if self.batcher is not None:
            await asyncio.to_thread(self.batcher.close)

    def _batched(self, lip) -> bool:
        return self.batcher is not None and hasattr(lip, "deliver")

    async def _run_windows(self, lip, windows) -> list[FaceFrame]:
        if not windows:
            return lip.deliver([])
        outs = await asyncio.gather(*(self.batcher.asubmit(w) for w in windows))
        return lip.deliver(list(outs))


def _count(samples: int, rate: int, fps: int) -> int:
    return -(-samples * fps // rate)
