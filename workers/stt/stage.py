"""STT stage: listens to a session's mic stream and turns one utterance into one turn.

A listening job is "session S, turn T, from mic cursor C". The gateway starts one when mic audio
arrives for a session that has none (``WAKE_LISTENER_LUA``); the job follows the mic stream
through the Sans-I/O :class:`~workers.stt.listener.Listener` (16 kHz mono, VAD, pre-roll) and
feeds the recognizer. On the end of an utterance it publishes the final transcript and completes
with the LLM job for turn T and the listening job for T+1, in the ack's transaction. After a
quiet spell with no utterance open it gives the session back (the listening state says where to
resume), so an NPC nobody talks to holds no worker slot. Either way a session is listened to by
at most one job, and a takeover re-reads the utterance from the job's cursor.
"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from core.config import Config
from schemas.streams import (
    SPEAKER_FIELD,
    SPEAKER_START,
    WAKE_LISTENER_LUA,
    Job,
    ListenState,
    MicEntry,
    TranscriptEntry,
    now_ms,
)
from workers import registry, speculation
from workers.runtime import HandBack, JobContext, Outcome, Stage, TurnWriter
from workers.stt.backends import FallbackRecognizer
from workers.stt.echo import EchoGate
from workers.stt.echo_feed import EchoFeed
from workers.stt.listener import (
    Check,
    End,
    Feed,
    Likely,
    Listener,
    ListenerConfig,
    Release,
    Resumed,
    Start,
)

RATE = 16000
# An STT job's ``text`` (unused otherwise): the utterance before it was ended by the server
SERVER_END = "after_server_end"
# How long the recognizer's leftover work waits for the turn's first reply audio: long enough
# for GPU-class models (~250 ms), short enough that the next utterance's listening job (what
# hears a barge-in) starts soon after.
FIRST_AUDIO_WAIT_MS = 300
RELAY_GRACE_S = 0.05  # then the gateway's relay of it (20 ms measured worse than 50)


def make_backend(name: str, config: Config):
    """One recognizer by its registered name or ``package.module:Class``."""
    return registry.make_backend("stt", name, config)


class SttStage(Stage):
    name = "stt"
    interruptible = False  # the listening job is the next turn: it is what barges in

    def __init__(self, config: Config):
        super().__init__(config)
        self.backend: FallbackRecognizer | None = None
        self._wake = None
        self.inline = False
        self.vad = "energy"
        self.turn_model = None  # workers.stt.turn_model.SmartTurn when loaded

    async def start(self, worker) -> None:
        """The chain is built of the backends that load and warm up; one that cannot (a model
        missing, a package not installed) is left out, loudly. While serving, a backend that
        fails mid-utterance hands the whole utterance to the next (workers/stt/backends.py)."""
        errors, loaded = [], []
        for name in self.config.stt.backends:
            try:
                backend = make_backend(name, self.config)
                await asyncio.to_thread(backend.warm)
                loaded.append(backend)
            except Exception as exc:  # a backend that cannot load: try the next
                errors.append(f"{name}: {exc}")
                worker.log.warning("stt_backend_unavailable", backend=name, error=str(exc))
        if not loaded:
            raise RuntimeError("no stt backend could load: " + "; ".join(errors))
        self.backend = FallbackRecognizer.from_config(loaded, self.config)
        self.backend.attach()
        # Recognizers that hold the GIL while decoding (pocketsphinx) are called inline: a
        # thread would not run beside the event loop anyway. The liveness sidecar keeps the
        # worker's jobs its own while the loop is busy.
        self.inline = self.backend.holds_gil
        await self._load_endpointing(worker)

    async def _load_endpointing(self, worker) -> None:
        """The VAD and end-of-turn model: Silero and Smart Turn where installed, the energy VAD
        and a fixed silence where not (said once, loudly)."""
        from workers.stt import silero_vad, turn_model

        cfg = self.config.stt
        self.vad = cfg.vad
        if cfg.vad == "silero" and (why := silero_vad.available()):
            worker.log.warning("vad_fallback", wanted="silero", using="energy", reason=why)
            self.vad = "energy"
        if cfg.turn_model not in ("auto", "smart-turn", "none"):
            raise ValueError(f"stt.turn_model must be auto, smart-turn or none, not "
                             f"{cfg.turn_model!r}")
        if cfg.turn_model == "none":
            return
        why = turn_model.available(cfg.turn_model_path)
        if why and cfg.turn_model == "auto":
            worker.log.info("turn_model_unavailable", reason=why,
                            using=f"vad_silence_ms={cfg.vad_silence_ms}")
            return
        if why:
            raise RuntimeError(f"stt.turn_model=smart-turn: {why}")
        model = turn_model.SmartTurn(cfg.turn_model_path)
        await asyncio.to_thread(model.warm)
        self.turn_model = model

    async def stop(self) -> None:
        if self.backend is not None:
            await self.backend.aclose()

    def describe(self) -> dict:
        return {"backend": self.backend.name if self.backend else None,
                "chain": self.config.stt.backends, "vad": self.vad,
                "turn_model": self.turn_model.name if self.turn_model else None,
                "vad_silence_ms": self.config.stt.vad_silence_ms,
                "speculate_ms": self.config.stt.speculate_ms}

    def listener_config(self) -> ListenerConfig:
        return ListenerConfig.from_stt(self.config.stt, vad=self.vad,
                                       turn_model=self.turn_model is not None)

    async def on_dead(self, worker, job: Job) -> Outcome:
        """The utterance is lost, the session is not: listen on after the mic audio that failed
        (from the mic stream's newest entry, or the same audio would fail again)."""
        top = await worker.redis.xrevrange(worker.keys.session(job.sid, "mic"), count=1)
        cursor = top[0][0] if top else job.cursor
        cursor = cursor.decode() if isinstance(cursor, bytes) else cursor
        state = ListenState(active=False, cursor=cursor, turn=job.turn + 1,
                            position=job.position)
        return Outcome(state=(worker.keys.listener(job.sid), state.to_fields()),
                       then=lambda: self.wake_if_audio(worker.redis, worker.keys, job.sid, cursor))

    @staticmethod
    async def _cursor_ts(ctx: JobContext) -> float | None:
        """When the mic chunk at the job's cursor arrived (the last one the previous job
        read): the echo gate knows the mic was open then (EchoGate's open_since_ms)."""
        cur = ctx.job.cursor
        got = await ctx.redis.xrange(ctx.key("mic"), cur, cur) if cur != "0-0" else []
        return MicEntry.from_entry(*got[0]).ts if got else None

    async def wake_if_audio(self, redis, keys, sid: str, cursor: str) -> None:
        """After giving a session back: audio that arrived since ``cursor`` gets a new job now
        (the gateway's wake for it may have run while this job was still active)."""
        if await redis.xread({keys.session(sid, "mic"): cursor}, count=1):
            if self._wake is None:
                self._wake = redis.register_script(WAKE_LISTENER_LUA)
            await self._wake(keys=[keys.listener(sid), keys.jobs("stt")], args=[sid, now_ms()])

    @staticmethod
    async def _speaker(ctx: JobContext, meta) -> str:
        """What the recognizer learned about the player (RecognizerStream.speaker) in this
        session's last utterance, else in their other sessions' (SessionMeta.player): their
        next utterance starts adapted, with no warm-up burst."""
        got = await ctx.redis.hget(ctx.keys.listener(ctx.sid), SPEAKER_FIELD)
        if not got and meta.player:
            got = await ctx.redis.get(ctx.keys.speaker(meta.player))
            if got:  # kept with the session, so that a replay of it starts from the same
                ctx.background(ctx.redis.hsetnx(ctx.key("meta"), SPEAKER_START, got))
        return got.decode() if isinstance(got, bytes) else got or ""

    async def handle(self, ctx: JobContext) -> Outcome:
        meta = await ctx.meta()
        # Push-to-talk sends the mic only while the player holds the button, and the player
        # ends the turn: no echo to keep out, and the gate's reads would only add latency.
        hands_free = meta.endpoint != "client"
        gated = self.config.stt.echo_gate and hands_free
        writer, speaker, cursor_ts = await asyncio.gather(
            ctx.writer("transcript"), self._speaker(ctx, meta),
            self._cursor_ts(ctx) if gated else asyncio.sleep(0))
        echo = EchoGate(base=ctx.job.position, open_since_ms=cursor_ts) if gated else None
        listener = Listener(meta.sample_rate, meta.channels, meta.format,
                            self.listener_config(), base=ctx.job.position,
                            client_ends=meta.endpoint == "client",
                            after_server_end=ctx.job.text == SERVER_END, echo=echo)
        run = _Utterances(self, ctx, listener, writer)
        run.speaker = speaker
        run.echo = EchoFeed(ctx, echo) if echo is not None else None
        try:
            return await run.listen()
        finally:
            run.close()


class _Utterances:
    """One listening job's I/O: mic entries in, recognizer calls and transcripts out."""

    BLOCK_MS = 250
    # mic chunks per read, decoded in one call: small enough that other sessions on this
    # worker get a turn between calls (a decoder that holds the GIL runs inline)
    BATCH = 16
    # silence the recognizer hears after the last word before its final words are read: its
    # search needs a few frames of it to end the word (16 kHz samples)
    KEEP_SILENCE = 4800

    def __init__(self, stage: SttStage, ctx: JobContext, listener: Listener, writer: TurnWriter):
        self.stage = stage
        self.ctx = ctx
        self.listener = listener
        self.writer = writer  # skips the transcript entries a previous run already published
        self.stream = None
        self.last_partial = ""
        self.cursor = ctx.job.cursor
        self.due_ms = 0.0  # see track_lag
        self.pending: list[np.ndarray] = []  # audio for the recognizer, fed once per read
        self.echo: EchoFeed | None = None
        self.speaker = ""
        self.spec: tuple[int, str] | None = None  # the live speculation: number, its words

    async def listen(self) -> Outcome:
        ctx, listener = self.ctx, self.listener
        heard = time.monotonic()
        while True:
            if ctx.stopping.is_set() and not listener.speaking:
                raise HandBack(Job(stage="stt", sid=ctx.sid, turn=ctx.turn, cursor=self.cursor,
                                   position=listener.position))
            if self.echo is not None:  # the mic with UE's play clock and the reply it plays
                entries = await self.echo.read(self.cursor, self.BLOCK_MS, self.BATCH)
            else:
                entries = await ctx.read("mic", self.cursor, block_ms=self.BLOCK_MS,
                                         count=self.BATCH)
            if not entries:
                ctx.lag_ms = 0.0  # caught up with the mic
                waited = (time.monotonic() - heard) * 1000
                for action in listener.quiet(waited, now_ms()):
                    outcome = await self.act(action)
                    if outcome is not None:
                        return outcome
                continue
            heard = time.monotonic()
            for eid, fields in entries:
                self.cursor = eid
                mic = MicEntry.from_entry(eid, fields)
                before = listener.position
                actions = listener.push(mic)
                self.track_lag(mic.ts, listener.position - before)
                for action in actions:
                    outcome = await self.act(action)
                    if outcome is not None:
                        return outcome
            await self.flush()

    def track_lag(self, arrived_ms: float, samples: int) -> None:
        """How far behind real time this job is: now against when each chunk was due, a chunk
        being due no earlier than the previous one plus its length. A client that uploads a
        recording at once is then not "behind" while STT runs faster than real time."""
        self.due_ms = max(arrived_ms, self.due_ms + samples * 1000 / 16000)
        self.ctx.lag_ms = max(0.0, now_ms() - self.due_ms)

    async def act(self, action) -> Outcome | None:
        if isinstance(action, Start):
            self.stream = self.stage.backend.open_stream(self.speaker)
            self.pending = [action.audio]
            # The gateway decides whether this is a barge-in on a reply that is still
            # playing: only it knows what UE is playing.
            await self.ctx.event("speech_start")
            await self.ctx.mark("speech_start")
            if self.echo is not None and self.echo.gate.in_reach:
                self.ctx.log.info("speech_over_reply", **self.echo.gate.describe())
        elif isinstance(action, Feed):
            if self.stream is not None and len(action.audio):
                self.pending.append(action.audio)
        elif isinstance(action, Check):
            await self.flush()
            return await self.check(action)
        elif isinstance(action, Likely):
            await self.flush()
            await self.speculate()
        elif isinstance(action, Resumed):
            await self.cancel_speculation("resumed")
        elif isinstance(action, End):
            self.skip_silence(action.silent)
            await self.flush()
            return await self.finish(action)
        elif isinstance(action, Release):
            return self.release()
        return None

    async def flush(self) -> None:
        """Feed the recognizer what this read brought, in one call: one call per 20 ms chunk
        cost more in thread hand-offs than in decoding, and 6 players on 2 workers fell 2 s
        behind real time with the CPU half idle."""
        if self.stream is None or not self.pending:
            return
        audio = np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0]
        self.pending = []
        await self.feed(audio)

    def skip_silence(self, silent: int) -> None:
        """Leave unread what the recognizer need not hear before its final words: silence past
        the first KEEP_SILENCE after the last word. At a VAD end that is all of this read's
        audio, and decoding it was 2-15 ms between the end and the transcript."""
        drop = silent - self.KEEP_SILENCE
        while drop > 0 and self.pending:
            tail = self.pending[-1]
            if len(tail) > drop:
                self.pending[-1] = tail[:len(tail) - drop]
                break
            drop -= len(self.pending.pop())

    async def feed(self, audio: np.ndarray) -> None:
        if self.stage.inline:
            # a decoder that holds the GIL gains nothing from a thread but the hand-off
            partial = self.stream.feed(audio)
        else:
            partial = await asyncio.to_thread(self.stream.feed, audio)
        if partial and partial != self.last_partial:
            self.last_partial = partial
            lis = self.listener
            await self.emit(TranscriptEntry(text=partial, final=False,
                                            start_sample=lis.speech_start,
                                            end_sample=lis.position, mic_seq=lis.mic_seq))

    async def emit(self, entry: TranscriptEntry) -> None:
        await self.writer.put(entry.to_fields())

    async def speculate(self) -> None:
        """A likely end: start the reply on the words so far (workers/speculation.py)."""
        if self.stream is None:
            return
        snapshot = self.stream.hypothesis
        text = snapshot() if self.stage.inline else await asyncio.to_thread(snapshot)
        text = (text if text is not None else self.last_partial).strip()
        if not text:
            return
        ctx = self.ctx
        if self.spec is not None:  # one at a time: a pause after a cancelled one
            await self.cancel_speculation("superseded")
        n = await speculation.start(ctx.redis, ctx.keys, ctx.sid, ctx.turn, text)
        await ctx.redis.xadd(ctx.keys.jobs("llm"), Job(stage="llm", sid=ctx.sid, turn=ctx.turn,
                                                       text=text, spec=n).to_fields())
        self.spec = (n, text)
        ctx.worker.observer.speculation("started")
        ctx.log.info("speculation_started", spec=n, text=text, pause=self.listener.likely)

    async def cancel_speculation(self, why: str) -> bool:
        """Cancel the live speculation (adopting one is :meth:`adopt`); False when there was
        none (or it was no longer live)."""
        if self.spec is None:
            return False
        ctx, (n, text) = self.ctx, self.spec
        self.spec = None
        ok = await speculation.settle(ctx.redis, ctx.keys, ctx.sid, n, "cancelled")
        if ok:
            ctx.worker.observer.speculation("cancelled")
        ctx.log.info("speculation_cancelled" if ok else "speculation_lost", spec=n, why=why,
                     text=text)
        return ok

    async def adopt(self, final: TranscriptEntry) -> int:
        """The final transcript and the adoption of the live speculation, in one script that
        also copies what the speculation made so far into the turn's streams: the first audio
        reaches the gateway with the transcript, not two job hand-offs later (~10 ms). Returns
        the speculation's number for the LLM's job, 0 when it was no longer live."""
        ctx, (n, text) = self.ctx, self.spec
        self.spec = None
        ok, replies, voices = await speculation.adopt_final(
            ctx.redis, ctx.keys, ctx.sid, n, ctx.turn, self.writer.claim(), final.to_fields())
        if ok:
            ctx.worker.observer.speculation("adopted")
            if replies:
                await ctx.mark("first_token")
                await ctx.mark("first_fragment")
            if voices:
                await ctx.mark("tts_first_chunk")
        ctx.log.info("speculation_adopted" if ok else "speculation_lost", spec=n,
                     why="same_words", text=text, reply_copied=replies, voice_copied=voices)
        return n if ok else 0

    async def check(self, check: Check) -> Outcome | None:
        """Ask the end-of-turn model about a pause; a complete turn ends here."""
        t0 = time.perf_counter()
        probability = await asyncio.to_thread(self.stage.turn_model.predict, check.audio)
        ms = (time.perf_counter() - t0) * 1000
        self.ctx.log.debug("turn_check", probability=round(probability, 3), ms=round(ms, 1))
        for action in self.listener.verdict(probability, check):
            await self.ctx.mark("turn_model_ms", ms)
            outcome = await self.act(action)
            if outcome is not None:
                return outcome
        return None

    async def finish(self, end: End) -> Outcome | None:
        ctx, lis = self.ctx, self.listener
        eos_ts = end.eos_ts or now_ms()
        if not end.speech:
            return await self.no_speech(end)
        t0 = now_ms()
        finish = self.stream.finish
        text = (finish() if self.stage.inline else await asyncio.to_thread(finish)).strip()
        finish_ms = now_ms() - t0
        lis.utterance_done()
        self.last_partial = ""
        if self.spec is not None and not (
                text and speculation.norm(text) == speculation.norm(self.spec[1])):
            await self.cancel_speculation("other_words")
        if not text:
            self.close()
            if end.reason == "client":  # the client asked for an answer: it gets one
                return await self.no_speech(end)
            ctx.log.info("utterance_empty", reason=end.reason)  # noise, a cough: no turn
            return None
        end_sample = lis.position
        # The transcript and the LLM's job in one round trip, not one after the ack: this is
        # the way to the first audio (an adopted early reply's first audio goes in with the
        # transcript, and the job follows). Once per turn (a guard in Redis), so a takeover
        # that finishes the same utterance again starts no second reply.
        final = TranscriptEntry(text=text, final=True, start_sample=lis.speech_start,
                                end_sample=end_sample, mic_seq=lis.mic_seq,
                                end_of_speech_ts=eos_ts)
        if self.spec is not None:  # started early on these very words: its reply is this one
            await ctx.enqueue("llm", text=text, adopt=await self.adopt(final))
        else:
            await asyncio.gather(self.emit(final), ctx.enqueue("llm", text=text, adopt=0))
        await ctx.mark("eos", eos_ts)
        await ctx.mark("final_transcript")
        await ctx.mark("stt_finish_ms", finish_ms)
        await ctx.mark("vad_ms", end.vad_ms)
        ctx.log.info("utterance_final", text=text, start=lis.speech_start, end=end_sample,
                     reason=end.reason)
        await self.after_first_audio()
        await self.learn_speaker()
        nxt = ListenState(active=True, cursor=self.cursor, turn=ctx.turn + 1,
                          position=end_sample).to_fields()
        if self.speaker:
            nxt[SPEAKER_FIELD] = self.speaker
        return Outcome(follow=[
            Job(stage="stt", sid=ctx.sid, turn=ctx.turn + 1, cursor=self.cursor,
                position=end_sample, text="" if end.reason == "client" else SERVER_END),
        ], state=(ctx.keys.listener(ctx.sid), nxt))

    async def after_first_audio(self) -> None:
        """When the recognizer has work left after the final words, it waits until the turn's
        first reply audio is published and relayed (FIRST_AUDIO_WAIT_MS at most):
        pocketsphinx's end of utterance (2-250 ms of CPU, holding the GIL) run at once
        competed with the LLM, the TTS and the gateway for the way to that audio (push-to-talk
        fleet overhead p50 7.4-9.6 ms before, 5.5-6.3 after, interleaved runs on 2 cores)."""
        if self.stage.backend.finishes_late:
            await self.ctx.read("voice", f"{self.ctx.turn}-0", FIRST_AUDIO_WAIT_MS, count=1)
            await asyncio.sleep(RELAY_GRACE_S)

    async def learn_speaker(self) -> None:
        """What the finished stream learned about the player (RecognizerStream.speaker), for
        their next utterance; then the stream is closed."""
        def learn() -> str:
            try:
                return self.stream.speaker()
            finally:
                self.close()

        learned = learn() if self.stage.inline else await asyncio.to_thread(learn)
        meta = await self.ctx.meta()
        if learned and meta.player:  # for the player's sessions with other NPCs
            self.ctx.background(self.ctx.redis.set(
                self.ctx.keys.speaker(meta.player), learned,
                ex=self.stage.config.redis.session_ttl_s))
        self.speaker = learned or self.speaker

    async def no_speech(self, end: End) -> Outcome:
        """end_of_utterance with nothing to answer (no speech, or nothing recognised): the turn
        ends with turn_done no_speech, and the next utterance is the next turn."""
        ctx, lis = self.ctx, self.listener
        await self.cancel_speculation("no_speech")
        self.close()
        lis.utterance_done()
        ctx.log.info("utterance_no_speech", heard_speech=end.speech)
        await ctx.event("no_speech")
        nxt = ListenState(active=True, cursor=self.cursor, turn=ctx.turn + 1,
                          position=lis.position)
        return Outcome(follow=[Job(stage="stt", sid=ctx.sid, turn=ctx.turn + 1,
                                   cursor=self.cursor, position=lis.position)],
                       state=(ctx.keys.listener(ctx.sid), nxt.to_fields()))

    def release(self) -> Outcome:
        ctx = self.ctx
        state = ListenState(active=False, cursor=self.cursor, turn=ctx.turn,
                            position=self.listener.position)
        ctx.log.debug("listener_released", cursor=self.cursor)
        return Outcome(state=(ctx.keys.listener(ctx.sid), state.to_fields()),
                       then=lambda: self.stage.wake_if_audio(ctx.redis, ctx.keys, ctx.sid,
                                                             self.cursor))

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
