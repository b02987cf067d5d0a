"""STT stage: listens to a session's mic stream and turns one utterance into one turn.

A job is "session S, turn T, from mic cursor C": it converts the audio to 16 kHz mono, runs the
VAD, feeds the recognizer from just before speech starts, publishes partial transcripts, and on
end of speech (VAD silence or the client's end_of_utterance) publishes the final transcript. It
then completes with two follow-ups in the ack's transaction: the LLM job for turn T and the STT
job for turn T+1 from where this one stopped, so a session is always listened to exactly once.
"""

from __future__ import annotations

import asyncio
from collections import deque

import numpy as np

from parley.config import Config
from schemas.streams import Job, MicEntry, TranscriptEntry, now_ms, parse_id
from workers.loader import is_object_ref, load_object
from workers.runtime import HandBack, JobContext, Stage
from workers.stt.audio import MicConverter
from workers.stt.pocketsphinx_backend import PocketsphinxBackend
from workers.stt.vad import Vad

RATE = 16000
BACKENDS = {"pocketsphinx": PocketsphinxBackend}


def _cuda_or_cpu() -> str:
    """whisperX has no "auto" device: ask CTranslate2 (whisperX's engine) for a GPU."""
    try:
        import ctranslate2
    except ImportError:  # whisperX itself will say what is missing
        return "cuda"
    return "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"


def make_backend(name: str, config: Config):
    if is_object_ref(name):  # "package.module:Class", e.g. the benchmarks' simulated models
        return load_object(name)(config)
    cfg = config.stt
    if name == "faster-whisper":
        from workers.stt.faster_whisper_backend import FasterWhisperBackend

        return FasterWhisperBackend(cfg.model, device=cfg.device, compute_type=cfg.compute_type,
                                    beam_size=cfg.beam_size, language=cfg.language,
                                    cpu_threads=cfg.cpu_threads)
    if name == "whisperx":
        from workers.stt.whisperx_backend import WhisperXBackend

        device = _cuda_or_cpu() if cfg.device == "auto" else cfg.device
        # int8 is the CPU default; on a GPU whisperX is meant to run float16
        compute = "float16" if cfg.compute_type == "int8" and device == "cuda" else \
            cfg.compute_type
        return WhisperXBackend(cfg.model, device=device, compute_type=compute,
                               batch_size=cfg.batch_size, language=cfg.language,
                               beam_size=cfg.beam_size, cpu_threads=cfg.cpu_threads)
    try:
        cls = BACKENDS[name]
    except KeyError:
        known = ", ".join([*BACKENDS, "faster-whisper", "whisperx"])
        raise ValueError(f"unknown stt backend {name!r}; known: {known}") from None
    if name == "pocketsphinx" and config.pipeline.mode == "sequential":
        # The sequential baseline decodes after the player stops; the CMN warm-up would decode
        # its first 1.5 s twice right then. Without it the baseline is not made slower.
        return cls(cmn_warmup_ms=0)
    return cls()


