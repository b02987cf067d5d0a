"""TTS stage: tails the turn's reply fragments and publishes the voice as small PCM chunks."""

from __future__ import annotations

import asyncio

import numpy as np

from core.config import Config
from core.personas import load_personas
from schemas.streams import Job, Mark, ReplyEntry, VoiceEntry, now_ms
from workers import registry, speculation
from workers.runtime import JobContext, Stage
from workers.tts.backends import FallbackSynthesizer, drop_samples
from workers.tts.espeak import SynthChunk

REPLY_WAIT_S = 60.0  # no reply fragment for this long: the LLM side is gone, end the turn


def make_backend(name: str, config: Config):
    """One TTS backend by its registered name or ``package.module:Class``."""
    return registry.make_backend("tts", name, config)


def make_chain(config: Config, log=None) -> FallbackSynthesizer:
    return FallbackSynthesizer.from_config([make_backend(n, config) for n in config.tts.backends],
                                           config, log)


def _drop_samples(chunks: list, skip: int) -> list:
    """The chunks after the first ``skip`` samples (marks before the cut are dropped)."""
    return list(drop_samples(chunks, skip))


class TtsStage(Stage):
    name = "tts"

    def __init__(self, config: Config):
        super().__init__(config)
        self.personas = load_personas(config.personas_dir())
        # an ordered chain: a backend that fails mid-fragment hands the rest to the next
        self.backend = make_chain(config)

    def describe(self) -> dict:
        return {"backends": self.backend.names, "sample_rate": self.backend.sample_rate}

    async def start(self, worker) -> None:
        self.backend.attach()

    async def stop(self) -> None:
        await self.backend.aclose()

    @staticmethod
    async def _published(writer) -> tuple[int, set[int], dict[int, int]]:
        """What this turn's voice stream already holds: end sample, finished segments, and
        samples published of the one that was cut off."""
        sample, done, partial = 0, set(), {}
        for _seq, fields in await writer.published_entries():
            v = VoiceEntry.from_fields(fields)
            sample = v.sample + v.num_samples
            partial[v.segment] = partial.get(v.segment, 0) + v.num_samples
            if v.last_in_segment:
                done.add(v.segment)
                partial.pop(v.segment, None)
        return sample, done, partial

    async def handle(self, ctx: JobContext) -> list[Job]:
        meta, writer = await asyncio.gather(ctx.meta(), ctx.writer("voice"))
        persona = self.personas.get(meta.persona)
        voice = meta.voice or (persona.voice if persona else "en-us")
        rate_wpm = persona.voice_rate_wpm if persona else 175
        pitch = persona.voice_pitch if persona else 50
        # Lipsync has nothing to do before there is audio, and its job start would compete
        # with the first synthesis for the CPU: it is enqueued, without waiting, once the
        # first chunk is out (or at once when there is audio already: an adopted early reply,
        # a takeover). Once per turn: a later ask finds the guard in Redis. A speculation has
        # no face: lipsync follows the turn's own voice once it is adopted.
        queued = ctx.speculative

        def face() -> None:
            nonlocal queued
            if not queued:
                queued = True
                ctx.background(ctx.enqueue("lipsync"))

        if ctx.job.adopt or writer.resuming:
            face()
        if ctx.job.adopt:  # the speculation's voice for the same reply (workers/speculation.py)
            if await speculation.adopt(ctx, "voice", writer, VoiceEntry.ends, ("llm", "tts"),
                                       marks=("tts_first_chunk",)) is not None:
                return []
            writer = await ctx.writer("voice")  # speak the rest, after what was copied
        sample = 0
        segments = 0
        # A takeover continues from what the dead worker published, by *samples*: espeak's
        # output for the same text varies by up to ~10 ms between calls, so re-cutting chunks
        # and skipping by count would misplace every later position.
        done_segments: set[int] = set()
        partial: dict[int, int] = {}  # segment -> samples already published
        if writer.resuming:
            sample, done_segments, partial = await self._published(writer)
            writer.skip_published()
        async for _eid, fields in ctx.tail_turn("reply", REPLY_WAIT_S):
            reply = ReplyEntry.from_fields(fields)
            if reply.end:
                end = VoiceEntry(segment=segments, sample=sample,
                                 rate=self.backend.sample_rate, end=True)
                await writer.put(end.to_fields())
                face()  # a reply without audio still gets its (empty) face and turn_done
                ctx.log.info("voice_done", samples=sample, segments=segments)
                return []
            if reply.segment in done_segments:
                segments += 1
                continue
            t0 = now_ms()
            chunks = await asyncio.to_thread(
                lambda text=reply.text: list(self.backend.synthesize(
                    text, voice=voice, rate_wpm=rate_wpm, pitch=pitch)))
            skip = partial.pop(reply.segment, 0)
            if skip:
                chunks = _drop_samples(chunks, skip)
                if not chunks:  # this run came out shorter: just close the segment
                    chunks = [SynthChunk(pcm=np.zeros(0, np.int16), sample=skip,
                                         phonemes=[], words=[])]
            await ctx.mark("tts_first_synth_ms", now_ms() - t0)
            segments += 1 if chunks else 0
            for i, ch in enumerate(chunks):
                # marks are positions in the fragment's audio; ch.sample is where this chunk
                # starts in it, ``sample`` where it starts in the turn's reply
                shift = sample - ch.sample
                marks = [Mark("phoneme", shift + p.sample, p.phoneme) for p in ch.phonemes]
                # word marks carry character offsets into the segment's text, so the
                # gateway can cut the reply exactly where the player stopped hearing it
                marks += [Mark("word", shift + w.sample,
                               f"{w.text_start}:{w.text_start + w.text_length}")
                          for w in ch.words]
                entry = VoiceEntry(
                    segment=reply.segment, sample=sample, rate=self.backend.sample_rate,
                    pcm=ch.pcm.astype("<i2").tobytes(),
                    last_in_segment=i == len(chunks) - 1, marks=marks,
                )
                await writer.put(entry.to_fields())
                face()
                await ctx.mark("tts_first_chunk")
                sample += len(ch.pcm)