class SttStage(Stage):
    name = "stt"
    interruptible = False  # the listening job is the next turn: it is what barges in

    def __init__(self, config: Config):
        super().__init__(config)
        self.backend = None

    async def start(self, worker) -> None:
        """The first backend of the chain that loads and warms up serves; a model that is
        missing or a package not installed falls through to the next, loudly."""
        errors = []
        for name in self.config.stt.backends:
            try:
                backend = make_backend(name, self.config)
                await asyncio.to_thread(backend.warm)
                self.backend = backend
                break
            except Exception as exc:  # a backend that cannot load: try the next
                errors.append(f"{name}: {exc}")
                worker.log.warning("stt_backend_unavailable", backend=name, error=str(exc))
        if self.backend is None:
            raise RuntimeError("no stt backend could load: " + "; ".join(errors))

    def describe(self) -> dict:
        return {"backend": self.backend.name if self.backend else None,
                "chain": self.config.stt.backends, "vad_silence_ms": self.config.stt.vad_silence_ms}

    def on_dead(self, job: Job) -> list[Job]:
        # The utterance is lost, the session is not: listen on after the mic audio that failed.
        return [Job(stage="stt", sid=job.sid, turn=job.turn + 1, cursor=job.cursor)]

    async def handle(self, ctx: JobContext) -> list[Job]:
        cfg = self.config.stt
        sequential = self.config.pipeline.mode == "sequential"
        held: list[np.ndarray] = []  # sequential mode: the whole utterance, decoded at its end
        meta = await ctx.meta()
        client_ends = meta.endpoint == "client"
        conv = MicConverter(meta.sample_rate, meta.channels, meta.format, RATE)
        vad = Vad(rate=RATE, silence_ms=cfg.vad_silence_ms, start_ms=cfg.vad_start_ms)
        cursor = ctx.job.cursor
        start_seq, _ = parse_id(cursor)
        # 16 kHz position of the cursor: mic chunks carry no positions, so we count from the
        # session's first chunk; the job's cursor position is stored with the job's text field.
        base = int(ctx.job.text or 0) if ctx.job.text.isdigit() else 0
        preroll: deque[np.ndarray] = deque()
        preroll_len = 0
        preroll_max = cfg.preroll_ms * RATE // 1000
        stream = None
        seq = await ctx.progress("transcript")
        emitted = 0
        last_partial = ""
        speech_start = 0
        mic_seq = start_seq
        eos_ts = 0.0
        try:
            while True:
                if ctx.stopping.is_set() and stream is None:
                    raise HandBack(Job(stage="stt", sid=ctx.sid, turn=ctx.turn, cursor=cursor,
                                       text=str(base + vad.position)))
                entries = await ctx.read("mic", cursor, block_ms=500, count=64)
                if not entries:
                    state = await ctx.redis.hget(ctx.key("meta"), "state")
                    if state is not None and state.decode() == "closed":
                        return []
                    continue
                final = False
                for eid, fields in entries:
                    cursor = eid
                    mic = MicEntry.from_entry(eid, fields)
                    mic_seq = mic.seq
                    if mic.end_of_utterance:
                        if stream is not None:
                            final = True
                            eos_ts = mic.ts
                            break
                        continue
                    samples = conv.push(mic.pcm)
                    events = vad.push(samples) if len(samples) else []
                    if stream is None:
                        preroll.append(samples)
                        preroll_len += len(samples)
                        while preroll and preroll_len - len(preroll[0]) >= preroll_max:
                            preroll_len -= len(preroll.popleft())
                    partial = None
                    for ev in events:
                        if ev.kind == "start" and stream is None:
                            stream = self.backend.open_stream()
                            speech_start = base + ev.sample
                            audio = np.concatenate(list(preroll)) if preroll else samples
                            preroll.clear()
                            preroll_len = 0
                            if sequential:
                                held.append(audio)
                            else:
                                partial = await asyncio.to_thread(stream.feed, audio)
                            samples = samples[:0]
                            # The gateway decides whether this is a barge-in on a reply that
                            # is still playing: only it knows what UE is playing.
                            await ctx.event("speech_start")
                            await ctx.mark("speech_start")
                        elif ev.kind == "end" and stream is not None and not client_ends:
                            final = True
                            eos_ts = mic.ts
                    if stream is not None and len(samples):
                        if sequential:
                            held.append(samples)
                        else:
                            partial = await asyncio.to_thread(stream.feed, samples) or partial
                    if partial and partial != last_partial and not final:
                        last_partial = partial
                        emitted += 1
                        entry = TranscriptEntry(text=partial, final=False,
                                                start_sample=speech_start,
                                                end_sample=base + vad.position, mic_seq=mic_seq)
                        if emitted > seq:
                            await ctx.emit("transcript", emitted, entry.to_fields())
                    if final:
                        break
                    if stream is not None and (base + vad.position - speech_start
                                               > cfg.max_utterance_s * RATE):
                        final = True
                        eos_ts = mic.ts
                        break
                if not final:
                    continue
                eos_ts = eos_ts or now_ms()
                t0 = now_ms()
                if held:
                    await asyncio.to_thread(stream.feed, np.concatenate(held))
                    held.clear()
                text = (await asyncio.to_thread(stream.finish)).strip()
                if self.config.pipeline.profile == "gpu-sim":
                    await asyncio.sleep(self.config.pipeline.sim_stt_final_ms / 1000)
                finish_ms = now_ms() - t0
                stream.close()
                stream = None
                if not text:
                    # Noise, a cough: no turn. Keep listening within this job.
                    ctx.log.info("utterance_empty")
                    last_partial = ""
                    eos_ts = 0.0
                    continue
                emitted += 1
                end_sample = base + vad.position
                entry = TranscriptEntry(text=text, final=True, start_sample=speech_start,
                                        end_sample=end_sample, mic_seq=mic_seq,
                                        end_of_speech_ts=eos_ts)
                await ctx.emit("transcript", emitted, entry.to_fields())
                await ctx.mark("eos", eos_ts)
                await ctx.mark("final_transcript")
                await ctx.mark("stt_finish_ms", finish_ms)
                ctx.log.info("utterance_final", text=text, start=speech_start, end=end_sample)
                return [
                    Job(stage="llm", sid=ctx.sid, turn=ctx.turn, text=text),
                    Job(stage="stt", sid=ctx.sid, turn=ctx.turn + 1, cursor=cursor,
                        text=str(end_sample)),
                ]
        finally:
            if stream is not None:
                stream.close()
